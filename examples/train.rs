//! The main job: a byte-level decoder-only transformer in candle whose MLPs are ReMoE layers
//! (the crate's `candle::MoeLayer`), trained on real text of distinct domains found on the
//! machine (examples/train/data.rs; the generated five-domain corpus of examples/train/corpus.rs
//! where too little is found), then the same model with TopK layers for the validation-loss
//! comparison.
//!
//! Defaults: the paper's 182M shape (H 768, 12 layers, 12 heads, E 8 experts of F 3072, k 1; 16
//! sequences of 1024 bytes per optimiser step), ReMoE for about five minutes of training
//! (`--minutes`, or `--steps`), then TopK for the same number of steps with the same learning
//! rates (the same tokens, as the paper compares). Micro-batches with gradient accumulation keep
//! the step within the device's memory (`--micro-batch`).
//!
//! It shows a progress bar (loss, sparsity, lambda, tokens/s) and writes to `--out`:
//! - `log.json`: every flag's value and the settings derived from them (micro-batch, corpus,
//!   device), and per run every step's LM loss, regulariser, sparsity, lambda, learning rate,
//!   gradient norm, device memory and tokens/s; the validation loss overall and per domain, wall
//!   time, tokens/s, the MoE layers' share of the step time, the expert-domain affinity and the
//!   active experts per token by domain, the reference checks, the samples; with `--seeds`, the
//!   validation comparison over seeds (mean and spread);
//! - `training.png`: sparsity, lambda, regulariser and LM loss per step (the paper's Figures 3
//!   and 4; its three stages: dense while lambda is tiny, sparsifying as the controller raises
//!   lambda exponentially, then sparsity held at 1 - k/E);
//! - `affinity.txt`: per layer and expert, the share of its routed held-out tokens from each
//!   domain (the paper's Table 12), and per layer the active experts per token by domain.
//!
//! `--save DIR` writes each run's parameters (`remoe.safetensors`, `topk.safetensors`) with a
//! JSON sidecar (step, training seconds, the model's lambda, the step history); `--resume DIR`
//! continues from them; `--prompt TEXT` samples from the trained models (with
//! `--resume DIR --steps 0`, from the checkpoint alone).
//!
//! The MoE layers (`remoe_kernels::candle`): one `MoeConfig` for all of them, one
//! `SharedRouting` per model (ReMoE's one adaptive lambda, stepped once per optimiser step after
//! every micro-batch's backward; training forwards off around evaluation and sampling), the
//! layer as a plain `Module` whose backward adds the balance regulariser's gradient (the loss
//! is the LM loss alone; the regulariser's value is logged from `routing_stats()`), and the
//! layers' device error words read once per step.
//!
//! Precision: every parameter has an f32 master (the MoE layers' too, at the checkpoint names
//! of Mixtral: `block{i}.moe.gate.weight`, `block{i}.moe.experts.{j}.w1/w3/w2.weight`), and the
//! AdamW state is f32. The MoE layers compute in bf16 (each forward stacks and casts their
//! weights; the gradients come back through that cast, rounded to bf16); everything else
//! (embeddings, attention, norms, LM head, loss) computes in f32, its matmuls on TF32 tensor
//! cores unless `--no-tf32`; the activations are cast to bf16 into each MoE layer and back to
//! f32 after it (candle differentiates through both casts).
//!
//! Without a CUDA device it says so and trains a tiny version through the crate's CPU reference
//! (examples/train/cpu.rs): one MoE layer, a few hundred steps, the same outputs. `--candle-cpu`
//! runs this job itself on candle's CPU backend (the MoE layers through the crate's reference),
//! a smoke test at tiny sizes. It builds with the `candle` feature alone (no CUDA in candle:
//! the CPU paths only); the GPU run needs `candle-cuda`, which scripts/train builds:
//!
//!   scripts/train --out train-out

#[path = "train/corpus.rs"]
mod corpus;
#[path = "train/cpu.rs"]
mod cpu;
#[path = "train/data.rs"]
mod data;
#[path = "train/report.rs"]
mod report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{
    loss::cross_entropy, ops::softmax, AdamW, Embedding, Init, Linear, Optimizer, ParamsAdamW,
    RmsNorm, VarBuilder, VarMap,
};
use clap::Parser;
use half::bf16;
use indicatif::{ProgressBar, ProgressStyle};
use remoe_testkit::rng::{seeded, Rng};
use serde_json::{json, Value};

use corpus::{Batch, Corpus};
use report::{Affinity, RunLog, StepLog};

type Error = Box<dyn std::error::Error>;

/// Byte-level tokens.
const VOCAB: usize = 256;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Train a ReMoE transformer (and its TopK twin) on real text by domain, at the paper's 182M shape by default"
)]
struct Args {
    /// Training budget of each run in minutes of wall time (the ReMoE run; TopK then trains for
    /// the same number of steps). Ignored when --steps is given.
    #[arg(long, default_value_t = 5.0)]
    minutes: f64,
    /// Optimiser steps per run instead of a time budget (with --resume: the total, counting
    /// the checkpoint's steps).
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per optimiser step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Sequences per forward (gradients accumulate over --batch / --micro-batch forwards; a
    /// divisor of --batch). Default: the largest divisor of --batch whose estimated peak memory
    /// is at most 60% of the device's (see `memory_estimate`).
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Context length (bytes).
    #[arg(long, default_value_t = 1024)]
    seq: usize,
    /// Transformer blocks (each with one MoE layer).
    #[arg(long, default_value_t = 12)]
    layers: usize,
    /// Hidden size H (a multiple of 8 and of --heads).
    #[arg(long, default_value_t = 768)]
    hidden: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 12)]
    heads: usize,
    /// Each expert's SwiGLU inner size F (a multiple of 8).
    #[arg(long, default_value_t = 3072)]
    ffn: usize,
    /// Experts E.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Active experts k (the target mean for ReMoE).
    #[arg(long, default_value_t = 1)]
    k: usize,
    /// Peak learning rate (AdamW; ReMoE's Megatron configurations use 5e-4).
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// The learning rate's floor, as a fraction of --lr (cosine decay to it).
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    /// Linear warm-up steps of the learning rate (then cosine decay over the budget).
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// TopK's aux-loss coefficient (the paper's TopK runs use 1e-2).
    #[arg(long, default_value_t = 1e-2)]
    aux_coeff: f64,
    /// Log the sparsity every this many steps (1: every step). The MoE layers' routing
    /// statistics are read every step all the same (E + 3 words per layer: the regulariser's
    /// value is logged every step).
    #[arg(long, default_value_t = 1)]
    stats_every: usize,
    /// Held-out bytes per domain (whole files, none of them trained on).
    #[arg(long, default_value_t = 64 << 10)]
    val_bytes: usize,
    /// Most training bytes per real-text domain.
    #[arg(long, default_value_t = 8 << 20)]
    domain_bytes: usize,
    /// The corpus: `auto` (real text if at least three domains are found, else generated),
    /// `real` (fail if too few domains), `generated`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "real", "generated"])]
    corpus: String,
    /// A directory of text forming one domain, named by its basename (repeatable; replaces the
    /// domains found on the machine).
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Seed of the file order and the held-out split (kept fixed across --seeds).
    #[arg(long, default_value_t = 0)]
    data_seed: u64,
    /// Steps timed (after training) for the MoE layers' share of the step time.
    #[arg(long, default_value_t = 10)]
    timing_steps: usize,
    /// Steps of the ReMoE run whose first layer is checked against the crate's CPU reference
    /// (16 tokens, f64), comma-separated; step 0 is in the dense stage.
    #[arg(long, value_delimiter = ',', default_value = "0,40")]
    check_steps: Vec<usize>,
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
    /// Seed of the initialisation and the batch order (the generated corpus too).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train the ReMoE/TopK pair with this many seeds (--seed, --seed + 1, ...) for the
    /// validation comparison (mean and spread). See --seed-minutes.
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// Budget of each run of the seed comparison; without it (and --seed-steps) the comparison
    /// runs at the main budget and the main pair is its first seed.
    #[arg(long)]
    seed_minutes: Option<f64>,
    /// Steps of each run of the seed comparison (instead of --seed-minutes).
    #[arg(long)]
    seed_steps: Option<usize>,
    /// Output directory.
    #[arg(long, default_value = "train-out")]
    out: PathBuf,
    /// Save each run's checkpoint to this directory after training.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Resume each run from the checkpoint in this directory (the optimiser's moments are not
    /// saved: AdamW restarts, with the learning rate re-warmed over --warmup steps).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Sample from each trained model after this prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// Bytes to sample after the prompt.
    #[arg(long, default_value_t = 256)]
    sample_bytes: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Bracket ReMoE's training step N (counted from 0) with the CUDA profiler's start and stop,
    /// so that a profiler started with collection off (`ncu --profile-from-start off`, `nsys
    /// profile -c cudaProfilerApi`) sees that one step's kernels and nothing else
    /// (scripts/run-train.sh's `profile` phase). Synchronised before and after.
    #[arg(long)]
    profile_step: Option<usize>,
    /// Run f32 matmuls in full f32 instead of TF32.
    #[arg(long)]
    no_tf32: bool,
    /// Run the tiny CPU-reference version even if a GPU is present.
    #[arg(long)]
    cpu: bool,
    /// Run the candle job itself on candle's CPU backend (the MoE layer through the crate's
    /// reference): a smoke test of every path of the job at tiny sizes, not an experiment.
    #[arg(long)]
    candle_cpu: bool,
    /// Steps of the CPU-reference version.
    #[arg(long, default_value_t = 400)]
    cpu_steps: usize,
    /// Learning rate (Adam) of the CPU-reference version.
    #[arg(long, default_value_t = 3e-3)]
    cpu_lr: f64,
}

impl Args {
    /// Every flag's value, as given or defaulted.
    fn to_json(&self) -> Value {
        let pairs: [(&str, Value); 47] = [
            ("minutes", json!(self.minutes)),
            ("steps", json!(self.steps)),
            ("batch", json!(self.batch)),
            ("micro_batch", json!(self.micro_batch)),
            ("seq", json!(self.seq)),
            ("layers", json!(self.layers)),
            ("hidden", json!(self.hidden)),
            ("heads", json!(self.heads)),
            ("ffn", json!(self.ffn)),
            ("experts", json!(self.experts)),
            ("k", json!(self.k)),
            ("lr", json!(self.lr)),
            ("min_lr_ratio", json!(self.min_lr_ratio)),
            ("warmup", json!(self.warmup)),
            ("weight_decay", json!(self.weight_decay)),
            ("clip", json!(self.clip)),
            ("aux_coeff", json!(self.aux_coeff)),
            ("stats_every", json!(self.stats_every)),
            ("val_bytes", json!(self.val_bytes)),
            ("domain_bytes", json!(self.domain_bytes)),
            ("corpus", json!(self.corpus)),
            ("data", json!(self.data)),
            ("data_seed", json!(self.data_seed)),
            ("timing_steps", json!(self.timing_steps)),
            ("check_steps", json!(self.check_steps)),
            ("lambda0", json!(self.lambda0)),
            ("alpha", json!(self.alpha)),
            ("fixed_lambda", json!(self.fixed_lambda)),
            ("no_topk", json!(self.no_topk)),
            ("seed", json!(self.seed)),
            ("seeds", json!(self.seeds)),
            ("seed_minutes", json!(self.seed_minutes)),
            ("seed_steps", json!(self.seed_steps)),
            ("out", json!(self.out)),
            ("save", json!(self.save)),
            ("resume", json!(self.resume)),
            ("prompt", json!(self.prompt)),
            ("sample_bytes", json!(self.sample_bytes)),
            ("temperature", json!(self.temperature)),
            ("profile_step", json!(self.profile_step)),
            ("no_tf32", json!(self.no_tf32)),
            ("cpu", json!(self.cpu)),
            ("candle_cpu", json!(self.candle_cpu)),
            ("cpu_steps", json!(self.cpu_steps)),
            ("cpu_lr", json!(self.cpu_lr)),
            ("micro_batch_default", json!("auto: see memory_estimate")),
            ("parsed_from", json!(std::env::args().collect::<Vec<_>>())),
        ];
        Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    fn validate(&self) -> Result<(), Error> {
        if self.hidden == 0 || !self.hidden.is_multiple_of(self.heads.max(1)) {
            return Err("--hidden must be a positive multiple of --heads".into());
        }
        if !self.hidden.is_multiple_of(8) || !self.ffn.is_multiple_of(8) {
            return Err("--hidden and --ffn must be multiples of 8 (the layer's kernels)".into());
        }
        if self.k == 0 || self.k > self.experts {
            return Err("--k must be from 1 to --experts".into());
        }
        if self.batch == 0 || self.seq == 0 || self.layers == 0 {
            return Err("--batch, --seq and --layers must be positive".into());
        }
        if let Some(m) = self.micro_batch {
            if m == 0 || !self.batch.is_multiple_of(m) {
                return Err("--micro-batch must divide --batch".into());
            }
        }
        if !(self.lambda0 > 0.0 && self.alpha > 1.0) {
            return Err("--lambda0 must be positive and --alpha above 1".into());
        }
        if self.seeds == 0 {
            return Err("--seeds must be at least 1".into());
        }
        if let (Some(p), Some(n)) = (self.profile_step, self.steps) {
            if p >= n {
                return Err(format!("--profile-step {p} is past the last of --steps {n}").into());
            }
        }
        Ok(())
    }
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    args.validate()?;
    if args.candle_cpu {
        return run_candle(&args, &Device::Cpu);
    }
    if !args.cpu {
        match Device::new_cuda(0) {
            Ok(dev) => return run_candle(&args, &dev),
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
// The MoE layer. Every use of `remoe_kernels::candle` is in this section and in `Model`: the
// layers' configuration (`moe_config`), the model's one `SharedRouting` (made in `Model::new`,
// stepped once per optimiser step in `Trainer::step`, training off around evaluation and
// sampling), the layer (`Moe::new`, `Moe::forward`), its routing statistics
// (`MoeLayer::routing_stats`, read in `Model::forward`), and the weights behind the routing
// masks of the affinity table (`Moe::routing_mask`) and the reference check
// (`Moe::reference_check`).

use remoe_kernels::candle::{Lambda, MoeConfig, MoeLayer, MoeRouter, RoutingStats, SharedRouting};
use remoe_kernels::HostMoeWeights;

/// The router of the MoE layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Remoe,
    Topk,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Remoe => "ReMoE",
            Kind::Topk => "TopK",
        }
    }

    /// The checkpoint files' stem.
    fn file(self) -> &'static str {
        match self {
            Kind::Remoe => "remoe",
            Kind::Topk => "topk",
        }
    }
}

/// Every MoE layer's configuration: ReMoE with the adaptive lambda starting at `lambda0` (the
/// checkpoint's lambda on resume) and stepping by --alpha, or lambda fixed at --fixed-lambda;
/// TopK as the paper's baseline (softmax top-k, gates not renormalised, the Switch aux loss at
/// --aux-coeff). Mixtral's parameter names (`gate.weight`, `experts.{j}.w1/w3/w2.weight`).
fn moe_config(args: &Args, kind: Kind, lambda0: f64) -> MoeConfig {
    let router = match kind {
        Kind::Remoe => MoeRouter::Relu {
            lambda: match args.fixed_lambda {
                Some(c) => Lambda::Fixed(c),
                None => Lambda::Adaptive {
                    lambda0,
                    alpha: args.alpha,
                },
            },
        },
        Kind::Topk => MoeRouter::TopK {
            renormalize: false,
            aux_coeff: args.aux_coeff,
        },
    };
    MoeConfig {
        router,
        ..MoeConfig::remoe(args.hidden, args.ffn, args.experts, args.k)
    }
}

/// One MoE layer of the model.
struct Moe {
    layer: MoeLayer<bf16>,
    /// The router's master weight \[E, H\] (f32, the VarMap's `Var`), for the routing masks.
    router: Tensor,
    kind: Kind,
    k: usize,
}

/// The largest |GPU - reference| over the largest |reference| of a layer's output on a few
/// tokens, and the sparsity of those tokens' routing.
struct RefCheck {
    rel_err: f64,
    tokens: usize,
    sparsity: f64,
}

impl Moe {
    /// A layer of `cfg` sharing `routing`, with f32 master parameters from `vb` (the layer's
    /// prefix), computed in bf16.
    fn new(
        cfg: &MoeConfig,
        routing: &SharedRouting,
        kind: Kind,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let layer = MoeLayer::new(cfg, routing, vb.clone())?;
        // The same Var the layer holds (the VarMap returns it by name).
        let router = vb
            .pp("gate")
            .get((cfg.experts, cfg.hidden_size), "weight")?;
        Ok(Self {
            layer,
            router,
            kind,
            k: cfg.experts_per_token,
        })
    }

    /// What every forward of the layer does to its parameters before its kernels run
    /// (`MoeLayer::compute_weights`: the router and the experts' \[out, in\] f32 masters
    /// transposed into the kernels' stacked layout and cast to bf16). The four staged tensors are
    /// returned as they are: candle's `backward` seeds each with a contiguous tensor of ones of
    /// its shape and dtype, which stands in for the gradient the kernels' backward writes, so the
    /// timed backward is the layer's own (the staging in reverse, to every master `Var`). At
    /// 1792342 the tensors were cast to f32 and summed to one scalar instead: that reduction and
    /// its backward cost more than the staging itself, 272.9 ms against 149.2 ms for the MoE
    /// layers whole (H200).
    fn stage_weights(&self) -> candle_core::Result<[Tensor; 4]> {
        self.layer.compute_weights()
    }

    /// The layer on `x` \[.., H\] (bf16): x's shape and dtype. The balance regulariser trains
    /// through its backward; its value is in the routing statistics.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.layer.forward(x)
    }

    /// The routing statistics of the layer's last forward (on CUDA a host read: E + 3 words).
    fn stats(&self) -> candle_core::Result<RoutingStats> {
        self.layer
            .routing_stats()?
            .ok_or_else(|| candle_core::Error::Msg("remoe: no forward ran".into()))
    }

    /// The routing mask \[T, E\] (u8, 1: routed) of detached inputs `x` \[T, H\]: ReLU(x Wr) > 0
    /// for ReMoE, the k largest logits for TopK (softmax is monotone), with f32 logits from the
    /// bf16 operands as in the layer's kernel. One extra \[T,H\] x \[H,E\] matmul per call: the
    /// affinity table needs each token's routing (a held-out batch mixes domains), and the
    /// layer's statistics count pairs per expert over the whole batch, not per token.
    fn routing_mask(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let wr = self
            .router
            .detach()
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?
            .t()?;
        let logits = x.to_dtype(DType::F32)?.matmul(&wr)?;
        match self.kind {
            Kind::Remoe => logits.gt(0.0),
            Kind::Topk => {
                let (sorted, _) = logits.sort_last_dim(false)?;
                let kth = sorted.narrow(1, self.k - 1, 1)?;
                logits.broadcast_ge(&kth)
            }
        }
    }

    /// The weights the layer computes with (bf16, the crate's layout), copied to the host.
    fn host_weights(&self) -> candle_core::Result<HostMoeWeights<bf16>> {
        self.layer.host_weights()
    }

    /// The layer's output `out` \[T, H\] on `x` \[T, H\] against the crate's CPU reference in f64
    /// from the same bf16 inputs and the weights `w` the forward used (taken before the
    /// optimiser step): an independent check of the GPU forward, in particular in the dense
    /// stage where the most pairs are routed.
    fn reference_check(
        &self,
        w: &HostMoeWeights<bf16>,
        x: &Tensor,
        out: &Tensor,
    ) -> candle_core::Result<RefCheck> {
        use remoe_kernels::reference::{remoe_forward, topk_forward, LayerParams};
        let host = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
        let (h, f, e) = (w.hidden(), w.ffn(), w.experts());
        let wide = |v: &[bf16]| v.iter().map(|x| x.to_f64()).collect::<Vec<f64>>();
        let p = w.params();
        let params = LayerParams {
            router: wide(&p.router),
            gate: wide(&p.gate),
            up: wide(&p.up),
            down: wide(&p.down),
        };
        let t = x.dim(0)?;
        let xs = host(x)?;
        let cfg = remoe_kernels::LayerConfig::new(t, h, f, e, self.k);
        let (want, sparsity) = match self.kind {
            Kind::Remoe => {
                let r = remoe_forward(&xs, &params, &cfg, 0.0);
                let s = r.routing.sparsity();
                (r.out, s)
            }
            Kind::Topk => (
                topk_forward(&xs, &params, &cfg, 0.0).out,
                1.0 - self.k as f64 / e as f64,
            ),
        };
        let got = host(out)?;
        let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs())).max(1e-30);
        let err = got
            .iter()
            .zip(&want)
            .fold(0.0f64, |a, (g, w)| a.max((g - w).abs()));
        Ok(RefCheck {
            rel_err: err / scale,
            tokens: t,
            sparsity,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The model

struct Block {
    norm1: RmsNorm,
    qkv: Linear,
    proj: Linear,
    norm2: RmsNorm,
    moe: Moe,
}

struct Model {
    kind: Kind,
    /// What every MoE layer shares: the one adaptive lambda (ReMoE), the training flag.
    routing: SharedRouting,
    embed: Embedding,
    pos: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: Linear,
    heads: usize,
    /// \[seq, seq\]: 0 on and below the diagonal, -inf above (causal).
    mask: Tensor,
}

/// What a forward is asked for besides the logits.
#[derive(Debug, Clone, Copy, Default)]
struct Want {
    /// Each layer's routing statistics (host reads, once the whole forward is queued).
    stats: bool,
    /// Each layer's routing mask.
    masks: bool,
    /// Each layer's input.
    inputs: bool,
    /// The first layer's input and output on this many tokens (0: none).
    probe: usize,
    /// Synchronise after each phase of the step and time it (`StepOut::phases`).
    phases: bool,
}

/// What a forward gives.
struct Forward {
    /// \[B, L, VOCAB\], f32.
    logits: Tensor,
    /// Each layer's routing statistics (sparsity, balance loss, tokens per expert).
    stats: Vec<RoutingStats>,
    /// Each layer's routing mask \[T, E\] u8.
    masks: Vec<Tensor>,
    /// Each MoE layer's input (bf16 \[B*L, H\], detached).
    moe_inputs: Vec<Tensor>,
    /// The first MoE layer's input and output on the first tokens (bf16, detached).
    probe: Option<(Tensor, Tensor)>,
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
/// The graph keeps four \[B, heads, L, L\] f32 tensors of it (the scores, the masked scores,
/// and softmax's shifted and exponentiated scores; see `memory_estimate`).
fn causal_attention(qkv: &Tensor, heads: usize, mask: &Tensor) -> candle_core::Result<Tensor> {
    let (b, l, h3) = qkv.dims3()?;
    let (h, hd) = (h3 / 3, h3 / 3 / heads);
    // [3, B, heads, L, hd]
    let qkv = qkv
        .reshape((b, l, 3, heads, hd))?
        .permute((2, 0, 3, 1, 4))?;
    // The scale on q (an [L, hd] tensor) rather than on the scores ([L, L]): one score-sized
    // tensor less in the graph.
    let q = (qkv.get(0)? * (1.0 / (hd as f64).sqrt()))?.contiguous()?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let att = q.matmul(&k.t()?)?;
    let mask = mask.narrow(0, 0, l)?.narrow(1, 0, l)?;
    // candle_nn's fused softmax_last_dim and RmsNorm::forward have no backward (a gradient would
    // silently stop there): the differentiable forms.
    let att = softmax(&att.broadcast_add(&mask)?, D::Minus1)?;
    att.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))
}

impl Model {
    /// The model with f32 parameters from `vb` and one `SharedRouting` for its MoE layers
    /// (ReMoE's lambda starting at `lambda0`).
    fn new(args: &Args, kind: Kind, vb: &VarBuilder, lambda0: f64) -> candle_core::Result<Self> {
        let (h, dev) = (args.hidden, vb.device());
        let cfg = moe_config(args, kind, lambda0);
        let routing = SharedRouting::new(&cfg, dev)?;
        // Residual projections scaled down with depth (GPT-2), so the stream's variance does
        // not grow with the number of blocks at initialisation.
        let proj_std = 0.02 / (2.0 * args.layers as f64).sqrt();
        let mut blocks = Vec::with_capacity(args.layers);
        for i in 0..args.layers {
            let b = vb.pp(format!("block{i}"));
            let moe = Moe::new(&cfg, &routing, kind, b.pp("moe"))?;
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
            routing,
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
    fn forward(&self, ids: &Tensor, want: Want) -> candle_core::Result<Forward> {
        let (_, l) = ids.dims2()?;
        let mut x = self
            .embed
            .forward(ids)?
            .broadcast_add(&self.pos.narrow(0, 0, l)?)?;
        let mut f = Forward {
            logits: Tensor::zeros((), DType::F32, ids.device())?,
            stats: Vec::new(),
            masks: Vec::new(),
            moe_inputs: Vec::new(),
            probe: None,
        };
        for (i, b) in self.blocks.iter().enumerate() {
            let qkv = b.qkv.forward(&b.norm1.forward_diff(&x)?)?;
            x = (&x
                + b.proj
                    .forward(&causal_attention(&qkv, self.heads, &self.mask)?)?)?;
            let hin = b.norm2.forward_diff(&x)?.to_dtype(DType::BF16)?;
            let y = b.moe.forward(&hin)?;
            x = (&x + y.to_dtype(DType::F32)?)?;
            let flat = || hin.detach().flatten_to(1);
            if want.masks {
                f.masks.push(b.moe.routing_mask(&flat()?)?);
            }
            if want.inputs {
                f.moe_inputs.push(flat()?);
            }
            if i == 0 && want.probe > 0 {
                let n = want.probe.min(hin.elem_count() / hin.dim(D::Minus1)?);
                f.probe = Some((
                    flat()?.narrow(0, 0, n)?,
                    y.detach().flatten_to(1)?.narrow(0, 0, n)?,
                ));
            }
        }
        f.logits = self.head.forward(&self.norm.forward_diff(&x)?)?;
        if want.stats {
            // Each layer's last forward is this one's; read once everything is queued.
            f.stats = self
                .blocks
                .iter()
                .map(|b| b.moe.stats())
                .collect::<candle_core::Result<_>>()?;
        }
        Ok(f)
    }

    /// The end of an optimiser step, after every micro-batch's backward: the shared lambda
    /// moves once, on the mean sparsity of the step's training forwards (all layers and
    /// micro-batches), then every layer's device error words are read (a NaN or infinite router
    /// logit, a pair capacity exceeded: the run fails on one; waits for the stream).
    fn end_step(&self) -> candle_core::Result<()> {
        self.routing.step()?;
        self.check_device_errors()
    }

    /// What the device found in the MoE layers' forwards since the last check.
    fn check_device_errors(&self) -> candle_core::Result<()> {
        self.blocks
            .iter()
            .try_for_each(|b| b.moe.layer.check_device_errors())
    }

    /// lambda (ReMoE; read back from the device) or c (TopK): one for all layers.
    fn coefficient(&self) -> candle_core::Result<f64> {
        self.routing.coefficient()
    }

    /// Runs `f` with training forwards off (evaluation, sampling, timing forwards: lambda's
    /// controller records none of them), then turns them back on.
    fn evaluating<R>(&self, f: impl FnOnce() -> R) -> R {
        self.routing.set_training(false);
        let r = f();
        self.routing.set_training(true);
        r
    }
}

// ---------------------------------------------------------------------------------------------
// Memory

/// Estimated peak device memory (bytes) of a training step with `micro` sequences per forward,
/// at its worst: the dense stage, when every (token, expert) pair is routed. Candle keeps every
/// intermediate of a forward's graph until the backward has run, so the estimate counts what
/// the graph holds:
/// - parameters: all f32 masters (the MoE layers' router H E plus 3 E H F per layer; attention,
///   norms, embeddings, head), each with its gradient, the gradient accumulated over
///   micro-batches, and AdamW's two moments: 5 x 4 bytes;
/// - the MoE layers' stacked weights: each forward stacks a layer's experts (f32, kept by the
///   graph for the cast's backward) and casts them to bf16 (kept for the layer's backward), 3 E H
///   F x 6 bytes per layer, for the micro-batch whose graph is alive; plus one layer's backward
///   transients (the bf16 gradient, its f32 cast and the per-expert split: 3 E H F x 10 bytes);
/// - each MoE layer's context: per routed pair the bytes the crate's capacity sizing counts for
///   training in bf16 (src/capacity.rs, `bytes_per_pair`): 12 + 10 F + 6 H + 4 ceil(F/32) where
///   F > 512 (the Hopper weight gradients' rows in pair order; 4 H at smaller F), with T E pairs
///   in the dense stage, and the down projection's split-K planes for smaller T
///   (`PairCapacity::reserve_bytes`: 96 MiB a layer at these sizes);
/// - attention: per layer four \[micro, heads, L, L\] f32 tensors kept by the graph (see
///   `causal_attention`), and about three more while one layer's backward runs;
/// - the rest of each block: about 30 \[T, H\] f32 tensors (norms' intermediates, projections,
///   residuals, casts), and the logits.
///
/// For the defaults (H 768, F 3072, E 8, 12 layers, 12 heads, L 1024) that is 14.2 GB of
/// parameters and state, 4.6 GB of stacked MoE weights and 1.2 GB of split-K planes plus, per
/// sequence of the micro-batch, 3.5 GB of MoE contexts, 2.5 GB of attention and 1.1 GB of the
/// rest: 48.9 GB (45.5 GiB) at micro-batch 4 and 77.7 GB (72.4 GiB) at 8. Left out: candle's and cuBLAS's workspaces, the allocator's fragmentation, the
/// backward's transient gradients beyond attention. Hence the default's margin: the largest
/// micro-batch estimated at most 60% of the device's memory (4 on an 80 GB H100, 8 on a 141 GB
/// H200).
fn memory_estimate(a: &Args, micro: usize) -> f64 {
    let (h, f, e, l) = (
        a.hidden as f64,
        a.ffn as f64,
        a.experts as f64,
        a.layers as f64,
    );
    let seq = a.seq as f64;
    let t = micro as f64 * seq;
    let moe_params = l * (h * e + 3.0 * e * h * f);
    let dense_params = l * (4.0 * h * h + 2.0 * h) + 2.0 * VOCAB as f64 * h + seq * h + h;
    let params = (moe_params + dense_params) * 5.0 * 4.0;
    let stacked = l * 3.0 * e * h * f * 6.0 + 3.0 * e * h * f * 10.0;
    // As bytes_per_pair counts it, for either path: the Hopper path's rule.
    let pair_ordered = if remoe_kernels::GemmPath::Hopper.copies_pair_ordered_rows(a.ffn) {
        2.0 * h
    } else {
        0.0
    };
    // y (2 H) and the per-pair dX (2 H), besides the rows in pair order.
    let per_pair = 12.0 + 10.0 * f + 4.0 * h + pair_ordered + 4.0 * (f / 32.0).ceil();
    // Besides its pairs, each context holds the down projection's split-K planes for smaller T
    // (capacity::PairCapacity::reserve_bytes; the main job's contexts keep the default policy).
    let cfg = remoe_kernels::LayerConfig::new(micro * a.seq, a.hidden, a.ffn, a.experts, a.k);
    let reserve = remoe_kernels::PairCapacity::default().reserve_bytes(&cfg) as f64;
    let contexts = l * (t * e * per_pair + reserve);
    let score = micro as f64 * a.heads as f64 * seq * seq * 4.0;
    let attention = (4.0 * l + 3.0) * score;
    let rest = l * 30.0 * t * h * 4.0 + 4.0 * t * VOCAB as f64 * 4.0;
    params + stacked + contexts + attention + rest
}

/// (used, total) device memory in bytes, from the CUDA driver (`cuMemGetInfo`: the whole
/// device, this process's context and candle's allocator pool included).
#[cfg(feature = "candle-cuda")]
fn device_memory(dev: &Device) -> Option<(u64, u64)> {
    let cuda = dev.as_cuda_device().ok()?;
    let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    Some(((total - free) as u64, total as u64))
}

/// Without candle's CUDA backend there is no device to ask.
#[cfg(not(feature = "candle-cuda"))]
fn device_memory(_: &Device) -> Option<(u64, u64)> {
    None
}

/// Starts (`on`) or stops the CUDA profiler's collection for this process's context, after the
/// device has run everything enqueued, so that the profiled range holds exactly the work enqueued
/// in between. Whether there was a profiler to call: not on a CPU device.
#[cfg(feature = "candle-cuda")]
fn profiler(dev: &Device, on: bool) -> candle_core::Result<bool> {
    let Ok(cuda) = dev.as_cuda_device() else {
        return Ok(false);
    };
    dev.synchronize()?;
    cuda.cuda_stream()
        .context()
        .bind_to_thread()
        .map_err(candle_core::Error::wrap)?;
    if on {
        cudarc::driver::profiler_start()
    } else {
        cudarc::driver::profiler_stop()
    }
    .map_err(candle_core::Error::wrap)?;
    Ok(true)
}

/// Without candle's CUDA backend there is no profiler to start.
#[cfg(not(feature = "candle-cuda"))]
fn profiler(_: &Device, _: bool) -> candle_core::Result<bool> {
    Ok(false)
}

/// The CUDA device's name.
#[cfg(feature = "candle-cuda")]
fn device_name(dev: &Device) -> Option<String> {
    let cuda = dev.as_cuda_device().ok()?;
    cuda.cuda_stream().context().name().ok()
}

#[cfg(not(feature = "candle-cuda"))]
fn device_name(_: &Device) -> Option<String> {
    None
}

const GIB: f64 = (1u64 << 30) as f64;

// ---------------------------------------------------------------------------------------------
// Training on the GPU

/// What a run trains for.
#[derive(Debug, Clone)]
enum Plan {
    /// A number of steps (in all, counting a checkpoint's).
    Steps(usize),
    /// Seconds of training wall time (in all, counting a checkpoint's).
    Seconds(f64),
    /// These learning rates, one step each: the TopK run replays the ReMoE run's schedule.
    Replay(Vec<f64>),
}

impl Plan {
    fn to_json(&self) -> Value {
        match self {
            Plan::Steps(n) => json!({"steps": n}),
            Plan::Seconds(s) => json!({"seconds": s}),
            Plan::Replay(l) => json!({"replay_steps": l.len()}),
        }
    }
}

/// The learning rate at `step` at `progress` (0 to 1) through the budget: a linear warm-up
/// over `warmup` steps from `start` (0, or a resumed run's first step: AdamW's moments start
/// afresh there), times a cosine from --lr to --min-lr-ratio x --lr over the budget.
fn learning_rate(args: &Args, step: usize, start: usize, progress: f64) -> f64 {
    let warm = ((step - start + 1) as f64 / args.warmup.max(1) as f64).min(1.0);
    let min = args.min_lr_ratio * args.lr;
    let p = progress.clamp(0.0, 1.0);
    warm * (min + 0.5 * (args.lr - min) * (1.0 + (std::f64::consts::PI * p).cos()))
}

/// The batch of `step`: a function of (seed, step) alone, so a resumed run draws the batches
/// the uninterrupted run would have.
fn batch_for_step(c: &Corpus, seed: u64, step: usize, batch: usize, seq: usize) -> Batch {
    let mix = (step as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut rng = seeded(seed ^ 0xba7c ^ mix);
    c.random_batch(&mut rng, batch, seq)
}

/// Rows `row0 .. row0 + rows` of a batch on the device: inputs \[rows, seq\] and targets
/// \[rows * seq\].
fn upload(
    b: &Batch,
    row0: usize,
    rows: usize,
    seq: usize,
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let r = row0 * seq..(row0 + rows) * seq;
    let ids = Tensor::from_slice(&b.inputs[r.clone()], (rows, seq), dev)?;
    let tgt = Tensor::from_slice(&b.targets[r], rows * seq, dev)?;
    Ok((ids, tgt))
}

fn lm_loss(logits: &Tensor, tgt: &Tensor) -> candle_core::Result<Tensor> {
    cross_entropy(&logits.flatten_to(1)?, tgt)
}

/// The global gradient norm (f32 sums of squares); scales the gradients to norm `clip` when
/// above it (`clip` > 0). One read-back.
fn clip_gradients(grads: &mut GradStore, vars: &[Var], clip: f64) -> candle_core::Result<f64> {
    let mut squares = Vec::with_capacity(vars.len());
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            squares.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
        }
    }
    if squares.is_empty() {
        return Ok(0.0);
    }
    let norm = f64::from(
        Tensor::stack(&squares, 0)?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()?,
    );
    if clip > 0.0 && norm > clip {
        let s = clip / norm;
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * s)?);
            }
        }
    }
    Ok(norm)
}

/// What one optimiser step gives.
struct StepOut {
    lm: f64,
    /// The layers' balance losses summed (ReMoE's regulariser at lambda, TopK's aux loss at c),
    /// mean over micro-batches.
    reg: f64,
    /// Mean over layers and micro-batches (ReMoE; what lambda's controller stepped on).
    sparsity: Option<f64>,
    grad_norm: f64,
    /// Device memory in use after the last micro-batch's forward (its graph alive).
    mem_used: Option<u64>,
    /// The first MoE layer's input and output on the first tokens, and the weights that
    /// forward used (before the optimiser step).
    probe: Option<(Tensor, Tensor, HostMoeWeights<bf16>)>,
    /// Per micro-batch, each MoE layer's input.
    inputs: Vec<Vec<Tensor>>,
    /// With `Want::phases`: seconds in each `Phases::NAMES` phase, synchronised after each.
    phases: Option<Phases>,
}

/// A training step's time by phase, each ended by a device synchronisation (so the phases do
/// not overlap, and their sum is a little more than an unsynchronised step): the whole phase, and
/// the host's part of it, up to the synchronisation. A host part well below the whole means the
/// GPU is behind; one close to it settles nothing, because the host also waits when CUDA's
/// launch queue is full and at every read (the forwards' part includes the routing statistics'
/// read).
#[derive(Debug, Clone, Copy, Default)]
struct Phases {
    total: [f64; 5],
    host: [f64; 5],
}

impl Phases {
    const NAMES: [&'static str; 5] = [
        "forwards (model and LM loss, routing statistics read)",
        "backwards (and gradient accumulation)",
        "gradient norm and clipping",
        "AdamW",
        "lambda step and device error check",
    ];

    /// Runs `f`, synchronises, and adds the elapsed time to phase `i` (when timing).
    fn time<R>(
        this: &mut Option<Self>,
        dev: &Device,
        i: usize,
        f: impl FnOnce() -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let Some(p) = this else { return f() };
        let (r, host, total) = timed(dev, f)?;
        p.host[i] += host;
        p.total[i] += total;
        Ok(r)
    }
}

/// Runs `f` and synchronises: its result, the seconds until `f` returned (the host's part: the
/// time to enqueue its work) and the seconds until the device had run it.
fn timed<R>(
    dev: &Device,
    f: impl FnOnce() -> candle_core::Result<R>,
) -> candle_core::Result<(R, f64, f64)> {
    let t0 = Instant::now();
    let r = f()?;
    let host = t0.elapsed().as_secs_f64();
    dev.synchronize()?;
    Ok((r, host, t0.elapsed().as_secs_f64()))
}

/// The training context of one run.
struct Trainer<'a> {
    model: Model,
    opt: AdamW,
    vars: Vec<Var>,
    args: &'a Args,
    micro: usize,
    dev: &'a Device,
}

impl Trainer<'_> {
    /// One optimiser step on `b`: a forward and backward per micro-batch (each micro-batch's
    /// loss weighted 1/n, so the accumulated gradient is the whole batch's mean's), clipping,
    /// AdamW, then the shared lambda's step and the device error check.
    ///
    /// The loss is the LM loss alone: the balance regulariser's gradient comes from the MoE
    /// layers' backward. It is scaled by the layers' `balance_grad_scale`, which must be the
    /// factor of the task loss (1/n here) for lambda to weigh the regulariser as in
    /// `lm + balance`: set once per run in `train_gpu`.
    fn step(&mut self, b: &Batch, want: Want) -> candle_core::Result<StepOut> {
        let n = self.args.batch / self.micro;
        let mut acc: Option<GradStore> = None;
        let mut lms = Vec::with_capacity(n);
        let (mut reg, mut sparsity) = (0.0, 0.0);
        let mut out = StepOut {
            lm: 0.0,
            reg: 0.0,
            sparsity: None,
            grad_norm: 0.0,
            mem_used: None,
            probe: None,
            inputs: Vec::new(),
            phases: want.phases.then(Phases::default),
        };
        let dev = self.dev;
        for m in 0..n {
            let (ids, tgt) = upload(b, m * self.micro, self.micro, self.args.seq, dev)?;
            let w = Want {
                stats: true,
                probe: if m == 0 { want.probe } else { 0 },
                ..want
            };
            let model = &self.model;
            let (f, lm) = Phases::time(&mut out.phases, dev, 0, || {
                let f = model.forward(&ids, w)?;
                let lm = lm_loss(&f.logits, &tgt)?;
                Ok((f, lm))
            })?;
            if m + 1 == n {
                out.mem_used = device_memory(dev).map(|(u, _)| u);
            }
            Phases::time(&mut out.phases, dev, 1, || {
                let g = (&lm * (1.0 / n as f64))?.backward()?;
                match acc.as_mut() {
                    None => acc = Some(g),
                    Some(a) => a.extend(g)?,
                }
                Ok(())
            })?;
            lms.push(lm.detach());
            let layers = f.stats.len().max(1) as f64;
            reg += f.stats.iter().map(|s| s.balance_loss).sum::<f64>();
            sparsity += f.stats.iter().map(|s| s.sparsity).sum::<f64>() / layers;
            if let (None, Some((x, y))) = (&out.probe, f.probe) {
                let w = self.model.blocks[0].moe.host_weights()?;
                out.probe = Some((x, y, w));
            }
            out.inputs.push(f.moe_inputs);
        }
        let mut grads = acc.expect("at least one micro-batch");
        let (vars, clip) = (&self.vars, self.args.clip);
        out.grad_norm = Phases::time(&mut out.phases, dev, 2, || {
            clip_gradients(&mut grads, vars, clip)
        })?;
        if !out.grad_norm.is_finite() {
            candle_core::bail!("the gradient norm is {}", out.grad_norm)
        }
        let opt = &mut self.opt;
        Phases::time(&mut out.phases, dev, 3, || opt.step(&grads))?;
        drop(grads);
        let model = &self.model;
        Phases::time(&mut out.phases, dev, 4, || model.end_step())?;
        let lm = (Tensor::stack(&lms, 0)?.sum_all()? / n as f64)?.to_scalar::<f32>()?;
        out.lm = f64::from(lm);
        out.reg = reg / n as f64;
        if want.stats && self.model.kind == Kind::Remoe {
            out.sparsity = Some(sparsity / n as f64);
        }
        Ok(out)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The MoE layers' share of a training step's time: per timed step, a whole training step as
/// the run trains (all micro-batches, clipping, AdamW, the routing statistics; synchronised
/// before and after), then the forward and backward of the MoE layers alone on that step's
/// layer inputs (each layer's output summed and backpropagated, the regulariser's gradient
/// included by the layer's backward; synchronised; training forwards off, so that lambda's
/// controller does not record them). The share is the ratio of the medians. It leaves out the MoE
/// parameters' AdamW update and includes the small sum that stands in for the rest of the network.
///
/// Besides the share, where the step's time goes: each timed step is followed by a second
/// training step synchronised after each phase (`Phases`), and by the MoE layers' weight staging
/// alone (`Moe::stage_weights` and its backward, for every layer, as many times as a step has
/// micro-batches), which is in the MoE layers' time above. These steps train the model further,
/// so they run after everything else is measured.
fn moe_share(
    tr: &mut Trainer,
    train: &Corpus,
    seed: u64,
    from_step: usize,
) -> candle_core::Result<(f64, String)> {
    let (mut full, mut moe, mut staging) = (Vec::new(), Vec::new(), Vec::new());
    let (mut moe_host, mut staging_host) = (Vec::new(), Vec::new());
    let mut phases: Vec<Phases> = Vec::new();
    const WARM: usize = 2;
    let (args, dev) = (tr.args, tr.dev);
    let forwards = args.batch / tr.micro;
    for rep in 0..args.timing_steps + WARM {
        let b = batch_for_step(train, seed, from_step + 2 * rep, args.batch, args.seq);
        dev.synchronize()?;
        let t0 = Instant::now();
        let out = tr.step(
            &b,
            Want {
                inputs: true,
                ..Want::default()
            },
        )?;
        dev.synchronize()?;
        let t_full = t0.elapsed().as_secs_f64();

        let model = &tr.model;
        let ((), t_moe_host, t_moe) = model.evaluating(|| {
            timed(dev, || {
                for inputs in &out.inputs {
                    for (blk, x) in model.blocks.iter().zip(inputs) {
                        let x = Var::from_tensor(x)?;
                        let y = blk.moe.forward(x.as_tensor())?;
                        y.sum_all()?.to_dtype(DType::F32)?.backward()?;
                    }
                }
                Ok(())
            })
        })?;
        drop(out);

        let ((), t_staging_host, t_staging) = timed(dev, || {
            for _ in 0..forwards {
                for blk in &model.blocks {
                    for staged in blk.moe.stage_weights()? {
                        staged.backward()?;
                    }
                }
            }
            Ok(())
        })?;

        let b = batch_for_step(train, seed, from_step + 2 * rep + 1, args.batch, args.seq);
        let phased = tr.step(
            &b,
            Want {
                phases: true,
                ..Want::default()
            },
        )?;
        if rep >= WARM {
            full.push(t_full);
            moe.push(t_moe);
            moe_host.push(t_moe_host);
            staging.push(t_staging);
            staging_host.push(t_staging_host);
            phases.extend(phased.phases);
        }
    }
    let (f, m, st) = (median(full), median(moe), median(staging));
    let (mh, sth) = (median(moe_host), median(staging_host));
    let by_phase = Phases::NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let ms = 1e3 * median(phases.iter().map(|p| p.total[i]).collect());
            let host = 1e3 * median(phases.iter().map(|p| p.host[i]).collect());
            format!("{name} {ms:.1} ms (host {host:.1})")
        })
        .collect::<Vec<_>>()
        .join(", ");
    Ok((
        m / f,
        format!(
            "median of {} steps: MoE layers' forward+backward alone {:.1} ms (host {:.1}) / whole step {:.1} ms ({} forwards of {} sequences), both synchronised; \
             of the MoE layers' time, their weight staging alone (stack, transpose-cast and their backward) {:.1} ms (host {:.1}); \
             a step synchronised after each phase: {by_phase}; (host: the time until the host had enqueued the phase, before its synchronisation)",
            args.timing_steps,
            1e3 * m,
            1e3 * mh,
            1e3 * f,
            forwards,
            tr.micro,
            1e3 * st,
            1e3 * sth,
        ),
    ))
}

/// What `evaluate` gives.
struct Eval {
    /// Mean over the held-out bytes (nats/byte).
    loss: f64,
    by_domain: Vec<f64>,
    affinity: Affinity,
    /// The routing masks' pairs, and how many of them the layers' own counts (the routing
    /// statistics' tokens per expert) do not account for: a check that the masks (an extra
    /// router matmul) route as the layers did.
    mask_pairs: u64,
    mask_mismatch: u64,
}

/// Validation loss (overall and per domain) and the routing by domain on the held-out batches,
/// with training forwards off.
fn evaluate(
    model: &Model,
    held: &[Batch],
    names: &[String],
    args: &Args,
    dev: &Device,
) -> candle_core::Result<Eval> {
    let r = model.evaluating(|| evaluate_batches(model, held, names, args, dev));
    // Evaluation forwards report device errors too (a NaN logit).
    model.check_device_errors()?;
    r
}

fn evaluate_batches(
    model: &Model,
    held: &[Batch],
    names: &[String],
    args: &Args,
    dev: &Device,
) -> candle_core::Result<Eval> {
    let mut aff = Affinity::new(args.layers, args.experts, names);
    let mut sums = vec![(0.0f64, 0usize); names.len()];
    let (mut mask_pairs, mut mask_mismatch) = (0u64, 0u64);
    for b in held {
        let rows = b.inputs.len() / args.seq;
        let (ids, tgt) = upload(b, 0, rows, args.seq, dev)?;
        let f = model.forward(
            &ids,
            Want {
                masks: true,
                stats: true,
                ..Want::default()
            },
        )?;
        let logp = candle_nn::ops::log_softmax(&f.logits.flatten_to(1)?, D::Minus1)?;
        let nll = logp
            .gather(&tgt.unsqueeze(1)?, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (&d, &l) in b.domains.iter().zip(&nll) {
            sums[d as usize].0 -= f64::from(l);
            sums[d as usize].1 += 1;
        }
        let masks = f
            .masks
            .iter()
            .map(|m| m.flatten_all()?.to_vec1::<u8>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        for (m, st) in masks.iter().zip(&f.stats) {
            let mut per_expert = vec![0u64; args.experts];
            for row in m.chunks_exact(args.experts) {
                for (c, &on) in per_expert.iter_mut().zip(row) {
                    *c += u64::from(on != 0);
                }
            }
            mask_pairs += per_expert.iter().sum::<u64>();
            mask_mismatch += per_expert
                .iter()
                .zip(&st.tokens_per_expert)
                .map(|(&a, &b)| a.abs_diff(u64::from(b)))
                .sum::<u64>();
        }
        aff.add(&b.domains, &masks);
    }
    let (s, n) = sums.iter().fold((0.0, 0), |(s, n), &(a, b)| (s + a, n + b));
    Ok(Eval {
        loss: s / n.max(1) as f64,
        by_domain: sums.iter().map(|&(s, n)| s / n.max(1) as f64).collect(),
        affinity: aff,
        mask_pairs,
        mask_mismatch,
    })
}

/// `n` bytes sampled after `prompt` (temperature 0: greedy), seeded; training forwards off.
fn sample(
    model: &Model,
    prompt: &[u8],
    args: &Args,
    seed: u64,
    dev: &Device,
) -> candle_core::Result<Vec<u8>> {
    model.evaluating(|| sample_bytes(model, prompt, args, seed, dev))
}

fn sample_bytes(
    model: &Model,
    prompt: &[u8],
    args: &Args,
    seed: u64,
    dev: &Device,
) -> candle_core::Result<Vec<u8>> {
    let mut rng = seeded(seed ^ 0x5a3f);
    let mut ctx = if prompt.is_empty() {
        b"\n".to_vec()
    } else {
        prompt.to_vec()
    };
    let start = ctx.len();
    for _ in 0..args.sample_bytes {
        let from = ctx.len().saturating_sub(args.seq);
        let ids: Vec<u32> = ctx[from..].iter().map(|&b| u32::from(b)).collect();
        let l = ids.len();
        let ids = Tensor::from_vec(ids, (1, l), dev)?;
        let f = model.forward(&ids, Want::default())?;
        let logits = f.logits.get(0)?.get(l - 1)?.to_vec1::<f32>()?;
        let next = if args.temperature <= 0.0 {
            (0..VOCAB)
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap_or(0)
        } else {
            let mx = logits.iter().cloned().fold(f32::MIN, f32::max);
            let w: Vec<f64> = logits
                .iter()
                .map(|&z| (f64::from(z - mx) / args.temperature).exp())
                .collect();
            let mut u = rng.random::<f64>() * w.iter().sum::<f64>();
            let mut pick = VOCAB - 1;
            for (i, &p) in w.iter().enumerate() {
                if u < p {
                    pick = i;
                    break;
                }
                u -= p;
            }
            pick
        };
        ctx.push(next as u8);
    }
    Ok(ctx[start..].to_vec())
}

/// A run's checkpoint: `<dir>/<kind>.safetensors` (the VarMap: every parameter, bf16 and f32)
/// and `<dir>/<kind>.json`.
struct Checkpoint {
    step: usize,
    train_seconds: f64,
    /// The model's lambda (one for all layers; TopK: c).
    lambda: f64,
    history: Vec<StepLog>,
    /// The MoE layers' share of the step time measured by the run that saved it (the sidecar
    /// is rewritten once it is measured, after the parameters are saved).
    moe_share: Option<(f64, String)>,
}

/// The model settings a checkpoint must match.
fn shape_json(a: &Args) -> Value {
    json!({"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "ffn": a.ffn,
           "experts": a.experts, "k": a.k, "seq": a.seq})
}

impl Checkpoint {
    fn paths(dir: &Path, kind: Kind) -> (PathBuf, PathBuf) {
        (
            dir.join(format!("{}.safetensors", kind.file())),
            dir.join(format!("{}.json", kind.file())),
        )
    }

    fn read(dir: &Path, kind: Kind, args: &Args) -> Result<Option<Self>, Error> {
        let (_, side) = Self::paths(dir, kind);
        if !side.is_file() {
            return Ok(None);
        }
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&side)?)?;
        if v["model"] != shape_json(args) {
            return Err(format!(
                "{}: the checkpoint's model {} is not this run's {}",
                side.display(),
                v["model"],
                shape_json(args)
            )
            .into());
        }
        let bad = || format!("{}: malformed", side.display());
        Ok(Some(Self {
            step: v["step"].as_u64().ok_or_else(bad)? as usize,
            train_seconds: v["train_seconds"].as_f64().ok_or_else(bad)?,
            // One lambda for the model (a checkpoint with one per layer is of the earlier
            // per-layer controllers, whose parameter names differ too).
            lambda: v["lambda"].as_f64().ok_or_else(bad)?,
            history: v["history"]
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|s| StepLog::from_json(s).ok_or_else(bad))
                .collect::<Result<_, _>>()?,
            moe_share: v["moe_share"]["share"].as_f64().map(|x| {
                let how = v["moe_share"]["method"].as_str().unwrap_or("");
                (
                    x,
                    format!("{how}; measured by the run that saved the checkpoint"),
                )
            }),
        }))
    }

    /// Writes the parameters and the sidecar.
    fn write(&self, dir: &Path, kind: Kind, varmap: &VarMap, args: &Args) -> Result<(), Error> {
        std::fs::create_dir_all(dir)?;
        let (params, side) = Self::paths(dir, kind);
        varmap.save(&params)?;
        self.write_sidecar(dir, kind, args)?;
        println!(
            "{}: saved {} and {}",
            kind.name(),
            params.display(),
            side.display()
        );
        Ok(())
    }

    /// Writes the sidecar alone.
    fn write_sidecar(&self, dir: &Path, kind: Kind, args: &Args) -> Result<(), Error> {
        let (_, side) = Self::paths(dir, kind);
        let doc = json!({
            "kind": kind.name(),
            "model": shape_json(args),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "lambda": self.lambda,
            "seed": args.seed,
            "data_position": "the batch of step s is a function of (seed, s) alone: a resumed run continues at `step`",
            "optimiser": "AdamW's moments are not saved: a resumed run re-creates AdamW and re-warms the learning rate over --warmup steps",
            "history": self.history.iter().map(|s| s.to_json()).collect::<Vec<_>>(),
            "moe_share": self.moe_share.as_ref().map(|(v, how)| json!({"share": v, "method": how})),
        });
        std::fs::write(&side, serde_json::to_string(&doc)?)?;
        Ok(())
    }
}

/// What a run does besides training and validation.
#[derive(Debug, Clone, Copy)]
struct Extras {
    /// Checkpoint, reference checks, samples, the timing of the MoE layers' share.
    main: bool,
}

/// The ReMoE or TopK run with `seed` for `plan`.
#[allow(clippy::too_many_arguments)]
fn train_gpu(
    args: &Args,
    dev: &Device,
    micro: usize,
    kind: Kind,
    seed: u64,
    plan: &Plan,
    train: &Corpus,
    held: &[Batch],
    extras: Extras,
) -> Result<RunLog, Error> {
    let name = kind.name();
    // The same seed for both runs: the same initial weights of the shared parts (created in
    // the same order) and the same batches. (candle's CPU generator cannot be seeded: the
    // --candle-cpu smoke test initialises differently on every run.)
    if !dev.is_cpu() {
        dev.set_seed(seed)?;
    }
    let resume = match (&args.resume, extras.main) {
        (Some(dir), true) => Checkpoint::read(dir, kind, args)?,
        _ => None,
    };
    if args.resume.is_some() && extras.main && resume.is_none() {
        println!("{name}: no checkpoint to resume from: training from scratch");
    }
    // The checkpoint's lambda; a non-positive one (a --fixed-lambda 0 run's) is no controller's
    // starting point, so --lambda0 stands in for it.
    let lambda0 = match &resume {
        Some(c) if c.lambda > 0.0 => c.lambda,
        _ => args.lambda0,
    };
    let mut varmap = VarMap::new();
    // f32 masters for every parameter (the MoE layers compute in bf16).
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let model = Model::new(args, kind, &vb, lambda0)?;
    // Each micro-batch's loss is weighted 1/n: the regulariser's gradient, added by the layers'
    // backward, takes the same factor (see `Trainer::step`).
    model
        .routing
        .set_balance_grad_scale(1.0 / (args.batch / micro) as f64)?;
    if let (Some(c), Some(dir)) = (&resume, &args.resume) {
        varmap.load(Checkpoint::paths(dir, kind).0)?;
        println!(
            "{name}: resumed from {} at step {} ({:.0} s trained); AdamW restarts",
            dir.display(),
            c.step,
            c.train_seconds
        );
    }
    let params = ParamsAdamW {
        lr: args.lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: args.weight_decay,
    };
    let vars = varmap.all_vars();
    let mut tr = Trainer {
        opt: AdamW::new(vars.clone(), params)?,
        model,
        vars,
        args,
        micro,
        dev,
    };
    let tokens_per_step = args.batch * args.seq;
    let (start, prior_s, mut steps, prior_share) = match resume {
        Some(c) => (c.step, c.train_seconds, c.history, c.moe_share),
        None => (0, 0.0, Vec::new(), None),
    };

    let (len, unit) = match plan {
        Plan::Steps(n) => (*n as u64, "steps"),
        Plan::Replay(l) => (l.len() as u64, "steps"),
        Plan::Seconds(s) => (s.ceil() as u64, "s"),
    };
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(&format!(
        "{{prefix:>6}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} {{msg}}"
    ))?);
    bar.set_prefix(name);
    let mut last_sparsity = f64::NAN;
    let mut checks = Vec::new();
    let mut peak_mem = 0u64;
    // Wall time of the steps, without the reference checks (which run on the host).
    let mut trained_s = 0.0;
    let mut step = start;
    loop {
        let elapsed = prior_s + trained_s;
        let lr = match plan {
            Plan::Steps(n) if step < *n => {
                learning_rate(args, step, start, step as f64 / *n as f64)
            }
            Plan::Seconds(s) if elapsed < *s => learning_rate(args, step, start, elapsed / s),
            Plan::Replay(l) if step < l.len() => l[step],
            _ => break,
        };
        tr.opt.set_learning_rate(lr);
        let b = batch_for_step(train, seed, step, args.batch, args.seq);
        let check = extras.main && kind == Kind::Remoe && args.check_steps.contains(&step);
        let want = Want {
            stats: step.is_multiple_of(args.stats_every.max(1)),
            probe: if check { 16 } else { 0 },
            ..Want::default()
        };
        let profiled = extras.main && kind == Kind::Remoe && args.profile_step == Some(step);
        if profiled {
            profiler(tr.dev, true)?;
        }
        let t0 = Instant::now();
        let out = tr.step(&b, want)?;
        let lambda = tr.model.coefficient()?;
        let dt = t0.elapsed().as_secs_f64();
        if profiled && profiler(tr.dev, false)? {
            bar.suspend(|| println!("{name} step {step}: profiled ({:.1} ms)", 1e3 * dt));
        }
        trained_s += dt;
        if let Some((x, y, w)) = &out.probe {
            let r = tr.model.blocks[0].moe.reference_check(w, x, y)?;
            let ok = r.rel_err <= 0.05;
            // println through the bar: indicatif's own println prints nothing when the bar is
            // hidden (output not a terminal).
            bar.suspend(|| {
                println!(
                    "{name} step {step}: layer 0 against the CPU reference on {} tokens (sparsity {:.3}): max error {:.2e} of the output's largest magnitude{}",
                    r.tokens,
                    r.sparsity,
                    r.rel_err,
                    if ok { "" } else { " -- ABOVE 0.05" }
                )
            });
            checks.push(
                json!({"step": step, "tokens": r.tokens, "sparsity": r.sparsity,
                               "max_rel_error": r.rel_err, "within_0.05": ok}),
            );
        }
        if let Some(s) = out.sparsity {
            last_sparsity = s;
        }
        peak_mem = peak_mem.max(out.mem_used.unwrap_or(0));
        let tps = tokens_per_step as f64 / dt;
        let mem = out.mem_used.map(|m| m as f64 / GIB);
        let msg = match kind {
            Kind::Remoe => format!(
                "step {step} loss {:.3} sparsity {last_sparsity:.3} lambda {lambda:.2e} {:.0}k tok/s",
                out.lm,
                tps / 1e3
            ),
            Kind::Topk => format!(
                "step {step} loss {:.3} aux {:.2e} {:.0}k tok/s",
                out.lm,
                out.reg,
                tps / 1e3
            ),
        };
        // indicatif draws nothing when the output is not a terminal (a log file, CI): a plain
        // line every 50 steps instead.
        if bar.is_hidden() && (step.is_multiple_of(50) || step == start) {
            println!("{name} {msg}");
        }
        bar.set_message(msg);
        bar.set_position(match plan {
            Plan::Seconds(s) => (prior_s + trained_s).min(*s) as u64,
            _ => step as u64 + 1,
        });
        steps.push(StepLog {
            step,
            lr,
            lm_loss: out.lm,
            reg_loss: out.reg,
            sparsity: out.sparsity,
            lambda,
            tokens_per_s: tps,
            grad_norm: Some(out.grad_norm),
            mem_gib: mem,
        });
        if !out.lm.is_finite() {
            bar.abandon();
            return Err(format!("{name}: the loss is {} at step {step}", out.lm).into());
        }
        step += 1;
    }
    bar.finish();
    let trained_here = step - start;
    let mut saved = None;
    if let (true, Some(dir)) = (extras.main, &args.save) {
        let c = Checkpoint {
            step,
            train_seconds: prior_s + trained_s,
            lambda: tr.model.coefficient()?,
            history: steps.clone(),
            moe_share: prior_share.clone(),
        };
        c.write(dir, kind, &varmap, args)?;
        saved = Some((dir, c));
    }
    let ev = evaluate(&tr.model, held, &train.names, args, dev)?;
    if ev.mask_mismatch > 0 {
        // A few pairs at near-ties of the logits (the masks' f32 matmul sums in another order
        // than the layer's router) are expected; more is a bug.
        let share = ev.mask_mismatch as f64 / ev.mask_pairs.max(1) as f64;
        println!(
            "{name}: the affinity table's routing masks differ from the layers' own pair counts in {} of {} pairs ({:.4}%){}",
            ev.mask_mismatch,
            ev.mask_pairs,
            100.0 * share,
            if share > 1e-3 { " -- ABOVE 0.1%" } else { "" }
        );
    }
    let mut samples = Value::Null;
    if let (true, Some(p)) = (extras.main, &args.prompt) {
        let s = sample(&tr.model, p.as_bytes(), args, seed, dev)?;
        let text = String::from_utf8_lossy(&s).into_owned();
        println!(
            "{name} sample (temperature {}):\n{p}{text}\n",
            args.temperature
        );
        samples = json!({"prompt": p, "temperature": args.temperature, "text": text});
    }
    // Measured where this run trained; else the checkpoint's measurement, if any.
    let share = if extras.main && args.timing_steps > 0 && trained_here > 0 {
        let share = moe_share(&mut tr, train, seed ^ 0x7133, step)?;
        if let Some((dir, mut c)) = saved {
            c.moe_share = Some(share.clone());
            c.write_sidecar(dir, kind, args)?;
        }
        Some(share)
    } else {
        prior_share
    };
    let total_mem = device_memory(dev).map(|(_, t)| t);
    Ok(RunLog {
        name: name.into(),
        steps,
        val_loss: ev.loss,
        val_by_domain: ev.by_domain,
        wall_s: trained_s,
        tokens: tokens_per_step * trained_here,
        affinity: ev.affinity,
        moe_share: share,
        extra: json!({
            "plan": plan.to_json(),
            "resumed_from_step": (start > 0).then_some(start),
            "steps_trained_here": trained_here,
            "train_seconds_total": prior_s + trained_s,
            "micro_batch": micro,
            "peak_device_memory_gib": (peak_mem > 0).then(|| peak_mem as f64 / GIB),
            "device_memory_total_gib": total_mem.map(|t| t as f64 / GIB),
            "device_memory_method": "cuMemGetInfo (total - free, the whole device) after each step's last forward, its graph alive",
            "reference_checks": checks,
            "routing_mask_check": {"pairs": ev.mask_pairs, "mismatched": ev.mask_mismatch,
                                   "method": "per layer and expert, the held-out routing masks' pairs against the layer's tokens per expert (routing_stats) of the same forward"},
            "sample": samples,
        }),
    })
}

/// The corpus, held-out batches and what was read.
struct Data {
    train: Corpus,
    held: Corpus,
    info: Value,
}

/// Real text by domain where enough is found (or `--data`), else the generated corpus.
fn load_corpus(args: &Args) -> Result<Data, Error> {
    if args.corpus != "generated" {
        let sources: Vec<data::Source> = if args.data.is_empty() {
            data::candidates()
        } else {
            args.data.iter().map(|d| data::from_dir(d)).collect()
        };
        // A domain needs its held-out slice and at least 512 KiB of training text.
        let min_train = (512usize << 10).min(args.domain_bytes);
        let (mut kept, mut skipped) = (Vec::new(), Vec::new());
        for s in &sources {
            let d = data::load(s, args.domain_bytes, args.val_bytes, args.data_seed);
            let info = json!({"name": d.name, "roots": s.roots, "files": d.files,
                              "train_bytes": d.train.len(), "val_bytes": d.val.len()});
            if d.val.len() >= args.val_bytes && d.train.len() >= min_train {
                kept.push((d, info));
            } else {
                skipped.push(info);
            }
        }
        let need = if args.data.is_empty() { 3 } else { 2 };
        if kept.len() >= need {
            let names: Vec<String> = kept.iter().map(|(d, _)| d.name.clone()).collect();
            let train: Vec<&[u8]> = kept.iter().map(|(d, _)| d.train.as_slice()).collect();
            let val: Vec<&[u8]> = kept.iter().map(|(d, _)| d.val.as_slice()).collect();
            println!("real text, {} domains:", kept.len());
            for (d, _) in &kept {
                println!(
                    "  {:>10}: {} files, {:.2} MiB training, {} KiB held out",
                    d.name,
                    d.files,
                    d.train.len() as f64 / (1 << 20) as f64,
                    d.val.len() >> 10
                );
            }
            for s in &skipped {
                println!("  skipped (too little text): {s}");
            }
            return Ok(Data {
                train: Corpus::from_parts(names.clone(), &train),
                held: Corpus::from_parts(names, &val),
                info: json!({"kind": "real text", "domains": kept.iter().map(|(_, i)| i.clone()).collect::<Vec<_>>(),
                             "skipped": skipped, "file_cap_bytes": data::FILE_CAP}),
            });
        }
        let msg = format!(
            "only {} domain(s) of real text with enough bytes (need {need}): {}",
            kept.len(),
            serde_json::to_string(&skipped)?
        );
        if args.corpus == "real" {
            return Err(msg.into());
        }
        println!("{msg}; using the generated five-domain corpus instead");
    }
    let train = Corpus::generate(args.seed, 8 << 20);
    let held = Corpus::generate(args.seed.wrapping_add(0x4e1d), 5 * args.val_bytes);
    Ok(Data {
        train,
        held,
        info: json!({"kind": "generated", "train_bytes": 8 << 20}),
    })
}

/// The training corpus's share of bytes per domain.
fn print_domains(c: &Corpus) {
    let shares: Vec<String> = c
        .domain_counts()
        .iter()
        .zip(&c.names)
        .map(|(&n, d)| format!("{d} {:.1}%", 100.0 * n as f64 / c.bytes.len() as f64))
        .collect();
    println!("corpus bytes by domain: {}", shares.join(", "));
}

/// The micro-batch: --micro-batch, or the largest divisor of --batch whose estimate fits in
/// 60% of the device's memory (see `memory_estimate`).
fn choose_micro_batch(args: &Args, total: Option<u64>) -> usize {
    if let Some(m) = args.micro_batch {
        return m;
    }
    let budget = 0.6 * total.unwrap_or(80_000_000_000) as f64;
    (1..=args.batch)
        .rev()
        .filter(|m| args.batch.is_multiple_of(*m))
        .find(|&m| memory_estimate(args, m) <= budget)
        .unwrap_or(1)
}

/// A ReMoE run and (unless --no-topk) a TopK run of the same steps and learning rates.
#[allow(clippy::too_many_arguments)]
fn run_pair(
    args: &Args,
    dev: &Device,
    micro: usize,
    seed: u64,
    plan: &Plan,
    data: &Data,
    held: &[Batch],
    extras: Extras,
) -> Result<(RunLog, Option<RunLog>), Error> {
    let target = 1.0 - args.k as f64 / args.experts as f64;
    let remoe = train_gpu(
        args,
        dev,
        micro,
        Kind::Remoe,
        seed,
        plan,
        &data.train,
        held,
        extras,
    )?;
    report::summarise(&remoe, Some(target));
    if args.no_topk {
        return Ok((remoe, None));
    }
    let lrs = Plan::Replay(remoe.steps.iter().map(|s| s.lr).collect());
    let topk = train_gpu(
        args,
        dev,
        micro,
        Kind::Topk,
        seed,
        &lrs,
        &data.train,
        held,
        extras,
    )?;
    report::summarise(&topk, None);
    println!(
        "seed {seed}: validation loss ReMoE {:.4}, TopK {:.4} ({:+.4} nats/byte)",
        remoe.val_loss,
        topk.val_loss,
        remoe.val_loss - topk.val_loss
    );
    Ok((remoe, Some(topk)))
}

/// The job on `dev`: the GPU, or candle's CPU backend for --candle-cpu.
fn run_candle(args: &Args, dev: &Device) -> Result<(), Error> {
    let total = Instant::now();
    // TF32 for the f32 matmuls (attention, projections, LM head): 10-bit mantissa operands,
    // f32 accumulation; the MoE layers are bf16 throughout anyway.
    candle_core::cuda::set_gemm_reduced_precision_f32(!args.no_tf32);
    let mem = device_memory(dev);
    let device_name = if dev.is_cpu() {
        "cpu (candle, --candle-cpu smoke test)".into()
    } else {
        device_name(dev).unwrap_or_else(|| "cuda:0".into())
    };
    let micro = choose_micro_batch(args, mem.map(|m| m.1));
    let est = memory_estimate(args, micro);
    let data = load_corpus(args)?;
    print_domains(&data.train);
    let held = data.held.sequential_batches(micro, args.seq, usize::MAX);
    let plan = match args.steps {
        Some(n) => Plan::Steps(n),
        None => Plan::Seconds(60.0 * args.minutes),
    };
    println!(
        "{device_name}: {} blocks, H {}, {} heads, E {} x F {}, k {}; {} x {} bytes per step in micro-batches of {micro} (estimated peak {:.1} GiB, device {}); {}; {} held-out batches",
        args.layers, args.hidden, args.heads, args.experts, args.ffn, args.k,
        args.batch, args.seq, est / GIB,
        mem.map_or("memory unknown".to_string(), |m| format!("{:.1} GiB", m.1 as f64 / GIB)),
        match &plan { Plan::Steps(n) => format!("{n} steps"), _ => format!("{} min of training", args.minutes) },
        held.len()
    );
    let target = 1.0 - args.k as f64 / args.experts as f64;
    let (remoe, topk) = run_pair(
        args,
        dev,
        micro,
        args.seed,
        &plan,
        &data,
        &held,
        Extras { main: true },
    )?;

    // The validation comparison over seeds.
    let mut seeds = Value::Null;
    if args.seeds > 1 {
        let short = match (args.seed_steps, args.seed_minutes) {
            (Some(n), _) => Some(Plan::Steps(n)),
            (None, Some(m)) => Some(Plan::Seconds(60.0 * m)),
            (None, None) => None,
        };
        let mut vals: Vec<(u64, f64, Option<f64>)> = Vec::new();
        if short.is_none() {
            vals.push((args.seed, remoe.val_loss, topk.as_ref().map(|t| t.val_loss)));
        }
        let seed_plan = short.clone().unwrap_or_else(|| plan.clone());
        let first = if short.is_none() { 1 } else { 0 };
        for i in first..args.seeds {
            let seed = args.seed + i as u64;
            println!("seed comparison: seed {seed}");
            let (r, t) = run_pair(
                args,
                dev,
                micro,
                seed,
                &seed_plan,
                &data,
                &held,
                Extras { main: false },
            )?;
            vals.push((seed, r.val_loss, t.map(|t| t.val_loss)));
        }
        let r: Vec<f64> = vals.iter().map(|v| v.1).collect();
        let t: Vec<f64> = vals.iter().filter_map(|v| v.2).collect();
        let d: Vec<f64> = vals.iter().filter_map(|v| v.2.map(|t| v.1 - t)).collect();
        let (rm, rs) = report::mean_std(&r);
        println!(
            "seed comparison ({} seeds, {}): ReMoE validation loss {rm:.4} +- {rs:.4} (mean +- sample std)",
            vals.len(),
            seed_plan.to_json()
        );
        let mut summary = json!({
            "plan": seed_plan.to_json(),
            "main_run_is_first_seed": short.is_none(),
            "runs": vals.iter().map(|v| json!({"seed": v.0, "remoe": v.1, "topk": v.2})).collect::<Vec<_>>(),
            "remoe": {"mean": rm, "std": rs},
        });
        if !t.is_empty() {
            let (tm, ts) = report::mean_std(&t);
            let (dm, ds) = report::mean_std(&d);
            println!(
                "  TopK {tm:.4} +- {ts:.4}; ReMoE - TopK {dm:+.4} +- {ds:.4} (paired by seed)"
            );
            summary["topk"] = json!({"mean": tm, "std": ts});
            summary["remoe_minus_topk"] = json!({"mean": dm, "std": ds});
        }
        seeds = summary;
    }
    println!("total wall time {:.1} s", total.elapsed().as_secs_f64());
    let config = json!({
        "flags": args.to_json(),
        "device": device_name,
        "device_memory_gib": mem.map(|m| m.1 as f64 / GIB),
        "micro_batch": micro,
        "accumulation_steps": args.batch / micro,
        "tokens_per_step": args.batch * args.seq,
        "estimated_peak_memory_gib": est / GIB,
        "plan": plan.to_json(),
        "corpus": data.info,
        "domains": data.train.names,
        "lambda0": args.lambda0, "alpha": args.alpha, "fixed_lambda": args.fixed_lambda,
        "target_sparsity": target,
        "optimiser": {"name": "AdamW", "lr": args.lr, "min_lr": args.min_lr_ratio * args.lr,
                      "warmup": args.warmup, "schedule": "linear warm-up, cosine over the budget (TopK replays ReMoE's per-step rates)",
                      "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
                      "weight_decay": args.weight_decay, "clip": args.clip},
        "precision": format!("f32 master parameters and AdamW state; MoE layers computed in bf16 (weights and activations cast per forward); all else f32 ({} matmuls)",
                             if args.no_tf32 { "full f32" } else { "TF32" }),
        "routing": "one SharedRouting per model: one lambda for all MoE layers, stepped once per optimiser step on the mean sparsity of its training forwards; evaluation and sampling forwards not recorded; the regulariser's gradient from the layers' backward at balance_grad_scale = 1 / accumulation steps",
    });
    report::write_all(
        &args.out,
        config,
        &remoe,
        topk.as_ref(),
        target,
        json!({ "seeds": seeds }),
    )
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
        lambda0: args.lambda0,
        alpha: args.alpha,
    };
    println!(
        "CPU reference run (tiny, not the GPU experiment): byte embedding -> one MoE layer (H {}, F {}, E {}, k {}) -> LM head, {} steps of {} tokens",
        s.hidden, s.ffn, s.experts, s.k, s.steps, s.batch * s.seq
    );
    if args.save.is_some() || args.resume.is_some() || args.prompt.is_some() || args.seeds > 1 {
        println!("(--save, --resume, --prompt and --seeds apply to the GPU run only)");
    }
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
        "flags": args.to_json(),
        "device": "cpu (crate reference, tiny)", "steps": s.steps, "batch": s.batch,
        "seq": s.seq, "hidden": s.hidden, "ffn": s.ffn, "experts": s.experts, "k": s.k,
        "lr": s.lr, "aux_coeff": cpu::AUX_COEFF, "seed": s.seed, "domains": train.names,
        "lambda0": s.lambda0, "alpha": s.alpha, "target_sparsity": target,
        "corpus": {"kind": "generated"},
    });
    report::write_all(&args.out, config, &remoe, topk.as_ref(), target, json!({}))
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
    fn learning_rate_warms_up_then_decays_to_the_floor() {
        let args = Args::parse_from(["train", "--warmup", "10", "--lr", "1e-3"]);
        assert!((learning_rate(&args, 0, 0, 0.0) - 1e-4).abs() < 1e-12);
        assert!((learning_rate(&args, 9, 0, 0.0) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(&args, 500, 0, 1.0) - 1e-4).abs() < 1e-12);
        // Halfway: the mean of the peak and the floor.
        assert!((learning_rate(&args, 500, 0, 0.5) - 5.5e-4).abs() < 1e-12);
        // A resumed run re-warms from its first step.
        assert!((learning_rate(&args, 200, 200, 0.0) - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn defaults_are_the_papers_182m_shape() {
        let a = Args::parse_from(["train"]);
        assert_eq!(
            (a.hidden, a.layers, a.heads, a.experts, a.k, a.ffn),
            (768, 12, 12, 8, 1, 3072)
        );
        assert_eq!(a.batch * a.seq, 16 * 1024);
        assert_eq!(a.lr, 5e-4);
        assert!(a.steps.is_none() && a.minutes == 5.0);
        a.validate().unwrap();
        // The log records the flags as set.
        let b = Args::parse_from(["train", "--lambda0", "1e-6", "--alpha", "1.5"]);
        assert_eq!(b.to_json()["lambda0"], 1e-6);
        assert_eq!(b.to_json()["alpha"], 1.5);
    }

    #[test]
    fn the_memory_estimate_picks_micro_batches_that_fit() {
        let a = Args::parse_from(["train"]);
        let gib = |m| memory_estimate(&a, m) / GIB;
        // The arithmetic of memory_estimate's comment.
        assert!((gib(4) - 45.5).abs() < 0.05, "{}", gib(4));
        assert!((gib(8) - 72.4).abs() < 0.05, "{}", gib(8));
        let h100 = 85_000_000_000u64;
        let h200 = 150_000_000_000u64;
        assert_eq!(choose_micro_batch(&a, Some(h100)), 4);
        assert_eq!(choose_micro_batch(&a, Some(h200)), 8);
        let fixed = Args::parse_from(["train", "--micro-batch", "2"]);
        assert_eq!(choose_micro_batch(&fixed, Some(h100)), 2);
    }

    #[test]
    fn batches_are_a_function_of_seed_and_step() {
        let c = Corpus::generate(1, 100_000);
        let a = batch_for_step(&c, 3, 17, 2, 64);
        assert_eq!(a.inputs, batch_for_step(&c, 3, 17, 2, 64).inputs);
        assert_ne!(a.inputs, batch_for_step(&c, 3, 18, 2, 64).inputs);
        assert_ne!(a.inputs, batch_for_step(&c, 4, 17, 2, 64).inputs);
    }
}
