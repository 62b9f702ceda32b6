//! What the tests, benchmarks and examples of remoe-kernels share, apart from the library's
//! public API (this crate is never published):
//!
//! - [`rng`]: seeded random inputs, and `REMOE_SEED` to replay a failing run;
//! - [`synthetic`]: layer problems whose router reaches a chosen density, on the host and on
//!   the device;
//! - [`shapes`]: docs/SPEC.md's named benchmark configurations (one table for the benchmarks and
//!   examples), and shapes given by hand as `NAME:T:H:F:E:k`;
//! - [`timing`]: GPU work timed with CUDA events.
#![warn(missing_docs)]

pub mod rng;
pub mod shapes;
pub mod synthetic;
pub mod timing;

pub use timing::{time_gpu, GpuTimings};
