//! The whole MoE layer, forward and backward, for the ReLU router (ReMoE) and the softmax
//! top-k router (the baseline). Both share the experts and the combine; they differ only in how
//! the gates are made and in the router's backward.

use super::experts::{swiglu_expert_backward, swiglu_expert_forward};
use super::routing::{balance_scale, l1_balance_loss, relu_router, softmax_topk_router};
use super::{Dispatch, Real, Routing, TopkRouting};
use crate::config::LayerConfig;

/// The Switch aux-loss coefficient c of the TopK baseline (SPEC).
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

/// The ReMoE layer forward of `x` \[T,H\] (SPEC): the ReLU router, the SwiGLU experts over the
/// active pairs, the gate-weighted combine, and the L1 regulariser at coefficient `lambda`.
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

/// The TopK baseline's forward of `x` \[T,H\] (SPEC): softmax, top-k selection without
/// renormalisation, the SwiGLU experts, the combine, and the Switch aux loss at `aux_coeff`.
pub fn topk_forward<T: Real>(
    x: &[T],
    params: &LayerParams<T>,
    cfg: &LayerConfig,
    aux_coeff: f64,
) -> TopkForward<T> {
    check_inputs(x, params, cfg);
    let routing = softmax_topk_router(x, &params.router, cfg);
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

/// Gradients of `sum(out * dout) + reg_loss` for the ReMoE layer (SPEC: "ReMoE layer,
/// backward"). n_e is a constant of the regulariser: no gradient flows into it.
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
    let (t, e) = (cfg.tokens, cfg.experts);
    let mut acc = ExpertGradAcc::new(cfg);
    let d_gate_pairs = experts_backward(x, params, cfg, &fwd.dispatch, dout, &mut acc);

    // dR over the active pairs, with the regulariser's lambda E n_e / (k T^2); dL = dR where
    // L > 0, which is exactly the active set.
    let reg = if t == 0 {
        0.0
    } else {
        balance_scale(cfg, balance_grad_scale * lambda)
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
    acc.router_backward(x, &params.router, cfg, &d_logits);
    acc.finish()
}

/// Gradients of `sum(out * dout) + aux_loss` for the TopK layer (SPEC: "TopK baseline").
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
    let (t, e) = (cfg.tokens, cfg.experts);
    let mut acc = ExpertGradAcc::new(cfg);
    let d_gate_pairs = experts_backward(x, params, cfg, &fwd.dispatch, dout, &mut acc);

    // dP = dR on the selected pairs + c E n_e / (k T^2) on every pair.
    let aux = if t == 0 {
        0.0
    } else {
        balance_scale(cfg, balance_grad_scale * aux_coeff)
    };
    let mut d_probs = vec![0.0f64; t * e];
    for ti in 0..t {
        for ei in 0..e {
            d_probs[ti * e + ei] = aux * fwd.routing.counts[ei] as f64;
        }
    }
    for ei in 0..e {
        for p in fwd.dispatch.range(ei) {
            let ti = fwd.dispatch.tokens[p] as usize;
            d_probs[ti * e + ei] += d_gate_pairs[p];
        }
    }
    // Softmax backward: dL_t = P_t * (dP_t - (dP_t . P_t)).
    let mut d_logits = vec![0.0f64; t * e];
    for ti in 0..t {
        let row = ti * e..(ti + 1) * e;
        let p: Vec<f64> = fwd.routing.probs[row.clone()]
            .iter()
            .map(|v| v.to_f64())
            .collect();
        let dot: f64 = d_probs[row.clone()]
            .iter()
            .zip(&p)
            .map(|(a, b)| a * b)
            .sum();
        for ei in 0..e {
            d_logits[ti * e + ei] = p[ei] * (d_probs[ti * e + ei] - dot);
        }
    }
    acc.router_backward(x, &params.router, cfg, &d_logits);
    acc.finish()
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
    let mut out = vec![0.0f64; cfg.tokens * h];
    for ei in 0..cfg.experts {
        let (wg, wu, wd) = params.expert(ei, cfg);
        for p in dispatch.range(ei) {
            let ti = dispatch.tokens[p] as usize;
            let acts = swiglu_expert_forward(&x[ti * h..(ti + 1) * h], wg, wu, wd, h, f);
            let r = dispatch.gates[p].to_f64();
            for (o, yo) in acts.y.iter().enumerate() {
                out[ti * h + o] += r * yo;
            }
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

    /// dWr = X^T dL ; dX += dL Wr^T.
    fn router_backward<T: Real>(&mut self, x: &[T], wr: &[T], cfg: &LayerConfig, dl: &[f64]) {
        let (t, h, e) = (cfg.tokens, cfg.hidden, cfg.experts);
        for ti in 0..t {
            for i in 0..h {
                let xi = x[ti * h + i].to_f64();
                let mut s = 0.0;
                for ei in 0..e {
                    let d = dl[ti * e + ei];
                    self.d_router[i * e + ei] += xi * d;
                    s += d * wr[i * e + ei].to_f64();
                }
                self.dx[ti * h + i] += s;
            }
        }
    }

    fn finish<T: Real>(self) -> LayerGrads<T> {
        let conv = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
        debug_assert_eq!(self.dx.len(), self.cfg.tokens * self.cfg.hidden);
        LayerGrads {
            dx: conv(self.dx),
            params: LayerParams {
                router: conv(self.d_router),
                gate: conv(self.d_gate),
                up: conv(self.d_up),
                down: conv(self.d_down),
            },
        }
    }
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
        let (wg, wu, wd) = params.expert(ei, cfg);
        let w = ei * hf..(ei + 1) * hf;
        for p in dispatch.range(ei) {
            let ti = dispatch.tokens[p] as usize;
            let xt = &x[ti * h..(ti + 1) * h];
            let acts = swiglu_expert_forward(xt, wg, wu, wd, h, f);
            let dout_t = &dout[ti * h..(ti + 1) * h];
            d_gate_pairs[p] = dout_t
                .iter()
                .zip(&acts.y)
                .map(|(d, y)| d.to_f64() * y)
                .sum();
            let r = dispatch.gates[p].to_f64();
            let dy: Vec<f64> = dout_t.iter().map(|d| r * d.to_f64()).collect();
            swiglu_expert_backward(
                xt,
                wg,
                wu,
                wd,
                &acts,
                &dy,
                h,
                f,
                &mut acc.dx[ti * h..(ti + 1) * h],
                &mut acc.d_gate[w.clone()],
                &mut acc.d_up[w.clone()],
                &mut acc.d_down[w.clone()],
            );
        }
    }
    d_gate_pairs
}
