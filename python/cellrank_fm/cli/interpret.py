"""Commands: explain (SHAP gene importance), perturb (in silico deletion / overexpression)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cellrank_fm.cli.app import app
from cellrank_fm.cli.options import (
    CELLS,
    METHOD,
    OUT,
    AnyModel,
    Cells,
    CountsLayer,
    Compile,
    CountsOrOldHiddenLayer,
    Device,
    GeneSetFiles,
    GeneSetLevel,
    HiddenLayer,
    InferenceTokens,
    OutputDir,
    MinSetSize,
    Overwrite,
    Quiet,
    SetNames,
    layers,
)

Seed = Annotated[int, typer.Option("--seed", help="Seed for cell sampling and permutations.", rich_help_panel=CELLS)]


@app.command("explain", rich_help_panel="Explain")
def explain_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory written by `cellrank finetune` (a cell classifier).", show_default=False)],
    input: Cells,
    out: OutputDir,
    method: Annotated[str, typer.Option("--method", "-m", help="permutation (exact game, sampled permutations) or gradient (expected gradients on gene embeddings; fast).", rich_help_panel=METHOD)] = "permutation",
    permutations: Annotated[int, typer.Option("--permutations", help="Permutation method: antithetic permutations per cell.", rich_help_panel=METHOD)] = 10,
    samples: Annotated[int, typer.Option("--samples", help="Gradient method: interpolation samples per cell and class.", rich_help_panel=METHOD)] = 64,
    label: Annotated[Optional[str], typer.Option("--label", "-l", metavar="COLUMN", help="Explain each cell's true class from this column (default: its predicted class).", rich_help_panel=CELLS)] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", metavar="A,B", help="Only cells of these classes.", rich_help_panel=CELLS)] = None,
    all_classes: Annotated[bool, typer.Option("--all-classes", help="Also explain every other class's logit for each cell.", rich_help_panel=CELLS)] = False,
    per_class: Annotated[Optional[int], typer.Option("--per-class", metavar="N", help="Explain N cells per class, sampled with --seed (default: all cells).", rich_help_panel=CELLS)] = None,
    value: Annotated[str, typer.Option("--value", help="The game's value: logit (the class logit) or contrast (the class logit minus the mean of the other classes' logits; cancels genes that raise every class).", rich_help_panel=METHOD)] = "logit",
    gene_sets: GeneSetFiles = None,
    gene_set_level: GeneSetLevel = None,
    min_set_size: MinSetSize = 5,
    seed: Seed = 0,
    layer: CountsLayer = None,
    top: Annotated[int, typer.Option("--top", help="Genes per class in the plots.", rich_help_panel=OUT)] = 20,
    device: Device = "auto",
    tokens_per_batch: InferenceTokens = 65536,
    compile: Compile = False,
    quiet: Quiet = False,
    overwrite: Overwrite = False,
) -> None:
    """Which genes decide each class: SHAP values of the gene-deletion game.

    A coalition of a cell's genes is the cell with the other genes removed (kept genes in their
    order); its value is the classifier's logit for the explained class; the base value is the
    empty cell (special tokens only). Writes shap_values.parquet (cell_id, class, gene_id,
    gene_symbol, rank, shap_value, shap_stderr), cells.parquet (logit, base, additivity gap),
    gene_importance.parquet/.csv (per class: mean |SHAP| with absent genes as 0, signed mean,
    fraction expressing, mean over expressing cells) and PNGs (top genes, beeswarm, heatmap).
    With --gene-sets, pathway SHAP too (sets as players; genes in no set always present) and
    pathway_importance.parquet/.csv with p-values of the sets' gene values against random sets.

    Example: cellrank explain model/ pbmc.h5ad --out shap/ --label condition --per-class 50
    """
    from rich.console import Console

    from cellrank_fm import api
    from cellrank_fm.outputs import check_new_directory

    check_new_directory(out, overwrite)  # before minutes of work, and again when writing
    result = api.explain(model_dir, input, label=label, classes=classes, all_classes=all_classes,
                         per_class=per_class, method=method, permutations=permutations, samples=samples, seed=seed,
                         value=value, gene_sets=gene_sets or None, gene_set_level=gene_set_level,
                         min_set_size=min_set_size, layer=layer, tokens_per_batch=tokens_per_batch, device=device,
                         compile=compile, progress=not quiet)
    result.write(out, top=top, overwrite=overwrite)
    if not quiet:
        console = Console()
        console.print(result.summary())
        if result.pathways is not None:
            console.print(result.pathways.summary())
        console.print(f"{result.evaluations:,} model evaluations; results in {out}/")



@app.command("perturb", rich_help_panel="Explain")
def perturb_cmd(
    model_dir: AnyModel,
    input: Cells,
    out: OutputDir,
    state_column: Annotated[str, typer.Option("--state-column", metavar="COLUMN", help="Cell metadata column holding the states.", rich_help_panel=CELLS)],
    start_state: Annotated[str, typer.Option("--start-state", help="Perturb the cells of this state.", rich_help_panel=CELLS)],
    goal_state: Annotated[str, typer.Option("--goal-state", help="Measure the shift toward this state's mean embedding.", rich_help_panel=CELLS)],
    alt_states: Annotated[Optional[str], typer.Option("--alt-states", metavar="C,D", help="Also measure shifts toward these states.", rich_help_panel=CELLS)] = None,
    genes: Annotated[str, typer.Option("--genes", help="'all' (each gene the start cells express, one at a time) or a comma-separated list of Ensembl IDs or symbols.", rich_help_panel=METHOD)] = "all",
    as_set: Annotated[bool, typer.Option("--as-set", help="Perturb the listed genes together, as one set.", rich_help_panel=METHOD)] = False,
    mode: Annotated[str, typer.Option("--mode", help="delete (remove the gene) or overexpress (move it to rank 1).", rich_help_panel=METHOD)] = "delete",
    hidden_layer: HiddenLayer = None,
    layer: CountsOrOldHiddenLayer = None,
    null_genes: Annotated[int, typer.Option("--null-genes", help="With a gene list: random expressed genes (or sets) perturbed as the null.", rich_help_panel=METHOD)] = 50,
    gene_sets: GeneSetFiles = None,
    gene_set_level: GeneSetLevel = None,
    min_set_size: MinSetSize = 5,
    sets: SetNames = None,
    max_cells: Annotated[Optional[int], typer.Option("--max-cells", help="Perturb at most this many start cells (sampled with --seed).", rich_help_panel=CELLS)] = None,
    seed: Seed = 0,
    device: Device = "auto",
    tokens_per_batch: InferenceTokens = 65536,
    compile: Compile = False,
    quiet: Quiet = False,
    overwrite: Overwrite = False,
) -> None:
    """In silico perturbation: delete or overexpress genes and measure the shift toward a goal state.

    For each start-state cell and gene, the shift is cos(perturbed, goal) - cos(original, goal)
    with cell embeddings = mean of gene-token hidden states; each gene's shifts are tested
    against the null (all genes pooled, or random genes) with a rank-sum test and
    Benjamini-Hochberg FDR. Writes genes.parquet/.csv, shifts.parquet and shifts.png. With
    --gene-sets, each whole set (--sets) is perturbed instead, against random expressed-gene sets
    of its size, into pathways.parquet/.csv.

    Example: cellrank perturb model/ cells.h5ad --out perturb/ --state-column condition --start-state disease --goal-state healthy
    """
    from rich.console import Console

    from cellrank_fm import api
    from cellrank_fm.outputs import check_new_directory

    check_new_directory(out, overwrite)  # before minutes of work, and again when writing
    layer, hidden_layer = layers(layer, hidden_layer)
    result = api.perturb(model_dir, input, state_column=state_column, start_state=start_state, goal_state=goal_state,
                         alt_states=alt_states or (), genes=genes, as_set=as_set, mode=mode, hidden_layer=hidden_layer,
                         null_genes=null_genes, gene_sets=gene_sets or None, gene_set_level=gene_set_level,
                         min_set_size=min_set_size, sets=sets, max_cells=max_cells, seed=seed, layer=layer,
                         tokens_per_batch=tokens_per_batch, device=device, compile=compile,
                         progress=not quiet)
    result.write(out, overwrite=overwrite)
    if not quiet:
        Console().print(result.summary())
        Console().print(f"results in {out}/")
