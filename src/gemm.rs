//! Which implementation runs the expert GEMMs.
//!
//! The five expert GEMMs (up projection with the X gather and SwiGLU, down projection, dAct with
//! SwiGLU's backward, dX, and the per-expert weight gradients) exist twice, with one launcher
//! contract (kernels/remoe_kernels.h), argument for argument:
//!
//! - [`GemmPath::Hopper`] (kernels/hopper_gemm.cu): wgmma from shared memory filled by TMA (the
//!   weights) and a cp.async producer warpgroup (the routed rows, X gathered in the load), two
//!   consumer warpgroups, mbarrier pipelines, persistent CTAs that read the tile counts from
//!   device memory. Needs compute capability 9.0 and a binary built for sm_90a.
//! - [`GemmPath::MmaSync`] (kernels/grouped_gemm.cu): mma.sync with a cp.async pipeline, for
//!   every chip from sm_80 (Ampere, Ada; newer chips through the PTX in the fat binary).
//!
//! Both are deterministic and give bitwise-identical results on the same inputs (they add the
//! same k16 products in the same order); the GPU tests check each against the CPU reference.
//!
//! A [`MoeContext`](crate::MoeContext) uses [`GemmPath::for_device`] unless told otherwise by
//! [`MoeContext::set_gemm_path`](crate::MoeContext::set_gemm_path) or by the environment
//! variable `REMOE_GEMM_PATH` (`mma-sync` forces the fallback, which is how the GPU suite runs
//! both paths on an H100; `hopper` insists on the Hopper path; `auto` or unset chooses).

use std::sync::{Mutex, PoisonError};

use crate::device::Device;
use crate::element::{ExpertGemms, HalfElement};
use crate::error::{Error, Result};
use crate::ffi;

/// The implementation of the expert GEMMs (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmPath {
    /// wgmma, TMA and warp-specialised persistent kernels (compute capability 9.0, sm_90a code).
    Hopper,
    /// mma.sync kernels, for every architecture from sm_80.
    MmaSync,
}

/// The environment variable that overrides the automatic choice.
pub const GEMM_PATH_ENV: &str = "REMOE_GEMM_PATH";

/// The largest expert FFN size F at which the Hopper weight gradients read their gathered
/// operand (X's rows for dWg and dWu, dOut's for dWd, through the pairs' rows) inside their
/// mainloop (cp.async, the way the mma.sync kernel reads it); above it they read a pair-order
/// copy of those rows by TMA, made first by a gather kernel. The in-mainloop gather saves the
/// copy (|pairs| x H elements written and read again) but its cp.async loads run slower than
/// TMA's, and the copy's share of the work falls as 1/F: on an H100 (bench_report's `dWgu:`
/// rows, 2026-12-07) gathering in the mainloop took 0.61 against 0.92 ms at SM1 (F 256), 0.81
/// against 1.10 at SM7 (256), 4.94 against 5.13 at SM30 (512), and lost at Q3 (768: 2.03
/// against 2.00) and A (3072: 0.41 against 0.32). (Measured for dWg and dWu; dWd, of the same
/// shape since it is computed as dOut^T (R act), follows the same rule.)
pub(crate) const HOPPER_WG_GATHER_MAX_FFN: usize = 512;

impl GemmPath {
    /// A short name, as used in `REMOE_GEMM_PATH` and in benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            GemmPath::Hopper => "hopper",
            GemmPath::MmaSync => "mma-sync",
        }
    }

    /// Whether this path's weight gradients, at expert FFN size `ffn`, read their gathered
    /// operand (dOut's rows for dWd, X's for dWg and dWu) from a copy in pair order made before
    /// them, rather than through the pairs' rows inside their mainloop: the Hopper path above
    /// F = 512, where TMA reading the copy outruns the in-kernel gather (measured on an H100).
    /// The two ways give the same bits; this says what the backward launches, and what its
    /// scratch holds (a pair-order buffer of |pairs| x H elements only where this is true).
    ///
    /// Public for the crate's benches and examples (which time and size what the backward
    /// does), not part of the API.
    #[doc(hidden)]
    pub fn copies_pair_ordered_rows(self, ffn: usize) -> bool {
        self == GemmPath::Hopper && ffn > HOPPER_WG_GATHER_MAX_FFN
    }

    /// Whether `dev` can run this path: always for [`GemmPath::MmaSync`]; for
    /// [`GemmPath::Hopper`], when the device is compute capability 9.0 and this binary holds
    /// sm_90a code for it (asked of the device once per ordinal, then cached).
    pub fn supported_on(self, dev: &Device) -> Result<bool> {
        match self {
            GemmPath::MmaSync => Ok(true),
            GemmPath::Hopper => hopper_available(dev),
        }
    }

    /// The path a context on `dev` uses by default: `REMOE_GEMM_PATH` when set, else
    /// [`GemmPath::Hopper`] where supported and [`GemmPath::MmaSync`] elsewhere. A forced
    /// `hopper` on a device that cannot run it is an error, not a silent fallback.
    pub fn for_device(dev: &Device) -> Result<Self> {
        match std::env::var(GEMM_PATH_ENV) {
            Ok(v) if v == "mma-sync" || v == "mma" => Ok(GemmPath::MmaSync),
            Ok(v) if v == "hopper" => {
                GemmPath::Hopper.require_on(dev)?;
                Ok(GemmPath::Hopper)
            }
            Ok(v) if v == "auto" || v.is_empty() => Self::best_on(dev),
            Ok(v) => Err(Error::InvalidConfig(format!(
                "{GEMM_PATH_ENV}={v:?}: expected `hopper`, `mma-sync` or `auto`"
            ))),
            Err(_) => Self::best_on(dev),
        }
    }

    fn best_on(dev: &Device) -> Result<Self> {
        Ok(if hopper_available(dev)? {
            GemmPath::Hopper
        } else {
            GemmPath::MmaSync
        })
    }

    /// An error naming why `dev` cannot run this path.
    pub(crate) fn require_on(self, dev: &Device) -> Result<()> {
        if self.supported_on(dev)? {
            return Ok(());
        }
        let (major, minor) = dev.context().compute_capability()?;
        Err(Error::InvalidConfig(format!(
            "the {} GEMM path needs compute capability 9.0 and sm_90a code in the binary; this \
             device is {major}.{minor} (or the build left sm_90a out of REMOE_CUDA_ARCHS)",
            self.name()
        )))
    }

    /// The launchers of this path for element type `T`.
    pub(crate) fn gemms<T: HalfElement>(self) -> ExpertGemms {
        match self {
            GemmPath::Hopper => T::EXPERT_GEMMS_HOPPER,
            GemmPath::MmaSync => T::EXPERT_GEMMS_MMA,
        }
    }
}

/// Per device ordinal: whether the Hopper kernels can run there (None: not asked yet).
static HOPPER_AVAILABLE: Mutex<Vec<Option<bool>>> = Mutex::new(Vec::new());

fn hopper_available(dev: &Device) -> Result<bool> {
    let ordinal = dev.context().ordinal();
    if let Some(Some(known)) = HOPPER_AVAILABLE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(ordinal)
    {
        return Ok(*known);
    }
    let (major, minor) = dev.context().compute_capability()?;
    let available = if (major, minor) == (9, 0) {
        // The probe runs through the CUDA runtime on this thread's current context.
        dev.context().bind_to_thread()?;
        let mut flag = 0i32;
        // SAFETY: the launcher writes one i32 through the pointer, which is valid for the call.
        let code = unsafe { ffi::remoe_hopper_gemm_available(&mut flag) };
        ffi::check("hopper_gemm_probe", code)?;
        flag == 1
    } else {
        false
    };
    // A panic elsewhere while the lock was held leaves the cache as valid as ever (each entry
    // is written whole): poisoning is ignored.
    let mut cache = HOPPER_AVAILABLE
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if cache.len() <= ordinal {
        cache.resize(ordinal + 1, None);
    }
    cache[ordinal] = Some(available);
    Ok(available)
}
