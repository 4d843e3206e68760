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


def _reference_values(shared_data, vocab, medians, mapping):
    """Cells x tokens matrix of normalised values (duplicate columns summed), by golden cell_id."""
    with h5py.File(shared_data / "golden" / "input_1000cells.h5ad") as h:
        X = sp.csr_matrix((h["X/data"][:], h["X/indices"][:], h["X/indptr"][:]), shape=tuple(h["X"].attrs["shape"]))
        n_counts = h["obs/n_counts"][:].astype(np.float64)
        ensembl = [x.decode() for x in h["var/ensembl_id"][:]]
        cell_ids = [x.decode() for x in h["obs/cell_id"][:]]
    plan = build_plan(ensembl, vocab, medians, mapping)
    cols = np.flatnonzero(plan.col_token >= 0)
    size = max(vocab.values()) + 1
    to_token = sp.csr_matrix((np.ones(len(cols)), (cols, plan.col_token[cols])), shape=(X.shape[1], size))
    median_of = np.ones(size)
    median_of[plan.col_token[cols]] = plan.col_median[cols]
    values = sp.diags(10_000 / n_counts) @ (X.astype(np.float64) @ to_token) @ sp.diags(1 / median_of)
    return sp.csr_matrix(values), {cid: r for r, cid in enumerate(cell_ids)}


def _compare(ours: dict[str, np.ndarray], golden: pl.DataFrame, values, row_of) -> dict:
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
        row = values.getrow(row_of[cid]).toarray()[0]
        a, b = row[mine[diff]], row[theirs[diff]]
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
    settings = TokenizeSettings(model_version=ver, gene_id_column="ensembl_id", keep_obs=["cell_type"],
                                cell_id_column="cell_id", part_cells=400)
    manifest = tokenize_files([shared_data / "golden" / "input_1000cells.h5ad"], tmp_path / "shards", dicts, settings,
                              chunk_cells=256, quiet=True)
    golden = pl.read_parquet(shared_data / "golden" / f"geneformer_{ver}.parquet")
    assert manifest["cells"] == {"input": 1000, "filtered_out": 45, "empty": 0, "written": 955}
    assert manifest["cells"]["written"] == golden.height
    parts = pl.concat([pl.read_parquet(tmp_path / "shards" / p["file"]) for p in manifest["parts"]])
    assert parts.get_column("cell_id").to_list()[:3] == ["cell7_000000", "cell7_000001", "cell7_000002"]
    ours = {cid: np.asarray(t, dtype=np.int64) for cid, t in zip(parts["cell_id"].to_list(), parts["input_ids"].to_list())}
    assert set(ours) == set(golden["cell_id"].to_list())
    assert parts.get_column("cell_type").to_list() == golden.get_column("cell_type").to_list()

    vocab = load_vocabulary(gf / f"token_dictionary_{tag}.pkl")
    medians = load_medians(gf / f"gene_median_dictionary_{tag}.pkl")
    values, row_of = _reference_values(shared_data, vocab, medians, load_mapping([mapping_file]))
    result = _compare(ours, golden, values, row_of)
    print(f"{ver}: {json.dumps(result)}")
    assert result["other"] == 0, result
    assert result["identical"] + result["near_tie_swaps"] == golden.height
    assert result["identical"] > 0
    if ver == "v2":
        first = golden["input_ids"][0]
        assert first[0] == vocab["<cls>"] and first[-1] == vocab["<eos>"]
