"""In silico perturbation on simulated data: deleting the planted disease drivers heals cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellrank_fm.explain import Evaluator
from cellrank_fm.inference import load_cells, load_model
from cellrank_fm.perturb import _perturbed, perturb_cells, resolve_genes
from cellrank_fm.simulate import planted

from test_explain import _cli, finetuned_on_simulation


@pytest.fixture(scope="module")
def condition_model(tmp_path_factory):
    h5ad, model_dir, adata, metrics = finetuned_on_simulation(tmp_path_factory.mktemp("perturb"), "condition", epochs=6.0, seed=1)
    lm = load_model(model_dir, device="cpu")
    return h5ad, model_dir, adata, metrics, lm, load_cells(h5ad, lm)


def test_perturbed_sequences():
    genes = np.array([10, 11, 12, 13])
    pre, suf = np.array([2]), np.array([3])
    out = _perturbed(pre, genes, suf, [np.array([1]), np.array([0, 3])], "delete")
    assert [s.tolist() for s in out] == [[2, 10, 12, 13, 3], [2, 11, 12, 3]]
    out = _perturbed(pre, genes, suf, [np.array([2]), np.array([3, 1])], "overexpress")
    assert [s.tolist() for s in out] == [[2, 12, 10, 11, 13, 3], [2, 11, 13, 10, 12, 3]]


def test_deleting_drivers_moves_disease_cells_to_healthy_and_random_genes_do_not(condition_model):
    h5ad, _, adata, metrics, lm, cells = condition_model
    assert metrics["accuracy"] >= 0.9
    truth = planted(adata)
    ev = Evaluator(lm.model, lm.info)
    kw = dict(state_column="condition", start_state="disease", goal_state="healthy", max_cells=40,
              null_genes=30, seed=0, quiet=True)
    drivers = perturb_cells(ev, cells, genes=truth["drivers"], as_set=True, **kw).genes.iloc[0]
    assert drivers["n_cells"] == 40 and drivers["fdr"] < 0.05
    assert drivers["mean_shift_goal"] > 0.1 > abs(drivers["null_mean_shift_goal"])
    planted_genes = set(truth["drivers"]).union(*map(set, truth["markers"].values()))
    background = [g for g in adata.var_names if g not in planted_genes]
    rng = np.random.default_rng(3)
    random_set = rng.choice(background, size=len(truth["drivers"]), replace=False).tolist()
    control = perturb_cells(ev, cells, genes=random_set, as_set=True, **kw).genes.iloc[0]
    # Random genes do not move cells toward healthy: no shift, and not above the null (whose
    # random sets, in this 200-gene world, often contain a driver).
    assert abs(control["mean_shift_goal"]) < 0.01
    assert control["fdr"] > 0.05 or control["mean_shift_goal"] < control["null_mean_shift_goal"]
    assert drivers["mean_shift_goal"] > 100 * abs(control["mean_shift_goal"])


def test_cli_perturb_every_gene(condition_model, tmp_path, capsys):
    h5ad, model_dir, adata, _, _, _ = condition_model
    out = tmp_path / "pert"
    _cli("perturb", model_dir, h5ad, "--out", out, "--state-column", "condition", "--start-state", "disease",
         "--goal-state", "healthy", "--alt-states", "healthy", "--max-cells", 8, "--quiet", capsys=capsys)
    genes = pd.read_csv(out / "genes.csv")
    assert {"gene_id", "n_cells", "mean_shift_goal", "mean_shift_healthy", "p_value", "fdr"} <= set(genes.columns)
    assert (genes["fdr"].dropna() >= genes["p_value"].dropna().min() - 1e-12).all()
    shifts = pd.read_parquet(out / "shifts.parquet")
    assert shifts["cell_id"].nunique() == 8 and len(shifts) == genes["n_cells"].sum()
    np.testing.assert_allclose(shifts["shift_goal"], shifts["shift_healthy"])
    assert (out / "shifts.png").read_bytes()[:4] == b"\x89PNG"


def test_perturb_bad_input(condition_model, tmp_path, capsys):
    h5ad, model_dir, _, _, lm, _ = condition_model
    base = ["perturb", model_dir, h5ad, "--out", tmp_path / "o", "--state-column", "condition"]
    err = _cli(*base, "--start-state", "sick", "--goal-state", "healthy", check_rc=2, capsys=capsys)
    assert "start state 'sick' is not a value of 'condition'" in err
    err = _cli(*base, "--start-state", "disease", "--goal-state", "healthy", "--genes", "NOTAGENE1,ENSG00000000001",
               check_rc=2, capsys=capsys)
    assert "'NOTAGENE1' (and 1 more) is not in the model's vocabulary" in err
    assert not (tmp_path / "o").exists()
    gid = next(g for g in lm.vocabulary if g.startswith("ENSG"))
    assert resolve_genes([gid.lower() + ".7"], lm.vocabulary, None) == [gid]


def test_symbols_resolve_through_vocabulary_ids_only():
    vocab = {"<pad>": 0, "<mask>": 1, "ENSG00000187608": 2}
    # An input whose var_names are symbols maps each symbol to itself; that must not hide the real ID.
    symbols = {"ISG15": "ISG15", "ENSG00000187608": "ISG15"}
    assert resolve_genes(["isg15"], vocab, symbols) == ["ENSG00000187608"]


def test_shifts_equal_each_deletion_run_alone_through_transformers():
    """Ours (packed batches: copies of one cell at one length without padding, cells of different
    lengths padded together, the CPU token cap) against every perturbed cell run alone through
    `transformers.BertModel` with the same weights, as Geneformer's perturber computes it."""
    transformers = pytest.importorskip("transformers")
    import torch

    from cellrank_fm.checkpoint import ModelDirInfo
    from cellrank_fm.hf import to_transformers
    from cellrank_fm.inference import Cells
    from cellrank_fm.model import BertForSequenceClassification, preset_config

    torch.manual_seed(0)
    cfg = preset_config("tiny", vocab_size=64, num_labels=2, pooling="mean")
    model = BertForSequenceClassification(cfg).eval()
    info = ModelDirInfo(path=None, config=cfg, architecture=model.architecture, labels=["a", "b"],
                        cellrank={"special_tokens": {"pad": 0, "mask": 1}}, vocabulary={f"G{i}": i for i in range(64)})
    rng = np.random.default_rng(0)
    pool_ = rng.choice(np.arange(2, 64), size=12, replace=False)
    start = [rng.permutation(pool_), rng.permutation(pool_), pool_[:7]]
    goal = [rng.choice(np.arange(2, 64), size=10, replace=False) for _ in range(2)]
    ids = ["s0", "s1", "s2", "g0", "g1"]
    cells = Cells(tokens=start + goal, cell_ids=ids, obs=pd.DataFrame({"state": ["s"] * 3 + ["g"] * 2}, index=ids))
    # A 40-token budget puts copies of different cells (lengths 11 and 6) into one padded batch.
    got = perturb_cells(Evaluator(model, info, tokens_per_batch=40), cells, state_column="state", start_state="s",
                        goal_state="g", quiet=True).shifts

    hf = to_transformers(model, head="none")
    assert isinstance(hf, transformers.BertModel)

    def emb(tokens):
        with torch.inference_mode():
            return hf(input_ids=torch.as_tensor(tokens)[None]).last_hidden_state[0].mean(0)

    target = torch.stack([emb(g) for g in goal]).mean(0)
    cos = lambda a: torch.nn.functional.cosine_similarity(a, target, dim=0).item()  # noqa: E731
    want = {(c, f"G{t}"): cos(emb(np.delete(s, p))) - cos(emb(s)) for c, s in zip(ids, start) for p, t in enumerate(s)}
    assert len(got) == len(want) == 12 + 12 + 7
    diffs = [abs(s - want[(c, g)]) for c, g, s in zip(got["cell_id"], got["gene_id"], got["shift_goal"])]
    assert max(diffs) < 1e-5
    assert np.abs(got["shift_goal"]).max() > 1e-3  # the comparison is not between zeros


def test_rank_sum_against_a_sorted_null_equals_scipy():
    """The per-gene test against one presorted null gives scipy's p-values: continuous values,
    ties within and across the samples (rounded values), samples in the exact method's range."""
    from scipy.stats import mannwhitneyu

    from cellrank_fm.perturb import RankSumNull

    rng = np.random.default_rng(0)
    for decimals in (None, 2, 1):
        null = rng.normal(size=5000)
        # The last two are in the null (every gene's shifts pool into it): ties even when small.
        samples = [rng.normal(0.3, 1, size=n) for n in (2, 5, 9, 40, 700)] + [null[:30] + 0.0, null[40:43] + 0.0]
        if decimals is not None:
            null, samples = null.round(decimals), [s.round(decimals) for s in samples]
        test = RankSumNull(null)
        got = [test.pvalue(s) for s in samples]
        want = [mannwhitneyu(s, null, alternative="two-sided").pvalue for s in samples]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
        assert min(want) < 1e-6  # a shifted sample is told apart
