//! The expert-parallel protocol as a specification, on the CPU (`reference::expert_parallel`):
//! R ranks, each with its own tokens, exchanging pairs with the experts' owners, give **bitwise**
//! the one-rank layer's results. Rank r's output, routing, dX and dWr are those of the one-rank
//! layer on r's tokens alone; owner q's expert gradients are those of the one-rank layer on all
//! ranks' tokens concatenated in rank order, restricted to q's experts. The GPU layer is held to
//! the same claims.
//!
//! The call headers that keep the ranks in step are checked here too, over the host loopback
//! hub (threads, no GPU): ranks that run the backwards of different forwards all fail.
//!
//! Seeds come from `REMOE_SEED` or are fresh, and are printed (remoe-testkit).

use std::time::Duration;

use remoe_kernels::ep::{
    CallHeader, Endpoint, EpSetup, ExpertPartition, LoopbackHub, Msg, Phase, ReceivePlan,
    TrafficMatrix,
};
use remoe_kernels::reference::expert_parallel::{
    ep_remoe_backward, ep_remoe_forward, ep_topk_backward, ep_topk_forward, shard_params,
};
use remoe_kernels::reference::{
    remoe_backward_scaled, remoe_forward, topk_backward_scaled, topk_forward, LayerGrads,
    LayerParams, TOPK_AUX_COEFF,
};
use remoe_kernels::{DType, Error, LayerConfig, RouterKind};
use remoe_testkit::rng::{fresh_seed, seeded, TestRng, UniformVec};

const H: usize = 8;
const F: usize = 12;
const LAMBDA: f64 = 0.7;
const BALANCE_GRAD_SCALE: f64 = 3.0;

/// Rank counts, experts and each rank's token count: unequal, with 0, 1 and primes.
const SHAPES: &[(usize, usize, &[usize])] = &[
    (1, 4, &[13]),
    (2, 4, &[7, 11]),
    (2, 8, &[0, 13]),
    (4, 8, &[5, 1, 0, 17]),
    (4, 4, &[3, 9, 2, 6]),
];

struct Problem {
    part: ExpertPartition,
    cfg: LayerConfig,
    params: LayerParams<f64>,
    xs: Vec<Vec<f64>>,
    douts: Vec<Vec<f64>>,
}

impl Problem {
    fn new(world: usize, e: usize, tokens: &[usize], k: usize, rng: &mut TestRng) -> Self {
        let cfg = LayerConfig::new(0, H, F, e, k);
        let params = LayerParams {
            router: rng.vec_uniform(H * e, 0.5),
            gate: rng.vec_uniform(e * H * F, 0.8),
            up: rng.vec_uniform(e * H * F, 0.8),
            down: rng.vec_uniform(e * F * H, 0.8),
        };
        Self {
            part: ExpertPartition::new(e, world).unwrap(),
            cfg,
            params,
            xs: tokens
                .iter()
                .map(|&t| rng.vec_uniform(t * H, 1.0))
                .collect(),
            douts: tokens
                .iter()
                .map(|&t| rng.vec_uniform(t * H, 1.0))
                .collect(),
        }
    }

    fn world(&self) -> usize {
        self.part.world()
    }

    fn shards(&self) -> Vec<LayerParams<f64>> {
        (0..self.world())
            .map(|r| shard_params(&self.params, &self.cfg, self.part, r))
            .collect()
    }

    fn cfg_with(&self, tokens: usize) -> LayerConfig {
        LayerConfig { tokens, ..self.cfg }
    }

    /// Rank r's tokens alone, for the one-rank layer.
    fn rank_cfg(&self, r: usize) -> LayerConfig {
        self.cfg_with(self.xs[r].len() / H)
    }

    /// All ranks' tokens (and dOut rows) in rank order.
    fn concatenated(&self) -> (LayerConfig, Vec<f64>, Vec<f64>) {
        let x = self.xs.concat();
        (self.cfg_with(x.len() / H), x, self.douts.concat())
    }

    /// Owner q's block of a one-rank gradient of all E experts.
    fn owned_block(&self, full: &[f64], q: usize) -> Vec<f64> {
        let hf = H * F;
        let e = self.part.experts_of(q);
        full[e.start * hf..e.end * hf].to_vec()
    }

    /// The checks common to both routers, given the expert-parallel gradients and, for the
    /// one-rank layer, each rank's alone and the concatenation's.
    fn check_grads(
        &self,
        what: &str,
        ep: &[LayerGrads<f64>],
        alone: &[LayerGrads<f64>],
        all: &LayerGrads<f64>,
    ) {
        for r in 0..self.world() {
            let at = format!("{what}, rank {r} of {}", self.world());
            assert_bitwise(&ep[r].dx, &alone[r].dx, H, &format!("{at}: dX"));
            assert_bitwise(
                &ep[r].params.router,
                &alone[r].params.router,
                self.cfg.experts,
                &format!("{at}: dWr"),
            );
            for (name, got, full) in [
                ("dWg", &ep[r].params.gate, &all.params.gate),
                ("dWu", &ep[r].params.up, &all.params.up),
                ("dWd", &ep[r].params.down, &all.params.down),
            ] {
                let want = self.owned_block(full, r);
                assert_bitwise(got, &want, H * F, &format!("{at}: {name}"));
            }
        }
    }
}

/// Equal bit for bit, reporting the first differing row (of `width` values).
fn assert_bitwise(got: &[f64], want: &[f64], width: usize, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (row, (g, w)) in got.chunks(width).zip(want.chunks(width)).enumerate() {
        let same = g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "{what}: row {row} differs:\n  got  {g:?}\n  want {w:?}"
        );
    }
}

#[test]
fn each_ranks_remoe_forward_is_bitwise_the_one_rank_layer_on_its_tokens() {
    let seed = fresh_seed();
    println!("seed {seed} (replay with REMOE_SEED={seed})");
    for &(world, e, tokens) in SHAPES {
        let p = Problem::new(world, e, tokens, 2, &mut seeded(seed));
        let ep = ep_remoe_forward(p.part, &p.cfg, &p.xs, &p.shards(), LAMBDA);
        for r in 0..world {
            let one = remoe_forward(&p.xs[r], &p.params, &p.rank_cfg(r), LAMBDA);
            let at = format!("R = {world}, E = {e}, rank {r} (T = {})", tokens[r]);
            assert_bitwise(&ep[r].out, &one.out, H, &format!("{at}: out"));
            assert_eq!(ep[r].routing.counts, one.routing.counts, "{at}: n_e");
            assert_eq!(ep[r].dispatch, one.dispatch, "{at}: dispatch");
            assert_eq!(ep[r].reg_loss.to_bits(), one.reg_loss.to_bits(), "{at}");
        }
    }
}

#[test]
fn each_ranks_topk_forward_is_bitwise_the_one_rank_layer_on_its_tokens() {
    let seed = fresh_seed();
    println!("seed {seed} (replay with REMOE_SEED={seed})");
    for &(world, e, tokens) in SHAPES {
        let p = Problem::new(world, e, tokens, 2, &mut seeded(seed));
        let ep = ep_topk_forward(p.part, &p.cfg, &p.xs, &p.shards(), TOPK_AUX_COEFF);
        for r in 0..world {
            let one = topk_forward(&p.xs[r], &p.params, &p.rank_cfg(r), TOPK_AUX_COEFF);
            let at = format!("R = {world}, E = {e}, rank {r} (T = {})", tokens[r]);
            assert_bitwise(&ep[r].out, &one.out, H, &format!("{at}: out"));
            assert_eq!(ep[r].dispatch, one.dispatch, "{at}: dispatch");
            assert_eq!(ep[r].aux_loss.to_bits(), one.aux_loss.to_bits(), "{at}");
        }
    }
}

#[test]
fn remoe_gradients_are_the_one_rank_layers_and_expert_gradients_stay_with_their_owner() {
    let seed = fresh_seed();
    println!("seed {seed} (replay with REMOE_SEED={seed})");
    for &(world, e, tokens) in SHAPES {
        let p = Problem::new(world, e, tokens, 2, &mut seeded(seed));
        let shards = p.shards();
        let fwd = ep_remoe_forward(p.part, &p.cfg, &p.xs, &shards, LAMBDA);
        let ep = ep_remoe_backward(
            p.part,
            &p.cfg,
            &p.xs,
            &shards,
            LAMBDA,
            &fwd,
            &p.douts,
            BALANCE_GRAD_SCALE,
        );
        let alone: Vec<_> = (0..world)
            .map(|r| {
                let cfg = p.rank_cfg(r);
                let one = remoe_forward(&p.xs[r], &p.params, &cfg, LAMBDA);
                let (x, dout) = (&p.xs[r], &p.douts[r]);
                remoe_backward_scaled(x, &p.params, &cfg, LAMBDA, &one, dout, BALANCE_GRAD_SCALE)
            })
            .collect();
        let (cfg, x, dout) = p.concatenated();
        let one = remoe_forward(&x, &p.params, &cfg, LAMBDA);
        let all = remoe_backward_scaled(&x, &p.params, &cfg, LAMBDA, &one, &dout, 1.0);
        p.check_grads(&format!("ReMoE, E = {e}"), &ep, &alone, &all);
    }
}

#[test]
fn topk_gradients_are_the_one_rank_layers_and_expert_gradients_stay_with_their_owner() {
    let seed = fresh_seed();
    println!("seed {seed} (replay with REMOE_SEED={seed})");
    for &(world, e, tokens) in SHAPES {
        let p = Problem::new(world, e, tokens, 2, &mut seeded(seed));
        let shards = p.shards();
        let c = TOPK_AUX_COEFF;
        let fwd = ep_topk_forward(p.part, &p.cfg, &p.xs, &shards, c);
        let s = BALANCE_GRAD_SCALE;
        let ep = ep_topk_backward(p.part, &p.cfg, &p.xs, &shards, c, &fwd, &p.douts, s);
        let alone: Vec<_> = (0..world)
            .map(|r| {
                let cfg = p.rank_cfg(r);
                let one = topk_forward(&p.xs[r], &p.params, &cfg, c);
                topk_backward_scaled(&p.xs[r], &p.params, &cfg, c, &one, &p.douts[r], s)
            })
            .collect();
        let (cfg, x, dout) = p.concatenated();
        let one = topk_forward(&x, &p.params, &cfg, c);
        let all = topk_backward_scaled(&x, &p.params, &cfg, c, &one, &dout, 1.0);
        p.check_grads(&format!("TopK, E = {e}"), &ep, &alone, &all);
    }
}

#[test]
fn an_owner_that_receives_nothing_sends_and_returns_empty_messages() {
    // ReMoE: rank 0's experts get a zero router column, so their logits are exactly 0 and
    // never active; every pair of both ranks goes to rank 1, and owner 0 computes nothing.
    let seed = fresh_seed();
    println!("seed {seed} (replay with REMOE_SEED={seed})");
    let mut p = Problem::new(2, 4, &[9, 6], 2, &mut seeded(seed));
    let e = p.cfg.experts;
    for i in 0..H {
        for ei in p.part.experts_of(0) {
            p.params.router[i * e + ei] = 0.0;
        }
    }
    let shards = p.shards();
    let fwd = ep_remoe_forward(p.part, &p.cfg, &p.xs, &shards, LAMBDA);

    let header = CallHeader {
        seq: 0,
        layer_id: 0,
        phase: Phase::Forward,
        setup_digest: 0,
        training: false,
    };
    let msgs: Vec<_> = (0..2)
        .map(|r| header.count_message(r, &fwd[r].dispatch.offsets, false))
        .collect();
    let m = TrafficMatrix::from_messages(p.part, &header, &msgs).unwrap();
    assert_eq!(
        m.receive_bases(0),
        vec![0, 0, 0],
        "owner 0 receives nothing"
    );
    assert!(
        m.pairs(0, 1) > 0 && m.pairs(1, 1) > 0,
        "owner 1 receives from both"
    );
    assert_eq!(ReceivePlan::new(&m, 0).pairs(), 0);

    for (r, f) in fwd.iter().enumerate() {
        let one = remoe_forward(&p.xs[r], &p.params, &p.rank_cfg(r), LAMBDA);
        assert_bitwise(&f.out, &one.out, H, &format!("rank {r}: out"));
    }
    let ep = ep_remoe_backward(p.part, &p.cfg, &p.xs, &shards, LAMBDA, &fwd, &p.douts, 1.0);
    let alone: Vec<_> = (0..2)
        .map(|r| {
            let cfg = p.rank_cfg(r);
            let one = remoe_forward(&p.xs[r], &p.params, &cfg, LAMBDA);
            remoe_backward_scaled(&p.xs[r], &p.params, &cfg, LAMBDA, &one, &p.douts[r], 1.0)
        })
        .collect();
    let (cfg, x, dout) = p.concatenated();
    let one = remoe_forward(&x, &p.params, &cfg, LAMBDA);
    let all = remoe_backward_scaled(&x, &p.params, &cfg, LAMBDA, &one, &dout, 1.0);
    p.check_grads("one owner idle", &ep, &alone, &all);
    assert!(
        ep[0].params.gate.iter().all(|&v| v == 0.0),
        "an idle owner's expert gradients are zero"
    );
}

/// One rank's side of the protocol's host messages over the loopback hub, as the GPU layer
/// sends them (there as device buffers): a forward's count message, a backward's header message.
struct HostRank {
    ep: Endpoint<Vec<u32>>,
    part: ExpertPartition,
    digest: u32,
    /// The group's call counter.
    seq: u32,
}

impl HostRank {
    /// Sends `msg` to every rank in the exchange `op`; returns every rank's, by sender.
    fn all_to_all(
        &mut self,
        op: &'static str,
        msg: Vec<u32>,
    ) -> remoe_kernels::Result<Vec<Vec<u32>>> {
        let world = self.part.world();
        let bytes = 4 * msg.len();
        let sends = (0..world)
            .map(|_| Msg {
                bytes,
                payload: msg.clone(),
            })
            .collect();
        self.ep.exchange(op, sends, &vec![bytes; world])
    }

    /// A training forward of layer `layer_id` whose dispatch has `offsets` \[E+1\]: its header
    /// and the checked traffic matrix.
    fn forward(
        &mut self,
        layer_id: u32,
        offsets: &[u32],
    ) -> remoe_kernels::Result<(CallHeader, TrafficMatrix)> {
        let header = CallHeader {
            seq: self.seq,
            layer_id,
            phase: Phase::Forward,
            setup_digest: self.digest,
            training: true,
        };
        self.seq += 1;
        let msg = header.count_message(self.ep.rank(), offsets, false);
        let got = self.all_to_all("forward counts", msg)?;
        Ok((
            header,
            TrafficMatrix::from_messages(self.part, &header, &got)?,
        ))
    }

    /// The header exchange that opens the backward of the forward `forward` (with the abort
    /// flag: this rank failed a check of its own).
    fn backward(&mut self, forward: &CallHeader, abort: bool) -> remoe_kernels::Result<()> {
        let header = forward.backward();
        let msg = header.header_message(self.ep.rank(), abort).to_vec();
        let got = self.all_to_all("backward header", msg)?;
        header.check_header_messages(self.part.world(), &got)
    }
}

#[test]
fn ranks_running_the_backwards_of_different_forwards_all_fail_before_any_row_moves() {
    let seed = fresh_seed();
    println!("seed {seed} (replay with REMOE_SEED={seed})");
    // Two layers on the same tokens and weights: the same traffic, so the rows of one layer's
    // backward would fit the other's buffers exactly, and only the headers tell them apart.
    let p = Problem::new(2, 4, &[9, 6], 2, &mut seeded(seed));
    let fwd = ep_remoe_forward(p.part, &p.cfg, &p.xs, &p.shards(), LAMBDA);
    let digest = EpSetup {
        world: 2,
        config: p.cfg,
        dtype: DType::BF16,
        router: RouterKind::Relu,
    }
    .digest()
    .unwrap();
    let hub = LoopbackHub::<Vec<u32>>::new(2).unwrap();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let (hub, fwd) = (&hub, &fwd);
                s.spawn(move || {
                    let mut r = HostRank {
                        ep: hub.endpoint(rank, Duration::from_secs(30)).unwrap(),
                        part: p.part,
                        digest,
                        seq: 0,
                    };
                    let offsets = &fwd[rank].dispatch.offsets;
                    let layers = [
                        r.forward(0, offsets).unwrap(),
                        r.forward(1, offsets).unwrap(),
                    ];
                    assert_eq!(layers[0].1, layers[1].1, "the two layers' traffic");
                    // Rank 0 runs layer 1's backward, then layer 0's; rank 1 the reverse.
                    let swapped = if rank == 0 { [1, 0] } else { [0, 1] };
                    let failed: Vec<_> = swapped
                        .iter()
                        .map(|&l| r.backward(&layers[l].0, false))
                        .collect();
                    // Nothing is poisoned: the backwards in the same order (the reverse of the
                    // forwards') then pass on both ranks.
                    let right: Vec<_> = [1, 0]
                        .iter()
                        .map(|&l| r.backward(&layers[l].0, false))
                        .collect();
                    // Rank 1 refuses its own arguments in layer 0's backward and aborts it.
                    let aborted = r.backward(&layers[0].0, rank == 1);
                    (failed, right, aborted)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let describe =
        |call: u32| format!("layer {call}, call {call}, backward, training, setup {digest:#010x}");
    for (rank, (failed, right, aborted)) in results.into_iter().enumerate() {
        let peer = 1 - rank;
        let swapped = if rank == 0 { [1, 0] } else { [0, 1] };
        for (attempt, r) in failed.into_iter().enumerate() {
            let (ours, theirs) = (swapped[attempt], swapped[1 - attempt]);
            assert_eq!(
                r,
                Err(Error::EpMismatch {
                    rank: peer,
                    what: format!(
                        "call number {theirs} where this rank has {ours} (its header: {}; this \
                         rank's: {})",
                        describe(theirs),
                        describe(ours)
                    ),
                }),
                "rank {rank}, swapped backward {attempt}"
            );
        }
        for (attempt, r) in right.into_iter().enumerate() {
            assert_eq!(r, Ok(()), "rank {rank}, backward {attempt} in step");
        }
        match aborted {
            Err(Error::EpMismatch { rank: 1, what }) => {
                assert!(what.contains("aborted"), "rank {rank}: {what}")
            }
            other => panic!("rank {rank}: {other:?}, not the abort of rank 1"),
        }
    }
}
