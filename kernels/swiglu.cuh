// SwiGLU, its backward, and the backward's dR dot, shared by both expert-GEMM paths: the two
// paths must give the same bits (tests/gpu_gemm_paths.rs), so every rounding step of these
// formulas lives here once.
#pragma once

#include "common.cuh"

// The fast division (one reciprocal instruction): the dAct epilogue evaluates this for every
// element, where IEEE division's longer sequence made it instruction-bound. Its error (about
// 2 ulp of f32) is far below the bf16/f16 rounding that follows.
__device__ __forceinline__ float sigmoid(float z) { return __fdividef(1.f, 1.f + __expf(-z)); }

// The expert activation a = SiLU(g) u = g s u, s = sigmoid(g), from g and u as the forward
// saves them (already rounded to T), rounded to T itself (what the down projection reads).
template <typename T>
__device__ __forceinline__ float swiglu_rounded(float g, float u, float s) {
  return to_float(T(g * s * u));
}

// The forward's activation from the up projection's f32 accumulators: g and u are rounded to T
// first, whether the forward saves them or not, so the backward, which recomputes a from the
// saved g and u (swiglu_rounded) instead of keeping it, gets the forward's a bit for bit.
template <typename T>
__device__ __forceinline__ float swiglu(float g, float u) {
  const float gr = to_float(T(g)), ur = to_float(T(u));
  return swiglu_rounded<T>(gr, ur, sigmoid(gr));
}

// SwiGLU's backward at (g, u) with s = sigmoid(g), for the activation gradient da:
// dg = da u SiLU'(g), du = da SiLU(g).
__device__ __forceinline__ void dswiglu(float da, float g, float u, float s, float &dg,
                                        float &du) {
  dg = da * u * (s * (1.f + g * (1.f - s)));
  du = da * g * s;
}

// dWd's operand R a (the dAct epilogue's act_r), from the pair's gate R (f32) and the activation
// a recomputed and rounded to T (swiglu_rounded: the forward's act bit for bit): the f32 product,
// rounded to nearest, which the epilogue's store (store8v, store2) rounds to T, to nearest even.
// So act_r = T(f32(R a)), two roundings: the exact product has up to 32 (bf16) or 35 (f16)
// significant bits, and only where f32's rounding lands exactly on a midpoint of T's grid (about
// one product in 2^16 for bf16, 2^13 for f16) can the result miss the exact product rounded
// once, and then by one unit in T's last place (an error under one unit instead of half). Both
// paths round alike, which their bitwise agreement needs; __fmul_rn keeps the multiply from
// being contracted into anything.
__device__ __forceinline__ float gated_act(float gate, float a) { return __fmul_rn(gate, a); }

// dR = dOut . y = sum over f of a_f (dOut Wd^T)_f, accumulated from the dAct GEMM's f32
// accumulators in one fixed order on both paths: a column pair is one multiply and one fma; a
// 32-column group is the pairwise tree ((p0 + p1) + (p2 + p3)) over each 8 columns' four pairs,
// then the same tree over the group's four 8-column sums; remoe_pair_dr then sums a
// pair's groups (lane l of a warp: groups l, l + 32, ... in ascending order, then the warp's
// butterfly). Explicit _rn intrinsics keep the compiler from contracting the two paths
// differently.
__device__ __forceinline__ float dot2(float a0, float d0, float a1, float d1) {
  return __fmaf_rn(a1, d1, __fmul_rn(a0, d0));
}
__device__ __forceinline__ float tree4(float a, float b, float c, float d) {
  return __fadd_rn(__fadd_rn(a, b), __fadd_rn(c, d));
}
// tree4 over the four lanes of a quad, on every lane of it (IEEE addition commutes, so each lane
// gets the same bits). Every lane of the warp must call it.
__device__ __forceinline__ float quad_tree(float v) {
  v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
