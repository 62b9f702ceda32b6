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

impl HostProblem {
    /// Replaces every value (X and the weights) by `round(value)`: a problem for a GPU dtype
    /// whose rounding of the values is not bf16's (f16's, below its normal range), so that the
    /// reference computes from what the GPU sees.
    pub fn round_values(&mut self, round: impl Fn(f64) -> f64) {
        let p = &mut self.params;
        for v in self
            .x
            .iter_mut()
            .chain(p.router.iter_mut())
            .chain(p.gate.iter_mut())
            .chain(p.up.iter_mut())
            .chain(p.down.iter_mut())
        {
            *v = round(*v);
        }
    }
}

/// Builds a problem whose expert e is active for about `density[e]` of the tokens: feature 0 of
/// X is a constant 1 and row 0 of the router sets each expert's threshold against the noise of
/// the other features (the honest way to reach a trained model's density with random weights).
/// `density[e]` = 0 turns expert e off, 1 turns it on for every token.
///
/// The values are those of one ChaCha8 stream from `seed` drawn in order (X, the router, then
/// Wg, Wu, Wd; one u64 per value); large tensors are drawn in pieces on several threads, each
/// piece from its own position in that stream, so the problem does not depend on the machine.
pub fn problem_with_density(cfg: LayerConfig, density: &[f64], seed: u64) -> HostProblem {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    problem_on_threads(cfg, density, seed, threads.min(32), Stream::PIECE)
}

/// The problem drawn on up to `threads` threads, in pieces of at least `min_piece` values.
fn problem_on_threads(
    cfg: LayerConfig,
    density: &[f64],
    seed: u64,
    threads: usize,
    min_piece: usize,
) -> HostProblem {
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    assert_eq!(density.len(), e);
    let mut stream = Stream {
        seed,
        word: 0,
        threads,
        min_piece,
    };
    let r = |v: f64| bf16::from_f64(v).to_f64();
    let mut x = stream.uniform(t * h, 1.0);
    for ti in 0..t {
        x[ti * h] = 1.0;
    }
    let a = 1.0 / (h as f64).sqrt();
    let mut router = stream.uniform(h * e, a);
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
        gate: stream.uniform(e * h * f, wa),
        up: stream.uniform(e * h * f, wa),
        down: stream.uniform(e * f * h, wf),
    };
    HostProblem { cfg, x, params }
}

/// One ChaCha8 stream drawn in order, large draws in parallel pieces.
struct Stream {
    seed: u64,
    /// The stream's position (32-bit words) of the next draw.
    word: u128,
    threads: usize,
    /// The smallest piece drawn on a thread of its own.
    min_piece: usize,
}

impl Stream {
    /// The smallest piece drawn on a thread of its own, by default.
    const PIECE: usize = 1 << 16;

    /// `n` values uniform in [-a, a) (a > 0), rounded to bf16, in f64: the next `n` u64 of the
    /// stream, as `Uniform::new(-a, a)` samples them one by one (one u64 each, no rejection).
    fn uniform(&mut self, n: usize, a: f64) -> Vec<f64> {
        let dist = Uniform::new(-a, a).expect("a > 0");
        let (seed, start) = (self.seed, self.word);
        self.word += 2 * n as u128;
        let piece = n.div_ceil(self.threads.max(1)).max(self.min_piece.max(1));
        let mut out = vec![0.0f64; n];
        let fill = |i: usize, part: &mut [f64]| {
            let mut rng = seeded(seed);
            rng.set_word_pos(start + 2 * (i * piece) as u128);
            for v in part {
                *v = bf16::from_f64(dist.sample(&mut rng)).to_f64();
            }
        };
        if n <= piece {
            fill(0, &mut out);
            return out;
        }
        std::thread::scope(|s| {
            for (i, part) in out.chunks_mut(piece).enumerate() {
                let fill = &fill;
                s.spawn(move || fill(i, part));
            }
        });
        out
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The problem as it was drawn before the draws were split over threads: one sequential
    /// stream.
    fn sequential(cfg: LayerConfig, density: &[f64], seed: u64) -> HostProblem {
        let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
        let mut rng = seeded(seed);
        let r = |v: f64| bf16::from_f64(v).to_f64();
        let u = |a: f64| Uniform::new(-a, a).expect("a > 0");
        let mut x: Vec<f64> = u(1.0).sample_iter(&mut rng).take(t * h).map(r).collect();
        for ti in 0..t {
            x[ti * h] = 1.0;
        }
        let a = 1.0 / (h as f64).sqrt();
        let mut router: Vec<f64> = u(a).sample_iter(&mut rng).take(h * e).map(r).collect();
        let sigma = ((h - 1) as f64 / 9.0).sqrt() * a;
        for (ei, &d) in density.iter().enumerate() {
            router[ei] = r(sigma * inv_normal_cdf(d));
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

    #[test]
    fn parallel_draws_are_the_sequential_stream() {
        // Odd sizes and pieces: pieces that start and end inside the generator's blocks.
        let cfg = LayerConfig::new(1031, 136, 264, 5, 2);
        let density = uniform_density(5, 0.4);
        let want = sequential(cfg, &density, 0x5eed);
        for (threads, min_piece) in [(1, 1), (3, 1), (7, 999), (64, 1), (4, Stream::PIECE)] {
            let got = problem_on_threads(cfg, &density, 0x5eed, threads, min_piece);
            assert_eq!(got.x, want.x, "x, {threads} threads");
            assert_eq!(
                got.params.router, want.params.router,
                "router, {threads} threads"
            );
            assert_eq!(got.params.gate, want.params.gate, "gate, {threads} threads");
            assert_eq!(got.params.up, want.params.up, "up, {threads} threads");
            assert_eq!(got.params.down, want.params.down, "down, {threads} threads");
        }
    }

    #[test]
    fn rounding_a_problem_rounds_x_and_every_weight() {
        let cfg = LayerConfig::new(7, 16, 24, 3, 1);
        let before = problem_with_density(cfg, &uniform_density(3, 0.5), 7);
        let mut after = problem_with_density(cfg, &uniform_density(3, 0.5), 7);
        after.round_values(|v| v.signum());
        let signs = |v: &[f64]| v.iter().map(|x| x.signum()).collect::<Vec<_>>();
        assert_eq!(after.x, signs(&before.x));
        assert_eq!(after.params.router, signs(&before.params.router));
        assert_eq!(after.params.gate, signs(&before.params.gate));
        assert_eq!(after.params.up, signs(&before.params.up));
        assert_eq!(after.params.down, signs(&before.params.down));
    }
}
