"""The model directory: what a trained model is on disk.

    config.json        HuggingFace BertConfig keys + a "cellrank" block (model_version,
                       model_input_size, special_tokens, pooling, label_column, vocabulary_sha256, ...)
    model.safetensors  weights under HuggingFace parameter names (tied decoder weight left out)
    vocabulary.json    token → id the model was trained with
    medians.json       gene → normalisation median (so new data can be tokenized the same way)
    symbols.json       gene → symbol for display (may be partial)
    gene_map.json      symbol / alias → gene, when the shards were tokenized with --gene-map
    labels.json        classifiers: class names in logit order

Every file is written to a temporary name and renamed into place; files the directory
already holds but that are not part of the model (metrics, training state) are left alone.
The weights alone (config.json + model.safetensors or pytorch_model.bin) are a HuggingFace
checkpoint, so published Geneformer directories load here too (see `cellrank_fm.hf`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cellrank_fm.errors import UserError, atomic_path, write_json
from cellrank_fm.genes import GENE_MAP_FILE
from cellrank_fm.model import ARCHITECTURES, BertForMaskedLM, ModelConfig, _Base

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TORCH_WEIGHTS = "pytorch_model.bin"


@dataclass
class ModelDirInfo:
    path: Path
    config: ModelConfig
    architecture: str
    cellrank: dict[str, Any] = field(default_factory=dict)
    vocabulary: dict[str, int] | None = None
    medians: dict[str, float] | None = None
    symbols: dict[str, str] | None = None
    labels: list[str] | None = None
    gene_map: dict[str, str] | None = None


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights to store: contiguous CPU tensors, the tied decoder weight left out (as HF does)."""
    sd = model.state_dict()
    sd.pop("cls.predictions.decoder.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_model_dir(
    model: _Base,
    out_dir: str | Path,
    vocabulary: dict[str, int] | None,
    medians: dict[str, float] | None,
    symbols: dict[str, str] | None = None,
    extra_config: dict[str, Any] | None = None,
    labels: list[str] | None = None,
    gene_map: dict[str, str] | None = None,
) -> Path:
    """Write `model` and the tokenization it expects as a model directory (see module doc)."""
    from safetensors.torch import save_file

    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    config = cfg.hf_dict(model.architecture)
    if labels is not None:
        config["id2label"] = {str(i): str(n) for i, n in enumerate(labels)}
        config["label2id"] = {str(n): i for i, n in enumerate(labels)}
    config["cellrank"] = {"pooling": cfg.pooling, "special_token_ids": list(cfg.special_token_ids), **(extra_config or {})}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state_dict_for_saving(model), str(tmp), metadata={"format": "pt"})
        # safetensors creates its file owner-only (0600); give it the mode every other file here gets.
        tmp.chmod(0o666 & ~_umask())
    if vocabulary is not None:
        write_json(vocabulary, out / "vocabulary.json")
    if medians is not None:
        write_json(medians, out / "medians.json")
    if symbols is not None:
        write_json(symbols, out / "symbols.json")
    if labels is not None:
        write_json(list(labels), out / "labels.json")
    if gene_map:
        write_json(gene_map, out / GENE_MAP_FILE)
    write_json(config, out / CONFIG)  # last: a directory with config.json is complete
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist.")
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise UserError(f"{path} holds no config.json, so it is not a model directory; give the directory `cellrank pretrain` or `cellrank finetune` wrote.")
    try:
        return json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{cfg_path} is not valid JSON ({err}).") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a model directory (safetensors, else pytorch_model.bin), names normalised."""
    from cellrank_fm.outputs import REMAKE_MODEL, damaged

    path = Path(path)
    try:
        if (path / WEIGHTS).is_file():
            from safetensors.torch import load_file

            sd = load_file(str(path / WEIGHTS))
        elif (path / TORCH_WEIGHTS).is_file():
            sd = torch.load(path / TORCH_WEIGHTS, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"{path} holds neither {WEIGHTS} nor {TORCH_WEIGHTS}; the model directory is incomplete.")
    except (UserError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - safetensors and torch.load fail in many ways on a cut file
        name = WEIGHTS if (path / WEIGHTS).is_file() else TORCH_WEIGHTS
        raise damaged(path / name, err, REMAKE_MODEL) from None
    return normalise_names(sd)


def normalise_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map older HuggingFace spellings onto ours and drop what our models derive or lack."""
    out = {}
    for k, v in sd.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if k.endswith("embeddings.position_ids") or k == "cls.predictions.decoder.bias":
            continue  # a buffer / a duplicate of cls.predictions.bias
        if k.startswith("cls.seq_relationship"):
            continue  # next-sentence head of BertForPreTraining
        out[k] = v
    return out


def load_weights_into(model: _Base, sd: dict[str, torch.Tensor], source: str, encoder_only: bool = False) -> None:
    """Load `sd` into `model`, failing with one sentence on any missing or misshapen weight."""
    own = model.state_dict()
    own.pop("cls.predictions.decoder.weight", None)
    wanted = {k for k in own if not encoder_only or (k.startswith("bert.") and not k.startswith("bert.pooler."))}
    missing = sorted(k for k in wanted if k not in sd)
    if missing:
        raise UserError(f"{source} lacks weight {missing[0]} (and {len(missing) - 1} more); it does not match this model type.")
    for k in wanted:
        if tuple(sd[k].shape) != tuple(own[k].shape):
            raise UserError(f"{source} weight {k} has shape {tuple(sd[k].shape)} but the config says {tuple(own[k].shape)}.")
    if encoder_only:
        # Pooler weights come along when the source has them (an HF classifier), else stay fresh.
        wanted |= {k for k in own if k.startswith("bert.pooler.") and k in sd}
    model.load_state_dict({k: sd[k] for k in wanted}, strict=False)
    if isinstance(model, BertForMaskedLM):
        model.tie_weights()


def _read_optional_json(path: Path) -> Any:
    from cellrank_fm.outputs import REMAKE_MODEL, read_json

    return read_json(path, REMAKE_MODEL) if path.is_file() else None


def load_model_dir(path: str | Path, expect: str = "any") -> tuple[_Base, ModelDirInfo]:
    """Load a model directory (ours or a HuggingFace BERT checkpoint) as (model, info).

    expect: "mlm" (a pretrained masked-gene model), "classifier" (a cell classifier, as
    `inference.require_cell_classifier` defines it) or "any".
    """
    path = Path(path)
    raw = read_config(path)
    arch = (raw.get("architectures") or ["BertForMaskedLM"])[0]
    if arch == "BertForPreTraining":
        arch = "BertForMaskedLM"
    if arch not in ARCHITECTURES:
        raise UserError(f"{path} holds a {arch}, which cellrank cannot load; it loads {', '.join(ARCHITECTURES)}.")
    if expect == "mlm" and arch != "BertForMaskedLM":
        raise UserError(f"{path} holds a {arch}, not a pretrained masked-gene model.")
    cfg = ModelConfig.from_dict(raw)
    model = ARCHITECTURES[arch](cfg)
    load_weights_into(model, read_weights(path), str(path))
    labels = _read_optional_json(path / "labels.json")
    if labels is None and arch != "BertForMaskedLM" and isinstance(raw.get("id2label"), dict):
        labels = [raw["id2label"][str(i)] for i in range(len(raw["id2label"]))]
    info = ModelDirInfo(
        path=path, config=cfg, architecture=arch, cellrank=raw.get("cellrank") or {},
        vocabulary=_read_optional_json(path / "vocabulary.json"),
        medians=_read_optional_json(path / "medians.json"),
        symbols=_read_optional_json(path / "symbols.json"),
        labels=labels,
        gene_map=_read_optional_json(path / GENE_MAP_FILE),
    )
    model.eval()
    if expect == "classifier":
        from cellrank_fm.inference import require_cell_classifier

        require_cell_classifier(info)
    return model, info


def load_encoder(path: str | Path, model_cls: type[_Base], **config_changes: Any) -> tuple[_Base, ModelDirInfo]:
    """A new `model_cls` (e.g. a classifier) whose encoder (`bert.*`) comes from the model dir.

    `config_changes` set task fields such as num_labels, pooling, special_token_ids; the task
    head is freshly initialised.
    """
    path = Path(path)
    raw = read_config(path)
    base = ModelConfig.from_dict(raw)
    model = model_cls(base.replace(**config_changes))
    load_weights_into(model, read_weights(path), str(path), encoder_only=True)
    info = ModelDirInfo(
        path=path, config=model.config, architecture=model_cls.architecture, cellrank=raw.get("cellrank") or {},
        vocabulary=_read_optional_json(path / "vocabulary.json"),
        medians=_read_optional_json(path / "medians.json"),
        symbols=_read_optional_json(path / "symbols.json"),
    )
    return model, info


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


__all__ = [
    "ModelDirInfo", "save_model_dir", "load_model_dir", "load_encoder", "read_config",
    "read_weights", "load_weights_into", "is_model_dir",
]
