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

/*
 * Router forward (kernels/router.cu): logits = X Wr (f32 accumulation) and gates = ReLU(logits).
 *   x      [t, h]  bf16 or f16, row-major
 *   wr     [h, e]  same dtype as x, row-major
 *   logits [t, e]  f32, written
 *   gates  [t, e]  f32, written
 *   block_counts [ceil(t/64), e] u32, block_sums [ceil(t/64), e] f32: per block of 64 tokens,
 *     the number of gates > 0 and the sum of the gates of each expert. Both may be NULL (then
 *     not written).
 * t may be 0 (nothing is launched). t*h, h*e and t*e must fit in int32; h % 8 == 0.
 */
int remoe_router_forward_bf16(const uint16_t *x, const uint16_t *wr, float *logits, float *gates,
                              uint32_t *block_counts, float *block_sums, int32_t t, int32_t h,
                              int32_t e, remoe_stream_t stream);
int remoe_router_forward_f16(const uint16_t *x, const uint16_t *wr, float *logits, float *gates,
                             uint32_t *block_counts, float *block_sums, int32_t t, int32_t h,
                             int32_t e, remoe_stream_t stream);

/*
 * TopK router tail (kernels/topk.cu): from logits [t, e] (f32), P = softmax per token; the k
 * largest logits are selected (ties: lower expert index). Writes probs [t, e], gates [t, e]
 * (P where selected, else 0; a selected P that underflows to 0 is stored as FLT_MIN so that the
 * selection stays visible to the compaction), and per block of 64 tokens block_counts (selected
 * per expert) and block_sums (sum of P per expert, over all tokens). 1 <= k <= e <= 512.
 */
int remoe_topk_softmax(const float *logits, float *probs, float *gates, uint32_t *block_counts,
                       float *block_sums, int32_t t, int32_t e, int32_t k, remoe_stream_t stream);

/*
 * Routing statistics (kernels/compaction.cu), from the router's per-block statistics:
 *   counts [e]          n_e
 *   gate_sums [e]       sum over t of the gates (ReMoE) or of P (TopK), f32, fixed-order sums
 *   block_offsets [nb, e]  where block b's pairs of expert e start inside expert e's list
 *   expert_offsets [e+1]   exclusive scan of counts: expert e's pairs are [off[e], off[e+1])
 *   tile_offsets [e+1]     exclusive scan of ceil(n_e / REMOE_GEMM_TILE_ROWS)
 *   stats_u32 [2]  { active pairs |A|, total GEMM row tiles }
 *   stats_f32 [2]  { sparsity 1 - |A|/(t e), balance loss coeff*e/(k t^2)*sum_e n_e*gate_sums[e] }
 * nb = ceil(t / REMOE_ROUTER_TOKENS_PER_BLOCK). Deterministic: every sum has a fixed order.
 */
int remoe_routing_stats(const uint32_t *block_counts, const float *block_sums,
                        uint32_t *block_offsets, uint32_t *counts, float *gate_sums,
                        uint32_t *expert_offsets, uint32_t *tile_offsets, uint32_t *stats_u32,
                        float *stats_f32, int32_t t, int32_t e, int32_t k, double coeff,
                        remoe_stream_t stream);

/*
 * Compaction (kernels/compaction.cu): the pairs with gate > 0, grouped by expert, ascending
 * token order within an expert (offsets from remoe_routing_stats).
 *   pair_token [|A|] u32, pair_gate [|A|] f32: token and gate of each pair
 *   pair_index [t, e] i32: the pair of (t, e), or -1 where the gate is 0
 */
int remoe_compact_pairs(const float *gates, const uint32_t *block_offsets,
                        const uint32_t *expert_offsets, uint32_t *pair_token, float *pair_gate,
                        int32_t *pair_index, int32_t t, int32_t e, remoe_stream_t stream);

/*
 * Grouped expert GEMMs (kernels/grouped_gemm.cu). Row tile i of the grid belongs to the expert
 * e with tile_offsets[e] <= i < tile_offsets[e+1]; num_tiles = tile_offsets[e] (total).
 *
 * Up projection with SwiGLU: for each pair p of expert e, with x_t the row pair_token[p] of x,
 *   act[p, :] = SiLU(x_t Wg_e) * (x_t Wu_e)            act [|A|, f]
 *   x [t, h]; wg, wu [e, h, f]. h % 8 == 0, f % 8 == 0.
 * Down projection:
 *   y[p, :] = act[p, :] Wd_e                            y [|A|, h];  wd [e, f, h]
 */
int remoe_expert_up_swiglu_bf16(const uint16_t *x, const uint32_t *pair_token,
                                const uint16_t *wg, const uint16_t *wu, uint16_t *act,
                                const uint32_t *expert_offsets, const uint32_t *tile_offsets,
                                int32_t num_tiles, int32_t e, int32_t h, int32_t f,
                                remoe_stream_t stream);
int remoe_expert_up_swiglu_f16(const uint16_t *x, const uint32_t *pair_token, const uint16_t *wg,
                               const uint16_t *wu, uint16_t *act, const uint32_t *expert_offsets,
                               const uint32_t *tile_offsets, int32_t num_tiles, int32_t e,
                               int32_t h, int32_t f, remoe_stream_t stream);
int remoe_expert_down_bf16(const uint16_t *act, const uint16_t *wd, uint16_t *y,
                           const uint32_t *expert_offsets, const uint32_t *tile_offsets,
                           int32_t num_tiles, int32_t e, int32_t h, int32_t f,
                           remoe_stream_t stream);
int remoe_expert_down_f16(const uint16_t *act, const uint16_t *wd, uint16_t *y,
                          const uint32_t *expert_offsets, const uint32_t *tile_offsets,
                          int32_t num_tiles, int32_t e, int32_t h, int32_t f,
                          remoe_stream_t stream);

/*
 * Combine (kernels/combine.cu): out[t, :] = sum over experts e in ascending order with
 * pair_index[t, e] >= 0 of gates[t, e] * y[pair_index[t, e], :], accumulated in f32; a token
 * with no pair gets zeros. No atomics: the result is bitwise reproducible.
 */
int remoe_combine_bf16(const uint16_t *y, const float *gates, const int32_t *pair_index,
                       uint16_t *out, int32_t t, int32_t h, int32_t e, remoe_stream_t stream);
int remoe_combine_f16(const uint16_t *y, const float *gates, const int32_t *pair_index,
                      uint16_t *out, int32_t t, int32_t h, int32_t e, remoe_stream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* REMOE_KERNELS_H */
