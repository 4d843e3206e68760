"""Pathway SHAP against gene SHAP on the same cells, and `score` throughput.

    python benches/pathways.py                       # geneformer-v1 preset, 2,048 genes, MitoCarta leaves
    python benches/pathways.py --cells 2 --permutations 2 --score-shards /tmp/bench200k/shards

Cells: `--cells` synthetic cells of `--genes` gene tokens drawn from Geneformer's V1
vocabulary (seeded); a real cell's genes are not a uniform draw, so the number of sets that
play (printed; the pathway game's cost grows with it) can differ on real cells.
Sets: MitoCarta3.0 at `--level` (3 = leaf pathways) resolved against that vocabulary. Model:
the `--preset` classifier with random weights (the cost does not depend on the weights).

- pathway game: `pathways.pathway_values` timed end to end per cell (`--permutations`
  antithetic permutations; 2·(sets − 1) evaluations each, sets = those holding a cell gene);
- gene game, same cells, same run: `explain.permutation_values` costs (2·genes + 1) evaluations
  per permutation; with `--gene-full` it is run and timed, otherwise `--coalitions` of its
  coalitions (lengths spread as in the real run) are timed and the per-cell figure is that rate
  times the evaluation count (a CPU cannot run a 2,048-gene permutation in a bench's time);
- score: `cellrank_fm.score` end to end on the token shard directory `--score-shards` (reading
  the Parquet parts, scoring in chunks of 8,192 cells, building the output AnnData); the sets
  have the MitoCarta sets' sizes, their genes drawn at random (seeded) from the shards'
  vocabulary, so they resolve on a synthetic corpus too. Make a 200,000-cell shard set with
  `make_corpus.py` and `cellrank tokenize` (see benches/README.md).
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
    ap.add_argument("--score-shards", type=Path, default=None)
    ap.add_argument("--tokens-per-batch", type=int, default=65536)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()

    from cellrank_fm.explain import permutation_values
    from cellrank_fm.genesets import load_gene_sets
    from cellrank_fm.pathways import pathway_values
    from cellrank_fm.vocab import load_vocabulary
    from shap_setup import permutation_coalitions, random_classifier

    vocab = load_vocabulary(args.data / "geneformer" / "token_dictionary_gc30M.pkl")
    sets = load_gene_sets(args.data / "genes" / "Human.MitoCarta3.0.csv", vocab, level=args.level)
    token_sets = sets.token_sets(vocab)
    _, _, ev = random_classifier(args.preset, args.device, args.seed, vocabulary=vocab,
                                 tokens_per_batch=args.tokens_per_batch)
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
        seqs = permutation_coalitions(cells[0], args.coalitions, rng)
        started = time.perf_counter()
        ev.logits(seqs)
        rate = len(seqs) / (time.perf_counter() - started)
        gene_s = gene_evals / rate
        how = f"{rate:.2f} evaluations/s x {gene_evals:,}"

    score_row = None
    if args.score_shards is not None:
        import cellrank_fm as cfm
        from cellrank_fm.shards import ShardSet

        shards = ShardSet(args.score_shards)
        pool = np.array(sorted(k for k in shards.vocabulary if not k.startswith("<")))
        random_sets = {f"S{i:03d}": list(rng.choice(pool, size=s.n_in_vocab, replace=False))
                       for i, s in enumerate(sets.sets)}
        started = time.perf_counter()
        scored = cfm.score(args.score_shards, random_sets, progress=False)
        secs = time.perf_counter() - started
        score_row = (len(scored) / secs, len(scored), secs, shards.model_input_size)

    print("| what | figure | peer (same run) |")
    print("|---|---|---|")
    print(f"| pathway SHAP, s per cell | **{np.mean(path_s):.1f}** ({np.mean(path_evals):,.0f} evaluations, "
          f"{np.mean(players):.0f} sets playing) | gene SHAP {gene_s:,.0f} s per cell ({how}) |")
    if score_row is not None:
        rate, cells_scored, secs, size = score_row
        print(f"| `score` from shards, cells/s ({cells_scored:,} cells x up to {size} tokens, {len(sets)} sets, "
              f"{secs:.1f} s) | **{rate:,.0f}** | — |")


if __name__ == "__main__":
    main()
