//! What the report measures for one configuration, and the rows it prints and writes.
//!
//! A failure (an error or a panic) ends only the part of a configuration it happened in: one
//! GEMM path's layer timings, the cuBLAS floors, the expert GEMMs, or a whole load when its
//! set-up fails. It becomes a [`Failure`] row and the report goes on.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use remoe_kernels::{Device, Error, GemmPath, LayerConfig, RouterKind, StageTimes};
use remoe_testkit::synthetic::HostProblem;

use super::{
    router_name, time_interleaved, DenseGemms, Filler, GemmKind, GroupedGemms, Load, Setup, Shape,
    Timing,
};

/// How long and what to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Timed runs per figure (after warm-up).
    pub iters: usize,
    /// Untimed warm-up rounds before the layer loops.
    pub warmup: usize,
    pub paths: Vec<GemmPath>,
    /// Also time each expert GEMM alone against cuBLAS (uniform load, ReMoE routing).
    pub gemms: bool,
    /// Stage-timed forwards per stage table.
    pub stage_runs: usize,
    /// Untimed rounds before each expert GEMM loop.
    pub gemm_warmup: usize,
    /// Calibrate ReMoE's threshold row to the intended counts ([`Setup::calibrate_density`]).
    pub calibrate: bool,
}

/// The layer at one (configuration, load, router, GEMM path). The ReMoE and TopK rows of one
/// (configuration, load, path) come from one interleaved loop; the floors of a (configuration,
/// load, router) are shared by its paths' rows (one measurement, at that router's |A|).
#[derive(Debug, Clone)]
pub struct LayerRow {
    pub config: String,
    pub load: Load,
    pub router: RouterKind,
    pub path: GemmPath,
    pub density: f64,
    pub pairs: usize,
    pub max_expert_tokens: u32,
    pub fwd: Timing,
    pub fwd_bwd: Timing,
    /// Inference forward stages, medians.
    pub stages: StageTimes,
    /// cuBLAS dense forward pair of the same FLOPs.
    pub floor_fwd: Timing,
    /// cuBLAS dense training step (that pair and its four backward GEMMs) of the same FLOPs.
    pub floor_fwd_bwd: Timing,
    /// cuBLAS per-expert loop (forward GEMMs only).
    pub per_expert: Timing,
    pub saved_bytes_per_token: f64,
    pub cfg: LayerConfig,
    /// ReMoE: |A| of the synthetic problem before [`Setup::calibrate_density`], when it ran.
    pub pairs_before_calibration: Option<usize>,
    /// Device memory the path's contexts hold after the measurements
    /// ([`remoe_kernels::MoeContext::workspace_bytes`]; shared by the ReMoE and TopK runs):
    /// the inference context's and the training context's.
    pub inference_workspace_bytes: usize,
    pub training_workspace_bytes: usize,
}

impl LayerRow {
    pub fn fwd_flops(&self) -> f64 {
        6.0 * self.pairs as f64 * self.cfg.hidden as f64 * self.cfg.ffn as f64
    }
    pub fn fwd_tflops(&self) -> f64 {
        self.fwd.tflops(self.fwd_flops())
    }
    pub fn fwd_bwd_tflops(&self) -> f64 {
        self.fwd_bwd.tflops(3.0 * self.fwd_flops())
    }
    /// The floor's time over the layer's (medians; = layer throughput / floor throughput, the
    /// FLOPs being equal): 1.0 would be as fast as the MoE-free dense pair.
    pub fn floor_fraction(&self) -> f64 {
        self.floor_fwd.median() / self.fwd.median()
    }
    pub fn floor_fraction_fwd_bwd(&self) -> f64 {
        self.floor_fwd_bwd.median() / self.fwd_bwd.median()
    }
    pub fn json(&self, device: &str) -> serde_json::Value {
        let s = &self.stages;
        let f = self.fwd_flops();
        let mut v = serde_json::json!({
            "device": device,
            "status": "ok",
            "config": self.config,
            "load": self.load.name(),
            "router": router_name(self.router),
            "path": self.path.name(),
            "tokens": self.cfg.tokens,
            "hidden": self.cfg.hidden,
            "ffn": self.cfg.ffn,
            "experts": self.cfg.experts,
            "k": self.cfg.k,
            "density": self.density,
            "active_pairs": self.pairs,
            "max_expert_tokens": self.max_expert_tokens,
            "active_pairs_before_calibration": self.pairs_before_calibration,
            "runs": self.fwd.runs(),
        });
        let layer = serde_json::json!({
            "forward_ms": self.fwd.median(),
            "forward_min_ms": self.fwd.min(),
            "forward_max_ms": self.fwd.max(),
            "forward_tflops": self.fwd_tflops(),
            "forward_backward_ms": self.fwd_bwd.median(),
            "forward_backward_min_ms": self.fwd_bwd.min(),
            "forward_backward_max_ms": self.fwd_bwd.max(),
            "forward_backward_tflops": self.fwd_bwd_tflops(),
        });
        let floors = serde_json::json!({
            "dense_floor_ms": self.floor_fwd.median(),
            "dense_floor_min_ms": self.floor_fwd.min(),
            "dense_floor_max_ms": self.floor_fwd.max(),
            "dense_floor_tflops": self.floor_fwd.tflops(f),
            "fraction_of_dense_floor": self.floor_fraction(),
            "dense_floor_forward_backward_ms": self.floor_fwd_bwd.median(),
            "dense_floor_forward_backward_min_ms": self.floor_fwd_bwd.min(),
            "dense_floor_forward_backward_max_ms": self.floor_fwd_bwd.max(),
            "dense_floor_forward_backward_tflops": self.floor_fwd_bwd.tflops(3.0 * f),
            "fraction_of_dense_floor_forward_backward": self.floor_fraction_fwd_bwd(),
        });
        let rest = serde_json::json!({
            "per_expert_cublas_ms": self.per_expert.median(),
            "per_expert_cublas_tflops": self.per_expert.tflops(f),
            "saved_for_backward_bytes_per_token": self.saved_bytes_per_token,
            "inference_context_workspace_bytes": self.inference_workspace_bytes,
            "training_context_workspace_bytes": self.training_workspace_bytes,
            "stages_ms": {
                "router": s.router_ms,
                "stats": s.stats_ms,
                "compaction": s.compaction_ms,
                "up": s.up_ms,
                "down": s.down_ms,
                "combine": s.combine_ms,
            },
        });
        for part in [layer, floors, rest] {
            if let (Some(o), serde_json::Value::Object(p)) = (v.as_object_mut(), part) {
                o.extend(p);
            }
        }
        v
    }
}

/// ReMoE against TopK at one (configuration, load, path), from one interleaved loop.
pub struct Comparison<'a> {
    pub remoe: &'a LayerRow,
    pub topk: &'a LayerRow,
}

impl Comparison<'_> {
    /// ReMoE's routed pairs over TopK's, minus 1.
    pub fn pairs_diff(&self) -> f64 {
        self.remoe.pairs as f64 / self.topk.pairs as f64 - 1.0
    }
    /// ReMoE's tokens/s over TopK's, minus 1 (> 0: ReMoE faster), at the medians.
    pub fn tokens_diff(t_remoe: &Timing, t_topk: &Timing) -> f64 {
        t_topk.median() / t_remoe.median() - 1.0
    }
    pub fn fwd_diff(&self) -> f64 {
        Self::tokens_diff(&self.remoe.fwd, &self.topk.fwd)
    }
    pub fn fwd_bwd_diff(&self) -> f64 {
        Self::tokens_diff(&self.remoe.fwd_bwd, &self.topk.fwd_bwd)
    }
    /// The same per routed pair (TFLOP/s ratio minus 1).
    pub fn fwd_per_pair_diff(&self) -> f64 {
        (1.0 + self.fwd_diff()) * (1.0 + self.pairs_diff()) - 1.0
    }
    pub fn fwd_bwd_per_pair_diff(&self) -> f64 {
        (1.0 + self.fwd_bwd_diff()) * (1.0 + self.pairs_diff()) - 1.0
    }
    /// Equal routed pairs: within 1%.
    pub fn equal_pairs(&self) -> bool {
        self.pairs_diff().abs() <= 0.01
    }
    pub fn json(&self) -> serde_json::Value {
        let (re, tk) = (self.remoe, self.topk);
        serde_json::json!({
            "config": re.config,
            "load": re.load.name(),
            "path": re.path.name(),
            "remoe_pairs": re.pairs,
            "topk_pairs": tk.pairs,
            "pairs_diff": self.pairs_diff(),
            "equal_pairs": self.equal_pairs(),
            "interleaved_runs": re.fwd.runs(),
            "forward": {
                "remoe": re.fwd.json(),
                "topk": tk.fwd.json(),
                "remoe_tokens_per_s_vs_topk": self.fwd_diff(),
                "remoe_per_pair_vs_topk": self.fwd_per_pair_diff(),
            },
            "forward_backward": {
                "remoe": re.fwd_bwd.json(),
                "topk": tk.fwd_bwd.json(),
                "remoe_tokens_per_s_vs_topk": self.fwd_bwd_diff(),
                "remoe_per_pair_vs_topk": self.fwd_bwd_per_pair_diff(),
            },
        })
    }
}

/// The ReMoE/TopK pairs among `rows` (ordered as `measure_config` emits them).
pub fn comparisons(rows: &[LayerRow]) -> Vec<Comparison<'_>> {
    let mut out = Vec::new();
    for re in rows.iter().filter(|r| r.router == RouterKind::Relu) {
        if let Some(tk) = rows.iter().find(|r| {
            r.router == RouterKind::TopK
                && r.config == re.config
                && r.load == re.load
                && r.path == re.path
        }) {
            out.push(Comparison {
                remoe: re,
                topk: tk,
            });
        }
    }
    out
}

/// What a row of the expert-GEMM table times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmRowKind {
    /// One expert GEMM as the layer launches it, on each path.
    Gemm(GemmKind),
    /// The Hopper path's X row gather before dWg/dWu (which the layer runs where F > 512).
    GatherX,
    /// The Hopper path's two ways of dWg+dWu, interleaved in one loop with cuBLAS's: X's rows
    /// gathered once, then both GEMMs (the layer's way where F > 512) ...
    DWguGatheredFirst,
    /// ... and the same GEMMs reading X through the pair rows in their mainloop, no gather (the
    /// layer's way at F <= 512; gemm.rs, HOPPER_WG_GATHER_MAX_FFN).
    DWguGatheringInKernel,
}

impl GemmRowKind {
    /// The GEMM whose shape and FLOPs the row has, if any.
    pub fn gemm(self) -> Option<GemmKind> {
        match self {
            GemmRowKind::Gemm(k) => Some(k),
            GemmRowKind::GatherX => None,
            GemmRowKind::DWguGatheredFirst | GemmRowKind::DWguGatheringInKernel => {
                Some(GemmKind::DWgu)
            }
        }
    }
}

/// One expert GEMM of the layer at one configuration (uniform load, the ReMoE router's
/// routing), timed alone on each path and against the same-shape dense cuBLAS GEMM, all
/// interleaved in one loop; or the Hopper path's X gather, or one of the dWg+dWu experiment's
/// two ways (`GemmRowKind`).
#[derive(Debug, Clone)]
pub struct GemmRow {
    pub config: String,
    pub kind: GemmRowKind,
    pub pairs: usize,
    pub cfg: LayerConfig,
    pub ours: Vec<(GemmPath, Timing)>,
    pub cublas: Option<Timing>,
    /// The forward GEMMs' medians inside the layer (stage timing of a training forward).
    pub in_layer: Vec<(GemmPath, f64)>,
    /// (copies, total bytes) of our inputs' rotation, and of cuBLAS's.
    pub rotation: (usize, usize),
    pub cublas_rotation: Option<(usize, usize)>,
}

impl GemmRow {
    pub fn name(&self) -> &'static str {
        match self.kind {
            GemmRowKind::Gemm(k) => k.name(),
            GemmRowKind::GatherX => "X gather (Hopper dW)",
            GemmRowKind::DWguGatheredFirst => "dWgu: gather, GEMMs",
            GemmRowKind::DWguGatheringInKernel => "dWgu: gathering",
        }
    }
    pub fn key(&self) -> &'static str {
        match self.kind {
            GemmRowKind::Gemm(k) => k.key(),
            GemmRowKind::GatherX => "gather_x",
            GemmRowKind::DWguGatheredFirst => "dwg_dwu_gathered_first",
            GemmRowKind::DWguGatheringInKernel => "dwg_dwu_gathering_in_kernel",
        }
    }
    /// The shape (M, N, K, calls) of the row's GEMM, if it has one.
    pub fn shape(&self) -> Option<(usize, usize, usize, usize)> {
        self.kind.gemm().map(|k| k.shape(&self.cfg, self.pairs))
    }
    pub fn flops(&self) -> f64 {
        self.kind
            .gemm()
            .map_or(0.0, |k| k.flops(&self.cfg, self.pairs))
    }
    pub fn ours(&self, path: GemmPath) -> Option<&Timing> {
        self.ours.iter().find(|(p, _)| *p == path).map(|(_, t)| t)
    }
    /// cuBLAS time over ours (medians): >= 1 means as fast as cuBLAS.
    pub fn ratio(&self, path: GemmPath) -> Option<f64> {
        Some(self.cublas.as_ref()?.median() / self.ours(path)?.median())
    }
    pub fn json(&self) -> serde_json::Value {
        let shape = self.shape();
        let mut paths = serde_json::Map::new();
        for (p, t) in &self.ours {
            let mut v = t.json();
            v["tflops"] = serde_json::json!(t.tflops(self.flops()));
            v["cublas_over_ours"] = serde_json::json!(self.ratio(*p));
            v["in_layer_ms"] =
                serde_json::json!(self.in_layer.iter().find(|(q, _)| q == p).map(|(_, ms)| ms));
            paths.insert(p.name().to_string(), v);
        }
        serde_json::json!({
            "config": self.config,
            "gemm": self.key(),
            "name": self.name(),
            "load": "uniform",
            "router": "ReMoE",
            "active_pairs": self.pairs,
            "m": shape.map(|s| s.0),
            "n": shape.map(|s| s.1),
            "k": shape.map(|s| s.2),
            "calls": shape.map(|s| s.3),
            "flops": self.flops(),
            "paths": paths,
            "cublas": self.cublas.as_ref().map(|t| {
                let mut v = t.json();
                v["tflops"] = serde_json::json!(t.tflops(self.flops()));
                v
            }),
            "rotation_copies": self.rotation.0,
            "rotation_bytes": self.rotation.1,
            "cublas_rotation_copies": self.cublas_rotation.map(|r| r.0),
            "cublas_rotation_bytes": self.cublas_rotation.map(|r| r.1),
        })
    }
}

/// A part of one configuration that failed: what was being measured and the error (or the
/// panic's message). The report records it as a FAILED row and goes on.
#[derive(Debug, Clone)]
pub struct Failure {
    pub config: String,
    pub cfg: LayerConfig,
    /// The load being measured (None: before either, e.g. making the inputs).
    pub load: Option<Load>,
    /// The GEMM path whose part failed (None: every path of that load, or a part of no path).
    pub path: Option<GemmPath>,
    /// What was being measured: "inputs", "setup", "calibration", "routing", "layer",
    /// "cuBLAS floors" or "expert GEMMs".
    pub stage: &'static str,
    pub error: String,
}

impl Failure {
    pub fn new(
        shape: &Shape,
        load: Option<Load>,
        path: Option<GemmPath>,
        stage: &'static str,
        error: String,
    ) -> Self {
        Self {
            config: shape.name.clone(),
            cfg: shape.cfg,
            load,
            path,
            stage,
            error,
        }
    }

    pub fn load_name(&self) -> &'static str {
        self.load.map_or("-", |l| l.name())
    }

    pub fn path_name(&self) -> &'static str {
        self.path.map_or("all", |p| p.name())
    }

    /// A row of the JSON's `layer` array, with `"status": "FAILED"` and the error.
    pub fn json(&self, device: &str) -> serde_json::Value {
        serde_json::json!({
            "device": device,
            "status": "FAILED",
            "config": self.config,
            "load": self.load.map(|l| l.name()),
            "router": null,
            "path": self.path.map(|p| p.name()),
            "tokens": self.cfg.tokens,
            "hidden": self.cfg.hidden,
            "ffn": self.cfg.ffn,
            "experts": self.cfg.experts,
            "k": self.cfg.k,
            "stage": self.stage,
            "error": self.error,
        })
    }
}

/// The text of a caught panic's payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".into()
    }
}

/// What the report measured of some configurations, and what failed.
#[derive(Debug, Default)]
pub struct Measured {
    pub rows: Vec<LayerRow>,
    pub gemms: Vec<GemmRow>,
    pub failures: Vec<Failure>,
}

impl Measured {
    pub fn extend(&mut self, other: Measured) {
        self.rows.extend(other.rows);
        self.gemms.extend(other.gemms);
        self.failures.extend(other.failures);
    }
}

/// Measures one configuration: for each load, the layer on each path (ReMoE and TopK
/// interleaved), the floors, the stages, the contexts' memory; and at the uniform load each
/// expert GEMM alone. `problems` are the host problems of the loads to run. Never fails: what
/// fails (an error or a panic) is recorded in the result's `failures`, and the rest goes on.
pub fn measure_config(
    dev: &Device,
    shape: &Shape,
    problems: &[(Load, HostProblem)],
    opts: &Options,
) -> Measured {
    let mut out = Measured::default();
    for (load, problem) in problems {
        let stage = Cell::new("setup");
        let result = catch_unwind(AssertUnwindSafe(|| {
            measure_load(dev, shape, *load, problem, opts, &stage, &mut out)
        }));
        let error = match result {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(panic) => format!("panicked: {}", panic_message(&*panic)),
        };
        out.failures
            .push(Failure::new(shape, Some(*load), None, stage.get(), error));
    }
    out
}

/// One path's layer figures: (ReMoE, TopK) each.
struct PathFigures {
    path: GemmPath,
    fwd: [Timing; 2],
    fwd_bwd: [Timing; 2],
    stages: [StageTimes; 2],
    saved: [f64; 2],
    workspace: (usize, usize),
}

const KINDS: [RouterKind; 2] = [RouterKind::Relu, RouterKind::TopK];

fn measure_path(setup: &mut Setup, path: GemmPath, opts: &Options) -> Result<PathFigures, Error> {
    let (fr, ft) = setup.interleaved_forward(path, opts.warmup, opts.iters)?;
    let (br, bt) = setup.interleaved_forward_backward(path, opts.warmup, opts.iters)?;
    // What each router's training forward saved (one more forward+backward each).
    let mut saved = [0.0; 2];
    for (i, &kind) in KINDS.iter().enumerate() {
        setup.forward_backward(kind, path)?;
        saved[i] = setup.saved_bytes_per_token(path);
    }
    let stages = [
        setup.stage_times(KINDS[0], path, false, opts.stage_runs)?,
        setup.stage_times(KINDS[1], path, false, opts.stage_runs)?,
    ];
    Ok(PathFigures {
        path,
        fwd: [fr, ft],
        fwd_bwd: [br, bt],
        stages,
        saved,
        workspace: setup.workspace_bytes(path),
    })
}

/// One load of one configuration; `stage` follows what is being measured (for the failure
/// record of an error returned, or of a panic). A path whose layer timings fail, and floors that
/// fail, are recorded in `out.failures` here and the rest goes on.
fn measure_load(
    dev: &Device,
    shape: &Shape,
    load: Load,
    problem: &HostProblem,
    opts: &Options,
    stage: &Cell<&'static str>,
    out: &mut Measured,
) -> Result<(), Error> {
    let name = &shape.name;
    let cfg = problem.cfg;
    stage.set("setup");
    let fill = Filler::new(dev)?;
    let mut setup = Setup::from_problem(dev, problem, load, &opts.paths)?;
    let first = opts.paths[0];
    stage.set("calibration");
    let calibration = if opts.calibrate {
        let (before, after, goal) = setup.calibrate_density()?;
        eprintln!(
            "config {name} {}: ReMoE |A| {before} -> {after} after calibrating the thresholds \
             (target {goal:.0})",
            load.name(),
        );
        Some(before)
    } else {
        None
    };
    stage.set("routing");
    let stats = [
        setup.forward_stats(KINDS[0], first)?,
        setup.forward_stats(KINDS[1], first)?,
    ];
    // The layer, per path: ReMoE and TopK interleaved. The rows go out now, their floors are
    // filled in below (NaN, null in the JSON, if the floors fail).
    stage.set("layer");
    let start = out.rows.len();
    for &path in &opts.paths {
        let fig = match measure_path(&mut setup, path, opts) {
            Ok(f) => f,
            Err(e) => {
                let error = e.to_string();
                out.failures
                    .push(Failure::new(shape, Some(load), Some(path), "layer", error));
                continue;
            }
        };
        for (i, &kind) in KINDS.iter().enumerate() {
            let st = &stats[i];
            out.rows.push(LayerRow {
                config: name.clone(),
                load,
                router: kind,
                path,
                density: 1.0 - st.sparsity,
                pairs: st.active_pairs,
                max_expert_tokens: st.tokens_per_expert.iter().copied().max().unwrap_or(0),
                fwd: fig.fwd[i].clone(),
                fwd_bwd: fig.fwd_bwd[i].clone(),
                stages: fig.stages[i],
                floor_fwd: Timing::default(),
                floor_fwd_bwd: Timing::default(),
                per_expert: Timing::default(),
                saved_bytes_per_token: fig.saved[i],
                cfg,
                pairs_before_calibration: calibration.filter(|_| kind == RouterKind::Relu),
                inference_workspace_bytes: fig.workspace.0,
                training_workspace_bytes: fig.workspace.1,
            });
        }
    }
    // What the expert GEMMs timed alone need of the layer (at the uniform load): the ReMoE
    // router's routing, and the forward GEMMs' times inside a training forward.
    let gemm_inputs = if opts.gemms && load == Load::Uniform && stats[0].active_pairs > 0 {
        stage.set("expert GEMMs");
        let mut prepare = || -> Result<_, Error> {
            let dispatch = setup.dispatch(RouterKind::Relu, first)?;
            let mut in_layer = Vec::new();
            for &path in &opts.paths {
                let s = setup.stage_times(KINDS[0], path, true, opts.stage_runs)?;
                in_layer.push((path, s));
            }
            Ok((dispatch, in_layer))
        };
        match prepare() {
            Ok(v) => Some(v),
            Err(e) => {
                let error = e.to_string();
                out.failures
                    .push(Failure::new(shape, Some(load), None, "expert GEMMs", error));
                None
            }
        }
    } else {
        None
    };
    // The contexts' memory goes back before the cuBLAS and GEMM operands are made (at SM30 all
    // of it together would come near an H100's 80 GB).
    setup.release_contexts();
    // The floors at each router's |A|, and the per-expert loop: interleaved.
    stage.set("cuBLAS floors");
    let cap = stats.iter().map(|s| s.active_pairs).max().unwrap_or(0);
    let floors = DenseGemms::new(dev, &fill, cfg, cap).and_then(|dense| {
        let mut floors = Vec::new();
        for st in &stats {
            let p = st.active_pairs;
            let mut t = time_interleaved(dev, opts.warmup, opts.iters, 3, |w, i| match w {
                0 => dense.floor_forward(p, i),
                1 => dense.floor_forward_backward(p, i),
                _ => dense.per_expert_loop(&st.tokens_per_expert, &setup.weights, i),
            })?;
            let loop_t = t.pop().unwrap();
            let fb = t.pop().unwrap();
            floors.push((t.pop().unwrap(), fb, loop_t));
        }
        Ok((dense, floors))
    });
    let dense = match floors {
        Ok((dense, floors)) => {
            for row in &mut out.rows[start..] {
                let i = KINDS.iter().position(|&k| k == row.router).unwrap();
                row.floor_fwd = floors[i].0.clone();
                row.floor_fwd_bwd = floors[i].1.clone();
                row.per_expert = floors[i].2.clone();
            }
            Some(dense)
        }
        Err(e) => {
            let error = e.to_string();
            out.failures.push(Failure::new(
                shape,
                Some(load),
                None,
                "cuBLAS floors",
                error,
            ));
            None
        }
    };
    // Each expert GEMM alone, on the ReMoE router's routing at the uniform load.
    let Some((dispatch, in_layer)) = gemm_inputs else {
        return Ok(());
    };
    stage.set("expert GEMMs");
    drop(setup);
    let mut grouped = GroupedGemms::new(dev, &fill, cfg, &dispatch)?;
    let p = grouped.pairs;
    let dense = match dense {
        Some(d) => d,
        None => DenseGemms::new(dev, &fill, cfg, p)?,
    };
    let warmup = opts.gemm_warmup;
    for kind in GemmKind::ALL {
        let n = opts.paths.len();
        let mut t = time_interleaved(dev, warmup, opts.iters, n + 1, |w, i| {
            if w < n {
                grouped.run(kind, opts.paths[w], i)
            } else {
                dense.run(kind, p, i)
            }
        })?;
        let cublas = t.pop();
        let layer_stage = |s: &StageTimes| match kind {
            GemmKind::Up => Some(s.up_ms),
            GemmKind::Down => Some(s.down_ms),
            _ => None,
        };
        out.gemms.push(GemmRow {
            config: name.clone(),
            kind: GemmRowKind::Gemm(kind),
            pairs: p,
            cfg,
            ours: opts.paths.iter().copied().zip(t).collect(),
            cublas,
            in_layer: in_layer
                .iter()
                .filter_map(|(q, s)| layer_stage(s).map(|ms| (*q, ms)))
                .collect(),
            rotation: grouped.rotation(kind),
            cublas_rotation: Some(dense.rotation(kind, p)),
        });
    }
    if opts.paths.contains(&GemmPath::Hopper) {
        let t = time_interleaved(dev, warmup, opts.iters, 1, |_, i| grouped.gather_x(i))?;
        out.gemms.push(GemmRow {
            config: name.clone(),
            kind: GemmRowKind::GatherX,
            pairs: p,
            cfg,
            ours: vec![(GemmPath::Hopper, t[0].clone())],
            cublas: None,
            in_layer: Vec::new(),
            rotation: grouped.gather_rotation(),
            cublas_rotation: None,
        });
        // The Hopper path's two ways (gather, then dWg and dWu; or the gather inside the
        // GEMMs' mainloop), with cuBLAS's dWg+dWu in the same loop; checked
        // first where both paths run (a difference fails the configuration).
        if opts.paths.contains(&GemmPath::MmaSync) {
            let (differ, first) = grouped.check_dwgu_hopper_gathering()?;
            assert!(
                differ == 0,
                "{name}: the Hopper dWg+dWu gathering X's rows differ from the mma.sync path's \
                 in {differ} elements (first {first})"
            );
        }
        let mut t = time_interleaved(dev, warmup, opts.iters, 3, |w, i| match w {
            0 => {
                grouped.gather_x(i)?;
                grouped.run(GemmKind::DWgu, GemmPath::Hopper, i)
            }
            1 => grouped.dwgu_hopper_gathering(i),
            _ => dense.run(GemmKind::DWgu, p, i),
        })?;
        let cublas = t.pop();
        let (first, gathering) = (t[0].clone(), t[1].clone());
        for (kind, timing) in [
            (GemmRowKind::DWguGatheredFirst, first),
            (GemmRowKind::DWguGatheringInKernel, gathering),
        ] {
            out.gemms.push(GemmRow {
                config: name.clone(),
                kind,
                pairs: p,
                cfg,
                ours: vec![(GemmPath::Hopper, timing)],
                cublas: cublas.clone(),
                in_layer: Vec::new(),
                rotation: grouped.rotation(GemmKind::DWgu),
                cublas_rotation: Some(dense.rotation(GemmKind::DWgu, p)),
            });
        }
    }
    Ok(())
}
