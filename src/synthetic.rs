//! Synthetic layer problems for tests, examples and benchmarks: random weights whose router
//! reaches a chosen density honestly (a constant input feature whose router row sets each
//! expert's threshold), with every value rounded to bf16 so that the CPU reference sees exactly
//! what the GPU sees.

use half::bf16;

use crate::config::LayerConfig;
use crate::device::Device;
use crate::error::Result;
use crate::moe::MoeWeights;
use crate::reference::LayerParams;
use crate::rng::SplitMix64;
use crate::tensor::DeviceTensor;

/// Inverse of the standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9).
pub fn inv_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549671010422589,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let plow = 0.02425;
    if p < plow {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - plow {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -inv_normal_cdf(1.0 - p)
    }
}

/// A layer problem on the host, with every value already rounded to bf16 (so the reference sees
/// exactly what the GPU sees), in f64.
pub struct HostProblem {
    pub cfg: LayerConfig,
    pub x: Vec<f64>,
    pub params: LayerParams<f64>,
}

/// Builds a problem whose expert e is active for about `density[e]` of the tokens: feature 0 of
/// X is a constant 1 and row 0 of the router sets each expert's threshold against the noise of
/// the other features (the honest way to reach a trained model's density with random weights).
/// `density[e]` = 0 turns expert e off, 1 turns it on for every token.
pub fn problem_with_density(cfg: LayerConfig, density: &[f64], seed: u64) -> HostProblem {
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    assert_eq!(density.len(), e);
    let mut rng = SplitMix64::new(seed);
    let r = |v: f64| bf16::from_f64(v).to_f64();
    let mut x: Vec<f64> = (0..t * h).map(|_| r(rng.range(-1.0, 1.0))).collect();
    for ti in 0..t {
        x[ti * h] = 1.0;
    }
    let a = 1.0 / (h as f64).sqrt();
    let mut router: Vec<f64> = (0..h * e).map(|_| r(rng.range(-a, a))).collect();
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
        gate: (0..e * h * f).map(|_| r(rng.range(-wa, wa))).collect(),
        up: (0..e * h * f).map(|_| r(rng.range(-wa, wa))).collect(),
        down: (0..e * f * h).map(|_| r(rng.range(-wf, wf))).collect(),
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

pub fn to_bf16(v: &[f64]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f64(x)).collect()
}

pub fn bf16_to_f64(v: &[bf16]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// The problem's tensors on the device.
pub struct DeviceProblem {
    pub x: DeviceTensor<bf16>,
    pub router: DeviceTensor<bf16>,
    pub gate: DeviceTensor<bf16>,
    pub up: DeviceTensor<bf16>,
    pub down: DeviceTensor<bf16>,
}

impl DeviceProblem {
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

    pub fn weights(&self) -> MoeWeights<'_, bf16> {
        MoeWeights {
            router: &self.router,
            gate: &self.gate,
            up: &self.up,
            down: &self.down,
        }
    }
}
