"""The simulator: seeded, negative-binomial, planted markers and drivers where it says they are."""

from __future__ import annotations

import numpy as np
import pytest

from cellrank_fm.simulate import planted, simulate_corpus, synthetic_vocabulary


@pytest.fixture(scope="module")
def corpus():
    return simulate_corpus(n_cells=900, n_genes=300, seed=3)


def _dense(adata):
    return np.asarray(adata.X.toarray(), dtype=np.float64)


def test_same_seed_same_counts_other_seed_differs():
    a, va, ma = simulate_corpus(n_cells=60, n_genes=150, markers_per_state=5, n_drivers=5, seed=7)
    b, vb, mb = simulate_corpus(n_cells=60, n_genes=150, markers_per_state=5, n_drivers=5, seed=7)
    c, _, _ = simulate_corpus(n_cells=60, n_genes=150, markers_per_state=5, n_drivers=5, seed=8)
    assert (a.X != b.X).nnz == 0 and va == vb and ma == mb
    assert list(a.obs["cell_state"]) == list(b.obs["cell_state"])
    assert (a.X != c.X).nnz > 0


def test_layout_and_vocabulary(corpus):
    adata, vocab, medians = corpus
    assert adata.shape == (900, 300)
    assert set(adata.obs.columns) >= {"cell_state", "condition", "donor", "n_counts"}
    assert set(adata.obs["cell_state"]) == {"alpha", "beta", "gamma"}
    assert set(adata.obs["condition"]) == {"healthy", "disease"}
    assert list(vocab)[:2] == ["<pad>", "<mask>"] and len(vocab) == 302
    assert all(g in vocab and g in medians for g in adata.var_names)
    assert all(g.startswith("ENSG") and len(g) == 15 for g in adata.var_names)
    counts = _dense(adata)
    assert np.all(counts == np.round(counts)) and counts.min() >= 0
    np.testing.assert_allclose(adata.obs["n_counts"], counts.sum(1))
    # Medians are the nonzero medians of counts / total × 10,000.
    g = 17
    norm = counts[:, g] / counts.sum(1) * 1e4
    assert medians[adata.var_names[g]] == pytest.approx(np.median(norm[norm > 0]))
    v2 = synthetic_vocabulary(["ENSG00000900002", "ENSG00000900001"], "v2")
    assert v2 == {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "ENSG00000900001": 4, "ENSG00000900002": 5}


def test_planted_markers_and_drivers_are_up_where_planted(corpus):
    adata, _, _ = corpus
    truth = planted(adata)
    counts = _dense(adata)
    frac = counts / counts.sum(1, keepdims=True)
    cols = {g: i for i, g in enumerate(adata.var_names)}
    state = adata.obs["cell_state"].to_numpy()
    disease = adata.obs["condition"].to_numpy() == "disease"
    sets = [set(v) for v in truth["markers"].values()] + [set(truth["drivers"])]
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == 3 * 20 + 10  # disjoint
    for name, genes in truth["markers"].items():
        idx = [cols[g] for g in genes]
        inside = frac[state == name][:, idx].mean(0)
        outside = frac[state != name][:, idx].mean(0)
        assert np.all(inside / outside > 2.5), name  # planted folds 3.6–10 (diluted by renormalisation)
    idx = [cols[g] for g in truth["drivers"]]
    ratio = frac[disease][:, idx].mean(0) / frac[~disease][:, idx].mean(0)
    assert np.all(ratio > 2.5)
    # A gene outside every program is not differentially expressed between conditions.
    background = [i for i, g in enumerate(adata.var_names) if not any(g in s for s in sets)]
    folds = np.asarray(adata.uns["simulation"]["driver_folds"])
    assert folds.min() >= 6 * np.exp(-0.5) - 1e-9 and folds.max() <= 6 * np.exp(0.5) + 1e-9
    assert np.corrcoef(np.log(folds), np.log(ratio))[0, 1] > 0.5  # stronger planted fold, stronger effect
    bg_ratio = frac[disease][:, background].mean(0) / frac[~disease][:, background].mean(0)
    assert np.median(np.abs(np.log(bg_ratio))) < 0.15


def test_counts_are_overdispersed_and_library_sizes_realistic(corpus):
    adata, _, _ = corpus
    counts = _dense(adata)
    library = counts.sum(1)
    assert 3000 < np.median(library) < 7000 and library.max() / library.min() > 3
    # Within one state and donor, for the background genes, variance exceeds the mean
    # (negative binomial, not Poisson) after removing the library-size effect.
    truth = planted(adata)
    planted_genes = set(truth["drivers"]).union(*map(set, truth["markers"].values()))
    keep = np.array([g not in planted_genes for g in adata.var_names])
    rows = (adata.obs["cell_state"] == "alpha").to_numpy() & (adata.obs["donor"] == "donor_0").to_numpy()
    sub = counts[rows][:, keep]
    scaled = sub / library[rows, None] * np.median(library[rows])
    mean, var = scaled.mean(0), scaled.var(0)
    high = mean > 20
    assert high.sum() > 10
    assert np.median(var[high] / mean[high]) > 3.0
    # Gene means span orders of magnitude, as in real data.
    gene_means = counts.mean(0)
    assert np.percentile(gene_means, 95) / np.percentile(gene_means, 5) > 30


def test_genes_drawn_from_a_given_vocabulary_follow_its_medians():
    pool = [f"ENSG{900_000 + i:011d}" for i in range(1000)]
    vocab = synthetic_vocabulary(pool, "v2")
    rng = np.random.default_rng(0)
    medians = {g: float(m) for g, m in zip(pool, rng.lognormal(0, 1.5, size=len(pool)))}
    adata, v_out, m_out = simulate_corpus(n_cells=300, n_genes=200, vocabulary=vocab, medians=medians,
                                          symbols={g: f"SYM{i}" for i, g in enumerate(pool)}, seed=1)
    assert v_out == vocab and m_out == medians
    assert set(adata.var_names) <= set(pool) and adata.var["gene_symbol"].str.startswith("SYM").all()
    # Expression follows the given medians (rank correlation of gene means with medians).
    from scipy.stats import spearmanr

    means = np.asarray(adata.X.mean(0)).ravel()
    assert spearmanr(means, [medians[g] for g in adata.var_names]).correlation > 0.7


def test_h5ad_round_trip_keeps_ground_truth(tmp_path, corpus):
    import anndata as ad

    adata, _, _ = corpus
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert planted(back) == planted(adata)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="too small"):
        simulate_corpus(n_cells=50, n_genes=40)
    with pytest.raises(ValueError, match="model_version"):
        simulate_corpus(n_cells=50, n_genes=200, model_version="v3")
