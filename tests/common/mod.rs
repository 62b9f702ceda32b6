//! Helpers shared by the integration tests.
#![allow(dead_code)]

use remoe_kernels::reference::{
    remoe_forward as ref_remoe_forward, swiglu_expert_forward, topk_forward as ref_topk_forward,
    topk_normalized_forward as ref_topk_normalized_forward,
};
use remoe_kernels::{Device, DeviceTensor, Error, HalfElement, LayerConfig, MoeGrads, RouterKind};

/// The GPU for a GPU test, or `None` after printing why the test is skipped. With
/// `REMOE_REQUIRE_GPU=1` a missing GPU fails the test instead.
pub fn gpu_or_skip(test: &str) -> Option<Device> {
    match Device::new(0) {
        Ok(dev) => Some(dev),
        Err(Error::NoCudaDevice(why)) => {
            if std::env::var("REMOE_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("{test}: REMOE_REQUIRE_GPU=1 but no CUDA device: {why}");
            }
            // Straight to the stderr handle: libtest captures eprintln! of passing tests, and a
            // skip must be visible in the run's output.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no CUDA device ({why})");
            None
        }
        Err(e) => panic!("{test}: opening the CUDA device failed: {e}"),
    }
}

/// Whether `REMOE_REQUIRE_GPUS` (a number of GPUs) asks for at least `n`: then a test that
/// needs `n` GPUs, or what comes with them, fails where it would otherwise skip.
pub fn gpus_required(n: usize) -> bool {
    std::env::var("REMOE_REQUIRE_GPUS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|want| want >= n)
}

/// Prints why a test that needs `n` GPUs is skipped, or fails it when [`gpus_required`]`(n)`.
pub fn skip_unless_gpus_required(test: &str, n: usize, why: &str) {
    if gpus_required(n) {
        panic!("{test}: REMOE_REQUIRE_GPUS asks for {n} GPUs, but {why}");
    }
    // Straight to the stderr handle, as in gpu_or_skip.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Devices 0 to n-1 for a test that needs `n` GPUs, or `None` after printing why the test is
/// skipped. With `REMOE_REQUIRE_GPUS=n` (or more) too few GPUs fail the test instead.
pub fn gpus_or_skip(test: &str, n: usize) -> Option<Vec<Device>> {
    let mut devs = Vec::with_capacity(n);
    for ordinal in 0..n {
        match Device::new(ordinal) {
            Ok(dev) => devs.push(dev),
            Err(Error::NoCudaDevice(why)) => {
                skip_unless_gpus_required(test, n, &format!("it needs {n} CUDA devices ({why})"));
                return None;
            }
            Err(e) => panic!("{test}: opening CUDA device {ordinal} failed: {e}"),
        }
    }
    Some(devs)
}

/// Whether this process runs under NVIDIA's compute-sanitizer, whose injection libraries are
/// mapped into the process once the driver is initialised (`Device::new` has done that).
pub fn under_compute_sanitizer() -> bool {
    let mapped = std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.contains("libsanitizer-collection") || m.contains("libsanitizer-public"))
        .unwrap_or(false);
    let injected = std::env::var("CUDA_INJECTION64_PATH")
        .map(|v| v.contains("sanitizer"))
        .unwrap_or(false);
    mapped || injected
}

/// The compute-sanitizer tool this process runs under, where scripts/run-suite.sh says so
/// (REMOE_SANITIZER_TOOL: memcheck, racecheck, initcheck or synccheck); `None` otherwise,
/// also under a sanitizer started by hand.
pub fn sanitizer_tool() -> Option<String> {
    std::env::var("REMOE_SANITIZER_TOOL")
        .ok()
        .filter(|_| under_compute_sanitizer())
}

/// Optimiser steps for a training test: `plain` in a plain run; under compute-sanitizer a dozen,
/// which run every kernel of a step (forward, backward, controller, optimiser) many times over.
/// The sanitizers check kernels, not convergence, and their cost grows with every launch (a
/// 150-step candle run took racecheck past 128 GB of host memory); the convergence assertions
/// belong to the plain run.
pub fn training_steps(plain: usize) -> usize {
    if under_compute_sanitizer() {
        plain.min(12)
    } else {
        plain
    }
}

/// Like [`gpu_or_skip`], with cudarc's event tracking off (what capturing a CUDA graph needs;
/// see `remoe_kernels::graph`).
pub fn untracked_gpu_or_skip(test: &str) -> Option<Device> {
    gpu_or_skip(test)?;
    // SAFETY: the tests use this device's one stream only.
    Some(unsafe { Device::new_untracked(0) }.expect("opening the device untracked"))
}

/// ||a - b|| / ||b|| in f64; 0 when both are empty or zero. NaN anywhere gives +inf, so an
/// unwritten (poisoned) element can never pass.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_err: length mismatch");
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// How a test names its seed in a failure message: `seed N (replay with REMOE_SEED=N)`. With
/// `REMOE_SEED=N` set, `fresh_seed` returns N (testkit/src/rng.rs), so the run draws the same
/// inputs again.
pub fn seed_note(seed: u64) -> String {
    format!(
        "seed {seed} (replay with {}={seed})",
        remoe_testkit::rng::SEED_ENV
    )
}

/// The per-row bound of the GPU tests, checked next to their whole-tensor bound of 1e-2.
///
/// Why a second bound: a whole-tensor relative error averages over the rows, so one row that is
/// entirely wrong (zeroed, stale, another token's) among R similar rows moves it by only about
/// 1/sqrt(R): 0.0078 for one zeroed row of 16384, which passes 1e-2
/// (`tests/gpu_f16_and_bounds.rs` checks exactly that). Per row, such a row has an error near 1
/// (exactly 1 when zeroed).
///
/// Why 3e-2: a correct row goes through a few roundings to 16 bits on its way (bf16's unit
/// round-off is u = 2^-8 = 3.9e-3; act, g, u, y, R act, dg and du, each pair's dX, the stored
/// result), each worth at most u and about u/sqrt(3) on average over a row's elements; the rows
/// checked hold 32 to 3072 elements, so a row's error stays near that average. A CPU model of those
/// roundings (f32 elsewhere) over the shapes of the GPU tests puts most rows' worst at 3e-3 to 5e-3
/// and the worst row seen at 1.3e-2 (a row of 32 elements of dWu, E = 512, an expert with a handful
/// of tokens); 3e-2 keeps a margin of two to three over that and is still more than thirty times
/// below the error of a row that is wrong. (y's rounding, added after that model was run, reaches
/// the layer output alone: in a model of the forward over four of those shapes the output's worst
/// row went from 4.0e-3 - 7.2e-3 to 4.3e-3 - 7.5e-3.) Where a result is a sum that can cancel (dX
/// and dWr through dR = dOut . y) the check adds the same per-row slack as the whole-tensor one.
pub const ROW_REL_BOUND: f64 = 3e-2;

/// Rows whose reference norm is below `ROW_FLOOR` times the tensor's RMS row norm are measured
/// against that floor instead of their own norm, so that a row that is zero or nearly so in the
/// reference (a token no expert took, an expert with no tokens) does not turn rounding noise
/// into a huge relative error. It is far below any row that matters: a zeroed row of normal size
/// still has error 1.
pub const ROW_FLOOR: f64 = 1e-3;

/// The denominator floor of [`row_rel_errs`]: `ROW_FLOOR` times the RMS over rows of
/// ||want_r||; 1 when `want` is all zero (the errors are then absolute, as [`rel_err`]'s are).
pub fn row_floor(want: &[f64], cols: usize) -> f64 {
    let rows = want.len().checked_div(cols).unwrap_or(0);
    if rows == 0 {
        return 1.0;
    }
    let ms: f64 = want.iter().map(|v| v * v).sum::<f64>() / rows as f64;
    if ms > 0.0 && ms.is_finite() {
        ROW_FLOOR * ms.sqrt()
    } else {
        1.0
    }
}

/// ||got_r - want_r|| and ||want_r|| of every row of `cols` values; +inf for the difference of
/// a row with a NaN or infinite value in either tensor, so that an unwritten (poisoned) element
/// can never pass.
fn row_diffs(got: &[f64], want: &[f64], cols: usize) -> Vec<(f64, f64)> {
    assert_eq!(got.len(), want.len(), "per-row error: length mismatch");
    if cols == 0 {
        return Vec::new();
    }
    assert_eq!(
        want.len() % cols,
        0,
        "per-row error: length not a multiple of the row"
    );
    got.chunks(cols)
        .zip(want.chunks(cols))
        .map(|(g, w)| {
            if g.iter().chain(w).any(|v| !v.is_finite()) {
                // Infinite error over a finite denominator: infinite relative error.
                return (f64::INFINITY, 0.0);
            }
            let norm = w.iter().map(|v| v * v).sum::<f64>().sqrt();
            let d = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt();
            (d, norm)
        })
        .collect()
}

/// Per row r of `cols` values: ||got_r - want_r|| / max(||want_r||, floor) with the floor of
/// [`row_floor`]; +inf for a row with a non-finite value.
pub fn row_rel_errs(got: &[f64], want: &[f64], cols: usize) -> Vec<f64> {
    let floor = row_floor(want, cols);
    row_diffs(got, want, cols)
        .into_iter()
        .map(|(d, n)| d / n.max(floor))
        .collect()
}

/// The row with the largest [`row_rel_errs`] and that error; `(0, 0.0)` for a tensor without
/// rows.
pub fn worst_row_rel_err(got: &[f64], want: &[f64], cols: usize) -> (usize, f64) {
    row_rel_errs(got, want, cols)
        .into_iter()
        .enumerate()
        .fold(
            (0, 0.0),
            |best, (r, e)| if e > best.1 { (r, e) } else { best },
        )
}

/// The row furthest over `||got_r - want_r|| <= bound * max(||want_r||, floor) + slack_r`.
#[derive(Debug, Clone, Copy)]
pub struct RowExcess {
    /// The row, and how many rows were checked.
    pub row: usize,
    pub rows: usize,
    /// Its relative error as [`row_rel_errs`] measures it.
    pub rel_err: f64,
    /// Its absolute slack.
    pub slack: f64,
    /// ||got_r - want_r|| / (bound * max(||want_r||, floor) + slack_r): the row passes when at
    /// most 1.
    pub ratio: f64,
}

/// The worst row of `got` against `want` (rows of `cols` values) under the per-row bound `bound`
/// with an absolute slack per row (`slack` empty: none) and the rows marked in `skip` left out
/// (`skip` empty: none).
pub fn worst_row_excess(
    got: &[f64],
    want: &[f64],
    cols: usize,
    bound: f64,
    slack: &[f64],
    skip: &[bool],
) -> RowExcess {
    let floor = row_floor(want, cols);
    let diffs = row_diffs(got, want, cols);
    assert!(
        slack.is_empty() || slack.len() == diffs.len(),
        "slack per row"
    );
    assert!(skip.is_empty() || skip.len() == diffs.len(), "skip per row");
    let mut worst = RowExcess {
        row: 0,
        rows: diffs.len(),
        rel_err: 0.0,
        slack: 0.0,
        ratio: 0.0,
    };
    for (r, &(d, n)) in diffs.iter().enumerate() {
        if skip.get(r) == Some(&true) {
            continue;
        }
        let s = slack.get(r).copied().unwrap_or(0.0);
        let den = n.max(floor);
        let ratio = d / (bound * den + s);
        // den > 0 and d is finite or +inf: the ratio is never NaN.
        if ratio > worst.ratio {
            worst = RowExcess {
                row: r,
                rows: diffs.len(),
                rel_err: d / den,
                slack: s,
                ratio,
            };
        }
    }
    worst
}

/// Asserts [`ROW_REL_BOUND`] on every row of `got` (rows of `cols` values) against `want`, with
/// an absolute `slack` per row (empty: none) and the rows marked in `skip` left out (empty:
/// none). The message names `what` (the case, with its seed), the tensor and the worst row.
pub fn assert_rows_within(
    what: &str,
    name: &str,
    got: &[f64],
    want: &[f64],
    cols: usize,
    slack: &[f64],
    skip: &[bool],
) {
    assert_rows_within_bound(what, name, got, want, cols, ROW_REL_BOUND, slack, skip);
}

/// [`assert_rows_within`] with another per-row bound than [`ROW_REL_BOUND`].
#[allow(clippy::too_many_arguments)]
pub fn assert_rows_within_bound(
    what: &str,
    name: &str,
    got: &[f64],
    want: &[f64],
    cols: usize,
    bound: f64,
    slack: &[f64],
    skip: &[bool],
) {
    let w = worst_row_excess(got, want, cols, bound, slack, skip);
    assert!(
        w.ratio <= 1.0,
        "{what}: {name} row {} of {}: rel err {:e} over the per-row bound {bound:e} \
         (absolute slack {:e}; whole-tensor rel err {:e})",
        w.row,
        w.rows,
        w.rel_err,
        w.slack,
        rel_err(got, want)
    );
}

/// The tokens whose routing the GPU decided differently from the reference: `gpu_gates` [T,E]
/// (a pair is active when its gate is > 0: ReMoE's ReLU gate, TopK's P where selected) against
/// `ref_active` [T,E]. Panics, naming `what`, when more than 1 + T/1000 tokens differ.
///
/// A pair whose logit lies within f32 rounding of the decision (0 for ReMoE, the tie of the k-th
/// and (k+1)-th logits for TopK) can be decided one way by the GPU's f32 logits and the other by
/// the reference's f64 ones; with random inputs that happens about once per 10^7 pairs. The
/// ReMoE output is continuous there (the gate is about 0), but dL = dR [L > 0] is not, and TopK's
/// selection is not: such a token's row of dX (and of TopK's output) legitimately differs, so
/// the per-row checks leave these rows out. A broken router flips many tokens and fails here.
pub fn routing_flips(what: &str, gpu_gates: &[f64], ref_active: &[bool], e: usize) -> Vec<bool> {
    assert_eq!(gpu_gates.len(), ref_active.len(), "{what}: gates [T,E]");
    if e == 0 {
        return Vec::new();
    }
    let flips: Vec<bool> = gpu_gates
        .chunks(e)
        .zip(ref_active.chunks(e))
        .map(|(g, r)| g.iter().zip(r).any(|(&g, &r)| (g > 0.0) != r))
        .collect();
    let n = flips.iter().filter(|&&f| f).count();
    let t = flips.len();
    assert!(
        n <= 1 + t / 1000,
        "{what}: {n} of {t} tokens routed differently from the reference"
    );
    flips
}

/// The sizes of the terms whose sums the router parts of dX and dWr are, per row: with
/// M[t,e] = sum_h |dOut[t,h] y[t,e,h]| over the routed pairs (the terms of dR = dOut . y),
/// `dx_rows[t]` = ||(M |Wr|^T)_t|| and `dwr_rows[o]` = ||(|X|^T M)_o||. dR can cancel: near a
/// cancellation its relative error is unbounded whatever the precision of the inputs (act is
/// rounded to 16 bits, as the down GEMM's operand must be), so the bounds on dX and dWr add the
/// unit round-off times these sizes (per row, or their Frobenius norms for the whole tensor).
#[derive(Debug, Clone)]
pub struct RouterTermScales {
    /// [T]
    pub dx_rows: Vec<f64>,
    /// [H]
    pub dwr_rows: Vec<f64>,
}

impl RouterTermScales {
    /// ||M |Wr|^T||, the whole-tensor scale for dX.
    pub fn dx(&self) -> f64 {
        self.dx_rows.iter().map(|v| v * v).sum::<f64>().sqrt()
    }

    /// |||X|^T M||, the whole-tensor scale for dWr.
    pub fn dwr(&self) -> f64 {
        self.dwr_rows.iter().map(|v| v * v).sum::<f64>().sqrt()
    }
}

/// bf16's unit round-off, 2^-8.
pub const BF16_ROUNDOFF: f64 = 1.0 / 256.0;

/// Asserts that every element of `got` is `exact` rounded once, to nearest, to a 16-bit type of
/// unit round-off `u` from an f32 accumulation of `n` exact products whose magnitudes sum to
/// `terms` (per element): |got - exact| <= u |exact| + (1 + u) n 2^-22 terms. The second term
/// bounds the f32 sum's error with twice the textbook n 2^-23, as the tensor cores' adders may
/// truncate rather than round. A value rounded twice, truncated, or not from the whole sum
/// misses by up to 2u |exact| and so fails wherever that slack is small against u |exact|.
/// For values in the 16-bit type's normal range (bf16's is f32's).
pub fn assert_rounded_once(
    what: &str,
    name: &str,
    got: &[f64],
    exact: &[f64],
    terms: &[f64],
    n: usize,
    u: f64,
) {
    assert_eq!(got.len(), exact.len(), "{what}: {name}: lengths");
    assert_eq!(terms.len(), exact.len(), "{what}: {name}: term sums");
    let g = n as f64 * (-22f64).exp2();
    for (i, ((&a, &x), &s)) in got.iter().zip(exact).zip(terms).enumerate() {
        let slack = (1.0 + u) * g * s;
        // NaN (an element nobody wrote) compares false: it fails.
        assert!(
            (a - x).abs() <= u * x.abs() + slack,
            "{what}: {name}[{i}] = {a:e} is not {x:e} rounded once to 16 bits (unit round-off \
             {u:e}, the f32 sum's slack {slack:e})"
        );
    }
}

/// ||got - want|| <= tol ||want|| + `slack` (and finite): a relative bound, plus the round-off
/// of the terms a cancelling sum adds up where there is one (u times a [`RouterTermScales`]
/// norm; 0 elsewhere).
pub fn assert_within_terms(got: &[f64], want: &[f64], tol: f64, slack: f64, what: &str) {
    let abs: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = want.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!(
        abs.is_finite() && abs <= tol * norm + slack,
        "{what}: rel err {:e} (abs {abs:e}, norm {norm:e}, round-off slack {slack:e})",
        rel_err(got, want)
    );
}

/// [`RouterTermScales`] of problem `p` (routed by the reference) with `dout` [T,H].
pub fn router_term_scales(
    kind: RouterKind,
    p: &HostProblem,
    coeff: f64,
    dout: &[f64],
) -> RouterTermScales {
    let cfg = p.cfg;
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    let dispatch = match kind {
        RouterKind::Relu => ref_remoe_forward(&p.x, &p.params, &cfg, coeff).dispatch,
        RouterKind::TopK => ref_topk_forward(&p.x, &p.params, &cfg, coeff).dispatch,
        RouterKind::TopKNormalized => {
            ref_topk_normalized_forward(&p.x, &p.params, &cfg, coeff).dispatch
        }
    };
    let mut m = vec![0.0; t * e];
    for ei in 0..e {
        let (wg, wu, wd) = p.params.expert(ei, &cfg);
        for pi in dispatch.range(ei) {
            let ti = dispatch.tokens[pi] as usize;
            let acts = swiglu_expert_forward(&p.x[ti * h..(ti + 1) * h], wg, wu, wd, h, f);
            m[ti * e + ei] = (0..h).map(|o| (dout[ti * h + o] * acts.y[o]).abs()).sum();
        }
    }
    let dx_rows = (0..t)
        .map(|ti| {
            (0..h)
                .map(|o| {
                    let v: f64 = (0..e)
                        .map(|ei| m[ti * e + ei] * p.params.router[o * e + ei].abs())
                        .sum();
                    v * v
                })
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let dwr_rows = (0..h)
        .map(|o| {
            (0..e)
                .map(|ei| {
                    let v: f64 = (0..t)
                        .map(|ti| p.x[ti * h + o].abs() * m[ti * e + ei])
                        .sum();
                    v * v
                })
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    RouterTermScales { dx_rows, dwr_rows }
}

#[allow(unused_imports)]
pub use remoe_testkit::synthetic::*;

/// The forward does not keep act for the backward: the backward's dAct GEMM recomputes it from
/// the saved g and u and writes R act over the act buffer, dWd's operand. Checks that what it
/// writes is T(f32(R act_fwd)) bit for bit, act_fwd being the forward's act and R the pair's
/// gate (kernels/swiglu.cuh, gated_act): so the recomputation is the forward's act bit for bit
/// (both round g and u first), and R act has its documented rounding. A ReMoE forward and
/// backward of `cfg` with `x`, `w` and `dout`, act read back after the forward and R act after
/// the backward (each refused at the other time: the buffer's meaning is the record's).
pub fn assert_backward_recomputes_act<T: HalfElement>(
    dev: &Device,
    what: &str,
    cfg: &LayerConfig,
    x: &DeviceTensor<T>,
    w: remoe_kernels::MoeWeights<'_, T>,
    dout: &DeviceTensor<T>,
) {
    use half::{bf16, f16};
    use remoe_kernels::{moe_backward, moe_forward, Coefficient, DType, MoeContext};
    let mut ctx = MoeContext::<T>::for_training(dev);
    let mut out = DeviceTensor::<T>::zeros(dev, &[cfg.tokens, cfg.hidden]).unwrap();
    let coeff = || Coefficient::Fixed(1e-2);
    moe_forward(&mut ctx, cfg, RouterKind::Relu, coeff(), x, &w, &mut out).unwrap();
    let forward_act = ctx.act_to_host().unwrap();
    assert!(!forward_act.is_empty(), "{what}: no pairs");
    assert!(
        matches!(ctx.gated_act_to_host(), Err(Error::InvalidConfig(_))),
        "{what}: R act read before a backward"
    );
    let gates = ctx.dispatch_to_host().unwrap().gates;
    let mut grads = Grads::<T>::new(dev, cfg);
    moe_backward(&mut ctx, coeff(), x, &w, dout, grads.as_mut(), false).unwrap();
    assert!(
        matches!(ctx.act_to_host(), Err(Error::InvalidConfig(_))),
        "{what}: act read after the backward overwrote it"
    );
    let act_r = ctx.gated_act_to_host().unwrap();
    let (a, b): (&[u16], &[u16]) = (
        bytemuck::cast_slice(&forward_act),
        bytemuck::cast_slice(&act_r),
    );
    assert_eq!(a.len(), b.len(), "{what}");
    assert_eq!(a.len(), gates.len() * cfg.ffn, "{what}");
    // T(f32(R a)): an f32 product, then half's round-to-nearest-even conversion (the kernels'
    // __floats2bfloat162_rn / __floats2half2_rn).
    let gated = |bits: u16, r: f32| -> u16 {
        match T::DTYPE {
            DType::BF16 => bf16::from_f32(r * bf16::from_bits(bits).to_f32()).to_bits(),
            DType::F16 => f16::from_f32(r * f16::from_bits(bits).to_f32()).to_bits(),
            other => unreachable!("{other:?} is not a half type"),
        }
    };
    let first = (0..a.len()).find(|&i| gated(a[i], gates[i / cfg.ffn]) != b[i]);
    assert!(
        first.is_none(),
        "{what}: the backward's R act differs from the gate times the forward's act at element {}",
        first.unwrap_or(0)
    );
}

/// Gradient buffers of one backward on the device: dX in the activation type, the weight gradients in f32.
pub struct Grads<T: HalfElement> {
    pub dx: DeviceTensor<T>,
    pub router: DeviceTensor<f32>,
    pub gate: DeviceTensor<f32>,
    pub up: DeviceTensor<f32>,
    pub down: DeviceTensor<f32>,
}

impl<T: HalfElement> Grads<T> {
    pub fn new(dev: &Device, cfg: &LayerConfig) -> Self {
        Self::for_experts(dev, cfg, cfg.experts)
    }

    /// With the weight gradients of `held` experts (an expert-parallel rank's E/R).
    pub fn for_experts(dev: &Device, cfg: &LayerConfig, held: usize) -> Self {
        let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
        Self {
            dx: DeviceTensor::zeros(dev, &[t, h]).unwrap(),
            router: DeviceTensor::zeros(dev, &[h, e]).unwrap(),
            gate: DeviceTensor::zeros(dev, &[held, h, f]).unwrap(),
            up: DeviceTensor::zeros(dev, &[held, h, f]).unwrap(),
            down: DeviceTensor::zeros(dev, &[held, f, h]).unwrap(),
        }
    }

    pub fn as_mut(&mut self) -> MoeGrads<'_, T> {
        MoeGrads {
            dx: &mut self.dx,
            router: &mut self.router,
            gate: &mut self.gate,
            up: &mut self.up,
            down: &mut self.down,
        }
    }

    pub fn poison(&mut self) {
        self.dx.poison().unwrap();
        self.router.poison().unwrap();
        self.gate.poison().unwrap();
        self.up.poison().unwrap();
        self.down.poison().unwrap();
    }

    /// dX, dWr, dWg, dWu, dWd on the host, in f64 (exact: every value is a 16-bit or f32 one).
    pub fn to_host(&self, back: impl Fn(T) -> f64) -> [Vec<f64>; 5] {
        let f = |t: &DeviceTensor<f32>| t.to_host().unwrap().iter().map(|&v| v as f64).collect();
        [
            self.dx.to_host().unwrap().into_iter().map(back).collect(),
            f(&self.router),
            f(&self.gate),
            f(&self.up),
            f(&self.down),
        ]
    }
}
