//! The MoE layer forward on the GPU, for the ReLU router (ReMoE) and the TopK baseline. The CPU
//! reference is [`reference::remoe_forward`](crate::reference::remoe_forward) and
//! [`reference::topk_forward`](crate::reference::topk_forward).
//!
//! One forward is this sequence of kernels on the context's stream:
//!
//! 1. router: logits, gates and per-64-token-block statistics (ReLU), or logits then the
//!    softmax/top-k tail (TopK);
//! 2. routing statistics: n_e, expert offsets, GEMM row-tile offsets, sparsity, balance loss;
//! 3. **one host round-trip**: n_e and the totals are read back (a few bytes) so that the
//!    pair buffers can be sized and the GEMM grids launched at their exact size, and so that the
//!    statistics can be returned; removing it is planned (device-side tile scheduling);
//! 4. compaction into per-expert token lists, ascending token order;
//! 5. grouped up projection with the X gather and SwiGLU fused; grouped down projection;
//! 6. the gate-weighted combine into `out`, without atomics.
//!
//! ## Who owns the workspace
//!
//! Everything a forward writes besides `out` (logits, gates, dispatch lists, the expert
//! activations `act` and outputs `y`) lives in a [`MoeContext`] that the caller owns and passes
//! to each call. Its buffers grow to the largest batch and pair count seen and are then reused:
//! in steady state a forward allocates nothing ([`MoeContext::allocations`] counts). The context
//! also holds what the backward will need, so a training loop keeps one context per
//! micro-batch in flight.

use crate::config::LayerConfig;
use crate::controller::Coefficient;
use crate::device::Device;
use crate::element::HalfElement;
use crate::error::{Error, Result};
use crate::ffi;
use crate::tensor::{DeviceTensor, Launch};
use crate::workspace::GrowBuf;

/// Tokens per router block (the granularity of the per-block statistics).
const ROUTER_BLOCK: usize = ffi::REMOE_ROUTER_TOKENS_PER_BLOCK as usize;
/// Rows per grouped-GEMM tile.
const TILE_ROWS: usize = ffi::REMOE_GEMM_TILE_ROWS as usize;
/// The largest E the TopK kernel takes.
pub const TOPK_MAX_EXPERTS: usize = ffi::REMOE_TOPK_MAX_EXPERTS as usize;

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

/// How the gates are made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouterKind {
    /// ReMoE: R = ReLU(X Wr); the balance loss is the L1 regulariser at coefficient lambda.
    Relu,
    /// The baseline: top-k of softmax(X Wr); the balance loss is the Switch aux loss at
    /// coefficient c.
    TopK,
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
    /// Routing statistics and the host round-trip that reads them.
    pub stats_and_sync_ms: f64,
    /// Compaction into per-expert lists.
    pub compaction_ms: f64,
    /// Up projection with the gather and SwiGLU.
    pub up_ms: f64,
    /// Down projection.
    pub down_ms: f64,
    /// Gate-weighted combine.
    pub combine_ms: f64,
}

/// The forward's workspace and saved state (see the module documentation).
#[derive(Debug)]
pub struct MoeContext<T: HalfElement> {
    pub(crate) dev: Device,
    pub(crate) last: Option<(LayerConfig, RouterKind)>,
    pub(crate) allocations: u64,
    pub(crate) stage_timing: bool,
    pub(crate) stage_times: Option<StageTimes>,
    pub(crate) logits: GrowBuf<f32>,
    pub(crate) gates: GrowBuf<f32>,
    pub(crate) probs: GrowBuf<f32>,
    pub(crate) block_counts: GrowBuf<u32>,
    pub(crate) block_sums: GrowBuf<f32>,
    pub(crate) block_offsets: GrowBuf<u32>,
    pub(crate) counts: GrowBuf<u32>,
    pub(crate) gate_sums: GrowBuf<f32>,
    pub(crate) expert_offsets: GrowBuf<u32>,
    pub(crate) tile_offsets: GrowBuf<u32>,
    pub(crate) stats_u32: GrowBuf<u32>,
    pub(crate) stats_f32: GrowBuf<f32>,
    pub(crate) pair_token: GrowBuf<u32>,
    pub(crate) pair_gate: GrowBuf<f32>,
    pub(crate) pair_index: GrowBuf<i32>,
    pub(crate) act: GrowBuf<T>,
    pub(crate) y: GrowBuf<f32>,
    /// Write g and u in the forward (the backward needs them).
    pub(crate) save_for_backward: bool,
    /// g = x Wg and u = x Wu of every pair, [|A|, F], when saving for backward.
    pub(crate) g: GrowBuf<T>,
    pub(crate) u: GrowBuf<T>,
    /// A host-given coefficient, copied here for the kernels.
    pub(crate) coeff: GrowBuf<f64>,
    /// |A| and the GEMM row tiles of the last forward.
    pub(crate) pairs: usize,
    pub(crate) tiles: usize,
    /// The backward's scratch (src/backward.rs).
    pub(crate) bwd: crate::backward::BackwardScratch<T>,
}

impl<T: HalfElement> MoeContext<T> {
    /// An empty context on `dev`; its buffers are allocated by the first forward.
    pub fn new(dev: &Device) -> Self {
        Self {
            dev: dev.clone(),
            last: None,
            allocations: 0,
            stage_timing: false,
            stage_times: None,
            logits: GrowBuf::default(),
            gates: GrowBuf::default(),
            probs: GrowBuf::default(),
            block_counts: GrowBuf::default(),
            block_sums: GrowBuf::default(),
            block_offsets: GrowBuf::default(),
            counts: GrowBuf::default(),
            gate_sums: GrowBuf::default(),
            expert_offsets: GrowBuf::default(),
            tile_offsets: GrowBuf::default(),
            stats_u32: GrowBuf::default(),
            stats_f32: GrowBuf::default(),
            pair_token: GrowBuf::default(),
            pair_gate: GrowBuf::default(),
            pair_index: GrowBuf::default(),
            act: GrowBuf::default(),
            y: GrowBuf::default(),
            save_for_backward: false,
            g: GrowBuf::default(),
            u: GrowBuf::default(),
            coeff: GrowBuf::default(),
            pairs: 0,
            tiles: 0,
            bwd: Default::default(),
        }
    }

    /// A context whose forwards save what [`moe_backward`](crate::moe_backward) needs: the
    /// expert pre-activations g and u, 4 F bytes per routed pair on top of act and y (which
    /// every forward keeps). Recomputing them instead would cost the up projection's
    /// 4 |A| H F FLOPs again in the backward.
    pub fn for_training(dev: &Device) -> Self {
        let mut ctx = Self::new(dev);
        ctx.save_for_backward = true;
        ctx
    }

    /// Bytes of device memory holding what the last forward saved for the backward: logits,
    /// gates and pair index ([T, E]; probs too for TopK), the dispatch lists, and per pair act,
    /// y (and g, u when saving for backward). Divide by T for bytes per token.
    pub fn saved_bytes(&self) -> usize {
        if self.last.is_none() {
            return 0;
        }
        // Summed from the buffers themselves, so the figure follows any change of layout.
        [
            self.logits.bytes(),
            self.gates.bytes(),
            self.probs.bytes(),
            self.pair_index.bytes(),
            self.counts.bytes(),
            self.expert_offsets.bytes(),
            self.tile_offsets.bytes(),
            self.pair_token.bytes(),
            self.pair_gate.bytes(),
            self.act.bytes(),
            self.y.bytes(),
            self.g.bytes(),
            self.u.bytes(),
        ]
        .iter()
        .sum()
    }

    /// Turns saving for backward on or off for the next forwards.
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

    /// The configuration and router of the last forward.
    pub fn last_forward(&self) -> Option<(LayerConfig, RouterKind)> {
        self.last
    }

    /// Logits L [T, E] of the last forward.
    pub fn logits_to_host(&self) -> Result<Vec<f32>> {
        self.logits.to_host()
    }

    /// Gates R [T, E] of the last forward (TopK: P where selected, else 0).
    pub fn gates_to_host(&self) -> Result<Vec<f32>> {
        self.gates.to_host()
    }

    /// Softmax probabilities P [T, E] of the last TopK forward (empty after a ReMoE forward).
    pub fn probs_to_host(&self) -> Result<Vec<f32>> {
        self.probs.to_host()
    }

    /// Per-expert sums of the gates (ReMoE) or of P (TopK), f32.
    pub fn gate_sums_to_host(&self) -> Result<Vec<f32>> {
        self.gate_sums.to_host()
    }

    /// The dispatch lists of the last forward.
    pub fn dispatch_to_host(&self) -> Result<HostDispatch> {
        Ok(HostDispatch {
            offsets: self.expert_offsets.to_host()?,
            tokens: self.pair_token.to_host()?,
            gates: self.pair_gate.to_host()?,
        })
    }

    /// The pair of each (token, expert), or -1: [T, E].
    pub fn pair_index_to_host(&self) -> Result<Vec<i32>> {
        self.pair_index.to_host()
    }

    /// act = SiLU(x Wg) * (x Wu) of every pair, [|A|, F], in dispatch order.
    pub fn act_to_host(&self) -> Result<Vec<T>> {
        self.act.to_host()
    }

    /// y = act Wd of every pair, [|A|, H], in dispatch order (f32: the backward's dR = dOut . y
    /// is a dot product that can cancel, and bf16 storage of y would dominate its error).
    pub fn expert_out_to_host(&self) -> Result<Vec<f32>> {
        self.y.to_host()
    }

    /// Overwrites every workspace buffer with 0xFF bytes (NaN floats, -1 indices). For tests:
    /// after a warm-up forward, poison, run the same shapes again (no reallocation happens) and
    /// any element a kernel failed to write shows up.
    #[doc(hidden)]
    pub fn poison_workspace(&mut self) -> Result<()> {
        self.logits.poison()?;
        self.gates.poison()?;
        self.probs.poison()?;
        self.block_counts.poison()?;
        self.block_sums.poison()?;
        self.block_offsets.poison()?;
        self.counts.poison()?;
        self.gate_sums.poison()?;
        self.expert_offsets.poison()?;
        self.tile_offsets.poison()?;
        self.stats_u32.poison()?;
        self.stats_f32.poison()?;
        self.pair_token.poison()?;
        self.pair_gate.poison()?;
        self.pair_index.poison()?;
        self.act.poison()?;
        self.y.poison()?;
        self.g.poison()?;
        self.u.poison()?;
        self.backward_poison()
    }

    /// A host-given coefficient goes to the context's device scalar, which the kernels read
    /// (an adaptive one already lives on the device).
    pub(crate) fn upload_fixed_coeff(&mut self, coeff: &Coefficient) -> Result<()> {
        if let Coefficient::Fixed(v) = *coeff {
            let s = self.dev.stream().clone();
            s.memcpy_htod(&[v], self.coeff.slice_mut())?;
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

/// The ReMoE layer forward: `out` = the layer's output; the returned statistics carry the L1
/// regulariser's value at `lambda` (fixed, or the adaptive controller's, which then records this
/// layer's sparsity). See [`moe_forward`].
pub fn remoe_forward<T: HalfElement>(
    ctx: &mut MoeContext<T>,
    cfg: &LayerConfig,
    lambda: Coefficient,
    x: &DeviceTensor<T>,
    w: &MoeWeights<T>,
    out: &mut DeviceTensor<T>,
) -> Result<ForwardStats> {
    moe_forward(ctx, cfg, RouterKind::Relu, lambda, x, w, out)
}

/// The TopK baseline forward; the returned statistics carry the Switch aux loss at `aux_coeff`.
pub fn topk_forward<T: HalfElement>(
    ctx: &mut MoeContext<T>,
    cfg: &LayerConfig,
    aux_coeff: f64,
    x: &DeviceTensor<T>,
    w: &MoeWeights<T>,
    out: &mut DeviceTensor<T>,
) -> Result<ForwardStats> {
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
    x: &DeviceTensor<T>,
    w: &MoeWeights<T>,
    out: &DeviceTensor<T>,
) -> Result<()> {
    cfg.validate_for_gpu()?;
    if router == RouterKind::TopK && cfg.experts > TOPK_MAX_EXPERTS {
        return Err(Error::InvalidConfig(format!(
            "the TopK kernel takes at most {TOPK_MAX_EXPERTS} experts, got {}",
            cfg.experts
        )));
    }
    check_layer_tensors(ctx, cfg, x, w)?;
    out.expect_shape("out", &[cfg.tokens, cfg.hidden])?;
    out.expect_device("out", &ctx.dev)
}

/// The checks the forward and the backward share: `x` [T, H] and the weights in their layout,
/// all in the context's device.
pub(crate) fn check_layer_tensors<T: HalfElement>(
    ctx: &MoeContext<T>,
    cfg: &LayerConfig,
    x: &DeviceTensor<T>,
    w: &MoeWeights<T>,
) -> Result<()> {
    let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
    let tensors: [(&'static str, &DeviceTensor<T>, &[usize]); 5] = [
        ("x", x, &[t, h]),
        ("router weight", w.router, &[h, e]),
        ("gate weight", w.gate, &[e, h, f]),
        ("up weight", w.up, &[e, h, f]),
        ("down weight", w.down, &[e, f, h]),
    ];
    for (what, tensor, shape) in tensors {
        tensor.expect_shape(what, shape)?;
        tensor.expect_device(what, &ctx.dev)?;
    }
    Ok(())
}

/// The layer forward with either router, on the context's device and stream. `coeff` is lambda
/// (ReMoE) or c (TopK); it scales the returned balance loss, and an adaptive controller also
/// records the layer's sparsity.
pub fn moe_forward<T: HalfElement>(
    ctx: &mut MoeContext<T>,
    cfg: &LayerConfig,
    router: RouterKind,
    mut coeff: Coefficient,
    x: &DeviceTensor<T>,
    w: &MoeWeights<T>,
    out: &mut DeviceTensor<T>,
) -> Result<ForwardStats> {
    check_inputs(ctx, cfg, router, x, w, out)?;
    let (t, h, f, e, k) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts, cfg.k);
    let blocks = t.div_ceil(ROUTER_BLOCK);
    let dev = ctx.dev.clone();
    {
        let c = &mut *ctx;
        let a = &mut c.allocations;
        MoeContext::<T>::grow(&dev, a, &mut c.logits, t * e)?;
        MoeContext::<T>::grow(&dev, a, &mut c.gates, t * e)?;
        let probs = if router == RouterKind::TopK { t * e } else { 0 };
        MoeContext::<T>::grow(&dev, a, &mut c.probs, probs)?;
        MoeContext::<T>::grow(&dev, a, &mut c.block_counts, blocks * e)?;
        MoeContext::<T>::grow(&dev, a, &mut c.block_sums, blocks * e)?;
        MoeContext::<T>::grow(&dev, a, &mut c.block_offsets, blocks * e)?;
        MoeContext::<T>::grow(&dev, a, &mut c.counts, e)?;
        MoeContext::<T>::grow(&dev, a, &mut c.gate_sums, e)?;
        MoeContext::<T>::grow(&dev, a, &mut c.expert_offsets, e + 1)?;
        MoeContext::<T>::grow(&dev, a, &mut c.tile_offsets, e + 1)?;
        MoeContext::<T>::grow(&dev, a, &mut c.stats_u32, 2)?;
        MoeContext::<T>::grow(&dev, a, &mut c.stats_f32, 2)?;
        MoeContext::<T>::grow(&dev, a, &mut c.pair_index, t * e)?;
        MoeContext::<T>::grow(&dev, a, &mut c.coeff, 1)?;
    }
    ctx.upload_fixed_coeff(&coeff)?;
    ctx.last = Some((*cfg, router));
    let mut marks = StageMarks::new(&dev, ctx.stage_timing)?;
    // validate_for_gpu bounds T*H, T*E, H*E and E*H*F by i32::MAX: the i32 casts below are exact.
    let (ti, hi, fi, ei, ki) = (t as i32, h as i32, f as i32, e as i32, k as i32);

    // 1. Router.
    if t > 0 {
        let mut l = Launch::on(&dev);
        let xp = l.input("x", x.cuda_slice())?;
        let wp = l.input("router weight", w.router.cuda_slice())?;
        let lp = l.output("logits", ctx.logits.slice_mut())?;
        let (gp, bc, bs) = match router {
            // The ReLU router writes the gates and the statistics itself.
            RouterKind::Relu => (
                l.output("gates", ctx.gates.slice_mut())?,
                l.output("block counts", ctx.block_counts.slice_mut())?,
                l.output("block sums", ctx.block_sums.slice_mut())?,
            ),
            // TopK: only the logits matter here; the ReLU gates land in the probs buffer, which
            // the softmax tail overwrites.
            RouterKind::TopK => (
                l.output("probs", ctx.probs.slice_mut())?,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            ),
        };
        // SAFETY: shapes checked in check_inputs; logits, gates/probs hold t*e f32, the block
        // buffers ceil(t/64)*e; H % 8 == 0 and 16-byte aligned bases for the vector loads.
        let code = unsafe {
            T::ROUTER_FORWARD(
                xp as *const u16,
                wp as *const u16,
                lp,
                gp,
                bc,
                bs,
                ti,
                hi,
                ei,
                l.stream(),
            )
        };
        ffi::check("router_forward", code)?;
    }
    if router == RouterKind::TopK && t > 0 {
        let mut l = Launch::on(&dev);
        let lp = l.input("logits", ctx.logits.slice())?;
        let pp = l.output("probs", ctx.probs.slice_mut())?;
        let gp = l.output("gates", ctx.gates.slice_mut())?;
        let bc = l.output("block counts", ctx.block_counts.slice_mut())?;
        let bs = l.output("block sums", ctx.block_sums.slice_mut())?;
        // SAFETY: logits, probs, gates hold t*e f32, the block buffers ceil(t/64)*e; 1 <= k <=
        // e <= 512 was checked.
        let code = unsafe { ffi::remoe_topk_softmax(lp, pp, gp, bc, bs, ti, ei, ki, l.stream()) };
        ffi::check("topk_softmax", code)?;
    }

    marks.mark()?;

    // 2. Routing statistics.
    {
        let mut l = Launch::on(&dev);
        let bc = l.input("block counts", ctx.block_counts.slice())?;
        let bs = l.input("block sums", ctx.block_sums.slice())?;
        let bo = l.output("block offsets", ctx.block_offsets.slice_mut())?;
        let cn = l.output("counts", ctx.counts.slice_mut())?;
        let gs = l.output("gate sums", ctx.gate_sums.slice_mut())?;
        let eo = l.output("expert offsets", ctx.expert_offsets.slice_mut())?;
        let to = l.output("tile offsets", ctx.tile_offsets.slice_mut())?;
        let su = l.output("stats", ctx.stats_u32.slice_mut())?;
        let sf = l.output("stats", ctx.stats_f32.slice_mut())?;
        let (cp, sum, cnt) = match &mut coeff {
            Coefficient::Fixed(_) => (
                l.input_raw(ctx.coeff.slice()),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            ),
            Coefficient::Adaptive(c) => (
                l.input_raw(&c.lambda),
                l.output_raw(&mut c.sparsity_sum),
                l.output_raw(&mut c.count),
            ),
        };
        // SAFETY: buffer sizes as documented in remoe_kernels.h, ensured above for this t and e;
        // cp points at one f64, sum and cnt at one f64 and one u32 (or are null).
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
                l.stream(),
            )
        };
        ffi::check("routing_stats", code)?;
    }

    // 3. The host round-trip (module docs): sizes for the pair buffers and the GEMM grids.
    let counts = ctx.counts.to_host()?;
    let su = ctx.stats_u32.to_host()?;
    let sf = ctx.stats_f32.to_host()?;
    let (pairs, tiles) = (su[0] as usize, su[1] as usize);
    ctx.pairs = pairs;
    ctx.tiles = tiles;
    debug_assert_eq!(
        tiles,
        counts
            .iter()
            .map(|&n| (n as usize).div_ceil(TILE_ROWS))
            .sum::<usize>()
    );
    {
        let c = &mut *ctx;
        let a = &mut c.allocations;
        MoeContext::<T>::grow(&dev, a, &mut c.pair_token, pairs)?;
        MoeContext::<T>::grow(&dev, a, &mut c.pair_gate, pairs)?;
        MoeContext::<T>::grow(&dev, a, &mut c.act, pairs * f)?;
        MoeContext::<T>::grow(&dev, a, &mut c.y, pairs * h)?;
        let saved = if c.save_for_backward { pairs * f } else { 0 };
        MoeContext::<T>::grow(&dev, a, &mut c.g, saved)?;
        MoeContext::<T>::grow(&dev, a, &mut c.u, saved)?;
    }

    marks.mark()?;

    // 4. Compaction.
    if t > 0 {
        let mut l = Launch::on(&dev);
        let gp = l.input("gates", ctx.gates.slice())?;
        let bo = l.input("block offsets", ctx.block_offsets.slice())?;
        let eo = l.input("expert offsets", ctx.expert_offsets.slice())?;
        let pt = l.output("pair tokens", ctx.pair_token.slice_mut())?;
        let pg = l.output("pair gates", ctx.pair_gate.slice_mut())?;
        let pi = l.output("pair index", ctx.pair_index.slice_mut())?;
        // SAFETY: pair_token and pair_gate hold |A| (= the total of the offsets) elements,
        // pair_index t*e; gates t*e; block offsets ceil(t/64)*e.
        let code = unsafe { ffi::remoe_compact_pairs(gp, bo, eo, pt, pg, pi, ti, ei, l.stream()) };
        ffi::check("compact_pairs", code)?;
    }

    marks.mark()?;

    // 5. Experts.
    if tiles > 0 {
        let tiles_i = i32::try_from(tiles).map_err(|_| Error::TooLarge {
            what: "grouped GEMM row tiles",
            elements: tiles,
        })?;
        {
            let mut l = Launch::on(&dev);
            let xp = l.input("x", x.cuda_slice())?;
            let pt = l.input("pair tokens", ctx.pair_token.slice())?;
            let wg = l.input("gate weight", w.gate.cuda_slice())?;
            let wu = l.input("up weight", w.up.cuda_slice())?;
            let ap = l.output("act", ctx.act.slice_mut())?;
            let (gp, up) = if ctx.save_for_backward {
                (
                    l.output("g", ctx.g.slice_mut())? as *mut u16,
                    l.output("u", ctx.u.slice_mut())? as *mut u16,
                )
            } else {
                (std::ptr::null_mut(), std::ptr::null_mut())
            };
            let eo = l.input("expert offsets", ctx.expert_offsets.slice())?;
            let to = l.input("tile offsets", ctx.tile_offsets.slice())?;
            // SAFETY: x [t,h]; wg, wu [e,h,f]; act (and g, u when saving) hold |A|*f; pair
            // tokens < t; the offsets describe `tiles` row tiles over |A| rows; h, f multiples
            // of 8.
            let code = unsafe {
                T::EXPERT_UP(
                    xp as *const u16,
                    pt,
                    wg as *const u16,
                    wu as *const u16,
                    ap as *mut u16,
                    gp,
                    up,
                    eo,
                    to,
                    tiles_i,
                    ei,
                    hi,
                    fi,
                    l.stream(),
                )
            };
            ffi::check("expert_up_swiglu", code)?;
        }
        marks.mark()?;
        {
            let mut l = Launch::on(&dev);
            let ap = l.input("act", ctx.act.slice())?;
            let wd = l.input("down weight", w.down.cuda_slice())?;
            let yp = l.output("expert out", ctx.y.slice_mut())?;
            let eo = l.input("expert offsets", ctx.expert_offsets.slice())?;
            let to = l.input("tile offsets", ctx.tile_offsets.slice())?;
            // SAFETY: act |A|*f, wd [e,f,h], y holds |A|*h; offsets as above.
            let code = unsafe {
                T::EXPERT_DOWN(
                    ap as *const u16,
                    wd as *const u16,
                    yp,
                    eo,
                    to,
                    tiles_i,
                    ei,
                    hi,
                    fi,
                    l.stream(),
                )
            };
            ffi::check("expert_down", code)?;
        }
    } else {
        marks.mark()?;
    }
    marks.mark()?;

    // 6. Combine (also for |A| = 0: it writes the zeros).
    if t > 0 {
        let mut l = Launch::on(&dev);
        let yp = l.input("expert out", ctx.y.slice())?;
        let gp = l.input("gates", ctx.gates.slice())?;
        let pi = l.input("pair index", ctx.pair_index.slice())?;
        let op = l.output("out", out.cuda_slice_mut())?;
        // SAFETY: y |A|*h (at least one element), gates and pair index t*e, out [t,h]; every
        // pair index is -1 or < |A|.
        let code = unsafe { T::COMBINE(yp, gp, pi, op as *mut u16, ti, hi, ei, l.stream()) };
        ffi::check("combine", code)?;
    }
    marks.mark()?;
    ctx.stage_times = marks.finish()?;

    Ok(ForwardStats {
        active_pairs: pairs,
        sparsity: sf[0] as f64,
        balance_loss: sf[1] as f64,
        tokens_per_expert: counts,
    })
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
            stats_and_sync_ms: ms(1)?,
            compaction_ms: ms(2)?,
            up_ms: ms(3)?,
            down_ms: ms(4)?,
            combine_ms: ms(5)?,
        }))
    }
}
