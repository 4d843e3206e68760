"""HuggingFace checkpoints: load published Geneformer weights, export ours for `transformers`.

A HuggingFace BERT checkpoint directory is `config.json` + `model.safetensors` (or
`pytorch_model.bin`, read with `torch.load(weights_only=True)`, which cannot run code).
Our parameter names are HuggingFace's, so loading is a name normalisation (old
`LayerNorm.gamma/beta` spellings, dropped buffers) and a shape check. Geneformer
directories carry no vocabulary: pass the matching `token_dictionary_*.pkl` /
`gene_median_dictionary_*.pkl` (or .json) so the model directory we write can tokenize new
data by itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellrank_fm.checkpoint import ModelDirInfo, load_model_dir, save_model_dir
from cellrank_fm.model import _Base


def load_hf_checkpoint(
    path: str | Path,
    vocabulary: dict[str, int] | None = None,
    medians: dict[str, float] | None = None,
    expect: str = "any",
) -> tuple[_Base, ModelDirInfo]:
    """Load a HuggingFace BERT directory (e.g. a Geneformer release) as one of our models."""
    model, info = load_model_dir(path, expect=expect)
    if vocabulary is not None:
        info.vocabulary = vocabulary
    if medians is not None:
        info.medians = medians
    if info.vocabulary is not None and len(info.vocabulary) != info.config.vocab_size:
        from cellrank_fm.errors import UserError

        raise UserError(
            f"the vocabulary has {len(info.vocabulary):,} tokens but {path} was trained with "
            f"{info.config.vocab_size:,}; pass the token dictionary that belongs to this checkpoint."
        )
    return model, info


def export_hf(
    model: _Base,
    out_dir: str | Path,
    info: ModelDirInfo | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write `model` so that `transformers.AutoModelFor*.from_pretrained(out_dir)` loads it.

    Our model directory already is that format (HF config keys, HF names, tied decoder
    left out as HF does); the vocabulary files ride along when `info` has them.
    """
    extra = dict(info.cellrank) if info is not None else {}
    extra.update(extra_config or {})
    return save_model_dir(
        model, out_dir,
        vocabulary=info.vocabulary if info else None,
        medians=info.medians if info else None,
        symbols=info.symbols if info else None,
        extra_config=extra,
        labels=info.labels if info else None,
    )


def to_transformers(model: _Base, head: str = "same"):
    """The same network as a `transformers` model in memory, with our weights (for benches and
    checks against the reference implementation). `head` "same" gives the architecture of
    `model`; "none" gives the bare `transformers.BertModel` (encoder only, no pooler). The hidden
    states are ours; a cell classifier's logits are too only with pooling "cls" (transformers'
    pooler reads the first token, ours can take the mean of the gene tokens)."""
    import transformers

    from cellrank_fm.checkpoint import state_dict_for_saving

    model = getattr(model, "_orig_mod", model)
    cfg = model.config
    hf_cfg = transformers.BertConfig(**{k: v for k, v in cfg.hf_dict(model.architecture).items()
                                        if k not in ("architectures", "id2label", "label2id")})
    weights = state_dict_for_saving(model)
    if head == "none":
        hf = transformers.BertModel(hf_cfg, add_pooling_layer=False)
        weights = {k.removeprefix("bert."): v for k, v in weights.items()
                   if k.startswith("bert.") and not k.startswith("bert.pooler.")}
    else:
        hf = getattr(transformers, model.architecture)(hf_cfg)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    # Only buffers (position_ids, token_type_ids) and the tied decoder may be absent from ours.
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids", "decoder.weight", "decoder.bias"))]
    if missing or unexpected:
        raise ValueError(f"weights do not map onto transformers' BERT: missing {missing[:3]}, unexpected {unexpected[:3]}")
    device = next(model.parameters()).device
    return hf.to(device).eval()


def padded_inputs(seqs, device=None):
    """(input_ids, attention_mask), each [cells, longest], for `transformers` BERT: every cell's
    tokens from position 0, then padding (id 0, mask 0)."""
    import torch

    width = max(1, max(len(s) for s in seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)
