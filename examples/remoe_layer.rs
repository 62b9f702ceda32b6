//! The crate's main job, end to end, on whatever this machine has.
//!
//! With a CUDA device: runs the router forward on the GPU at SPEC's configuration A (T = 16384,
//! H = 768, E = 8), checks a slice of it against the CPU reference, and times it with CUDA
//! events (median of 50 after warm-up). Without one: says so and runs the CPU reference of the
//! whole ReMoE layer (forward and backward) on a small problem instead.
//!
//!   scripts/with-cuda cargo run --release --example remoe_layer

use half::bf16;
use remoe_kernels::reference::{relu_router, remoe_backward, remoe_forward, LayerParams};
use remoe_kernels::rng::SplitMix64;
use remoe_kernels::{router_forward, time_gpu, Device, DeviceTensor, Error, LayerConfig};

fn main() -> Result<(), Error> {
    match Device::new(0) {
        Ok(dev) => run_gpu(&dev),
        Err(Error::NoCudaDevice(why)) => {
            println!("no CUDA device ({why}): running the CPU reference instead");
            run_cpu();
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn run_gpu(dev: &Device) -> Result<(), Error> {
    let cfg = LayerConfig::new(16384, 768, 3072, 8, 1);
    let (t, h, e) = (cfg.tokens, cfg.hidden, cfg.experts);
    println!("GPU: {} — router forward at config A {cfg:?}", dev.name()?);
    let mut rng = SplitMix64::new(SplitMix64::fresh_seed());
    let x: Vec<bf16> = (0..t * h).map(|_| bf16::from_f64(rng.normal())).collect();
    let wr: Vec<bf16> = (0..h * e)
        .map(|_| bf16::from_f64(rng.normal() / (h as f64).sqrt()))
        .collect();
    let xd = DeviceTensor::from_host(dev, &x, &[t, h])?;
    let wd = DeviceTensor::from_host(dev, &wr, &[h, e])?;
    let mut logits = DeviceTensor::<f32>::zeros(dev, &[t, e])?;
    let mut gates = DeviceTensor::<f32>::zeros(dev, &[t, e])?;

    let median_ms = time_gpu(dev, 10, 50, || {
        router_forward(dev, &cfg, &xd, &wd, &mut logits, &mut gates)
    })?
    .median_ms();
    let bytes = (2 * (t * h + h * e) + 8 * t * e) as f64;
    println!(
        "router forward: median {:.4} ms over 50 runs, {:.0} GB/s (X read once, logits and gates written)",
        median_ms,
        bytes / (median_ms * 1e-3) / 1e9
    );

    // Check the first 64 tokens against the reference.
    let n = 64;
    let got = gates.to_host()?;
    let x64: Vec<f64> = x[..n * h].iter().map(|v| v.to_f64()).collect();
    let wr64: Vec<f64> = wr.iter().map(|v| v.to_f64()).collect();
    let want = relu_router(&x64, &wr64, &LayerConfig { tokens: n, ..cfg });
    let max_err = got[..n * e]
        .iter()
        .zip(&want.gates)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max);
    let density = got.iter().filter(|&&g| g > 0.0).count() as f64 / got.len() as f64;
    println!("max |gpu - reference| over {n} tokens: {max_err:.2e}; gate density {density:.3}");
    Ok(())
}

fn run_cpu() {
    let cfg = LayerConfig::new(64, 32, 48, 8, 1);
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    let mut rng = SplitMix64::new(SplitMix64::fresh_seed());
    let x = rng.vec_uniform(t * h, 1.0);
    let params = LayerParams {
        router: rng.vec_uniform(h * e, 0.3),
        gate: rng.vec_uniform(e * h * f, 0.2),
        up: rng.vec_uniform(e * h * f, 0.2),
        down: rng.vec_uniform(e * f * h, 0.2),
    };
    let lambda = 1e-2;
    let fwd = remoe_forward(&x, &params, &cfg, lambda);
    let dout = rng.vec_uniform(t * h, 1.0);
    let grads = remoe_backward(&x, &params, &cfg, lambda, &fwd, &dout);
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    println!("CPU reference ReMoE layer {cfg:?}");
    println!(
        "  sparsity {:.3} (target {:.3}), tokens per expert {:?}, regulariser {:.3e}",
        fwd.routing.sparsity(),
        cfg.target_sparsity(),
        fwd.routing.counts,
        fwd.reg_loss
    );
    println!(
        "  |out| {:.3}, |dX| {:.3}, |dWr| {:.3}, |dWg| {:.3}, |dWu| {:.3}, |dWd| {:.3}",
        norm(&fwd.out),
        norm(&grads.dx),
        norm(&grads.params.router),
        norm(&grads.params.gate),
        norm(&grads.params.up),
        norm(&grads.params.down)
    );
}
