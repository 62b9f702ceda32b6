// Split-K's reduction for the down projection. When the routed pairs are few (small batches:
// decode, latency-bound training steps), the down GEMM's output tiles are too few to keep the
// GPU's SMs streaming the expert weights, so its K (= F) is cut into k ranges, each written by
// its own work unit to a plane of f32 partial sums (both GEMM paths, the same ranges). This
// kernel adds the planes in plane order and rounds the total once to the element type, into y:
// a fixed order, so the result is deterministic and the same on both paths, and y gets the one
// rounding an unsplit launch gives it in its epilogue.
#include "common.cuh"

namespace {

// One thread per 8 columns of a row: two 16-byte loads per plane, one 16-byte store.
template <typename T>
__global__ void sum_planes_kernel(const float *__restrict__ partials, int planes,
                                  size_t plane_elems, const uint32_t *__restrict__ count,
                                  int chunks_per_row, T *__restrict__ y) {
  const size_t n = (size_t)*count * chunks_per_row;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    float acc[8], v[8];
    load8_as_float(partials + i * 8, acc);
    for (int s = 1; s < planes; ++s) {
      load8_as_float(partials + (size_t)s * plane_elems + i * 8, v);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += v[j];
    }
    store8(y + i * 8, acc);
  }
}

template <typename T>
int launch_sum_planes(const float *partials, int planes, int plane_rows, const uint32_t *count,
                      uint16_t *y, int h, cudaStream_t stream) {
  if (planes < 1 || plane_rows == 0) return 0;
  if (partials == nullptr || count == nullptr || y == nullptr || h % 8 != 0)
    return (int)cudaErrorInvalidValue;
  const int chunks_per_row = h / 8;
  const size_t plane_elems = (size_t)plane_rows * h;
  const int threads = 256;
  const size_t want = ((size_t)plane_rows * chunks_per_row + threads - 1) / threads;
  const int blocks = (int)(want < 1024 ? want : 1024);
  if (blocks == 0) return 0;
  sum_planes_kernel<T><<<blocks, threads, 0, stream>>>(partials, planes, plane_elems, count,
                                                       chunks_per_row, reinterpret_cast<T *>(y));
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" int remoe_sum_planes_bf16 REMOE_SUM_PLANES_PARAMS {
  return launch_sum_planes<__nv_bfloat16>(partials, planes, plane_rows, count, y, h,
                                          (cudaStream_t)stream);
}

extern "C" int remoe_sum_planes_f16 REMOE_SUM_PLANES_PARAMS {
  return launch_sum_planes<__half>(partials, planes, plane_rows, count, y, h,
                                   (cudaStream_t)stream);
}
