//! The run without a GPU: a tiny version of the same experiment through the crate's CPU
//! reference (f64, no candle). The model is a byte embedding, one MoE layer with a residual, and
//! an LM head: a bigram model, small enough to train for a few hundred steps in seconds. The
//! gradients of the MoE layer come from the reference backward, the others are written out
//! here, and Adam updates everything. ReMoE's lambda follows the reference controller
//! ([`SparsityController`], the paper's defaults), so its three stages show here too; the same
//! model with the TopK layer is trained for the comparison.

use std::time::Instant;

use remoe_kernels::reference::{
    matmul, remoe_backward, remoe_forward, topk_backward, topk_forward, LayerParams,
    SparsityController,
};
use remoe_kernels::LayerConfig;
use remoe_testkit::rng::{seeded, Rng, StandardNormal};

use super::corpus::{Batch, Corpus};
use super::report::{Affinity, RunLog, StepLog};

/// The tiny run's sizes.
#[derive(Debug, Clone, Copy)]
pub struct CpuSizes {
    pub steps: usize,
    pub batch: usize,
    pub seq: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub experts: usize,
    pub k: usize,
    pub lr: f64,
    pub seed: u64,
    /// ReMoE's controller: starting lambda and step factor.
    pub lambda0: f64,
    pub alpha: f64,
}

const VOCAB: usize = 256;
/// TopK's aux-loss coefficient (the paper's TopK runs use 1e-2).
pub const AUX_COEFF: f64 = 1e-2;

/// Adam on one flat parameter vector.
struct Adam {
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Adam {
    fn new(n: usize) -> Self {
        Self {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    fn step(&mut self, p: &mut [f64], g: &[f64], lr: f64, t: usize) {
        let (b1, b2, eps) = (0.9f64, 0.95f64, 1e-8);
        let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
        for i in 0..p.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            p[i] -= lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + eps);
        }
    }
}

struct Model {
    emb: Vec<f64>,
    moe: LayerParams<f64>,
    head: Vec<f64>,
    remoe: bool,
}

/// One forward: the loss, the balance loss, the routing mask [T,E], and (for training) the
/// gradients of loss + balance loss.
struct Pass {
    lm_loss: f64,
    /// Each token's cross-entropy.
    token_loss: Vec<f64>,
    balance: f64,
    sparsity: f64,
    active: Vec<bool>,
    grads: Option<(Vec<f64>, LayerParams<f64>, Vec<f64>)>,
}

fn transpose(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let mut t = vec![0.0; a.len()];
    for i in 0..m {
        for j in 0..n {
            t[j * m + i] = a[i * n + j];
        }
    }
    t
}

impl Model {
    fn new(s: &CpuSizes, remoe: bool) -> Self {
        Self::random(s.hidden, s.ffn, s.experts, s.seed, 0.02, remoe)
    }

    /// Embedding rows of std 1; the router, experts and head of std `std`.
    fn random(h: usize, f: usize, e: usize, seed: u64, std: f64, remoe: bool) -> Self {
        let mut rng = seeded(seed);
        let mut normal = |n: usize, std: f64| -> Vec<f64> {
            (0..n)
                .map(|_| std * rng.sample::<f64, _>(StandardNormal))
                .collect()
        };
        Self {
            emb: normal(VOCAB * h, 1.0),
            moe: LayerParams {
                router: normal(h * e, std),
                gate: normal(e * h * f, std),
                up: normal(e * h * f, std),
                down: normal(e * f * h, std),
            },
            head: normal(h * VOCAB, std),
            remoe,
        }
    }

    fn pass(&self, b: &Batch, cfg: &LayerConfig, coeff: f64, train: bool) -> Pass {
        let (t, h, e) = (cfg.tokens, cfg.hidden, cfg.experts);
        let mut x = vec![0.0; t * h];
        for (i, &tok) in b.inputs.iter().enumerate() {
            x[i * h..(i + 1) * h].copy_from_slice(&self.emb[tok as usize * h..][..h]);
        }
        let (out, balance, active, sparsity, rf, tf) = if self.remoe {
            let f = remoe_forward(&x, &self.moe, cfg, coeff);
            let active: Vec<bool> = f.routing.gates.iter().map(|&g| g > 0.0).collect();
            let s = f.routing.sparsity();
            (f.out.clone(), f.reg_loss, active, s, Some(f), None)
        } else {
            let f = topk_forward(&x, &self.moe, cfg, coeff);
            let s = 1.0 - cfg.k as f64 / e as f64;
            (
                f.out.clone(),
                f.aux_loss,
                f.routing.selected.clone(),
                s,
                None,
                Some(f),
            )
        };
        let hid: Vec<f64> = x.iter().zip(&out).map(|(a, b)| a + b).collect();
        let logits = matmul(&hid, &self.head, t, h, VOCAB);
        // Softmax cross-entropy, mean over tokens; dlogits = (p - onehot) / T.
        let mut lm_loss = 0.0;
        let mut token_loss = Vec::with_capacity(t);
        let mut dlogits = vec![0.0; t * VOCAB];
        for i in 0..t {
            let row = &logits[i * VOCAB..(i + 1) * VOCAB];
            let mx = row.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = row.iter().map(|v| (v - mx).exp()).sum();
            let tgt = b.targets[i] as usize;
            let l = z.ln() + mx - row[tgt];
            token_loss.push(l);
            lm_loss += l / t as f64;
            for j in 0..VOCAB {
                dlogits[i * VOCAB + j] = ((row[j] - mx).exp() / z) / t as f64;
            }
            dlogits[i * VOCAB + tgt] -= 1.0 / t as f64;
        }
        let grads = train.then(|| {
            let dhead = matmul(&transpose(&hid, t, h), &dlogits, h, t, VOCAB);
            let dhid = matmul(&dlogits, &transpose(&self.head, h, VOCAB), t, VOCAB, h);
            let g = match (&rf, &tf) {
                (Some(f), _) => remoe_backward(&x, &self.moe, cfg, coeff, f, &dhid),
                (_, Some(f)) => topk_backward(&x, &self.moe, cfg, coeff, f, &dhid),
                _ => unreachable!("one of the two forwards ran"),
            };
            // The residual: dx = dhid + the layer's dx, scattered into the embedding rows.
            let mut demb = vec![0.0; VOCAB * h];
            for (i, &tok) in b.inputs.iter().enumerate() {
                for c in 0..h {
                    demb[tok as usize * h + c] += dhid[i * h + c] + g.dx[i * h + c];
                }
            }
            (demb, g.params, dhead)
        });
        Pass {
            lm_loss,
            token_loss,
            balance,
            sparsity,
            active,
            grads,
        }
    }
}

/// Trains the tiny model (ReMoE when `remoe`, else TopK) and evaluates it on `held`.
pub fn train(s: &CpuSizes, remoe: bool, train: &Corpus, held: &Corpus) -> RunLog {
    let t = s.batch * s.seq;
    let cfg = LayerConfig::new(t, s.hidden, s.ffn, s.experts, s.k);
    let mut model = Model::new(s, remoe);
    let mut ctl =
        SparsityController::with_params(s.lambda0, s.alpha, 1.0 - s.k as f64 / s.experts as f64);
    let n = |p: &LayerParams<f64>| [p.router.len(), p.gate.len(), p.up.len(), p.down.len()];
    let sizes = n(&model.moe);
    let mut opt_emb = Adam::new(model.emb.len());
    let mut opt_head = Adam::new(model.head.len());
    let mut opt_moe: Vec<Adam> = sizes.iter().map(|&n| Adam::new(n)).collect();
    let mut rng = seeded(s.seed ^ 0x5eed);
    let mut steps = Vec::with_capacity(s.steps);
    let start = Instant::now();
    for step in 0..s.steps {
        let t0 = Instant::now();
        let b = train.random_batch(&mut rng, s.batch, s.seq);
        let coeff = if remoe { ctl.lambda() } else { AUX_COEFF };
        let p = model.pass(&b, &cfg, coeff, true);
        let (demb, dmoe, dhead) = p.grads.expect("training pass");
        opt_emb.step(&mut model.emb, &demb, s.lr, step + 1);
        opt_head.step(&mut model.head, &dhead, s.lr, step + 1);
        let m = &mut model.moe;
        for (i, (w, g)) in [
            (&mut m.router, &dmoe.router),
            (&mut m.gate, &dmoe.gate),
            (&mut m.up, &dmoe.up),
            (&mut m.down, &dmoe.down),
        ]
        .into_iter()
        .enumerate()
        {
            opt_moe[i].step(w, g, s.lr, step + 1);
        }
        if remoe {
            ctl.record(p.sparsity);
            ctl.step();
        }
        steps.push(StepLog {
            step,
            lr: s.lr,
            lm_loss: p.lm_loss,
            reg_loss: p.balance,
            sparsity: Some(p.sparsity),
            lambda: coeff,
            tokens_per_s: t as f64 / t0.elapsed().as_secs_f64(),
            grad_norm: None,
            mem_gib: None,
        });
        if step % 50 == 0 || step + 1 == s.steps {
            println!(
                "  [{}] step {step:>4}: loss {:.3}, sparsity {:.3}, {} {coeff:.2e}, regulariser {:.2e}",
                if remoe { "ReMoE" } else { "TopK" },
                p.lm_loss,
                p.sparsity,
                if remoe { "lambda" } else { "c" },
                p.balance
            );
        }
    }
    let wall_s = start.elapsed().as_secs_f64();
    // Held-out: the loss and, per token, the experts it was routed to, by domain.
    let mut aff = Affinity::new(1, s.experts, &held.names);
    let coeff = if remoe { ctl.lambda() } else { AUX_COEFF };
    let batches = held.sequential_batches(s.batch, s.seq, 8);
    let mut val = 0.0;
    let mut by_domain = vec![(0.0, 0usize); held.names.len()];
    for b in &batches {
        let p = model.pass(b, &cfg, coeff, false);
        val += p.lm_loss / batches.len() as f64;
        for (&d, &l) in b.domains.iter().zip(&p.token_loss) {
            by_domain[d as usize].0 += l;
            by_domain[d as usize].1 += 1;
        }
        let mask: Vec<u8> = p.active.iter().map(|&a| u8::from(a)).collect();
        aff.add(&b.domains, &[mask]);
    }
    RunLog {
        name: format!(
            "{} (CPU reference, tiny)",
            if remoe { "ReMoE" } else { "TopK" }
        ),
        steps,
        val_loss: val,
        val_by_domain: by_domain
            .iter()
            .map(|&(sum, n)| sum / n.max(1) as f64)
            .collect(),
        wall_s,
        tokens: t * s.steps,
        affinity: aff,
        moe_share: None,
        extra: serde_json::json!({}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_remoe_run_learns_and_logs_every_step() {
        let s = CpuSizes {
            steps: 60,
            batch: 4,
            seq: 16,
            hidden: 16,
            ffn: 16,
            experts: 4,
            k: 1,
            lr: 1e-2,
            seed: 1,
            lambda0: 1e-8,
            alpha: 1.2,
        };
        let c = Corpus::generate(1, 20_000);
        let h = Corpus::generate(2, 5_000);
        let log = train(&s, true, &c, &h);
        assert_eq!(log.steps.len(), 60);
        assert!(log.val_loss.is_finite());
        // A byte model starts near ln(256) = 5.55 and must fall well below it.
        assert!(log.steps[0].lm_loss > 5.0);
        assert!(log.val_loss < 5.0, "{}", log.val_loss);
        // lambda moved by alpha each step (the controller ran).
        assert!(log.steps[59].lambda != log.steps[0].lambda);
        let routed: u64 = log.affinity.counts[0].iter().flatten().sum();
        assert!(routed > 0);
    }

    /// A tiny model whose weights are large enough that every term of the gradient matters
    /// (std 0.5 for the router, the experts and the head; the embedding's std 1), and a batch
    /// with repeated bytes, so that embedding rows collect gradients from several positions.
    fn fd_problem(remoe: bool) -> (Model, Batch, LayerConfig) {
        let (t, h, f, e, k) = (12, 8, 8, 4, 1);
        let model = Model::random(h, f, e, 7, 0.5, remoe);
        let text = b"abcabdacbbdca";
        let b = Batch {
            inputs: text[..t].iter().map(|&v| u32::from(v)).collect(),
            targets: text[1..=t].iter().map(|&v| u32::from(v)).collect(),
            domains: vec![0; t],
        };
        (model, b, LayerConfig::new(t, h, f, e, k))
    }

    const NAMES: [&str; 6] = ["embedding", "head", "router", "gate", "up", "down"];

    /// The model's parameter group `i`, in the order of [`NAMES`].
    fn group(m: &mut Model, i: usize) -> &mut Vec<f64> {
        match i {
            0 => &mut m.emb,
            1 => &mut m.head,
            2 => &mut m.moe.router,
            3 => &mut m.moe.gate,
            4 => &mut m.moe.up,
            _ => &mut m.moe.down,
        }
    }

    /// The analytic gradients of lm_loss + balance, in the order of [`NAMES`].
    fn analytic(model: &Model, b: &Batch, cfg: &LayerConfig, coeff: f64) -> [Vec<f64>; 6] {
        let p = model.pass(b, cfg, coeff, true);
        let (demb, dmoe, dhead) = p.grads.expect("training pass");
        [demb, dhead, dmoe.router, dmoe.gate, dmoe.up, dmoe.down]
    }

    fn max_abs(v: &[f64]) -> f64 {
        v.iter().fold(0.0f64, |a, x| a.max(x.abs()))
    }

    /// Central differences of `loss` (of a forward pass) against the analytic gradients `g` of
    /// the groups `which`. An entry whose +-step changes the routing mask is skipped: the loss
    /// has a kink there (ReLU at L = 0, a swap in the top-k selection), and the regulariser even
    /// jumps (n_e changes). Returns, per group, the largest |analytic - numeric| over the
    /// group's largest |analytic|, and the number of entries skipped.
    fn fd_errors(
        model: &Model,
        b: &Batch,
        cfg: &LayerConfig,
        coeff: f64,
        g: &[Vec<f64>; 6],
        which: &[usize],
        loss: impl Fn(&Pass) -> f64,
    ) -> ([f64; 6], usize) {
        let step = 1e-5;
        let base = model.pass(b, cfg, coeff, false).active;
        let mut m = Model {
            emb: model.emb.clone(),
            moe: model.moe.clone(),
            head: model.head.clone(),
            remoe: model.remoe,
        };
        let mut errs = [0.0f64; 6];
        let mut skipped = 0;
        for &gi in which {
            let scale = max_abs(&g[gi]);
            assert!(scale > 0.0, "{} has no gradient at all", NAMES[gi]);
            for (i, &gv) in g[gi].iter().enumerate() {
                let w = group(&mut m, gi)[i];
                group(&mut m, gi)[i] = w + step;
                let plus = m.pass(b, cfg, coeff, false);
                group(&mut m, gi)[i] = w - step;
                let minus = m.pass(b, cfg, coeff, false);
                group(&mut m, gi)[i] = w;
                if plus.active != base || minus.active != base {
                    skipped += 1;
                    continue;
                }
                let fd = (loss(&plus) - loss(&minus)) / (2.0 * step);
                errs[gi] = errs[gi].max((fd - gv).abs() / scale);
            }
        }
        (errs, skipped)
    }

    /// Finite differences of the whole model's gradients (embedding, head, router, gate, up,
    /// down) in f64: ReMoE at a nonzero lambda, TopK at its aux coefficient, and the
    /// regulariser's part alone (the analytic gradient at lambda minus the one at lambda = 0,
    /// against the finite differences of the regulariser's value).
    ///
    /// The bound: with the central step h = 1e-5 the truncation error is h^2 |f'''| / 6, about
    /// 1e-11 here, and the rounding error about eps |loss| / h = 2e-16 * 6 / 1e-5, about 1e-10;
    /// against groups whose largest gradient is 1e-2..1 that is 1e-8 at worst. A missing or
    /// wrong term (the residual, the regulariser, a scale) is a relative error of 1e-2 or more,
    /// so 1e-6 tells the two apart by orders of magnitude either way.
    #[test]
    fn whole_model_gradients_match_finite_differences() {
        const BOUND: f64 = 1e-6;
        let all = [0, 1, 2, 3, 4, 5];
        for (remoe, coeff) in [(true, 0.3), (false, AUX_COEFF)] {
            let (model, b, cfg) = fd_problem(remoe);
            let p = model.pass(&b, &cfg, coeff, false);
            let g = analytic(&model, &b, &cfg, coeff);
            let (errs, skipped) =
                fd_errors(&model, &b, &cfg, coeff, &g, &all, |p| p.lm_loss + p.balance);
            let name = if remoe { "ReMoE" } else { "TopK" };
            println!(
                "{name}: sparsity {:.3}, loss {:.4}, balance {:.4}, skipped {skipped}",
                p.sparsity, p.lm_loss, p.balance
            );
            for (n, (err, v)) in NAMES.iter().zip(errs.iter().zip(&g)) {
                println!(
                    "  {n:>9}: max |g| {:.3e}, relative error {err:.2e}",
                    max_abs(v)
                );
            }
            assert!(skipped < 20, "{skipped} entries at a kink");
            for (n, err) in NAMES.iter().zip(errs) {
                assert!(err < BOUND, "{name} {n}: relative error {err:.2e}");
            }
            if !remoe {
                continue;
            }
            // Some pairs active and some not, and a regulariser that is not negligible.
            assert!(p.sparsity > 0.2 && p.sparsity < 0.8, "{}", p.sparsity);
            assert!(p.balance > 1e-2 * p.lm_loss, "{} {}", p.balance, p.lm_loss);
            // The regulariser alone: it reaches the router, and the embedding through x.
            let g0 = analytic(&model, &b, &cfg, 0.0);
            let dreg: [Vec<f64>; 6] =
                std::array::from_fn(|i| g[i].iter().zip(&g0[i]).map(|(a, z)| a - z).collect());
            for i in [1, 3, 4, 5] {
                assert_eq!(max_abs(&dreg[i]), 0.0, "{} sees the regulariser", NAMES[i]);
            }
            println!(
                "  regulariser's share: router {:.3e} of {:.3e}, embedding {:.3e} of {:.3e}",
                max_abs(&dreg[2]),
                max_abs(&g[2]),
                max_abs(&dreg[0]),
                max_abs(&g[0])
            );
            assert!(max_abs(&dreg[2]) > 1e-2 * max_abs(&g[2]));
            let (errs, _) = fd_errors(&model, &b, &cfg, coeff, &dreg, &[0, 2], |p| p.balance);
            println!(
                "  regulariser alone: embedding {:.2e}, router {:.2e}",
                errs[0], errs[2]
            );
            for i in [0, 2] {
                assert!(
                    errs[i] < BOUND,
                    "regulariser, {}: {:.2e}",
                    NAMES[i],
                    errs[i]
                );
            }
        }
    }
}
