//! One SwiGLU expert applied to one token, forward and backward (docs/SPEC.md, the per-pair
//! steps of sections 3.1 and 3.4).

use super::{silu, silu_grad, Real};

/// The intermediates of one (token, expert) pair, kept in f64.
#[derive(Debug, Clone)]
pub struct ExpertActivations {
    /// g = x Wg_e \[F\]
    pub g: Vec<f64>,
    /// u = x Wu_e \[F\]
    pub u: Vec<f64>,
    /// a = SiLU(g) * u \[F\]
    pub a: Vec<f64>,
    /// y = a Wd_e \[H\]
    pub y: Vec<f64>,
}

/// y = (SiLU(x Wg) * (x Wu)) Wd for one token row `x` \[H\], with `wg`, `wu` \[H,F\] and `wd` \[F,H\]
/// the expert's own matrices.
pub fn swiglu_expert_forward<T: Real>(
    x: &[T],
    wg: &[T],
    wu: &[T],
    wd: &[T],
    h: usize,
    f: usize,
) -> ExpertActivations {
    let mut g = vec![0.0f64; f];
    let mut u = vec![0.0f64; f];
    for (i, xi) in x.iter().enumerate().take(h) {
        let xi = xi.to_f64();
        for j in 0..f {
            g[j] += xi * wg[i * f + j].to_f64();
            u[j] += xi * wu[i * f + j].to_f64();
        }
    }
    let a: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| silu(g) * u).collect();
    let mut y = vec![0.0f64; h];
    for (j, aj) in a.iter().enumerate() {
        for (o, yo) in y.iter_mut().enumerate() {
            *yo += aj * wd[j * h + o].to_f64();
        }
    }
    ExpertActivations { g, u, a, y }
}

/// Backward of [`swiglu_expert_forward`] given dY = d loss / d y \[H\]: adds this pair's share to
/// dx \[H\] and to the expert's weight gradients dwg, dwu \[H,F\] and dwd \[F,H\].
#[allow(clippy::too_many_arguments)]
pub fn swiglu_expert_backward<T: Real>(
    x: &[T],
    wg: &[T],
    wu: &[T],
    wd: &[T],
    acts: &ExpertActivations,
    dy: &[f64],
    h: usize,
    f: usize,
    dx: &mut [f64],
    dwg: &mut [f64],
    dwu: &mut [f64],
    dwd: &mut [f64],
) {
    // da = dY Wd^T ; dWd += a^T dY
    let mut da = vec![0.0f64; f];
    for j in 0..f {
        for o in 0..h {
            da[j] += dy[o] * wd[j * h + o].to_f64();
            dwd[j * h + o] += acts.a[j] * dy[o];
        }
    }
    // dg = da * u * SiLU'(g) ; du = da * SiLU(g)
    let dg: Vec<f64> = (0..f)
        .map(|j| da[j] * acts.u[j] * silu_grad(acts.g[j]))
        .collect();
    let du: Vec<f64> = (0..f).map(|j| da[j] * silu(acts.g[j])).collect();
    // dWg += x^T dg ; dWu += x^T du ; dx += dg Wg^T + du Wu^T
    for i in 0..h {
        let xi = x[i].to_f64();
        let mut s = 0.0f64;
        for j in 0..f {
            dwg[i * f + j] += xi * dg[j];
            dwu[i * f + j] += xi * du[j];
            s += dg[j] * wg[i * f + j].to_f64() + du[j] * wu[i * f + j].to_f64();
        }
        dx[i] += s;
    }
}
