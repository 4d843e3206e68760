#!/usr/bin/env bash
# `cargo check` of the Rust core for the release's other targets, from a Linux machine: the
# platform code (page-cache advice) is behind cfg, and this proves the other branches compile.
# zig (the ziglang package, in the test extra) compiles the bundled zstd C sources for each
# target, so no cross toolchain is needed; only the target's Rust standard library
# (`rustup target add TARGET`). Targets without it are named and skipped.
#
#   scripts/check_targets.sh [TARGET...]
#
# Default targets: macOS x86_64 and arm64, Windows x86_64 (the GNU target stands in for MSVC:
# the same Rust code and cfg, and zig has its headers), Linux aarch64. Each is checked without
# features and with the PyO3 bindings (`--features python`).
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  targets=(x86_64-apple-darwin aarch64-apple-darwin x86_64-pc-windows-gnu aarch64-unknown-linux-gnu)
fi
python=${PYTHON:-python3}
"$python" -m ziglang version >/dev/null 2>&1 || { echo "check_targets: needs the ziglang package for $python" >&2; exit 2; }
installed=$(rustup target list --installed)
wrappers=$(mktemp -d)
trap 'rm -rf "$wrappers"' EXIT
checked=() skipped=()
for target in "${targets[@]}"; do
  if ! grep -qx "$target" <<< "$installed"; then
    skipped+=("$target")
    continue
  fi
  case $target in
    x86_64-apple-darwin) zig=x86_64-macos ;;
    aarch64-apple-darwin) zig=aarch64-macos ;;
    x86_64-pc-windows-gnu) zig=x86_64-windows-gnu ;;
    aarch64-unknown-linux-gnu) zig=aarch64-linux-gnu.2.17 ;;
    *) echo "check_targets: no zig target known for $target" >&2; exit 2 ;;
  esac
  # cc-rs adds its own target flags (-arch, --target=, -m64), which zig takes from -target.
  cc="$wrappers/cc-$target"
  cat > "$cc" <<WRAPPER
#!/usr/bin/env bash
args=()
while [[ \$# -gt 0 ]]; do
  case \$1 in -arch) shift 2; continue ;; --target=*|-m64) shift; continue ;; esac
  args+=("\$1"); shift
done
exec "$python" -m ziglang cc -target $zig "\${args[@]}"
WRAPPER
  printf '#!/bin/sh\nexec "%s" -m ziglang ar "$@"\n' "$python" > "$wrappers/ar"
  chmod +x "$cc" "$wrappers/ar"
  var=${target//-/_}
  for features in --no-default-features "--features python"; do
    echo "check_targets: cargo check --target $target $features"
    # shellcheck disable=SC2086  # $features is two words on purpose
    env "CC_$var=$cc" "AR_$var=$wrappers/ar" PYO3_CROSS_PYTHON_VERSION=3.10 \
      cargo check --quiet --locked --lib --target "$target" $features
  done
  checked+=("$target")
done
echo "check_targets: checked ${checked[*]:-nothing}${skipped[*]:+; skipped (no standard library installed): ${skipped[*]}}"
[[ ${#checked[@]} -gt 0 ]]
