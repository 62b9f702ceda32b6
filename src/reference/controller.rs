//! The adaptive L1 coefficient of ReMoE (SPEC: "Adaptive coefficient").

/// Steers the regulariser coefficient lambda so that the layer's sparsity reaches
/// `target = 1 - k/E`: once per training step, with S the mean sparsity recorded since the last
/// step (over layers and micro-batches), lambda is multiplied by alpha when S is below the target
/// and divided by alpha otherwise. lambda is kept in f64 whatever the model's dtype.
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

    /// A controller with the paper's defaults for `k` active experts out of `experts`.
    pub fn new(k: usize, experts: usize) -> Self {
        Self::with_params(
            Self::DEFAULT_LAMBDA0,
            Self::DEFAULT_ALPHA,
            1.0 - k as f64 / experts as f64,
        )
    }

    /// A controller starting at `lambda0` (> 0), stepping by the factor `alpha` (> 1) towards
    /// the sparsity `target`. Panics otherwise.
    pub fn with_params(lambda0: f64, alpha: f64, target: f64) -> Self {
        assert!(
            alpha > 1.0,
            "alpha must exceed 1 for the controller to move"
        );
        assert!(lambda0 > 0.0, "lambda must be positive");
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
            if mean < self.target {
                self.lambda *= self.alpha;
            } else {
                self.lambda /= self.alpha;
            }
        }
        self.sum = 0.0;
        self.count = 0;
        self.lambda
    }
}
