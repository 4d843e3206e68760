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


@app.command("baseline")
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
) -> None:
    """Logistic regression on log-normalised highly variable genes, on the same split as finetune.

    Features: counts / total x 10,000, log1p, of the top genes by normalised dispersion over the
    training cells; the regularisation strength is picked on the validation split by macro-F1.
    Reports accuracy, macro-F1 and per-class figures on the test split.

    Example: cellrank baseline shards/ --label condition --out baseline/
    """
    from cellrank_fm.baseline import run_baseline
    from cellrank_fm.metrics import metrics_table, print_table, write_json
    from cellrank_fm.plots import confusion_matrix_png

    out = out or Path(f"baseline-{label}")
    result = run_baseline(
        data, label, n_top_genes=n_top_genes, class_weight=not no_class_weight,
        **_split_kwargs(seed, split_by, split_column, validation_fraction, test_fraction, min_class_size),
    )
    for msg in result.pop("messages", []):
        typer.echo(msg, err=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "metrics.json")
    confusion_matrix_png(result["confusion_matrix"], result["classes"], out / "confusion_matrix.png",
                         title=f"baseline: {label} (test split)")
    print_table(metrics_table({"baseline": result}, title=f"{label}: test split"))
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'confusion_matrix.png'}")
