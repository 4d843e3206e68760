"""Permutation SHAP throughput: model evaluations per second and seconds per explained cell.

    python benches/explain.py                      # geneformer-v1 preset, 2,048 genes per cell
    python benches/explain.py --genes 512 --coalitions 64 --device cuda

One permutation of the gene-deletion game for a cell of n genes costs 2n + 1 model
evaluations whose sequences grow from 0 to n genes and shrink back (n² tokens in all). The
bench takes one random permutation of a synthetic cell of `--genes` gene tokens, draws
`--coalitions` of its coalitions evenly over the permutation (so their lengths are spread as in
the real run), and evaluates them

- ours: `Evaluator` (`from cellrank_fm.explain import Evaluator`) — length-sorted,
  token-budgeted packed batches (padded SDPA with a key mask on CPU, variable-length flash
  attention in bfloat16 on CUDA);
- peer: HuggingFace `transformers.BertForSequenceClassification` with the same weights, fed
  the coalitions in permutation order in padded batches of `--peer-batch` with an attention
  mask (what a shap model function usually does).

Seconds per explained cell = (2n + 1) × permutations / evaluations per second (default 10
permutations, shap's default). With `--end-to-end`, a full `permutation_values` call on a cell
of `--e2e-genes` genes with one permutation is timed as well, to check the extrapolation.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="geneformer-v1")
    ap.add_argument("--genes", type=int, default=2048)
    ap.add_argument("--coalitions", type=int, default=48)
    ap.add_argument("--permutations", type=int, default=10)
    ap.add_argument("--tokens-per-batch", type=int, default=65536)
    ap.add_argument("--peer-batch", type=int, default=16)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--end-to-end", action="store_true")
    ap.add_argument("--e2e-genes", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()

    import os

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from cellrank_fm.explain import permutation_values
    from shap_setup import permutation_coalitions, random_classifier

    model, info, ev = random_classifier(args.preset, args.device, args.seed, tokens_per_batch=args.tokens_per_batch)
    cfg = info.config
    rng = np.random.default_rng(args.seed)
    n = args.genes
    genes = rng.choice(np.arange(2, cfg.vocab_size), size=n, replace=False).astype(np.int64)
    seqs = permutation_coalitions(genes, args.coalitions, rng)
    tokens = int(sum(len(s) for s in seqs))

    def timed(fn):
        fn(seqs[:2])  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(seqs)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    ours_s, ours_out = timed(ev.logits)
    rows = [("cellrank Evaluator (packed, token-budgeted)", ours_s)]
    if not args.no_peer:
        from cellrank_fm.hf import padded_inputs, to_transformers

        hf = to_transformers(model)

        @torch.inference_mode()
        def peer(batch_seqs):
            out = []
            for b in range(0, len(batch_seqs), args.peer_batch):
                chunk = batch_seqs[b:b + args.peer_batch]
                ids, att = padded_inputs(chunk, args.device)
                out.append(hf(input_ids=ids, attention_mask=att).logits.float().cpu())
            return torch.cat(out).numpy()

        peer_s, _ = timed(peer)
        rows.append((f"HF transformers BERT, padded batches of {args.peer_batch}", peer_s))

    evals_per_cell = (2 * n + 1) * args.permutations
    print(f"\npermutation SHAP, preset {args.preset}, {n:,} genes per cell, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{len(seqs)} coalitions sampled over one permutation ({tokens:,} tokens, mean length {tokens / len(seqs):,.0f});"
          f" one cell = {evals_per_cell:,} evaluations ({args.permutations} permutations)")
    print(f"{'implementation':48s} {'evals/s':>9s} {'tokens/s':>11s} {'s/cell':>10s}")
    for name, secs in rows:
        eps = len(seqs) / secs
        print(f"{name:48s} {eps:9.2f} {tokens / secs:11,.0f} {evals_per_cell / eps:10,.0f}")

    if args.end_to_end:
        m = args.e2e_genes
        cell = genes[:m]
        ev.evaluations = 0
        t = time.perf_counter()
        permutation_values(ev, cell, [0], npermutations=1, seed=args.seed)
        secs = time.perf_counter() - t
        print(f"end to end: one {m}-gene cell, 1 permutation: {ev.evaluations:,} evaluations in {secs:.1f} s "
              f"({ev.evaluations / secs:.1f} evals/s, {m * (m + 1) / secs:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
