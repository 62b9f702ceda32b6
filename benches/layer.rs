//! The layer benchmark (criterion): for SPEC's configurations at the uniform load, the ReMoE and
//! TopK layers (forward, forward+backward, and each forward stage: router, compaction, up and
//! down projections) and the cuBLAS baselines (the MoE-free dense pair of the same FLOPs, and
//! the per-expert GEMM loop). Criterion receives CUDA-event times (`iter_custom`), not host
//! clocks. Skewed loads, the JSON and the plot: examples/bench_report.rs. Skips (with a
//! message) where no CUDA device is found.
//!
//!   scripts/with-cuda cargo bench --bench layer [-- FILTER]

mod support;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use remoe_kernels::{time_gpu, Device, Error, RouterKind, StageTimes};
use support::{router_name, CublasBaselines, Load, Setup, CONFIGS};

/// Picks one stage's time out of a forward's stage times.
type StagePick = fn(&StageTimes) -> f64;

fn ms_to_duration(ms: f64) -> Duration {
    Duration::from_secs_f64(ms * 1e-3)
}

fn total(samples: &[f64]) -> Duration {
    ms_to_duration(samples.iter().sum())
}

fn bench_layer(c: &mut Criterion) {
    let dev = match Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("layer bench skipped: {e}");
            return;
        }
    };
    for (name, cfg) in CONFIGS {
        let mut setup = Setup::new(&dev, cfg, Load::Uniform).expect("setup");
        let mut group = c.benchmark_group(format!("layer/{name}"));
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        for kind in [RouterKind::Relu, RouterKind::TopK] {
            let r = router_name(kind);
            let stats = setup.forward(kind).expect("forward");
            group.bench_function(format!("{r}/forward"), |b| {
                b.iter_custom(|iters| {
                    let t = time_gpu(&dev, 0, iters as usize, || setup.forward(kind).map(|_| ()));
                    total(&t.expect("forward").samples_ms)
                })
            });
            group.bench_function(format!("{r}/forward_backward"), |b| {
                b.iter_custom(|iters| {
                    let t = time_gpu(&dev, 0, iters as usize, || setup.forward_backward(kind));
                    total(&t.expect("forward+backward").samples_ms)
                })
            });
            let stages: [(&str, StagePick); 4] = [
                ("router", |s| s.router_ms),
                ("compaction", |s| s.compaction_ms),
                ("up_projection", |s| s.up_ms),
                ("down_projection", |s| s.down_ms),
            ];
            for (stage, pick) in stages {
                group.bench_function(format!("{r}/{stage}"), |b| {
                    b.iter_custom(|iters| {
                        let mut sum = 0.0;
                        for _ in 0..iters {
                            sum += pick(&setup.stage_times(kind, 1).expect("stage times"));
                        }
                        ms_to_duration(sum)
                    })
                });
            }
            let mut blas = CublasBaselines::new(&dev, cfg, stats.active_pairs).expect("cuBLAS");
            group.bench_function(format!("{r}/cublas_dense_floor"), |b| {
                b.iter_custom(|iters| {
                    let t = time_gpu(&dev, 0, iters as usize, || blas.dense_pair());
                    total(&t.expect("dense pair").samples_ms)
                })
            });
            group.bench_function(format!("{r}/cublas_per_expert_loop"), |b| {
                b.iter_custom(|iters| {
                    let t: Result<_, Error> = time_gpu(&dev, 0, iters as usize, || {
                        blas.per_expert_loop(&stats.tokens_per_expert, &setup.weights)
                    });
                    total(&t.expect("per-expert loop").samples_ms)
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_layer);
criterion_main!(benches);
