//! A real training run: a small byte-level decoder-only transformer in candle whose MLPs are
//! ReMoE layers (the crate's `candle::MoeLayer`), trained on a generated corpus of five distinct
//! domains (examples/train/corpus.rs), then the same model with the TopK layer for a
//! validation-loss comparison.
//!
//! It shows a progress bar (loss, sparsity, lambda, tokens/s) and writes to `--out`:
//! - `log.json`: the configuration, and per run every step's LM loss, regulariser, sparsity,
//!   lambda, learning rate and tokens/s; the validation loss, wall time, tokens/s, the MoE
//!   layers' share of the step time and the expert-domain affinity;
//! - `training.png`: sparsity, lambda, regulariser and LM loss per step (the paper's Figures 3
//!   and 4; its three stages: dense while lambda is tiny, sparsifying as the controller raises
//!   lambda exponentially, then sparsity held at 1 - k/E);
//! - `affinity.txt`: per layer and expert, the share of its routed held-out tokens from each
//!   domain (the paper's Table 12).
//!
//! Precision: the MoE layer takes bf16 activations and bf16 parameters (the module's
//! requirement: the VarBuilder's dtype is the layer's), so its parameters and their AdamW
//! state are bf16. Everything else (embeddings, attention, norms, LM head, loss) is f32 with f32
//! parameters; the activations are cast to bf16 into each MoE layer and back to f32 after it
//! (candle differentiates through both casts).
//!
//! Without a CUDA device it says so and trains a tiny version through the crate's CPU reference
//! (examples/train/cpu.rs): one MoE layer, a few hundred steps, same outputs.
//!
//!   CUDA_COMPUTE_CAP=90 scripts/with-cuda cargo run --release --no-default-features \
//!       --features candle --example train -- --out train-out

#[path = "train/corpus.rs"]
mod corpus;
#[path = "train/cpu.rs"]
mod cpu;
#[path = "train/report.rs"]
mod report;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{
    loss::cross_entropy, ops::softmax, AdamW, Embedding, Init, Linear, Optimizer, ParamsAdamW,
    RmsNorm, VarBuilder, VarMap,
};
use clap::Parser;
use half::bf16;
use indicatif::{ProgressBar, ProgressStyle};
use remoe_kernels::candle::MoeLayer;
use remoe_testkit::rng::{seeded, TestRng};
use serde_json::json;

use corpus::{Batch, Corpus, DOMAINS};
use report::{Affinity, RunLog, StepLog};

type Error = Box<dyn std::error::Error>;

/// Byte-level tokens.
const VOCAB: usize = 256;

#[derive(Parser, Debug, Clone)]
#[command(about = "Train a small ReMoE transformer (and its TopK twin) on a generated corpus")]
struct Args {
    /// Optimiser steps per run.
    #[arg(long, default_value_t = 1500)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Context length (bytes).
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Transformer blocks (each with one MoE layer).
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Hidden size H (a multiple of 8 and of --heads).
    #[arg(long, default_value_t = 384)]
    hidden: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 6)]
    heads: usize,
    /// Each expert's SwiGLU inner size F (a multiple of 8).
    #[arg(long, default_value_t = 1024)]
    ffn: usize,
    /// Experts E.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Active experts k (the target mean for ReMoE).
    #[arg(long, default_value_t = 1)]
    k: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Linear warm-up steps of the learning rate (then cosine decay to a tenth).
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// TopK's aux-loss coefficient (the paper's TopK runs use 1e-2).
    #[arg(long, default_value_t = 1e-2)]
    aux_coeff: f64,
    /// Measure the sparsity every this many steps (1: every step).
    #[arg(long, default_value_t = 1)]
    stats_every: usize,
    /// Held-out batches for the validation loss and the affinity table.
    #[arg(long, default_value_t = 32)]
    val_batches: usize,
    /// Steps timed (after training) for the MoE layers' share of the step time.
    #[arg(long, default_value_t = 20)]
    timing_steps: usize,
    /// ReMoE's starting lambda (the paper's 1e-8).
    #[arg(long, default_value_t = 1e-8)]
    lambda0: f64,
    /// ReMoE's controller step factor alpha (the paper's 1.2).
    #[arg(long, default_value_t = 1.2)]
    alpha: f64,
    /// Fix ReMoE's lambda at this value instead of the adaptive controller (an ablation).
    #[arg(long)]
    fixed_lambda: Option<f64>,
    /// Skip the TopK run.
    #[arg(long)]
    no_topk: bool,
    /// Seed of the corpus, the initialisation and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory.
    #[arg(long, default_value = "train-out")]
    out: PathBuf,
    /// Run the tiny CPU-reference version even if a GPU is present.
    #[arg(long)]
    cpu: bool,
    /// Steps of the CPU-reference version.
    #[arg(long, default_value_t = 400)]
    cpu_steps: usize,
    /// Learning rate (Adam) of the CPU-reference version.
    #[arg(long, default_value_t = 3e-3)]
    cpu_lr: f64,
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    if !args.cpu {
        match Device::new_cuda(0) {
            Ok(dev) => return run_gpu(&args, &dev),
            Err(e) => {
                // candle's error carries a backtrace after its first line.
                let e = e.to_string();
                println!(
                    "no CUDA device ({}): training a tiny CPU version through the crate's CPU reference instead",
                    e.lines().next().unwrap_or("")
                )
            }
        }
    }
    run_cpu(&args)
}

// ---------------------------------------------------------------------------------------------
// The model

/// The router of the MoE layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Remoe,
    Topk,
}

struct Block {
    norm1: RmsNorm,
    qkv: Linear,
    proj: Linear,
    norm2: RmsNorm,
    moe: MoeLayer<bf16>,
}

struct Model {
    kind: Kind,
    embed: Embedding,
    pos: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: Linear,
    heads: usize,
    /// \[seq, seq\]: 0 on and below the diagonal, -inf above (causal).
    mask: Tensor,
}

/// What a forward gives besides the logits.
struct Forward {
    /// \[B, L, VOCAB\], f32.
    logits: Tensor,
    /// The balance losses of all layers, summed (scalar f32, in the graph).
    balance: Tensor,
    /// Mean over layers of the ReMoE layers' sparsity (scalar f32 on the device, not read back),
    /// when asked for.
    sparsity: Option<Tensor>,
    /// Each MoE layer's input (bf16 \[B*L, H\], detached), when asked for.
    moe_inputs: Vec<Tensor>,
}

/// A weight with the GPT-2 style initialisation N(0, std^2).
fn weight(
    vb: &VarBuilder,
    shape: (usize, usize),
    name: &str,
    std: f64,
) -> candle_core::Result<Tensor> {
    vb.get_with_hints(
        shape,
        name,
        Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )
}

/// The mask of causal attention over `seq` positions.
fn causal_mask(seq: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let m: Vec<f32> = (0..seq * seq)
        .map(|i| {
            if i % seq > i / seq {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(m, (seq, seq), dev)
}

/// Multi-head causal self-attention on the fused projections `qkv` \[B, L, 3H\]: \[B, L, H\].
fn causal_attention(qkv: &Tensor, heads: usize, mask: &Tensor) -> candle_core::Result<Tensor> {
    let (b, l, h3) = qkv.dims3()?;
    let (h, hd) = (h3 / 3, h3 / 3 / heads);
    // [3, B, heads, L, hd]
    let qkv = qkv
        .reshape((b, l, 3, heads, hd))?
        .permute((2, 0, 3, 1, 4))?;
    let q = qkv.get(0)?.contiguous()?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
    let mask = mask.narrow(0, 0, l)?.narrow(1, 0, l)?;
    // candle_nn's fused softmax_last_dim and RmsNorm::forward have no backward (a gradient would
    // silently stop there): the differentiable forms.
    let att = softmax(&att.broadcast_add(&mask)?, candle_core::D::Minus1)?;
    att.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))
}

/// 1 - (active pairs)/(T E) of a ReMoE layer with router `wr` \[H,E\] on inputs `x` \[T,H\]:
/// the gates ReLU(x Wr) > 0, with f32 logits from the bf16 operands as in the layer's kernel.
/// On detached tensors, so it adds nothing to the graph; the result stays on the device.
fn remoe_sparsity(x: &Tensor, wr: &Tensor) -> candle_core::Result<Tensor> {
    let logits = x.to_dtype(DType::F32)?.matmul(&wr.to_dtype(DType::F32)?)?;
    logits
        .gt(0.0)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .affine(-1.0, 1.0)
}

impl Model {
    fn new(
        args: &Args,
        kind: Kind,
        vb: &VarBuilder,
        vb16: &VarBuilder,
    ) -> candle_core::Result<Self> {
        let (h, dev) = (args.hidden, vb.device());
        // Residual projections scaled down with depth (GPT-2), so the stream's variance does
        // not grow with the number of blocks at initialisation.
        let proj_std = 0.02 / (2.0 * args.layers as f64).sqrt();
        let mut blocks = Vec::with_capacity(args.layers);
        for i in 0..args.layers {
            let b = vb.pp(format!("block{i}"));
            let moe_vb = vb16.pp(format!("block{i}.moe"));
            let moe = match kind {
                Kind::Remoe => {
                    let mut m = MoeLayer::remoe_with_controller(
                        moe_vb,
                        h,
                        args.ffn,
                        args.experts,
                        args.k,
                        args.lambda0,
                        args.alpha,
                    )?;
                    if let Some(lambda) = args.fixed_lambda {
                        m.set_fixed_coefficient(lambda);
                    }
                    m
                }
                Kind::Topk => {
                    MoeLayer::topk(moe_vb, h, args.ffn, args.experts, args.k, args.aux_coeff)?
                }
            };
            blocks.push(Block {
                norm1: candle_nn::rms_norm(h, 1e-5, b.pp("norm1"))?,
                qkv: Linear::new(weight(&b, (3 * h, h), "qkv", 0.02)?, None),
                proj: Linear::new(weight(&b, (h, h), "proj", proj_std)?, None),
                norm2: candle_nn::rms_norm(h, 1e-5, b.pp("norm2"))?,
                moe,
            });
        }
        Ok(Self {
            kind,
            embed: Embedding::new(weight(vb, (VOCAB, h), "embed", 0.02)?, h),
            pos: weight(vb, (args.seq, h), "pos", 0.02)?,
            blocks,
            norm: candle_nn::rms_norm(h, 1e-5, vb.pp("norm"))?,
            head: Linear::new(weight(vb, (VOCAB, h), "head", 0.02)?, None),
            heads: args.heads,
            mask: causal_mask(args.seq, dev)?,
        })
    }

    /// The forward on `ids` \[B, L\] (u32 bytes).
    fn forward(&self, ids: &Tensor, sparsity: bool, inputs: bool) -> candle_core::Result<Forward> {
        let (_, l) = ids.dims2()?;
        let mut x = self
            .embed
            .forward(ids)?
            .broadcast_add(&self.pos.narrow(0, 0, l)?)?;
        let mut balance = Vec::with_capacity(self.blocks.len());
        let mut sparsities = Vec::new();
        let mut moe_inputs = Vec::new();
        for b in &self.blocks {
            let qkv = b.qkv.forward(&b.norm1.forward_diff(&x)?)?;
            x = (&x
                + b.proj
                    .forward(&causal_attention(&qkv, self.heads, &self.mask)?)?)?;
            let hin = b.norm2.forward_diff(&x)?.to_dtype(DType::BF16)?;
            let y = b.moe.forward_with_loss(&hin)?;
            x = (&x + y.out.to_dtype(DType::F32)?)?;
            balance.push(y.balance_loss);
            let flat = || hin.detach().flatten_to(1);
            if sparsity && self.kind == Kind::Remoe {
                sparsities.push(remoe_sparsity(&flat()?, &b.moe.parameters()[0].detach())?);
            }
            if inputs {
                moe_inputs.push(flat()?);
            }
        }
        let logits = self.head.forward(&self.norm.forward_diff(&x)?)?;
        let n = sparsities.len();
        let sparsity = if n > 0 {
            Some((Tensor::stack(&sparsities, 0)?.sum_all()? / n as f64)?)
        } else {
            None
        };
        Ok(Forward {
            logits,
            balance: Tensor::stack(&balance, 0)?.sum_all()?,
            sparsity,
            moe_inputs,
        })
    }

    /// Moves every ReMoE layer's lambda (after the optimiser step).
    fn end_step(&self) -> candle_core::Result<()> {
        self.blocks.iter().try_for_each(|b| b.moe.end_step())
    }

    /// Mean over layers of lambda (ReMoE) or c (TopK); reads back from the device.
    fn mean_coefficient(&self) -> candle_core::Result<f64> {
        let mut s = 0.0;
        for b in &self.blocks {
            s += b.moe.coefficient()?;
        }
        Ok(s / self.blocks.len() as f64)
    }

    /// For each layer, the \[T, E\] routing mask of the inputs `xs` (from a forward's
    /// `moe_inputs`): ReLU(x Wr) > 0 for ReMoE, the k largest logits for TopK (softmax is
    /// monotone, so the largest logits are the largest probabilities).
    fn routing(&self, xs: &[Tensor], k: usize) -> candle_core::Result<Vec<Vec<Vec<bool>>>> {
        let mut out = Vec::with_capacity(xs.len());
        for (b, x) in self.blocks.iter().zip(xs) {
            let wr = b.moe.parameters()[0].to_dtype(DType::F32)?;
            let logits = x.to_dtype(DType::F32)?.matmul(&wr)?;
            let e = wr.dim(1)?;
            let mask = match self.kind {
                Kind::Remoe => logits
                    .gt(0.0)?
                    .to_vec2::<u8>()?
                    .into_iter()
                    .map(|r| r.into_iter().map(|v| v != 0).collect())
                    .collect(),
                Kind::Topk => logits
                    .arg_sort_last_dim(false)?
                    .narrow(1, 0, k)?
                    .to_vec2::<u32>()?
                    .into_iter()
                    .map(|top| {
                        let mut r = vec![false; e];
                        top.into_iter().for_each(|i| r[i as usize] = true);
                        r
                    })
                    .collect(),
            };
            out.push(mask);
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Training on the GPU

fn learning_rate(args: &Args, step: usize) -> f64 {
    if step < args.warmup {
        return args.lr * (step + 1) as f64 / args.warmup as f64;
    }
    let p = (step - args.warmup) as f64 / args.steps.saturating_sub(args.warmup).max(1) as f64;
    let min = 0.1 * args.lr;
    min + 0.5 * (args.lr - min) * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos())
}

fn upload(b: &Batch, args: &Args, dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let ids = Tensor::from_slice(&b.inputs, (args.batch, args.seq), dev)?;
    let tgt = Tensor::from_slice(&b.targets, args.batch * args.seq, dev)?;
    Ok((ids, tgt))
}

fn lm_loss(logits: &Tensor, tgt: &Tensor) -> candle_core::Result<Tensor> {
    cross_entropy(&logits.flatten_to(1)?, tgt)
}

/// One optimiser step; returns the LM loss, the balance loss and the sparsity (when measured),
/// still on the device.
fn train_step(
    model: &Model,
    opt: &mut AdamW,
    b: &Batch,
    args: &Args,
    dev: &Device,
    sparsity: bool,
) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
    let (ids, tgt) = upload(b, args, dev)?;
    let f = model.forward(&ids, sparsity, false)?;
    let lm = lm_loss(&f.logits, &tgt)?;
    // The balance losses join the objective with weight 1: their coefficients (lambda, c) are
    // the layers' own.
    opt.backward_step(&(&lm + &f.balance)?)?;
    model.end_step()?;
    Ok((lm.detach(), f.balance.detach(), f.sparsity))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The MoE layers' share of a training step's time: per timed step, a whole training step
/// (synchronised before and after), then the forward and backward of the MoE layers alone on
/// that step's layer inputs (each layer's output summed plus its balance loss, backpropagated;
/// synchronised). The share is the ratio of the medians. It leaves out the MoE parameters'
/// AdamW update and includes the small sum that stands in for the rest of the network.
fn moe_share(
    model: &Model,
    opt: &mut AdamW,
    train: &Corpus,
    args: &Args,
    dev: &Device,
    rng: &mut TestRng,
) -> candle_core::Result<(f64, String)> {
    let (mut full, mut moe) = (Vec::new(), Vec::new());
    const WARM: usize = 3;
    for rep in 0..args.timing_steps + WARM {
        let b = train.random_batch(rng, args.batch, args.seq);
        dev.synchronize()?;
        let t0 = Instant::now();
        let (ids, tgt) = upload(&b, args, dev)?;
        let f = model.forward(&ids, false, true)?;
        opt.backward_step(&(lm_loss(&f.logits, &tgt)? + &f.balance)?)?;
        model.end_step()?;
        dev.synchronize()?;
        let t_full = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        for (blk, x) in model.blocks.iter().zip(&f.moe_inputs) {
            let x = Var::from_tensor(x)?;
            let y = blk.moe.forward_with_loss(x.as_tensor())?;
            let l = (y.out.sum_all()?.to_dtype(DType::F32)? + y.balance_loss)?;
            l.backward()?;
        }
        dev.synchronize()?;
        if rep >= WARM {
            full.push(t_full);
            moe.push(t1.elapsed().as_secs_f64());
        }
    }
    let (f, m) = (median(full), median(moe));
    Ok((
        m / f,
        format!(
            "median of {} steps: MoE layers' forward+backward alone {:.2} ms / whole step {:.2} ms, both synchronised",
            args.timing_steps,
            1e3 * m,
            1e3 * f
        ),
    ))
}

/// Validation loss and affinity on the held-out batches.
fn evaluate(
    model: &Model,
    held: &[Batch],
    args: &Args,
    dev: &Device,
) -> candle_core::Result<(f64, Affinity)> {
    let mut aff = Affinity::new(args.layers, args.experts);
    let mut loss = 0.0;
    for b in held {
        let (ids, tgt) = upload(b, args, dev)?;
        let f = model.forward(&ids, false, true)?;
        loss += f64::from(lm_loss(&f.logits, &tgt)?.to_scalar::<f32>()?) / held.len() as f64;
        let masks = model.routing(&f.moe_inputs, args.k)?;
        for &d in &b.domains {
            aff.domain_tokens[d as usize] += 1;
        }
        for (l, mask) in masks.iter().enumerate() {
            for (row, &d) in mask.iter().zip(&b.domains) {
                for (e, &on) in row.iter().enumerate() {
                    if on {
                        aff.counts[l][e][d as usize] += 1;
                    }
                }
            }
        }
    }
    Ok((loss, aff))
}

fn train_gpu(
    args: &Args,
    dev: &Device,
    kind: Kind,
    train: &Corpus,
    held: &[Batch],
) -> Result<RunLog, Error> {
    let name = match kind {
        Kind::Remoe => "ReMoE",
        Kind::Topk => "TopK",
    };
    // The same seed for both runs: the same initial weights (created in the same order) and
    // the same batches.
    dev.set_seed(args.seed)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let vb16 = VarBuilder::from_varmap(&varmap, DType::BF16, dev);
    let model = Model::new(args, kind, &vb, &vb16)?;
    let params = ParamsAdamW {
        lr: args.lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut opt = AdamW::new(varmap.all_vars(), params)?;
    let mut rng = seeded(args.seed ^ 0xba7c);
    let tokens_per_step = args.batch * args.seq;

    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(ProgressStyle::with_template(
        "{prefix:>6} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
    )?);
    bar.set_prefix(name);
    let mut steps = Vec::with_capacity(args.steps);
    let mut last_sparsity = f64::NAN;
    let start = Instant::now();
    for step in 0..args.steps {
        let lr = learning_rate(args, step);
        opt.set_learning_rate(lr);
        let b = train.random_batch(&mut rng, args.batch, args.seq);
        let t0 = Instant::now();
        let measure = step % args.stats_every.max(1) == 0;
        let (lm, bal, sp) = train_step(&model, &mut opt, &b, args, dev, measure)?;
        // These reads wait for the step; the layer's backward already waits once per layer
        // (it reads the balance loss's incoming gradient), so they add little.
        let lm = f64::from(lm.to_scalar::<f32>()?);
        let reg = f64::from(bal.to_scalar::<f32>()?);
        let sparsity = sp
            .map(|s| s.to_scalar::<f32>().map(f64::from))
            .transpose()?;
        let lambda = model.mean_coefficient()?;
        let dt = t0.elapsed().as_secs_f64();
        if let Some(s) = sparsity {
            last_sparsity = s;
        }
        let tps = tokens_per_step as f64 / dt;
        bar.set_message(match kind {
            Kind::Remoe => format!(
                "loss {lm:.3} sparsity {last_sparsity:.3} lambda {lambda:.2e} {:.0}k tok/s",
                tps / 1e3
            ),
            Kind::Topk => format!("loss {lm:.3} aux {reg:.2e} {:.0}k tok/s", tps / 1e3),
        });
        bar.inc(1);
        steps.push(StepLog {
            step,
            lr,
            lm_loss: lm,
            reg_loss: reg,
            sparsity,
            lambda,
            tokens_per_s: tps,
        });
        if !lm.is_finite() {
            bar.abandon();
            return Err(format!("{name}: the loss is {lm} at step {step}").into());
        }
    }
    let wall_s = start.elapsed().as_secs_f64();
    bar.finish();
    let (val_loss, affinity) = evaluate(&model, held, args, dev)?;
    let share = if args.timing_steps > 0 {
        Some(moe_share(&model, &mut opt, train, args, dev, &mut rng)?)
    } else {
        None
    };
    Ok(RunLog {
        name: name.into(),
        steps,
        val_loss,
        wall_s,
        tokens: tokens_per_step * args.steps,
        affinity,
        moe_share: share,
    })
}

fn run_gpu(args: &Args, dev: &Device) -> Result<(), Error> {
    if !args.hidden.is_multiple_of(args.heads)
        || !args.hidden.is_multiple_of(8)
        || !args.ffn.is_multiple_of(8)
    {
        return Err("--hidden must be a multiple of 8 and of --heads, --ffn of 8".into());
    }
    let tokens = args.steps * args.batch * args.seq;
    // Enough text that the run sees each byte about once (at least 4 MiB): the domains'
    // generators have far more variety than that, so this is not memorisation.
    let train = Corpus::generate(args.seed, tokens.max(4 << 20));
    let held_bytes = (args.val_batches * args.batch * args.seq + 1).max(1 << 16);
    let held_corpus = Corpus::generate(args.seed.wrapping_add(0x4e1d), held_bytes);
    let held = held_corpus.sequential_batches(args.batch, args.seq, args.val_batches);
    let target = 1.0 - args.k as f64 / args.experts as f64;
    println!(
        "GPU run: {} blocks, H {}, {} heads, E {} x F {}, k {}; {} steps of {} x {} bytes ({} tokens); corpus {:.1} MiB of {} domains",
        args.layers, args.hidden, args.heads, args.experts, args.ffn, args.k, args.steps,
        args.batch, args.seq, args.batch * args.seq,
        train.bytes.len() as f64 / (1 << 20) as f64, DOMAINS.len()
    );
    print_domains(&train);
    let total = Instant::now();
    let remoe = train_gpu(args, dev, Kind::Remoe, &train, &held)?;
    report::summarise(&remoe, Some(target));
    let topk = if args.no_topk {
        None
    } else {
        let t = train_gpu(args, dev, Kind::Topk, &train, &held)?;
        report::summarise(&t, None);
        Some(t)
    };
    if let Some(t) = &topk {
        println!(
            "validation loss: ReMoE {:.4}, TopK {:.4} ({:+.4})",
            remoe.val_loss,
            t.val_loss,
            remoe.val_loss - t.val_loss
        );
    }
    println!("total wall time {:.1} s", total.elapsed().as_secs_f64());
    let config = json!({
        "device": "cuda:0", "steps": args.steps, "batch": args.batch, "seq": args.seq,
        "layers": args.layers, "hidden": args.hidden, "heads": args.heads, "ffn": args.ffn,
        "experts": args.experts, "k": args.k, "lr": args.lr, "warmup": args.warmup,
        "aux_coeff": args.aux_coeff, "seed": args.seed, "domains": DOMAINS,
        "lambda0": 1e-8, "alpha": 1.2,
        "precision": "MoE parameters and activations bf16; all else f32",
    });
    report::write_all(&args.out, config, &remoe, topk.as_ref(), target)
}

/// The training corpus's share of bytes per domain.
fn print_domains(c: &Corpus) {
    let shares: Vec<String> = c
        .domain_counts()
        .iter()
        .zip(DOMAINS)
        .map(|(&n, d)| format!("{d} {:.1}%", 100.0 * n as f64 / c.bytes.len() as f64))
        .collect();
    println!("corpus bytes by domain: {}", shares.join(", "));
}

// ---------------------------------------------------------------------------------------------
// Without a GPU

fn run_cpu(args: &Args) -> Result<(), Error> {
    let s = cpu::CpuSizes {
        steps: args.cpu_steps,
        batch: 8,
        seq: 32,
        hidden: 32,
        ffn: 32,
        experts: args.experts,
        k: args.k,
        lr: args.cpu_lr,
        seed: args.seed,
    };
    println!(
        "CPU reference run (tiny, not the GPU experiment): byte embedding -> one MoE layer (H {}, F {}, E {}, k {}) -> LM head, {} steps of {} tokens",
        s.hidden, s.ffn, s.experts, s.k, s.steps, s.batch * s.seq
    );
    let train = Corpus::generate(args.seed, 1 << 20);
    let held = Corpus::generate(args.seed.wrapping_add(0x4e1d), 1 << 14);
    print_domains(&train);
    let target = 1.0 - s.k as f64 / s.experts as f64;
    let remoe = cpu::train(&s, true, &train, &held);
    report::summarise(&remoe, Some(target));
    let topk = (!args.no_topk).then(|| cpu::train(&s, false, &train, &held));
    if let Some(t) = &topk {
        report::summarise(t, None);
        println!(
            "validation loss: ReMoE {:.4}, TopK {:.4}",
            remoe.val_loss, t.val_loss
        );
    }
    let config = json!({
        "device": "cpu (crate reference, tiny)", "steps": s.steps, "batch": s.batch,
        "seq": s.seq, "hidden": s.hidden, "ffn": s.ffn, "experts": s.experts, "k": s.k,
        "lr": s.lr, "aux_coeff": cpu::AUX_COEFF, "seed": s.seed, "domains": DOMAINS,
        "lambda0": 1e-8, "alpha": 1.2,
    });
    report::write_all(&args.out, config, &remoe, topk.as_ref(), target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_is_causal_and_keeps_shapes() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, l, h, heads) = (2, 5, 8, 2);
        let mask = causal_mask(l, &dev)?;
        let qkv = Tensor::randn(0f32, 1.0, (b, l, 3 * h), &dev)?;
        let y = causal_attention(&qkv, heads, &mask)?;
        assert_eq!(y.dims(), &[b, l, h]);
        // Changing the last position changes no earlier output.
        let last = Tensor::randn(0f32, 1.0, (b, 1, 3 * h), &dev)?;
        let qkv2 = Tensor::cat(&[&qkv.narrow(1, 0, l - 1)?, &last], 1)?;
        let y2 = causal_attention(&qkv2, heads, &mask)?;
        let diff = (y.narrow(1, 0, l - 1)? - y2.narrow(1, 0, l - 1)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        // Position 0 attends to itself only: its output is its own value vector.
        let v0 = qkv.narrow(2, 2 * h, h)?.narrow(1, 0, 1)?;
        let d0 = (y.narrow(1, 0, 1)? - v0)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d0 < 1e-6);
        Ok(())
    }

    #[test]
    fn learning_rate_warms_up_then_decays_to_a_tenth() {
        let args = Args::parse_from(["train", "--steps", "100", "--warmup", "10", "--lr", "1e-3"]);
        assert!((learning_rate(&args, 0) - 1e-4).abs() < 1e-12);
        assert!((learning_rate(&args, 9) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(&args, 99) - 1e-4).abs() < 2e-6);
    }
}
