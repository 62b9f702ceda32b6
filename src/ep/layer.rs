//! The expert-parallel layer on the GPU: each rank routes and compacts its own tokens, sends
//! every owner the rows of the pairs of its experts, runs its own experts on what it received,
//! returns the results, and combines as the one-GPU layer does.
//!
//! Sizes travel first: one count exchange per forward, read back by the host, so every buffer
//! is sized exactly and every rank derives the same traffic matrix (the count-exchange mode of
//! docs/EXPERT_PARALLEL_DESIGN.md §7.2). The backward reuses those sizes; it first exchanges
//! only a header naming its forward, also read back by the host, so that ranks running the
//! backwards of different forwards fail before any row moves. Neither can therefore be captured
//! in a CUDA graph. The source side keeps the one-GPU capacity contract: a rank whose pairs
//! overflow its capacity sends none, and reports `CapacityExceeded` at its next host-visible
//! call.

use std::ops::Range;

use cudarc::driver::{CudaView, CudaViewMut};

use super::dispatch::permute_32;
use super::dispatch::{count_message, ReceiveDispatch};
use super::protocol::{
    CallHeader, EpSetup, ExpertPartition, Phase, TrafficMatrix, COUNT_HEADER_WORDS,
};
use super::transport::DeviceLoopback;
use crate::backward::{check_backward_inputs, router_half, BackwardOptions, MoeGrads};
use crate::capacity::{split_k_partials, PairCapacity};
use crate::config::LayerConfig;
use crate::controller::Coefficient;
use crate::device::Device;
use crate::element::HalfElement;
use crate::error::{Error, Result};
use crate::experts::{BatchGradInputs, BatchWeightGrads};
use crate::gather::gather_rows;
use crate::gemm::GemmPath;
use crate::graph::Mode;
use crate::moe::{
    check_coefficient, check_config, check_layer_tensors, check_out, ForwardPlan, ForwardStats,
    MoeContext, MoeWeightViews, RouterKind,
};
use crate::scratch::BackwardScratch;
use crate::tensor::{DeviceTensor, Element, TensorView};
use crate::workspace::{Buffers, GrowBuf};

/// How a group's ranks reach each other.
#[derive(Debug)]
pub enum Transport {
    /// R threads on one GPU (tests of the protocol on one device).
    Loopback(DeviceLoopback),
    /// NCCL, one rank per GPU (feature `ep`).
    #[cfg(feature = "ep")]
    Nccl(super::nccl::EpComm),
}

impl Transport {
    fn rank(&self) -> usize {
        match self {
            Self::Loopback(t) => t.rank(),
            #[cfg(feature = "ep")]
            Self::Nccl(c) => c.rank(),
        }
    }

    fn world(&self) -> usize {
        match self {
            Self::Loopback(t) => t.world(),
            #[cfg(feature = "ep")]
            Self::Nccl(c) => c.world(),
        }
    }

    /// Whether the transport enqueues on `dev`'s stream (the one its exchanges are ordered on
    /// against the layer's kernels).
    #[cfg_attr(not(feature = "ep"), allow(unused_variables))] // only NCCL's arm reads them
    fn uses(&self, dev: &Device) -> bool {
        match self {
            // The loopback enqueues on whichever device it is given at each exchange.
            Self::Loopback(_) => true,
            #[cfg(feature = "ep")]
            Self::Nccl(c) => std::sync::Arc::ptr_eq(c.device().stream(), dev.stream()),
        }
    }

    /// One all-to-all of `send`'s ranges into `recv`'s (see
    /// [`DeviceLoopback::exchange`]), enqueued on `dev`'s stream.
    fn exchange<T: Element>(
        &mut self,
        dev: &Device,
        op: &'static str,
        send: (&CudaView<'_, T>, &[Range<usize>]),
        recv: (&mut CudaViewMut<'_, T>, &[Range<usize>]),
    ) -> Result<()> {
        match self {
            Self::Loopback(t) => t.exchange(dev, op, send, recv),
            #[cfg(feature = "ep")]
            Self::Nccl(c) => c.exchange(op, send, recv),
        }
    }

    /// Waits, at most the transport's timeout, until this rank's exchanges so far have finished
    /// on the device: what must come before a host read of the stream, which would otherwise
    /// block for good behind an exchange a peer never matches. (The loopback's exchanges
    /// cannot stall on the device: every wait they enqueue is on an event already recorded.)
    #[cfg_attr(not(feature = "ep"), allow(unused_variables))]
    fn wait(&mut self, op: &'static str) -> Result<()> {
        match self {
            Self::Loopback(_) => Ok(()),
            #[cfg(feature = "ep")]
            Self::Nccl(c) => c.wait(op),
        }
    }
}

/// R ranks that agreed on one setup, one per GPU (or thread), and the call counter that keeps
/// them in step.
#[derive(Debug)]
pub struct EpGroup {
    dev: Device,
    transport: Transport,
    setup: EpSetup,
    partition: ExpertPartition,
    digest: u32,
    seq: u32,
}

impl EpGroup {
    /// Joins the group: every rank exchanges its setup record with every other, and all of
    /// them refuse a group whose records differ ([`Error::EpMismatch`], the same on every rank).
    /// A rank whose own setup is invalid still takes part (with a record its peers refuse), so
    /// that they fail at once instead of waiting for it.
    pub fn new(dev: &Device, mut transport: Transport, setup: EpSetup) -> Result<Self> {
        if !transport.uses(dev) {
            return Err(Error::InvalidConfig(
                "an expert-parallel group's transport must be made from the group's Device".into(),
            ));
        }
        let world = transport.world();
        let own = setup.to_words();
        let words = own.clone().unwrap_or([0; EpSetup::WORDS]);
        let mut mine = GrowBuf::<u32>::default();
        mine.ensure(dev, EpSetup::WORDS)?;
        dev.stream().memcpy_htod(&words, &mut mine.view_mut()?)?;
        let mut all = GrowBuf::<u32>::default();
        all.ensure(dev, world * EpSetup::WORDS)?;
        let w = EpSetup::WORDS;
        let same: Vec<Range<usize>> = (0..world).map(|_| 0..w).collect();
        let each: Vec<Range<usize>> = (0..world).map(|q| q * w..(q + 1) * w).collect();
        transport.exchange(
            dev,
            "setup",
            (&mine.view()?, &same),
            (&mut all.view_mut()?, &each),
        )?;
        transport.wait("setup")?;
        let flat = all.to_host()?;
        let records: Vec<[u32; EpSetup::WORDS]> = flat
            .chunks_exact(w)
            .map(|c| c.try_into().expect("chunks of the record's length"))
            .collect();
        own?;
        EpSetup::check_agreement(&records)?;
        if setup.world != world {
            return Err(Error::InvalidConfig(format!(
                "a setup for {} ranks in a group of {world}",
                setup.world
            )));
        }
        Ok(Self {
            dev: dev.clone(),
            partition: ExpertPartition::new(setup.config.experts, world)?,
            digest: setup.digest()?,
            transport,
            setup,
            seq: 0,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.transport.rank()
    }

    /// Which experts each rank owns.
    pub fn partition(&self) -> ExpertPartition {
        self.partition
    }

    /// The header of the group's next call, which every rank numbers alike.
    fn next_call(&mut self, layer_id: u32, phase: Phase, training: bool) -> CallHeader {
        let header = CallHeader {
            seq: self.seq,
            layer_id,
            phase,
            setup_digest: self.digest,
            training,
        };
        self.seq = self.seq.wrapping_add(1);
        header
    }

    /// A call's configuration against the group's setup: everything but T must match.
    fn check_call<T: HalfElement>(&self, cfg: &LayerConfig, router: RouterKind) -> Result<()> {
        let s = &self.setup;
        let same = LayerConfig {
            tokens: cfg.tokens,
            ..s.config
        };
        if *cfg != same || router != s.router || T::DTYPE != s.dtype {
            return Err(Error::InvalidConfig(format!(
                "a call with {cfg:?}, {router:?}, {:?} in a group set up for {:?}, {:?}, {:?} \
                 (only T may differ)",
                T::DTYPE,
                s.config,
                s.router,
                s.dtype
            )));
        }
        Ok(())
    }
}

/// One rank's buffers: its own routing and combine (a [`MoeContext`] inside, whose statistics
/// and device errors it reports), and what it holds as an owner. They grow to the largest call
/// and are reused. The inner context is not handed out: its forward record describes an
/// expert-parallel forward, on which a one-GPU backward must never run.
#[derive(Debug)]
pub struct EpContext<T: HalfElement> {
    source: MoeContext<T>,
    /// \[8+E\] this rank's count message; \[R\]\[8+E\] everyone's. A backward's header
    /// messages (\[8\], \[R\]\[8\]) use them too: the forward's are not read after it.
    msg: GrowBuf<u32>,
    msgs: GrowBuf<u32>,
    /// \[|A|, H\] this rank's routed rows, in pair order (so each owner's are one range).
    x_send: GrowBuf<T>,
    /// \[N, H\] and \[N\]: the rows (and, training, the gates) this rank received as an owner.
    recv_x: GrowBuf<T>,
    recv_gate: GrowBuf<f32>,
    dispatch: ReceiveDispatch,
    /// \[N, F\] the owner's activations, and its pre-activations when training.
    act: GrowBuf<T>,
    g: GrowBuf<T>,
    u: GrowBuf<T>,
    /// \[N, H\] the owner's results (y, in T as on one GPU) in its local order, and in receive
    /// order for the trip home; \[k_splits N, H\] their f32 split-K partial sums where the down
    /// projection splits.
    y_local: GrowBuf<T>,
    y_ret: GrowBuf<T>,
    y_partials: GrowBuf<f32>,
    /// Backward: \[|A|, H\] this rank's dOut rows in pair order; \[N, H\] the ones it received;
    /// \[N, H\] and \[N\] the per-pair dX and dR in receive order, for the trip home.
    dout_send: GrowBuf<T>,
    recv_dout: GrowBuf<T>,
    dx_ret: GrowBuf<T>,
    dr_ret: GrowBuf<f32>,
    /// The owner's backward buffers (the source's are in `source`).
    owner_bwd: BackwardScratch<T>,
    saved: Option<EpSaved>,
}

/// What the last forward leaves for its backward: the call's header and traffic, so that the
/// backward moves exactly the rows the forward moved.
#[derive(Debug, Clone)]
pub struct EpSaved {
    header: CallHeader,
    traffic: TrafficMatrix,
    /// N, the rows this rank received as an owner.
    received: usize,
    /// Whether g, u and the gates were kept (a training forward).
    training: bool,
    /// Whether every source gave the same split-K count (see [`EpSaved::down_splits_agree`]).
    down_splits_agree: bool,
}

impl EpSaved {
    /// Who sent how many pairs of which expert in that forward.
    pub fn traffic(&self) -> &TrafficMatrix {
        &self.traffic
    }

    /// The rows this rank received as an owner.
    pub fn received(&self) -> usize {
        self.received
    }

    /// The forward's call header (its number in the group, its layer).
    pub fn call(&self) -> CallHeader {
        self.header
    }

    /// Whether the forward kept what a backward needs.
    pub fn training(&self) -> bool {
        self.training
    }

    /// Whether every rank's forward chose the same split-K count for the down projection,
    /// which is what makes each rank's output bitwise its one-GPU output (it does with equal
    /// T on every rank). Otherwise this rank, as an owner, ran every source's rows with its own
    /// count, and another source's output differs from its one-GPU output by split-K rounding.
    pub fn down_splits_agree(&self) -> bool {
        self.down_splits_agree
    }
}

impl<T: HalfElement> EpContext<T> {
    /// A context for inference on `dev`.
    pub fn new(dev: &Device) -> Self {
        Self::around(MoeContext::new(dev))
    }

    /// A context whose forwards keep what a backward needs.
    pub fn for_training(dev: &Device) -> Self {
        Self::around(MoeContext::for_training(dev))
    }

    fn around(source: MoeContext<T>) -> Self {
        Self {
            source,
            msg: GrowBuf::default(),
            msgs: GrowBuf::default(),
            x_send: GrowBuf::default(),
            recv_x: GrowBuf::default(),
            recv_gate: GrowBuf::default(),
            dispatch: ReceiveDispatch::default(),
            act: GrowBuf::default(),
            g: GrowBuf::default(),
            u: GrowBuf::default(),
            y_local: GrowBuf::default(),
            y_ret: GrowBuf::default(),
            y_partials: GrowBuf::default(),
            dout_send: GrowBuf::default(),
            recv_dout: GrowBuf::default(),
            dx_ret: GrowBuf::default(),
            dr_ret: GrowBuf::default(),
            owner_bwd: BackwardScratch::default(),
            saved: None,
        }
    }

    /// This rank's routing statistics of the last forward (its own tokens, as on one GPU),
    /// after [`EpContext::check_device_errors`]. Waits for the stream.
    pub fn stats(&mut self) -> Result<ForwardStats> {
        self.source.stats()
    }

    /// What the device found in this rank's routing since the last check (an overflow of the
    /// pair capacity, a non-finite logit), as on one GPU.
    pub fn check_device_errors(&mut self) -> Result<()> {
        self.source.check_device_errors()
    }

    /// The pair capacity of this rank's own dispatch (see [`MoeContext::set_pair_capacity`]).
    /// The rows a rank receives as an owner are sized from the exchanged counts and have no
    /// capacity to exceed.
    pub fn set_pair_capacity(&mut self, capacity: PairCapacity) {
        self.source.set_pair_capacity(capacity)
    }

    /// The expert GEMMs' implementation (see [`MoeContext::set_gemm_path`]).
    pub fn set_gemm_path(&mut self, path: GemmPath) -> Result<()> {
        self.source.set_gemm_path(path)
    }

    /// Fills every buffer of the context with NaN / all-ones bits (tests: an element that a
    /// later call reads without writing shows up).
    pub fn poison_workspace(&mut self) -> Result<()> {
        self.source.poison_workspace()?;
        for b in [&mut self.msg, &mut self.msgs] {
            b.poison()?;
        }
        for b in [
            &mut self.x_send,
            &mut self.recv_x,
            &mut self.act,
            &mut self.g,
            &mut self.u,
            &mut self.y_local,
            &mut self.y_ret,
            &mut self.dout_send,
            &mut self.recv_dout,
            &mut self.dx_ret,
        ] {
            b.poison()?;
        }
        for b in [&mut self.recv_gate, &mut self.y_partials, &mut self.dr_ret] {
            b.poison()?;
        }
        self.owner_bwd.poison()?;
        self.dispatch.poison()
    }

    /// The last forward's traffic (None before one, or after a failed one).
    pub fn saved(&self) -> Option<&EpSaved> {
        self.saved.as_ref()
    }
}

/// Element ranges of rows: `[b[q] row_len, b[q+1] row_len)` for each q.
fn row_ranges(bounds: &[usize], row_len: usize) -> Vec<Range<usize>> {
    bounds
        .windows(2)
        .map(|w| w[0] * row_len..w[1] * row_len)
        .collect()
}

/// The layer forward on this rank's tokens `x` \[T, H\], with the router weight of all E
/// experts and the expert weights of this rank's E/R (`w.gate`, `w.up` \[E/R, H, F\], `w.down`
/// \[E/R, F, H\]). Every rank of the group calls it with its own T; `layer_id` must be the same
/// on all of them.
///
/// `out` is bitwise the one-GPU [`crate::moe_forward`] on `x` with the full weights, as long as
/// the down projection's split-K count is the same (it is for equal T on every rank; see the
/// design's §7.5). Waits for the count exchange (a host read), so it cannot be captured, and
/// at the end for its exchanges to finish (bounded by the transport's timeout), so that a rank
/// out of step surfaces as an error here and never as a stream that blocks a later read.
#[allow(clippy::too_many_arguments)] // moe_forward's arguments, plus the group and the layer id
pub fn ep_moe_forward<'x, 'w, T: HalfElement>(
    group: &mut EpGroup,
    ctx: &mut EpContext<T>,
    cfg: &LayerConfig,
    router: RouterKind,
    mut coeff: Coefficient,
    layer_id: u32,
    x: impl Into<TensorView<'x, T>>,
    w: impl Into<MoeWeightViews<'w, T>>,
    out: &mut DeviceTensor<T>,
) -> Result<()> {
    let (x, w) = (x.into(), w.into());
    if group.dev.is_capturing()? {
        // The count exchange reads back to the host. (The peers, if they are not capturing,
        // end their wait for this rank in EpTimeout.)
        return Err(Error::CaptureUnsupported(
            "the expert-parallel forward reads the exchanged counts back to the host; it \
             cannot be captured in a CUDA graph"
                .into(),
        ));
    }
    // From here on the previous forward's state is gone, whatever happens.
    ctx.saved = None;
    ctx.source.record.lock().saved = None;
    let checked = check_forward(group, ctx, (cfg, router), &coeff, (&x, &w), out);
    if let Err(e) = checked {
        // Still take part in the count exchange, with the abort flag, so that the peers fail
        // at once (EpMismatch naming this rank) instead of waiting out their timeout.
        abort_call(group, ctx, layer_id);
        return Err(e);
    }
    // Eager (captures are refused above): the source's pair buffers are sized from its
    // counted pairs, so it cannot overflow.
    let mut plan = ForwardPlan::new(&ctx.source, cfg, router, Mode::Eager);
    plan.size_routing(&mut ctx.source)?;
    ctx.source.upload_fixed_coeff(&coeff)?;
    plan.router(&mut ctx.source, &x, &w)?;
    plan.routing_stats(&mut ctx.source, &mut coeff)?;
    plan.compaction(&mut ctx.source)?;

    let training = plan.save;
    let header = group.next_call(layer_id, Phase::Forward, training);
    let traffic = exchange_counts(group, ctx, &header, &plan, &x)?;
    let received = send_rows(group, ctx, &traffic, cfg.hidden, training)?;
    // Every source's rows with the split-K count its one-GPU forward would use, when they all
    // use the same one (equal T on every rank does that); otherwise this rank's own, and the
    // other sources' rows differ from their one-GPU results by split-K rounding only.
    let agreed = traffic.agreed_down_splits().map(|k| k as usize);
    let k_splits = agreed.unwrap_or(plan.k_splits);
    run_owned_experts(group, ctx, cfg, &w, received, k_splits, training)?;
    return_results(group, ctx, &traffic, cfg.hidden, received)?;
    // Bounded here, so that no later host read of the stream can block behind an exchange a
    // peer never matched.
    group.transport.wait("forward results")?;
    plan.combine(&mut ctx.source, out)?;

    let record = plan.record(&mut ctx.source);
    ctx.source.record.lock().saved = Some(record);
    ctx.saved = Some(EpSaved {
        header,
        traffic,
        received,
        training,
        down_splits_agree: agreed.is_some(),
    });
    Ok(())
}

/// The forward's checks of its own arguments, before anything is enqueued.
fn check_forward<T: HalfElement>(
    group: &EpGroup,
    ctx: &EpContext<T>,
    (cfg, router): (&LayerConfig, RouterKind),
    coeff: &Coefficient,
    (x, w): (&TensorView<T>, &MoeWeightViews<T>),
    out: &DeviceTensor<T>,
) -> Result<()> {
    group.check_call::<T>(cfg, router)?;
    check_config(cfg, router)?;
    check_layer_tensors(&ctx.source, cfg, group.partition.local_experts(), x, w)?;
    check_coefficient(&ctx.source, coeff)?;
    check_out(&ctx.source, cfg, out)?;
    if !std::sync::Arc::ptr_eq(ctx.source.dev.stream(), group.dev.stream()) {
        // The exchanges are ordered against the kernels by the one stream they share.
        return Err(Error::InvalidConfig(
            "the expert-parallel group and context must be made from the same Device".into(),
        ));
    }
    Ok(())
}

/// This rank's part in a forward it cannot run: a count message with the abort flag and no
/// pairs, which every peer's traffic check turns into the same `EpMismatch` naming this rank.
/// The caller returns its own error; what the exchange itself returns adds nothing to it.
fn abort_call<T: HalfElement>(group: &mut EpGroup, ctx: &mut EpContext<T>, layer_id: u32) {
    let training = ctx.source.save_for_backward;
    let header = group.next_call(layer_id, Phase::Forward, training);
    let (rank, e) = (group.rank(), group.partition.experts());
    let msg = header.count_message(rank, &vec![0; e + 1], true);
    send_abort(group, ctx, &msg, FORWARD_COUNTS);
}

/// Sends `msg`, a message with the abort flag, to every rank in the exchange `op`, and waits for
/// it; a failure changes nothing for the caller, which returns its own error.
fn send_abort<T: HalfElement>(
    group: &mut EpGroup,
    ctx: &mut EpContext<T>,
    msg: &[u32],
    op: &'static str,
) {
    let dev = group.dev.clone();
    let _ = (|| -> Result<()> {
        ctx.msg.ensure(&dev, msg.len())?;
        dev.stream().memcpy_htod(msg, &mut ctx.msg.view_mut()?)?;
        post_messages(group, ctx, msg.len(), op)?;
        group.transport.wait(op)
    })();
}

/// The exchange of the forward's count messages.
const FORWARD_COUNTS: &str = "forward counts";
/// The exchange of the backward's header messages.
const BACKWARD_HEADER: &str = "backward header";

/// Sends `ctx.msg` (`words` words) to every rank and receives every rank's into `ctx.msgs`,
/// in rank order, in the exchange `op`.
fn post_messages<T: HalfElement>(
    group: &mut EpGroup,
    ctx: &mut EpContext<T>,
    words: usize,
    op: &'static str,
) -> Result<()> {
    let world = group.transport.world();
    ctx.msgs.ensure(&group.dev, world * words)?;
    let same: Vec<Range<usize>> = (0..world).map(|_| 0..words).collect();
    let each = row_ranges(&(0..=world).collect::<Vec<_>>(), words);
    group.transport.exchange(
        &group.dev,
        op,
        (&ctx.msg.view()?, &same),
        (&mut ctx.msgs.view_mut()?, &each),
    )
}

/// Every rank's `words`-word messages in `ctx.msgs`, after the exchange `op` has finished
/// (waited for, bounded), by sender.
fn read_messages<T: HalfElement>(
    group: &mut EpGroup,
    ctx: &EpContext<T>,
    words: usize,
    op: &'static str,
) -> Result<Vec<Vec<u32>>> {
    group.transport.wait(op)?;
    let flat = ctx.msgs.to_host()?;
    Ok(flat.chunks_exact(words).map(<[u32]>::to_vec).collect())
}

/// Every rank's count message to every rank; meanwhile this rank packs its routed rows. Returns
/// the checked traffic matrix, the same on every rank (or the same error on every rank).
fn exchange_counts<T: HalfElement>(
    group: &mut EpGroup,
    ctx: &mut EpContext<T>,
    header: &CallHeader,
    plan: &ForwardPlan,
    x: &TensorView<T>,
) -> Result<TrafficMatrix> {
    let dev = group.dev.clone();
    let (rank, experts, cap) = (group.rank(), group.partition.experts(), plan.cap);
    let words = COUNT_HEADER_WORDS + experts;
    ctx.msg.ensure(&dev, words)?;
    count_message(
        &dev,
        header,
        (rank, plan.k_splits as u32),
        &ctx.source.routing.expert_offsets,
        experts,
        &mut ctx.msg,
    )?;
    post_messages(group, ctx, words, FORWARD_COUNTS)?;
    let src = &ctx.source;
    let h = x.shape()[1];
    ctx.x_send.ensure(&dev, cap * h)?;
    gather_rows(
        &dev,
        x,
        x.shape()[0],
        &src.routing.pair_token,
        &mut ctx.x_send,
        (&src.routing.expert_offsets, experts),
        cap,
        h,
    )?;
    let messages = read_messages(group, ctx, words, FORWARD_COUNTS)?;
    TrafficMatrix::from_messages(group.partition, header, &messages)
}

/// Sends each owner its rows (and, training, their gates); builds this rank's dispatch of what
/// it received. Returns N, the rows received.
fn send_rows<T: HalfElement>(
    group: &mut EpGroup,
    ctx: &mut EpContext<T>,
    traffic: &TrafficMatrix,
    h: usize,
    training: bool,
) -> Result<usize> {
    let dev = group.dev.clone();
    let rank = group.rank();
    let send = traffic.send_offsets(rank);
    let recv = traffic.receive_bases(rank);
    let received = *recv.last().expect("R+1 bases");
    ctx.recv_x.ensure(&dev, received * h)?;
    group.transport.exchange(
        &dev,
        "forward rows",
        (&ctx.x_send.view()?, &row_ranges(&send, h)),
        (&mut ctx.recv_x.view_mut()?, &row_ranges(&recv, h)),
    )?;
    if training {
        ctx.recv_gate.ensure(&dev, received)?;
        group.transport.exchange(
            &dev,
            "forward gates",
            (&ctx.source.routing.pair_gate.view()?, &row_ranges(&send, 1)),
            (&mut ctx.recv_gate.view_mut()?, &row_ranges(&recv, 1)),
        )?;
    }
    let gates = training.then_some(&ctx.recv_gate);
    ctx.dispatch
        .build(&dev, group.partition, rank, &ctx.msgs, gates, received)?;
    Ok(received)
}

/// This rank's experts on the rows it received, in its local order.
fn run_owned_experts<T: HalfElement>(
    group: &EpGroup,
    ctx: &mut EpContext<T>,
    cfg: &LayerConfig,
    w: &MoeWeightViews<T>,
    received: usize,
    k_splits: usize,
    training: bool,
) -> Result<()> {
    let dev = group.dev.clone();
    let (h, f, el) = (cfg.hidden, cfg.ffn, group.partition.local_experts());
    ctx.act.ensure(&dev, received * f)?;
    let saved_len = if training { received * f } else { 0 };
    ctx.g.ensure(&dev, saved_len)?;
    ctx.u.ensure(&dev, saved_len)?;
    ctx.y_local.ensure(&dev, received * h)?;
    ctx.y_partials
        .ensure(&dev, split_k_partials(k_splits, received, h))?;
    let gemms = ctx.source.gemm_path()?.gemms::<T>();
    let batch = ctx.dispatch.batch(el, received, (h, f));
    let saved = training.then_some((&mut ctx.g, &mut ctx.u));
    batch.up_swiglu(
        &dev,
        &gemms,
        &ctx.recv_x,
        received,
        (&w.gate, &w.up),
        &mut ctx.act,
        saved,
        &mut ctx.source.row_sched,
    )?;
    batch.down(
        &dev,
        &gemms,
        &ctx.act,
        &w.down,
        k_splits,
        (&mut ctx.y_local, &mut ctx.y_partials),
        &mut ctx.source.row_sched,
    )
}

/// The owner's results back in receive order, then home: each source's y rows land where its
/// one-GPU forward would have written them (pair order, in T: 2 H bytes a row on the link),
/// ready for the combine.
fn return_results<T: HalfElement>(
    group: &mut EpGroup,
    ctx: &mut EpContext<T>,
    traffic: &TrafficMatrix,
    h: usize,
    received: usize,
) -> Result<()> {
    let dev = group.dev.clone();
    let (rank, world) = (group.rank(), group.transport.world());
    ctx.y_ret.ensure(&dev, received * h)?;
    gather_rows(
        &dev,
        &ctx.y_local,
        received,
        &ctx.dispatch.pair_of_row,
        &mut ctx.y_ret,
        (&ctx.dispatch.src_base, world),
        received,
        h,
    )?;
    let home = traffic.send_offsets(rank);
    let from = traffic.receive_bases(rank);
    group.transport.exchange(
        &dev,
        "forward results",
        (&ctx.y_ret.view()?, &row_ranges(&from, h)),
        (&mut ctx.source.experts.y.view_mut()?, &row_ranges(&home, h)),
    )
}

/// The layer backward of this rank's last [`ep_moe_forward`] (a training context), with
/// `dout` \[T, H\] for this rank's tokens. Every rank of the group calls it after the same
/// forward. Each rank gets `grads.dx` \[T, H\] and `grads.router` \[H, E\] for its own
/// tokens, and the weight gradients of the experts it owns (`grads.gate`, `grads.up`
/// \[E/R, H, F\], `grads.down` \[E/R, F, H\]) over every rank's pairs of them; they stay on
/// their owner (a data-parallel reduction of the router's is the caller's).
///
/// The backward moves the forward's rows back the way they came, so it exchanges no counts.
/// Before any row, every rank sends every rank a header message naming the forward it belongs
/// to (its call number and layer, phase backward) and checks all of them against its own: ranks
/// running the backwards of different forwards (layers run back in different orders, say) all
/// fail with [`Error::EpMismatch`], naming a peer and both headers, and no row moves. A rank
/// whose own arguments are refused still sends its header, with the abort flag, so that its
/// peers fail at once with the `EpMismatch` naming it. Waits for that header exchange (a host
/// read, bounded by the transport's timeout; the rank's dOut rows are packed meanwhile), so it
/// cannot be captured.
#[allow(clippy::too_many_arguments)] // moe_backward's arguments, plus the group
pub fn ep_moe_backward<'x, 'w, 'd, T: HalfElement>(
    group: &mut EpGroup,
    ctx: &mut EpContext<T>,
    coeff: Coefficient,
    x: impl Into<TensorView<'x, T>>,
    w: impl Into<MoeWeightViews<'w, T>>,
    dout: impl Into<TensorView<'d, T>>,
    grads: MoeGrads<T>,
    options: impl Into<BackwardOptions>,
) -> Result<()> {
    let (x, w, dout, options) = (x.into(), w.into(), dout.into(), options.into());
    if group.dev.is_capturing()? {
        // The header exchange reads back to the host. (The peers, if they are not capturing,
        // end their wait for this rank in EpTimeout.)
        return Err(Error::CaptureUnsupported(
            "the expert-parallel backward reads the exchanged call headers back to the host; it \
             cannot be captured in a CUDA graph"
                .into(),
        ));
    }
    let prepared = prepare_backward(group, ctx, &coeff, (&x, &w, &dout, &grads), options);
    let (saved, cfg, router) = match prepared {
        Ok(p) => p,
        Err(e) => {
            // Still take part in the header exchange, with the abort flag, so that the peers
            // fail at once (EpMismatch naming this rank) instead of waiting out their timeout.
            // The header's fields are not compared once the flag is seen.
            let header = ctx.saved.as_ref().map_or(
                CallHeader {
                    seq: group.seq,
                    layer_id: 0,
                    phase: Phase::Backward,
                    setup_digest: group.digest,
                    training: true,
                },
                |s| s.header.backward(),
            );
            let msg = header.header_message(group.rank(), true);
            send_abort(group, ctx, &msg, BACKWARD_HEADER);
            return Err(e);
        }
    };
    let (t, h) = (cfg.tokens, cfg.hidden);
    let (cap, received) = (saved.capacity, saved.ep.received);

    let header = saved.ep.header.backward();
    let msg = header.header_message(group.rank(), false);
    let dev = group.dev.clone();
    ctx.msg.ensure(&dev, msg.len())?;
    dev.stream().memcpy_htod(&msg, &mut ctx.msg.view_mut()?)?;
    post_messages(group, ctx, msg.len(), BACKWARD_HEADER)?;
    // Packed while the headers travel: nothing of it depends on the peers.
    gather_douts(group, ctx, (&dout, t, h, cap), received)?;
    let headers = read_messages(group, ctx, msg.len(), BACKWARD_HEADER)?;
    header.check_header_messages(group.transport.world(), &headers)?;

    let traffic = &saved.ep.traffic;
    send_douts(group, ctx, traffic, h)?;
    let out = BatchWeightGrads {
        gate: &mut *grads.gate,
        up: &mut *grads.up,
        down: &mut *grads.down,
        accumulate: options.accumulate,
        chunking_pairs: Some(traffic.total_pairs()),
    };
    owner_backward(group, ctx, (&cfg, saved.path), &w, received, out)?;
    return_pair_grads(group, ctx, traffic, h, received)?;
    group.transport.wait("backward returns")?;
    router_half(
        &mut ctx.source,
        (&cfg, router),
        &coeff,
        (&x, &w.router),
        (grads.dx, grads.router),
        options,
    )
}

/// What a backward that passed its own checks works from.
struct BackwardPlan {
    /// The forward's header, traffic and received rows.
    ep: EpSaved,
    /// The source's pair capacity in that forward.
    capacity: usize,
    path: GemmPath,
}

/// The backward's checks of its own arguments and the sizing of its buffers: everything that
/// may fail before the header exchange, after which a rank that fails leaves its peers waiting.
/// Returns the plan, the forward's configuration and its router.
fn prepare_backward<T: HalfElement>(
    group: &EpGroup,
    ctx: &mut EpContext<T>,
    coeff: &Coefficient,
    (x, w, dout, grads): (
        &TensorView<T>,
        &MoeWeightViews<T>,
        &TensorView<T>,
        &MoeGrads<T>,
    ),
    options: BackwardOptions,
) -> Result<(BackwardPlan, LayerConfig, RouterKind)> {
    let ep = match &ctx.saved {
        Some(s) if s.training => s.clone(),
        Some(_) => {
            return Err(Error::InvalidConfig(
                "ep_moe_backward: the last forward did not keep what a backward needs (make \
                 the context with EpContext::for_training)"
                    .into(),
            ))
        }
        None => {
            return Err(Error::InvalidConfig(
                "ep_moe_backward: this context holds no successful forward".into(),
            ))
        }
    };
    let src_saved = ctx
        .source
        .saved_forward()
        .ok_or_else(|| Error::InvalidConfig("ep_moe_backward: no forward record".into()))?
        .clone();
    let (cfg, router) = (src_saved.config, src_saved.router);
    group.check_call::<T>(&cfg, router)?;
    if !std::sync::Arc::ptr_eq(ctx.source.dev.stream(), group.dev.stream()) {
        // As in the forward; the owner's row GEMMs also share the context's tile counter,
        // which only launches ordered on one stream may.
        return Err(Error::InvalidConfig(
            "the expert-parallel group and context must be made from the same Device".into(),
        ));
    }
    options.validate()?;
    check_coefficient(&ctx.source, coeff)?;
    let el = group.partition.local_experts();
    check_backward_inputs(&ctx.source, &cfg, el, x, w, dout, grads)?;

    let dev = &group.dev;
    let (h, f) = (cfg.hidden, cfg.ffn);
    let (capacity, received) = (src_saved.capacity, ep.received);
    let path = ctx.source.gemm_path()?;
    ctx.source.bwd.size_router_half(dev, capacity, &cfg)?;
    ctx.owner_bwd
        .size_expert_half(dev, received, (h, f, el), path)?;
    ctx.source.upload_fixed_coeff(coeff)?;
    let plan = BackwardPlan { ep, capacity, path };
    Ok((plan, cfg, router))
}

/// This rank's dOut rows in pair order, into `dout_send` (so that each owner's are one range);
/// and room for the `received` rows it gets as an owner.
fn gather_douts<T: HalfElement>(
    group: &EpGroup,
    ctx: &mut EpContext<T>,
    (dout, t, h, cap): (&TensorView<T>, usize, usize, usize),
    received: usize,
) -> Result<()> {
    let dev = &group.dev;
    let e = group.partition.experts();
    ctx.dout_send.ensure(dev, cap * h)?;
    ctx.recv_dout.ensure(dev, received * h)?;
    let src = &ctx.source;
    gather_rows(
        dev,
        dout,
        t,
        &src.routing.pair_token,
        &mut ctx.dout_send,
        (&src.routing.expert_offsets, e),
        cap,
        h,
    )
}

/// This rank's dOut rows to the owners of their pairs, in the forward's ranges.
fn send_douts<T: HalfElement>(
    group: &mut EpGroup,
    ctx: &mut EpContext<T>,
    traffic: &TrafficMatrix,
    h: usize,
) -> Result<()> {
    let rank = group.rank();
    let (send, recv) = (traffic.send_offsets(rank), traffic.receive_bases(rank));
    group.transport.exchange(
        &group.dev,
        "backward rows",
        (&ctx.dout_send.view()?, &row_ranges(&send, h)),
        (&mut ctx.recv_dout.view_mut()?, &row_ranges(&recv, h)),
    )
}

/// The expert half of the backward on the rows this rank received, in its local order: its
/// experts' weight gradients, and each received pair's dR and dX.
fn owner_backward<T: HalfElement>(
    group: &EpGroup,
    ctx: &mut EpContext<T>,
    (cfg, path): (&LayerConfig, GemmPath),
    w: &MoeWeightViews<T>,
    received: usize,
    out: BatchWeightGrads<'_>,
) -> Result<()> {
    let (h, f, el) = (cfg.hidden, cfg.ffn, group.partition.local_experts());
    let d = &ctx.dispatch;
    let batch = d.batch(el, received, (h, f));
    let inp = BatchGradInputs {
        x: ctx.recv_x.view()?,
        x_rows: received,
        dout: ctx.recv_dout.view()?,
        dout_rows: received,
        pair_gate: &d.pair_gate,
        g: &ctx.g,
        u: &ctx.u,
        gate: &w.gate,
        up: &w.up,
        down: &w.down,
    };
    let mut bufs = ctx
        .owner_bwd
        .batch_bufs(&mut ctx.act, &mut ctx.source.row_sched);
    batch.backward(&group.dev, path, &inp, &mut bufs, out)
}

/// Each received pair's dX row and dR back to receive order, then home: they land in the
/// source's per-pair buffers in its pair order, where its router half reads them.
fn return_pair_grads<T: HalfElement>(
    group: &mut EpGroup,
    ctx: &mut EpContext<T>,
    traffic: &TrafficMatrix,
    h: usize,
    received: usize,
) -> Result<()> {
    let dev = group.dev.clone();
    let (rank, world) = (group.rank(), group.transport.world());
    ctx.dx_ret.ensure(&dev, received * h)?;
    ctx.dr_ret.ensure(&dev, received)?;
    let d = &ctx.dispatch;
    gather_rows(
        &dev,
        &ctx.owner_bwd.dx_pair,
        received,
        &d.pair_of_row,
        &mut ctx.dx_ret,
        (&d.src_base, world),
        received,
        h,
    )?;
    permute_32(
        &dev,
        &ctx.owner_bwd.dr,
        &d.pair_of_row,
        &mut ctx.dr_ret,
        &d.src_base,
        world,
        received,
    )?;
    let (home, from) = (traffic.send_offsets(rank), traffic.receive_bases(rank));
    group.transport.exchange(
        &dev,
        "backward dx",
        (&ctx.dx_ret.view()?, &row_ranges(&from, h)),
        (
            &mut ctx.source.bwd.dx_pair.view_mut()?,
            &row_ranges(&home, h),
        ),
    )?;
    group.transport.exchange(
        &dev,
        "backward dr",
        (&ctx.dr_ret.view()?, &row_ranges(&from, 1)),
        (&mut ctx.source.bwd.dr.view_mut()?, &row_ranges(&home, 1)),
    )
}
