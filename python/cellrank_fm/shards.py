"""The token shard format, and reading a shard directory in bounded memory.

A shard directory holds `manifest.json` (written last: a directory without one is not a
finished shard set), `part-NNNNN.parquet` files, the tokenization's dictionaries
(`vocabulary.json`, `medians.json`, `symbols.json`, `gene_map.json`) and, for a shard set
restricted to a gene set, `gene_set.json` (the gene IDs kept). The names are defined here;
`tokenize` writes them (the parts through the Rust writer, `rust/shard.rs`, which names them
the same way) and everything else reads them through `ShardSet`.

Opening a ShardSet reads the manifest and the `length` column of every part (4 bytes a
cell); token lists are read a part at a time when asked for, and the most recently used parts
are kept, up to `CACHE_TOKENS` tokens (at least one part), so that batches mixing the cells of
a few parts do not re-read them.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cellrank_fm.errors import UserError

FORMAT = "cellrank-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PART_GLOB = "part-*.parquet"  # finished parts
TEMP_PART_GLOB = ".part-*"  # parts being written
# The gene IDs a gene-set tokenization kept; model directories fine-tuned on it carry a copy.
GENE_SET_FILE = "gene_set.json"
# Tokens of parts kept in memory: 2^27 tokens are 256 MB at 16 bits a token (V1 and V2
# vocabularies fit in 16 bits), about one part of 65,536 cells of 2,048 genes.
CACHE_TOKENS = 1 << 27


def part_file(index: int) -> str:
    """File name of part `index`."""
    return f"part-{index:05d}.parquet"


class ShardSet:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"shard directory {self.path} does not exist; make one with `cellrank tokenize`.")
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise UserError(
                f"{self.path} holds no manifest.json, so it is not a shard directory; "
                "make one with `cellrank tokenize`."
            )
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{manifest_path} is not valid JSON ({err}); re-run `cellrank tokenize`.") from None
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{manifest_path} is not a cellrank shard manifest (format {self.manifest.get('format')!r}).")
        parts = self.manifest.get("parts") or []
        self.part_files = [self.path / p["file"] for p in parts]
        missing = [p.name for p in self.part_files if not p.is_file()]
        if missing:
            raise UserError(f"{self.path} lacks {missing[0]} listed in its manifest; re-run `cellrank tokenize` to complete it.")
        rows = np.array([int(p["rows"]) for p in parts], dtype=np.int64)
        if rows.sum() == 0:
            raise UserError(f"{self.path} holds no cells; tokenize an input with cells that pass the filters.")
        self.part_rows = rows
        self.part_starts = np.concatenate([[0], np.cumsum(rows)])
        self._cache: OrderedDict[int, list[np.ndarray]] = OrderedDict()

    # ---- manifest facts

    def __len__(self) -> int:
        return int(self.part_starts[-1])

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        columns = ", ".join(self.manifest.get("metadata_columns") or []) or "none"
        return (f"<cellrank shards {self.path}: {len(self):,} cells in {self.num_parts} part(s), "
                f"{self.model_version} tokens, metadata columns: {columns}>")

    @property
    def num_parts(self) -> int:
        return len(self.part_files)

    @property
    def model_version(self) -> str:
        return self.manifest.get("model_version", "v1")

    @property
    def model_input_size(self) -> int | None:
        return self.manifest.get("model_input_size")

    @property
    def special_tokens(self) -> dict[str, int | None]:
        return dict(self.manifest.get("special_tokens") or {})

    @property
    def vocab_size(self) -> int:
        size = (self.manifest.get("vocabulary") or {}).get("size")
        return int(size) if size is not None else len(self.vocabulary)

    @property
    def vocab_sha256(self) -> str | None:
        return (self.manifest.get("vocabulary") or {}).get("sha256")

    def _json(self, name: str, required: bool) -> dict:
        from cellrank_fm.outputs import REMAKE_SHARDS, read_json

        p = self.path / name
        if not p.is_file():
            if required:
                raise UserError(f"{self.path} lacks {name}; re-run `cellrank tokenize`.")
            return {}
        return read_json(p, REMAKE_SHARDS)

    @cached_property
    def vocabulary(self) -> dict[str, int]:
        return self._json("vocabulary.json", required=True)

    @cached_property
    def medians(self) -> dict[str, float]:
        return self._json("medians.json", required=False)

    @cached_property
    def symbols(self) -> dict[str, str]:
        return self._json("symbols.json", required=False)

    @cached_property
    def gene_map(self) -> dict[str, str]:
        """Symbol / alias -> gene as the tokenizer resolved them (empty without --gene-map)."""
        from cellrank_fm.genes import GENE_MAP_FILE

        return self._json(GENE_MAP_FILE, required=False)

    @cached_property
    def gene_set(self) -> list[str] | None:
        """The gene IDs a gene-set tokenization kept (sorted), or None for all genes.

        Read from the shard directory; shard sets written before it stored them re-resolve the
        recorded gene-set file.
        """
        info = self.manifest.get("gene_set")
        if not info:
            return None
        stored = self.path / GENE_SET_FILE
        if stored.is_file():
            from cellrank_fm.outputs import REMAKE_SHARDS, read_json

            return sorted(read_json(stored, REMAKE_SHARDS))
        from cellrank_fm.genes import load_gene_set, resolve_gene_set

        source = Path(str(info.get("source", "")))
        if not source.is_file():
            raise UserError(
                f"the shards were tokenized with the gene set {source}, which is gone; the model must "
                f"record it so `predict` tokenizes new cells alike — restore the file."
            )
        column = (self.manifest.get("settings") or {}).get("genes_column")
        ids, _ = resolve_gene_set(load_gene_set(source, column), None, self.vocabulary)
        return sorted(ids)

    def tokenization(self) -> dict[str, Any]:
        """How these cells were tokenized, for a model directory's `config.json` ("cellrank" block):
        `predict`, `embed` and `explain` tokenize new inputs the same way from it."""
        from cellrank_fm.vocab import content_sha256

        m = self.manifest
        return {
            "model_version": self.model_version,
            "model_input_size": self.model_input_size,
            "special_tokens": self.special_tokens,
            "vocabulary_sha256": self.vocab_sha256 or content_sha256(self.vocabulary),
            "medians_sha256": (m.get("medians") or {}).get("sha256"),
            "gene_set": m.get("gene_set") or None,
            "gene_id_column": (m.get("settings") or {}).get("gene_id_column"),
            "trained_on": str(self.path),
        }

    # ---- columns

    @cached_property
    def lengths(self) -> np.ndarray:
        """Token count of every cell, uint32 [cells], read from the `length` columns only."""
        out = np.empty(len(self), dtype=np.uint32)
        for i, f in enumerate(self.part_files):
            col = read_part(f, ["length"]).column("length").to_numpy()
            if len(col) != self.part_rows[i]:
                raise UserError(f"{f} holds {len(col)} rows but the manifest says {self.part_rows[i]}; re-run `cellrank tokenize`.")
            out[self.part_starts[i] : self.part_starts[i + 1]] = col
        return out

    def part_of(self, indices: np.ndarray) -> np.ndarray:
        """Part index of each global cell index."""
        return np.searchsorted(self.part_starts, np.asarray(indices), side="right") - 1

    def part_range(self, part: int) -> np.ndarray:
        return np.arange(self.part_starts[part], self.part_starts[part + 1])

    @cached_property
    def part_token_counts(self) -> np.ndarray:
        """Tokens held by each part."""
        total = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        return np.diff(total[self.part_starts])

    def _part_tokens(self, part: int) -> list[np.ndarray]:
        if part in self._cache:
            self._cache.move_to_end(part)
            return self._cache[part]
        col = read_part(self.part_files[part], ["input_ids"]).column("input_ids").combine_chunks()
        values = col.values.to_numpy(zero_copy_only=False)
        offsets = col.offsets.to_numpy()
        tokens = [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
        self._cache[part] = tokens
        sizes = self.part_token_counts
        while len(self._cache) > 1 and sum(int(sizes[k]) for k in self._cache) > CACHE_TOKENS:
            self._cache.popitem(last=False)
        return tokens

    def tokens(self, indices: Sequence[int] | np.ndarray | None = None) -> list[np.ndarray]:
        """Token arrays of the given cells (global indices, any order), or of every cell."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError("cell index out of range")
        out: list[np.ndarray | None] = [None] * len(indices)
        parts = self.part_of(indices)
        for part in np.unique(parts):
            toks = self._part_tokens(int(part))
            for j in np.flatnonzero(parts == part):
                out[j] = toks[indices[j] - self.part_starts[part]]
        return out  # type: ignore[return-value]

    def column(self, name: str, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray | list:
        """A per-cell column (metadata, `cell_id`, `source`, `length`) over all parts, or of `indices`."""
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(self.part_files[0])
        except Exception as err:  # noqa: BLE001 - pyarrow's errors for a damaged file vary
            from cellrank_fm.outputs import REMAKE_SHARDS, damaged

            raise damaged(self.part_files[0], err, REMAKE_SHARDS) from None
        if name not in schema.names:
            have = [n for n in schema.names if n != "input_ids"]
            raise UserError(f"{self.path} has no column {name!r}; it has {', '.join(have)}.")
        chunks = [read_part(f, [name]).column(name) for f in self.part_files]
        import pyarrow as pa

        col = pa.chunked_array([c for ch in chunks for c in ch.chunks], type=chunks[0].type)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            values = col.to_pylist()
            return values if indices is None else [values[i] for i in indices]
        arr = col.to_numpy()
        return arr if indices is None else arr[np.asarray(indices)]


def read_part(path: Path, columns: list[str]):
    """Columns of one Parquet part; a damaged part is named, with how to make it again."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except Exception as err:  # noqa: BLE001 - pyarrow's errors for a damaged file vary
        from cellrank_fm.outputs import REMAKE_SHARDS, damaged

        raise damaged(path, err, REMAKE_SHARDS) from None


def check_vocabulary(shards: ShardSet, vocab_size: int, vocab_sha256: str | None, what: str) -> None:
    """Raise UserError unless `shards` were tokenized with the vocabulary `what` (a model) uses."""
    if shards.vocab_size != vocab_size:
        raise UserError(
            f"{shards.path} uses a vocabulary of {shards.vocab_size:,} tokens but {what} has "
            f"{vocab_size:,}; tokenize with the model's vocabulary (or pick a matching model)."
        )
    if vocab_sha256 and shards.vocab_sha256 and vocab_sha256 != shards.vocab_sha256:
        raise UserError(
            f"{shards.path} was tokenized with a different vocabulary than {what} "
            f"(sha256 {shards.vocab_sha256[:12]} vs {vocab_sha256[:12]}); tokenize with the model's vocabulary."
        )
