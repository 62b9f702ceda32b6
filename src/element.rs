//! The 16-bit element types the kernels are instantiated for, each with its table of launchers.

use half::{bf16, f16};

use crate::ffi;
use crate::tensor::Element;

type Stream = ffi::remoe_stream_t;

/// x, wr, logits, gates, block_counts, block_sums, error_flags, t, h, e, stream.
pub(crate) type RouterForwardFn = unsafe extern "C" fn(
    *const u16,
    *const u16,
    *mut f32,
    *mut f32,
    *mut u32,
    *mut f32,
    *mut u32,
    i32,
    i32,
    i32,
    Stream,
) -> i32;

/// x, pair_token, wg, wu, act, g, u, expert_offsets, tile_offsets, num_tiles, e, h, f, stream.
pub(crate) type ExpertUpFn = unsafe extern "C" fn(
    *const u16,
    *const u32,
    *const u16,
    *const u16,
    *mut u16,
    *mut u16,
    *mut u16,
    *const u32,
    *const u32,
    i32,
    i32,
    i32,
    i32,
    Stream,
) -> i32;

/// act, wd, y (f32), expert_offsets, tile_offsets, num_tiles, e, h, f, k_splits, plane_rows,
/// stream.
pub(crate) type ExpertDownFn = unsafe extern "C" fn(
    *const u16,
    *const u16,
    *mut f32,
    *const u32,
    *const u32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    Stream,
) -> i32;

/// y (f32), gates, pair_index, out, t, h, e, stream.
pub(crate) type CombineFn = unsafe extern "C" fn(
    *const f32,
    *const f32,
    *const i32,
    *mut u16,
    i32,
    i32,
    i32,
    Stream,
) -> i32;

/// rows, pair_index, init, out, t, h, e, stream.
pub(crate) type TokenSumFn = unsafe extern "C" fn(
    *const u16,
    *const i32,
    *const f32,
    *mut u16,
    i32,
    i32,
    i32,
    Stream,
) -> i32;

/// dout, row_dots (f32), groups, pair_token, pair_gate, dy, dr, count (device |A|), capacity,
/// h, stream.
pub(crate) type PairGradPrepFn = unsafe extern "C" fn(
    *const u16,
    *const f32,
    i32,
    *const u32,
    *const f32,
    *mut u16,
    *mut f32,
    *const u32,
    i32,
    i32,
    Stream,
) -> i32;

/// dout, pair_token, pair_gate, wd, g, u, dg, du, act, row_dots (f32), expert_offsets,
/// tile_offsets, num_tiles, e, h, f, stream.
pub(crate) type ExpertDActFn = unsafe extern "C" fn(
    *const u16,
    *const u32,
    *const f32,
    *const u16,
    *const u16,
    *const u16,
    *mut u16,
    *mut u16,
    *mut u16,
    *mut f32,
    *const u32,
    *const u32,
    i32,
    i32,
    i32,
    i32,
    Stream,
) -> i32;

/// dg, du, wg, wu, dx_pair, expert_offsets, tile_offsets, num_tiles, e, h, f, stream.
pub(crate) type ExpertDxFn = unsafe extern "C" fn(
    *const u16,
    *const u16,
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

/// a, gather, b, out, expert_offsets, a_rows, b_rows, e, m, n, accumulate, split, stream.
pub(crate) type WeightGradFn = unsafe extern "C" fn(
    *const u16,
    *const u32,
    *const u16,
    *mut f32,
    *const u32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    *const crate::ffi::remoe_wgrad_split_t,
    Stream,
) -> i32;

/// One implementation of the five expert GEMMs (src/gemm.rs picks one per device).
#[derive(Clone, Copy)]
pub struct ExpertGemms {
    pub(crate) up: ExpertUpFn,
    pub(crate) down: ExpertDownFn,
    pub(crate) dact: ExpertDActFn,
    pub(crate) dx: ExpertDxFn,
    pub(crate) weight_grad: WeightGradFn,
}

/// x, wr, dl, dxr, partial, dwr, t, h, e, slices, accumulate, stream.
pub(crate) type RouterBackwardDenseFn = unsafe extern "C" fn(
    *const u16,
    *const u16,
    *const f32,
    *mut f32,
    *mut f32,
    *mut f32,
    i32,
    i32,
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
    /// The expert GEMMs on mma.sync (every architecture from sm_80).
    #[doc(hidden)]
    const EXPERT_GEMMS_MMA: ExpertGemms;
    /// The expert GEMMs on wgmma (sm_90a only).
    #[doc(hidden)]
    const EXPERT_GEMMS_HOPPER: ExpertGemms;
    #[doc(hidden)]
    const COMBINE: CombineFn;
    #[doc(hidden)]
    const TOKEN_SUM: TokenSumFn;
    #[doc(hidden)]
    const PAIR_GRAD_PREP: PairGradPrepFn;
    #[doc(hidden)]
    const ROUTER_BACKWARD_DENSE: RouterBackwardDenseFn;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

impl HalfElement for bf16 {
    const ROUTER_FORWARD: RouterForwardFn = ffi::remoe_router_forward_bf16;
    const COMBINE: CombineFn = ffi::remoe_combine_bf16;
    const TOKEN_SUM: TokenSumFn = ffi::remoe_token_sum_bf16;
    const PAIR_GRAD_PREP: PairGradPrepFn = ffi::remoe_pair_grad_prep_bf16;
    const EXPERT_GEMMS_MMA: ExpertGemms = ExpertGemms {
        up: ffi::remoe_expert_up_swiglu_bf16,
        down: ffi::remoe_expert_down_bf16,
        dact: ffi::remoe_expert_dact_bf16,
        dx: ffi::remoe_expert_dx_bf16,
        weight_grad: ffi::remoe_expert_weight_grad_bf16,
    };
    const EXPERT_GEMMS_HOPPER: ExpertGemms = ExpertGemms {
        up: ffi::remoe_hopper_expert_up_swiglu_bf16,
        down: ffi::remoe_hopper_expert_down_bf16,
        dact: ffi::remoe_hopper_expert_dact_bf16,
        dx: ffi::remoe_hopper_expert_dx_bf16,
        weight_grad: ffi::remoe_hopper_expert_weight_grad_bf16,
    };
    const ROUTER_BACKWARD_DENSE: RouterBackwardDenseFn = ffi::remoe_router_backward_dense_bf16;
}

impl HalfElement for f16 {
    const ROUTER_FORWARD: RouterForwardFn = ffi::remoe_router_forward_f16;
    const COMBINE: CombineFn = ffi::remoe_combine_f16;
    const TOKEN_SUM: TokenSumFn = ffi::remoe_token_sum_f16;
    const PAIR_GRAD_PREP: PairGradPrepFn = ffi::remoe_pair_grad_prep_f16;
    const EXPERT_GEMMS_MMA: ExpertGemms = ExpertGemms {
        up: ffi::remoe_expert_up_swiglu_f16,
        down: ffi::remoe_expert_down_f16,
        dact: ffi::remoe_expert_dact_f16,
        dx: ffi::remoe_expert_dx_f16,
        weight_grad: ffi::remoe_expert_weight_grad_f16,
    };
    const EXPERT_GEMMS_HOPPER: ExpertGemms = ExpertGemms {
        up: ffi::remoe_hopper_expert_up_swiglu_f16,
        down: ffi::remoe_hopper_expert_down_f16,
        dact: ffi::remoe_hopper_expert_dact_f16,
        dx: ffi::remoe_hopper_expert_dx_f16,
        weight_grad: ffi::remoe_hopper_expert_weight_grad_f16,
    };
    const ROUTER_BACKWARD_DENSE: RouterBackwardDenseFn = ffi::remoe_router_backward_dense_f16;
}
