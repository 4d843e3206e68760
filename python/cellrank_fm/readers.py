"""Streaming readers: every input format becomes row (cell) chunks of CSR buffers.

Formats: `.h5ad` (CSR or dense `X`, read with h5py one row range at a time), `.loom`, 10x
Cell Ranger `.h5` (v3 `matrix/` group or v2 per-genome groups), Matrix Market directories
(`matrix.mtx[.gz]` + `features.tsv[.gz]`/`genes.tsv[.gz]` + `barcodes.tsv[.gz]`), TileDB-SOMA
experiments on disk (e.g. CELLxGENE Census extracts; needs `tiledbsoma`), and bulk tables
(`.csv`, `.tsv`, `.parquet`, optionally gzipped; samples x genes or genes x samples).

Memory is bounded by the chunk, not the file, except for bulk tables (read whole: they hold
samples, not millions of cells) and Matrix Market files whose entries are not grouped by cell
(read whole, with a warning; Cell Ranger writes them grouped, so they stream).
"""

from __future__ import annotations

import functools
import gzip
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cellrank_fm.errors import UserError

# Dense inputs are read in blocks of at most this many values so memory stays bounded.
DENSE_BLOCK_VALUES = 32_000_000
# What parsing a damaged or truncated file raises (h5py, gzip, pandas, our own indexing); any
# of them while reading an input is the file's fault, and becomes one sentence naming it.
FILE_ERRORS = (OSError, KeyError, ValueError, TypeError, IndexError, EOFError, RuntimeError,
               OverflowError, zlib.error)
# The value dtypes the Rust core takes as they are; others are converted first.
CORE_DTYPES = {np.dtype(t) for t in ("float32", "float64", "int32", "int64", "uint16", "uint32")}


def unreadable(path, err: BaseException, where: str = "") -> UserError:
    what = (str(err).strip().splitlines() or [""])[0][:200] or type(err).__name__
    return UserError(f"{path} could not be read{where} ({what}); the file may be damaged or truncated")


def _file_errors(method):
    """Reader methods that touch the file: its parse errors become one sentence naming it."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except UserError:
            raise
        except FILE_ERRORS as err:
            raise unreadable(self.path, err) from None

    return wrapped


def _stored_range(path, indptr: np.ndarray, nnz: int, start: int, stop: int) -> tuple[int, int]:
    """The stored values rows start..stop span, checked against the file before it is sliced."""
    if len(indptr) != stop - start + 1:
        raise UserError(f"{path}: the row pointer (indptr) ends before row {stop}; the file is damaged or truncated")
    a, b = int(indptr[0]), int(indptr[-1])
    if not 0 <= a <= b <= nnz:
        raise UserError(f"{path}: the row pointer (indptr) of rows {start}-{stop} points outside the {nnz} "
                        "stored values; the file is damaged")
    return a, b


@dataclass
class Chunk:
    """Rows [start, start + n_rows) of one input as CSR buffers plus the requested obs columns."""

    start: int
    indptr: np.ndarray  # [rows + 1]; may start at non-zero: row r is indptr[r]-indptr[0] ..
    indices: np.ndarray  # .. indptr[r+1]-indptr[0] of these (which hold this chunk's rows only)
    data: np.ndarray
    cell_ids: list[str]
    obs: dict[str, np.ndarray | list] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1



class MatrixReader:
    """Common interface. Subclasses set n_rows, n_cols, var_names and implement `_read`."""

    kind = "matrix"
    path: Path
    n_rows: int
    n_cols: int
    var_names: list[str]
    max_rows_per_read: int | None = None

    def var_columns(self) -> list[str]:
        return []

    def var_column(self, name: str) -> list[str]:
        raise UserError(self._missing_var(name))

    def obs_columns(self) -> list[str]:
        return []

    def read(self, start: int, stop: int, obs: Sequence[str] = ()) -> Chunk:
        """Rows [start, stop) as a chunk whose structure has been checked (see `_checked`)."""
        try:
            chunk = self._read(start, stop, obs)
        except UserError:
            raise
        except FILE_ERRORS as err:
            raise unreadable(self.path, err, f" at rows {start}-{stop}") from None
        return self._checked(chunk, start, stop)

    def _checked(self, chunk: Chunk, start: int, stop: int) -> Chunk:
        """Refuse a chunk a damaged file produced before any of its values is used.

        Every consumer indexes by these buffers (shares of counts, totals, the Rust core), so
        the checks sit here, once for every reader: row and name counts, dtypes, and in the
        Rust core the CSR structure (row pointer monotone and consistent with the stored
        values, every column index among the genes).
        """
        from cellrank_fm import _core

        rows = stop - start
        damaged = "; the file is damaged or truncated"
        if chunk.n_rows != rows or len(chunk.cell_ids) != rows:
            raise UserError(f"{self.path}: rows {start}-{stop} came back as {chunk.n_rows} rows with "
                            f"{len(chunk.cell_ids)} cell names{damaged}")
        for name, values in chunk.obs.items():
            if len(values) != rows:
                raise UserError(f"{self.path}: cell column {name!r} holds {len(values)} values for rows "
                                f"{start}-{stop}{damaged}")
        indptr, indices, data = (np.asarray(a) for a in (chunk.indptr, chunk.indices, chunk.data))
        if indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu" or data.dtype.kind not in "iufb":
            raise UserError(f"{self.path}: the matrix has {data.dtype} values with {indices.dtype} indices{damaged}")
        if indptr.dtype != np.int64:
            indptr = indptr.astype(np.int64)
        if indices.dtype not in (np.int32, np.int64):
            indices = indices.astype(np.int64)  # a uint64 past int64 wraps negative: refused below
        if data.dtype not in CORE_DTYPES:
            data = data.astype(np.float64)
        bad = _core.check_csr(np.ascontiguousarray(indptr), np.ascontiguousarray(indices), len(data), self.n_cols)
        if bad is not None:
            row, problem = bad
            raise UserError(f"{self.path} is damaged at cell {start + row}: {problem}")
        chunk.indptr, chunk.indices, chunk.data = indptr, np.ascontiguousarray(indices), np.ascontiguousarray(data)
        return chunk

    def _read(self, start: int, stop: int, obs: Sequence[str]) -> Chunk:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _missing_var(self, name: str) -> str:
        cols = self.var_columns()
        listed = ", ".join(cols[:12]) if cols else "none"
        return f"{self.path} has no gene column {name!r} (gene columns: {listed})"

    def _missing_obs(self, name: str) -> str:
        cols = self.obs_columns()
        listed = ", ".join(cols[:20]) if cols else "none"
        return f"{self.path} has no cell column {name!r} (cell columns: {listed})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _dense_to_csr(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nz = block != 0
    counts = nz.sum(axis=1)
    indptr = np.zeros(block.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    rows, cols = np.nonzero(nz)
    return indptr, cols.astype(np.int32), block[rows, cols]


def _decode(values, where: str) -> list[str]:
    """Names stored as bytes or str, as str; `where` (file: dataset) names non-UTF-8 text."""
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bytes):
            try:
                v = v.decode()
            except UnicodeDecodeError:
                raise UserError(f"{where} holds a name that is not UTF-8 text (entry {i}: {v[:40]!r}); "
                                "re-save the file with UTF-8 names") from None
        out.append(str(v))
    return out


# ---------------------------------------------------------------------------------------------
# HDF5-based formats.


def _open_h5(path: Path):
    import h5py

    try:
        if not h5py.is_hdf5(path):
            raise UserError(f"{path} is not an HDF5 file (a truncated download, or another format)")
        return h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{path} cannot be opened as HDF5 ({str(err).splitlines()[0]}); the file may be truncated") from None


class _H5Frame:
    """Column access to an AnnData dataframe group (obs or var), sliced lazily."""

    def __init__(self, group, path: Path, what: str):
        self.group = group
        self.path = path
        self.what = what
        self._categories: dict[str, np.ndarray] = {}
        if group is None:
            self.index_name = None
            self.columns: list[str] = []
            return
        import h5py

        if not isinstance(group, h5py.Group):
            raise UserError(f"{path} uses an AnnData layout older than 0.7; rewrite it with a current anndata (read_h5ad then write_h5ad)")
        self.index_name = group.attrs.get("_index", "_index")
        if isinstance(self.index_name, bytes):
            self.index_name = self.index_name.decode()
        order = group.attrs.get("column-order", None)
        names = [str(c) for c in order] if order is not None else [k for k in group.keys()]
        self.columns = [c for c in names if c != self.index_name and c != "__categories"]

    def index(self, start: int = 0, stop: int | None = None) -> list[str]:
        if self.group is None or self.index_name not in self.group:
            stop = stop if stop is not None else 0
            return [str(i) for i in range(start, stop)]
        return self.column(self.index_name, start, stop)

    def column(self, name: str, start: int = 0, stop: int | None = None):
        import h5py

        item = self.group[name]
        sl = slice(start, stop)
        if isinstance(item, h5py.Group):
            enc = item.attrs.get("encoding-type", "")
            if isinstance(enc, bytes):
                enc = enc.decode()
            if enc == "categorical" or "codes" in item:
                if name not in self._categories:
                    cats = item["categories"]
                    self._categories[name] = np.array(
                        _decode(cats[:], f"{self.path}: {cats.name}") if cats.dtype.kind in "OS" else cats[:], dtype=object
                    )
                cats = self._categories[name]
                codes = item["codes"][sl]
                out = np.empty(len(codes), dtype=object)
                ok = codes >= 0
                out[ok] = cats[codes[ok]]
                out[~ok] = None
                return list(out) if cats.dtype == object else out
            if "values" in item:  # nullable integer / boolean / string array
                values = item["values"][sl]
                if values.dtype.kind in "OS":
                    values = np.array(_decode(values, f"{self.path}: {item.name}"), dtype=object)
                if "mask" in item:
                    mask = item["mask"][sl]
                    values = values.astype(object)
                    values[mask] = None
                return values
            raise UserError(f"{self.path}: {self.what} column {name!r} has an unsupported encoding {enc!r}")
        values = item[sl]
        if values.dtype.kind in "OS":
            return _decode(values, f"{self.path}: {item.name}")
        return values


class _ContiguousReader:
    """Slices of an uncompressed, contiguous HDF5 dataset read with plain `pread` calls.

    anndata writes uncompressed X this way; reading the bytes directly skips h5py's per-call
    overhead and releases the GIL, so the next chunk loads while the Rust core ranks this one.
    """

    def __init__(self, ds, fd: int):
        self.dtype = ds.dtype
        self.offset = int(ds.id.get_offset())
        self.fd = fd

    @staticmethod
    def usable(ds) -> bool:
        try:
            return (ds.chunks is None and ds.compression is None and ds.dtype.isnative
                    and ds.id.get_offset() is not None and not ds.external)
        except (TypeError, ValueError):
            return False

    def __getitem__(self, sl: slice) -> np.ndarray:
        import os

        out = np.empty(sl.stop - sl.start, dtype=self.dtype)
        at, want = self.offset + sl.start * self.dtype.itemsize, out.nbytes
        got = os.preadv(self.fd, [memoryview(out).cast("B")], at)
        if got != want:
            raise OSError(f"short read ({got} of {want} bytes)")
        if hasattr(os, "posix_fadvise"):
            # Each range is read once: release it from the page cache, so a corpus larger than
            # memory does not make the kernel reclaim cache page by page (measured: a third
            # more CPU time on a 12 GB corpus once the cache was full).
            try:
                os.posix_fadvise(self.fd, at, want, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # advice only; some filesystems refuse it
        return out


class H5adReader(MatrixReader):
    kind = "h5ad"

    def __init__(self, path: Path, layer: str | None = None):
        import h5py

        self.path = path
        self.file = _open_h5(path)
        f = self.file
        var_group = "var"
        if layer in (None, "X"):
            x = f.get("X")
            where = "X"
        elif layer == "raw":
            x = f.get("raw/X")
            var_group = "raw/var"
            where = "raw/X"
        else:
            x = f.get(f"layers/{layer}")
            where = f"layers/{layer}"
            if x is None:
                layers = list(f["layers"].keys()) if "layers" in f else []
                raise UserError(f"{path} has no layer {layer!r} (layers: {', '.join(layers) or 'none'}, plus X and raw)")
        if x is None:
            raise UserError(f"{path} has no {where} matrix; it is not a complete AnnData file")
        self.obs = _H5Frame(f.get("obs"), path, "cell")
        self.var = _H5Frame(f.get(var_group), path, "gene")
        if isinstance(x, h5py.Group):
            enc = x.attrs.get("encoding-type", x.attrs.get("h5sparse_format", ""))
            if isinstance(enc, bytes):
                enc = enc.decode()
            shape = tuple(int(s) for s in x.attrs.get("shape", x.attrs.get("h5sparse_shape", (0, 0))))
            if enc in ("csc_matrix", "csc"):
                raise UserError(
                    f"{path} stores {where} by column (CSC), which cannot be streamed by cell; convert it once: "
                    f"python -c \"import anndata as ad; a = ad.read_h5ad('{path}'); a.X = a.X.tocsr(); a.write_h5ad('{path.stem}.csr.h5ad')\""
                )
            if enc not in ("csr_matrix", "csr"):
                raise UserError(f"{path}: {where} has an unsupported encoding {enc!r}")
            self.dense = None
            self.indptr_ds, self.indices_ds, self.data_ds = x["indptr"], x["indices"], x["data"]
            self.nnz = min(len(self.indices_ds), len(self.data_ds))
            if len(shape) != 2 or min(shape) < 0 or len(self.indptr_ds) != shape[0] + 1:
                raise UserError(f"{path}: {where}/indptr has {len(self.indptr_ds)} entries for a matrix of shape "
                                f"{shape}; the file is damaged")
            if _ContiguousReader.usable(self.indices_ds) and _ContiguousReader.usable(self.data_ds):
                import os

                self._fd = os.open(path, os.O_RDONLY)
                self.indices_ds = _ContiguousReader(self.indices_ds, self._fd)
                self.data_ds = _ContiguousReader(self.data_ds, self._fd)
            self.n_rows, self.n_cols = shape
        else:
            if x.ndim != 2:
                raise UserError(f"{path}: {where} is not a 2-D matrix")
            self.dense = x
            self.n_rows, self.n_cols = (int(s) for s in x.shape)
            self.max_rows_per_read = max(1, DENSE_BLOCK_VALUES // max(1, self.n_cols))
        self.var_names = self.var.index(0, self.n_cols)
        if len(self.var_names) != self.n_cols:
            raise UserError(f"{path}: var has {len(self.var_names)} genes but {where} has {self.n_cols} columns")

    def var_columns(self) -> list[str]:
        return list(self.var.columns)

    @_file_errors
    def var_column(self, name: str) -> list[str]:
        if name not in self.var.columns and (self.var.group is None or name not in self.var.group):
            raise UserError(self._missing_var(name))
        return ["" if v is None else str(v) for v in self.var.column(name)]

    def obs_columns(self) -> list[str]:
        return list(self.obs.columns)

    @_file_errors
    def obs_column(self, name: str, start: int, stop: int):
        return self.obs.column(name, start, stop)

    _fd: int | None = None

    def _read(self, start, stop, obs):
        if self.dense is not None:
            indptr, indices, data = _dense_to_csr(np.asarray(self.dense[start:stop]))
        else:
            indptr = self.indptr_ds[start : stop + 1].astype(np.int64)
            a, b = _stored_range(self.path, indptr, self.nnz, start, stop)
            indices = self.indices_ds[a:b]
            data = self.data_ds[a:b]
        cells = self.obs.index(start, stop)
        meta = {}
        for name in obs:
            if name not in self.obs.columns:
                raise UserError(self._missing_obs(name))
            meta[name] = self.obs.column(name, start, stop)
        return Chunk(start, indptr, indices, data, cells, meta)

    def close(self):
        import os

        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.file.close()


class LoomReader(MatrixReader):
    """Loom: `/matrix` is genes x cells (dense, chunked); genes in row_attrs, cells in col_attrs."""

    kind = "loom"

    def __init__(self, path: Path, layer: str | None = None):
        self.path = path
        self.file = _open_h5(path)
        f = self.file
        if layer in (None, "X", "matrix"):
            mat = f.get("matrix")
        else:
            mat = f.get(f"layers/{layer}")
            if mat is None:
                raise UserError(f"{path} has no layer {layer!r}")
        if mat is None or "row_attrs" not in f or "col_attrs" not in f:
            raise UserError(f"{path} is not a loom file (it needs /matrix, /row_attrs and /col_attrs)")
        self.mat = mat
        self.n_cols, self.n_rows = (int(s) for s in mat.shape)  # genes x cells on disk
        self.rows = f["row_attrs"]
        self.cols = f["col_attrs"]
        gene_key = next((k for k in ("Gene", "gene_ids", "var_names", "Accession", "ensembl_id") if k in self.rows), None)
        self.var_names = _decode(self.rows[gene_key][:], f"{path}: row_attrs/{gene_key}") if gene_key else [str(i) for i in range(self.n_cols)]
        self.cell_key = next((k for k in ("CellID", "obs_names", "cell_id") if k in self.cols), None)
        self.max_rows_per_read = max(1, DENSE_BLOCK_VALUES // max(1, self.n_cols))

    def var_columns(self) -> list[str]:
        return list(self.rows.keys())

    @_file_errors
    def var_column(self, name: str) -> list[str]:
        if name not in self.rows:
            raise UserError(self._missing_var(name))
        return _decode(self.rows[name][:], f"{self.path}: row_attrs/{name}")

    def obs_columns(self) -> list[str]:
        return list(self.cols.keys())

    @_file_errors
    def obs_column(self, name: str, start: int, stop: int):
        values = self.cols[name][start:stop]
        return _decode(values, f"{self.path}: col_attrs/{name}") if values.dtype.kind in "OS" else values

    def _read(self, start, stop, obs):
        block = np.ascontiguousarray(np.asarray(self.mat[:, start:stop]).T)
        indptr, indices, data = _dense_to_csr(block)
        cells = self.obs_column(self.cell_key, start, stop) if self.cell_key else [str(i) for i in range(start, stop)]
        meta = {}
        for name in obs:
            if name not in self.cols:
                raise UserError(self._missing_obs(name))
            meta[name] = self.obs_column(name, start, stop)
        return Chunk(start, indptr, indices, data, cells, meta)

    def close(self):
        self.file.close()


class TenxH5Reader(MatrixReader):
    """Cell Ranger `.h5`: a genes x cells CSC matrix, i.e. CSR with one row per barcode.

    var_names are the feature IDs (Ensembl); `gene_symbols` and `feature_types` are columns.
    Features that are not gene expression (antibody capture, CRISPR guides) are excluded
    from the per-cell totals.
    """

    kind = "10x-h5"

    def __init__(self, path: Path):
        self.path = path
        self.file = _open_h5(path)
        f = self.file
        if "matrix" in f:
            g = f["matrix"]
            feats = g.get("features")
            if feats is None:
                raise UserError(f"{path} is not a Cell Ranger h5 file (matrix/features is missing)")
            self.columns = {"gene_ids": _decode(feats["id"][:], f"{path}: matrix/features/id"),
                            "gene_symbols": _decode(feats["name"][:], f"{path}: matrix/features/name")}
            if "feature_type" in feats:
                self.columns["feature_types"] = _decode(feats["feature_type"][:], f"{path}: matrix/features/feature_type")
        else:
            groups = [k for k in f.keys() if "barcodes" in f[k]]
            if not groups:
                raise UserError(f"{path} is neither AnnData nor a Cell Ranger h5 file; use .h5ad for AnnData")
            g = f[groups[0]]
            self.columns = {"gene_ids": _decode(g["genes"][:], f"{path}: {g.name}/genes"),
                            "gene_symbols": _decode(g["gene_names"][:], f"{path}: {g.name}/gene_names")}
        self.g = g
        n_genes, n_cells = (int(s) for s in g["shape"][:])
        self.n_rows, self.n_cols = n_cells, n_genes
        if len(g["indptr"]) != n_cells + 1:
            raise UserError(f"{path}: matrix/indptr does not have one entry per barcode; the file is not a Cell Ranger matrix")
        self.nnz = min(len(g["indices"]), len(g["data"]))
        self.var_names = self.columns["gene_ids"]
        types = self.columns.get("feature_types")
        self.non_gex = None
        if types is not None:
            mask = np.array([t != "Gene Expression" for t in types])
            if mask.any():
                self.non_gex = mask

    def var_columns(self) -> list[str]:
        return list(self.columns)

    def var_column(self, name: str) -> list[str]:
        if name not in self.columns:
            raise UserError(self._missing_var(name))
        return self.columns[name]

    def _read(self, start, stop, obs):
        if obs:
            raise UserError(self._missing_obs(obs[0]))
        indptr = self.g["indptr"][start : stop + 1].astype(np.int64)
        a, b = _stored_range(self.path, indptr, self.nnz, start, stop)
        barcodes = _decode(self.g["barcodes"][start:stop], f"{self.path}: {self.g.name}/barcodes")
        return Chunk(start, indptr, self.g["indices"][a:b], self.g["data"][a:b], barcodes)

    def close(self):
        self.file.close()


# ---------------------------------------------------------------------------------------------
# Matrix Market directories.


def _find(directory: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for suffix in ("", ".gz"):
            p = directory / f"{stem}{suffix}"
            if p.is_file():
                return p
    return None


def _read_tsv(path: Path) -> list[list[str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            return [line.rstrip("\n").split("\t") for line in fh if line.strip()]
    except UnicodeDecodeError as err:
        raise UserError(f"{path} holds text that is not UTF-8 (byte {err.start}: "
                        f"{err.object[err.start:err.start + 8]!r}); re-save it as UTF-8") from None


class MtxReader(MatrixReader):
    """`matrix.mtx[.gz]` (genes x cells) with `features.tsv`/`genes.tsv` and `barcodes.tsv`.

    Entries grouped by cell (what Cell Ranger writes) are streamed in blocks; otherwise the
    whole matrix is loaded once (memory about 16 bytes per nonzero) with a warning. Rows are
    read strictly in order.
    """

    kind = "mtx"
    BLOCK_ENTRIES = 4_000_000

    def __init__(self, directory: Path):
        self.path = directory
        self.mtx = _find(directory, ["matrix.mtx"])
        feats = _find(directory, ["features.tsv", "genes.tsv"])
        barcodes = _find(directory, ["barcodes.tsv"])
        if self.mtx is None or feats is None or barcodes is None:
            raise UserError(f"{directory} needs matrix.mtx, features.tsv (or genes.tsv) and barcodes.tsv (optionally .gz)")
        rows = _read_tsv(feats)
        self.columns = {"gene_ids": [r[0] for r in rows]}
        self.columns["gene_symbols"] = [r[1] if len(r) > 1 else r[0] for r in rows]
        if rows and len(rows[0]) > 2:
            self.columns["feature_types"] = [r[2] for r in rows]
        self.var_names = self.columns["gene_ids"]
        self.barcodes = [r[0] for r in _read_tsv(barcodes)]
        self.fh = (gzip.open if self.mtx.name.endswith(".gz") else open)(self.mtx, "rt")
        header = self.fh.readline()
        if not header.startswith("%%MatrixMarket") or "coordinate" not in header:
            raise UserError(f"{self.mtx} is not a Matrix Market coordinate file")
        self.field = "real" if ("real" in header or "double" in header) else "integer"
        line = self.fh.readline()
        while line.startswith("%"):
            line = self.fh.readline()
        n_genes, n_cells, self.nnz = (int(x) for x in line.split())
        if n_genes != len(self.var_names) or n_cells != len(self.barcodes):
            raise UserError(
                f"{self.mtx} is {n_genes} genes x {n_cells} cells but the directory lists "
                f"{len(self.var_names)} features and {len(self.barcodes)} barcodes"
            )
        self.n_rows, self.n_cols = n_cells, n_genes
        self._cursor = 0  # next cell to hand out
        self._pending: list[np.ndarray] = []  # (cell, gene, value) blocks not yet handed out
        self._whole = None
        self._reader = None

    def var_columns(self) -> list[str]:
        return list(self.columns)

    def var_column(self, name: str) -> list[str]:
        if name not in self.columns:
            raise UserError(self._missing_var(name))
        return self.columns[name]

    def _blocks(self):
        import pandas as pd

        if self._reader is None:
            self._reader = pd.read_csv(
                self.fh, sep=r"\s+", header=None, names=["g", "c", "v"], chunksize=self.BLOCK_ENTRIES,
                dtype={"g": np.int64, "c": np.int64, "v": np.float64 if self.field == "real" else np.int64},
            )
        seen = 0
        for block in self._reader:
            g, c = block["g"].to_numpy(), block["c"].to_numpy()
            # Entries outside the declared size would land on other genes or cells.
            outside = (g < 1) | (g > self.n_cols) | (c < 1) | (c > self.n_rows)
            if outside.any():
                k = int(np.argmax(outside))
                raise UserError(f"{self.mtx}: entry {seen + k + 1} is at gene {g[k]}, cell {c[k]}, outside the "
                                f"{self.n_cols} genes x {self.n_rows} cells its header declares; the file is damaged")
            seen += len(block)
            yield c - 1, g - 1, block["v"].to_numpy()
        if seen != self.nnz:
            raise UserError(f"{self.mtx} holds {seen} entries but its header declares {self.nnz}; the file is "
                            "damaged or truncated")

    def _load_whole(self, cells, genes, values):
        import scipy.sparse as sp

        warnings.warn(f"{self.mtx} is not grouped by cell, so it is read whole into memory", stacklevel=3)
        parts = [(cells, genes, values)] + list(self._stream)
        c = np.concatenate([p[0] for p in parts])
        g = np.concatenate([p[1] for p in parts])
        v = np.concatenate([p[2] for p in parts])
        self._whole = sp.csr_matrix((v, (c, g)), shape=(self.n_rows, self.n_cols))
        self._whole.sum_duplicates()

    def _read(self, start, stop, obs):
        if obs:
            raise UserError(self._missing_obs(obs[0]))
        if self._whole is None:
            if start < self._cursor:
                raise UserError(f"{self.mtx} can only be read forwards")
            cells, genes, values = self._take_until(stop)
        if self._whole is not None:
            m = self._whole[start:stop]
            return Chunk(start, m.indptr.astype(np.int64), m.indices, m.data, self.barcodes[start:stop])
        keep = cells >= start
        cells, genes, values = cells[keep], genes[keep], values[keep]
        order = np.lexsort((genes, cells))
        cells, genes, values = cells[order], genes[order], values[order]
        counts = np.bincount(cells - start, minlength=stop - start)
        indptr = np.zeros(stop - start + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        self._cursor = stop
        return Chunk(start, indptr, genes.astype(np.int32), values, self.barcodes[start:stop])

    def _take_until(self, stop):
        """Entries of cells < stop; keeps the rest pending. Switches to whole-file mode if unsorted."""
        got_c, got_g, got_v = [], [], []
        pending = self._pending
        self._pending = []
        blocks = iter(pending)
        if not hasattr(self, "_stream"):
            self._stream = self._blocks()
        last = getattr(self, "_last_cell", -1)
        while True:
            item, fresh = next(blocks, None), False
            if item is None:
                item, fresh = next(self._stream, None), True
                if item is None:
                    break
            c, g, v = item
            if fresh and len(c) and (c[0] < last or np.any(np.diff(c) < 0)):
                if self._cursor > 0 or got_c:
                    raise UserError(f"{self.mtx} is not grouped by cell beyond its first block; sort it by column (cell) or convert it to .h5ad")
                self._load_whole(c, g, v)
                return None, None, None
            if fresh and len(c):
                last = int(c[-1])
            below = c < stop
            for got, values in ((got_c, c), (got_g, g), (got_v, v)):
                got.append(values[below])
            if not below.all():
                self._pending = [(c[~below], g[~below], v[~below])]
                break
        self._last_cell = last
        if not got_c:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
        return np.concatenate(got_c), np.concatenate(got_g), np.concatenate(got_v)

    def close(self):
        self.fh.close()


# ---------------------------------------------------------------------------------------------
# Bulk tables.


class TableReader(MatrixReader):
    """A samples x genes (or genes x samples) count table, read whole with polars."""

    kind = "table"

    def __init__(self, path: Path, orientation: str = "auto", is_gene: Callable[[str], bool] | None = None):
        import polars as pl
        import scipy.sparse as sp

        self.path = path
        name = path.name.lower()
        try:
            if name.endswith(".parquet"):
                df = pl.read_parquet(path)
            else:
                sep = "\t" if (".tsv" in name or ".txt" in name) else ","
                df = pl.read_csv(path, separator=sep, infer_schema_length=10000)
        except Exception as err:  # noqa: BLE001 - polars raises many error types
            raise UserError(f"{path} is not a readable table ({str(err).splitlines()[0]})") from None
        if df.width < 2 or df.height < 1:
            raise UserError(f"{path} needs a label column and at least one numeric column")
        label_col = df.columns[0]
        if df.schema[label_col].is_numeric():
            raise UserError(f"{path}: the first column must hold sample or gene labels, not numbers")
        value_cols = df.columns[1:]
        bad = [c for c in value_cols if not df.schema[c].is_numeric()]
        if bad:
            raise UserError(f"{path}: column {bad[0]!r} is not numeric; the first column holds labels and the others counts")
        row_labels = [str(v) for v in df.get_column(label_col).to_list()]
        col_labels = list(value_cols)
        matrix = df.select(value_cols).to_numpy().astype(np.float64)
        if orientation == "auto":
            is_gene = is_gene or looks_like_gene_label
            col_score = np.mean([is_gene(c) for c in col_labels[:2000]])
            row_score = np.mean([is_gene(r) for r in row_labels[:2000]])
            orientation = "genes-by-samples" if row_score > col_score else "samples-by-genes"
        if orientation == "genes-by-samples":
            matrix = matrix.T
            row_labels, col_labels = col_labels, row_labels
        elif orientation != "samples-by-genes":
            raise UserError(f"unknown orientation {orientation!r}; use auto, samples-by-genes or genes-by-samples")
        self.orientation = orientation
        if np.isnan(matrix).any():
            r, c = np.argwhere(np.isnan(matrix))[0]
            raise UserError(f"{path}: sample {row_labels[r]!r} has a missing or NaN value for {col_labels[c]!r}")
        self.csr = sp.csr_matrix(matrix)
        self.n_rows, self.n_cols = self.csr.shape
        self.var_names = col_labels
        self.sample_ids = row_labels

    def _read(self, start, stop, obs):
        if obs:
            raise UserError(self._missing_obs(obs[0]))
        m = self.csr[start:stop]
        return Chunk(start, m.indptr.astype(np.int64), m.indices, m.data, self.sample_ids[start:stop])


def looks_like_gene_label(label: str) -> bool:
    from cellrank_fm.genes import looks_like_ensembl

    return looks_like_ensembl(label)


# ---------------------------------------------------------------------------------------------
# In-memory AnnData (predict / explain on an object already loaded).


class AnnDataReader(MatrixReader):
    kind = "anndata"

    def __init__(self, adata, layer: str | None = None):
        self.adata = adata
        self.path = Path("<AnnData>")
        if layer in (None, "X"):
            self.X = adata.X
            var = adata.var
        elif layer == "raw":
            self.X = adata.raw.X
            var = adata.raw.var
        else:
            if layer not in adata.layers:
                raise UserError(f"the AnnData object has no layer {layer!r}")
            self.X = adata.layers[layer]
            var = adata.var
        self.var = var
        self.n_rows, self.n_cols = self.X.shape
        self.var_names = [str(v) for v in var.index]
        self.max_rows_per_read = max(1, DENSE_BLOCK_VALUES // max(1, self.n_cols))

    def var_columns(self):
        return [str(c) for c in self.var.columns]

    def var_column(self, name):
        if name not in self.var.columns:
            raise UserError(self._missing_var(name))
        return ["" if v is None or v != v else str(v) for v in self.var[name].tolist()]

    def obs_columns(self):
        return [str(c) for c in self.adata.obs.columns]

    def _read(self, start, stop, obs):
        import scipy.sparse as sp

        block = self.X[start:stop]
        if sp.issparse(block):
            m = sp.csr_matrix(block)
            indptr, indices, data = m.indptr.astype(np.int64), m.indices, m.data
        else:
            indptr, indices, data = _dense_to_csr(np.asarray(block))
        cells = [str(c) for c in self.adata.obs_names[start:stop]]
        meta = {}
        for name in obs:
            if name not in self.adata.obs.columns:
                raise UserError(self._missing_obs(name))
            meta[name] = self.adata.obs[name].to_numpy()[start:stop]
        return Chunk(start, indptr, indices, data, cells, meta)


class SomaReader(MatrixReader):
    """A TileDB-SOMA experiment directory: one measurement's X layer, cells in row chunks.

    Cells are the experiment's obs rows in `soma_joinid` order, named by `obs_id` (what
    `tiledbsoma.io.from_anndata` writes) or else by their joinid; genes are the measurement's
    var rows, named by `feature_id` (CELLxGENE Census: Ensembl IDs) or `var_id`. The layer is
    `layer=` if given, else `raw` (the Census's raw counts) where present, else the only one.
    """

    kind = "soma"

    def __init__(self, path: Path, layer: str | None = None):
        try:
            import tiledbsoma
        except ImportError:
            raise UserError(f"{path} is a TileDB-SOMA experiment; reading it needs tiledbsoma "
                            "(pip install tiledbsoma)") from None
        self.path = path
        self.errors = (tiledbsoma.SOMAError, *FILE_ERRORS)  # what a damaged experiment raises
        try:
            self.exp = tiledbsoma.Experiment.open(str(path))
        except self.errors as err:
            raise unreadable(path, err) from None
        try:
            names = list(self.exp.ms.keys())
            if "RNA" not in names and len(names) != 1:
                raise UserError(f"{path} has no measurement 'RNA' and several others ({', '.join(names)})")
            ms = self.exp.ms["RNA" if "RNA" in names else names[0]]
            layers = list(ms.X.keys())
            if layer in (None, "X"):
                layer = "raw" if "raw" in layers else layers[0] if len(layers) == 1 else None
                if layer is None:
                    raise UserError(f"{path} has X layers {', '.join(layers)} and none called 'raw'; "
                                    "name the one holding raw counts with --layer")
            elif layer not in layers:
                raise UserError(f"{path} has no X layer {layer!r} (layers: {', '.join(layers)})")
            self.X = ms.X[layer]
            var = ms.var.read().concat().to_pandas().sort_values("soma_joinid")
            self.var_joinids = var.pop("soma_joinid").to_numpy()
            # joinid -> column, by lookup: a chunk holds millions of stored values
            self.var_position = np.full(int(self.var_joinids.max(initial=-1)) + 1, -1, dtype=np.int64)
            self.var_position[self.var_joinids] = np.arange(len(self.var_joinids))
            self.var = var.reset_index(drop=True)
            key = next((c for c in ("feature_id", "var_id") if c in self.var.columns), None)
            self.var_names = [str(v) for v in self.var[key]] if key else [str(j) for j in self.var_joinids]
            self.obs_names = [c for c in self.exp.obs.schema.names if c != "soma_joinid"]
            self.obs_joinids = np.sort(self.exp.obs.read(column_names=["soma_joinid"]).concat()
                                       .column("soma_joinid").to_numpy())
        except BaseException as err:
            self.exp.close()
            if isinstance(err, self.errors) and not isinstance(err, UserError):
                raise unreadable(path, err) from None
            raise
        self.n_rows, self.n_cols = len(self.obs_joinids), len(self.var_joinids)

    def var_columns(self) -> list[str]:
        return [str(c) for c in self.var.columns]

    def var_column(self, name: str) -> list[str]:
        if name not in self.var.columns:
            raise UserError(self._missing_var(name))
        return ["" if v is None or v != v else str(v) for v in self.var[name].tolist()]

    def obs_columns(self) -> list[str]:
        return [c for c in self.obs_names if c != "obs_id"]

    def obs_column(self, name: str, start: int, stop: int):
        try:
            return self._obs(start, stop, [name])[1][name]
        except UserError:
            raise
        except self.errors as err:
            raise unreadable(self.path, err) from None

    def _coords(self, start: int, stop: int):
        ids = self.obs_joinids[start:stop]
        # A run of consecutive joinids is one range read (SOMA slices include both ends).
        return ids, (slice(int(ids[0]), int(ids[-1])) if ids[-1] - ids[0] == len(ids) - 1 else ids)

    def _obs(self, start: int, stop: int, names: Sequence[str]) -> tuple[list[str], dict]:
        for name in names:
            if name not in self.obs_columns():
                raise UserError(self._missing_obs(name))
        ids, coords = self._coords(start, stop)
        columns = ["soma_joinid", *(["obs_id"] if "obs_id" in self.obs_names else []), *names]
        frame = (self.exp.obs.read(coords=(coords,), column_names=list(dict.fromkeys(columns))).concat()
                 .to_pandas().set_index("soma_joinid").loc[ids])
        cells = [str(c) for c in (frame["obs_id"] if "obs_id" in frame else ids)]
        return cells, {n: frame[n].to_numpy() for n in names}

    def _read(self, start, stop, obs):
        try:
            return self._read_rows(start, stop, obs)
        except UserError:
            raise
        except self.errors as err:
            raise unreadable(self.path, err, f" at rows {start}-{stop}") from None

    def _read_rows(self, start, stop, obs):
        if stop <= start:
            return Chunk(start, np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0), [], {})
        ids, coords = self._coords(start, stop)
        table = self.X.read(coords=(coords,)).tables().concat()
        dim0 = table.column("soma_dim_0").to_numpy()
        rows = dim0 - ids[0] if isinstance(coords, slice) else np.searchsorted(ids, dim0)
        cols = self.var_position[table.column("soma_dim_1").to_numpy()]
        data = table.column("soma_data").to_numpy()
        if len(rows) > 1 and (rows[1:] < rows[:-1]).any():  # not row by row (asking for it costs more)
            # A chunk's rows fit 16 bits, where NumPy's stable sort is a radix sort.
            order = np.argsort(rows.astype(np.uint16) if len(ids) <= 65536 else rows, kind="stable")
            rows, cols, data = rows[order], cols[order], data[order]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(ids)))]).astype(np.int64)
        cells, meta = self._obs(start, stop, obs)
        return Chunk(start, indptr, cols, data, cells, meta)

    def close(self):
        self.exp.close()


# ---------------------------------------------------------------------------------------------
# Dispatch.

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz", ".parquet")
SUFFIXES = (".h5ad", ".loom", ".h5") + TABLE_SUFFIXES


def _is_mtx_dir(path: Path) -> bool:
    return path.is_dir() and _find(path, ["matrix.mtx"]) is not None


def _is_soma_dir(path: Path) -> bool:
    """A TileDB-SOMA experiment: a TileDB group holding `obs` and `ms`."""
    return (path / "__tiledb_group.tdb").is_file() and (path / "obs").is_dir() and (path / "ms").is_dir()


def is_directory_input(path: Path) -> bool:
    """A directory that is one input (Matrix Market, SOMA experiment), not a folder of them."""
    return _is_mtx_dir(path) or _is_soma_dir(path)


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files, Matrix Market directories and SOMA experiments to read, in sorted order; other
    directories are expanded."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"input {p} does not exist")
        if p.is_dir() and not is_directory_input(p):
            found = [c for c in p.iterdir()
                     if (c.is_file() and c.name.lower().endswith(SUFFIXES)) or is_directory_input(c)]
            if not found:
                raise UserError(f"directory {p} holds no input file ({', '.join(SUFFIXES[:4])}, tables, matrix.mtx "
                                "or a TileDB-SOMA experiment)")
            out.extend(found)
        else:
            out.append(p)
    return sorted(set(out), key=lambda q: str(q))


def open_input(path: str | Path, layer: str | None = None, orientation: str = "auto",
               is_gene: Callable[[str], bool] | None = None) -> MatrixReader:
    """A reader for one input file, Matrix Market directory or SOMA experiment, its shape checked."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"input {path} does not exist")
    try:
        reader = _open(path, layer, orientation, is_gene)
    except UserError:
        raise
    except FILE_ERRORS as err:
        raise unreadable(path, err) from None
    if len(reader.var_names) != reader.n_cols or reader.n_rows < 0:
        reader.close()
        raise UserError(f"{path} lists {len(reader.var_names)} genes for a matrix of {reader.n_rows} cells x "
                        f"{reader.n_cols} genes; the file is damaged")
    return reader


def _open(path: Path, layer, orientation, is_gene) -> MatrixReader:
    name = path.name.lower()
    if _is_mtx_dir(path):
        return MtxReader(path)
    if _is_soma_dir(path):
        return SomaReader(path, layer)
    if name.endswith((".mtx", ".mtx.gz")):
        return MtxReader(path.parent)
    if name.endswith(".h5ad"):
        return H5adReader(path, layer)
    if name.endswith(".loom"):
        return LoomReader(path, layer)
    if name.endswith(".h5"):
        return TenxH5Reader(path)
    if name.endswith(TABLE_SUFFIXES):
        return TableReader(path, orientation, is_gene)
    raise UserError(
        f"{path} has an unknown format; cellrank reads .h5ad, .loom, 10x .h5, Matrix Market "
        "directories, TileDB-SOMA experiments and .csv/.tsv/.parquet tables"
    )
