"""cellrank medians: streaming sketch medians against exact nonzero medians, and merging."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from cellrank_fm.errors import UserError
from cellrank_fm.medians import compute_medians, merge_sketches

GENES = [f"ENSG{i:011d}" for i in range(1, 61)]


def _h5ad(path, dense, var_names, obs=None):
    import anndata as ad
    import pandas as pd

    obs = obs if obs is not None else pd.DataFrame(index=[f"c{i}" for i in range(dense.shape[0])])
    ad.AnnData(X=sp.csr_matrix(dense.astype(np.float32)), obs=obs, var=pd.DataFrame(index=var_names)).write_h5ad(path)


def _exact_bounds(dense, n_counts=None):
    """Per gene: the two order statistics bracketing the nonzero median of x / total * 10,000."""
    totals = dense.sum(axis=1) if n_counts is None else n_counts
    out = []
    for j in range(dense.shape[1]):
        v = np.sort(dense[:, j][dense[:, j] > 0] / totals[dense[:, j] > 0] * 10_000)
        if len(v) == 0:
            out.append(None)
            continue
        out.append((v[(len(v) - 1) // 2], v[len(v) // 2]))
    return out


@pytest.fixture()
def corpus(tmp_path):
    rng = np.random.default_rng(11)
    rates = rng.gamma(0.6, 2.0, size=len(GENES))
    dense = rng.poisson(rates, size=(900, len(GENES))).astype(np.float64)
    dense[:, -1] = 0  # a gene never expressed
    # A symbol column and a versioned duplicate of gene 0 (summed before sketching).
    labels = GENES[:-2] + [GENES[0] + ".3", "NOTAGENE"]
    _h5ad(tmp_path / "a.h5ad", dense[:500], labels)
    _h5ad(tmp_path / "b.h5ad", dense[500:], labels)
    merged = dense.copy()
    merged[:, 0] += merged[:, -2]
    return tmp_path, merged[:, :-2], labels


def test_medians_within_the_stated_bound_and_merge_equals_one_pass(corpus):
    d, dense, labels = corpus
    acc = 0.001
    one = compute_medians([d / "a.h5ad", d / "b.h5ad"], d / "m.json", sketch_out=d / "all.sketch", relative_accuracy=acc, quiet=True)
    bounds = _exact_bounds(dense)
    for g, b in zip(GENES[:-2], bounds):
        if b is None:
            assert g not in one
            continue
        lo, hi = b
        assert lo * (1 - acc) <= one[g] <= hi * (1 + acc), (g, one[g], lo, hi)
    assert json.loads((d / "m.json").read_text()) == one
    a = compute_medians([d / "a.h5ad"], None, sketch_out=d / "a.sketch", relative_accuracy=acc, quiet=True)
    assert a != one
    compute_medians([d / "b.h5ad"], None, sketch_out=d / "b.sketch", relative_accuracy=acc, quiet=True)
    merged = merge_sketches([d / "a.sketch", d / "b.sketch"], d / "merged.json")
    assert merged == one


def test_merge_refuses_different_gene_lists_and_bad_files(corpus, tmp_path):
    d, dense, labels = corpus
    compute_medians([d / "a.h5ad"], None, sketch_out=d / "a.sketch", quiet=True)
    _h5ad(d / "c.h5ad", dense[:10, :5], GENES[:5])
    compute_medians([d / "c.h5ad"], None, sketch_out=d / "c.sketch", quiet=True)
    with pytest.raises(UserError, match="different gene list"):
        merge_sketches([d / "a.sketch", d / "c.sketch"], d / "x.json")
    (d / "bad.sketch").write_bytes(b"nope")
    with pytest.raises(UserError, match="not a cellrank median sketch"):
        merge_sketches([d / "bad.sketch"], d / "x.json")
    assert not (d / "x.json").exists()


def test_filter_pass_and_given_n_counts(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(2)
    dense = rng.poisson(3.0, size=(200, 6)).astype(np.float64)
    n_counts = dense.sum(axis=1) * 2
    keep = np.arange(200) % 2 == 0
    dense[~keep, 0] = 1000  # would dominate gene 0's median if filtered cells were counted
    obs = pd.DataFrame({"filter_pass": keep.astype(int), "n_counts": n_counts}, index=[f"c{i}" for i in range(200)])
    _h5ad(tmp_path / "x.h5ad", dense, GENES[:6], obs)
    got = compute_medians([tmp_path / "x.h5ad"], None, sketch_out=tmp_path / "s", quiet=True)
    bounds = _exact_bounds(dense[keep], n_counts[keep])
    for g, (lo, hi) in zip(GENES[:6], bounds):
        assert lo * 0.999 <= got[g] <= hi * 1.001


def test_cli_medians_and_merge(corpus):
    from cli_helpers import run

    d, _, _ = corpus
    for args in (["medians", str(d / "a.h5ad"), "--sketch-out", str(d / "a.sk"), "-q"],
                 ["medians", str(d / "b.h5ad"), "--sketch-out", str(d / "b.sk"), "-q"],
                 ["medians", "--merge", str(d / "a.sk"), "--merge", str(d / "b.sk"), "--out", str(d / "m.json"), "-q"],
                 ["medians", str(d / "a.h5ad"), str(d / "b.h5ad"), "--out", str(d / "one.json"), "-q"]):
        run(args)
    assert json.loads((d / "m.json").read_text()) == json.loads((d / "one.json").read_text())
