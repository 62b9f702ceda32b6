// How fast can the H100 stream one expert weight matrix from HBM, and does the order of the
// reads matter? The small-batch expert GEMMs (config S, decode) are bound by streaming their
// weights (docs/HOPPER_GEMM.md), so this is their floor, measured the way the layer meets it:
// one short kernel per matrix, nothing in L2, timed between CUDA events.
//
// W is Wd's shape, 8 experts x [3072 rows][768] bf16 (37.7 MB, 1536-byte rows), cut into tiles
// of R consecutive rows (a K-major B tile of the row GEMMs). Each CTA walks its tiles in one of
// two orders:
//   strided:  for each 128-byte column chunk, that chunk of every row of the tile: the GEMMs'
//             k-loop order (a TMA box of R rows x 128 bytes per stage);
//   rowmajor: the tile's bytes in address order.
// Every thread keeps eight 16-byte loads in flight (128 KB per CTA). Six copies of W rotate, so
// each launch reads from HBM. Build: tools/hbm-stream/build.sh OUT_DIR (scripts/gpu-bundle
// does); run it on the GPU machine with no arguments.
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <algorithm>
#include <vector>

#include "common.cuh"

constexpr int kRowBytes = 1536;
constexpr int kThreads = 1024;
constexpr int kInFlight = 8;

template <bool kStrided>
__global__ void __launch_bounds__(kThreads) stream_kernel(const char *__restrict__ w, int tiles,
                                                          int rows_per_tile, uint4 *sink) {
  uint4 acc = make_uint4(0, 0, 0, 0);
  const int vecs = rows_per_tile * kRowBytes / 16;  // 16-byte vectors per tile
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const char *base = w + (size_t)tile * rows_per_tile * kRowBytes;
    for (int i0 = 0; i0 < vecs; i0 += kThreads * kInFlight) {
      uint4 v[kInFlight];
#pragma unroll
      for (int j = 0; j < kInFlight; ++j) {
        const int i = i0 + j * kThreads + threadIdx.x;
        v[j] = make_uint4(0, 0, 0, 0);
        if (i >= vecs) continue;
        // strided: vector i is piece i % 8 of row (i / 8) % R in 128-byte chunk i / (8 R).
        const size_t off = kStrided ? (size_t)((i / 8) % rows_per_tile) * kRowBytes +
                                          (i / (8 * rows_per_tile)) * 128 + (i % 8) * 16
                                    : (size_t)i * 16;
        v[j] = __ldcs(reinterpret_cast<const uint4 *>(base + off));
      }
#pragma unroll
      for (int j = 0; j < kInFlight; ++j) xor_into(acc, v[j]);
    }
  }
  // Never true for the memset pattern; keeps the loads from being optimised away.
  if (acc.x == 0x12345678u) sink[blockIdx.x * kThreads + threadIdx.x] = acc;
}

int main() {
  const size_t rows = 8 * 3072;
  const size_t bytes = rows * kRowBytes;
  const int copies = 6;
  char *w;
  CK(cudaMalloc(&w, bytes * copies));
  CK(cudaMemset(w, 1, bytes * copies));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  // One slot per thread of the largest grid (one CTA per SM).
  uint4 *sink;
  CK(cudaMalloc(&sink, (size_t)prop.multiProcessorCount * kThreads * sizeof(uint4)));
  printf("device %s, %d SMs; %.1f MB per launch, median of 10 after 2 warm-ups\n", prop.name,
         prop.multiProcessorCount, bytes / 1e6);
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  printf("%-9s %4s %5s %5s %9s %8s\n", "order", "R", "tiles", "CTAs", "us", "TB/s");
  for (int strided = 1; strided >= 0; --strided)
    for (int r : {256, 128, 64, 32}) {
      int last_grid = 0;
      for (int cap : {prop.multiProcessorCount, 96, 24}) {
        const int tiles = (int)(rows / r), grid = std::min(tiles, cap);
        if (grid == last_grid) continue;  // 256-row tiles: 96 of them, whatever the cap above
        last_grid = grid;
        std::vector<float> ms;
        for (int it = 0; it < 12; ++it) {
          const char *src = w + (size_t)(it % copies) * bytes;
          CK(cudaEventRecord(a));
          if (strided)
            stream_kernel<true><<<grid, kThreads>>>(src, tiles, r, sink);
          else
            stream_kernel<false><<<grid, kThreads>>>(src, tiles, r, sink);
          CK(cudaEventRecord(b));
          CK(cudaEventSynchronize(b));
          float m;
          CK(cudaEventElapsedTime(&m, a, b));
          if (it >= 2) ms.push_back(m);
        }
        CK(cudaGetLastError());
        std::sort(ms.begin(), ms.end());
        const float med = ms[ms.size() / 2];
        printf("%-9s %4d %5d %5d %9.1f %8.2f\n", strided ? "strided" : "rowmajor", r, tiles, grid,
               med * 1e3, bytes / (med * 1e-3) / 1e12);
      }
    }
  return 0;
}
