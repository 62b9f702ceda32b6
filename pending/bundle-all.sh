#!/usr/bin/env bash
# One GPU bundle for HEAD with every patch of pending/ applied, so that one session's GPU run
# (the suite on both paths, then the four sanitizers) checks all of them at once instead of one
# bundle and one suite per patch (PENDING_PATCHES names them, in pending/README.md's order;
# none today):
#
#   bash pending/bundle-all.sh        # here, no GPU needed
#   run(command="bash target/xb/pending/run-suite.sh ...", carry=["target/xb/pending"])
#
# It applies the patches in pending/README.md's order to a scratch worktree of HEAD
# (PENDING_SCRATCH, default /tmp/pending-all), checks that the bindings match the patched header,
# and runs scripts/gpu-bundle --candle there with its own target folder (PENDING_TARGET_DIR,
# default /work/pending-target), then moves the bundle to target/xb/pending/ (git-ignored,
# carried by the device tool) and the main job's to target/xb/pending-train/, each with a COMMIT
# file naming HEAD and the patches. The first build in a new scratch path rebuilds cudarc and
# candle (the CUDA stubs' path inside the scratch is part of their build): about eight minutes
# on two cores at 3c2a1e3; a second run in the same (recreated) scratch path took about three.
# The bundle with all three patches of 2026-12-07 was 62.0 MB, under the carry limit only
# together with the tracked files' 3.7 MB (scripts/gpu-bundle strips and gzips at -9).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scratch="${PENDING_SCRATCH:-/tmp/pending-all}"
target="${PENDING_TARGET_DIR:-/work/pending-target}"
# PENDING_PATCHES="a b" applies pending/a.patch then pending/b.patch; unset or "" builds HEAD alone.
read -r -a patches <<<"${PENDING_PATCHES-}"
# The scratch links to this checkout's toolchain, so install it here first: in a new checkout
# the link would dangle and with-cuda's install inside the scratch would fail on it.
"$root/scripts/with-cuda" true
git -C "$root" worktree remove --force "$scratch" 2>/dev/null || true
git -C "$root" worktree add -q --detach "$scratch" HEAD
ln -sfn "$root/.toolchain" "$scratch/.toolchain"
cd "$scratch"
for p in "${patches[@]+"${patches[@]}"}"; do
  git apply --3way "$root/pending/$p.patch"
done
scripts/update-bindings --check
# A wgmma serialised by ptxas passes every test at half speed; refuse it before the long build.
scripts/with-cuda scripts/check-wgmma
CARGO_TARGET_DIR="$target" CANDLE_TARGET_DIR="$target/candle" scripts/gpu-bundle --candle
out="$root/target/xb/pending"
rm -rf "$out" "$root/target/xb/pending-train"
mkdir -p "$root/target/xb"
mv .gpu-bundle "$out"
mv .gpu-bundle-train "$root/target/xb/pending-train"
echo "$(git -C "$root" rev-parse --short HEAD)${patches[*]:+ + ${patches[*]}}" | tee "$out/COMMIT" \
  >"$root/target/xb/pending-train/COMMIT"
du -sh "$out" "$root/target/xb/pending-train"
