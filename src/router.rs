//! The router on the GPU: logits = X Wr (f32 accumulation) and the ReLU gates
//! (kernels/router.cu), and the TopK routers' softmax/top-k tail on given logits
//! (kernels/topk.cu). The CPU references are [`reference::relu_router`](crate::reference::relu_router),
//! [`reference::softmax_topk_router`](crate::reference::softmax_topk_router) and
//! [`reference::softmax_topk_normalized_router`](crate::reference::softmax_topk_normalized_router).

use crate::config::LayerConfig;
use crate::device::Device;
use crate::element::HalfElement;
use crate::error::{Error, Result};
use crate::ffi;
use crate::moe::{check_config, RouterKind};
use crate::tensor::{DeviceTensor, Launch, TensorView};

/// Computes `logits` \[T,E\] and `gates` \[T,E\] (f32) from `x` \[T,H\] and the router weight `wr`
/// \[H,E\], writing into caller-owned buffers (no allocation). Enqueued on `dev`'s stream. `x` and
/// `wr` are `&DeviceTensor`s or [`TensorView`]s.
///
/// A non-finite logit gets the gate 0 (the crate's policy); this low-level op has no context to
/// report it in: the logits show it.
pub fn router_forward<'x, 'w, T: HalfElement>(
    dev: &Device,
    cfg: &LayerConfig,
    x: impl Into<TensorView<'x, T>>,
    wr: impl Into<TensorView<'w, T>>,
    logits: &mut DeviceTensor<f32>,
    gates: &mut DeviceTensor<f32>,
) -> Result<()> {
    let (x, wr) = (x.into(), wr.into());
    cfg.validate_for_gpu()?;
    let (t, h, e) = (cfg.tokens, cfg.hidden, cfg.experts);
    x.expect_shape("router_forward: x", &[t, h])?;
    wr.expect_shape("router_forward: wr", &[h, e])?;
    logits.expect_shape("router_forward: logits", &[t, e])?;
    gates.expect_shape("router_forward: gates", &[t, e])?;
    x.expect_device("router_forward: x", dev)?;
    wr.expect_device("router_forward: wr", dev)?;
    logits.expect_device("router_forward: logits", dev)?;
    gates.expect_device("router_forward: gates", dev)?;
    if t == 0 {
        return Ok(());
    }
    let mut launch = Launch::on(dev);
    let xp = launch.input("router_forward: x", &x, t * h)?;
    let wp = launch.input("router_forward: wr", &wr, h * e)?;
    let lp = launch.output("router_forward: logits", &mut *logits, t * e)?;
    let gp = launch.output("router_forward: gates", &mut *gates, t * e)?;
    // SAFETY: the four pointers are live device buffers of this context holding at least the
    // element counts the kernel accesses ([t,h], [h,e], [t,e], [t,e]: checked by `launch`);
    // validate_for_gpu bounded t*h, h*e and t*e by i32::MAX so the casts below are exact, and
    // H % 8 == 0 with 16-byte aligned bases makes the kernel's 16-byte loads of X aligned. Null
    // statistics and error-word pointers are documented as "not written". The guards in
    // `launch` order the buffers' uses on the stream.
    let code = unsafe {
        T::ROUTER_FORWARD(
            xp as *const u16,
            wp as *const u16,
            lp,
            gp,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            t as i32,
            h as i32,
            e as i32,
            launch.stream(),
        )
    };
    ffi::check("router_forward", code)
}

/// The TopK routers' tail on `logits` \[T,E\] (f32): `probs` = softmax per token, and `gates`
/// \[T,E\] nonzero exactly on each token's k largest logits (ties to the lower expert index):
/// the selected P for [`RouterKind::TopK`], P renormalised over the selection (the softmax over
/// the selected logits) for [`RouterKind::TopKNormalized`]; a selected gate that would underflow
/// to 0 is `f32::MIN_POSITIVE`, so that gate > 0 is the selection. This is what
/// [`moe_forward`](crate::moe_forward) runs after the router GEMM, without the routing
/// statistics. Only T, E and k of `cfg` matter here, but `cfg` must be one the layer takes
/// (E <= [`TOPK_MAX_EXPERTS`](crate::moe::TOPK_MAX_EXPERTS)). Enqueued on `dev`'s stream, into
/// caller-owned buffers.
///
/// Non-finite logits take no part (the crate's policy, see [`crate::moe`]): P = 0 and never
/// selected, so a token with fewer than k finite logits has fewer than k gates. This low-level
/// op has no context to report them in: the logits show them.
pub fn topk_softmax<'l>(
    dev: &Device,
    cfg: &LayerConfig,
    router: RouterKind,
    logits: impl Into<TensorView<'l, f32>>,
    probs: &mut DeviceTensor<f32>,
    gates: &mut DeviceTensor<f32>,
) -> Result<()> {
    let logits = logits.into();
    if !router.is_topk() {
        return Err(Error::InvalidConfig(format!(
            "topk_softmax: {router:?} is not a TopK router"
        )));
    }
    check_config(cfg, router)?;
    let (t, e, k) = (cfg.tokens, cfg.experts, cfg.k);
    logits.expect_shape("topk_softmax: logits", &[t, e])?;
    probs.expect_shape("topk_softmax: probs", &[t, e])?;
    gates.expect_shape("topk_softmax: gates", &[t, e])?;
    logits.expect_device("topk_softmax: logits", dev)?;
    probs.expect_device("topk_softmax: probs", dev)?;
    gates.expect_device("topk_softmax: gates", dev)?;
    if t == 0 {
        return Ok(());
    }
    let normalize = i32::from(router == RouterKind::TopKNormalized);
    let mut launch = Launch::on(dev);
    let lp = launch.input_raw("topk_softmax: logits", &logits, t * e)?;
    let pp = launch.output_raw("topk_softmax: probs", &mut *probs, t * e)?;
    let gp = launch.output_raw("topk_softmax: gates", &mut *gates, t * e)?;
    // SAFETY: logits, probs and gates hold at least t*e f32 (checked by `launch`; the kernel
    // reads and writes them one element at a time, so no alignment is needed); check_config
    // bounded t*e by i32::MAX and checked 1 <= k <= e <= 512. Null statistics pointers are
    // documented as "not written". The guards in `launch` order the buffers' uses on the stream.
    let code = unsafe {
        ffi::remoe_topk_softmax(
            lp,
            pp,
            gp,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            t as i32,
            e as i32,
            k as i32,
            normalize,
            launch.stream(),
        )
    };
    ffi::check("topk_softmax", code)
}
