//! Synthetic layer problems for tests, examples and benchmarks: random weights whose router
//! reaches a chosen density honestly (a constant input feature whose router row sets each
//! expert's threshold), with every value rounded to bf16 so that the CPU reference sees exactly
//! what the GPU sees.

use half::bf16;
use rand_distr::{Distribution, Uniform};
use remoe_kernels::reference::LayerParams;
use remoe_kernels::{Device, DeviceTensor, LayerConfig, MoeWeights, Result};
use statrs::distribution::{ContinuousCDF, Normal};

use crate::rng::seeded;

/// The standard normal quantile: the z with P(N(0,1) <= z) = p, for p in (0, 1).
pub fn inv_normal_cdf(p: f64) -> f64 {
    Normal::new(0.0, 1.0)
        .expect("the standard normal")
        .inverse_cdf(p)
}

/// A layer problem on the host, with every value already rounded to bf16 (so the reference sees
/// exactly what the GPU sees), in f64.
pub struct HostProblem {
    /// The layer's sizes.
    pub cfg: LayerConfig,
    /// The input X [T,H].
    pub x: Vec<f64>,
    /// The router and expert weights.
    pub params: LayerParams<f64>,
}

/// Builds a problem whose expert e is active for about `density[e]` of the tokens: feature 0 of
/// X is a constant 1 and row 0 of the router sets each expert's threshold against the noise of
/// the other features (the honest way to reach a trained model's density with random weights).
/// `density[e]` = 0 turns expert e off, 1 turns it on for every token.
pub fn problem_with_density(cfg: LayerConfig, density: &[f64], seed: u64) -> HostProblem {
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    assert_eq!(density.len(), e);
    let mut rng = seeded(seed);
    let r = |v: f64| bf16::from_f64(v).to_f64();
    // Uniform in [-a, a), rounded to bf16 (a > 0).
    let u = |a: f64| Uniform::new(-a, a).expect("a > 0");
    let mut x: Vec<f64> = u(1.0).sample_iter(&mut rng).take(t * h).map(r).collect();
    for ti in 0..t {
        x[ti * h] = 1.0;
    }
    let a = 1.0 / (h as f64).sqrt();
    let mut router: Vec<f64> = u(a).sample_iter(&mut rng).take(h * e).map(r).collect();
    // logit noise: (H-1) features, each x ~ U(-1,1) (var 1/3) times w ~ U(-a,a) (var a^2/3).
    let sigma = ((h - 1) as f64 / 9.0).sqrt() * a;
    for (ei, &d) in density.iter().enumerate() {
        router[ei] = r(if d <= 0.0 {
            -50.0 * sigma - 1.0
        } else if d >= 1.0 {
            50.0 * sigma + 1.0
        } else {
            sigma * inv_normal_cdf(d)
        });
    }
    let wa = (3.0 / h as f64).sqrt();
    let wf = (3.0 / f as f64).sqrt();
    let params = LayerParams {
        router,
        gate: u(wa).sample_iter(&mut rng).take(e * h * f).map(r).collect(),
        up: u(wa).sample_iter(&mut rng).take(e * h * f).map(r).collect(),
        down: u(wf).sample_iter(&mut rng).take(e * f * h).map(r).collect(),
    };
    HostProblem { cfg, x, params }
}

/// The same density for every expert.
pub fn uniform_density(e: usize, d: f64) -> Vec<f64> {
    vec![d; e]
}

/// Expert e gets a share proportional to 1/(e+1) of `mean_active` experts per token.
pub fn skewed_density(e: usize, mean_active: f64) -> Vec<f64> {
    let z: f64 = (0..e).map(|i| 1.0 / (i + 1) as f64).sum();
    (0..e)
        .map(|i| (mean_active / z / (i + 1) as f64).min(1.0))
        .collect()
}

/// Rounds every value to bf16.
pub fn to_bf16(v: &[f64]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f64(x)).collect()
}

/// Widens every value to f64 (exactly).
pub fn bf16_to_f64(v: &[bf16]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// The problem's tensors on the device.
pub struct DeviceProblem {
    /// X [T,H].
    pub x: DeviceTensor<bf16>,
    /// The router weight Wr [H,E].
    pub router: DeviceTensor<bf16>,
    /// The expert gate weights Wg [E,H,F].
    pub gate: DeviceTensor<bf16>,
    /// The expert up weights Wu [E,H,F].
    pub up: DeviceTensor<bf16>,
    /// The expert down weights Wd [E,F,H].
    pub down: DeviceTensor<bf16>,
}

impl DeviceProblem {
    /// Copies problem `p` (already bf16 values) to `dev`.
    pub fn upload(dev: &Device, p: &HostProblem) -> Result<Self> {
        let (t, h, f, e) = (p.cfg.tokens, p.cfg.hidden, p.cfg.ffn, p.cfg.experts);
        let up = |v: &[f64], shape: &[usize]| DeviceTensor::from_host(dev, &to_bf16(v), shape);
        Ok(Self {
            x: up(&p.x, &[t, h])?,
            router: up(&p.params.router, &[h, e])?,
            gate: up(&p.params.gate, &[e, h, f])?,
            up: up(&p.params.up, &[e, h, f])?,
            down: up(&p.params.down, &[e, f, h])?,
        })
    }

    /// The weights as the layer ops take them.
    pub fn weights(&self) -> MoeWeights<'_, bf16> {
        MoeWeights {
            router: &self.router,
            gate: &self.gate,
            up: &self.up,
            down: &self.down,
        }
    }
}
