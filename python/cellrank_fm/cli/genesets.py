"""Gene-set options shared by explain, perturb and score."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

SETS = "Gene sets"

GeneSetFiles = Annotated[Optional[List[Path]], typer.Option(
    "--gene-sets", metavar="FILE", show_default=False, rich_help_panel=SETS,
    help="Gene sets: GMT, a two-column CSV/TSV (set, gene) or the MitoCarta3.0 table; symbols or Ensembl IDs. Repeatable.")]
GeneSetLevel = Annotated[Optional[int], typer.Option(
    "--gene-set-level", metavar="1|2|3", show_default=False, rich_help_panel=SETS,
    help="MitoCarta3.0 hierarchy depth: 1 = top-level programmes (OXPHOS, Metabolism, ...; the default), 3 = leaf pathways.")]
MinSetSize = Annotated[int, typer.Option(
    "--min-set-size", rich_help_panel=SETS,
    help="Leave out sets with fewer genes in the model's vocabulary (with a note).")]


def split_names(value: Optional[str]) -> Optional[list[str]]:
    """Names from a comma-separated option; None for 'all' or nothing."""
    if value is None or value.strip().lower() == "all":
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None
