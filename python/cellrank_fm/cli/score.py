"""Command: score (per-cell pathway activity from the token ranking)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cellrank_fm.cli.app import app
from cellrank_fm.cli.options import (
    IO,
    METHOD,
    RUN,
    CountsLayer,
    GeneMap,
    GeneSetFiles,
    GeneSetLevel,
    MinSetSize,
    Quiet,
    SetNames,
)

TOKENS = "Tokenization (h5ad input)"


@app.command("score", rich_help_panel="Explain")
def score_cmd(
    input: Annotated[Path, typer.Argument(help="Cells: an .h5ad of raw counts (tokenized on the fly) or a token shard directory.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .h5ad: the input plus obsm['cellrank_pathways'] (cells × sets).", show_default=False, rich_help_panel=IO)],
    gene_sets: GeneSetFiles = None,
    gene_set_level: GeneSetLevel = None,
    min_set_size: MinSetSize = 5,
    sets: SetNames = None,
    auc_max_rank: Annotated[Optional[int], typer.Option("--auc-max-rank", metavar="R", help="Recovery curve up to rank R (default: 5% of the genes the encoding ranks, as AUCell).", show_default=False, rich_help_panel=METHOD)] = None,
    groupby: Annotated[Optional[str], typer.Option("--groupby", metavar="COLUMN", help="Compare groups of this obs column: a rank-sum/FDR table and a group × pathway heatmap PNG beside --out.", rich_help_panel=METHOD)] = None,
    model: Annotated[Optional[Path], typer.Option("--model", metavar="DIR", help="Tokenize as this model directory was trained (vocabulary, medians, gene set, gene map).", rich_help_panel=TOKENS)] = None,
    vocab: Annotated[Optional[Path], typer.Option("--vocab", help="Without --model: the vocabulary (e.g. token_dictionary_gc30M.pkl).", rich_help_panel=TOKENS)] = None,
    medians: Annotated[Optional[Path], typer.Option("--medians", help="Without --model: the gene medians.", rich_help_panel=TOKENS)] = None,
    gene_map: GeneMap = None,
    model_version: Annotated[str, typer.Option("--model-version", help="With --vocab: v1 or v2.", rich_help_panel=TOKENS)] = "v1",
    model_input_size: Annotated[Optional[int], typer.Option("--model-input-size", help="With --vocab: tokens per cell.", show_default=False, rich_help_panel=TOKENS)] = None,
    layer: CountsLayer = None,
    chunk_cells: Annotated[int, typer.Option("--chunk-cells", help="Cells scored at a time (memory scales with it).", rich_help_panel=RUN)] = 8192,
    quiet: Quiet = False,
) -> None:
    """Per-cell pathway activity from the rank-value encoding (AUCell's recovery AUC).

    For each cell and set: the area under the curve counting the set's genes among the cell's
    top 1..R ranked genes, divided by its maximum for a set of that size (1 = the set holds the
    cell's top genes). Writes --out with obsm['cellrank_pathways'] and the set names in
    uns['cellrank_pathways_names']; with --groupby, OUT.COLUMN.pathways.csv and OUT.COLUMN.heatmap.png.

    Example: cellrank score pbmc.h5ad --gene-sets Human.MitoCarta3.0.csv --gene-set-level 3 --model classifier/ --out pbmc.scored.h5ad --groupby condition
    """
    from rich.console import Console

    from cellrank_fm import api
    from cellrank_fm.errors import UserError, atomic_path
    from cellrank_fm.inference import write_h5ad_copy
    from cellrank_fm.outputs import claim_all
    from cellrank_fm.score import KEY, group_outputs, plot_groups, summary_table

    if not gene_sets:
        raise UserError("score needs --gene-sets FILE.")
    if out.suffix != ".h5ad":
        raise UserError(f"--out must name an .h5ad file, not {out}.")
    if out.resolve() == input.resolve():
        raise UserError("--out must differ from the input file; cellrank never overwrites its input.")
    table_path, png_path = group_outputs(out, groupby) if groupby else (None, None)
    with claim_all(out, table_path, png_path):
        adata = api.score(input, gene_sets, model=model, vocab=vocab, medians=medians, gene_map=gene_map or (),
                          model_version=model_version, model_input_size=model_input_size, gene_set_level=gene_set_level,
                          min_set_size=min_set_size, sets=sets, auc_max_rank=auc_max_rank, groupby=groupby, layer=layer,
                          chunk_cells=chunk_cells, progress=not quiet)
        try:
            uns = [f"{KEY}_names", KEY] + ([f"{KEY}_{groupby}"] if groupby else [])
            if input.is_dir():  # shards: a new AnnData of the cells' metadata
                with atomic_path(out) as tmp:
                    adata.write_h5ad(tmp)
            else:
                write_h5ad_copy(input, out, adata, obsm=[KEY], uns=uns)
            if groupby:
                groups = adata.uns[f"{KEY}_{groupby}"]
                with atomic_path(table_path) as tmp:
                    groups.to_csv(tmp, index=False)
                plot_groups(groups, png_path, groupby, int(adata.uns[KEY]["auc_max_rank"]))
            if not quiet:
                Console().print(summary_table(adata, KEY, groupby))
            n_cells, n_sets = adata.obsm[KEY].shape
        finally:
            if adata.isbacked:
                adata.file.close()
    if not quiet:
        where = [str(out)] + ([str(table_path), str(png_path)] if groupby else [])
        Console().print(f"{n_cells:,} cells × {n_sets} sets; wrote {', '.join(where)}")
