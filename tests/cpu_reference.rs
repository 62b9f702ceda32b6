//! The CPU reference as a specification: hand-worked values of the forward formulas of docs/SPEC.md,
//! the TopK tie rule, the adaptive controller's update rule, and finite-difference checks (f64)
//! of every gradient of both layers on small random problems; and how the tests' seeds are read
//! (`REMOE_SEED`, remoe-testkit).

use approx::assert_relative_eq;
use remoe_kernels::reference::{
    l1_balance_loss, relu_router, remoe_backward, remoe_forward, silu, silu_grad,
    softmax_topk_normalized_router, softmax_topk_router, swiglu_expert_forward, topk_backward,
    topk_forward, topk_normalized_forward, topk_routing_of_logits, Dispatch, LayerGrads,
    LayerParams, SparsityController, TOPK_AUX_COEFF,
};
use remoe_kernels::{Error, LayerConfig};
use remoe_testkit::rng::{fresh_seed, parse_seed, seeded, Rng, TestRng, UniformVec, SEED_ENV};

// ---------------------------------------------------------------------------------------------
// ReLU router, regulariser, dispatch: hand-worked values.

#[test]
fn relu_router_computes_logits_gates_and_statistics() {
    // X [2,2], Wr [2,3]:
    //   token 0: L = [1 + 2*0.5, -1 + 2*0.25, 0 - 4] = [2, -0.5, -4]
    //   token 1: L = [-1 + 0.25, 1 + 0.125, 0 - 1]   = [-0.75, 1.125, -1]
    let cfg = LayerConfig::new(2, 2, 1, 3, 1);
    let x = [1.0, 2.0, -1.0, 0.5];
    let wr = [1.0, -1.0, 0.0, 0.5, 0.25, -2.0];
    let r = relu_router::<f64>(&x, &wr, &cfg);
    assert_eq!(r.logits, vec![2.0, -0.5, -4.0, -0.75, 1.125, -1.0]);
    assert_eq!(r.gates, vec![2.0, 0.0, 0.0, 0.0, 1.125, 0.0]);
    assert_eq!(r.counts, vec![1, 1, 0]);
    assert_eq!(r.gate_sums, vec![2.0, 1.125, 0.0]);
    assert_eq!(r.active_pairs, 2);
    assert_relative_eq!(r.sparsity(), 1.0 - 2.0 / 6.0);
}

#[test]
fn a_logit_of_exactly_zero_is_inactive() {
    let cfg = LayerConfig::new(1, 2, 1, 1, 1);
    let r = relu_router::<f64>(&[1.0, -1.0], &[1.0, 1.0], &cfg);
    assert_eq!(r.logits, vec![0.0]);
    assert_eq!(r.counts, vec![0]);
    assert_eq!(r.active_pairs, 0);
    assert!(r.dispatch(1).tokens.is_empty());
}

#[test]
fn regulariser_is_lambda_e_over_k_t_squared_times_sum_of_n_e_times_gate_sums() {
    // The routing of the first test: n = [1, 1, 0], sums = [2, 1.125, 0], T = 2, E = 3, k = 1.
    let cfg = LayerConfig::new(2, 2, 1, 3, 1);
    let loss = l1_balance_loss(&[1, 1, 0], &[2.0, 1.125, 0.0], &cfg, 0.5);
    assert_relative_eq!(loss, 0.5 * 3.0 / 4.0 * (2.0 + 1.125));
    // An empty batch has no loss (and no division by T = 0).
    let empty = LayerConfig::new(0, 2, 1, 3, 1);
    assert_eq!(l1_balance_loss(&[0, 0, 0], &[0.0; 3], &empty, 0.5), 0.0);
}

#[test]
fn dispatch_groups_pairs_by_expert_in_ascending_token_order() {
    // gates [3 tokens, 3 experts]
    let gates = [0.0, 1.0, 2.0, 3.0, 0.0, 4.0, 5.0, 6.0, 0.0];
    let d = Dispatch::from_selection(&gates, 3, |_, _, g: f64| g > 0.0);
    assert_eq!(d.offsets, vec![0, 2, 4, 6]);
    assert_eq!(d.tokens, vec![1, 2, 0, 2, 0, 1]);
    assert_eq!(d.gates, vec![3.0, 5.0, 1.0, 6.0, 2.0, 4.0]);
    assert_eq!(d.range(1), 2..4);
}

// ---------------------------------------------------------------------------------------------
// Experts and the combine.

#[test]
fn silu_and_its_derivative_match_their_definitions() {
    for z in [-3.0, -0.5, 0.0, 0.7, 4.0] {
        let s = 1.0 / (1.0 + f64::exp(-z));
        assert_relative_eq!(silu(z), z * s, epsilon = 1e-15);
        let h = 1e-6;
        let fd = (silu(z + h) - silu(z - h)) / (2.0 * h);
        assert_relative_eq!(silu_grad(z), fd, epsilon = 1e-8);
    }
}

#[test]
fn swiglu_expert_is_silu_gate_times_up_then_down() {
    // H = 2, F = 1: g = x.wg = 1, u = x.wu = -1, a = SiLU(1) * -1, y = a * [2, -1].
    let x = [1.0, 2.0];
    let acts = swiglu_expert_forward::<f64>(&x, &[0.5, 0.25], &[1.0, -1.0], &[2.0, -1.0], 2, 1);
    let a = -silu(1.0);
    assert_relative_eq!(acts.g[0], 1.0);
    assert_relative_eq!(acts.u[0], -1.0);
    assert_relative_eq!(acts.a[0], a);
    assert_relative_eq!(acts.y[0], 2.0 * a);
    assert_relative_eq!(acts.y[1], -a);
}

/// Two experts with F = 1 whose outputs are known: expert 0 gives [SiLU(1), 0], expert 1 gives
/// [0, SiLU(2)], for x = [1, 0].
fn two_known_experts(router: [f64; 4]) -> (LayerConfig, LayerParams<f64>) {
    let cfg = LayerConfig::new(1, 2, 1, 2, 1);
    let params = LayerParams {
        router: router.to_vec(),
        gate: vec![1.0, 0.0, 2.0, 0.0],
        up: vec![1.0, 0.0, 1.0, 0.0],
        down: vec![1.0, 0.0, 0.0, 1.0],
    };
    (cfg, params)
}

#[test]
fn output_is_the_gate_weighted_sum_of_the_active_experts() {
    // L = [0.5, 2]: both active, out = 0.5 * [SiLU(1), 0] + 2 * [0, SiLU(2)].
    let (cfg, params) = two_known_experts([0.5, 2.0, 0.0, 0.0]);
    let fwd = remoe_forward(&[1.0, 0.0], &params, &cfg, 0.0);
    assert_relative_eq!(fwd.out[0], 0.5 * silu(1.0), epsilon = 1e-15);
    assert_relative_eq!(fwd.out[1], 2.0 * silu(2.0), epsilon = 1e-15);
    // L = [0.5, -2]: expert 1 is off and contributes nothing.
    let (cfg, params) = two_known_experts([0.5, -2.0, 0.0, 0.0]);
    let fwd = remoe_forward(&[1.0, 0.0], &params, &cfg, 0.0);
    assert_eq!(fwd.out[1], 0.0);
    assert_eq!(fwd.routing.counts, vec![1, 0]);
}

#[test]
fn all_gates_zero_gives_zero_output_full_sparsity_and_zero_gradients() {
    let cfg = LayerConfig::new(4, 3, 2, 3, 1);
    let mut rng = seeded(11);
    // Positive inputs, negative router: every logit is negative.
    let x: Vec<f64> = (0..12).map(|_| rng.random_range(0.1..1.0)).collect();
    let mut params = random_params(&cfg, &mut rng);
    params.router.iter_mut().for_each(|w| *w = -w.abs() - 0.1);
    let fwd = remoe_forward(&x, &params, &cfg, 0.3);
    assert!(fwd.out.iter().all(|&v| v == 0.0));
    assert_eq!(fwd.routing.sparsity(), 1.0);
    assert_eq!(fwd.reg_loss, 0.0);
    let dout = rng.vec_uniform(12, 1.0);
    let g = remoe_backward(&x, &params, &cfg, 0.3, &fwd, &dout);
    assert!(g.dx.iter().chain(&g.params.router).all(|&v| v == 0.0));
    assert!(g
        .params
        .gate
        .iter()
        .chain(&g.params.down)
        .all(|&v| v == 0.0));
}

#[test]
fn one_expert_can_take_every_token() {
    let cfg = LayerConfig::new(9, 3, 2, 4, 1);
    let mut rng = seeded(12);
    let x: Vec<f64> = (0..27).map(|_| rng.random_range(0.1..1.0)).collect();
    let mut params = random_params(&cfg, &mut rng);
    for i in 0..3 {
        for e in 0..4 {
            params.router[i * 4 + e] = if e == 2 { 1.0 } else { -1.0 };
        }
    }
    let fwd = remoe_forward(&x, &params, &cfg, 0.0);
    assert_eq!(fwd.routing.counts, vec![0, 0, 9, 0]);
    assert_eq!(fwd.dispatch.offsets, vec![0, 0, 0, 9, 9]);
    assert_eq!(fwd.dispatch.tokens, (0..9).collect::<Vec<u32>>());
}

#[test]
fn an_empty_batch_has_empty_outputs_and_no_loss() {
    let cfg = LayerConfig::new(0, 4, 3, 5, 2);
    let mut rng = seeded(13);
    let params = random_params(&cfg, &mut rng);
    let fwd = remoe_forward(&[], &params, &cfg, 1.0);
    assert!(fwd.out.is_empty());
    assert_eq!(fwd.reg_loss, 0.0);
    assert_eq!(fwd.routing.sparsity(), 1.0);
    assert_eq!(fwd.dispatch.offsets, vec![0; 6]);
    let g = remoe_backward(&[], &params, &cfg, 1.0, &fwd, &[]);
    assert!(g.dx.is_empty());
    assert!(g.params.router.iter().all(|&v| v == 0.0));
    let tk = topk_forward(&[], &params, &cfg, TOPK_AUX_COEFF);
    assert!(tk.out.is_empty());
    assert_eq!(tk.aux_loss, 0.0);
}

// ---------------------------------------------------------------------------------------------
// TopK router.

#[test]
fn topk_ties_go_to_the_lower_expert_index() {
    // All four logits equal: the two lowest indices win.
    let cfg = LayerConfig::new(1, 1, 1, 4, 2);
    let r = softmax_topk_router::<f64>(&[1.0], &[0.3, 0.3, 0.3, 0.3], &cfg);
    assert_eq!(r.selected, vec![true, true, false, false]);
    // Experts 1 and 2 tie for the top: k = 1 picks expert 1.
    let cfg = LayerConfig::new(1, 1, 1, 4, 1);
    let r = softmax_topk_router::<f64>(&[1.0], &[0.1, 0.5, 0.5, 0.2], &cfg);
    assert_eq!(r.selected, vec![false, true, false, false]);
    assert_eq!(r.counts, vec![0, 1, 0, 0]);
}

#[test]
fn topk_gates_are_the_selected_softmax_probabilities_without_renormalisation() {
    // Logits [0, ln 2, ln 3]: P = [1/6, 2/6, 3/6]; k = 2 keeps experts 2 and 1.
    let cfg = LayerConfig::new(1, 1, 1, 3, 2);
    let r = softmax_topk_router::<f64>(&[1.0], &[0.0, 2f64.ln(), 3f64.ln()], &cfg);
    for (p, want) in r.probs.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
        assert_relative_eq!(*p, want, epsilon = 1e-15);
    }
    assert_eq!(r.gates[0], 0.0);
    assert_relative_eq!(r.gates[1], 1.0 / 3.0, epsilon = 1e-15);
    assert_relative_eq!(r.gates[2], 0.5, epsilon = 1e-15);
    // Switch aux loss over all pairs: c E / (k T^2) * (0 * 1/6 + 1 * 1/3 + 1 * 1/2).
    let loss = l1_balance_loss(&r.counts, &r.prob_sums, &cfg, 0.01);
    assert_relative_eq!(loss, 0.01 * 3.0 / 2.0 * (1.0 / 3.0 + 0.5), epsilon = 1e-15);
}

#[test]
fn topk_selects_exactly_k_experts_per_token() {
    let mut rng = seeded(fresh_seed());
    for (t, e, k) in [(17, 8, 1), (13, 8, 2), (5, 64, 8), (3, 4, 4)] {
        let cfg = LayerConfig::new(t, 6, 2, e, k);
        let x = rng.vec_uniform(t * 6, 1.0);
        let wr = rng.vec_uniform(6 * e, 1.0);
        let r = softmax_topk_router(&x, &wr, &cfg);
        for ti in 0..t {
            let row = &r.selected[ti * e..(ti + 1) * e];
            assert_eq!(row.iter().filter(|&&s| s).count(), k);
            // Every selected probability is at least every unselected one.
            let min_sel = (0..e)
                .filter(|&i| row[i])
                .map(|i| r.probs[ti * e + i])
                .fold(f64::INFINITY, f64::min);
            let max_off = (0..e)
                .filter(|&i| !row[i])
                .map(|i| r.probs[ti * e + i])
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(min_sel >= max_off);
        }
        assert_eq!(r.counts.iter().sum::<u32>() as usize, t * k);
    }
}

// ---------------------------------------------------------------------------------------------
// Renormalised TopK router (Mixtral, norm_topk_prob).

#[test]
fn topk_normalized_gates_are_the_selected_probabilities_renormalised() {
    // Logits [0, ln 2, ln 3]: P = [1/6, 2/6, 3/6]; k = 2 keeps experts 2 and 1, whose P sum to
    // 5/6: gates [0, 2/5, 3/5].
    let cfg = LayerConfig::new(1, 1, 1, 3, 2);
    let wr = [0.0, 2f64.ln(), 3f64.ln()];
    let r = softmax_topk_normalized_router::<f64>(&[1.0], &wr, &cfg);
    assert!(r.normalized);
    assert_eq!(r.selected, vec![false, true, true]);
    assert_eq!(r.gates[0], 0.0);
    assert_relative_eq!(r.gates[1], 0.4, epsilon = 1e-15);
    assert_relative_eq!(r.gates[2], 0.6, epsilon = 1e-15);
    // The probabilities and the aux loss are the plain router's: Mixtral's aux loss reads the
    // full softmax.
    let plain = softmax_topk_router::<f64>(&[1.0], &wr, &cfg);
    assert!(!plain.normalized);
    assert_eq!(r.probs, plain.probs);
    assert_eq!(r.prob_sums, plain.prob_sums);
    assert_eq!(r.counts, plain.counts);
    let loss = l1_balance_loss(&r.counts, &r.prob_sums, &cfg, 0.01);
    assert_relative_eq!(loss, 0.01 * 3.0 / 2.0 * (1.0 / 3.0 + 0.5), epsilon = 1e-15);
    // k = 1: the one gate is exactly 1.
    let cfg1 = LayerConfig::new(1, 1, 1, 3, 1);
    let r = softmax_topk_normalized_router::<f64>(&[1.0], &wr, &cfg1);
    assert_eq!(r.gates, vec![0.0, 0.0, 1.0]);
}

#[test]
fn topk_normalized_gates_are_the_softmax_over_the_selected_logits() {
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    for (t, e, k) in [(17, 8, 1), (13, 8, 2), (11, 64, 8), (5, 6, 6), (9, 7, 3)] {
        let cfg = LayerConfig::new(t, 6, 2, e, k);
        let x = rng.vec_uniform(t * 6, 1.0);
        let wr = rng.vec_uniform(6 * e, 1.0);
        let r = softmax_topk_normalized_router(&x, &wr, &cfg);
        let plain = softmax_topk_router(&x, &wr, &cfg);
        // Same selection, probabilities and statistics as the plain router.
        assert_eq!(r.selected, plain.selected, "seed {seed}");
        assert_eq!(r.probs, plain.probs, "seed {seed}");
        assert_eq!(r.counts, plain.counts, "seed {seed}");
        for ti in 0..t {
            let row = ti * e..(ti + 1) * e;
            let (l, g, sel) = (
                &r.logits[row.clone()],
                &r.gates[row.clone()],
                &r.selected[row],
            );
            // Computed here without the max shift (|logit| < 6): exp(l_i) / sum_S exp(l_j).
            let z: f64 = (0..e).filter(|&i| sel[i]).map(|i| l[i].exp()).sum();
            for i in 0..e {
                let want = if sel[i] { l[i].exp() / z } else { 0.0 };
                assert_relative_eq!(g[i], want, epsilon = 1e-15, max_relative = 1e-13);
            }
            assert_relative_eq!(g.iter().sum::<f64>(), 1.0, epsilon = 1e-13);
            if k == 1 {
                assert!(
                    g.iter().all(|&v| v == 0.0 || v == 1.0),
                    "seed {seed}: {g:?}"
                );
            }
            if k == e {
                for (gi, pi) in g.iter().zip(&r.probs[ti * e..(ti + 1) * e]) {
                    assert_relative_eq!(*gi, *pi, max_relative = 1e-13);
                }
            }
        }
    }
}

#[test]
fn topk_normalized_renormalises_over_the_finite_logits_it_selects() {
    // The logits of topk_never_selects_a_non_finite_logit_nor_more_than_k, given directly:
    //   token 0: [NaN, 3, Inf, 1, 2]       -> experts 1 and 4: e^3 / (e^3 + e^2), e^2 / (...)
    //   token 1: [NaN, -3, -Inf, -1, -2]   -> experts 3 and 4
    //   token 2: [NaN, 0, NaN, 0, 0]       -> experts 1 and 3, tied: 1/2 each
    //   token 3: [NaN, Inf, -Inf, NaN, 5]  -> expert 4 alone, fewer than k: gate 1
    //   token 4: all non-finite            -> no gate
    let (nan, inf) = (f64::NAN, f64::INFINITY);
    let logits = vec![
        nan, 3.0, inf, 1.0, 2.0, //
        nan, -3.0, -inf, -1.0, -2.0, //
        nan, 0.0, nan, 0.0, 0.0, //
        nan, inf, -inf, nan, 5.0, //
        nan, inf, -inf, nan, inf,
    ];
    let cfg = LayerConfig::new(5, 1, 1, 5, 2);
    let r = topk_routing_of_logits(logits.clone(), &cfg, true);
    let plain = topk_routing_of_logits(logits, &cfg, false);
    assert_eq!(r.selected, plain.selected);
    assert_eq!(r.counts, vec![0, 2, 0, 2, 3]);
    let s = 1.0 / (1.0 + (-1f64).exp());
    let want = [
        [0.0, s, 0.0, 0.0, 1.0 - s],
        [0.0, 0.0, 0.0, s, 1.0 - s],
        [0.0, 0.5, 0.0, 0.5, 0.0],
        [0.0, 0.0, 0.0, 0.0, 1.0],
        [0.0; 5],
    ];
    for (ti, w) in want.iter().enumerate() {
        for (ei, &v) in w.iter().enumerate() {
            assert_relative_eq!(r.gates[ti * 5 + ei], v, epsilon = 1e-15);
        }
    }
    assert!(r.gates.iter().chain(&r.probs).all(|v| v.is_finite()));
    assert!(r.probs[20..25].iter().all(|&p| p == 0.0));
    assert!(matches!(
        r.check_finite(),
        Err(Error::NonFiniteLogits {
            count: 15,
            first_token: 0
        })
    ));
}

#[test]
fn the_topk_normalized_layer_with_a_non_finite_logit_keeps_finite_router_and_expert_gradients() {
    let cfg = LayerConfig::new(6, 4, 3, 4, 2);
    let mut rng = seeded(12);
    let x = rng.vec_uniform(6 * 4, 1.0);
    let mut params = random_params(&cfg, &mut rng);
    for i in 0..4 {
        params.router[i * 4 + 2] = f64::NAN;
    }
    let fwd = topk_normalized_forward(&x, &params, &cfg, 0.05);
    assert_eq!(fwd.routing.counts[2], 0);
    assert_eq!(fwd.routing.counts.iter().sum::<u32>(), 6 * 2);
    for ti in 0..6 {
        let g = &fwd.routing.gates[ti * 4..(ti + 1) * 4];
        assert_relative_eq!(g.iter().sum::<f64>(), 1.0, epsilon = 1e-15);
    }
    assert!(fwd.out.iter().all(|v| v.is_finite()) && fwd.aux_loss.is_finite());
    let dout = rng.vec_uniform(6 * 4, 1.0);
    let g = topk_backward(&x, &params, &cfg, 0.05, &fwd, &dout);
    assert!(g.params.router.iter().all(|v| v.is_finite()));
    assert!((0..4).all(|i| g.params.router[i * 4 + 2] == 0.0));
    assert!(g
        .params
        .gate
        .iter()
        .chain(&g.params.up)
        .chain(&g.params.down)
        .all(|v| v.is_finite()));
}

// ---------------------------------------------------------------------------------------------
// Adaptive controller.

#[test]
fn controller_defaults_follow_the_paper() {
    let c = SparsityController::new(1, 8);
    assert_eq!(c.lambda(), 1e-8);
    assert_relative_eq!(c.target(), 1.0 - 1.0 / 8.0);
}

#[test]
fn controller_raises_lambda_when_too_dense_and_lowers_it_otherwise() {
    let mut c = SparsityController::with_params(1e-3, 1.2, 0.875);
    c.record(0.5); // denser than the target: push harder
    assert_relative_eq!(c.step(), 1.2e-3, epsilon = 1e-18);
    c.record(0.95); // sparser than the target: relax
    assert_relative_eq!(c.step(), 1e-3, epsilon = 1e-18);
    c.record(0.875); // exactly on target: "else" branch, relax
    assert_relative_eq!(c.step(), 1e-3 / 1.2, epsilon = 1e-18);
}

#[test]
fn controller_steps_on_the_mean_sparsity_of_the_step_and_then_starts_over() {
    let mut c = SparsityController::with_params(1.0, 2.0, 0.8);
    // Mean of 0.5 and 0.9 is 0.7 < 0.8, although one record alone is above the target.
    c.record(0.9);
    c.record(0.5);
    assert_eq!(c.step(), 2.0);
    // Nothing recorded: lambda stays.
    assert_eq!(c.step(), 2.0);
    // The old records are gone: only this one counts.
    c.record(0.85);
    assert_eq!(c.step(), 1.0);
}

#[test]
fn controller_keeps_precision_at_tiny_lambda() {
    // 50 steps down from 1e-8 end just above LAMBDA_MIN (1e-12), where the clamp starts.
    let mut c = SparsityController::new(1, 8);
    for _ in 0..50 {
        c.record(1.0);
        c.step();
    }
    let expected = 1e-8 / 1.2f64.powi(50);
    assert!(expected > remoe_kernels::controller::LAMBDA_MIN);
    assert_relative_eq!(c.lambda(), expected, max_relative = 1e-12);
}

// ---------------------------------------------------------------------------------------------
// Configuration checks.

#[test]
fn configs_the_math_cannot_take_are_refused() {
    assert!(matches!(
        LayerConfig::new(4, 8, 8, 4, 5).validate(),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        LayerConfig::new(4, 8, 8, 4, 0).validate(),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        LayerConfig::new(4, 0, 8, 4, 1).validate(),
        Err(Error::InvalidConfig(_))
    ));
    assert!(LayerConfig::new(0, 8, 8, 4, 1).validate().is_ok());
}

#[test]
fn gpu_configs_need_multiples_of_8_and_32_bit_sizes() {
    assert!(LayerConfig::new(16384, 768, 3072, 64, 1)
        .validate_for_gpu()
        .is_ok());
    assert!(matches!(
        LayerConfig::new(4, 12, 8, 4, 1).validate_for_gpu(),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        LayerConfig::new(4, 8, 20, 4, 1).validate_for_gpu(),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        LayerConfig::new(1 << 22, 1024, 8, 4, 1).validate_for_gpu(),
        Err(Error::TooLarge { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Finite differences (f64): every gradient of both layers.

fn random_params(cfg: &LayerConfig, rng: &mut TestRng) -> LayerParams<f64> {
    let (h, f, e) = (cfg.hidden, cfg.ffn, cfg.experts);
    LayerParams {
        router: rng.vec_uniform(h * e, 0.5),
        gate: rng.vec_uniform(e * h * f, 0.8),
        up: rng.vec_uniform(e * h * f, 0.8),
        down: rng.vec_uniform(e * f * h, 0.8),
    }
}

struct Problem {
    cfg: LayerConfig,
    x: Vec<f64>,
    params: LayerParams<f64>,
    dout: Vec<f64>,
}

/// A ReMoE problem whose logits stay at least 1e-3 away from the ReLU's kink, so central
/// differences with h = 1e-6 never cross it. Features 0 and 1 are a "live" and a "dead" bias:
/// `starved` gets a router bias that keeps it off for every token, `dead` a token that no
/// expert takes.
fn remoe_problem(
    cfg: LayerConfig,
    seed: u64,
    starved: Option<usize>,
    dead: Option<usize>,
) -> Problem {
    let (t, h, e) = (cfg.tokens, cfg.hidden, cfg.experts);
    assert!(h >= 3, "the bias features need H >= 3");
    let mut rng = seeded(seed);
    loop {
        let mut x = rng.vec_uniform(t * h, 1.0);
        let mut params = random_params(&cfg, &mut rng);
        for ti in 0..t {
            let is_dead = Some(ti) == dead;
            x[ti * h] = if is_dead { 0.0 } else { 1.0 };
            x[ti * h + 1] = if is_dead { 1.0 } else { 0.0 };
            if is_dead {
                x[ti * h + 2..(ti + 1) * h]
                    .iter_mut()
                    .for_each(|v| *v *= 0.1);
            }
        }
        // Router: noise features are bounded by 0.5 * (H - 2) in |logit|, the biases by 3 + that.
        let noise = 0.5 * (h - 2) as f64;
        for ei in 0..e {
            params.router[ei] = if Some(ei) == starved {
                -(noise + 1.0)
            } else {
                rng.random_range(-0.4..0.6)
            };
            params.router[e + ei] = -(noise + 1.0);
        }
        let routing = relu_router(&x, &params.router, &cfg);
        if routing.logits.iter().all(|l| l.abs() > 1e-3) {
            let dout = rng.vec_uniform(t * h, 1.0);
            return Problem {
                cfg,
                x,
                params,
                dout,
            };
        }
    }
}

/// A TopK problem whose k-th and (k+1)-th probabilities differ by at least 1e-4 per token, so
/// the selection does not change under the finite-difference steps.
fn topk_problem(cfg: LayerConfig, seed: u64) -> Problem {
    let (t, h, e, k) = (cfg.tokens, cfg.hidden, cfg.experts, cfg.k);
    let mut rng = seeded(seed);
    loop {
        let x = rng.vec_uniform(t * h, 1.0);
        let mut params = random_params(&cfg, &mut rng);
        params.router = rng.vec_uniform(h * e, 1.5);
        let r = softmax_topk_router(&x, &params.router, &cfg);
        let separated = (0..t).all(|ti| {
            let mut p: Vec<f64> = r.probs[ti * e..(ti + 1) * e].to_vec();
            p.sort_by(|a, b| b.partial_cmp(a).unwrap());
            k == e || p[k - 1] - p[k] > 1e-4
        });
        if separated {
            let dout = rng.vec_uniform(t * h, 1.0);
            return Problem {
                cfg,
                x,
                params,
                dout,
            };
        }
    }
}

#[derive(Clone, Copy)]
enum Layer {
    Remoe {
        lambda: f64,
    },
    Topk {
        aux: f64,
    },
    /// The renormalised TopK layer (Mixtral's gates).
    TopkNormalized {
        aux: f64,
    },
}

/// The scalar whose gradient the backward computes: sum(out * dout) + the layer's auxiliary loss.
fn objective(layer: Layer, x: &[f64], params: &LayerParams<f64>, p: &Problem) -> f64 {
    let (out, extra) = match layer {
        Layer::Remoe { lambda } => {
            let f = remoe_forward(x, params, &p.cfg, lambda);
            (f.out, f.reg_loss)
        }
        Layer::Topk { aux } => {
            let f = topk_forward(x, params, &p.cfg, aux);
            (f.out, f.aux_loss)
        }
        Layer::TopkNormalized { aux } => {
            let f = topk_normalized_forward(x, params, &p.cfg, aux);
            (f.out, f.aux_loss)
        }
    };
    out.iter().zip(&p.dout).map(|(o, d)| o * d).sum::<f64>() + extra
}

fn analytic(layer: Layer, p: &Problem) -> LayerGrads<f64> {
    match layer {
        Layer::Remoe { lambda } => {
            let fwd = remoe_forward(&p.x, &p.params, &p.cfg, lambda);
            remoe_backward(&p.x, &p.params, &p.cfg, lambda, &fwd, &p.dout)
        }
        Layer::Topk { aux } => {
            let fwd = topk_forward(&p.x, &p.params, &p.cfg, aux);
            topk_backward(&p.x, &p.params, &p.cfg, aux, &fwd, &p.dout)
        }
        Layer::TopkNormalized { aux } => {
            let fwd = topk_normalized_forward(&p.x, &p.params, &p.cfg, aux);
            topk_backward(&p.x, &p.params, &p.cfg, aux, &fwd, &p.dout)
        }
    }
}

/// Compares every element of every gradient with a central difference. Returns, per tensor, the
/// largest |analytic| seen, so callers can also assert a gradient is not trivially zero.
fn check_gradients(layer: Layer, p: &Problem) -> [(&'static str, f64); 5] {
    const H: f64 = 1e-6;
    let grads = analytic(layer, p);
    let names = ["dx", "d_router", "d_gate", "d_up", "d_down"];
    let mut largest = [0.0f64; 5];
    for (which, name) in names.iter().enumerate() {
        let analytic: &[f64] = match which {
            0 => &grads.dx,
            1 => &grads.params.router,
            2 => &grads.params.gate,
            3 => &grads.params.up,
            _ => &grads.params.down,
        };
        for i in 0..analytic.len() {
            let eval = |delta: f64| {
                let mut x = p.x.clone();
                let mut params = p.params.clone();
                let v = match which {
                    0 => &mut x[i],
                    1 => &mut params.router[i],
                    2 => &mut params.gate[i],
                    3 => &mut params.up[i],
                    _ => &mut params.down[i],
                };
                *v += delta;
                objective(layer, &x, &params, p)
            };
            let numeric = (eval(H) - eval(-H)) / (2.0 * H);
            let a = analytic[i];
            assert!(
                (a - numeric).abs() <= 1e-7 + 1e-6 * numeric.abs().max(a.abs()),
                "{name}[{i}]: analytic {a:e} vs finite difference {numeric:e}"
            );
            largest[which] = largest[which].max(a.abs());
        }
    }
    [
        (names[0], largest[0]),
        (names[1], largest[1]),
        (names[2], largest[2]),
        (names[3], largest[3]),
        (names[4], largest[4]),
    ]
}

fn assert_all_nonzero(largest: [(&'static str, f64); 5]) {
    for (name, v) in largest {
        assert!(v > 1e-6, "{name} is zero: the check proved nothing");
    }
}

#[test]
fn remoe_gradients_match_finite_differences_e4_k1() {
    let p = remoe_problem(LayerConfig::new(5, 5, 3, 4, 1), 101, None, None);
    assert_all_nonzero(check_gradients(Layer::Remoe { lambda: 0.25 }, &p));
}

#[test]
fn remoe_gradients_match_finite_differences_with_a_starved_expert_and_a_dead_token() {
    let cfg = LayerConfig::new(7, 6, 4, 8, 2);
    let p = remoe_problem(cfg, 202, Some(3), Some(4));
    let routing = relu_router(&p.x, &p.params.router, &cfg);
    assert_eq!(routing.counts[3], 0, "expert 3 should get no token");
    assert!(routing.gates[4 * 8..5 * 8].iter().all(|&g| g == 0.0));
    let grads = analytic(Layer::Remoe { lambda: 0.25 }, &p);
    // No gradient reaches a starved expert's weights.
    let hf = 6 * 4;
    assert!(grads.params.gate[3 * hf..4 * hf].iter().all(|&g| g == 0.0));
    assert_all_nonzero(check_gradients(Layer::Remoe { lambda: 0.25 }, &p));
}

#[test]
fn remoe_gradients_match_finite_differences_with_one_expert() {
    let p = remoe_problem(LayerConfig::new(3, 4, 2, 1, 1), 303, None, None);
    assert_all_nonzero(check_gradients(Layer::Remoe { lambda: 0.5 }, &p));
}

#[test]
fn remoe_gradients_match_finite_differences_with_many_small_experts() {
    let p = remoe_problem(LayerConfig::new(6, 4, 2, 16, 4), 404, Some(0), None);
    assert_all_nonzero(check_gradients(Layer::Remoe { lambda: 0.1 }, &p));
}

#[test]
fn remoe_regulariser_gradient_alone_matches_finite_differences() {
    // dOut = 0: everything left is the regulariser's gradient, through dL to Wr and X.
    let mut p = remoe_problem(LayerConfig::new(5, 4, 2, 4, 1), 505, None, None);
    p.dout.iter_mut().for_each(|d| *d = 0.0);
    let largest = check_gradients(Layer::Remoe { lambda: 0.7 }, &p);
    assert!(largest[0].1 > 1e-3 && largest[1].1 > 1e-3);
    assert!(largest[2..].iter().all(|&(_, v)| v == 0.0));
}

#[test]
fn topk_gradients_match_finite_differences_e4_k1() {
    let p = topk_problem(LayerConfig::new(5, 4, 3, 4, 1), 606);
    assert_all_nonzero(check_gradients(Layer::Topk { aux: 0.05 }, &p));
}

#[test]
fn topk_gradients_match_finite_differences_e8_k2() {
    let p = topk_problem(LayerConfig::new(6, 5, 2, 8, 2), 707);
    assert_all_nonzero(check_gradients(Layer::Topk { aux: 0.05 }, &p));
}

#[test]
fn topk_aux_loss_gradient_alone_matches_finite_differences() {
    let mut p = topk_problem(LayerConfig::new(5, 4, 2, 4, 2), 808);
    p.dout.iter_mut().for_each(|d| *d = 0.0);
    let largest = check_gradients(Layer::Topk { aux: 0.5 }, &p);
    assert!(largest[0].1 > 1e-4 && largest[1].1 > 1e-4);
    assert!(largest[2..].iter().all(|&(_, v)| v == 0.0));
}

// The renormalised TopK layer: every gradient by finite differences. The selection is the
// plain router's, so topk_problem's margin keeps it fixed under the steps here too.

#[test]
fn topk_normalized_gradients_match_finite_differences_e4_k1() {
    // k = 1: the gate is 1 whatever the logits; dWr and dX's router share come from the aux loss.
    let p = topk_problem(LayerConfig::new(5, 4, 3, 4, 1), 616);
    assert_all_nonzero(check_gradients(Layer::TopkNormalized { aux: 0.05 }, &p));
}

#[test]
fn topk_normalized_gradients_match_finite_differences_e8_k2() {
    let p = topk_problem(LayerConfig::new(6, 5, 2, 8, 2), 717);
    assert_all_nonzero(check_gradients(Layer::TopkNormalized { aux: 0.05 }, &p));
}

#[test]
fn topk_normalized_gradients_match_finite_differences_e6_k3_without_aux_loss() {
    // c = 0: the router's gradient is the renormalisation's alone.
    let p = topk_problem(LayerConfig::new(7, 5, 2, 6, 3), 727);
    assert_all_nonzero(check_gradients(Layer::TopkNormalized { aux: 0.0 }, &p));
}

#[test]
fn topk_normalized_gradients_match_finite_differences_k_equals_e() {
    let p = topk_problem(LayerConfig::new(4, 4, 2, 4, 4), 737);
    assert_all_nonzero(check_gradients(Layer::TopkNormalized { aux: 0.05 }, &p));
}

#[test]
fn topk_normalized_aux_loss_gradient_alone_matches_finite_differences() {
    let mut p = topk_problem(LayerConfig::new(5, 4, 2, 4, 2), 818);
    p.dout.iter_mut().for_each(|d| *d = 0.0);
    let largest = check_gradients(Layer::TopkNormalized { aux: 0.5 }, &p);
    assert!(largest[0].1 > 1e-4 && largest[1].1 > 1e-4);
    assert!(largest[2..].iter().all(|&(_, v)| v == 0.0));
    // With dOut = 0 only the aux loss is left, and it reads the full P either way: the two
    // TopK layers' gradients are the same.
    let aux = 0.5;
    let plain = topk_forward(&p.x, &p.params, &p.cfg, aux);
    let normalized = topk_normalized_forward(&p.x, &p.params, &p.cfg, aux);
    assert_eq!(plain.aux_loss, normalized.aux_loss);
    let a = topk_backward(&p.x, &p.params, &p.cfg, aux, &plain, &p.dout);
    let b = topk_backward(&p.x, &p.params, &p.cfg, aux, &normalized, &p.dout);
    for ((name, x), (_, y)) in all_grads(&a).into_iter().zip(all_grads(&b)) {
        for (i, (u, v)) in x.iter().zip(y).enumerate() {
            assert!(
                (u - v).abs() <= 1e-15 + 1e-12 * v.abs(),
                "{name}[{i}]: {u:e} (plain) vs {v:e} (renormalised)"
            );
        }
    }
}

#[test]
fn topk_normalized_router_gradient_differs_from_the_plain_one() {
    // The backward follows the routing it is given: on the same problem, the renormalised
    // layer's router gradient is not the plain one's (the test above would pass for a backward
    // that ignored the renormalisation only if this failed).
    let p = topk_problem(LayerConfig::new(6, 5, 2, 8, 2), 747);
    let plain = topk_forward(&p.x, &p.params, &p.cfg, 0.05);
    let normalized = topk_normalized_forward(&p.x, &p.params, &p.cfg, 0.05);
    let a = topk_backward(&p.x, &p.params, &p.cfg, 0.05, &plain, &p.dout);
    let b = topk_backward(&p.x, &p.params, &p.cfg, 0.05, &normalized, &p.dout);
    let diff = a
        .params
        .router
        .iter()
        .zip(&b.params.router)
        .map(|(u, v)| (u - v).abs())
        .fold(0.0, f64::max);
    assert!(diff > 1e-3, "the two routers' dWr agree to {diff:e}");
}

#[test]
fn f32_storage_agrees_with_f64_storage() {
    let p = remoe_problem(LayerConfig::new(9, 8, 6, 8, 2), 909, None, None);
    let to32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let params32 = LayerParams {
        router: to32(&p.params.router),
        gate: to32(&p.params.gate),
        up: to32(&p.params.up),
        down: to32(&p.params.down),
    };
    let out64 = remoe_forward(&p.x, &p.params, &p.cfg, 0.1).out;
    let out32 = remoe_forward(&to32(&p.x), &params32, &p.cfg, 0.1).out;
    for (a, b) in out32.iter().zip(&out64) {
        assert_relative_eq!(*a as f64, *b, epsilon = 1e-5, max_relative = 1e-5);
    }
}

// ---------------------------------------------------------------------------------------------
// Non-finite logits (issue 10, item 5): the policy the kernels implement, in the reference.

use remoe_kernels::reference::{
    check_logits_finite, remoe_backward_scaled, topk_backward_scaled, RemoeForward,
};

#[test]
fn a_non_finite_logit_gets_the_gate_zero_and_is_reported() {
    // X [3,2], Wr [2,3]; token 1 has an infinite feature, so its logits are [Inf, -Inf, Inf]:
    // no gate may be active (an infinite gate would make the output Inf or NaN).
    //   token 0: [1 + 0.25, -1 + 0.125, 0.5 - 1] = [1.25, -0.875, -0.5]
    //   token 2: [-1 + 1, 1 + 0.5, -0.5 - 4]     = [0, 1.5, -4.5]
    let cfg = LayerConfig::new(3, 2, 1, 3, 1);
    let x = [1.0, 0.5, f64::INFINITY, 0.0, -1.0, 2.0];
    let wr = [1.0, -1.0, 0.5, 0.5, 0.25, -2.0];
    let r = relu_router::<f64>(&x, &wr, &cfg);
    assert!(r.logits[3..6].iter().all(|l| l.is_infinite()));
    assert_eq!(r.gates, vec![1.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5, 0.0]);
    assert_eq!(r.counts, vec![1, 1, 0]);
    assert_eq!(r.active_pairs, 2);
    assert_eq!(
        r.check_finite(),
        Err(Error::NonFiniteLogits {
            count: 3,
            first_token: 1
        })
    );
    assert_eq!(
        check_logits_finite(&r.logits, 3),
        r.check_finite(),
        "the free function and the method agree"
    );
    // NaN as well: a NaN router column switches that expert off for every token.
    let wr_nan = [1.0, f64::NAN, 0.5, 0.5, 0.25, -2.0];
    let x_finite = [1.0, 0.5, 2.0, 0.0, -1.0, 2.0];
    let r = relu_router::<f64>(&x_finite, &wr_nan, &cfg);
    assert_eq!(r.counts[1], 0);
    assert!((0..3).all(|t| r.gates[t * 3 + 1] == 0.0));
    assert_eq!(
        r.check_finite(),
        Err(Error::NonFiniteLogits {
            count: 3,
            first_token: 0
        })
    );
    // A finite routing reports nothing.
    let ok = relu_router::<f64>(&x_finite, &wr, &cfg);
    assert_eq!(ok.check_finite(), Ok(()));
}

#[test]
fn the_layer_with_a_non_finite_logit_stays_finite_where_the_policy_says() {
    // Expert 1's router column is NaN: it takes no token; the others route as usual. The output,
    // the loss and the experts' weight gradients stay finite (dX picks up 0 * NaN through the
    // router's dense part, as IEEE says, in the reference and the kernels alike).
    let cfg = LayerConfig::new(5, 4, 3, 3, 1);
    let mut rng = seeded(11);
    let x = rng.vec_uniform(5 * 4, 1.0);
    let mut params = random_params(&cfg, &mut rng);
    for i in 0..4 {
        params.router[i * 3 + 1] = f64::NAN;
    }
    let fwd: RemoeForward<f64> = remoe_forward(&x, &params, &cfg, 0.1);
    assert!(fwd.out.iter().all(|v| v.is_finite()));
    assert!(fwd.reg_loss.is_finite());
    assert_eq!(fwd.routing.counts[1], 0);
    assert!(matches!(
        fwd.routing.check_finite(),
        Err(Error::NonFiniteLogits { count: 5, .. })
    ));
    let dout = rng.vec_uniform(5 * 4, 1.0);
    let g = remoe_backward(&x, &params, &cfg, 0.1, &fwd, &dout);
    for (name, v) in [
        ("dWr", &g.params.router),
        ("dWg", &g.params.gate),
        ("dWu", &g.params.up),
        ("dWd", &g.params.down),
    ] {
        assert!(v.iter().all(|v| v.is_finite()), "{name} is not finite");
    }
    // No gradient reaches the NaN column.
    assert!((0..4).all(|i| g.params.router[i * 3 + 1] == 0.0));
}

#[test]
fn topk_never_selects_a_non_finite_logit_nor_more_than_k() {
    // H = 1: logit[t, e] = x[t] * wr[e]. With wr = [NaN, 3, Inf, 1, 2] and x = [1, -1, 0]:
    //   token 0: [NaN, 3, Inf, 1, 2]        finite 3, 1, 2  -> experts 1 and 4
    //   token 1: [NaN, -3, -Inf, -1, -2]    finite -3, -1, -2 -> experts 3 and 4
    //   token 2: [NaN, 0, NaN, 0, 0]        three zeros tie -> experts 1 and 3
    let cfg = LayerConfig::new(3, 1, 1, 5, 2);
    let wr = [f64::NAN, 3.0, f64::INFINITY, 1.0, 2.0];
    let r = softmax_topk_router::<f64>(&[1.0, -1.0, 0.0], &wr, &cfg);
    let sel = |t: usize| -> Vec<usize> { (0..5).filter(|&e| r.selected[t * 5 + e]).collect() };
    assert_eq!(sel(0), vec![1, 4]);
    assert_eq!(sel(1), vec![3, 4]);
    assert_eq!(sel(2), vec![1, 3]);
    assert_eq!(r.counts, vec![0, 2, 0, 2, 2]);
    for t in 0..3 {
        let p = &r.probs[t * 5..(t + 1) * 5];
        assert!(p.iter().all(|v| v.is_finite()));
        assert_eq!(p[0], 0.0, "a NaN logit has P = 0");
        assert_relative_eq!(p.iter().sum::<f64>(), 1.0, epsilon = 1e-15);
    }
    // Token 0: the softmax is over the finite logits [3, 1, 2].
    let z = 3f64.exp() + 1f64.exp() + 2f64.exp();
    assert_relative_eq!(r.probs[1], 3f64.exp() / z, epsilon = 1e-15);
    assert_eq!(r.probs[2], 0.0, "an infinite logit has P = 0");
    assert_eq!(
        r.check_finite(),
        Err(Error::NonFiniteLogits {
            count: 6,
            first_token: 0
        })
    );

    // Fewer finite logits than k: fewer are selected; none finite: none is, and all P are 0.
    let cfg = LayerConfig::new(2, 1, 1, 3, 2);
    let r = softmax_topk_router::<f64>(&[1.0, 0.0], &[f64::NAN, f64::INFINITY, 1.0], &cfg);
    assert_eq!(r.selected[0..3], [false, false, true]);
    assert_eq!(r.probs[0..3], [0.0, 0.0, 1.0]);
    // Token 1: x = 0 gives [NaN, NaN (0 * Inf), 0]: one finite logit.
    assert_eq!(r.selected[3..6], [false, false, true]);
    let r = softmax_topk_router::<f64>(
        &[1.0],
        &[f64::NAN, f64::INFINITY, f64::NEG_INFINITY],
        &LayerConfig::new(1, 1, 1, 3, 2),
    );
    assert!(r.selected.iter().all(|&s| !s));
    assert!(r.probs.iter().all(|&p| p == 0.0));
    assert_eq!(r.counts, vec![0, 0, 0]);
}

#[test]
fn the_topk_layer_with_a_non_finite_logit_keeps_finite_router_and_expert_gradients() {
    let cfg = LayerConfig::new(6, 4, 3, 4, 2);
    let mut rng = seeded(12);
    let x = rng.vec_uniform(6 * 4, 1.0);
    let mut params = random_params(&cfg, &mut rng);
    for i in 0..4 {
        params.router[i * 4 + 2] = f64::NAN;
    }
    let fwd = topk_forward(&x, &params, &cfg, 0.05);
    assert_eq!(fwd.routing.counts[2], 0);
    assert_eq!(fwd.routing.counts.iter().sum::<u32>(), 6 * 2);
    assert!(fwd.out.iter().all(|v| v.is_finite()) && fwd.aux_loss.is_finite());
    let dout = rng.vec_uniform(6 * 4, 1.0);
    let g = topk_backward(&x, &params, &cfg, 0.05, &fwd, &dout);
    assert!(g.params.router.iter().all(|v| v.is_finite()));
    assert!((0..4).all(|i| g.params.router[i * 4 + 2] == 0.0));
    assert!(g
        .params
        .gate
        .iter()
        .chain(&g.params.up)
        .chain(&g.params.down)
        .all(|v| v.is_finite()));
}

// ---------------------------------------------------------------------------------------------
// The balance loss's gradient scale (issue 10, item 6).

/// Every element of `a` is `s` times `b`, to `tol` relative to the largest |b|.
fn assert_scaled(name: &str, a: &[f64], b: &[f64], s: f64, tol: f64) {
    let norm = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - s * y).abs() <= tol * s.abs() * norm,
            "{name}[{i}]: {x:e} is not {s} x {y:e}"
        );
    }
}

fn all_grads(g: &LayerGrads<f64>) -> [(&'static str, &[f64]); 5] {
    [
        ("dX", &g.dx),
        ("dWr", &g.params.router),
        ("dWg", &g.params.gate),
        ("dWu", &g.params.up),
        ("dWd", &g.params.down),
    ]
}

#[test]
fn a_loss_scale_on_dout_and_the_balance_gradient_scales_every_gradient() {
    // Loss scaling: dOut carries S; with balance_grad_scale = S every gradient is S times the
    // unscaled one, i.e. the effective lambda does not change with S. Without it (scale 1) the
    // regulariser's share would be S times too small.
    let p = remoe_problem(LayerConfig::new(6, 5, 3, 4, 1), 1001, None, None);
    let lambda = 0.3;
    let fwd = remoe_forward(&p.x, &p.params, &p.cfg, lambda);
    let base = remoe_backward(&p.x, &p.params, &p.cfg, lambda, &fwd, &p.dout);
    for s in [1024.0, 0.25, 3.7] {
        let dout_s: Vec<f64> = p.dout.iter().map(|d| d * s).collect();
        let scaled = remoe_backward_scaled(&p.x, &p.params, &p.cfg, lambda, &fwd, &dout_s, s);
        for ((name, a), (_, b)) in all_grads(&scaled).into_iter().zip(all_grads(&base)) {
            assert_scaled(name, a, b, s, 1e-12);
        }
        // The old behaviour, the regulariser's gradient unscaled, is measurably different.
        let unscaled = remoe_backward_scaled(&p.x, &p.params, &p.cfg, lambda, &fwd, &dout_s, 1.0);
        let off = unscaled
            .params
            .router
            .iter()
            .zip(&base.params.router)
            .map(|(a, b)| (a - s * b).abs())
            .fold(0.0, f64::max);
        assert!(off > 1e-6, "the test cannot tell the scale from none");
    }
    // Scale 1 is the plain backward, bit for bit.
    let one = remoe_backward_scaled(&p.x, &p.params, &p.cfg, lambda, &fwd, &p.dout, 1.0);
    assert_eq!(one, base);
}

#[test]
fn the_balance_gradient_scale_multiplies_only_the_balance_term() {
    // dOut = 0 leaves the regulariser's (aux loss's) gradient alone: the scale multiplies it
    // exactly as a lambda (c) multiplied by the scale would.
    let mut p = remoe_problem(LayerConfig::new(5, 4, 2, 4, 1), 1002, None, None);
    p.dout.iter_mut().for_each(|d| *d = 0.0);
    let fwd = remoe_forward(&p.x, &p.params, &p.cfg, 0.7);
    let a = remoe_backward_scaled(&p.x, &p.params, &p.cfg, 0.7, &fwd, &p.dout, 0.125);
    let b = remoe_backward(&p.x, &p.params, &p.cfg, 0.7 * 0.125, &fwd, &p.dout);
    assert_eq!(a, b);
    assert!(a.params.router.iter().any(|&v| v != 0.0));

    let mut p = topk_problem(LayerConfig::new(5, 4, 2, 4, 2), 1003);
    let fwd = topk_forward(&p.x, &p.params, &p.cfg, 0.5);
    let base = topk_backward(&p.x, &p.params, &p.cfg, 0.5, &fwd, &p.dout);
    let dout_s: Vec<f64> = p.dout.iter().map(|d| d * 64.0).collect();
    let scaled = topk_backward_scaled(&p.x, &p.params, &p.cfg, 0.5, &fwd, &dout_s, 64.0);
    for ((name, a), (_, b)) in all_grads(&scaled).into_iter().zip(all_grads(&base)) {
        assert_scaled(name, a, b, 64.0, 1e-12);
    }
    p.dout.iter_mut().for_each(|d| *d = 0.0);
    let a = topk_backward_scaled(&p.x, &p.params, &p.cfg, 0.5, &fwd, &p.dout, 4.0);
    let b = topk_backward(&p.x, &p.params, &p.cfg, 0.5 * 4.0, &fwd, &p.dout);
    assert_eq!(a, b);
    assert!(a.params.router.iter().any(|&v| v != 0.0));
}

// ---------------------------------------------------------------------------------------------
// Seeds: REMOE_SEED's format, and replay.

#[test]
fn a_seed_reads_as_decimal_or_0x_hexadecimal() {
    assert_eq!(parse_seed("0"), Ok(0));
    assert_eq!(parse_seed("12345"), Ok(12345));
    assert_eq!(parse_seed(" 42\n"), Ok(42));
    assert_eq!(parse_seed("18446744073709551615"), Ok(u64::MAX));
    assert_eq!(parse_seed("0x1f"), Ok(31));
    assert_eq!(parse_seed("0XFFFFFFFFFFFFFFFF"), Ok(u64::MAX));
    assert_eq!(parse_seed("0xdeadBEEF"), Ok(0xdead_beef));
}

#[test]
fn a_bad_seed_is_refused_with_a_message_naming_the_variable_and_the_value() {
    for bad in [
        "",
        "abc",
        "-1",
        "+1",
        "1.5",
        "0x",
        "0xg1",
        "1e3",
        "18446744073709551616",
        "0x1_0000_0000_0000_0000",
        "0x10000000000000000",
    ] {
        let why = parse_seed(bad).expect_err(bad);
        assert!(why.contains(SEED_ENV), "{why}");
        assert!(why.contains(&format!("{bad:?}")), "{why}");
    }
}

#[test]
fn the_same_seed_draws_the_same_values() {
    let seed = fresh_seed();
    let (mut a, mut b) = (seeded(seed), seeded(seed));
    for _ in 0..100 {
        assert_eq!(a.random::<u64>(), b.random::<u64>(), "seed {seed}");
    }
    assert_eq!(
        a.vec_uniform(50, 2.0),
        b.vec_uniform(50, 2.0),
        "seed {seed}"
    );
    assert!(seeded(seed ^ 1).random::<u64>() != seeded(seed).random::<u64>());
}
