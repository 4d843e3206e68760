"""Per-cell pathway activity read from the rank-value encoding: `cellrank score`.

For a cell and a gene set, the recovery curve counts, at each rank x = 1..R, how many of the
set's genes sit at rank x or above in the cell's token ranking; its area is AUCell's statistic
(Aibar et al. 2017). Here the ranking is the cell's rank-value tokens themselves (genes ordered
by count / cell total / gene median, as the model reads them; special tokens skipped), so the
score needs no other normalisation:

    AUC = Σ_{g in set, rank r_g ≤ R} (R − r_g + 1)  /  max,

where max is that sum for a set of the same size holding the top ranks, so 1 means the set's
genes are the cell's top genes and 0 that none is in its top R. The set's size is its genes the
model (or vocabulary) reads. R is `auc_max_rank` (default: 5% of those genes, as AUCell, at most
the input size). Cells are scored a chunk at a time as one sparse product — (cells × genes
weights) @ (genes × sets membership) — so memory is bounded by the chunk, not the corpus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from cellrank_fm.errors import UserError, atomic_path
from cellrank_fm.genesets import GeneSets

KEY = "cellrank_pathways"
CHUNK_CELLS = 8192


@dataclass
class Encoding:
    """What tokenizing an h5ad needs (the fields of `predict.LoadedModel` that `tokenized_chunks`
    reads), from a model directory or from dictionaries."""

    vocabulary: dict[str, int]
    medians: dict[str, float]
    model_version: str = "v1"
    model_input_size: int | None = None
    gene_set: list[str] | None = None
    gene_id_column: str | None = None
    mapping: object | None = None
    symbols: dict[str, str] = field(default_factory=dict)


def default_max_rank(gene_sets_universe: int, input_size: int | None) -> int:
    """5% of the genes that can be ranked (AUCell's default), at least 1, at most the input size."""
    r = max(1, math.ceil(0.05 * gene_sets_universe))
    return min(r, input_size) if input_size else r


class Scorer:
    """Recovery AUC of every set for chunks of token sequences (flat tokens + offsets)."""

    def __init__(self, gene_sets: GeneSets, vocabulary: dict[str, int], max_rank: int, special_ids: Sequence[int] = ()):
        if max_rank < 1:
            raise UserError("--auc-max-rank must be at least 1.")
        self.max_rank = int(max_rank)
        self.names = gene_sets.names
        member = gene_sets.membership(vocabulary)
        # Dense when small: a sparse × dense product is the fastest path in SciPy.
        self.member = member.toarray() if member.shape[0] * member.shape[1] <= 64_000_000 else member
        sizes = np.asarray(member.sum(0)).ravel()
        top = np.minimum(sizes, self.max_rank)
        self.max_auc = top * self.max_rank - top * (top - 1) / 2  # Σ_{i=1..top} (R − i + 1)
        self.special = np.asarray(sorted(special_ids), dtype=np.int64)
        self.vocab_size = member.shape[0]

    def score(self, flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """[cells, sets] float32 AUCs of the cells whose tokens are flat[offsets[i]:offsets[i+1]]."""
        import scipy.sparse as sp

        n = len(offsets) - 1
        flat = np.asarray(flat, dtype=np.int64)
        row = np.repeat(np.arange(n), np.diff(offsets))
        if len(self.special):
            keep = ~np.isin(flat, self.special)
            flat, row = flat[keep], row[keep]
        counts = np.bincount(row, minlength=n)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.arange(len(flat)) - starts[row]  # 0-based rank among the cell's genes
        top = pos < self.max_rank
        weights = sp.csr_matrix(((self.max_rank - pos[top]).astype(np.float32), (row[top], flat[top])),
                                shape=(n, self.vocab_size))
        auc = weights @ self.member
        auc = auc.toarray() if sp.issparse(auc) else np.asarray(auc)
        out = (auc / self.max_auc[None, :]).astype(np.float32)
        out[counts == 0] = np.nan
        return out


# ----------------------------------------------------------------------------- inputs


def shard_chunks(path: Path, chunk_cells: int = CHUNK_CELLS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(flat tokens, offsets) of consecutive cells of a shard directory, one record batch at a time."""
    import pyarrow.parquet as pq

    from cellrank_fm.shards import ShardSet

    for f in ShardSet(path).part_files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=chunk_cells, columns=["input_ids"]):
            col = batch.column(0)
            offsets = col.offsets.to_numpy()
            yield col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]], offsets - offsets[0]


def h5ad_chunks(path: Path, enc: Encoding, chunk_cells: int = CHUNK_CELLS, layer: str | None = None):
    """(flat tokens, offsets) of consecutive cells of an h5ad, tokenized as `enc` says."""
    from cellrank_fm.predict import tokenized_chunks

    for _, tokens, _ in tokenized_chunks(path, enc, chunk_cells, layer):
        lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        flat = np.concatenate(tokens) if len(tokens) else np.zeros(0, dtype=np.int64)
        yield flat, np.concatenate([[0], np.cumsum(lengths)])


def encoding_from_model(model_dir: str | Path) -> Encoding:
    """The tokenization a model directory records: vocabulary, medians, gene set and gene map."""
    from cellrank_fm.predict import load_for_inference

    lm = load_for_inference(model_dir, expect="any", device="cpu")
    return Encoding(lm.vocabulary, lm.medians, lm.model_version, lm.model_input_size, lm.gene_set,
                    lm.gene_id_column, lm.mapping, dict(lm.info.symbols or {}))


def encoding_from_files(vocab: str | Path, medians: str | Path, gene_map: Sequence[str | Path] = (),
                        model_version: str = "v1", model_input_size: int | None = None) -> Encoding:
    from cellrank_fm.genes import load_mapping
    from cellrank_fm.vocab import load_medians, load_vocabulary

    mapping = load_mapping([str(p) for p in gene_map]) if gene_map else None
    return Encoding(load_vocabulary(vocab), load_medians(medians), model_version.lower(), model_input_size,
                    mapping=mapping, symbols=dict(mapping.symbols) if mapping else {})


# ----------------------------------------------------------------------------- results


@dataclass
class ScoreResult:
    """Per-cell AUCs (`scores`, cells × sets, NaN for a cell without any gene), the set names, the
    cells' metadata (`obs`) and, with a grouping, the per-group comparison (`groups`)."""

    scores: np.ndarray
    names: list[str]
    obs: "object"
    settings: dict
    coverage: "object"
    groups: "object" = None  # pandas.DataFrame from `compare_groups`
    groupby: str | None = None

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.scores, index=self.obs.index, columns=self.names)


def compare_groups(scores: np.ndarray, labels: Sequence, names: Sequence[str]):
    """Per group and set: mean AUC in the group and in the other cells, their difference, a
    two-sided rank-sum (Mann–Whitney U) p-value and Benjamini–Hochberg FDR over every test;
    strongest differences first."""
    import pandas as pd
    from scipy.stats import false_discovery_control, mannwhitneyu

    labels = np.asarray([str(x) for x in labels], dtype=object)
    ok = ~np.isnan(scores).any(1) & (labels != "nan")
    scores, labels = scores[ok], labels[ok]
    rows = []
    for g in sorted(set(labels)):
        inside = labels == g
        if inside.all() or not inside.any():
            continue
        a, b = scores[inside], scores[~inside]
        p = np.atleast_1d(mannwhitneyu(a, b, axis=0, alternative="two-sided").pvalue)
        mean_in, mean_out = a.mean(0), b.mean(0)
        for j, name in enumerate(names):
            rows.append(dict(group=g, pathway=name, n_cells=int(inside.sum()), mean_auc=float(mean_in[j]),
                             mean_auc_rest=float(mean_out[j]), difference=float(mean_in[j] - mean_out[j]),
                             p_value=float(p[j])))
    out = pd.DataFrame(rows, columns=["group", "pathway", "n_cells", "mean_auc", "mean_auc_rest", "difference",
                                      "p_value"])
    if out.empty:
        raise UserError("the --groupby column needs at least two groups of scored cells to compare.")
    p = out["p_value"].fillna(1.0).to_numpy()
    out["fdr"] = false_discovery_control(p, method="bh")
    return out.sort_values(["fdr", "difference"], ascending=[True, False], kind="stable").reset_index(drop=True)


def plot_groups(result: ScoreResult, path: Path, top: int = 40) -> None:
    """Group × pathway heatmap: mean AUC per group, centred and scaled per pathway so each column
    shows where the set is higher or lower; the pathways that differ most between groups."""
    from cellrank_fm.plots import png_figure

    t = result.groups
    best = t.assign(abs_diff=t["difference"].abs()).sort_values(["fdr", "abs_diff"], ascending=[True, False])
    sets = list(dict.fromkeys(best["pathway"]))[:top]
    groups = sorted(t["group"].unique())
    mean = t.pivot_table(index="group", columns="pathway", values="mean_auc").reindex(index=groups, columns=sets)
    values = mean.to_numpy()
    z = (values - values.mean(0)) / (values.std(0) + 1e-12)
    with png_figure(path, size=(max(6.0, 0.35 * len(sets) + 3), max(3.0, 0.4 * len(groups) + 2.8))) as (fig, ax):
        im = ax.imshow(z, cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto")
        ax.set_yticks(range(len(groups)), groups)
        ax.set_xticks(range(len(sets)), sets, rotation=90, fontsize=7)
        fig.colorbar(im, ax=ax, label="mean AUC, z-scored across groups")
        ax.set_title(f"pathway activity by {result.groupby} (recovery AUC over the top "
                     f"{result.settings['auc_max_rank']} ranks)", fontsize=9)


def group_outputs(out: Path, column: str) -> tuple[Path, Path]:
    """Where `score --groupby` writes its table and heatmap, beside the output h5ad."""
    stem = out.name[: -len(".h5ad")] if out.name.endswith(".h5ad") else out.name
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in column)
    return out.with_name(f"{stem}.{safe}.pathways.csv"), out.with_name(f"{stem}.{safe}.heatmap.png")


# ----------------------------------------------------------------------------- the command


def score_file(
    input_path: str | Path,
    out_path: str | Path,
    gene_set_files: Sequence[str | Path],
    *,
    model_dir: str | Path | None = None,
    vocab: str | Path | None = None,
    medians: str | Path | None = None,
    gene_map: Sequence[str | Path] = (),
    model_version: str = "v1",
    model_input_size: int | None = None,
    level: int | None = None,
    min_size: int = 5,
    sets: Sequence[str] | None = None,
    auc_max_rank: int | None = None,
    groupby: str | None = None,
    layer: str | None = None,
    key_added: str = KEY,
    chunk_cells: int = CHUNK_CELLS,
    quiet: bool = False,
) -> ScoreResult:
    """Score every cell of an h5ad or shard directory; write `out_path` (.h5ad) and, with
    `groupby`, the group table and heatmap beside it."""
    import pandas as pd

    from cellrank_fm.genesets import load_gene_sets, report
    from cellrank_fm.progress import progress_bar

    input_path, out_path = Path(input_path), Path(out_path)
    if not input_path.exists():
        raise UserError(f"input {input_path} does not exist.")
    if out_path.suffix != ".h5ad":
        raise UserError(f"--out must name an .h5ad file, not {out_path}.")
    if out_path.resolve() == input_path.resolve():
        raise UserError("--out must differ from the input file; cellrank never overwrites its input.")
    shards = None
    if input_path.is_dir():
        from cellrank_fm.finetune import gene_set_ids
        from cellrank_fm.genes import GeneMapping
        from cellrank_fm.shards import ShardSet

        shards = ShardSet(input_path)
        enc = Encoding(shards.vocabulary, shards.medians, shards.model_version, shards.model_input_size,
                       gene_set_ids(shards), None,
                       GeneMapping.from_table(shards.gene_map, str(input_path)) if shards.gene_map else None,
                       shards.symbols)
        n_cells = len(shards)
    else:
        if model_dir is not None:
            enc = encoding_from_model(model_dir)
        elif vocab is not None and medians is not None:
            enc = encoding_from_files(vocab, medians, gene_map, model_version, model_input_size)
        else:
            raise UserError("scoring an h5ad needs the tokenization: give --model DIR, or --vocab and --medians.")
        from cellrank_fm.explain import input_symbols
        from cellrank_fm.predict import open_h5ad

        adata = open_h5ad(input_path)
        n_cells = adata.n_obs
        obs = adata.obs.copy()
        adata.file.close()
        enc.symbols = {**enc.symbols, **input_symbols(input_path, enc.gene_id_column)}
    gene_sets = load_gene_sets(gene_set_files, enc.vocabulary, mapping=enc.mapping, symbols=[enc.symbols],
                               gene_set=enc.gene_set, level=level, min_size=min_size, names=sets)
    if not quiet:
        report(gene_sets)
    from cellrank_fm.vocab import preset

    input_size = enc.model_input_size or preset(enc.model_version).model_input_size
    readable = len(enc.gene_set) if enc.gene_set is not None else sum(1 for g in enc.vocabulary if not g.startswith("<"))
    max_rank = auc_max_rank or default_max_rank(readable, input_size)
    special = [v for k, v in enc.vocabulary.items() if k.startswith("<")]
    scorer = Scorer(gene_sets, enc.vocabulary, max_rank, special)
    scores = np.full((n_cells, len(gene_sets)), np.nan, dtype=np.float32)
    chunks = shard_chunks(input_path, chunk_cells) if shards is not None else h5ad_chunks(input_path, enc, chunk_cells, layer)
    done = 0
    with progress_bar("cells", quiet=quiet) as bar:
        task = bar.add_task("score", total=n_cells)
        for flat, offsets in chunks:
            n = len(offsets) - 1
            scores[done:done + n] = scorer.score(flat, offsets)
            done += n
            bar.update(task, advance=n)
    if shards is not None:
        names = ["cell_id"] + list(shards.manifest.get("metadata_columns") or [])
        obs = pd.DataFrame({c: shards.column(c) for c in names})
        obs.index = pd.Index([str(c) for c in obs.pop("cell_id")])
        obs.index = _unique(obs.index)
    settings = dict(input=str(input_path), auc_max_rank=int(max_rank), **gene_sets.settings())
    result = ScoreResult(scores, gene_sets.names, obs, settings, gene_sets.coverage(), groupby=groupby)
    if groupby is not None:
        if groupby not in obs.columns:
            raise UserError(f"the input has no column {groupby!r}; it has {', '.join(map(str, obs.columns))}.")
        result.groups = compare_groups(scores, obs[groupby].astype(str).to_numpy(), gene_sets.names)
    _write(result, input_path, out_path, key_added, shards is not None)
    if groupby is not None:
        table_path, png_path = group_outputs(out_path, groupby)
        with atomic_path(table_path) as tmp:
            result.groups.to_csv(tmp, index=False)
        plot_groups(result, png_path)
    return result


def _unique(index):
    """Cell ids made unique (shard sets can hold the same id from two inputs)."""
    import pandas as pd

    if index.is_unique:
        return index
    seen: dict[str, int] = {}
    out = []
    for x in index:
        k = seen.get(x, 0)
        seen[x] = k + 1
        out.append(x if k == 0 else f"{x}-{k}")
    return pd.Index(out)


def _uns(result: ScoreResult, key: str) -> dict:
    cov = result.coverage[result.coverage["kept"]]
    return {f"{key}_names": np.array(result.names, dtype=object),
            key: {**{k: v for k, v in result.settings.items() if v is not None and k != "gene_sets"},
                  "gene_sets": np.array(result.settings["gene_sets"], dtype=object),
                  "n_genes": cov["n_genes"].to_numpy(), "n_in_vocab": cov["n_in_vocab"].to_numpy()}}


def _write(result: ScoreResult, input_path: Path, out_path: Path, key: str, from_shards: bool) -> None:
    if from_shards:
        import anndata as ad

        adata = ad.AnnData(obs=result.obs, obsm={key: result.scores}, uns=_uns(result, key))
        with atomic_path(out_path) as tmp:
            adata.write_h5ad(tmp)
        return
    from cellrank_fm.predict import write_results

    write_results(input_path, out_path, {}, {key: result.scores}, _uns(result, key))


def summary_table(result: ScoreResult, top: int = 5):
    """A rich Table: the highest mean AUCs overall, and per group the sets that differ most."""
    from rich.table import Table

    if result.groups is None:
        t = Table(title=f"pathway activity ({len(result.names)} sets, R = {result.settings['auc_max_rank']})")
        for col in ("pathway", "mean AUC", "cells scored"):
            t.add_column(col)
        means = np.nanmean(result.scores, axis=0)
        for j in np.argsort(-means)[:top]:
            t.add_row(result.names[j], f"{means[j]:.3f}", f"{int((~np.isnan(result.scores[:, j])).sum()):,}")
        return t
    t = Table(title=f"pathways that differ between {result.groupby} groups (rank-sum, FDR)")
    for col in ("group", f"top {top} higher in the group (difference in mean AUC, FDR)"):
        t.add_column(col)
    for g, sub in result.groups.groupby("group"):
        up = sub[sub["difference"] > 0].head(top)
        t.add_row(str(g), "; ".join(f"{r.pathway} ({r.difference:+.3f}, {r.fdr:.1e})" for r in up.itertuples()))
    return t
