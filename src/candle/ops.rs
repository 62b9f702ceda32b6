//! The three custom ops of one layer call and the state they share (the design is in the parent
//! module's documentation). This file holds the crate's only calls of the layer forward and
//! backward for candle: [`run_forward`] and [`run_backward`].

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::cuda::{CudaDType, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, DType as CDType, Layout, Shape, Storage, StorageRef,
    Tensor, WithDType,
};

use crate::backward::{moe_backward, BackwardOptions, MoeGrads};
use crate::config::LayerConfig;
use crate::controller::{Coefficient, LambdaController};
use crate::device::Device;
use crate::element::HalfElement;
use crate::moe::{moe_forward, MoeContext, MoeWeightViews, RouterKind};
use crate::tensor::{DeviceTensor, TensorView};

/// The layer's dtypes that candle can hold: bf16 and f16.
pub trait CandleElement: HalfElement + WithDType + CudaDType {}
impl<T: HalfElement + WithDType + CudaDType> CandleElement for T {}

pub(crate) fn candle_err(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

pub(crate) fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    // A panic while a lock was held leaves nothing half-updated that a later call would misread:
    // each holder either replaces a whole value or runs a forward/backward that records its own
    // validity in the context.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Contexts that no live graph holds, reused by the next forward.
pub(crate) type Pool<T> = Arc<Mutex<Vec<MoeContext<T>>>>;

/// The balance loss's coefficient for a layer: fixed, or the layer's adaptive controller.
#[derive(Debug, Clone)]
pub(crate) enum LayerCoeff {
    Fixed(f64),
    Adaptive(Arc<Mutex<LambdaController>>),
}

impl LayerCoeff {
    fn with<R>(&self, f: impl FnOnce(Coefficient) -> R) -> R {
        match self {
            Self::Fixed(c) => f(Coefficient::Fixed(*c)),
            Self::Adaptive(c) => f(Coefficient::Adaptive(&mut lock(c))),
        }
    }
}

/// What the ops of one layer call share: the context holding that forward's saved state, the
/// balance loss's incoming gradient, and the expert gradients on their way to the bind op.
pub(crate) struct CallState<T: CandleElement> {
    ctx: Mutex<Option<MoeContext<T>>>,
    pool: Pool<T>,
    balance_grad: Mutex<Option<Tensor>>,
    expert_grads: Mutex<Option<[Tensor; 3]>>,
}

impl<T: CandleElement> CallState<T> {
    pub(crate) fn new(ctx: MoeContext<T>, pool: Pool<T>) -> Arc<Self> {
        Arc::new(Self {
            ctx: Mutex::new(Some(ctx)),
            pool,
            balance_grad: Mutex::new(None),
            expert_grads: Mutex::new(None),
        })
    }

    fn with_ctx<R>(
        &self,
        f: impl FnOnce(&mut MoeContext<T>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        match lock(&self.ctx).as_mut() {
            Some(ctx) => f(ctx),
            None => bail!("remoe: the layer call's context is gone"),
        }
    }
}

impl<T: CandleElement> Drop for CallState<T> {
    /// The graph that held this call is gone: its context serves the next forward.
    fn drop(&mut self) {
        if let Some(ctx) = lock(&self.ctx).take() {
            lock(&self.pool).push(ctx);
        }
    }
}

/// The layer call's fixed part.
pub(crate) struct LayerCall<T: CandleElement> {
    pub(crate) state: Arc<CallState<T>>,
    pub(crate) dev: Device,
    pub(crate) router: RouterKind,
    pub(crate) coeff: LayerCoeff,
    /// (H, F, E, k); T comes from x.
    pub(crate) dims: (usize, usize, usize, usize),
    /// Wg, Wu, Wd: read by the layer op, differentiated through the bind op.
    pub(crate) experts: [Tensor; 3],
}

impl<T: CandleElement> LayerCall<T> {
    fn config(&self, tokens: usize) -> LayerConfig {
        let (h, f, e, k) = self.dims;
        LayerConfig::new(tokens, h, f, e, k)
    }
}

/// A contiguous candle CUDA buffer of `T` as a crate view of `shape`, without a copy.
fn view<'a, T: CandleElement>(
    s: &'a CudaStorage,
    l: &Layout,
    shape: &[usize],
    what: &str,
) -> candle_core::Result<TensorView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("remoe: {what} must be contiguous")
    };
    TensorView::new(slice.slice(a..b), shape).map_err(candle_err)
}

fn cuda<'a>(s: &'a Storage, what: &str) -> candle_core::Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => bail!("remoe: {what} is not on a CUDA device"),
    }
}

/// A crate buffer as a candle tensor, without a copy.
fn to_candle<E: crate::tensor::Element + CudaDType>(
    t: DeviceTensor<E>,
    dev: &candle_core::CudaDevice,
) -> Tensor {
    let shape = t.shape().to_vec();
    let storage = CudaStorage::wrap_cuda_slice(t.into_cuda_slice(), dev.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// The crate's layer forward for candle. The one call of it: adapt here when its signature
/// changes.
fn run_forward<T: CandleElement>(
    call: &LayerCall<T>,
    ctx: &mut MoeContext<T>,
    x: TensorView<T>,
    w: MoeWeightViews<T>,
    out: &mut DeviceTensor<T>,
) -> crate::Result<()> {
    let cfg = call.config(x.shape()[0]);
    call.coeff
        .with(|c| moe_forward(ctx, &cfg, call.router, c, x, w, out))?;
    Ok(())
}

/// The crate's layer backward for candle, weight gradients overwritten. The one call of it.
fn run_backward<T: CandleElement>(
    call: &LayerCall<T>,
    ctx: &mut MoeContext<T>,
    x: TensorView<T>,
    w: MoeWeightViews<T>,
    dout: TensorView<T>,
    grads: MoeGrads<T>,
    balance_grad_scale: f64,
) -> crate::Result<()> {
    let options = BackwardOptions {
        accumulate: false,
        balance_grad_scale,
    };
    call.coeff
        .with(|c| moe_backward(ctx, c, x, w, dout, grads, options))
}

/// Ties Wg, Wu, Wd into the graph: its output is a one-element placeholder the layer op takes
/// as its third input, and its backward hands on the expert gradients the layer op computed.
pub(crate) struct BindExperts<T: CandleElement>(pub(crate) Arc<CallState<T>>);

impl<T: CandleElement> CustomOp3 for BindExperts<T> {
    fn name(&self) -> &'static str {
        "remoe-bind-experts"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("remoe-kernels runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let zero = s
            .device
            .cuda_stream()
            .alloc_zeros::<f32>(1)
            .map_err(|e| candle_err(e.into()))?;
        Ok((
            CudaStorage::wrap_cuda_slice(zero, s.device.clone()),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The layer op's backward, which comes first (it consumes this op's output), left them.
        match lock(&self.0.expert_grads).take() {
            Some([g, u, d]) => Ok((Some(g), Some(u), Some(d))),
            None => bail!("remoe: the expert gradients were not computed"),
        }
    }
}

/// The layer: x \[T,H\], Wr \[H,E\] and the bind op's placeholder in, out \[T,H\] out.
pub(crate) struct LayerOp<T: CandleElement>(pub(crate) LayerCall<T>);

/// Wg, Wu, Wd of `call` as views, given their storages.
fn expert_weights<'a, T: CandleElement>(
    call: &LayerCall<T>,
    guards: &'a [(StorageRef<'a>, &'a Layout); 3],
) -> candle_core::Result<[TensorView<'a, T>; 3]> {
    let (h, f, e, _) = call.dims;
    let [(g, gl), (u, ul), (d, dl)] = guards;
    Ok([
        view(cuda(g, "gate weight")?, gl, &[e, h, f], "gate weight")?,
        view(cuda(u, "up weight")?, ul, &[e, h, f], "up weight")?,
        view(cuda(d, "down weight")?, dl, &[e, f, h], "down weight")?,
    ])
}

impl<T: CandleElement> CustomOp3 for LayerOp<T> {
    fn name(&self) -> &'static str {
        "remoe-moe-layer"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("remoe-kernels runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        rs: &CudaStorage,
        rl: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let call = &self.0;
        let (h, _, e, _) = call.dims;
        let (t, xh) = xl.shape().dims2()?;
        if xh != h {
            bail!("remoe: x is [{t}, {xh}], the layer's hidden size is {h}")
        }
        let guards = call.experts.each_ref().map(|w| w.storage_and_layout());
        let [g, u, d] = expert_weights(call, &guards)?;
        let w = MoeWeightViews {
            router: view(rs, rl, &[h, e], "router weight")?,
            gate: g,
            up: u,
            down: d,
        };
        let x = view(xs, xl, &[t, h], "x")?;
        let mut out = DeviceTensor::<T>::zeros(&call.dev, &[t, h]).map_err(candle_err)?;
        call.state
            .with_ctx(|ctx| run_forward(call, ctx, x, w, &mut out).map_err(candle_err))?;
        let storage = CudaStorage::wrap_cuda_slice(out.into_cuda_slice(), xs.device.clone());
        Ok((storage, Shape::from((t, h))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        router: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let call = &self.0;
        let (h, f, e, _) = call.dims;
        let (t, _) = x.dims2()?;
        let candle_core::Device::Cuda(cdev) = x.device() else {
            bail!("remoe: x is not on a CUDA device")
        };
        // d(total loss)/d(balance loss), as the balance-loss op's backward received it: one
        // scalar read back to the host (BackwardOptions takes it by value).
        let balance_grad_scale = match lock(&call.state.balance_grad).take() {
            Some(g) => g.to_dtype(CDType::F64)?.to_scalar::<f64>()?,
            None => 0.0,
        };
        let dout = grad_out.contiguous()?;
        let (xg, rg, dg) = (
            x.storage_and_layout(),
            router.storage_and_layout(),
            dout.storage_and_layout(),
        );
        let (xs, rs, ds) = (
            cuda(&xg.0, "x")?,
            cuda(&rg.0, "router")?,
            cuda(&dg.0, "dout")?,
        );
        let guards = call.experts.each_ref().map(|w| w.storage_and_layout());
        let [g, u, d] = expert_weights(call, &guards)?;
        let w = MoeWeightViews {
            router: view(rs, rg.1, &[h, e], "router weight")?,
            gate: g,
            up: u,
            down: d,
        };
        let xv = view(xs, xg.1, &[t, h], "x")?;
        let dv = view(ds, dg.1, &[t, h], "dout")?;

        let dev = &call.dev;
        let zeros = |shape: &[usize]| DeviceTensor::<f32>::zeros(dev, shape).map_err(candle_err);
        let mut dx = DeviceTensor::<T>::zeros(dev, &[t, h]).map_err(candle_err)?;
        let (mut dwr, mut dwg, mut dwu, mut dwd) = (
            zeros(&[h, e])?,
            zeros(&[e, h, f])?,
            zeros(&[e, h, f])?,
            zeros(&[e, f, h])?,
        );
        let grads = MoeGrads {
            dx: &mut dx,
            router: &mut dwr,
            gate: &mut dwg,
            up: &mut dwu,
            down: &mut dwd,
        };
        call.state.with_ctx(|ctx| {
            run_backward(call, ctx, xv, w, dv, grads, balance_grad_scale).map_err(candle_err)
        })?;

        // The weight gradients come in f32; candle wants each in its parameter's dtype.
        let param = |g: DeviceTensor<f32>| to_candle(g, cdev).to_dtype(<T as WithDType>::DTYPE);
        *lock(&call.state.expert_grads) = Some([param(dwg)?, param(dwu)?, param(dwd)?]);
        let dx = x.track_op().then(|| to_candle(dx, cdev));
        // The placeholder's gradient only has to exist, so that the bind op's backward runs.
        let placeholder = Tensor::zeros((), CDType::F32, x.device())?;
        Ok((dx, Some(param(dwr)?), Some(placeholder)))
    }
}

/// The balance loss (ReMoE's L1 regulariser or TopK's aux loss, at the layer's coefficient) as a
/// scalar f32 of the graph, read on the device from the layer call's routing statistics. Its
/// input is the layer's output, so that candle runs its backward before the layer op's.
pub(crate) struct BalanceLoss<T: CandleElement>(pub(crate) Arc<CallState<T>>);

impl<T: CandleElement> CustomOp1 for BalanceLoss<T> {
    fn name(&self) -> &'static str {
        "remoe-balance-loss"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("remoe-kernels runs on CUDA devices only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let stream = s.device.cuda_stream();
        let value = self.0.with_ctx(|ctx| {
            let stats = ctx.routing.stats_f32.view().map_err(candle_err)?;
            stream
                .clone_dtod(&stats.slice(1..2))
                .map_err(|e| candle_err(e.into()))
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(value, s.device.clone()),
            Shape::from(()),
        ))
    }

    fn bwd(&self, out: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        *lock(&self.0.balance_grad) = Some(grad.clone());
        // The loss does not depend on `out`'s values; but candle requires every node on a path
        // to a variable to receive a gradient, and `out` may have no other consumer. A broadcast
        // zero holds one element.
        let zero = Tensor::zeros((), out.dtype(), out.device())?;
        Ok(Some(zero.broadcast_as(out.shape())?))
    }
}
