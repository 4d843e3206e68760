"""Commands: explain (SHAP gene importance), perturb (in silico deletion / overexpression)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from cellrank_fm.cli.app import app
from cellrank_fm.cli.genesets import SETS, GeneSetFiles, GeneSetLevel, MinSetSize, split_names

CELLS = "Cells"
METHOD = "Method"
RUN = "Compute"
OUT = "Output"

ModelDir = Annotated[Path, typer.Argument(help="Model directory written by `cellrank finetune` (a cell classifier).")]
Input = Annotated[Path, typer.Argument(help="Cells: an input file (.h5ad, ...) tokenized with the model's vocabulary, or a token shard directory.")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda, cuda:1, ...", rich_help_panel=RUN)]
TokensPerBatch = Annotated[int, typer.Option("--tokens-per-batch", help="Token budget of one packed forward pass.", rich_help_panel=RUN)]
Seed = Annotated[int, typer.Option("--seed", help="Seed for cell sampling and permutations.", rich_help_panel=CELLS)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.", rich_help_panel=OUT)]


def _split_list(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


@app.command("explain", rich_help_panel="Explain")
def explain_cmd(
    model_dir: ModelDir,
    input: Input,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (tables and PNGs).", rich_help_panel=OUT)],
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
    top: Annotated[int, typer.Option("--top", help="Genes per class in the plots.", rich_help_panel=OUT)] = 20,
    device: Device = "auto",
    tokens_per_batch: TokensPerBatch = 65536,
    quiet: Quiet = False,
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

    from cellrank_fm.errors import UserError
    from cellrank_fm.explain import (METHODS, Evaluator, explain, input_symbols, load_cells, load_classifier,
                                     summary_table, write_outputs)

    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; use permutation or gradient.")
    if per_class is not None and per_class < 1:
        raise UserError("--per-class must be at least 1.")
    if permutations < 1 or samples < 1:
        raise UserError("--permutations and --samples must be at least 1.")
    lm = load_classifier(model_dir, device)
    wanted = _split_list(classes)
    evaluator = Evaluator(lm.model, lm.info, tokens_per_batch, value=value)
    if wanted:
        from cellrank_fm.explain import class_indices

        class_indices(evaluator.labels, wanted, "--classes value")
    symbols = {**input_symbols(input, lm.gene_id_column), **(lm.info.symbols or {})}
    sets = _gene_sets(lm, gene_sets, gene_set_level, min_set_size, None, symbols, quiet)
    cells = load_cells(input, lm)
    result = explain(evaluator, cells, method=method, symbols=symbols, label_column=label, classes=wanted, all_classes=all_classes,
                     per_class=per_class, npermutations=permutations, nsamples=samples, seed=seed, gene_sets=sets,
                     quiet=quiet)
    result.settings.update(model=str(model_dir), input=str(input))
    write_outputs(result, out, top=top)
    if not quiet:
        console = Console()
        console.print(summary_table(result))
        if result.pathways is not None:
            from cellrank_fm.pathways import summary_table as pathway_table

            console.print(pathway_table(result.pathways))
        console.print(f"{evaluator.evaluations:,} model evaluations; results in {out}/")


def _gene_sets(lm, files, level, min_size, names, symbols, quiet):
    """The --gene-sets resolved against the model, their coverage printed; None without files."""
    if not files:
        if names is not None or level is not None:
            from cellrank_fm.errors import UserError

            raise UserError("--sets and --gene-set-level need --gene-sets FILE.")
        return None
    from cellrank_fm.genesets import gene_sets_for_model, report

    sets = gene_sets_for_model(lm, files, level=level, min_size=min_size, names=names, extra_symbols=symbols)
    if not quiet:
        report(sets)
    return sets


@app.command("perturb", rich_help_panel="Explain")
def perturb_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory (a fine-tuned classifier or a pretrained model).")],
    input: Input,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (tables and PNG).", rich_help_panel=OUT)],
    state_column: Annotated[str, typer.Option("--state-column", metavar="COLUMN", help="Cell metadata column holding the states.", rich_help_panel=CELLS)],
    start_state: Annotated[str, typer.Option("--start-state", help="Perturb the cells of this state.", rich_help_panel=CELLS)],
    goal_state: Annotated[str, typer.Option("--goal-state", help="Measure the shift toward this state's mean embedding.", rich_help_panel=CELLS)],
    alt_states: Annotated[Optional[str], typer.Option("--alt-states", metavar="C,D", help="Also measure shifts toward these states.", rich_help_panel=CELLS)] = None,
    genes: Annotated[str, typer.Option("--genes", help="'all' (each gene the start cells express, one at a time) or a comma-separated list of Ensembl IDs or symbols.", rich_help_panel=METHOD)] = "all",
    as_set: Annotated[bool, typer.Option("--as-set", help="Perturb the listed genes together, as one set.", rich_help_panel=METHOD)] = False,
    mode: Annotated[str, typer.Option("--mode", help="delete (remove the gene) or overexpress (move it to rank 1).", rich_help_panel=METHOD)] = "delete",
    layer: Annotated[int, typer.Option("--layer", help="Hidden layer for cell embeddings (-1 last, -2 second last).", rich_help_panel=METHOD)] = -1,
    null_genes: Annotated[int, typer.Option("--null-genes", help="With a gene list: random expressed genes (or sets) perturbed as the null.", rich_help_panel=METHOD)] = 50,
    gene_sets: GeneSetFiles = None,
    gene_set_level: GeneSetLevel = None,
    min_set_size: MinSetSize = 5,
    sets: Annotated[Optional[str], typer.Option("--sets", metavar="all|NAME,...", help="With --gene-sets: perturb each of these whole sets (default all), against random expressed-gene sets of the same size.", rich_help_panel=SETS)] = None,
    max_cells: Annotated[Optional[int], typer.Option("--max-cells", help="Perturb at most this many start cells (sampled with --seed).", rich_help_panel=CELLS)] = None,
    seed: Seed = 0,
    device: Device = "auto",
    tokens_per_batch: TokensPerBatch = 65536,
    quiet: Quiet = False,
) -> None:
    """In silico perturbation: delete or overexpress genes and measure the shift toward a goal state.

    For each start-state cell and gene, the shift is cos(perturbed, goal) - cos(original, goal)
    with cell embeddings = mean of gene-token hidden states; each gene's shifts are tested
    against the null (all genes pooled, or random genes) with a rank-sum test and
    Benjamini-Hochberg FDR. Writes genes.parquet/.csv, shifts.parquet and shifts.png.

    Example: cellrank perturb model/ cells.h5ad --out perturb/ --state-column condition --start-state disease --goal-state healthy
    """
    from rich.console import Console

    from cellrank_fm.errors import UserError
    from cellrank_fm.explain import Evaluator, input_symbols, load_cells
    from cellrank_fm.perturb import MODES, perturb, resolve_genes, summary_table, write_outputs
    from cellrank_fm.predict import load_for_inference

    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; use delete or overexpress.")
    lm = load_for_inference(model_dir, expect="any", device=device)
    if lm.info.architecture == "BertForTokenClassification":
        raise UserError(f"{model_dir} holds a gene classifier, which assigns no cell state; give a cell "
                        "classifier (`cellrank finetune`) or a pretrained model.")
    lm.info.symbols = {**input_symbols(input, lm.gene_id_column), **(lm.info.symbols or {})}
    evaluator = Evaluator(lm.model, lm.info, tokens_per_batch)
    gene_ids = None
    set_names = split_names(sets)
    if gene_sets and (genes.strip().lower() != "all" or as_set):
        raise UserError("give either --gene-sets (whole pathways) or --genes, not both.")
    chosen = _gene_sets(lm, gene_sets, gene_set_level, min_set_size, set_names, lm.info.symbols, quiet)
    if genes.strip().lower() != "all":
        names = _split_list(genes)
        if not names:
            raise UserError("--genes is empty; give 'all' or a comma-separated list of genes.")
        gene_ids = resolve_genes(names, lm.vocabulary, lm.info.symbols)
    elif as_set:
        raise UserError("--as-set needs a gene list in --genes.")
    cells = load_cells(input, lm)
    result = perturb(evaluator, cells, state_column=state_column, start_state=start_state, goal_state=goal_state,
                     alt_states=_split_list(alt_states) or [], genes=gene_ids, as_set=as_set, mode=mode, layer=layer,
                     max_cells=max_cells, null_genes=null_genes, gene_sets=chosen, seed=seed, quiet=quiet)
    result.settings.update(model=str(model_dir), input=str(input))
    write_outputs(result, out)
    if not quiet:
        Console().print(summary_table(result))
        Console().print(f"results in {out}/")
