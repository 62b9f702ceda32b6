// Split-K's reduction for the down projection. When the routed pairs are few (small batches:
// decode, latency-bound training steps), the down GEMM's output tiles are too few to keep the
// GPU's SMs streaming the expert weights, so its K (= F) is cut into k ranges, each written by
// its own work unit to a plane of partial sums (both GEMM paths, the same ranges). This kernel
// adds the planes in plane order into the first, which then holds y: a fixed order, so the
// result is deterministic and the same on both paths.
#include "common.cuh"

namespace {

__global__ void sum_planes_kernel(float4 *__restrict__ y, int planes, size_t plane_vecs,
                                  const uint32_t *__restrict__ count, int vecs_per_row) {
  const size_t n = (size_t)*count * vecs_per_row;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    float4 acc = y[i];
    for (int s = 1; s < planes; ++s) {
      const float4 v = y[(size_t)s * plane_vecs + i];
      acc.x += v.x;
      acc.y += v.y;
      acc.z += v.z;
      acc.w += v.w;
    }
    y[i] = acc;
  }
}

}  // namespace

extern "C" int remoe_sum_planes_f32(float *y, int32_t planes, int32_t plane_rows,
                                    const uint32_t *count, int32_t h, remoe_stream_t stream) {
  if (planes <= 1 || plane_rows == 0) return 0;
  const size_t plane_vecs = (size_t)plane_rows * (h / 4);
  const int threads = 256;
  const size_t want = (plane_vecs + threads - 1) / threads;
  const int blocks = (int)(want < 1024 ? want : 1024);
  sum_planes_kernel<<<blocks, threads, 0, (cudaStream_t)stream>>>(
      reinterpret_cast<float4 *>(y), planes, plane_vecs, count, h / 4);
  return (int)cudaGetLastError();
}
