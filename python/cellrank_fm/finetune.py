"""Fine-tuning: a cell classifier (or a gene classifier) on top of a pretrained encoder.

Cell classification: the split comes from `cellrank_fm.splits` (the same one `baseline` uses),
the head sits on the <cls> token (V2 tokens) or the mean of the gene tokens (V1), classes are
weighted by inverse training frequency, the first layers can be frozen, and the training loop
is `cellrank_fm.train.train`. The task evaluates validation macro-F1 at every evaluation, keeps
the best weights, and asks the loop to stop once `patience` evaluations brought no gain.

The output directory is a model directory (config.json, model.safetensors, vocabulary,
medians, labels.json) holding the best checkpoint, plus metrics.json (test split),
confusion_matrix.png, split.csv (every cell's split) and training/ (the loop's log).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cellrank_fm.batching import pack, token_budget_batches
from cellrank_fm.errors import UserError, atomic_path, warn, write_json
from cellrank_fm.inference import gene_scores, predict_tokens
from cellrank_fm.metrics import classification_metrics
from cellrank_fm.shards import GENE_SET_FILE
from cellrank_fm.splits import SHARD_HINT, Split, split_cells


# The weights evaluated, kept and saved are an exponential moving average over about the last
# 100 steps (`train.WeightAverage`): on small validation sets the single-step weights swing
# from one evaluation to the next, and the best of those swings is a noisy pick.
EMA_DECAY = 0.99


@dataclass
class FinetuneOptions:
    """Fine-tuning settings; the training ones left None are chosen by `plan_training`."""

    label: str
    from_model: str | Path | None = None
    preset: str | None = None
    seed: int = 0
    split_by: str | None = None
    split_column: str | None = None
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    min_class_size: int = 10
    pooling: str | None = None  # default: "cls" for V2 tokens, else "mean"
    freeze_layers: int = 0
    class_weight: bool = True
    epochs: float | None = None  # at most; early stopping may end sooner
    min_epochs: float | None = None  # no early stop before this
    lr: float | None = None  # the encoder's peak rate; the head and gene embeddings scale from it
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    gene_dropout: float = 0.0  # share of each training cell's genes left out at random, per step
    ema_decay: float = EMA_DECAY  # evaluate and keep a moving average of the weights; 0 = the last step's
    tokens_per_batch: int | None = None
    evals_per_epoch: int = 2
    patience: int | None = None  # evaluations without a better validation loss or macro-F1
    max_cells: int | None = None  # use at most this many training cells (seeded sample)
    dropout: float | None = None
    device: str = "auto"
    max_seconds: float | None = None
    quiet: bool = False
    model_overrides: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- training plan

# The defaults, measured on real PBMC tasks none of them was tuned on (README, "Fine-tuning
# defaults"): a batch holds about this many cells, and training runs for at least this many
# optimizer steps, whatever the data size, unless early stopping ends it.
CELLS_PER_BATCH = 32
MIN_STEPS = 600
MAX_EPOCHS = 30.0
MIN_EPOCHS = 3.0
PATIENCE_EPOCHS = 2.0
# A fresh head learns at the from-scratch rate, a pretrained encoder at a fraction of it; the
# gene embeddings (one row per gene, each updated only in the cells that hold the gene) at a
# multiple.
PRETRAINED_LR_FRACTION = 0.5
EMBEDDING_LR_SCALE = 10.0
HEAD = ("classifier.", "bert.pooler.")
EMBEDDINGS = "bert.embeddings.word_embeddings."


def scratch_lr(hidden_size: int) -> float:
    """1e-3 at width 64, inversely proportional to the width (as `pretrain.default_lr`)."""
    return 1e-3 * 64 / hidden_size


@dataclass
class TrainingPlan:
    """The resolved training settings of one fine-tuning run, with where each came from."""

    lr: float
    lr_scales: tuple[tuple[str, float], ...]
    tokens_per_batch: int
    steps_per_epoch: int
    epochs: float
    min_epochs: float
    patience: int
    eval_every: int
    warmup_steps: int
    chosen: dict[str, str]

    @property
    def max_steps(self) -> int:
        return max(1, int(round(self.epochs * self.steps_per_epoch)))

    def record(self) -> dict:
        return {"lr": self.lr, "lr_scales": dict(self.lr_scales), "tokens_per_batch": self.tokens_per_batch,
                "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs, "max_steps": self.max_steps,
                "min_epochs": self.min_epochs, "patience_evaluations": self.patience,
                "eval_every_steps": self.eval_every, "warmup_steps": self.warmup_steps, "chosen": self.chosen}


def plan_training(opts: FinetuneOptions, hidden_size: int, pretrained: bool, train_lengths: np.ndarray,
                  count_batches) -> TrainingPlan:
    """Fill the options left None from the model width, whether it is pretrained, and the data.

    `count_batches(tokens_per_batch)` is the number of training batches in one epoch.
    """
    chosen: dict[str, str] = {}
    tpb = opts.tokens_per_batch
    if tpb is None:
        # About CELLS_PER_BATCH cells of the usual length, within what one batch may hold.
        typical = float(np.percentile(train_lengths, 90)) if len(train_lengths) else 1.0
        tpb = int(min(16384, max(1024, CELLS_PER_BATCH * typical)))
        chosen["tokens_per_batch"] = f"about {CELLS_PER_BATCH} cells of {typical:.0f} tokens"
    steps_per_epoch = max(1, count_batches(tpb))
    head_lr = scratch_lr(hidden_size)
    lr = opts.lr
    if lr is None:
        lr = head_lr * (PRETRAINED_LR_FRACTION if pretrained else 1.0)
        chosen["lr"] = (f"{'pretrained' if pretrained else 'new'} encoder of width {hidden_size}")
    head = max(1.0, head_lr / lr)  # the new head never learns slower than the encoder
    scales = ((HEAD[0], head), (HEAD[1], head), (EMBEDDINGS, EMBEDDING_LR_SCALE))
    epochs = opts.epochs
    if epochs is None:
        epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, MIN_STEPS / steps_per_epoch))
        chosen["epochs"] = f"at least {MIN_STEPS} steps of {steps_per_epoch} per epoch"
    min_epochs = opts.min_epochs if opts.min_epochs is not None else min(MIN_EPOCHS, epochs)
    evals = max(1, opts.evals_per_epoch)
    eval_every = max(1, steps_per_epoch // evals)
    patience = opts.patience
    if patience is None:
        patience = max(2, int(round(PATIENCE_EPOCHS * steps_per_epoch / eval_every)))
        chosen["patience"] = f"{PATIENCE_EPOCHS:g} epochs of evaluations"
    plan = TrainingPlan(lr=lr, lr_scales=scales, tokens_per_batch=tpb, steps_per_epoch=steps_per_epoch,
                        epochs=float(epochs), min_epochs=float(min_epochs), patience=int(patience),
                        eval_every=eval_every, warmup_steps=0, chosen=chosen)
    plan.warmup_steps = int(opts.warmup_fraction * plan.max_steps)
    return plan


def _special_ids(special: dict) -> list[int]:
    return sorted(int(v) for v in special.values() if v is not None)


def build_classifier(shards, num_labels: int, opts: FinetuneOptions):
    """A BertForSequenceClassification whose encoder comes from `--from` or a fresh `--preset`."""
    from cellrank_fm.model import BertForSequenceClassification, preset_config
    from cellrank_fm.shards import check_vocabulary

    special = shards.special_tokens
    pooling = opts.pooling or ("cls" if special.get("cls") is not None and shards.model_version == "v2" else "mean")
    if pooling == "cls" and special.get("cls") is None:
        raise UserError("--pooling cls needs a <cls> token first in every cell (V2 tokens); use --pooling mean.")
    changes: dict[str, Any] = dict(num_labels=num_labels, pooling=pooling, special_token_ids=_special_ids(special))
    if opts.dropout is not None:
        changes.update(hidden_dropout_prob=opts.dropout, attention_probs_dropout_prob=opts.dropout)
    if (opts.from_model is None) == (opts.preset is None):
        raise UserError("give exactly one of --from MODEL_DIR (a pretrained model) or --preset NAME (train from scratch).")
    if opts.from_model is not None:
        from cellrank_fm.checkpoint import load_encoder
        from cellrank_fm.vocab import content_sha256

        model, info = load_encoder(opts.from_model, BertForSequenceClassification, **changes)
        sha = content_sha256(info.vocabulary) if info.vocabulary else None
        check_vocabulary(shards, model.config.vocab_size, sha, f"the model {opts.from_model}")
    else:
        size = shards.model_input_size or 2048
        changes.update(opts.model_overrides)
        cfg = preset_config(opts.preset, vocab_size=shards.vocab_size, **changes)
        if cfg.max_position_embeddings < size:
            cfg = cfg.replace(max_position_embeddings=size)
        if cfg.vocab_size != shards.vocab_size:
            raise UserError(
                f"preset {opts.preset!r} has a vocabulary of {cfg.vocab_size:,} tokens but the shards use "
                f"{shards.vocab_size:,}; use the preset 'tiny' or tokenize with the matching vocabulary."
            )
        torch.manual_seed(opts.seed)
        model = BertForSequenceClassification(cfg)
    freeze_layers(model, opts.freeze_layers)
    return model


def freeze_layers(model, n: int) -> None:
    """Freeze the embeddings and the first `n` encoder layers (n = 0: train everything)."""
    if n <= 0:
        return
    layers = model.bert.encoder.layer
    if n > len(layers):
        raise UserError(f"--freeze-layers {n} exceeds the model's {len(layers)} layers.")
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    for layer in layers[:n]:
        for p in layer.parameters():
            p.requires_grad_(False)


# ----------------------------------------------------------------------------- the task


@dataclass
class EarlyStopping:
    """After `min_epochs`, stop once `patience` evaluations in a row brought neither a lower
    validation loss nor a higher validation macro-F1, so training never ends while the loss is
    still falling. The best evaluation is the highest macro-F1 (ties: the lower loss)."""

    patience: int
    min_epochs: float
    best_f1: float = -1.0
    best_loss: float = float("inf")
    best_eval: int = -1
    lowest_loss: float = float("inf")
    since_progress: int = 0
    evaluations: int = 0
    stop: bool = False

    LOSS_TOLERANCE = 1e-4  # a loss lower by less than this is no progress

    def update(self, f1: float, loss: float, epoch: float) -> bool:
        """Record one evaluation; True when it is the best so far."""
        progress = loss < self.lowest_loss - self.LOSS_TOLERANCE or f1 > self.best_f1 + 1e-9
        self.lowest_loss = min(self.lowest_loss, loss)
        best = f1 > self.best_f1 + 1e-9 or (abs(f1 - self.best_f1) <= 1e-9 and loss < self.best_loss)
        if best:
            self.best_f1, self.best_loss, self.best_eval = f1, loss, self.evaluations
        self.evaluations += 1
        self.since_progress = 0 if progress else self.since_progress + 1
        if self.patience and self.since_progress >= self.patience and epoch >= self.min_epochs - 1e-9:
            self.stop = True
        return best


class CellClassificationTask:
    """Plugs cell classification into `train.train` (plan / batch / loss / evaluate / save).

    Early stopping follows `EarlyStopping`; the weights of its best evaluation are kept.
    """

    name = "finetune"

    def __init__(self, shards, split: Split, opts: FinetuneOptions, class_weights: torch.Tensor | None):
        self.shards = shards
        self.split = split
        self.opts = opts
        self.train_idx = split.train
        if opts.max_cells and len(self.train_idx) > opts.max_cells:
            rng = np.random.default_rng(opts.seed)
            self.train_idx = np.sort(rng.choice(self.train_idx, size=opts.max_cells, replace=False))
        lookup = {c: i for i, c in enumerate(split.classes)}
        self.codes = np.full(len(split.labels), -1, dtype=np.int64)
        for i in np.concatenate([split.train, split.validation, split.test]):
            self.codes[i] = lookup[split.labels[i]]
        self.lengths = shards.lengths.astype(np.int64)
        self.class_weights = class_weights
        self.plan_: TrainingPlan | None = None  # set by finetune_cells before training
        self.stopping: EarlyStopping | None = None  # set with the plan
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []
        # Validation tokens are read once and reused at every evaluation.
        self.val_tokens = shards.tokens(split.validation) if len(split.validation) else []

    def plan(self, epoch: int, rank: int, world_size: int, tokens_per_batch: int) -> list:
        idx = self.train_idx
        batches = token_budget_batches(self.lengths[idx], tokens_per_batch, shuffle=True,
                                       seed=self.opts.seed * 1000 + epoch)
        return [idx[b] for b in batches][rank::world_size]

    def batch(self, item, epoch: int, index: int):
        cells = self.shards.tokens(item)
        drop = self.opts.gene_dropout
        if drop > 0:
            # Each training cell loses a random share of its genes (special tokens stay); the
            # rest keep their order. Seeded by (seed, epoch, batch) so a resumed run is the same.
            rng = np.random.default_rng((self.opts.seed, epoch, index))
            special = np.asarray(_special_ids(self.shards.special_tokens))
            cells = [t[(rng.random(len(t)) >= drop) | np.isin(t, special)] for t in cells]
        return pack(cells, labels=torch.from_numpy(self.codes[item]))

    def loss(self, model, batch):
        logits = model(batch)
        w = None if self.class_weights is None else self.class_weights.to(logits.device)
        return F.cross_entropy(logits.float(), batch.labels, weight=w)

    def evaluate(self, model) -> dict[str, float]:
        if not len(self.split.validation):
            return {}
        proba = predict_tokens(model, self.val_tokens)
        y = self.codes[self.split.validation]
        m = classification_metrics(y, proba.argmax(1), self.split.classes)
        loss = float(F.nll_loss(torch.log(torch.from_numpy(proba).clamp_min(1e-9)), torch.from_numpy(y)))
        plan = self.plan_
        epoch = (len(self.history) + 1) * plan.eval_every / plan.steps_per_epoch
        self.history.append({"evaluation": len(self.history), "epoch": epoch, "macro_f1": m["macro_f1"],
                             "accuracy": m["accuracy"], "loss": loss})
        f1 = m["macro_f1"]
        if self.stopping.update(f1, loss, epoch):
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return {"macro_f1": f1, "accuracy": m["accuracy"], "loss": loss}

    def should_stop(self) -> bool:
        return self.stopping.stop

    def save(self, model, out_dir: Path, extra: dict) -> None:
        """Nothing mid-run: the best weights are kept in memory and written once at the end."""

    # What a checkpoint holds beyond the loop's own state, so that a resumed run ends as an
    # uninterrupted one: the best weights so far and the early-stopping record.
    def state_dict(self) -> dict:
        return {"stopping": dataclasses.asdict(self.stopping), "history": self.history, "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.stopping = EarlyStopping(**state["stopping"])
        self.history, self.best_state = state["history"], state["best_state"]


def class_weights_for(codes: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised so that a balanced set gets weight 1 per class."""
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


# ----------------------------------------------------------------------------- entry point


def finetune_cells(shard_dir: str | Path, out: str | Path, opts: FinetuneOptions,
                   with_baseline: bool = False, *, resume: bool = False, overwrite: bool = False,
                   baseline_adata: Any = ()) -> dict:
    """Fine-tune a cell classifier; write the model directory and reports to `out`.

    `baseline_adata`: the AnnData held in memory that the shards came from (or a list), for the baseline.

    The run builds `out` beside it (`cellrank_fm.outputs.partial_directory`), checkpointed at
    every evaluation; `resume=True` continues an interrupted run to the same result.
    Returns {"metrics": test metrics, "baseline": LR baseline metrics or None, "token_probe": token
    probe metrics or None, "split": Split}.
    """
    from cellrank_fm.checkpoint import save_model_dir
    from cellrank_fm.plots import confusion_matrix_png, curve_png
    from cellrank_fm.outputs import check_new_directory, partial_directory
    from cellrank_fm.shards import ShardSet
    from cellrank_fm.train import STATE, TrainConfig, train

    out = Path(out)
    if not resume:
        check_new_directory(out, overwrite)
    shards = ShardSet(shard_dir)
    available = list(shards.manifest.get("metadata_columns") or [])
    cell_ids = shards.column("cell_id")
    split = split_cells(
        cell_ids, shards.column, available, label=opts.label, split_by=opts.split_by,
        split_column=opts.split_column, seed=opts.seed, validation_fraction=opts.validation_fraction,
        test_fraction=opts.test_fraction, min_class_size=opts.min_class_size, hint=SHARD_HINT,
    )
    say = (lambda *a: None) if opts.quiet else (lambda msg: print(msg, flush=True))
    for msg in split.messages() + [split.summary()]:
        say(msg)
    if not len(split.test):
        raise UserError("the test split is empty; raise --test-fraction or add cells.")
    gene_set = shards.gene_set
    model = build_classifier(shards, len(split.classes), opts)
    codes_train = np.array([split.classes.index(x) for x in split.labels[split.train]])
    weights = class_weights_for(codes_train, len(split.classes)) if opts.class_weight else None
    info = {**shards.tokenization(), "label_column": opts.label}

    def save_model(m, directory: Path, extra: dict) -> None:
        save_model_dir(m, directory, shards.vocabulary, shards.medians, shards.symbols,
                       extra_config={**info, **extra}, labels=list(split.classes), gene_map=shards.gene_map)
        if gene_set is not None:
            write_json(gene_set, directory / GENE_SET_FILE, indent=2)

    record = {"options": {k: v for k, v in vars(opts).items() if k not in ("quiet", "device", "max_seconds")},
              "shards": shards.path.resolve(), "shards_manifest": shards.manifest, "baseline": with_baseline}
    with partial_directory(out, record, resume=resume, overwrite=overwrite,
                           has_checkpoint=lambda work: (work / "training" / STATE).is_file()) as (tmp, resuming):
        task = CellClassificationTask(shards, split, opts, weights)
        plan = plan_training(opts, model.config.hidden_size, opts.from_model is not None,
                             task.lengths[task.train_idx], lambda tpb: len(task.plan(0, 0, 1, tpb)))
        task.plan_ = plan
        task.stopping = EarlyStopping(plan.patience, plan.min_epochs)
        say(describe_plan(plan))
        cfg = TrainConfig(
            lr=plan.lr, lr_scales=plan.lr_scales, weight_decay=opts.weight_decay, warmup_steps=plan.warmup_steps,
            schedule="linear", max_steps=plan.max_steps, tokens_per_batch=plan.tokens_per_batch,
            eval_every=plan.eval_every, eval_at_start=False, checkpoint_every=plan.eval_every,
            log_every=max(1, min(10, plan.steps_per_epoch)), seed=opts.seed, device=opts.device,
            max_seconds=opts.max_seconds, quiet=opts.quiet, ema_decay=opts.ema_decay,
        )
        summary = train(model, task, cfg, tmp / "training", resume=resuming)
        # The best checkpoint (by validation macro-F1) becomes the model; without a validation
        # split, the last weights do.
        if task.best_state is not None:
            model.load_state_dict(task.best_state)
        save_model(model, tmp, {"step": summary["step"], "best_validation_macro_f1": task.stopping.best_f1})
        proba = predict_tokens(model, shards.tokens(split.test))
        y_test = split.codes("test")
        metrics = classification_metrics(y_test, proba.argmax(1), split.classes)
        metrics.update({
            "model": "cellrank fine-tuned classifier",
            "label_column": opts.label,
            "best_validation_macro_f1": task.stopping.best_f1 if task.stopping.best_f1 >= 0 else None,
            "steps": summary["step"], "steps_per_epoch": plan.steps_per_epoch,
            "stopped_early": task.stopping.stop, "seconds": summary["seconds"],
            "training": plan.record(),
            "split": {"how": split.how, "seed": opts.seed, "train": len(split.train),
                      "validation": len(split.validation), "test": len(split.test),
                      "dropped_classes": split.dropped},
            "validation_history": task.history,
        })
        baseline = probe = None
        if with_baseline:
            from cellrank_fm.baseline import run_baseline, table_from_shards, token_probe

            say("fitting the baseline and the token probe on the same split ...")
            baseline = run_baseline(shard_dir, opts.label, split=split, table=table_from_shards(shard_dir, baseline_adata),
                                    seed=opts.seed, class_weight=opts.class_weight)
            baseline.pop("messages", None)
            metrics["baseline"] = {k: baseline[k] for k in ("accuracy", "macro_f1", "per_class", "genes", "C")}
            probe = token_probe(shards, split, seed=opts.seed, class_weight=opts.class_weight)
            metrics["token_probe"] = {k: probe[k] for k in ("accuracy", "macro_f1", "per_class", "genes", "C")}
        metrics["warnings"] = quality_check(metrics, opts, summary)
        write_json(metrics, tmp / "metrics.json", indent=2)
        confusion_matrix_png(metrics["confusion_matrix"], split.classes, tmp / "confusion_matrix.png",
                             title=f"{opts.label}: test split")
        if task.history:
            curve_png({"validation macro-F1": (list(range(1, len(task.history) + 1)),
                                               [h["macro_f1"] for h in task.history])},
                      tmp / "validation_curve.png", xlabel="evaluation", ylabel="macro-F1")
        _write_split_csv(tmp / "split.csv", cell_ids, split)
        # The checkpoint only served --resume; the log stays.
        (tmp / "training" / STATE).unlink(missing_ok=True)
    return {"metrics": metrics, "baseline": baseline, "token_probe": probe, "split": split}


def describe_plan(plan: TrainingPlan) -> str:
    head = dict(plan.lr_scales).get(HEAD[0], 1.0) * plan.lr
    return (f"training plan: learning rate {plan.lr:.2g} (head {head:.2g}, gene embeddings "
            f"×{dict(plan.lr_scales).get(EMBEDDINGS, 1.0):g}), {plan.tokens_per_batch:,} tokens per batch "
            f"({plan.steps_per_epoch} steps per epoch), up to {plan.epochs:.3g} epochs ({plan.max_steps} steps), "
            f"early stopping after {plan.min_epochs:.3g} epochs once {plan.patience} evaluations bring no gain")


# A fine-tuned model this far below a baseline on the same split gets a warning.
LAG_WARNING = 0.05


def quality_check(metrics: dict, opts: FinetuneOptions, summary: dict) -> list[str]:
    """Warnings (printed and returned) when the model trails the baselines or never trained."""
    found: list[str] = []
    f1 = metrics["macro_f1"]
    behind = {name: metrics[key]["macro_f1"] for key, name in
              (("baseline", "the logistic-regression baseline"), ("token_probe", "the token probe"))
              if key in metrics and metrics[key]["macro_f1"] - f1 > LAG_WARNING}
    if behind:
        causes = []
        if summary.get("stopped_early") and opts.max_seconds is not None:
            causes.append("training was cut short by --max-seconds")
        if opts.epochs is not None or opts.lr is not None:
            causes.append("--epochs/--lr override the defaults; try without them")
        if opts.from_model is not None:
            causes.append(f"the pretrained model {opts.from_model} may not help (compare with --preset tiny, "
                          "and check its metrics.json for masked-gene accuracy above the frequency baseline)")
        causes.append("too little training for the data (raise --epochs or --min-epochs)")
        causes.append("too few genes per cell in the shards (tokenize with a larger --model-input-size)")
        worse = ", ".join(f"{name} ({v:.3f})" for name, v in behind.items())
        warn(f"test macro-F1 {f1:.3f} trails {worse} by more than {LAG_WARNING}. Likely causes: "
             + "; ".join(causes) + ".", found)
    if opts.from_model is not None:
        from cellrank_fm.outputs import read_json
        from cellrank_fm.pretrain import PRETRAIN_METRICS

        record = Path(opts.from_model) / PRETRAIN_METRICS
        if record.is_file():
            pre = read_json(record, "")
            if pre.get("warnings"):
                warn(f"the pretrained model {opts.from_model} did not beat the gene-frequency baseline at "
                     "masked-gene prediction, so it brings little beyond a new model; pretrain longer or use "
                     "--preset tiny.", found)
    return found


def _write_split_csv(path: Path, cell_ids, split: Split) -> None:
    import pandas as pd

    df = pd.DataFrame({"cell_id": list(cell_ids), "label": split.labels, "split": split.assignment()})
    df.to_csv(path, index=False)


# ----------------------------------------------------------------------------- gene classification


@dataclass
class GeneTaskOptions:
    from_model: str | Path | None = None
    preset: str | None = None
    folds: int = 5
    seed: int = 0
    epochs: float = 3.0
    lr: float | None = None  # None: as for cells (`scratch_lr`, a fraction of it when pretrained)
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    tokens_per_batch: int = 16384
    freeze_layers: int = 0
    max_cells: int | None = 2000
    class_weight: bool = True
    device: str = "auto"
    quiet: bool = False
    model_overrides: dict[str, Any] = field(default_factory=dict)


def read_gene_labels(path: str | Path, vocabulary: dict[str, int]) -> tuple[list[str], dict[str, int], dict]:
    """Gene classes from a CSV with one column per class (the class name in the header, Ensembl
    IDs below). Returns (classes, gene id -> class index for genes in the vocabulary, report)."""
    import pandas as pd

    from cellrank_fm.genes import normalise_id

    path = Path(path)
    if not path.is_file():
        raise UserError(f"gene label file {path} does not exist.")
    try:
        df = pd.read_csv(path, dtype=str)
    except Exception as err:  # noqa: BLE001 - any parse failure is the file's fault
        raise UserError(f"{path} is not a readable CSV ({err}).") from None
    if df.shape[1] < 2:
        raise UserError(f"{path} needs one column per gene class (at least two), each listing Ensembl IDs.")
    classes = [str(c) for c in df.columns]
    labels: dict[str, int] = {}
    listed = twice = 0
    missing: dict[str, int] = {c: 0 for c in classes}
    for k, c in enumerate(classes):
        for raw in df[c].dropna():
            gid = normalise_id(str(raw)) or str(raw).strip().upper()
            if not gid:
                continue
            listed += 1
            if gid in labels and labels[gid] != k:
                twice += 1
                labels[gid] = -1
                continue
            if gid not in vocabulary:
                missing[c] += 1
                continue
            labels[gid] = k
    labels = {g: k for g, k in labels.items() if k >= 0}
    report = {"listed": listed, "in_two_classes": twice, "not_in_vocabulary": missing}
    return classes, labels, report


class GeneClassificationTask:
    """Token-level labels: a token is labelled when its gene is one of the fold's training genes."""

    name = "finetune genes"

    def __init__(self, tokens: list[np.ndarray], token_class: np.ndarray, seed: int,
                 class_weights: torch.Tensor | None):
        self.tokens = tokens
        self.token_class = token_class  # [vocab] class index for training genes, -100 elsewhere
        self.lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        self.seed = seed
        self.class_weights = class_weights

    def plan(self, epoch, rank, world_size, tokens_per_batch):
        batches = token_budget_batches(self.lengths, tokens_per_batch, shuffle=True, seed=self.seed * 1000 + epoch)
        return batches[rank::world_size]

    def batch(self, item, epoch, index):
        toks = [self.tokens[i] for i in item]
        labels = self.token_class[np.concatenate(toks).astype(np.int64)]
        return pack(toks, labels=torch.from_numpy(labels))

    def loss(self, model, batch):
        logits = model(batch)
        w = None if self.class_weights is None else self.class_weights.to(logits.device)
        return F.cross_entropy(logits.float(), batch.labels, weight=w, ignore_index=-100)

    def evaluate(self, model):
        return {}

    def save(self, model, out_dir, extra):
        """Nothing while training: `finetune_genes` saves the final model itself."""


def finetune_genes(shard_dir: str | Path, out: str | Path, gene_labels: str | Path, opts: GeneTaskOptions,
                   *, overwrite: bool = False) -> dict:
    """k-fold cross-validation over genes: train a token classifier on the other folds' genes,
    score the held-out genes by their mean predicted probability, report ROC AUC per fold."""
    from sklearn.metrics import roc_auc_score, roc_curve
    from sklearn.model_selection import StratifiedKFold

    from cellrank_fm.checkpoint import save_model_dir
    from cellrank_fm.model import BertForTokenClassification, preset_config
    from cellrank_fm.outputs import check_new_directory, new_directory
    from cellrank_fm.plots import roc_png
    from cellrank_fm.shards import ShardSet, check_vocabulary
    from cellrank_fm.train import TrainConfig, train

    out = Path(out)
    check_new_directory(out, overwrite)
    if (opts.from_model is None) == (opts.preset is None):
        raise UserError("give exactly one of --from MODEL_DIR (a pretrained model) or --preset NAME.")
    shards = ShardSet(shard_dir)
    vocab = shards.vocabulary
    classes, labels, report = read_gene_labels(gene_labels, vocab)
    say = (lambda *a: None) if opts.quiet else (lambda msg: print(msg, flush=True))
    # Cells: a seeded sample of the shards.
    n = len(shards)
    rng = np.random.default_rng(opts.seed)
    cells = np.arange(n) if not opts.max_cells or n <= opts.max_cells else np.sort(
        rng.choice(n, size=opts.max_cells, replace=False))
    tokens = shards.tokens(cells)
    seen = np.zeros(shards.vocab_size, dtype=bool)
    for t in tokens:
        seen[t] = True
    genes = np.array(sorted(g for g in labels if seen[vocab[g]]))
    unseen = len(labels) - len(genes)
    y = np.array([labels[g] for g in genes])
    say(f"{len(genes)} labelled genes occur in the {len(cells):,} cells used "
        f"({unseen} labelled genes never occur, {sum(report['not_in_vocabulary'].values())} are not in the "
        f"vocabulary, {report['in_two_classes']} are listed in two classes and were left out)")
    counts = np.bincount(y, minlength=len(classes)) if len(y) else np.zeros(len(classes), int)
    if len(y) == 0 or counts.min() < opts.folds:
        raise UserError(
            f"each gene class needs at least --folds ({opts.folds}) genes that occur in the cells; have "
            + ", ".join(f"{c} {k}" for c, k in zip(classes, counts)) + "."
        )
    token_ids = np.array([vocab[g] for g in genes])

    def fit(genes_idx: np.ndarray, k: int, directory: Path):
        """A token classifier trained on the genes `genes_idx` (run `k` seeds it)."""
        token_class = np.full(shards.vocab_size, -100, dtype=np.int64)
        token_class[token_ids[genes_idx]] = y[genes_idx]
        if opts.from_model is not None:
            from cellrank_fm.checkpoint import load_encoder
            from cellrank_fm.vocab import content_sha256

            model, info = load_encoder(opts.from_model, BertForTokenClassification, num_labels=len(classes))
            sha = content_sha256(info.vocabulary) if info.vocabulary else None
            check_vocabulary(shards, model.config.vocab_size, sha, f"the model {opts.from_model}")
        else:
            torch.manual_seed(opts.seed + k)
            cfg = preset_config(opts.preset, vocab_size=shards.vocab_size, num_labels=len(classes),
                                **opts.model_overrides)
            model = BertForTokenClassification(cfg)
        freeze_layers(model, opts.freeze_layers)
        weights = class_weights_for(y[genes_idx], len(classes)) if opts.class_weight else None
        task = GeneClassificationTask(tokens, token_class, opts.seed + k, weights)
        steps_per_epoch = max(1, len(task.plan(0, 0, 1, opts.tokens_per_batch)))
        max_steps = max(1, int(round(opts.epochs * steps_per_epoch)))
        head_lr = scratch_lr(model.config.hidden_size)
        lr = opts.lr or head_lr * (PRETRAINED_LR_FRACTION if opts.from_model is not None else 1.0)
        cfg_t = TrainConfig(lr=lr, lr_scales=((HEAD[0], head_lr / lr), (EMBEDDINGS, EMBEDDING_LR_SCALE)), weight_decay=opts.weight_decay, max_steps=max_steps,
                            warmup_steps=int(opts.warmup_fraction * max_steps), tokens_per_batch=opts.tokens_per_batch,
                            eval_every=0, eval_at_start=False, log_every=max(1, min(10, steps_per_epoch)),
                            seed=opts.seed + k, device=opts.device, quiet=opts.quiet)
        train(model, task, cfg_t, directory)
        (directory / "trainer_state.pt").unlink(missing_ok=True)
        return model, max_steps

    folds = StratifiedKFold(n_splits=opts.folds, shuffle=True, random_state=opts.seed)
    results, curves = [], []
    with new_directory(out, overwrite), atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for k, (tr, te) in enumerate(folds.split(genes, y)):
            model, max_steps = fit(tr, k, tmp / f"fold{k}")
            scores = gene_scores(model, tokens, token_ids[te])
            if len(classes) == 2:
                auc = float(roc_auc_score(y[te], scores[:, 1]))
                fpr, tpr, _ = roc_curve(y[te], scores[:, 1])
                curves.append((fpr, tpr, f"fold {k + 1} (AUC {auc:.2f})"))
            else:
                auc = float(roc_auc_score(y[te], scores, multi_class="ovr", average="macro"))
            results.append({"fold": k + 1, "train_genes": int(len(tr)), "test_genes": int(len(te)),
                            "roc_auc": auc, "steps": max_steps})
            say(f"fold {k + 1}/{opts.folds}: ROC AUC {auc:.3f} on {len(te)} held-out genes")
        aucs = np.array([r["roc_auc"] for r in results])
        metrics = {"task": "gene classification", "classes": classes, "genes": int(len(genes)),
                   "cells": int(len(cells)), "folds": results, "roc_auc_mean": float(aucs.mean()),
                   "roc_auc_sd": float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0,
                   "gene_labels": str(gene_labels), "labels_report": report, "seed": opts.seed}
        if curves:
            roc_png(curves, tmp / "roc.png", title=f"{classes[1]} vs {classes[0]}: held-out genes")
        # The model to use: trained on every labelled gene, then asked about every gene.
        say("training the final model on all labelled genes")
        model, _ = fit(np.arange(len(genes)), opts.folds, tmp / "model")
        save_model_dir(model, tmp / "model", vocab, shards.medians, shards.symbols, labels=classes,
                       extra_config={**shards.tokenization(), "task": "gene classification"}, gene_map=shards.gene_map)
        metrics["scored_genes"] = _write_gene_scores(model, tokens, seen, vocab, shards.symbols, classes,
                                                     dict(zip(genes, y)), tmp / "gene_scores.csv")
        write_json(metrics, tmp / "metrics.json", indent=2)
    return metrics


def _write_gene_scores(model, tokens, seen: np.ndarray, vocab: dict[str, int], symbols: dict[str, str],
                       classes: list[str], labelled: dict[str, int], path: Path) -> int:
    """Every gene occurring in `tokens`: its mean class probabilities, occurrences and label."""
    import pandas as pd

    ids = np.flatnonzero(seen)
    name_of = {i: g for g, i in vocab.items()}
    genes = [name_of[i] for i in ids]
    occurrences = np.bincount(np.concatenate(tokens).astype(np.int64), minlength=len(seen))[ids]
    table = pd.DataFrame({
        "gene": genes,
        "symbol": [symbols.get(g, "") for g in genes],
        "occurrences": occurrences,
        "label": [classes[labelled[g]] if g in labelled else "" for g in genes],
    })
    scores = gene_scores(model, tokens, ids)
    for c, name in enumerate(classes):
        table[f"p_{name}"] = scores[:, c]
    table.sort_values(f"p_{classes[-1]}", ascending=False).to_csv(path, index=False)
    return len(table)
