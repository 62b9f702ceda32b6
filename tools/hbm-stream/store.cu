// How fast can the H100 write an f32 weight gradient? At small batches the weight-gradient GEMMs
// (K = an expert's pairs: 64 at config S, 1 in decode) are all epilogue: each writes
// E x F x H f32 (75.5 MB at config S's shape). This times writing that much in several patterns,
// one CTA of 256 threads per SM, interleaved, median of 20 after 4 warm-ups, between CUDA events
// around one launch. The tiled ones cut the output into 128 x 256 tiles (the Hopper GEMMs'),
// taken by the CTAs in turn, each warp owning 16 of a tile's rows as a wgmma accumulator does:
//   linear, linear-cs: every thread stores 16 bytes at a time in address order (the floor),
//              plain or streaming (st.global.cs);
//   epilogue:  the weight-gradient epilogue as it was: each thread stores 8 consecutive
//              columns of rows lane / 4 and lane / 4 + 8 as two float4 per 32-column group, so
//              one instruction writes 16 bytes into each of 8 rows;
//   sectors:   the same registers exchanged inside each quad so that every instruction writes
//              whole 32-byte sectors (64 contiguous bytes of each of 8 rows);
//   rows-R:    each warp writes its 16 rows R at a time, 512 / R contiguous bytes of each;
//   staged:    the tile's rows shared out over the warps (warp w: rows w, w + 8, ...), each
//              warp writing a row's 1 KB in two instructions: what an epilogue staged through
//              shared memory does (kernels/hopper_gemm.cu, store_weight_grad_tile).
// Build: tools/hbm-stream/build.sh OUT_DIR; run OUT_DIR/store with no arguments.
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <algorithm>
#include <vector>

#include "common.cuh"

constexpr int E = 8, M = 3072, N = 768;  // dWd's shape: [E][F][H]
constexpr int BM = 128, BN = 256;
constexpr int kTilesM = M / BM, kTilesN = N / BN, kTiles = E * kTilesM * kTilesN;

// Output tile t: its expert's matrix and its first row and column there.
struct Tile {
  float *out;
  int m0, n0;
};
__device__ __forceinline__ Tile tile_at(float *out, int t) {
  const int e = t / (kTilesM * kTilesN), r = t % (kTilesM * kTilesN);
  return {out + (size_t)e * M * N, r / kTilesN * BM, r % kTilesN * BN};
}

template <bool kStreaming>
__global__ void __launch_bounds__(256) linear(float4 *out, size_t n4, float v) {
  const float4 x = make_float4(v, v, v, v);
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4;
       i += (size_t)gridDim.x * blockDim.x) {
    if (kStreaming)
      __stcs(out + i, x);
    else
      out[i] = x;
  }
}

// The accumulators' layout: each thread owns 8 consecutive columns of rows lane / 4 and
// lane / 4 + 8 of its warp's 16 per 32-column group. kSectors = false stores them as two float4
// (the epilogue as it was); kSectors = true first exchanges the upper halves with the lane two
// away in the quad (__shfl_xor_sync), so that each instruction writes 16 consecutive columns of
// the quad's row: whole 32-byte sectors.
template <bool kSectors>
__global__ void __launch_bounds__(256) accumulator_layout(float *out, float v) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wg = warp >> 2, q = lane & 3;
  for (int t = blockIdx.x; t < kTiles; t += gridDim.x) {
    const Tile tile = tile_at(out, t);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = tile.m0 + wg * 64 + (warp & 3) * 16 + (lane >> 2) + half * 8;
#pragma unroll
      for (int jg = 0; jg < BN / 32; ++jg) {
        const int n = tile.n0 + jg * 32 + q * 8;
        const float b = v + m + n;  // values that differ, as an accumulator's would
        const float4 lo = make_float4(b, b + 1, b + 2, b + 3);
        const float4 hi = make_float4(b + 4, b + 5, b + 6, b + 7);
        float *row = tile.out + (size_t)m * N + tile.n0 + jg * 32;
        if (!kSectors) {
          *reinterpret_cast<float4 *>(row + 8 * q) = lo;
          *reinterpret_cast<float4 *>(row + 8 * q + 4) = hi;
          continue;
        }
        float4 ph;
        ph.x = __shfl_xor_sync(0xffffffffu, hi.x, 2);
        ph.y = __shfl_xor_sync(0xffffffffu, hi.y, 2);
        ph.z = __shfl_xor_sync(0xffffffffu, hi.z, 2);
        ph.w = __shfl_xor_sync(0xffffffffu, hi.w, 2);
        // Columns 0..15 of the group, then 16..31.
        if (q < 2) {
          *reinterpret_cast<float4 *>(row + 8 * q) = lo;
          *reinterpret_cast<float4 *>(row + 8 * q + 20) = ph;
        } else {
          *reinterpret_cast<float4 *>(row + 8 * q - 12) = ph;
          *reinterpret_cast<float4 *>(row + 8 * q) = lo;
        }
      }
    }
  }
}

// Each warp writes its own 16 rows of the tile (as in the epilogue) but R rows per instruction,
// 512 / R contiguous bytes of each: the patterns an epilogue staging one warp's 32- (R = 4), 64-
// (R = 2) or 128-column (R = 1) slice through shared memory could store.
template <int R>
__global__ void __launch_bounds__(256) warp_rows(float *out, float v) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int kCols = 128 / R;  // floats per row per instruction
  for (int t = blockIdx.x; t < kTiles; t += gridDim.x) {
    const Tile tile = tile_at(out, t);
    const int m0 = tile.m0 + warp * 16, n0 = tile.n0;
    float *oe = tile.out;
#pragma unroll
    for (int c = 0; c < BN / kCols; ++c)
#pragma unroll
      for (int rr = 0; rr < 16 / R; ++rr) {
        const int m = m0 + rr * R + lane / (32 / R);
        const int n = n0 + c * kCols + (lane % (32 / R)) * 4;
        const float b = v + m + n;
        *reinterpret_cast<float4 *>(oe + (size_t)m * N + n) = make_float4(b, b + 1, b + 2, b + 3);
      }
  }
}

// Each warp writes whole 512-byte runs of a row: rows warp, warp + 8, ... of the tile, a row's
// 256 floats as two float4 per lane.
__global__ void __launch_bounds__(256) staged(float *out, float v) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int t = blockIdx.x; t < kTiles; t += gridDim.x) {
    const Tile tile = tile_at(out, t);
    const int m0 = tile.m0, n0 = tile.n0;
    float *oe = tile.out;
    for (int row = warp; row < BM; row += 8) {
      float4 *o = reinterpret_cast<float4 *>(oe + (size_t)(m0 + row) * N + n0);
      const float b = v + row;
      o[lane] = make_float4(b, b + 1, b + 2, b + 3);
      o[lane + 32] = make_float4(b + 4, b + 5, b + 6, b + 7);
    }
  }
}

int main() {
  const size_t floats = (size_t)E * M * N, bytes = floats * 4;
  const int copies = 3;
  float *w;
  CK(cudaMalloc(&w, bytes * copies));
  CK(cudaMemset(w, 0, bytes * copies));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int grid = prop.multiProcessorCount;
  printf("device %s, %d SMs; %.1f MB of f32 per launch, %d CTAs of 256\n", prop.name, grid,
         bytes / 1e6, grid);
  const char *names[] = {"linear",  "linear-cs", "epilogue", "staged",
                         "sectors", "rows-1",    "rows-2",   "rows-4"};
  constexpr int kPatterns = 8;
  std::vector<std::vector<float>> us(kPatterns);
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int it = 0; it < 24; ++it)
    for (int k = 0; k < kPatterns; ++k) {
      float *o = w + (size_t)((it * kPatterns + k) % copies) * floats;
      CK(cudaEventRecord(a));
      if (k == 0) linear<false><<<grid, 256>>>(reinterpret_cast<float4 *>(o), floats / 4, 1.f);
      if (k == 1) linear<true><<<grid, 256>>>(reinterpret_cast<float4 *>(o), floats / 4, 1.f);
      if (k == 2) accumulator_layout<false><<<grid, 256>>>(o, 1.f);
      if (k == 3) staged<<<grid, 256>>>(o, 1.f);
      if (k == 4) accumulator_layout<true><<<grid, 256>>>(o, 1.f);
      if (k == 5) warp_rows<1><<<grid, 256>>>(o, 1.f);
      if (k == 6) warp_rows<2><<<grid, 256>>>(o, 1.f);
      if (k == 7) warp_rows<4><<<grid, 256>>>(o, 1.f);
      CK(cudaEventRecord(b));
      CK(cudaEventSynchronize(b));
      float ms;
      CK(cudaEventElapsedTime(&ms, a, b));
      if (it >= 4) us[k].push_back(ms * 1e3f);
    }
  CK(cudaGetLastError());
  printf("%-10s %22s %8s\n", "pattern", "us med [min-max]", "TB/s");
  for (int k = 0; k < kPatterns; ++k) {
    std::sort(us[k].begin(), us[k].end());
    const float m = us[k][us[k].size() / 2];
    printf("%-10s %8.1f [%5.1f-%5.1f] %8.2f\n", names[k], m, us[k].front(), us[k].back(),
           bytes / (m * 1e-6) / 1e12);
  }
  return 0;
}
