//! The 16-bit element types the kernels are instantiated for, each with its table of launchers.

use half::{bf16, f16};

use crate::ffi;
use crate::tensor::Element;

/// The launcher type of a header typedef `remoe_*_fn`. bindgen writes a C function type as
/// `Option<unsafe extern "C" fn(..)>` (a C function pointer may be null); the tables below hold
/// launchers, never null, so they take the pointer type inside.
pub(crate) type Launcher<F> = <F as nullable::NullableFn>::Fn;

mod nullable {
    // Public in a private module: the launcher tables of the public `HalfElement` name it.
    pub trait NullableFn {
        type Fn: Copy;
    }

    impl<F: Copy> NullableFn for Option<F> {
        type Fn = F;
    }
}

/// One implementation of the five expert GEMMs (src/gemm.rs picks one per device).
#[derive(Clone, Copy)]
pub struct ExpertGemms {
    pub(crate) up: Launcher<ffi::remoe_expert_up_fn>,
    pub(crate) down: Launcher<ffi::remoe_expert_down_fn>,
    pub(crate) dact: Launcher<ffi::remoe_expert_dact_fn>,
    pub(crate) dx: Launcher<ffi::remoe_expert_dx_fn>,
    pub(crate) weight_grad: Launcher<ffi::remoe_expert_weight_grad_fn>,
}

/// The activation and weight types of the layer: bf16 or f16. Sealed: the kernels exist for
/// these two only.
pub trait HalfElement: Element + sealed::Sealed {
    #[doc(hidden)]
    const ROUTER_FORWARD: Launcher<ffi::remoe_router_forward_fn>;
    /// The expert GEMMs on mma.sync (every architecture from sm_80).
    #[doc(hidden)]
    const EXPERT_GEMMS_MMA: ExpertGemms;
    /// The expert GEMMs on wgmma (sm_90a only).
    #[doc(hidden)]
    const EXPERT_GEMMS_HOPPER: ExpertGemms;
    #[doc(hidden)]
    const SUM_PLANES: Launcher<ffi::remoe_sum_planes_fn>;
    #[doc(hidden)]
    const COMBINE: Launcher<ffi::remoe_combine_fn>;
    #[doc(hidden)]
    const TOKEN_SUM: Launcher<ffi::remoe_token_sum_fn>;
    #[doc(hidden)]
    const ROUTER_BACKWARD_DENSE: Launcher<ffi::remoe_router_backward_dense_fn>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

impl HalfElement for bf16 {
    const ROUTER_FORWARD: Launcher<ffi::remoe_router_forward_fn> = ffi::remoe_router_forward_bf16;
    const SUM_PLANES: Launcher<ffi::remoe_sum_planes_fn> = ffi::remoe_sum_planes_bf16;
    const COMBINE: Launcher<ffi::remoe_combine_fn> = ffi::remoe_combine_bf16;
    const TOKEN_SUM: Launcher<ffi::remoe_token_sum_fn> = ffi::remoe_token_sum_bf16;
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
    const ROUTER_BACKWARD_DENSE: Launcher<ffi::remoe_router_backward_dense_fn> =
        ffi::remoe_router_backward_dense_bf16;
}

impl HalfElement for f16 {
    const ROUTER_FORWARD: Launcher<ffi::remoe_router_forward_fn> = ffi::remoe_router_forward_f16;
    const SUM_PLANES: Launcher<ffi::remoe_sum_planes_fn> = ffi::remoe_sum_planes_f16;
    const COMBINE: Launcher<ffi::remoe_combine_fn> = ffi::remoe_combine_f16;
    const TOKEN_SUM: Launcher<ffi::remoe_token_sum_fn> = ffi::remoe_token_sum_f16;
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
    const ROUTER_BACKWARD_DENSE: Launcher<ffi::remoe_router_backward_dense_fn> =
        ffi::remoe_router_backward_dense_f16;
}
