"""Two CPU processes with the gloo backend (what torchrun sets up) end with identical weights."""

import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp

from cellrank_fm.model import BertForMaskedLM, preset_config
from cellrank_fm.pretrain import MaskedGeneTask, masking_spec, split_cells
from cellrank_fm.shards import ShardSet
from cellrank_fm.train import TrainConfig, train
from test_shards import write_shards


def _worker(rank, world, port, shards_dir, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    shards = ShardSet(shards_dir)
    train_cells, val_cells = split_cells(shards, 0.1, 100, seed=0)
    task = MaskedGeneTask(shards=shards, train_cells=train_cells, val_shards=shards, val_cells=val_cells,
                          spec=masking_spec(shards, 64), seed=0, model_extra=shards.tokenization(),
                          eval_tokens_per_batch=256)
    plan = task.plan(0, rank, world, 128)
    torch.manual_seed(0)
    model = BertForMaskedLM(preset_config("tiny", vocab_size=64, hidden_dropout_prob=0.1))
    cfg = TrainConfig(lr=3e-3, max_steps=4, grad_accum=2, tokens_per_batch=128, log_every=2, quiet=True, device="cpu")
    summary = train(model, task, cfg, out_dir)
    torch.save({"state": model.state_dict(), "cells": np.concatenate(plan), "world": summary["world_size"]},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_ranks_end_identical(tmp_path):
    rng = np.random.default_rng(0)
    parts = [[rng.permutation(np.arange(2, 64))[: rng.integers(5, 30)] for _ in range(30)] for _ in range(2)]
    shards_dir = write_shards(tmp_path / "shards", parts)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    out.mkdir()
    mp.spawn(_worker, args=(2, port, str(shards_dir), str(out)), nprocs=2, join=True)
    r0 = torch.load(out / "rank0.pt", weights_only=False)
    r1 = torch.load(out / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2
    # Each rank read its own part of the shards...
    assert not set(r0["cells"].tolist()) & set(r1["cells"].tolist())
    # ...yet gradients were averaged, so the weights are the same on both.
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    torch.manual_seed(0)
    init = BertForMaskedLM(preset_config("tiny", vocab_size=64)).state_dict()
    assert not torch.equal(init["bert.encoder.layer.0.attention.self.query.weight"],
                           r0["state"]["bert.encoder.layer.0.attention.self.query.weight"])
    assert (out / "model.safetensors").is_file() and (out / "trainer_state.pt").is_file()
