//! Expert parallelism: the experts split over R ranks (one GPU each), each rank routing its own
//! tokens and exchanging (token, expert) pairs with the experts' owners.
//!
//! What exists so far is the part that needs no GPU, and that the GPU layer will run on the host
//! unchanged, and the NCCL transport the GPU layer will exchange through (the repository's
//! `docs/EXPERT_PARALLEL_DESIGN.md` is the whole plan):
//!
//! - [`protocol`]: who owns which experts ([`ExpertPartition`]), the setup record every rank
//!   must agree on ([`EpSetup`]), the per-call count message and the traffic matrix built from
//!   all ranks' messages ([`TrafficMatrix`]), and where each received pair goes on its owner
//!   ([`ReceivePlan`]).
//! - [`loopback`]: the all-to-all of R ranks (threads) of one process with every wait bounded,
//!   which turns a size mismatch or a rank that never calls into a typed error on every rank
//!   ([`Error::EpMismatch`](crate::Error::EpMismatch),
//!   [`Error::EpTimeout`](crate::Error::EpTimeout), then
//!   [`Error::EpAborted`](crate::Error::EpAborted)) where NCCL would hang.
//! - `nccl` (feature `ep`): the NCCL transport, one rank per GPU: a nonblocking communicator
//!   whose all-to-all is one group of sends and receives, every wait bounded, so that a rank
//!   that never calls or a size mismatch becomes [`Error::EpTimeout`](crate::Error::EpTimeout)
//!   and then [`Error::EpAborted`](crate::Error::EpAborted) instead of a hang. Its two-GPU
//!   tests are `tests/gpu_ep_nccl.rs`.
//! - [`crate::reference::expert_parallel`]: the whole expert-parallel layer on the CPU, R ranks
//!   simulated in one process, whose tests show the protocol's central claim: each rank's output
//!   and gradients are **bitwise** those of the one-rank layer on that rank's tokens, and each
//!   owner's expert gradients are bitwise the one-rank gradients on all ranks' tokens in rank
//!   order.
//!
//! Not built yet: the GPU layer, its kernels (the count message and the owner's dispatch, whose
//! CPU versions are here), and the device-buffer transport over the loopback hub.
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
