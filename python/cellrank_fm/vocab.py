"""Vocabularies, gene medians and gene-ID mapping tables: loading, saving, hashing.

Three on-disk forms are read:
- JSON: one object `{"key": value, ...}` (what `cellrank` writes; order preserved);
- Parquet: two columns, key then value (any names);
- Geneformer's `.pkl` dictionaries, through a restricted unpickler that rebuilds only plain
  dicts, strings, numbers and NumPy scalars, so a pickle can never run code.

The package does not ship Geneformer's files: users pass `--vocab token_dictionary_gc104M.pkl
--medians gene_median_dictionary_gc104M.pkl` (or our JSON copies found in any shard or model
directory).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from cellrank_fm.errors import UserError, atomic_path, write_json

SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")


@dataclass(frozen=True)
class ModelPreset:
    """Input size and special tokens of a Geneformer model generation."""

    name: str
    model_input_size: int
    add_cls: bool
    add_eos: bool


PRESETS = {
    "v1": ModelPreset("v1", 2048, add_cls=False, add_eos=False),
    "v2": ModelPreset("v2", 4096, add_cls=True, add_eos=True),
}


def preset(model_version: str) -> ModelPreset:
    key = str(model_version).lower()
    if key not in PRESETS:
        raise UserError(f"unknown model version {model_version!r}; use v1 or v2")
    return PRESETS[key]


def special_tokens(vocabulary: Mapping[str, int], model_version: str) -> dict[str, int | None]:
    """Token ids of `<pad>`, `<mask>`, `<cls>`, `<eos>` (None when absent); V2 requires cls/eos."""
    found = {name.strip("<>"): vocabulary.get(name) for name in SPECIAL_TOKENS}
    p = preset(model_version)
    if p.add_cls and (found["cls"] is None or found["eos"] is None):
        raise UserError(
            "model version v2 needs <cls> and <eos> in the vocabulary; pass a V2 vocabulary "
            "(e.g. token_dictionary_gc104M.pkl) or use --model-version v1"
        )
    return found


# ---------------------------------------------------------------------------------------------
# Restricted unpickling of Geneformer dictionaries.

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name}")
        import numpy

        if name == "dtype":
            return numpy.dtype
        try:  # numpy >= 2 moved the module; both spellings name the same function
            from numpy._core.multiarray import scalar
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core.multiarray import scalar
        return scalar


def _load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return _RestrictedUnpickler(io.BytesIO(fh.read())).load()
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path} is a pickle that needs {err} to load, and only plain dictionaries of "
            "strings and numbers are accepted; convert it to JSON from a trusted Python session"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise UserError(f"{path} is not a readable pickle ({err})") from None


# ---------------------------------------------------------------------------------------------
# Generic key -> value tables.


def _plain(value: Any) -> Any:
    """NumPy scalars -> Python numbers; everything else as is."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def load_table(path: str | Path, what: str) -> dict[str, Any]:
    """Read a key -> value mapping from .json, .parquet or .pkl (restricted)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{what} file {path} is not valid JSON ({err})") from None
    elif suffix == ".parquet":
        import polars as pl

        try:
            df = pl.read_parquet(path)
        except Exception as err:  # noqa: BLE001 - polars raises many error types
            raise UserError(f"{what} file {path} is not a readable Parquet file ({err})") from None
        if df.width < 2:
            raise UserError(f"{what} file {path} needs two columns: key and value")
        obj = dict(zip(df.get_column(df.columns[0]).to_list(), df.get_column(df.columns[1]).to_list()))
    elif suffix in (".pkl", ".pickle"):
        obj = _load_pickle(path)
    else:
        raise UserError(f"{what} file {path} has an unknown format; use .json, .parquet or .pkl")
    if not isinstance(obj, dict):
        raise UserError(f"{what} file {path} must hold one mapping, not a {type(obj).__name__}")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise UserError(f"{what} file {path} has a non-string key {key!r}")
        out[key] = _plain(value)
    return out


def load_vocabulary(path: str | Path) -> dict[str, int]:
    """Gene (and special token) -> token id; ids must be distinct non-negative integers."""
    table = load_table(path, "vocabulary")
    vocab: dict[str, int] = {}
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"vocabulary file {path} maps {key!r} to {value!r}, not a token id")
        vocab[key] = value
    if len(set(vocab.values())) != len(vocab):
        raise UserError(f"vocabulary file {path} gives the same token id to two genes")
    if not vocab:
        raise UserError(f"vocabulary file {path} is empty")
    return vocab


def load_medians(path: str | Path) -> dict[str, float]:
    """Gene -> nonzero median of count / total x 10,000 (finite and > 0)."""
    table = load_table(path, "medians")
    medians: dict[str, float] = {}
    unusable: list[str] = []
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"medians file {path} maps {key!r} to {value!r}, not a number")
        if not math.isfinite(value) or value <= 0:
            unusable.append(key)
        else:
            medians[key] = float(value)
    if unusable:
        # Such a gene could not be normalised and would silently drop out of every cell; files
        # from `cellrank medians` and Geneformer's never hold one, so the file is damaged.
        raise UserError(
            f"medians file {path} gives {len(unusable):,} of {len(table):,} genes a zero, negative or missing "
            f"median (e.g. {unusable[0]!r}: {table[unusable[0]]!r}); every median must be a positive number: "
            "make the file again with `cellrank medians`, or leave those genes out of it"
        )
    if not medians:
        raise UserError(f"medians file {path} holds no positive median")
    return medians


def load_string_map(path: str | Path, what: str = "gene mapping") -> dict[str, str]:
    """A str -> str table (e.g. Geneformer's gene_name_id_dict / ensembl_mapping_dict)."""
    table = load_table(path, what)
    bad = next((k for k, v in table.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise UserError(f"{what} file {path} maps {bad!r} to a non-string value")
    return table


# ---------------------------------------------------------------------------------------------
# Writing and hashing.


def content_sha256(mapping: Mapping[str, Any]) -> str:
    """sha256 of the mapping's canonical JSON (sorted keys, compact): same content, same hash."""
    blob = json.dumps(dict(mapping), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_json_mapping(mapping: Mapping[str, Any], path: str | Path) -> str:
    """Write the mapping as JSON atomically (insertion order kept); returns its content sha256."""
    write_json(dict(mapping), path, indent=0)
    return content_sha256(mapping)


def save_parquet_mapping(mapping: Mapping[str, Any], path: str | Path, value_name: str) -> str:
    """Two-column Parquet (`gene`, `value_name`); returns the content sha256."""
    import polars as pl

    df = pl.DataFrame({"gene": list(mapping.keys()), value_name: list(mapping.values())})
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)
    return content_sha256(mapping)


def token_dtype(vocabulary: Mapping[str, int]) -> str:
    """Narrowest unsigned type that holds every token id."""
    return "uint16" if max(vocabulary.values()) < 65536 else "uint32"
