//! Router forward (logits + ReLU gates) at SPEC's configurations. Criterion times the launch
//! plus a stream synchronise per iteration; the report in docs/BENCHMARKS.md uses CUDA events.
//! Skips (with a message) where no CUDA device is found.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use remoe_kernels::{router_forward, Device, DeviceTensor, LayerConfig};
use remoe_testkit::rng::{fresh_seed, seeded, UniformVec};

fn bench_router(c: &mut Criterion) {
    let dev = match Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("router bench skipped: {e}");
            return;
        }
    };
    let configs = [
        ("A", LayerConfig::new(16384, 768, 3072, 8, 1)),
        ("B", LayerConfig::new(16384, 768, 384, 64, 8)),
        ("C", LayerConfig::new(16384, 768, 3072, 64, 1)),
        ("D", LayerConfig::new(16384, 1536, 6144, 8, 1)),
    ];
    let mut group = c.benchmark_group("router_forward");
    let mut rng = seeded(fresh_seed());
    for (name, cfg) in configs {
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
