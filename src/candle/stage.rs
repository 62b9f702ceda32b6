//! Weight staging as one candle op: a stack of matrices `[B, R, C]` transposed to `[B, C, R]`
//! and converted to another float dtype in one pass, with the same op (back to the input's
//! dtype) as its backward.
//!
//! Every forward of a trainable layer turns the per-expert \[out, in\] master weights into the
//! kernels' stacked \[E, in, out\] compute-dtype tensors, and every backward brings their
//! gradients back. Written with candle's ops (`t()` views stacked, then `to_dtype`) that is a
//! strided copy whose transposed side uses 4 of every 32 bytes it moves, then a second pass for
//! the cast, and the same again backwards. Here the stack is of the matrices as stored
//! (contiguous copies), and this op does the transpose and the cast together
//! (kernels/transpose.cu on CUDA: a shared-memory tile, so both sides move whole rows). The
//! values are the candle ops' bit for bit: a transpose moves them, and each conversion is the one
//! `to_dtype` uses for that pair.

use std::ops::Range;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

/// `[B, R, C]` to `[B, C, R]` in `to`: on CUDA f32 to bf16 or f16 and back; on the CPU any
/// float pair.
pub(crate) struct TransposeCast {
    pub(crate) to: DType,
}

impl TransposeCast {
    /// Whether the layer stages `stored` masters into `compute` with this op: f32 into bf16 or
    /// f16, the pairs (and their reverse, for the backward) the CUDA kernel has. For the others
    /// candle's own ops are as good (a same-dtype stack is one copy) or the only way (f64).
    pub(crate) fn stages(stored: DType, compute: DType) -> bool {
        stored == DType::F32 && matches!(compute, DType::BF16 | DType::F16)
    }

    /// `[B, R, C]` -> `[B, C, R]` in `to`, tracked by autograd (its backward is this op back to
    /// `x`'s dtype).
    pub(crate) fn apply(x: &Tensor, to: DType) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(TransposeCast { to })
    }
}

/// A stack of matrices' `(B, R, C)`.
pub(crate) type Dims = (usize, usize, usize);

/// The `(B, R, C)` of a contiguous rank-3 input and its element range.
fn dims(l: &Layout) -> candle_core::Result<(Dims, Range<usize>)> {
    let dims = l.shape().dims3()?;
    let Some((lo, hi)) = l.contiguous_offsets() else {
        bail!("remoe: the staged weights must be contiguous")
    };
    Ok((dims, lo..hi))
}

/// The CPU transpose, each element converted by `conv`.
fn cpu_transpose<X: Copy, Y>(src: &[X], (b, r, c): Dims, conv: impl Fn(X) -> Y) -> Vec<Y> {
    let mut out = Vec::with_capacity(b * r * c);
    for p in 0..b {
        let s = &src[p * r * c..(p + 1) * r * c];
        for j in 0..c {
            out.extend((0..r).map(|i| conv(s[i * c + j])));
        }
    }
    out
}

/// A transposed CPU tensor before its conversion: 16-bit and f32 inputs widened to f32 (exact),
/// f64 as it is. Each conversion from here is the one candle's `to_dtype` uses for that pair
/// (`bf16::from_f32`, `f16::from_f64`, `as f32`, ...), so the results are its bits.
enum Wide {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl CustomOp1 for TransposeCast {
    fn name(&self) -> &'static str {
        "remoe-transpose-cast"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((b, r, c), at) = dims(l)?;
        let d = (b, r, c);
        let wide = match s {
            CpuStorage::F32(v) => Wide::F32(cpu_transpose(&v[at], d, |x| x)),
            CpuStorage::BF16(v) => Wide::F32(cpu_transpose(&v[at], d, |x| x.to_f32())),
            CpuStorage::F16(v) => Wide::F32(cpu_transpose(&v[at], d, |x| x.to_f32())),
            CpuStorage::F64(v) => Wide::F64(cpu_transpose(&v[at], d, |x| x)),
            other => bail!("remoe: cannot stage {:?} weights", other.dtype()),
        };
        let out = match (wide, self.to) {
            (Wide::F32(v), DType::F32) => CpuStorage::F32(v),
            (Wide::F32(v), DType::BF16) => {
                CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect())
            }
            (Wide::F32(v), DType::F16) => {
                CpuStorage::F16(v.into_iter().map(f16::from_f32).collect())
            }
            (Wide::F32(v), DType::F64) => CpuStorage::F64(v.into_iter().map(f64::from).collect()),
            (Wide::F64(v), DType::F32) => {
                CpuStorage::F32(v.into_iter().map(|x| x as f32).collect())
            }
            (Wide::F64(v), DType::BF16) => {
                CpuStorage::BF16(v.into_iter().map(bf16::from_f64).collect())
            }
            (Wide::F64(v), DType::F16) => {
                CpuStorage::F16(v.into_iter().map(f16::from_f64).collect())
            }
            (Wide::F64(v), DType::F64) => CpuStorage::F64(v),
            (_, other) => bail!("remoe: cannot stage weights as {other:?}"),
        };
        Ok((out, Shape::from((b, c, r))))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (d, range) = dims(l)?;
        let out = super::cuda::transpose_cast(s, range, d, self.to)?;
        Ok((out, Shape::from((d.0, d.2, d.1))))
    }

    fn bwd(&self, arg: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = TransposeCast { to: arg.dtype() };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}
