import math

import numpy as np
import pytest
import torch

from cellrank_fm.batching import pack
from cellrank_fm.model import (
    BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification, ModelConfig,
    PRESETS, aligned_linear, padded_attention, pool, preset_config, varlen_available,
)
from cellrank_fm.errors import UserError


def _cells(rng, lengths, vocab=200, low=2):
    return [rng.integers(low, vocab, size=n) for n in lengths]


def _reference_attention(q, k, v, batch):
    """Explicit softmax(QKᵀ/√d)·V, one cell at a time, no masking tricks."""
    out = torch.empty_like(q)
    cu = batch.cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))  # [heads, L, d]
        w = torch.softmax(qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        out[s:e] = (w @ vs).transpose(0, 1)
    return out


def test_padded_sdpa_matches_explicit_softmax_fp32():
    rng = np.random.default_rng(0)
    batch = pack(_cells(rng, [7, 31, 1, 18]))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch.num_tokens, 4, 16, generator=g) for _ in range(3))
    got = padded_attention(q, k, v, batch)
    want = _reference_attention(q, k, v, batch)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_packed_batch_equals_cells_run_alone():
    # Cells in one packed batch must not see each other (mask) nor padding.
    torch.manual_seed(0)
    model = BertForMaskedLM(preset_config("tiny", vocab_size=200)).eval()
    rng = np.random.default_rng(1)
    cells = _cells(rng, [12, 40, 3])
    with torch.no_grad():
        together = model(pack(cells))
        alone = torch.cat([model(pack([c])) for c in cells])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # Positions restart at 0 per cell: swapping cell order gives the same per-cell logits.
    with torch.no_grad():
        swapped = model(pack(cells[::-1]))
    torch.testing.assert_close(swapped[:3], alone[-3:], atol=1e-5, rtol=1e-5)


def test_mean_pooling_skips_special_tokens_and_cls_pooling_takes_first():
    hidden = torch.arange(12, dtype=torch.float32).view(6, 2)
    batch = pack([np.array([2, 10, 11, 3]), np.array([2, 12])])
    mean = pool(hidden, batch, "mean", exclude_ids=[2, 3])
    torch.testing.assert_close(mean[0], hidden[1:3].mean(0))
    torch.testing.assert_close(mean[1], hidden[5])
    torch.testing.assert_close(pool(hidden, batch, "cls"), hidden[[0, 4]])


def test_heads_shapes_and_presets():
    cfg = preset_config("tiny", vocab_size=50, num_labels=3)
    batch = pack([np.arange(2, 9), np.arange(2, 5)])
    assert BertForSequenceClassification(cfg.replace(pooling="mean"))(batch).shape == (2, 3)
    assert BertForTokenClassification(cfg)(batch).shape == (10, 3)
    v1 = preset_config("geneformer-v1")
    assert (v1.num_hidden_layers, v1.hidden_size, v1.num_attention_heads, v1.intermediate_size,
            v1.max_position_embeddings, v1.vocab_size) == (6, 256, 4, 512, 2048, 25426)
    assert PRESETS["geneformer-v2-316m"]["hidden_size"] == 1152
    # The V1 model has about 10M parameters (Theodoris et al. 2023).
    n = BertForMaskedLM(v1).num_parameters()
    assert 9e6 < n < 12e6
    with pytest.raises(UserError):
        ModelConfig(hidden_size=100, num_attention_heads=3)


def test_aligned_linear_equals_linear_and_its_gradients():
    # The vocabulary projection on CUDA pads its output width to a multiple of 8 (tensor-core
    # alignment); the logits and every gradient must be those of the plain projection.
    torch.manual_seed(0)
    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(61, 16, requires_grad=True)  # 61 rows: 3 of padding
    b = torch.randn(61, requires_grad=True)
    target = torch.randint(0, 61, (5,))
    grads = []
    for fn in (torch.nn.functional.linear, aligned_linear):
        out = fn(x, w, b)
        assert out.shape == (5, 61)
        torch.nn.functional.cross_entropy(out, target).backward()
        grads.append((out.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone()))
        x.grad = w.grad = b.grad = None
    for plain, padded in zip(*grads):
        torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-6)
    assert aligned_linear(x, w[:56], None).shape == (5, 56)  # already aligned: no padding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_varlen_matches_padded_on_gpu_bf16():
    torch.manual_seed(0)
    model = BertForMaskedLM(preset_config("tiny", vocab_size=300)).cuda().eval()
    rng = np.random.default_rng(2)
    batch = pack(_cells(rng, [100, 37, 256, 5], vocab=300), device="cuda")
    assert varlen_available("cuda", torch.bfloat16)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.set_attn_impl("varlen")
        a = model(batch).float()
        model.set_attn_impl("sdpa")
        b = model(batch).float()
    torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.98
