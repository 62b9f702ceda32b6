//! Expert parallelism between two GPUs over NCCL against one GPU: forward+backward steps of the
//! ReMoE layer at docs/SPEC.md's configurations with T tokens **per GPU**, the all-to-all bytes each
//! rank sends (exact, from the call's traffic matrix), and the bare NCCL link rate in the same
//! run. Needs two GPUs, the `ep` feature and libnccl (a `libnccl.so` on the loader path).
//!
//!   NCCL_NVLS_ENABLE=0 scripts/with-cuda cargo run --release --features ep --example ep_bench \
//!       -- [--iters N] [--warmup N] [--load uniform|skewed] [--json PATH] [CONFIG...]
//!
//! Per timed iteration, in one loop: the one-GPU step on GPU 0 (rank 0's tokens, all the
//! weights), then the two-rank step, each rank bracketing its own step with CUDA events after a
//! host barrier; the two-rank step's time is the slower rank's. Tokens/s: T / one-GPU time
//! against 2T / two-rank time; the target is 1.8x at C. NVLink SHARP (multicast) must
//! stay off on the shared machines: the benchmark refuses to run unless NCCL_NVLS_ENABLE=0.

#[path = "../benches/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use remoe_kernels::ep::nccl::{library_present, nccl_version, EpComm, NcclId};
use remoe_kernels::ep::{
    ep_moe_backward, ep_moe_forward, EpContext, EpGroup, EpSetup, TrafficMatrix, Transport,
};
use remoe_kernels::{
    Coefficient, DType, Device, DeviceTensor, Error, GemmPath, LayerConfig, MoeGrads, RouterKind,
};
use remoe_testkit::synthetic::{to_bf16, HostProblem};
use support::{host_problem, named, named_list, Load, Setup, Timing, COEFF};

const WORLD: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(120);
/// The bare link test's message each way.
const LINK_BYTES: usize = 256 << 20;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LoadArg {
    Uniform,
    Skewed,
}

/// Expert parallelism on two GPUs against one GPU (see the module documentation).
#[derive(Parser)]
#[command(name = "ep_bench")]
struct Args {
    /// Timed iterations per configuration.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// How the tokens spread over the experts.
    #[arg(long, value_enum, default_value_t = LoadArg::Uniform)]
    load: LoadArg,
    /// Where to write the JSON rows.
    #[arg(long, default_value = "ep-bench.json")]
    json: PathBuf,
    /// docs/SPEC.md's configurations to run (default C and D).
    configs: Vec<String>,
}

/// One rank's share of a configuration: its group, context, tokens and weights, gradients.
struct RankState {
    dev: Device,
    group: EpGroup,
    ctx: EpContext<bf16>,
    cfg: LayerConfig,
    x: DeviceTensor<bf16>,
    dout: DeviceTensor<bf16>,
    weights: [DeviceTensor<bf16>; 4],
    out: DeviceTensor<bf16>,
    grads: (DeviceTensor<bf16>, [DeviceTensor<f32>; 4]),
}

impl RankState {
    fn new(p: &HostProblem, rank: usize, id: &NcclId) -> Result<Self, Error> {
        let dev = Device::new(rank)?;
        let t = p.cfg.tokens / WORLD;
        let cfg = LayerConfig { tokens: t, ..p.cfg };
        let (h, f, e) = (cfg.hidden, cfg.ffn, cfg.experts);
        let el = e / WORLD;
        let comm = EpComm::new(&dev, rank, WORLD, id, TIMEOUT)?;
        let setup = EpSetup {
            world: WORLD,
            config: cfg,
            dtype: DType::BF16,
            router: RouterKind::Relu,
        };
        let group = EpGroup::new(&dev, Transport::Nccl(comm), setup)?;
        let up = |v: &[f64], shape: &[usize]| DeviceTensor::from_host(&dev, &to_bf16(v), shape);
        let own = |v: &[f64], per: usize, shape: &[usize]| {
            up(&v[rank * el * per..(rank + 1) * el * per], shape)
        };
        let rows = &p.x[rank * t * h..(rank + 1) * t * h];
        let dout: Vec<f64> = rows.iter().map(|v| 0.5 - v.abs()).collect();
        let zeros = |shape: &[usize]| DeviceTensor::<f32>::zeros(&dev, shape);
        Ok(Self {
            group,
            ctx: EpContext::for_training(&dev),
            cfg,
            x: up(rows, &[t, h])?,
            dout: up(&dout, &[t, h])?,
            weights: [
                up(&p.params.router, &[h, e])?,
                own(&p.params.gate, h * f, &[el, h, f])?,
                own(&p.params.up, h * f, &[el, h, f])?,
                own(&p.params.down, f * h, &[el, f, h])?,
            ],
            out: DeviceTensor::zeros(&dev, &[t, h])?,
            grads: (
                DeviceTensor::zeros(&dev, &[t, h])?,
                [
                    zeros(&[h, e])?,
                    zeros(&[el, h, f])?,
                    zeros(&[el, h, f])?,
                    zeros(&[el, f, h])?,
                ],
            ),
            dev,
        })
    }

    /// One training forward and backward through the group.
    fn step(&mut self) -> Result<(), Error> {
        let [r, g, u, d] = &self.weights;
        let w = remoe_kernels::MoeWeights {
            router: r,
            gate: g,
            up: u,
            down: d,
        };
        let c = Coefficient::Fixed(COEFF);
        let kind = RouterKind::Relu;
        let (ctx, group) = (&mut self.ctx, &mut self.group);
        ep_moe_forward(
            group,
            ctx,
            &self.cfg,
            kind,
            c,
            0,
            &self.x,
            &w,
            &mut self.out,
        )?;
        let (dx, [dwr, dwg, dwu, dwd]) = &mut self.grads;
        let grads = MoeGrads {
            dx,
            router: dwr,
            gate: dwg,
            up: dwu,
            down: dwd,
        };
        ep_moe_backward(
            group,
            ctx,
            Coefficient::Fixed(COEFF),
            &self.x,
            &w,
            &self.dout,
            grads,
            false,
        )
    }

    /// The step's CUDA-event time in ms (the stream is synchronised).
    fn timed_step(&mut self) -> Result<f64, Error> {
        let ctx = self.dev.context();
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let stop = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(self.dev.stream())?;
        self.step()?;
        stop.record(self.dev.stream())?;
        stop.synchronize()?;
        Ok(start.elapsed_ms(&stop)? as f64)
    }
}

/// Bytes rank `r` sends to the other rank in one training step: rows and gates out, results
/// back, dOut rows out, dX rows and dR back.
fn bytes_sent(m: &TrafficMatrix, r: usize, h: usize) -> usize {
    let q = 1 - r;
    let (out, back) = (m.pairs(r, q), m.pairs(q, r));
    out * (2 * h + 4) + back * 4 * h + out * 2 * h + back * (2 * h + 4)
}

/// Median [min-max] of the bare NCCL exchange of LINK_BYTES each way (ms), per rank.
fn link_rate(id: NcclId, iters: usize) -> Result<Timing, Error> {
    let results: Vec<Result<Vec<f64>, Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WORLD)
            .map(|rank| {
                s.spawn(move || -> Result<Vec<f64>, Error> {
                    let dev = Device::new(rank)?;
                    let mut comm = EpComm::new(&dev, rank, WORLD, &id, TIMEOUT)?;
                    let n = LINK_BYTES / 4;
                    let send = dev.stream().alloc_zeros::<f32>(n)?;
                    let mut recv = dev.stream().alloc_zeros::<f32>(n)?;
                    // Everything to the peer, nothing to itself.
                    let (to, from) = if rank == 0 {
                        ([0..0, 0..n], [0..0, 0..n])
                    } else {
                        ([0..n, n..n], [0..n, n..n])
                    };
                    let mut ms = Vec::with_capacity(iters);
                    for i in 0..iters + 2 {
                        let ctx = dev.context();
                        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
                        let stop = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
                        start.record(dev.stream())?;
                        comm.exchange(
                            "link",
                            (&send.slice(..), &to),
                            (&mut recv.slice_mut(..), &from),
                        )?;
                        stop.record(dev.stream())?;
                        comm.wait("link")?;
                        if i >= 2 {
                            ms.push(start.elapsed_ms(&stop)? as f64);
                        }
                    }
                    Ok(ms)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let per_rank = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(Timing::new(slowest(&per_rank)))
}

/// Per iteration, the slower rank's time.
fn slowest(per_rank: &[Vec<f64>]) -> Vec<f64> {
    (0..per_rank[0].len())
        .map(|i| per_rank.iter().map(|r| r[i]).fold(0.0, f64::max))
        .collect()
}

/// One configuration: the one-GPU steps (on GPU 0, interleaved with the two-rank steps) and the
/// two-rank steps, plus rank 0's and rank 1's bytes sent per step.
fn run_config(
    p: &HostProblem,
    args: &Args,
    load: Load,
) -> Result<(Timing, Timing, [usize; WORLD]), Error> {
    let id = NcclId::new()?;
    let t = p.cfg.tokens / WORLD;
    let barrier = Arc::new(Barrier::new(WORLD));
    let rank0_problem = HostProblem {
        cfg: LayerConfig { tokens: t, ..p.cfg },
        x: p.x[..t * p.cfg.hidden].to_vec(),
        params: p.params.clone(),
    };
    type RankOut = (Vec<f64>, Vec<f64>, usize);
    let results: Vec<Result<RankOut, Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WORLD)
            .map(|rank| {
                let (barrier, id, rank0_problem) = (Arc::clone(&barrier), &id, &rank0_problem);
                s.spawn(move || -> Result<RankOut, Error> {
                    let mut st = RankState::new(p, rank, id)?;
                    let path = GemmPath::for_device(&st.dev)?;
                    let mut single = if rank == 0 {
                        Some(Setup::from_problem(&st.dev, rank0_problem, load, &[path])?)
                    } else {
                        None
                    };
                    let (mut one, mut ep) = (Vec::new(), Vec::new());
                    for i in 0..args.warmup + args.iters {
                        let timed = i >= args.warmup;
                        if let Some(single) = single.as_mut() {
                            let ms = support::time_interleaved(&st.dev, 0, 1, 1, |_, _| {
                                single.forward_backward(RouterKind::Relu, path)
                            })?;
                            if timed {
                                one.push(ms[0].median());
                            }
                        }
                        barrier.wait();
                        let ms = st.timed_step()?;
                        if timed {
                            ep.push(ms);
                        }
                    }
                    let h = st.cfg.hidden;
                    let sent = st
                        .ctx
                        .saved()
                        .map_or(0, |saved| bytes_sent(saved.traffic(), rank, h));
                    Ok((one, ep, sent))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let results = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let one = Timing::new(results[0].0.clone());
    let ep = Timing::new(slowest(
        &results.iter().map(|r| r.1.clone()).collect::<Vec<_>>(),
    ));
    Ok((one, ep, [results[0].2, results[1].2]))
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    if std::env::var("NCCL_NVLS_ENABLE").as_deref() != Ok("0") {
        eprintln!("ep_bench: set NCCL_NVLS_ENABLE=0 (NVLink SHARP stays off on shared machines)");
        std::process::exit(2);
    }
    library_present()?;
    Device::new(WORLD - 1)?;
    let load = match args.load {
        LoadArg::Uniform => Load::Uniform,
        LoadArg::Skewed => Load::Skewed,
    };
    let names: Vec<String> = if args.configs.is_empty() {
        vec!["C".into(), "D".into()]
    } else {
        args.configs.clone()
    };
    let version = nccl_version()?;
    let link = link_rate(NcclId::new()?, args.iters)?;
    let link_gbs = LINK_BYTES as f64 / (link.median() * 1e-3) / 1e9;
    println!("NCCL {version}; bare send/recv of {} MiB each way: {} ms, {link_gbs:.1} GB/s per direction", LINK_BYTES >> 20, link.fmt());
    let mut rows = Vec::new();
    println!(
        "{:<4} {:<8} {:>8} {:>26} {:>26} {:>8} {:>12} {:>10}",
        "cfg",
        "load",
        "T/GPU",
        "one GPU fwd+bwd ms",
        "EP=2 fwd+bwd ms",
        "speedup",
        "sent MB/rank",
        "ideal ms"
    );
    for name in &names {
        let Some(cfg) = named(name).map(|n| &n.cfg) else {
            eprintln!(
                "ep_bench: no configuration {name} (the named ones: {})",
                named_list()
            );
            std::process::exit(2);
        };
        // T per GPU: the problem holds both ranks' tokens.
        let total = LayerConfig {
            tokens: cfg.tokens * WORLD,
            ..*cfg
        };
        let p = host_problem(total, load);
        let (one, ep, sent) = run_config(&p, &args, load)?;
        let speedup = 2.0 * one.median() / ep.median();
        let most = sent.iter().copied().max().unwrap_or(0) as f64;
        let ideal_ms = most / (link_gbs * 1e9) * 1e3;
        println!(
            "{:<4} {:<8} {:>8} {:>26} {:>26} {:>7.2}x {:>12.1} {:>10.3}",
            name,
            load.name(),
            cfg.tokens,
            one.fmt(),
            ep.fmt(),
            speedup,
            most / 1e6,
            ideal_ms
        );
        rows.push(serde_json::json!({
            "config": name, "load": load.name(), "tokens_per_gpu": cfg.tokens,
            "one_gpu_ms": {"median": one.median(), "min": one.min(), "max": one.max()},
            "ep2_ms": {"median": ep.median(), "min": ep.min(), "max": ep.max()},
            "tokens_per_s_one_gpu": cfg.tokens as f64 / (one.median() * 1e-3),
            "tokens_per_s_ep2": (WORLD * cfg.tokens) as f64 / (ep.median() * 1e-3),
            "speedup": speedup,
            "bytes_sent_per_rank": sent,
            "link_gbs_per_direction": link_gbs,
            "ideal_exchange_ms": ideal_ms,
        }));
    }
    let doc = serde_json::json!({ "nccl_version": version, "iters": args.iters, "rows": rows });
    std::fs::write(&args.json, serde_json::to_string_pretty(&doc).unwrap())
        .unwrap_or_else(|e| panic!("writing {}: {e}", args.json.display()));
    Ok(())
}
