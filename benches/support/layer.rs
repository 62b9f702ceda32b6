//! A configuration's problem on the device, and the layer run on each GEMM path.

use half::bf16;
use remoe_kernels::{
    moe_backward, moe_forward, Coefficient, Device, DeviceTensor, Error, ForwardStats, GemmPath,
    HostDispatch, LayerConfig, MoeContext, MoeGrads, RouterKind, SmallBatch, StageTimes,
};
use remoe_testkit::rng::{seeded, Rng};
use remoe_testkit::synthetic::{
    problem_with_density, skewed_density, uniform_density, DeviceProblem, HostProblem,
};

use super::{time_interleaved, Load, Timing, COEFF, X_COPIES};

/// The contexts of one GEMM path.
struct PathContexts {
    path: GemmPath,
    inference: MoeContext<bf16>,
    training: MoeContext<bf16>,
}

/// The problem of one configuration at one load (the seed does not depend on the load, so the
/// two loads differ only in the router's threshold row).
pub fn host_problem(cfg: LayerConfig, load: Load) -> HostProblem {
    let (t, e, k) = (cfg.tokens, cfg.experts, cfg.k);
    let density = match load {
        Load::Uniform => uniform_density(e, k as f64 / e as f64),
        Load::Skewed => skewed_density(e, k as f64),
    };
    problem_with_density(cfg, &density, 0x5eed ^ (t * e) as u64)
}

/// One configuration at one load, on the device, with everything a timed run needs: the
/// weights, 4 copies of X, dOut, the gradient buffers, and an inference and a training context
/// per GEMM path.
pub struct Setup {
    pub dev: Device,
    pub cfg: LayerConfig,
    pub load: Load,
    xs: Vec<DeviceTensor<bf16>>,
    next_x: usize,
    pub weights: DeviceProblem,
    dout: DeviceTensor<bf16>,
    out: DeviceTensor<bf16>,
    dx: DeviceTensor<bf16>,
    dwr: DeviceTensor<f32>,
    dwg: DeviceTensor<f32>,
    dwu: DeviceTensor<f32>,
    dwd: DeviceTensor<f32>,
    contexts: Vec<PathContexts>,
}

impl Setup {
    pub fn new(
        dev: &Device,
        cfg: LayerConfig,
        load: Load,
        paths: &[GemmPath],
    ) -> Result<Self, Error> {
        Self::from_problem(dev, &host_problem(cfg, load), load, paths)
    }

    pub fn from_problem(
        dev: &Device,
        p: &HostProblem,
        load: Load,
        paths: &[GemmPath],
    ) -> Result<Self, Error> {
        let cfg = p.cfg;
        let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
        let weights = DeviceProblem::upload(dev, p)?;
        // Further copies of X: the same rows in another order keep the routing's statistics.
        let mut xs = Vec::with_capacity(X_COPIES);
        for r in 0..X_COPIES {
            let host: Vec<bf16> = (0..t * h)
                .map(|i| {
                    let (ti, c) = (i / h, i % h);
                    bf16::from_f64(p.x[((ti + r * 7919) % t) * h + c])
                })
                .collect();
            xs.push(DeviceTensor::from_host(dev, &host, &[t, h])?);
        }
        let mut rng = seeded(0xd0);
        let dout_host: Vec<bf16> = (0..t * h)
            .map(|_| bf16::from_f64(rng.random_range(-1.0..1.0)))
            .collect();
        let mut contexts = Vec::with_capacity(paths.len());
        for &path in paths {
            let mut inference = MoeContext::new(dev);
            inference.set_gemm_path(path)?;
            // The multi-kernel chain on this GEMM path at every T: the small-batch kernel,
            // which `SmallBatch::Auto` would take at decode sizes, has one GEMM of its own.
            inference.set_small_batch(SmallBatch::Off)?;
            let mut training = MoeContext::for_training(dev);
            training.set_gemm_path(path)?;
            contexts.push(PathContexts {
                path,
                inference,
                training,
            });
        }
        Ok(Self {
            dev: dev.clone(),
            cfg,
            load,
            xs,
            next_x: 0,
            weights,
            dout: DeviceTensor::from_host(dev, &dout_host, &[t, h])?,
            out: DeviceTensor::zeros(dev, &[t, h])?,
            dx: DeviceTensor::zeros(dev, &[t, h])?,
            dwr: DeviceTensor::zeros(dev, &[h, e])?,
            dwg: DeviceTensor::zeros(dev, &[e, h, f])?,
            dwu: DeviceTensor::zeros(dev, &[e, h, f])?,
            dwd: DeviceTensor::zeros(dev, &[e, f, h])?,
            contexts,
        })
    }

    pub fn paths(&self) -> Vec<GemmPath> {
        self.contexts.iter().map(|c| c.path).collect()
    }

    fn slot(&self, path: GemmPath) -> usize {
        self.contexts
            .iter()
            .position(|c| c.path == path)
            .expect("this setup has no contexts for that GEMM path")
    }

    fn rotate(&mut self) -> usize {
        let i = self.next_x;
        self.next_x = (self.next_x + 1) % X_COPIES;
        i
    }

    /// One inference forward on `path` (the next X of the rotation); enqueued, nothing read
    /// back.
    pub fn forward(&mut self, kind: RouterKind, path: GemmPath) -> Result<(), Error> {
        let (i, s) = (self.rotate(), self.slot(path));
        moe_forward(
            &mut self.contexts[s].inference,
            &self.cfg,
            kind,
            Coefficient::Fixed(COEFF),
            &self.xs[i],
            &self.weights.weights(),
            &mut self.out,
        )
    }

    /// One inference forward on `path` and its routing statistics (a host read).
    pub fn forward_stats(
        &mut self,
        kind: RouterKind,
        path: GemmPath,
    ) -> Result<ForwardStats, Error> {
        self.forward(kind, path)?;
        let s = self.slot(path);
        self.contexts[s].inference.stats()
    }

    /// One training forward and backward on `path`.
    pub fn forward_backward(&mut self, kind: RouterKind, path: GemmPath) -> Result<(), Error> {
        let (i, s) = (self.rotate(), self.slot(path));
        let w = self.weights.weights();
        let ctx = &mut self.contexts[s].training;
        moe_forward(
            ctx,
            &self.cfg,
            kind,
            Coefficient::Fixed(COEFF),
            &self.xs[i],
            &w,
            &mut self.out,
        )?;
        let grads = MoeGrads {
            dx: &mut self.dx,
            router: &mut self.dwr,
            gate: &mut self.dwg,
            up: &mut self.dwu,
            down: &mut self.dwd,
        };
        moe_backward(
            ctx,
            Coefficient::Fixed(COEFF),
            &self.xs[i],
            &w,
            &self.dout,
            grads,
            false,
        )
    }

    /// ReMoE and TopK forwards on `path`, interleaved (ReMoE, TopK, ReMoE, TopK, ...):
    /// (ReMoE, TopK).
    pub fn interleaved_forward(
        &mut self,
        path: GemmPath,
        warmup: usize,
        iters: usize,
    ) -> Result<(Timing, Timing), Error> {
        let dev = self.dev.clone();
        let kinds = [RouterKind::Relu, RouterKind::TopK];
        let mut t = time_interleaved(&dev, warmup, iters, 2, |w, _| {
            self.forward(kinds[w], path).map(|_| ())
        })?;
        let topk = t.pop().unwrap();
        Ok((t.pop().unwrap(), topk))
    }

    /// ReMoE and TopK forward+backward on `path`, interleaved: (ReMoE, TopK).
    pub fn interleaved_forward_backward(
        &mut self,
        path: GemmPath,
        warmup: usize,
        iters: usize,
    ) -> Result<(Timing, Timing), Error> {
        let dev = self.dev.clone();
        let kinds = [RouterKind::Relu, RouterKind::TopK];
        let mut t = time_interleaved(&dev, warmup, iters, 2, |w, _| {
            self.forward_backward(kinds[w], path)
        })?;
        let topk = t.pop().unwrap();
        Ok((t.pop().unwrap(), topk))
    }

    /// Bytes the training forward saved for the backward, per token (after a forward_backward
    /// on `path`).
    pub fn saved_bytes_per_token(&self, path: GemmPath) -> f64 {
        let bytes = self.contexts[self.slot(path)].training.saved_bytes();
        bytes.expect("reading |A| back") as f64 / self.cfg.tokens.max(1) as f64
    }

    /// Bytes of device memory the contexts of `path` hold ([`MoeContext::workspace_bytes`]:
    /// the forward's dense [T, E] buffers, the pair buffers at their capacity, the backward's
    /// workspace), as (inference context, training context). Both routers' runs share each
    /// context, so this is the larger of their needs so far. No device access.
    pub fn workspace_bytes(&self, path: GemmPath) -> (usize, usize) {
        let c = &self.contexts[self.slot(path)];
        (c.inference.workspace_bytes(), c.training.workspace_bytes())
    }

    /// Frees the contexts' device memory (every path's); the layer cannot run on this set-up
    /// afterwards (a call that needs a context panics), its weights stay.
    pub fn release_contexts(&mut self) {
        self.contexts.clear();
    }

    /// Per-stage forward times on `path`: each stage's median over `runs` stage-timed forwards
    /// of the inference context, or of the training context (which also writes g and u, as the
    /// up projection does before a backward).
    pub fn stage_times(
        &mut self,
        kind: RouterKind,
        path: GemmPath,
        training: bool,
        runs: usize,
    ) -> Result<StageTimes, Error> {
        let s = self.slot(path);
        let mut all = Vec::with_capacity(runs);
        for _ in 0..runs {
            let i = self.rotate();
            let pc = &mut self.contexts[s];
            let ctx = if training {
                &mut pc.training
            } else {
                &mut pc.inference
            };
            ctx.set_stage_timing(true);
            let r = moe_forward(
                ctx,
                &self.cfg,
                kind,
                Coefficient::Fixed(COEFF),
                &self.xs[i],
                &self.weights.weights(),
                &mut self.out,
            );
            let times = ctx.stage_times();
            ctx.set_stage_timing(false);
            r?;
            all.push(times.expect("stage timing is on"));
        }
        let med = |f: fn(&StageTimes) -> f64| Timing::new(all.iter().map(f).collect()).median();
        Ok(StageTimes {
            router_ms: med(|s| s.router_ms),
            stats_ms: med(|s| s.stats_ms),
            compaction_ms: med(|s| s.compaction_ms),
            up_ms: med(|s| s.up_ms),
            down_ms: med(|s| s.down_ms),
            combine_ms: med(|s| s.combine_ms),
        })
    }

    /// Moves ReMoE's routed pairs onto the load's intended counts, T d_e per expert (T k in
    /// all at the uniform load, as TopK routes): the synthetic problem reaches its densities
    /// only up to sampling noise and the bf16 rounding of the threshold row (about 1% of n_e
    /// per bf16 step), which leaves ReMoE's |A| a few percent off TopK's. Each expert's
    /// threshold (row 0 of the router weight, the weight of X's constant feature) is bisected
    /// over bf16 values on measured counts (ReMoE forwards, all experts at once), and the value
    /// whose count is nearest the target kept, among those that make no more GEMM row tiles
    /// than the target would (`within_row_tiles`). Experts at density 0 or 1 keep theirs. The
    /// result is kept only if it is nearer the targets than the original. Returns |A| before
    /// and after, and the target (the sum of T d_e).
    pub fn calibrate_density(&mut self) -> Result<(usize, usize, f64), Error> {
        let (t, e, k) = (self.cfg.tokens, self.cfg.experts, self.cfg.k);
        let density = match self.load {
            Load::Uniform => uniform_density(e, k as f64 / e as f64),
            Load::Skewed => skewed_density(e, k as f64),
        };
        let target: Vec<f64> = density.iter().map(|d| d * t as f64).collect();
        let path = self.contexts[0].path;
        let original = self.weights.router.to_host()?;
        let counts = |s: &mut Self, row: &[bf16]| -> Result<Vec<u32>, Error> {
            let mut w = original.clone();
            w[..e].copy_from_slice(row);
            s.weights.router.copy_from_host(&w)?;
            Ok(s.forward_stats(RouterKind::Relu, path)?.tokens_per_expert)
        };
        let tune: Vec<bool> = density.iter().map(|&d| d > 0.0 && d < 1.0).collect();
        // A count that adds a row tile over its target's counts as missing by a whole tile.
        let miss = |i: usize, n: u32| -> f64 {
            let m = (n as f64 - target[i]).abs();
            if tune[i] && !within_row_tiles(n, target[i]) {
                m + remoe_kernels::sys::REMOE_GEMM_TILE_ROWS as f64
            } else {
                m
            }
        };
        let error = |c: &[u32]| -> f64 { c.iter().enumerate().map(|(i, &n)| miss(i, n)).sum() };
        // bf16 values in order: their bit patterns mapped to increasing integers.
        let key = |b: bf16| {
            let x = b.to_bits();
            if x & 0x8000 != 0 {
                !x
            } else {
                x | 0x8000
            }
        };
        let value = |k: u16| bf16::from_bits(if k & 0x8000 != 0 { k & 0x7fff } else { !k });
        let start: Vec<bf16> = original[..e].to_vec();
        let before = counts(self, &start)?;
        // Bounds far outside the logit noise (sigma about 1/3): density 0 and 1.
        let (mut lo, mut hi) = (
            vec![key(bf16::from_f64(-4.0)); e],
            vec![key(bf16::from_f64(4.0)); e],
        );
        let mut best: Vec<(f64, bf16)> = (0..e).map(|i| (miss(i, before[i]), start[i])).collect();
        while (0..e).any(|i| tune[i] && hi[i] - lo[i] > 1) {
            let mid: Vec<u16> = (0..e).map(|i| lo[i] + (hi[i] - lo[i]) / 2).collect();
            let row: Vec<bf16> = (0..e)
                .map(|i| if tune[i] { value(mid[i]) } else { start[i] })
                .collect();
            let c = counts(self, &row)?;
            for i in (0..e).filter(|&i| tune[i]) {
                let m = miss(i, c[i]);
                if m < best[i].0 {
                    best[i] = (m, row[i]);
                }
                if (c[i] as f64) < target[i] {
                    lo[i] = mid[i];
                } else {
                    hi[i] = mid[i];
                }
            }
        }
        let row: Vec<bf16> = best.iter().map(|b| b.1).collect();
        let after = counts(self, &row)?;
        let sum = |c: &[u32]| c.iter().map(|&n| n as usize).sum::<usize>();
        let goal = target.iter().sum();
        if error(&after) > error(&before) {
            counts(self, &start)?;
            return Ok((sum(&before), sum(&before), goal));
        }
        Ok((sum(&before), sum(&after), goal))
    }

    /// The dispatch lists of a forward with `kind` (the routing the expert GEMMs run on).
    pub fn dispatch(&mut self, kind: RouterKind, path: GemmPath) -> Result<HostDispatch, Error> {
        self.forward(kind, path)?;
        self.contexts[self.slot(path)].inference.dispatch_to_host()
    }
}

/// Whether n pairs need no more GEMM row tiles than the target count: a calibrated count one pair
/// over a multiple of the tile (2049 for 2048) would add a nearly empty tile, and a tile costs its
/// whole weight stream however few rows it holds. At config A that one extra tile per expert
/// pushed ReMoE's down projection from 3 to 4 waves of work units (164 against TopK's 128 us at
/// 7 more pairs in 16384), which measures the tiling, not the routing.
fn within_row_tiles(n: u32, target: f64) -> bool {
    let tile = remoe_kernels::sys::REMOE_GEMM_TILE_ROWS as f64;
    (n as f64 / tile).ceil() <= (target.round() / tile).ceil()
}
