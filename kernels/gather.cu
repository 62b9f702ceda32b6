// Row gather: out[p, :] = x[rows[p], :], the routed tokens' rows in pair order. The Hopper
// weight-gradient kernel reads its operands by TMA, which cannot gather, so the backward gives it
// this copy of X (|A| H elements) for dWg and dWu instead of the gather inside the load that the
// mma.sync path uses. |A| is read on the device (the grid covers the capacity), so the launch
// needs nothing from the host.
#include "common.cuh"

namespace {

// One warp per row, 16-byte vectors: h % 8 == 0 and 16-byte aligned rows.
__global__ void gather_rows_kernel(const uint4 *__restrict__ x, const uint32_t *__restrict__ rows,
                                   uint4 *__restrict__ out, const uint32_t *__restrict__ count,
                                   uint32_t capacity, int vecs_per_row) {
  // A count past the buffers' capacity (a broken contract) stops at the capacity.
  const int pairs = (int)min(*count, capacity);
  const int warps = (blockDim.x * gridDim.x) >> 5;
  const int lane = threadIdx.x & 31;
  for (int p = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; p < pairs; p += warps) {
    const uint4 *src = x + (size_t)rows[p] * vecs_per_row;
    uint4 *dst = out + (size_t)p * vecs_per_row;
    for (int v = lane; v < vecs_per_row; v += 32) dst[v] = __ldg(src + v);
  }
}

}  // namespace

extern "C" int remoe_gather_rows_16(const uint16_t *x, const uint32_t *rows, uint16_t *out,
                                    const uint32_t *count, int32_t capacity, int32_t h,
                                    remoe_stream_t stream) {
  if (capacity == 0) return 0;
  const int threads = 256;
  const long long warps_needed = capacity;
  const int blocks = (int)((warps_needed * 32 + threads - 1) / threads < 4096
                               ? (warps_needed * 32 + threads - 1) / threads
                               : 4096);
  gather_rows_kernel<<<blocks, threads, 0, (cudaStream_t)stream>>>(
      reinterpret_cast<const uint4 *>(x), rows, reinterpret_cast<uint4 *>(out), count, (uint32_t)capacity, h / 8);
  return (int)cudaGetLastError();
}
