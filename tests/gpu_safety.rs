//! Issue 10: safe code cannot make the GPU read out of bounds, and bad input gets typed errors.
//!
//! - (a) the backward goes by what the forward saved, not by the context's current settings;
//! - (b) buffers too short for a kernel (wrapped slices, views, swapped buffers) are refused
//!   before any launch; views and wrapped `CudaSlice`s are taken without copies;
//! - (c) a forward that fails midway leaves no state a backward could run on;
//! - non-finite router logits: gated off (ReMoE) or never selected (TopK, at most k per token),
//!   reported as `Error::NonFiniteLogits` by the context's next host-visible call (the forward
//!   itself reads nothing back), not recorded into the adaptive controller;
//! - the balance loss's gradient scale.
//!
//! Each of these tests fails without its fix. Without a GPU they print SKIPPED (set
//! `REMOE_REQUIRE_GPU=1` to fail instead).

mod common;

use common::*;
use cudarc::driver::DevicePtr;
use half::bf16;
use remoe_kernels::{
    moe_backward, moe_forward, BackwardOptions, Coefficient, Device, DeviceTensor, Error,
    LambdaController, LayerConfig, MoeContext, MoeWeightViews, PairCapacity, RouterKind,
    TensorView,
};
use remoe_testkit::rng::{seeded, Rng};

const NAMES: [&str; 5] = ["dX", "dWr", "dWg", "dWu", "dWd"];

fn random_dout(dev: &Device, cfg: &LayerConfig, seed: u64) -> (Vec<f64>, DeviceTensor<bf16>) {
    let mut rng = seeded(seed);
    let host: Vec<f64> = (0..cfg.tokens * cfg.hidden)
        .map(|_| bf16::from_f64(rng.random_range(-1.0..1.0)).to_f64())
        .collect();
    let d = DeviceTensor::from_host(dev, &to_bf16(&host), &[cfg.tokens, cfg.hidden]).unwrap();
    (host, d)
}

fn forward(
    ctx: &mut MoeContext<bf16>,
    cfg: &LayerConfig,
    d: &DeviceProblem,
    out: &mut DeviceTensor<bf16>,
) -> remoe_kernels::Result<remoe_kernels::ForwardStats> {
    moe_forward(
        ctx,
        cfg,
        RouterKind::Relu,
        Coefficient::Fixed(1e-2),
        &d.x,
        &d.weights(),
        out,
    )?;
    ctx.stats()
}

fn backward(
    ctx: &mut MoeContext<bf16>,
    d: &DeviceProblem,
    dout: &DeviceTensor<bf16>,
    g: &mut Grads<bf16>,
) -> remoe_kernels::Result<()> {
    moe_backward(
        ctx,
        Coefficient::Fixed(1e-2),
        &d.x,
        &d.weights(),
        dout,
        g.as_mut(),
        false,
    )
}

// ---------------------------------------------------------------------------------------------
// (a) The backward goes by the forward's record.

#[test]
fn gpu_backward_goes_by_what_the_forward_saved_not_the_current_setting() {
    let Some(dev) =
        gpu_or_skip("gpu_backward_goes_by_what_the_forward_saved_not_the_current_setting")
    else {
        return;
    };
    let cfg = LayerConfig::new(300, 64, 128, 8, 2);
    let p = problem_with_density(cfg, &uniform_density(8, 0.3), 21);
    let d = DeviceProblem::upload(&dev, &p).unwrap();
    let (_, dout) = random_dout(&dev, &cfg, 22);
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[300, 64]).unwrap();
    let mut g = Grads::new(&dev, &cfg);

    // An inference context: the forward saves no g and u. Turning saving on afterwards must not
    // let the backward read |A| F values of g and u from the one-element buffers.
    let mut ctx = MoeContext::<bf16>::new(&dev);
    let stats = forward(&mut ctx, &cfg, &d, &mut out).unwrap();
    assert!(stats.active_pairs > 0);
    let rec = ctx.saved_forward().expect("a record after Ok").clone();
    assert!(!rec.saved_for_backward);
    assert_eq!(rec.generation, 1);
    assert!(rec.capacity >= stats.active_pairs);
    ctx.set_save_for_backward(true);
    let err = backward(&mut ctx, &d, &dout, &mut g);
    assert!(
        matches!(err, Err(Error::InvalidConfig(_))),
        "backward after a forward that saved nothing: {err:?}"
    );
    // The next forward saves, and the backward runs.
    forward(&mut ctx, &cfg, &d, &mut out).unwrap();
    let rec = ctx.saved_forward().unwrap();
    assert!(rec.saved_for_backward);
    assert_eq!(rec.generation, 2);
    backward(&mut ctx, &d, &dout, &mut g).unwrap();

    // The other way round: a training forward, then saving turned off: the backward still has
    // what it needs and runs, and gives the same gradients as before.
    let before = g.to_host(bf16::to_f64);
    let mut ctx = MoeContext::<bf16>::for_training(&dev);
    forward(&mut ctx, &cfg, &d, &mut out).unwrap();
    ctx.set_save_for_backward(false);
    backward(&mut ctx, &d, &dout, &mut g).unwrap();
    let after = g.to_host(bf16::to_f64);
    for i in 0..5 {
        assert!(
            before[i]
                .iter()
                .zip(&after[i])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{} differs",
            NAMES[i]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (c) A forward that fails midway.

#[test]
fn gpu_a_forward_that_fails_midway_leaves_no_state_for_a_backward() {
    let Some(dev) = gpu_or_skip("gpu_a_forward_that_fails_midway_leaves_no_state_for_a_backward")
    else {
        return;
    };
    let cfg = LayerConfig::new(200, 64, 64, 8, 1);
    let good = problem_with_density(cfg, &uniform_density(8, 0.3), 31);
    let dg = DeviceProblem::upload(&dev, &good).unwrap();
    // Another batch (another configuration, even) whose token 5 has a NaN feature: its logits
    // are NaN, which the forward detects after the router and statistics have run.
    let cfg2 = LayerConfig::new(100, 64, 64, 8, 1);
    let mut bad = problem_with_density(cfg2, &uniform_density(8, 0.6), 32);
    bad.x[5 * 64 + 3] = f64::NAN;
    let db = DeviceProblem::upload(&dev, &bad).unwrap();
    let (_, dout) = random_dout(&dev, &cfg, 33);
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[200, 64]).unwrap();
    let mut out2 = DeviceTensor::<bf16>::zeros(&dev, &[100, 64]).unwrap();
    let mut g = Grads::new(&dev, &cfg);

    let mut ctx = MoeContext::<bf16>::for_training(&dev);
    forward(&mut ctx, &cfg, &dg, &mut out).unwrap();
    assert_eq!(ctx.last_forward(), Some((cfg, RouterKind::Relu)));

    // Refused before any device work: the context keeps the good forward, whose backward runs.
    let mut wrong = DeviceTensor::<bf16>::zeros(&dev, &[199, 64]).unwrap();
    let err = forward(&mut ctx, &cfg, &dg, &mut wrong);
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })));
    assert_eq!(ctx.saved_forward().map(|s| s.generation), Some(1));
    backward(&mut ctx, &dg, &dout, &mut g).unwrap();

    // A non-finite logit is a device-side condition: the forward is enqueued and recorded (it
    // reads nothing back), and the context's next host-visible call reports it, once.
    moe_forward(
        &mut ctx,
        &cfg2,
        RouterKind::Relu,
        Coefficient::Fixed(1e-2),
        &db.x,
        &db.weights(),
        &mut out2,
    )
    .unwrap();
    assert_eq!(ctx.saved_forward().map(|s| s.generation), Some(2));
    assert_eq!(
        ctx.stats(),
        Err(Error::NonFiniteLogits {
            count: 8,
            first_token: 5
        })
    );
    ctx.check_device_errors().unwrap();
    assert!(ctx.stats().is_ok());

    // Failing midway: with a fixed capacity that its pairs exceed, an eager forward fails once
    // the router and the statistics have rewritten part of the workspace; no state is left for
    // a backward.
    ctx.set_pair_capacity(PairCapacity::Pairs(10));
    let err = forward(&mut ctx, &cfg, &dg, &mut out);
    assert!(
        matches!(err, Err(Error::CapacityExceeded { capacity: 10, .. })),
        "{err:?}"
    );
    ctx.set_pair_capacity(PairCapacity::default());
    assert_eq!(ctx.last_forward(), None);
    assert!(ctx.saved_forward().is_none());
    assert_eq!(ctx.saved_bytes(), Ok(0));
    // Neither that batch's backward nor the earlier ones' may run now.
    let mut g2 = Grads::new(&dev, &cfg2);
    let (_, dout2) = random_dout(&dev, &cfg2, 34);
    let err = backward(&mut ctx, &db, &dout2, &mut g2);
    assert!(matches!(err, Err(Error::InvalidConfig(_))), "{err:?}");
    let err = backward(&mut ctx, &dg, &dout, &mut g);
    assert!(matches!(err, Err(Error::InvalidConfig(_))), "{err:?}");

    // A captured forward that fails (a larger batch cannot grow the workspace during a capture)
    // ran nothing: the context holds what it held, here nothing.
    let big = LayerConfig::new(400, 64, 64, 8, 1);
    let pbig = problem_with_density(big, &uniform_density(8, 0.3), 35);
    let dbig = DeviceProblem::upload(&dev, &pbig).unwrap();
    let mut out_big = DeviceTensor::<bf16>::zeros(&dev, &[400, 64]).unwrap();
    let err = remoe_kernels::graph::capture(&dev, || {
        moe_forward(
            &mut ctx,
            &big,
            RouterKind::Relu,
            Coefficient::Fixed(1e-2),
            &dbig.x,
            &dbig.weights(),
            &mut out_big,
        )
    });
    assert!(matches!(err, Err(Error::CaptureUnsupported(_))), "{err:?}");
    assert!(ctx.saved_forward().is_none());

    // The stream is usable again, and the next forward succeeds.
    ctx.check_device_errors().unwrap();
    forward(&mut ctx, &cfg, &dg, &mut out).unwrap();
    assert_eq!(ctx.saved_forward().map(|s| s.generation), Some(3));
    backward(&mut ctx, &dg, &dout, &mut g).unwrap();
}

// ---------------------------------------------------------------------------------------------
// (b) Buffer lengths; views and wrapped slices.

#[test]
fn gpu_short_buffers_are_refused_with_typed_errors() {
    let Some(dev) = gpu_or_skip("gpu_short_buffers_are_refused_with_typed_errors") else {
        return;
    };
    let s = dev.stream();
    // Wrapping a buffer that does not hold the shape's elements.
    let short = s.alloc_zeros::<bf16>(63).unwrap();
    assert!(matches!(
        DeviceTensor::from_cuda_slice(short, &[8, 8]),
        Err(Error::LengthMismatch {
            expected: 64,
            actual: 63,
            ..
        })
    ));
    // Swapping a shorter buffer into a tensor (what `cuda_slice_mut` allowed): refused, and the
    // tensor keeps its own.
    let mut t = DeviceTensor::<bf16>::zeros(&dev, &[8, 8]).unwrap();
    let short = s.alloc_zeros::<bf16>(1).unwrap();
    assert!(matches!(
        t.replace_cuda_slice(short),
        Err(Error::LengthMismatch { .. })
    ));
    assert_eq!(t.cuda_slice().len(), 64);
    // A same-length swap works and hands back the old buffer.
    let other = s.alloc_zeros::<bf16>(64).unwrap();
    let old = t.replace_cuda_slice(other).unwrap();
    assert_eq!(old.len(), 64);
    // The writable view is the whole buffer.
    assert_eq!(t.cuda_view_mut().len(), 64);
    // A view shorter than its shape.
    let buf = s.alloc_zeros::<bf16>(64).unwrap();
    assert!(matches!(
        TensorView::new(buf.slice(..60), &[8, 8]),
        Err(Error::LengthMismatch { .. })
    ));

    // In the layer: a view of the right length but the wrong shape, and a misaligned view.
    let cfg = LayerConfig::new(64, 64, 64, 8, 1);
    let p = problem_with_density(cfg, &uniform_density(8, 0.3), 41);
    let d = DeviceProblem::upload(&dev, &p).unwrap();
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[64, 64]).unwrap();
    let mut ctx = MoeContext::<bf16>::for_training(&dev);
    let flat = TensorView::new(d.x.cuda_view(), &[64 * 64]).unwrap();
    let err = moe_forward(
        &mut ctx,
        &cfg,
        RouterKind::Relu,
        Coefficient::Fixed(0.0),
        flat,
        &d.weights(),
        &mut out,
    );
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })), "{err:?}");
    let mut host = vec![bf16::ZERO; 64 * 64 + 8];
    host[1..1 + 64 * 64].copy_from_slice(&to_bf16(&p.x));
    let big = s.clone_htod(&host).unwrap();
    let odd = TensorView::new(big.slice(1..1 + 64 * 64), &[64, 64]).unwrap();
    let err = moe_forward(
        &mut ctx,
        &cfg,
        RouterKind::Relu,
        Coefficient::Fixed(0.0),
        odd,
        &d.weights(),
        &mut out,
    );
    assert!(matches!(err, Err(Error::Misaligned { .. })), "{err:?}");
}

#[test]
fn gpu_the_layer_takes_views_and_wrapped_slices_without_copies() {
    let Some(dev) = gpu_or_skip("gpu_the_layer_takes_views_and_wrapped_slices_without_copies")
    else {
        return;
    };
    let s = dev.stream();
    // Wrap and hand back: the same device allocation.
    let buf = s.alloc_zeros::<f32>(16).unwrap();
    let ptr = |b: &cudarc::driver::CudaSlice<f32>| {
        let (p, _guard) = b.device_ptr(s);
        p
    };
    let p0 = ptr(&buf);
    let t = DeviceTensor::from_cuda_slice(buf, &[4, 4]).unwrap();
    assert_eq!(ptr(t.cuda_slice()), p0);
    let back = t.into_cuda_slice();
    assert_eq!(ptr(&back), p0);

    let cfg = LayerConfig::new(300, 64, 128, 8, 2);
    let (t, h, f, e) = (300, 64, 128, 8);
    let p = problem_with_density(cfg, &uniform_density(8, 0.3), 51);
    let d = DeviceProblem::upload(&dev, &p).unwrap();
    let (dout_host, dout) = random_dout(&dev, &cfg, 52);

    // Reference run with owned tensors.
    let mut ctx = MoeContext::<bf16>::for_training(&dev);
    let mut out_a = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
    forward(&mut ctx, &cfg, &d, &mut out_a).unwrap();
    let mut ga = Grads::new(&dev, &cfg);
    backward(&mut ctx, &d, &dout, &mut ga).unwrap();

    // X and dOut inside larger buffers at a 16-byte offset, the router weight a wrapped
    // CudaSlice, the expert weights views of the tensors' buffers.
    let mut host = vec![bf16::ZERO; 8 + t * h + 8];
    host[8..8 + t * h].copy_from_slice(&to_bf16(&p.x));
    let x_big = s.clone_htod(&host).unwrap();
    host[8..8 + t * h].copy_from_slice(&to_bf16(&dout_host));
    let dout_big = s.clone_htod(&host).unwrap();
    let wr =
        DeviceTensor::from_cuda_slice(s.clone_htod(&to_bf16(&p.params.router)).unwrap(), &[h, e])
            .unwrap();
    let weights = MoeWeightViews {
        router: wr.view(),
        gate: TensorView::new(d.gate.cuda_view(), &[e, h, f]).unwrap(),
        up: TensorView::new(d.up.cuda_view(), &[e, h, f]).unwrap(),
        down: TensorView::new(d.down.cuda_view(), &[e, f, h]).unwrap(),
    };
    let xv = TensorView::new(x_big.slice(8..8 + t * h), &[t, h]).unwrap();
    let dv = TensorView::new(dout_big.slice(8..8 + t * h), &[t, h]).unwrap();
    let mut ctx = MoeContext::<bf16>::for_training(&dev);
    let mut out_b = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
    moe_forward(
        &mut ctx,
        &cfg,
        RouterKind::Relu,
        Coefficient::Fixed(1e-2),
        &xv,
        &weights,
        &mut out_b,
    )
    .unwrap();
    let mut gb = Grads::new(&dev, &cfg);
    moe_backward(
        &mut ctx,
        Coefficient::Fixed(1e-2),
        &xv,
        &weights,
        &dv,
        gb.as_mut(),
        BackwardOptions::default(),
    )
    .unwrap();
    let bits = |v: Vec<bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(out_a.to_host().unwrap()),
        bits(out_b.to_host().unwrap())
    );
    let (a, b) = (ga.to_host(bf16::to_f64), gb.to_host(bf16::to_f64));
    for i in 0..5 {
        assert!(
            a[i].iter()
                .zip(&b[i])
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{} differs between tensors and views",
            NAMES[i]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Non-finite logits.

#[test]
fn gpu_remoe_non_finite_logits_are_gated_off_and_reported() {
    let Some(dev) = gpu_or_skip("gpu_remoe_non_finite_logits_are_gated_off_and_reported") else {
        return;
    };
    let (t, h, e) = (300usize, 64usize, 8usize);
    let cfg = LayerConfig::new(t, h, 64, e, 1);
    let mut p = problem_with_density(cfg, &uniform_density(e, 0.5), 61);
    // Router column 2 NaN: every token's logit 2 is NaN. Wr[0, 5] = +Inf with the constant
    // feature x[t, 0] = 1: every token's logit 5 is +Inf (before the fix: an active pair with an
    // infinite gate).
    for i in 0..h {
        p.params.router[i * e + 2] = f64::NAN;
    }
    p.params.router[5] = f64::INFINITY;
    let d = DeviceProblem::upload(&dev, &p).unwrap();
    let mut ctx = MoeContext::<bf16>::for_training(&dev);
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
    let mut lambda = LambdaController::new(&dev, 1, e).unwrap();
    let lambda0 = lambda.lambda().unwrap();
    moe_forward(
        &mut ctx,
        &cfg,
        RouterKind::Relu,
        Coefficient::Adaptive(&mut lambda),
        &d.x,
        &d.weights(),
        &mut out,
    )
    .unwrap();
    // Reported by the next host-visible call: here, reading lambda through the context.
    assert_eq!(
        ctx.lambda(&lambda),
        Err(Error::NonFiniteLogits {
            count: 2 * t,
            first_token: 0
        })
    );
    // The policy, on the kernel's own logits: gate = max(l, 0) for a finite l, else 0 (the
    // reference's relu_gate).
    let logits = ctx.logits_to_host().unwrap();
    let gates = ctx.gates_to_host().unwrap();
    for (i, (&l, &g)) in logits.iter().zip(&gates).enumerate() {
        let want = remoe_kernels::reference::relu_gate(l as f64) as f32;
        assert_eq!(g, want, "gate {i} (logit {l})");
        let col = i % e;
        assert_eq!(!l.is_finite(), col == 2 || col == 5, "logit {i} = {l}");
    }
    // That forward recorded no sparsity: a step leaves lambda as it was.
    lambda.step().unwrap();
    assert_eq!(lambda.lambda().unwrap(), lambda0);
    // Reported once; a clean batch then runs on the same context.
    ctx.check_device_errors().unwrap();
    let clean = problem_with_density(cfg, &uniform_density(e, 0.5), 62);
    let dc = DeviceProblem::upload(&dev, &clean).unwrap();
    forward(&mut ctx, &cfg, &dc, &mut out).unwrap();
    ctx.check_device_errors().unwrap();
}

#[test]
fn gpu_topk_never_selects_a_non_finite_logit_nor_more_than_k() {
    let Some(dev) = gpu_or_skip("gpu_topk_never_selects_a_non_finite_logit_nor_more_than_k") else {
        return;
    };
    let (t, h, e, k) = (500usize, 64usize, 8usize, 2usize);
    let cfg = LayerConfig::new(t, h, 64, e, k);
    let mut p = problem_with_density(cfg, &uniform_density(e, 0.5), 71);
    // Column 1 NaN; logit 3 = +Inf for every token (constant feature); logit 6 = x[t,1] * Inf,
    // +Inf or -Inf by the token (NaN where x[t,1] is 0).
    for i in 0..h {
        p.params.router[i * e + 1] = f64::NAN;
    }
    p.params.router[3] = f64::INFINITY;
    p.params.router[e + 6] = f64::INFINITY;
    let d = DeviceProblem::upload(&dev, &p).unwrap();
    let mut ctx = MoeContext::<bf16>::for_training(&dev);
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
    moe_forward(
        &mut ctx,
        &cfg,
        RouterKind::TopK,
        Coefficient::Fixed(1e-2),
        &d.x,
        &d.weights(),
        &mut out,
    )
    .unwrap();
    assert_eq!(
        ctx.check_device_errors(),
        Err(Error::NonFiniteLogits {
            count: 3 * t,
            first_token: 0
        })
    );
    let logits = ctx.logits_to_host().unwrap();
    let probs = ctx.probs_to_host().unwrap();
    let gates = ctx.gates_to_host().unwrap();
    for ti in 0..t {
        let row = ti * e..(ti + 1) * e;
        let l = &logits[row.clone()];
        let sel: Vec<usize> = (0..e).filter(|&x| gates[ti * e + x] > 0.0).collect();
        // The k largest finite logits, ties to the lower index: the reference's rule.
        let mut finite: Vec<usize> = (0..e).filter(|&x| l[x].is_finite()).collect();
        finite.sort_by(|&a, &b| l[b].partial_cmp(&l[a]).unwrap().then(a.cmp(&b)));
        let mut want = finite[..k.min(finite.len())].to_vec();
        want.sort();
        assert_eq!(sel, want, "token {ti}: logits {l:?}");
        assert!(sel.len() <= k);
        for x in [1, 3, 6] {
            assert_eq!(
                probs[ti * e + x],
                0.0,
                "token {ti} expert {x}: P of a non-finite logit"
            );
        }
        let sum: f32 = probs[row].iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "token {ti}: P sums to {sum}");
    }
    ctx.check_device_errors().unwrap();
}

// ---------------------------------------------------------------------------------------------
// The balance loss's gradient scale.

#[test]
fn gpu_balance_grad_scale_matches_the_loss_scale_on_dout() {
    let Some(dev) = gpu_or_skip("gpu_balance_grad_scale_matches_the_loss_scale_on_dout") else {
        return;
    };
    for kind in [RouterKind::Relu, RouterKind::TopK] {
        let cfg = LayerConfig::new(400, 64, 128, 8, 2);
        let p = problem_with_density(cfg, &uniform_density(8, 0.3), 81);
        let d = DeviceProblem::upload(&dev, &p).unwrap();
        let (dout_host, dout) = random_dout(&dev, &cfg, 82);
        // A loss scale that is a power of two: dOut * S is exact in bf16, and every gradient of
        // the scaled loss is exactly S times the unscaled one (each step is linear and scaling
        // by 2^n commutes with rounding).
        let s = 1024.0;
        let scaled: Vec<f64> = dout_host.iter().map(|v| v * s).collect();
        let dout_s = DeviceTensor::from_host(&dev, &to_bf16(&scaled), &[400, 64]).unwrap();
        let coeff = 20.0; // large, so the balance term is visible next to dOut's
        let mut ctx = MoeContext::<bf16>::for_training(&dev);
        let mut out = DeviceTensor::<bf16>::zeros(&dev, &[400, 64]).unwrap();
        moe_forward(
            &mut ctx,
            &cfg,
            kind,
            Coefficient::Fixed(coeff),
            &d.x,
            &d.weights(),
            &mut out,
        )
        .unwrap();
        let run = |ctx: &mut MoeContext<bf16>, dout: &DeviceTensor<bf16>, scale: f64| {
            let mut g = Grads::new(&dev, &cfg);
            moe_backward(
                ctx,
                Coefficient::Fixed(coeff),
                &d.x,
                &d.weights(),
                dout,
                g.as_mut(),
                BackwardOptions {
                    accumulate: false,
                    balance_grad_scale: scale,
                },
            )
            .unwrap();
            g.to_host(bf16::to_f64)
        };
        let base = run(&mut ctx, &dout, 1.0);
        let with = run(&mut ctx, &dout_s, s);
        for i in 0..5 {
            assert!(base[i].iter().any(|&v| v != 0.0));
            for (j, (a, b)) in with[i].iter().zip(&base[i]).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    (b * s).to_bits(),
                    "{kind:?} {}[{j}]: {a:e} is not {s} x {b:e}",
                    NAMES[i]
                );
            }
        }
        // Without the scale (what the backward did before), the router's gradient is off.
        let without = run(&mut ctx, &dout_s, 1.0);
        assert!(
            without[1]
                .iter()
                .zip(&base[1])
                .any(|(a, b)| (a - b * s).abs() > 1e-2 * (b * s).abs()),
            "{kind:?}: the test cannot tell the scale from none"
        );
        // The scale multiplies the balance term exactly as a scaled coefficient would (dOut = 0
        // leaves that term alone), for a scale that is not a power of two too.
        let zero = DeviceTensor::<bf16>::zeros(&dev, &[400, 64]).unwrap();
        let a = run(&mut ctx, &zero, 3.0);
        let mut g = Grads::new(&dev, &cfg);
        moe_backward(
            &mut ctx,
            Coefficient::Fixed(3.0 * coeff),
            &d.x,
            &d.weights(),
            &zero,
            g.as_mut(),
            false,
        )
        .unwrap();
        let b = g.to_host(bf16::to_f64);
        assert!(a[1].iter().any(|&v| v != 0.0));
        for i in 0..5 {
            assert!(
                a[i].iter()
                    .zip(&b[i])
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{kind:?} {}: scale 3 differs from coefficient x 3",
                NAMES[i]
            );
        }
        // A non-finite scale is refused.
        let mut g = Grads::new(&dev, &cfg);
        let err = moe_backward(
            &mut ctx,
            Coefficient::Fixed(coeff),
            &d.x,
            &d.weights(),
            &dout,
            g.as_mut(),
            BackwardOptions {
                accumulate: false,
                balance_grad_scale: f64::NAN,
            },
        );
        assert!(matches!(err, Err(Error::InvalidConfig(_))));
    }
}
