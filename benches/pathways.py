"""Pathway SHAP against gene SHAP on the same cells, and `score` throughput.

    python benches/pathways.py                       # geneformer-v1 preset, 2,048 genes, MitoCarta leaves
    python benches/pathways.py --cells 2 --permutations 2 --score-cells 200000

Cells: `--cells` synthetic cells of `--genes` gene tokens drawn from Geneformer's V1
vocabulary (seeded), so about as many MitoCarta genes as a real cell of that length holds.
Sets: MitoCarta3.0 at `--level` (3 = leaf pathways) resolved against that vocabulary. Model:
the `--preset` classifier with random weights (the cost does not depend on the weights).

- pathway game: `pathways.pathway_values` timed end to end per cell (`--permutations`
  antithetic permutations; 2·(sets − 1) evaluations each, sets = those holding a cell gene);
- gene game, same cells, same run: `explain.permutation_values` costs (2·genes + 1) evaluations
  per permutation; with `--gene-full` it is run and timed, otherwise `--coalitions` of its
  coalitions (lengths spread as in the real run) are timed and the per-cell figure is that rate
  times the evaluation count (a CPU cannot run a 2,048-gene permutation in a bench's time);
- score: `score.Scorer` over `--score-cells` cells of `--genes` tokens in chunks of 8,192 (the
  tokens made in memory, so the figure is the scoring alone; reading Parquet shards adds the
  tokenizer-side decode, measured in `tokenizer.py`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="geneformer-v1")
    ap.add_argument("--genes", type=int, default=2048)
    ap.add_argument("--cells", type=int, default=2)
    ap.add_argument("--permutations", type=int, default=2)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--coalitions", type=int, default=24)
    ap.add_argument("--gene-full", action="store_true")
    ap.add_argument("--score-cells", type=int, default=200_000)
    ap.add_argument("--tokens-per-batch", type=int, default=65536)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()

    import torch

    from cellrank_fm.checkpoint import ModelDirInfo
    from cellrank_fm.explain import Evaluator, coalition_sequences, permutation_values
    from cellrank_fm.genesets import load_gene_sets
    from cellrank_fm.model import BertForSequenceClassification, preset_config
    from cellrank_fm.pathways import pathway_values
    from cellrank_fm.score import Scorer
    from cellrank_fm.vocab import load_vocabulary

    vocab = load_vocabulary(args.data / "geneformer" / "token_dictionary_gc30M.pkl")
    sets = load_gene_sets(args.data / "genes" / "Human.MitoCarta3.0.csv", vocab, level=args.level)
    token_sets = sets.token_sets(vocab)
    torch.manual_seed(args.seed)
    cfg = preset_config(args.preset, vocab_size=max(vocab.values()) + 1, num_labels=2, pooling="mean",
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg).to(args.device).eval()
    info = ModelDirInfo(path=None, config=cfg, architecture=model.architecture, labels=["a", "b"],
                        cellrank={"special_tokens": {"pad": 0, "mask": 1}}, vocabulary=vocab)
    ev = Evaluator(model, info, args.tokens_per_batch)
    rng = np.random.default_rng(args.seed)
    genes = np.array(sorted(v for k, v in vocab.items() if not k.startswith("<")), dtype=np.int64)
    cells = [rng.choice(genes, size=args.genes, replace=False) for _ in range(args.cells)]

    load = os.getloadavg()[0]
    print(f"{args.preset}, {args.genes} genes per cell, {args.cells} cells, {args.permutations} permutations, "
          f"MitoCarta level {args.level} ({len(sets)} sets), {args.device}, load average {load:.1f}\n")
    path_s, path_evals, players = [], [], []
    for cell in cells:
        before = ev.evaluations
        started = time.perf_counter()
        sv = pathway_values(ev, cell, token_sets, [0], npermutations=args.permutations, seed=args.seed)
        path_s.append(time.perf_counter() - started)
        path_evals.append(ev.evaluations - before)
        players.append(len(sv.players))

    n = args.genes
    gene_evals = (2 * n + 1) * args.permutations
    if args.gene_full:
        started = time.perf_counter()
        for cell in cells:
            permutation_values(ev, cell, [0], npermutations=args.permutations, seed=args.seed)
        gene_s = (time.perf_counter() - started) / len(cells)
        how = "run"
    else:
        order = rng.permutation(n)
        sizes = np.concatenate([np.arange(0, n + 1), np.arange(n - 1, -1, -1)])
        pick = np.linspace(1, len(sizes) - 2, args.coalitions).round().astype(int)
        masks = np.zeros((len(pick), n), dtype=bool)
        for r, i in enumerate(pick):
            k = sizes[i]
            masks[r, order[:k] if i <= n else order[n - k:]] = True
        empty = np.array([], dtype=np.int64)
        seqs = coalition_sequences(empty, cells[0], empty, masks)
        started = time.perf_counter()
        ev.logits(seqs)
        rate = len(seqs) / (time.perf_counter() - started)
        gene_s = gene_evals / rate
        how = f"{rate:.2f} evaluations/s x {gene_evals:,}"

    scorer = Scorer(sets, vocab, max_rank=max(1, round(0.05 * len(genes))))
    chunk = 8192
    flat = np.concatenate([rng.choice(genes, size=n, replace=False) for _ in range(64)])
    started = time.perf_counter()
    done = 0
    while done < args.score_cells:
        m = min(chunk, args.score_cells - done)
        reps = -(-m // 64)
        tokens = np.tile(flat, reps)[: m * n]
        scorer.score(tokens, np.arange(0, (m + 1) * n, n))
        done += m
    score_rate = args.score_cells / (time.perf_counter() - started)

    print("| what | figure | peer (same run) |")
    print("|---|---|---|")
    print(f"| pathway SHAP, s per cell | **{np.mean(path_s):.1f}** ({np.mean(path_evals):,.0f} evaluations, "
          f"{np.mean(players):.0f} sets playing) | gene SHAP {gene_s:,.0f} s per cell ({how}) |")
    print(f"| score, cells/s ({args.score_cells:,} cells x {n} tokens, {len(sets)} sets) | **{score_rate:,.0f}** | — |")


if __name__ == "__main__":
    main()
