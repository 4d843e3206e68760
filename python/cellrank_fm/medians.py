"""Per-gene nonzero medians of count / n_counts x 10,000 over a corpus, in one streaming pass.

The Rust `MedianSketch` keeps a mergeable quantile sketch per gene, so a corpus split across
machines can be sketched piece by piece (`--sketch-out`) and merged (`--merge`) into the same
medians a single pass would give. Genes are resolved exactly as `cellrank tokenize` does.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from cellrank_fm.errors import UserError, atomic_path
from cellrank_fm.genes import build_plan, load_mapping, resolve_label
from cellrank_fm.outputs import claiming
from cellrank_fm.tokenize import (
    DEFAULT_CHUNK_CELLS,
    bad_value_error,
    chunk_counts,
    gene_labels,
    input_sources,
    keep_freed_memory,
    obs_flags,
)
from cellrank_fm.vocab import load_vocabulary, save_json_mapping

SKETCH_MAGIC = b"CELLRANK-MEDIAN-SKETCH-1\n"


def _universe(sources, vocab, mapping, gene_id_column) -> list[str]:
    """Genes to sketch: the vocabulary's genes, or every gene ID resolved in the inputs."""
    if vocab is not None:
        return [g for g in vocab if not g.startswith("<")]
    genes: set[str] = set()
    for _, reopen, _ in sources:
        with reopen() as reader:
            labels, _ = gene_labels(reader, gene_id_column)
            genes.update(g for g in (resolve_label(str(x), mapping, {}) for x in labels) if g)
    if not genes:
        raise UserError("no input gene could be resolved to an Ensembl ID; use --gene-id-column or --gene-map")
    return sorted(genes)


@claiming("out", "sketch_out")
def compute_medians(
    inputs,
    out: str | Path | None,
    *,
    vocab_path: str | Path | None = None,
    mapping_paths: Sequence[str | Path] = (),
    gene_id_column: str | None = None,
    layer: str | None = None,
    orientation: str = "auto",
    sketch_out: str | Path | None = None,
    relative_accuracy: float = 0.001,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
    quiet: bool = False,
) -> dict[str, float]:
    """Stream the inputs (files, directories, AnnData objects) once and return (and write, when
    `out` is given) gene -> median."""
    from cellrank_fm._core import MedianSketch
    from cellrank_fm.progress import progress_bar

    keep_freed_memory()
    sources = input_sources(inputs, layer, orientation)
    paths = [p for p, _, _ in sources]
    vocab = dict(vocab_path) if isinstance(vocab_path, dict) else load_vocabulary(vocab_path) if vocab_path else None
    mapping = load_mapping(list(mapping_paths)) if mapping_paths else None
    genes = _universe(sources, vocab, mapping, gene_id_column)
    index = {g: i for i, g in enumerate(genes)}
    ones = {g: 1.0 for g in genes}
    sketch = MedianSketch(len(genes), relative_accuracy)
    cells = 0
    readers = [reopen() for _, reopen, _ in sources]
    try:
        with progress_bar("cells", quiet=quiet) as bar:
            task = bar.add_task("sketching medians", total=sum(r.n_rows for r in readers))
            for reader in readers:
                labels, _ = gene_labels(reader, gene_id_column)
                plan = build_plan(labels, index, ones, mapping)  # token = gene index
                if plan.n_recognised == 0:
                    raise UserError(f"{reader.path}: none of its genes could be resolved; use --gene-id-column or --gene-map")
                has_n, has_f = obs_flags(reader)
                obs = ["n_counts"] * has_n + ["filter_pass"] * has_f
                step = min(chunk_cells, reader.max_rows_per_read or chunk_cells)
                for start in range(0, reader.n_rows, step):
                    chunk = reader.read(start, min(reader.n_rows, start + step), obs)
                    n_counts, keep = chunk_counts(chunk, reader, has_n, has_f)
                    indptr, indices, data = chunk.indptr, chunk.indices, chunk.data
                    rows = None
                    if keep is not None and not keep.all():
                        indptr, indices, data, n_counts = _rows(chunk, keep, n_counts)
                        rows = np.flatnonzero(keep)
                    try:
                        sketch.update(indptr, indices, data, n_counts, plan.col_token)
                    except ValueError as err:
                        raise bad_value_error(err, str(reader.path), chunk, rows) from None
                    cells += len(indptr) - 1
                    bar.advance(task, chunk.n_rows)
    finally:
        for r in readers:
            r.close()
    if sketch_out is not None:
        save_sketch(sketch, genes, sketch_out, {"cells": cells, "inputs": [str(p) for p in paths]})
    medians = _medians_dict(sketch, genes)
    if out is not None:
        save_json_mapping(medians, out)
    return medians


def _rows(chunk, keep, n_counts):
    """The chunk restricted to the rows where `keep` is true."""
    base = chunk.indptr - chunk.indptr[0]
    lengths = base[1:] - base[:-1]
    entries = np.repeat(keep, lengths)
    indptr = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[keep], out=indptr[1:])
    return indptr, chunk.indices[entries], chunk.data[entries], (n_counts[keep] if n_counts is not None else None)


def _medians_dict(sketch, genes: list[str]) -> dict[str, float]:
    values = sketch.medians()
    return {g: float(v) for g, v in zip(genes, values) if np.isfinite(v) and v > 0}


def save_sketch(sketch, genes: list[str], path: str | Path, info: dict) -> None:
    header = json.dumps({"genes": genes, **info}).encode()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(SKETCH_MAGIC)
            fh.write(struct.pack("<Q", len(header)))
            fh.write(header)
            fh.write(sketch.to_bytes())


def load_sketch(path: str | Path):
    from cellrank_fm._core import MedianSketch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"sketch {path} does not exist")
    blob = path.read_bytes()
    if not blob.startswith(SKETCH_MAGIC) or len(blob) < len(SKETCH_MAGIC) + 8:
        raise UserError(f"{path} is not a cellrank median sketch (write one with cellrank medians --sketch-out)")
    pos = len(SKETCH_MAGIC)
    (n,) = struct.unpack("<Q", blob[pos : pos + 8])
    try:
        header = json.loads(blob[pos + 8 : pos + 8 + n])
        sketch = MedianSketch.from_bytes(blob[pos + 8 + n :])
    except (ValueError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is a damaged median sketch ({err})") from None
    return sketch, header


@claiming("out", "sketch_out")
def merge_sketches(paths: Sequence[str | Path], out: str | Path | None, sketch_out: str | Path | None = None) -> dict[str, float]:
    """Merge sketches made over the same gene list; write medians and/or the merged sketch."""
    if len(paths) < 1:
        raise UserError("--merge needs at least one sketch file")
    if out is None and sketch_out is None:
        raise UserError("give --out for the medians, --sketch-out for the merged sketch, or both")
    sketch, header = load_sketch(paths[0])
    cells = header.get("cells", 0)
    inputs = list(header.get("inputs", []))
    for p in paths[1:]:
        other, h = load_sketch(p)
        if h["genes"] != header["genes"]:
            raise UserError(f"{p} was sketched over a different gene list than {paths[0]}; sketch every piece with the same --vocab")
        sketch.merge(other)
        cells += h.get("cells", 0)
        inputs += h.get("inputs", [])
    if sketch_out is not None:
        save_sketch(sketch, header["genes"], sketch_out, {"cells": cells, "inputs": inputs})
    medians = _medians_dict(sketch, header["genes"])
    if out is not None:
        save_json_mapping(medians, out)
    return medians
