"""Packaging: one version everywhere, the release workflow, the sdist, and the manylinux wheel
installed where no Rust toolchain is in reach (scripts/check_wheel.sh).

The `wheel`-marked tests build the Linux wheel once per session (maturin with zig: minutes from
cold) and install it into a fresh virtual environment. They run by default, in CI too. That
environment borrows the test environment's dependencies (check_wheel.sh --reuse-deps): pip
resolves them offline and installs only the wheel, where fetching a second copy of torch and its
CUDA libraries would need about 10 GB more disk than a CI machine has. The release workflow runs
the check with dependencies from the index. cargo's target directory for the zig build is kept
under ~/.cache/cellrank-fm (CELLRANK_WHEEL_TARGET moves it). CELLRANK_WHEEL=path/to.whl checks a
wheel built elsewhere instead of building one.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: maturin, in the test extra, brings tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "release.yml"
CHECK_WHEEL = REPO / "scripts" / "check_wheel.sh"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cellrank-fm"
# The five platforms the release builds, by the names the workflow gives them.
PLATFORMS = {"linux-x86_64", "linux-aarch64", "macos-x86_64", "macos-arm64", "windows-x86_64"}

LINUX_X86_64 = sys.platform == "linux" and platform.machine() == "x86_64"


def cargo_version() -> str:
    return tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]


def tool(name: str) -> str:
    """A command from this environment's bin directory (the test extra), else from PATH."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if found is None:
        pytest.fail(f"{name} not found: install the test extra (pip install -e '.[test]')")
    return found


def tool_env() -> dict[str, str]:
    """The environment with this interpreter's bin directory first (maturin, zig, auditwheel)."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


# ----------------------------------------------------------------------------- version


def test_version_has_one_source(capsys):
    from cellrank_fm import __version__
    from cellrank_fm.cli import main

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in pyproject and "version" in pyproject["dynamic"], "the version lives in Cargo.toml only"
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code in (0, None)
    expected = cargo_version()
    assert installed_version("cellrank-fm") == __version__ == expected
    assert capsys.readouterr().out.strip() == f"cellrank {expected}"


# ---------------------------------------------------------------------------- workflow


def actionlint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("actionlint"), "-no-color", "-shellcheck", tool("shellcheck"), str(path)],
        capture_output=True, text=True, timeout=120,
    )


def test_release_workflow_passes_actionlint():
    run = actionlint(WORKFLOW)
    assert run.returncode == 0, run.stdout + run.stderr


def test_actionlint_catches_mistakes_in_the_workflow(tmp_path):
    # The lint above proves something only if the linter (with shellcheck) sees real mistakes.
    text = WORKFLOW.read_text()
    assert "matrix.platform.target }}" in text and 'set -euo pipefail\n          python -m venv "$RUNNER_TEMP' in text
    broken = text.replace("matrix.platform.target }}", "matrix.platform.targett }}").replace(
        'python -m venv "$RUNNER_TEMP/sdist-venv"', "python -m venv $RUNNER_TEMP/sdist-venv"
    )
    path = tmp_path / ".github" / "workflows" / "release.yml"
    path.parent.mkdir(parents=True)
    path.write_text(broken)
    run = actionlint(path)
    assert run.returncode != 0
    assert "targett" in run.stdout, run.stdout
    assert "SC2086" in run.stdout, run.stdout  # shellcheck ran on the `run:` script


def test_release_workflow_builds_tests_and_publishes_every_platform():
    import yaml

    flow = yaml.safe_load(WORKFLOW.read_text())
    triggers = flow[True]  # YAML 1.1 reads the key `on` as a boolean
    assert triggers["push"]["tags"] == ["v*"]
    jobs = flow["jobs"]

    builds = jobs["wheel"]["strategy"]["matrix"]["platform"]
    assert {b["name"] for b in builds} == PLATFORMS
    step = next(s for s in jobs["wheel"]["steps"] if s.get("uses", "").startswith("PyO3/maturin-action@"))
    assert "--release" in step["with"]["args"] and "--locked" in step["with"]["args"]
    for build in builds:
        assert build["manylinux"] == ("2014" if build["name"].startswith("linux") else "")
    assert jobs["sdist"]["steps"][1]["with"]["command"] == "sdist"

    tests = jobs["test"]["strategy"]["matrix"]["platform"]
    assert {t["name"] for t in tests} == PLATFORMS
    assert {t["python"] for t in tests if t["name"] == "linux-x86_64"} >= {"3.10"}, "test at the abi3 floor"
    # Only the Intel Mac, where torch has no wheel, skips the demo.
    assert [t["name"] for t in tests if t["scope"]] == ["macos-x86_64"]
    assert "scripts/check_wheel.sh" in jobs["test"]["steps"][-1]["run"]

    publish = jobs["publish"]
    assert set(publish["needs"]) == {"wheel", "sdist", "test"}
    assert "refs/tags/v" in publish["if"]
    assert publish["permissions"] == {"id-token": "write"}
    uses = [s for s in publish["steps"] if s.get("uses", "").startswith("pypa/gh-action-pypi-publish@")]
    assert len(uses) == 1 and "password" not in uses[0].get("with", {}), "trusted publishing: no token"


@pytest.mark.parametrize("script", ["check_wheel.sh", "check_targets.sh"])
def test_scripts_pass_shellcheck(script):
    run = subprocess.run([tool("shellcheck"), str(REPO / "scripts" / script)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.slow
def test_rust_core_compiles_for_the_other_release_targets():
    """cargo check for macOS / Windows / Linux aarch64 (those whose std is installed; zig as the C compiler)."""
    installed = subprocess.run(["rustup", "target", "list", "--installed"], capture_output=True, text=True)
    others = {"x86_64-apple-darwin", "aarch64-apple-darwin", "x86_64-pc-windows-gnu", "aarch64-unknown-linux-gnu"}
    if installed.returncode != 0 or not others & set(installed.stdout.split()):
        pytest.skip("no other target's standard library installed (rustup target add x86_64-apple-darwin ...)")
    env = dict(tool_env(), PYTHON=sys.executable)
    run = subprocess.run(["bash", str(REPO / "scripts" / "check_targets.sh")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=3000)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


# ------------------------------------------------------------------------------- sdist


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    run = subprocess.run([tool("maturin"), "sdist", "--out", str(out)], cwd=REPO, env=tool_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    (path,) = out.glob("cellrank_fm-*.tar.gz")
    return path


def test_sdist_carries_the_sources_and_nothing_else(sdist):
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert sdist.name == f"cellrank_fm-{cargo_version()}.tar.gz"
    assert {"Cargo.toml", "Cargo.lock", "pyproject.toml", "README.md", "rust/lib.rs",
            "python/cellrank_fm/_core.pyi", "python/cellrank_fm/py.typed", "python/cellrank_fm/cli/app.py"} <= names
    assert {n.split("/")[0] for n in names} == {"Cargo.toml", "Cargo.lock", "pyproject.toml", "README.md", "LICENSE",
                                                "PKG-INFO", "rust", "python"}
    assert not [n for n in names if "__pycache__" in n or n.endswith((".so", ".pyc"))]


@pytest.mark.slow
def test_sdist_builds_and_installs_from_scratch(sdist, tmp_path):
    """pip builds the sdist in isolation (maturin from the index, a cold Rust build: minutes)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    run = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", str(sdist), "numpy"],
                         capture_output=True, text=True, timeout=3000)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Building wheel for cellrank-fm" in run.stdout
    probe = ("import numpy as np; from cellrank_fm import _core; "
             "t, o, _ = _core.tokenize_csr(np.array([0, 2]), np.array([0, 1]), np.array([1.0, 4.0]), None, "
             "np.array([7, 8]), np.ones(2), 8); print(_core.__file__, t.tolist())")
    run = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    where, tokens = run.stdout.split(" ", 1)
    assert Path(where).is_relative_to(venv) and tokens.strip() == "[8, 7]"


# ------------------------------------------------------------------------------- wheel


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The manylinux wheel: CELLRANK_WHEEL if given, else built by scripts/check_wheel.sh."""
    if os.environ.get("CELLRANK_WHEEL"):
        return Path(os.environ["CELLRANK_WHEEL"]).resolve()
    if not LINUX_X86_64:
        pytest.skip("the manylinux wheel is built on Linux x86_64 (elsewhere set CELLRANK_WHEEL)")
    tool("maturin")
    out = tmp_path_factory.mktemp("wheel")
    env = tool_env()
    env["CARGO_TARGET_DIR"] = os.environ.get("CELLRANK_WHEEL_TARGET", str(CACHE / "wheel-target"))
    run = subprocess.run(["bash", str(CHECK_WHEEL), "--build-only", "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=3000)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return Path(run.stdout.strip().splitlines()[-1])


def check_wheel(*args: str | Path) -> subprocess.CompletedProcess:
    env = tool_env()
    env["PYTHON"] = sys.executable
    return subprocess.run(["bash", str(CHECK_WHEEL), "--reuse-deps", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3000)


@pytest.mark.wheel
def test_wheel_is_manylinux2014_abi3_with_no_outside_libraries(wheel):
    if not LINUX_X86_64:
        pytest.skip("auditwheel checks Linux x86_64 wheels here")
    assert re.fullmatch(rf"cellrank_fm-{re.escape(cargo_version())}-cp310-abi3-"
                        r"manylinux2014_x86_64\.manylinux_2_17_x86_64\.whl", wheel.name), wheel.name
    # -v: without it auditwheel stops before saying whether outside libraries are needed.
    run = subprocess.run([tool("auditwheel"), "-v", "show", str(wheel)], capture_output=True, text=True, timeout=300)
    report = " ".join(run.stdout.split())
    assert run.returncode == 0, report + run.stderr[-2000:]
    assert 'is consistent with the following platform tag: "manylinux_2_17_x86_64"' in report, report
    # Only glibc's own libraries, which every manylinux policy allows; nothing to vendor.
    assert "The wheel requires no external shared libraries!" in report, report
    libraries = set(re.findall(r"(\S+\.so\.\d+) with versions", report))
    assert libraries and libraries <= {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "libgcc_s.so.1",
                                       "ld-linux-x86-64.so.2", "librt.so.1"}, libraries


@pytest.mark.wheel
def test_wheel_holds_the_package_typed_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = f"cellrank_fm-{cargo_version()}.dist-info"
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        core = next(n for n in names if re.fullmatch(r"cellrank_fm/_core\.(abi3\.so|pyd)", n))
        extension = zf.read(core)
    assert {"cellrank_fm/__init__.py", "cellrank_fm/_core.pyi", "cellrank_fm/py.typed",
            "cellrank_fm/cli/app.py"} <= names
    assert {n.split("/")[0] for n in names} == {"cellrank_fm", dist_info}, "nothing beside the package"
    assert not [n for n in names if re.search(r"(^|/)(tests|benches|target|scripts)/|__pycache__|\.pyc$", n)]
    assert f"\nVersion: {cargo_version()}\n" in metadata and "\nName: cellrank-fm\n" in metadata
    assert "\nRequires-Python: >=3.10\n" in metadata
    assert "\nLicense-Expression: Apache-2.0\n" in metadata and f"{dist_info}/licenses/LICENSE" in names
    assert re.search(r"^cellrank ?= ?cellrank_fm\.cli:main$", entry_points, re.M), entry_points
    if core.endswith(".so"):
        import io

        from elftools.elf.elffile import ELFFile

        elf = ELFFile(io.BytesIO(extension))
        assert elf.get_section_by_name(".symtab") is None, "the extension is not stripped"


@pytest.mark.wheel
def test_wheel_installs_and_runs_where_rust_is_not(wheel):
    run = check_wheel(wheel)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "check_wheel: OK" in run.stdout
    assert f"cellrank {cargo_version()}" in run.stdout
    assert "core: _core.abi3.so ranks as documented" in run.stdout
    assert re.search(r"demo --quick\s+[\d.]+ s \([\d.]+ s of CPU\), report\.md and report\.html written", run.stdout), run.stdout
    print(run.stdout)  # the timings, for `pytest -s`


@pytest.mark.wheel
def test_check_wheel_fails_when_pip_would_build_from_source(sdist):
    # A source archive handed to pip gets built even under --only-binary; the check must say no.
    run = check_wheel(sdist)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out[-4000:]
    assert "check_wheel: FAILED" in run.stderr
    assert "cargo called on a machine that has no Rust" in out or "from source" in out, out[-4000:]
