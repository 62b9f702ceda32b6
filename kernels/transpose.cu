// Batched transpose with a dtype conversion: dst[b][c][r] = convert(src[b][r][c]), from f32 to
// bf16 or f16 and back.
//
// The candle layer keeps its trainable weights at a checkpoint's names and layout (each expert's
// [out, in] matrix, usually f32 masters) and every forward turns them into the kernels' stacked
// [E, in, out] compute-dtype tensors; every backward turns the gradients back. Done with candle's
// ops that is a strided copy whose reads (or writes) are 4 to 8 bytes out of each 32-byte sector,
// and a separate cast pass. Here one pass does both, through a shared-memory tile, so that global
// reads and writes are both along rows (full sectors).
#include "common.cuh"

namespace {

constexpr int kTile = 32;
// 32 x 8 threads: each moves 4 elements of the 32 x 32 tile in and 4 out.
constexpr int kRowsPerPass = 8;

__device__ __forceinline__ float load_as_float(const float *p) { return __ldg(p); }
__device__ __forceinline__ float load_as_float(const __nv_bfloat16 *p) {
  return __bfloat162float(__ldg(p));
}
__device__ __forceinline__ float load_as_float(const __half *p) { return __half2float(__ldg(p)); }

// Round to nearest even, as candle's `to_dtype` does, so that the staged tensors are the ones
// the candle ops made, bit for bit (NaN stays NaN, infinities stay).
__device__ __forceinline__ void store_from_float(float *p, float v) { *p = v; }
__device__ __forceinline__ void store_from_float(__nv_bfloat16 *p, float v) {
  *p = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void store_from_float(__half *p, float v) { *p = __float2half_rn(v); }

// Every element goes through f32 (exact for bf16 and f16 inputs); a conversion to 16 bits rounds
// once, with the intrinsic candle's CUDA cast uses, NaN included (it comes out canonical).
template <typename In, typename Out>
__global__ void __launch_bounds__(kTile *kRowsPerPass)
    transpose_cast_kernel(const In *__restrict__ src, Out *__restrict__ dst, int rows, int cols) {
  // One padding column: a column of the tile read below touches 32 different banks.
  __shared__ float tile[kTile][kTile + 1];
  const size_t plane = (size_t)rows * cols;
  src += blockIdx.z * plane;
  dst += blockIdx.z * plane;
  const int r0 = blockIdx.y * kTile, c0 = blockIdx.x * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  // Read along src's rows: lane tx takes column c0 + tx.
#pragma unroll
  for (int i = ty; i < kTile; i += kRowsPerPass) {
    const int r = r0 + i, c = c0 + tx;
    if (r < rows && c < cols) tile[i][tx] = load_as_float(src + (size_t)r * cols + c);
  }
  __syncthreads();
  // Write along dst's rows (src's columns): lane tx takes dst column r0 + tx.
#pragma unroll
  for (int i = ty; i < kTile; i += kRowsPerPass) {
    const int c = c0 + i, r = r0 + tx;
    if (c < cols && r < rows) store_from_float(dst + (size_t)c * rows + r, tile[tx][i]);
  }
}

template <typename In, typename Out>
int launch(const void *src, void *dst, int32_t batches, int32_t rows, int32_t cols,
           remoe_stream_t stream) {
  if (batches == 0 || rows == 0 || cols == 0) return 0;
  // 64-bit: cols may be up to INT32_MAX.
  const dim3 grid((unsigned)(((int64_t)cols + kTile - 1) / kTile),
                  (unsigned)(((int64_t)rows + kTile - 1) / kTile), (unsigned)batches);
  const dim3 block(kTile, kRowsPerPass);
  transpose_cast_kernel<In, Out><<<grid, block, 0, (cudaStream_t)stream>>>(
      static_cast<const In *>(src), static_cast<Out *>(dst), rows, cols);
  return (int)cudaGetLastError();
}

}  // namespace

#define REMOE_TRANSPOSE(name, In, Out, in_c, out_c)                                            \
  extern "C" int remoe_transpose_##name(const in_c *src, out_c *dst, int32_t batches,          \
                                        int32_t rows, int32_t cols, remoe_stream_t stream) {   \
    return launch<In, Out>(src, dst, batches, rows, cols, stream);                             \
  }

REMOE_TRANSPOSE(f32_to_bf16, float, __nv_bfloat16, float, uint16_t)
REMOE_TRANSPOSE(f32_to_f16, float, __half, float, uint16_t)
REMOE_TRANSPOSE(bf16_to_f32, __nv_bfloat16, float, uint16_t, float)
REMOE_TRANSPOSE(f16_to_f32, __half, float, uint16_t, float)
