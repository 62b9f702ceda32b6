// Compaction of the nonzero gates into per-expert token lists, and the routing statistics.
//
// The router left, per block of 64 tokens and per expert, the number of active pairs and the sum
// of the gates. Three small kernels turn that into the dispatch structures without atomics, so
// every run produces the same lists in the same order:
//   1. expert_scan: one warp per expert scans its column of block counts (where each block's
//      pairs start inside the expert's list), and sums the gate partials in a fixed order;
//   2. finalize: one warp scans the experts (expert offsets, GEMM row-tile offsets) and reduces
//      the statistics (|A|, sparsity, the balance loss); it also copies the context's error word
//      (non-finite logits, written by the router) next to them. When |A| exceeds the capacity
//      the pair buffers were sized for, it raises the overflow half of the error word and
//      publishes an empty dispatch (all offsets 0), so that no later kernel writes or reads past
//      the buffers: the layer's output is then zero, and the host learns of it at its next
//      check (the sync-free contract: nothing is read back during a forward);
//   3. scatter: one block per 64 tokens writes its pairs at their final positions, ascending
//      token order within an expert from a warp ballot, and the [T, E] pair index the combine
//      reads.
#include "common.cuh"

namespace {

constexpr int kTokensPerBlock = REMOE_ROUTER_TOKENS_PER_BLOCK;
constexpr int kTileRows = REMOE_GEMM_TILE_ROWS;

__global__ void expert_scan_kernel(const uint32_t *__restrict__ block_counts,
                                   const float *__restrict__ block_sums,
                                   uint32_t *__restrict__ block_offsets,
                                   uint32_t *__restrict__ counts, float *__restrict__ gate_sums,
                                   int num_blocks, int e) {
  const int lane = threadIdx.x & 31;
  const int expert = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (expert >= e) return;
  uint32_t running = 0;
  float sum = 0.f;
  for (int base = 0; base < num_blocks; base += 32) {
    const int b = base + lane;
    const size_t o = (size_t)b * e + expert;
    const uint32_t c = b < num_blocks ? block_counts[o] : 0u;
    const uint32_t incl = warp_inclusive_scan(c);
    if (b < num_blocks) {
      block_offsets[o] = running + incl - c;
      sum += block_sums[o];
    }
    running += __shfl_sync(0xffffffffu, incl, 31);
  }
  sum = warp_sum(sum);
  if (lane == 0) {
    counts[expert] = running;
    gate_sums[expert] = sum;
  }
}

// One warp.
__global__ void finalize_kernel(const uint32_t *__restrict__ counts,
                                const float *__restrict__ gate_sums,
                                uint32_t *__restrict__ expert_offsets,
                                uint32_t *__restrict__ tile_offsets, uint32_t *__restrict__ stats_u32,
                                float *__restrict__ stats_f32, int t, int e, int k,
                                const double *__restrict__ coeff, double *__restrict__ sparsity_sum,
                                uint32_t *__restrict__ sparsity_count,
                                uint32_t *__restrict__ error_flags, uint32_t capacity) {
  const int lane = threadIdx.x;
  uint32_t pairs = 0, tiles = 0;
  double weighted = 0.0;  // sum_e n_e * gate_sums[e]
  for (int base = 0; base < e; base += 32) {
    const int i = base + lane;
    const uint32_t n = i < e ? counts[i] : 0u;
    const uint32_t nt = (n + kTileRows - 1) / kTileRows;
    const uint32_t incl_n = warp_inclusive_scan(n);
    const uint32_t incl_t = warp_inclusive_scan(nt);
    if (i < e) {
      expert_offsets[i] = pairs + incl_n - n;
      tile_offsets[i] = tiles + incl_t - nt;
      // An explicit fma: kernels/decode.cu computes the same sum and must match it bit for bit.
      weighted = __fma_rn((double)n, (double)gate_sums[i], weighted);
    }
    pairs += __shfl_sync(0xffffffffu, incl_n, 31);
    tiles += __shfl_sync(0xffffffffu, incl_t, 31);
  }
  weighted = warp_sum(weighted);
  const bool overflow = pairs > capacity;
  if (overflow) {
    __syncwarp();
    for (int i = lane; i <= e; i += 32) {
      expert_offsets[i] = 0u;
      tile_offsets[i] = 0u;
    }
  }
  if (lane == 0) {
    if (overflow && error_flags != nullptr) {
      // The largest |A| that did not fit since the last check, and the capacity it met.
      error_flags[2] = pairs > error_flags[2] ? pairs : error_flags[2];
      error_flags[3] = capacity;
    }
    if (!overflow) {
      expert_offsets[e] = pairs;
      tile_offsets[e] = tiles;
    }
    stats_u32[0] = pairs;
    stats_u32[1] = tiles;
    const uint32_t bad_count = error_flags != nullptr ? error_flags[0] : 0u;
    const uint32_t bad_first = error_flags != nullptr ? error_flags[1] : 0u;
    stats_u32[2] = bad_count;
    stats_u32[3] = bad_first;
    const double total = (double)t * (double)e;
    const double sparsity = t == 0 ? 1.0 : 1.0 - (double)pairs / total;
    stats_f32[0] = (float)sparsity;
    stats_f32[1] = t == 0 ? 0.f : (float)(*coeff * e / ((double)k * t * t) * weighted);
    // The adaptive controller's running sum: kernels on one stream run in order, so this
    // single-thread update needs no atomic and is deterministic. A forward that saw a
    // non-finite logit (bad_first != 0: the error word is set) records nothing.
    if (sparsity_sum != nullptr && bad_first == 0u) {
      *sparsity_sum += sparsity;
      *sparsity_count += 1;
    }
  }
}

// One block of 256 threads per 64 tokens; experts are taken 64 at a time through shared memory
// so that the gate reads are coalesced whatever E is.
__global__ void __launch_bounds__(256)
    scatter_kernel(const float *__restrict__ gates, const uint32_t *__restrict__ block_offsets,
                   const uint32_t *__restrict__ expert_offsets,
                   uint32_t *__restrict__ pair_token, float *__restrict__ pair_gate,
                   int32_t *__restrict__ pair_index, int t, int e) {
  constexpr int kChunk = 64;
  __shared__ float g[kTokensPerBlock][kChunk + 1];
  __shared__ int32_t pidx[kTokensPerBlock][kChunk + 1];
  const int token0 = blockIdx.x * kTokensPerBlock;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x / 32;
  // An overflow (finalize_kernel) left the offsets at 0 while gates are positive: then no pair
  // is written and every pair index is -1. Without an overflow a positive gate implies |A| > 0.
  const bool dispatched = expert_offsets[e] != 0u;
  for (int e0 = 0; e0 < e; e0 += kChunk) {
    for (int i = threadIdx.x; i < kTokensPerBlock * kChunk; i += blockDim.x) {
      const int r = i / kChunk, c = i % kChunk;
      const int token = token0 + r, expert = e0 + c;
      g[r][c] = (token < t && expert < e) ? gates[(size_t)token * e + expert] : 0.f;
    }
    __syncthreads();
    for (int c = warp; c < kChunk && e0 + c < e; c += blockDim.x / 32) {
      const int expert = e0 + c;
      uint32_t pos = expert_offsets[expert] + block_offsets[(size_t)blockIdx.x * e + expert];
#pragma unroll
      for (int half = 0; half < kTokensPerBlock / 32; ++half) {
        const int r = half * 32 + lane;
        const float gate = g[r][c];
        const bool active = dispatched && gate > 0.f;
        const uint32_t mask = __ballot_sync(0xffffffffu, active);
        const uint32_t mine = pos + __popc(mask & ((1u << lane) - 1u));
        if (active) {
          pair_token[mine] = token0 + r;
          pair_gate[mine] = gate;
        }
        pidx[r][c] = active ? (int32_t)mine : -1;
        pos += __popc(mask);
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kTokensPerBlock * kChunk; i += blockDim.x) {
      const int r = i / kChunk, c = i % kChunk;
      const int token = token0 + r, expert = e0 + c;
      if (token < t && expert < e) pair_index[(size_t)token * e + expert] = pidx[r][c];
    }
    __syncthreads();
  }
}

}  // namespace

extern "C" int remoe_routing_stats(const uint32_t *block_counts, const float *block_sums,
                                   uint32_t *block_offsets, uint32_t *counts, float *gate_sums,
                                   uint32_t *expert_offsets, uint32_t *tile_offsets,
                                   uint32_t *stats_u32, float *stats_f32, int32_t t, int32_t e,
                                   int32_t k, const double *coeff, double *sparsity_sum,
                                   uint32_t *sparsity_count, uint32_t *error_flags,
                                   int32_t capacity, remoe_stream_t stream) {
  cudaStream_t s = (cudaStream_t)stream;
  const int num_blocks = (t + kTokensPerBlock - 1) / kTokensPerBlock;
  constexpr int kWarps = 8;
  expert_scan_kernel<<<(e + kWarps - 1) / kWarps, kWarps * 32, 0, s>>>(
      block_counts, block_sums, block_offsets, counts, gate_sums, num_blocks, e);
  finalize_kernel<<<1, 32, 0, s>>>(counts, gate_sums, expert_offsets, tile_offsets, stats_u32,
                                   stats_f32, t, e, k, coeff, sparsity_sum, sparsity_count,
                                   error_flags, (uint32_t)capacity);
  return (int)cudaGetLastError();
}

extern "C" int remoe_compact_pairs(const float *gates, const uint32_t *block_offsets,
                                   const uint32_t *expert_offsets, uint32_t *pair_token,
                                   float *pair_gate, int32_t *pair_index, int32_t t, int32_t e,
                                   remoe_stream_t stream) {
  if (t == 0) return 0;
  const int num_blocks = (t + kTokensPerBlock - 1) / kTokensPerBlock;
  scatter_kernel<<<num_blocks, 256, 0, (cudaStream_t)stream>>>(
      gates, block_offsets, expert_offsets, pair_token, pair_gate, pair_index, t, e);
  return (int)cudaGetLastError();
}
