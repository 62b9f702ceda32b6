//! Timing GPU work with CUDA events: warm-up first, then the median of many timed runs.

use cudarc::driver::sys::CUevent_flags;

use remoe_kernels::{Device, Result};

/// Timings of one piece of GPU work, in milliseconds.
#[derive(Debug, Clone)]
pub struct GpuTimings {
    /// Every timed run, sorted ascending.
    pub samples_ms: Vec<f64>,
}

impl GpuTimings {
    /// The median of the samples (NaN without samples).
    pub fn median_ms(&self) -> f64 {
        let n = self.samples_ms.len();
        if n == 0 {
            return f64::NAN;
        }
        if n % 2 == 1 {
            self.samples_ms[n / 2]
        } else {
            0.5 * (self.samples_ms[n / 2 - 1] + self.samples_ms[n / 2])
        }
    }

    /// The fastest sample (NaN without samples).
    pub fn min_ms(&self) -> f64 {
        self.samples_ms.first().copied().unwrap_or(f64::NAN)
    }
}

/// Runs `work` (which enqueues on `dev`'s stream) `warmup` times untimed, then `iters` times,
/// each bracketed by CUDA events recorded on that stream.
pub fn time_gpu(
    dev: &Device,
    warmup: usize,
    iters: usize,
    mut work: impl FnMut() -> Result<()>,
) -> Result<GpuTimings> {
    for _ in 0..warmup {
        work()?;
    }
    let ctx = dev.context();
    let stream = dev.stream();
    let mut samples_ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let stop = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(stream)?;
        work()?;
        stop.record(stream)?;
        stop.synchronize()?;
        samples_ms.push(start.elapsed_ms(&stop)? as f64);
    }
    samples_ms.sort_by(|a, b| a.total_cmp(b));
    Ok(GpuTimings { samples_ms })
}
