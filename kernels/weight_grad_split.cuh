// The fixed-order split of the expert weight gradients' reduction, shared by both GEMM paths.
//
// A weight-gradient output tile of expert e sums over all of e's n_e pairs. Under a skewed load
// a hot expert's tiles are a few long units among many short ones, and when one expert takes
// most of the tokens its tiles (72 at config A) cannot fill the GPU at all. So the reduction over
// an expert's pairs is cut into chunks (kernels/weight_grad_split.cu plans them from the counts on
// the device), each chunk of each tile is a work unit that sums its pairs from zero, and the
// chunks of a tile are added in chunk order:
//   out = ((p_0 + p_1) + p_2) + ... + p_{c-1}      (then + out's old value when accumulating)
// The last unit of a tile to finish does the adding (the others leave their partial sums in
// slots), so no unit ever waits for another: nothing depends on which CTAs are resident. The
// order of the additions depends only on the chunk index, never on which unit finished last,
// so the result is bitwise repeatable, and the same on both paths (each partial sum is the same
// sequence of k16 products from zero on both, and the chunk bounds are multiples of 64).
//
// When to split, measured on the H100 (tools/gemm-paths, dWd at H 768, F 3072): a CTA's rate
// depends on how many share the GPU. With all 132 SMs busy (uniform routing, 0.149 ms) a CTA
// gets through about 60 pairs per microsecond of its 128 x 256 tile; with 72 busy (one expert
// taking all 16384 pairs, 72 tiles, 0.196 ms) about 84. ncu puts neither case at a limit (SM
// throughput 56 % and 40 % of the whole GPU, L2 54 % and 40 %), so a lone CTA runs faster and
// a hot expert's long tiles are only the tail when one of them, at the faster rate, outlasts
// the whole kernel at the shared rate: roughly n_e > tiles |A| / 64 (132 x 60 / 114, 114 pairs
// per us being a CTA's tensor-core rate). At config A even one expert taking every pair is not
// such a tail, and splitting it 7 ways measured slower (0.250 against 0.196 ms: the partial
// sums' traffic). With small experts it is: 16 tiles per expert (H 512, F 1024), one expert
// taking all 32768 pairs, split 4 ways: 0.130 ms against 0.316.
//
// The rule, a pure function of the counts (the same on every device and path):
//   target = max(kMinChunk, ceil(tiles * |A| / kSplitUnits)), tiles = ceil(m n / (128 * 256))
//   c_e = min(kMaxChunks, floor(n_e / target)); split when c_e >= 2, into chunks of
//   len_e = ceil(n_e / c_e) rounded up to 64 pairs (the last one shorter).
// Slots: a split expert takes c_e of them, and sum c_e <= sum n_e / target <= kSplitUnits /
// tiles, which sizes the workspace (wg_max_slots: at most kSplitUnits tiles of 128 KB, 8 MB,
// which stays in L2); the planner checks the bound anyway and plans no split if it ever failed.
#pragma once

#include "common.cuh"

constexpr int kWgSplitUnits = 64;   // about 132 SMs x 60 / 114 pairs per us (see above)
constexpr int kWgMinChunk = 512;    // pairs: below this a partial's write costs too much
constexpr int kWgMaxChunks = 16;
constexpr int kWgChunkAlign = 64;   // a chunk starts on a whole k block of either path

// The notional 128 x 256 output tiles of an m x n weight gradient (the same for m x n and n x m:
// dWg, dWu and dWd share one plan).
__host__ __device__ inline long long wg_notional_tiles(int m, int n) {
  return ((long long)m * n + 32767) / 32768;
}

// Partial-sum slots a plan may use (0: no expert is ever split for this shape).
__host__ __device__ inline int wg_max_slots(int m, int n) {
  const long long t = wg_notional_tiles(m, n);
  const long long s = t > 0 ? kWgSplitUnits / t : 0;
  return s >= 2 ? (int)s : 0;
}

// Chunk count and length of an expert with n pairs, out of `pairs` in all.
__host__ __device__ inline void wg_chunking(uint32_t n, uint32_t pairs, int rows, int cols,
                                            uint32_t *chunks, uint32_t *len) {
  *chunks = 1;
  *len = n;
  if (wg_max_slots(rows, cols) == 0) return;
  const long long tiles = wg_notional_tiles(rows, cols);
  long long target = (tiles * (long long)pairs + kWgSplitUnits - 1) / kWgSplitUnits;
  if (target < kWgMinChunk) target = kWgMinChunk;
  long long c = (long long)n / target;
  if (c < 2) return;
  if (c > kWgMaxChunks) c = kWgMaxChunks;
  long long l = ((long long)n + c - 1) / c;
  l = (l + kWgChunkAlign - 1) / kWgChunkAlign * kWgChunkAlign;
  *len = (uint32_t)l;
  *chunks = (uint32_t)(((long long)n + l - 1) / l);
}

// The plan's layout in one u32 buffer of 3e + 1 words.
struct WgPlanView {
  const uint32_t *chunk_offsets;  // [e + 1]: expert e's chunks are [chunk_offsets[e], [e + 1])
  const uint32_t *chunk_len;      // [e]
  const uint32_t *slot_offsets;   // [e]: its first slot, when split
  __host__ __device__ WgPlanView(const uint32_t *plan, int e)
      : chunk_offsets(plan),
        chunk_len(plan == nullptr ? nullptr : plan + e + 1),
        slot_offsets(plan == nullptr ? nullptr : plan + 2 * e + 1) {}
};

// One work unit's share of the reduction: pairs [p0, p0 + len) of `expert`, chunk `chunk` of
// `chunks`; a split expert's chunks use slots slot0, slot0 + 1, ...
struct WgChunk {
  int expert, chunk, chunks, p0, len, slot0;
};

// Chunk g (of all experts' chunks, in expert order). Without a plan, chunk g is expert g whole.
__device__ __forceinline__ WgChunk wg_chunk(const uint32_t *plan,
                                            const uint32_t *__restrict__ expert_offsets, int e,
                                            int g) {
  WgChunk c;
  if (plan == nullptr) {
    c.expert = g;
    c.chunk = 0;
    c.chunks = 1;
    c.p0 = (int)expert_offsets[g];
    c.len = (int)expert_offsets[g + 1] - c.p0;
    c.slot0 = 0;
    return c;
  }
  const WgPlanView v(plan, e);
  // Every expert has at least one chunk, so chunk_offsets strictly increases: the expert is the
  // last one whose first chunk is at or before g.
  int lo = 0, hi = e - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if ((int)v.chunk_offsets[mid] <= g) lo = mid;
    else hi = mid - 1;
  }
  c.expert = lo;
  c.chunk = g - (int)v.chunk_offsets[lo];
  c.chunks = (int)v.chunk_offsets[lo + 1] - (int)v.chunk_offsets[lo];
  const int n = (int)expert_offsets[lo + 1] - (int)expert_offsets[lo];
  const int l = (int)v.chunk_len[lo];
  const int begin = c.chunk * l;
  c.p0 = (int)expert_offsets[lo] + begin;
  c.len = n - begin < l ? n - begin : l;
  c.slot0 = (int)v.slot_offsets[lo];
  return c;
}

// Every chunk of every expert (the work units are this times the output tiles).
__device__ __forceinline__ int wg_total_chunks(const uint32_t *plan, int e) {
  return plan == nullptr ? e : (int)plan[e];
}

// A partial sum's slot for one output tile: kVals floats per thread of `threads`, stored as
// float4 j of thread t at (j * threads + t), so that both the write and the read coalesce.
template <int kVals>
__device__ __forceinline__ void wg_store_partial(float *slot_tile, int t, int threads,
                                                 const float *acc) {
  float4 *o = reinterpret_cast<float4 *>(slot_tile);
#pragma unroll
  for (int j = 0; j < kVals / 4; ++j)
    __stcg(o + j * threads + t, make_float4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]));
}

// Publishes this unit's partial (already stored) and says whether it was the tile's last: then
// the other chunks' partials are visible to it. `sync` is a barrier over the `threads` threads
// that hold the tile's accumulators; `flag` a shared word. The last unit resets the counter, so
// the counters are zero again when the kernel ends (ready for the next launch or graph replay).
template <typename Sync>
__device__ __forceinline__ bool wg_arrive(uint32_t *counter, int chunks, int t, int *flag,
                                          Sync sync) {
  __threadfence();
  sync();
  if (t == 0) {
    const bool last = atomicAdd(counter, 1u) == (uint32_t)(chunks - 1);
    if (last) atomicExch(counter, 0u);
    *flag = last;
  }
  sync();
  const bool last = *flag != 0;
  if (last) __threadfence();
  return last;
}

// acc <- p_0 + p_1 + ... + p_{chunks-1} in chunk order, every partial read from its slot (slot s
// of this tile at slots_tile0 + s * slot_stride floats), this unit's own included: its
// accumulators are dead once stored, so the fold holds no more than one float4 at a time.
template <int kVals>
__device__ __forceinline__ void wg_fold(const float *slots_tile0, size_t slot_stride, int chunks,
                                        int t, int threads, float *acc) {
#pragma unroll
  for (int j = 0; j < kVals / 4; ++j) {
    const size_t at = (size_t)j * threads + t;
    float4 r = __ldcg(reinterpret_cast<const float4 *>(slots_tile0) + at);
    for (int i = 1; i < chunks; ++i) {
      const float4 v =
          __ldcg(reinterpret_cast<const float4 *>(slots_tile0 + (size_t)i * slot_stride) + at);
      r.x += v.x;
      r.y += v.y;
      r.z += v.z;
      r.w += v.w;
    }
    acc[4 * j] = r.x;
    acc[4 * j + 1] = r.y;
    acc[4 * j + 2] = r.z;
    acc[4 * j + 3] = r.w;
  }
}

// What a split expert's unit does after its mainloop, on both paths: store its partial sum,
// and if it is the tile's last unit, fold every chunk's partial into acc in chunk order. True
// when acc now holds the tile's sum (store it as an unsplit tile's); false when another unit
// will. kVals accumulators in each of `threads` threads make the tile; `tiles` output tiles per
// chunk, this unit's is `tile`.
template <int kVals, typename Sync>
__device__ __forceinline__ bool wg_split_finish(float *slots, uint32_t *counters,
                                                const WgChunk &c, int tiles, int tile, int t,
                                                int threads, int *flag, Sync sync, float *acc) {
  const size_t tile_floats = (size_t)kVals * threads;
  const size_t stride = (size_t)tiles * tile_floats;
  float *tile0 = slots + (size_t)c.slot0 * stride + (size_t)tile * tile_floats;
  wg_store_partial<kVals>(tile0 + (size_t)c.chunk * stride, t, threads, acc);
  if (!wg_arrive(counters + (size_t)c.expert * tiles + tile, c.chunks, t, flag, sync))
    return false;
  wg_fold<kVals>(tile0, stride, c.chunks, t, threads, acc);
  return true;
}
