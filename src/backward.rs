//! The MoE layer backward on the GPU (ReMoE and TopK), from the state its forward saved in the
//! [`MoeContext`]. The CPU reference is [`reference::remoe_backward`](crate::reference::remoe_backward)
//! and [`reference::topk_backward`](crate::reference::topk_backward).
//!
//! The sequence, on the context's stream, with no host round-trip (the per-pair buffers are
//! sized by the forward's pair capacity, and the kernels read |A| and the offsets from device
//! memory, so a backward can be captured in a CUDA graph with its forward):
//!
//! 1. the dAct GEMM, d = dOut_t Wd^T for every pair (dOut's rows gathered by token), with an
//!    epilogue that recomputes act = SiLU(g) u from the saved g and u (bit for bit the
//!    forward's, which is therefore not kept) and writes R act for dWd (rounded once more to
//!    the activation type: kernels/swiglu.cuh, `gated_act`), sums dR's data term
//!    dOut_t . y = act . d per 32-column group from the unscaled act (so y is not kept
//!    either), and applies SwiGLU's backward to da = R d (dg, du);
//! 2. per pair: dR, the sum of its groups;
//! 3. the router's logit gradient dL: ReMoE, dR plus lambda E n_e / (k T^2) on the active pairs;
//!    TopK, the softmax backward with the aux loss's term; TopKNormalized, the softmax backward
//!    of the aux loss's term through P plus that of dR through the renormalised gates (see
//!    [`RouterKind::TopKNormalized`]);
//! 4. per-pair dX = dg Wg^T + du Wu^T;
//! 5. weight gradients per expert (reduction over its pairs), f32, optionally accumulated into
//!    the caller's buffers: dWd^T = dOut^T (R act), with dOut's rows gathered by token as dWg's
//!    X is, stored transposed into dWd's [E, F, H] (no per-pair R dOut is written); dWg = X^T
//!    dg, dWu = X^T du. Where the Hopper path reads these rows by TMA (F > 512,
//!    [`GemmPath::copies_pair_ordered_rows`](crate::GemmPath::copies_pair_ordered_rows)),
//!    dOut's and then X's rows are first copied into pair order, into one [capacity, H] buffer;
//! 6. the router's dense part: dX_router = dL Wr^T and dWr = X^T dL;
//! 7. dX = dX_router + the sum of each token's per-pair dX, experts in ascending order.
//!
//! Steps 1, 2, 4 and 5 are the expert half (src/experts.rs, a batch's backward, which an
//! expert-parallel owner runs on the rows it received) and run first; steps 3, 6 and 7 are the
//! router half, which reads only dR and the per-pair dX (an expert-parallel rank runs it on
//! what its owners returned). No step of one half reads what another step of its own half
//! writes out of order, so the split leaves every result bit for bit as it was.
//!
//! Every sum has a fixed order and no float atomics are used: two runs on the same inputs give
//! bitwise-identical gradients.
//!
//! The backward runs from the [`SavedForward`] record of the context's last successful forward,
//! never from the context's current settings: it refuses, with a typed error and before any
//! launch, a context whose last forward failed or did not save g and u, and it checks every
//! saved buffer against the record's lengths.

use crate::config::LayerConfig;
use crate::controller::Coefficient;
use crate::element::HalfElement;
use crate::error::{Error, Result};
use crate::experts::{BatchGradInputs, BatchWeightGrads, ExpertBatch};
use crate::ffi;
use crate::graph;
use crate::moe::{
    check_coefficient, check_layer_tensors, ExpertBufs, MoeContext, MoeWeightViews, RouterKind,
    RoutingBufs, SavedForward,
};
use crate::scratch::router_wgrad_slices;
use crate::tensor::{DeviceTensor, Element, Launch, TensorView};
use crate::workspace::GrowBuf;

/// Where the backward writes: the input gradient in the activation dtype, the weight gradients
/// in f32 (the usual master-gradient precision, and what accumulation across micro-batches
/// needs), all in the layout of the values.
#[derive(Debug)]
pub struct MoeGrads<'a, T: HalfElement> {
    /// dX [T, H], overwritten.
    pub dx: &'a mut DeviceTensor<T>,
    /// dWr [H, E].
    pub router: &'a mut DeviceTensor<f32>,
    /// dWg [E, H, F].
    pub gate: &'a mut DeviceTensor<f32>,
    /// dWu [E, H, F].
    pub up: &'a mut DeviceTensor<f32>,
    /// dWd [E, F, H].
    pub down: &'a mut DeviceTensor<f32>,
}

/// How the backward treats its outputs and the balance loss's gradient. `false` and `true`
/// convert into the options with that `accumulate` and the default scale 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackwardOptions {
    /// Add the weight gradients to what the gradient buffers hold (micro-batches) instead of
    /// overwriting them. dX is always overwritten.
    pub accumulate: bool,
    /// The factor the balance loss's gradient (the regulariser's, or TopK's aux loss's) is
    /// multiplied by before it joins dOut's: give the same factor dOut carries, the loss scale
    /// of mixed-precision training and/or 1/(micro-batches) of gradient averaging, so that the
    /// effective coefficient (lambda or c) does not change with it. In [0, 2^40]
    /// ([`BALANCE_GRAD_SCALE_MAX`](crate::controller::BALANCE_GRAD_SCALE_MAX)). Default 1.
    pub balance_grad_scale: f64,
}

impl Default for BackwardOptions {
    fn default() -> Self {
        Self {
            accumulate: false,
            balance_grad_scale: 1.0,
        }
    }
}

impl From<bool> for BackwardOptions {
    /// `accumulate`, with the balance gradient unscaled.
    fn from(accumulate: bool) -> Self {
        Self {
            accumulate,
            ..Self::default()
        }
    }
}

impl BackwardOptions {
    pub(crate) fn validate(&self) -> Result<()> {
        // A negative scale flips the balance gradient's sign, as a negative coefficient would
        // (refused for the same reason, see controller::check_fixed_coefficient); past the
        // bound the kernels' f32 arithmetic could overflow (src/controller.rs says why).
        let max = crate::controller::BALANCE_GRAD_SCALE_MAX;
        if !(0.0..=max).contains(&self.balance_grad_scale) {
            return Err(Error::InvalidConfig(format!(
                "moe_backward: balance_grad_scale must be finite and in [0, {max:e}], got {}",
                self.balance_grad_scale
            )));
        }
        Ok(())
    }
}

impl<T: HalfElement> MoeContext<T> {
    /// Gives every saved buffer the backward reads the length its forward wrote, as the record
    /// says (a graph's replay leaves its forward's state whatever lengths later calls set); an
    /// allocation shorter than that is an error.
    pub(crate) fn restore_saved_lens(&mut self, saved: &SavedForward) -> Result<()> {
        let generation = saved.generation;
        let l = &saved.lens;
        let r = &mut self.routing;
        restore_len("logits", &mut r.logits, l.logits, generation)?;
        restore_len("gates", &mut r.gates, l.gates, generation)?;
        restore_len("probs", &mut r.probs, l.probs, generation)?;
        restore_len("pair index", &mut r.pair_index, l.pair_index, generation)?;
        restore_len("counts", &mut r.counts, l.counts, generation)?;
        let offsets = l.expert_offsets;
        restore_len("expert offsets", &mut r.expert_offsets, offsets, generation)?;
        restore_len(
            "tile offsets",
            &mut r.tile_offsets,
            l.tile_offsets,
            generation,
        )?;
        restore_len("pair tokens", &mut r.pair_token, l.pair_token, generation)?;
        restore_len("pair gates", &mut r.pair_gate, l.pair_gate, generation)?;
        let x = &mut self.experts;
        restore_len("g", &mut x.g, l.g, generation)?;
        restore_len("u", &mut x.u, l.u, generation)?;
        // act too: the dAct GEMM writes R act there (dWd's operand), for the forward's capacity.
        let act = saved.capacity * saved.config.ffn;
        restore_len("act", &mut x.act, act, generation)
    }
}

/// Sets `buf`'s length to the `want` elements forward `generation` wrote there.
fn restore_len<E: Element>(
    what: &str,
    buf: &mut GrowBuf<E>,
    want: usize,
    generation: u64,
) -> Result<()> {
    buf.set_len(want).map_err(|_| {
        Error::InvalidConfig(format!(
            "moe_backward: saved buffer {what} cannot hold the {want} elements forward \
             {generation} wrote"
        ))
    })
}

/// The backward of the last successful forward run with `ctx`, which must have saved for
/// backward (a context made with [`MoeContext::for_training`], or with saving turned on before
/// that forward); otherwise, or when the last forward failed, it is refused with
/// [`Error::InvalidConfig`] before anything is enqueued. `x` and `w` must be the forward's
/// (`&DeviceTensor`s and `&MoeWeights`, or views); `coeff` is the balance loss's coefficient (the
/// forward's lambda or c: with an adaptive controller, call it before the controller's step).
///
/// `options` is a [`BackwardOptions`], or a `bool` for `accumulate` alone: with `accumulate`,
/// the weight gradients are added to what `grads` holds (micro-batches), otherwise overwritten
/// (`grads.dx` is always overwritten); `balance_grad_scale` multiplies the balance loss's
/// gradient (give the loss scale or averaging factor that `dout` carries).
///
/// ```
/// use half::bf16;
/// use remoe_kernels::{moe_backward, Coefficient, DeviceTensor, MoeContext, MoeGrads};
/// use remoe_kernels::{MoeWeights, Result};
///
/// /// The weight gradients of the last forward run with `ctx` (a training context), summed
/// /// into `grads` over micro-batches; dX overwritten.
/// fn backward(
///     ctx: &mut MoeContext<bf16>,
///     lambda: f64,
///     x: &DeviceTensor<bf16>,
///     weights: &MoeWeights<'_, bf16>,
///     dout: &DeviceTensor<bf16>,
///     grads: MoeGrads<'_, bf16>,
/// ) -> Result<()> {
///     moe_backward(ctx, Coefficient::Fixed(lambda), x, weights, dout, grads, true)
/// }
/// ```
pub fn moe_backward<'x, 'w, 'd, T: HalfElement>(
    ctx: &mut MoeContext<T>,
    coeff: Coefficient,
    x: impl Into<TensorView<'x, T>>,
    w: impl Into<MoeWeightViews<'w, T>>,
    dout: impl Into<TensorView<'d, T>>,
    grads: MoeGrads<T>,
    options: impl Into<BackwardOptions>,
) -> Result<()> {
    let (x, w, dout, options) = (x.into(), w.into(), dout.into(), options.into());
    let mode = graph::mode(&ctx.dev)?;
    // Locked while the backward is enqueued (see moe_forward).
    let cell = ctx.record.clone();
    let mut rec = cell.lock();
    // What the forward saved, not what the context would save now.
    let saved = SavedForward::for_backward(rec.saved.as_ref())?.clone();
    let cfg = saved.config;
    options.validate()?;
    check_coefficient(ctx, &coeff)?;
    check_backward_inputs(ctx, &cfg, cfg.experts, &x, &w, &dout, &grads)?;
    rec.note_call(mode, &cell, false);
    ctx.restore_saved_lens(&saved)?;
    // From here the dAct GEMM may write R act over the forward's act (MoeContext::act_to_host).
    if let Some(s) = rec.saved.as_mut() {
        s.act_gated = true;
    }
    let allocations = ctx.allocations;
    let ran = backward_stages(ctx, &saved, coeff, (&x, &w, &dout), grads, options);
    if ctx.allocations != allocations {
        rec.layout += 1;
    }
    ran
}

/// The backward's steps once its inputs are checked (see the module documentation).
fn backward_stages<T: HalfElement>(
    ctx: &mut MoeContext<T>,
    saved: &SavedForward,
    coeff: Coefficient,
    (x, w, dout): (&TensorView<T>, &MoeWeightViews<T>, &TensorView<T>),
    grads: MoeGrads<T>,
    options: BackwardOptions,
) -> Result<()> {
    let (cfg, router) = (saved.config, saved.router);
    let LayerConfig {
        tokens: t,
        hidden: h,
        ffn: f,
        experts: e,
        ..
    } = cfg;
    let dev = ctx.dev.clone();
    // Per-pair buffers are sized by the forward's capacity: |A| <= cap stays on the device.
    let (cap, max_tiles) = (saved.capacity, saved.max_tiles);
    let path = ctx.gemm_path()?;
    {
        let c = &mut *ctx;
        let a = &mut c.allocations;
        *a += c.bwd.size_expert_half(&dev, cap, (h, f, e), path)?;
        *a += c.bwd.size_router_half(&dev, cap, &cfg)?;
    }
    ctx.upload_fixed_coeff(&coeff)?;
    // Steps 1, 2, 4 and 5: the experts' half, over the forward's own dispatch.
    {
        let MoeContext {
            routing,
            experts,
            bwd,
            row_sched,
            ..
        } = &mut *ctx;
        let RoutingBufs {
            pair_token,
            expert_offsets,
            tile_offsets,
            pair_gate,
            ..
        } = routing;
        let ExpertBufs { g, u, act, .. } = experts;
        let batch = ExpertBatch {
            pair_row: pair_token,
            expert_offsets,
            tile_offsets,
            experts: e,
            cap,
            max_tiles,
            hidden: h,
            ffn: f,
        };
        let inp = BatchGradInputs {
            x: x.cuda_view(),
            x_rows: t,
            dout: dout.cuda_view(),
            dout_rows: t,
            pair_gate,
            g,
            u,
            gate: &w.gate,
            up: &w.up,
            down: &w.down,
        };
        let out = BatchWeightGrads {
            gate: &mut *grads.gate,
            up: &mut *grads.up,
            down: &mut *grads.down,
            accumulate: options.accumulate,
            chunking_pairs: None,
        };
        batch.backward(&dev, path, &inp, &mut bwd.batch_bufs(act, row_sched), out)?;
    }
    // Steps 3, 6 and 7: the router's half, from each pair's dR and dX.
    router_half(
        ctx,
        (&cfg, router),
        &coeff,
        (x, &w.router),
        (grads.dx, grads.router),
        options,
    )
}

/// The backward's router half, from `ctx.bwd.dr` and `ctx.bwd.dx_pair` in the forward's pair
/// order: the logit gradient dL (step 3), the router's dense gradients dX_router and dWr (6),
/// and dX, dX_router plus each token's per-pair dX in ascending expert order (7). An
/// expert-parallel rank runs it on the dR and dX rows its owners returned.
pub(crate) fn router_half<T: HalfElement>(
    ctx: &mut MoeContext<T>,
    (cfg, router): (&LayerConfig, RouterKind),
    coeff: &Coefficient,
    (x, wr): (&TensorView<T>, &TensorView<T>),
    (dx_out, dwr_out): (&mut DeviceTensor<T>, &mut DeviceTensor<f32>),
    options: BackwardOptions,
) -> Result<()> {
    let LayerConfig {
        tokens: t,
        hidden: h,
        experts: e,
        k,
        ..
    } = *cfg;
    let cap = ctx.bwd.dr.len();
    let slices = router_wgrad_slices(t, h, e);
    let (ti, hi, ei, ki) = (t as i32, h as i32, e as i32, k as i32);
    let dev = ctx.dev.clone();
    // 3. dL.
    if t > 0 {
        let mut l = Launch::on(&dev);
        let pi = l.input("pair index", &ctx.routing.pair_index, t * e)?;
        let dr = l.input("dr", &ctx.bwd.dr, cap)?;
        let cn = l.input("counts", &ctx.routing.counts, e)?;
        let (probs, gates) = match router {
            RouterKind::Relu => (std::ptr::null(), std::ptr::null()),
            RouterKind::TopK => (
                l.input("probs", &ctx.routing.probs, t * e)?,
                std::ptr::null(),
            ),
            RouterKind::TopKNormalized => (
                l.input("probs", &ctx.routing.probs, t * e)?,
                l.input("gates", &ctx.routing.gates, t * e)?,
            ),
        };
        let cp = match coeff {
            Coefficient::Fixed(_) => l.input_raw("coefficient", &ctx.coeff, 1)?,
            Coefficient::Adaptive(c) => l.input_raw("lambda", &c.lambda, 1)?,
        };
        let dl = l.output("dl", &mut ctx.bwd.dl, t * e)?;
        let scale = options.balance_grad_scale;
        // SAFETY: pair index, probs, gates, dl [t,e]; dr [cap] indexed by valid pair indices
        // (each < |A| <= cap); counts [e]; cp one f64 of this context (all checked by `l` and
        // check_coefficient). Null probs / gates select the router, as the header says.
        let code = unsafe {
            ffi::remoe_router_grad(
                pi,
                dr,
                cn,
                probs,
                gates,
                cp,
                scale,
                dl,
                ti,
                ei,
                ki,
                l.stream(),
            )
        };
        ffi::check("router_grad", code)?;
    }
    // 6. The router's dense gradients.
    {
        let mut l = Launch::on(&dev);
        let xp = l.input("x", x, t * h)?;
        let wrp = l.input("router weight", wr, h * e)?;
        let dl = l.input("dl", &ctx.bwd.dl, t * e)?;
        let dxr = l.output("dx router", &mut ctx.bwd.dxr, t * h)?;
        let part = l.output("dWr partial", &mut ctx.bwd.partial, slices * h * e)?;
        let dwr = l.output("dWr", dwr_out, h * e)?;
        // SAFETY: x [t,h]; wr [h,e]; dl [t,e]; dxr [t,h]; partial [slices,h,e]; dwr [h,e]
        // (checked by `l`).
        let code = unsafe {
            T::ROUTER_BACKWARD_DENSE(
                xp as *const u16,
                wrp as *const u16,
                dl,
                dxr,
                part,
                dwr,
                ti,
                hi,
                ei,
                slices as i32,
                options.accumulate as i32,
                l.stream(),
            )
        };
        ffi::check("router_backward_dense", code)?;
    }
    // 7. dX.
    if t > 0 {
        let mut l = Launch::on(&dev);
        let dxp = l.input("dx pair", &ctx.bwd.dx_pair, cap * h)?;
        let pi = l.input("pair index", &ctx.routing.pair_index, t * e)?;
        let dxr = l.input("dx router", &ctx.bwd.dxr, t * h)?;
        let dx = l.output("dx", dx_out, t * h)?;
        // SAFETY: dx pair [cap,h]; pair index [t,e]; dxr f32 [t,h]; dx [t,h] (checked by `l`);
        // every pair index is -1 or < |A| <= cap.
        let code = unsafe {
            T::TOKEN_SUM(
                dxp as *const u16,
                pi,
                dxr,
                dx as *mut u16,
                ti,
                hi,
                ei,
                l.stream(),
            )
        };
        ffi::check("token_sum", code)?;
    }
    Ok(())
}

/// The backward's tensors: x, the weights and the weight gradients of the `held` experts (E on
/// one GPU, E/R on an expert-parallel rank), dOut and dX, all in the context's device.
pub(crate) fn check_backward_inputs<T: HalfElement>(
    ctx: &MoeContext<T>,
    cfg: &LayerConfig,
    held: usize,
    x: &TensorView<T>,
    w: &MoeWeightViews<T>,
    dout: &TensorView<T>,
    g: &MoeGrads<T>,
) -> Result<()> {
    check_layer_tensors(ctx, cfg, held, x, w)?;
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    dout.expect_shape("dout", &[t, h])?;
    dout.expect_device("dout", &ctx.dev)?;
    g.dx.expect_shape("dx", &[t, h])?;
    g.dx.expect_device("dx", &ctx.dev)?;
    let grads: [(&'static str, &DeviceTensor<f32>, &[usize]); 4] = [
        ("router grad", &*g.router, &[h, e]),
        ("gate grad", &*g.gate, &[held, h, f]),
        ("up grad", &*g.up, &[held, h, f]),
        ("down grad", &*g.down, &[held, f, h]),
    ];
    for (what, tensor, shape) in grads {
        tensor.expect_shape(what, shape)?;
        tensor.expect_device(what, &ctx.dev)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row GEMMs' tile counter (kernels/hopper_gemm.cu, take_row_unit) is back at zero
    /// after a forward and a backward (poison_workspace leaves it alone), so that the next
    /// launches hand out every unit again: a second forward and backward on the same context,
    /// over poisoned buffers, give the first's bits. On each path
    /// the device has, with more units than SMs (the up projection: 32+ row tiles of 8 column
    /// tiles) and a split-K down projection (down_k_splits: 2).
    #[test]
    fn the_row_gemm_tile_counter_is_left_at_zero() {
        use crate::gemm::GemmPath;
        use crate::moe::{moe_forward, MoeWeights};
        use half::bf16;
        let Some(dev) =
            crate::device::test_device_or_skip("the_row_gemm_tile_counter_is_left_at_zero")
        else {
            return;
        };
        let cfg = LayerConfig::new(2048, 256, 1024, 4, 2);
        let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
        let tensor = |shape: &[usize], seed: usize, scale: f32| {
            let n: usize = shape.iter().product();
            let host: Vec<bf16> = (0..n)
                .map(|i| {
                    let v = ((i * 7919 + seed * 104_729) % 211) as f32 / 105.0 - 1.0;
                    bf16::from_f32(v * scale)
                })
                .collect();
            DeviceTensor::from_host(&dev, &host, shape).unwrap()
        };
        let x = tensor(&[t, h], 1, 1.0);
        let dout = tensor(&[t, h], 2, 1.0);
        let (router, gate, up, down) = (
            tensor(&[h, e], 3, 0.1),
            tensor(&[e, h, f], 4, 0.06),
            tensor(&[e, h, f], 5, 0.06),
            tensor(&[e, f, h], 6, 0.03),
        );
        let w = MoeWeights {
            router: &router,
            gate: &gate,
            up: &up,
            down: &down,
        };
        let bits16 = |d: &DeviceTensor<bf16>| -> Vec<u16> {
            d.to_host().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        let bits32 = |d: &DeviceTensor<f32>| -> Vec<u32> {
            d.to_host().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        for path in [GemmPath::Hopper, GemmPath::MmaSync] {
            if !path.supported_on(&dev).unwrap() {
                continue;
            }
            let mut ctx = MoeContext::<bf16>::for_training(&dev);
            ctx.set_gemm_path(path).unwrap();
            let mut runs = Vec::new();
            for _ in 0..2 {
                // NaN wherever a unit the second call skipped would leave the first's bits.
                ctx.poison_workspace().unwrap();
                let mut out = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
                let coeff = Coefficient::Fixed(0.01);
                moe_forward(&mut ctx, &cfg, RouterKind::TopK, coeff, &x, &w, &mut out).unwrap();
                let mut dx = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
                let mut dwr = DeviceTensor::<f32>::zeros(&dev, &[h, e]).unwrap();
                let mut dwg = DeviceTensor::<f32>::zeros(&dev, &[e, h, f]).unwrap();
                let mut dwu = DeviceTensor::<f32>::zeros(&dev, &[e, h, f]).unwrap();
                let mut dwd = DeviceTensor::<f32>::zeros(&dev, &[e, f, h]).unwrap();
                let grads = MoeGrads {
                    dx: &mut dx,
                    router: &mut dwr,
                    gate: &mut dwg,
                    up: &mut dwu,
                    down: &mut dwd,
                };
                let coeff = Coefficient::Fixed(0.01);
                moe_backward(&mut ctx, coeff, &x, &w, &dout, grads, false).unwrap();
                assert_eq!(ctx.row_sched.to_host().unwrap(), [0, 0], "{}", path.name());
                runs.push((
                    bits16(&out),
                    bits16(&dx),
                    [bits32(&dwg), bits32(&dwu), bits32(&dwd)],
                ));
            }
            assert!(runs[0] == runs[1], "{}: a second call differs", path.name());
        }
    }

    #[test]
    fn a_bool_is_accumulate_with_the_balance_gradient_unscaled() {
        assert_eq!(
            BackwardOptions::from(true),
            BackwardOptions {
                accumulate: true,
                balance_grad_scale: 1.0
            }
        );
        assert_eq!(BackwardOptions::from(false), BackwardOptions::default());
    }

    #[test]
    fn a_balance_scale_out_of_range_is_refused() {
        let max = crate::controller::BALANCE_GRAD_SCALE_MAX;
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, 2.0 * max] {
            let o = BackwardOptions {
                accumulate: false,
                balance_grad_scale: bad,
            };
            assert!(matches!(o.validate(), Err(Error::InvalidConfig(_))));
        }
        let o = BackwardOptions {
            accumulate: false,
            balance_grad_scale: 0.0,
        };
        assert!(o.validate().is_ok());
    }
}
