"""Commands: tokenize (raw counts -> token shards) and medians (per-gene normalisation factors)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cellrank_fm.cli.app import app

_IO = "Input and output"
_VOCAB = "Vocabulary and model"
_GENES = "Genes"
_CELLS = "Cells and values"
_RUN = "Run"


def _split(value: Optional[str]) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


@app.command(rich_help_panel="Data")
def tokenize(
    inputs: List[Path] = typer.Argument(..., help="Input files (.h5ad, .loom, 10x .h5, .csv/.tsv/.parquet) or directories (Matrix Market, or a folder of inputs).", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output shard directory.", rich_help_panel=_IO),
    vocab: Path = typer.Option(..., "--vocab", help="Vocabulary: our vocabulary.json/.parquet or Geneformer's token_dictionary_*.pkl.", rich_help_panel=_VOCAB),
    medians: Path = typer.Option(..., "--medians", help="Gene medians: medians.json/.parquet or Geneformer's gene_median_dictionary_*.pkl.", rich_help_panel=_VOCAB),
    model_version: str = typer.Option("v1", "--model-version", help="v1: 2,048 genes, no special tokens; v2: 4,096 with <cls> first and <eos> last.", rich_help_panel=_VOCAB),
    model_input_size: Optional[int] = typer.Option(None, "--model-input-size", help="Override the preset's input size (tokens per cell, special tokens included).", rich_help_panel=_VOCAB),
    gene_id_column: Optional[str] = typer.Option(None, "--gene-id-column", help="var column holding gene IDs or symbols (default: var_names; 10x/mtx: feature IDs, 'gene_symbols' for names).", rich_help_panel=_GENES),
    gene_map: List[Path] = typer.Option([], "--gene-map", help="Symbol/alias/old-ID -> Ensembl ID table: Geneformer's gene_name_id_dict / ensembl_mapping_dict .pkl or a 2-column CSV/TSV. Repeatable.", rich_help_panel=_GENES),
    genes: Optional[Path] = typer.Option(None, "--genes", help="Restrict to a gene set: one ID or symbol per line, or a CSV (column auto-detected). Token ids stay the full vocabulary's.", rich_help_panel=_GENES),
    genes_column: Optional[str] = typer.Option(None, "--genes-column", help="Column of the --genes table to use.", rich_help_panel=_GENES),
    keep_obs: Optional[str] = typer.Option(None, "--keep-obs", help="Comma-separated obs columns to carry into the shards (e.g. cell_type,donor).", rich_help_panel=_CELLS),
    cell_id_column: Optional[str] = typer.Option(None, "--cell-id-column", help="obs column naming the cells (default: the obs index).", rich_help_panel=_CELLS),
    layer: Optional[str] = typer.Option(None, "--layer", help="h5ad/loom layer holding raw counts ('raw' for raw/X); default X.", rich_help_panel=_CELLS),
    orientation: str = typer.Option("auto", "--orientation", help="Tables: auto, samples-by-genes or genes-by-samples.", rich_help_panel=_CELLS),
    allow_float: bool = typer.Option(False, "--allow-float", help="Accept non-integer values (TPM/FPKM bulk) without a warning.", rich_help_panel=_CELLS),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run into the same --out (same inputs and options).", rich_help_panel=_RUN),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing shard directory.", rich_help_panel=_RUN),
    chunk_cells: int = typer.Option(2048, "--chunk-cells", help="Cells per chunk handed to the Rust core (memory scales with it).", rich_help_panel=_RUN),
    part_cells: int = typer.Option(65536, "--part-cells", help="Input rows per part file (the unit --resume skips).", rich_help_panel=_RUN),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary.", rich_help_panel=_RUN),
) -> None:
    """Tokenize raw counts into rank-value token shards (Geneformer's encoding).

    Each cell's counts are divided by its total and by each gene's median, ranked, and the top
    genes kept as token ids; shards are Parquet parts plus manifest.json.

    Example: cellrank tokenize pbmc.h5ad --out shards/ --vocab token_dictionary_gc104M.pkl
    --medians gene_median_dictionary_gc104M.pkl --model-version v2 --gene-id-column ensembl_id
    """
    from cellrank_fm.tokenize import Dictionaries, TokenizeSettings, tokenize_files

    dicts = Dictionaries.load(vocab, medians, gene_map, genes, genes_column)
    settings = TokenizeSettings(
        model_version=model_version.lower(),
        model_input_size=model_input_size,
        gene_id_column=gene_id_column,
        layer=layer,
        orientation=orientation,
        allow_float=allow_float,
        keep_obs=_split(keep_obs),
        cell_id_column=cell_id_column,
        part_cells=part_cells,
        genes_file=str(genes) if genes else None,
        genes_column=genes_column,
    )
    tokenize_files(inputs, out, dicts, settings, chunk_cells=chunk_cells, resume=resume, overwrite=overwrite, quiet=quiet)


@app.command(rich_help_panel="Data")
def medians(
    inputs: List[Path] = typer.Argument(None, help="Input files or directories (as for tokenize).", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write gene -> median JSON here.", rich_help_panel=_IO),
    sketch_out: Optional[Path] = typer.Option(None, "--sketch-out", help="Also save the mergeable sketch (for corpora processed in pieces).", rich_help_panel=_IO),
    merge: List[Path] = typer.Option([], "--merge", help="Merge sketch files instead of reading inputs. Repeatable.", rich_help_panel=_IO),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="Sketch only these genes (needed for pieces you will merge); default: every resolved gene.", rich_help_panel=_GENES),
    gene_id_column: Optional[str] = typer.Option(None, "--gene-id-column", help="var column holding gene IDs or symbols.", rich_help_panel=_GENES),
    gene_map: List[Path] = typer.Option([], "--gene-map", help="Symbol/alias -> Ensembl ID table (.pkl or CSV/TSV). Repeatable.", rich_help_panel=_GENES),
    layer: Optional[str] = typer.Option(None, "--layer", help="h5ad/loom layer holding raw counts.", rich_help_panel=_CELLS),
    orientation: str = typer.Option("auto", "--orientation", help="Tables: auto, samples-by-genes or genes-by-samples.", rich_help_panel=_CELLS),
    relative_accuracy: float = typer.Option(0.001, "--relative-accuracy", help="Sketch accuracy: the median is within this relative error of an exact order statistic.", rich_help_panel=_RUN),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.", rich_help_panel=_RUN),
) -> None:
    """Compute each gene's nonzero median of count / total x 10,000 over a corpus.

    One streaming pass; with --sketch-out the per-gene sketch is saved so pieces of a corpus can
    be merged later with --merge.

    Example: cellrank medians corpus/ --out medians.json --gene-map gene_name_id_dict_gc104M.pkl
    """
    from cellrank_fm.errors import UserError
    from cellrank_fm.medians import compute_medians, merge_sketches

    if merge:
        if inputs:
            raise UserError("give either input files or --merge sketches, not both")
        result = merge_sketches(merge, out, sketch_out)
    else:
        if not inputs:
            raise UserError("give input files, or --merge with sketch files")
        result = compute_medians(inputs, out, vocab_path=vocab, mapping_paths=gene_map, gene_id_column=gene_id_column,
                                 layer=layer, orientation=orientation, sketch_out=sketch_out,
                                 relative_accuracy=relative_accuracy, quiet=quiet)
    if not quiet:
        import sys

        print(f"medians for {len(result):,} genes" + (f" written to {out}" if out else ""), file=sys.stderr)
