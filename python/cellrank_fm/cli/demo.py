"""`cellrank demo`: the whole product on simulated data, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellrank_fm.cli.app import app
from cellrank_fm.cli.options import Quiet


@app.command(rich_help_panel="Start here")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for every output and the report.")] = Path("cellrank-demo"),
    seed: Annotated[int, typer.Option("--seed", help="Seed for the simulation and every random step (same seed, same numbers).")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="A smaller corpus and shorter training (about a minute).")] = False,
    quiet: Quiet = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out directory.")] = False,
) -> None:
    """Run the whole pipeline on a simulated corpus and write a report with tables and plots.

    Simulates cells with planted marker genes and disease drivers, computes medians, tokenizes
    through the Rust core, pretrains a tiny model, fine-tunes classifiers beside a
    logistic-regression baseline, explains them with SHAP and deletes the drivers in silico.
    No downloads; a few minutes on a laptop CPU.

    Example: cellrank demo --out cellrank-demo
    """
    from cellrank_fm.demo import QUICK, DemoSize, run_demo

    run_demo(out, seed=seed, size=QUICK if quick else DemoSize(), quiet=quiet, overwrite=overwrite)
