//! CUDA graphs of the layer: capture a forward, a backward or a whole training step once, then
//! replay it with one launch.
//!
//! A captured call reads nothing back to the host (an eager forward may read its pair count
//! once, see [`crate::capacity`]; a captured one uses the capacity its eager calls sized), so
//! everything the layer enqueues can be captured. [`capture`] runs a closure while the device's stream is being captured and
//! instantiates what it enqueued; [`Graph::replay`] launches it again. A replay reads and writes
//! the same device buffers as the capture did: to run it on new inputs, copy them into those
//! buffers first (on the same stream), and read the outputs from the same buffers after.
//!
//! ## What must hold
//!
//! - The context is warm: its buffers were sized by an eager call of the same shapes (or larger
//!   ones) before the capture. A workspace that would have to grow during a capture is refused
//!   with [`Error::CaptureUnsupported`], as are stage timing and reads to the host. (The down
//!   projection's f32 split-K partial sums, which only small batches use, are sized by every
//!   eager forward for all smaller T as well, so a larger warm-up covers them.) The
//!   small-batch path ([`MoeContext::set_small_batch`](crate::MoeContext::set_small_batch))
//!   needs nothing more: it sizes the multi-kernel path's buffers, and its synchronisation words
//!   are allocated outside any capture (under the default `SmallBatch::Auto`, by the context's
//!   first eager inference forward, at any batch size; under `SmallBatch::UpTo`, when it is
//!   set), so an eager forward on either path warms a context for it. A captured forward of a
//!   context that Auto has not prepared yet takes the multi-kernel path (same bits); setting
//!   `UpTo` for the first time during a capture is refused like a growing workspace.
//!   Its kernel is captured as a cooperative kernel node (CUDA 12 and later).
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
//!
//! ## What the crate enforces
//!
//! A context's host record of what its device buffers hold (the [`SavedForward`] a backward
//! runs from) must never disagree with the device, or a backward would index buffers by another
//! forward's dispatch. So:
//!
//! - A capture runs nothing: when it ends, every context it used gets back the record it had
//!   before it (the capture's forwards did not happen yet), whether the capture succeeded,
//!   failed or panicked (the panic is passed on after the stream's capture has been ended).
//! - The graph keeps, per context, the record its run leaves; [`Graph::replay`] installs it.
//!   A graph whose first use of a context is a backward (it reads a forward saved before the
//!   capture) replays only while the context holds a record of the same shapes and capacity;
//!   otherwise the replay is refused with [`Error::CaptureUnsupported`] before it launches.
//! - A graph replays only while the buffers of every context it used are where they were at
//!   the capture: when a later call made one grow, or the context was dropped, the replay is
//!   refused with [`Error::CaptureUnsupported`] before it launches (capture it again).
//! - Only the thread that called [`capture`] may enqueue the crate's work on a stream being
//!   captured: another thread's call on that stream (through a clone of the [`Device`] or
//!   another handle), and a capture begun outside [`capture`], are refused with
//!   [`Error::CaptureUnsupported`], and reads to the host on a capturing stream are refused.
//!
//! [`SavedForward`]: crate::SavedForward

use std::cell::RefCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode, CUstreamCaptureStatus};
use cudarc::driver::{CudaGraph, CudaStream};

use crate::device::Device;
use crate::error::{Error, Result};

/// A context (or other stateful party) that a capture used: told when the capture ends.
pub(crate) trait CaptureParty: Send + Sync {
    /// The capture `id` ended. The party puts its host record back to what its device buffers
    /// hold (the capture ran nothing) and returns the part it plays in the graph (the graph may
    /// not be made: the part is then dropped at once).
    fn end_capture(self: Arc<Self>, id: u64) -> Box<dyn GraphPart>;
    /// The party's identity, to list it once per capture.
    fn key(&self) -> usize;
}

/// A party's share of a graph: what a replay must find and what it leaves. Dropping it
/// releases the party's buffers (see [`CaptureParty`]).
pub(crate) trait GraphPart: Send + Sync {
    /// Locks the party's record for the replay and checks what the graph expects of it.
    fn begin_replay(&self) -> Result<Box<dyn ReplayLock + '_>>;
}

/// A party's record, locked while its graph is enqueued.
pub(crate) trait ReplayLock {
    /// The graph was enqueued: the record becomes what its run leaves.
    fn replayed(&mut self);
}

/// How the calling thread may enqueue on a stream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Not being captured: the work runs.
    Eager,
    /// Being captured by this thread's [`capture`] with this id: the work is recorded.
    Capture(u64),
}

struct Active {
    id: u64,
    stream: usize,
    parties: Vec<Arc<dyn CaptureParty>>,
}

thread_local! {
    static ACTIVE: RefCell<Option<Active>> = const { RefCell::new(None) };
}
/// Captures in progress on any thread: while none is, a launch needs no capture query.
static CAPTURES: AtomicUsize = AtomicUsize::new(0);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn stream_key(stream: &CudaStream) -> usize {
    stream.cu_stream() as usize ^ (stream.context().cu_ctx() as usize).rotate_left(17)
}

fn capturing(stream: &CudaStream) -> Result<bool> {
    Ok(stream.capture_status()? != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

fn foreign_capture() -> Error {
    Error::CaptureUnsupported(
        "the stream is being captured into a CUDA graph by another thread, or outside \
         remoe_kernels::graph::capture; the crate's calls on it are refused until that capture \
         ends"
            .into(),
    )
}

/// Whether the calling thread may enqueue on `dev`'s stream, and whether the work runs or is
/// captured: a capture of this thread's [`capture`] on that stream, or none; anything else
/// (another thread's capture, a capture begun through cudarc directly) is refused.
pub(crate) fn mode(dev: &Device) -> Result<Mode> {
    let stream = dev.stream();
    if !capturing(stream)? {
        return Ok(Mode::Eager);
    }
    let key = stream_key(stream);
    ACTIVE.with(|a| match &*a.borrow() {
        Some(active) if active.stream == key => Ok(Mode::Capture(active.id)),
        _ => Err(foreign_capture()),
    })
}

/// The check a kernel launch makes: cheap while no capture runs anywhere.
pub(crate) fn check_launch(dev: &Device) -> Result<()> {
    if CAPTURES.load(Ordering::Acquire) == 0 {
        return Ok(());
    }
    mode(dev).map(|_| ())
}

/// A read to the host waits for the stream: refused while it is being captured (the wait would
/// return at once, with nothing run).
pub(crate) fn check_host_read(stream: &CudaStream) -> Result<()> {
    if capturing(stream)? {
        return Err(Error::CaptureUnsupported(
            "a read to the host while the stream is being captured into a CUDA graph (nothing \
             has run yet)"
                .into(),
        ));
    }
    Ok(())
}

/// Lists `party` in this thread's capture `id` (once).
pub(crate) fn join(id: u64, party: Arc<dyn CaptureParty>) {
    ACTIVE.with(|a| {
        if let Some(active) = a.borrow_mut().as_mut() {
            if active.id == id && !active.parties.iter().any(|p| p.key() == party.key()) {
                active.parties.push(party);
            }
        }
    });
}

/// An instantiated CUDA graph of calls on one [`Device`]'s stream (see the module
/// documentation).
pub struct Graph {
    graph: CudaGraph,
    stream: Arc<CudaStream>,
    parts: Vec<Box<dyn GraphPart>>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("contexts", &self.parts.len())
            .finish_non_exhaustive()
    }
}

/// Ends this thread's capture bookkeeping however `capture` leaves (return, error or panic).
struct ActiveGuard;

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.borrow_mut().take());
        CAPTURES.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Captures what `body` enqueues on `dev`'s stream into a graph, without running it. The
/// capture is thread-local: other threads' CUDA calls are not affected, and the crate's calls
/// on this stream from other threads are refused while it lasts. If `body` fails, the capture
/// is ended and discarded and its error returned; if it panics, the capture is ended and the
/// panic passed on. Either way nothing ran, and every context the body used holds the record it
/// held before (see the module documentation).
pub fn capture(dev: &Device, body: impl FnOnce() -> Result<()>) -> Result<Graph> {
    let stream = dev.stream().clone();
    if capturing(&stream)? {
        return Err(Error::CaptureUnsupported(
            "the stream is already being captured (captures do not nest)".into(),
        ));
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let nested = ACTIVE.with(|a| {
        let mut a = a.borrow_mut();
        if a.is_some() {
            return true;
        }
        *a = Some(Active {
            id,
            stream: stream_key(&stream),
            parties: Vec::new(),
        });
        false
    });
    if nested {
        return Err(Error::CaptureUnsupported(
            "this thread is already capturing another stream (captures do not nest)".into(),
        ));
    }
    CAPTURES.fetch_add(1, Ordering::AcqRel);
    let guard = ActiveGuard;
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let ran = catch_unwind(AssertUnwindSafe(body));
    // End the capture whatever happened, so that the stream is usable again.
    let ended = stream.end_capture(CUgraphInstantiate_flags(0));
    let mut parties = ACTIVE.with(|a| {
        a.borrow_mut()
            .as_mut()
            .map(|active| std::mem::take(&mut active.parties))
            .unwrap_or_default()
    });
    // Every graph locks its contexts' records in one global order (their addresses), so that
    // two graphs replayed on two threads cannot wait for each other.
    parties.sort_by_key(|p| p.key());
    drop(guard);
    let parts: Vec<Box<dyn GraphPart>> = parties.into_iter().map(|p| p.end_capture(id)).collect();
    let ran = match ran {
        Ok(ran) => ran,
        Err(panic) => {
            drop(parts);
            resume_unwind(panic)
        }
    };
    ran?;
    match ended? {
        Some(graph) => Ok(Graph {
            graph,
            stream,
            parts,
        }),
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

    /// Enqueues one run of the graph on the stream it was captured on, and records in every
    /// context the graph used what the run leaves there (see the module documentation). Refused
    /// with [`Error::CaptureUnsupported`], before anything is enqueued, when a context does not
    /// hold the forward the graph's backward was captured against, or the stream is being
    /// captured.
    ///
    /// # Safety
    ///
    /// Every tensor that the captured calls read or wrote must still be allocated at the same
    /// address, and no other stream may use those tensors while the replay runs. (The contexts'
    /// own buffers are checked by the replay itself: one that was reallocated, or whose context
    /// was dropped, makes it refuse.)
    pub unsafe fn replay(&self) -> Result<()> {
        if capturing(&self.stream)? {
            return Err(Error::CaptureUnsupported(
                "a graph cannot be replayed into a stream that is being captured".into(),
            ));
        }
        let mut locks = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            locks.push(part.begin_replay()?);
        }
        self.graph.launch()?;
        for lock in &mut locks {
            lock.replayed();
        }
        Ok(())
    }
}
