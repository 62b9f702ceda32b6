//! Forward time of the ReMoE and TopK layers at SPEC's configurations, uniform and skewed loads,
//! ReMoE at the trained density (k of E experts per token on average, reached through a
//! threshold feature, see `synthetic`). CUDA-event medians after warm-up; FLOPs counted as
//! 6 |A| H F. The forward includes its one host round-trip (see `moe`).
//!
//!   scripts/with-cuda cargo run --release --example forward_bench [-- CONFIG...]

use half::bf16;
use remoe_kernels::synthetic::{
    problem_with_density, skewed_density, uniform_density, DeviceProblem,
};
use remoe_kernels::{
    moe_forward, time_gpu, Device, DeviceTensor, Error, LayerConfig, MoeContext, RouterKind,
};

fn main() -> Result<(), Error> {
    let dev = Device::new(0)?;
    let device = dev.name()?;
    let all = [
        ("A", LayerConfig::new(16384, 768, 3072, 8, 1)),
        ("B", LayerConfig::new(16384, 768, 384, 64, 8)),
        ("C", LayerConfig::new(16384, 768, 3072, 64, 1)),
        ("D", LayerConfig::new(16384, 1536, 6144, 8, 1)),
        ("S", LayerConfig::new(512, 768, 3072, 8, 1)),
    ];
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    println!("device: {device}");
    println!(
        "{:<3} {:<8} {:<6} {:>8} {:>8} {:>9} {:>9} {:>8}",
        "cfg", "load", "router", "density", "|A|", "ms", "TFLOP/s", "max n_e"
    );
    for (name, cfg) in all {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == name) {
            continue;
        }
        let (t, h, f, e, k) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts, cfg.k);
        for load in ["uniform", "skewed"] {
            let density = match load {
                "uniform" => uniform_density(e, k as f64 / e as f64),
                _ => skewed_density(e, k as f64),
            };
            let p = problem_with_density(cfg, &density, 0x5eed + t as u64);
            let d = DeviceProblem::upload(&dev, &p)?;
            let mut ctx = MoeContext::<bf16>::new(&dev);
            let mut out = DeviceTensor::<bf16>::zeros(&dev, &[t, h])?;
            for kind in [RouterKind::Relu, RouterKind::TopK] {
                let stats = moe_forward(&mut ctx, &cfg, kind, 1e-3, &d.x, &d.weights(), &mut out)?;
                let timings = time_gpu(&dev, 5, 30, || {
                    moe_forward(&mut ctx, &cfg, kind, 1e-3, &d.x, &d.weights(), &mut out)
                        .map(|_| ())
                })?;
                let ms = timings.median_ms();
                let flops = 6.0 * stats.active_pairs as f64 * h as f64 * f as f64;
                println!(
                    "{:<3} {:<8} {:<6} {:>8.4} {:>8} {:>9.4} {:>9.1} {:>8}",
                    name,
                    load,
                    if kind == RouterKind::Relu {
                        "ReMoE"
                    } else {
                        "TopK"
                    },
                    1.0 - stats.sparsity,
                    stats.active_pairs,
                    ms,
                    flops / (ms * 1e-3) / 1e12,
                    stats.tokens_per_expert.iter().max().unwrap_or(&0),
                );
                // A separate pass with stage timing on, so its events do not perturb the median.
                ctx.set_stage_timing(true);
                moe_forward(&mut ctx, &cfg, kind, 1e-3, &d.x, &d.weights(), &mut out)?;
                let st = ctx.stage_times().expect("stage timing is on");
                ctx.set_stage_timing(false);
                let up_flops = 4.0 * stats.active_pairs as f64 * h as f64 * f as f64;
                let down_flops = 2.0 * stats.active_pairs as f64 * h as f64 * f as f64;
                println!(
                    "      stages ms: router {:.4}  stats+sync {:.4}  compaction {:.4}  up {:.4} ({:.0} TFLOP/s)  down {:.4} ({:.0} TFLOP/s)  combine {:.4}",
                    st.router_ms,
                    st.stats_and_sync_ms,
                    st.compaction_ms,
                    st.up_ms,
                    up_flops / (st.up_ms * 1e-3) / 1e12,
                    st.down_ms,
                    down_flops / (st.down_ms * 1e-3) / 1e12,
                    st.combine_ms,
                );
            }
        }
    }
    Ok(())
}
