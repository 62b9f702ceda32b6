//! The all-to-all between R ranks of one process (threads), with every wait bounded: the
//! rendezvous of the loopback transport, which runs the expert-parallel protocol with several
//! ranks on one GPU (NCCL refuses two ranks on one device), and the place where the protocol's
//! failure modes are pinned down.
//!
//! One [`Endpoint::exchange`] is one all-to-all: every rank posts one message for every rank
//! (itself included; a message may be empty) and the sizes it expects from each, then waits
//! until every rank has posted. What NCCL leaves undefined, and in practice hangs on, becomes a
//! typed error here:
//!
//! - a message whose size is not what its receiver expects: every rank checks the whole round
//!   (all sizes and expectations are posted), so every rank returns the same
//!   [`Error::EpMismatch`] naming the first sender (in rank order) at fault;
//! - a rank that does not post within the timeout: [`Error::EpTimeout`] on the rank that gave up
//!   waiting;
//! - after either, the hub is poisoned and every call of every rank returns
//!   [`Error::EpAborted`] with the first failure's description, so no rank waits on a group
//!   that has failed.
//!
//! The payload `P` is whatever the transport moves: host words in the tests, device buffers
//! with the events that order them in the GPU transport. The hub only matches and hands over.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// One message: its size in bytes (what the receiver's expectation is checked against) and what
/// it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Msg<P> {
    /// The message's size in bytes.
    pub bytes: usize,
    /// What the transport moves.
    pub payload: P,
}

/// The shared state of R ranks' endpoints (see the module documentation). Cloning shares it.
#[derive(Debug)]
pub struct LoopbackHub<P> {
    shared: Arc<Shared<P>>,
}

impl<P> Clone for LoopbackHub<P> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

#[derive(Debug)]
struct Shared<P> {
    world: usize,
    state: Mutex<State<P>>,
    posted: Condvar,
}

#[derive(Debug)]
struct State<P> {
    /// Which ranks have taken their endpoint.
    taken: Vec<bool>,
    /// Rounds some rank has posted to and not every rank has collected from.
    rounds: HashMap<u64, Round<P>>,
    /// The first failure, once there is one.
    poisoned: Option<String>,
}

#[derive(Debug)]
struct Round<P> {
    /// `posts[s]`: rank s's messages by receiver, and the bytes it expects from each sender.
    posts: Vec<Option<Post<P>>>,
    collected: usize,
}

#[derive(Debug)]
struct Post<P> {
    sends: Vec<Option<Msg<P>>>,
    expect: Vec<usize>,
}

impl<P: Send> LoopbackHub<P> {
    /// A hub for `world` ≥ 1 ranks.
    pub fn new(world: usize) -> Result<Self> {
        if world == 0 {
            return Err(Error::InvalidConfig(
                "a group needs at least one rank".into(),
            ));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                world,
                state: Mutex::new(State {
                    taken: vec![false; world],
                    rounds: HashMap::new(),
                    poisoned: None,
                }),
                posted: Condvar::new(),
            }),
        })
    }

    /// R, the number of ranks.
    pub fn world(&self) -> usize {
        self.shared.world
    }

    /// Rank `rank`'s endpoint, whose every wait gives up after `timeout`. Each rank's endpoint
    /// can be taken once: two endpoints of one rank would post into each other's rounds.
    pub fn endpoint(&self, rank: usize, timeout: Duration) -> Result<Endpoint<P>> {
        let mut state = self.shared.lock();
        if rank >= self.shared.world {
            return Err(Error::InvalidConfig(format!(
                "rank {rank} in a group of {}",
                self.shared.world
            )));
        }
        if std::mem::replace(&mut state.taken[rank], true) {
            return Err(Error::InvalidConfig(format!(
                "rank {rank}'s endpoint was already taken"
            )));
        }
        Ok(Endpoint {
            shared: Arc::clone(&self.shared),
            rank,
            round: 0,
            timeout,
        })
    }
}

impl<P> Shared<P> {
    /// The state, also when another rank's thread panicked while holding it: the state is
    /// changed only by whole steps, so it is consistent whenever the lock is free.
    fn lock(&self) -> MutexGuard<'_, State<P>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One rank's side of a [`LoopbackHub`]. Dropping it does not poison the hub: a rank that is
/// done may leave while the others finish their last round; a rank that leaves early makes its
/// peers' next wait end in [`Error::EpTimeout`].
#[derive(Debug)]
pub struct Endpoint<P> {
    shared: Arc<Shared<P>>,
    rank: usize,
    round: u64,
    timeout: Duration,
}

impl<P: Send> Endpoint<P> {
    /// This endpoint's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// R, the number of ranks.
    pub fn world(&self) -> usize {
        self.shared.world
    }

    /// One all-to-all, named `op` in errors: `sends[q]` goes to rank q, and `expect[q]` is the
    /// size of the message this rank expects from rank q. Returns the messages sent to this
    /// rank, by sender. Waits at most the endpoint's timeout for the others to post; see the
    /// module documentation for the errors, after any of which the hub is poisoned.
    pub fn exchange(
        &mut self,
        op: &'static str,
        sends: Vec<Msg<P>>,
        expect: &[usize],
    ) -> Result<Vec<P>> {
        let world = self.shared.world;
        let mut state = self.shared.lock();
        if let Some(why) = &state.poisoned {
            return Err(Error::EpAborted(why.clone()));
        }
        if sends.len() != world || expect.len() != world {
            let why = format!(
                "rank {} called {op} with {} messages and {} expected sizes for {world} ranks",
                self.rank,
                sends.len(),
                expect.len()
            );
            return Err(self.poison(state, why, Error::InvalidConfig));
        }
        let round_no = self.round;
        self.round += 1;
        let round = state.rounds.entry(round_no).or_insert_with(|| Round {
            posts: (0..world).map(|_| None).collect(),
            collected: 0,
        });
        round.posts[self.rank] = Some(Post {
            sends: sends.into_iter().map(Some).collect(),
            expect: expect.to_vec(),
        });
        self.shared.posted.notify_all();

        let start = Instant::now();
        let deadline = start + self.timeout;
        loop {
            // A complete round first: a rank that found a size mismatch in it has poisoned the
            // hub, and every rank must reach that same verdict, not an abort.
            let round = &state.rounds[&round_no];
            if round.posts.iter().all(Option::is_some) {
                break;
            }
            if let Some(why) = &state.poisoned {
                return Err(Error::EpAborted(why.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> =
                    (0..world).filter(|&s| round.posts[s].is_none()).collect();
                let why = format!(
                    "rank {} waited {:?} in {op} (call {round_no}) for ranks {missing:?}, \
                     which never posted",
                    self.rank, self.timeout
                );
                let waited = now - start;
                return Err(self.poison(state, why, |_| Error::EpTimeout { op, waited }));
            }
            state = self
                .shared
                .posted
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }

        if let Some((sender, what)) = first_size_mismatch(&state.rounds[&round_no]) {
            let why = format!("in {op} (call {round_no}), rank {sender} {what}");
            return Err(self.poison(state, why, |_| Error::EpMismatch {
                rank: sender,
                what: format!("in {op}, it {what}"),
            }));
        }
        let round = state
            .rounds
            .get_mut(&round_no)
            .expect("the round just checked");
        let received = round
            .posts
            .iter_mut()
            .map(|post| {
                let post = post.as_mut().expect("every rank posted");
                post.sends[self.rank]
                    .take()
                    .expect("collected once")
                    .payload
            })
            .collect();
        round.collected += 1;
        if round.collected == world {
            state.rounds.remove(&round_no);
        }
        Ok(received)
    }

    /// Records the first failure (later ones keep it), wakes every waiting rank, and returns
    /// this rank's error.
    fn poison(
        &self,
        mut state: MutexGuard<'_, State<P>>,
        why: String,
        error: impl FnOnce(String) -> Error,
    ) -> Error {
        let first = state.poisoned.get_or_insert(why).clone();
        self.shared.posted.notify_all();
        error(first)
    }
}

/// The first message (by sender, then receiver) whose size is not what its receiver expects:
/// the same answer on every rank, since every rank sees the whole round.
fn first_size_mismatch<P>(round: &Round<P>) -> Option<(usize, String)> {
    let posts: Vec<&Post<P>> = round.posts.iter().flatten().collect();
    for (s, post) in posts.iter().enumerate() {
        for (q, msg) in post.sends.iter().enumerate() {
            let Some(msg) = msg else { continue };
            let want = posts[q].expect[s];
            if msg.bytes != want {
                return Some((
                    s,
                    format!("sent rank {q} {} bytes where it expects {want}", msg.bytes),
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    const LONG: Duration = Duration::from_secs(20);

    fn words(v: &[u32]) -> Msg<Vec<u32>> {
        Msg {
            bytes: 4 * v.len(),
            payload: v.to_vec(),
        }
    }

    /// Runs `body(endpoint)` on one thread per rank and returns their results by rank.
    fn run_ranks<T: Send>(
        world: usize,
        timeout: Duration,
        body: impl Fn(Endpoint<Vec<u32>>) -> T + Sync,
    ) -> Vec<T> {
        let hub = LoopbackHub::new(world).unwrap();
        thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|r| {
                    let ep = hub.endpoint(r, timeout).unwrap();
                    let body = &body;
                    s.spawn(move || body(ep))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn an_exchange_hands_each_rank_what_every_rank_sent_it() {
        let got = run_ranks(3, LONG, |mut ep| {
            let r = ep.rank() as u32;
            let mut rounds = Vec::new();
            for call in 0..4u32 {
                // Rank r sends rank q r+q+call words, each 100 r + q, and expects s+r+call from s.
                let sends = (0..3)
                    .map(|q| words(&vec![100 * r + q; (r + q + call) as usize]))
                    .collect();
                let expect: Vec<usize> = (0..3).map(|s| 4 * (s + r + call) as usize).collect();
                rounds.push(ep.exchange("test", sends, &expect).unwrap());
            }
            rounds
        });
        for (r, rounds) in got.iter().enumerate() {
            for (call, recv) in rounds.iter().enumerate() {
                for (s, msg) in recv.iter().enumerate() {
                    assert_eq!(msg, &vec![(100 * s + r) as u32; s + r + call]);
                }
            }
        }
    }

    #[test]
    fn a_size_mismatch_is_the_same_error_on_every_rank_and_poisons_the_group() {
        let got = run_ranks(2, LONG, |mut ep| {
            // Rank 1 sends rank 0 three words where rank 0 expects two.
            let n = if ep.rank() == 1 { 3 } else { 2 };
            let first = ep.exchange("counts", vec![words(&vec![1; n]), words(&[1; 2])], &[8, 8]);
            let after = ep.exchange("rows", vec![words(&[]), words(&[])], &[0, 0]);
            (first, after)
        });
        for (first, after) in got {
            assert_eq!(
                first.unwrap_err(),
                Error::EpMismatch {
                    rank: 1,
                    what: "in counts, it sent rank 0 12 bytes where it expects 8".into()
                }
            );
            assert!(matches!(after, Err(Error::EpAborted(why)) if why.contains("rank 1 sent")));
        }
    }

    #[test]
    fn a_rank_that_never_calls_ends_its_peers_wait_in_a_timeout_not_a_hang() {
        let timeout = Duration::from_millis(200);
        let start = Instant::now();
        let got = run_ranks(3, timeout, |mut ep| {
            if ep.rank() == 2 {
                return None; // leaves without a word
            }
            let sends = (0..3).map(|_| words(&[7])).collect();
            let first = ep.exchange("counts", sends, &[4; 3]);
            let sends = (0..3).map(|_| words(&[7])).collect();
            Some((first, ep.exchange("counts", sends, &[4; 3])))
        });
        assert!(start.elapsed() < 2 * timeout + Duration::from_millis(500));
        let mut timeouts = 0;
        for (first, after) in got.into_iter().flatten() {
            match first.unwrap_err() {
                Error::EpTimeout { op, waited } => {
                    assert_eq!(op, "counts");
                    assert!(waited >= timeout);
                    timeouts += 1;
                }
                // The other waiter was woken by the first to give up.
                Error::EpAborted(why) => assert!(why.contains("[2]"), "{why}"),
                other => panic!("{other:?}"),
            }
            assert!(matches!(after, Err(Error::EpAborted(_))));
        }
        assert!(timeouts >= 1);
    }

    #[test]
    fn bad_arguments_fail_the_caller_and_abort_its_peers() {
        let got = run_ranks(2, LONG, |mut ep| {
            if ep.rank() == 0 {
                ep.exchange("counts", vec![words(&[1])], &[4, 4])
            } else {
                ep.exchange("counts", vec![words(&[1]), words(&[1])], &[4, 4])
            }
        });
        assert!(matches!(&got[0], Err(Error::InvalidConfig(_))));
        assert!(matches!(&got[1], Err(Error::EpAborted(why)) if why.contains("1 messages")));
    }

    #[test]
    fn ranks_set_up_differently_all_refuse_the_group() {
        use crate::ep::EpSetup;
        use crate::moe::RouterKind;
        use crate::tensor::DType;
        use crate::LayerConfig;
        let got = run_ranks(3, LONG, |mut ep| {
            // Rank 2 has another hidden size.
            let h = if ep.rank() == 2 { 72 } else { 64 };
            let setup = EpSetup {
                world: 3,
                config: LayerConfig::new(100 * ep.rank(), h, 128, 6, 2),
                dtype: DType::BF16,
                router: RouterKind::Relu,
            };
            let record = setup.to_words().unwrap();
            let sends = (0..3).map(|_| words(&record)).collect();
            let records = ep.exchange("setup", sends, &[4 * EpSetup::WORDS; 3])?;
            let records: Vec<[u32; EpSetup::WORDS]> =
                records.iter().map(|r| r[..].try_into().unwrap()).collect();
            EpSetup::check_agreement(&records)
        });
        for verdict in got {
            assert_eq!(
                verdict.unwrap_err(),
                Error::EpMismatch {
                    rank: 2,
                    what: "H = 72 where rank 0 has 64".into()
                }
            );
        }
    }

    #[test]
    fn each_ranks_endpoint_is_taken_once() {
        let hub = LoopbackHub::<Vec<u32>>::new(2).unwrap();
        hub.endpoint(1, LONG).unwrap();
        assert!(matches!(
            hub.endpoint(1, LONG),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            hub.endpoint(2, LONG),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            LoopbackHub::<Vec<u32>>::new(0),
            Err(Error::InvalidConfig(_))
        ));
    }
}
