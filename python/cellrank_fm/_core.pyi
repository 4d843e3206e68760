"""cellrank's Rust core: rank-value tokenisation, median sketches and Parquet shard writing.

Every function takes NumPy arrays without copying them, releases the GIL while it computes,
and returns NumPy arrays built directly from Rust buffers.
"""

import os
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int32] | npt.NDArray[np.int64]
CountArray = (
    npt.NDArray[np.float32]
    | npt.NDArray[np.float64]
    | npt.NDArray[np.int32]
    | npt.NDArray[np.int64]
    | npt.NDArray[np.uint16]
    | npt.NDArray[np.uint32]
)

def check_csr(indptr: IntArray, indices: IntArray, n_data: int, n_cols: int) -> tuple[int, str] | None:
    """``None`` when a CSR row chunk is well formed, else ``(row, problem)`` for its first bad row.

    Well formed: ``indptr`` non-empty, starting at or above 0 and never decreasing, spanning
    exactly ``len(indices)`` column indices and ``n_data`` values, every index in
    ``0 .. n_cols``. Releases the GIL.
    """

def tokenize_csr(
    indptr: IntArray,
    indices: IntArray,
    data: CountArray,
    n_counts: npt.NDArray[np.float64] | None,
    col_token: IntArray,
    col_median: npt.NDArray[np.float64],
    max_genes: int,
    prefix_token: int = -1,
    suffix_token: int = -1,
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.int64], int]:
    """Rank-value tokenize one CSR row chunk (Geneformer's encoding), in parallel over rows.

    For row ``r`` and column ``c`` with token ``t = col_token[c] >= 0``:
    ``v = x / n_counts[r] * 10000 / col_median[c]`` (float64). Columns sharing a token are
    summed first. Entries with ``v > 0`` are sorted by descending ``v``, ties by ascending
    token id (values within ~1e-11 relative count as ties), the first ``max_genes`` kept, and
    ``prefix_token`` / ``suffix_token`` added before / after when ``>= 0``. A row with no kept
    gene, or with ``n_counts <= 0``, gets length 0 (no special tokens either).

    Args:
        indptr: ``[rows + 1]`` row pointers; may be a slice of a bigger CSR (row ``r`` spans
            ``indptr[r] - indptr[0] .. indptr[r + 1] - indptr[0]`` of ``indices``/``data``).
        indices: column of each stored value.
        data: the stored counts.
        n_counts: per-row totals; ``None`` = each row's sum over ALL its stored values.
        col_token: token id per column, ``-1`` = not tokenized (still counts toward totals).
        col_median: normalisation median per column (positive and finite where tokenized).
        max_genes: genes kept per row, special tokens excluded.

    Returns:
        ``(tokens, offsets, n_nonint)``: row ``r`` is ``tokens[offsets[r]:offsets[r + 1]]``;
        ``n_nonint`` counts stored values that are not integers.

    Raises:
        ValueError: a negative, NaN or infinite value (``"row R column C has a negative or NaN
            value (V)"``, ``R`` relative to the chunk), or inconsistent array sizes.
        TypeError: an array of an unsupported dtype.
    """

class MedianSketch:
    """Mergeable per-gene sketch of the nonzero values ``x / n_counts * 10000``.

    Values go into logarithmic buckets (DDSketch) with ``γ = (1 + α) / (1 - α)``; a gene's
    median (the mean of the two middle order statistics, as ``numpy.median``) is returned
    within relative error ``α``: ``|returned - exact| <= α * exact``. Sketches of separate
    parts of a corpus merge into exactly the sketch of one pass over all of them. Memory is
    about ``4 * ln(max/min) / ln γ`` bytes per gene, independent of the number of cells.
    """

    def __init__(self, n_genes: int, relative_accuracy: float = 0.001) -> None: ...
    @property
    def n_genes(self) -> int: ...
    @property
    def relative_accuracy(self) -> float: ...
    def update(
        self,
        indptr: IntArray,
        indices: IntArray,
        data: CountArray,
        n_counts: npt.NDArray[np.float64] | None,
        col_gene: IntArray,
    ) -> None:
        """Add a CSR row chunk: per row, each gene's summed count ``x`` (``col_gene[c]``,
        ``-1`` = skip; same-gene columns summed) with ``x > 0`` adds ``x / n_counts * 10000``.
        ``n_counts=None`` uses each row's sum over all stored values; rows with
        ``n_counts <= 0`` add nothing. Raises ValueError naming the chunk row and column of a
        negative or NaN value (the sketch may then hold part of the chunk: discard it)."""
    def merge(self, other: MedianSketch) -> None:
        """Add another sketch of the same number of genes and accuracy."""
    def to_bytes(self) -> bytes:
        """Versioned little-endian serialisation (magic ``CRMS``, format version 1)."""
    @staticmethod
    def from_bytes(data: bytes) -> MedianSketch:
        """Read ``to_bytes`` output; ValueError for anything else or another version."""
    def medians(self) -> npt.NDArray[np.float64]:
        """Each gene's nonzero median; NaN where a gene had no nonzero value."""
    def nonzero_counts(self) -> npt.NDArray[np.int64]:
        """Each gene's number of nonzero values."""

class ShardWriter:
    """Writes token shard parts (Parquet) from a background thread.

    Columns: ``input_ids`` (list of ``token_type``; dictionary-encoded, uncompressed; each
    ``write`` is one row group), ``length`` (uint32), ``cell_id`` (utf8),
    ``source`` (utf8), then the ``meta_schema`` columns in order (kinds ``"str"`` (nullable),
    ``"i64"``, ``"f64"``, ``"bool"``). Each part is written as ``.part-NNNNN.parquet.tmp`` and
    renamed to ``part-NNNNN.parquet`` only when complete. ``write`` validates and copies its
    arguments, then queues them (at most two chunks waiting) and returns; an error on the
    thread is raised (OSError) by the next call or by ``finish``. Dropping the writer, or
    ``abort``, removes the open part's temporary file.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        token_type: Literal["uint16", "uint32"],
        meta_schema: list[tuple[str, Literal["str", "i64", "f64", "bool"]]],
        zstd_level: int = 3,
    ) -> None:
        """Create ``out_dir`` if needed and start the writer thread (``zstd_level`` applies to
        every column but ``input_ids``)."""
    def begin_part(self, index: int) -> None:
        """Open ``part-{index:05d}.parquet`` (as its temporary name)."""
    def write(
        self,
        tokens: npt.NDArray[np.uint32] | npt.NDArray[np.uint16],
        offsets: npt.NDArray[np.int64],
        cell_ids: list[str],
        source: str,
        meta: dict[str, npt.NDArray[Any] | list[Any]] | None = None,
    ) -> None:
        """Append one row group. Row ``r`` is ``tokens[offsets[r] - offsets[0]:offsets[r + 1] - offsets[0]]``
        (so ``tokenize_csr`` output can be passed as is, or a slice of rows with its own token
        slice). ``meta`` holds exactly the schema's columns, one value per row. ValueError for
        inconsistent arguments or a token id too large for ``uint16``."""
    def end_part(self) -> None:
        """Close the open part; the thread finishes the file, fsyncs it and renames it."""
    def finish(self) -> dict[int, int]:
        """Wait for the thread; return part index -> rows written. Raises if any write failed
        or a part is still open (its temporary file is removed)."""
    def abort(self) -> None:
        """Stop the thread and remove the open part's temporary file; finished parts stay."""
