"""The Rust core's bindings against straightforward NumPy / pyarrow re-implementations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from cellrank_fm._core import tokenize_csr


def reference_tokens(mat: sp.csr_matrix, n_counts, col_token, col_median, max_genes, prefix=-1, suffix=-1):
    """The algorithm written plainly: per row, sum same-token columns, normalise, sort."""
    rows = []
    for r in range(mat.shape[0]):
        lo, hi = mat.indptr[r], mat.indptr[r + 1]
        cols, x = mat.indices[lo:hi], mat.data[lo:hi].astype(np.float64)
        n = x.sum() if n_counts is None else n_counts[r]
        tok = col_token[cols]
        keep = (tok >= 0) & (x != 0)
        cols, x, tok = cols[keep], x[keep], tok[keep]
        uniq, first, inverse = np.unique(tok, return_index=True, return_inverse=True)
        summed = np.zeros(len(uniq))
        np.add.at(summed, inverse, x)
        med = col_median[cols[first]]
        v = summed / n * 10000 / med if n > 0 else np.zeros(0)
        ok = v > 0
        uniq, v = uniq[ok], v[ok]
        order = np.lexsort((uniq, -v))[:max_genes]
        out = uniq[order].tolist()
        if out:
            out = ([prefix] if prefix >= 0 else []) + out + ([suffix] if suffix >= 0 else [])
        rows.append(out)
    return rows


def split(tokens, offsets):
    return [tokens[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def random_csr(rng, rows, cols, density, dtype):
    mat = sp.random(rows, cols, density=density, format="csr", random_state=rng,
                    data_rvs=lambda k: rng.integers(1, 6, size=k))
    mat.data = mat.data.astype(dtype)
    mat.data[rng.random(mat.nnz) < 0.05] = 0  # explicitly stored zeros
    mat.indices = mat.indices.astype(np.int32)
    return mat


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64, np.uint16, np.uint32])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_tokenize_matches_numpy(dtype, index_dtype):
    rng = np.random.default_rng(3)
    n_cols = 400
    mat = random_csr(rng, 120, n_cols, 0.08, dtype)
    # Row 5 stores nothing at all.
    mat = sp.vstack([mat[:5], sp.csr_matrix((1, n_cols), dtype=dtype), mat[5:]], format="csr")
    # ~10% of columns outside the vocabulary, and some tokens shared by two columns.
    col_token = rng.integers(0, 300, size=n_cols).astype(np.int32)
    col_token[rng.random(n_cols) < 0.1] = -1
    # Few distinct medians (powers of two and one other) so exact ties are common.
    col_median = rng.choice([0.5, 1.0, 2.0, 3.7], size=300)[col_token]
    n_counts = rng.integers(0, 300, size=mat.shape[0]).astype(np.float64)
    indptr = mat.indptr.astype(index_dtype)
    indices = mat.indices.astype(index_dtype)
    kept = 0
    for nc in (None, n_counts):
        for max_genes, prefix, suffix in ((1000, -1, -1), (7, 2, 3), (0, 2, 3)):
            tokens, offsets, n_nonint = tokenize_csr(
                indptr, indices, mat.data, nc, col_token, col_median, max_genes, prefix, suffix
            )
            assert tokens.dtype == np.uint32 and offsets.dtype == np.int64
            assert len(offsets) == mat.shape[0] + 1 and n_nonint == 0
            expected = reference_tokens(mat, nc, col_token, col_median, max_genes, prefix, suffix)
            assert split(tokens, offsets) == expected
            assert expected[5] == []
            kept += sum(map(len, expected))
    assert kept > 3000


def test_sliced_indptr_and_ties():
    rng = np.random.default_rng(11)
    mat = random_csr(rng, 60, 50, 0.3, np.float64)
    col_token = np.arange(50, dtype=np.int32)[::-1].copy()  # ties resolve by token, not column
    col_median = np.ones(50)
    whole = split(*tokenize_csr(mat.indptr, mat.indices, mat.data, None, col_token, col_median, 100)[:2])
    lo, hi = mat.indptr[20], mat.indptr[40]
    part = tokenize_csr(mat.indptr[20:41], mat.indices[lo:hi], mat.data[lo:hi], None, col_token, col_median, 100)
    assert split(*part[:2]) == whole[20:40]
    # A row whose values all tie comes out in ascending token order.
    tie = sp.csr_matrix(np.array([[3.0, 3.0, 3.0, 0.0, 1.0]]))
    t, o, _ = tokenize_csr(tie.indptr, tie.indices.astype(np.int32), tie.data, None,
                           np.array([9, 4, 6, 1, 2], np.int32), np.ones(5), 10)
    assert t.tolist() == [4, 6, 9, 2]


def test_nonint_count_and_bad_values():
    indptr = np.array([0, 2, 4], np.int64)
    indices = np.array([0, 1, 0, 2], np.int32)
    col_token = np.array([0, 1, 2], np.int32)
    ones = np.ones(3)
    *_, n_nonint = tokenize_csr(indptr, indices, np.array([1.5, 2.0, 0.25, 3.0]), None, col_token, ones, 5)
    assert n_nonint == 2
    with pytest.raises(ValueError, match=r"^row 1 column 2 has a negative or NaN value \(-3\)$"):
        tokenize_csr(indptr, indices, np.array([1, 2, 4, -3], np.int64), None, col_token, ones, 5)
    with pytest.raises(ValueError, match=r"row 0 column 1 has a negative or NaN value \(NaN\)"):
        tokenize_csr(indptr, indices, np.array([1, np.nan, 4, 3], np.float32), None, col_token, ones, 5)
    with pytest.raises(ValueError, match="column index 7"):
        tokenize_csr(indptr, np.array([0, 7, 0, 2], np.int32), np.ones(4), None, col_token, ones, 5)
    with pytest.raises(TypeError, match="data must be"):
        tokenize_csr(indptr, indices, np.ones(4, np.int8), None, col_token, ones, 5)
