//! Seeded random inputs for tests, examples and benchmarks: [`TestRng`] (rand_chacha's ChaCha8,
//! the same stream from the same seed on every platform) with rand's [`Rng`] methods and
//! rand_distr's distributions, and [`fresh_seed`] for a new seed that can be replayed.
//!
//! ## Replaying a run: `REMOE_SEED`
//!
//! Tests, examples and benchmarks take their seeds from [`fresh_seed`], which is a new value on
//! every call unless the environment variable `REMOE_SEED` ([`SEED_ENV`]) is set: then every call
//! returns that value (decimal, or hexadecimal with a `0x` prefix). A failing GPU test prints its
//! seed as `seed N (replay with REMOE_SEED=N)`; running it again with `REMOE_SEED=N` draws the
//! same inputs. (A test that loops over several shapes gives every shape the same seed N then,
//! so the shape that failed sees exactly its inputs again.) An empty `REMOE_SEED` counts as
//! unset; any other value that is not a `u64` makes `fresh_seed` panic, naming the variable and
//! the value.

pub use rand::{Rng, SeedableRng};
pub use rand_distr::{Distribution, StandardNormal, Uniform};

/// The generator of every test input: ChaCha8 from rand_chacha, seeded with
/// [`SeedableRng::seed_from_u64`] (see [`seeded`]).
pub type TestRng = rand_chacha::ChaCha8Rng;

/// The environment variable that fixes [`fresh_seed`] (see the module documentation).
pub const SEED_ENV: &str = "REMOE_SEED";

/// The generator for `seed`: the same seed draws the same values.
pub fn seeded(seed: u64) -> TestRng {
    TestRng::seed_from_u64(seed)
}

/// Reads a seed as `REMOE_SEED` takes it: a decimal `u64`, or a hexadecimal one after `0x` (or
/// `0X`); surrounding whitespace is ignored. The error says what was wrong.
pub fn parse_seed(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    // from_str_radix takes a leading '+' (and reports '-' as an invalid digit): digits only.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(format!(
            "{SEED_ENV} must be a u64 in decimal or 0x-prefixed hexadecimal, got {text:?}"
        ));
    }
    u64::from_str_radix(digits, radix)
        .map_err(|e| format!("{SEED_ENV} = {text:?} is not a u64: {e}"))
}

/// The seed `REMOE_SEED` fixes, if it is set and not empty. Panics on a value that is not a seed
/// (see [`parse_seed`]) or not Unicode.
pub fn seed_from_env() -> Option<u64> {
    match std::env::var(SEED_ENV) {
        Ok(v) if v.trim().is_empty() => None,
        Ok(v) => Some(parse_seed(&v).unwrap_or_else(|why| panic!("{why}"))),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(v)) => {
            panic!("{SEED_ENV} must be a u64 in decimal or 0x-prefixed hexadecimal, got {v:?}")
        }
    }
}

/// A seed for fresh inputs: the value of `REMOE_SEED` when it is set (see the module
/// documentation; a bad value panics), otherwise a new one from rand's thread-local generator
/// (seeded by the operating system). Tests print it so that a failure can be replayed, with
/// `REMOE_SEED` or [`seeded`].
pub fn fresh_seed() -> u64 {
    seed_from_env().unwrap_or_else(rand::random)
}

/// `n` values uniform in [-scale, scale), for any generator of rand.
pub trait UniformVec: Rng {
    /// `n` values uniform in [-scale, scale) (`scale` > 0).
    fn vec_uniform(&mut self, n: usize, scale: f64) -> Vec<f64> {
        let dist = Uniform::new(-scale, scale).expect("vec_uniform: scale must be > 0");
        (0..n).map(|_| dist.sample(self)).collect()
    }
}

impl<R: Rng + ?Sized> UniformVec for R {}
