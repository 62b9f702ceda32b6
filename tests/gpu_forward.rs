//! The GPU forward of the ReMoE and TopK layers against the CPU reference, kernel by kernel and
//! for the whole layer, over the shape matrix of the forward issue: E in {1, 8, 64, 128, 512},
//! k in {1, 2, 8}, T in {0, 1, 7, 1000, 4096}, densities from 0 to 1, skewed loads, one expert
//! taking every token, sizes that are multiples of 8 but not of the tile sizes.
//!
//! Each kernel is checked against the reference applied to the previous kernel's GPU output, so
//! a failure names the kernel at fault: exact equality for the counts, offsets, token lists and
//! pair index; relative error for values (1e-5 for f32 logits, 1e-2 for bf16 paths, and for
//! those also 3e-2 per row, `common::ROW_REL_BOUND`, so that one wrong row cannot hide in the
//! average); y, besides, element by element within one rounding to bf16 of the f64 product of
//! the GPU's act (`common::assert_rounded_once`). Every run is a warm-up, then the whole
//! workspace and the output are poisoned (NaN / -1) and the same shapes run again, so an element
//! nobody wrote fails the test.

mod common;

use common::*;
use half::bf16;
use remoe_kernels::reference::{
    l1_balance_loss, matmul, relu_router, remoe_forward as ref_remoe_forward,
    softmax_topk_normalized_router, softmax_topk_router, swiglu_expert_forward,
    topk_forward as ref_topk_forward, topk_normalized_forward as ref_topk_normalized_forward,
    Dispatch,
};
use remoe_kernels::{
    moe_forward, Coefficient, Device, DeviceTensor, Error, LayerConfig, MoeContext, RouterKind,
};
use remoe_testkit::rng::fresh_seed;

const LAMBDA: f64 = 1e-3;
const AUX: f64 = 1e-2;

struct Outcome {
    stats: remoe_kernels::ForwardStats,
    out: Vec<f64>,
}

fn identity(e: usize) -> Vec<f64> {
    let mut m = vec![0.0; e * e];
    for i in 0..e {
        m[i * e + i] = 1.0;
    }
    m
}

/// Runs one case on the GPU and checks every stage. Returns what the caller may check further.
fn check_case(dev: &Device, kind: RouterKind, cfg: LayerConfig, density: &[f64]) -> Outcome {
    let seed = fresh_seed();
    let what = format!("{kind:?} {cfg:?} {}", seed_note(seed));
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    let p = problem_with_density(cfg, density, seed);
    let d = DeviceProblem::upload(dev, &p).unwrap();
    let coeff = if kind == RouterKind::Relu {
        LAMBDA
    } else {
        AUX
    };

    let mut ctx = MoeContext::<bf16>::new(dev);
    let mut out = DeviceTensor::<bf16>::zeros(dev, &[t, h]).unwrap();
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
    let warm_allocations = ctx.allocations();
    ctx.poison_workspace().unwrap();
    out.poison().unwrap();
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
    let stats = ctx.stats().unwrap();
    assert_eq!(
        ctx.allocations(),
        warm_allocations,
        "{what}: steady state allocated"
    );
    let out_bits = out.to_host().unwrap();

    // Deterministic: a third run gives the same bits.
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
    let again = out.to_host().unwrap();
    assert!(
        out_bits
            .iter()
            .zip(&again)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{what}: two runs differ"
    );

    // --- Router: logits against the f64 product of the same bf16 values.
    let logits: Vec<f64> = ctx
        .logits_to_host()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let gates: Vec<f64> = ctx
        .gates_to_host()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let want_logits = matmul(&p.x, &p.params.router, t, h, e);
    let err = rel_err(&logits, &want_logits);
    assert!(err < 1e-5, "{what}: logits rel err {err:e}");

    // The routing decisions, taken by the reference on the GPU's own logits (through an
    // identity router), must be identical: same gates, same selection.
    let id_cfg = LayerConfig { hidden: e, ..cfg };
    let (want_counts, selected, sums): (Vec<u32>, Vec<bool>, Vec<f64>) = match kind {
        RouterKind::Relu => {
            let r = relu_router(&logits, &identity(e), &id_cfg);
            assert_eq!(gates, r.gates, "{what}: gates are not ReLU(logits)");
            let sel = r.gates.iter().map(|&g| g > 0.0).collect();
            (r.counts, sel, r.gate_sums)
        }
        RouterKind::TopK | RouterKind::TopKNormalized => {
            let r = if kind == RouterKind::TopK {
                softmax_topk_router(&logits, &identity(e), &id_cfg)
            } else {
                softmax_topk_normalized_router(&logits, &identity(e), &id_cfg)
            };
            let probs: Vec<f64> = ctx
                .probs_to_host()
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect();
            let err = rel_err(&probs, &r.probs);
            assert!(err < 1e-5, "{what}: probs rel err {err:e}");
            for (i, (&g, &sel)) in gates.iter().zip(&r.selected).enumerate() {
                assert_eq!(g > 0.0, sel, "{what}: selection of pair {i}");
            }
            let err = rel_err(&gates, &r.gates);
            assert!(err < 1e-5, "{what}: gates rel err {err:e}");
            (r.counts, r.selected.clone(), r.prob_sums)
        }
    };
    assert_eq!(stats.tokens_per_expert, want_counts, "{what}: n_e");
    let pairs: usize = want_counts.iter().map(|&n| n as usize).sum();
    assert_eq!(stats.active_pairs, pairs, "{what}: |A|");
    if t > 0 {
        assert_eq!(
            stats.sparsity,
            (1.0 - pairs as f64 / (t * e) as f64) as f32 as f64
        );
    } else {
        assert_eq!(stats.sparsity, 1.0);
    }
    let gsums: Vec<f64> = ctx
        .gate_sums_to_host()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let err = rel_err(&gsums, &sums);
    assert!(err < 1e-5, "{what}: gate sums rel err {err:e}");
    let want_loss = l1_balance_loss(&want_counts, &sums, &cfg, coeff);
    assert!(
        (stats.balance_loss - want_loss).abs() <= 1e-4 * want_loss.abs() + 1e-30,
        "{what}: balance loss {} vs {want_loss}",
        stats.balance_loss
    );

    // --- Compaction: exactly the reference's lists.
    let disp = ctx.dispatch_to_host().unwrap();
    let want = Dispatch::from_selection(&gates, e, |ti, ei, _| selected[ti * e + ei]);
    assert_eq!(disp.offsets, want.offsets, "{what}: expert offsets");
    assert_eq!(disp.tokens, want.tokens, "{what}: token lists");
    let pair_gates: Vec<f64> = disp.gates.iter().map(|&g| g as f64).collect();
    assert_eq!(pair_gates, want.gates, "{what}: pair gates");
    let pidx = ctx.pair_index_to_host().unwrap();
    for ti in 0..t {
        for ei in 0..e {
            let pi = pidx[ti * e + ei];
            if selected[ti * e + ei] {
                assert!(
                    pi >= 0 && want.range(ei).contains(&(pi as usize)),
                    "{what}: pair index"
                );
                assert_eq!(disp.tokens[pi as usize] as usize, ti);
            } else {
                assert_eq!(pi, -1, "{what}: pair index of an inactive pair");
            }
        }
    }

    // --- Up projection with SwiGLU, on the same dispatch.
    let act = bf16_to_f64(&ctx.act_to_host().unwrap());
    let act_gpu_rows = act.len() / f.max(1);
    assert_eq!(act_gpu_rows, pairs);
    let mut want_act = vec![0.0; pairs * f];
    let mut want_y_from_gpu_act = vec![0.0; pairs * h];
    // sum over j of |act_j Wd[j, o]|: what the f32 accumulation's error is bounded by.
    let mut y_terms = vec![0.0; pairs * h];
    for ei in 0..e {
        let (wg, wu, wd) = p.params.expert(ei, &cfg);
        for pi in want.range(ei) {
            let ti = want.tokens[pi] as usize;
            let acts = swiglu_expert_forward(&p.x[ti * h..(ti + 1) * h], wg, wu, wd, h, f);
            want_act[pi * f..(pi + 1) * f].copy_from_slice(&acts.a);
            // Down projection of the GPU's own act row, to check that kernel alone.
            for j in 0..f {
                let aj = act[pi * f + j];
                for o in 0..h {
                    want_y_from_gpu_act[pi * h + o] += aj * wd[j * h + o];
                    y_terms[pi * h + o] += (aj * wd[j * h + o]).abs();
                }
            }
        }
    }
    let err = rel_err(&act, &want_act);
    assert!(err < 1e-2, "{what}: act rel err {err:e}");
    assert_rows_within(&what, "act", &act, &want_act, f, &[], &[]);

    // --- Down projection: y is the product of the GPU's act, summed in f32 and rounded once to
    // bf16 (so within bf16's unit round-off of it, elementwise, besides the f32 sum's error).
    let y = bf16_to_f64(&ctx.expert_out_to_host().unwrap());
    let err = rel_err(&y, &want_y_from_gpu_act);
    assert!(err < 1e-2, "{what}: y rel err {err:e}");
    assert_rows_within(&what, "y", &y, &want_y_from_gpu_act, h, &[], &[]);
    let want_y = &want_y_from_gpu_act;
    assert_rounded_once(&what, "y", &y, want_y, &y_terms, f, BF16_ROUNDOFF);

    // --- Combine of the GPU's own y.
    let out = bf16_to_f64(&out_bits);
    let mut want_out = vec![0.0; t * h];
    for ei in 0..e {
        for pi in want.range(ei) {
            let ti = want.tokens[pi] as usize;
            for o in 0..h {
                want_out[ti * h + o] += want.gates[pi] * y[pi * h + o];
            }
        }
    }
    let err = rel_err(&out, &want_out);
    assert!(err < 1e-2, "{what}: combine rel err {err:e}");
    assert_rows_within(&what, "combine", &out, &want_out, h, &[], &[]);

    // --- The whole layer against the reference layer.
    let (ref_out, ref_active) = match kind {
        RouterKind::Relu => {
            let r = ref_remoe_forward(&p.x, &p.params, &cfg, LAMBDA);
            let active: Vec<bool> = r.routing.gates.iter().map(|&g| g > 0.0).collect();
            (r.out, active)
        }
        RouterKind::TopK => {
            let r = ref_topk_forward(&p.x, &p.params, &cfg, AUX);
            (r.out, r.routing.selected)
        }
        RouterKind::TopKNormalized => {
            let r = ref_topk_normalized_forward(&p.x, &p.params, &cfg, AUX);
            (r.out, r.routing.selected)
        }
    };
    let err = rel_err(&out, &ref_out);
    assert!(err < 1e-2, "{what}: layer output rel err {err:e}");
    // Per row too. A TopK token whose k-th and (k+1)-th logits tie within f32 rounding may select
    // differently on the GPU (f32 logits) than in the reference (f64): its row is left out (see
    // routing_flips, which also bounds how many there are). ReMoE's output is continuous where a
    // gate turns on (the gate is about 0 there), so every ReMoE row is checked.
    let flips = routing_flips(&what, &gates, &ref_active, e);
    let skip = if kind.is_topk() { flips } else { Vec::new() };
    assert_rows_within(&what, "layer output", &out, &ref_out, h, &[], &skip);

    Outcome { stats, out }
}

#[test]
fn gpu_remoe_forward_matches_reference_across_shapes_and_densities() {
    let Some(dev) = gpu_or_skip("gpu_remoe_forward_matches_reference_across_shapes_and_densities")
    else {
        return;
    };
    let cases: Vec<(LayerConfig, Vec<f64>)> = vec![
        (LayerConfig::new(1, 64, 128, 1, 1), uniform_density(1, 1.0)),
        (LayerConfig::new(7, 128, 64, 8, 2), uniform_density(8, 0.3)),
        (
            LayerConfig::new(1000, 256, 512, 8, 2),
            uniform_density(8, 0.25),
        ),
        (
            LayerConfig::new(1000, 128, 256, 8, 1),
            skewed_density(8, 1.0),
        ),
        (
            LayerConfig::new(333, 136, 200, 8, 1),
            uniform_density(8, 0.4),
        ),
        (
            LayerConfig::new(4096, 128, 64, 64, 8),
            uniform_density(64, 8.0 / 64.0),
        ),
        (
            LayerConfig::new(4096, 64, 64, 128, 8),
            skewed_density(128, 8.0),
        ),
        (
            LayerConfig::new(1000, 64, 32, 512, 8),
            uniform_density(512, 8.0 / 512.0),
        ),
        (
            LayerConfig::new(4096, 768, 256, 8, 1),
            uniform_density(8, 1.0 / 8.0),
        ),
        // Few pairs, long F: the down projection's split-K (4 uneven K ranges).
        (
            LayerConfig::new(97, 136, 2056, 6, 1),
            uniform_density(6, 0.2),
        ),
    ];
    for (cfg, density) in cases {
        check_case(&dev, RouterKind::Relu, cfg, &density);
    }
}

#[test]
fn gpu_remoe_forward_with_no_tokens() {
    let Some(dev) = gpu_or_skip("gpu_remoe_forward_with_no_tokens") else {
        return;
    };
    let o = check_case(
        &dev,
        RouterKind::Relu,
        LayerConfig::new(0, 64, 64, 8, 1),
        &[0.5; 8],
    );
    assert_eq!(o.stats.active_pairs, 0);
    assert_eq!(o.stats.balance_loss, 0.0);
    assert!(o.out.is_empty());
}

#[test]
fn gpu_remoe_forward_with_every_gate_zero_writes_zeros() {
    let Some(dev) = gpu_or_skip("gpu_remoe_forward_with_every_gate_zero_writes_zeros") else {
        return;
    };
    let o = check_case(
        &dev,
        RouterKind::Relu,
        LayerConfig::new(1000, 128, 128, 8, 1),
        &[0.0; 8],
    );
    assert_eq!(o.stats.active_pairs, 0);
    assert_eq!(o.stats.sparsity, 1.0);
    assert!(o.out.iter().all(|&v| v == 0.0));
}

#[test]
fn gpu_remoe_forward_with_every_gate_active() {
    let Some(dev) = gpu_or_skip("gpu_remoe_forward_with_every_gate_active") else {
        return;
    };
    let o = check_case(
        &dev,
        RouterKind::Relu,
        LayerConfig::new(257, 128, 128, 8, 2),
        &[1.0; 8],
    );
    assert_eq!(o.stats.active_pairs, 257 * 8);
    assert_eq!(o.stats.sparsity, 0.0);
}

#[test]
fn gpu_remoe_forward_with_one_expert_taking_every_token() {
    let Some(dev) = gpu_or_skip("gpu_remoe_forward_with_one_expert_taking_every_token") else {
        return;
    };
    let mut d = vec![0.0; 8];
    d[3] = 1.0;
    let o = check_case(
        &dev,
        RouterKind::Relu,
        LayerConfig::new(4096, 128, 256, 8, 1),
        &d,
    );
    assert_eq!(o.stats.tokens_per_expert, vec![0, 0, 0, 4096, 0, 0, 0, 0]);
}

#[test]
fn gpu_topk_forward_matches_reference() {
    let Some(dev) = gpu_or_skip("gpu_topk_forward_matches_reference") else {
        return;
    };
    let cases = [
        LayerConfig::new(1, 64, 64, 1, 1),
        LayerConfig::new(7, 64, 64, 8, 2),
        LayerConfig::new(1000, 128, 128, 8, 2),
        LayerConfig::new(4096, 64, 64, 64, 8),
        LayerConfig::new(1000, 64, 32, 128, 1),
        LayerConfig::new(300, 64, 32, 512, 8),
    ];
    for cfg in cases {
        // The router weights' threshold row does not matter for TopK; any density works.
        let o = check_case(
            &dev,
            RouterKind::TopK,
            cfg,
            &uniform_density(cfg.experts, 0.5),
        );
        assert_eq!(o.stats.active_pairs, cfg.tokens * cfg.k);
    }
    let o = check_case(
        &dev,
        RouterKind::TopK,
        LayerConfig::new(0, 64, 64, 8, 2),
        &[0.5; 8],
    );
    assert!(o.out.is_empty());
}

/// The renormalised TopK layer (Mixtral's gates) through every stage, at the shapes of
/// [`gpu_topk_forward_matches_reference`] plus k = E; its gates are checked against the
/// reference's renormalisation of the GPU's own logits.
#[test]
fn gpu_topk_normalized_forward_matches_reference() {
    let Some(dev) = gpu_or_skip("gpu_topk_normalized_forward_matches_reference") else {
        return;
    };
    let cases = [
        LayerConfig::new(1, 64, 64, 1, 1),
        LayerConfig::new(7, 64, 64, 8, 2),
        LayerConfig::new(1000, 128, 128, 8, 2),
        LayerConfig::new(997, 64, 64, 8, 8),
        LayerConfig::new(4096, 64, 64, 64, 8),
        LayerConfig::new(1000, 64, 32, 128, 1),
        LayerConfig::new(300, 64, 32, 512, 8),
    ];
    for cfg in cases {
        let o = check_case(
            &dev,
            RouterKind::TopKNormalized,
            cfg,
            &uniform_density(cfg.experts, 0.5),
        );
        assert_eq!(o.stats.active_pairs, cfg.tokens * cfg.k);
    }
    let o = check_case(
        &dev,
        RouterKind::TopKNormalized,
        LayerConfig::new(0, 64, 64, 8, 2),
        &[0.5; 8],
    );
    assert!(o.out.is_empty());
}

#[test]
fn gpu_forward_refuses_bad_input_with_typed_errors() {
    let Some(dev) = gpu_or_skip("gpu_forward_refuses_bad_input_with_typed_errors") else {
        return;
    };
    let cfg = LayerConfig::new(16, 64, 64, 8, 1);
    let p = problem_with_density(cfg, &[0.5; 8], 1);
    let d = DeviceProblem::upload(&dev, &p).unwrap();
    let mut ctx = MoeContext::<bf16>::new(&dev);
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[16, 64]).unwrap();
    // F not a multiple of 8.
    let bad = LayerConfig::new(16, 64, 60, 8, 1);
    let err = moe_forward(
        &mut ctx,
        &bad,
        RouterKind::Relu,
        Coefficient::Fixed(0.0),
        &d.x,
        &d.weights(),
        &mut out,
    );
    assert!(matches!(err, Err(Error::InvalidConfig(_))));
    // Weights of the wrong shape for the config.
    let other = LayerConfig::new(16, 64, 64, 4, 1);
    let err = moe_forward(
        &mut ctx,
        &other,
        RouterKind::Relu,
        Coefficient::Fixed(0.0),
        &d.x,
        &d.weights(),
        &mut out,
    );
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })));
    // An output of the wrong shape.
    let mut small = DeviceTensor::<bf16>::zeros(&dev, &[15, 64]).unwrap();
    let err = moe_forward(
        &mut ctx,
        &cfg,
        RouterKind::Relu,
        Coefficient::Fixed(0.0),
        &d.x,
        &d.weights(),
        &mut small,
    );
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })));
    // TopK beyond 512 experts.
    let big = LayerConfig::new(4, 64, 8, 513, 1);
    let pb = problem_with_density(big, &[0.5; 513], 2);
    let db = DeviceProblem::upload(&dev, &pb).unwrap();
    let mut ob = DeviceTensor::<bf16>::zeros(&dev, &[4, 64]).unwrap();
    let err = moe_forward(
        &mut ctx,
        &big,
        RouterKind::TopK,
        Coefficient::Fixed(0.0),
        &db.x,
        &db.weights(),
        &mut ob,
    );
    assert!(matches!(err, Err(Error::InvalidConfig(_))));
    // The ReLU router has no such limit.
    moe_forward(
        &mut ctx,
        &big,
        RouterKind::Relu,
        Coefficient::Fixed(0.0),
        &db.x,
        &db.weights(),
        &mut ob,
    )
    .unwrap();
}
