//! The ReMoE and TopK layers as [candle](https://github.com/huggingface/candle) modules (feature
//! `candle`): the crate's kernels run on candle's CUDA stream and storage, and candle's autograd
//! gets every gradient, so `loss.backward()` and candle-nn's optimisers work as with any layer.
//!
//! ```ignore
//! let varmap = candle_nn::VarMap::new();
//! let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::BF16, &candle_core::Device::new_cuda(0)?);
//! let moe = MoeLayer::<bf16>::remoe(vb.pp("moe"), hidden, ffn, experts, k)?;
//! let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-3)?;
//! for batch in batches {
//!     let y = moe.forward_with_loss(&x)?;          // y.out [.., H], y.balance_loss scalar f32
//!     let loss = (task_loss(&y.out)? + y.balance_loss)?;
//!     opt.backward_step(&loss)?;
//!     moe.end_step()?;                              // the adaptive lambda, once per step
//! }
//! ```
//!
//! ## Design: three custom ops per call
//!
//! The layer has five differentiable inputs (x, Wr, Wg, Wu, Wd), a candle custom op at most
//! three, and one output. One layer call is three ops that share the call's state
//! (`ops::CallState`: the [`MoeContext`](crate::MoeContext) holding what the forward saved, and
//! two hand-over slots):
//!
//! 1. **bind** (`CustomOp3` over Wg, Wu, Wd): outputs a one-element placeholder. It computes
//!    nothing; it makes the expert weights inputs of the graph. Its backward hands candle the
//!    expert gradients that the layer op's backward left in the shared state (candle runs it
//!    after the layer op's, since the layer op consumes its output).
//! 2. **layer** (`CustomOp3` over x, Wr, placeholder): outputs out \[T,H\]. Its forward wraps the
//!    five buffers as crate views (no copies: x and Wr arrive as the op's storages, Wg, Wu, Wd are
//!    read from the tensors the op holds) and runs the crate's forward on candle's stream, into a
//!    new buffer that becomes candle's output storage. Its backward runs the crate's backward
//!    (dX and all four weight gradients in one pass) and returns dX and dWr; dWg, dWu, dWd go to
//!    the bind op.
//! 3. **balance loss** (`CustomOp1` over out): outputs the regulariser (ReMoE) or aux loss
//!    (TopK) at the layer's coefficient as a scalar f32, copied on the device from the routing
//!    statistics the forward computed (4 bytes, no host round-trip). Its backward stores the
//!    gradient it receives, d(total loss)/d(balance loss), for the layer op's backward, which
//!    passes it as [`BackwardOptions::balance_grad_scale`](crate::BackwardOptions): adding the
//!    loss with weight w, or scaling the total loss, scales the balance gradient by the same
//!    factor, and leaving the loss out of the total gives it none. Because this op consumes
//!    `out`, candle runs its backward before the layer op's.
//!
//! ## Costs beyond the crate's own layer
//!
//! - Forward: `out` is allocated zeroed per call (a \[T,H\] memset); the bind op allocates 4
//!   bytes; the loss op copies 4 bytes on the device.
//! - Backward: one host read of the balance loss's incoming gradient (4 to 8 bytes; the crate's
//!   `balance_grad_scale` is a host value) when the loss op is in the graph; the weight
//!   gradients come from the kernels in f32 and are converted to the parameters' dtype (one pass
//!   over each); the gradient buffers are allocated per call. candle's own gradient
//!   accumulation adds each returned gradient into a zero tensor of the input's shape
//!   (`GradStore::or_insert`), which it does for every op, and the loss op returns a
//!   broadcast zero for `out` (one element; candle needs a gradient on every node of a path to
//!   a variable, and `out` may have no other consumer), which candle adds into out's gradient
//!   (one elementwise pass over \[T,H\]).
//! - Memory: each call keeps its context (the forward's saved state, about what
//!   [`MoeContext::saved_bytes`](crate::MoeContext::saved_bytes) says) until its graph is
//!   dropped; the context then returns to the layer's pool and the next forward reuses its
//!   buffers. Keep no graph alive across steps longer than needed.
//!
//! ## Requirements and limits
//!
//! - CUDA tensors only, bf16 or f16 (weights and x of the same dtype); x of any rank with H
//!   last, flattened to \[T,H\] without a copy when contiguous.
//! - Parameters are the crate's layout: `router` \[H,E\], `gate`, `up` \[E,H,F\], `down` \[E,F,H\];
//!   [`MoeLayer::host_weights`] and [`MoeLayer::from_host_weights`] convert to and from
//!   checkpoint layouts through [`crate::weights`].
//! - Second-order gradients are not supported (the ops' backwards are not differentiable).
//! - The adaptive lambda: [`MoeLayer::end_step`] once per optimiser step, after it.

mod ops;

use std::sync::{Arc, Mutex};

use candle_core::{Module, Tensor, Var, WithDType};
use candle_nn::{Init, VarBuilder};

use crate::capacity::PairCapacity;
use crate::controller::LambdaController;
use crate::device::Device;
use crate::moe::{MoeContext, RouterKind};
use crate::reference::LayerParams;
use crate::weights::HostMoeWeights;

pub use ops::CandleElement;
use ops::{candle_err, BalanceLoss, BindExperts, CallState, LayerCall, LayerCoeff, LayerOp, Pool};

/// The weight initialisation of [`MoeLayer::remoe`] and [`MoeLayer::topk`]: normal with
/// standard deviation 0.02 (Megatron-LM's `init_method_std`, which ReMoE's runs use).
pub const INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// What a layer call gives: the output, and the balance loss to add to the training loss.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    /// The layer's output, x's shape and dtype.
    pub out: Tensor,
    /// ReMoE's L1 regulariser at the current lambda, or TopK's aux loss at c: a scalar f32.
    pub balance_loss: Tensor,
}

/// A ReMoE or TopK MoE layer for candle (see the module documentation).
pub struct MoeLayer<T: CandleElement> {
    router_kind: RouterKind,
    coeff: LayerCoeff,
    /// (H, F, E, k)
    dims: (usize, usize, usize, usize),
    router: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    dev: Device,
    pool: Pool<T>,
    /// The pair capacity of the layer's contexts (see [`crate::capacity`]).
    capacity: PairCapacity,
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
            .finish()
    }
}

fn crate_device(dev: &candle_core::Device) -> candle_core::Result<Device> {
    match dev {
        candle_core::Device::Cuda(c) => Device::from_stream(c.cuda_stream()).map_err(candle_err),
        _ => candle_core::bail!("remoe-kernels runs on CUDA devices only, got {dev:?}"),
    }
}

impl<T: CandleElement> MoeLayer<T> {
    /// A ReMoE layer (ReLU router, L1 regulariser with the paper's adaptive lambda) whose
    /// parameters `router`, `gate`, `up`, `down` come from `vb` (created with [`INIT`] when `vb`
    /// is backed by a `VarMap`). `vb`'s dtype must be `T`'s and its device a CUDA one.
    pub fn remoe(
        vb: VarBuilder,
        hidden: usize,
        ffn: usize,
        experts: usize,
        k: usize,
    ) -> candle_core::Result<Self> {
        Self::remoe_with_controller(vb, hidden, ffn, experts, k, 1e-8, 1.2)
    }

    /// [`remoe`](Self::remoe) with the adaptive controller's starting lambda and step factor
    /// chosen (the paper's defaults are 1e-8 and 1.2; see
    /// [`LambdaController::with_params`]); the target stays 1 - k/E.
    pub fn remoe_with_controller(
        vb: VarBuilder,
        hidden: usize,
        ffn: usize,
        experts: usize,
        k: usize,
        lambda0: f64,
        alpha: f64,
    ) -> candle_core::Result<Self> {
        let dev = crate_device(vb.device())?;
        let target = 1.0 - k as f64 / experts as f64;
        let lambda =
            LambdaController::with_params(&dev, lambda0, alpha, target).map_err(candle_err)?;
        let coeff = LayerCoeff::Adaptive(Arc::new(Mutex::new(lambda)));
        Self::from_builder(vb, RouterKind::Relu, coeff, (hidden, ffn, experts, k))
    }

    /// A TopK layer (softmax top-k router, Switch aux loss at `aux_coeff`) with parameters from
    /// `vb`, as [`remoe`](Self::remoe).
    pub fn topk(
        vb: VarBuilder,
        hidden: usize,
        ffn: usize,
        experts: usize,
        k: usize,
        aux_coeff: f64,
    ) -> candle_core::Result<Self> {
        let coeff = LayerCoeff::Fixed(aux_coeff);
        Self::from_builder(vb, RouterKind::TopK, coeff, (hidden, ffn, experts, k))
    }

    fn from_builder(
        vb: VarBuilder,
        router_kind: RouterKind,
        coeff: LayerCoeff,
        dims: (usize, usize, usize, usize),
    ) -> candle_core::Result<Self> {
        let want = <T as WithDType>::DTYPE;
        if vb.dtype() != want {
            candle_core::bail!(
                "remoe: the VarBuilder's dtype is {:?}, the layer's {want:?}",
                vb.dtype()
            )
        }
        let (h, f, e, _) = dims;
        let router = vb.get_with_hints((h, e), "router", INIT)?;
        let gate = vb.get_with_hints((e, h, f), "gate", INIT)?;
        let up = vb.get_with_hints((e, h, f), "up", INIT)?;
        let down = vb.get_with_hints((e, f, h), "down", INIT)?;
        Self::assemble(router_kind, coeff, dims, [router, gate, up, down])
    }

    fn assemble(
        router_kind: RouterKind,
        coeff: LayerCoeff,
        dims: (usize, usize, usize, usize),
        [router, gate, up, down]: [Tensor; 4],
    ) -> candle_core::Result<Self> {
        let dev = crate_device(router.device())?;
        Ok(Self {
            router_kind,
            coeff,
            dims,
            router,
            gate,
            up,
            down,
            dev,
            pool: Arc::new(Mutex::new(Vec::new())),
            capacity: PairCapacity::default(),
        })
    }

    /// A layer whose parameters are new [`Var`]s holding `w` (read from a checkpoint with
    /// [`HostMoeWeights::load`]) on `device`; [`vars`](Self::vars) gives them to an optimiser.
    /// `aux_coeff` is TopK's c and is ignored for ReMoE, whose lambda is adaptive.
    pub fn from_host_weights(
        router_kind: RouterKind,
        w: &HostMoeWeights<T>,
        k: usize,
        aux_coeff: f64,
        device: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        let (h, f, e) = (w.hidden(), w.ffn(), w.experts());
        let var = |v: &[T], shape: &[usize]| -> candle_core::Result<Tensor> {
            let t = Tensor::from_slice(v, shape, device)?;
            Ok(Var::from_tensor(&t)?.as_tensor().clone())
        };
        let p = w.params();
        let tensors = [
            var(&p.router, &[h, e])?,
            var(&p.gate, &[e, h, f])?,
            var(&p.up, &[e, h, f])?,
            var(&p.down, &[e, f, h])?,
        ];
        let coeff = match router_kind {
            RouterKind::Relu => {
                let dev = crate_device(device)?;
                let lambda = LambdaController::new(&dev, k, e).map_err(candle_err)?;
                LayerCoeff::Adaptive(Arc::new(Mutex::new(lambda)))
            }
            RouterKind::TopK => LayerCoeff::Fixed(aux_coeff),
        };
        Self::assemble(router_kind, coeff, (h, f, e, k), tensors)
    }

    /// The parameters as candle `Var`s (router, gate, up, down), for an optimiser. They share
    /// storage with the layer's tensors, so an optimiser's update is what the next forward reads.
    pub fn vars(&self) -> candle_core::Result<Vec<Var>> {
        [&self.router, &self.gate, &self.up, &self.down]
            .into_iter()
            .map(Var::from_tensor)
            .collect()
    }

    /// The parameters copied to the host in the crate's layout, e.g. to save them with
    /// [`HostMoeWeights::save`] in a checkpoint layout.
    pub fn host_weights(&self) -> candle_core::Result<HostMoeWeights<T>> {
        let (h, f, e, _) = self.dims;
        let host = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
        let params = LayerParams {
            router: host(&self.router)?,
            gate: host(&self.gate)?,
            up: host(&self.up)?,
            down: host(&self.down)?,
        };
        HostMoeWeights::new(h, f, e, params).map_err(candle_err)
    }

    /// The router weight Wr \[H,E\], and the expert weights Wg, Wu \[E,H,F\] and Wd \[E,F,H\].
    pub fn parameters(&self) -> [&Tensor; 4] {
        [&self.router, &self.gate, &self.up, &self.down]
    }

    /// The current lambda (ReMoE; read back from the device), or TopK's fixed c.
    pub fn coefficient(&self) -> candle_core::Result<f64> {
        match &self.coeff {
            LayerCoeff::Fixed(c) => Ok(*c),
            LayerCoeff::Adaptive(c) => c
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .lambda()
                .map_err(candle_err),
        }
    }

    /// Fixes the balance loss's coefficient at `c` (lambda for ReMoE, which then has no adaptive
    /// controller and [`end_step`](Self::end_step) does nothing; c for TopK).
    pub fn set_fixed_coefficient(&mut self, c: f64) {
        self.coeff = LayerCoeff::Fixed(c);
    }

    /// Sets how many routed pairs the layer's contexts hold (see [`crate::capacity`]): the
    /// default sizes them for exactly the pairs each forward routes (candle runs eagerly, so a
    /// forward counts its pairs and never overflows); [`PairCapacity::Pairs`] fixes the number,
    /// and a forward routing more pairs then fails with [`Error::CapacityExceeded`](crate::Error::CapacityExceeded) (wrapped in
    /// the candle error) instead of computing a zero layer.
    pub fn set_pair_capacity(&mut self, capacity: PairCapacity) {
        self.capacity = capacity;
        for ctx in ops::lock(&self.pool).iter_mut() {
            ctx.set_pair_capacity(capacity);
        }
    }

    /// Reports what the device found in the layer's forwards since the last check (a router
    /// logit that was NaN or infinite: [`Error::NonFiniteLogits`](crate::Error::NonFiniteLogits); a pair count past a fixed
    /// capacity), as a candle error wrapping the crate's [`Error`](crate::Error), and clears it. Reads the
    /// device error word of every context the layer holds (those of calls whose graph is still
    /// alive are checked once it is dropped); waits for the stream. [`end_step`](Self::end_step)
    /// calls it first.
    pub fn check_device_errors(&self) -> candle_core::Result<()> {
        for ctx in ops::lock(&self.pool).iter_mut() {
            ctx.check_device_errors().map_err(candle_err)?;
        }
        Ok(())
    }

    /// Ends a training step: reports the device's errors ([`check_device_errors`]
    /// (Self::check_device_errors): a step that met one is not trusted silently), then the
    /// adaptive lambda moves by SPEC's rule on the sparsities the layer's forwards recorded
    /// since the last call (on the device). Call once per optimiser step, after the backward
    /// and once the step's graph is dropped; the lambda step is a no-op for TopK.
    pub fn end_step(&self) -> candle_core::Result<()> {
        self.check_device_errors()?;
        match &self.coeff {
            LayerCoeff::Fixed(_) => Ok(()),
            LayerCoeff::Adaptive(c) => c
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .step()
                .map_err(candle_err),
        }
    }

    /// The layer on `x` [.., H]: the output and the balance loss, both in the graph.
    pub fn forward_with_loss(&self, x: &Tensor) -> candle_core::Result<MoeOutput> {
        let (out, state) = self.layer(x)?;
        let balance_loss = out.apply_op1(BalanceLoss(state))?;
        Ok(MoeOutput { out, balance_loss })
    }

    /// The output and the call's shared state.
    fn layer(&self, x: &Tensor) -> candle_core::Result<(Tensor, Arc<CallState<T>>)> {
        let (h, _, _, _) = self.dims;
        let shape = x.shape().clone();
        if shape.dims().last() != Some(&h) {
            candle_core::bail!("remoe: x is {shape:?}, the layer's hidden size is {h}")
        }
        if x.dtype() != <T as WithDType>::DTYPE {
            candle_core::bail!(
                "remoe: x is {:?}, the layer is {:?}",
                x.dtype(),
                <T as WithDType>::DTYPE
            )
        }
        let x2 = x.reshape(((), h))?.contiguous()?;
        let training = [x, &self.router, &self.gate, &self.up, &self.down]
            .iter()
            .any(|t| t.track_op());
        let mut ctx = ops::lock(&self.pool)
            .pop()
            .unwrap_or_else(|| MoeContext::new(&self.dev));
        ctx.set_save_for_backward(training);
        ctx.set_pair_capacity(self.capacity);
        let state = CallState::new(ctx, self.pool.clone());
        let handle = self
            .gate
            .apply_op3(&self.up, &self.down, BindExperts(state.clone()))?;
        let call = LayerCall {
            state: state.clone(),
            dev: self.dev.clone(),
            router: self.router_kind,
            coeff: self.coeff.clone(),
            dims: self.dims,
            experts: [self.gate.clone(), self.up.clone(), self.down.clone()],
        };
        let out = x2.apply_op3(&self.router, &handle, LayerOp(call))?;
        Ok((out.reshape(shape)?, state))
    }
}

impl<T: CandleElement> Module for MoeLayer<T> {
    /// The output alone: the balance loss is left out of the graph (no balance gradient).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.layer(x)?.0)
    }
}
