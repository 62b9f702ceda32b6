//! Expert parallelism: the experts split over R ranks (one GPU each), each rank routing its own
//! tokens and exchanging (token, expert) pairs with the experts' owners.
//!
//! The parts (the repository's `docs/EXPERT_PARALLEL_DESIGN.md` is the whole plan):
//!
//! - [`layer`]: the layer on the GPU, [`ep_moe_forward`] and [`ep_moe_backward`] over an
//!   [`EpGroup`] (R ranks that agreed on one [`EpSetup`]) and an [`EpContext`] (a rank's own
//!   routing and combine, and what it holds as an owner). One count exchange per forward,
//!   read by the host, sizes everything exactly; the backward moves the forward's rows back,
//!   after a header exchange that makes ranks in the backwards of different forwards fail.
//! - [`protocol`]: who owns which experts ([`ExpertPartition`]), the setup record every rank
//!   must agree on ([`EpSetup`]), the per-call count message (and the backward's header
//!   message, [`CallHeader`]) and the traffic matrix built from all ranks' messages
//!   ([`TrafficMatrix`]), and where each received pair goes on its owner
//!   ([`ReceivePlan`]); the GPU layer builds the same arrays with its kernels
//!   (kernels/ep_dispatch.cu).
//! - [`transport`]: the device loopback, R ranks as threads on one GPU exchanging device
//!   buffers through a [`loopback`] hub, which turns a size mismatch or a rank that never
//!   calls into a typed error on every rank
//!   ([`Error::EpMismatch`](crate::Error::EpMismatch),
//!   [`Error::EpTimeout`](crate::Error::EpTimeout), then
//!   [`Error::EpAborted`](crate::Error::EpAborted)) where NCCL would hang.
//! - `nccl` (feature `ep`): the NCCL transport, one rank per GPU: a nonblocking communicator
//!   whose all-to-all is one group of sends and receives, every wait bounded, so that a rank
//!   that never calls or a size mismatch becomes [`Error::EpTimeout`](crate::Error::EpTimeout)
//!   and then [`Error::EpAborted`](crate::Error::EpAborted) instead of a hang.
//! - [`crate::reference::expert_parallel`]: the whole expert-parallel layer on the CPU, R ranks
//!   simulated in one process, whose tests show the protocol's central claim on the CPU.
//!
//! The GPU tests are `tests/gpu_ep_layer.rs` (one GPU over the loopback, two over NCCL) and
//! `tests/gpu_ep_nccl.rs` (the NCCL transport alone, two GPUs).
//!
//! # Why the results are exact
//!
//! A source's pairs are sorted by expert, and within an expert by token, so the pairs bound for
//! one owner are one contiguous range of the source's pairs, sent in that order. An owner orders
//! what it receives expert by expert, and within an expert source by source: for each expert,
//! exactly the pair sequence of the one-rank layer run on the concatenation of all ranks'
//! tokens. Every per-pair quantity (the expert's output, the pair's gradients) depends only on
//! the pair's own row, and every reduction (the combine, the token sum, the weight gradients)
//! runs in the same order as on one rank.

mod dispatch;
pub mod layer;
pub mod loopback;
#[cfg(feature = "ep")]
pub mod nccl;
pub mod protocol;
pub mod transport;

pub use layer::{ep_moe_backward, ep_moe_forward, EpContext, EpGroup, EpSaved, Transport};
pub use loopback::{Endpoint, LoopbackHub, Msg};
pub use protocol::{CallHeader, EpSetup, ExpertPartition, Phase, ReceivePlan, TrafficMatrix};
