//! The small-batch forward (issue 25, docs/DECODE.md): an inference forward of the ReLU layer
//! with few tokens runs as one persistent kernel (kernels/decode.cu) instead of the multi-kernel
//! path's chain of seven to nine dependent launches, whose drains and ramps dominate a decode
//! step.
//!
//! [`MoeContext::set_small_batch_threshold`] turns it on (it is off by default: the threshold at
//! which it stops paying is to be measured, see docs/DECODE.md). A forward takes the path when
//! all of these hold, each known on the host before anything is enqueued (so the choice never
//! waits for the device and is captured in a graph like any other):
//!
//! - T is at most the threshold and at most [`SMALL_BATCH_MAX_TOKENS`];
//! - the router is [`RouterKind::Relu`] (TopK keeps the multi-kernel path);
//! - the context does not save for backward (an inference context);
//! - E is at most [`SMALL_BATCH_MAX_EXPERTS`];
//! - the pair buffers hold every pair, T E (always so under the default
//!   [`PairCapacity::Auto`](crate::PairCapacity::Auto) at these sizes; a smaller fixed capacity
//!   keeps the multi-kernel path and its overflow rules);
//! - stage timing is off (the path has one stage);
//! - the device can run the kernel: it supports cooperative launches, has the shared memory the
//!   kernel needs and the kernel's occupancy is not 0 (asked once per context, when the
//!   threshold is first set);
//! - the down projection is split in at most four K ranges (what the multi-kernel path chooses
//!   at these sizes).
//!
//! The kernel writes what the multi-kernel path writes, bit for bit (logits, gates, statistics,
//! dispatch, act, y, out; the adaptive controller's record; the device error word), so every
//! accessor of the context and every later call sees the same state whichever path ran.
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
//! other launch error), which the forward returns as [`Error::Launch`](crate::Error::Launch)
//! naming `decode_forward`: it never hangs. The grid is at most the cooperative limit, the
//! multiprocessor count times the kernel's occupancy (the runtime's figure, asked once per
//! context). A cooperative launch is captured into a CUDA graph as a cooperative kernel node
//! (CUDA 12 and later).
//!
//! The sync words are allocated, and the grid asked of the runtime, when
//! [`MoeContext::set_small_batch_threshold`] first turns the path on, not at the first forward on
//! it: so a context is warm for a capture (see [`crate::graph`]) after an eager forward on either
//! path. A device without cooperative launches, or an occupancy of 0, turns the path off for
//! that context for good (remembered, not asked again): its forwards take the multi-kernel path,
//! which writes the same bits. A query that fails is returned as an error by
//! `set_small_batch_threshold` and not remembered (it may be transient: another library's pending
//! runtime error), so that a user who asked for the path learns why it is not running.

use crate::config::LayerConfig;
use crate::controller::Coefficient;
use crate::device::Device;
use crate::element::HalfElement;
use crate::error::Result;
use crate::ffi;
use crate::moe::{ForwardPlan, MoeContext, MoeWeightViews, RouterKind, ERROR_WORDS};
use crate::tensor::{DType, DeviceTensor, Launch, TensorView};
use crate::workspace::GrowBuf;

/// The most tokens a small-batch forward takes (a token set is one 64-bit mask in the kernel).
pub const SMALL_BATCH_MAX_TOKENS: usize = ffi::REMOE_DECODE_MAX_TOKENS as usize;
/// The most experts a small-batch forward takes (the dispatch lives in shared memory).
pub const SMALL_BATCH_MAX_EXPERTS: usize = ffi::REMOE_DECODE_MAX_EXPERTS as usize;
/// The kernel's synchronisation words: the grid barrier's word and two sets of counters
/// (kernels/decode.cu). A fixed size, independent of the shapes, so that they are allocated once,
/// when the path is turned on.
const SYNC_WORDS: usize = ffi::REMOE_DECODE_SYNC_WORDS as usize;
/// The most split-K ranges of the down projection the kernel takes (the multi-kernel path's
/// `down_k_splits` never gives more; a forward that would keeps the multi-kernel path).
const MAX_SPLITS: usize = ffi::REMOE_DECODE_MAX_SPLITS as usize;

// What the launch's arguments rely on: a token set is one 64-bit mask in the kernel, and the
// pair count T E (plane_rows, the pair offsets) is an i32 (the kernel's element offsets into act
// and y are 64-bit).
const _: () = assert!(SMALL_BATCH_MAX_TOKENS <= u64::BITS as usize);
const _: () = assert!(SMALL_BATCH_MAX_TOKENS * SMALL_BATCH_MAX_EXPERTS <= i32::MAX as usize);

/// A context's small-batch state: the setting, the sync words and the grid.
#[derive(Debug, Default)]
pub(crate) struct SmallBatch {
    /// The largest T that takes the path; None: off.
    pub(crate) threshold: Option<usize>,
    /// The kernel's sync words ([`SYNC_WORDS`]). Allocated zeroed once (by [`prepare`], when the
    /// threshold is first set), never poisoned or cleared by the host: every completed launch
    /// leaves the barrier word's low bits at 0 and the counter set of the next launch zeroed.
    sync: GrowBuf<u32>,
    /// The cooperative limit of the kernel on the context's device: the CTAs resident at once
    /// (asked by [`prepare`] until it answers; 0: the path is off for this context, because the
    /// device has no cooperative launch or the kernel cannot run there).
    max_grid: Option<usize>,
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

impl SmallBatch {
    /// Bytes of device memory held.
    pub(crate) fn bytes(&self) -> usize {
        self.sync.bytes()
    }
}

/// Whether a forward of `cfg` with `router` takes the path, from what the host knows: the
/// threshold, the shapes, whether it saves for backward, whether its pair buffers hold every
/// pair, whether stage timing is on (the device's side, the grid, is asked after).
pub(crate) fn eligible(
    threshold: Option<usize>,
    cfg: &LayerConfig,
    router: RouterKind,
    save_for_backward: bool,
    every_pair: bool,
    stage_timing: bool,
) -> bool {
    threshold.is_some_and(|th| cfg.tokens <= th)
        && cfg.tokens <= SMALL_BATCH_MAX_TOKENS
        && cfg.experts <= SMALL_BATCH_MAX_EXPERTS
        && router == RouterKind::Relu
        && !save_for_backward
        && every_pair
        && !stage_timing
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
/// ordered on the context's stream) and the grid asked of the runtime, each once. Called when the
/// threshold is set, so that a capture after any eager warm-up finds nothing to allocate. Fails
/// when the sync words' allocation does (during a capture: [`Error::CaptureUnsupported`]) or the
/// grid query does ([`Error::Launch`] naming `decode_max_grid`).
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

/// The grid of the context's small-batch forwards when `plan` takes the path, else None. When it
/// returns a grid, the sync words are allocated ([`prepare`]).
pub(crate) fn grid_for<T: HalfElement>(
    ctx: &mut MoeContext<T>,
    plan: &ForwardPlan,
) -> Result<Option<usize>> {
    if !eligible(
        ctx.small_batch.threshold,
        plan.config(),
        plan.router_kind(),
        plan.save,
        plan.covers_every_pair(),
        ctx.stage_timing,
    ) || plan.k_splits > MAX_SPLITS
    {
        return Ok(None);
    }
    // Done when the threshold was set; kept here so that the invariant does not rest on that.
    prepare(ctx)?;
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

/// The forward on the path: the buffers as the multi-kernel path sizes them for `plan` (so that a
/// context alternating between the paths never reallocates), then the one launch on `grid` CTAs.
#[allow(clippy::too_many_arguments)] // the forward's own arguments, its plan and its grid
pub(crate) fn forward<T: HalfElement>(
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
    // The sync words were allocated by `prepare` (grid_for); missing ones are a typed error below.
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
    let y = l.output("expert out", &mut ctx.experts.y, k_splits * cap * h)?;
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
    // index t*e; the pair lists cap = t*e and act cap*f, y k_splits planes of cap*h (plane_rows =
    // cap); the statistics and the four-word error word. The SYNC_WORDS sync words were
    // allocated zeroed (`prepare`, through grid_for: a memset ordered on this stream) and only
    // this kernel touches them, each completed launch leaving the barrier word's low bits at 0
    // and the counter set of the next launch zeroed (a launch the driver refused never ran), so
    // a launch starts with every CTA's arrival uncounted and its counters at 0.
    // coeff is null (the fixed value goes by value) or the controller's lambda, with its
    // sparsity sum and count (one f64, one u32) on this device (check_coefficient). H and F are
    // multiples of 8 and every size is below 2^31 (validate_for_gpu); t <= 64, e <= 512 and cap
    // = t*e (`eligible`), 1 <= k_splits <= min(MAX_SPLITS, ceil(f / 64)) (down_k_splits, and
    // grid_for). The grid is at least 1
    // and at most the cooperative limit remoe_decode_max_grid reported for this device, which
    // supports cooperative launches (grid_for: max_grid > 0). The grid barrier and the counters'
    // waits complete because the launcher launches cooperatively (kernels/decode.cu, `launch`):
    // the driver starts the grid with every CTA resident or fails the launch with a code
    // returned here, so no CTA waits for one that never runs. The context is current (Launch::on takes
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

    #[test]
    fn only_small_relu_inference_forwards_with_every_pair_take_the_path() {
        let cfg = LayerConfig::new(7, 768, 3072, 8, 1);
        let yes = |th, cfg: &LayerConfig| eligible(th, cfg, RouterKind::Relu, false, true, false);
        assert!(yes(Some(7), &cfg));
        assert!(yes(Some(64), &cfg));
        // Off by default, and above the threshold.
        assert!(!yes(None, &cfg));
        assert!(!yes(Some(6), &cfg));
        // The kernel's own bounds, whatever the threshold.
        let big = LayerConfig::new(65, 768, 3072, 8, 1);
        assert!(!yes(Some(1000), &big));
        let wide = LayerConfig::new(1, 64, 64, SMALL_BATCH_MAX_EXPERTS + 1, 1);
        assert!(!yes(Some(64), &wide));
        let widest = LayerConfig::new(1, 64, 64, SMALL_BATCH_MAX_EXPERTS, 1);
        assert!(yes(Some(64), &widest));
        // An empty batch takes it (the statistics are still written).
        assert!(yes(Some(1), &LayerConfig::new(0, 64, 64, 8, 1)));
        // (router, saves for backward, every pair, stage timing) with the threshold at 64.
        let with =
            |router, save, every, timing| eligible(Some(64), &cfg, router, save, every, timing);
        assert!(with(RouterKind::Relu, false, true, false));
        for router in [RouterKind::TopK, RouterKind::TopKNormalized] {
            assert!(!with(router, false, true, false));
        }
        // Training, a capacity below every pair, stage timing.
        assert!(!with(RouterKind::Relu, true, true, false));
        assert!(!with(RouterKind::Relu, false, false, false));
        assert!(!with(RouterKind::Relu, false, true, true));
    }
}
