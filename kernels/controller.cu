// The adaptive L1 coefficient of ReMoE, stepped on the device (SPEC: "Adaptive coefficient").
// Each forward's routing statistics add the layer's sparsity to a running sum on the device
// (kernels/compaction.cu); once per training step this kernel applies the update rule to the
// mean and resets the sum, so a training loop never waits on the host for lambda.
#include "common.cuh"

namespace {

__global__ void lambda_step_kernel(double *lambda, double *sparsity_sum, uint32_t *count,
                                   double alpha, double target) {
  if (*count > 0) {
    const double mean = *sparsity_sum / (double)*count;
    const double next = mean < target ? *lambda * alpha : *lambda / alpha;
    // Unclamped, a run of steps one way reaches 0 or inf in f64 and never comes back (0 * alpha
    // is 0). The CPU reference clamps with f64::clamp: the same result for every non-NaN value.
    *lambda = fmin(fmax(next, REMOE_LAMBDA_MIN), REMOE_LAMBDA_MAX);
  }
  *sparsity_sum = 0.0;
  *count = 0;
}

// A host value into a device scalar as a kernel argument, not a copy: a copy from pageable host
// memory cannot be captured in a CUDA graph, a kernel node can (its argument is captured).
__global__ void fill_f64_kernel(double *dst, double value) { *dst = value; }

}  // namespace

extern "C" int remoe_fill_f64(double *dst, double value, remoe_stream_t stream) {
  fill_f64_kernel<<<1, 1, 0, (cudaStream_t)stream>>>(dst, value);
  return (int)cudaGetLastError();
}

extern "C" int remoe_lambda_step(double *lambda, double *sparsity_sum, uint32_t *count,
                                 double alpha, double target, remoe_stream_t stream) {
  lambda_step_kernel<<<1, 1, 0, (cudaStream_t)stream>>>(lambda, sparsity_sum, count, alpha,
                                                        target);
  return (int)cudaGetLastError();
}
