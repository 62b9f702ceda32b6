//! What the layer benchmark (benches/layer.rs) and the report (examples/bench_report.rs)
//! share: docs/SPEC.md's configurations (the table of remoe_testkit::shapes) and shapes given by hand,
//! a problem set up at a load, the crate's layer timed with CUDA events on either GEMM path,
//! each expert GEMM timed alone, and the cuBLAS baselines.
//!
//! Timing: CUDA events on the crate's stream around each run, after warm-up; every figure is a
//! median with its min and max. Runs that are compared (ReMoE and TopK; our GEMM on each path
//! and the same-shape cuBLAS GEMM) are interleaved within one loop: A B A B ..., one event pair
//! per run, so that clock and thermal drift fall on both alike.
//!
//! Inputs are rotated so that L2 (50 MB on an H100) does not hold them from one run to the
//! next: the layer's X among 4 copies (the expert weights, 113 MB or more, exceed L2 at every
//! configuration); for each GEMM timed alone, ours and cuBLAS's, every input among as many copies as make
//! its rotated footprint at least [`ROTATION_BYTES`].
//!
//! FLOPs: 6 |A| H F forward, twice that backward (docs/SPEC.md).
//!
//! - this file: the shapes, the loads, CUDA-event timing of interleaved runs;
//! - `gemms.rs`: rotated operands, the expert GEMMs launched alone, the cuBLAS baselines;
//! - `layer.rs`: a configuration's problem on the device, the layer on each GEMM path;
//! - `report.rs`: what the report measures per configuration, and its rows.
#![allow(dead_code)]

mod gemms;
mod layer;
mod report;

pub use gemms::*;
pub use layer::*;
// The report's rows (examples/bench_report.rs; the criterion bench uses none of them).
#[allow(unused_imports)]
pub use report::*;

use cudarc::driver::sys::CUevent_flags;
use remoe_kernels::{Device, Error, GemmPath, RouterKind};

// docs/SPEC.md's named configurations and shapes given by hand (remoe_testkit::shapes holds the one
// table; the report, the criterion benches and the examples read it).
#[allow(unused_imports)]
pub use remoe_testkit::shapes::{
    named, named_list, named_shapes, shapes_from_env, NamedShape, Shape, NAMED, SHAPES_ENV,
    SHAPE_FORM,
};

/// The balance-loss coefficient used while timing (it does not change the work).
pub const COEFF: f64 = 1e-3;
/// Copies of the layer's X.
pub(crate) const X_COPIES: usize = 4;
/// The least footprint of one rotated operand set (all copies of a GEMM's inputs): five times
/// an H100's 50 MB L2.
pub const ROTATION_BYTES: usize = 256 << 20;
/// The most copies of one operand set (many only for the small operands at S, where each copy
/// is well under a MiB).
pub(crate) const MAX_COPIES: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Every expert at density k/E.
    Uniform,
    /// Expert e's share proportional to 1/(e+1), k experts per token on average.
    Skewed,
}

impl Load {
    pub fn name(self) -> &'static str {
        match self {
            Load::Uniform => "uniform",
            Load::Skewed => "skewed",
        }
    }
}

pub fn router_name(kind: RouterKind) -> &'static str {
    match kind {
        RouterKind::Relu => "ReMoE",
        RouterKind::TopK => "TopK",
        RouterKind::TopKNormalized => "TopK-renorm",
    }
}

/// A cuBLAS failure panics: the crate's `Error` has no variant for another library's errors
/// (its `Driver` variant holds the CUDA driver's own). The criterion bench ends there; the
/// report catches the panic, records the configuration's part as failed and goes on.
pub(crate) fn cublas_err(e: impl std::fmt::Debug) -> Error {
    panic!("cuBLAS: {e:?}")
}

pub(crate) fn launch_check(kernel: &'static str, code: i32) -> Result<(), Error> {
    if code == 0 {
        Ok(())
    } else {
        Err(Error::Launch { kernel, code })
    }
}

/// The GEMM paths this device can run, Hopper first.
pub fn available_paths(dev: &Device) -> Result<Vec<GemmPath>, Error> {
    let mut paths = Vec::new();
    if GemmPath::Hopper.supported_on(dev)? {
        paths.push(GemmPath::Hopper);
    }
    paths.push(GemmPath::MmaSync);
    Ok(paths)
}

// ---------------------------------------------------------------------------------------------
// Timing

/// CUDA-event times of one piece of work, in milliseconds, sorted ascending.
#[derive(Debug, Clone, Default)]
pub struct Timing {
    pub samples_ms: Vec<f64>,
}

impl Timing {
    pub fn new(mut samples_ms: Vec<f64>) -> Self {
        samples_ms.sort_by(|a, b| a.total_cmp(b));
        Self { samples_ms }
    }

    pub fn median(&self) -> f64 {
        let (v, n) = (&self.samples_ms, self.samples_ms.len());
        match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => v[n / 2],
            _ => 0.5 * (v[n / 2 - 1] + v[n / 2]),
        }
    }

    pub fn min(&self) -> f64 {
        self.samples_ms.first().copied().unwrap_or(f64::NAN)
    }

    pub fn max(&self) -> f64 {
        self.samples_ms.last().copied().unwrap_or(f64::NAN)
    }

    pub fn runs(&self) -> usize {
        self.samples_ms.len()
    }

    /// TFLOP/s at the median.
    pub fn tflops(&self, flops: f64) -> f64 {
        flops / (self.median() * 1e-3) / 1e12
    }

    /// "median [min-max]" in ms: 4 decimals below 1 ms, else 3 (22 characters up to 99 ms).
    pub fn fmt(&self) -> String {
        let p = if self.median() < 1.0 { 4 } else { 3 };
        format!(
            "{:.p$} [{:.p$}-{:.p$}]",
            self.median(),
            self.min(),
            self.max()
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "median_ms": self.median(),
            "min_ms": self.min(),
            "max_ms": self.max(),
            "runs": self.runs(),
        })
    }
}

/// Times `works` pieces of work interleaved: `warmup` untimed rounds, then `iters` rounds, each
/// running work 0, 1, ..., works-1 once (`run(work, round)`), every run between its own pair of
/// CUDA events on the crate's stream. Nothing waits between runs (a run that reads back to the
/// host, like the layer forward, waits by itself), so launch overheads overlap the previous
/// run. The round number lets the work pick its rotated inputs.
pub fn time_interleaved(
    dev: &Device,
    warmup: usize,
    iters: usize,
    works: usize,
    mut run: impl FnMut(usize, usize) -> Result<(), Error>,
) -> Result<Vec<Timing>, Error> {
    for round in 0..warmup {
        for w in 0..works {
            run(w, round)?;
        }
    }
    let ctx = dev.context();
    let mut events = Vec::with_capacity(iters * works);
    for i in 0..iters {
        for w in 0..works {
            let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let stop = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            start.record(dev.stream())?;
            run(w, warmup + i)?;
            stop.record(dev.stream())?;
            events.push((w, start, stop));
        }
    }
    dev.synchronize()?;
    let mut samples = vec![Vec::with_capacity(iters); works];
    for (w, start, stop) in &events {
        samples[*w].push(start.elapsed_ms(stop)? as f64);
    }
    Ok(samples.into_iter().map(Timing::new).collect())
}
