//! The expert-parallel layer on the CPU: R ranks simulated in one process, each holding its own
//! tokens, the replicated router and its block of experts, exchanging exactly what the GPU layer
//! will exchange ([`crate::ep`]).
//!
//! Forward, on every rank: route its tokens (as one rank would); the count messages and the
//! [`TrafficMatrix`]; the rows of each owner's experts to that owner, in the source's pair
//! order; on the owner, the experts over its pairs in [`ReceivePlan`] order (expert, then
//! source), the results put back in receive order and returned; on the source, the combine of
//! the returned rows, which land at their own pair indices. The backward sends each pair's
//! dOut row (with the rows and gates the forward sent, which a GPU owner keeps), runs each
//! pair's backward on the owner, and returns each pair's dX row and dOut . y; the weight
//! gradients stay on their owner.
//!
//! What this pins down, and the tests check bitwise: rank r's output, routing statistics, dX
//! and router gradient are those of the one-rank layer on rank r's tokens alone; owner q's
//! expert gradients are those of the one-rank layer on all ranks' tokens concatenated in rank
//! order, restricted to q's experts.

use std::ops::Range;

use super::layer::{
    combine, pair_backward, remoe_d_logits, router_backward, to_real, topk_d_logits, ExpertGrads,
};
use super::{
    l1_balance_loss, relu_router, softmax_topk_router, swiglu_expert_forward, Dispatch, LayerGrads,
    LayerParams, Real, RemoeForward, TopkForward,
};
use crate::config::LayerConfig;
use crate::ep::{CallHeader, ExpertPartition, Phase, ReceivePlan, TrafficMatrix};

/// Rank `rank`'s share of the layer's parameters: the router weight (every rank has all of it)
/// and the experts it owns, `gate` and `up` \[El,H,F\], `down` \[El,F,H\].
pub fn shard_params<T: Real>(
    params: &LayerParams<T>,
    cfg: &LayerConfig,
    part: ExpertPartition,
    rank: usize,
) -> LayerParams<T> {
    assert_eq!(part.experts(), cfg.experts, "partition of another E");
    let hf = cfg.hidden * cfg.ffn;
    let block = |w: &[T]| {
        let e = part.experts_of(rank);
        w[e.start * hf..e.end * hf].to_vec()
    };
    LayerParams {
        router: params.router.clone(),
        gate: block(&params.gate),
        up: block(&params.up),
        down: block(&params.down),
    }
}

/// The ReMoE layer over R ranks: `xs[r]` \[T_r,H\] are rank r's tokens (T_r may differ, and be
/// 0), `shards[r]` its [`shard_params`]; `cfg` gives H, F, E and k (its `tokens` is not used).
/// Returns each rank's forward, with its routing and its L1 regulariser computed from its own
/// tokens.
pub fn ep_remoe_forward<T: Real>(
    part: ExpertPartition,
    cfg: &LayerConfig,
    xs: &[Vec<T>],
    shards: &[LayerParams<T>],
    lambda: f64,
) -> Vec<RemoeForward<T>> {
    Ranks::new(part, cfg, xs, shards).forward(
        |x, wr, cfg| relu_router(x, wr, cfg),
        |r| r.dispatch(cfg.experts),
        |cfg, routing, dispatch, out| RemoeForward {
            reg_loss: l1_balance_loss(&routing.counts, &routing.gate_sums, cfg, lambda),
            out,
            routing,
            dispatch,
        },
    )
}

/// The TopK layer over R ranks (see [`ep_remoe_forward`]), with each rank's Switch aux loss at
/// `aux_coeff`.
pub fn ep_topk_forward<T: Real>(
    part: ExpertPartition,
    cfg: &LayerConfig,
    xs: &[Vec<T>],
    shards: &[LayerParams<T>],
    aux_coeff: f64,
) -> Vec<TopkForward<T>> {
    Ranks::new(part, cfg, xs, shards).forward(
        |x, wr, cfg| softmax_topk_router(x, wr, cfg),
        |r| r.dispatch(cfg.experts),
        |cfg, routing, dispatch, out| TopkForward {
            aux_loss: l1_balance_loss(&routing.counts, &routing.prob_sums, cfg, aux_coeff),
            out,
            routing,
            dispatch,
        },
    )
}

/// The backward of [`ep_remoe_forward`] given each rank's `douts[r]` \[T_r,H\], with the
/// regulariser's gradient scaled by `balance_grad_scale` (as
/// [`remoe_backward_scaled`](super::remoe_backward_scaled)). Rank r's [`LayerGrads`] hold dX
/// \[T_r,H\] and dWr \[H,E\] of its own tokens, and the gradients of the experts it owns:
/// `gate` and `up` \[El,H,F\], `down` \[El,F,H\], over every rank's pairs of those experts.
#[allow(clippy::too_many_arguments)]
pub fn ep_remoe_backward<T: Real>(
    part: ExpertPartition,
    cfg: &LayerConfig,
    xs: &[Vec<T>],
    shards: &[LayerParams<T>],
    lambda: f64,
    fwds: &[RemoeForward<T>],
    douts: &[Vec<T>],
    balance_grad_scale: f64,
) -> Vec<LayerGrads<T>> {
    let ranks = Ranks::new(part, cfg, xs, shards);
    let dispatches: Vec<_> = fwds.iter().map(|f| &f.dispatch).collect();
    ranks.backward(&dispatches, douts, |r, d_gate_pairs| {
        remoe_d_logits(
            &ranks.cfg_of(r),
            lambda * balance_grad_scale,
            &fwds[r],
            d_gate_pairs,
        )
    })
}

/// The backward of [`ep_topk_forward`] (see [`ep_remoe_backward`]), with the aux loss's
/// gradient scaled by `balance_grad_scale`.
#[allow(clippy::too_many_arguments)]
pub fn ep_topk_backward<T: Real>(
    part: ExpertPartition,
    cfg: &LayerConfig,
    xs: &[Vec<T>],
    shards: &[LayerParams<T>],
    aux_coeff: f64,
    fwds: &[TopkForward<T>],
    douts: &[Vec<T>],
    balance_grad_scale: f64,
) -> Vec<LayerGrads<T>> {
    let ranks = Ranks::new(part, cfg, xs, shards);
    let dispatches: Vec<_> = fwds.iter().map(|f| &f.dispatch).collect();
    ranks.backward(&dispatches, douts, |r, d_gate_pairs| {
        topk_d_logits(
            &ranks.cfg_of(r),
            aux_coeff * balance_grad_scale,
            &fwds[r],
            d_gate_pairs,
        )
    })
}

/// The R simulated ranks' inputs, checked once.
struct Ranks<'a, T> {
    part: ExpertPartition,
    cfg: LayerConfig,
    xs: &'a [Vec<T>],
    shards: &'a [LayerParams<T>],
}

impl<'a, T: Real> Ranks<'a, T> {
    fn new(
        part: ExpertPartition,
        cfg: &LayerConfig,
        xs: &'a [Vec<T>],
        shards: &'a [LayerParams<T>],
    ) -> Self {
        cfg.validate()
            .expect("reference called with an invalid config");
        let (r, h, f, e) = (part.world(), cfg.hidden, cfg.ffn, cfg.experts);
        assert_eq!(part.experts(), e, "partition of another E");
        assert_eq!(xs.len(), r, "one x per rank");
        assert_eq!(shards.len(), r, "one shard per rank");
        let el = part.local_experts();
        for (x, s) in xs.iter().zip(shards) {
            assert!(x.len().is_multiple_of(h), "x is not [T,H]");
            assert_eq!(s.router.len(), h * e, "router is not [H,E]");
            assert_eq!(s.gate.len(), el * h * f, "gate shard is not [El,H,F]");
            assert_eq!(s.up.len(), el * h * f, "up shard is not [El,H,F]");
            assert_eq!(s.down.len(), el * f * h, "down shard is not [El,F,H]");
        }
        Self {
            part,
            cfg: *cfg,
            xs,
            shards,
        }
    }

    /// Rank r's layer: its own T.
    fn cfg_of(&self, r: usize) -> LayerConfig {
        LayerConfig {
            tokens: self.xs[r].len() / self.cfg.hidden,
            ..self.cfg
        }
    }

    /// Every rank's count message to every rank, and the matrix each of them builds.
    fn exchange_counts(&self, dispatches: &[&Dispatch<T>], phase: Phase) -> TrafficMatrix {
        let header = CallHeader {
            seq: 0,
            layer_id: 0,
            phase,
            setup_digest: 0,
            training: false,
        };
        let msgs: Vec<_> = dispatches
            .iter()
            .enumerate()
            .map(|(r, d)| header.count_message(r, &d.offsets, false))
            .collect();
        TrafficMatrix::from_messages(self.part, &header, &msgs)
            .expect("the simulated ranks send alike headers")
    }

    /// Source s's token row of each of its pairs in `pairs`, in pair order.
    fn rows_of(&self, s: usize, d: &Dispatch<T>, pairs: Range<usize>) -> Vec<T> {
        let h = self.cfg.hidden;
        d.tokens[pairs]
            .iter()
            .flat_map(|&t| {
                self.xs[s][t as usize * h..(t as usize + 1) * h]
                    .iter()
                    .copied()
            })
            .collect()
    }

    /// The forward: each rank routes its own tokens (`route(x, wr, cfg)`, then `dispatch`),
    /// the experts run on their owners, and each rank's forward is `finish(its cfg, routing,
    /// dispatch, out)`.
    fn forward<G, O>(
        &self,
        route: impl Fn(&[T], &[T], &LayerConfig) -> G,
        dispatch: impl Fn(&G) -> Dispatch<T>,
        finish: impl Fn(&LayerConfig, G, Dispatch<T>, Vec<T>) -> O,
    ) -> Vec<O> {
        let world = self.part.world();
        let routings: Vec<G> = (0..world)
            .map(|r| route(&self.xs[r], &self.shards[r].router, &self.cfg_of(r)))
            .collect();
        let dispatches: Vec<Dispatch<T>> = routings.iter().map(dispatch).collect();
        let outs = self.experts_and_combine(&dispatches);
        routings
            .into_iter()
            .zip(dispatches)
            .zip(outs)
            .enumerate()
            .map(|(r, ((g, d), out))| finish(&self.cfg_of(r), g, d, out))
            .collect()
    }

    /// The forward's experts and combine: each rank's output.
    fn experts_and_combine(&self, dispatches: &[Dispatch<T>]) -> Vec<Vec<T>> {
        let dispatches: Vec<&Dispatch<T>> = dispatches.iter().collect();
        let m = self.exchange_counts(&dispatches, Phase::Forward);
        let (h, f) = (self.cfg.hidden, self.cfg.ffn);
        let recv_x = to_owners(&m, h, |s, pairs| self.rows_of(s, dispatches[s], pairs));
        let y_recv: Vec<Vec<f64>> = (0..self.part.world())
            .map(|q| {
                let plan = ReceivePlan::new(&m, q);
                let mut y_local = vec![0.0f64; plan.pairs() * h];
                for j in 0..self.part.local_experts() {
                    let (wg, wu, wd) = self.shards[q].expert(j, &self.cfg);
                    for p in plan.expert_offsets[j]..plan.expert_offsets[j + 1] {
                        let i = plan.row_of_pair[p];
                        let x = &recv_x[q][i * h..(i + 1) * h];
                        let acts = swiglu_expert_forward(x, wg, wu, wd, h, f);
                        y_local[p * h..(p + 1) * h].copy_from_slice(&acts.y);
                    }
                }
                to_receive_order(&plan, &y_local, h)
            })
            .collect();
        let y = to_sources(&m, h, |q, rows| y_recv[q][rows].to_vec());
        (0..self.part.world())
            .map(|s| combine(&self.cfg_of(s), dispatches[s], &y[s]))
            .collect()
    }

    /// The backward: the pairs' backward on their owners, then each source's router backward
    /// from the dL that `d_logits(rank, dOut . y per pair)` gives.
    fn backward(
        &self,
        dispatches: &[&Dispatch<T>],
        douts: &[Vec<T>],
        d_logits: impl Fn(usize, &[f64]) -> Vec<f64>,
    ) -> Vec<LayerGrads<T>> {
        let world = self.part.world();
        let (h, f, e) = (self.cfg.hidden, self.cfg.ffn, self.cfg.experts);
        assert_eq!(douts.len(), world, "one dout per rank");
        for (r, d) in douts.iter().enumerate() {
            assert_eq!(d.len(), self.xs[r].len(), "dout is not [T,H]");
        }
        let m = self.exchange_counts(dispatches, Phase::Backward);
        // What the forward sent (a GPU owner keeps it), and each pair's dOut row and gate.
        let recv_x = to_owners(&m, h, |s, pairs| self.rows_of(s, dispatches[s], pairs));
        let recv_dout = to_owners(&m, h, |s, pairs| {
            let d = dispatches[s];
            d.tokens[pairs]
                .iter()
                .flat_map(|&t| {
                    douts[s][t as usize * h..(t as usize + 1) * h]
                        .iter()
                        .copied()
                })
                .collect()
        });
        let recv_gate = to_owners(&m, 1, |s, pairs| dispatches[s].gates[pairs].to_vec());

        let owned_len = self.part.local_experts() * h * f;
        let mut owner_grads = Vec::with_capacity(world);
        let mut dx_recv = Vec::with_capacity(world);
        let mut dgate_recv = Vec::with_capacity(world);
        for q in 0..world {
            let plan = ReceivePlan::new(&m, q);
            let mut acc = OwnerGrads::zeros(owned_len);
            let mut dx_local = vec![0.0f64; plan.pairs() * h];
            let mut dgate_local = vec![0.0f64; plan.pairs()];
            for j in 0..self.part.local_experts() {
                let mut grads = acc.expert(j, h * f);
                for p in plan.expert_offsets[j]..plan.expert_offsets[j + 1] {
                    let i = plan.row_of_pair[p];
                    let rows = i * h..(i + 1) * h;
                    dgate_local[p] = pair_backward(
                        &recv_x[q][rows.clone()],
                        self.shards[q].expert(j, &self.cfg),
                        recv_gate[q][i].to_f64(),
                        &recv_dout[q][rows],
                        (h, f),
                        &mut dx_local[p * h..(p + 1) * h],
                        &mut grads,
                    );
                }
            }
            dx_recv.push(to_receive_order(&plan, &dx_local, h));
            dgate_recv.push(to_receive_order(&plan, &dgate_local, 1));
            owner_grads.push(acc);
        }
        let dx_pairs = to_sources(&m, h, |q, rows| dx_recv[q][rows].to_vec());
        let dgate_pairs = to_sources(&m, 1, |q, rows| dgate_recv[q][rows].to_vec());

        owner_grads
            .into_iter()
            .enumerate()
            .map(|(s, owned)| {
                let cfg = self.cfg_of(s);
                // The token sum in pair order: each token's experts in ascending order.
                let mut dx = vec![0.0f64; cfg.tokens * h];
                let d = dispatches[s];
                for (p, &t) in d.tokens.iter().enumerate() {
                    let t = t as usize;
                    for (o, v) in dx[t * h..(t + 1) * h]
                        .iter_mut()
                        .zip(&dx_pairs[s][p * h..(p + 1) * h])
                    {
                        *o += v;
                    }
                }
                let dl = d_logits(s, &dgate_pairs[s]);
                let mut d_router = vec![0.0f64; h * e];
                let router = &self.shards[s].router;
                router_backward(&self.xs[s], router, &cfg, &dl, &mut dx, &mut d_router);
                LayerGrads {
                    dx: to_real(dx),
                    params: LayerParams {
                        router: to_real(d_router),
                        gate: to_real(owned.gate),
                        up: to_real(owned.up),
                        down: to_real(owned.down),
                    },
                }
            })
            .collect()
    }
}

/// An owner's f64 accumulators of its experts' gradients.
struct OwnerGrads {
    gate: Vec<f64>,
    up: Vec<f64>,
    down: Vec<f64>,
}

impl OwnerGrads {
    fn zeros(n: usize) -> Self {
        Self {
            gate: vec![0.0; n],
            up: vec![0.0; n],
            down: vec![0.0; n],
        }
    }

    fn expert(&mut self, j: usize, hf: usize) -> ExpertGrads<'_> {
        let w = j * hf..(j + 1) * hf;
        ExpertGrads {
            gate: &mut self.gate[w.clone()],
            up: &mut self.up[w.clone()],
            down: &mut self.down[w],
        }
    }
}

/// Source to owner: source s sends owner q `payload(s, pairs)` for its pairs of q's experts
/// (`width` values per pair); owner q receives source 0's rows, then source 1's, and so on.
fn to_owners<M: Clone>(
    m: &TrafficMatrix,
    width: usize,
    payload: impl Fn(usize, Range<usize>) -> Vec<M>,
) -> Vec<Vec<M>> {
    let world = m.partition().world();
    let sends: Vec<Vec<Vec<M>>> = (0..world)
        .map(|s| {
            let off = m.send_offsets(s);
            (0..world)
                .map(|q| {
                    let msg = payload(s, off[q]..off[q + 1]);
                    assert_eq!(msg.len(), m.pairs(s, q) * width, "message of another size");
                    msg
                })
                .collect()
        })
        .collect();
    transpose(sends)
        .into_iter()
        .map(|from| from.concat())
        .collect()
}

/// Owner to source, the way back: owner q returns source s `payload(q, rows)` for the values
/// of the rows it received from s (`width` values per row, receive order); source s receives
/// owner 0's, then owner 1's, ...: its own pair order.
fn to_sources<M: Clone>(
    m: &TrafficMatrix,
    width: usize,
    payload: impl Fn(usize, Range<usize>) -> Vec<M>,
) -> Vec<Vec<M>> {
    let world = m.partition().world();
    let sends: Vec<Vec<Vec<M>>> = (0..world)
        .map(|q| {
            let base = m.receive_bases(q);
            (0..world)
                .map(|s| payload(q, base[s] * width..base[s + 1] * width))
                .collect()
        })
        .collect();
    transpose(sends)
        .into_iter()
        .map(|from| from.concat())
        .collect()
}

/// `sends[a][b]`, what rank a sends rank b, as `received[b][a]`: the all-to-all.
fn transpose<M>(sends: Vec<Vec<Vec<M>>>) -> Vec<Vec<Vec<M>>> {
    let world = sends.len();
    let mut received: Vec<Vec<Vec<M>>> = (0..world).map(|_| Vec::with_capacity(world)).collect();
    for row in sends {
        assert_eq!(row.len(), world, "a message for every rank");
        for (b, msg) in row.into_iter().enumerate() {
            received[b].push(msg);
        }
    }
    received
}

/// Values in local pair order (`width` per pair) put back in receive order.
fn to_receive_order(plan: &ReceivePlan, local: &[f64], width: usize) -> Vec<f64> {
    plan.pair_of_row
        .iter()
        .flat_map(|&p| local[p * width..(p + 1) * width].iter().copied())
        .collect()
}
