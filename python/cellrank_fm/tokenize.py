"""Raw counts -> rank-value token shards: reader -> gene plan -> Rust core -> shard writer.

Inputs are read in chunks of `chunk_cells` rows; each part file holds a fixed range of
`part_cells` input rows, so `--resume` can skip parts that were completed before an
interruption (it refuses when any setting or input file changed). `manifest.json` is written
last, atomically: a directory without one is not a finished shard set.

Recognised share of counts: measured on the first 2,048 cells of each input (cheap and, for
the usual unsorted cells, representative); the share of genes is exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cellrank_fm.errors import UserError, warn, write_json
from cellrank_fm.genes import (
    GENE_MAP_FILE,
    ColumnPlan,
    GeneMapping,
    build_plan,
    counts_share,
    load_gene_set,
    load_mapping,
    looks_like_ensembl,
    resolve_gene_set,
    symbols_for,
)
from cellrank_fm.outputs import Claim, claim, read_json
from cellrank_fm.readers import Chunk, MatrixReader, expand_inputs, open_input
from cellrank_fm.shards import (
    FORMAT,
    FORMAT_VERSION,
    GENE_SET_FILE,
    MANIFEST,
    PART_GLOB,
    TEMP_PART_GLOB,
    part_file,
)
from cellrank_fm.vocab import (
    content_sha256,
    load_medians,
    load_vocabulary,
    preset,
    save_json_mapping,
    special_tokens,
    token_dtype,
)

RUN_FILE = ".cellrank-run.json"
PROGRESS_FILE = ".cellrank-progress.jsonl"
# Cells per call into the core. ~2,000 genes per cell keeps a chunk's arrays under glibc's 32 MB
# mmap threshold, so their memory is reused instead of being mapped and zeroed anew each chunk
# (measured: a third less CPU time than 8,192-cell chunks, and a quarter of the memory).
DEFAULT_CHUNK_CELLS = 2048
FULL_HASH_LIMIT = 1 << 30  # inputs above 1 GiB get a hash of their first 64 MiB (plus size)
_CORE_ROW_ERROR = re.compile(r"row (\d+) column (\d+)")


@dataclass
class TokenizeSettings:
    """Every option that changes the shards; recorded in the manifest and checked on resume."""

    model_version: str = "v1"
    model_input_size: int | None = None
    gene_id_column: str | None = None
    layer: str | None = None
    orientation: str = "auto"
    allow_float: bool = False
    keep_obs: list[str] = field(default_factory=list)
    cell_id_column: str | None = None  # obs column naming the cells (default: the obs index)
    part_cells: int = 65_536
    genes_file: str | None = None
    genes_column: str | None = None

    def resolved_input_size(self) -> int:
        if self.model_input_size is None:
            return int(preset(self.model_version).model_input_size)
        if self.model_input_size < 1:
            raise UserError(f"--model-input-size must be at least 1 (tokens per cell), not {self.model_input_size}")
        return int(self.model_input_size)


@dataclass
class Dictionaries:
    """Vocabulary, medians, mapping and gene set as loaded, with where they came from."""

    vocabulary: dict[str, int]
    medians: dict[str, float]
    vocabulary_source: str = "<memory>"
    medians_source: str = "<memory>"
    mapping: GeneMapping | None = None
    gene_set: set[str] | None = None
    gene_set_info: dict | None = None

    @classmethod
    def load(cls, vocab, medians, mapping_paths=(), genes=None, genes_column=None):
        """`vocab`, `medians`: files or dictionaries; `genes`: a gene-set file or a list of genes."""
        vocabulary = dict(vocab) if isinstance(vocab, Mapping) else load_vocabulary(vocab)
        median_values = dict(medians) if isinstance(medians, Mapping) else load_medians(medians)
        mapping = load_mapping(list(mapping_paths)) if mapping_paths else None
        d = cls(vocabulary, median_values, _source(vocab), _source(medians), mapping)
        if isinstance(genes, (str, os.PathLike)):
            if str(genes):
                d.set_gene_set(load_gene_set(genes, genes_column), str(genes))
        elif genes is not None:
            d.set_gene_set([str(g) for g in genes], "<list>")
        return d

    def set_gene_set(self, labels: Sequence[str], source: str) -> None:
        ids, missing = resolve_gene_set(labels, self.mapping, self.vocabulary)
        in_vocab = {g for g in ids if g in self.vocabulary}
        if not in_vocab:
            hint = "" if self.mapping else "; symbols need --gene-map"
            raise UserError(f"none of the {len(labels)} genes in {source} is in the vocabulary{hint}")
        self.gene_set = in_vocab
        self.gene_set_info = {"source": source, "size": len(in_vocab), "listed": len(labels), "unresolved": missing}


def _source(table) -> str:
    return "<memory>" if isinstance(table, Mapping) else str(table)


@dataclass
class InputPlan:
    """One input as validated up front; its reader is reopened only while it is tokenized, so a
    directory of many files never holds them all open (or, for tables, all in memory)."""

    path: Path
    n_rows: int
    plan: ColumnPlan
    has_n_counts: bool
    has_filter: bool
    reopen: Any  # () -> MatrixReader
    in_memory: bool = False  # an AnnData object that never was a file: no size, no hash


# ---------------------------------------------------------------------------------------------
# Shared building blocks (used by tokenize, medians and in-memory tokenization).


# var columns that conventionally hold display symbols (10x, scanpy, CELLxGENE, our simulator).
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "symbol", "gene_name", "feature_name")


def gene_labels(reader: MatrixReader, gene_id_column: str | None) -> tuple[list[str], list[str] | None]:
    """Labels to resolve, plus display symbols when IDs come from a column and var_names are symbols."""
    symbol_column = next((c for c in SYMBOL_COLUMNS if c in reader.var_columns() and c != gene_id_column), None)
    symbols = reader.var_column(symbol_column) if symbol_column else None
    labels = reader.var_column(gene_id_column) if gene_id_column else reader.var_names
    named = f"gene column {gene_id_column!r}" if gene_id_column else "var_names"
    for values, what in ((labels, named), (symbols, f"gene column {symbol_column!r}")):
        if values is not None and len(values) != reader.n_cols:  # each label indexes a matrix column
            raise UserError(f"{reader.path}: {what} holds {len(values)} names for {reader.n_cols} genes; "
                            "the file is damaged")
    if gene_id_column:
        names = reader.var_names
        if sum(map(looks_like_ensembl, names[:500])) < 0.5 * min(500, len(names)):
            symbols = names
    return labels, symbols


def plan_for(reader: MatrixReader, dicts: Dictionaries, gene_id_column: str | None) -> ColumnPlan:
    labels, symbols = gene_labels(reader, gene_id_column)
    plan = build_plan(labels, dicts.vocabulary, dicts.medians, dicts.mapping, dicts.gene_set, symbols)
    if plan.n_recognised == 0:
        examples = ", ".join(repr(x) for x in labels[:3])
        cols = [c for c in reader.var_columns() if c != gene_id_column]
        where = f"column {gene_id_column!r}" if gene_id_column else "var_names"
        hint = f"name a column of Ensembl IDs with --gene-id-column (gene columns: {', '.join(cols[:8])})" if cols else "use Ensembl IDs"
        if not dicts.mapping:
            hint += ", or pass --gene-map for symbols"
        raise UserError(f"{reader.path}: none of the {plan.n_columns} genes in {where} (e.g. {examples}) is in the vocabulary; {hint}")
    if plan.n_used == 0:
        raise UserError(f"{reader.path}: no gene of the gene set is among its recognised genes")
    return plan


def _first_cells_share(plan: ColumnPlan, chunk: Chunk, cells: int = 2048):
    """Recognised share of counts over the chunk's first `cells` cells (a cheap, fair sample)."""
    end = int(chunk.indptr[min(cells, chunk.n_rows)] - chunk.indptr[0])
    return counts_share(plan, chunk.indices[:end], chunk.data[:end])


def obs_flags(reader: MatrixReader) -> tuple[bool, bool]:
    cols = set(reader.obs_columns())
    return "n_counts" in cols, "filter_pass" in cols


def row_totals(chunk: Chunk, exclude: np.ndarray | None = None) -> np.ndarray:
    """Per-row sum over all (or all non-excluded) columns, in float64."""
    data = chunk.data.astype(np.float64)
    if exclude is not None:
        data = np.where(exclude[chunk.indices], 0.0, data)
    cs = np.concatenate([[0.0], np.cumsum(data)])
    base = chunk.indptr - chunk.indptr[0]
    with np.errstate(invalid="ignore"):  # inf counts give NaN totals here; the core names the cell
        return cs[base[1:]] - cs[base[:-1]]


def chunk_counts(chunk: Chunk, reader: MatrixReader, has_n_counts: bool, has_filter: bool):
    """n_counts for the core (None = let the core sum) and the filter_pass mask (None = all)."""
    keep = None
    if has_filter:
        fp = np.asarray(chunk.obs["filter_pass"], dtype=object)
        keep = np.array([v is not None and v == 1 for v in fp], dtype=bool)
    n_counts = None
    if has_n_counts:
        n_counts = np.asarray(chunk.obs["n_counts"], dtype=np.float64)
    exclude = getattr(reader, "non_gex", None)
    if n_counts is None and (exclude is not None or (keep is not None and not keep.all())):
        n_counts = row_totals(chunk, exclude)
    if keep is not None and not keep.all():
        n_counts = n_counts.copy()
        n_counts[~keep] = 0.0  # the core returns no tokens for such rows
    return n_counts, keep


def run_core(chunk: Chunk, plan: ColumnPlan, n_counts, max_genes: int, prefix: int, suffix: int, source: str):
    from cellrank_fm import _core

    if n_counts is not None and np.isnan(n_counts).any():
        r = int(np.flatnonzero(np.isnan(n_counts))[0])
        raise UserError(f"{source}: cell {chunk.start + r} ({chunk.cell_ids[r]}) has a missing n_counts value")
    try:
        return _core.tokenize_csr(
            chunk.indptr, chunk.indices, chunk.data, n_counts, plan.col_token, plan.col_median,
            max_genes, prefix, suffix,
        )
    except ValueError as err:
        raise bad_value_error(err, source, chunk) from None


def bad_value_error(err: ValueError, source: str, chunk: Chunk, rows: np.ndarray | None = None) -> Exception:
    """The core's "row R column C has a negative or NaN value" as a user error naming the cell.

    `rows` maps the rows the core saw to the chunk's rows when some were filtered out first.
    """
    m = _CORE_ROW_ERROR.search(str(err))
    if m is None:
        return err
    r = int(m.group(1)) if rows is None else int(rows[int(m.group(1))])
    what = "an infinite" if "infinite" in str(err) else "a negative or NaN"
    return UserError(
        f"{source}: cell {chunk.start + r} ({chunk.cell_ids[r]}) has {what} count in column "
        f"{int(m.group(2))}; cellrank expects raw, non-negative counts"
    )


def _model_tokens(settings_version: str, vocabulary: Mapping[str, int]) -> tuple[int, int, int, dict]:
    p = preset(settings_version)
    specials = special_tokens(vocabulary, settings_version)
    prefix = specials["cls"] if p.add_cls else -1
    suffix = specials["eos"] if p.add_eos else -1
    return (-1 if prefix is None else prefix), (-1 if suffix is None else suffix), (2 if p.add_cls else 0), specials


def _fingerprint(path: Path, full_hash: bool = True) -> dict:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]  # SOMA: nested
    size = sum(p.stat().st_size for p in files)
    out: dict[str, Any] = {"path": str(path), "bytes": size}
    if full_hash:
        h = hashlib.sha256()
        head_only = size > FULL_HASH_LIMIT
        for p in files:
            with open(p, "rb") as fh:
                remaining = 64 << 20 if head_only else None
                while remaining is None or remaining > 0:
                    block = fh.read(8 << 20 if remaining is None else min(8 << 20, remaining))
                    if not block:
                        break
                    h.update(block)
                    if remaining is not None:
                        remaining -= len(block)
        out["sha256" if not head_only else "sha256_first_64MiB"] = h.hexdigest()
    return out


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Shards on disk.



def keep_freed_memory() -> None:
    """Ask glibc to keep freed chunk buffers for reuse instead of returning them to the kernel.

    Every chunk allocates the same tens of MB again (input arrays, tokens, Parquet buffers);
    by default glibc unmaps or trims them on free, and the next chunk pays a page fault for
    every 4 KiB again (~10% of the run). The footprint stays bounded by the largest chunk.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 256 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)

def tokenize_files(
    inputs,
    out_dir: str | Path,
    dicts: Dictionaries,
    settings: TokenizeSettings | None = None,
    *,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Tokenize inputs (files, Matrix Market directories, directories of them, AnnData objects)
    into one shard set.

    Returns the manifest. The output is claimed for the run (`cellrank_fm.outputs.claim`): a
    second run on it is refused, and a fresh run that fails leaves nothing behind.
    """
    with claim(out_dir) as output:
        return _tokenize_files(inputs, Path(out_dir), dicts, settings, output, chunk_cells=chunk_cells,
                               resume=resume, overwrite=overwrite, quiet=quiet)


def _tokenize_files(inputs, out: Path, dicts: Dictionaries, settings: TokenizeSettings | None, output: Claim, *,
                    chunk_cells: int, resume: bool, overwrite: bool, quiet: bool) -> dict:
    keep_freed_memory()
    from cellrank_fm import __version__
    from cellrank_fm._core import ShardWriter

    settings = settings or TokenizeSettings()
    sources = input_sources(inputs, settings.layer, settings.orientation, _gene_predicate(dicts))
    max_genes_total = settings.resolved_input_size()
    prefix, suffix, n_special, specials = _model_tokens(settings.model_version, dicts.vocabulary)
    max_genes = max_genes_total - n_special
    if max_genes <= 0:
        raise UserError(f"model input size {max_genes_total} leaves no room for genes")
    if settings.part_cells < 1 or chunk_cells < 1:
        raise UserError("--part-cells and --chunk-cells must be positive")
    tdtype = token_dtype(dicts.vocabulary)
    warnings_list: list[str] = []

    # Open every input first so a bad file or option fails before anything is written.
    plans: list[InputPlan] = []
    meta_schema: list[tuple[str, str]] = []
    for path, reopen, in_memory in sources:
        with reopen() as reader:
            plans.append(InputPlan(path, reader.n_rows, plan_for(reader, dicts, settings.gene_id_column),
                                   *obs_flags(reader), reopen, in_memory))
            wanted = list(settings.keep_obs) + ([settings.cell_id_column] if settings.cell_id_column else [])
            missing = [c for c in wanted if c not in reader.obs_columns()]
            if missing:
                raise UserError(reader._missing_obs(missing[0]))
            if len(plans) == 1:
                meta_schema = _meta_schema(reader, settings.keep_obs)
    vocab_sha = content_sha256(dicts.vocabulary)
    medians_used = {g: dicts.medians[g] for g in dicts.vocabulary if g in dicts.medians}
    medians_sha = content_sha256(medians_used)
    run_record = {
        "settings": asdict(settings),
        "vocabulary_sha256": vocab_sha,
        "medians_sha256": medians_sha,
        "gene_set": dicts.gene_set_info,
        "gene_map": dicts.mapping.sources if dicts.mapping else [],
        "inputs": [
            {"path": str(p.path), "rows": p.n_rows} if p.in_memory else
            {"path": str(p.path), "bytes": _fingerprint(p.path, full_hash=False)["bytes"],
             "mtime_ns": p.path.stat().st_mtime_ns, "rows": p.n_rows} for p in plans
        ],
    }
    if resume and any(p.in_memory for p in plans):
        raise UserError("resume needs input files: an AnnData held in memory cannot be checked for changes; "
                        "write it to .h5ad first, or start again without resume")
    done = _prepare_out_dir(out, run_record, resume, overwrite, output)
    if done is not None:
        _say(f"{out} is already complete ({done['cells']['written']} cells)", quiet)
        return done
    run = _Run(out, plans, dicts, settings, run_record, chunk_cells, max_genes, prefix, suffix, specials,
               tdtype, medians_used, vocab_sha, medians_sha, meta_schema, warnings_list, quiet)
    return _tokenize_into(run, ShardWriter, __version__)


def input_sources(inputs, layer: str | None = None, orientation: str = "auto",
                  is_gene=None) -> list[tuple[Path, Any, bool]]:
    """(path or name, () -> reader, in memory?) for each input: files and directories in sorted
    order, then AnnData objects held in memory, in the order given. A backed AnnData is its file."""
    from cellrank_fm.readers import AnnDataReader

    if isinstance(inputs, (str, os.PathLike)) or is_anndata(inputs):
        inputs = [inputs]
    paths, in_memory = [], []
    for item in inputs:
        if is_anndata(item) and item.isbacked:
            paths.append(Path(item.filename))
        elif is_anndata(item):
            in_memory.append(item)
        else:
            paths.append(item)
    out = []
    for path in expand_inputs(paths) if paths else []:
        out.append((path, lambda path=path: open_input(path, layer, orientation, is_gene), False))
    for name, adata in zip(in_memory_names(len(in_memory)), in_memory):
        out.append((Path(name), lambda adata=adata: AnnDataReader(adata, layer), True))
    if not out:
        raise UserError("no input given; pass files, directories or AnnData objects")
    return out


def in_memory_names(n: int) -> list[str]:
    """The names shards record as the `source` of AnnData objects held in memory, in order."""
    return ["AnnData"] if n == 1 else [f"AnnData-{k + 1}" for k in range(n)]


def is_anndata(obj) -> bool:
    """An AnnData object (in memory or backed), told apart without importing anndata."""
    return type(obj).__name__ == "AnnData" and hasattr(obj, "obs_names")


def _gene_predicate(dicts: Dictionaries):
    vocab = dicts.vocabulary
    mapping = dicts.mapping

    def is_gene(label: str) -> bool:
        if looks_like_ensembl(label) or label in vocab:
            return True
        return mapping is not None and mapping.lookup(label) is not None

    return is_gene


def _prepare_out_dir(out: Path, run_record: dict, resume: bool, overwrite: bool, output: Claim) -> dict | None:
    """Create/validate the output directory; returns the manifest if a resumed run is complete."""
    manifest_path = out / MANIFEST
    run_path = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    ours = out.exists() and (manifest_path.exists() or run_path.exists())
    if out.exists() and any(out.iterdir()):
        if resume and ours:
            remedy = "start again with --overwrite"
            if manifest_path.exists():
                manifest = read_json(manifest_path, remedy)
                _check_same(manifest.get("run", {}), run_record, out)
                return manifest
            _check_same(read_json(run_path, remedy), run_record, out)
            return None
        if overwrite and ours:
            shutil.rmtree(out)
            output.replaced()
        elif overwrite:
            raise UserError(f"{out} holds files that are not a cellrank shard set; refusing to overwrite it")
        elif resume:
            raise UserError(f"{out} holds files but no cellrank run to resume; choose another --out")
        else:
            raise UserError(f"{out} already exists and is not empty; pass --resume to continue it or --overwrite to replace it")
    elif resume:
        print(f"note: {out} holds no run to resume; starting from scratch", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    write_json(run_record, run_path)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return None


def _check_same(old: dict, new: dict, out: Path) -> None:
    for key in new:
        if json.dumps(old.get(key), sort_keys=True) != json.dumps(new[key], sort_keys=True):
            raise UserError(
                f"cannot resume {out}: its {key.replace('_', ' ')} differ from this run's; rerun with "
                "the same inputs and options, or pass --overwrite to start again"
            )


def _completed_parts(out: Path) -> dict[int, dict]:
    """Parts finished by an earlier run: a progress record AND (unless empty) the part file."""
    done: dict[int, dict] = {}
    progress = out / PROGRESS_FILE
    if not progress.exists():
        return done
    for line in progress.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption
        if rec["written"] == 0 or (out / rec["file"]).exists():
            done[rec["index"]] = rec
    return done


@dataclass
class _Run:
    """Everything one tokenize run has settled before it writes anything."""

    out: Path
    plans: list[InputPlan]
    dicts: Dictionaries
    settings: TokenizeSettings
    run_record: dict
    chunk_cells: int
    max_genes: int
    prefix: int
    suffix: int
    specials: dict
    tdtype: str
    medians_used: dict[str, float]
    vocab_sha: str
    medians_sha: str
    meta_schema: list[tuple[str, str]]
    warnings_list: list[str]
    quiet: bool


def _tokenize_into(run: _Run, ShardWriter, version: str) -> dict:
    from cellrank_fm.progress import progress_bar

    started = time.perf_counter()
    out, plans, dicts, settings, quiet = run.out, run.plans, run.dicts, run.settings, run.quiet
    chunk_cells, max_genes, prefix, suffix = run.chunk_cells, run.max_genes, run.prefix, run.suffix
    meta_schema, warnings_list = run.meta_schema, run.warnings_list

    done = _completed_parts(out)
    for stale in out.glob(PART_GLOB):
        idx = int(stale.stem.split("-")[1])
        if idx not in done:
            stale.unlink()  # written but never recorded: redo it
    for stale in out.glob(TEMP_PART_GLOB):
        stale.unlink()
    writer = ShardWriter(str(out), run.tdtype, meta_schema)
    part_records: dict[int, dict] = dict(done)
    input_stats = []
    part_index = 0
    total_rows = sum(p.n_rows for p in plans)
    nonint = nnz = 0
    gene_reports = []
    symbols: dict[str, str] = {}
    try:
        with progress_bar("cells", quiet=quiet) as bar, open(out / PROGRESS_FILE, "a") as progress, \
                contextlib.ExitStack() as readers_open:
            task = bar.add_task("tokenizing", total=total_rows)
            for ip in plans:
                reader = readers_open.enter_context(ip.reopen())
                plan = ip.plan
                source = ip.path.name
                obs_cols = list(dict.fromkeys(
                    list(settings.keep_obs) + ["n_counts"] * ip.has_n_counts + ["filter_pass"] * ip.has_filter
                    + ([settings.cell_id_column] if settings.cell_id_column else [])))
                stats = {"path": str(ip.path), "rows": reader.n_rows, "kept": 0, "filtered_out": 0, "empty": 0}
                share_counts = None
                symbols.update({k: v for k, v in plan.symbols.items() if k not in symbols})
                for part_start in range(0, reader.n_rows, settings.part_cells):
                    part_stop = min(reader.n_rows, part_start + settings.part_cells)
                    if part_index in done:
                        rec = done[part_index]
                        for k in ("kept", "filtered_out", "empty"):
                            stats[k] += rec[k]
                        part_index += 1
                        bar.advance(task, part_stop - part_start)
                        continue
                    rec = {"index": part_index, "file": part_file(part_index), "kept": 0,
                           "filtered_out": 0, "empty": 0, "written": 0}
                    opened = False
                    step = min(chunk_cells, reader.max_rows_per_read or chunk_cells)
                    ranges = [(a, min(part_stop, a + step)) for a in range(part_start, part_stop, step)]
                    for (start, stop), chunk in zip(ranges, _prefetched(reader, ranges, obs_cols)):
                        if settings.cell_id_column:
                            chunk.cell_ids = [str(v) for v in chunk.obs[settings.cell_id_column]]
                        if share_counts is None:
                            share_counts = _first_cells_share(plan, chunk)
                        n_counts, keep = chunk_counts(chunk, reader, ip.has_n_counts, ip.has_filter)
                        tokens, offsets, n_nonint = run_core(chunk, plan, n_counts, max_genes, prefix, suffix, str(ip.path))
                        nonint += int(n_nonint)
                        nnz += len(chunk.data)
                        lengths = np.diff(offsets)
                        nonempty = lengths > 0
                        filtered = int((~keep).sum()) if keep is not None else 0
                        rec["filtered_out"] += filtered
                        rec["empty"] += int((~nonempty).sum()) - filtered
                        n_kept = int(nonempty.sum())
                        if n_kept:
                            if not nonempty.all():
                                offsets = np.concatenate([offsets[:1], offsets[1:][nonempty]])
                            rows = np.flatnonzero(nonempty)
                            cell_ids = chunk.cell_ids if n_kept == chunk.n_rows else [chunk.cell_ids[i] for i in rows]
                            meta = _meta_values(chunk, settings.keep_obs, meta_schema, rows)
                            if not opened:
                                writer.begin_part(part_index)
                                opened = True
                            writer.write(tokens, offsets, cell_ids, source, meta)
                            rec["written"] += n_kept
                        bar.advance(task, stop - start)
                    if opened:
                        writer.end_part()
                    rec["kept"] = rec["written"]
                    progress.write(json.dumps(rec) + "\n")
                    progress.flush()
                    part_records[part_index] = rec
                    for k in ("kept", "filtered_out", "empty"):
                        stats[k] += rec[k]
                    part_index += 1
                reader.close()  # one input open at a time
                input_stats.append(stats)
                gene_reports.append({"path": str(ip.path), **plan.report(),
                                     "share_counts_first_cells": None if share_counts is None else round(share_counts, 6)})
                _report_genes(ip, plan, share_counts, warnings_list, quiet)
        rows_by_part = writer.finish()
    except BaseException:
        writer.abort()
        raise
    for idx, rows in rows_by_part.items():
        if part_records[idx]["written"] != rows:
            raise RuntimeError(f"part {idx}: writer reports {rows} rows, expected {part_records[idx]['written']}")
    if nnz and nonint and not settings.allow_float:
        warn(f"{nonint / nnz:.2%} of the stored values are not integers; cellrank expects raw counts "
             "(pass --allow-float for TPM/FPKM input)", warnings_list)
    totals = {k: sum(s[k] for s in input_stats) for k in ("rows", "kept", "filtered_out", "empty")}
    if totals["kept"] == 0:
        raise UserError("no cell was left to tokenize (all were filtered out or had no vocabulary gene)")
    fingerprints = [{"path": str(ip.path), "in_memory": True} if ip.in_memory else _fingerprint(ip.path)
                    for ip in plans]
    for fp, st in zip(fingerprints, input_stats):
        fp.update({k: st[k] for k in ("rows", "kept", "filtered_out", "empty")})
    if dicts.mapping:
        symbols.update({k: v for k, v in dicts.mapping.symbols.items() if k not in symbols})
    symbols = symbols_for(dicts.vocabulary, symbols)
    save_json_mapping(dicts.vocabulary, out / "vocabulary.json")
    save_json_mapping(run.medians_used, out / "medians.json")
    save_json_mapping(symbols, out / "symbols.json")
    if dicts.mapping:
        # The mapping itself, not a path to it: models trained on these shards carry it along.
        save_json_mapping(dicts.mapping.restricted_to(dicts.vocabulary), out / GENE_MAP_FILE)
    if dicts.gene_set is not None:
        # The genes themselves, not the file they were listed in, which may move.
        write_json(sorted(dicts.gene_set), out / GENE_SET_FILE)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": version,
        "model_version": settings.model_version,
        "model_input_size": settings.resolved_input_size(),
        "special_tokens": run.specials,
        "vocabulary": {"sha256": run.vocab_sha, "size": len(dicts.vocabulary), "source": dicts.vocabulary_source},
        "medians": {"sha256": run.medians_sha, "source": dicts.medians_source, "size": len(run.medians_used)},
        "token_dtype": run.tdtype,
        "parts": [{"file": part_records[i]["file"], "rows": part_records[i]["written"]}
                  for i in sorted(part_records) if part_records[i]["written"] > 0],
        "inputs": fingerprints,
        "cells": {"input": totals["rows"], "filtered_out": totals["filtered_out"], "empty": totals["empty"],
                  "written": totals["kept"]},
        "genes": {"inputs": gene_reports, "gene_map": dicts.mapping.sources if dicts.mapping else []},
        "metadata_columns": list(settings.keep_obs),
        "gene_set": dicts.gene_set_info,
        "settings": {**asdict(settings), "model_input_size": settings.resolved_input_size()},
        "warnings": warnings_list,
        "run": run.run_record,
    }
    write_json(manifest, out / MANIFEST)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    (out / RUN_FILE).unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    _say(f"wrote {totals['kept']:,} cells to {out} in {seconds:.1f} s ({totals['rows'] / seconds:,.0f} cells/s; "
         f"{len(manifest['parts'])} parts; {totals['filtered_out']:,} filtered out, "
         f"{totals['empty']:,} without a vocabulary gene)", quiet)
    return manifest


def _prefetched(reader: MatrixReader, ranges: list[tuple[int, int]], obs: list[str]):
    """Chunks of `ranges`, each read on a worker thread while the previous one is processed."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(reader.read, *ranges[0], obs) if ranges else None
        for i in range(len(ranges)):
            chunk = pending.result()
            pending = pool.submit(reader.read, *ranges[i + 1], obs) if i + 1 < len(ranges) else None
            yield chunk


def _report_genes(ip: InputPlan, plan: ColumnPlan, share_counts, warnings_list, quiet) -> None:
    counts_txt = "" if share_counts is None else f", {share_counts:.1%} of counts"
    _say(f"{ip.path.name}: {plan.n_recognised:,} of {plan.n_columns:,} genes recognised "
         f"({plan.share_recognised:.1%}{counts_txt}); {plan.n_merged:,} duplicate columns summed", quiet)
    # Whole-genome annotations hold many genes no vocabulary has (lncRNAs, pseudogenes), so the
    # share of counts decides when it is known; the share of genes otherwise.
    if (share_counts if share_counts is not None else plan.share_recognised) < 0.5:
        warn(f"{ip.path.name}: under half of the genes or counts are in the vocabulary "
             f"({plan.share_recognised:.1%} of genes{counts_txt}); check --gene-id-column and --gene-map",
             warnings_list)


def _meta_schema(reader: MatrixReader, keep_obs: Sequence[str]) -> list[tuple[str, str]]:
    schema = []
    for name in keep_obs:
        reserved = {"input_ids", "length", "cell_id", "source"}
        if name in reserved:
            raise UserError(f"--keep-obs column {name!r} clashes with a shard column; use --cell-id-column for cell names, or rename it")
        sample = reader.read(0, min(1, reader.n_rows), [name]).obs[name]
        arr = np.asarray(sample)
        if arr.dtype.kind == "b":
            kind = "bool"
        elif arr.dtype.kind in "iu":
            kind = "i64"
        elif arr.dtype.kind == "f":
            kind = "f64"
        else:
            kind = "str"
        schema.append((name, kind))
    return schema


def _meta_values(chunk: Chunk, keep_obs, schema, rows: np.ndarray) -> dict:
    meta = {}
    for name, kind in schema:
        values = chunk.obs[name]
        if kind == "str":
            meta[name] = [None if values[i] is None else str(values[i]) for i in rows]
        else:
            dtype = {"bool": np.bool_, "i64": np.int64, "f64": np.float64}[kind]
            meta[name] = np.asarray(values)[rows].astype(dtype)
    return meta


# ---------------------------------------------------------------------------------------------
# In memory (predict, embed, explain, perturb, demo).


@dataclass
class InMemoryTokens:
    tokens: list[np.ndarray]
    ok: np.ndarray
    cell_ids: list[str]
    obs: Any
    report: dict


def tokenize_in_memory(
    path_or_anndata,
    vocabulary: Mapping[str, int],
    medians: Mapping[str, float],
    model_version: str = "v1",
    model_input_size: int | None = None,
    gene_id_column: str | None = None,
    mapping: GeneMapping | Sequence[str | Path] | None = None,
    gene_set: Sequence[str] | None = None,
    layer: str | None = None,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
) -> InMemoryTokens:
    """Tokens for every cell of one input, in input order (filter_pass is not applied here).

    A cell without any vocabulary gene gets an empty array and `ok[i] = False`.
    """
    import pandas as pd

    if mapping is not None and not isinstance(mapping, GeneMapping):
        mapping = load_mapping(list(mapping))
    dicts = Dictionaries(dict(vocabulary), dict(medians), mapping=mapping)
    if gene_set is not None:
        dicts.set_gene_set(list(gene_set), "<gene set>")
    if isinstance(path_or_anndata, (str, os.PathLike)):
        reader = open_input(path_or_anndata, layer, "auto", _gene_predicate(dicts))
        obs = _read_obs_frame(reader)
    else:
        from cellrank_fm.readers import AnnDataReader

        reader = AnnDataReader(path_or_anndata, layer)
        obs = path_or_anndata.obs.copy()
    size = int(model_input_size or preset(model_version).model_input_size)
    prefix, suffix, n_special, _ = _model_tokens(model_version, vocabulary)
    try:
        plan = plan_for(reader, dicts, gene_id_column)
        has_n_counts = "n_counts" in reader.obs_columns()
        tokens: list[np.ndarray] = []
        cell_ids: list[str] = []
        nonint = nnz = 0
        step = min(chunk_cells, reader.max_rows_per_read or chunk_cells)
        share = None
        for start in range(0, reader.n_rows, step):
            chunk = reader.read(start, min(reader.n_rows, start + step), ["n_counts"] if has_n_counts else [])
            if share is None:
                share = _first_cells_share(plan, chunk)
            n_counts, _ = chunk_counts(chunk, reader, has_n_counts, False)
            toks, offsets, n_nonint = run_core(chunk, plan, n_counts, size - n_special, prefix, suffix, str(reader.path))
            nonint += int(n_nonint)
            nnz += len(chunk.data)
            tokens.extend(np.split(toks, offsets[1:-1]) if len(offsets) > 2 else [toks[offsets[0]:offsets[-1]]])
            cell_ids.extend(chunk.cell_ids)
    finally:
        reader.close()
    ok = np.array([len(t) > 0 for t in tokens], dtype=bool)
    report = {**plan.report(), "share_counts_first_cells": share, "cells": len(tokens),
              "empty": int((~ok).sum()), "non_integer_share": (nonint / nnz) if nnz else 0.0}
    if obs is None:
        obs = pd.DataFrame(index=pd.Index(cell_ids))
    elif not isinstance(path_or_anndata, (str, os.PathLike)):
        pass  # an AnnData's own obs, index included
    else:
        obs.index = pd.Index(cell_ids)
    return InMemoryTokens(tokens, ok, cell_ids, obs, report)


def _read_obs_frame(reader: MatrixReader):
    """The input's obs as a DataFrame (h5ad/loom), or None for formats without cell metadata."""
    import pandas as pd

    if not hasattr(reader, "obs_column"):
        return None
    return pd.DataFrame({c: reader.obs_column(c, 0, reader.n_rows) for c in reader.obs_columns()})
