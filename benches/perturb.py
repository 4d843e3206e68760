"""In silico deletion throughput: perturbations/s, ours against a Geneformer-style implementation.

    python benches/perturb.py                                    # geneformer-v1, 256 and 2,048 genes
    python benches/perturb.py --sizes 2048 --cells 1 --max-genes 16 --threads 2

Both sides run the same randomly initialised model (the `--preset` shape, `transformers`
receiving our weights through `cellrank_fm.hf.to_transformers`) on the same synthetic cells, in
the same process:

- ours: `perturb_cells` (python/cellrank_fm/perturb.py) end to end, `--mode delete` — the goal centroid,
  the original cells, every perturbed copy embedded in length-sorted, token-budgeted packed
  batches, the shifts and the statistics;
- peer (in the same precision: bf16 autocast on CUDA, fp32 on CPU): Geneformer's `InSilicoPerturber` way (delete, `emb_mode="cell"`, a goal state):
  per start cell, the cell's own embedding, then the batch of its perturbed copies (each with
  one gene removed) in padded minibatches of `--forward-batch` (Geneformer's default 100)
  through `transformers.BertModel` with an attention mask and `output_hidden_states`, the mean
  of the non-padding states of the chosen layer, and the shift
  `cos(perturbed, goal) − cos(original, goal)` (its `quant_cos_sims` with `cell_states_to_model`).

The start cells all express the same `n` genes, each in its own random rank order; at most
`--max-genes` of them are deleted per cell (every gene when n ≤ max-genes; ours then also runs
its two null deletions per cell, counted in its perturbations). Both sides' shifts are compared
per (cell, gene): they must agree to `--tol`, or the run exits 1.

`--overhead-cells N` instead times `perturb_cells` alone on N cells of the first size with
every gene deleted, the model replaced by a stub that returns random embeddings: the work the
library adds around the model (sequences, shifts, tables, a rank-sum test per gene).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

import numpy as np


def geneformer_deletion(hf, cells: dict[str, np.ndarray], goal_cells: list[np.ndarray], genes: np.ndarray,
                        layer: int, forward_batch: int, device) -> dict[tuple[str, int], float]:
    """Shift toward the goal for every (cell, deleted gene token), computed as Geneformer does."""
    import torch

    from cellrank_fm.hf import padded_inputs

    def embs(seqs: list[np.ndarray]) -> torch.Tensor:
        out = []
        for b in range(0, len(seqs), forward_batch):
            chunk = seqs[b:b + forward_batch]
            ids, mask = padded_inputs(chunk, device)
            hidden = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
            m = mask[..., None].to(hidden.dtype)
            out.append((hidden * m).sum(1) / m.sum(1))  # mean of the non-padding states
        return torch.cat(out)

    cos = torch.nn.functional.cosine_similarity
    shifts = {}
    with torch.inference_mode():
        goal = embs(goal_cells).mean(0, keepdim=True)
        for cell_id, tokens in cells.items():
            original = embs([tokens])
            where = {int(t): p for p, t in enumerate(tokens)}
            todo = [int(g) for g in genes if int(g) in where]
            perturbed = embs([np.delete(tokens, where[g]) for g in todo])
            shift = cos(perturbed, goal) - cos(original, goal)
            shifts.update({(cell_id, g): float(s) for g, s in zip(todo, shift.cpu())})
    return shifts


class StubEvaluator:
    """An `Evaluator` stand-in returning random embeddings at once: times `perturb_cells`' own work."""

    def __init__(self, vocabulary: dict[str, int], hidden: int = 256, seed: int = 0):
        self.info = type("Info", (), {"vocabulary": vocabulary, "symbols": {}})()
        self.hidden, self.rng = hidden, np.random.default_rng(seed)

    def split(self, tokens):
        tokens = np.asarray(tokens, dtype=np.int64)
        return tokens[:0], tokens, tokens[:0]

    def embeddings(self, seqs, layer=-1):
        return self.rng.normal(size=(len(seqs), self.hidden)).astype(np.float32)


def library_overhead(n_cells: int, n_genes: int, vocab_size: int, seed: int) -> None:
    """`perturb_cells` over n_cells × every one of their n_genes random genes, the model stubbed."""
    import pandas as pd

    from cellrank_fm.inference import Cells
    from cellrank_fm.perturb import perturb_cells

    rng = np.random.default_rng(seed)
    tokens = [rng.choice(np.arange(2, vocab_size), size=n_genes, replace=False) for _ in range(n_cells + 2)]
    ids = [f"c{i}" for i in range(n_cells + 2)]
    cells = Cells(tokens, ids, pd.DataFrame({"state": ["start"] * n_cells + ["goal"] * 2}, index=ids))
    stub = StubEvaluator({f"G{i}": i for i in range(vocab_size)}, seed=seed)
    t0 = time.perf_counter()
    result = perturb_cells(stub, cells, state_column="state", start_state="start", goal_state="goal", quiet=True)
    print(f"perturb_cells without the model: {n_cells:,} cells x {n_genes:,} genes, {len(result.shifts):,} deletions, "
          f"{len(result.genes):,} genes tested, {time.perf_counter() - t0:.1f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="geneformer-v1")
    ap.add_argument("--sizes", default="256,2048", help="genes per cell, comma-separated")
    ap.add_argument("--cells", default="2,1", help="start cells per size (one value or one per size)")
    ap.add_argument("--max-genes", default="256,16", help="deletions per cell at most (one value or one per size)")
    ap.add_argument("--goal-cells", type=int, default=2)
    ap.add_argument("--tokens-per-batch", type=int, default=65536, help="ours (the CLI's default)")
    ap.add_argument("--forward-batch", type=int, default=100, help="the peer's minibatch (Geneformer's default)")
    ap.add_argument("--layer", type=int, default=-1)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each side, alternating; the best counts")
    ap.add_argument("--profile", action="store_true", help="cProfile ours and print the top entries")
    ap.add_argument("--overhead-cells", type=int, default=0,
                    help="instead: time perturb_cells' own work on this many cells of the first size (model stubbed)")
    args = ap.parse_args(argv)

    import pandas as pd
    import torch

    from cellrank_fm.checkpoint import ModelDirInfo
    from cellrank_fm.explain import Evaluator
    from cellrank_fm.hf import to_transformers
    from cellrank_fm.inference import Cells, autocast, prepare
    from cellrank_fm.model import BertForSequenceClassification, preset_config
    from cellrank_fm.perturb import perturb_cells

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.overhead_cells:
        library_overhead(args.overhead_cells, sizes[0], preset_config(args.preset).vocab_size, args.seed)
        return 0

    def per_size(text):
        vals = [int(x) for x in text.split(",")]
        return vals if len(vals) == len(sizes) else [vals[0]] * len(sizes)

    torch.manual_seed(args.seed)
    cfg = preset_config(args.preset, num_labels=2, pooling="mean", hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    device = torch.device(args.device)
    model = BertForSequenceClassification(cfg).to(device).eval()
    prepare(model, device)
    vocab = {f"G{i}": i for i in range(cfg.vocab_size)}
    info = ModelDirInfo(path=None, config=cfg, architecture=model.architecture, labels=["a", "b"],
                        cellrank={"special_tokens": {"pad": 0, "mask": 1}}, vocabulary=vocab)
    ev = Evaluator(model, info, args.tokens_per_batch)
    hf = to_transformers(model, head="none")
    hf_layer = args.layer if args.layer >= 0 else cfg.num_hidden_layers + 1 + args.layer
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    print(f"in silico deletion, preset {args.preset}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'genes/cell':>10s} {'cells':>5s} {'ours: perturbations':>19s} {'s':>7s} {'/s':>7s} "
          f"{'peer: perturbations':>19s} {'s':>7s} {'/s':>7s} {'ratio':>6s} {'max |Δshift|':>12s}")
    rng = np.random.default_rng(args.seed)
    ok = True
    for n, n_cells, max_genes in zip(sizes, per_size(args.cells), per_size(args.max_genes)):
        pool_ = rng.choice(np.arange(2, cfg.vocab_size), size=n, replace=False).astype(np.int64)
        start = [rng.permutation(pool_) for _ in range(n_cells)]
        goal = [rng.choice(np.arange(2, cfg.vocab_size), size=n, replace=False).astype(np.int64)
                for _ in range(args.goal_cells)]
        ids = [f"start{i}" for i in range(n_cells)] + [f"goal{i}" for i in range(args.goal_cells)]
        obs = pd.DataFrame({"state": ["start"] * n_cells + ["goal"] * args.goal_cells}, index=ids)
        cells = Cells(tokens=start + goal, cell_ids=ids, obs=obs)
        genes = pool_[:max_genes]
        gene_names = None if max_genes >= n else [f"G{g}" for g in genes]

        ours = partial(perturb_cells, ev, cells, state_column="state", start_state="start", goal_state="goal",
                       genes=gene_names, null_genes=2, layer=args.layer, seed=args.seed, quiet=True)
        peer_run = partial(geneformer_deletion, hf, dict(zip(ids, start)), goal, genes, hf_layer, args.forward_batch,
                           device)

        def peer(run=peer_run):
            with autocast(device):  # the precision ours runs in: bf16 on CUDA, fp32 on CPU
                return run()

        small = Cells(tokens=[start[0][:8], goal[0][:8]], cell_ids=["s", "g"],
                      obs=pd.DataFrame({"state": ["start", "goal"]}, index=["s", "g"]))
        perturb_cells(ev, small, state_column="state", start_state="start", goal_state="goal", quiet=True)  # warm-up
        geneformer_deletion(hf, {"s": start[0][:8]}, [goal[0][:8]], start[0][:8], hf_layer, args.forward_batch, device)

        ours_s = peer_s = float("inf")
        for rep in range(args.repeats):  # alternating, best of each: load from other jobs hits both alike
            profile = args.profile and rep == 0
            if profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.enable()
            sync()
            t0 = time.perf_counter()
            result = ours()
            sync()
            ours_s = min(ours_s, time.perf_counter() - t0)
            if profile:
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(15)
            t0 = time.perf_counter()
            want = peer()
            sync()
            peer_s = min(peer_s, time.perf_counter() - t0)

        shifts = result.shifts[~result.shifts["is_null"]]
        got = {(c, vocab[g]): s for c, g, s in zip(shifts["cell_id"], shifts["gene_id"], shifts["shift_goal"])}
        if set(got) != set(want):
            print(f"{n} genes: ours and the peer perturbed different (cell, gene) pairs", file=sys.stderr)
            ok = False
        diff = max(abs(got[k] - want[k]) for k in want if k in got)
        ok &= diff <= args.tol
        n_ours, n_peer = len(result.shifts), len(want)
        r_ours, r_peer = n_ours / ours_s, n_peer / peer_s
        print(f"{n:10,d} {n_cells:5d} {n_ours:19,d} {ours_s:7.1f} {r_ours:7.1f} "
              f"{n_peer:19,d} {peer_s:7.1f} {r_peer:7.1f} {r_ours / r_peer:5.2f}x {diff:12.1e}", flush=True)
    if not ok:
        print(f"MISMATCH: shifts differ by more than {args.tol}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
