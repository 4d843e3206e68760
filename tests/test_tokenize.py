"""The tokenize pipeline: shards, manifest, duplicates, gene sets, resume, real files."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from cellrank_fm.errors import UserError
from cellrank_fm.tokenize import Dictionaries, TokenizeSettings, tokenize_files, tokenize_in_memory
from cli_helpers import run

GENES = [f"ENSG{i:011d}" for i in range(2, 42)]
VOCAB = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{g: i + 4 for i, g in enumerate(GENES)}}


def _medians():
    rng = np.random.default_rng(7)
    return {g: float(m) for g, m in zip(GENES, rng.uniform(0.5, 5.0, len(GENES)))}


def reference_tokens(dense, labels_to_gene, vocab, medians, max_genes, n_counts=None):
    """Plain-Python rank-value encoding: sum duplicates, normalise, sort (-v, token), truncate."""
    out = []
    for r, row in enumerate(dense):
        total = row.sum() if n_counts is None else n_counts[r]
        acc: dict[int, float] = {}
        for j, x in enumerate(row):
            g = labels_to_gene[j]
            if x and g in vocab and g in medians:
                acc[vocab[g]] = acc.get(vocab[g], 0.0) + float(x)
        vals = sorted(((-(x / total * 10_000 / medians[_gene(vocab, t)]), t) for t, x in acc.items()))
        out.append(np.array([t for _, t in vals[:max_genes]], dtype=np.int64))
    return out


def _gene(vocab, token):
    return next(g for g, t in vocab.items() if t == token)


def _write_h5ad(path, dense, var_names, obs=None):
    import anndata as ad
    import pandas as pd

    obs = obs if obs is not None else pd.DataFrame(index=[f"cell{i}" for i in range(dense.shape[0])])
    ad.AnnData(X=sp.csr_matrix(dense.astype(np.float32)), obs=obs, var=pd.DataFrame(index=var_names)).write_h5ad(path)


def _read_parts(out):
    manifest = json.loads((out / "manifest.json").read_text())
    frames = [pl.read_parquet(out / p["file"]) for p in manifest["parts"]]
    return manifest, pl.concat(frames) if frames else None


@pytest.fixture()
def small(tmp_path):
    rng = np.random.default_rng(3)
    dense = rng.poisson(1.5, size=(300, 44)).astype(np.float64)
    dense[10] = 0
    dense[11, :42] = 0  # counts only in columns outside the vocabulary -> empty cell
    dense[11, 42:] = 3
    # Columns 40..43: a versioned duplicate of gene 0, a lower-case duplicate of gene 1, two unknown.
    labels = GENES + [GENES[0] + ".7", GENES[1].lower(), "ENSG99999999999", "NOTAGENE"]
    path = tmp_path / "small.h5ad"
    _write_h5ad(path, dense, labels)
    return path, dense, labels


def test_shards_match_reference_with_duplicates_summed(small, tmp_path):
    path, dense, labels = small
    medians = _medians()
    dicts = Dictionaries(VOCAB, medians)
    manifest = tokenize_files([path], tmp_path / "out", dicts, TokenizeSettings(model_version="v2", model_input_size=12, part_cells=64),
                              chunk_cells=50, quiet=True)
    manifest2, parts = _read_parts(tmp_path / "out")
    assert manifest == manifest2
    to_gene = GENES + [GENES[0], GENES[1], "ENSG99999999999", None]
    expected = reference_tokens(dense, to_gene, VOCAB, medians, 10)
    got = dict(zip(parts["cell_id"].to_list(), parts["input_ids"].to_list()))
    assert "cell10" not in got and "cell11" not in got
    for i, exp in enumerate(expected):
        if len(exp) == 0:
            continue
        assert got[f"cell{i}"] == [2, *exp.tolist(), 3], i
    assert parts["length"].to_list() == [len(t) for t in parts["input_ids"].to_list()]
    assert set(parts["source"].to_list()) == {"small.h5ad"}
    assert manifest["cells"] == {"input": 300, "filtered_out": 0, "empty": 2, "written": 298}
    assert sum(p["rows"] for p in manifest["parts"]) == 298 and len(manifest["parts"]) == 5
    assert manifest["genes"]["inputs"][0]["merged_duplicates"] == 2
    assert manifest["genes"]["inputs"][0]["recognised"] == 42
    assert manifest["special_tokens"] == {"pad": 0, "mask": 1, "cls": 2, "eos": 3}
    assert manifest["token_dtype"] == "uint16" and parts.schema["input_ids"] == pl.List(pl.UInt16)
    assert json.loads((tmp_path / "out" / "vocabulary.json").read_text()) == VOCAB
    assert not list((tmp_path / "out").glob(".cellrank-*"))


def test_in_memory_matches_shards_and_anndata(small, tmp_path):
    import anndata as ad

    path, dense, labels = small
    medians = _medians()
    from_file = tokenize_in_memory(path, VOCAB, medians, model_version="v1")
    from_obj = tokenize_in_memory(ad.read_h5ad(path), VOCAB, medians, model_version="v1")
    to_gene = GENES + [GENES[0], GENES[1], "ENSG99999999999", None]
    expected = reference_tokens(dense, to_gene, VOCAB, medians, 2048)
    assert from_file.ok.tolist() == [len(e) > 0 for e in expected]
    for res in (from_file, from_obj):
        assert [t.tolist() for t in res.tokens] == [e.tolist() for e in expected]
        assert res.cell_ids == [f"cell{i}" for i in range(300)]


def test_filter_pass_n_counts_keep_obs_and_gene_set(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(5)
    dense = rng.poisson(2.0, size=(40, 40)).astype(np.float64)
    n_counts = dense.sum(axis=1) * 3  # a given n_counts is used as is
    obs = pd.DataFrame({"filter_pass": (np.arange(40) % 4 != 0).astype(int), "n_counts": n_counts,
                        "label": pd.Categorical(["a", "b"] * 20), "score": np.arange(40) / 2},
                       index=[f"c{i}" for i in range(40)])
    path = tmp_path / "x.h5ad"
    _write_h5ad(path, dense, GENES, obs)
    (tmp_path / "set.txt").write_text("\n".join(GENES[:10]) + "\n")
    medians = _medians()
    dicts = Dictionaries(VOCAB, medians)
    dicts.set_gene_set(GENES[:10], "set.txt")
    settings = TokenizeSettings(keep_obs=["label", "score"], part_cells=16)
    manifest = tokenize_files([path], tmp_path / "out", dicts, settings, quiet=True)
    _, parts = _read_parts(tmp_path / "out")
    assert manifest["cells"]["filtered_out"] == 10 and manifest["cells"]["written"] == 30
    assert parts["cell_id"].to_list() == [f"c{i}" for i in range(40) if i % 4]
    assert parts["label"].to_list() == [["a", "b"][i % 2] for i in range(40) if i % 4]
    assert parts["score"].to_list() == [i / 2 for i in range(40) if i % 4]
    allowed = {VOCAB[g] for g in GENES[:10]}
    assert all(set(t) <= allowed for t in parts["input_ids"].to_list())
    # Full-vocabulary ids and the given n_counts: compare with the reference restricted to the set.
    restricted = dense.copy()
    restricted[:, 10:] = 0
    expected = reference_tokens(restricted, GENES, VOCAB, medians, 2048, n_counts=n_counts)
    kept = [i for i in range(40) if i % 4]
    assert parts["input_ids"].to_list() == [expected[i].tolist() for i in kept]
    assert manifest["gene_set"]["size"] == 10
    with pytest.raises(UserError, match="no cell column 'donor'"):
        tokenize_files([path], tmp_path / "out2", dicts, TokenizeSettings(keep_obs=["donor"]), quiet=True)


def test_resume_skips_completed_parts_and_refuses_changed_settings(small, tmp_path, monkeypatch):
    import importlib

    tokenize = importlib.import_module("cellrank_fm.tokenize")  # `cellrank_fm.tokenize` is the API function

    path, dense, labels = small
    dicts = Dictionaries(VOCAB, _medians())
    settings = TokenizeSettings(part_cells=64)
    out = tmp_path / "out"
    ranked = tokenize.run_core

    def interrupted(chunk, *args):
        if chunk.start >= 224:  # mid-part: rows 192-223 of part 3 are already queued
            raise KeyboardInterrupt
        return ranked(chunk, *args)

    monkeypatch.setattr(tokenize, "run_core", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenize_files([path], out, dicts, settings, chunk_cells=32, quiet=True)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()
    done = sorted(p.name for p in out.glob("part-*.parquet"))
    assert done == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pl.read_parquet(out / n).height for n in done] == [62, 64, 64]  # cells 10 and 11 are empty
    stamp = {n: (out / n).stat().st_mtime_ns for n in done}
    with pytest.raises(UserError, match="already exists"):
        tokenize_files([path], out, dicts, settings, quiet=True)
    with pytest.raises(UserError, match="cannot resume"):
        tokenize_files([path], out, dicts, TokenizeSettings(part_cells=64, model_version="v2"), resume=True, quiet=True)
    manifest = tokenize_files([path], out, dicts, settings, resume=True, quiet=True)
    assert {n: (out / n).stat().st_mtime_ns for n in done} == stamp  # not rewritten
    fresh = tokenize_files([path], tmp_path / "fresh", dicts, settings, quiet=True)
    assert manifest["cells"] == fresh["cells"] and manifest["parts"] == fresh["parts"]
    _, a = _read_parts(out)
    _, b = _read_parts(tmp_path / "fresh")
    assert a.equals(b)


def test_real_files_tokenize_and_counts_add_up(shared_data, tmp_path):
    gf = shared_data / "geneformer"
    names = gf / "gene_name_id_dict_gc104M.pkl"
    runs = [
        ("pbmc_ids", shared_data / "sc" / "kang2017_pbmc_ifnb_2k.h5ad", ["--gene-id-column", "ensembl_id", "--keep-obs", "condition"]),
        ("pbmc_symbols", shared_data / "sc" / "kang2017_pbmc_ifnb_2k.h5ad", ["--gene-map", str(names)]),
        ("tcells", shared_data / "sc" / "wu2020_tcells_200.h5ad", ["--gene-map", str(names), "--keep-obs", "cluster_orig"]),
        ("gtex", shared_data / "bulk" / "gtex_lung_30samples_chr21.csv.gz", []),
        ("mito", shared_data / "sc" / "kang2017_pbmc_ifnb_2k.h5ad",
         ["--gene-map", str(names), "--genes", str(shared_data / "genes" / "Human.MitoCarta3.0.csv")]),
    ]
    for name, path, extra in runs:
        out = tmp_path / name
        run(["tokenize", str(path), "--out", str(out), "--quiet", "--model-version", "v2",
             "--vocab", str(gf / "token_dictionary_gc104M.pkl"),
             "--medians", str(gf / "gene_median_dictionary_gc104M.pkl"), *extra])
        manifest, parts = _read_parts(out)
        cells = manifest["cells"]
        assert cells["input"] == cells["filtered_out"] + cells["empty"] + cells["written"], name
        assert parts.height == cells["written"] == sum(p["rows"] for p in manifest["parts"]), name
        assert manifest["inputs"][0]["rows"] == cells["input"] and len(manifest["inputs"][0]["sha256"]) == 64
        lengths = parts["length"].to_numpy()
        assert (lengths >= 3).all() and (lengths <= 4096).all()
        vocab = json.loads((out / "vocabulary.json").read_text())
        if name == "pbmc_ids":
            assert cells["input"] == 2000 and cells["written"] > 1990
            assert set(parts["condition"].to_list()) == {"ctrl", "stim"}
            assert manifest["genes"]["inputs"][0]["share_recognised"] > 0.6
        if name == "gtex":
            assert cells["written"] == 30
        if name == "tcells":
            assert cells["written"] > 190
            symbols = json.loads((out / "symbols.json").read_text())
            assert symbols.get("ENSG00000010610") == "CD4"
        if name == "mito":
            inv = {t: g for g, t in vocab.items()}
            import polars

            mito = polars.read_csv(shared_data / "genes" / "Human.MitoCarta3.0.csv", infer_schema_length=0)
            ids = {x for v in mito["EnsemblGeneID_mapping_version_20200130"].drop_nulls().to_list() for x in v.split("|")}
            toks = {t for row in parts["input_ids"].to_list() for t in row[1:-1]}
            assert toks and all(inv[t] in ids for t in toks)
            assert manifest["gene_set"]["size"] > 900


def test_10x_h5_totals_leave_out_antibody_features(tmp_path):
    import h5py

    rng = np.random.default_rng(9)
    n_genes, n_ab = 20, 2
    dense = rng.poisson(1.5, size=(30, n_genes + n_ab)).astype(np.int32)
    dense[:, n_genes:] *= 50  # antibody counts would swamp the totals
    m = sp.csc_matrix(dense.T)
    path = tmp_path / "raw_feature_bc_matrix.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array([n_genes + n_ab, 30])
        g["barcodes"] = np.array([f"AAAC-{i}" for i in range(30)], dtype="S")
        g["features/id"] = np.array(GENES[:n_genes] + ["CD3_TotalSeqB", "CD4_TotalSeqB"], dtype="S")
        g["features/name"] = np.array([f"G{i}" for i in range(n_genes)] + ["CD3", "CD4"], dtype="S")
        g["features/feature_type"] = np.array(["Gene Expression"] * n_genes + ["Antibody Capture"] * n_ab, dtype="S")
    medians = _medians()
    res = tokenize_in_memory(path, VOCAB, medians)
    gex = dense[:, :n_genes].astype(np.float64)
    expected = reference_tokens(gex, GENES[:n_genes], VOCAB, medians, 2048, n_counts=gex.sum(axis=1))
    assert [t.tolist() for t in res.tokens] == [e.tolist() for e in expected]
    assert res.cell_ids[0] == "AAAC-0"
    # Ranks do not depend on the totals; the medians do: they must use gene-expression totals.
    from cellrank_fm.medians import compute_medians

    got = compute_medians([path], None, sketch_out=tmp_path / "s", quiet=True)
    for j, g in enumerate(GENES[:n_genes]):
        x = gex[:, j]
        v = np.sort(x[x > 0] / gex.sum(axis=1)[x > 0] * 10_000)
        lo, hi = v[(len(v) - 1) // 2], v[len(v) // 2]
        assert lo * 0.999 <= got[g] <= hi * 1.001, g


def test_a_directory_of_mixed_inputs_becomes_one_shard_set_in_sorted_order(tmp_path):
    import gzip

    import scipy.io

    rng = np.random.default_rng(4)
    d = tmp_path / "inputs"
    d.mkdir()
    blocks = [rng.poisson(1.0, size=(n, len(GENES))).astype(np.float64) for n in (7, 9, 11)]
    # a.csv: bulk table, genes x samples; b.h5ad; c_mtx/: Matrix Market directory.
    pl.DataFrame({"gene": GENES, **{f"S{i}": blocks[0][i] for i in range(7)}}).write_csv(d / "a.csv")
    _write_h5ad(d / "b.h5ad", blocks[1], GENES)
    m = d / "c_mtx"
    m.mkdir()
    scipy.io.mmwrite(m / "matrix.mtx", sp.csc_matrix(blocks[2].T.astype(np.int64)).tocoo(), field="integer")
    with gzip.open(m / "features.tsv.gz", "wt") as fh:
        fh.write("".join(f"{g}\tG{i}\tGene Expression\n" for i, g in enumerate(GENES)))
    (m / "barcodes.tsv").write_text("".join(f"BC{i}\n" for i in range(11)))
    medians = _medians()
    manifest = tokenize_files([d], tmp_path / "out", Dictionaries(VOCAB, medians), quiet=True)
    _, parts = _read_parts(tmp_path / "out")
    assert [p["path"].split("/")[-1] for p in manifest["inputs"]] == ["a.csv", "b.h5ad", "c_mtx"]
    assert parts["source"].to_list() == ["a.csv"] * 7 + ["b.h5ad"] * 9 + ["c_mtx"] * 11
    expected = [t for b in blocks for t in reference_tokens(b, GENES, VOCAB, medians, 2048)]
    assert parts["input_ids"].to_list() == [e.tolist() for e in expected]
    assert parts["cell_id"].to_list()[:2] == ["S0", "S1"] and parts["cell_id"].to_list()[-1] == "BC10"
    assert manifest["cells"]["written"] == 27
