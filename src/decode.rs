//! The small-batch forward (issue 25, docs/DECODE.md): an inference forward of the ReLU layer
//! with few tokens runs as one persistent kernel (kernels/decode.cu) instead of the multi-kernel
//! path's chain of seven to nine dependent launches, whose drains and ramps dominate a decode
//! step.
//!
//! [`SmallBatch`] says when ([`MoeContext::set_small_batch`]): the default,
//! [`SmallBatch::Auto`], where a rule fitted to measurements expects the kernel to beat the
//! chain ("Auto's rule" below); [`SmallBatch::UpTo`] at every T up to the caller's threshold;
//! [`SmallBatch::Off`] never. A forward takes the path when all of these hold, each known on the
//! host before anything is enqueued (so the choice never waits for the device and is captured in
//! a graph like any other):
//!
//! - the policy asks for it: T at most [`SmallBatch::UpTo`]'s threshold, or Auto's rule true
//!   (and, under Auto, the context prepared and the path not turned off for it: below);
//! - T is at most [`SMALL_BATCH_MAX_TOKENS`];
//! - the router is [`RouterKind::Relu`] (TopK keeps the multi-kernel path);
//! - the context does not save for backward (an inference context);
//! - E is at most [`SMALL_BATCH_MAX_EXPERTS`];
//! - the pair buffers hold every pair, T E (always so under the default
//!   [`PairCapacity::Auto`](crate::PairCapacity::Auto) at these sizes; a smaller fixed capacity
//!   keeps the multi-kernel path and its overflow rules);
//! - stage timing is off (the path has one stage);
//! - the device can run the kernel: it supports cooperative launches, has the shared memory the
//!   kernel needs and the kernel's occupancy is not 0 (asked once per context, see below);
//! - the down projection is split in at most four K ranges (what the multi-kernel path chooses
//!   at these sizes).
//!
//! The kernel writes what the multi-kernel path writes, bit for bit (logits, gates, statistics,
//! dispatch, act, y, out; the adaptive controller's record; the device error word), so every
//! accessor of the context and every later call sees the same state whichever path ran. That is
//! why the crate may choose the path by itself: the choice changes the time, never a result.
//!
//! ## Auto's rule
//!
//! The kernel's fixed cost is below the chain's (one launch and one grid barrier against seven
//! to nine dependent launches) and its streaming rate is below the chain's too (docs/DECODE.md,
//! "v2, measured"): it wins where a forward reads few bytes of expert weights and loses where it
//! reads many. So Auto takes the path when the expected bytes of the routed experts' weights,
//! distinct(T) x 3 H F x the element's size, are at most [`AUTO_MAX_EXPERT_BYTES`] (192 MiB),
//! where distinct(T) = E (1 - (1 - k/E)^T) is the expected number of distinct experts that T
//! tokens route to when each routes to k of the E experts uniformly at random
//! ([`expected_distinct_experts`]). An expectation, not the batch's own count: the routing is
//! known only on the device, and the choice must not wait for it (ReMoE's controller holds the
//! mean at k experts per token). The rule was fitted to the nine graph-replayed points of
//! "v2, measured" (H100; E8k1 and E64k8 at H 768, F 3072, E128k8 at H 768, F 768; T 1, 8, 64):
//! the kernel won at 14, 28, 74, 113, 113 and 183 MB and lost at 446, 595 and 906 MB. Nothing
//! was measured between 183 and 446 MB, so where in that gap the boundary lies is a choice, not
//! a measurement; on other devices and shapes the rule is an extrapolation.
//!
//! ## Sync words and preparation
//!
//! Its phases wait for one another through one grid barrier (after the router) and counters (a
//! down-projection unit waits for the up-projection units whose output it reads; the last unit
//! to finish a piece of a token's output combines that piece), whose words live in the context,
//! outside the poisoned workspace: a fixed number, zeroed once, each launch leaving them ready
//! for the next (two sets of counters used by alternate launches, each launch zeroing the other
//! set; kernels/decode.cu). Every CTA of the grid must be resident at once, which a plain launch
//! does not guarantee: another kernel on another stream (a second context's
//! small-batch forward, NCCL's spinning kernels), an MPS client or a sanitizer can hold
//! multiprocessors that the grid counts on. So the kernel is a *cooperative* launch
//! (`cudaLaunchKernelEx` with `cudaLaunchAttributeCooperative`): the driver starts the grid only
//! with all of its CTAs resident, or refuses it (`cudaErrorCooperativeLaunchTooLarge`, or any
//! other launch error): it never hangs. The grid is at most the cooperative limit, the
//! multiprocessor count times the kernel's occupancy (the runtime's figure, asked once per
//! context). A cooperative launch is captured into a CUDA graph as a cooperative kernel node
//! (CUDA 12 and later).
//!
//! The sync words are allocated, and the grid asked of the runtime, once per context
//! ([`prepare`]), never by a forward being captured (a capture may not allocate):
//!
//! - [`SmallBatch::UpTo`]: by [`MoeContext::set_small_batch`], which returns the failure (the
//!   caller asked for the path and learns why it does not run). So a context is warm for a
//!   capture after an eager forward on either path.
//! - [`SmallBatch::Auto`]: at the context's first eager forward that does not save for backward,
//!   whatever its T, when its layer could take the path at some T (the ReLU router, E at most
//!   [`SMALL_BATCH_MAX_EXPERTS`], Auto's rule true at T = 1; [`prepare_for_auto`]). So an eager
//!   warm-up at any batch size warms the context for a capture at a smaller one (docs/SPEC.md,
//!   section 9), and a context of a layer that cannot take the path at any T pays nothing for it. A
//!   captured forward of a context not prepared yet takes the chain (same bits). A failed
//!   preparation (the allocation, or the grid query) does not fail the forward, which takes the
//!   chain; the next eager forward tries again, [`AUTO_PREPARE_ATTEMPTS`] times in all, after
//!   which Auto leaves the path off for the context until the policy is set again: a query may
//!   fail once for a reason of its own (another library's pending runtime error), but one that
//!   keeps failing must not cost a query per forward for ever.
//!
//! A device without cooperative launches, or an occupancy of 0, turns the path off for that
//! context for good, whatever the policy (remembered, not asked again): its forwards take the
//! multi-kernel path, which writes the same bits.
//!
//! ## A refused launch
//!
//! Under [`SmallBatch::UpTo`] a refused launch is the forward's [`Error::Launch`] naming
//! `decode_forward`, as the caller asked for the path. Under [`SmallBatch::Auto`], a refusal
//! that says this launch cannot run here ([`is_refusal`]: `cudaErrorCooperativeLaunchTooLarge`,
//! where fewer multiprocessors are free to the process than the device has, under MPS say; too
//! few resources; not supported) is known when the launcher returns, before anything of this
//! forward but the growth of buffers that the chain sizes the same way was enqueued; and the
//! kernel never ran (the launcher returns an error left by an earlier call before launching),
//! so its sync words are as they were. Auto then turns the path off for the context (until the
//! policy is set again: the next forwards would be refused alike), and an eager forward runs
//! the chain instead. A forward being captured returns the error (a failed launch may have
//! invalidated the capture, so the chain cannot be recorded after it); the capture taken again
//! runs the chain. A refusal that the driver reports only when the graph is instantiated or
//! replayed is not seen by the context: the replay fails, and the caller's way out is to set
//! [`SmallBatch::Off`] and capture again (a graph keeps the path it was captured with).

use crate::capacity::split_k_partials;
use crate::config::LayerConfig;
use crate::controller::Coefficient;
use crate::device::Device;
use crate::element::HalfElement;
use crate::error::{Error, Result};
use crate::ffi;
use crate::graph::Mode;
use crate::moe::{ForwardPlan, MoeContext, MoeWeightViews, RouterKind, ERROR_WORDS};
use crate::tensor::{DType, DeviceTensor, Launch, TensorView};
use crate::workspace::GrowBuf;

/// The most tokens a small-batch forward takes (a token set is one 64-bit mask in the kernel).
pub const SMALL_BATCH_MAX_TOKENS: usize = ffi::REMOE_DECODE_MAX_TOKENS as usize;
/// The most experts a small-batch forward takes (the dispatch lives in shared memory).
pub const SMALL_BATCH_MAX_EXPERTS: usize = ffi::REMOE_DECODE_MAX_EXPERTS as usize;
/// The kernel's synchronisation words: the grid barrier's word and two sets of counters
/// (kernels/decode.cu). A fixed size, independent of the shapes, so that they are allocated once,
/// when the context is prepared.
const SYNC_WORDS: usize = ffi::REMOE_DECODE_SYNC_WORDS as usize;
/// The most split-K ranges of the down projection the kernel takes (the multi-kernel path's
/// `down_k_splits` never gives more; a forward that would keeps the multi-kernel path).
const MAX_SPLITS: usize = ffi::REMOE_DECODE_MAX_SPLITS as usize;

/// Auto's bound on the expected bytes of routed expert weights a forward reads (see the module
/// documentation, "Auto's rule"): 192 MiB, between the largest measured win (183 MB) and the
/// smallest measured loss (446 MB).
pub(crate) const AUTO_MAX_EXPERT_BYTES: f64 = (192u64 << 20) as f64;
const _: () = assert!(AUTO_MAX_EXPERT_BYTES > 183e6 && AUTO_MAX_EXPERT_BYTES < 446e6);

/// How many failed preparations Auto tries before it leaves the path off for a context (see the
/// module documentation).
pub(crate) const AUTO_PREPARE_ATTEMPTS: u32 = 3;

// What the launch's arguments rely on: a token set is one 64-bit mask in the kernel, and the
// pair count T E (plane_rows, the pair offsets) is an i32 (the kernel's element offsets into act
// and y are 64-bit).
const _: () = assert!(SMALL_BATCH_MAX_TOKENS <= u64::BITS as usize);
const _: () = assert!(SMALL_BATCH_MAX_TOKENS * SMALL_BATCH_MAX_EXPERTS <= i32::MAX as usize);

/// When a context's inference forwards take the small-batch path: one persistent kernel in place
/// of the multi-kernel chain, with the same bits ([`MoeContext::set_small_batch`];
/// docs/DECODE.md). Whatever the policy, the path runs only where it can: T at most
/// [`SMALL_BATCH_MAX_TOKENS`], the ReLU router, a context that does not save for backward, E at
/// most [`SMALL_BATCH_MAX_EXPERTS`], pair buffers that hold every pair, stage timing off, a
/// device with cooperative launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SmallBatch {
    /// The crate chooses (the default): the path where the expected bytes of the routed experts'
    /// weights, E (1 - (1 - k/E)^T) x 3 H F x the element's size, are at most 192 MiB, which
    /// separates the nine measured points of docs/DECODE.md ("v2, measured", H100: at T = 1 at
    /// every shape measured, at T = 8 at E8k1 and E128k8, at T = 64 at E8k1); the chain above.
    /// The context is prepared at its first eager inference forward, whatever its T; see
    /// [`MoeContext::set_small_batch`].
    #[default]
    Auto,
    /// Never: every forward takes the multi-kernel chain.
    Off,
    /// Every forward that can take the path and has at most this many tokens, as measured for a
    /// model's shape (`examples/latency`). Prepared when set.
    UpTo(usize),
}

/// The expected number of distinct experts that `tokens` tokens route to when each routes to
/// `k` of the `experts` experts uniformly at random: E (1 - (1 - k/E)^T). 0 at T = 0; E at
/// k = E (T >= 1).
pub(crate) fn expected_distinct_experts(tokens: usize, experts: usize, k: usize) -> f64 {
    if experts == 0 {
        return 0.0;
    }
    let e = experts as f64;
    let missed = 1.0 - k.min(experts) as f64 / e;
    e * (1.0 - missed.powf(tokens as f64))
}

/// Auto's rule (module documentation): whether a forward of `cfg`, on elements of `elem_bytes`
/// bytes, is expected to read at most [`AUTO_MAX_EXPERT_BYTES`] of routed expert weights.
pub(crate) fn auto_prefers_small_batch(cfg: &LayerConfig, elem_bytes: usize) -> bool {
    let expert_bytes = 3.0 * cfg.hidden as f64 * cfg.ffn as f64 * elem_bytes as f64;
    expected_distinct_experts(cfg.tokens, cfg.experts, cfg.k) * expert_bytes
        <= AUTO_MAX_EXPERT_BYTES
}

/// A context's small-batch state: the policy, the sync words and the grid, and what Auto learned.
#[derive(Debug, Default)]
pub(crate) struct SmallBatchState {
    /// When the path runs ([`MoeContext::set_small_batch`]).
    pub(crate) policy: SmallBatch,
    /// The kernel's sync words ([`SYNC_WORDS`]). Allocated zeroed once (by [`prepare`]), never
    /// poisoned or cleared by the host: every completed launch leaves the barrier word's low
    /// bits at 0 and the counter set of the next launch zeroed.
    sync: GrowBuf<u32>,
    /// The cooperative limit of the kernel on the context's device: the CTAs resident at once
    /// (asked by [`prepare`] until it answers; 0: the path is off for this context, because the
    /// device has no cooperative launch or the kernel cannot run there).
    max_grid: Option<usize>,
    /// Auto's failed preparations since the policy was last set.
    auto_failures: u32,
    /// Auto turned the path off for this context (a refused launch, or
    /// [`AUTO_PREPARE_ATTEMPTS`] failed preparations) until the policy is set again.
    auto_off: bool,
    /// A smaller grid for the tests (at least 1, at most `max_grid`).
    #[cfg(feature = "test-hooks")]
    pub(crate) forced_grid: Option<usize>,
    /// Forwards enqueued on the path.
    #[cfg(feature = "test-hooks")]
    pub(crate) forwards: u64,
    /// The grid and split-K count of the last forward enqueued on the path.
    #[cfg(feature = "test-hooks")]
    pub(crate) last_launch: Option<(usize, usize)>,
}

impl SmallBatchState {
    /// Bytes of device memory held.
    pub(crate) fn bytes(&self) -> usize {
        self.sync.bytes()
    }

    /// Sets the policy. What Auto learned (a refused launch, failed preparations) is forgotten:
    /// setting a policy, Auto included, is how a caller asks for the path to be tried again.
    pub(crate) fn set_policy(&mut self, policy: SmallBatch) {
        self.policy = policy;
        self.auto_failures = 0;
        self.auto_off = false;
    }

    /// Whether [`prepare`] has run to the end: the sync words allocated, the grid known.
    fn prepared(&self) -> bool {
        self.sync.capacity() >= SYNC_WORDS && self.max_grid.is_some()
    }
}

/// Whether a forward of `cfg` with `router` takes the path under `policy`, from what the host
/// knows: the shapes, whether it saves for backward, whether its pair buffers hold every pair,
/// whether stage timing is on, the element's size (Auto's rule). The context's side (prepared,
/// turned off by Auto, the device's grid) is asked after.
pub(crate) fn eligible(
    policy: SmallBatch,
    cfg: &LayerConfig,
    router: RouterKind,
    save_for_backward: bool,
    every_pair: bool,
    stage_timing: bool,
    elem_bytes: usize,
) -> bool {
    let wanted = match policy {
        SmallBatch::Off => false,
        SmallBatch::UpTo(threshold) => cfg.tokens <= threshold,
        SmallBatch::Auto => auto_prefers_small_batch(cfg, elem_bytes),
    };
    wanted
        && cfg.tokens <= SMALL_BATCH_MAX_TOKENS
        && cfg.experts <= SMALL_BATCH_MAX_EXPERTS
        && router == RouterKind::Relu
        && !save_for_backward
        && every_pair
        && !stage_timing
}

/// Whether a refused launch of the kernel is one that Auto falls back from: the launch cannot
/// run here as configured (`cudaErrorLaunchOutOfResources` 701,
/// `cudaErrorCooperativeLaunchTooLarge` 720, `cudaErrorNotSupported` 801), an error of this
/// launch alone, which leaves the context's CUDA state usable. Any other code (a sticky error of
/// an earlier kernel, an invalid argument) is returned, as the chain would meet it too or it is
/// a bug.
pub(crate) fn is_refusal(code: i32) -> bool {
    const LAUNCH_OUT_OF_RESOURCES: i32 = 701;
    const COOPERATIVE_LAUNCH_TOO_LARGE: i32 = 720;
    const NOT_SUPPORTED: i32 = 801;
    matches!(
        code,
        LAUNCH_OUT_OF_RESOURCES | COOPERATIVE_LAUNCH_TOO_LARGE | NOT_SUPPORTED
    )
}

type GridFn = unsafe extern "C" fn(*mut i32) -> i32;
type ForwardFn = unsafe extern "C" fn(*const ffi::remoe_decode_args_t, ffi::remoe_stream_t) -> i32;

/// The launchers for element type `T` (bf16 or f16: `HalfElement` is sealed to those two).
fn launchers<T: HalfElement>() -> (GridFn, ForwardFn) {
    if T::DTYPE == DType::BF16 {
        (
            ffi::remoe_decode_max_grid_bf16,
            ffi::remoe_decode_forward_bf16,
        )
    } else {
        (
            ffi::remoe_decode_max_grid_f16,
            ffi::remoe_decode_forward_f16,
        )
    }
}

/// The kernel's cooperative limit on `dev`: multiprocessors x occupancy, or 0 where the path
/// cannot run (a device without cooperative launches, an occupancy of 0). A failed query is an
/// error, not a 0: it may be transient (another library's pending runtime error, say), so it is
/// not cached and the next [`prepare`] asks again.
fn query_max_grid<T: HalfElement>(dev: &Device) -> Result<usize> {
    // The query runs through the CUDA runtime on the current context.
    dev.bind_to_thread()?;
    let mut grid = 0i32;
    // SAFETY: the launcher writes one i32 through the pointer, valid for the call, and enqueues
    // nothing; it queries the current device, which is `dev`'s (bound above). On failure it has
    // cleared the runtime's last error (kernels/decode.cu, `failed`), so no later launcher
    // reports it as its own.
    let code = unsafe { (launchers::<T>().0)(&mut grid) };
    crate::ffi::check("decode_max_grid", code)?;
    Ok(usize::try_from(grid).unwrap_or(0))
}

/// Makes the context ready for the path: the sync words allocated (zeroed, by a memset
/// ordered on the context's stream) and the grid asked of the runtime, each once. Called when
/// [`SmallBatch::UpTo`] is set, and under Auto by [`prepare_for_auto`], so that a capture after
/// an eager warm-up finds nothing to allocate. Fails when the sync words' allocation does (during
/// a capture: [`Error::CaptureUnsupported`]) or the grid query does ([`Error::Launch`] naming
/// `decode_max_grid`); a failed query is not remembered, so the next call asks again.
///
/// [`Error::CaptureUnsupported`]: crate::Error::CaptureUnsupported
/// [`Error::Launch`]: crate::Error::Launch
pub(crate) fn prepare<T: HalfElement>(ctx: &mut MoeContext<T>) -> Result<()> {
    let dev = ctx.dev.clone();
    MoeContext::<T>::grow(
        &dev,
        &mut ctx.allocations,
        &mut ctx.small_batch.sync,
        SYNC_WORDS,
    )?;
    if ctx.small_batch.max_grid.is_none() {
        ctx.small_batch.max_grid = Some(query_max_grid::<T>(&dev)?);
    }
    Ok(())
}

/// Under [`SmallBatch::Auto`], prepares the context at an eager forward of `cfg` with `router`
/// that does not save for backward, whatever its T, when the layer could take the path at some
/// T: the ReLU router, E at most [`SMALL_BATCH_MAX_EXPERTS`], Auto's rule true at T = 1 (the
/// expected bytes grow with T, so a layer whose one token already reads too much never takes
/// it). Never fails the forward: a failure is counted, and the path left off for the context
/// after [`AUTO_PREPARE_ATTEMPTS`] of them (module documentation). A forward being captured
/// prepares nothing (a capture may not allocate); it takes the chain if the context is not
/// prepared yet.
pub(crate) fn prepare_for_auto<T: HalfElement>(
    ctx: &mut MoeContext<T>,
    cfg: &LayerConfig,
    router: RouterKind,
    mode: Mode,
) {
    let sb = &ctx.small_batch;
    if sb.policy != SmallBatch::Auto
        || sb.auto_off
        || sb.prepared()
        || mode != Mode::Eager
        || ctx.save_for_backward
        || router != RouterKind::Relu
        || cfg.experts > SMALL_BATCH_MAX_EXPERTS
        || !auto_prefers_small_batch(&LayerConfig { tokens: 1, ..*cfg }, std::mem::size_of::<T>())
    {
        return;
    }
    if prepare(ctx).is_err() {
        let sb = &mut ctx.small_batch;
        sb.auto_failures += 1;
        sb.auto_off = sb.auto_failures >= AUTO_PREPARE_ATTEMPTS;
    }
}

/// The grid of the context's small-batch forwards when `plan` takes the path, else None. When it
/// returns a grid, the sync words are allocated ([`prepare`]).
fn grid_for<T: HalfElement>(ctx: &mut MoeContext<T>, plan: &ForwardPlan) -> Result<Option<usize>> {
    let policy = ctx.small_batch.policy;
    if !eligible(
        policy,
        plan.config(),
        plan.router_kind(),
        plan.save,
        plan.covers_every_pair(),
        ctx.stage_timing,
        std::mem::size_of::<T>(),
    ) || plan.k_splits > MAX_SPLITS
    {
        return Ok(None);
    }
    if policy == SmallBatch::Auto {
        // Prepared by an eager forward (prepare_for_auto) or never: not here, where a captured
        // forward would allocate and a failure would fail the forward.
        if ctx.small_batch.auto_off || !ctx.small_batch.prepared() {
            return Ok(None);
        }
    } else {
        // Done when UpTo was set; kept here so that the invariant does not rest on that.
        prepare(ctx)?;
    }
    let max = ctx.small_batch.max_grid.unwrap_or(0);
    if max == 0 {
        return Ok(None);
    }
    #[cfg(feature = "test-hooks")]
    if let Some(g) = ctx.small_batch.forced_grid {
        return Ok(Some(g.clamp(1, max)));
    }
    Ok(Some(max))
}

/// Runs `plan`'s forward on the path when it takes it (Ok(true)); Ok(false) leaves the forward
/// to the multi-kernel chain: the path is not taken, or, under Auto, an eager forward's launch
/// was refused ([`is_refusal`]; the path is then off for the context, see the module
/// documentation).
pub(crate) fn try_forward<T: HalfElement>(
    ctx: &mut MoeContext<T>,
    plan: &ForwardPlan,
    coeff: &mut Coefficient,
    x: &TensorView<T>,
    w: &MoeWeightViews<T>,
    out: &mut DeviceTensor<T>,
) -> Result<bool> {
    let Some(grid) = grid_for(ctx, plan)? else {
        return Ok(false);
    };
    match forward(ctx, plan, coeff, x, w, out, grid) {
        Ok(()) => Ok(true),
        Err(
            e @ Error::Launch {
                kernel: "decode_forward",
                code,
            },
        ) if ctx.small_batch.policy == SmallBatch::Auto && is_refusal(code) => {
            ctx.small_batch.auto_off = true;
            if plan.mode == Mode::Eager {
                Ok(false)
            } else {
                Err(e)
            }
        }
        Err(e) => Err(e),
    }
}

/// The forward on the path: the buffers as the multi-kernel path sizes them for `plan` (so that a
/// context alternating between the paths never reallocates), then the one launch on `grid` CTAs.
#[allow(clippy::too_many_arguments)] // the forward's own arguments, its plan and its grid
fn forward<T: HalfElement>(
    ctx: &mut MoeContext<T>,
    plan: &ForwardPlan,
    coeff: &mut Coefficient,
    x: &TensorView<T>,
    w: &MoeWeightViews<T>,
    out: &mut DeviceTensor<T>,
    grid: usize,
) -> Result<()> {
    let cfg = *plan.config();
    let (t, h, f, e, k) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts, cfg.k);
    let (cap, k_splits) = (plan.cap, plan.k_splits);
    // A host-given coefficient goes to the kernel by value: no copy kernel before it (the
    // context's device copy is not read on this path; the backward uploads its own).
    plan.size_routing(ctx)?;
    plan.size_pairs(ctx)?;
    plan.size_experts(ctx)?;
    // The sync words were allocated by `prepare`; missing ones are a typed error below.
    let dev = ctx.dev.clone();

    let mut l = Launch::on(&dev);
    // An empty batch reads no X and writes no output (both may be zero-length buffers).
    let (xp, op) = if t > 0 {
        (
            l.input("x", x, t * h)? as *const u16,
            l.output("out", &mut *out, t * h)? as *mut u16,
        )
    } else {
        (std::ptr::null(), std::ptr::null_mut())
    };
    let r = &mut ctx.routing;
    let args_ptrs = (
        l.input("router weight", &w.router, h * e)? as *const u16,
        l.input("gate weight", &w.gate, e * h * f)? as *const u16,
        l.input("up weight", &w.up, e * h * f)? as *const u16,
        l.input("down weight", &w.down, e * f * h)? as *const u16,
    );
    let logits = l.output("logits", &mut r.logits, t * e)?;
    let gates = l.output("gates", &mut r.gates, t * e)?;
    let counts = l.output("counts", &mut r.counts, e)?;
    let gate_sums = l.output("gate sums", &mut r.gate_sums, e)?;
    let expert_offsets = l.output("expert offsets", &mut r.expert_offsets, e + 1)?;
    let tile_offsets = l.output("tile offsets", &mut r.tile_offsets, e + 1)?;
    let stats_u32 = l.output("stats", &mut r.stats_u32, 4)?;
    let stats_f32 = l.output("stats", &mut r.stats_f32, 2)?;
    let pair_token = l.output("pair tokens", &mut r.pair_token, cap)?;
    let pair_gate = l.output("pair gates", &mut r.pair_gate, cap)?;
    let pair_index = l.output("pair index", &mut r.pair_index, t * e)?;
    let act = l.output("act", &mut ctx.experts.act, cap * f)? as *mut u16;
    let y = l.output("expert out", &mut ctx.experts.y, cap * h)? as *mut u16;
    let partials = if k_splits > 1 {
        let need = split_k_partials(k_splits, cap, h);
        l.output("split-K partial sums", &mut ctx.experts.y_partials, need)?
    } else {
        std::ptr::null_mut()
    };
    let error_flags = l.output_raw("error word", &mut ctx.device_errors, ERROR_WORDS)?;
    let sync = l.output_raw("sync words", &mut ctx.small_batch.sync, SYNC_WORDS)?;
    let (coeff_ptr, coeff_value, sparsity_sum, sparsity_count) = match coeff {
        Coefficient::Fixed(v) => (
            std::ptr::null(),
            *v,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        ),
        Coefficient::Adaptive(c) => (
            l.input_raw("lambda", &c.lambda, 1)?,
            0.0,
            l.output_raw("sparsity sum", &mut c.sparsity_sum, 1)?,
            l.output_raw("sparsity count", &mut c.count, 1)?,
        ),
    };
    let (wr, wg, wu, wd) = args_ptrs;
    // validate_for_gpu bounds T*H, T*E, H*E and E*H*F by i32::MAX, so every size below is exact;
    // the path's own bounds keep T <= 64, E <= 512, and cap = T*E (covers_every_pair).
    let args = ffi::remoe_decode_args_t {
        x: xp,
        wr,
        wg,
        wu,
        wd,
        logits,
        gates,
        counts,
        gate_sums,
        expert_offsets,
        tile_offsets,
        stats_u32,
        stats_f32,
        pair_token,
        pair_gate,
        pair_index,
        act,
        y,
        partials,
        out: op,
        coeff: coeff_ptr,
        coeff_value,
        sparsity_sum,
        sparsity_count,
        error_flags,
        barrier: sync,
        t: t as i32,
        h: h as i32,
        f: f as i32,
        e: e as i32,
        k: k as i32,
        k_splits: k_splits as i32,
        plane_rows: cap as i32,
        grid: grid as i32,
    };
    // SAFETY: `l` checked every buffer for the elements the kernel touches (kernels/
    // remoe_kernels.h, remoe_decode_args_t): x and out [t, h] (null only when t == 0, when the
    // kernel reads and writes no row); the weights in their layouts; logits, gates and the pair
    // index t*e; the pair lists cap = t*e and act cap*f, y cap*h (plane_rows = cap) and, when
    // k_splits > 1, the partial sums k_splits planes of cap*h (null otherwise, which the kernel
    // then does not touch); the statistics and the four-word error word. The SYNC_WORDS sync
    // words were allocated zeroed by `prepare` (from `set_small_batch`, or Auto's
    // `prepare_for_auto`: a memset ordered on this stream) and only this kernel touches them,
    // each completed launch leaving the barrier word's low bits at 0 and the counter set of the
    // next launch zeroed (a launch the driver refused never ran), so a launch starts with every
    // CTA's arrival uncounted and its counters at 0. coeff is null (the fixed value goes by
    // value) or the controller's lambda, with its sparsity sum and count (one f64, one u32) on
    // this device (check_coefficient). H and F are multiples of 8 and every size is below 2^31
    // (validate_for_gpu); t <= 64, e <= 512 and cap = t*e (`eligible`), 1 <= k_splits <=
    // min(MAX_SPLITS, ceil(f / 64)) (down_k_splits, and grid_for). The grid is at least 1 and at
    // most the cooperative limit remoe_decode_max_grid reported for this device, which supports
    // cooperative launches (grid_for: max_grid > 0). The grid barrier and the counters' waits
    // complete because the launcher launches cooperatively (kernels/decode.cu, `launch`): the
    // driver starts the grid with every CTA resident or fails the launch with a code returned
    // here, so no CTA waits for one that never runs. The context is current (Launch::on takes
    // the stream through Device::stream, which binds it).
    let code = unsafe { (launchers::<T>().1)(&args, l.stream()) };
    ffi::check("decode_forward", code)?;
    #[cfg(feature = "test-hooks")]
    {
        ctx.small_batch.forwards += 1;
        ctx.small_batch.last_launch = Some((grid, k_splits));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 and f16 alike.
    const ELEM: usize = 2;

    #[test]
    fn only_small_relu_inference_forwards_with_every_pair_take_the_path() {
        let cfg = LayerConfig::new(7, 768, 3072, 8, 1);
        let yes =
            |p, cfg: &LayerConfig| eligible(p, cfg, RouterKind::Relu, false, true, false, ELEM);
        assert!(yes(SmallBatch::UpTo(7), &cfg));
        assert!(yes(SmallBatch::UpTo(64), &cfg));
        assert!(yes(SmallBatch::Auto, &cfg));
        // Off, and above the threshold.
        assert!(!yes(SmallBatch::Off, &cfg));
        assert!(!yes(SmallBatch::UpTo(6), &cfg));
        // The kernel's own bounds, whatever the policy.
        let big = LayerConfig::new(65, 768, 3072, 8, 1);
        assert!(!yes(SmallBatch::UpTo(1000), &big));
        assert!(!yes(SmallBatch::Auto, &big));
        let wide = LayerConfig::new(1, 64, 64, SMALL_BATCH_MAX_EXPERTS + 1, 1);
        assert!(!yes(SmallBatch::UpTo(64), &wide));
        assert!(!yes(SmallBatch::Auto, &wide));
        let widest = LayerConfig::new(1, 64, 64, SMALL_BATCH_MAX_EXPERTS, 1);
        assert!(yes(SmallBatch::UpTo(64), &widest));
        assert!(yes(SmallBatch::Auto, &widest));
        // An empty batch takes it (the statistics are still written).
        let empty = LayerConfig::new(0, 64, 64, 8, 1);
        assert!(yes(SmallBatch::UpTo(1), &empty));
        assert!(yes(SmallBatch::Auto, &empty));
        // (router, saves for backward, every pair, stage timing), under UpTo(64) and Auto.
        for policy in [SmallBatch::UpTo(64), SmallBatch::Auto] {
            let with = |router, save, every, timing| {
                eligible(policy, &cfg, router, save, every, timing, ELEM)
            };
            assert!(with(RouterKind::Relu, false, true, false));
            for router in [RouterKind::TopK, RouterKind::TopKNormalized] {
                assert!(!with(router, false, true, false), "{policy:?} {router:?}");
            }
            // Training, a capacity below every pair, stage timing.
            assert!(!with(RouterKind::Relu, true, true, false), "{policy:?}");
            assert!(!with(RouterKind::Relu, false, false, false), "{policy:?}");
            assert!(!with(RouterKind::Relu, false, true, true), "{policy:?}");
        }
    }

    /// Auto's rule at the nine points it was fitted to: docs/DECODE.md, "v2, measured" (H100,
    /// graph-replayed forward, us, chain against v2). Each is (E, k, H, F, T, whether v2 won).
    #[test]
    fn auto_takes_the_path_where_it_was_measured_to_win() {
        let measured = [
            // E8k1: 51.6 vs 40.1, 79.8 vs 75.2, 91.9 vs 81.6.
            (8, 1, 768, 3072, 1, true),
            (8, 1, 768, 3072, 8, true),
            (8, 1, 768, 3072, 64, true),
            // E64k8: 85.7 vs 71.5, 242.1 vs 260.1, 356.5 vs 399.6.
            (64, 8, 768, 3072, 1, true),
            (64, 8, 768, 3072, 8, false),
            (64, 8, 768, 3072, 64, false),
            // E128k8: 61.7 vs 41.8, 119.4 vs 109.7, 214.6 vs 244.1.
            (128, 8, 768, 768, 1, true),
            (128, 8, 768, 768, 8, true),
            (128, 8, 768, 768, 64, false),
        ];
        for (e, k, h, f, t, won) in measured {
            let cfg = LayerConfig::new(t, h, f, e, k);
            assert_eq!(
                auto_prefers_small_batch(&cfg, ELEM),
                won,
                "E {e} k {k} H {h} F {f} T {t}"
            );
            // The whole decision, with everything else allowing the path.
            let take = eligible(
                SmallBatch::Auto,
                &cfg,
                RouterKind::Relu,
                false,
                true,
                false,
                ELEM,
            );
            assert_eq!(take, won, "eligible: E {e} k {k} H {h} F {f} T {t}");
        }
        // The expected bytes docs/DECODE.md quotes (MB): wins at 14, 28, 74, 113, 113, 183,
        // losses at 446, 595, 906.
        let mb = |e, k, h: usize, f: usize, t| {
            expected_distinct_experts(t, e, k) * (3 * h * f * ELEM) as f64 / 1e6
        };
        let quoted = [
            (mb(8, 1, 768, 3072, 1), 14.2),
            (mb(128, 8, 768, 768, 1), 28.3),
            (mb(8, 1, 768, 3072, 8), 74.3),
            (mb(8, 1, 768, 3072, 64), 113.2),
            (mb(64, 8, 768, 3072, 1), 113.2),
            (mb(128, 8, 768, 768, 8), 182.7),
            (mb(128, 8, 768, 768, 64), 445.7),
            (mb(64, 8, 768, 3072, 8), 594.7),
            (mb(64, 8, 768, 3072, 64), 905.8),
        ];
        for (got, want) in quoted {
            assert!((got - want).abs() < 0.1, "{got} MB, quoted {want}");
        }
    }

    #[test]
    fn auto_rule_edge_cases() {
        // T = 0 routes nothing: the path, whatever the experts' size (as UpTo takes T = 0).
        assert_eq!(expected_distinct_experts(0, 64, 8), 0.0);
        let huge = LayerConfig::new(0, 8192, 32768, 64, 8);
        assert!(auto_prefers_small_batch(&huge, ELEM));
        assert!(!auto_prefers_small_batch(
            &LayerConfig { tokens: 1, ..huge },
            ELEM
        ));
        // k = E: every token reads every expert, from T = 1 on (and none at T = 0).
        assert_eq!(expected_distinct_experts(1, 64, 64), 64.0);
        assert_eq!(expected_distinct_experts(64, 64, 64), 64.0);
        assert_eq!(expected_distinct_experts(0, 64, 64), 0.0);
        // E8, k = E at config A's H and F: 8 experts, 113 MB, the path; E64, k = E: 906 MB, not.
        assert!(auto_prefers_small_batch(
            &LayerConfig::new(1, 768, 3072, 8, 8),
            ELEM
        ));
        assert!(!auto_prefers_small_batch(
            &LayerConfig::new(1, 768, 3072, 64, 64),
            ELEM
        ));
        // One token reads k experts; the count grows with T towards E and never passes it.
        assert!((expected_distinct_experts(1, 64, 8) - 8.0).abs() < 1e-9);
        let mut last = 0.0;
        for t in 0..=SMALL_BATCH_MAX_TOKENS {
            let d = expected_distinct_experts(t, 128, 8);
            assert!(d >= last && d <= 128.0, "T {t}: {d}");
            last = d;
        }
        // No experts (a configuration validation refuses): nothing read.
        assert_eq!(expected_distinct_experts(5, 0, 1), 0.0);
    }

    #[test]
    fn auto_falls_back_only_from_refusals_of_this_launch() {
        // cudaErrorLaunchOutOfResources, cudaErrorCooperativeLaunchTooLarge, cudaErrorNotSupported.
        for code in [701, 720, 801] {
            assert!(is_refusal(code), "{code}");
        }
        // Success, cudaErrorInvalidValue (the launcher's own argument check: a bug),
        // cudaErrorIllegalAddress (sticky: an earlier kernel's), cudaErrorLaunchFailure,
        // cudaErrorStreamCaptureInvalidated.
        for code in [0, 1, 700, 719, 901] {
            assert!(!is_refusal(code), "{code}");
        }
    }

    #[test]
    fn setting_a_policy_forgets_what_auto_learned() {
        let mut s = SmallBatchState::default();
        assert_eq!(s.policy, SmallBatch::Auto);
        s.auto_failures = AUTO_PREPARE_ATTEMPTS;
        s.auto_off = true;
        // A device found unable to run the kernel stays so: setting a policy forgets only
        // what Auto learned, not the device's answer (nor, with it, anything a graph may hold).
        s.max_grid = Some(0);
        s.set_policy(SmallBatch::Auto);
        assert_eq!((s.auto_failures, s.auto_off), (0, false));
        assert_eq!(s.max_grid, Some(0));
    }
}
