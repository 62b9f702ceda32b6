//! The shape of one MoE layer and its validation.

use crate::error::{Error, Result};

/// The sizes of one MoE layer, named as in docs/SPEC.md (section 1).
///
/// `k` is the number of active experts per token: exact for TopK, the target mean for ReMoE (it
/// sets the regulariser's scale and the sparsity target `1 - k/E`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerConfig {
    /// T: tokens in the batch. Zero is allowed (an empty batch).
    pub tokens: usize,
    /// H: hidden size.
    pub hidden: usize,
    /// F: the SwiGLU inner size of each expert.
    pub ffn: usize,
    /// E: number of experts.
    pub experts: usize,
    /// k: active experts per token (TopK) or their target mean (ReMoE).
    pub k: usize,
}

/// The largest element count a kernel indexes with `int32`.
pub const MAX_I32_ELEMENTS: usize = i32::MAX as usize;

impl LayerConfig {
    /// The sizes in docs/SPEC.md's order: T tokens, hidden size H, expert FFN size F, E experts, k
    /// active experts per token (TopK; ReMoE's target sparsity is 1 - k/E).
    pub fn new(tokens: usize, hidden: usize, ffn: usize, experts: usize, k: usize) -> Self {
        Self {
            tokens,
            hidden,
            ffn,
            experts,
            k,
        }
    }

    /// Checks what the math needs: H, F, E at least 1 and 1 <= k <= E.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidConfig(why));
        if self.hidden == 0 || self.ffn == 0 || self.experts == 0 {
            return bad(format!(
                "hidden ({}), ffn ({}) and experts ({}) must all be at least 1",
                self.hidden, self.ffn, self.experts
            ));
        }
        if self.k == 0 || self.k > self.experts {
            return bad(format!(
                "k = {} must be between 1 and the number of experts ({})",
                self.k, self.experts
            ));
        }
        Ok(())
    }

    /// Checks what the GPU kernels need on top of [`validate`](Self::validate): H and F
    /// multiples of 8 (the kernels move rows as 16-byte vectors of eight 16-bit values), and
    /// every tensor of the layer small enough for 32-bit element indices.
    pub fn validate_for_gpu(&self) -> Result<()> {
        self.validate()?;
        for (name, v) in [("hidden", self.hidden), ("ffn", self.ffn)] {
            if v % 8 != 0 {
                return Err(Error::InvalidConfig(format!(
                    "{name} = {v} must be a multiple of 8 for the GPU kernels"
                )));
            }
        }
        let t = self.tokens;
        let (h, f, e) = (self.hidden, self.ffn, self.experts);
        // Row counts (T, and up to T*E routed pairs) are int32 in the kernels; byte offsets into
        // row-major tensors are computed in 64 bits, so [T*E, F] may exceed 2^31 elements.
        let sizes: [(&'static str, Option<usize>); 4] = [
            ("X [T,H]", t.checked_mul(h)),
            ("logits [T,E]", t.checked_mul(e)),
            (
                "expert weights [E,H,F]",
                e.checked_mul(h).and_then(|v| v.checked_mul(f)),
            ),
            ("router weight [H,E]", h.checked_mul(e)),
        ];
        for (what, n) in sizes {
            match n {
                Some(n) if n <= MAX_I32_ELEMENTS => {}
                Some(n) => return Err(Error::TooLarge { what, elements: n }),
                None => {
                    return Err(Error::TooLarge {
                        what,
                        elements: usize::MAX,
                    })
                }
            }
        }
        Ok(())
    }

    /// The sparsity the adaptive controller steers to: `1 - k/E`.
    pub fn target_sparsity(&self) -> f64 {
        1.0 - self.k as f64 / self.experts as f64
    }
}
