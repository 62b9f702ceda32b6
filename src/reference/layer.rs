//! The whole MoE layer, forward and backward, for the ReLU router (ReMoE) and the softmax
//! top-k router (the baseline). Both share the experts and the combine; they differ only in how
//! the gates are made and in the router's backward.

use super::experts::{swiglu_expert_backward, swiglu_expert_forward};
use super::routing::{
    balance_scale, l1_balance_loss, relu_router, softmax_topk_normalized_router,
    softmax_topk_router,
};
use super::{Dispatch, Real, Routing, TopkRouting};
use crate::config::LayerConfig;

/// The Switch aux-loss coefficient c of the TopK baseline (docs/SPEC.md, section 4).
pub const TOPK_AUX_COEFF: f64 = 1e-2;

/// The layer's parameters, in the crate's layout: `router` \[H,E\], `gate` and `up` \[E,H,F\],
/// `down` \[E,F,H\].
#[derive(Debug, Clone, PartialEq)]
pub struct LayerParams<T> {
    /// The router weight Wr \[H,E\].
    pub router: Vec<T>,
    /// The experts' gate weights Wg \[E,H,F\].
    pub gate: Vec<T>,
    /// The experts' up weights Wu \[E,H,F\].
    pub up: Vec<T>,
    /// The experts' down weights Wd \[E,F,H\].
    pub down: Vec<T>,
}

impl<T: Real> LayerParams<T> {
    /// All-zero parameters of the right sizes.
    pub fn zeros(cfg: &LayerConfig) -> Self {
        let (h, f, e) = (cfg.hidden, cfg.ffn, cfg.experts);
        Self {
            router: vec![T::default(); h * e],
            gate: vec![T::default(); e * h * f],
            up: vec![T::default(); e * h * f],
            down: vec![T::default(); e * f * h],
        }
    }

    /// Expert `e`'s (Wg, Wu, Wd).
    pub fn expert(&self, e: usize, cfg: &LayerConfig) -> (&[T], &[T], &[T]) {
        let hf = cfg.hidden * cfg.ffn;
        let r = e * hf..(e + 1) * hf;
        (&self.gate[r.clone()], &self.up[r.clone()], &self.down[r])
    }

    fn check(&self, cfg: &LayerConfig) {
        let (h, f, e) = (cfg.hidden, cfg.ffn, cfg.experts);
        assert_eq!(self.router.len(), h * e, "router is not [H,E]");
        assert_eq!(self.gate.len(), e * h * f, "gate is not [E,H,F]");
        assert_eq!(self.up.len(), e * h * f, "up is not [E,H,F]");
        assert_eq!(self.down.len(), e * f * h, "down is not [E,F,H]");
    }
}

/// Gradients of the layer's inputs and parameters, same layouts as the values.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerGrads<T> {
    /// dX \[T,H\].
    pub dx: Vec<T>,
    /// The parameters' gradients dWr, dWg, dWu, dWd.
    pub params: LayerParams<T>,
}

/// The ReMoE forward: output, routing (with its statistics), dispatch lists and the value of the
/// L1 load-balancing regulariser at coefficient lambda.
#[derive(Debug, Clone)]
pub struct RemoeForward<T> {
    /// The layer's output \[T,H\].
    pub out: Vec<T>,
    /// The ReLU router's logits, gates and statistics.
    pub routing: Routing<T>,
    /// Each expert's (token, gate) pairs.
    pub dispatch: Dispatch<T>,
    /// The L1 regulariser's value at lambda.
    pub reg_loss: f64,
}

/// The TopK forward: output, routing, dispatch lists and the Switch aux loss.
#[derive(Debug, Clone)]
pub struct TopkForward<T> {
    /// The layer's output \[T,H\].
    pub out: Vec<T>,
    /// The TopK router's logits, probabilities, selection and statistics.
    pub routing: TopkRouting<T>,
    /// Each expert's (token, gate) pairs.
    pub dispatch: Dispatch<T>,
    /// The Switch aux loss at the coefficient given.
    pub aux_loss: f64,
}

/// The ReMoE layer forward of `x` \[T,H\] (docs/SPEC.md, 3.1): the ReLU router, the SwiGLU
/// experts over the active pairs, the gate-weighted combine, and the L1 regulariser at
/// coefficient `lambda`.
pub fn remoe_forward<T: Real>(
    x: &[T],
    params: &LayerParams<T>,
    cfg: &LayerConfig,
    lambda: f64,
) -> RemoeForward<T> {
    check_inputs(x, params, cfg);
    let routing = relu_router(x, &params.router, cfg);
    let dispatch = routing.dispatch(cfg.experts);
    let out = experts_and_combine(x, params, cfg, &dispatch);
    let reg_loss = l1_balance_loss(&routing.counts, &routing.gate_sums, cfg, lambda);
    RemoeForward {
        out,
        routing,
        dispatch,
        reg_loss,
    }
}

/// The TopK baseline's forward of `x` \[T,H\] (docs/SPEC.md, 4): softmax, top-k selection without
/// renormalisation, the SwiGLU experts, the combine, and the Switch aux loss at `aux_coeff`.
pub fn topk_forward<T: Real>(
    x: &[T],
    params: &LayerParams<T>,
    cfg: &LayerConfig,
    aux_coeff: f64,
) -> TopkForward<T> {
    check_inputs(x, params, cfg);
    topk_layer(
        x,
        params,
        cfg,
        aux_coeff,
        softmax_topk_router(x, &params.router, cfg),
    )
}

/// [`topk_forward`] with the gates renormalised over each token's selection
/// ([`softmax_topk_normalized_router`]; Mixtral's layer, `RouterKind::TopKNormalized` on the
/// GPU). The aux loss is the same Switch loss on the full softmax P. [`topk_backward`] takes
/// its result as it is.
pub fn topk_normalized_forward<T: Real>(
    x: &[T],
    params: &LayerParams<T>,
    cfg: &LayerConfig,
    aux_coeff: f64,
) -> TopkForward<T> {
    check_inputs(x, params, cfg);
    let routing = softmax_topk_normalized_router(x, &params.router, cfg);
    topk_layer(x, params, cfg, aux_coeff, routing)
}

/// The experts, the combine and the aux loss of either TopK router's `routing`.
fn topk_layer<T: Real>(
    x: &[T],
    params: &LayerParams<T>,
    cfg: &LayerConfig,
    aux_coeff: f64,
    routing: TopkRouting<T>,
) -> TopkForward<T> {
    let dispatch = routing.dispatch(cfg.experts);
    let out = experts_and_combine(x, params, cfg, &dispatch);
    let aux_loss = l1_balance_loss(&routing.counts, &routing.prob_sums, cfg, aux_coeff);
    TopkForward {
        out,
        routing,
        dispatch,
        aux_loss,
    }
}

/// Gradients of `sum(out * dout) + reg_loss` for the ReMoE layer (docs/SPEC.md, section
/// 3.4). n_e is a constant of the regulariser: no gradient flows into it.
pub fn remoe_backward<T: Real>(
    x: &[T],
    params: &LayerParams<T>,
    cfg: &LayerConfig,
    lambda: f64,
    fwd: &RemoeForward<T>,
    dout: &[T],
) -> LayerGrads<T> {
    remoe_backward_scaled(x, params, cfg, lambda, fwd, dout, 1.0)
}

/// [`remoe_backward`] with the regulariser's gradient multiplied by `balance_grad_scale`: the
/// gradients of `sum(out * dout) + balance_grad_scale * reg_loss`. With `dout` carrying a loss
/// scale (or 1/micro-batches) S, `balance_grad_scale` = S gives S times the gradients of the
/// unscaled loss: the effective lambda does not change with S (the GPU backward's
/// `BackwardOptions::balance_grad_scale`).
pub fn remoe_backward_scaled<T: Real>(
    x: &[T],
    params: &LayerParams<T>,
    cfg: &LayerConfig,
    lambda: f64,
    fwd: &RemoeForward<T>,
    dout: &[T],
    balance_grad_scale: f64,
) -> LayerGrads<T> {
    layer_backward(x, params, cfg, &fwd.dispatch, dout, |d_gate_pairs| {
        remoe_d_logits(cfg, lambda * balance_grad_scale, fwd, d_gate_pairs)
    })
}

/// dL of the ReMoE router from each pair's dOut_t . y (`d_gate_pairs`, dispatch order): dR over
/// the active pairs, with the regulariser's `coeff` E n_e / (k T^2); dL = dR where L > 0, which
/// is exactly the active set.
pub(super) fn remoe_d_logits<T: Real>(
    cfg: &LayerConfig,
    coeff: f64,
    fwd: &RemoeForward<T>,
    d_gate_pairs: &[f64],
) -> Vec<f64> {
    let (t, e) = (cfg.tokens, cfg.experts);
    let reg = if t == 0 {
        0.0
    } else {
        balance_scale(cfg, coeff)
    };
    let mut d_logits = vec![0.0f64; t * e];
    for ei in 0..e {
        let n_e = fwd.routing.counts[ei] as f64;
        for p in fwd.dispatch.range(ei) {
            let ti = fwd.dispatch.tokens[p] as usize;
            if fwd.routing.logits[ti * e + ei].to_f64() > 0.0 {
                d_logits[ti * e + ei] = d_gate_pairs[p] + reg * n_e;
            }
        }
    }
    d_logits
}

/// Gradients of `sum(out * dout) + aux_loss` for the TopK layer (docs/SPEC.md, 4), from
/// [`topk_forward`] or [`topk_normalized_forward`] (the routing says which).
pub fn topk_backward<T: Real>(
    x: &[T],
    params: &LayerParams<T>,
    cfg: &LayerConfig,
    aux_coeff: f64,
    fwd: &TopkForward<T>,
    dout: &[T],
) -> LayerGrads<T> {
    topk_backward_scaled(x, params, cfg, aux_coeff, fwd, dout, 1.0)
}

/// [`topk_backward`] with the aux loss's gradient multiplied by `balance_grad_scale` (see
/// [`remoe_backward_scaled`]).
pub fn topk_backward_scaled<T: Real>(
    x: &[T],
    params: &LayerParams<T>,
    cfg: &LayerConfig,
    aux_coeff: f64,
    fwd: &TopkForward<T>,
    dout: &[T],
    balance_grad_scale: f64,
) -> LayerGrads<T> {
    layer_backward(x, params, cfg, &fwd.dispatch, dout, |d_gate_pairs| {
        topk_d_logits(cfg, aux_coeff * balance_grad_scale, fwd, d_gate_pairs)
    })
}

/// dL of the TopK router from each pair's dOut_t . y (`d_gate_pairs`, dispatch order).
///
/// Unnormalised gates (R = P on the selection): dP = dR on the selected pairs + `coeff` E n_e /
/// (k T^2) on every pair, then the softmax's backward, dL_t = P_t (dP_t - dP_t . P_t).
///
/// Renormalised gates (R = softmax over the selected logits): the aux loss's term dA = `coeff`
/// E n_e / (k T^2) goes through the full softmax P and dR through the selection's softmax R,
/// each with its own Jacobian, `dL_t = P_t (dA_t - dA_t . P_t) + R_t (dR_t - dR_t . R_t)` (R and
/// dR being 0 off the selection).
pub(super) fn topk_d_logits<T: Real>(
    cfg: &LayerConfig,
    coeff: f64,
    fwd: &TopkForward<T>,
    d_gate_pairs: &[f64],
) -> Vec<f64> {
    let (t, e) = (cfg.tokens, cfg.experts);
    let aux = if t == 0 {
        0.0
    } else {
        balance_scale(cfg, coeff)
    };
    let normalized = fwd.routing.normalized;
    // d_aux: what flows into P. d_gates: what flows into R (into P too when R = P).
    let mut d_aux = vec![0.0f64; t * e];
    for ti in 0..t {
        for ei in 0..e {
            d_aux[ti * e + ei] = aux * fwd.routing.counts[ei] as f64;
        }
    }
    let mut d_gates = vec![0.0f64; t * e];
    for ei in 0..e {
        for p in fwd.dispatch.range(ei) {
            let ti = fwd.dispatch.tokens[p] as usize;
            d_gates[ti * e + ei] = d_gate_pairs[p];
        }
    }
    if !normalized {
        for (a, g) in d_aux.iter_mut().zip(&d_gates) {
            *a += g;
        }
    }
    let mut d_logits = vec![0.0f64; t * e];
    for ti in 0..t {
        let row = ti * e..(ti + 1) * e;
        softmax_backward(
            &fwd.routing.probs[row.clone()],
            &d_aux[row.clone()],
            |ei, d| d_logits[ti * e + ei] += d,
        );
        if normalized {
            // Off the selection R is 0, so those logits get nothing from this term.
            softmax_backward(&fwd.routing.gates[row.clone()], &d_gates[row], |ei, d| {
                d_logits[ti * e + ei] += d
            });
        }
    }
    d_logits
}

/// The backward of a softmax s over one row: `add(i, s_i (ds_i - ds . s))` for each i.
fn softmax_backward<T: Real>(s: &[T], ds: &[f64], mut add: impl FnMut(usize, f64)) {
    let s: Vec<f64> = s.iter().map(|v| v.to_f64()).collect();
    let dot: f64 = ds.iter().zip(&s).map(|(a, b)| a * b).sum();
    for (i, (&si, &dsi)) in s.iter().zip(ds).enumerate() {
        add(i, si * (dsi - dot));
    }
}

fn check_inputs<T: Real>(x: &[T], params: &LayerParams<T>, cfg: &LayerConfig) {
    cfg.validate()
        .expect("reference called with an invalid config");
    assert_eq!(x.len(), cfg.tokens * cfg.hidden, "x is not [T,H]");
    params.check(cfg);
}

/// out_t = sum over the active pairs (t,e) of R[t,e] * expert_e(x_t), in ascending expert order.
fn experts_and_combine<T: Real>(
    x: &[T],
    params: &LayerParams<T>,
    cfg: &LayerConfig,
    dispatch: &Dispatch<T>,
) -> Vec<T> {
    let (h, f) = (cfg.hidden, cfg.ffn);
    let mut y = vec![0.0f64; dispatch.tokens.len() * h];
    for ei in 0..cfg.experts {
        let (wg, wu, wd) = params.expert(ei, cfg);
        for p in dispatch.range(ei) {
            let ti = dispatch.tokens[p] as usize;
            let acts = swiglu_expert_forward(&x[ti * h..(ti + 1) * h], wg, wu, wd, h, f);
            y[p * h..(p + 1) * h].copy_from_slice(&acts.y);
        }
    }
    combine(cfg, dispatch, &y)
}

/// out_t = sum over token t's pairs p of R\[t,e\] y_p, from each pair's expert output `y`
/// \[|A|,H\] in dispatch order; each token's sum runs in ascending expert order.
pub(super) fn combine<T: Real>(cfg: &LayerConfig, dispatch: &Dispatch<T>, y: &[f64]) -> Vec<T> {
    let h = cfg.hidden;
    let mut out = vec![0.0f64; cfg.tokens * h];
    for p in 0..dispatch.tokens.len() {
        let ti = dispatch.tokens[p] as usize;
        let r = dispatch.gates[p].to_f64();
        for (o, yo) in y[p * h..(p + 1) * h].iter().enumerate() {
            out[ti * h + o] += r * yo;
        }
    }
    out.into_iter().map(T::from_f64).collect()
}

/// f64 accumulators of every gradient of the layer.
struct ExpertGradAcc {
    cfg: LayerConfig,
    dx: Vec<f64>,
    d_router: Vec<f64>,
    d_gate: Vec<f64>,
    d_up: Vec<f64>,
    d_down: Vec<f64>,
}

impl ExpertGradAcc {
    fn new(cfg: &LayerConfig) -> Self {
        let (t, h, f, e) = (cfg.tokens, cfg.hidden, cfg.ffn, cfg.experts);
        Self {
            cfg: *cfg,
            dx: vec![0.0; t * h],
            d_router: vec![0.0; h * e],
            d_gate: vec![0.0; e * h * f],
            d_up: vec![0.0; e * h * f],
            d_down: vec![0.0; e * f * h],
        }
    }

    fn finish<T: Real>(self) -> LayerGrads<T> {
        debug_assert_eq!(self.dx.len(), self.cfg.tokens * self.cfg.hidden);
        LayerGrads {
            dx: to_real(self.dx),
            params: LayerParams {
                router: to_real(self.d_router),
                gate: to_real(self.d_gate),
                up: to_real(self.d_up),
                down: to_real(self.d_down),
            },
        }
    }
}

/// f64 accumulators rounded to the reference's storage type.
pub(super) fn to_real<T: Real>(v: Vec<f64>) -> Vec<T> {
    v.into_iter().map(T::from_f64).collect()
}

/// The router's backward from dL \[T,E\]: dWr += X^T dL ; dX += dL Wr^T.
pub(super) fn router_backward<T: Real>(
    x: &[T],
    wr: &[T],
    cfg: &LayerConfig,
    dl: &[f64],
    dx: &mut [f64],
    d_router: &mut [f64],
) {
    let (t, h, e) = (cfg.tokens, cfg.hidden, cfg.experts);
    for ti in 0..t {
        for i in 0..h {
            let xi = x[ti * h + i].to_f64();
            let mut s = 0.0;
            for ei in 0..e {
                let d = dl[ti * e + ei];
                d_router[i * e + ei] += xi * d;
                s += d * wr[i * e + ei].to_f64();
            }
            dx[ti * h + i] += s;
        }
    }
}

/// Either router's layer backward: the experts' backward over every pair, the router's dL from
/// each pair's dOut_t . y (`d_logits`, which is where ReMoE and TopK differ), then the router's
/// backward into dX and dWr.
fn layer_backward<T: Real>(
    x: &[T],
    params: &LayerParams<T>,
    cfg: &LayerConfig,
    dispatch: &Dispatch<T>,
    dout: &[T],
    d_logits: impl FnOnce(&[f64]) -> Vec<f64>,
) -> LayerGrads<T> {
    let mut acc = ExpertGradAcc::new(cfg);
    let d_gate_pairs = experts_backward(x, params, cfg, dispatch, dout, &mut acc);
    let dl = d_logits(&d_gate_pairs);
    router_backward(x, &params.router, cfg, &dl, &mut acc.dx, &mut acc.d_router);
    acc.finish()
}

/// The experts' backward over every dispatched pair: accumulates dX and the expert weight
/// gradients, and returns dOut_t . y[t,e] for each pair (the data term of dR), in dispatch order.
fn experts_backward<T: Real>(
    x: &[T],
    params: &LayerParams<T>,
    cfg: &LayerConfig,
    dispatch: &Dispatch<T>,
    dout: &[T],
    acc: &mut ExpertGradAcc,
) -> Vec<f64> {
    let (h, f) = (cfg.hidden, cfg.ffn);
    assert_eq!(dout.len(), cfg.tokens * h, "dout is not [T,H]");
    let mut d_gate_pairs = vec![0.0f64; dispatch.tokens.len()];
    let hf = h * f;
    for ei in 0..cfg.experts {
        let w = ei * hf..(ei + 1) * hf;
        let mut grads = ExpertGrads {
            gate: &mut acc.d_gate[w.clone()],
            up: &mut acc.d_up[w.clone()],
            down: &mut acc.d_down[w],
        };
        for p in dispatch.range(ei) {
            let ti = dispatch.tokens[p] as usize;
            let rows = ti * h..(ti + 1) * h;
            d_gate_pairs[p] = pair_backward(
                &x[rows.clone()],
                params.expert(ei, cfg),
                dispatch.gates[p].to_f64(),
                &dout[rows.clone()],
                (h, f),
                &mut acc.dx[rows],
                &mut grads,
            );
        }
    }
    d_gate_pairs
}

/// One expert's weight-gradient accumulators: gate and up \[H,F\], down \[F,H\].
pub(super) struct ExpertGrads<'a> {
    pub(super) gate: &'a mut [f64],
    pub(super) up: &'a mut [f64],
    pub(super) down: &'a mut [f64],
}

/// One pair's backward: token row `xt` \[H\] through expert weights `w` = (Wg, Wu, Wd) with
/// gate value `gate`, given the token's `dout_t` \[H\]. Adds the pair's share to `dx` \[H\]
/// and to the expert's `grads`, and returns dOut_t . y (the data term of dR).
pub(super) fn pair_backward<T: Real>(
    xt: &[T],
    w: (&[T], &[T], &[T]),
    gate: f64,
    dout_t: &[T],
    (h, f): (usize, usize),
    dx: &mut [f64],
    grads: &mut ExpertGrads<'_>,
) -> f64 {
    let (wg, wu, wd) = w;
    let acts = swiglu_expert_forward(xt, wg, wu, wd, h, f);
    let d_gate = dout_t
        .iter()
        .zip(&acts.y)
        .map(|(d, y)| d.to_f64() * y)
        .sum();
    let dy: Vec<f64> = dout_t.iter().map(|d| gate * d.to_f64()).collect();
    swiglu_expert_backward(
        xt, wg, wu, wd, &acts, &dy, h, f, dx, grads.gate, grads.up, grads.down,
    );
    d_gate
}
