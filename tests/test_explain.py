"""SHAP over the gene-deletion game, checked against planted ground truth and exact Shapley values."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellrank_fm.explain import Evaluator, coalition_sequences, explain_cells, permutation_values, top_genes
from cellrank_fm.inference import load_cells, load_model
from cellrank_fm.simulate import planted, simulate_corpus


def finetuned_on_simulation(root: Path, label: str, *, n_cells: int = 360, epochs: float = 3.0, seed: int = 0):
    """Simulate → h5ad → shards (top 64 genes) → a fine-tuned tiny classifier, through the package."""
    from cellrank_fm.finetune import FinetuneOptions, finetune_cells
    from cellrank_fm.tokenize import Dictionaries, TokenizeSettings, tokenize_files

    adata, vocab, medians = simulate_corpus(n_cells=n_cells, n_genes=200, seed=seed)
    h5ad = root / "sim.h5ad"
    adata.write_h5ad(h5ad)
    settings = TokenizeSettings(model_version="v1", model_input_size=64, keep_obs=["cell_state", "condition", "donor"])
    tokenize_files([h5ad], root / "shards", Dictionaries(vocab, medians), settings, quiet=True)
    result = finetune_cells(root / "shards", root / "model", FinetuneOptions(
        label=label, preset="tiny", epochs=epochs, lr=2e-3, tokens_per_batch=2048, patience=0, seed=seed, quiet=True))
    return h5ad, root / "model", adata, result["metrics"]


@pytest.fixture(scope="module")
def state_model(tmp_path_factory):
    return finetuned_on_simulation(tmp_path_factory.mktemp("explain"), "cell_state")


@pytest.fixture(scope="module")
def loaded(state_model):
    h5ad, model_dir, adata, _ = state_model
    lm = load_model(model_dir, device="cpu")
    return lm, load_cells(h5ad, lm), adata


def test_tiny_model_classifies_simulated_states(state_model):
    metrics = state_model[3]
    assert metrics["accuracy"] >= 0.95 and metrics["macro_f1"] >= 0.95


def test_coalitions_keep_gene_order_and_special_tokens():
    genes = np.array([10, 11, 12, 13])
    masks = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]], dtype=bool)
    v1 = coalition_sequences(np.array([], dtype=np.int64), genes, np.array([], dtype=np.int64), masks)
    assert [s.tolist() for s in v1] == [[10, 12, 13], [], [11, 13]]
    v2 = coalition_sequences(np.array([2]), genes, np.array([3]), masks)
    assert [s.tolist() for s in v2] == [[2, 10, 12, 13, 3], [2, 3], [2, 11, 13, 3]]


def test_permutation_values_match_exact_shapley_values(loaded):
    """On a 6-gene cell every coalition can be enumerated: the sampled values must match."""
    lm, cells, _ = loaded
    ev = Evaluator(lm.model, lm.info)
    tokens = np.asarray(cells.tokens[0][:6], dtype=np.int64)
    k = 0
    n = len(tokens)
    masks = np.array(list(itertools.product([False, True], repeat=n)), dtype=bool)
    value = dict(zip(map(tuple, masks), ev.logits(coalition_sequences(tokens[:0], tokens, tokens[:0], masks))[:, k]))
    exact = np.zeros(n)
    for mask in masks:
        for i in np.flatnonzero(~mask):
            s = int(mask.sum())
            with_i = mask.copy()
            with_i[i] = True
            weight = math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
            exact[i] += weight * (value[tuple(with_i)] - value[tuple(mask)])
    cv = permutation_values(ev, tokens, [k], npermutations=100, seed=1)
    assert cv.values.shape == (n, 1)
    # Empty V1 cell: the head applied to a zero pooled vector; full cell: the model's logit.
    assert cv.base[0] == pytest.approx(value[(False,) * n], abs=1e-5)
    assert cv.full[0] == pytest.approx(value[(True,) * n], abs=1e-5)
    assert abs(cv.additivity_gap[0]) < 1e-4
    err = np.abs(cv.values[:, 0] - exact)
    assert np.all(err <= 5 * cv.stderr[:, 0] + 2e-4), (cv.values[:, 0], exact, cv.stderr[:, 0])
    assert np.abs(exact).max() > 5 * err.max()  # the comparison is not between near-zeros


def test_top_genes_are_planted_markers_for_both_methods(loaded):
    lm, cells, adata = loaded
    truth = planted(adata)
    ev = Evaluator(lm.model, lm.info)
    # Small samples keep this quick: 4 cells × 2 permutations leave the permutation ranking
    # noisy, so here it must only be strongly enriched (chance: 1 in 10); the slow test below
    # checks the acceptance figure (≥ 9 of 10 for both methods) with 20 cells × 4 permutations.
    for method, per_class, need in [("gradient", 6, 9), ("permutation", 4, 6)]:
        res = explain_cells(ev, cells, method=method, label_column="cell_state", per_class=per_class,
                      npermutations=2, nsamples=32, seed=0, quiet=True)
        for cls in lm.info.labels:
            top = top_genes(res.importance, cls, 10)
            hits = sum(g in truth["markers"][cls] for g in top)
            assert hits >= need, (method, cls, hits)
        imp = res.importance
        # Absent genes count as 0 in the mean over the class's cells.
        row = imp.iloc[0]
        assert row["mean_abs_shap"] * row["n_cells"] == pytest.approx(
            res.values.loc[(res.values["class"] == row["class"]) & (res.values["gene_id"] == row["gene_id"])
                           & res.values["cell_id"].isin(res.cells.loc[res.cells["group"] == row["class"], "cell_id"]),
                           "shap_value"].abs().sum())
        assert set(res.cells["group"].value_counts()) == {per_class}
    # Permutation values add up to f(x) − f(∅) in every cell; gradient values approximately.
    assert res.cells["additivity_gap"].abs().max() < 1e-3
    assert (res.cells["median_stderr"] > 0).all()


def _cli(*args, check_rc=0, capsys=None):
    """Run the `cellrank` entry point in-process; check its exit code; return its stderr."""
    from cli_helpers import exit_code

    rc = exit_code(args)
    err = capsys.readouterr().err if capsys is not None else ""
    assert rc == check_rc, err
    return err


def test_cli_explain_writes_tables_and_plots(state_model, tmp_path, capsys):
    h5ad, model_dir, adata, _ = state_model
    out = tmp_path / "shap"
    _cli("explain", model_dir, h5ad, "--out", out, "--method", "gradient", "--per-class", 2,
         "--samples", 16, "--label", "cell_state", "--quiet", capsys=capsys)
    values = pd.read_parquet(out / "shap_values.parquet")
    assert list(values.columns[:7]) == ["cell_id", "class", "gene_id", "gene_symbol", "rank", "shap_value", "shap_stderr"]
    assert values["cell_id"].nunique() == 6 and values["rank"].min() == 1
    assert values["gene_symbol"].str.match(r"^(ALPHA|BETA|GAMMA|DRIVER|G\d)").all()  # symbols from the input var
    imp = pd.read_csv(out / "gene_importance.csv")
    assert {"mean_abs_shap", "mean_shap", "fraction_expressing", "mean_shap_expressing"} <= set(imp.columns)
    for name in ["heatmap.png", "top_genes_alpha.png", "beeswarm_gamma.png"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_input_exits_2(state_model, tmp_path, capsys):
    h5ad, model_dir, _, _ = state_model
    err = _cli("explain", model_dir, h5ad, "--out", tmp_path / "o", "--classes", "delta", check_rc=2, capsys=capsys)
    assert "not a class of this model" in err and "Traceback" not in err
    err = _cli("explain", model_dir, h5ad, "--out", tmp_path / "o", "--label", "donor", check_rc=2, capsys=capsys)
    assert "not a class of this model" in err
    # A pretrained model (no classification head).
    from cellrank_fm.checkpoint import load_model_dir, save_model_dir
    from cellrank_fm.model import BertForMaskedLM

    clf, info = load_model_dir(model_dir)
    mlm = BertForMaskedLM(clf.config)
    save_model_dir(mlm, tmp_path / "mlm", info.vocabulary, info.medians, extra_config=info.cellrank)
    err = _cli("explain", tmp_path / "mlm", h5ad, "--out", tmp_path / "o", check_rc=2, capsys=capsys)
    assert "no cell classification head" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_marker_recovery_and_method_agreement_at_scale(loaded):
    """The acceptance figures: ≥ 9 of the top 10 are markers and Spearman ≥ 0.8 over the top 50."""
    from scipy.stats import spearmanr

    lm, cells, adata = loaded
    truth = planted(adata)
    ev = Evaluator(lm.model, lm.info)
    res = {m: explain_cells(ev, cells, method=m, label_column="cell_state", per_class=20, npermutations=4,
                      nsamples=64, seed=0, quiet=True) for m in ("permutation", "gradient")}
    for cls in lm.info.labels:
        for m, r in res.items():
            assert sum(g in truth["markers"][cls] for g in top_genes(r.importance, cls, 10)) >= 9, (m, cls)
        p = res["permutation"].importance.query("`class` == @cls").set_index("gene_id")["mean_abs_shap"]
        g = res["gradient"].importance.query("`class` == @cls").set_index("gene_id")["mean_abs_shap"]
        top = p.sort_values(ascending=False).index[:50]
        rho = spearmanr(p[top], g.reindex(top).fillna(0.0)).correlation
        assert rho >= 0.8, (cls, rho)
