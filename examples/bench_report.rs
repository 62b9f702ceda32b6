//! The benchmark report: the ReMoE layer against the TopK dispatch layer and cuBLAS at docs/SPEC.md's
//! named configurations (A, B, C, D, S, SM1, SM7, SM7b, SM30, Q3, OL: the table in
//! remoe_testkit::shapes) and at shapes given by hand, uniform and skewed loads, on each
//! expert-GEMM path (Hopper wgmma/TMA and the portable mma.sync). Every figure is a median of
//! CUDA-event times with its min and max (benches/support/mod.rs says how inputs are rotated).
//! Prints:
//!
//! 1. the layer per (config, load, router, path): forward and forward+backward, TFLOP/s, the
//!    fraction of the same run's MoE-free cuBLAS floor of the same FLOPs, and the device memory
//!    the layer's training context holds;
//! 2. the forward's stages;
//! 3. ReMoE against TopK, timed interleaved (ReMoE, TopK, ReMoE, TopK, ...), with the routed
//!    pairs of each (the paper's claim holds at equal pairs);
//! 4. each of the layer's expert GEMMs timed alone on its real routing, per path, against the
//!    same-shape dense cuBLAS GEMM in the same loop, as the ratio cuBLAS time / ours (at every
//!    configuration and shape run);
//! 5. last, a compact table against the targets.
//!
//! It writes all of it as JSON; draw the plot from it with examples/bench_plot.rs.
//!
//!   scripts/with-cuda cargo run --release --example bench_report -- [--json PATH]
//!       [--path hopper|mma-sync|both] [--iters N] [--warmup N] [--quick] [--no-gemms]
//!       [--no-calibrate] [--shape NAME:T:H:F:E:k]... [CONFIG...]
//!
//! CONFIG names docs/SPEC.md's configurations to run; `--shape NAME:T:H:F:E:k` (repeatable) adds a
//! shape of any size. With neither, every named configuration runs.
//!
//! `--quick` is the GPU suite's short pass: 3 warm-up and 5 timed runs per figure (3
//! stage-timed forwards), every configuration asked for still run; its figures are indicative
//! only.
//!
//! A configuration's part that fails (an error such as `CapacityExceeded`, or a panic) does not
//! end the report: it becomes a FAILED row, in the tables and in the JSON (`"status": "FAILED"`
//! with the error), the rest runs, and the report exits with status 1 at the end.
//!
//! `--no-calibrate` keeps the synthetic problem's ReMoE thresholds as generated, instead of
//! calibrating them to the load's intended routed pairs (benches/support: `calibrate_density`).

#[path = "../benches/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{ArgAction, CommandFactory, Parser, ValueEnum};
use remoe_kernels::{Device, GemmPath, RouterKind};
use support::{
    available_paths, comparisons, host_problem, measure_config, named, named_list, named_shapes,
    panic_message, router_name, Failure, GemmRow, GemmRowKind, LayerRow, Load, Measured, Options,
    Shape, NAMED, ROTATION_BYTES,
};

/// The targets the report is read against (the issue's).
const GEMM_TARGET: f64 = 0.80;
const FLOOR_TARGET: f64 = 0.70;
const CLAIM_TARGET: f64 = 0.03;

/// `--quick`: warm-up rounds, timed runs and stage-timed forwards per figure.
const QUICK_WARMUP: usize = 3;
const QUICK_ITERS: usize = 5;
const QUICK_STAGE_RUNS: usize = 3;

/// Which expert-GEMM paths to time.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PathChoice {
    /// The Hopper wgmma/TMA path (compute capability 9.0 and sm_90a code needed).
    Hopper,
    /// The portable mma.sync path.
    #[value(name = "mma-sync", alias = "mma")]
    MmaSync,
    /// Every path this device runs.
    Both,
}

/// The benchmark report: the ReMoE layer against the TopK layer and cuBLAS at docs/SPEC.md's
/// configurations and at shapes given by hand, on each expert-GEMM path; prints the tables and
/// writes the JSON. Exits with status 1 if any part of any configuration failed (each failure
/// is a FAILED row; the rest still runs).
#[derive(Parser)]
#[command(name = "bench_report")]
struct Args {
    /// Where to write the JSON report.
    #[arg(
        long = "json",
        value_name = "PATH",
        default_value = "bench-report.json"
    )]
    json_path: PathBuf,
    /// The expert-GEMM paths to time.
    #[arg(long, value_enum, default_value_t = PathChoice::Both)]
    path: PathChoice,
    /// Timed runs per figure (at least 10).
    #[arg(long, default_value_t = 20, value_parser = at_least_10)]
    iters: usize,
    /// Untimed warm-up runs before each figure.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// A short pass (the GPU suite's): 3 warm-up and 5 timed runs per figure, 3 stage-timed
    /// forwards; every configuration asked for still runs. Figures are indicative only.
    #[arg(long, conflicts_with_all = ["iters", "warmup"])]
    quick: bool,
    /// Skip timing each expert GEMM alone.
    #[arg(long = "no-gemms", action = ArgAction::SetFalse)]
    gemms: bool,
    /// Keep the synthetic problem's ReMoE thresholds as generated (see the module docs).
    #[arg(long = "no-calibrate", action = ArgAction::SetFalse)]
    calibrate: bool,
    /// A shape to run besides the named configurations asked for, as NAME:T:H:F:E:k (T tokens,
    /// hidden size H, expert FFN size F, E experts, k active per token; H and F multiples of
    /// 8); NAME is what the tables and the JSON call it. Repeatable.
    #[arg(long = "shape", value_name = "NAME:T:H:F:E:k", value_parser = parse_shape)]
    shapes: Vec<Shape>,
    /// Named configurations to run (docs/SPEC.md's): any of A B C D S SM1 SM7 SM7b SM30 Q3 OL.
    /// Default: all of them, unless --shape is given (then only the shapes).
    #[arg(value_name = "CONFIG", value_parser = config_name)]
    configs: Vec<String>,
}

fn at_least_10(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if n < 10 {
        return Err("at least 10 timed runs per figure (--quick runs 5)".into());
    }
    Ok(n)
}

fn config_name(s: &str) -> Result<String, String> {
    if named(s).is_some() {
        Ok(s.to_string())
    } else {
        Err(format!(
            "expected one of {} (a shape of another size: --shape NAME:T:H:F:E:k)",
            named_list()
        ))
    }
}

fn parse_shape(s: &str) -> Result<Shape, String> {
    s.parse()
}

/// The shapes to run, in order: the named configurations asked for (in docs/SPEC.md's order), then the
/// --shape ones as given; every named configuration when neither was given.
fn chosen_shapes(args: &Args) -> Vec<Shape> {
    if args.configs.is_empty() && args.shapes.is_empty() {
        return named_shapes();
    }
    let mut out: Vec<Shape> = NAMED
        .iter()
        .filter(|n| args.configs.iter().any(|c| c == n.name))
        .map(|n| n.shape())
        .collect();
    for s in &args.shapes {
        if out.iter().any(|o| o.name == s.name) {
            Args::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!("--shape {s}: the name {} is given twice", s.name),
                )
                .exit();
        }
        out.push(s.clone());
    }
    out
}

fn choose_paths(
    dev: &Device,
    wanted: PathChoice,
) -> Result<Vec<GemmPath>, Box<dyn std::error::Error>> {
    let available = available_paths(dev)?;
    Ok(match wanted {
        PathChoice::Both => {
            if !available.contains(&GemmPath::Hopper) {
                println!("note: this device cannot run the Hopper path; timing mma-sync only");
            }
            available
        }
        PathChoice::Hopper => {
            if !available.contains(&GemmPath::Hopper) {
                return Err(
                    "--path hopper: this device (or build) cannot run the Hopper path \
                            (compute capability 9.0 and sm_90a code needed)"
                        .into(),
                );
            }
            vec![GemmPath::Hopper]
        }
        PathChoice::MmaSync => vec![GemmPath::MmaSync],
    })
}

fn pct(x: f64) -> String {
    format!("{:+.1}%", x * 100.0)
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let args = Args::parse();
    let shapes = chosen_shapes(&args);
    let dev = Device::new(0)?;
    let device = dev.name()?;
    let paths = choose_paths(&dev, args.path)?;
    let (iters, warmup, stage_runs) = if args.quick {
        (QUICK_ITERS, QUICK_WARMUP, QUICK_STAGE_RUNS)
    } else {
        (args.iters, args.warmup, 7)
    };
    let opts = Options {
        iters,
        warmup,
        paths: paths.clone(),
        gemms: args.gemms,
        stage_runs,
        gemm_warmup: if args.quick { warmup } else { warmup.max(5) },
        calibrate: args.calibrate,
    };
    let path_names: Vec<&str> = paths.iter().map(|p| p.name()).collect();
    let shape_names: Vec<&str> = shapes.iter().map(|s| s.name.as_str()).collect();
    println!(
        "device: {device}; GEMM paths: {}; configurations: {}; {} timed runs per figure after \
         {} warm-up rounds; GEMM inputs rotated over >= {} MiB",
        path_names.join(", "),
        shape_names.join(" "),
        opts.iters,
        opts.warmup,
        ROTATION_BYTES >> 20
    );
    if args.quick {
        println!(
            "quick pass: {QUICK_WARMUP} warm-up + {QUICK_ITERS} timed runs per figure (the full \
             report times 20), {QUICK_STAGE_RUNS} stage-timed forwards; every configuration \
             runs, its figures are indicative only"
        );
    }
    let started = Instant::now();
    let mut all = Measured::default();
    for shape in &shapes {
        let t0 = Instant::now();
        // The two loads' host problems in parallel (the slow part on the host).
        let cfg = shape.cfg;
        let problems = std::thread::scope(|s| {
            let loads = [Load::Uniform, Load::Skewed];
            let handles: Vec<_> = loads
                .iter()
                .map(|&l| (l, s.spawn(move || host_problem(cfg, l))))
                .collect();
            handles
                .into_iter()
                .map(|(l, h)| (l, h.join()))
                .collect::<Vec<_>>()
        });
        let mut ok = Vec::new();
        for (load, p) in problems {
            match p {
                Ok(p) => ok.push((load, p)),
                Err(panic) => all.failures.push(Failure::new(
                    shape,
                    Some(load),
                    None,
                    "inputs",
                    format!("panicked: {}", panic_message(&*panic)),
                )),
            }
        }
        let t1 = Instant::now();
        let measured = measure_config(&dev, shape, &ok, &opts);
        drop(ok);
        for f in &measured.failures {
            eprintln!(
                "config {} {} ({}): FAILED [{}]: {}",
                f.config,
                f.load_name(),
                f.path_name(),
                f.stage,
                f.error
            );
        }
        all.extend(measured);
        eprintln!(
            "config {}: inputs {:.1} s, GPU measurements {:.1} s (total so far {:.0} s)",
            shape.name,
            (t1 - t0).as_secs_f64(),
            t1.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
    }
    let Measured {
        rows,
        gemms,
        failures,
    } = all;

    print_layer(&shapes, &rows, &failures, opts.iters);
    print_stages(&rows, opts.stage_runs);
    print_comparisons(&rows);
    if !gemms.is_empty() {
        print_gemms(&gemms, &paths, opts.iters);
    }

    let layer_json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| r.json(&device))
        .chain(failures.iter().map(|f| f.json(&device)))
        .collect();
    let json = serde_json::json!({
        "schema": 3,
        "device": device,
        "paths": path_names,
        "quick": args.quick,
        "runs_per_figure": opts.iters,
        "remoe_thresholds_calibrated": opts.calibrate,
        "warmup": opts.warmup,
        "rotation_min_bytes": ROTATION_BYTES,
        "targets": {
            "gemm_cublas_over_ours": GEMM_TARGET,
            "forward_backward_fraction_of_dense_floor": FLOOR_TARGET,
            "remoe_vs_topk": CLAIM_TARGET,
        },
        "configurations": shapes.iter().map(|s| serde_json::json!({
            "config": s.name,
            "named": named(&s.name).is_some(),
            "tokens": s.cfg.tokens,
            "hidden": s.cfg.hidden,
            "ffn": s.cfg.ffn,
            "experts": s.cfg.experts,
            "k": s.cfg.k,
        })).collect::<Vec<_>>(),
        "failed": failures.len(),
        "layer": layer_json,
        "remoe_vs_topk": comparisons(&rows).iter().map(|c| c.json()).collect::<Vec<_>>(),
        "gemms": gemms.iter().map(|g| g.json()).collect::<Vec<_>>(),
    });
    std::fs::write(
        &args.json_path,
        serde_json::to_string_pretty(&json).expect("the report serialises"),
    )?;
    println!(
        "\nwrote {} layer rows, {} FAILED rows and {} GEMM rows to {} ({:.0} s)",
        rows.len(),
        failures.len(),
        gemms.len(),
        args.json_path.display(),
        started.elapsed().as_secs_f64()
    );

    print_targets(&shapes, &rows, &gemms, &failures, &paths);
    if failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "\n== FAILED: {} part(s) of {} configuration(s)",
        failures.len(),
        {
            let mut c: Vec<&str> = failures.iter().map(|f| f.config.as_str()).collect();
            c.dedup();
            c.len()
        }
    );
    for f in &failures {
        println!(
            "{} {} {} [{}]: {}",
            f.config,
            f.load_name(),
            f.path_name(),
            f.stage,
            f.error
        );
    }
    Ok(ExitCode::FAILURE)
}

fn print_layer(shapes: &[Shape], rows: &[LayerRow], failures: &[Failure], iters: usize) {
    println!(
        "\n== Layer: median [min-max] ms of {iters} runs (ReMoE and TopK interleaved); TF/s at \
         the median (6|A|HF forward, 18|A|HF forward+backward); \"of fl\" = the cuBLAS floor's \
         time / the layer's (floor: the dense GEMMs of the same FLOPs, rotated inputs, same run); \
         \"ws MiB\" = device memory the path's training context holds (MoeContext::\
         workspace_bytes, shared by the ReMoE and TopK runs; the inference context's in the \
         JSON); FAILED rows: what failed, and why"
    );
    println!(
        "{:<4} {:<7} {:<5} {:<8} {:>6} {:>6} | {:>22} {:>5} {:>5} | {:>22} {:>5} {:>5} | {:>8} {:>9} {:>8} | {:>7}",
        "cfg",
        "load",
        "route",
        "path",
        "dens",
        "|A|",
        "fwd ms",
        "TF/s",
        "of fl",
        "fwd+bwd ms",
        "TF/s",
        "of fl",
        "flr f ms",
        "flr fb ms",
        "loop ms",
        "ws MiB"
    );
    for shape in shapes {
        for r in rows.iter().filter(|r| r.config == shape.name) {
            println!(
                "{:<4} {:<7} {:<5} {:<8} {:>6.4} {:>6} | {:>22} {:>5.0} {:>5.2} | {:>22} {:>5.0} {:>5.2} | {:>8.3} {:>9.3} {:>8.3} | {:>7.0}",
                r.config,
                r.load.name(),
                router_name(r.router),
                r.path.name(),
                r.density,
                r.pairs,
                r.fwd.fmt(),
                r.fwd_tflops(),
                r.floor_fraction(),
                r.fwd_bwd.fmt(),
                r.fwd_bwd_tflops(),
                r.floor_fraction_fwd_bwd(),
                r.floor_fwd.median(),
                r.floor_fwd_bwd.median(),
                r.per_expert.median(),
                mib(r.training_workspace_bytes),
            );
        }
        for f in failures.iter().filter(|f| f.config == shape.name) {
            println!(
                "{:<4} {:<7} {:<5} {:<8} FAILED [{}]: {}",
                f.config,
                f.load_name(),
                "-",
                f.path_name(),
                f.stage,
                f.error
            );
        }
    }
}

fn print_stages(rows: &[LayerRow], runs: usize) {
    println!("\n== Forward stages (inference forward): us, median of {runs} stage-timed forwards");
    println!(
        "{:<4} {:<7} {:<5} {:<8} {:>7} {:>11} {:>10} {:>8} {:>8} {:>8}",
        "cfg", "load", "route", "path", "router", "stats", "compaction", "up", "down", "combine"
    );
    for r in rows {
        let s = &r.stages;
        println!(
            "{:<4} {:<7} {:<5} {:<8} {:>7.0} {:>11.0} {:>10.0} {:>8.0} {:>8.0} {:>8.0}",
            r.config,
            r.load.name(),
            router_name(r.router),
            r.path.name(),
            s.router_ms * 1e3,
            s.stats_ms * 1e3,
            s.compaction_ms * 1e3,
            s.up_ms * 1e3,
            s.down_ms * 1e3,
            s.combine_ms * 1e3,
        );
    }
}

fn print_comparisons(rows: &[LayerRow]) {
    println!(
        "\n== ReMoE vs TopK, interleaved in one loop (ReMoE, TopK, ReMoE, TopK, ...): median \
         [min-max] ms; \"tok/s\" = ReMoE's tokens/s over TopK's - 1 (+: ReMoE faster); \"/pair\" \
         the same per routed pair; the claim (within 3%) is read at equal pairs (within 1%)"
    );
    println!(
        "{:<4} {:<7} {:<8} {:>6} {:>6} {:>7} | {:>22} {:>22} {:>7} {:>7} | {:>22} {:>22} {:>7} {:>7}",
        "cfg",
        "load",
        "path",
        "|A|re",
        "|A|tk",
        "pairs",
        "fwd ReMoE",
        "fwd TopK",
        "tok/s",
        "/pair",
        "f+b ReMoE",
        "f+b TopK",
        "tok/s",
        "/pair"
    );
    for c in comparisons(rows) {
        println!(
            "{:<4} {:<7} {:<8} {:>6} {:>6} {:>7} | {:>22} {:>22} {:>7} {:>7} | {:>22} {:>22} {:>7} {:>7}",
            c.remoe.config,
            c.remoe.load.name(),
            c.remoe.path.name(),
            c.remoe.pairs,
            c.topk.pairs,
            pct(c.pairs_diff()),
            c.remoe.fwd.fmt(),
            c.topk.fwd.fmt(),
            pct(c.fwd_diff()),
            pct(c.fwd_per_pair_diff()),
            c.remoe.fwd_bwd.fmt(),
            c.topk.fwd_bwd.fmt(),
            pct(c.fwd_bwd_diff()),
            pct(c.fwd_bwd_per_pair_diff()),
        );
    }
}

fn print_gemms(gemms: &[GemmRow], paths: &[GemmPath], iters: usize) {
    println!(
        "\n== Expert GEMMs alone (uniform load, the ReMoE router's routing, the layer's launch \
         arguments), each path and the same-shape dense cuBLAS GEMM interleaved in one loop: \
         median [min-max] ms of {iters} runs, inputs rotated; \"cuB/us\" = cuBLAS time / ours; \
         \"rot MiB\" = the rotated inputs' total, ours/cuBLAS's; \"layer\" = the same GEMM's median inside a training forward (stage timing; forward \
         GEMMs only: the backward has no stage timing); \"dWd\" = the layer's dWd, dOut^T (R act) \
         with dOut's rows read through the pairs (on Hopper where F > 512 copied into pair order \
         first, the copy included) and stored transposed, against cuBLAS's act^T dy of the same \
         shape; \"dWgu: gather, GEMMs\" and \"dWgu: gathering\" = the Hopper path's two \
         ways, interleaved in one loop with cuBLAS's dWg+dWu: X's rows gathered first and both GEMMs (the layer's way where F > 512), \
         against the GEMMs gathering X's rows in their mainloop (the layer's way at F <= 512)"
    );
    let mut head = format!(
        "{:<4} {:<20} {:>6} {:>6} {:>6}",
        "cfg", "gemm", "M", "N", "K"
    );
    for p in paths {
        head += &format!(
            " | {:>22} {:>5} {:>6} {:>6}",
            format!("{} ms", p.name()),
            "TF/s",
            "cuB/us",
            "layer"
        );
    }
    head += &format!(" | {:>22} {:>5} | {:>11}", "cuBLAS ms", "TF/s", "rot MiB");
    println!("{head}");
    for g in gemms {
        let shape = g.shape();
        let dim = |i: usize| {
            shape.map_or("-".to_string(), |s| {
                let v = [s.0, s.1, s.2][i];
                if i == 1 && s.3 > 1 {
                    format!("{}x{v}", s.3)
                } else {
                    v.to_string()
                }
            })
        };
        let mut line = format!(
            "{:<4} {:<20} {:>6} {:>6} {:>6}",
            g.config,
            g.name(),
            dim(0),
            dim(1),
            dim(2)
        );
        for &p in paths {
            match g.ours(p) {
                Some(t) => {
                    let tf = if g.shape().is_some() {
                        format!("{:.0}", t.tflops(g.flops()))
                    } else {
                        "-".into()
                    };
                    let ratio = g.ratio(p).map_or("-".into(), |r| format!("{r:.2}"));
                    let layer = g
                        .in_layer
                        .iter()
                        .find(|(q, _)| *q == p)
                        .map_or("-".into(), |(_, ms)| {
                            format!("{ms:.p$}", p = if *ms < 1.0 { 4 } else { 3 })
                        });
                    line += &format!(" | {:>22} {:>5} {:>6} {:>6}", t.fmt(), tf, ratio, layer);
                }
                None => line += &format!(" | {:>22} {:>5} {:>6} {:>6}", "-", "-", "-", "-"),
            }
        }
        match &g.cublas {
            Some(t) => line += &format!(" | {:>22} {:>5.0}", t.fmt(), t.tflops(g.flops())),
            None => line += &format!(" | {:>22} {:>5}", "-", "-"),
        }
        let mib = |b: usize| format!("{}", b >> 20);
        let rot = match g.cublas_rotation {
            Some(c) => format!("{}/{}", mib(g.rotation.1), mib(c.1)),
            None => mib(g.rotation.1),
        };
        line += &format!(" | {rot:>11}");
        println!("{line}");
    }
}

/// The last, compact table: each target's figure per configuration and path.
fn print_targets(
    shapes: &[Shape],
    rows: &[LayerRow],
    gemms: &[GemmRow],
    failures: &[Failure],
    paths: &[GemmPath],
) {
    println!(
        "\n== Against the targets: the lowest cuBLAS/ours over the six expert GEMMs (target >= \
         {GEMM_TARGET:.2} on the Hopper path at A and D); forward+backward of the dense floor, \
         ReMoE uniform (>= {FLOOR_TARGET:.2} at A, C, D); ReMoE vs TopK forward+backward tokens/s \
         (within {:.0}% at equal pairs; [pairs difference])",
        CLAIM_TARGET * 100.0
    );
    println!(
        "{:<4} {:<8} | {:>5} {:<10} | {:>6} | {:>17} {:>17}",
        "cfg", "path", "GEMM", "(lowest)", "floor", "vs TopK uniform", "vs TopK skewed"
    );
    let mark = |ok: bool| if ok { " " } else { "!" };
    let hopper = |p: GemmPath| p == GemmPath::Hopper;
    let comps = comparisons(rows);
    for shape in shapes {
        let cfg = shape.name.as_str();
        for &p in paths {
            let worst = gemms
                .iter()
                .filter(|g| g.config == cfg && matches!(g.kind, GemmRowKind::Gemm(_)))
                .filter_map(|g| Some((g.ratio(p)?, g.name())))
                .min_by(|a, b| a.0.total_cmp(&b.0));
            let (gemm, which) = worst.map_or(("-".to_string(), "-"), |(r, n)| {
                let applies = hopper(p) && (cfg == "A" || cfg == "D");
                (format!("{r:.2}{}", mark(!applies || r >= GEMM_TARGET)), n)
            });
            let floor = rows
                .iter()
                .find(|r| {
                    r.config == cfg
                        && r.path == p
                        && r.load == Load::Uniform
                        && r.router == RouterKind::Relu
                })
                .map_or("-".to_string(), |r| {
                    let f = r.floor_fraction_fwd_bwd();
                    let applies = hopper(p) && ["A", "C", "D"].contains(&cfg);
                    format!("{f:.2}{}", mark(!applies || f >= FLOOR_TARGET))
                });
            let claim = |load: Load| {
                comps
                    .iter()
                    .find(|c| c.remoe.config == cfg && c.remoe.path == p && c.remoe.load == load)
                    .map_or("-".to_string(), |c| {
                        let d = c.fwd_bwd_diff();
                        let ok = !c.equal_pairs() || d.abs() <= CLAIM_TARGET;
                        format!("{}{} [{}]", pct(d), mark(ok), pct(c.pairs_diff()))
                    })
            };
            println!(
                "{:<4} {:<8} | {:>5} {:<10} | {:>6} | {:>17} {:>17}",
                cfg,
                p.name(),
                gemm,
                which,
                floor,
                claim(Load::Uniform),
                claim(Load::Skewed)
            );
        }
        let failed = failures.iter().filter(|f| f.config == cfg).count();
        if failed > 0 {
            println!("{cfg:<4} FAILED: {failed} part(s), listed at the end");
        }
    }
    println!(
        "(! marks a figure below its target where the target applies: GEMMs and floor on the \
         Hopper path at the configurations named; ReMoE/TopK at equal pairs, any path. At \
         unequal pairs compare per pair in the table above)"
    );
}
