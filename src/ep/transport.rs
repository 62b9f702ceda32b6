//! How an expert-parallel group moves device buffers: one all-to-all per call, a send and a
//! receive per peer (self and empty messages included), enqueued on the rank's stream.
//!
//! Two transports: NCCL between GPUs (feature `ep`), and the device loopback,
//! R ranks as threads on one GPU over a [`LoopbackHub`]. NCCL refuses several ranks on one
//! device. The loopback is what lets the protocol be tested on one GPU, and it catches what NCCL
//! cannot: a receiver whose expected size differs from the sender's is an
//! [`Error::EpMismatch`] on every rank, where NCCL would hang until a timeout.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{result as driver, CudaEvent, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::loopback::{Endpoint, LoopbackHub, Msg};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Element;

/// What one rank hands another through the hub in the device loopback.
#[derive(Debug, Clone)]
pub enum Handoff {
    /// A send: the source's buffer, readable once `ready` has completed.
    Data {
        /// The buffer's device address (in the one context all ranks share).
        ptr: u64,
        /// Recorded on the sender's stream after the work that wrote the buffer.
        ready: Arc<CudaEvent>,
    },
    /// A receiver's note that it has copied what the sender sent: the sender's stream waits for
    /// the event before it reuses its buffer. None: the receiver failed and drained its context
    /// instead, so nothing of it is pending.
    Done(Option<Arc<CudaEvent>>),
}

/// One rank of the device loopback: threads on one GPU, every wait bounded by the hub.
#[derive(Debug)]
pub struct DeviceLoopback {
    endpoint: Endpoint<Handoff>,
}

impl DeviceLoopback {
    /// Rank `rank`'s side of `hub` (R threads, one per rank, each with its own [`Device`] on
    /// the same GPU); every exchange waits at most `timeout` for the other ranks.
    pub fn new(hub: &LoopbackHub<Handoff>, rank: usize, timeout: Duration) -> Result<Self> {
        Ok(Self {
            endpoint: hub.endpoint(rank, timeout)?,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.endpoint.rank()
    }

    /// R.
    pub fn world(&self) -> usize {
        self.endpoint.world()
    }

    /// Sends `send[send_ranges[q]]` to rank q and receives rank q's message into
    /// `recv[recv_ranges[q]]`, for every q (ranges in elements: one per rank each, inside their
    /// buffers, the receive ranges without overlap; send ranges may overlap). On return
    /// the copies are enqueued on `dev`'s stream, ordered after each sender's earlier work; the
    /// sender's stream waits for its readers before it runs anything else, so it may overwrite
    /// or free its buffers afterwards as usual.
    pub fn exchange<T: Element>(
        &mut self,
        dev: &Device,
        op: &'static str,
        (send, send_ranges): (&CudaView<'_, T>, &[Range<usize>]),
        (recv, recv_ranges): (&mut CudaViewMut<'_, T>, &[Range<usize>]),
    ) -> Result<()> {
        check_ranges(
            op,
            self.world(),
            send.len(),
            send_ranges,
            recv.len(),
            recv_ranges,
        )?;
        let stream = dev.stream();
        let elem = std::mem::size_of::<T>();
        // The pointer first: taking it may make the stream wait for the buffer's last write,
        // which `ready` must follow.
        let (src_base, src_guard) = send.device_ptr(stream);
        let ready = Arc::new(stream.record_event(None)?);
        let posts = send_ranges
            .iter()
            .map(|r| Msg {
                bytes: r.len() * elem,
                payload: Handoff::Data {
                    ptr: src_base + (r.start * elem) as u64,
                    ready: Arc::clone(&ready),
                },
            })
            .collect();
        let expect: Vec<usize> = recv_ranges.iter().map(|r| r.len() * elem).collect();
        // Round 1. A failure here is the same on every rank (each checks the whole round), so
        // no rank has enqueued a copy out of this rank's buffer.
        let got = self.endpoint.exchange(op, posts, &expect)?;
        let (dst_base, dst_guard) = recv.device_ptr_mut(stream);
        let copied = copy_in(dev, op, &got, (dst_base, recv_ranges), elem);
        // Round 2, whatever happened in this rank's copies: every sender must learn when its
        // readers are done with its buffer. After a failure this rank drains its copies and
        // says so with no event.
        let done = match copied.is_ok().then(|| stream.record_event(None)) {
            Some(Ok(event)) => Some(Arc::new(event)),
            _ => {
                let _ = drain(dev);
                None
            }
        };
        let notes = (0..self.world())
            .map(|_| Msg {
                bytes: 0,
                payload: Handoff::Done(done.clone()),
            })
            .collect();
        let waited = self
            .endpoint
            .exchange(op, notes, &vec![0; self.world()])
            .and_then(|readers| {
                for (reader, note) in readers.iter().enumerate() {
                    match note {
                        Handoff::Done(Some(done)) => stream.wait(done)?,
                        Handoff::Done(None) => {}
                        Handoff::Data { .. } => return Err(out_of_step(reader, op)),
                    }
                }
                Ok(())
            });
        if waited.is_err() {
            // Peers may still be copying out of this rank's buffer, which the caller is free to
            // drop once we return: let every stream of the shared context drain first (their
            // copies wait only on events that were recorded).
            let _ = drain(dev);
        }
        drop((src_guard, dst_guard));
        copied.and(waited)
    }
}

/// Enqueues on `dev`'s stream, for each source, a wait for its `ready` event and the copy of
/// its message into this rank's range of the receive buffer at `dst_base`.
fn copy_in(
    dev: &Device,
    op: &'static str,
    got: &[Handoff],
    (dst_base, ranges): (u64, &[Range<usize>]),
    elem: usize,
) -> Result<()> {
    let stream = dev.stream();
    for (src, (handoff, r)) in got.iter().zip(ranges).enumerate() {
        let Handoff::Data { ptr, ready } = handoff else {
            return Err(out_of_step(src, op));
        };
        stream.wait(ready)?;
        if !r.is_empty() {
            // SAFETY: the destination is inside this rank's receive view (check_ranges) and
            // disjoint from the other destinations; the source is the sender's range of the
            // same byte count (the hub checked both sizes), in the context all ranks share,
            // kept alive and unwritten until this copy completes: the sender's stream waits for
            // this rank's `done` event (or, after a failure here, this rank drains its context
            // before it answers) before it runs anything else.
            unsafe {
                driver::memcpy_dtod_async(
                    dst_base + (r.start * elem) as u64,
                    *ptr,
                    r.len() * elem,
                    stream.cu_stream(),
                )?
            };
        }
    }
    Ok(())
}

/// Waits for every stream of the context all ranks share (its own and the peers'). Through the
/// crate's own binding: cudarc's would first return an error recorded earlier, without waiting.
fn drain(dev: &Device) -> Result<()> {
    dev.bind_to_thread()?;
    Ok(driver::ctx::synchronize()?)
}

/// The ranges of one exchange, in elements: one per rank each, every one inside its buffer, and
/// no two receive ranges overlapping (two peers never write the same element). Send ranges may
/// overlap (an all-gather sends one buffer to everyone).
pub(crate) fn check_ranges(
    op: &'static str,
    world: usize,
    send_len: usize,
    send: &[Range<usize>],
    recv_len: usize,
    recv: &[Range<usize>],
) -> Result<()> {
    let bad = |why: String| Err(Error::InvalidConfig(format!("{op}: {why}")));
    if send.len() != world || recv.len() != world {
        return bad(format!(
            "{} send and {} receive ranges for {world} ranks",
            send.len(),
            recv.len()
        ));
    }
    for (q, r) in send.iter().enumerate() {
        if r.start > r.end || r.end > send_len {
            return bad(format!(
                "send range {r:?} for rank {q} outside {send_len} elements"
            ));
        }
    }
    for (q, r) in recv.iter().enumerate() {
        if r.start > r.end || r.end > recv_len {
            return bad(format!(
                "receive range {r:?} for rank {q} outside {recv_len} elements"
            ));
        }
    }
    let mut by_start: Vec<&Range<usize>> = recv.iter().filter(|r| !r.is_empty()).collect();
    by_start.sort_by_key(|r| r.start);
    if let Some(w) = by_start.windows(2).find(|w| w[1].start < w[0].end) {
        return bad(format!("receive ranges {:?} and {:?} overlap", w[0], w[1]));
    }
    Ok(())
}

/// A handoff of the other kind: the ranks' exchanges are out of step (each exchange is two hub
/// rounds on every rank, so this needs a rank that went on after an error it ignored).
fn out_of_step(rank: usize, op: &'static str) -> Error {
    Error::EpMismatch {
        rank,
        what: format!("out of step in {op}: a handoff of the other round"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_ranges_stay_inside_their_buffers_and_receives_never_overlap() {
        let ok = check_ranges("t", 2, 10, &[0..4, 2..10], 8, &[0..3, 3..8]);
        assert_eq!(ok, Ok(()));
        // An all-gather: one send buffer to every rank; empty ranges anywhere.
        assert!(check_ranges("t", 3, 4, &[0..4, 0..4, 0..4], 12, &[0..4, 4..8, 8..12]).is_ok());
        assert!(check_ranges("t", 2, 0, &[0..0, 0..0], 0, &[0..0, 0..0]).is_ok());
        // Receives need not follow rank order.
        assert!(check_ranges("t", 2, 2, &[0..1, 1..2], 9, &[1..9, 0..1]).is_ok());
        let refused = [
            // One range too many; a send past its buffer; a receive past its buffer.
            check_ranges("t", 2, 10, &[0..4, 0..4, 0..4], 8, &[0..3, 3..8]),
            check_ranges("t", 2, 10, &[0..4, 6..11], 8, &[0..3, 3..8]),
            check_ranges("t", 2, 10, &[0..4, 2..10], 8, &[0..3, 3..9]),
            // Two receives writing element 2, in either order.
            check_ranges("t", 2, 10, &[0..4, 2..10], 8, &[0..3, 2..8]),
            check_ranges("t", 2, 10, &[0..4, 2..10], 8, &[2..8, 0..3]),
        ];
        for (i, r) in refused.into_iter().enumerate() {
            assert!(matches!(r, Err(Error::InvalidConfig(_))), "case {i}: {r:?}");
        }
    }
}
