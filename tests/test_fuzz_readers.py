"""Fuzzing the readers: byte flips and truncations of small h5ad, 10x, loom and Matrix Market files.

Every mutated file must either tokenize or fail with one `error:` sentence and exit code 2:
never a traceback, a crash or a hang. The cases run in one worker process (this file run as a
script) that imports everything once and forks a child per case, so a crash inside a native
library is reported as a failed case instead of taking pytest down, and a hang is cut by an
alarm. The worker never starts the Rust core's thread pool itself: a forked child could not
use a pool whose threads stayed in the parent. Seeded: the same cases on every run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CASES = 600
SEED = 11
FORMATS = ("h5ad", "10x", "loom", "mtx")


def test_mutated_inputs_tokenize_or_fail_in_one_sentence(tmp_path):
    from test_failures import GENES, MEDIANS, VOCAB, WRITERS, counts

    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    (fixtures / "vocab.json").write_text(json.dumps(VOCAB))
    (fixtures / "medians.json").write_text(json.dumps(MEDIANS))
    dense = counts(24, seed=3)
    for fmt in FORMATS:
        writer, name = WRITERS[fmt]
        writer(fixtures / name, dense)
    assert len(GENES) == dense.shape[1]
    results_path = tmp_path / "results.json"
    started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, __file__, str(fixtures), str(CASES), str(SEED), str(results_path)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(results_path.read_text())
    assert len(results) == CASES
    bad = [r for r in results if not r["ok"]]
    outcomes = {k: sum(r["outcome"] == k for r in results) for k in ("tokenized", "one sentence")}
    print(f"\n{CASES} mutated files in {seconds:.1f} s ({cpu_seconds:.1f} s of CPU): {outcomes}")
    assert not bad, "\n\n".join(f"case {r['case']} ({r['format']}, {r['mutation']}): {r['outcome']}\n{r['stderr']}"
                                for r in bad[:5])
    # Both paths were exercised: damaged files were caught, and harmless flips (in values or
    # padding) still tokenized.
    assert outcomes["one sentence"] >= CASES // 5 and outcomes["tokenized"] >= CASES // 20


# ---------------------------------------------------------------------------------------------
# The worker (this file run as a script).


def _mutate(blob: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    kind = ("truncate", "flip", "flip-head-or-tail")[int(rng.integers(3))]
    if kind == "truncate":
        at = int(rng.integers(0, len(blob)))
        return blob[:at], f"truncated at byte {at} of {len(blob)}"
    data = bytearray(blob)
    k = int(rng.integers(1, 9))
    if kind == "flip":
        where = rng.integers(0, len(data), size=k)
    else:  # where HDF5 keeps its superblock and object headers, and text files their header
        span = min(2048, len(data))
        where = rng.integers(0, span, size=k) if rng.random() < 0.5 else len(data) - 1 - rng.integers(0, span, size=k)
    for w in where:
        data[int(w)] ^= int(rng.integers(1, 256))
    return bytes(data), f"{kind}: bytes {sorted(int(w) for w in where)}"


def _run_child(args: list[str], err_path: Path) -> None:
    """In the forked child: run `cellrank ARGS`, stderr to a file; never returns."""
    import resource
    import signal
    import traceback

    signal.alarm(30)
    # A damaged size field can make the HDF5 library allocate and fill gigabytes before it
    # reports the error (seen: 3.7 GB and a minute for a 31 KB file); with 1 GiB of address
    # space above what is mapped now, such a case fails as quickly as the others.
    with open("/proc/self/statm") as fh:
        mapped = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    code = 0
    try:
        from cellrank_fm.cli import main

        main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - exactly what the test looks for
        traceback.print_exc()
        code = 99
    sys.stderr.flush()
    os._exit(code)


def _judge(status: int, stderr: str) -> tuple[bool, str]:
    if os.WIFSIGNALED(status):
        return False, f"killed by signal {os.WTERMSIG(status)}"
    code = os.WEXITSTATUS(status)
    if "Traceback" in stderr:
        return False, f"traceback (exit {code})"
    if code == 0:
        return True, "tokenized"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    others = [ln for ln in lines if not ln.startswith(("error: ", "warning: ", "note: "))]
    if code == 2 and len(errors) == 1 and not others:
        return True, "one sentence"
    return False, f"exit {code} with {len(lines)} lines on stderr"


def worker(fixtures: Path, cases: int, seed: int, results_path: Path) -> None:
    # Everything a run imports is imported here, once, so that forked children start warm, and
    # the command line is built once (Typer rebuilds it on every call): a small run then costs
    # about 15 ms instead of 1.3 s.
    import concurrent.futures.thread  # noqa: F401
    import contextlib
    import importlib

    import h5py  # noqa: F401
    import pandas  # noqa: F401
    import typer

    import cellrank_fm._core  # noqa: F401 - importing it does not start its thread pool
    import cellrank_fm.cli
    import cellrank_fm.tokenize  # noqa: F401
    from cellrank_fm.progress import progress_bar

    with contextlib.suppress(ImportError):
        importlib.import_module("typer._adapters")  # converts parameters; imports pydantic
    with progress_bar("cells", quiet=True):
        pass
    cellrank_fm.cli.app = typer.main.get_command(cellrank_fm.cli.app)

    rng = np.random.default_rng(seed)
    work = results_path.parent / "cases"
    results = []
    for case in range(cases):
        fmt = FORMATS[case % len(FORMATS)]
        case_dir = work / f"case{case}"
        case_dir.mkdir(parents=True)
        if fmt == "mtx":
            inp = case_dir / "mtx"
            inp.mkdir()
            for f in (fixtures / "mtx").iterdir():
                (inp / f.name).write_bytes(f.read_bytes())
            target = inp / ("matrix.mtx", "matrix.mtx", "matrix.mtx", "features.tsv", "barcodes.tsv")[int(rng.integers(5))]
        else:
            name = {"h5ad": "x.h5ad", "10x": "x.h5", "loom": "x.loom"}[fmt]
            inp = target = case_dir / name
        blob, mutation = _mutate((fixtures / target.relative_to(case_dir)).read_bytes(), rng)
        target.write_bytes(blob)
        args = ["tokenize", str(inp), "--out", str(case_dir / "out"), "--vocab", str(fixtures / "vocab.json"),
                "--medians", str(fixtures / "medians.json"), "--quiet"]
        err_path = case_dir / "stderr.txt"
        pid = os.fork()
        if pid == 0:
            _run_child(args, err_path)
        _, status = os.waitpid(pid, 0)
        stderr = err_path.read_text(errors="replace") if err_path.exists() else ""
        ok, outcome = _judge(status, stderr)
        results.append({"case": case, "format": fmt, "file": target.name, "mutation": mutation, "ok": ok,
                        "outcome": outcome, "stderr": stderr[-2000:]})
        if ok:
            import shutil

            shutil.rmtree(case_dir)
    results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
