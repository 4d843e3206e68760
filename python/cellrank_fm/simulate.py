"""Simulated raw-count corpora with planted ground truth.

The simulator draws negative-binomial counts for cells in several states. Each state has a
*marker program* — a set of genes up-regulated in that state — and a fraction of cells carry a
*disease* condition with planted *driver* genes up-regulated on top of their state's program.
The planted genes are recorded in ``adata.uns["simulation"]`` so that gene-importance methods
(`cellrank explain`) and in silico perturbation (`cellrank perturb`) can be checked against the
truth: the markers of a state should decide that state, and deleting the drivers from disease
cells should move them toward healthy cells.

Counts model, per cell c and gene g::

    base_g        gene-wise mean profile (log-normal, or proportional to given medians)
    fold_cg       fold_g ** activity_c for the markers of c's state and for drivers in
                  disease cells, else 1; fold_g = marker_fold (driver_fold) times a
                  gene-specific factor exp(U(-fold_spread, fold_spread)), so planted genes
                  differ in strength as real markers do
    donor_dg      mild log-normal donor effect per gene
    mu_cg         library_c * base_g * fold_cg * donor_dg / sum_g(...)
    x_cg          ~ NegativeBinomial(mean mu_cg, dispersion 1 / size)   (gamma-Poisson)

with library sizes log-normal around `library_size`. Everything random comes from one seed.

Pathway programs (`pathway_programs=True`) name each programme as a gene set — a state's set
is its markers plus `pathway_extra` background genes the state does not change (real pathways
hold unresponsive members too), the disease set likewise with the drivers — and add
`decoy_sets` sets of as many background genes; `write_gmt` writes them all as a GMT file. The
sets are drawn after the counts from their own stream, so the counts do not change.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

PLANTED_KEY = "simulation"

_V1_SPECIALS = {"<pad>": 0, "<mask>": 1}
_V2_SPECIALS = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}


def synthetic_gene_ids(n_genes: int, *, seed: int = 0) -> list[str]:
    """Well-formed human Ensembl-style gene IDs, distinct and sorted, for offline use.

    They are drawn from ENSG00000900000 upward, a range no real human gene uses (real IDs end
    near ENSG00000310000), so a synthetic gene is never mistaken for a real one.
    """
    rng = np.random.default_rng(seed)
    numbers = 900_000 + rng.choice(np.arange(99_999), size=n_genes, replace=False)
    return [f"ENSG{int(x):011d}" for x in np.sort(numbers)]


def synthetic_vocabulary(gene_ids: Sequence[str], model_version: str = "v1") -> dict[str, int]:
    """A token dictionary in Geneformer's layout: special tokens first, then the genes sorted."""
    specials = _specials(model_version)
    vocab = dict(specials)
    for gid in sorted(gene_ids):
        vocab[gid] = len(vocab)
    return vocab


def simulate_corpus(
    n_cells: int = 1200,
    n_genes: int = 400,
    *,
    states: Sequence[str] = ("alpha", "beta", "gamma"),
    markers_per_state: int = 20,
    n_drivers: int = 10,
    disease_fraction: float = 0.5,
    n_donors: int = 4,
    marker_fold: float = 6.0,
    driver_fold: float = 6.0,
    fold_spread: float = 0.5,
    library_size: float = 5000.0,
    library_sigma: float = 0.35,
    nb_size: float = 3.0,
    gene_mean_sigma: float = 1.2,
    donor_sigma: float = 0.1,
    vocabulary: Mapping[str, int] | None = None,
    medians: Mapping[str, float] | None = None,
    symbols: Mapping[str, str] | None = None,
    model_version: str = "v1",
    pathway_programs: bool = False,
    pathway_extra: int = 5,
    decoy_sets: int = 6,
    seed: int = 0,
):
    """Simulate raw counts with planted marker programs and disease drivers.

    Returns ``(adata, vocabulary, medians)``:

    - ``adata``: AnnData, cells × `n_genes`, raw integer counts (float32 CSR) with
      ``var_names`` = Ensembl IDs, ``var["ensembl_id"]``, ``var["gene_symbol"]``;
      ``obs["cell_state"]`` (one of `states`), ``obs["condition"]`` (``healthy`` or
      ``disease``), ``obs["donor"]``, ``obs["n_counts"]``; ``uns["simulation"]`` with
      ``markers`` {state: [gene IDs]}, ``drivers`` [gene IDs], ``marker_symbols``,
      ``driver_symbols``, the planted fold changes (``marker_folds``, ``driver_folds``) and
      the settings; with `pathway_programs`, ``gene_sets`` {name: [gene IDs]} and
      ``planted_sets`` {state or "disease": set name}.
    - ``vocabulary``: the token dictionary to tokenize with. When `vocabulary` is given the
      genes are drawn from it (seeded) and it is returned unchanged; otherwise a synthetic
      vocabulary over the simulated genes (Geneformer layout for `model_version`).
    - ``medians``: gene → nonzero median of counts/total×10,000. The given `medians` when
      passed (the simulated genes' mean profile then follows them, so their scale is
      realistic); otherwise computed from the simulated cells themselves.

    Markers and drivers are disjoint and drawn from genes of middle abundance (10th–90th
    percentile of the mean profile), so an up-regulated gene moves up the rank order without
    starting at the top.
    """
    if n_cells < len(states) or not states:
        raise ValueError("need at least one cell per state")
    n_planted = markers_per_state * len(states) + n_drivers
    if n_genes < 2 * n_planted:
        raise ValueError(f"n_genes={n_genes} is too small for {n_planted} planted genes (need twice as many)")
    if not 0.0 <= disease_fraction <= 1.0:
        raise ValueError("disease_fraction must be between 0 and 1")
    rng = np.random.default_rng(seed)

    # Genes: drawn from the given vocabulary, or synthetic IDs.
    if vocabulary is not None:
        pool = [g for g in vocabulary if not g.startswith("<")]
        if medians is not None:
            pool = [g for g in pool if g in medians and np.isfinite(medians[g]) and medians[g] > 0]
        if len(pool) < n_genes:
            raise ValueError(f"the vocabulary has only {len(pool)} usable genes; asked for {n_genes}")
        gene_ids = sorted(rng.choice(np.array(pool, dtype=object), size=n_genes, replace=False).tolist())
        vocab_out = dict(vocabulary)
    else:
        gene_ids = synthetic_gene_ids(n_genes, seed=int(rng.integers(2**31)))
        vocab_out = synthetic_vocabulary(gene_ids, model_version)

    # Gene-wise mean profile: log-normal, or following the given medians.
    if medians is not None and vocabulary is not None:
        base = np.array([medians[g] for g in gene_ids], dtype=np.float64)
        base = base * rng.lognormal(0.0, 0.3, size=n_genes)
    else:
        base = rng.lognormal(0.0, gene_mean_sigma, size=n_genes)
    base /= base.sum()

    # Planted programs: disjoint sets of middle-abundance genes.
    order = np.argsort(base)
    middle = order[int(0.1 * n_genes): int(0.9 * n_genes)]
    if len(middle) < n_planted:
        middle = order
    chosen = rng.choice(middle, size=n_planted, replace=False)
    marker_idx = {
        s: np.sort(chosen[i * markers_per_state:(i + 1) * markers_per_state]) for i, s in enumerate(states)
    }
    driver_idx = np.sort(chosen[len(states) * markers_per_state:])

    # Cells: balanced states, a disease fraction within each state, donors at random.
    state_of = np.arange(n_cells) % len(states)
    rng.shuffle(state_of)
    disease = rng.random(n_cells) < disease_fraction
    donor_of = rng.integers(0, n_donors, size=n_cells)
    library = library_size * rng.lognormal(0.0, library_sigma, size=n_cells)
    donor_effect = rng.lognormal(0.0, donor_sigma, size=(n_donors, n_genes))

    gene_fold = np.ones(n_genes)
    for idx in marker_idx.values():
        gene_fold[idx] = marker_fold
    gene_fold[driver_idx] = driver_fold
    gene_fold *= np.exp(rng.uniform(-fold_spread, fold_spread, size=n_genes))
    log_fold = np.zeros((n_cells, n_genes))
    activity = np.clip(rng.normal(1.0, 0.2, size=n_cells), 0.4, 1.6)  # how strongly each cell runs its program
    for k, s in enumerate(states):
        rows = np.flatnonzero(state_of == k)
        log_fold[np.ix_(rows, marker_idx[s])] = np.log(gene_fold[marker_idx[s]]) * activity[rows, None]
    rows = np.flatnonzero(disease)
    driver_activity = np.clip(rng.normal(1.0, 0.2, size=len(rows)), 0.4, 1.6)
    log_fold[np.ix_(rows, driver_idx)] = np.log(gene_fold[driver_idx]) * driver_activity[:, None]

    profile = base[None, :] * np.exp(log_fold) * donor_effect[donor_of]
    mu = library[:, None] * profile / profile.sum(axis=1, keepdims=True)
    counts = rng.poisson(rng.gamma(nb_size, mu / nb_size)).astype(np.float32)

    gene_symbols = _symbols(gene_ids, marker_idx, driver_idx, symbols)
    if medians is not None and vocabulary is not None:
        medians_out = dict(medians)
    else:
        medians_out = _nonzero_medians(counts, gene_ids)

    adata = _to_anndata(
        counts, gene_ids, gene_symbols, states, state_of, disease, donor_of, marker_idx, driver_idx, gene_fold,
        settings=dict(
            n_cells=n_cells, n_genes=n_genes, markers_per_state=markers_per_state, n_drivers=n_drivers,
            disease_fraction=disease_fraction, n_donors=n_donors, marker_fold=marker_fold,
            driver_fold=driver_fold, fold_spread=fold_spread, library_size=library_size, library_sigma=library_sigma,
            nb_size=nb_size, gene_mean_sigma=gene_mean_sigma, donor_sigma=donor_sigma,
            model_version=model_version, seed=seed,
            vocabulary="given" if vocabulary is not None else "synthetic",
            pathway_programs=pathway_programs, pathway_extra=pathway_extra, decoy_sets=decoy_sets,
        ),
    )
    if pathway_programs:
        adata.uns[PLANTED_KEY].update(_pathway_sets(gene_ids, marker_idx, driver_idx, pathway_extra, decoy_sets,
                                                    np.random.default_rng([seed, 1])))
    return adata, vocab_out, medians_out


def _pathway_sets(gene_ids, marker_idx, driver_idx, extra: int, decoys: int, rng) -> dict:
    """Named gene sets: each programme plus `extra` unchanged background genes, and decoys of
    background genes of the same size (decoys may overlap one another, as real sets do)."""
    ids = np.asarray(gene_ids, dtype=object)
    planted_idx = np.concatenate([*marker_idx.values(), driver_idx])
    background = np.setdiff1d(np.arange(len(gene_ids)), planted_idx)
    sets, names = {}, {}
    programmes = {**marker_idx, "disease": driver_idx}
    for state, idx in programmes.items():
        if len(idx) == 0:
            continue
        name = f"{str(state).upper()}_PROGRAM"
        more = rng.choice(background, size=min(extra, len(background)), replace=False)
        sets[name] = ids[np.sort(np.concatenate([idx, more]))].tolist()
        names[str(state)] = name
    size = len(next(iter(sets.values()))) if sets else 0
    for j in range(decoys):
        sets[f"DECOY_{j + 1:02d}"] = ids[np.sort(rng.choice(background, size=min(size, len(background)),
                                                            replace=False))].tolist()
    return {"gene_sets": sets, "planted_sets": names}


def write_gmt(adata, path, symbols: bool = False) -> None:
    """The simulated gene sets (`pathway_programs=True`) as a GMT file, Ensembl IDs or symbols."""
    truth = adata.uns[PLANTED_KEY]
    if "gene_sets" not in truth:
        raise ValueError("this corpus has no gene sets; simulate it with pathway_programs=True")
    to_symbol = dict(zip(adata.var_names, adata.var["gene_symbol"])) if symbols else {}
    planted_by = {name: state for state, name in truth["planted_sets"].items()}
    with open(path, "w") as fh:
        for name, genes in truth["gene_sets"].items():
            what = f"planted: {planted_by[name]}" if name in planted_by else "decoy"
            fh.write("\t".join([name, what, *(to_symbol.get(g, g) for g in genes)]) + "\n")


def planted(adata) -> dict:
    """The ground truth recorded by `simulate_corpus`: markers per state and disease drivers."""
    try:
        truth = adata.uns[PLANTED_KEY]
    except KeyError:
        raise ValueError("this AnnData was not made by cellrank_fm.simulate (no uns['simulation'])") from None
    out = {
        "markers": {k: list(v) for k, v in truth["markers"].items()},
        "drivers": list(truth["drivers"]),
    }
    if "gene_sets" in truth:
        out["gene_sets"] = {k: list(v) for k, v in truth["gene_sets"].items()}
        out["planted_sets"] = dict(truth["planted_sets"])
    return out


def _specials(model_version: str) -> dict[str, int]:
    version = model_version.lower()
    if version not in ("v1", "v2"):
        raise ValueError(f"model_version must be 'v1' or 'v2', not {model_version!r}")
    return dict(_V1_SPECIALS if version == "v1" else _V2_SPECIALS)


def _symbols(gene_ids, marker_idx, driver_idx, given) -> list[str]:
    if given is not None:
        return [str(given.get(g, g)) for g in gene_ids]
    # Self-describing names make plots of the synthetic corpus readable.
    names = [f"G{i:04d}" for i in range(len(gene_ids))]
    for state, idx in marker_idx.items():
        for j, i in enumerate(idx):
            names[i] = f"{state.upper()}_M{j + 1:02d}"
    for j, i in enumerate(driver_idx):
        names[i] = f"DRIVER{j + 1:02d}"
    return names


def _nonzero_medians(counts: np.ndarray, gene_ids: Sequence[str]) -> dict[str, float]:
    """Per gene, the median over cells expressing it of counts / total × 10,000."""
    norm = counts.astype(np.float64)
    norm = norm / norm.sum(axis=1, keepdims=True) * 10_000.0
    out = {}
    for j, gid in enumerate(gene_ids):
        col = norm[:, j]
        col = col[col > 0]
        out[gid] = float(np.median(col)) if len(col) else 1.0
    return out


def _to_anndata(counts, gene_ids, gene_symbols, states, state_of, disease, donor_of, marker_idx,
                driver_idx, gene_fold, settings):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    n_cells = counts.shape[0]
    obs = pd.DataFrame(
        {
            "cell_state": pd.Categorical([states[k] for k in state_of], categories=list(states)),
            "condition": pd.Categorical(np.where(disease, "disease", "healthy"), categories=["healthy", "disease"]),
            "donor": pd.Categorical([f"donor_{d}" for d in donor_of]),
            "n_counts": counts.sum(axis=1).astype(np.float64),
        },
        index=pd.Index([f"cell_{i:05d}" for i in range(n_cells)], name="cell_id"),
    )
    var = pd.DataFrame(
        {"ensembl_id": list(gene_ids), "gene_symbol": gene_symbols},
        index=pd.Index(list(gene_ids), name="gene_id"),
    )
    ids = np.asarray(gene_ids, dtype=object)
    syms = np.asarray(gene_symbols, dtype=object)
    uns = {
        PLANTED_KEY: {
            "markers": {s: ids[idx].tolist() for s, idx in marker_idx.items()},
            "marker_symbols": {s: syms[idx].tolist() for s, idx in marker_idx.items()},
            "marker_folds": {s: gene_fold[idx].tolist() for s, idx in marker_idx.items()},
            "drivers": ids[driver_idx].tolist(),
            "driver_folds": gene_fold[driver_idx].tolist(),
            "driver_symbols": syms[driver_idx].tolist(),
            "settings": settings,
        }
    }
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var, uns=uns)
