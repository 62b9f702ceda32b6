/*
 * The C boundary between the CUDA kernels and Rust (bindgen reads this file).
 *
 * Every launcher:
 *   - takes plain device pointers, sizes and a stream, and enqueues work on that stream
 *     without synchronising;
 *   - trusts its arguments: shapes, alignment and 32-bit index ranges are checked by the safe
 *     Rust layer (src/) before a launcher is called;
 *   - returns 0 on success or the cudaError_t of the failed launch (cudaGetLastError), which
 *     the Rust layer turns into Error::Launch.
 *
 * The stream is CUDA's opaque CUstream/cudaStream_t handle, declared here as an opaque
 * pointer so that bindgen never needs CUDA's headers. Half-precision tensors are passed as
 * their 16-bit storage (uint16_t): bf16 and f16 launchers are separate functions.
 *
 * A signature that several launchers share (a bf16 and an f16 twin; the expert GEMMs' also on
 * the Hopper path) is written once, as a REMOE_*_PARAMS parameter list: the launchers are
 * declared (and, in kernels/, defined) through it, and the function type remoe_*_fn made from it
 * is the type of each, which the Rust layer's launcher tables take from the bindings.
 */
#ifndef REMOE_KERNELS_H
#define REMOE_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st *remoe_stream_t;

/* Tokens per router block: the granularity of the per-block routing statistics. */
#define REMOE_ROUTER_TOKENS_PER_BLOCK 64
/* Rows per tile of the grouped expert GEMMs: expert e occupies ceil(n_e / 128) row tiles. */
#define REMOE_GEMM_TILE_ROWS 128
/* The TopK kernel holds a token's E logits in one warp's registers: E <= 512. */
#define REMOE_TOPK_MAX_EXPERTS 512
/* The range remoe_lambda_step keeps the adaptive lambda in (src/controller.rs, LAMBDA_MIN and
 * LAMBDA_MAX, says why these values). */
#define REMOE_LAMBDA_MIN 1e-12
#define REMOE_LAMBDA_MAX 1e3

#define REMOE_ROUTER_FORWARD_PARAMS                                                               \
  (const uint16_t *x, const uint16_t *wr, float *logits, float *gates, uint32_t *block_counts,    \
   float *block_sums, uint32_t *error_flags, int32_t t, int32_t h, int32_t e,                     \
   remoe_stream_t stream)
/* The type of remoe_router_forward_bf16 and _f16. */
typedef int remoe_router_forward_fn REMOE_ROUTER_FORWARD_PARAMS;
/*
 * Router forward (kernels/router.cu): logits = X Wr (f32 accumulation) and gates = ReLU(logits).
 *   x      [t, h]  bf16 or f16, row-major
 *   wr     [h, e]  same dtype as x, row-major
 *   logits [t, e]  f32, written
 *   gates  [t, e]  f32, written
 *   block_counts [ceil(t/64), e] u32, block_sums [ceil(t/64), e] f32: per block of 64 tokens,
 *     the number of gates > 0 and the sum of the gates of each expert. Both may be NULL (then
 *     not written).
 *   error_flags [2] u32, may be NULL: the error word of non-finite logits. A logit that is NaN
 *     or +-Inf gets the gate 0 (always, with or without the word) and, with the word, adds 1 to
 *     error_flags[0] and raises error_flags[1] to at least ~token (bitwise complement; 0 means
 *     no such logit yet, else ~error_flags[1] is the lowest token that had one). The word is
 *     only ever raised: the caller clears it.
 * t may be 0 (nothing is launched). t*h, h*e and t*e must fit in int32; h % 8 == 0.
 */
int remoe_router_forward_bf16 REMOE_ROUTER_FORWARD_PARAMS;
int remoe_router_forward_f16 REMOE_ROUTER_FORWARD_PARAMS;

/*
 * TopK router tail (kernels/topk.cu): from logits [t, e] (f32), P = softmax per token; the k
 * largest logits are selected (ties: lower expert index). Writes probs [t, e], gates [t, e]
 * (where selected: P when normalize == 0, P / (sum of the selected P) when normalize != 0, i.e.
 * the softmax over the selected logits; else 0; a selected gate that underflows to 0 is stored
 * as FLT_MIN so that the selection stays visible to the compaction), and per block of 64 tokens
 * block_counts (selected per expert) and block_sums (sum of P per expert, over all tokens).
 * block_counts and block_sums are optional: both NULL writes no statistics.
 * 1 <= k <= e <= 512. Non-finite logits (NaN, +-Inf) take no part: their P is 0, the softmax is
 * over the token's finite logits, and they are never selected, so a token selects
 * min(k, its finite logits).
 */
int remoe_topk_softmax(const float *logits, float *probs, float *gates, uint32_t *block_counts,
                       float *block_sums, int32_t t, int32_t e, int32_t k, int32_t normalize,
                       remoe_stream_t stream);

/*
 * Routing statistics (kernels/compaction.cu), from the router's per-block statistics:
 *   counts [e]          n_e
 *   gate_sums [e]       sum over t of the gates (ReMoE) or of P (TopK), f32, fixed-order sums
 *   block_offsets [nb, e]  where block b's pairs of expert e start inside expert e's list
 *   expert_offsets [e+1]   exclusive scan of counts: expert e's pairs are [off[e], off[e+1])
 *   tile_offsets [e+1]     exclusive scan of ceil(n_e / REMOE_GEMM_TILE_ROWS)
 *   stats_u32 [4]  { active pairs |A|, total GEMM row tiles, error_flags[0], error_flags[1] }
 *   stats_f32 [2]  { sparsity 1 - |A|/(t e), balance loss coeff*e/(k t^2)*sum_e n_e*gate_sums[e] }
 * coeff: a device pointer to lambda (ReMoE) or c (TopK), f64. When sparsity_sum is non-NULL the
 * layer's sparsity is added to *sparsity_sum and *sparsity_count incremented (the adaptive
 * controller's running mean), unless the error word (see the router; may be NULL) shows a
 * non-finite logit. nb = ceil(t / REMOE_ROUTER_TOKENS_PER_BLOCK).
 * capacity: the pairs the pair buffers hold. When |A| > capacity the dispatch is published empty
 * (expert_offsets and tile_offsets all 0, so the compaction writes no pair and the GEMMs do
 * nothing) and the error word's overflow half is raised: error_flags[2] = max(error_flags[2],
 * |A|), error_flags[3] = capacity. The statistics still describe the real routing.
 * error_flags [4] u32 (may be NULL): { non-finite count, ~first token (router), overflow |A|,
 * capacity (here) }.
 * Deterministic: every sum has a fixed order.
 */
int remoe_routing_stats(const uint32_t *block_counts, const float *block_sums,
                        uint32_t *block_offsets, uint32_t *counts, float *gate_sums,
                        uint32_t *expert_offsets, uint32_t *tile_offsets, uint32_t *stats_u32,
                        float *stats_f32, int32_t t, int32_t e, int32_t k, const double *coeff,
                        double *sparsity_sum, uint32_t *sparsity_count, uint32_t *error_flags,
                        int32_t capacity, remoe_stream_t stream);

/*
 * Compaction (kernels/compaction.cu): the pairs with gate > 0, grouped by expert, ascending
 * token order within an expert (offsets from remoe_routing_stats).
 *   pair_token [|A|] u32, pair_gate [|A|] f32: token and gate of each pair
 *   pair_index [t, e] i32: the pair of (t, e), or -1 where the gate is 0
 */
int remoe_compact_pairs(const float *gates, const uint32_t *block_offsets,
                        const uint32_t *expert_offsets, uint32_t *pair_token, float *pair_gate,
                        int32_t *pair_index, int32_t t, int32_t e, remoe_stream_t stream);

#define REMOE_EXPERT_UP_PARAMS                                                                    \
  (const uint16_t *x, const uint32_t *pair_token, const uint16_t *wg, const uint16_t *wu,         \
   uint16_t *act, uint16_t *g, uint16_t *u, const uint32_t *expert_offsets,                       \
   const uint32_t *tile_offsets, uint32_t *sched, int32_t num_tiles, int32_t e, int32_t h,        \
   int32_t f, remoe_stream_t stream)
#define REMOE_EXPERT_DOWN_PARAMS                                                                  \
  (const uint16_t *act, const uint16_t *wd, uint16_t *y, float *partials,                         \
   const uint32_t *expert_offsets, const uint32_t *tile_offsets, uint32_t *sched,                 \
   int32_t num_tiles, int32_t e, int32_t h, int32_t f, int32_t k_splits, int32_t plane_rows,      \
   remoe_stream_t stream)
#define REMOE_EXPERT_DACT_PARAMS                                                                  \
  (const uint16_t *dout, const uint32_t *pair_token, const float *pair_gate,                      \
   const uint16_t *wd, const uint16_t *g, const uint16_t *u, uint16_t *dg, uint16_t *du,          \
   uint16_t *act_r, float *row_dots, const uint32_t *expert_offsets,                              \
   const uint32_t *tile_offsets, uint32_t *sched, int32_t num_tiles, int32_t e, int32_t h,        \
   int32_t f, remoe_stream_t stream)
#define REMOE_EXPERT_DX_PARAMS                                                                    \
  (const uint16_t *dg, const uint16_t *du, const uint16_t *wg, const uint16_t *wu,                \
   uint16_t *dx_pair, const uint32_t *expert_offsets, const uint32_t *tile_offsets,               \
   uint32_t *sched, int32_t num_tiles, int32_t e, int32_t h, int32_t f, remoe_stream_t stream)
/* The type of remoe_expert_up_swiglu_bf16 and _f16, and of their remoe_hopper_ twins. */
typedef int remoe_expert_up_fn REMOE_EXPERT_UP_PARAMS;
/* The type of remoe_expert_down_bf16 and _f16, and of their remoe_hopper_ twins. */
typedef int remoe_expert_down_fn REMOE_EXPERT_DOWN_PARAMS;
/* The type of remoe_expert_dact_bf16 and _f16, and of their remoe_hopper_ twins. */
typedef int remoe_expert_dact_fn REMOE_EXPERT_DACT_PARAMS;
/* The type of remoe_expert_dx_bf16 and _f16, and of their remoe_hopper_ twins. */
typedef int remoe_expert_dx_fn REMOE_EXPERT_DX_PARAMS;
/*
 * Grouped expert GEMMs (kernels/grouped_gemm.cu). Row tile i belongs to the expert e with
 * tile_offsets[e] <= i < tile_offsets[e+1]; the kernels read the total, tile_offsets[e], on the
 * device. num_tiles is an upper bound of it that the host knows without reading anything back
 * (from the pair capacity: ceil((capacity + e * (REMOE_GEMM_TILE_ROWS - 1)) /
 * REMOE_GEMM_TILE_ROWS)); it sizes the grid, and 0 launches nothing. Row buffers (act, g, u, y,
 * ...) hold at least the pairs the offsets describe.
 * sched [2] u32: the Hopper path's tile counter, which these launchers ignore (one signature for
 * both paths). Zero before the first launch (allocate it zeroed); each launch leaves it zero.
 * Launches given the same sched must be ordered (one stream): one buffer per stream of work.
 * h % 8 == 0, f % 8 == 0 everywhere.
 *
 * Up projection with SwiGLU: for each pair p of expert e, with x_t the row pair_token[p] of x,
 *   g = x_t Wg_e, u = x_t Wu_e, act[p, :] = SiLU(g) * u     act, g, u [|A|, f]
 *   x [t, h]; wg, wu [e, h, f]. g and u are written only when both pointers are non-NULL (the
 *   backward needs them). act is computed from g and u rounded to the element type, whether
 *   they are written or not, so that the backward recomputes it bit for bit.
 * Down projection:
 *   y[p, :] = act[p, :] Wd_e, summed in f32 and rounded once to the element type
 *     y [|A|, h] (the element type); wd [e, f, h]
 *   k_splits == 1: the launch writes y; partials is not touched (may be NULL).
 *   k_splits > 1 (split-K): the launch writes no y; plane s of partials (k_splits planes of
 *   plane_rows x h floats, plane_rows >= |A|) gets the f32 partial sum over act's columns
 *   [s kb / k_splits, (s + 1) kb / k_splits) x 64, kb = ceil(f / 64) (the same ranges on both
 *   paths), and remoe_sum_planes_* then writes y from the planes. 1 <= k_splits <= kb.
 *   (The combine widens y back to f32, weighs it by the gate and sums a token's pairs in f32,
 *   rounding once more, into out.)
 * Backward of the down projection and of SwiGLU, for each pair p of expert e, with dout_t the
 * row pair_token[p] of dout and R = pair_gate[p]:
 *   d = dout_t Wd_e^T (f32);  a = SiLU(g) * u recomputed from the saved g, u and rounded to the
 *   element type (the forward's act, bit for bit);
 *   act_r[p, :] = R a, rounded to the element type from the f32 product of R and a (the
 *   rounding is kernels/swiglu.cuh's gated_act): dWd's operand, dWd_e^T = sum over e's pairs of
 *   dout_t^T act_r[p] (remoe_expert_weight_grad, transposed store);
 *   row_dots[p, j] = sum over columns 32 j .. 32 j + 31 of a * d (unscaled: dR = dout_t . y with
 *   y = a Wd_e unrounded, not the down projection's stored y; in the order of
 *   kernels/swiglu.cuh; the groups are summed by remoe_pair_dr);
 *   da = R d;  dg = da * u * SiLU'(g);  du = da * SiLU(g)
 *   dout [t, h]; g, u, dg, du, act_r [|A|, f]; row_dots [|A|, ceil(f / 32)] f32.
 * Backward of the up projection, per pair (summed over a token's pairs elsewhere):
 *   dx_pair[p, :] = dg[p, :] Wg_e^T + du[p, :] Wu_e^T                    dx_pair [|A|, h]
 */
int remoe_expert_up_swiglu_bf16 REMOE_EXPERT_UP_PARAMS;
int remoe_expert_up_swiglu_f16 REMOE_EXPERT_UP_PARAMS;
int remoe_expert_down_bf16 REMOE_EXPERT_DOWN_PARAMS;
int remoe_expert_down_f16 REMOE_EXPERT_DOWN_PARAMS;
int remoe_expert_dact_bf16 REMOE_EXPERT_DACT_PARAMS;
int remoe_expert_dact_f16 REMOE_EXPERT_DACT_PARAMS;
int remoe_expert_dx_bf16 REMOE_EXPERT_DX_PARAMS;
int remoe_expert_dx_f16 REMOE_EXPERT_DX_PARAMS;

/*
 * Expert weight gradients (kernels/grouped_gemm.cu): for every expert e (zero pairs allowed),
 *   G_e[i, j] = sum over e's pairs p of a[row(p), i] * b[p, j]        G_e [m, n], f32
 * where row(p) = gather[p] if gather is non-NULL, else p; a has m columns, b has n; a_rows and
 * b_rows are the rows a and b hold (every row(p) < a_rows, every pair < b_rows: the bounds of the
 * Hopper path's tensor maps). G_e is stored as `store` says (below).
 * Deterministic (fixed reduction order).
 *   dWd: a = dout [t, h] gathered by pair_token, b = act_r [|A|, f] (the dAct GEMM's R act),
 *        m = h, n = f, stored transposed into dWd [e, f, h];
 *   dWg: a = x [t, h] gathered by pair_token, b = dg (m = h, n = f); dWu likewise with du.
 *   (Where the Hopper path reads a's rows from a copy in pair order, made by
 *   remoe_gather_rows_16, gather is NULL and a_rows = |A|: the same sums, the same bits.)
 * split: NULL, or the fixed-order split of a hot expert's reduction (below); the result is
 * deterministic either way, and the same on both paths for the same split argument.
 * store (remoe_wgrad_store_t), where a weight gradient goes: out[e, i, j] = G_e[i, j]
 * (transposed == 0, out [e, m, n]) or out[e, j, i] = G_e[i, j] (transposed != 0, out [e, n, m]);
 * with accumulate != 0 added to what out holds (out (+)= ...), otherwise overwritten. Both flags
 * mean the same for every operand.
 */
typedef struct remoe_wgrad_store {
  float *out;
  int32_t accumulate;
  int32_t transposed;
} remoe_wgrad_store_t;
/*
 * The weight gradients' fixed-order split (kernels/weight_grad_split.cu{h}). A hot expert's
 * reduction over its pairs is cut into chunks (a rule of the counts alone, documented in the
 * .cuh), every chunk of every output tile is a work unit, and a tile's chunks are added in chunk
 * order by whichever unit finishes last, through partial-sum slots in device memory.
 *   plan:     3e + 1 words written by remoe_weight_grad_plan for the launch's expert_offsets and
 *             h x f (the same plan serves dWg, dWu and dWd: m x n is h x f or f x h);
 *   slots:    slot_floats floats of remoe_weight_grad_split_sizes (0 when no split is possible:
 *             then plan still works and the pointer is not read);
 *   counters: counters words, zero before the first launch; every launch leaves them zero.
 * Launches that share slots and counters must be ordered (one stream).
 */
typedef struct remoe_wgrad_split {
  const uint32_t *plan;
  float *slots;
  uint32_t *counters;
} remoe_wgrad_split_t;
/* The buffer sizes for e experts of h x f weights (host only; 0 or cudaErrorInvalidValue). */
int remoe_weight_grad_split_sizes(int32_t e, int32_t h, int32_t f, uint64_t *plan_words,
                                  uint64_t *slot_floats, uint64_t *counters);
/*
 * The plan for these counts (expert_offsets [e + 1] on the device): one warp, no host read.
 * The chunking of an expert depends on its own count and on the pairs of the whole reduction:
 * chunking_pairs, or expert_offsets[e] when it is negative. (An expert-parallel owner passes
 * all ranks' pairs, so that its experts are cut exactly as on one GPU over every rank's tokens.)
 */
int remoe_weight_grad_plan(const uint32_t *expert_offsets, int32_t e, int32_t h, int32_t f,
                           int64_t chunking_pairs, uint32_t *plan, remoe_stream_t stream);
#define REMOE_EXPERT_WEIGHT_GRAD_PARAMS                                                           \
  (const uint16_t *a, const uint32_t *gather, const uint16_t *b, remoe_wgrad_store_t store,       \
   const uint32_t *expert_offsets, int32_t a_rows, int32_t b_rows, int32_t e, int32_t m,          \
   int32_t n, const remoe_wgrad_split_t *split, remoe_stream_t stream)
/* The type of remoe_expert_weight_grad_bf16 and _f16, and of their remoe_hopper_ twins. */
typedef int remoe_expert_weight_grad_fn REMOE_EXPERT_WEIGHT_GRAD_PARAMS;
int remoe_expert_weight_grad_bf16 REMOE_EXPERT_WEIGHT_GRAD_PARAMS;
int remoe_expert_weight_grad_f16 REMOE_EXPERT_WEIGHT_GRAD_PARAMS;

/*
 * The same five expert GEMMs for Hopper (kernels/hopper_gemm.cu: wgmma, TMA, warp-specialised
 * persistent CTAs), with the contracts above, argument for argument. They need a device of
 * compute capability 9.0 and code built for sm_90a; elsewhere their kernels are empty, so the
 * Rust layer calls them only on such a device (src/gemm.rs). Additionally h % 8 == 0 and
 * f % 8 == 0 make every weight row a multiple of 16 bytes, as the tensor maps need. The weight
 * gradients also take zero pairs for an expert (it writes zeros, or leaves out as it is when
 * accumulating). Results are bitwise reproducible; the tile grid is persistent (at most one CTA
 * per multiprocessor) and reads the tile counts from tile_offsets on the device. The row GEMMs
 * take their tiles from the counter in sched (above), which must not be NULL here; a launch
 * whose k_splits exceeds kb is refused (cudaErrorInvalidValue) rather than left to hang.
 */
/* 1 in *available when this binary holds the sm_90a code of the launchers below for the
 * current device (compute capability 9.0 and built for sm_90a), else 0. Synchronous. */
int remoe_hopper_gemm_available(int32_t *available);
int remoe_hopper_expert_up_swiglu_bf16 REMOE_EXPERT_UP_PARAMS;
int remoe_hopper_expert_up_swiglu_f16 REMOE_EXPERT_UP_PARAMS;
int remoe_hopper_expert_down_bf16 REMOE_EXPERT_DOWN_PARAMS;
int remoe_hopper_expert_down_f16 REMOE_EXPERT_DOWN_PARAMS;
int remoe_hopper_expert_dact_bf16 REMOE_EXPERT_DACT_PARAMS;
int remoe_hopper_expert_dact_f16 REMOE_EXPERT_DACT_PARAMS;
int remoe_hopper_expert_dx_bf16 REMOE_EXPERT_DX_PARAMS;
int remoe_hopper_expert_dx_f16 REMOE_EXPERT_DX_PARAMS;
int remoe_hopper_expert_weight_grad_bf16 REMOE_EXPERT_WEIGHT_GRAD_PARAMS;
int remoe_hopper_expert_weight_grad_f16 REMOE_EXPERT_WEIGHT_GRAD_PARAMS;

#define REMOE_SUM_PLANES_PARAMS                                                                   \
  (const float *partials, int32_t planes, int32_t plane_rows, const uint32_t *count,              \
   uint16_t *y, int32_t h, remoe_stream_t stream)
/* The type of remoe_sum_planes_bf16 and _f16. */
typedef int remoe_sum_planes_fn REMOE_SUM_PLANES_PARAMS;
/*
 * Split-K's reduction (kernels/split_k.cu): y[p, :] = the sum over s = 0 .. planes-1, in that
 * order, of row p of plane s of partials (f32), rounded once to the element type, for
 * p < *count (a device pointer: |A|). partials holds planes planes of plane_rows x h floats,
 * contiguous; y [plane_rows, h]; h % 8 == 0. planes < 1 does nothing.
 */
int remoe_sum_planes_bf16 REMOE_SUM_PLANES_PARAMS;
int remoe_sum_planes_f16 REMOE_SUM_PLANES_PARAMS;

/*
 * Row gather (kernels/gather.cu): out[p, :] = x[rows[p], :] for p < *count, 16-bit elements
 * (bf16 or f16 alike); count is a device pointer (|A|: expert_offsets[e]) and *count <=
 * capacity, which sizes the grid. x [*, h] holds every row named in rows; out [capacity, h];
 * h % 8 == 0.
 */
int remoe_gather_rows_16(const uint16_t *x, const uint32_t *rows, uint16_t *out,
                         const uint32_t *count, int32_t capacity, int32_t h,
                         remoe_stream_t stream);

#define REMOE_COMBINE_PARAMS                                                                      \
  (const uint16_t *y, const float *gates, const int32_t *pair_index, uint16_t *out, int32_t t,    \
   int32_t h, int32_t e, remoe_stream_t stream)
/* The type of remoe_combine_bf16 and _f16. */
typedef int remoe_combine_fn REMOE_COMBINE_PARAMS;
/*
 * Batched transpose with a dtype conversion (kernels/transpose.cu): for each of `batches` planes,
 * dst[b][c][r] = convert(src[b][r][c]) with src [batches, rows, cols] and dst [batches, cols,
 * rows], both contiguous and not overlapping; f32 to bf16 or f16 (rounded to nearest even, as
 * candle's cast rounds) and back (exact). rows is at most 65535 * 32 (the grid's y extent),
 * batches at most 65535 (its z extent); (size_t) rows * cols * batches elements in each buffer.
 */
int remoe_transpose_f32_to_bf16(const float *src, uint16_t *dst, int32_t batches, int32_t rows,
                                int32_t cols, remoe_stream_t stream);
int remoe_transpose_f32_to_f16(const float *src, uint16_t *dst, int32_t batches, int32_t rows,
                               int32_t cols, remoe_stream_t stream);
int remoe_transpose_bf16_to_f32(const uint16_t *src, float *dst, int32_t batches, int32_t rows,
                                int32_t cols, remoe_stream_t stream);
int remoe_transpose_f16_to_f32(const uint16_t *src, float *dst, int32_t batches, int32_t rows,
                               int32_t cols, remoe_stream_t stream);

/*
 * Combine (kernels/combine.cu): out[t, :] = sum over experts e in ascending order with
 * pair_index[t, e] >= 0 of gates[t, e] * y[pair_index[t, e], :] (y [|A|, h] in the element type,
 * each value widened exactly to f32), accumulated in f32 and rounded once to the element type; a
 * token with no pair gets zeros. No atomics: the result is bitwise reproducible.
 */
int remoe_combine_bf16 REMOE_COMBINE_PARAMS;
int remoe_combine_f16 REMOE_COMBINE_PARAMS;
#define REMOE_TOKEN_SUM_PARAMS                                                                    \
  (const uint16_t *rows, const int32_t *pair_index, const float *init, uint16_t *out,             \
   int32_t t, int32_t h, int32_t e, remoe_stream_t stream)
/* The type of remoe_token_sum_bf16 and _f16. */
typedef int remoe_token_sum_fn REMOE_TOKEN_SUM_PARAMS;
/*
 * Per-token sum of per-pair rows, the same kernel with unit weights: out[t, :] = init[t, :]
 * (f32, or zeros if NULL) + sum over e ascending of rows[pair_index[t, e], :].
 */
int remoe_token_sum_bf16 REMOE_TOKEN_SUM_PARAMS;
int remoe_token_sum_f16 REMOE_TOKEN_SUM_PARAMS;

/*
 * Backward helpers (kernels/backward.cu).
 *
 * dR's data term per pair: dr[p] = the sum of row_dots[p, 0 .. groups) (= dout_t . y[p, :], from
 * the dAct GEMM's group sums, in the order of kernels/swiglu.cuh) for p < *count.
 * row_dots [|A|, groups] f32; dr [|A|] f32. count is a device pointer (|A|: expert_offsets[e]),
 * *count <= capacity (which sizes the grid). No element type: one launcher for bf16 and f16.
 * (dWd needs no per-pair R dOut row: the dAct GEMM writes R act, see above.)
 */
int remoe_pair_dr(const float *row_dots, int32_t groups, float *dr, const uint32_t *count,
                  int32_t capacity, remoe_stream_t stream);
/*
 * The router's logit gradient dl [t, e] (f32). With s = grad_scale * coeff E / (k t^2):
 * probs == NULL: ReMoE, dl = dr[pair] + s n_e where pair_index >= 0, else 0 (gates unused);
 * probs != NULL, gates == NULL: TopK (e <= 512), dP = (dr[pair] where selected) + s n_e,
 *   dl_t = P_t * (dP_t - dP_t . P_t);
 * probs != NULL, gates != NULL: TopK with renormalised gates G [t, e] (remoe_topk_softmax's
 *   gates with normalize != 0), dA = s n_e, dG = dr[pair] where selected, else 0 (and G taken
 *   as 0 there), dl_t = P_t * (dA_t - dA_t . P_t) + G_t * (dG_t - dG_t . G_t).
 * coeff is a device pointer (f64); grad_scale scales the balance loss's gradient only (the loss
 * scale or micro-batch factor that dr already carries through dOut).
 */
int remoe_router_grad(const int32_t *pair_index, const float *dr, const uint32_t *counts,
                      const float *probs, const float *gates, const double *coeff,
                      double grad_scale, float *dl, int32_t t, int32_t e, int32_t k,
                      remoe_stream_t stream);
#define REMOE_ROUTER_BACKWARD_DENSE_PARAMS                                                        \
  (const uint16_t *x, const uint16_t *wr, const float *dl, float *dxr, float *partial,            \
   float *dwr, int32_t t, int32_t h, int32_t e, int32_t slices, int32_t accumulate,               \
   remoe_stream_t stream)
/* The type of remoe_router_backward_dense_bf16 and _f16. */
typedef int remoe_router_backward_dense_fn REMOE_ROUTER_BACKWARD_DENSE_PARAMS;
/*
 * The router's dense gradients: dxr [t, h] = dl Wr^T (f32), and dwr [h, e] (+)= x^T dl (f32,
 * accumulate != 0 adds), through partial [slices, h, e] (f32 scratch) summed in slice order.
 */
int remoe_router_backward_dense_bf16 REMOE_ROUTER_BACKWARD_DENSE_PARAMS;
int remoe_router_backward_dense_f16 REMOE_ROUTER_BACKWARD_DENSE_PARAMS;

/*
 * The adaptive lambda controller's step (kernels/controller.cu), one thread: if *count > 0,
 * with S = *sparsity_sum / *count: lambda *= alpha if S < target, else lambda /= alpha, then
 * clamped into [REMOE_LAMBDA_MIN, REMOE_LAMBDA_MAX]; then the sum and count are reset. All on
 * the device: no host synchronisation.
 */
int remoe_lambda_step(double *lambda, double *sparsity_sum, uint32_t *count, double alpha,
                      double target, remoe_stream_t stream);

/*
 * *dst = value, as a one-thread kernel whose argument carries the value (kernels/controller.cu):
 * unlike a copy from pageable host memory, it can be captured in a CUDA graph.
 */
int remoe_fill_f64(double *dst, double value, remoe_stream_t stream);

/*
 * Expert parallelism (kernels/ep_dispatch.cu). R ranks each own e / R experts, rank q the block
 * [q e/R, (q+1) e/R); every rank sends every rank a count message of REMOE_EP_HEADER_WORDS + e
 * words (src/ep/protocol.rs defines the header's words).
 *
 * Count message: msg[0..8] = header, msg[8 + i] = expert_offsets[i+1] - expert_offsets[i] for
 * i < e (differences of the offsets, which an overflowed dispatch publishes as all zeros).
 *   expert_offsets [e+1] (from remoe_routing_stats); msg [REMOE_EP_HEADER_WORDS + e].
 */
#define REMOE_EP_HEADER_WORDS 8
typedef struct {
  uint32_t words[REMOE_EP_HEADER_WORDS];
} remoe_ep_header_t;

int remoe_ep_count_message(const uint32_t *expert_offsets, remoe_ep_header_t header, int32_t e,
                           uint32_t *msg, remoe_stream_t stream);

/*
 * Owner q's dispatch of what it received, from the R received count messages
 * msgs [ranks][REMOE_EP_HEADER_WORDS + e] (message s from source s; the headers are not read).
 * The receive buffer holds source 0's rows, then source 1's, ..., each source's sorted by expert;
 * the local order is expert by expert, within an expert source by source, each source's rows in
 * their own order. With el = e / ranks and N = the rows received:
 *   expert_offsets [el+1], tile_offsets [el+1]: the local experts' pair and row-tile offsets, as
 *     remoe_routing_stats writes them (the grouped GEMMs take them unchanged)
 *   src_base [ranks+1]: source s's rows are [src_base[s], src_base[s+1]); src_base[ranks] = N
 *   segments [2 e]: work space
 *   row_of_pair [capacity]: the received row of local pair p (the GEMMs' gather index)
 *   pair_of_row [capacity]: its inverse (local pair of received row i)
 *   pair_gate [capacity] = recv_gate[row_of_pair[p]] when recv_gate [capacity] is not NULL
 *     (pair_gate may be NULL otherwise)
 * for p, i < N. capacity >= N sizes the grid; rows past capacity are never written.
 * e % ranks == 0, 0 <= owner < ranks.
 */
int remoe_ep_receive_dispatch(const uint32_t *msgs, int32_t e, int32_t ranks, int32_t owner,
                              const float *recv_gate, uint32_t *expert_offsets,
                              uint32_t *tile_offsets, uint32_t *src_base, uint32_t *segments,
                              uint32_t *row_of_pair, uint32_t *pair_of_row, float *pair_gate,
                              int32_t capacity, remoe_stream_t stream);

/*
 * dst[i] = src[index[i]] for i < *count (a device pointer), 32-bit words; src, index and dst
 * hold capacity words, *count <= capacity sizes the grid, and index[i] < capacity (an index past
 * it reads nothing and leaves dst[i] as it was). It returns a per-pair scalar (dr) from an owner's local order to the
 * receive order with index = pair_of_row.
 */
int remoe_ep_permute_32(const uint32_t *src, const uint32_t *index, uint32_t *dst,
                        const uint32_t *count, int32_t capacity, remoe_stream_t stream);

/*
 * The small-batch forward (kernels/decode.cu; docs/DECODE.md): the whole ReLU-routed inference
 * forward in one persistent kernel, for t <= REMOE_DECODE_MAX_TOKENS and
 * e <= REMOE_DECODE_MAX_EXPERTS. It writes what the multi-kernel path writes, bit for bit:
 * logits and gates (remoe_router_forward, with its error word), counts, gate_sums,
 * expert_offsets, tile_offsets, stats_u32, stats_f32 and the adaptive controller's sum
 * (remoe_routing_stats with capacity = t e, which never overflows), pair_token, pair_gate,
 * pair_index (remoe_compact_pairs), act (the up projection; g and u are not written), y
 * [plane_rows, h] in the element type (remoe_expert_down, and with k_splits > 1 its f32 planes
 * in partials [k_splits, plane_rows, h] and their sum as remoe_sum_planes_* writes it; partials
 * may be NULL only when k_splits == 1) and out (remoe_combine). The per-block router statistics
 * and offsets are not written. plane_rows >= t e; 1 <= k_splits <= min(REMOE_DECODE_MAX_SPLITS,
 * ceil(f / 64)) (the value the multi-kernel path uses for the same call, for equal bits); coeff
 * as for remoe_routing_stats, or NULL for coeff_value (a host-given coefficient, without a copy
 * kernel before this one); sparsity_sum, sparsity_count and error_flags [4] may be NULL.
 * barrier [REMOE_DECODE_SYNC_WORDS] u32: the kernel's synchronisation words (the grid barrier's
 * word and two sets of counters, used by alternate launches; kernels/decode.cu), zero before the
 * first launch on them and never written by anything else; every completed launch leaves them
 * valid for the next one (no reset by the host). Launches sharing them must be ordered (one
 * stream); a graph may replay them.
 * The dynamic shared memory is chosen per device (two CTAs per multiprocessor where they fit);
 * a device where even one CTA's does not fit reports a grid of 0.
 * grid: the CTAs, at least 1 and at most what remoe_decode_max_grid_* reports for the current
 * device. Every CTA must be resident at once (the phases wait for one another), so the kernel is
 * launched cooperatively (cudaLaunchKernelEx, cudaLaunchAttributeCooperative): the driver starts
 * it with every CTA resident or refuses the launch, whatever else runs on the device. A refused
 * launch (cudaErrorCooperativeLaunchTooLarge when fewer multiprocessors are available than the
 * grid needs, under MPS say, or any other launch error) is returned, and the runtime's last error
 * is cleared. Captured into a graph as a cooperative kernel node (CUDA 12 and later).
 */
#define REMOE_DECODE_MAX_TOKENS 64
#define REMOE_DECODE_MAX_EXPERTS 512
#define REMOE_DECODE_MAX_SPLITS 4
#define REMOE_DECODE_SYNC_WORDS 6176
typedef struct remoe_decode_args {
  const uint16_t *x;  /* [t, h] */
  const uint16_t *wr; /* [h, e] */
  const uint16_t *wg; /* [e, h, f] */
  const uint16_t *wu; /* [e, h, f] */
  const uint16_t *wd; /* [e, f, h] */
  float *logits;      /* [t, e] */
  float *gates;       /* [t, e] */
  uint32_t *counts;   /* [e] */
  float *gate_sums;   /* [e] */
  uint32_t *expert_offsets; /* [e + 1] */
  uint32_t *tile_offsets;   /* [e + 1] */
  uint32_t *stats_u32;      /* [4] */
  float *stats_f32;         /* [2] */
  uint32_t *pair_token;     /* [t e] */
  float *pair_gate;         /* [t e] */
  int32_t *pair_index;      /* [t, e] */
  uint16_t *act;            /* [t e, f] */
  uint16_t *y;              /* [plane_rows, h] */
  float *partials;          /* [k_splits, plane_rows, h], k_splits > 1 only */
  uint16_t *out;            /* [t, h] */
  const double *coeff;
  double coeff_value;
  double *sparsity_sum;
  uint32_t *sparsity_count;
  uint32_t *error_flags;
  uint32_t *barrier;
  int32_t t, h, f, e, k, k_splits, plane_rows, grid;
} remoe_decode_args_t;
/* The most CTAs of the small-batch kernel that are resident at once on the current device, its
 * cooperative launch limit: multiprocessors x the occupancy the runtime reports for it; 0 when
 * the device has no cooperative launch (cudaDevAttrCooperativeLaunch) or the kernel cannot run
 * there. Synchronous; sets the kernel's attributes. On an error, *grid is 0, the code is returned
 * and the runtime's last error is cleared. */
int remoe_decode_max_grid_bf16(int32_t *grid);
int remoe_decode_max_grid_f16(int32_t *grid);
int remoe_decode_forward_bf16(const remoe_decode_args_t *args, remoe_stream_t stream);
int remoe_decode_forward_f16(const remoe_decode_args_t *args, remoe_stream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* REMOE_KERNELS_H */
