"""The transformer: a BERT encoder over rank-value gene tokens, readable in one sitting.

Parameter names follow HuggingFace `BertForMaskedLM` / `BertForSequenceClassification` /
`BertForTokenClassification`, so published Geneformer checkpoints load without renaming and our
weights load into `transformers`. Post-LayerNorm blocks, absolute position embeddings (a gene's
position is its rank in the cell), ReLU or GELU.

Every model takes one input format, a packed batch (`cellrank_fm.batching.PackedBatch`): all
cells' tokens concatenated into one [T] vector with `cu_seqlens` marking where each cell starts,
so no compute is spent on padding outside attention. Attention then runs as:

- CUDA, half precision, `torch.nn.attention.varlen.varlen_attn` available: packed
  variable-length flash attention, no padding at all;
- otherwise (CPU, fp32, older torch): the packed q/k/v are scattered into a padded
  [B, heads, L, head_dim] tensor and `scaled_dot_product_attention` runs with a key-padding
  mask; the output is gathered back to packed form. Batches from `token_budget_batches` are
  length-grouped, so that padding is small.

The varlen kernel has no attention-probability dropout; with `attention_probs_dropout_prob > 0`
training on the varlen path skips that dropout (hidden-state dropout still applies). Call
`model.set_attn_impl("sdpa")` to force the padded path. Training and inference run the
capability check once at start-up (`cellrank_fm.accel.choose_attention`): it leaves "auto" where
the kernel works (then every half-precision call takes it) and sets "sdpa", with one warning
naming the reason, where it does not.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cellrank_fm.batching import PackedBatch
from cellrank_fm.errors import UserError

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - depends on the installed torch
    _varlen_attn = None


# ----------------------------------------------------------------------------- configuration


@dataclass
class ModelConfig:
    """Model size and behaviour; the keys are HuggingFace `BertConfig` keys plus our own three.

    `pooling` ("cls" or "mean" of gene tokens) and `special_token_ids` (excluded from the mean)
    only matter for classifiers; they live in the "cellrank" block of config.json.
    """

    vocab_size: int = 25426
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 512
    hidden_act: str = "relu"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.02
    attention_probs_dropout_prob: float = 0.02
    initializer_range: float = 0.02
    pad_token_id: int = 0
    type_vocab_size: int = 2
    classifier_dropout: float | None = None
    num_labels: int = 2
    pooling: str = "cls"
    special_token_ids: list[int] = field(default_factory=list)

    OURS = ("pooling", "special_token_ids")

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}; fix the model config."
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise UserError(
                f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}."
            )
        if self.pooling not in ("cls", "mean"):
            raise UserError(f"pooling must be 'cls' or 'mean', not {self.pooling!r}.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from an HF config.json dict (unknown keys ignored, the "cellrank" block read)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k not in cls.OURS}
        if "num_labels" not in kw and isinstance(d.get("id2label"), dict):
            kw["num_labels"] = len(d["id2label"])
        ours = d.get("cellrank") or {}
        for k in cls.OURS:
            if k in ours:
                kw[k] = ours[k]
            elif k in d:
                kw[k] = d[k]
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(
                f"position_embedding_type {d['position_embedding_type']!r} is not supported; "
                "only absolute (rank) positions are."
            )
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"model config {path} does not exist.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"model config {path} is not valid JSON ({err}).") from None
        if not isinstance(d, dict):
            raise UserError(f"model config {path} must hold a JSON object.")
        try:
            return cls.from_dict(d)
        except TypeError as err:
            raise UserError(f"model config {path} has a bad value ({err}).") from None

    def hf_dict(self, architecture: str) -> dict[str, Any]:
        """The HuggingFace config.json keys for this model (without our "cellrank" block)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.OURS}
        d.update(
            architectures=[architecture],
            model_type="bert",
            position_embedding_type="absolute",
            tie_word_embeddings=True,
        )
        if architecture != "BertForMaskedLM":
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return d

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# vocab_size None = taken from the shards the model is trained on.
PRESETS: dict[str, dict[str, Any]] = {
    # Weights start at std 0.1 (about 1/√64), not BERT's 0.02, which suits 768-wide models: at
    # 0.02 a 64-wide model's tied gene embeddings give every gene almost the same logit, and
    # masked-gene training sits on the gene-frequency plateau for hundreds of steps.
    "tiny": dict(
        vocab_size=None, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=4096, hidden_act="relu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.1,
    ),
    # Theodoris et al. 2023 (Geneformer V1, Genecorpus-30M).
    "geneformer-v1": dict(
        vocab_size=25426, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=2048, hidden_act="relu",
        hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02,
    ),
    # Geneformer V2 (Genecorpus-104M), 104M and 316M parameter models.
    "geneformer-v2-104m": dict(
        vocab_size=20275, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=4096, hidden_act="relu",
        hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02,
    ),
    "geneformer-v2-316m": dict(
        vocab_size=20275, hidden_size=1152, num_hidden_layers=18, num_attention_heads=18,
        intermediate_size=4608, max_position_embeddings=4096, hidden_act="relu",
        hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02,
    ),
}


def preset_config(name: str, vocab_size: int | None = None, **overrides: Any) -> ModelConfig:
    """The named preset; `vocab_size` fills presets that take it from the data."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    kw = dict(PRESETS[name])
    if kw["vocab_size"] is None:
        if vocab_size is None:
            raise UserError(f"preset {name!r} needs the vocabulary size of the data.")
        kw["vocab_size"] = vocab_size
    kw.update(overrides)
    return ModelConfig(**kw)


_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


# ----------------------------------------------------------------------------- attention


def varlen_available(device: torch.device | str, dtype: torch.dtype, head_dim: int = 64) -> bool:
    """Whether a call on this device, in this compute dtype and head size, can take packed flash
    attention. Cheap, so it runs per call; `cellrank_fm.accel.choose_attention` checks the GPU
    and probes the kernel once at start-up and sets "sdpa" where it cannot run."""
    return (
        _varlen_attn is not None
        and torch.device(device).type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
    )


def padded_attention(q, k, v, batch: PackedBatch, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA with a key-padding mask: packed [T, heads, d] in, packed [T, heads, d] out."""
    n_seqs, max_len = batch.num_seqs, batch.max_seqlen
    heads, dim = q.shape[1], q.shape[2]
    if q.shape[0] == n_seqs * max_len:
        # Every cell at the longest length (a batch of one cell's perturbed copies, a single
        # cell): the packed tokens already are the grid and no key is padding, so neither the
        # copies into a zeroed grid nor the mask are needed.
        def as_grid(x):
            return x.view(n_seqs, max_len, heads, dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(as_grid(q), as_grid(k), as_grid(v), dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(n_seqs * max_len, heads, dim)
    idx = batch.pad_index  # [T] flat position of each token in a [B * L] grid

    def to_padded(x):
        grid = x.new_zeros(n_seqs * max_len, heads, dim)
        grid[idx] = x
        return grid.view(n_seqs, max_len, heads, dim).transpose(1, 2)

    key_mask = batch.key_mask  # [B, L] True where a real token sits
    out = F.scaled_dot_product_attention(
        to_padded(q), to_padded(k), to_padded(v),
        attn_mask=key_mask[:, None, None, :], dropout_p=dropout_p,
    )
    return out.transpose(1, 2).reshape(n_seqs * max_len, heads, dim)[idx]


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob
        self.impl = "auto"  # "auto" | "varlen" | "sdpa"; set through the model's attn_impl

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = self.query(x).view(shape), self.key(x).view(shape), self.value(x).view(shape)
        dropout_p = self.dropout_p if self.training else 0.0
        use_varlen = self.impl == "varlen" or (
            self.impl == "auto" and varlen_available(q.device, q.dtype, self.head_dim)
        )
        if use_varlen:
            out = _varlen_attn(
                q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_seqlen, batch.max_seqlen
            )
        else:
            out = padded_attention(q, k, v, batch, dropout_p)
        return out.reshape(x.shape[0], -1)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        return self.output(self.self(x, batch), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(BertSelfOutput):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)


class BertLayer(nn.Module):
    """One post-LN block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        x = self.attention(x, batch)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, batch: PackedBatch, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(batch.input_ids)
        # Every token has token type 0, as in Geneformer.
        x = inputs_embeds + self.position_embeddings(batch.position_ids) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class BertPooler(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(pooled))


class BertModel(nn.Module):
    def __init__(self, cfg: ModelConfig, add_pooling_layer: bool = False):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg) if add_pooling_layer else None

    def forward(
        self, batch: PackedBatch, layer: int = -1, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Packed hidden states [T, H] after `layer` (0 = embeddings, -1 = last, -2 = second last)."""
        n_layers = len(self.encoder.layer)
        stop = layer if layer >= 0 else n_layers + 1 + layer
        if not 0 <= stop <= n_layers:
            raise ValueError(f"layer {layer} out of range for a {n_layers}-layer model")
        x = self.embeddings(batch, inputs_embeds)
        for block in self.encoder.layer[:stop]:
            x = block(x, batch)
        return x


def pool(hidden: torch.Tensor, batch: PackedBatch, mode: str, exclude_ids: Sequence[int] = ()) -> torch.Tensor:
    """One vector per cell [B, H]: its first token ("cls") or the mean of its gene tokens ("mean").

    "mean" leaves out tokens whose id is in `exclude_ids` (the special tokens, e.g. <cls>/<eos>).
    """
    if mode == "cls":
        return hidden[batch.cu_seqlens[:-1].long()]
    if mode != "mean":
        raise ValueError(f"unknown pooling {mode!r}")
    keep = torch.ones_like(batch.input_ids, dtype=hidden.dtype)
    if len(exclude_ids):
        special = torch.as_tensor(list(exclude_ids), device=batch.input_ids.device)
        keep = keep * ~torch.isin(batch.input_ids, special)
    seq = batch.seq_index
    sums = hidden.new_zeros(batch.num_seqs, hidden.shape[1]).index_add_(0, seq, hidden * keep[:, None])
    counts = hidden.new_zeros(batch.num_seqs).index_add_(0, seq, keep)
    return sums / counts.clamp(min=1)[:, None]


# ----------------------------------------------------------------------------- task heads


class _Base(nn.Module):
    architecture = ""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg

    def _init_weights(self) -> None:
        # HF BERT initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms.
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _init_head(self, *layers: nn.Linear) -> None:
        # A new task head starts at unit gain (std 1/√fan-in) instead of BERT's 0.02: at 0.02
        # the head passes on only about (0.02·√H)² of any change in the encoder's output, so a
        # small encoder hardly learns until the head has grown, hundreds of steps later.
        for layer in layers:
            nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
            nn.init.zeros_(layer.bias)

    def set_attn_impl(self, impl: str) -> None:
        """"auto" (varlen on CUDA in half precision, else padded SDPA), "varlen" or "sdpa"."""
        if impl not in ("auto", "varlen", "sdpa"):
            raise ValueError(impl)
        for m in self.modules():
            if isinstance(m, BertSelfAttention):
                m.impl = impl

    def encode(self, batch: PackedBatch, layer: int = -1, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.bert(batch, layer, inputs_embeds)

    def num_parameters(self, embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        if not embeddings:
            emb = self.bert.embeddings
            total -= emb.word_embeddings.weight.numel() + emb.position_embeddings.weight.numel()
        return total


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # tied to word embeddings
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.transform(x)
        if h.is_cuda:
            return aligned_linear(h, self.decoder.weight, self.bias)
        return F.linear(h, self.decoder.weight, self.bias)


def aligned_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, multiple: int = 8) -> torch.Tensor:
    """`F.linear` with the output width padded to a multiple of `multiple`, then sliced back.

    Geneformer's vocabularies (25,426 and 20,275 genes) leave the logits' rows misaligned for
    cuBLAS's tensor-core kernels, which then fall back to slow generic ones; the zero rows of
    padding cost one small copy and made eager geneformer-v2-104m training 2.5% faster on an
    H200 (compiled models gain nothing: inductor pads by itself)."""
    pad = -weight.shape[0] % multiple
    if pad == 0:
        return F.linear(x, weight, bias)
    bias = None if bias is None else F.pad(bias, (0, pad))
    return F.linear(x, F.pad(weight, (0, 0, 0, pad)), bias)[..., : weight.shape[0]]


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)


class BertForMaskedLM(_Base):
    """Masked-gene model: encoder + tied prediction head over the vocabulary."""

    architecture = "BertForMaskedLM"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(cfg)
        self._init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, batch: PackedBatch, inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """Logits over the vocabulary for every token, [T, V].

        With `labels` ([T], -100 where there is nothing to predict): (mean cross-entropy,
        logits of the labelled positions, their labels). Only those ~15% of positions go
        through the vocabulary projection, the largest matrix of a small model.
        """
        hidden = self.bert(batch, inputs_embeds=inputs_embeds)
        if labels is None:
            return self.cls.predictions(hidden)
        where = labels != -100
        targets = labels[where]
        logits = self.cls.predictions(hidden[where])
        return F.cross_entropy(logits.float(), targets), logits, targets


class BertForSequenceClassification(_Base):
    """Cell classifier: pooled encoder output ("cls" token or mean of genes) → pooler → classes.

    With pooling "cls" this is exactly HuggingFace's model (pooler on the first token).
    """

    architecture = "BertForSequenceClassification"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.bert = BertModel(cfg, add_pooling_layer=True)
        drop = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.dropout = nn.Dropout(drop)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        self._init_weights()
        self._init_head(self.bert.pooler.dense, self.classifier)

    def pooled(self, batch: PackedBatch, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.bert(batch, inputs_embeds=inputs_embeds)
        return pool(hidden, batch, self.config.pooling, self.config.special_token_ids)

    def forward(self, batch: PackedBatch, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits [B, C]."""
        return self.classifier(self.dropout(self.bert.pooler(self.pooled(batch, inputs_embeds))))


class BertForTokenClassification(_Base):
    """Gene classifier: one set of class logits per token, [T, C]."""

    architecture = "BertForTokenClassification"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.bert = BertModel(cfg, add_pooling_layer=False)
        drop = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.dropout = nn.Dropout(drop)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        self._init_weights()
        self._init_head(self.classifier)

    def forward(self, batch: PackedBatch, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(self.bert(batch, inputs_embeds=inputs_embeds)))


ARCHITECTURES: dict[str, type[_Base]] = {
    c.architecture: c for c in (BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification)
}


def flops_per_token(cfg: ModelConfig, mean_seq_len: float, masked_fraction: float = 1.0) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward).

    Matmuls: per layer 4·H² (q, k, v, out) + 2·H·FF, 2 FLOPs per multiply-add; attention
    scores and weighted values: 2·2·L·H per token per layer; the vocabulary projection
    (H·V) only for the `masked_fraction` of tokens that go through it, plus the head's H².
    """
    h, ff, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_layer = 2 * (4 * h * h + 2 * h * ff) + 2 * 2 * mean_seq_len * h
    head = masked_fraction * 2 * (h * h + h * cfg.vocab_size)
    return 3 * (n * per_layer + head)
