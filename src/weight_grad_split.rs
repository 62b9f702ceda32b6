//! The expert weight gradients' fixed-order split (kernels/weight_grad_split.cu{h}): the
//! buffers a backward needs for it, and their launch arguments.
//!
//! A hot expert's reduction over its pairs may be cut into chunks whose partial sums the
//! weight-gradient kernels add in chunk order (bitwise repeatable, the same bits on both GEMM
//! paths). Whether and how is planned on the device from the counts, once per backward, so
//! nothing is read back and a CUDA graph captures it. The plan serves dWg, dWu and dWd alike.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ffi;
use crate::tensor::Launch;
use crate::workspace::GrowBuf;

/// The plan, the partial-sum slots and the per-tile arrival counters, sized for the last
/// backward's (E, H, F).
#[derive(Debug, Default)]
pub(crate) struct WeightGradSplit {
    /// [3E + 1]: chunk offsets, chunk lengths, first slots per expert.
    plan: GrowBuf<u32>,
    /// Empty when no split is possible at this shape.
    slots: GrowBuf<f32>,
    /// Zero when allocated, and every launch leaves them zero: never poisoned.
    counters: GrowBuf<u32>,
    experts: usize,
}

impl WeightGradSplit {
    /// Sizes the buffers for E experts of H x F weights; returns how many it allocated.
    pub(crate) fn ensure(&mut self, dev: &Device, e: usize, h: usize, f: usize) -> Result<u64> {
        let (mut plan_words, mut slot_floats, mut counters) = (0u64, 0u64, 0u64);
        // SAFETY: host-only arithmetic; the three pointers are valid for one write each.
        let code = unsafe {
            ffi::remoe_weight_grad_split_sizes(
                e as i32,
                h as i32,
                f as i32,
                &mut plan_words,
                &mut slot_floats,
                &mut counters,
            )
        };
        ffi::check("weight_grad_split_sizes", code)?;
        let size = |n: u64| {
            usize::try_from(n).map_err(|_| Error::TooLarge {
                what: "weight-gradient split workspace",
                elements: usize::MAX,
            })
        };
        self.experts = e;
        let grew = [
            self.plan.ensure(dev, size(plan_words)?)?,
            self.slots.ensure(dev, size(slot_floats)?)?,
            self.counters.ensure(dev, size(counters)?)?,
        ];
        Ok(grew.iter().filter(|&&g| g).count() as u64)
    }

    /// Enqueues the plan for the counts in `expert_offsets` ([E + 1], on the device), whose
    /// chunks are cut for a reduction of `chunking_pairs` pairs in all (None: the offsets'
    /// total; see remoe_weight_grad_plan).
    pub(crate) fn plan<'a>(
        &'a mut self,
        dev: &'a Device,
        expert_offsets: &'a GrowBuf<u32>,
        (h, f): (usize, usize),
        chunking_pairs: Option<usize>,
    ) -> Result<()> {
        let chunking = chunking_pairs.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        let e = self.experts;
        let mut l = Launch::on(dev);
        let eo = l.input("expert offsets", expert_offsets, e + 1)?;
        let plan = l.output_raw("weight-grad plan", &mut self.plan, 3 * e + 1)?;
        // SAFETY: expert offsets [e+1]; plan holds 3e + 1 words (both checked by `l`).
        let code = unsafe {
            ffi::remoe_weight_grad_plan(
                eo,
                e as i32,
                h as i32,
                f as i32,
                chunking,
                plan,
                l.stream(),
            )
        };
        ffi::check("weight_grad_plan", code)
    }

    /// The three buffers as one weight-gradient launch on `l` takes them (the plan read, slots
    /// and counters written).
    pub(crate) fn launch_args<'a>(
        &'a mut self,
        l: &mut Launch<'a>,
    ) -> Result<ffi::remoe_wgrad_split_t> {
        let (plan_len, slots_len, counters_len) =
            (self.plan.len(), self.slots.len(), self.counters.len());
        Ok(ffi::remoe_wgrad_split_t {
            plan: l.input_raw("weight-grad plan", &self.plan, plan_len)?,
            slots: l.output_raw("weight-grad slots", &mut self.slots, slots_len)?,
            counters: l.output_raw("weight-grad counters", &mut self.counters, counters_len)?,
        })
    }
}

impl crate::workspace::Buffers for WeightGradSplit {
    fn bytes(&self) -> usize {
        self.plan.bytes() + self.slots.bytes() + self.counters.bytes()
    }

    /// Poisons what every backward rewrites before reading (not the counters, which the
    /// kernels expect at zero between calls).
    fn poison(&mut self) -> Result<()> {
        self.plan.poison()?;
        self.slots.poison()
    }
}
