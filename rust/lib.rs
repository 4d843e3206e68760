//! cellrank's Rust core. Each algorithm is a plain Rust module with its own unit tests; the
//! `python` feature adds the PyO3 bindings below, which only convert arguments and results.

pub mod csr;
pub mod rank;

#[cfg(feature = "python")]
mod python {
    use crate::csr::{CoreError, Csr};
    use crate::rank::{self, RankParams, Tokenized};
    use numpy::{PyArray1, PyReadonlyArray1};
    use pyo3::exceptions::{PyTypeError, PyValueError};
    use pyo3::prelude::*;

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

    /// Calls `$body` with `$csr` bound to a `Csr` over the borrowed arrays, for every
    /// combination of index and data dtypes.
    macro_rules! with_csr {
        ($indptr:expr, $indices:expr, $data:expr, $n_cols:expr, |$csr:ident| $body:expr) => {{
            macro_rules! by_data {
                ($p:expr, $i:expr) => {
                    match &$data {
                        DataArr::F32(d) => { let $csr = Csr { indptr: $p, indices: $i, data: slice(d, "data")?, n_cols: $n_cols }; $body }
                        DataArr::F64(d) => { let $csr = Csr { indptr: $p, indices: $i, data: slice(d, "data")?, n_cols: $n_cols }; $body }
                        DataArr::I32(d) => { let $csr = Csr { indptr: $p, indices: $i, data: slice(d, "data")?, n_cols: $n_cols }; $body }
                        DataArr::I64(d) => { let $csr = Csr { indptr: $p, indices: $i, data: slice(d, "data")?, n_cols: $n_cols }; $body }
                        DataArr::U16(d) => { let $csr = Csr { indptr: $p, indices: $i, data: slice(d, "data")?, n_cols: $n_cols }; $body }
                        DataArr::U32(d) => { let $csr = Csr { indptr: $p, indices: $i, data: slice(d, "data")?, n_cols: $n_cols }; $body }
                    }
                };
            }
            match (&$indptr, &$indices) {
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
    ) -> PyResult<(Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<i64>>, u64)> {
        let indptr = int_array(indptr, "indptr")?;
        let indices = int_array(indices, "indices")?;
        let data = data_array(data)?;
        let col_token = id_map(col_token, "col_token")?;
        let col_median = slice(&col_median, "col_median")?;
        let n_counts = match &n_counts {
            Some(a) => Some(slice(a, "n_counts")?),
            None => None,
        };
        let params = RankParams {
            col_token: &col_token,
            col_median,
            max_genes,
            prefix_token: optional_token(prefix_token, "prefix_token")?,
            suffix_token: optional_token(suffix_token, "suffix_token")?,
        };
        let n_cols = col_token.len();
        let out: Result<Tokenized, CoreError> =
            with_csr!(indptr, indices, data, n_cols, |csr| py.detach(|| rank::tokenize(&csr, n_counts, &params)));
        let out = out.map_err(value_error)?;
        Ok((PyArray1::from_vec(py, out.tokens), PyArray1::from_vec(py, out.offsets), out.n_nonint))
    }

    #[pymodule]
    fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(tokenize_csr, m)?)?;
        Ok(())
    }
}
