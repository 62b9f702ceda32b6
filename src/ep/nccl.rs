//! The NCCL transport of expert parallelism (feature `ep`): one rank per GPU, each with an
//! [`EpComm`], and one primitive, [`EpComm::exchange`], an all-to-all of byte messages of any
//! sizes, followed by the bounded [`EpComm::wait`].
//!
//! # Why grouped send/recv and not `ncclAlltoAll`
//!
//! An exchange posts, inside one `ncclGroupStart`/`ncclGroupEnd`, one `ncclSend` and one
//! `ncclRecv` for every rank, itself and empty messages included (NCCL matches zero-byte
//! point-to-point messages and a send to self with its receive, when both are in the group).
//! NCCL fuses such a group into one all-to-all. `ncclAlltoAll` would not do: it moves the same
//! count to every peer, while the expert-parallel messages differ per peer and per call; it
//! first appeared in NCCL 2.28, where send/recv are in every NCCL this crate can run; and cudarc
//! panics when a symbol is missing from the loaded library, so each newer symbol narrows the
//! NCCLs that work.
//!
//! # Why a nonblocking communicator and bounded waits
//!
//! NCCL cannot check that the ranks agree: a message whose sender and receiver disagree on its
//! size, or a rank that never posts its half, is undefined behaviour that in practice leaves the
//! NCCL kernel, and with it the stream, waiting forever. Only `ncclCommAbort` ends that. So the
//! communicator is created nonblocking (NCCL's host-side work returns at once, and the
//! communicator's state is polled through `ncclCommGetAsyncError`), and every wait of this
//! module (the communicator's initialisation, the host side of an exchange, [`EpComm::wait`],
//! and the finalisation in `Drop`) is one poll loop with a deadline. A wait that reaches it
//! aborts the communicator and returns [`Error::EpTimeout`]; an error reported by NCCL aborts it
//! and returns [`Error::Collective`]. Either way the communicator is poisoned: every later call
//! returns [`Error::EpAborted`] with the first failure's description. A size mismatch therefore
//! surfaces as a timeout on the rank (or ranks) left waiting, not as a precise
//! [`Error::EpMismatch`]: that exactness belongs to the protocol's count and header exchanges
//! (fixed-size messages, checked on the host) and to the loopback hub
//! ([`crate::ep::loopback`]).
//!
//! # Loading NCCL
//!
//! cudarc opens libnccl at run time (this crate's default `dynamic-loading`) and panics when it
//! cannot; [`library_present`] asks first, and every constructor of this module calls it, so a
//! missing NCCL is [`Error::NcclUnavailable`]. cudarc looks for `libnccl.so` (and a few other
//! names), not for NCCL's soname `libnccl.so.2`: where only the latter is installed (pip's
//! `nvidia-nccl-cu13`, the runtime packages) put a `libnccl.so -> libnccl.so.2` symlink in a
//! directory on `LD_LIBRARY_PATH`. The transport needs NCCL 2.14 or later (nonblocking
//! communicators).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{
    CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice, DriverError,
};
use cudarc::nccl::result::{self, NcclError, NcclStatus};
use cudarc::nccl::sys;

use super::transport::check_ranges;
use crate::device::Device;
use crate::error::{Error, Result};

/// NCCL's `NCCL_VERSION(major, minor, patch)`: the version code `ncclGetVersion` reports and
/// `ncclConfig_t.version` holds (the encoding changed after 2.8).
const fn nccl_version_code(major: u32, minor: u32, patch: u32) -> u32 {
    if major <= 2 && minor <= 8 {
        major * 1000 + minor * 100 + patch
    } else {
        major * 10000 + minor * 100 + patch
    }
}

/// The oldest NCCL the transport runs on (as [`nccl_version`] reports it): nonblocking
/// communicators, `ncclCommInitRankConfig` and `ncclCommFinalize` appeared in NCCL 2.14, and
/// cudarc panics on a symbol the loaded library lacks.
pub const MIN_NCCL_VERSION: i32 = nccl_version_code(2, 14, 0) as i32;

/// The header version `ncclConfig_t.version` declares. NCCL reads the fields of the struct up to
/// its `size` and resets those the declared version predates, so the version must be that of
/// the layout cudarc's bindings (`nccl-02030`) give `ncclConfig_t`: 2.30's, ending at
/// `maxP2pPeers` (2.30.5 appended `graphStreamOrdering`, which this struct does not have).
const CONFIG_VERSION: u32 = nccl_version_code(2, 30, 0);
/// `NCCL_API_MAGIC`, which NCCL checks to tell an initialised config from garbage.
const CONFIG_MAGIC: u32 = 0xcafe_beef;
/// `NCCL_CONFIG_UNDEF_INT`: "not set, use NCCL's default".
const CONFIG_UNDEF_INT: c_int = c_int::MIN;

/// How long a wait polls without giving up the CPU, before it yields between polls: an
/// exchange between two GPUs of one host often completes within this, and yielding at once
/// would add a scheduler round trip to each of them.
const SPIN: Duration = Duration::from_micros(20);

const NCCL_SUCCESS: u32 = sys::ncclResult_t::ncclSuccess as u32;
const NCCL_IN_PROGRESS: u32 = sys::ncclResult_t::ncclInProgress as u32;

/// What [`library_present`] says when libnccl cannot be loaded.
const MISSING: &str = "libnccl could not be loaded: cudarc looks for libnccl.so (and \
    libnccl.so.<CUDA major>, among other names), not for NCCL's soname libnccl.so.2. Install NCCL \
    (2.14 or later) and, where only libnccl.so.2 exists (pip's nvidia-nccl-cu13, the runtime \
    packages), create a symlink libnccl.so -> libnccl.so.2 in a directory on LD_LIBRARY_PATH";

/// Whether NCCL can be used here: `Ok(())` when libnccl can be loaded under a name cudarc
/// looks for, [`Error::NcclUnavailable`] (saying how to fix it) when not. Never panics, where
/// cudarc's loader would. Every constructor of this module calls it first.
pub fn library_present() -> Result<()> {
    if nccl_loadable() {
        Ok(())
    } else {
        Err(Error::NcclUnavailable(MISSING.into()))
    }
}

/// cudarc's own probe, over the names its loader tries.
#[cfg(feature = "dynamic-loading")]
fn nccl_loadable() -> bool {
    // SAFETY: the probe opens each candidate library and closes it again; loading runs the
    // library's initialisers, which set up NCCL's own state only. cudarc's loader would load
    // the same library the same way.
    unsafe { sys::is_culib_present() }
}

/// Linked: the dynamic loader resolved libnccl before this code could run (the binary does not
/// start without it), and cudarc's probe does not exist in this mode.
#[cfg(all(
    not(feature = "dynamic-loading"),
    any(feature = "dynamic-linking", feature = "candle")
))]
fn nccl_loadable() -> bool {
    true
}

/// cudarc's mode is another crate's choice here: linked (as candle chooses), or its fallback of
/// loading at run time, in which case a missing library panics. Its probe exists only in the
/// latter, so ask for the first name its loader tries: a present `libnccl.so` is enough in
/// either mode (a false "missing" is possible in the linked mode, never a panic).
#[cfg(all(
    not(feature = "dynamic-loading"),
    not(any(feature = "dynamic-linking", feature = "candle"))
))]
fn nccl_loadable() -> bool {
    let name = format!(
        "{}nccl{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    // SAFETY: as for cudarc's probe above: loading runs NCCL's initialisers only, and the handle
    // is closed again when dropped here.
    unsafe { libloading::Library::new(name) }.is_ok()
}

/// The version of the loaded NCCL, as NCCL encodes it (2.30.7 is 23007), for benchmark reports
/// and for the check against [`MIN_NCCL_VERSION`] that [`EpComm::new`] makes.
pub fn nccl_version() -> Result<i32> {
    library_present()?;
    result::get_nccl_version().map_err(|e| collective("nccl_version", e.0 as u32))
}

/// The id every rank of one communicator is created with: made once ([`NcclId::new`], on one
/// rank or by the launcher), passed to the others out of band as its 128 bytes
/// ([`NcclId::to_bytes`], [`NcclId::from_bytes`]). It holds the address of the bootstrap
/// listener that [`NcclId::new`] starts in its process, so that process must live until every
/// rank's [`EpComm::new`] has returned.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NcclId(sys::ncclUniqueId);

impl NcclId {
    /// A new id (`ncclGetUniqueId`).
    pub fn new() -> Result<Self> {
        library_present()?;
        result::get_uniqueid()
            .map(Self)
            .map_err(|e| collective("NcclId::new", e.0 as u32))
    }

    /// The id's bytes, to send to the other ranks.
    pub fn to_bytes(&self) -> [u8; 128] {
        self.0.internal.map(|c| c.to_ne_bytes()[0])
    }

    /// The id another rank made, from its [`NcclId::to_bytes`].
    pub fn from_bytes(bytes: [u8; 128]) -> Self {
        Self(sys::ncclUniqueId {
            internal: bytes.map(|b| c_char::from_ne_bytes([b])),
        })
    }
}

impl fmt::Debug for NcclId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bytes are an opaque address; 128 of them would only flood a log.
        f.debug_struct("NcclId").finish_non_exhaustive()
    }
}

/// `NCCL_CONFIG_INITIALIZER` of the `ncclConfig_t` layout in cudarc's bindings: every setting
/// left to NCCL.
fn config_initializer() -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        blocking: CONFIG_UNDEF_INT,
        cgaClusterSize: CONFIG_UNDEF_INT,
        minCTAs: CONFIG_UNDEF_INT,
        maxCTAs: CONFIG_UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: CONFIG_UNDEF_INT,
        trafficClass: CONFIG_UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: CONFIG_UNDEF_INT,
        CTAPolicy: CONFIG_UNDEF_INT,
        shrinkShare: CONFIG_UNDEF_INT,
        nvlsCTAs: CONFIG_UNDEF_INT,
        nChannelsPerNetPeer: CONFIG_UNDEF_INT,
        nvlinkCentricSched: CONFIG_UNDEF_INT,
        graphUsageMode: CONFIG_UNDEF_INT,
        numRmaCtx: CONFIG_UNDEF_INT,
        maxP2pPeers: CONFIG_UNDEF_INT,
    }
}

/// The config of an [`EpComm`]: NCCL's defaults, but nonblocking (see the module
/// documentation).
fn nonblocking_config() -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        blocking: 0,
        ..config_initializer()
    }
}

/// Why an NCCL step did not succeed, before [`EpComm::fail`] turns it into an [`Error`].
#[derive(Debug)]
enum Stop {
    /// The deadline passed after this long.
    TimedOut(Duration),
    /// NCCL returned or reported this `ncclResult_t`.
    Nccl(u32),
    /// A CUDA driver call of the wait failed.
    Driver(DriverError),
}

/// A call of cudarc's `result` layer that started (or did) its work: `ncclInProgress` means the
/// nonblocking communicator goes on in the background, to be polled to completion.
fn started(r: std::result::Result<NcclStatus, NcclError>) -> std::result::Result<(), Stop> {
    match r {
        Ok(NcclStatus::Success | NcclStatus::InProgress) => Ok(()),
        // cudarc passes ncclNumResults on as a status; NCCL never returns it for a call.
        Ok(NcclStatus::NumResults) => Err(Stop::Nccl(sys::ncclResult_t::ncclNumResults as u32)),
        Err(e) => Err(Stop::Nccl(e.0 as u32)),
    }
}

/// The communicator's state: `Ok(true)` when its last operation is done, `Ok(false)` while it
/// is in progress, the error it reports otherwise.
fn comm_ready(comm: sys::ncclComm_t) -> std::result::Result<bool, Stop> {
    let mut state: u32 = NCCL_IN_PROGRESS;
    // SAFETY: `comm` is a live communicator: callers pass the handle an `EpComm` holds, which is
    // nulled (and never passed again) once aborted or destroyed. NCCL writes a 4-byte
    // `ncclResult_t` into `state`, a `u32` (the enum is `repr(u32)`), which is read as a number
    // so that a code newer than the bindings is never an invalid enum value on this side.
    let rc = unsafe { sys::ncclCommGetAsyncError(comm, (&mut state as *mut u32).cast()) };
    if rc != sys::ncclResult_t::ncclSuccess {
        return Err(Stop::Nccl(rc as u32));
    }
    match state {
        NCCL_SUCCESS => Ok(true),
        NCCL_IN_PROGRESS => Ok(false),
        code => Err(Stop::Nccl(code)),
    }
}

/// The one bounded wait: polls `ready` until it says so, fails, or `timeout` has passed (it is
/// asked at least once, also with a zero timeout). Spins for [`SPIN`], then yields the CPU
/// between polls.
fn poll(
    timeout: Duration,
    mut ready: impl FnMut() -> std::result::Result<bool, Stop>,
) -> std::result::Result<(), Stop> {
    let start = Instant::now();
    loop {
        if ready()? {
            return Ok(());
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(Stop::TimedOut(waited));
        }
        if waited < SPIN {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// NCCL's description of a result code (`ncclGetErrorString`). Only called after an NCCL call,
/// so the library is loaded.
fn nccl_message(code: u32) -> String {
    use sys::ncclResult_t as R;
    let known = [
        R::ncclSuccess,
        R::ncclUnhandledCudaError,
        R::ncclSystemError,
        R::ncclInternalError,
        R::ncclInvalidArgument,
        R::ncclInvalidUsage,
        R::ncclRemoteError,
        R::ncclInProgress,
        R::ncclTimeout,
        R::ncclNumResults,
    ]
    .into_iter()
    .find(|r| *r as u32 == code);
    let Some(result) = known else {
        return "a result code newer than this crate's NCCL bindings".into();
    };
    // SAFETY: ncclGetErrorString takes any ncclResult_t and returns a pointer to a static,
    // NUL-terminated string (a literal in NCCL's source), which is copied out at once.
    let text = unsafe { sys::ncclGetErrorString(result) };
    if text.is_null() {
        return format!("{result:?}");
    }
    // SAFETY: as above: a live, NUL-terminated string.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

fn collective(op: &'static str, code: u32) -> Error {
    Error::Collective {
        op,
        code: code as i32,
        message: nccl_message(code),
    }
}

/// One rank's NCCL communicator for expert parallelism: nonblocking, with every wait bounded by
/// its timeout (see the module documentation).
///
/// The usual cycle, on the thread that drives this rank's GPU:
///
/// ```no_run
/// use std::time::Duration;
/// use remoe_kernels::ep::nccl::{EpComm, NcclId};
/// use remoe_kernels::Device;
///
/// # fn main() -> remoe_kernels::Result<()> {
/// # let (rank, world) = (0, 2);
/// // One id for the whole group, from rank 0 or the launcher, passed to all ranks out of band.
/// let id = NcclId::from_bytes([0; 128]); // the real bytes come from NcclId::new().to_bytes()
/// let dev = Device::new(rank)?;
/// let mut comm = EpComm::new(&dev, rank, world, &id, Duration::from_secs(60))?;
/// let stream = dev.stream().clone();
/// let send = stream.clone_htod(&[rank as u32; 8])?;
/// let mut recv = stream.alloc_zeros::<u32>(8)?;
/// // Words 0..4 to rank 0 and 4..8 to rank 1; rank q's message lands at 4q.
/// let ranges = [0..4, 4..8];
/// comm.exchange(
///     "example",
///     (&send.slice(..), &ranges),
///     (&mut recv.slice_mut(..), &ranges),
/// )?;
/// comm.wait("example")?; // before anything that synchronises the stream
/// # Ok(())
/// # }
/// ```
///
/// Not `Send`: NCCL allows a communicator to be used from another thread than the one that
/// made it as long as no two threads use it at once, but NCCL keeps its group state per
/// thread, and the design runs one thread per rank that creates its own communicator; nothing
/// needs to move one, so the type does not promise it (the raw handle keeps it `!Send`).
pub struct EpComm {
    /// The NCCL handle: live exactly while `poisoned` is `None` (outside `drop`); null once
    /// aborted or destroyed, and never passed to NCCL again then.
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    dev: Device,
    timeout: Duration,
    /// The first failure's description, once there is one.
    poisoned: Option<String>,
}

impl fmt::Debug for EpComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.dev.ordinal())
            .field("timeout", &self.timeout)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl EpComm {
    /// Rank `rank` of `world` on `dev`, for the group of `id`: every rank calls this with the
    /// same id and world, each with its own rank and device. Waits at most `timeout` for all
    /// ranks to join ([`Error::EpTimeout`] otherwise, naming `"EpComm::new"`), and every later
    /// wait of the communicator at most its timeout too ([`EpComm::set_timeout`] changes it).
    ///
    /// The device's stream must belong to the device's primary context, as those of
    /// [`Device::new`] and of candle do: NCCL's own threads work in the primary context
    /// (`cudaSetDevice`), where its memory lives and its kernels are launched.
    ///
    /// Fails with [`Error::NcclUnavailable`] when libnccl cannot be loaded or is older than
    /// [`MIN_NCCL_VERSION`], [`Error::InvalidConfig`] for a rank outside `0..world` or a
    /// non-primary context, and [`Error::Collective`] when NCCL refuses (two ranks on one GPU,
    /// among others).
    pub fn new(
        dev: &Device,
        rank: usize,
        world: usize,
        id: &NcclId,
        timeout: Duration,
    ) -> Result<Self> {
        library_present()?;
        let (Ok(nranks), Ok(rank_c)) = (c_int::try_from(world), c_int::try_from(rank)) else {
            return Err(Error::InvalidConfig(format!(
                "rank {rank} of {world}: NCCL counts ranks in a C int"
            )));
        };
        if rank >= world {
            return Err(Error::InvalidConfig(format!(
                "rank {rank} in a group of {world}"
            )));
        }
        if !dev.context().is_primary() {
            return Err(Error::InvalidConfig(format!(
                "rank {rank}: the device's stream is in a non-primary context of device {}; \
                 NCCL works in the primary one",
                dev.ordinal()
            )));
        }
        let version = nccl_version()?;
        if version < MIN_NCCL_VERSION {
            return Err(Error::NcclUnavailable(format!(
                "the loaded NCCL reports version {version}; nonblocking communicators need \
                 {MIN_NCCL_VERSION} (2.14) or later"
            )));
        }
        // NCCL makes the communicator on the calling thread's current device.
        dev.bind_to_thread()?;
        let mut config = nonblocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` are valid for the call, and NCCL copies the config before
        // it returns (parseCommConfig runs in the call), so neither needs to outlive it. The id
        // is passed by value; 0 <= rank < world, both fit a C int (checked above). The version
        // check above guarantees the symbol exists, so cudarc's loader does not panic.
        let init =
            unsafe { result::comm_init_rank_config(&mut comm, nranks, id.0, rank_c, &mut config) };
        // From here on `comm` (when NCCL set it) belongs to `this`: a failure aborts it, and a
        // success hands it to the caller.
        let mut this = Self {
            comm,
            rank,
            world,
            dev: dev.clone(),
            timeout,
            poisoned: None,
        };
        const OP: &str = "EpComm::new";
        if let Err(stop) = started(init) {
            return Err(this.fail(OP, stop));
        }
        this.settle(OP)?;
        Ok(this)
    }

    /// This communicator's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// R, the number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The device (and so the stream) the communicator runs on.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// How long each wait lasts at most.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets how long each later wait lasts at most (a group may start with a long timeout,
    /// while NCCL sets up its connections, and go on with a short one).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The first failure's description once the communicator is aborted, `None` while it is
    /// usable.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// One all-to-all, named `op` in errors: `send[send_ranges[q]]` goes to rank q and
    /// `recv[recv_ranges[q]]` receives rank q's message, for every rank q, this one included
    /// (ranges in elements; a message may be empty; the receive ranges must not overlap, the
    /// send ranges may). Each receive must hold exactly as many elements as its sender sends:
    /// NCCL does not check that, and a disagreement leaves a rank waiting, which
    /// [`EpComm::wait`] turns into [`Error::EpTimeout`].
    ///
    /// The messages are enqueued on the device's stream, ordered after the work already there
    /// (cudarc's event tracking of the buffers included), and moved as bytes. The call returns
    /// once NCCL has enqueued them, without waiting for the transfer: call [`EpComm::wait`]
    /// before anything that synchronises the stream (a read back to the host, or freeing a
    /// buffer on a device without stream-ordered allocation), since a stream stuck in a failed
    /// exchange would never let that return.
    ///
    /// `T: Pod` because a receive writes whatever bytes its sender sent. Fails with
    /// [`Error::InvalidConfig`] unless there is exactly one send and one receive range per rank,
    /// each inside its buffer, or [`Error::WrongContext`] for a buffer of another device;
    /// neither posts anything nor poisons the communicator. NCCL's own failures, and a host
    /// side that does not finish within the timeout, abort it ([`Error::Collective`],
    /// [`Error::EpTimeout`]).
    pub fn exchange<T: DeviceRepr + bytemuck::Pod>(
        &mut self,
        op: &'static str,
        (send, send_ranges): (&CudaView<'_, T>, &[Range<usize>]),
        (recv, recv_ranges): (&mut CudaViewMut<'_, T>, &[Range<usize>]),
    ) -> Result<()> {
        self.usable()?;
        check_ranges(
            op,
            self.world,
            send.len(),
            send_ranges,
            recv.len(),
            recv_ranges,
        )?;
        let ctx = self.dev.context().cu_ctx();
        if send.stream().context().cu_ctx() != ctx {
            return Err(Error::WrongContext {
                what: "EpComm::exchange send buffer",
            });
        }
        if recv.stream().context().cu_ctx() != ctx {
            return Err(Error::WrongContext {
                what: "EpComm::exchange receive buffer",
            });
        }
        // NCCL enqueues on the thread's current device.
        self.dev.bind_to_thread()?;
        // A clone, so that the guards below borrow a local rather than `self`, which a failure
        // must abort and poison while they are alive.
        let stream = Arc::clone(self.dev.stream());
        let raw_stream = stream.cu_stream() as sys::cudaStream_t;
        // The guards record each buffer's read or write event on the stream when dropped, which
        // must come after NCCL has enqueued its kernel: only once the host side has settled.
        let elem = std::mem::size_of::<T>();
        let (send_base, send_guard) = send.device_ptr(&stream);
        let (recv_base, recv_guard) = recv.device_ptr_mut(&stream);
        let at = |base: u64, r: &Range<usize>| (base + (r.start * elem) as u64, r.len() * elem);
        let send_ptrs: Vec<(u64, usize)> = send_ranges.iter().map(|r| at(send_base, r)).collect();
        let recv_ptrs: Vec<(u64, usize)> = recv_ranges.iter().map(|r| at(recv_base, r)).collect();
        let done = match self.post(&send_ptrs, &recv_ptrs, raw_stream) {
            Ok(()) => self.settle(op),
            Err(stop) => Err(self.fail(op, stop)),
        };
        drop((send_guard, recv_guard));
        done
    }

    /// Posts the group: for each peer a send of `sends[peer]` and a receive into
    /// `recvs[peer]` (device pointer, bytes). The group is closed whatever happened inside it:
    /// NCCL's group state is per thread, and a group left open would take in the next call's
    /// operations.
    fn post(
        &self,
        sends: &[(u64, usize)],
        recvs: &[(u64, usize)],
        stream: sys::cudaStream_t,
    ) -> std::result::Result<(), Stop> {
        started(result::group_start())?;
        let mut posted = Ok(());
        for (peer, (&(send_ptr, send_bytes), &(recv_ptr, recv_bytes))) in
            sends.iter().zip(recvs).enumerate()
        {
            // `peer < world`, which fits a C int (checked in `new`).
            let peer = peer as c_int;
            // SAFETY: `send_ptr` is the device pointer of a view the caller lends for this
            // call, `send_bytes` long, in this communicator's context (checked by `exchange`);
            // NCCL only reads it, from a kernel enqueued on `stream` after the buffer's last
            // write (its guard made the stream wait for that), and the guard records the read
            // after that kernel, so cudarc frees or overwrites the buffer only after it.
            // `self.comm` is live (the caller checked `usable`).
            let sent = unsafe {
                result::send(
                    send_ptr as *const c_void,
                    send_bytes,
                    sys::ncclDataType_t::ncclUint8,
                    peer,
                    self.comm,
                    stream,
                )
            };
            if let Err(stop) = started(sent) {
                posted = Err(stop);
                break;
            }
            // SAFETY: as for the send: a lent view's device pointer, `recv_bytes` long, in this
            // context, written only by the NCCL kernel on `stream`, ordered after the buffer's
            // earlier reads and writes, with its write recorded after the kernel. The views of
            // one call are disjoint: `recvs` holds them as `&mut`.
            let received = unsafe {
                result::recv(
                    recv_ptr as *mut c_void,
                    recv_bytes,
                    sys::ncclDataType_t::ncclUint8,
                    peer,
                    self.comm,
                    stream,
                )
            };
            if let Err(stop) = started(received) {
                posted = Err(stop);
                break;
            }
        }
        let ended = started(result::group_end());
        posted.and(ended)
    }

    /// Waits until everything enqueued on the device's stream so far, this communicator's
    /// exchanges included, has finished: at most the timeout. On the deadline the communicator
    /// is aborted (which also ends its kernels that are still waiting on the GPU) and the call
    /// returns [`Error::EpTimeout`] named `op`; on an error NCCL reports,
    /// [`Error::Collective`]; on a CUDA error of the stream, [`Error::Driver`] (also
    /// aborting). After any of them the received buffers hold no defined data.
    pub fn wait(&mut self, op: &'static str) -> Result<()> {
        self.usable()?;
        let event = match self
            .dev
            .bind_to_thread()
            .and_then(|()| Ok(self.dev.stream().record_event(None)?))
        {
            Ok(event) => event,
            Err(Error::Driver(e)) => return Err(self.fail(op, Stop::Driver(e))),
            Err(e) => return Err(e),
        };
        let comm = self.comm;
        let waited = poll(self.timeout, || {
            // NCCL's error first: a failed communicator's kernels may never finish.
            let settled = comm_ready(comm)?;
            Ok(settled && event.try_is_complete().map_err(Stop::Driver)?)
        });
        match waited {
            Ok(()) => Ok(()),
            Err(stop) => Err(self.fail(op, stop)),
        }
    }

    /// Aborts the communicator (`ncclCommAbort`, which also ends its kernels still running on
    /// the GPU) and poisons it with `why`: every later call returns [`Error::EpAborted`]. For a
    /// rank that cannot go on and must not leave its peers waiting until their timeouts in a
    /// group it will not take part in again. Does nothing to a communicator already aborted.
    pub fn abort(&mut self, why: impl Into<String>) {
        self.abort_comm();
        self.poisoned.get_or_insert_with(|| why.into());
    }

    /// [`Error::EpAborted`] once poisoned.
    fn usable(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(Error::EpAborted(why.clone())),
            None => Ok(()),
        }
    }

    /// Polls the communicator until its nonblocking operation is done (bounded).
    fn settle(&mut self, op: &'static str) -> Result<()> {
        let comm = self.comm;
        match poll(self.timeout, || comm_ready(comm)) {
            Ok(()) => Ok(()),
            Err(stop) => Err(self.fail(op, stop)),
        }
    }

    /// Aborts the communicator, poisons it with a description of `stop` (the first failure
    /// stays), and returns the error for `stop`.
    fn fail(&mut self, op: &'static str, stop: Stop) -> Error {
        let (rank, world) = (self.rank, self.world);
        // NCCL's message is read before the abort, while the library is certainly in use.
        let (error, why) = match stop {
            Stop::TimedOut(waited) => (
                Error::EpTimeout { op, waited },
                format!(
                    "rank {rank} of {world}: {op} gave up after {waited:?} (a rank never took \
                     part, or the ranks disagreed on a message's size)"
                ),
            ),
            Stop::Nccl(code) => {
                let error = collective(op, code);
                let why = format!("rank {rank} of {world}: {error}");
                (error, why)
            }
            Stop::Driver(e) => {
                let error = Error::Driver(e);
                let why = format!("rank {rank} of {world}: {op}: {error}");
                (error, why)
            }
        };
        self.abort_comm();
        self.poisoned.get_or_insert(why);
        error
    }

    /// `ncclCommAbort` once; the handle is forgotten first, so nothing passes it to NCCL again.
    fn abort_comm(&mut self) {
        let comm = std::mem::replace(&mut self.comm, std::ptr::null_mut());
        if comm.is_null() {
            return;
        }
        // NCCL frees the communicator on its own device; this is only for the runtime's view of
        // the thread, which NCCL consults. A failure leaves nothing better to do than abort.
        let _ = self.dev.bind_to_thread();
        // SAFETY: `comm` is live (a non-null handle is never aborted or destroyed) and is passed
        // to NCCL for the last time. ncclCommAbort is blocking even on a nonblocking
        // communicator, and it is the call NCCL documents for one whose operations may never
        // finish; its result is ignored, since the handle is gone either way.
        let _ = unsafe { result::comm_abort(comm) };
    }
}

impl Drop for EpComm {
    /// A healthy communicator is finalised (bounded by the timeout) and destroyed; one that was
    /// poisoned, or whose finalisation fails or does not finish, is aborted. Never panics.
    fn drop(&mut self) {
        if self.comm.is_null() {
            return;
        }
        if self.poisoned.is_some() {
            self.abort_comm();
            return;
        }
        let _ = self.dev.bind_to_thread();
        let comm = self.comm;
        // SAFETY: `comm` is live and healthy, and finalised only here, once.
        let finalized = started(unsafe { result::comm_finalize(comm) })
            .and_then(|()| poll(self.timeout, || comm_ready(comm)));
        if finalized.is_err() {
            self.abort_comm();
            return;
        }
        self.comm = std::ptr::null_mut();
        // SAFETY: `comm` is finalised (its operations are done and no other call is in
        // progress, as ncclCommDestroy requires) and destroyed once: the handle was forgotten
        // above. Destroy is blocking even on a nonblocking communicator.
        let _ = unsafe { result::comm_destroy(comm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_follow_nccls_macro() {
        // NCCL_VERSION changed its encoding after 2.8.
        assert_eq!(nccl_version_code(2, 8, 4), 2804);
        assert_eq!(nccl_version_code(2, 9, 6), 20906);
        assert_eq!(nccl_version_code(2, 30, 7), 23007);
        assert_eq!(MIN_NCCL_VERSION, 21400);
        // Every pre-2.9 code is below every later one, so one comparison orders them.
        assert!((nccl_version_code(2, 8, 99) as i32) < MIN_NCCL_VERSION);
    }

    #[test]
    fn the_config_is_nccls_initializer_with_blocking_off() {
        let init = config_initializer();
        assert_eq!(init.size, std::mem::size_of::<sys::ncclConfig_t>());
        // The layout CONFIG_VERSION declares: NCCL 2.30.0 to 2.30.4's, ending at maxP2pPeers.
        // If cudarc's bindings change it, CONFIG_VERSION and config_initializer must follow.
        #[cfg(target_pointer_width = "64")]
        assert_eq!(init.size, 96);
        assert_eq!(init.magic, 0xcafe_beef);
        assert_eq!(init.version, 23000);
        let undefined = [
            init.blocking,
            init.cgaClusterSize,
            init.minCTAs,
            init.maxCTAs,
            init.splitShare,
            init.trafficClass,
            init.collnetEnable,
            init.CTAPolicy,
            init.shrinkShare,
            init.nvlsCTAs,
            init.nChannelsPerNetPeer,
            init.nvlinkCentricSched,
            init.graphUsageMode,
            init.numRmaCtx,
            init.maxP2pPeers,
        ];
        assert!(undefined.iter().all(|&v| v == i32::MIN), "{undefined:?}");
        assert!(init.netName.is_null() && init.commName.is_null());

        let config = nonblocking_config();
        assert_eq!(config.blocking, 0);
        assert_eq!(
            config,
            sys::ncclConfig_t {
                blocking: 0,
                ..init
            },
            "only blocking differs from the initializer"
        );
    }

    #[test]
    fn an_id_survives_its_bytes() {
        // Bytes above 127 included: c_char is signed on x86-64.
        let bytes: [u8; 128] = std::array::from_fn(|i| (i * 37 + 11) as u8);
        let id = NcclId::from_bytes(bytes);
        assert_eq!(id.to_bytes(), bytes);
        assert_eq!(NcclId::from_bytes(id.to_bytes()), id);
        assert_ne!(NcclId::from_bytes([0; 128]), id);
        assert_eq!(format!("{id:?}"), "NcclId { .. }");
    }

    /// What cudarc's loader would find (in this crate's default mode, its own probe).
    #[cfg(feature = "dynamic-loading")]
    fn cudarc_finds_nccl() -> bool {
        // SAFETY: as in nccl_loadable.
        unsafe { sys::is_culib_present() }
    }

    #[cfg(not(feature = "dynamic-loading"))]
    fn cudarc_finds_nccl() -> bool {
        nccl_loadable()
    }

    /// On a machine without libnccl (CI, this crate's build machines) every entry point that
    /// would reach cudarc's loader returns NcclUnavailable instead of panicking; with libnccl,
    /// they work.
    #[test]
    fn a_missing_libnccl_is_an_error_that_says_how_to_fix_it() {
        match library_present() {
            Ok(()) => {
                assert!(cudarc_finds_nccl());
                assert!(nccl_version().expect("the version of a loadable NCCL") > 0);
            }
            Err(Error::NcclUnavailable(why)) => {
                assert!(!cudarc_finds_nccl());
                assert!(
                    why.contains("libnccl.so -> libnccl.so.2") && why.contains("LD_LIBRARY_PATH"),
                    "{why}"
                );
                assert!(matches!(nccl_version(), Err(Error::NcclUnavailable(_))));
                assert!(matches!(NcclId::new(), Err(Error::NcclUnavailable(_))));
            }
            Err(e) => panic!("library_present: {e}"),
        }
    }
}
