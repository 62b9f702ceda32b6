//! The adaptive L1 coefficient of ReMoE (docs/SPEC.md, section 3.3).

use crate::controller::{check_k, check_params, LAMBDA_MAX, LAMBDA_MIN};

/// Steers the regulariser coefficient lambda so that the layer's sparsity reaches
/// `target = 1 - k/E`: once per training step, with S the mean sparsity recorded since the last
/// step (over layers and micro-batches), lambda is multiplied by alpha when S is below the target
/// and divided by alpha otherwise, then clamped to the range from
/// [`LAMBDA_MIN`](crate::controller::LAMBDA_MIN) to [`LAMBDA_MAX`](crate::controller::LAMBDA_MAX)
/// as the device controller clamps it. lambda is kept in f64 whatever the model's dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct SparsityController {
    lambda: f64,
    alpha: f64,
    target: f64,
    sum: f64,
    count: u64,
}

impl SparsityController {
    /// The paper's defaults: lambda_0 = 1e-8, alpha = 1.2.
    pub const DEFAULT_LAMBDA0: f64 = 1e-8;
    /// See [`DEFAULT_LAMBDA0`](Self::DEFAULT_LAMBDA0).
    pub const DEFAULT_ALPHA: f64 = 1.2;

    /// A controller with the paper's defaults for `k` active experts out of `experts`. Panics
    /// unless 1 <= k <= experts.
    pub fn new(k: usize, experts: usize) -> Self {
        if let Err(e) = check_k(k, experts) {
            panic!("{e}");
        }
        Self::with_params(
            Self::DEFAULT_LAMBDA0,
            Self::DEFAULT_ALPHA,
            1.0 - k as f64 / experts as f64,
        )
    }

    /// A controller starting at `lambda0`, stepping by the factor `alpha` towards the sparsity
    /// `target`, in the ranges the device controller takes
    /// ([`LambdaController::with_params`](crate::LambdaController::with_params)). Panics
    /// otherwise.
    pub fn with_params(lambda0: f64, alpha: f64, target: f64) -> Self {
        if let Err(e) = check_params(lambda0, alpha, target) {
            panic!("{e}");
        }
        Self {
            lambda: lambda0,
            alpha,
            target,
            sum: 0.0,
            count: 0,
        }
    }

    /// The current coefficient lambda.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// The target sparsity.
    pub fn target(&self) -> f64 {
        self.target
    }

    /// Records one layer's (or micro-batch's) sparsity for the current step.
    pub fn record(&mut self, sparsity: f64) {
        self.sum += sparsity;
        self.count += 1;
    }

    /// Ends the step: applies the update rule to the mean recorded sparsity and starts a new
    /// step. With nothing recorded lambda is left as it is. Returns the new lambda.
    pub fn step(&mut self) -> f64 {
        if self.count > 0 {
            let mean = self.sum / self.count as f64;
            let next = if mean < self.target {
                self.lambda * self.alpha
            } else {
                self.lambda / self.alpha
            };
            // The kernel's fmin(fmax(..)), bit for bit: they differ only on NaN, and next is
            // finite (lambda and alpha are, and alpha <= 10).
            self.lambda = next.clamp(LAMBDA_MIN, LAMBDA_MAX);
        }
        self.sum = 0.0;
        self.count = 0;
        self.lambda
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::ALPHA_MAX;

    /// 10,000 steps one way, at the paper's alpha and at the largest: lambda reaches its bound,
    /// stays on it exactly, and a single step the other way leaves it.
    #[test]
    fn lambda_stays_in_its_range_however_long_it_is_pushed() {
        for alpha in [SparsityController::DEFAULT_ALPHA, ALPHA_MAX] {
            for (sparsity, bound) in [(0.0, LAMBDA_MAX), (1.0, LAMBDA_MIN)] {
                let mut c = SparsityController::with_params(1e-3, alpha, 0.875);
                for i in 0..10_000 {
                    c.record(sparsity);
                    let l = c.step();
                    assert!(
                        (LAMBDA_MIN..=LAMBDA_MAX).contains(&l),
                        "alpha {alpha}, sparsity {sparsity}, step {i}: lambda {l}"
                    );
                }
                assert_eq!(c.lambda(), bound, "alpha {alpha}, sparsity {sparsity}");
                c.record(1.0 - sparsity);
                let back = c.step();
                assert!(back != bound && (LAMBDA_MIN..=LAMBDA_MAX).contains(&back));
            }
        }
    }

    #[test]
    fn a_step_past_a_bound_lands_on_it() {
        let mut c = SparsityController::with_params(LAMBDA_MAX / 1.1, 1.2, 0.5);
        c.record(0.0);
        assert_eq!(c.step(), LAMBDA_MAX);
        let mut c = SparsityController::with_params(LAMBDA_MIN * 1.1, 1.2, 0.5);
        c.record(1.0);
        assert_eq!(c.step(), LAMBDA_MIN);
    }

    #[test]
    #[should_panic(expected = "1 <= k <= experts")]
    fn more_active_experts_than_experts_is_refused() {
        SparsityController::new(9, 8);
    }

    #[test]
    #[should_panic(expected = "alpha must be in")]
    fn an_infinite_alpha_is_refused() {
        SparsityController::with_params(1e-8, f64::INFINITY, 0.5);
    }

    #[test]
    #[should_panic(expected = "target sparsity must be in")]
    fn a_nan_target_is_refused() {
        SparsityController::with_params(1e-8, 1.2, f64::NAN);
    }
}
