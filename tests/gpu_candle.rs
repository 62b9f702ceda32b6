//! The candle layer (feature `candle-cuda`) on the GPU: candle's gradients through the layer, the
//! balance regulariser's included, against the crate's CPU reference, for the crate-layout
//! constructors and for `MoeLayer::new` (f32 masters at a checkpoint's names, shared experts,
//! every router, T = 0 and 1 and a prime); sharded checkpoints; the shared lambda on the device
//! (evaluation forwards not recorded); a small model that trains with a candle-nn optimiser;
//! checkpoint layouts in and out of a trained layer. The same checks on the CPU are
//! tests/candle_cpu.rs.
//!
//!     scripts/with-cuda cargo test --no-default-features --features candle-cuda --test gpu_candle
//!
//! (see the README's "candle" section for the link step on a machine without a driver).
#![cfg(feature = "candle-cuda")]

mod candle_common;
mod common;

use candle_core::{DType, Device as CDevice, Module, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use half::bf16;
use remoe_kernels::candle::{Family, MoeLayer, SharedExpertConfig};
use remoe_kernels::reference::{self, LayerParams};
use remoe_kernels::{HostMoeWeights, LayerConfig, PairCapacity, RouterKind, WeightLayout};
use remoe_testkit::rng::{fresh_seed, seeded, UniformVec};

use common::{gpu_or_skip, rel_err, seed_note, training_steps};

/// candle's CUDA device 0, or `None` after the crate's skip message.
fn candle_gpu_or_skip(test: &str) -> Option<CDevice> {
    gpu_or_skip(test)?;
    Some(CDevice::new_cuda(0).expect("candle opens the device the crate opened"))
}

fn bf16_vec(v: &[f64]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f64(x)).collect()
}

fn f64_of(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// loss = sum(out * G) through the candle module with the regulariser's gradient at scale w
/// (`SharedRouting::set_balance_grad_scale`), against the reference's forward and backward
/// (dOut = G, balance gradient scaled by w) on the same bf16 inputs; then at scale 0.
fn gradients_match_the_reference(router: RouterKind, test: &str) {
    let Some(cdev) = candle_gpu_or_skip(test) else {
        return;
    };
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    let (t, h, f, e, k) = (192, 64, 96, 8, 2);
    let cfg = LayerConfig::new(t, h, f, e, k);
    let (coeff, w) = (0.05, 0.5);

    let round = |v: Vec<f64>| -> Vec<f64> { bf16_vec(&v).iter().map(|x| x.to_f64()).collect() };
    let x = round(rng.vec_uniform(t * h, 1.0));
    let params = LayerParams {
        router: round(rng.vec_uniform(h * e, 0.3)),
        gate: round(rng.vec_uniform(e * h * f, 0.2)),
        up: round(rng.vec_uniform(e * h * f, 0.2)),
        down: round(rng.vec_uniform(e * f * h, 0.2)),
    };
    let g = round(rng.vec_uniform(t * h, 1.0));

    let host = HostMoeWeights::new(
        h,
        f,
        e,
        LayerParams {
            router: bf16_vec(&params.router),
            gate: bf16_vec(&params.gate),
            up: bf16_vec(&params.up),
            down: bf16_vec(&params.down),
        },
    )
    .unwrap();
    let mut layer = MoeLayer::from_host_weights(router, &host, k, coeff, &cdev).unwrap();
    layer.set_fixed_coefficient(coeff);
    layer.routing().set_balance_grad_scale(w).unwrap();
    let xv = Var::from_tensor(&Tensor::from_slice(&bf16_vec(&x), (t, h), &cdev).unwrap()).unwrap();
    let gt = Tensor::from_slice(&bf16_vec(&g), (t, h), &cdev).unwrap();

    let y = layer.forward_with_loss(xv.as_tensor()).unwrap();
    let task = (y.out.to_dtype(DType::F32).unwrap() * gt.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    // The balance loss is a detached value: adding it changes the loss, not the gradients.
    assert!(
        !y.balance_loss.track_op(),
        "{test}: the balance loss is detached"
    );
    let loss = (task + y.balance_loss.clone()).unwrap();
    let grads = loss.backward().unwrap();

    let (want_out, want_loss, want) = match router {
        RouterKind::Relu => {
            let fwd = reference::remoe_forward(&x, &params, &cfg, coeff);
            let b = reference::remoe_backward_scaled(&x, &params, &cfg, coeff, &fwd, &g, w);
            (fwd.out, fwd.reg_loss, b)
        }
        RouterKind::TopK => {
            let fwd = reference::topk_forward(&x, &params, &cfg, coeff);
            let b = reference::topk_backward_scaled(&x, &params, &cfg, coeff, &fwd, &g, w);
            (fwd.out, fwd.aux_loss, b)
        }
        RouterKind::TopKNormalized => {
            let fwd = reference::topk_normalized_forward(&x, &params, &cfg, coeff);
            let b = reference::topk_backward_scaled(&x, &params, &cfg, coeff, &fwd, &g, w);
            (fwd.out, fwd.aux_loss, b)
        }
    };
    let note = seed_note(seed);
    let got_loss = y.balance_loss.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (got_loss - want_loss).abs() <= 1e-2 * want_loss.abs().max(1e-6),
        "{test}: balance loss {got_loss} vs {want_loss}, {note}"
    );
    let e_out = rel_err(&f64_of(&y.out), &want_out);
    assert!(e_out < 1e-2, "{test}: out rel err {e_out}, {note}");

    let &[wr, wg, wu, wd] = layer.parameters().as_slice() else {
        panic!("{test}: the crate-layout layer has four parameters")
    };
    for (what, got, want) in [
        ("dx", grads.get(xv.as_tensor()), &want.dx),
        ("dWr", grads.get(wr), &want.params.router),
        ("dWg", grads.get(wg), &want.params.gate),
        ("dWu", grads.get(wu), &want.params.up),
        ("dWd", grads.get(wd), &want.params.down),
    ] {
        let got = got.unwrap_or_else(|| panic!("{test}: candle has no gradient for {what}"));
        let err = rel_err(&f64_of(got), want);
        assert!(err < 1e-2, "{test}: {what} rel err {err}, {note}");
    }

    // The regulariser's gradient at scale 0: dWr is the task's alone.
    layer.routing().set_balance_grad_scale(0.0).unwrap();
    let plain = layer.forward(xv.as_tensor()).unwrap();
    let task_only = (plain.to_dtype(DType::F32).unwrap() * gt.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let g2 = task_only.backward().unwrap();
    let want0 = match router {
        RouterKind::Relu => {
            let fwd = reference::remoe_forward(&x, &params, &cfg, coeff);
            reference::remoe_backward_scaled(&x, &params, &cfg, coeff, &fwd, &g, 0.0)
        }
        RouterKind::TopK => {
            let fwd = reference::topk_forward(&x, &params, &cfg, coeff);
            reference::topk_backward_scaled(&x, &params, &cfg, coeff, &fwd, &g, 0.0)
        }
        RouterKind::TopKNormalized => {
            let fwd = reference::topk_normalized_forward(&x, &params, &cfg, coeff);
            reference::topk_backward_scaled(&x, &params, &cfg, coeff, &fwd, &g, 0.0)
        }
    };
    let err = rel_err(&f64_of(g2.get(wr).unwrap()), &want0.params.router);
    assert!(
        err < 1e-2,
        "{test}: dWr without the balance gradient, rel err {err}, {note}"
    );
}

#[test]
fn remoe_gradients_through_candle_match_the_reference() {
    gradients_match_the_reference(
        RouterKind::Relu,
        "remoe_gradients_through_candle_match_the_reference",
    );
}

#[test]
fn topk_gradients_through_candle_match_the_reference() {
    gradients_match_the_reference(
        RouterKind::TopK,
        "topk_gradients_through_candle_match_the_reference",
    );
}

#[test]
fn topk_normalized_gradients_through_candle_match_the_reference() {
    gradients_match_the_reference(
        RouterKind::TopKNormalized,
        "topk_normalized_gradients_through_candle_match_the_reference",
    );
}

/// `MoeLayer::new` over a VarMap of f32 masters at the checkpoints' names, on CUDA, against the
/// reference: every router, T = 0, 1, a prime and more, the regulariser's gradient at two
/// scales, shared experts (gated and not, with DeepSeek's routed scale).
#[test]
fn the_layer_from_a_config_matches_the_reference_on_cuda() {
    let test = "the_layer_from_a_config_matches_the_reference_on_cuda";
    let Some(cdev) = candle_gpu_or_skip(test) else {
        return;
    };
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    let note = seed_note(seed);
    use candle_common::{cfg_of, check_against_reference, Problem, RELU, TOPK, TOPK_NORM};
    for (router, rname) in [
        (RELU, "relu"),
        (TOPK, "topk"),
        (TOPK_NORM, "topk-normalized"),
    ] {
        for family in [Family::Mixtral, Family::QwenMoe] {
            for t in [0, 1, 13, 40] {
                let pr = Problem::new(cfg_of(router, family, None), t, &mut rng);
                let what = format!("{test}: {rname} {family:?} T={t}, {note}");
                check_against_reference(&pr, 0.05, 1.0, 1e-2, &what, &cdev);
            }
        }
        let pr = Problem::new(cfg_of(router, Family::Mixtral, None), 29, &mut rng);
        let what = format!("{test}: {rname} balance scale 0.25, {note}");
        check_against_reference(&pr, 0.05, 0.25, 1e-2, &what, &cdev);
    }
    for (family, gated) in [(Family::QwenMoe, true), (Family::DeepSeek, false)] {
        for t in [0, 1, 23] {
            let shared = Some(SharedExpertConfig { ffn: 32, gated });
            let mut cfg = cfg_of(RELU, family, shared);
            if family == Family::DeepSeek {
                cfg.routed_scale = 2.5;
            }
            let pr = Problem::new(cfg, t, &mut rng);
            let what = format!("{test}: shared {family:?} T={t}, {note}");
            // f16: see tests/candle_cpu.rs's shared-expert test.
            candle_common::check_against_reference_in::<half::f16>(
                &pr, 0.05, 1.0, 2e-2, &what, &cdev,
            );
        }
    }
}

/// Sharded checkpoints on CUDA: mmapped constants and a VarMap filled from the shards agree
/// with the reference and with each other; `varmap.save()` writes every parameter.
#[test]
fn sharded_checkpoints_load_on_cuda() {
    let Some(cdev) = candle_gpu_or_skip("sharded_checkpoints_load_on_cuda") else {
        return;
    };
    candle_common::sharded_checkpoints(&cdev, fresh_seed());
}

/// The shared lambda on the device: evaluation forwards (training off, or no tracked input) are
/// not recorded; training forwards of two layers are averaged into one step.
#[test]
fn one_lambda_for_all_layers_on_cuda() {
    let Some(cdev) = candle_gpu_or_skip("one_lambda_for_all_layers_on_cuda") else {
        return;
    };
    candle_common::one_lambda_for_all_layers(&cdev, fresh_seed());
}

/// A model of one ReMoE layer and a linear head, parameters from a VarMap, trained with AdamW on
/// a fixed regression target: the loss goes down, lambda moves, and the trained layer's weights
/// survive a checkpoint round trip in every layout.
#[test]
fn a_small_candle_model_trains() {
    let test = "a_small_candle_model_trains";
    let Some(cdev) = candle_gpu_or_skip(test) else {
        return;
    };
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    let (t, h, f, e, k) = (256, 64, 128, 8, 2);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::BF16, &cdev);
    let moe = MoeLayer::<bf16>::remoe(vb.pp("moe"), h, f, e, k).unwrap();
    let head = candle_nn::linear_no_bias(h, h, vb.pp("head")).unwrap();

    let x = Tensor::from_slice(&bf16_vec(&rng.vec_uniform(t * h, 1.0)), (t, h), &cdev).unwrap();
    let target = Tensor::from_slice(&rng.vec_uniform(t * h, 0.5), (t, h), &cdev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let params = ParamsAdamW {
        lr: 3e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(varmap.all_vars(), params).unwrap();
    let lambda0 = moe.coefficient().unwrap();

    let steps = training_steps(150);
    let mut losses = Vec::new();
    for _ in 0..steps {
        let y = moe.forward_with_loss(&x).unwrap();
        let pred = head.forward(&(&x + &y.out).unwrap()).unwrap();
        let mse = (pred.to_dtype(DType::F32).unwrap() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        losses.push(mse.to_scalar::<f32>().unwrap());
        let loss = (mse + y.balance_loss).unwrap();
        opt.backward_step(&loss).unwrap();
        moe.end_step().unwrap();
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        losses.iter().all(|l| l.is_finite()),
        "{test}: loss {losses:?}, {}",
        seed_note(seed)
    );
    assert!(
        steps < 150 || last < 0.7 * first, // fewer steps only under compute-sanitizer
        "{test}: loss {first} -> {last}, {}",
        seed_note(seed)
    );
    assert_ne!(
        moe.coefficient().unwrap(),
        lambda0,
        "{test}: lambda never moved"
    );

    let trained = moe.host_weights().unwrap();
    for layout in WeightLayout::ALL {
        let bytes = trained.to_safetensors("moe.", layout).unwrap();
        let back = HostMoeWeights::<bf16>::from_safetensors(&bytes, "moe.", layout).unwrap();
        assert_eq!(back, trained, "{test}: {layout:?}");
    }
}

/// Issue 27 through candle: a layer in ReMoE's dense stage (every gate open) is dropless with a
/// capacity too small for the worst case (the eager forward counts its pairs), equal bit for bit
/// to the layer whose buffers hold every pair; a fixed capacity that the pairs exceed fails the
/// forward with the crate's error inside candle's; a NaN router logit is reported by `end_step`.
#[test]
fn the_candle_layer_is_dropless_and_reports_device_errors() {
    let test = "the_candle_layer_is_dropless_and_reports_device_errors";
    let Some(cdev) = candle_gpu_or_skip(test) else {
        return;
    };
    let seed = fresh_seed();
    let note = seed_note(seed);
    let (t, h, f, e, k) = (320, 64, 128, 8, 1);
    let cfg = LayerConfig::new(t, h, f, e, k);
    let p = remoe_testkit::synthetic::problem_with_density(cfg, &[1.0; 8], seed);
    let host = HostMoeWeights::new(
        h,
        f,
        e,
        LayerParams {
            router: bf16_vec(&p.params.router),
            gate: bf16_vec(&p.params.gate),
            up: bf16_vec(&p.params.up),
            down: bf16_vec(&p.params.down),
        },
    )
    .unwrap();
    let x = Tensor::from_slice(&bf16_vec(&p.x), (t, h), &cdev).unwrap();
    let run = |capacity: PairCapacity| -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
        let mut layer = MoeLayer::from_host_weights(RouterKind::Relu, &host, k, 0.0, &cdev)?;
        layer.set_fixed_coefficient(1e-3);
        layer.set_pair_capacity(capacity);
        let xv = Var::from_tensor(&x)?;
        let y = layer.forward_with_loss(xv.as_tensor())?;
        let loss = (y.out.to_dtype(DType::F32)?.sum_all()? + y.balance_loss)?;
        let grads = loss.backward()?;
        let dx = grads.get(xv.as_tensor()).expect("dx");
        let out = f64_of(&y.out);
        let dx = f64_of(dx);
        drop(grads);
        layer.end_step()?;
        Ok((out, dx))
    };
    let (want_out, want_dx) = run(PairCapacity::default()).unwrap();
    let (out, dx) = run(PairCapacity::Auto { budget_bytes: 0 }).unwrap();
    assert!(
        want_out.iter().any(|&v| v != 0.0),
        "{test}: a zero layer, {note}"
    );
    let same = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same(&out, &want_out), "{test}: counted output, {note}");
    assert!(same(&dx, &want_dx), "{test}: counted dX, {note}");

    let refused = run(PairCapacity::Pairs(t * e / 2)).unwrap_err().to_string();
    assert!(
        refused.contains("capacity"),
        "{test}: a fixed capacity the pairs exceed: {refused}, {note}"
    );

    let mut nan_x = bf16_vec(&p.x);
    nan_x[3 * h + 5] = bf16::NAN;
    let nan_x = Tensor::from_slice(&nan_x, (t, h), &cdev).unwrap();
    let layer = MoeLayer::from_host_weights(RouterKind::Relu, &host, k, 0.0, &cdev).unwrap();
    drop(layer.forward(&nan_x).unwrap());
    let reported = layer.end_step().unwrap_err().to_string();
    assert!(
        reported.contains("non-finite") || reported.contains("NaN"),
        "{test}: a NaN logit at end_step: {reported}, {note}"
    );
    layer.end_step().unwrap();
}
