//! The PyO3 bindings of the Rust core (the `python` feature): they only convert arguments and
//! results; every algorithm lives in its own module with its own unit tests.

use crate::csr::{check_structure, CoreError, Csr};
use crate::medians::MedianSketch;
use crate::rank::{self, RankParams, Tokenized};
use crate::shard::{IoFailure, MetaColumn, MetaKind, ShardError, ShardWriter, TokenSlice, TokenType};
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::{PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn value_error(e: CoreError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn dtype_name(obj: &Bound<'_, PyAny>) -> String {
    obj.getattr("dtype").map_or_else(|_| obj.get_type().to_string(), |d| d.to_string())
}

/// Borrows a 1-D contiguous numpy array without copying.
fn slice<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, name: &str) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| PyValueError::new_err(format!("{name} must be a contiguous 1-D array")))
}

enum IntArr<'py> {
    I32(PyReadonlyArray1<'py, i32>),
    I64(PyReadonlyArray1<'py, i64>),
}

fn int_array<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<IntArr<'py>> {
    if let Ok(a) = obj.extract::<PyReadonlyArray1<i32>>() {
        return Ok(IntArr::I32(a));
    }
    if let Ok(a) = obj.extract::<PyReadonlyArray1<i64>>() {
        return Ok(IntArr::I64(a));
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be a 1-D numpy array of int32 or int64, got {}",
        dtype_name(obj)
    )))
}

enum DataArr<'py> {
    F32(PyReadonlyArray1<'py, f32>),
    F64(PyReadonlyArray1<'py, f64>),
    I32(PyReadonlyArray1<'py, i32>),
    I64(PyReadonlyArray1<'py, i64>),
    U16(PyReadonlyArray1<'py, u16>),
    U32(PyReadonlyArray1<'py, u32>),
}

fn data_array<'py>(obj: &Bound<'py, PyAny>) -> PyResult<DataArr<'py>> {
    macro_rules! try_dtype {
        ($($v:ident: $t:ty),*) => {$(
            if let Ok(a) = obj.extract::<PyReadonlyArray1<$t>>() {
                return Ok(DataArr::$v(a));
            }
        )*};
    }
    try_dtype!(F32: f32, F64: f64, I32: i32, I64: i64, U16: u16, U32: u32);
    Err(PyTypeError::new_err(format!(
        "data must be a 1-D numpy array of float32, float64, int32, int64, uint16 or uint32, got {}",
        dtype_name(obj)
    )))
}

/// Column → id maps are small (one entry per column), so int64 input is narrowed here.
fn id_map(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<i32>> {
    match int_array(obj, name)? {
        IntArr::I32(a) => Ok(slice(&a, name)?.to_vec()),
        IntArr::I64(a) => slice(&a, name)?
            .iter()
            .map(|&t| {
                i32::try_from(t).map_err(|_| PyValueError::new_err(format!("{name} value {t} does not fit in int32")))
            })
            .collect(),
    }
}

/// One chunk's CSR arguments as Python hands them over (indptr, indices, data in any accepted
/// dtype, optional per-row totals), converted once and borrowed without copying.
struct CsrArgs<'py> {
    indptr: IntArr<'py>,
    indices: IntArr<'py>,
    data: DataArr<'py>,
    n_counts: Option<PyReadonlyArray1<'py, f64>>,
}

impl<'py> CsrArgs<'py> {
    fn new(
        indptr: &Bound<'py, PyAny>,
        indices: &Bound<'py, PyAny>,
        data: &Bound<'py, PyAny>,
        n_counts: Option<PyReadonlyArray1<'py, f64>>,
    ) -> PyResult<Self> {
        Ok(CsrArgs {
            indptr: int_array(indptr, "indptr")?,
            indices: int_array(indices, "indices")?,
            data: data_array(data)?,
            n_counts,
        })
    }

    fn n_counts(&self) -> PyResult<Option<&[f64]>> {
        self.n_counts.as_ref().map(|a| slice(a, "n_counts")).transpose()
    }
}

/// Calls `$body` with `$csr` bound to a `Csr` over the borrowed arrays of a `CsrArgs`, for every
/// combination of index and data dtypes.
macro_rules! with_csr {
    ($args:expr, $n_cols:expr, |$csr:ident| $body:expr) => {{
        macro_rules! by_data {
            ($p:expr, $i:expr) => {
                match &$args.data {
                    DataArr::F32(d) => { let $csr = Csr { indptr: $p, indices: $i, data: slice(d, "data")?, n_cols: $n_cols }; $body }
                    DataArr::F64(d) => { let $csr = Csr { indptr: $p, indices: $i, data: slice(d, "data")?, n_cols: $n_cols }; $body }
                    DataArr::I32(d) => { let $csr = Csr { indptr: $p, indices: $i, data: slice(d, "data")?, n_cols: $n_cols }; $body }
                    DataArr::I64(d) => { let $csr = Csr { indptr: $p, indices: $i, data: slice(d, "data")?, n_cols: $n_cols }; $body }
                    DataArr::U16(d) => { let $csr = Csr { indptr: $p, indices: $i, data: slice(d, "data")?, n_cols: $n_cols }; $body }
                    DataArr::U32(d) => { let $csr = Csr { indptr: $p, indices: $i, data: slice(d, "data")?, n_cols: $n_cols }; $body }
                }
            };
        }
        match (&$args.indptr, &$args.indices) {
            (IntArr::I32(p), IntArr::I32(i)) => by_data!(slice(p, "indptr")?, slice(i, "indices")?),
            (IntArr::I32(p), IntArr::I64(i)) => by_data!(slice(p, "indptr")?, slice(i, "indices")?),
            (IntArr::I64(p), IntArr::I32(i)) => by_data!(slice(p, "indptr")?, slice(i, "indices")?),
            (IntArr::I64(p), IntArr::I64(i)) => by_data!(slice(p, "indptr")?, slice(i, "indices")?),
        }
    }};
}

fn optional_token(t: i64, name: &str) -> PyResult<Option<u32>> {
    if t < 0 {
        Ok(None)
    } else {
        u32::try_from(t).map(Some).map_err(|_| PyValueError::new_err(format!("{name} {t} is too large")))
    }
}

type TokenizeResult<'py> = (Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<i64>>, u64);

#[pyfunction]
#[pyo3(signature = (indptr, indices, data, n_counts, col_token, col_median, max_genes, prefix_token=-1, suffix_token=-1))]
#[allow(clippy::too_many_arguments)]
fn tokenize_csr<'py>(
    py: Python<'py>,
    indptr: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    data: &Bound<'py, PyAny>,
    n_counts: Option<PyReadonlyArray1<'py, f64>>,
    col_token: &Bound<'py, PyAny>,
    col_median: PyReadonlyArray1<'py, f64>,
    max_genes: usize,
    prefix_token: i64,
    suffix_token: i64,
) -> PyResult<TokenizeResult<'py>> {
    let csr_args = CsrArgs::new(indptr, indices, data, n_counts)?;
    let col_token = id_map(col_token, "col_token")?;
    let col_median = slice(&col_median, "col_median")?;
    let n_counts = csr_args.n_counts()?;
    let params = RankParams {
        col_token: &col_token,
        col_median,
        max_genes,
        prefix_token: optional_token(prefix_token, "prefix_token")?,
        suffix_token: optional_token(suffix_token, "suffix_token")?,
    };
    let n_cols = col_token.len();
    let out: Result<Tokenized, CoreError> =
        with_csr!(csr_args, n_cols, |csr| py.detach(|| rank::tokenize(&csr, n_counts, &params)));
    let out = out.map_err(value_error)?;
    Ok((PyArray1::from_vec(py, out.tokens), PyArray1::from_vec(py, out.offsets), out.n_nonint))
}

/// `None` when a chunk read from a file is well formed, else `(row, problem)` (see
/// `csr::check_structure`).
#[pyfunction]
fn check_csr(
    py: Python<'_>,
    indptr: &Bound<'_, PyAny>,
    indices: &Bound<'_, PyAny>,
    n_data: usize,
    n_cols: usize,
) -> PyResult<Option<(usize, String)>> {
    let (indptr, indices) = (int_array(indptr, "indptr")?, int_array(indices, "indices")?);
    let out = match (&indptr, &indices) {
        (IntArr::I32(p), IntArr::I32(i)) => { let (p, i) = (slice(p, "indptr")?, slice(i, "indices")?); py.detach(|| check_structure(p, i, n_data, n_cols)) }
        (IntArr::I32(p), IntArr::I64(i)) => { let (p, i) = (slice(p, "indptr")?, slice(i, "indices")?); py.detach(|| check_structure(p, i, n_data, n_cols)) }
        (IntArr::I64(p), IntArr::I32(i)) => { let (p, i) = (slice(p, "indptr")?, slice(i, "indices")?); py.detach(|| check_structure(p, i, n_data, n_cols)) }
        (IntArr::I64(p), IntArr::I64(i)) => { let (p, i) = (slice(p, "indptr")?, slice(i, "indices")?); py.detach(|| check_structure(p, i, n_data, n_cols)) }
    };
    Ok(out.err().map(|e| (e.row, e.problem)))
}

/// Mergeable per-gene sketch of nonzero `x / n_counts * 10000` (see `medians.rs`).
#[pyclass(name = "MedianSketch", module = "cellrank_fm._core")]
struct PyMedianSketch {
    inner: MedianSketch,
}

#[pymethods]
impl PyMedianSketch {
    #[new]
    #[pyo3(signature = (n_genes, relative_accuracy=0.001))]
    fn new(n_genes: usize, relative_accuracy: f64) -> PyResult<Self> {
        Ok(PyMedianSketch { inner: MedianSketch::new(n_genes, relative_accuracy).map_err(value_error)? })
    }

    #[getter]
    fn n_genes(&self) -> usize {
        self.inner.n_genes()
    }

    #[getter]
    fn relative_accuracy(&self) -> f64 {
        self.inner.relative_accuracy()
    }

    #[pyo3(signature = (indptr, indices, data, n_counts, col_gene))]
    fn update<'py>(
        &mut self,
        py: Python<'py>,
        indptr: &Bound<'py, PyAny>,
        indices: &Bound<'py, PyAny>,
        data: &Bound<'py, PyAny>,
        n_counts: Option<PyReadonlyArray1<'py, f64>>,
        col_gene: &Bound<'py, PyAny>,
    ) -> PyResult<()> {
        let csr_args = CsrArgs::new(indptr, indices, data, n_counts)?;
        let col_gene = id_map(col_gene, "col_gene")?;
        let n_counts = csr_args.n_counts()?;
        let n_cols = col_gene.len();
        let sketch = &mut self.inner;
        let out: Result<(), CoreError> =
            with_csr!(csr_args, n_cols, |csr| py.detach(|| sketch.update(&csr, n_counts, &col_gene)));
        out.map_err(value_error)
    }

    fn merge(&mut self, other: PyRef<'_, PyMedianSketch>) -> PyResult<()> {
        self.inner.merge(&other.inner).map_err(value_error)
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }

    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        Ok(PyMedianSketch { inner: MedianSketch::from_bytes(data).map_err(value_error)? })
    }

    fn medians<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_vec(py, self.inner.medians())
    }

    fn nonzero_counts<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_vec(py, self.inner.nonzero_counts())
    }

    fn __repr__(&self) -> String {
        format!("MedianSketch(n_genes={}, relative_accuracy={})", self.inner.n_genes(), self.inner.relative_accuracy())
    }
}

fn shard_error(e: ShardError) -> PyErr {
    match e {
        ShardError::Invalid(m) => PyValueError::new_err(m),
        // OSError(errno, message): Python sets .errno and picks the subclass.
        ShardError::Io(IoFailure { message, errno: Some(n) }) => PyOSError::new_err((n, message)),
        ShardError::Io(IoFailure { message, errno: None }) => PyOSError::new_err(message),
    }
}

/// Lists pass through; numpy arrays and pandas objects are turned into lists first.
fn as_list<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    if obj.hasattr("tolist")? {
        obj.call_method0("tolist")
    } else {
        Ok(obj.clone())
    }
}

fn meta_column(obj: &Bound<'_, PyAny>, kind: MetaKind, name: &str) -> PyResult<MetaColumn> {
    let wrong = |what: &str| PyTypeError::new_err(format!("metadata column {name:?} must hold {what}"));
    macro_rules! numeric {
        ($t:ty, $variant:ident, $what:expr) => {
            if let Ok(a) = obj.extract::<PyReadonlyArray1<$t>>() {
                MetaColumn::$variant(a.as_array().iter().copied().collect())
            } else {
                MetaColumn::$variant(as_list(obj)?.extract::<Vec<$t>>().map_err(|_| wrong($what))?)
            }
        };
    }
    Ok(match kind {
        MetaKind::Str => MetaColumn::Str(
            as_list(obj)?.extract::<Vec<Option<String>>>().map_err(|_| wrong("strings (or None)"))?,
        ),
        MetaKind::I64 => numeric!(i64, I64, "integers"),
        MetaKind::F64 => numeric!(f64, F64, "floats"),
        MetaKind::Bool => numeric!(bool, Bool, "booleans"),
    })
}

/// Parquet token shard writer with a background thread (see `shard.rs`).
#[pyclass(name = "ShardWriter", module = "cellrank_fm._core")]
struct PyShardWriter {
    inner: ShardWriter,
    meta_schema: Vec<(String, MetaKind)>,
}

#[pymethods]
impl PyShardWriter {
    #[new]
    #[pyo3(signature = (out_dir, token_type, meta_schema, zstd_level=3))]
    fn new(out_dir: PathBuf, token_type: &str, meta_schema: Vec<(String, String)>, zstd_level: i32) -> PyResult<Self> {
        let token_type = match token_type {
            "uint16" => TokenType::U16,
            "uint32" => TokenType::U32,
            other => return Err(PyValueError::new_err(format!("token_type must be \"uint16\" or \"uint32\", got {other:?}"))),
        };
        let meta_schema = meta_schema
            .into_iter()
            .map(|(n, k)| MetaKind::parse(&k).map(|k| (n, k)).map_err(PyValueError::new_err))
            .collect::<PyResult<Vec<_>>>()?;
        let inner = ShardWriter::new(&out_dir, token_type, meta_schema.clone(), zstd_level).map_err(shard_error)?;
        Ok(PyShardWriter { inner, meta_schema })
    }

    fn begin_part(&mut self, py: Python<'_>, index: u32) -> PyResult<()> {
        let inner = &mut self.inner;
        py.detach(|| inner.begin_part(index)).map_err(shard_error)
    }

    #[pyo3(signature = (tokens, offsets, cell_ids, source, meta=None))]
    fn write<'py>(
        &mut self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        offsets: PyReadonlyArray1<'py, i64>,
        cell_ids: &Bound<'py, PyAny>,
        source: &str,
        meta: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<()> {
        let cell_ids: Vec<String> = as_list(cell_ids)?
            .extract()
            .map_err(|_| PyTypeError::new_err("cell_ids must be a list of strings"))?;
        let mut columns = BTreeMap::new();
        if let Some(meta) = meta {
            for (k, v) in meta.iter() {
                let name: String = k.extract()?;
                let kind = self
                    .meta_schema
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, kind)| *kind)
                    .ok_or_else(|| PyValueError::new_err(format!("metadata column {name:?} is not in the shard's schema")))?;
                columns.insert(name.clone(), meta_column(&v, kind, &name)?);
            }
        }
        let offsets = slice(&offsets, "offsets")?;
        let inner = &mut self.inner;
        if let Ok(t) = tokens.extract::<PyReadonlyArray1<u32>>() {
            let t = slice(&t, "tokens")?;
            py.detach(|| inner.write(TokenSlice::U32(t), offsets, cell_ids, source, columns))
        } else if let Ok(t) = tokens.extract::<PyReadonlyArray1<u16>>() {
            let t = slice(&t, "tokens")?;
            py.detach(|| inner.write(TokenSlice::U16(t), offsets, cell_ids, source, columns))
        } else {
            return Err(PyTypeError::new_err(format!(
                "tokens must be a 1-D numpy array of uint32 or uint16, got {}",
                dtype_name(tokens)
            )));
        }
        .map_err(shard_error)
    }

    fn end_part(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = &mut self.inner;
        py.detach(|| inner.end_part()).map_err(shard_error)
    }

    fn finish(&mut self, py: Python<'_>) -> PyResult<BTreeMap<u32, u64>> {
        let inner = &mut self.inner;
        py.detach(|| inner.finish()).map_err(shard_error)
    }

    fn abort(&mut self, py: Python<'_>) {
        let inner = &mut self.inner;
        py.detach(|| inner.abort())
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(tokenize_csr, m)?)?;
    m.add_function(wrap_pyfunction!(check_csr, m)?)?;
    m.add_class::<PyMedianSketch>()?;
    m.add_class::<PyShardWriter>()?;
    Ok(())
}
