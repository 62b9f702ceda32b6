//! What the candle layer's tests on the CPU (tests/candle_cpu.rs) and on CUDA
//! (tests/gpu_candle.rs) share: a problem in the crate's layout, its tensors at a checkpoint's
//! names, the reference's forward and gradients (shared expert included), and the check of a
//! layer built through a `VarMap` against them.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use half::bf16;
use remoe_kernels::candle::{
    load_shards_into_varmap, CandleElement, Family, Lambda, MoeConfig, MoeLayer, MoeRouter,
    SharedExpertConfig, SharedRouting,
};
use remoe_kernels::reference::{
    self, sigmoid, swiglu_expert_backward, swiglu_expert_forward, LayerGrads, LayerParams,
};
use remoe_kernels::LayerConfig;
use remoe_testkit::rng::{seeded, TestRng, UniformVec};

use super::common::{
    assert_within_terms, rel_err, router_term_scales, seed_note, HostProblem, BF16_ROUNDOFF,
};

/// `v` rounded to bf16, back in f64: what the layer's bf16 compute sees exactly.
pub fn bf(v: Vec<f64>) -> Vec<f64> {
    v.into_iter().map(|x| bf16::from_f64(x).to_f64()).collect()
}

pub fn f64_of(t: &Tensor) -> Vec<f64> {
    // candle's CUDA kernels refuse an empty launch grid (T = 0): nothing to convert.
    if t.elem_count() == 0 {
        return Vec::new();
    }
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// The Euclidean norm.
pub fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// `v` [rows, cols] transposed.
pub fn transpose(v: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut o = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            o[c * rows + r] = v[r * cols + c];
        }
    }
    o
}

/// `v` as an f32 CPU tensor of `shape`.
pub fn tensor(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// A shared expert in the reference's layout: gate, up \[H,Fs\], down \[Fs,H\], gate weight \[H\].
#[derive(Clone)]
pub struct SharedRef {
    pub fs: usize,
    pub wg: Vec<f64>,
    pub wu: Vec<f64>,
    pub wd: Vec<f64>,
    pub gate: Option<Vec<f64>>,
}

/// One layer's inputs, bf16-representable, in the crate's layout.
#[derive(Clone)]
pub struct Problem {
    pub cfg: MoeConfig,
    pub t: usize,
    pub x: Vec<f64>,
    pub p: LayerParams<f64>,
    pub shared: Option<SharedRef>,
    /// d loss / d out.
    pub g: Vec<f64>,
}

impl Problem {
    pub fn new(cfg: MoeConfig, t: usize, rng: &mut TestRng) -> Self {
        let (h, f, e) = (cfg.hidden_size, cfg.expert_ffn, cfg.experts);
        let shared = cfg.shared_expert.map(|s| SharedRef {
            fs: s.ffn,
            wg: bf(rng.vec_uniform(h * s.ffn, 0.3)),
            wu: bf(rng.vec_uniform(h * s.ffn, 0.3)),
            wd: bf(rng.vec_uniform(s.ffn * h, 0.3)),
            gate: s.gated.then(|| bf(rng.vec_uniform(h, 0.5))),
        });
        Self {
            t,
            x: bf(rng.vec_uniform(t * h, 1.0)),
            p: LayerParams {
                router: bf(rng.vec_uniform(h * e, 0.5)),
                gate: bf(rng.vec_uniform(e * h * f, 0.3)),
                up: bf(rng.vec_uniform(e * h * f, 0.3)),
                down: bf(rng.vec_uniform(e * f * h, 0.3)),
            },
            shared,
            g: bf(rng.vec_uniform(t * h, 1.0)),
            cfg,
        }
    }

    pub fn layer_config(&self) -> LayerConfig {
        let c = &self.cfg;
        LayerConfig::new(
            self.t,
            c.hidden_size,
            c.expert_ffn,
            c.experts,
            c.experts_per_token,
        )
    }

    /// The routed layer's dOut: d loss / d out scaled by the routed experts' scale.
    pub fn dout(&self) -> Vec<f64> {
        self.g.iter().map(|g| g * self.cfg.routed_scale).collect()
    }

    /// The routed layer alone, as the raw-API tests' problems are.
    pub fn host_problem(&self) -> HostProblem {
        HostProblem {
            cfg: self.layer_config(),
            x: self.x.clone(),
            params: self.p.clone(),
        }
    }

    /// The tensors at the checkpoint's names under `prefix` (with its trailing dot), f32.
    pub fn checkpoint(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let c = &self.cfg;
        let (h, f, e) = (c.hidden_size, c.expert_ffn, c.experts);
        let [pg, pu, pd] = match c.family {
            Family::Mixtral => ["w1", "w3", "w2"],
            _ => ["gate_proj", "up_proj", "down_proj"],
        };
        let mut v = vec![(
            format!("{prefix}gate.weight"),
            tensor(&transpose(&self.p.router, h, e), &[e, h]),
        )];
        let hf = h * f;
        for j in 0..e {
            let r = j * hf..(j + 1) * hf;
            let name = |p: &str| format!("{prefix}experts.{j}.{p}.weight");
            v.push((
                name(pg),
                tensor(&transpose(&self.p.gate[r.clone()], h, f), &[f, h]),
            ));
            v.push((
                name(pu),
                tensor(&transpose(&self.p.up[r.clone()], h, f), &[f, h]),
            ));
            v.push((name(pd), tensor(&transpose(&self.p.down[r], f, h), &[h, f])));
        }
        if let Some(s) = &self.shared {
            let sp = match c.family {
                Family::DeepSeek => "shared_experts",
                _ => "shared_expert",
            };
            let name = |p: &str| format!("{prefix}{sp}.{p}.weight");
            v.push((
                name("gate_proj"),
                tensor(&transpose(&s.wg, h, s.fs), &[s.fs, h]),
            ));
            v.push((
                name("up_proj"),
                tensor(&transpose(&s.wu, h, s.fs), &[s.fs, h]),
            ));
            v.push((
                name("down_proj"),
                tensor(&transpose(&s.wd, s.fs, h), &[h, s.fs]),
            ));
            if let Some(w) = &s.gate {
                v.push((
                    format!("{prefix}shared_expert_gate.weight"),
                    tensor(w, &[1, h]),
                ));
            }
        }
        v
    }

    /// The reference: out, the balance loss, and every gradient of sum(out * g) with the
    /// regulariser's gradient at `scale` (routed grads, then the shared expert's gate, up, down
    /// in the reference layout and its gate weight).
    pub fn reference(&self, coeff: f64, scale: f64) -> Reference {
        let cfg = self.layer_config();
        let (t, h) = (self.t, cfg.hidden);
        let rs = self.cfg.routed_scale;
        let dout = self.dout();
        let (mut out, balance, mut grads) = match self.cfg.router {
            MoeRouter::Relu { .. } => {
                let fwd = reference::remoe_forward(&self.x, &self.p, &cfg, coeff);
                let b = reference::remoe_backward_scaled(
                    &self.x, &self.p, &cfg, coeff, &fwd, &dout, scale,
                );
                (fwd.out, fwd.reg_loss, b)
            }
            MoeRouter::TopK { renormalize, .. } => {
                let fwd = if renormalize {
                    reference::topk_normalized_forward(&self.x, &self.p, &cfg, coeff)
                } else {
                    reference::topk_forward(&self.x, &self.p, &cfg, coeff)
                };
                let b = reference::topk_backward_scaled(
                    &self.x, &self.p, &cfg, coeff, &fwd, &dout, scale,
                );
                (fwd.out, fwd.aux_loss, b)
            }
        };
        for o in out.iter_mut() {
            *o *= rs;
        }
        let mut shared_grads = None;
        if let Some(s) = &self.shared {
            let fs = s.fs;
            let (mut dwg, mut dwu, mut dwd) =
                (vec![0.0; h * fs], vec![0.0; h * fs], vec![0.0; fs * h]);
            let mut dgate = vec![0.0; h];
            // The size of dgate's terms before they cancel (see `Reference::shared`).
            let mut dgate_terms = vec![0.0; h];
            for ti in 0..t {
                let row = ti * h..(ti + 1) * h;
                let xt = &self.x[row.clone()];
                let acts = swiglu_expert_forward(xt, &s.wg, &s.wu, &s.wd, h, fs);
                let z = s
                    .gate
                    .as_ref()
                    .map(|w| xt.iter().zip(w).map(|(a, b)| a * b).sum::<f64>());
                let sg = z.map_or(1.0, sigmoid);
                let gt = &self.g[row.clone()];
                for (o, y) in out[row.clone()].iter_mut().zip(&acts.y) {
                    *o += sg * y;
                }
                let dy: Vec<f64> = gt.iter().map(|g| g * sg).collect();
                let dx = &mut grads.dx[row.clone()];
                swiglu_expert_backward(
                    xt, &s.wg, &s.wu, &s.wd, &acts, &dy, h, fs, dx, &mut dwg, &mut dwu, &mut dwd,
                );
                if let Some(w) = &s.gate {
                    let gy: f64 = gt.iter().zip(&acts.y).map(|(a, b)| a * b).sum();
                    let gy_abs: f64 = gt.iter().zip(&acts.y).map(|(a, b)| (a * b).abs()).sum();
                    let dz = gy * sg * (1.0 - sg);
                    for i in 0..h {
                        dgate[i] += dz * xt[i];
                        dgate_terms[i] += gy_abs * sg * (1.0 - sg) * xt[i].abs();
                        dx[i] += dz * w[i];
                    }
                }
            }
            shared_grads = Some([dwg, dwu, dwd, dgate, dgate_terms]);
        }
        Reference {
            out,
            balance,
            grads,
            shared: shared_grads,
        }
    }
}

pub struct Reference {
    pub out: Vec<f64>,
    pub balance: f64,
    pub grads: LayerGrads<f64>,
    /// The shared expert's gate, up, down gradients, its gate weight's, and the magnitude of
    /// the gate weight gradient's terms: sum over t of sigmoid'(z_t) |x_t| sum_i |G_ti y_ti|.
    /// The gradient itself goes through G_t . y_t, a sum that can cancel (at T = 1 it often
    /// does, to a few per cent of its terms), so an error in the compute dtype is measured
    /// against the terms, not against what is left of them.
    pub shared: Option<[Vec<f64>; 5]>,
}

/// A layer of `pr.cfg` over a fresh `VarMap` (f32 masters) holding `pr`'s parameters at the
/// family's names, under `model.layers.0.mlp.`.
pub fn varmap_layer(
    pr: &Problem,
    routing: &SharedRouting,
    dev: &Device,
) -> (VarMap, MoeLayer<bf16>) {
    varmap_layer_in::<bf16>(pr, routing, dev)
}

/// [`varmap_layer`] computing in `T`.
pub fn varmap_layer_in<T: CandleElement>(
    pr: &Problem,
    routing: &SharedRouting,
    dev: &Device,
) -> (VarMap, MoeLayer<T>) {
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let layer = MoeLayer::<T>::new(&pr.cfg, routing, vb.pp("model.layers.0.mlp")).unwrap();
    // The checkpoint's tensors are host tensors; the VarMap's Vars live on `dev`.
    let on_dev = pr
        .checkpoint("model.layers.0.mlp.")
        .into_iter()
        .map(|(name, t)| (name, t.to_device(dev).unwrap()));
    varmap.set(on_dev).unwrap();
    (varmap, layer)
}

pub fn var_grad(varmap: &VarMap, grads: &candle_core::backprop::GradStore, name: &str) -> Vec<f64> {
    let data = varmap.data().lock().unwrap();
    let var = data
        .get(name)
        .unwrap_or_else(|| panic!("no Var {name} in the VarMap"));
    match grads.get(var.as_tensor()) {
        Some(g) => f64_of(g),
        // No gradient reached it (T = 0): a zero gradient.
        None => vec![0.0; var.as_tensor().elem_count()],
    }
}

/// The layer's forward and every gradient (x and each Var at the checkpoint's names) against
/// the reference, with the regulariser's gradient at `scale`.
pub fn check_against_reference(
    pr: &Problem,
    coeff: f64,
    scale: f64,
    tol: f64,
    what: &str,
    dev: &Device,
) {
    check_against_reference_in::<bf16>(pr, coeff, scale, tol, what, dev)
}

/// [`check_against_reference`] computing in `T`.
pub fn check_against_reference_in<T: CandleElement>(
    pr: &Problem,
    coeff: f64,
    scale: f64,
    tol: f64,
    what: &str,
    dev: &Device,
) {
    let routing = SharedRouting::new(&pr.cfg, dev).unwrap();
    routing.set_balance_grad_scale(scale).unwrap();
    let (varmap, layer) = varmap_layer_in::<T>(pr, &routing, dev);
    let on = |t: Tensor| t.to_device(dev).unwrap();
    let c = &pr.cfg;
    let (t, h, f, e) = (pr.t, c.hidden_size, c.expert_ffn, c.experts);
    let x = Var::from_tensor(&on(tensor(&pr.x, &[t, h]))).unwrap();
    let out = layer.forward(x.as_tensor()).unwrap();
    assert_eq!(out.dims(), &[t, h], "{what}: output shape");
    assert_eq!(
        out.dtype(),
        DType::F32,
        "{what}: the output takes x's dtype"
    );
    // The task loss alone: the regulariser's gradient comes from the layer's backward.
    let loss = (&out * on(tensor(&pr.g, &[t, h])))
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();

    let want = pr.reference(coeff, scale);
    let e_out = rel_err(&f64_of(&out), &want.out);
    assert!(e_out < tol, "{what}: out rel err {e_out}");
    // The CPU path's balance loss is the reference's; the kernels' is computed in f32.
    let loss_tol = if dev.is_cpu() { 1e-9 } else { 1e-2 };
    let got_balance = layer
        .routing_stats()
        .unwrap()
        .expect("a forward ran")
        .balance_loss;
    assert!(
        (got_balance - want.balance).abs() <= loss_tol * want.balance.abs().max(1e-12),
        "{what}: balance loss {got_balance} vs {}",
        want.balance
    );

    let dx = grads
        .get(x.as_tensor())
        .map(f64_of)
        .unwrap_or(vec![0.0; t * h]);
    // dX and the router's gradient go through dR = dOut . y, a dot product that can cancel (at
    // T = 1 nothing averages it out): their bound adds bf16's unit round-off times the size of
    // the summed terms, as tests/gpu_backward.rs's does (common::router_term_scales).
    // On the CPU the layer is the reference itself (f64): no round-off to allow for. The f16
    // cases take bf16's round-off too: a looser bound than f16's 2^-11.
    let scales = router_term_scales(pr.cfg.router_kind(), &pr.host_problem(), coeff, &pr.dout());
    let u = if dev.is_cpu() { 0.0 } else { BF16_ROUNDOFF };
    let (dx_terms, router_terms) = (u * scales.dx(), u * scales.dwr());
    assert_within_terms(&dx, &want.grads.dx, tol, dx_terms, &format!("{what}: dx"));
    let prefix = "model.layers.0.mlp.";
    let got_router = var_grad(&varmap, &grads, &format!("{prefix}gate.weight"));
    // The scales are of the crate's [H, E] router; the checkpoint's is [E, H] (a transpose:
    // the same Frobenius norm).
    let want_router = transpose(&want.grads.params.router, h, e);
    assert_within_terms(
        &got_router,
        &want_router,
        tol,
        router_terms,
        &format!("{what}: d router"),
    );
    let [pg, pu, pd] = match c.family {
        Family::Mixtral => ["w1", "w3", "w2"],
        _ => ["gate_proj", "up_proj", "down_proj"],
    };
    let hf = h * f;
    let wp = &want.grads.params;
    for j in 0..e {
        let r = j * hf..(j + 1) * hf;
        for (p, want_j, rows, cols) in [
            (pg, &wp.gate[r.clone()], h, f),
            (pu, &wp.up[r.clone()], h, f),
            (pd, &wp.down[r.clone()], f, h),
        ] {
            let got = var_grad(&varmap, &grads, &format!("{prefix}experts.{j}.{p}.weight"));
            let want_j = transpose(want_j, rows, cols);
            let err = rel_err(&got, &want_j);
            assert!(err < tol, "{what}: expert {j} {p} rel err {err}");
        }
    }
    if let (Some(s), Some([dwg, dwu, dwd, dgate, dgate_terms])) = (&pr.shared, &want.shared) {
        let sp = match c.family {
            Family::DeepSeek => "shared_experts",
            _ => "shared_expert",
        };
        for (p, want_p, rows, cols) in [
            ("gate_proj", dwg, h, s.fs),
            ("up_proj", dwu, h, s.fs),
            ("down_proj", dwd, s.fs, h),
        ] {
            let got = var_grad(&varmap, &grads, &format!("{prefix}{sp}.{p}.weight"));
            let err = rel_err(&got, &transpose(want_p, rows, cols));
            assert!(err < tol, "{what}: shared {p} rel err {err}");
        }
        if s.gate.is_some() {
            let got = var_grad(
                &varmap,
                &grads,
                &format!("{prefix}shared_expert_gate.weight"),
            );
            let diff: Vec<f64> = got.iter().zip(dgate).map(|(a, b)| a - b).collect();
            let err = norm(&diff) / norm(dgate_terms).max(1e-30);
            assert!(err < tol, "{what}: shared gate rel err {err}");
        }
    }

    // The statistics agree with the reference's routing.
    let stats = layer.routing_stats().unwrap().expect("a forward ran");
    assert_eq!(stats.tokens, t, "{what}");
    match (dev.is_cpu(), &stats.active_experts_histogram) {
        (true, Some(hist)) => {
            assert_eq!(hist.len(), e + 1, "{what}");
            assert_eq!(hist.iter().sum::<u64>() as usize, t, "{what}");
            let from_hist: usize = hist.iter().enumerate().map(|(n, c)| n * *c as usize).sum();
            assert_eq!(from_hist, stats.active_pairs, "{what}");
        }
        // A batch of no tokens is known exactly on every device.
        (false, None) => {}
        (false, Some(hist)) if t == 0 => assert_eq!(hist, &vec![0; e + 1], "{what}"),
        (cpu, h) => panic!("{what}: histogram {h:?} on the CPU: {cpu}"),
    }
    assert_eq!(
        stats
            .tokens_per_expert
            .iter()
            .map(|&n| n as usize)
            .sum::<usize>(),
        stats.active_pairs,
        "{what}"
    );
    if t > 0 {
        let mean = stats.active_pairs as f64 / t as f64;
        assert_eq!(stats.mean_active_experts, mean, "{what}");
        let sparsity = 1.0 - stats.active_pairs as f64 / (t * e) as f64;
        assert!((stats.sparsity - sparsity).abs() < 1e-6, "{what}");
    } else {
        assert_eq!(
            (stats.sparsity, stats.mean_active_experts),
            (1.0, 0.0),
            "{what}"
        );
    }
}

pub fn cfg_of(router: MoeRouter, family: Family, shared: Option<SharedExpertConfig>) -> MoeConfig {
    MoeConfig {
        family,
        router,
        shared_expert: shared,
        ..MoeConfig::remoe(16, 24, 4, 2)
    }
}

pub const RELU: MoeRouter = MoeRouter::Relu {
    lambda: Lambda::Fixed(0.05),
};
pub const TOPK: MoeRouter = MoeRouter::TopK {
    renormalize: false,
    aux_coeff: 0.05,
};
pub const TOPK_NORM: MoeRouter = MoeRouter::TopK {
    renormalize: true,
    aux_coeff: 0.05,
};

/// Writes `tensors` as two safetensors shards in `dir`, alternating, and returns their paths.
pub fn write_shards(dir: &Path, tensors: &[(String, Tensor)]) -> Vec<PathBuf> {
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    for (i, (name, t)) in tensors.iter().enumerate() {
        // bf16 on disk, as the models ship.
        shards[i % 2].insert(name.clone(), t.to_dtype(DType::BF16).unwrap());
    }
    let paths: Vec<PathBuf> = (0..2)
        .map(|i| dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)))
        .collect();
    for (p, s) in paths.iter().zip(&shards) {
        candle_core::safetensors::save(s, p).unwrap();
    }
    paths
}

pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("remoe-candle-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Parameters from two shards at each family's names: mmapped constants through a VarBuilder,
/// and Vars of a VarMap filled by `load_shards_into_varmap`, which `varmap.save()` writes back.
pub fn sharded_checkpoints(dev: &Device, seed: u64) {
    let mut rng = seeded(seed);
    let note = seed_note(seed);
    let dir = temp_dir(if dev.is_cpu() {
        "shards-cpu"
    } else {
        "shards-cuda"
    });
    for (family, shared) in [
        (Family::Mixtral, None),
        (
            Family::QwenMoe,
            Some(SharedExpertConfig {
                ffn: 32,
                gated: true,
            }),
        ),
        (
            Family::DeepSeek,
            Some(SharedExpertConfig {
                ffn: 48,
                gated: false,
            }),
        ),
    ] {
        let what = format!("{family:?}, {note}");
        let cfg = cfg_of(RELU, family, shared);
        let pr = Problem::new(cfg.clone(), 9, &mut rng);
        let prefix = match family {
            Family::Mixtral => "model.layers.3.block_sparse_moe",
            _ => "model.layers.3.mlp",
        };
        let mut tensors = pr.checkpoint(&format!("{prefix}."));
        // Another layer's tensor in the files, which the model does not build.
        tensors.push((
            "model.norm.weight".into(),
            Tensor::ones(16, DType::F32, &Device::Cpu).unwrap(),
        ));
        let paths = write_shards(&dir, &tensors);
        let x = tensor(&pr.x, &[9, 16]).to_device(dev).unwrap();
        let want = pr.reference(0.05, 1.0).out;
        let routing = SharedRouting::new(&cfg, dev).unwrap();

        // Constants, mmapped from both shards, as candle models load for inference.
        // SAFETY: the files were written above and nothing changes them while they are mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&paths, DType::F32, dev) }.unwrap();
        let frozen = MoeLayer::<bf16>::new(&cfg, &routing, vb.pp(prefix)).unwrap();
        let got = f64_of(&frozen.forward(&x).unwrap());
        let err = rel_err(&got, &want);
        assert!(err < 3e-2, "{what}: mmapped layer rel err {err}");

        // Trainable: Vars in the user's VarMap, filled from the shards.
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
        let layer = MoeLayer::<bf16>::new(&cfg, &routing, vb.pp(prefix)).unwrap();
        let n = load_shards_into_varmap(&varmap, &paths).unwrap();
        let names: BTreeSet<String> = tensors[..tensors.len() - 1]
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        assert_eq!(n, names.len(), "{what}");
        let got_vm = f64_of(&layer.forward(&x).unwrap());
        assert_eq!(
            got_vm, got,
            "{what}: the VarMap's layer and the mmapped one differ"
        );
        assert_eq!(varmap.all_vars().len(), names.len(), "{what}");

        // varmap.save() holds every parameter, at the checkpoint's names and values.
        let saved = dir.join("saved.safetensors");
        varmap.save(&saved).unwrap();
        let back = candle_core::safetensors::load(&saved, &Device::Cpu).unwrap();
        assert_eq!(
            back.keys().cloned().collect::<BTreeSet<_>>(),
            names,
            "{what}"
        );
        for (name, t) in &tensors[..tensors.len() - 1] {
            let want = f64_of(&t.to_dtype(DType::BF16).unwrap());
            assert_eq!(f64_of(&back[name]), want, "{what}: {name}");
        }

        // A shard set without one of the layer's tensors is a typed error naming it.
        let partial = write_shards(&dir, &tensors[1..]);
        let err = load_shards_into_varmap(&varmap, &partial)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("{prefix}.gate.weight")),
            "{what}: {err}"
        );
        // And a missing tensor through an mmapped VarBuilder is candle's error, not a panic.
        // SAFETY: as above.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&partial, DType::F32, dev) }.unwrap();
        assert!(
            MoeLayer::<bf16>::new(&cfg, &routing, vb.pp(prefix)).is_err(),
            "{what}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Two layers sharing one adaptive lambda: evaluation forwards record nothing, training
/// forwards of both layers are averaged into one step per `step()`.
pub fn one_lambda_for_all_layers(dev: &Device, seed: u64) {
    let mut rng = seeded(seed);
    let note = seed_note(seed);
    let (lambda0, alpha) = (1e-3, 2.0);
    let cfg = cfg_of(
        MoeRouter::Relu {
            lambda: Lambda::Adaptive { lambda0, alpha },
        },
        Family::Mixtral,
        None,
    );
    let routing = SharedRouting::new(&cfg, dev).unwrap();
    assert!(routing.is_adaptive());
    let (h, e, t) = (16, 4, 10);
    // x > 0; layer A's router columns all positive (every gate open, sparsity 0), layer B's
    // positive in one column only (sparsity 0.75): the mean, 0.375, is below the target 0.5, so
    // lambda goes up; B alone (the last layer recorded) would send it down.
    let mut a = Problem::new(cfg.clone(), t, &mut rng);
    a.x = bf(a.x.iter().map(|v| v.abs() + 0.1).collect());
    let mut b = a.clone();
    a.p.router = vec![0.25; h * e];
    b.p.router = (0..h * e)
        .map(|i| if i % e == 0 { 0.25 } else { -0.25 })
        .collect();
    let (_va, la) = varmap_layer(&a, &routing, dev);
    let (_vb, lb) = varmap_layer(&b, &routing, dev);
    let x = tensor(&a.x, &[t, h]).to_device(dev).unwrap();

    // Evaluation: recorded nothing, lambda stays.
    routing.set_training(false);
    la.forward(&x).unwrap();
    lb.forward(&x).unwrap();
    routing.step().unwrap();
    assert_eq!(routing.coefficient().unwrap(), lambda0, "{note}");
    assert_eq!(la.routing_stats().unwrap().unwrap().sparsity, 0.0, "{note}");
    assert_eq!(
        lb.routing_stats().unwrap().unwrap().sparsity,
        0.75,
        "{note}"
    );

    // Training: both layers recorded, one step on their mean.
    routing.set_training(true);
    let y = (la.forward(&x).unwrap() + lb.forward(&x).unwrap()).unwrap();
    y.sum_all().unwrap().backward().unwrap();
    routing.step().unwrap();
    assert_eq!(routing.coefficient().unwrap(), lambda0 * alpha, "{note}");
    // Nothing recorded since: the next step leaves it.
    routing.step().unwrap();
    assert_eq!(routing.coefficient().unwrap(), lambda0 * alpha, "{note}");

    // A forward that tracks no gradient (constant parameters, plain x) is not a training
    // forward either.
    let frozen_vb =
        VarBuilder::from_tensors(b.checkpoint("m.").into_iter().collect(), DType::F32, dev);
    let frozen = MoeLayer::<bf16>::new(&cfg, &routing, frozen_vb.pp("m")).unwrap();
    frozen.forward(&x).unwrap();
    routing.step().unwrap();
    assert_eq!(routing.coefficient().unwrap(), lambda0 * alpha, "{note}");

    // The handle must fit the layer's router.
    let fixed = SharedRouting::new(&cfg_of(RELU, Family::Mixtral, None), dev).unwrap();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    assert!(MoeLayer::<bf16>::new(&cfg, &fixed, vb.clone()).is_err());
    assert!(MoeLayer::<bf16>::new(&cfg_of(TOPK, Family::Mixtral, None), &routing, vb).is_err());
    assert!(routing.set_balance_grad_scale(f64::NAN).is_err());
    assert!(routing.set_balance_grad_scale(-1.0).is_err());
}

/// `a` and `b` are the same bits, or a panic naming how many elements differ and the first.
fn assert_same_bits(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtypes");
    let (x, y) = (bits(a), bits(b));
    let differ: Vec<usize> = (0..x.len()).filter(|&i| x[i] != y[i]).collect();
    if let Some(&i) = differ.first() {
        panic!(
            "{what}: {} of {} elements differ, the first at {i} ({:#x} against {:#x})",
            differ.len(),
            x.len(),
            x[i],
            y[i]
        );
    }
}

/// The bits of a float tensor (any dtype), for exact comparisons.
fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::BF16 => t
            .to_vec1::<bf16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::F16 => {
            let v = t.to_vec1::<half::f16>().unwrap();
            v.iter().map(|x| x.to_bits() as u64).collect()
        }
        other => panic!("bits of {other:?}"),
    }
}

/// f32 values whose conversion to bf16 or f16 is a case of its own: ties that round down and
/// up (to even) for each type, signed zero, infinities, NaN, f16's overflow (65520 -> inf, 65519
/// -> 65504) and underflow (2^-25, a tie with 0), subnormals of f16 and of bf16 (f32's), and
/// f32's largest (inf in bf16).
fn conversion_cases() -> Vec<f32> {
    let p = |e: i32| 2f32.powi(e);
    vec![
        1.0 + p(-8),
        1.0 + 3.0 * p(-8),
        -(1.0 + 3.0 * p(-8)),
        1.0 + p(-11),
        1.0 + 3.0 * p(-11),
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        65520.0,
        65519.0,
        p(-25),
        3.0 * p(-20),
        1e-39,
        f32::MAX,
    ]
}

/// [`staging_is_candles_ops_bit_for_bit`] for both 16-bit compute types, with f32 masters
/// (the staging op's case) and with bf16 masters (which take candle's ops).
pub fn staging_is_candles_ops_bit_for_bit_for_every_master(dev: &Device, seed: u64) {
    let run = |masters, s| {
        staging_is_candles_ops_bit_for_bit::<bf16>(dev, masters, s);
        staging_is_candles_ops_bit_for_bit::<half::f16>(dev, masters, s ^ 1);
    };
    run(DType::F32, seed);
    run(DType::BF16, seed ^ 2);
}

/// What every forward of a trainable layer does to its masters before the kernels run
/// (`MoeLayer::compute_weights`: for f32 masters one transpose-and-cast op per tensor) is, bit for
/// bit, what candle's own ops make of them (each expert's [out, in] matrix transposed, stacked,
/// cast to the compute dtype), and so are the gradients it sends back to every master (those only
/// test the indexing: the backward's conversions are exact). Shapes whose sides are not
/// multiples of the CUDA kernel's 32 x 32 tile, one expert and several; values that exercise the
/// rounding ([`conversion_cases`] first in every tensor, then random ones); masters in `masters`
/// (f32: the op; another dtype: candle's ops, which must still work).
pub fn staging_is_candles_ops_bit_for_bit<T: CandleElement>(
    dev: &Device,
    masters: DType,
    seed: u64,
) {
    let note = seed_note(seed);
    let mut rng = seeded(seed);
    let dt = <T as candle_core::WithDType>::DTYPE;
    for (h, f, e) in [(16, 24, 1), (40, 72, 3), (64, 96, 8), (8, 8, 2)] {
        let what = format!("H {h}, F {f}, E {e}, masters {masters:?}, compute {dt:?}, {note}");
        let cfg = MoeConfig::remoe(h, f, e, 1);
        let routing = SharedRouting::new(&cfg, dev).unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, masters, dev);
        let layer = MoeLayer::<T>::new(&cfg, &routing, vb.pp("m")).unwrap();
        let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        for name in &names {
            let var = varmap.data().lock().unwrap()[name].clone();
            let n = var.as_tensor().elem_count();
            let mut v: Vec<f32> = rng.vec_uniform(n, 1.0).iter().map(|&x| x as f32).collect();
            for (slot, x) in v.iter_mut().zip(conversion_cases()) {
                *slot = x;
            }
            let t = Tensor::from_vec(v, var.as_tensor().shape(), dev)
                .unwrap()
                .to_dtype(masters)
                .unwrap();
            var.set(&t).unwrap();
        }
        let get = |name: &str| varmap.data().lock().unwrap()[name].as_tensor().clone();
        let stacked = |proj: &str| {
            let views: Vec<Tensor> = (0..e)
                .map(|j| get(&format!("m.experts.{j}.{proj}.weight")).t().unwrap())
                .collect();
            Tensor::stack(&views, 0).unwrap().to_dtype(dt).unwrap()
        };
        let by_ops = [
            get("m.gate.weight").t().unwrap().to_dtype(dt).unwrap(),
            stacked("w1"),
            stacked("w3"),
            stacked("w2"),
        ];
        let staged = layer.compute_weights().unwrap();
        // A loss on each, with the same random weights G_i, so that each gradient is G_i (in T)
        // sent back through the staging.
        let mut loss_ops = Tensor::zeros((), DType::F32, dev).unwrap();
        let mut loss_staged = loss_ops.clone();
        for (i, (a, b)) in by_ops.iter().zip(&staged).enumerate() {
            assert_same_bits(a, b, &format!("tensor {i}'s values, {what}"));
            let g = Tensor::from_vec(
                rng.vec_uniform(a.elem_count(), 1.0)
                    .iter()
                    .map(|&x| x as f32)
                    .collect::<Vec<_>>(),
                a.shape(),
                dev,
            )
            .unwrap()
            .to_dtype(dt)
            .unwrap();
            let term = |w: &Tensor| {
                (w * &g)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            loss_ops = (loss_ops + term(a)).unwrap();
            loss_staged = (loss_staged + term(b)).unwrap();
        }
        let (ga, gb) = (
            loss_ops.backward().unwrap(),
            loss_staged.backward().unwrap(),
        );
        for name in &names {
            let var = get(name);
            let (a, b) = (ga.get(&var), gb.get(&var));
            let (Some(a), Some(b)) = (a, b) else {
                panic!(
                    "{name}: a gradient is missing ({}, {}): {what}",
                    a.is_some(),
                    b.is_some()
                )
            };
            assert_same_bits(a, b, &format!("{name}'s gradient, {what}"));
        }
    }
}
