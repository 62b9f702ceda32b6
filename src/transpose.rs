//! Batched transposes with a dtype conversion (kernels/transpose.cu): `dst[b][c][r] =
//! convert(src[b][r][c])`. The candle layer stages its per-expert \[out, in\] master weights into
//! the kernels' stacked \[E, in, out\] compute-dtype tensors with it, and their gradients back.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ffi;
use crate::tensor::{DType, Element, InputBuf, Launch, OutputBuf};

/// The kernel's grid covers rows in tiles of 32 along its y extent (at most 65535 tiles).
const MAX_ROWS: usize = 65535 * 32;
/// Its z extent: one plane per batch.
const MAX_BATCHES: usize = 65535;

/// `dst[b][c][r] = src[b][r][c]` converted from `A` to `B` for `b < batches`, `r < rows`,
/// `c < cols`: src holds `[batches, rows, cols]`, dst `[batches, cols, rows]`, both contiguous.
/// The pairs the kernels provide: f32 to bf16 or f16 (rounded to nearest even, as candle's
/// `to_dtype` rounds) and bf16 or f16 to f32 (exact).
pub(crate) fn transpose_cast<'a, A: Element, B: Element>(
    dev: &'a Device,
    src: impl InputBuf<'a, A>,
    dst: impl OutputBuf<'a, B>,
    (batches, rows, cols): (usize, usize, usize),
) -> Result<()> {
    let (a, b) = (A::DTYPE, B::DTYPE);
    let unsupported = || {
        Error::InvalidConfig(format!(
            "no transpose from {a:?} to {b:?} (f32 to bf16 or f16, and back)"
        ))
    };
    let supported = matches!(
        (a, b),
        (DType::F32, DType::BF16 | DType::F16) | (DType::BF16 | DType::F16, DType::F32)
    );
    if !supported {
        return Err(unsupported());
    }
    let elements = batches
        .checked_mul(rows)
        .and_then(|n| n.checked_mul(cols))
        .ok_or(Error::TooLarge {
            what: "transposed tensor",
            elements: usize::MAX,
        })?;
    if rows > MAX_ROWS || batches > MAX_BATCHES {
        return Err(Error::TooLarge {
            what: if rows > MAX_ROWS {
                "transpose rows"
            } else {
                "transpose batches"
            },
            elements: rows.max(batches),
        });
    }
    let int = |what: &'static str, n: usize| {
        i32::try_from(n).map_err(|_| Error::TooLarge { what, elements: n })
    };
    let (b_i, r_i, c_i) = (
        int("transpose batches", batches)?,
        int("transpose rows", rows)?,
        int("transpose cols", cols)?,
    );
    if elements == 0 {
        return Ok(());
    }
    let mut l = Launch::on(dev);
    let sp = l.input_raw("transpose source", src, elements)?;
    let dp = l.output_raw("transpose destination", dst, elements)?;
    let s = l.stream();
    // SAFETY: src holds `elements` = batches * rows * cols elements of A and dst as many of B
    // (checked by `l`, each naturally aligned as cudarc allocates and views them); they are
    // different buffers (one borrowed shared, the other exclusively); rows <= 65535 * 32 and
    // batches <= 65535 keep the grid within its limits (its x extent, cols / 32 computed in 64
    // bits, is below 2^26), and the kernel indexes in size_t. The launcher is the one for
    // (A::DTYPE, B::DTYPE): the casts only rename A and B to the types the header declares for
    // the same layouts (u16 for bf16 and f16).
    let code = unsafe {
        match (a, b) {
            (DType::F32, DType::BF16) => {
                ffi::remoe_transpose_f32_to_bf16(sp.cast(), dp.cast(), b_i, r_i, c_i, s)
            }
            (DType::F32, DType::F16) => {
                ffi::remoe_transpose_f32_to_f16(sp.cast(), dp.cast(), b_i, r_i, c_i, s)
            }
            (DType::BF16, DType::F32) => {
                ffi::remoe_transpose_bf16_to_f32(sp.cast(), dp.cast(), b_i, r_i, c_i, s)
            }
            (DType::F16, DType::F32) => {
                ffi::remoe_transpose_f16_to_f32(sp.cast(), dp.cast(), b_i, r_i, c_i, s)
            }
            _ => return Err(unsupported()),
        }
    };
    ffi::check("transpose", code)
}
