"""Tokenizer throughput and peak memory: `cellrank tokenize` end to end, and a NumPy/SciPy peer.

    python benches/make_corpus.py --cells 20000 --out /tmp/bench20k/corpus.h5ad
    python benches/tokenizer.py --corpus /tmp/bench20k/corpus.h5ad --peer
    python benches/tokenizer.py --corpus /tmp/bench200k/corpus.h5ad --corpus /tmp/bench1m/corpus.h5ad
    python benches/tokenizer.py --corpus /tmp/bench20k/corpus.h5ad --soma   # also from a TileDB-SOMA copy

Each run is a separate process; its wall time covers reading the h5ad, tokenizing and writing
the Parquet shards, and its peak resident memory comes from `os.wait4` (the child's own
ru_maxrss). The peer does what Geneformer's `TranscriptomeTokenizer` does, in the same
process layout: load the whole h5ad with anndata, then per chunk of 512 cells select the
vocabulary columns, normalise with scipy sparse arithmetic, argsort every cell in Python,
keep the top 2,048 as Python lists, and write them to Parquet with pyarrow. `agree` is the
share of cells whose tokens the two produce identically (near ties may swap). CPU seconds
(user + system) are printed too: on a shared machine they are steadier than wall time.

`--soma` writes each corpus once as a TileDB-SOMA experiment beside it (`corpus.soma/`, with
`tiledbsoma.io.from_h5ad`) and tokenizes that too; `identical` is then the share of cells whose
tokens equal those from the .h5ad.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_GENES = 2048


def peer(corpus: str, out: str, vocab_path: str, medians_path: str) -> None:
    """Geneformer's algorithm with NumPy/SciPy (run in a child process)."""
    import anndata as ad
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    vocab = json.loads(Path(vocab_path).read_text())
    medians = json.loads(Path(medians_path).read_text())
    adata = ad.read_h5ad(corpus)
    genes = np.asarray(adata.var_names)
    loc = np.where([g in vocab and g in medians for g in genes])[0]
    norm = np.array([medians[g] for g in genes[loc]])
    tokens = np.array([vocab[g] for g in genes[loc]])
    n_counts = np.asarray(adata.X.sum(axis=1)).ravel()[:, None]
    cells: list[list[int]] = []
    for i in range(0, adata.n_obs, 512):
        idx = np.arange(i, min(adata.n_obs, i + 512))
        X_view = adata[idx, :].X[:, loc]
        X_norm = sp.csr_matrix(X_view / n_counts[idx] * 10_000 / norm)
        for r in range(X_norm.shape[0]):
            row = X_norm[r]
            order = np.argsort(-row.data)
            cells.append(tokens[row.indices][order][:MAX_GENES].tolist())
    table = pa.table({"input_ids": cells, "length": [len(c) for c in cells]})
    pq.write_table(table, out, compression="zstd")


def _run(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, the child's peak RSS in MB, and its CPU seconds (user + system)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def _cells(corpus: Path) -> int:
    import h5py

    with h5py.File(corpus) as f:
        return int(f["X"].attrs["shape"][0])


def _tokenize(source: Path, out: Path, vocab: Path, medians: Path) -> tuple[float, float, float]:
    return _run([sys.executable, "-c", "from cellrank_fm.cli import main; main()", "tokenize", str(source),
                 "--out", str(out), "--vocab", str(vocab), "--medians", str(medians), "--model-version", "v1",
                 "--quiet", "--overwrite"])


def _tokens(path: Path) -> list:
    """Each cell's tokens from a shard directory or the peer's Parquet file."""
    import polars as pl

    if path.is_file():
        return pl.read_parquet(path)["input_ids"].to_list()
    manifest = json.loads((path / "manifest.json").read_text())
    return pl.concat([pl.read_parquet(path / p["file"]) for p in manifest["parts"]])["input_ids"].to_list()


def _agreement(ours: list, theirs: list) -> float:
    same = sum(1 for a, b in zip(ours, theirs) if a == b)
    return same / max(1, len(theirs))


def _soma_copy(corpus: Path) -> Path:
    """The corpus as a TileDB-SOMA experiment beside it, written once by a child process: a
    forked child starts with its parent's resident memory, so the parent stays small."""
    out = corpus.with_suffix(".soma")
    if not out.exists():
        _run([sys.executable, "-W", "ignore", "-c", "import sys, tiledbsoma.io; "
              "tiledbsoma.io.from_h5ad(sys.argv[1], sys.argv[2], measurement_name='RNA')", str(out), str(corpus)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="cellrank tokenize throughput and memory")
    ap.add_argument("--corpus", type=Path, action="append", required=True, help="h5ad from make_corpus.py (repeatable)")
    ap.add_argument("--peer", action="store_true", help="also run the NumPy/SciPy peer on each corpus")
    ap.add_argument("--soma", action="store_true", help="also tokenize a TileDB-SOMA copy of each corpus")
    ap.add_argument("--workdir", type=Path, default=None, help="where shards go (default: a temp dir)")
    ap.add_argument("--_peer", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._peer:
        peer(*args._peer)
        return
    rows, soma_rows = [], []
    load_before = os.getloadavg()[0]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cellrank-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    for corpus in args.corpus:
        vocab, medians = corpus.parent / "vocab.json", corpus.parent / "medians.json"
        cells = _cells(corpus)
        out = work / f"shards-{corpus.parent.name}"
        secs, rss, cpu = _tokenize(corpus, out, vocab, medians)
        row = {"input": f"{corpus.parent.name}/{corpus.name} ({cells:,})", "cellrank_cells_s": cells / secs,
               "cellrank_s": secs, "cellrank_rss_mb": rss, "cellrank_cpu_s": cpu}
        if args.peer:
            peer_out = work / f"peer-{corpus.parent.name}.parquet"
            psecs, prss, pcpu = _run([sys.executable, __file__, "--corpus", str(corpus),
                                "--_peer", str(corpus), str(peer_out), str(vocab), str(medians)])
            row.update({"peer_cells_s": cells / psecs, "peer_s": psecs, "peer_rss_mb": prss, "peer_cpu_s": pcpu,
                        "ratio": psecs / secs, "compare": (out, peer_out)})
        rows.append(row)
        if args.soma:
            soma, soma_out = _soma_copy(corpus), work / f"shards-{corpus.parent.name}-soma"
            ssecs, srss, scpu = _tokenize(soma, soma_out, vocab, medians)
            soma_rows.append({"input": f"{corpus.parent.name}/{soma.name} ({cells:,})", "cells_s": cells / ssecs,
                              "cpu_s": scpu, "rss_mb": srss, "h5ad_cells_s": cells / secs, "compare": (soma_out, out)})
    # Tokens are compared once every run is over, so no child inherits their memory.
    for r in rows + soma_rows:
        if "compare" in r:
            r["agree"] = _agreement(*map(_tokens, r.pop("compare")))
    load = os.getloadavg()[0]
    print()
    print(f"cellrank tokenize vs NumPy/SciPy peer (Geneformer's algorithm); {os.cpu_count()} CPUs, "
          f"load average {load_before:.1f} before / {load:.1f} after; model input 2,048")
    head = f"{'input (cells)':<30} {'cellrank cells/s':>16} {'CPU s':>7} {'peak RSS MB':>12}"
    if args.peer:
        head += f" {'peer cells/s':>13} {'CPU s':>7} {'peer RSS MB':>12} {'speed-up':>9} {'identical':>10}"
    print(head)
    for r in rows:
        line = f"{r['input']:<30} {r['cellrank_cells_s']:>16,.0f} {r['cellrank_cpu_s']:>7.1f} {r['cellrank_rss_mb']:>12,.0f}"
        if args.peer:
            line += (f" {r['peer_cells_s']:>13,.0f} {r['peer_cpu_s']:>7.1f} {r['peer_rss_mb']:>12,.0f}"
                     f" {r['ratio']:>8.1f}x {r['agree']:>9.1%}")
        print(line)
    if soma_rows:
        print(f"\n{'from TileDB-SOMA (cells)':<30} {'cellrank cells/s':>16} {'CPU s':>7} {'peak RSS MB':>12}"
              f" {'from .h5ad cells/s':>19} {'identical':>10}")
        for r in soma_rows:
            print(f"{r['input']:<30} {r['cells_s']:>16,.0f} {r['cpu_s']:>7.1f} {r['rss_mb']:>12,.0f}"
                  f" {r['h5ad_cells_s']:>19,.0f} {r['agree']:>9.1%}")


if __name__ == "__main__":
    main()
