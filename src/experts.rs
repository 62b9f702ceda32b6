//! The expert GEMMs over one batch of pairs, forward (up projection with SwiGLU, down
//! projection) and backward (dAct, dR, dX per pair, the weight gradients), whoever made
//! the batch: the one-GPU layer runs them on its own dispatch, an expert-parallel owner on the
//! rows it received. One copy of the launch code and its safety argument serves both.

use cudarc::driver::CudaView;

use crate::device::Device;
use crate::element::{ExpertGemms, HalfElement};
use crate::error::Result;
use crate::ffi;
use crate::gather::gather_rows;
use crate::gemm::GemmPath;
use crate::tensor::{DeviceTensor, Element, InputBuf, Launch, TensorView};
use crate::weight_grad_split::WeightGradSplit;
use crate::workspace::GrowBuf;

/// Words of a row-GEMM tile counter (`sched` in kernels/remoe_kernels.h): the Hopper row GEMMs
/// take their tiles from it in order and leave it at zero when they finish, with nothing from
/// the host (kernels/hopper_gemm.cu, take_row_unit, says why that is safe). So it is allocated
/// zeroed once and never written by the host, nor poisoned; and the launches given one counter
/// must be stream-ordered: each context owns one, and every launch of a context is on its
/// device's stream.
pub(crate) const ROW_SCHED_WORDS: usize = 2;

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
    /// pre-activations g and u as well when `saved` is given (the backward needs them). `sched`
    /// is the context's tile counter ([`ROW_SCHED_WORDS`]).
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
        sched: &'a mut GrowBuf<u32>,
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
        let sp = l.output_raw("row-GEMM tile counter", sched, ROW_SCHED_WORDS)?;
        // SAFETY: x [x_rows,h]; wg, wu [e,h,f]; act (and g, u when saving) hold cap*f; the tile
        // counter ROW_SCHED_WORDS (all checked by `l`); every pair row < x_rows and the offsets
        // describe at most cap rows in at most max_tiles tiles (the batch's contract); h, f
        // multiples of 8 and every size below 2^31 (validate_for_gpu).
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
                sp,
                self.max_tiles as i32,
                e as i32,
                h as i32,
                f as i32,
                l.stream(),
            )
        };
        ffi::check("expert_up_swiglu", code)
    }

    /// y = act Wd per pair, summed in f32 and rounded once to T (y \[cap, H\]). With
    /// `k_splits` > 1 (split-K) the GEMM writes each K range's f32 partial sums to its plane of
    /// `partials` (`k_splits` planes of cap x H) and the plane sum adds them in plane order and
    /// rounds the total into y; with one range `partials` is neither read nor written (it may be
    /// empty). `sched` as in `up_swiglu`.
    #[allow(clippy::too_many_arguments)] // the batch, its input, the weight, the split, y, sched
    pub(crate) fn down<T: HalfElement>(
        &self,
        dev: &'a Device,
        gemms: &ExpertGemms,
        act: &'a GrowBuf<T>,
        down: &'a TensorView<'a, T>,
        k_splits: usize,
        (y, partials): (&'a mut GrowBuf<T>, &'a mut GrowBuf<f32>),
        sched: &'a mut GrowBuf<u32>,
    ) -> Result<()> {
        if self.max_tiles == 0 {
            return Ok(());
        }
        let (h, f, e, cap) = (self.hidden, self.ffn, self.experts, self.cap);
        let mut l = Launch::on(dev);
        let ap = l.input("act", act, cap * f)?;
        let wd = l.input("down weight", down, e * f * h)?;
        let yp = l.output("expert out", y, cap * h)? as *mut u16;
        let pp = if k_splits > 1 {
            l.output("split-K partial sums", partials, k_splits * cap * h)?
        } else {
            std::ptr::null_mut()
        };
        let eo = l.input("expert offsets", self.expert_offsets, e + 1)?;
        let to = l.input("tile offsets", self.tile_offsets, e + 1)?;
        let sp = l.output_raw("row-GEMM tile counter", sched, ROW_SCHED_WORDS)?;
        // SAFETY: act cap*f, wd [e,f,h], y cap*h, the partial sums k_splits planes of cap*h when
        // k_splits > 1 (null otherwise, which the launcher then does not touch), the tile counter
        // ROW_SCHED_WORDS (checked by `l`); offsets as in up_swiglu; 1 <= k_splits <=
        // ceil(f / 64) / 8 (down_k_splits); cap < 2^31.
        let code = unsafe {
            (gemms.down)(
                ap as *const u16,
                wd as *const u16,
                yp,
                pp,
                eo,
                to,
                sp,
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
            // SAFETY: pp holds k_splits planes of cap*h f32 and yp cap*h elements of T (checked
            // above); count points at expert_offsets[e], the batch's pair count <= cap;
            // h % 8 == 0.
            let code = unsafe {
                (T::SUM_PLANES)(
                    pp,
                    k_splits as i32,
                    cap as i32,
                    count,
                    yp,
                    h as i32,
                    l.stream(),
                )
            };
            ffi::check("sum_planes", code)?;
        }
        Ok(())
    }
}

/// What a batch's backward reads besides its own buffers: the rows its forward gathered (x on
/// one GPU, the received rows on an owner) and the output gradient's rows, both indexed by the
/// batch's `pair_row`, the pairs' gates, the saved pre-activations and the batch's weights.
pub(crate) struct BatchGradInputs<'a, T: HalfElement> {
    /// \[x_rows, H\].
    pub(crate) x: CudaView<'a, T>,
    pub(crate) x_rows: usize,
    /// \[dout_rows, H\].
    pub(crate) dout: CudaView<'a, T>,
    pub(crate) dout_rows: usize,
    /// \[cap\] the gate of each pair.
    pub(crate) pair_gate: &'a GrowBuf<f32>,
    /// \[cap, F\] the forward's g and u.
    pub(crate) g: &'a GrowBuf<T>,
    pub(crate) u: &'a GrowBuf<T>,
    /// The batch's experts' weights (Wg, Wu \[experts, H, F\], Wd \[experts, F, H\]).
    pub(crate) gate: &'a TensorView<'a, T>,
    pub(crate) up: &'a TensorView<'a, T>,
    pub(crate) down: &'a TensorView<'a, T>,
}

/// The per-pair buffers of a batch's backward, sized for its capacity (`pair_ordered` only where
/// [`GemmPath::copies_pair_ordered_rows`]).
pub(crate) struct BatchGradBufs<'a, T: Element> {
    /// \[cap, F\].
    pub(crate) dg: &'a mut GrowBuf<T>,
    pub(crate) du: &'a mut GrowBuf<T>,
    /// \[cap, F\] R act, act recomputed from g and u (the forward's bits) and scaled by the
    /// pair's gate (dWd's operand; kernels/swiglu.cuh, gated_act, has its rounding).
    pub(crate) act_r: &'a mut GrowBuf<T>,
    /// \[cap, ceil(F / 32)\] dR's column-group sums.
    pub(crate) row_dots: &'a mut GrowBuf<f32>,
    /// \[cap\] dR.
    pub(crate) dr: &'a mut GrowBuf<f32>,
    /// \[cap, H\] each pair's share of dX.
    pub(crate) dx_pair: &'a mut GrowBuf<T>,
    /// \[cap, H\] rows in pair order for the weight gradients that read them by TMA: dOut's for
    /// dWd, then X's for dWg and dWu (where [`GemmPath::copies_pair_ordered_rows`]; else empty).
    pub(crate) pair_ordered: &'a mut GrowBuf<T>,
    pub(crate) wg_split: &'a mut WeightGradSplit,
    /// The context's tile counter for the dAct and dX GEMMs ([`ROW_SCHED_WORDS`]).
    pub(crate) sched: &'a mut GrowBuf<u32>,
}

/// The batch's weight gradients \[experts, ...\] f32, overwritten or accumulated into.
pub(crate) struct BatchWeightGrads<'a> {
    pub(crate) gate: &'a mut DeviceTensor<f32>,
    pub(crate) up: &'a mut DeviceTensor<f32>,
    pub(crate) down: &'a mut DeviceTensor<f32>,
    pub(crate) accumulate: bool,
    /// The pairs of the whole reduction the hot experts' chunks are cut for: None for the
    /// batch's own; an expert-parallel owner gives all ranks' pairs, so that its gradients are
    /// bit for bit those of one GPU over every rank's tokens.
    pub(crate) chunking_pairs: Option<usize>,
}

impl ExpertBatch<'_> {
    /// The expert half of the backward, in order: the dAct GEMM (dg, du, R act, dR's groups),
    /// dR per pair, dX per pair, and the weight gradients. What the router half needs from it
    /// is `dr` and `dx_pair`.
    pub(crate) fn backward<T: HalfElement>(
        &self,
        dev: &Device,
        path: GemmPath,
        inp: &BatchGradInputs<'_, T>,
        bufs: &mut BatchGradBufs<'_, T>,
        out: BatchWeightGrads<'_>,
    ) -> Result<()> {
        let gemms = path.gemms::<T>();
        self.dact(dev, &gemms, inp, bufs)?;
        self.pair_dr(dev, bufs)?;
        self.dx(dev, &gemms, inp, bufs)?;
        self.weight_grads(dev, path, &gemms, inp, bufs, out)
    }

    fn dact<T: HalfElement>(
        &self,
        dev: &Device,
        gemms: &ExpertGemms,
        inp: &BatchGradInputs<'_, T>,
        bufs: &mut BatchGradBufs<'_, T>,
    ) -> Result<()> {
        if self.max_tiles == 0 {
            return Ok(());
        }
        let (h, f, e, cap) = (self.hidden, self.ffn, self.experts, self.cap);
        let groups = f.div_ceil(32);
        let mut l = Launch::on(dev);
        let d = l.input("dout", inp.dout.slice(..), inp.dout_rows * h)?;
        let pt = l.input("pair rows", self.pair_row, cap)?;
        let pg = l.input("pair gates", inp.pair_gate, cap)?;
        let wd = l.input("down weight", inp.down, e * f * h)?;
        let g = l.input("g", inp.g, cap * f)?;
        let u = l.input("u", inp.u, cap * f)?;
        let dg = l.output("dg", &mut *bufs.dg, cap * f)?;
        let du = l.output("du", &mut *bufs.du, cap * f)?;
        let act_r = l.output("R act", &mut *bufs.act_r, cap * f)?;
        let dots = l.output("row dots", &mut *bufs.row_dots, cap * groups)?;
        let eo = l.input("expert offsets", self.expert_offsets, e + 1)?;
        let to = l.input("tile offsets", self.tile_offsets, e + 1)?;
        let sp = l.output_raw("row-GEMM tile counter", &mut *bufs.sched, ROW_SCHED_WORDS)?;
        // SAFETY: dout [dout_rows,h] and every pair row below dout_rows (the batch's contract);
        // pair gates [cap]; wd [e,f,h]; g, u, dg, du, R act [cap,f]; row dots [cap, ceil(f/32)];
        // the tile counter ROW_SCHED_WORDS (all checked by `l`); the offsets describe at most
        // cap rows in at most max_tiles tiles.
        let code = unsafe {
            (gemms.dact)(
                d as *const u16,
                pt,
                pg,
                wd as *const u16,
                g as *const u16,
                u as *const u16,
                dg as *mut u16,
                du as *mut u16,
                act_r as *mut u16,
                dots,
                eo,
                to,
                sp,
                self.max_tiles as i32,
                e as i32,
                h as i32,
                f as i32,
                l.stream(),
            )
        };
        ffi::check("expert_dact", code)
    }

    /// dR's data term per pair, the sum of its column groups (kernels/backward.cu).
    fn pair_dr<T: Element>(&self, dev: &Device, bufs: &mut BatchGradBufs<'_, T>) -> Result<()> {
        let (f, e, cap) = (self.ffn, self.experts, self.cap);
        if cap == 0 {
            return Ok(());
        }
        let groups = f.div_ceil(32);
        let mut l = Launch::on(dev);
        let dots = l.input("row dots", &*bufs.row_dots, cap * groups)?;
        let dr = l.output("dr", &mut *bufs.dr, cap)?;
        // The pair count = expert_offsets[e], read by the kernel.
        let count = l
            .input_raw("expert offsets", self.expert_offsets, e + 1)?
            .wrapping_add(e);
        // SAFETY: row dots [cap, groups] (the first |A| rows written by the dAct GEMM); dr [cap]
        // (checked by `l`); count points at expert_offsets[e] <= cap.
        let code =
            unsafe { ffi::remoe_pair_dr(dots, groups as i32, dr, count, cap as i32, l.stream()) };
        ffi::check("pair_dr", code)
    }

    fn dx<T: HalfElement>(
        &self,
        dev: &Device,
        gemms: &ExpertGemms,
        inp: &BatchGradInputs<'_, T>,
        bufs: &mut BatchGradBufs<'_, T>,
    ) -> Result<()> {
        if self.max_tiles == 0 {
            return Ok(());
        }
        let (h, f, e, cap) = (self.hidden, self.ffn, self.experts, self.cap);
        let mut l = Launch::on(dev);
        let dg = l.input("dg", &*bufs.dg, cap * f)?;
        let du = l.input("du", &*bufs.du, cap * f)?;
        let wg = l.input("gate weight", inp.gate, e * h * f)?;
        let wu = l.input("up weight", inp.up, e * h * f)?;
        let dxp = l.output("dx pair", &mut *bufs.dx_pair, cap * h)?;
        let eo = l.input("expert offsets", self.expert_offsets, e + 1)?;
        let to = l.input("tile offsets", self.tile_offsets, e + 1)?;
        let sp = l.output_raw("row-GEMM tile counter", &mut *bufs.sched, ROW_SCHED_WORDS)?;
        // SAFETY: dg, du [cap,f]; wg, wu [e,h,f]; dx pair [cap,h]; the tile counter
        // ROW_SCHED_WORDS (checked by `l`); offsets as in dact.
        let code = unsafe {
            (gemms.dx)(
                dg as *const u16,
                du as *const u16,
                wg as *const u16,
                wu as *const u16,
                dxp as *mut u16,
                eo,
                to,
                sp,
                self.max_tiles as i32,
                e as i32,
                h as i32,
                f as i32,
                l.stream(),
            )
        };
        ffi::check("expert_dx", code)
    }

    /// dWd, dWg and dWu per expert, each a fixed-order reduction over the expert's pairs
    /// (launched even with no pairs: they write the zeros). dWd is computed transposed, as dWg
    /// and dWu are shaped: dWd_e^T = dOut_e^T (R act)_e (\[H, F\], dOut_e the expert's pairs'
    /// rows of dOut), stored transposed into dWd's \[E, F, H\]; dWg_e = X_e^T dg_e, dWu_e =
    /// X_e^T du_e. So no per-pair R dOut row is ever written: the dAct GEMM wrote R act.
    fn weight_grads<T: HalfElement>(
        &self,
        dev: &Device,
        path: GemmPath,
        gemms: &ExpertGemms,
        inp: &BatchGradInputs<'_, T>,
        bufs: &mut BatchGradBufs<'_, T>,
        out: BatchWeightGrads<'_>,
    ) -> Result<()> {
        let (h, f, e, cap) = (self.hidden, self.ffn, self.experts, self.cap);
        // The chunk plan first: the counts decide on the device whether a hot expert's
        // reduction is split.
        bufs.wg_split
            .plan(dev, self.expert_offsets, (h, f), out.chunking_pairs)?;
        let launch = WeightGradLaunch {
            gemms,
            cap,
            experts: e,
            accumulate: out.accumulate,
        };
        // Where the Hopper kernel's cp.async gather would cost more than a copy, it reads the
        // rows in pair order by TMA, which cannot gather (gemm.rs, HOPPER_WG_GATHER_MAX_FFN):
        // dOut's rows copied into `pair_ordered` for dWd, then X's over them for dWg and dWu (the
        // launches are stream-ordered). Otherwise both paths gather inside their loads.
        let copies = path.copies_pair_ordered_rows(f) && cap > 0;
        {
            let mut l = Launch::on(dev);
            let dout = (&inp.dout, inp.dout_rows);
            let into = copies.then_some(&mut *bufs.pair_ordered);
            let a = self.rows_in_pair_order(dev, &mut l, dout, into)?;
            let act_r = l.input("R act", &*bufs.act_r, cap * f)?;
            let eo = l.input("expert offsets", self.expert_offsets, e + 1)?;
            let o = l.output("dWd", &mut *out.down, e * f * h)?;
            let split = bufs.wg_split.launch_args(&mut l)?;
            let store = Store::Transposed(o);
            launch.run(a, act_r as _, store, eo, (h, f), &split, l.stream(), "dWd")?;
        }
        let mut l = Launch::on(dev);
        let x = (&inp.x, inp.x_rows);
        let into = copies.then_some(&mut *bufs.pair_ordered);
        let a = self.rows_in_pair_order(dev, &mut l, x, into)?;
        let dg = l.input("dg", &*bufs.dg, cap * f)?;
        let du = l.input("du", &*bufs.du, cap * f)?;
        let eo = l.input("expert offsets", self.expert_offsets, e + 1)?;
        let og = Store::Plain(l.output("dWg", &mut *out.gate, e * h * f)?);
        let ou = Store::Plain(l.output("dWu", &mut *out.up, e * h * f)?);
        let split = bufs.wg_split.launch_args(&mut l)?;
        launch.run(a, dg as _, og, eo, (h, f), &split, l.stream(), "dWg")?;
        launch.run(a, du as _, ou, eo, (h, f), &split, l.stream(), "dWu")
    }

    /// A weight gradient's A operand, `src`'s rows (\[src_rows, H\]) in pair order: copied now
    /// into `pair_ordered` when one is given (kernels/gather.cu), else `src` read through the
    /// pairs' rows by the weight-gradient kernel. The same rows either way, so the same sums and
    /// bits.
    fn rows_in_pair_order<'a, T: Element>(
        &'a self,
        dev: &'a Device,
        l: &mut Launch<'a>,
        (src, src_rows): (&'a CudaView<'_, T>, usize),
        pair_ordered: Option<&'a mut GrowBuf<T>>,
    ) -> Result<Operand> {
        let (h, e, cap) = (self.hidden, self.experts, self.cap);
        let Some(pair_ordered) = pair_ordered else {
            return Ok(Operand {
                rows: l.input("gathered rows", src.slice(..), src_rows * h)? as *const u16,
                gather: l.input("pair rows", self.pair_row, cap)?,
                count: src_rows,
            });
        };
        let count = (self.expert_offsets, e);
        gather_rows(
            dev,
            src.slice(..),
            src_rows,
            self.pair_row,
            &mut *pair_ordered,
            count,
            cap,
            h,
        )?;
        let pair_ordered: &'a GrowBuf<T> = pair_ordered;
        Ok(Operand {
            rows: l.input("rows in pair order", pair_ordered, cap * h)? as *const u16,
            gather: std::ptr::null(),
            count: cap,
        })
    }
}

/// The A operand of a weight gradient: `count` rows, read in pair order through `gather` when
/// it is not null.
#[derive(Clone, Copy)]
struct Operand {
    rows: *const u16,
    gather: *const u32,
    count: usize,
}

/// Where a weight gradient's \[m, n\] sums go: `out` \[experts, m, n\] (f32), or transposed into
/// `out` \[experts, n, m\] (dWd, computed as dOut^T (R act)).
#[derive(Clone, Copy)]
enum Store {
    Plain(*mut f32),
    Transposed(*mut f32),
}

/// One weight-gradient launch's fixed arguments.
struct WeightGradLaunch<'g> {
    gemms: &'g ExpertGemms,
    cap: usize,
    experts: usize,
    accumulate: bool,
}

impl WeightGradLaunch<'_> {
    /// out\[e\] (+)= A_e^T B_e (or its transpose, as `store` says), A's rows m wide and B's
    /// \[cap, n\].
    #[allow(clippy::too_many_arguments)] // the operands, the offsets, the split, the stream
    fn run(
        &self,
        a: Operand,
        b: *const u16,
        store: Store,
        expert_offsets: *const u32,
        (m, n): (usize, usize),
        split: &ffi::remoe_wgrad_split_t,
        stream: ffi::remoe_stream_t,
        what: &'static str,
    ) -> Result<()> {
        let (out, transposed) = match store {
            Store::Plain(out) => (out, false),
            Store::Transposed(out) => (out, true),
        };
        let store = ffi::remoe_wgrad_store_t {
            out,
            accumulate: self.accumulate as i32,
            transposed: transposed as i32,
        };
        // SAFETY: the caller took every pointer from one Launch that checked it: a holds
        // a.count rows of m columns (indexed by the gathered pair, each gathered row < a.count,
        // when gather is not null), b [cap, n], out [experts, m, n] or [experts, n, m] f32 (the
        // same elements); the offsets [experts+1] describe at most cap pairs; split's plan was
        // written for these offsets and h x f (= m x n: every weight gradient here is computed
        // h x f, dWd's as its transpose), its slots and counters sized for (experts, h, f), the
        // counters zero (WeightGradSplit).
        let code = unsafe {
            (self.gemms.weight_grad)(
                a.rows,
                a.gather,
                b,
                store,
                expert_offsets,
                a.count as i32,
                self.cap as i32,
                self.experts as i32,
                m as i32,
                n as i32,
                split,
                stream,
            )
        };
        ffi::check(what, code)
    }
}
