// Build (from the repo root; cudart linked statically, as pending/pdl-check was):
//   mkdir -p target/xb/cmp && scripts/with-cuda nvcc -O3 -std=c++17 \
//     -gencode arch=compute_90a,code=sm_90a -cudart static -L .toolchain/py/nvidia/cu13/lib \
//     -o target/xb/cmp/router-bwd-check pending/router-bwd-check.cu
// Run: target/xb/cmp/router-bwd-check [--seed N] [--quick] [--no-time]
//   --quick: only the shapes with t * h <= 2^22 (for compute-sanitizer: memcheck, initcheck,
//   racecheck, synccheck); --no-time: skip the timings.
//
// A standalone GPU check of the tensor-core router backward (pending/router-bwd-mma.patch,
// kernels/backward.cu): the OLD fp32 CUDA-core kernels (copied below, namespace old_k) against
// the NEW ones (kernels/backward.cu itself, #included) and an f64 CPU reference, on the bf16
// layer's shapes, with the slice count the crate picks (src/scratch.rs router_wgrad_slices).
//
// Per shape: max abs error and max error relative to the row's largest |reference| (rows of dxr
// are tokens, rows of dWr are columns of X) for old and new; whether two runs of the new entry
// point give the same bits (dxr and dWr, the partial buffer poisoned in between); guard words
// around every output (out-of-bounds writes) and a count of non-finite outputs (a write missed:
// outputs start as NaN, the inputs are finite); the accumulate contract (dWr += exactly the
// non-accumulating result; t == 0 leaves dWr as it was, or zero). Times (CUDA events, 5
// warm-ups, median of 20): dxr alone, dWr alone (partial + reduce), the whole entry point, each
// old and new, and for information the new dWr with each tile width (bn32, bn64).
//
// Accuracy bound: the new kernels split dL into two bf16 terms, which drops up to 2^-16 |dL| per
// element (about 2^-18 on average; 5e-6 to 1.4e-5 of the row maximum on such inputs in a CPU
// model), while the old kernels' plain f32 sums err about 1e-7 (dxr, 128 terms) to a few 1e-6
// (dWr, thousands of terms). "rel" is the error over the row's largest |reference| (as asked);
// "cond" is the error over the row's largest sum of |terms| (sum |dL W| or sum |X dL|), against
// which the split's error is at most 2^-16 whatever the cancellation. A shape fails when
// new cond > 4 x old cond + 2^-15; the column "1e-6" says whether new rel <= 4 x old rel + 1e-6
// also holds (expected "no" on most shapes for the 2-term split: its design error, not a bug).
// A wrong fragment, bound or slice errs by O(1); a dropped lo term by about 2^-9.
//
// Exit status: 0 when every shape passes, 1 otherwise (2: a CUDA error).

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../kernels/backward.cu"

#define CK(call)                                                                          \
  do {                                                                                    \
    cudaError_t err_ = (call);                                                            \
    if (err_ != cudaSuccess) {                                                            \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                       \
              cudaGetErrorString(err_));                                                  \
      exit(2);                                                                            \
    }                                                                                     \
  } while (0)

namespace old_k {

// dxr [t, h] = dL [t, e] Wr^T, f32: the router's share of dX. A 64-token x 64-column tile per
// block, E walked in chunks of 32 through shared memory, 4 x 4 outputs per thread.
template <typename T>
__global__ void __launch_bounds__(256)
    router_dx_kernel(const float *__restrict__ dl, const T *__restrict__ wr,
                     float *__restrict__ dxr, int t, int h, int e) {
  __shared__ float ls[32][65];  // [e][token]
  __shared__ float ws[32][65];  // [e][h]
  const int token0 = blockIdx.x * 64, col0 = blockIdx.y * 64;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int e0 = 0; e0 < e; e0 += 32) {
    for (int i = threadIdx.x; i < 64 * 32; i += 256) {
      const int r = i / 32, c = i % 32;  // r: token or column, c: expert (coalesced along e)
      const int ex = e0 + c;
      ls[c][r] = (token0 + r < t && ex < e) ? dl[(size_t)(token0 + r) * e + ex] : 0.f;
      ws[c][r] = (col0 + r < h && ex < e) ? to_float(wr[(size_t)(col0 + r) * e + ex]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = ls[c][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = ws[c][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int token = token0 + ty * 4 + i;
    if (token >= t) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = col0 + tx + 16 * j;
      if (col < h) dxr[(size_t)token * h + col] = acc[i][j];
    }
  }
}

// dWr [h, e] = X^T dL, in two steps so that the long reduction over T is both parallel and
// fixed in order: each block sums its slice of T into partial[slice] (64 columns of X by 32
// experts), then one pass adds the slices in order.
constexpr int kWrTokens = 32;
template <typename T>
__global__ void __launch_bounds__(256)
    router_wgrad_partial_kernel(const T *__restrict__ x, const float *__restrict__ dl,
                                float *__restrict__ partial, int t, int h, int e,
                                int tokens_per_slice) {
  __shared__ float xs[kWrTokens][65];  // [token][column]
  __shared__ float ls[kWrTokens][33];  // [token][expert]
  const int col0 = blockIdx.x * 64, e0 = blockIdx.y * 32;
  const int slice = blockIdx.z;
  const int tbeg = slice * tokens_per_slice, tend = min(t, tbeg + tokens_per_slice);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 16 expert pairs x 16 column quads
  float acc[4][2] = {};
  for (int t0 = tbeg; t0 < tend; t0 += kWrTokens) {
    // X: 32 tokens x 64 columns = 256 vectors of 8.
    {
      const int r = threadIdx.x / 8, c = (threadIdx.x % 8) * 8;
      float v[8];
      if (t0 + r < tend && col0 + c < h) {
        load8_as_float(x + (size_t)(t0 + r) * h + col0 + c, v);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) xs[r][c + i] = v[i];
    }
    for (int i = threadIdx.x; i < kWrTokens * 32; i += 256) {
      const int r = i / 32, c = i % 32;
      ls[r][c] = (t0 + r < tend && e0 + c < e) ? dl[(size_t)(t0 + r) * e + e0 + c] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int r = 0; r < kWrTokens; ++r) {
      float a[4], b[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xs[r][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 2; ++j) b[j] = ls[r][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  float *out = partial + (size_t)slice * h * e;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int col = col0 + ty * 4 + i;
    if (col >= h) continue;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int ex = e0 + tx + 16 * j;
      if (ex < e) out[(size_t)col * e + ex] = acc[i][j];
    }
  }
}

__global__ void router_wgrad_reduce_kernel(const float *__restrict__ partial,
                                           float *__restrict__ dwr, int n, int slices,
                                           int accumulate) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  // This batch's gradient first, then added to what the buffer holds: accumulating a
  // gradient twice gives exactly twice it, whatever the number of slices.
  float s = 0.f;
  for (int sl = 0; sl < slices; ++sl) s += partial[(size_t)sl * n + i];
  dwr[i] = accumulate ? dwr[i] + s : s;
}

// The launcher as it was (kernels/backward.cu before the change).
template <typename T>
void launch(const T *x, const T *wr, const float *dl, float *dxr, float *partial, float *dwr,
            int t, int h, int e, int slices, int accumulate, cudaStream_t s) {
  if (t > 0) {
    router_dx_kernel<T><<<dim3((t + 63) / 64, (h + 63) / 64), 256, 0, s>>>(dl, wr, dxr, t, h, e);
    const int per_slice = (t + slices - 1) / slices;
    router_wgrad_partial_kernel<T><<<dim3((h + 63) / 64, (e + 31) / 32, slices), 256, 0, s>>>(
        x, dl, partial, t, h, e, per_slice);
  }
  const int n = h * e;
  router_wgrad_reduce_kernel<<<(n + 255) / 256, 256, 0, s>>>(partial, dwr, n, t > 0 ? slices : 0,
                                                             accumulate);
}

}  // namespace old_k

namespace {

// src/scratch.rs router_wgrad_slices, copied.
int wgrad_slices(int t, int h, int e) {
  const int blocks_per_slice = ((h + 63) / 64) * ((e + 31) / 32);
  const int fill = std::max(1, (264 + blocks_per_slice - 1) / blocks_per_slice);
  return std::min(std::max((t + 255) / 256, 1), fill);
}

// The new launcher's pieces, launched one at a time for the timings (kept equal to
// router_dense_products in kernels/backward.cu).
void new_dx(const __nv_bfloat16 *wr, const float *dl, float *dxr, int t, int h, int e,
            cudaStream_t s) {
  const dim3 grid((t + kDxTokens - 1) / kDxTokens, (h + kDxCols - 1) / kDxCols);
  if (e % 8 == 0) {
    router_dx_mma_kernel<true><<<grid, 256, 0, s>>>(dl, wr, dxr, t, h, e);
  } else {
    router_dx_mma_kernel<false><<<grid, 256, 0, s>>>(dl, wr, dxr, t, h, e);
  }
}

// bn 0: the launcher's choice.
void new_dw(const __nv_bfloat16 *x, const float *dl, float *partial, float *dwr, int t, int h,
            int e, int slices, int bn, cudaStream_t s) {
  if (bn == 0) bn = e <= 32 ? 32 : 64;
  const bool vec = e % 8 == 0;
  const int per_slice = (t + slices - 1) / slices;
  const dim3 grid((e + bn - 1) / bn, (h + kDwCols - 1) / kDwCols, slices);
  auto kernel = bn == 32 ? (vec ? router_wgrad_mma_kernel<32, true>
                                : router_wgrad_mma_kernel<32, false>)
                         : (vec ? router_wgrad_mma_kernel<64, true>
                                : router_wgrad_mma_kernel<64, false>);
  kernel<<<grid, 256, 0, s>>>(x, dl, partial, t, h, e, per_slice);
  const int n = h * e;
  router_wgrad_reduce_kernel<<<(n + 255) / 256, 256, 0, s>>>(partial, dwr, n, slices, 0);
}

void old_dx(const __nv_bfloat16 *wr, const float *dl, float *dxr, int t, int h, int e,
            cudaStream_t s) {
  old_k::router_dx_kernel<__nv_bfloat16>
      <<<dim3((t + 63) / 64, (h + 63) / 64), 256, 0, s>>>(dl, wr, dxr, t, h, e);
}

void old_dw(const __nv_bfloat16 *x, const float *dl, float *partial, float *dwr, int t, int h,
            int e, int slices, cudaStream_t s) {
  const int per_slice = (t + slices - 1) / slices;
  old_k::router_wgrad_partial_kernel<__nv_bfloat16>
      <<<dim3((h + 63) / 64, (e + 31) / 32, slices), 256, 0, s>>>(x, dl, partial, t, h, e,
                                                                   per_slice);
  const int n = h * e;
  old_k::router_wgrad_reduce_kernel<<<(n + 255) / 256, 256, 0, s>>>(partial, dwr, n, slices, 0);
}

__global__ void count_nonfinite(const float *p, size_t n, unsigned long long *out) {
  unsigned long long c = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x)
    c += !isfinite(p[i]);
  if (c) atomicAdd(out, c);
}

__global__ void count_bit_diffs(const uint32_t *a, const uint32_t *b, size_t n,
                                unsigned long long *out) {
  unsigned long long c = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x)
    c += a[i] != b[i];
  if (c) atomicAdd(out, c);
}

unsigned long long *g_counter;

unsigned long long nonfinite(const float *p, size_t n) {
  CK(cudaMemset(g_counter, 0, 8));
  if (n) count_nonfinite<<<1024, 256>>>(p, n, g_counter);
  unsigned long long c;
  CK(cudaMemcpy(&c, g_counter, 8, cudaMemcpyDeviceToHost));
  return c;
}

unsigned long long bit_diffs(const float *a, const float *b, size_t n) {
  CK(cudaMemset(g_counter, 0, 8));
  if (n)
    count_bit_diffs<<<1024, 256>>>(reinterpret_cast<const uint32_t *>(a),
                                   reinterpret_cast<const uint32_t *>(b), n, g_counter);
  unsigned long long c;
  CK(cudaMemcpy(&c, g_counter, 8, cudaMemcpyDeviceToHost));
  return c;
}

// An f32 device buffer of n values with kGuard guard words on each side (0x7fbadbad, a NaN that
// no kernel writes), filled with 0xffffffff (NaN) so that a value never written shows.
constexpr size_t kGuard = 64;  // 256 bytes: the buffer stays 256-byte aligned
constexpr uint32_t kGuardWord = 0x7fbadbadu;

struct Buf {
  float *base = nullptr;
  size_t n = 0;
  float *p() const { return base + kGuard; }
  void alloc(size_t count) {
    n = count;
    CK(cudaMalloc(&base, (n + 2 * kGuard) * 4));
    std::vector<uint32_t> g(kGuard, kGuardWord);
    CK(cudaMemcpy(base, g.data(), kGuard * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(base + kGuard + n, g.data(), kGuard * 4, cudaMemcpyHostToDevice));
    poison();
  }
  void poison() const { CK(cudaMemset(p(), 0xff, n * 4)); }
  bool guards_ok() const {
    std::vector<uint32_t> a(kGuard), b(kGuard);
    CK(cudaMemcpy(a.data(), base, kGuard * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(b.data(), base + kGuard + n, kGuard * 4, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < kGuard; ++i)
      if (a[i] != kGuardWord || b[i] != kGuardWord) return false;
    return true;
  }
  void release() {
    if (base) CK(cudaFree(base));
    base = nullptr;
  }
};

uint64_t splitmix(uint64_t &s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
double unit(uint64_t &s) { return (double)(splitmix(s) >> 11) * 0x1p-53; }
double normal(uint64_t &s) {
  const double u = 1.0 - unit(s), v = unit(s);
  return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
}

uint16_t bf16_bits(float f) {  // round to nearest even; the inputs are finite
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
float bf16_float(uint16_t b) {
  const uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

struct Times {
  float dx = NAN, dw = NAN, all = NAN;
};

template <typename F>
float median_ms(F &&launch, bool timed) {
  if (!timed) return NAN;
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 5; ++i) launch();
  std::vector<float> ms;
  for (int i = 0; i < 20; ++i) {
    CK(cudaEventRecord(a));
    launch();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float m;
    CK(cudaEventElapsedTime(&m, a, b));
    ms.push_back(m);
  }
  CK(cudaGetLastError());
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return 0.5f * (ms[9] + ms[10]);
}

struct Err {
  double abs = 0, rel = 0, cond = 0;
};

// Max |got - want|, and over rows the max of max |got - want| / max |want| (rel) and of
// max |got - want| / max sum |terms| (cond); a row whose reference is all zero must be zero
// (inf otherwise).
void row_err(const std::vector<double> &want, const std::vector<double> &terms, const float *got,
             int cols, Err &err) {
  const int rows = cols ? (int)(want.size() / cols) : 0;
  auto ratio = [](double d, double m) { return m > 0 ? d / m : (d > 0 ? INFINITY : 0.0); };
  for (int r = 0; r < rows; ++r) {
    double m = 0, ma = 0, d = 0;
    for (int c = 0; c < cols; ++c) {
      const size_t i = (size_t)r * cols + c;
      m = std::max(m, std::fabs(want[i]));
      ma = std::max(ma, terms[i]);
      d = std::max(d, std::isfinite(got[i]) ? std::fabs(got[i] - want[i]) : INFINITY);
    }
    err.abs = std::max(err.abs, d);
    err.rel = std::max(err.rel, ratio(d, m));
    err.cond = std::max(err.cond, ratio(d, ma));
  }
}

struct Row {
  int t, h, e, slices;
  Err dx_old, dx_new, dw_old, dw_new;
  bool repeat = true, guards = true, finite = true, accum = true, pass = true, brief = true;
  Times old_t, new_t;
  float dw_bn32 = NAN, dw_bn64 = NAN;
};

}  // namespace

int main(int argc, char **argv) {
  uint64_t seed = (uint64_t)std::chrono::steady_clock::now().time_since_epoch().count();
  bool quick = false, timed = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--seed" && i + 1 < argc) {
      seed = strtoull(argv[++i], nullptr, 0);
    } else if (a == "--quick") {
      quick = true;
    } else if (a == "--no-time") {
      timed = false;
    } else {
      fprintf(stderr, "usage: %s [--seed N] [--quick] [--no-time]\n", argv[0]);
      return 2;
    }
  }
  int dev;
  cudaDeviceProp prop;
  CK(cudaGetDevice(&dev));
  CK(cudaGetDeviceProperties(&prop, dev));
  printf("device %s (sm_%d%d, %d SMs); seed %llu (rerun with --seed %llu)\n", prop.name,
         prop.major, prop.minor, prop.multiProcessorCount, (unsigned long long)seed,
         (unsigned long long)seed);
  CK(cudaMalloc(&g_counter, 8));

  const int shapes[][3] = {{0, 768, 8},         {1, 768, 8},         {1009, 776, 5},
                           {16384, 768, 8},     {16384, 768, 64},    {40960, 768, 128},
                           {24576, 1536, 128},  {16384, 2048, 128},  {32768, 4096, 128},
                           {512, 768, 512}};
  // Twice the split's largest error against sum |terms| (see the top of the file).
  const double kSplitSlack = 0x1p-15, kBriefSlack = 1e-6;
  std::vector<Row> rows;
  bool all_pass = true;
  for (const auto &sh : shapes) {
    const int t = sh[0], h = sh[1], e = sh[2];
    if (quick && (size_t)t * h > (1u << 22)) continue;
    Row row{t, h, e, wgrad_slices(t, h, e)};
    const int slices = row.slices;
    uint64_t rng = seed ^ ((uint64_t)t * 0x9e3779b1u + (uint64_t)h * 0x85ebca6bu + e);
    // Inputs: X, Wr ~ U(-1, 1) in bf16; dL: 70% exact zeros, the rest N(0, 1e-3), one in 200
    // of those N(0, 1) (the large values a row's maximum comes from).
    std::vector<uint16_t> x((size_t)t * h), wr((size_t)h * e);
    std::vector<float> dl((size_t)t * e);
    for (auto &v : x) v = bf16_bits((float)(2.0 * unit(rng) - 1.0));
    for (auto &v : wr) v = bf16_bits((float)(2.0 * unit(rng) - 1.0));
    for (auto &v : dl) {
      const double u = unit(rng);
      v = u < 0.7 ? 0.f : (float)(normal(rng) * (u < 0.7015 ? 1.0 : 1e-3));
    }
    __nv_bfloat16 *d_x, *d_wr;
    float *d_dl;
    CK(cudaMalloc(&d_x, std::max<size_t>(x.size(), 8) * 2));
    CK(cudaMalloc(&d_wr, wr.size() * 2));
    CK(cudaMalloc(&d_dl, std::max<size_t>(dl.size(), 8) * 4));
    if (t) {
      CK(cudaMemcpy(d_x, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(d_dl, dl.data(), dl.size() * 4, cudaMemcpyHostToDevice));
    }
    CK(cudaMemcpy(d_wr, wr.data(), wr.size() * 2, cudaMemcpyHostToDevice));
    const size_t nx = (size_t)t * h, nw = (size_t)h * e, np = (size_t)slices * h * e;
    Buf dxr_old, dxr_new, dxr_new2, part_old, part_new, dwr_old, dwr_new, dwr_new2;
    for (Buf *b : {&dxr_old, &dxr_new, &dxr_new2}) b->alloc(std::max<size_t>(nx, 1));
    for (Buf *b : {&part_old, &part_new}) b->alloc(np);
    for (Buf *b : {&dwr_old, &dwr_new, &dwr_new2}) b->alloc(nw);

    // Correctness, through the real entry point.
    old_k::launch(d_x, d_wr, d_dl, dxr_old.p(), part_old.p(), dwr_old.p(), t, h, e, slices, 0, 0);
    CK(cudaGetLastError());
    int rc = remoe_router_backward_dense_bf16(
        reinterpret_cast<const uint16_t *>(d_x), reinterpret_cast<const uint16_t *>(d_wr), d_dl,
        dxr_new.p(), part_new.p(), dwr_new.p(), t, h, e, slices, 0, nullptr);
    if (rc) {
      fprintf(stderr, "entry point returned %d (%s)\n", rc, cudaGetErrorString((cudaError_t)rc));
      return 2;
    }
    part_new.poison();
    rc = remoe_router_backward_dense_bf16(
        reinterpret_cast<const uint16_t *>(d_x), reinterpret_cast<const uint16_t *>(d_wr), d_dl,
        dxr_new2.p(), part_new.p(), dwr_new2.p(), t, h, e, slices, 0, nullptr);
    CK(cudaDeviceSynchronize());
    row.repeat = rc == 0 && bit_diffs(dxr_new.p(), dxr_new2.p(), nx) == 0 &&
                 bit_diffs(dwr_new.p(), dwr_new2.p(), nw) == 0;
    row.finite = nonfinite(dxr_new.p(), nx) == 0 && nonfinite(dwr_new.p(), nw) == 0 &&
                 nonfinite(dxr_old.p(), nx) == 0 && nonfinite(dwr_old.p(), nw) == 0;

    // The accumulate contract: dWr (+)= ..., added after the slices' sum.
    {
      std::vector<float> base(nw), acc(nw), plain(nw);
      for (auto &v : base) v = (float)(2.0 * unit(rng) - 1.0);
      CK(cudaMemcpy(dwr_new2.p(), base.data(), nw * 4, cudaMemcpyHostToDevice));
      rc = remoe_router_backward_dense_bf16(
          reinterpret_cast<const uint16_t *>(d_x), reinterpret_cast<const uint16_t *>(d_wr),
          d_dl, dxr_new2.p(), part_new.p(), dwr_new2.p(), t, h, e, slices, 1, nullptr);
      CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(acc.data(), dwr_new2.p(), nw * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(plain.data(), dwr_new.p(), nw * 4, cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < nw && row.accum; ++i) {
        const float want = base[i] + plain[i];
        row.accum = rc == 0 && memcmp(&want, &acc[i], 4) == 0;
      }
      if (t == 0) {  // and without accumulate, zeros
        for (size_t i = 0; i < nw && row.accum; ++i) row.accum = plain[i] == 0.f;
      }
    }

    // The f64 reference on rows: every token's and every column's where cheap, else samples.
    std::vector<int> toks, cols;
    const bool full_dx = (size_t)t * h * e <= (1u << 26), full_dw = (size_t)t * h * e <= (1u << 27);
    auto sample = [&](int n, int count, std::vector<int> &out, bool full) {
      if (full || n <= count) {
        for (int i = 0; i < n; ++i) out.push_back(i);
        return;
      }
      out = {0, n - 1};
      while ((int)out.size() < count) out.push_back((int)(unit(rng) * n));
    };
    sample(t, 256, toks, full_dx);
    sample(h, 64, cols, full_dw);
    {
      std::vector<double> want((size_t)toks.size() * h), terms(want.size());
      std::vector<float> got_old(want.size()), got_new(want.size());
      for (size_t i = 0; i < toks.size(); ++i) {
        const size_t tk = toks[i];
        for (int ex = 0; ex < e; ++ex) {
          const double d = dl[tk * e + ex];
          if (d == 0) continue;
          for (int c = 0; c < h; ++c) {
            const double p = d * bf16_float(wr[(size_t)c * e + ex]);
            want[i * h + c] += p;
            terms[i * h + c] += std::fabs(p);
          }
        }
        CK(cudaMemcpy(&got_old[i * h], dxr_old.p() + tk * h, h * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(&got_new[i * h], dxr_new.p() + tk * h, h * 4, cudaMemcpyDeviceToHost));
      }
      row_err(want, terms, got_old.data(), h, row.dx_old);
      row_err(want, terms, got_new.data(), h, row.dx_new);
    }
    {
      std::vector<double> want((size_t)cols.size() * e), terms(want.size());
      std::vector<float> all_old(nw), all_new(nw), got_old(want.size()), got_new(want.size());
      CK(cudaMemcpy(all_old.data(), dwr_old.p(), nw * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(all_new.data(), dwr_new.p(), nw * 4, cudaMemcpyDeviceToHost));
      for (size_t tk = 0; tk < (size_t)t; ++tk)
        for (int ex = 0; ex < e; ++ex) {
          const double d = dl[tk * e + ex];
          if (d == 0) continue;
          for (size_t i = 0; i < cols.size(); ++i) {
            const double p = d * bf16_float(x[tk * h + cols[i]]);
            want[i * e + ex] += p;
            terms[i * e + ex] += std::fabs(p);
          }
        }
      for (size_t i = 0; i < cols.size(); ++i)
        for (int ex = 0; ex < e; ++ex) {
          got_old[i * e + ex] = all_old[(size_t)cols[i] * e + ex];
          got_new[i * e + ex] = all_new[(size_t)cols[i] * e + ex];
        }
      row_err(want, terms, got_old.data(), e, row.dw_old);
      row_err(want, terms, got_new.data(), e, row.dw_new);
    }

    // Times: each piece alone, then the whole entry point.
    const bool time_it = timed && t > 0;
    row.old_t.dx = median_ms([&] { old_dx(d_wr, d_dl, dxr_old.p(), t, h, e, 0); }, time_it);
    row.new_t.dx = median_ms([&] { new_dx(d_wr, d_dl, dxr_new.p(), t, h, e, 0); }, time_it);
    row.old_t.dw = median_ms(
        [&] { old_dw(d_x, d_dl, part_old.p(), dwr_old.p(), t, h, e, slices, 0); }, time_it);
    row.new_t.dw = median_ms(
        [&] { new_dw(d_x, d_dl, part_new.p(), dwr_new.p(), t, h, e, slices, 0, 0); }, time_it);
    row.dw_bn32 = median_ms(
        [&] { new_dw(d_x, d_dl, part_new.p(), dwr_new2.p(), t, h, e, slices, 32, 0); }, time_it);
    row.dw_bn64 = median_ms(
        [&] { new_dw(d_x, d_dl, part_new.p(), dwr_new2.p(), t, h, e, slices, 64, 0); }, time_it);
    row.old_t.all = median_ms(
        [&] {
          old_k::launch(d_x, d_wr, d_dl, dxr_old.p(), part_old.p(), dwr_old.p(), t, h, e, slices,
                        0, 0);
        },
        time_it);
    row.new_t.all = median_ms(
        [&] {
          remoe_router_backward_dense_bf16(reinterpret_cast<const uint16_t *>(d_x),
                                           reinterpret_cast<const uint16_t *>(d_wr), d_dl,
                                           dxr_new.p(), part_new.p(), dwr_new.p(), t, h, e,
                                           slices, 0, nullptr);
        },
        time_it);
    CK(cudaDeviceSynchronize());
    for (const Buf *b : {&dxr_old, &dxr_new, &dxr_new2, &part_old, &part_new, &dwr_old, &dwr_new,
                         &dwr_new2})
      row.guards = row.guards && b->guards_ok();

    const bool acc_ok = row.dx_new.cond <= 4 * row.dx_old.cond + kSplitSlack &&
                        row.dw_new.cond <= 4 * row.dw_old.cond + kSplitSlack;
    row.brief = row.dx_new.rel <= 4 * row.dx_old.rel + kBriefSlack &&
                row.dw_new.rel <= 4 * row.dw_old.rel + kBriefSlack;
    row.pass = acc_ok && row.repeat && row.guards && row.finite && row.accum;
    all_pass = all_pass && row.pass;

    const int bn = e <= 32 ? 32 : 64;
    printf("\n== t %d h %d e %d: slices %d; new dWr tile 64 x %d, %d blocks (old %d)\n", t, h, e,
           slices, bn, ((e + bn - 1) / bn) * ((h + 63) / 64) * slices,
           ((e + 31) / 32) * ((h + 63) / 64) * slices);
    printf("  rows checked: dxr %zu of %d%s, dWr %zu of %d%s\n", toks.size(), t,
           full_dx ? " (all)" : "", cols.size(), h, full_dw ? " (all)" : "");
    printf("  dxr  old: max abs %.3e rel %.3e cond %.3e | new: max abs %.3e rel %.3e cond %.3e\n",
           row.dx_old.abs, row.dx_old.rel, row.dx_old.cond, row.dx_new.abs, row.dx_new.rel,
           row.dx_new.cond);
    printf("  dWr  old: max abs %.3e rel %.3e cond %.3e | new: max abs %.3e rel %.3e cond %.3e\n",
           row.dw_old.abs, row.dw_old.rel, row.dw_old.cond, row.dw_new.abs, row.dw_new.rel,
           row.dw_new.cond);
    printf("  new bitwise repeatable: %s; guards intact: %s; all outputs written and finite: %s; "
           "accumulate contract: %s\n",
           row.repeat ? "yes" : "NO", row.guards ? "yes" : "NO", row.finite ? "yes" : "NO",
           row.accum ? "yes" : "NO");
    if (time_it) {
      const double flop = 2.0 * t * h * e;
      printf("  dxr  old %8.1f us  new %8.1f us  x%.2f  (new %.0f TFLOP/s of the f32 product, "
             "%.0f GB/s of dxr written)\n",
             1e3 * row.old_t.dx, 1e3 * row.new_t.dx, row.old_t.dx / row.new_t.dx,
             flop / (1e9 * row.new_t.dx), 4.0 * t * h / (1e6 * row.new_t.dx));
      printf("  dWr  old %8.1f us  new %8.1f us  x%.2f  (new %.0f TFLOP/s; bn32 %.1f us, bn64 "
             "%.1f us)\n",
             1e3 * row.old_t.dw, 1e3 * row.new_t.dw, row.old_t.dw / row.new_t.dw,
             flop / (1e9 * row.new_t.dw), 1e3 * row.dw_bn32, 1e3 * row.dw_bn64);
      printf("  all  old %8.1f us  new %8.1f us  x%.2f\n", 1e3 * row.old_t.all,
             1e3 * row.new_t.all, row.old_t.all / row.new_t.all);
    }
    printf("  %s\n", row.pass ? "PASS" : "FAIL");
    rows.push_back(row);

    for (Buf *b : {&dxr_old, &dxr_new, &dxr_new2, &part_old, &part_new, &dwr_old, &dwr_new,
                   &dwr_new2})
      b->release();
    CK(cudaFree(d_x));
    CK(cudaFree(d_wr));
    CK(cudaFree(d_dl));
  }

  printf("\n%-19s %6s | %-19s | %-19s | %4s %4s | %-22s | %-22s | %s\n", "t,h,e", "slices",
         "dxr rel old/new", "dWr rel old/new", "rep", "1e-6", "dxr us old/new (x)",
         "dWr us old/new (x)", "result");
  for (const Row &r : rows) {
    char shape[32], dx[32], dw[32], tdx[40], tdw[40];
    snprintf(shape, sizeof shape, "%d,%d,%d", r.t, r.h, r.e);
    snprintf(dx, sizeof dx, "%.1e/%.1e", r.dx_old.rel, r.dx_new.rel);
    snprintf(dw, sizeof dw, "%.1e/%.1e", r.dw_old.rel, r.dw_new.rel);
    if (std::isnan(r.new_t.dx)) {
      snprintf(tdx, sizeof tdx, "-");
      snprintf(tdw, sizeof tdw, "-");
    } else {
      snprintf(tdx, sizeof tdx, "%.1f/%.1f (%.2f)", 1e3 * r.old_t.dx, 1e3 * r.new_t.dx,
               r.old_t.dx / r.new_t.dx);
      snprintf(tdw, sizeof tdw, "%.1f/%.1f (%.2f)", 1e3 * r.old_t.dw, 1e3 * r.new_t.dw,
               r.old_t.dw / r.new_t.dw);
    }
    printf("%-19s %6d | %-19s | %-19s | %4s %4s | %-22s | %-22s | %s\n", shape, r.slices, dx, dw,
           r.repeat ? "yes" : "NO", r.brief ? "yes" : "no", tdx, tdw, r.pass ? "PASS" : "FAIL");
  }
  printf("%s\n", all_pass ? "ALL PASS" : "SOME FAILED");
  return all_pass ? 0 : 1;
}
