"""Every reader returns the same cells x genes counts, chunk by chunk, as the matrix written."""

from __future__ import annotations

import gzip
import warnings

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from cellrank_fm.errors import UserError
from cellrank_fm.readers import expand_inputs, open_input

N_CELLS, N_GENES = 23, 17


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(0)
    m = rng.poisson(0.6, size=(N_CELLS, N_GENES)).astype(np.float32)
    m[4] = 0  # an empty cell
    return m


GENES = [f"ENSG{i:011d}" for i in range(N_GENES)]
CELLS = [f"cell{i}" for i in range(N_CELLS)]


def _collect(reader, chunk_rows=5, obs=()):
    dense = np.zeros((reader.n_rows, reader.n_cols), dtype=np.float64)
    ids, meta = [], {name: [] for name in obs}
    for start in range(0, reader.n_rows, chunk_rows):
        stop = min(reader.n_rows, start + chunk_rows)
        ch = reader.read(start, stop, obs)
        assert ch.n_rows == stop - start
        indices, data = ch.indices, ch.data
        base = ch.indptr - ch.indptr[0]
        for r in range(ch.n_rows):
            sl = slice(base[r], base[r + 1])
            np.add.at(dense[start + r], indices[sl], data[sl])
        ids.extend(ch.cell_ids)
        for name in obs:
            meta[name].extend(list(ch.obs[name]))
    return dense, ids, meta


def test_h5ad_csr_and_dense(tmp_path, counts):
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame(
        {"kind": pd.Categorical(["a", "b"] * 11 + ["a"]), "filter_pass": np.arange(N_CELLS) % 3 != 0},
        index=CELLS,
    )
    var = pd.DataFrame({"symbol": [f"G{i}" for i in range(N_GENES)]}, index=GENES)
    for name, X in (("csr", sp.csr_matrix(counts)), ("dense", counts)):
        path = tmp_path / f"{name}.h5ad"
        ad.AnnData(X=X, obs=obs, var=var).write_h5ad(path)
        with open_input(path) as reader:
            assert reader.var_names == GENES
            assert reader.var_column("symbol")[3] == "G3"
            dense, ids, meta = _collect(reader, obs=("kind", "filter_pass"))
        np.testing.assert_array_equal(dense, counts)
        assert ids == CELLS
        assert meta["kind"] == list(obs["kind"])
        assert [bool(v) for v in meta["filter_pass"]] == list(obs["filter_pass"])


def test_h5ad_csc_is_refused_with_conversion_hint(tmp_path, counts):
    import anndata as ad

    path = tmp_path / "csc.h5ad"
    ad.AnnData(X=sp.csc_matrix(counts)).write_h5ad(path)
    with pytest.raises(UserError, match="tocsr"):
        open_input(path)


def test_h5ad_missing_gene_and_cell_columns(tmp_path, counts):
    import anndata as ad

    path = tmp_path / "x.h5ad"
    ad.AnnData(X=sp.csr_matrix(counts)).write_h5ad(path)
    with open_input(path) as reader:
        with pytest.raises(UserError, match="no gene column 'ensembl_id'"):
            reader.var_column("ensembl_id")
        with pytest.raises(UserError, match="no cell column 'label'"):
            reader.read(0, 3, ["label"])


def test_loom(tmp_path, counts):
    path = tmp_path / "x.loom"
    with h5py.File(path, "w") as f:
        f.create_dataset("matrix", data=counts.T, chunks=(4, 4))  # genes x cells
        f.create_group("layers")
        f.create_dataset("row_attrs/Gene", data=np.array(GENES, dtype="S"))
        f.create_dataset("col_attrs/CellID", data=np.array(CELLS, dtype="S"))
        f.create_dataset("col_attrs/batch", data=np.arange(N_CELLS) % 2)
    with open_input(path) as reader:
        assert reader.var_names == GENES
        dense, ids, meta = _collect(reader, chunk_rows=7, obs=("batch",))
    np.testing.assert_array_equal(dense, counts)
    assert ids == CELLS
    assert meta["batch"] == list(np.arange(N_CELLS) % 2)


def test_10x_h5_is_csc_by_barcode(tmp_path, counts):
    # Cell Ranger stores genes x cells as CSC: indptr runs over barcodes.
    m = sp.csc_matrix(counts.T.astype(np.int32))
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array([N_GENES, N_CELLS])
        g["barcodes"] = np.array(CELLS, dtype="S")
        g["features/id"] = np.array(GENES, dtype="S")
        g["features/name"] = np.array([f"G{i}" for i in range(N_GENES)], dtype="S")
        g["features/feature_type"] = np.array(["Gene Expression"] * N_GENES, dtype="S")
    with open_input(path) as reader:
        assert reader.var_column("gene_symbols")[2] == "G2"
        dense, ids, _ = _collect(reader, chunk_rows=6)
    np.testing.assert_array_equal(dense, counts)
    assert ids == CELLS


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("shuffled", [False, True])
def test_matrix_market_directory(tmp_path, counts, compressed, shuffled, monkeypatch):
    from cellrank_fm import readers

    d = tmp_path / "mtx"
    d.mkdir()
    coo = sp.coo_matrix(counts.T.astype(np.int64))  # genes x cells
    order = np.lexsort((coo.row, coo.col))  # grouped by cell, as Cell Ranger writes
    if shuffled:
        order = np.random.default_rng(1).permutation(len(coo.data))
    coo = sp.coo_matrix((coo.data[order], (coo.row[order], coo.col[order])), shape=coo.shape)
    scipy.io.mmwrite(d / "matrix.mtx", coo, field="integer")
    feats = "".join(f"{g}\tG{i}\tGene Expression\n" for i, g in enumerate(GENES))
    bcs = "".join(c + "\n" for c in CELLS)
    if compressed:
        with open(d / "matrix.mtx", "rb") as fh, gzip.open(d / "matrix.mtx.gz", "wb") as out:
            out.write(fh.read())
        (d / "matrix.mtx").unlink()
        with gzip.open(d / "features.tsv.gz", "wt") as fh:
            fh.write(feats)
        with gzip.open(d / "barcodes.tsv.gz", "wt") as fh:
            fh.write(bcs)
    else:
        (d / "features.tsv").write_text(feats)
        (d / "barcodes.tsv").write_text(bcs)
    monkeypatch.setattr(readers.MtxReader, "BLOCK_ENTRIES", 7)  # force many blocks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_input(d) as reader:
            dense, ids, _ = _collect(reader, chunk_rows=4)
    np.testing.assert_array_equal(dense, counts)
    assert ids == CELLS
    assert any("not grouped by cell" in str(w.message) for w in caught) == shuffled


def test_bulk_tables_both_orientations(tmp_path, counts):
    import polars as pl

    samples = [f"S{i}" for i in range(N_CELLS)]
    by_sample = pl.DataFrame({"sample": samples, **{g: counts[:, j] for j, g in enumerate(GENES)}})
    by_gene = pl.DataFrame({"gene": GENES, **{s: counts[i] for i, s in enumerate(samples)}})
    by_sample.write_csv(tmp_path / "a.csv")
    with open(tmp_path / "a.csv", "rb") as fh, gzip.open(tmp_path / "b.tsv.gz", "wb") as out:
        out.write(fh.read().replace(b",", b"\t"))
    by_gene.write_parquet(tmp_path / "c.parquet")
    for name, orientation in (("a.csv", "samples-by-genes"), ("b.tsv.gz", "samples-by-genes"), ("c.parquet", "genes-by-samples")):
        with open_input(tmp_path / name) as reader:
            assert reader.orientation == orientation, name
            assert reader.var_names == GENES
            dense, ids, _ = _collect(reader)
        np.testing.assert_array_equal(dense, counts)
        assert ids == samples
    # The override wins over detection.
    with open_input(tmp_path / "a.csv", orientation="genes-by-samples") as reader:
        assert reader.var_names == samples


def test_dispatch_errors_and_directory_order(tmp_path, counts):
    (tmp_path / "x.xlsx").write_text("nope")
    with pytest.raises(UserError, match="unknown format"):
        open_input(tmp_path / "x.xlsx")
    (tmp_path / "fake.h5ad").write_text("this is not hdf5")
    with pytest.raises(UserError, match="not an HDF5 file"):
        open_input(tmp_path / "fake.h5ad")
    with pytest.raises(UserError, match="does not exist"):
        open_input(tmp_path / "absent.h5ad")
    d = tmp_path / "many"
    d.mkdir()
    for name in ("b.csv", "a.csv", "notes.md"):
        (d / name).write_text("x")
    assert [p.name for p in expand_inputs([d])] == ["a.csv", "b.csv"]


def _soma_experiment(path, adata):
    tiledbsoma_io = pytest.importorskip("tiledbsoma.io")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiledbsoma's own deprecation notices
        tiledbsoma_io.from_anndata(str(path), adata, measurement_name="RNA")
    return path


def test_tiledb_soma_experiment(tmp_path, counts):
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame({"kind": pd.Categorical(["a", "b"] * 11 + ["a"]), "n": np.arange(N_CELLS)}, index=CELLS)
    var = pd.DataFrame({"symbol": [f"G{i}" for i in range(N_GENES)]}, index=GENES)
    exp = _soma_experiment(tmp_path / "corpus" / "exp", ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var))
    with open_input(exp) as reader:
        assert reader.kind == "soma" and reader.var_names == GENES
        assert reader.var_column("symbol")[3] == "G3" and set(reader.obs_columns()) == {"kind", "n"}
        dense, ids, meta = _collect(reader, chunk_rows=7, obs=("kind", "n"))
        assert list(reader.obs_column("n", 20, 23)) == [20, 21, 22]
        with pytest.raises(UserError, match="no cell column 'label'"):
            reader.read(0, 3, ["label"])
    np.testing.assert_array_equal(dense, counts)
    assert ids == CELLS and meta["kind"] == list(obs["kind"]) and meta["n"] == list(range(N_CELLS))
    with pytest.raises(UserError, match=r"no X layer 'counts' \(layers: data\)"):
        open_input(exp, layer="counts")
    # An experiment is one input, not a directory to search for files.
    ad.AnnData(X=sp.csr_matrix(counts)).write_h5ad(tmp_path / "corpus" / "more.h5ad")
    assert [p.name for p in expand_inputs([tmp_path / "corpus"])] == ["exp", "more.h5ad"]
    assert expand_inputs([exp]) == [exp]
    from cellrank_fm.inference import open_h5ad

    with pytest.raises(UserError, match=r"exp is not an .h5ad file; .*\(tiledbsoma.io.to_h5ad for a TileDB-SOMA"):
        open_h5ad(exp)  # what predict, embed and explain read
    # Damage, and a missing tiledbsoma, end in one sentence naming the experiment.
    fragments = sorted((exp / "ms" / "RNA" / "X" / "data").rglob("__fragment_metadata.tdb"))
    for f in fragments:
        f.write_bytes(f.read_bytes()[:10] + b"\xff" * 50)
    with pytest.raises(UserError, match=r"exp could not be read.*; the file may be damaged"):
        with open_input(exp) as reader:
            reader.read(0, 7)
    import shutil
    import sys

    shutil.rmtree(exp / "ms" / "RNA" / "var")
    with pytest.raises(UserError, match="exp could not be read"):
        open_input(exp)
    sys.modules["tiledbsoma"] = None  # what importing an uninstalled package does
    try:
        with pytest.raises(UserError, match=r"TileDB-SOMA experiment; reading it needs tiledbsoma \(pip install"):
            open_input(exp)
    finally:
        del sys.modules["tiledbsoma"]


def test_tokenize_reads_a_soma_experiment_as_its_h5ad(tmp_path, shared_data):
    """`cellrank tokenize` on a SOMA experiment writes the shards of the same cells' .h5ad."""
    import anndata as ad
    import pandas as pd

    from cellrank_fm.shards import ShardSet
    from cli_helpers import run

    full = ad.read_h5ad(shared_data / "sc" / "kang2017_pbmc_ifnb_2k.h5ad")
    cells = full[::7].copy()
    cells.write_h5ad(tmp_path / "kang.h5ad")
    exp = _soma_experiment(tmp_path / "kang_soma", cells)
    gf = shared_data / "geneformer"
    common = ["--vocab", gf / "token_dictionary_gc30M.pkl", "--medians", gf / "gene_median_dictionary_gc30M.pkl",
              "--gene-id-column", "ensembl_id", "--keep-obs", "condition", "--quiet"]
    run(["tokenize", tmp_path / "kang.h5ad", "--out", tmp_path / "from_h5ad", *common])
    run(["tokenize", exp, "--out", tmp_path / "from_soma", *common])
    a, b = ShardSet(tmp_path / "from_h5ad"), ShardSet(tmp_path / "from_soma")
    assert len(a) == len(b) == cells.n_obs
    assert [list(x) for x in a.column("input_ids")] == [list(x) for x in b.column("input_ids")]
    assert list(a.column("cell_id")) == list(b.column("cell_id")) and list(b.column("source")) == ["kang_soma"] * len(b)
    assert list(pd.Series(b.column("condition"))) == list(cells.obs["condition"])
    # Rerunning onto the finished shards with --resume finds the input unchanged.
    run(["tokenize", exp, "--out", tmp_path / "from_soma", "--resume", *common])
    from cellrank_fm.medians import compute_medians

    kw = dict(gene_id_column="ensembl_id", quiet=True)
    assert compute_medians([exp], None, **kw) == compute_medians([tmp_path / "kang.h5ad"], None, **kw)
    # The baseline reads the experiment's counts, given directly or behind its shards.
    import cellrank_fm as cfm

    for data, same in ((exp, tmp_path / "kang.h5ad"), (tmp_path / "from_soma", tmp_path / "from_h5ad")):
        got, want = (cfm.baseline(x, label="condition", n_top_genes=200) for x in (data, same))
        assert got["split"] == want["split"] and got["confusion_matrix"] == want["confusion_matrix"]
