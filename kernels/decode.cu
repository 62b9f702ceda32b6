// The small-batch forward (issue 25, docs/DECODE.md): the whole inference forward of the ReLU
// layer at T <= REMOE_DECODE_MAX_TOKENS in one persistent kernel, so that a decode step pays one
// launch instead of the multi-kernel path's seven to nine dependent ones.
//
// Phases (v2, docs/DECODE.md "v2"):
//   1. Router: logits [T, E] = X Wr and the ReLU gates, with the arithmetic of kernels/router.cu
//      (the mma.sync chain of router_mma_kernel where E % 8 == 0, the sequential fmaf chain of
//      router_forward_kernel otherwise), the same non-finite policy and error word. One
//      16-token x 8-expert tile per CTA (CTA u % grid): the CTA's 256 threads stage the tile's X
//      rows and Wr columns in shared memory in one burst of cp.async (256 k per stage, four
//      stages), and one warp runs the tile's chain from shared memory.
//   -- the grid barrier (the only one) --
//   2. Dispatch, redundantly in every CTA: the gates copied into shared memory in one burst, then
//      each expert's tokens as a 64-bit mask (T <= 64), each token's expert count (ballots), the
//      expert offsets (exclusive scan of the counts), the list of experts with tokens and the
//      largest expert's row count. The pair order is the compaction's (experts ascending, tokens
//      ascending within an expert), so pair p of expert e is the (p - off[e])-th set bit of its
//      mask. CTA 0 also writes what the routing statistics kernels write (counts, gate sums,
//      offsets, |A| and the statistics, the adaptive controller's running sum), with their
//      arithmetic, and every CTA writes its share of the pair lists and the pair index, and the
//      (zero) output rows of the tokens without experts.
//   3. Up projection and SwiGLU: units (expert with tokens, 64 columns of F), each computing g
//      and u for all of the expert's tokens (<= 64 rows, mma.sync m16n8k16) and writing act; each
//      finished unit adds 1 to its (expert, split-K range) readiness counter (release).
//   4. Down projection: units (expert, split-K range, 64 columns of H) with the multi-kernel
//      path's split (the host passes its k_splits): y rounded to T where the range is whole, else
//      the range's f32 partial sums in its plane of `partials`. A unit waits (acquire) only for
//      the readiness counter of its (expert, split-K range): the up units whose act columns it
//      reads. The units of both projections are one round-robin sequence over the grid (up units
//      first), so at small T the down units start on CTAs that have no up unit, prefetching their
//      Wd slice into L2 while they wait.
//   5. Combine, per (token, group of 64-column slices of H) by the last down unit to finish one
//      of that token's pieces (an acq_rel counter per (token, group)): out[t] = sum over t's
//      experts ascending of gate * y, where with split-K the combine first makes y from the
//      pair's planes summed in plane order and rounded to T, and writes it (as the multi-kernel
//      path's plane sum does).
//
// Bitwise equality with the multi-kernel path: every output element is computed by the same
// sequence of rounding operations. For the tensor-core GEMMs that is the chain of m16n8k16 steps
// over K in ascending order of 16 (whole k-tiles of 64, zero-filled past K, starting from 0 in
// each split range), which an element's result depends on alone (not on the other rows or
// columns of its tile, nor on the tiling, nor on which CTA or warp runs it): the grouped GEMM
// (kernels/grouped_gemm.cu) and the Hopper one (kernels/hopper_gemm.cu, wgmma's k16 steps) add
// the same products in the same order (docs/SPEC.md; tests/gpu_gemm_paths.rs). The epilogues use
// swiglu.cuh and the GEMMs' rounding of y (pack2), the plane sum is split_k.cu's order and
// rounding (store8's T(sum); store8_widened here), the combine is combine.cu's fmaf chain (the
// token's experts ascending) over y widened from T, the statistics copy compaction.cu's
// expressions. Which CTA does a combine, and when, changes no bit: its order is fixed by the
// dispatch alone.
//
// Synchronisation: `sync` (REMOE_DECODE_SYNC_WORDS u32 of the context, zeroed once at
// allocation, never poisoned) holds the grid barrier's word and two sets of counters.
//
// The grid barrier (after the router) is the flip barrier of cooperative groups: thread 0 of
// each CTA, after __syncthreads, adds 1 to the word (CTA 0 adds 2^31 - (grid - 1)) with
// atom.add.release.gpu; the grid's adds total 2^31, so the last arrival flips bit 31 and leaves
// the low 31 bits as they were (0), whatever the grid. Each CTA's thread 0 polls the word with
// ld.acquire.gpu until bit 31 differs from the value its own add returned, then __syncthreads.
// No counter to reset, no second atomic: every completed launch leaves the low bits at 0, and
// bit 31 flips exactly once per launch. That bit before the flip (every CTA's add returns it:
// the partial sums stay below 2^31) is the launch's parity p.
//
// The counters: set p is this launch's, set 1 - p the previous launch's. Every launch zeroes the
// other set (plain stores, after the barrier; no CTA of this launch touches it), so the next
// launch, whose parity is 1 - p, finds its set zeroed: launches on one stream (or replays of a
// graph) are ordered, so a launch's stores are visible to the next one. A launch never resets
// the set it uses, so no counter is reset while another CTA may still read it. Set 0 is zero at
// allocation for the first launch (parity 0). The parity lives in memory, not in the kernel's
// arguments, so a graph's replays (the same arguments each time) alternate like eager launches,
// and eager launches and replays may interleave; the grid may change from launch to launch (the
// barrier's adds total 2^31 for any grid, and no counter's target depends on the grid). A launch
// the driver refuses never ran and changes nothing. Both sets are fixed in size (512 experts x 4
// split-K ranges of readiness counters, 64 tokens x 16 column groups of combine counters), so the
// buffer is allocated once, when the path is turned on.
//
// Memory ordering. A counter's producer writes its data, __syncthreads (every thread's writes
// before it), then adds with release semantics (red/atom .release.gpu; cumulative: it orders
// the whole CTA's writes that the bar.sync ordered before it). The consumer observes the
// counter's final value with an acquire (ld.acquire.gpu poll, or the acq_rel atomic of the last
// arrival), then __syncthreads, then reads the data through L2 (ld.global.cg, cp.async.cg; never
// the non-coherent read-only path, which only reads X and the weights). Within a launch every
// write to a counter of its set (and to the barrier word) is an atomic read-modify-write (the
// zeroing stores were the previous launch's, ordered before this one by the stream), so the
// value the consumer reads follows every producer's release in observation order (the PTX memory
// model's release sequence through atomics): it has seen all of them. No __threadfence
// (MEMBAR.SC) anywhere; release compiles to MEMBAR.ALL.GPU before the atomic, acquire to a
// strong load (or atomic) followed by an L1 invalidation.
//
// Progress: the grid is launched cooperatively (cudaLaunchKernelEx with
// cudaLaunchAttributeCooperative): the driver runs every CTA at once or fails the launch
// (cudaErrorCooperativeLaunchTooLarge); it never starts a grid that can hang here. The barrier
// needs every CTA; a down unit waits only for up units, which wait for nothing after the
// barrier, and every CTA runs all of its up units before any down unit; the combine waits for
// nothing (the last arrival does it). So every wait ends. The host sizes the grid from
// remoe_decode_max_grid (multiprocessors x the occupancy the runtime reports for this kernel at
// its dynamic shared memory, with the shared-memory carveout at its maximum: the cooperative
// limit), never more, and only on a device with cudaDevAttrCooperativeLaunch. A cooperative
// launch is captured into a CUDA graph as a cooperative kernel node (CUDA 12 and later).
#include "mma_sync.cuh"
#include "gemm_contract.cuh"
#include "relu_gate.cuh"
#include "swiglu.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTokens = REMOE_DECODE_MAX_TOKENS;
constexpr int kMaxExperts = REMOE_DECODE_MAX_EXPERTS;
constexpr int kTileRows = REMOE_GEMM_TILE_ROWS;
constexpr int BK = 64;          // k per pipeline stage, as both expert-GEMM paths
constexpr int kCols = 64;       // output columns per unit: 128-byte rows of every weight
constexpr int kMaxStages = 8;   // cp.async pipeline depth, at most (as shared memory allows)
constexpr int kUpBElems = BK * 2 * kCols;  // B of the up projection: [64 k][64 of Wg | 64 of Wu]
constexpr int kDownBElems = BK * kCols;    // B of the down projection: [64 k][64 of Wd]
constexpr int kMaxSplits = REMOE_DECODE_MAX_SPLITS;  // = capacity.rs's MAX_SPLITS
constexpr int kColGroups = 16;  // combine counters per token (64-column slices of H, modulo)
constexpr int kPrefetchTiles = 8;  // k-tiles of Wd a waiting down unit asks L2 for
static_assert(kCols == BK, "an up unit's 64 columns of act are one k-tile of the down projection");

// The router's staging: per stage 256 k of the tile's 16 X rows (row stride padded by 16 bytes:
// the fragments' reads hit 32 distinct banks) and of its 8 Wr columns.
constexpr int kRK = 256;
constexpr int kRStages = 4;
constexpr int kRXStride = kRK + 8;
constexpr int kRStageElems = 16 * kRXStride + kRK * 8;

// The sync words (see the file comment).
constexpr int kCounterBase = 32;  // the barrier word alone in its 128-byte line
constexpr int kReadyWords = kMaxExperts * kMaxSplits;
constexpr int kDoneWords = kMaxTokens * kColGroups;
constexpr int kParityWords = kReadyWords + kDoneWords;
static_assert(kCounterBase + 2 * kParityWords == REMOE_DECODE_SYNC_WORDS,
              "remoe_kernels.h's REMOE_DECODE_SYNC_WORDS is this layout");

// Shared memory: the dispatch at fixed offsets, then the pipeline (the rest of the dynamic
// shared memory, sized per device by the launcher: Params::pipe_bytes). Dispatch: masks [E]
// u64, offsets [E + 1] u32, the experts with tokens [E] i32, gate sums [E] f32 (CTA 0), experts
// per token [64] u32, the tokens a down unit completed [64] i32, and a few words.
constexpr int kMaskOffset = 0;
constexpr int kOffOffset = kMaskOffset + kMaxExperts * 8;
constexpr int kActiveOffset = kOffOffset + (kMaxExperts + 4) * 4;
constexpr int kSumOffset = kActiveOffset + kMaxExperts * 4;
constexpr int kTokCountOffset = kSumOffset + kMaxExperts * 4;
constexpr int kListOffset = kTokCountOffset + kMaxTokens * 4;
constexpr int kMiscOffset = kListOffset + kMaxTokens * 4;
constexpr int kMiscWords = 8;
constexpr int kDispatchBytes = (kMiscOffset + kMiscWords * 4 + 127) / 128 * 128;
// misc words
constexpr int kNActive = 0;    // experts with tokens
constexpr int kMaxRows = 1;    // the largest expert's token count
constexpr int kListCount = 2;  // entries of the completed-token list
constexpr int kParity = 3;     // the launch's parity
// The pipeline needs two stages of the up projection at 64 rows, and the router's staging.
constexpr int kUpStageMaxBytes = (kUpBElems + kMaxTokens * BK) * 2;
constexpr int kMinPipeBytes = 2 * kUpStageMaxBytes > kRStages * kRStageElems * 2
                                  ? 2 * kUpStageMaxBytes
                                  : kRStages * kRStageElems * 2;
constexpr int kMinSmemBytes = kDispatchBytes + kMinPipeBytes;
// 113 KB: two CTAs on a multiprocessor of 228 KB (each CTA also takes 1 KB of reserved shared
// memory); a larger pipeline would cost the second CTA.
constexpr int kMaxSmemBytes = 113 * 1024;
static_assert(kMaxTokens == 64, "a token set is one 64-bit mask");
static_assert(kMaxExperts % kThreads == 0, "each thread owns kMaxExperts / kThreads experts");

template <typename T>
struct Params {
  const T *x, *wr, *wg, *wu, *wd;  // read-only for the whole kernel
  float *logits, *gates;
  uint32_t *counts;
  float *gate_sums;
  uint32_t *expert_offsets, *tile_offsets, *stats_u32;
  float *stats_f32;
  uint32_t *pair_token;
  float *pair_gate;
  int32_t *pair_index;
  T *act;
  T *y;             // [plane_rows, h]
  float *partials;  // [k_splits, plane_rows, h], k_splits > 1 only
  T *out;
  const double *coeff;  // or null: coeff_value
  double coeff_value;
  double *sparsity_sum;
  uint32_t *sparsity_count;
  uint32_t *error_flags;
  uint32_t *sync;  // REMOE_DECODE_SYNC_WORDS
  int t, h, f, e, k, k_splits, plane_rows;
  int pipe_bytes;  // shared memory after the dispatch
};

// ---- memory helpers ----

__device__ __forceinline__ uint32_t ld_acquire(const uint32_t *p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint32_t atom_add_release(uint32_t *p, uint32_t v) {
  uint32_t old;
  asm volatile("atom.add.release.gpu.global.u32 %0, [%1], %2;\n"
               : "=r"(old)
               : "l"(p), "r"(v)
               : "memory");
  return old;
}

__device__ __forceinline__ uint32_t atom_add_acq_rel(uint32_t *p, uint32_t v) {
  uint32_t old;
  asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], %2;\n"
               : "=r"(old)
               : "l"(p), "r"(v)
               : "memory");
  return old;
}

__device__ __forceinline__ void red_add_release(uint32_t *p, uint32_t v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void prefetch_l2(const void *p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// cp.async.wait_group takes an immediate: the pipelines' depth is chosen at run time.
__device__ __forceinline__ void cp_async_wait_dyn(int n) {
  switch (n) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    default: cp_async_wait<kMaxStages - 2>(); break;
  }
}
static_assert(kMaxStages - 2 == 6, "cp_async_wait_dyn covers every depth");

// Eight f32 values written earlier in this kernel (by any CTA), through L2.
__device__ __forceinline__ void load8_cg(const float *p, float v[8]) {
  const float4 a = __ldcg(reinterpret_cast<const float4 *>(p));
  const float4 b = __ldcg(reinterpret_cast<const float4 *>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
  v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// Eight 16-bit values written earlier in this kernel (by any CTA), through L2, widened to f32.
template <typename T>
__device__ __forceinline__ void load8_cg(const T *p, float v[8]) {
  const uint4 raw = __ldcg(reinterpret_cast<const uint4 *>(p));
  const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_float(e[i]);
}

// common.cuh's store8 (split_k.cu's rounding of the plane sum into y), which also leaves in v
// the stored values widened back to f32: what the multi-kernel path's combine reads from y.
template <typename T>
__device__ __forceinline__ void store8_widened(T *p, float (&v)[8]) {
  uint4 raw;
  T *o = reinterpret_cast<T *>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    o[i] = T(v[i]);
    v[i] = to_float(o[i]);
  }
  *reinterpret_cast<uint4 *>(p) = raw;
}

// ---- the grid barrier (see the file comment); returns the launch's parity ----

__device__ __forceinline__ int grid_barrier(uint32_t *word, int *misc) {
  __syncthreads();  // every thread's writes of the phase before the release below
  if (threadIdx.x == 0) {
    const uint32_t add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1u) : 1u;
    const uint32_t old = atom_add_release(word, add);
    // Bit 31 flips once, when the last CTA arrives; until the next launch nothing flips it
    // back (this is the launch's only grid barrier).
    while (((ld_acquire(word) ^ old) & 0x80000000u) == 0u) __nanosleep(32);
    misc[kParity] = (int)(old >> 31);
  }
  __syncthreads();  // the other threads after thread 0's acquire
  return misc[kParity];
}

// ---- phase 1: the router ----

__device__ __forceinline__ uint32_t lds_u32(const void *p) {
  return *reinterpret_cast<const uint32_t *>(p);
}
__device__ __forceinline__ uint32_t lds_u16(const void *p) {
  return *reinterpret_cast<const unsigned short *>(p);
}

// Chunk c (k from c kRK) of a router tile's operands into a stage: X rows tok0 .. tok0 + 15
// ([16][kRXStride]) and Wr columns e0 .. e0 + 7 ([kRK][8], 16-byte rows), zero past T and past
// H (whole 8-element pieces: H % 8 == 0), as the router's copies zero-fill.
template <typename T>
__device__ __forceinline__ void router_load_chunk(const Params<T> &a, T *stage, int tok0, int e0,
                                                  int c) {
  T *xs = stage;
  T *ws = stage + 16 * kRXStride;
  const int kc = c * kRK;
#pragma unroll
  for (int i = 0; i < 16 * (kRK / 8) / kThreads; ++i) {
    const int id = threadIdx.x + i * kThreads;
    const int r = id / (kRK / 8), cc = id % (kRK / 8);
    const int k = kc + cc * 8;
    const bool ok = tok0 + r < a.t && k < a.h;
    const void *src = a.wr;  // any valid address: nothing is read when !ok
    if (ok) src = a.x + (size_t)(tok0 + r) * a.h + k;
    cp_async16(xs + r * kRXStride + cc * 8, src, ok ? 16 : 0);
  }
#pragma unroll
  for (int i = 0; i < kRK / kThreads; ++i) {
    const int kr = threadIdx.x + i * kThreads;
    const int k = kc + kr;
    const bool ok = k < a.h;
    const void *src = a.wr;
    if (ok) src = a.wr + (size_t)k * a.e + e0;  // E % 8 == 0: 16-byte aligned
    cp_async16(ws + kr * 8, src, ok ? 16 : 0);
  }
}

// E % 8 == 0: router_mma_kernel's arithmetic. There, every logit is the chain of m16n8k16 steps
// over H in steps of 16 from 0 to ceil(H / 64) * 64 (zeros past H). Here each 16-token x
// 8-expert tile is one CTA's (tile u on CTA u % grid: at most one each at T <= 64, E <= 512 on a
// full grid): its 256 threads stage the operands (four stages of 256 k in flight: H <= 1024 in
// one burst) and warp 0 runs the chain from shared memory, the fragments as router.cu's (the
// chain's order is what matters).
template <typename T>
__device__ void router_mma(const Params<T> &a, T *pipe) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int groups = a.e / 8;
  const int units = (a.t + 15) / 16 * groups;
  const int kend = (a.h + BK - 1) / BK * BK;
  const int chunks = (kend + kRK - 1) / kRK;
  for (int u = blockIdx.x; u < units; u += gridDim.x) {
    const int tok0 = u / groups * 16, e0 = u % groups * 8;
#pragma unroll
    for (int s = 0; s < kRStages - 1; ++s) {
      if (s < chunks) router_load_chunk(a, pipe + s * kRStageElems, tok0, e0, s);
      cp_async_commit();
    }
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int c = 0; c < chunks; ++c) {
      cp_async_wait<kRStages - 2>();
      __syncthreads();  // chunk c has landed for every thread; the stage of chunk c - 1 is free
      const int next = c + kRStages - 1;
      if (next < chunks)
        router_load_chunk(a, pipe + (next % kRStages) * kRStageElems, tok0, e0, next);
      cp_async_commit();
      if (warp == 0) {
        const T *xs = pipe + (c % kRStages) * kRStageElems;
        const T *ws = xs + 16 * kRXStride;
        const int steps = min(kRK, kend - c * kRK) / 16;
#pragma unroll 4
        for (int s = 0; s < steps; ++s) {
          // This thread's k, k + 1 and k + 8, k + 9 of rows g and g + 8, and of column g.
          const int k = s * 16 + 2 * q;
          uint32_t af[4], bf[2];
          af[0] = lds_u32(xs + g * kRXStride + k);
          af[1] = lds_u32(xs + (g + 8) * kRXStride + k);
          af[2] = lds_u32(xs + g * kRXStride + k + 8);
          af[3] = lds_u32(xs + (g + 8) * kRXStride + k + 8);
          bf[0] = lds_u16(ws + k * 8 + g) | lds_u16(ws + (k + 1) * 8 + g) << 16;
          bf[1] = lds_u16(ws + (k + 8) * 8 + g) | lds_u16(ws + (k + 9) * 8 + g) << 16;
          mma16816<T>(acc, af, bf);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the stages are free for the next tile (and the dispatch)
    if (warp == 0) {
#pragma unroll
      for (int v = 0; v < 4; ++v)
        (void)relu_gate(acc[v], tok0 + g + (v >> 1) * 8, e0 + 2 * q + (v & 1), a.t, a.e,
                        a.logits, a.gates, a.error_flags);
    }
  }
}

// E % 8 != 0: router_forward_kernel's arithmetic, one thread per (token, expert): the fmaf chain
// over H in order, padded with zeros to a multiple of 32 as the kernel's chunks are.
template <typename T>
__device__ void router_fma(const Params<T> &a) {
  const int kend = (a.h + 31) / 32 * 32;
  for (int i = blockIdx.x * kThreads + threadIdx.x; i < a.t * a.e; i += gridDim.x * kThreads) {
    const int token = i / a.e, expert = i % a.e;
    const T *xr = a.x + (size_t)token * a.h;
    float acc = 0.f;
    for (int k0 = 0; k0 < kend; k0 += 8) {
      float xv[8], wv[8];
      if (k0 < a.h) {
        load8_as_float(xr + k0, xv);
#pragma unroll
        for (int j = 0; j < 8; ++j) wv[j] = to_float(a.wr[(size_t)(k0 + j) * a.e + expert]);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) xv[j] = wv[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) acc = fmaf(xv[j], wv[j], acc);
    }
    (void)relu_gate(acc, token, expert, a.t, a.e, a.logits, a.gates, a.error_flags);
  }
}

// ---- phase 2: the dispatch ----

struct Dispatch {
  uint64_t *mask;    // [E] bit t: token t routes to the expert (gate > 0)
  uint32_t *off;     // [E + 1] expert offsets
  int32_t *active;   // [nactive] the experts with tokens, ascending
  float *gate_sum;   // [E] CTA 0 only
  uint32_t *tokcnt;  // [T] experts per token
  int32_t *list;     // [64] tokens whose combine a down unit completed
  int32_t *misc;     // kNActive, kMaxRows, kListCount, kParity
};

__device__ __forceinline__ Dispatch dispatch_of(unsigned char *smem) {
  Dispatch d;
  d.mask = reinterpret_cast<uint64_t *>(smem + kMaskOffset);
  d.off = reinterpret_cast<uint32_t *>(smem + kOffOffset);
  d.active = reinterpret_cast<int32_t *>(smem + kActiveOffset);
  d.gate_sum = reinterpret_cast<float *>(smem + kSumOffset);
  d.tokcnt = reinterpret_cast<uint32_t *>(smem + kTokCountOffset);
  d.list = reinterpret_cast<int32_t *>(smem + kListOffset);
  d.misc = reinterpret_cast<int32_t *>(smem + kMiscOffset);
  return d;
}

// The r-th set bit (from 0) of m, which has more than r set bits.
__device__ __forceinline__ int nth_set_bit(uint64_t m, int r) {
  int pos = 0;
#pragma unroll
  for (int w = 32; w >= 1; w >>= 1) {
    const int c = __popcll(m & ((1ull << w) - 1ull));
    if (r >= c) {
      r -= c;
      m >>= w;
      pos += w;
    }
  }
  return pos;
}

__device__ __forceinline__ uint64_t below(int token) { return (1ull << token) - 1ull; }

// The gates go to shared memory in bursts of whole tokens (all of them at once unless T E
// floats exceed the pipeline's bytes), each thread then reads its experts' gates in token order.
template <typename T>
__device__ void build_dispatch(const Params<T> &a, const Dispatch &d, float *stage) {
  const bool first = blockIdx.x == 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kPer = kMaxExperts / kThreads;
  uint64_t m[kPer];
  float sum[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) m[j] = 0, sum[j] = 0.f;
  const int per_chunk = max(1, a.pipe_bytes / 4 / a.e);  // tokens per burst
  for (int t0 = 0; t0 < a.t; t0 += per_chunk) {
    const int nt = min(per_chunk, a.t - t0);
    const int n = nt * a.e;
    const float *src = a.gates + (size_t)t0 * a.e;
    if ((a.e & 3) == 0) {
      // 16-byte pieces: the gates are 256-byte aligned and t0 E floats a multiple of 4.
      const float4 *s4 = reinterpret_cast<const float4 *>(src);
      float4 *d4 = reinterpret_cast<float4 *>(stage);
#pragma unroll 4
      for (int i = threadIdx.x; i < n / 4; i += kThreads) d4[i] = __ldcg(s4 + i);
    } else {
#pragma unroll 4
      for (int i = threadIdx.x; i < n; i += kThreads) stage[i] = __ldcg(src + i);
    }
    __syncthreads();
    // The routing statistics' gate sum: router.cu's block_statistics adds the 64 gates of the
    // block in token order from 0.f (those past T are 0.f, which leave a sum that is never -0
    // unchanged); the scan's warp sum adds only 0.f to it (one block of 64 tokens).
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int ex = threadIdx.x + j * kThreads;
      if (ex < a.e) {
#pragma unroll 8
        for (int tt = 0; tt < nt; ++tt) {
          const float gate = stage[tt * a.e + ex];
          m[j] |= (uint64_t)(gate > 0.f) << (t0 + tt);
          sum[j] += gate;
        }
      }
    }
    // Experts per token: a warp per token, a ballot per 32 experts.
    for (int tt = warp; tt < nt; tt += kWarps) {
      uint32_t cnt = 0;
      for (int e0 = 0; e0 < a.e; e0 += 32) {
        const bool on = e0 + lane < a.e && stage[tt * a.e + e0 + lane] > 0.f;
        cnt += (uint32_t)__popc(__ballot_sync(0xffffffffu, on));
      }
      if (lane == 0) d.tokcnt[t0 + tt] = cnt;
    }
    __syncthreads();  // the stage is free for the next burst
  }
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int ex = threadIdx.x + j * kThreads;
    if (ex < a.e) {
      d.mask[ex] = m[j];
      if (first) d.gate_sum[ex] = sum[j];
    }
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    uint32_t pairs = 0, nact = 0, rows = 0;
    for (int base = 0; base < a.e; base += 32) {
      const int i = base + lane;
      const uint32_t n = i < a.e ? (uint32_t)__popcll(d.mask[i]) : 0u;
      const uint32_t on = n > 0u;
      const uint32_t incl = warp_inclusive_scan(n);
      const uint32_t incl_on = warp_inclusive_scan(on);
      if (i < a.e) d.off[i] = pairs + incl - n;
      if (on) d.active[nact + incl_on - 1] = i;
      pairs += __shfl_sync(0xffffffffu, incl, 31);
      nact += __shfl_sync(0xffffffffu, incl_on, 31);
      rows = max(rows, n);
    }
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) rows = max(rows, __shfl_xor_sync(0xffffffffu, rows, s));
    if (lane == 0) {
      d.off[a.e] = pairs;
      d.misc[kNActive] = (int32_t)nact;
      d.misc[kMaxRows] = (int32_t)rows;
      d.misc[kListCount] = 0;
    }
  }
  __syncthreads();
}

// CTA 0, warp 0: compaction.cu's expert_scan and finalize outputs, with finalize's arithmetic
// (the expressions are copied, so that they compile to the same operations).
template <typename T>
__device__ void write_statistics(const Params<T> &a, const Dispatch &d) {
  const int lane = threadIdx.x;
  const int e = a.e, t = a.t, k = a.k;
  uint32_t pairs = 0, tiles = 0;
  double weighted = 0.0;  // sum_e n_e * gate_sums[e]
  for (int base = 0; base < e; base += 32) {
    const int i = base + lane;
    const uint32_t n = i < e ? (uint32_t)__popcll(d.mask[i]) : 0u;
    const uint32_t nt = (n + kTileRows - 1) / kTileRows;
    const uint32_t incl_n = warp_inclusive_scan(n);
    const uint32_t incl_t = warp_inclusive_scan(nt);
    if (i < e) {
      a.counts[i] = n;
      a.gate_sums[i] = d.gate_sum[i];
      a.expert_offsets[i] = pairs + incl_n - n;
      a.tile_offsets[i] = tiles + incl_t - nt;
      // Written as the fma it compiles to, so equality with compaction.cu does not rest on
      // both files being contracted alike.
      weighted = __fma_rn((double)n, (double)d.gate_sum[i], weighted);
    }
    pairs += __shfl_sync(0xffffffffu, incl_n, 31);
    tiles += __shfl_sync(0xffffffffu, incl_t, 31);
  }
  weighted = warp_sum(weighted);
  if (lane == 0) {
    // No overflow: the pair buffers hold T E pairs (the host takes this path only then).
    a.expert_offsets[e] = pairs;
    a.tile_offsets[e] = tiles;
    a.stats_u32[0] = pairs;
    a.stats_u32[1] = tiles;
    // Raised by phase 1's atomics (any CTA, before the barrier): read through L2.
    const uint32_t bad_count = a.error_flags != nullptr ? __ldcg(&a.error_flags[0]) : 0u;
    const uint32_t bad_first = a.error_flags != nullptr ? __ldcg(&a.error_flags[1]) : 0u;
    a.stats_u32[2] = bad_count;
    a.stats_u32[3] = bad_first;
    const double total = (double)t * (double)e;
    const double sparsity = t == 0 ? 1.0 : 1.0 - (double)pairs / total;
    a.stats_f32[0] = (float)sparsity;
    const double coeff = a.coeff != nullptr ? *a.coeff : a.coeff_value;
    a.stats_f32[1] = t == 0 ? 0.f : (float)(coeff * e / ((double)k * t * t) * weighted);
    // The adaptive controller's running sum, as finalize_kernel: one thread, ordered with the
    // other forwards by the stream; nothing after a non-finite logit.
    if (a.sparsity_sum != nullptr && bad_first == 0u) {
      *a.sparsity_sum += sparsity;
      *a.sparsity_count += 1;
    }
  }
}

// Every CTA, a share of the (token, expert) grid: the pair lists and the pair index, as the
// compaction's scatter writes them; and the output rows of the tokens without experts (zero, as
// the combine's empty sum), which no down unit completes.
template <typename T>
__device__ void write_pairs(const Params<T> &a, const Dispatch &d) {
  const int n = a.t * a.e;
  for (int i = blockIdx.x * kThreads + threadIdx.x; i < n; i += gridDim.x * kThreads) {
    const int token = i / a.e, ex = i % a.e;
    const uint64_t m = d.mask[ex];
    const bool on = (m >> token) & 1ull;
    const uint32_t p = d.off[ex] + (uint32_t)__popcll(m & below(token));
    a.pair_index[i] = on ? (int32_t)p : -1;
    if (on) {
      a.pair_token[p] = (uint32_t)token;
      a.pair_gate[p] = __ldcg(a.gates + i);
    }
  }
  for (int token = blockIdx.x; token < a.t; token += gridDim.x) {
    if (d.tokcnt[token] != 0u) continue;
    float zero[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) zero[j] = 0.f;
    for (int c = threadIdx.x; c < a.h / 8; c += kThreads)
      store8(a.out + (size_t)token * a.h + c * 8, zero);
  }
}

// ---- phases 3 to 5: the expert GEMMs and the combine ----

// Swizzled element offsets inside a stage (16-byte chunks XOR-ed with the row, so that
// ldmatrix's eight row reads hit distinct banks). A: [rows][64 k], 128-byte rows. B of the up
// projection: [64 k][128 columns] (64 of Wg, then the same 64 of Wu), 256-byte rows, each half
// swizzled on its own; of the down projection: [64 k][64 columns], 128-byte rows.
__device__ __forceinline__ int a_offset(int row, int chunk) {
  return row * BK + ((chunk ^ (row & 7)) << 3);
}
__device__ __forceinline__ int b_offset_up(int k, int chunk) {
  return k * (2 * kCols) + (((chunk & 8) | ((chunk ^ k) & 7)) << 3);
}
__device__ __forceinline__ int b_offset_down(int k, int chunk) {
  return k * kCols + ((chunk ^ (k & 7)) << 3);
}

// One work unit: an expert with tokens, its rows (pairs) and 64 output columns (slice); for the
// down projection also its split-K range (k-tiles [kt0, kt1) of 64).
struct Unit {
  int expert, rows, slice, split, kt0, kt1;
  uint32_t row_off;
  uint64_t mask;
};

template <typename T>
__device__ __forceinline__ int k_blocks(const Params<T> &a) {
  return (a.f + BK - 1) / BK;
}

// The GEMMs' split-K ranges (gemm_contract.cuh) over the kb k-tiles of F; each holds at least
// one (k_splits <= kb).
template <typename T>
__device__ __forceinline__ int split_begin(const Params<T> &a, int s) {
  return split_k_begin(s, k_blocks(a), a.k_splits);
}

template <bool kUp, typename T>
__device__ __forceinline__ Unit unit_of(const Params<T> &a, const Dispatch &d, int u) {
  Unit w;
  int ai;
  if (kUp) {
    const int slices = (a.f + kCols - 1) / kCols;
    ai = u / slices;
    w.slice = u % slices;
    w.split = 0;
    w.kt0 = 0;
    w.kt1 = (a.h + BK - 1) / BK;
  } else {
    const int slices = (a.h + kCols - 1) / kCols;
    const int per = a.k_splits * slices;
    ai = u / per;
    const int rem = u % per;
    w.split = rem / slices;
    w.slice = rem % slices;
    w.kt0 = split_begin(a, w.split);
    w.kt1 = split_begin(a, w.split + 1);
  }
  w.expert = d.active[ai];
  w.mask = d.mask[w.expert];
  w.rows = __popcll(w.mask);
  w.row_off = d.off[w.expert];
  return w;
}

// The readiness counter of (expert, split-K range): the up units of the expert whose 64 columns
// of act fall in the range add 1 each; complete at kt1 - kt0.
__device__ __forceinline__ uint32_t *ready_counter(uint32_t *set, int expert, int split) {
  return set + expert * kMaxSplits + split;
}
// The combine counter of (token, column group g): the down units of the token's experts whose
// column slice is g modulo kColGroups add 1 each (one per split-K range).
__device__ __forceinline__ uint32_t *done_counter(uint32_t *set, int token, int group) {
  return set + kReadyWords + token * kColGroups + group;
}

// Before a down unit's first copy of act: its readiness counter complete (acquire), the whole
// CTA after it. While it is not, warp 0 asks L2 for the unit's first Wd tiles (which do not
// depend on act), so that the copies after the wait hit L2.
template <typename T>
__device__ void wait_ready(const Params<T> &a, const Unit &w, uint32_t *set) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const uint32_t *ctr = ready_counter(set, w.expert, w.split);
    const uint32_t target = (uint32_t)(w.kt1 - w.kt0);
    uint32_t v = lane == 0 ? ld_acquire(ctr) : 0u;
    v = __shfl_sync(0xffffffffu, v, 0);
    if (v < target) {
      const int k0 = w.kt0 * BK;
      const int kend = min(min(w.kt1, w.kt0 + kPrefetchTiles) * BK, a.f);
      const T *base = a.wd + (size_t)w.expert * a.f * a.h + w.slice * kCols;
      const int last = min(kCols, a.h - w.slice * kCols) - 1;
      for (int k = k0 + lane; k < kend; k += 32) {
        // A row's 64 columns are 128 bytes, 16-byte aligned: one or two lines.
        prefetch_l2(base + (size_t)k * a.h);
        prefetch_l2(base + (size_t)k * a.h + last);
      }
      if (lane == 0)
        while (ld_acquire(ctr) < target) __nanosleep(64);
    }
    __syncwarp();
  }
  __syncthreads();
}

// Enqueues the copies of k-tile kt of unit w into a stage: B first, then A (rows past the unit's
// are zero-filled up to its last 16-row tile; columns and k past the edges too, as the GEMMs'
// copies are). tok: the X rows (tokens) of this thread's A rows (up projection).
template <bool kUp, typename T>
__device__ __forceinline__ void load_tile(const Params<T> &a, T *stage, const Unit &w, int kt,
                                          const int (&tok)[2]) {
  T *bs = stage;
  T *as = stage + (kUp ? kUpBElems : kDownBElems);
  const int k0 = kt * BK;
  const int K = kUp ? a.h : a.f;
  const int mrows = (w.rows + 15) & ~15;
  if (kUp) {
    const size_t base = (size_t)w.expert * a.h * a.f;
#pragma unroll
    for (int i = 0; i < kUpBElems / 8 / kThreads; ++i) {
      const int id = threadIdx.x + i * kThreads;
      const int kr = id >> 4, c = id & 15;
      const int k = k0 + kr, col = w.slice * kCols + (c & 7) * 8;
      const bool ok = k < a.h && col < a.f;
      const T *src = (c < 8 ? a.wg : a.wu) + base + (size_t)k * a.f + col;
      cp_async16(bs + b_offset_up(kr, c), ok ? (const void *)src : a.wg, ok ? 16 : 0);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kDownBElems / 8 / kThreads; ++i) {
      const int id = threadIdx.x + i * kThreads;
      const int kr = id >> 3, c = id & 7;
      const int k = k0 + kr, col = w.slice * kCols + c * 8;
      const bool ok = k < a.f && col < a.h;
      const T *src = a.wd + (size_t)w.expert * a.f * a.h + (size_t)k * a.h + col;
      cp_async16(bs + b_offset_down(kr, c), ok ? (const void *)src : a.wd, ok ? 16 : 0);
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxTokens * 8 / kThreads; ++i) {
    const int r = (threadIdx.x >> 3) + i * (kThreads / 8), c = threadIdx.x & 7;
    if (r < mrows) {
      const int k = k0 + c * 8;
      const bool ok = r < w.rows && k < K;
      const T *src = a.wg;  // any valid address: nothing is read when !ok
      if (ok) {
        src = kUp ? a.x + (size_t)tok[i] * a.h + k
                  : a.act + (size_t)(w.row_off + r) * a.f + k;
      }
      cp_async16(as + a_offset(r, c), src, ok ? 16 : 0);
    }
  }
}

// One k-tile's mma.sync steps: warp w owns the output columns 8 w .. 8 w + 7 of the unit (of g
// and of u for the up projection) for every 16-row tile of the unit's rows.
template <bool kUp, typename T>
__device__ __forceinline__ void mma_tile(const T *stage, int mtiles, float (&acc)[4][2][4]) {
  const T *bs = stage;
  const T *as = stage + (kUp ? kUpBElems : kDownBElems);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (kUp) {
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      // Matrices: k 0-7 and 8-15 of the warp's g columns, then of its u columns.
      uint32_t b[4];
      const int kk = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      ldmatrix_x4_trans(b, bs + b_offset_up(kk, (lane >> 4) ? 8 + warp : warp));
      const uint32_t bg[2] = {b[0], b[1]}, bu[2] = {b[2], b[3]};
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        if (mi < mtiles) {
          uint32_t af[4];
          ldmatrix_x4(af, as + a_offset(mi * 16 + (lane & 15), ks * 2 + (lane >> 4)));
          mma16816<T>(acc[mi][0], af, bg);
          mma16816<T>(acc[mi][1], af, bu);
        }
      }
    }
  } else {
#pragma unroll
    for (int kp = 0; kp < BK / 32; ++kp) {
      // Matrices: k 0-7 and 8-15 of k-step 2 kp, then of k-step 2 kp + 1, the warp's columns.
      uint32_t b[4];
      const int kk = (kp * 2 + (lane >> 4)) * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      ldmatrix_x4_trans(b, bs + b_offset_down(kk, warp));
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int ks = kp * 2 + half;
        const uint32_t bb[2] = {b[2 * half], b[2 * half + 1]};
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
          if (mi < mtiles) {
            uint32_t af[4];
            ldmatrix_x4(af, as + a_offset(mi * 16 + (lane & 15), ks * 2 + (lane >> 4)));
            mma16816<T>(acc[mi][0], af, bb);
          }
        }
      }
    }
  }
}

// A unit's epilogue from the f32 accumulators (m16n8 layout: c0, c1 at row lane / 4, columns
// 2 (lane % 4) + {0, 1}; c2, c3 eight rows below). Up: act = SiLU(g) u (swiglu.cuh) as
// grouped_gemm.cu stores it; down: y rounded to T as the GEMMs' epilogues round it, or with
// split-K the unit's partial sums into its plane.
template <bool kUp, typename T>
__device__ __forceinline__ void epilogue(const Params<T> &a, const Unit &w,
                                         const float (&acc)[4][2][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int mtiles = (w.rows + 15) >> 4;
  const int col = w.slice * kCols + warp * 8 + (lane & 3) * 2;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
    if (mi >= mtiles) continue;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = mi * 16 + (lane >> 2) + half * 8;
      if (r >= w.rows) continue;
      if (kUp) {
        if (col < a.f) {
          const float g0 = acc[mi][0][half * 2], g1 = acc[mi][0][half * 2 + 1];
          const float u0 = acc[mi][1][half * 2], u1 = acc[mi][1][half * 2 + 1];
          *reinterpret_cast<uint32_t *>(a.act + (size_t)(w.row_off + r) * a.f + col) =
              pack2<T>(swiglu<T>(g0, u0), swiglu<T>(g1, u1));
        }
      } else if (col < a.h) {
        const size_t at = (size_t)(w.row_off + r) * a.h + col;
        const float v0 = acc[mi][0][half * 2], v1 = acc[mi][0][half * 2 + 1];
        if (a.k_splits == 1) {
          *reinterpret_cast<uint32_t *>(a.y + at) = pack2<T>(v0, v1);
        } else {
          float *plane = a.partials + (size_t)w.split * a.plane_rows * a.h;
          *reinterpret_cast<float2 *>(plane + at) = make_float2(v0, v1);
        }
      }
    }
  }
}

// The combine of n tokens (list) over the column slices of group g: per (token, 8 columns),
// combine.cu's order (the token's experts ascending, fmaf from 0.f) over y widened from T. With
// split-K, y is made here first as split_k.cu makes it: the planes summed in its order (plane 0,
// then += each further plane), rounded to T by the same conversion (store8_widened), written
// to y (only this thread touches that pair's 8 columns, once) and used as the T values it
// wrote.
template <typename T>
__device__ void combine(const Params<T> &a, const Dispatch &d, const int32_t *list, int n, int g,
                        int nsl) {
  constexpr int kChunks = kCols / 8;
  const int per_token = nsl * kChunks;
  const size_t plane = (size_t)a.plane_rows * a.h;
  const int nact = d.misc[kNActive];
  for (int it = threadIdx.x; it < n * per_token; it += kThreads) {
    const int token = list[it / per_token], rem = it % per_token;
    const int col = (g + rem / kChunks * kColGroups) * kCols + rem % kChunks * 8;
    if (col >= a.h) continue;
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = 0.f;
    for (int ai = 0; ai < nact; ++ai) {
      const int ex = d.active[ai];
      const uint64_t m = d.mask[ex];
      if (!((m >> token) & 1ull)) continue;
      const uint32_t p = d.off[ex] + (uint32_t)__popcll(m & below(token));
      const float gate = __ldcg(a.gates + (size_t)token * a.e + ex);
      T *row = a.y + (size_t)p * a.h + col;
      float v[8];
      if (a.k_splits == 1) {
        load8_cg(row, v);
      } else {
        const float *part = a.partials + (size_t)p * a.h + col;
        float more[kMaxSplits - 1][8];
        load8_cg(part, v);
#pragma unroll
        for (int s = 1; s < kMaxSplits; ++s)
          if (s < a.k_splits) load8_cg(part + s * plane, more[s - 1]);
#pragma unroll
        for (int s = 1; s < kMaxSplits; ++s)
          if (s < a.k_splits) {
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] += more[s - 1][j];
          }
        store8_widened(row, v);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] = fmaf(gate, v[j], acc[j]);
    }
    store8(a.out + (size_t)token * a.h + col, acc);
  }
}

// After a down unit's epilogue (and the __syncthreads that follows it): one arrival per row on
// the (token, column group) counters (acq_rel: the release orders this CTA's y rows or planes,
// the acquire lets the last arrival read everyone's); the tokens whose count this unit
// completed are combined here, by this CTA.
template <typename T>
__device__ void finish_down(const Params<T> &a, const Dispatch &d, const Unit &w, uint32_t *set) {
  const int slices = (a.h + kCols - 1) / kCols;
  const int g = w.slice % kColGroups;
  const int nsl = (slices - g + kColGroups - 1) / kColGroups;  // slices of group g
  if ((int)threadIdx.x < w.rows) {
    const int token = nth_set_bit(w.mask, threadIdx.x);
    const uint32_t target = d.tokcnt[token] * (uint32_t)(a.k_splits * nsl);
    const uint32_t old = atom_add_acq_rel(done_counter(set, token, g), 1u);
    if (old + 1u == target) d.list[atomicAdd(&d.misc[kListCount], 1)] = token;
  }
  __syncthreads();  // the list, and the other threads after the winners' acquire
  const int n = d.misc[kListCount];
  if (n > 0) {
    combine(a, d, d.list, n, g, nsl);
    __syncthreads();  // everyone has read the list
    if (threadIdx.x == 0) d.misc[kListCount] = 0;
  }
}

// A GEMM phase: this CTA's units as one stream of k-tiles through the cp.async pipeline, the
// copies running up to nst - 1 tiles ahead across unit boundaries. The units of both phases are
// one round-robin sequence over the grid, the up units first: up unit u and down unit u - U (U
// up units) run on CTA u % grid. The depth follows the stage size: B plus the A rows of the
// largest expert (16-row tiles), as many stages as the pipeline's bytes hold, up to kMaxStages.
template <bool kUp, typename T>
__device__ void gemm_phase(const Params<T> &a, const Dispatch &d, T *pipe, uint32_t *set) {
  const int nact = d.misc[kNActive];
  const int up_units = nact * ((a.f + kCols - 1) / kCols);
  const int units = kUp ? up_units : nact * a.k_splits * ((a.h + kCols - 1) / kCols);
  const int grid = gridDim.x;
  const int first = kUp ? (int)blockIdx.x : ((int)blockIdx.x - up_units % grid + grid) % grid;
  if (first >= units) return;  // uniform
  const int mt_cap = max(1, (d.misc[kMaxRows] + 15) >> 4);
  const int stage_elems = (kUp ? kUpBElems : kDownBElems) + mt_cap * 16 * BK;
  const int nst = min(kMaxStages, a.pipe_bytes / (stage_elems * 2));

  int lu = first, lkt = 0;  // the next tile to load
  Unit lw = unit_of<kUp>(a, d, lu);
  int ltok[2] = {0, 0};
  auto start_unit = [&]() {
    lkt = lw.kt0;
    if (kUp) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = (threadIdx.x >> 3) + i * (kThreads / 8);
        ltok[i] = r < lw.rows ? nth_set_bit(lw.mask, r) : 0;
      }
    }
  };
  start_unit();
  auto load_next = [&](int stage) {
    if (lu < units) {
      if (!kUp && lkt == lw.kt0) wait_ready(a, lw, set);  // uniform: a __syncthreads inside
      load_tile<kUp>(a, pipe + stage * stage_elems, lw, lkt, ltok);
      if (++lkt == lw.kt1) {
        lu += grid;
        if (lu < units) {
          lw = unit_of<kUp>(a, d, lu);
          start_unit();
        }
      }
    }
    cp_async_commit();
  };
  for (int s = 0; s < nst - 1; ++s) load_next(s);

  float acc[4][2][4];
  int stage = 0;
  for (int cu = first; cu < units; cu += grid) {
    const Unit w = unit_of<kUp>(a, d, cu);
    const int mtiles = (w.rows + 15) >> 4;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;
    for (int kt = w.kt0; kt < w.kt1; ++kt) {
      cp_async_wait_dyn(nst - 2);
      __syncthreads();  // this tile has landed for every thread; the previous stage is free
      load_next(stage == 0 ? nst - 1 : stage - 1);
      mma_tile<kUp>(pipe + stage * stage_elems, mtiles, acc);
      stage = stage + 1 == nst ? 0 : stage + 1;
    }
    epilogue<kUp>(a, w, acc);
    __syncthreads();  // the unit's outputs, every thread's, before the release below
    if (kUp) {
      if (threadIdx.x == 0) {
        // The split-K range that holds k-tile w.slice of the down projection.
        int s = 0;
        while (s + 1 < a.k_splits && w.slice >= split_begin(a, s + 1)) ++s;
        red_add_release(ready_counter(set, w.expert, s), 1u);
      }
    } else {
      finish_down(a, d, w, set);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages are free for the next phase
}

// ---- the kernel ----

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) decode_forward_kernel(const Params<T> a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Dispatch d = dispatch_of(smem);
  T *pipe = reinterpret_cast<T *>(smem + kDispatchBytes);

  if (a.e % 8 == 0) router_mma<T>(a, pipe);
  else router_fma<T>(a);
  const int parity = grid_barrier(a.sync, d.misc);
  uint32_t *set = a.sync + kCounterBase + parity * kParityWords;
  {
    // The previous launch's set, zeroed for the next launch (see the file comment).
    uint32_t *other = a.sync + kCounterBase + (1 - parity) * kParityWords;
    for (int i = blockIdx.x * kThreads + threadIdx.x; i < kParityWords; i += gridDim.x * kThreads)
      other[i] = 0u;
  }

  build_dispatch<T>(a, d, reinterpret_cast<float *>(pipe));
  if (blockIdx.x == 0 && threadIdx.x < 32) write_statistics<T>(a, d);
  write_pairs<T>(a, d);

  gemm_phase<true>(a, d, pipe, set);
  gemm_phase<false>(a, d, pipe, set);
}

// The dynamic shared memory of the kernel on `device`: two CTAs per multiprocessor where that
// leaves the pipeline its minimum (one otherwise), at most kMaxSmemBytes; 0 where even one CTA
// does not fit.
__host__ cudaError_t smem_bytes(int device, int *bytes) {
  *bytes = 0;
  int per_sm = 0, optin = 0, reserved = 0;
  cudaError_t err =
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device);
  if (err != cudaSuccess) return err;
  int b = per_sm / 2 - reserved;
  if (b < kMinSmemBytes) b = per_sm - reserved;
  b = b < optin ? b : optin;
  b = b < kMaxSmemBytes ? b : kMaxSmemBytes;
  b &= ~127;
  *bytes = b >= kMinSmemBytes ? b : 0;
  return cudaSuccess;
}

// Set before the occupancy query and before every launch: the attributes belong to the current
// device. The carveout at its maximum makes the occupancy the runtime reports the one the
// cooperative launch is checked against.
template <typename T>
cudaError_t set_attributes(int bytes) {
  auto kernel = decode_forward_kernel<T>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                              (int)cudaSharedmemCarveoutMaxShared);
}

// A failed runtime call also leaves its error as the thread's last error, which the next
// launcher's cudaGetLastError would report as its own: clear it before returning the code.
__host__ __forceinline__ int failed(cudaError_t err) {
  (void)cudaGetLastError();
  return (int)err;
}

template <typename T>
int max_grid(int32_t *grid) {
  *grid = 0;
  int device = 0, cooperative = 0, sms = 0, per_sm = 0, bytes = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return failed(err);
  err = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  if (err != cudaSuccess) return failed(err);
  if (cooperative == 0) return 0;  // no cooperative launch: the path is off (grid 0)
  err = smem_bytes(device, &bytes);
  if (err != cudaSuccess) return failed(err);
  if (bytes == 0) return 0;  // not enough shared memory: the path is off (grid 0)
  err = set_attributes<T>(bytes);
  if (err != cudaSuccess) return failed(err);
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return failed(err);
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decode_forward_kernel<T>, kThreads,
                                                      (size_t)bytes);
  if (err != cudaSuccess) return failed(err);
  *grid = sms * per_sm;
  return 0;
}

template <typename T>
int launch(const remoe_decode_args_t *c, cudaStream_t stream) {
  if (c == nullptr || c->t < 0 || c->t > kMaxTokens || c->e < 1 || c->e > kMaxExperts ||
      c->h < 8 || c->h % 8 != 0 || c->f < 8 || c->f % 8 != 0 || c->k < 1 || c->k_splits < 1 ||
      c->k_splits > kMaxSplits || c->k_splits > (c->f + BK - 1) / BK ||
      c->plane_rows < c->t * c->e || c->grid < 1 ||
      (c->k_splits > 1 && c->partials == nullptr))
    return (int)cudaErrorInvalidValue;
  int device = 0, bytes = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return failed(err);
  err = smem_bytes(device, &bytes);
  if (err != cudaSuccess) return failed(err);
  if (bytes == 0) return (int)cudaErrorInvalidValue;  // max_grid reported 0: never launched
  err = set_attributes<T>(bytes);
  if (err != cudaSuccess) return failed(err);
  Params<T> a;
  a.x = reinterpret_cast<const T *>(c->x);
  a.wr = reinterpret_cast<const T *>(c->wr);
  a.wg = reinterpret_cast<const T *>(c->wg);
  a.wu = reinterpret_cast<const T *>(c->wu);
  a.wd = reinterpret_cast<const T *>(c->wd);
  a.logits = c->logits;
  a.gates = c->gates;
  a.counts = c->counts;
  a.gate_sums = c->gate_sums;
  a.expert_offsets = c->expert_offsets;
  a.tile_offsets = c->tile_offsets;
  a.stats_u32 = c->stats_u32;
  a.stats_f32 = c->stats_f32;
  a.pair_token = c->pair_token;
  a.pair_gate = c->pair_gate;
  a.pair_index = c->pair_index;
  a.act = reinterpret_cast<T *>(c->act);
  a.y = reinterpret_cast<T *>(c->y);
  a.partials = c->partials;
  a.out = reinterpret_cast<T *>(c->out);
  a.coeff = c->coeff;
  a.coeff_value = c->coeff_value;
  a.sparsity_sum = c->sparsity_sum;
  a.sparsity_count = c->sparsity_count;
  a.error_flags = c->error_flags;
  a.sync = c->barrier;
  a.t = c->t;
  a.h = c->h;
  a.f = c->f;
  a.e = c->e;
  a.k = c->k;
  a.k_splits = c->k_splits;
  a.plane_rows = c->plane_rows;
  a.pipe_bytes = bytes - kDispatchBytes;
  // Cooperative: every CTA resident at once, or no launch at all (see the file comment). A
  // grid above the device's cooperative limit (multiprocessors x occupancy, fewer where MPS or
  // a tool leaves fewer) is cudaErrorCooperativeLaunchTooLarge, returned like any launch error.
  cudaLaunchAttribute attrs[1] = {};
  attrs[0].id = cudaLaunchAttributeCooperative;
  attrs[0].val.cooperative = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((unsigned)c->grid);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = (size_t)bytes;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = 1;
  // An error left by an earlier call (another library's, say) is returned before launching, not
  // after: so a non-zero code always means that this kernel was not queued, which the caller's
  // fallback to the multi-kernel path relies on (src/decode.rs, "A refused launch"); returned
  // after a successful launch it would make the kernel and the chain both run.
  const cudaError_t stale = cudaGetLastError();
  if (stale != cudaSuccess) return (int)stale;
  const cudaError_t launched = cudaLaunchKernelEx(&config, decode_forward_kernel<T>, a);
  // Read (and clear) the last error in either case, so that a failed launch is not reported
  // again by the next launcher.
  const cudaError_t last = cudaGetLastError();
  return (int)(launched != cudaSuccess ? launched : last);
}

}  // namespace

extern "C" int remoe_decode_max_grid_bf16(int32_t *grid) { return max_grid<__nv_bfloat16>(grid); }
extern "C" int remoe_decode_max_grid_f16(int32_t *grid) { return max_grid<__half>(grid); }

extern "C" int remoe_decode_forward_bf16(const remoe_decode_args_t *args, remoe_stream_t stream) {
  return launch<__nv_bfloat16>(args, (cudaStream_t)stream);
}
extern "C" int remoe_decode_forward_f16(const remoe_decode_args_t *args, remoe_stream_t stream) {
  return launch<__half>(args, (cudaStream_t)stream);
}
