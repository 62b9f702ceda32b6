//! # remoe-kernels
//!
//! Hand-written CUDA kernels for ReMoE, the fully differentiable Mixture-of-Experts with ReLU
//! routing (Wang, Chen, Zhu, ICLR 2025), and the TopK+softmax dispatch baseline, behind a safe
//! Rust API on cudarc streams and buffers. The math is the crate's contract, SPEC.md; every GPU
//! op is checked against the CPU implementation in [`reference`](mod@reference).
//!
//! ## Layout of the layer's tensors (row-major)
//!
//! | tensor | shape | dtype |
//! |---|---|---|
//! | X, out, dOut | [T, H] | bf16 or f16 |
//! | router weight Wr | [H, E] | bf16 or f16 |
//! | expert gate weights Wg | [E, H, F] (expert e's Wg_e is the e-th \[H,F\] block) | bf16 or f16 |
//! | expert up weights Wu | [E, H, F] | bf16 or f16 |
//! | expert down weights Wd | [E, F, H] | bf16 or f16 |
//! | logits L, gates R | [T, E] | f32 |
//!
//! ## No GPU
//!
//! The crate builds with a CUDA compiler (see README) but runs anywhere: [`Device::new`] returns
//! [`Error::NoCudaDevice`] on a machine without a driver or device, and the [`reference`](mod@reference) module
//! needs no GPU at all.

pub mod backward;
#[cfg(feature = "candle")]
pub mod candle;
pub mod capacity;
pub mod config;
pub mod controller;
pub mod device;
mod element;
pub mod error;
mod ffi;
pub mod gemm;
pub mod graph;
pub mod moe;
pub mod reference;
pub mod rng;
pub mod router;
pub mod synthetic;
pub mod sys;
pub mod tensor;
pub mod timing;
pub mod weights;
mod workspace;

pub use backward::{moe_backward, BackwardOptions, MoeGrads};
pub use capacity::PairCapacity;
pub use config::LayerConfig;
pub use controller::{Coefficient, LambdaController};
pub use device::{driver_library_present, Device, CUDA_TARGETS};
pub use element::HalfElement;
pub use error::{Error, Result};
pub use gemm::GemmPath;
pub use graph::Graph;
pub use moe::{
    moe_forward, remoe_forward, topk_forward, ForwardStats, HostDispatch, MoeContext,
    MoeWeightViews, MoeWeights, RouterKind, SavedForward, StageTimes,
};
pub use router::router_forward;
pub use tensor::{DType, DeviceTensor, Element, TensorView};
pub use timing::{time_gpu, GpuTimings};
pub use weights::{DeviceMoeWeights, HostMoeWeights, WeightLayout, WeightsError};
