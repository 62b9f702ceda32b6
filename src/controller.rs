//! The adaptive L1 coefficient of ReMoE on the device (SPEC: "Adaptive coefficient"), and how the
//! layer's ops are given their coefficient. The CPU reference is
//! [`reference::SparsityController`](crate::reference::SparsityController).

use cudarc::driver::CudaSlice;

use crate::device::Device;
use crate::error::Result;
use crate::ffi;
use crate::tensor::Launch;

/// lambda, kept on the device in f64, with the running sum of the sparsities recorded since the
/// last step. Each ReMoE forward given [`Coefficient::Adaptive`] adds its layer's sparsity to
/// the sum on the device; [`step`](Self::step) applies SPEC's rule to the mean and resets it.
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
    /// 1 - k/E.
    pub fn new(dev: &Device, k: usize, experts: usize) -> Result<Self> {
        Self::with_params(dev, 1e-8, 1.2, 1.0 - k as f64 / experts as f64)
    }

    /// A controller starting at `lambda0`, stepping by the factor `alpha` (> 1) towards the
    /// sparsity `target`; [`Error::InvalidConfig`](crate::Error::InvalidConfig) otherwise.
    pub fn with_params(dev: &Device, lambda0: f64, alpha: f64, target: f64) -> Result<Self> {
        if !(alpha > 1.0 && lambda0 > 0.0 && lambda0.is_finite()) {
            return Err(crate::Error::InvalidConfig(format!(
                "controller needs alpha > 1 and a finite lambda0 > 0 (got alpha {alpha}, lambda0 {lambda0})"
            )));
        }
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
            return Err(crate::Error::WrongContext {
                what: "lambda controller",
            });
        }
        Ok(())
    }

    /// Ends a training step on the device: lambda *= alpha if the mean recorded sparsity is
    /// below the target, else lambda /= alpha; nothing recorded leaves lambda as it is.
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
