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

/*
 * Router forward (kernels/router.cu): logits = X Wr (f32 accumulation) and gates = ReLU(logits).
 *   x      [t, h]  bf16 or f16, row-major
 *   wr     [h, e]  same dtype as x, row-major
 *   logits [t, e]  f32, written
 *   gates  [t, e]  f32, written
 * t may be 0 (nothing is launched). t*h, h*e and t*e must fit in int32.
 */
int remoe_router_forward_bf16(const uint16_t *x, const uint16_t *wr, float *logits, float *gates,
                              int32_t t, int32_t h, int32_t e, remoe_stream_t stream);
int remoe_router_forward_f16(const uint16_t *x, const uint16_t *wr, float *logits, float *gates,
                             int32_t t, int32_t h, int32_t e, remoe_stream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* REMOE_KERNELS_H */
