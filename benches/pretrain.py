"""Pretraining throughput: our model against transformers.BertForMaskedLM, same shards, same device.

Both train the same configuration (a preset) with AdamW on the same length-grouped,
token-budget batches with the same masking: ours packed (varlen flash attention on CUDA,
padded SDPA with a key mask on CPU) and the vocabulary projection on masked positions only;
transformers as its users run it, padded [B, L] batches with attention_mask and
`attn_implementation="sdpa"`. bf16 autocast on CUDA for both, fp32 on CPU.

Tokens/s counts real (unpadded) tokens. MFU = tokens/s × model FLOPs per token / peak, with
the same FLOPs per token for both: 6 × (non-embedding matmul parameters) + 12 × layers ×
hidden × mean sequence length (attention), + the vocabulary projection for the 15% of tokens
that are predicted. Peak: dense bf16 of the device (H100/H200 SXM 989 TFLOP/s); n/a on CPU.

    python benches/pretrain.py SHARDS --preset geneformer-v1 --device cuda --steps 50
    python benches/pretrain.py --preset tiny --device cpu --steps 10 --model-input-size 256

Without SHARDS, ../shared/data/sc/kang2017_pbmc_ifnb_2k.h5ad is tokenized into a temporary
directory (V1 or V2 vocabulary to match the preset).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from cellrank_fm.batching import MaskingSpec, mask_genes, pack, token_budget_batches
from cellrank_fm.model import BertForMaskedLM, flops_per_token, preset_config
from cellrank_fm.pretrain import masking_spec
from cellrank_fm.shards import ShardSet
from cellrank_fm.train import TrainConfig, make_optimizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, f"CPU ({torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak, name
    return None, name


def make_shards(preset: str, model_input_size: int | None, tmp: Path) -> Path:
    from cellrank_fm.tokenize import Dictionaries, TokenizeSettings, tokenize_files

    v2 = preset.startswith("geneformer-v2")
    tag = "gc104M" if v2 else "gc30M"
    g = DATA / "geneformer"
    dicts = Dictionaries.load(g / f"token_dictionary_{tag}.pkl", g / f"gene_median_dictionary_{tag}.pkl", [], None, None)
    settings = TokenizeSettings(model_version="v2" if v2 else "v1", model_input_size=model_input_size, gene_id_column="ensembl_id")
    out = tmp / "shards"
    tokenize_files([DATA / "sc" / "kang2017_pbmc_ifnb_2k.h5ad"], out, dicts, settings, quiet=True)
    return out


def batches_for(shards: ShardSet, spec: MaskingSpec, tokens_per_batch: int, count: int, seed: int):
    plan = token_budget_batches(shards.lengths, tokens_per_batch, shuffle=True, seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        cells = shards.tokens(plan[i % len(plan)])
        b = pack(cells)
        ids, labels = mask_genes(b.input_ids.numpy(), spec, rng)
        out.append((cells, ids, labels))
    return out


def run_ours(cfg, data, device, steps, warmup, bf16):
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg).to(device).train()
    opt = make_optimizer(model, TrainConfig(), device)
    prepared = []
    for cells, ids, labels in data:
        b = pack(cells)
        b.input_ids, b.labels = torch.from_numpy(ids), torch.from_numpy(labels)
        prepared.append(b.to(device))
    return _timed(lambda b: model(b, labels=b.labels)[0], prepared, opt, device, steps, warmup, bf16)


def run_hf(cfg, data, device, steps, warmup, bf16):
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(**cfg.hf_dict("BertForMaskedLM"))
    model = transformers.BertForMaskedLM._from_config(hf_cfg, attn_implementation="sdpa").to(device).train()
    opt = make_optimizer(model, TrainConfig(), device)
    prepared = []
    for cells, ids, labels in data:
        b = pack(cells)
        prepared.append(dict(
            input_ids=b.padded(torch.from_numpy(ids)).to(device),
            attention_mask=b.key_mask.long().to(device),
            labels=b.padded(torch.from_numpy(labels), fill=-100).to(device),
            _tokens=b.num_tokens,
        ))

    def loss(inputs):
        kw = {k: v for k, v in inputs.items() if not k.startswith("_")}
        return model(**kw).loss

    return _timed(loss, prepared, opt, device, steps, warmup, bf16)


def _timed(loss_fn, batches, opt, device, steps, warmup, bf16):
    def tokens(b):
        return b["_tokens"] if isinstance(b, dict) else b.num_tokens

    def step(b):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            loss = loss_fn(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"] + opt.param_groups[1]["params"], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(warmup):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n_tokens = 0
    for i in range(steps):
        b = batches[(warmup + i) % len(batches)]
        step(b)
        n_tokens += tokens(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return n_tokens / seconds, mem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shards", nargs="?", help="token shard directory (default: tokenize the Kang 2017 PBMCs)")
    ap.add_argument("--preset", default="geneformer-v1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tokens-per-batch", type=int, default=None, help="default: 65536 on CUDA, 4096 on CPU")
    ap.add_argument("--model-input-size", type=int, default=None, help="truncate cells when tokenizing (default: the preset's)")
    ap.add_argument("--no-bf16", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    tpb = args.tokens_per_batch or (65536 if device.type == "cuda" else 4096)
    with tempfile.TemporaryDirectory() as tmp:
        shards = ShardSet(args.shards or make_shards(args.preset, args.model_input_size, Path(tmp)))
        cfg = preset_config(args.preset, vocab_size=shards.vocab_size, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        if cfg.vocab_size != shards.vocab_size:
            print(f"preset {args.preset} has vocabulary {cfg.vocab_size} but the shards {shards.vocab_size}", file=sys.stderr)
            return 2
        spec = masking_spec(shards, cfg.vocab_size)
        data = batches_for(shards, spec, tpb, args.steps + args.warmup, seed=0)
        lengths = shards.lengths.astype(np.float64)
        mean_len = float((lengths**2).sum() / lengths.sum())  # the sequence length a token sees
        fpt = flops_per_token(cfg, mean_len, masked_fraction=0.15)
        peak, device_name = peak_flops(device)
        bf16 = not args.no_bf16
        ours, ours_mem = run_ours(cfg, data, device, args.steps, args.warmup, bf16)
        hf, hf_mem = run_hf(cfg, data, device, args.steps, args.warmup, bf16)

    params = BertForMaskedLM(cfg).num_parameters()
    mfu = lambda tps: "n/a" if peak is None else f"{100 * tps * fpt / peak:.1f}%"  # noqa: E731
    print(f"pretraining throughput: preset {args.preset} ({params / 1e6:.1f}M parameters), {device_name}, "
          f"{'bf16 autocast' if bf16 and device.type == 'cuda' else 'fp32'}")
    print(f"input: {shards.path if args.shards else 'Kang 2017 PBMCs (2,000 cells)'}, {len(shards):,} cells, "
          f"mean {lengths.mean():.0f} tokens/cell, {tpb:,} tokens per batch, {args.steps} timed steps after {args.warmup} warm-up")
    print(f"model FLOPs per token: {fpt / 1e6:.1f} MFLOP")
    print()
    print(f"| {'implementation':<44} | {'tokens/s':>12} | {'MFU':>6} | {'peak mem GiB':>12} |")
    print(f"|{'-' * 46}|{'-' * 14}|{'-' * 8}|{'-' * 14}|")
    attn = "varlen flash" if device.type == "cuda" else "padded SDPA, key mask"
    mem = lambda gib: "n/a" if gib != gib else f"{gib:.2f}"  # noqa: E731  (NaN: not measured on CPU)
    print(f"| {'cellrank (packed, ' + attn + ')':<44} | {ours:>12,.0f} | {mfu(ours):>6} | {mem(ours_mem):>12} |")
    print(f"| {'transformers BertForMaskedLM (SDPA, padded)':<44} | {hf:>12,.0f} | {mfu(hf):>6} | {mem(hf_mem):>12} |")
    print(f"\nspeed-up: {ours / hf:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
