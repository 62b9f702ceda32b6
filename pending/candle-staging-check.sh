#!/usr/bin/env bash
# The first GPU check of pending/candle-staging.patch, in two halves:
#
#   bash pending/candle-staging-check.sh build
#       here (no GPU needed): applies the patch to a scratch worktree of HEAD (/tmp/candle-staging),
#       builds tests/gpu_candle.rs and the main job there with `candle-cuda` against the link
#       stubs, as scripts/gpu-bundle --candle does, into target/xb/staging/ (git-ignored) with a
#       copy of this script;
#   run(command="bash target/xb/staging/candle-staging-check.sh run", carry=["target/xb/staging", ".gpu-bundle-train"])
#       on the lent GPU: gpu_candle whole, memcheck on the new staging test, and a six-step main
#       job whose `moe_share` line holds the staging figure to set beside HEAD's. About 3 minutes.
#       .gpu-bundle-train (scripts/gpu-bundle --candle) is carried for its font only.
set -uo pipefail
mode="${1:?build or run}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "$mode" in
  build)
    set -e
    root="$(cd "$here/.." && pwd)"
    scratch=/tmp/candle-staging
    out="$root/target/xb/staging"
    git -C "$root" worktree remove --force "$scratch" 2>/dev/null || true
    git -C "$root" worktree add -q --detach "$scratch" HEAD
    ln -sfn "$root/.toolchain" "$scratch/.toolchain"
    git -C "$scratch" apply --3way "$root/pending/candle-staging.patch"
    (cd "$scratch" && scripts/update-bindings)
    stubs="$root/target/cuda-stubs"
    (cd "$root" && scripts/cuda-link-stubs "$stubs" >/dev/null)
    mkdir -p "$out"
    pick() { # cargo's JSON messages on stdin -> the executable of target $1
      python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])
' "$1"
    }
    export CUDA_ROOT="$stubs" CUDA_COMPUTE_CAP=90 CARGO_TARGET_DIR="$root/target/candle"
    cd "$scratch"
    exe=$(scripts/with-cuda cargo test --no-default-features --features candle-cuda \
      --test gpu_candle --no-run --message-format=json | pick gpu_candle)
    strip -o "$out/gpu_candle" "$exe"
    exe=$(scripts/with-cuda cargo build --release --no-default-features --features candle-cuda \
      --example train --message-format=json | pick train)
    strip -o "$out/train" "$exe"
    gzip -6 -n -f "$out/gpu_candle" "$out/train"
    cp "$root/pending/candle-staging-check.sh" "$out/"
    echo "$(git -C "$root" rev-parse --short HEAD) + pending/candle-staging.patch" >"$out/COMMIT"
    du -sh "$out"
    ;;
  run)
    out="${OUT:-$here/out}"
    mkdir -p "$out"
    for f in "$here"/*.gz; do [[ -e "$f" ]] && gunzip -f "$f"; done
    chmod +x "$here/gpu_candle" "$here/train"
    font="$here/../../../.gpu-bundle-train/DejaVuSans.ttf"
    [[ -e "$font.gz" ]] && gunzip -kf "$font.gz"
    export REMOE_PLOT_FONT="${REMOE_PLOT_FONT:-$font}"
    if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.13'; then
      lib=$(find /usr/local/cuda*/ /opt /usr/lib -name 'libcublas.so.13' 2>/dev/null | head -1)
      [[ -n "$lib" ]] && export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    echo "built from: $(cat "$here/COMMIT")"
    REMOE_REQUIRE_GPU=1 timeout 120 "$here/gpu_candle" --test-threads 1 >"$out/staging-gpu_candle.log" 2>&1
    echo "gpu_candle rc=$? $(grep -E '^test result' "$out/staging-gpu_candle.log")"
    grep -E "FAILED|panicked" "$out/staging-gpu_candle.log" | head -5
    timeout 100 "$here/train" --no-topk --steps 6 --timing-steps 3 --check-steps 0 \
      --val-bytes 16384 --out "$out/train-staging" >"$out/staging-train.log" 2>&1
    echo "train rc=$?"
    grep -iE "share of the step" "$out/staging-train.log" | cut -c1-1500 | tail -2
    (cd "$out" && tar czf staging-train.tgz train-staging && rm -rf train-staging)
    san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    if [[ -n "$san" ]]; then
      REMOE_REQUIRE_GPU=1 timeout 60 "$san" --tool memcheck --error-exitcode 86 "$here/gpu_candle" \
        staging >"$out/staging-memcheck.log" 2>&1
      echo "memcheck rc=$? $(grep -E 'ERROR SUMMARY' "$out/staging-memcheck.log" | tail -1)"
    fi
    ;;
  *) echo "candle-staging-check.sh: build or run" >&2; exit 2 ;;
esac
