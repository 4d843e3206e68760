"""The accelerator paths on CPU: the packed varlen path (with the pure-PyTorch reference put in
place of the flash kernel) against padded SDPA, the capability check and its fallback, the
precision choices, bf16 autocast through the training loop, and torch.compile."""

import inspect
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cellrank_fm.accel as accel
import cellrank_fm.model as model_mod
from cellrank_fm.batching import MaskingSpec, pack, pack_masked
from cellrank_fm.finetune import freeze_layers
from cellrank_fm.model import BertForMaskedLM, BertForSequenceClassification, ModelConfig
from cellrank_fm.train import TrainConfig, precision_for, train

VOCAB = 50
CLS, EOS = 2, 3  # V2 special tokens in these tests; gene tokens are 4..VOCAB-1


def _config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                initializer_range=0.2, pooling="mean", special_token_ids=[CLS, EOS], num_labels=3)
    base.update(kw)
    return ModelConfig(**base)


def _qkv(lengths, heads=2, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    q, k, v = (torch.randn(total, heads, dim, generator=g, dtype=dtype) for _ in range(3))
    return q, k, v, cu, max(lengths)


# ----------------------------------------------------------------------------- the reference kernel


def test_reference_has_the_kernel_signature_and_computes_attention_per_cell():
    kernel = pytest.importorskip("torch.nn.attention.varlen").varlen_attn
    real = list(inspect.signature(kernel).parameters)
    ours = list(inspect.signature(accel.reference_varlen_attn).parameters)
    assert ours[:7] == real[:7] == ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k"]
    assert {"scale", "window_size", "return_aux"} <= set(real) & set(ours)

    lengths = [1, 5, 3]
    q, k, v, cu, longest = _qkv(lengths)
    for causal, window in ((False, (-1, -1)), (True, (-1, 0))):
        out = accel.reference_varlen_attn(q, k, v, cu, cu, longest, longest, scale=0.3, window_size=window)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            want = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                  v[a:b].transpose(0, 1), is_causal=causal, scale=0.3)
            torch.testing.assert_close(out[a:b], want.transpose(0, 1), atol=1e-6, rtol=1e-6)
    # A length-1 cell attends only to itself: its output is its own value vector.
    torch.testing.assert_close(accel.reference_varlen_attn(q, k, v, cu, cu, longest, longest)[0], v[0])


def test_reference_enforces_the_kernel_input_contract():
    q, k, v, cu, longest = _qkv([2, 4])
    call = accel.reference_varlen_attn
    with pytest.raises(ValueError, match="int32"):
        call(q, k, v, cu.long(), cu.long(), longest, longest)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        call(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, cu, cu, longest, longest)
    with pytest.raises(ValueError, match="longer than the max"):
        call(q, k, v, cu, cu, 3, 3)
    with pytest.raises(ValueError, match="rise from 0"):
        call(q, k, v, torch.tensor([0, 2, 5], dtype=torch.int32), cu, longest, longest)
    with pytest.raises(ValueError, match="packed"):
        call(q.reshape(6, -1), k, v, cu, cu, longest, longest)


# ----------------------------------------------------------------------------- packed == padded

# (model kind, cells as lengths or explicit token lists, layers frozen)
CASES = {
    "length-1 cells": ("mlm", [1, 1, 9, 1, 4], 0),
    "one cell": ("mlm", [17], 0),
    "cells at the maximum length": ("mlm", [24, 24, 5], 0),
    # No padding at all: the padded path takes the packed tokens as its grid, without a mask.
    "cells all of one length": ("cls", [11, 11, 11], 0),
    "mixed V1/V2 special tokens": ("cls", "mixed", 0),
    "after --freeze-layers 1": ("cls", [24, 1, 6, 13], 1),
}


def _cells(spec, rng):
    if spec == "mixed":  # V2 cells (<cls> genes <eos>), V1 cells (genes only), an empty V2 cell
        genes = lambda n: rng.integers(4, VOCAB, size=n)  # noqa: E731
        return [np.r_[CLS, genes(7), EOS], genes(5), np.r_[CLS, EOS], genes(1), np.r_[CLS, genes(22), EOS]]
    return [rng.integers(4, VOCAB, size=n) for n in spec]


def _loss_and_grads(model, kind, batch, labels):
    model.zero_grad(set_to_none=True)
    if kind == "mlm":
        loss, logits, _ = model(batch, labels=labels)
    else:
        logits = model(batch)
        loss = F.cross_entropy(logits, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("case", list(CASES))
def test_packed_varlen_path_equals_padded_sdpa_fp32(case, monkeypatch):
    kind, spec, frozen = CASES[case]
    rng = np.random.default_rng(7)
    cells = _cells(spec, rng)
    torch.manual_seed(3)
    model = (BertForMaskedLM if kind == "mlm" else BertForSequenceClassification)(_config()).train()
    freeze_layers(model, frozen)
    batch = pack(cells)
    if kind == "mlm":
        labels = torch.where(torch.rand(batch.num_tokens) < 0.5, batch.input_ids, -100)
        labels[0] = batch.input_ids[0]
    else:
        labels = torch.as_tensor(rng.integers(0, 3, size=batch.num_seqs))

    model.set_attn_impl("sdpa")
    want = _loss_and_grads(model, kind, batch, labels)

    calls = []

    def kernel(*args, **kw):
        calls.append(args[3].dtype)
        return accel.reference_varlen_attn(*args, **kw)

    monkeypatch.setattr(model_mod, "_varlen_attn", kernel)
    model.set_attn_impl("varlen")
    got = _loss_and_grads(model, kind, batch, labels)

    assert calls == [torch.int32] * 2  # both layers went through the substituted kernel
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert got[2].keys() == want[2].keys()
    if frozen:
        assert not any(n.startswith(("bert.embeddings", "bert.encoder.layer.0.")) for n in got[2])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], atol=1e-5, rtol=1e-5, msg=name)
    # The comparison is not vacuous: the gradients are far from zero.
    assert max(g.abs().max().item() for g in want[2].values()) > 1e-2


def test_a_wrong_kernel_is_caught_by_the_comparison(monkeypatch):
    """The equality above would fail for a kernel that leaks attention across cells."""
    cells = _cells([3, 5], np.random.default_rng(0))
    torch.manual_seed(0)
    model = BertForMaskedLM(_config()).eval()
    batch = pack(cells)
    want = model(batch)

    def leaky(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        whole = torch.tensor([0, q.shape[0]], dtype=torch.int32)
        return accel.reference_varlen_attn(q, k, v, whole, whole, q.shape[0], q.shape[0], **kw)

    monkeypatch.setattr(model_mod, "_varlen_attn", leaky)
    model.set_attn_impl("varlen")
    assert (model(batch) - want).abs().max() > 1e-3


# ----------------------------------------------------------------------------- capability check


def _tiny_model(**kw):
    return BertForMaskedLM(_config(**kw))


def test_cpu_uses_padded_sdpa_without_a_warning():
    model = _tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        impl, reason = accel.choose_attention(model, accel.resolve_precision("cpu"))
    assert impl == "sdpa" and "cpu" in reason
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == {"sdpa"}


def test_fallback_names_the_reason_once(monkeypatch):
    monkeypatch.setattr(accel, "_warned", set())
    monkeypatch.setattr(accel, "_probed", {})
    model = _tiny_model()
    cuda_bf16 = accel.Precision(torch.device("cuda"), torch.bfloat16)

    monkeypatch.setattr(accel, "_kernel", None)
    assert "needs torch >= 2.10" in accel.varlen_support("cuda", torch.bfloat16, 8)
    monkeypatch.undo()
    monkeypatch.setattr(accel, "_warned", set())
    monkeypatch.setattr(accel, "_probed", {})
    if accel._kernel is None:
        pytest.skip("this torch has no varlen kernel")
    assert "float32" in accel.varlen_support("cuda", torch.float32, 8)
    assert "head size 12" in accel.varlen_support("cuda", torch.bfloat16, 12)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert "Tesla T4 is sm75" in accel.varlen_support("cuda", torch.bfloat16, 8)

    # A capable-looking GPU whose kernel call fails (here: no GPU at all): one warning, SDPA.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    with pytest.warns(RuntimeWarning, match="using padded SDPA instead: a probe call failed") as record:
        impl, _ = accel.choose_attention(model, cuda_bf16)
        accel.choose_attention(model, cuda_bf16)
    assert impl == "sdpa" and len(record) == 1
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == {"sdpa"}


def test_varlen_training_with_attention_dropout_says_so(monkeypatch):
    monkeypatch.setattr(accel, "_warned", set())
    monkeypatch.setattr(accel, "varlen_support", lambda *a: None)
    monkeypatch.setattr(accel, "_probe", lambda *a: None)
    model = _tiny_model(attention_probs_dropout_prob=0.02)
    cuda_bf16 = accel.Precision(torch.device("cuda"), torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="attention_probs_dropout_prob=0.02 is not applied"):
        assert accel.choose_attention(model, cuda_bf16, training=True) == ("varlen", None)
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == {"auto"}  # the kernel for half precision


def test_precision_choices():
    assert accel.resolve_precision("cpu").dtype == torch.float32
    assert accel.resolve_precision("cpu", "bf16").dtype == torch.bfloat16
    assert not accel.resolve_precision("cpu", "bf16").grad_scaler().is_enabled()
    with pytest.raises(ValueError):
        accel.resolve_precision("cpu", "fp8")
    assert precision_for(TrainConfig(precision="bf16", bf16=False), torch.device("cpu")).dtype == torch.float32


# ----------------------------------------------------------------------------- the training loop


class ToyTask:
    """Masked-gene training on a fixed list of cells, recording the autocast state of each loss."""

    name = "toy"

    def __init__(self, lengths, seed=0):
        rng = np.random.default_rng(seed)
        self.cells = [rng.integers(4, VOCAB, size=n) for n in lengths]
        self.spec = MaskingSpec(vocab_size=VOCAB, mask_id=1, special_ids=(0, 1, CLS, EOS))
        self.autocast: list = []
        self.losses: list[float] = []

    def plan(self, epoch, rank, world_size, tokens_per_batch):
        # Batches of 1 to 3 cells of different lengths, so that shapes change every step.
        return [np.arange(i, min(i + 1 + (i // 3) % 3, len(self.cells))) for i in range(0, len(self.cells), 3)]

    def batch(self, item, epoch, index):
        rng = np.random.default_rng(1000 * epoch + index)
        return pack_masked([self.cells[i] for i in item], self.spec, rng)

    def loss(self, model, batch):
        self.autocast.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        loss = model(batch, labels=batch.labels)[0]
        self.losses.append(loss.item())
        return loss

    def evaluate(self, model):
        return {}

    def save(self, model, out_dir, extra):
        pass


def _run(tmp_path, name, steps, lengths=(5, 9, 2, 14, 1, 7, 11, 3, 16), **cfg):
    torch.manual_seed(0)
    model = BertForMaskedLM(_config())
    task = ToyTask(lengths)
    config = TrainConfig(lr=1e-3, max_steps=steps, tokens_per_batch=4096, quiet=True, device="cpu",
                         eval_at_start=False, log_every=1, **cfg)
    train(model, task, config, tmp_path / name)
    return task


def test_bf16_autocast_on_cpu_through_the_training_loop(tmp_path):
    fp32 = _run(tmp_path, "fp32", 3)
    bf16 = _run(tmp_path, "bf16", 3, precision="bf16")
    off = _run(tmp_path, "off", 1, precision="bf16", bf16=False)
    assert fp32.autocast == [None] * 3 and off.autocast == [None]
    assert bf16.autocast == [torch.bfloat16] * 3
    assert np.isfinite(bf16.losses).all()
    np.testing.assert_allclose(bf16.losses, fp32.losses, rtol=0.03)
    assert bf16.losses != fp32.losses  # bf16 really ran: the numerics differ a little


def test_compile_matches_eager_with_bounded_recompilation(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    steps = 4
    eager = _run(tmp_path, "eager", steps)
    before = counters["stats"]["unique_graphs"]
    compiled = _run(tmp_path, "compiled", steps, compile=True)
    graphs = counters["stats"]["unique_graphs"] - before
    np.testing.assert_allclose(compiled.losses, eager.losses, rtol=1e-4, atol=1e-4)
    # Batches of 1, 2 and 3 cells of changing lengths: one graph for the first batch (no graph
    # breaks), one recompile when the cell count leaves 1 (size-1 specialisation), then none
    # (measured with aot_eager: 1 + 1 + 0 graphs); not one per batch shape.
    assert 1 <= graphs <= 3, graphs


def test_compiled_inference_matches_eager_with_bounded_recompilation():
    """`--compile` for predict / embed / explain / perturb: the encoder compiled in place (what
    `load_model(compile=True)` and `as_model(..., compile=True)` do) gives eager's outputs on
    batches of changing shapes, including equal-length batches (no padding, no key mask)."""
    from dataclasses import replace

    from torch._dynamo.utils import counters

    from cellrank_fm.checkpoint import ModelDirInfo
    from cellrank_fm.inference import LoadedModel, as_model, embed_tokens, predict_tokens

    torch.manual_seed(0)
    cfg = _config(num_labels=3, pooling="mean")
    model = BertForSequenceClassification(cfg).eval()
    rng = np.random.default_rng(5)
    # Sorted by length and cut at 48 tokens: batches of 1 to 8 cells; lengths 6 twice over make
    # equal-length batches, which take the grid path without a mask.
    cells = [rng.integers(4, VOCAB, size=n) for n in (1, 3, 5, 6, 6, 6, 6, 9, 12, 17, 20, 24, 24)]
    want_p = predict_tokens(model, cells, tokens_per_batch=48)
    want_e = embed_tokens(model, cells, tokens_per_batch=48)

    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    info = ModelDirInfo(path=None, config=cfg, architecture=model.architecture)
    lm = as_model(LoadedModel(model, info, {}, {}, "v1", None, None, None, None), compile=True)
    assert lm.model is model and model.bert._compiled_call_impl is not None
    compiled = model.bert._compiled_call_impl
    assert accel.compile_encoder(model).bert._compiled_call_impl is compiled  # compiling twice: no-op
    got_p = predict_tokens(model, cells, tokens_per_batch=48)
    got_e = embed_tokens(model, cells, tokens_per_batch=48)
    graphs = counters["stats"]["unique_graphs"] - before
    np.testing.assert_allclose(got_p, want_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_e, want_e, rtol=1e-5, atol=1e-5)
    assert np.abs(want_e).max() > 0.1
    # 7 batches, each run twice (predict and embed share the encoder graph); not one graph per shape.
    assert 1 <= graphs <= 4, graphs  # measured: 2
    assert replace(lm).model is model


def test_gradient_scaler_state_survives_a_resume(tmp_path, monkeypatch):
    """The fp16 loss scale is saved in the training checkpoint and restored on resume. No GPU:
    an enabled CPU GradScaler stands in for fp16's, its scale doubling every step
    (growth_interval=1, no overflow) so that the resumed scale tells where it started."""
    import cellrank_fm.train as train_mod

    scalers = []

    def enabled_scaler(self):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1))
        return scalers[-1]

    monkeypatch.setattr(accel.Precision, "grad_scaler", enabled_scaler)
    torch.manual_seed(0)
    model = BertForMaskedLM(_config())
    cfg = dict(lr=1e-3, tokens_per_batch=4096, quiet=True, device="cpu", eval_at_start=False, log_every=1)
    train(model, ToyTask((5, 9, 2, 14, 1, 7)), TrainConfig(max_steps=3, **cfg), tmp_path / "run")
    assert scalers[0].get_scale() == 2.0 ** 13
    saved = torch.load(tmp_path / "run" / train_mod.STATE, weights_only=False)["scaler"]
    assert saved["scale"] == 2.0 ** 13 and saved["_growth_tracker"] == 0
    train(model, ToyTask((5, 9, 2, 14, 1, 7)), TrainConfig(max_steps=5, **cfg), tmp_path / "run", resume=True)
    assert scalers[1].get_scale() == 2.0 ** 15  # 2 ** 12 had it restarted from its initial scale

    # A checkpoint from a disabled scaler (bf16, fp32: empty state) resumes with a fresh one.
    state = torch.load(tmp_path / "run" / train_mod.STATE, weights_only=False)
    state["scaler"] = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert state["scaler"] == {}
    torch.save(state, tmp_path / "run" / train_mod.STATE)
    train(model, ToyTask((5, 9, 2, 14, 1, 7)), TrainConfig(max_steps=6, **cfg), tmp_path / "run", resume=True)
    assert scalers[2].get_scale() == 2.0 ** 11


@pytest.mark.parametrize("command", ["predict", "embed", "explain", "perturb"])
def test_compile_option_reaches_the_model_loader(command, tmp_path, monkeypatch, capsys):
    """`cellrank predict|embed|explain|perturb --compile` asks the loader for a compiled encoder."""
    import cellrank_fm.inference as inference
    from cellrank_fm.errors import UserError

    from cli_helpers import fails

    asked = []

    def loader(model, **kw):
        asked.append(kw.get("compile"))
        raise UserError("stopped here")

    monkeypatch.setattr(inference, "as_model", loader)
    args = {"predict": ["--out", tmp_path / "o.h5ad"], "embed": ["--out", tmp_path / "o.h5ad"],
            "explain": ["--out", tmp_path / "o"],
            "perturb": ["--out", tmp_path / "o", "--state-column", "s", "--start-state", "a", "--goal-state", "b"]}
    for flag, want in (([], False), (["--compile"], True)):
        code, err = fails([command, tmp_path / "model", tmp_path / "in.h5ad", *args[command], *flag], capsys)
        assert code == 2 and "stopped here" in err
        assert asked[-1] is want
