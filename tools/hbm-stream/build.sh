#!/usr/bin/env bash
# Builds the HBM streaming microbenchmark (stream.cu) with the CUDA compiler that
# scripts/with-cuda provides:
#
#   scripts/with-cuda tools/hbm-stream/build.sh OUT_BINARY
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:?usage: build.sh OUT_BINARY}"
nvcc="${NVCC:-nvcc}"
lib="$(dirname "$(dirname "$(command -v "$nvcc")")")/lib"
"$nvcc" -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -L"$lib" -L"$lib/../lib64" \
  -cudart static -o "$out" "$here/stream.cu"
