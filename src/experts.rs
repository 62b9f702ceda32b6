//! The forward's expert GEMMs (up projection with SwiGLU, down projection) over one batch of
//! pairs, whoever made the batch: the one-GPU layer runs them on its own dispatch, an
//! expert-parallel owner on the rows it received. One copy of the launch code and its safety
//! argument serves both.

use crate::device::Device;
use crate::element::{ExpertGemms, HalfElement};
use crate::error::Result;
use crate::ffi;
use crate::tensor::{InputBuf, Launch, TensorView};
use crate::workspace::GrowBuf;

/// A batch of (token, expert) pairs grouped by expert, as the grouped GEMMs take it. Every
/// buffer was written for the same dispatch: the offsets describe at most `cap` pairs in at most
/// `max_tiles` row tiles, and every entry of `pair_row` below the pair count names a row of the
/// input the GEMMs gather from.
pub(crate) struct ExpertBatch<'a> {
    /// \[cap\] the input row of each pair (a token of x on one GPU; a received row on an owner).
    pub(crate) pair_row: &'a GrowBuf<u32>,
    /// \[experts+1\] expert j's pairs are `[off[j], off[j+1])`.
    pub(crate) expert_offsets: &'a GrowBuf<u32>,
    /// \[experts+1\] expert j's row tiles, likewise.
    pub(crate) tile_offsets: &'a GrowBuf<u32>,
    /// The experts of the batch (E, or an owner's E/R), whose weights are given with it.
    pub(crate) experts: usize,
    /// The pairs the row buffers hold.
    pub(crate) cap: usize,
    /// The most row tiles `cap` pairs can make: the grids' size.
    pub(crate) max_tiles: usize,
    /// H and F.
    pub(crate) hidden: usize,
    pub(crate) ffn: usize,
}

impl<'a> ExpertBatch<'a> {
    /// act = SiLU(x Wg) * (x Wu) per pair, with x the pair's row of `x` \[x_rows, H\]; writes the
    /// pre-activations g and u as well when `saved` is given (the backward needs them).
    #[allow(clippy::too_many_arguments)] // the batch, its input, three weights, three outputs
    pub(crate) fn up_swiglu<T: HalfElement>(
        &self,
        dev: &'a Device,
        gemms: &ExpertGemms,
        x: impl InputBuf<'a, T>,
        x_rows: usize,
        (gate, up): (&'a TensorView<'a, T>, &'a TensorView<'a, T>),
        act: &'a mut GrowBuf<T>,
        saved: Option<(&'a mut GrowBuf<T>, &'a mut GrowBuf<T>)>,
    ) -> Result<()> {
        if self.max_tiles == 0 {
            return Ok(());
        }
        let (h, f, e, cap) = (self.hidden, self.ffn, self.experts, self.cap);
        let mut l = Launch::on(dev);
        let xp = l.input("x", x, x_rows * h)?;
        let pt = l.input("pair rows", self.pair_row, cap)?;
        let wg = l.input("gate weight", gate, e * h * f)?;
        let wu = l.input("up weight", up, e * h * f)?;
        let ap = l.output("act", act, cap * f)?;
        let (gp, up) = match saved {
            Some((g, u)) => (
                l.output("g", g, cap * f)? as *mut u16,
                l.output("u", u, cap * f)? as *mut u16,
            ),
            None => (std::ptr::null_mut(), std::ptr::null_mut()),
        };
        let eo = l.input("expert offsets", self.expert_offsets, e + 1)?;
        let to = l.input("tile offsets", self.tile_offsets, e + 1)?;
        // SAFETY: x [x_rows,h]; wg, wu [e,h,f]; act (and g, u when saving) hold cap*f (all
        // checked by `l`); every pair row < x_rows and the offsets describe at most cap rows in
        // at most max_tiles tiles (the batch's contract); h, f multiples of 8 and every size
        // below 2^31 (validate_for_gpu).
        let code = unsafe {
            (gemms.up)(
                xp as *const u16,
                pt,
                wg as *const u16,
                wu as *const u16,
                ap as *mut u16,
                gp,
                up,
                eo,
                to,
                self.max_tiles as i32,
                e as i32,
                h as i32,
                f as i32,
                l.stream(),
            )
        };
        ffi::check("expert_up_swiglu", code)
    }

    /// y = act Wd per pair, in f32, with `k_splits` split-K planes summed into the first in
    /// plane order (y holds `k_splits` planes of cap x H).
    pub(crate) fn down<T: HalfElement>(
        &self,
        dev: &'a Device,
        gemms: &ExpertGemms,
        act: &'a GrowBuf<T>,
        down: &'a TensorView<'a, T>,
        k_splits: usize,
        y: &'a mut GrowBuf<f32>,
    ) -> Result<()> {
        if self.max_tiles == 0 {
            return Ok(());
        }
        let (h, f, e, cap) = (self.hidden, self.ffn, self.experts, self.cap);
        let mut l = Launch::on(dev);
        let ap = l.input("act", act, cap * f)?;
        let wd = l.input("down weight", down, e * f * h)?;
        let yp = l.output("expert out", y, k_splits * cap * h)?;
        let eo = l.input("expert offsets", self.expert_offsets, e + 1)?;
        let to = l.input("tile offsets", self.tile_offsets, e + 1)?;
        // SAFETY: act cap*f, wd [e,f,h], y holds k_splits planes of cap*h (checked by `l`);
        // offsets as in up_swiglu; 1 <= k_splits <= ceil(f / 64) / 8 (down_k_splits); cap < 2^31.
        let code = unsafe {
            (gemms.down)(
                ap as *const u16,
                wd as *const u16,
                yp,
                eo,
                to,
                self.max_tiles as i32,
                e as i32,
                h as i32,
                f as i32,
                k_splits as i32,
                cap as i32,
                l.stream(),
            )
        };
        ffi::check("expert_down", code)?;
        if k_splits > 1 {
            let count = l
                .input_raw("expert offsets", self.expert_offsets, e + 1)?
                .wrapping_add(e);
            // SAFETY: yp holds k_splits planes of cap*h f32 (checked above); count points at
            // expert_offsets[e], the batch's pair count <= cap; h % 8 == 0.
            let code = unsafe {
                ffi::remoe_sum_planes_f32(
                    yp,
                    k_splits as i32,
                    cap as i32,
                    count,
                    h as i32,
                    l.stream(),
                )
            };
            ffi::check("sum_planes", code)?;
        }
        Ok(())
    }
}
