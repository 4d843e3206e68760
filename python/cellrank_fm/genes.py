"""Gene resolution: input column labels -> current Ensembl IDs -> token ids and medians.

Ensembl IDs are upper-cased and stripped of their version suffix (`ENSG00000141510.17` ->
`ENSG00000141510`). Symbols, aliases and retired IDs go through a mapping table when one is
given (Geneformer's `gene_name_id_dict_*.pkl` / `ensembl_mapping_dict_*.pkl`, or a two-column
CSV/TSV such as GENCODE's `gene_id,gene_name`). Columns landing on the same ID get the same
token; the Rust core sums them within each cell.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from cellrank_fm.errors import UserError

_ENSEMBL = re.compile(r"^(ENS[A-Z]{0,4}GR?\d{6,})(\.\d+)?(_PAR_Y)?$", re.IGNORECASE)


def looks_like_ensembl(label: str) -> bool:
    return bool(_ENSEMBL.match(label.strip()))


def normalise_id(label: str) -> str | None:
    """Upper-cased, version-stripped Ensembl gene ID, or None if `label` is not one.

    `_PAR_Y` copies keep their suffix so they never merge with the X-chromosome gene.
    """
    if label[:3].upper() != "ENS" and label.lstrip()[:3].upper() != "ENS":
        return None  # fast path: symbols are the common case in mapping tables
    m = _ENSEMBL.match(label.strip())
    if not m:
        return None
    return m.group(1).upper() + (m.group(3).upper() if m.group(3) else "")


# ---------------------------------------------------------------------------------------------
# Mapping tables (symbol / alias / retired ID -> current Ensembl ID).


# Where shard sets and model directories keep the mapping they were tokenized with.
GENE_MAP_FILE = "gene_map.json"


@dataclass
class GeneMapping:
    """Upper-cased symbol or old ID -> current Ensembl ID, plus ID -> display symbol."""

    to_id: dict[str, str] = field(default_factory=dict)
    symbols: dict[str, str] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    _targets: dict[str, str] = field(default_factory=dict, repr=False)  # values repeat: normalise once

    def add(self, key: str, gene_id: str, symbol_ok: bool) -> None:
        target = self._targets.get(gene_id)
        if target is None:
            target = self._targets.setdefault(gene_id, normalise_id(gene_id) or "")
        target = target or None
        if target is None or not key:
            return
        k = key.strip()
        nid = normalise_id(k)
        self.to_id.setdefault(nid if nid else k.upper(), target)
        if symbol_ok and nid is None:
            self.symbols.setdefault(target, k)

    def restricted_to(self, genes) -> dict[str, str]:
        """The entries that land on `genes` (e.g. a vocabulary): what tokenizing needs."""
        return {k: v for k, v in self.to_id.items() if v in genes}

    @classmethod
    def from_table(cls, table: dict[str, str], source: str) -> "GeneMapping":
        """A mapping saved by `restricted_to` (keys already normalised)."""
        return cls(to_id=dict(table), sources=[source])

    def lookup(self, label: str) -> str | None:
        nid = normalise_id(label)
        return self.to_id.get(nid if nid else label.strip().upper())


def load_mapping(paths: Sequence[str | Path]) -> GeneMapping:
    """Read mapping tables in order; earlier tables win on conflicting keys."""
    from cellrank_fm.vocab import load_string_map

    mapping = GeneMapping()
    for path in paths:
        path = Path(path)
        mapping.sources.append(str(path))
        name = path.name.lower()
        if name.endswith((".pkl", ".pickle", ".json", ".parquet")):
            table = load_string_map(path)
            # gene_name_id_dict: symbol -> ID (good display symbols); ensembl_mapping_dict also
            # holds aliases and old IDs, which make poor display names.
            symbol_ok = "ensembl_mapping" not in name
            for key, value in table.items():
                mapping.add(key, value, symbol_ok)
        else:
            for left, right in _read_two_columns(path):
                # Whichever column holds Ensembl IDs is the target.
                if normalise_id(right) and not normalise_id(left):
                    left, right = right, left
                if normalise_id(left) is None:
                    continue  # header or a row without an ID
                mapping.add(right, left, symbol_ok=True)
                mapping.add(left, left, symbol_ok=False)
    if not mapping.to_id:
        raise UserError(f"gene mapping {', '.join(map(str, paths))} holds no Ensembl gene ID")
    return mapping


def _read_two_columns(path: Path) -> Iterable[tuple[str, str]]:
    import gzip

    if not path.is_file():
        raise UserError(f"gene mapping file {path} does not exist")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    sep = "\t" if ".tsv" in path.name.lower() or ".txt" in path.name.lower() else ","
    try:
        with opener(path, "rt") as fh:
            for line in fh:
                parts = [p.strip().strip('"') for p in line.rstrip("\n").split(sep)]
                if len(parts) >= 2:
                    yield parts[0], parts[1]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"gene mapping file {path} is not a readable text table ({err})") from None


# ---------------------------------------------------------------------------------------------
# Gene sets (--genes FILE).

_SET_COLUMN_NAMES = ("gene_id", "ensembl_id", "ensembl", "gene", "symbol", "gene_symbol", "gene_name")


def load_gene_set(path: str | Path, column: str | None = None) -> list[str]:
    """Labels (IDs or symbols) from a one-per-line file or a named/auto-detected CSV column.

    Auto-detection prefers the column with the most Ensembl IDs (MitoCarta's
    `EnsemblGeneID_mapping_version_20200130`), then a column named like a gene column. Cells
    holding several IDs separated by `|` contribute each of them.
    """
    import polars as pl

    path = Path(path)
    if not path.is_file():
        raise UserError(f"gene set file {path} does not exist")
    first = path.open("rt", errors="replace").readline()
    sep = "\t" if "\t" in first else ","
    if sep not in first and column is None:
        values = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
    else:
        try:
            df = pl.read_csv(path, separator=sep, infer_schema_length=0, truncate_ragged_lines=True)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"gene set file {path} is not a readable table ({err})") from None
        if column is not None:
            if column not in df.columns:
                raise UserError(
                    f"gene set file {path} has no column {column!r}; columns are "
                    f"{', '.join(df.columns[:12])}"
                )
            chosen = column
        else:
            chosen = _pick_gene_column(df, path)
        values = df.get_column(chosen).drop_nulls().to_list()
    out: list[str] = []
    for value in values:
        for part in str(value).split("|"):
            part = part.strip()
            if part and not part.startswith("#"):
                out.append(part)
    if not out:
        raise UserError(f"gene set file {path} lists no gene")
    return out


def _pick_gene_column(df, path: Path) -> str:
    best, best_n = None, 0
    for name in df.columns:
        vals = df.get_column(name).drop_nulls().head(200).to_list()
        n = sum(1 for v in vals if any(looks_like_ensembl(p) for p in str(v).split("|")))
        if n > best_n:
            best, best_n = name, n
    if best is not None and best_n >= 0.5 * min(200, df.height):
        return best
    for want in _SET_COLUMN_NAMES:
        for name in df.columns:
            if name.lower() == want:
                return name
    if df.width == 1:
        return df.columns[0]
    raise UserError(
        f"cannot tell which column of {path} holds the genes; name it with --genes-column "
        f"(columns: {', '.join(df.columns[:12])})"
    )


# ---------------------------------------------------------------------------------------------
# Column plan for the Rust core.


@dataclass
class ColumnPlan:
    """Per input column: token id (-1 = not used), median, resolved ID; and what was recognised."""

    col_token: np.ndarray  # int32 [n_cols]
    col_median: np.ndarray  # float64 [n_cols]
    gene_ids: list[str | None]  # resolved current Ensembl ID per column (None = unresolved)
    n_columns: int
    n_recognised: int  # columns with a token (before any gene-set restriction)
    n_used: int  # columns with a token after the gene-set restriction
    n_merged: int  # columns that share their ID with an earlier column (summed by the core)
    symbols: dict[str, str]  # resolved ID -> symbol seen in the input
    recognised: np.ndarray  # bool [n_cols]: in the vocabulary with a median (gene set ignored)

    @property
    def share_recognised(self) -> float:
        return self.n_recognised / self.n_columns if self.n_columns else 0.0

    def report(self) -> dict:
        return {
            "columns": self.n_columns,
            "recognised": self.n_recognised,
            "share_recognised": round(self.share_recognised, 6),
            "used": self.n_used,
            "merged_duplicates": self.n_merged,
        }


def resolve_label(label: str, mapping: GeneMapping | None, vocabulary: Mapping[str, int]) -> str | None:
    """Current Ensembl ID for one column label, or None."""
    nid = normalise_id(label)
    if nid is not None:
        if mapping is not None:
            mapped = mapping.to_id.get(nid)
            if mapped is not None and (mapped in vocabulary or nid not in vocabulary):
                return mapped
        return nid
    if mapping is not None:
        return mapping.lookup(label)
    return None


def build_plan(
    labels: Sequence[str],
    vocabulary: Mapping[str, int],
    medians: Mapping[str, float],
    mapping: GeneMapping | None = None,
    gene_set: set[str] | None = None,
    symbol_labels: Sequence[str] | None = None,
) -> ColumnPlan:
    """Token id and median per input column.

    A vocabulary gene without a median cannot be normalised and counts as unrecognised.
    `gene_set` (resolved IDs) keeps only those genes; token ids stay the full vocabulary's.
    `symbol_labels` (e.g. the input's symbol column) feeds the display symbols.
    """
    n = len(labels)
    col_token = np.full(n, -1, dtype=np.int32)
    col_median = np.ones(n, dtype=np.float64)
    gene_ids: list[str | None] = [None] * n
    seen: set[str] = set()
    is_recognised = np.zeros(n, dtype=bool)
    recognised = used = merged = 0
    symbols: dict[str, str] = {}
    for i, label in enumerate(labels):
        label = "" if label is None else str(label)
        gid = resolve_label(label, mapping, vocabulary) if label else None
        gene_ids[i] = gid
        if gid is None:
            continue
        if normalise_id(label) is None:
            symbols.setdefault(gid, label.strip())
        elif symbol_labels is not None:
            sym = str(symbol_labels[i]).strip()
            if sym and normalise_id(sym) is None:
                symbols.setdefault(gid, sym)
        token = vocabulary.get(gid)
        median = medians.get(gid)
        if token is None or median is None:
            continue
        recognised += 1
        is_recognised[i] = True
        if gid in seen:
            merged += 1
        seen.add(gid)
        if gene_set is not None and gid not in gene_set:
            continue
        used += 1
        col_token[i] = token
        col_median[i] = median
    return ColumnPlan(col_token, col_median, gene_ids, n, recognised, used, merged, symbols, is_recognised)


def resolve_gene_set(labels: Sequence[str], mapping: GeneMapping | None, vocabulary: Mapping[str, int]) -> tuple[set[str], int]:
    """Resolved IDs of a gene set and how many of its labels could not be resolved."""
    ids: set[str] = set()
    missing = 0
    for label in labels:
        gid = resolve_label(label, mapping, vocabulary)
        if gid is None:
            missing += 1
        else:
            ids.add(gid)
    return ids, missing


def symbols_for(vocabulary: Mapping[str, int], *sources: Mapping[str, str]) -> dict[str, str]:
    """ID -> display symbol for vocabulary genes, first source wins."""
    out: dict[str, str] = {}
    for source in sources:
        for gid, sym in source.items():
            if gid in vocabulary and gid not in out:
                out[gid] = sym
    return out


def counts_share(plan: ColumnPlan, indices: np.ndarray, data: np.ndarray) -> float | None:
    """Share of counts (in one CSR chunk) that fall on recognised columns (gene set ignored)."""
    total = float(np.sum(data, dtype=np.float64))
    if total <= 0:
        return None
    return float(np.sum(data[plan.recognised[indices]], dtype=np.float64)) / total
