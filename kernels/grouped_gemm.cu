// Grouped expert GEMMs over variable-length per-expert row lists, on the tensor cores.
//
// Work decomposition: the rows of expert e (its pairs, contiguous after the compaction) are cut
// into 128-row tiles; the grid is (row tiles) x (column tiles), with the column tile fastest so
// that neighbouring blocks share their A rows in L2. The host sizes the grid for the most row
// tiles the pair capacity allows; the row-tile count of this forward is read from tile_offsets
// on the device, and the blocks past it leave at once. A block finds its expert by binary search
// in tile_offsets. An expert with no tokens has no tiles: it costs nothing. With one block per
// unit, the hardware's block order already keeps neighbouring units together: the launchers
// take the Hopper path's tile counter (`sched`, one signature for both paths) and ignore it.
//
// Block tile 128 x 128 x 64, 8 warps as 2 (rows) x 4 (columns), warp tile 64 x 32: per 16-deep
// k step a warp issues 4 x 4 mma.sync.m16n8k16 (bf16/f16 in, f32 accumulate). A and B tiles
// stream through a 3-stage cp.async pipeline; both are XOR-swizzled in 16-byte units so that the
// ldmatrix reads are free of bank conflicts (A: 128-byte rows, chunk ^= row & 7; B: 256-byte
// rows, chunk ^= row & 7). Rows or columns past the end are zero-filled by cp.async's src-size.
//
// Up projection: the A rows are gathered from X through pair_token inside the tile load (no
// permuted copy of X), and the B tile holds 64 columns of Wg next to the same 64 columns of Wu,
// laid out so that every thread's accumulators hold g and u of the same output elements: the
// SwiGLU a = SiLU(g) * u happens in the epilogue and only a is written.
// Down projection: plain A rows (the act rows of the pairs), B = Wd_e, y written in T (or, with
// split-K, each K range's f32 partial sums, which split_k.cu adds and rounds into y).
//
// The backward uses the same main loop in two more modes, with B read from the weights as
// stored (n-major: each output column's K values contiguous), through ldmatrix without .trans:
//   kDAct: A = dOut's rows gathered through pair_token (unscaled), so the accumulators hold
//          dOut_t Wd_e^T; the epilogue recomputes a from the saved g and u and writes R a for dWd
//          (swiglu.cuh, gated_act), accumulates dR = a . (dOut_t Wd_e^T) per 32-column group
//          (swiglu.cuh), and applies SwiGLU's backward to da = R (dOut_t Wd_e^T):
//          dg = da * u * SiLU'(g), du = da * SiLU(g);
//   kDX:   dX_pair = dg Wg_e^T + du Wu_e^T, as one GEMM over two K segments.
// And a separate kernel for the weight gradients, whose reduction runs over an expert's pairs
// (K = n_e, zero allowed), both operands read k-major and fed through ldmatrix.trans, its f32
// tile stored as is or transposed (dWd, computed as dOut^T (R act)).
#include "gemm_contract.cuh"
#include "mma_sync.cuh"
#include "swiglu.cuh"
#include "weight_grad_split.cuh"

namespace {

constexpr int BM = REMOE_GEMM_TILE_ROWS;
constexpr int BN = 128;
constexpr int BK = 64;
constexpr int kStages = 3;
constexpr int kKChunks = BK / 8;                        // 16-byte chunks per k-row of a tile
constexpr int kLoadsA = BM * BK / 8 / 256;              // A chunks per thread per stage
constexpr int kLoadsB = BK * 128 / 8 / 256;             // B chunks per thread per stage
constexpr int kThreads = 256;
constexpr int kStageElems = BM * BK + BK * BN;
constexpr int kSmemBytes = kStages * kStageElems * 2;

// Swizzled element offsets inside one stage.
__device__ __forceinline__ int a_offset(int row, int chunk) {
  // 128-byte rows: eight 16-byte chunks, XOR-ed with the row's low three bits.
  return row * BK + ((chunk ^ (row & 7)) << 3);
}
__device__ __forceinline__ int b_offset(int k, int chunk) {
  return k * BN + ((chunk ^ (k & 7)) << 3);
}

// The kernel's parameters: the launch, and the weights, which this path reads in the kernel.
// Passed as __grid_constant__, so the kernel reads each field from the parameter space where it
// uses it (as it did when its parameters were one 144-byte struct): loaded into registers at
// entry instead, the up projection's epilogue was duplicated for g == null and spilled.
template <typename T, int kMode>
struct GroupedGemmParams : RowGemmParams<T, kMode> {
  BOperand<T> b;
};

// dAct's epilogue for one warp's 64 x 32 tile (rows wm_row0.., columns col0..col0 + 31: one of
// dR's 32-column groups). The quad shuffles need every lane, so rows and columns past the edge
// compute on zeros and only their loads and stores are masked.
template <typename T>
__device__ __forceinline__ void dact_epilogue(const RowGemmParams<T, kDAct> &args,
                                              const float (&acc)[4][4][4], int row0, int rows,
                                              int col0, int wm_row0, int lane) {
  const DActParams<T> &p = args.epi;
  const int N = args.N;
  const int groups = (N + 31) / 32;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm_row0 + mi * 16 + (lane >> 2) + half * 8;
      const bool row_ok = r < rows;
      const size_t row = (size_t)row0 + (row_ok ? r : 0);
      const float gate = row_ok ? p.gate[row] : 0.f;
      float sums[4];
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int col = col0 + ni * 8 + (lane & 3) * 2;
        const bool ok = row_ok && col < N;
        const float d0 = acc[mi][ni][half * 2], d1 = acc[mi][ni][half * 2 + 1];
        float g[2] = {0.f, 0.f}, u[2] = {0.f, 0.f};
        if (ok) {
          load2<T>(p.g + row * N + col, g);
          load2<T>(p.u + row * N + col, u);
        }
        const float s0 = sigmoid(g[0]), s1 = sigmoid(g[1]);
        const float a0 = swiglu_rounded<T>(g[0], u[0], s0);
        const float a1 = swiglu_rounded<T>(g[1], u[1], s1);
        sums[ni] = quad_tree(dot2(a0, d0, a1, d1));
        if (ok) {
          float dg0, du0, dg1, du1;
          dswiglu(gate * d0, g[0], u[0], s0, dg0, du0);
          dswiglu(gate * d1, g[1], u[1], s1, dg1, du1);
          store2<T>(p.dg + row * N + col, dg0, dg1);
          store2<T>(p.du + row * N + col, du0, du1);
          store2<T>(p.act_r + row * N + col, gated_act(gate, a0), gated_act(gate, a1));
        }
      }
      if (row_ok && (lane & 3) == 0 && col0 < N)
        p.dots[row * groups + col0 / 32] = tree4(sums[0], sums[1], sums[2], sums[3]);
    }
  }
}

template <typename T, int kMode>
__global__ void __launch_bounds__(kThreads, 2)
    grouped_gemm_kernel(const __grid_constant__ GroupedGemmParams<T, kMode> args) {
  constexpr bool kSwiGLU = kMode == kUpSwiGLU;
  constexpr bool kGathered = ModeTraits<kMode>::kGathered;  // A rows through args.a.gather
  constexpr bool kBNMajor = ModeTraits<kMode>::kBNMajor;    // B read as [N, K] per expert
  constexpr int kSegments = ModeTraits<kMode>::kSegments;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T *smem = reinterpret_cast<T *>(smem_raw);
  const int K = args.K, N = args.N;

  const int tile = blockIdx.x / args.col_tiles;
  const int col_tile = blockIdx.x % args.col_tiles;
  // The grid covers the most row tiles the pair capacity allows (the host does not know |A|);
  // the blocks past this forward's tiles leave at once.
  if (tile >= args.tiles.count(args.e)) return;
  const RowTile rt = args.tiles.at(args.e, tile);
  const int expert = rt.expert, row0 = rt.row0, rows = rt.rows;
  // Output columns of this block: 64 (SwiGLU: g and u share them) or 128.
  const int n0 = col_tile * out_cols<kMode>(BN);
  const size_t w_off = (size_t)expert * K * N;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp >> 2;  // 0..1: 64-row half
  const int wn = warp & 3;   // 0..3: column quarter

  // Each thread loads 2 A chunks and 2 B chunks per stage; their rows are fixed, so resolve
  // the sources once (per K segment).
  int a_row[kLoadsA], a_chunk[kLoadsA];
  size_t a_src_row[kLoadsA];
  bool a_ok[kLoadsA];
#pragma unroll
  for (int i = 0; i < kLoadsA; ++i) {
    const int id = tid + i * kThreads;
    a_row[i] = id / kKChunks;
    a_chunk[i] = id % kKChunks;
    a_ok[i] = a_row[i] < rows;
    const int p = row0 + a_row[i];
    a_src_row[i] = a_ok[i] ? (kGathered ? (size_t)args.a.gather[p] : (size_t)p) : 0;
  }
  // B chunk coordinates: k-major tiles (forward) are 32 k-rows x 16 chunks; n-major tiles
  // (backward) are 128 n-rows x 4 chunks, like A.
  int b_r[kLoadsB], b_chunk[kLoadsB];
  size_t b_src[kLoadsB];  // element offset of the chunk's row (n-major) or column (k-major)
  bool b_ok[kLoadsB];
#pragma unroll
  for (int i = 0; i < kLoadsB; ++i) {
    const int id = tid + i * kThreads;
    if (kBNMajor) {
      b_r[i] = id / kKChunks;  // n within the tile
      b_chunk[i] = id % kKChunks;
      const int n = n0 + b_r[i];
      b_ok[i] = n < N;
      b_src[i] = 0;  // computed at the load from b_r (fewer live registers)
    } else {
      b_r[i] = id >> 4;  // k within the tile
      b_chunk[i] = id & 15;
      int col;
      if (kSwiGLU) col = n0 + (b_chunk[i] & 7) * 8;
      else col = n0 + b_chunk[i] * 8;
      b_ok[i] = col < N;
      b_src[i] = w_off + col;
    }
  }

  // Split-K: blockIdx.y is the K range, and the partial-sum plane the epilogue writes.
  const int k_tiles = (K + BK - 1) / BK;
  const int kt_begin = split_k_begin(blockIdx.y, k_tiles * kSegments, args.k_splits);
  const int kt_end = split_k_begin(blockIdx.y + 1, k_tiles * kSegments, args.k_splits);
  const int total_k_tiles = kt_end - kt_begin;

  auto load_stage = [&](int stage, int kt) {
    const int kt_all = kt_begin + kt;
    const int sgm = kSegments == 1 ? 0 : kt_all / k_tiles;
    const int k0 = (kt_all - sgm * k_tiles) * BK;
    const T *a = sgm == 0 ? args.a.rows : args.a.rows2;
    T *as = smem + stage * kStageElems;
    T *bs = as + BM * BK;
#pragma unroll
    for (int i = 0; i < kLoadsA; ++i) {
      const int k = k0 + a_chunk[i] * 8;
      const bool ok = a_ok[i] && k < K;
      cp_async16(as + a_offset(a_row[i], a_chunk[i]),
                 ok ? (const void *)(a + a_src_row[i] * K + k) : args.a.rows, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < kLoadsB; ++i) {
      if (kBNMajor) {
        const T *b = sgm == 0 ? args.b.w : args.b.w2;
        const int k = k0 + b_chunk[i] * 8;
        const bool ok = b_ok[i] && k < K;
        // The same row offset in Wg and Wu.
        const size_t row = w_off + (size_t)(n0 + b_r[i]) * K;
        cp_async16(bs + a_offset(b_r[i], b_chunk[i]),
                   ok ? (const void *)(b + row + k) : args.b.w, ok ? 16 : 0);
      } else {
        const T *b = (kSwiGLU && b_chunk[i] >= 8) ? args.b.w_paired : args.b.w;
        const int k = k0 + b_r[i];
        const bool ok = b_ok[i] && k < K;
        cp_async16(bs + b_offset(b_r[i], b_chunk[i]),
                   ok ? (const void *)(b + b_src[i] + (size_t)k * N) : args.b.w, ok ? 16 : 0);
      }
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;

  // The warp's four 8-column groups, as 16-byte chunk (k-major) or 8-row group (n-major)
  // indices of the B tile, two per ldmatrix.x4. SwiGLU: g columns wn*16 + {0, 8} and the u
  // columns 64 later; otherwise wn*32 + {0, 8, 16, 24}.
  int b_col[2];
  b_col[0] = kSwiGLU ? wn * 2 : wn * 4;
  b_col[1] = kSwiGLU ? 8 + wn * 2 : wn * 4 + 2;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total_k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < total_k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    // Refill the stage consumed in the previous iteration (every warp is past it now).
    const int next = kt + kStages - 1;
    if (next < total_k_tiles) load_stage(next % kStages, next);
    cp_async_commit();

    const T *as = smem + (kt % kStages) * kStageElems;
    const T *bs = as + BM * BK;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      uint32_t af[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int r = wm * 64 + mi * 16 + (lane & 15);
        ldmatrix_x4(af[mi], as + a_offset(r, ks * 2 + (lane >> 4)));
      }
      uint32_t bf[4][2];
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        uint32_t r[4];
        if (kBNMajor) {
          const int n = b_col[nj] * 8 + (lane & 7) + ((lane >> 4) & 1) * 8;
          ldmatrix_x4(r, bs + a_offset(n, ks * 2 + ((lane >> 3) & 1)));
        } else {
          const int k = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          ldmatrix_x4_trans(r, bs + b_offset(k, b_col[nj] + (lane >> 4)));
        }
        bf[nj * 2][0] = r[0];
        bf[nj * 2][1] = r[1];
        bf[nj * 2 + 1][0] = r[2];
        bf[nj * 2 + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  cp_async_wait<0>();

  // Epilogue. Accumulator layout of m16n8: c0,c1 at (lane/4, 2*(lane%4) + {0,1}), c2,c3 eight
  // rows below.
  if constexpr (kMode == kDAct) {
    dact_epilogue<T>(args, acc, row0, rows, n0 + wn * 32, wm * 64, lane);
  } else {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = wm * 64 + mi * 16 + (lane >> 2) + half * 8;
        if (r >= rows) continue;
        const size_t orow = (size_t)(row0 + r) * N;
        if constexpr (kSwiGLU) {
#pragma unroll
          for (int ni = 0; ni < 2; ++ni) {
            const int col = n0 + wn * 16 + ni * 8 + (lane & 3) * 2;
            if (col < N) {
              const float g0 = acc[mi][ni][half * 2], g1 = acc[mi][ni][half * 2 + 1];
              const float u0 = acc[mi][ni + 2][half * 2], u1 = acc[mi][ni + 2][half * 2 + 1];
              store2<T>(args.epi.act + orow + col, swiglu<T>(g0, u0), swiglu<T>(g1, u1));
              if (args.epi.g != nullptr) {
                store2<T>(args.epi.g + orow + col, g0, g1);
                store2<T>(args.epi.u + orow + col, u0, u1);
              }
            }
          }
        } else {
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) {
            const int col = n0 + wn * 32 + ni * 8 + (lane & 3) * 2;
            if (col >= N) continue;
            const float v0 = acc[mi][ni][half * 2], v1 = acc[mi][ni][half * 2 + 1];
            if constexpr (kMode == kDown) {
              if (args.k_splits == 1) {
                store2<T>(args.epi.y + orow + col, v0, v1);
              } else {
                const size_t plane_rows = args.epi.partials.plane_rows;
                float *plane = args.epi.partials.planes + (size_t)blockIdx.y * plane_rows * N;
                *reinterpret_cast<float2 *>(plane + orow + col) = make_float2(v0, v1);
              }
            } else {
              store2<T>(args.epi.out + orow + col, v0, v1);
            }
          }
        }
      }
    }
  }
}

template <typename T, int kMode>
int launch_row_gemm(const RowGemmParams<T, kMode> &p, BOperand<T> b, int num_tiles,
                    cudaStream_t stream) {
  if (num_tiles == 0) return 0;
  auto kernel = grouped_gemm_kernel<T, kMode>;
  // Set on every launch: the attribute belongs to the current device, and a process may use
  // several (the call costs far less than the kernel).
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return (int)err;
  GroupedGemmParams<T, kMode> args{p, b};
  const int cols_per_tile = out_cols<kMode>(BN);
  args.col_tiles = (args.N + cols_per_tile - 1) / cols_per_tile;
  const long long blocks = (long long)num_tiles * args.col_tiles;
  if (blocks > 0x7fffffffLL) return (int)cudaErrorInvalidConfiguration;
  if (args.k_splits < 1) args.k_splits = 1;
  kernel<<<dim3((unsigned)blocks, (unsigned)args.k_splits), kThreads, kSmemBytes, stream>>>(args);
  return (int)cudaGetLastError();
}

// Weight gradients: out_e[m, n] (+)= sum over expert e's pairs p of A[p, m] * B[p, n] (out_e[n, m]
// with store.transposed), with the A rows gathered through `gather` when given. One block per
// (chunk of an expert's pairs, 128 x 128 output tile): without a plan a chunk is a whole expert;
// with one, a hot expert's pairs are cut into chunks whose partial sums are added in chunk order
// (weight_grad_split.cuh). Either way the reduction order is fixed, and an expert with no pairs
// writes zeros (or leaves `out` as it is when accumulating). The grid has room for the most
// chunks any plan makes; the blocks past this launch's count leave at once.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    weight_grad_kernel(const T *__restrict__ a, const uint32_t *__restrict__ gather,
                       const T *__restrict__ b, remoe_wgrad_store_t store,
                       const uint32_t *__restrict__ expert_offsets, int e, int M, int N,
                       int m_tiles, int n_tiles, remoe_wgrad_split_t split) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ int last_flag;
  T *smem = reinterpret_cast<T *>(smem_raw);
  const int tiles = m_tiles * n_tiles;
  const int tile = blockIdx.x % tiles;
  if ((int)(blockIdx.x / tiles) >= wg_total_chunks(split.plan, e)) return;
  const WgChunk chunk = wg_chunk(split.plan, expert_offsets, e, blockIdx.x / tiles);
  const int expert = chunk.expert;
  const int m0 = tile / n_tiles * BM;
  const int n0 = tile % n_tiles * BN;
  const int p0 = chunk.p0;
  const int K = chunk.len;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp >> 2;
  const int wn = warp & 3;

  // Both tiles are BK k-rows (pairs) x 16 chunks of 8 columns.
  int r[kLoadsB], c[kLoadsB];
  bool a_col_ok[kLoadsB], b_col_ok[kLoadsB];
#pragma unroll
  for (int i = 0; i < kLoadsB; ++i) {
    const int id = tid + i * kThreads;
    r[i] = id >> 4;
    c[i] = id & 15;
    a_col_ok[i] = m0 + c[i] * 8 < M;
    b_col_ok[i] = n0 + c[i] * 8 < N;
  }
  auto load_stage = [&](int stage, int k0) {
    T *as = smem + stage * kStageElems;
    T *bs = as + BK * BM;
#pragma unroll
    for (int i = 0; i < kLoadsB; ++i) {
      const int k = k0 + r[i];
      const bool row_ok = k < K;
      size_t src_row = 0;
      if (row_ok) src_row = gather != nullptr ? (size_t)gather[p0 + k] : (size_t)(p0 + k);
      const bool aok = row_ok && a_col_ok[i];
      cp_async16(as + b_offset(r[i], c[i]), aok ? (const void *)(a + src_row * M + m0 + c[i] * 8) : a,
                 aok ? 16 : 0);
      const bool bok = row_ok && b_col_ok[i];
      cp_async16(bs + b_offset(r[i], c[i]),
                 bok ? (const void *)(b + (size_t)(p0 + k) * N + n0 + c[i] * 8) : b,
                 bok ? 16 : 0);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;

  const int k_tiles = (K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s * BK);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage(next % kStages, next * BK);
    cp_async_commit();
    const T *as = smem + (kt % kStages) * kStageElems;
    const T *bs = as + BK * BM;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      const int k = ks * 16 + (lane & 7) + ((lane >> 4) & 1) * 8;
      uint32_t af[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        // A is stored [k][m]: .trans hands each thread the row-major A fragment.
        const int chunk = (wm * 64 + mi * 16) / 8 + ((lane >> 3) & 1);
        ldmatrix_x4_trans(af[mi], as + b_offset(k, chunk));
      }
      uint32_t bf[4][2];
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        uint32_t q[4];
        const int kb = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldmatrix_x4_trans(q, bs + b_offset(kb, wn * 4 + nj * 2 + (lane >> 4)));
        bf[nj * 2][0] = q[0];
        bf[nj * 2][1] = q[1];
        bf[nj * 2 + 1][0] = q[2];
        bf[nj * 2 + 1][1] = q[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  cp_async_wait<0>();

  // A chunk of a split expert: the tile's last block stores the sum of all its chunks.
  if (chunk.chunks > 1 && !wg_split_finish<64>(split.slots, split.counters, chunk, tiles, tile,
                                               tid, kThreads, &last_flag,
                                               [] { __syncthreads(); }, &acc[0][0][0]))
    return;

  float *oe = store.out + (size_t)expert * M * N;
  const bool accumulate = store.accumulate != 0;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = m0 + wm * 64 + mi * 16 + (lane >> 2) + half * 8;
      if (m >= M) continue;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int n = n0 + wn * 32 + ni * 8 + (lane & 3) * 2;
        if (n >= N) continue;
        const float v0 = acc[mi][ni][half * 2], v1 = acc[mi][ni][half * 2 + 1];
        if (store.transposed) {
          // out[n, m] and out[n + 1, m] (rows of M floats). Lane 4 r + q holds m = m_base + r,
          // n = n_base + 2 q (+ 1): each of the two store instructions of a warp writes 8
          // consecutive m into each of four rows, 32 bytes a row, whole sectors. (The Hopper
          // path stages its tile in shared memory for longer row segments; this one, the
          // fallback for chips without wgmma, stores from its registers.)
          float *o = oe + (size_t)n * M + m;
          float w0 = v0, w1 = v1;
          if (accumulate) {
            w0 += o[0];
            w1 += o[M];
          }
          o[0] = w0;
          o[M] = w1;
        } else {
          float2 *o = reinterpret_cast<float2 *>(oe + (size_t)m * N + n);
          float2 v = make_float2(v0, v1);
          if (accumulate) {
            const float2 old = *o;
            v.x += old.x;
            v.y += old.y;
          }
          *o = v;
        }
      }
    }
  }
}

template <typename T>
int launch_weight_grad(const uint16_t *a, const uint32_t *gather, const uint16_t *b,
                       remoe_wgrad_store_t store, const uint32_t *expert_offsets, int a_rows,
                       int b_rows, int e, int M, int N, const remoe_wgrad_split_t *split,
                       cudaStream_t stream) {
  (void)a_rows;  // this path needs no row counts: cp.async checks each row against n_e
  (void)b_rows;
  auto kernel = weight_grad_kernel<T>;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return (int)err;
  const remoe_wgrad_split_t s = split != nullptr ? *split : remoe_wgrad_split_t{};
  const int m_tiles = (M + BM - 1) / BM, n_tiles = (N + BN - 1) / BN;
  const int chunks = e + (s.plan != nullptr ? wg_max_slots(M, N) : 0);
  const long long blocks = (long long)chunks * m_tiles * n_tiles;
  if (blocks > 0x7fffffffLL) return (int)cudaErrorInvalidConfiguration;
  kernel<<<(unsigned)blocks, kThreads, kSmemBytes, stream>>>(
      reinterpret_cast<const T *>(a), gather, reinterpret_cast<const T *>(b), store,
      expert_offsets, e, M, N, m_tiles, n_tiles, s);
  return (int)cudaGetLastError();
}

}  // namespace

REMOE_GEMM_ENTRY_POINTS(, bf16, __nv_bfloat16)
REMOE_GEMM_ENTRY_POINTS(, f16, __half)
