// Gate-weighted combine: out[t] = init[t] + sum over the token's active experts, ascending, of
// R[t,e] * y[pair(t,e)] (weights 1 when no gates are given: the backward sums each token's
// per-pair dX this way, onto the router's share). One warp per token; each lane owns 16-byte column chunks of the row,
// 4 at a time (32 f32 accumulators), and walks the token's experts through a ballot over the
// pair index, so the order of the sum is fixed: no atomics, bitwise-reproducible output, and
// every output element is written (zeros for a token no expert took).
#include "common.cuh"

namespace {

constexpr int kWarps = 8;
constexpr int kChunksPerLane = 4;  // 8 values each

// Y: the rows' type (T for both users: the forward's expert outputs y, the backward's per-pair
// dX), widened to f32 as it is loaded.
template <typename T, typename Y>
__global__ void __launch_bounds__(kWarps * 32)
    combine_kernel(const Y *__restrict__ y, const float *__restrict__ gates,
                   const int32_t *__restrict__ pair_index, const float *__restrict__ init,
                   T *__restrict__ out, int t, int h, int e) {
  const int lane = threadIdx.x & 31;
  const int token = blockIdx.x * kWarps + threadIdx.x / 32;
  if (token >= t) return;
  const int chunks = h / 8;
  const size_t row = (size_t)token * e;
  for (int c0 = 0; c0 < chunks; c0 += 32 * kChunksPerLane) {
    float acc[kChunksPerLane][8];
#pragma unroll
    for (int i = 0; i < kChunksPerLane; ++i) {
      const int c = c0 + i * 32 + lane;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        acc[i][j] = (init != nullptr && c < chunks) ? init[(size_t)token * h + c * 8 + j] : 0.f;
    }

    for (int e0 = 0; e0 < e; e0 += 32) {
      const int ex = e0 + lane;
      const int32_t p = ex < e ? pair_index[row + ex] : -1;
      const float g = ex < e ? (gates != nullptr ? gates[row + ex] : 1.f) : 0.f;
      uint32_t active = __ballot_sync(0xffffffffu, p >= 0);
      while (active) {
        const int src = __ffs(active) - 1;
        active &= active - 1;
        const int32_t pp = __shfl_sync(0xffffffffu, p, src);
        const float gg = __shfl_sync(0xffffffffu, g, src);
        const Y *yrow = y + (size_t)pp * h;
#pragma unroll
        for (int i = 0; i < kChunksPerLane; ++i) {
          const int c = c0 + i * 32 + lane;
          if (c < chunks) {
            float v[8];
            load8_as_float(yrow + c * 8, v);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(gg, v[j], acc[i][j]);
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kChunksPerLane; ++i) {
      const int c = c0 + i * 32 + lane;
      if (c < chunks) store8(out + (size_t)token * h + c * 8, acc[i]);
    }
  }
}

template <typename T, typename Y>
int launch_combine(const Y *y, const float *gates, const int32_t *pair_index, const float *init,
                   uint16_t *out, int t, int h, int e, cudaStream_t stream) {
  if (t == 0) return 0;
  combine_kernel<T, Y><<<(t + kWarps - 1) / kWarps, kWarps * 32, 0, stream>>>(
      y, gates, pair_index, init, reinterpret_cast<T *>(out), t, h, e);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" int remoe_combine_bf16 REMOE_COMBINE_PARAMS {
  return launch_combine<__nv_bfloat16, __nv_bfloat16>(
      reinterpret_cast<const __nv_bfloat16 *>(y), gates, pair_index, nullptr, out, t, h, e,
      (cudaStream_t)stream);
}

extern "C" int remoe_combine_f16 REMOE_COMBINE_PARAMS {
  return launch_combine<__half, __half>(reinterpret_cast<const __half *>(y), gates, pair_index,
                                        nullptr, out, t, h, e, (cudaStream_t)stream);
}

extern "C" int remoe_token_sum_bf16 REMOE_TOKEN_SUM_PARAMS {
  return launch_combine<__nv_bfloat16, __nv_bfloat16>(
      reinterpret_cast<const __nv_bfloat16 *>(rows), nullptr, pair_index, init, out, t, h, e,
      (cudaStream_t)stream);
}

extern "C" int remoe_token_sum_f16 REMOE_TOKEN_SUM_PARAMS {
  return launch_combine<__half, __half>(reinterpret_cast<const __half *>(rows), nullptr,
                                        pair_index, init, out, t, h, e, (cudaStream_t)stream);
}
