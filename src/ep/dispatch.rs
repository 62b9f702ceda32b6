//! The expert-parallel layer's bookkeeping on the device (kernels/ep_dispatch.cu): a source's
//! count message, an owner's dispatch of the rows it received, and the 32-bit permutation that
//! returns per-pair scalars to their sources.
//!
//! Their host forms are [`CallHeader::count_message`] and [`ReceivePlan::new`]; the tests below
//! hold the kernels to them word for word. The kernels read the counts from the messages on the
//! device. The host has already checked those same messages ([`TrafficMatrix::from_messages`]),
//! and it sizes the buffers from the checked totals.
//!
//! [`TrafficMatrix::from_messages`]: super::TrafficMatrix::from_messages
//! [`ReceivePlan::new`]: super::ReceivePlan::new

use super::protocol::{CallHeader, ExpertPartition, COUNT_HEADER_WORDS};
use crate::capacity::max_row_tiles;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::experts::ExpertBatch;
use crate::ffi;
use crate::tensor::{InputBuf, Launch, OutputBuf};
use crate::workspace::GrowBuf;

/// `n` as the kernels' `int32_t`.
const TILE_ROWS: usize = ffi::REMOE_GEMM_TILE_ROWS as usize;

fn index32(what: &'static str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::TooLarge { what, elements: n })
}

/// Writes source `rank`'s count message for `header` into `msg` \[8 + E\]: the header words
/// (with the source's split-K count `down_splits`), then its pairs per expert as differences of
/// its `expert_offsets` \[E+1\]. (A rank that aborts sends a host-built message instead.)
pub(crate) fn count_message<'a>(
    dev: &'a Device,
    header: &CallHeader,
    (rank, down_splits): (usize, u32),
    expert_offsets: impl InputBuf<'a, u32>,
    experts: usize,
    msg: impl OutputBuf<'a, u32>,
) -> Result<()> {
    let e = index32("experts", experts)?;
    let words = ffi::remoe_ep_header_t {
        words: header.words(rank, false, down_splits),
    };
    let mut l = Launch::on(dev);
    let eo = l.input_raw("expert offsets", expert_offsets, experts + 1)?;
    let out = l.output_raw("count message", msg, COUNT_HEADER_WORDS + experts)?;
    // SAFETY: expert_offsets holds e+1 words and msg 8+e (checked above); the kernel touches
    // exactly those.
    let code = unsafe { ffi::remoe_ep_count_message(eo, words, e, out, l.stream()) };
    ffi::check("ep_count_message", code)
}

/// An owner's dispatch of one call's received rows: where each received row goes in the local
/// expert-sorted order, the local experts' offsets the grouped GEMMs take, and the way back.
/// Device buffers, grown to the largest call and reused.
#[derive(Debug, Default)]
pub(crate) struct ReceiveDispatch {
    /// \[El+1\] the local experts' pair offsets.
    pub(crate) expert_offsets: GrowBuf<u32>,
    /// \[El+1\] the local experts' row-tile offsets.
    pub(crate) tile_offsets: GrowBuf<u32>,
    /// \[R+1\] where each source's rows start in the receive buffer; `[R]` is N.
    pub(crate) src_base: GrowBuf<u32>,
    /// \[N\] the received row of each local pair: the experts' gather index.
    pub(crate) row_of_pair: GrowBuf<u32>,
    /// \[N\] the local pair of each received row: puts results back in receive order.
    pub(crate) pair_of_row: GrowBuf<u32>,
    /// \[N\] the gate of each local pair (training only).
    pub(crate) pair_gate: GrowBuf<f32>,
    /// \[2E\] the kernel's segment table.
    segments: GrowBuf<u32>,
}

impl ReceiveDispatch {
    /// Fills every buffer with all-ones bits.
    pub(crate) fn poison(&mut self) -> Result<()> {
        for b in [
            &mut self.expert_offsets,
            &mut self.tile_offsets,
            &mut self.src_base,
            &mut self.row_of_pair,
            &mut self.pair_of_row,
            &mut self.segments,
        ] {
            b.poison()?;
        }
        self.pair_gate.poison()
    }

    /// The batch of the owner's `local_experts` experts over the `rows` rows it received, as
    /// the expert GEMMs take it: each local pair gathers its received row.
    pub(crate) fn batch(
        &self,
        local_experts: usize,
        rows: usize,
        (hidden, ffn): (usize, usize),
    ) -> ExpertBatch<'_> {
        ExpertBatch {
            pair_row: &self.row_of_pair,
            expert_offsets: &self.expert_offsets,
            tile_offsets: &self.tile_offsets,
            experts: local_experts,
            cap: rows,
            max_tiles: max_row_tiles(rows, local_experts, TILE_ROWS),
            hidden,
            ffn,
        }
    }

    /// Builds owner `owner`'s dispatch from `msgs` \[R\]\[8+E\], the count messages it received
    /// (message s from source s), for the `rows` rows the host's checked traffic matrix says it
    /// receives. `recv_gate` \[rows\], the gates that came with the rows, is permuted into
    /// `pair_gate` when given (the backward needs it).
    pub(crate) fn build<'a>(
        &'a mut self,
        dev: &'a Device,
        part: ExpertPartition,
        owner: usize,
        msgs: impl InputBuf<'a, u32>,
        recv_gate: Option<&'a GrowBuf<f32>>,
        rows: usize,
    ) -> Result<()> {
        let (world, experts, local) = (part.world(), part.experts(), part.local_experts());
        if owner >= world {
            return Err(Error::InvalidConfig(format!(
                "owner {owner} of a group of {world} ranks"
            )));
        }
        let e = index32("experts", experts)?;
        let r = index32("ranks", world)?;
        let cap = index32("received rows", rows)?;
        self.expert_offsets.ensure(dev, local + 1)?;
        self.tile_offsets.ensure(dev, local + 1)?;
        self.src_base.ensure(dev, world + 1)?;
        self.segments.ensure(dev, 2 * experts)?;
        self.row_of_pair.ensure(dev, rows)?;
        self.pair_of_row.ensure(dev, rows)?;
        if recv_gate.is_some() {
            self.pair_gate.ensure(dev, rows)?;
        }
        let mut l = Launch::on(dev);
        let m = l.input_raw(
            "count messages",
            msgs,
            world * (COUNT_HEADER_WORDS + experts),
        )?;
        let (gate_in, gate_out) = match recv_gate {
            Some(g) => (
                l.input_raw("received gates", g, rows)?,
                l.output_raw("pair gates", &mut self.pair_gate, rows)?,
            ),
            None => (std::ptr::null(), std::ptr::null_mut()),
        };
        let eo = l.output_raw("local expert offsets", &mut self.expert_offsets, local + 1)?;
        let to = l.output_raw("local tile offsets", &mut self.tile_offsets, local + 1)?;
        let sb = l.output_raw("source bases", &mut self.src_base, world + 1)?;
        let seg = l.output_raw("segments", &mut self.segments, 2 * experts)?;
        let rp = l.output_raw("row of pair", &mut self.row_of_pair, rows)?;
        let pr = l.output_raw("pair of row", &mut self.pair_of_row, rows)?;
        // SAFETY: msgs holds R messages of 8+E words, the outputs El+1, El+1, R+1, 2E words and
        // the per-row buffers `rows` elements (checked above); E % R == 0 and owner < R
        // (ExpertPartition, above). The kernel writes a row only below `rows`, whatever the
        // counts on the device say.
        let code = unsafe {
            ffi::remoe_ep_receive_dispatch(
                m,
                e,
                r,
                owner as i32,
                gate_in,
                eo,
                to,
                sb,
                seg,
                rp,
                pr,
                gate_out,
                cap,
                l.stream(),
            )
        };
        ffi::check("ep_receive_dispatch", code)
    }
}

/// `dst[i] = src[index[i]]` for `i < count`, where `count` is the device word
/// `count_buf[count_at]` and at most `capacity`: 32-bit words of any type (f32 dr, u32 ids).
#[allow(clippy::too_many_arguments)] // three buffers, the device count's place and the bound
pub(crate) fn permute_32<'a, T: crate::tensor::Element>(
    dev: &'a Device,
    src: impl InputBuf<'a, T>,
    index: impl InputBuf<'a, u32>,
    dst: impl OutputBuf<'a, T>,
    count_buf: impl InputBuf<'a, u32>,
    count_at: usize,
    capacity: usize,
) -> Result<()> {
    if std::mem::size_of::<T>() != 4 {
        return Err(Error::InvalidConfig(
            "permute_32 moves 32-bit words only".into(),
        ));
    }
    let cap = index32("permuted words", capacity)?;
    let mut l = Launch::on(dev);
    let s = l.input_raw("permute source", src, capacity)?;
    let i = l.input_raw("permute index", index, capacity)?;
    let d = l.output_raw("permute destination", dst, capacity)?;
    let n = l
        .input_raw("permute count", count_buf, count_at + 1)?
        .wrapping_add(count_at);
    // SAFETY: src, index and dst hold `capacity` elements of 4 bytes (checked above); the kernel
    // reads *n and touches i < min(*n, capacity); every index below the count is a row of src
    // (the caller's index is a permutation of [0, count)).
    let code = unsafe { ffi::remoe_ep_permute_32(s as _, i, d as _, n, cap, l.stream()) };
    ffi::check("ep_permute_32", code)
}

#[cfg(test)]
mod tests {
    //! Each kernel against its host form on fresh random traffic, outputs poisoned first. They
    //! run on the GPU and say they were skipped without one. A failure prints its seed;
    //! `REMOE_SEED=N` replays it.
    use super::*;
    use crate::device::test_device_or_skip;
    use crate::ep::protocol::{Phase, ReceivePlan, TrafficMatrix};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rng_for(test: &str) -> (ChaCha8Rng, u64) {
        let seed = match std::env::var("REMOE_SEED") {
            Ok(v) if !v.trim().is_empty() => v.trim().parse().expect("REMOE_SEED: a decimal u64"),
            _ => rand::random(),
        };
        eprintln!("{test}: seed {seed} (replay with REMOE_SEED={seed})");
        (ChaCha8Rng::seed_from_u64(seed), seed)
    }

    fn header() -> CallHeader {
        CallHeader {
            seq: 41,
            layer_id: 3,
            phase: Phase::Forward,
            setup_digest: 0x5eed_f00d,
            training: true,
        }
    }

    fn upload<T: crate::tensor::Element>(dev: &Device, host: &[T]) -> GrowBuf<T> {
        let mut b = GrowBuf::default();
        b.ensure(dev, host.len()).unwrap();
        if !host.is_empty() {
            dev.stream()
                .memcpy_htod(host, &mut b.view_mut().unwrap())
                .unwrap();
        }
        b
    }

    /// How a source's pairs fall on the experts.
    #[derive(Debug, Clone, Copy)]
    enum Load {
        /// 0..max pairs per expert, about a third of the experts with none.
        Random(u32),
        /// No pairs at all (T = 0, or a dispatch published empty after an overflow).
        Empty,
        /// Every pair on one expert.
        OneExpert(usize, u32),
    }

    /// A source's expert_offsets \[E+1\] for `load`.
    fn offsets(rng: &mut ChaCha8Rng, e: usize, load: Load) -> Vec<u32> {
        let counts: Vec<u32> = (0..e)
            .map(|i| match load {
                Load::Random(_) if rng.random_bool(0.35) => 0,
                Load::Random(max) => rng.random_range(1..=max),
                Load::Empty => 0,
                Load::OneExpert(x, n) => u32::from(i == x) * n,
            })
            .collect();
        let mut off = vec![0u32];
        for c in counts {
            off.push(off.last().unwrap() + c);
        }
        off
    }

    #[test]
    fn count_message_is_the_host_message() {
        let Some(dev) = test_device_or_skip("count_message_is_the_host_message") else {
            return;
        };
        let (mut rng, seed) = rng_for("count_message_is_the_host_message");
        for (e, load, splits) in [
            (1, Load::Random(50), 1),
            (8, Load::Random(300), 4),
            (64, Load::Random(1000), 2),
            (300, Load::Random(20), 1),
            (8, Load::Empty, 1),
            (16, Load::OneExpert(15, 5000), 3),
        ] {
            let (h, rank) = (header(), 2);
            let host_off = offsets(&mut rng, e, load);
            // The host message's words, with the split-K count in the header.
            let mut want = h.words(rank, false, splits).to_vec();
            want.extend(h.count_message(rank, &host_off, false)[COUNT_HEADER_WORDS..].iter());
            let off = upload(&dev, &host_off);
            let mut msg = GrowBuf::<u32>::default();
            msg.ensure(&dev, COUNT_HEADER_WORDS + e).unwrap();
            msg.poison().unwrap();
            count_message(&dev, &h, (rank, splits), &off, e, &mut msg).unwrap();
            let got = msg.to_host().unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "E {e} {load:?}: word {i} (seed {seed})");
            }
        }
    }

    /// The traffic of one case: each source's load, over R ranks and E experts.
    fn messages(rng: &mut ChaCha8Rng, e: usize, loads: &[Load]) -> (Vec<Vec<u32>>, Vec<u32>) {
        let msgs: Vec<Vec<u32>> = loads
            .iter()
            .enumerate()
            .map(|(s, &load)| header().count_message(s, &offsets(rng, e, load), false))
            .collect();
        let flat = msgs.concat();
        (msgs, flat)
    }

    #[test]
    fn receive_dispatch_is_the_receive_plan() {
        let test = "receive_dispatch_is_the_receive_plan";
        let Some(dev) = test_device_or_skip(test) else {
            return;
        };
        let (mut rng, seed) = rng_for(test);
        use Load::*;
        let cases: Vec<(usize, Vec<Load>)> = vec![
            (4, vec![Random(40)]),
            (8, vec![Random(300), Random(300)]),
            (12, vec![Random(200), Empty, Random(200)]),
            (8, vec![Random(90); 4]),
            // 48 local experts: the plan's scans cross a warp's 32 lanes.
            (96, vec![Random(150), Random(150)]),
            (256, vec![Random(30), Random(30), Random(30), Random(30)]),
            // Nothing at all; every pair on one expert (one owner idle); one expert of each rank.
            (8, vec![Empty, Empty]),
            (8, vec![OneExpert(7, 1000), OneExpert(7, 3)]),
            (8, vec![OneExpert(0, 129), OneExpert(5, 257)]),
        ];
        let mut d = ReceiveDispatch::default();
        for (e, loads) in cases {
            let world = loads.len();
            let part = ExpertPartition::new(e, world).unwrap();
            let (msgs, flat) = messages(&mut rng, e, &loads);
            let m = TrafficMatrix::from_messages(part, &header(), &msgs).unwrap();
            let dmsgs = upload(&dev, &flat);
            for owner in 0..world {
                let case = format!("E {e} R {world} owner {owner} {loads:?} (seed {seed})");
                let plan = ReceivePlan::new(&m, owner);
                let n = plan.pairs();
                let gates: Vec<f32> = (0..n).map(|_| rng.random_range(0.001..1.0)).collect();
                let dgates = upload(&dev, &gates);
                // Size the buffers, poison them, then the run that is checked.
                d.build(&dev, part, owner, &dmsgs, Some(&dgates), n)
                    .unwrap();
                d.poison().unwrap();
                d.build(&dev, part, owner, &dmsgs, Some(&dgates), n)
                    .unwrap();

                let as_u32 = |v: &[usize]| v.iter().map(|&x| x as u32).collect::<Vec<_>>();
                let tiles: Vec<usize> = plan
                    .expert_offsets
                    .windows(2)
                    .map(|w| (w[1] - w[0]).div_ceil(TILE_ROWS))
                    .scan(0, |acc, t| {
                        *acc += t;
                        Some(*acc)
                    })
                    .collect();
                let tile_offsets: Vec<u32> = std::iter::once(0).chain(as_u32(&tiles)).collect();
                let checks: [(&str, Vec<u32>, Vec<u32>); 5] = [
                    (
                        "expert offsets",
                        d.expert_offsets.to_host().unwrap(),
                        as_u32(&plan.expert_offsets),
                    ),
                    (
                        "tile offsets",
                        d.tile_offsets.to_host().unwrap(),
                        tile_offsets,
                    ),
                    (
                        "source bases",
                        d.src_base.to_host().unwrap(),
                        as_u32(&plan.src_base),
                    ),
                    (
                        "row of pair",
                        d.row_of_pair.to_host().unwrap(),
                        as_u32(&plan.row_of_pair),
                    ),
                    (
                        "pair of row",
                        d.pair_of_row.to_host().unwrap(),
                        as_u32(&plan.pair_of_row),
                    ),
                ];
                for (what, got, want) in checks {
                    assert_eq!(got.len(), want.len(), "{what}: length, {case}");
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(g, w, "{what}[{i}], {case}");
                    }
                }
                let got_gate = d.pair_gate.to_host().unwrap();
                for (p, &row) in plan.row_of_pair.iter().enumerate() {
                    assert_eq!(
                        got_gate[p].to_bits(),
                        gates[row].to_bits(),
                        "pair gate[{p}], {case}"
                    );
                }
            }
        }
    }

    #[test]
    fn permute_32_moves_the_first_count_words() {
        let test = "permute_32_moves_the_first_count_words";
        let Some(dev) = test_device_or_skip(test) else {
            return;
        };
        let (mut rng, seed) = rng_for(test);
        let cap = 1000;
        for count in [0usize, 1, 777, cap] {
            let mut index: Vec<u32> = (0..count as u32).collect();
            for i in (1..count).rev() {
                index.swap(i, rng.random_range(0..=i));
            }
            index.resize(cap, u32::MAX);
            let src: Vec<f32> = (0..cap).map(|_| rng.random_range(-1.0..1.0)).collect();
            let dsrc = upload(&dev, &src);
            let dindex = upload(&dev, &index);
            // The count sits inside a larger buffer, as src_base[R] does.
            let dcount = upload(&dev, &[5u32, 9, count as u32]);
            let mut dst = GrowBuf::<f32>::default();
            dst.ensure(&dev, cap).unwrap();
            dst.poison().unwrap();
            permute_32(&dev, &dsrc, &dindex, &mut dst, &dcount, 2, cap).unwrap();
            let got = dst.to_host().unwrap();
            for i in 0..cap {
                let want = if i < count {
                    src[index[i] as usize].to_bits()
                } else {
                    u32::MAX
                };
                assert_eq!(
                    got[i].to_bits(),
                    want,
                    "count {count}, word {i} (seed {seed})"
                );
            }
        }
    }

    #[test]
    fn receive_dispatch_refuses_an_owner_outside_the_group() {
        let Some(dev) = test_device_or_skip("receive_dispatch_refuses_an_owner_outside_the_group")
        else {
            return;
        };
        let part = ExpertPartition::new(8, 2).unwrap();
        let msgs = upload(&dev, &[0u32; 2 * (COUNT_HEADER_WORDS + 8)]);
        let mut d = ReceiveDispatch::default();
        assert!(matches!(
            d.build(&dev, part, 2, &msgs, None, 0),
            Err(Error::InvalidConfig(_))
        ));
        // Messages shorter than R of them: refused before any launch.
        let short = upload(&dev, &[0u32; COUNT_HEADER_WORDS + 8]);
        assert!(matches!(
            d.build(&dev, part, 0, &short, None, 0),
            Err(Error::BufferTooShort { .. })
        ));
    }
}
