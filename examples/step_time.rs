//! Eager ReMoE forward+backward time at config A and D in steady state (density k/E), and at
//! config A in the dense first stage (density 1.0 and 0.5): issue 27's "steady-state speed
//! unchanged within 2%" and "the dense stage's cost per step". Written against the API that
//! both c77f7b3 and this commit have, so that the same file, built at each, gives an interleaved
//! comparison on one GPU (run the two binaries alternately).
//!
//!   scripts/with-cuda cargo run --release --example step_time -- [ITERS]
//!
//! Each figure: CUDA events around one forward+backward after 5 warm-up steps, two inputs
//! rotated, median [min-max] of ITERS (default 30) in milliseconds.

use half::bf16;
use remoe_kernels::{
    moe_backward, moe_forward, Coefficient, Device, DeviceTensor, Error, LayerConfig, MoeContext,
    MoeGrads, RouterKind,
};
use remoe_testkit::rng::{seeded, UniformVec};
use remoe_testkit::synthetic::{problem_with_density, to_bf16, uniform_density, DeviceProblem};
use remoe_testkit::timing::time_gpu;

fn main() -> Result<(), Error> {
    let iters: usize = std::env::args()
        .nth(1)
        .map_or(30, |s| s.parse().expect("ITERS is a number"));
    let dev = match Device::new(0) {
        Ok(dev) => dev,
        Err(Error::NoCudaDevice(why)) => {
            println!("no CUDA device ({why}): nothing to time");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let layers: usize = std::env::args()
        .nth(2)
        .map_or(12, |s| s.parse().expect("LAYERS is a number"));
    println!("{} — ReMoE forward+backward, eager, ms", dev.name()?);
    let a = LayerConfig::new(16384, 768, 3072, 8, 1);
    let d = LayerConfig::new(16384, 1536, 6144, 8, 1);
    for (name, cfg, density) in [
        ("A k/E", a, 1.0 / 8.0),
        ("D k/E", d, 1.0 / 8.0),
        ("A 0.5", a, 0.5),
        ("A 1.0", a, 1.0),
    ] {
        match time_case(&dev, cfg, density, iters) {
            Ok((med, min, max, pairs, bytes)) => println!(
                "{name:6} median {med:8.3} [{min:.3}-{max:.3}]  |A| {pairs}  context {:.2} GiB",
                bytes as f64 / (1u64 << 30) as f64
            ),
            Err(e) => println!("{name:6} failed: {e}"),
        }
    }
    match model_step(&dev, a, layers) {
        Ok((ms, bytes, free)) => println!(
            "A 1.0 x{layers}: one step (every forward, then every backward) {ms:.2} ms, the \
             contexts hold {:.1} GiB, {:.1} GiB of the device free after it",
            bytes as f64 / (1u64 << 30) as f64,
            free as f64 / (1u64 << 30) as f64
        ),
        Err(e) => println!("A 1.0 x{layers} failed: {e}"),
    }
    Ok(())
}

/// A model of `layers` ReMoE layers at `cfg` in the dense stage (density 1.0), one training
/// context per layer (every forward saved before the first backward, as in a real model; the
/// layers share one set of weights and inputs here, which changes nothing the contexts hold).
fn model_step(dev: &Device, cfg: LayerConfig, layers: usize) -> Result<(f64, usize, usize), Error> {
    let (t, h, e) = (cfg.tokens, cfg.hidden, cfg.experts);
    let p = problem_with_density(cfg, &uniform_density(e, 1.0), 11);
    let d = DeviceProblem::upload(dev, &p)?;
    let w = d.weights();
    let mut rng = seeded(12);
    let dout =
        DeviceTensor::<bf16>::from_host(dev, &to_bf16(&rng.vec_uniform(t * h, 1.0)), &[t, h])?;
    let mut ctxs: Vec<MoeContext<bf16>> =
        (0..layers).map(|_| MoeContext::for_training(dev)).collect();
    let mut out = DeviceTensor::<bf16>::zeros(dev, &[t, h])?;
    let mut grads = Grads::new(dev, &cfg)?;
    let t = time_gpu(dev, 1, 3, || {
        for ctx in ctxs.iter_mut() {
            let fixed = Coefficient::Fixed(1e-3);
            moe_forward(ctx, &cfg, RouterKind::Relu, fixed, &d.x, &w, &mut out)?;
        }
        for ctx in ctxs.iter_mut().rev() {
            let fixed = Coefficient::Fixed(1e-3);
            moe_backward(ctx, fixed, &d.x, &w, &dout, grads.as_mut(), true)?;
        }
        Ok(())
    })?;
    for ctx in ctxs.iter_mut() {
        ctx.check_device_errors()?;
    }
    let bytes = ctxs.iter().map(|c| c.workspace_bytes()).sum();
    let (free, _) = cudarc::driver::result::mem_get_info()?;
    Ok((t.median_ms(), bytes, free))
}

fn time_case(
    dev: &Device,
    cfg: LayerConfig,
    density: f64,
    iters: usize,
) -> Result<(f64, f64, f64, usize, usize), Error> {
    let (t, h, e) = (cfg.tokens, cfg.hidden, cfg.experts);
    let dens = uniform_density(e, density);
    let p = problem_with_density(cfg, &dens, 7);
    let d = DeviceProblem::upload(dev, &p)?;
    // A second input from the same routing distribution, rotated with the first.
    let x2 = to_bf16(&problem_with_density(cfg, &dens, 8).x);
    let x2 = DeviceTensor::from_host(dev, &x2, &[t, h])?;
    let mut rng = seeded(9);
    let dout = to_bf16(&rng.vec_uniform(t * h, 1.0));
    let dout = DeviceTensor::<bf16>::from_host(dev, &dout, &[t, h])?;
    let w = d.weights();
    let mut ctx = MoeContext::<bf16>::for_training(dev);
    let mut out = DeviceTensor::<bf16>::zeros(dev, &[t, h])?;
    let mut grads = Grads::new(dev, &cfg)?;
    let mut step = 0usize;
    let timings = time_gpu(dev, 5, iters, || {
        step += 1;
        let x = if step.is_multiple_of(2) { &d.x } else { &x2 };
        let fixed = Coefficient::Fixed(1e-3);
        moe_forward(&mut ctx, &cfg, RouterKind::Relu, fixed, x, &w, &mut out)?;
        moe_backward(
            &mut ctx,
            Coefficient::Fixed(1e-3),
            x,
            &w,
            &dout,
            grads.as_mut(),
            false,
        )
    })?;
    let pairs = ctx.stats()?.active_pairs;
    let s = &timings.samples_ms;
    let bytes = ctx.workspace_bytes();
    Ok((timings.median_ms(), s[0], s[s.len() - 1], pairs, bytes))
}

/// The backward's outputs: dX and the f32 weight gradients of one layer.
struct Grads {
    dx: DeviceTensor<bf16>,
    router: DeviceTensor<f32>,
    gate: DeviceTensor<f32>,
    up: DeviceTensor<f32>,
    down: DeviceTensor<f32>,
}

impl Grads {
    fn new(dev: &Device, cfg: &LayerConfig) -> Result<Self, Error> {
        let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
        Ok(Self {
            dx: DeviceTensor::zeros(dev, &[t, h])?,
            router: DeviceTensor::zeros(dev, &[h, e])?,
            gate: DeviceTensor::zeros(dev, &[e, h, f])?,
            up: DeviceTensor::zeros(dev, &[e, h, f])?,
            down: DeviceTensor::zeros(dev, &[e, f, h])?,
        })
    }

    fn as_mut(&mut self) -> MoeGrads<'_, bf16> {
        MoeGrads {
            dx: &mut self.dx,
            router: &mut self.router,
            gate: &mut self.gate,
            up: &mut self.up,
            down: &mut self.down,
        }
    }
}
