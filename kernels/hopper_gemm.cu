// Grouped expert GEMMs for Hopper (sm_90a): wgmma from shared memory, warp specialisation,
// mbarrier pipelines and persistent CTAs. The same five GEMMs as kernels/grouped_gemm.cu (the
// mma.sync path, kept for sm_80/86/89 and forced on Hopper by the tests), with the same
// launcher contract (remoe_kernels.h, and gemm_contract.cuh for what both paths share inside),
// so the Rust layer picks a path per device.
//
// One CTA = one producer warpgroup and two consumer warpgroups (384 threads, one CTA per SM).
// Persistent: the grid is at most one CTA per SM; the tile count is read from device memory
// (tile_offsets[E] row tiles of 128 rows times the column tiles), so the grid never depends on
// the routing. The row GEMMs take their units in order from a device-side counter (the
// launch's `sched`, row_gemm_producer says why); the weight gradients walk theirs statically,
// blockIdx.x, blockIdx.x + gridDim.x, ... The producer runs ahead of the consumers across tile
// boundaries, so the next tile's operands load while the consumers run the current tile's
// epilogue.
//
// Shared memory holds kStages stages of {A tile 128 x 64, B tile 64 x 256}, bf16/f16, each in
// the 128-byte swizzled layout wgmma reads ("atoms" of 8 rows x 128 bytes, 16-byte chunk c of row
// r stored at chunk c ^ (r & 7)). Two barriers per stage: `full` (the stage is loaded) and
// `empty` (both consumer warpgroups are done with it).
//
// Operand loading, the part that differs between the GEMMs:
// - B (the expert weights, fixed shapes) comes by TMA from a 3-D tensor map [E][rows][cols], so
//   rows or columns past an expert's edge are zero-filled by the copy engine rather than read
//   from the next expert.
// - A (rows of routed pairs) comes through cp.async from the producer warpgroup's 128 threads:
//   the up projection gathers X's rows, and dAct dOut's, through pair_token inside the load (no
//   permuted copy), and every row past the expert's last pair is zero-filled. Each producer thread's arrival on
//   the stage's `full` barrier is made by the hardware when its copies land
//   (cp.async.mbarrier.arrive), so every stage can be in flight at once; the consumers order
//   those generic-proxy writes before their wgmma reads with fence.proxy.async.
// - The weight gradients (reduction over an expert's pairs, K = n_e) load each full block of 64
//   pairs by TMA (both operands, or only B, R act or dg or du, when A is dOut or X gathered
//   through pair_token, which goes through cp.async), and an expert's last, partial block
//   through cp.async, whose zero fill stops the reduction exactly at the expert's edge.
//
// Epilogues work on the f32 accumulators in registers: SwiGLU (up), y rounded to the element type
// (down; f32 partial sums under split-K), SwiGLU's backward from the saved g and u (dAct), plain
// store (dX), and the f32 weight-gradient store or accumulate, which goes through shared memory so
// that each warp writes whole row segments (store_weight_grad_tile says why;
// store_weight_grad_tile_transposed stores dWd's tiles, which are computed transposed, into out's
// rows the same way). The wgmma accumulator layout puts column n and n + 128 of an m64n256 tile in
// the same thread, which is why the up projection's B tile holds 128 columns of Wg then the same
// 128 columns of Wu: each thread owns g and u of the same outputs.
#include <atomic>
#include <cuda.h>

#include <type_traits>

#include "gemm_contract.cuh"
#include "ptx_sm90.cuh"
#include "swiglu.cuh"
#include "weight_grad_split.cuh"

namespace {

constexpr int BM = 128;  // rows (pairs) per tile: two consumer warpgroups of 64
static_assert(BM == REMOE_GEMM_TILE_ROWS, "a row tile is one CTA tile");
constexpr int BN = 256;  // B columns per tile (the up projection: 128 of Wg, 128 of Wu)
constexpr int BK = 64;   // k per stage: one 128-byte swizzle atom of 16-bit values
constexpr int kStages = 4;
constexpr int kThreads = 384;
constexpr int kATileBytes = BM * BK * 2;
constexpr int kBTileBytes = BN * BK * 2;
constexpr int kStageBytes = kATileBytes + kBTileBytes;
constexpr int kAtomBytes = 64 * 128;  // one [64 rows][64 values] block of the swizzled layout
constexpr int kBarrierBytes = 2 * kStages * 8;
// Dynamic shared memory: the stages (1024-byte aligned, as the swizzle atoms need) + barriers.
constexpr int kSmemBytes = kStages * kStageBytes + kBarrierBytes + 1024;
// The row GEMMs add, after the barriers, the unit each stage begins (row_gemm_producer).
constexpr int kRowGemmSmemBytes = kSmemBytes + kStages * 4;
static_assert(kRowGemmSmemBytes + 1024 <= 227 * 1024, "the row GEMMs' shared memory must fit");
// The weight gradients' store goes through shared memory, kStagedRows rows of the f32 tile at a
// time, after the barriers (store_weight_grad_tile). With the kernel's 1 KB of static shared
// memory this is all but the last 1 KB of the 227 KB a CTA may have.
constexpr int kStagedRows = 32;
constexpr int kWeightGradSmemBytes = kSmemBytes + kStagedRows * BN * 4;
static_assert(kWeightGradSmemBytes + 1024 <= 227 * 1024, "the staging buffer must fit");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Byte offset of 16-byte chunk `chunk` (of 8 per row) of row `row` in a swizzled atom.
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return (uint32_t)(row * 128 + ((chunk ^ (row & 7)) << 4));
}

// The accumulators of an m64nN wgmma give lane q of each quad (lane & 3) columns 8 j + 2 q and
// 8 j + 2 q + 1 of its row, for every j: 4-byte pieces, so a warp's stores would touch 8 rows x
// 16 bytes each. Within the four j's of group `jg` (columns 32 jg .. 32 jg + 31), this trades
// values among the quad so that lane q ends up with the 8 consecutive columns 32 jg + 8 q + 0..7
// (16-byte stores and loads, 64 contiguous bytes per row and warp instruction). `half` picks
// row lane/4 (0) or lane/4 + 8 (1). Only shuffles and selects: no shared memory.
__device__ __forceinline__ void quad_columns(const float (&acc)[128], int jg, int half,
                                             float (&out)[8]) {
  const int q = threadIdx.x & 3;
  const int quad_base = (threadIdx.x & 31) & ~3;
  float x[4], y[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[i] = acc[4 * (4 * jg + i) + 2 * half];
    y[i] = acc[4 * (4 * jg + i) + 2 * half + 1];
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    // Round r: lane q reads from lane (q + r) & 3 the pair that lane holds for j = 4 jg + q.
    const int give = (q - r) & 3;
    float sx = x[0], sy = y[0];
#pragma unroll
    for (int i = 1; i < 4; ++i) {
      if (give == i) {
        sx = x[i];
        sy = y[i];
      }
    }
    const int from = (q + r) & 3;
    const float rx = __shfl_sync(0xffffffffu, sx, quad_base | from);
    const float ry = __shfl_sync(0xffffffffu, sy, quad_base | from);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (from == i) {
        out[2 * i] = rx;
        out[2 * i + 1] = ry;
      }
    }
  }
}

// The pipeline position shared by the producer and the consumers: stage and barrier parity of
// the n-th k-block this CTA handles (counted across tiles).
struct PipePos {
  int n = 0;
  __device__ __forceinline__ int stage() const { return n % kStages; }
  __device__ __forceinline__ int parity() const { return (n / kStages) & 1; }
};

// The stages and their barriers, laid out and initialised the same way by both kernels.
// `full`: the stage is loaded (129 arrivals: each producer thread's cp.async.mbarrier.arrive, and
// thread 0 once more, with the TMA's byte count or plainly). `empty`: both consumer warpgroups
// are done with it (one arrival per consumer warp).
struct Pipeline {
  uint8_t *smem;  // kStages stages of kStageBytes (A tile, then B tile), 1024-byte aligned
  uint64_t *full;
  uint64_t *empty;

  __device__ __forceinline__ uint32_t a_tile(PipePos pos) const {
    return smem_u32(smem + pos.stage() * kStageBytes);
  }
  __device__ __forceinline__ uint32_t b_tile(PipePos pos) const {
    return a_tile(pos) + kATileBytes;
  }
  // The first byte past the barriers, where a kernel's extra shared memory begins.
  __device__ __forceinline__ uint8_t *end() const {
    return reinterpret_cast<uint8_t *>(empty + kStages);
  }
  __device__ __forceinline__ uint32_t full_bar(PipePos pos) const {
    return smem_u32(&full[pos.stage()]);
  }
  // Producer: waits until the consumers have released the stage (passes at once on the first
  // round: waiting for the parity before a fresh barrier's phase 0 succeeds immediately).
  __device__ __forceinline__ void acquire(PipePos pos) const {
    mbar_wait(smem_u32(&empty[pos.stage()]), pos.parity() ^ 1);
  }
  // Consumer: waits until the stage is loaded, and orders its cp.async (generic-proxy) writes
  // before the wgmma reads that follow.
  __device__ __forceinline__ void wait_loaded(PipePos pos) const {
    mbar_wait(full_bar(pos), pos.parity());
    fence_proxy_async();
  }
  // Consumer, after its wgmmas on the stage have completed: one arrival per warp.
  __device__ __forceinline__ void release(PipePos pos) const {
    if ((threadIdx.x & 31) == 0) mbar_arrive(smem_u32(&empty[pos.stage()]));
  }
};

// Aligns the dynamic shared memory, initialises the barriers and makes them visible to the CTA.
__device__ __forceinline__ Pipeline setup_pipeline(uint8_t *smem_raw) {
  Pipeline p;
  p.smem = reinterpret_cast<uint8_t *>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                       ~(uintptr_t)1023);
  p.full = reinterpret_cast<uint64_t *>(p.smem + kStages * kStageBytes);
  p.empty = p.full + kStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(smem_u32(&p.full[s]), 128 + 1);
      mbar_init(smem_u32(&p.empty[s]), 8);
    }
    fence_mbarrier_init();
  }
  __syncthreads();
  return p;
}

// One consumer warpgroup's MMAs on one stage: four k16 steps of m64n256k16, accumulating into acc
// unless `overwrite` (the first stage of a tile). a and b are the warpgroup's operand tiles; a
// K-major operand advances 32 bytes per k16 step inside its 128-byte rows, an MN-major one 16
// rows (2048 bytes), its 64-column atoms kAtomBytes apart. Returns once the MMAs have completed,
// so the stage can be released.
template <typename T, int kAMNMajor, int kBMNMajor>
__device__ __forceinline__ void mma_stage(float (&acc)[128], uint32_t a, uint32_t b,
                                          bool overwrite) {
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < BK / 16; ++ks) {
    const uint64_t da =
        kAMNMajor ? smem_desc(a + ks * 2048, kAtomBytes, 1024) : smem_desc(a + ks * 32, 16, 1024);
    const uint64_t db =
        kBMNMajor ? smem_desc(b + ks * 2048, kAtomBytes, 1024) : smem_desc(b + ks * 32, 16, 1024);
    Wgmma<T>::template mma<kAMNMajor, kBMNMajor>(acc, da, db, !overwrite || ks > 0);
  }
  wgmma_commit();
  wgmma_wait0();
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// ---------------------------------------------------------------------------------------------
// Row-tile GEMMs: out[rows of expert e, :] = A[rows, :] . B_e (up, down, dAct, dX).

// One unit of a row GEMM's persistent work: a (row tile, column tile) and one of its K ranges.
struct RowUnit {
  int expert, row0, rows, col_tile, split, kb_begin, kb_end;
};

// Unit `unit` in the order the scheduler hands them out (take_row_unit); k_blocks counts every K
// block of the tile (both segments of dX). Split fastest, then the column tile, so that the CTAs
// sharing an output tile, and then those sharing a row tile's A rows, run side by side.
template <typename T, int kMode>
__device__ __forceinline__ RowUnit row_unit(const RowGemmParams<T, kMode> &args, int unit,
                                           int k_blocks) {
  RowUnit u;
  u.split = unit % args.k_splits;
  const int tile = unit / args.k_splits;
  const int row_tile = tile / args.col_tiles;
  u.col_tile = tile - row_tile * args.col_tiles;
  const RowTile t = args.tiles.at(args.e, row_tile);
  u.expert = t.expert;
  u.row0 = t.row0;
  u.rows = t.rows;
  u.kb_begin = split_k_begin(u.split, k_blocks, args.k_splits);
  u.kb_end = split_k_begin(u.split + 1, k_blocks, args.k_splits);
  return u;
}

// Each mode's B operand and output in this path's terms.
template <int kMode>
struct RowGemmTraits {
  // B stored [k rows][n] per expert (the forward's Wg, Wu, Wd): MN-major for wgmma.
  static constexpr bool kBMNMajor = !ModeTraits<kMode>::kBNMajor;
  // Output columns per tile: the up projection's 256 B columns are 128 of Wg and 128 of Wu.
  static constexpr int kOutCols = out_cols<kMode>(BN);
  static constexpr int kSegments = ModeTraits<kMode>::kSegments;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Loads one stage's B tile by TMA. MN-major: four [64 k][64 n] boxes; K-major: one [256 n][64 k].
template <int kMode>
__device__ __forceinline__ void load_b_stage(uint32_t b_smem, const CUtensorMap *map0,
                                             const CUtensorMap *map1, uint32_t bar, int segment,
                                             int expert, int out_col0, int k0) {
  if constexpr (kMode == kUpSwiGLU) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      tma_load_3d(b_smem + j * kAtomBytes, j < 2 ? map0 : map1, bar, out_col0 + (j & 1) * 64, k0,
                  expert);
  } else if constexpr (kMode == kDown) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      tma_load_3d(b_smem + j * kAtomBytes, map0, bar, out_col0 + j * 64, k0, expert);
  } else {
    tma_load_3d(b_smem, segment == 0 ? map0 : map1, bar, k0, out_col0, expert);
  }
}

// Barrier 2 over the producer warpgroup (0 is __syncthreads', 1 the consumers' consumer_sync).
__device__ __forceinline__ void producer_sync() { named_barrier_sync<2, 128>(); }

// The row GEMMs' scheduler: the next unit, or -1 when none is left. Called by the producer's
// thread 0 alone, which takes units until its first -1 and then takes no more.
//
// One counter, sched[0], hands the units out in order, so that the units in flight at any
// moment are a window of about one grid's worth whatever each CTA's pace: the column tiles of
// a row tile (adjacent units, row_unit) run at about the same time, and the row tile's A rows
// (gathered through pair_token) come from HBM once and from L2 for the others. A static walk
// (blockIdx.x, blockIdx.x + gridDim.x, ...) has that window only at the start: under ncu at
// SM30's shape the CTAs drifted apart over its ~60 rounds, and the up projection read 7.49 GB
// from DRAM for at most 3.19 GB of operands (dX 4.39 GB for 1.6 GB, down 3.26 GB for 0.8 GB).
//
// The counter is back at zero when the launch ends, for the next launch, with nothing from the
// host (the layer is captured in CUDA graphs and stays free of synchronisation): sched[1]
// counts the CTAs that have taken their last unit, and the last of them clears both words.
// Every CTA takes exactly one past the end (its producer stops there), and touches sched[0] no
// more after its increment of sched[1]; the fence before that increment orders it after the
// CTA's last atomic on sched[0], and the fence after the last increment orders the clear after
// all of them. So when the clear runs, every atomic of this launch on either word has landed,
// and none follows. No CTA waits for another, so this holds whether or not the whole grid is
// resident at once. What it needs is that the next launch on the same words starts after this
// one has ended: launches sharing a `sched` must be stream-ordered (one buffer per context,
// whose launches are on one stream; never one buffer for launches that may overlap). A launch
// that dies midway leaves the words dirty, but also its context unusable (a sticky error).
__device__ __forceinline__ int take_row_unit(uint32_t *sched, int total_units) {
  const uint32_t unit = atomicAdd(&sched[0], 1u);
  if (unit < (uint32_t)total_units) return (int)unit;
  __threadfence();
  if (atomicAdd(&sched[1], 1u) == gridDim.x - 1) {
    __threadfence();
    sched[0] = 0;
    sched[1] = 0;
  }
  return -1;
}

// The consumers learn each unit from its first stage: thread 0 writes the unit into
// unit_of_stage[stage] for the first K block of a unit, after acquiring the stage (so the
// consumers have read what that slot held before: they read it before releasing the stage) and
// before its arrival on the stage's `full` barrier, whose release the consumers' wait acquires.
// Once no unit is left, one more stage carries -1 and no data, and the consumers stop there.
template <typename T, int kMode>
__device__ __forceinline__ void row_gemm_producer(const RowGemmParams<T, kMode> &args,
                                                  const Pipeline &pipe, int *unit_of_stage,
                                                  const CUtensorMap *map0, const CUtensorMap *map1,
                                                  int total_tiles) {
  // Thread 0's unit for the warpgroup, by tile parity: thread 0 writes slot t & 1 after the
  // barrier of tile t - 1, which no thread passes before it has read slot (t - 2) & 1.
  __shared__ int taken[2];
  using Tr = RowGemmTraits<kMode>;
  const int pt = threadIdx.x;    // 0..127
  const int chunk = pt & 7;      // this thread's 16-byte chunk of each of its rows
  const int row_base = pt >> 3;  // rows row_base + 16 i, i = 0..7
  const int K = args.K;
  const int k_blocks = (K + BK - 1) / BK;
  PipePos pos;
  for (int t = 0;; ++t) {
    if (pt == 0) taken[t & 1] = take_row_unit(args.sched, total_tiles);
    producer_sync();
    const int unit = taken[t & 1];
    if (unit < 0) break;
    const RowUnit u = row_unit(args, unit, k_blocks * Tr::kSegments);
    const int expert = u.expert, row0 = u.row0, rows = u.rows, col_tile = u.col_tile;
    uint32_t src_row[8];
    uint32_t row_ok = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = row_base + 16 * i;
      const bool ok = r < rows;
      row_ok |= (uint32_t)ok << i;
      src_row[i] =
          ok ? (args.a.gather != nullptr ? args.a.gather[row0 + r] : (uint32_t)(row0 + r)) : 0u;
    }
    for (int kb = u.kb_begin; kb < u.kb_end; ++kb) {
      const int segment = kb >= k_blocks ? 1 : 0;
      const int k0 = (kb - segment * k_blocks) * BK;
      pipe.acquire(pos);
      if (pt == 0 && kb == u.kb_begin) unit_of_stage[pos.stage()] = unit;
      const uint32_t a_smem = pipe.a_tile(pos);
      const T *a = segment == 0 ? args.a.rows : args.a.rows2;
      const bool k_ok = k0 + chunk * 8 < K;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int r = row_base + 16 * i;
        const bool ok = k_ok && ((row_ok >> i) & 1);
        const T *src = ok ? a + (size_t)src_row[i] * K + k0 + chunk * 8 : a;
        cp_async16(a_smem + swz(r, chunk), src, ok ? 16 : 0);
      }
      const uint32_t bar = pipe.full_bar(pos);
      cp_async_arrive(bar);
      if (pt == 0) {
        mbar_arrive_expect_tx(bar, kBTileBytes);
        load_b_stage<kMode>(pipe.b_tile(pos), map0, map1, bar, segment, expert,
                            col_tile * Tr::kOutCols, k0);
      }
      ++pos.n;
    }
  }
  // The sentinel's stage: its `full` barrier completes with the usual 129 arrivals (Pipeline)
  // and no bytes.
  pipe.acquire(pos);
  const uint32_t bar = pipe.full_bar(pos);
  if (pt == 0) unit_of_stage[pos.stage()] = -1;
  cp_async_arrive(bar);
  if (pt == 0) mbar_arrive(bar);
  cp_async_wait_all();
}

// Epilogue policies of the row GEMMs. Each thread owns rows wg_row0 + 16 warp + lane/4 (+ 8) of
// the tile; quad_columns hands it 8 consecutive columns at a time. Every lane of a quad takes
// part in the shuffles; the loads and stores are masked after.

// dAct: A was dOut's rows gathered through pair_token, so the accumulators hold dOut_t Wd_e^T.
// From the saved g and u (four column groups' loads issued before the first is used, so their
// latencies overlap): a recomputed, and R a written for dWd (swiglu.cuh, gated_act); dR's sum
// over each 32-column group of the unscaled a (one quad's 32 columns, swiglu.cuh's order);
// SwiGLU's backward of da = R (dOut_t Wd_e^T).
template <typename T>
__device__ __forceinline__ void dact_epilogue(const DActParams<T> &p, int N, float (&acc)[128],
                                              int row0, int rows, int col0, int wg_row0) {
  const int lane = threadIdx.x & 31;
  const int warp = (threadIdx.x >> 5) & 3;
  const int groups = (N + 31) / 32;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = wg_row0 + warp * 16 + (lane >> 2) + half * 8;
    const bool row_ok = r < rows;
    const size_t row = (size_t)row0 + (row_ok ? r : 0);
    const size_t orow = row * N;
    const float gate = row_ok ? p.gate[row] : 0.f;
#pragma unroll
    for (int batch = 0; batch < BN / 32; batch += 4) {
      uint4 g_raw[4], u_raw[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int col = col0 + (batch + b) * 32 + (lane & 3) * 8;
        g_raw[b] = u_raw[b] = make_uint4(0, 0, 0, 0);
        if (row_ok && col < N) {
          g_raw[b] = *reinterpret_cast<const uint4 *>(p.g + orow + col);
          u_raw[b] = *reinterpret_cast<const uint4 *>(p.u + orow + col);
        }
      }
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        float v[8];
        quad_columns(acc, batch + b, half, v);
        const int col = col0 + (batch + b) * 32 + (lane & 3) * 8;
        const T *ge = reinterpret_cast<const T *>(&g_raw[b]);
        const T *ue = reinterpret_cast<const T *>(&u_raw[b]);
        float a[8], dg[8], du[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float g = to_float(ge[i]), u = to_float(ue[i]), s = sigmoid(g);
          a[i] = swiglu_rounded<T>(g, u, s);
          dswiglu(gate * v[i], g, u, s, dg[i], du[i]);
        }
        const float eight = tree4(dot2(a[0], v[0], a[1], v[1]), dot2(a[2], v[2], a[3], v[3]),
                                  dot2(a[4], v[4], a[5], v[5]), dot2(a[6], v[6], a[7], v[7]));
        const float group = quad_tree(eight);
        if (row_ok && col < N) {
          store8v<T>(p.dg + orow + col, dg);
          store8v<T>(p.du + orow + col, du);
#pragma unroll
          for (int i = 0; i < 8; ++i) a[i] = gated_act(gate, a[i]);
          store8v<T>(p.act_r + orow + col, a);
          if ((lane & 3) == 0) p.dots[row * groups + col / 32] = group;
        }
      }
    }
  }
}

// Up (SwiGLU, and g and u when saving), down (y in T, or split-K's f32 partial sums) and dX
// (plain store).
template <typename T, int kMode>
__device__ __forceinline__ void store_epilogue(const RowGemmParams<T, kMode> &args,
                                               float (&acc)[128], int row0, int rows, int col0,
                                               int wg_row0, int split) {
  using Tr = RowGemmTraits<kMode>;
  const int lane = threadIdx.x & 31;
  const int warp = (threadIdx.x >> 5) & 3;
  const int N = args.N;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = wg_row0 + warp * 16 + (lane >> 2) + half * 8;
    const bool row_ok = r < rows;
    const size_t orow = (size_t)(row0 + (row_ok ? r : 0)) * N;
#pragma unroll
    for (int jg = 0; jg < Tr::kOutCols / 32; ++jg) {
      float v[8];
      quad_columns(acc, jg, half, v);
      const int col = col0 + jg * 32 + (lane & 3) * 8;
      if constexpr (kMode == kUpSwiGLU) {
        float u[8], a[8];
        quad_columns(acc, jg + 4, half, u);  // Wu's columns: 128 further in the tile
        if (!row_ok || col >= N) continue;
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = swiglu<T>(v[i], u[i]);
        store8v<T>(args.epi.act + orow + col, a);
        if (args.epi.g != nullptr) {
          store8v<T>(args.epi.g + orow + col, v);
          store8v<T>(args.epi.u + orow + col, u);
        }
      } else if constexpr (kMode == kDown) {
        if (!row_ok || col >= N) continue;
        if (args.k_splits == 1) {
          store8v<T>(args.epi.y + orow + col, v);
        } else {
          float *plane =
              args.epi.partials.planes + (size_t)split * args.epi.partials.plane_rows * N;
          float4 *o = reinterpret_cast<float4 *>(plane + orow + col);
          o[0] = make_float4(v[0], v[1], v[2], v[3]);
          o[1] = make_float4(v[4], v[5], v[6], v[7]);
        }
      } else {
        if (!row_ok || col >= N) continue;
        store8v<T>(args.epi.out + orow + col, v);
      }
    }
  }
}

template <typename T, int kMode>
__device__ __forceinline__ void row_gemm_epilogue(const RowGemmParams<T, kMode> &args,
                                                  float (&acc)[128],
                                                  int row0, int rows, int col0, int wg_row0,
                                                  int split) {
  if constexpr (kMode == kDAct)
    dact_epilogue<T>(args.epi, args.N, acc, row0, rows, col0, wg_row0);
  else
    store_epilogue<T, kMode>(args, acc, row0, rows, col0, wg_row0, split);
}

// Runs the units in the order the producer loads them, each learnt from its first stage
// (row_gemm_producer), until the sentinel.
template <typename T, int kMode>
__device__ __forceinline__ void row_gemm_consumer(const RowGemmParams<T, kMode> &args,
                                                  const Pipeline &pipe,
                                                  const int *unit_of_stage) {
  using Tr = RowGemmTraits<kMode>;
  const int wg = threadIdx.x / 128 - 1;  // 0 or 1: rows 64 wg .. 64 wg + 63 of the tile
  const int k_blocks = (args.K + BK - 1) / BK * Tr::kSegments;
  float acc[128];
  PipePos pos;
  for (;;) {
    pipe.wait_loaded(pos);
    const int unit = unit_of_stage[pos.stage()];
    // Every lane's read before lane 0 releases the stage, after which the slot may be rewritten.
    __syncwarp();
    if (unit < 0) break;
    const RowUnit u = row_unit(args, unit, k_blocks);
    // An expert's last tile may end before this warpgroup's rows (every tile of a small batch
    // does: 64 pairs per expert at config S, one at decode). Its MMAs would multiply zero-filled
    // rows that the epilogue never stores, and they share the SM's tensor cores with the other
    // warpgroup's; so it only keeps the stages' barriers in step. The stored rows are unchanged.
    const bool idle = wg * 64 >= u.rows;
    for (int kb = u.kb_begin; kb < u.kb_end; ++kb) {
      if (kb != u.kb_begin) pipe.wait_loaded(pos);
      // A is K-major (this warpgroup's 64 rows: 64 x 128 bytes in); B as the mode stores it.
      if (!idle)
        mma_stage<T, 0, Tr::kBMNMajor ? 1 : 0>(acc, pipe.a_tile(pos) + wg * (64 * 128),
                                               pipe.b_tile(pos), kb == u.kb_begin);
      pipe.release(pos);
      ++pos.n;
    }
    if (!idle)
      row_gemm_epilogue<T, kMode>(args, acc, u.row0, u.rows, u.col_tile * Tr::kOutCols, wg * 64,
                                  u.split);
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <typename T, int kMode>
__global__ void __launch_bounds__(kThreads, 1)
    row_gemm_kernel(const RowGemmParams<T, kMode> args, const __grid_constant__ CUtensorMap map0,
                    const __grid_constant__ CUtensorMap map1) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const Pipeline pipe = setup_pipeline(smem_raw);
  int *unit_of_stage = reinterpret_cast<int *>(pipe.end());  // [kStages]
  if (threadIdx.x < 128) {
    setmaxnreg_dec<56>();
    const int total_tiles = args.tiles.count(args.e) * args.col_tiles * args.k_splits;
    row_gemm_producer<T, kMode>(args, pipe, unit_of_stage, &map0, &map1, total_tiles);
  } else {
    setmaxnreg_inc<224>();
    row_gemm_consumer<T, kMode>(args, pipe, unit_of_stage);
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Weight gradients: out[e, m, n] (+)= sum over expert e's pairs p of A[row(p), m] . B[p, n],
// with row(p) = gather[p] or p. Both operands are MN-major (each pair's row contiguous): A's tile
// is [64 pairs][128 m] as two atoms, B's [64 pairs][256 n] as four. The reduction runs over the
// expert's pairs in ascending order inside one CTA: deterministic, no atomics. With
// `transposed` the [m, n] sums go to out[e, n, m] instead (dWd: remoe_wgrad_store_t).

template <typename T>
struct WeightGradArgs {
  const T *a;
  const uint32_t *gather;
  const T *b;
  float *out;  // remoe_wgrad_store_t's three fields: out, accumulate, transposed
  const uint32_t *expert_offsets;
  int e, M, N, m_tiles, n_tiles, accumulate, transposed;
  // The fixed-order split (weight_grad_split.cuh); plan == nullptr: one chunk per expert.
  const uint32_t *plan;
  float *slots;
  uint32_t *counters;
};

// Work unit u is output tile (u % tiles) of chunk (u / tiles), tiles = m_tiles * n_tiles: the
// tiles of one chunk are neighbours, so they share their B rows (and A's) in L2.
struct WgTile {
  WgChunk c;
  int tile, m0, n0;
};
template <typename T>
__device__ __forceinline__ WgTile weight_grad_unit(const WeightGradArgs<T> &args, int unit) {
  const int tiles = args.m_tiles * args.n_tiles;
  WgTile w;
  w.c = wg_chunk(args.plan, args.expert_offsets, args.e, unit / tiles);
  w.tile = unit % tiles;
  w.m0 = w.tile / args.n_tiles * BM;
  w.n0 = w.tile % args.n_tiles * BN;
  return w;
}

// Bytes a full block of 64 pairs brings by TMA: B always, A when it is not gathered.
__host__ __device__ constexpr int weight_grad_tx_bytes(bool gathered) {
  return kBTileBytes + (gathered ? 0 : kATileBytes);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The source rows of this producer thread's eight A rows (a_row + 8 i) of the stage at k0: the
// pairs' rows of X when gathered, else the pairs themselves; 0 past the expert's pairs. Read
// before the producer waits for the stage's slot, and all eight before any copy: each cp_async16
// is an asm statement that clobbers memory, so an index load written between two of them cannot
// be hoisted above the first, and the stage's eight loads became eight dependent round trips,
// longer than a stage's mainloop (the likely reason the gathered branch once measured slower
// than gathering X's rows in a kernel of their own; docs/HOPPER_GEMM.md).
template <typename T>
__device__ __forceinline__ void weight_grad_a_rows(const WeightGradArgs<T> &args, int p0, int K,
                                                   int k0, uint32_t (&rows)[8]) {
  const int a_row = threadIdx.x >> 4;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int k = a_row + 8 * i;
    const uint32_t p = (uint32_t)(p0 + k0 + k);
    rows[i] = k0 + k < K ? (args.gather != nullptr ? __ldg(args.gather + p) : p) : 0u;
  }
}

// Loads A [64 pairs][128 m] (two atoms) and B [64 pairs][256 n] (four atoms) of one stage.
// TMA for a full block (A too when not gathered); cp.async with zero fill for A when gathered
// (from `rows`, weight_grad_a_rows) and for both in the expert's last, partial block. Every
// producer thread arrives once per stage (through cp.async.mbarrier.arrive, whether it copied
// anything or not) and thread 0 once more, with the TMA's byte count or plainly: the `full`
// barrier expects 129 arrivals.
template <typename T>
__device__ __forceinline__ void weight_grad_load_stage(const WeightGradArgs<T> &args,
                                                       uint32_t a_smem, uint32_t bar,
                                                       const CUtensorMap *map_a,
                                                       const CUtensorMap *map_b, int p0, int K,
                                                       int k0, int m0, int n0,
                                                       const uint32_t (&rows)[8]) {
  const int pt = threadIdx.x;
  const bool gathered = args.gather != nullptr;
  const bool whole = k0 + BK <= K;
  const uint32_t b_smem = a_smem + kATileBytes;
  if (whole && pt == 0) {
    mbar_arrive_expect_tx(bar, weight_grad_tx_bytes(gathered));
#pragma unroll
    for (int j = 0; j < 4; ++j)
      tma_load_2d(b_smem + j * kAtomBytes, map_b, bar, n0 + 64 * j, p0 + k0);
    if (!gathered) {
#pragma unroll
      for (int j = 0; j < 2; ++j)
        tma_load_2d(a_smem + j * kAtomBytes, map_a, bar, m0 + 64 * j, p0 + k0);
    }
  }
  if (!whole || gathered) {
    // A: 16 chunks of 8 values per 256-byte row; this thread's rows a_row + 8 i.
    const int a_chunk = pt & 15, a_row = pt >> 4;
    const bool a_col_ok = m0 + a_chunk * 8 < args.M;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int k = a_row + 8 * i;
      const bool ok = a_col_ok && k0 + k < K;
      const T *src = ok ? args.a + (size_t)rows[i] * args.M + m0 + a_chunk * 8 : args.a;
      cp_async16(a_smem + (a_chunk >> 3) * kAtomBytes + swz(k, a_chunk & 7), src, ok ? 16 : 0);
    }
  }
  if (!whole) {
    // B: 32 chunks per 512-byte row; this thread's rows b_row + 4 i.
    const int b_chunk = pt & 31, b_row = pt >> 5;
    const bool b_col_ok = n0 + b_chunk * 8 < args.N;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int k = b_row + 4 * i;
      const bool ok = b_col_ok && k0 + k < K;
      const T *src = ok ? args.b + (size_t)(p0 + k0 + k) * args.N + n0 + b_chunk * 8 : args.b;
      cp_async16(b_smem + (b_chunk >> 3) * kAtomBytes + swz(k, b_chunk & 7), src, ok ? 16 : 0);
    }
    if (pt == 0) mbar_arrive(bar);
  }
  cp_async_arrive(bar);
}

template <typename T>
__device__ __forceinline__ void weight_grad_producer(const WeightGradArgs<T> &args,
                                                     const Pipeline &pipe, const CUtensorMap *map_a,
                                                     const CUtensorMap *map_b, int units) {
  PipePos pos;
  for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const WgTile w = weight_grad_unit(args, unit);
    for (int k0 = 0; k0 < w.c.len; k0 += BK) {
      uint32_t rows[8];
      weight_grad_a_rows(args, w.c.p0, w.c.len, k0, rows);
      pipe.acquire(pos);
      weight_grad_load_stage<T>(args, pipe.a_tile(pos), pipe.full_bar(pos), map_a, map_b, w.c.p0,
                                w.c.len, k0, w.m0, w.n0, rows);
      ++pos.n;
    }
  }
  cp_async_wait_all();
}

// Barrier 1 over the two consumer warpgroups (barrier 0 is __syncthreads').
__device__ __forceinline__ void consumer_sync() { named_barrier_sync<1, 256>(); }

// Stores (or adds to out, with args.accumulate) one 128 x 256 f32 tile of a weight gradient at
// rows m0, columns n0 of out. The small-batch weight gradients are nothing but this store (K is
// an expert's pairs: 64 at config S, 1 in decode), and its pattern decides their speed: stored
// from the accumulators' layout (each instruction writing 16 bytes into each of 8 rows) the
// tile goes out at 1.3 TB/s; each warp writing whole 1 KB row segments, 2.4 TB/s
// (tools/hbm-stream/store.cu on the H100). So the tile goes through shared memory in four
// rounds of 32 rows (one warpgroup's rows r, r + 16, ... for half = 0 or 1): the round's
// warpgroup writes its accumulators there, then all eight consumer warps store the rows. In
// shared memory, staging row s's 32-byte chunks are XOR-swizzled by s % 4 (column c at
// c ^ 8 (s % 4)), so that a half-warp's 8-byte stores (four rows at once) fall in different
// banks; a warp reading one row's 512 bytes reads each bank four times whatever the swizzle.
// Must be called by all 256 consumer threads.
template <typename T>
__device__ __forceinline__ void store_weight_grad_tile(const WeightGradArgs<T> &args,
                                                       const float (&acc)[128], float *out,
                                                       int m0, int n0, float *staging) {
  const int wg = threadIdx.x / 128 - 1;
  const int lane = threadIdx.x & 31;
  const int warp = (threadIdx.x >> 5) & 3;  // in the warpgroup
  const int cw = (threadIdx.x - 128) >> 5;   // 0..7 over the consumers
#pragma unroll
  for (int round = 0; round < 4; ++round) {
    const int round_wg = round >> 1, half = round & 1;
    if (wg == round_wg) {
      // Accumulator j covers columns 8 (j / 4) + 2 (lane % 4) + {0, 1} of row lane / 4 (+ 8
      // for the upper pair): staging row 8 warp + lane / 4.
      const int srow = warp * 8 + (lane >> 2);
      float *row = staging + srow * BN;
      const int swizzle = (srow & 3) << 3;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
        *reinterpret_cast<float2 *>(row + ((8 * j + 2 * (lane & 3)) ^ swizzle)) =
            make_float2(acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
    }
    consumer_sync();
    // Staging row s = 8 w + r holds tile row 64 round_wg + 16 w + r + 8 half.
#pragma unroll
    for (int i = 0; i < kStagedRows / 8; ++i) {
      const int s = cw + 8 * i;
      const int m = m0 + 64 * round_wg + 16 * (s >> 3) + (s & 7) + 8 * half;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = c * 128 + lane * 4;
        const int n = n0 + col;
        if (m >= args.M || n >= args.N) continue;
        float4 v = *reinterpret_cast<const float4 *>(staging + s * BN + (col ^ ((s & 3) << 3)));
        float4 *o = reinterpret_cast<float4 *>(out + (size_t)m * args.N + n);
        if (args.accumulate) {
          const float4 a = *o;
          v.x += a.x, v.y += a.y, v.z += a.z, v.w += a.w;
        }
        *o = v;
      }
    }
    consumer_sync();
  }
}

// The same tile stored transposed (args.transposed): out[n, m], rows of M floats. dWd is
// computed as dOut^T (R act), m an H index and n an F index, and stored into its [E, F, H]
// layout this way. Staged in four rounds of 64 tile columns (n) by all 128 tile rows (m), both
// warpgroups writing at once, so that each round holds whole 512-byte segments of 64 output
// rows: warp w then stores rows w, w + 8, ..., one row's 512 contiguous bytes per instruction
// (float4 per lane), which keeps the row-at-a-time pattern that store_weight_grad_tile found to
// pay, with 512 bytes a row instead of 1 KB (a tile has 128 m). Staging row sn (tile column
// 64 round + sn) holds the 128 m in order, each 16-byte chunk moved by an XOR of float index
// bits 3-4 with ((sn >> 1) & 3), i.e. float m at m ^ 8 ((sn >> 1) & 3): a warp's scalar stores
// for one accumulator (8 consecutive m of each of the four columns 2q + c, q = lane % 4) then
// land in 32 different banks (without the XOR the four columns' 8 m would share 8 banks,
// 4-way), and a warp reading a row's 512 bytes reads each bank four times, once per phase,
// whatever the XOR, which stays inside each 32-float group. Same shared memory as the plain
// store (64 x 128 floats). Must be called by all 256 consumer threads.
static_assert(64 * BM <= kStagedRows * BN, "the transposed staging must fit the plain one's");
template <typename T>
__device__ __forceinline__ void store_weight_grad_tile_transposed(const WeightGradArgs<T> &args,
                                                                  const float (&acc)[128],
                                                                  float *out, int m0, int n0,
                                                                  float *staging) {
  const int wg = threadIdx.x / 128 - 1;
  const int lane = threadIdx.x & 31;
  const int warp = (threadIdx.x >> 5) & 3;  // in the warpgroup
  const int cw = (threadIdx.x - 128) >> 5;   // 0..7 over the consumers
  const int q = lane & 3;
  // Accumulator 4 j + 2 half + c is tile row m_row + 8 half, column 8 j + 2 q + c.
  const int m_row = 64 * wg + 16 * warp + (lane >> 2);
#pragma unroll
  for (int round = 0; round < 4; ++round) {
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        // Staging row sn = 8 jj + 2 q + c: its XOR is ((sn >> 1) & 3) = q.
        float *row = staging + (8 * jj + 2 * q + c) * BM;
#pragma unroll
        for (int half = 0; half < 2; ++half)
          row[(m_row + 8 * half) ^ (q << 3)] = acc[4 * (8 * round + jj) + 2 * half + c];
      }
    }
    consumer_sync();
    const int m = m0 + 4 * lane;
#pragma unroll
    for (int i = 0; i < 64 / 8; ++i) {
      const int sn = cw + 8 * i;
      const int n = n0 + 64 * round + sn;
      if (m >= args.M || n >= args.N) continue;
      float4 v = *reinterpret_cast<const float4 *>(staging + sn * BM +
                                                   ((4 * lane) ^ (((sn >> 1) & 3) << 3)));
      float4 *o = reinterpret_cast<float4 *>(out + (size_t)n * args.M + m);
      if (args.accumulate) {
        const float4 a = *o;
        v.x += a.x, v.y += a.y, v.z += a.z, v.w += a.w;
      }
      *o = v;
    }
    consumer_sync();
  }
}

template <typename T>
__device__ __forceinline__ void weight_grad_consumer(const WeightGradArgs<T> &args,
                                                     const Pipeline &pipe, float *staging,
                                                     int units) {
  __shared__ int last_flag;
  const int wg = threadIdx.x / 128 - 1;
  const int ct = threadIdx.x - 128;  // 0..255 over the consumers
  const int tiles = args.m_tiles * args.n_tiles;
  float acc[128];
  PipePos pos;
  for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const WgTile w = weight_grad_unit(args, unit);
    const int m0 = w.m0, n0 = w.n0;
    if (w.c.len == 0) {
#pragma unroll
      for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    }
    for (int k0 = 0; k0 < w.c.len; k0 += BK) {
      pipe.wait_loaded(pos);
      // Both operands MN-major; this warpgroup's 64 columns of m are A's atom wg.
      mma_stage<T, 1, 1>(acc, pipe.a_tile(pos) + wg * kAtomBytes, pipe.b_tile(pos), k0 == 0);
      pipe.release(pos);
      ++pos.n;
    }
    // A chunk of a split expert: the tile's last unit stores the sum of all its chunks.
    if (w.c.chunks > 1 && !wg_split_finish<128>(args.slots, args.counters, w.c, tiles, w.tile, ct,
                                                256, &last_flag, consumer_sync, acc))
      continue;
    float *out = args.out + (size_t)w.c.expert * args.M * args.N;
    if (args.transposed)
      store_weight_grad_tile_transposed(args, acc, out, m0, n0, staging);
    else
      store_weight_grad_tile(args, acc, out, m0, n0, staging);
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    weight_grad_kernel(const WeightGradArgs<T> args, const __grid_constant__ CUtensorMap map_a,
                       const __grid_constant__ CUtensorMap map_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const Pipeline pipe = setup_pipeline(smem_raw);
  const int units = wg_total_chunks(args.plan, args.e) * args.m_tiles * args.n_tiles;
  if (threadIdx.x < 128) {
    setmaxnreg_dec<56>();
    weight_grad_producer<T>(args, pipe, &map_a, &map_b, units);
  } else {
    setmaxnreg_inc<224>();
    float *staging = reinterpret_cast<float *>(pipe.end());
    weight_grad_consumer<T>(args, pipe, staging, units);
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side.

// cuTensorMapEncodeTiled, from the driver through the runtime (the crate links no libcuda).
using EncodeTiledFn = CUresult (*)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                   const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                   const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_tiled() {
  static EncodeTiledFn fn = []() -> EncodeTiledFn {
    void *p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      return nullptr;
    return reinterpret_cast<EncodeTiledFn>(p);
  }();
  return fn;
}

template <typename T>
constexpr CUtensorMapDataType tma_dtype() {
  return sizeof(T) == 2 && std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                          : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
}

// A [E][rows][cols] weight tensor (cols contiguous) as a 3-D tensor map with a box of
// box_cols x box_rows x 1 and 128-byte swizzle (box_cols = 64 16-bit values = 128 bytes).
template <typename T>
cudaError_t weight_map(CUtensorMap *map, const void *base, int e, int rows, int cols,
                       int box_rows) {
  const EncodeTiledFn encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[3] = {(cuuint64_t)cols, (cuuint64_t)rows, (cuuint64_t)e};
  const cuuint64_t strides[2] = {(cuuint64_t)cols * 2, (cuuint64_t)rows * cols * 2};
  const cuuint32_t box[3] = {64, (cuuint32_t)box_rows, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = encode(map, tma_dtype<T>(), 3, const_cast<void *>(base), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// A [rows][cols] operand (cols contiguous) as a 2-D tensor map with 64 x 64 boxes, 128-byte
// swizzle. Rows past `rows` or columns past `cols` read as zeros.
template <typename T>
cudaError_t rows_map(CUtensorMap *map, const void *base, long long rows, int cols) {
  const EncodeTiledFn encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)(rows > 0 ? rows : 1)};
  const cuuint64_t strides[1] = {(cuuint64_t)cols * 2};
  const cuuint32_t box[2] = {64, 64};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(map, tma_dtype<T>(), 2, const_cast<void *>(base), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Streaming multiprocessors of the current device (the persistent grid), cached per device.
// Atomic: several host threads launch at once (an expert-parallel group's ranks), and they
// may fill an entry together (with the same value).
int sm_count() {
  static std::atomic<int> cache[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  const bool cached = dev >= 0 && dev < 64;
  if (cached) {
    const int known = cache[dev].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
  if (cached) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

template <typename Kernel>
cudaError_t prepare(Kernel kernel, int smem_bytes) {
  // Set on every launch: the attribute belongs to the current device, and a process may use
  // several (the call costs far less than the kernel).
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
}

template <typename T, int kMode>
int launch_row_gemm(RowGemmParams<T, kMode> args, BOperand<T> weights, int num_tiles,
                    cudaStream_t stream) {
  // Up to 128 bytes NVVM loads a by-value kernel parameter into registers at entry; past that it
  // reads each field from the parameter space where it is used, another code for this kernel
  // (which is why B's pointers, which only the tensor maps need, are not in it).
  static_assert(sizeof(args) <= 128, "the kernel's parameter block must stay within 128 bytes");
  if (num_tiles == 0) return 0;
  using Tr = RowGemmTraits<kMode>;
  // B as stored per expert: [K][N] for the forward (MN-major), [N][K] for the backward.
  const int b_rows = Tr::kBMNMajor ? args.K : args.N;
  const int b_cols = Tr::kBMNMajor ? args.N : args.K;
  const int box_rows = Tr::kBMNMajor ? BK : BN;
  // map1: the up projection's paired columns or dX's second segment, both Wu.
  const T *b0 = weights.w;
  const T *b1 = weights.w_paired != nullptr ? weights.w_paired : weights.w2;
  const int e = args.e;
  CUtensorMap map0, map1;
  cudaError_t err = weight_map<T>(&map0, b0, e, b_rows, b_cols, box_rows);
  if (err == cudaSuccess)
    err = weight_map<T>(&map1, b1 != nullptr ? b1 : b0, e, b_rows, b_cols, box_rows);
  auto kernel = row_gemm_kernel<T, kMode>;
  if (err == cudaSuccess) err = prepare(kernel, kRowGemmSmemBytes);
  if (err != cudaSuccess) return (int)err;
  args.col_tiles = (args.N + Tr::kOutCols - 1) / Tr::kOutCols;
  if (args.k_splits < 1) args.k_splits = 1;
  // Every unit must have a K block: the consumers learn a unit from its first stage, so one
  // without would leave them waiting (the header's k_splits <= kb, and K > 0).
  const int k_blocks = (args.K + BK - 1) / BK * Tr::kSegments;
  if (args.sched == nullptr || args.K <= 0 || args.k_splits > k_blocks)
    return (int)cudaErrorInvalidValue;
  const long long tiles = (long long)num_tiles * args.col_tiles * args.k_splits;
  if (tiles > 0x7fffffffLL) return (int)cudaErrorInvalidConfiguration;
  const int grid = (int)(tiles < (long long)sm_count() ? tiles : (long long)sm_count());
  if (grid <= 0) return (int)cudaErrorInvalidDevice;
  kernel<<<grid, kThreads, kRowGemmSmemBytes, stream>>>(args, map0, map1);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_weight_grad(const uint16_t *a, const uint32_t *gather, const uint16_t *b,
                       remoe_wgrad_store_t store, const uint32_t *expert_offsets, int a_rows,
                       int b_rows, int e, int M, int N, const remoe_wgrad_split_t *split,
                       cudaStream_t stream) {
  auto kernel = weight_grad_kernel<T>;
  CUtensorMap map_a, map_b;
  cudaError_t err = rows_map<T>(&map_a, a, a_rows, M);
  if (err == cudaSuccess) err = rows_map<T>(&map_b, b, b_rows, N);
  if (err == cudaSuccess) err = prepare(kernel, kWeightGradSmemBytes);
  if (err != cudaSuccess) return (int)err;
  WeightGradArgs<T> args{reinterpret_cast<const T *>(a),
                         gather,
                         reinterpret_cast<const T *>(b),
                         store.out,
                         expert_offsets,
                         e,
                         M,
                         N,
                         (M + BM - 1) / BM,
                         (N + BN - 1) / BN,
                         store.accumulate,
                         store.transposed,
                         split != nullptr ? split->plan : nullptr,
                         split != nullptr ? split->slots : nullptr,
                         split != nullptr ? split->counters : nullptr};
  // Enough CTAs for the most units any plan makes (each expert at least one chunk, the split
  // ones at most wg_max_slots more); the kernel reads this launch's count from the plan.
  const int chunks = e + (args.plan != nullptr ? wg_max_slots(M, N) : 0);
  const long long tiles = (long long)chunks * args.m_tiles * args.n_tiles;
  if (tiles > 0x7fffffffLL) return (int)cudaErrorInvalidConfiguration;
  if (tiles == 0) return 0;
  const int grid = (int)(tiles < (long long)sm_count() ? tiles : (long long)sm_count());
  if (grid <= 0) return (int)cudaErrorInvalidDevice;
  kernel<<<grid, kThreads, kWeightGradSmemBytes, stream>>>(args, map_a, map_b);
  return (int)cudaGetLastError();
}

}  // namespace

REMOE_GEMM_ENTRY_POINTS(hopper_, bf16, __nv_bfloat16)
REMOE_GEMM_ENTRY_POINTS(hopper_, f16, __half)

// Whether this binary holds the sm_90a code of the kernels above for the current device: the
// probe compiled for any other target (sm_80 code, or PTX that the driver JIT-compiles for a
// newer chip) reports 0, and then the Hopper launchers must not be used (their kernels would
// be empty). Synchronous; the Rust layer calls it once per device and caches the answer.
__global__ void hopper_gemm_probe(int32_t *out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

extern "C" int remoe_hopper_gemm_available(int32_t *available) {
  *available = 0;
  int32_t *d = nullptr;
  cudaError_t err = cudaMalloc(&d, sizeof(int32_t));
  if (err != cudaSuccess) return (int)err;
  hopper_gemm_probe<<<1, 1>>>(d);
  err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaMemcpy(available, d, sizeof(int32_t), cudaMemcpyDeviceToHost);
  cudaFree(d);
  return (int)err;
}
