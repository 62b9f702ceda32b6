//! Issue 9: the layer reads nothing back to the host, so a forward, a forward and backward, and
//! a whole training step (with the adaptive lambda controller's step) can be captured in a CUDA
//! graph. Replays on new inputs, copied into the captured buffers, give the same bits as eager
//! runs. A pair count past a fixed capacity is the eager forward's own
//! `Error::CapacityExceeded`; in a replay it is reported by the next host-visible call, and never
//! leaves a wrong output unreported.
//!
//! Without a GPU these tests print SKIPPED (set `REMOE_REQUIRE_GPU=1` to fail instead).

mod common;

use common::*;
use half::bf16;
use remoe_kernels::graph::capture;
use remoe_kernels::{
    moe_backward, moe_forward, Coefficient, DeviceTensor, Error, LambdaController, LayerConfig,
    MoeContext, PairCapacity, RouterKind,
};
use remoe_testkit::rng::{fresh_seed, seeded, Rng};
use remoe_testkit::synthetic::{problem_with_density, to_bf16, uniform_density, DeviceProblem};

const COEFF: f64 = 1e-2;

fn bits(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn random_host(n: usize, seed: u64) -> Vec<bf16> {
    let mut rng = seeded(seed);
    (0..n)
        .map(|_| bf16::from_f64(rng.random_range(-1.0..1.0)))
        .collect()
}

/// A new X for the same layer: the tokens of another problem of the same shape and density.
fn new_x(cfg: LayerConfig, density: f64, seed: u64) -> Vec<bf16> {
    to_bf16(&problem_with_density(cfg, &uniform_density(cfg.experts, density), seed).x)
}

fn forward(
    ctx: &mut MoeContext<bf16>,
    cfg: &LayerConfig,
    kind: RouterKind,
    coeff: Coefficient,
    d: &DeviceProblem,
    out: &mut DeviceTensor<bf16>,
) -> remoe_kernels::Result<()> {
    moe_forward(ctx, cfg, kind, coeff, &d.x, &d.weights(), out)
}

fn backward(
    ctx: &mut MoeContext<bf16>,
    coeff: Coefficient,
    d: &DeviceProblem,
    dout: &DeviceTensor<bf16>,
    g: &mut Grads<bf16>,
) -> remoe_kernels::Result<()> {
    moe_backward(ctx, coeff, &d.x, &d.weights(), dout, g.as_mut(), false)
}

fn assert_same_grads(what: &str, a: &Grads<bf16>, b: &Grads<bf16>) {
    let (a, b) = (a.to_host(bf16::to_f64), b.to_host(bf16::to_f64));
    for (i, name) in ["dX", "dWr", "dWg", "dWu", "dWd"].iter().enumerate() {
        let same = a[i]
            .iter()
            .zip(&b[i])
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{what}: {name} differs between replay and eager");
    }
}

#[test]
fn gpu_a_captured_forward_replays_new_inputs_like_an_eager_forward() {
    let Some(dev) =
        untracked_gpu_or_skip("gpu_a_captured_forward_replays_new_inputs_like_an_eager_forward")
    else {
        return;
    };
    let seed = fresh_seed();
    for kind in [RouterKind::Relu, RouterKind::TopK] {
        // T prime, E not a power of two.
        let cfg = LayerConfig::new(257, 128, 256, 6, 2);
        let what = format!("{kind:?} {cfg:?} {}", seed_note(seed));
        let p = problem_with_density(cfg, &uniform_density(6, 0.35), seed);
        let mut d = DeviceProblem::upload(&dev, &p).unwrap();
        let (mut ctx, mut eager) = (MoeContext::new(&dev), MoeContext::new(&dev));
        let mut out = DeviceTensor::<bf16>::zeros(&dev, &[257, 128]).unwrap();
        let mut want = DeviceTensor::<bf16>::zeros(&dev, &[257, 128]).unwrap();
        let fixed = || Coefficient::Fixed(COEFF);
        // Warm: the capture may not grow the workspace.
        forward(&mut ctx, &cfg, kind, fixed(), &d, &mut out).unwrap();
        let graph = capture(&dev, || {
            forward(&mut ctx, &cfg, kind, fixed(), &d, &mut out)
        })
        .unwrap();
        graph.upload().unwrap();
        for round in 0..3u64 {
            d.x.copy_from_host(&new_x(cfg, 0.35, seed + 1 + round))
                .unwrap();
            out.poison().unwrap();
            ctx.poison_workspace().unwrap();
            // SAFETY: every captured buffer (d, out, ctx's workspace) is alive and unmoved.
            unsafe { graph.replay() }.unwrap();
            forward(&mut eager, &cfg, kind, fixed(), &d, &mut want).unwrap();
            assert_eq!(
                bits(&out.to_host().unwrap()),
                bits(&want.to_host().unwrap()),
                "{what}: round {round}: replayed output"
            );
            assert_eq!(
                ctx.stats().unwrap(),
                eager.stats().unwrap(),
                "{what}: round {round}: statistics"
            );
        }
    }
}

/// The graph rule "an eager call of the same or larger shapes warms the context" holds where the
/// smaller forward splits the down projection in K and the larger one does not: the split's f32
/// partial sums are sized by the larger forward too (capacity::split_k_partials_up_to).
#[test]
fn gpu_a_larger_eager_forward_warms_a_capture_whose_down_projection_splits() {
    let Some(dev) = untracked_gpu_or_skip(
        "gpu_a_larger_eager_forward_warms_a_capture_whose_down_projection_splits",
    ) else {
        return;
    };
    let seed = fresh_seed();
    // F 2048: 32 K blocks. T 4096: 32 row tiles x 3 column tiles, no split; T 512: 8 x 3, four
    // K ranges.
    let big = LayerConfig::new(4096, 768, 2048, 8, 1);
    let small = LayerConfig { tokens: 512, ..big };
    let what = format!("{small:?} after {big:?} {}", seed_note(seed));
    let density = uniform_density(8, 1.0 / 8.0);
    let warm = DeviceProblem::upload(&dev, &problem_with_density(big, &density, seed)).unwrap();
    let d = DeviceProblem::upload(&dev, &problem_with_density(small, &density, seed + 1)).unwrap();
    let (mut ctx, mut eager) = (MoeContext::<bf16>::new(&dev), MoeContext::<bf16>::new(&dev));
    let mut warm_out = DeviceTensor::<bf16>::zeros(&dev, &[4096, 768]).unwrap();
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[512, 768]).unwrap();
    let mut want = DeviceTensor::<bf16>::zeros(&dev, &[512, 768]).unwrap();
    let fixed = || Coefficient::Fixed(COEFF);
    forward(
        &mut ctx,
        &big,
        RouterKind::Relu,
        fixed(),
        &warm,
        &mut warm_out,
    )
    .unwrap();
    let graph = capture(&dev, || {
        forward(&mut ctx, &small, RouterKind::Relu, fixed(), &d, &mut out)
    })
    .unwrap_or_else(|e| panic!("{what}: the capture after the larger warm-up: {e}"));
    out.poison().unwrap();
    ctx.poison_workspace().unwrap();
    // SAFETY: every captured buffer (d, out, ctx's workspace) is alive and unmoved.
    unsafe { graph.replay() }.unwrap();
    forward(&mut eager, &small, RouterKind::Relu, fixed(), &d, &mut want).unwrap();
    assert_eq!(
        bits(&out.to_host().unwrap()),
        bits(&want.to_host().unwrap()),
        "{what}: replayed output"
    );
}

#[test]
fn gpu_a_captured_forward_and_backward_replays_like_eager_runs() {
    let Some(dev) =
        untracked_gpu_or_skip("gpu_a_captured_forward_and_backward_replays_like_eager_runs")
    else {
        return;
    };
    let seed = fresh_seed();
    for kind in [RouterKind::Relu, RouterKind::TopK] {
        let cfg = LayerConfig::new(509, 64, 192, 8, 2);
        let what = format!("{kind:?} {cfg:?} {}", seed_note(seed));
        let p = problem_with_density(cfg, &uniform_density(8, 0.3), seed);
        let mut d = DeviceProblem::upload(&dev, &p).unwrap();
        let n = cfg.tokens * cfg.hidden;
        let mut dout =
            DeviceTensor::from_host(&dev, &random_host(n, seed ^ 1), &[509, 64]).unwrap();
        let mut ctx = MoeContext::for_training(&dev);
        let mut eager = MoeContext::for_training(&dev);
        let mut out = DeviceTensor::<bf16>::zeros(&dev, &[509, 64]).unwrap();
        let mut out_e = DeviceTensor::<bf16>::zeros(&dev, &[509, 64]).unwrap();
        let (mut g, mut g_e) = (Grads::new(&dev, &cfg), Grads::new(&dev, &cfg));
        let fixed = || Coefficient::Fixed(COEFF);
        let step = |ctx: &mut MoeContext<bf16>,
                    d: &DeviceProblem,
                    dout: &DeviceTensor<bf16>,
                    out: &mut DeviceTensor<bf16>,
                    g: &mut Grads<bf16>| {
            forward(ctx, &cfg, kind, fixed(), d, out)?;
            backward(ctx, fixed(), d, dout, g)
        };
        step(&mut ctx, &d, &dout, &mut out, &mut g).unwrap();
        let graph = capture(&dev, || step(&mut ctx, &d, &dout, &mut out, &mut g)).unwrap();
        for round in 0..2u64 {
            d.x.copy_from_host(&new_x(cfg, 0.3, seed + 10 + round))
                .unwrap();
            dout.copy_from_host(&random_host(n, seed + 20 + round))
                .unwrap();
            g.poison();
            ctx.poison_workspace().unwrap();
            // SAFETY: every captured buffer is alive and unmoved.
            unsafe { graph.replay() }.unwrap();
            step(&mut eager, &d, &dout, &mut out_e, &mut g_e).unwrap();
            assert_eq!(
                bits(&out.to_host().unwrap()),
                bits(&out_e.to_host().unwrap()),
                "{what}: round {round}: output"
            );
            assert_same_grads(&format!("{what}: round {round}"), &g, &g_e);
            ctx.check_device_errors().unwrap();
        }
    }
}

/// Forward (recording the layer's sparsity into the controller), backward at the controller's
/// lambda, and the controller's step: captured once, replayed for several steps on new batches,
/// lambda and every gradient equal an eager loop's, step by step.
#[test]
fn gpu_a_captured_training_step_with_the_lambda_controller_replays_like_eager_steps() {
    let Some(dev) = untracked_gpu_or_skip(
        "gpu_a_captured_training_step_with_the_lambda_controller_replays_like_eager_steps",
    ) else {
        return;
    };
    let seed = fresh_seed();
    let cfg = LayerConfig::new(384, 64, 128, 8, 1);
    let what = format!("{cfg:?} {}", seed_note(seed));
    let p = problem_with_density(cfg, &uniform_density(8, 0.3), seed);
    let mut d = DeviceProblem::upload(&dev, &p).unwrap();
    let n = cfg.tokens * cfg.hidden;
    let mut dout = DeviceTensor::from_host(&dev, &random_host(n, seed ^ 2), &[384, 64]).unwrap();
    let (mut ctx, mut eager) = (
        MoeContext::for_training(&dev),
        MoeContext::for_training(&dev),
    );
    let (mut c, mut c_e) = (
        LambdaController::with_params(&dev, 1e-3, 1.2, 0.875).unwrap(),
        LambdaController::with_params(&dev, 1e-3, 1.2, 0.875).unwrap(),
    );
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[384, 64]).unwrap();
    let mut out_e = DeviceTensor::<bf16>::zeros(&dev, &[384, 64]).unwrap();
    let (mut g, mut g_e) = (Grads::new(&dev, &cfg), Grads::new(&dev, &cfg));
    let step = |ctx: &mut MoeContext<bf16>,
                c: &mut LambdaController,
                d: &DeviceProblem,
                dout: &DeviceTensor<bf16>,
                out: &mut DeviceTensor<bf16>,
                g: &mut Grads<bf16>| {
        forward(
            ctx,
            &cfg,
            RouterKind::Relu,
            Coefficient::Adaptive(c),
            d,
            out,
        )?;
        backward(ctx, Coefficient::Adaptive(c), d, dout, g)?;
        c.step()
    };
    step(&mut ctx, &mut c, &d, &dout, &mut out, &mut g).unwrap();
    step(&mut eager, &mut c_e, &d, &dout, &mut out_e, &mut g_e).unwrap();
    let graph = capture(&dev, || step(&mut ctx, &mut c, &d, &dout, &mut out, &mut g)).unwrap();
    let mut lambdas = Vec::new();
    for round in 0..6u64 {
        // Alternate dense and sparse batches, so that lambda moves both ways.
        let density = if round % 2 == 0 { 0.6 } else { 0.05 };
        d.x.copy_from_host(&new_x(cfg, density, seed + 30 + round))
            .unwrap();
        dout.copy_from_host(&random_host(n, seed + 40 + round))
            .unwrap();
        // SAFETY: every captured buffer is alive and unmoved.
        unsafe { graph.replay() }.unwrap();
        step(&mut eager, &mut c_e, &d, &dout, &mut out_e, &mut g_e).unwrap();
        let (l, l_e) = (ctx.lambda(&c).unwrap(), eager.lambda(&c_e).unwrap());
        assert_eq!(l.to_bits(), l_e.to_bits(), "{what}: step {round}: lambda");
        lambdas.push(l);
        assert_same_grads(&format!("{what}: step {round}"), &g, &g_e);
    }
    // The controller did move (the replays are not a no-op on lambda).
    assert!(
        lambdas.windows(2).any(|w| w[0] != w[1]),
        "{what}: lambda never moved: {lambdas:?}"
    );
}

#[test]
fn gpu_a_pair_count_past_the_capacity_is_reported_and_computes_nothing() {
    let Some(dev) = untracked_gpu_or_skip(
        "gpu_a_pair_count_past_the_capacity_is_reported_and_computes_nothing",
    ) else {
        return;
    };
    let seed = fresh_seed();
    let cfg = LayerConfig::new(300, 64, 128, 8, 1);
    let what = format!("{cfg:?} {}", seed_note(seed));
    let p = problem_with_density(cfg, &uniform_density(8, 0.5), seed);
    let d = DeviceProblem::upload(&dev, &p).unwrap();
    let dout = DeviceTensor::from_host(&dev, &random_host(300 * 64, seed ^ 3), &[300, 64]).unwrap();
    let fixed = || Coefficient::Fixed(COEFF);

    // The real routing, with the default capacity (every pair fits).
    let mut roomy = MoeContext::<bf16>::for_training(&dev);
    let mut want = DeviceTensor::<bf16>::zeros(&dev, &[300, 64]).unwrap();
    forward(&mut roomy, &cfg, RouterKind::Relu, fixed(), &d, &mut want).unwrap();
    let real = roomy.stats().unwrap();
    assert!(real.active_pairs > 256, "{what}: |A| {}", real.active_pairs);

    // Eager, the forward counts its pairs: more than a fixed capacity is its own error, and it
    // leaves no record to run a backward from.
    let mut ctx = MoeContext::<bf16>::for_training(&dev);
    ctx.set_pair_capacity(PairCapacity::Pairs(256));
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[300, 64]).unwrap();
    assert_eq!(
        forward(&mut ctx, &cfg, RouterKind::Relu, fixed(), &d, &mut out),
        Err(Error::CapacityExceeded {
            needed: real.active_pairs,
            capacity: 256
        }),
        "{what}"
    );
    assert_eq!(ctx.saved_forward(), None);
    let mut g = Grads::new(&dev, &cfg);
    assert!(matches!(
        backward(&mut ctx, fixed(), &d, &dout, &mut g),
        Err(Error::InvalidConfig(_))
    ));

    // Captured, nothing is read back: the capacity is fixed, and a replay that overflows
    // computes nothing past the buffers, publishes an empty dispatch (a zero output, no expert
    // gradient) and is reported by the next host-visible call. Warm up on sparser tokens that
    // fit, so that the capture allocates nothing.
    let sparse = problem_with_density(cfg, &uniform_density(8, 0.05), seed ^ 9);
    let sparse = DeviceProblem::upload(&dev, &sparse).unwrap();
    forward(&mut ctx, &cfg, RouterKind::Relu, fixed(), &sparse, &mut out).unwrap();
    backward(&mut ctx, fixed(), &sparse, &dout, &mut g).unwrap();
    assert_eq!(ctx.saved_forward().unwrap().capacity, 256);
    let graph = capture(&dev, || {
        forward(&mut ctx, &cfg, RouterKind::Relu, fixed(), &d, &mut out)?;
        backward(&mut ctx, fixed(), &d, &dout, &mut g)
    })
    .unwrap();
    ctx.check_device_errors().unwrap();
    out.poison().unwrap();
    g.poison();
    // SAFETY: every captured buffer is alive and unmoved.
    unsafe { graph.replay() }.unwrap();
    assert_eq!(
        ctx.stats(),
        Err(Error::CapacityExceeded {
            needed: real.active_pairs,
            capacity: 256
        }),
        "{what}"
    );
    // Reported once; the statistics describe the real routing.
    assert_eq!(ctx.stats().unwrap(), real, "{what}");
    // Nothing was dispatched: the output is zero (every element written), no pair is listed.
    assert!(
        out.to_host().unwrap().iter().all(|v| v.to_bits() == 0),
        "{what}: output"
    );
    assert_eq!(ctx.dispatch_to_host().unwrap().tokens.len(), 0);
    assert!(ctx.pair_index_to_host().unwrap().iter().all(|&i| i == -1));
    let gh = g.to_host(bf16::to_f64);
    for (i, name) in [(2, "dWg"), (3, "dWu"), (4, "dWd")] {
        assert!(
            gh[i].iter().all(|&v| v == 0.0),
            "{what}: {name} after an overflow"
        );
    }
    drop(graph);

    // Exactly enough room: the output equals the roomy context's, bit for bit.
    ctx.set_pair_capacity(PairCapacity::Pairs(real.active_pairs));
    forward(&mut ctx, &cfg, RouterKind::Relu, fixed(), &d, &mut out).unwrap();
    ctx.check_device_errors().unwrap();
    assert_eq!(
        bits(&out.to_host().unwrap()),
        bits(&want.to_host().unwrap()),
        "{what}: output at capacity |A|"
    );
}

/// The default capacity never overflows: T E pairs when they fit the budget, and a forward of
/// every gate positive (|A| = T E) runs.
#[test]
fn gpu_the_default_capacity_takes_every_pair_when_it_fits() {
    let Some(dev) = gpu_or_skip("gpu_the_default_capacity_takes_every_pair_when_it_fits") else {
        return;
    };
    let cfg = LayerConfig::new(131, 64, 64, 8, 1);
    let p = problem_with_density(cfg, &uniform_density(8, 1.0), 5);
    let d = DeviceProblem::upload(&dev, &p).unwrap();
    let mut ctx = MoeContext::<bf16>::for_training(&dev);
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[131, 64]).unwrap();
    forward(
        &mut ctx,
        &cfg,
        RouterKind::Relu,
        Coefficient::Fixed(COEFF),
        &d,
        &mut out,
    )
    .unwrap();
    assert_eq!(ctx.saved_forward().unwrap().capacity, 131 * 8);
    assert_eq!(ctx.stats().unwrap().active_pairs, 131 * 8);
}

/// What cannot be captured is refused before anything is enqueued, and the capture is ended.
#[test]
fn gpu_what_cannot_be_captured_is_refused_and_the_stream_stays_usable() {
    let Some(dev) =
        untracked_gpu_or_skip("gpu_what_cannot_be_captured_is_refused_and_the_stream_stays_usable")
    else {
        return;
    };
    let cfg = LayerConfig::new(64, 64, 64, 8, 1);
    let p = problem_with_density(cfg, &uniform_density(8, 0.3), 7);
    let d = DeviceProblem::upload(&dev, &p).unwrap();
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[64, 64]).unwrap();
    let fixed = || Coefficient::Fixed(COEFF);
    // A cold context: its workspace would have to grow.
    let mut ctx = MoeContext::<bf16>::new(&dev);
    let err = capture(&dev, || {
        forward(&mut ctx, &cfg, RouterKind::Relu, fixed(), &d, &mut out)
    });
    assert!(matches!(err, Err(Error::CaptureUnsupported(_))), "{err:?}");
    // Stage timing waits on its events.
    forward(&mut ctx, &cfg, RouterKind::Relu, fixed(), &d, &mut out).unwrap();
    ctx.set_stage_timing(true);
    let err = capture(&dev, || {
        forward(&mut ctx, &cfg, RouterKind::Relu, fixed(), &d, &mut out)
    });
    assert!(matches!(err, Err(Error::CaptureUnsupported(_))), "{err:?}");
    ctx.set_stage_timing(false);
    // The stream is not left capturing: eager work runs and reads back.
    assert!(!dev.is_capturing().unwrap());
    forward(&mut ctx, &cfg, RouterKind::Relu, fixed(), &d, &mut out).unwrap();
    ctx.stats().unwrap();
}
