// TopK baseline router tail: softmax over each token's E logits and the selection of the k
// largest, producing the same per-block statistics as the ReLU router so that both share the
// compaction and the expert GEMMs.
//
// One warp per token, the E <= 512 logits in registers (lane holds experts lane, lane+32, ...).
// The selection ranks logits, not probabilities: softmax is strictly increasing, so this is the
// order of the exact P, with ties exactly where the logits tie (lower index wins), and it does
// not depend on the rounding of expf. k rounds of a warp arg-max pick the winners.
//
// Non-finite logits (the crate's policy, mirrored by the CPU reference; the router kernel has
// already reported them in the context's error word): a NaN or +-Inf logit takes no part. Its P
// is 0, the softmax runs over the token's finite logits (all P are 0 when there are none), and
// it is never selected, so a token selects its k largest finite logits, or all of them when it
// has fewer than k: never more than k. Over finite values the ranking is a strict total order
// (larger logit, then lower index), so every lane of the warp agrees on each round's winner.
#include <float.h>

#include "common.cuh"

namespace {

constexpr int kTokensPerBlock = REMOE_ROUTER_TOKENS_PER_BLOCK;
constexpr int kWarps = 8;
constexpr int kPerLane = REMOE_TOPK_MAX_EXPERTS / 32;

__global__ void __launch_bounds__(kWarps * 32)
    topk_softmax_kernel(const float *__restrict__ logits, float *__restrict__ probs,
                        float *__restrict__ gates, uint32_t *__restrict__ block_counts,
                        float *__restrict__ block_sums, int t, int e, int k) {
  __shared__ uint32_t warp_counts[kWarps][REMOE_TOPK_MAX_EXPERTS];
  __shared__ float warp_sums[kWarps][REMOE_TOPK_MAX_EXPERTS];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x / 32;
  const int token0 = blockIdx.x * kTokensPerBlock;

  uint32_t count[kPerLane];
  float psum[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    count[j] = 0;
    psum[j] = 0.f;
  }

  for (int r = warp; r < kTokensPerBlock; r += kWarps) {
    const int token = token0 + r;
    if (token >= t) break;  // warp-uniform
    const float *row = logits + (size_t)token * e;
    float l[kPerLane];
    uint32_t valid = 0;  // bit j: expert lane + 32 j exists and its logit is finite
    float m = -FLT_MAX;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int ex = lane + 32 * j;
      l[j] = ex < e ? row[ex] : -FLT_MAX;
      if (ex < e && isfinite(l[j])) {
        valid |= 1u << j;
        m = fmaxf(m, l[j]);
      }
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, d));
    float p[kPerLane];
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      p[j] = (valid >> j & 1u) ? __expf(l[j] - m) : 0.f;
      s += p[j];
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
    const float inv = s > 0.f ? 1.f / s : 0.f;  // s = 0 only when no logit is finite
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) p[j] *= inv;

    uint32_t chosen = 0;  // bit j: expert lane + 32 j is selected
    for (int round = 0; round < k; ++round) {
      // This lane's best unselected expert: the largest logit, the lowest index on ties (j
      // ascends, so the first strict improvement wins).
      float best = -FLT_MAX;
      int best_ex = INT_MAX;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int ex = lane + 32 * j;
        if ((valid >> j & 1u) && !(chosen >> j & 1u) && (l[j] > best || best_ex == INT_MAX)) {
          best = l[j];
          best_ex = ex;
        }
      }
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, d);
        const int oe = __shfl_xor_sync(0xffffffffu, best_ex, d);
        if (oe != INT_MAX && (best_ex == INT_MAX || ob > best || (ob == best && oe < best_ex))) {
          best = ob;
          best_ex = oe;
        }
      }
      // No finite logit left: fewer than k are selected (warp-uniform: every lane reduced the
      // same candidates).
      if (best_ex == INT_MAX) break;
      if ((best_ex & 31) == lane) chosen |= 1u << (best_ex / 32);
    }

    float *prow = probs + (size_t)token * e;
    float *grow = gates + (size_t)token * e;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int ex = lane + 32 * j;
      if (ex < e) {
        const bool sel = chosen >> j & 1u;
        prow[ex] = p[j];
        grow[ex] = sel ? fmaxf(p[j], FLT_MIN) : 0.f;
        count[j] += sel;
        psum[j] += p[j];
      }
    }
  }

  // Per-block statistics: each warp's partials, then the warps summed in a fixed order.
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int ex = lane + 32 * j;
    if (ex < e) {
      warp_counts[warp][ex] = count[j];
      warp_sums[warp][ex] = psum[j];
    }
  }
  __syncthreads();
  for (int ex = threadIdx.x; ex < e; ex += blockDim.x) {
    uint32_t c = 0;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      c += warp_counts[w][ex];
      s += warp_sums[w][ex];
    }
    block_counts[(size_t)blockIdx.x * e + ex] = c;
    block_sums[(size_t)blockIdx.x * e + ex] = s;
  }
}

}  // namespace

extern "C" int remoe_topk_softmax(const float *logits, float *probs, float *gates,
                                  uint32_t *block_counts, float *block_sums, int32_t t, int32_t e,
                                  int32_t k, remoe_stream_t stream) {
  if (t == 0) return 0;
  const int num_blocks = (t + kTokensPerBlock - 1) / kTokensPerBlock;
  topk_softmax_kernel<<<num_blocks, kWarps * 32, 0, (cudaStream_t)stream>>>(
      logits, probs, gates, block_counts, block_sums, t, e, k);
  return (int)cudaGetLastError();
}
