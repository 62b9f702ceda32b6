//! The candle layer (feature `candle-cuda`) on the GPU: candle's gradients through the layer, the
//! balance regulariser's included, against the crate's CPU reference for `MoeLayer::new` (f32
//! masters at a checkpoint's names, shared experts, every router, T = 0 and 1 and a prime, and
//! a larger shape); sharded checkpoints; the shared lambda on the device
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
use remoe_kernels::candle::{
    Family, Lambda, MoeConfig, MoeLayer, MoeRouter, SharedExpertConfig, SharedRouting,
};
use remoe_kernels::reference::LayerParams;
use remoe_kernels::{HostMoeWeights, LayerConfig, PairCapacity, WeightLayout};
use remoe_testkit::rng::{fresh_seed, seeded, UniformVec};

use common::{gpu_or_skip, seed_note, training_steps};

/// candle's CUDA device 0, or `None` after the crate's skip message.
fn candle_gpu_or_skip(test: &str) -> Option<CDevice> {
    gpu_or_skip(test)?;
    Some(CDevice::new_cuda(0).expect("candle opens the device the crate opened"))
}

fn bf16_vec(v: &[f64]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f64(x)).collect()
}

/// loss = sum(out * G) through the candle module at a larger shape than the shared checks
/// (T 192, H 64, F 96, E 8, k 2), with the regulariser's gradient at scale w
/// (`SharedRouting::set_balance_grad_scale`) and at scale 0, against the reference's forward
/// and backward (dOut = G, balance gradient scaled by w) on the same bf16 inputs.
fn gradients_match_the_reference(router: MoeRouter, test: &str) {
    let Some(cdev) = candle_gpu_or_skip(test) else {
        return;
    };
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    let note = seed_note(seed);
    let cfg = MoeConfig {
        router,
        ..MoeConfig::remoe(64, 96, 8, 2)
    };
    let pr = candle_common::Problem::new(cfg, 192, &mut rng);
    for w in [0.5, 0.0] {
        let what = format!("{test}: balance scale {w}, {note}");
        candle_common::check_against_reference(&pr, 0.05, w, 1e-2, &what, &cdev);
    }
}

#[test]
fn remoe_gradients_through_candle_match_the_reference() {
    gradients_match_the_reference(
        candle_common::RELU,
        "remoe_gradients_through_candle_match_the_reference",
    );
}

#[test]
fn topk_gradients_through_candle_match_the_reference() {
    gradients_match_the_reference(
        candle_common::TOPK,
        "topk_gradients_through_candle_match_the_reference",
    );
}

#[test]
fn topk_normalized_gradients_through_candle_match_the_reference() {
    gradients_match_the_reference(
        candle_common::TOPK_NORM,
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

/// A model of one ReMoE layer (the paper's adaptive lambda, f32 masters, bf16 compute) and a
/// linear head, parameters from a VarMap, trained with AdamW on a fixed regression target: the
/// loss goes down, lambda moves, and the trained layer's weights survive a checkpoint round trip
/// in every layout.
#[test]
fn a_small_candle_model_trains() {
    let test = "a_small_candle_model_trains";
    let Some(cdev) = candle_gpu_or_skip(test) else {
        return;
    };
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    let (t, h, f, e, k) = (256, 64, 128, 8, 2);
    let cfg = MoeConfig::remoe(h, f, e, k);
    let routing = SharedRouting::new(&cfg, &cdev).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &cdev);
    let moe = MoeLayer::<bf16>::new(&cfg, &routing, vb.pp("moe")).unwrap();
    let head = candle_nn::linear_no_bias(h, h, vb.pp("head")).unwrap();

    // x in f32, the head's dtype: the layer computes in bf16 and returns x's dtype.
    let x = Tensor::from_slice(&rng.vec_uniform(t * h, 1.0), (t, h), &cdev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
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
    let lambda0 = routing.coefficient().unwrap();

    let steps = training_steps(150);
    let mut losses = Vec::new();
    for _ in 0..steps {
        let y = moe.forward(&x).unwrap();
        let pred = head.forward(&(&x + &y).unwrap()).unwrap();
        let mse = (pred.to_dtype(DType::F32).unwrap() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        losses.push(mse.to_scalar::<f32>().unwrap());
        // The task loss alone: the regulariser's gradient comes from the layer's backward.
        opt.backward_step(&mse).unwrap();
        routing.step().unwrap();
        moe.check_device_errors().unwrap();
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
        routing.coefficient().unwrap(),
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
/// forward with the crate's error inside candle's; a NaN router logit is reported by
/// `check_device_errors`, once.
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
    let round = |v: &[f64]| -> Vec<f64> { bf16_vec(v).iter().map(|x| x.to_f64()).collect() };
    // The layer's parameters at the checkpoint's names, in a VarMap of f32 masters.
    let pr = candle_common::Problem {
        cfg: MoeConfig {
            router: MoeRouter::Relu {
                lambda: Lambda::Fixed(1e-3),
            },
            ..MoeConfig::remoe(h, f, e, k)
        },
        t,
        x: round(&p.x),
        p: LayerParams {
            router: round(&p.params.router),
            gate: round(&p.params.gate),
            up: round(&p.params.up),
            down: round(&p.params.down),
        },
        shared: None,
        g: vec![1.0; t * h],
    };
    let routing = SharedRouting::new(&pr.cfg, &cdev).unwrap();
    let x = Tensor::from_slice(&bf16_vec(&p.x), (t, h), &cdev).unwrap();
    let run = |capacity: PairCapacity| -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
        let (_varmap, mut layer) = candle_common::varmap_layer(&pr, &routing, &cdev);
        layer.set_pair_capacity(capacity);
        let xv = Var::from_tensor(&x)?;
        let y = layer.forward(xv.as_tensor())?;
        let grads = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
        let dx = grads.get(xv.as_tensor()).expect("dx");
        let out = candle_common::f64_of(&y);
        let dx = candle_common::f64_of(dx);
        drop(grads);
        drop(y);
        layer.check_device_errors()?;
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
    let (_varmap, layer) = candle_common::varmap_layer(&pr, &routing, &cdev);
    drop(layer.forward(&nan_x).unwrap());
    let reported = layer.check_device_errors().unwrap_err().to_string();
    assert!(
        reported.contains("non-finite") || reported.contains("NaN"),
        "{test}: a NaN logit at check_device_errors: {reported}, {note}"
    );
    layer.check_device_errors().unwrap();
}

#[test]
fn staging_is_candles_ops_bit_for_bit_on_cuda() {
    let Some(cdev) = candle_gpu_or_skip("staging_is_candles_ops_bit_for_bit_on_cuda") else {
        return;
    };
    let seed = fresh_seed();
    candle_common::staging_is_candles_ops_bit_for_bit_for_every_master(&cdev, seed);
}
