//! The backward's scratch buffers: what a backward writes and reads within one call, kept in
//! the context and reused (src/backward.rs uses them; the context in src/moe.rs owns them).

use crate::config::LayerConfig;
use crate::device::Device;
use crate::error::Result;
use crate::experts::BatchGradBufs;
use crate::gemm::GemmPath;
use crate::tensor::Element;
use crate::weight_grad_split::WeightGradSplit;
use crate::workspace::{workspace, GrowBuf};

workspace! {
    /// The backward's scratch buffers, kept in the context and reused.
    pub(crate) struct BackwardScratch<T> {
        /// dR's 32-column group sums from the dAct GEMM, [capacity, ceil(F / 32)].
        row_dots: GrowBuf<f32>,
        /// [capacity] each pair's dR, and (dx_pair) [capacity, H] its share of dX: what the
        /// expert half hands the router half (over the link, on an expert-parallel rank).
        dr: GrowBuf<f32>,
        dg: GrowBuf<T>,
        du: GrowBuf<T>,
        dx_pair: GrowBuf<T>,
        /// The router's logit gradient [T, E], its dX [T, H] and dWr's partial sums.
        dl: GrowBuf<f32>,
        dxr: GrowBuf<f32>,
        partial: GrowBuf<f32>,
        /// [capacity, H] rows in pair order for the weight gradients that read them by TMA:
        /// dOut's for dWd, then X's for dWg and dWu (step 5); allocated only where the path
        /// copies them (`GemmPath::copies_pair_ordered_rows`: Hopper, F > 512), else empty.
        pair_ordered: GrowBuf<T>,
        /// The weight gradients' fixed-order split (step 5).
        wg_split: WeightGradSplit,
    }
}

impl<T: Element> BackwardScratch<T> {
    /// Sizes the expert half's buffers for `cap` pairs of experts of (H, F), `e` of them;
    /// returns how many it allocated.
    pub(crate) fn size_expert_half(
        &mut self,
        dev: &Device,
        cap: usize,
        (h, f, e): (usize, usize, usize),
        path: GemmPath,
    ) -> Result<u64> {
        let groups = f.div_ceil(32); // dR's column groups (kernels/swiglu.cuh)
        let pair_ordered = if path.copies_pair_ordered_rows(f) {
            cap * h
        } else {
            0
        };
        let grew = [
            self.row_dots.ensure(dev, cap * groups)?,
            self.dr.ensure(dev, cap)?,
            self.dg.ensure(dev, cap * f)?,
            self.du.ensure(dev, cap * f)?,
            self.dx_pair.ensure(dev, cap * h)?,
            self.pair_ordered.ensure(dev, pair_ordered)?,
        ];
        let split = self.wg_split.ensure(dev, e, h, f)?;
        Ok(grew.iter().filter(|&&g| g).count() as u64 + split)
    }

    /// Sizes the router half's buffers (and the per-pair dR and dX it reads, `cap` pairs);
    /// returns how many it allocated.
    pub(crate) fn size_router_half(
        &mut self,
        dev: &Device,
        cap: usize,
        cfg: &LayerConfig,
    ) -> Result<u64> {
        let (t, h, e) = (cfg.tokens, cfg.hidden, cfg.experts);
        let slices = router_wgrad_slices(t, h, e);
        let grew = [
            self.dr.ensure(dev, cap)?,
            self.dx_pair.ensure(dev, cap * h)?,
            self.dl.ensure(dev, t * e)?,
            self.dxr.ensure(dev, t * h)?,
            self.partial.ensure(dev, slices * h * e)?,
        ];
        Ok(grew.iter().filter(|&&g| g).count() as u64)
    }

    /// The expert half's buffers, with the context's `act` (where the dAct GEMM writes R act,
    /// dWd's operand) and its row-GEMM tile counter.
    pub(crate) fn batch_bufs<'a>(
        &'a mut self,
        act: &'a mut GrowBuf<T>,
        sched: &'a mut GrowBuf<u32>,
    ) -> BatchGradBufs<'a, T> {
        BatchGradBufs {
            dg: &mut self.dg,
            du: &mut self.du,
            act_r: act,
            row_dots: &mut self.row_dots,
            dr: &mut self.dr,
            dx_pair: &mut self.dx_pair,
            pair_ordered: &mut self.pair_ordered,
            wg_split: &mut self.wg_split,
            sched,
        }
    }
}

/// How many slices the dWr reduction over T is cut into: enough blocks to fill the GPU, each
/// slice at least 256 tokens.
pub(crate) fn router_wgrad_slices(t: usize, h: usize, e: usize) -> usize {
    let blocks_per_slice = h.div_ceil(64) * e.div_ceil(32);
    let fill = 264usize.div_ceil(blocks_per_slice).max(1);
    t.div_ceil(256).clamp(1, fill)
}
