"""The failure drill: damaged inputs, full and read-only disks, concurrent runs, dead ends.

One representative case of every class the drill found (issue 11), each with fixtures made
here: the command must end in one sentence and exit code 2 (or succeed where it should),
leave nothing half-written under a final name, and the next correct run must work without
flags. Kill-and-resume runs kill a subprocess with SIGKILL at a chosen point.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import fails, run

GENES = [f"ENSG{i:011d}" for i in range(2, 32)]
VOCAB = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(GENES)}}
MEDIANS = {g: 1.0 + i / 10 for i, g in enumerate(GENES)}
N_CELLS = 120


# ---------------------------------------------------------------------------------------------
# Small inputs in every sparse format (also used by the fuzz test).


def counts(n_cells: int = N_CELLS, seed: int = 0) -> np.ndarray:
    """Poisson counts; cells of group g (cell i is in group i % 3) express genes 10g..10g+9 more."""
    rate = np.full((n_cells, len(GENES)), 1.0)
    for g in range(3):
        rate[g::3, 10 * g:10 * g + 10] = 3.0
    return np.random.default_rng(seed).poisson(rate).astype(np.float32)


def write_h5ad(path: Path, dense: np.ndarray, var_names=GENES) -> Path:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    obs = pd.DataFrame({"group": [f"g{i % 3}" for i in range(len(dense))]},
                       index=[f"c{i}" for i in range(len(dense))])
    ad.AnnData(X=sp.csr_matrix(dense), obs=obs, var=pd.DataFrame(index=list(var_names))).write_h5ad(path)
    return path


def write_10x(path: Path, dense: np.ndarray, genes=GENES) -> Path:
    """A Cell Ranger v3 matrix: genes x cells CSC, i.e. one indptr entry per barcode."""
    import h5py
    import scipy.sparse as sp

    m = sp.csr_matrix(dense)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array([f"AAAC{i:04d}-1".encode() for i in range(len(dense))])
        g["data"], g["indices"], g["indptr"] = m.data.astype(np.int32), m.indices.astype(np.int64), m.indptr
        g["shape"] = np.array([len(genes), len(dense)], dtype=np.int32)
        feats = g.create_group("features")
        feats["id"] = np.array([x.encode() for x in genes])
        feats["name"] = np.array([f"G{i}".encode() for i in range(len(genes))])
        feats["feature_type"] = np.array([b"Gene Expression"] * len(genes))
    return path


def write_mtx(directory: Path, dense: np.ndarray, genes=GENES, extra_entry: str | None = None) -> Path:
    """Cell Ranger's Matrix Market layout (genes x cells, 1-based, grouped by cell)."""
    directory.mkdir(parents=True, exist_ok=True)
    cells, gene_idx = np.nonzero(dense)
    lines = [f"{g + 1} {c + 1} {int(dense[c, g])}" for c, g in zip(cells, gene_idx)]
    if extra_entry:
        lines.append(extra_entry)
    header = f"%%MatrixMarket matrix coordinate integer general\n{len(genes)} {len(dense)} {len(lines)}\n"
    (directory / "matrix.mtx").write_text(header + "\n".join(lines) + "\n")
    (directory / "features.tsv").write_text("".join(f"{g}\tG{i}\tGene Expression\n" for i, g in enumerate(genes)))
    (directory / "barcodes.tsv").write_text("".join(f"AAAC{i:04d}-1\n" for i in range(len(dense))))
    return directory


def write_loom(path: Path, dense: np.ndarray, genes=GENES) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f["matrix"] = dense.T  # genes x cells
        f.create_group("layers")
        f.create_group("row_attrs")["Gene"] = np.array([g.encode() for g in genes])
        f.create_group("col_attrs")["CellID"] = np.array([f"c{i}".encode() for i in range(len(dense))])
    return path


WRITERS = {"h5ad": (write_h5ad, "x.h5ad"), "10x": (write_10x, "x.h5"), "mtx": (write_mtx, "mtx"),
           "loom": (write_loom, "x.loom")}


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers.


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_torch_thread):
    """Dictionaries, a good h5ad, its shards (with `group` kept) and a tiny classifier."""
    from cellrank_fm.finetune import FinetuneOptions, finetune_cells
    from cellrank_fm.tokenize import Dictionaries, TokenizeSettings, tokenize_files

    d = tmp_path_factory.mktemp("drill")
    (d / "vocab.json").write_text(json.dumps(VOCAB))
    (d / "medians.json").write_text(json.dumps(MEDIANS))
    write_h5ad(d / "good.h5ad", counts())
    tokenize_files([d / "good.h5ad"], d / "shards", Dictionaries(VOCAB, MEDIANS),
                   TokenizeSettings(model_input_size=24, keep_obs=["group"]), quiet=True)
    finetune_cells(d / "shards", d / "model", FinetuneOptions(
        label="group", preset="tiny", epochs=1.0, tokens_per_batch=1024, patience=0, device="cpu", quiet=True))
    return d


def tokenize_args(d: Path, inp, out, *extra) -> list:
    return ["tokenize", inp, "--out", out, "--vocab", d / "vocab.json", "--medians", d / "medians.json",
            "--quiet", *extra]


def one_sentence(code: int, err: str, *needles: str) -> str:
    """The failure was one `error:` sentence with exit code 2 (notes may precede it)."""
    assert code == 2, (code, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def cellrank_subprocess(args, *, before: str = "", limit_file_bytes: int | None = None, timeout: int = 600):
    """`cellrank ARGS` in a fresh interpreter; `before` is Python run first (e.g. a kill hook)."""
    code = f"{before}\nfrom cellrank_fm.cli import main\nmain({[str(a) for a in args]!r})"

    def limit():
        if limit_file_bytes is not None:
            import resource

            # Writes past the limit fail with EFBIG, as on a full disk (Python ignores SIGXFSZ).
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, env=env)


# SIGKILL ourselves once `module`'s attribute `name` (dotted: a method) has returned `n` times:
# a kill -9 at a chosen point, however fast the run.
KILL_AFTER = """
import functools, importlib, os, signal
_owner = importlib.import_module({module!r})
*_path, _name = {name!r}.split(".")
for _p in _path:
    _owner = getattr(_owner, _p)
_orig, _calls = getattr(_owner, _name), [0]
@functools.wraps(_orig)
def _hook(*a, **k):
    out = _orig(*a, **k)
    _calls[0] += 1
    if _calls[0] >= {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(_owner, _name, _hook)
"""


def killed_after(module: str, name: str, n: int) -> str:
    return KILL_AFTER.format(module=module, name=name, n=n)


@contextlib.contextmanager
def read_only(monkeypatch, root: Path):
    """Every write under `root` fails with EROFS, as on a read-only mount (tests may run as root,
    where chmod would not stop them)."""
    root = str(root.resolve())

    def inside(p) -> bool:
        q = os.path.abspath(os.fsdecode(p))
        return q == root or q.startswith(root + os.sep)

    def deny(p):
        raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(p))

    real_os_open, real_open, real_mkdir = os.open, io.open, os.mkdir

    def os_open(p, flags, *a, **k):
        if inside(p) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            deny(p)
        return real_os_open(p, flags, *a, **k)

    def py_open(p, mode="r", *a, **k):
        if isinstance(p, (str, bytes, os.PathLike)) and inside(p) and any(c in mode for c in "wax+"):
            deny(p)
        return real_open(p, mode, *a, **k)

    def mkdir(p, *a, **k):
        if inside(p) and not os.path.exists(p):
            deny(p)
        return real_mkdir(p, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", py_open)
    monkeypatch.setattr("builtins.open", py_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    yield
    monkeypatch.undo()


# ---------------------------------------------------------------------------------------------
# 1-3. Damaged inputs: named, with the cell, before any value is used.


def test_1_non_utf8_gene_names(env, tmp_path, capsys):
    import h5py

    path = write_h5ad(tmp_path / "latin.h5ad", counts())
    with h5py.File(path, "r+") as f:
        names = [g.encode() for g in GENES]
        names[7] = b"Z\xfcrich-\xff"  # Latin-1 bytes, not UTF-8
        del f["var/_index"]
        f["var"].create_dataset("_index", data=np.array(names, dtype=object), dtype=h5py.special_dtype(vlen=bytes))
    out = tmp_path / "out"
    one_sentence(*fails(tokenize_args(env, path, out), capsys), "latin.h5ad: /var/_index", "not UTF-8",
                 "entry 7")
    assert listing(tmp_path) == ["latin.h5ad"]
    run(tokenize_args(env, env / "good.h5ad", out))


def _plant_index_past_genes(fmt: str, tmp_path: Path) -> tuple[Path, str]:
    """An input of `fmt` whose cell 17 stores a value at gene 33 of 30; the expected words."""
    import h5py

    dense = counts()
    writer, name = WRITERS[fmt]
    if fmt == "mtx":
        return write_mtx(tmp_path / name, dense, extra_entry="34 18 5"), "is at gene 34, cell 18, outside the 30 genes"
    if fmt == "loom":  # more matrix rows (genes) than gene names
        path = write_loom(tmp_path / name, np.hstack([dense, dense[:, :3]]))
        with h5py.File(path, "r+") as f:
            del f["row_attrs/Gene"]
            f["row_attrs/Gene"] = np.array([g.encode() for g in GENES])
        return path, "lists 30 genes for a matrix of 120 cells x 33 genes"
    path = writer(tmp_path / name, dense)
    group = "X" if fmt == "h5ad" else "matrix"
    with h5py.File(path, "r+") as f:
        indptr = f[f"{group}/indptr"][:]
        f[f"{group}/indices"][indptr[17]] = 33
    return path, "is damaged at cell 17: column index 33 is outside the 30 genes"


@pytest.mark.parametrize("fmt", ["h5ad", "10x", "mtx", "loom"])
def test_2_gene_index_past_the_gene_list(env, tmp_path, capsys, fmt):
    path, words = _plant_index_past_genes(fmt, tmp_path)
    out = tmp_path / "out"
    one_sentence(*fails(tokenize_args(env, path, out), capsys), str(path.name), words)
    assert not out.exists() and not (tmp_path / ".out.lock").exists()
    # The same input in good order goes through, without flags.
    good = WRITERS[fmt][0](tmp_path / ("good" + path.suffix if fmt != "mtx" else "good_mtx"), counts())
    run(tokenize_args(env, good, out))
    assert (out / "manifest.json").is_file()


def test_3_decreasing_indptr(env, tmp_path, capsys):
    import h5py

    path = write_h5ad(tmp_path / "x.h5ad", counts())
    with h5py.File(path, "r+") as f:
        indptr = f["X/indptr"][:]
        f["X/indptr"][6] = indptr[5] - 1
    err = one_sentence(*fails(tokenize_args(env, path, tmp_path / "out"), capsys), "x.h5ad is damaged at cell 5",
                       f"decreases from {indptr[5]} to {indptr[5] - 1}")
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    # medians reads the same way
    one_sentence(*fails(["medians", path, "--out", tmp_path / "m.json", "--quiet"], capsys), "cell 5")
    assert listing(tmp_path) == ["x.h5ad"]


# ---------------------------------------------------------------------------------------------
# 4. Unusable medians are refused, not silently dropped.


def test_4_unusable_medians(env, tmp_path, capsys):
    bad = dict(MEDIANS)
    bad[GENES[0]], bad[GENES[1]], bad[GENES[2]] = -1.0, 0.0, float("nan")
    (tmp_path / "m.json").write_text(json.dumps(bad))
    args = tokenize_args(env, env / "good.h5ad", tmp_path / "out")
    args[args.index(env / "medians.json")] = tmp_path / "m.json"
    one_sentence(*fails(args, capsys), "m.json gives 3 of 30 genes a zero, negative or missing median",
                 f"{GENES[0]!r}: -1.0", "cellrank medians")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# 5. Read-only and full disks: one sentence naming the output, nothing half-written.


def test_5_read_only_disk(env, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    commands = {
        "tokenize": tokenize_args(env, env / "good.h5ad", ro / "shards"),
        "medians": ["medians", env / "good.h5ad", "--out", ro / "medians.json", "--quiet"],
        "predict": ["predict", env / "model", env / "good.h5ad", "--out", ro / "p.h5ad", "--quiet", "--device", "cpu"],
        "demo": ["demo", "--out", ro / "demo", "--quick", "--quiet"],
    }
    for name, args in commands.items():
        with read_only(monkeypatch, ro):
            code, err = fails(args, capsys)
        target = args[args.index("--out") + 1]
        one_sentence(code, err, f"{target}: the file system is read-only (read-only file system)",
                     "choose an output location you can write to")
        assert listing(ro) == [], name
    run(commands["medians"])  # writable again: no flag needed
    assert listing(ro) == ["medians.json"]


def test_5_full_disk_tokenize_and_predict(env, tmp_path):
    """RLIMIT_FSIZE makes writes past 16 KiB fail (EFBIG), as on a full disk, in Rust, h5py and Python."""
    big = write_h5ad(tmp_path / "big.h5ad", counts(4000, seed=1))
    out = tmp_path / "out"
    args = tokenize_args(env, big, out, "--part-cells", "1000")
    proc = cellrank_subprocess(args, limit_file_bytes=16 << 10)
    one_sentence(proc.returncode, proc.stderr, str(out), "the file grew past the size", "ulimit -f")
    assert listing(tmp_path) == ["big.h5ad"]  # no part, vocabulary or medians under a final name
    pred = tmp_path / "p.h5ad"
    proc = cellrank_subprocess(["predict", env / "model", big, "--out", pred, "--quiet", "--device", "cpu"],
                               limit_file_bytes=16 << 10)
    one_sentence(proc.returncode, proc.stderr, str(pred), "ulimit -f")
    assert listing(tmp_path) == ["big.h5ad"]
    run(args)  # room again: the same command, no flag
    assert len(list(out.glob("part-*.parquet"))) == 4


def test_5_full_disk_python_write_names_the_output(env, tmp_path, capsys, monkeypatch):
    """A write to an open file fails without a file name (ENOSPC); the sentence names the output."""
    real = Path.write_text

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "medians.json"
    code, err = fails(["medians", env / "good.h5ad", "--out", out, "--quiet"], capsys)
    monkeypatch.setattr(Path, "write_text", real)
    one_sentence(code, err, f"{out}: the disk is full (no space left on device); free some space")
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 6-8. Dead ends: a file as --out, pretrain killed before its first checkpoint, stale temporaries.


def test_6_demo_out_is_a_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    one_sentence(*fails(["demo", "--out", tmp_path / "notes.txt", "--quick"], capsys),
                 "notes.txt is a file, not a directory")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_7_pretrain_killed_before_its_first_checkpoint(env, tmp_path, capsys):
    out = tmp_path / "pre"
    args = ["pretrain", env / "shards", "--out", out, "--max-steps", "3", "--tokens-per-batch", "512",
            "--device", "cpu", "--quiet", "--checkpoint-every", "1000"]
    # Killed right after the first metrics line (the validation at the start), before any checkpoint.
    proc = cellrank_subprocess(args, before=killed_after("cellrank_fm.train", "_append_metrics", 1))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert listing(out) == ["metrics.jsonl"] and (tmp_path / ".pre.lock").exists()  # the killed run's lock
    shutil.copytree(out, tmp_path / "pre2")
    # --resume starts from scratch with a note; so does a plain rerun (only the log was there).
    run([*args, "--resume"])
    assert "holds no checkpoint to resume, only the log of a run stopped" in capsys.readouterr().err
    run([*args[:3], tmp_path / "pre2", *args[4:]])
    assert "holds no checkpoint, only the log" in capsys.readouterr().err
    for d in (out, tmp_path / "pre2"):
        assert {"model.safetensors", "trainer_state.pt", "config.json"} <= set(listing(d))
        steps = [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert steps == [0, 3, 3]  # one run's log: start, last train step, end
    assert not (tmp_path / ".pre.lock").exists()
    # A finished model is never replaced by accident; --overwrite replaces it.
    one_sentence(*fails(args, capsys), "already holds a model", "--overwrite")
    run([*args, "--overwrite"])


def test_8_predict_sweeps_stale_temporaries(env, tmp_path):
    stale = tmp_path / ".p.h5ad.tmp-0123abcd"
    stale.write_bytes(b"half a file from a killed run")
    (tmp_path / ".p.h5ad.tmp-notours").write_text("not a cellrank temporary name")
    run(["predict", env / "model", env / "good.h5ad", "--out", tmp_path / "p.h5ad", "--quiet", "--device", "cpu"])
    assert listing(tmp_path) == [".p.h5ad.tmp-notours", "p.h5ad"]


def test_7_overwrite_wherever_a_directory_is_written(env, tmp_path, capsys):
    """Commands that write a directory refuse one that holds files, and replace it with --overwrite."""
    commands = {
        "explain": ["explain", env / "model", env / "good.h5ad", "--method", "gradient", "--per-class", "1",
                    "--samples", "2", "--device", "cpu", "--quiet"],
        "baseline": ["baseline", env / "shards", "--label", "group", "--n-top-genes", "20"],
        "finetune": ["finetune", env / "shards", "--label", "group", "--preset", "tiny", "--epochs", "0.5",
                     "--device", "cpu", "--quiet"],
    }
    for name, args in commands.items():
        out = tmp_path / name
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
        one_sentence(*fails([*args, "--out", out], capsys), f"{out} already exists and is not empty",
                     "--overwrite")
        assert listing(out) == ["mine.txt"]
        run([*args, "--out", out, "--overwrite"])
        capsys.readouterr()
        assert "mine.txt" not in listing(out) and len(listing(out)) > 1, name
    assert listing(tmp_path) == sorted(commands)


# ---------------------------------------------------------------------------------------------
# 9-11. Damaged artefacts and options that cannot be met.


def test_9_damaged_parts_weights_and_json(env, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(env / "shards", shards)
    part = shards / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    for args in (["pretrain", shards, "--out", tmp_path / "pre", "--device", "cpu", "--quiet"],
                 ["finetune", shards, "--label", "group", "--preset", "tiny", "--out", tmp_path / "ft", "--quiet"]):
        one_sentence(*fails(args, capsys), f"{part} is damaged or incomplete", "cellrank tokenize")
    model = tmp_path / "model"
    shutil.copytree(env / "model", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    predict = ["predict", model, env / "good.h5ad", "--out", tmp_path / "p.h5ad", "--quiet", "--device", "cpu"]
    one_sentence(*fails(predict, capsys), f"{weights} is damaged or incomplete", "train it again")
    shutil.copy(env / "model" / "model.safetensors", weights)
    (model / "vocabulary.json").write_text('{"ENSG0000000')
    one_sentence(*fails(predict, capsys), "vocabulary.json is damaged or incomplete")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "shards"]


def test_10_model_input_size_zero(env, tmp_path, capsys):
    one_sentence(*fails(tokenize_args(env, env / "good.h5ad", tmp_path / "o", "--model-input-size", "0"), capsys),
                 "--model-input-size must be at least 1")
    assert listing(tmp_path) == []


def test_11_device_that_is_not_there(env, tmp_path, capsys):
    import torch

    args = ["pretrain", env / "shards", "--out", tmp_path / "pre", "--max-steps", "1", "--quiet"]
    one_sentence(*fails([*args, "--device", "gpu"], capsys), "--device 'gpu' is not a device")
    if not torch.cuda.is_available():
        one_sentence(*fails([*args, "--device", "cuda"], capsys), "asks for a GPU but PyTorch sees none")
        one_sentence(*fails(["predict", env / "model", env / "good.h5ad", "--out", tmp_path / "p.h5ad",
                             "--device", "cuda"], capsys), "--device cpu")
    else:
        n = torch.cuda.device_count()
        one_sentence(*fails([*args, "--device", f"cuda:{n}"], capsys), f"asks for GPU {n}")
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 12-13. One writer per output; a failed run leaves the output as it found it.


def test_12_second_writer_is_refused_and_stale_locks_taken_over(env, tmp_path, capsys):
    from cellrank_fm.outputs import OutputLock, lock_path

    out = tmp_path / "shards"
    held = OutputLock(out).acquire()  # another run, alive
    try:
        one_sentence(*fails(tokenize_args(env, env / "good.h5ad", out, "--resume"), capsys),
                     f"{out} is being written by another cellrank run (process {os.getpid()}")
        one_sentence(*fails(["pretrain", env / "shards", "--out", out, "--quiet"], capsys), f"process {os.getpid()}")
    finally:
        held.release()
    assert listing(tmp_path) == []
    # A lock left by a process that is gone (kill -9) is taken over.
    lock_path(out).write_text(json.dumps({"pid": 2**22 + 17, "host": os.uname().nodename}))
    run(tokenize_args(env, env / "good.h5ad", out, "--resume"))
    assert listing(tmp_path) == ["shards"]


def test_12_two_processes_one_output(env, tmp_path):
    """Two real runs started together on one output: exactly one writes, the other says who does."""
    out = tmp_path / "pre"
    args = ["pretrain", env / "shards", "--out", out, "--max-steps", "2", "--tokens-per-batch", "512",
            "--device", "cpu", "--quiet"]
    code = f"from cellrank_fm.cli import main\nmain({[str(a) for a in args]!r})"
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env_vars)
             for _ in range(2)]
    results = sorted((p.wait(timeout=600), p.stderr.read()) for p in procs)
    assert [rc for rc, _ in results] == [0, 2], results
    one_sentence(*results[1], "is being written by another cellrank run (process")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 2]  # one run's log, not two interleaved


def test_13_failed_run_leaves_the_output_as_found(env, tmp_path, capsys):
    dense = counts(400)
    dense[350, 4] = -3  # found in the fourth part, after three were published
    bad = write_h5ad(tmp_path / "bad.h5ad", dense)
    out = tmp_path / "out"
    out.mkdir()  # an empty directory stays an empty directory
    one_sentence(*fails(tokenize_args(env, bad, out, "--part-cells", "100"), capsys), "cell 350")
    assert listing(out) == [] and listing(tmp_path) == ["bad.h5ad", "out"]
    dense[350, 4] = 3
    write_h5ad(bad, dense)
    run(tokenize_args(env, bad, out, "--part-cells", "100"))
    assert listing(out) == ["manifest.json", "medians.json", "part-00000.parquet", "part-00001.parquet",
                            "part-00002.parquet", "part-00003.parquet", "symbols.json", "vocabulary.json"]


# ---------------------------------------------------------------------------------------------
# Kill -9 and resume: tokenize and finetune end exactly as an uninterrupted run.


def test_tokenize_killed_resumes_to_the_same_shards(env, tmp_path):
    import polars as pl

    inp = write_h5ad(tmp_path / "x.h5ad", counts(3000, seed=2))
    out = tmp_path / "out"
    args = tokenize_args(env, inp, out, "--part-cells", "500", "--chunk-cells", "250", "--keep-obs", "group")
    proc = cellrank_subprocess(args, before=killed_after("cellrank_fm.tokenize", "run_core", 7))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Seven chunks of 250 cells fill three parts of 500; the writer thread finishes them in the
    # background, so how many were on disk at the kill depends on timing, never more than three.
    assert not (out / "manifest.json").exists() and len(list(out.glob("part-*.parquet"))) <= 3
    run([*args, "--resume"])  # takes over the dead run's lock, keeps the finished parts
    run(tokenize_args(env, inp, tmp_path / "whole", "--part-cells", "500", "--chunk-cells", "250",
                      "--keep-obs", "group"))
    for part in sorted(p.name for p in (tmp_path / "whole").glob("part-*.parquet")):
        assert pl.read_parquet(out / part).equals(pl.read_parquet(tmp_path / "whole" / part)), part
    assert listing(tmp_path) == ["out", "whole", "x.h5ad"]


def test_pretrain_killed_between_model_files_and_state_resumes_to_the_same_weights(env, tmp_path):
    from safetensors.torch import load_file

    args = ["pretrain", env / "shards", "--max-steps", "6", "--checkpoint-every", "2", "--tokens-per-batch", "512",
            "--lr", "3e-3", "--device", "cpu", "--quiet"]
    out = tmp_path / "pre"
    # Killed once the step-4 model files are written but before its trainer_state.pt: the
    # directory's weights are a checkpoint newer than its training state.
    proc = cellrank_subprocess([*args, "--out", out],
                               before=killed_after("cellrank_fm.pretrain", "MaskedGeneTask.save", 2))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run([*args, "--out", out, "--resume"])
    run([*args, "--out", tmp_path / "whole"])
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert np.allclose(a[k].numpy(), b[k].numpy(), rtol=0, atol=1e-6), k
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]


def test_finetune_killed_resumes_to_the_same_model(env, tmp_path, capsys):
    from safetensors.torch import load_file

    args = ["finetune", env / "shards", "--label", "group", "--preset", "tiny", "--epochs", "6", "--lr", "5e-3",
            "--evals-per-epoch", "2", "--patience", "0", "--tokens-per-batch", "512", "--device", "cpu", "--quiet"]
    out = tmp_path / "ft"
    # Killed after its third checkpoint (an evaluation), mid-training.
    proc = cellrank_subprocess([*args, "--out", out],
                               before=killed_after("cellrank_fm.finetune", "CellClassificationTask.save", 3))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    work = tmp_path / ".ft.partial"
    assert not out.exists() and (work / "training" / "trainer_state.pt").is_file()
    # Without --resume a rerun would start again; with it, the run continues to the end.
    run([*args, "--out", out, "--resume"])
    run([*args, "--out", tmp_path / "whole"])
    assert not work.exists() and listing(tmp_path) == ["ft", "whole"]
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert np.allclose(a[k].numpy(), b[k].numpy(), rtol=0, atol=1e-6), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "whole"))
    assert ma["validation_history"] == mb["validation_history"] and ma["macro_f1"] == mb["macro_f1"]
    f1 = [h["macro_f1"] for h in ma["validation_history"]]
    assert max(f1[3:]) > max(f1[:3])  # the best weights came after the kill: they were resumed, not kept
    assert listing(out / "training") == ["metrics.jsonl"]
