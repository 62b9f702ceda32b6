//! The NCCL transport of expert parallelism (`remoe_kernels::ep::nccl`, feature `ep`) on two
//! GPUs: one rank per GPU, each driven by a thread of its own, as the design runs them.
//!
//! Needs two CUDA devices and libnccl (the `ep` feature in Cargo.toml says when a
//! `libnccl.so -> libnccl.so.2` symlink is needed); skipped otherwise, failed instead with
//! `REMOE_REQUIRE_GPUS=2`. `NCCL_NVLS_ENABLE=0` is the runner's to set, and the device image
//! sets it: NVLink SHARP is a multicast offload for collectives that these point-to-point
//! exchanges never use, and multicast can take shared GPUs out of service. The tests do not set
//! it themselves (setting the environment from a multi-threaded test process is unsound).
//!
//! Every rank runs under a watchdog (`run_ranks`): a rank that has not finished long after its
//! communicator's own timeout fails the test, so a hang that the bounded waits failed to end is
//! a failure, not a stuck run.
#![cfg(feature = "ep")]

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use remoe_kernels::ep::nccl::{library_present, EpComm, NcclId};
use remoe_kernels::{Device, Error};

const WORLD: usize = 2;
/// Long enough for NCCL's setup (topology detection, connections) on a busy machine.
const LONG: Duration = Duration::from_secs(60);
/// The failure tests' timeout: each failing call must end within twice this.
const SHORT: Duration = Duration::from_secs(2);
/// A receive far larger than what its sender sends: many of NCCL's pipeline steps, so the
/// receiving kernel waits for data that never comes, whatever protocol NCCL picks.
const BIG: usize = 1 << 22;
/// What a receive buffer holds before the exchange. No message word equals it (see `word`).
const SENTINEL: u32 = 0xffff_ffff;

/// The two devices, or `None` after printing why the test is skipped (no second GPU, no
/// libnccl); with `REMOE_REQUIRE_GPUS=2` those fail the test instead.
fn ranks_or_skip(test: &str) -> Option<Vec<Device>> {
    let devs = common::gpus_or_skip(test, WORLD)?;
    if let Err(e) = library_present() {
        common::skip_unless_gpus_required(test, WORLD, &e.to_string());
        return None;
    }
    Some(devs)
}

/// Runs `body(rank, device)` on one thread per rank and returns the results by rank. A rank's
/// panic is raised again here; a rank that has not reported within `limit` fails the test (its
/// thread is left behind).
fn run_ranks<T: Send + 'static>(
    devs: Vec<Device>,
    limit: Duration,
    body: impl Fn(usize, Device) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let world = devs.len();
    let body = Arc::new(body);
    let (tx, rx) = mpsc::channel();
    for (rank, dev) in devs.into_iter().enumerate() {
        let (tx, body) = (tx.clone(), Arc::clone(&body));
        thread::spawn(move || {
            let out = catch_unwind(AssertUnwindSafe(|| body(rank, dev)));
            let _ = tx.send((rank, out));
        });
    }
    drop(tx);
    let deadline = Instant::now() + limit;
    let mut results: Vec<Option<T>> = (0..world).map(|_| None).collect();
    for _ in 0..world {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((rank, Ok(out))) => results[rank] = Some(out),
            Ok((_, Err(panic))) => std::panic::resume_unwind(panic),
            Err(_) => {
                let missing: Vec<usize> = (0..world).filter(|&r| results[r].is_none()).collect();
                panic!(
                    "ranks {missing:?} did not finish within {limit:?}: a hang that the bounded \
                     waits did not end"
                );
            }
        }
    }
    results.into_iter().flatten().collect()
}

/// Word `i` of the message from rank `src` to rank `dst` in round `round`: distinct across
/// rounds, rank pairs and positions, so a word in the wrong place, from the wrong rank or from
/// another round is caught. Never [`SENTINEL`] (round < 8).
fn word(round: usize, src: usize, dst: usize, i: usize) -> u32 {
    assert!(round < 8 && src < 2 && dst < 2 && i < 1 << 26);
    ((round << 28) | (src << 27) | (dst << 26) | i) as u32
}

/// `COUNTS[round][src][dst]`: the words rank `src` sends rank `dst` in each round.
const COUNTS: [[[usize; WORLD]; WORLD]; 4] = [
    // Every size different, a self message and an empty one; 4 MiB one way (many NCCL chunks).
    [[3, 0], [(1 << 20) + 5, 1]],
    // Rank 0 sends nothing at all, rank 1 only receives; both self messages empty.
    [[0, 262_147], [0, 0]],
    // Every message non-empty, all of different sizes.
    [[17, 33], [65, 129]],
    // Every message of the round empty.
    [[0, 0], [0, 0]],
];

#[test]
fn an_exchange_delivers_every_message_between_two_gpus() {
    const TEST: &str = "an_exchange_delivers_every_message_between_two_gpus";
    let Some(devs) = ranks_or_skip(TEST) else {
        return;
    };
    // The id travels as bytes, as it would between processes.
    let id_bytes = NcclId::new().unwrap().to_bytes();
    run_ranks(devs, 4 * LONG, move |rank, dev| {
        let id = NcclId::from_bytes(id_bytes);
        let mut comm = EpComm::new(&dev, rank, WORLD, &id, LONG).unwrap();
        assert_eq!((comm.rank(), comm.world()), (rank, WORLD));
        let stream = dev.stream().clone();

        // Ranges that are not one per rank, or that leave their buffer: refused before anything
        // is posted, and the communicator stays usable (the rounds below run on it).
        let one = stream.clone_htod(&[0u32; 1]).unwrap();
        let mut other = stream.alloc_zeros::<u32>(1).unwrap();
        let refused = comm.exchange(
            "three ranges",
            (&one.slice(..), &[0..1, 0..1, 0..1]),
            (&mut other.slice_mut(..), &[0..1, 1..1, 1..1]),
        );
        assert!(
            matches!(refused, Err(Error::InvalidConfig(_))),
            "{refused:?}"
        );
        let refused = comm.exchange(
            "past the buffer",
            (&one.slice(..), &[0..1, 0..1]),
            (&mut other.slice_mut(..), &[0..1, 1..2]),
        );
        assert!(
            matches!(refused, Err(Error::InvalidConfig(_))),
            "{refused:?}"
        );
        assert_eq!(comm.poisoned(), None);

        for (round, counts) in COUNTS.iter().enumerate() {
            let what = format!("rank {rank}, round {round}");
            // One word past the messages on both sides, so that an empty round still has
            // buffers; the receive buffer's must come back untouched.
            let mut send_host: Vec<u32> = (0..WORLD)
                .flat_map(|dst| (0..counts[rank][dst]).map(move |i| word(round, rank, dst, i)))
                .collect();
            send_host.push(SENTINEL);
            let send = stream.clone_htod(&send_host).unwrap();
            let recv_total: usize = (0..WORLD).map(|src| counts[src][rank]).sum();
            let mut recv = stream.clone_htod(&vec![SENTINEL; recv_total + 1]).unwrap();

            let to0 = counts[rank][0];
            let sends = [0..to0, to0..to0 + counts[rank][1]];
            let from0 = counts[0][rank];
            let recvs = [0..from0, from0..recv_total];
            comm.exchange(
                "round",
                (&send.slice(..), &sends),
                (&mut recv.slice_mut(..), &recvs),
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            comm.wait("round").unwrap_or_else(|e| panic!("{what}: {e}"));

            let got = stream.clone_dtoh(&recv).unwrap();
            let mut at = 0;
            for (src, sent) in counts.iter().enumerate() {
                for i in 0..sent[rank] {
                    let want = word(round, src, rank, i);
                    if got[at] != want {
                        panic!(
                            "{what}: word {i} from rank {src} is {:#x}, want {want:#x}",
                            got[at]
                        );
                    }
                    at += 1;
                }
            }
            assert_eq!(got[at], SENTINEL, "{what}: written past the last message");
        }
        assert_eq!(comm.poisoned(), None);
        // Dropped healthy: finalised and destroyed, within the timeout.
    });
}

#[test]
fn ranks_that_disagree_on_sizes_both_time_out_then_every_call_is_aborted() {
    const TEST: &str = "ranks_that_disagree_on_sizes_both_time_out_then_every_call_is_aborted";
    let Some(devs) = ranks_or_skip(TEST) else {
        return;
    };
    let id = NcclId::new().unwrap();
    run_ranks(devs, LONG + 10 * SHORT, move |rank, dev| {
        let mut comm = EpComm::new(&dev, rank, WORLD, &id, LONG).unwrap();
        let stream = dev.stream().clone();
        // Each rank sends its rank number to both ranks.
        let send = stream.clone_htod(&[rank as u32; 2]).unwrap();
        let sends = [0..1, 1..2];
        let mut recv = stream.alloc_zeros::<u32>(BIG + 1).unwrap();

        // A matching exchange first, so that NCCL's connections exist and the failure below is
        // in the transfer itself.
        comm.exchange(
            "warm-up",
            (&send.slice(..), &sends),
            (&mut recv.slice_mut(..), &[0..1, 1..2]),
        )
        .unwrap();
        comm.wait("warm-up").unwrap();
        assert_eq!(stream.clone_dtoh(&recv.slice(..2)).unwrap(), [0, 1]);

        // Out of step: each rank sends its peer one word but expects BIG words from it, so each
        // rank's receive from its peer waits for data that never comes. (The self messages
        // agree.)
        comm.set_timeout(SHORT);
        let start = Instant::now();
        let outcome = {
            let (own, from_peer) = (0..1, 1..BIG + 1);
            let recvs = if rank == 0 {
                [own, from_peer]
            } else {
                [from_peer, own]
            };
            comm.exchange(
                "out of step",
                (&send.slice(..), &sends),
                (&mut recv.slice_mut(..), &recvs),
            )
            .and_then(|()| comm.wait("out of step"))
        };
        let elapsed = start.elapsed();
        match outcome {
            Err(Error::EpTimeout { op, waited }) => {
                assert_eq!(op, "out of step");
                assert!(waited >= SHORT, "rank {rank} gave up after {waited:?}");
            }
            other => panic!("rank {rank}: expected EpTimeout, got {other:?}"),
        }
        assert!(
            elapsed < 2 * SHORT,
            "rank {rank}: the failed exchange took {elapsed:?} with a timeout of {SHORT:?}"
        );

        let why = comm.poisoned().expect("an aborted communicator").to_owned();
        let later = comm.wait("after");
        assert!(
            matches!(&later, Err(Error::EpAborted(w)) if *w == why),
            "{later:?}"
        );
        let later = comm.exchange(
            "after",
            (&send.slice(..), &sends),
            (&mut recv.slice_mut(..), &[0..1, 1..2]),
        );
        assert!(
            matches!(&later, Err(Error::EpAborted(w)) if *w == why),
            "{later:?}"
        );
    });
}

#[test]
fn a_rank_that_never_exchanges_ends_its_peers_exchange_in_ep_timeout() {
    const TEST: &str = "a_rank_that_never_exchanges_ends_its_peers_exchange_in_ep_timeout";
    let Some(devs) = ranks_or_skip(TEST) else {
        return;
    };
    let id = NcclId::new().unwrap();
    let rank0_done = Arc::new(Barrier::new(WORLD));
    run_ranks(devs, LONG + 10 * SHORT, move |rank, dev| {
        let mut comm = EpComm::new(&dev, rank, WORLD, &id, LONG).unwrap();
        let stream = dev.stream().clone();
        let send = stream.clone_htod(&[rank as u32; 2]).unwrap();
        let sends = [0..1, 1..2];
        let mut recv = stream.alloc_zeros::<u32>(2).unwrap();

        if rank == 1 {
            // Takes no part; once rank 0 has given up, leaves by aborting.
            rank0_done.wait();
            comm.abort("rank 1 left the group");
            assert_eq!(comm.poisoned(), Some("rank 1 left the group"));
            let later = comm.exchange(
                "after leaving",
                (&send.slice(..), &sends),
                (&mut recv.slice_mut(..), &[0..1, 1..2]),
            );
            assert!(
                matches!(&later, Err(Error::EpAborted(w)) if w == "rank 1 left the group"),
                "{later:?}"
            );
            return;
        }

        // No exchange before this one: NCCL has yet to connect the ranks, which needs rank 1,
        // so the wait may end in the exchange's own host side or in `wait`.
        comm.set_timeout(SHORT);
        let start = Instant::now();
        let outcome = {
            comm.exchange(
                "alone",
                (&send.slice(..), &sends),
                (&mut recv.slice_mut(..), &[0..1, 1..2]),
            )
            .and_then(|()| comm.wait("alone"))
        };
        let elapsed = start.elapsed();
        // Before any assertion, so that rank 1 never waits for a rank 0 that failed.
        rank0_done.wait();
        match outcome {
            Err(Error::EpTimeout { op, waited }) => {
                assert_eq!(op, "alone");
                assert!(waited >= SHORT, "gave up after {waited:?}");
            }
            other => panic!("expected EpTimeout, got {other:?}"),
        }
        assert!(
            elapsed < 2 * SHORT,
            "the exchange took {elapsed:?} with a timeout of {SHORT:?}"
        );
        assert!(matches!(comm.wait("after"), Err(Error::EpAborted(_))));
    });
}
