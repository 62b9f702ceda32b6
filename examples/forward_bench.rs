//! Forward and forward+backward time of the ReMoE and TopK layers at SPEC's configurations,
//! uniform and skewed loads, ReMoE at the trained density (k of E experts per token on average,
//! reached through a threshold feature, see `synthetic`). CUDA-event medians after warm-up;
//! FLOPs counted as 6 |A| H F forward and twice that backward. The forward includes its one host
//! round-trip (see `moe`). Per-stage forward times come from one extra forward with stage timing
//! on, so its events do not perturb the medians.
//!
//!   scripts/with-cuda cargo run --release --example forward_bench [-- CONFIG...]

use half::bf16;
use remoe_kernels::synthetic::{
    problem_with_density, skewed_density, uniform_density, DeviceProblem,
};
use remoe_kernels::{
    moe_backward, moe_forward, time_gpu, Coefficient, Device, DeviceTensor, Error, LayerConfig,
    MoeContext, MoeGrads, RouterKind,
};

const COEFF: f64 = 1e-3;

fn main() -> Result<(), Error> {
    let dev = Device::new(0)?;
    let all = [
        ("A", LayerConfig::new(16384, 768, 3072, 8, 1)),
        ("B", LayerConfig::new(16384, 768, 384, 64, 8)),
        ("C", LayerConfig::new(16384, 768, 3072, 64, 1)),
        ("D", LayerConfig::new(16384, 1536, 6144, 8, 1)),
        ("S", LayerConfig::new(512, 768, 3072, 8, 1)),
    ];
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    println!("device: {}", dev.name()?);
    println!(
        "{:<3} {:<8} {:<6} {:>8} {:>7} {:>8} {:>7} {:>8} {:>8} {:>7} {:>11}",
        "cfg",
        "load",
        "router",
        "density",
        "|A|",
        "fwd ms",
        "TF/s",
        "max n_e",
        "f+b ms",
        "TF/s",
        "saved B/tok"
    );
    for (name, cfg) in all {
        if !wanted.is_empty() && !wanted.iter().any(|w| w == name) {
            continue;
        }
        for load in ["uniform", "skewed"] {
            run_config(&dev, name, cfg, load)?;
        }
    }
    Ok(())
}

fn run_config(dev: &Device, name: &str, cfg: LayerConfig, load: &str) -> Result<(), Error> {
    let (t, h, f, e, k) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts, cfg.k);
    let density = match load {
        "uniform" => uniform_density(e, k as f64 / e as f64),
        _ => skewed_density(e, k as f64),
    };
    let p = problem_with_density(cfg, &density, 0x5eed + t as u64);
    let d = DeviceProblem::upload(dev, &p)?;
    let w = d.weights();
    let mut ctx = MoeContext::<bf16>::new(dev);
    let mut train = MoeContext::<bf16>::for_training(dev);
    let mut out = DeviceTensor::<bf16>::zeros(dev, &[t, h])?;
    let dout_host: Vec<bf16> = (0..t * h)
        .map(|i| bf16::from_f32(((i * 7919) % 2001) as f32 / 1000.0 - 1.0))
        .collect();
    let dout = DeviceTensor::from_host(dev, &dout_host, &[t, h])?;
    let mut dx = DeviceTensor::<bf16>::zeros(dev, &[t, h])?;
    let mut dwr = DeviceTensor::<f32>::zeros(dev, &[h, e])?;
    let mut dwg = DeviceTensor::<f32>::zeros(dev, &[e, h, f])?;
    let mut dwu = DeviceTensor::<f32>::zeros(dev, &[e, h, f])?;
    let mut dwd = DeviceTensor::<f32>::zeros(dev, &[e, f, h])?;

    for kind in [RouterKind::Relu, RouterKind::TopK] {
        let fixed = || Coefficient::Fixed(COEFF);
        let stats = moe_forward(&mut ctx, &cfg, kind, fixed(), &d.x, &w, &mut out)?;
        let fwd_ms = time_gpu(dev, 5, 30, || {
            moe_forward(&mut ctx, &cfg, kind, fixed(), &d.x, &w, &mut out).map(|_| ())
        })?
        .median_ms();
        let train_ms = time_gpu(dev, 3, 20, || {
            moe_forward(&mut train, &cfg, kind, fixed(), &d.x, &w, &mut out)?;
            let grads = MoeGrads {
                dx: &mut dx,
                router: &mut dwr,
                gate: &mut dwg,
                up: &mut dwu,
                down: &mut dwd,
            };
            moe_backward(&mut train, fixed(), &d.x, &w, &dout, grads, false)
        })?
        .median_ms();
        let flops = 6.0 * stats.active_pairs as f64 * h as f64 * f as f64;
        println!(
            "{:<3} {:<8} {:<6} {:>8.4} {:>7} {:>8.4} {:>7.1} {:>8} {:>8.4} {:>7.1} {:>11.0}",
            name,
            load,
            if kind == RouterKind::Relu {
                "ReMoE"
            } else {
                "TopK"
            },
            1.0 - stats.sparsity,
            stats.active_pairs,
            fwd_ms,
            flops / (fwd_ms * 1e-3) / 1e12,
            stats.tokens_per_expert.iter().max().unwrap_or(&0),
            train_ms,
            3.0 * flops / (train_ms * 1e-3) / 1e12,
            train.saved_bytes() as f64 / t as f64,
        );

        ctx.set_stage_timing(true);
        moe_forward(&mut ctx, &cfg, kind, fixed(), &d.x, &w, &mut out)?;
        let st = ctx.stage_times().expect("stage timing is on");
        ctx.set_stage_timing(false);
        let pairs = stats.active_pairs as f64 * h as f64 * f as f64;
        println!(
            "      fwd stages ms: router {:.4}  stats+sync {:.4}  compaction {:.4}  up {:.4} ({:.0} TF/s)  down {:.4} ({:.0} TF/s)  combine {:.4}",
            st.router_ms,
            st.stats_and_sync_ms,
            st.compaction_ms,
            st.up_ms,
            4.0 * pairs / (st.up_ms * 1e-3) / 1e12,
            st.down_ms,
            2.0 * pairs / (st.down_ms * 1e-3) / 1e12,
            st.combine_ms,
        );
    }
    Ok(())
}
