"""Shared fixtures: the real reference data beside the repository (skipped when absent), and the
default classifiers fine-tuned on it once per session (`test_quality` judges them, other tests
explain them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long checks, run with `pytest -m slow`")


def pytest_collection_modifyitems(config, items):
    if config.getoption("-m"):
        return
    skip_slow = pytest.mark.skip(reason="slow check: run with `pytest -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (Geneformer dictionaries, golden tokens, real counts); skip if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on shared cores they spin and crawl."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- real-cell classifiers

QUALITY_GENES_PER_CELL = 512  # cells cut to their top 512 genes, as on a CPU
QUALITY_TASKS = {  # shards, columns kept, extra finetune arguments
    "pbmc3k": ("pbmc3k_seurat_labels", "cell_type", []),
    "onek1k-by-donor": ("onek1k_subset_scdesignpop", "cell_type,donor", ["--split-by", "donor"]),
    "kang": ("kang2017_pbmc_ifnb_2k", "condition", []),
}
QUALITY_RUNS = [("pbmc3k", 0), ("pbmc3k", 1), ("pbmc3k", 2), ("onek1k-by-donor", 0), ("kang", 0)]


@pytest.fixture(scope="session")
def quality_shards(shared_data, tmp_path_factory):
    """(folder, tokenize): `tokenize(name, keep)` tokenizes `sc/{name}.h5ad` once per session with
    Geneformer's V1 dictionaries into `folder/name`. `CELLRANK_TEST_MODELS=DIR` keeps the folder
    (shards and classifiers) across sessions, for working on the tests that read them."""
    from cli_helpers import run

    g = shared_data / "geneformer"
    dicts = ["--vocab", str(g / "token_dictionary_gc30M.pkl"), "--medians", str(g / "gene_median_dictionary_gc30M.pkl"),
             "--gene-map", str(g / "gene_name_id_dict_gc30M.pkl"), "--model-input-size", str(QUALITY_GENES_PER_CELL),
             "-q"]
    kept = os.environ.get("CELLRANK_TEST_MODELS")
    tmp = Path(kept) if kept else tmp_path_factory.mktemp("quality")

    def tokenize(name: str, keep: str) -> Path:
        out = tmp / name
        if not out.exists():
            run(["tokenize", str(shared_data / "sc" / f"{name}.h5ad"), "--out", str(out), "--keep-obs", keep, *dicts])
        return out

    return tmp, tokenize


class QualityModels:
    """The default fine-tuning runs of `QUALITY_RUNS` (from scratch, `--baseline`), each trained
    once per session when first asked for: `models[task, seed]` or `models.all()` gives
    {"model": directory, "metrics": metrics.json, "f1", "lr", "probe": macro-F1}. Runs go two at
    a time (one thread each, as the machine has two cores); an odd batch takes the next pending
    run along, so the five runs cost three rounds whichever test asks first."""

    def __init__(self, folder: Path, tokenize):
        self.folder, self.tokenize, self.done = folder, tokenize, {}

    def __getitem__(self, run: tuple[str, int]) -> dict:
        return self.ensure([run])[run]

    def all(self) -> dict:
        return self.ensure(QUALITY_RUNS)

    def task(self, task: str) -> list[dict]:
        """Every seed's run of `task`."""
        return list(self.ensure([r for r in QUALITY_RUNS if r[0] == task]).values())

    def ensure(self, runs) -> dict:
        todo = [r for r in runs if r not in self.done]
        if len(todo) % 2:
            todo += [r for r in QUALITY_RUNS if r not in self.done and r not in todo][:1]
        for task, _ in todo:  # one tokenization per data set, before the runs that share it
            self.tokenize(*QUALITY_TASKS[task][:2])
        with ThreadPoolExecutor(max_workers=2) as pool:
            for run, result in zip(todo, pool.map(lambda r: self._one(*r), todo)):
                self.done[run] = result
        return {r: self.done[r] for r in runs}

    def _one(self, task: str, seed: int) -> dict:
        name, keep, extra = QUALITY_TASKS[task]
        shards = self.folder / name
        out = self.folder / f"clf-{task}-{seed}"
        if not (out / "metrics.json").exists():
            cmd = [sys.executable, "-m", "cellrank_fm", "finetune", str(shards), "--label", keep.split(",")[0],
                   "--preset", "tiny", "--out", str(out), "--baseline", "--seed", str(seed), "-q", *extra]
            done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
        m = json.loads((out / "metrics.json").read_text())
        f1, lr, probe = m["macro_f1"], m["baseline"]["macro_f1"], m["token_probe"]["macro_f1"]
        print(f"{task}, seed {seed}: cellrank {f1:.3f}, LR {lr:.3f}, token probe {probe:.3f}, {m['steps']} steps")
        # The guardrail stays quiet when the model holds its own.
        assert f1 < max(lr, probe) - 0.05 or not m["warnings"]
        return {"model": out, "metrics": m, "f1": f1, "lr": lr, "probe": probe}


@pytest.fixture(scope="session")
def quality_models(quality_shards) -> QualityModels:
    """The default classifiers on the real cells, trained on first use (see `QualityModels`)."""
    return QualityModels(*quality_shards)
