//! The candle layer on candle's CPU device (feature `candle`, no GPU): forward, gradients and
//! statistics against the crate's reference; config.json parsing per family; parameters at the
//! checkpoints' names, from sharded safetensors files the tests write, in the user's `VarMap`;
//! shared experts through autograd; the shared lambda.
//!
//!     cargo test --features candle --test candle_cpu
#![cfg(feature = "candle")]

mod candle_common;
mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use half::{bf16, f16};
use remoe_kernels::candle::{
    Family, Lambda, MoeConfig, MoeLayer, MoeRouter, SharedExpertConfig, SharedRouting,
};
use remoe_testkit::rng::{fresh_seed, seeded, UniformVec};

use candle_common::{bf, cfg_of, f64_of, tensor, Problem, RELU, TOPK, TOPK_NORM};
use common::{rel_err, seed_note};

const CPU: Device = Device::Cpu;

fn check_against_reference(pr: &Problem, coeff: f64, scale: f64, tol: f64, what: &str) {
    candle_common::check_against_reference(pr, coeff, scale, tol, what, &CPU)
}

fn varmap_layer(pr: &Problem, routing: &SharedRouting) -> (VarMap, MoeLayer<bf16>) {
    candle_common::varmap_layer(pr, routing, &CPU)
}

#[test]
fn forward_and_gradients_match_the_reference_at_every_shape() {
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    let note = seed_note(seed);
    for (router, rname) in [
        (RELU, "relu"),
        (TOPK, "topk"),
        (TOPK_NORM, "topk-normalized"),
    ] {
        for family in [Family::Mixtral, Family::QwenMoe] {
            for t in [0, 1, 13, 40] {
                let pr = Problem::new(cfg_of(router, family, None), t, &mut rng);
                let what = format!("{rname} {family:?} T={t}, {note}");
                check_against_reference(&pr, 0.05, 1.0, 1e-2, &what);
            }
        }
    }
}

#[test]
fn the_regulariser_gradient_is_in_the_backward_at_its_scale() {
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    let note = seed_note(seed);
    for (router, rname) in [(RELU, "relu"), (TOPK, "topk")] {
        // A large coefficient, so that the regulariser's share of dWr is visible.
        let router = match router {
            MoeRouter::Relu { .. } => MoeRouter::Relu {
                lambda: Lambda::Fixed(20.0),
            },
            MoeRouter::TopK { renormalize, .. } => MoeRouter::TopK {
                renormalize,
                aux_coeff: 20.0,
            },
        };
        let pr = Problem::new(cfg_of(router, Family::Mixtral, None), 29, &mut rng);
        for scale in [0.0, 0.25, 1.0] {
            let what = format!("{rname} scale {scale}, {note}");
            check_against_reference(&pr, 20.0, scale, 1e-2, &what);
        }
        // And the scale matters: without the regulariser dWr is measurably different.
        let with = pr.reference(20.0, 1.0).grads.params.router;
        let without = pr.reference(20.0, 0.0).grads.params.router;
        assert!(
            rel_err(&without, &with) > 0.05,
            "{rname}: the regulariser is invisible"
        );
    }
}

#[test]
fn an_expert_without_tokens_and_all_gates_zero() {
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    let note = seed_note(seed);
    for (router, rname) in [(RELU, "relu"), (TOPK, "topk")] {
        let mut pr = Problem::new(cfg_of(router, Family::QwenMoe, None), 17, &mut rng);
        let (h, e) = (16, 4);
        // x > 0 and expert 3's router column < 0: its logit is negative for every token (no
        // ReLU gate), and far below the others (never in a top-2 of 4).
        pr.x = bf(pr.x.iter().map(|v| v.abs() + 0.1).collect());
        for i in 0..h {
            pr.p.router[i * e + 3] = -4.0;
        }
        check_against_reference(
            &pr,
            0.05,
            1.0,
            1e-2,
            &format!("{rname} empty expert, {note}"),
        );
        let routing = SharedRouting::new(&pr.cfg, &CPU).unwrap();
        let (_, layer) = varmap_layer(&pr, &routing);
        layer.forward(&tensor(&pr.x, &[17, h])).unwrap();
        let stats = layer.routing_stats().unwrap().unwrap();
        assert_eq!(stats.tokens_per_expert[3], 0, "{rname}: {stats:?}, {note}");
    }

    // Every ReLU gate zero: the output, every gradient and the regulariser are zero.
    let mut pr = Problem::new(cfg_of(RELU, Family::Mixtral, None), 11, &mut rng);
    pr.x = bf(pr.x.iter().map(|v| v.abs() + 0.1).collect());
    pr.p.router = vec![-0.5; 16 * 4];
    check_against_reference(&pr, 0.05, 1.0, 1e-2, &format!("all gates zero, {note}"));
    let want = pr.reference(0.05, 1.0);
    assert!(want.out.iter().all(|&v| v == 0.0) && want.balance == 0.0);
    let routing = SharedRouting::new(&pr.cfg, &CPU).unwrap();
    let (_, layer) = varmap_layer(&pr, &routing);
    let out = layer.forward(&tensor(&pr.x, &[11, 16])).unwrap();
    assert!(f64_of(&out).iter().all(|&v| v == 0.0), "{note}");
    let stats = layer.routing_stats().unwrap().unwrap();
    assert_eq!((stats.active_pairs, stats.sparsity), (0, 1.0), "{note}");
    assert_eq!(stats.active_experts_histogram.unwrap()[0], 11, "{note}");
}

#[test]
fn shared_experts_through_autograd_match_the_reference() {
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    let note = seed_note(seed);
    for (family, gated) in [(Family::QwenMoe, true), (Family::DeepSeek, false)] {
        for router in [RELU, TOPK] {
            let shared = Some(SharedExpertConfig { ffn: 32, gated });
            for t in [0, 1, 23] {
                let mut cfg = cfg_of(router, family, shared);
                if family == Family::DeepSeek {
                    cfg.routed_scale = 2.5;
                }
                let pr = Problem::new(cfg, t, &mut rng);
                // The shared expert runs as candle ops in the compute dtype, rounding every
                // intermediate (the routed part is the reference rounded once): a looser bound,
                // in f16, the layer's other dtype.
                let what = format!("{family:?} gated {gated} {router:?} T={t}, {note}");
                candle_common::check_against_reference_in::<f16>(&pr, 0.05, 1.0, 2e-2, &what, &CPU);
            }
        }
    }
}

/// The config.json keys of each family, as the models' files have them (abridged).
const MIXTRAL: &str = r#"{
  "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
  "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2,
  "router_aux_loss_coef": 0.02, "num_hidden_layers": 32, "torch_dtype": "bfloat16"
}"#;
const QWEN2_MOE: &str = r#"{
  "model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
  "moe_intermediate_size": 1408, "num_experts": 60, "num_experts_per_tok": 4,
  "norm_topk_prob": false, "shared_expert_intermediate_size": 5632,
  "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1, "mlp_only_layers": []
}"#;
const QWEN3_MOE: &str = r#"{
  "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
  "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
  "norm_topk_prob": true, "router_aux_loss_coef": 0.001
}"#;
const OLMOE: &str = r#"{
  "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64,
  "num_experts_per_tok": 8, "norm_topk_prob": false
}"#;
const DEEPSEEK_V2_LITE: &str = r#"{
  "model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944,
  "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2,
  "num_experts_per_tok": 6, "norm_topk_prob": false, "routed_scaling_factor": 1.0,
  "scoring_func": "softmax", "topk_method": "greedy", "aux_loss_alpha": 0.001,
  "first_k_dense_replace": 1
}"#;

#[test]
fn config_json_of_each_family() {
    let c = MoeConfig::from_hf_json(MIXTRAL).unwrap();
    assert_eq!(
        (
            c.family,
            c.hidden_size,
            c.expert_ffn,
            c.experts,
            c.experts_per_token
        ),
        (Family::Mixtral, 4096, 14336, 8, 2)
    );
    assert_eq!(
        c.router,
        MoeRouter::TopK {
            renormalize: true,
            aux_coeff: 0.02
        }
    );
    assert_eq!(c.shared_expert, None);

    let c = MoeConfig::from_hf_json(QWEN2_MOE).unwrap();
    assert_eq!(
        (c.family, c.expert_ffn, c.experts, c.experts_per_token),
        (Family::QwenMoe, 1408, 60, 4)
    );
    assert_eq!(
        c.shared_expert,
        Some(SharedExpertConfig {
            ffn: 5632,
            gated: true
        })
    );
    assert!(matches!(
        c.router,
        MoeRouter::TopK {
            renormalize: false,
            ..
        }
    ));

    let c = MoeConfig::from_hf_json(QWEN3_MOE).unwrap();
    assert_eq!(
        (c.expert_ffn, c.experts, c.experts_per_token),
        (768, 128, 8)
    );
    assert!(matches!(
        c.router,
        MoeRouter::TopK {
            renormalize: true,
            ..
        }
    ));
    assert_eq!(c.shared_expert, None);

    let c = MoeConfig::from_hf_json(OLMOE).unwrap();
    assert_eq!(
        (c.family, c.expert_ffn, c.experts),
        (Family::QwenMoe, 1024, 64)
    );
    assert_eq!(
        c.router,
        MoeRouter::TopK {
            renormalize: false,
            aux_coeff: 0.01
        }
    );

    let c = MoeConfig::from_hf_json(DEEPSEEK_V2_LITE).unwrap();
    assert_eq!(
        (c.family, c.expert_ffn, c.experts, c.experts_per_token),
        (Family::DeepSeek, 1408, 64, 6)
    );
    assert_eq!(
        c.shared_expert,
        Some(SharedExpertConfig {
            ffn: 2 * 1408,
            gated: false
        })
    );
    assert_eq!(c.routed_scale, 1.0);
    // DeepSeek-V2 scales unnormalised gates.
    let v2 = DEEPSEEK_V2_LITE.replace(
        r#""routed_scaling_factor": 1.0"#,
        r#""routed_scaling_factor": 16.0"#,
    );
    assert_eq!(MoeConfig::from_hf_json(&v2).unwrap().routed_scale, 16.0);

    // serde, as a field of a larger config.
    #[derive(serde::Deserialize)]
    struct Outer {
        #[serde(flatten)]
        moe: MoeConfig,
        num_hidden_layers: usize,
    }
    let o: Outer = serde_json::from_str(MIXTRAL).unwrap();
    assert_eq!((o.moe.experts, o.num_hidden_layers), (8, 32));
}

#[test]
fn config_json_that_the_kernels_cannot_compute_is_refused() {
    let refused = |json: &str, needle: &str| {
        let e = MoeConfig::from_hf_json(json).unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} should name {needle:?}");
    };
    // DeepSeek-V3: sigmoid scoring with a selection bias.
    refused(
        &DEEPSEEK_V2_LITE
            .replace(
                r#""scoring_func": "softmax""#,
                r#""scoring_func": "sigmoid""#,
            )
            .replace(r#""topk_method": "greedy""#, r#""topk_method": "noaux_tc""#),
        "sigmoid",
    );
    // DeepSeek-V2 (full): group-limited top-k.
    refused(
        &DEEPSEEK_V2_LITE.replace(
            r#""topk_method": "greedy""#,
            r#""topk_method": "group_limited_greedy""#,
        ),
        "group_limited_greedy",
    );
    refused(&MIXTRAL.replace("mixtral", "llama"), "llama");
    refused(
        &MIXTRAL.replace(r#""num_local_experts": 8,"#, ""),
        "num_local_experts",
    );
    refused(
        &MIXTRAL.replace(
            r#""num_experts_per_tok": 2,"#,
            r#""num_experts_per_tok": 9,"#,
        ),
        "k = 9",
    );
    refused(r#"{"model_type": "mixtral"}"#, "hidden_size");
    refused("not json", "config.json");
}

#[test]
fn parameters_load_from_sharded_files_at_each_familys_names_and_save_from_the_varmap() {
    candle_common::sharded_checkpoints(&CPU, fresh_seed());
}

/// Two layers sharing one adaptive lambda: evaluation forwards record nothing, training
/// forwards of both layers are averaged into one step per `step()`.
#[test]
fn one_lambda_for_all_layers_stepped_from_training_forwards_only() {
    candle_common::one_lambda_for_all_layers(&CPU, fresh_seed());
}

/// A model of one MoE layer (f32 masters, bf16 compute) and a head, a plain `Module` chain,
/// trained with AdamW: the loss falls, and the adaptive lambda moves.
#[test]
fn a_small_model_trains_on_the_cpu() {
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    let note = seed_note(seed);
    let (t, h) = (48, 16);
    let cfg = MoeConfig {
        router: MoeRouter::Relu {
            lambda: Lambda::Adaptive {
                lambda0: 1e-4,
                alpha: 1.2,
            },
        },
        shared_expert: Some(SharedExpertConfig {
            ffn: 16,
            gated: true,
        }),
        family: Family::QwenMoe,
        ..MoeConfig::remoe(h, 16, 4, 1)
    };
    let routing = SharedRouting::new(&cfg, &CPU).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &CPU);
    let moe = MoeLayer::<bf16>::new(&cfg, &routing, vb.pp("moe")).unwrap();
    let head = candle_nn::linear_no_bias(h, h, vb.pp("head")).unwrap();
    let x = tensor(&rng.vec_uniform(t * h, 1.0), &[t, h]);
    let target = tensor(&rng.vec_uniform(t * h, 0.5), &[t, h]);
    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut losses = Vec::new();
    for _ in 0..40 {
        let pred = x.apply(&moe).unwrap();
        let pred = (&x + pred).unwrap().apply(&head).unwrap();
        let mse = (pred - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        losses.push(mse.to_scalar::<f32>().unwrap());
        opt.backward_step(&mse).unwrap();
        routing.step().unwrap();
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.7 * first, "loss {first} -> {last}, {note}");
    assert_ne!(
        routing.coefficient().unwrap(),
        1e-4,
        "lambda never moved, {note}"
    );
}

/// `host_weights()` gives the weights the layer computes with in the crate's layout: the
/// checkpoint's per-expert \[out, in\] matrices stacked and transposed, in the compute dtype.
#[test]
fn host_weights_are_the_crate_layout_of_the_parameters() {
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    let note = seed_note(seed);
    let pr = Problem::new(cfg_of(TOPK, Family::QwenMoe, None), 5, &mut rng);
    let routing = SharedRouting::new(&pr.cfg, &CPU).unwrap();
    let (_varmap, layer) = varmap_layer(&pr, &routing);
    let w = layer.host_weights().unwrap();
    assert_eq!((w.hidden(), w.ffn(), w.experts()), (16, 24, 4), "{note}");
    let wide = |v: &[bf16]| v.iter().map(|x| x.to_f64()).collect::<Vec<_>>();
    let p = w.params();
    // The problem's values are bf16 already: exact.
    assert_eq!(wide(&p.router), pr.p.router, "{note}");
    assert_eq!(wide(&p.gate), pr.p.gate, "{note}");
    assert_eq!(wide(&p.up), pr.p.up, "{note}");
    assert_eq!(wide(&p.down), pr.p.down, "{note}");
}

#[test]
fn bad_input_is_an_error() {
    let cfg = cfg_of(RELU, Family::Mixtral, None);
    let routing = SharedRouting::new(&cfg, &CPU).unwrap();
    let vm = VarMap::new();
    let moe = MoeLayer::<bf16>::new(
        &cfg,
        &routing,
        VarBuilder::from_varmap(&vm, DType::F32, &CPU),
    )
    .unwrap();
    assert!(moe
        .forward(&Tensor::zeros((4, 15), DType::F32, &CPU).unwrap())
        .is_err());
    assert!(moe
        .forward(&Tensor::zeros((4, 16), DType::U32, &CPU).unwrap())
        .is_err());
    let mut x = vec![0.5f32; 4 * 16];
    x[20] = f32::NAN;
    let err = moe
        .forward(&Tensor::from_vec(x, (4, 16), &CPU).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("NaN or infinite"), "{err}");
    let mut bad = cfg.clone();
    bad.experts_per_token = 0;
    assert!(SharedRouting::new(&bad, &CPU).is_err());
    assert!(MoeLayer::<bf16>::new(
        &bad,
        &routing,
        VarBuilder::from_varmap(&vm, DType::F32, &CPU)
    )
    .is_err());
    // A coefficient out of range is refused when the layer is made.
    for router in [
        MoeRouter::Relu {
            lambda: Lambda::Fixed(-1.0),
        },
        MoeRouter::TopK {
            renormalize: false,
            aux_coeff: f64::NAN,
        },
    ] {
        let neg = MoeConfig {
            router,
            ..cfg.clone()
        };
        assert!(SharedRouting::new(&neg, &CPU).is_err(), "{router:?}");
        assert!(MoeLayer::<bf16>::new(
            &neg,
            &routing,
            VarBuilder::from_varmap(&vm, DType::F32, &CPU)
        )
        .is_err());
    }
}

#[test]
fn staging_is_candles_ops_bit_for_bit() {
    let seed = fresh_seed();
    candle_common::staging_is_candles_ops_bit_for_bit_for_every_master(&CPU, seed);
}
