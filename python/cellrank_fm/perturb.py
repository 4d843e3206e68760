"""In silico perturbation: delete a gene (or move it to the front) and watch the cell move.

For every cell of a *start* state and every gene (or gene set) it expresses, the perturbed
rank-value sequence is embedded and compared with the unperturbed one: the shift toward the
*goal* state is ``cos(perturbed, goal) − cos(original, goal)``, where ``goal`` is the mean
embedding of the goal state's cells; shifts toward *alternative* states are measured the same
way (a negative value means the cell moved away). A cell embedding is the mean of its gene
tokens' hidden states after `layer` (as in Geneformer's in silico perturbation).

``delete`` removes the gene, the genes after it moving up one rank; ``overexpress`` moves it
to rank 1. A cell that does not express a gene is not perturbed for it.

Statistics per gene: a two-sided Wilcoxon rank-sum (Mann–Whitney U) test of its goal shifts
against a null — the pooled shifts of every gene perturbed (``--genes all``) or of randomly
drawn expressed genes perturbed in the same cells (a gene list) — with Benjamini–Hochberg FDR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from cellrank_fm.errors import UserError, atomic_path
from cellrank_fm.explain import Evaluator, coalition_sequences

if TYPE_CHECKING:
    import pandas as pd

    from cellrank_fm.inference import Cells

MODES = ("delete", "overexpress")


@dataclass
class PerturbResult:
    """Shifts of perturbed cells toward the goal state, as tables, with `.plot()` and `.write()`.

    - `genes`: per gene (or set): `gene_id`, `gene_symbol`, `n_cells`, `mean_shift_goal`,
      `median_shift_goal`, `mean_shift_<state>` per alternative state, `p_value`, `fdr`,
      `null_mean_shift_goal`; strongest first;
    - `shifts`: every cell × gene shift (`cell_id`, `shift_goal`, ..., `is_null`, `gene_id`).

    With gene sets, `pathway` (and `n_genes`, `n_in_vocab`, `n_expressed`, `null_pool`) replace
    the gene columns, and `.write` names the table pathways.parquet/.csv.
    """

    genes: pd.DataFrame
    shifts: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def plot(self, top: int = 20, ax=None):
        """Volcano plot (mean shift toward the goal vs −log10 FDR); returns the matplotlib Axes."""
        from cellrank_fm.plots import new_axes

        ax = ax if ax is not None else new_axes(PLOT_SIZE)
        draw_shifts(ax, self, top=top)
        return ax

    def write(self, out_dir: str | Path, top: int = 20, overwrite: bool = False) -> Path:
        """genes.parquet/.csv, shifts.parquet, settings.json and shifts.png, written whole or not at
        all; an existing non-empty `out_dir` is refused unless `overwrite`."""
        return write_outputs(self, out_dir, top=top, overwrite=overwrite)

    def summary(self, top: int = 10):
        """A rich Table of the strongest genes."""
        return summary_table(self, top=top)


def resolve_genes(names: Sequence[str], vocabulary: dict[str, int], symbols: dict[str, str] | None) -> list[str]:
    """Ensembl IDs (any case, version suffix ignored) or symbols → vocabulary gene IDs."""
    from cellrank_fm.genes import normalise_id

    by_symbol: dict[str, str] = {}
    for gid, sym in (symbols or {}).items():
        if gid in vocabulary:  # an input's var may also map symbols to themselves
            by_symbol.setdefault(str(sym).upper(), gid)
    out, missing = [], []
    for name in names:
        key = name.strip()
        gid = normalise_id(key)
        if gid is None or gid not in vocabulary:
            gid = by_symbol.get(key.upper())
        if gid is None or gid not in vocabulary:
            missing.append(key)
        else:
            out.append(gid)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"gene {missing[0]!r}{more} is not in the model's vocabulary; give Ensembl IDs or symbols the model knows.")
    return list(dict.fromkeys(out))


def _perturbed(prefix, genes, suffix, positions: Sequence[np.ndarray], mode: str) -> list[np.ndarray]:
    """One perturbed sequence per entry of `positions` (arrays of gene positions to act on)."""
    keep = np.ones((len(positions), len(genes)), dtype=bool)
    for r, p in enumerate(positions):
        keep[r, p] = False
    if mode == "delete":
        return coalition_sequences(prefix, genes, suffix, keep)
    # overexpress: the genes move to the front in their original order, the rest follow.
    return [np.concatenate([prefix, genes[np.sort(p)], genes[k], suffix]) for p, k in zip(positions, keep)]


class RankSumNull:
    """Two-sided Mann–Whitney U p-values of many samples against one null, equal to
    `scipy.stats.mannwhitneyu(sample, null).pvalue`, with the null sorted once.

    scipy ranks sample and null together on every call: 1.5 s per gene against the 3 million
    pooled shifts of 1,500 cells × 2,048 genes, hours over every gene such a run perturbs.
    Here a sample's mid-ranks in the combined data come from binary searches in the sorted
    null and the sorted sample, and the tie correction from the null's tie groups, adjusted
    for the values the sample shares with them. Where scipy takes its exact test (small samples
    without ties) or the data are degenerate, scipy itself answers.
    """

    def __init__(self, null: np.ndarray):
        self.null = np.sort(np.asarray(null, dtype=np.float64))
        self.values, counts = np.unique(self.null, return_counts=True)
        self.counts = counts.astype(np.float64)
        self.tie_term = float((self.counts ** 3 - self.counts).sum())

    def pvalue(self, sample: np.ndarray) -> float:
        from scipy.special import ndtr
        from scipy.stats import mannwhitneyu

        x = np.asarray(sample, dtype=np.float64)
        n1, n2 = len(x), len(self.null)
        if n1 == 0 or np.isnan(x).any() or np.isnan(self.null[-1]):
            return float(mannwhitneyu(x, self.null, alternative="two-sided").pvalue)
        xs = np.sort(x)
        below = np.searchsorted(self.null, x, "left") + np.searchsorted(xs, x, "left")
        equal = (np.searchsorted(self.null, x, "right") + np.searchsorted(xs, x, "right")) - below
        u1 = float((below + (equal + 1) / 2).sum()) - n1 * (n1 + 1) / 2
        u = max(u1, n1 * n2 - u1)
        shared, in_sample = np.unique(x, return_counts=True)
        at = np.minimum(np.searchsorted(self.values, shared), len(self.values) - 1)
        in_null = np.where(self.values[at] == shared, self.counts[at], 0.0)
        both = in_null + in_sample
        tie = self.tie_term - (in_null ** 3 - in_null).sum() + (both ** 3 - both).sum()
        n = n1 + n2
        var = n1 * n2 / 12 * ((n + 1) - tie / (n * (n - 1)))
        # scipy's choice: the normal approximation for two samples over 8 or any tie (with every
        # gene's shifts in the pooled null, a gene's own shifts are ties), else the exact test.
        if not ((n1 > 8 and n2 > 8) or tie > 0) or not var > 0:
            return float(mannwhitneyu(x, self.null, alternative="two-sided").pvalue)
        z = (u - n1 * n2 / 2 - 0.5) / np.sqrt(var)
        return float(np.clip(2 * ndtr(-z), 0.0, 1.0))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of a [N, H] with b [H]."""
    return (a @ b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b) + 1e-12)


def perturb_cells(
    evaluator: Evaluator,
    cells: Cells,
    *,
    state_column: str,
    start_state: str,
    goal_state: str,
    alt_states: Sequence[str] = (),
    genes: Sequence[str] | None = None,
    as_set: bool = False,
    mode: str = "delete",
    layer: int = -1,
    max_cells: int | None = None,
    null_genes: int = 20,
    gene_sets=None,
    seed: int = 0,
    chunk_tokens: int = 1 << 20,
    symbols: dict[str, str] | None = None,
    quiet: bool = False,
) -> PerturbResult:
    """Perturb the start-state cells; `genes` None means every gene they express.

    With `gene_sets` (`genesets.GeneSets`) each whole set is perturbed instead, against random
    expressed-gene sets of its expressed size; the tables then name a `pathway` per row.
    `symbols` (gene ID -> symbol, for display) defaults to the model's.
    """
    import pandas as pd
    from scipy.stats import false_discovery_control

    from cellrank_fm.progress import progress_bar

    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; use delete or overexpress.")
    if state_column not in cells.obs.columns:
        raise UserError(f"the input has no column {state_column!r}; it has {', '.join(map(str, cells.obs.columns))}.")
    states = np.asarray([str(s) for s in cells.obs[state_column].to_numpy()], dtype=object)
    present = sorted(set(states))
    for what, s in [("start state", start_state), ("goal state", goal_state)] + [("alternative state", a) for a in alt_states]:
        if s not in present:
            raise UserError(f"{what} {s!r} is not a value of {state_column!r}; it holds {', '.join(present)}.")
    if goal_state == start_state:
        raise UserError("the goal state must differ from the start state.")
    vocab = evaluator.info.vocabulary or {}
    inv = {v: k for k, v in vocab.items()}
    symbols = symbols if symbols is not None else (evaluator.info.symbols or {})
    rng = np.random.default_rng(seed)

    def centroid(state: str) -> np.ndarray:
        idx = np.flatnonzero(states == state)
        return evaluator.embeddings([cells.tokens[i] for i in idx], layer).mean(0)

    goal = centroid(goal_state)
    alts = {a: centroid(a) for a in alt_states}
    start = np.flatnonzero(states == start_state)
    if max_cells is not None and len(start) > max_cells:
        start = np.sort(rng.choice(start, size=max_cells, replace=False))
    split = [evaluator.split(cells.tokens[i]) for i in start]
    original = evaluator.embeddings([cells.tokens[i] for i in start], layer)

    # What to perturb: with a gene list or gene sets, groups of tokens, each tested against its
    # null — random expressed genes (one shared null for single genes), or for a set, random
    # expressed-gene sets as large as the set's expressed part. Gene-set nulls are drawn outside
    # every perturbed set, so a random set does not carry another pathway's effect (which would
    # make an inert set look "less than random"); when too few such genes remain (a model that
    # reads only the sets' genes), outside the set itself. Plan keys: a token id (every gene),
    # ("g", i) for group i, ("null", n, j) for draw j of null n.
    groups: list[tuple[str, np.ndarray]] | None = None
    if gene_sets is not None or genes is not None:
        expressed = np.unique(np.concatenate([s[1] for s in split]))
        if gene_sets is not None:
            groups = [(gs.name, np.array([vocab[g] for g in gs.genes], dtype=np.int64)) for gs in gene_sets.sets]
        elif as_set:
            groups = [("+".join(genes), np.array([vocab[g] for g in genes], dtype=np.int64))]
        else:
            groups = [(g, np.array([vocab[g]], dtype=np.int64)) for g in genes]
        if gene_sets is None and not as_set:
            group_null = [0] * len(groups)
            nulls = [(1, np.setdiff1d(expressed, np.concatenate([t for _, t in groups])))]
        else:
            group_null = list(range(len(groups)))
            outside_all = np.setdiff1d(expressed, np.concatenate([t for _, t in groups]))
            nulls = []
            for _, t in groups:
                size = len(np.intersect1d(t, expressed))
                # Twice the size: enough distinct genes for the draws to differ from one another.
                nulls.append((size, outside_all if len(outside_all) >= 2 * size else np.setdiff1d(expressed, t)))
        null_draws = [[rng.choice(pool, size=size, replace=False) for _ in range(null_genes)]
                      if 0 < size <= len(pool) else [] for size, pool in nulls]
    plans = []
    for _, g, _ in split:
        pos = {int(t): p for p, t in enumerate(g)}
        if groups is None:
            plans.append([(int(t), np.array([p])) for p, t in enumerate(g)])
            continue

        def hits(toks, pos=pos):
            return np.array([pos[int(t)] for t in toks if int(t) in pos], dtype=np.int64)

        plan = [(("g", i), hits(t)) for i, (_, t) in enumerate(groups)]
        plan += [(("null", n, j), hits(d)) for n, draws in enumerate(null_draws) for j, d in enumerate(draws)]
        plans.append([(k, p) for k, p in plan if len(p)])

    total = sum(len(p) for p in plans)
    if total == 0:
        raise UserError(f"no {start_state!r} cell expresses any of the requested genes, so nothing was perturbed.")
    rows_cell, rows_key, shift_goal, shift_alt = [], [], [], {a: [] for a in alt_states}
    pending: list[tuple[int, object, np.ndarray]] = []

    def flush():
        if not pending:
            return
        emb = evaluator.embeddings([s for _, _, s in pending], layer)
        ci = np.array([c for c, _, _ in pending])
        shift_goal.extend(_cosine(emb, goal) - _cosine(original[ci], goal))
        for a, vec in alts.items():
            shift_alt[a].extend(_cosine(emb, vec) - _cosine(original[ci], vec))
        rows_cell.extend(ci.tolist())
        rows_key.extend(k for _, k, _ in pending)
        pending.clear()

    with progress_bar("perturbations", quiet=quiet) as bar:
        task = bar.add_task(f"{mode} in {len(start)} {start_state} cells", total=total)
        tokens_pending = 0
        for c, ((prefix, g, suffix), plan) in enumerate(zip(split, plans)):
            for (key, _), seq in zip(plan, _perturbed(prefix, g, suffix, [p for _, p in plan], mode)):
                pending.append((c, key, seq))
                tokens_pending += len(seq)
            if tokens_pending >= chunk_tokens:
                flush()
                tokens_pending = 0
            bar.advance(task, len(plan))
        flush()

    shifts = pd.DataFrame({"cell_id": [cells.cell_ids[start[c]] for c in rows_cell], "key": rows_key,
                           "shift_goal": np.asarray(shift_goal, dtype=np.float64)})
    for a in alt_states:
        shifts[f"shift_{a}"] = np.asarray(shift_alt[a], dtype=np.float64)
    shifts["is_null"] = [isinstance(k, tuple) and k[0] == "null" for k in rows_key]

    def label(k) -> str:
        if not isinstance(k, tuple):
            return inv.get(k, str(k))
        return groups[k[1]][0] if k[0] == "g" else f"null:{k[1]}:{k[2]}"

    shifts["gene_id"] = [label(k) for k in rows_key]
    shifts["gene_symbol"] = [g if gene_sets is not None or g.startswith("null:") else
                             "+".join(symbols.get(x, x) for x in g.split("+")) for g in shifts["gene_id"]]
    null_of = np.array([k[1] if isinstance(k, tuple) and k[0] == "null" else -1 for k in rows_key])
    group_of = {name: i for i, (name, _) in enumerate(groups or [])}
    goal_shift = shifts["shift_goal"].to_numpy()
    if groups is None:
        nulls_shift = [goal_shift]
    else:
        nulls_shift = [goal_shift[null_of == n] for n in range(len(null_draws))]
    if max(len(x) for x in nulls_shift) < 2:
        raise UserError("too few null perturbations to test against; raise --null-genes or perturb more cells.")
    stats = []
    tests: dict[int, RankSumNull] = {}  # per null, built on first use
    for gid, sub in shifts[~shifts["is_null"]].groupby("gene_id", sort=False):
        which = 0 if groups is None else group_null[group_of[gid]]
        null = nulls_shift[which]
        s = sub["shift_goal"].to_numpy()
        p = np.nan
        if len(s) >= 2 and len(null) >= 2:
            if which not in tests:
                tests[which] = RankSumNull(null)
            p = tests[which].pvalue(s)
        row = {"gene_id": gid, "gene_symbol": sub["gene_symbol"].iloc[0], "n_cells": len(s),
               "mean_shift_goal": s.mean(), "median_shift_goal": float(np.median(s))}
        for a in alt_states:
            row[f"mean_shift_{a}"] = sub[f"shift_{a}"].mean()
        row["p_value"] = p
        row["null_mean_shift_goal"] = float(null.mean()) if len(null) else np.nan
        stats.append(row)
    table = pd.DataFrame(stats)
    ok = table["p_value"].notna().to_numpy()
    table["fdr"] = np.nan
    if ok.any():
        table.loc[ok, "fdr"] = false_discovery_control(table.loc[ok, "p_value"].to_numpy(), method="bh")
    table = table.sort_values(["fdr", "mean_shift_goal"], ascending=[True, False], na_position="last").reset_index(drop=True)
    shifts = shifts.drop(columns=["key"])
    if gene_sets is not None:
        expressed_size = {name: size for (name, _), (size, _) in zip(groups, nulls)}
        outside = {name: "outside every set" if pool is outside_all else "outside this set"
                   for (name, _), (_, pool) in zip(groups, nulls)}
        table, shifts = _as_pathways(table, shifts, gene_sets, expressed_size)
        table["null_pool"] = [outside[p] for p in table["pathway"]]
    return PerturbResult(table, shifts, settings=dict(
        state_column=state_column, start_state=start_state, goal_state=goal_state, alt_states=list(alt_states),
        genes="all" if genes is None else list(genes), as_set=as_set, mode=mode, layer=layer,
        **({} if gene_sets is None else gene_sets.settings()),
        max_cells=max_cells, null_genes=null_genes, seed=seed, cells_perturbed=int(len(start)),
    ))


def _as_pathways(table, shifts, gene_sets, expressed: dict[str, int]):
    """The set-level tables: `pathway` instead of gene columns, with the set's sizes."""
    sizes = {s.name: (s.n_genes, s.n_in_vocab) for s in gene_sets.sets}
    table = table.rename(columns={"gene_id": "pathway"}).drop(columns=["gene_symbol"])
    table.insert(1, "n_genes", [sizes[p][0] for p in table["pathway"]])
    table.insert(2, "n_in_vocab", [sizes[p][1] for p in table["pathway"]])
    table.insert(3, "n_expressed", [expressed[p] for p in table["pathway"]])
    return table, shifts.rename(columns={"gene_id": "pathway"}).drop(columns=["gene_symbol"])


def write_outputs(result: PerturbResult, out_dir: str | Path, top: int = 20, overwrite: bool = False) -> Path:
    """genes.parquet/.csv (pathways.parquet/.csv for gene sets), shifts.parquet, settings.json and
    a PNG, all or nothing."""
    from cellrank_fm.errors import write_json
    from cellrank_fm.outputs import new_directory

    out_dir = Path(out_dir)
    name = "pathways" if "pathway" in result.genes.columns else "genes"
    with new_directory(out_dir, overwrite), atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        result.genes.to_parquet(tmp / f"{name}.parquet", index=False)
        result.genes.to_csv(tmp / f"{name}.csv", index=False)
        result.shifts.to_parquet(tmp / "shifts.parquet", index=False)
        write_json(result.settings, tmp / "settings.json")
        plot_shifts(result, tmp / "shifts.png", top=top)
    return out_dir


PLOT_SIZE = (7, 5)


def plot_shifts(result: PerturbResult, path: Path, top: int = 20) -> None:
    """The volcano plot as a PNG."""
    from cellrank_fm.plots import png_figure

    with png_figure(path, size=PLOT_SIZE) as (fig, ax):
        draw_shifts(ax, result, top)


def draw_shifts(ax, result: PerturbResult, top: int = 20) -> None:
    """Volcano: mean shift toward the goal vs −log10 FDR; the `top` strongest genes labelled."""
    t = result.genes
    names = t["pathway"] if "pathway" in t.columns else t["gene_symbol"]
    fdr = t["fdr"].fillna(1.0).clip(lower=1e-300).to_numpy()
    y = -np.log10(fdr)
    x = t["mean_shift_goal"].to_numpy()
    sig = fdr < 0.05
    s = result.settings
    ax.scatter(x[~sig], y[~sig], s=8, color="#bbbbbb", linewidths=0, label="FDR ≥ 0.05")
    ax.scatter(x[sig], y[sig], s=12, color="#cc3311", linewidths=0, label="FDR < 0.05")
    ax.axhline(-np.log10(0.05), color="grey", linestyle="--", linewidth=0.7)
    ax.axvline(float(t["null_mean_shift_goal"].median()) if len(t) else 0.0, color="grey", linewidth=0.7)
    for i in np.argsort(-y + -np.abs(x) * 1e-9)[:top]:
        ax.annotate(str(names.iloc[i]), (x[i], y[i]), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel(f"mean cosine shift toward {s['goal_state']} ({s['mode']})")
    ax.set_ylabel("−log10 FDR (rank-sum vs null)")
    ax.set_title(f"{s['start_state']} → {s['goal_state']}: in silico {s['mode']}")
    ax.legend(fontsize=7, frameon=False)


def summary_table(result: PerturbResult, top: int = 10):
    from rich.table import Table

    s = result.settings
    t = Table(title=f"in silico {s['mode']}: {s['start_state']} → {s['goal_state']} ({s['cells_perturbed']} cells)")
    sets = "pathway" in result.genes.columns
    first = ["pathway", "genes expressed"] if sets else ["gene", "symbol"]
    cols = first + ["cells", "mean shift → goal"] + [f"→ {a}" for a in s["alt_states"]] + ["null mean", "FDR"]
    for c in cols:
        t.add_column(c)
    for _, r in result.genes.head(top).iterrows():
        names = [str(r["pathway"]), str(r["n_expressed"])] if sets else [str(r["gene_id"]), str(r["gene_symbol"])]
        t.add_row(*names, str(r["n_cells"]), f"{r['mean_shift_goal']:+.4f}",
                  *[f"{r[f'mean_shift_{a}']:+.4f}" for a in s["alt_states"]], f"{r['null_mean_shift_goal']:+.4f}",
                  f"{r['fdr']:.2g}")
    return t
