// Router forward: logits = X Wr with f32 accumulation, gates = ReLU(logits).
//
// The router GEMM is thin (E is 1..512 while H is ~1K), so at E <= 64 it is bound by reading X
// once; past that the FMA rate starts to matter. One block computes a 64-token x TE-expert
// tile, walking H in chunks of 32: the X chunk (bf16/f16) is read with 16-byte loads, widened to
// f32 and stored transposed in shared memory so that every thread of a warp reads a different
// token's value as a broadcast-free row; the Wr chunk is stored as is. Each thread then owns an
// RM x RE register tile of outputs. TE is chosen from E so that E = 8 does not waste 7/8 of a
// 64-wide tile. H must be a multiple of 8 (one 16-byte vector); the safe layer checks it.
//
// The epilogue also produces this block's routing statistics (per expert: how many of its 64
// tokens have a gate > 0, and the sum of their gates). The gates go through shared memory and
// one thread per expert sums its column in token order, so the sums are the same on every run;
// the compaction turns these per-block figures into offsets without re-reading the gates.
#include "common.cuh"

namespace {

constexpr int kTokensPerBlock = REMOE_ROUTER_TOKENS_PER_BLOCK;
constexpr int kChunkH = 32;
constexpr int kThreads = 256;

template <typename T, int TE, int RM, int RE>
__global__ void __launch_bounds__(kThreads)
    router_forward_kernel(const T *__restrict__ x, const T *__restrict__ wr,
                          float *__restrict__ logits, float *__restrict__ gates,
                          uint32_t *__restrict__ block_counts, float *__restrict__ block_sums,
                          int t, int h, int e) {
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
      const int expert = expert0 + col;
      const float gate = fmaxf(acc[i][j], 0.f);
      tile[row][col] = token < t ? gate : 0.f;
      if (token < t && expert < e) {
        const size_t o = (size_t)token * e + expert;
        logits[o] = acc[i][j];
        gates[o] = gate;
      }
    }
  }
  if (block_counts == nullptr) return;
  __syncthreads();
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

template <typename T>
int launch_router_forward(const uint16_t *x, const uint16_t *wr, float *logits, float *gates,
                          uint32_t *block_counts, float *block_sums, int t, int h, int e,
                          cudaStream_t stream) {
  if (t == 0 || e == 0) return 0;
  const T *xt = reinterpret_cast<const T *>(x);
  const T *wt = reinterpret_cast<const T *>(wr);
  const int token_blocks = (t + kTokensPerBlock - 1) / kTokensPerBlock;
  if (e <= 8) {
    router_forward_kernel<T, 8, 2, 1>
        <<<dim3(token_blocks, 1), kThreads, 0, stream>>>(xt, wt, logits, gates, block_counts, block_sums, t, h, e);
  } else if (e <= 16) {
    router_forward_kernel<T, 16, 4, 1>
        <<<dim3(token_blocks, 1), kThreads, 0, stream>>>(xt, wt, logits, gates, block_counts, block_sums, t, h, e);
  } else {
    router_forward_kernel<T, 64, 4, 4><<<dim3(token_blocks, (e + 63) / 64), kThreads, 0, stream>>>(
        xt, wt, logits, gates, block_counts, block_sums, t, h, e);
  }
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" int remoe_router_forward_bf16(const uint16_t *x, const uint16_t *wr, float *logits,
                                         float *gates, uint32_t *block_counts, float *block_sums,
                                         int32_t t, int32_t h, int32_t e, remoe_stream_t stream) {
  return launch_router_forward<__nv_bfloat16>(x, wr, logits, gates, block_counts, block_sums, t,
                                              h, e, (cudaStream_t)stream);
}

extern "C" int remoe_router_forward_f16(const uint16_t *x, const uint16_t *wr, float *logits,
                                        float *gates, uint32_t *block_counts, float *block_sums,
                                        int32_t t, int32_t h, int32_t e, remoe_stream_t stream) {
  return launch_router_forward<__half>(x, wr, logits, gates, block_counts, block_sums, t, h, e,
                                       (cudaStream_t)stream);
}
