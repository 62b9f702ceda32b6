//! The expert-parallel protocol's host side: ownership, the setup record, the count message,
//! the traffic matrix and the owner's receive plan.
//!
//! One forward of the expert-parallel layer, on every rank r:
//!
//! 1. route and compact its own tokens as on one GPU: pairs sorted by expert, then by token;
//! 2. send every rank the same **count message**: a [`CallHeader`] and r's pair count per
//!    expert (all E of them), so that every rank then holds the whole R×E [`TrafficMatrix`] and
//!    takes every decision (validation, buffer sizes) the same way, with no rank left waiting;
//! 3. send each owner q the rows of q's experts: the contiguous pair range
//!    `send_offsets(r)[q] .. send_offsets(r)[q+1]`;
//! 4. as owner, order the received rows with the [`ReceivePlan`], run the local experts, and
//!    return each result row to its source, which lands it at the pair's own index.
//!
//! Its backward moves the same rows back the way they came, with the sizes the forward agreed
//! on, so it sends no counts. It first sends every rank a **header message**: the forward's
//! header with phase [`Phase::Backward`] ([`CallHeader::backward`]), so that ranks running the
//! backwards of different forwards (another call number or layer) all fail
//! ([`CallHeader::check_header_messages`]) before any row moves, instead of mixing rows.
//!
//! Messages are words (`u32`) so that the GPU layer can build them in a kernel and move them as
//! bytes; nothing here depends on the transport.

use std::fmt;
use std::ops::Range;

use crate::config::LayerConfig;
use crate::error::{Error, Result};
use crate::moe::RouterKind;
use crate::tensor::DType;

/// The version of the setup record and the count message; a rank with another version is
/// refused at setup.
pub const PROTOCOL_VERSION: u32 = 1;
const SETUP_MAGIC: u32 = u32::from_le_bytes(*b"REPS");
const COUNT_MAGIC: u32 = u32::from_le_bytes(*b"REPC");
/// Words of a count message before the per-expert counts; also the whole of a header message
/// (a backward's, [`CallHeader::header_message`]).
pub const COUNT_HEADER_WORDS: usize = 8;
/// Flag of a count message: its sender failed a check of its own and takes part only so that
/// nobody waits for it.
const FLAG_ABORT: u32 = 1;
/// Flag of a count message: a training call (it also sends the gates); every rank must agree.
const FLAG_TRAINING: u32 = 2;
/// Where the flags word carries the sender's split-K count of the down projection (8 bits).
const SPLITS_SHIFT: u32 = 8;

/// Which rank owns which experts: rank q owns the contiguous block `[q El, (q+1) El)` with
/// El = E / R. Contiguous blocks make the pairs bound for one owner one range of a source's
/// expert-sorted pairs, so nothing has to be packed before sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertPartition {
    world: usize,
    experts: usize,
}

impl ExpertPartition {
    /// `experts` split over `world` ranks. Refused unless `world` ≥ 1 divides `experts`: equal
    /// blocks keep every rank's expert weights the same shape, \[El,H,F\].
    pub fn new(experts: usize, world: usize) -> Result<Self> {
        if world == 0 || experts == 0 || !experts.is_multiple_of(world) {
            return Err(Error::InvalidConfig(format!(
                "expert parallelism needs the {experts} experts split evenly over the ranks \
                 ({world} ranks)"
            )));
        }
        Ok(Self { world, experts })
    }

    /// R, the number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// E, the number of experts of the whole layer.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// El = E / R, the experts each rank owns.
    pub fn local_experts(&self) -> usize {
        self.experts / self.world
    }

    /// The experts rank `rank` owns.
    pub fn experts_of(&self, rank: usize) -> Range<usize> {
        assert!(rank < self.world, "rank {rank} of {} ranks", self.world);
        let el = self.local_experts();
        rank * el..(rank + 1) * el
    }

    /// The rank that owns expert `expert`.
    pub fn owner(&self, expert: usize) -> usize {
        assert!(expert < self.experts, "expert {expert} of {}", self.experts);
        expert / self.local_experts()
    }
}

/// What every rank of an expert-parallel group must agree on, exchanged once when the group is
/// made: every rank compares all ranks' records, so all of them reach the same verdict
/// ([`Error::EpMismatch`] naming the first rank that differs from rank 0) instead of some
/// waiting for messages of a size their peer never sends. T is not in it: ranks may hold
/// different numbers of tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpSetup {
    /// R, the number of ranks.
    pub world: usize,
    /// E, H, F and k of the layer (its `tokens` is not compared).
    pub config: LayerConfig,
    /// The activations' dtype, bf16 or f16.
    pub dtype: DType,
    /// ReMoE's ReLU router or one of the TopK baselines.
    pub router: RouterKind,
}

/// The setup record's fields in the order of its words (after the magic and the version).
const SETUP_FIELDS: [&str; 7] = ["R", "E", "H", "F", "k", "dtype", "router"];

impl EpSetup {
    /// The words of the record: 16 `u32`, 64 bytes.
    pub const WORDS: usize = 16;

    /// The record as it travels. Refused when a size does not fit in 32 bits, or when the
    /// experts do not split evenly over the ranks.
    pub fn to_words(&self) -> Result<[u32; Self::WORDS]> {
        ExpertPartition::new(self.config.experts, self.world)?;
        let c = &self.config;
        let dtype = match self.dtype {
            DType::BF16 => 1,
            DType::F16 => 2,
            other => {
                return Err(Error::InvalidConfig(format!(
                    "expert parallelism moves bf16 or f16 activations, not {other:?}"
                )))
            }
        };
        let router = match self.router {
            RouterKind::Relu => 1,
            RouterKind::TopK => 2,
            RouterKind::TopKNormalized => 3,
        };
        let mut w = [0u32; Self::WORDS];
        w[0] = SETUP_MAGIC;
        w[1] = PROTOCOL_VERSION;
        let sizes = [self.world, c.experts, c.hidden, c.ffn, c.k];
        for (slot, (v, name)) in w[2..7].iter_mut().zip(sizes.iter().zip(SETUP_FIELDS)) {
            *slot = u32::try_from(*v).map_err(|_| Error::TooLarge {
                what: name,
                elements: *v,
            })?;
        }
        w[7] = dtype;
        w[8] = router;
        Ok(w)
    }

    /// Checks all ranks' records (`records[q]` from rank q) against each other. Every rank
    /// calls this on the same records and gets the same answer; the first rank whose record is
    /// malformed, or differs from rank 0's, is named.
    pub fn check_agreement(records: &[[u32; Self::WORDS]]) -> Result<()> {
        let Some(first) = records.first() else {
            return Err(Error::InvalidConfig("no setup records".into()));
        };
        for (rank, rec) in records.iter().enumerate() {
            if rec[0] != SETUP_MAGIC {
                return mismatch(rank, "its setup record is not one (wrong magic word)");
            }
            if rec[1] != PROTOCOL_VERSION {
                return mismatch(
                    rank,
                    format!(
                        "protocol version {} where this build speaks {PROTOCOL_VERSION}",
                        rec[1]
                    ),
                );
            }
            if rec[2] as usize != records.len() {
                return mismatch(
                    rank,
                    format!("R = {} in a group of {} ranks", rec[2], records.len()),
                );
            }
            for (i, name) in SETUP_FIELDS.iter().enumerate() {
                if rec[2 + i] != first[2 + i] {
                    return mismatch(
                        rank,
                        format!("{name} = {} where rank 0 has {}", rec[2 + i], first[2 + i]),
                    );
                }
            }
        }
        Ok(())
    }

    /// A digest of the record, carried by every count message so that a message from a group
    /// set up differently is refused.
    pub fn digest(&self) -> Result<u32> {
        Ok(fnv1a(&self.to_words()?))
    }
}

fn mismatch<T>(rank: usize, what: impl Into<String>) -> Result<T> {
    Err(Error::EpMismatch {
        rank,
        what: what.into(),
    })
}

/// FNV-1a over the words' little-endian bytes: a fixed function every rank computes alike.
fn fnv1a(words: &[u32]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in words.iter().flat_map(|w| w.to_le_bytes()) {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Which exchange a count or header message opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A forward (its count message).
    Forward = 1,
    /// A backward (its header message; it reuses its forward's sizes, so it sends no counts).
    Backward = 2,
}

impl Phase {
    /// The phase's name, or its code when it names none.
    fn describe(code: u32) -> String {
        match code {
            c if c == Phase::Forward as u32 => "forward".into(),
            c if c == Phase::Backward as u32 => "backward".into(),
            c => format!("phase {c}"),
        }
    }
}

/// What every count (or header) message of one call must carry alike: a rank whose header
/// differs is out of step (it skipped a layer, runs a backward against a forward, or the
/// backward of another forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallHeader {
    /// The group's call counter; every rank counts its calls alike.
    pub seq: u32,
    /// Which layer of the model (the caller's numbering).
    pub layer_id: u32,
    /// Forward or backward.
    pub phase: Phase,
    /// [`EpSetup::digest`] of the group's setup.
    pub setup_digest: u32,
    /// A training call (the ranks then also exchange the gates).
    pub training: bool,
}

impl CallHeader {
    /// The header of the backward of the forward this header opened: the forward's call number,
    /// layer, training flag and setup digest, with phase [`Phase::Backward`]. A backward takes
    /// no call number of its own: its header names the forward it belongs to.
    pub fn backward(&self) -> Self {
        Self {
            phase: Phase::Backward,
            ..*self
        }
    }

    /// Rank `rank`'s header message: the [`COUNT_HEADER_WORDS`] words of a count message's
    /// header and no counts. A backward sends it to every rank before its rows (the sizes are
    /// its forward's, already agreed), which check it with
    /// [`CallHeader::check_header_messages`]. `abort`: as for [`CallHeader::count_message`].
    pub fn header_message(&self, rank: usize, abort: bool) -> [u32; COUNT_HEADER_WORDS] {
        self.words(rank, abort, 0)
    }

    /// Checks `messages[s]`, source s's header message, against this header (the receiver's
    /// own), in rank order, for a group of `world` ranks. The first source whose message is
    /// malformed, out of step or aborted is named in an [`Error::EpMismatch`] that gives both
    /// headers. Since every rank compares every rank's message with its own, the ranks fail
    /// together: unless all headers are equal, each rank finds one that differs from its own.
    pub fn check_header_messages(&self, world: usize, messages: &[Vec<u32>]) -> Result<()> {
        if messages.len() != world {
            return Err(Error::InvalidConfig(format!(
                "{} header messages for {world} ranks",
                messages.len()
            )));
        }
        for (s, msg) in messages.iter().enumerate() {
            self.check_words(s, msg, COUNT_HEADER_WORDS, "header")?;
        }
        Ok(())
    }

    /// Rank `rank`'s count message: the header, then its pairs per expert, as differences of its
    /// dispatch's `expert_offsets` \[E+1\]. Differences of the offsets, not the router's counts:
    /// a source whose pairs overflowed its capacity publishes all-zero offsets (an empty
    /// dispatch), so it sends no pairs while its counts still describe the routing.
    /// `abort`: the sender failed a check of its own and takes part only so that its peers fail
    /// at once ([`Error::EpMismatch`]) instead of waiting for it.
    pub fn count_message(&self, rank: usize, expert_offsets: &[u32], abort: bool) -> Vec<u32> {
        assert!(
            !expert_offsets.is_empty(),
            "expert_offsets holds E+1 entries"
        );
        let mut msg = Vec::with_capacity(COUNT_HEADER_WORDS + expert_offsets.len() - 1);
        msg.extend_from_slice(&self.words(rank, abort, 0));
        msg.extend(expert_offsets.windows(2).map(|w| w[1] - w[0]));
        msg
    }

    /// The first [`COUNT_HEADER_WORDS`] words of rank `rank`'s count message (the GPU layer's
    /// kernel takes them as they are and appends the counts). `down_splits` is the sender's
    /// split-K count of the down projection (0: none given; at most 255), which owners read to
    /// run every source's rows as its one-GPU forward would.
    pub fn words(&self, rank: usize, abort: bool, down_splits: u32) -> [u32; COUNT_HEADER_WORDS] {
        let flags = if abort { FLAG_ABORT } else { 0 }
            | if self.training { FLAG_TRAINING } else { 0 }
            | (down_splits.min(0xff) << SPLITS_SHIFT);
        [
            COUNT_MAGIC,
            PROTOCOL_VERSION,
            rank as u32,
            self.seq,
            self.layer_id,
            self.phase as u32,
            flags,
            self.setup_digest,
        ]
    }

    /// Checks source `rank`'s count message against this header (the receiver's own).
    fn check(&self, rank: usize, msg: &[u32], experts: usize) -> Result<()> {
        self.check_words(rank, msg, COUNT_HEADER_WORDS + experts, "count")
    }

    /// Checks source `rank`'s `kind` message of `want` words against this header: its length,
    /// then its header words. A field that differs is named with both headers.
    fn check_words(&self, rank: usize, msg: &[u32], want: usize, kind: &str) -> Result<()> {
        if msg.len() != want {
            return mismatch(
                rank,
                format!("a {kind} message of {} words, not {want}", msg.len()),
            );
        }
        if msg[0] != COUNT_MAGIC || msg[1] != PROTOCOL_VERSION {
            return mismatch(
                rank,
                format!("its {kind} message is not one of this protocol version"),
            );
        }
        if msg[2] as usize != rank {
            return mismatch(rank, format!("its message says it is rank {}", msg[2]));
        }
        if msg[6] & FLAG_ABORT != 0 {
            return mismatch(rank, "it aborted this call after a check of its own failed");
        }
        let fields = [
            ("call number", msg[3], self.seq),
            ("layer", msg[4], self.layer_id),
            ("phase", msg[5], self.phase as u32),
            (
                "training flag",
                msg[6] & FLAG_TRAINING,
                self.training as u32 * FLAG_TRAINING,
            ),
            ("setup digest", msg[7], self.setup_digest),
        ];
        for (name, theirs, ours) in fields {
            if theirs != ours {
                return mismatch(
                    rank,
                    format!(
                        "{name} {theirs} where this rank has {ours} (its header: {}; this \
                         rank's: {self})",
                        describe_header(msg)
                    ),
                );
            }
        }
        Ok(())
    }
}

/// "layer 3, call 7, forward, training, setup 0x…": a header as the errors give it.
impl fmt::Display for CallHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe_header(&self.words(0, false, 0)))
    }
}

/// The header words of a count or header message (at least [`COUNT_HEADER_WORDS`]) as
/// [`CallHeader`]'s `Display` gives a header.
fn describe_header(w: &[u32]) -> String {
    let mode = if w[6] & FLAG_TRAINING != 0 {
        "training"
    } else {
        "inference"
    };
    format!(
        "layer {}, call {}, {}, {mode}, setup {:#010x}",
        w[4],
        w[3],
        Phase::describe(w[5]),
        w[7]
    )
}

/// Who sends how many pairs of which expert: `count(s, e)` is source s's pairs of expert e.
/// Built from all ranks' count messages, so every rank holds the same matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficMatrix {
    partition: ExpertPartition,
    /// \[R, E\], row s = source s.
    counts: Vec<usize>,
    /// \[R\] each source's split-K count of the down projection (0: not given).
    down_splits: Vec<u32>,
}

impl TrafficMatrix {
    /// The matrix from `messages[s]`, source s's count message, each checked against `header`
    /// (this rank's own). The first source (in rank order) whose message is malformed, out of
    /// step or aborted is named in an [`Error::EpMismatch`]; every rank sees the same messages,
    /// so every rank returns the same error.
    pub fn from_messages(
        partition: ExpertPartition,
        header: &CallHeader,
        messages: &[Vec<u32>],
    ) -> Result<Self> {
        let (r, e) = (partition.world(), partition.experts());
        if messages.len() != r {
            return Err(Error::InvalidConfig(format!(
                "{} count messages for {r} ranks",
                messages.len()
            )));
        }
        let mut counts = Vec::with_capacity(r * e);
        let mut down_splits = Vec::with_capacity(r);
        for (s, msg) in messages.iter().enumerate() {
            header.check(s, msg, e)?;
            counts.extend(msg[COUNT_HEADER_WORDS..].iter().map(|&c| c as usize));
            down_splits.push((msg[6] >> SPLITS_SHIFT) & 0xff);
        }
        Ok(Self {
            partition,
            counts,
            down_splits,
        })
    }

    /// The split-K count of the down projection that every source gave, if they all gave the
    /// same one: an owner that runs every source's rows with it computes, for each source,
    /// exactly that source's one-GPU expert outputs. None when the sources differ (unequal
    /// token counts can do that) or gave none.
    pub fn agreed_down_splits(&self) -> Option<u32> {
        let first = *self.down_splits.first()?;
        (first > 0 && self.down_splits.iter().all(|&k| k == first)).then_some(first)
    }

    /// The partition the matrix is over.
    pub fn partition(&self) -> ExpertPartition {
        self.partition
    }

    /// Source `src`'s pairs of expert `expert`.
    pub fn count(&self, src: usize, expert: usize) -> usize {
        self.counts[src * self.partition.experts() + expert]
    }

    /// All pairs of all sources: what one GPU would hold for every rank's tokens.
    pub fn total_pairs(&self) -> usize {
        self.counts.iter().sum()
    }

    /// The pairs source `src` sends owner `dst` (itself included).
    pub fn pairs(&self, src: usize, dst: usize) -> usize {
        self.partition
            .experts_of(dst)
            .map(|e| self.count(src, e))
            .sum()
    }

    /// Where source `src`'s pairs for each owner start in its expert-sorted pairs, \[R+1\]: owner
    /// q's are `[off[q], off[q+1])`, and `off[R]` is the source's |A|. These are the source's
    /// own `expert_offsets[q El]`.
    pub fn send_offsets(&self, src: usize) -> Vec<usize> {
        prefix((0..self.partition.world()).map(|q| self.pairs(src, q)))
    }

    /// Where each source's rows start in owner `dst`'s receive buffer, \[R+1\]: source s's are
    /// `[base[s], base[s+1])`, in the source's order, and `base[R]` is all the owner receives.
    pub fn receive_bases(&self, dst: usize) -> Vec<usize> {
        prefix((0..self.partition.world()).map(|s| self.pairs(s, dst)))
    }
}

/// 0, a0, a0+a1, ...: the exclusive prefix sums and the total.
fn prefix(items: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut out = vec![0];
    let mut acc = 0;
    for n in items {
        acc += n;
        out.push(acc);
    }
    out
}

/// Where each row an owner received goes in its local expert-sorted order, and back.
///
/// The receive buffer holds source 0's rows, then source 1's, and so on; each source's rows
/// are sorted by expert, then by token (the source's own order). The local order is expert by
/// expert and, within an expert, source by source: for each expert, the pair sequence of the
/// one-rank layer run on all ranks' tokens concatenated in rank order. That is what makes the
/// owner's weight gradients bitwise those of the one-rank layer.
///
/// This is the host form of the owner's dispatch; the GPU layer will build the same arrays in
/// a kernel from the count messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivePlan {
    /// \[El+1\]: local expert j's pairs are `[expert_offsets[j], expert_offsets[j+1])` of the
    /// local order.
    pub expert_offsets: Vec<usize>,
    /// \[R+1\]: source s's rows are `[src_base[s], src_base[s+1])` of the receive buffer.
    pub src_base: Vec<usize>,
    /// \[N\]: the received row of local pair p (the row the experts gather).
    pub row_of_pair: Vec<usize>,
    /// \[N\]: the local pair of received row i (`row_of_pair`'s inverse), which puts the
    /// results back in receive order for the return trip.
    pub pair_of_row: Vec<usize>,
}

impl ReceivePlan {
    /// Owner `owner`'s plan for the traffic `m`.
    pub fn new(m: &TrafficMatrix, owner: usize) -> Self {
        let part = m.partition();
        let experts = part.experts_of(owner);
        let world = part.world();
        let src_base = m.receive_bases(owner);
        // Where each local expert's rows start within each source's segment.
        let seg_start: Vec<Vec<usize>> = (0..world)
            .map(|s| prefix(experts.clone().map(|e| m.count(s, e))))
            .collect();
        let total = src_base[world];
        let mut row_of_pair = Vec::with_capacity(total);
        let mut expert_offsets = vec![0];
        for (j, e) in experts.enumerate() {
            for (s, starts) in seg_start.iter().enumerate() {
                let first = src_base[s] + starts[j];
                row_of_pair.extend(first..first + m.count(s, e));
            }
            expert_offsets.push(row_of_pair.len());
        }
        let mut pair_of_row = vec![0; total];
        for (p, &i) in row_of_pair.iter().enumerate() {
            pair_of_row[i] = p;
        }
        Self {
            expert_offsets,
            src_base,
            row_of_pair,
            pair_of_row,
        }
    }

    /// N, the pairs the owner computes.
    pub fn pairs(&self) -> usize {
        self.row_of_pair.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(world: usize, e: usize) -> EpSetup {
        EpSetup {
            world,
            config: LayerConfig::new(0, 64, 128, e, 2),
            dtype: DType::BF16,
            router: RouterKind::Relu,
        }
    }

    #[test]
    fn experts_are_owned_in_contiguous_equal_blocks() {
        let p = ExpertPartition::new(12, 3).unwrap();
        assert_eq!(p.local_experts(), 4);
        assert_eq!(p.experts_of(1), 4..8);
        assert_eq!((0..12).map(|e| p.owner(e)).collect::<Vec<_>>(), {
            let mut v = vec![0; 4];
            v.extend([1; 4]);
            v.extend([2; 4]);
            v
        });
        for (e, r) in [(10, 3), (8, 0), (0, 1)] {
            assert!(
                matches!(ExpertPartition::new(e, r), Err(Error::InvalidConfig(_))),
                "E = {e}, R = {r}"
            );
        }
    }

    #[test]
    fn ranks_agree_on_a_setup_only_when_every_field_matches() {
        let words = setup(2, 8).to_words().unwrap();
        EpSetup::check_agreement(&[words, words]).unwrap();

        let mut other = setup(2, 8);
        other.config.hidden = 72;
        let err = EpSetup::check_agreement(&[words, other.to_words().unwrap()]).unwrap_err();
        assert_eq!(
            err,
            Error::EpMismatch {
                rank: 1,
                what: "H = 72 where rank 0 has 64".into()
            }
        );

        // A group of two whose records both say R = 3.
        let three = setup(3, 9).to_words().unwrap();
        assert!(matches!(
            EpSetup::check_agreement(&[three, three]),
            Err(Error::EpMismatch { rank: 0, .. })
        ));

        let mut version = words;
        version[1] += 1;
        assert!(matches!(
            EpSetup::check_agreement(&[words, version]),
            Err(Error::EpMismatch { rank: 1, .. })
        ));

        // T may differ; every other field is compared.
        let mut more_tokens = setup(2, 8);
        more_tokens.config.tokens = 999;
        assert_eq!(more_tokens.to_words().unwrap(), words);
        let mut topk = setup(2, 8);
        topk.router = RouterKind::TopK;
        assert_ne!(topk.digest().unwrap(), setup(2, 8).digest().unwrap());
        // The two TopK kinds route alike but gate differently: ranks must not mix them.
        let mut normalized = setup(2, 8);
        normalized.router = RouterKind::TopKNormalized;
        assert_ne!(normalized.digest().unwrap(), topk.digest().unwrap());
        assert_eq!(
            EpSetup::check_agreement(&[topk.to_words().unwrap(), normalized.to_words().unwrap()]),
            Err(Error::EpMismatch {
                rank: 1,
                what: "router = 3 where rank 0 has 2".into()
            })
        );
        let mut f16 = setup(2, 8);
        f16.dtype = DType::F16;
        assert!(matches!(
            EpSetup::check_agreement(&[words, f16.to_words().unwrap()]),
            Err(Error::EpMismatch { rank: 1, .. })
        ));
        let mut f32 = setup(2, 8);
        f32.dtype = DType::F32;
        assert!(matches!(f32.to_words(), Err(Error::InvalidConfig(_))));
    }

    fn header() -> CallHeader {
        CallHeader {
            seq: 7,
            layer_id: 3,
            phase: Phase::Forward,
            setup_digest: setup(2, 4).digest().unwrap(),
            training: true,
        }
    }

    #[test]
    fn the_traffic_matrix_comes_from_the_sources_offsets() {
        let part = ExpertPartition::new(4, 2).unwrap();
        let h = header();
        // Source 0: 3, 0, 2, 1 pairs of experts 0..4; source 1: 0, 5, 0, 0.
        let msgs = vec![
            h.count_message(0, &[0, 3, 3, 5, 6], false),
            h.count_message(1, &[0, 0, 5, 5, 5], false),
        ];
        let m = TrafficMatrix::from_messages(part, &h, &msgs).unwrap();
        assert_eq!(m.pairs(0, 0), 3);
        assert_eq!(m.pairs(0, 1), 3);
        assert_eq!(m.pairs(1, 0), 5);
        assert_eq!(m.pairs(1, 1), 0);
        // The send offsets are the source's own expert offsets at the owners' first experts.
        assert_eq!(m.send_offsets(0), vec![0, 3, 6]);
        assert_eq!(m.send_offsets(1), vec![0, 5, 5]);
        assert_eq!(m.receive_bases(0), vec![0, 3, 8]);
        assert_eq!(m.receive_bases(1), vec![0, 3, 3]);
        // One GPU over both ranks' tokens would hold all 11 pairs.
        assert_eq!(m.total_pairs(), 11);
        // Messages built on the host give no split-K count; the device's give their sender's.
        assert_eq!(m.agreed_down_splits(), None);
        let with_splits = |rank: usize, offsets: &[u32], k: u32| {
            let mut msg = h.words(rank, false, k).to_vec();
            msg.extend(offsets.windows(2).map(|w| w[1] - w[0]));
            msg
        };
        let same = [
            with_splits(0, &[0, 3, 3, 5, 6], 2),
            with_splits(1, &[0, 0, 5, 5, 5], 2),
        ];
        let m = TrafficMatrix::from_messages(part, &h, &same).unwrap();
        assert_eq!(m.agreed_down_splits(), Some(2));
        let apart = [
            with_splits(0, &[0, 3, 3, 5, 6], 2),
            with_splits(1, &[0, 0, 5, 5, 5], 1),
        ];
        let m = TrafficMatrix::from_messages(part, &h, &apart).unwrap();
        assert_eq!(m.agreed_down_splits(), None);

        // An overflowed source publishes all-zero offsets: it sends nothing.
        let empty = h.count_message(1, &[0; 5], false);
        let m = TrafficMatrix::from_messages(part, &h, &[msgs[0].clone(), empty]).unwrap();
        assert_eq!(m.receive_bases(0), vec![0, 3, 3]);
    }

    #[test]
    fn an_out_of_step_or_aborted_rank_is_named_by_every_receiver() {
        let part = ExpertPartition::new(4, 2).unwrap();
        let h = header();
        let good = h.count_message(0, &[0, 1, 2, 3, 4], false);
        let cases: Vec<(Vec<u32>, &str)> = vec![
            (
                CallHeader { seq: 8, ..h }.count_message(1, &[0; 5], false),
                "call number 8 where this rank has 7",
            ),
            (
                CallHeader { layer_id: 4, ..h }.count_message(1, &[0; 5], false),
                "layer 4 where this rank has 3",
            ),
            (
                CallHeader {
                    phase: Phase::Backward,
                    ..h
                }
                .count_message(1, &[0; 5], false),
                "phase 2 where this rank has 1",
            ),
            (
                CallHeader {
                    training: false,
                    ..h
                }
                .count_message(1, &[0; 5], false),
                "training flag 0 where this rank has 2",
            ),
            (
                h.count_message(1, &[0; 5], true),
                "it aborted this call after a check of its own failed",
            ),
            (
                h.count_message(1, &[0; 7], false),
                "a count message of 14 words, not 12",
            ),
            (
                h.count_message(0, &[0; 5], false),
                "its message says it is rank 0",
            ),
        ];
        for (bad, what) in cases {
            let err = TrafficMatrix::from_messages(part, &h, &[good.clone(), bad]).unwrap_err();
            match err {
                Error::EpMismatch { rank: 1, what: got } => {
                    assert!(got.starts_with(what), "{got:?} is not {what:?}...")
                }
                other => panic!("{other:?}, not the mismatch of rank 1"),
            }
        }
        // A field that differs is named with both headers.
        let later = CallHeader { seq: 8, ..h }.count_message(1, &[0; 5], false);
        let err = TrafficMatrix::from_messages(part, &h, &[good, later]).unwrap_err();
        let digest = h.setup_digest;
        assert_eq!(
            err,
            Error::EpMismatch {
                rank: 1,
                what: format!(
                    "call number 8 where this rank has 7 (its header: layer 3, call 8, forward, \
                     training, setup {digest:#010x}; this rank's: layer 3, call 7, forward, \
                     training, setup {digest:#010x})"
                )
            }
        );
    }

    #[test]
    fn a_backward_header_names_its_forward_and_carries_no_counts() {
        let fwd = header();
        let bwd = fwd.backward();
        assert_eq!(bwd.phase, Phase::Backward);
        assert_eq!((bwd.seq, bwd.layer_id, bwd.training), (7, 3, true));
        assert_eq!(bwd.setup_digest, fwd.setup_digest);
        // The count message's header words, with no counts and no split-K count.
        let msg = bwd.header_message(1, false);
        assert_eq!(
            &msg[..],
            &bwd.count_message(1, &[0, 2, 5], false)[..COUNT_HEADER_WORDS]
        );
        assert_eq!(msg[5], Phase::Backward as u32);
        let all = [
            bwd.header_message(0, false).to_vec(),
            bwd.header_message(1, false).to_vec(),
        ];
        bwd.check_header_messages(2, &all).unwrap();
        assert!(matches!(
            bwd.check_header_messages(3, &all),
            Err(Error::InvalidConfig(_))
        ));
    }

    #[test]
    fn ranks_in_the_backwards_of_different_forwards_all_fail_naming_both_headers() {
        // Rank 0 runs the backward of call 1 (layer 1) while rank 1 runs that of call 0
        // (layer 0): each names the other, with both headers.
        let digest = setup(2, 4).digest().unwrap();
        let fwd = |seq: u32| CallHeader {
            seq,
            layer_id: seq,
            phase: Phase::Forward,
            setup_digest: digest,
            training: true,
        };
        let own = [fwd(1).backward(), fwd(0).backward()];
        let msgs: Vec<Vec<u32>> = (0..2)
            .map(|r| own[r].header_message(r, false).to_vec())
            .collect();
        let bwd =
            |seq| format!("layer {seq}, call {seq}, backward, training, setup {digest:#010x}");
        for (r, h) in own.iter().enumerate() {
            let peer = 1 - r;
            let (theirs, ours) = (own[peer].seq, h.seq);
            assert_eq!(
                h.check_header_messages(2, &msgs).unwrap_err(),
                Error::EpMismatch {
                    rank: peer,
                    what: format!(
                        "call number {theirs} where this rank has {ours} (its header: {}; this \
                         rank's: {})",
                        bwd(theirs),
                        bwd(ours)
                    )
                },
                "rank {r}"
            );
        }

        // The same call in another layer, a forward's count message, an aborted peer, a
        // forward's header: each refused by the receiver, naming rank 1.
        let h = fwd(0).backward();
        let good = h.header_message(0, false).to_vec();
        let cases: Vec<(Vec<u32>, &str)> = vec![
            (
                CallHeader { layer_id: 5, ..h }
                    .header_message(1, false)
                    .to_vec(),
                "layer 5 where this rank has 0 (its header: layer 5, call 0, backward",
            ),
            (
                h.count_message(1, &[0; 5], false),
                "a header message of 12 words, not 8",
            ),
            (
                h.header_message(1, true).to_vec(),
                "it aborted this call after a check of its own failed",
            ),
            (
                fwd(0).header_message(1, false).to_vec(),
                "phase 1 where this rank has 2 (its header: layer 0, call 0, forward",
            ),
        ];
        for (bad, what) in cases {
            match h
                .check_header_messages(2, &[good.clone(), bad])
                .unwrap_err()
            {
                Error::EpMismatch { rank: 1, what: got } => {
                    assert!(got.starts_with(what), "{got:?} is not {what:?}...")
                }
                other => panic!("{other:?}, not the mismatch of rank 1"),
            }
        }
    }

    #[test]
    fn the_receive_plan_orders_pairs_by_expert_then_source() {
        let part = ExpertPartition::new(4, 2).unwrap();
        let h = header();
        // Owner 1 (experts 2, 3) gets from source 0: 2 of expert 2, 1 of expert 3; from
        // source 1: 1 of expert 2, 2 of expert 3.
        let msgs = vec![
            h.count_message(0, &[0, 1, 1, 3, 4], false),
            h.count_message(1, &[0, 0, 4, 5, 7], false),
        ];
        let m = TrafficMatrix::from_messages(part, &h, &msgs).unwrap();
        let plan = ReceivePlan::new(&m, 1);
        // Receive buffer: [s0 e2, s0 e2, s0 e3, s1 e2, s1 e3, s1 e3].
        assert_eq!(plan.src_base, vec![0, 3, 6]);
        assert_eq!(plan.expert_offsets, vec![0, 3, 6]);
        assert_eq!(plan.row_of_pair, vec![0, 1, 3, 2, 4, 5]);
        assert_eq!(plan.pair_of_row, vec![0, 1, 3, 2, 4, 5]);
        for (p, &i) in plan.row_of_pair.iter().enumerate() {
            assert_eq!(plan.pair_of_row[i], p);
        }
        // Owner 0 gets nothing of source 0's expert 1 and all of source 1's expert 1.
        let plan = ReceivePlan::new(&m, 0);
        assert_eq!(plan.src_base, vec![0, 1, 5]);
        assert_eq!(plan.expert_offsets, vec![0, 1, 5]);
        assert_eq!(plan.row_of_pair, vec![0, 1, 2, 3, 4]);
    }
}
