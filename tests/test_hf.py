import os
import stat

import numpy as np
import pytest
import torch

from cellrank_fm.batching import pack
from cellrank_fm.checkpoint import load_encoder, load_model_dir, save_model_dir
from cellrank_fm.errors import UserError
from cellrank_fm.hf import export_hf, load_hf_checkpoint, padded_inputs
from cellrank_fm.model import BertForMaskedLM, BertForSequenceClassification, preset_config

transformers = pytest.importorskip("transformers")


def _hf_config(**kw):
    base = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, hidden_act="relu",
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return transformers.BertConfig(**base)


def _cells():
    rng = np.random.default_rng(0)
    return [rng.permutation(np.arange(4, 120))[:n] for n in (20, 7, 33)]


def _hf_logits(hf_model, cells):
    """HF runs padded: attention_mask 1 = real token, 0 = padding; positions 0..L-1 per row."""
    ids, mask = padded_inputs(cells)
    with torch.no_grad():
        out = hf_model(input_ids=ids, attention_mask=mask).logits
    if out.dim() == 2:
        return out
    return torch.cat([out[i, : len(c)] for i, c in enumerate(cells)])


def _randomise_biases(model):
    # HF initialises biases and LayerNorms to constants; randomise so that a swapped or
    # misnamed tensor would change the logits.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("act,fmt", [("relu", "safetensors"), ("gelu", "bin")])
def test_hf_masked_lm_loads_with_same_logits(tmp_path, act, fmt):
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(_hf_config(hidden_act=act)).eval()
    _randomise_biases(hf)
    hf.save_pretrained(tmp_path, safe_serialization=(fmt == "safetensors"))
    if fmt == "bin":
        # transformers 5 always writes safetensors; write the legacy file as older releases did.
        (tmp_path / "model.safetensors").unlink()
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours, info = load_hf_checkpoint(tmp_path, expect="mlm")
    assert info.config.hidden_act == act
    cells = _cells()
    with torch.no_grad():
        got = ours(pack(cells))
    torch.testing.assert_close(got, _hf_logits(hf, cells), atol=1e-5, rtol=1e-5)


def test_export_loads_in_transformers_with_same_logits(tmp_path):
    torch.manual_seed(0)
    ours = BertForMaskedLM(preset_config("tiny", vocab_size=120)).eval()
    _randomise_biases(ours)
    export_hf(ours, tmp_path / "export")
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "export").eval()
    cells = _cells()
    with torch.no_grad():
        want = ours(pack(cells))
    torch.testing.assert_close(_hf_logits(hf, cells), want, atol=1e-5, rtol=1e-5)


def test_hf_classifier_cls_pooling_matches(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(_hf_config(num_labels=3)).eval()
    _randomise_biases(hf)
    hf.save_pretrained(tmp_path)
    ours, info = load_model_dir(tmp_path, expect="classifier")
    assert info.config.pooling == "cls" and len(info.labels) == 3
    cells = _cells()
    with torch.no_grad():
        got = ours(pack(cells))
    torch.testing.assert_close(got, _hf_logits(hf, cells), atol=1e-5, rtol=1e-5)


def test_model_dir_round_trip_and_encoder_transfer(tmp_path):
    torch.manual_seed(0)
    mlm = BertForMaskedLM(preset_config("tiny", vocab_size=120)).eval()
    _randomise_biases(mlm)
    vocab = {"<pad>": 0, "<mask>": 1, **{f"G{i}": i for i in range(2, 120)}}
    old_mask = os.umask(0o022)
    try:
        save_model_dir(mlm, tmp_path / "m", vocab, {"G2": 1.5}, extra_config={"model_version": "v1"})
    finally:
        os.umask(old_mask)
    # Shareable like every other file written (safetensors alone would make the weights 0600).
    assert {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "m").iterdir()} == {0o644}
    back, info = load_model_dir(tmp_path / "m", expect="mlm")
    cells = _cells()
    with torch.no_grad():
        torch.testing.assert_close(back(pack(cells)), mlm(pack(cells)), atol=0, rtol=0)
    assert info.vocabulary == vocab and info.cellrank["model_version"] == "v1"
    clf, _ = load_encoder(tmp_path / "m", BertForSequenceClassification, num_labels=4, pooling="mean")
    for k, v in mlm.bert.state_dict().items():
        assert torch.equal(clf.bert.state_dict()[k], v)
    with pytest.raises(UserError, match="without a classifier"):
        load_model_dir(tmp_path / "m", expect="classifier")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model_dir(tmp_path / "empty")
