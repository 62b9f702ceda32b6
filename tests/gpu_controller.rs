//! The adaptive lambda controller on the device at the ends of its range: pushed one way for
//! many steps it stops at LAMBDA_MAX or LAMBDA_MIN, bit for bit where the CPU controller stops,
//! and comes back; and its constructors refuse what the math cannot take.

mod common;

use common::*;
use half::bf16;
use remoe_kernels::controller::{ALPHA_MAX, LAMBDA_MAX, LAMBDA_MIN};
use remoe_kernels::reference::SparsityController;
use remoe_kernels::{
    moe_forward, Coefficient, Device, DeviceTensor, Error, LambdaController, LayerConfig,
    MoeContext, RouterKind,
};

/// Every expert on for every token (sparsity 0, below any target) or off (sparsity 1).
struct Pushes {
    dense: DeviceProblem,
    sparse: DeviceProblem,
}

fn pushes(dev: &Device, cfg: LayerConfig) -> Pushes {
    let e = cfg.experts;
    let up = |d: f64, seed: u64| {
        DeviceProblem::upload(
            dev,
            &problem_with_density(cfg, &uniform_density(e, d), seed),
        )
        .unwrap()
    };
    Pushes {
        dense: up(1.0, 71),
        sparse: up(0.0, 72),
    }
}

/// `steps` training steps of one forward each on `p`, the device controller against the CPU
/// controller fed the sparsity each forward reported; lambda is compared after every step.
#[allow(clippy::too_many_arguments)]
fn run_steps(
    ctx: &mut MoeContext<bf16>,
    cfg: &LayerConfig,
    p: &DeviceProblem,
    out: &mut DeviceTensor<bf16>,
    gpu: &mut LambdaController,
    cpu: &mut SparsityController,
    steps: usize,
    what: &str,
) {
    for i in 0..steps {
        moe_forward(
            ctx,
            cfg,
            RouterKind::Relu,
            Coefficient::Adaptive(gpu),
            &p.x,
            &p.weights(),
            out,
        )
        .unwrap();
        cpu.record(ctx.stats().unwrap().sparsity);
        gpu.step().unwrap();
        cpu.step();
        let (g, c) = (gpu.lambda().unwrap(), cpu.lambda());
        assert_eq!(
            g.to_bits(),
            c.to_bits(),
            "{what}, step {i}: device lambda {g:e}, CPU {c:e}"
        );
        assert!(
            (LAMBDA_MIN..=LAMBDA_MAX).contains(&g),
            "{what}, step {i}: lambda {g:e} left its range"
        );
    }
}

#[test]
fn gpu_lambda_is_clamped_to_its_range_as_the_reference_is() {
    let Some(dev) = gpu_or_skip("gpu_lambda_is_clamped_to_its_range_as_the_reference_is") else {
        return;
    };
    let cfg = LayerConfig::new(64, 16, 16, 8, 1);
    let p = pushes(&dev, cfg);
    let mut ctx = MoeContext::<bf16>::new(&dev);
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[cfg.tokens, cfg.hidden]).unwrap();
    // The paper's alpha needs 76 steps from 1e-3 to the ceiling and 190 from there to the floor;
    // ALPHA_MAX overshoots a bound by up to a decade in one step.
    let steps = training_steps(400);
    for alpha in [1.2, ALPHA_MAX] {
        let mut gpu =
            LambdaController::with_params(&dev, 1e-3, alpha, cfg.target_sparsity()).unwrap();
        let mut cpu = SparsityController::with_params(1e-3, alpha, cfg.target_sparsity());
        let what = format!("alpha {alpha}");
        let (dense, sparse) = (&p.dense, &p.sparse);
        run_steps(
            &mut ctx, &cfg, dense, &mut out, &mut gpu, &mut cpu, steps, &what,
        );
        if steps >= 100 {
            assert_eq!(gpu.lambda().unwrap(), LAMBDA_MAX, "{what}: pushed up");
        }
        run_steps(
            &mut ctx, &cfg, sparse, &mut out, &mut gpu, &mut cpu, steps, &what,
        );
        if steps >= 200 {
            assert_eq!(gpu.lambda().unwrap(), LAMBDA_MIN, "{what}: pushed down");
        }
        // From the floor, one step up is a step: lambda was not stuck at 0.
        run_steps(
            &mut ctx, &cfg, dense, &mut out, &mut gpu, &mut cpu, 1, &what,
        );
        assert!(gpu.lambda().unwrap() > LAMBDA_MIN, "{what}: back up");
    }
}

#[test]
fn gpu_lambda_controller_refuses_parameters_out_of_range() {
    let Some(dev) = gpu_or_skip("gpu_lambda_controller_refuses_parameters_out_of_range") else {
        return;
    };
    let refused = |r: Result<LambdaController, Error>| matches!(r, Err(Error::InvalidConfig(_)));
    for (k, e) in [(0, 8), (1, 0), (9, 8)] {
        assert!(refused(LambdaController::new(&dev, k, e)), "k {k}, E {e}");
    }
    for (l, a, t) in [
        (1e-8, f64::INFINITY, 0.5),
        (1e-8, 1.2, f64::NAN),
        (1e-8, 1.2, 1.0),
        (0.0, 1.2, 0.5),
        (LAMBDA_MAX * 2.0, 1.2, 0.5),
    ] {
        assert!(
            refused(LambdaController::with_params(&dev, l, a, t)),
            "{l} {a} {t}"
        );
    }
    let c = LambdaController::new(&dev, 8, 8).unwrap();
    assert_eq!(c.target(), 0.0);
    assert_eq!(c.lambda().unwrap(), 1e-8);
}
