//! The device context: a CUDA context and the stream every op of this crate enqueues on, either
//! the crate's own ([`Device::new`]) or the caller's ([`Device::from_stream`]).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{result as driver, CudaContext, CudaStream, DriverError};

use crate::driver::driver_library_present;
use crate::error::{Error, Result};

/// The GPU targets this build's kernels were compiled for (`REMOE_CUDA_ARCHS` at build time):
/// `sm_NN` entries are machine code for that chip, `compute_NN` entries PTX that the driver
/// compiles for newer ones.
pub const CUDA_TARGETS: &str = env!("REMOE_CUDA_TARGETS");

/// A CUDA device with the stream the crate's ops run on.
///
/// Ops enqueue work on [`Device::stream`] and return without waiting; results are read back with
/// [`DeviceTensor::to_host`](crate::DeviceTensor::to_host), which synchronises that stream.
///
/// A `Device` may be used from any thread. The kernels are launched through the CUDA runtime
/// API, which launches into the context current on the calling thread, so every op makes the
/// stream's context current first (see [`Device::stream`]); it stays current afterwards, as
/// with cudarc's own calls.
#[derive(Debug, Clone)]
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl Device {
    /// Opens device `ordinal` (its primary context, shared with cudarc and the CUDA runtime)
    /// and creates a stream on it. A machine with no driver, no device, a device that cannot be
    /// opened or one this build has no code for gives [`Error::NoCudaDevice`].
    ///
    /// ```
    /// use remoe_kernels::{Device, Error};
    ///
    /// match Device::new(0) {
    ///     Ok(dev) => println!("running on {}", dev.name()?),
    ///     Err(Error::NoCudaDevice(why)) => println!("no GPU ({why}): the CPU reference then"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), Error>(())
    /// ```
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::open(ordinal, true)
    }

    /// Like [`Device::new`], with cudarc's per-buffer event tracking off in the device's
    /// context handle: the buffers allocated through it (the crate's workspace, and tensors made
    /// on this device) record no events and wait on none at each launch. That saves the host a
    /// few microseconds per kernel, and is what capturing the layer in a CUDA graph needs (see
    /// [`crate::graph`]). Ordering then rests on the device's one stream alone.
    ///
    /// # Safety
    ///
    /// The contract of cudarc's `CudaContext::disable_event_tracking`, for every buffer made
    /// through this device: a buffer used on another stream than [`Device::stream`] must be
    /// synchronised by the caller (not freed before that use is finished, not used before its
    /// allocation on this stream is, not written by two streams at once).
    pub unsafe fn new_untracked(ordinal: usize) -> Result<Self> {
        Self::open(ordinal, false)
    }

    fn open(ordinal: usize, track_events: bool) -> Result<Self> {
        if !driver_library_present() {
            return Err(Error::NoCudaDevice(
                "the CUDA driver library (libcuda.so) is not installed on this machine".into(),
            ));
        }
        let opened = catch_unwind(AssertUnwindSafe(|| -> Result<Self> {
            let count = CudaContext::device_count()?;
            if count <= ordinal as i32 {
                return Err(Error::NoCudaDevice(format!(
                    "device {ordinal} requested, {count} CUDA device(s) present"
                )));
            }
            let ctx = CudaContext::new(ordinal)?;
            if !track_events {
                // SAFETY: the handle is this Device's own (CudaContext::new makes a new one each
                // call), and new_untracked passes its caller's promise on to every buffer.
                unsafe { ctx.disable_event_tracking() };
            }
            let stream = ctx.new_stream()?;
            Self::checked(ctx, stream)
        }));
        match opened {
            Ok(Ok(dev)) => Ok(dev),
            Ok(Err(Error::Driver(e))) => Err(Error::NoCudaDevice(crate::error::driver_message(&e))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::NoCudaDevice(
                "the CUDA driver panicked while opening the device".into(),
            )),
        }
    }

    /// Runs the crate's ops on a stream the caller owns: a framework's stream (candle:
    /// `CudaDevice::cuda_stream()`), a non-primary context's, or cudarc's default stream. The
    /// ops are then ordered with the caller's other work on that stream, and tensors must live
    /// in the stream's context.
    ///
    /// Fails with [`Error::NoCudaDevice`] when this build has no code for the stream's device
    /// (see [`CUDA_TARGETS`]), or [`Error::Driver`] when the device cannot be queried.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        Self::checked(ctx, stream)
    }

    fn checked(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Self> {
        let (major, minor) = ctx.compute_capability()?;
        if !targets_run_on(CUDA_TARGETS, major as u32, minor as u32) {
            return Err(Error::NoCudaDevice(format!(
                "device {} has compute capability {major}.{minor}; this build's kernels are for \
                 {CUDA_TARGETS} (rebuild with REMOE_CUDA_ARCHS naming {major}{minor})",
                ctx.ordinal()
            )));
        }
        Ok(Self { ctx, stream })
    }

    /// The cudarc context the device's stream belongs to.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream the crate's ops enqueue on.
    ///
    /// Also makes the stream's context current on the calling thread: every op of the crate
    /// takes its stream from here right before its launches, which go through the CUDA runtime.
    /// A created stream carries its context, but the legacy default stream (cudarc's
    /// `default_stream()`, a null handle) means "the current context's": without this, a launch
    /// on it from a thread where another context is current runs there, silently, on the wrong
    /// buffers. When the context is current already (the usual case) this costs one
    /// `cuCtxGetCurrent`. A failure to switch is recorded in the context (cudarc's next call
    /// reports it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        if let Err(e) = bind(&self.ctx) {
            self.ctx.record_err(Err::<(), _>(e));
        }
        &self.stream
    }

    /// Whether the stream is being captured into a CUDA graph now (see [`crate::graph`]): then
    /// the crate refuses what cannot be captured (a workspace that would have to grow, stage
    /// timing, a host read) with [`Error::CaptureUnsupported`] before it enqueues anything.
    pub fn is_capturing(&self) -> Result<bool> {
        use cudarc::driver::sys::CUstreamCaptureStatus as S;
        Ok(self.stream().capture_status()? != S::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    /// Makes the stream's context current on the calling thread: what a caller of the raw
    /// launchers in [`crate::sys`] must do before each launch from a thread where another
    /// context may be current.
    pub fn bind_to_thread(&self) -> Result<()> {
        Ok(bind(&self.ctx)?)
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The device's name, as the driver reports it (for logs and benchmark reports).
    pub fn name(&self) -> Result<String> {
        Ok(self.ctx.name()?)
    }

    /// Waits for everything enqueued on the crate's stream.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
}

/// Makes `ctx` current on this thread unless it is already. (cudarc's `bind_to_thread` would
/// first report and clear an error recorded earlier, without binding.)
fn bind(ctx: &CudaContext) -> std::result::Result<(), DriverError> {
    let want = ctx.cu_ctx();
    if driver::ctx::get_current()? != Some(want) {
        // SAFETY: `want` is a live context: `ctx` holds it (a retained primary context or one it
        // owns) for as long as this `Device` exists.
        unsafe { driver::ctx::set_current(want) }?;
    }
    Ok(())
}

/// Whether code built for `targets` (as in [`CUDA_TARGETS`]) runs on a device of compute
/// capability `major.minor`: `sm_NN` machine code on the same major version with at least that
/// minor, `sm_NNa` only on exactly that chip, `sm_NNf` within its family (same major, at least
/// that minor), and `compute_NN` PTX on that capability and every later one.
fn targets_run_on(targets: &str, major: u32, minor: u32) -> bool {
    targets.split(',').any(|entry| {
        let (ptx, rest) = match entry.trim().split_once('_') {
            Some(("sm", rest)) => (false, rest),
            Some(("compute", rest)) => (true, rest),
            _ => return false,
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(number) = digits.parse::<u32>() else {
            return false;
        };
        let suffix = &rest[digits.len()..];
        let (t_major, t_minor) = (number / 10, number % 10);
        match (ptx, suffix) {
            (_, "a") => (major, minor) == (t_major, t_minor),
            (_, "f") => major == t_major && minor >= t_minor,
            (true, _) => (major, minor) >= (t_major, t_minor),
            (false, _) => major == t_major && minor >= t_minor,
        }
    })
}

/// The GPU for one of the library's own GPU unit tests, or `None` after printing why the test
/// is skipped; with `REMOE_REQUIRE_GPU=1` a missing GPU fails the test instead. (The
/// integration tests have their own copy in tests/common: they cannot reach this one.)
#[cfg(test)]
pub(crate) fn test_device_or_skip(test: &str) -> Option<Device> {
    match Device::new(0) {
        Ok(dev) => Some(dev),
        Err(Error::NoCudaDevice(why)) => {
            if std::env::var("REMOE_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("{test}: REMOE_REQUIRE_GPU=1 but no CUDA device: {why}");
            }
            // Straight to stderr: libtest captures the output of passing tests.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no CUDA device ({why})");
            None
        }
        Err(e) => panic!("{test}: opening the CUDA device failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_devices_a_build_runs_on() {
        let fat = "sm_80,sm_90a,compute_80";
        for (cc, runs) in [
            ((7, 5), false),
            ((8, 0), true),
            ((8, 6), true),
            ((8, 9), true),
            ((9, 0), true),
            ((10, 0), true),
            ((12, 0), true),
        ] {
            assert_eq!(targets_run_on(fat, cc.0, cc.1), runs, "{fat} on {cc:?}");
        }
        assert!(targets_run_on("sm_90a", 9, 0));
        assert!(!targets_run_on("sm_90a", 8, 0));
        assert!(!targets_run_on("sm_90a", 10, 0));
        assert!(!targets_run_on("compute_90a", 10, 0));
        assert!(targets_run_on("sm_100f", 10, 3));
        assert!(!targets_run_on("sm_100f", 12, 0));
        assert!(!targets_run_on("sm_86", 8, 0));
        assert!(!targets_run_on("", 9, 0));
        // The build's own list parses.
        assert!(CUDA_TARGETS
            .split(',')
            .all(|t| t.starts_with("sm_") || t.starts_with("compute_")));
    }

    /// The crate's launches on a non-primary context's streams, from threads where another
    /// context, or none, is current. A created stream carries its context (the CUDA 13 runtime
    /// launches into it); the legacy default stream (null) does not: without the binding in
    /// `Device::stream` its launches would go to the thread's current context.
    #[test]
    fn ops_bind_the_streams_context_on_any_thread() {
        use crate::{router_forward, DeviceTensor, LayerConfig};
        use half::bf16;

        if let Err(Error::NoCudaDevice(why)) = Device::new(0) {
            if std::env::var("REMOE_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("REMOE_REQUIRE_GPU=1 but no CUDA device: {why}");
            }
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED ops_bind_the_streams_context_on_any_thread: no CUDA device ({why})"
            );
            return;
        }
        let primary = CudaContext::new(0).unwrap();
        let other = CudaContext::new_non_primary(0, 0).unwrap();
        for stream in [other.new_stream().unwrap(), other.default_stream()] {
            run_router_on(Device::from_stream(stream).unwrap(), &primary);
        }

        fn run_router_on(dev: Device, primary: &Arc<CudaContext>) {
            let (t, h, e) = (64, 8, 8);
            let cfg = LayerConfig::new(t, h, 8, e, 1);
            // x = 1 everywhere and Wr[i][j] = j - 3.5: every logit of column j is 8 (j - 3.5).
            let x = DeviceTensor::from_host(&dev, &vec![bf16::ONE; t * h], &[t, h]).unwrap();
            let wr_host: Vec<bf16> = (0..h * e)
                .map(|i| bf16::from_f32((i % e) as f32 - 3.5))
                .collect();
            let wr = DeviceTensor::from_host(&dev, &wr_host, &[h, e]).unwrap();
            let want: Vec<f32> = (0..t * e).map(|i| 8.0 * ((i % e) as f32 - 3.5)).collect();

            // On each thread: the primary context current, or no context at all, at the launch.
            for current in [Some(primary.clone()), None] {
                let (dev, x, wr, want) = (dev.clone(), &x, &wr, &want);
                std::thread::scope(|s| {
                    s.spawn(move || {
                        let mut logits = DeviceTensor::<f32>::zeros(&dev, &[t, e]).unwrap();
                        let mut gates = DeviceTensor::<f32>::zeros(&dev, &[t, e]).unwrap();
                        // The allocations bound `other`; put the wrong context (or none) back.
                        match &current {
                            Some(ctx) => ctx.bind_to_thread().unwrap(),
                            // SAFETY: a null context unbinds; nothing on this thread uses one now.
                            None => {
                                unsafe { driver::ctx::set_current(std::ptr::null_mut()) }.unwrap()
                            }
                        }
                        router_forward(&dev, &cfg, x, wr, &mut logits, &mut gates)
                            .expect("launch on the stream's context");
                        assert_eq!(&logits.to_host().unwrap(), want);
                        let relu: Vec<f32> = want.iter().map(|v| v.max(0.0)).collect();
                        assert_eq!(gates.to_host().unwrap(), relu);
                    });
                });
            }
        }
    }
}
