//! The crate's main job, end to end, on whatever this machine has.
//!
//! With a CUDA device: the ReMoE layer forward on the GPU at docs/SPEC.md's configuration A (T = 16384,
//! H = 768, F = 3072, E = 8, k = 1) at the trained density (about k of E experts per token),
//! timed with CUDA events (median of 30 after warm-up), with the first 32 tokens checked against
//! the CPU reference. Without one: says so and runs the CPU reference of the whole layer
//! (forward and backward) on a small problem instead.
//!
//!   scripts/with-cuda cargo run --release --example remoe_layer

use half::bf16;
use remoe_kernels::reference::{remoe_backward, remoe_forward as reference_forward, LayerParams};
use remoe_kernels::{
    remoe_forward, Coefficient, Device, DeviceTensor, Error, LayerConfig, MoeContext,
};
use remoe_testkit::rng::{fresh_seed, seeded, UniformVec};
use remoe_testkit::shapes::named;
use remoe_testkit::synthetic::{problem_with_density, uniform_density, DeviceProblem};
use remoe_testkit::time_gpu;

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
    let cfg = named("A").expect("A is a named configuration").cfg;
    let (t, h, e, k) = (cfg.tokens, cfg.hidden, cfg.experts, cfg.k);
    let lambda = 1e-3;
    println!(
        "GPU: {} — ReMoE layer forward at config A {cfg:?}",
        dev.name()?
    );
    let p = problem_with_density(cfg, &uniform_density(e, k as f64 / e as f64), fresh_seed());
    let d = DeviceProblem::upload(dev, &p)?;
    let mut ctx = MoeContext::<bf16>::new(dev);
    let mut out = DeviceTensor::<bf16>::zeros(dev, &[t, h])?;
    remoe_forward(
        &mut ctx,
        &cfg,
        Coefficient::Fixed(lambda),
        &d.x,
        &d.weights(),
        &mut out,
    )?;
    // The forward reads nothing back; its routing statistics are read when asked for.
    let stats = ctx.stats()?;
    let ms = time_gpu(dev, 5, 30, || {
        remoe_forward(
            &mut ctx,
            &cfg,
            Coefficient::Fixed(lambda),
            &d.x,
            &d.weights(),
            &mut out,
        )
        .map(|_| ())
    })?
    .median_ms();
    let flops = 6.0 * stats.active_pairs as f64 * h as f64 * cfg.ffn as f64;
    println!(
        "forward: median {ms:.3} ms, {:.0} TFLOP/s; density {:.4} (target {:.4}), tokens per expert {:?}, regulariser {:.3e}",
        flops / (ms * 1e-3) / 1e12,
        1.0 - stats.sparsity,
        k as f64 / e as f64,
        stats.tokens_per_expert,
        stats.balance_loss
    );

    // The first 32 tokens against the reference (a token's output depends on that token only).
    let n = 32;
    let sub = LayerConfig { tokens: n, ..cfg };
    let want = reference_forward(&p.x[..n * h], &p.params, &sub, lambda).out;
    let got: Vec<f64> = out.to_host()?[..n * h].iter().map(|v| v.to_f64()).collect();
    let num: f64 = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    println!(
        "first {n} tokens against the CPU reference: relative error {:.2e}",
        (num / den.max(1e-300)).sqrt()
    );
    Ok(())
}

fn run_cpu() {
    let cfg = LayerConfig::new(64, 32, 48, 8, 1);
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    let mut rng = seeded(fresh_seed());
    let x = rng.vec_uniform(t * h, 1.0);
    let params = LayerParams {
        router: rng.vec_uniform(h * e, 0.3),
        gate: rng.vec_uniform(e * h * f, 0.2),
        up: rng.vec_uniform(e * h * f, 0.2),
        down: rng.vec_uniform(e * f * h, 0.2),
    };
    let lambda = 1e-2;
    let fwd = reference_forward(&x, &params, &cfg, lambda);
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
