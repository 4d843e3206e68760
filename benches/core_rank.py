"""Rank-value tokenisation speed: the Rust core (`tokenize_csr`) beside NumPy/SciPy.

Input: an in-memory CSR of 20,000 cells x 20,000 genes with about 2,000 nonzero genes per cell
(integer counts stored as float32, 90% of genes in the vocabulary, lognormal medians). The
peer is the same algorithm written the way Geneformer's tokenizer computes it: restrict to
vocabulary columns, normalise the sparse chunk (x / n_counts * 10000 / median), then per
cell argsort descending and truncate. Each thread count runs in its own process because
rayon's pool size is fixed at first use (RAYON_NUM_THREADS).

    python benches/core_rank.py [--cells 20000] [--genes 20000] [--nnz 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import scipy.sparse as sp

MAX_GENES = 2048
CHUNK_ROWS = 2048


def make_input(cells: int, genes: int, nnz: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    indptr = np.zeros(cells + 1, np.int64)
    cols = []
    for r in range(cells):
        c = np.unique(rng.integers(0, genes, size=int(nnz * 1.05)))
        cols.append(c.astype(np.int32))
        indptr[r + 1] = indptr[r] + len(c)
    indices = np.concatenate(cols)
    data = (rng.geometric(0.35, size=len(indices))).astype(np.float32)
    col_token = np.full(genes, -1, np.int32)
    in_vocab = rng.random(genes) < 0.9
    col_token[in_vocab] = rng.permutation(in_vocab.sum()).astype(np.int32) + 2
    col_median = rng.lognormal(0.0, 1.0, size=genes)
    return indptr, indices, data, col_token, col_median


def rust_tokenize(indptr, indices, data, col_token, col_median):
    from cellrank_fm._core import tokenize_csr

    rows = len(indptr) - 1
    out = []
    for lo in range(0, rows, CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, rows)
        a, b = indptr[lo], indptr[hi]
        out.append(tokenize_csr(indptr[lo : hi + 1], indices[a:b], data[a:b], None, col_token, col_median, MAX_GENES))
    return out


def sketch_medians(indptr, indices, data, col_token, col_median):
    """One pass of `cellrank medians`' core: every nonzero value into the per-gene sketch."""
    from cellrank_fm._core import MedianSketch

    rows, genes = len(indptr) - 1, len(col_token)
    sketch = MedianSketch(genes, 0.001)
    col_gene = np.arange(genes, dtype=np.int32)
    for lo in range(0, rows, CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, rows)
        a, b = indptr[lo], indptr[hi]
        sketch.update(indptr[lo : hi + 1], indices[a:b], data[a:b], None, col_gene)
    return sketch.medians()


def numpy_tokenize(indptr, indices, data, col_token, col_median):
    """Geneformer's way: sparse normalisation of the vocabulary columns, then argsort per cell."""
    rows, genes = len(indptr) - 1, len(col_token)
    vocab_cols = np.flatnonzero(col_token >= 0)
    tokens_of = col_token[vocab_cols]
    norm = col_median[vocab_cols]
    out = []
    for lo in range(0, rows, CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, rows)
        a, b = indptr[lo], indptr[hi]
        chunk = sp.csr_matrix((data[a:b], indices[a:b], indptr[lo : hi + 1] - a), shape=(hi - lo, genes))
        n_counts = np.asarray(chunk.sum(axis=1)).ravel()
        view = chunk[:, vocab_cols]
        normed = sp.csr_matrix(sp.diags(1.0 / n_counts) @ view * 10000 @ sp.diags(1.0 / norm))
        for i in range(normed.shape[0]):
            s, e = normed.indptr[i], normed.indptr[i + 1]
            v = normed.data[s:e]
            order = np.argsort(-v)[:MAX_GENES]
            out.append((tokens_of[normed.indices[s:e]][order], v[order]))
    return out


def worker(args) -> None:
    arrays = make_input(args.cells, args.genes, args.nnz)
    rust_tokenize(*(a[: 2 * CHUNK_ROWS + 1] if i == 0 else a for i, a in enumerate(arrays)))  # warm-up
    t, c = time.perf_counter(), time.process_time()
    res = rust_tokenize(*arrays)
    result = {"rust_s": time.perf_counter() - t, "rust_cpu_s": time.process_time() - c}
    t = time.perf_counter()
    sketch_medians(*arrays)
    result["sketch_s"] = time.perf_counter() - t
    if args.peer:
        t, c = time.perf_counter(), time.process_time()
        peer = numpy_tokenize(*arrays)
        result["numpy_s"] = time.perf_counter() - t
        result["numpy_cpu_s"] = time.process_time() - c
        ours = [tok[off[i] : off[i + 1]] for tok, off, _ in res for i in range(len(off) - 1)]
        same_order = same_content = 0
        worst = 0.0  # largest relative value gap between genes placed in a different order
        for a, (b, v) in zip(ours, peer):
            same_order += np.array_equal(a, b)
            same_content += np.array_equal(np.sort(a), np.sort(b))
            if not np.array_equal(a, b) and len(a) == len(b):
                value_of = dict(zip(b.tolist(), v.tolist()))
                va = np.array([value_of.get(t, np.nan) for t in a.tolist()])
                worst = max(worst, float(np.nanmax(np.abs(va - v) / v)))
        result.update(same_order=int(same_order), same_content=int(same_content), worst_swap_gap=worst)
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--nnz", type=int, default=2_000)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    runs = {}
    for threads in (1, 2):
        cmd = [sys.executable, __file__, "--worker", f"--cells={args.cells}", f"--genes={args.genes}",
               f"--nnz={args.nnz}"] + (["--peer"] if threads == 1 else [])
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        runs[threads] = json.loads(out.strip().splitlines()[-1])
    cells = args.cells
    numpy_rate = cells / runs[1]["numpy_s"]
    numpy_cpu_rate = cells / runs[1]["numpy_cpu_s"]
    print(f"rank-value tokenisation, {cells:,} cells x {args.genes:,} genes, ~{args.nnz:,} nonzero per cell, "
          f"max {MAX_GENES} genes, chunks of {CHUNK_ROWS} rows; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print("cells/s (wall clock) and cells per CPU-second (robust when other jobs share the cores)")
    print(f"{'implementation':<36}{'threads':>8}{'cells/s':>10}{'vs NumPy':>10}{'cells/CPU-s':>13}{'vs NumPy':>10}")
    print(f"{'NumPy/SciPy (Geneformer-style)':<36}{1:>8}{numpy_rate:>10,.0f}{1.0:>9.1f}x"
          f"{numpy_cpu_rate:>13,.0f}{1.0:>9.1f}x")
    for threads, r in runs.items():
        rate, cpu_rate = cells / r["rust_s"], cells / r["rust_cpu_s"]
        print(f"{'cellrank_fm._core.tokenize_csr':<36}{threads:>8}{rate:>10,.0f}{rate / numpy_rate:>9.1f}x"
              f"{cpu_rate:>13,.0f}{cpu_rate / numpy_cpu_rate:>9.1f}x")
    for threads, r in runs.items():
        print(f"{'cellrank_fm._core.MedianSketch.update':<36}{threads:>8}{cells / r['sketch_s']:>10,.0f}"
              "   (medians pass, all nonzero values, relative accuracy 0.001; no peer)")
    r = runs[1]
    print(f"agreement with NumPy: {r['same_content']:,}/{cells:,} cells with the same genes, "
          f"{r['same_order']:,}/{cells:,} in the same order; genes ordered differently differ in value by at "
          f"most {r['worst_swap_gap']:.1e} relative (near-ties: the peer computes in float32 and argsort is unstable)")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores during the run; "
              "wall-clock rates are depressed, CPU-second rates much less so")


if __name__ == "__main__":
    main()
