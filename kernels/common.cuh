// Helpers shared by every kernel family: dtype conversion and vector loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "remoe_kernels.h"

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Eight consecutive 16-bit values, one 16-byte load: the pointer must be 16-byte aligned, which
// the safe layer guarantees by requiring row lengths that are multiples of 8 and cudarc's
// allocations (256-byte aligned).
template <typename T>
__device__ __forceinline__ void load8_as_float(const T *p, float out[8]) {
  static_assert(sizeof(T) == 2, "16-bit element types (f32 has its own overload below)");
  const uint4 raw = __ldg(reinterpret_cast<const uint4 *>(p));
  const T *v = reinterpret_cast<const T *>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(v[i]);
}

// Eight consecutive f32 values, two 16-byte loads (32-byte aligned rows of multiples of 8).
__device__ __forceinline__ void load8_as_float(const float *p, float out[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4 *>(p));
  const float4 b = __ldg(reinterpret_cast<const float4 *>(p) + 1);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}
