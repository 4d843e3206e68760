"""Pathway-level answers on planted ground truth: the pathway SHAP game (exact on small cells),
gene values aggregated against random sets, pathway perturbation and `score`'s recovery AUC."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

import cellrank_fm as cfm
from cellrank_fm.errors import UserError
from cellrank_fm.explain import Evaluator
from cellrank_fm.genesets import GeneSet, GeneSets
from cellrank_fm.inference import load_cells, load_model
from cellrank_fm.pathways import pathway_values
from cellrank_fm.score import Scorer
from cellrank_fm.simulate import planted, simulate_corpus, write_gmt


@pytest.fixture(scope="module")
def sim(tmp_path_factory, one_torch_thread):
    """Simulated cells whose states up-regulate named sets (+ decoys), and a tiny classifier of them."""
    from cellrank_fm.finetune import FinetuneOptions, finetune_cells
    from cellrank_fm.tokenize import Dictionaries, TokenizeSettings, tokenize_files

    root = tmp_path_factory.mktemp("pathways")
    adata, vocab, medians = simulate_corpus(n_cells=360, n_genes=200, markers_per_state=10, pathway_programs=True,
                                            pathway_extra=5, decoy_sets=6, seed=0)
    h5ad = root / "sim.h5ad"
    adata.write_h5ad(h5ad)
    gmt = root / "sets.gmt"
    write_gmt(adata, gmt, symbols=True)  # symbols, resolved through the model's symbol table
    settings = TokenizeSettings(model_version="v1", model_input_size=64, keep_obs=["cell_state", "condition"])
    tokenize_files([h5ad], root / "shards", Dictionaries(vocab, medians), settings, quiet=True)
    result = finetune_cells(root / "shards", root / "model", FinetuneOptions(
        label="cell_state", preset="tiny", epochs=3.0, lr=2e-3, tokens_per_batch=2048, patience=0, seed=0, quiet=True))
    return dict(root=root, h5ad=h5ad, gmt=gmt, adata=adata, model=root / "model", shards=root / "shards",
                truth=planted(adata), metrics=result["metrics"])


def test_simulator_writes_planted_sets_and_decoys(sim):
    truth = sim["truth"]
    sets = truth["gene_sets"]
    assert truth["planted_sets"] == {"alpha": "ALPHA_PROGRAM", "beta": "BETA_PROGRAM", "gamma": "GAMMA_PROGRAM",
                                     "disease": "DISEASE_PROGRAM"}
    assert set(truth["markers"]["alpha"]) < set(sets["ALPHA_PROGRAM"]) and len(sets["ALPHA_PROGRAM"]) == 15
    decoys = [n for n in sets if n.startswith("DECOY_")]
    assert len(decoys) == 6 and all(len(sets[d]) == 15 for d in decoys)
    programmes = set().union(*truth["markers"].values(), truth["drivers"])
    assert not any(programmes & set(sets[d]) for d in decoys)
    assert sim["metrics"]["macro_f1"] >= 0.95


# ----------------------------------------------------------------------------- the game


def _group_shapley(ev, tokens, token_sets, k):
    """Exact group Shapley values by brute force over every ordering of the sets (independent of
    `pathways`: genes removed one by one by name, the factorial formula not used)."""
    genes = [int(t) for t in tokens]
    playing = [i for i, ts in enumerate(token_sets) if set(ts) & set(genes)]

    def value(present):
        keep = [g for g in genes if not any(g in token_sets[i] for i in playing) or
                any(g in token_sets[i] for i in present)]
        return ev.logits([np.array(keep, dtype=np.int64)])[0, k]

    cache = {}

    def cached(present):
        key = tuple(sorted(present))
        if key not in cache:
            cache[key] = value(present)
        return cache[key]

    out = np.zeros(len(playing))
    orders = list(itertools.permutations(range(len(playing))))
    for order in orders:
        present = []
        before = cached([])
        for j in order:
            present.append(playing[j])
            after = cached(present)
            out[j] += after - before
            before = after
    return playing, out / len(orders)


def test_pathway_values_equal_exact_group_shapley_values(sim, monkeypatch):
    lm = load_model(sim["model"], device="cpu")
    cells = load_cells(sim["h5ad"], lm)
    ev = Evaluator(lm.model, lm.info)
    tokens = np.asarray(cells.tokens[0], dtype=np.int64)
    rng = np.random.default_rng(3)
    # Five overlapping sets over the cell's genes, plus one it does not express (not a player).
    token_sets = [np.sort(rng.choice(tokens, size=12, replace=False)) for _ in range(5)] + [np.array([10 ** 6])]
    playing, exact = _group_shapley(ev, tokens, [set(map(int, t)) for t in token_sets], 0)
    sv = pathway_values(ev, tokens, token_sets, [0], npermutations=4, seed=0)
    assert sv.exact and sv.players.tolist() == playing == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(sv.values[:, 0], exact, atol=1e-6)
    assert abs(sv.additivity_gap[0]) < 1e-6 and np.abs(exact).max() > 1e-3
    # Forced sampling (3 permutations cost fewer evaluations than the 2^5 coalitions): every
    # antithetic half adds up exactly, and the estimate lies within a few standard errors.
    monkeypatch.setattr("cellrank_fm.pathways.EXACT_MAX_SETS", 0)
    sampled = pathway_values(ev, tokens, token_sets, [0], npermutations=3, seed=1)
    assert not sampled.exact and abs(sampled.additivity_gap[0]) < 1e-5
    err = np.abs(sampled.values[:, 0] - exact)
    assert np.all(err <= 5 * sampled.stderr[:, 0] + 1e-4), (sampled.values[:, 0], exact, sampled.stderr[:, 0])


# ----------------------------------------------------------------------------- explain


@pytest.fixture(scope="module")
def explained(sim):
    return cfm.explain(sim["model"], sim["h5ad"], label="cell_state", per_class=8, method="gradient", samples=16,
                       permutations=4, gene_sets=sim["gmt"], progress=False)


def test_planted_set_ranks_first_by_pathway_shap_and_passes_fdr(sim, explained):
    imp = explained.pathways.importance
    assert list(imp.columns[:9]) == ["class", "pathway", "n_genes", "n_in_vocab", "mean_abs_shap", "mean_shap",
                                     "std_err", "p_value", "fdr"]
    for state, name in sim["truth"]["planted_sets"].items():
        if state == "disease":
            continue
        sub = imp[imp["class"] == state].sort_values("mean_abs_shap", ascending=False)
        assert sub["pathway"].iloc[0] == name, sub.head(4)
        assert sub.set_index("pathway").loc[name, "fdr"] < 0.05
        assert sub.set_index("pathway").loc[name, "mean_shap"] > 0  # the state's own programme raises its logit
        decoys = sub[sub["pathway"].str.startswith("DECOY_")]
        assert len(decoys) == 6 and (decoys["fdr"] >= 0.05).all(), decoys
        assert (decoys["n_in_vocab"] == 15).all()
    # Each cell's set values add up to the logit minus the no-set logit (exact or per half).
    assert explained.pathways.cells["additivity_gap"].abs().max() < 1e-4


def test_explain_writes_pathway_tables_and_plots(sim, explained, tmp_path):
    out = explained.write(tmp_path / "shap")
    table = pd.read_csv(out / "pathway_importance.csv")
    pd.testing.assert_frame_equal(table, pd.read_parquet(out / "pathway_importance.parquet"), check_dtype=False)
    assert {"pathway_heatmap.png", "top_pathways_alpha.png", "gene_sets.csv", "gene_importance.csv"} <= {
        p.name for p in out.iterdir()}


# ----------------------------------------------------------------------------- score


def test_recovery_auc_by_hand():
    vocab = {f"G{i}": i for i in range(10)}
    sets = GeneSets([GeneSet("A", "", "x", 2, ["G1", "G2"]), GeneSet("B", "", "x", 3, ["G5", "G7", "G9"])])
    scorer = Scorer(sets, vocab, max_rank=4, special_ids=[0])
    # Cell 1 ranks G1 G3 G2 G5 G7; cell 2 (with a special token first) ranks G9 G8 G7 G6 G5.
    out = scorer.score(np.array([1, 3, 2, 5, 7, 0, 9, 8, 7, 6, 5]), np.array([0, 5, 11]))
    # A in cell 1: ranks 1 and 3 → (4 + 2) / (4 + 3); B: rank 4 → 1 / (4 + 3 + 2).
    np.testing.assert_allclose(out[0], [6 / 7, 1 / 9], rtol=1e-6)
    # Cell 2: A absent; B at ranks 1 and 3 (G5 at rank 5 is past R) → (4 + 2) / 9.
    np.testing.assert_allclose(out[1], [0.0, 6 / 9], rtol=1e-6)


def test_score_puts_the_planted_set_first_for_its_state(sim):
    adata = sim["adata"].copy()
    assert cfm.score(adata, sim["gmt"], model=sim["model"], groupby="cell_state", progress=False) is None
    scores = pd.DataFrame(adata.obsm["cellrank_pathways"], columns=adata.uns["cellrank_pathways_names"])
    assert scores.shape == (adata.n_obs, 10) and np.isfinite(scores.to_numpy()).all()
    states = adata.obs["cell_state"].to_numpy()
    groups = adata.uns["cellrank_pathways_cell_state"]
    for state, name in sim["truth"]["planted_sets"].items():
        if state == "disease":
            continue
        means = scores[states == state].mean()
        assert means.idxmax() == name, means.sort_values().tail(3)
        mine = groups[groups["group"] == state].sort_values("difference", ascending=False)
        assert mine["pathway"].iloc[0] == name and mine["fdr"].iloc[0] < 1e-6
    decoys = groups[groups["pathway"].str.startswith("DECOY_")]
    assert (decoys["difference"].abs() < 0.05).all()
    # Disease cells: their drivers' set, not the decoys.
    disease = adata.obs["condition"].to_numpy() == "disease"
    assert (scores[disease].mean() - scores[~disease].mean()).idxmax() == "DISEASE_PROGRAM"


def test_score_from_shards_equals_score_from_counts(sim):
    from_counts = cfm.score(sim["h5ad"], sim["gmt"], model=sim["model"], copy=True, progress=False)
    from_shards = cfm.score(sim["shards"], sim["gmt"], progress=False)
    np.testing.assert_allclose(from_shards.obsm["cellrank_pathways"], from_counts.obsm["cellrank_pathways"], atol=1e-6)
    assert list(from_shards.obs["cell_state"]) == list(from_counts.obs["cell_state"])
    # Chunking does not change a score; a dict of sets reads like a file.
    sets = {k: v for k, v in sim["truth"]["gene_sets"].items() if k != "DECOY_06"}
    small = cfm.score(sim["shards"], sets, chunk_cells=7, auc_max_rank=10, key_added="k", progress=False)
    assert small.obsm["k"].shape == (len(from_shards), 9) and small.uns["k"]["auc_max_rank"] == 10


# ----------------------------------------------------------------------------- perturb


def test_deleting_the_planted_set_shifts_cells_and_decoys_do_not(sim):
    """Alpha cells lose the alpha programme and move toward beta; background decoys do not."""
    res = cfm.perturb(sim["model"], sim["h5ad"], state_column="cell_state", start_state="alpha", goal_state="beta",
                      gene_sets=sim["gmt"], sets="all", null_genes=20, max_cells=24, seed=0, progress=False)
    table = res.genes.set_index("pathway")
    assert len(table) == 10 and (table["n_in_vocab"] == 15).all()
    # The null: random expressed genes in none of the sets (the programmes' genes excluded).
    assert (table["null_pool"] == "outside every set").all()
    assert table.loc["ALPHA_PROGRAM", "fdr"] < 0.05
    # Without its own programme an alpha cell moves toward beta, far more than random sets move it.
    assert table.loc["ALPHA_PROGRAM", "mean_shift_goal"] > 5 * abs(table.loc["ALPHA_PROGRAM", "null_mean_shift_goal"])
    # Decoys do not move cells toward beta: none beyond its null with FDR < 0.05, and each one's
    # effect (shift minus null shift) is under 5% of the planted set's. (A fixed set of 15
    # background genes can still differ a little from random ones in either direction: in the
    # recorded run one decoy moved cells 0.015 further *away* from beta than random sets did,
    # FDR 0.02, against +0.63 for the planted set.)
    effect = table["mean_shift_goal"] - table["null_mean_shift_goal"]
    decoys = table.index.str.startswith("DECOY_")
    assert not ((effect[decoys] > 0) & (table.loc[decoys, "fdr"] < 0.05)).any(), table[decoys]
    assert (effect[decoys].abs() < 0.05 * effect["ALPHA_PROGRAM"]).all(), effect


# ----------------------------------------------------------------------------- errors and the CLI


def test_gene_set_errors_are_one_sentence(sim, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a,b,c\n")
    with pytest.raises(UserError, match="not a gene set file"):
        cfm.score(sim["shards"], bad, progress=False)
    with pytest.raises(UserError, match="'NOPE' is not in"):
        cfm.score(sim["shards"], sim["gmt"], sets="NOPE", progress=False)
    with pytest.raises(UserError, match="no gene set .* has 5 or more genes"):
        cfm.score(sim["shards"], {"S": ["NOTAGENE1", "NOTAGENE2"]}, progress=False)
    with pytest.raises(UserError, match="need --gene-sets"):
        cfm.perturb(sim["model"], sim["h5ad"], state_column="cell_state", start_state="alpha", goal_state="beta",
                    sets="ALPHA_PROGRAM", progress=False)
    with pytest.raises(UserError, match="not both"):
        cfm.perturb(sim["model"], sim["h5ad"], state_column="cell_state", start_state="alpha", goal_state="beta",
                    gene_sets=sim["gmt"], genes="G1", progress=False)


def test_cli_score_and_explain_end_to_end(sim, tmp_path, capsys):
    from cli_helpers import fails, run

    out = tmp_path / "scored.h5ad"
    run(["score", sim["h5ad"], "--gene-sets", sim["gmt"], "--model", sim["model"], "--groupby", "cell_state",
         "--out", out, "-q"])
    import anndata as ad

    scored = ad.read_h5ad(out)
    assert scored.obsm["cellrank_pathways"].shape == (sim["adata"].n_obs, 10)
    assert scored.X.shape == sim["adata"].shape  # the input's matrix is carried over
    table = pd.read_csv(tmp_path / "scored.cell_state.pathways.csv")
    assert table.iloc[0]["fdr"] < 1e-6 and (tmp_path / "scored.cell_state.heatmap.png").stat().st_size > 1000
    run(["explain", sim["model"], sim["h5ad"], "--out", tmp_path / "shap", "--label", "cell_state", "--per-class", "2",
         "--method", "gradient", "--samples", "8", "--permutations", "2", "--gene-sets", sim["gmt"], "-q"])
    assert list(pd.read_csv(tmp_path / "shap" / "pathway_importance.csv").columns[:9]) == [
        "class", "pathway", "n_genes", "n_in_vocab", "mean_abs_shap", "mean_shap", "std_err", "p_value", "fdr"]
    code, err = fails(["score", sim["h5ad"], "--gene-sets", sim["gmt"], "--model", sim["model"], "--sets", "NOPE",
                       "--out", tmp_path / "x.h5ad", "-q"], capsys)
    assert code == 2 and "'NOPE' is not in" in err and not (tmp_path / "x.h5ad").exists()
    code, err = fails(["score", sim["h5ad"], "--gene-sets", sim["gmt"], "--out", tmp_path / "y.h5ad"], capsys)
    assert code == 2 and "--vocab and --medians" in err
    code, err = fails(["perturb", sim["model"], sim["h5ad"], "--out", tmp_path / "p", "--state-column", "cell_state",
                       "--start-state", "alpha", "--goal-state", "beta", "--gene-sets", tmp_path / "none.gmt"], capsys)
    assert code == 2 and "does not exist" in err


# ----------------------------------------------------------------------------- real cells


ISG = ["ISG15", "IFI6", "IFIT1", "IFIT2", "IFIT3", "MX1", "MX2", "OAS1", "OAS2", "OAS3", "OASL", "RSAD2", "IFI44",
       "IFI44L", "IFITM3", "STAT1", "IRF7", "ISG20", "HERC5", "XAF1", "LY6E", "EPSTI1", "CMPK2", "IFI35", "PLSCR1"]
# Unrelated sets of similar size: ribosome, glycolysis, cell cycle, MHC class II, T-cell receptor, platelet.
OTHER = {
    "RIBOSOME": ["RPL3", "RPL4", "RPL5", "RPL7", "RPL8", "RPL10", "RPL11", "RPL13", "RPL18", "RPL19", "RPL21", "RPL23",
                 "RPL27", "RPL30", "RPL32", "RPS2", "RPS3", "RPS4X", "RPS5", "RPS6", "RPS8", "RPS12", "RPS14", "RPS18",
                 "RPS19"],
    "GLYCOLYSIS": ["HK1", "HK2", "GPI", "PFKL", "PFKP", "ALDOA", "TPI1", "GAPDH", "PGK1", "PGAM1", "ENO1", "PKM", "LDHA",
                   "LDHB", "PFKM", "ALDOC", "ENO2", "SLC2A1", "SLC2A3", "PGM1", "GALM", "HK3", "MINPP1", "BPGM", "ADPGK"],
    "CELL_CYCLE": ["MKI67", "TOP2A", "CCNB1", "CCNB2", "CDK1", "CDC20", "BUB1", "BUB1B", "PLK1", "AURKA", "AURKB",
                   "CENPF", "CENPE", "KIF11", "KIF2C", "TPX2", "NUSAP1", "PRC1", "UBE2C", "CCNA2", "MCM2", "MCM3",
                   "PCNA", "TYMS", "RRM2"],
    "MHC_II": ["HLA-DRA", "HLA-DRB1", "HLA-DRB5", "HLA-DPA1", "HLA-DPB1", "HLA-DQA1", "HLA-DQB1", "HLA-DMA", "HLA-DMB",
               "CD74", "CIITA", "CTSS", "CTSB", "LGMN", "IFI30"],
    "TCR": ["CD3D", "CD3E", "CD3G", "CD247", "ZAP70", "LCK", "LAT", "ITK", "CD2", "CD5", "CD6", "CD28", "TRAC", "TRBC1",
            "TRBC2", "LCP2", "FYN", "CD4", "CD8A", "CD8B"],
    "PLATELET": ["PPBP", "PF4", "GP9", "ITGA2B", "GP1BA", "GP1BB", "TUBB1", "SPARC", "CLU", "GNG11", "TREML1", "NRGN",
                 "MYL9", "CAVIN2", "F13A1"],
}


def test_score_on_kang_pbmcs_puts_the_interferon_set_first_for_stim(shared_data, tmp_path):
    geneformer = shared_data / "geneformer"
    kang = cfm.score(shared_data / "sc" / "kang2017_pbmc_ifnb_2k.h5ad", {"INTERFERON_RESPONSE": ISG, **OTHER},
                     vocab=geneformer / "token_dictionary_gc30M.pkl", medians=geneformer / "gene_median_dictionary_gc30M.pkl",
                     gene_map=[geneformer / "gene_name_id_dict_gc30M.pkl"], groupby="condition", copy=True,
                     progress=False)
    groups = kang.uns["cellrank_pathways_condition"]
    stim = groups[groups["group"] == "stim"].sort_values("difference", ascending=False)
    assert stim["pathway"].iloc[0] == "INTERFERON_RESPONSE" and stim["fdr"].iloc[0] < 1e-10, stim
    # Interferon dominates the shift: larger than any other set's by a wide margin.
    assert stim["difference"].iloc[0] > 3 * abs(stim["difference"].iloc[1:]).max()
    assert kang.uns["cellrank_pathways"]["n_in_vocab"][0] >= 20


def test_explain_on_kang_ranks_the_interferon_set_first(quality_models, quality_shards, one_torch_thread):
    """The default Kang classifier (`test_quality`'s, seed 0): pathway SHAP over the same sets puts
    the interferon response first for both classes, raising `stim` and lowering `ctrl`, far ahead
    of the unrelated sets, and the gene-value aggregation finds only it."""
    tmp, _ = quality_shards
    res = cfm.explain(quality_models["kang", 0]["model"], tmp / "kang2017_pbmc_ifnb_2k", label="condition",
                      per_class=6, method="gradient", samples=8, gene_sets={"INTERFERON_RESPONSE": ISG, **OTHER},
                      progress=False)
    imp = res.pathways.importance
    for cls, sign in (("stim", 1), ("ctrl", -1)):
        sub = imp[imp["class"] == cls].sort_values("mean_abs_shap", ascending=False).set_index("pathway")
        print(cls, sub[["n_in_vocab", "mean_abs_shap", "mean_shap", "fdr"]].to_string(), sep="\n")
        assert sub.index[0] == "INTERFERON_RESPONSE"
        ifn = sub.loc["INTERFERON_RESPONSE"]
        assert sign * ifn["mean_shap"] > 0 and ifn["fdr"] < 0.05
        assert ifn["mean_abs_shap"] > 2 * sub["mean_abs_shap"].iloc[1]
        assert (sub["fdr"].drop("INTERFERON_RESPONSE").dropna() >= 0.05).all()
    assert res.pathways.cells["additivity_gap"].abs().max() < 1e-4


# Literature markers of the Seurat-tutorial PBMC types (the tutorial's own first, then alternates
# from the Azimuth PBMC reference). Pan-T genes (CD3D/E) and CD74 are left out; HLA class II genes
# count only for B cells and DC, the antigen-presenting types (both pass without them too).
PBMC_MARKERS = {
    "CD14+ Mono": ["CD14", "LYZ", "S100A8", "S100A9", "S100A12", "FCN1", "VCAN", "CST3", "LGALS2", "CD68", "MNDA"],
    "FCGR3A+ Mono": ["FCGR3A", "MS4A7", "CDKN1C", "LST1", "AIF1", "IFITM2", "RHOC", "FCER1G", "HES4", "CX3CR1"],
    "B": ["MS4A1", "CD79A", "CD79B", "CD19", "CD22", "TCL1A", "BANK1", "LINC00926", "VPREB3", "IGHM", "IGHD",
          "HLA-DQA1"],
    "NK": ["NKG7", "GNLY", "GZMB", "PRF1", "GZMA", "KLRD1", "KLRF1", "CTSW", "CST7", "GZMH", "FGFBP2", "SPON2",
           "FCGR3A"],
    "CD8 T": ["CD8A", "CD8B", "CCL5", "GZMK", "GZMH", "NKG7", "CST7", "GZMA", "KLRG1"],
    "Naive CD4 T": ["IL7R", "CCR7", "LEF1", "SELL", "TCF7", "CD4", "MAL", "NOSIP", "PIK3IP1", "FHIT"],
    "Memory CD4 T": ["IL7R", "S100A4", "CD4", "AQP3", "ITGB1", "LTB", "IL32", "ANXA1", "GPR183", "CD40LG"],
    "DC": ["FCER1A", "CST3", "CLEC10A", "CD1C", "HLA-DQA1", "HLA-DQB1", "HLA-DPB1", "CLEC4C", "LILRA4", "SERPINF1"],
    "Platelet": ["PPBP", "PF4", "GNG11", "SPARC", "ITGA2B", "GP9", "TUBB1", "CLU", "SDPR", "NRGN", "GP1BB"],
}


def test_top_genes_of_pbmc_types_hold_their_markers(quality_models, quality_shards, one_torch_thread):
    """The best default pbmc3k classifier (`test_quality`'s seeds) of those that meet the quality
    bound on their own split (macro-F1 at most 0.02 below the token probe and 0.05 below LR):
    each type's top 20 genes by mean |SHAP| (gradient method, the default value: the class
    logit) hold a literature marker of that type for at least 7 of the 9 types."""
    good = [r for r in quality_models.task("pbmc3k")
            if r["f1"] >= r["probe"] - 0.02 and r["f1"] >= r["lr"] - 0.05]
    if not good:
        pytest.skip("no pbmc3k seed meets the quality bound on its own split; see test_quality")
    best = max(good, key=lambda r: r["f1"])
    print(f"explaining {best['model'].name}: macro-F1 {best['f1']:.3f}, LR {best['lr']:.3f}, probe {best['probe']:.3f}")
    tmp, _ = quality_shards
    res = cfm.explain(best["model"], tmp / "pbmc3k_seurat_labels", label="cell_type",
                      per_class=8, method="gradient", samples=12, progress=False)
    assert res.classes == sorted(PBMC_MARKERS)
    found = {}
    for cls in res.classes:
        top = res.top_genes(cls, 20)
        found[cls] = [g for g in top if g in PBMC_MARKERS[cls]]
        print(f"{cls:13s} markers {found[cls]}; top 20: {' '.join(top)}")
    assert sum(bool(f) for f in found.values()) >= 7, found
    # The unmistakable types are carried by their canonical markers, not by chance hits.
    assert {"CD79A", "CD79B"} <= set(found["B"]) and {"NKG7", "GNLY"} <= set(found["NK"])
    assert {"PF4", "PPBP"} & set(found["Platelet"]) and "CD14" in found["CD14+ Mono"]
