//! Small-batch latency of the ReMoE layer (issue 9): T = 1, 8, 64 and 512 tokens at docs/SPEC.md's
//! config S shape (H 768, F 3072, E 8, k 1), the inference forward and the training
//! forward+backward, each three ways, timed interleaved in one loop:
//!
//! - `eager`: the crate's calls on a device made by `Device::new` (cudarc's per-buffer event
//!   tracking on: every launch records an event per buffer and waits on the last write's);
//! - `eager-untracked`: the same calls on a device made by `Device::new_untracked`;
//! - `graph`: the same calls captured once in a CUDA graph (untracked device), replayed.
//!
//! Each sample is the CUDA-event time from an event recorded before the host enqueues the work
//! to one recorded after it, with the GPU idle at the start: when the host is slower to enqueue
//! than the GPU is to run, the gaps count, which is what "launch-bound" means. The host's own
//! time to enqueue (wall clock) is reported beside it. Inputs rotate over three copies of X and
//! of the weights (the weights alone are 113 MB, so the copies together exceed the 50 MB L2).
//! Medians with min and max.
//!
//!   scripts/with-cuda cargo run --release --example latency -- [--iters N] [--json PATH]
//!       [--tokens T (one batch size instead of all four)]

#[path = "../benches/support/mod.rs"]
mod support;

use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use remoe_kernels::graph::{capture, Graph};
use remoe_kernels::{
    moe_backward, remoe_forward, Coefficient, Device, DeviceTensor, Error, LayerConfig, MoeContext,
    MoeGrads,
};
use remoe_testkit::rng::{seeded, Rng};
use remoe_testkit::synthetic::{problem_with_density, uniform_density, DeviceProblem};
use support::{named, Timing};

const COPIES: usize = 3;
const TOKENS: [usize; 4] = [1, 8, 64, 512];
const COEFF: f64 = 1e-3;

/// Everything one device runs: rotated inputs, a context per mode, gradients.
struct Layer {
    cfg: LayerConfig,
    problems: Vec<DeviceProblem>,
    dout: DeviceTensor<bf16>,
    out: DeviceTensor<bf16>,
    inference: MoeContext<bf16>,
    training: MoeContext<bf16>,
    dx: DeviceTensor<bf16>,
    dw: [DeviceTensor<f32>; 4],
}

impl Layer {
    fn new(dev: &Device, cfg: LayerConfig) -> Result<Self, Error> {
        let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
        let problems = (0..COPIES)
            .map(|i| {
                let p =
                    problem_with_density(cfg, &uniform_density(e, 1.0 / e as f64), 70 + i as u64);
                DeviceProblem::upload(dev, &p)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut rng = seeded(9);
        let dout: Vec<bf16> = (0..t * h)
            .map(|_| bf16::from_f64(rng.random_range(-1.0..1.0)))
            .collect();
        Ok(Self {
            cfg,
            problems,
            dout: DeviceTensor::from_host(dev, &dout, &[t, h])?,
            out: DeviceTensor::zeros(dev, &[t, h])?,
            inference: MoeContext::new(dev),
            training: MoeContext::for_training(dev),
            dx: DeviceTensor::zeros(dev, &[t, h])?,
            dw: [
                DeviceTensor::zeros(dev, &[h, e])?,
                DeviceTensor::zeros(dev, &[e, h, f])?,
                DeviceTensor::zeros(dev, &[e, h, f])?,
                DeviceTensor::zeros(dev, &[e, f, h])?,
            ],
        })
    }

    fn forward(&mut self, i: usize) -> Result<(), Error> {
        let d = &self.problems[i];
        remoe_forward(
            &mut self.inference,
            &self.cfg,
            Coefficient::Fixed(COEFF),
            &d.x,
            &d.weights(),
            &mut self.out,
        )
    }

    fn forward_backward(&mut self, i: usize) -> Result<(), Error> {
        let d = &self.problems[i];
        let fixed = || Coefficient::Fixed(COEFF);
        remoe_forward(
            &mut self.training,
            &self.cfg,
            fixed(),
            &d.x,
            &d.weights(),
            &mut self.out,
        )?;
        let [router, gate, up, down] = &mut self.dw;
        let grads = MoeGrads {
            dx: &mut self.dx,
            router,
            gate,
            up,
            down,
        };
        moe_backward(
            &mut self.training,
            fixed(),
            &d.x,
            &d.weights(),
            &self.dout,
            grads,
            false,
        )
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Eager,
    EagerUntracked,
    Graph,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Eager => "eager",
            Mode::EagerUntracked => "eager-untracked",
            Mode::Graph => "graph",
        }
    }
}

/// One sample: GPU span (ms) from before the host enqueues to after, and the host's enqueue
/// time (ms).
fn sample(dev: &Device, work: impl FnOnce() -> Result<(), Error>) -> Result<(f64, f64), Error> {
    let ctx = dev.context();
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let stop = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    dev.stream().synchronize()?;
    start.record(dev.stream())?;
    let host = Instant::now();
    work()?;
    let host_ms = host.elapsed().as_secs_f64() * 1e3;
    stop.record(dev.stream())?;
    stop.synchronize()?;
    Ok((start.elapsed_ms(&stop)? as f64, host_ms))
}

/// docs/SPEC.md's configuration S (H 768, F 3072, E 8, k 1); the batch sizes vary.
fn config_s() -> LayerConfig {
    named("S").expect("S is a named configuration").cfg
}

struct Row {
    tokens: usize,
    what: &'static str,
    mode: Mode,
    gpu: Timing,
    host: Timing,
}

fn measure(tokens: usize, iters: usize, warmup: usize) -> Result<Vec<Row>, Error> {
    let cfg = LayerConfig {
        tokens,
        ..config_s()
    };
    let tracked = Device::new(0)?;
    // SAFETY: this program uses the untracked device's one stream only.
    let untracked = unsafe { Device::new_untracked(0)? };
    let mut a = Layer::new(&tracked, cfg)?;
    let mut b = Layer::new(&untracked, cfg)?;
    // Warm both contexts on every input copy, then capture one graph per copy and mode.
    for i in 0..COPIES {
        a.forward(i)?;
        a.forward_backward(i)?;
        b.forward(i)?;
        b.forward_backward(i)?;
    }
    let mut fwd_graphs: Vec<Graph> = Vec::new();
    let mut step_graphs: Vec<Graph> = Vec::new();
    for i in 0..COPIES {
        fwd_graphs.push(capture(&untracked, || b.forward(i))?);
        step_graphs.push(capture(&untracked, || b.forward_backward(i))?);
    }
    for g in fwd_graphs.iter().chain(&step_graphs) {
        g.upload()?;
    }
    let modes = [Mode::Eager, Mode::EagerUntracked, Mode::Graph];
    let mut samples = vec![(Vec::new(), Vec::new()); 6];
    for it in 0..warmup + iters {
        let i = it % COPIES;
        for (m, mode) in modes.iter().enumerate() {
            for (w, training) in [false, true].into_iter().enumerate() {
                let s = match (mode, training) {
                    (Mode::Eager, false) => sample(&tracked, || a.forward(i))?,
                    (Mode::Eager, true) => sample(&tracked, || a.forward_backward(i))?,
                    (Mode::EagerUntracked, false) => sample(&untracked, || b.forward(i))?,
                    (Mode::EagerUntracked, true) => sample(&untracked, || b.forward_backward(i))?,
                    // SAFETY: the graphs' buffers (b's inputs, outputs and workspace) are alive
                    // and were not resized since the capture.
                    (Mode::Graph, false) => {
                        sample(&untracked, || unsafe { fwd_graphs[i].replay() })?
                    }
                    (Mode::Graph, true) => {
                        sample(&untracked, || unsafe { step_graphs[i].replay() })?
                    }
                };
                if it >= warmup {
                    samples[m * 2 + w].0.push(s.0);
                    samples[m * 2 + w].1.push(s.1);
                }
            }
        }
    }
    // Nothing the device found (an overflow, a NaN) may hide behind a timing.
    b.inference.check_device_errors()?;
    b.training.check_device_errors()?;
    a.inference.check_device_errors()?;
    a.training.check_device_errors()?;
    Ok(samples
        .into_iter()
        .enumerate()
        .map(|(j, (gpu, host))| Row {
            tokens,
            what: if j % 2 == 0 { "forward" } else { "fwd+bwd" },
            mode: modes[j / 2],
            gpu: Timing::new(gpu),
            host: Timing::new(host),
        })
        .collect())
}

/// Whether a capture works with cudarc's event tracking on (reported, not required).
fn probe_tracked_capture() -> String {
    let run = || -> Result<(), Error> {
        let dev = Device::new(0)?;
        let cfg = LayerConfig {
            tokens: 64,
            ..config_s()
        };
        let mut l = Layer::new(&dev, cfg)?;
        l.forward(0)?;
        let g = capture(&dev, || l.forward(0))?;
        // SAFETY: l's buffers are alive and unmoved.
        unsafe { g.replay() }?;
        dev.stream().synchronize()?;
        dev.context().check_err()?;
        Ok(())
    };
    match run() {
        Ok(()) => "captured and replayed".into(),
        Err(e) => format!("failed: {e}"),
    }
}

/// Small-batch latency of the ReMoE layer: eager calls and CUDA-graph replays.
#[derive(clap::Parser)]
struct Args {
    /// Timed samples per figure (after 20 warm-ups).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    iters: u64,
    /// Where to write the JSON rows.
    #[arg(long)]
    json: Option<String>,
    /// One batch size instead of all four (1, 8, 64, 512).
    #[arg(long)]
    tokens: Option<usize>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = <Args as clap::Parser>::parse();
    let iters = args.iters as usize;
    let json = args.json;
    let tokens: Vec<usize> = args.tokens.map_or(TOKENS.to_vec(), |t| vec![t]);
    match Device::new(0) {
        Err(Error::NoCudaDevice(why)) => {
            println!("no CUDA device ({why}): nothing to time");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
        Ok(_) => {}
    }
    let probe = probe_tracked_capture();
    println!("capture with cudarc's event tracking on: {probe}");
    let mut rows = Vec::new();
    for &t in &tokens {
        rows.extend(measure(t, iters, 20)?);
    }
    println!(
        "\n{:>5} {:>8} {:>16} {:>24} {:>24}",
        "T", "pass", "mode", "GPU span us med [min,max]", "host enqueue us med [min,max]"
    );
    let us = |t: &Timing| {
        format!(
            "{:.1} [{:.1},{:.1}]",
            t.median() * 1e3,
            t.min() * 1e3,
            t.max() * 1e3
        )
    };
    let mut out = Vec::new();
    for r in &rows {
        println!(
            "{:>5} {:>8} {:>16} {:>24} {:>24}",
            r.tokens,
            r.what,
            r.mode.name(),
            us(&r.gpu),
            us(&r.host)
        );
        out.push(serde_json::json!({
            "tokens": r.tokens, "pass": r.what, "mode": r.mode.name(),
            "gpu_us": {"median": r.gpu.median() * 1e3, "min": r.gpu.min() * 1e3, "max": r.gpu.max() * 1e3},
            "host_us": {"median": r.host.median() * 1e3, "min": r.host.min() * 1e3, "max": r.host.max() * 1e3},
        }));
    }
    if let Some(path) = json {
        let doc = serde_json::json!({"iters": iters, "tracked_capture": probe, "rows": out});
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
        println!("wrote {path}");
    }
    Ok(())
}
