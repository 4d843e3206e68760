"""Commands: finetune, baseline, predict, embed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cellrank_fm.cli.app import app
from cellrank_fm.cli.options import (
    MODEL,
    OUT,
    RUN,
    TRAIN,
    AnyModel,
    Classifier,
    CountsLayer,
    Compile,
    CountsOrOldHiddenLayer,
    Device,
    H5adCells,
    HiddenLayer,
    InferenceTokens,
    Label,
    MinClassSize,
    ModelGeneIdColumn,
    ModelGeneMap,
    NoClassWeight,
    Overwrite,
    Quiet,
    SplitBy,
    SplitColumn,
    SplitSeed,
    TestFraction,
    ValFraction,
    layers,
    split_options,
)


@app.command("baseline", rich_help_panel="Classify")
def baseline_cmd(
    data: Annotated[Path, typer.Argument(help="Token shard directory (counts are read back from its input files) or an input file (.h5ad, ...).", show_default=False)],
    label: Label,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory for metrics.json and confusion_matrix.png (default: baseline-LABEL).", rich_help_panel=OUT)] = None,
    n_top_genes: Annotated[int, typer.Option("--n-top-genes", help="Highly variable genes used as features (chosen on the training cells).", rich_help_panel=TRAIN)] = 2000,
    no_class_weight: NoClassWeight = False,
    seed: SplitSeed = 0,
    split_by: SplitBy = None,
    split_column: SplitColumn = None,
    validation_fraction: ValFraction = 0.1,
    test_fraction: TestFraction = 0.1,
    min_class_size: MinClassSize = 10,
    overwrite: Overwrite = False,
) -> None:
    """Logistic regression on log-normalised highly variable genes, on the same split as finetune.

    Features: counts / total x 10,000, log1p, of the top genes by normalised dispersion over the training cells; the regularisation strength is picked on the validation split by macro-F1. Reports accuracy, macro-F1 and per-class figures on the test split.

    Example: cellrank baseline shards/ --label condition --out baseline/
    """
    from cellrank_fm import api
    from cellrank_fm.errors import atomic_path, write_json
    from cellrank_fm.metrics import metrics_table, print_table
    from cellrank_fm.outputs import check_new_directory, new_directory
    from cellrank_fm.plots import confusion_matrix_png

    out = out or Path(f"baseline-{label}")
    check_new_directory(out, overwrite)
    result = api.baseline(data, label=label, n_top_genes=n_top_genes, class_weight=not no_class_weight,
                          **split_options(seed, split_by, split_column, validation_fraction, test_fraction, min_class_size))
    for msg in result.pop("messages", []):
        typer.echo(msg, err=True)
    with new_directory(out, overwrite), atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_json(result, tmp / "metrics.json", indent=2)
        confusion_matrix_png(result["confusion_matrix"], result["classes"], tmp / "confusion_matrix.png",
                             title=f"baseline: {label} (test split)")
    print_table(metrics_table({"baseline": result}, title=f"{label}: test split"))
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'confusion_matrix.png'}")


@app.command("finetune", rich_help_panel="Classify")
def finetune_cmd(
    shards: Annotated[Path, typer.Argument(help="Token shard directory from `cellrank tokenize` (with the label kept: --keep-obs COLUMN).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model directory (must not exist or be empty, unless --overwrite).", rich_help_panel=OUT)],
    label: Annotated[Optional[str], typer.Option("--label", "-l", metavar="COLUMN", help="Cell metadata column to predict (cell classification).")] = None,
    from_model: Annotated[Optional[Path], typer.Option("--from", metavar="MODEL_DIR", help="Pretrained model directory (from `cellrank pretrain` or a Geneformer checkpoint).", rich_help_panel=MODEL)] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", metavar="NAME", help="Train from scratch with this model size instead (tiny, geneformer-v1, ...).", rich_help_panel=MODEL)] = None,
    task: Annotated[str, typer.Option("--task", help="cells: classify cells by --label; genes: classify genes by --gene-labels.", rich_help_panel=MODEL)] = "cells",
    gene_labels: Annotated[Optional[Path], typer.Option("--gene-labels", metavar="CSV", help="Gene classes for --task genes: one column per class, Ensembl IDs below its name.", rich_help_panel=MODEL)] = None,
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds over genes (--task genes).", rich_help_panel=MODEL)] = 5,
    pooling: Annotated[Optional[str], typer.Option("--pooling", help="cls or mean (default: cls for V2 tokens, mean for V1).", rich_help_panel=MODEL)] = None,
    freeze_layers: Annotated[int, typer.Option("--freeze-layers", help="Freeze the embeddings and the first N encoder layers.", rich_help_panel=TRAIN)] = 0,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over the training cells (at most; early stopping may end sooner). Default: enough for 600 steps, 3 to 30 epochs (cells); 3 per fold (genes).", rich_help_panel=TRAIN)] = None,
    min_epochs: Annotated[Optional[float], typer.Option("--min-epochs", help="No early stopping before this many epochs (default 3, or --epochs if fewer).", rich_help_panel=TRAIN)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate of the encoder (linear warm-up, then linear decay). Default: 1e-3 × 64 / hidden size, half that for a pretrained encoder; the new head always trains at the full rate.", rich_help_panel=TRAIN)] = None,
    tokens_per_batch: Annotated[Optional[int], typer.Option("--tokens-per-batch", help="Padded tokens per batch (default: about 32 cells, at most 16,384 tokens).", rich_help_panel=TRAIN)] = None,
    patience: Annotated[Optional[int], typer.Option("--patience", help="Stop after this many evaluations with neither a lower validation loss nor a higher macro-F1 (default: two epochs' worth; 0 = never).", rich_help_panel=TRAIN)] = None,
    gene_dropout: Annotated[Optional[float], typer.Option("--gene-dropout", help="Leave out this share of each training cell's genes at random at every step (augmentation).", rich_help_panel=TRAIN)] = None,
    ema_decay: Annotated[Optional[float], typer.Option("--ema-decay", help="Evaluate and keep a moving average of the weights with this decay per step (default 0.99, about the last 100 steps; 0 = the last step's weights).", rich_help_panel=TRAIN)] = None,
    evals_per_epoch: Annotated[int, typer.Option("--evals-per-epoch", help="Validation evaluations per epoch.", rich_help_panel=TRAIN)] = 2,
    no_class_weight: NoClassWeight = False,
    max_cells: Annotated[Optional[int], typer.Option("--max-cells", help="Train on at most this many cells (seeded sample of the training split; --task genes: 2,000 by default).", rich_help_panel=TRAIN)] = None,
    max_seconds: Annotated[Optional[float], typer.Option("--max-seconds", help="Stop training after this wall time (the best checkpoint is kept).", rich_help_panel=TRAIN)] = None,
    device: Device = "auto",
    baseline: Annotated[bool, typer.Option("--baseline", help="Also fit the logistic-regression baseline on the same split and print both.", rich_help_panel=OUT)] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run into the same --out (same shards and options give the same model).", rich_help_panel=RUN)] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    seed: SplitSeed = 0,
    split_by: SplitBy = None,
    split_column: SplitColumn = None,
    validation_fraction: ValFraction = 0.1,
    test_fraction: TestFraction = 0.1,
    min_class_size: MinClassSize = 10,
) -> None:
    """Fine-tune a classifier of cells (or genes) on token shards; keep the best checkpoint.

    Cells are split train / validation / test (stratified by label with --seed, by --split-by, or from --split-column); training stops early when validation macro-F1 stops improving; the best checkpoint becomes a model directory for `cellrank predict`, beside metrics.json (test split), confusion_matrix.png and split.csv. With --task genes: k-fold ROC AUC over genes, then a model trained on all labelled genes (DIR/model) and every gene's class probabilities (DIR/gene_scores.csv).

    Example: cellrank finetune shards/ --label condition --from pretrained/ --out classifier/ --baseline
    """
    from cellrank_fm import api
    from cellrank_fm.errors import UserError
    from cellrank_fm.metrics import metrics_table, print_table

    # Options left unset (None) take the option classes' defaults (FinetuneOptions, GeneTaskOptions).
    common = dict(out=out, from_model=from_model, preset=preset, overwrite=overwrite, progress=not quiet, seed=seed, lr=lr,
                  tokens_per_batch=tokens_per_batch, freeze_layers=freeze_layers, device=device, epochs=epochs,
                  max_cells=max_cells)
    if task == "genes":
        if gene_labels is None:
            raise UserError("--task genes needs --gene-labels CSV (one column per gene class).")
        result = api.finetune(shards, gene_labels=gene_labels, folds=folds, **common).metrics
        from rich.table import Table

        table = Table(title=f"gene classification: ROC AUC per fold ({result['genes']} genes)")
        table.add_column("fold")
        table.add_column("test genes", justify="right")
        table.add_column("ROC AUC", justify="right")
        for f in result["folds"]:
            table.add_row(str(f["fold"]), str(f["test_genes"]), f"{f['roc_auc']:.3f}")
        table.add_row("mean ± sd", "", f"{result['roc_auc_mean']:.3f} ± {result['roc_auc_sd']:.3f}")
        print_table(table)
        typer.echo(f"wrote {out}/metrics.json" + (f", {out}/roc.png" if len(result["classes"]) == 2 else "")
                   + f", the final model in {out}/model and scores for {result['scored_genes']:,} genes in {out}/gene_scores.csv")
        return
    if task != "cells":
        raise UserError(f"--task must be cells or genes, not {task!r}.")
    result = api.finetune(
        shards, label=label, baseline=baseline, resume=resume, pooling=pooling, class_weight=not no_class_weight,
        evals_per_epoch=evals_per_epoch, gene_dropout=gene_dropout, ema_decay=ema_decay, patience=patience, min_epochs=min_epochs, max_seconds=max_seconds,
        split_by=split_by, split_column=split_column, validation_fraction=validation_fraction,
        test_fraction=test_fraction, min_class_size=min_class_size, **common,
    ).summary
    results = {"cellrank": result["metrics"]}
    if result["baseline"] is not None:
        results["baseline (logistic regression)"] = result["baseline"]
        results["token probe"] = result["token_probe"]
    print_table(metrics_table(results, title=f"{label}: test split"))
    typer.echo(f"wrote the best checkpoint (validation macro-F1 "
               f"{result['metrics']['best_validation_macro_f1'] or float('nan'):.3f}) and metrics to {out}")


def _check_out(input: Path, out: Path) -> None:
    from cellrank_fm.errors import UserError

    if out.resolve() == input.resolve():
        raise UserError("--out must differ from the input file; cellrank never overwrites its input.")


@app.command("predict", rich_help_panel="Classify")
def predict_cmd(
    model_dir: Classifier,
    input: Annotated[Path, typer.Argument(help="Cells to classify (.h5ad, raw counts).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad: the input plus obs cellrank_label / cellrank_confidence and obsm cellrank_proba.", rich_help_panel=OUT)],
    layer: CountsLayer = None,
    gene_id_column: ModelGeneIdColumn = None,
    gene_map: ModelGeneMap = None,
    tokens_per_batch: InferenceTokens = 32768,
    device: Device = "auto",
    compile: Compile = False,
    quiet: Quiet = False,
) -> None:
    """Classify cells with a fine-tuned model; write a copy of the input with the predictions.

    The input is tokenized with the model's own vocabulary, medians and gene set, chunk by chunk;
    every cell is kept in order (cells without a vocabulary gene get no label).

    Example: cellrank predict classifier/ new_cells.h5ad --out new_cells.predicted.h5ad
    """
    from cellrank_fm import api
    from cellrank_fm.inference import write_h5ad_copy
    from cellrank_fm.outputs import claim_all

    _check_out(input, out)
    with claim_all(out):
        adata = api.predict(model_dir, input, layer=layer, gene_id_column=gene_id_column, gene_map=gene_map or (),
                            tokens_per_batch=tokens_per_batch, device=device, compile=compile,
                            progress=not quiet)
        try:
            write_h5ad_copy(input, out, adata, obsm=["cellrank_proba"], uns=["cellrank_proba_classes", "cellrank"])
            labels = adata.obs["cellrank_label"]
        finally:
            adata.file.close()
    cells, untokenized = adata.n_obs, int(labels.isna().sum())
    shown = ", ".join(f"{k} {v:,}" for k, v in labels.value_counts().items())
    typer.echo(f"classified {cells - untokenized:,} of {cells:,} cells ({shown}); "
               f"{untokenized:,} could not be tokenized (no vocabulary gene) and have no label")
    typer.echo(f"wrote {out} (obs cellrank_label, cellrank_confidence; obsm cellrank_proba; "
               f"uns cellrank_proba_classes)")


@app.command("embed", rich_help_panel="Classify")
def embed_cmd(
    model_dir: AnyModel,
    input: H5adCells,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad: the input plus obsm X_cellrank.", rich_help_panel=OUT)],
    hidden_layer: HiddenLayer = None,
    layer: CountsOrOldHiddenLayer = None,
    pooling: Annotated[Optional[str], typer.Option("--pooling", help="cls or mean (default: cls for V2 models, mean for V1).", rich_help_panel=MODEL)] = None,
    genes_out: Annotated[Optional[Path], typer.Option("--genes-out", metavar="PARQUET", help="Also write each gene's mean contextual embedding over these cells.", rich_help_panel=OUT)] = None,
    umap_png: Annotated[Optional[Path], typer.Option("--umap-png", metavar="PNG", help="Draw a UMAP of the cell embeddings (needs umap-learn).", rich_help_panel=OUT)] = None,
    umap_color: Annotated[Optional[str], typer.Option("--umap-color", metavar="COLUMN", help="Colour the UMAP by this obs column.", rich_help_panel=OUT)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the UMAP.", rich_help_panel=OUT)] = 0,
    counts_layer: Annotated[Optional[str], typer.Option("--counts-layer", hidden=True, help="Old spelling of --layer.")] = None,
    gene_id_column: ModelGeneIdColumn = None,
    gene_map: ModelGeneMap = None,
    tokens_per_batch: InferenceTokens = 32768,
    device: Device = "auto",
    compile: Compile = False,
    quiet: Quiet = False,
) -> None:
    """Cell embeddings (obsm X_cellrank) from a model, optionally gene embeddings and a UMAP PNG.

    Example: cellrank embed pretrained/ pbmc.h5ad --out pbmc.embedded.h5ad --umap-color condition --umap-png umap.png
    """
    import sys

    import numpy as np

    from cellrank_fm import api
    from cellrank_fm.errors import UserError, atomic_path
    from cellrank_fm.inference import open_h5ad, write_h5ad_copy
    from cellrank_fm.outputs import claim_all

    layer, hidden_layer = layers(layer, hidden_layer)
    if counts_layer is not None:
        print("note: --counts-layer is now --layer.", file=sys.stderr)
        layer = layer or counts_layer
    _check_out(input, out)
    if umap_color is not None:
        adata = open_h5ad(input)
        columns = list(adata.obs.columns)
        adata.file.close()
        if umap_color not in columns:
            raise UserError(f"the colour column {umap_color!r} is not in {input}; available columns: "
                            f"{', '.join(columns) or 'none'}.")
    with claim_all(out, genes_out, umap_png):
        umap = umap_png is not None or umap_color is not None
        adata = api.embed(model_dir, input, hidden_layer=hidden_layer, pooling=pooling, genes=genes_out is not None,
                          umap=umap, seed=seed, layer=layer, gene_id_column=gene_id_column, gene_map=gene_map or (),
                          tokens_per_batch=tokens_per_batch, device=device, compile=compile,
                          progress=not quiet)
        try:
            write_h5ad_copy(input, out, adata, obsm=["X_cellrank"] + ["X_cellrank_umap"] * umap, uns=["cellrank_embedding"])
            if umap_png is not None:
                from cellrank_fm.plots import scatter_png

                coords = adata.obsm["X_cellrank_umap"]
                ok = ~np.isnan(coords).any(axis=1)
                colours = adata.obs[umap_color].to_numpy()[ok] if umap_color is not None else None
                scatter_png(coords[ok], colours, umap_png, title=f"cellrank embedding ({model_dir.name})",
                            legend_title=umap_color or "")
            if genes_out is not None:
                with atomic_path(genes_out) as tmp:
                    adata.uns["cellrank_gene_embeddings"].to_parquet(tmp, index=False)
            record, dimensions = adata.uns["cellrank_embedding"], adata.obsm["X_cellrank"].shape[1]
        finally:
            adata.file.close()
    typer.echo(f"embedded {record['cells'] - record['untokenized']:,} of {record['cells']:,} cells ({dimensions} "
               f"dimensions, layer {record['layer']}, {record['pooling']} pooling); {record['untokenized']:,} could "
               f"not be tokenized and have NaN rows")
    extra = [str(p) for p in (genes_out, umap_png) if p is not None]
    typer.echo(f"wrote {out}" + (f" and {', '.join(extra)}" if extra else ""))
