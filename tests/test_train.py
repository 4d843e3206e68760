"""The training loop: resume equals an uninterrupted run; schedules; refusals."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cellrank_fm.errors import UserError
from cellrank_fm.model import BertForMaskedLM, preset_config
from cellrank_fm.pretrain import MaskedGeneTask, masking_spec, split_cells
from cellrank_fm.shards import ShardSet
from cellrank_fm.train import TrainConfig, WeightAverage, lr_lambda, train
from test_shards import write_shards


class Interrupted(Exception):
    pass


class InterruptedTask(MaskedGeneTask):
    """The real task, made to fail once after `fail_after` batches (a crash mid-run)."""

    fail_after: int = -1

    def batch(self, item, epoch, index):
        if self.fail_after == 0:
            raise Interrupted()
        self.fail_after -= 1
        return super().batch(item, epoch, index)


def _setup(tmp_path, seed=0):
    rng = np.random.default_rng(0)
    parts = [[rng.permutation(np.arange(2, 64))[: rng.integers(5, 30)] for _ in range(40)] for _ in range(2)]
    shards = ShardSet(write_shards(tmp_path / "shards", parts))
    train_cells, val_cells = split_cells(shards, 0.1, 100, seed)
    task = InterruptedTask(shards=shards, train_cells=train_cells, val_shards=shards, val_cells=val_cells,
                           spec=masking_spec(shards, 64), seed=seed, model_extra=shards.tokenization(),
                           eval_tokens_per_batch=256)
    return task


def _model():
    torch.manual_seed(0)
    # Dropout on, so that resuming must also reproduce the dropout masks.
    return BertForMaskedLM(preset_config("tiny", vocab_size=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_reproduces_uninterrupted_run(tmp_path, ema_decay):
    cfg = TrainConfig(lr=3e-3, warmup_steps=3, schedule="cosine", max_steps=12, grad_accum=2,
                      tokens_per_batch=128, checkpoint_every=5, log_every=1, quiet=True, seed=3,
                      ema_decay=ema_decay)
    task = _setup(tmp_path)
    summary = train(_model(), task, cfg, tmp_path / "whole")
    assert summary["step"] == 12

    task = _setup(tmp_path / "again")
    task.fail_after = 2 * 7 + 1  # dies inside step 8, after the checkpoint at step 5
    with pytest.raises(Interrupted):
        train(_model(), task, cfg, tmp_path / "broken")
    state = torch.load(tmp_path / "broken" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 5
    # A fresh model object: everything must come from the checkpoint.
    task.fail_after = -1
    resumed = train(BertForMaskedLM(preset_config("tiny", vocab_size=64, hidden_dropout_prob=0.1,
                                                  attention_probs_dropout_prob=0.1)),
                    task, cfg, tmp_path / "broken", resume=True)
    assert resumed["step"] == 12
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "broken" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    fresh = _model().state_dict()
    assert not torch.equal(a["bert.embeddings.LayerNorm.weight"], fresh["bert.embeddings.LayerNorm.weight"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(1, 13))  # the crashed run's records after step 5 were dropped
    # With a weight average, the model saved is the average (also restored on resume), not the
    # last step's weights, which the checkpoint keeps for training on.
    last = torch.load(tmp_path / "whole" / "trainer_state.pt", weights_only=False)
    differs = not torch.equal(a["bert.embeddings.LayerNorm.weight"], last["model"]["bert.embeddings.LayerNorm.weight"])
    assert differs == (ema_decay > 0)
    assert ("weight_average" in last) == (ema_decay > 0)


def test_weight_average_follows_its_warmed_up_decay():
    model = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(model.weight)
    avg = WeightAverage(model, decay=0.5)
    torch.nn.init.ones_(model.weight)
    kept = 1.0
    for n in range(1, 6):
        avg.update(model)
        kept *= min(0.5, (1 + n) / (10 + n))  # the share of the initial zeros still in the average
        torch.testing.assert_close(avg.model.weight, torch.full((1, 2), 1.0 - kept))
    assert not avg.model.weight.requires_grad
    with pytest.raises(UserError, match="decay"):
        TrainConfig(ema_decay=1.0)


def test_refuses_to_overwrite_or_resume_nothing(tmp_path):
    task = _setup(tmp_path)
    cfg = TrainConfig(max_steps=2, tokens_per_batch=128, quiet=True)
    train(_model(), task, cfg, tmp_path / "run")
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a training run"):
        train(_model(), task, cfg, tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    with pytest.raises(UserError, match="no trainer_state.pt"):
        train(_model(), task, cfg, tmp_path / "other", resume=True)


def test_schedules():
    lin = lr_lambda(TrainConfig(warmup_steps=10, max_steps=110, schedule="linear"))
    cos = lr_lambda(TrainConfig(warmup_steps=10, max_steps=110, schedule="cosine"))
    assert lin(0) < lin(5) < lin(9) < 1.0 and lin(10) == 1.0
    assert lin(60) == pytest.approx(0.5) and lin(110) == 0.0
    assert cos(60) == pytest.approx(0.5) and cos(35) > lin(35) and cos(110) == pytest.approx(0.0)
