// The weight gradients' chunk plan (the rule and the fold are in weight_grad_split.cuh): one
// warp scans the experts' counts, as the routing statistics' finalize does, and writes each
// expert's chunk count, chunk length and first partial-sum slot. It runs once per backward, on
// the device, so the split needs no host round-trip and a CUDA graph can capture it.
#include <algorithm>

#include "weight_grad_split.cuh"

namespace {

// One warp. plan: [chunk_offsets e + 1][chunk_len e][slot_offsets e].
__global__ void plan_kernel(const uint32_t *__restrict__ expert_offsets, int e, int h, int f,
                            long long chunking_pairs, uint32_t *__restrict__ plan) {
  const int lane = threadIdx.x;
  uint32_t *chunk_offsets = plan, *chunk_len = plan + e + 1, *slot_offsets = plan + 2 * e + 1;
  const uint32_t pairs =
      chunking_pairs < 0 ? expert_offsets[e] : (uint32_t)min(chunking_pairs, 0xffffffffLL);
  const int max_slots = wg_max_slots(h, f);
  uint32_t chunks_run = 0, slots_run = 0;
  for (int base = 0; base < e; base += 32) {
    const int i = base + lane;
    uint32_t c = 1, len = 0;
    if (i < e) wg_chunking(expert_offsets[i + 1] - expert_offsets[i], pairs, h, f, &c, &len);
    const uint32_t slots = c > 1 ? c : 0u;
    const uint32_t incl_c = warp_inclusive_scan(i < e ? c : 0u);
    const uint32_t incl_s = warp_inclusive_scan(slots);
    if (i < e) {
      chunk_offsets[i] = chunks_run + incl_c - c;
      chunk_len[i] = len;
      slot_offsets[i] = slots_run + incl_s - slots;
    }
    chunks_run += __shfl_sync(0xffffffffu, incl_c, 31);
    slots_run += __shfl_sync(0xffffffffu, incl_s, 31);
  }
  if (slots_run > (uint32_t)max_slots) {
    // Cannot happen (weight_grad_split.cuh bounds the sum); if it ever did, split nothing
    // rather than write past the slots.
    __syncwarp();
    for (int i = lane; i < e; i += 32) {
      chunk_offsets[i] = (uint32_t)i;
      chunk_len[i] = expert_offsets[i + 1] - expert_offsets[i];
      slot_offsets[i] = 0u;
    }
    chunks_run = (uint32_t)e;
  }
  if (lane == 0) chunk_offsets[e] = chunks_run;
}

}  // namespace

extern "C" int remoe_weight_grad_split_sizes(int32_t e, int32_t h, int32_t f,
                                             uint64_t *plan_words, uint64_t *slot_floats,
                                             uint64_t *counters) {
  if (e < 1 || h < 1 || f < 1 || plan_words == nullptr || slot_floats == nullptr ||
      counters == nullptr)
    return (int)cudaErrorInvalidValue;
  *plan_words = 3 * (uint64_t)e + 1;
  const uint64_t slots = (uint64_t)wg_max_slots(h, f);
  // Output tiles of either orientation (m x n = h x f or f x h) on either path: Hopper's 128 x 256
  // tiles and mma.sync's 128 x 128, whichever covers more.
  uint64_t tile_floats = 0, tiles = 0;
  for (int o = 0; o < 2; ++o) {
    const uint64_t m = o == 0 ? (uint64_t)h : (uint64_t)f, n = o == 0 ? (uint64_t)f : (uint64_t)h;
    const uint64_t hopper = (m + 127) / 128 * ((n + 255) / 256), mma = (m + 127) / 128 * ((n + 127) / 128);
    tile_floats = std::max(tile_floats, std::max(hopper * 128 * 256, mma * 128 * 128));
    tiles = std::max(tiles, std::max(hopper, mma));
  }
  *slot_floats = slots * tile_floats;
  *counters = slots > 0 ? (uint64_t)e * tiles : 0;
  return 0;
}

extern "C" int remoe_weight_grad_plan(const uint32_t *expert_offsets, int32_t e, int32_t h,
                                      int32_t f, int64_t chunking_pairs, uint32_t *plan,
                                      remoe_stream_t stream) {
  if (e < 1 || h < 1 || f < 1) return (int)cudaErrorInvalidValue;
  plan_kernel<<<1, 32, 0, (cudaStream_t)stream>>>(expert_offsets, e, h, f,
                                                  (long long)chunking_pairs, plan);
  return (int)cudaGetLastError();
}
