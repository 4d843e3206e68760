import json

import numpy as np
import pytest

from cellrank_fm.baseline import highly_variable_genes, load_table, run_baseline
from cellrank_fm.simulate import simulate_corpus
from cellrank_fm.splits import make_split
from cli_helpers import fails, run


@pytest.fixture(scope="module")
def sim_h5ad(tmp_path_factory):
    adata, _, _ = simulate_corpus(n_cells=400, n_genes=300, seed=4)
    path = tmp_path_factory.mktemp("sim") / "sim.h5ad"
    adata.write_h5ad(path)
    return path, adata


def test_baseline_learns_planted_states(sim_h5ad):
    path, adata = sim_h5ad
    r = run_baseline(path, "cell_state", n_top_genes=200, seed=1)
    assert r["classes"] == ["alpha", "beta", "gamma"]
    assert r["macro_f1"] > 0.9
    assert sum(r["per_class"][c]["support"] for c in r["classes"]) == r["split"]["test"] == 3 * 13
    # The disease label depends on a disjoint planted driver set: also learnable.
    assert run_baseline(path, "condition", n_top_genes=200, seed=1)["macro_f1"] > 0.8


def test_gene_selection_sees_training_cells_only(tmp_path, sim_h5ad):
    _, adata = sim_h5ad
    adata = adata.copy()
    table = load_table(sim_h5ad[0])
    split = make_split(table.cell_ids, table.columns["cell_state"], seed=0)
    # A gene that varies wildly, but only in test cells, must not be picked from the train split.
    x = adata.X.toarray()
    x[:, 0] = 0
    x[split.test, 0] = np.random.default_rng(0).integers(0, 500, size=len(split.test))
    import scipy.sparse as sp

    adata.X = sp.csr_matrix(x)
    path = tmp_path / "leak.h5ad"
    adata.write_h5ad(path)
    table = load_table(path)
    gene = str(adata.var_names[0])
    assert gene not in highly_variable_genes(table, split.train, 50)
    everyone = np.arange(adata.n_obs)
    assert gene in highly_variable_genes(table, everyone, 50)


def test_baseline_on_real_kang(shared_data, tmp_path):
    out = tmp_path / "bl"
    run(["baseline", str(shared_data / "sc" / "kang2017_pbmc_ifnb_2k.h5ad"), "--label", "condition",
          "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert m["classes"] == ["ctrl", "stim"] and m["cells"] == 200
    assert m["macro_f1"] > 0.9
    assert np.array(m["confusion_matrix"]).sum() == 200
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_label_column_exits_2(sim_h5ad, tmp_path, capsys):
    code, err = fails(["baseline", str(sim_h5ad[0]), "--label", "celltype", "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "'celltype'" in err and "cell_state" in err
    assert not (tmp_path / "o").exists()


def test_shards_read_back_the_tokenized_genes_and_split_alike(sim_h5ad, tmp_path, capsys):
    import shutil

    from cellrank_fm.baseline import table_from_file, table_from_shards
    from cellrank_fm.splits import split_cells
    from cellrank_fm.vocab import save_json_mapping

    path, adata = sim_h5ad
    _, vocab, medians = simulate_corpus(n_cells=400, n_genes=300, seed=4)
    local = tmp_path / "cells.h5ad"
    shutil.copy(path, local)
    save_json_mapping(vocab, tmp_path / "v.json")
    save_json_mapping(medians, tmp_path / "m.json")
    gene_set = list(adata.var_names[::3])
    (tmp_path / "set.txt").write_text("\n".join(gene_set) + "\n")
    shards = tmp_path / "shards"
    run(["tokenize", str(local), "--out", str(shards), "--vocab", str(tmp_path / "v.json"), "--medians",
          str(tmp_path / "m.json"), "--genes", str(tmp_path / "set.txt"), "--keep-obs", "cell_state", "-q"])
    t_sh, t_h5 = table_from_shards(shards), table_from_file(local)
    # Each shard row points at its own cell in the input file.
    names = list(adata.obs_names)
    assert [names[r] for r in t_sh.rows[:, 1]] == t_sh.cell_ids
    # Only the gene-set genes the tokenizer used are features.
    hvg = highly_variable_genes(t_sh, np.arange(len(t_sh.cell_ids)), 1000)
    assert set(hvg) <= set(gene_set) and len(hvg) > 50
    # Same seed, same cells in each split, whichever input the cells came from.
    kw = dict(label="cell_state", seed=5)
    a = split_cells(t_sh.cell_ids, t_sh.columns.__getitem__, t_sh.columns, **kw)
    b = split_cells(t_h5.cell_ids, t_h5.columns.__getitem__, t_h5.columns, **kw)
    for name in ("train", "validation", "test"):
        assert {t_sh.cell_ids[i] for i in a.indices(name)} == {t_h5.cell_ids[i] for i in b.indices(name)}
    # The counts must still be there.
    local.unlink()
    code, err = fails(["baseline", str(shards), "--label", "cell_state", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "is gone" in err
