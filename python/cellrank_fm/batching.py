"""Packed batches, token-budget batching and masked-gene corruption.

A batch is packed: the cells' token arrays are concatenated into one [T] vector and
`cu_seqlens` ([B+1], int32) marks where each cell starts — the format of varlen flash
attention. Position ids restart at 0 for every cell (a token's position is its rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


class _lazy:
    """`functools.cached_property` without its lock: Python 3.11's version takes an RLock,
    which torch.compile cannot trace, so each first use inside a compiled model split the graph."""

    def __init__(self, fn):
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)  # later reads find the instance attribute
        return value


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [T] int64
    cu_seqlens: torch.Tensor  # [B+1] int32
    max_seqlen: int
    position_ids: torch.Tensor  # [T] int64
    labels: torch.Tensor | None = None  # [T] (MLM, gene labels) or [B] (cell labels)
    extra: dict = field(default_factory=dict)  # task-specific tensors, moved with .to()

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @_lazy
    def lengths(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @_lazy
    def seq_index(self) -> torch.Tensor:
        """[T]: which cell each token belongs to."""
        return torch.repeat_interleave(torch.arange(self.num_seqs, device=self.device), self.lengths)

    @_lazy
    def pad_index(self) -> torch.Tensor:
        """[T]: each token's flat index in a padded [B, max_seqlen] grid."""
        return self.seq_index * self.max_seqlen + self.position_ids

    @_lazy
    def key_mask(self) -> torch.Tensor:
        """[B, max_seqlen] bool: True where a real token sits in the padded grid."""
        return torch.arange(self.max_seqlen, device=self.device)[None, :] < self.lengths[:, None]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return PackedBatch(
            move(self.input_ids), move(self.cu_seqlens), self.max_seqlen, move(self.position_ids),
            move(self.labels), {k: move(v) for k, v in self.extra.items()},
        )

    def padded(self, values: torch.Tensor | None = None, fill: int = 0) -> torch.Tensor:
        """`values` (default input_ids), [T, ...] packed, as a padded [B, max_seqlen, ...] tensor."""
        values = self.input_ids if values is None else values
        grid = values.new_full((self.num_seqs * self.max_seqlen, *values.shape[1:]), fill)
        grid[self.pad_index] = values
        return grid.view(self.num_seqs, self.max_seqlen, *values.shape[1:])


def pack(
    token_arrays: Sequence[np.ndarray],
    device: torch.device | str | None = None,
    labels: np.ndarray | torch.Tensor | None = None,
) -> PackedBatch:
    """Pack a list of per-cell token arrays (any integer dtype) into one PackedBatch."""
    if len(token_arrays) == 0:
        raise ValueError("cannot pack an empty list of cells")
    lengths = np.fromiter((len(t) for t in token_arrays), dtype=np.int64, count=len(token_arrays))
    if (lengths == 0).any():
        raise ValueError("cannot pack a cell with no tokens")
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    flat = np.concatenate([np.asarray(t) for t in token_arrays]).astype(np.int64, copy=False)
    starts = np.repeat(cu[:-1].astype(np.int64), lengths)
    positions = np.arange(len(flat), dtype=np.int64) - starts
    batch = PackedBatch(
        input_ids=torch.from_numpy(flat),
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(lengths.max()),
        position_ids=torch.from_numpy(positions),
        labels=None if labels is None else torch.as_tensor(labels),
    )
    return batch if device is None else batch.to(device)


def token_budget_batches(
    lengths: np.ndarray,
    tokens_per_batch: int,
    shuffle: bool = True,
    seed: int = 0,
    window_batches: int = 64,
) -> list[np.ndarray]:
    """Split cell indices into length-grouped batches of at most `tokens_per_batch` padded tokens.

    A batch's cost is (cells × its longest cell), the padded size, so the same budget also
    bounds the padded attention path; grouping by length keeps that close to the packed size.
    With `shuffle`, cells are permuted (seeded), sorted by length within windows of about
    `window_batches` batches (so batches still mix cells from all over the input), and the
    batches are returned in a random order. A cell longer than the budget gets a batch alone.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if tokens_per_batch < 1:
        raise ValueError("tokens_per_batch must be positive")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    mean_len = max(1.0, float(lengths.mean())) if len(lengths) else 1.0
    window = max(1, int(window_batches * tokens_per_batch / mean_len)) if shuffle else len(lengths)
    batches: list[np.ndarray] = []
    for start in range(0, len(order), max(window, 1)):
        chunk = order[start : start + window]
        # Longest first within the window; stable so equal lengths keep the (shuffled) order.
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        i = 0
        while i < len(chunk):
            longest = lengths[chunk[i]]
            count = max(1, int(tokens_per_batch // max(longest, 1)))
            batches.append(chunk[i : i + count])
            i += count
    if shuffle:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


@dataclass(frozen=True)
class MaskingSpec:
    """What masked-gene modelling may corrupt: every token not in `special_ids`."""

    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]
    probability: float = 0.15

    @cached_property
    def gene_ids(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.vocab_size), np.asarray(self.special_ids, dtype=np.int64))


def mask_genes(flat_tokens: np.ndarray, spec: MaskingSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BERT corruption of a flat token array: returns (corrupted ids, labels).

    Each gene token is selected with probability `spec.probability` (at least one per call);
    of those, 80% become <mask>, 10% a random gene token, 10% stay. Special tokens are never
    selected. Labels hold the original id at selected positions and -100 elsewhere.
    """
    ids = np.asarray(flat_tokens).astype(np.int64, copy=True)
    is_gene = ~np.isin(ids, np.asarray(spec.special_ids, dtype=np.int64))
    selected = (rng.random(len(ids)) < spec.probability) & is_gene
    if not selected.any() and is_gene.any():
        selected[rng.choice(np.flatnonzero(is_gene))] = True
    labels = np.where(selected, ids, IGNORE_INDEX)
    roll = rng.random(len(ids))
    to_mask = selected & (roll < 0.8)
    to_random = selected & (roll >= 0.8) & (roll < 0.9)
    ids[to_mask] = spec.mask_id
    ids[to_random] = rng.choice(spec.gene_ids, size=int(to_random.sum()))
    return ids, labels


def pack_masked(
    token_arrays: Sequence[np.ndarray], spec: MaskingSpec, rng: np.random.Generator,
    device: torch.device | str | None = None,
) -> PackedBatch:
    """Pack cells and apply `mask_genes`; the labels ride along in `batch.labels`."""
    batch = pack(token_arrays)
    ids, labels = mask_genes(batch.input_ids.numpy(), spec, rng)
    batch.input_ids = torch.from_numpy(ids)
    batch.labels = torch.from_numpy(labels)
    return batch if device is None else batch.to(device)
