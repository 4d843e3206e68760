"""Masked-gene pretraining on token shards (`cellrank pretrain`).

15% of each cell's gene tokens are selected (80% → <mask>, 10% → a random gene, 10% kept;
special tokens never), and the model predicts the original gene. Validation uses held-out
cells (a seeded fraction of the shards, or a separate shard directory) with a fixed masking
seed, so losses at different steps are comparable. It reports top-1 accuracy on the masked
positions next to two frequency baselines that need no model: the most frequent token at
that rank position in the training cells ("position" baseline — the stronger one, since the
top ranks are dominated by a few ubiquitous genes) and the most frequent token overall.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellrank_fm.batching import MaskingSpec, pack_masked, token_budget_batches
from cellrank_fm.checkpoint import is_model_dir, load_model_dir, read_config, save_model_dir
from cellrank_fm.errors import UserError, warn, write_json
from cellrank_fm.model import BertForMaskedLM, ModelConfig, preset_config
from cellrank_fm.outputs import Claim, claim
from cellrank_fm.shards import CACHE_TOKENS, ShardSet, check_vocabulary
from cellrank_fm.train import METRICS, STATE, TrainConfig, train

BASELINE_TOKEN_BUDGET = 5_000_000  # tokens of training cells used to count frequencies
PRETRAIN_METRICS = "metrics.json"  # the last validation figures and any warnings


def default_lr(cfg: ModelConfig) -> float:
    """Peak learning rate for pretraining: 3e-3 at width 64, inversely proportional to the width.

    Adam moves every weight by about the learning rate per step, and a layer's output changes
    with the sum over its inputs, so the rate that keeps updates the same size falls as 1/width
    (0.75e-3 at Geneformer V1's 256, close to the 1e-3 it was trained with; 2.5e-4 at 768).
    """
    return 3e-3 * 64 / cfg.hidden_size


def masking_spec(shards: ShardSet, vocab_size: int) -> MaskingSpec:
    special = {k: v for k, v in shards.special_tokens.items() if v is not None}
    if special.get("mask") is None:
        raise UserError(f"{shards.path} declares no <mask> token; it cannot be used for masked-gene pretraining.")
    return MaskingSpec(vocab_size=vocab_size, mask_id=int(special["mask"]), special_ids=tuple(sorted(int(v) for v in special.values())))


def split_cells(shards: ShardSet, val_fraction: float, val_max_cells: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) cell indices; validation is a seeded random subset."""
    n = len(shards)
    n_val = min(val_max_cells, int(round(n * val_fraction)))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n - n_val < 1:
        raise UserError(f"{shards.path} has {n} cells, too few to hold out {n_val} for validation; lower --val-fraction.")
    perm = np.random.default_rng([seed, 17]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@dataclass
class MaskedGeneTask:
    """The `train.Task` for masked-gene modelling over a ShardSet."""

    shards: ShardSet
    train_cells: np.ndarray
    val_shards: ShardSet
    val_cells: np.ndarray
    spec: MaskingSpec
    seed: int
    model_extra: dict[str, Any]
    eval_tokens_per_batch: int = 16384
    name: str = "pretrain"
    rank: int = 0
    _baseline: dict[str, Any] | None = field(default=None, repr=False)

    # -- training data

    def plan(self, epoch: int, rank: int, world_size: int, tokens_per_batch: int) -> list[np.ndarray]:
        """Batches of cells mixed across parts, a group of parts at a time, in a seeded order.

        A shard set tokenized from several inputs holds one input per part; drawing batches
        part by part would train on one dataset after another and drift with each. So the parts
        (in a seeded order) are grouped up to what the shard cache holds in memory, and each
        group's cells are shuffled together. With at least as many parts as ranks, each rank
        reads only its own parts; otherwise each rank takes every world_size-th batch.
        """
        self.rank = rank
        rng = np.random.default_rng([self.seed, epoch])
        part_of = self.shards.part_of(self.train_cells)
        parts = np.unique(part_of)
        split_parts = len(parts) >= world_size
        mine = parts[rank::world_size] if split_parts else parts
        sizes = self.shards.part_token_counts
        groups: list[list[int]] = []
        held = 0
        for part in rng.permutation(mine):
            if not groups or held + sizes[part] > CACHE_TOKENS:
                groups.append([])
                held = 0
            groups[-1].append(int(part))
            held += int(sizes[part])
        items: list[np.ndarray] = []
        for group in groups:
            cells = self.train_cells[np.isin(part_of, group)]
            batches = token_budget_batches(
                self.shards.lengths[cells], tokens_per_batch, shuffle=True, seed=int(rng.integers(2**31))
            )
            batches = [cells[b] for b in batches]
            items.extend(batches if split_parts else batches[rank::world_size])
        return items

    def batch(self, item: np.ndarray, epoch: int, index: int):
        rng = np.random.default_rng([self.seed, epoch, index, self.rank])
        return pack_masked(self.shards.tokens(item), self.spec, rng)

    def loss(self, model, batch) -> torch.Tensor:
        return model(batch, labels=batch.labels)[0]

    # -- validation

    def baseline_tables(self) -> dict[str, Any]:
        """Most frequent training token per rank position, and overall."""
        if self._baseline is None:
            rng = np.random.default_rng([self.seed, 23])
            cells = rng.permutation(self.train_cells)
            lengths = self.shards.lengths[cells].astype(np.int64)
            cells = cells[: max(1, int(np.searchsorted(np.cumsum(lengths), BASELINE_TOKEN_BUDGET)))]
            cells = np.sort(cells)
            toks = self.shards.tokens(cells)
            flat = np.concatenate(toks).astype(np.int64)
            pos = np.concatenate([np.arange(len(t)) for t in toks])
            special = np.isin(flat, self.spec.special_ids)
            flat, pos = flat[~special], pos[~special]
            vocab = self.spec.vocab_size
            overall = int(np.bincount(flat, minlength=vocab).argmax())
            keys, counts = np.unique(pos * vocab + flat, return_counts=True)
            kpos, ktok = keys // vocab, keys % vocab
            order = np.lexsort((-counts, kpos))  # by position, most frequent first
            first = np.ones(len(order), dtype=bool)
            first[1:] = kpos[order][1:] != kpos[order][:-1]
            per_pos = np.full(int(kpos.max()) + 1 if len(kpos) else 1, overall, dtype=np.int64)
            per_pos[kpos[order][first]] = ktok[order][first]
            self._baseline = {"overall": overall, "per_position": per_pos}
        return self._baseline

    def evaluate(self, model) -> dict[str, float]:
        base = self.baseline_tables()
        device = next(model.parameters()).device
        rng = np.random.default_rng([self.seed, 31])
        loss_sum, correct, base_pos, base_all, count = 0.0, 0, 0, 0, 0
        batches = token_budget_batches(self.val_shards.lengths[self.val_cells], self.eval_tokens_per_batch, shuffle=False)
        for b in batches:
            batch = pack_masked(self.val_shards.tokens(self.val_cells[b]), self.spec, rng)
            where = (batch.labels != -100).numpy()
            positions = batch.position_ids.numpy()[where]
            targets_np = batch.labels.numpy()[where]
            batch = batch.to(device)
            loss, logits, targets = model(batch, labels=batch.labels)
            n = int(targets.numel())
            loss_sum += float(loss) * n
            correct += int((logits.argmax(-1) == targets).sum())
            table = base["per_position"]
            guess = np.where(positions < len(table), table[np.minimum(positions, len(table) - 1)], base["overall"])
            base_pos += int((guess == targets_np).sum())
            base_all += int((targets_np == base["overall"]).sum())
            count += n
        return {
            "loss": loss_sum / count,
            "accuracy": correct / count,
            "baseline_position_accuracy": base_pos / count,
            "baseline_overall_accuracy": base_all / count,
            "masked_tokens": count,
        }

    def save(self, model, out_dir: Path, extra: dict) -> None:
        save_model_dir(
            model, out_dir, self.shards.vocabulary, self.shards.medians, self.shards.symbols,
            extra_config={**self.model_extra, **extra}, gene_map=self.shards.gene_map,
        )


def build_model(
    shards: ShardSet, out: Path, preset: str | None, config: str | None, from_dir: str | None, resume: bool
) -> BertForMaskedLM:
    """The model to train, after checking it fits the shards (vocabulary, positions)."""
    sources = [x for x in (preset, config, from_dir) if x]
    if resume:
        raw = read_config(out)
        cfg = ModelConfig.from_dict(raw)
        what = f"the model in {out}"
        sha = (raw.get("cellrank") or {}).get("vocabulary_sha256")
        model = BertForMaskedLM(cfg)  # weights come from the checkpoint in train()
    elif len(sources) > 1:
        raise UserError("give only one of --preset, --config and --from.")
    elif from_dir:
        model, info = load_model_dir(from_dir, expect="mlm")
        cfg, what, sha = info.config, f"the model in {from_dir}", info.cellrank.get("vocabulary_sha256")
    else:
        if config:
            cfg = ModelConfig.from_json(config)
            what = f"the config {config}"
        else:
            cfg = preset_config(preset or "tiny", vocab_size=shards.vocab_size)
            what = f"preset {preset or 'tiny'}"
        sha = None
        model = None
    check_vocabulary(shards, cfg.vocab_size, sha, what)
    longest = int(shards.lengths.max())
    if longest > cfg.max_position_embeddings:
        raise UserError(
            f"{shards.path} holds cells of {longest} tokens but {what} has only "
            f"{cfg.max_position_embeddings} positions; tokenize with a smaller --model-input-size or use a larger model."
        )
    special = [v for v in shards.special_tokens.values() if v is not None]
    if model is None:
        model = BertForMaskedLM(cfg.replace(special_token_ids=sorted(special), pad_token_id=shards.special_tokens.get("pad") or 0))
    return model


def pretrain(
    shards_dir: str | Path,
    out: str | Path,
    *,
    preset: str | None = None,
    config: str | None = None,
    from_dir: str | None = None,
    val_shards_dir: str | None = None,
    val_fraction: float = 0.05,
    val_max_cells: int = 5000,
    resume: bool = False,
    overwrite: bool = False,
    train_config: TrainConfig | None = None,
) -> dict:
    """Pretrain on `shards_dir`, writing the model directory `out`; returns the run summary."""
    # Rank 0 owns the output; under torchrun the other ranks only read it.
    with claim(out, enabled=int(os.environ.get("RANK", "0")) == 0) as output:
        return _pretrain(shards_dir, Path(out), output, preset=preset, config=config, from_dir=from_dir,
                         val_shards_dir=val_shards_dir, val_fraction=val_fraction, val_max_cells=val_max_cells,
                         resume=resume, overwrite=overwrite, train_config=train_config)


def _note(output: Claim, message: str) -> None:
    if output.enabled:
        print(f"note: {message}", file=sys.stderr)


def _prepare_out(out: Path, output: Claim, resume: bool, overwrite: bool) -> bool:
    """Whether to resume: checks what `out` holds, clearing it where that is safe or asked for."""
    has_state = (out / STATE).is_file()
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    # A run killed before its first checkpoint leaves only its log: nothing to resume or keep.
    if held == [METRICS] and not has_state and not overwrite:
        _note(output, f"{out} holds no checkpoint{' to resume' if resume else ''}, only the log of a run stopped "
                      "before its first one; starting from scratch")
        overwrite = True
    if resume and not has_state:
        if held and not overwrite:
            what = "a model without its training state (trainer_state.pt)" if is_model_dir(out) else "files"
            raise UserError(f"{out} holds {what}, so there is no run to resume; pass --overwrite to start again "
                            "there or choose another --out.")
        if not overwrite:
            _note(output, f"{out} holds no checkpoint to resume; starting from scratch")
        resume = False
    if not resume and held:
        if not overwrite:
            what = "a model" if is_model_dir(out) else "files"
            raise UserError(f"{out} already holds {what}; pass --resume to continue training there, --overwrite to "
                            "replace it, or choose another --out.")
        if output.enabled:
            shutil.rmtree(out)
            output.replaced()
    return resume


def _pretrain(shards_dir, out: Path, output: Claim, *, preset, config, from_dir, val_shards_dir, val_fraction,
              val_max_cells, resume, overwrite, train_config) -> dict:
    cfg = train_config or TrainConfig()
    shards = ShardSet(shards_dir)
    resume = _prepare_out(out, output, resume, overwrite)
    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_model(shards, out, preset, config, from_dir, resume)
    if cfg.lr is None:
        cfg = dataclasses.replace(cfg, lr=default_lr(model.config))
    spec = masking_spec(shards, model.config.vocab_size)
    if val_shards_dir:
        val_shards = ShardSet(val_shards_dir)
        check_vocabulary(val_shards, model.config.vocab_size, shards.vocab_sha256, f"the training shards {shards.path}")
        train_cells, val_cells = np.arange(len(shards)), np.arange(len(val_shards))
    else:
        val_shards = shards
        train_cells, val_cells = split_cells(shards, val_fraction, val_max_cells, cfg.seed)
    if len(val_cells) == 0:
        raise UserError("validation needs at least one cell; raise --val-fraction or pass --val.")
    task = MaskedGeneTask(
        shards=shards, train_cells=train_cells, val_shards=val_shards, val_cells=val_cells, spec=spec,
        seed=cfg.seed, model_extra={"task": "masked-gene", **shards.tokenization()}, eval_tokens_per_batch=cfg.tokens_per_batch,
    )
    try:
        summary = train(model, task, cfg, out, resume=resume)
    except BaseException:
        if (out / STATE).exists():
            output.keep()  # a checkpoint is worth resuming from, whatever stopped the run
        raise
    summary["train_cells"], summary["val_cells"] = len(train_cells), len(val_cells)
    summary["parameters"] = model.num_parameters()
    summary["warnings"] = learning_check(summary["last_eval"])
    if output.enabled:
        write_json({"steps": summary["step"], "lr": cfg.lr, **summary["last_eval"], "warnings": summary["warnings"]},
                   out / PRETRAIN_METRICS)
    return summary


def learning_check(last_eval: dict) -> list[str]:
    """Warn (and return the warnings) when the model predicts masked genes no better than
    guessing each rank's most frequent gene: it has then learned gene frequencies, not cells."""
    acc, base = last_eval.get("accuracy"), last_eval.get("baseline_position_accuracy")
    if acc is None or base is None or acc > base:
        return []
    found: list[str] = []
    warn(f"masked-gene accuracy {acc:.4f} is not above the frequency baseline {base:.4f} (the most frequent "
         "gene at each rank): the model has learned gene frequencies only. Likely causes: too few steps for "
         "the data (raise --max-steps), a learning rate too low or too high for the model (--lr; the default "
         "scales with the width), or a model initialised for a larger width (initializer_range in --config). "
         "Fine-tuning from it will do no better than training from scratch.", found)
    return found
