//! The CPU reference: a plain, loop-by-loop implementation of every formula of docs/SPEC.md,
//! which the GPU kernels are tested against and whose gradients the tests check by finite
//! differences.
//!
//! Storage is generic over [`Real`] (f32 to compare with the GPU, f64 for finite differences);
//! every sum is accumulated in f64 whatever the storage type. Nothing here is fast on purpose:
//! each function is written to be read against the formula it implements.
//!
//! Layouts (row-major, the same as the GPU path's):
//! - `x` \[T,H\]; router weight `wr` \[H,E\];
//! - expert weights stacked per expert: gate `wg` \[E,H,F\], up `wu` \[E,H,F\], down `wd` \[E,F,H\].

mod controller;
pub mod expert_parallel;
mod experts;
mod layer;
mod routing;

pub use controller::SparsityController;
pub use experts::{swiglu_expert_backward, swiglu_expert_forward, ExpertActivations};
pub use layer::{
    remoe_backward, remoe_backward_scaled, remoe_forward, topk_backward, topk_backward_scaled,
    topk_forward, topk_normalized_forward, LayerGrads, LayerParams, RemoeForward, TopkForward,
    TOPK_AUX_COEFF,
};
pub use routing::{
    check_logits_finite, l1_balance_loss, relu_gate, relu_router, softmax_topk_normalized_router,
    softmax_topk_router, topk_routing_of_logits, Dispatch, Routing, TopkRouting,
};

/// Storage type of the reference: f32 or f64. Arithmetic goes through f64.
pub trait Real: Copy + Default + PartialOrd + std::fmt::Debug + Send + Sync + 'static {
    /// `v` rounded to this type.
    fn from_f64(v: f64) -> Self;
    /// The value in f64 (exact).
    fn to_f64(self) -> f64;
}

impl Real for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
}

/// `a[m,n] @ b[n,p]` row-major, f64 accumulation: the router GEMM.
pub fn matmul<T: Real>(a: &[T], b: &[T], m: usize, n: usize, p: usize) -> Vec<T> {
    assert_eq!(a.len(), m * n, "matmul: a is not [m,n]");
    assert_eq!(b.len(), n * p, "matmul: b is not [n,p]");
    let mut c = vec![T::default(); m * p];
    for i in 0..m {
        for j in 0..p {
            let mut s = 0.0f64;
            for l in 0..n {
                s += a[i * n + l].to_f64() * b[l * p + j].to_f64();
            }
            c[i * p + j] = T::from_f64(s);
        }
    }
    c
}

/// SiLU(z) = z * sigmoid(z).
pub fn silu(z: f64) -> f64 {
    z * sigmoid(z)
}

/// SiLU'(z) = s(z) * (1 + z * (1 - s(z))).
pub fn silu_grad(z: f64) -> f64 {
    let s = sigmoid(z);
    s * (1.0 + z * (1.0 - s))
}

/// The logistic function 1 / (1 + e^-z).
pub fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}
