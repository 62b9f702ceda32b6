//! The router on the GPU: logits = X Wr (f32 accumulation) and the ReLU gates
//! (kernels/router.cu). The CPU reference is [`reference::relu_router`](crate::reference::relu_router).

use crate::config::LayerConfig;
use crate::device::Device;
use crate::element::HalfElement;
use crate::error::Result;
use crate::ffi;
use crate::tensor::{DeviceTensor, Launch};

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
    let xp = launch.input("router_forward: x", x.cuda_slice())?;
    let wp = launch.input("router_forward: wr", wr.cuda_slice())?;
    let lp = launch.output("router_forward: logits", logits.cuda_slice_mut())?;
    let gp = launch.output("router_forward: gates", gates.cuda_slice_mut())?;
    // SAFETY: the four pointers are live device allocations of this context whose shapes were
    // checked above ([t,h], [h,e], [t,e], [t,e]); validate_for_gpu bounded t*h, h*e and t*e by
    // i32::MAX so the casts below are exact, and H % 8 == 0 with 16-byte aligned bases makes
    // the kernel's 16-byte loads of X aligned. Null statistics pointers are documented as "not
    // written". The guards in `launch` order the buffers' uses on the stream.
    let code = unsafe {
        T::ROUTER_FORWARD(
            xp as *const u16,
            wp as *const u16,
            lp,
            gp,
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
