// Grouped expert GEMMs over variable-length per-expert row lists, on the tensor cores.
//
// Work decomposition: the rows of expert e (its pairs, contiguous after the compaction) are cut
// into 128-row tiles; the grid is (all row tiles of all experts) x (column tiles), with the
// column tile fastest so that neighbouring blocks share their A rows in L2. A block finds its
// expert by binary search in tile_offsets. An expert with no tokens has no tiles: it costs
// nothing.
//
// Block tile 128 x 128 x 32, 8 warps as 2 (rows) x 4 (columns), warp tile 64 x 32: per 16-deep
// k step a warp issues 4 x 4 mma.sync.m16n8k16 (bf16/f16 in, f32 accumulate). A and B tiles
// stream through a 4-stage cp.async pipeline; both are XOR-swizzled in 16-byte units so that the
// ldmatrix reads are free of bank conflicts (A: 64-byte rows, chunk ^= (row >> 1) & 3; B: 256-byte
// rows, chunk ^= row & 7). Rows or columns past the end are zero-filled by cp.async's src-size.
//
// Up projection: the A rows are gathered from X through pair_token inside the tile load (no
// permuted copy of X), and the B tile holds 64 columns of Wg next to the same 64 columns of Wu,
// laid out so that every thread's accumulators hold g and u of the same output elements: the
// SwiGLU a = SiLU(g) * u happens in the epilogue and only a is written.
// Down projection: plain A rows (the act rows of the pairs), B = Wd_e, y written.
#include "common.cuh"

namespace {

constexpr int BM = REMOE_GEMM_TILE_ROWS;
constexpr int BN = 128;
constexpr int BK = 32;
constexpr int kStages = 4;
constexpr int kThreads = 256;
constexpr int kStageElems = BM * BK + BK * BN;
constexpr int kSmemBytes = kStages * kStageElems * 2;

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

// 16 bytes global -> shared; `bytes` < 16 zero-fills the rest (0 for out-of-range chunks).
__device__ __forceinline__ void cp_async16(void *dst, const void *src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4],
                                                       const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4],
                                                const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Swizzled element offsets inside one stage.
__device__ __forceinline__ int a_offset(int row, int chunk) {
  return row * BK + ((chunk ^ ((row >> 1) & 3)) << 3);
}
__device__ __forceinline__ int b_offset(int k, int chunk) {
  return k * BN + ((chunk ^ (k & 7)) << 3);
}

__device__ __forceinline__ float silu(float z) { return z / (1.f + __expf(-z)); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

// The expert owning row tile `tile`: the e with tile_offsets[e] <= tile < tile_offsets[e + 1].
__device__ __forceinline__ int expert_of_tile(const uint32_t *tile_offsets, int e, int tile) {
  int lo = 0, hi = e - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if ((int)tile_offsets[mid] <= tile) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// kSwiGLU: A rows gathered from `a` [*, K] through `gather`; B = (b0 | b1) columns n0..n0+64 of
// each, output act = SiLU(A b0) * (A b1), n_out = N columns.
// !kSwiGLU: A rows are the pair rows of `a` [|A|, K]; B = b0 columns n0..n0+128; output A b0.
// b0, b1: [E, K, N] (expert-major). out: [|A|, N].
template <typename T, bool kSwiGLU>
__global__ void __launch_bounds__(kThreads, 2)
    grouped_gemm_kernel(const T *__restrict__ a, const uint32_t *__restrict__ gather,
                        const T *__restrict__ b0, const T *__restrict__ b1, T *__restrict__ out,
                        const uint32_t *__restrict__ expert_offsets,
                        const uint32_t *__restrict__ tile_offsets, int e, int K, int N,
                        int col_tiles) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T *smem = reinterpret_cast<T *>(smem_raw);

  const int tile = blockIdx.x / col_tiles;
  const int col_tile = blockIdx.x % col_tiles;
  const int expert = expert_of_tile(tile_offsets, e, tile);
  const int row0 = expert_offsets[expert] + (tile - (int)tile_offsets[expert]) * BM;
  const int rows = min(BM, (int)expert_offsets[expert + 1] - row0);
  // Output columns of this block: 64 (SwiGLU: g and u share them) or 128.
  const int n0 = col_tile * (kSwiGLU ? BN / 2 : BN);
  const size_t w_off = (size_t)expert * K * N;
  const T *wb0 = b0 + w_off;
  const T *wb1 = kSwiGLU ? b1 + w_off : nullptr;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp >> 2;  // 0..1: 64-row half
  const int wn = warp & 3;   // 0..3: column quarter

  // Each thread loads 2 A chunks and 2 B chunks per stage; their rows are fixed, so resolve the
  // gathered source rows once.
  const T *a_src[2];
  int a_row[2], a_chunk[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int id = tid + i * kThreads;
    a_row[i] = id >> 2;
    a_chunk[i] = id & 3;
    const int r = a_row[i];
    if (r < rows) {
      const size_t src_row = kSwiGLU ? (size_t)gather[row0 + r] : (size_t)(row0 + r);
      a_src[i] = a + src_row * K;
    } else {
      a_src[i] = nullptr;
    }
  }
  const T *b_src[2];
  int b_k[2], b_chunk[2];
  bool b_col_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int id = tid + i * kThreads;
    b_k[i] = id >> 4;
    b_chunk[i] = id & 15;
    int col;
    const T *base;
    if (kSwiGLU) {
      base = b_chunk[i] < 8 ? wb0 : wb1;
      col = n0 + (b_chunk[i] & 7) * 8;
    } else {
      base = wb0;
      col = n0 + b_chunk[i] * 8;
    }
    b_col_ok[i] = col < N;
    b_src[i] = base + col;
  }

  auto load_stage = [&](int stage, int k0) {
    T *as = smem + stage * kStageElems;
    T *bs = as + BM * BK;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int k = k0 + a_chunk[i] * 8;
      const bool ok = a_src[i] != nullptr && k < K;
      cp_async16(as + a_offset(a_row[i], a_chunk[i]), ok ? (const void *)(a_src[i] + k) : a,
                 ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int k = k0 + b_k[i];
      const bool ok = b_col_ok[i] && k < K;
      cp_async16(bs + b_offset(b_k[i], b_chunk[i]),
                 ok ? (const void *)(b_src[i] + (size_t)k * N) : b0, ok ? 16 : 0);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;

  // The warp's four 8-column groups, as 16-byte chunk indices of the B tile. SwiGLU: g columns
  // wn*16 + {0, 8} and the u columns 64 later; plain: wn*32 + {0, 8, 16, 24}.
  int b_col_chunk[2];  // per ldmatrix.x4.trans (two 8-column groups each)
  b_col_chunk[0] = kSwiGLU ? wn * 2 : wn * 4;
  b_col_chunk[1] = kSwiGLU ? 8 + wn * 2 : wn * 4 + 2;

  const int k_tiles = (K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s * BK);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    // Refill the stage consumed in the previous iteration (every warp is past it now).
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage(next % kStages, next * BK);
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
        const int k = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        uint32_t r[4];
        ldmatrix_x4_trans(r, bs + b_offset(k, b_col_chunk[nj] + (lane >> 4)));
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
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * 64 + mi * 16 + (lane >> 2) + half * 8;
      if (r >= rows) continue;
      T *orow = out + (size_t)(row0 + r) * N;
      if (kSwiGLU) {
#pragma unroll
        for (int ni = 0; ni < 2; ++ni) {
          const int col = n0 + wn * 16 + ni * 8 + (lane & 3) * 2;
          if (col < N) {
            const float g0 = acc[mi][ni][half * 2], g1 = acc[mi][ni][half * 2 + 1];
            const float u0 = acc[mi][ni + 2][half * 2], u1 = acc[mi][ni + 2][half * 2 + 1];
            *reinterpret_cast<uint32_t *>(orow + col) = pack2<T>(silu(g0) * u0, silu(g1) * u1);
          }
        }
      } else {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int col = n0 + wn * 32 + ni * 8 + (lane & 3) * 2;
          if (col < N) {
            *reinterpret_cast<uint32_t *>(orow + col) =
                pack2<T>(acc[mi][ni][half * 2], acc[mi][ni][half * 2 + 1]);
          }
        }
      }
    }
  }
}

template <typename T, bool kSwiGLU>
int launch_grouped_gemm(const uint16_t *a, const uint32_t *gather, const uint16_t *b0,
                        const uint16_t *b1, uint16_t *out, const uint32_t *expert_offsets,
                        const uint32_t *tile_offsets, int num_tiles, int e, int K, int N,
                        cudaStream_t stream) {
  if (num_tiles == 0) return 0;
  auto kernel = grouped_gemm_kernel<T, kSwiGLU>;
  // Set on every launch: the attribute belongs to the current device, and a process may use
  // several (the call costs far less than the kernel).
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return (int)err;
  const int cols_per_tile = kSwiGLU ? BN / 2 : BN;
  const int col_tiles = (N + cols_per_tile - 1) / cols_per_tile;
  const long long blocks = (long long)num_tiles * col_tiles;
  if (blocks > 0x7fffffffLL) return (int)cudaErrorInvalidConfiguration;
  kernel<<<(unsigned)blocks, kThreads, kSmemBytes, stream>>>(
      reinterpret_cast<const T *>(a), gather, reinterpret_cast<const T *>(b0),
      reinterpret_cast<const T *>(b1), reinterpret_cast<T *>(out), expert_offsets, tile_offsets,
      e, K, N, col_tiles);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" int remoe_expert_up_swiglu_bf16(const uint16_t *x, const uint32_t *pair_token,
                                           const uint16_t *wg, const uint16_t *wu, uint16_t *act,
                                           const uint32_t *expert_offsets,
                                           const uint32_t *tile_offsets, int32_t num_tiles,
                                           int32_t e, int32_t h, int32_t f,
                                           remoe_stream_t stream) {
  return launch_grouped_gemm<__nv_bfloat16, true>(x, pair_token, wg, wu, act, expert_offsets,
                                                  tile_offsets, num_tiles, e, h, f,
                                                  (cudaStream_t)stream);
}

extern "C" int remoe_expert_up_swiglu_f16(const uint16_t *x, const uint32_t *pair_token,
                                          const uint16_t *wg, const uint16_t *wu, uint16_t *act,
                                          const uint32_t *expert_offsets,
                                          const uint32_t *tile_offsets, int32_t num_tiles,
                                          int32_t e, int32_t h, int32_t f,
                                          remoe_stream_t stream) {
  return launch_grouped_gemm<__half, true>(x, pair_token, wg, wu, act, expert_offsets,
                                           tile_offsets, num_tiles, e, h, f,
                                           (cudaStream_t)stream);
}

extern "C" int remoe_expert_down_bf16(const uint16_t *act, const uint16_t *wd, uint16_t *y,
                                      const uint32_t *expert_offsets,
                                      const uint32_t *tile_offsets, int32_t num_tiles, int32_t e,
                                      int32_t h, int32_t f, remoe_stream_t stream) {
  return launch_grouped_gemm<__nv_bfloat16, false>(act, nullptr, wd, nullptr, y, expert_offsets,
                                                   tile_offsets, num_tiles, e, f, h,
                                                   (cudaStream_t)stream);
}

extern "C" int remoe_expert_down_f16(const uint16_t *act, const uint16_t *wd, uint16_t *y,
                                     const uint32_t *expert_offsets,
                                     const uint32_t *tile_offsets, int32_t num_tiles, int32_t e,
                                     int32_t h, int32_t f, remoe_stream_t stream) {
  return launch_grouped_gemm<__half, false>(act, nullptr, wd, nullptr, y, expert_offsets,
                                            tile_offsets, num_tiles, e, f, h,
                                            (cudaStream_t)stream);
}
