// What the HBM microbenchmarks share.
#pragma once
#include <cuda_runtime.h>
#include <stdio.h>

// Host: on a CUDA error, print it and return 1 from main.
#define CK(x)                                                                        \
  do {                                                                               \
    cudaError_t e_ = (x);                                                            \
    if (e_ != cudaSuccess) {                                                         \
      printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      return 1;                                                                      \
    }                                                                                \
  } while (0)

// Device: folds loaded data into a value the kernel may store, so that the loads stay.
__device__ __forceinline__ void xor_into(uint4 &acc, const uint4 &v) {
  acc.x ^= v.x;
  acc.y ^= v.y;
  acc.z ^= v.z;
  acc.w ^= v.w;
}
