"""The one GPU check: numerics, compile, and every throughput figure, in one short run.

    python benches/gpu_check.py --out gpu_check.json                 # one H100/H200, < 8 min
    python benches/gpu_check.py --device cpu --smoke --out check.json  # the CI dry run (tests)

Prints one table and writes one JSON. Exit status: 1 if any numerical check fails, 2 if a
part crashed (the others still run), else 0. Each part has a time box (seconds, below); timed
loops stop at their box after at least one timed step, and the figures say how many steps ran.

Parts:
- numerics: the packed varlen path against padded SDPA on the edge-case batches (cells of
  length 1, one cell, cells at the maximum length, mixed V1/V2 special tokens, after freezing
  layers): logits/loss and every gradient. fp32: the kernel is `accel.reference_varlen_attn`
  (the flash kernel has no fp32), tolerance 1e-5 × max(largest value compared, 1). bf16:
  the real kernel (on CPU the reference again) under autocast, tolerance 5e-2 relative. Plus
  the kernel itself against the reference on random packed q/k/v.
- compile: `torch.compile(dynamic=True)` against eager on batches of changing shapes: loss to
  1e-4 in fp32 (and 1e-2 in bf16 through the kernel on a GPU), at most 3 graphs compiled; and
  inference's `--compile` (the encoder compiled in place): cell embeddings against eager's,
  at most 4 graphs.
- pretrain: tokens/s, MFU and peak memory, ours (packed) vs `transformers.BertForMaskedLM`
  (SDPA, padded) on the same length-grouped batches, presets geneformer-v1 (65,536 tokens per
  step) and geneformer-v2-104m (262,144 on a GPU of 120 GiB or more, else 131,072), ours with
  and without compile; the peer accumulates each step in padded micro-batches of at most
  131,072 tokens, the most it holds in memory.
- finetune: cell-classifier training steps/s; inference: predict and embed cells/s.
- explain: the gene-deletion game as `explain` plays it (`permutation_values`, batches of up
  to 262,144 tokens: `explain --tokens-per-batch 262144`) on one 2,048-gene cell (geneformer-v1): two permutations timed, seconds
  per cell for 10, eager and with the encoder compiled (`--compile`); then the pathway game
  (150 synthetic gene sets as players, compiled), one permutation timed, seconds per cell for 10.
- perturb: in silico deletions/s at 2,048 genes (one cell's perturbed copies, in chunks until
  the box closes) and the extrapolated time for 1,500 cells × every expressed gene; the peer:
  200 deletions of the same cell done Geneformer's way (`benches/perturb.py`'s
  `geneformer_deletion`: padded minibatches of 100 through `transformers.BertModel`, same
  weights, same autocast).

Input: synthetic cells (random gene tokens), lengths uniform between 1/8 of the preset's input
size and the full size, so the check needs no data files. The smoke run uses a tiny model and
short cells on the CPU; its figures mean nothing, it only keeps every code path alive.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cellrank_fm import accel
from cellrank_fm import model as model_mod
from cellrank_fm.batching import MaskingSpec, mask_genes, pack, token_budget_batches
from cellrank_fm.model import (BertForMaskedLM, BertForSequenceClassification, ModelConfig, flops_per_token,
                               preset_config)

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
# Seconds per part on the GPU (the whole run fits in 8 minutes with start-up).
BUDGET = {"numerics": 30, "compile": 90, "pretrain": 120, "finetune": 20, "inference": 20, "explain": 30,
          "perturb": 30}
# The peer's padded micro-batches (accumulated into one step): it held 131,072 padded tokens of
# geneformer-v2-104m in 74 GiB, and twice that does not fit one H200.
PEER_MICRO_TOKENS = 131072
TARGETS = {"pretrain_speedup_v2": 2.0, "pretrain_mfu_v2": 0.35, "shap_s_per_cell": 5.0, "perturb_job_h": 1.0}


class Check:
    """Collects the table rows, the JSON record and the numerical verdicts."""

    def __init__(self, device: torch.device, smoke: bool):
        self.device, self.smoke = device, smoke
        self.rows: list[tuple[str, str, str, str, str, str]] = []
        self.record: dict = {"device": _device_name(device), "torch": torch.__version__, "smoke": smoke,
                             "python": platform.python_version(), "parts": {}, "checks": []}
        self.mismatches = 0
        self.crashes = 0

    def row(self, part, what, on, ours, peer="", verdict=""):
        self.rows.append((part, what, on, ours, peer, verdict))
        # Each row also as it comes: a run cut off by its time limit still leaves its figures.
        print(f"[{part}] " + " | ".join(str(c) for c in (what, on, ours, peer, verdict) if c), flush=True)

    def compare(self, name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> bool:
        """|got − want| ≤ rtol × max(max|want|, 1): relative for large values, absolute (rtol) for
        small ones, e.g. the key-bias gradient, which is zero in exact arithmetic (softmax ignores
        a shift shared by all keys) and only rounding noise in practice."""
        got, want = got.detach().float().cpu(), want.detach().float().cpu()
        scale = max(want.abs().max().item(), 1.0)
        err = (got - want).abs().max().item()
        ok = bool(np.isfinite(err)) and err <= rtol * scale
        self.record["checks"].append({"name": name, "max_abs_diff": err, "scale": scale, "rtol": rtol, "ok": ok})
        self.mismatches += not ok
        return ok

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def _peak(device):
    name = _device_name(device)
    return next((p for k, p in PEAK_BF16.items() if k in name), None)


def _timed(check: Check, fn, items, budget_s: float, warmup: int = 1):
    """Run fn over items (cycled) after `warmup` calls; stop at the time box. (seconds, calls)."""
    for i in range(warmup):
        fn(items[i % len(items)])
    check.sync()
    t0 = time.perf_counter()
    calls = 0
    while calls < len(items) and (calls == 0 or time.perf_counter() - t0 < budget_s):
        fn(items[(warmup + calls) % len(items)])
        calls += 1
        if calls % 4 == 0:
            check.sync()
    check.sync()
    return time.perf_counter() - t0, calls


def _cells(rng, n_cells, max_len, vocab, low=4, min_len=None):
    lo = min_len or max(1, max_len // 8)
    return [rng.integers(low, vocab, size=int(n)) for n in rng.integers(lo, max_len + 1, size=n_cells)]


# ----------------------------------------------------------------------------- numerics


def _edge_cases(rng, max_len, vocab, cls_id, eos_id):
    genes = lambda n: rng.integers(4, vocab, size=n)  # noqa: E731
    return {
        "length-1 cells": ("mlm", [genes(1), genes(1), genes(9), genes(1)], 0),
        "one cell": ("mlm", [genes(max_len // 2)], 0),
        "cells at max length": ("mlm", [genes(max_len), genes(max_len), genes(5)], 0),
        "mixed V1/V2 specials": ("cls", [np.r_[cls_id, genes(7), eos_id], genes(5), np.r_[cls_id, eos_id], genes(1),
                                         np.r_[cls_id, genes(max_len - 2), eos_id]], 0),
        "freeze-layers 1": ("cls", [genes(max_len), genes(1), genes(6)], 1),
    }


def _forward_backward(model, kind, batch, labels, precision):
    model.zero_grad(set_to_none=True)
    with precision.autocast():
        if kind == "mlm":
            loss, logits, _ = model(batch, labels=labels)
        else:
            logits = model(batch)
            loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    return logits.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def part_numerics(check: Check, budget_s: float) -> dict:
    from cellrank_fm.finetune import freeze_layers

    dev = check.device
    real_kernel = model_mod._varlen_attn
    max_len = 64 if check.smoke else 512
    cfg = ModelConfig(vocab_size=64 if check.smoke else 2048, hidden_size=64 if check.smoke else 256,
                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=128 if check.smoke else 512,
                      max_position_embeddings=max_len, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      initializer_range=0.1, pooling="mean", special_token_ids=[2, 3], num_labels=3)
    rng = np.random.default_rng(0)
    out: dict = {"cases": {}}
    bf16 = accel.Precision(dev, torch.bfloat16)
    bf16_reason = accel.varlen_support(dev, torch.bfloat16, cfg.hidden_size // cfg.num_attention_heads)
    out["bf16_kernel"] = "reference (no flash kernel here: " + bf16_reason + ")" if bf16_reason else "varlen_attn"
    t0 = time.perf_counter()
    for name, (kind, cells, frozen) in _edge_cases(rng, max_len, cfg.vocab_size, 2, 3).items():
        if time.perf_counter() - t0 > budget_s:
            check.row("numerics", name, "", "not run (time box)")
            continue
        torch.manual_seed(0)
        model = (BertForMaskedLM if kind == "mlm" else BertForSequenceClassification)(cfg).to(dev).train()
        freeze_layers(model, frozen)
        batch = pack(cells, dev)
        if kind == "mlm":
            labels = torch.where(torch.rand(batch.num_tokens, device=dev) < 0.5, batch.input_ids, -100)
            labels[0] = batch.input_ids[0]
        else:
            labels = torch.as_tensor(rng.integers(0, 3, size=batch.num_seqs), device=dev)
        oks = []
        for label, precision, kernel, rtol in (
            ("fp32", accel.Precision(dev, torch.float32), accel.reference_varlen_attn, 1e-5),
            ("bf16", bf16, accel.reference_varlen_attn if bf16_reason else real_kernel, 5e-2),
        ):
            model.set_attn_impl("sdpa")
            want_logits, want_grads = _forward_backward(model, kind, batch, labels, precision)
            model_mod._varlen_attn = kernel
            try:
                model.set_attn_impl("varlen")
                got_logits, got_grads = _forward_backward(model, kind, batch, labels, precision)
            finally:
                model_mod._varlen_attn = real_kernel
            ok = check.compare(f"{name} {label} output", got_logits, want_logits, rtol)
            for pname in want_grads:
                ok &= check.compare(f"{name} {label} grad {pname}", got_grads[pname], want_grads[pname], rtol)
            oks.append(ok)
        out["cases"][name] = {"fp32": oks[0], "bf16": oks[1]}
        check.row("numerics", f"varlen vs padded SDPA: {name}", f"{len(cells)} cells",
                  "fp32 " + ("ok" if oks[0] else "MISMATCH") + ", bf16 " + ("ok" if oks[1] else "MISMATCH"),
                  verdict="pass" if all(oks) else "FAIL")
    # The kernel alone against the reference, bf16, on random packed q/k/v.
    if not bf16_reason:
        lengths = [1, 7, 300, 64, 2048]
        cu = torch.tensor(np.r_[0, np.cumsum(lengths)], dtype=torch.int32, device=dev)
        q, k, v = (torch.randn(sum(lengths), 4, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
        ok = check.compare("kernel vs reference bf16", real_kernel(q, k, v, cu, cu, 2048, 2048),
                           accel.reference_varlen_attn(q, k, v, cu, cu, 2048, 2048), 3e-2)
        check.row("numerics", "varlen_attn vs reference (bf16)", "5 cells, 1-2,048 tokens", "ok" if ok else "MISMATCH",
                  verdict="pass" if ok else "FAIL")
    return out


# ----------------------------------------------------------------------------- compile


def part_compile(check: Check, budget_s: float) -> dict:
    from torch._dynamo.utils import counters

    dev = check.device
    cfg = preset_config("tiny", vocab_size=64) if check.smoke else preset_config(
        "geneformer-v1", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rng = np.random.default_rng(1)
    max_len = 32 if check.smoke else 2048
    spec = MaskingSpec(cfg.vocab_size, 1, (0, 1, 2, 3))
    batches = []
    for n in ([1, 3, 2, 4] if check.smoke else [1, 8, 3, 16, 5, 12]):
        b = pack(_cells(rng, n, max_len, cfg.vocab_size))
        ids, labels = mask_genes(b.input_ids.numpy(), spec, rng)
        b.input_ids, b.labels = torch.from_numpy(ids), torch.from_numpy(labels)
        batches.append(b.to(dev))
    # fp32 on padded SDPA to 1e-4; on a GPU with the kernel also bf16 through varlen_attn (a
    # custom op that must trace), to 1e-2 since fused kernels round differently in bf16.
    runs = [("fp32", accel.Precision(dev, torch.float32), "sdpa", 1e-4)]
    if accel.varlen_support(dev, torch.bfloat16, cfg.hidden_size // cfg.num_attention_heads) is None:
        runs.append(("bf16", accel.Precision(dev, torch.bfloat16), "auto", 1e-2))
    out = {}
    for label, precision, requested, rtol in runs:
        accel.configure_backends(precision)
        torch.manual_seed(0)
        model = BertForMaskedLM(cfg).to(dev).eval()
        impl, _ = accel.choose_attention(model, precision, requested=requested)
        with torch.no_grad(), precision.autocast():
            eager = [model(b, labels=b.labels)[0].item() for b in batches]
        torch._dynamo.reset()
        before = counters["stats"]["unique_graphs"]
        # The smoke run traces and counts graphs without inductor's code generation (minutes
        # on a small CPU); tests/test_accel.py compiles with inductor through the training loop.
        compiled = accel.compile_model(model, backend="aot_eager" if check.smoke else "inductor")
        t0 = time.perf_counter()
        with torch.no_grad(), precision.autocast():
            got = [compiled(b, labels=b.labels)[0].item() for b in batches]
        seconds = time.perf_counter() - t0
        graphs = counters["stats"]["unique_graphs"] - before
        err = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, eager))
        ok = err <= rtol
        bounded = graphs <= 3  # not one graph per batch shape
        check.record["checks"].append({"name": f"compile vs eager loss {label}", "max_rel_diff": err, "rtol": rtol,
                                       "graphs": graphs, "ok": ok and bounded})
        check.mismatches += not (ok and bounded)
        check.row("compile", f"torch.compile vs eager ({label} loss, {impl})", f"{len(batches)} batches of changing shape",
                  f"rel. diff {err:.1e}, {graphs} graphs, {seconds:.0f} s", verdict="pass" if ok and bounded else "FAIL")
        out[label] = {"max_rel_diff": err, "graphs": graphs, "seconds": seconds, "ok": ok, "graphs_bounded": bounded}
    out["inference"] = _compiled_inference(check, cfg, max_len)
    return out


def _compiled_inference(check: Check, cfg, max_len: int) -> dict:
    """`--compile` for predict / embed / explain / perturb: the encoder compiled in place
    (`accel.compile_encoder`) against eager, cell embeddings in the device's inference precision
    (bf16 through the kernel on a GPU: 2e-2; fp32 on CPU: 1e-4), over batches of changing shape."""
    from torch._dynamo.utils import counters

    from cellrank_fm.inference import embed_tokens, prepare

    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg.replace(num_labels=2, pooling="mean")).to(check.device).eval()
    prepare(model, check.device)
    rng = np.random.default_rng(2)
    cells = _cells(rng, 24, max_len, cfg.vocab_size)
    budget = 4 * max_len  # several batches of 1 to 8 cells
    eager = embed_tokens(model, cells, tokens_per_batch=budget)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    accel.compile_encoder(model, backend="aot_eager" if check.smoke else "inductor")
    t0 = time.perf_counter()
    got = embed_tokens(model, cells, tokens_per_batch=budget)
    seconds = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"] - before
    label = "bf16" if check.device.type == "cuda" else "fp32"
    rtol = 2e-2 if label == "bf16" else 1e-4
    err = float(np.abs(got - eager).max() / max(np.abs(eager).max(), 1.0))
    ok = err <= rtol and graphs <= 4
    check.record["checks"].append({"name": f"compiled inference vs eager embeddings {label}", "max_rel_diff": err,
                                   "rtol": rtol, "graphs": graphs, "ok": ok})
    check.mismatches += not ok
    check.row("compile", f"compiled encoder vs eager (embed, {label})", f"{len(cells)} cells, changing batch shapes",
              f"rel. diff {err:.1e}, {graphs} graphs, {seconds:.0f} s", verdict="pass" if ok else "FAIL")
    return {"max_rel_diff": err, "graphs": graphs, "seconds": seconds, "ok": ok}


# ----------------------------------------------------------------------------- throughput


def _pretrain_batches(cfg, rng, smoke, n_batches, tpb):
    """Length-grouped token-budget batches of synthetic cells, masked: [(cells, ids, labels)]."""
    max_len = 48 if smoke else min(cfg.max_position_embeddings, 4096)
    cells = _cells(rng, 64 if smoke else 4 * n_batches * tpb // max_len, max_len, cfg.vocab_size)
    spec = MaskingSpec(cfg.vocab_size, 1, (0, 1, 2, 3))
    lengths = np.array([len(c) for c in cells])
    out = []
    for idx in token_budget_batches(lengths, tpb, seed=0)[:n_batches]:
        chosen = [cells[i] for i in idx]
        ids, labels = mask_genes(pack(chosen).input_ids.numpy(), spec, rng)
        out.append((chosen, ids, labels))
    mean_len = float((lengths**2).sum() / lengths.sum())  # the sequence length a token sees
    return out, mean_len


def _tokens_per_batch(cfg, device, smoke) -> int:
    """The batch each preset is timed at (tokens per optimizer step).

    The 104M model is judged at 262,144 tokens per step where the GPU holds it (one H200,
    compiled: MFU 31.6% at 65,536, 33.0-34.9% at 131,072, 36.2% at 262,144 tokens, as a step's
    fixed cost weighs less); 131,072 on smaller GPUs (eager at 131,072 took 42 GiB)."""
    if smoke:
        return 512
    if cfg.hidden_size < 768:
        return 65536
    big = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= 120 * 2**30
    return 262144 if big else 131072


def _peer_micro_batches(cells, ids, labels, max_tokens):
    """One step's cells as padded `transformers` inputs, split into micro-batches of at most
    `max_tokens` padded tokens (accumulated into one step), each loss weighted by its share of
    the step's masked genes: padding makes the peer's memory grow with the longest cell, and it
    cannot hold a step that the packed model holds."""
    b = pack(cells)
    ids, labels = b.padded(torch.from_numpy(ids)), b.padded(torch.from_numpy(labels), fill=-100)
    mask = b.key_mask.long()
    rows = max(1, max_tokens // ids.shape[1])
    total = int((labels != -100).sum())
    out = []
    for i in range(0, ids.shape[0], rows):
        keep = mask[i:i + rows]
        width = int(keep.sum(1).max())
        part = labels[i:i + rows, :width].contiguous()
        out.append(dict(input_ids=ids[i:i + rows, :width].contiguous(), attention_mask=keep[:, :width].contiguous(),
                        labels=part,
                        _weight=int((part != -100).sum()) / max(total, 1), _tokens=int(keep.sum())))
    return out


def _train_rate(check, model, loss_fn, batches, tokens, budget_s, precision):
    """Optimizer steps over `batches` (each a list of micro-batches, accumulated) in the box:
    (tokens/s, steps, seconds, peak GiB)."""
    from cellrank_fm.train import TrainConfig, make_optimizer

    opt = make_optimizer(model, TrainConfig(), check.device)

    def step(micros):
        for m in micros:
            with precision.autocast():
                loss = loss_fn(m)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if check.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(check.device)
    seconds, calls = _timed(check, step, batches, budget_s, warmup=2)
    n_tokens = sum(tokens(m) for i in range(calls) for m in batches[(2 + i) % len(batches)])
    mem = torch.cuda.max_memory_allocated(check.device) / 2**30 if check.device.type == "cuda" else None
    return n_tokens / seconds, calls, seconds, mem


def part_pretrain(check: Check, budget_s: float) -> dict:
    import transformers
    from torch._dynamo.utils import counters

    dev = check.device
    precision = accel.resolve_precision(dev)
    accel.configure_backends(precision)
    peak = _peak(dev)
    presets = ["tiny"] if check.smoke else ["geneformer-v1", "geneformer-v2-104m"]
    runs = [("ours", False), ("ours", True), ("transformers", False)]
    share = budget_s / (len(presets) * len(runs))
    out: dict = {}
    for preset in presets:
        cfg = preset_config(preset, vocab_size=64 if preset == "tiny" else None, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        tpb = _tokens_per_batch(cfg, dev, check.smoke)
        data, mean_len = _pretrain_batches(cfg, np.random.default_rng(2), check.smoke, 12, tpb)
        fpt = flops_per_token(cfg, mean_len, masked_fraction=0.15)
        res = {}
        for who, compiled in runs:
            torch.manual_seed(0)
            if who == "ours":
                model = BertForMaskedLM(cfg).to(dev).train()
                impl, _ = accel.choose_attention(model, precision, training=True)
                run = accel.compile_model(model) if compiled else model
                batches = []
                for cells, ids, labels in data:
                    b = pack(cells)
                    b.input_ids, b.labels = torch.from_numpy(ids), torch.from_numpy(labels)
                    batches.append([b.to(dev)])
                graphs = counters["stats"]["unique_graphs"]
                # A fresh copy per step, as a training loop makes: a batch that went through once
                # carries cached index tensors, which a compiled model's guards treat as a new input.
                tps, steps, _, mem = _train_rate(
                    check, model, lambda b, run=run: run(dataclasses.replace(b), labels=b.labels)[0], batches,
                    lambda b: b.num_tokens, share, precision)
                graphs = counters["stats"]["unique_graphs"] - graphs  # recompiles would distort the rate
                name = f"ours (packed, {impl}{', compiled' if compiled else ''})"
            else:
                hf_cfg = transformers.BertConfig(**cfg.hf_dict("BertForMaskedLM"))
                model = transformers.BertForMaskedLM._from_config(hf_cfg, attn_implementation="sdpa").to(dev).train()
                micro = PEER_MICRO_TOKENS // (512 if check.smoke else 1)
                batches = [[{k: v.to(dev) if torch.is_tensor(v) else v for k, v in m.items()}
                            for m in _peer_micro_batches(*d, micro)] for d in data]
                peer_micro = max(len(b) for b in batches)
                tps, steps, _, mem = _train_rate(
                    check, model, lambda m, model=model: model(**{k: v for k, v in m.items() if k[0] != "_"}).loss
                    * m["_weight"], batches, lambda m: m["_tokens"], share, precision)
                name = "transformers BertForMaskedLM (SDPA, padded)"
            mfu = None if peak is None else tps * fpt / peak
            res[name] = {"tokens_per_s": tps, "mfu": mfu, "peak_mem_gib": mem, "timed_steps": steps}
            if who == "ours" and compiled:
                res[name]["graphs"] = graphs
            if who == "transformers":
                res[name]["micro_batches_per_step"] = peer_micro
            print(f"[pretrain] {preset}, {name}: {tps:,.0f} tok/s over {steps} steps"
                  f"{f', {graphs} graphs' if who == 'ours' and compiled else ''}", flush=True)
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        hf = res["transformers BertForMaskedLM (SDPA, padded)"]["tokens_per_s"]
        for name, r in res.items():
            r["vs_transformers"] = r["tokens_per_s"] / hf
            verdict = ""
            if preset == "geneformer-v2-104m" and name.startswith("ours"):
                met = r["vs_transformers"] >= TARGETS["pretrain_speedup_v2"] and (r["mfu"] or 0) >= TARGETS["pretrain_mfu_v2"]
                verdict = "target met" if met else "target missed (>=2x, >=35% MFU)"
            mfu = "" if r["mfu"] is None else f", MFU {100 * r['mfu']:.1f}%"
            mem = "" if r["peak_mem_gib"] is None else f", {r['peak_mem_gib']:.1f} GiB"
            acc = f", in {r['micro_batches_per_step']} micro-batches" if r.get("micro_batches_per_step", 1) > 1 else ""
            check.row("pretrain", name, f"{preset}, {tpb:,} tok/batch{acc}, {precision.name}",
                      f"{r['tokens_per_s']:,.0f} tok/s{mfu}{mem}", f"{r['vs_transformers']:.2f}x transformers", verdict)
        out[preset] = res
    return out


def part_finetune(check: Check, budget_s: float) -> dict:
    dev = check.device
    precision = accel.resolve_precision(dev)
    cfg = preset_config("tiny", vocab_size=64, num_labels=3) if check.smoke else preset_config(
        "geneformer-v1", num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).to(dev).train()
    impl, _ = accel.choose_attention(model, precision, training=True)
    rng = np.random.default_rng(3)
    max_len = 48 if check.smoke else 2048
    tpb = 512 if check.smoke else 65536
    cells = _cells(rng, 64 if check.smoke else 512, max_len, cfg.vocab_size)
    lengths = np.array([len(c) for c in cells])
    batches = [pack([cells[i] for i in idx], dev, labels=rng.integers(0, 3, size=len(idx))).to(dev)
               for idx in token_budget_batches(lengths, tpb, seed=0)[:8]]
    batches = [[b] for b in batches]
    _, steps, seconds, _ = _train_rate(check, model, lambda b: F.cross_entropy(model(b).float(), b.labels), batches,
                                       lambda b: b.num_tokens, budget_s, precision)
    rate = steps / seconds
    check.row("finetune", f"cell classifier training ({impl})", f"{cfg.num_hidden_layers} layers, {tpb:,} tok/batch",
              f"{rate:.2f} steps/s")
    return {"steps_per_s": rate, "tokens_per_batch": tpb, "attention": impl, "timed_steps": steps}


def _classifier(check, cfg):
    from cellrank_fm.inference import prepare

    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).to(check.device).eval()
    prepare(model, check.device)
    return model


def part_inference(check: Check, budget_s: float) -> dict:
    from cellrank_fm.inference import embed_tokens, predict_tokens

    cfg = preset_config("tiny", vocab_size=64, num_labels=3, pooling="mean") if check.smoke else preset_config(
        "geneformer-v1", num_labels=3, pooling="mean")
    model = _classifier(check, cfg)
    rng = np.random.default_rng(4)
    cells = _cells(rng, 64 if check.smoke else 2048, 48 if check.smoke else 2048, cfg.vocab_size)
    predict_tokens(model, cells[:8])  # warm-up
    out = {}
    for name, fn in (("predict", lambda c: predict_tokens(model, c)),
                     ("embed", lambda c: embed_tokens(model, c, special_ids=[]))):
        n = len(cells)
        check.sync()
        t0 = time.perf_counter()
        fn(cells)
        check.sync()
        rate = n / (time.perf_counter() - t0)
        out[name] = {"cells_per_s": rate, "cells": n}
        check.row("inference", f"{name} cells/s", f"{n:,} cells, mean {np.mean([len(c) for c in cells]):.0f} genes",
                  f"{rate:,.0f} cells/s")
    return out


def _evaluator(check, cfg):
    from cellrank_fm.checkpoint import ModelDirInfo
    from cellrank_fm.explain import Evaluator

    model = _classifier(check, cfg)
    info = ModelDirInfo(path=None, config=cfg, architecture=model.architecture, labels=["a", "b"],
                        cellrank={"special_tokens": {"pad": 0, "mask": 1}})
    return Evaluator(model, info, tokens_per_batch=4096 if check.smoke else 262144)


def _chunks(seqs, size):
    return [seqs[i:i + size] for i in range(0, len(seqs), size)]


def part_explain(check: Check, budget_s: float) -> dict:
    from cellrank_fm.explain import permutation_values
    from cellrank_fm.pathways import pathway_values

    cfg = preset_config("tiny", vocab_size=64, num_labels=2, pooling="mean") if check.smoke else preset_config(
        "geneformer-v1", num_labels=2, pooling="mean")
    ev = _evaluator(check, cfg)
    rng = np.random.default_rng(5)
    n = 48 if check.smoke else 2048
    genes = rng.choice(np.arange(4, cfg.vocab_size), size=n, replace=check.smoke)
    cell = np.asarray(genes, dtype=np.int64)
    # The gene game as `explain` plays it: antithetic permutations of 2n+1 evaluations each, in
    # the evaluator's token budget. Two permutations timed; a default run has ten.
    out: dict = {"genes": n}
    for label in ("eager", "compiled"):
        if label == "compiled":  # explain --compile: the encoder compiled in place
            accel.compile_encoder(ev.model, backend="aot_eager" if check.smoke else "inductor")
        permutation_values(ev, cell, [0], npermutations=2, seed=1)  # warm-up (and the compile)
        ev.evaluations = 0
        check.sync()
        t0 = time.perf_counter()
        permutation_values(ev, cell, [0], npermutations=2, seed=0)
        check.sync()
        secs = time.perf_counter() - t0
        per_cell = secs * 5
        met = per_cell <= TARGETS["shap_s_per_cell"]
        check.row("explain", f"gene game s/cell ({label})", f"{cfg.num_hidden_layers}-layer model, {n:,} genes",
                  f"{ev.evaluations / secs:,.1f} evals/s, {per_cell:,.1f} s/cell (10 permutations)",
                  verdict="" if check.smoke else ("target met" if met else "target missed (<= 5 s/cell)"))
        out[label] = {"evaluations_per_s": ev.evaluations / secs, "seconds_per_cell": per_cell}
    out["seconds_per_cell"] = min(out["eager"]["seconds_per_cell"], out["compiled"]["seconds_per_cell"])

    # The pathway game: gene sets are the players (genes in no set stay); synthetic sets of 10 to
    # 40 genes, half of each from the cell, like MitoCarta's ~150 leaf pathways on a 2,048-gene cell.
    n_sets = 8 if check.smoke else 150
    token_sets = [np.concatenate([rng.choice(genes, size=k // 2, replace=False),
                                  rng.choice(np.arange(4, cfg.vocab_size), size=k - k // 2)])
                  for k in rng.integers(10, 41, size=n_sets)]
    pathway_values(ev, cell[:8], token_sets[:2], [0], npermutations=1)  # warm-up
    ev.evaluations = 0
    check.sync()
    t0 = time.perf_counter()
    sv = pathway_values(ev, cell, token_sets, [0], npermutations=1, seed=0)
    check.sync()
    secs = time.perf_counter() - t0
    players = len(sv.players)
    # 10 permutations cost about 10x one (the two ends, run once per cell, are counted ten
    # times: a slight overestimate); few sets are played exactly, in the one call timed.
    set_per_cell = secs if sv.exact else secs * 10
    check.row("explain", "pathway game s/cell (compiled)", f"{n:,} genes, {players} sets playing",
              f"{ev.evaluations / secs:,.1f} evals/s, {set_per_cell:,.1f} s/cell (10 permutations)")
    out["pathway_game"] = {"sets_playing": players, "evaluations_per_s": ev.evaluations / secs,
                           "seconds_per_cell": set_per_cell, "exact": bool(sv.exact), "compiled": True}
    return out


def part_perturb(check: Check, budget_s: float) -> dict:
    from cellrank_fm.perturb import _perturbed

    cfg = preset_config("tiny", vocab_size=64, num_labels=2, pooling="mean") if check.smoke else preset_config(
        "geneformer-v1", num_labels=2, pooling="mean")
    ev = _evaluator(check, cfg)
    rng = np.random.default_rng(6)
    n = 48 if check.smoke else 2048
    genes = rng.integers(4, cfg.vocab_size, size=n)
    empty = np.array([], dtype=np.int64)
    count = 16 if check.smoke else 2048
    chunk = 4 if check.smoke else 128
    # One cell's deletions, as perturb runs them: every copy one gene shorter, embedded together.
    seqs = _perturbed(empty, genes, empty, [np.array([p]) for p in range(count)], "delete")
    secs, calls = _timed(check, ev.embeddings, _chunks(seqs, chunk), budget_s)
    rate = calls * chunk / secs
    job_h = 1500 * n / rate / 3600
    met = job_h <= TARGETS["perturb_job_h"]

    # The peer: Geneformer's way (benches/perturb.py), the same weights through transformers in
    # the same precision, on the first `peer_count` deletions of the same cell.
    from cellrank_fm.hf import to_transformers
    from cellrank_fm.inference import autocast

    geneformer_deletion = _bench_module("perturb").geneformer_deletion
    hf = to_transformers(ev.model, head="none")
    peer_count = 8 if check.smoke else 200
    cell = np.asarray(genes, dtype=np.int64)
    with autocast(check.device):
        geneformer_deletion(hf, {"c": cell[:8]}, [cell[:8]], cell[:4], -1, 100, check.device)  # warm-up
        check.sync()
        t0 = time.perf_counter()
        geneformer_deletion(hf, {"c": cell}, [cell], np.unique(cell)[:peer_count], -1, 100, check.device)
        check.sync()
    peer_rate = peer_count / (time.perf_counter() - t0)
    check.row("perturb", "deletions/s (embedding each perturbed cell)", f"{n:,} genes per cell",
              f"{rate:,.1f}/s; 1,500 cells x {n:,} genes: {job_h:,.2f} h",
              f"Geneformer-style via transformers: {peer_rate:,.1f}/s ({rate / peer_rate:.2f}x); "
              "users report ~60 h on an A100",
              "" if check.smoke else ("target met" if met else "target missed (<= 1 h)"))
    return {"perturbations_per_s": rate, "genes": n, "perturbations_timed": calls * chunk, "job_hours_1500_cells": job_h,
            "peer_perturbations_per_s": peer_rate, "peer_perturbations_timed": peer_count}


def _bench_module(name: str):
    """Another script of benches/, loaded by path (the check also runs loaded by path, in tests)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PARTS = {"numerics": part_numerics, "compile": part_compile, "pretrain": part_pretrain, "finetune": part_finetune,
         "inference": part_inference, "explain": part_explain, "perturb": part_perturb}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny models and inputs: checks the script runs, not speed")
    ap.add_argument("--out", default="gpu_check.json", help="where the JSON record goes")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    check = Check(device, args.smoke)
    started = time.perf_counter()
    for name in args.parts.split(","):
        budget = BUDGET[name] / (10 if args.smoke else 1)
        t0 = time.perf_counter()
        try:
            check.record["parts"][name] = PARTS[name](check, budget)
        except Exception as err:  # noqa: BLE001 - one broken part must not hide the others' figures
            check.crashes += 1
            check.record["parts"][name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            check.row(name, "CRASHED", "", f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}",
                      verdict="FAIL")
            traceback.print_exc(file=sys.stderr)
        check.record["parts"][name]["seconds"] = time.perf_counter() - t0
        Path(args.out).write_text(json.dumps(check.record, indent=1, default=_json_default))  # so far
        if device.type == "cuda":
            torch.cuda.empty_cache()
    check.record.update(seconds=time.perf_counter() - started, mismatches=check.mismatches, crashes=check.crashes,
                        ok=check.mismatches == 0 and check.crashes == 0)

    print(f"GPU check on {check.record['device']}, torch {torch.__version__}"
          f"{' (smoke run: figures mean nothing)' if args.smoke else ''}, {check.record['seconds']:.0f} s")
    header = ("part", "measure", "input", "ours", "peer", "verdict")
    widths = [max(len(str(r[i])) for r in [header, *check.rows]) for i in range(6)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in check.rows:
        print(line(r))
    failed = [c["name"] for c in check.record["checks"] if not c["ok"]]
    if failed:
        print(f"\nNUMERICAL MISMATCH in {len(failed)} checks, first: {failed[0]}", file=sys.stderr)
    Path(args.out).write_text(json.dumps(check.record, indent=1, default=_json_default))
    print(f"\nJSON: {args.out}")
    return 1 if check.mismatches else 2 if check.crashes else 0


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
