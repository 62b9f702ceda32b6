//! The GPU backward of the ReMoE and TopK layers against the CPU reference, every gradient, over
//! shapes from the forward's matrix; determinism and accumulation; the adaptive controller on
//! the device against the CPU controller; and a small training run in which the controller
//! steers the sparsity to 1 - k/E while the loss falls.

mod common;

use common::*;
use half::bf16;
use remoe_kernels::reference::{
    remoe_backward as ref_remoe_backward, remoe_forward as ref_remoe_forward,
    topk_backward as ref_topk_backward, topk_forward as ref_topk_forward,
    topk_normalized_forward as ref_topk_normalized_forward, SparsityController,
};
use remoe_kernels::{
    moe_backward, moe_forward, Coefficient, Device, DeviceTensor, Error, LambdaController,
    LayerConfig, MoeContext, RouterKind,
};
use remoe_testkit::rng::{fresh_seed, seeded, Rng, UniformVec};

const NAMES: [&str; 5] = ["dX", "dWr", "dWg", "dWu", "dWd"];

/// Forward + backward on the GPU (with everything poisoned before the measured run) against the
/// reference; returns the GPU gradients.
fn check_backward(
    dev: &Device,
    kind: RouterKind,
    cfg: LayerConfig,
    density: &[f64],
    coeff: f64,
    zero_dout: bool,
) -> [Vec<f64>; 5] {
    let seed = fresh_seed();
    let what = format!("{kind:?} {cfg:?} coeff {coeff} {}", seed_note(seed));
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    let p = problem_with_density(cfg, density, seed);
    let d = DeviceProblem::upload(dev, &p).unwrap();
    let mut rng = seeded(seed ^ 0xd0);
    let dout_host: Vec<f64> = (0..t * h)
        .map(|_| {
            if zero_dout {
                0.0
            } else {
                bf16::from_f64(rng.random_range(-1.0..1.0)).to_f64()
            }
        })
        .collect();
    let dout = DeviceTensor::from_host(dev, &to_bf16(&dout_host), &[t, h]).unwrap();

    let mut ctx = MoeContext::<bf16>::for_training(dev);
    let mut out = DeviceTensor::<bf16>::zeros(dev, &[t, h]).unwrap();
    let mut grads = Grads::new(dev, &cfg);
    let run =
        |ctx: &mut MoeContext<bf16>, out: &mut DeviceTensor<bf16>, grads: &mut Grads<bf16>| {
            moe_forward(
                ctx,
                &cfg,
                kind,
                Coefficient::Fixed(coeff),
                &d.x,
                &d.weights(),
                out,
            )
            .unwrap();
            moe_backward(
                ctx,
                Coefficient::Fixed(coeff),
                &d.x,
                &d.weights(),
                &dout,
                grads.as_mut(),
                false,
            )
            .unwrap();
        };
    run(&mut ctx, &mut out, &mut grads);
    let warm = ctx.allocations();
    ctx.poison_workspace().unwrap();
    grads.poison();
    run(&mut ctx, &mut out, &mut grads);
    assert_eq!(ctx.allocations(), warm, "{what}: steady state allocated");
    let got = grads.to_host(bf16::to_f64);

    // Deterministic: the same bits again.
    run(&mut ctx, &mut out, &mut grads);
    let again = grads.to_host(bf16::to_f64);
    for (i, (a, b)) in got.iter().zip(&again).enumerate() {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{what}: {} differs between two runs",
            NAMES[i]
        );
    }

    let gpu_gates: Vec<f64> = ctx
        .gates_to_host()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let (want, ref_active) = match kind {
        RouterKind::Relu => {
            let fwd = ref_remoe_forward(&p.x, &p.params, &cfg, coeff);
            let active: Vec<bool> = fwd.routing.gates.iter().map(|&g| g > 0.0).collect();
            let g = ref_remoe_backward(&p.x, &p.params, &cfg, coeff, &fwd, &dout_host);
            (g, active)
        }
        RouterKind::TopK | RouterKind::TopKNormalized => {
            let fwd = if kind == RouterKind::TopK {
                ref_topk_forward(&p.x, &p.params, &cfg, coeff)
            } else {
                ref_topk_normalized_forward(&p.x, &p.params, &cfg, coeff)
            };
            let g = ref_topk_backward(&p.x, &p.params, &cfg, coeff, &fwd, &dout_host);
            (g, fwd.routing.selected)
        }
    };
    let want = [
        want.dx,
        want.params.router,
        want.params.gate,
        want.params.up,
        want.params.down,
    ];
    // dX and dWr go through dR = dOut . y, a dot product that can cancel: near a cancellation
    // its relative error is unbounded whatever the precision of the inputs (act is bf16, as the
    // down GEMM's operand must be). For those two the bound is 1e-2 relative plus bf16's unit
    // round-off times the magnitude of the summed terms (|X|^T M and M |Wr|^T, with M[t,e] =
    // sum_h |dOut[t,h] y[t,e,h]|); the expert weight gradients keep the plain 1e-2.
    let scales = router_term_scales(kind, &p, coeff, &dout_host);
    let (dx_scale, dwr_scale) = (scales.dx(), scales.dwr());
    // Per row (common::ROW_REL_BOUND, 3e-2), with the same slack per row for dX (per token) and
    // dWr (per feature). A token the GPU routed differently from the reference (a logit within
    // f32 rounding of the decision, see routing_flips) has a legitimately different dX row,
    // which is left out; such a token also moves every feature's dWr entry of its expert (and,
    // for TopK, a whole pair between two experts' weight gradients), so when one exists those
    // per-row checks are left to the whole-tensor bounds above. It happens about once in 10^7
    // pairs.
    let flips = routing_flips(&what, &gpu_gates, &ref_active, e);
    let any_flip = flips.iter().any(|&x| x);
    let row_slack = |rows: &[f64]| -> Vec<f64> { rows.iter().map(|v| BF16_ROUNDOFF * v).collect() };
    let (dx_slack, dwr_slack) = (row_slack(&scales.dx_rows), row_slack(&scales.dwr_rows));
    for i in 0..5 {
        let slack = match i {
            0 => dx_scale,
            1 => dwr_scale,
            _ => 0.0,
        };
        assert_within_terms(
            &got[i],
            &want[i],
            1e-2,
            BF16_ROUNDOFF * slack,
            &format!("{what}: {}", NAMES[i]),
        );
        let (cols, rows_slack, skip): (usize, &[f64], &[bool]) = match i {
            0 => (h, &dx_slack, &flips),
            1 => (e, &dwr_slack, &[]),
            2 | 3 => (f, &[], &[]),
            _ => (h, &[], &[]),
        };
        if any_flip && (i == 1 || (i >= 2 && kind.is_topk())) {
            continue;
        }
        assert_rows_within(&what, NAMES[i], &got[i], &want[i], cols, rows_slack, skip);
    }
    got
}

/// One shape of the ReMoE backward against the reference, on a GPU when there is one. Each shape
/// is its own test so that a failure names it, and so that compute-sanitizer, which runs every
/// test in a process of its own (scripts/run-suite.sh), keeps its host memory per shape.
fn remoe_backward_case(test: &str, cfg: LayerConfig, density: &[f64]) {
    let Some(dev) = gpu_or_skip(test) else {
        return;
    };
    check_backward(&dev, RouterKind::Relu, cfg, density, 1e-2, false);
}

#[test]
fn gpu_remoe_backward_one_token_one_expert() {
    remoe_backward_case(
        "gpu_remoe_backward_one_token_one_expert",
        LayerConfig::new(1, 64, 64, 1, 1),
        &uniform_density(1, 1.0),
    );
}

#[test]
fn gpu_remoe_backward_seven_tokens() {
    remoe_backward_case(
        "gpu_remoe_backward_seven_tokens",
        LayerConfig::new(7, 128, 64, 8, 2),
        &uniform_density(8, 0.3),
    );
}

#[test]
fn gpu_remoe_backward_eight_experts_k2() {
    remoe_backward_case(
        "gpu_remoe_backward_eight_experts_k2",
        LayerConfig::new(1000, 128, 256, 8, 2),
        &uniform_density(8, 0.25),
    );
}

#[test]
fn gpu_remoe_backward_skewed_loads() {
    remoe_backward_case(
        "gpu_remoe_backward_skewed_loads",
        LayerConfig::new(1000, 128, 128, 8, 1),
        &skewed_density(8, 1.0),
    );
}

/// Widths that are not multiples of any tile (H 136, F 200) and a prime-ish T.
#[test]
fn gpu_remoe_backward_ragged_widths() {
    remoe_backward_case(
        "gpu_remoe_backward_ragged_widths",
        LayerConfig::new(333, 136, 200, 8, 1),
        &uniform_density(8, 0.4),
    );
}

#[test]
fn gpu_remoe_backward_64_experts() {
    remoe_backward_case(
        "gpu_remoe_backward_64_experts",
        LayerConfig::new(4096, 64, 64, 64, 8),
        &uniform_density(64, 8.0 / 64.0),
    );
}

#[test]
fn gpu_remoe_backward_128_experts_skewed() {
    remoe_backward_case(
        "gpu_remoe_backward_128_experts_skewed",
        LayerConfig::new(1000, 64, 64, 128, 8),
        &skewed_density(128, 8.0),
    );
}

/// More experts than tokens: most experts get no pair at all.
#[test]
fn gpu_remoe_backward_512_experts() {
    remoe_backward_case(
        "gpu_remoe_backward_512_experts",
        LayerConfig::new(500, 64, 32, 512, 8),
        &uniform_density(512, 8.0 / 512.0),
    );
}

/// Few pairs, long F: the forward's down projection splits K, and y (which dR reads) is the sum
/// of its planes.
#[test]
fn gpu_remoe_backward_split_k_down_projection() {
    remoe_backward_case(
        "gpu_remoe_backward_split_k_down_projection",
        LayerConfig::new(97, 136, 2056, 6, 1),
        &uniform_density(6, 0.2),
    );
}

/// One expert taking every token, the others starved.
#[test]
fn gpu_remoe_backward_one_expert_takes_every_token() {
    let mut density = vec![0.0; 8];
    density[5] = 1.0;
    remoe_backward_case(
        "gpu_remoe_backward_one_expert_takes_every_token",
        LayerConfig::new(1500, 64, 128, 8, 1),
        &density,
    );
}

/// Hot experts whose weight gradients are reduced in fixed-order chunks
/// (kernels/weight_grad_split.cuh): expert 0 takes every one of a prime number of tokens (its
/// pairs cut into 9 chunks, the last one short), expert 3 about 1500 (2 chunks), expert 1 a few
/// hundred (not split) and expert 2 none; ragged widths. Against the reference, and bitwise
/// repeatable (check_backward runs it twice).
#[test]
fn gpu_remoe_backward_splits_a_hot_experts_weight_gradients() {
    remoe_backward_case(
        "gpu_remoe_backward_splits_a_hot_experts_weight_gradients",
        LayerConfig::new(5003, 72, 136, 4, 1),
        &[1.0, 0.05, 0.0, 0.3],
    );
}

/// The weight-gradient plan that the backward computes on the device follows the rule of
/// kernels/weight_grad_split.cuh, restated here: an expert is cut into
/// c = min(16, floor(n / target)) chunks when that is at least 2, where
/// target = max(512, ceil(ceil(H F / 32768) |A| / 64)); each chunk but the last holds
/// ceil(n / c) pairs rounded up to a multiple of 64; split experts take consecutive slots.
#[test]
fn gpu_weight_gradient_plan_follows_the_rule() {
    let Some(dev) = gpu_or_skip("gpu_weight_gradient_plan_follows_the_rule") else {
        return;
    };
    let seed = fresh_seed();
    let mut rng = seeded(seed);
    for (h, f) in [(64usize, 128usize), (768, 3072), (1536, 6144), (8, 8)] {
        for round in 0..20 {
            let e: usize = [1, 3, 8, 33, 64, 257][round % 6];
            // A mix of loads: uniform, one hot expert, many hot, empties.
            let counts: Vec<u32> = (0..e)
                .map(|i| match round % 4 {
                    0 => rng.random_range(0..3000),
                    1 => {
                        if i == e / 2 {
                            rng.random_range(0..200_000)
                        } else {
                            rng.random_range(0..50)
                        }
                    }
                    2 => rng.random_range(0..40_000),
                    _ => 0,
                })
                .collect();
            let what = format!("H {h} F {f} E {e} counts {counts:?} {}", seed_note(seed));
            let mut offsets = vec![0u32; e + 1];
            for i in 0..e {
                offsets[i + 1] = offsets[i] + counts[i];
            }
            let got = device_weight_grad_plan(&dev, &offsets, h, f, None);
            let want = weight_grad_plan_rule(&counts, h, f, None);
            assert_eq!(got, want, "{what}");
            // These experts as a share of a larger reduction (an expert-parallel owner's, cut
            // for every rank's pairs): the same rule with that total.
            let total: u64 = counts.iter().map(|&c| c as u64).sum::<u64>() * 3 + 17;
            assert_eq!(
                device_weight_grad_plan(&dev, &offsets, h, f, Some(total)),
                weight_grad_plan_rule(&counts, h, f, Some(total)),
                "{what}, cut for {total} pairs"
            );
            // What the plan must guarantee whatever the rule: chunks cover each expert's pairs
            // exactly, in whole 64-pair blocks but the last, and the slots fit the workspace.
            let (chunk_offsets, len, slots) =
                (&got[..=e], &got[e + 1..2 * e + 1], &got[2 * e + 1..]);
            let max_slots = {
                let tiles = (h * f).div_ceil(32768);
                let s = 64 / tiles;
                if s >= 2 {
                    s
                } else {
                    0
                }
            };
            let mut used = 0usize;
            for i in 0..e {
                let c = (chunk_offsets[i + 1] - chunk_offsets[i]) as usize;
                let n = counts[i] as usize;
                assert!((1..=16).contains(&c), "{what}: expert {i} has {c} chunks");
                if c > 1 {
                    let l = len[i] as usize;
                    assert!(
                        l.is_multiple_of(64) && (c - 1) * l < n && c * l >= n,
                        "{what}: expert {i}"
                    );
                    assert_eq!(slots[i] as usize, used, "{what}: expert {i}'s first slot");
                    used += c;
                } else {
                    assert_eq!(len[i] as usize, n, "{what}: expert {i} unsplit");
                }
            }
            assert!(used <= max_slots, "{what}: {used} slots of {max_slots}");
        }
    }
}

/// The plan as the device computes it for these offsets: [chunk offsets E+1][len E][slot E],
/// cut for `chunking` pairs in all (None: the offsets' total).
fn device_weight_grad_plan(
    dev: &Device,
    offsets: &[u32],
    h: usize,
    f: usize,
    chunking: Option<u64>,
) -> Vec<u32> {
    use remoe_kernels::sys;
    let e = offsets.len() - 1;
    let s = dev.stream();
    let eo = s.clone_htod(offsets).unwrap();
    let mut plan = s.alloc_zeros::<u32>(3 * e + 1).unwrap();
    {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let (eo_p, _g1) = eo.device_ptr(s);
        let (plan_p, _g2) = plan.device_ptr_mut(s);
        // SAFETY: eo holds e + 1 offsets and plan 3e + 1 words, both on this stream.
        let code = unsafe {
            sys::remoe_weight_grad_plan(
                eo_p as *const u32,
                e as i32,
                h as i32,
                f as i32,
                chunking.map_or(-1, |n| n as i64),
                plan_p as *mut u32,
                sys::stream_handle(s),
            )
        };
        assert_eq!(code, 0, "remoe_weight_grad_plan");
    }
    s.clone_dtoh(&plan).unwrap()
}

/// The rule of kernels/weight_grad_split.cuh, on the host, for a reduction of `chunking` pairs
/// in all (None: the counts' total).
fn weight_grad_plan_rule(counts: &[u32], h: usize, f: usize, chunking: Option<u64>) -> Vec<u32> {
    let pairs: u64 = chunking.unwrap_or_else(|| counts.iter().map(|&c| c as u64).sum());
    let tiles = ((h * f) as u64).div_ceil(32768);
    let splittable = 64 / tiles >= 2;
    let target = (tiles * pairs).div_ceil(64).max(512);
    let (mut offsets, mut lens, mut slots) = (vec![0u32], Vec::new(), Vec::new());
    let mut used = 0u32;
    for &n in counts {
        let c = (n as u64 / target).min(16);
        let (chunks, len) = if splittable && c >= 2 {
            let l = (n as u64).div_ceil(c).div_ceil(64) * 64;
            ((n as u64).div_ceil(l) as u32, l as u32)
        } else {
            (1, n)
        };
        offsets.push(offsets.last().unwrap() + chunks);
        lens.push(len);
        slots.push(used);
        if chunks > 1 {
            used += chunks;
        }
    }
    [offsets, lens, slots].concat()
}

#[test]
fn gpu_remoe_regulariser_gradient_alone_matches_reference() {
    let Some(dev) = gpu_or_skip("gpu_remoe_regulariser_gradient_alone_matches_reference") else {
        return;
    };
    // dOut = 0: what remains is the regulariser's gradient through dL into Wr and X.
    let cfg = LayerConfig::new(600, 64, 64, 8, 1);
    let g = check_backward(
        &dev,
        RouterKind::Relu,
        cfg,
        &uniform_density(8, 0.3),
        50.0,
        true,
    );
    assert!(
        g[1].iter().any(|&v| v != 0.0),
        "dWr should carry the regulariser"
    );
    assert!(g[2].iter().chain(&g[3]).chain(&g[4]).all(|&v| v == 0.0));
}

/// One shape of the TopK backward against the reference, on router weights that would make each
/// expert's ReLU gate active for about half of the tokens; `coeff` weighs the auxiliary balance
/// loss.
fn topk_backward_case(test: &str, cfg: LayerConfig, coeff: f64, zero_dout: bool) {
    topk_kind_backward_case(test, RouterKind::TopK, cfg, coeff, zero_dout);
}

fn topk_kind_backward_case(
    test: &str,
    kind: RouterKind,
    cfg: LayerConfig,
    coeff: f64,
    zero_dout: bool,
) -> Option<[Vec<f64>; 5]> {
    let dev = gpu_or_skip(test)?;
    let density = uniform_density(cfg.experts, 0.5);
    Some(check_backward(&dev, kind, cfg, &density, coeff, zero_dout))
}

#[test]
fn gpu_topk_backward_one_token_one_expert() {
    topk_backward_case(
        "gpu_topk_backward_one_token_one_expert",
        LayerConfig::new(1, 64, 64, 1, 1),
        1e-2,
        false,
    );
}

#[test]
fn gpu_topk_backward_seven_tokens() {
    topk_backward_case(
        "gpu_topk_backward_seven_tokens",
        LayerConfig::new(7, 64, 64, 8, 2),
        1e-2,
        false,
    );
}

#[test]
fn gpu_topk_backward_eight_experts_k2() {
    topk_backward_case(
        "gpu_topk_backward_eight_experts_k2",
        LayerConfig::new(1000, 128, 128, 8, 2),
        1e-2,
        false,
    );
}

#[test]
fn gpu_topk_backward_64_experts() {
    topk_backward_case(
        "gpu_topk_backward_64_experts",
        LayerConfig::new(2048, 64, 64, 64, 8),
        1e-2,
        false,
    );
}

#[test]
fn gpu_topk_backward_512_experts() {
    topk_backward_case(
        "gpu_topk_backward_512_experts",
        LayerConfig::new(300, 64, 32, 512, 8),
        1e-2,
        false,
    );
}

/// dOut = 0: the auxiliary loss's gradient alone.
#[test]
fn gpu_topk_backward_aux_loss_gradient_alone() {
    topk_backward_case(
        "gpu_topk_backward_aux_loss_gradient_alone",
        LayerConfig::new(500, 64, 64, 8, 2),
        5.0,
        true,
    );
}

// The renormalised TopK router (Mixtral's gates): the same shapes, and those where the
// renormalisation is special: k = 1 (every gate exactly 1, so dR has no gradient path to the
// logits and only the aux loss's term reaches Wr), k = E (the gates are P), a prime T.

fn topk_normalized_backward_case(test: &str, cfg: LayerConfig, coeff: f64, zero_dout: bool) {
    topk_kind_backward_case(test, RouterKind::TopKNormalized, cfg, coeff, zero_dout);
}

#[test]
fn gpu_topk_normalized_backward_one_token_one_expert() {
    topk_normalized_backward_case(
        "gpu_topk_normalized_backward_one_token_one_expert",
        LayerConfig::new(1, 64, 64, 1, 1),
        1e-2,
        false,
    );
}

#[test]
fn gpu_topk_normalized_backward_seven_tokens() {
    topk_normalized_backward_case(
        "gpu_topk_normalized_backward_seven_tokens",
        LayerConfig::new(7, 64, 64, 8, 2),
        1e-2,
        false,
    );
}

#[test]
fn gpu_topk_normalized_backward_eight_experts_k2() {
    topk_normalized_backward_case(
        "gpu_topk_normalized_backward_eight_experts_k2",
        LayerConfig::new(1000, 128, 128, 8, 2),
        1e-2,
        false,
    );
}

#[test]
fn gpu_topk_normalized_backward_prime_tokens_k_equals_e() {
    topk_normalized_backward_case(
        "gpu_topk_normalized_backward_prime_tokens_k_equals_e",
        LayerConfig::new(997, 64, 64, 8, 8),
        1e-2,
        false,
    );
}

#[test]
fn gpu_topk_normalized_backward_64_experts() {
    topk_normalized_backward_case(
        "gpu_topk_normalized_backward_64_experts",
        LayerConfig::new(2048, 64, 64, 64, 8),
        1e-2,
        false,
    );
}

#[test]
fn gpu_topk_normalized_backward_512_experts() {
    topk_normalized_backward_case(
        "gpu_topk_normalized_backward_512_experts",
        LayerConfig::new(300, 64, 32, 512, 8),
        1e-2,
        false,
    );
}

/// k = 1: every gate is exactly 1 whatever the logits, so the data term dR reaches no logit;
/// with the aux loss's coefficient 0 the router gets no gradient at all, while the experts'
/// weights do.
#[test]
fn gpu_topk_normalized_backward_k1_routes_no_data_gradient_into_the_router() {
    let test = "gpu_topk_normalized_backward_k1_routes_no_data_gradient_into_the_router";
    let Some(g) = topk_kind_backward_case(
        test,
        RouterKind::TopKNormalized,
        LayerConfig::new(251, 64, 64, 8, 1),
        0.0,
        false,
    ) else {
        return;
    };
    assert!(g[1].iter().all(|&v| v == 0.0), "{test}: dWr is not 0");
    assert!(g[4].iter().any(|&v| v != 0.0), "{test}: dWd is 0");
}

/// dOut = 0: the aux loss's gradient alone, through the full softmax P.
#[test]
fn gpu_topk_normalized_backward_aux_loss_gradient_alone() {
    let test = "gpu_topk_normalized_backward_aux_loss_gradient_alone";
    let Some(g) = topk_kind_backward_case(
        test,
        RouterKind::TopKNormalized,
        LayerConfig::new(500, 64, 64, 8, 2),
        5.0,
        true,
    ) else {
        return;
    };
    assert!(
        g[1].iter().any(|&v| v != 0.0),
        "{test}: dWr should carry the aux loss"
    );
    assert!(g[2].iter().chain(&g[3]).chain(&g[4]).all(|&v| v == 0.0));
}

/// Non-finite router logits (the crate's policy: no part in the softmax, never selected) through
/// the renormalised TopK layer's backward, against the reference: `nan_columns` of Wr are NaN
/// (those experts' logits are NaN for every token), and Wr[0, `inf_expert`] is +Inf (that
/// expert's logit is +-Inf or NaN by the sign of the token's first feature). The weight
/// gradients must match; dX picks up 0 * NaN through the router's dense part, as IEEE says, so
/// it is only required to be non-finite exactly where the reference's is.
fn check_normalized_backward_non_finite(
    dev: &Device,
    cfg: LayerConfig,
    nan_columns: &[usize],
    inf_expert: Option<usize>,
) {
    let seed = fresh_seed();
    let kind = RouterKind::TopKNormalized;
    let what = format!(
        "{kind:?} {cfg:?} NaN experts {nan_columns:?} {}",
        seed_note(seed)
    );
    let (t, h, e, coeff) = (cfg.tokens, cfg.hidden, cfg.experts, 0.5);
    let mut p = problem_with_density(cfg, &uniform_density(e, 0.5), seed);
    for &c in nan_columns {
        for i in 0..h {
            p.params.router[i * e + c] = f64::NAN;
        }
    }
    if let Some(c) = inf_expert {
        p.params.router[c] = f64::INFINITY;
    }
    let d = DeviceProblem::upload(dev, &p).unwrap();
    let mut rng = seeded(seed ^ 0xd0);
    let dout_host: Vec<f64> = (0..t * h)
        .map(|_| bf16::from_f64(rng.random_range(-1.0..1.0)).to_f64())
        .collect();
    let dout = DeviceTensor::from_host(dev, &to_bf16(&dout_host), &[t, h]).unwrap();
    let mut ctx = MoeContext::<bf16>::for_training(dev);
    let mut out = DeviceTensor::<bf16>::zeros(dev, &[t, h]).unwrap();
    let mut grads = Grads::new(dev, &cfg);
    grads.poison();
    let fixed = Coefficient::Fixed(coeff);
    moe_forward(&mut ctx, &cfg, kind, fixed, &d.x, &d.weights(), &mut out).unwrap();
    let fixed = Coefficient::Fixed(coeff);
    moe_backward(
        &mut ctx,
        fixed,
        &d.x,
        &d.weights(),
        &dout,
        grads.as_mut(),
        false,
    )
    .unwrap();
    assert!(
        matches!(
            ctx.check_device_errors(),
            Err(Error::NonFiniteLogits { .. })
        ),
        "{what}: the non-finite logits were not reported"
    );
    let got = grads.to_host(bf16::to_f64);
    let gpu_gates: Vec<f64> = ctx
        .gates_to_host()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();

    let fwd = ref_topk_normalized_forward(&p.x, &p.params, &cfg, coeff);
    let finite_logits = |ti: usize| {
        fwd.routing.logits[ti * e..(ti + 1) * e]
            .iter()
            .filter(|l| l.is_finite())
            .count()
    };
    for ti in 0..t {
        let g = &gpu_gates[ti * e..(ti + 1) * e];
        let chosen = g.iter().filter(|&&v| v > 0.0).count();
        assert_eq!(
            chosen,
            cfg.k.min(finite_logits(ti)),
            "{what}: token {ti}'s selection"
        );
        if chosen > 0 {
            let sum: f64 = g.iter().sum();
            assert!(
                (sum - 1.0).abs() < 1e-5,
                "{what}: token {ti}'s gates sum to {sum}"
            );
        }
    }
    let flips = routing_flips(&what, &gpu_gates, &fwd.routing.selected, e);
    let want = ref_topk_backward(&p.x, &p.params, &cfg, coeff, &fwd, &dout_host);
    for (i, w) in want.dx.iter().enumerate() {
        assert_eq!(
            got[0][i].is_finite(),
            w.is_finite(),
            "{what}: dX[{i}] {} vs {w}",
            got[0][i]
        );
    }
    let want = [
        want.params.router,
        want.params.gate,
        want.params.up,
        want.params.down,
    ];
    let scales = router_term_scales(kind, &p, coeff, &dout_host);
    let dwr_slack: Vec<f64> = scales.dwr_rows.iter().map(|v| BF16_ROUNDOFF * v).collect();
    for (i, w) in want.iter().enumerate() {
        let name = NAMES[i + 1];
        let g = &got[i + 1];
        assert!(
            w.iter().all(|v| v.is_finite()),
            "{what}: reference {name} is not finite"
        );
        let slack = if i == 0 { scales.dwr() } else { 0.0 };
        assert_within_terms(
            g,
            w,
            1e-2,
            BF16_ROUNDOFF * slack,
            &format!("{what}: {name}"),
        );
        if flips.iter().any(|&f| f) {
            continue;
        }
        let (cols, rows_slack): (usize, &[f64]) = match i {
            0 => (e, &dwr_slack),
            1 | 2 => (cfg.ffn, &[]),
            _ => (h, &[]),
        };
        assert_rows_within(&what, name, g, w, cols, rows_slack, &[]);
    }
    // No gradient reaches a NaN column of Wr (its logits have none).
    for &c in nan_columns {
        assert!(
            (0..h).all(|i| got[1][i * e + c] == 0.0),
            "{what}: dWr of NaN expert {c}"
        );
    }
}

#[test]
fn gpu_topk_normalized_backward_with_non_finite_logits_matches_reference() {
    let Some(dev) =
        gpu_or_skip("gpu_topk_normalized_backward_with_non_finite_logits_matches_reference")
    else {
        return;
    };
    // One NaN expert and one infinite logit per token: k of the rest are selected.
    check_normalized_backward_non_finite(&dev, LayerConfig::new(509, 64, 64, 8, 2), &[1], Some(3));
    // Five NaN experts of 8 with k = 4: three finite logits per token, all of them selected and
    // renormalised over three (the gates are then P).
    check_normalized_backward_non_finite(
        &dev,
        LayerConfig::new(300, 64, 64, 8, 4),
        &[1, 2, 4, 5, 6],
        None,
    );
}

#[test]
fn gpu_backward_with_no_pairs_gives_zero_weight_gradients() {
    let Some(dev) = gpu_or_skip("gpu_backward_with_no_pairs_gives_zero_weight_gradients") else {
        return;
    };
    let g = check_backward(
        &dev,
        RouterKind::Relu,
        LayerConfig::new(300, 64, 64, 8, 1),
        &[0.0; 8],
        1e-2,
        false,
    );
    assert!(g.iter().all(|v| v.iter().all(|&x| x == 0.0)));
    let g = check_backward(
        &dev,
        RouterKind::Relu,
        LayerConfig::new(0, 64, 64, 8, 1),
        &[0.5; 8],
        1e-2,
        false,
    );
    assert!(g[0].is_empty());
    assert!(g[1..].iter().all(|v| v.iter().all(|&x| x == 0.0)));
}

#[test]
fn gpu_backward_accumulates_weight_gradients_on_request() {
    accumulates_weight_gradients(
        "gpu_backward_accumulates_weight_gradients_on_request",
        LayerConfig::new(700, 64, 128, 8, 2),
        &uniform_density(8, 0.25),
    );
}

/// The same with hot experts whose weight gradients are reduced in chunks (the tile's last
/// chunk adds the old value after the chunks' sum).
#[test]
fn gpu_backward_accumulates_split_weight_gradients() {
    accumulates_weight_gradients(
        "gpu_backward_accumulates_split_weight_gradients",
        LayerConfig::new(3001, 64, 128, 4, 1),
        &[1.0, 0.2, 0.0, 0.5],
    );
}

/// The same over several ragged output tiles in both directions, where the transposed dWd
/// store's read-modify-write covers whole tiles and both Hopper warpgroups' rows (H 264: m tiles
/// of 128, 128 and 8; F 648, above the Hopper path's copy of dOut's and X's rows into pair order:
/// n tiles of 256, 256 and 136), with an empty expert and a hot one whose reduction is split
/// (1350 pairs, two chunks).
#[test]
fn gpu_backward_accumulates_weight_gradients_over_ragged_tiles() {
    accumulates_weight_gradients(
        "gpu_backward_accumulates_weight_gradients_over_ragged_tiles",
        LayerConfig::new(1500, 264, 648, 6, 2),
        &[0.9, 0.0, 0.3, 0.5, 0.05, 0.7],
    );
}

fn accumulates_weight_gradients(test: &str, cfg: LayerConfig, density: &[f64]) {
    let Some(dev) = gpu_or_skip(test) else {
        return;
    };
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    let seed = fresh_seed();
    let what = format!("{test}: {}", seed_note(seed));
    let p = problem_with_density(cfg, density, seed);
    let d = DeviceProblem::upload(&dev, &p).unwrap();
    let mut rng = seeded(seed ^ 0xd0);
    let dout =
        DeviceTensor::from_host(&dev, &to_bf16(&rng.vec_uniform(t * h, 1.0)), &[t, h]).unwrap();
    let mut ctx = MoeContext::<bf16>::for_training(&dev);
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
    let lambda = Coefficient::Fixed(1e-2);
    moe_forward(
        &mut ctx,
        &cfg,
        RouterKind::Relu,
        lambda,
        &d.x,
        &d.weights(),
        &mut out,
    )
    .unwrap();
    let stats = ctx.stats().unwrap();
    // What the forward keeps for the backward, as documented: per (token, expert) the logit,
    // gate and pair index (12 bytes); per expert n_e and two offsets; per pair its token and
    // gate (8), g and u (2 x 2F bytes). Not act, nor y: the backward recomputes act and takes
    // dR from its dAct GEMM.
    let want = t * e * 12 + 4 * e + 2 * 4 * (e + 1) + stats.active_pairs * (8 + 4 * f);
    assert_eq!(
        ctx.saved_bytes().unwrap(),
        want,
        "{what}: saved_bytes accounting"
    );
    let mut once = Grads::new(&dev, &cfg);
    moe_backward(
        &mut ctx,
        Coefficient::Fixed(1e-2),
        &d.x,
        &d.weights(),
        &dout,
        once.as_mut(),
        false,
    )
    .unwrap();
    let mut twice = Grads::new(&dev, &cfg);
    for _ in 0..2 {
        moe_backward(
            &mut ctx,
            Coefficient::Fixed(1e-2),
            &d.x,
            &d.weights(),
            &dout,
            twice.as_mut(),
            true,
        )
        .unwrap();
    }
    let (a, b) = (once.to_host(bf16::to_f64), twice.to_host(bf16::to_f64));
    for i in 1..5 {
        assert!(
            a[i].iter().any(|&v| v != 0.0),
            "{what}: {} is zero",
            NAMES[i]
        );
        for (x, y) in a[i].iter().zip(&b[i]) {
            assert_eq!(
                2.0 * x,
                *y,
                "{what}: {}: accumulated twice is not twice",
                NAMES[i]
            );
        }
    }
}

/// The forward does not keep act for the backward, whose recomputation is the forward's act
/// bit for bit (the f16 layer: tests/gpu_f16_and_bounds.rs).
#[test]
fn gpu_backward_recomputes_the_forwards_act_bit_for_bit() {
    let test = "gpu_backward_recomputes_the_forwards_act_bit_for_bit";
    let Some(dev) = gpu_or_skip(test) else {
        return;
    };
    let cfg = LayerConfig::new(517, 72, 200, 8, 2);
    let seed = fresh_seed();
    let p = problem_with_density(cfg, &skewed_density(8, 2.0), seed);
    let d = DeviceProblem::upload(&dev, &p).unwrap();
    let mut rng = seeded(seed ^ 0xd0);
    let dout = DeviceTensor::from_host(&dev, &to_bf16(&rng.vec_uniform(517 * 72, 1.0)), &[517, 72])
        .unwrap();
    let what = format!("{test}: {}", seed_note(seed));
    assert_backward_recomputes_act(&dev, &what, &cfg, &d.x, d.weights(), &dout);
}

#[test]
fn gpu_backward_refuses_a_forward_that_saved_nothing() {
    let Some(dev) = gpu_or_skip("gpu_backward_refuses_a_forward_that_saved_nothing") else {
        return;
    };
    let cfg = LayerConfig::new(16, 64, 64, 8, 1);
    let p = problem_with_density(cfg, &[0.5; 8], 3);
    let d = DeviceProblem::upload(&dev, &p).unwrap();
    let mut ctx = MoeContext::<bf16>::new(&dev);
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[16, 64]).unwrap();
    let mut g = Grads::new(&dev, &cfg);
    let err = moe_backward(
        &mut ctx,
        Coefficient::Fixed(0.0),
        &d.x,
        &d.weights(),
        &out,
        g.as_mut(),
        false,
    );
    assert!(
        matches!(err, Err(Error::InvalidConfig(_))),
        "no forward yet"
    );
    moe_forward(
        &mut ctx,
        &cfg,
        RouterKind::Relu,
        Coefficient::Fixed(0.0),
        &d.x,
        &d.weights(),
        &mut out,
    )
    .unwrap();
    let err = moe_backward(
        &mut ctx,
        Coefficient::Fixed(0.0),
        &d.x,
        &d.weights(),
        &out,
        g.as_mut(),
        false,
    );
    assert!(
        matches!(err, Err(Error::InvalidConfig(_))),
        "forward without saving"
    );
}

#[test]
fn gpu_lambda_controller_follows_the_cpu_controller() {
    let Some(dev) = gpu_or_skip("gpu_lambda_controller_follows_the_cpu_controller") else {
        return;
    };
    // Two layers' forwards per step record their sparsity on the device; the CPU controller is
    // fed the sparsities the forwards reported.
    let cfg = LayerConfig::new(512, 64, 64, 8, 1);
    let mut ctrl = LambdaController::with_params(&dev, 1e-3, 1.2, cfg.target_sparsity()).unwrap();
    let mut cpu = SparsityController::with_params(1e-3, 1.2, cfg.target_sparsity());
    let mut ctx = MoeContext::<bf16>::new(&dev);
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[512, 64]).unwrap();
    for step in 0..12 {
        for layer in 0..2 {
            let d_target = if step % 3 == 0 { 0.05 } else { 0.4 } + 0.01 * layer as f64;
            let p =
                problem_with_density(cfg, &uniform_density(8, d_target), 100 + step * 2 + layer);
            let d = DeviceProblem::upload(&dev, &p).unwrap();
            moe_forward(
                &mut ctx,
                &cfg,
                RouterKind::Relu,
                Coefficient::Adaptive(&mut ctrl),
                &d.x,
                &d.weights(),
                &mut out,
            )
            .unwrap();
            let stats = ctx.stats().unwrap();
            cpu.record(stats.sparsity);
        }
        ctrl.step().unwrap();
        cpu.step();
        let (g, c) = (ctrl.lambda().unwrap(), cpu.lambda());
        assert!(
            (g - c).abs() <= 1e-12 * c,
            "step {step}: device lambda {g} vs {c}"
        );
    }
}

/// Adam on host copies of the weights (f64 master weights, bf16 on the device).
struct Adam {
    m: Vec<f64>,
    v: Vec<f64>,
    step: i32,
}

impl Adam {
    fn new(n: usize) -> Self {
        Self {
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
        }
    }
    fn update(&mut self, w: &mut [f64], g: &[f64], lr: f64) {
        self.step += 1;
        let (b1, b2) = (0.9f64, 0.999f64);
        let c1 = 1.0 - b1.powi(self.step);
        let c2 = 1.0 - b2.powi(self.step);
        for i in 0..w.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            w[i] -= lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + 1e-8);
        }
    }
}

#[test]
fn gpu_training_with_the_controller_settles_the_sparsity_and_lowers_the_loss() {
    let Some(dev) =
        gpu_or_skip("gpu_training_with_the_controller_settles_the_sparsity_and_lowers_the_loss")
    else {
        return;
    };
    // A regression task: targets from a fixed random linear map of the inputs. The router starts
    // at about half of the experts per token; the controller must bring it to k of E.
    let cfg = LayerConfig::new(512, 64, 64, 8, 1);
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    let seed = fresh_seed();
    let mut p = problem_with_density(cfg, &uniform_density(e, 0.5), seed);
    let mut rng = seeded(seed ^ 7);
    let map = rng.vec_uniform(h * h, (3.0 / h as f64).sqrt());
    let target: Vec<f64> = (0..t * h)
        .map(|i| {
            let (ti, o) = (i / h, i % h);
            (0..h)
                .map(|j| p.x[ti * h + j] * map[j * h + o])
                .sum::<f64>()
                * 0.5
        })
        .collect();
    let x = DeviceTensor::from_host(&dev, &to_bf16(&p.x), &[t, h]).unwrap();
    let mut ctrl = LambdaController::new(&dev, cfg.k, e).unwrap();
    let mut ctx = MoeContext::<bf16>::for_training(&dev);
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
    let mut grads = Grads::new(&dev, &cfg);
    let mut opt = [
        Adam::new(h * e),
        Adam::new(e * h * f),
        Adam::new(e * h * f),
        Adam::new(e * f * h),
    ];
    let steps = training_steps(400);
    let mut losses = Vec::new();
    let mut sparsities = Vec::new();
    for _ in 0..steps {
        let wr = DeviceTensor::from_host(&dev, &to_bf16(&p.params.router), &[h, e]).unwrap();
        let wg = DeviceTensor::from_host(&dev, &to_bf16(&p.params.gate), &[e, h, f]).unwrap();
        let wu = DeviceTensor::from_host(&dev, &to_bf16(&p.params.up), &[e, h, f]).unwrap();
        let wd = DeviceTensor::from_host(&dev, &to_bf16(&p.params.down), &[e, f, h]).unwrap();
        let w = remoe_kernels::MoeWeights {
            router: &wr,
            gate: &wg,
            up: &wu,
            down: &wd,
        };
        moe_forward(
            &mut ctx,
            &cfg,
            RouterKind::Relu,
            Coefficient::Adaptive(&mut ctrl),
            &x,
            &w,
            &mut out,
        )
        .unwrap();
        let stats = ctx.stats().unwrap();
        let y = bf16_to_f64(&out.to_host().unwrap());
        // loss = mean over tokens of |out_t - target_t|^2
        let loss: f64 = y
            .iter()
            .zip(&target)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            / t as f64;
        let dout: Vec<f64> = y
            .iter()
            .zip(&target)
            .map(|(a, b)| 2.0 * (a - b) / t as f64)
            .collect();
        let dout = DeviceTensor::from_host(&dev, &to_bf16(&dout), &[t, h]).unwrap();
        moe_backward(
            &mut ctx,
            Coefficient::Adaptive(&mut ctrl),
            &x,
            &w,
            &dout,
            grads.as_mut(),
            false,
        )
        .unwrap();
        ctrl.step().unwrap();
        let g = grads.to_host(bf16::to_f64);
        let lr = 2e-3;
        opt[0].update(&mut p.params.router, &g[1], lr);
        opt[1].update(&mut p.params.gate, &g[2], lr);
        opt[2].update(&mut p.params.up, &g[3], lr);
        opt[3].update(&mut p.params.down, &g[4], lr);
        losses.push(loss);
        sparsities.push(stats.sparsity);
    }
    let target_s = cfg.target_sparsity();
    let late = &sparsities[steps / 2..];
    let mean_late = late.iter().sum::<f64>() / late.len() as f64;
    let first = losses[..10].iter().sum::<f64>() / 10.0;
    let last = losses[steps - 10..].iter().sum::<f64>() / 10.0;
    // Straight to stderr: libtest captures println! of passing tests, and these figures are
    // the point of the test.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "training: seed {seed}: sparsity {:.3} -> mean {:.4} over the second half (target {:.4}); loss {:.4} -> {:.4}; lambda {:.3e}",
        sparsities[0],
        mean_late,
        target_s,
        first,
        last,
        ctrl.lambda().unwrap()
    );
    let what = seed_note(seed);
    assert!(
        losses.iter().all(|l| l.is_finite()),
        "{what}: loss {losses:?}"
    );
    if steps < 400 {
        return; // under compute-sanitizer (common::training_steps): too few steps to converge
    }
    assert!(
        (mean_late - target_s).abs() < 0.02,
        "{what}: sparsity settled at {mean_late}, target {target_s}"
    );
    assert!(
        last < 0.8 * first,
        "{what}: loss did not fall: {first} -> {last}"
    );
}

/// The weight gradients' store policy alone (kernels/remoe_kernels.h, remoe_wgrad_store_t), on
/// each GEMM path this device has: the transposed store puts exactly the plain store's bits at
/// out[e, j, i], over ragged tiles in both directions (M 200 = 128 + 72; N 328 = 256 + 72 on the
/// Hopper path's 128 x 256 tiles), A rows gathered, an empty expert and partial last blocks of
/// pairs; with accumulate, each element is what it held plus that sum (one f32 addition); and
/// the two paths agree bit for bit.
#[test]
fn gpu_weight_grad_transposed_store_is_the_plain_store_transposed() {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    use remoe_kernels::{sys, GemmPath};
    type WeightGradFn = unsafe extern "C" fn(
        *const u16,
        *const u32,
        *const u16,
        sys::remoe_wgrad_store_t,
        *const u32,
        i32,
        i32,
        i32,
        i32,
        i32,
        *const sys::remoe_wgrad_split_t,
        sys::remoe_stream_t,
    ) -> std::os::raw::c_int;
    let test = "gpu_weight_grad_transposed_store_is_the_plain_store_transposed";
    let Some(dev) = gpu_or_skip(test) else {
        return;
    };
    let seed = fresh_seed();
    let what = format!("{test}: {}", seed_note(seed));
    let mut rng = seeded(seed);
    let (rows, m, n) = (97usize, 200usize, 328usize);
    let counts = [130u32, 0, 64, 1];
    let e = counts.len();
    let mut offsets = vec![0u32; e + 1];
    for i in 0..e {
        offsets[i + 1] = offsets[i] + counts[i];
    }
    let pairs = offsets[e] as usize;
    let half_bits = |v: Vec<f64>| -> Vec<u16> { to_bf16(&v).iter().map(|x| x.to_bits()).collect() };
    let a = half_bits(rng.vec_uniform(rows * m, 1.0));
    let b = half_bits(rng.vec_uniform(pairs * n, 1.0));
    let gather: Vec<u32> = (0..pairs)
        .map(|_| rng.random_range(0..rows as u32))
        .collect();
    let init: Vec<f32> = rng
        .vec_uniform(e * m * n, 1.0)
        .iter()
        .map(|&v| v as f32)
        .collect();
    dev.bind_to_thread().unwrap();
    let s = dev.stream();
    let (a_d, b_d) = (s.clone_htod(&a).unwrap(), s.clone_htod(&b).unwrap());
    let (g_d, eo_d) = (
        s.clone_htod(&gather).unwrap(),
        s.clone_htod(&offsets).unwrap(),
    );
    let mut paths: Vec<(&str, WeightGradFn)> =
        vec![("mma.sync", sys::remoe_expert_weight_grad_bf16)];
    if GemmPath::Hopper.supported_on(&dev).unwrap() {
        paths.push(("hopper", sys::remoe_hopper_expert_weight_grad_bf16));
    }
    let mut first: Option<Vec<f32>> = None;
    for (name, launch) in paths {
        let run = |transposed: bool, accumulate: bool| -> Vec<f32> {
            let mut out = s.clone_htod(&init).unwrap();
            {
                let (ap, _ga) = a_d.device_ptr(s);
                let (bp, _gb) = b_d.device_ptr(s);
                let (gp, _gg) = g_d.device_ptr(s);
                let (ep, _ge) = eo_d.device_ptr(s);
                let (op, _go) = out.device_ptr_mut(s);
                let store = sys::remoe_wgrad_store_t {
                    out: op as *mut f32,
                    accumulate: accumulate as i32,
                    transposed: transposed as i32,
                };
                // SAFETY: a [rows, m] and b [pairs, n] 16-bit (a_rows = rows, b_rows = pairs),
                // every gathered row < rows, the offsets [e + 1] ascending from 0 to `pairs`,
                // out e m n f32 ([e, m, n], or [e, n, m] when transposed), each its own cudarc
                // allocation (so 16-byte aligned) of this stream's context, bound above; m and
                // n are multiples of 8; no split; the Hopper launcher only where the device
                // runs it (supported_on).
                let code = unsafe {
                    launch(
                        ap as *const u16,
                        gp as *const u32,
                        bp as *const u16,
                        store,
                        ep as *const u32,
                        rows as i32,
                        pairs as i32,
                        e as i32,
                        m as i32,
                        n as i32,
                        std::ptr::null(),
                        sys::stream_handle(s),
                    )
                };
                assert_eq!(code, 0, "{what}: {name} launch");
            }
            s.clone_dtoh(&out).unwrap()
        };
        let (plain, transposed, added) = (run(false, false), run(true, false), run(true, true));
        for x in 0..e {
            for i in 0..m {
                for j in 0..n {
                    let (p, t) = ((x * m + i) * n + j, (x * n + j) * m + i);
                    let (got, want) = (transposed[t].to_bits(), plain[p].to_bits());
                    assert_eq!(
                        got, want,
                        "{what}: {name}, expert {x} [{i}, {j}]: transposed"
                    );
                    let (got, want) = (added[t].to_bits(), (init[t] + plain[p]).to_bits());
                    assert_eq!(
                        got, want,
                        "{what}: {name}, expert {x} [{i}, {j}]: accumulated"
                    );
                }
            }
        }
        // Overwritten, not added: the empty expert's block is zeros, the others are not.
        let block = |x: usize| &plain[x * m * n..(x + 1) * m * n];
        assert!(
            block(1).iter().all(|&v| v.to_bits() == 0),
            "{what}: {name}: empty expert"
        );
        assert!(
            block(0).iter().any(|&v| v != 0.0),
            "{what}: {name}: expert 0 is zero"
        );
        match &first {
            None => first = Some(plain),
            Some(f) => assert!(
                f.iter()
                    .zip(&plain)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{what}: the paths differ"
            ),
        }
    }
}
