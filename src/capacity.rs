//! How many routed pairs a context's pair buffers hold.
//!
//! A ReMoE forward routes a data-dependent number of (token, expert) pairs |A|, anywhere from 0 to
//! T E (in the dense stage of training, most of them). The pair buffers (act, y, g, u, the
//! backward's per-pair gradients) are sized by a capacity, and every kernel reads the real counts
//! from device memory.
//!
//! - [`PairCapacity::Auto`] (the default): when the worst case, T E pairs, fits a memory budget,
//!   the buffers hold T E pairs and a forward reads nothing back (so it can be captured in a CUDA
//!   graph, and the CPU never waits for it). When it does not fit, an eager forward reads |A|
//!   back once, after the routing statistics, and sizes its buffers for exactly |A| pairs: it is
//!   dropless at any density. A forward captured in a graph cannot read anything: it uses what
//!   the eager warm-up sized, at least 2 k T pairs.
//! - [`PairCapacity::Pairs`] fixes the number. An eager forward still reads |A|, and one that
//!   routes more fails with [`Error::CapacityExceeded`](crate::Error::CapacityExceeded).
//!
//! Only in a replayed graph can |A| exceed the capacity: the device then computes nothing past
//! the buffers, publishes an empty dispatch (the layer's output is zero, the backward's expert
//! gradients are zero), raises a flag, and the next host-visible call of the context
//! ([`MoeContext::stats`](crate::MoeContext::stats),
//! [`MoeContext::check_device_errors`](crate::MoeContext::check_device_errors),
//! [`MoeContext::lambda`](crate::MoeContext::lambda)) returns
//! [`Error::CapacityExceeded`](crate::Error::CapacityExceeded) with the |A| that did not fit.
//! Nothing is dropped silently. docs/DROPLESS.md has the design and the options weighed.

use crate::config::LayerConfig;
use crate::gemm::GemmPath;

/// The default memory budget of [`PairCapacity::Auto`]: 16 GiB of per-pair buffers, and at most
/// a quarter of the device's memory (see [`PairCapacity::pairs_for`]). Config A's training
/// forward needs 4.55 GiB for every pair, D's 9.1 GiB: they run without counting. A ReMoE
/// context that starts dense grows to every pair in its first forwards anyway (the buffers keep
/// their largest size), so a budget below that would save memory only for runs that never pass
/// through a dense stage, at the cost of a read per forward.
pub const DEFAULT_PAIR_BUDGET_BYTES: usize = 16 << 30;

/// How many routed pairs the pair buffers are sized for (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairCapacity {
    /// T E pairs when their buffers take at most `budget_bytes` (and a quarter of the device's
    /// memory); else, eager, exactly the pairs each forward routes (until the buffers have grown
    /// to hold T E), and captured, what the eager calls sized (at least 2 k T). A TopK forward
    /// routes exactly k T pairs: it gets k T.
    Auto {
        /// Bytes the per-pair buffers (forward, and backward when saving for it) may take.
        budget_bytes: usize,
    },
    /// This many pairs (at most T E are ever used).
    Pairs(usize),
}

impl Default for PairCapacity {
    fn default() -> Self {
        Self::Auto {
            budget_bytes: DEFAULT_PAIR_BUDGET_BYTES,
        }
    }
}

impl PairCapacity {
    /// The pairs a forward of `cfg` gets buffers for up front (an eager forward of `Auto` that
    /// gets fewer than T E counts its pairs instead, see the module documentation). `training`:
    /// whether the forward saves for backward (then the backward's per-pair buffers count
    /// against the budget too); `elem`: the activation dtype's size in bytes; `device_bytes`:
    /// the device's memory, a quarter of which caps the budget.
    pub fn pairs_for(
        &self,
        cfg: &LayerConfig,
        training: bool,
        elem: usize,
        device_bytes: usize,
    ) -> usize {
        let worst = cfg.tokens * cfg.experts;
        match *self {
            Self::Pairs(n) => n.min(worst),
            Self::Auto { budget_bytes } => {
                let per_pair = bytes_per_pair(cfg, training, elem);
                let budget = budget_bytes.min(device_bytes / 4);
                if worst.saturating_mul(per_pair) <= budget {
                    worst
                } else {
                    (2 * cfg.k * cfg.tokens).min(worst)
                }
            }
        }
    }
}

/// Device bytes per routed pair: the forward's pair token and gate (4 + 4), act (F), y (4 H,
/// f32) and, when training, g and u (2 F) and the backward's per-pair dX (H), the pair-order
/// rows of dOut and then X where the Hopper weight gradients copy them (H, above gemm.rs's
/// `HOPPER_WG_GATHER_MAX_FFN`; counted for either path), dR (4) and its column-group sums
/// (4 ceil(F / 32)), dg and du (2 F); F and H counted in elements of `elem` bytes. (No per-pair
/// R dOut row for dWd: the dAct GEMM writes R act over act, and dWd reads dOut's rows.) These
/// are the per-pair buffers the context allocates (src/moe.rs, src/scratch.rs), with two
/// differences: the pair-order rows are counted whatever the path (the mma.sync path allocates
/// none), and y once, where the down projection's split-K keeps `down_k_splits` planes of it
/// (up to 4, where the expected k T pairs make few output tiles: small batches). So neither
/// exact nor an upper bound; close at the large |A| for which the budget decides.
pub(crate) fn bytes_per_pair(cfg: &LayerConfig, training: bool, elem: usize) -> usize {
    let (h, f) = (cfg.hidden, cfg.ffn);
    let forward = 8 + elem * f + 4 * h;
    let pair_ordered = if GemmPath::Hopper.copies_pair_ordered_rows(f) {
        h
    } else {
        0
    };
    if training {
        forward + elem * 2 * f + elem * (h + pair_ordered) + 4 + 4 * f.div_ceil(32) + elem * 2 * f
    } else {
        forward
    }
}

/// The most GEMM row tiles (of `tile_rows` rows, per expert) that `capacity` pairs over `e`
/// experts can make: what sizes the grouped GEMMs' grids without knowing the real n_e.
pub(crate) fn max_row_tiles(capacity: usize, e: usize, tile_rows: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    // Each expert adds at most one partial tile: sum ceil(n_e / r) <= (sum n_e + e (r - 1)) / r.
    (capacity + e * (tile_rows - 1)) / tile_rows
}

/// How many K ranges the down projection is split into (split-K, see kernels/split_k.cu), from
/// what the host knows: the expected pairs k T (TopK's exact |A|; ReMoE's once its controller
/// has settled), at most the capacity. Few pairs make few output tiles (128 rows x 256 columns),
/// too few to keep the SMs streaming the expert weights; splitting F multiplies the work units
/// up to about 128 (an H100 has 132 SMs), with at least 8 K blocks of 64 per range. The result
/// only moves work around: any |A| <= capacity is computed, and both GEMM paths split alike.
pub(crate) fn down_k_splits(cfg: &LayerConfig, capacity: usize) -> usize {
    const UNITS: usize = 128;
    const MAX_SPLITS: usize = 4;
    let rows = (cfg.k * cfg.tokens).min(capacity);
    if rows == 0 {
        return 1;
    }
    let e = cfg.experts;
    // Row tiles if the rows spread evenly over the experts (each expert's last tile partial).
    let row_tiles = if rows >= e {
        e * rows.div_ceil(e).div_ceil(128)
    } else {
        rows
    };
    let units = row_tiles * cfg.hidden.div_ceil(256);
    let k_blocks = cfg.ffn.div_ceil(64);
    (UNITS / units.max(1)).clamp(1, MAX_SPLITS.min(k_blocks / 8).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_the_worst_case_when_it_fits_the_budget() {
        let cfg = LayerConfig::new(512, 256, 512, 8, 1);
        let gpu = 80usize << 30;
        let c = PairCapacity::default();
        assert_eq!(c.pairs_for(&cfg, true, 2, gpu), 512 * 8);
        let tight = PairCapacity::Auto {
            budget_bytes: 512 * 8 * bytes_per_pair(&cfg, true, 2) - 1,
        };
        assert_eq!(tight.pairs_for(&cfg, true, 2, gpu), 2 * 512);
        // The same budget holds the worst case of an inference forward (no backward buffers).
        assert_eq!(tight.pairs_for(&cfg, false, 2, gpu), 512 * 8);
        // A quarter of a small device's memory caps the default budget.
        let small = 4 * (512 * 8 * bytes_per_pair(&cfg, true, 2) - 1);
        assert_eq!(c.pairs_for(&cfg, true, 2, small), 2 * 512);
        // Config A and D train without counting on an 80 GB device.
        for big in [
            LayerConfig::new(16384, 768, 3072, 8, 1),
            LayerConfig::new(16384, 1536, 6144, 8, 1),
        ] {
            assert_eq!(c.pairs_for(&big, true, 2, gpu), 16384 * 8);
        }
    }

    #[test]
    fn a_fixed_capacity_is_clamped_to_every_pair() {
        let cfg = LayerConfig::new(10, 64, 64, 4, 2);
        let gpu = 80usize << 30;
        assert_eq!(PairCapacity::Pairs(7).pairs_for(&cfg, true, 2, gpu), 7);
        assert_eq!(PairCapacity::Pairs(1000).pairs_for(&cfg, true, 2, gpu), 40);
        assert_eq!(PairCapacity::Pairs(0).pairs_for(&cfg, false, 2, gpu), 0);
    }

    #[test]
    fn split_k_only_for_few_pairs_and_long_enough_k() {
        // Config S (T 512, H 768, F 3072, E 8, k 1): 8 tiles x 3 columns -> 4 ranges.
        let s = LayerConfig::new(512, 768, 3072, 8, 1);
        assert_eq!(down_k_splits(&s, 4096), 4);
        // Decode.
        assert_eq!(down_k_splits(&LayerConfig::new(8, 768, 3072, 8, 1), 64), 4);
        // Config A: 128 tiles, no split.
        assert_eq!(
            down_k_splits(&LayerConfig::new(16384, 768, 3072, 8, 1), 32768),
            1
        );
        // A short F cannot be split into ranges of 8 K blocks.
        assert_eq!(down_k_splits(&LayerConfig::new(8, 768, 256, 8, 1), 64), 1);
        // No pairs.
        assert_eq!(down_k_splits(&LayerConfig::new(0, 64, 64, 8, 1), 0), 1);
    }

    #[test]
    fn the_tile_bound_covers_every_split_of_the_pairs() {
        for e in [1usize, 2, 3, 8] {
            for cap in 0..300usize {
                let bound = max_row_tiles(cap, e, 128);
                // Any split over two experts (the others empty).
                for a in 0..=cap {
                    let tiles = a.div_ceil(128) + (cap - a).div_ceil(128);
                    if e >= 2 {
                        assert!(tiles <= bound, "cap {cap} e {e} split {a}");
                    }
                }
                // e - 1 experts with one pair each, the rest on the last one.
                let singles = cap.min(e - 1);
                let tiles = singles + (cap - singles).div_ceil(128);
                assert!(tiles <= bound, "cap {cap} e {e} singles");
            }
        }
    }
}
