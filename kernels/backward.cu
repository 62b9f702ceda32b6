// The layer backward outside the expert GEMMs: each pair's dR, the router's gradient (ReLU with
// the regulariser's term, or softmax, renormalised over the selection or not, with the aux
// loss's term), the router's share of dX, and dWr. No float atomics anywhere: every sum has a
// fixed order, so two runs give the same bits.
#include <float.h>

#include "mma_sync.cuh"

namespace {

// One warp per pair p: dr[p] = dOut[t] . y[p], the data term of dR (with y = act Wd unrounded,
// not the forward's stored y, which is rounded to T), from the dAct GEMM's 32-column group sums
// of act . (dOut[t] Wd^T) (kernels/swiglu.cuh): lane l adds groups l, l + 32, ... in ascending
// order, then the warp's butterfly. A fixed order: the same bits on every run and on both GEMM
// paths. (It also wrote dy[p] = R[p] dOut[t] for dWd once; the dAct GEMM now writes R act
// instead, and dWd reads dOut's rows through the pairs: kernels/remoe_kernels.h.)
__global__ void pair_dr_kernel(const float *__restrict__ row_dots, int groups,
                               float *__restrict__ dr, const uint32_t *__restrict__ count) {
  const int lane = threadIdx.x & 31;
  const int p = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (p >= (int)*count) return;
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

// The router's dense gradients, dxr [t, h] = dL [t, e] Wr^T (the router's share of dX, f32) and
// dWr [h, e] = X^T dL, the latter in two steps so that the long reduction over T is both parallel
// and fixed in order: each block sums its slice of T into partial[slice], then one pass adds the
// slices in order.
//
// bf16 runs both products on the tensor cores (mma.sync m16n8k16, sm_80 and later: one kernel for
// both GEMM paths). X and Wr are exact in bf16, dL (f32) is not: it enters as two bf16 terms,
// hi = bf16(dL) and lo = bf16(dL - hi) (the subtraction is exact), both multiplied into the same
// f32 accumulators. Every product is then exact, and what the split drops, dL - hi - lo, is at
// most 2^-16 |dL| (about 2^-18 on average): about what f32 sums over thousands of tokens already
// lose in dWr (in dxr, over E terms, f32 alone loses some 50 times less), and far below the bf16
// rounding of the values dL is computed from. A third term would reach f32's rounding, for 1.5x
// the MMAs.
//
// f16 keeps the CUDA-core kernels (*_simt below): f16 X and Wr are not exact in bf16, and an f16
// split of dL would underflow (f16's smallest subnormal, 6e-8, is above many dL values) unless
// it were rescaled per row. bf16 is the layer whose speed matters.

// Eight dL values as their hi and lo bf16 terms, packed 8 to a uint4. Where hi is not finite, lo
// is 0: inf - inf would make a NaN of an infinite gradient that the f32 product keeps infinite.
__device__ __forceinline__ void split_bf16x8(const float v[8], uint4 &hi, uint4 &lo) {
  uint32_t h[4], l[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 p = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    const float2 pf = __bfloat1622float2(p);
    const float r0 = fabsf(pf.x) <= FLT_MAX ? v[2 * i] - pf.x : 0.f;
    const float r1 = fabsf(pf.y) <= FLT_MAX ? v[2 * i + 1] - pf.y : 0.f;
    const __nv_bfloat162 q = __floats2bfloat162_rn(r0, r1);
    h[i] = reinterpret_cast<const uint32_t &>(p);
    l[i] = reinterpret_cast<const uint32_t &>(q);
  }
  hi = make_uint4(h[0], h[1], h[2], h[3]);
  lo = make_uint4(l[0], l[1], l[2], l[3]);
}

// dL [row, c0 .. c0 + 8), zero past either end. kVec (e % 8 == 0): a chunk is all in or all out
// and 32-byte aligned; otherwise (e = 1, 3, ...: rows not even 8-byte aligned) one value at a time.
template <bool kVec>
__device__ __forceinline__ void load_dl8(const float *__restrict__ dl, size_t row, bool row_in,
                                         int c0, int e, float v[8]) {
  if (kVec) {
    if (row_in && c0 < e) {
      load8_as_float(dl + row * e + c0, v);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = 0.f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = row_in && c0 + i < e ? __ldg(dl + row * e + c0 + i) : 0.f;
  }
}

// Wr [col, c0 .. c0 + 8) as 8 raw bf16, zero past either end (kVec as in load_dl8).
template <bool kVec>
__device__ __forceinline__ uint4 load_wr8(const __nv_bfloat16 *__restrict__ wr, int col, int h,
                                          int c0, int e) {
  if (kVec) {
    return col < h && c0 < e ? __ldg(reinterpret_cast<const uint4 *>(wr + (size_t)col * e + c0))
                             : make_uint4(0, 0, 0, 0);
  }
  const uint16_t *w = reinterpret_cast<const uint16_t *>(wr) + (size_t)col * e;
  uint32_t p[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = col < h && c0 + 2 * i < e ? __ldg(w + c0 + 2 * i) : 0;
    const uint32_t hi = col < h && c0 + 2 * i + 1 < e ? __ldg(w + c0 + 2 * i + 1) : 0;
    p[i] = lo | hi << 16;
  }
  return make_uint4(p[0], p[1], p[2], p[3]);
}

// dxr: a 128-token x 128-column tile per block, E in 16-deep steps (zero-padded). 8 warps as 4
// (tokens) x 2 (columns), warp tile 32 x 64, so that the split A operand (two ldmatrix per 16
// rows) is the smaller share of the loads: 4 + 4 ldmatrix.x4 per step for 32 MMAs. Operands are
// both K-contiguous in shared memory ([token][expert], [column][expert]), read by ldmatrix without
// .trans; rows padded to 48 bytes, so the eight 16-byte rows of an 8x8 matrix fall in distinct
// bank groups. The next step's tiles are loaded into registers during the MMAs and stored into
// the other of two buffers: one barrier a step. 16-deep steps, not 32: the 64 accumulators and
// twice the staging registers would pass 128 registers and spill (two blocks an SM need <= 128).
// The write of dxr (f32, t x h) dominates at E <= 128: each thread stores float2 pairs straight
// from its accumulators, full 32-byte sectors.
constexpr int kDxTokens = 128, kDxCols = 128, kDxK = 16, kDxPitch = kDxK + 8;

template <bool kVec>
__global__ void __launch_bounds__(256, 2)
    router_dx_mma_kernel(const float *__restrict__ dl, const __nv_bfloat16 *__restrict__ wr,
                         float *__restrict__ dxr, int t, int h, int e) {
  __shared__ __align__(16) __nv_bfloat16 as[2][2][kDxTokens][kDxPitch];  // [buf][hi, lo][token][e]
  __shared__ __align__(16) __nv_bfloat16 ws[2][kDxCols][kDxPitch];        // [buf][column][e]
  const int token0 = blockIdx.x * kDxTokens, col0 = blockIdx.y * kDxCols;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp & 3, wn = warp >> 2;
  float acc[2][8][4] = {};
  // Each thread stages one 8-expert chunk of each tile: row r, experts c .. c + 8 of the step.
  const int r = threadIdx.x >> 1, c = (threadIdx.x & 1) * 8;
  float dv[8];
  uint4 wv;
  auto fetch = [&](int e0) {
    load_dl8<kVec>(dl, (size_t)(token0 + r), token0 + r < t, e0 + c, e, dv);
    wv = load_wr8<kVec>(wr, col0 + r, h, e0 + c, e);
  };
  auto stage = [&](int buf) {
    uint4 hi, lo;
    split_bf16x8(dv, hi, lo);
    *reinterpret_cast<uint4 *>(&as[buf][0][r][c]) = hi;
    *reinterpret_cast<uint4 *>(&as[buf][1][r][c]) = lo;
    *reinterpret_cast<uint4 *>(&ws[buf][r][c]) = wv;
  };
  fetch(0);
  stage(0);
  __syncthreads();
  for (int e0 = 0, buf = 0; e0 < e; e0 += kDxK, buf ^= 1) {
    const bool more = e0 + kDxK < e;
    if (more) fetch(e0 + kDxK);
    uint32_t a[2][2][4];  // [term][16-row block]
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4(a[s][mi], &as[buf][s][wm * 32 + mi * 16 + (lane & 15)][(lane >> 4) * 8]);
#pragma unroll
    for (int nj = 0; nj < 4; ++nj) {
      // b[0..1]: columns nj * 16 + 0..7, b[2..3]: + 8..15.
      uint32_t b[4];
      ldmatrix_x4(b, &ws[buf][wn * 64 + nj * 16 + ((lane >> 4) << 3) + (lane & 7)]
                        [((lane >> 3) & 1) * 8]);
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma16816<__nv_bfloat16>(acc[mi][2 * nj], a[s][mi], b);
          mma16816<__nv_bfloat16>(acc[mi][2 * nj + 1], a[s][mi], b + 2);
        }
    }
    // The other buffer was last read a step ago, before the barrier that ended it.
    if (more) stage(buf ^ 1);
    __syncthreads();
  }
  // h % 8 == 0: a thread's column pair is in range together.
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int token = token0 + wm * 32 + mi * 16 + half * 8 + g;
      if (token >= t) continue;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = col0 + wn * 64 + j * 8 + 2 * q;
        if (col < h)
          *reinterpret_cast<float2 *>(dxr + (size_t)token * h + col) =
              make_float2(acc[mi][j][2 * half], acc[mi][j][2 * half + 1]);
      }
    }
}

// dWr's partial sums: a 64-column (of X) x BN-expert tile per block and slice (BN 64 above 32
// experts, else 32), tokens in steps of 32. The caller sizes the slice count
// (router_wgrad_slices) for the CUDA-core kernel's 64 x 32 tiles, about two 8-warp blocks per SM,
// so that a block of one 64 x BN warp group would leave the SMs with a quarter to a half of those
// warps. Instead a block's 8 warps form 128 / BN groups of 2 x BN / 32 warps (warp tile 32 x 32);
// the groups take alternate 32-token steps of the slice, each through its own shared tiles, and
// their sums are added in group order at the end (then written along e, coalesced): a fixed
// order. X [token][column] and dL's terms [token][expert] have K (tokens) strided, so both go
// through ldmatrix .trans; rows padded to 144 (80 at BN 32) bytes for conflict-free reads. The
// next step's loads are in registers during the MMAs, as in router_dx_mma_kernel; one buffer
// and two barriers a step, as two buffers of 32-token stages would pass 48 KB of static shared
// memory.
constexpr int kDwCols = 64, kDwTokens = 32, kDwXPitch = kDwCols + 8;

template <int BN, bool kVec>
__global__ void __launch_bounds__(256, 2)
    router_wgrad_mma_kernel(const __nv_bfloat16 *__restrict__ x, const float *__restrict__ dl,
                            float *__restrict__ partial, int t, int h, int e,
                            int tokens_per_slice) {
  static_assert(BN == 32 || BN == 64, "tile widths the launcher picks");
  constexpr int kGroups = 128 / BN, kGroupThreads = 256 / kGroups, kPitch = BN + 8;
  struct Stage {
    __nv_bfloat16 xs[kDwTokens][kDwXPitch];  // X [token][column]
    __nv_bfloat16 ls[2][kDwTokens][kPitch];  // dL hi, lo [token][expert]
  };
  // The groups' stages, then (after the last step) their sums, [group][column][expert].
  constexpr int kStageBytes = kGroups * (int)sizeof(Stage);
  constexpr int kSumBytes = kGroups * kDwCols * kPitch * (int)sizeof(float);
  __shared__ __align__(16) unsigned char smem[kStageBytes > kSumBytes ? kStageBytes : kSumBytes];

  const int e0 = blockIdx.x * BN, col0 = blockIdx.y * kDwCols, slice = blockIdx.z;
  const int tbeg = slice * tokens_per_slice, tend = min(t, tbeg + tokens_per_slice);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = warp / (8 / kGroups), wi = warp % (8 / kGroups);
  const int wm = wi & 1, wn = wi >> 1;  // 2 x (BN / 32) warps, warp tile 32 columns x 32 experts
  const int gt = threadIdx.x % kGroupThreads;
  Stage &st = reinterpret_cast<Stage *>(smem)[group];
  float acc[2][4][4] = {};
  // Per step a group's threads stage X's 32 x 8 chunks (kGroups each) and dL's 32 x BN / 8 (two).
  uint4 xv[kGroups];
  float dv[2][8];
  auto fetch = [&](int step) {
    const int t0 = tbeg + (step * kGroups + group) * kDwTokens;
#pragma unroll
    for (int j = 0; j < kGroups; ++j) {
      const int i = gt + kGroupThreads * j, r = i >> 3, c = col0 + (i & 7) * 8;
      xv[j] = t0 + r < tend && c < h
                  ? __ldg(reinterpret_cast<const uint4 *>(x + (size_t)(t0 + r) * h + c))
                  : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int i = gt + kGroupThreads * j, r = i / (BN / 8), c = e0 + (i % (BN / 8)) * 8;
      load_dl8<kVec>(dl, (size_t)(t0 + r), t0 + r < tend, c, e, dv[j]);
    }
  };
  // Every group runs the same number of steps (past the slice's end, zeros), so the block's
  // barriers line up.
  const int steps = max(0, (tend - tbeg + kDwTokens - 1) / kDwTokens);
  const int iters = (steps + kGroups - 1) / kGroups;
  if (iters > 0) fetch(0);
  for (int it = 0; it < iters; ++it) {
    __syncthreads();  // the last step's ldmatrix reads are done
#pragma unroll
    for (int j = 0; j < kGroups; ++j) {
      const int i = gt + kGroupThreads * j;
      *reinterpret_cast<uint4 *>(&st.xs[i >> 3][(i & 7) * 8]) = xv[j];
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int i = gt + kGroupThreads * j, r = i / (BN / 8), c = (i % (BN / 8)) * 8;
      uint4 hi, lo;
      split_bf16x8(dv[j], hi, lo);
      *reinterpret_cast<uint4 *>(&st.ls[0][r][c]) = hi;
      *reinterpret_cast<uint4 *>(&st.ls[1][r][c]) = lo;
    }
    __syncthreads();
    if (it + 1 < iters) fetch(it + 1);
#pragma unroll
    for (int kk = 0; kk < kDwTokens; kk += 16) {
      uint32_t a[2][4];  // X^T, [16-column block]
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4_trans(a[mi], &st.xs[kk + ((lane >> 4) << 3) + (lane & 7)]
                                       [wm * 32 + mi * 16 + ((lane >> 3) & 1) * 8]);
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) {
          // b[0..1]: experts nj * 16 + 0..7, b[2..3]: + 8..15.
          uint32_t b[4];
          ldmatrix_x4_trans(b, &st.ls[s][kk + ((lane >> 3) & 1) * 8 + (lane & 7)]
                                     [wn * 32 + nj * 16 + (lane >> 4) * 8]);
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            mma16816<__nv_bfloat16>(acc[mi][2 * nj], a[mi], b);
            mma16816<__nv_bfloat16>(acc[mi][2 * nj + 1], a[mi], b + 2);
          }
        }
    }
  }
  __syncthreads();  // the stages become the groups' sums
  float(*sums)[kDwCols][kPitch] = reinterpret_cast<float(*)[kDwCols][kPitch]>(smem);
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        *reinterpret_cast<float2 *>(
            &sums[group][wm * 32 + mi * 16 + half * 8 + g][wn * 32 + j * 8 + 2 * q]) =
            make_float2(acc[mi][j][2 * half], acc[mi][j][2 * half + 1]);
  __syncthreads();
  // An empty slice (past the end of T) writes its zeros like any other.
  float *out = partial + (size_t)slice * h * e;
  for (int i = threadIdx.x; i < kDwCols * BN; i += 256) {
    const int r = i / BN, c = i % BN, col = col0 + r, ex = e0 + c;
    if (col >= h || ex >= e) continue;
    float s = sums[0][r][c];
#pragma unroll
    for (int gr = 1; gr < kGroups; ++gr) s += sums[gr][r][c];
    out[(size_t)col * e + ex] = s;
  }
}

// The f16 kernels, on the CUDA cores (why: the comment above split_bf16x8).
// dxr: a 64-token x 64-column tile per block, E walked in chunks of 32 through shared memory,
// 4 x 4 outputs per thread.
template <typename T>
__global__ void __launch_bounds__(256)
    router_dx_simt_kernel(const float *__restrict__ dl, const T *__restrict__ wr,
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

// dWr's partial sums: 64 columns of X by 32 experts per block and slice.
constexpr int kWrTokens = 32;
template <typename T>
__global__ void __launch_bounds__(256)
    router_wgrad_partial_simt_kernel(const T *__restrict__ x, const float *__restrict__ dl,
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

// The two products of launch_router_backward_dense for t > 0: bf16 on the tensor cores.
void router_dense_products(const __nv_bfloat16 *x, const __nv_bfloat16 *wr, const float *dl,
                           float *dxr, float *partial, int t, int h, int e, int slices,
                           int per_slice, cudaStream_t s) {
  const bool vec = e % 8 == 0;
  const dim3 dx_grid((t + kDxTokens - 1) / kDxTokens, (h + kDxCols - 1) / kDxCols);
  if (vec) {
    router_dx_mma_kernel<true><<<dx_grid, 256, 0, s>>>(dl, wr, dxr, t, h, e);
  } else {
    router_dx_mma_kernel<false><<<dx_grid, 256, 0, s>>>(dl, wr, dxr, t, h, e);
  }
  // Up to 32 experts one 32-wide tile (four token groups a block), else 64-wide tiles (two); not
  // 128-wide at E 128: the caller's slice count would then leave fewer blocks than SMs, and the
  // second read of X per 64 columns comes from L2.
  const int bn = e <= 32 ? 32 : 64;
  const dim3 dw_grid((e + bn - 1) / bn, (h + kDwCols - 1) / kDwCols, slices);
  auto kernel = bn == 32 ? (vec ? router_wgrad_mma_kernel<32, true>
                                : router_wgrad_mma_kernel<32, false>)
                         : (vec ? router_wgrad_mma_kernel<64, true>
                                : router_wgrad_mma_kernel<64, false>);
  kernel<<<dw_grid, 256, 0, s>>>(x, dl, partial, t, h, e, per_slice);
}

void router_dense_products(const __half *x, const __half *wr, const float *dl, float *dxr,
                           float *partial, int t, int h, int e, int slices, int per_slice,
                           cudaStream_t s) {
  router_dx_simt_kernel<__half><<<dim3((t + 63) / 64, (h + 63) / 64), 256, 0, s>>>(dl, wr, dxr,
                                                                                 t, h, e);
  router_wgrad_partial_simt_kernel<__half>
      <<<dim3((h + 63) / 64, (e + 31) / 32, slices), 256, 0, s>>>(x, dl, partial, t, h, e,
                                                                   per_slice);
}

template <typename T>
int launch_router_backward_dense(const uint16_t *x, const uint16_t *wr, const float *dl,
                                 float *dxr, float *partial, float *dwr, int t, int h, int e,
                                 int slices, int accumulate, cudaStream_t s) {
  if (t > 0) {
    const int per_slice = (t + slices - 1) / slices;
    router_dense_products(reinterpret_cast<const T *>(x), reinterpret_cast<const T *>(wr), dl,
                          dxr, partial, t, h, e, slices, per_slice, s);
  }
  const int n = h * e;
  router_wgrad_reduce_kernel<<<(n + 255) / 256, 256, 0, s>>>(partial, dwr, n, t > 0 ? slices : 0,
                                                             accumulate);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" int remoe_pair_dr(const float *row_dots, int32_t groups, float *dr,
                             const uint32_t *count, int32_t capacity, remoe_stream_t stream) {
  if (capacity == 0) return 0;
  // The grid covers the capacity; |A| = *count is read on the device.
  pair_dr_kernel<<<(capacity + 7) / 8, 256, 0, (cudaStream_t)stream>>>(row_dots, groups, dr,
                                                                       count);
  return (int)cudaGetLastError();
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
