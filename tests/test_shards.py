"""ShardSet on a shard directory written straight from the contract (manifest + parquet)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cellrank_fm.errors import UserError
from cellrank_fm.shards import ShardSet, check_vocabulary


def write_shards(path: Path, cells_per_part: list[list[np.ndarray]], vocab_size: int = 64,
                 model_version: str = "v1", sha: str = "abc123") -> Path:
    """A shard directory per the DESIGN contract, with a `group` metadata column."""
    path.mkdir(parents=True)
    special = {"pad": 0, "mask": 1, "cls": None, "eos": None}
    if model_version == "v2":
        special.update(cls=2, eos=3)
    vocab = {"<pad>": 0, "<mask>": 1}
    if model_version == "v2":
        vocab.update({"<cls>": 2, "<eos>": 3})
    vocab.update({f"ENSG{i:011d}": i for i in range(len(vocab), vocab_size)})
    (path / "vocabulary.json").write_text(json.dumps(vocab))
    (path / "medians.json").write_text(json.dumps({g: 1.0 for g in vocab if g.startswith("ENSG")}))
    (path / "symbols.json").write_text(json.dumps({}))
    parts, k = [], 0
    for p, cells in enumerate(cells_per_part):
        table = pa.table({
            "input_ids": pa.array([c.astype(np.uint16).tolist() for c in cells], type=pa.list_(pa.uint16())),
            "length": pa.array([len(c) for c in cells], type=pa.uint32()),
            "cell_id": [f"cell{k + i}" for i in range(len(cells))],
            "source": ["x.h5ad"] * len(cells),
            "group": [f"g{(k + i) % 3}" for i in range(len(cells))],
        })
        k += len(cells)
        name = f"part-{p:05d}.parquet"
        pq.write_table(table, path / name, compression="zstd")
        parts.append({"file": name, "rows": len(cells)})
    manifest = {
        "format": "cellrank-shards", "format_version": 1, "model_version": model_version,
        "model_input_size": 2048, "special_tokens": special,
        "vocabulary": {"sha256": sha, "size": vocab_size, "source": "test"},
        "medians": {"sha256": "m", "source": "test"}, "token_dtype": "uint16", "parts": parts,
        "metadata_columns": ["group"],
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _cells(rng, n, vocab=64):
    return [rng.permutation(np.arange(2, vocab))[: rng.integers(3, 40)] for _ in range(n)]


def test_shardset_reads_lengths_tokens_and_columns(tmp_path):
    rng = np.random.default_rng(0)
    parts = [_cells(rng, 30), _cells(rng, 12), _cells(rng, 25)]
    s = ShardSet(write_shards(tmp_path / "s", parts))
    flat = [c for p in parts for c in p]
    assert len(s) == 67 and s.num_parts == 3 and s.vocab_size == 64
    assert s.lengths.tolist() == [len(c) for c in flat]
    idx = np.array([66, 0, 31, 29, 30, 41])
    for i, t in zip(idx, s.tokens(idx)):
        assert t.tolist() == flat[i].tolist()
    assert s.part_of(np.array([0, 29, 30, 41, 42, 66])).tolist() == [0, 0, 1, 1, 2, 2]
    assert s.column("cell_id", [5, 40]) == ["cell5", "cell40"]
    assert s.column("group")[:4] == ["g0", "g1", "g2", "g0"]
    with pytest.raises(UserError, match="no column 'nope'"):
        s.column("nope")


def test_bad_shard_directories(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ShardSet(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        ShardSet(tmp_path / "empty")
    with pytest.raises(UserError, match="holds no cells"):
        ShardSet(write_shards(tmp_path / "zero", [[]]))
    s = ShardSet(write_shards(tmp_path / "ok", [_cells(np.random.default_rng(1), 4)]))
    with pytest.raises(UserError, match="vocabulary of 64 tokens but the model has 100"):
        check_vocabulary(s, 100, None, "the model")
    with pytest.raises(UserError, match="different vocabulary"):
        check_vocabulary(s, 64, "fff000", "the model")
    check_vocabulary(s, 64, "abc123", "the model")
