//! The 16-bit element types the kernels are instantiated for, each with its table of launchers.

use half::{bf16, f16};

use crate::ffi;
use crate::tensor::Element;

type Stream = ffi::remoe_stream_t;

/// x, wr, logits, gates, block_counts, block_sums, t, h, e, stream.
pub(crate) type RouterForwardFn = unsafe extern "C" fn(
    *const u16,
    *const u16,
    *mut f32,
    *mut f32,
    *mut u32,
    *mut f32,
    i32,
    i32,
    i32,
    Stream,
) -> i32;

/// x, pair_token, wg, wu, act, expert_offsets, tile_offsets, num_tiles, e, h, f, stream.
pub(crate) type ExpertUpFn = unsafe extern "C" fn(
    *const u16,
    *const u32,
    *const u16,
    *const u16,
    *mut u16,
    *const u32,
    *const u32,
    i32,
    i32,
    i32,
    i32,
    Stream,
) -> i32;

/// act, wd, y, expert_offsets, tile_offsets, num_tiles, e, h, f, stream.
pub(crate) type ExpertDownFn = unsafe extern "C" fn(
    *const u16,
    *const u16,
    *mut u16,
    *const u32,
    *const u32,
    i32,
    i32,
    i32,
    i32,
    Stream,
) -> i32;

/// y, gates, pair_index, out, t, h, e, stream.
pub(crate) type CombineFn = unsafe extern "C" fn(
    *const u16,
    *const f32,
    *const i32,
    *mut u16,
    i32,
    i32,
    i32,
    Stream,
) -> i32;

/// The activation and weight types of the layer: bf16 or f16. Sealed: the kernels exist for
/// these two only.
pub trait HalfElement: Element + sealed::Sealed {
    #[doc(hidden)]
    const ROUTER_FORWARD: RouterForwardFn;
    #[doc(hidden)]
    const EXPERT_UP: ExpertUpFn;
    #[doc(hidden)]
    const EXPERT_DOWN: ExpertDownFn;
    #[doc(hidden)]
    const COMBINE: CombineFn;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

impl HalfElement for bf16 {
    const ROUTER_FORWARD: RouterForwardFn = ffi::remoe_router_forward_bf16;
    const EXPERT_UP: ExpertUpFn = ffi::remoe_expert_up_swiglu_bf16;
    const EXPERT_DOWN: ExpertDownFn = ffi::remoe_expert_down_bf16;
    const COMBINE: CombineFn = ffi::remoe_combine_bf16;
}

impl HalfElement for f16 {
    const ROUTER_FORWARD: RouterForwardFn = ffi::remoe_router_forward_f16;
    const EXPERT_UP: ExpertUpFn = ffi::remoe_expert_up_swiglu_f16;
    const EXPERT_DOWN: ExpertDownFn = ffi::remoe_expert_down_f16;
    const COMBINE: CombineFn = ffi::remoe_combine_f16;
}
