// Can the small-batch forward's second weight stream hide under the first? At config S and in
// decode the up projection streams Wg and Wu (75.5 MB) and then the down projection streams Wd
// (37.7 MB), each a short kernel well below the data sheet's rate (stream.cu: 1.9 TB/s; the
// plain variants here: 2.3), some of it lost to each kernel's ramp and tail. This times two
// back-to-back kernels shaped like them, A (75.5 MB) then B (37.7 MB), where the first also asks
// L2 to prefetch B (cp.async.bulk.prefetch.L2), under several cache policies, against the two
// plain kernels and against one kernel that streams both. Six copies of [A | B] rotate, so every
// pair of launches starts with nothing of its own in L2 (H100: 50 MB of L2).
//
// Build: tools/hbm-stream/build.sh OUT_DIR; run OUT_DIR/prefetch with no arguments.
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <algorithm>
#include <vector>

#include "common.cuh"

constexpr int kThreads = 1024;
constexpr int kInFlight = 8;
constexpr size_t kTileBytes = (size_t)kThreads * kInFlight * 16;  // 128 KB per CTA step

enum Load { kStreaming = 0, kNormal = 1, kEvictFirst = 2 };
enum Prefetch { kNone = 0, kUpFront = 1, kUpFrontLast = 2, kSpreadLast = 3 };

__device__ __forceinline__ uint64_t policy_evict_last() {
  uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
  return p;
}
__device__ __forceinline__ uint64_t policy_evict_first() {
  uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}
__device__ __forceinline__ void prefetch_l2(const char *p, uint32_t bytes, bool last,
                                            uint64_t pol) {
  if (last)
    asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(p),
                 "r"(bytes), "l"(pol)
                 : "memory");
  else
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}
template <int kLoad>
__device__ __forceinline__ uint4 load16(const char *p, uint64_t pol) {
  if constexpr (kLoad == kStreaming) return __ldcs(reinterpret_cast<const uint4 *>(p));
  if constexpr (kLoad == kNormal) return __ldcg(reinterpret_cast<const uint4 *>(p));
  uint4 v;
  asm volatile("ld.global.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p), "l"(pol));
  return v;
}

// Reads [w, w + bytes) in 128 KB steps, CTA b taking steps b, b + grid, ... Warp 0 of each CTA
// prefetches its share of [pf, pf + pf_bytes) into L2: all at the start, or one slice per step.
template <int kLoad, int kPrefetch>
__global__ void __launch_bounds__(kThreads)
    stream_kernel(const char *__restrict__ w, size_t bytes, const char *pf, size_t pf_bytes,
                  uint4 *sink) {
  const uint64_t pol_last = policy_evict_last(), pol_first = policy_evict_first();
  const size_t steps = bytes / kTileBytes;
  const size_t my_steps = (steps - blockIdx.x + gridDim.x - 1) / gridDim.x;
  // This CTA's share of the prefetch range, cut into 32 pieces (one per lane of warp 0), each a
  // multiple of 16 bytes as the bulk prefetch needs.
  const size_t share = (pf_bytes / gridDim.x) & ~(size_t)15;
  const char *my_pf = pf + share * blockIdx.x;
  if constexpr (kPrefetch == kUpFront || kPrefetch == kUpFrontLast) {
    if (threadIdx.x < 32) {
      const size_t piece = (share / 32) & ~(size_t)15;
      const size_t off = piece * threadIdx.x;
      const size_t len = threadIdx.x == 31 ? share - off : piece;
      if (len > 0) prefetch_l2(my_pf + off, (uint32_t)len, kPrefetch == kUpFrontLast, pol_last);
    }
  }
  uint4 acc = make_uint4(0, 0, 0, 0);
  size_t i_step = 0;
  for (size_t s = blockIdx.x; s < steps; s += gridDim.x, ++i_step) {
    if constexpr (kPrefetch == kSpreadLast) {
      if (threadIdx.x < 32) {
        const size_t slice = (share / my_steps) & ~(size_t)15;
        const size_t piece = (slice / 32) & ~(size_t)15;
        const size_t off = slice * i_step + piece * threadIdx.x;
        const size_t len = (i_step + 1 == my_steps && threadIdx.x == 31) ? share - off : piece;
        if (len > 0) prefetch_l2(my_pf + off, (uint32_t)len, true, pol_last);
      }
    }
    const char *base = w + s * kTileBytes;
    uint4 v[kInFlight];
#pragma unroll
    for (int j = 0; j < kInFlight; ++j)
      v[j] = load16<kLoad>(base + ((size_t)j * kThreads + threadIdx.x) * 16, pol_first);
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) xor_into(acc, v[j]);
  }
  // Never true for the memset pattern; keeps the loads from being optimised away.
  if (acc.x == 0x12345678u) sink[blockIdx.x * kThreads + threadIdx.x] = acc;
}

using Kernel = void (*)(const char *, size_t, const char *, size_t, uint4 *);

struct Variant {
  const char *name;
  Kernel first;   // streams A (or A and B when `second` is null), maybe prefetching B
  bool prefetch;  // pass B as the prefetch range
  Kernel second;  // streams B
  bool b_twice;    // the first kernel streams B too: the second then reads B from L2 at best
};

int main() {
  const size_t a_bytes = 8ull * 2 * 3072 * 768 * 2;  // Wg and Wu: 75.5 MB
  const size_t b_bytes = 8ull * 3072 * 768 * 2;      // Wd: 37.7 MB
  const size_t pair = a_bytes + b_bytes;
  const int copies = 6;
  char *w;
  CK(cudaMalloc(&w, pair * copies));
  CK(cudaMemset(w, 1, pair * copies));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int grid = prop.multiProcessorCount;
  uint4 *sink;
  CK(cudaMalloc(&sink, (size_t)grid * kThreads * sizeof(uint4)));
  printf("device %s, %d SMs, L2 %.1f MB; A %.1f MB then B %.1f MB, one CTA per SM;\n", prop.name,
         grid, prop.l2CacheSize / 1e6, a_bytes / 1e6, b_bytes / 1e6);
  printf("median [min-max] us of 20 after 4 warm-ups, variants interleaved\n");
  const Variant variants[] = {
      {"two kernels, streaming loads", stream_kernel<kStreaming, kNone>, false,
       stream_kernel<kStreaming, kNone>},
      {"one kernel over A and B", stream_kernel<kStreaming, kNone>, false, nullptr},
      {"A prefetches B, no hint", stream_kernel<kStreaming, kUpFront>, true,
       stream_kernel<kNormal, kNone>},
      {"A prefetches B evict_last", stream_kernel<kStreaming, kUpFrontLast>, true,
       stream_kernel<kNormal, kNone>},
      {"  ... B read evict_first", stream_kernel<kStreaming, kUpFrontLast>, true,
       stream_kernel<kEvictFirst, kNone>},
      {"A prefetches B evict_last, spread", stream_kernel<kStreaming, kSpreadLast>, true,
       stream_kernel<kEvictFirst, kNone>},
      {"A (evict_first) prefetches B evict_last", stream_kernel<kEvictFirst, kUpFrontLast>, true,
       stream_kernel<kEvictFirst, kNone>},
      {"B twice (the second from L2 at best)", stream_kernel<kNormal, kNone>, false,
       stream_kernel<kNormal, kNone>, true},
  };
  const int nv = sizeof(variants) / sizeof(variants[0]);
  cudaEvent_t ev[3];
  for (auto &e : ev) CK(cudaEventCreate(&e));
  std::vector<std::vector<float>> total(nv), first(nv), second(nv);
  for (int it = 0; it < 24; ++it)
    for (int v = 0; v < nv; ++v) {
      const Variant &x = variants[v];
      const char *a = w + (size_t)((it * nv + v) % copies) * pair, *b = a + a_bytes;
      CK(cudaEventRecord(ev[0]));
      if (x.second == nullptr) {
        x.first<<<grid, kThreads>>>(a, pair, nullptr, 0, sink);
        CK(cudaEventRecord(ev[1]));
      } else {
        x.first<<<grid, kThreads>>>(x.b_twice ? b : a, x.b_twice ? b_bytes : a_bytes,
                                    x.prefetch ? b : nullptr,
                                    x.prefetch ? b_bytes : 0, sink);
        CK(cudaEventRecord(ev[1]));
        x.second<<<grid, kThreads>>>(b, b_bytes, nullptr, 0, sink);
      }
      CK(cudaEventRecord(ev[2]));
      CK(cudaEventSynchronize(ev[2]));
      float t0, t1;
      CK(cudaEventElapsedTime(&t0, ev[0], ev[1]));
      CK(cudaEventElapsedTime(&t1, ev[1], ev[2]));
      if (it >= 4) {
        total[v].push_back(1e3f * (t0 + t1));
        first[v].push_back(1e3f * t0);
        second[v].push_back(1e3f * t1);
      }
    }
  CK(cudaGetLastError());
  auto med = [](std::vector<float> s) {
    std::sort(s.begin(), s.end());
    return s[s.size() / 2];
  };
  printf("%-42s %22s %9s %9s %8s\n", "variant", "A+B us", "A us", "B us", "TB/s");
  for (int v = 0; v < nv; ++v) {
    const float m = med(total[v]);
    printf("%-42s %8.1f [%5.1f-%5.1f] %9.1f %9.1f %8.2f\n", variants[v].name, m,
           *std::min_element(total[v].begin(), total[v].end()),
           *std::max_element(total[v].begin(), total[v].end()), med(first[v]), med(second[v]),
           pair / (m * 1e-6) / 1e12);
  }
  return 0;
}
