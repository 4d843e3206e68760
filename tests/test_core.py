"""The Rust core's bindings against straightforward NumPy / pyarrow re-implementations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from cellrank_fm._core import MedianSketch, ShardWriter, tokenize_csr


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


def exact_nonzero_medians(mat: sp.csr_matrix, col_gene, n_genes):
    """Per gene, numpy's median of the nonzero x / n_counts * 10000 (same-gene columns summed)."""
    totals = np.asarray(mat.sum(axis=1)).ravel()
    keep = col_gene >= 0
    to_gene = sp.csr_matrix((np.ones(keep.sum()), (np.flatnonzero(keep), col_gene[keep])),
                            shape=(mat.shape[1], n_genes))
    per_gene = (mat.astype(np.float64) @ to_gene).toarray()
    values = per_gene / totals[:, None] * 10000
    return [np.median(v[v > 0]) if (v > 0).any() else np.nan for v in values.T], (values > 0).sum(axis=0)


def test_median_sketch_bound_and_merge():
    rng = np.random.default_rng(5)
    n_cols, n_genes = 80, 60
    col_gene = np.arange(n_cols, dtype=np.int32)
    col_gene[60:75] = rng.integers(0, 60, size=15)  # columns summed into an existing gene
    col_gene[75:] = -1
    mats = []
    for _ in range(3):
        mat = sp.random(400, n_cols, density=0.3, format="csr", random_state=rng,
                        data_rvs=lambda k: rng.integers(1, 50, size=k).astype(np.float32))
        mat.data *= rng.integers(1, 40, size=mat.nnz)  # spread values over decades
        mats.append(mat)
    drop59 = np.ones(n_cols)
    drop59[59] = 0
    mats[0] = (mats[0] @ sp.diags(drop59)).tocsr()  # a gene seen in only part of the corpus (float64 chunk)
    mats[0].eliminate_zeros()
    alpha = 0.002
    whole = MedianSketch(n_genes, relative_accuracy=alpha)
    merged = MedianSketch(n_genes, relative_accuracy=alpha)
    for mat in mats:
        whole.update(mat.indptr, mat.indices, mat.data, None, col_gene)
        part = MedianSketch(n_genes, alpha)
        part.update(mat.indptr.astype(np.int64), mat.indices, mat.data, None, col_gene)
        merged.merge(MedianSketch.from_bytes(part.to_bytes()))
    exact, counts = exact_nonzero_medians(sp.vstack(mats, format="csr"), col_gene, n_genes)
    got = whole.medians()
    rel = np.abs(got - exact) / np.asarray(exact)
    assert np.all(rel <= alpha * (1 + 1e-9)), rel.max()
    assert rel.max() > alpha / 20  # the sketch really is approximate, and the check can fail
    np.testing.assert_array_equal(whole.nonzero_counts(), counts)
    np.testing.assert_array_equal(merged.medians(), got)
    np.testing.assert_array_equal(merged.nonzero_counts(), whole.nonzero_counts())
    assert whole.to_bytes() != MedianSketch(n_genes, alpha).to_bytes()


def test_median_sketch_errors_and_empty_genes():
    sk = MedianSketch(3)
    assert np.isnan(sk.medians()).all() and sk.relative_accuracy == 0.001
    with pytest.raises(ValueError, match="row 1 column 0 has a negative or NaN value"):
        sk.update(np.array([0, 1, 2]), np.array([0, 0]), np.array([2.0, -1.0]), None, np.array([0], np.int32))
    with pytest.raises(ValueError, match="not a cellrank median sketch"):
        MedianSketch.from_bytes(b"nonsense")
    with pytest.raises(ValueError, match="cannot merge"):
        sk.merge(MedianSketch(4))


def test_shard_writer_round_trip(tmp_path):
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    mat = random_csr(rng, 30, 40, 0.3, np.int32)
    tokens, offsets, _ = tokenize_csr(mat.indptr, mat.indices, mat.data, None,
                                      np.arange(40, dtype=np.int32), np.ones(40), 10, 2, 3)
    schema = [("cell_type", "str"), ("batch", "i64"), ("score", "f64"), ("ok", "bool")]
    w = ShardWriter(str(tmp_path), "uint16", schema, zstd_level=3)
    w.begin_part(0)
    # First chunk: the whole token array with the first rows' offsets; second chunk: its own
    # token slice with offsets that do not start at 0 (rows are relative to offsets[0]).
    w.write(tokens, offsets[:16], [f"cell{i}" for i in range(15)], "in.h5ad", {
        "cell_type": np.array(["T", "B", None] * 5, dtype=object),
        "batch": np.arange(15),
        "score": np.linspace(0, 1, 15),
        "ok": np.arange(15) % 2 == 0,
    })
    w.write(tokens[offsets[15]:], offsets[15:], [f"cell{i}" for i in range(15, 30)], "in.h5ad", {
        "cell_type": ["T", "B", None] * 5,
        "batch": list(range(15, 30)),
        "score": np.linspace(0, 1, 15),
        "ok": [i % 2 == 0 for i in range(15, 30)],
    })
    w.end_part()
    assert w.finish() == {0: 30}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.parquet"]
    f = pq.ParquetFile(tmp_path / "part-00000.parquet")
    assert f.metadata.num_row_groups == 2
    # Tokens: bit-packed dictionary indices, stored uncompressed; the other columns use zstd.
    tokens_chunk = f.metadata.row_group(0).column(0)
    assert tokens_chunk.compression == "UNCOMPRESSED" and "RLE_DICTIONARY" in tokens_chunk.encodings
    assert {f.metadata.row_group(0).column(i).compression for i in range(1, 8)} == {"ZSTD"}
    table = f.read()
    assert table.column_names == ["input_ids", "length", "cell_id", "source", "cell_type", "batch", "score", "ok"]
    assert str(table.schema.field("input_ids").type.value_type) == "uint16"
    assert str(table.schema.field("length").type) == "uint32"
    assert table.column("input_ids").to_pylist() == split(tokens, offsets)
    assert table.column("length").to_pylist() == np.diff(offsets).tolist()
    assert table.column("cell_id").to_pylist() == [f"cell{i}" for i in range(30)]
    assert set(table.column("source").to_pylist()) == {"in.h5ad"}
    assert table.column("cell_type").to_pylist() == ["T", "B", None] * 10
    assert table.column("batch").to_pylist() == list(range(30))
    assert table.column("ok").to_pylist() == [i % 2 == 0 for i in range(30)]


def test_shard_writer_abort_and_errors(tmp_path):
    w = ShardWriter(tmp_path, "uint32", [("label", "str")])
    w.begin_part(3)
    w.write(np.array([5, 6], np.uint32), np.array([0, 2]), ["a"], "s", {"label": ["x"]})
    with pytest.raises(ValueError, match="1 values of kind"):
        w.write(np.array([5, 6], np.uint32), np.array([0, 2]), ["a"], "s", {"label": ["x", "y"]})
    with pytest.raises(ValueError, match="not in the shard's schema"):
        w.write(np.array([5], np.uint32), np.array([0, 1]), ["a"], "s", {"other": ["x"]})
    w.abort()
    assert list(tmp_path.iterdir()) == []  # no temp file, no part
    w = ShardWriter(tmp_path, "uint16", [])
    w.begin_part(0)
    with pytest.raises(ValueError, match="does not fit"):
        w.write(np.array([70000], np.uint32), np.array([0, 1]), ["a"], "s")
    with pytest.raises(ValueError, match="part 0 was begun but never ended"):
        w.finish()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="token_type"):
        ShardWriter(tmp_path, "int8", [])
