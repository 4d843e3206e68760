"""Commands: pretrain (masked-gene modelling on token shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cellrank_fm.cli.app import app
from cellrank_fm.cli.options import MODEL, RUN, Device, Quiet, Shards

DATA = "Data and validation"
OPT = "Optimisation"


@app.command(rich_help_panel="Model")
def pretrain(
    shards: Shards,
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write (config.json, model.safetensors, vocabulary, metrics.jsonl).", rich_help_panel=MODEL)],
    preset: Annotated[Optional[str], typer.Option("--preset", help="tiny (default), geneformer-v1, geneformer-v2-104m or geneformer-v2-316m.", rich_help_panel=MODEL)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Model config JSON (HuggingFace BertConfig keys) for any size.", rich_help_panel=MODEL)] = None,
    from_dir: Annotated[Optional[Path], typer.Option("--from", help="Continue pretraining an existing model directory (ours or a HuggingFace Geneformer checkpoint).", rich_help_panel=MODEL)] = None,
    val: Annotated[Optional[Path], typer.Option("--val", help="Held-out shard directory for validation (default: hold out --val-fraction of SHARDS).", rich_help_panel=DATA)] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Fraction of cells held out for validation (seeded).", rich_help_panel=DATA)] = 0.05,
    val_max_cells: Annotated[int, typer.Option("--val-max-cells", help="At most this many validation cells.", rich_help_panel=DATA)] = 5000,
    tokens_per_batch: Annotated[int, typer.Option("--tokens-per-batch", help="Token budget of one batch per process (cells × longest cell).", rich_help_panel=OPT)] = 16384,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Optimizer steps.", rich_help_panel=OPT)] = 1000,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (AdamW). Default: 3e-3 × 64 / hidden size (3e-3 for tiny, 7.5e-4 for geneformer-v1).", rich_help_panel=OPT)] = None,
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps", help="Linear warmup steps (default: 5% of --max-steps).", rich_help_panel=OPT)] = None,
    schedule: Annotated[str, typer.Option("--schedule", help="Decay after warmup: linear, cosine or constant.", rich_help_panel=OPT)] = "linear",
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (not on biases and LayerNorms).", rich_help_panel=OPT)] = 0.001,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Batches per optimizer step.", rich_help_panel=OPT)] = 1,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Clip the gradient norm to this (0 = off).", rich_help_panel=OPT)] = 1.0,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Validate every N steps (0 = at the start and the end only).", rich_help_panel=RUN)] = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Write a resumable checkpoint every N steps (and always at the end).", rich_help_panel=RUN)] = 500,
    seed: Annotated[int, typer.Option("--seed", help="Seed for initialisation, data order, masking and dropout.", rich_help_panel=RUN)] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out (same options give the same result); without a checkpoint, start from scratch.", rich_help_panel=RUN)] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace what --out holds (a model or an earlier run) instead of refusing.", rich_help_panel=RUN)] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (faster on GPU after a warm-up).", rich_help_panel=RUN)] = False,
    device: Device = "auto",
    no_bf16: Annotated[bool, typer.Option("--no-bf16", help="Train in fp32 on GPU (default: bf16 autocast).", rich_help_panel=RUN)] = False,
    max_seconds: Annotated[Optional[float], typer.Option("--max-seconds", help="Stop cleanly with a checkpoint after this wall time; --resume continues.", rich_help_panel=RUN)] = None,
    quiet: Quiet = False,
) -> None:
    """Pretrain a transformer on token shards by masked-gene modelling.

    15% of each cell's genes are hidden and the model learns to recover them from the rest of
    the ranking. Reports validation loss at the start and the end, and top-1 accuracy on the
    masked genes next to a frequency baseline. Under torchrun each process trains on its own
    slice of the shards (DDP).

    Example: cellrank pretrain shards/ --out model/ --preset geneformer-v1 --max-steps 20000
    """
    from cellrank_fm import api

    options = {} if warmup_steps is None else {"warmup_steps": warmup_steps}  # default: 5% of the steps
    summary = api.pretrain(
        shards, out=out, preset=preset, config=config, from_model=from_dir, val=val, val_fraction=val_fraction,
        val_max_cells=val_max_cells, resume=resume, overwrite=overwrite, progress=not quiet, lr=lr, weight_decay=weight_decay,
        schedule=schedule, max_steps=max_steps, grad_clip=grad_clip or None, grad_accum=grad_accum,
        tokens_per_batch=tokens_per_batch, eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed,
        bf16=not no_bf16, compile=compile, device=device, max_seconds=max_seconds, **options,
    ).summary
    import os

    if quiet or int(os.environ.get("RANK", "0")) != 0:
        return
    first, last = summary["first_eval"], summary["last_eval"]
    typer.echo(
        f"trained {summary['parameters']:,} parameters for {summary['step']} steps on "
        f"{summary['train_cells']:,} cells ({summary['world_size']} process(es), "
        f"{summary['tokens'] / max(summary['seconds'], 1e-9):,.0f} tokens/s); "
        f"{summary['val_cells']:,} validation cells"
    )
    if first:
        typer.echo(f"validation loss: {first['loss']:.4f} at the start -> {last['loss']:.4f}")
    else:
        typer.echo(f"validation loss: {last['loss']:.4f}")
    typer.echo(
        f"masked-gene top-1 accuracy: {last['accuracy']:.4f} (frequency baselines: most frequent gene at "
        f"that rank {last['baseline_position_accuracy']:.4f}, most frequent gene overall "
        f"{last['baseline_overall_accuracy']:.4f})"
    )
    if summary["stopped_early"]:
        typer.echo("stopped after --max-seconds; continue with --resume")
    typer.echo(f"model written to {out}")
