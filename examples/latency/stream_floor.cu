// The streaming floor of examples/latency.rs: plain kernels that move a given number of bytes
// through HBM and do nothing else, timed in the same run as the layer on the same bytes. Not
// part of the library: the example loads the PTX beside this file (stream_floor.ptx) through
// cudarc. Modelled on tools/hbm-stream (prefetch.cu's plain kernel read one weight matrix at
// 2.3 TB/s): one CTA of 1024 threads per SM, 16-byte streaming accesses in address order, each
// thread keeping eight loads in flight.
//
// Regenerate the PTX after a change (the pinned nvcc; the driver compiles compute_80 PTX for the
// H100 when the module is loaded):
//
//   scripts/with-cuda nvcc -ptx -arch=compute_80 -O3 -o examples/latency/stream_floor.ptx \
//       examples/latency/stream_floor.cu
#include <stdint.h>

constexpr int kThreads = 1024;  // the launch's block size (the example launches exactly this)
constexpr int kInFlight = 8;    // 16-byte loads in flight per thread: 128 KB per CTA

// Reads src[0, n) (n 16-byte vectors) once, grid-stride: round r reads vectors
// r * G * 8 + j * G + t for j < 8 (G the grid's threads, t this thread's index), so each warp
// load is 512 contiguous bytes and every CTA takes part in every round. The loaded data is folded
// into a value that is stored only when it equals `salt`, which the compiler cannot know: so
// the loads stay. (The example fills the buffers with a pattern whose fold is 0 and passes a
// non-zero salt: nothing is stored.) `sink` holds one uint4 per thread of the grid.
__device__ __forceinline__ void fold(uint4 &acc, const uint4 (&v)[kInFlight]) {
#pragma unroll
  for (int j = 0; j < kInFlight; ++j) {
    acc.x ^= v[j].x;
    acc.y ^= v[j].y;
    acc.z ^= v[j].z;
    acc.w ^= v[j].w;
  }
}

extern "C" __global__ void __launch_bounds__(kThreads)
    stream_read(const uint4 *__restrict__ src, unsigned long long n, uint4 *__restrict__ sink,
                unsigned int salt) {
  const unsigned long long threads = (unsigned long long)gridDim.x * kThreads;
  const unsigned long long me = (unsigned long long)blockIdx.x * kThreads + threadIdx.x;
  const unsigned long long round = threads * kInFlight;
  uint4 acc = make_uint4(0, 0, 0, 0);
  uint4 v[kInFlight];
  unsigned long long base = 0;
  // Whole rounds: eight unconditional loads issued back to back, then folded.
  for (; base + round <= n; base += round) {
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) v[j] = __ldcs(src + base + j * threads + me);
    fold(acc, v);
  }
  // The last, partial round.
  if (base < n) {
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) {
      const unsigned long long i = base + j * threads + me;
      v[j] = i < n ? __ldcs(src + i) : make_uint4(0, 0, 0, 0);
    }
    fold(acc, v);
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == salt) sink[me] = acc;
}

// Writes dst[0, n) (n 16-byte vectors) with `value` in every word, grid-stride in address
// order with streaming stores (st.global.cs): what tools/hbm-stream/store.cu measured as the
// store floor (its "linear-cs").
extern "C" __global__ void __launch_bounds__(kThreads)
    stream_write(uint4 *__restrict__ dst, unsigned long long n, unsigned int value) {
  const unsigned long long threads = (unsigned long long)gridDim.x * kThreads;
  const uint4 v = make_uint4(value, value, value, value);
  for (unsigned long long i = (unsigned long long)blockIdx.x * kThreads + threadIdx.x; i < n;
       i += threads)
    __stcs(dst + i, v);
}
