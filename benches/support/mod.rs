//! What the layer benchmark (benches/layer.rs) and the report (examples/bench_report.rs)
//! share: SPEC's configurations, a problem set up at a load, the crate's layer timed with CUDA
//! events, and the cuBLAS baselines.
//!
//! Timing: CUDA events on the crate's stream around the work, after warm-up; medians. The input
//! X is rotated among 4 copies (each forward reads the next), so that repeated runs do not
//! measure a warm L2 (the expert weights are larger than L2 at every configuration but S).
//! FLOPs: 6 |A| H F forward, twice that backward (SPEC.md).
#![allow(dead_code)]

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use half::bf16;
use remoe_kernels::rng::SplitMix64;
use remoe_kernels::synthetic::{
    problem_with_density, skewed_density, uniform_density, DeviceProblem,
};
use remoe_kernels::{
    moe_backward, moe_forward, time_gpu, Coefficient, Device, DeviceTensor, Error, ForwardStats,
    LayerConfig, MoeContext, MoeGrads, RouterKind, StageTimes,
};

/// SPEC.md's benchmark configurations.
pub const CONFIGS: [(&str, LayerConfig); 5] = [
    (
        "A",
        LayerConfig {
            tokens: 16384,
            hidden: 768,
            ffn: 3072,
            experts: 8,
            k: 1,
        },
    ),
    (
        "B",
        LayerConfig {
            tokens: 16384,
            hidden: 768,
            ffn: 384,
            experts: 64,
            k: 8,
        },
    ),
    (
        "C",
        LayerConfig {
            tokens: 16384,
            hidden: 768,
            ffn: 3072,
            experts: 64,
            k: 1,
        },
    ),
    (
        "D",
        LayerConfig {
            tokens: 16384,
            hidden: 1536,
            ffn: 6144,
            experts: 8,
            k: 1,
        },
    ),
    (
        "S",
        LayerConfig {
            tokens: 512,
            hidden: 768,
            ffn: 3072,
            experts: 8,
            k: 1,
        },
    ),
];

/// The balance-loss coefficient used while timing (it does not change the work).
pub const COEFF: f64 = 1e-3;
const ROTATION: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Every expert at density k/E.
    Uniform,
    /// Expert e's share proportional to 1/(e+1), k experts per token on average.
    Skewed,
}

impl Load {
    pub fn name(self) -> &'static str {
        match self {
            Load::Uniform => "uniform",
            Load::Skewed => "skewed",
        }
    }
}

pub fn router_name(kind: RouterKind) -> &'static str {
    match kind {
        RouterKind::Relu => "ReMoE",
        RouterKind::TopK => "TopK",
    }
}

fn cublas_err(e: impl std::fmt::Debug) -> Error {
    Error::Driver(format!("cuBLAS: {e:?}"))
}

/// One configuration at one load, on the device, with everything a timed run needs.
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
    inference: MoeContext<bf16>,
    training: MoeContext<bf16>,
}

impl Setup {
    pub fn new(dev: &Device, cfg: LayerConfig, load: Load) -> Result<Self, Error> {
        let (t, h, f, e, k) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts, cfg.k);
        let density = match load {
            Load::Uniform => uniform_density(e, k as f64 / e as f64),
            Load::Skewed => skewed_density(e, k as f64),
        };
        let p = problem_with_density(cfg, &density, 0x5eed ^ (t * e) as u64);
        let weights = DeviceProblem::upload(dev, &p)?;
        // Further copies of X: the same rows in another order keep the routing's statistics.
        let mut xs = Vec::with_capacity(ROTATION);
        for r in 0..ROTATION {
            let host: Vec<bf16> = (0..t * h)
                .map(|i| {
                    let (ti, c) = (i / h, i % h);
                    bf16::from_f64(p.x[((ti + r * 7919) % t) * h + c])
                })
                .collect();
            xs.push(DeviceTensor::from_host(dev, &host, &[t, h])?);
        }
        let mut rng = SplitMix64::new(0xd0);
        let dout_host: Vec<bf16> = (0..t * h)
            .map(|_| bf16::from_f64(rng.range(-1.0, 1.0)))
            .collect();
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
            inference: MoeContext::new(dev),
            training: MoeContext::for_training(dev),
        })
    }

    fn rotate(&mut self) -> usize {
        let i = self.next_x;
        self.next_x = (self.next_x + 1) % ROTATION;
        i
    }

    /// One inference forward (the next X of the rotation).
    pub fn forward(&mut self, kind: RouterKind) -> Result<ForwardStats, Error> {
        let i = self.rotate();
        moe_forward(
            &mut self.inference,
            &self.cfg,
            kind,
            Coefficient::Fixed(COEFF),
            &self.xs[i],
            &self.weights.weights(),
            &mut self.out,
        )
    }

    /// One training forward and backward.
    pub fn forward_backward(&mut self, kind: RouterKind) -> Result<(), Error> {
        let i = self.rotate();
        let w = self.weights.weights();
        moe_forward(
            &mut self.training,
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
            &mut self.training,
            Coefficient::Fixed(COEFF),
            &self.xs[i],
            &w,
            &self.dout,
            grads,
            false,
        )
    }

    /// Median forward time (ms) over `iters` runs after `warmup`.
    pub fn time_forward(
        &mut self,
        kind: RouterKind,
        warmup: usize,
        iters: usize,
    ) -> Result<f64, Error> {
        let dev = self.dev.clone();
        Ok(time_gpu(&dev, warmup, iters, || self.forward(kind).map(|_| ()))?.median_ms())
    }

    /// Median forward+backward time (ms).
    pub fn time_forward_backward(
        &mut self,
        kind: RouterKind,
        warmup: usize,
        iters: usize,
    ) -> Result<f64, Error> {
        let dev = self.dev.clone();
        Ok(time_gpu(&dev, warmup, iters, || self.forward_backward(kind))?.median_ms())
    }

    /// Bytes the training forward saved for the backward, per token (after a forward_backward).
    pub fn saved_bytes_per_token(&self) -> f64 {
        self.training.saved_bytes() as f64 / self.cfg.tokens.max(1) as f64
    }

    /// Per-stage forward times: each stage's median over `runs` stage-timed forwards.
    pub fn stage_times(&mut self, kind: RouterKind, runs: usize) -> Result<StageTimes, Error> {
        self.inference.set_stage_timing(true);
        let mut all = Vec::with_capacity(runs);
        for _ in 0..runs {
            self.forward(kind)?;
            all.push(self.inference.stage_times().expect("stage timing is on"));
        }
        self.inference.set_stage_timing(false);
        let med = |f: fn(&StageTimes) -> f64| {
            let mut v: Vec<f64> = all.iter().map(f).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        Ok(StageTimes {
            router_ms: med(|s| s.router_ms),
            stats_and_sync_ms: med(|s| s.stats_and_sync_ms),
            compaction_ms: med(|s| s.compaction_ms),
            up_ms: med(|s| s.up_ms),
            down_ms: med(|s| s.down_ms),
            combine_ms: med(|s| s.combine_ms),
        })
    }
}

/// Row-major C[m, n] = A[m, k] B[k, n] through column-major cuBLAS (C^T = B^T A^T), with leading
/// dimensions of the row-major views.
#[allow(clippy::too_many_arguments)]
fn gemm_rm(
    blas: &CudaBlas,
    m: usize,
    n: usize,
    k: usize,
    a: &CudaView<bf16>,
    lda: usize,
    b: &CudaView<bf16>,
    ldb: usize,
    c: &mut CudaViewMut<bf16>,
    ldc: usize,
) -> Result<(), Error> {
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: bf16::ONE,
        lda: ldb as i32,
        ldb: lda as i32,
        beta: bf16::ZERO,
        ldc: ldc as i32,
    };
    // SAFETY: the views hold at least (rows - 1) * ld + cols elements for each operand, as the
    // callers size them below.
    unsafe { blas.gemm(cfg, b, a, c) }.map_err(cublas_err)
}

/// The cuBLAS baselines for one configuration: (a) the MoE-free floor, one dense GEMM pair of
/// the same FLOPs as |A| routed rows (X [|A|, H] x [H, 2F], then [|A|, F] x [F, H]); (b) the
/// per-expert GEMM loop a Rust user would write today: for each expert, gate and up GEMMs on
/// its (already permuted) rows and the down GEMM: 3 E cuBLAS calls. (b) leaves out the gather,
/// the SwiGLU and the combine, so it is a lower bound of that approach.
pub struct CublasBaselines {
    blas: CudaBlas,
    cfg: LayerConfig,
    rows: usize,
    a: CudaSlice<bf16>,
    w1: CudaSlice<bf16>,
    w2: CudaSlice<bf16>,
    mid: CudaSlice<bf16>,
    out: CudaSlice<bf16>,
}

impl CublasBaselines {
    /// Buffers for `rows` routed rows (random values: never time on zeros).
    pub fn new(dev: &Device, cfg: LayerConfig, rows: usize) -> Result<Self, Error> {
        let (h, f) = (cfg.hidden, cfg.ffn);
        let blas = CudaBlas::new(dev.stream().clone()).map_err(cublas_err)?;
        let mut rng = SplitMix64::new(0xb1a5);
        let mut rand = |n: usize, s: f64| -> Result<CudaSlice<bf16>, Error> {
            let v: Vec<bf16> = (0..n).map(|_| bf16::from_f64(rng.range(-s, s))).collect();
            Ok(dev.stream().clone_htod(&v)?)
        };
        let rows = rows.max(1);
        Ok(Self {
            a: rand(rows * h.max(f), 1.0)?,
            w1: rand(h * 2 * f, (3.0 / h as f64).sqrt())?,
            w2: rand(f * h, (3.0 / f as f64).sqrt())?,
            mid: rand(rows * 2 * f, 1.0)?,
            out: rand(rows * h, 1.0)?,
            blas,
            cfg,
            rows,
        })
    }

    /// (a) The dense pair on all `rows`.
    pub fn dense_pair(&mut self) -> Result<(), Error> {
        let (h, f, r) = (self.cfg.hidden, self.cfg.ffn, self.rows);
        gemm_rm(
            &self.blas,
            r,
            2 * f,
            h,
            &self.a.slice(..),
            h,
            &self.w1.slice(..),
            2 * f,
            &mut self.mid.slice_mut(..),
            2 * f,
        )?;
        gemm_rm(
            &self.blas,
            r,
            h,
            f,
            &self.mid.slice(..),
            2 * f,
            &self.w2.slice(..),
            h,
            &mut self.out.slice_mut(..),
            h,
        )
    }

    /// (b) The per-expert loop over the experts' row counts, with the layer's own weights.
    pub fn per_expert_loop(&mut self, counts: &[u32], w: &DeviceProblem) -> Result<(), Error> {
        let (h, f) = (self.cfg.hidden, self.cfg.ffn);
        let (wg, wu, wd) = (w.gate.cuda_slice(), w.up.cuda_slice(), w.down.cuda_slice());
        let mut off = 0usize;
        for (e, &n) in counts.iter().enumerate() {
            let n = n as usize;
            if n == 0 {
                continue;
            }
            assert!(
                off + n <= self.rows,
                "baseline buffers sized for fewer rows"
            );
            let a = self.a.slice(off * h..(off + n) * h);
            let we = e * h * f..(e + 1) * h * f;
            // gate and up: [n, H] x [H, F] each, into the two halves of mid's rows.
            let mut g = self.mid.slice_mut(off * 2 * f..(off + n) * 2 * f);
            gemm_rm(
                &self.blas,
                n,
                f,
                h,
                &a,
                h,
                &wg.slice(we.clone()),
                f,
                &mut g,
                2 * f,
            )?;
            let mut u = self.mid.slice_mut(off * 2 * f + f..(off + n) * 2 * f);
            gemm_rm(
                &self.blas,
                n,
                f,
                h,
                &a,
                h,
                &wu.slice(we.clone()),
                f,
                &mut u,
                2 * f,
            )?;
            // down: [n, F] x [F, H].
            let act = self.mid.slice(off * 2 * f..(off + n) * 2 * f);
            let mut y = self.out.slice_mut(off * h..(off + n) * h);
            gemm_rm(
                &self.blas,
                n,
                h,
                f,
                &act,
                2 * f,
                &wd.slice(we),
                h,
                &mut y,
                h,
            )?;
            off += n;
        }
        Ok(())
    }
}

/// Everything measured for one (configuration, load, router).
#[derive(Debug, Clone)]
pub struct Row {
    pub config: &'static str,
    pub load: Load,
    pub router: RouterKind,
    pub density: f64,
    pub pairs: usize,
    pub max_expert_tokens: u32,
    pub fwd_ms: f64,
    pub fwd_bwd_ms: f64,
    pub stages: StageTimes,
    /// cuBLAS dense pair of the same FLOPs (forward), ms.
    pub dense_floor_ms: f64,
    /// cuBLAS per-expert loop (forward GEMMs only), ms.
    pub per_expert_ms: f64,
    pub saved_bytes_per_token: f64,
    pub hidden: usize,
    pub ffn: usize,
}

impl Row {
    pub fn fwd_flops(&self) -> f64 {
        6.0 * self.pairs as f64 * self.hidden as f64 * self.ffn as f64
    }
    pub fn fwd_tflops(&self) -> f64 {
        self.fwd_flops() / (self.fwd_ms * 1e-3) / 1e12
    }
    pub fn fwd_bwd_tflops(&self) -> f64 {
        3.0 * self.fwd_flops() / (self.fwd_bwd_ms * 1e-3) / 1e12
    }
    /// The floor's time over the layer's: 1.0 would be as fast as the MoE-free dense pair.
    pub fn floor_fraction(&self) -> f64 {
        self.dense_floor_ms / self.fwd_ms
    }
    pub fn json(&self, device: &str) -> serde_json::Value {
        let s = &self.stages;
        serde_json::json!({
            "device": device,
            "config": self.config,
            "load": self.load.name(),
            "router": router_name(self.router),
            "density": self.density,
            "active_pairs": self.pairs,
            "max_expert_tokens": self.max_expert_tokens,
            "forward_ms": self.fwd_ms,
            "forward_tflops": self.fwd_tflops(),
            "forward_backward_ms": self.fwd_bwd_ms,
            "forward_backward_tflops": self.fwd_bwd_tflops(),
            "dense_floor_ms": self.dense_floor_ms,
            "dense_floor_tflops": self.fwd_flops() / (self.dense_floor_ms * 1e-3) / 1e12,
            "fraction_of_dense_floor": self.floor_fraction(),
            "per_expert_cublas_ms": self.per_expert_ms,
            "per_expert_cublas_tflops": self.fwd_flops() / (self.per_expert_ms * 1e-3) / 1e12,
            "saved_for_backward_bytes_per_token": self.saved_bytes_per_token,
            "stages_ms": {
                "router": s.router_ms,
                "stats_and_sync": s.stats_and_sync_ms,
                "compaction": s.compaction_ms,
                "up": s.up_ms,
                "down": s.down_ms,
                "combine": s.combine_ms,
            },
        })
    }
}

/// Measures one configuration at one load for both routers (same weights, same X).
pub fn measure(
    dev: &Device,
    name: &'static str,
    cfg: LayerConfig,
    load: Load,
    iters: usize,
) -> Result<Vec<Row>, Error> {
    let mut setup = Setup::new(dev, cfg, load)?;
    let mut rows = Vec::new();
    for kind in [RouterKind::Relu, RouterKind::TopK] {
        let stats = setup.forward(kind)?;
        let fwd_ms = setup.time_forward(kind, 5, iters)?;
        let fwd_bwd_ms = setup.time_forward_backward(kind, 3, iters)?;
        let stages = setup.stage_times(kind, 7)?;
        let mut blas = CublasBaselines::new(dev, cfg, stats.active_pairs)?;
        let dense_floor_ms = time_gpu(dev, 5, iters, || blas.dense_pair())?.median_ms();
        let per_expert_ms = time_gpu(dev, 5, iters, || {
            blas.per_expert_loop(&stats.tokens_per_expert, &setup.weights)
        })?
        .median_ms();
        rows.push(Row {
            config: name,
            load,
            router: kind,
            density: 1.0 - stats.sparsity,
            pairs: stats.active_pairs,
            max_expert_tokens: stats.tokens_per_expert.iter().copied().max().unwrap_or(0),
            fwd_ms,
            fwd_bwd_ms,
            stages,
            dense_floor_ms,
            per_expert_ms,
            saved_bytes_per_token: setup.saved_bytes_per_token(),
            hidden: cfg.hidden,
            ffn: cfg.ffn,
        });
    }
    Ok(rows)
}
