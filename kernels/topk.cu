// TopK baseline router tail: softmax over each token's E logits and the selection of the k
// largest, producing the same per-block statistics as the ReLU router so that both share the
// compaction and the expert GEMMs. The gates are either the selected probabilities as they are
// (Switch) or renormalised over the selection (Mixtral, norm_topk_prob), g_i = P_i / sum_S P_j.
// The renormalised gates are computed from the exponentials before the division by the full
// sum: g_i = exp(l_i - m) / sum_S exp(l_j - m), the softmax over the selected logits. The
// largest finite logit is always selected, so that sum is at least 1 (never a division by 0 or
// by a tiny number), and with k = 1 it is exactly exp(0) = 1: every gate is exactly 1.
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
                        float *__restrict__ block_sums, int t, int e, int k,
                        bool normalize) {
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
    float x[kPerLane];  // exp(l - m), the unnormalised probabilities
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      x[j] = (valid >> j & 1u) ? __expf(l[j] - m) : 0.f;
      s += x[j];
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
    const float inv = s > 0.f ? 1.f / s : 0.f;  // s = 0 only when no logit is finite
    float p[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) p[j] = x[j] * inv;

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

    // Renormalisation: the selection's share of the exponentials. Warp-uniform branch; the
    // butterfly's fixed order makes the sum the same on every run. No selection (no finite
    // logit) leaves it 0 and no gate reads it.
    float sel_inv = 0.f;
    if (normalize) {
      float ss = 0.f;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) ss += (chosen >> j & 1u) ? x[j] : 0.f;
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, d);
      sel_inv = ss > 0.f ? 1.f / ss : 0.f;
    }

    float *prow = probs + (size_t)token * e;
    float *grow = gates + (size_t)token * e;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int ex = lane + 32 * j;
      if (ex < e) {
        const bool sel = chosen >> j & 1u;
        const float g = normalize ? x[j] * sel_inv : p[j];
        prow[ex] = p[j];
        // A selected gate that underflows is stored as FLT_MIN: the compaction takes gate > 0
        // as the selection.
        grow[ex] = sel ? fmaxf(g, FLT_MIN) : 0.f;
        count[j] += sel;
        psum[j] += p[j];
      }
    }
  }

  // Per-block statistics: each warp's partials, then the warps summed in a fixed order. The
  // early return is block-uniform, so no thread misses the barrier.
  if (block_counts == nullptr) return;
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
                                  int32_t k, int32_t normalize, remoe_stream_t stream) {
  if (t == 0) return 0;
  const int num_blocks = (t + kTokensPerBlock - 1) / kTokensPerBlock;
  topk_softmax_kernel<<<num_blocks, kWarps * 32, 0, (cudaStream_t)stream>>>(
      logits, probs, gates, block_counts, block_sums, t, e, k, normalize != 0);
  return (int)cudaGetLastError();
}
