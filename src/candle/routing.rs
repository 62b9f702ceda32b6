//! [`SharedRouting`]: what every MoE layer of one model shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::controller::{check_params, BALANCE_GRAD_SCALE_MAX};
use crate::error::Error;
use crate::reference::SparsityController;

use super::config::{Lambda, MoeConfig, MoeRouter};
use super::ops::{candle_err, lock};

/// What the MoE layers of one model share: ReMoE's adaptive lambda, whether forwards are
/// training forwards, and the scale of the balance regulariser's gradient.
///
/// **One lambda for the model.** The paper's implementation (Megatron-LM) keeps one
/// coefficient for all layers and steps it once per optimiser step on the sparsity averaged over
/// the layers and micro-batches of that step's training forwards (SPEC, "Adaptive
/// coefficient"). Make one `SharedRouting` per model and give it to every layer
/// ([`MoeLayer::new`](super::MoeLayer::new)); call [`step`](Self::step) once after each
/// optimiser step. A layer's forward records its sparsity only when it is a training forward:
/// [`training`](Self::training) is on (the default) and one of its inputs (x or a parameter)
/// tracks gradients. Turn training off around evaluation ([`set_training`](Self::set_training),
/// PyTorch's `model.eval()`): candle has no train/eval mode, and a `VarMap`'s parameters track
/// gradients in every forward, so the handle is what tells an evaluation forward apart.
///
/// On CUDA lambda and the recorded sum live on the device ([`LambdaController`](crate::LambdaController)):
/// a forward records with no host read, and [`step`](Self::step) is one kernel. An evaluation
/// forward runs on a copy of lambda (8 bytes copied on the device) whose records are never
/// stepped, so its balance loss statistic is still at the current lambda. On the CPU the
/// controller is the reference's [`SparsityController`].
///
/// **The regulariser's gradient** is added by each layer's backward, at
/// [`balance_grad_scale`](Self::balance_grad_scale) (default 1): the gradient of
/// `task_loss + balance_loss` when the task loss's own gradient comes unscaled. A training loop
/// that divides its loss by N micro-batches, or multiplies it by a loss scale, sets the same
/// factor here so that lambda keeps its meaning (Megatron's `MoEAuxLossAutoScaler` takes the
/// same scale from its loss scaler).
///
/// Cloning gives another handle to the same state.
#[derive(Clone)]
pub struct SharedRouting(pub(crate) Arc<Inner>);

pub(crate) struct Inner {
    training: AtomicBool,
    grad_scale: Mutex<f64>,
    /// None unless the router is ReMoE's with an adaptive lambda.
    pub(crate) lambda: Option<Mutex<Controller>>,
    /// The fixed coefficient otherwise (lambda or TopK's c).
    pub(crate) fixed: f64,
}

/// The adaptive lambda, where the layers run.
pub(crate) enum Controller {
    Host(SparsityController),
    #[cfg(feature = "candle-cuda")]
    Device(Box<super::cuda::DeviceLambda>),
}

impl std::fmt::Debug for SharedRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRouting")
            .field("training", &self.training())
            .field("balance_grad_scale", &self.balance_grad_scale())
            .field("adaptive", &self.0.lambda.is_some())
            .finish()
    }
}

/// Refuses devices the layer does not run on, before any parameter is made.
pub(super) fn check_device(dev: &candle_core::Device) -> candle_core::Result<()> {
    match dev {
        candle_core::Device::Cpu => Ok(()),
        #[cfg(feature = "candle-cuda")]
        candle_core::Device::Cuda(_) => Ok(()),
        #[allow(unreachable_patterns)]
        other => Err(unsupported_device(other)),
    }
}

fn unsupported_device(dev: &candle_core::Device) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "remoe: the layer runs on the CPU{} only, not on {dev:?}",
        if cfg!(feature = "candle-cuda") {
            " and CUDA devices"
        } else {
            " (CUDA: the `candle-cuda` feature)"
        }
    ))
    .bt()
}

impl SharedRouting {
    /// The shared state for the layers of `cfg` on `device`: for ReMoE with
    /// [`Lambda::Adaptive`], a controller starting at lambda_0 with the target sparsity 1 - k/E;
    /// otherwise the fixed coefficient (lambda, or TopK's c).
    pub fn new(cfg: &MoeConfig, device: &candle_core::Device) -> candle_core::Result<Self> {
        cfg.validate().map_err(candle_err)?;
        let (e, k) = (cfg.experts, cfg.experts_per_token);
        let (lambda, fixed) = match cfg.router {
            MoeRouter::Relu {
                lambda: Lambda::Adaptive { lambda0, alpha },
            } => {
                let target = 1.0 - k as f64 / e as f64;
                check_params(lambda0, alpha, target).map_err(candle_err)?;
                let ctl = match device {
                    candle_core::Device::Cpu => {
                        Controller::Host(SparsityController::with_params(lambda0, alpha, target))
                    }
                    #[cfg(feature = "candle-cuda")]
                    candle_core::Device::Cuda(c) => Controller::Device(Box::new(
                        super::cuda::DeviceLambda::new(c, lambda0, alpha, target)?,
                    )),
                    #[allow(unreachable_patterns)]
                    other => return Err(unsupported_device(other)),
                };
                (Some(Mutex::new(ctl)), 0.0)
            }
            MoeRouter::Relu {
                lambda: Lambda::Fixed(c),
            } => (None, c),
            MoeRouter::TopK { aux_coeff, .. } => (None, aux_coeff),
        };
        Ok(Self(Arc::new(Inner {
            training: AtomicBool::new(true),
            grad_scale: Mutex::new(1.0),
            lambda,
            fixed,
        })))
    }

    /// Whether forwards whose inputs track gradients are training forwards (recorded for the
    /// adaptive lambda). On by default.
    pub fn training(&self) -> bool {
        self.0.training.load(Ordering::Relaxed)
    }

    /// Turns training forwards on or off for every layer sharing this handle (off around
    /// evaluation).
    pub fn set_training(&self, on: bool) {
        self.0.training.store(on, Ordering::Relaxed);
    }

    /// The factor of the balance regulariser's gradient in the layers' backwards.
    pub fn balance_grad_scale(&self) -> f64 {
        *lock(&self.0.grad_scale)
    }

    /// Sets the factor of the balance regulariser's gradient (finite, in [0, 2^40]; 0 trains
    /// without it). Takes effect for forwards from now on.
    pub fn set_balance_grad_scale(&self, scale: f64) -> candle_core::Result<()> {
        if !(0.0..=BALANCE_GRAD_SCALE_MAX).contains(&scale) {
            return Err(candle_err(Error::InvalidConfig(format!(
                "balance_grad_scale must be finite and in [0, 2^40], got {scale}"
            ))));
        }
        *lock(&self.0.grad_scale) = scale;
        Ok(())
    }

    /// Whether lambda is adaptive (ReMoE with [`Lambda::Adaptive`]).
    pub fn is_adaptive(&self) -> bool {
        self.0.lambda.is_some()
    }

    /// The balance loss's coefficient now: the adaptive lambda (on CUDA a host read that waits
    /// for the stream), or the fixed one.
    pub fn coefficient(&self) -> candle_core::Result<f64> {
        match &self.0.lambda {
            None => Ok(self.0.fixed),
            Some(c) => match &*lock(c) {
                Controller::Host(h) => Ok(h.lambda()),
                #[cfg(feature = "candle-cuda")]
                Controller::Device(d) => d.lambda(),
            },
        }
    }

    /// Ends an optimiser step: the adaptive lambda moves by SPEC's rule on the mean sparsity
    /// that the training forwards since the last step recorded (over every layer and
    /// micro-batch), and the record starts over; nothing recorded leaves it as it is. Call once
    /// per optimiser step. A no-op for a fixed coefficient. On CUDA one kernel, no host read;
    /// what the device found in the layers' forwards (a NaN router logit) is reported by each
    /// layer's [`check_device_errors`](super::MoeLayer::check_device_errors), which a training
    /// loop calls now and then (it waits for the stream).
    pub fn step(&self) -> candle_core::Result<()> {
        let Some(c) = &self.0.lambda else {
            return Ok(());
        };
        match &mut *lock(c) {
            Controller::Host(h) => {
                h.step();
                Ok(())
            }
            #[cfg(feature = "candle-cuda")]
            Controller::Device(d) => d.step(),
        }
    }
}
