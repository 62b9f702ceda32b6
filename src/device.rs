//! The device context: one CUDA context and the stream every op of this crate enqueues on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use crate::error::{Error, Result};

/// A CUDA device with the stream the crate's ops run on.
///
/// Ops enqueue work on [`Device::stream`] and return without waiting; results are read back with
/// [`DeviceTensor::to_host`](crate::DeviceTensor::to_host), which synchronises that stream.
#[derive(Debug, Clone)]
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

/// Whether the CUDA driver library can be loaded on this machine. cudarc loads `libcuda` on its
/// first call and panics when it is missing; this asks first, so the absence of a GPU is an
/// error value rather than a panic.
pub fn driver_library_present() -> bool {
    // SAFETY: is_culib_present only tries dlopen on the candidate names and closes them again.
    catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

impl Device {
    /// Opens device `ordinal` and creates a stream on it. A machine with no driver, no device or
    /// a device that cannot be opened gives [`Error::NoCudaDevice`].
    pub fn new(ordinal: usize) -> Result<Self> {
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
            let stream = ctx.new_stream()?;
            Ok(Self { ctx, stream })
        }));
        match opened {
            Ok(Ok(dev)) => Ok(dev),
            Ok(Err(Error::Driver(msg))) => Err(Error::NoCudaDevice(msg)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::NoCudaDevice(
                "the CUDA driver panicked while opening the device".into(),
            )),
        }
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
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
