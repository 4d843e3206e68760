"""The training loop, shared by pretraining and fine-tuning; every knob is in `TrainConfig`.

A task plugs into `train(model, task, cfg, out_dir)` by providing five methods:

    plan(epoch, rank, world_size, tokens_per_batch) -> list
        This rank's batches for one pass over the training data, as cheap descriptions
        (e.g. arrays of cell indices). Must be deterministic in its arguments (and the
        task's own seed) and non-empty on every rank. Ranks should take disjoint slices.
    batch(item, epoch, index) -> PackedBatch
        Materialise one planned batch (read tokens, corrupt, attach labels). Deterministic:
        any randomness seeded from (seed, epoch, index, rank), so a resumed run rebuilds
        exactly the batches an uninterrupted one would have seen.
    loss(model, batch) -> scalar Tensor
        Called under autocast on the training device with `batch` already moved there.
        `model` may be wrapped (DDP / torch.compile): call it, don't reach into it.
    evaluate(model) -> dict[str, float]
        Validation metrics; called on rank 0 only, with the unwrapped model (or, with
        `ema_decay`, its weight average) in eval mode, under `torch.no_grad()` and autocast.
    save(model, out_dir, extra) -> None
        Write the model directory (`cellrank_fm.checkpoint.save_model_dir`) of the model `evaluate` sees; `extra` holds
        {"step": n} for the config's "cellrank" block. Called on rank 0.
    should_stop() -> bool   (optional)
        Asked on rank 0 after each evaluation; True ends training there with a checkpoint
        (fine-tuning's early stopping on validation macro-F1).
    state_dict() -> dict, load_state_dict(dict)   (optional)
        The task's own state at a checkpoint (fine-tuning's best weights and early-stopping
        record), saved with it and restored on resume.

The loop owns the rest: device choice, DDP under `torchrun` (each rank its own slice of the
batches, gloo on CPU, nccl on CUDA), AdamW (fused; no weight decay on biases and
LayerNorms), linear warmup then linear or cosine decay, gradient accumulation and clipping,
mixed precision from `accel` (bf16 autocast on CUDA; fp16 with gradient scaling on GPUs
without bf16), optional `torch.compile`, an optional moving average of the weights
(`ema_decay`: the average is what is evaluated and saved), a progress bar with tokens/s and loss,
metrics as JSON lines (`metrics.jsonl`), and checkpoints (`trainer_state.pt` beside the
model files: step, weights, optimizer, scheduler, gradient scaler and task state in one file written
atomically, so a kill at any moment leaves the last whole checkpoint). Dropout randomness is
reseeded from (seed, step, rank) at every step and the data position is the number of batches consumed, so
`resume=True` continues an interrupted run to the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from cellrank_fm.batching import PackedBatch
from cellrank_fm.errors import UserError, atomic_path

STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    lr: float | None = 1e-3  # None: the task picks it from the model (`pretrain.default_lr`)
    weight_decay: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "linear"  # "linear" | "cosine" | "constant" (after warmup)
    max_steps: int = 1000
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    tokens_per_batch: int = 16384
    eval_every: int = 0  # 0 = only at the start and the end
    eval_at_start: bool = True
    checkpoint_every: int = 0  # 0 = only at the end
    log_every: int = 10
    seed: int = 0
    bf16: bool = True  # False: fp32 everywhere; True: `precision` decides
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" (any device) | "fp32"; see accel
    compile: bool = False
    # > 0: evaluate, keep and save an exponential moving average of the weights with this decay
    # (`WeightAverage`) instead of the weights of the last step.
    ema_decay: float = 0.0
    device: str = "auto"
    max_seconds: float | None = None  # stop cleanly (with a checkpoint) after this wall time
    quiet: bool = False
    # Parameters whose names start with one of these prefixes train at lr × the factor (e.g. a
    # freshly initialised classification head beside a pretrained encoder).
    lr_scales: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine", "constant"):
            raise UserError(f"schedule must be linear, cosine or constant, not {self.schedule!r}.")
        if self.max_steps < 1 or self.grad_accum < 1 or self.tokens_per_batch < 1:
            raise UserError("max_steps, grad_accum and tokens_per_batch must be positive.")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"the learning rate must be positive, not {self.lr}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"the weight-average decay must be in [0, 1), not {self.ema_decay}.")


class WeightAverage:
    """An exponential moving average of a model's weights (a copy, updated after each step).

    The decay warms up as (1 + n) / (10 + n) over the first updates, so that the average does
    not stay close to the initial weights; then it is `decay`, an average over about
    1 / (1 − decay) steps. Evaluated instead of the last step's weights, it smooths the
    step-to-step noise that small validation sets would otherwise pick the best checkpoint from.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy

        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        weight = 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, p in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(p.detach(), weight)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.model.load_state_dict(state["model"])


class Task(Protocol):
    def plan(self, epoch: int, rank: int, world_size: int, tokens_per_batch: int) -> list: ...
    def batch(self, item: Any, epoch: int, index: int) -> PackedBatch: ...
    def loss(self, model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor: ...
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]: ...
    def save(self, model: torch.nn.Module, out_dir: Path, extra: dict) -> None: ...


# ----------------------------------------------------------------------------- pieces


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return check_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def check_device(name: str) -> torch.device:
    """The device `name` asks for, if this machine has it; else one sentence saying what it has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {name} asks for a GPU but PyTorch sees none on this machine (no CUDA "
                            "device or driver); use --device cpu, or auto to take a GPU when there is one")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name} asks for GPU {device.index} but this machine has {count} "
                            f"(cuda:0 to cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} asks for Apple's GPU (MPS) but PyTorch cannot use one here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and LayerNorms; `cfg.lr_scales` set per-prefix rates."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or "LayerNorm" in name)
        scale = next((f for prefix, f in cfg.lr_scales if name.startswith(prefix)), 1.0)
        groups.setdefault((decay, scale), []).append(p)
    params = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale}
              for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    # The fused kernel exists for CUDA and CPU (on CPU it is ~10x faster than the default loop).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def precision_for(cfg: TrainConfig, device: torch.device):
    """The run's `accel.Precision` (autocast dtype and gradient scaler)."""
    from cellrank_fm.accel import resolve_precision

    return resolve_precision(device, cfg.precision if cfg.bf16 else "fp32")


def autocast(cfg: TrainConfig, device: torch.device):
    return precision_for(cfg, device).autocast()


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def _stream(task: Task, rank: int, world: int, tokens_per_batch: int, skip: int) -> Iterator[tuple[PackedBatch, int, int]]:
    """Batches forever (epoch after epoch), after skipping the first `skip` of them."""
    epoch = 0
    while True:
        plan = task.plan(epoch, rank, world, tokens_per_batch)
        if not plan:
            raise UserError(f"rank {rank} got no training batches; use fewer processes or more data.")
        start = 0
        if skip >= len(plan):
            skip -= len(plan)
            epoch += 1
            continue
        start, skip = skip, 0
        for i in range(start, len(plan)):
            yield task.batch(plan[i], epoch, i), epoch, i
        epoch += 1


class _Dist:
    """torchrun's environment, or a single process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owned = False
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            torch.distributed.init_process_group(backend)
            self.owned = True

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.on:
            torch.distributed.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.on:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.owned:
            torch.distributed.destroy_process_group()


def _append_metrics(out_dir: Path, record: dict) -> None:
    with open(out_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(out_dir: Path, after_step: int) -> None:
    """Drop records a crashed run wrote after its last checkpoint."""
    path = out_dir / METRICS
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= after_step:
                keep.append(line)
        except ValueError:
            continue  # a line cut short when the crashed run was killed
    path.write_text("".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------- the loop


def train(model: torch.nn.Module, task: Task, cfg: TrainConfig, out_dir: str | Path, resume: bool = False) -> dict:
    """Train `model` on `task`; write checkpoints and metrics to `out_dir`; return a summary."""
    out_dir = Path(out_dir)
    state_path = out_dir / STATE
    if resume and not state_path.is_file():
        raise UserError(f"{out_dir} holds no {STATE} to resume from; start without --resume.")
    if not resume and state_path.exists():
        raise UserError(f"{out_dir} already holds a training run; pass --resume to continue it or choose another output directory.")

    device = pick_device(cfg.device)
    dist = _Dist(device)
    rank, world = dist.rank, dist.world
    is_main = rank == 0
    out_dir.mkdir(parents=True, exist_ok=True)

    model.to(device)
    from cellrank_fm.accel import choose_attention, compile_model, configure_backends

    precision = precision_for(cfg, device)
    configure_backends(precision)
    if hasattr(model, "set_attn_impl"):  # the capability check: varlen kernel or padded SDPA, decided once
        choose_attention(model, precision, training=True)
    scaler = precision.grad_scaler()
    step = 0
    if resume:
        from cellrank_fm.checkpoint import load_weights_into, read_weights

        try:
            state = torch.load(state_path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - a truncated pickle fails in many ways
            from cellrank_fm.outputs import damaged

            raise damaged(state_path, err, "run again with --overwrite to start from scratch") from None
        # The checkpoint's own copy of the weights: the model files beside it may be a step
        # newer if the run was killed between writing them and this file.
        load_weights_into(model, state["model"] if "model" in state else read_weights(out_dir), str(state_path))
        if "task" in state and hasattr(task, "load_state_dict"):
            task.load_state_dict(state["task"])
        step = int(state["step"])
        # The fp16 loss scale and its growth tracker: a resumed run that restarted at 2**16 would
        # skip steps on overflow until the scale fell back. An empty state (saved by a disabled
        # scaler: bf16, fp32) or a disabled scaler now leaves the scaler as it starts.
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 and is_main else None
    if resume:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if average is not None and state.get("weight_average"):
            average.load_state_dict(state["weight_average"])
        if is_main:
            _truncate_metrics(out_dir, step)

    raw_model = model
    if dist.on:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    run_model = compile_model(model) if cfg.compile else model
    evaluated = raw_model if average is None else average.model  # what is evaluated and saved

    def evaluate(at_step: int) -> dict:
        result: dict = {}
        if is_main:
            raw_model.eval()
            with torch.no_grad(), autocast(cfg, device):
                result = {k: float(v) for k, v in task.evaluate(evaluated).items()}
            raw_model.train()
            _append_metrics(out_dir, {"step": at_step, "split": "val", **result})
        dist.barrier()
        return result

    def checkpoint(at_step: int) -> None:
        if is_main:
            task.save(evaluated, out_dir, {"step": at_step})
            from cellrank_fm.checkpoint import state_dict_for_saving

            # One file holds everything a resumed run needs, so a checkpoint is whole or absent.
            with atomic_path(state_path) as tmp:
                torch.save(
                    {"step": at_step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(),
                     "world_size": world, "config": dataclasses.asdict(cfg),
                     "model": state_dict_for_saving(raw_model),
                     **({"weight_average": average.state_dict()} if average is not None else {}),
                     **({"task": task.state_dict()} if hasattr(task, "state_dict") else {})},
                    tmp,
                )
        dist.barrier()

    from cellrank_fm.progress import progress_bar

    first_eval = evaluate(step) if cfg.eval_at_start and step == 0 else {}
    last_eval: dict = dict(first_eval)
    stream = _stream(task, rank, world, cfg.tokens_per_batch, skip=step * cfg.grad_accum)
    model.train()
    t0 = time.perf_counter()
    tokens_total = 0
    window_loss, window_steps, window_tokens, window_t = torch.zeros((), device=device), 0, 0, time.perf_counter()
    stopped_early = False
    with progress_bar("steps", quiet=cfg.quiet or not is_main, extra="loss {task.fields[loss]} · {task.fields[tps]} tokens/s") as bar:
        tid = bar.add_task("pretrain" if not hasattr(task, "name") else task.name, total=cfg.max_steps,
                           completed=step, loss="--", tps="--")
        # A run resumed from the checkpoint where it stopped early has nothing left to train.
        stopped_early = resume and bool(getattr(task, "should_stop", lambda: False)())
        while step < cfg.max_steps and not stopped_early:
            torch.manual_seed(_step_seed(cfg.seed, step, rank))
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                batch, epoch, index = next(stream)
                batch = batch.to(device, non_blocking=True)
                last = micro == cfg.grad_accum - 1
                sync = model.no_sync() if dist.on and not last else contextlib.nullcontext()
                with sync:
                    with autocast(cfg, device):
                        loss = task.loss(run_model, batch)
                    scaler.scale(loss / cfg.grad_accum).backward()
                step_loss += loss.detach().float() / cfg.grad_accum  # no host sync per step
                window_tokens += batch.num_tokens
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if average is not None:
                average.update(raw_model)
            step += 1
            window_loss += step_loss
            window_steps += 1

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                loss_sum, tok_sum = dist.sum([window_loss.item(), float(window_tokens)], device)
                now = time.perf_counter()
                tps = tok_sum / max(now - window_t, 1e-9)
                tokens_total += int(tok_sum)
                mean_loss = loss_sum / (window_steps * world)
                if is_main:
                    _append_metrics(out_dir, {
                        "step": step, "split": "train", "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                        "tokens": tokens_total, "tokens_per_s": tps, "epoch": epoch, "batch_in_epoch": index,
                        "elapsed_s": now - t0,
                    })
                bar.update(tid, completed=step, loss=f"{mean_loss:.4f}", tps=f"{tps:,.0f}")
                window_loss, window_steps, window_tokens, window_t = torch.zeros((), device=device), 0, 0, now
            else:
                bar.update(tid, completed=step)

            out_of_time = cfg.max_seconds is not None and dist.sum(
                [float(time.perf_counter() - t0 > cfg.max_seconds)], device)[0] > 0
            final = step == cfg.max_steps or out_of_time
            if final or (cfg.eval_every and step % cfg.eval_every == 0):
                last_eval = evaluate(step)
                # A task may end training after an evaluation (early stopping): `should_stop()`.
                wants_stop = is_main and bool(getattr(task, "should_stop", lambda: False)())
                if not final and dist.sum([float(wants_stop)], device)[0] > 0:
                    checkpoint(step)
                    stopped_early = True
                    break
            if final or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                checkpoint(step)
            if out_of_time and step < cfg.max_steps:
                stopped_early = True
                break

    dist.close()
    return {"step": step, "first_eval": first_eval, "last_eval": last_eval, "tokens": tokens_total,
            "seconds": time.perf_counter() - t0, "stopped_early": stopped_early, "world_size": world}
