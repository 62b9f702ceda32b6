// Router forward: logits = X Wr with f32 accumulation, gates = ReLU(logits).
//
// The router GEMM is thin (E is 1..512 while H is ~1K): its floor is reading X once (9 us at
// T 16384, H 768 on an H100). Two kernels:
// - E % 8 == 0 (16-byte rows of Wr): the tensor cores (router_mma_kernel below, mma.sync, every
//   architecture from sm_80); at E = 64 the FMA kernel needed 89 us.
// - Otherwise (rows of Wr that are not 16-byte multiples) FMA: one block computes a 64-token x
//   TE-expert tile, walking H in chunks of 32: the X chunk (bf16/f16) is read with 16-byte loads, widened to
// f32 and stored transposed in shared memory so that every thread of a warp reads a different
// token's value as a broadcast-free row; the Wr chunk is stored as is. Each thread then owns an
// RM x RE register tile of outputs. TE is chosen from E so that E = 8 does not waste 7/8 of a
// 64-wide tile. H must be a multiple of 8 (one 16-byte vector); the safe layer checks it.
//
// The epilogue also produces this block's routing statistics (per expert: how many of its 64
// tokens have a gate > 0, and the sum of their gates). The gates go through shared memory and
// one thread per expert sums its column in token order, so the sums are the same on every run;
// the compaction turns these per-block figures into offsets without re-reading the gates.
//
// Non-finite logits (the crate's policy, mirrored by the CPU reference): a logit that is NaN or
// +-Inf gets the gate 0 (the pair is inactive, exactly as for a logit <= 0), is stored as it is
// in `logits`, and is reported through the error word (when given): error_flags[0] counts such
// logits (atomicAdd), error_flags[1] holds the bitwise complement of the lowest token that had
// one (atomicMax of ~token, so 0 means none). Only the rare non-finite path touches the word: no
// cost otherwise, and no host synchronisation.
#include "mma_sync.cuh"
#include "relu_gate.cuh"

namespace {

constexpr int kTokensPerBlock = REMOE_ROUTER_TOKENS_PER_BLOCK;
constexpr int kChunkH = 32;
constexpr int kThreads = 256;

// From the gates of one block's tile (64 tokens x TE experts, in shared memory), per expert of
// the tile: the number of gates > 0 and their sum, summed in token order (the same on
// every run).
template <int TE>
__device__ __forceinline__ void block_statistics(const float (*tile)[TE + 1], int expert0, int e,
                                                 uint32_t *block_counts, float *block_sums) {
  if (threadIdx.x < TE && expert0 + (int)threadIdx.x < e) {
    uint32_t count = 0;
    float sum = 0.f;
    for (int r = 0; r < kTokensPerBlock; ++r) {
      const float g = tile[r][threadIdx.x];
      count += g > 0.f;
      sum += g;
    }
    const size_t o = (size_t)blockIdx.x * e + expert0 + threadIdx.x;
    block_counts[o] = count;
    block_sums[o] = sum;
  }
}

template <typename T, int TE, int RM, int RE>
__global__ void __launch_bounds__(kThreads)
    router_forward_kernel(const T *__restrict__ x, const T *__restrict__ wr,
                          float *__restrict__ logits, float *__restrict__ gates,
                          uint32_t *__restrict__ block_counts, float *__restrict__ block_sums,
                          uint32_t *__restrict__ error_flags, int t, int h, int e) {
  constexpr int kCols = TE / RE;  // threads across experts
  static_assert(kCols * (kTokensPerBlock / RM) == kThreads, "thread tile must cover the block");

  // Main loop: the X chunk transposed (+1 float of padding per row keeps the transposed store
  // free of bank conflicts) and the Wr chunk. Epilogue: the gate tile, for the statistics.
  constexpr int kMainFloats = kChunkH * (kTokensPerBlock + 1) + kChunkH * TE;
  constexpr int kTileFloats = kTokensPerBlock * (TE + 1);
  __shared__ float smem[kMainFloats > kTileFloats ? kMainFloats : kTileFloats];
  float(*xs)[kTokensPerBlock + 1] = reinterpret_cast<float(*)[kTokensPerBlock + 1]>(smem);
  float(*ws)[TE] = reinterpret_cast<float(*)[TE]>(smem + kChunkH * (kTokensPerBlock + 1));

  const int token0 = blockIdx.x * kTokensPerBlock;
  const int expert0 = blockIdx.y * TE;
  const int tx = threadIdx.x % kCols;  // expert column group
  const int ty = threadIdx.x / kCols;  // token row group

  float acc[RM][RE];
#pragma unroll
  for (int i = 0; i < RM; ++i)
#pragma unroll
    for (int j = 0; j < RE; ++j) acc[i][j] = 0.f;

  for (int k0 = 0; k0 < h; k0 += kChunkH) {
    // X chunk: 64 tokens x 32 values = 256 vectors of 8, one per thread.
    {
      const int row = threadIdx.x / (kChunkH / 8);
      const int vec = threadIdx.x % (kChunkH / 8);
      const int token = token0 + row;
      const int k = k0 + vec * 8;
      float v[8];
      if (token < t && k < h) {
        load8_as_float(x + (size_t)token * h + k, v);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) xs[vec * 8 + i][row] = v[i];
    }
    // Wr chunk: 32 rows of TE experts, coalesced along the expert axis.
    for (int idx = threadIdx.x; idx < kChunkH * TE; idx += kThreads) {
      const int kk = idx / TE;
      const int ee = idx % TE;
      const int k = k0 + kk;
      const int expert = expert0 + ee;
      ws[kk][ee] = (k < h && expert < e) ? to_float(wr[(size_t)k * e + expert]) : 0.f;
    }
    __syncthreads();

#pragma unroll 8
    for (int kk = 0; kk < kChunkH; ++kk) {
      float xv[RM], wv[RE];
#pragma unroll
      for (int i = 0; i < RM; ++i) xv[i] = xs[kk][ty * RM + i];
#pragma unroll
      for (int j = 0; j < RE; ++j) wv[j] = ws[kk][tx + j * kCols];
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < RE; ++j) acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
    }
    __syncthreads();
  }

  // The loop ended on a barrier, so the shared memory is free for the gate tile.
  float(*tile)[TE + 1] = reinterpret_cast<float(*)[TE + 1]>(smem);
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int row = ty * RM + i;
    const int token = token0 + row;
#pragma unroll
    for (int j = 0; j < RE; ++j) {
      const int col = tx + j * kCols;
      tile[row][col] =
          relu_gate(acc[i][j], token, expert0 + col, t, e, logits, gates, error_flags);
    }
  }
  if (block_counts == nullptr) return;
  __syncthreads();
  block_statistics<TE>(tile, expert0, e, block_counts, block_sums);
}

// The tensor-core router: a block computes 64 tokens x 64 experts with 4 warps (16 tokens x 64
// experts each: 8 m16n8k16 tiles), walking H in chunks of 64 through four cp.async stages. The
// loop is bound by load latency (about two blocks per SM at T = 16384), so what matters is the
// bytes in flight: two stages of 64 or four of 32 took 24-27 us at E = 8..64. Rows are padded by 8
// values so that ldmatrix's eight 16-byte row reads hit distinct banks. Requires e % 8 == 0 and
// h % 8 == 0 (16-byte aligned rows of Wr and X).
constexpr int kMmaThreads = 128;
constexpr int kMmaK = 64;
constexpr int kMmaStages = 4;
constexpr int kXPitch = kMmaK + 8;  // X chunk [64 tokens][64 k]
constexpr int kWPitch = 64 + 8;     // Wr chunk [64 k][64 experts]
constexpr int kMmaStageElems = 64 * kXPitch + kMmaK * kWPitch;
constexpr int kMmaSmemBytes = kMmaStages * kMmaStageElems * 2;  // > the gate tile's 16.6 KB

template <typename T>
__global__ void __launch_bounds__(kMmaThreads)
    router_mma_kernel(const T *__restrict__ x, const T *__restrict__ wr,
                      float *__restrict__ logits, float *__restrict__ gates,
                      uint32_t *__restrict__ block_counts, float *__restrict__ block_sums,
                      uint32_t *__restrict__ error_flags, int t, int h, int e) {
  constexpr int kStageElems = kMmaStageElems;
  static_assert(kMmaSmemBytes >= kTokensPerBlock * (64 + 1) * 4, "the gate tile reuses the stages");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *stages = reinterpret_cast<T *>(smem_raw);

  const int token0 = blockIdx.x * kTokensPerBlock;
  const int expert0 = blockIdx.y * 64;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  // Each thread copies 4 chunks of 16 bytes of X and 4 of Wr per stage.
  auto load_stage = [&](int stage, int k0) {
    T *xs = stages + stage * kStageElems;
    T *ws = xs + 64 * kXPitch;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int id = threadIdx.x + i * kMmaThreads;
      const int row = id >> 3, chunk = id & 7;  // X: 64 rows of 8 chunks
      const int token = token0 + row, k = k0 + chunk * 8;
      const bool xok = token < t && k < h;
      cp_async16(xs + row * kXPitch + chunk * 8, xok ? (const void *)(x + (size_t)token * h + k) : x,
                 xok ? 16 : 0);
      const int kr = k0 + (id >> 3), wchunk = id & 7;  // Wr: 64 rows of 8 chunks
      const int expert = expert0 + wchunk * 8;
      const bool wok = kr < h && expert < e;
      cp_async16(ws + (id >> 3) * kWPitch + wchunk * 8,
                 wok ? (const void *)(wr + (size_t)kr * e + expert) : wr, wok ? 16 : 0);
    }
  };

  float acc[8][4];
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[n][v] = 0.f;

  const int chunks = (h + kMmaK - 1) / kMmaK;
#pragma unroll
  for (int c = 0; c < kMmaStages - 1; ++c) {
    if (c < chunks) load_stage(c, c * kMmaK);
    cp_async_commit();
  }
  for (int c = 0; c < chunks; ++c) {
    cp_async_wait<kMmaStages - 2>();
    __syncthreads();  // chunk c has landed for every thread; chunk c - 1's stage is free
    const int next = c + kMmaStages - 1;
    if (next < chunks) load_stage(next % kMmaStages, next * kMmaK);
    cp_async_commit();
    const T *xs = stages + (c % kMmaStages) * kStageElems;
    const T *ws = xs + 64 * kXPitch;
#pragma unroll
    for (int ks = 0; ks < kMmaK / 16; ++ks) {
      uint32_t a[4];
      ldmatrix_x4(a, xs + (warp * 16 + (lane & 15)) * kXPitch + ks * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        const int k = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldmatrix_x4_trans(b, ws + k * kWPitch + np * 16 + (lane >> 4) * 8);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma16816<T>(acc[2 * np], a, b0);
        mma16816<T>(acc[2 * np + 1], a, b1);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages: the memory becomes the gate tile
  float(*tile)[64 + 1] = reinterpret_cast<float(*)[64 + 1]>(smem_raw);
#pragma unroll
  for (int n = 0; n < 8; ++n) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int row = warp * 16 + (lane >> 2) + (v >> 1) * 8;
      const int col = n * 8 + (lane & 3) * 2 + (v & 1);
      tile[row][col] =
          relu_gate(acc[n][v], token0 + row, expert0 + col, t, e, logits, gates, error_flags);
    }
  }
  if (block_counts == nullptr) return;
  __syncthreads();
  block_statistics<64>(tile, expert0, e, block_counts, block_sums);
}

template <typename T>
int launch_router_forward(const uint16_t *x, const uint16_t *wr, float *logits, float *gates,
                          uint32_t *block_counts, float *block_sums, uint32_t *error_flags, int t,
                          int h, int e, cudaStream_t stream) {
  if (t == 0 || e == 0) return 0;
  const T *xt = reinterpret_cast<const T *>(x);
  const T *wt = reinterpret_cast<const T *>(wr);
  const int token_blocks = (t + kTokensPerBlock - 1) / kTokensPerBlock;
  if (e % 8 == 0) {
    // Set on every launch: the attribute belongs to the current device.
    const cudaError_t err = cudaFuncSetAttribute(
        router_mma_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, kMmaSmemBytes);
    if (err != cudaSuccess) return (int)err;
    router_mma_kernel<T><<<dim3(token_blocks, (e + 63) / 64), kMmaThreads, kMmaSmemBytes, stream>>>(
        xt, wt, logits, gates, block_counts, block_sums, error_flags, t, h, e);
  } else if (e <= 8) {
    router_forward_kernel<T, 8, 2, 1>
        <<<dim3(token_blocks, 1), kThreads, 0, stream>>>(xt, wt, logits, gates, block_counts, block_sums, error_flags, t, h, e);
  } else if (e <= 16) {
    router_forward_kernel<T, 16, 4, 1>
        <<<dim3(token_blocks, 1), kThreads, 0, stream>>>(xt, wt, logits, gates, block_counts, block_sums, error_flags, t, h, e);
  } else {
    router_forward_kernel<T, 64, 4, 4><<<dim3(token_blocks, (e + 63) / 64), kThreads, 0, stream>>>(
        xt, wt, logits, gates, block_counts, block_sums, error_flags, t, h, e);
  }
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" int remoe_router_forward_bf16 REMOE_ROUTER_FORWARD_PARAMS {
  return launch_router_forward<__nv_bfloat16>(x, wr, logits, gates, block_counts, block_sums,
                                              error_flags, t, h, e, (cudaStream_t)stream);
}

extern "C" int remoe_router_forward_f16 REMOE_ROUTER_FORWARD_PARAMS {
  return launch_router_forward<__half>(x, wr, logits, gates, block_counts, block_sums,
                                       error_flags, t, h, e, (cudaStream_t)stream);
}
