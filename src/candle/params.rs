//! The layer's parameters: taken through a `VarBuilder` at a checkpoint's names, and turned into
//! the stacked compute-dtype tensors the kernels take.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::config::{Family, MoeConfig};
use super::ops::{candle_err, lock};
use super::stage::TransposeCast;
use super::INIT;
use crate::error::{Error, WeightsError};

/// The routed experts' and router's parameters.
pub(crate) enum Routed {
    /// In the kernels' layout and the compute dtype, used as they are: router \[H,E\], gate and
    /// up \[E,H,F\], down \[E,F,H\] (a checkpoint's constant tensors, stacked once at
    /// construction).
    Stacked([Tensor; 4]),
    /// At a checkpoint's names and in its layout (trainable `Var`s): router \[E,H\] and each
    /// expert's gate, up \[F,H\] and down \[H,F\], stacked by every forward.
    PerExpert {
        router: Tensor,
        experts: Vec<[Tensor; 3]>,
    },
}

impl Routed {
    /// The kernels' tensors in `dtype` (see [`stack`]).
    pub(crate) fn compute(&self, dtype: DType) -> candle_core::Result<[Tensor; 4]> {
        match self {
            Self::Stacked(t) => Ok(t.clone()),
            Self::PerExpert { router, experts } => stack(router, experts, dtype),
        }
    }
}

/// A checkpoint's per-expert \[out, in\] matrices as the kernels' stacked tensors in `dtype`:
/// router \[E,H\] -> \[H,E\]; gate, up \[F,H\] -> \[E,H,F\]; down \[H,F\] -> \[E,F,H\].
///
/// Tracked by autograd, so each expert's `Var` gets its gradient back through it. f32 masters
/// computed in bf16 or f16 (mixed-precision training) are stacked as stored (contiguous copies)
/// and then transposed and cast by one [`TransposeCast`] (whose backward is the same op the other
/// way); per forward the three expert projections move about 3 E H F (4 + 4 + 4 + 2 + 2) bytes
/// (the stack's read and write, the op's read, its output's zero fill and write: at SPEC's config
/// A, E H F = 8 x 768 x 3072, 1.0 GB), about as much as candle's strided stack and cast did, but
/// with every access along rows. Other dtype pairs (masters already in `dtype`, or f64) take
/// candle's ops: the transposed views stacked (one strided copy), then `to_dtype`.
pub(crate) fn stack(
    router: &Tensor,
    experts: &[[Tensor; 3]],
    dtype: DType,
) -> candle_core::Result<[Tensor; 4]> {
    let staged = |mats: &[&Tensor]| -> candle_core::Result<Tensor> {
        let stored = mats.first().map_or(dtype, |m| m.dtype());
        if TransposeCast::stages(stored, dtype) {
            TransposeCast::apply(&Tensor::stack(mats, 0)?, dtype)
        } else {
            let views = mats
                .iter()
                .map(|m| m.t())
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::stack(&views, 0)?.to_dtype(dtype)?.contiguous()
        }
    };
    let each = |i: usize| staged(&experts.iter().map(|w| &w[i]).collect::<Vec<_>>());
    Ok([staged(&[router])?.squeeze(0)?, each(0)?, each(1)?, each(2)?])
}

/// A shared expert's parameters (\[out, in\], the stored dtype): gate and up \[Fs,H\], down
/// \[H,Fs\], and Qwen2-MoE's sigmoid gate \[1,H\].
pub(crate) struct SharedExpert {
    pub(crate) gate: Tensor,
    pub(crate) up: Tensor,
    pub(crate) down: Tensor,
    pub(crate) gate_weight: Option<Tensor>,
}

impl SharedExpert {
    /// down(SiLU(x gate^T) * (x up^T)), times sigmoid(x w^T) when gated, for x \[T,H\] in the
    /// compute dtype; plain candle ops, so autograd differentiates it.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dt = x.dtype();
        let lin = |w: &Tensor, x: &Tensor| x.matmul(&w.to_dtype(dt)?.t()?);
        let a = (lin(&self.gate, x)?.silu()? * lin(&self.up, x)?)?;
        let y = lin(&self.down, &a)?;
        match &self.gate_weight {
            None => Ok(y),
            Some(w) => y.broadcast_mul(&candle_nn::ops::sigmoid(&lin(w, x)?)?),
        }
    }
}

/// The parameters of `cfg`'s layer from `vb` (the layer's prefix: Mixtral
/// `model.layers.{i}.block_sparse_moe`, the others `model.layers.{i}.mlp`), created with
/// [`INIT`] where `vb` is backed by a `VarMap` that does not hold them yet.
pub(crate) fn from_builder(
    cfg: &MoeConfig,
    vb: &VarBuilder,
    compute: DType,
) -> candle_core::Result<(Routed, Option<SharedExpert>)> {
    let (h, f, e) = (cfg.hidden_size, cfg.expert_ffn, cfg.experts);
    let weight = |vb: VarBuilder, shape: (usize, usize)| vb.get_with_hints(shape, "weight", INIT);
    let router = weight(vb.pp("gate"), (e, h))?;
    let [pg, pu, pd] = cfg.family.projections();
    let experts = (0..e)
        .map(|j| {
            let v = vb.pp("experts").pp(j);
            Ok([
                weight(v.pp(pg), (f, h))?,
                weight(v.pp(pu), (f, h))?,
                weight(v.pp(pd), (h, f))?,
            ])
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let shared = match cfg.shared_expert {
        None => None,
        Some(s) => {
            let v = vb.pp(match cfg.family {
                Family::DeepSeek => "shared_experts",
                Family::Mixtral | Family::QwenMoe => "shared_expert",
            });
            Some(SharedExpert {
                gate: weight(v.pp("gate_proj"), (s.ffn, h))?,
                up: weight(v.pp("up_proj"), (s.ffn, h))?,
                down: weight(v.pp("down_proj"), (h, s.ffn))?,
                gate_weight: if s.gated {
                    Some(weight(vb.pp("shared_expert_gate"), (1, h))?)
                } else {
                    None
                },
            })
        }
    };
    // Constants (an mmapped checkpoint, for inference) are stacked once here; Vars are stacked
    // by each forward so that their gradients reach them.
    let trainable = router.is_variable() || experts.iter().flatten().any(|t| t.is_variable());
    let routed = if trainable {
        Routed::PerExpert { router, experts }
    } else {
        Routed::Stacked(stack(&router, &experts, compute)?)
    };
    Ok((routed, shared))
}

/// Sets every `Var` of `varmap` from the safetensors files `shards` (a sharded checkpoint, in
/// any order), converting dtypes; returns how many were set. Tensors of the files that the
/// map does not hold are skipped (the layers a model did not build); a `Var` that no shard
/// holds is [`WeightsError::Missing`], and a shape that differs is candle's shape error.
///
/// Each shard is read whole into memory, one at a time, and only the tensors the map holds are
/// converted. It does not map the files: a mapped file that changes while it is read is
/// undefined behaviour, which a safe function cannot rule out (candle's
/// `VarBuilder::from_mmaped_safetensors` is `unsafe` for that reason; a model that only runs
/// inference can take its constants from there directly, and [`MoeLayer::new`](super::MoeLayer::new)
/// stacks them once). The model's `VarMap` is then the one source of parameters, for the
/// optimiser and for `varmap.save()`.
pub fn load_shards_into_varmap<P: AsRef<Path>>(
    varmap: &VarMap,
    shards: &[P],
) -> candle_core::Result<usize> {
    let vars = lock(varmap.data());
    let mut missing: BTreeSet<&str> = vars.keys().map(String::as_str).collect();
    for path in shards {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| {
            candle_err(Error::Weights(WeightsError::Io(format!(
                "{}: {e}",
                path.display()
            ))))
        })?;
        let st = candle_core::safetensors::SliceSafetensors::new(&bytes)?;
        for (name, _) in st.tensors() {
            let Some(var) = vars.get(&name) else {
                continue;
            };
            let t = st
                .load(&name, &candle_core::Device::Cpu)?
                .to_dtype(var.dtype())?
                .to_device(var.device())?;
            var.set(&t).map_err(|e| {
                candle_core::Error::Msg(format!("remoe: {name} from {}: {e}", path.display()))
            })?;
            missing.remove(name.as_str());
        }
    }
    if let Some(first) = missing.first() {
        return Err(candle_err(Error::Weights(WeightsError::Missing {
            name: if missing.len() == 1 {
                first.to_string()
            } else {
                format!("{first} (and {} more)", missing.len() - 1)
            },
        })));
    }
    Ok(vars.len())
}
