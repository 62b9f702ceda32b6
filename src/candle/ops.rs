//! The two custom ops of one layer call and the state they share (the design is in the parent
//! module's documentation), with their CPU path through the crate's reference. The CUDA path
//! is in `cuda.rs`.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType as CDType, Layout, Shape, Tensor, WithDType};

use crate::capacity::PairCapacity;
use crate::config::LayerConfig;
use crate::element::HalfElement;
use crate::moe::{MoeContext, RouterKind};
use crate::reference::{self, LayerGrads, LayerParams, RemoeForward, TopkForward};

use super::routing::{Controller, SharedRouting};
use super::stats::RoutingStats;

/// The layer's compute dtypes: bf16 and f16 (what the kernels take; the CPU path rounds the
/// reference's f64 results to them, so both paths see the same values).
#[cfg(feature = "candle-cuda")]
pub trait CandleElement: HalfElement + WithDType + candle_core::cuda::CudaDType {}
#[cfg(feature = "candle-cuda")]
impl<T: HalfElement + WithDType + candle_core::cuda::CudaDType> CandleElement for T {}

/// The layer's compute dtypes: bf16 and f16 (what the kernels take; the CPU path rounds the
/// reference's f64 results to them, so both paths see the same values).
#[cfg(not(feature = "candle-cuda"))]
pub trait CandleElement: HalfElement + WithDType {}
#[cfg(not(feature = "candle-cuda"))]
impl<T: HalfElement + WithDType> CandleElement for T {}

pub(crate) fn candle_err(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

pub(crate) fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    // A panic while a lock was held leaves nothing half-updated that a later call would misread:
    // each holder either replaces a whole value or runs a forward/backward that records its own
    // validity in the context.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Contexts that no live graph holds, reused by the next forward (CUDA).
pub(crate) type Pool<T> = Arc<Mutex<Vec<MoeContext<T>>>>;

/// Where a layer's last forward left its routing statistics.
pub(crate) enum LastStats {
    Host(RoutingStats),
    #[cfg(feature = "candle-cuda")]
    Device(super::cuda::DeviceStats),
}

pub(crate) type StatsSink = Arc<Mutex<Option<LastStats>>>;

/// The balance loss's coefficient for one call: fixed, or the model's shared routing state.
#[derive(Clone)]
pub(crate) enum CallCoeff {
    Fixed(f64),
    Shared(SharedRouting),
}

/// What the CPU forward saved for its backward.
pub(crate) enum CpuSaved {
    Relu { fwd: RemoeForward<f64>, coeff: f64 },
    TopK { fwd: TopkForward<f64>, coeff: f64 },
}

/// What the ops of one layer call share: the saved state of the forward (a context on CUDA,
/// the reference's forward on the CPU) and the expert gradients on their way to the bind op.
pub(crate) struct CallState<T: CandleElement> {
    pub(crate) ctx: Mutex<Option<MoeContext<T>>>,
    pub(crate) cpu: Mutex<Option<CpuSaved>>,
    pub(crate) pool: Pool<T>,
    pub(crate) expert_grads: Mutex<Option<[Tensor; 3]>>,
}

impl<T: CandleElement> CallState<T> {
    pub(crate) fn new(pool: Pool<T>) -> Arc<Self> {
        Arc::new(Self {
            ctx: Mutex::new(None),
            cpu: Mutex::new(None),
            pool,
            expert_grads: Mutex::new(None),
        })
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

/// One layer call's fixed part.
pub(crate) struct LayerCall<T: CandleElement> {
    pub(crate) state: Arc<CallState<T>>,
    pub(crate) router: RouterKind,
    pub(crate) coeff: CallCoeff,
    /// A training forward: its sparsity is recorded for the adaptive lambda.
    pub(crate) record: bool,
    /// Whether a backward may follow (some input tracks gradients).
    pub(crate) save: bool,
    /// The balance regulariser's gradient factor in the backward.
    pub(crate) grad_scale: f64,
    /// (H, F, E, k); T comes from x.
    pub(crate) dims: (usize, usize, usize, usize),
    /// Wg \[E,H,F\], Wu \[E,H,F\], Wd \[E,F,H\] in `T`: read by the layer op, differentiated through
    /// the bind op.
    pub(crate) experts: [Tensor; 3],
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    pub(crate) capacity: PairCapacity,
    pub(crate) sink: StatsSink,
    #[cfg(feature = "candle-cuda")]
    pub(crate) dev_cache: Arc<Mutex<Option<crate::device::Device>>>,
}

impl<T: CandleElement> LayerCall<T> {
    pub(crate) fn config(&self, tokens: usize) -> LayerConfig {
        let (h, f, e, k) = self.dims;
        LayerConfig::new(tokens, h, f, e, k)
    }

    /// T of the layer op's input x \[T,H\], whose H must be the layer's (either device).
    pub(crate) fn tokens(&self, x: &Layout) -> candle_core::Result<usize> {
        let (h, ..) = self.dims;
        let (t, xh) = x.shape().dims2()?;
        if xh != h {
            bail!("remoe: x is [{t}, {xh}], the layer's hidden size is {h}")
        }
        Ok(t)
    }
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
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::placeholder(s)
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

impl<T: CandleElement> CustomOp3 for LayerOp<T> {
    fn name(&self) -> &'static str {
        "remoe-moe-layer"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_forward(&self.0, xs, xl, rs, rl)
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::layer_forward(&self.0, xs, xl, rs, rl)
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
        let (dx, dwr, experts) = match x.device() {
            candle_core::Device::Cpu => cpu_backward(call, x, router, grad_out)?,
            #[cfg(feature = "candle-cuda")]
            candle_core::Device::Cuda(_) => super::cuda::layer_backward(call, x, router, grad_out)?,
            #[allow(unreachable_patterns)]
            other => bail!("remoe: no backward on {other:?}"),
        };
        *lock(&call.state.expert_grads) = Some(experts);
        // The placeholder's gradient only has to exist, so that the bind op's backward runs.
        let placeholder = Tensor::zeros((), CDType::F32, x.device())?;
        Ok((dx, Some(dwr), Some(placeholder)))
    }
}

/// A contiguous CPU buffer as f64.
fn host_f64(s: &CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Vec<f64>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("remoe: {what} must be contiguous")
    };
    fn conv<X: WithDType>(v: &[X]) -> Vec<f64> {
        v.iter().map(|x| x.to_f64()).collect()
    }
    Ok(match s {
        CpuStorage::BF16(v) => conv(&v[a..b]),
        CpuStorage::F16(v) => conv(&v[a..b]),
        CpuStorage::F32(v) => conv(&v[a..b]),
        CpuStorage::F64(v) => v[a..b].to_vec(),
        other => bail!("remoe: {what} is {:?}, not a float dtype", other.dtype()),
    })
}

fn tensor_f64(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(CDType::F64)?.to_vec1::<f64>()
}

/// Values rounded to `T` in a CPU tensor of `shape`.
fn cpu_tensor<T: CandleElement>(v: Vec<f64>, shape: &[usize]) -> candle_core::Result<Tensor> {
    let v: Vec<T> = v.into_iter().map(T::from_f64).collect();
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// The coefficient a CPU forward uses, recording its sparsity when it is a training forward.
fn host_coefficient(coeff: &CallCoeff, record: Option<f64>) -> candle_core::Result<f64> {
    let routing = match coeff {
        CallCoeff::Fixed(c) => {
            crate::controller::check_fixed_coefficient(*c).map_err(candle_err)?;
            return Ok(*c);
        }
        CallCoeff::Shared(r) => r,
    };
    let Some(ctl) = &routing.0.lambda else {
        return Ok(routing.0.fixed);
    };
    match &mut *lock(ctl) {
        Controller::Host(h) => {
            if let Some(s) = record {
                h.record(s);
            }
            Ok(h.lambda())
        }
        #[cfg(feature = "candle-cuda")]
        Controller::Device(_) => {
            bail!("remoe: the layer's input is on the CPU, its shared lambda on a CUDA device")
        }
    }
}

/// The reference's layer forward on the CPU: f64 inside, the output rounded to `T`.
fn cpu_forward<T: CandleElement>(
    call: &LayerCall<T>,
    xs: &CpuStorage,
    xl: &Layout,
    rs: &CpuStorage,
    rl: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (h, _, e, _) = call.dims;
    let t = call.tokens(xl)?;
    let cfg = call.config(t);
    cfg.validate().map_err(candle_err)?;
    let x = host_f64(xs, xl, "x")?;
    let params = cpu_params(call, host_f64(rs, rl, "router weight")?)?;
    // The coefficient the forward's balance loss uses; the sparsity is recorded only once the
    // forward succeeded (below), so read it first without recording.
    let coeff = host_coefficient(&call.coeff, None)?;
    let (out, routing, saved) = match call.router {
        RouterKind::Relu => {
            let fwd = reference::remoe_forward(&x, &params, &cfg, coeff);
            fwd.routing.check_finite().map_err(candle_err)?;
            let stats = cpu_stats(
                &cfg,
                fwd.routing.active_pairs,
                fwd.reg_loss,
                &fwd.routing.counts,
                |ti, ei| fwd.routing.gates[ti * e + ei] > 0.0,
            );
            (fwd.out.clone(), stats, CpuSaved::Relu { fwd, coeff })
        }
        RouterKind::TopK | RouterKind::TopKNormalized => {
            let fwd = if call.router == RouterKind::TopK {
                reference::topk_forward(&x, &params, &cfg, coeff)
            } else {
                reference::topk_normalized_forward(&x, &params, &cfg, coeff)
            };
            fwd.routing.check_finite().map_err(candle_err)?;
            let pairs = fwd.dispatch.tokens.len();
            let stats = cpu_stats(&cfg, pairs, fwd.aux_loss, &fwd.routing.counts, |ti, ei| {
                fwd.routing.selected[ti * e + ei]
            });
            (fwd.out.clone(), stats, CpuSaved::TopK { fwd, coeff })
        }
    };
    if call.record {
        host_coefficient(&call.coeff, Some(routing.sparsity))?;
    }
    *lock(&call.sink) = Some(LastStats::Host(routing));
    if call.save {
        *lock(&call.state.cpu) = Some(saved);
    }
    let out: Vec<T> = out.into_iter().map(T::from_f64).collect();
    Ok((T::to_cpu_storage_owned(out), Shape::from((t, h))))
}

/// The routing statistics of a CPU forward; `active(t, e)` tells the pairs computed.
fn cpu_stats(
    cfg: &LayerConfig,
    active_pairs: usize,
    balance_loss: f64,
    counts: &[u32],
    active: impl Fn(usize, usize) -> bool,
) -> RoutingStats {
    let (t, e) = (cfg.tokens, cfg.experts);
    let mut histogram = vec![0u64; e + 1];
    for ti in 0..t {
        let n = (0..e).filter(|&ei| active(ti, ei)).count();
        histogram[n] += 1;
    }
    RoutingStats {
        tokens: t,
        active_pairs,
        sparsity: if t == 0 {
            1.0
        } else {
            1.0 - active_pairs as f64 / (t * e) as f64
        },
        balance_loss,
        tokens_per_expert: counts.to_vec(),
        mean_active_experts: if t == 0 {
            0.0
        } else {
            active_pairs as f64 / t as f64
        },
        active_experts_histogram: Some(histogram),
    }
}

/// The layer's parameters in f64 for the reference.
fn cpu_params<T: CandleElement>(
    call: &LayerCall<T>,
    router: Vec<f64>,
) -> candle_core::Result<LayerParams<f64>> {
    let [g, u, d] = &call.experts;
    Ok(LayerParams {
        router,
        gate: tensor_f64(g)?,
        up: tensor_f64(u)?,
        down: tensor_f64(d)?,
    })
}

/// The reference's layer backward on the CPU: dX (when x tracks gradients), dWr and the expert
/// gradients, in `T`.
#[allow(clippy::type_complexity)]
fn cpu_backward<T: CandleElement>(
    call: &LayerCall<T>,
    x: &Tensor,
    router: &Tensor,
    grad_out: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Tensor, [Tensor; 3])> {
    let (h, f, e, _) = call.dims;
    let (t, _) = x.dims2()?;
    let cfg = call.config(t);
    let xv = tensor_f64(x)?;
    let params = cpu_params(call, tensor_f64(router)?)?;
    let dout = tensor_f64(grad_out)?;
    let saved = lock(&call.state.cpu);
    let grads: LayerGrads<f64> = match saved.as_ref() {
        Some(CpuSaved::Relu { fwd, coeff }) => reference::remoe_backward_scaled(
            &xv,
            &params,
            &cfg,
            *coeff,
            fwd,
            &dout,
            call.grad_scale,
        ),
        Some(CpuSaved::TopK { fwd, coeff }) => {
            reference::topk_backward_scaled(&xv, &params, &cfg, *coeff, fwd, &dout, call.grad_scale)
        }
        None => bail!("remoe: a backward without a training forward (nothing was saved)"),
    };
    drop(saved);
    let dx = if x.track_op() {
        Some(cpu_tensor::<T>(grads.dx, &[t, h])?)
    } else {
        None
    };
    let p = grads.params;
    Ok((
        dx,
        cpu_tensor::<T>(p.router, &[h, e])?,
        [
            cpu_tensor::<T>(p.gate, &[e, h, f])?,
            cpu_tensor::<T>(p.up, &[e, h, f])?,
            cpu_tensor::<T>(p.down, &[e, f, h])?,
        ],
    ))
}
