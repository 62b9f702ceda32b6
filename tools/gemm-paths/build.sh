#!/usr/bin/env bash
# Builds the kernel-level check of the two expert-GEMM paths (harness.cu) with the CUDA compiler
# that scripts/with-cuda provides:
#
#   scripts/with-cuda tools/gemm-paths/build.sh OUT_BINARY
#
# The binary runs on a Hopper GPU (it needs the sm_90a kernels): it compares every Hopper GEMM
# with the mma.sync kernel on the same inputs (bitwise, after poisoning the outputs), over awkward
# shapes and configs A, B, D, and times both. scripts/gpu-bundle builds it into the GPU bundle.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:?usage: build.sh OUT_BINARY}"
nvcc="${NVCC:-nvcc}"
lib="$(dirname "$(dirname "$(command -v "$nvcc")")")/lib"
"$nvcc" -std=c++17 -O3 -lineinfo --expt-relaxed-constexpr -I"$here/../../kernels" \
  -gencode=arch=compute_90a,code=sm_90a -L"$lib" -L"$lib/../lib64" -cudart static \
  -o "$out" "$here/harness.cu" "$here/../../kernels/hopper_gemm.cu" \
  "$here/../../kernels/grouped_gemm.cu" "$here/../../kernels/gather.cu" "$here/../../kernels/router.cu" "$here/../../kernels/weight_grad_split.cu"
