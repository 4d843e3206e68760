"""Commands: finetune, baseline, predict, embed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from cellrank_fm.cli.app import app

SPLIT = "Split (same for finetune and baseline)"
TRAIN = "Training"
OUT = "Output"

# Options shared by `finetune` and `baseline`, so the two always split the same way.
Seed = Annotated[int, typer.Option("--seed", help="Seed for the split and everything random.", rich_help_panel=SPLIT)]
SplitBy = Annotated[Optional[str], typer.Option(
    "--split-by", metavar="COLUMN",
    help="Keep each value of this column (e.g. donor) inside one split.", rich_help_panel=SPLIT)]
SplitColumn = Annotated[Optional[str], typer.Option(
    "--split-column", metavar="COLUMN",
    help="Take the split from this column (values train, validation|val, test).", rich_help_panel=SPLIT)]
ValFraction = Annotated[float, typer.Option(
    "--validation-fraction", help="Share of each class for validation.", rich_help_panel=SPLIT)]
TestFraction = Annotated[float, typer.Option(
    "--test-fraction", help="Share of each class for the test.", rich_help_panel=SPLIT)]
MinClassSize = Annotated[int, typer.Option(
    "--min-class-size", help="Leave out classes with fewer labelled cells than this.", rich_help_panel=SPLIT)]


def _split_kwargs(seed, split_by, split_column, validation_fraction, test_fraction, min_class_size):
    return dict(seed=seed, split_by=split_by, split_column=split_column,
                validation_fraction=validation_fraction, test_fraction=test_fraction,
                min_class_size=min_class_size)


@app.command("baseline", rich_help_panel="Classify")
def baseline_cmd(
    data: Annotated[Path, typer.Argument(help="Token shard directory (counts are read back from its input files) or an input file (.h5ad, ...).")],
    label: Annotated[str, typer.Option("--label", "-l", metavar="COLUMN", help="Cell metadata column to predict.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory for metrics.json and confusion_matrix.png (default: baseline-LABEL).", rich_help_panel=OUT)] = None,
    n_top_genes: Annotated[int, typer.Option("--n-top-genes", help="Highly variable genes used as features (chosen on the training cells).", rich_help_panel=TRAIN)] = 2000,
    no_class_weight: Annotated[bool, typer.Option("--no-class-weight", help="Do not weight classes by inverse frequency.", rich_help_panel=TRAIN)] = False,
    seed: Seed = 0,
    split_by: SplitBy = None,
    split_column: SplitColumn = None,
    validation_fraction: ValFraction = 0.1,
    test_fraction: TestFraction = 0.1,
    min_class_size: MinClassSize = 10,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out directory.", rich_help_panel=OUT)] = False,
) -> None:
    """Logistic regression on log-normalised highly variable genes, on the same split as finetune.

    Features: counts / total x 10,000, log1p, of the top genes by normalised dispersion over the training cells; the regularisation strength is picked on the validation split by macro-F1. Reports accuracy, macro-F1 and per-class figures on the test split.

    Example: cellrank baseline shards/ --label condition --out baseline/
    """
    from cellrank_fm.baseline import run_baseline
    from cellrank_fm.errors import atomic_path
    from cellrank_fm.metrics import metrics_table, print_table, write_json
    from cellrank_fm.outputs import check_new_directory, new_directory
    from cellrank_fm.plots import confusion_matrix_png

    out = out or Path(f"baseline-{label}")
    check_new_directory(out, overwrite)
    result = run_baseline(
        data, label, n_top_genes=n_top_genes, class_weight=not no_class_weight,
        **_split_kwargs(seed, split_by, split_column, validation_fraction, test_fraction, min_class_size),
    )
    for msg in result.pop("messages", []):
        typer.echo(msg, err=True)
    with new_directory(out, overwrite), atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_json(result, tmp / "metrics.json")
        confusion_matrix_png(result["confusion_matrix"], result["classes"], tmp / "confusion_matrix.png",
                             title=f"baseline: {label} (test split)")
    print_table(metrics_table({"baseline": result}, title=f"{label}: test split"))
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'confusion_matrix.png'}")


MODEL = "Model"
RUN = "Run"
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.", rich_help_panel=RUN)]
# Options of the commands that tokenize new cells with a model (`predict`, `embed`).
GeneIdColumn = Annotated[Optional[str], typer.Option(
    "--gene-id-column", rich_help_panel="Genes",
    help="var column of the input holding gene IDs or symbols (default: the training input's, if present, else var_names).")]
GeneMap = Annotated[Optional[list[Path]], typer.Option(
    "--gene-map", rich_help_panel="Genes",
    help="Symbol/alias -> Ensembl ID table (default: the mapping saved in the model directory, from the shards' --gene-map). Repeatable.")]
InferenceTokens = Annotated[int, typer.Option("--tokens-per-batch", help="Padded tokens per inference batch.", rich_help_panel=RUN)]
Device = Annotated[str, typer.Option("--device", help="auto (GPU when present), cpu, cuda ...", rich_help_panel=RUN)]


@app.command("finetune", rich_help_panel="Classify")
def finetune_cmd(
    shards: Annotated[Path, typer.Argument(help="Token shard directory from `cellrank tokenize` (with the label kept: --keep-obs COLUMN).")],
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
    evals_per_epoch: Annotated[int, typer.Option("--evals-per-epoch", help="Validation evaluations per epoch.", rich_help_panel=TRAIN)] = 2,
    no_class_weight: Annotated[bool, typer.Option("--no-class-weight", help="Do not weight classes by inverse frequency.", rich_help_panel=TRAIN)] = False,
    max_cells: Annotated[Optional[int], typer.Option("--max-cells", help="Train on at most this many cells (seeded sample of the training split).", rich_help_panel=TRAIN)] = None,
    max_seconds: Annotated[Optional[float], typer.Option("--max-seconds", help="Stop training after this wall time (the best checkpoint is kept).", rich_help_panel=TRAIN)] = None,
    device: Annotated[str, typer.Option("--device", help="auto (GPU when present), cpu, cuda, cuda:1 ...", rich_help_panel=RUN)] = "auto",
    baseline: Annotated[bool, typer.Option("--baseline", help="Also fit the logistic-regression baseline on the same split and print both.", rich_help_panel=OUT)] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run into the same --out (same shards and options give the same model).", rich_help_panel=RUN)] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out directory.", rich_help_panel=OUT)] = False,
    quiet: Quiet = False,
    seed: Seed = 0,
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
    from cellrank_fm.errors import UserError
    from cellrank_fm.finetune import FinetuneOptions, finetune_cells
    from cellrank_fm.metrics import metrics_table, print_table

    split_kw = _split_kwargs(seed, split_by, split_column, validation_fraction, test_fraction, min_class_size)
    if task == "genes":
        from cellrank_fm.finetune import GeneTaskOptions, finetune_genes

        if gene_labels is None:
            raise UserError("--task genes needs --gene-labels CSV (one column per gene class).")
        result = finetune_genes(shards, out, gene_labels, GeneTaskOptions(
            from_model=from_model, preset=preset, folds=folds, seed=seed, epochs=epochs or 3.0, lr=lr,
            tokens_per_batch=tokens_per_batch or 16384, freeze_layers=freeze_layers, max_cells=max_cells or 2000,
            device=device, quiet=quiet), overwrite=overwrite)
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
    if label is None:
        raise UserError("cell classification needs --label COLUMN (a metadata column kept in the shards).")
    opts = FinetuneOptions(
        label=label, from_model=from_model, preset=preset, pooling=pooling, freeze_layers=freeze_layers,
        class_weight=not no_class_weight, epochs=epochs, min_epochs=min_epochs, lr=lr,
        tokens_per_batch=tokens_per_batch, evals_per_epoch=evals_per_epoch, patience=patience, max_cells=max_cells, device=device,
        max_seconds=max_seconds, quiet=quiet, **split_kw,
    )
    result = finetune_cells(shards, out, opts, with_baseline=baseline, resume=resume, overwrite=overwrite)
    results = {"cellrank": result["metrics"]}
    if result["baseline"] is not None:
        results["baseline (logistic regression)"] = result["baseline"]
    print_table(metrics_table(results, title=f"{label}: test split"))
    typer.echo(f"wrote the best checkpoint (validation macro-F1 "
               f"{result['metrics']['best_validation_macro_f1'] or float('nan'):.3f}) and metrics to {out}")


@app.command("predict", rich_help_panel="Classify")
def predict_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Classifier directory from `cellrank finetune`.")],
    input: Annotated[Path, typer.Argument(help="Cells to classify (.h5ad, raw counts).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad: the input plus obs cellrank_label / cellrank_confidence and obsm cellrank_proba.", rich_help_panel=OUT)],
    layer: Annotated[Optional[str], typer.Option("--layer", help="Read raw counts from this layer (or raw) instead of X.")] = None,
    gene_id_column: GeneIdColumn = None,
    gene_map: GeneMap = None,
    tokens_per_batch: InferenceTokens = 32768,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Classify new cells with a fine-tuned model; every input cell is kept, in order.

    The cells are tokenized with the model's own vocabulary, medians (and gene set), so no tokenize step is needed. Cells without any vocabulary gene get a missing label. The input file is never modified.

    Example: cellrank predict classifier/ new_cells.h5ad --out new_cells.predicted.h5ad
    """
    from cellrank_fm.predict import predict_file

    r = predict_file(model_dir, input, out, tokens_per_batch=tokens_per_batch, layer=layer, gene_id_column=gene_id_column,
                     gene_map=gene_map or (), device=device, quiet=quiet)
    shown = ", ".join(f"{k} {v:,}" for k, v in r["predicted"].items())
    typer.echo(f"classified {r['cells'] - r['untokenized']:,} of {r['cells']:,} cells ({shown}); "
               f"{r['untokenized']:,} could not be tokenized (no vocabulary gene) and have no label")
    typer.echo(f"wrote {out} (obs cellrank_label, cellrank_confidence; obsm cellrank_proba; "
               f"uns cellrank_proba_classes)")


@app.command("embed", rich_help_panel="Classify")
def embed_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Any model directory (pretrained or fine-tuned).")],
    input: Annotated[Path, typer.Argument(help="Cells to embed (.h5ad, raw counts).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad: the input plus obsm X_cellrank.", rich_help_panel=OUT)],
    layer: Annotated[int, typer.Option("--layer", help="Hidden layer to read: -1 last, -2 second last, 0 embeddings.", rich_help_panel=MODEL)] = -1,
    pooling: Annotated[Optional[str], typer.Option("--pooling", help="cls or mean (default: cls for V2 models, mean for V1).", rich_help_panel=MODEL)] = None,
    genes_out: Annotated[Optional[Path], typer.Option("--genes-out", metavar="PARQUET", help="Also write each gene's mean contextual embedding over these cells.", rich_help_panel=OUT)] = None,
    umap_png: Annotated[Optional[Path], typer.Option("--umap-png", metavar="PNG", help="Draw a UMAP of the cell embeddings (needs umap-learn).", rich_help_panel=OUT)] = None,
    umap_color: Annotated[Optional[str], typer.Option("--umap-color", metavar="COLUMN", help="Colour the UMAP by this obs column.", rich_help_panel=OUT)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the UMAP.", rich_help_panel=OUT)] = 0,
    counts_layer: Annotated[Optional[str], typer.Option("--counts-layer", help="Read raw counts from this layer (or raw) instead of X.")] = None,
    gene_id_column: GeneIdColumn = None,
    gene_map: GeneMap = None,
    tokens_per_batch: InferenceTokens = 32768,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Cell embeddings (obsm X_cellrank) from a model, optionally gene embeddings and a UMAP PNG.

    Example: cellrank embed pretrained/ pbmc.h5ad --out pbmc.embedded.h5ad --umap-color condition --umap-png umap.png
    """
    from cellrank_fm.embed import embed_file

    if pooling not in (None, "cls", "mean"):
        from cellrank_fm.errors import UserError

        raise UserError(f"--pooling must be cls or mean, not {pooling!r}.")
    r = embed_file(model_dir, input, out, layer=layer, pooling=pooling, genes_out=genes_out,
                   umap_color=umap_color, umap_png=umap_png, seed=seed, tokens_per_batch=tokens_per_batch,
                   layer_counts=counts_layer, gene_id_column=gene_id_column, gene_map=gene_map or (),
                   device=device, quiet=quiet)
    typer.echo(f"embedded {r['cells'] - r['untokenized']:,} of {r['cells']:,} cells ({r['hidden_size']} "
               f"dimensions, layer {r['layer']}, {r['pooling']} pooling); {r['untokenized']:,} could not be "
               f"tokenized and have NaN rows")
    extra = [str(p) for p in (genes_out, umap_png) if p is not None]
    typer.echo(f"wrote {out}" + (f" and {', '.join(extra)}" if extra else ""))
