"""Token-for-token compatibility with Geneformer's own tokenizer on the golden input.

Same content in every cell; same order except swaps between genes whose normalised values
differ by less than 1e-6 relative (Geneformer's unstable argsort over float32-scaled values).
The normalised values are recomputed here in float64, independently of the Rust core.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from cellrank_fm.genes import build_plan, load_mapping
from cellrank_fm.vocab import load_medians, load_vocabulary

TAGS = {"v1": "gc30M", "v2": "gc104M"}


def _reference_values(shared_data, ver, vocab, medians, mapping):
    """Per golden cell_id: token -> normalised value (duplicate columns summed)."""
    with h5py.File(shared_data / "golden" / "input_1000cells.h5ad") as h:
        X = sp.csr_matrix((h["X/data"][:], h["X/indices"][:], h["X/indptr"][:]), shape=tuple(h["X"].attrs["shape"]))
        n_counts = h["obs/n_counts"][:].astype(np.float64)
        ensembl = [x.decode() for x in h["var/ensembl_id"][:]]
        cell_ids = [x.decode() for x in h["obs/cell_id"][:]]
    plan = build_plan(ensembl, vocab, medians, mapping)
    median_of = {int(t): m for t, m in zip(plan.col_token, plan.col_median) if t >= 0}
    out = {}
    for r, cid in enumerate(cell_ids):
        row = X.getrow(r)
        values: dict[int, float] = {}
        for j, x in zip(row.indices, row.data):
            t = int(plan.col_token[j])
            if t >= 0:
                values[t] = values.get(t, 0.0) + float(x)
        out[cid] = {t: x / n_counts[r] * 10_000 / median_of[t] for t, x in values.items()}
    return out


def _compare(ours: dict[str, np.ndarray], golden: pl.DataFrame, values, specials) -> dict:
    identical = near = other = 0
    swapped_positions = 0
    for cid, theirs in zip(golden["cell_id"], golden["input_ids"]):
        mine = ours[cid]
        theirs = np.asarray(theirs)
        if len(mine) == len(theirs) and np.array_equal(mine, theirs):
            identical += 1
            continue
        if len(mine) != len(theirs) or set(mine.tolist()) != set(theirs.tolist()):
            other += 1
            continue
        diff = np.flatnonzero(mine != theirs)
        v = values[cid]
        a = np.array([v[int(t)] for t in mine[diff]])
        b = np.array([v[int(t)] for t in theirs[diff]])
        if np.all(np.abs(a - b) <= 1e-6 * np.maximum(a, b)):
            near += 1
            swapped_positions += len(diff)
        else:
            other += 1
    return {"identical": identical, "near_tie_swaps": near, "swapped_positions": swapped_positions, "other": other}


@pytest.mark.parametrize("ver", ["v1", "v2"])
def test_matches_geneformer_through_the_shard_pipeline(shared_data, tmp_path, ver):
    from cellrank_fm.tokenize import Dictionaries, TokenizeSettings, tokenize_files

    gf = shared_data / "geneformer"
    tag = TAGS[ver]
    mapping_file = gf / f"ensembl_mapping_dict_{tag}.pkl"
    dicts = Dictionaries.load(gf / f"token_dictionary_{tag}.pkl", gf / f"gene_median_dictionary_{tag}.pkl", [mapping_file])
    settings = TokenizeSettings(model_version=ver, gene_id_column="ensembl_id", keep_obs=["cell_id", "cell_type"], part_cells=400)
    manifest = tokenize_files([shared_data / "golden" / "input_1000cells.h5ad"], tmp_path / "shards", dicts, settings,
                              chunk_cells=128, quiet=True)
    golden = pl.read_parquet(shared_data / "golden" / f"geneformer_{ver}.parquet")
    assert manifest["cells"] == {"input": 1000, "filtered_out": 45, "empty": 0, "written": 955}
    assert manifest["cells"]["written"] == golden.height
    parts = pl.concat([pl.read_parquet(tmp_path / "shards" / p["file"]) for p in manifest["parts"]])
    assert parts.get_column("cell_id").to_list()[:3] == ["c0", "c1", "c2"]
    ours = {cid: np.asarray(t, dtype=np.int64) for cid, t in zip(parts["cell_id"].to_list(), parts["input_ids"].to_list())}
    assert set(ours) == set(golden["cell_id"].to_list())
    assert parts.get_column("cell_type").to_list() == golden.get_column("cell_type").to_list()

    vocab = load_vocabulary(gf / f"token_dictionary_{tag}.pkl")
    medians = load_medians(gf / f"gene_median_dictionary_{tag}.pkl")
    values = _reference_values(shared_data, ver, vocab, medians, load_mapping([mapping_file]))
    for cid in values:
        values[cid].update({vocab[s]: np.inf for s in ("<cls>", "<eos>") if s in vocab})
    result = _compare(ours, golden, values, None)
    print(f"{ver}: {json.dumps(result)}")
    assert result["other"] == 0, result
    assert result["identical"] + result["near_tie_swaps"] == golden.height
    assert result["identical"] > 0
    if ver == "v2":
        first = golden["input_ids"][0]
        assert first[0] == vocab["<cls>"] and first[-1] == vocab["<eos>"]
