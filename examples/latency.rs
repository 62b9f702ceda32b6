//! Small-batch latency of the ReMoE layer (issues 9 and 25) against the floor of the bytes it
//! moves. Shapes: (E, k) = (8, 1) (config S's shape) and (64, 8) at config A's H 768 and F 3072,
//! and (128, 8) at H 768 and F 768; batch sizes T = 1, 2, 4, 8, 16, 64 and 512. At each shape
//! and batch size the inference forward is timed three ways, and at config S's shape the
//! training forward+backward too, interleaved in one loop with the floor:
//!
//! - `eager`: the crate's calls on a device made by `Device::new` (cudarc's per-buffer event
//!   tracking on: every launch records an event per buffer and waits on the last write's);
//! - `eager-untracked`: the same calls on a device made by `Device::new_untracked`;
//! - `graph`: the same calls captured once in a CUDA graph (untracked device), replayed;
//! - `graph-small`: at T <= 64, the same graph-replayed forward on the small-batch path
//!   (`SmallBatch::UpTo(64)`, one persistent kernel), its output checked bitwise against
//!   `graph`'s context before timing;
//! - `floor`: a plain streaming kernel (examples/latency/stream_floor.cu, loaded from the PTX
//!   beside it; not part of the library) moving the same bytes, on the untracked device's stream.
//!
//! `eager`, `eager-untracked` and `graph` time the multi-kernel chain (`SmallBatch::Off`), not
//! the contexts' default `SmallBatch::Auto`, so that the two paths stand side by side at every
//! T; the forward table's `auto` column says which of them `Auto` takes at that shape and T (one
//! eager forward of a context left at the default, untimed).
//!
//! **The forward's floor** is the time that kernel takes to read the batch's bytes once: the
//! weights (gate, up, down: 3 H F bf16 each) of every expert the batch routes to (the experts with
//! n_e > 0 in `MoeContext::stats`, read after a forward outside the timed loop), the router weight
//! (H E bf16), X and out (T H bf16 each; out's bytes are read too, not written: at most 0.8 MB).
//! **The forward+backward's floor** (config S's shape): the same kernel reading the routed
//! experts' and the router's weights three times (the forward, dAct's Wd and dX's Wg and Wu),
//! then a streaming store kernel writing the four f32 weight gradients that `moe_backward`
//! overwrites whole (dWg, dWu [E,H,F], dWd [E,F,H], for every expert, the unrouted ones' zeros
//! included, and dWr [H,E]); X, dOut, dX and the saved activations are left out (3 MB at T 512).
//! Read, then write, in two launches rather than one kernel mixing both: each streams in one
//! direction at the rate tools/hbm-stream measured, which should be the least time these bytes
//! take (a mixed stream pays the DRAM's read-write turnarounds), and the backward too mostly
//! reads weights and writes gradients in different kernels. Both kernels use every SM (one CTA
//! of 1024 threads per SM, grid-stride 16-byte streaming accesses in address order, eight loads
//! in flight per thread, the loaded data folded into a value that a store depends on, so that
//! the loads stay).
//!
//! **Targets** (issue 25): the graph-replayed forward at every T <= 64 at most 1.3 x the floor's
//! median + 3 us (the 3 us allow for the graph's launch against the floor's one bare launch);
//! the graph-replayed forward+backward at config S (T 512) at most 1.5 x its floor. The tables
//! print each with `met` or `NOT MET`; the eager forwards (tracking on and off) stand beside them.
//!
//! Each sample is the CUDA-event time from an event recorded before the host enqueues the work
//! to one recorded after it, with the GPU idle at the start: when the host is slower to enqueue
//! than the GPU is to run, the gaps count, which is what "launch-bound" means. The floor is its
//! bare launch (two for the forward+backward's) between the events, no graph. The host's own time
//! to enqueue (wall clock) is reported beside it. Medians with min and max.
//!
//! Inputs: one synthetic problem per shape (`problem_with_density` at density k/E, 512 tokens,
//! seed 70 or `--seed`, with a token that routes to exactly k experts moved to the front: the
//! T = 1 row is a decode step's usual work; batch size T is its first T tokens, so a smaller
//! batch routes as the first tokens of a larger one, and a `--tokens` subset as the full run),
//! uploaded as eight
//! copies (weights, router weight and X) on each device. Nothing stays in L2 (50 MB on an H100)
//! from one sample to the next: each device's samples take the copies in turn, so that seven
//! other samples on that device (and those on the other device, and the floor's) come between
//! two of one copy, even when a decode batch reads one 14 MB expert. The copies hold the same
//! values, so every copy routes alike and moves the same bytes. The floor reads (and writes)
//! consecutive windows of a buffer of at least 256 MiB and four times the largest window, so
//! that at least twice a window's bytes pass between two uses of a byte.
//!
//! Run time: about a minute on an H100 at the default 200 iterations (an estimate, not yet
//! measured: drawing the three shapes' 0.74 G weight values and uploading 23 GB of copies, some
//! 10-20 s; the timed loops, some 10-20 s). GPU memory: at most about 20 GB (E 64: 16 copies of
//! 0.9 GB and the floor's 3.6 GB at T 512).
//!
//!   scripts/with-cuda cargo run --release --example latency -- [--iters N] [--json PATH]
//!       [--tokens T,T,...] [--shapes E8k1,E64k8,E128k8] [--seed S]

#[path = "../benches/support/mod.rs"]
mod support;

use std::ops::Range;
use std::time::Instant;

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use half::bf16;
use remoe_kernels::graph::{capture, Graph};
use remoe_kernels::reference::LayerParams;
use remoe_kernels::{
    moe_backward, remoe_forward, Coefficient, Device, DeviceMoeWeights, DeviceTensor, Error,
    HostMoeWeights, LayerConfig, MoeContext, MoeGrads, SmallBatch,
};
use remoe_testkit::rng::{seeded, Rng};
use remoe_testkit::synthetic::{problem_with_density, to_bf16, uniform_density};
use support::{named, Timing, ROTATION_BYTES};

/// Copies of each shape's inputs on each device (E 64: 0.9 GB each).
const COPIES: usize = 8;
const TOKENS: [usize; 7] = [1, 2, 4, 8, 16, 64, 512];
const COEFF: f64 = 1e-3;
/// The batch every shape's problem is drawn at; smaller batches are its first tokens.
const DRAWN_TOKENS: usize = 512;

/// The forward's target: at most this times the floor's median ...
const FWD_RATIO: f64 = 1.3;
/// ... plus this (us) ...
const FWD_SLACK_US: f64 = 3.0;
/// ... at every batch size up to this.
const FWD_MAX_TOKENS: usize = 64;
/// The forward+backward's target at config S: at most this times its floor's median.
const STEP_RATIO: f64 = 1.5;

/// examples/latency/stream_floor.cu compiled to PTX; regenerate after a change with
/// `scripts/with-cuda nvcc -ptx -arch=compute_80 -O3 -o examples/latency/stream_floor.ptx
/// examples/latency/stream_floor.cu`.
const FLOOR_PTX: &str = include_str!("latency/stream_floor.ptx");
/// The floor kernels' block size (their `__launch_bounds__`).
const FLOOR_THREADS: u32 = 1024;
/// What the read pool holds in every 32-bit word: the stream_read fold of it is 0 ...
const FILL: u32 = 0x0101_0101;
/// ... never this, so stream_read stores nothing.
const SALT: u32 = 0x9e37_79b9;

/// A layer shape: config A's H, (E, k), and config A's F unless given.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Shape {
    experts: usize,
    k: usize,
    ffn: Option<usize>,
}

const SHAPES: [Shape; 3] = [
    Shape {
        experts: 8,
        k: 1,
        ffn: None,
    },
    Shape {
        experts: 64,
        k: 8,
        ffn: None,
    },
    Shape {
        experts: 128,
        k: 8,
        ffn: Some(768),
    },
];

impl Shape {
    /// The name `--shapes` takes: `E8k1`, `E64k8`, `E128k8`.
    fn name(self) -> String {
        format!("E{}k{}", self.experts, self.k)
    }

    fn cfg(self, tokens: usize) -> LayerConfig {
        let a = named("A").expect("A is a named configuration").cfg;
        LayerConfig {
            tokens,
            hidden: a.hidden,
            ffn: self.ffn.unwrap_or(a.ffn),
            experts: self.experts,
            k: self.k,
        }
    }

    /// Whether this is config S's shape: the forward+backward is timed there only.
    fn is_s(self) -> bool {
        let s = config_s();
        self.cfg(s.tokens) == s
    }
}

fn parse_shape(s: &str) -> Result<Shape, String> {
    SHAPES
        .iter()
        .copied()
        .find(|sh| sh.name().eq_ignore_ascii_case(s.trim()))
        .ok_or_else(|| {
            let names: Vec<String> = SHAPES.iter().map(|sh| sh.name()).collect();
            format!("unknown shape {s:?}: one of {}", names.join(", "))
        })
}

/// docs/SPEC.md's configuration S (H 768, F 3072, E 8, k 1, T 512).
fn config_s() -> LayerConfig {
    named("S").expect("S is a named configuration").cfg
}

/// One expert's weights (gate, up, down), bf16.
fn expert_bytes(cfg: &LayerConfig) -> usize {
    3 * cfg.hidden * cfg.ffn * 2
}

/// What the forward's floor reads: the routed experts' weights, the router weight, X and out.
fn forward_bytes(cfg: &LayerConfig, routed: usize) -> usize {
    routed * expert_bytes(cfg) + cfg.hidden * cfg.experts * 2 + 2 * cfg.tokens * cfg.hidden * 2
}

/// What the forward+backward's floor reads: the routed experts' and the router's weights, three
/// times.
fn step_read_bytes(cfg: &LayerConfig, routed: usize) -> usize {
    3 * (routed * expert_bytes(cfg) + cfg.hidden * cfg.experts * 2)
}

/// What the forward+backward's floor writes: dWg, dWu, dWd of every expert and dWr, f32.
fn step_written_bytes(cfg: &LayerConfig) -> usize {
    (3 * cfg.experts * cfg.hidden * cfg.ffn + cfg.hidden * cfg.experts) * 4
}

/// A drawn problem's weights in bf16.
fn bf16_weights(cfg: &LayerConfig, p: &LayerParams<f64>) -> Result<HostMoeWeights<bf16>, Error> {
    let params = LayerParams {
        router: to_bf16(&p.router),
        gate: to_bf16(&p.gate),
        up: to_bf16(&p.up),
        down: to_bf16(&p.down),
    };
    HostMoeWeights::new(cfg.hidden, cfg.ffn, cfg.experts, params)
}

/// A shape's inputs: X of the drawn batch on the host, and the weights' copies on each device.
struct Inputs {
    /// X [DRAWN_TOKENS, H].
    x: Vec<bf16>,
    tracked: Vec<DeviceMoeWeights<bf16>>,
    untracked: Vec<DeviceMoeWeights<bf16>>,
}

impl Inputs {
    /// `problem_with_density` at density k/E from `seed`, COPIES times on each device.
    fn upload(
        shape: Shape,
        seed: u64,
        tracked: &Device,
        untracked: &Device,
    ) -> Result<Self, Error> {
        let cfg = shape.cfg(DRAWN_TOKENS);
        let density = uniform_density(cfg.experts, cfg.k as f64 / cfg.experts as f64);
        let p = problem_with_density(cfg, &density, seed);
        let mut x = to_bf16(&p.x);
        let host = bf16_weights(&cfg, &p.params)?;
        drop(p);
        let router = &host.params().router;
        // A decode step is one token routed to about k experts; ReLU routing sends some tokens
        // to none (at seed 70, E8k1's first). The first token of the batch is therefore one that
        // routes to exactly k experts (its logits from the bf16 operands, summed in f64), so
        // that T = 1 streams k experts' weights; the other tokens keep their order.
        let (h, e, k) = (cfg.hidden, cfg.experts, cfg.k);
        let routes = |t: usize| {
            (0..e)
                .filter(|&j| {
                    let logit: f64 = (0..h)
                        .map(|i| x[t * h + i].to_f64() * router[i * e + j].to_f64())
                        .sum();
                    logit > 0.0
                })
                .count()
        };
        if let Some(first) = (0..DRAWN_TOKENS).find(|&t| routes(t) == k) {
            for i in 0..h {
                x.swap(i, first * h + i);
            }
        }
        let copies = |dev: &Device| {
            (0..COPIES)
                .map(|_| host.to_device(dev))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            tracked: copies(tracked)?,
            untracked: copies(untracked)?,
            x,
        })
    }
}

/// What the forward+backward needs beside the forward's.
struct Training {
    ctx: MoeContext<bf16>,
    dout: DeviceTensor<bf16>,
    dx: DeviceTensor<bf16>,
    dw: [DeviceTensor<f32>; 4],
}

/// Everything one device runs at one batch size: X per weight copy, a context per pass,
/// gradients.
struct Layer<'w> {
    cfg: LayerConfig,
    weights: &'w [DeviceMoeWeights<bf16>],
    x: Vec<DeviceTensor<bf16>>,
    out: DeviceTensor<bf16>,
    inference: MoeContext<bf16>,
    training: Option<Training>,
}

impl Layer<'_> {
    /// The inference forwards on the small-batch path up to `FWD_MAX_TOKENS` tokens.
    fn small_batch(mut self) -> Result<Self, Error> {
        self.inference
            .set_small_batch(SmallBatch::UpTo(FWD_MAX_TOKENS))?;
        Ok(self)
    }

    /// Whether the contexts' default, `SmallBatch::Auto`, takes the small-batch path for this
    /// layer's forward: one eager forward of the inference context set back to it (prepared
    /// by that forward, as a context that was never configured would be).
    fn auto_takes_small_batch(mut self) -> Result<bool, Error> {
        self.inference.set_small_batch(SmallBatch::Auto)?;
        let before = self.inference.small_batch_forwards();
        self.forward(0)?;
        self.inference.check_device_errors()?;
        Ok(self.inference.small_batch_forwards() > before)
    }
}

impl<'w> Layer<'w> {
    /// `x` holds at least `cfg.tokens` tokens; the batch is the first of them.
    fn new(
        dev: &Device,
        cfg: LayerConfig,
        weights: &'w [DeviceMoeWeights<bf16>],
        x: &[bf16],
        backward: bool,
    ) -> Result<Self, Error> {
        let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
        let x = &x[..t * h];
        let training = if backward {
            let mut rng = seeded(9);
            let dout: Vec<bf16> = (0..t * h)
                .map(|_| bf16::from_f64(rng.random_range(-1.0..1.0)))
                .collect();
            Some(Training {
                ctx: MoeContext::for_training(dev),
                dout: DeviceTensor::from_host(dev, &dout, &[t, h])?,
                dx: DeviceTensor::zeros(dev, &[t, h])?,
                dw: [
                    DeviceTensor::zeros(dev, &[h, e])?,
                    DeviceTensor::zeros(dev, &[e, h, f])?,
                    DeviceTensor::zeros(dev, &[e, h, f])?,
                    DeviceTensor::zeros(dev, &[e, f, h])?,
                ],
            })
        } else {
            None
        };
        // The chain, whatever the default would take: `small_batch` sets the other path.
        let mut inference = MoeContext::new(dev);
        inference.set_small_batch(SmallBatch::Off)?;
        Ok(Self {
            cfg,
            weights,
            x: weights
                .iter()
                .map(|_| DeviceTensor::from_host(dev, x, &[t, h]))
                .collect::<Result<_, _>>()?,
            out: DeviceTensor::zeros(dev, &[t, h])?,
            inference,
            training,
        })
    }

    fn forward(&mut self, i: usize) -> Result<(), Error> {
        remoe_forward(
            &mut self.inference,
            &self.cfg,
            Coefficient::Fixed(COEFF),
            &self.x[i],
            &self.weights[i].weights(),
            &mut self.out,
        )
    }

    fn forward_backward(&mut self, i: usize) -> Result<(), Error> {
        let Some(tr) = self.training.as_mut() else {
            return Err(Error::InvalidConfig(
                "latency: this layer was set up without the backward".into(),
            ));
        };
        let fixed = || Coefficient::Fixed(COEFF);
        let w = self.weights[i].weights();
        remoe_forward(
            &mut tr.ctx,
            &self.cfg,
            fixed(),
            &self.x[i],
            &w,
            &mut self.out,
        )?;
        let [router, gate, up, down] = &mut tr.dw;
        let grads = MoeGrads {
            dx: &mut tr.dx,
            router,
            gate,
            up,
            down,
        };
        moe_backward(&mut tr.ctx, fixed(), &self.x[i], &w, &tr.dout, grads, false)
    }

    fn run(&mut self, i: usize, training: bool) -> Result<(), Error> {
        if training {
            self.forward_backward(i)
        } else {
            self.forward(i)
        }
    }

    /// The experts that copy `i`'s batch routes to (n_e > 0), from an inference forward read
    /// back.
    fn routed_experts(&mut self, i: usize) -> Result<usize, Error> {
        self.forward(i)?;
        let stats = self.inference.stats()?;
        Ok(stats.tokens_per_expert.iter().filter(|&&n| n > 0).count())
    }

    fn check_device_errors(&mut self) -> Result<(), Error> {
        self.inference.check_device_errors()?;
        if let Some(tr) = self.training.as_mut() {
            tr.ctx.check_device_errors()?;
        }
        Ok(())
    }
}

/// The streaming floor's kernels on the untracked device's stream.
struct Floor {
    dev: Device,
    read: CudaFunction,
    write: CudaFunction,
    sms: u32,
    /// stream_read's store target: one 16-byte slot per thread of the grid.
    sink: CudaSlice<u8>,
}

impl Floor {
    fn new(dev: &Device) -> Result<Self, Error> {
        let module = dev.context().load_module(Ptx::from_src(FLOOR_PTX))?;
        let sms = dev
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as u32;
        Ok(Self {
            dev: dev.clone(),
            read: module.load_function("stream_read")?,
            write: module.load_function("stream_write")?,
            sms,
            sink: dev
                .stream()
                .alloc_zeros::<u8>(sms as usize * FLOOR_THREADS as usize * 16)?,
        })
    }

    /// One CTA of FLOOR_THREADS per SM.
    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.sms, 1, 1),
            block_dim: (FLOOR_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Reads `bytes` (rounded up to 16) from the start of `window` of `pool`.
    fn read(&mut self, pool: &Pool, window: Range<usize>, bytes: usize) -> Result<(), Error> {
        let n = bytes.div_ceil(16);
        assert!(window.start.is_multiple_of(16) && n * 16 <= window.len());
        let src = pool.buf.slice(window.start..window.start + n * 16);
        let n = n as u64;
        let cfg = self.launch_config();
        let stream = self.dev.stream();
        let mut launch = stream.launch_builder(&self.read);
        launch.arg(&src).arg(&n).arg(&mut self.sink).arg(&SALT);
        // SAFETY: stream_read(const uint4 *src, unsigned long long n, uint4 *sink, unsigned
        // salt) reads src[0, n), inside `src` (16-byte aligned: the pool's base is, and windows
        // start at multiples of 256), and stores at most sink[blockIdx.x * 1024 + threadIdx.x],
        // inside `sink` (sms * 1024 slots) for this grid and block.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// Writes `bytes` (rounded up to 16) from the start of `window` of `pool`.
    fn write(&self, pool: &mut Pool, window: Range<usize>, bytes: usize) -> Result<(), Error> {
        let n = bytes.div_ceil(16);
        assert!(window.start.is_multiple_of(16) && n * 16 <= window.len());
        let mut dst = pool.buf.slice_mut(window.start..window.start + n * 16);
        let n = n as u64;
        let stream = self.dev.stream();
        let mut launch = stream.launch_builder(&self.write);
        launch.arg(&mut dst).arg(&n).arg(&FILL);
        // SAFETY: stream_write(uint4 *dst, unsigned long long n, unsigned value) writes dst[0, n),
        // inside `dst`, which is 16-byte aligned (as in `read`).
        unsafe { launch.launch(self.launch_config()) }?;
        Ok(())
    }
}

/// Device memory the floor streams through in consecutive windows, wrapping at the end: at least
/// ROTATION_BYTES (five times an H100's L2) and four times the largest window, so that between
/// two uses of a byte at least twice that window's bytes pass.
struct Pool {
    buf: CudaSlice<u8>,
    next: usize,
}

impl Pool {
    /// Where a window of `bytes` lies: 256-byte aligned.
    fn footprint(bytes: usize) -> usize {
        bytes.max(1).div_ceil(256) * 256
    }

    /// A pool for windows of up to `largest` bytes, every word FILL.
    fn new(floor: &Floor, largest: usize) -> Result<Self, Error> {
        let len = ROTATION_BYTES.max(4 * Self::footprint(largest));
        let mut pool = Self {
            buf: floor.dev.stream().alloc_zeros::<u8>(len)?,
            next: 0,
        };
        floor.write(&mut pool, 0..len, len)?;
        Ok(pool)
    }

    /// The next window of `bytes`.
    fn take(&mut self, bytes: usize) -> Range<usize> {
        let len = Self::footprint(bytes);
        if self.next + len > self.buf.len() {
            self.next = 0;
        }
        let w = self.next..self.next + len;
        self.next += len;
        w
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Eager,
    EagerUntracked,
    Graph,
    GraphSmall,
    Floor,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Eager => "eager",
            Mode::EagerUntracked => "eager-untracked",
            Mode::Graph => "graph",
            Mode::GraphSmall => "graph-small",
            Mode::Floor => "floor",
        }
    }
}

const MODES: [Mode; 5] = [
    Mode::Eager,
    Mode::EagerUntracked,
    Mode::Graph,
    Mode::GraphSmall,
    Mode::Floor,
];

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

struct Row {
    shape: Shape,
    tokens: usize,
    what: &'static str,
    mode: Mode,
    gpu: Timing,
    host: Timing,
}

/// One shape and batch size: the rows, the experts each input copy's batch routes to, and
/// whether `SmallBatch::Auto` takes the small-batch path there.
struct Measured {
    shape: Shape,
    tokens: usize,
    routed: Vec<usize>,
    rows: Vec<Row>,
    auto_small: bool,
}

impl Measured {
    fn cfg(&self) -> LayerConfig {
        self.shape.cfg(self.tokens)
    }

    fn gpu(&self, what: &str, mode: Mode) -> Option<&Timing> {
        self.rows
            .iter()
            .find(|r| r.what == what && r.mode == mode)
            .map(|r| &r.gpu)
    }

    /// The routed experts: one number when every copy routes alike, else each copy's.
    fn routed_text(&self) -> String {
        if self.routed.iter().all(|&r| r == self.routed[0]) {
            self.routed[0].to_string()
        } else {
            let each: Vec<String> = self.routed.iter().map(|r| r.to_string()).collect();
            each.join("/")
        }
    }

    /// The mean over the copies of `bytes(routed)`.
    fn mean_bytes(&self, bytes: impl Fn(usize) -> usize) -> f64 {
        self.routed.iter().map(|&r| bytes(r) as f64).sum::<f64>() / self.routed.len() as f64
    }
}

#[allow(clippy::too_many_arguments)]
fn measure(
    shape: Shape,
    tokens: usize,
    inputs: &Inputs,
    tracked: &Device,
    untracked: &Device,
    floor: &mut Floor,
    iters: usize,
    warmup: usize,
) -> Result<Measured, Error> {
    let cfg = shape.cfg(tokens);
    let backward = shape.is_s();
    let mut a = Layer::new(tracked, cfg, &inputs.tracked, &inputs.x, backward)?;
    let mut b = Layer::new(untracked, cfg, &inputs.untracked, &inputs.x, backward)?;
    let mut c = if tokens <= FWD_MAX_TOKENS {
        Some(Layer::new(untracked, cfg, &inputs.untracked, &inputs.x, false)?.small_batch()?)
    } else {
        None
    };
    // Warm both contexts on every input copy, read the routing back (outside the timed loop),
    // then capture one graph per copy and pass.
    for i in 0..COPIES {
        a.forward(i)?;
        b.forward(i)?;
        if backward {
            a.forward_backward(i)?;
            b.forward_backward(i)?;
        }
        if let Some(c) = c.as_mut() {
            // The same bits as the multi-kernel path, or no timing (b's last call was a forward
            // when there is no backward; else run one).
            b.forward(i)?;
            c.forward(i)?;
            if b.out.to_host()? != c.out.to_host()? {
                return Err(Error::InvalidConfig(format!(
                    "latency: the small-batch forward differs from the multi-kernel one \
                     ({}, T {tokens}, copy {i})",
                    shape.name()
                )));
            }
        }
    }
    if let Some(c) = c.as_ref() {
        // The path was taken (not turned off by a device without cooperative launches).
        if c.inference.small_batch_forwards() == 0 {
            return Err(Error::InvalidConfig(format!(
                "latency: the small-batch path was not taken ({}, T {tokens})",
                shape.name()
            )));
        }
    }
    let routed = (0..COPIES)
        .map(|i| b.routed_experts(i))
        .collect::<Result<Vec<_>, _>>()?;
    let auto_small = Layer::new(untracked, cfg, &inputs.untracked, &inputs.x, false)?
        .auto_takes_small_batch()?;
    let fwd_bytes: Vec<usize> = routed.iter().map(|&r| forward_bytes(&cfg, r)).collect();
    let read_bytes: Vec<usize> = routed.iter().map(|&r| step_read_bytes(&cfg, r)).collect();
    let written = step_written_bytes(&cfg);
    let largest_read = fwd_bytes
        .iter()
        .chain(if backward { &read_bytes[..] } else { &[] })
        .copied()
        .max()
        .unwrap_or(0);
    let mut reads = Pool::new(floor, largest_read)?;
    let mut writes = if backward {
        Some(Pool::new(floor, written)?)
    } else {
        None
    };
    let mut fwd_graphs: Vec<Graph> = Vec::new();
    let mut step_graphs: Vec<Graph> = Vec::new();
    let mut small_graphs: Vec<Graph> = Vec::new();
    for i in 0..COPIES {
        fwd_graphs.push(capture(untracked, || b.forward(i))?);
        if let Some(c) = c.as_mut() {
            small_graphs.push(capture(untracked, || c.forward(i))?);
        }
        if backward {
            step_graphs.push(capture(untracked, || b.forward_backward(i))?);
        }
    }
    for g in fwd_graphs.iter().chain(&step_graphs).chain(&small_graphs) {
        g.upload()?;
    }
    let passes: &[bool] = if backward { &[false, true] } else { &[false] };
    let mut samples = vec![(Vec::new(), Vec::new()); MODES.len() * 2];
    // The copy each device's next sample takes, and the one each pass's graph replay took in
    // this round (the floor moves that copy's bytes).
    let mut next = [0usize; 2];
    let mut graph_copy = [0usize; 2];
    let mut turn = |dev: usize| {
        let i = next[dev];
        next[dev] = (i + 1) % COPIES;
        i
    };
    for it in 0..warmup + iters {
        for (m, mode) in MODES.iter().enumerate() {
            for &training in passes {
                let p = usize::from(training);
                let s = match mode {
                    Mode::Eager => {
                        let i = turn(0);
                        sample(tracked, || a.run(i, training))?
                    }
                    Mode::EagerUntracked => {
                        let i = turn(1);
                        sample(untracked, || b.run(i, training))?
                    }
                    Mode::Graph => {
                        let i = turn(1);
                        graph_copy[p] = i;
                        let g = if training {
                            &step_graphs[i]
                        } else {
                            &fwd_graphs[i]
                        };
                        // SAFETY: the graphs' buffers (b's inputs, outputs and workspace) are
                        // alive and were not resized since the capture.
                        sample(untracked, || unsafe { g.replay() })?
                    }
                    Mode::GraphSmall if training || small_graphs.is_empty() => continue,
                    Mode::GraphSmall => {
                        let i = turn(1);
                        // SAFETY: as for `Graph` (c's buffers).
                        sample(untracked, || unsafe { small_graphs[i].replay() })?
                    }
                    Mode::Floor if !training => {
                        let bytes = fwd_bytes[graph_copy[p]];
                        let w = reads.take(bytes);
                        sample(untracked, || floor.read(&reads, w, bytes))?
                    }
                    Mode::Floor => {
                        let bytes = read_bytes[graph_copy[p]];
                        let r = reads.take(bytes);
                        let writes = writes.as_mut().expect("a write pool with the backward");
                        let w = writes.take(written);
                        sample(untracked, || {
                            floor.read(&reads, r, bytes)?;
                            floor.write(writes, w, written)
                        })?
                    }
                };
                if it >= warmup {
                    samples[m * 2 + p].0.push(s.0);
                    samples[m * 2 + p].1.push(s.1);
                }
            }
        }
    }
    // Nothing the device found (an overflow, a NaN) may hide behind a timing.
    b.check_device_errors()?;
    a.check_device_errors()?;
    if let Some(c) = c.as_mut() {
        c.check_device_errors()?;
    }
    let rows = samples
        .into_iter()
        .enumerate()
        .filter(|(_, (gpu, _))| !gpu.is_empty())
        .map(|(j, (gpu, host))| Row {
            shape,
            tokens,
            what: if j % 2 == 0 { "forward" } else { "fwd+bwd" },
            mode: MODES[j / 2],
            gpu: Timing::new(gpu),
            host: Timing::new(host),
        })
        .collect();
    Ok(Measured {
        shape,
        tokens,
        routed,
        rows,
        auto_small,
    })
}

/// Whether a capture works with cudarc's event tracking on (reported, not required).
fn probe_tracked_capture() -> String {
    let run = || -> Result<(), Error> {
        let dev = Device::new(0)?;
        let cfg = LayerConfig {
            tokens: 64,
            ..config_s()
        };
        let e = cfg.experts;
        let p = problem_with_density(cfg, &uniform_density(e, 1.0 / e as f64), 70);
        let x = to_bf16(&p.x);
        let w = [bf16_weights(&cfg, &p.params)?.to_device(&dev)?];
        let mut l = Layer::new(&dev, cfg, &w, &x, false)?;
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

/// Small-batch latency of the ReMoE layer: eager calls and CUDA-graph replays, against a plain
/// streaming kernel moving the same bytes.
#[derive(clap::Parser)]
struct Args {
    /// Timed samples per figure (after 20 warm-ups).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    iters: u64,
    /// Where to write the JSON rows.
    #[arg(long)]
    json: Option<String>,
    /// Batch sizes, comma-separated, instead of all (1, 2, 4, 8, 16, 64, 512).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..))]
    tokens: Vec<u64>,
    /// Shapes, comma-separated, instead of all (E8k1, E64k8, E128k8).
    #[arg(long, value_delimiter = ',', value_parser = parse_shape)]
    shapes: Vec<Shape>,
    /// The seed of the synthetic problems (the batch's first token is always one that routes to
    /// exactly k experts: see `Inputs::upload`).
    #[arg(long, default_value_t = 70)]
    seed: u64,
}

/// "median [min-max]" in microseconds.
fn us(t: &Timing) -> String {
    format!(
        "{:.1} [{:.1}-{:.1}]",
        t.median() * 1e3,
        t.min() * 1e3,
        t.max() * 1e3
    )
}

fn us_json(t: &Timing) -> serde_json::Value {
    serde_json::json!({"median": t.median() * 1e3, "min": t.min() * 1e3, "max": t.max() * 1e3})
}

/// A figure against its floor: the ratio of the medians, the target (ratio x floor + slack,
/// us) and whether the median meets it.
struct Verdict {
    ratio: f64,
    target_us: f64,
    met: bool,
}

impl Verdict {
    fn new(layer: &Timing, floor: &Timing, ratio: f64, slack_us: f64) -> Self {
        let target_us = ratio * floor.median() * 1e3 + slack_us;
        Self {
            ratio: layer.median() / floor.median(),
            target_us,
            met: layer.median() * 1e3 <= target_us,
        }
    }

    fn text(&self, applies: bool) -> String {
        if applies {
            format!(
                "{:>9.1} {:>8}",
                self.target_us,
                if self.met { "met" } else { "NOT MET" }
            )
        } else {
            format!("{:>9} {:>8}", "-", "-")
        }
    }

    fn json(&self, applies: bool) -> serde_json::Value {
        serde_json::json!({
            "ratio": self.ratio, "target_us": self.target_us, "target_applies": applies,
            "met": if applies { Some(self.met) } else { None },
        })
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = <Args as clap::Parser>::parse();
    let iters = args.iters as usize;
    let json = args.json;
    let tokens: Vec<usize> = if args.tokens.is_empty() {
        TOKENS.to_vec()
    } else {
        args.tokens.iter().map(|&t| t as usize).collect()
    };
    if let Some(&t) = tokens.iter().find(|&&t| t > DRAWN_TOKENS) {
        return Err(format!("--tokens {t}: at most {DRAWN_TOKENS}").into());
    }
    let shapes: Vec<Shape> = if args.shapes.is_empty() {
        SHAPES.to_vec()
    } else {
        args.shapes
    };
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
    let tracked = Device::new(0)?;
    // SAFETY: this program uses the untracked device's one stream only.
    let untracked = unsafe { Device::new_untracked(0)? };
    let device = tracked.name()?;
    let mut floor = Floor::new(&untracked)?;
    println!(
        "{device}, {} SMs; {iters} samples per figure after 20 warm-ups",
        floor.sms
    );
    let mut measured = Vec::new();
    for &shape in &shapes {
        let inputs = Inputs::upload(shape, args.seed, &tracked, &untracked)?;
        for &t in &tokens {
            measured.push(measure(
                shape, t, &inputs, &tracked, &untracked, &mut floor, iters, 20,
            )?);
        }
    }

    println!(
        "\n{:>7} {:>5} {:>8} {:>16} {:>26} {:>26}",
        "shape", "T", "pass", "mode", "GPU span us med [min-max]", "host enqueue us med [min-max]"
    );
    let mut rows_json = Vec::new();
    for r in measured.iter().flat_map(|m| &m.rows) {
        println!(
            "{:>7} {:>5} {:>8} {:>16} {:>26} {:>26}",
            r.shape.name(),
            r.tokens,
            r.what,
            r.mode.name(),
            us(&r.gpu),
            us(&r.host)
        );
        let cfg = r.shape.cfg(r.tokens);
        rows_json.push(serde_json::json!({
            "shape": r.shape.name(), "experts": cfg.experts, "k": cfg.k, "hidden": cfg.hidden,
            "ffn": cfg.ffn, "tokens": r.tokens, "pass": r.what, "mode": r.mode.name(),
            "gpu_us": us_json(&r.gpu), "host_us": us_json(&r.host),
        }));
    }

    let mut floors_json = Vec::new();
    for &shape in &shapes {
        let cfg = shape.cfg(0);
        println!(
            "\n{} (E {}, k {}, H {}, F {}): the graph-replayed forward against the floor, a plain \
             kernel streaming the batch's bytes (routed experts' weights, router weight, X, out) \
             in the same run; target at T <= {FWD_MAX_TOKENS}: {FWD_RATIO} x floor + \
             {FWD_SLACK_US} us",
            shape.name(),
            cfg.experts,
            cfg.k,
            cfg.hidden,
            cfg.ffn
        );
        println!(
            "{:>5} {:>7} {:>8} {:>22} {:>20} {:>6} {:>9} {:>8} {:>22} {:>22} {:>6}",
            "T",
            "experts",
            "MB",
            "graph fwd us",
            "floor us",
            "ratio",
            "target us",
            "",
            "eager us (tracked)",
            "eager us (untracked)",
            "auto"
        );
        let mut small_lines = Vec::new();
        for m in measured.iter().filter(|m| m.shape == shape) {
            let cfg = m.cfg();
            let (Some(graph), Some(fl), Some(eager), Some(untr)) = (
                m.gpu("forward", Mode::Graph),
                m.gpu("forward", Mode::Floor),
                m.gpu("forward", Mode::Eager),
                m.gpu("forward", Mode::EagerUntracked),
            ) else {
                continue;
            };
            let applies = m.tokens <= FWD_MAX_TOKENS;
            let v = Verdict::new(graph, fl, FWD_RATIO, FWD_SLACK_US);
            let bytes = m.mean_bytes(|r| forward_bytes(&cfg, r));
            let auto = if m.auto_small { "small" } else { "chain" };
            println!(
                "{:>5} {:>7} {:>8.1} {:>22} {:>20} {:>6.2} {} {:>22} {:>22} {:>6}",
                m.tokens,
                m.routed_text(),
                bytes / 1e6,
                us(graph),
                us(fl),
                v.ratio,
                v.text(applies),
                us(eager),
                us(untr),
                auto
            );
            let small = m.gpu("forward", Mode::GraphSmall);
            let small_verdict = small.map(|g| Verdict::new(g, fl, FWD_RATIO, FWD_SLACK_US));
            if let (Some(g), Some(v)) = (small, &small_verdict) {
                small_lines.push(format!(
                    "{:>5} {:>7} {:>8.1} {:>22} {:>20} {:>6.2} {}",
                    m.tokens,
                    m.routed_text(),
                    bytes / 1e6,
                    us(g),
                    us(fl),
                    v.ratio,
                    v.text(applies)
                ));
            }
            let mut entry = serde_json::json!({
                "shape": shape.name(), "experts": cfg.experts, "k": cfg.k, "hidden": cfg.hidden,
                "ffn": cfg.ffn, "tokens": m.tokens, "routed_experts": m.routed,
                "auto_path": auto,
                "forward": {
                    "bytes": bytes, "graph_us": us_json(graph), "floor_us": us_json(fl),
                    "eager_us": us_json(eager), "eager_untracked_us": us_json(untr),
                    "verdict": v.json(applies),
                    "small_batch": match (small, &small_verdict) {
                        (Some(g), Some(v)) => serde_json::json!({
                            "graph_us": us_json(g), "verdict": v.json(applies),
                        }),
                        _ => serde_json::Value::Null,
                    },
                },
                "forward_backward": serde_json::Value::Null,
            });
            if let (Some(graph), Some(fl)) =
                (m.gpu("fwd+bwd", Mode::Graph), m.gpu("fwd+bwd", Mode::Floor))
            {
                let applies = cfg == config_s();
                let v = Verdict::new(graph, fl, STEP_RATIO, 0.0);
                entry["forward_backward"] = serde_json::json!({
                    "read_bytes": m.mean_bytes(|r| step_read_bytes(&cfg, r)),
                    "written_bytes": step_written_bytes(&cfg),
                    "graph_us": us_json(graph), "floor_us": us_json(fl),
                    "verdict": v.json(applies),
                });
            }
            floors_json.push(entry);
        }
        if !small_lines.is_empty() {
            println!(
                "the same with the small-batch path on (one persistent kernel; `graph-small`):"
            );
            println!(
                "{:>5} {:>7} {:>8} {:>22} {:>20} {:>6} {:>9} {:>8}",
                "T", "experts", "MB", "small graph fwd us", "floor us", "ratio", "target us", ""
            );
            for l in small_lines {
                println!("{l}");
            }
        }
    }

    let s_rows: Vec<&Measured> = measured
        .iter()
        .filter(|m| m.gpu("fwd+bwd", Mode::Floor).is_some())
        .collect();
    if !s_rows.is_empty() {
        println!(
            "\nConfig S's shape: the graph-replayed forward+backward against its floor (the routed \
             experts' and the router's weights read three times, then the f32 weight gradients \
             dWg, dWu, dWd, dWr written); target at config S (T {}): {STEP_RATIO} x floor",
            config_s().tokens
        );
        println!(
            "{:>5} {:>7} {:>8} {:>10} {:>22} {:>20} {:>6} {:>9} {:>8}",
            "T",
            "experts",
            "read MB",
            "written MB",
            "graph fwd+bwd us",
            "floor us",
            "ratio",
            "target us",
            ""
        );
        for m in s_rows {
            let cfg = m.cfg();
            let (Some(graph), Some(fl)) =
                (m.gpu("fwd+bwd", Mode::Graph), m.gpu("fwd+bwd", Mode::Floor))
            else {
                continue;
            };
            let v = Verdict::new(graph, fl, STEP_RATIO, 0.0);
            println!(
                "{:>5} {:>7} {:>8.1} {:>10.1} {:>22} {:>20} {:>6.2} {}",
                m.tokens,
                m.routed_text(),
                m.mean_bytes(|r| step_read_bytes(&cfg, r)) / 1e6,
                step_written_bytes(&cfg) as f64 / 1e6,
                us(graph),
                us(fl),
                v.ratio,
                v.text(cfg == config_s())
            );
        }
    }

    if let Some(path) = json {
        let doc = serde_json::json!({
            "device": device, "iters": iters, "seed": args.seed, "tracked_capture": probe,
            "targets": {
                "forward": {
                    "ratio": FWD_RATIO, "slack_us": FWD_SLACK_US, "max_tokens": FWD_MAX_TOKENS,
                },
                "forward_backward_at_s": {"ratio": STEP_RATIO},
            },
            "rows": rows_json, "floors": floors_json,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
        println!("wrote {path}");
    }
    Ok(())
}
