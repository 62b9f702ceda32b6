//! The expert-parallel forward on one GPU, R ranks as threads over the device loopback: each
//! rank's output and statistics are bitwise those of the one-GPU layer run on that rank's
//! tokens alone with the full weights, while each rank holds only its E/R experts' weights.
//! Ranks that disagree on their setup all get the same `EpMismatch`; a rank that never joins
//! ends its peers' wait in `EpTimeout`, not a hang.
//!
//! Every case runs twice: the second run's output and workspace are poisoned first, so an
//! element nobody wrote fails the comparison.

mod common;

use std::time::{Duration, Instant};

use common::{gpu_or_skip, seed_note};
use half::bf16;
use remoe_kernels::ep::transport::{DeviceLoopback, Handoff};
use remoe_kernels::ep::{ep_moe_forward, EpContext, EpGroup, EpSetup, LoopbackHub, Transport};
use remoe_kernels::{
    moe_forward, Coefficient, DType, Device, DeviceTensor, Error, ForwardStats, GemmPath,
    LayerConfig, MoeContext, MoeWeights, RouterKind,
};
use remoe_testkit::rng::fresh_seed;
use remoe_testkit::synthetic::{problem_with_density, to_bf16, HostProblem};

const TIMEOUT: Duration = Duration::from_secs(30);

fn coeff(router: RouterKind) -> Coefficient<'static> {
    Coefficient::Fixed(if router == RouterKind::Relu {
        1e-3
    } else {
        1e-2
    })
}

/// What one rank's forward gave.
struct RankRun {
    out: Vec<u16>,
    stats: ForwardStats,
}

/// Rank `rank`'s rows of the problem (the ranks' tokens are its X's rows, in rank order).
fn rank_rows(p: &HostProblem, tokens: &[usize], rank: usize) -> Vec<f64> {
    let h = p.cfg.hidden;
    let first: usize = tokens[..rank].iter().sum();
    p.x[first * h..(first + tokens[rank]) * h].to_vec()
}

/// One rank: joins the group, runs the forward twice (the second time on poisoned buffers).
fn ep_rank(
    hub: &LoopbackHub<Handoff>,
    p: &HostProblem,
    tokens: &[usize],
    rank: usize,
    (router, path): (RouterKind, GemmPath),
) -> remoe_kernels::Result<RankRun> {
    let world = tokens.len();
    let dev = Device::new(0)?;
    let cfg = LayerConfig {
        tokens: tokens[rank],
        ..p.cfg
    };
    let (h, f, e) = (cfg.hidden, cfg.ffn, cfg.experts);
    let el = e / world;
    let up = |v: &[f64], shape: &[usize]| DeviceTensor::from_host(&dev, &to_bf16(v), shape);
    let x = up(&rank_rows(p, tokens, rank), &[cfg.tokens, h])?;
    let router_w = up(&p.params.router, &[h, e])?;
    let own = |v: &[f64], per: usize, shape: &[usize]| {
        up(&v[rank * el * per..(rank + 1) * el * per], shape)
    };
    let gate = own(&p.params.gate, h * f, &[el, h, f])?;
    let upw = own(&p.params.up, h * f, &[el, h, f])?;
    let down = own(&p.params.down, f * h, &[el, f, h])?;
    let w = MoeWeights {
        router: &router_w,
        gate: &gate,
        up: &upw,
        down: &down,
    };
    let transport = Transport::Loopback(DeviceLoopback::new(hub, rank, TIMEOUT)?);
    let setup = EpSetup {
        world,
        config: cfg,
        dtype: DType::BF16,
        router,
    };
    let mut group = EpGroup::new(&dev, transport, setup)?;
    let mut ctx = EpContext::<bf16>::new(&dev);
    ctx.set_gemm_path(path)?;
    let mut out = DeviceTensor::<bf16>::zeros(&dev, &[cfg.tokens, h])?;
    ep_moe_forward(
        &mut group,
        &mut ctx,
        &cfg,
        router,
        coeff(router),
        7,
        &x,
        &w,
        &mut out,
    )?;
    ctx.poison_workspace()?;
    out.poison()?;
    ep_moe_forward(
        &mut group,
        &mut ctx,
        &cfg,
        router,
        coeff(router),
        7,
        &x,
        &w,
        &mut out,
    )?;
    let stats = ctx.stats()?;
    let out = out.to_host()?.iter().map(|v| v.to_bits()).collect();
    Ok(RankRun { out, stats })
}

/// The one-GPU forward on rank `rank`'s tokens with all the weights.
fn one_gpu(
    dev: &Device,
    p: &HostProblem,
    tokens: &[usize],
    rank: usize,
    (router, path): (RouterKind, GemmPath),
) -> RankRun {
    let cfg = LayerConfig {
        tokens: tokens[rank],
        ..p.cfg
    };
    let (h, f, e) = (cfg.hidden, cfg.ffn, cfg.experts);
    let up = |v: &[f64], shape: &[usize]| DeviceTensor::from_host(dev, &to_bf16(v), shape).unwrap();
    let x = up(&rank_rows(p, tokens, rank), &[cfg.tokens, h]);
    let (r, g, u, d) = (
        up(&p.params.router, &[h, e]),
        up(&p.params.gate, &[e, h, f]),
        up(&p.params.up, &[e, h, f]),
        up(&p.params.down, &[e, f, h]),
    );
    let w = MoeWeights {
        router: &r,
        gate: &g,
        up: &u,
        down: &d,
    };
    let mut ctx = MoeContext::<bf16>::new(dev);
    ctx.set_gemm_path(path).unwrap();
    let mut out = DeviceTensor::<bf16>::zeros(dev, &[cfg.tokens, h]).unwrap();
    moe_forward(&mut ctx, &cfg, router, coeff(router), &x, &w, &mut out).unwrap();
    let stats = ctx.stats().unwrap();
    let out = out.to_host().unwrap().iter().map(|v| v.to_bits()).collect();
    RankRun { out, stats }
}

fn check_case(
    dev: &Device,
    (router, path): (RouterKind, GemmPath),
    cfg: LayerConfig,
    tokens: &[usize],
    density: &[f64],
) {
    let seed = fresh_seed();
    let what = format!(
        "{router:?} {path:?} E {} H {} F {} T {tokens:?} {}",
        cfg.experts,
        cfg.hidden,
        cfg.ffn,
        seed_note(seed)
    );
    let total = LayerConfig {
        tokens: tokens.iter().sum(),
        ..cfg
    };
    let p = problem_with_density(total, density, seed);
    let hub = LoopbackHub::new(tokens.len()).unwrap();
    let runs: Vec<RankRun> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..tokens.len())
            .map(|rank| {
                let (hub, p) = (&hub, &p);
                s.spawn(move || ep_rank(hub, p, tokens, rank, (router, path)))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join()
                    .expect("rank thread")
                    .unwrap_or_else(|e| panic!("rank {rank}: {e}, {what}"))
            })
            .collect()
    });
    for (rank, ep) in runs.iter().enumerate() {
        let want = one_gpu(dev, &p, tokens, rank, (router, path));
        assert_eq!(
            ep.stats.tokens_per_expert, want.stats.tokens_per_expert,
            "rank {rank} n_e, {what}"
        );
        assert_eq!(
            ep.stats.active_pairs, want.stats.active_pairs,
            "rank {rank} |A|, {what}"
        );
        assert_eq!(
            ep.stats.balance_loss.to_bits(),
            want.stats.balance_loss.to_bits(),
            "rank {rank} balance loss, {what}"
        );
        let h = cfg.hidden;
        for (t, (got, exp)) in ep.out.chunks(h).zip(want.out.chunks(h)).enumerate() {
            if let Some(j) = (0..h).find(|&j| got[j] != exp[j]) {
                panic!(
                    "rank {rank} token {t} column {j}: {} where the one-GPU layer has {}, {what}",
                    bf16::from_bits(got[j]),
                    bf16::from_bits(exp[j])
                );
            }
        }
    }
}

#[test]
fn ep_forward_is_bitwise_the_one_gpu_layer_on_each_ranks_tokens() {
    let Some(dev) = gpu_or_skip("ep_forward_is_bitwise_the_one_gpu_layer_on_each_ranks_tokens")
    else {
        return;
    };
    let paths: Vec<GemmPath> = [GemmPath::Hopper, GemmPath::MmaSync]
        .into_iter()
        .filter(|p| p.supported_on(&dev).unwrap())
        .collect();
    for path in paths {
        for router in [RouterKind::Relu, RouterKind::TopK] {
            let kind = (router, path);
            // F = 1024 with equal T: the down projection splits K (the same count on every
            // rank).
            let c = LayerConfig::new(0, 256, 1024, 8, 2);
            check_case(&dev, kind, c, &[200, 200], &[0.3; 8]);
            // F = 256 never splits, so unequal T (0, 1, primes) stays bitwise.
            let c = LayerConfig::new(0, 128, 256, 8, 2);
            check_case(&dev, kind, c, &[97, 0, 1, 331], &[0.4; 8]);
            // 64 experts, 32 per rank, 8 of them never chosen by ReMoE.
            let c = LayerConfig::new(0, 128, 256, 64, 4);
            let mut d = vec![0.05; 64];
            d[..8].fill(0.0);
            check_case(&dev, kind, c, &[509, 263], &d);
        }
        // ReMoE with every token on expert 7 (rank 1's): rank 0 owns nothing that is used.
        let c = LayerConfig::new(0, 128, 256, 8, 1);
        let mut d = vec![0.0; 8];
        d[7] = 1.0;
        check_case(&dev, (RouterKind::Relu, path), c, &[150, 150], &d);
    }
}

#[test]
fn ranks_set_up_differently_all_refuse_the_group() {
    let Some(_dev) = gpu_or_skip("ranks_set_up_differently_all_refuse_the_group") else {
        return;
    };
    let hub = LoopbackHub::<Handoff>::new(2).unwrap();
    let results: Vec<remoe_kernels::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let hub = &hub;
                s.spawn(move || {
                    let dev = Device::new(0)?;
                    let t = Transport::Loopback(DeviceLoopback::new(hub, rank, TIMEOUT)?);
                    let hidden = if rank == 0 { 64 } else { 72 };
                    let setup = EpSetup {
                        world: 2,
                        config: LayerConfig::new(0, hidden, 128, 8, 2),
                        dtype: DType::BF16,
                        router: RouterKind::Relu,
                    };
                    EpGroup::new(&dev, t, setup).map(|_| ())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, r) in results.iter().enumerate() {
        match r {
            Err(Error::EpMismatch { rank: 1, what }) => {
                assert!(what.contains("H = 72"), "rank {rank}: {what}")
            }
            other => panic!("rank {rank}: {other:?}, not the mismatch of rank 1"),
        }
    }
}

#[test]
fn a_rank_that_never_joins_ends_the_wait_in_a_timeout() {
    let Some(dev) = gpu_or_skip("a_rank_that_never_joins_ends_the_wait_in_a_timeout") else {
        return;
    };
    let hub = LoopbackHub::<Handoff>::new(2).unwrap();
    let timeout = Duration::from_secs(1);
    let t = Transport::Loopback(DeviceLoopback::new(&hub, 0, timeout).unwrap());
    let setup = EpSetup {
        world: 2,
        config: LayerConfig::new(0, 64, 128, 8, 2),
        dtype: DType::BF16,
        router: RouterKind::Relu,
    };
    let start = Instant::now();
    let r = EpGroup::new(&dev, t, setup);
    assert!(matches!(r, Err(Error::EpTimeout { .. })), "{r:?}");
    assert!(
        start.elapsed() < 2 * timeout,
        "waited {:?}",
        start.elapsed()
    );
}
