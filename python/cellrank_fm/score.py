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
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from cellrank_fm.errors import UserError
from cellrank_fm.genesets import GeneSets

if TYPE_CHECKING:
    import anndata
    import pandas as pd

KEY = "cellrank_pathways"
CHUNK_CELLS = 8192


@dataclass
class Encoding:
    """How the cells were (or are to be) tokenized: the fields of `inference.LoadedModel` that
    `inference.tokenized_chunks` and `genesets.gene_sets_for_model` read, from a model, a shard
    directory or dictionaries."""

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


def anndata_chunks(adata: anndata.AnnData, enc: Encoding, chunk_cells: int = CHUNK_CELLS, layer: str | None = None):
    """(flat tokens, offsets) of consecutive cells of an AnnData (in memory or backed), tokenized
    as `enc` says."""
    from cellrank_fm.inference import tokenized_chunks

    for _, tokens, _ in tokenized_chunks(adata, enc, chunk_cells, layer):
        lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        flat = np.concatenate(tokens) if len(tokens) else np.zeros(0, dtype=np.int64)
        yield flat, np.concatenate([[0], np.cumsum(lengths)])


def encoding_from_model(lm) -> Encoding:
    """The tokenization a loaded model records: vocabulary, medians, gene set and gene map."""
    return Encoding(lm.vocabulary, lm.medians, lm.model_version, lm.model_input_size, lm.gene_set,
                    lm.gene_id_column, lm.mapping, dict(lm.info.symbols or {}))


def encoding_from_shards(shards) -> Encoding:
    """The tokenization a shard directory records (its cells are already tokens)."""
    from cellrank_fm.genes import GeneMapping

    mapping = GeneMapping.from_table(shards.gene_map, str(shards.path)) if shards.gene_map else None
    return Encoding(shards.vocabulary, shards.medians, shards.model_version, shards.model_input_size,
                    shards.gene_set, None, mapping, dict(shards.symbols or {}))


def encoding_from_files(vocab, medians, gene_map: Sequence[str | Path] = (), model_version: str = "v1",
                        model_input_size: int | None = None) -> Encoding:
    """A tokenization from a vocabulary and medians (paths or dicts) and optional gene maps."""
    from cellrank_fm.genes import load_mapping
    from cellrank_fm.vocab import load_medians, load_vocabulary

    mapping = load_mapping([str(p) for p in gene_map]) if gene_map else None
    return Encoding(dict(vocab) if isinstance(vocab, dict) else load_vocabulary(vocab),
                    dict(medians) if isinstance(medians, dict) else load_medians(medians),
                    model_version.lower(), model_input_size, mapping=mapping,
                    symbols=dict(mapping.symbols) if mapping else {})


# ----------------------------------------------------------------------------- scoring


def max_rank_for(enc: Encoding, auc_max_rank: int | None) -> int:
    """`auc_max_rank`, or AUCell's default for the genes this encoding can rank."""
    from cellrank_fm.vocab import preset

    if auc_max_rank is not None:
        return int(auc_max_rank)  # checked by `Scorer`
    input_size = enc.model_input_size or preset(enc.model_version).model_input_size
    readable = len(enc.gene_set) if enc.gene_set is not None else sum(1 for g in enc.vocabulary if not g.startswith("<"))
    return default_max_rank(readable, input_size)


def score_chunks(chunks, n_cells: int, gene_sets: GeneSets, enc: Encoding, max_rank: int,
                 progress: bool = True) -> np.ndarray:
    """[cells, sets] float32 AUCs of the cells the (flat tokens, offsets) `chunks` hold, in order."""
    from cellrank_fm.progress import progress_bar

    special = [v for k, v in enc.vocabulary.items() if k.startswith("<")]
    scorer = Scorer(gene_sets, enc.vocabulary, max_rank, special)
    scores = np.full((n_cells, len(gene_sets)), np.nan, dtype=np.float32)
    done = 0
    with progress_bar("cells", quiet=not progress) as bar:
        task = bar.add_task("score", total=n_cells)
        for flat, offsets in chunks:
            n = len(offsets) - 1
            scores[done:done + n] = scorer.score(flat, offsets)
            done += n
            bar.update(task, advance=n)
    return scores


def shard_obs(shards) -> pd.DataFrame:
    """A shard directory's cells as an obs table: the carried metadata, indexed by unique cell ids."""
    import pandas as pd

    names = ["cell_id"] + list(shards.manifest.get("metadata_columns") or [])
    obs = pd.DataFrame({c: shards.column(c) for c in names})
    obs.index = _unique(pd.Index([str(c) for c in obs.pop("cell_id")]))
    return obs


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


def annotate(adata: anndata.AnnData, scores: np.ndarray, gene_sets: GeneSets, settings: dict, key: str,
             groupby: str | None = None) -> None:
    """obsm `key` (cells × sets AUCs), uns `{key}_names` (its columns), uns `key` (settings and
    each set's sizes) and, with `groupby`, uns `{key}_{groupby}` (the `compare_groups` table)."""
    cov = gene_sets.coverage()
    cov = cov[cov["kept"]]
    adata.obsm[key] = scores
    adata.uns[f"{key}_names"] = np.array(gene_sets.names, dtype=object)
    adata.uns[key] = {**{k: v for k, v in settings.items() if v is not None and k != "gene_sets"},
                      "gene_sets": np.array([str(x) for x in settings.get("gene_sets") or []], dtype=object),
                      "n_genes": cov["n_genes"].to_numpy(), "n_in_vocab": cov["n_in_vocab"].to_numpy()}
    if groupby is not None:
        if groupby not in adata.obs.columns:
            raise UserError(f"the input has no column {groupby!r}; it has {', '.join(map(str, adata.obs.columns))}.")
        adata.uns[f"{key}_{groupby}"] = compare_groups(scores, adata.obs[groupby].astype(str).to_numpy(), gene_sets.names)


# ----------------------------------------------------------------------------- results


def compare_groups(scores: np.ndarray, labels: Sequence, names: Sequence[str]) -> pd.DataFrame:
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
    # A set constant in both groups gives NaN: no evidence of a difference.
    out["fdr"] = false_discovery_control(out["p_value"].fillna(1.0).to_numpy(), method="bh")
    return out.sort_values(["fdr", "difference"], ascending=[True, False], kind="stable").reset_index(drop=True)


def plot_groups(groups: pd.DataFrame, path: Path, groupby: str, max_rank: int, top: int = 40) -> None:
    """Group × pathway heatmap: mean AUC per group, z-scored per pathway across groups so each
    column shows where the set is higher or lower; the `top` pathways that differ most."""
    from cellrank_fm.plots import png_figure

    best = groups.assign(abs_diff=groups["difference"].abs()).sort_values(["fdr", "abs_diff"], ascending=[True, False])
    sets = list(dict.fromkeys(best["pathway"]))[:top]
    names = sorted(groups["group"].unique())
    mean = groups.pivot_table(index="group", columns="pathway", values="mean_auc").reindex(index=names, columns=sets)
    values = mean.to_numpy()
    z = (values - values.mean(0)) / (values.std(0) + 1e-12)
    with png_figure(path, size=(max(6.0, 0.35 * len(sets) + 3), max(3.0, 0.4 * len(names) + 2.8))) as (fig, ax):
        im = ax.imshow(z, cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(len(sets)), sets, rotation=90, fontsize=7)
        fig.colorbar(im, ax=ax, label="mean AUC, z-scored across groups")
        ax.set_title(f"pathway activity by {groupby} (recovery AUC over the top {max_rank} ranks)", fontsize=9)


def group_outputs(out: Path, column: str) -> tuple[Path, Path]:
    """Where `score --groupby` writes its table and heatmap, beside the output h5ad."""
    stem = out.name[: -len(".h5ad")] if out.name.endswith(".h5ad") else out.name
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in column)
    return out.with_name(f"{stem}.{safe}.pathways.csv"), out.with_name(f"{stem}.{safe}.heatmap.png")


def summary_table(adata: anndata.AnnData, key: str = KEY, groupby: str | None = None, top: int = 5):
    """A rich Table: the highest mean AUCs overall, or per group the sets higher there."""
    from rich.table import Table

    scores, names = adata.obsm[key], list(adata.uns[f"{key}_names"])
    if groupby is None:
        t = Table(title=f"pathway activity ({len(names)} sets, R = {adata.uns[key]['auc_max_rank']})")
        for col in ("pathway", "mean AUC", "cells scored"):
            t.add_column(col)
        means = np.nanmean(scores, axis=0)
        for j in np.argsort(-means)[:top]:
            t.add_row(names[j], f"{means[j]:.3f}", f"{int((~np.isnan(scores[:, j])).sum()):,}")
        return t
    t = Table(title=f"pathways that differ between {groupby} groups (rank-sum, FDR)")
    for col in ("group", f"top {top} higher in the group (difference in mean AUC, FDR)"):
        t.add_column(col)
    for g, sub in adata.uns[f"{key}_{groupby}"].groupby("group"):
        up = sub[sub["difference"] > 0].head(top)
        t.add_row(str(g), "; ".join(f"{r.pathway} ({r.difference:+.3f}, {r.fdr:.1e})" for r in up.itertuples()))
    return t
