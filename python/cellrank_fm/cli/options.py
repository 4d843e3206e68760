"""Every option and argument the commands share, declared once (Typer's `Annotated` style).

A command module imports the declarations it needs; options only one command has are declared
in place, in the same style. `--layer` always names the layer holding raw counts; hidden
layers are `--hidden-layer`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

# Help panels, in the order commands show them.
IO = "Input and output"
GENES = "Genes"
CELLS = "Cells"
MODEL = "Model"
METHOD = "Method"
SPLIT = "Split (same for finetune and baseline)"
TRAIN = "Training"
OUT = "Output"
RUN = "Run"
SETS = "Gene sets"

# ---- run
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.", rich_help_panel=RUN)]
Device = Annotated[str, typer.Option("--device", help="auto (the GPU when there is one), cpu, cuda, cuda:1, ...", rich_help_panel=RUN)]
InferenceTokens = Annotated[int, typer.Option("--tokens-per-batch", help="Token budget of one packed forward pass.", rich_help_panel=RUN)]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the model's encoder (faster on GPU for large inputs, after a warm-up).", rich_help_panel=RUN)]

# ---- inputs
Inputs = Annotated[List[Path], typer.Argument(help="Input files (.h5ad, .loom, 10x .h5, .csv/.tsv/.parquet) or directories (Matrix Market, TileDB-SOMA experiment, or a folder of inputs).", show_default=False)]
Shards = Annotated[Path, typer.Argument(help="Token shard directory from `cellrank tokenize`.", show_default=False)]
Cells = Annotated[Path, typer.Argument(help="Cells: an input file (.h5ad, ...) tokenized with the model's vocabulary, or a token shard directory.", show_default=False)]
H5adCells = Annotated[Path, typer.Argument(help="Cells (.h5ad, raw counts).", show_default=False)]
Classifier = Annotated[Path, typer.Argument(help="Classifier directory from `cellrank finetune`.", show_default=False)]
AnyModel = Annotated[Path, typer.Argument(help="Model directory (a fine-tuned classifier or a pretrained model).", show_default=False)]
OutputDir = Annotated[Path, typer.Option("--out", "-o", help="Output directory (tables and plots).", rich_help_panel=OUT)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out directory.", rich_help_panel=OUT)]
CountsLayer = Annotated[Optional[str], typer.Option("--layer", help="Layer holding the raw counts ('raw' for raw/X); default X.", rich_help_panel=CELLS)]
Orientation = Annotated[str, typer.Option("--orientation", help="Tables: auto, samples-by-genes or genes-by-samples.", rich_help_panel=CELLS)]
HiddenLayer = Annotated[Optional[int], typer.Option("--hidden-layer", help="Hidden layer to read: -1 last (default), -2 second last, 0 the embeddings.", rich_help_panel=METHOD)]
# embed and perturb: --layer once named the hidden layer; a number there still does, with a note.
CountsOrOldHiddenLayer = Annotated[Optional[str], typer.Option("--layer", help="Layer holding the raw counts ('raw' for raw/X); default X. (A number is the old spelling of --hidden-layer.)", rich_help_panel=CELLS)]

# ---- genes
GeneIdColumn = Annotated[Optional[str], typer.Option("--gene-id-column", help="var column holding gene IDs or symbols (default: var_names; 10x/mtx: feature IDs, 'gene_symbols' for names).", rich_help_panel=GENES)]
GeneMap = Annotated[Optional[List[Path]], typer.Option("--gene-map", help="Symbol/alias/old-ID -> Ensembl ID table: Geneformer's gene_name_id_dict / ensembl_mapping_dict .pkl or a 2-column CSV/TSV. Repeatable.", rich_help_panel=GENES)]
# Commands that tokenize new cells with a model: the defaults come from the model directory.
ModelGeneIdColumn = Annotated[Optional[str], typer.Option("--gene-id-column", help="var column of the input holding gene IDs or symbols (default: the training input's, if present, else var_names).", rich_help_panel=GENES)]
ModelGeneMap = Annotated[Optional[List[Path]], typer.Option("--gene-map", help="Symbol/alias -> Ensembl ID table (default: the mapping saved in the model directory, from the shards' --gene-map). Repeatable.", rich_help_panel=GENES)]

# ---- gene sets (explain, perturb, score)
GeneSetFiles = Annotated[Optional[List[Path]], typer.Option("--gene-sets", metavar="FILE", show_default=False, help="Gene sets: GMT, a two-column CSV/TSV (set, gene) or the MitoCarta3.0 table; symbols or Ensembl IDs. Repeatable.", rich_help_panel=SETS)]
GeneSetLevel = Annotated[Optional[int], typer.Option("--gene-set-level", metavar="1|2|3", show_default=False, help="MitoCarta3.0 hierarchy depth: 1 = top-level programmes (OXPHOS, Metabolism, ...; the default), 3 = leaf pathways.", rich_help_panel=SETS)]
MinSetSize = Annotated[int, typer.Option("--min-set-size", help="Leave out sets with fewer genes the model reads (with a note).", rich_help_panel=SETS)]
SetNames = Annotated[Optional[str], typer.Option("--sets", metavar="all|NAME,...", help="Only these sets (default: all).", rich_help_panel=SETS)]

# ---- the split (identical in finetune and baseline, so the two always split the same way)
SplitSeed = Annotated[int, typer.Option("--seed", help="Seed for the split and everything random.", rich_help_panel=SPLIT)]
SplitBy = Annotated[Optional[str], typer.Option("--split-by", metavar="COLUMN", help="Keep each value of this column (e.g. donor) inside one split.", rich_help_panel=SPLIT)]
SplitColumn = Annotated[Optional[str], typer.Option("--split-column", metavar="COLUMN", help="Take the split from this column (values train, validation|val, test).", rich_help_panel=SPLIT)]
ValFraction = Annotated[float, typer.Option("--validation-fraction", help="Share of each class for validation.", rich_help_panel=SPLIT)]
TestFraction = Annotated[float, typer.Option("--test-fraction", help="Share of each class for the test.", rich_help_panel=SPLIT)]
MinClassSize = Annotated[int, typer.Option("--min-class-size", help="Leave out classes with fewer labelled cells than this.", rich_help_panel=SPLIT)]
Label = Annotated[str, typer.Option("--label", "-l", metavar="COLUMN", help="Cell metadata column to predict.")]
NoClassWeight = Annotated[bool, typer.Option("--no-class-weight", help="Do not weight classes by inverse frequency.", rich_help_panel=TRAIN)]


def split_options(seed: int, split_by: str | None, split_column: str | None, validation_fraction: float,
                  test_fraction: float, min_class_size: int) -> dict:
    return dict(seed=seed, split_by=split_by, split_column=split_column, validation_fraction=validation_fraction,
                test_fraction=test_fraction, min_class_size=min_class_size)


def layers(layer: str | None, hidden_layer: int | None) -> tuple[str | None, int]:
    """(counts layer, hidden layer) from --layer and --hidden-layer, reading a number in --layer
    as the old spelling of --hidden-layer (with a note)."""
    from cellrank_fm.errors import UserError

    try:
        old = int(layer) if layer is not None else None
    except ValueError:
        old = None
    if old is None:
        return layer, -1 if hidden_layer is None else hidden_layer
    if hidden_layer is not None and hidden_layer != old:
        raise UserError(f"--layer {layer} (the old spelling of --hidden-layer) disagrees with --hidden-layer {hidden_layer}; give --hidden-layer only.")
    print(f"note: --layer {layer} names a hidden layer, which is now --hidden-layer {old}; --layer names the "
          "layer holding the raw counts.", file=sys.stderr)
    return None, old
