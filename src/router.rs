//! The router on the GPU: logits = X Wr (f32 accumulation) and the ReLU gates
//! (kernels/router.cu). The CPU reference is [`reference::relu_router`](crate::reference::relu_router).

use crate::config::LayerConfig;
use crate::device::Device;
use crate::element::HalfElement;
use crate::error::Result;
use crate::ffi;
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
