//! What a framework does with remoe-kernels when it already has cudarc, as candle does: run the
//! crate's ops on its own stream, and call a raw launcher itself. CI builds this crate (it is not
//! run: linking it needs libcuda and candle's CUDA libraries, which CI's machine does not have).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use half::bf16;
use remoe_kernels::{router_forward, sys, Device, DeviceTensor, LayerConfig, Result};

/// The ReLU router on the framework's stream (candle: `CudaDevice::cuda_stream()`): the crate
/// enqueues on that stream, ordered with the framework's own work there.
pub fn relu_router_on(
    stream: Arc<CudaStream>,
    x: &[bf16],
    wr: &[bf16],
    tokens: usize,
    hidden: usize,
    experts: usize,
) -> Result<Vec<f32>> {
    let dev = Device::from_stream(stream)?;
    let cfg = LayerConfig::new(tokens, hidden, 8, experts, 1);
    let x = DeviceTensor::from_host(&dev, x, &[tokens, hidden])?;
    let wr = DeviceTensor::from_host(&dev, wr, &[hidden, experts])?;
    let mut logits = DeviceTensor::<f32>::zeros(&dev, &[tokens, experts])?;
    let mut gates = DeviceTensor::<f32>::zeros(&dev, &[tokens, experts])?;
    router_forward(&dev, &cfg, &x, &wr, &mut logits, &mut gates)?;
    gates.to_host()
}

/// One step of the adaptive lambda controller through the raw launcher, on the framework's
/// buffers and stream.
pub fn lambda_step_raw(
    stream: &Arc<CudaStream>,
    lambda: &mut CudaSlice<f64>,
    sparsity_sum: &mut CudaSlice<f64>,
    count: &mut CudaSlice<u32>,
) -> std::result::Result<(), String> {
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| e.to_string())?;
    let (l, _l) = lambda.device_ptr_mut(stream);
    let (s, _s) = sparsity_sum.device_ptr_mut(stream);
    let (c, _c) = count.device_ptr_mut(stream);
    // SAFETY: three one-element buffers of the stream's context, which is current on this thread;
    // the guards keep cudarc's ordering until the launch is enqueued.
    let code = unsafe {
        sys::remoe_lambda_step(
            l as *mut f64,
            s as *mut f64,
            c as *mut u32,
            1.2,
            0.75,
            sys::stream_handle(stream),
        )
    };
    match code {
        0 => Ok(()),
        e => Err(format!("remoe_lambda_step: cudaError {e}")),
    }
}
