"""Classification quality on real cells, default settings only, beside two simple baselines.

For each task: the whole pipeline a new user runs, with no training flags — tokenize, pretrain
on the pooled corpus of every shared dataset (labels unused), fine-tune from that model with
`--baseline` — and, on the very same split:

- LR: logistic regression on 2,000 highly variable log-normalised genes (`cellrank baseline`);
- token probe: logistic regression on the model's own input tokens, each gene weighted by its
  rank (the information a linear reader gets from the encoding; `baseline.token_probe`);
- scratch: the same fine-tuning from a new `tiny` model instead of the pretrained one.

Every cellrank step goes through the command line exactly as documented. One table (task,
model macro-F1, scratch, LR, token probe, seconds) is printed and written with the per-seed
figures to OUT/quality.json.

    python benches/quality.py --out bench-out/quality                 # 512 genes per cell, seed 0
    python benches/quality.py --genes-per-cell 256 --seeds 0 1 2      # more seeds, shorter cells
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from cellrank_fm.cli import main as cellrank

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# (task, input file, label, extra finetune arguments)
TASKS = [
    ("pbmc3k cell types", "pbmc3k_seurat_labels.h5ad", "cell_type", []),
    ("OneK1K cell types, split by donor", "onek1k_subset_scdesignpop.h5ad", "cell_type", ["--split-by", "donor"]),
    ("Kang stim vs ctrl", "kang2017_pbmc_ifnb_2k.h5ad", "condition", []),
]
CORPUS = ["pbmc3k_seurat_labels.h5ad", "onek1k_subset_scdesignpop.h5ad", "kang2017_pbmc_ifnb_2k.h5ad",
          "wu2020_tcells_200.h5ad"]
KEEP = {"pbmc3k_seurat_labels.h5ad": "cell_type", "onek1k_subset_scdesignpop.h5ad": "cell_type,donor",
        "kang2017_pbmc_ifnb_2k.h5ad": "condition"}


def run(args: list) -> float:
    """`cellrank ARGS` in this process; its wall time. Any failure ends the benchmark."""
    t0 = time.perf_counter()
    try:
        cellrank([str(a) for a in args])
    except SystemExit as exc:
        if exc.code not in (0, None):
            sys.exit(f"cellrank {' '.join(map(str, args))} failed with exit code {exc.code}")
    return time.perf_counter() - t0


def dictionaries(genes_per_cell: int) -> list[str]:
    g = DATA / "geneformer"
    return ["--vocab", g / "token_dictionary_gc30M.pkl", "--medians", g / "gene_median_dictionary_gc30M.pkl",
            "--gene-map", g / "gene_name_id_dict_gc30M.pkl", "--model-input-size", str(genes_per_cell), "-q"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/quality"))
    ap.add_argument("--genes-per-cell", type=int, default=512)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--no-scratch", action="store_true", help="skip the from-scratch comparison")
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"the reference data is not at {DATA}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    dicts = dictionaries(args.genes_per_cell)
    sc = DATA / "sc"

    timings: dict[str, float] = {}
    shards = {}
    for name, keep in KEEP.items():
        shards[name] = out / f"shards_{Path(name).stem}"
        if not (shards[name] / "manifest.json").is_file():
            timings[f"tokenize {name}"] = run(["tokenize", sc / name, "--out", shards[name], "--keep-obs", keep,
                                               "--overwrite", *dicts])
    corpus = out / "corpus"
    if not (corpus / "manifest.json").is_file():
        timings["tokenize corpus"] = run(["tokenize", *[sc / n for n in CORPUS], "--out", corpus, "--overwrite", *dicts])
    pre = out / "pretrained"
    if not (pre / "metrics.json").is_file():
        # --eval-every only records the curve (README); training is as with no flags.
        timings["pretrain"] = run(["pretrain", corpus, "--out", pre, "--overwrite", "--quiet", "--eval-every", "100"])
    pre_metrics = json.loads((pre / "metrics.json").read_text())

    results = []
    for task, name, label, extra in TASKS:
        for seed in args.seeds:
            row = {"task": task, "seed": seed, "cells": None}
            clf = out / f"clf_{Path(name).stem}_s{seed}"
            row["seconds"] = run(["finetune", shards[name], "--label", label, "--from", pre, "--out", clf,
                                  "--overwrite", "--baseline", "--seed", seed, "-q", *extra])
            m = json.loads((clf / "metrics.json").read_text())
            row.update(model=m["macro_f1"], lr=m["baseline"]["macro_f1"], probe=m["token_probe"]["macro_f1"],
                       cells=m["split"], steps=m["steps"], warnings=m["warnings"])
            if not args.no_scratch:
                scratch = out / f"scratch_{Path(name).stem}_s{seed}"
                row["scratch_seconds"] = run(["finetune", shards[name], "--label", label, "--preset", "tiny",
                                              "--out", scratch, "--overwrite", "--seed", seed, "-q", *extra])
                row["scratch"] = json.loads((scratch / "metrics.json").read_text())["macro_f1"]
            results.append(row)
            print(json.dumps(row), flush=True)

    (out / "quality.json").write_text(json.dumps(
        {"genes_per_cell": args.genes_per_cell, "seeds": args.seeds, "pretraining": pre_metrics,
         "timings": timings, "results": results}, indent=2) + "\n")
    print(f"\npretraining (default settings, pooled corpus): masked-gene accuracy {pre_metrics['accuracy']:.4f}, "
          f"frequency baseline {pre_metrics['baseline_position_accuracy']:.4f}, "
          f"{timings.get('pretrain', float('nan')):.0f} s")
    print(f"{'task':40} {'model':>7} {'scratch':>8} {'LR':>7} {'probe':>7} {'seconds':>8}")
    for task, *_ in TASKS:
        rows = [r for r in results if r["task"] == task]

        def mean(key: str, rows: list = rows) -> str:
            vals = [r[key] for r in rows if key in r]
            return f"{np.mean(vals):.3f}" if vals else "-"

        print(f"{task:40} {mean('model'):>7} {mean('scratch'):>8} {mean('lr'):>7} {mean('probe'):>7} "
              f"{np.mean([r['seconds'] for r in rows]):8.0f}")


if __name__ == "__main__":
    main()
