"""Command: score (per-cell pathway activity from the token ranking)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from cellrank_fm.cli.app import app
from cellrank_fm.cli.genesets import SETS, GeneSetFiles, GeneSetLevel, MinSetSize, split_names

@app.command("score", rich_help_panel="Explain")
def score_cmd(
    input: Annotated[Path, typer.Argument(help="Cells: an .h5ad (tokenized on the fly) or a token shard directory.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad: the input plus obsm['cellrank_pathways'] (cells × sets).", show_default=False)],
    gene_sets: GeneSetFiles = None,
    gene_set_level: GeneSetLevel = None,
    min_set_size: MinSetSize = 5,
    sets: Annotated[Optional[str], typer.Option("--sets", metavar="all|NAME,...", help="Score only these sets.", rich_help_panel=SETS)] = None,
    auc_max_rank: Annotated[Optional[int], typer.Option("--auc-max-rank", metavar="R", help="Recovery curve up to rank R (default: 5% of the genes the encoding ranks, as AUCell).", show_default=False)] = None,
    groupby: Annotated[Optional[str], typer.Option("--groupby", metavar="COLUMN", help="Compare groups of this obs column: a group × pathway heatmap PNG and a rank-sum/FDR table beside --out.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", metavar="DIR", help="h5ad input: tokenize as this model directory was trained (vocabulary, medians, gene set, gene map).", rich_help_panel="Tokenization")] = None,
    vocab: Annotated[Optional[Path], typer.Option("--vocab", help="h5ad input without --model: the vocabulary (e.g. token_dictionary_gc30M.pkl).", rich_help_panel="Tokenization")] = None,
    medians: Annotated[Optional[Path], typer.Option("--medians", help="h5ad input without --model: the gene medians.", rich_help_panel="Tokenization")] = None,
    gene_map: Annotated[List[Path], typer.Option("--gene-map", help="Symbol/alias -> Ensembl ID table (repeatable), for cell genes and set genes alike.", rich_help_panel="Tokenization")] = [],  # noqa: B006 - typer reads the default
    model_version: Annotated[str, typer.Option("--model-version", help="With --vocab: v1 or v2.", rich_help_panel="Tokenization")] = "v1",
    model_input_size: Annotated[Optional[int], typer.Option("--model-input-size", help="With --vocab: tokens per cell.", rich_help_panel="Tokenization", show_default=False)] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help="h5ad layer holding raw counts ('raw' for raw/X).", rich_help_panel="Tokenization")] = None,
    chunk_cells: Annotated[int, typer.Option("--chunk-cells", help="Cells scored at a time (memory scales with it).")] = 8192,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Per-cell pathway activity from the rank-value encoding (AUCell's recovery AUC).

    For each cell and set: the area under the curve counting the set's genes among the cell's
    top 1..R ranked genes, divided by its maximum for a set of that size (1 = the set holds the
    cell's top genes). Writes --out with obsm['cellrank_pathways'] and the set names in
    uns['cellrank_pathways_names']; with --groupby, OUT.COLUMN.pathways.csv and OUT.COLUMN.heatmap.png.

    Example: cellrank score pbmc.h5ad --gene-sets Human.MitoCarta3.0.csv --gene-set-level 3 --model classifier/ --out pbmc.scored.h5ad --groupby condition
    """
    from rich.console import Console

    from cellrank_fm.errors import UserError
    from cellrank_fm.score import group_outputs, score_file, summary_table

    if not gene_sets:
        raise UserError("score needs --gene-sets FILE.")
    if chunk_cells < 1:
        raise UserError("--chunk-cells must be at least 1.")
    result = score_file(input, out, gene_sets, model_dir=model, vocab=vocab, medians=medians, gene_map=gene_map,
                        model_version=model_version, model_input_size=model_input_size, level=gene_set_level,
                        min_size=min_set_size, sets=split_names(sets), auc_max_rank=auc_max_rank, groupby=groupby,
                        layer=layer, chunk_cells=chunk_cells, quiet=quiet)
    if not quiet:
        console = Console()
        console.print(summary_table(result))
        where = [str(out)] + ([str(p) for p in group_outputs(out, groupby)] if groupby else [])
        console.print(f"{len(result.scores):,} cells × {len(result.names)} sets; written {', '.join(where)}")
