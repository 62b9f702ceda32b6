//! The adaptive L1 coefficient of ReMoE on the device (docs/SPEC.md, section 3.3), and how the
//! layer's ops are given their coefficient. The CPU reference is
//! [`reference::SparsityController`](crate::reference::SparsityController).

use cudarc::driver::CudaSlice;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ffi;
use crate::tensor::Launch;

// The ranges below are argued from the kernels' arithmetic for every configuration the GPU layer
// takes (`LayerConfig::validate_for_gpu`): H >= 8 and T*H, H*E < 2^31, so T <= 2^28 and
// E <= 2^28; 1 <= k <= E; n_e <= T. The coefficient c (lambda, or TopK's aux c) enters in f64
// and is rounded to f32 once:
// - the backward adds, per active gate (ReMoE) or per probability (TopK),
//   grad_scale * c * E * n_e / (k T^2) <= grad_scale * c * E / k <= grad_scale * c * 2^28
//   (kernels/backward.cu, `balance_scale`, times the f32 count n_e);
// - the forward's balance loss is c * E / (k T^2) * sum_e n_e * gate_sum_e, at most
//   c * E / (k T) times the sum of all gates (kernels/compaction.cu, `finalize_kernel`).

/// The smallest lambda the adaptive controller holds. Unclamped, steps one way shrink lambda to
/// f64's subnormals and then 0, from which multiplying by alpha never returns. At 1e-12 the
/// backward's per-gate scale lambda * E / (k T^2) is still a normal f32 (>= 1e-12 / 2^56, about
/// 1.4e-29, against f32's 1.2e-38) for every T, so the regulariser never silently vanishes; it
/// is four decades below the paper's lambda_0 of 1e-8, and from it lambda climbs back to 1e-3
/// in about 114 steps of alpha = 1.2.
pub const LAMBDA_MIN: f64 = ffi::REMOE_LAMBDA_MIN;

/// The largest lambda the adaptive controller holds. The regulariser's gradient per active gate
/// at balance (n_e = kT/E) is lambda / T, the size of a per-token mean loss's gradient at
/// lambda = 1; at 1e3 it outweighs the model's loss a thousandfold, so a router that can follow
/// its gradient has gone sparse long before. lambda climbs past that only while it cannot (a
/// frozen router, sparsities recorded without backward passes), and the ceiling bounds how long
/// the way back takes (1e3 to 1e-3 in about 76 steps of alpha = 1.2) instead of letting lambda
/// reach inf. It is far inside [`COEFF_MAX`], so the controller's lambda is always a valid
/// fixed coefficient too.
pub const LAMBDA_MAX: f64 = ffi::REMOE_LAMBDA_MAX;

/// The largest step factor a controller takes. Any finite alpha > 1 would stay finite under the
/// clamp, but a controller whose one step moves lambda by more than a decade jumps between the
/// ends of its range instead of following the sparsity (alpha = 10 crosses
/// [`LAMBDA_MIN`]..[`LAMBDA_MAX`] in 15 steps; the paper's is 1.2).
pub const ALPHA_MAX: f64 = 10.0;

/// The largest fixed coefficient (lambda of ReMoE's regulariser, c of TopK's aux loss) the layer
/// ops take. The backward's balance term per gate is at most grad_scale * c * 2^28 for every
/// configuration the GPU layer takes: about 2.7e14 * grad_scale at 1e6, so with the backward's
/// grad_scale up to 2^40 (a loss scale well past what mixed-precision training uses) about 3e26,
/// twelve decades below f32's overflow at 3.4e38, which leaves that much room for the dense
/// router gradients that multiply it by weights and activations and sum it over tokens or
/// experts. Practical values are many decades smaller (Switch's c is 1e-2; the examples and tests
/// here use at most 60).
pub const COEFF_MAX: f64 = 1e6;

/// The largest `BackwardOptions::balance_grad_scale` the bound of [`COEFF_MAX`] is argued for:
/// 2^40, past mixed-precision loss scales (Megatron starts at 2^32 and backs off; PyTorch's
/// GradScaler starts at 2^16).
pub const BALANCE_GRAD_SCALE_MAX: f64 = 1_099_511_627_776.0;

/// A controller's sizes: the target 1 - k/E is a sparsity in [0, 1) only for 1 <= k <= E.
pub(crate) fn check_k(k: usize, experts: usize) -> Result<()> {
    if experts == 0 || k == 0 || k > experts {
        return Err(Error::InvalidConfig(format!(
            "lambda controller needs 1 <= k <= experts (got k {k}, experts {experts})"
        )));
    }
    Ok(())
}

/// A controller's parameters: lambda0 from [`LAMBDA_MIN`] to [`LAMBDA_MAX`], alpha in
/// (1, [`ALPHA_MAX`]], target in [0, 1). A target outside it is one the sparsity (in [0, 1])
/// can never fall below (target <= 0 at best equals it, as for k = E where 0 is right) or always
/// does (target >= 1 is all experts off): lambda would then move one way forever.
pub(crate) fn check_params(lambda0: f64, alpha: f64, target: f64) -> Result<()> {
    // Written as "inside" tests so that NaN, which fails every comparison, is refused.
    if !(LAMBDA_MIN..=LAMBDA_MAX).contains(&lambda0) {
        return Err(Error::InvalidConfig(format!(
            "lambda controller: lambda0 must be in [{LAMBDA_MIN:e}, {LAMBDA_MAX:e}], got {lambda0}"
        )));
    }
    if !(alpha > 1.0 && alpha <= ALPHA_MAX) {
        return Err(Error::InvalidConfig(format!(
            "lambda controller: alpha must be in (1, {ALPHA_MAX}], got {alpha}"
        )));
    }
    if !(0.0..1.0).contains(&target) {
        return Err(Error::InvalidConfig(format!(
            "lambda controller: the target sparsity must be in [0, 1), got {target}"
        )));
    }
    Ok(())
}

/// A fixed coefficient the kernels can take: finite, in [0, [`COEFF_MAX`]]. Negative values are
/// refused because neither balance loss means anything with them: ReMoE's regulariser weighs
/// ReLU gates, which are unbounded above, so -|lambda| makes the loss unbounded below and its
/// gradient pushes every gate to grow; TopK's aux loss with c < 0 rewards routing every token to
/// one expert. 0 turns the balance loss off.
pub(crate) fn check_fixed_coefficient(c: f64) -> Result<()> {
    if !(0.0..=COEFF_MAX).contains(&c) {
        return Err(Error::InvalidConfig(format!(
            "the balance loss's coefficient must be finite and in [0, {COEFF_MAX:e}], got {c}"
        )));
    }
    Ok(())
}

/// lambda, kept on the device in f64, with the running sum of the sparsities recorded since the
/// last step. Each ReMoE forward given [`Coefficient::Adaptive`] adds its layer's sparsity to
/// the sum on the device; [`step`](Self::step) applies the update rule of docs/SPEC.md
/// (section 3.3) to the mean and resets it.
/// Neither waits for the host: only [`lambda`](Self::lambda) (for logging) reads back.
#[derive(Debug)]
pub struct LambdaController {
    dev: Device,
    pub(crate) lambda: CudaSlice<f64>,
    pub(crate) sparsity_sum: CudaSlice<f64>,
    pub(crate) count: CudaSlice<u32>,
    alpha: f64,
    target: f64,
}

impl LambdaController {
    /// The paper's defaults (lambda_0 = 1e-8, alpha = 1.2) for k of E experts: target sparsity
    /// 1 - k/E. [`Error::InvalidConfig`] unless 1 <= k <= E.
    pub fn new(dev: &Device, k: usize, experts: usize) -> Result<Self> {
        check_k(k, experts)?;
        Self::with_params(dev, 1e-8, 1.2, 1.0 - k as f64 / experts as f64)
    }

    /// A controller starting at `lambda0` (from [`LAMBDA_MIN`] to [`LAMBDA_MAX`]), stepping by
    /// the factor `alpha` (in (1, [`ALPHA_MAX`]]) towards the sparsity `target` (in [0, 1));
    /// [`Error::InvalidConfig`] otherwise, before anything is allocated.
    pub fn with_params(dev: &Device, lambda0: f64, alpha: f64, target: f64) -> Result<Self> {
        check_params(lambda0, alpha, target)?;
        let s = dev.stream();
        Ok(Self {
            dev: dev.clone(),
            lambda: s.clone_htod(&[lambda0])?,
            sparsity_sum: s.alloc_zeros(1)?,
            count: s.alloc_zeros(1)?,
            alpha,
            target,
        })
    }

    /// The target sparsity.
    pub fn target(&self) -> f64 {
        self.target
    }

    /// Checks that the controller's device buffers live in `dev`'s context.
    pub(crate) fn expect_device(&self, dev: &Device) -> Result<()> {
        if self.lambda.context().cu_ctx() != dev.context().cu_ctx() {
            return Err(Error::WrongContext {
                what: "lambda controller",
            });
        }
        Ok(())
    }

    /// Ends a training step on the device: lambda *= alpha if the mean recorded sparsity is
    /// below the target, else lambda /= alpha, then clamped to the range from [`LAMBDA_MIN`] to
    /// [`LAMBDA_MAX`]; nothing recorded leaves lambda as it is.
    pub fn step(&mut self) -> Result<()> {
        let dev = self.dev.clone();
        let mut l = Launch::on(&dev);
        let lp = l.output_raw("lambda", &mut self.lambda, 1)?;
        let sp = l.output_raw("sparsity sum", &mut self.sparsity_sum, 1)?;
        let cp = l.output_raw("sparsity count", &mut self.count, 1)?;
        // SAFETY: three device buffers of this controller of at least one element each (checked
        // by `l`), on its stream; the kernel accesses element 0 of each.
        let code =
            unsafe { ffi::remoe_lambda_step(lp, sp, cp, self.alpha, self.target, l.stream()) };
        ffi::check("lambda_step", code)
    }

    /// Sets this controller's lambda to `other`'s, on the device (8 bytes, no host read): a
    /// copy that forwards may use without recording into `other` (the candle layer's
    /// evaluation forwards). Both must be on the same device.
    #[cfg(feature = "candle-cuda")]
    pub(crate) fn copy_lambda_from(&mut self, other: &LambdaController) -> Result<()> {
        other.expect_device(&self.dev)?;
        self.dev
            .stream()
            .memcpy_dtod(&other.lambda, &mut self.lambda)?;
        Ok(())
    }

    /// The current lambda, read back (waits for the stream).
    pub fn lambda(&self) -> Result<f64> {
        Ok(self.dev.stream().clone_dtoh(&self.lambda)?[0])
    }
}

/// The coefficient of the balance loss for one forward or backward: lambda of ReMoE's
/// regulariser (fixed, or the adaptive controller's) or c of TopK's aux loss.
#[derive(Debug)]
pub enum Coefficient<'a> {
    /// A value given by the host (copied to the device for the kernels).
    Fixed(f64),
    /// The controller's lambda, read on the device. A forward also records its layer's
    /// sparsity into the controller.
    Adaptive(&'a mut LambdaController),
}

impl Coefficient<'_> {
    /// A coefficient whose arithmetic in the kernels stays finite: a fixed one in
    /// [0, [`COEFF_MAX`]] (see [`check_fixed_coefficient`]). A controller's lambda needs no
    /// check: it starts between [`LAMBDA_MIN`] and [`LAMBDA_MAX`] and every step clamps it there.
    pub(crate) fn validate(&self) -> Result<()> {
        match *self {
            Coefficient::Fixed(c) => check_fixed_coefficient(c),
            Coefficient::Adaptive(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(r: Result<()>) -> bool {
        matches!(r, Err(Error::InvalidConfig(_)))
    }

    #[test]
    fn the_bounds_are_the_headers() {
        // The kernel clamps with the header's literals, the reference with these constants: the
        // same decimal literals, so the same doubles.
        assert_eq!(LAMBDA_MIN, 1e-12);
        assert_eq!(LAMBDA_MAX, 1e3);
        let (lo, hi) = (LAMBDA_MIN, LAMBDA_MAX);
        assert!(0.0 < lo && lo < 1e-8 && hi <= COEFF_MAX);
        assert_eq!(BALANCE_GRAD_SCALE_MAX, 2f64.powi(40));
    }

    #[test]
    fn k_must_be_between_1_and_the_experts() {
        assert!(refused(check_k(0, 8)));
        assert!(refused(check_k(1, 0)));
        assert!(refused(check_k(0, 0)));
        assert!(refused(check_k(9, 8)));
        assert!(check_k(1, 8).is_ok());
        assert!(check_k(8, 8).is_ok());
        assert!(check_k(1, 1).is_ok());
    }

    #[test]
    fn controller_parameters_out_of_range_are_refused() {
        let ok = (1e-8, 1.2, 0.875);
        assert!(check_params(ok.0, ok.1, ok.2).is_ok());
        for lambda0 in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            -1e-3,
            LAMBDA_MIN / 2.0,
            LAMBDA_MAX * 2.0,
        ] {
            assert!(
                refused(check_params(lambda0, ok.1, ok.2)),
                "lambda0 {lambda0}"
            );
        }
        for alpha in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1.0,
            0.5,
            -2.0,
            ALPHA_MAX * 1.5,
        ] {
            assert!(refused(check_params(ok.0, alpha, ok.2)), "alpha {alpha}");
        }
        for target in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1.0, 1.5, -0.1] {
            assert!(refused(check_params(ok.0, ok.1, target)), "target {target}");
        }
        // The ends of every range are taken; k = E's target of 0 among them.
        for (l, a, t) in [
            (LAMBDA_MIN, ALPHA_MAX, 0.0),
            (LAMBDA_MAX, 1.0 + f64::EPSILON, 1.0 - f64::EPSILON),
        ] {
            assert!(check_params(l, a, t).is_ok(), "{l} {a} {t}");
        }
    }

    #[test]
    fn fixed_coefficients_must_be_finite_and_in_range() {
        for c in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e300,
            COEFF_MAX * 1.000001,
            -1e-3,
            -f64::MIN_POSITIVE,
        ] {
            assert!(refused(Coefficient::Fixed(c).validate()), "{c}");
        }
        for c in [0.0, -0.0, 1e-300, 1e-3, 20.0, LAMBDA_MAX, COEFF_MAX] {
            assert!(Coefficient::Fixed(c).validate().is_ok(), "{c}");
        }
    }

    #[test]
    fn the_largest_coefficient_keeps_the_balance_gradient_finite_in_f32() {
        // The f32 that `balance_scale` times n_e makes, at its worst over the configurations the
        // GPU layer takes (T = n_e, so E n_e / (k T^2) = E / k, at E = 2^28 and k = 1).
        let e_over_k = 2f64.powi(28);
        let worst = (BALANCE_GRAD_SCALE_MAX * COEFF_MAX * e_over_k) as f32;
        assert!(worst.is_finite() && (worst as f64) < f32::MAX as f64 / 1e11);
        // And the smallest lambda still gives a normal f32 per-gate scale at T = 2^28.
        let t = 2f64.powi(28);
        let tiny = (LAMBDA_MIN / (t * t)) as f32;
        assert!(tiny.is_normal());
    }
}
