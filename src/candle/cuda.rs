//! The layer ops on candle's CUDA storage and stream (feature `candle-cuda`). This file holds the
//! crate's only calls of the layer forward and backward for candle.

use std::sync::Arc;

use candle_core::cuda::{CudaDType, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, Layout, Shape, Storage, StorageRef, Tensor, WithDType};
use cudarc::driver::CudaSlice;

use crate::backward::{moe_backward, BackwardOptions, MoeGrads};
use crate::controller::{Coefficient, LambdaController};
use crate::device::Device;
use crate::moe::{moe_forward, MoeContext, MoeWeightViews};
use crate::tensor::{DeviceTensor, TensorView};

use super::ops::{candle_err, lock, CallCoeff, CandleElement, LastStats, LayerCall};
use super::routing::Controller;
use super::stats::RoutingStats;

/// A cudarc error as a candle error.
fn driver_err(e: cudarc::driver::DriverError) -> candle_core::Error {
    candle_err(e.into())
}

/// The crate's device on candle's stream, cached in the layer while the stream stays the same.
fn crate_device<T: CandleElement>(
    call: &LayerCall<T>,
    cdev: &CudaDevice,
) -> candle_core::Result<Device> {
    let stream = cdev.cuda_stream();
    let mut cache = lock(&call.dev_cache);
    if let Some(d) = cache.as_ref() {
        if Arc::ptr_eq(d.stream(), &stream) {
            return Ok(d.clone());
        }
    }
    let d = Device::from_stream(stream).map_err(candle_err)?;
    *cache = Some(d.clone());
    Ok(d)
}

/// The adaptive lambda on the device: the controller the training forwards record into, and a
/// copy of its lambda for evaluation forwards, whose records are never stepped.
pub(crate) struct DeviceLambda {
    main: LambdaController,
    shadow: LambdaController,
}

impl DeviceLambda {
    pub(crate) fn new(
        cdev: &CudaDevice,
        lambda0: f64,
        alpha: f64,
        target: f64,
    ) -> candle_core::Result<Self> {
        let dev = Device::from_stream(cdev.cuda_stream()).map_err(candle_err)?;
        let main =
            LambdaController::with_params(&dev, lambda0, alpha, target).map_err(candle_err)?;
        let shadow =
            LambdaController::with_params(&dev, lambda0, alpha, target).map_err(candle_err)?;
        Ok(Self { main, shadow })
    }

    pub(crate) fn lambda(&self) -> candle_core::Result<f64> {
        self.main.lambda().map_err(candle_err)
    }

    pub(crate) fn step(&mut self) -> candle_core::Result<()> {
        self.main.step().map_err(candle_err)
    }

    /// The controller a forward runs with: the main one when it records, else the copy, given
    /// the main one's current lambda on the device (8 bytes, no host read).
    fn for_forward(&mut self, record: bool) -> candle_core::Result<&mut LambdaController> {
        if record {
            return Ok(&mut self.main);
        }
        self.shadow
            .copy_lambda_from(&self.main)
            .map_err(candle_err)?;
        Ok(&mut self.shadow)
    }
}

/// Runs `f` with the call's coefficient: for the forward (`forward`: recording training
/// forwards) or the backward.
fn with_coefficient<T: CandleElement, R>(
    call: &LayerCall<T>,
    forward: bool,
    f: impl FnOnce(Coefficient) -> crate::Result<R>,
) -> candle_core::Result<R> {
    let routing = match &call.coeff {
        CallCoeff::Fixed(c) => return f(Coefficient::Fixed(*c)).map_err(candle_err),
        CallCoeff::Shared(r) => r,
    };
    let Some(ctl) = &routing.0.lambda else {
        return f(Coefficient::Fixed(routing.0.fixed)).map_err(candle_err);
    };
    match &mut *lock(ctl) {
        Controller::Device(d) => {
            let c = if forward {
                d.for_forward(call.record)?
            } else {
                &mut d.main
            };
            f(Coefficient::Adaptive(c)).map_err(candle_err)
        }
        Controller::Host(_) => {
            bail!("remoe: the layer's input is on a CUDA device, its shared lambda on the CPU")
        }
    }
}

/// The one-element placeholder the bind op outputs.
pub(crate) fn placeholder(s: &CudaStorage) -> candle_core::Result<(CudaStorage, Shape)> {
    let zero = s
        .device
        .cuda_stream()
        .alloc_zeros::<f32>(1)
        .map_err(driver_err)?;
    Ok((
        CudaStorage::wrap_cuda_slice(zero, s.device.clone()),
        Shape::from(()),
    ))
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
    dev: &CudaDevice,
) -> Tensor {
    let shape = t.shape().to_vec();
    let storage = CudaStorage::wrap_cuda_slice(t.into_cuda_slice(), dev.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

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

/// The layer forward on candle's stream, into a new buffer that becomes candle's output.
pub(crate) fn layer_forward<T: CandleElement>(
    call: &LayerCall<T>,
    xs: &CudaStorage,
    xl: &Layout,
    rs: &CudaStorage,
    rl: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (h, _, e, _) = call.dims;
    let t = call.tokens(xl)?;
    let dev = crate_device(call, &xs.device)?;
    let guards = call.experts.each_ref().map(|w| w.storage_and_layout());
    let [g, u, d] = expert_weights(call, &guards)?;
    let w = MoeWeightViews {
        router: view(rs, rl, &[h, e], "router weight")?,
        gate: g,
        up: u,
        down: d,
    };
    let x = view(xs, xl, &[t, h], "x")?;
    let mut out = DeviceTensor::<T>::zeros(&dev, &[t, h]).map_err(candle_err)?;
    let mut slot = lock(&call.state.ctx);
    let mut ctx = slot
        .take()
        .or_else(|| lock(&call.state.pool).pop())
        .unwrap_or_else(|| MoeContext::new(&dev));
    ctx.set_save_for_backward(call.save);
    ctx.set_pair_capacity(call.capacity);
    let cfg = call.config(t);
    let ran = with_coefficient(call, true, |c| {
        moe_forward(&mut ctx, &cfg, call.router, c, x, w, &mut out)
    });
    let stats = ran.and_then(|()| DeviceStats::copy(&dev, &mut ctx, t, e).map_err(candle_err));
    // The context goes back to the call either way, so that it returns to the pool.
    *slot = Some(ctx);
    *lock(&call.sink) = Some(LastStats::Device(stats?));
    let storage = CudaStorage::wrap_cuda_slice(out.into_cuda_slice(), xs.device.clone());
    Ok((storage, Shape::from((t, h))))
}

/// The layer backward: dX (when x tracks gradients), dWr and the expert gradients, the weight
/// gradients converted from the kernels' f32 to `T`.
#[allow(clippy::type_complexity)]
pub(crate) fn layer_backward<T: CandleElement>(
    call: &LayerCall<T>,
    x: &Tensor,
    router: &Tensor,
    grad_out: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Tensor, [Tensor; 3])> {
    let (h, f, e, _) = call.dims;
    let (t, _) = x.dims2()?;
    let candle_core::Device::Cuda(cdev) = x.device() else {
        bail!("remoe: x is not on a CUDA device")
    };
    let dev = crate_device(call, cdev)?;
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

    let zeros = |shape: &[usize]| DeviceTensor::<f32>::zeros(&dev, shape).map_err(candle_err);
    let mut dx = DeviceTensor::<T>::zeros(&dev, &[t, h]).map_err(candle_err)?;
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
    let options = BackwardOptions {
        accumulate: false,
        balance_grad_scale: call.grad_scale,
    };
    let mut slot = lock(&call.state.ctx);
    let Some(ctx) = slot.as_mut() else {
        bail!("remoe: the layer call's context is gone")
    };
    with_coefficient(call, false, |c| {
        moe_backward(ctx, c, xv, w, dv, grads, options)
    })?;
    drop(slot);

    // The weight gradients come in f32; candle wants each in its tensor's dtype.
    let param = |g: DeviceTensor<f32>| to_candle(g, cdev).to_dtype(<T as WithDType>::DTYPE);
    let dx = x.track_op().then(|| to_candle(dx, cdev));
    Ok((dx, param(dwr)?, [param(dwg)?, param(dwu)?, param(dwd)?]))
}

/// A forward's routing statistics, copied on the device out of its context (which the next
/// forward reuses): n_e, |A|, and (sparsity, balance loss).
pub(crate) struct DeviceStats {
    counts: CudaSlice<u32>,
    stats_u32: CudaSlice<u32>,
    stats_f32: CudaSlice<f32>,
    tokens: usize,
    dev: Device,
}

impl DeviceStats {
    fn copy<T: CandleElement>(
        dev: &Device,
        ctx: &mut MoeContext<T>,
        tokens: usize,
        experts: usize,
    ) -> crate::Result<Self> {
        let s = dev.stream();
        let counts = ctx.routing.counts.view()?;
        let su = ctx.routing.stats_u32.view()?;
        let sf = ctx.routing.stats_f32.view()?;
        Ok(Self {
            counts: s.clone_dtod(&counts.slice(0..experts))?,
            stats_u32: s.clone_dtod(&su.slice(0..1))?,
            stats_f32: s.clone_dtod(&sf.slice(0..2))?,
            tokens,
            dev: dev.clone(),
        })
    }

    /// The statistics, read back (waits for the stream).
    pub(crate) fn read(&self) -> candle_core::Result<RoutingStats> {
        let s = self.dev.stream();
        let counts = s.clone_dtoh(&self.counts).map_err(driver_err)?;
        let su = s.clone_dtoh(&self.stats_u32).map_err(driver_err)?;
        let sf = s.clone_dtoh(&self.stats_f32).map_err(driver_err)?;
        let (t, pairs) = (self.tokens, su[0] as usize);
        Ok(RoutingStats {
            tokens: t,
            active_pairs: pairs,
            sparsity: sf[0] as f64,
            balance_loss: sf[1] as f64,
            tokens_per_expert: counts,
            mean_active_experts: if t == 0 { 0.0 } else { pairs as f64 / t as f64 },
            active_experts_histogram: None,
        })
    }
}

/// The staging op on CUDA (`super::stage`): `[B, R, C]` (the storage's elements `range`) to a
/// new `[B, C, R]` buffer of `to`, on candle's stream.
pub(crate) fn transpose_cast(
    s: &CudaStorage,
    range: std::ops::Range<usize>,
    dims: super::stage::Dims,
    to: candle_core::DType,
) -> candle_core::Result<CudaStorage> {
    use candle_core::backend::BackendStorage;
    use candle_core::DType as D;
    fn run<A, B>(
        s: &CudaStorage,
        range: std::ops::Range<usize>,
        dims: super::stage::Dims,
    ) -> candle_core::Result<CudaStorage>
    where
        A: crate::tensor::Element + CudaDType,
        B: crate::tensor::Element + CudaDType,
    {
        let dev = Device::from_stream(s.device.cuda_stream()).map_err(candle_err)?;
        let src = s.as_cuda_slice::<A>()?.slice(range);
        let mut out =
            DeviceTensor::<B>::zeros(&dev, &[dims.0, dims.2, dims.1]).map_err(candle_err)?;
        crate::transpose::transpose_cast(&dev, src, &mut out, dims).map_err(candle_err)?;
        Ok(CudaStorage::wrap_cuda_slice(
            out.into_cuda_slice(),
            s.device.clone(),
        ))
    }
    use half::{bf16, f16};
    match (s.dtype(), to) {
        (D::F32, D::BF16) => run::<f32, bf16>(s, range, dims),
        (D::F32, D::F16) => run::<f32, f16>(s, range, dims),
        (D::BF16, D::F32) => run::<bf16, f32>(s, range, dims),
        (D::F16, D::F32) => run::<f16, f32>(s, range, dims),
        (a, b) => bail!("remoe: no CUDA weight staging from {a:?} to {b:?}"),
    }
}
