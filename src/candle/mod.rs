//! The ReMoE and TopK layers as [candle](https://github.com/huggingface/candle) modules: the
//! crate's kernels on candle's CUDA stream and storage (feature `candle-cuda`), or the crate's
//! CPU reference on candle's CPU tensors (feature `candle`, no GPU or CUDA toolkit needed), with
//! candle's autograd getting every gradient.
//!
//! ```no_run
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{Optimizer, VarBuilder, VarMap};
//! use half::bf16;
//! use remoe_kernels::candle::{MoeConfig, MoeLayer, MoeRouter, Lambda, SharedRouting};
//!
//! /// A toy model: embedding, two MoE blocks on a residual stream, a head.
//! struct Model {
//!     embed: candle_nn::Embedding,
//!     moe: Vec<MoeLayer<bf16>>,
//!     head: candle_nn::Linear,
//! }
//!
//! impl Module for Model {
//!     fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
//!         let mut x = self.embed.forward(ids)?; // f32 residual stream
//!         for m in &self.moe {
//!             x = (&x + x.apply(m)?)?; // a plain Module: the regulariser trains through it
//!         }
//!         self.head.forward(&x)
//!     }
//! }
//!
//! fn main() -> candle_core::Result<()> {
//!     let dev = Device::cuda_if_available(0)?; // the CPU path runs without a GPU
//!     let cfg = MoeConfig::from_hf_json(&std::fs::read_to_string("config.json")?)
//!         .map_err(candle_core::Error::wrap)?;
//!     // Train it as ReMoE: a ReLU router with the paper's lambda, one for all layers.
//!     let cfg = MoeConfig { router: MoeRouter::Relu { lambda: Lambda::PAPER }, ..cfg };
//!     let routing = SharedRouting::new(&cfg, &dev)?;
//!     let varmap = VarMap::new();
//!     let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev); // f32 masters, bf16 compute
//!     let (h, vocab) = (cfg.hidden_size, 32000);
//!     let model = Model {
//!         embed: candle_nn::embedding(vocab, h, vb.pp("model.embed_tokens"))?,
//!         moe: (0..2)
//!             .map(|i| MoeLayer::new(&cfg, &routing, vb.pp(format!("model.layers.{i}.mlp"))))
//!             .collect::<candle_core::Result<_>>()?,
//!         head: candle_nn::linear_no_bias(h, vocab, vb.pp("lm_head"))?,
//!     };
//!     let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-3)?;
//!     let ids = Tensor::zeros((4, 128), DType::U32, &dev)?;
//!     for _ in 0..100 {
//!         let logits = model.forward(&ids)?.flatten_to(1)?;
//!         let loss = candle_nn::loss::cross_entropy(&logits, &ids.flatten_all()?)?;
//!         opt.backward_step(&loss)?;
//!         routing.step()?; // the shared lambda, once per optimiser step
//!     }
//!     routing.set_training(false); // evaluation forwards are not recorded
//!     let stats = model.moe[0].routing_stats()?.expect("a forward ran");
//!     println!("sparsity {:.3}, lambda {:e}", stats.sparsity, routing.coefficient()?);
//!     varmap.save("model.safetensors")?; // every parameter, at the checkpoint's names
//!     Ok(())
//! }
//! ```
//!
//! ## Configuration and parameters
//!
//! [`MoeConfig`] deserialises from a Hugging Face `config.json` (Mixtral, Qwen2-MoE, Qwen3-MoE,
//! OLMoE, DeepSeek V2/V3 with greedy softmax top-k; the keys are in its documentation). [`MoeLayer::new`]
//! takes the parameters through the `VarBuilder` at the checkpoint's own names ([`Family`]), so
//! they live in the user's `VarMap` (trained by its optimiser, written by `varmap.save()`) or
//! come from `VarBuilder::from_mmaped_safetensors` over a sharded checkpoint like any candle
//! model. [`load_shards_into_varmap`] fills a `VarMap` from a sharded checkpoint for training.
//!
//! **Master weights and compute dtype.** The parameters are stored in the `VarBuilder`'s dtype
//! (f32 for f32 masters, as mixed-precision training keeps them); the layer computes in `T`
//! (bf16 or f16, the kernels' dtypes), whatever x's dtype, and returns x's dtype. Every forward
//! stacks and casts the per-expert matrices into the kernels' \[E,H,F\]/\[E,F,H\] tensors with
//! ops that autograd follows back to each expert's `Var`: for f32 masters, a stack of the
//! matrices as stored and one transpose-and-cast op (kernels/transpose.cu on CUDA; about 1 GB
//! moved per forward at SPEC's config A, E H F = 8 x 768 x 3072, every access along rows, and as
//! much again in the backward, which casts the stacked gradient back and splits it per expert);
//! for masters already in `T`, candle's strided stack of the transposed views, one copy. The
//! gradients reach the masters through that cast, so they are rounded to `T` on the way (as
//! PyTorch autocast's are): the kernels compute them in f32, candle's autograd requires a
//! tensor's gradient in the tensor's dtype. Constant parameters (an mmapped checkpoint) are
//! stacked once, at construction.
//!
//! ## The regulariser and lambda
//!
//! The balance regulariser (ReMoE's L1 term, TopK's aux loss) is not a node of the graph: the
//! layer op's backward adds its gradient to the router's, at [`SharedRouting`]'s
//! `balance_grad_scale` (default 1), as Megatron's `MoEAuxLossAutoScaler` does. So a model that
//! only calls `forward` (`x.apply(&moe)`) trains with it, with no host read in the backward,
//! and its loss is the task loss alone (adding the regulariser's value would count its gradient
//! twice). The value is a statistic, [`RoutingStats::balance_loss`], to log. A loss divided by N
//! micro-batches (or scaled for mixed precision) sets the same factor as
//! [`SharedRouting::set_balance_grad_scale`]. One [`SharedRouting`] per model holds the one
//! adaptive lambda of all its layers, fed by training forwards only, stepped once per optimiser
//! step; a training loop reads each layer's [`MoeLayer::check_device_errors`] now and then
//! (once per step is cheap: it waits for the stream).
//!
//! ## Statistics
//!
//! [`MoeLayer::routing_stats`] gives the last forward's sparsity, n_e per expert, mean active
//! experts per token and balance loss from what the forward computed anyway (no extra router
//! matmul); on CUDA the forward copies them on the device, and asking is the one host read.
//!
//! ## Design: two custom ops per call
//!
//! The layer has five differentiable inputs (x, Wr, Wg, Wu, Wd) and a candle custom op at most
//! three. One call is two ops sharing the call's state (`ops::CallState`: on CUDA the
//! [`MoeContext`](crate::MoeContext) holding what the forward saved, on the CPU the
//! reference's forward; and a hand-over slot):
//!
//! 1. **bind** (`CustomOp3` over Wg, Wu, Wd): outputs a one-element placeholder. It makes the
//!    expert weights inputs of the graph; its backward hands candle the expert gradients the
//!    layer op's backward left in the shared state (candle runs it after the layer op's, since
//!    the layer op consumes its output).
//! 2. **layer** (`CustomOp3` over x, Wr, placeholder): outputs out \[T,H\]. On CUDA it wraps the
//!    five buffers as crate views (no copies) and runs the crate's forward on candle's stream;
//!    its backward runs the crate's backward (dX and all four weight gradients in one pass, the
//!    regulariser's gradient included) and returns dX and dWr. On the CPU both run the
//!    reference (in f64, rounded to `T`).
//!
//! Costs beyond the crate's own layer (CUDA): `out` is allocated zeroed per call; the bind op
//! allocates 4 bytes; the statistics copy E + 3 words on the device; the backward converts the
//! f32 weight gradients to `T` (one pass over each) into buffers allocated per call; candle adds
//! each returned gradient into a zero tensor of the input's shape (`GradStore::or_insert`, as
//! for every op). Each call keeps its context (about what
//! [`MoeContext::saved_bytes`](crate::MoeContext::saved_bytes) says) until its graph is dropped;
//! the context then returns to the layer's pool for the next forward.
//!
//! A CUDA call in which nothing tracks a gradient (x and a checkpoint's constants, as
//! `VarBuilder::from_mmaped_safetensors` gives them) runs on a context that does not save for
//! backward, so the contexts' default [`SmallBatch::Auto`](crate::SmallBatch::Auto) gives a
//! decode-sized batch of the ReLU layer the crate's small-batch path where its rule picks it
//! (the same bits either way), while a call over trainable `Var`s saves and keeps the
//! multi-kernel path.
//!
//! ## Requirements and limits
//!
//! - CUDA (feature `candle-cuda`, which needs the crate's default features off: see the README)
//!   or the CPU; x of any float dtype and rank with H last. On CUDA H and F are multiples of 8.
//! - Second-order gradients are not supported (the ops' backwards are not differentiable).
//! - A router logit that is NaN or infinite: on the CPU the forward's error; on CUDA the
//!   device records it and [`MoeLayer::check_device_errors`] reports it.

mod config;
#[cfg(feature = "candle-cuda")]
mod cuda;
mod ops;
mod params;
mod routing;
mod stage;
mod stats;

use std::sync::{Arc, Mutex};

use candle_core::{Module, Tensor, WithDType};
use candle_nn::{Init, VarBuilder};

use crate::capacity::PairCapacity;
use crate::moe::RouterKind;
use crate::reference::LayerParams;
use crate::weights::HostMoeWeights;

pub use config::{Family, Lambda, MoeConfig, MoeRouter, SharedExpertConfig};
pub use ops::CandleElement;
pub use params::load_shards_into_varmap;
use routing::check_device;
pub use routing::SharedRouting;
pub use stats::RoutingStats;

use ops::{
    candle_err, lock, BindExperts, CallCoeff, CallState, LastStats, LayerCall, LayerOp, Pool,
    StatsSink,
};
use params::{Routed, SharedExpert};

/// The weight initialisation of parameters a `VarMap` creates: normal with standard deviation
/// 0.02 (Megatron-LM's `init_method_std`, which ReMoE's runs use; Hugging Face's
/// `initializer_range` default too).
pub const INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// A ReMoE or TopK MoE layer for candle, computing in `T` (bf16 or f16); see the module
/// documentation.
pub struct MoeLayer<T: CandleElement = half::bf16> {
    router_kind: RouterKind,
    coeff: CallCoeff,
    routing: SharedRouting,
    /// (H, F, E, k)
    dims: (usize, usize, usize, usize),
    routed: Routed,
    shared: Option<SharedExpert>,
    routed_scale: f64,
    pool: Pool<T>,
    capacity: PairCapacity,
    sink: StatsSink,
    #[cfg(feature = "candle-cuda")]
    dev_cache: Arc<Mutex<Option<crate::device::Device>>>,
}

impl<T: CandleElement> std::fmt::Debug for MoeLayer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (h, ffn, e, k) = self.dims;
        f.debug_struct("MoeLayer")
            .field("router", &self.router_kind)
            .field("hidden", &h)
            .field("ffn", &ffn)
            .field("experts", &e)
            .field("k", &k)
            .field("shared_expert", &self.shared.is_some())
            .finish()
    }
}

impl<T: CandleElement> MoeLayer<T> {
    /// The layer of `cfg` with its parameters from `vb` at `cfg.family`'s names (see [`Family`];
    /// `vb` at the layer's prefix, e.g. `vb.pp("model.layers.3.mlp")`), sharing `routing` (the
    /// adaptive lambda, the training flag, the balance gradient's scale) with the model's other
    /// layers. A `VarBuilder` over a `VarMap` creates missing parameters with [`INIT`] in its
    /// dtype (f32 for f32 master weights); over safetensors files it reads them (sharded,
    /// mmapped, any float dtype). The layer computes in `T`.
    ///
    /// Errors: an invalid configuration, a `routing` made for another router (an adaptive
    /// lambda for a TopK or fixed-lambda layer, or none for an adaptive one), a device the
    /// layer does not run on, or a parameter missing or of the wrong shape.
    pub fn new(
        cfg: &MoeConfig,
        routing: &SharedRouting,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        cfg.validate().map_err(candle_err)?;
        check_device(vb.device())?;
        let coeff = match cfg.router {
            MoeRouter::Relu {
                lambda: Lambda::Adaptive { .. },
            } => {
                if !routing.is_adaptive() {
                    candle_core::bail!(
                        "remoe: an adaptive-lambda layer needs a SharedRouting made for one"
                    )
                }
                CallCoeff::Shared(routing.clone())
            }
            MoeRouter::Relu {
                lambda: Lambda::Fixed(c),
            }
            | MoeRouter::TopK { aux_coeff: c, .. } => {
                if routing.is_adaptive() {
                    candle_core::bail!(
                        "remoe: a layer with a fixed coefficient given a SharedRouting with an \
                         adaptive lambda"
                    )
                }
                CallCoeff::Fixed(c)
            }
        };
        let (routed, shared) = params::from_builder(cfg, &vb, <T as WithDType>::DTYPE)?;
        let dims = (
            cfg.hidden_size,
            cfg.expert_ffn,
            cfg.experts,
            cfg.experts_per_token,
        );
        Ok(Self {
            router_kind: cfg.router_kind(),
            coeff,
            routing: routing.clone(),
            dims,
            routed,
            shared,
            routed_scale: cfg.routed_scale,
            pool: Arc::new(Mutex::new(Vec::new())),
            capacity: PairCapacity::default(),
            sink: Arc::new(Mutex::new(None)),
            #[cfg(feature = "candle-cuda")]
            dev_cache: Arc::new(Mutex::new(None)),
        })
    }

    /// The tensors a forward hands the kernels, made from the parameters as every forward makes
    /// them: router \[H,E\], gate and up \[E,H,F\], down \[E,F,H\] (the crate's layout), in `T`, on
    /// the parameters' device. Where the parameters are trainable `Var`s these are tracked by
    /// autograd, so a loss on them sends gradients to the parameters through the same staging
    /// ops a forward's backward does (for timing the staging alone, or to use the stacked
    /// weights elsewhere); an mmapped checkpoint's constants were stacked once, at
    /// construction, and are returned as they are. Not the shared expert's.
    pub fn compute_weights(&self) -> candle_core::Result<[Tensor; 4]> {
        self.routed.compute(<T as WithDType>::DTYPE)
    }

    /// The weights the layer computes with, copied to the host: the router and routed experts
    /// stacked and cast to `T` as a forward does, in the crate's layout (router \[H,E\], gate and
    /// up \[E,H,F\], down \[E,F,H\]). For checking the layer against the crate's reference
    /// ([`crate::reference`] takes this layout and these values), or to save the layer with
    /// [`HostMoeWeights::save`] in another checkpoint layout; `varmap.save()` writes the masters
    /// themselves at the checkpoint's names. Not the shared expert's.
    pub fn host_weights(&self) -> candle_core::Result<HostMoeWeights<T>> {
        let (h, f, e, _) = self.dims;
        let host = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
        let [r, g, u, d] = self.compute_weights()?;
        let params = LayerParams {
            router: host(&r)?,
            gate: host(&g)?,
            up: host(&u)?,
            down: host(&d)?,
        };
        HostMoeWeights::new(h, f, e, params).map_err(candle_err)
    }

    /// The routing state this layer shares with the model's other layers.
    pub fn routing(&self) -> &SharedRouting {
        &self.routing
    }

    /// Sets how many routed pairs the layer's CUDA contexts hold (see [`crate::capacity`]): the
    /// default sizes them for exactly the pairs each forward routes (candle runs eagerly, so a
    /// forward counts its pairs and never overflows); [`PairCapacity::Pairs`] fixes the number,
    /// and a forward routing more pairs then fails with
    /// [`Error::CapacityExceeded`](crate::Error::CapacityExceeded) (wrapped in the candle
    /// error) instead of computing a zero layer. The CPU path is always dropless.
    pub fn set_pair_capacity(&mut self, capacity: PairCapacity) {
        self.capacity = capacity;
        for ctx in lock(&self.pool).iter_mut() {
            ctx.set_pair_capacity(capacity);
        }
    }

    /// Reports what the device found in the layer's CUDA forwards since the last check (a NaN
    /// or infinite router logit: [`Error::NonFiniteLogits`](crate::Error::NonFiniteLogits); a
    /// pair count past a fixed capacity), as a candle error wrapping the crate's
    /// [`Error`](crate::Error), and clears it. Reads the error word of every context the layer
    /// holds (those of calls whose graph is still alive are checked once it is dropped); waits
    /// for the stream. Nothing to do on the CPU, whose forward returns these errors itself.
    pub fn check_device_errors(&self) -> candle_core::Result<()> {
        for ctx in lock(&self.pool).iter_mut() {
            ctx.check_device_errors().map_err(candle_err)?;
        }
        Ok(())
    }

    /// The routing statistics of the layer's last forward (`None` before the first); see
    /// [`RoutingStats`]. On CUDA a host read that waits for the stream.
    pub fn routing_stats(&self) -> candle_core::Result<Option<RoutingStats>> {
        match &*lock(&self.sink) {
            None => Ok(None),
            Some(LastStats::Host(s)) => Ok(Some(s.clone())),
            #[cfg(feature = "candle-cuda")]
            Some(LastStats::Device(d)) => d.read().map(Some),
        }
    }

    /// The layer on no tokens: the empty output (x itself, detached: a tensor of no elements
    /// of x's shape, dtype and device, made without candle's kernels, whose CUDA launches
    /// refuse an empty grid), statistics of no pairs, nothing recorded for lambda, and no
    /// gradient (there is none to give).
    fn empty_batch(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, e, _) = self.dims;
        *lock(&self.sink) = Some(LastStats::Host(RoutingStats {
            tokens: 0,
            active_pairs: 0,
            sparsity: 1.0,
            balance_loss: 0.0,
            tokens_per_expert: vec![0; e],
            mean_active_experts: 0.0,
            active_experts_histogram: Some(vec![0; e + 1]),
        }));
        Ok(x.detach())
    }

    /// The routed layer (scaled) plus the shared expert, on x \[T,H\] in `T`.
    fn layer(&self, xt: &Tensor) -> candle_core::Result<Tensor> {
        let [router, gate, up, down] = self.routed.compute(<T as WithDType>::DTYPE)?;
        let tracked = [xt, &router, &gate, &up, &down]
            .iter()
            .any(|t| t.track_op());
        let state = CallState::new(self.pool.clone());
        let handle = gate.apply_op3(&up, &down, BindExperts(state.clone()))?;
        let call = LayerCall {
            state,
            router: self.router_kind,
            coeff: self.coeff.clone(),
            record: tracked && self.routing.training(),
            save: tracked,
            grad_scale: self.routing.balance_grad_scale(),
            dims: self.dims,
            experts: [gate, up, down],
            capacity: self.capacity,
            sink: self.sink.clone(),
            #[cfg(feature = "candle-cuda")]
            dev_cache: self.dev_cache.clone(),
        };
        let mut out = xt.apply_op3(&router, &handle, LayerOp(call))?;
        if self.routed_scale != 1.0 {
            out = (out * self.routed_scale)?;
        }
        match &self.shared {
            Some(s) => out + s.forward(xt)?,
            None => Ok(out),
        }
    }
}

impl<T: CandleElement> Module for MoeLayer<T> {
    /// The layer on x \[.., H\] of any float dtype (computed in `T`, returned in x's dtype).
    /// The balance regulariser's gradient is added in the backward; a training forward (see
    /// [`SharedRouting`]) records its sparsity for the adaptive lambda. A batch of no tokens
    /// gives the empty output and records nothing.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (h, _, _, _) = self.dims;
        let shape = x.shape().clone();
        if shape.dims().last() != Some(&h) {
            candle_core::bail!("remoe: x is {shape:?}, the layer's hidden size is {h}")
        }
        if !x.dtype().is_float() {
            candle_core::bail!("remoe: x is {:?}, not a float dtype", x.dtype())
        }
        if shape.elem_count() == 0 {
            return self.empty_batch(x);
        }
        let xt = x
            .to_dtype(<T as WithDType>::DTYPE)?
            .reshape(((), h))?
            .contiguous()?;
        self.layer(&xt)?.reshape(shape)?.to_dtype(x.dtype())
    }
}
