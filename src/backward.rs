//! The MoE layer backward on the GPU (ReMoE and TopK), from the state its forward saved in the
//! [`MoeContext`]. The CPU reference is [`reference::remoe_backward`](crate::reference::remoe_backward)
//! and [`reference::topk_backward`](crate::reference::topk_backward).
//!
//! The sequence, on the context's stream, with no host round-trip:
//!
//! 1. per pair: dY = R dOut_t and the data term of dR, dOut_t . y (y was saved by the forward,
//!    so dR needs no recompute);
//! 2. the router's logit gradient dL: ReMoE, dR plus lambda E n_e / (k T^2) on the active pairs;
//!    TopK, the softmax backward with the aux loss's term;
//! 3. da = dY Wd^T with SwiGLU's backward fused (dg, du, from the saved g and u);
//! 4. per-pair dX = dg Wg^T + du Wu^T;
//! 5. weight gradients dWd = act^T dY, dWg = X^T dg, dWu = X^T du per expert (reduction over its
//!    pairs), f32, optionally accumulated into the caller's buffers;
//! 6. the router's dense part: dX_router = dL Wr^T and dWr = X^T dL;
//! 7. dX = dX_router + the sum of each token's per-pair dX, experts in ascending order.
//!
//! Every sum has a fixed order and no float atomics are used: two runs on the same inputs give
//! bitwise-identical gradients.

use crate::config::LayerConfig;
use crate::controller::Coefficient;
use crate::element::HalfElement;
use crate::error::{Error, Result};
use crate::ffi;
use crate::moe::{check_layer_tensors, MoeContext, MoeWeights, RouterKind};
use crate::tensor::{DeviceTensor, Element, Launch};
use crate::workspace::GrowBuf;

/// The backward's scratch buffers, kept in the context and reused.
#[derive(Debug)]
pub(crate) struct BackwardScratch<T: Element> {
    dy: GrowBuf<T>,
    dr: GrowBuf<f32>,
    dg: GrowBuf<T>,
    du: GrowBuf<T>,
    dx_pair: GrowBuf<T>,
    dl: GrowBuf<f32>,
    dxr: GrowBuf<f32>,
    partial: GrowBuf<f32>,
}

impl<T: Element> Default for BackwardScratch<T> {
    fn default() -> Self {
        Self {
            dy: GrowBuf::default(),
            dr: GrowBuf::default(),
            dg: GrowBuf::default(),
            du: GrowBuf::default(),
            dx_pair: GrowBuf::default(),
            dl: GrowBuf::default(),
            dxr: GrowBuf::default(),
            partial: GrowBuf::default(),
        }
    }
}

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

impl<T: HalfElement> MoeContext<T> {
    pub(crate) fn backward_poison(&mut self) -> Result<()> {
        let b = &mut self.bwd;
        b.dy.poison()?;
        b.dr.poison()?;
        b.dg.poison()?;
        b.du.poison()?;
        b.dx_pair.poison()?;
        b.dl.poison()?;
        b.dxr.poison()?;
        b.partial.poison()
    }
}

/// How many slices the dWr reduction over T is cut into: enough blocks to fill the GPU, each
/// slice at least 256 tokens.
fn router_wgrad_slices(t: usize, h: usize, e: usize) -> usize {
    let blocks_per_slice = h.div_ceil(64) * e.div_ceil(32);
    let fill = 264usize.div_ceil(blocks_per_slice).max(1);
    t.div_ceil(256).clamp(1, fill)
}

/// The backward of the last forward run with `ctx`, which must have been made with
/// [`MoeContext::for_training`]. `x` and `w` must be the forward's; `coeff` is the balance
/// loss's coefficient (the forward's lambda or c: with an adaptive controller, call it before
/// the controller's step). With `accumulate`, the weight gradients are added to what `grads`
/// holds (micro-batches); otherwise overwritten. `grads.dx` is always overwritten.
pub fn moe_backward<T: HalfElement>(
    ctx: &mut MoeContext<T>,
    coeff: Coefficient,
    x: &DeviceTensor<T>,
    w: &MoeWeights<T>,
    dout: &DeviceTensor<T>,
    grads: MoeGrads<T>,
    accumulate: bool,
) -> Result<()> {
    let (cfg, router) = ctx.last.ok_or_else(|| {
        Error::InvalidConfig("moe_backward: this context has run no forward".into())
    })?;
    if !ctx.save_for_backward {
        return Err(Error::InvalidConfig(
            "moe_backward: the forward did not save for backward (use MoeContext::for_training)"
                .into(),
        ));
    }
    check_backward_inputs(ctx, &cfg, x, w, dout, &grads)?;
    let LayerConfig {
        tokens: t,
        hidden: h,
        ffn: f,
        experts: e,
        k,
    } = cfg;
    let dev = ctx.dev.clone();
    let (pairs, tiles) = (ctx.pairs, ctx.tiles);
    let slices = router_wgrad_slices(t, h, e);
    {
        let c = &mut *ctx;
        let a = &mut c.allocations;
        let b = &mut c.bwd;
        MoeContext::<T>::grow(&dev, a, &mut b.dy, pairs * h)?;
        MoeContext::<T>::grow(&dev, a, &mut b.dr, pairs)?;
        MoeContext::<T>::grow(&dev, a, &mut b.dg, pairs * f)?;
        MoeContext::<T>::grow(&dev, a, &mut b.du, pairs * f)?;
        MoeContext::<T>::grow(&dev, a, &mut b.dx_pair, pairs * h)?;
        MoeContext::<T>::grow(&dev, a, &mut b.dl, t * e)?;
        MoeContext::<T>::grow(&dev, a, &mut b.dxr, t * h)?;
        MoeContext::<T>::grow(&dev, a, &mut b.partial, slices * h * e)?;
    }
    ctx.upload_fixed_coeff(&coeff)?;
    let coeff_ptr_src = match &coeff {
        Coefficient::Fixed(_) => ctx.coeff.slice(),
        Coefficient::Adaptive(c) => &c.lambda,
    };
    let (ti, hi, fi, ei, ki) = (t as i32, h as i32, f as i32, e as i32, k as i32);
    let acc = accumulate as i32;
    let pairs_i = pairs as i32; // |A| <= T*E <= i32::MAX (validate_for_gpu)

    // 1. dY and dR's data term.
    if pairs > 0 {
        let mut l = Launch::on(&dev);
        let d = l.input("dout", dout.cuda_slice())?;
        let y = l.input("y", ctx.y.slice())?;
        let pt = l.input("pair tokens", ctx.pair_token.slice())?;
        let pg = l.input("pair gates", ctx.pair_gate.slice())?;
        let dy = l.output("dy", ctx.bwd.dy.slice_mut())?;
        let dr = l.output("dr", ctx.bwd.dr.slice_mut())?;
        // SAFETY: dout [t,h]; y, dy [|A|,h]; pair tokens < t; dr [|A|]; h % 8 == 0.
        let code = unsafe {
            T::PAIR_GRAD_PREP(
                d as *const u16,
                y,
                pt,
                pg,
                dy as *mut u16,
                dr,
                pairs_i,
                hi,
                l.stream(),
            )
        };
        ffi::check("pair_grad_prep", code)?;
    }
    // 2. dL.
    if t > 0 {
        let mut l = Launch::on(&dev);
        let pi = l.input("pair index", ctx.pair_index.slice())?;
        let dr = l.input("dr", ctx.bwd.dr.slice())?;
        let cn = l.input("counts", ctx.counts.slice())?;
        let probs = match router {
            RouterKind::Relu => std::ptr::null(),
            RouterKind::TopK => l.input("probs", ctx.probs.slice())?,
        };
        let cp = l.input_raw(coeff_ptr_src);
        let dl = l.output("dl", ctx.bwd.dl.slice_mut())?;
        // SAFETY: pair index, probs, dl [t,e]; dr [|A|] indexed by valid pair indices; counts
        // [e]; cp one f64.
        let code =
            unsafe { ffi::remoe_router_grad(pi, dr, cn, probs, cp, dl, ti, ei, ki, l.stream()) };
        ffi::check("router_grad", code)?;
    }
    // 3-4. Expert input-side gradients.
    if tiles > 0 {
        let tiles_i = tiles as i32;
        {
            let mut l = Launch::on(&dev);
            let dy = l.input("dy", ctx.bwd.dy.slice())?;
            let wd = l.input("down weight", w.down.cuda_slice())?;
            let g = l.input("g", ctx.g.slice())?;
            let u = l.input("u", ctx.u.slice())?;
            let dg = l.output("dg", ctx.bwd.dg.slice_mut())?;
            let du = l.output("du", ctx.bwd.du.slice_mut())?;
            let eo = l.input("expert offsets", ctx.expert_offsets.slice())?;
            let to = l.input("tile offsets", ctx.tile_offsets.slice())?;
            // SAFETY: dy [|A|,h]; wd [e,f,h]; g, u, dg, du [|A|,f]; offsets as in the forward.
            let code = unsafe {
                T::EXPERT_DACT(
                    dy as *const u16,
                    wd as *const u16,
                    g as *const u16,
                    u as *const u16,
                    dg as *mut u16,
                    du as *mut u16,
                    eo,
                    to,
                    tiles_i,
                    ei,
                    hi,
                    fi,
                    l.stream(),
                )
            };
            ffi::check("expert_dact", code)?;
        }
        {
            let mut l = Launch::on(&dev);
            let dg = l.input("dg", ctx.bwd.dg.slice())?;
            let du = l.input("du", ctx.bwd.du.slice())?;
            let wg = l.input("gate weight", w.gate.cuda_slice())?;
            let wu = l.input("up weight", w.up.cuda_slice())?;
            let dxp = l.output("dx pair", ctx.bwd.dx_pair.slice_mut())?;
            let eo = l.input("expert offsets", ctx.expert_offsets.slice())?;
            let to = l.input("tile offsets", ctx.tile_offsets.slice())?;
            // SAFETY: dg, du [|A|,f]; wg, wu [e,h,f]; dx pair [|A|,h]; offsets as above.
            let code = unsafe {
                T::EXPERT_DX(
                    dg as *const u16,
                    du as *const u16,
                    wg as *const u16,
                    wu as *const u16,
                    dxp as *mut u16,
                    eo,
                    to,
                    tiles_i,
                    ei,
                    hi,
                    fi,
                    l.stream(),
                )
            };
            ffi::check("expert_dx", code)?;
        }
    }
    // 5. Expert weight gradients (launched even with no pairs: they write zeros).
    let weight_grad = |a: *const u16,
                       gather: *const u32,
                       b: *const u16,
                       out: *mut f32,
                       eo: *const u32,
                       m: i32,
                       n: i32,
                       s: ffi::remoe_stream_t,
                       what: &'static str| {
        // SAFETY (for each call below): a holds rows of m columns indexed by the (gathered)
        // pair, b [|A|, n], out [e, m, n] f32; offsets [e+1] over |A| pairs.
        let code = unsafe { T::WEIGHT_GRAD(a, gather, b, out, eo, ei, m, n, acc, s) };
        ffi::check(what, code)
    };
    {
        let mut l = Launch::on(&dev);
        let act = l.input("act", ctx.act.slice())?;
        let dy = l.input("dy", ctx.bwd.dy.slice())?;
        let eo = l.input("expert offsets", ctx.expert_offsets.slice())?;
        let out = l.output("dWd", grads.down.cuda_slice_mut())?;
        weight_grad(
            act as _,
            std::ptr::null(),
            dy as _,
            out,
            eo,
            fi,
            hi,
            l.stream(),
            "dWd",
        )?;
    }
    {
        let mut l = Launch::on(&dev);
        let xp = l.input("x", x.cuda_slice())?;
        let pt = l.input("pair tokens", ctx.pair_token.slice())?;
        let dg = l.input("dg", ctx.bwd.dg.slice())?;
        let du = l.input("du", ctx.bwd.du.slice())?;
        let eo = l.input("expert offsets", ctx.expert_offsets.slice())?;
        let og = l.output("dWg", grads.gate.cuda_slice_mut())?;
        let ou = l.output("dWu", grads.up.cuda_slice_mut())?;
        weight_grad(xp as _, pt, dg as _, og, eo, hi, fi, l.stream(), "dWg")?;
        weight_grad(xp as _, pt, du as _, ou, eo, hi, fi, l.stream(), "dWu")?;
    }
    // 6. The router's dense gradients.
    {
        let mut l = Launch::on(&dev);
        let xp = l.input("x", x.cuda_slice())?;
        let wr = l.input("router weight", w.router.cuda_slice())?;
        let dl = l.input("dl", ctx.bwd.dl.slice())?;
        let dxr = l.output("dx router", ctx.bwd.dxr.slice_mut())?;
        let part = l.output("dWr partial", ctx.bwd.partial.slice_mut())?;
        let dwr = l.output("dWr", grads.router.cuda_slice_mut())?;
        // SAFETY: x [t,h]; wr [h,e]; dl [t,e]; dxr [t,h]; partial [slices,h,e]; dwr [h,e].
        let code = unsafe {
            T::ROUTER_BACKWARD_DENSE(
                xp as *const u16,
                wr as *const u16,
                dl,
                dxr,
                part,
                dwr,
                ti,
                hi,
                ei,
                slices as i32,
                acc,
                l.stream(),
            )
        };
        ffi::check("router_backward_dense", code)?;
    }
    // 7. dX.
    if t > 0 {
        let mut l = Launch::on(&dev);
        let dxp = l.input("dx pair", ctx.bwd.dx_pair.slice())?;
        let pi = l.input("pair index", ctx.pair_index.slice())?;
        let dxr = l.input("dx router", ctx.bwd.dxr.slice())?;
        let dx = l.output("dx", grads.dx.cuda_slice_mut())?;
        // SAFETY: dx pair [|A|,h] (at least one element); pair index [t,e]; dxr f32 [t,h]; dx
        // [t,h].
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

fn check_backward_inputs<T: HalfElement>(
    ctx: &MoeContext<T>,
    cfg: &LayerConfig,
    x: &DeviceTensor<T>,
    w: &MoeWeights<T>,
    dout: &DeviceTensor<T>,
    g: &MoeGrads<T>,
) -> Result<()> {
    check_layer_tensors(ctx, cfg, x, w)?;
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    for (what, tensor) in [("dout", dout), ("dx", &*g.dx)] {
        tensor.expect_shape(what, &[t, h])?;
        tensor.expect_device(what, &ctx.dev)?;
    }
    let grads: [(&'static str, &DeviceTensor<f32>, &[usize]); 4] = [
        ("router grad", &*g.router, &[h, e]),
        ("gate grad", &*g.gate, &[e, h, f]),
        ("up grad", &*g.up, &[e, h, f]),
        ("down grad", &*g.down, &[e, f, h]),
    ];
    for (what, tensor, shape) in grads {
        tensor.expect_shape(what, shape)?;
        tensor.expect_device(what, &ctx.dev)?;
    }
    Ok(())
}
