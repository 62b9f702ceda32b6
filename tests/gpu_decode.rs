//! Issue 25 deliverable 1: the small-batch forward (one persistent kernel, kernels/decode.cu)
//! against the multi-kernel path, bit for bit, phase by phase where the context shows it (logits,
//! gates, statistics, gate sums, dispatch, pair index, act, y, out), and against the CPU
//! reference per row: T in {0, 1, 2, 7, 64}; (E, k) in {(8, 1) at config S's H and F, (64, 8),
//! (128, 8), (6, 2) and (100, 4) (the router's FMA chains: E % 8 != 0, E <= 8 and E > 16)};
//! E = 512 at T = 64 with every gate open (32,768 pairs); H = 16 and F = 16; a down projection
//! split in three; random routing, every gate zero, every gate open, one expert taking every
//! token; bf16 and f16; both GEMM paths of the multi-kernel side; batch sizes alternating on one
//! context; the cases where the path must stay off; 50 forwards without a host read; a captured
//! graph replayed on new inputs, and a capture after a warm-up on the multi-kernel path;
//! non-finite logits; grids forced small; two contexts on two streams from two threads at once;
//! H above 1024 (combine counters covering two column slices, the router's staging ring
//! wrapping); 50 launches of changing shape, T and grid on one context and 50 graph replays
//! interleaved with eager forwards, each checked bit for bit (the synchronisation words the
//! kernel carries from launch to launch). The default policy, `SmallBatch::Auto`: the path at
//! decode at config A's shape from a context's first forward, an eager warm-up at a larger T
//! preparing a context for a capture at T = 1, and the cases where it must stay off (training,
//! TopK, T above the bound, its byte rule false). The other tests pin the policy: `UpTo(64)` on
//! the small-batch side, `Off` on the multi-kernel side.
//!
//! Every compared run follows a warm-up, with both contexts' workspaces and outputs poisoned (NaN
//! / -1), so an element the small-batch kernel failed to write cannot pass. Seeds come from
//! `REMOE_SEED` when set (each failure names its seed). Without a GPU these tests print SKIPPED
//! (set `REMOE_REQUIRE_GPU=1` to fail instead).
//!
//! The tests take [`GPU_LOCK`] first: libtest runs them on parallel threads, and each expects
//! the device to itself (the one test that runs two streams at once does so on purpose). Every
//! small-batch forward is waited for with a bound ([`settle`]): a grid barrier that never
//! completes prints the case, T and the grid, and aborts the process, so CI fails instead of
//! stalling.

mod common;

use common::*;
use half::{bf16, f16};
use remoe_kernels::graph::capture;
use remoe_kernels::reference::remoe_forward as ref_remoe_forward;
use remoe_kernels::{
    moe_backward, moe_forward, Coefficient, Device, DeviceTensor, Error, GemmPath, HalfElement,
    LambdaController, LayerConfig, MoeContext, MoeWeights, PairCapacity, RouterKind, SmallBatch,
};
use remoe_testkit::rng::fresh_seed;
use std::sync::{Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const LAMBDA: f64 = 1e-3;

/// One GPU test of this file at a time (see the module documentation).
static GPU_LOCK: Mutex<()> = Mutex::new(());

/// Takes [`GPU_LOCK`]; a test that panicked while holding it does not fail the others.
fn gpu_lock() -> MutexGuard<'static, ()> {
    GPU_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long the small-batch forwards enqueued since the last wait may take: far more than any
/// case needs (milliseconds), and ten times that under compute-sanitizer, which slows kernels by
/// orders of magnitude.
fn hang_limit() -> Duration {
    if under_compute_sanitizer() {
        Duration::from_secs(600)
    } else {
        Duration::from_secs(60)
    }
}

/// The watchdog: waits for everything enqueued on `dev`'s stream so far (the small-batch
/// forwards just enqueued) by polling an event recorded after it, for at most [`hang_limit`].
/// Past it, prints what hung (the case, T, the grid and split-K count of the last small-batch
/// launch) and aborts the process: a hung kernel cannot be cancelled, and a blocking wait would
/// stall CI instead of failing it. Call it before anything that waits for the stream (a host
/// read, a forward that may count its pairs).
fn settle(dev: &Device, what: &str, t: usize, launch: Option<(usize, usize)>) {
    let event = dev
        .stream()
        .record_event(None)
        .unwrap_or_else(|e| panic!("{what}: recording the watchdog's event: {e:?}"));
    let limit = hang_limit();
    let start = Instant::now();
    loop {
        match event.try_is_complete() {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => panic!("{what}: T {t}: the stream failed: {e:?}"),
        }
        if start.elapsed() > limit {
            let (grid, splits) = launch.map_or(("?".to_string(), "?".to_string()), |(g, s)| {
                (g.to_string(), s.to_string())
            });
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "gpu_decode: HUNG: {what}: T {t}: the small-batch forwards (last launch: grid \
                 {grid} CTAs, {splits} split-K ranges) did not finish within {limit:?}; \
                 aborting"
            );
            std::process::abort();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// bf16 and f16 as the tests use them.
trait Half: HalfElement {
    fn of(v: f64) -> Self;
    fn value(self) -> f64;
    fn bits(self) -> u16;
}

impl Half for bf16 {
    fn of(v: f64) -> Self {
        bf16::from_f64(v)
    }
    fn value(self) -> f64 {
        self.to_f64()
    }
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

impl Half for f16 {
    fn of(v: f64) -> Self {
        f16::from_f64(v)
    }
    fn value(self) -> f64 {
        self.to_f64()
    }
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

/// A problem of `cfg` (at its largest T) with every value rounded to `T`'s type, so that the
/// reference sees what the GPU sees (the bf16 values of `problem_with_density` keep their value
/// in f16 except the few below f16's normal range).
fn host_problem<T: Half>(cfg: LayerConfig, density: &[f64], seed: u64) -> HostProblem {
    let mut p = problem_with_density(cfg, density, seed);
    p.round_values(|v| T::of(v).value());
    p
}

fn upload<T: Half>(dev: &Device, v: &[f64], shape: &[usize]) -> DeviceTensor<T> {
    let host: Vec<T> = v.iter().map(|&x| T::of(x)).collect();
    DeviceTensor::from_host(dev, &host, shape).unwrap()
}

/// The layer's weights on the device.
struct Weights<T: HalfElement> {
    router: DeviceTensor<T>,
    gate: DeviceTensor<T>,
    up: DeviceTensor<T>,
    down: DeviceTensor<T>,
}

impl<T: Half> Weights<T> {
    fn upload(dev: &Device, p: &HostProblem) -> Self {
        let (h, f, e) = (p.cfg.hidden, p.cfg.ffn, p.cfg.experts);
        Self {
            router: upload(dev, &p.params.router, &[h, e]),
            gate: upload(dev, &p.params.gate, &[e, h, f]),
            up: upload(dev, &p.params.up, &[e, h, f]),
            down: upload(dev, &p.params.down, &[e, f, h]),
        }
    }

    fn views(&self) -> MoeWeights<'_, T> {
        MoeWeights {
            router: &self.router,
            gate: &self.gate,
            up: &self.up,
            down: &self.down,
        }
    }
}

/// The first `t` tokens of problem `p` on the device.
fn tokens<T: Half>(dev: &Device, p: &HostProblem, t: usize) -> DeviceTensor<T> {
    let h = p.cfg.hidden;
    upload(dev, &p.x[..t * h], &[t, h])
}

/// The grid of the small-batch kernel under compute-sanitizer: the tools instrument the kernel,
/// which may lower its real occupancy below the one the runtime reports for it, and every CTA of
/// the grid must be resident at once. Eight CTAs fit on any device (at least one per
/// multiprocessor runs); the sanitizers check hazards within a CTA and at the barrier, which any
/// grid of more than one CTA exercises.
const SANITIZER_GRID: usize = 8;

/// `grid`, or [`SANITIZER_GRID`] under compute-sanitizer when none is forced.
fn grid_under_sanitizer(grid: Option<usize>) -> Option<usize> {
    grid.or(under_compute_sanitizer().then_some(SANITIZER_GRID))
}

/// A context for the small-batch path (`UpTo(64)`), or for the multi-kernel path (`Off`, not
/// the default `Auto`, which takes the path at many of these cases).
fn context<T: Half>(dev: &Device, small: bool) -> MoeContext<T> {
    let mut ctx = MoeContext::new(dev);
    let policy = if small {
        SmallBatch::UpTo(64)
    } else {
        SmallBatch::Off
    };
    ctx.set_small_batch(policy).unwrap();
    ctx.force_small_batch_grid(grid_under_sanitizer(None));
    ctx
}

fn bits32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bits16<T: Half>(v: &[T]) -> Vec<u16> {
    v.iter().map(|x| x.bits()).collect()
}

/// Everything a context shows of its last forward, as bits.
#[derive(Debug, PartialEq)]
struct Observed {
    logits: Vec<u32>,
    gates: Vec<u32>,
    /// |A|, sparsity and balance loss bits, n_e.
    stats: (usize, u64, u64, Vec<u32>),
    gate_sums: Vec<u32>,
    offsets: Vec<u32>,
    pair_tokens: Vec<u32>,
    pair_gates: Vec<u32>,
    pair_index: Vec<i32>,
    act: Vec<u16>,
    y: Vec<u16>,
    out: Vec<u16>,
}

fn observe<T: Half>(ctx: &mut MoeContext<T>, out: &DeviceTensor<T>) -> Observed {
    let s = ctx.stats().unwrap();
    let d = ctx.dispatch_to_host().unwrap();
    Observed {
        logits: bits32(&ctx.logits_to_host().unwrap()),
        gates: bits32(&ctx.gates_to_host().unwrap()),
        stats: (
            s.active_pairs,
            s.sparsity.to_bits(),
            s.balance_loss.to_bits(),
            s.tokens_per_expert,
        ),
        gate_sums: bits32(&ctx.gate_sums_to_host().unwrap()),
        offsets: d.offsets,
        pair_tokens: d.tokens,
        pair_gates: bits32(&d.gates),
        pair_index: ctx.pair_index_to_host().unwrap(),
        act: bits16(&ctx.act_to_host().unwrap()),
        y: bits16(&ctx.expert_out_to_host().unwrap()),
        out: bits16(&out.to_host().unwrap()),
    }
}

/// Phase by phase, so that a failure names the first phase that differs.
fn assert_same(what: &str, small: &Observed, multi: &Observed) {
    assert_eq!(small.logits, multi.logits, "{what}: logits");
    assert_eq!(small.gates, multi.gates, "{what}: gates");
    assert_eq!(small.stats, multi.stats, "{what}: statistics");
    assert_eq!(small.gate_sums, multi.gate_sums, "{what}: gate sums");
    assert_eq!(small.offsets, multi.offsets, "{what}: expert offsets");
    assert_eq!(small.pair_tokens, multi.pair_tokens, "{what}: pair tokens");
    assert_eq!(small.pair_gates, multi.pair_gates, "{what}: pair gates");
    assert_eq!(small.pair_index, multi.pair_index, "{what}: pair index");
    assert_eq!(small.act, multi.act, "{what}: act");
    assert_eq!(small.y, multi.y, "{what}: y");
    assert_eq!(small.out, multi.out, "{what}: out");
    assert_eq!(small, multi, "{what}");
}

/// An eager forward; one that took the small-batch path is waited for through the watchdog
/// ([`settle`]) before anything else is enqueued.
fn forward<T: Half>(
    dev: &Device,
    what: &str,
    ctx: &mut MoeContext<T>,
    cfg: &LayerConfig,
    x: &DeviceTensor<T>,
    w: &Weights<T>,
    out: &mut DeviceTensor<T>,
) {
    let before = ctx.small_batch_forwards();
    moe_forward(
        ctx,
        cfg,
        RouterKind::Relu,
        Coefficient::Fixed(LAMBDA),
        x,
        &w.views(),
        out,
    )
    .unwrap();
    if ctx.small_batch_forwards() != before {
        settle(dev, what, cfg.tokens, ctx.small_batch_last_launch());
    }
}

/// How a case runs: the multi-kernel side's GEMM path (None: the context's default, which
/// follows REMOE_GEMM_PATH), the small-batch grid (None: the device's resident maximum), and
/// whether the small-batch side is a context never configured (the default `SmallBatch::Auto`)
/// instead of one set to `UpTo(64)`.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    gemm: Option<GemmPath>,
    grid: Option<usize>,
    auto: bool,
}

/// One case: a warm-up on both paths, both workspaces and outputs poisoned, the measured run;
/// the small-batch path must have run (on the forced grid, where one is), and every phase must
/// match bit for bit. Returns what the small-batch context shows, as bits, and its last launch
/// (grid, split-K count).
fn compare<T: Half>(
    dev: &Device,
    what: &str,
    cfg: &LayerConfig,
    x: &DeviceTensor<T>,
    w: &Weights<T>,
    run: Run,
) -> (Observed, (usize, usize)) {
    let (t, h) = (cfg.tokens, cfg.hidden);
    let mut small = if run.auto {
        let ctx = MoeContext::<T>::new(dev);
        assert_eq!(ctx.small_batch(), SmallBatch::Auto, "{what}: the default");
        ctx
    } else {
        context::<T>(dev, true)
    };
    let mut multi = context::<T>(dev, false);
    if let Some(g) = run.gemm {
        small.set_gemm_path(g).unwrap();
        multi.set_gemm_path(g).unwrap();
    }
    small.force_small_batch_grid(grid_under_sanitizer(run.grid));
    let mut out_s = DeviceTensor::<T>::zeros(dev, &[t, h]).unwrap();
    let mut out_m = DeviceTensor::<T>::zeros(dev, &[t, h]).unwrap();
    forward(dev, what, &mut small, cfg, x, w, &mut out_s);
    forward(dev, what, &mut multi, cfg, x, w, &mut out_m);
    let warm = (small.allocations(), multi.allocations());
    small.poison_workspace().unwrap();
    multi.poison_workspace().unwrap();
    out_s.poison().unwrap();
    out_m.poison().unwrap();
    forward(dev, what, &mut small, cfg, x, w, &mut out_s);
    forward(dev, what, &mut multi, cfg, x, w, &mut out_m);
    assert_eq!(
        (small.allocations(), multi.allocations()),
        warm,
        "{what}: steady state allocated"
    );
    assert_eq!(
        small.small_batch_forwards(),
        2,
        "{what}: the small-batch path did not run"
    );
    let launch = small
        .small_batch_last_launch()
        .expect("a small-batch forward ran");
    if let Some(g) = grid_under_sanitizer(run.grid) {
        assert_eq!(launch.0, g, "{what}: the forced grid");
    }
    let a = observe(&mut small, &out_s);
    let b = observe(&mut multi, &out_m);
    assert_same(what, &a, &b);
    (a, launch)
}

/// [`compare`], then the output against the CPU reference, whole tensor and per row.
fn compare_with_reference<T: Half>(
    dev: &Device,
    what: &str,
    p: &HostProblem,
    t: usize,
    w: &Weights<T>,
    run: Run,
) -> (Observed, (usize, usize)) {
    let cfg = LayerConfig { tokens: t, ..p.cfg };
    let h = cfg.hidden;
    let x = tokens::<T>(dev, p, t);
    let (o, launch) = compare(dev, what, &cfg, &x, w, run);
    let want = ref_remoe_forward(&p.x[..t * h], &p.params, &cfg, LAMBDA).out;
    let got: Vec<f64> = o
        .out
        .iter()
        .map(|&b| {
            // The bits back to a value of T's type.
            let v: T = bytemuck::cast(b);
            v.value()
        })
        .collect();
    let err = rel_err(&got, &want);
    assert!(err < 1e-2, "{what}: layer output rel err {err:e}");
    assert_rows_within(what, "layer output", &got, &want, h, &[], &[]);
    (o, launch)
}

const TOKENS: [usize; 5] = [0, 1, 2, 7, 64];

/// The densities of the matrix: random routing at k/E, every gate zero, every gate open, one
/// expert taking every token.
fn densities(e: usize, k: usize) -> Vec<(&'static str, Vec<f64>)> {
    let mut one = vec![0.0; e];
    one[e / 2] = 1.0;
    vec![
        ("random", uniform_density(e, k as f64 / e as f64)),
        ("zero", vec![0.0; e]),
        ("open", vec![1.0; e]),
        ("one expert", one),
    ]
}

/// The matrix for one (E, k, H, F): every density, every T, against the multi-kernel path and
/// the reference. Under racecheck (which instruments every shared-memory access) only T = 1 and
/// T = 64 of `ts`: one and four 16-row tiles per unit, the kernel's two extremes.
fn matrix<T: Half>(dev: &Device, e: usize, k: usize, h: usize, f: usize, ts: &[usize]) {
    let seed = fresh_seed();
    let racecheck = sanitizer_tool().as_deref() == Some("racecheck");
    let ts: Vec<usize> = ts
        .iter()
        .copied()
        .filter(|&t| !racecheck || t == 1 || t == 64)
        .collect();
    let ts = &ts[..];
    let tmax = *ts.iter().max().unwrap();
    for (name, density) in densities(e, k) {
        let cfg = LayerConfig::new(tmax, h, f, e, k);
        let p = host_problem::<T>(cfg, &density, seed);
        let w = Weights::<T>::upload(dev, &p);
        for &t in ts {
            let what = format!(
                "{} E {e} k {k} H {h} F {f} T {t} {name} {}",
                std::any::type_name::<T>(),
                seed_note(seed)
            );
            let (o, _) = compare_with_reference(dev, &what, &p, t, &w, Run::default());
            let pairs = o.stats.0;
            match name {
                "zero" => assert_eq!(pairs, 0, "{what}"),
                "open" => assert_eq!(pairs, t * e, "{what}"),
                "one expert" => assert_eq!(o.stats.3[e / 2] as usize, t, "{what}"),
                _ => {}
            }
        }
    }
}

#[test]
fn gpu_small_batch_matches_multi_kernel_config_s() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_matches_multi_kernel_config_s") else {
        return;
    };
    // Config S: H 768, F 3072, E 8, k 1 (F 3072 splits the down projection in four at T = 1).
    matrix::<bf16>(&dev, 8, 1, 768, 3072, &TOKENS);
}

#[test]
fn gpu_small_batch_matches_multi_kernel_e64_k8() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_matches_multi_kernel_e64_k8") else {
        return;
    };
    // H % 64 == 8 (a zero-filled tail k-step in the up projection and the router), F % 32 == 8
    // (a partial column slice), F / 64 rounded up = 19 K blocks (two uneven split-K ranges).
    matrix::<bf16>(&dev, 64, 8, 136, 1160, &TOKENS);
}

#[test]
fn gpu_small_batch_matches_multi_kernel_e128_k8() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_matches_multi_kernel_e128_k8") else {
        return;
    };
    matrix::<bf16>(&dev, 128, 8, 200, 264, &TOKENS);
    // Issue 25's own fine-grained shape: config A's H with F 768 (twelve K blocks of the down
    // projection, split as at T = 1). Every gate open at T 64 is 8,192 pairs, four times the
    // largest other case's GEMM work: left to the plain runs, not the sanitizers'.
    let ts: &[usize] = if under_compute_sanitizer() {
        &[0, 1, 7]
    } else {
        &TOKENS
    };
    matrix::<bf16>(&dev, 128, 8, 768, 768, ts);
}

#[test]
fn gpu_small_batch_matches_multi_kernel_with_the_fma_router() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_matches_multi_kernel_with_the_fma_router") else {
        return;
    };
    // E % 8 != 0: the router's FMA kernel, whose chain pads H to a multiple of 32.
    matrix::<bf16>(&dev, 6, 2, 136, 200, &TOKENS);
}

#[test]
fn gpu_small_batch_matches_multi_kernel_in_f16() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_matches_multi_kernel_in_f16") else {
        return;
    };
    matrix::<f16>(&dev, 8, 1, 768, 3072, &[1, 7, 64]);
    matrix::<f16>(&dev, 64, 8, 136, 1160, &[0, 2, 64]);
    matrix::<f16>(&dev, 6, 2, 136, 200, &[1, 7]);
}

/// E = 100 (E % 8 != 0 and E > 16): the multi-kernel path's router is router.cu's
/// `router_forward_kernel<T, 64, 4, 4>` on two 64-expert column blocks, whose logit per (token,
/// expert) is the same fmaf chain over H in order, zero-padded to a multiple of 32, as the
/// small-batch kernel's `router_fma` (the tile shape changes which thread owns a logit, not its
/// chain). The (6, 2) case above takes the E <= 8 instance.
#[test]
fn gpu_small_batch_matches_multi_kernel_with_the_wide_fma_router() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_matches_multi_kernel_with_the_wide_fma_router")
    else {
        return;
    };
    matrix::<bf16>(&dev, 100, 4, 136, 264, &TOKENS);
}

/// The kernel's widest dispatch: E = 512 at T = 64 with every gate open, 32,768 pairs (every
/// expert a unit of four 16-row tiles; the combine walks 512 experts per token).
#[test]
fn gpu_small_batch_e512_every_gate_open() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_e512_every_gate_open") else {
        return;
    };
    let seed = fresh_seed();
    let (t, h, f, e, k) = (64, 64, 96, 512, 8);
    let cfg = LayerConfig::new(t, h, f, e, k);
    let p = host_problem::<bf16>(cfg, &vec![1.0; e], seed);
    let w = Weights::<bf16>::upload(&dev, &p);
    let what = format!("E {e} T {t} open {}", seed_note(seed));
    let (o, _) = compare_with_reference(&dev, &what, &p, t, &w, Run::default());
    assert_eq!(o.stats.0, 32_768, "{what}: pairs");
    assert!(
        o.stats.3.iter().all(|&n| n as usize == t),
        "{what}: tokens per expert"
    );
}

/// The smallest widths: H = 16 (one k-step of the router and up chains past which everything is
/// zero-filled; one 32-column slice of H, half of it outside) and F = 16 (one slice of F, half
/// outside; one K block of the down projection).
#[test]
fn gpu_small_batch_matches_multi_kernel_with_h_or_f_16() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_matches_multi_kernel_with_h_or_f_16") else {
        return;
    };
    matrix::<bf16>(&dev, 8, 2, 16, 16, &TOKENS);
    matrix::<bf16>(&dev, 16, 4, 264, 16, &[1, 7, 64]);
    matrix::<bf16>(&dev, 16, 4, 16, 520, &[1, 7, 64]);
}

/// A down projection split in three (the split-K counts of the other cases are 1, 2 and 4): at
/// E 16, k 2, H 264 and F 1608 the multi-kernel path's `down_k_splits` (src/capacity.rs) gives
/// 128 / (row tiles x 2 column blocks of 256) clamped to ceil(1608 / 64) / 8 = 3 at every T
/// from 1 to 64, with the uneven K ranges [0, 8), [8, 17), [17, 26) of 64-row blocks.
#[test]
fn gpu_small_batch_with_three_split_k_ranges() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_with_three_split_k_ranges") else {
        return;
    };
    let seed = fresh_seed();
    let (e, k, h, f) = (16, 2, 264, 1608);
    let cfg = LayerConfig::new(64, h, f, e, k);
    let p = host_problem::<bf16>(cfg, &uniform_density(e, k as f64 / e as f64), seed);
    let w = Weights::<bf16>::upload(&dev, &p);
    for t in [1, 2, 7, 64] {
        let what = format!("E {e} k {k} H {h} F {f} T {t} {}", seed_note(seed));
        let (_, (_, splits)) = compare_with_reference(&dev, &what, &p, t, &w, Run::default());
        assert_eq!(splits, 3, "{what}: split-K ranges");
    }
}

/// H above 1024: H 1096 is 18 slices of 64 columns (the last one 8 wide), so the combine's
/// column groups (16 counters per token) hold two slices each for groups 0 and 1 and one for the
/// others; the router's chain is 72 k-steps, more than its four staging stages of 256 k hold at
/// once (the ring wraps), with a zero-filled tail (1096 % 64 = 8).
#[test]
fn gpu_small_batch_with_h_above_1024() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_with_h_above_1024") else {
        return;
    };
    let seed = fresh_seed();
    let (e, k, h, f) = (16, 4, 1096, 264);
    let cfg = LayerConfig::new(64, h, f, e, k);
    let p = host_problem::<bf16>(cfg, &uniform_density(e, k as f64 / e as f64), seed);
    let w = Weights::<bf16>::upload(&dev, &p);
    for t in [1, 7, 64] {
        let what = format!("E {e} k {k} H {h} F {f} T {t} {}", seed_note(seed));
        compare_with_reference(&dev, &what, &p, t, &w, Run::default());
    }
    // Every gate open: every token's combine counters take all sixteen experts' arrivals.
    let p = host_problem::<bf16>(cfg, &vec![1.0; e], seed);
    let w = Weights::<bf16>::upload(&dev, &p);
    let what = format!("E {e} k {k} H {h} F {f} T 64 open {}", seed_note(seed));
    compare_with_reference(&dev, &what, &p, 64, &w, Run::default());
}

/// T tokens of problem `p` from token `first` on (wrapping around its tokens), on the device.
fn tokens_from<T: Half>(dev: &Device, p: &HostProblem, first: usize, t: usize) -> DeviceTensor<T> {
    let (h, n) = (p.cfg.hidden, p.cfg.tokens);
    let rows: Vec<f64> = (0..t)
        .flat_map(|i| {
            let r = (first + i) % n;
            p.x[r * h..(r + 1) * h].iter().copied()
        })
        .collect();
    upload(dev, &rows, &[t, h])
}

/// Many launches on one context, every one checked bit for bit (every phase) against the
/// multi-kernel path: the kernel's synchronisation words carry state from launch to launch (the
/// barrier word's bit 31 flips once per launch; two sets of counters are used in turn, each
/// launch zeroing the other for the next), which is where a reset bug would hide, so the shape
/// (E, k, H, F and with them the split-K count), T (0 included: a launch that only flips the
/// barrier), the input and the grid change from launch to launch. Then one forward captured in a
/// graph and replayed as many times on new inputs, each replay checked, with an eager forward of
/// the same context (same shape, another input and output) after every fifth replay, so that the
/// parity moves between replays too.
#[test]
fn gpu_small_batch_many_launches_checked_each_time() {
    let _gpu = gpu_lock();
    let Some(dev) = untracked_gpu_or_skip("gpu_small_batch_many_launches_checked_each_time") else {
        return;
    };
    let seed = fresh_seed();
    let n = if under_compute_sanitizer() { 12 } else { 50 };
    let shapes = [(8, 1, 768, 3072), (64, 8, 136, 1160), (16, 2, 264, 1608)];
    let problems: Vec<(HostProblem, Weights<bf16>)> = shapes
        .iter()
        .map(|&(e, k, h, f)| {
            let cfg = LayerConfig::new(64, h, f, e, k);
            let p = host_problem::<bf16>(cfg, &uniform_density(e, k as f64 / e as f64), seed);
            let w = Weights::<bf16>::upload(&dev, &p);
            (p, w)
        })
        .collect();
    let ts = [1usize, 7, 0, 64, 2, 1, 16];
    let grids = [None, Some(1), Some(3), None, Some(8)];
    let mut small = context::<bf16>(&dev, true);
    let mut multi = context::<bf16>(&dev, false);
    for i in 0..n {
        let (p, w) = &problems[i % problems.len()];
        let t = ts[i % ts.len()];
        let grid = grid_under_sanitizer(grids[i % grids.len()]);
        let cfg = LayerConfig { tokens: t, ..p.cfg };
        let h = cfg.hidden;
        let what = format!(
            "launch {i}: E {} T {t} grid {grid:?} {}",
            cfg.experts,
            seed_note(seed)
        );
        small.force_small_batch_grid(grid);
        let x = tokens_from::<bf16>(&dev, p, 5 * i, t);
        let mut out_s = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
        let mut out_m = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
        small.poison_workspace().unwrap();
        multi.poison_workspace().unwrap();
        out_s.poison().unwrap();
        out_m.poison().unwrap();
        forward(&dev, &what, &mut small, &cfg, &x, w, &mut out_s);
        forward(&dev, &what, &mut multi, &cfg, &x, w, &mut out_m);
        assert_eq!(small.small_batch_forwards(), i as u64 + 1, "{what}: path");
        let a = observe(&mut small, &out_s);
        let b = observe(&mut multi, &out_m);
        assert_same(&what, &a, &b);
    }

    // The graph: one forward (E 64, k 8, T 7) of `small`, replayed on new inputs.
    let (p, w) = &problems[1];
    let t = 7;
    let cfg = LayerConfig { tokens: t, ..p.cfg };
    let h = cfg.hidden;
    let what = seed_note(seed);
    small.force_small_batch_grid(grid_under_sanitizer(None));
    let mut x = tokens_from::<bf16>(&dev, p, 0, t);
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
    // Warm at the captured shape (the capture may not grow a workspace).
    forward(&dev, &what, &mut small, &cfg, &x, w, &mut out);
    let graph = capture(&dev, || {
        moe_forward(
            &mut small,
            &cfg,
            RouterKind::Relu,
            Coefficient::Fixed(LAMBDA),
            &x,
            &w.views(),
            &mut out,
        )
    })
    .unwrap();
    graph.upload().unwrap();
    let last = small.small_batch_last_launch();
    let mut want = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
    for r in 0..n {
        let case = format!("replay {r}: {what}");
        let fresh: Vec<bf16> = (0..t)
            .flat_map(|i| {
                let row = (3 * r + i + 1) % p.cfg.tokens;
                p.x[row * h..(row + 1) * h].iter().map(|&v| bf16::of(v))
            })
            .collect();
        x.copy_from_host(&fresh).unwrap();
        out.poison().unwrap();
        small.poison_workspace().unwrap();
        // SAFETY: every captured buffer (x, out, the weights, the context's workspace and sync
        // words) is alive and unmoved: the eager forwards below have the captured shape, so they
        // reallocate nothing.
        unsafe { graph.replay() }.unwrap();
        settle(&dev, &case, t, last);
        want.poison().unwrap();
        multi.poison_workspace().unwrap();
        forward(&dev, &case, &mut multi, &cfg, &x, w, &mut want);
        let a = observe(&mut small, &out);
        let b = observe(&mut multi, &want);
        assert_same(&case, &a, &b);
        if r % 5 == 4 {
            // An eager forward of the same context between two replays.
            let case = format!("eager after replay {r}: {what}");
            let x2 = tokens_from::<bf16>(&dev, p, 11 * r + 2, t);
            let mut o_s = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
            let mut o_m = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
            o_s.poison().unwrap();
            o_m.poison().unwrap();
            forward(&dev, &case, &mut small, &cfg, &x2, w, &mut o_s);
            forward(&dev, &case, &mut multi, &cfg, &x2, w, &mut o_m);
            let a = observe(&mut small, &o_s);
            let b = observe(&mut multi, &o_m);
            assert_same(&case, &a, &b);
        }
    }
}

/// Against both GEMM paths of the multi-kernel side explicitly (the suite also runs every test
/// with REMOE_GEMM_PATH=mma-sync): the small-batch kernel has one implementation, and both
/// paths give the same bits.
#[test]
fn gpu_small_batch_matches_both_gemm_paths() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_matches_both_gemm_paths") else {
        return;
    };
    let seed = fresh_seed();
    for path in [GemmPath::MmaSync, GemmPath::Hopper] {
        if !path.supported_on(&dev).unwrap() {
            continue;
        }
        for (e, k, h, f) in [(8, 1, 768, 3072), (64, 8, 136, 1160)] {
            let cfg = LayerConfig::new(64, h, f, e, k);
            let p = host_problem::<bf16>(cfg, &uniform_density(e, k as f64 / e as f64), seed);
            let w = Weights::<bf16>::upload(&dev, &p);
            for t in [1, 7, 64] {
                let what = format!("{path:?} E {e} k {k} T {t} {}", seed_note(seed));
                let run = Run {
                    gemm: Some(path),
                    ..Run::default()
                };
                compare_with_reference(&dev, &what, &p, t, &w, run);
            }
        }
    }
}

/// A grid forced below the resident maximum (one CTA included): the same bits, whatever the
/// number of CTAs sharing the units and the barrier.
#[test]
fn gpu_small_batch_with_a_forced_small_grid() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_with_a_forced_small_grid") else {
        return;
    };
    let seed = fresh_seed();
    // The last case: every gate open at E 128, T 64 (8,192 pairs) on grids of one to five CTAs,
    // each CTA looping over hundreds of units between the barriers (plain runs only: under a
    // sanitizer one CTA doing all of it would outlast the run's time limit).
    let mut cases = vec![
        (8, 1, 768, 3072, 7, 1.0 / 8.0),
        (64, 8, 136, 1160, 64, 8.0 / 64.0),
    ];
    if !under_compute_sanitizer() {
        cases.push((128, 8, 768, 768, 64, 1.0));
    }
    for (e, k, h, f, t, density) in cases {
        let cfg = LayerConfig::new(t, h, f, e, k);
        let p = host_problem::<bf16>(cfg, &uniform_density(e, density), seed);
        let w = Weights::<bf16>::upload(&dev, &p);
        for grid in [1, 2, 3, 5] {
            let what = format!("grid {grid} E {e} T {t} {}", seed_note(seed));
            let run = Run {
                grid: Some(grid),
                ..Run::default()
            };
            compare_with_reference(&dev, &what, &p, t, &w, run);
        }
    }
}

/// One context through batch sizes that take the path and batch sizes that do not, in turns:
/// every forward matches a multi-kernel context that went through the same sequence, the path
/// runs exactly for T at or below the threshold, and the second pass allocates nothing.
#[test]
fn gpu_small_batch_with_alternating_batch_sizes_on_one_context() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_with_alternating_batch_sizes_on_one_context")
    else {
        return;
    };
    let seed = fresh_seed();
    let (e, k, h, f) = (8, 2, 256, 1032);
    let sizes = [1usize, 16, 7, 40, 64, 2, 0, 200, 1, 16];
    let tmax = *sizes.iter().max().unwrap();
    let cfg = LayerConfig::new(tmax, h, f, e, k);
    let p = host_problem::<bf16>(cfg, &uniform_density(e, 0.3), seed);
    let w = Weights::<bf16>::upload(&dev, &p);
    let mut small = context::<bf16>(&dev, false);
    small.set_small_batch(SmallBatch::UpTo(16)).unwrap();
    assert_eq!(small.small_batch(), SmallBatch::UpTo(16));
    let mut multi = context::<bf16>(&dev, false);
    let mut allocations = None;
    for pass in 0..2 {
        for &t in &sizes {
            let what = format!("pass {pass} T {t} {}", seed_note(seed));
            let cfg = LayerConfig { tokens: t, ..cfg };
            let x = tokens::<bf16>(&dev, &p, t);
            let mut out_s = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
            let mut out_m = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
            out_s.poison().unwrap();
            out_m.poison().unwrap();
            let before = small.small_batch_forwards();
            forward(&dev, &what, &mut small, &cfg, &x, &w, &mut out_s);
            forward(&dev, &what, &mut multi, &cfg, &x, &w, &mut out_m);
            let took = small.small_batch_forwards() - before;
            assert_eq!(took, u64::from(t <= 16), "{what}: path taken");
            let a = observe(&mut small, &out_s);
            let b = observe(&mut multi, &out_m);
            assert_same(&what, &a, &b);
        }
        // The second pass allocates nothing: the buffers of both paths have the same sizes.
        match allocations {
            None => allocations = Some(small.allocations()),
            Some(n) => assert_eq!(small.allocations(), n, "second pass allocated"),
        }
    }
}

/// Where the path must stay off, the forward is the multi-kernel one: TopK (both kinds), a
/// training context, T above the threshold or the kernel's bound, a fixed pair capacity below
/// T E, stage timing, the threshold turned off again. A fixed capacity of T E or more keeps it on.
#[test]
fn gpu_small_batch_stays_off_where_it_must() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_stays_off_where_it_must") else {
        return;
    };
    let seed = fresh_seed();
    let (t, h, f, e, k) = (7, 128, 256, 8, 2);
    let cfg = LayerConfig::new(t, h, f, e, k);
    let p = host_problem::<bf16>(cfg, &uniform_density(e, 0.3), seed);
    let w = Weights::<bf16>::upload(&dev, &p);
    let x = tokens::<bf16>(&dev, &p, t);
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
    let what = seed_note(seed);
    let run = |ctx: &mut MoeContext<bf16>, router: RouterKind, out: &mut DeviceTensor<bf16>| {
        let before = ctx.small_batch_forwards();
        moe_forward(
            ctx,
            &cfg,
            router,
            Coefficient::Fixed(LAMBDA),
            &x,
            &w.views(),
            out,
        )
        .unwrap();
        let took = ctx.small_batch_forwards() - before;
        if took > 0 {
            settle(&dev, &what, t, ctx.small_batch_last_launch());
        }
        took
    };

    for router in [RouterKind::TopK, RouterKind::TopKNormalized] {
        let mut ctx = context::<bf16>(&dev, true);
        assert_eq!(run(&mut ctx, router, &mut out), 0, "{what}: {router:?}");
    }
    // A training context: the multi-kernel forward saves g and u, and the backward runs.
    let mut ctx = MoeContext::<bf16>::for_training(&dev);
    ctx.set_small_batch(SmallBatch::UpTo(64)).unwrap();
    assert_eq!(
        run(&mut ctx, RouterKind::Relu, &mut out),
        0,
        "{what}: training"
    );
    let dout = tokens::<bf16>(&dev, &p, t);
    let mut grads = Grads::<bf16>::new(&dev, &cfg);
    moe_backward(
        &mut ctx,
        Coefficient::Fixed(LAMBDA),
        &x,
        &w.views(),
        &dout,
        grads.as_mut(),
        false,
    )
    .unwrap();
    // Above the threshold.
    let mut ctx = context::<bf16>(&dev, false);
    ctx.set_small_batch(SmallBatch::UpTo(t - 1)).unwrap();
    assert_eq!(
        run(&mut ctx, RouterKind::Relu, &mut out),
        0,
        "{what}: T > threshold"
    );
    ctx.set_small_batch(SmallBatch::UpTo(t)).unwrap();
    assert_eq!(
        run(&mut ctx, RouterKind::Relu, &mut out),
        1,
        "{what}: T == threshold"
    );
    ctx.set_small_batch(SmallBatch::Off).unwrap();
    assert_eq!(
        run(&mut ctx, RouterKind::Relu, &mut out),
        0,
        "{what}: off again"
    );
    // Above the kernel's bound, whatever the threshold.
    {
        let big = LayerConfig::new(65, h, f, e, k);
        let pb = host_problem::<bf16>(big, &uniform_density(e, 0.3), seed);
        let xb = tokens::<bf16>(&dev, &pb, 65);
        let mut ob = DeviceTensor::<bf16>::zeros(&dev, &[65, h]).unwrap();
        let mut ctx = MoeContext::<bf16>::new(&dev);
        ctx.set_small_batch(SmallBatch::UpTo(1 << 20)).unwrap();
        moe_forward(
            &mut ctx,
            &big,
            RouterKind::Relu,
            Coefficient::Fixed(LAMBDA),
            &xb,
            &w.views(),
            &mut ob,
        )
        .unwrap();
        assert_eq!(ctx.small_batch_forwards(), 0, "{what}: T = 65");
    }
    // A fixed pair capacity below T E (the multi-kernel path counts and checks it); T E keeps
    // the path.
    let mut ctx = context::<bf16>(&dev, true);
    ctx.set_pair_capacity(PairCapacity::Pairs(t * e - 1));
    assert_eq!(
        run(&mut ctx, RouterKind::Relu, &mut out),
        0,
        "{what}: capacity"
    );
    ctx.set_pair_capacity(PairCapacity::Pairs(t * e));
    assert_eq!(
        run(&mut ctx, RouterKind::Relu, &mut out),
        1,
        "{what}: capacity T E"
    );
    // Stage timing (the path has one stage).
    let mut ctx = context::<bf16>(&dev, true);
    ctx.set_stage_timing(true);
    assert_eq!(
        run(&mut ctx, RouterKind::Relu, &mut out),
        0,
        "{what}: stage timing"
    );
    assert!(ctx.stage_times().is_some());
}

/// 50 forwards enqueued back to back with nothing read in between (each into its own output,
/// on its own input, with the adaptive controller recording every one): the outputs, the last
/// statistics and the controller's step match the multi-kernel path's.
#[test]
fn gpu_small_batch_fifty_forwards_without_a_host_read() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_fifty_forwards_without_a_host_read") else {
        return;
    };
    let seed = fresh_seed();
    let n = 50;
    let (t, h, f, e, k) = (1, 136, 1160, 64, 8);
    let cfg = LayerConfig::new(t, h, f, e, k);
    let big = LayerConfig { tokens: n, ..cfg };
    let p = host_problem::<bf16>(big, &uniform_density(e, k as f64 / e as f64), seed);
    let w = Weights::<bf16>::upload(&dev, &p);
    let xs: Vec<DeviceTensor<bf16>> = (0..n)
        .map(|i| upload(&dev, &p.x[i * h..(i + 1) * h], &[1, h]))
        .collect();
    let what = seed_note(seed);
    let mut outs = Vec::new();
    let mut stats = Vec::new();
    let mut lambdas = Vec::new();
    for small in [true, false] {
        let mut ctx = context::<bf16>(&dev, small);
        let mut lambda = LambdaController::new(&dev, k, e).unwrap();
        let mut o: Vec<DeviceTensor<bf16>> = (0..n)
            .map(|_| {
                let mut out = DeviceTensor::zeros(&dev, &[1, h]).unwrap();
                out.poison().unwrap();
                out
            })
            .collect();
        for (x, out) in xs.iter().zip(o.iter_mut()) {
            moe_forward(
                &mut ctx,
                &cfg,
                RouterKind::Relu,
                Coefficient::Adaptive(&mut lambda),
                x,
                &w.views(),
                out,
            )
            .unwrap();
        }
        if small {
            assert_eq!(ctx.small_batch_forwards(), n as u64, "{what}: path");
            settle(&dev, &what, t, ctx.small_batch_last_launch());
        }
        lambda.step().unwrap();
        outs.push(
            o.iter()
                .map(|out| bits16(&out.to_host().unwrap()))
                .collect::<Vec<_>>(),
        );
        stats.push(ctx.stats().unwrap());
        lambdas.push(lambda.lambda().unwrap().to_bits());
    }
    for (i, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
        assert_eq!(a, b, "{what}: forward {i}");
    }
    assert_eq!(stats[0], stats[1], "{what}: statistics of the last forward");
    assert_eq!(lambdas[0], lambdas[1], "{what}: the controller's step");
}

/// One context's share of the captured graph: its batch size, input, output and context.
struct Slot {
    cfg: LayerConfig,
    x: DeviceTensor<bf16>,
    out: DeviceTensor<bf16>,
    ctx: MoeContext<bf16>,
}

/// The forward captured in a CUDA graph (one context at T = 1, another at T = 7, in one graph)
/// and replayed on new inputs, poisoned workspaces and outputs before each replay, then replayed
/// many times back to back: the same bits as eager multi-kernel forwards on those inputs.
#[test]
fn gpu_small_batch_captured_and_replayed_on_new_inputs() {
    let _gpu = gpu_lock();
    let Some(dev) = untracked_gpu_or_skip("gpu_small_batch_captured_and_replayed_on_new_inputs")
    else {
        return;
    };
    let seed = fresh_seed();
    let (h, f, e, k) = (768, 3072, 8, 1);
    let base = LayerConfig::new(64, h, f, e, k);
    let density = uniform_density(e, k as f64 / e as f64);
    let p = host_problem::<bf16>(base, &density, seed);
    let w = Weights::<bf16>::upload(&dev, &p);
    let what = seed_note(seed);
    let mut slots: Vec<Slot> = [1usize, 7]
        .iter()
        .map(|&t| Slot {
            cfg: LayerConfig { tokens: t, ..base },
            x: tokens(&dev, &p, t),
            out: DeviceTensor::zeros(&dev, &[t, h]).unwrap(),
            ctx: context(&dev, true),
        })
        .collect();
    // Warm: the capture may not grow a workspace (the grid barrier was allocated when `UpTo`
    // was set; gpu_small_batch_captured_after_a_multi_kernel_warm_up warms up on the other
    // path).
    for s in slots.iter_mut() {
        forward(&dev, &what, &mut s.ctx, &s.cfg, &s.x, &w, &mut s.out);
    }
    let graph = capture(&dev, || {
        for s in slots.iter_mut() {
            moe_forward(
                &mut s.ctx,
                &s.cfg,
                RouterKind::Relu,
                Coefficient::Fixed(LAMBDA),
                &s.x,
                &w.views(),
                &mut s.out,
            )?;
        }
        Ok(())
    })
    .unwrap();
    graph.upload().unwrap();
    for s in &slots {
        assert_eq!(
            s.ctx.small_batch_forwards(),
            2,
            "{what}: T {}",
            s.cfg.tokens
        );
    }
    // The watchdog after each replay names the T 7 context's launch (the later of the two).
    let last = slots[1].ctx.small_batch_last_launch();
    let mut eager = context::<bf16>(&dev, false);
    let mut want = |x: &DeviceTensor<bf16>, cfg: &LayerConfig| {
        let mut o = DeviceTensor::<bf16>::zeros(&dev, &[cfg.tokens, h]).unwrap();
        forward(&dev, "eager", &mut eager, cfg, x, &w, &mut o);
        (bits16(&o.to_host().unwrap()), eager.stats().unwrap())
    };
    for round in 0..3u64 {
        let fresh = host_problem::<bf16>(base, &density, seed + 1 + round);
        for s in slots.iter_mut() {
            let t = s.cfg.tokens;
            let host: Vec<bf16> = fresh.x[..t * h].iter().map(|&v| bf16::of(v)).collect();
            s.x.copy_from_host(&host).unwrap();
            s.out.poison().unwrap();
            s.ctx.poison_workspace().unwrap();
        }
        // SAFETY: every captured buffer (the inputs, outputs and weights, the contexts'
        // workspaces and grid barriers) is alive and unmoved.
        unsafe { graph.replay() }.unwrap();
        settle(&dev, &format!("{what}: replay {round}: T 1 and 7"), 7, last);
        for s in slots.iter_mut() {
            let (out, stats) = want(&s.x, &s.cfg);
            let t = s.cfg.tokens;
            assert_eq!(
                bits16(&s.out.to_host().unwrap()),
                out,
                "{what}: round {round}: T {t}: replayed output"
            );
            assert_eq!(
                s.ctx.stats().unwrap(),
                stats,
                "{what}: round {round}: T {t}: statistics"
            );
        }
    }
    // Back to back: the barrier's generation word moves on through every replay.
    for _ in 0..40 {
        // SAFETY: as above.
        unsafe { graph.replay() }.unwrap();
    }
    settle(&dev, &format!("{what}: 40 replays: T 1 and 7"), 7, last);
    for s in &slots {
        let (out, _) = want(&s.x, &s.cfg);
        assert_eq!(
            bits16(&s.out.to_host().unwrap()),
            out,
            "{what}: after 43 replays: T {}",
            s.cfg.tokens
        );
    }
}

/// Non-finite router logits (a NaN and an infinity in two tokens' inputs): the error word as the
/// router's (every logit of those tokens counted, the lowest such token), reported once by the
/// next host-visible call; nothing recorded into the adaptive controller; the outputs as the
/// multi-kernel path's (the tokens' gates are 0, so their rows are 0).
#[test]
fn gpu_small_batch_non_finite_logits() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_non_finite_logits") else {
        return;
    };
    let seed = fresh_seed();
    let (t, h, f, e, k) = (7, 136, 264, 64, 8);
    let cfg = LayerConfig::new(t, h, f, e, k);
    let mut p = host_problem::<bf16>(cfg, &uniform_density(e, k as f64 / e as f64), seed);
    p.x[3 * h + 5] = f64::NAN;
    p.x[5 * h + 9] = f64::INFINITY;
    let w = Weights::<bf16>::upload(&dev, &p);
    let x = tokens::<bf16>(&dev, &p, t);
    let what = seed_note(seed);
    let mut seen = Vec::new();
    for small in [true, false] {
        let mut ctx = context::<bf16>(&dev, small);
        let mut lambda = LambdaController::new(&dev, k, e).unwrap();
        let before = lambda.lambda().unwrap();
        let mut out = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
        out.poison().unwrap();
        moe_forward(
            &mut ctx,
            &cfg,
            RouterKind::Relu,
            Coefficient::Adaptive(&mut lambda),
            &x,
            &w.views(),
            &mut out,
        )
        .unwrap();
        if small {
            assert_eq!(ctx.small_batch_forwards(), 1, "{what}: path");
            settle(&dev, &what, t, ctx.small_batch_last_launch());
        }
        let err = ctx.check_device_errors();
        assert!(
            matches!(
                err,
                Err(Error::NonFiniteLogits {
                    count,
                    first_token: 3
                }) if count == 2 * e
            ),
            "{what}: small {small}: {err:?}"
        );
        ctx.check_device_errors().unwrap();
        lambda.step().unwrap();
        assert_eq!(
            lambda.lambda().unwrap(),
            before,
            "{what}: small {small}: the controller recorded a forward with a non-finite logit"
        );
        let o = observe(&mut ctx, &out);
        for token in [3, 5] {
            assert!(
                o.out[token * h..(token + 1) * h].iter().all(|&b| b == 0),
                "{what}: small {small}: token {token}'s row"
            );
        }
        seen.push(o);
    }
    assert_same(&what, &seen[0], &seen[1]);
}

/// Two contexts on two streams of one device, each enqueuing 20 small-batch forwards from its own
/// thread at the same time (both at the device's full cooperative grid: the driver runs one
/// grid's CTAs only with all of them resident, so the two launches take turns or share the
/// multiprocessors, and neither waits at a barrier for CTAs the other holds). Every forward must
/// finish (the watchdog) and give the bits of the same forwards run on one thread.
#[test]
fn gpu_small_batch_two_streams_from_two_threads() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_two_streams_from_two_threads") else {
        return;
    };
    const N: usize = 20;
    let seed = fresh_seed();
    let (t, h, f, e, k) = (7, 136, 1160, 64, 8);
    let cfg = LayerConfig::new(t, h, f, e, k);
    let all = LayerConfig {
        tokens: N * t,
        ..cfg
    };
    let p = host_problem::<bf16>(all, &uniform_density(e, k as f64 / e as f64), seed);
    let what = seed_note(seed);
    // N forwards of one context on `dev` (its weights, inputs and outputs its own, on its
    // stream), each on its own T tokens; `start` lines the threads up before the enqueueing.
    let run = |dev: &Device, who: &str, start: Option<&Barrier>| -> Vec<Vec<u16>> {
        let w = Weights::<bf16>::upload(dev, &p);
        let xs: Vec<DeviceTensor<bf16>> = (0..N)
            .map(|i| upload(dev, &p.x[i * t * h..(i + 1) * t * h], &[t, h]))
            .collect();
        let mut outs: Vec<DeviceTensor<bf16>> = (0..N)
            .map(|_| {
                let mut out = DeviceTensor::zeros(dev, &[t, h]).unwrap();
                out.poison().unwrap();
                out
            })
            .collect();
        let mut ctx = context::<bf16>(dev, true);
        dev.synchronize().unwrap();
        if let Some(b) = start {
            b.wait();
        }
        for (x, out) in xs.iter().zip(outs.iter_mut()) {
            moe_forward(
                &mut ctx,
                &cfg,
                RouterKind::Relu,
                Coefficient::Fixed(LAMBDA),
                x,
                &w.views(),
                out,
            )
            .unwrap();
        }
        assert_eq!(ctx.small_batch_forwards(), N as u64, "{what}: {who}: path");
        let case = format!("{what}: {who}: {N} forwards on two streams");
        settle(dev, &case, t, ctx.small_batch_last_launch());
        outs.iter()
            .map(|out| bits16(&out.to_host().unwrap()))
            .collect()
    };
    let want = run(&dev, "one thread", None);
    let start = Barrier::new(2);
    let got: Vec<Vec<Vec<u16>>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let (run, dev, start) = (&run, &dev, &start);
                scope.spawn(move || {
                    let stream = dev.context().new_stream().expect("a stream of its own");
                    let mine = Device::from_stream(stream).unwrap();
                    run(&mine, &format!("thread {i}"), Some(start))
                })
            })
            .collect();
        threads.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, outs) in got.iter().enumerate() {
        for (j, (a, b)) in outs.iter().zip(&want).enumerate() {
            assert_eq!(a, b, "{what}: thread {i}: forward {j}");
        }
    }
}

/// Under `UpTo` the grid barrier is allocated when the policy is set, not by the first
/// small-batch forward: a context warmed up on the multi-kernel path (`Off`), then set to
/// `UpTo`, is captured on the small-batch path without allocating, and its replay gives the
/// multi-kernel bits. Setting `UpTo` for the first time during a capture is refused
/// (`CaptureUnsupported`) and leaves the policy as it was.
#[test]
fn gpu_small_batch_captured_after_a_multi_kernel_warm_up() {
    let _gpu = gpu_lock();
    let Some(dev) = untracked_gpu_or_skip("gpu_small_batch_captured_after_a_multi_kernel_warm_up")
    else {
        return;
    };
    let seed = fresh_seed();
    let (t, h, f, e, k) = (7, 136, 1160, 64, 8);
    let cfg = LayerConfig::new(t, h, f, e, k);
    let p = host_problem::<bf16>(cfg, &uniform_density(e, k as f64 / e as f64), seed);
    let w = Weights::<bf16>::upload(&dev, &p);
    let x = tokens::<bf16>(&dev, &p, t);
    let what = seed_note(seed);
    // The warm-up: `Off`, so the multi-kernel path sizes the workspace.
    let mut ctx = context::<bf16>(&dev, false);
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
    forward(&dev, &what, &mut ctx, &cfg, &x, &w, &mut out);

    let refused = capture(&dev, || ctx.set_small_batch(SmallBatch::UpTo(64)));
    assert!(
        matches!(refused, Err(Error::CaptureUnsupported(_))),
        "{what}: turned on during a capture: {refused:?}"
    );
    assert_eq!(ctx.small_batch(), SmallBatch::Off, "{what}: left off");

    let before = ctx.allocations();
    ctx.set_small_batch(SmallBatch::UpTo(64)).unwrap();
    assert_eq!(
        ctx.allocations(),
        before + 1,
        "{what}: the barrier is allocated when the path is turned on"
    );
    let warm = ctx.allocations();
    let graph = capture(&dev, || {
        moe_forward(
            &mut ctx,
            &cfg,
            RouterKind::Relu,
            Coefficient::Fixed(LAMBDA),
            &x,
            &w.views(),
            &mut out,
        )
    })
    .unwrap();
    assert_eq!(ctx.allocations(), warm, "{what}: the capture allocated");
    assert_eq!(
        ctx.small_batch_forwards(),
        1,
        "{what}: the captured forward took the small-batch path"
    );
    out.poison().unwrap();
    ctx.poison_workspace().unwrap();
    // SAFETY: every captured buffer (x, out, the weights, the context's workspace and grid
    // barrier) is alive and unmoved.
    unsafe { graph.replay() }.unwrap();
    settle(
        &dev,
        &format!("{what}: replay"),
        t,
        ctx.small_batch_last_launch(),
    );
    let mut multi = context::<bf16>(&dev, false);
    let mut want = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
    forward(&dev, &what, &mut multi, &cfg, &x, &w, &mut want);
    let a = observe(&mut ctx, &out);
    let b = observe(&mut multi, &want);
    assert_same(&format!("{what}: replayed"), &a, &b);
}

/// One eager forward of `ctx` with `router` on `x` (into an output of its own): 1 when it took
/// the small-batch path (waited for through the watchdog), else 0.
fn took_path(
    dev: &Device,
    what: &str,
    ctx: &mut MoeContext<bf16>,
    router: RouterKind,
    cfg: &LayerConfig,
    x: &DeviceTensor<bf16>,
    w: &Weights<bf16>,
) -> u64 {
    let before = ctx.small_batch_forwards();
    let mut out = DeviceTensor::<bf16>::zeros(dev, &[cfg.tokens, cfg.hidden]).unwrap();
    moe_forward(
        ctx,
        cfg,
        router,
        Coefficient::Fixed(LAMBDA),
        x,
        &w.views(),
        &mut out,
    )
    .unwrap();
    let took = ctx.small_batch_forwards() - before;
    if took > 0 {
        settle(dev, what, cfg.tokens, ctx.small_batch_last_launch());
    }
    took
}

/// Under the default `SmallBatch::Auto` (a context never configured), a decode step at config
/// A's shape (E 8, k 1, H 768, F 3072) takes the small-batch path from its first forward, which
/// prepares the context: T = 1 (one expert's weights, 14 MB expected) and T = 64 (all eight,
/// 113 MB; under Auto's bound of 192 MiB, and measured faster than the chain there:
/// docs/DECODE.md, "v2, measured"). Every phase matches a context set to `Off` bit for bit,
/// with poisoned workspaces and outputs (`compare`), and the output matches the CPU reference.
#[test]
fn gpu_small_batch_auto_takes_the_path_at_decode_by_default() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_auto_takes_the_path_at_decode_by_default") else {
        return;
    };
    let seed = fresh_seed();
    let (e, k, h, f) = (8, 1, 768, 3072);
    let cfg = LayerConfig::new(64, h, f, e, k);
    let p = host_problem::<bf16>(cfg, &uniform_density(e, k as f64 / e as f64), seed);
    let w = Weights::<bf16>::upload(&dev, &p);
    for t in [1, 64] {
        let what = format!("Auto E {e} k {k} H {h} F {f} T {t} {}", seed_note(seed));
        let run = Run {
            auto: true,
            ..Run::default()
        };
        compare_with_reference(&dev, &what, &p, t, &w, run);
    }
}

/// Under `Auto`, an eager forward at a larger batch warms a context for a capture at T = 1 on
/// the small-batch path (docs/SPEC.md, section 9: an eager call of the same or larger shapes
/// warms a context): at config A's shape, an eager forward at T = 64 (which takes the path
/// itself) or at T = 65 (above the kernel's bound: the multi-kernel path) prepares the context;
/// the forward captured at T = 1 takes the path (counted when captured) without allocating, and
/// its replays on new inputs, with poisoned workspaces and outputs, give the bits of a context
/// set to `Off`, phase by phase.
#[test]
fn gpu_small_batch_auto_eager_warm_up_then_capture_at_one_token() {
    let _gpu = gpu_lock();
    let Some(dev) =
        untracked_gpu_or_skip("gpu_small_batch_auto_eager_warm_up_then_capture_at_one_token")
    else {
        return;
    };
    let seed = fresh_seed();
    let (e, k, h, f) = (8, 1, 768, 3072);
    let base = LayerConfig::new(65, h, f, e, k);
    let p = host_problem::<bf16>(base, &uniform_density(e, k as f64 / e as f64), seed);
    let w = Weights::<bf16>::upload(&dev, &p);
    let t = 1;
    let cfg = LayerConfig { tokens: t, ..base };
    for (warm_t, warm_on_path) in [(64, true), (65, false)] {
        let what = format!("warm-up at T {warm_t} {}", seed_note(seed));
        let mut ctx = MoeContext::<bf16>::new(&dev);
        assert_eq!(ctx.small_batch(), SmallBatch::Auto, "{what}: the default");
        ctx.force_small_batch_grid(grid_under_sanitizer(None));
        let warm = LayerConfig {
            tokens: warm_t,
            ..base
        };
        let xw = tokens::<bf16>(&dev, &p, warm_t);
        let mut ow = DeviceTensor::<bf16>::zeros(&dev, &[warm_t, h]).unwrap();
        forward(&dev, &what, &mut ctx, &warm, &xw, &w, &mut ow);
        assert_eq!(
            ctx.small_batch_forwards(),
            u64::from(warm_on_path),
            "{what}: the warm-up's path"
        );
        let warm_allocations = ctx.allocations();
        let mut x = tokens::<bf16>(&dev, &p, t);
        let mut out = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
        let graph = capture(&dev, || {
            moe_forward(
                &mut ctx,
                &cfg,
                RouterKind::Relu,
                Coefficient::Fixed(LAMBDA),
                &x,
                &w.views(),
                &mut out,
            )
        })
        .unwrap();
        assert_eq!(
            ctx.allocations(),
            warm_allocations,
            "{what}: the capture allocated"
        );
        assert_eq!(
            ctx.small_batch_forwards(),
            u64::from(warm_on_path) + 1,
            "{what}: the captured forward took the small-batch path"
        );
        graph.upload().unwrap();
        let last = ctx.small_batch_last_launch();
        let mut multi = context::<bf16>(&dev, false);
        let mut want = DeviceTensor::<bf16>::zeros(&dev, &[t, h]).unwrap();
        for round in 0..3 {
            let case = format!("{what}: replay {round}");
            let row = (7 * round + 3) % base.tokens;
            let fresh: Vec<bf16> = p.x[row * h..(row + 1) * h]
                .iter()
                .map(|&v| bf16::of(v))
                .collect();
            x.copy_from_host(&fresh).unwrap();
            out.poison().unwrap();
            ctx.poison_workspace().unwrap();
            // SAFETY: every captured buffer (x, out, the weights, the context's workspace and
            // sync words) is alive and unmoved: nothing ran on the context since the capture.
            unsafe { graph.replay() }.unwrap();
            settle(&dev, &case, t, last);
            want.poison().unwrap();
            multi.poison_workspace().unwrap();
            forward(&dev, &case, &mut multi, &cfg, &x, &w, &mut want);
            assert_eq!(multi.small_batch_forwards(), 0, "{case}: Off took the path");
            let a = observe(&mut ctx, &out);
            let b = observe(&mut multi, &want);
            assert_same(&case, &a, &b);
        }
    }
}

/// Where `Auto` must leave the path off, the forward is the multi-kernel one: a training context
/// (it saves for backward; its backward then runs), TopK (both kinds), T above the kernel's
/// bound, and Auto's byte rule false: at E 8, k 1, H 4096, F 4096 one expert's weights are
/// 100.7 MB, so T = 1 is expected to read 101 MB (the path) and T = 8 about 528 MB (above 192
/// MiB: the chain); zero weights and inputs there, since the choice depends on the shapes only.
/// A training context then set to save nothing takes the path at its next eager forward (the
/// candle layer's pooled contexts move between the two).
#[test]
fn gpu_small_batch_auto_stays_off_where_it_must() {
    let _gpu = gpu_lock();
    let Some(dev) = gpu_or_skip("gpu_small_batch_auto_stays_off_where_it_must") else {
        return;
    };
    let seed = fresh_seed();
    let (t, h, f, e, k) = (7, 128, 256, 8, 2);
    let cfg = LayerConfig::new(t, h, f, e, k);
    let p = host_problem::<bf16>(cfg, &uniform_density(e, 0.3), seed);
    let w = Weights::<bf16>::upload(&dev, &p);
    let x = tokens::<bf16>(&dev, &p, t);
    let what = seed_note(seed);
    let auto = |mut ctx: MoeContext<bf16>| {
        assert_eq!(ctx.small_batch(), SmallBatch::Auto, "{what}: the default");
        ctx.force_small_batch_grid(grid_under_sanitizer(None));
        ctx
    };

    // A training context: never, and its backward runs on what the forward saved.
    let mut ctx = auto(MoeContext::<bf16>::for_training(&dev));
    for _ in 0..2 {
        let took = took_path(&dev, &what, &mut ctx, RouterKind::Relu, &cfg, &x, &w);
        assert_eq!(took, 0, "{what}: training");
    }
    let dout = tokens::<bf16>(&dev, &p, t);
    let mut grads = Grads::<bf16>::new(&dev, &cfg);
    moe_backward(
        &mut ctx,
        Coefficient::Fixed(LAMBDA),
        &x,
        &w.views(),
        &dout,
        grads.as_mut(),
        false,
    )
    .unwrap();
    // The same context, saving nothing now: prepared by this eager forward, which takes it.
    ctx.set_save_for_backward(false);
    let took = took_path(&dev, &what, &mut ctx, RouterKind::Relu, &cfg, &x, &w);
    assert_eq!(took, 1, "{what}: the training context turned to inference");

    for router in [RouterKind::TopK, RouterKind::TopKNormalized] {
        let mut ctx = auto(MoeContext::<bf16>::new(&dev));
        let took = took_path(&dev, &what, &mut ctx, router, &cfg, &x, &w);
        assert_eq!(took, 0, "{what}: {router:?}");
    }

    // Above the kernel's bound.
    {
        let big = LayerConfig { tokens: 65, ..cfg };
        let pb = host_problem::<bf16>(big, &uniform_density(e, 0.3), seed);
        let xb = tokens::<bf16>(&dev, &pb, 65);
        let mut ctx = auto(MoeContext::<bf16>::new(&dev));
        let took = took_path(&dev, &what, &mut ctx, RouterKind::Relu, &big, &xb, &w);
        assert_eq!(took, 0, "{what}: T = 65");
    }

    // Auto's byte rule: the path at T = 1, not at T = 8, on one context.
    let (hb, fb) = (4096, 4096);
    let zeros = |shape: &[usize]| DeviceTensor::<bf16>::zeros(&dev, shape).unwrap();
    let wb = Weights {
        router: zeros(&[hb, 8]),
        gate: zeros(&[8, hb, fb]),
        up: zeros(&[8, hb, fb]),
        down: zeros(&[8, fb, hb]),
    };
    let mut ctx = auto(MoeContext::<bf16>::new(&dev));
    for (tb, want) in [(1, 1), (8, 0), (1, 1)] {
        let c = LayerConfig::new(tb, hb, fb, 8, 1);
        let xb = zeros(&[tb, hb]);
        let took = took_path(&dev, &what, &mut ctx, RouterKind::Relu, &c, &xb, &wb);
        assert_eq!(took, want, "E 8 k 1 H {hb} F {fb} T {tb}: Auto's byte rule");
    }
}
