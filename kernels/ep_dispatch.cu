// Expert parallelism's bookkeeping on the device: the count message a source sends every rank,
// the owner's dispatch of what it received, and the 32-bit permutation that returns per-pair
// scalars to their sources. The host forms of the first two are src/ep/protocol.rs
// (CallHeader::count_message, ReceivePlan::new), which the tests compare against word for word.
//
// None of these kernels reads a size from the host beyond its buffers' capacities: the counts
// come from the messages on the device, so the same launches serve the count-exchange mode (the
// host has validated the messages first) and a later graph-captured mode.
#include "common.cuh"

namespace {

constexpr int kHeaderWords = REMOE_EP_HEADER_WORDS;
constexpr int kTileRows = REMOE_GEMM_TILE_ROWS;

// msg = header, then counts[i] = expert_offsets[i+1] - expert_offsets[i]. Differences of the
// offsets, never the router's counts: a source that overflowed its capacity has all-zero
// offsets, so its message announces no pairs.
__global__ void count_message_kernel(const uint32_t *__restrict__ expert_offsets,
                                     remoe_ep_header_t header, int e, uint32_t *__restrict__ msg) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < kHeaderWords + e;
       i += blockDim.x * gridDim.x) {
    msg[i] = i < kHeaderWords ? header.words[i]
                              : expert_offsets[i - kHeaderWords + 1] - expert_offsets[i - kHeaderWords];
  }
}

// Source s's count of the owner's local expert j, from the received messages [ranks][words].
__device__ __forceinline__ uint32_t received_count(const uint32_t *msgs, int words, int first,
                                                   int s, int j) {
  return msgs[(size_t)s * words + kHeaderWords + first + j];
}

// One warp. The local order is expert-major, then source, then the source's own order, so the
// (expert j, source s) segment is segment g = j * ranks + s, and segments are laid out in g
// order. Writes, per segment, where it starts in the local order (seg_local) and in the receive
// buffer (seg_recv), plus the local expert and tile offsets and each source's receive base.
__global__ void receive_plan_kernel(const uint32_t *__restrict__ msgs, int words, int owner,
                                    int el, int ranks, uint32_t *__restrict__ expert_offsets,
                                    uint32_t *__restrict__ tile_offsets,
                                    uint32_t *__restrict__ src_base,
                                    uint32_t *__restrict__ seg_local,
                                    uint32_t *__restrict__ seg_recv) {
  const int lane = threadIdx.x;
  const int first = owner * el;
  // Receive side: source s's rows are one block, sorted by expert.
  uint32_t base = 0;
  for (int s = 0; s < ranks; ++s) {
    uint32_t run = 0;
    for (int jb = 0; jb < el; jb += 32) {
      const int j = jb + lane;
      const uint32_t c = j < el ? received_count(msgs, words, first, s, j) : 0u;
      const uint32_t incl = warp_inclusive_scan(c);
      if (j < el) seg_recv[j * ranks + s] = base + run + incl - c;
      run += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) src_base[s] = base;
    base += run;
  }
  // Local side: expert j's pairs, all sources', are contiguous; tiles as routing_stats counts
  // them, so the grouped GEMMs take these offsets as they are.
  uint32_t pairs = 0, tiles = 0;
  for (int jb = 0; jb < el; jb += 32) {
    const int j = jb + lane;
    uint32_t n = 0;
    if (j < el) {
      for (int s = 0; s < ranks; ++s) n += received_count(msgs, words, first, s, j);
    }
    const uint32_t nt = (n + kTileRows - 1) / kTileRows;
    const uint32_t incl_n = warp_inclusive_scan(n);
    const uint32_t incl_t = warp_inclusive_scan(nt);
    if (j < el) {
      uint32_t at = pairs + incl_n - n;
      expert_offsets[j] = at;
      tile_offsets[j] = tiles + incl_t - nt;
      for (int s = 0; s < ranks; ++s) {
        seg_local[j * ranks + s] = at;
        at += received_count(msgs, words, first, s, j);
      }
    }
    pairs += __shfl_sync(0xffffffffu, incl_n, 31);
    tiles += __shfl_sync(0xffffffffu, incl_t, 31);
  }
  if (lane == 0) {
    expert_offsets[el] = pairs;
    tile_offsets[el] = tiles;
    src_base[ranks] = base;
  }
}

// Local pair p lies in the last segment that starts at or before p (empty segments share their
// start with the next one, so the last such segment is the non-empty one holding p).
__global__ void receive_dispatch_kernel(const uint32_t *__restrict__ expert_offsets, int el,
                                        const uint32_t *__restrict__ seg_local,
                                        const uint32_t *__restrict__ seg_recv, int segs,
                                        const float *__restrict__ recv_gate,
                                        uint32_t *__restrict__ row_of_pair,
                                        uint32_t *__restrict__ pair_of_row,
                                        float *__restrict__ pair_gate, uint32_t capacity) {
  const uint32_t n = min(expert_offsets[el], capacity);
  for (uint32_t p = blockIdx.x * blockDim.x + threadIdx.x; p < n; p += blockDim.x * gridDim.x) {
    int lo = 0, hi = segs - 1;  // invariant: seg_local[lo] <= p (seg_local[0] == 0)
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (__ldg(seg_local + mid) <= p) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const uint32_t row = __ldg(seg_recv + lo) + (p - __ldg(seg_local + lo));
    // Counts the host did not validate cannot send a write outside the buffers.
    if (row >= capacity) continue;
    row_of_pair[p] = row;
    pair_of_row[row] = p;
    if (recv_gate != nullptr) pair_gate[p] = recv_gate[row];
  }
}

__global__ void permute_32_kernel(const uint32_t *__restrict__ src,
                                  const uint32_t *__restrict__ index, uint32_t *__restrict__ dst,
                                  const uint32_t *__restrict__ count, uint32_t capacity) {
  const uint32_t n = min(*count, capacity);
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    // An index past the buffers (not a permutation of [0, count)) reads nothing.
    const uint32_t j = __ldg(index + i);
    if (j < capacity) dst[i] = __ldg(src + j);
  }
}

int grid_for(long long items, int threads) {
  const long long blocks = (items + threads - 1) / threads;
  return (int)(blocks < 1 ? 1 : blocks > 4096 ? 4096 : blocks);
}

}  // namespace

extern "C" int remoe_ep_count_message(const uint32_t *expert_offsets, remoe_ep_header_t header,
                                      int32_t e, uint32_t *msg, remoe_stream_t stream) {
  const int threads = 256;
  count_message_kernel<<<grid_for(kHeaderWords + (long long)e, threads), threads, 0,
                         (cudaStream_t)stream>>>(expert_offsets, header, e, msg);
  return (int)cudaGetLastError();
}

extern "C" int remoe_ep_receive_dispatch(const uint32_t *msgs, int32_t e, int32_t ranks,
                                         int32_t owner, const float *recv_gate,
                                         uint32_t *expert_offsets, uint32_t *tile_offsets,
                                         uint32_t *src_base, uint32_t *segments,
                                         uint32_t *row_of_pair, uint32_t *pair_of_row,
                                         float *pair_gate, int32_t capacity,
                                         remoe_stream_t stream) {
  const cudaStream_t s = (cudaStream_t)stream;
  const int el = e / ranks;
  receive_plan_kernel<<<1, 32, 0, s>>>(msgs, kHeaderWords + e, owner, el, ranks, expert_offsets,
                                       tile_offsets, src_base, segments, segments + e);
  if (capacity > 0) {
    const int threads = 256;
    receive_dispatch_kernel<<<grid_for(capacity, threads), threads, 0, s>>>(
        expert_offsets, el, segments, segments + e, e, recv_gate, row_of_pair, pair_of_row,
        pair_gate, (uint32_t)capacity);
  }
  return (int)cudaGetLastError();
}

extern "C" int remoe_ep_permute_32(const uint32_t *src, const uint32_t *index, uint32_t *dst,
                                   const uint32_t *count, int32_t capacity,
                                   remoe_stream_t stream) {
  if (capacity == 0) return 0;
  const int threads = 256;
  permute_32_kernel<<<grid_for(capacity, threads), threads, 0, (cudaStream_t)stream>>>(
      src, index, dst, count, (uint32_t)capacity);
  return (int)cudaGetLastError();
}
