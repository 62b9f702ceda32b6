//! The MoE layer forward on the GPU, for the ReLU router (ReMoE) and the TopK baseline. The CPU
//! reference is [`reference::remoe_forward`](crate::reference::remoe_forward) and
//! [`reference::topk_forward`](crate::reference::topk_forward).
//!
//! One forward is this sequence of kernels on the context's stream:
//!
//! 1. router: logits, gates and per-64-token-block statistics (ReLU), or logits then the
//!    softmax/top-k tail (TopK, with or without renormalised gates);
//! 2. routing statistics: n_e, expert offsets, GEMM row-tile offsets, sparsity, balance loss;
//! 3. compaction into per-expert token lists, ascending token order;
//! 4. grouped up projection with the X gather and SwiGLU fused; grouped down projection, whose
//!    output y is rounded once to the activation type from its f32 sums (where the down
//!    projection is split in K, small batches, after the sum of its f32 partial planes);
//! 5. the gate-weighted combine into `out`, summed in f32 over y, without atomics.
//!
//! An inference forward of the ReLU layer with few tokens can instead run as one persistent
//! kernel that does all of this (the small-batch path, chosen by default by a rule fitted to its
//! measurements: see [`MoeContext::set_small_batch`]); it writes the same bits.
//!
//! ## Host round-trips
//!
//! Nothing is read back to the host during a backward, nor during a forward whose pair buffers
//! hold every possible pair (see [`crate::capacity`]; an eager forward whose buffers could not
//! reads |A| once, after the routing statistics, to size them exactly): the kernels read n_e, |A|
//! and the GEMM tile counts from device memory, and every grid is sized from what the host
//! knows (T, E, and the pair capacity of [`crate::capacity`]; the Hopper GEMMs are persistent,
//! the others let their surplus blocks leave at once). So a forward returns as soon as its
//! kernels are enqueued, the CPU runs ahead of the GPU, and a forward, a backward or a whole
//! training step can be captured in a CUDA graph and replayed (see [`crate::graph`]). The
//! routing statistics stay on the device until asked for ([`MoeContext::stats`]).
//!
//! What only the device can know is reported at the next host-visible call of the context
//! ([`MoeContext::stats`], [`MoeContext::check_device_errors`], [`MoeContext::lambda`]), as a
//! typed error: a pair count past the capacity ([`Error::CapacityExceeded`]), a non-finite
//! router logit ([`Error::NonFiniteLogits`]). A training loop that never reads anything back
//! should call [`MoeContext::check_device_errors`] (a 16-byte read) as often as it can afford,
//! at least before it trusts a checkpoint: between two checks a step may have run on a
//! forward that overflowed (its output and expert gradients were zero) or met a NaN.
//!
//! ## Who owns the workspace
//!
//! Everything a forward writes besides `out` (logits, gates, dispatch lists, the expert
//! activations `act` and outputs `y`) lives in a [`MoeContext`] that the caller owns and passes
//! to each call. Its buffers grow to the largest batch and pair count seen and are then reused:
//! in steady state a forward allocates nothing ([`MoeContext::allocations`] counts). The context
//! also holds what the backward will need, so a training loop keeps one context per
//! micro-batch in flight.
//!
//! ## What a forward leaves for the backward
//!
//! A forward that returns `Ok` ends by recording a [`SavedForward`] in the context: its
//! configuration and router, |A| and the GEMM row tiles, whether g and u were saved, the lengths
//! of the saved buffers and a generation number (a backward then marks in it that act now holds
//! R act, see [`MoeContext::act_to_host`]). The backward reads only that record (never the
//! context's current settings, which may have changed since), checks it and the buffers against
//! each other, and refuses with a typed error what the forward did not save. A forward that fails
//! after it has started rewriting the workspace leaves no record (the buffers no longer hold the
//! previous forward's state); one that is refused before (bad shapes, a bad configuration) leaves
//! the context as it was.
//!
//! ## Non-finite router logits
//!
//! A router logit that is NaN or +-Inf (from NaN or huge values in X or Wr, an overflow, ...) is
//! handled the same way by the kernels and by the CPU reference
//! ([`reference::relu_router`](crate::reference::relu_router),
//! [`reference::softmax_topk_router`](crate::reference::softmax_topk_router)):
//!
//! - ReMoE: its gate is 0, so the pair is inactive, as for a logit <= 0;
//! - TopK (both kinds): it takes no part in the softmax (its P is 0; the softmax is over the
//!   token's finite logits) and is never selected: a token selects its k largest finite logits,
//!   or all of them when it has fewer than k, never more than k (the renormalised gates are
//!   then over those); a token with no finite logit has no gate;
//! - the router kernel counts such logits in the context's device error word (an atomic on the
//!   rare path, no host synchronisation), that forward records no sparsity into an adaptive
//!   controller, and the error is reported as [`Error::NonFiniteLogits`] at the next
//!   host-visible call of the context (see above), which clears it.
//!
//! Only the routing is defined this way: a NaN or Inf elsewhere (an expert weight, dOut) flows
//! through the arithmetic as IEEE says.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::capacity::{down_k_splits, max_row_tiles, split_k_partials, PairCapacity};
use crate::config::LayerConfig;
use crate::controller::Coefficient;
use crate::device::Device;
use crate::element::HalfElement;
use crate::error::{Error, Result};
use crate::experts::{ExpertBatch, ROW_SCHED_WORDS};
use crate::ffi;
use crate::gemm::GemmPath;
use crate::graph::{self, CaptureParty, GraphPart, Mode, ReplayLock};
use crate::tensor::{DeviceTensor, Launch, TensorView};
use crate::workspace::{workspace, Buffers, GrowBuf};

/// Tokens per router block (the granularity of the per-block statistics).
const ROUTER_BLOCK: usize = ffi::REMOE_ROUTER_TOKENS_PER_BLOCK as usize;
/// Rows per grouped-GEMM tile.
const TILE_ROWS: usize = ffi::REMOE_GEMM_TILE_ROWS as usize;
/// The largest E the TopK kernel takes.
pub const TOPK_MAX_EXPERTS: usize = ffi::REMOE_TOPK_MAX_EXPERTS as usize;
pub use crate::decode::{SmallBatch, SMALL_BATCH_MAX_EXPERTS, SMALL_BATCH_MAX_TOKENS};

/// The layer's weights on the device (layout: see the crate documentation).
#[derive(Debug, Clone, Copy)]
pub struct MoeWeights<'a, T: HalfElement> {
    /// Wr [H, E]
    pub router: &'a DeviceTensor<T>,
    /// Wg [E, H, F]
    pub gate: &'a DeviceTensor<T>,
    /// Wu [E, H, F]
    pub up: &'a DeviceTensor<T>,
    /// Wd [E, F, H]
    pub down: &'a DeviceTensor<T>,
}

/// The layer's weights as borrowed views (see [`TensorView`]): what the layer's functions take.
/// A `&MoeWeights` converts into it without a copy; build one directly
/// to pass weights that live in buffers this crate does not own.
#[derive(Debug, Clone)]
pub struct MoeWeightViews<'a, T: HalfElement> {
    /// Wr [H, E]
    pub router: TensorView<'a, T>,
    /// Wg [E, H, F]
    pub gate: TensorView<'a, T>,
    /// Wu [E, H, F]
    pub up: TensorView<'a, T>,
    /// Wd [E, F, H]
    pub down: TensorView<'a, T>,
}

impl<'a, T: HalfElement> From<&MoeWeights<'a, T>> for MoeWeightViews<'a, T> {
    fn from(w: &MoeWeights<'a, T>) -> Self {
        Self {
            router: w.router.view(),
            gate: w.gate.view(),
            up: w.up.view(),
            down: w.down.view(),
        }
    }
}

impl<'a, T: HalfElement> From<&MoeWeightViews<'a, T>> for MoeWeightViews<'a, T> {
    fn from(w: &MoeWeightViews<'a, T>) -> Self {
        w.clone()
    }
}

/// How the gates are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterKind {
    /// ReMoE: R = ReLU(X Wr); the balance loss is the L1 regulariser at coefficient lambda.
    Relu,
    /// The baseline: top-k of softmax(X Wr), the selected probabilities as they are (Switch;
    /// Qwen2-MoE's `norm_topk_prob: false`); the balance loss is the Switch aux loss at
    /// coefficient c.
    TopK,
    /// Top-k of softmax(X Wr) with the selected probabilities renormalised to sum to 1
    /// (Mixtral; Qwen-MoE's and OLMoE's `norm_topk_prob: true`). With L = X Wr, P = softmax(L)
    /// per token and S_t the k selected experts of token t (the same selection as
    /// [`RouterKind::TopK`]):
    ///
    /// ```text
    /// R[t,e] = P[t,e] / sum_{j in S_t} P[t,j]  =  exp(L[t,e]) / sum_{j in S_t} exp(L[t,j])   (e in S_t)
    /// R[t,e] = 0                                                                          (e not in S_t)
    /// ```
    ///
    /// the softmax over the selected logits ("softmax after top-k"), so each token's gates sum
    /// to 1 and with k = 1 every gate is exactly 1. The balance loss is the Switch aux loss at
    /// coefficient c on the full softmax P, as in Mixtral's `load_balancing_loss_func`, and its
    /// gradient flows through P; the gates' gradient flows through the renormalisation:
    ///
    /// ```text
    /// dL[t,i] = P[t,i] (dA[t,i] - sum_j P[t,j] dA[t,j])  +  [i in S_t] R[t,i] (dR[t,i] - sum_{j in S_t} R[t,j] dR[t,j])
    /// ```
    ///
    /// with dA\[t,e\] = c E n_e / (k T^2). Non-finite logits follow [`RouterKind::TopK`]'s policy
    /// (see the module documentation).
    TopKNormalized,
}

impl RouterKind {
    /// Whether the gates come from the softmax top-k tail (both TopK kinds): P is kept, E is at
    /// most [`TOPK_MAX_EXPERTS`], and exactly k experts are selected per token (fewer only for a
    /// token with fewer than k finite logits).
    pub fn is_topk(self) -> bool {
        matches!(self, RouterKind::TopK | RouterKind::TopKNormalized)
    }
}

/// What a forward reports about its routing.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardStats {
    /// |A|, the number of (token, expert) pairs computed.
    pub active_pairs: usize,
    /// S = 1 - |A| / (T E) (1 for an empty batch).
    pub sparsity: f64,
    /// The regulariser (ReMoE) or aux loss (TopK) value at the coefficient given.
    pub balance_loss: f64,
    /// n_e for each expert.
    pub tokens_per_expert: Vec<u32>,
}

/// The per-pair dispatch lists, copied to the host (see [`MoeContext::dispatch_to_host`]).
#[derive(Debug, Clone, PartialEq)]
pub struct HostDispatch {
    /// [E+1]: expert e's pairs are `offsets[e]..offsets[e+1]`.
    pub offsets: Vec<u32>,
    /// [|A|] token of each pair.
    pub tokens: Vec<u32>,
    /// [|A|] gate of each pair.
    pub gates: Vec<f32>,
}

/// Milliseconds spent in each stage of the last forward, measured with CUDA events when
/// [`MoeContext::set_stage_timing`] is on.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StageTimes {
    /// Router GEMM with its ReLU or softmax/top-k tail.
    pub router_ms: f64,
    /// Routing statistics (on the device; nothing is read back).
    pub stats_ms: f64,
    /// Compaction into per-expert lists.
    pub compaction_ms: f64,
    /// Up projection with the gather and SwiGLU.
    pub up_ms: f64,
    /// Down projection.
    pub down_ms: f64,
    /// Gate-weighted combine.
    pub combine_ms: f64,
}

/// What one successful forward left in its [`MoeContext`] for the backward (see the module
/// documentation). Built as the forward's last step; the backward checks it before it enqueues
/// anything.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedForward {
    /// The forward's layer configuration.
    pub config: LayerConfig,
    /// The forward's router.
    pub router: RouterKind,
    /// The pairs the forward's pair buffers hold (its [`PairCapacity`]);
    /// |A| itself stays on the device.
    pub capacity: usize,
    /// The most grouped-GEMM row tiles that capacity allows (the GEMM grids' bound).
    pub max_tiles: usize,
    /// Whether the forward wrote g and u (the context saved for backward when it ran).
    pub saved_for_backward: bool,
    /// The number of successful forwards of this context, this one included (1 for the first).
    pub generation: u64,
    /// Element counts of the buffers the forward wrote for the backward.
    pub(crate) lens: SavedLens,
    /// Whether a backward has since written R act (each pair's act times its gate, dWd's
    /// operand) over the forward's act: false in the forward's record, set by the backward.
    pub(crate) act_gated: bool,
}

/// Element counts of a forward's saved buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SavedLens {
    pub(crate) logits: usize,
    pub(crate) gates: usize,
    pub(crate) probs: usize,
    pub(crate) pair_index: usize,
    pub(crate) counts: usize,
    pub(crate) expert_offsets: usize,
    pub(crate) tile_offsets: usize,
    pub(crate) pair_token: usize,
    pub(crate) pair_gate: usize,
    pub(crate) g: usize,
    pub(crate) u: usize,
}

impl SavedLens {
    /// The buffers of a forward of `cfg` with `router` and room for `pairs` pairs.
    pub(crate) fn of(cfg: &LayerConfig, router: RouterKind, pairs: usize, saved: bool) -> Self {
        let (t, f, e) = (cfg.tokens, cfg.ffn, cfg.experts);
        Self {
            logits: t * e,
            gates: t * e,
            probs: if router.is_topk() { t * e } else { 0 },
            pair_index: t * e,
            counts: e,
            expert_offsets: e + 1,
            tile_offsets: e + 1,
            pair_token: pairs,
            pair_gate: pairs,
            g: if saved { pairs * f } else { 0 },
            u: if saved { pairs * f } else { 0 },
        }
    }

    /// Bytes of device memory these buffers hold (g and u of `elem` bytes; the rest 4-byte
    /// f32, i32 or u32).
    fn bytes(&self, elem: usize) -> usize {
        4 * (self.logits
            + self.gates
            + self.probs
            + self.pair_index
            + self.counts
            + self.expert_offsets
            + self.tile_offsets
            + self.pair_token
            + self.pair_gate)
            + elem * (self.g + self.u)
    }
}

impl SavedForward {
    /// Whether `other` describes device state of the same shapes and capacity (what a graph's
    /// captured backward needs of the forward it reads; the generation may differ).
    pub(crate) fn same_state(&self, other: &SavedForward) -> bool {
        (
            &self.config,
            self.router,
            self.capacity,
            self.max_tiles,
            self.saved_for_backward,
            &self.lens,
        ) == (
            &other.config,
            other.router,
            other.capacity,
            other.max_tiles,
            other.saved_for_backward,
            &other.lens,
        )
    }

    /// The record a backward can run from: there must be one, and its forward must have saved
    /// g and u. This is the forward's state, whatever the context's settings are now.
    pub(crate) fn for_backward(saved: Option<&SavedForward>) -> Result<&SavedForward> {
        let s = saved.ok_or_else(|| {
            Error::InvalidConfig(
                "moe_backward: this context holds no successful forward (none ran yet, or the \
                 last one failed after it had started rewriting the workspace)"
                    .into(),
            )
        })?;
        if !s.saved_for_backward {
            return Err(Error::InvalidConfig(format!(
                "moe_backward: forward {} did not save for backward (g and u); make the context \
                 with MoeContext::for_training or call set_save_for_backward(true) before the \
                 forward",
                s.generation
            )));
        }
        Ok(s)
    }
}

/// Words of the device error word: [non-finite logits, ~first such token, the largest |A| past
/// the capacity, that capacity] (kernels/remoe_kernels.h).
pub(crate) const ERROR_WORDS: usize = 4;

/// The first error the error word reports, if any, with the range of words that reporting it
/// clears: non-finite logits first (they make the routing itself meaningless), then an overflow.
pub(crate) fn device_error(word: &[u32]) -> Option<(Error, std::ops::Range<usize>)> {
    if word[1] != 0 {
        return Some((
            Error::NonFiniteLogits {
                count: word[0] as usize,
                first_token: !word[1] as usize,
            },
            0..2,
        ));
    }
    (word[2] != 0).then(|| {
        (
            Error::CapacityExceeded {
                needed: word[2] as usize,
                capacity: word[3] as usize,
            },
            2..4,
        )
    })
}

/// What a context's device buffers hold, as the host knows it: shared by the context and the
/// graphs that captured it (see [`crate::graph`]), so that a replay can say what it left there.
#[derive(Debug, Default)]
pub(crate) struct RecordCell {
    inner: Mutex<Record>,
}

/// The record proper (see [`RecordCell`]).
#[derive(Debug, Default)]
pub(crate) struct Record {
    /// The forward whose state the buffers hold once the enqueued work has run (None before
    /// one, after a failed one, or after the buffers were poisoned).
    pub(crate) saved: Option<SavedForward>,
    /// Counts the moves of the context's buffers (a reallocation): a graph replays only while
    /// the buffers it captured are still where they were.
    pub(crate) layout: u64,
    /// Set during a capture of this thread (see [`CaptureNote`]).
    capture: Option<CaptureNote>,
}

/// A capture in progress that uses the context.
#[derive(Debug, Clone)]
struct CaptureNote {
    id: u64,
    /// The record before the capture: what the device still holds when the capture ends.
    before: Option<SavedForward>,
    /// Whether a forward of the capture has run: a backward after it reads the capture's own
    /// forward, not the one before the capture.
    forwarded: bool,
    /// Some(record) when a backward of the capture read the forward saved before it: every
    /// replay needs a record like it.
    reads: Option<Option<SavedForward>>,
}

impl RecordCell {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Record> {
        // A panic while locked left the record as the forward or backward had set it before
        // enqueuing (None from a forward), which is safe to keep using.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Record {
    /// Notes a call in capture `mode` (a forward when `forward`), listing `cell` in the capture
    /// the first time; nothing in eager mode.
    pub(crate) fn note_call(&mut self, mode: Mode, cell: &Arc<RecordCell>, forward: bool) {
        let Mode::Capture(id) = mode else {
            return;
        };
        if self.capture.as_ref().is_none_or(|c| c.id != id) {
            self.capture = Some(CaptureNote {
                id,
                before: self.saved.clone(),
                forwarded: false,
                reads: None,
            });
            graph::join(id, cell.clone());
        }
        let note = self.capture.as_mut().expect("set above");
        if forward {
            note.forwarded = true;
        } else if !note.forwarded && note.reads.is_none() {
            note.reads = Some(self.saved.clone());
        }
    }
}

impl CaptureParty for RecordCell {
    fn end_capture(self: Arc<Self>, id: u64) -> Box<dyn GraphPart> {
        let mut rec = self.lock();
        let note = rec.capture.take().filter(|n| n.id == id);
        let (leaves, reads) = match note {
            Some(note) => {
                let leaves = std::mem::replace(&mut rec.saved, note.before);
                (leaves, note.reads)
            }
            None => (rec.saved.clone(), None),
        };
        let layout = rec.layout;
        drop(rec);
        Box::new(ContextPart {
            cell: self,
            layout,
            reads,
            leaves,
        })
    }

    fn key(&self) -> usize {
        self as *const Self as usize
    }
}

impl<T: HalfElement> Drop for MoeContext<T> {
    /// The buffers are freed: a graph that captured them must not replay (see ContextPart).
    fn drop(&mut self) {
        self.record.lock().layout += 1;
    }
}

/// A context's share of a graph (see [`crate::graph`]).
struct ContextPart {
    cell: Arc<RecordCell>,
    /// The buffers' layout at the capture.
    layout: u64,
    /// The record a replay must find (Some), when the graph reads a forward from before it.
    reads: Option<Option<SavedForward>>,
    /// The record a replay leaves.
    leaves: Option<SavedForward>,
}

impl GraphPart for ContextPart {
    fn begin_replay(&self) -> Result<Box<dyn ReplayLock + '_>> {
        let rec = self.cell.lock();
        if rec.layout != self.layout {
            return Err(Error::CaptureUnsupported(
                "a context's buffers were reallocated (a larger call made them grow) or freed (the \
                 context was dropped) since the graph was captured; capture it again"
                    .into(),
            ));
        }
        if let Some(want) = &self.reads {
            let same = match (want, &rec.saved) {
                (None, None) => true,
                (Some(a), Some(b)) => a.same_state(b),
                _ => false,
            };
            if !same {
                return Err(Error::CaptureUnsupported(
                    "the graph's backward was captured against a forward of other shapes or \
                     capacity than the one its context now holds; run that forward first"
                        .into(),
                ));
            }
        }
        Ok(Box::new(ContextReplay {
            rec,
            leaves: &self.leaves,
        }))
    }
}

struct ContextReplay<'a> {
    rec: MutexGuard<'a, Record>,
    leaves: &'a Option<SavedForward>,
}

impl ReplayLock for ContextReplay<'_> {
    fn replayed(&mut self) {
        self.rec.saved = self.leaves.clone();
    }
}

workspace! {
    /// The router's and the dispatch's buffers: [T, E] logits, gates (and TopK's probs) and
    /// pair index, the per-64-token-block routing counts, the per-expert statistics and
    /// offsets, and the pair lists (token and gate of each pair, sized by the capacity).
    pub(crate) struct RoutingBufs<T> {
        logits: GrowBuf<f32>,
        gates: GrowBuf<f32>,
        probs: GrowBuf<f32>,
        block_counts: GrowBuf<u32>,
        block_sums: GrowBuf<f32>,
        block_offsets: GrowBuf<u32>,
        counts: GrowBuf<u32>,
        gate_sums: GrowBuf<f32>,
        expert_offsets: GrowBuf<u32>,
        tile_offsets: GrowBuf<u32>,
        stats_u32: GrowBuf<u32>,
        stats_f32: GrowBuf<f32>,
        pair_token: GrowBuf<u32>,
        pair_gate: GrowBuf<f32>,
        pair_index: GrowBuf<i32>,
    }
}

workspace! {
    /// The experts' buffers, per pair: act and the expert outputs y [|A|, H] in T (the forward's
    /// scratch; the backward recomputes act and writes R act, dWd's operand, into the same
    /// buffer), the down projection's f32 split-K partial sums (k_splits planes of [|A|, H]
    /// where it splits, small batches; sized for every smaller T too, see `size_experts`), and
    /// g = x Wg, u = x Wu, [|A|, F], saved for the backward.
    pub(crate) struct ExpertBufs<T> {
        act: GrowBuf<T>,
        y: GrowBuf<T>,
        y_partials: GrowBuf<f32>,
        g: GrowBuf<T>,
        u: GrowBuf<T>,
    }
}

/// The forward's workspace and saved state (see the module documentation).
#[derive(Debug)]
pub struct MoeContext<T: HalfElement> {
    pub(crate) dev: Device,
    /// What the buffers hold (see [`RecordCell`]).
    pub(crate) record: Arc<RecordCell>,
    /// Successful forwards so far.
    pub(crate) generation: u64,
    pub(crate) allocations: u64,
    pub(crate) stage_timing: bool,
    pub(crate) stage_times: Option<StageTimes>,
    /// The router's and the dispatch's buffers.
    pub(crate) routing: RoutingBufs<T>,
    /// The experts' buffers.
    pub(crate) experts: ExpertBufs<T>,
    /// Write g and u in the forward (the backward needs them).
    pub(crate) save_for_backward: bool,
    /// A host-given coefficient, copied here for the kernels.
    pub(crate) coeff: GrowBuf<f64>,
    /// The device error word (see [`ERROR_WORDS`] and the module documentation): raised by the
    /// router (non-finite logits) and the routing statistics (capacity), cleared when reported.
    pub(crate) device_errors: GrowBuf<u32>,
    /// The row GEMMs' tile counter (see [`ROW_SCHED_WORDS`]): allocated zeroed once, then only
    /// the kernels write it (and leave it zero). An expert-parallel context's owner GEMMs use
    /// its source context's, on the same stream.
    pub(crate) row_sched: GrowBuf<u32>,
    /// How many pairs the pair buffers are sized for.
    pub(crate) capacity: PairCapacity,
    /// The backward's scratch (src/backward.rs).
    pub(crate) bwd: crate::scratch::BackwardScratch<T>,
    /// The expert GEMMs' implementation; None until the first call resolves the default.
    pub(crate) gemm_path: Option<GemmPath>,
    /// The small-batch path's policy and state (src/decode.rs).
    pub(crate) small_batch: crate::decode::SmallBatchState,
}

impl<T: HalfElement> MoeContext<T> {
    /// An empty context on `dev`; its buffers are allocated by the first forward.
    pub fn new(dev: &Device) -> Self {
        Self {
            dev: dev.clone(),
            record: Arc::default(),
            generation: 0,
            allocations: 0,
            stage_timing: false,
            stage_times: None,
            routing: RoutingBufs::default(),
            experts: ExpertBufs::default(),
            save_for_backward: false,
            coeff: GrowBuf::default(),
            device_errors: GrowBuf::default(),
            row_sched: GrowBuf::default(),
            capacity: PairCapacity::default(),
            bwd: Default::default(),
            gemm_path: None,
            small_batch: Default::default(),
        }
    }

    /// A context whose forwards save what [`moe_backward`](crate::moe_backward) needs: the
    /// expert pre-activations g and u, 4 F bytes per routed pair. Recomputing them instead
    /// would cost the up projection's 4 |A| H F FLOPs again in the backward. The activation
    /// act and the expert outputs y are not needed: the backward recomputes act from g and u
    /// (bit for bit) and takes dR = dOut . y from its dAct GEMM.
    pub fn for_training(dev: &Device) -> Self {
        let mut ctx = Self::new(dev);
        ctx.save_for_backward = true;
        ctx
    }

    /// Bytes of device memory holding what the last forward saved for the backward, for its
    /// |A| pairs: logits, gates and pair index ([T, E]; probs too for TopK), the dispatch lists
    /// (token and gate per pair), and g and u per pair when saving for backward. Divide by T
    /// for bytes per token. The forward's act and y are scratch that the backward does not
    /// read. The buffers themselves are sized by the capacity
    /// ([`MoeContext::workspace_bytes`]).
    /// Reads |A| from the device (waits for the stream).
    pub fn saved_bytes(&self) -> Result<usize> {
        let Some(s) = self.saved_forward() else {
            return Ok(0);
        };
        let pairs = self.dispatched_pairs()?;
        let lens = SavedLens::of(&s.config, s.router, pairs, s.saved_for_backward);
        Ok(lens.bytes(std::mem::size_of::<T>()))
    }

    /// Bytes of device memory the context's buffers hold (forward and backward workspace, sized
    /// by the largest batch and the pair capacity). No device access.
    pub fn workspace_bytes(&self) -> usize {
        self.routing.bytes()
            + self.experts.bytes()
            + self.coeff.bytes()
            + self.device_errors.bytes()
            + self.row_sched.bytes()
            + self.bwd.bytes()
            + self.small_batch.bytes()
    }

    /// The record of what the last successful forward saved, if any (see the module
    /// documentation).
    pub fn saved_forward(&self) -> Option<SavedForward> {
        self.record.lock().saved.clone()
    }

    /// Chooses how many routed pairs the pair buffers hold from the next forward on (see
    /// [`crate::capacity`]); the default is [`PairCapacity::Auto`] with a 16 GiB budget
    /// ([`DEFAULT_PAIR_BUDGET_BYTES`](crate::capacity::DEFAULT_PAIR_BUDGET_BYTES)).
    pub fn set_pair_capacity(&mut self, capacity: PairCapacity) {
        self.capacity = capacity;
    }

    /// The pair capacity setting (see [`MoeContext::set_pair_capacity`]).
    pub fn pair_capacity(&self) -> PairCapacity {
        self.capacity
    }

    /// Reads the device error word and clears what it reports: [`Error::NonFiniteLogits`] when a
    /// forward since the last check met a NaN or infinite router logit, else
    /// [`Error::CapacityExceeded`] when one routed more pairs than its capacity (see the module
    /// documentation). Waits for the stream (a 16-byte read). One call reports one error; a
    /// second call reports the other, if both happened.
    pub fn check_device_errors(&mut self) -> Result<()> {
        if self.device_errors.len() == 0 {
            return Ok(());
        }
        let word = self.device_errors.to_host()?;
        match device_error(&word) {
            Some((err, words)) => {
                self.device_errors.zero_range(words)?;
                Err(err)
            }
            None => Ok(()),
        }
    }

    /// The routing statistics of the last forward (|A|, sparsity, the balance loss, n_e), read
    /// from the device: the host-visible call that reports what the device found
    /// ([`MoeContext::check_device_errors`] first, so an overflowed or non-finite forward gives
    /// its error here, and a second call its statistics). Waits for the stream.
    pub fn stats(&mut self) -> Result<ForwardStats> {
        if self.saved_forward().is_none() {
            return Err(Error::InvalidConfig(
                "MoeContext::stats: this context holds no successful forward".into(),
            ));
        }
        self.check_device_errors()?;
        let counts = self
            .routing
            .counts
            .prefix_to_host(self.saved_len(|l| l.counts))?;
        let su = self.routing.stats_u32.to_host()?;
        let sf = self.routing.stats_f32.to_host()?;
        Ok(ForwardStats {
            active_pairs: su[0] as usize,
            sparsity: sf[0] as f64,
            balance_loss: sf[1] as f64,
            tokens_per_expert: counts,
        })
    }

    /// The adaptive controller's lambda, read after [`MoeContext::check_device_errors`]: a
    /// training loop's one host read per step (or per logging interval) that also reports what
    /// the device found. Waits for the stream.
    pub fn lambda(&mut self, controller: &crate::LambdaController) -> Result<f64> {
        controller.expect_device(&self.dev)?;
        self.check_device_errors()?;
        controller.lambda()
    }

    /// The pairs the last forward dispatched (|A|, or 0 after an overflow), read from the
    /// device.
    fn dispatched_pairs(&self) -> Result<usize> {
        let offsets = self
            .routing
            .expert_offsets
            .prefix_to_host(self.saved_len(|l| l.expert_offsets))?;
        Ok(offsets.last().map_or(0, |&n| n as usize))
    }

    /// Chooses the implementation of the expert GEMMs for the next calls (the default is
    /// [`GemmPath::for_device`]). Both give bitwise-identical results; this exists to run the
    /// portable path on a Hopper GPU, and to pin a path in benchmarks. A path the device cannot
    /// run is an error.
    pub fn set_gemm_path(&mut self, path: GemmPath) -> Result<()> {
        path.require_on(&self.dev)?;
        self.gemm_path = Some(path);
        Ok(())
    }

    /// The implementation of the expert GEMMs this context uses (resolving the default on the
    /// first call).
    pub fn gemm_path(&mut self) -> Result<GemmPath> {
        if let Some(p) = self.gemm_path {
            return Ok(p);
        }
        let p = GemmPath::for_device(&self.dev)?;
        self.gemm_path = Some(p);
        Ok(p)
    }

    /// Chooses when the next forwards take the small-batch path ([`SmallBatch`]; the default is
    /// [`SmallBatch::Auto`]). On that path an inference forward of the ReLU layer is one
    /// persistent kernel instead of seven to nine dependent ones (docs/DECODE.md). It gives the
    /// same bits as the multi-kernel path (outputs, statistics, dispatch, the adaptive
    /// controller's record, the device error word), reads nothing back and is captured in CUDA
    /// graphs like any forward; the choice depends only on what the host knows. So the policy
    /// changes how long a forward takes, never what it computes.
    ///
    /// A forward takes it when the policy asks for it ([`SmallBatch::UpTo`]: T at most its
    /// threshold; [`SmallBatch::Auto`]: the expected bytes of the routed experts' weights at
    /// most 192 MiB, the rule fitted to docs/DECODE.md's measurements, "v2, measured"; never
    /// under [`SmallBatch::Off`]) and T is at most [`SMALL_BATCH_MAX_TOKENS`], E at most
    /// [`SMALL_BATCH_MAX_EXPERTS`], the router is [`RouterKind::Relu`] (TopK keeps the
    /// multi-kernel path), the context does not save for backward, the pair buffers hold every
    /// pair (the default [`PairCapacity::Auto`] at these sizes; a smaller fixed capacity keeps
    /// the multi-kernel path) and stage timing is off. Auto's rule is an extrapolation beyond
    /// the H100 and the three shapes it was measured on: for a model's own shape and device,
    /// `examples/latency` times both paths, and [`SmallBatch::UpTo`] pins the threshold.
    ///
    /// The path needs the kernel's synchronisation words (about 24 KB: its grid barrier and
    /// counters) on the context's device and the kernel's grid, asked of the runtime once (the
    /// cooperative limit: multiprocessors times occupancy). [`SmallBatch::UpTo`] prepares them
    /// here. [`SmallBatch::Auto`] prepares them at the context's first eager forward that does
    /// not save for backward, whatever its T (for a layer that can take the path at all: the
    /// ReLU router, E at most [`SMALL_BATCH_MAX_EXPERTS`], the rule true at T = 1), so an eager
    /// forward at any batch size warms the context for a CUDA graph capture ([`crate::graph`])
    /// at a smaller one; a captured forward of a context not prepared yet takes the multi-kernel
    /// path. Under Auto a failed preparation never fails a forward: the forward takes the
    /// multi-kernel path and a later eager forward tries again, up to three attempts, after
    /// which the path stays off for the context. A device without cooperative launches (or with
    /// too little shared memory, or an occupancy of 0) leaves the path off for the context for
    /// good, whatever the policy: its forwards take the multi-kernel path (same bits), and the
    /// query is not repeated.
    ///
    /// The kernel's CTAs wait for one another between phases, so it is a cooperative launch: the
    /// driver runs every CTA at once or refuses the launch
    /// (`cudaErrorCooperativeLaunchTooLarge` where fewer multiprocessors are free to it than the
    /// device has, under MPS say). It never hangs, whatever else runs on the device, and
    /// small-batch forwards of several contexts may run on several streams at once. Under
    /// [`SmallBatch::UpTo`] a refused launch is the forward's [`Error::Launch`]
    /// (`decode_forward`). Under [`SmallBatch::Auto`] an eager forward whose launch is refused
    /// as unable to run here (too large, too few resources, not supported) runs the
    /// multi-kernel path instead, and the path stays off for the context; a captured one
    /// returns the error (the capture taken again runs the multi-kernel path).
    ///
    /// Setting a policy, [`SmallBatch::Auto`] included, forgets what Auto learned (failed
    /// preparations, a refused launch), so that the path is tried again. Setting
    /// [`SmallBatch::UpTo`] fails when the synchronisation words' allocation does: with
    /// [`Error::CaptureUnsupported`] when the context is first prepared while its stream is
    /// being captured (set it before capturing), or [`Error::Driver`]; and when the grid query
    /// fails, with [`Error::Launch`] naming `decode_max_grid` (not remembered: the next call
    /// asks again). The policy is then left as it was.
    pub fn set_small_batch(&mut self, policy: SmallBatch) -> Result<()> {
        if let SmallBatch::UpTo(_) = policy {
            crate::decode::prepare(self)?;
        }
        self.small_batch.set_policy(policy);
        Ok(())
    }

    /// The small-batch policy (see [`MoeContext::set_small_batch`]).
    pub fn small_batch(&self) -> SmallBatch {
        self.small_batch.policy
    }

    /// For the crate's tests: runs the small-batch kernel on `grid` CTAs (at least 1, at most the
    /// device's resident maximum) instead of that maximum; `None` restores it.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn force_small_batch_grid(&mut self, grid: Option<usize>) {
        self.small_batch.forced_grid = grid;
    }

    /// For the crate's tests: how many forwards of this context were enqueued on the small-batch
    /// path (a captured one counts when captured, not when replayed).
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn small_batch_forwards(&self) -> u64 {
        self.small_batch.forwards
    }

    /// For the crate's tests: the grid (CTAs) and the split-K count of the last forward
    /// enqueued on the small-batch path, if any.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn small_batch_last_launch(&self) -> Option<(usize, usize)> {
        self.small_batch.last_launch
    }

    /// Turns saving for backward on or off for the next forwards. It does not change what an
    /// earlier forward saved: the backward goes by that forward's record.
    pub fn set_save_for_backward(&mut self, on: bool) {
        self.save_for_backward = on;
    }

    /// How many device allocations this context has made so far (0 more per call once warm).
    pub fn allocations(&self) -> u64 {
        self.allocations
    }

    /// Turns per-stage timing on or off. On, each forward records CUDA events between its stages
    /// and waits for the last one (so it costs a little); off, nothing is recorded.
    pub fn set_stage_timing(&mut self, on: bool) {
        self.stage_timing = on;
        self.stage_times = None;
    }

    /// Per-stage times of the last forward, when stage timing was on.
    pub fn stage_times(&self) -> Option<StageTimes> {
        self.stage_times
    }

    /// The configuration and router of the last successful forward (None before one, and after
    /// a forward that failed once it had started).
    pub fn last_forward(&self) -> Option<(LayerConfig, RouterKind)> {
        self.saved_forward().map(|s| (s.config, s.router))
    }

    /// How many elements of a saved buffer the forward the context holds wrote (0 without
    /// one): what the host reads, whatever length a later call (a capture's, say) left.
    fn saved_len(&self, len: impl Fn(&SavedLens) -> usize) -> usize {
        self.saved_forward().map_or(0, |s| len(&s.lens))
    }

    /// Logits L [T, E] of the last forward.
    pub fn logits_to_host(&self) -> Result<Vec<f32>> {
        self.routing
            .logits
            .prefix_to_host(self.saved_len(|l| l.logits))
    }

    /// Gates R [T, E] of the last forward (TopK: P where selected, else 0; TopKNormalized: P
    /// renormalised over the selection, else 0).
    pub fn gates_to_host(&self) -> Result<Vec<f32>> {
        self.routing
            .gates
            .prefix_to_host(self.saved_len(|l| l.gates))
    }

    /// Softmax probabilities P [T, E] of the last TopK forward (empty after a ReMoE forward).
    pub fn probs_to_host(&self) -> Result<Vec<f32>> {
        self.routing
            .probs
            .prefix_to_host(self.saved_len(|l| l.probs))
    }

    /// Per-expert sums of the gates (ReMoE) or of P (TopK), f32.
    pub fn gate_sums_to_host(&self) -> Result<Vec<f32>> {
        self.routing
            .gate_sums
            .prefix_to_host(self.saved_len(|l| l.counts))
    }

    /// The dispatch lists of the last forward.
    pub fn dispatch_to_host(&self) -> Result<HostDispatch> {
        let offsets = self
            .routing
            .expert_offsets
            .prefix_to_host(self.saved_len(|l| l.expert_offsets))?;
        let pairs = offsets.last().map_or(0, |&n| n as usize);
        Ok(HostDispatch {
            offsets,
            tokens: self.routing.pair_token.prefix_to_host(pairs)?,
            gates: self.routing.pair_gate.prefix_to_host(pairs)?,
        })
    }

    /// The pair of each (token, expert), or -1: [T, E].
    pub fn pair_index_to_host(&self) -> Result<Vec<i32>> {
        self.routing
            .pair_index
            .prefix_to_host(self.saved_len(|l| l.pair_index))
    }

    /// act = SiLU(x Wg) * (x Wu) of every pair, [|A|, F], in dispatch order, as the last forward
    /// wrote it. Refused with [`Error::InvalidConfig`] once a backward has run on that forward:
    /// the backward writes R act (dWd's operand) over act, which the next forward writes again.
    pub fn act_to_host(&self) -> Result<Vec<T>> {
        let saved = self.saved_forward();
        if saved.as_ref().is_some_and(|s| s.act_gated) {
            return Err(Error::InvalidConfig(
                "MoeContext::act_to_host: the backward overwrote act with R act (each pair's act \
                 times its gate, dWd's operand); run the forward again to read act"
                    .into(),
            ));
        }
        self.act_buffer_to_host(saved)
    }

    /// R act of every pair, [|A|, F], in dispatch order: what the last backward's dAct GEMM wrote
    /// over act (each pair's act, recomputed from g and u, times its gate, rounded to `T`:
    /// kernels/swiglu.cuh, `gated_act`). For tests. Refused with [`Error::InvalidConfig`] while
    /// the buffer holds the forward's act (no backward since the last forward).
    #[doc(hidden)]
    pub fn gated_act_to_host(&self) -> Result<Vec<T>> {
        let saved = self.saved_forward();
        if !saved.as_ref().is_some_and(|s| s.act_gated) {
            return Err(Error::InvalidConfig(
                "MoeContext::gated_act_to_host: no backward has run since the last forward, so \
                 the act buffer holds act, not R act"
                    .into(),
            ));
        }
        self.act_buffer_to_host(saved)
    }

    /// The act buffer's first |A| rows, as the record `saved` of the context's forward sizes them.
    fn act_buffer_to_host(&self, saved: Option<SavedForward>) -> Result<Vec<T>> {
        let f = saved.map_or(0, |s| s.config.ffn);
        self.experts
            .act
            .prefix_to_host(self.dispatched_pairs()? * f)
    }

    /// y = act Wd of every pair, [|A|, H], in dispatch order, as the combine reads it: summed
    /// in f32 and rounded once to the activation type `T` (docs/SPEC.md, section 2; in f16 an
    /// element beyond 65504 is infinite). Widen with `to_f32` for arithmetic; the conversion is
    /// exact.
    pub fn expert_out_to_host(&self) -> Result<Vec<T>> {
        let h = self.saved_forward().map_or(0, |s| s.config.hidden);
        self.experts.y.prefix_to_host(self.dispatched_pairs()? * h)
    }

    /// Overwrites every workspace buffer with 0xFF bytes (NaN floats, -1 indices). For tests:
    /// after a warm-up forward, poison, run the same shapes again (no reallocation happens) and
    /// any element a kernel failed to write shows up. The device error word is left alone (it
    /// is state, not scratch). The buffers then hold no forward's state: the context forgets
    /// its last forward (a backward is refused until the next forward; a graph's replay
    /// writes its own forward's state again).
    #[doc(hidden)]
    pub fn poison_workspace(&mut self) -> Result<()> {
        let cell = self.record.clone();
        let mut rec = cell.lock();
        if graph::mode(&self.dev)? != Mode::Eager {
            return Err(Error::CaptureUnsupported(
                "poison_workspace is not captured into graphs".into(),
            ));
        }
        rec.saved = None;
        self.routing.poison()?;
        self.experts.poison()?;
        self.bwd.poison()
    }

    /// A host-given coefficient goes to the context's device scalar, which the kernels read
    /// (an adaptive one already lives on the device).
    pub(crate) fn upload_fixed_coeff(&mut self, coeff: &Coefficient) -> Result<()> {
        if let Coefficient::Fixed(v) = *coeff {
            let dev = self.dev.clone();
            let mut l = Launch::on(&dev);
            let p = l.output_raw("coefficient", &mut self.coeff, 1)?;
            // SAFETY: p points at the context's one-f64 coefficient buffer (checked by `l`).
            let code = unsafe { ffi::remoe_fill_f64(p, v, l.stream()) };
            ffi::check("fill_f64", code)?;
        }
        Ok(())
    }

    pub(crate) fn grow<E: crate::tensor::Element>(
        dev: &Device,
        allocations: &mut u64,
        buf: &mut GrowBuf<E>,
        n: usize,
    ) -> Result<()> {
        if buf.ensure(dev, n)? {
            *allocations += 1;
        }
        Ok(())
    }
}

/// The ReMoE layer forward: `out` = the layer's output; the statistics
/// ([`MoeContext::stats`]) carry the L1 regulariser's value at `lambda` (fixed, or the adaptive
/// controller's, which then records this layer's sparsity). See [`moe_forward`].
///
/// ```
/// use half::bf16;
/// use remoe_kernels::{remoe_forward, Coefficient, Device, DeviceTensor, LayerConfig};
/// use remoe_kernels::{MoeContext, MoeWeights, Result};
///
/// /// The layer's output for `x` [T,H] at a fixed lambda. Keep `ctx` (made with
/// /// `MoeContext::new(dev)` for inference, `for_training` before a backward) for the next
/// /// batch: its buffers are reused.
/// fn forward(
///     dev: &Device,
///     ctx: &mut MoeContext<bf16>,
///     cfg: &LayerConfig,
///     x: &DeviceTensor<bf16>,
///     weights: &MoeWeights<'_, bf16>,
/// ) -> Result<DeviceTensor<bf16>> {
///     let mut out = DeviceTensor::zeros(dev, &[cfg.tokens, cfg.hidden])?;
///     remoe_forward(ctx, cfg, Coefficient::Fixed(1e-3), x, weights, &mut out)?;
///     // Enqueued only; the statistics are read (waiting for the GPU) when asked for.
///     let stats = ctx.stats()?;
///     println!("{} routed pairs, sparsity {:.3}", stats.active_pairs, stats.sparsity);
///     Ok(out)
/// }
/// ```
pub fn remoe_forward<'x, 'w, T: HalfElement>(
    ctx: &mut MoeContext<T>,
    cfg: &LayerConfig,
    lambda: Coefficient,
    x: impl Into<TensorView<'x, T>>,
    w: impl Into<MoeWeightViews<'w, T>>,
    out: &mut DeviceTensor<T>,
) -> Result<()> {
    moe_forward(ctx, cfg, RouterKind::Relu, lambda, x, w, out)
}

/// The TopK baseline forward (the selected probabilities as gates, no renormalisation); the
/// statistics ([`MoeContext::stats`]) carry the Switch aux loss at `aux_coeff`. Renormalised
/// gates (Mixtral) are [`moe_forward`] with [`RouterKind::TopKNormalized`].
pub fn topk_forward<'x, 'w, T: HalfElement>(
    ctx: &mut MoeContext<T>,
    cfg: &LayerConfig,
    aux_coeff: f64,
    x: impl Into<TensorView<'x, T>>,
    w: impl Into<MoeWeightViews<'w, T>>,
    out: &mut DeviceTensor<T>,
) -> Result<()> {
    moe_forward(
        ctx,
        cfg,
        RouterKind::TopK,
        Coefficient::Fixed(aux_coeff),
        x,
        w,
        out,
    )
}

fn check_inputs<T: HalfElement>(
    ctx: &MoeContext<T>,
    cfg: &LayerConfig,
    router: RouterKind,
    coeff: &Coefficient,
    x: &TensorView<T>,
    w: &MoeWeightViews<T>,
    out: &DeviceTensor<T>,
) -> Result<()> {
    check_config(cfg, router)?;
    check_layer_tensors(ctx, cfg, cfg.experts, x, w)?;
    check_coefficient(ctx, coeff)?;
    check_out(ctx, cfg, out)
}

/// A configuration the kernels take with this router.
pub(crate) fn check_config(cfg: &LayerConfig, router: RouterKind) -> Result<()> {
    cfg.validate_for_gpu()?;
    if router.is_topk() && cfg.experts > TOPK_MAX_EXPERTS {
        return Err(Error::InvalidConfig(format!(
            "the TopK kernel takes at most {TOPK_MAX_EXPERTS} experts, got {}",
            cfg.experts
        )));
    }
    Ok(())
}

/// The layer's output, [T, H] in the context's device.
pub(crate) fn check_out<T: HalfElement>(
    ctx: &MoeContext<T>,
    cfg: &LayerConfig,
    out: &DeviceTensor<T>,
) -> Result<()> {
    out.expect_shape("out", &[cfg.tokens, cfg.hidden])?;
    out.expect_device("out", &ctx.dev)
}

/// A coefficient the kernels can read: a fixed value in range (see
/// [`Coefficient::validate`]), or a controller in the context's device.
pub(crate) fn check_coefficient<T: HalfElement>(
    ctx: &MoeContext<T>,
    coeff: &Coefficient,
) -> Result<()> {
    coeff.validate()?;
    match coeff {
        Coefficient::Fixed(_) => Ok(()),
        Coefficient::Adaptive(c) => c.expect_device(&ctx.dev),
    }
}

/// The checks the forward and the backward share: `x` [T, H] and the weights in their layout,
/// all in the context's device. The router weight covers all E experts; the expert weights the
/// `held` experts this call runs (E on one GPU, E/R on an expert-parallel rank).
pub(crate) fn check_layer_tensors<T: HalfElement>(
    ctx: &MoeContext<T>,
    cfg: &LayerConfig,
    held: usize,
    x: &TensorView<T>,
    w: &MoeWeightViews<T>,
) -> Result<()> {
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    let tensors: [(&'static str, &TensorView<T>, &[usize]); 5] = [
        ("x", x, &[t, h]),
        ("router weight", &w.router, &[h, e]),
        ("gate weight", &w.gate, &[held, h, f]),
        ("up weight", &w.up, &[held, h, f]),
        ("down weight", &w.down, &[held, f, h]),
    ];
    for (what, tensor, shape) in tensors {
        tensor.expect_shape(what, shape)?;
        tensor.expect_device(what, &ctx.dev)?;
    }
    Ok(())
}

/// The layer forward with either router, on the context's device and stream. `coeff` is lambda
/// (ReMoE) or c (TopK); it scales the balance loss of the statistics, and an adaptive controller
/// also records the layer's sparsity. `x` and the weights are `&DeviceTensor`s (`&MoeWeights`)
/// or views ([`TensorView`], [`MoeWeightViews`]).
///
/// Enqueues the forward and returns. Eager, it reads one number back when its pair capacity
/// does not cover every pair (see [`crate::capacity`]): the routed-pair count, after the
/// routing statistics, to size the pair buffers for exactly that many pairs. So an eager forward
/// is dropless at any density and never overflows. Captured into a CUDA graph (once the context
/// is warm: its buffers sized by an earlier forward of the same or a larger batch), nothing is
/// read back and the capacity is fixed; an overflow is then the deferred error below. The
/// statistics come from [`MoeContext::stats`].
///
/// On `Ok` the context holds this forward's [`SavedForward`]. Bad input is refused before
/// anything is enqueued and leaves the context as it was; a failure after that (a launch or
/// driver error, more pairs than a fixed [`PairCapacity::Pairs`], an allocation that does not
/// fit) leaves the context without saved state, so no backward can run on a half-written
/// workspace. What only the device can know (in a replayed graph, an overflow of the pair
/// capacity; a non-finite logit) is reported by the next host-visible call of the context.
pub fn moe_forward<'x, 'w, T: HalfElement>(
    ctx: &mut MoeContext<T>,
    cfg: &LayerConfig,
    router: RouterKind,
    mut coeff: Coefficient,
    x: impl Into<TensorView<'x, T>>,
    w: impl Into<MoeWeightViews<'w, T>>,
    out: &mut DeviceTensor<T>,
) -> Result<()> {
    let (x, w) = (x.into(), w.into());
    check_inputs(ctx, cfg, router, &coeff, &x, &w, out)?;
    let mode = graph::mode(&ctx.dev)?;
    if ctx.stage_timing && mode != Mode::Eager {
        return Err(Error::CaptureUnsupported(
            "stage timing waits for its events; turn it off to capture a forward".into(),
        ));
    }
    // Before the allocation count below: the sync words are a new buffer, not a moved one, so
    // they must not make a graph captured before them refuse to replay.
    crate::decode::prepare_for_auto(ctx, cfg, router, mode);
    // The record stays locked while the forward is enqueued, so that a graph replayed from
    // another thread cannot interleave its record with this forward's.
    let cell = ctx.record.clone();
    let mut rec = cell.lock();
    rec.note_call(mode, &cell, true);
    let mut plan = ForwardPlan::new(ctx, cfg, router, mode);
    // From here on the workspace is rewritten: the previous forward's saved state is gone, and
    // this forward's is recorded only once it has been enqueued.
    rec.saved = None;
    let allocations = ctx.allocations;
    let ran = forward_stages(ctx, &mut plan, &mut coeff, &x, &w, out);
    if ctx.allocations != allocations {
        rec.layout += 1;
    }
    ran?;
    rec.saved = Some(plan.record(ctx));
    Ok(())
}

/// The forward's stages in order, sizing each buffer once its size is known.
fn forward_stages<T: HalfElement>(
    ctx: &mut MoeContext<T>,
    plan: &mut ForwardPlan,
    coeff: &mut Coefficient,
    x: &TensorView<T>,
    w: &MoeWeightViews<T>,
    out: &mut DeviceTensor<T>,
) -> Result<()> {
    if crate::decode::try_forward(ctx, plan, coeff, x, w, out)? {
        return Ok(());
    }
    plan.size_routing(ctx)?;
    ctx.upload_fixed_coeff(coeff)?;
    let dev = ctx.dev.clone();
    let mut marks = StageMarks::new(&dev, ctx.stage_timing)?;
    plan.router(ctx, x, w)?;
    marks.mark()?;
    plan.routing_stats(ctx, coeff)?;
    marks.mark()?;
    plan.compaction(ctx)?;
    marks.mark()?;
    plan.size_experts(ctx)?;
    plan.up_projection(ctx, x, w)?;
    marks.mark()?;
    plan.down_projection(ctx, w)?;
    marks.mark()?;
    plan.combine(ctx, out)?;
    marks.mark()?;
    ctx.stage_times = marks.finish()?;
    Ok(())
}

/// The device's memory in bytes (what caps [`PairCapacity::Auto`]'s budget); 0 if the driver
/// cannot say, which makes every eager forward count its pairs. A device query, not a context
/// or stream operation, so that it is allowed while a stream is being captured.
fn device_memory(dev: &Device) -> usize {
    dev.context().total_mem().unwrap_or(0)
}

/// One forward's sizes: the shapes, the pair capacity and the GEMM grids' row-tile bound, all
/// known on the host before anything runs, except in an eager forward whose capacity policy
/// does not cover every pair: there the capacity is the routed-pair count, read back after the
/// routing statistics ([`ForwardPlan::routing_stats`]). Each method enqueues one stage.
pub(crate) struct ForwardPlan {
    cfg: LayerConfig,
    router: RouterKind,
    /// Router blocks of 64 tokens.
    blocks: usize,
    /// Pairs the pair buffers hold (until counted: T E, what the statistics may see).
    pub(crate) cap: usize,
    /// The most row tiles `cap` pairs can make.
    pub(crate) max_tiles: usize,
    /// The down projection's split-K ranges (above 1, the f32 partial sums hold this many planes
    /// of cap x H).
    pub(crate) k_splits: usize,
    /// Whether g and u are written (fixed at the start, recorded at the end).
    pub(crate) save: bool,
    /// Whether |A| is read back after the routing statistics (see [`Count`]).
    count: Option<Count>,
    /// Eager or captured.
    pub(crate) mode: Mode,
}

/// What an eager forward does with the routed-pair count it reads back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Count {
    /// [`PairCapacity::Auto`]: the pair buffers hold exactly |A| pairs.
    Exact,
    /// [`PairCapacity::Pairs`]: they hold this many, and more pairs is the forward's error.
    Fixed(usize),
}

impl ForwardPlan {
    pub(crate) fn new<T: HalfElement>(
        ctx: &MoeContext<T>,
        cfg: &LayerConfig,
        router: RouterKind,
        mode: Mode,
    ) -> Self {
        let save = ctx.save_for_backward;
        let worst = cfg.tokens * cfg.experts;
        let elem = std::mem::size_of::<T>();
        let policy = ctx
            .capacity
            .pairs_for(cfg, save, elem, device_memory(&ctx.dev));
        // The pairs every per-pair buffer of a forward can hold now without growing.
        let f = cfg.ffn.max(1);
        let mut held = [
            ctx.routing.pair_token.capacity(),
            ctx.routing.pair_gate.capacity(),
            ctx.experts.act.capacity() / f,
        ]
        .into_iter()
        .min()
        .unwrap_or(0);
        if save {
            held = held.min(ctx.experts.g.capacity().min(ctx.experts.u.capacity()) / f);
        }
        let (cap, count) = match (mode, ctx.capacity) {
            // A TopK router selects exactly k of each token's experts (fewer only where logits
            // are not finite): k T pairs, known without counting.
            (_, PairCapacity::Auto { .. }) if router.is_topk() => {
                ((cfg.k * cfg.tokens).min(worst), None)
            }
            // The buffers hold every pair the router can make: nothing to count (a fixed
            // capacity below that is the user's limit, checked whatever the buffers hold).
            _ if policy >= worst => (worst, None),
            // Until counted, the statistics may see every pair.
            (Mode::Eager, PairCapacity::Pairs(n)) => (worst, Some(Count::Fixed(n.min(worst)))),
            // A dense forward made the buffers grow to every pair: nothing to count.
            (Mode::Eager, PairCapacity::Auto { .. }) if held >= worst => (worst, None),
            (Mode::Eager, PairCapacity::Auto { .. }) => (worst, Some(Count::Exact)),
            // Captured: a fixed capacity; what an eager warm-up sized the buffers for, when
            // more than the policy's.
            (Mode::Capture(_), PairCapacity::Auto { .. }) => (policy.max(held).min(worst), None),
            (Mode::Capture(_), PairCapacity::Pairs(_)) => (policy, None),
        };
        Self {
            cfg: *cfg,
            router,
            blocks: cfg.tokens.div_ceil(ROUTER_BLOCK),
            cap,
            max_tiles: max_row_tiles(cap, cfg.experts, TILE_ROWS),
            k_splits: down_k_splits(cfg, cap),
            save,
            count,
            mode,
        }
    }

    /// The forward's layer configuration.
    pub(crate) fn config(&self) -> &LayerConfig {
        &self.cfg
    }

    /// The forward's router.
    pub(crate) fn router_kind(&self) -> RouterKind {
        self.router
    }

    /// Whether the pair buffers hold every pair the router can make (T E), known without
    /// counting: what the small-batch path needs (its dispatch never overflows).
    pub(crate) fn covers_every_pair(&self) -> bool {
        self.count.is_none() && self.cap == self.cfg.tokens * self.cfg.experts
    }

    /// The record of the enqueued forward (what a backward checks); counts the generation.
    pub(crate) fn record<T: HalfElement>(&self, ctx: &mut MoeContext<T>) -> SavedForward {
        ctx.generation += 1;
        SavedForward {
            config: self.cfg,
            router: self.router,
            capacity: self.cap,
            max_tiles: self.max_tiles,
            saved_for_backward: self.save,
            generation: ctx.generation,
            lens: SavedLens::of(&self.cfg, self.router, self.cap, self.save),
            act_gated: false,
        }
    }

    /// The i32 sizes the launchers take: exact, since validate_for_gpu bounds T*H, T*E, H*E and
    /// E*H*F (so every factor) by i32::MAX, and cap <= T*E.
    fn dims(&self) -> (i32, i32, i32, i32, i32) {
        let c = &self.cfg;
        (
            c.tokens as i32,
            c.hidden as i32,
            c.ffn as i32,
            c.experts as i32,
            c.k as i32,
        )
    }

    /// The router's and the routing statistics' buffers, sized by T and E. (The pair lists and
    /// y follow once the capacity is known, in [`ForwardPlan::routing_stats`]: with them, all
    /// an expert-parallel source needs, whose experts run on their owners.)
    pub(crate) fn size_routing<T: HalfElement>(&self, ctx: &mut MoeContext<T>) -> Result<()> {
        let LayerConfig {
            tokens: t,
            experts: e,
            ..
        } = self.cfg;
        let blocks = self.blocks;
        let dev = ctx.dev.clone();
        let c = &mut *ctx;
        let a = &mut c.allocations;
        MoeContext::<T>::grow(&dev, a, &mut c.routing.logits, t * e)?;
        MoeContext::<T>::grow(&dev, a, &mut c.routing.gates, t * e)?;
        let probs = if self.router.is_topk() { t * e } else { 0 };
        MoeContext::<T>::grow(&dev, a, &mut c.routing.probs, probs)?;
        MoeContext::<T>::grow(&dev, a, &mut c.routing.block_counts, blocks * e)?;
        MoeContext::<T>::grow(&dev, a, &mut c.routing.block_sums, blocks * e)?;
        MoeContext::<T>::grow(&dev, a, &mut c.routing.block_offsets, blocks * e)?;
        MoeContext::<T>::grow(&dev, a, &mut c.routing.counts, e)?;
        MoeContext::<T>::grow(&dev, a, &mut c.routing.gate_sums, e)?;
        MoeContext::<T>::grow(&dev, a, &mut c.routing.expert_offsets, e + 1)?;
        MoeContext::<T>::grow(&dev, a, &mut c.routing.tile_offsets, e + 1)?;
        MoeContext::<T>::grow(&dev, a, &mut c.routing.stats_u32, 4)?;
        MoeContext::<T>::grow(&dev, a, &mut c.routing.stats_f32, 2)?;
        MoeContext::<T>::grow(&dev, a, &mut c.routing.pair_index, t * e)?;
        MoeContext::<T>::grow(&dev, a, &mut c.coeff, 1)?;
        // Allocated zeroed once (no error), then only ever cleared: ensure keeps contents.
        MoeContext::<T>::grow(&dev, a, &mut c.device_errors, ERROR_WORDS)?;
        // Likewise zero between the row GEMMs, which an expert-parallel rank runs as an owner.
        MoeContext::<T>::grow(&dev, a, &mut c.row_sched, ROW_SCHED_WORDS)
    }

    /// The pair lists and the expert outputs y, for `cap` pairs.
    pub(crate) fn size_pairs<T: HalfElement>(&self, ctx: &mut MoeContext<T>) -> Result<()> {
        let (h, cap) = (self.cfg.hidden, self.cap);
        let dev = ctx.dev.clone();
        let c = &mut *ctx;
        let a = &mut c.allocations;
        MoeContext::<T>::grow(&dev, a, &mut c.routing.pair_token, cap)?;
        MoeContext::<T>::grow(&dev, a, &mut c.routing.pair_gate, cap)?;
        MoeContext::<T>::grow(&dev, a, &mut c.experts.y, cap * h)
    }

    /// An eager forward whose capacity does not cover every pair: |A| and the row tiles, read
    /// back (the one wait of such a forward), become the capacity and the grids' bound.
    fn count_pairs<T: HalfElement>(&mut self, ctx: &MoeContext<T>, count: Count) -> Result<()> {
        let counted = ctx.routing.stats_u32.prefix_to_host(2)?;
        let (pairs, tiles) = (counted[0] as usize, counted[1] as usize);
        (self.cap, self.max_tiles) = match count {
            Count::Exact => (pairs, tiles),
            Count::Fixed(n) if pairs <= n => (n, max_row_tiles(n, self.cfg.experts, TILE_ROWS)),
            Count::Fixed(n) => {
                return Err(Error::CapacityExceeded {
                    needed: pairs,
                    capacity: n,
                })
            }
        };
        self.k_splits = down_k_splits(&self.cfg, self.cap);
        Ok(())
    }

    /// The experts' own buffers: act, the down projection's split-K partial sums where it
    /// splits, and g and u when saving. (An expert-parallel rank's own context never needs
    /// them: its pairs run on their owners, in the owners' `EpContext` buffers.)
    pub(crate) fn size_experts<T: HalfElement>(&self, ctx: &mut MoeContext<T>) -> Result<()> {
        let (h, f, cap) = (self.cfg.hidden, self.cfg.ffn, self.cap);
        let dev = ctx.dev.clone();
        let c = &mut *ctx;
        let a = &mut c.allocations;
        MoeContext::<T>::grow(&dev, a, &mut c.experts.act, cap * f)?;
        // Planes for this forward and for every smaller one, so that this forward warms the
        // context for a capture at a smaller T that splits where this one does not.
        let partials = split_k_partials(self.k_splits, cap, h)
            .max(c.capacity.split_k_partials_up_to(&self.cfg));
        MoeContext::<T>::grow(&dev, a, &mut c.experts.y_partials, partials)?;
        let saved = if self.save { cap * f } else { 0 };
        MoeContext::<T>::grow(&dev, a, &mut c.experts.g, saved)?;
        MoeContext::<T>::grow(&dev, a, &mut c.experts.u, saved)
    }

    /// The router GEMM and its tail: logits, gates (or probs) and per-block statistics.
    pub(crate) fn router<T: HalfElement>(
        &self,
        ctx: &mut MoeContext<T>,
        x: &TensorView<T>,
        w: &MoeWeightViews<T>,
    ) -> Result<()> {
        let (t, h, e, blocks) = (
            self.cfg.tokens,
            self.cfg.hidden,
            self.cfg.experts,
            self.blocks,
        );
        if t == 0 {
            return Ok(());
        }
        let (ti, hi, _, ei, ki) = self.dims();
        let dev = ctx.dev.clone();
        {
            let mut l = Launch::on(&dev);
            let xp = l.input("x", x, t * h)?;
            let wp = l.input("router weight", &w.router, h * e)?;
            let lp = l.output("logits", &mut ctx.routing.logits, t * e)?;
            let (gp, bc, bs) = match self.router {
                // The ReLU router writes the gates and the statistics itself.
                RouterKind::Relu => (
                    l.output("gates", &mut ctx.routing.gates, t * e)?,
                    l.output("block counts", &mut ctx.routing.block_counts, blocks * e)?,
                    l.output("block sums", &mut ctx.routing.block_sums, blocks * e)?,
                ),
                // TopK: only the logits matter here; the ReLU gates land in the probs buffer,
                // which the softmax tail overwrites.
                RouterKind::TopK | RouterKind::TopKNormalized => (
                    l.output("probs", &mut ctx.routing.probs, t * e)?,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                ),
            };
            let ef = l.output_raw("error word", &mut ctx.device_errors, 2)?;
            // SAFETY: `l` checked every buffer for the elements the kernel accesses: x t*h, wr
            // h*e, logits and gates/probs t*e, the block buffers ceil(t/64)*e, the error word's
            // first 2; the i32 sizes are exact (dims); H % 8 == 0 and the checked 16-byte
            // aligned bases keep the vector loads aligned.
            let code = unsafe {
                T::ROUTER_FORWARD(
                    xp as *const u16,
                    wp as *const u16,
                    lp,
                    gp,
                    bc,
                    bs,
                    ef,
                    ti,
                    hi,
                    ei,
                    l.stream(),
                )
            };
            ffi::check("router_forward", code)?;
        }
        if self.router.is_topk() {
            let normalize = i32::from(self.router == RouterKind::TopKNormalized);
            let mut l = Launch::on(&dev);
            let lp = l.input("logits", &ctx.routing.logits, t * e)?;
            let pp = l.output("probs", &mut ctx.routing.probs, t * e)?;
            let gp = l.output("gates", &mut ctx.routing.gates, t * e)?;
            let bc = l.output("block counts", &mut ctx.routing.block_counts, blocks * e)?;
            let bs = l.output("block sums", &mut ctx.routing.block_sums, blocks * e)?;
            // SAFETY: logits, probs, gates hold t*e f32, the block buffers ceil(t/64)*e
            // (checked by `l`); 1 <= k <= e <= 512 was checked.
            let code = unsafe {
                ffi::remoe_topk_softmax(lp, pp, gp, bc, bs, ti, ei, ki, normalize, l.stream())
            };
            ffi::check("topk_softmax", code)?;
        }
        Ok(())
    }

    /// n_e, the offsets, the statistics; the capacity check (an overflow publishes an empty
    /// dispatch and raises the error word); then, when counting, the capacity from |A|; then
    /// the pair buffers sized for the capacity.
    pub(crate) fn routing_stats<T: HalfElement>(
        &mut self,
        ctx: &mut MoeContext<T>,
        coeff: &mut Coefficient,
    ) -> Result<()> {
        self.enqueue_routing_stats(ctx, coeff)?;
        if let Some(count) = self.count {
            self.count_pairs(ctx, count)?;
        }
        self.size_pairs(ctx)
    }

    fn enqueue_routing_stats<T: HalfElement>(
        &self,
        ctx: &mut MoeContext<T>,
        coeff: &mut Coefficient,
    ) -> Result<()> {
        let (e, blocks) = (self.cfg.experts, self.blocks);
        let (ti, _, _, ei, ki) = self.dims();
        let dev = ctx.dev.clone();
        let mut l = Launch::on(&dev);
        let bc = l.input("block counts", &ctx.routing.block_counts, blocks * e)?;
        let bs = l.input("block sums", &ctx.routing.block_sums, blocks * e)?;
        let bo = l.output("block offsets", &mut ctx.routing.block_offsets, blocks * e)?;
        let cn = l.output("counts", &mut ctx.routing.counts, e)?;
        let gs = l.output("gate sums", &mut ctx.routing.gate_sums, e)?;
        let eo = l.output("expert offsets", &mut ctx.routing.expert_offsets, e + 1)?;
        let to = l.output("tile offsets", &mut ctx.routing.tile_offsets, e + 1)?;
        let su = l.output("stats", &mut ctx.routing.stats_u32, 4)?;
        let sf = l.output("stats", &mut ctx.routing.stats_f32, 2)?;
        let ef = l.output_raw("error word", &mut ctx.device_errors, ERROR_WORDS)?;
        let (cp, sum, cnt) = match coeff {
            Coefficient::Fixed(_) => (
                l.input_raw("coefficient", &ctx.coeff, 1)?,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            ),
            Coefficient::Adaptive(c) => (
                l.input_raw("lambda", &c.lambda, 1)?,
                l.output_raw("sparsity sum", &mut c.sparsity_sum, 1)?,
                l.output_raw("sparsity count", &mut c.count, 1)?,
            ),
        };
        // SAFETY: buffer sizes as documented in remoe_kernels.h for this t and e, checked by
        // `l`; cp points at one f64, sum and cnt at one f64 and one u32 (or are null), ef at the
        // four-word error word; the controller's buffers are in this context (check_inputs);
        // cap <= T*E fits in i32.
        let code = unsafe {
            ffi::remoe_routing_stats(
                bc,
                bs,
                bo,
                cn,
                gs,
                eo,
                to,
                su,
                sf,
                ti,
                ei,
                ki,
                cp,
                sum,
                cnt,
                ef,
                self.cap as i32,
                l.stream(),
            )
        };
        ffi::check("routing_stats", code)
    }

    pub(crate) fn compaction<T: HalfElement>(&self, ctx: &mut MoeContext<T>) -> Result<()> {
        let (t, e, blocks, cap) = (self.cfg.tokens, self.cfg.experts, self.blocks, self.cap);
        if t == 0 {
            return Ok(());
        }
        let (ti, _, _, ei, _) = self.dims();
        let dev = ctx.dev.clone();
        let mut l = Launch::on(&dev);
        let gp = l.input("gates", &ctx.routing.gates, t * e)?;
        let bo = l.input("block offsets", &ctx.routing.block_offsets, blocks * e)?;
        let eo = l.input("expert offsets", &ctx.routing.expert_offsets, e + 1)?;
        let pt = l.output("pair tokens", &mut ctx.routing.pair_token, cap)?;
        let pg = l.output("pair gates", &mut ctx.routing.pair_gate, cap)?;
        let pi = l.output("pair index", &mut ctx.routing.pair_index, t * e)?;
        // SAFETY: pair_token and pair_gate hold cap elements and the offsets describe at most cap
        // pairs (routing_stats publishes an empty dispatch past it), pair_index t*e; gates t*e;
        // block offsets ceil(t/64)*e (all checked by `l`).
        let code = unsafe { ffi::remoe_compact_pairs(gp, bo, eo, pt, pg, pi, ti, ei, l.stream()) };
        ffi::check("compact_pairs", code)
    }

    /// The expert batch of this forward's own dispatch (the context's pair buffers).
    fn batch<'a>(
        &self,
        pair_token: &'a GrowBuf<u32>,
        expert_offsets: &'a GrowBuf<u32>,
        tile_offsets: &'a GrowBuf<u32>,
    ) -> ExpertBatch<'a> {
        ExpertBatch {
            pair_row: pair_token,
            expert_offsets,
            tile_offsets,
            experts: self.cfg.experts,
            cap: self.cap,
            max_tiles: self.max_tiles,
            hidden: self.cfg.hidden,
            ffn: self.cfg.ffn,
        }
    }

    fn up_projection<T: HalfElement>(
        &self,
        ctx: &mut MoeContext<T>,
        x: &TensorView<T>,
        w: &MoeWeightViews<T>,
    ) -> Result<()> {
        let gemms = ctx.gemm_path()?.gemms::<T>();
        let dev = ctx.dev.clone();
        let MoeContext {
            routing,
            experts,
            row_sched,
            ..
        } = ctx;
        let RoutingBufs {
            pair_token,
            expert_offsets,
            tile_offsets,
            ..
        } = routing;
        let ExpertBufs { act, g, u, .. } = experts;
        let batch = self.batch(pair_token, expert_offsets, tile_offsets);
        let saved = if self.save { Some((g, u)) } else { None };
        batch.up_swiglu(
            &dev,
            &gemms,
            x,
            self.cfg.tokens,
            (&w.gate, &w.up),
            act,
            saved,
            row_sched,
        )
    }

    fn down_projection<T: HalfElement>(
        &self,
        ctx: &mut MoeContext<T>,
        w: &MoeWeightViews<T>,
    ) -> Result<()> {
        let gemms = ctx.gemm_path()?.gemms::<T>();
        let dev = ctx.dev.clone();
        let MoeContext {
            routing,
            experts,
            row_sched,
            ..
        } = ctx;
        let RoutingBufs {
            pair_token,
            expert_offsets,
            tile_offsets,
            ..
        } = routing;
        let ExpertBufs {
            act, y, y_partials, ..
        } = experts;
        let batch = self.batch(pair_token, expert_offsets, tile_offsets);
        let out = (y, y_partials);
        batch.down(&dev, &gemms, act, &w.down, self.k_splits, out, row_sched)
    }

    /// The gate-weighted combine (also with no pairs: it writes the zeros).
    pub(crate) fn combine<T: HalfElement>(
        &self,
        ctx: &mut MoeContext<T>,
        out: &mut DeviceTensor<T>,
    ) -> Result<()> {
        let (t, h, e, cap) = (self.cfg.tokens, self.cfg.hidden, self.cfg.experts, self.cap);
        if t == 0 {
            return Ok(());
        }
        let (ti, hi, _, ei, _) = self.dims();
        let dev = ctx.dev.clone();
        let mut l = Launch::on(&dev);
        let yp = l.input("expert out", &ctx.experts.y, cap * h)? as *const u16;
        let gp = l.input("gates", &ctx.routing.gates, t * e)?;
        let pi = l.input("pair index", &ctx.routing.pair_index, t * e)?;
        let op = l.output("out", &mut *out, t * h)?;
        // SAFETY: y cap*h, gates and pair index t*e, out [t,h] (checked by `l`); every pair
        // index is -1 or < |A| <= cap (the compaction wrote them from the same offsets).
        let code = unsafe { T::COMBINE(yp, gp, pi, op as *mut u16, ti, hi, ei, l.stream()) };
        ffi::check("combine", code)
    }
}

/// CUDA events between the stages of one forward, when stage timing is on.
struct StageMarks<'a> {
    dev: &'a Device,
    events: Option<Vec<cudarc::driver::CudaEvent>>,
}

impl<'a> StageMarks<'a> {
    fn new(dev: &'a Device, on: bool) -> Result<Self> {
        let mut marks = Self {
            dev,
            events: on.then(Vec::new),
        };
        marks.mark()?;
        Ok(marks)
    }

    fn mark(&mut self) -> Result<()> {
        if let Some(events) = self.events.as_mut() {
            let ev = self
                .dev
                .context()
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            ev.record(self.dev.stream())?;
            events.push(ev);
        }
        Ok(())
    }

    fn finish(self) -> Result<Option<StageTimes>> {
        let Some(ev) = self.events else {
            return Ok(None);
        };
        ev.last().expect("marks were recorded").synchronize()?;
        let ms = |i: usize| -> Result<f64> { Ok(ev[i].elapsed_ms(&ev[i + 1])? as f64) };
        Ok(Some(StageTimes {
            router_ms: ms(0)?,
            stats_ms: ms(1)?,
            compaction_ms: ms(2)?,
            up_ms: ms(3)?,
            down_ms: ms(4)?,
            combine_ms: ms(5)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(saved_for_backward: bool) -> SavedForward {
        let cfg = LayerConfig::new(16, 64, 64, 8, 1);
        SavedForward {
            config: cfg,
            router: RouterKind::Relu,
            capacity: 20,
            max_tiles: max_row_tiles(20, 8, TILE_ROWS),
            saved_for_backward,
            generation: 1,
            lens: SavedLens::of(&cfg, RouterKind::Relu, 20, saved_for_backward),
            act_gated: false,
        }
    }

    /// A record of the same forward with another capacity (and so other buffer lengths).
    fn with_capacity(r: &SavedForward, capacity: usize) -> SavedForward {
        SavedForward {
            capacity,
            max_tiles: max_row_tiles(capacity, r.config.experts, TILE_ROWS),
            lens: SavedLens::of(&r.config, r.router, capacity, r.saved_for_backward),
            ..r.clone()
        }
    }

    /// Issue 27 2(a), 2(b) at the level of the record: a capture runs nothing, so its context
    /// ends it holding the record it had; a replay installs the record of the forward it ran;
    /// a replay over buffers that moved (a reallocation, a dropped context) is refused.
    #[test]
    fn a_capture_leaves_the_devices_record_and_a_replay_installs_its_own() {
        let cell = Arc::new(RecordCell::default());
        let before = record(true);
        let captured = SavedForward {
            generation: 2,
            ..with_capacity(&before, 40)
        };
        cell.lock().saved = Some(before.clone());
        {
            let mut rec = cell.lock();
            rec.note_call(Mode::Capture(7), &cell, true);
            rec.saved = Some(captured.clone());
            // The capture's own backward reads the capture's forward: nothing is required of
            // the record a replay finds.
            rec.note_call(Mode::Capture(7), &cell, false);
        }
        let part = cell.clone().end_capture(7);
        assert_eq!(cell.lock().saved, Some(before.clone()));
        // Eager calls in between leave other records; the replay installs its own.
        cell.lock().saved = None;
        part.begin_replay().unwrap().replayed();
        assert_eq!(cell.lock().saved, Some(captured.clone()));
        cell.lock().layout += 1;
        assert!(matches!(
            part.begin_replay(),
            Err(Error::CaptureUnsupported(_))
        ));
    }

    /// A graph whose first use of a context is a backward replays only while the context holds
    /// a forward of the same shapes and capacity as the one that backward was captured after.
    #[test]
    fn a_captured_backward_replays_only_over_the_forward_it_read() {
        let cell = Arc::new(RecordCell::default());
        let read = record(true);
        cell.lock().saved = Some(read.clone());
        cell.lock().note_call(Mode::Capture(8), &cell, false);
        let part = cell.clone().end_capture(8);
        part.begin_replay().unwrap().replayed();
        // The same state from a later forward (another generation) will do.
        cell.lock().saved = Some(SavedForward {
            generation: 9,
            ..read.clone()
        });
        part.begin_replay().unwrap().replayed();
        for other in [Some(with_capacity(&read, 21)), None] {
            cell.lock().saved = other;
            assert!(matches!(
                part.begin_replay(),
                Err(Error::CaptureUnsupported(_))
            ));
        }
    }

    /// Issue 10 (a) and (c) at the level of the record: the backward goes by what the forward
    /// saved, and there is nothing to go by after a failed forward.
    #[test]
    fn the_backward_needs_a_record_of_a_forward_that_saved_g_and_u() {
        assert!(matches!(
            SavedForward::for_backward(None),
            Err(Error::InvalidConfig(_))
        ));
        let inference = record(false);
        assert!(matches!(
            SavedForward::for_backward(Some(&inference)),
            Err(Error::InvalidConfig(_))
        ));
        let training = record(true);
        assert_eq!(
            SavedForward::for_backward(Some(&training)).unwrap(),
            &training
        );
    }

    #[test]
    fn the_record_holds_the_saved_buffers_lengths() {
        let cfg = LayerConfig::new(700, 64, 128, 8, 2);
        let l = SavedLens::of(&cfg, RouterKind::Relu, 300, true);
        assert_eq!(
            (l.logits, l.probs, l.g, l.u),
            (700 * 8, 0, 300 * 128, 300 * 128)
        );
        let (t, e, f, p) = (700, 8, 128, 300);
        // As documented for saved_bytes (bf16 activations): no act, no y.
        let want = t * e * 12 + 4 * e + 2 * 4 * (e + 1) + p * (8 + 4 * f);
        assert_eq!(l.bytes(2), want);
        let inference = SavedLens::of(&cfg, RouterKind::TopK, 300, false);
        assert_eq!((inference.probs, inference.g, inference.u), (t * e, 0, 0));
    }

    #[test]
    fn the_error_word_decodes_to_a_typed_error() {
        assert_eq!(device_error(&[0, 0, 0, 0]), None);
        assert_eq!(
            device_error(&[3, !5u32, 0, 0]),
            Some((
                Error::NonFiniteLogits {
                    count: 3,
                    first_token: 5
                },
                0..2
            ))
        );
        // A count that wrapped still reports: the token word decides.
        assert!(device_error(&[0, !0u32, 0, 0]).is_some());
        assert_eq!(
            device_error(&[0, 0, 4100, 4096]),
            Some((
                Error::CapacityExceeded {
                    needed: 4100,
                    capacity: 4096
                },
                2..4
            ))
        );
        // Both: the non-finite logits first, clearing only their half.
        assert_eq!(device_error(&[1, !0u32, 9, 8]).unwrap().1, 0..2);
    }
}
