//! Helpers shared by the integration tests.
#![allow(dead_code)]

use remoe_kernels::{Device, Error};

/// The GPU for a GPU test, or `None` after printing why the test is skipped. With
/// `REMOE_REQUIRE_GPU=1` a missing GPU fails the test instead.
pub fn gpu_or_skip(test: &str) -> Option<Device> {
    match Device::new(0) {
        Ok(dev) => Some(dev),
        Err(Error::NoCudaDevice(why)) => {
            if std::env::var("REMOE_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("{test}: REMOE_REQUIRE_GPU=1 but no CUDA device: {why}");
            }
            // Straight to the stderr handle: libtest captures eprintln! of passing tests, and a
            // skip must be visible in the run's output.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no CUDA device ({why})");
            None
        }
        Err(e) => panic!("{test}: opening the CUDA device failed: {e}"),
    }
}

/// ||a - b|| / ||b|| in f64; 0 when both are empty or zero. NaN anywhere gives +inf, so an
/// unwritten (poisoned) element can never pass.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_err: length mismatch");
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

#[allow(unused_imports)]
pub use remoe_kernels::synthetic::*;
