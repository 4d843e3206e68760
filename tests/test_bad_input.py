"""Inputs a user can get wrong: one sentence on stderr, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

GENES = [f"ENSG{i:011d}" for i in range(2, 32)]
VOCAB = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(GENES)}}
MEDIANS = {g: 1.0 + i / 10 for i, g in enumerate(GENES)}


def _h5ad(path, dense, var_names=GENES, obs=None):
    import anndata as ad
    import pandas as pd

    obs = obs if obs is not None else pd.DataFrame(index=[f"c{i}" for i in range(dense.shape[0])])
    ad.AnnData(X=sp.csr_matrix(dense.astype(np.float32)), obs=obs, var=pd.DataFrame(index=var_names)).write_h5ad(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "vocab.json").write_text(json.dumps(VOCAB))
    (d / "medians.json").write_text(json.dumps(MEDIANS))
    rng = np.random.default_rng(0)
    dense = rng.poisson(1.0, size=(50, len(GENES))).astype(np.float64)
    _h5ad(d / "good.h5ad", dense)
    return d, dense


def _cellrank(*args, cwd=None):
    code = "from cellrank_fm.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def _tokenize(env_dir, inp, out, *extra):
    return _cellrank("tokenize", inp, "--out", out, "--vocab", env_dir / "vocab.json", "--medians", env_dir / "medians.json", "--quiet", *extra)


def _assert_user_error(proc, pattern):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert pattern in lines[0], lines[0]


def test_truncated_h5ad(env, tmp_path):
    d, _ = env
    blob = (d / "good.h5ad").read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(blob[: len(blob) // 2])
    proc = _tokenize(d, tmp_path / "cut.h5ad", tmp_path / "out")
    _assert_user_error(proc, "cut.h5ad")
    assert not (tmp_path / "out").exists()


def test_not_an_h5ad(env, tmp_path):
    d, _ = env
    (tmp_path / "notes.h5ad").write_text("gene,count\nA,1\n")
    _assert_user_error(_tokenize(d, tmp_path / "notes.h5ad", tmp_path / "out"), "not an HDF5 file")


def test_unknown_format(env, tmp_path):
    d, _ = env
    (tmp_path / "counts.xlsx").write_bytes(b"PK\x03\x04")
    _assert_user_error(_tokenize(d, tmp_path / "counts.xlsx", tmp_path / "out"), "unknown format")


def test_missing_gene_column(env, tmp_path):
    d, _ = env
    _assert_user_error(_tokenize(d, d / "good.h5ad", tmp_path / "out", "--gene-id-column", "ensembl_id"), "no gene column 'ensembl_id'")


def test_no_recognised_gene(env, tmp_path):
    d, dense = env
    _h5ad(tmp_path / "mouse.h5ad", dense, [f"Gm{i}" for i in range(len(GENES))])
    _assert_user_error(_tokenize(d, tmp_path / "mouse.h5ad", tmp_path / "out"), "is in the vocabulary")


def test_missing_keep_obs_column(env, tmp_path):
    d, _ = env
    _assert_user_error(_tokenize(d, d / "good.h5ad", tmp_path / "out", "--keep-obs", "donor"), "no cell column 'donor'")


def test_bad_pickle_vocabulary(env, tmp_path):
    import pickle

    d, _ = env

    class Boom:
        def __reduce__(self):
            return (print, ("side effect",))

    (tmp_path / "v.pkl").write_bytes(pickle.dumps({"ENSG00000000002": Boom()}))
    proc = _cellrank("tokenize", d / "good.h5ad", "--out", tmp_path / "out", "--vocab", tmp_path / "v.pkl",
                     "--medians", d / "medians.json", "--quiet")
    _assert_user_error(proc, "builtins.print")
    assert "side effect" not in proc.stdout


def test_negative_counts_in_a_later_chunk_leave_nothing_behind(env, tmp_path):
    d, dense = env
    big = np.tile(dense, (20, 1))  # 1,000 cells
    big[930, 5] = -2.0
    _h5ad(tmp_path / "neg.h5ad", big)
    out = tmp_path / "out"
    proc = _tokenize(d, tmp_path / "neg.h5ad", out, "--part-cells", "200", "--chunk-cells", "100")
    _assert_user_error(proc, "cell 930 (c930) has a negative or NaN count")
    assert "neg.h5ad" in proc.stderr
    # Parts 0-3 were whole, but a failed run leaves the path as it found it (absent), hidden
    # run files and lock included, so the corrected run needs no flag.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neg.h5ad"]
    big[930, 5] = 2.0
    _h5ad(tmp_path / "neg.h5ad", big)
    proc = _tokenize(d, tmp_path / "neg.h5ad", out, "--part-cells", "200", "--chunk-cells", "100")
    assert proc.returncode == 0, proc.stderr
    assert [pl.read_parquet(out / f"part-{i:05d}.parquet").height for i in range(5)] == [200] * 5
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_nan_in_bulk_table(env, tmp_path):
    d, _ = env
    (tmp_path / "bulk.csv").write_text("sample," + ",".join(GENES[:3]) + "\nS1,1,2,3\nS2,4,NaN,6\n")
    _assert_user_error(_tokenize(d, tmp_path / "bulk.csv", tmp_path / "out"), "NaN")


def test_float_values_warn_unless_allowed(env, tmp_path):
    d, dense = env
    _h5ad(tmp_path / "tpm.h5ad", dense * 1.37)
    proc = _tokenize(d, tmp_path / "tpm.h5ad", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "are not integers" in proc.stderr and "--allow-float" in proc.stderr
    proc = _tokenize(d, tmp_path / "tpm.h5ad", tmp_path / "out2", "--allow-float")
    assert proc.returncode == 0 and "not integers" not in proc.stderr


@pytest.mark.parametrize("bad, said", [(-3.0, "negative or NaN"), (np.inf, "infinite")])
def test_medians_name_the_cell_with_a_bad_value(env, tmp_path, bad, said):
    d, dense = env
    values = dense.copy()
    values[[3, 7], 0] = 0  # a filtered-out row before the bad one: the cell named is still the input's row
    values[7, 4] = bad
    import pandas as pd

    obs = pd.DataFrame({"filter_pass": [0 if i == 2 else 1 for i in range(len(values))]},
                       index=[f"c{i}" for i in range(len(values))])
    _h5ad(tmp_path / "bad.h5ad", values, obs=obs)
    proc = _cellrank("medians", tmp_path / "bad.h5ad", "--vocab", d / "vocab.json", "--out", tmp_path / "m.json", "--quiet")
    _assert_user_error(proc, f"cell 7 (c7) has {'an' if said == 'infinite' else 'a'} {said} count")
    assert not (tmp_path / "m.json").exists()
