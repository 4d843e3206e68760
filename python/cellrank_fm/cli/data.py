"""Commands: tokenize (raw counts -> token shards) and medians (per-gene normalisation factors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from cellrank_fm.cli.app import app
from cellrank_fm.cli.options import (
    CELLS,
    GENES,
    IO,
    RUN,
    CountsLayer,
    GeneIdColumn,
    GeneMap,
    Inputs,
    Orientation,
    Quiet,
)

VOCAB = "Vocabulary and model"


@app.command(rich_help_panel="Data")
def tokenize(
    inputs: Inputs,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output shard directory.", rich_help_panel=IO)],
    vocab: Annotated[Path, typer.Option("--vocab", help="Vocabulary: our vocabulary.json/.parquet or Geneformer's token_dictionary_*.pkl.", rich_help_panel=VOCAB)],
    medians: Annotated[Path, typer.Option("--medians", help="Gene medians: medians.json/.parquet or Geneformer's gene_median_dictionary_*.pkl.", rich_help_panel=VOCAB)],
    model_version: Annotated[str, typer.Option("--model-version", help="v1: 2,048 genes, no special tokens; v2: 4,096 with <cls> first and <eos> last.", rich_help_panel=VOCAB)] = "v1",
    model_input_size: Annotated[Optional[int], typer.Option("--model-input-size", help="Override the preset's input size (tokens per cell, special tokens included).", rich_help_panel=VOCAB)] = None,
    gene_id_column: GeneIdColumn = None,
    gene_map: GeneMap = None,
    genes: Annotated[Optional[Path], typer.Option("--genes", help="Restrict to a gene set: one ID or symbol per line, or a CSV (column auto-detected). Token ids stay the full vocabulary's.", rich_help_panel=GENES)] = None,
    genes_column: Annotated[Optional[str], typer.Option("--genes-column", help="Column of the --genes table to use.", rich_help_panel=GENES)] = None,
    keep_obs: Annotated[Optional[str], typer.Option("--keep-obs", help="Comma-separated obs columns to carry into the shards (e.g. cell_type,donor).", rich_help_panel=CELLS)] = None,
    cell_id_column: Annotated[Optional[str], typer.Option("--cell-id-column", help="obs column naming the cells (default: the obs index).", rich_help_panel=CELLS)] = None,
    layer: CountsLayer = None,
    orientation: Orientation = "auto",
    allow_float: Annotated[bool, typer.Option("--allow-float", help="Accept non-integer values (TPM/FPKM bulk) without a warning.", rich_help_panel=CELLS)] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run into the same --out (same inputs and options).", rich_help_panel=RUN)] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing shard directory.", rich_help_panel=RUN)] = False,
    chunk_cells: Annotated[int, typer.Option("--chunk-cells", help="Cells per chunk handed to the Rust core (memory scales with it).", rich_help_panel=RUN)] = 2048,
    part_cells: Annotated[int, typer.Option("--part-cells", help="Input rows per part file (the unit --resume skips).", rich_help_panel=RUN)] = 65536,
    quiet: Quiet = False,
) -> None:
    """Tokenize raw counts into rank-value token shards (Geneformer's encoding).

    Each cell's counts are divided by its total and by each gene's median, ranked, and the top
    genes kept as token ids; shards are Parquet parts plus manifest.json.

    Example: cellrank tokenize pbmc.h5ad --out shards/ --vocab token_dictionary_gc104M.pkl
    --medians gene_median_dictionary_gc104M.pkl --model-version v2 --gene-id-column ensembl_id
    """
    from cellrank_fm import api

    api.tokenize(inputs, out=out, vocab=vocab, medians=medians, gene_map=gene_map or (), genes=genes,
                 genes_column=genes_column, keep_obs=keep_obs or (), model_version=model_version,
                 model_input_size=model_input_size, gene_id_column=gene_id_column, layer=layer,
                 cell_id_column=cell_id_column, orientation=orientation, allow_float=allow_float, resume=resume,
                 overwrite=overwrite, chunk_cells=chunk_cells, part_cells=part_cells, progress=not quiet)


@app.command(rich_help_panel="Data")
def medians(
    inputs: Annotated[Optional[List[Path]], typer.Argument(help="Input files or directories (as for tokenize).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write gene -> median JSON here.", rich_help_panel=IO)] = None,
    sketch_out: Annotated[Optional[Path], typer.Option("--sketch-out", help="Also save the mergeable sketch (for corpora processed in pieces).", rich_help_panel=IO)] = None,
    merge: Annotated[Optional[List[Path]], typer.Option("--merge", help="Merge sketch files instead of reading inputs. Repeatable.", rich_help_panel=IO)] = None,
    vocab: Annotated[Optional[Path], typer.Option("--vocab", help="Sketch only these genes (needed for pieces you will merge); default: every resolved gene.", rich_help_panel=GENES)] = None,
    gene_id_column: GeneIdColumn = None,
    gene_map: GeneMap = None,
    layer: CountsLayer = None,
    orientation: Orientation = "auto",
    relative_accuracy: Annotated[float, typer.Option("--relative-accuracy", help="Sketch accuracy: the median is within this relative error of an exact order statistic.", rich_help_panel=RUN)] = 0.001,
    quiet: Quiet = False,
) -> None:
    """Compute each gene's nonzero median of count / total x 10,000 over a corpus.

    One streaming pass; with --sketch-out the per-gene sketch is saved so pieces of a corpus can
    be merged later with --merge.

    Example: cellrank medians corpus/ --out medians.json --gene-map gene_name_id_dict_gc104M.pkl
    """
    from cellrank_fm.errors import UserError

    if merge:
        from cellrank_fm.medians import merge_sketches

        if inputs:
            raise UserError("give either input files or --merge sketches, not both")
        result = merge_sketches(merge, out, sketch_out)
    else:
        from cellrank_fm import api

        if not inputs:
            raise UserError("give input files, or --merge with sketch files")
        if out is None and sketch_out is None:
            raise UserError("give --out for the medians, --sketch-out for a sketch, or both")
        result = api.medians(inputs, out=out, vocab=vocab, gene_map=gene_map or (), gene_id_column=gene_id_column,
                             layer=layer, orientation=orientation, sketch_out=sketch_out,
                             relative_accuracy=relative_accuracy, progress=not quiet)
    if not quiet:
        import sys

        print(f"medians for {len(result):,} genes" + (f" written to {out}" if out else ""), file=sys.stderr)
