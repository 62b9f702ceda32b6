//! The router on the GPU: logits = X Wr (f32 accumulation) and the ReLU gates
//! (kernels/router.cu). The CPU reference is [`reference::relu_router`](crate::reference::relu_router).

use half::{bf16, f16};

use crate::config::LayerConfig;
use crate::device::Device;
use crate::error::Result;
use crate::ffi;
use crate::tensor::{DeviceTensor, Element, Launch};

/// The signature of the router launchers: x, wr, logits, gates, t, h, e, stream.
type RouterForwardFn = unsafe extern "C" fn(
    *const u16,
    *const u16,
    *mut f32,
    *mut f32,
    i32,
    i32,
    i32,
    ffi::remoe_stream_t,
) -> i32;

/// The 16-bit activation types the kernels take (bf16, f16), with their launchers.
pub trait HalfElement: Element {
    #[doc(hidden)]
    const ROUTER_FORWARD: RouterForwardFn;
}

impl HalfElement for bf16 {
    const ROUTER_FORWARD: RouterForwardFn = ffi::remoe_router_forward_bf16;
}

impl HalfElement for f16 {
    const ROUTER_FORWARD: RouterForwardFn = ffi::remoe_router_forward_f16;
}

/// Computes `logits` [T,E] and `gates` [T,E] (f32) from `x` [T,H] and the router weight `wr`
/// [H,E], writing into caller-owned buffers (no allocation). Enqueued on `dev`'s stream.
pub fn router_forward<T: HalfElement>(
    dev: &Device,
    cfg: &LayerConfig,
    x: &DeviceTensor<T>,
    wr: &DeviceTensor<T>,
    logits: &mut DeviceTensor<f32>,
    gates: &mut DeviceTensor<f32>,
) -> Result<()> {
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
    let xp = launch.input("router_forward: x", x)?;
    let wp = launch.input("router_forward: wr", wr)?;
    let lp = launch.output("router_forward: logits", logits)?;
    let gp = launch.output("router_forward: gates", gates)?;
    // SAFETY: the four pointers are live device allocations of this context whose shapes were
    // checked above ([t,h], [h,e], [t,e], [t,e]); validate_for_gpu bounded t*h, h*e and t*e by
    // i32::MAX so the casts below are exact, and H % 8 == 0 with 16-byte aligned bases makes
    // the kernel's 16-byte loads of X aligned. The guards in `launch` order the buffers' uses
    // on the stream.
    let code = unsafe {
        T::ROUTER_FORWARD(
            xp as *const u16,
            wp as *const u16,
            lp,
            gp,
            t as i32,
            h as i32,
            e as i32,
            launch.stream(),
        )
    };
    ffi::check("router_forward", code)
}
