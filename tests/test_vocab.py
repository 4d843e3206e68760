"""Vocabulary and medians files: our JSON/Parquet forms and Geneformer pickles, safely."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cellrank_fm.errors import UserError
from cellrank_fm.vocab import (
    content_sha256,
    load_medians,
    load_vocabulary,
    preset,
    save_json_mapping,
    save_parquet_mapping,
    special_tokens,
    token_dtype,
)


def test_numpy_scalar_pickles_load_as_plain_numbers(tmp_path):
    # Geneformer's dictionaries hold numpy scalars (np.int16 ids, np.float64 medians).
    vocab = {"<pad>": 0, "<mask>": 1, "ENSG00000000003": np.int16(2), "ENSG00000000005": np.int16(3)}
    medians = {"ENSG00000000003": np.float64(2.5), "ENSG00000000005": np.float32(0.75)}
    (tmp_path / "v.pkl").write_bytes(pickle.dumps(vocab))
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(medians))
    v = load_vocabulary(tmp_path / "v.pkl")
    m = load_medians(tmp_path / "m.pkl")
    assert v == {"<pad>": 0, "<mask>": 1, "ENSG00000000003": 2, "ENSG00000000005": 3}
    assert all(type(x) is int for x in v.values())
    assert m == {"ENSG00000000003": 2.5, "ENSG00000000005": 0.75}


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_pickle_with_any_other_global_is_refused(tmp_path):
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"ENSG00000000003": Evil()}))
    with pytest.raises(UserError, match=r"needs (posix|os|nt)\.system to load"):
        load_vocabulary(tmp_path / "evil.pkl")
    import collections

    (tmp_path / "od.pkl").write_bytes(pickle.dumps(collections.OrderedDict(a=1)))
    with pytest.raises(UserError, match="collections.OrderedDict"):
        load_vocabulary(tmp_path / "od.pkl")


def test_json_and_parquet_round_trip_with_content_hash(tmp_path):
    vocab = {"<pad>": 0, "<mask>": 1, "ENSG00000000003": 2}
    sha_json = save_json_mapping(vocab, tmp_path / "v.json")
    sha_pq = save_parquet_mapping(vocab, tmp_path / "v.parquet", "token")
    assert load_vocabulary(tmp_path / "v.json") == vocab
    assert load_vocabulary(tmp_path / "v.parquet") == vocab
    assert sha_json == sha_pq == content_sha256(dict(reversed(list(vocab.items()))))
    assert content_sha256({**vocab, "ENSG00000000003": 3}) != sha_json


def test_bad_tables_are_user_errors(tmp_path):
    (tmp_path / "dup.json").write_text('{"A": 2, "B": 2}')
    with pytest.raises(UserError, match="same token id"):
        load_vocabulary(tmp_path / "dup.json")
    (tmp_path / "neg.json").write_text('{"A": -1}')
    with pytest.raises(UserError, match="not a token id"):
        load_vocabulary(tmp_path / "neg.json")
    # A gene with an unusable median would silently drop out of every cell: the file is refused.
    (tmp_path / "m.json").write_text('{"A": 0, "B": 1.5, "C": -2, "D": NaN}')
    with pytest.raises(UserError, match=r"gives 3 of 4 genes a zero, negative or missing median \(e.g. 'A': 0\)"):
        load_medians(tmp_path / "m.json")
    (tmp_path / "x.txt").write_text("{}")
    with pytest.raises(UserError, match="unknown format"):
        load_vocabulary(tmp_path / "x.txt")
    with pytest.raises(UserError, match="does not exist"):
        load_medians(tmp_path / "absent.json")


def test_presets_and_special_tokens():
    assert preset("v1").model_input_size == 2048 and not preset("v1").add_cls
    assert preset("V2").model_input_size == 4096 and preset("v2").add_eos
    v2 = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "G": 4}
    assert special_tokens(v2, "v2") == {"pad": 0, "mask": 1, "cls": 2, "eos": 3}
    with pytest.raises(UserError, match="needs <cls> and <eos>"):
        special_tokens({"<pad>": 0, "<mask>": 1}, "v2")
    with pytest.raises(UserError, match="unknown model version"):
        preset("v3")
    assert token_dtype(v2) == "uint16" and token_dtype({"G": 70000}) == "uint32"


def test_geneformer_files(shared_data):
    gf = shared_data / "geneformer"
    v1 = load_vocabulary(gf / "token_dictionary_gc30M.pkl")
    m1 = load_medians(gf / "gene_median_dictionary_gc30M.pkl")
    v2 = load_vocabulary(gf / "token_dictionary_gc104M.pkl")
    assert len(v1) == 25426 and v1["<pad>"] == 0 and v1["<mask>"] == 1
    assert len(v2) == 20275 and special_tokens(v2, "v2")["eos"] == 3
    assert len(m1) == 25424 and all(g in m1 for g in list(v1)[2:100])
