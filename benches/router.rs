//! Router forward (logits + ReLU gates) at docs/SPEC.md's named configurations, or at the shapes
//! `REMOE_BENCH_SHAPES` asks for (as for the layer bench, benches/layer.rs: named
//! configurations and `NAME:T:H:F:E:k` shapes, comma-separated). Criterion times the launch
//! plus a stream synchronise per iteration; the report in docs/BENCHMARKS.md uses CUDA events.
//! Skips (with a message) where no CUDA device is found.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use remoe_kernels::{router_forward, Device, DeviceTensor};
use remoe_testkit::rng::{fresh_seed, seeded, UniformVec};
use remoe_testkit::shapes::shapes_from_env;

fn bench_router(c: &mut Criterion) {
    let shapes = shapes_from_env().unwrap_or_else(|e| {
        eprintln!("router bench: {e}");
        std::process::exit(2);
    });
    let dev = match Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("router bench skipped: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group("router_forward");
    let mut rng = seeded(fresh_seed());
    for shape in &shapes {
        let (name, cfg) = (shape.name.as_str(), shape.cfg);
        let (t, h, e) = (cfg.tokens, cfg.hidden, cfg.experts);
        let to_bf16 = |v: Vec<f64>| v.into_iter().map(bf16::from_f64).collect::<Vec<_>>();
        let x = DeviceTensor::from_host(&dev, &to_bf16(rng.vec_uniform(t * h, 1.0)), &[t, h])
            .expect("x");
        let wr = DeviceTensor::from_host(&dev, &to_bf16(rng.vec_uniform(h * e, 0.05)), &[h, e])
            .expect("wr");
        let mut logits = DeviceTensor::<f32>::zeros(&dev, &[t, e]).expect("logits");
        let mut gates = DeviceTensor::<f32>::zeros(&dev, &[t, e]).expect("gates");
        // Bytes that must move: X once, Wr, logits and gates written.
        group.throughput(Throughput::Bytes((2 * (t * h + h * e) + 8 * t * e) as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                router_forward(&dev, &cfg, &x, &wr, &mut logits, &mut gates).expect("router");
                dev.synchronize().expect("sync");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_router);
criterion_main!(benches);
