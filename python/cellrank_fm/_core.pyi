"""cellrank's Rust core: rank-value tokenisation, median sketches and Parquet shard writing.

Every function takes NumPy arrays without copying them, releases the GIL while it computes,
and returns NumPy arrays built directly from Rust buffers.
"""

from typing import Literal

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
