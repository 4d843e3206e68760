//! A mergeable per-gene sketch of the nonzero values `x / n_counts * 10000`, answering each
//! gene's nonzero median within a stated relative error.
//!
//! Values go into logarithmic buckets (DDSketch): with `γ = (1 + α) / (1 - α)`, bucket `k`
//! holds `γ^(k-1) < v ≤ γ^k` and is represented by `2γ^k / (γ + 1)`, which is within relative
//! error `α` of every value in the bucket. The median of `n` values is the mean of the order
//! statistics of rank `⌊(n-1)/2⌋` and `⌊n/2⌋` (as `numpy.median`); each is replaced by its
//! bucket's representative, so
//!
//! **`|returned − exact| ≤ α · exact`** (up to float rounding of `ln` at bucket edges, ~1e-12).
//!
//! Each gene keeps a dense run of `u32` bucket counts between its smallest and largest bucket,
//! so memory is about `4 · ln(max/min) / ln γ` bytes per gene (≈ 23 KB for five decades at
//! `α = 0.001`), independent of the number of cells. Sketches of separate parts of a corpus
//! merge exactly: merging gives the same sketch as one pass over all parts.

use crate::csr::{blocks, ColumnMap, CoreError, Count, Csr, Index, RowScan};
use rayon::prelude::*;

const MAGIC: &[u8; 4] = b"CRMS";
const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, Default)]
struct Store {
    offset: i32,
    counts: Vec<u32>,
    total: u64,
}

/// Equal when the same values were counted, whatever the slack around them.
impl PartialEq for Store {
    fn eq(&self, other: &Self) -> bool {
        self.total == other.total && self.buckets().eq(other.buckets())
    }
}

impl Store {
    fn buckets(&self) -> impl Iterator<Item = (i32, u32)> + '_ {
        self.counts.iter().enumerate().filter(|(_, &c)| c > 0).map(|(i, &c)| (self.offset + i as i32, c))
    }

    fn add(&mut self, key: i32, n: u32) {
        if self.counts.is_empty() {
            self.offset = key;
            self.counts.push(0);
        } else if key < self.offset {
            // Prepend with some slack: the minimum tends to creep down a few buckets at a time.
            let grow = (self.offset - key) as usize + 16;
            let mut counts = vec![0u32; grow + self.counts.len()];
            counts[grow..].copy_from_slice(&self.counts);
            self.counts = counts;
            self.offset -= grow as i32;
        } else if (key - self.offset) as usize >= self.counts.len() {
            self.counts.resize((key - self.offset) as usize + 1, 0);
        }
        let c = &mut self.counts[(key - self.offset) as usize];
        *c = c.saturating_add(n);
        self.total += n as u64;
    }

    /// The bucket key holding the value of 0-based rank `rank`.
    fn key_at(&self, rank: u64) -> i32 {
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c as u64;
            if seen > rank {
                return self.offset + i as i32;
            }
        }
        self.offset + self.counts.len() as i32 - 1
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MedianSketch {
    alpha: f64,
    ln_gamma: f64,
    genes: Vec<Store>,
}

impl MedianSketch {
    pub fn new(n_genes: usize, relative_accuracy: f64) -> Result<Self, CoreError> {
        if !(relative_accuracy > 0.0 && relative_accuracy < 1.0) {
            return Err(CoreError::Invalid(format!(
                "relative_accuracy must be between 0 and 1, got {relative_accuracy}"
            )));
        }
        let gamma = (1.0 + relative_accuracy) / (1.0 - relative_accuracy);
        Ok(MedianSketch { alpha: relative_accuracy, ln_gamma: gamma.ln(), genes: vec![Store::default(); n_genes] })
    }

    pub fn relative_accuracy(&self) -> f64 {
        self.alpha
    }

    pub fn n_genes(&self) -> usize {
        self.genes.len()
    }

    #[inline]
    fn key(&self, v: f64) -> i32 {
        (v.ln() / self.ln_gamma).ceil() as i32
    }

    fn representative(&self, key: i32) -> f64 {
        let gamma = self.ln_gamma.exp();
        2.0 * (key as f64 * self.ln_gamma).exp() / (gamma + 1.0)
    }

    /// Adds one value of `gene` (for tests and callers without a CSR matrix).
    pub fn add(&mut self, gene: usize, v: f64) {
        if v > 0.0 && v.is_finite() {
            let k = self.key(v);
            self.genes[gene].add(k, 1);
        }
    }

    /// Adds every row of a CSR chunk: for each gene (`col_gene[c]`, `-1` = skip; columns of
    /// the same gene summed) with a nonzero sum `x`, the value `x / n_counts * 10000`.
    /// `n_counts` defaults to each row's sum over all stored values. On an error (negative or
    /// NaN value, naming the chunk row and column) the sketch may already hold earlier rows
    /// of the chunk, so discard it.
    pub fn update<P: Index, I: Index, V: Count>(
        &mut self,
        csr: &Csr<P, I, V>,
        n_counts: Option<&[f64]>,
        col_gene: &[i32],
    ) -> Result<(), CoreError> {
        if col_gene.len() != csr.n_cols {
            return Err(CoreError::Invalid(format!(
                "col_gene has {} entries for {} columns",
                col_gene.len(),
                csr.n_cols
            )));
        }
        if let Some(&g) = col_gene.iter().find(|&&g| g >= self.genes.len() as i32) {
            return Err(CoreError::Invalid(format!("col_gene holds gene {g} but the sketch has {} genes", self.genes.len())));
        }
        if let Some(n) = n_counts {
            if n.len() != csr.rows() {
                return Err(CoreError::Invalid(format!("n_counts has {} entries for {} rows", n.len(), csr.rows())));
            }
        }
        csr.validate()?;
        let map = ColumnMap::new(col_gene);
        let all = blocks(csr.rows());
        // Bucket keys (the costly `ln`) are computed in parallel, a bounded group of blocks at
        // a time, then counted in row order.
        for group in all.chunks(64) {
            let keyed: Vec<Result<Vec<(u32, i32)>, CoreError>> = group
                .par_iter()
                .map_init(
                    || RowScan::new(&map),
                    |scan, &(r0, r1)| {
                        let mut out = Vec::new();
                        let mut nonint = 0;
                        for r in r0..r1 {
                            let (idx, dat) = csr.row(r);
                            let sum = scan.scan(r, idx, dat, &map, &mut nonint)?;
                            let n = n_counts.map_or(sum, |n| n[r]);
                            if n.is_nan() || n <= 0.0 {
                                continue;
                            }
                            for e in &scan.entries {
                                let v = e.x / n * 10000.0;
                                if v > 0.0 && v.is_finite() {
                                    out.push((e.id, self.key(v)));
                                }
                            }
                        }
                        Ok(out)
                    },
                )
                .collect();
            let failed = keyed.iter().position(|b| b.is_err());
            let ok: Vec<&Vec<(u32, i32)>> = keyed[..failed.unwrap_or(keyed.len())].iter().flatten().collect();
            // Counting is bound by cache misses on the scattered per-gene stores, so each
            // thread takes a range of genes and counts only those (reading all pairs).
            let per_thread = self.genes.len().div_ceil(rayon::current_num_threads()).max(1);
            self.genes.par_chunks_mut(per_thread).enumerate().for_each(|(i, stores)| {
                let lo = (i * per_thread) as u32;
                let hi = lo + stores.len() as u32;
                for block in &ok {
                    for &(g, k) in block.iter() {
                        if g >= lo && g < hi {
                            stores[(g - lo) as usize].add(k, 1);
                        }
                    }
                }
            });
            if let Some(i) = failed {
                return Err(keyed.into_iter().nth(i).unwrap().unwrap_err());
            }
        }
        Ok(())
    }

    /// Adds another sketch of the same genes and accuracy.
    pub fn merge(&mut self, other: &MedianSketch) -> Result<(), CoreError> {
        if other.alpha != self.alpha || other.genes.len() != self.genes.len() {
            return Err(CoreError::Invalid(format!(
                "cannot merge a sketch of {} genes at accuracy {} into one of {} genes at accuracy {}",
                other.genes.len(),
                other.alpha,
                self.genes.len(),
                self.alpha
            )));
        }
        for (mine, theirs) in self.genes.iter_mut().zip(&other.genes) {
            for (k, c) in theirs.buckets() {
                mine.add(k, c);
            }
        }
        Ok(())
    }

    /// Each gene's nonzero median (NaN where a gene had no nonzero value).
    pub fn medians(&self) -> Vec<f64> {
        self.genes
            .iter()
            .map(|s| {
                if s.total == 0 {
                    return f64::NAN;
                }
                let lo = self.representative(s.key_at((s.total - 1) / 2));
                let hi = self.representative(s.key_at(s.total / 2));
                (lo + hi) / 2.0
            })
            .collect()
    }

    /// Each gene's number of nonzero values.
    pub fn nonzero_counts(&self) -> Vec<i64> {
        self.genes.iter().map(|s| s.total as i64).collect()
    }

    /// Little-endian: magic `CRMS`, format version (u32), α (f64), gene count (u64), then per
    /// gene: total (u64), first bucket key (i32), bucket count (u32), counts (u32 each).
    pub fn to_bytes(&self) -> Vec<u8> {
        let size: usize = 24 + self.genes.iter().map(|s| 16 + 4 * s.counts.len()).sum::<usize>();
        let mut b = Vec::with_capacity(size);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&self.alpha.to_le_bytes());
        b.extend_from_slice(&(self.genes.len() as u64).to_le_bytes());
        for s in &self.genes {
            b.extend_from_slice(&s.total.to_le_bytes());
            b.extend_from_slice(&s.offset.to_le_bytes());
            b.extend_from_slice(&(s.counts.len() as u32).to_le_bytes());
            for c in &s.counts {
                b.extend_from_slice(&c.to_le_bytes());
            }
        }
        b
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CoreError> {
        let bad = |what: &str| CoreError::Invalid(format!("not a cellrank median sketch: {what}"));
        let mut pos = 0usize;
        let mut take = |n: usize| -> Result<&[u8], CoreError> {
            let s = bytes.get(pos..pos + n).ok_or_else(|| bad("truncated"))?;
            pos += n;
            Ok(s)
        };
        if take(4)? != MAGIC {
            return Err(bad("wrong magic bytes"));
        }
        let version = u32::from_le_bytes(take(4)?.try_into().unwrap());
        if version != FORMAT_VERSION {
            return Err(CoreError::Invalid(format!(
                "median sketch format version {version} is not supported (this build reads version {FORMAT_VERSION})"
            )));
        }
        let alpha = f64::from_le_bytes(take(8)?.try_into().unwrap());
        let n_genes = u64::from_le_bytes(take(8)?.try_into().unwrap()) as usize;
        let mut sk = MedianSketch::new(0, alpha)?;
        sk.genes.reserve(n_genes.min(bytes.len() / 16));
        for _ in 0..n_genes {
            let total = u64::from_le_bytes(take(8)?.try_into().unwrap());
            let offset = i32::from_le_bytes(take(4)?.try_into().unwrap());
            let len = u32::from_le_bytes(take(4)?.try_into().unwrap()) as usize;
            let raw = take(len.checked_mul(4).ok_or_else(|| bad("bucket count overflows"))?)?;
            let counts: Vec<u32> = raw.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
            if counts.iter().map(|&c| c as u64).sum::<u64>() != total {
                return Err(bad("bucket counts do not add up"));
            }
            sk.genes.push(Store { offset, counts, total });
        }
        if pos != bytes.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(sk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn exact_median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = v.len();
        (v[(n - 1) / 2] + v[n / 2]) / 2.0
    }

    /// A random CSR chunk of integer counts; returns it with each gene's exact values.
    fn chunk(rng: &mut Rng, rows: usize, n_cols: usize, col_gene: &[i32], n_genes: usize)
        -> (Vec<i64>, Vec<i32>, Vec<f32>, Vec<Vec<f64>>) {
        let (mut indptr, mut indices, mut data) = (vec![0i64], vec![], vec![]);
        let mut values = vec![Vec::new(); n_genes];
        for _ in 0..rows {
            let mut sums = vec![0.0f64; n_genes];
            let mut total = 0.0;
            for c in 0..n_cols {
                if rng.below(3) == 0 {
                    // Heavy-tailed counts so that medians span several decades.
                    let x = (rng.below(4) as f64 * (1 << rng.below(8)) as f64) as f32;
                    indices.push(c as i32);
                    data.push(x);
                    total += x as f64;
                    if col_gene[c] >= 0 {
                        sums[col_gene[c] as usize] += x as f64;
                    }
                }
            }
            indptr.push(indices.len() as i64);
            for (g, &s) in sums.iter().enumerate() {
                if s > 0.0 {
                    values[g].push(s / total * 10000.0);
                }
            }
        }
        (indptr, indices, data, values)
    }

    #[test]
    fn medians_within_bound_and_merge_equals_single_pass() {
        let mut rng = Rng(42);
        let (n_cols, n_genes) = (40, 30);
        // Columns 30..40: ten duplicates of genes and a few skipped columns.
        let col_gene: Vec<i32> = (0..n_cols as i32).map(|c| if c < 30 { c } else if c < 37 { c - 30 } else { -1 }).collect();
        for alpha in [0.01, 0.001] {
            let mut whole = MedianSketch::new(n_genes, alpha).unwrap();
            let mut parts = MedianSketch::new(n_genes, alpha).unwrap();
            let mut exact = vec![Vec::new(); n_genes];
            for _ in 0..3 {
                let (indptr, indices, data, values) = chunk(&mut rng, 500, n_cols, &col_gene, n_genes);
                let csr = Csr { indptr: &indptr[..], indices: &indices[..], data: &data[..], n_cols };
                whole.update(&csr, None, &col_gene).unwrap();
                let mut part = MedianSketch::new(n_genes, alpha).unwrap();
                part.update(&csr, None, &col_gene).unwrap();
                let part = MedianSketch::from_bytes(&part.to_bytes()).unwrap();
                parts.merge(&part).unwrap();
                for (g, v) in values.into_iter().enumerate() {
                    exact[g].extend(v);
                }
            }
            assert!(whole == parts, "merged sketch differs from the single pass");
            let got = whole.medians();
            let counts = whole.nonzero_counts();
            let mut worst = 0.0f64;
            for g in 0..n_genes {
                assert_eq!(counts[g] as usize, exact[g].len());
                let m = exact_median(exact[g].clone());
                let rel = (got[g] - m).abs() / m;
                assert!(rel <= alpha * (1.0 + 1e-9), "gene {g}: {} vs exact {m} ({rel})", got[g]);
                worst = worst.max(rel);
            }
            // The bound is not vacuous: the error really is of order alpha.
            assert!(worst > alpha / 20.0, "worst {worst}");
        }
    }

    #[test]
    fn empty_genes_bad_values_and_bad_bytes() {
        let mut sk = MedianSketch::new(3, 0.01).unwrap();
        sk.add(0, 5.0);
        sk.add(0, 7.0);
        let m = sk.medians();
        assert!((m[0] - 6.0).abs() <= 6.0 * 0.01);
        assert!(m[1].is_nan() && m[2].is_nan());
        let csr = Csr { indptr: &[0i32, 2], indices: &[0i32, 1], data: &[1i64, -2], n_cols: 2 };
        let e = sk.update(&csr, None, &[0, 1]).unwrap_err();
        assert_eq!(e.to_string(), "row 0 column 1 has a negative or NaN value (-2)");
        let mut b = sk.to_bytes();
        assert!(MedianSketch::from_bytes(&b).unwrap() == sk);
        b[4] = 9;
        assert!(MedianSketch::from_bytes(&b).unwrap_err().to_string().contains("version 9"));
        assert!(MedianSketch::from_bytes(&sk.to_bytes()[..20]).is_err());
        let other = MedianSketch::new(3, 0.001).unwrap();
        assert!(sk.merge(&other).is_err());
    }
}
