// Helpers shared by every kernel family: dtype conversion and vector loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "remoe_kernels.h"

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Two values rounded to T, packed into one 32-bit word (low half first, as in memory).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

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

// Eight f32 values stored as eight 16-bit values, one 16-byte store.
template <typename T>
__device__ __forceinline__ void store8(T *p, const float v[8]) {
  uint4 raw;
  T *o = reinterpret_cast<T *>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = T(v[i]);
  *reinterpret_cast<uint4 *>(p) = raw;
}

// Sum over a full warp, the same butterfly order on every run (deterministic).
template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// Inclusive prefix sum over a full warp (lane l gets the sum of lanes 0..l).
__device__ __forceinline__ uint32_t warp_inclusive_scan(uint32_t v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const uint32_t n = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += n;
  }
  return v;
}
