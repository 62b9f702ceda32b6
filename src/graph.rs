//! CUDA graphs of the layer: capture a forward, a backward or a whole training step once, then
//! replay it with one launch.
//!
//! Nothing in the layer reads back to the host (see [`crate::moe`]), so everything it enqueues
//! can be captured. [`capture`] runs a closure while the device's stream is being captured and
//! instantiates what it enqueued; [`Graph::replay`] launches it again. A replay reads and writes
//! the same device buffers as the capture did: to run it on new inputs, copy them into those
//! buffers first (on the same stream), and read the outputs from the same buffers after.
//!
//! ## What must hold
//!
//! - The context is warm: its buffers were sized by an eager call of the same shapes (or larger
//!   ones) before the capture. A workspace that would have to grow during a capture is refused
//!   with [`Error::CaptureUnsupported`], as are stage timing and reads to the host.
//! - Every buffer the captured calls used stays allocated, at the same address, for as long as
//!   the graph is replayed: the graph holds raw device pointers. This is why
//!   [`Graph::replay`] is `unsafe`; the contexts' own buffers only move when a later call of a
//!   larger size makes them grow.
//! - cudarc's per-buffer event tracking must be off for the buffers the captured calls touch,
//!   as for any capture through cudarc (cudarc's own graph test turns it off): with it on,
//!   every launch records an event and waits on the buffer's last one, and a wait on an event
//!   recorded outside the capture cannot join the graph. [`Device::new_untracked`] makes a
//!   device whose buffers are untracked; candle has `CudaDevice::disable_event_tracking`.
//! - Device errors (a pair count past the capacity, a non-finite logit) are raised by every
//!   replay like by every eager call, and reported by the context's next host-visible call
//!   ([`MoeContext::check_device_errors`](crate::MoeContext::check_device_errors)).

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

use crate::device::Device;
use crate::error::{Error, Result};

/// An instantiated CUDA graph of calls on one [`Device`]'s stream (see the module
/// documentation).
pub struct Graph {
    graph: CudaGraph,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph").finish_non_exhaustive()
    }
}

/// Captures what `body` enqueues on `dev`'s stream into a graph, without running it. The
/// capture is thread-local: other threads' CUDA calls are not affected. If `body` fails, the
/// capture is ended and discarded and its error returned; nothing ran.
pub fn capture(dev: &Device, body: impl FnOnce() -> Result<()>) -> Result<Graph> {
    let stream = dev.stream().clone();
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let ran = body();
    // End the capture whatever happened, so that the stream is usable again.
    let ended = stream.end_capture(CUgraphInstantiate_flags(0));
    ran?;
    match ended? {
        Some(graph) => Ok(Graph { graph }),
        None => Err(Error::CaptureUnsupported(
            "the capture recorded nothing to run".into(),
        )),
    }
}

impl Graph {
    /// Uploads the graph's resources to the device ahead of the first replay (optional: the
    /// first replay does it otherwise, and takes longer).
    pub fn upload(&self) -> Result<()> {
        Ok(self.graph.upload()?)
    }

    /// Enqueues one run of the graph on the stream it was captured on.
    ///
    /// # Safety
    ///
    /// Every device buffer that the captured calls read or wrote must still be allocated at the
    /// same address (the tensors passed to them, and the [`MoeContext`](crate::MoeContext)'s
    /// workspace: no call of a larger size has made it grow since the capture), and no other
    /// stream may use those buffers while the replay runs.
    pub unsafe fn replay(&self) -> Result<()> {
        Ok(self.graph.launch()?)
    }
}
