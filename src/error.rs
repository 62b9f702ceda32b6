//! The crate's one error type. Every check of the safe layer ends here, so a caller can match on
//! what went wrong instead of parsing a message.

use cudarc::driver::DriverError;

/// Everything the safe API can refuse or fail with.
///
/// `#[non_exhaustive]`: later versions may add variants, so a `match` outside this crate needs a
/// `_` arm.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable CUDA device: no driver library (`libcuda`) on this machine, no device, or the
    /// device could not be opened. The string says which.
    #[error("no CUDA device: {0}")]
    NoCudaDevice(String),
    /// A layer configuration that the math or the kernels cannot take (zero sizes, k > E, a
    /// size that is not a multiple of 8 where the kernels load 16-byte vectors, ...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A tensor whose shape is not the one the operation needs.
    #[error("{what}: expected shape {expected:?}, got {actual:?}")]
    ShapeMismatch {
        /// The tensor.
        what: &'static str,
        /// The shape the operation needs.
        expected: Vec<usize>,
        /// The tensor's shape.
        actual: Vec<usize>,
    },
    /// A buffer (host data, or a device buffer or view wrapped as a tensor) whose length does not
    /// match the shape given with it.
    #[error("{what}: expected {expected} elements, got {actual}")]
    LengthMismatch {
        /// The buffer.
        what: &'static str,
        /// The element count of the shape.
        expected: usize,
        /// The buffer's element count.
        actual: usize,
    },
    /// A device pointer that is not aligned as the kernel's vector loads need.
    #[error("{what}: device pointer must be {required}-byte aligned")]
    Misaligned {
        /// The tensor.
        what: &'static str,
        /// The alignment needed, in bytes.
        required: usize,
    },
    /// A size whose element count would overflow the kernels' 32-bit indices.
    #[error("{what}: {elements} elements overflow the kernels' 32-bit indices")]
    TooLarge {
        /// The tensor or size.
        what: &'static str,
        /// Its element count.
        elements: usize,
    },
    /// The operation ran on a tensor that belongs to another device context.
    #[error("{what}: tensor belongs to another CUDA context")]
    WrongContext {
        /// The tensor.
        what: &'static str,
    },
    /// The operation would use, on its device's stream, a tensor whose buffer belongs to
    /// another stream of the same context while cudarc's event tracking, which orders the two,
    /// is off for one of them (a [`Device::new_untracked`](crate::Device::new_untracked)
    /// handle): nothing would order the two streams' work on it.
    #[error(
        "{what}: tensor of another stream, with event tracking off (nothing orders the two \
         streams); use it on its own stream's Device, or synchronise and copy it"
    )]
    UnorderedStream {
        /// The tensor.
        what: &'static str,
    },
    /// A CUDA driver call failed. The message names the error (`CUDA_ERROR_...`) and the
    /// driver's description of it; the driver's error is the
    /// [`source`](std::error::Error::source).
    #[error("CUDA driver error {}", driver_message(.0))]
    Driver(#[from] DriverError),
    /// A kernel launch failed; `code` is the `cudaError_t` the launcher returned.
    #[error("kernel launch failed: {kernel} returned cudaError {code}")]
    Launch {
        /// The launcher.
        kernel: &'static str,
        /// The `cudaError_t` it returned.
        code: i32,
    },
    /// A device buffer holds fewer elements than the kernel about to be launched reads or writes
    /// through it. Checked at every launch, before anything is enqueued.
    #[error("{what}: the kernel needs {required} elements, the device buffer holds {actual}")]
    BufferTooShort {
        /// The buffer.
        what: &'static str,
        /// The elements the kernel reads or writes.
        required: usize,
        /// The elements the buffer holds.
        actual: usize,
    },
    /// A router logit was NaN or infinite (see the crate documentation's policy on non-finite
    /// logits): `count` logits (of one forward, or of all forwards since the last check) in all,
    /// the first of them in token `first_token`. Such a logit's gate was treated as 0 (ReMoE) or
    /// its expert as not selectable (TopK), so nothing out of bounds or undefined happened; the
    /// forward's results are not to be used.
    #[error("{count} router logit(s) were NaN or infinite, the first in token {first_token}")]
    NonFiniteLogits {
        /// How many logits were not finite.
        count: usize,
        /// The token of the first of them.
        first_token: usize,
    },
    /// A forward routed more (token, expert) pairs than the context's pair buffers hold (see
    /// [`crate::capacity`]): `needed` is the largest such |A| since the last check. That
    /// forward dispatched nothing (its output and its backward's expert gradients were zero);
    /// raise the capacity with
    /// [`MoeContext::set_pair_capacity`](crate::MoeContext::set_pair_capacity).
    #[error(
        "a forward routed {needed} pairs, past the pair capacity of {capacity}; it dispatched \
         nothing (raise MoeContext::set_pair_capacity, or leave it at PairCapacity::Auto)"
    )]
    CapacityExceeded {
        /// The pairs routed.
        needed: usize,
        /// The pairs the buffers hold.
        capacity: usize,
    },
    /// An operation that cannot be captured in a CUDA graph was asked of a stream that is being
    /// captured (a workspace that must grow, stage timing, a read back to the host), a call on
    /// a stream that another thread is capturing (or that was captured outside
    /// [`graph::capture`](crate::graph::capture)), or a replay the graph's contexts no longer
    /// fit (see [`crate::graph`]). Nothing was enqueued.
    #[error("not possible while the stream is being captured: {0}")]
    CaptureUnsupported(String),
    /// The ranks of an expert-parallel group disagree (see [`crate::ep`]): rank `rank`'s setup
    /// record, count message (forward) or header message (backward) differs from what this rank
    /// expects (another layer shape, call number, layer or phase), or that rank aborted the call
    /// after a check of its own failed.
    /// Every rank sees the same records and messages, so every rank returns the same error.
    #[error("expert-parallel rank {rank} is out of step: {what}")]
    EpMismatch {
        /// The first rank (in rank order) that disagrees.
        rank: usize,
        /// How it disagrees.
        what: String,
    },
    /// An expert-parallel exchange waited `waited` for ranks that never took part (see
    /// [`crate::ep::loopback`]); the group is aborted.
    #[error("expert-parallel {op} gave up after {waited:?}: a rank never took part")]
    EpTimeout {
        /// The exchange.
        op: &'static str,
        /// How long it waited.
        waited: std::time::Duration,
    },
    /// The expert-parallel group was aborted by an earlier failure (the string describes the
    /// first one); every later call fails. Make a new group.
    #[error("the expert-parallel group was aborted: {0}")]
    EpAborted(String),
    /// The NCCL library cannot be used (see `ep::nccl`, feature `ep`): it is not installed
    /// under a name cudarc looks for, or it is older than the NCCL the transport needs. The
    /// string says which, and how to fix it.
    #[error("NCCL is not available: {0}")]
    NcclUnavailable(String),
    /// An NCCL call failed, or an expert-parallel communicator reported an asynchronous error
    /// (see `ep::nccl`, feature `ep`). When it came from a communicator, that communicator is
    /// aborted, and every later call on it returns [`Error::EpAborted`].
    #[error("NCCL failed in {op}: {message} (ncclResult_t {code})")]
    Collective {
        /// The operation: the exchange as its caller named it, or the NCCL step that failed.
        op: &'static str,
        /// NCCL's result code (`ncclResult_t`).
        code: i32,
        /// NCCL's description of the code (`ncclGetErrorString`).
        message: String,
    },
    /// A checkpoint could not be read or written (see [`crate::weights`]).
    #[error("weights: {0}")]
    Weights(#[source] WeightsError),
}

/// A driver error as the messages name it: `CUDA_ERROR_OUT_OF_MEMORY (2): out of memory`. The
/// name and code come from the error itself; the description from the driver
/// (`cuGetErrorString`), asked only where the driver library can be loaded (cudarc's loader
/// panics where it cannot, and a message must not).
pub(crate) fn driver_message(e: &DriverError) -> String {
    let name = format!("{:?} ({})", e.0, e.0 as u32);
    if !crate::driver::driver_library_present() {
        return name;
    }
    match e.error_string() {
        Ok(what) => format!("{name}: {}", what.to_string_lossy()),
        Err(_) => name,
    }
}

/// Why a checkpoint could not be read or written.
///
/// `#[non_exhaustive]`: later versions may refuse more kinds of malformed file, so a `match`
/// outside this crate needs a `_` arm.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WeightsError {
    /// A tensor the layout needs is not in the file.
    Missing {
        /// The tensor's name in the file.
        name: String,
    },
    /// A tensor's stored shape disagrees with the layer's sizes, as read from the router (E, H)
    /// and the first expert tensor (F).
    Shape {
        /// The tensor's name in the file.
        name: String,
        /// The shape the layer's sizes call for.
        expected: Vec<usize>,
        /// The shape stored.
        actual: Vec<usize>,
    },
    /// A tensor whose rank is not the layout's (every tensor the layer reads is 2-D).
    Rank {
        /// The tensor's name in the file.
        name: String,
        /// The rank the layout stores it with.
        expected: usize,
        /// The shape stored.
        actual: Vec<usize>,
    },
    /// A tensor from which the layer's sizes are read has a zero dimension: H, F and E must all
    /// be at least 1.
    ZeroSize {
        /// The tensor's name in the file.
        name: String,
        /// The shape stored.
        shape: Vec<usize>,
    },
    /// A tensor disagrees with the layer's sizes in a way no single expected shape describes:
    /// Megatron's fused columns that are not 2F per expert, or a Hugging Face expert past the
    /// number of experts the router scores.
    Inconsistent {
        /// The tensor's name in the file.
        name: String,
        /// How it disagrees.
        why: String,
    },
    /// A tensor stored in a dtype other than bf16, f16 or f32.
    Dtype {
        /// The tensor's name in the file.
        name: String,
        /// The dtype stored.
        dtype: String,
    },
    /// The bytes are not a safetensors file (the parser's message: a header that is not JSON or
    /// overruns the file, data offsets that leave gaps or overlap, a tensor's bytes that are not
    /// its shape's, a file cut short), or the sizes read overflow.
    Format(String),
    /// Reading or writing the file failed.
    Io(String),
}

impl std::fmt::Display for WeightsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing { name } => write!(f, "tensor {name} is not in the file"),
            Self::Shape {
                name,
                expected,
                actual,
            } => write!(
                f,
                "tensor {name}: expected shape {expected:?}, got {actual:?}"
            ),
            Self::Rank {
                name,
                expected,
                actual,
            } => write!(
                f,
                "tensor {name}: expected a {expected}-D tensor, got shape {actual:?}"
            ),
            Self::ZeroSize { name, shape } => write!(
                f,
                "tensor {name}: shape {shape:?} has a zero dimension (H, F and E must be at least 1)"
            ),
            Self::Inconsistent { name, why } => write!(f, "tensor {name}: {why}"),
            Self::Dtype { name, dtype } => {
                write!(
                    f,
                    "tensor {name}: dtype {dtype} (bf16, f16 or f32 expected)"
                )
            }
            Self::Format(why) => write!(f, "not a usable safetensors file: {why}"),
            Self::Io(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for WeightsError {}

impl From<WeightsError> for Error {
    fn from(e: WeightsError) -> Self {
        Error::Weights(e)
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::sys::CUresult;

    #[test]
    fn a_driver_error_keeps_its_source_and_names_the_cuda_error() {
        let driver = DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        let e = Error::from(driver);
        assert_eq!(e, Error::Driver(driver));
        assert!(matches!(e.clone(), Error::Driver(d) if d == driver));
        // Without a driver library (as here, in CI) the description is left out, never a panic.
        let msg = e.to_string();
        assert!(
            msg.starts_with("CUDA driver error CUDA_ERROR_OUT_OF_MEMORY (2)"),
            "{msg}"
        );
        let source = std::error::Error::source(&e).expect("the driver error is the source");
        let source = source.downcast_ref::<DriverError>().expect("a DriverError");
        assert_eq!(*source, driver);
    }
}
