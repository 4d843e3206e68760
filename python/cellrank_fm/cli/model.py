"""Commands: pretrain (masked-gene modelling on token shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cellrank_fm.cli.app import app

_MODEL = "Model"
_DATA = "Data and validation"
_OPT = "Optimisation"
_RUN = "Run"


@app.command(rich_help_panel="Model")
def pretrain(
    shards: Path = typer.Argument(..., help="Token shard directory from `cellrank tokenize`.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Model directory to write (config.json, model.safetensors, vocabulary, metrics.jsonl).", rich_help_panel=_MODEL),
    preset: Optional[str] = typer.Option(None, "--preset", help="tiny (default), geneformer-v1, geneformer-v2-104m or geneformer-v2-316m.", rich_help_panel=_MODEL),
    config: Optional[Path] = typer.Option(None, "--config", help="Model config JSON (HuggingFace BertConfig keys) for any size.", rich_help_panel=_MODEL),
    from_dir: Optional[Path] = typer.Option(None, "--from", help="Continue pretraining an existing model directory (ours or a HuggingFace Geneformer checkpoint).", rich_help_panel=_MODEL),
    val: Optional[Path] = typer.Option(None, "--val", help="Held-out shard directory for validation (default: hold out --val-fraction of SHARDS).", rich_help_panel=_DATA),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="Fraction of cells held out for validation (seeded).", rich_help_panel=_DATA),
    val_max_cells: int = typer.Option(5000, "--val-max-cells", help="At most this many validation cells.", rich_help_panel=_DATA),
    tokens_per_batch: int = typer.Option(16384, "--tokens-per-batch", help="Token budget of one batch per process (cells × longest cell).", rich_help_panel=_OPT),
    max_steps: int = typer.Option(1000, "--max-steps", help="Optimizer steps.", rich_help_panel=_OPT),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (AdamW). Default: 3e-3 × 64 / hidden size (3e-3 for tiny, 7.5e-4 for geneformer-v1).", rich_help_panel=_OPT),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warmup steps (default: 5% of --max-steps).", rich_help_panel=_OPT),
    schedule: str = typer.Option("linear", "--schedule", help="Decay after warmup: linear, cosine or constant.", rich_help_panel=_OPT),
    weight_decay: float = typer.Option(0.001, "--weight-decay", help="AdamW weight decay (not on biases and LayerNorms).", rich_help_panel=_OPT),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Batches per optimizer step.", rich_help_panel=_OPT),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Clip the gradient norm to this (0 = off).", rich_help_panel=_OPT),
    eval_every: int = typer.Option(0, "--eval-every", help="Validate every N steps (0 = at the start and the end only).", rich_help_panel=_RUN),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Write a resumable checkpoint every N steps (and always at the end).", rich_help_panel=_RUN),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation, data order, masking and dropout.", rich_help_panel=_RUN),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out (same options give the same result); without a checkpoint, start from scratch.", rich_help_panel=_RUN),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out holds (a model or an earlier run) instead of refusing.", rich_help_panel=_RUN),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (faster on GPU after a warm-up).", rich_help_panel=_RUN),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ...", rich_help_panel=_RUN),
    no_bf16: bool = typer.Option(False, "--no-bf16", help="Train in fp32 on GPU (default: bf16 autocast).", rich_help_panel=_RUN),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Stop cleanly with a checkpoint after this wall time; --resume continues.", rich_help_panel=_RUN),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary.", rich_help_panel=_RUN),
) -> None:
    """Pretrain a transformer on token shards by masked-gene modelling.

    15% of each cell's genes are hidden and the model learns to recover them from the rest of
    the ranking. Reports validation loss at the start and the end, and top-1 accuracy on the
    masked genes next to a frequency baseline. Under torchrun each process trains on its own
    slice of the shards (DDP).

    Example: cellrank pretrain shards/ --out model/ --preset geneformer-v1 --max-steps 20000
    """
    from cellrank_fm.pretrain import pretrain as run
    from cellrank_fm.train import TrainConfig

    cfg = TrainConfig(
        lr=lr, weight_decay=weight_decay,
        warmup_steps=warmup_steps if warmup_steps is not None else max_steps // 20,
        schedule=schedule, max_steps=max_steps, grad_clip=grad_clip or None, grad_accum=grad_accum,
        tokens_per_batch=tokens_per_batch, eval_every=eval_every, checkpoint_every=checkpoint_every,
        seed=seed, bf16=not no_bf16, compile=compile, device=device, max_seconds=max_seconds, quiet=quiet,
    )
    summary = run(
        shards, out, preset=preset, config=str(config) if config else None,
        from_dir=str(from_dir) if from_dir else None, val_shards_dir=str(val) if val else None,
        val_fraction=val_fraction, val_max_cells=val_max_cells, resume=resume, overwrite=overwrite, train_config=cfg,
    )
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
