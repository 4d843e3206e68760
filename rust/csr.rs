//! CSR row chunks as borrowed slices, the validation every consumer needs, and the per-row
//! gathering of mapped columns (with same-id columns summed) shared by ranking and medians.

use std::fmt;

/// A stored matrix value of any dtype the readers produce.
pub trait Count: Copy + Send + Sync {
    /// Integer dtypes can never hold a non-integer count, so the check is skipped for them.
    const INTEGRAL: bool;
    fn to_f64(self) -> f64;
}

macro_rules! count_impl {
    ($t:ty, $integral:expr) => {
        impl Count for $t {
            const INTEGRAL: bool = $integral;
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    };
}
count_impl!(f32, false);
count_impl!(f64, false);
count_impl!(i32, true);
count_impl!(i64, true);
count_impl!(u16, true);
count_impl!(u32, true);

/// An `indptr` or `indices` entry.
pub trait Index: Copy + Send + Sync {
    fn to_i64(self) -> i64;
}
impl Index for i32 {
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self as i64
    }
}
impl Index for i64 {
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self
    }
}

/// Errors of the core. `BadValue` is a user's data problem (negative, NaN or infinite count);
/// `Invalid` is any other inconsistent input.
#[derive(Debug, Clone, PartialEq)]
pub enum CoreError {
    BadValue { row: usize, col: i64, value: f64 },
    Invalid(String),
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::BadValue { row, col, value } if value.is_infinite() => {
                write!(f, "row {row} column {col} has an infinite value ({value})")
            }
            CoreError::BadValue { row, col, value } => {
                write!(f, "row {row} column {col} has a negative or NaN value ({value})")
            }
            CoreError::Invalid(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for CoreError {}

/// One chunk of rows of a CSR matrix. `indptr` may be a slice of a bigger matrix's indptr
/// (not starting at 0): row `r` spans `indptr[r] - indptr[0] .. indptr[r+1] - indptr[0]` of
/// `indices` and `data`.
pub struct Csr<'a, P, I, V> {
    pub indptr: &'a [P],
    pub indices: &'a [I],
    pub data: &'a [V],
    pub n_cols: usize,
}

impl<'a, P: Index, I: Index, V: Count> Csr<'a, P, I, V> {
    pub fn rows(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }

    /// Checks the structure once so the per-row loops can slice without further checks.
    pub fn validate(&self) -> Result<(), CoreError> {
        if self.indptr.is_empty() {
            return Err(CoreError::Invalid("indptr must have at least one entry".into()));
        }
        let base = self.indptr[0].to_i64();
        let mut prev = base;
        for (r, p) in self.indptr.iter().enumerate().skip(1) {
            let p = p.to_i64();
            if p < prev {
                return Err(CoreError::Invalid(format!(
                    "indptr decreases at row {} ({} after {})",
                    r - 1,
                    p,
                    prev
                )));
            }
            prev = p;
        }
        let nnz = (prev - base) as usize;
        if self.indices.len() < nnz || self.data.len() < nnz {
            return Err(CoreError::Invalid(format!(
                "indptr spans {} stored values but indices has {} and data has {}",
                nnz,
                self.indices.len(),
                self.data.len()
            )));
        }
        Ok(())
    }

    /// The stored columns and values of row `r` (after `validate`).
    #[inline]
    pub fn row(&self, r: usize) -> (&'a [I], &'a [V]) {
        let base = self.indptr[0].to_i64();
        let a = (self.indptr[r].to_i64() - base) as usize;
        let b = (self.indptr[r + 1].to_i64() - base) as usize;
        (&self.indices[a..b], &self.data[a..b])
    }
}

/// Where a CSR chunk read from a file is malformed: the chunk row and what is wrong there.
#[derive(Debug, Clone, PartialEq)]
pub struct StructureError {
    pub row: usize,
    pub problem: String,
}

/// Checks everything a reader's chunk must satisfy before any value is used: `indptr` is
/// non-empty, starts at or above 0 and never decreases; it spans exactly the `indices.len()`
/// column indices and `n_data` values the chunk holds; every column index is in `0..n_cols`.
/// Corrupt files break these, and every later step (shares of counts, totals, ranking)
/// indexes by them. The column scan is one vectorised pass over all indices; only a chunk
/// that fails it is scanned row by row, to name the first bad row.
pub fn check_structure<P: Index, I: Index>(
    indptr: &[P],
    indices: &[I],
    n_data: usize,
    n_cols: usize,
) -> Result<(), StructureError> {
    let fail = |row: usize, problem: String| Err(StructureError { row, problem });
    let Some(first) = indptr.first() else {
        return fail(0, "the row pointer (indptr) is empty".into());
    };
    let base = first.to_i64();
    if base < 0 {
        return fail(0, format!("the row pointer (indptr) starts at {base}"));
    }
    let mut prev = base;
    for (r, p) in indptr.iter().enumerate().skip(1) {
        let p = p.to_i64();
        if p < prev {
            return fail(r - 1, format!("the row pointer (indptr) decreases from {prev} to {p}"));
        }
        prev = p;
    }
    let rows = indptr.len() - 1;
    let nnz = (prev - base) as u64;
    if indices.len() as u64 != nnz || n_data as u64 != nnz {
        return fail(
            rows.saturating_sub(1),
            format!(
                "the row pointer (indptr) spans {nnz} stored values but there are {} column indices and {n_data} values",
                indices.len()
            ),
        );
    }
    // As u64 a negative index is huge, so one unsigned comparison catches both ends; the
    // branch-free OR reduction vectorises.
    let n = n_cols as u64;
    if !indices.iter().fold(false, |outside, c| outside | (c.to_i64() as u64 >= n)) {
        return Ok(());
    }
    for r in 0..rows {
        let a = (indptr[r].to_i64() - base) as usize;
        let b = (indptr[r + 1].to_i64() - base) as usize;
        if let Some(c) = indices[a..b].iter().map(|c| c.to_i64()).find(|&c| c < 0 || c as u64 >= n_cols as u64) {
            return fail(r, format!("column index {c} is outside the {n_cols} genes"));
        }
    }
    unreachable!("an index outside 0..n_cols lies in some row")
}

/// Scans a column → id map (`-1` = skip) once: the number of ids it needs room for and whether
/// two columns share an id (only then do rows need the slower summing path).
pub struct ColumnMap<'a> {
    pub ids: &'a [i32],
    pub id_bound: usize,
    pub has_duplicates: bool,
}

impl<'a> ColumnMap<'a> {
    pub fn new(ids: &'a [i32]) -> Self {
        let id_bound = ids.iter().copied().max().map_or(0, |m| (m.max(-1) + 1) as usize);
        let mut seen = vec![false; id_bound];
        let mut has_duplicates = false;
        for &t in ids {
            if t >= 0 {
                let s = &mut seen[t as usize];
                has_duplicates |= *s;
                *s = true;
            }
        }
        ColumnMap { ids, id_bound, has_duplicates }
    }
}

/// Whether a finite non-negative value is a whole number. A float-to-int round trip rather
/// than `fract()`, which compiles to a libm call on baseline x86-64 and dominated the scan.
/// Values from 2^52 up are always whole.
#[inline(always)]
fn is_integral(x: f64) -> bool {
    x >= 4_503_599_627_370_496.0 || (x as i64) as f64 == x
}

/// A stored column index as i64, or an error naming the row when it is out of range.
#[inline(always)]
fn check_column<I: Index>(row: usize, c: I, n_cols: u64) -> Result<i64, CoreError> {
    let c = c.to_i64();
    if c < 0 || c as u64 >= n_cols {
        return Err(CoreError::Invalid(format!(
            "row {row} has column index {c} but there are only {n_cols} columns"
        )));
    }
    Ok(c)
}

/// One stored value as f64, or the error naming its chunk row and column when it is negative,
/// NaN or infinite. Non-integer values are added to `nonint`.
#[inline(always)]
fn check_value<V: Count>(row: usize, col: i64, x: V, nonint: &mut u64) -> Result<f64, CoreError> {
    let xf = x.to_f64();
    if V::INTEGRAL {
        if xf < 0.0 {
            return Err(CoreError::BadValue { row, col, value: xf });
        }
    } else {
        if xf < 0.0 || !xf.is_finite() {
            return Err(CoreError::BadValue { row, col, value: xf });
        }
        if !is_integral(xf) {
            *nonint += 1;
        }
    }
    Ok(xf)
}

/// Validates one row (chunk row `row`: column indices in range, no negative, NaN or infinite
/// value), hands each stored `(column, value)` to `each`, and returns the row's sum over all
/// stored values and whether its column indices are strictly increasing (then no column
/// repeats). Non-integer values are added to `nonint`.
#[inline(always)]
pub fn check_row<I: Index, V: Count>(
    row: usize,
    idx: &[I],
    dat: &[V],
    n_cols: usize,
    nonint: &mut u64,
    mut each: impl FnMut(usize, f64),
) -> Result<(f64, bool), CoreError> {
    let mut sum = 0.0f64;
    let mut prev = -1i64;
    let mut increasing = true;
    for (&c, &x) in idx.iter().zip(dat) {
        let c = check_column(row, c, n_cols as u64)?;
        increasing &= c > prev;
        prev = c;
        let xf = check_value(row, c, x, nonint)?;
        sum += xf;
        each(c as usize, xf);
    }
    Ok((sum, increasing))
}

/// One mapped, nonzero entry of a row: its id, its (summed) value and the first column seen.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub id: u32,
    pub x: f64,
    pub col: u32,
}

/// Per-thread scratch for gathering rows; reused across rows so the hot loop never allocates.
pub struct RowScan {
    pub entries: Vec<Entry>,
    // For summing same-id columns: `stamp[id] == cur` means `id` was seen in this row, at
    // `slot[id]` in `entries`. Allocated on first need: when the column map has duplicates,
    // or a row repeats a column index (non-canonical CSR).
    stamp: Vec<u32>,
    slot: Vec<u32>,
    cur: u32,
    id_bound: usize,
}

impl RowScan {
    pub fn new(map: &ColumnMap) -> Self {
        RowScan { entries: Vec::new(), stamp: Vec::new(), slot: Vec::new(), cur: 0, id_bound: map.id_bound }
    }

    /// Validates one row (chunk row `row`), gathers its mapped nonzero entries into
    /// `self.entries` (summing same-id columns) and returns the sum over ALL its stored values.
    /// Non-integer stored values are added to `nonint`.
    #[inline]
    pub fn scan<I: Index, V: Count>(
        &mut self,
        row: usize,
        idx: &[I],
        dat: &[V],
        map: &ColumnMap,
        nonint: &mut u64,
    ) -> Result<f64, CoreError> {
        if map.has_duplicates {
            return self.scan_impl::<true, I, V>(row, idx, dat, map, nonint).map(|(s, _)| s);
        }
        let (sum, increasing) = self.scan_impl::<false, I, V>(row, idx, dat, map, nonint)?;
        if increasing {
            return Ok(sum);
        }
        // Column indices out of order may repeat a column: gather again, summing.
        self.scan_impl::<true, I, V>(row, idx, dat, map, &mut 0).map(|(s, _)| s)
    }

    /// Returns the row sum and whether the column indices were strictly increasing.
    #[inline(always)]
    fn scan_impl<const DEDUP: bool, I: Index, V: Count>(
        &mut self,
        row: usize,
        idx: &[I],
        dat: &[V],
        map: &ColumnMap,
        nonint: &mut u64,
    ) -> Result<(f64, bool), CoreError> {
        self.entries.clear();
        let n_cols = map.ids.len() as u64;
        if DEDUP {
            if self.stamp.len() < self.id_bound {
                self.stamp = vec![0; self.id_bound];
                self.slot = vec![0; self.id_bound];
                self.cur = 0;
            }
            if self.cur == u32::MAX {
                self.stamp.iter_mut().for_each(|s| *s = 0);
                self.cur = 0;
            }
            self.cur += 1;
        }
        let mut sum = 0.0f64;
        let mut prev = -1i64;
        let mut increasing = true;
        for (&c, &x) in idx.iter().zip(dat) {
            let c = check_column(row, c, n_cols)?;
            increasing &= c > prev;
            prev = c;
            let xf = check_value(row, c, x, nonint)?;
            sum += xf;
            let id = map.ids[c as usize];
            if id < 0 || xf == 0.0 {
                continue;
            }
            let id = id as u32;
            if DEDUP {
                let i = id as usize;
                if self.stamp[i] == self.cur {
                    self.entries[self.slot[i] as usize].x += xf;
                    continue;
                }
                self.stamp[i] = self.cur;
                self.slot[i] = self.entries.len() as u32;
            }
            self.entries.push(Entry { id, x: xf, col: c as u32 });
        }
        Ok((sum, increasing))
    }
}

/// Splits `rows` into blocks for rayon: small enough to balance two to many threads, large
/// enough that per-block setup (scratch, output vectors) is negligible.
pub fn blocks(rows: usize) -> Vec<(usize, usize)> {
    const BLOCK: usize = 64;
    (0..rows.div_ceil(BLOCK)).map(|b| (b * BLOCK, ((b + 1) * BLOCK).min(rows))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_catches_bad_structure() {
        let csr = Csr { indptr: &[0i64, 2, 1], indices: &[0i32, 1], data: &[1.0f64, 2.0], n_cols: 2 };
        assert!(csr.validate().unwrap_err().to_string().contains("indptr decreases at row 1"));
        let csr = Csr { indptr: &[5i32, 8], indices: &[0i32, 1], data: &[1.0f32, 2.0], n_cols: 2 };
        assert!(csr.validate().unwrap_err().to_string().contains("spans 3 stored values"));
        let csr = Csr { indptr: &[5i32, 6, 8], indices: &[0i32, 1, 0], data: &[1u16, 2, 3], n_cols: 2 };
        csr.validate().unwrap();
        assert_eq!(csr.row(1), (&[1i32, 0][..], &[2u16, 3][..]));
    }

    #[test]
    fn structure_check_names_the_first_bad_row() {
        let ok = check_structure(&[3i64, 5, 5, 7], &[0i32, 2, 1, 1], 4, 3);
        assert_eq!(ok, Ok(()));
        assert_eq!(check_structure::<i64, i32>(&[0], &[], 0, 0), Ok(()));
        let err = |indptr: &[i64], indices: &[i32], n_data: usize, n_cols: usize| {
            let e = check_structure(indptr, indices, n_data, n_cols).unwrap_err();
            (e.row, e.problem)
        };
        let (row, msg) = err(&[0, 2, 1, 3], &[0, 1, 0], 3, 2);
        assert_eq!(row, 1);
        assert!(msg.contains("decreases from 2 to 1"), "{msg}");
        assert!(err(&[], &[], 0, 2).1.contains("empty"));
        assert!(err(&[-1, 0], &[], 0, 2).1.contains("starts at -1"));
        let (_, msg) = err(&[0, 2, 4], &[0, 1, 0], 3, 2);
        assert!(msg.contains("spans 4 stored values but there are 3 column indices and 3 values"), "{msg}");
        assert!(err(&[0, 1], &[0], 2, 2).1.contains("and 2 values"));
        // The first row holding an index outside 0..n_cols, whichever end it is out at.
        assert_eq!(err(&[0, 1, 3, 4], &[0, 1, 5, 1], 4, 5), (1, "column index 5 is outside the 5 genes".to_string()));
        assert_eq!(err(&[10, 11, 12], &[1, -2], 2, 5).0, 1);
        let big = [0i64, 1, 2];
        assert_eq!(check_structure(&big, &[0i64, i64::MAX], 2, 3).unwrap_err().row, 1);
    }

    #[test]
    fn scan_sums_duplicate_ids_and_flags_bad_values() {
        let ids = [3, -1, 3, 0];
        let map = ColumnMap::new(&ids);
        assert!(map.has_duplicates);
        assert_eq!(map.id_bound, 4);
        let mut s = RowScan::new(&map);
        let mut nonint = 0;
        let sum = s.scan(0, &[0i32, 1, 2, 3], &[1.5f64, 4.0, 2.0, 0.0], &map, &mut nonint).unwrap();
        assert_eq!(sum, 7.5);
        assert_eq!(nonint, 1);
        assert_eq!(s.entries.len(), 1);
        assert_eq!((s.entries[0].id, s.entries[0].x, s.entries[0].col), (3, 3.5, 0));
        let err = s.scan(7, &[0i32, 2], &[1.0f32, f32::NAN], &map, &mut nonint).unwrap_err();
        assert!(matches!(err, CoreError::BadValue { row: 7, col: 2, .. }));
        let err = s.scan(2, &[3i64], &[-4i32], &map, &mut nonint).unwrap_err();
        assert_eq!(err.to_string(), "row 2 column 3 has a negative or NaN value (-4)");
        let err = s.scan(2, &[4i64], &[1i32], &map, &mut nonint).unwrap_err();
        assert!(err.to_string().contains("column index 4"));
    }

    #[test]
    fn repeated_column_indices_are_summed() {
        let ids = [0, 1, 2];
        let map = ColumnMap::new(&ids);
        assert!(!map.has_duplicates);
        let mut s = RowScan::new(&map);
        let mut nonint = 0;
        let sum = s.scan(0, &[2i32, 0, 2], &[1.5f64, 1.0, 2.0], &map, &mut nonint).unwrap();
        assert_eq!(sum, 4.5);
        assert_eq!(nonint, 1); // counted once, not again by the summing pass
        let got: Vec<(u32, f64)> = s.entries.iter().map(|e| (e.id, e.x)).collect();
        assert_eq!(got, vec![(2, 3.5), (0, 1.0)]);
    }
}

#[cfg(test)]
mod integral_tests {
    #[test]
    fn integral_check() {
        for (x, want) in [(0.0, true), (3.0, true), (2.5, false), (1e-300, false), (1e15 + 0.5, false), (1e17, true), (4503599627370495.5, false)] {
            assert_eq!(super::is_integral(x), want, "{x}");
        }
    }
}
