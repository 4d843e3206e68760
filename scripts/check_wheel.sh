#!/usr/bin/env bash
# The install of a user without Rust, proved: a cellrank wheel FILE goes into a fresh virtual
# environment while no Rust toolchain is in reach, then `cellrank --version`, the Rust core and
# `cellrank demo --quick` run from that environment.
#
#   scripts/check_wheel.sh [--out DIR] [--build-only] [--core-only] [--wheelhouse DIR] [--reuse-deps] [WHEEL]
#
# Without WHEEL, first builds the Linux manylinux2014 abi3 wheel into DIR (default dist/):
# maturin links through zig against glibc 2.17 symbol versions, where a plain build on this
# machine would need the build machine's glibc. Needs `maturin` and `ziglang` (the `test`
# extra). CARGO_TARGET_DIR, if set, is where cargo keeps that build (reuse it across runs).
#
# The check fails if pip builds or prepares anything from source, or if anything runs cargo,
# rustc or rustup. Dependencies come from the package index (or pip's cache). --core-only
# installs the wheel without its dependencies (plus numpy and typer) and skips the demo: for a
# platform where torch has no wheel. --wheelhouse DIR (or CELLRANK_WHEELHOUSE) keeps the
# dependencies' wheels in DIR between runs and installs from there without the index
# (topping DIR up from the index only when it lacks something). --reuse-deps fetches nothing: the
# fresh environment borrows the dependencies installed for PYTHON (its site-packages, read-only,
# after the environment's own), pip resolves every requirement against them offline and installs
# only the wheel; for machines without room for a second copy of torch (the test suite uses it).
# Runs on Linux, macOS and Windows (Git Bash).
# PYTHON picks the interpreter of the fresh environment (default python3); KEEP_WORK=1 keeps
# the scratch directory (the environment is a few GB, mostly torch, unless --reuse-deps).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out="$repo/dist"
build_only=0
core_only=0
reuse_deps=0
wheelhouse=${CELLRANK_WHEELHOUSE:-}
wheel=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --build-only) build_only=1; shift ;;
    --core-only) core_only=1; shift ;;
    --wheelhouse) wheelhouse=$2; shift 2 ;;
    --reuse-deps) reuse_deps=1; shift ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "check_wheel: unknown option $1" >&2; exit 2 ;;
    *) wheel=$1; shift ;;
  esac
done
python=${PYTHON:-python3}
say() { printf 'check_wheel: %s\n' "$*"; }
die() { printf 'check_wheel: FAILED: %s\n' "$*" >&2; exit 1; }
# Wall-clock seconds; bash 5 has them built in, the bash 3 of macOS asks Python.
now() { if [[ -n ${EPOCHREALTIME:-} ]]; then echo "${EPOCHREALTIME/,/.}"; else "$python" -c 'import time; print(time.time())'; fi; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# CPU seconds (user + system) of every finished child so far, into $cpu: on a shared machine the
# wall clock says more about the neighbours than about cellrank. `times` must run in this shell.
cpu_now() {
  times > "$cpu_file"
  cpu=$(awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%.1f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$cpu_file")
}
cpu_since() { awk -v a="$1" -v b="$cpu" 'BEGIN { printf "%.1f", b - a }'; }  # after cpu_now
cpu_file=$(mktemp)
trap 'rm -f "$cpu_file"' EXIT

# ---------------------------------------------------------------------------------- build
if [[ -z $wheel ]]; then
  [[ $(uname -s) == Linux ]] || die "the manylinux build runs on Linux; elsewhere pass a built wheel"
  command -v maturin >/dev/null || die "maturin not found: pip install 'maturin[zig]' (the test extra has it)"
  staging=$(mktemp -d)
  started=$(now)
  cpu_now; started_cpu=$cpu
  # --locked: the wheel is built from Cargo.lock exactly as committed.
  (cd "$repo" && maturin build --release --locked --zig --compatibility manylinux2014 --out "$staging") \
    || die "maturin build failed"
  built=("$staging"/cellrank_fm-*.whl)
  [[ ${#built[@]} -eq 1 && -f ${built[0]} ]] || die "expected one wheel from maturin, got: ${built[*]}"
  mkdir -p "$out"
  wheel="$out/$(basename "${built[0]}")"
  mv -f "${built[0]}" "$wheel"
  rmdir "$staging"
  cpu_now
  say "built $wheel in $(since "$started") s ($(cpu_since "$started_cpu") s of CPU)"
fi
[[ -f $wheel ]] || die "no such file: $wheel"
wheel=$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")
if [[ $build_only -eq 1 ]]; then
  echo "$wheel"
  exit 0
fi
# The version the wheel's file name promises (distribution-version-tags.whl).
name=$(basename "$wheel")
version=${name#*-}
version=${version%%-*}

# ------------------------------------------------------- a machine without Rust, as far as pip sees
work=$(mktemp -d "${TMPDIR:-/tmp}/check_wheel.XXXXXX")
if [[ ${KEEP_WORK:-0} != 1 ]]; then
  trap 'rm -rf "$work" "$cpu_file"' EXIT
fi
mkdir -p "$work/tripwire" "$work/empty-cargo-home" "$work/empty-rustup-home" "$work/run"
# cargo, rustc and rustup, should anything look for them, are tripwires that log the call and fail.
# (They are shell scripts, so on Windows only the PATH filter below hides Rust.)
for tool in cargo rustc rustup; do
  printf '#!/bin/sh\necho "%s $*" >> "%s"\necho "check_wheel: %s called on a machine that has no Rust" >&2\nexit 127\n' \
    "$tool" "$work/rust-called" "$tool" > "$work/tripwire/$tool"
  chmod +x "$work/tripwire/$tool"
done
# PATH without any directory that holds a real cargo, rustc or rustup.
path="$work/tripwire"
IFS=: read -ra dirs <<< "$PATH"
for dir in "${dirs[@]}"; do
  [[ -n $dir && ! -e $dir/cargo && ! -e $dir/rustc && ! -e $dir/rustup ]] && path+=":$dir"
done
norust=(env -u RUSTC -u CARGO -u RUSTFLAGS -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET -u PYTHONPATH
  -u VIRTUAL_ENV PATH="$path" CARGO_HOME="$work/empty-cargo-home" RUSTUP_HOME="$work/empty-rustup-home"
  PIP_ONLY_BINARY=:all: PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off)
for tool in cargo rustc rustup; do
  found=$("${norust[@]}" bash -c "command -v $tool")
  [[ $found == "$work/tripwire/$tool" ]] || die "$tool is still reachable without Rust: $found"
done

# -------------------------------------------------------------------- a fresh environment
"$python" -m venv "$work/venv" || die "could not create a virtual environment with $python"
grep -q '^include-system-site-packages = false' "$work/venv/pyvenv.cfg" \
  || die "the environment must not see the system's site-packages"
bin="$work/venv/bin"
[[ -d $bin ]] || bin="$work/venv/Scripts"  # Windows
venv_python="$bin/python"
pyversion=$("$venv_python" -c 'import platform; print(platform.python_version())')

# ------------------------------------------------------------------- pip install WHEEL_FILE
# --only-binary covers the dependencies; a local source archive is built regardless, which the
# tripwires and the log check below catch.
pip=("${norust[@]}" "$venv_python" -m pip)
pip_run() {  # pip ARGS..., in the scratch directory, logged; quiet=1: no log tail on failure
  (cd "$work/run" && "${pip[@]}" "$@") >> "$work/pip.log" 2>&1 && return 0
  [[ ${quiet:-0} == 1 ]] || tail -n 30 "$work/pip.log" >&2
  return 1
}
if [[ $core_only -eq 1 ]]; then
  wheel_args=(--no-deps "$wheel")
  deps=(numpy typer)
else
  wheel_args=("$wheel")
  deps=()
fi
install_all() {  # the wheel (and deps) with the pip options given
  pip_run install --only-binary :all: "$@" "${wheel_args[@]}" || return 1
  [[ ${#deps[@]} -eq 0 ]] || pip_run install --only-binary :all: "$@" "${deps[@]}"
}
no_source_builds() {  # dies if pip built or prepared anything from source, whatever else happened
  if grep -E "Building wheel for|Preparing metadata \(pyproject|Running setup\.py|Installing build dependencies" \
      "$work/pip.log" >&2; then
    die "pip built or prepared a package from source (lines above)"
  fi
}
from_index="the index"
if [[ $reuse_deps -eq 1 ]]; then
  # The borrowed site-packages go after the environment's own, so the wheel installed here wins;
  # the environment's own old setuptools would shadow the newer one torch requires.
  site=$("$venv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$python" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' \
    | sort -u > "$site/zz-borrowed-dependencies.pth" || die "could not ask $python for its site-packages"
  pip_run uninstall -y setuptools || die "could not remove the fresh environment's setuptools"
  from_index="$python's environment (borrowed, nothing fetched)"
  started=$(now)
  cpu_now; started_cpu=$cpu
  install_all --no-index || { no_source_builds; die "pip install $name failed (--reuse-deps: every dependency must already be installed for $python)"; }
  pip_run check || die "pip check found broken requirements in the borrowed dependencies"
elif [[ -n $wheelhouse ]]; then
  # Install offline from the wheelhouse: pip's own cache keeps nothing when the index's answers
  # carry no caching headers, and a few GB of torch should not be fetched on every run. When it
  # lacks something (the first run, a new dependency), top it up from the index (files it holds
  # are not fetched again) and install again. Delete it to move to newer dependencies.
  mkdir -p "$wheelhouse"
  offline=(--no-index --find-links "$wheelhouse")
  from_index="the wheelhouse"
  started=$(now)
  cpu_now; started_cpu=$cpu
  if ! quiet=1 install_all "${offline[@]}"; then
    topped=$(now)
    pip_run download --only-binary :all: --dest "$wheelhouse" "${wheel_args[@]}" ${deps[@]+"${deps[@]}"} \
      || die "pip download into $wheelhouse failed"
    rm -f "$wheelhouse"/cellrank_fm-*.whl  # only dependencies are kept
    from_index="the wheelhouse, topped up from the index in $(since "$topped") s"
    started=$(now)
    cpu_now; started_cpu=$cpu
    install_all "${offline[@]}" || die "pip install $name failed"
  fi
else
  started=$(now)
  cpu_now; started_cpu=$cpu
  install_all || die "pip install $name failed"
fi
cpu_now
install_s="$(since "$started") s ($(cpu_since "$started_cpu") s of CPU)"
no_source_builds
# pip itself runs `rustc --version` for its User-Agent header; any other call means a build.
rust_calls() { [[ -e $work/rust-called ]] && grep -vx 'rustc --version' "$work/rust-called"; }
if rust_calls >&2; then die "the Rust toolchain was called during the install (calls above)"; fi

# ---------------------------------------------------------------------- run it as a user would
cellrank="$bin/cellrank"
[[ -x $cellrank ]] || die "the wheel installed no cellrank command"
reported=$(cd "$work/run" && "${norust[@]}" "$cellrank" --version) || die "cellrank --version failed"
[[ $reported == "cellrank $version" ]] || die "cellrank --version says '$reported', the wheel is $version"

# The compiled core must come from the environment, and rank as documented: values 5, 1, 3 of
# tokens 10, 11, 12 (equal medians) give tokens 10, 12, 11.
(cd "$work/run" && "${norust[@]}" "$venv_python" - "$work/venv" "$version") <<'PYTHON' || die "the installed package is wrong (above)"
import sys
from pathlib import Path

import numpy as np

import cellrank_fm
from cellrank_fm import _core

venv, version = Path(sys.argv[1]).resolve(), sys.argv[2]
for module in (cellrank_fm, _core):
    where = Path(module.__file__).resolve()
    assert venv in where.parents, f"{module.__name__} imported from {where}, not from the fresh environment"
assert cellrank_fm.__version__ == version, (cellrank_fm.__version__, version)
tokens, offsets, nonint = _core.tokenize_csr(
    np.array([0, 3], np.int64), np.array([0, 1, 2], np.int64), np.array([5.0, 1.0, 3.0]), None,
    np.array([10, 11, 12], np.int64), np.ones(3), 16)
assert tokens.tolist() == [10, 12, 11] and offsets.tolist() == [0, 3] and nonint == 0, (tokens, offsets, nonint)
print(f"core: {Path(_core.__file__).name} ranks as documented")
PYTHON

demo="skipped (--core-only)"
if [[ $core_only -eq 0 ]]; then
  started=$(now)
  cpu_now; started_cpu=$cpu
  (cd "$work/run" && "${norust[@]}" "$cellrank" demo --quick --quiet --out "$work/demo") > "$work/demo.log" 2>&1 \
    || { tail -n 30 "$work/demo.log" >&2; die "cellrank demo --quick failed"; }
  cpu_now
  demo="$(since "$started") s ($(cpu_since "$started_cpu") s of CPU), report.md and report.html written"
  for report in report.md report.html; do
    [[ -s $work/demo/$report ]] || die "cellrank demo --quick wrote no $report"
  done
fi
if rust_calls >&2; then die "the Rust toolchain was called (calls above)"; fi

size=$(wc -c < "$wheel" | tr -d ' ')
say "OK"
printf '  %-13s %s (%s bytes, %.2f MB)\n' wheel "$name" "$size" "$(awk -v s="$size" 'BEGIN { print s / 1e6 }')"
printf '  %-13s %s\n' python "$pyversion, fresh venv without system site-packages" \
  rust "hidden: cargo, rustc, rustup off PATH (no build call reached the tripwires); CARGO_HOME, RUSTUP_HOME empty" \
  install "$install_s (pip install --only-binary :all: $([[ $core_only -eq 1 ]] && echo '--no-deps ')WHEEL_FILE; dependencies from $from_index)" \
  version "$reported" \
  "demo --quick" "$demo"
