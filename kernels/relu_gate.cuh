// The ReLU router's gate of one logit, shared by router.cu's kernels and the small-batch
// kernel (decode.cu), which must give the same bits, statistics and error word as they do.
#pragma once

#include "common.cuh"

// The gate under the non-finite policy (a NaN or infinite logit gates nothing and is counted in
// the error word, with the lowest such token), stored with its logit; returns the gate.
__device__ __forceinline__ float relu_gate(float logit, int token, int expert, int t, int e,
                                           float *logits, float *gates, uint32_t *error_flags) {
  const bool finite = isfinite(logit);
  const float gate = finite ? fmaxf(logit, 0.f) : 0.f;
  if (token < t && expert < e) {
    const size_t o = (size_t)token * e + expert;
    logits[o] = logit;
    gates[o] = gate;
    if (!finite && error_flags != nullptr) {
      atomicAdd(&error_flags[0], 1u);
      atomicMax(&error_flags[1], ~(uint32_t)token);
    }
  }
  return gate;
}
