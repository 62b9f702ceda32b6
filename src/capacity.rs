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
/// forward needs 4.36 GiB for every pair, D's 8.7 GiB: they run without counting. A ReMoE
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

    /// Device bytes a context of this policy holds at the shape `cfg` besides its per-pair
    /// buffers: the down projection's f32 split-K planes, sized by every forward for itself and
    /// for every smaller T (so that a larger eager forward warms the context for a capture at a
    /// smaller T that splits; docs/SPEC.md, section 9). Independent of the dtype and of whether
    /// the forward saves for backward; 0 where no T up to `cfg.tokens` splits (SM1's and SM30's
    /// shapes), about 96 MiB at config A's. For a memory estimate beside
    /// [`pairs_for`](Self::pairs_for)'s pairs.
    pub fn reserve_bytes(&self, cfg: &LayerConfig) -> usize {
        4 * self.split_k_partials_up_to(cfg)
    }

    /// The f32 elements behind [`reserve_bytes`](Self::reserve_bytes): what a forward at `cfg`
    /// sizes the split-K planes to under this policy.
    pub(crate) fn split_k_partials_up_to(&self, cfg: &LayerConfig) -> usize {
        let fixed = match *self {
            Self::Pairs(n) => Some(n),
            Self::Auto { .. } => None,
        };
        split_k_partials_up_to(cfg, fixed)
    }
}

/// Device bytes per routed pair: the forward's pair token and gate (4 + 4), act (F), y (H), the
/// down projection's f32 split-K partial sums where it splits (4 H per plane, `down_k_splits`
/// planes: up to 4, where the expected k T pairs make few output tiles, small batches; none
/// elsewhere) and, when training, g and u (2 F) and the backward's per-pair dX (H), the
/// pair-order rows of dOut and then X where the Hopper weight gradients copy them (H, above
/// gemm.rs's `HOPPER_WG_GATHER_MAX_FFN`; counted for either path), dR (4) and its column-group
/// sums (4 ceil(F / 32)), dg and du (2 F); F and H counted in elements of `elem` bytes. (No
/// per-pair R dOut row for dWd: the dAct GEMM writes R act over act, and dWd reads dOut's rows.)
/// These are the per-pair buffers the context allocates (src/moe.rs, src/scratch.rs) for T E
/// pairs, the capacity the budget decides on, except that the pair-order rows are counted
/// whatever the path (the mma.sync path allocates none), and that the context also holds split-K
/// planes for smaller T than this one (`split_k_partials_up_to`: independent of the pairs; 96
/// MiB at config A's shape, 48 at S's, none at SM1's or SM30's). So per pair: exact on the Hopper
/// path, above the mma.sync path's by those rows. (A capacity of fewer pairs may split
/// differently.)
pub(crate) fn bytes_per_pair(cfg: &LayerConfig, training: bool, elem: usize) -> usize {
    let (h, f) = (cfg.hidden, cfg.ffn);
    let splits = down_k_splits(cfg, cfg.tokens * cfg.experts);
    let forward = 8 + elem * (f + h) + 4 * split_k_partials(splits, 1, h);
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

/// The most K ranges the down projection is split into.
const MAX_DOWN_SPLITS: usize = 4;

/// How many K ranges the down projection is split into (split-K, see kernels/split_k.cu), from
/// what the host knows: the expected pairs k T (TopK's exact |A|; ReMoE's once its controller
/// has settled), at most the capacity. Few pairs make few output tiles (128 rows x 256 columns),
/// too few to keep the SMs streaming the expert weights; splitting F multiplies the work units
/// up to about 128 (an H100 has 132 SMs), with at least 8 K blocks of 64 per range. The result
/// only moves work around: any |A| <= capacity is computed, and both GEMM paths split alike.
pub(crate) fn down_k_splits(cfg: &LayerConfig, capacity: usize) -> usize {
    const UNITS: usize = 128;
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
    (UNITS / units.max(1)).clamp(1, MAX_DOWN_SPLITS.min(k_blocks / 8).max(1))
}

/// Elements of the down projection's f32 split-K partial sums for `cap` pairs of `h` columns:
/// `k_splits` planes where it splits, none where it does not (the GEMM then writes y itself).
pub(crate) fn split_k_partials(k_splits: usize, cap: usize, h: usize) -> usize {
    if k_splits > 1 {
        k_splits * cap * h
    } else {
        0
    }
}

/// Elements of f32 split-K partial sums enough for a forward of this layer at any T' up to
/// `cfg.tokens` with any capacity a forward can take there (every pair, T' E, or a fixed `pairs`
/// when the policy is [`PairCapacity::Pairs`]). The context sizes its planes for all of them, so
/// that an eager forward at some T warms it for a capture at any smaller T (docs/SPEC.md, 9): the
/// planes are needed only where few output tiles make the down projection split, and a larger
/// forward that does not split would otherwise leave them unallocated. Called on every forward,
/// so not a scan over T': the split count never rises with T' (more rows, as many tiles or more)
/// while the capacity never falls, so the largest planes are at the largest T' of each split
/// count, found by bisection.
pub(crate) fn split_k_partials_up_to(cfg: &LayerConfig, fixed_pairs: Option<usize>) -> usize {
    let caps: [&dyn Fn(usize) -> usize; 2] = [&|t: usize| t * cfg.experts, &|t: usize| {
        fixed_pairs.map_or(0, |n| n.min(t * cfg.experts))
    }];
    let mut most = 0;
    for cap_at in caps {
        let splits_at = |t: usize| down_k_splits(&LayerConfig { tokens: t, ..*cfg }, cap_at(t));
        for s in 2..=MAX_DOWN_SPLITS {
            if cfg.tokens == 0 || splits_at(1) < s {
                continue;
            }
            // The largest T' in [1, T] that still splits s ways or more.
            let (mut lo, mut hi) = (1, cfg.tokens);
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                if splits_at(mid) >= s {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            most = most.max(split_k_partials(splits_at(lo), cap_at(lo), cfg.hidden));
        }
    }
    most
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
    fn a_pair_holds_y_in_the_activation_type_and_f32_planes_only_where_split() {
        // Config A: no split. Pair token and gate, act and y in bf16.
        let a = LayerConfig::new(16384, 768, 3072, 8, 1);
        assert_eq!(bytes_per_pair(&a, false, 2), 8 + 2 * 3072 + 2 * 768);
        // SM1, where y is most of a pair's bytes (H = 3 F).
        let sm1 = LayerConfig::new(40960, 768, 256, 128, 8);
        assert_eq!(bytes_per_pair(&sm1, false, 2), 8 + 2 * 256 + 2 * 768);
        // Config S splits the down projection in 4: four f32 planes of H besides y.
        let s = LayerConfig::new(512, 768, 3072, 8, 1);
        assert_eq!(down_k_splits(&s, 512 * 8), 4);
        assert_eq!(
            bytes_per_pair(&s, false, 2),
            8 + 2 * 3072 + 2 * 768 + 4 * 4 * 768
        );
        assert_eq!(split_k_partials(1, 100, 768), 0);
        assert_eq!(split_k_partials(3, 100, 768), 3 * 100 * 768);
    }

    #[test]
    fn the_split_k_planes_of_a_larger_forward_cover_every_smaller_one() {
        // Config A's shape: no split at T 16384, four ranges up to T 1024, two up to T 2048.
        let a = LayerConfig::new(16384, 768, 3072, 8, 1);
        assert_eq!(down_k_splits(&a, 16384 * 8), 1);
        let at = |t: usize| {
            let c = LayerConfig { tokens: t, ..a };
            split_k_partials(down_k_splits(&c, t * 8), t * 8, 768)
        };
        let most = split_k_partials_up_to(&a, None);
        assert_eq!(most, (1..=16384).map(at).max().unwrap());
        assert_eq!(most, 4 * 1024 * 8 * 768);
        assert!(most >= at(2048) && at(2048) == 2 * 2048 * 8 * 768);
        // What the public estimate reports: the same planes in bytes, 96 MiB here.
        assert_eq!(PairCapacity::default().reserve_bytes(&a), 4 * most);
        assert_eq!(PairCapacity::default().reserve_bytes(&a), 96 << 20);
        // The bisection against a scan of every T', at shapes with other split patterns: E
        // above T k (rows below E), a fixed capacity below and above T' E, H of 1 to 3 column
        // tiles, uneven K blocks.
        let scan = |cfg: &LayerConfig, fixed: Option<usize>| {
            (1..=cfg.tokens)
                .flat_map(|t| {
                    let c = LayerConfig { tokens: t, ..*cfg };
                    let worst = t * cfg.experts;
                    [Some(worst), fixed.map(|n| n.min(worst))]
                        .into_iter()
                        .flatten()
                        .map(move |cap| split_k_partials(down_k_splits(&c, cap), cap, c.hidden))
                })
                .max()
                .unwrap_or(0)
        };
        for (cfg, fixed) in [
            (LayerConfig::new(3000, 768, 3072, 64, 1), None),
            (LayerConfig::new(2500, 200, 2056, 6, 2), Some(700)),
            (LayerConfig::new(1200, 520, 1160, 128, 8), None),
            (LayerConfig::new(900, 136, 520, 16, 4), Some(50_000)),
            (LayerConfig::new(0, 768, 3072, 8, 1), None),
        ] {
            assert_eq!(
                split_k_partials_up_to(&cfg, fixed),
                scan(&cfg, fixed),
                "{cfg:?} {fixed:?}"
            );
        }
        // SM1's F (four K blocks) never splits.
        let sm1 = LayerConfig::new(40960, 768, 256, 128, 8);
        assert_eq!(split_k_partials_up_to(&sm1, None), 0);
        // A smaller forward's bound is never above a larger one's.
        let s = LayerConfig::new(512, 768, 3072, 8, 1);
        assert!(split_k_partials_up_to(&s, None) <= most);
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
