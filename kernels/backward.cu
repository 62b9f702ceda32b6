// The layer backward outside the expert GEMMs: per-pair preparation, the router's gradient
// (ReLU with the regulariser's term, or softmax, renormalised over the selection or not, with
// the aux loss's term), the router's share
// of dX, and dWr. No float atomics anywhere: every sum has a fixed order, so two runs give the
// same bits.
#include <float.h>

#include "common.cuh"

namespace {

// One warp per pair p (token t): dy[p] = R[p] * dOut[t] (the expert's output gradient, for
// dWd) and dr[p] = dOut[t] . y[p], the data term of dR, from the dAct GEMM's 32-column group
// sums (kernels/swiglu.cuh): lane l adds groups l, l + 32, ... in ascending order, then the
// warp's butterfly. A fixed order: the same bits on every run and on both GEMM paths.
template <typename T>
__global__ void pair_grad_prep_kernel(const T *__restrict__ dout,
                                      const float *__restrict__ row_dots, int groups,
                                      const uint32_t *__restrict__ pair_token,
                                      const float *__restrict__ pair_gate, T *__restrict__ dy,
                                      float *__restrict__ dr, const uint32_t *__restrict__ count,
                                      int h) {
  const int lane = threadIdx.x & 31;
  const int p = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (p >= (int)*count) return;
  const size_t t = pair_token[p];
  const float gate = pair_gate[p];
  for (int c = lane; c < h / 8; c += 32) {
    float d[8], o[8];
    load8_as_float(dout + t * h + c * 8, d);
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = gate * d[i];
    store8(dy + (size_t)p * h + c * 8, o);
  }
  float dot = 0.f;
  for (int j = lane; j < groups; j += 32) dot += row_dots[(size_t)p * groups + j];
  dot = warp_sum(dot);
  if (lane == 0) dr[p] = dot;
}

// grad_scale * coeff * E / (k T^2), the regulariser's (or aux loss's) gradient per gate, per
// token of n_e. grad_scale is the caller's scale of the balance loss's gradient (the loss scale
// that dOut carries, or 1/micro-batches); it is applied in f64 before the one rounding to f32,
// so a power of two scales the result exactly.
__device__ __forceinline__ float balance_scale(const double *coeff, double grad_scale, int t,
                                               int e, int k) {
  return (float)(grad_scale * *coeff * e / ((double)k * t * t));
}

// ReMoE: dL[t,e] = dR[t,e] + lambda E n_e / (k T^2) where the gate is active (L > 0), else 0.
__global__ void router_grad_relu_kernel(const int32_t *__restrict__ pair_index,
                                        const float *__restrict__ dr,
                                        const uint32_t *__restrict__ counts,
                                        const double *__restrict__ coeff, double grad_scale,
                                        float *__restrict__ dl, int t, int e, int k) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)t * e) return;
  const int32_t p = pair_index[i];
  const int ex = (int)(i % e);
  dl[i] = p >= 0 ? dr[p] + balance_scale(coeff, grad_scale, t, e, k) * (float)counts[ex] : 0.f;
}

// TopK: dP[t,e] = dR[t,e] (selected) + c E n_e / (k T^2) (every pair);
// dL_t = P_t * (dP_t - dP_t . P_t). One warp per token, E <= 512 in registers.
//
// Renormalised TopK (gates != nullptr): the gates G = P / sum_S P on the selection S are the
// softmax over the selected logits, while the aux loss still reads the full softmax P. The two
// Jacobians are taken apart: with dA = c E n_e / (k T^2) (every pair) and dR on S,
//   dL_t = P_t * (dA_t - dA_t . P_t) + G_t * (dR_t - dR_t . G_t),
// G and dR being 0 off S (pair_index < 0), so the second term vanishes there.
constexpr int kPerLane = REMOE_TOPK_MAX_EXPERTS / 32;
__global__ void router_grad_topk_kernel(const int32_t *__restrict__ pair_index,
                                        const float *__restrict__ dr,
                                        const uint32_t *__restrict__ counts,
                                        const float *__restrict__ probs,
                                        const double *__restrict__ coeff, double grad_scale,
                                        float *__restrict__ dl, int t, int e, int k) {
  const int lane = threadIdx.x & 31;
  const int token = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (token >= t) return;
  const float scale = balance_scale(coeff, grad_scale, t, e, k);
  const size_t row = (size_t)token * e;
  float p[kPerLane], dp[kPerLane];
  float dot = 0.f;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int ex = lane + 32 * j;
    p[j] = 0.f;
    dp[j] = 0.f;
    if (ex < e) {
      const int32_t pi = pair_index[row + ex];
      p[j] = probs[row + ex];
      dp[j] = scale * (float)counts[ex] + (pi >= 0 ? dr[pi] : 0.f);
      dot = fmaf(dp[j], p[j], dot);
    }
  }
  dot = warp_sum(dot);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int ex = lane + 32 * j;
    if (ex < e) dl[row + ex] = p[j] * (dp[j] - dot);
  }
}

__global__ void router_grad_topk_normalized_kernel(
    const int32_t *__restrict__ pair_index, const float *__restrict__ dr,
    const uint32_t *__restrict__ counts, const float *__restrict__ probs,
    const float *__restrict__ gates, const double *__restrict__ coeff, double grad_scale,
    float *__restrict__ dl, int t, int e, int k) {
  const int lane = threadIdx.x & 31;
  const int token = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (token >= t) return;
  const float scale = balance_scale(coeff, grad_scale, t, e, k);
  const size_t row = (size_t)token * e;
  float p[kPerLane], da[kPerLane], g[kPerLane], dg[kPerLane];
  float pdot = 0.f, gdot = 0.f;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int ex = lane + 32 * j;
    p[j] = da[j] = g[j] = dg[j] = 0.f;
    if (ex < e) {
      const int32_t pi = pair_index[row + ex];
      p[j] = probs[row + ex];
      da[j] = scale * (float)counts[ex];
      pdot = fmaf(da[j], p[j], pdot);
      // The gate is read only on the selection: off it the gates buffer holds 0 anyway, but a
      // capacity overflow publishes no pair (every pair index -1) while the gates stay, and
      // then no gate has a gradient, as in the unnormalised router.
      if (pi >= 0) {
        g[j] = gates[row + ex];
        dg[j] = dr[pi];
        gdot = fmaf(dg[j], g[j], gdot);
      }
    }
  }
  pdot = warp_sum(pdot);
  gdot = warp_sum(gdot);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int ex = lane + 32 * j;
    if (ex < e) dl[row + ex] = p[j] * (da[j] - pdot) + g[j] * (dg[j] - gdot);
  }
}

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

template <typename T>
int launch_pair_grad_prep(const uint16_t *dout, const float *row_dots, int groups,
                          const uint32_t *pair_token, const float *pair_gate, uint16_t *dy,
                          float *dr, const uint32_t *count, int capacity, int h, cudaStream_t s) {
  if (capacity == 0) return 0;
  // The grid covers the capacity; |A| = *count is read on the device.
  pair_grad_prep_kernel<T><<<(capacity + 7) / 8, 256, 0, s>>>(
      reinterpret_cast<const T *>(dout), row_dots, groups, pair_token, pair_gate,
      reinterpret_cast<T *>(dy), dr, count, h);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_router_backward_dense(const uint16_t *x, const uint16_t *wr, const float *dl,
                                 float *dxr, float *partial, float *dwr, int t, int h, int e,
                                 int slices, int accumulate, cudaStream_t s) {
  if (t > 0) {
    router_dx_kernel<T><<<dim3((t + 63) / 64, (h + 63) / 64), 256, 0, s>>>(
        dl, reinterpret_cast<const T *>(wr), dxr, t, h, e);
    const int per_slice = (t + slices - 1) / slices;
    router_wgrad_partial_kernel<T><<<dim3((h + 63) / 64, (e + 31) / 32, slices), 256, 0, s>>>(
        reinterpret_cast<const T *>(x), dl, partial, t, h, e, per_slice);
  }
  const int n = h * e;
  router_wgrad_reduce_kernel<<<(n + 255) / 256, 256, 0, s>>>(partial, dwr, n, t > 0 ? slices : 0,
                                                             accumulate);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" int remoe_pair_grad_prep_bf16 REMOE_PAIR_GRAD_PREP_PARAMS {
  return launch_pair_grad_prep<__nv_bfloat16>(dout, row_dots, groups, pair_token, pair_gate, dy,
                                              dr, count, capacity, h, (cudaStream_t)stream);
}

extern "C" int remoe_pair_grad_prep_f16 REMOE_PAIR_GRAD_PREP_PARAMS {
  return launch_pair_grad_prep<__half>(dout, row_dots, groups, pair_token, pair_gate, dy, dr,
                                       count, capacity, h, (cudaStream_t)stream);
}

extern "C" int remoe_router_grad(const int32_t *pair_index, const float *dr,
                                 const uint32_t *counts, const float *probs, const float *gates,
                                 const double *coeff, double grad_scale, float *dl, int32_t t,
                                 int32_t e, int32_t k, remoe_stream_t stream) {
  if (t == 0) return 0;
  cudaStream_t s = (cudaStream_t)stream;
  if (probs == nullptr) {
    const size_t n = (size_t)t * e;
    router_grad_relu_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(
        pair_index, dr, counts, coeff, grad_scale, dl, t, e, k);
  } else if (gates != nullptr) {
    router_grad_topk_normalized_kernel<<<(t + 7) / 8, 256, 0, s>>>(
        pair_index, dr, counts, probs, gates, coeff, grad_scale, dl, t, e, k);
  } else {
    router_grad_topk_kernel<<<(t + 7) / 8, 256, 0, s>>>(pair_index, dr, counts, probs, coeff,
                                                        grad_scale, dl, t, e, k);
  }
  return (int)cudaGetLastError();
}

extern "C" int remoe_router_backward_dense_bf16 REMOE_ROUTER_BACKWARD_DENSE_PARAMS {
  return launch_router_backward_dense<__nv_bfloat16>(x, wr, dl, dxr, partial, dwr, t, h, e,
                                                     slices, accumulate, (cudaStream_t)stream);
}

extern "C" int remoe_router_backward_dense_f16 REMOE_ROUTER_BACKWARD_DENSE_PARAMS {
  return launch_router_backward_dense<__half>(x, wr, dl, dxr, partial, dwr, t, h, e, slices,
                                              accumulate, (cudaStream_t)stream);
}
