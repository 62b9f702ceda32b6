//! Routing: the ReLU router, the softmax top-k router (with or without renormalised gates), the
//! regulariser and the dispatch lists.
//!
//! Non-finite logits follow the crate's policy (see [`crate::moe`]), exactly as the kernels do: a
//! NaN or +-Inf logit gets the ReLU gate 0; in the TopK routers it has P = 0, the softmax is over
//! the token's finite logits, and it is never selected (so at most k experts per token). The
//! routers report such logits through [`Routing::check_finite`] /
//! [`TopkRouting::check_finite`], with the GPU's error.

use super::{matmul, Real};
use crate::config::LayerConfig;
use crate::error::{Error, Result};

/// [`Error::NonFiniteLogits`] if any of `logits` \[T,E\] is NaN or infinite: how many, and the
/// first token that has one (the error the GPU forward reports).
pub fn check_logits_finite<T: Real>(logits: &[T], e: usize) -> Result<()> {
    let mut count = 0usize;
    let mut first = None;
    for (i, l) in logits.iter().enumerate() {
        if !l.to_f64().is_finite() {
            count += 1;
            first.get_or_insert(i / e.max(1));
        }
    }
    match first {
        Some(first_token) => Err(Error::NonFiniteLogits { count, first_token }),
        None => Ok(()),
    }
}

/// What the ReLU router produces (docs/SPEC.md, 3.1: L = X Wr, R = ReLU(L), A = {R > 0}).
#[derive(Debug, Clone)]
pub struct Routing<T> {
    /// L \[T,E\].
    pub logits: Vec<T>,
    /// R \[T,E\] = ReLU(L).
    pub gates: Vec<T>,
    /// n_e: tokens routed to each expert.
    pub counts: Vec<u32>,
    /// sum over t of R\[t,e\], per expert, in f64.
    pub gate_sums: Vec<f64>,
    /// |A|.
    pub active_pairs: usize,
}

impl<T: Real> Routing<T> {
    /// Builds the statistics of a gate matrix whose active set is `gates > 0`.
    fn from_gates(logits: Vec<T>, gates: Vec<T>, t: usize, e: usize) -> Self {
        let mut counts = vec![0u32; e];
        let mut gate_sums = vec![0.0f64; e];
        let mut active_pairs = 0;
        for ti in 0..t {
            for ei in 0..e {
                let g = gates[ti * e + ei].to_f64();
                gate_sums[ei] += g;
                if g > 0.0 {
                    counts[ei] += 1;
                    active_pairs += 1;
                }
            }
        }
        Self {
            logits,
            gates,
            counts,
            gate_sums,
            active_pairs,
        }
    }

    /// [`Error::NonFiniteLogits`] if a logit was NaN or infinite (its gate was taken as 0).
    pub fn check_finite(&self) -> Result<()> {
        let e = self.counts.len();
        check_logits_finite(&self.logits, e)
    }

    /// S = 1 - |A| / (T E); an empty batch counts as fully sparse.
    pub fn sparsity(&self) -> f64 {
        let total = self.gates.len();
        if total == 0 {
            1.0
        } else {
            1.0 - self.active_pairs as f64 / total as f64
        }
    }

    /// The per-expert token lists of the active pairs.
    pub fn dispatch(&self, e: usize) -> Dispatch<T> {
        Dispatch::from_selection(&self.gates, e, |_, _, g| g.to_f64() > 0.0)
    }
}

/// L = X Wr, R = ReLU(L) with its statistics. A logit of exactly 0 is inactive, and so is a
/// NaN or infinite one (gate 0; see [`Routing::check_finite`]).
pub fn relu_router<T: Real>(x: &[T], wr: &[T], cfg: &LayerConfig) -> Routing<T> {
    let (t, h, e) = (cfg.tokens, cfg.hidden, cfg.experts);
    let logits = matmul(x, wr, t, h, e);
    let gates = logits
        .iter()
        .map(|&l| T::from_f64(relu_gate(l.to_f64())))
        .collect();
    Routing::from_gates(logits, gates, t, e)
}

/// ReLU with the policy for non-finite logits: max(l, 0) for a finite l, else 0.
pub fn relu_gate(l: f64) -> f64 {
    if l.is_finite() {
        l.max(0.0)
    } else {
        0.0
    }
}

/// What a TopK router produces: the baseline's (docs/SPEC.md, 4: pre-softmax top-k, no
/// renormalisation, [`softmax_topk_router`]) or the renormalised one
/// ([`softmax_topk_normalized_router`], docs/SPEC.md, 4.1).
#[derive(Debug, Clone)]
pub struct TopkRouting<T> {
    /// L \[T,E\] = X Wr.
    pub logits: Vec<T>,
    /// P \[T,E\] = softmax(L) per token.
    pub probs: Vec<T>,
    /// R \[T,E\] where selected: P, or P / (sum of the token's selected P) when `normalized`;
    /// else 0.
    pub gates: Vec<T>,
    /// Whether the gates are renormalised over the selection
    /// ([`RouterKind::TopKNormalized`](crate::RouterKind::TopKNormalized)); the backward
    /// follows it.
    pub normalized: bool,
    /// The selection, \[T,E\]: k per token (fewer only for a token with fewer than k finite
    /// logits).
    pub selected: Vec<bool>,
    /// n_e: tokens selecting each expert.
    pub counts: Vec<u32>,
    /// sum over all t of P\[t,e\] (the aux loss uses every pair, selected or not).
    pub prob_sums: Vec<f64>,
}

impl<T: Real> TopkRouting<T> {
    /// [`Error::NonFiniteLogits`] if a logit was NaN or infinite (it took no part).
    pub fn check_finite(&self) -> Result<()> {
        check_logits_finite(&self.logits, self.counts.len())
    }

    /// The selected pairs as per-expert token lists, for `e` experts.
    pub fn dispatch(&self, e: usize) -> Dispatch<T> {
        Dispatch::from_selection(&self.gates, e, |t, ei, _| self.selected[t * e + ei])
    }
}

/// P = softmax(X Wr) per token, and the k largest P selected; ties go to the lower expert index.
/// The gates are the selected P as they are. A NaN or infinite logit takes no part: P = 0 (the
/// softmax is over the finite logits; all P are 0 when none is finite) and it is never selected,
/// so a token with fewer than k finite logits selects fewer than k.
pub fn softmax_topk_router<T: Real>(x: &[T], wr: &[T], cfg: &LayerConfig) -> TopkRouting<T> {
    topk_router(x, wr, cfg, false)
}

/// [`softmax_topk_router`]'s selection with the gates renormalised over it (Mixtral's router,
/// `norm_topk_prob: true`): for token t with selection S_t,
///
/// ```text
/// R[t,e] = P[t,e] / sum_{j in S_t} P[t,j] = exp(L[t,e]) / sum_{j in S_t} exp(L[t,j])   (e in S_t)
/// ```
///
/// the softmax over the selected logits; 0 off S_t. The probabilities P and their sums (what
/// the aux loss reads) are the full softmax's, as in [`softmax_topk_router`]. A token with fewer
/// than k finite logits renormalises over those it selects; one with none has no gate.
pub fn softmax_topk_normalized_router<T: Real>(
    x: &[T],
    wr: &[T],
    cfg: &LayerConfig,
) -> TopkRouting<T> {
    topk_router(x, wr, cfg, true)
}

fn topk_router<T: Real>(x: &[T], wr: &[T], cfg: &LayerConfig, normalized: bool) -> TopkRouting<T> {
    let logits = matmul(x, wr, cfg.tokens, cfg.hidden, cfg.experts);
    topk_routing_of_logits(logits, cfg, normalized)
}

/// The TopK routers' tail on given `logits` \[T,E\] (T, E and k from `cfg`): what
/// [`softmax_topk_router`] (`normalized` false) or [`softmax_topk_normalized_router`] (true) do
/// after the router GEMM, and what [`crate::router::topk_softmax`] does on the GPU. Logits given
/// directly can hold NaN or infinities in chosen places, which a product X Wr spreads over a
/// whole row or column.
pub fn topk_routing_of_logits<T: Real>(
    logits: Vec<T>,
    cfg: &LayerConfig,
    normalized: bool,
) -> TopkRouting<T> {
    let (t, e, k) = (cfg.tokens, cfg.experts, cfg.k);
    assert_eq!(logits.len(), t * e, "logits are not [T,E]");
    let mut probs = vec![T::default(); t * e];
    let mut gates = vec![T::default(); t * e];
    let mut selected = vec![false; t * e];
    let mut counts = vec![0u32; e];
    let mut prob_sums = vec![0.0f64; e];
    let mut order: Vec<usize> = Vec::with_capacity(e);
    for ti in 0..t {
        let row = &logits[ti * e..(ti + 1) * e];
        let finite = |v: &T| v.to_f64().is_finite();
        let max = row
            .iter()
            .filter(|v| finite(v))
            .map(|v| v.to_f64())
            .fold(f64::NEG_INFINITY, f64::max);
        let denom: f64 = row
            .iter()
            .filter(|v| finite(v))
            .map(|v| (v.to_f64() - max).exp())
            .sum();
        let p: Vec<f64> = row
            .iter()
            .map(|v| {
                if finite(v) {
                    (v.to_f64() - max).exp() / denom
                } else {
                    0.0
                }
            })
            .collect();
        for ei in 0..e {
            probs[ti * e + ei] = T::from_f64(p[ei]);
            prob_sums[ei] += p[ei];
        }
        // Rank on the logits: softmax is strictly increasing, so this is the order of the exact
        // probabilities (ties exactly where the logits tie), and it does not depend on how the
        // exponentials were rounded. The GPU kernel ranks the same way.
        // Only finite logits are candidates, so the comparison is a total order.
        order.clear();
        order.extend((0..e).filter(|&ei| finite(&row[ei])));
        order.sort_by(|&a, &b| {
            let (la, lb) = (row[a].to_f64(), row[b].to_f64());
            lb.partial_cmp(&la)
                .expect("finite logits compare")
                .then(a.cmp(&b))
        });
        let chosen = &order[..k.min(order.len())];
        // exp(l - max) over the selection, max being the largest finite logit (always selected):
        // the sum is at least 1, and the quotient is the softmax over the selected logits
        // without going through P's rounding.
        let selected_exp: f64 = chosen
            .iter()
            .map(|&ei| (row[ei].to_f64() - max).exp())
            .sum();
        for &ei in chosen {
            selected[ti * e + ei] = true;
            gates[ti * e + ei] = if normalized {
                T::from_f64((row[ei].to_f64() - max).exp() / selected_exp)
            } else {
                probs[ti * e + ei]
            };
            counts[ei] += 1;
        }
    }
    TopkRouting {
        logits,
        probs,
        gates,
        normalized,
        selected,
        counts,
        prob_sums,
    }
}

/// The load-balancing L1 regulariser of ReMoE, and the Switch aux loss of TopK (the same
/// formula with P in place of R and c in place of lambda):
///
/// ```text
/// coeff * E / (k T^2) * sum_e n_e * sums[e]
/// ```
///
/// An empty batch has no loss.
pub fn l1_balance_loss(counts: &[u32], sums: &[f64], cfg: &LayerConfig, coeff: f64) -> f64 {
    if cfg.tokens == 0 {
        return 0.0;
    }
    let scale = balance_scale(cfg, coeff);
    counts
        .iter()
        .zip(sums)
        .map(|(&n, &s)| n as f64 * s)
        .sum::<f64>()
        * scale
}

/// coeff * E / (k T^2): the regulariser's gradient with respect to one gate of expert e is this
/// times n_e.
pub(crate) fn balance_scale(cfg: &LayerConfig, coeff: f64) -> f64 {
    let t = cfg.tokens as f64;
    coeff * cfg.experts as f64 / (cfg.k as f64 * t * t)
}

/// The active pairs grouped by expert: expert e's pairs are `offsets[e]..offsets[e+1]` of
/// `tokens` and `gates`, in ascending token order. This is the structure the GPU compaction
/// produces, and it must match it exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch<T> {
    /// [E+1], offsets\[0\] = 0, offsets\[E\] = |A|.
    pub offsets: Vec<u32>,
    /// [|A|] token index of each pair.
    pub tokens: Vec<u32>,
    /// [|A|] gate value R\[t,e\] of each pair.
    pub gates: Vec<T>,
}

impl<T: Real> Dispatch<T> {
    /// Collects the pairs `(t, e)` for which `keep(t, e, gate)` holds.
    pub fn from_selection(gates: &[T], e: usize, keep: impl Fn(usize, usize, T) -> bool) -> Self {
        let t = gates.len().checked_div(e).unwrap_or(0);
        let mut offsets = vec![0u32; e + 1];
        let mut tokens = Vec::new();
        let mut values = Vec::new();
        for ei in 0..e {
            for ti in 0..t {
                let g = gates[ti * e + ei];
                if keep(ti, ei, g) {
                    tokens.push(ti as u32);
                    values.push(g);
                }
            }
            offsets[ei + 1] = tokens.len() as u32;
        }
        Self {
            offsets,
            tokens,
            gates: values,
        }
    }

    /// E, the number of experts.
    pub fn num_experts(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The pair indices of expert `e`.
    pub fn range(&self, e: usize) -> std::ops::Range<usize> {
        self.offsets[e] as usize..self.offsets[e + 1] as usize
    }
}
