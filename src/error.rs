//! The crate's one error type. Every check of the safe layer ends here, so a caller can match on
//! what went wrong instead of parsing a message.

use std::fmt;

/// Everything the safe API can refuse or fail with.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// No usable CUDA device: no driver library (`libcuda`) on this machine, no device, or the
    /// device could not be opened. The string says which.
    NoCudaDevice(String),
    /// A layer configuration that the math or the kernels cannot take (zero sizes, k > E, a
    /// size that is not a multiple of 8 where the kernels load 16-byte vectors, ...).
    InvalidConfig(String),
    /// A tensor whose shape is not the one the operation needs.
    ShapeMismatch {
        what: &'static str,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    /// A buffer (host data, or a device buffer or view wrapped as a tensor) whose length does not
    /// match the shape given with it.
    LengthMismatch {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// A device pointer that is not aligned as the kernel's vector loads need.
    Misaligned { what: &'static str, required: usize },
    /// A size whose element count would overflow the kernels' 32-bit indices.
    TooLarge { what: &'static str, elements: usize },
    /// The operation ran on a tensor that belongs to another device context.
    WrongContext { what: &'static str },
    /// A CUDA driver call failed.
    Driver(String),
    /// A kernel launch failed; `code` is the `cudaError_t` the launcher returned.
    Launch { kernel: &'static str, code: i32 },
    /// A device buffer holds fewer elements than the kernel about to be launched reads or writes
    /// through it. Checked at every launch, before anything is enqueued.
    BufferTooShort {
        what: &'static str,
        required: usize,
        actual: usize,
    },
    /// A router logit was NaN or infinite (see the crate documentation's policy on non-finite
    /// logits): `count` logits (of one forward, or of all forwards since the last check) in all,
    /// the first of them in token `first_token`. Such a logit's gate was treated as 0 (ReMoE) or
    /// its expert as not selectable (TopK), so nothing out of bounds or undefined happened; the
    /// forward's results are not to be used.
    NonFiniteLogits { count: usize, first_token: usize },
    /// A forward routed more (token, expert) pairs than the context's pair buffers hold (see
    /// [`crate::capacity`]): `needed` is the largest such |A| since the last check, `capacity`
    /// the buffers' size. That forward dispatched nothing (its output and its backward's expert
    /// gradients were zero); raise the capacity with
    /// [`MoeContext::set_pair_capacity`](crate::MoeContext::set_pair_capacity).
    CapacityExceeded { needed: usize, capacity: usize },
    /// An operation that cannot be captured in a CUDA graph was asked of a stream that is being
    /// captured (a workspace that must grow, stage timing, a read back to the host). Nothing
    /// was enqueued.
    CaptureUnsupported(String),
    /// A checkpoint could not be read or written (see [`crate::weights`]).
    Weights(crate::weights::WeightsError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoCudaDevice(why) => write!(f, "no CUDA device: {why}"),
            Error::InvalidConfig(why) => write!(f, "invalid configuration: {why}"),
            Error::ShapeMismatch {
                what,
                expected,
                actual,
            } => write!(f, "{what}: expected shape {expected:?}, got {actual:?}"),
            Error::LengthMismatch {
                what,
                expected,
                actual,
            } => write!(f, "{what}: expected {expected} elements, got {actual}"),
            Error::Misaligned { what, required } => {
                write!(f, "{what}: device pointer must be {required}-byte aligned")
            }
            Error::TooLarge { what, elements } => write!(
                f,
                "{what}: {elements} elements overflow the kernels' 32-bit indices"
            ),
            Error::WrongContext { what } => {
                write!(f, "{what}: tensor belongs to another CUDA context")
            }
            Error::Driver(msg) => write!(f, "CUDA driver error: {msg}"),
            Error::Launch { kernel, code } => {
                write!(
                    f,
                    "kernel launch failed: {kernel} returned cudaError {code}"
                )
            }
            Error::BufferTooShort {
                what,
                required,
                actual,
            } => write!(
                f,
                "{what}: the kernel needs {required} elements, the device buffer holds {actual}"
            ),
            Error::CapacityExceeded { needed, capacity } => write!(
                f,
                "a forward routed {needed} pairs, past the pair capacity of {capacity}; it \
                 dispatched nothing (raise MoeContext::set_pair_capacity)"
            ),
            Error::CaptureUnsupported(why) => {
                write!(f, "not possible while the stream is being captured: {why}")
            }
            Error::NonFiniteLogits { count, first_token } => write!(
                f,
                "{count} router logit(s) were NaN or infinite, the first in token {first_token}"
            ),
            Error::Weights(e) => write!(f, "weights: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Driver(e.to_string())
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
