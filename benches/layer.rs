//! The layer benchmark (criterion): for docs/SPEC.md's named configurations (or the shapes
//! `REMOE_BENCH_SHAPES` asks for) at the uniform load, on each expert-GEMM path this device runs
//! (Hopper wgmma/TMA, mma.sync):
//!
//! - `layer/{cfg}/{path}/{ReMoE|TopK}/{forward|forward_backward|router|compaction|up_projection|down_projection}`:
//!   the layer, and each forward stage;
//! - `layer/{cfg}/cublas/{ReMoE|TopK}/{dense_floor_forward|dense_floor_forward_backward|per_expert_loop}`:
//!   the MoE-free cuBLAS floors of the same FLOPs as that router's layer, and the per-expert
//!   GEMM loop;
//! - `gemm/{cfg}/{up_swiglu|down|dact|dx|dwd|dwg_dwu}/{path|cublas}`: each expert GEMM alone on
//!   the ReMoE router's routing, and the same-shape dense cuBLAS GEMM; `gemm/{cfg}/gather_x/hopper`
//!   the Hopper path's X row gather before dWg/dWu.
//!
//! Criterion receives CUDA-event times (`iter_custom`), not host clocks; inputs rotate, and
//! ReMoE's thresholds are calibrated to T k routed pairs, as in the report
//! (benches/support/mod.rs). Skewed loads, min/max, interleaved ReMoE/TopK runs, the JSON
//! and the plot: examples/bench_report.rs. Skips (with a message) where no CUDA device is found.
//!
//!   scripts/with-cuda cargo bench --bench layer [-- FILTER]      e.g. FILTER = layer/A/hopper
//!   REMOE_BENCH_SHAPES=A,SM7b,X1:8192:1024:512:64:4 scripts/with-cuda cargo bench --bench layer
//!
//! Shapes: criterion owns the command line, so the shapes come from the environment.
//! `REMOE_BENCH_SHAPES` is a comma-separated list whose entries are named configurations (A B C
//! D S SM1 SM7 SM7b SM30 Q3 OL, remoe_testkit::shapes) or shapes of any size given as
//! `NAME:T:H:F:E:k` (NAME then names the ids: `layer/NAME/...`); unset, every named
//! configuration. A malformed value stops the bench with a message naming the expected form.
//! Every shape asked for is set up (its problem made and calibrated) before criterion's FILTER
//! is applied to the ids, so narrow `REMOE_BENCH_SHAPES` too when filtering to a few shapes
//! (`.gpu-bundle/run-suite.sh --criterion layer/A` does so itself). A shape whose set-up fails is
//! reported and skipped, the others run, and the bench exits with status 1 at the end.

mod support;

use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion};
use remoe_kernels::{Device, Error, GemmPath, RouterKind, StageTimes};
use support::{
    available_paths, router_name, shapes_from_env, time_interleaved, DenseGemms, Filler, GemmKind,
    GroupedGemms, Load, Setup,
};

/// Picks one stage's time out of a forward's stage times.
type StagePick = fn(&StageTimes) -> f64;

fn ms_to_duration(ms: f64) -> Duration {
    Duration::from_secs_f64(ms * 1e-3)
}

/// Registers `id`, timing `iters` runs of `work(round)` with CUDA events; the rounds continue
/// from one criterion batch to the next, so the rotated inputs keep rotating.
fn bench_gpu<M: criterion::measurement::Measurement<Value = Duration>>(
    group: &mut BenchmarkGroup<'_, M>,
    dev: &Device,
    id: String,
    mut work: impl FnMut(usize) -> Result<(), Error>,
) {
    let mut next = 0usize;
    group.bench_function(id.clone(), |b| {
        b.iter_custom(|iters| {
            let base = next;
            let t = time_interleaved(dev, 0, iters as usize, 1, |_, i| work(base + i))
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            next += iters as usize;
            ms_to_duration(t[0].samples_ms.iter().sum())
        })
    });
}

/// Runs the layer benches; returns the shapes whose set-up failed (skipped), with the error.
fn bench_layer(c: &mut Criterion) -> Vec<(String, String)> {
    let shapes = shapes_from_env().unwrap_or_else(|e| {
        eprintln!("layer bench: {e}");
        std::process::exit(2);
    });
    let dev = match Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("layer bench skipped: {e}");
            return Vec::new();
        }
    };
    let paths = available_paths(&dev).expect("GEMM paths");
    let fill = Filler::new(&dev).expect("random pool");
    let mut failed = Vec::new();
    for shape in &shapes {
        let (name, cfg) = (shape.name.as_str(), shape.cfg);
        let setup = Setup::new(&dev, cfg, Load::Uniform, &paths).and_then(|mut s| {
            s.calibrate_density()?;
            Ok(s)
        });
        let mut setup = match setup {
            Ok(s) => s,
            Err(e) => {
                eprintln!("layer bench: {shape}: set-up failed, skipped: {e}");
                failed.push((shape.to_string(), e.to_string()));
                continue;
            }
        };
        let mut group = c.benchmark_group(format!("layer/{name}"));
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        for &path in &paths {
            let p = path.name();
            for kind in [RouterKind::Relu, RouterKind::TopK] {
                let r = router_name(kind);
                bench_gpu(&mut group, &dev, format!("{p}/{r}/forward"), |_| {
                    setup.forward(kind, path).map(|_| ())
                });
                bench_gpu(
                    &mut group,
                    &dev,
                    format!("{p}/{r}/forward_backward"),
                    |_| setup.forward_backward(kind, path),
                );
                let stages: [(&str, StagePick); 4] = [
                    ("router", |s| s.router_ms),
                    ("compaction", |s| s.compaction_ms),
                    ("up_projection", |s| s.up_ms),
                    ("down_projection", |s| s.down_ms),
                ];
                for (stage, pick) in stages {
                    group.bench_function(format!("{p}/{r}/{stage}"), |b| {
                        b.iter_custom(|iters| {
                            let mut sum = 0.0;
                            for _ in 0..iters {
                                let s = setup.stage_times(kind, path, false, 1);
                                sum += pick(&s.expect("stage times"));
                            }
                            ms_to_duration(sum)
                        })
                    });
                }
            }
        }
        for kind in [RouterKind::Relu, RouterKind::TopK] {
            let r = router_name(kind);
            let stats = setup.forward_stats(kind, paths[0]).expect("forward");
            let rows = stats.active_pairs;
            let dense = DenseGemms::new(&dev, &fill, cfg, rows).expect("cuBLAS");
            bench_gpu(
                &mut group,
                &dev,
                format!("cublas/{r}/dense_floor_forward"),
                |i| dense.floor_forward(rows, i),
            );
            bench_gpu(
                &mut group,
                &dev,
                format!("cublas/{r}/dense_floor_forward_backward"),
                |i| dense.floor_forward_backward(rows, i),
            );
            bench_gpu(
                &mut group,
                &dev,
                format!("cublas/{r}/per_expert_loop"),
                |i| dense.per_expert_loop(&stats.tokens_per_expert, &setup.weights, i),
            );
        }
        group.finish();

        let dispatch = setup
            .dispatch(RouterKind::Relu, paths[0])
            .expect("dispatch");
        drop(setup);
        let grouped = GroupedGemms::new(&dev, &fill, cfg, &dispatch).expect("expert GEMMs");
        let dense = DenseGemms::new(&dev, &fill, cfg, grouped.pairs).expect("cuBLAS");
        let mut group = c.benchmark_group(format!("gemm/{name}"));
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(300));
        group.measurement_time(Duration::from_secs(1));
        for kind in GemmKind::ALL {
            for &path in &paths {
                bench_gpu(
                    &mut group,
                    &dev,
                    format!("{}/{}", kind.key(), path.name()),
                    |i| grouped.run(kind, path, i),
                );
            }
            bench_gpu(&mut group, &dev, format!("{}/cublas", kind.key()), |i| {
                dense.run(kind, grouped.pairs, i)
            });
        }
        if paths.contains(&GemmPath::Hopper) {
            bench_gpu(&mut group, &dev, "gather_x/hopper".into(), |i| {
                grouped.gather_x(i)
            });
        }
        group.finish();
    }
    failed
}

// criterion_main! with an exit status: 1 when a shape's set-up failed.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    let failed = bench_layer(&mut c);
    c.final_summary();
    if !failed.is_empty() {
        for (shape, e) in &failed {
            eprintln!("layer bench: FAILED {shape}: {e}");
        }
        std::process::exit(1);
    }
}
