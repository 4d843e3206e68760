//! Median normalisation and rank-value tokenisation of a CSR row chunk (Geneformer's encoding).
//!
//! For row `c` and a column with token `t` and median `m`: `v = x / n_counts[c] * 10000 / m`.
//! Columns with the same token are summed first (their `x`; the median of the first such
//! column with a nonzero value is used, so give such columns the same median). Entries with
//! `x > 0` are sorted by descending `v`, ties by ascending token id, truncated to `max_genes`,
//! and framed by the optional prefix and suffix tokens. A row with no kept entry, or whose
//! `n_counts` is not positive and finite, gets length 0 (and no special tokens) so callers can
//! detect and drop it.
//!
//! # Sorting and ties
//!
//! Only the order of a row's values is output, and `n_counts[c] / 10000` scales them all
//! alike, so entries are ranked by `x * (1 / m)` in float64: a multiply per entry instead of
//! two divisions. It differs from the formula above by a few units in the last place, which
//! can only reorder values equal to about 1e-15 relative.
//!
//! Sorting is the hot loop, so each entry becomes one `u64` key that sorts ascending in the
//! wanted order: the high 48 bits hold the inverted bit pattern of the positive `f64` value
//! (inverting turns ascending into descending) and the low 16 bits the token id. Dropping the
//! lowest 16 of the 52 mantissa bits means values whose relative difference is below about
//! `2^-36 ≈ 1.5e-11` may compare equal and are then ordered by token id, exactly as true ties.
//! Both are far inside the 1e-6 relative near-tie tolerance of the compatibility contract.
//! With a vocabulary of more than 65,536 tokens the key is a `(u64, u32)` pair of the full
//! inverted value bits and the token id, where only exactly equal values count as ties.

use crate::csr::{blocks, check_row, ColumnMap, CoreError, Count, Csr, Index, RowScan};
use rayon::prelude::*;

/// What to do with each row besides the matrix itself.
pub struct RankParams<'a> {
    /// Token id per column, `-1` = not in the vocabulary (still counts toward `n_counts`).
    pub col_token: &'a [i32],
    /// Normalisation median per column (used where `col_token >= 0`; must be finite and > 0).
    pub col_median: &'a [f64],
    /// The number of genes kept per row (special tokens excluded).
    pub max_genes: usize,
    pub prefix_token: Option<u32>,
    pub suffix_token: Option<u32>,
}

/// Flat result: row `r`'s tokens are `tokens[offsets[r]..offsets[r+1]]`.
#[derive(Debug, PartialEq)]
pub struct Tokenized {
    pub tokens: Vec<u32>,
    pub offsets: Vec<i64>,
    /// Stored values that are not integers (for the raw-counts warning).
    pub n_nonint: u64,
}

/// A sort key: ascending key order = descending value, ties by ascending token.
trait RankKey: Ord + Copy + Send {
    fn new(v: f64, token: u32) -> Self;
    fn token(self) -> u32;
}

impl RankKey for u64 {
    #[inline(always)]
    fn new(v: f64, token: u32) -> Self {
        pack_key(v, token)
    }
    #[inline(always)]
    fn token(self) -> u32 {
        (self & 0xFFFF) as u32
    }
}

impl RankKey for (u64, u32) {
    #[inline(always)]
    fn new(v: f64, token: u32) -> Self {
        (!v.to_bits(), token)
    }
    #[inline(always)]
    fn token(self) -> u32 {
        self.1
    }
}

/// Packs a positive value and a token id below 65,536 into one key (see the module docs for
/// the tie consequence of dropping the low 16 value bits).
#[inline(always)]
pub fn pack_key(v: f64, token: u32) -> u64 {
    (!v.to_bits() & !0xFFFF) | token as u64
}

/// Tokenizes every row of `csr`. `n_counts` (one per row) is each row's total; when `None`
/// it is the row's sum over all stored values, whether in the vocabulary or not. Negative, NaN
/// or infinite stored values are an error naming the chunk row and column (the lowest row
/// with such a value).
pub fn tokenize<P: Index, I: Index, V: Count>(
    csr: &Csr<P, I, V>,
    n_counts: Option<&[f64]>,
    params: &RankParams,
) -> Result<Tokenized, CoreError> {
    let rows = csr.rows();
    if params.col_token.len() != csr.n_cols || params.col_median.len() != csr.n_cols {
        return Err(CoreError::Invalid(format!(
            "col_token ({}) and col_median ({}) must both have one entry per column ({})",
            params.col_token.len(),
            params.col_median.len(),
            csr.n_cols
        )));
    }
    if let Some(n) = n_counts {
        if n.len() != rows {
            return Err(CoreError::Invalid(format!(
                "n_counts has {} entries for {} rows",
                n.len(),
                rows
            )));
        }
    }
    for (c, (&t, &m)) in params.col_token.iter().zip(params.col_median).enumerate() {
        if t >= 0 && !(m > 0.0 && m.is_finite()) {
            return Err(CoreError::Invalid(format!(
                "column {c} (token {t}) has median {m}; medians must be positive and finite"
            )));
        }
    }
    csr.validate()?;
    let map = ColumnMap::new(params.col_token);
    if map.id_bound <= 1 << 16 {
        run::<u64, P, I, V>(csr, n_counts, params, &map)
    } else {
        run::<(u64, u32), P, I, V>(csr, n_counts, params, &map)
    }
}

/// A row's total that normalisation can divide by; other rows get no tokens.
#[inline(always)]
fn usable_total(n: f64) -> bool {
    n > 0.0 && n.is_finite()
}

struct BlockOut {
    tokens: Vec<u32>,
    lengths: Vec<u32>,
    nonint: u64,
}

fn run<K: RankKey, P: Index, I: Index, V: Count>(
    csr: &Csr<P, I, V>,
    n_counts: Option<&[f64]>,
    params: &RankParams,
    map: &ColumnMap,
) -> Result<Tokenized, CoreError> {
    // Reciprocal median and token side by side: one cache line per column lookup in the hot
    // loop, and a multiply instead of two divisions per entry (see the module docs).
    let col_info: Vec<(f64, i32)> =
        params.col_median.iter().map(|m| 1.0 / m).zip(params.col_token.iter().copied()).collect();
    let outs: Vec<Result<BlockOut, CoreError>> = blocks(csr.rows())
        .into_par_iter()
        .map_init(
            || (RowScan::new(map), Vec::<K>::new()),
            |(scan, keys), (r0, r1)| rank_block(csr, n_counts, params, &col_info, map, scan, keys, r0, r1),
        )
        .collect();
    let mut blocks_out = Vec::with_capacity(outs.len());
    for o in outs {
        blocks_out.push(o?); // blocks are in row order, so this is the lowest failing row
    }
    let total: usize = blocks_out.iter().map(|b| b.tokens.len()).sum();
    let mut tokens = Vec::with_capacity(total);
    let mut offsets = Vec::with_capacity(csr.rows() + 1);
    offsets.push(0i64);
    let mut n_nonint = 0;
    let mut end = 0i64;
    for b in blocks_out {
        tokens.extend_from_slice(&b.tokens);
        for l in b.lengths {
            end += l as i64;
            offsets.push(end);
        }
        n_nonint += b.nonint;
    }
    Ok(Tokenized { tokens, offsets, n_nonint })
}

#[allow(clippy::too_many_arguments)]
fn rank_block<K: RankKey, P: Index, I: Index, V: Count>(
    csr: &Csr<P, I, V>,
    n_counts: Option<&[f64]>,
    params: &RankParams,
    col_info: &[(f64, i32)],
    map: &ColumnMap,
    scan: &mut RowScan,
    keys: &mut Vec<K>,
    r0: usize,
    r1: usize,
) -> Result<BlockOut, CoreError> {
    let special = params.prefix_token.is_some() as usize + params.suffix_token.is_some() as usize;
    let mut out = BlockOut {
        tokens: Vec::with_capacity((r1 - r0) * (params.max_genes.min(4096) + special)),
        lengths: Vec::with_capacity(r1 - r0),
        nonint: 0,
    };
    for r in r0..r1 {
        let (idx, dat) = csr.row(r);
        keys.clear();
        // Fast path: no two columns share a token and the row's columns are increasing, so
        // every mapped entry is its own gene and keys come straight from the row.
        let fast = if map.has_duplicates {
            false
        } else {
            let (sum, increasing) = check_row(r, idx, dat, csr.n_cols, &mut out.nonint, |c, x| {
                let (inv_median, token) = col_info[c];
                if token >= 0 && x > 0.0 {
                    keys.push(K::new(x * inv_median, token as u32));
                }
            })?;
            let n = n_counts.map_or(sum, |n| n[r]);
            if !increasing || !usable_total(n) {
                keys.clear();
            }
            increasing
        };
        if !fast {
            // Shared tokens or repeated columns: gather with summing (validated again, so the
            // non-integer count is only taken here when the fast check did not run).
            let mut again = 0;
            let nonint = if map.has_duplicates { &mut out.nonint } else { &mut again };
            let sum = scan.scan(r, idx, dat, map, nonint)?;
            if usable_total(n_counts.map_or(sum, |n| n[r])) {
                for e in &scan.entries {
                    if e.x > 0.0 {
                        keys.push(K::new(e.x * col_info[e.col as usize].0, e.id));
                    }
                }
            }
        }
        if keys.len() > params.max_genes {
            // Keys are unique (one per token), so the kept set is deterministic.
            if params.max_genes > 0 {
                keys.select_nth_unstable(params.max_genes - 1);
            }
            keys.truncate(params.max_genes);
        }
        if keys.is_empty() {
            out.lengths.push(0);
            continue;
        }
        keys.sort_unstable();
        let start = out.tokens.len();
        out.tokens.extend(params.prefix_token);
        out.tokens.extend(keys.iter().map(|k| k.token()));
        out.tokens.extend(params.suffix_token);
        out.lengths.push((out.tokens.len() - start) as u32);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic generator so tests need no extra crate.
    pub(crate) struct Rng(u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// The straightforward algorithm: float comparator on (value, token) pairs.
    fn reference(
        indptr: &[i64],
        indices: &[i32],
        data: &[f64],
        n_counts: Option<&[f64]>,
        p: &RankParams,
    ) -> Vec<Vec<u32>> {
        let mut rows = Vec::new();
        for r in 0..indptr.len() - 1 {
            let (a, b) = ((indptr[r] - indptr[0]) as usize, (indptr[r + 1] - indptr[0]) as usize);
            let n = n_counts.map_or(data[a..b].iter().sum(), |n| n[r]);
            let mut by_token: std::collections::BTreeMap<u32, (f64, f64)> = Default::default();
            for j in a..b {
                let t = p.col_token[indices[j] as usize];
                if t >= 0 && data[j] != 0.0 {
                    let e = by_token.entry(t as u32).or_insert((0.0, p.col_median[indices[j] as usize]));
                    e.0 += data[j];
                }
            }
            let mut vals: Vec<(f64, u32)> = by_token
                .into_iter()
                .filter(|_| n > 0.0)
                .map(|(t, (x, m))| (x / n * 10000.0 / m, t))
                .filter(|(v, _)| *v > 0.0)
                .collect();
            vals.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            vals.truncate(p.max_genes);
            let mut toks: Vec<u32> = Vec::new();
            if !vals.is_empty() {
                toks.extend(p.prefix_token);
                toks.extend(vals.iter().map(|v| v.1));
                toks.extend(p.suffix_token);
            }
            rows.push(toks);
        }
        rows
    }

    fn split(t: &Tokenized) -> Vec<Vec<u32>> {
        t.offsets.windows(2).map(|w| t.tokens[w[0] as usize..w[1] as usize].to_vec()).collect()
    }

    #[test]
    fn hand_example() {
        // Columns: 0→token 5 (median 2), 1→not in vocab, 2→token 4 (median 1), 3→token 7 (median 1)
        let col_token = [5, -1, 4, 7];
        let col_median = [2.0, f64::NAN, 1.0, 1.0];
        // Row 0: x = [4, 10, 2, 1] → n = 17; v ∝ [2, -, 2, 1] → tie 5 vs 4 → 4 first.
        // Row 1: empty. Row 2: only the out-of-vocabulary column → length 0.
        let indptr = [0i32, 4, 4, 5];
        let indices = [0i32, 1, 2, 3, 1];
        let data = [4u32, 10, 2, 1, 3];
        let csr = Csr { indptr: &indptr[..], indices: &indices[..], data: &data[..], n_cols: 4 };
        let p = RankParams {
            col_token: &col_token,
            col_median: &col_median,
            max_genes: 10,
            prefix_token: Some(2),
            suffix_token: Some(3),
        };
        let t = tokenize(&csr, None, &p).unwrap();
        assert_eq!(t.tokens, vec![2, 4, 5, 7, 3]);
        assert_eq!(t.offsets, vec![0, 5, 5, 5]);
        assert_eq!(t.n_nonint, 0);
        // Truncation keeps the top genes; the special tokens come on top.
        let p2 = RankParams { max_genes: 1, ..p };
        assert_eq!(tokenize(&csr, None, &p2).unwrap().tokens, vec![2, 4, 3]);
        // n_counts <= 0 gives an empty row.
        let t = tokenize(&csr, Some(&[0.0, 1.0, 1.0]), &p2).unwrap();
        assert_eq!(t.offsets, vec![0, 0, 0, 0]);
    }

    #[test]
    fn matches_reference_on_random_data() {
        let mut rng = Rng(0x9E3779B97F4A7C15);
        for (case, wide) in [(0, false), (1, false), (2, true)] {
            let n_cols = 300;
            let vocab = if wide { 100_000 } else { 1_000 };
            // Some columns share a token (duplicates), some are outside the vocabulary.
            let col_token: Vec<i32> = (0..n_cols)
                .map(|_| if rng.below(10) == 0 { -1 } else { rng.below(vocab) as i32 })
                .chain([7, 7])
                .collect();
            let n_cols = col_token.len();
            // Few distinct medians so that exact ties are common.
            let col_median: Vec<f64> = (0..n_cols).map(|_| [0.5, 1.0, 2.0, 3.7][rng.below(4) as usize]).collect();
            let rows = 200;
            let mut indptr = vec![1000i64];
            let (mut indices, mut data) = (Vec::new(), Vec::new());
            for _ in 0..rows {
                let k = rng.below(60) as usize;
                let mut cols: Vec<i32> = (0..k).map(|_| rng.below(n_cols as u64) as i32).collect();
                cols.sort();
                cols.dedup();
                for c in cols {
                    indices.push(c);
                    data.push(rng.below(5) as f64); // zeros stored too
                }
                indptr.push(1000 + indices.len() as i64);
            }
            let n_counts: Vec<f64> = (0..rows).map(|_| rng.below(500) as f64).collect();
            for max_genes in [0, 5, 1000] {
                let p = RankParams {
                    col_token: &col_token,
                    col_median: &col_median,
                    max_genes,
                    prefix_token: if case == 1 { Some(2) } else { None },
                    suffix_token: if case == 1 { Some(3) } else { None },
                };
                let csr = Csr { indptr: &indptr[..], indices: &indices[..], data: &data[..], n_cols };
                for nc in [None, Some(&n_counts[..])] {
                    let got = tokenize(&csr, nc, &p).unwrap();
                    assert_eq!(split(&got), reference(&indptr, &indices, &data, nc, &p));
                }
            }
        }
    }

    #[test]
    fn errors_name_the_row_and_column() {
        let csr = Csr { indptr: &[0i64, 1, 3], indices: &[0i64, 1, 2], data: &[1.0f32, 2.0, -3.0], n_cols: 3 };
        let p = RankParams { col_token: &[0, 1, 2], col_median: &[1.0; 3], max_genes: 5, prefix_token: None, suffix_token: None };
        let e = tokenize(&csr, None, &p).unwrap_err();
        assert_eq!(e.to_string(), "row 1 column 2 has a negative or NaN value (-3)");
        let csr = Csr { indptr: &[0i64, 1, 3], indices: &[0i64, 1, 2], data: &[f64::NAN, 2.0, 1.5], n_cols: 3 };
        assert_eq!(tokenize(&csr, None, &p).unwrap_err().to_string(), "row 0 column 0 has a negative or NaN value (NaN)");
        let csr = Csr { indptr: &[0i64, 1, 3], indices: &[0i64, 1, 2], data: &[0.5f64, 2.0, 1.5], n_cols: 3 };
        assert_eq!(tokenize(&csr, None, &p).unwrap().n_nonint, 2);
        let bad = RankParams { col_median: &[1.0, 0.0, 1.0], ..p };
        assert!(tokenize(&csr, None, &bad).unwrap_err().to_string().contains("column 1 (token 1) has median 0"));
    }

    #[test]
    fn packed_keys_order_by_value_then_token() {
        let a = pack_key(2.0, 9);
        let b = pack_key(1.0, 1);
        let c = pack_key(2.0, 3);
        assert!(c < a && a < b);
        // Values within ~1e-11 relative compare as ties (documented).
        assert!(pack_key(1.0 + 1e-13, 4) > pack_key(1.0, 3));
        assert!(pack_key(1.0 + 1e-9, 4) < pack_key(1.0, 3));
    }
}
