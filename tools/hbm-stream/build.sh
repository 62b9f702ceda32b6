#!/usr/bin/env bash
# Builds the HBM microbenchmarks with the CUDA compiler that scripts/with-cuda provides:
#
#   scripts/with-cuda tools/hbm-stream/build.sh OUT_DIR
#
# OUT_DIR/stream (one weight matrix read in several orders), OUT_DIR/prefetch (a second weight
# stream prefetched into L2 under the first) and OUT_DIR/store (an f32 weight gradient written in
# several patterns). Each runs on the GPU machine with no arguments.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
nvcc="${NVCC:-nvcc}"
lib="$(dirname "$(dirname "$(command -v "$nvcc")")")/lib"
mkdir -p "$out"
for tool in stream prefetch store; do
  "$nvcc" -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -L"$lib" -L"$lib/../lib64" \
    -cudart static -o "$out/$tool" "$here/$tool.cu"
done
