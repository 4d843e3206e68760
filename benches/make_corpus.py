"""Generate the tokenizer benchmark corpus: an uncompressed CSR .h5ad written by streaming.

    python benches/make_corpus.py --cells 1000000 --out /tmp/corpus_1m.h5ad

Cells x 20,000 genes with about 2,000 nonzero genes per cell (gaps between expressed genes are
geometric, so each cell's count varies), counts drawn per gene from geometric distributions
(a realistic mix of many 1s and 2s and a long tail, so ranking meets ties). Stored as
uint16 data + int32 indices + int64 indptr in contiguous datasets: about 6 bytes per nonzero,
so ~12 GB for 1,000,000 cells (~240 MB for 20,000). Memory stays at one block of cells (plus
the indptr, 8 MB per million cells).

Also writes `vocab.json` and `medians.json` for the 20,000 genes beside the corpus (the
genes are synthetic Ensembl IDs, so no external file is needed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py
import numpy as np

N_GENES = 20_000
BLOCK_CELLS = 10_000


def gene_ids(n: int) -> list[str]:
    return [f"ENSG{i:011d}" for i in range(1, n + 1)]


def _str_dataset(group, name, values):
    group.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
    group[name].attrs["encoding-type"] = "string-array"
    group[name].attrs["encoding-version"] = "0.2.0"


def _frame(group, index_values):
    group.attrs["encoding-type"] = "dataframe"
    group.attrs["encoding-version"] = "0.2.0"
    group.attrs["_index"] = "_index"
    group.attrs["column-order"] = np.array([], dtype=object).astype(h5py.string_dtype())
    _str_dataset(group, "_index", index_values)


def _empty_dict(f, name):
    g = f.create_group(name)
    g.attrs["encoding-type"] = "dict"
    g.attrs["encoding-version"] = "0.1.0"


def _block(seed: int, block: int, rows: int, genes_per_cell: int, gene_p: np.ndarray, values: bool):
    """Column indices (and counts) of one block of cells; the same (seed, block) gives the same block."""
    rng = np.random.default_rng([seed, block])
    width = int(genes_per_cell * 1.3) + 64
    # Expressed genes: cumulative geometric gaps, cut at the gene count.
    cols = np.cumsum(rng.geometric(genes_per_cell / N_GENES, size=(rows, width)).astype(np.int32), axis=1) - 1
    keep = cols < N_GENES
    counts = keep.sum(axis=1)
    if not values:
        return counts, None, None
    cols = cols[keep]
    return counts, cols, rng.geometric(gene_p[cols]).astype(np.uint16)


def make_corpus(out: Path, cells: int, genes_per_cell: int = 2000, seed: int = 0, distinct_blocks: int = 20) -> dict:
    """Write `cells` cells in blocks of 10,000; block b repeats distinct block b % distinct_blocks.

    Repeating a pool of distinct blocks keeps generation cheap (the cost is writing the bytes);
    the tokenizer still reads every byte from its own place in the file. Two passes: count
    nonzeros, then write contiguous datasets (what anndata itself writes for uncompressed X),
    so readers can use plain file reads.
    """
    rng = np.random.default_rng(seed)
    # Per-gene success probability of the count distribution: smaller = higher counts.
    gene_p = np.clip(rng.beta(2.0, 1.2, size=N_GENES), 0.05, 0.98)
    tmp = out.with_name(out.name + ".partial")
    t0 = time.perf_counter()
    blocks = [(b, min(BLOCK_CELLS, cells - start)) for b, start in enumerate(range(0, cells, BLOCK_CELLS))]
    pool = {p: _block(seed, p, BLOCK_CELLS, genes_per_cell, gene_p, values=False)[0] for p in range(min(distinct_blocks, len(blocks)))}
    indptr = np.zeros(cells + 1, dtype=np.int64)
    for b, rows in blocks:
        indptr[b * BLOCK_CELLS + 1 : b * BLOCK_CELLS + rows + 1] = pool[b % len(pool)][:rows]
    np.cumsum(indptr, out=indptr)
    nnz_total = int(indptr[-1])
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        x = f.create_group("X")
        x.attrs["encoding-type"] = "csr_matrix"
        x.attrs["encoding-version"] = "0.1.0"
        x.attrs["shape"] = np.array([cells, N_GENES], dtype=np.int64)
        data = x.create_dataset("data", shape=(nnz_total,), dtype=np.uint16)
        indices = x.create_dataset("indices", shape=(nnz_total,), dtype=np.int32)
        x.create_dataset("indptr", data=indptr)
        done = 0
        for p in pool:
            counts, cols, vals = _block(seed, p, BLOCK_CELLS, genes_per_cell, gene_p, values=True)
            ends = np.cumsum(counts)
            for b, rows in blocks[p :: len(pool)]:
                a = int(indptr[b * BLOCK_CELLS])
                n = int(ends[rows - 1])
                data[a : a + n] = vals[:n]
                indices[a : a + n] = cols[:n]
                done += rows
            print(f"  {done:,} cells ({done / (time.perf_counter() - t0):,.0f} cells/s)", flush=True)
        _frame(f.create_group("obs"), [f"cell{i}" for i in range(cells)])
        _frame(f.create_group("var"), gene_ids(N_GENES))
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            _empty_dict(f, name)
    tmp.replace(out)
    genes = gene_ids(N_GENES)
    vocab = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{g: i + 4 for i, g in enumerate(genes)}}
    # Medians of count / total x 10,000: each gene's mean count, scaled; a small jitter keeps
    # them distinct, as real medians are (so exact ties are rare, as in real data).
    mean_count = 1.0 / gene_p * (1 + 1e-3 * rng.random(N_GENES))
    medians = {g: float(m) for g, m in zip(genes, mean_count / (genes_per_cell * mean_count.mean()) * 10_000)}
    (out.parent / "vocab.json").write_text(json.dumps(vocab))
    (out.parent / "medians.json").write_text(json.dumps(medians))
    return {"cells": cells, "nonzeros": nnz_total, "bytes": out.stat().st_size, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes-per-cell", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distinct-blocks", type=int, default=20, help="distinct blocks of 10,000 cells, repeated")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = make_corpus(args.out, args.cells, args.genes_per_cell, args.seed, args.distinct_blocks)
    print(f"{args.out}: {info['cells']:,} cells, {info['nonzeros']:,} nonzeros "
          f"({info['nonzeros'] / info['cells']:,.0f}/cell), {info['bytes'] / 1e9:.2f} GB, {info['seconds']:.0f} s")


if __name__ == "__main__":
    main()
