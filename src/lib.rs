//! # remoe-kernels
//!
//! Hand-written CUDA kernels for ReMoE, the fully differentiable Mixture-of-Experts with ReLU
//! routing (Wang, Chen, Zhu, ICLR 2025), and the TopK+softmax dispatch baseline, behind a safe
//! Rust API on cudarc streams and buffers. The math is the crate's contract, `docs/SPEC.md` (in
//! the repository and the package): the layer's forward and backward equations, the layouts,
//! and the error, capacity, determinism and CUDA-graph rules. Every GPU op is checked against
//! the CPU implementation in [`reference`](mod@reference).
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
//! | gradients dX | [T, H] | bf16 or f16 |
//! | gradients dWr, dWg, dWu, dWd | as the weights | f32 |
//!
//! ## No GPU
//!
//! The crate builds with a CUDA compiler (see README) but runs anywhere: [`Device::new`] returns
//! [`Error::NoCudaDevice`] on a machine without a driver or device, and the [`reference`](mod@reference) module
//! needs no GPU at all.
//!
//! ## Example
//!
//! One training step of a ReMoE layer: [`Device::new`], the weights as [`DeviceTensor`]s, a
//! [`MoeContext`] that keeps the workspace and what the backward needs, [`remoe_forward`] with
//! the adaptive coefficient of a [`LambdaController`], [`moe_backward`], and the controller's
//! step. (`no_run`: it needs a GPU.)
//!
//! ```no_run
//! use half::bf16;
//! use remoe_kernels::{
//!     moe_backward, remoe_forward, Coefficient, Device, DeviceTensor, LambdaController,
//!     LayerConfig, MoeContext, MoeGrads, MoeWeights,
//! };
//!
//! # fn main() -> remoe_kernels::Result<()> {
//! let dev = Device::new(0)?; // Err(Error::NoCudaDevice) without a GPU
//! let cfg = LayerConfig::new(4096, 768, 3072, 8, 1); // T, H, F, E, k
//! let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
//! let host = |n: usize| vec![bf16::from_f32(0.01); n];
//! let wr = DeviceTensor::from_host(&dev, &host(h * e), &[h, e])?;
//! let wg = DeviceTensor::from_host(&dev, &host(e * h * f), &[e, h, f])?;
//! let wu = DeviceTensor::from_host(&dev, &host(e * h * f), &[e, h, f])?;
//! let wd = DeviceTensor::from_host(&dev, &host(e * f * h), &[e, f, h])?;
//! let weights = MoeWeights { router: &wr, gate: &wg, up: &wu, down: &wd };
//! let x = DeviceTensor::from_host(&dev, &host(t * h), &[t, h])?;
//!
//! let mut lambda = LambdaController::new(&dev, cfg.k, cfg.experts)?;
//! let mut ctx = MoeContext::<bf16>::for_training(&dev);
//! let mut out = DeviceTensor::<bf16>::zeros(&dev, &[t, h])?;
//! remoe_forward(&mut ctx, &cfg, Coefficient::Adaptive(&mut lambda), &x, &weights, &mut out)?;
//! // Nothing is read back until asked for (it waits for the GPU):
//! println!("density {:.3}", 1.0 - ctx.stats()?.sparsity);
//!
//! let dout = DeviceTensor::<bf16>::zeros(&dev, &[t, h])?; // d loss / d out
//! let mut dx = DeviceTensor::<bf16>::zeros(&dev, &[t, h])?;
//! let mut dwr = DeviceTensor::<f32>::zeros(&dev, &[h, e])?;
//! let mut dwg = DeviceTensor::<f32>::zeros(&dev, &[e, h, f])?;
//! let mut dwu = DeviceTensor::<f32>::zeros(&dev, &[e, h, f])?;
//! let mut dwd = DeviceTensor::<f32>::zeros(&dev, &[e, f, h])?;
//! let grads = MoeGrads { dx: &mut dx, router: &mut dwr, gate: &mut dwg, up: &mut dwu, down: &mut dwd };
//! moe_backward(&mut ctx, Coefficient::Adaptive(&mut lambda), &x, &weights, &dout, grads, false)?;
//! lambda.step()?; // once per training step
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod backward;
#[cfg(feature = "candle")]
pub mod candle;
pub mod capacity;
pub mod config;
pub mod controller;
mod decode;
pub mod device;
mod driver;
mod element;
pub mod ep;
pub mod error;
mod experts;
mod ffi;
mod gather;
pub mod gemm;
pub mod graph;
pub mod moe;
pub mod reference;
pub mod router;
mod scratch;
pub mod sys;
pub mod tensor;
#[cfg(feature = "candle-cuda")]
mod transpose;
mod weight_grad_split;
pub mod weights;
mod workspace;

pub use backward::{moe_backward, BackwardOptions, MoeGrads};
pub use capacity::PairCapacity;
pub use config::LayerConfig;
pub use controller::{Coefficient, LambdaController};
pub use device::{Device, CUDA_TARGETS};
pub use driver::driver_library_present;
pub use element::HalfElement;
pub use error::WeightsError;
pub use error::{Error, Result};
pub use gemm::GemmPath;
pub use graph::Graph;
pub use moe::{
    moe_forward, remoe_forward, topk_forward, ForwardStats, HostDispatch, MoeContext,
    MoeWeightViews, MoeWeights, RouterKind, SavedForward, SmallBatch, StageTimes,
};
pub use router::router_forward;
pub use tensor::{DType, DeviceTensor, Element, TensorView};
pub use weights::{DeviceMoeWeights, HostMoeWeights, WeightLayout};

/// The README's Rust examples, compiled (and run, unless marked `no_run`) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
