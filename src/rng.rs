//! A small, seedable random generator (SplitMix64) for tests, examples and benchmarks, so they
//! draw fresh inputs without pulling a random-number crate into the library.
//!
//! ## Replaying a run: `REMOE_SEED`
//!
//! Tests, examples and benchmarks take their seeds from [`SplitMix64::fresh_seed`], which is a
//! new value on every call unless the environment variable `REMOE_SEED` ([`SEED_ENV`]) is set:
//! then every call returns that value (decimal, or hexadecimal with a `0x` prefix). A failing
//! GPU test prints its seed as `seed N (replay with REMOE_SEED=N)`; running it again with
//! `REMOE_SEED=N` draws the same inputs. (A test that loops over several shapes gives every
//! shape the same seed N then, so the shape that failed sees exactly its inputs again.) An empty
//! `REMOE_SEED` counts as unset; any other value that is not a `u64` makes `fresh_seed` panic,
//! naming the variable and the value.

/// The environment variable that fixes [`SplitMix64::fresh_seed`] (see the module documentation).
pub const SEED_ENV: &str = "REMOE_SEED";

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

/// SplitMix64: fast, statistically fine for test data, and reproducible from its seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A seed for fresh inputs: the value of `REMOE_SEED` when it is set (see the module
    /// documentation; a bad value panics), otherwise one that differs on every call (time and a
    /// counter). Tests print it so that a failure can be replayed, with `REMOE_SEED` or
    /// [`SplitMix64::new`].
    pub fn fresh_seed() -> u64 {
        if let Some(seed) = seed_from_env() {
            return seed;
        }
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut s = SplitMix64(nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32));
        s.next_u64()
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `n` values uniform in [-scale, scale).
    pub fn vec_uniform(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.range(-scale, scale)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_reads_as_decimal_or_0x_hexadecimal() {
        assert_eq!(parse_seed("0"), Ok(0));
        assert_eq!(parse_seed("12345"), Ok(12345));
        assert_eq!(parse_seed(" 42\n"), Ok(42));
        assert_eq!(parse_seed("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_seed("0x1f"), Ok(31));
        assert_eq!(parse_seed("0XFFFFFFFFFFFFFFFF"), Ok(u64::MAX));
        assert_eq!(parse_seed("0xdeadBEEF"), Ok(0xdead_beef));
    }

    #[test]
    fn a_bad_seed_is_refused_with_a_message_naming_the_variable_and_the_value() {
        for bad in [
            "",
            "abc",
            "-1",
            "+1",
            "1.5",
            "0x",
            "0xg1",
            "1e3",
            "18446744073709551616",
            "0x1_0000_0000_0000_0000",
            "0x10000000000000000",
        ] {
            let why = parse_seed(bad).expect_err(bad);
            assert!(why.contains(SEED_ENV), "{why}");
            assert!(why.contains(&format!("{bad:?}")), "{why}");
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_values() {
        let (mut a, mut b) = (SplitMix64::new(7), SplitMix64::new(7));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }
}
