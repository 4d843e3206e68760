"""Which genes decide a classifier's call: SHAP values over the gene-deletion game.

The game
--------
The players are the genes of one cell's rank-value sequence. A coalition S is that cell with
every other gene *removed*: the kept genes stay in their original order, as if they were the
only genes detected, so each moves up to its new rank. The value v(S) is the classifier's logit
for the explained class on that shortened sequence. The base value v(∅) is the *empty cell*:
the special tokens alone (``<cls> <eos>`` for V2 models); a V1 model has no special tokens, so
its empty cell is the mean of zero gene states — a zero vector — passed through the pooler and
classifier head. A gene's SHAP value is its Shapley value in this game, so the values of a cell
add up to ``logit(cell) − logit(empty cell)``.

Methods
-------
``permutation`` (default): ``shap.PermutationExplainer`` plays the game exactly as defined,
with antithetic permutations; every coalition becomes a token sequence and the sequences of a
permutation go through the model in large packed batches (variable-length attention on GPU).
The sampling error of each value is reported (the standard error over permutation halves), and
the additivity gap ``Σ values − (v(x) − v(∅))`` is reported per cell.

``gradient``: expected gradients (``shap.GradientExplainer``) on the gene embeddings, through
a wrapper that feeds ``inputs_embeds`` to the model. The baseline is the cell with every gene's
embedding zeroed — the embedding of ``<pad>`` — at its position, special tokens kept. It is
an approximation of the deletion game (a zeroed gene keeps its position, the others do not move
up), much cheaper (a few dozen forward/backward passes per cell), so it suits thousands of cells.
Its values add up to ``v(x) − v(baseline)``; that gap is reported too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from cellrank_fm.errors import UserError, atomic_path

if TYPE_CHECKING:
    import pandas as pd

    from cellrank_fm.inference import Cells
    from cellrank_fm.pathways import PathwayResult

METHODS = ("permutation", "gradient")
# The game's value: the explained class's logit, or that logit minus the mean of the other
# classes' logits ("contrast"), which cancels what raises every class alike.
VALUES = ("logit", "contrast")


# ----------------------------------------------------------------------------- the game's model


class Evaluator:
    """Runs a classifier on many token sequences in packed, token-budgeted batches.

    The batches are `inference.run_batches`'; the evaluator adds the empty cell (a V1 cell with
    every gene removed) and counts the model evaluations.
    """

    def __init__(self, model, info, tokens_per_batch: int = 65536, value: str = "logit"):
        if value not in VALUES:
            raise UserError(f"unknown --value {value!r}; use one of {', '.join(VALUES)}.")
        self.value = value
        self.model = model
        self.info = info
        self.device = next(model.parameters()).device
        self.tokens_per_batch = tokens_per_batch
        self.labels: list[str] = list(info.labels or [])
        special = (info.cellrank or {}).get("special_tokens") or {}
        ids = {v for k, v in special.items() if k in ("cls", "eos") and v is not None}
        ids |= set(model.config.special_token_ids or [])
        self.special_ids = np.array(sorted(ids), dtype=np.int64)
        self.evaluations = 0

    def split(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(leading special tokens, gene tokens in rank order, trailing special tokens)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        is_special = np.isin(tokens, self.special_ids)
        genes = np.flatnonzero(~is_special)
        if len(genes) == 0:
            return tokens, tokens[:0], tokens[:0]
        return tokens[: genes[0]], tokens[~is_special], tokens[genes[-1] + 1:]

    def _run(self, seqs: Sequence[np.ndarray], fn, width: int) -> np.ndarray:
        from cellrank_fm.inference import per_cell

        out = np.empty((len(seqs), width), dtype=np.float64)
        nonempty = [i for i, s in enumerate(seqs) if len(s)]
        if len(nonempty) < len(seqs):
            out[[i for i, s in enumerate(seqs) if not len(s)]] = self.empty_output(fn)
        if nonempty:
            out[nonempty] = per_cell(self.model, [seqs[i] for i in nonempty], fn, width,
                                     tokens_per_batch=self.tokens_per_batch, dtype=np.float64)
        self.evaluations += len(seqs)
        return out

    def logits(self, seqs: Sequence[np.ndarray]) -> np.ndarray:
        """Class logits [N, C] of token sequences (an empty sequence is the empty V1 cell)."""
        return self._run(seqs, self.model, len(self.labels))

    def values(self, seqs: Sequence[np.ndarray], classes: Sequence[int]) -> np.ndarray:
        """The game's value [N, k] of token sequences for `classes` (see `VALUES`)."""
        return game_value(self.logits(seqs), classes, self.value)

    def embeddings(self, seqs: Sequence[np.ndarray], layer: int = -1) -> np.ndarray:
        """Cell embeddings [N, H]: the mean of the gene tokens' hidden states after `layer`."""
        from cellrank_fm.model import pool

        special = [int(x) for x in self.special_ids]
        fn = lambda batch: pool(self.model.encode(batch, layer=layer), batch, "mean", special)  # noqa: E731
        return self._run(seqs, fn, self.model.config.hidden_size)

    def empty_output(self, fn) -> np.ndarray:
        """The output for a cell with no token at all (a V1 cell with every gene removed).

        Mean pooling over zero gene states gives a zero vector (as `model.pool` defines it);
        the classifier head is applied to that, and an embedding is the zero vector itself.
        """
        import torch

        width = self.model.config.hidden_size
        zero = torch.zeros(1, width, device=self.device)
        with torch.inference_mode():
            if fn is self.model:
                if self.model.config.pooling != "mean":
                    raise UserError("this model pools the <cls> token but its cells have none; the empty cell is undefined.")
                return self.model.classifier(self.model.bert.pooler(zero)).float().cpu().numpy()[0]
            return np.zeros(width)


def game_value(logits, classes: Sequence[int], value: str = "logit"):
    """Columns `classes` of [N, C] logits (NumPy or torch), or with "contrast" each minus the mean
    of the other classes' logits (for two classes: half the logit difference)."""
    chosen = logits[:, list(classes)]
    if value == "logit" or logits.shape[1] < 2:
        return chosen
    total = logits.sum(1)[:, None]
    return chosen - (total - chosen) / (logits.shape[1] - 1)


# ----------------------------------------------------------------------------- one cell


@dataclass
class CellValues:
    """SHAP values of one cell: [genes, classes] values (and standard errors), base, full."""

    genes: np.ndarray  # gene token ids in rank order
    values: np.ndarray  # [n_genes, n_classes]
    stderr: np.ndarray  # [n_genes, n_classes]; NaN where not estimated
    base: np.ndarray  # [n_classes] v(∅) (permutation) or v(baseline) (gradient)
    full: np.ndarray  # [n_classes] v(x)

    @property
    def additivity_gap(self) -> np.ndarray:
        return self.values.sum(0) - (self.full - self.base)


class _DeletionMasker:
    """shap masker for the deletion game: the masked input handed to the model is the
    coalition itself (a boolean row), and the model function turns it into a token sequence."""

    immutable_outputs = True

    def shape(self, x):
        return (1, x.shape[0])

    def mask_shapes(self, x):
        return [x.shape]

    def __call__(self, mask, x):
        return np.asarray(mask, dtype=bool)[None, :]


def coalition_sequences(prefix: np.ndarray, genes: np.ndarray, suffix: np.ndarray, masks: np.ndarray) -> list[np.ndarray]:
    """Token sequences of coalitions: kept genes in their original order, specials around them."""
    masks = np.asarray(masks, dtype=bool)
    counts = masks.sum(1)
    kept = np.broadcast_to(genes, masks.shape)[masks]
    parts = np.split(kept, np.cumsum(counts)[:-1])
    if len(prefix) == 0 and len(suffix) == 0:
        return parts
    return [np.concatenate([prefix, p, suffix]) for p in parts]


def permutation_values(evaluator: Evaluator, tokens: np.ndarray, classes: Sequence[int],
                       npermutations: int = 10, seed: int = 0) -> CellValues:
    """Shapley values of the deletion game for one cell by antithetic permutation sampling."""
    import shap

    prefix, genes, suffix = evaluator.split(tokens)
    classes = np.asarray(classes, dtype=np.int64)

    def game(masks: np.ndarray) -> np.ndarray:
        return evaluator.values(coalition_sequences(prefix, genes, suffix, masks), classes)

    full = game(np.ones((1, len(genes)), dtype=bool))[0]
    base = game(np.zeros((1, len(genes)), dtype=bool))[0]
    if len(genes) == 0:
        empty = np.zeros((0, len(classes)))
        return CellValues(genes, empty, empty, base, full)
    # shap shuffles with NumPy's global generator; seed it per cell so a cell's values do
    # not depend on which cells were explained before it.
    explainer = shap.PermutationExplainer(game, _DeletionMasker(), seed=int(seed))
    n_evals = 2 * len(genes) + 1
    res = explainer(
        np.arange(len(genes), dtype=np.float64)[None, :], max_evals=npermutations * n_evals,
        batch_size=n_evals, error_bounds=True, silent=True,
    )
    values = np.asarray(res.values[0], dtype=np.float64).reshape(len(genes), len(classes))
    # error_std is the spread over permutation halves (forward and reverse passes); the mean
    # of 2·npermutations of them has this standard error (conservative: the antithetic halves
    # are negatively correlated).
    std = np.asarray(res.error_std[0], dtype=np.float64).reshape(len(genes), len(classes))
    stderr = std / math.sqrt(2 * npermutations)
    return CellValues(genes, values, stderr, base, full)


def gradient_values(evaluator: Evaluator, tokens: np.ndarray, classes: Sequence[int],
                    nsamples: int = 64, seed: int = 0) -> CellValues:
    """Expected gradients on the gene embeddings against the zeroed-gene baseline (one cell)."""
    import shap
    import torch

    from cellrank_fm.batching import pack

    model = evaluator.model
    tokens = np.asarray(tokens, dtype=np.int64)
    is_gene = ~np.isin(tokens, evaluator.special_ids)
    classes = list(int(c) for c in classes)
    device = evaluator.device
    emb = model.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        x = emb[torch.from_numpy(tokens).to(device)].float()[None]  # [1, L, H]
    baseline = x.clone()
    baseline[0, torch.from_numpy(is_gene).to(device)] = 0.0
    packs: dict[int, object] = {}

    class EmbeddingInput(torch.nn.Module):
        """inputs_embeds [B, L, H] of copies of this cell → the explained logits [B, k]."""

        def forward(self, e):
            b = e.shape[0]
            if b not in packs:
                packs[b] = pack([tokens] * b, device)
            return game_value(model(packs[b], inputs_embeds=e.reshape(-1, e.shape[-1])), classes, evaluator.value)

    wrapper = EmbeddingInput()
    with torch.no_grad():
        full = wrapper(x)[0].double().cpu().numpy()
        base = wrapper(baseline)[0].double().cpu().numpy()
    explainer = shap.GradientExplainer(wrapper, baseline, batch_size=nsamples)
    with torch.enable_grad():
        sv = explainer.shap_values(x, nsamples=nsamples, rseed=int(seed))
    sv = np.asarray(sv, dtype=np.float64)
    # shap returns [1, L, H] for one output, [1, L, H, k] for several.
    if sv.ndim == 3:
        sv = sv[..., None]
    per_token = sv[0].sum(axis=1)  # [L, k]: sum over the embedding dimensions
    evaluator.evaluations += nsamples * len(classes) + 2
    values = per_token[is_gene]
    return CellValues(tokens[is_gene], values, np.full_like(values, np.nan), base, full)


# ----------------------------------------------------------------------------- many cells


@dataclass
class ExplainResult:
    """SHAP values of the explained cells, as tables, with `.plot()` and `.write()`.

    - `importance`: per class and gene — `mean_abs_shap` (over all the class's cells, a cell
      without the gene counting 0), `mean_shap`, `fraction_expressing`, `mean_shap_expressing`,
      `importance_rank`, `mean_rank`;
    - `values`: one row per cell × explained class × gene (`cell_id`, `class`, `gene_id`,
      `gene_symbol`, `rank`, `shap_value`, `shap_stderr`);
    - `cells`: per cell and class: group, prediction, logit, base logit, additivity gap.
    """

    values: pd.DataFrame
    cells: pd.DataFrame
    importance: pd.DataFrame
    method: str
    settings: dict = field(default_factory=dict)
    evaluations: int = 0
    pathways: PathwayResult | None = None  # the pathway game and aggregation, when gene sets were given

    @property
    def classes(self) -> list[str]:
        return sorted(self.importance["class"].unique())

    def top_genes(self, cls: str, k: int = 10, column: str = "gene_symbol") -> list[str]:
        """The `k` most important genes of class `cls` by mean |SHAP| (symbols, or `column="gene_id"`)."""
        return top_genes(self.importance, cls, k, column)

    def plot(self, kind: str = "top", cls: str | None = None, top: int = 20, ax=None):
        """Draw one figure and return its matplotlib Axes.

        kind: "top" (the class's top genes by mean |SHAP|), "beeswarm" (each cell's SHAP value per
        top gene, coloured by the gene's rank in the cell) or "heatmap" (class × gene signed mean
        SHAP for every class's top genes); `cls` defaults to the first class.
        """
        from cellrank_fm.plots import new_axes

        if kind not in _PLOTS:
            raise UserError(f"unknown plot {kind!r}; use one of {', '.join(_PLOTS)}.")
        cls = self.classes[0] if cls is None else cls
        if kind != "heatmap" and cls not in self.classes:
            raise UserError(f"no explained class {cls!r}; the classes are {', '.join(map(str, self.classes))}.")
        draw, size = _PLOTS[kind]
        ax = ax if ax is not None else new_axes(size(self, cls, top))
        draw(ax, self, cls, top)
        return ax

    def write(self, out_dir: str | Path, top: int = 20, overwrite: bool = False) -> Path:
        """Tables (Parquet and CSV) and PNG plots into `out_dir`, written whole or not at all; an
        existing non-empty `out_dir` is refused unless `overwrite`."""
        return write_outputs(self, out_dir, top=top, overwrite=overwrite)

    def summary(self, top: int = 5):
        """A rich Table: per class, cells explained, top genes, additivity gap and sampling error."""
        return summary_table(self, top=top)


def select_cells(labels: Sequence[str], per_class: int | None, seed: int) -> np.ndarray:
    """Indices of the cells to explain: all, or up to `per_class` per class sampled with `seed`."""
    labels = np.asarray([str(x) for x in labels], dtype=object)
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = []
    for cls in sorted(set(labels)):
        idx = np.flatnonzero(labels == cls)
        picked.append(np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False)))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def class_indices(labels: Sequence[str], names: Sequence[str] | None, what: str) -> list[int]:
    """Positions of class `names` among the model's `labels`; UserError for an unknown name."""
    if names is None:
        return list(range(len(labels)))
    out = []
    for name in names:
        if name not in labels:
            raise UserError(f"{what} {name!r} is not a class of this model; its classes are {', '.join(map(str, labels))}.")
        out.append(list(labels).index(name))
    return out


def explain_cells(
    evaluator: Evaluator,
    cells: Cells,
    *,
    method: str = "permutation",
    label_column: str | None = None,
    classes: Sequence[str] | None = None,
    all_classes: bool = False,
    per_class: int | None = None,
    npermutations: int = 10,
    nsamples: int = 64,
    seed: int = 0,
    symbols: dict[str, str] | None = None,
    gene_sets=None,
    quiet: bool = False,
) -> ExplainResult:
    """Explain cells of `cells` with `method`; see the module docstring for the game.

    Each cell is explained for its *group* class — its true class from `label_column`, or the
    model's prediction when no column is given — and with `all_classes` for every class too.
    `classes` keeps only the cells whose group is one of them. `per_class` samples that many
    cells per group with `seed`. With `gene_sets` (`genesets.GeneSets`), the same cells and
    classes are also explained by the pathway game, and the result's `pathways` holds it.
    """
    import pandas as pd

    from cellrank_fm.progress import progress_bar

    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; use one of {', '.join(METHODS)}.")
    labels = evaluator.labels
    predicted = evaluator.logits(cells.tokens).argmax(1)
    if label_column is not None:
        if label_column not in cells.obs.columns:
            raise UserError(f"the input has no column {label_column!r}; it has {', '.join(map(str, cells.obs.columns))}.")
        group = [str(v) for v in cells.obs[label_column].to_numpy()]
        unknown = sorted(set(group) - set(labels))
        if unknown:
            raise UserError(
                f"{label_column!r} holds {unknown[0]!r}, which is not a class of this model "
                f"(classes: {', '.join(labels)}); pick the column the model was trained on."
            )
    else:
        group = [labels[k] for k in predicted]
    group_arr = np.asarray(group, dtype=object)
    if classes is not None:
        class_indices(labels, classes, "class")
        eligible = np.flatnonzero(np.isin(group_arr, list(classes)))
    else:
        eligible = np.arange(len(cells))
    chosen = eligible[select_cells(group_arr[eligible], per_class, seed)]
    if len(chosen) == 0:
        raise UserError("no cell to explain: no cell belongs to the requested classes.")

    vocab_inv = {v: k for k, v in (evaluator.info.vocabulary or {}).items()}
    symbols = symbols if symbols is not None else (evaluator.info.symbols or {})
    seeds = np.random.SeedSequence(seed).generate_state(len(cells), dtype=np.uint32)
    value_frames, cell_rows = [], []
    total_genes = int(sum(len(evaluator.split(cells.tokens[i])[1]) for i in chosen))
    set_game = None
    if gene_sets is not None:
        from cellrank_fm.pathways import PathwayGame

        set_game = PathwayGame(evaluator, gene_sets, npermutations)
    with progress_bar("genes", quiet=quiet) as bar:
        task = bar.add_task(f"explaining {len(chosen)} cells ({method})", total=total_genes)
        for i in chosen:
            own = labels.index(group[i])
            explained = list(range(len(labels))) if all_classes else [own]
            fn = permutation_values if method == "permutation" else gradient_values
            kw = dict(npermutations=npermutations) if method == "permutation" else dict(nsamples=nsamples)
            cv = fn(evaluator, cells.tokens[i], explained, seed=int(seeds[i]), **kw)
            n = len(cv.genes)
            gene_ids = [vocab_inv.get(int(t), str(int(t))) for t in cv.genes]
            gaps = cv.additivity_gap
            for j, k in enumerate(explained):
                value_frames.append(pd.DataFrame({
                    "cell_id": cells.cell_ids[i],
                    "class": labels[k],
                    "gene_id": gene_ids,
                    "gene_symbol": [symbols.get(g, g) for g in gene_ids],
                    "rank": np.arange(1, n + 1, dtype=np.int32),
                    "shap_value": cv.values[:, j],
                    "shap_stderr": cv.stderr[:, j],
                }))
                cell_rows.append({
                    "cell_id": cells.cell_ids[i], "group": group[i], "predicted": labels[predicted[i]],
                    "class": labels[k], "n_genes": n, "logit": cv.full[j], "base_logit": cv.base[j],
                    "sum_shap": float(cv.values[:, j].sum()), "additivity_gap": float(gaps[j]),
                    "median_stderr": float(np.nanmedian(cv.stderr[:, j])) if n and method == "permutation" else np.nan,
                })
            if set_game is not None:
                set_game.add(cells.cell_ids[i], group[i], cells.tokens[i], explained, int(seeds[i]))
            bar.advance(task, n)
    values = pd.concat(value_frames, ignore_index=True)
    cells_df = pd.DataFrame(cell_rows)
    importance = class_importance(values, cells_df)
    return ExplainResult(values, cells_df, importance, method, settings=dict(
        method=method, label_column=label_column, per_class=per_class, npermutations=npermutations,
        nsamples=nsamples, seed=seed, all_classes=all_classes, classes=list(classes) if classes else None,
        value=evaluator.value,
    ), evaluations=evaluator.evaluations,
        pathways=None if set_game is None else set_game.result(importance, values, seed=seed))


def class_importance(values, cells) -> "object":
    """Per class, each gene's importance over the cells of that class (its group).

    mean_abs_shap and mean_shap average over *all* cells of the class, a cell that does not
    express the gene counting as 0; fraction_expressing is the share of those cells that have
    it; mean_shap_expressing averages over those cells only.
    """
    import pandas as pd

    own = values.merge(cells[["cell_id", "class", "group"]], on=["cell_id", "class"])
    own = own[own["class"] == own["group"]]
    n_cells = cells[cells["class"] == cells["group"]].groupby("class")["cell_id"].nunique()
    own = own.assign(abs_shap=own["shap_value"].abs())
    g = own.groupby(["class", "gene_id"], sort=False)
    out = g.agg(
        gene_symbol=("gene_symbol", "first"),
        sum_abs=("abs_shap", "sum"),
        sum_shap=("shap_value", "sum"),
        n_expressing=("shap_value", "size"),
        mean_rank=("rank", "mean"),
    ).reset_index()
    cells_in_class = out["class"].map(n_cells).astype(float)
    out["n_cells"] = cells_in_class.astype(int)
    out["mean_abs_shap"] = out["sum_abs"] / cells_in_class
    out["mean_shap"] = out["sum_shap"] / cells_in_class
    out["fraction_expressing"] = out["n_expressing"] / cells_in_class
    out["mean_shap_expressing"] = out["sum_shap"] / out["n_expressing"]
    out = out.drop(columns=["sum_abs", "sum_shap"])
    out = out.sort_values(["class", "mean_abs_shap"], ascending=[True, False], kind="stable")
    out["importance_rank"] = out.groupby("class").cumcount() + 1
    cols = ["class", "importance_rank", "gene_id", "gene_symbol", "mean_abs_shap", "mean_shap",
            "fraction_expressing", "mean_shap_expressing", "n_expressing", "n_cells", "mean_rank"]
    return pd.DataFrame(out[cols]).reset_index(drop=True)


def top_genes(importance, cls: str, k: int = 10, column: str = "gene_id") -> list[str]:
    """The `k` most important genes of class `cls` (by mean |SHAP|)."""
    sub = importance[importance["class"] == cls].sort_values("mean_abs_shap", ascending=False)
    return list(sub[column].head(k))


# ----------------------------------------------------------------------------- outputs


def write_outputs(result: ExplainResult, out_dir: str | Path, top: int = 20, overwrite: bool = False) -> Path:
    """Parquet/CSV tables and PNG plots into `out_dir` (written whole or not at all)."""
    from cellrank_fm.errors import write_json
    from cellrank_fm.outputs import new_directory

    out_dir = Path(out_dir)
    with new_directory(out_dir, overwrite), atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        result.values.to_parquet(tmp / "shap_values.parquet", index=False)
        result.cells.to_parquet(tmp / "cells.parquet", index=False)
        result.importance.to_parquet(tmp / "gene_importance.parquet", index=False)
        result.importance.to_csv(tmp / "gene_importance.csv", index=False)
        settings = result.settings if result.pathways is None else {**result.settings, **result.pathways.settings}
        write_json(settings, tmp / "settings.json")
        plot_importance(result, tmp, top=top)
        if result.pathways is not None:
            result.pathways.write_into(tmp, top=top)
    return out_dir


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def plot_importance(result: ExplainResult, out_dir: Path, top: int = 20) -> list[Path]:
    """Top genes per class (bars), a beeswarm per class and a class × gene heatmap."""
    from cellrank_fm.plots import png_figure

    written = []
    for kind, cls in [(k, c) for c in result.classes for k in ("top", "beeswarm")] + [("heatmap", None)]:
        draw, size = _PLOTS[kind]
        name = "heatmap.png" if cls is None else f"{'top_genes' if kind == 'top' else kind}_{_safe(cls)}.png"
        with png_figure(out_dir / name, size=size(result, cls, top)) as (fig, ax):
            draw(ax, result, cls, top)
        written.append(out_dir / name)
    return written


def _top(result: ExplainResult, cls: str, top: int):
    imp = result.importance
    return imp[imp["class"] == cls].head(top)


def _draw_top(ax, result: ExplainResult, cls: str, top: int) -> None:
    from cellrank_fm.plots import draw_bars

    sub = _top(result, cls, top)
    draw_bars(ax, list(sub["gene_symbol"]), sub["mean_abs_shap"],
              title=f"{cls}: top genes by mean |SHAP| ({result.method})", xlabel="mean |SHAP| (logit)")


def _draw_beeswarm(ax, result: ExplainResult, cls: str, top: int) -> None:
    """Each dot a cell: its SHAP value for the gene, coloured by the gene's rank in the cell."""
    sub = _top(result, cls, top)
    gene_ids, gene_symbols = list(sub["gene_id"]), list(sub["gene_symbol"])
    vals = result.values
    own = vals[(vals["class"] == cls)]
    own = own[own["cell_id"].isin(result.cells.loc[result.cells["group"] == cls, "cell_id"])]
    rng = np.random.default_rng(0)
    sc = None
    for row, gid in enumerate(gene_ids):
        g = own[own["gene_id"] == gid]
        y = len(gene_ids) - 1 - row + rng.uniform(-0.3, 0.3, size=len(g))
        sc = ax.scatter(g["shap_value"], y, c=np.log10(g["rank"].to_numpy()), cmap="coolwarm_r", s=6,
                        linewidths=0, vmin=0, vmax=max(1.0, np.log10(max(2, vals["rank"].max()))))
    ax.axvline(0, color="grey", linewidth=0.6)
    ax.set_yticks(range(len(gene_ids))[::-1], gene_symbols, fontsize=8)
    ax.set_xlabel("SHAP value (logit)")
    ax.set_title(f"{cls}: SHAP value per cell ({result.method})")
    if sc is not None:
        ax.figure.colorbar(sc, ax=ax, label="log10 rank in cell (red = top-ranked)")


def _heatmap_genes(result: ExplainResult, top: int) -> list[str]:
    """Each class's top genes (at most 10 per class), in class order, each once."""
    imp, per_class = result.importance, max(3, min(10, top))
    genes: list[str] = []
    for cls in result.classes:
        genes += [g for g in imp[imp["class"] == cls].head(per_class)["gene_id"] if g not in genes]
    return genes


def _draw_heatmap(ax, result: ExplainResult, cls: str | None, top: int) -> None:
    """Signed mean SHAP of each class's top genes, for every class (columns: genes)."""
    imp, classes, genes = result.importance, result.classes, _heatmap_genes(result, top)
    table = imp.pivot_table(index="class", columns="gene_id", values="mean_shap", fill_value=0.0)
    table = table.reindex(index=classes, columns=genes, fill_value=0.0)
    sym = imp.drop_duplicates("gene_id").set_index("gene_id")["gene_symbol"]
    lim = float(np.abs(table.to_numpy()).max()) or 1.0
    im = ax.imshow(table.to_numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xticks(range(len(genes)), [sym.get(g, g) for g in genes], rotation=90, fontsize=7)
    ax.figure.colorbar(im, ax=ax, label="mean SHAP (own-class cells)")
    ax.set_title("class × gene importance")


def _heatmap_size(result: ExplainResult, cls: str | None, top: int) -> tuple[float, float]:
    return (max(6.0, 0.3 * len(_heatmap_genes(result, top)) + 2), max(3.0, 0.4 * len(result.classes) + 1.5))


def _bars_size(result: ExplainResult, cls: str, top: int) -> tuple[float, float]:
    from cellrank_fm.plots import bar_size

    return bar_size(len(_top(result, cls, top)))


def _beeswarm_size(result: ExplainResult, cls: str, top: int) -> tuple[float, float]:
    return (7, max(3.0, 0.3 * len(_top(result, cls, top)) + 1.2))


# kind -> (draw on an Axes, figure size), each called with (result, class, top genes)
_PLOTS = {
    "top": (_draw_top, _bars_size),
    "beeswarm": (_draw_beeswarm, _beeswarm_size),
    "heatmap": (_draw_heatmap, _heatmap_size),
}


def summary_table(result: ExplainResult, top: int = 5):
    """A rich Table: per class, cells explained, top genes, additivity gap and sampling error."""
    from rich.table import Table

    t = Table(title=f"SHAP gene importance ({result.method})")
    for col in ("class", "cells", f"top {top} genes (mean |SHAP|)", "median |gap|", "median stderr"):
        t.add_column(col)
    cells = result.cells[result.cells["class"] == result.cells["group"]]
    for cls, sub in cells.groupby("class"):
        genes = top_genes(result.importance, cls, top, column="gene_symbol")
        stderr = sub["median_stderr"].median()
        t.add_row(str(cls), str(len(sub)), ", ".join(genes), f"{sub['additivity_gap'].abs().median():.2e}",
                  "-" if np.isnan(stderr) else f"{stderr:.3g}")
    return t
