//! [`MoeConfig`]: one MoE layer's sizes, router and shared experts.

use serde::Deserialize;

use crate::controller::{check_fixed_coefficient, check_params};
use crate::error::{Error, Result};

/// Where a checkpoint keeps a layer's parameters, relative to the layer's `VarBuilder` prefix
/// (Mixtral: `model.layers.{i}.block_sparse_moe`, the others: `model.layers.{i}.mlp`). All are
/// `nn.Linear` weights, \[out, in\].
///
/// | family | router \[E,H\] | expert j's gate, up \[F,H\], down \[H,F\] | shared expert |
/// |---|---|---|---|
/// | [`Mixtral`](Family::Mixtral) | `gate.weight` | `experts.{j}.w1.weight`, `w3`, `w2` | none |
/// | [`QwenMoe`](Family::QwenMoe) (Qwen2-MoE, Qwen3-MoE, OLMoE) | `gate.weight` | `experts.{j}.gate_proj.weight`, `up_proj`, `down_proj` | Qwen2-MoE: `shared_expert.{gate,up,down}_proj.weight`, gate `shared_expert_gate.weight` \[1,H\] |
/// | [`DeepSeek`](Family::DeepSeek) (V2-style) | `gate.weight` | as Qwen | `shared_experts.{gate,up,down}_proj.weight` |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Mixtral (`model_type` `mixtral`).
    Mixtral,
    /// Qwen2-MoE, Qwen3-MoE and OLMoE (`qwen2_moe`, `qwen3_moe`, `olmoe`).
    QwenMoe,
    /// DeepSeek V2 and V3 (`deepseek_v2`, `deepseek_v3`), greedy softmax top-k only.
    DeepSeek,
}

impl Family {
    /// The family of a `model_type`, or `None`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "mixtral" => Some(Self::Mixtral),
            "qwen2_moe" | "qwen3_moe" | "olmoe" => Some(Self::QwenMoe),
            "deepseek_v2" | "deepseek_v3" => Some(Self::DeepSeek),
            _ => None,
        }
    }

    /// The (gate, up, down) projections' names within an expert.
    pub(crate) fn projections(self) -> [&'static str; 3] {
        match self {
            Self::Mixtral => ["w1", "w3", "w2"],
            Self::QwenMoe | Self::DeepSeek => ["gate_proj", "up_proj", "down_proj"],
        }
    }
}

/// How the layer's gates are made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MoeRouter {
    /// ReMoE: R = ReLU(X Wr), with the L1 regulariser at `lambda`.
    Relu {
        /// The regulariser's coefficient.
        lambda: Lambda,
    },
    /// Softmax top-k with the Switch aux loss at `aux_coeff` (SPEC's baseline).
    TopK {
        /// The k selected gates renormalised to sum 1 (Mixtral; `norm_topk_prob`):
        /// [`RouterKind::TopKNormalized`](crate::RouterKind::TopKNormalized).
        renormalize: bool,
        /// The aux loss's coefficient c.
        aux_coeff: f64,
    },
}

/// ReMoE's regulariser coefficient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Lambda {
    /// The paper's controller, shared by every layer of a
    /// [`SharedRouting`](super::SharedRouting): starts at `lambda0`, steps by `alpha` towards
    /// the sparsity 1 - k/E.
    Adaptive {
        /// lambda_0 (the paper: 1e-8).
        lambda0: f64,
        /// The step factor (the paper: 1.2).
        alpha: f64,
    },
    /// A fixed lambda.
    Fixed(f64),
}

impl Lambda {
    /// The paper's controller: lambda_0 = 1e-8, alpha = 1.2.
    pub const PAPER: Lambda = Lambda::Adaptive {
        lambda0: 1e-8,
        alpha: 1.2,
    };
}

/// A shared expert: a SwiGLU FFN every token goes through, added to the routed output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedExpertConfig {
    /// Its inner width (DeepSeek: `n_shared_experts * moe_intermediate_size`).
    pub ffn: usize,
    /// Whether its output is scaled by sigmoid(x . w) per token (Qwen2-MoE's
    /// `shared_expert_gate`).
    pub gated: bool,
}

/// One MoE layer's configuration, built by hand or read from a Hugging Face `config.json`
/// ([`MoeConfig::from_hf_json`], or serde as part of a larger config).
///
/// The keys read (every other key of the file is ignored, so a whole model's config parses):
///
/// | key | meaning | families |
/// |---|---|---|
/// | `model_type` | which parameter names the layer takes ([`Family`]) | all |
/// | `hidden_size` | H | all |
/// | `moe_intermediate_size`, else `intermediate_size` | F, each routed expert's width (Qwen-MoE and DeepSeek keep the dense layers' width in `intermediate_size`) | all |
/// | `num_local_experts`, `num_experts`, `n_routed_experts` | E | Mixtral; Qwen-MoE, OLMoE; DeepSeek |
/// | `num_experts_per_tok` | k | all |
/// | `norm_topk_prob` | the k selected gates renormalised to sum 1 (Mixtral always does) | Qwen-MoE, OLMoE, DeepSeek |
/// | `router_aux_loss_coef` (DeepSeek: `aux_loss_alpha`) | the aux loss's coefficient c (absent: transformers' default, 0.01 for OLMoE, 0.001 otherwise) | all |
/// | `shared_expert_intermediate_size` | one sigmoid-gated shared expert of that width | Qwen2-MoE |
/// | `n_shared_experts` | shared experts of `n_shared_experts * moe_intermediate_size` together, ungated | DeepSeek |
/// | `routed_scaling_factor`, `scoring_func`, `topk_method` | see below | DeepSeek |
///
/// A checkpoint's router is always softmax top-k ([`MoeRouter::TopK`]); to train a ReMoE layer
/// from it (or from scratch), set [`MoeConfig::router`] to [`MoeRouter::Relu`].
///
/// What the kernels cannot compute is refused with [`Error::InvalidConfig`] rather than
/// approximated: DeepSeek-V3's sigmoid scoring with a selection bias (`scoring_func: sigmoid`,
/// `topk_method: noaux_tc`) and DeepSeek-V2's group-limited top-k (`group_limited_greedy`).
/// DeepSeek-V2 multiplies unnormalised gates by `routed_scaling_factor`
/// ([`routed_scale`](Self::routed_scale); with `norm_topk_prob` it does not).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Parameter names.
    pub family: Family,
    /// H.
    pub hidden_size: usize,
    /// F, each routed expert's inner width.
    pub expert_ffn: usize,
    /// E.
    pub experts: usize,
    /// k: exact for TopK, the target mean for ReMoE (sparsity target 1 - k/E).
    pub experts_per_token: usize,
    /// The router.
    pub router: MoeRouter,
    /// The shared expert, if any.
    pub shared_expert: Option<SharedExpertConfig>,
    /// The routed output's factor (DeepSeek's `routed_scaling_factor` where it applies; 1
    /// elsewhere).
    pub routed_scale: f64,
}

impl MoeConfig {
    /// A ReMoE layer of H, F, E, k with the paper's adaptive lambda, Mixtral's parameter names
    /// and no shared expert.
    pub fn remoe(hidden: usize, ffn: usize, experts: usize, k: usize) -> Self {
        Self {
            family: Family::Mixtral,
            hidden_size: hidden,
            expert_ffn: ffn,
            experts,
            experts_per_token: k,
            router: MoeRouter::Relu {
                lambda: Lambda::PAPER,
            },
            shared_expert: None,
            routed_scale: 1.0,
        }
    }

    /// The layer configuration of a Hugging Face `config.json`'s text.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        serde_json::from_str::<Self>(json)
            .map_err(|e| Error::InvalidConfig(format!("config.json: {e}")))
    }

    /// Checks what the layer needs: sizes of at least 1, 1 <= k <= E, coefficients in range
    /// ([`Error::InvalidConfig`] otherwise).
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidConfig(why));
        let (h, f, e, k) = (
            self.hidden_size,
            self.expert_ffn,
            self.experts,
            self.experts_per_token,
        );
        if h == 0 || f == 0 || e == 0 {
            return bad(format!(
                "MoeConfig: hidden ({h}), expert ffn ({f}) and experts ({e}) must be at least 1"
            ));
        }
        if k == 0 || k > e {
            return bad(format!("MoeConfig: k = {k} must be in 1..={e}"));
        }
        match self.router {
            MoeRouter::Relu {
                lambda: Lambda::Adaptive { lambda0, alpha },
            } => check_params(lambda0, alpha, 1.0 - k as f64 / e as f64)?,
            MoeRouter::Relu {
                lambda: Lambda::Fixed(c),
            } => check_fixed_coefficient(c)?,
            MoeRouter::TopK { aux_coeff, .. } => check_fixed_coefficient(aux_coeff)?,
        }
        if let Some(s) = self.shared_expert {
            if s.ffn == 0 {
                return bad("MoeConfig: a shared expert of width 0".into());
            }
        }
        if !(self.routed_scale.is_finite() && self.routed_scale > 0.0) {
            return bad(format!(
                "MoeConfig: routed_scale must be finite and positive, got {}",
                self.routed_scale
            ));
        }
        Ok(())
    }

    /// The raw API's router kind for this configuration (what [`crate::moe_forward`] takes).
    pub fn router_kind(&self) -> crate::moe::RouterKind {
        use crate::moe::RouterKind;
        match self.router {
            MoeRouter::Relu { .. } => RouterKind::Relu,
            MoeRouter::TopK {
                renormalize: false, ..
            } => RouterKind::TopK,
            MoeRouter::TopK {
                renormalize: true, ..
            } => RouterKind::TopKNormalized,
        }
    }
}

/// The aux loss coefficient of transformers' config class when the file has none.
fn default_aux_coeff(model_type: &str) -> f64 {
    match model_type {
        "olmoe" => 0.01,
        _ => 0.001,
    }
}

/// The keys of a Hugging Face config.json the layer reads.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    moe_intermediate_size: Option<usize>,
    intermediate_size: Option<usize>,
    #[serde(alias = "num_local_experts", alias = "n_routed_experts")]
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    norm_topk_prob: Option<bool>,
    #[serde(alias = "aux_loss_alpha")]
    router_aux_loss_coef: Option<f64>,
    shared_expert_intermediate_size: Option<usize>,
    n_shared_experts: Option<usize>,
    routed_scaling_factor: Option<f64>,
    scoring_func: Option<String>,
    topk_method: Option<String>,
}

impl<'de> Deserialize<'de> for MoeConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let raw = HfConfig::deserialize(d)?;
        Self::try_from(raw).map_err(serde::de::Error::custom)
    }
}

impl TryFrom<HfConfig> for MoeConfig {
    type Error = Error;

    fn try_from(c: HfConfig) -> Result<Self> {
        let bad = |why: String| Err(Error::InvalidConfig(why));
        let Some(model_type) = c.model_type.as_deref() else {
            return bad("no model_type".into());
        };
        let Some(family) = Family::from_model_type(model_type) else {
            return bad(format!(
                "model_type {model_type:?} is not an MoE family the layer knows (mixtral, \
                 qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3)"
            ));
        };
        let Some(ffn) = c.moe_intermediate_size.or(c.intermediate_size) else {
            return bad("neither moe_intermediate_size nor intermediate_size".into());
        };
        let Some(experts) = c.num_experts else {
            return bad("no num_local_experts, num_experts or n_routed_experts".into());
        };
        let Some(k) = c.num_experts_per_tok else {
            return bad("no num_experts_per_tok".into());
        };
        // Mixtral's router always renormalises (its config has no key for it).
        let renormalize = match family {
            Family::Mixtral => true,
            _ => c.norm_topk_prob.unwrap_or(false),
        };
        let mut routed_scale = 1.0;
        let mut shared_expert = None;
        match family {
            Family::Mixtral => {}
            Family::QwenMoe => {
                if let Some(w) = c.shared_expert_intermediate_size.filter(|&w| w > 0) {
                    shared_expert = Some(SharedExpertConfig {
                        ffn: w,
                        gated: true,
                    });
                }
            }
            Family::DeepSeek => {
                let scoring = c.scoring_func.as_deref().unwrap_or("softmax");
                if scoring != "softmax" {
                    return bad(format!(
                        "DeepSeek scoring_func {scoring:?}: the kernels score with softmax \
                         only (V3's sigmoid scoring with a selection bias is not computed)"
                    ));
                }
                let method = c.topk_method.as_deref().unwrap_or("greedy");
                if method != "greedy" {
                    return bad(format!(
                        "DeepSeek topk_method {method:?}: the kernels select the greedy top-k \
                         only (group-limited selection is not computed)"
                    ));
                }
                // DeepSeek-V2 scales the routed gates only when it does not renormalise them.
                if !renormalize {
                    routed_scale = c.routed_scaling_factor.unwrap_or(1.0);
                }
                if let Some(n) = c.n_shared_experts.filter(|&n| n > 0) {
                    shared_expert = Some(SharedExpertConfig {
                        ffn: n * ffn,
                        gated: false,
                    });
                }
            }
        }
        let cfg = Self {
            family,
            hidden_size: c.hidden_size,
            expert_ffn: ffn,
            experts,
            experts_per_token: k,
            router: MoeRouter::TopK {
                renormalize,
                aux_coeff: c
                    .router_aux_loss_coef
                    .unwrap_or(default_aux_coeff(model_type)),
            },
            shared_expert,
            routed_scale,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
