"""Gene sets (pathways): one reader for GMT, two-column tables and the MitoCarta3.0 table.

Formats
-------
- GMT (MSigDB, Enrichr): one set per line, tab-separated: name, description, genes...
  (`.gmt`, or any tab-separated file whose lines have three or more fields).
- Two-column CSV/TSV: one (set, gene) pair per line; a header line is recognised by its names.
- The MitoCarta3.0 table (`Human.MitoCarta3.0.csv`): the `MitoCarta3.0_MitoPathways` column holds
  paths such as ``OXPHOS > Complex III > CIII subunits | Metabolism > ...``; `level` (1, 2, 3)
  cuts every path to that depth (a shorter path keeps its own end), so level 1 gives the 7
  top-level programmes and level 3 the leaf pathways. Each gene is looked up by its Ensembl
  IDs first, then its symbol. Rows without a pathway (``0``) are left out.

Genes are resolved exactly as cell genes are (`genes.resolve_label`: version-stripped Ensembl
IDs, then the model's symbol/alias map), with the model's display symbols as a last resort, and
only genes the model can read count — the vocabulary, narrowed to the model's gene set when it
was trained on one (a MitoCarta-only model reads mitochondrial genes only). Sets with fewer
than `min_size` such genes are dropped with a note.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from cellrank_fm.errors import UserError

MITOCARTA_COLUMN = "MitoCarta3.0_MitoPathways"
MITOCARTA_ID_COLUMN = "EnsemblGeneID_mapping_version_20200130"
DEFAULT_MIN_SIZE = 5
LEVELS = (1, 2, 3)
_SET_HEADERS = {"set", "gene_set", "geneset", "pathway", "term", "name", "set_name", "gs_name"}
_GENE_HEADERS = {"gene", "genes", "gene_id", "gene_symbol", "symbol", "ensembl_id", "gene_name", "member"}


@dataclass
class RawSet:
    """A set as listed in its file: each gene is a tuple of labels tried in order (ID, symbol)."""

    name: str
    description: str
    source: str
    genes: list[tuple[str, ...]]


@dataclass
class GeneSet:
    name: str
    description: str
    source: str
    n_genes: int  # genes listed in the file
    genes: list[str]  # resolved gene IDs the model reads, sorted

    @property
    def n_in_vocab(self) -> int:
        return len(self.genes)


@dataclass
class GeneSets:
    """Resolved gene sets in file order, the sets dropped as too small, and where they came from."""

    sets: list[GeneSet]
    dropped: list[GeneSet] = field(default_factory=list)
    min_size: int = DEFAULT_MIN_SIZE
    level: int | None = None
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sets)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sets]

    def __getitem__(self, name: str) -> GeneSet:
        for s in self.sets:
            if s.name == name:
                return s
        raise KeyError(name)

    def token_sets(self, vocabulary: Mapping[str, int]) -> list[np.ndarray]:
        """Each set's token ids (sorted), in set order."""
        return [np.sort(np.array([vocabulary[g] for g in s.genes], dtype=np.int64)) for s in self.sets]

    def membership(self, vocabulary: Mapping[str, int]):
        """Sparse vocabulary × sets 0/1 matrix (CSR, float32): which sets hold each token."""
        import scipy.sparse as sp

        toks = self.token_sets(vocabulary)
        rows = np.concatenate(toks) if toks else np.zeros(0, dtype=np.int64)
        cols = np.repeat(np.arange(len(toks)), [len(t) for t in toks])
        size = max(vocabulary.values()) + 1 if vocabulary else 0
        return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(size, len(toks)))

    def coverage(self):
        """Per set, kept or dropped: pathway, source, n_genes (listed), n_in_vocab, kept."""
        import pandas as pd

        rows = [dict(pathway=s.name, source=s.source, n_genes=s.n_genes, n_in_vocab=s.n_in_vocab, kept=kept)
                for kept, group in ((True, self.sets), (False, self.dropped)) for s in group]
        return pd.DataFrame(rows, columns=["pathway", "source", "n_genes", "n_in_vocab", "kept"])

    def settings(self) -> dict:
        return dict(gene_sets=self.sources, gene_set_level=self.level, min_set_size=self.min_size,
                    sets_kept=len(self.sets), sets_dropped=len(self.dropped))


# ----------------------------------------------------------------------------- reading


def _open_text(path: Path):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="replace")


def _lines(path: Path) -> list[str]:
    try:
        with _open_text(path) as fh:
            return [ln.rstrip("\r\n") for ln in fh]
    except (OSError, EOFError) as err:
        raise UserError(f"gene set file {path} could not be read ({err}).") from None


def read_gene_sets(path: str | Path, level: int | None = None) -> list[RawSet]:
    """The sets of one file as listed (unresolved); UserError for a file that is none of the formats."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"gene set file {path} does not exist.")
    if level is not None and level not in LEVELS:
        raise UserError(f"--gene-set-level must be 1, 2 or 3, not {level}.")
    lines = [ln for ln in _lines(path) if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise UserError(f"gene set file {path} is empty.")
    name = path.name.lower().removesuffix(".gz")
    if MITOCARTA_COLUMN in lines[0]:
        return _mitocarta(path, level or 1)
    if name.endswith(".gmt"):
        return _gmt(path, lines)
    tabbed = ["\t" in ln for ln in lines]
    if all(tabbed) and any(len(ln.split("\t")) >= 3 for ln in lines):
        return _gmt(path, lines)
    sep = "\t" if all(tabbed) else ","
    fields = [[f.strip().strip('"') for f in ln.split(sep)] for ln in lines]
    if all(len(f) == 2 for f in fields):
        return _two_columns(path, fields)
    raise UserError(
        f"{path} is not a gene set file cellrank reads: give a GMT file (name, description, genes, "
        "tab-separated), a two-column CSV/TSV of (set, gene), or the MitoCarta3.0 table."
    )


def _gmt(path: Path, lines: list[str]) -> list[RawSet]:
    out = []
    for i, ln in enumerate(lines, 1):
        parts = [p.strip() for p in ln.split("\t")]
        if len(parts) < 2 or not parts[0]:
            raise UserError(f"{path} line {i} is not a GMT line (name, description, genes, tab-separated).")
        genes = [(g,) for g in parts[2:] if g]
        out.append(RawSet(parts[0], parts[1], str(path), genes))
    return out


def _two_columns(path: Path, fields: list[list[str]]) -> list[RawSet]:
    first = [f.lower() for f in fields[0]]
    if first[0] in _SET_HEADERS or first[1] in _GENE_HEADERS:
        fields = fields[1:]
    sets: dict[str, list[tuple[str, ...]]] = {}
    for set_name, gene in fields:
        if set_name:
            sets.setdefault(set_name, [])
            if gene:
                sets[set_name].append((gene,))
    return [RawSet(n, "", str(path), g) for n, g in sets.items()]


def _mitocarta(path: Path, level: int) -> list[RawSet]:
    import polars as pl

    try:
        df = pl.read_csv(path, infer_schema_length=0, truncate_ragged_lines=True)
    except Exception as err:  # noqa: BLE001 - any parse failure is the file's fault
        raise UserError(f"{path} could not be read as the MitoCarta3.0 table ({err}).") from None
    ids = df.get_column(MITOCARTA_ID_COLUMN).to_list() if MITOCARTA_ID_COLUMN in df.columns else [None] * df.height
    symbols = df.get_column("Symbol").to_list() if "Symbol" in df.columns else [None] * df.height
    members: dict[str, dict[tuple[str, ...], None]] = {}
    full_path: dict[str, str] = {}
    for paths, gid, sym in zip(df.get_column(MITOCARTA_COLUMN).to_list(), ids, symbols):
        if not paths or paths.strip() == "0":
            continue
        labels = tuple(x.strip() for x in (gid or "").split("|") if x.strip()) + ((sym.strip(),) if sym else ())
        if not labels:
            continue
        for p in paths.split("|"):
            parts = [x.strip() for x in p.split(">") if x.strip()]
            if parts:
                key = " > ".join(parts[:level])
                members.setdefault(key, {})[labels] = None
                full_path[key] = key
    # Name a set by its last component (readable in plots) unless two sets would share it.
    last = [k.split(" > ")[-1] for k in members]
    return [RawSet(short if last.count(short) == 1 else key, full_path[key], str(path), list(genes))
            for (key, genes), short in zip(members.items(), last)]


# ----------------------------------------------------------------------------- resolving


def _symbol_index(vocabulary: Mapping[str, int], symbols: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """Upper-cased display symbol -> vocabulary gene ID (first source wins)."""
    out: dict[str, str] = {}
    for source in symbols:
        for gid, sym in source.items():
            if gid in vocabulary and sym:
                out.setdefault(str(sym).strip().upper(), gid)
    return out


def load_gene_sets(
    sources,
    vocabulary: Mapping[str, int],
    *,
    mapping=None,
    symbols: Sequence[Mapping[str, str]] = (),
    gene_set: Iterable[str] | None = None,
    level: int | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    names: Sequence[str] | None = None,
) -> GeneSets:
    """Read and resolve gene sets against what a model reads.

    `sources` is a file, a list of files, or a dict {set name: genes} (the API's in-memory sets).
    `mapping` is the model's `genes.GeneMapping` (symbols, aliases, retired IDs), `symbols` the
    ID -> symbol tables (the model's, the input's) used when the mapping does not know a label,
    `gene_set` the genes a gene-set model was trained on. `names` keeps only these sets (a name
    that is not in the files, or whose set is too small, is an error).
    """
    from cellrank_fm.genes import resolve_label

    if isinstance(sources, Mapping):
        paths = ["the given sets"]
        raw = [RawSet(str(k), "", paths[0], [(str(g),) for g in v]) for k, v in sources.items()]
    else:
        paths = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
        raw = [s for path in paths for s in read_gene_sets(path, level)]
    if not paths or not raw:
        raise UserError("no gene set given; pass --gene-sets FILE.")
    if min_size < 1:
        raise UserError("--min-set-size must be at least 1.")
    readable = set(vocabulary) if gene_set is None else set(vocabulary).intersection(gene_set)
    by_symbol = _symbol_index(vocabulary, symbols)
    seen: dict[str, str] = {}
    for s in raw:
        if s.name in seen:
            where = "twice in " + s.source if seen[s.name] == s.source else f"in both {seen[s.name]} and {s.source}"
            raise UserError(f"gene set {s.name!r} is listed {where}; give each set one name.")
        seen[s.name] = s.source
    if names is not None:
        missing = [n for n in names if n not in seen]
        if missing:
            shown = ", ".join(list(seen)[:8]) + (", ..." if len(seen) > 8 else "")
            raise UserError(f"gene set {missing[0]!r} is not in {', '.join(map(str, paths))}; its sets are {shown}.")
        raw = [s for s in raw if s.name in set(names)]

    def resolve(labels: tuple[str, ...]) -> str | None:
        for label in labels:
            gid = resolve_label(label, mapping, vocabulary)
            if gid is None or gid not in vocabulary:
                gid = by_symbol.get(label.strip().upper())
            if gid is not None and gid in vocabulary:
                return gid if gid in readable else None
        return None

    kept, dropped = [], []
    for s in raw:
        genes = sorted({g for g in map(resolve, s.genes) if g is not None})
        gs = GeneSet(s.name, s.description, s.source, len(set(s.genes)), genes)
        (kept if len(genes) >= min_size else dropped).append(gs)
    if names is not None and dropped:
        d = dropped[0]
        raise UserError(f"gene set {d.name!r} has {d.n_in_vocab} gene(s) the model reads, fewer than "
                        f"--min-set-size {min_size}; lower it or leave the set out.")
    if not kept:
        raise UserError(
            f"no gene set in {', '.join(map(str, paths))} has {min_size} or more genes the model reads "
            f"({len(raw)} sets, largest {max((d.n_in_vocab for d in dropped), default=0)}); check that the "
            "genes are symbols or Ensembl IDs of the model's species, or lower --min-set-size."
        )
    return GeneSets(kept, dropped, min_size, level, [str(p) for p in paths])


def report(gene_sets: GeneSets, console=None, max_rows: int | None = None) -> None:
    """Print each set's coverage (listed genes, genes the model reads) and a note on dropped sets."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    t = Table(title=f"gene sets ({len(gene_sets)} kept)", title_justify="left")
    for col in ("set", "genes listed", "in vocabulary"):
        t.add_column(col, justify="left" if col == "set" else "right")
    rows = gene_sets.sets if max_rows is None else gene_sets.sets[:max_rows]
    for s in rows:
        t.add_row(s.name, f"{s.n_genes:,}", f"{s.n_in_vocab:,}")
    console.print(t)
    if max_rows is not None and len(gene_sets.sets) > max_rows:
        console.print(f"... and {len(gene_sets.sets) - max_rows} more sets")
    if gene_sets.dropped:
        names = ", ".join(f"{d.name} ({d.n_in_vocab})" for d in gene_sets.dropped[:6])
        more = f" and {len(gene_sets.dropped) - 6} more" if len(gene_sets.dropped) > 6 else ""
        console.print(f"note: {len(gene_sets.dropped)} set(s) with fewer than {gene_sets.min_size} genes in the "
                      f"vocabulary left out (--min-set-size): {names}{more}")


def gene_sets_for_model(lm, sources, *, level: int | None = None, min_size: int = DEFAULT_MIN_SIZE,
                        names: Sequence[str] | None = None, extra_symbols: Mapping[str, str] | None = None,
                        progress: bool = False) -> GeneSets:
    """`load_gene_sets` against a loaded model (`inference.LoadedModel`, or anything with its
    tokenization fields): its vocabulary, gene map, symbols and gene set; a `GeneSets` passes
    through. With `progress`, each set's coverage is printed."""
    if isinstance(sources, GeneSets):
        return sources
    sets = load_gene_sets(sources, lm.vocabulary, mapping=lm.mapping,
                          symbols=[lm.symbols if hasattr(lm, "symbols") else (lm.info.symbols or {}), extra_symbols or {}],
                          gene_set=lm.gene_set, level=level, min_size=min_size, names=names)
    if progress:
        report(sets)
    return sets
