"""The Python API: `import cellrank_fm as cfm`. Every `cellrank` command is a thin wrapper over
one of these functions.

Conventions (scanpy's): functions that annotate cells take an AnnData — in memory or backed —
or the path of an .h5ad file, write their results into `obs` / `obsm` / `uns` under
`key_added`, and return None (or, with `copy=True`, a copy holding the results; a path is
opened backed and the AnnData returned). Functions that answer a question return a result
object with DataFrames inside, `.plot()` and `.write()`. `layer=` names the layer holding the
raw counts ("raw" for `raw.X`); `progress=False` turns progress bars and messages off. A
model is a model directory, a `cfm.load_model(...)` result, or what `cfm.finetune` returned.
Errors a user can cause raise `cellrank_fm.errors.UserError` with the command line's sentence.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

from cellrank_fm.errors import UserError
from cellrank_fm.inference import LoadedModel, TrainedModel, is_anndata, load_model

if TYPE_CHECKING:
    import anndata
    import pandas as pd

    from cellrank_fm.explain import ExplainResult
    from cellrank_fm.genesets import GeneSets
    from cellrank_fm.perturb import PerturbResult
    from cellrank_fm.shards import ShardSet

PathLike = Union[str, os.PathLike]
Model = Union[LoadedModel, TrainedModel, PathLike]
Cells = Union["anndata.AnnData", PathLike]
# Gene sets: a file (GMT, two-column CSV/TSV, the MitoCarta3.0 table), a list of files, a dict
# {set name: genes (symbols or Ensembl IDs)}, or a `genesets.GeneSets` already resolved.
GeneSetSource = Union[PathLike, Sequence[PathLike], "dict[str, Sequence[str]]", "GeneSets"]

__all__ = ["tokenize", "tokenize_anndata", "medians", "load_model", "pretrain", "finetune", "baseline",
           "predict", "embed", "explain", "perturb", "score"]


# ----------------------------------------------------------------------------- helpers


def _target(data: Cells, copy: bool) -> tuple[anndata.AnnData, bool]:
    """(the AnnData to write results into, whether to return it)."""
    from cellrank_fm.inference import open_h5ad

    if is_anndata(data):
        if not copy:
            return data, False
        return (data.to_memory() if data.isbacked else data.copy()), True
    adata = open_h5ad(data)
    if copy:
        loaded = adata.to_memory()
        adata.file.close()
        return loaded, True
    return adata, True


def _name(data: Any) -> str:
    return "the AnnData" if is_anndata(data) else os.fspath(data)


def _names(value: str | Sequence[str] | None) -> list[str] | None:
    """A list of names from a list or a comma-separated string (None when empty)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(v).strip() for v in items if str(v).strip()]
    return items or None


def _gene_sets(lm, gene_sets, level: int | None, min_size: int, sets, symbols: dict, progress: bool):
    """The requested gene sets resolved against the model (None without `gene_sets`)."""
    names = None if isinstance(sets, str) and sets.strip().lower() == "all" else _names(sets)
    if gene_sets is None:
        if names is not None or level is not None:
            raise UserError("--sets and --gene-set-level need --gene-sets FILE.")
        return None
    from cellrank_fm.genesets import gene_sets_for_model

    return gene_sets_for_model(lm, gene_sets, level=level, min_size=min_size, names=names, extra_symbols=symbols,
                               progress=progress)


# ----------------------------------------------------------------------------- data


def tokenize(
    data: Cells | Sequence[Cells],
    *,
    out: PathLike,
    vocab: PathLike | dict[str, int],
    medians: PathLike | dict[str, float],
    gene_map: Sequence[PathLike] = (),
    genes: PathLike | Sequence[str] | None = None,
    genes_column: str | None = None,
    keep_obs: str | Sequence[str] = (),
    model_version: str = "v1",
    model_input_size: int | None = None,
    gene_id_column: str | None = None,
    layer: str | None = None,
    cell_id_column: str | None = None,
    orientation: str = "auto",
    allow_float: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    chunk_cells: int = 2048,
    part_cells: int = 65536,
    progress: bool = True,
) -> ShardSet:
    """Tokenize raw counts into a rank-value token shard directory (Geneformer's encoding).

    Each cell's counts are divided by its total and by each gene's median, ranked, and the top
    genes kept as token ids; see `cellrank tokenize --help` for every option.

    Args:
        data: AnnData objects (in memory or backed), input files (.h5ad, .loom, 10x .h5,
            .csv/.tsv/.parquet) or directories (Matrix Market, TileDB-SOMA experiment, or a
            folder of inputs), or a list of them — all become one shard set.
        out: the shard directory to write.
        vocab, medians: token dictionary and gene medians (paths, e.g. Geneformer's .pkl, or dicts).
        gene_map: symbol/alias/old-ID -> Ensembl ID tables.
        genes: keep only these genes: a gene-set file, or a list of IDs or symbols.
        keep_obs: obs columns to carry into the shards (labels for `finetune`).
        model_version: "v1" (2,048 genes per cell) or "v2" (4,096 tokens, <cls> and <eos>).
        layer: layer holding the raw counts ("raw" for raw.X); default X.

    Returns:
        The shard set (a path-like object: `len(shards)` cells, `shards.manifest`).

    Example:
        >>> shards = cfm.tokenize(adata, out="shards/", vocab="gf/token_dictionary_gc30M.pkl",
        ...                       medians="gf/gene_median_dictionary_gc30M.pkl", keep_obs=["condition"])
    """
    from cellrank_fm.shards import ShardSet
    from cellrank_fm.tokenize import Dictionaries, TokenizeSettings, tokenize_files

    dicts = Dictionaries.load(vocab, medians, gene_map, genes, genes_column)
    settings = TokenizeSettings(
        model_version=model_version.lower(), model_input_size=model_input_size, gene_id_column=gene_id_column,
        layer=layer, orientation=orientation, allow_float=allow_float, keep_obs=_names(keep_obs) or [],
        cell_id_column=cell_id_column, part_cells=part_cells,
        genes_file=str(genes) if isinstance(genes, (str, os.PathLike)) else None, genes_column=genes_column,
    )
    tokenize_files(data, out, dicts, settings, chunk_cells=chunk_cells, resume=resume, overwrite=overwrite,
                   quiet=not progress)
    return ShardSet(out)


def tokenize_anndata(data: Cells, model: Model, *, layer: str | None = None, gene_id_column: str | None = None,
                     gene_map: Sequence[PathLike] = (), device: str = "auto") -> pd.DataFrame:
    """Tokenize cells in memory as `model` was trained (no files): a token table.

    Returns:
        A DataFrame indexed like `obs`: `input_ids` (one token array per cell, empty for a cell
        without any vocabulary gene) and `length`.

    Example:
        >>> tokens = cfm.tokenize_anndata(adata, "classifier/")
        >>> tokens["length"].describe()
    """
    import numpy as np
    import pandas as pd

    from cellrank_fm.inference import as_model, open_h5ad, tokenized_chunks

    lm = as_model(model, device=device, gene_id_column=gene_id_column, gene_map=gene_map)
    adata = data if is_anndata(data) else open_h5ad(data)
    try:
        tokens: list[np.ndarray] = []
        for _, toks, _ in tokenized_chunks(adata, lm, layer=layer):
            tokens.extend(toks)
        index = adata.obs_names.copy()
    finally:
        if adata is not data:
            adata.file.close()
    return pd.DataFrame({"input_ids": pd.Series(tokens, index=index, dtype=object),
                         "length": np.array([len(t) for t in tokens], dtype=np.uint32)}, index=index)


def medians(
    data: Cells | Sequence[Cells],
    *,
    out: PathLike | None = None,
    vocab: PathLike | dict[str, int] | None = None,
    gene_map: Sequence[PathLike] = (),
    gene_id_column: str | None = None,
    layer: str | None = None,
    orientation: str = "auto",
    sketch_out: PathLike | None = None,
    relative_accuracy: float = 0.001,
    progress: bool = True,
) -> dict[str, float]:
    """Each gene's nonzero median of count / cell total x 10,000 over a corpus (one streaming pass).

    Args:
        data: AnnData objects, input files or directories (as for `tokenize`).
        out: also write gene -> median as JSON here.
        vocab: sketch only these genes (needed for pieces of a corpus merged later).
        sketch_out: also save the mergeable sketch (`cellrank medians --merge`).

    Example:
        >>> med = cfm.medians(adata, out="medians.json", gene_map=["gf/gene_name_id_dict_gc30M.pkl"])
    """
    from cellrank_fm.medians import compute_medians

    return compute_medians(data, out, vocab_path=vocab, mapping_paths=gene_map, gene_id_column=gene_id_column,
                           layer=layer, orientation=orientation, sketch_out=sketch_out,
                           relative_accuracy=relative_accuracy, quiet=not progress)


# ----------------------------------------------------------------------------- training


def pretrain(
    shards: ShardSet | PathLike,
    *,
    out: PathLike,
    preset: str | None = None,
    config: PathLike | None = None,
    from_model: PathLike | None = None,
    val: ShardSet | PathLike | None = None,
    val_fraction: float = 0.05,
    val_max_cells: int = 5000,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **train_options: Any,
) -> TrainedModel:
    """Pretrain a transformer on token shards by masked-gene modelling.

    Args:
        shards: a shard directory (`cfm.tokenize`).
        out: the model directory to write.
        preset: "tiny" (default), "geneformer-v1", "geneformer-v2-104m", "geneformer-v2-316m";
            or `config`, a HuggingFace BertConfig JSON; or `from_model` to continue pretraining.
        val: held-out shards for validation (default: `val_fraction` of `shards`).
        resume: continue the interrupted run in `out`; overwrite: replace what `out` holds.
        **train_options: `cellrank_fm.train.TrainConfig` fields, with `cellrank pretrain`'s
            defaults — max_steps, lr (default: 3e-3 x 64 / hidden size), warmup_steps (default:
            5% of max_steps), schedule, weight_decay, tokens_per_batch, grad_accum, grad_clip,
            eval_every, checkpoint_every (default 500), seed, bf16, compile, device, max_seconds.

    Returns:
        The model directory with the run summary (`.summary`); pass it to `cfm.embed` etc.

    Example:
        >>> pre = cfm.pretrain(shards, out="pretrained/", preset="tiny", max_steps=500)
    """
    from cellrank_fm.pretrain import pretrain as run
    from cellrank_fm.train import TrainConfig

    # The command line's defaults where TrainConfig's differ: warm-up over 5% of the steps, the
    # width-scaled rate (None: `pretrain.default_lr`), a resumable checkpoint every 500 steps.
    max_steps = train_options.get("max_steps", TrainConfig.max_steps)
    train_options.setdefault("warmup_steps", max_steps // 20)
    train_options.setdefault("lr", None)
    train_options.setdefault("checkpoint_every", 500)
    cfg = TrainConfig(quiet=not progress, **train_options)
    summary = run(shards, out, preset=preset, config=os.fspath(config) if config else None,
                  from_dir=os.fspath(from_model) if from_model else None,
                  val_shards_dir=os.fspath(val) if val else None,
                  val_fraction=val_fraction, val_max_cells=val_max_cells, resume=resume, overwrite=overwrite,
                  train_config=cfg)
    return TrainedModel(Path(out), summary, device=cfg.device)


def finetune(
    shards: ShardSet | PathLike,
    *,
    out: PathLike,
    label: str | None = None,
    gene_labels: PathLike | None = None,
    from_model: Model | None = None,
    preset: str | None = None,
    baseline: bool | anndata.AnnData | Sequence[anndata.AnnData] = False,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> TrainedModel:
    """Fine-tune a cell classifier (`label`) or a gene classifier (`gene_labels`) on token shards.

    Cells are split train / validation / test (stratified by label); training keeps the best
    checkpoint by validation macro-F1. With `gene_labels` (a CSV with one column per gene
    class), genes are cross-validated in folds, then a final model is trained on them all.

    Args:
        shards: a shard directory with the label column kept (`tokenize(..., keep_obs=[label])`).
        out: the output directory (must not exist or be empty).
        from_model: a pretrained model (ours or a HuggingFace Geneformer directory); or `preset`
            to train from scratch.
        baseline: also fit the logistic-regression baseline (and the token probe) on the same
            split. For shards tokenized from an AnnData held in memory, pass that AnnData (or
            the list of them, in tokenizing order) instead of True: the baseline reads its counts.
        resume: continue an interrupted cell-classification run in `out` (same result as one
            run); overwrite: replace what `out` holds.
        **options: fields of `FinetuneOptions` (or `GeneTaskOptions` with `gene_labels`), both
            `from cellrank_fm.finetune import ...` — epochs, lr, tokens_per_batch, patience, freeze_layers, pooling,
            seed, split_by, split_column, validation_fraction, test_fraction, device, ...

    Returns:
        The classifier (`.metrics`: test-split accuracy, macro-F1, per-class figures); pass it
        to `cfm.predict`, `cfm.explain`, ...

    Example:
        >>> clf = cfm.finetune(shards, out="classifier/", label="condition", from_model="pretrained/")
        >>> clf.metrics["macro_f1"]
    """
    from cellrank_fm.finetune import FinetuneOptions, GeneTaskOptions, finetune_cells, finetune_genes

    source = os.fspath(from_model) if from_model is not None else None
    options = {k: v for k, v in options.items() if v is not None}  # None: the option's default
    if gene_labels is not None:
        if label is not None:
            raise UserError("give --label for cell classification or --gene-labels for gene classification, not both.")
        opts = GeneTaskOptions(from_model=source, preset=preset, quiet=not progress, **options)
        metrics = finetune_genes(shards, out, gene_labels, opts, overwrite=overwrite)
        return TrainedModel(Path(out) / "model", {"metrics": metrics}, device=opts.device)
    if label is None:
        raise UserError("cell classification needs --label COLUMN (a metadata column kept in the shards).")
    opts = FinetuneOptions(label=label, from_model=source, preset=preset, quiet=not progress, **options)
    result = finetune_cells(shards, out, opts, with_baseline=baseline is not False, resume=resume, overwrite=overwrite,
                            baseline_adata=() if isinstance(baseline, bool) else baseline)
    return TrainedModel(Path(out), result, device=opts.device)


def baseline(
    data: ShardSet | Cells,
    *,
    label: str,
    adata: anndata.AnnData | Sequence[anndata.AnnData] = (),
    n_top_genes: int = 2000,
    class_weight: bool = True,
    seed: int = 0,
    split_by: str | None = None,
    split_column: str | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    min_class_size: int = 10,
) -> dict:
    """Logistic regression on log-normalised highly variable genes, on the same split as `finetune`.

    Args:
        data: a shard directory (the counts are read back from its input files), an input file,
            or an AnnData (in memory or backed).
        adata: with shards tokenized from an AnnData held in memory: that AnnData (or the
            list of them, in tokenizing order), whose counts have no file to be read back from.

    Returns:
        The test-split metrics (accuracy, macro_f1, per_class, confusion_matrix, ...).

    Example:
        >>> cfm.baseline(shards, label="condition")["macro_f1"]
    """
    from cellrank_fm.baseline import load_table, run_baseline

    return run_baseline(data, label, table=load_table(data, adata), n_top_genes=n_top_genes, class_weight=class_weight,
                        seed=seed, split_by=split_by, split_column=split_column, validation_fraction=validation_fraction,
                        test_fraction=test_fraction, min_class_size=min_class_size)


# ----------------------------------------------------------------------------- applying a model


def predict(
    model: Model,
    adata: Cells,
    *,
    key_added: str = "cellrank",
    layer: str | None = None,
    copy: bool = False,
    gene_id_column: str | None = None,
    gene_map: Sequence[PathLike] = (),
    tokens_per_batch: int = 32768,
    device: str = "auto",
    compile: bool = False,
    progress: bool = True,
) -> anndata.AnnData | None:
    """Classify cells with a fine-tuned cell classifier.

    The cells are tokenized with the model's own vocabulary, medians and gene set, in row
    chunks (a backed AnnData is never loaded whole). Writes obs `{key_added}_label` (categorical;
    missing for a cell without any vocabulary gene) and `{key_added}_confidence` (the top
    probability), obsm `{key_added}_proba` (cells x classes), uns `{key_added}_proba_classes`
    (its columns) and uns `{key_added}` (model, counts).

    Args:
        model: a cell classifier (directory, `cfm.load_model(...)` or `cfm.finetune(...)`).
        adata: raw counts: an AnnData (in memory or backed) or an .h5ad path.
        layer: the layer holding raw counts ("raw" for raw.X); default X.
        copy: return a copy with the results instead of writing into `adata`.
        gene_id_column, gene_map: how the input names its genes (default: as the model's shards).
        device: where a model given as a directory runs ("auto": the GPU when there is one).
        compile: `torch.compile` the model's encoder (faster on a GPU for large inputs).

    Returns:
        None, or the annotated AnnData with `copy=True` or a path.

    Example:
        >>> cfm.predict("classifier/", adata)
        >>> adata.obs["cellrank_label"].value_counts()
    """
    from cellrank_fm.inference import as_model, require_cell_classifier
    from cellrank_fm.predict import class_probabilities, write_predictions

    lm = as_model(model, device=device, gene_id_column=gene_id_column, gene_map=gene_map, compile=compile)
    require_cell_classifier(lm)
    target, give_back = _target(adata, copy)
    proba, ok = class_probabilities(lm, target, layer=layer, tokens_per_batch=tokens_per_batch, quiet=not progress)
    write_predictions(target, lm, proba, ok, key_added)
    return target if give_back else None


def embed(
    model: Model,
    adata: Cells,
    *,
    key_added: str = "X_cellrank",
    hidden_layer: int = -1,
    pooling: str | None = None,
    genes: bool = False,
    umap: bool = False,
    seed: int = 0,
    layer: str | None = None,
    copy: bool = False,
    gene_id_column: str | None = None,
    gene_map: Sequence[PathLike] = (),
    tokens_per_batch: int = 32768,
    device: str = "auto",
    compile: bool = False,
    progress: bool = True,
) -> anndata.AnnData | None:
    """Cell embeddings from any model (pretrained or fine-tuned) into obsm `key_added`.

    The hidden states of `hidden_layer` (-1 last, -2 second last, 0 the embeddings) pooled per
    cell: the <cls> token (V2 models) or the mean of the gene tokens (V1); `pooling` overrides.
    Cells without any vocabulary gene get NaN rows. Also writes uns `<name>_embedding` (the
    settings; `<name>` is `key_added` without its "X_"), with `genes=True` uns
    `<name>_gene_embeddings` (each gene's mean contextual embedding over these cells: gene_id,
    symbol, occurrences, dim_0...), and with `umap=True` obsm `{key_added}_umap` (umap-learn,
    seeded by `seed`).

    Args:
        model: any model (directory, `cfm.load_model(...)`, `cfm.pretrain(...)`).
        adata: raw counts: an AnnData (in memory or backed) or an .h5ad path.
        layer: the layer holding raw counts ("raw" for raw.X); default X.
        copy: return a copy with the results instead of writing into `adata`.
        compile: `torch.compile` the model's encoder (faster on a GPU for large inputs).

    Returns:
        None, or the annotated AnnData with `copy=True` or a path.

    Example:
        >>> cfm.embed("pretrained/", adata, key_added="X_cellrank", umap=True)
        >>> sc.pl.embedding(adata, "X_cellrank_umap", color="condition")
    """
    import numpy as np

    from cellrank_fm.embed import embed_cells, require_umap, umap_coords
    from cellrank_fm.inference import as_model

    if umap:
        require_umap()
    lm = as_model(model, device=device, gene_id_column=gene_id_column, gene_map=gene_map, compile=compile)
    target, give_back = _target(adata, copy)
    x, ok, pooling, gene_df = embed_cells(lm, target, hidden_layer=hidden_layer, pooling=pooling, genes=genes,
                                          layer=layer, tokens_per_batch=tokens_per_batch, source=_name(adata),
                                          quiet=not progress)
    base = key_added.removeprefix("X_")
    target.obsm[key_added] = x
    if umap:
        coords = np.full((len(x), 2), np.nan, dtype=np.float32)
        coords[ok] = umap_coords(x[ok], seed=seed)
        target.obsm[f"{key_added}_umap"] = coords
    target.uns[f"{base}_embedding"] = {"model": str(lm.path), "layer": int(hidden_layer), "pooling": pooling,
                                       "cells": int(len(x)), "untokenized": int((~ok).sum())}
    if gene_df is not None:
        target.uns[f"{base}_gene_embeddings"] = gene_df
    return target if give_back else None


def explain(
    model: Model,
    data: Cells | ShardSet,
    *,
    label: str | None = None,
    classes: str | Sequence[str] | None = None,
    all_classes: bool = False,
    per_class: int | None = None,
    method: str = "permutation",
    permutations: int = 10,
    samples: int = 64,
    seed: int = 0,
    value: str = "logit",
    gene_sets: GeneSetSource | None = None,
    gene_set_level: int | None = None,
    min_set_size: int = 5,
    layer: str | None = None,
    tokens_per_batch: int = 65536,
    device: str = "auto",
    compile: bool = False,
    progress: bool = True,
) -> ExplainResult:
    """Which genes decide each class: SHAP values of the gene-deletion game.

    A coalition of a cell's genes is the cell with the other genes removed (the kept genes in
    their order); its value is the classifier's logit for the explained class; the base value is
    the empty cell. `method="permutation"` samples that game exactly (antithetic permutations);
    `"gradient"` (expected gradients on the gene embeddings) approximates it, much faster.

    Args:
        model: a cell classifier.
        data: an AnnData (in memory or backed), an input file, or a shard directory.
        label: explain each cell's true class from this obs column (default: its prediction).
        classes: only cells of these classes; `all_classes`: every class's logit for each cell.
        per_class: explain this many cells per class, sampled with `seed` (default: all).
        permutations / samples: the methods' sample sizes.
        value: the game's value, "logit" (the class logit) or "contrast" (the class logit minus
            the mean of the other classes' logits, which cancels genes that raise every class).
        gene_sets: also play the pathway game (the sets are the players; genes in no set stay
            present) and aggregate the gene values per set against size-matched random sets:
            a file, a list of files, or a dict {set name: genes}; `gene_set_level` picks the
            MitoCarta3.0 hierarchy depth (1-3); sets with fewer than `min_set_size` genes the
            model reads are left out.
        compile: `torch.compile` the model's encoder (faster on a GPU for large inputs).

    Returns:
        `ExplainResult`: `.importance` (per class and gene), `.values` (per cell and gene),
        `.cells`, with gene sets `.pathways` (`.importance`: class, pathway, n_genes,
        n_in_vocab, mean_abs_shap, mean_shap, std_err, p_value, fdr);
        `.plot(kind="top"|"beeswarm"|"heatmap", cls=...)`, `.write(dir)`.

    Example:
        >>> res = cfm.explain(clf, adata, label="condition", per_class=50, method="gradient")
        >>> res.importance.head(10)
        >>> res.plot("beeswarm", cls="stim")
    """
    from cellrank_fm.explain import METHODS, Evaluator, class_indices, explain_cells
    from cellrank_fm.inference import as_model, gene_symbols, load_cells, require_cell_classifier

    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; use permutation or gradient.")
    if per_class is not None and per_class < 1:
        raise UserError("--per-class must be at least 1.")
    if permutations < 1 or samples < 1:
        raise UserError("--permutations and --samples must be at least 1.")
    lm = as_model(model, device=device, compile=compile)
    require_cell_classifier(lm)
    wanted = _names(classes)
    evaluator = Evaluator(lm.model, lm.info, tokens_per_batch, value=value)
    if wanted:
        class_indices(evaluator.labels, wanted, "--classes value")
    symbols = gene_symbols(data, lm)
    sets = _gene_sets(lm, gene_sets, gene_set_level, min_set_size, None, symbols, progress)
    cells = load_cells(data, lm, layer=layer)
    result = explain_cells(evaluator, cells, method=method, symbols=symbols,
                           label_column=label, classes=wanted, all_classes=all_classes, per_class=per_class,
                           npermutations=permutations, nsamples=samples, seed=seed, gene_sets=sets,
                           quiet=not progress)
    result.settings.update(model=str(lm.path), input=_name(data))
    return result


def perturb(
    model: Model,
    data: Cells | ShardSet,
    *,
    state_column: str,
    start_state: str,
    goal_state: str,
    alt_states: str | Sequence[str] = (),
    genes: str | Sequence[str] = "all",
    as_set: bool = False,
    mode: str = "delete",
    hidden_layer: int = -1,
    null_genes: int = 50,
    gene_sets: GeneSetSource | None = None,
    gene_set_level: int | None = None,
    min_set_size: int = 5,
    sets: str | Sequence[str] | None = None,
    max_cells: int | None = None,
    seed: int = 0,
    layer: str | None = None,
    tokens_per_batch: int = 65536,
    device: str = "auto",
    compile: bool = False,
    progress: bool = True,
) -> PerturbResult:
    """In silico perturbation: delete (or move to rank 1) genes and measure the shift toward a goal state.

    For each start-state cell and gene, the shift is cos(perturbed, goal) - cos(original, goal),
    with cell embeddings the mean of the gene tokens' hidden states after `hidden_layer` and
    `goal` the goal state's mean embedding; each gene's shifts are tested against a null (every
    gene pooled, or random expressed genes) with a rank-sum test and Benjamini-Hochberg FDR.

    Args:
        model: a cell classifier or a pretrained model.
        data: an AnnData (in memory or backed), an input file, or a shard directory.
        state_column: the obs column holding the states.
        genes: "all" (each gene the start cells express, one at a time) or Ensembl IDs / symbols;
            `as_set=True` perturbs the listed genes together.
        mode: "delete" or "overexpress".
        null_genes: with a gene list, random genes (or sets) perturbed as the null.
        gene_sets: perturb whole gene sets instead of genes (files, or a dict {set name:
            genes}; `sets` picks some by name, default all), each against `null_genes` random
            expressed-gene sets of its expressed size.
        max_cells: perturb at most this many start cells (sampled with `seed`).
        compile: `torch.compile` the model's encoder (faster on a GPU for large inputs).

    Returns:
        `PerturbResult`: `.genes` (per gene, or with gene sets per `pathway`: shifts, p-value,
        FDR), `.shifts` (per cell and gene or set); `.plot()`, `.write(dir)`.

    Example:
        >>> per = cfm.perturb(clf, adata, state_column="condition", start_state="stim",
        ...                   goal_state="ctrl", genes=["ISG15", "IFI6", "IFIT1"], as_set=True)
        >>> per.genes
    """
    from cellrank_fm.explain import Evaluator
    from cellrank_fm.inference import as_model, gene_symbols, load_cells, require_cell_classifier
    from cellrank_fm.perturb import MODES, perturb_cells, resolve_genes

    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; use delete or overexpress.")
    lm = as_model(model, device=device, compile=compile)
    require_cell_classifier(lm, pretrained_ok=True)
    symbols = gene_symbols(data, lm)
    evaluator = Evaluator(lm.model, lm.info, tokens_per_batch)
    gene_ids = None
    every_gene = isinstance(genes, str) and genes.strip().lower() == "all"
    if gene_sets is not None and (not every_gene or as_set):
        raise UserError("give either --gene-sets (whole pathways) or --genes, not both.")
    chosen = _gene_sets(lm, gene_sets, gene_set_level, min_set_size, sets, symbols, progress)
    if every_gene:
        if as_set:
            raise UserError("--as-set needs a gene list in --genes.")
    else:
        names = _names(genes)
        if not names:
            raise UserError("--genes is empty; give 'all' or a comma-separated list of genes.")
        gene_ids = resolve_genes(names, lm.vocabulary, symbols)
    cells = load_cells(data, lm, layer=layer)
    result = perturb_cells(evaluator, cells, state_column=state_column, start_state=start_state,
                           goal_state=goal_state, alt_states=_names(alt_states) or [], genes=gene_ids, as_set=as_set,
                           mode=mode, layer=hidden_layer, max_cells=max_cells, null_genes=null_genes,
                           gene_sets=chosen, seed=seed, symbols=symbols, quiet=not progress)
    result.settings.update(model=str(lm.path), input=_name(data))
    return result


def score(
    data: Cells | ShardSet,
    gene_sets: GeneSetSource,
    *,
    model: Model | None = None,
    vocab: PathLike | dict[str, int] | None = None,
    medians: PathLike | dict[str, float] | None = None,
    gene_map: Sequence[PathLike] = (),
    model_version: str = "v1",
    model_input_size: int | None = None,
    gene_set_level: int | None = None,
    min_set_size: int = 5,
    sets: str | Sequence[str] | None = None,
    auc_max_rank: int | None = None,
    groupby: str | None = None,
    key_added: str = "cellrank_pathways",
    layer: str | None = None,
    copy: bool = False,
    chunk_cells: int = 8192,
    progress: bool = True,
) -> anndata.AnnData | None:
    """Per-cell pathway activity from the rank-value encoding: AUCell's recovery AUC of each set.

    For each cell and set, the area under the curve counting the set's genes among the cell's
    top 1..R ranked tokens (R = `auc_max_rank`, default 5% of the genes the encoding ranks),
    divided by its maximum for a set of that size: 1 means the set holds the cell's top genes,
    0 that none of its genes is in the top R. No model is run; cells are streamed in chunks.

    Args:
        data: raw counts (an AnnData, in memory or backed, or an .h5ad path), tokenized as
            `model` was trained or with `vocab` and `medians`; or a token shard directory.
        gene_sets: a file (GMT, two-column CSV/TSV, the MitoCarta3.0 table), a list of files,
            or a dict {set name: genes}; `gene_set_level` picks the MitoCarta depth (1-3),
            `sets` some sets by name; sets with fewer than `min_set_size` readable genes are
            left out.
        groupby: an obs column; each group is compared with the other cells per set (rank-sum
            test, Benjamini-Hochberg FDR over every test).
        copy: return a copy with the results instead of writing into `adata`.

    Returns:
        None (results written into `data`), or the annotated AnnData with `copy=True`, a path,
        or a shard directory (a new AnnData of its cells' metadata). obsm `key_added` (cells x
        sets, float32, NaN for a cell without any readable gene), uns `{key_added}_names` (the
        columns), uns `key_added` (settings and set sizes), and with `groupby` uns
        `{key_added}_{groupby}` (group, pathway, n_cells, mean_auc, mean_auc_rest, difference,
        p_value, fdr).

    Example:
        >>> cfm.score(adata, "Human.MitoCarta3.0.csv", model="classifier/", gene_set_level=1,
        ...           groupby="cell_type")
        >>> adata.uns["cellrank_pathways_cell_type"].head()
    """
    import anndata as ad

    from cellrank_fm.inference import as_model, gene_symbols
    from cellrank_fm.score import (anndata_chunks, annotate, encoding_from_files, encoding_from_model,
                                   encoding_from_shards, max_rank_for, score_chunks, shard_chunks, shard_obs)
    from cellrank_fm.shards import ShardSet

    if chunk_cells < 1:
        raise UserError("--chunk-cells must be at least 1.")
    from_shards = isinstance(data, ShardSet) or (not is_anndata(data) and Path(data).is_dir())
    if from_shards:
        shards = data if isinstance(data, ShardSet) else ShardSet(data)
        enc = encoding_from_shards(shards)
        lm = None
    elif model is not None:
        lm = as_model(model, device="cpu")  # only its tokenization is used
        enc = encoding_from_model(lm)
    elif vocab is not None and medians is not None:
        lm, enc = None, encoding_from_files(vocab, medians, gene_map, model_version, model_input_size)
    else:
        raise UserError("scoring raw counts needs the tokenization: give --model DIR, or --vocab and --medians.")
    if not from_shards and not is_anndata(data) and not Path(data).exists():
        raise UserError(f"input {data} does not exist.")
    extra = {} if from_shards or lm is None else gene_symbols(data, lm)
    chosen = _gene_sets(enc, gene_sets, gene_set_level, min_set_size, sets, extra, progress)
    if chosen is None:
        raise UserError("score needs --gene-sets FILE.")
    max_rank = max_rank_for(enc, auc_max_rank)
    if from_shards:
        target, give_back = ad.AnnData(obs=shard_obs(shards)), True
        chunks = shard_chunks(shards.path, chunk_cells)
    else:
        target, give_back = _target(data, copy)
        chunks = anndata_chunks(target, enc, chunk_cells, layer)
    scores = score_chunks(chunks, target.n_obs, chosen, enc, max_rank, progress)
    settings = dict(input=_name(data), model=str(lm.path) if lm is not None else None, auc_max_rank=max_rank,
                    **chosen.settings())
    annotate(target, scores, chosen, settings, key_added, groupby)
    return target if give_back else None
