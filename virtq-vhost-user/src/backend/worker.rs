//! The worker threads: each serves one group of rings (see [`super::Device::queue_groups`])
//! with a device's [`Worker`], and owns everything around the device's loop: the
//! [`DeviceQueue`] of each ring, the kick and call eventfds, suppressing notifications
//! while busy, the ring's error fd, guest-memory faults and stopping.
//!
//! A device's loop has this shape; [`Rings::busy`] and [`Rings::idle`] are the only
//! places it waits or learns that it must stop:
//!
//! ```text
//! loop {
//!     serve what can be served          Ring::pop / complete / serve, on rings.get_mut(q)
//!     wake = if something was done { rings.busy() }          flush interrupts; no syscall
//!            else { rings.idle(&Idle { kicks, fds }) }       enable notifications on the
//!                                                            rings in `kicks`, re-check,
//!                                                            sleep on their kick fds, the
//!                                                            device's fds and the stop fd
//!     if wake == Wake::Stop { return }
//! }
//! ```
//!
//! Kicks are off (`disable_notifications`) while the worker runs and turned on only by
//! [`Rings::idle`], for the rings the device says it waits on; they are turned off again
//! when it wakes. [`Rings::idle`] re-checks each ring after turning its kicks on, so no
//! kick is lost between the last pop and the sleep.
//!
//! A ring the driver breaks is latched broken by the core: the [`Ring`] logs it once,
//! counts it in [`super::Stats::queue_faults`], signals the ring's error fd and from then
//! on looks empty to the device; the worker goes on serving the group's other rings.
//! Guest memory that faults (see `sigbus.rs`) stops every ring of the connection: no
//! completion is made after the fault is seen, each ring's error fd is signalled and the
//! connection loop is woken to close the connection.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtq::{Chain, DeviceConfig, DeviceError, DeviceQueue, GuestMemory, LayoutKind, Segment, SegmentSink, Segments};
use vmm_sys_util::eventfd::EventFd;

use super::log::{self, ConnLog};
use super::memory::GuestMemoryMap;
use super::{QueueHandler, Stats};

/// An eventfd-like descriptor shared between the control thread (which may replace it at
/// any time, e.g. QEMU switching the call fd when the guest masks a vector) and a worker.
#[derive(Default)]
pub(crate) struct SharedFd(Mutex<Option<File>>);

impl SharedFd {
    fn lock(&self) -> MutexGuard<'_, Option<File>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set(&self, f: Option<File>) {
        *self.lock() = f;
    }

    /// Adds 1 to the eventfd's counter. Errors are ignored: a full counter (`EAGAIN`)
    /// already means "signalled", and a broken descriptor is the frontend's problem.
    pub fn signal(&self) -> bool {
        match &*self.lock() {
            Some(f) => {
                let _ = (&*f).write(&1u64.to_ne_bytes());
                true
            }
            None => false,
        }
    }
}

/// What the device's loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Serve again.
    Work,
    /// The ring group is being stopped (or guest memory faulted): return from
    /// [`Worker::run`].
    Stop,
}

/// What a device waits for when it has nothing to do (see [`Rings::idle`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Idle<'a> {
    /// Rings (by queue index) whose kicks wake the worker: those the device found empty
    /// and wants chains from. A ring of the group that is not running, or is broken, is
    /// ignored.
    pub kicks: &'a [u16],
    /// Other descriptors to wait on, each with its `poll` events (`libc::POLLIN`, ...): a
    /// TAP device, a socket.
    pub fds: &'a [(RawFd, i16)],
}

/// The device's side of a worker thread: it serves the rings of one group (see
/// [`super::Device::queue_groups`]) from when they start until the framework stops them.
///
/// [`Self::run`] is called once per start, on the worker thread, and returns when
/// [`Rings::busy`] or [`Rings::idle`] says [`Wake::Stop`]. Whatever it keeps between two
/// passes of its loop (chains it holds, their segments) lives in its locals, which may
/// borrow guest memory for as long as the run lasts.
pub trait Worker: Send {
    /// Serves `rings` until told to stop.
    fn run(&mut self, rings: &mut Rings<'_>);
}

/// The [`Worker`] of queues that are answered a chain at a time, each by its
/// [`QueueHandler`]: the default of [`super::Device::worker`] (blk, rng, a network
/// device's control queue).
///
/// Per ring and pass it pops, processes and completes up to [`CHAIN_BATCH`] chains,
/// signalling the driver after each completion it wants an interrupt for, and asks guest
/// memory after each chain whether it faulted (a chain whose data may have read as
/// zeroes is not reported done).
pub struct ChainWorker {
    handlers: Vec<(u16, Box<dyn QueueHandler>)>,
}

/// Chains a [`ChainWorker`] serves on one ring before it turns to the next ring of its
/// group.
pub const CHAIN_BATCH: usize = 64;

impl ChainWorker {
    /// Serves each queue with its handler; a queue not in the list is not served.
    pub fn new(handlers: Vec<(u16, Box<dyn QueueHandler>)>) -> Self {
        Self { handlers }
    }
}

impl Worker for ChainWorker {
    fn run(&mut self, rings: &mut Rings<'_>) {
        let kicks: Vec<u16> = self.handlers.iter().map(|(q, _)| *q).collect();
        let mut segs: Vec<Segment<'_>> = Vec::with_capacity(64);
        loop {
            let mut served = false;
            for (index, handler) in &mut self.handlers {
                let Some(ring) = rings.get_mut(*index) else { continue };
                for _ in 0..CHAIN_BATCH {
                    // A `Vec` sink is never full.
                    let Ok(Some(chain)) = ring.pop(&mut segs) else { break };
                    let written = handler.process(&chain, &segs);
                    if ring.memory_faulted() {
                        // Not completed; `busy` reports the fault and stops.
                        break;
                    }
                    ring.complete(chain, written);
                    ring.notify();
                    served = true;
                }
            }
            let wake = if served { rings.busy() } else { rings.idle(&Idle { kicks: &kicks, fds: &[] }) };
            if wake == Wake::Stop {
                return;
            }
        }
    }
}

/// Copies `buf.len()` bytes starting `offset` bytes into the byte stream that `segs`
/// form, into `buf`. Returns the count copied (short at the stream's end).
pub fn read_stream(segs: &[Segment<'_>], mut offset: usize, buf: &mut [u8]) -> usize {
    let mut done = 0;
    for s in segs {
        let len = s.len() as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        done += s.read_at(offset, &mut buf[done..]);
        offset = 0;
        if done == buf.len() {
            break;
        }
    }
    done
}

/// Copies `data` into the byte stream that `segs` form, at `offset`; returns the count
/// copied (short at the stream's end).
pub fn write_stream(segs: &[Segment<'_>], mut offset: usize, data: &[u8]) -> usize {
    let mut done = 0;
    for s in segs {
        let len = s.len() as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        done += s.write_at(offset, &data[done..]);
        offset = 0;
        if done == data.len() {
            break;
        }
    }
    done
}

/// A device's segment sink was too small for a chain: the chain stays available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkFull;

/// Asks the CPU for the cache line at `p` in a state that allows writing (PREFETCHW, where
/// the CPU has it: a line the driver last wrote then moves once, not once shared and again
/// exclusive at the store; elsewhere a plain prefetch). A hint: it reads and writes
/// nothing and cannot fault, whatever the address.
#[inline(always)]
pub(crate) fn prefetch_for_write(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_prefetchw() {
            // SAFETY: PREFETCHW is a hint: it returns nothing, writes no memory and does
            // not fault whatever the address; the CPU was checked to implement it.
            unsafe { core::arch::asm!("prefetchw [{}]", in(reg) p, options(nostack, preserves_flags, readonly)) };
        } else {
            // SAFETY: PREFETCHT0 is a hint with no architectural effect, part of SSE,
            // which every x86-64 CPU has.
            unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Whether the CPU has PREFETCHW (CPUID 0x8000_0001, ECX bit 8), asked once. `std`'s
/// feature detection does not know this bit.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn has_prefetchw() -> bool {
    use std::sync::atomic::AtomicU8;
    static CACHED: AtomicU8 = AtomicU8::new(0);
    match CACHED.load(Ordering::Relaxed) {
        0 => {
            let max_extended = core::arch::x86_64::__cpuid(0x8000_0000).eax;
            let present = max_extended >= 0x8000_0001 && core::arch::x86_64::__cpuid(0x8000_0001).ecx & (1 << 8) != 0;
            CACHED.store(if present { 2 } else { 1 }, Ordering::Relaxed);
            present
        }
        state => state == 2,
    }
}

/// One running ring of a worker: a [`DeviceQueue`] over the connection's guest memory,
/// with the ring's call and error fds. Driver faults are handled here (logged, counted,
/// the error fd signalled); a broken ring looks empty from then on ([`Self::is_broken`]
/// says which).
pub struct Ring<'m> {
    index: u16,
    queue: DeviceQueue<'m, GuestMemoryMap>,
    call: Arc<SharedFd>,
    err: Arc<SharedFd>,
    kick: Option<Arc<File>>,
    stats: Arc<Stats>,
    chains: u64,
    /// Where the frontend resumes popping if this run stops with chains still held (see
    /// [`Self::hold_from`]).
    resume_at: Option<u16>,
    /// The host address of the area where used entries go (packed: the descriptor ring;
    /// split: the used ring), for [`Self::prefetch_used`].
    used_area: Option<NonNull<u8>>,
}

impl<'m> Ring<'m> {
    /// The queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The ring layout the frontend negotiated.
    pub fn layout(&self) -> LayoutKind {
        self.queue.layout()
    }

    /// Number of ring entries.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// The guest memory the ring's buffers live in.
    pub fn memory(&self) -> &'m GuestMemoryMap {
        self.queue.memory()
    }

    /// Whether the driver broke the ring (it is served no more).
    pub fn is_broken(&self) -> bool {
        self.queue.is_broken()
    }

    /// Whether guest memory faulted under this connection (see [`super::MemoryFault`]):
    /// the device must complete nothing more; the next [`Rings::busy`] or [`Rings::idle`]
    /// stops the worker.
    pub fn memory_faulted(&self) -> bool {
        self.queue.memory().fault().is_some()
    }

    /// Pops the next available chain into `segs` (readable segments first). `Ok(None)`
    /// when the ring is empty or broken. `Err(SinkFull)` if the chain has more segments
    /// than `segs` holds; it stays available.
    #[doc(alias = "vringh_getdesc_kern")]
    #[inline]
    pub fn pop<S: SegmentSink<'m>>(&mut self, segs: &mut S) -> Result<Option<Chain>, SinkFull> {
        match self.queue.pop(segs) {
            Ok(chain) => Ok(chain),
            Err(e) => self.failed(e).map(|()| None),
        }
    }

    /// Completes a chain with the number of bytes written into its writable part.
    #[doc(alias = "vringh_complete_kern")]
    #[inline]
    pub fn complete(&mut self, chain: Chain, written: u32) {
        self.queue.complete(chain, written);
        self.chains += 1;
    }

    /// Serves up to `max` chains with `f`, completing each with the byte count it returns,
    /// and publishes them in one step ([`virtq::Device::serve`]). Returns how many were
    /// served; `Err(SinkFull)` only if the first chain has more than `N` segments.
    #[inline]
    pub fn serve<const N: usize, F>(&mut self, max: usize, segs: &mut Segments<'m, N>, f: F) -> Result<usize, SinkFull>
    where
        F: FnMut(&Chain, &[Segment<'m>]) -> u32,
    {
        let r = match self.queue.serve(max, segs, f) {
            Ok(n) => Ok(n),
            Err(e) => self.failed(e).map(|()| 0),
        };
        if let Ok(n) = r {
            self.chains += n as u64;
            if n > 0 {
                // A fault after the first chain ends the burst early.
                if let Some(e) = self.queue.fault() {
                    self.report_fault(e);
                }
            }
        }
        r
    }

    /// Makes completions visible and signals the driver if it wants an interrupt for them.
    #[doc(alias = "vringh_notify")]
    #[inline]
    pub fn notify(&mut self) {
        if self.queue.needs_notification() && self.call.signal() {
            self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The position to give back to the frontend if the ring stops while the device still
    /// holds chains it popped but has not completed (a network device's receive buffers
    /// waiting for packets): call it with [`Self::avail_base`] as it was before the first
    /// such chain was popped, and with `None` once they are all completed. The next
    /// start (or the next back end) pops those chains again.
    ///
    /// Only chains popped after every earlier one was completed may be held this way.
    pub fn hold_from(&mut self, avail_base: Option<u16>) {
        self.resume_at = avail_base;
    }

    /// Asks the CPU for the lines where the next `n` completions go, for writing: a burst
    /// that completes its chains together then waits for those lines (which the driver
    /// last wrote) once, together, rather than once per line along the way. A hint.
    #[inline]
    pub fn prefetch_used(&self, n: usize) {
        let Some(area) = self.used_area else { return };
        let size = self.queue.size() as usize;
        let (first, entry, offset) = if self.queue.layout().is_packed() {
            ((self.queue.used_base() & 0x7fff) as usize, 16, 0)
        } else {
            (self.queue.used_base() as usize, 8, 4)
        };
        let per_line = 64 / entry;
        let mut i = 0;
        while i < n.min(size) {
            let at = offset + entry * ((first + i) % size);
            prefetch_for_write(area.as_ptr().wrapping_add(at));
            i += per_line;
        }
    }

    /// Where popping resumes (see [`virtq::Device::avail_base`]).
    pub fn avail_base(&self) -> u16 {
        self.queue.avail_base()
    }

    /// Handles a pop or serve error: `SinkFull` goes back to the device; a driver fault
    /// latched the queue broken.
    fn failed(&mut self, e: DeviceError) -> Result<(), SinkFull> {
        match e {
            DeviceError::SinkFull => Err(SinkFull),
            // Already reported.
            DeviceError::Broken => Ok(()),
            // A ring that read as zeroes is not the driver's doing: the fault stops the
            // worker at its next `busy` or `idle`.
            _ if self.memory_faulted() => Ok(()),
            e => {
                self.report_fault(e);
                Ok(())
            }
        }
    }

    fn report_fault(&mut self, e: DeviceError) {
        log_error!("queue {}: the driver broke the ring: {e}; queue stopped", self.index);
        self.stats.queue_faults.fetch_add(1, Ordering::Relaxed);
        self.notify();
        self.err.signal();
    }
}

/// The rings of one worker: those of its group that the frontend has started. Handed to
/// [`Worker::run`].
pub struct Rings<'m> {
    rings: Vec<Ring<'m>>,
    memory: &'m GuestMemoryMap,
    stop: Arc<StopSignal>,
    links: WorkerLinks,
    /// When the current idle stretch began (busy-polling only).
    idle_since: Option<Instant>,
    poll: Duration,
    /// Guest memory faulted: the rings are touched no more.
    memory_fault: bool,
    pollfds: Vec<libc::pollfd>,
}

impl<'m> Rings<'m> {
    /// Ring `index`, if it runs in this worker.
    pub fn get_mut(&mut self, index: u16) -> Option<&mut Ring<'m>> {
        self.rings.iter_mut().find(|r| r.index == index)
    }

    /// Rings `a` and `b` at once (each `None` if it does not run here).
    pub fn pair_mut(&mut self, a: u16, b: u16) -> (Option<&mut Ring<'m>>, Option<&mut Ring<'m>>) {
        assert_ne!(a, b, "pair_mut needs two different rings");
        let mut ra = None;
        let mut rb = None;
        for r in self.rings.iter_mut() {
            if r.index == a {
                ra = Some(r);
            } else if r.index == b {
                rb = Some(r);
            }
        }
        (ra, rb)
    }

    /// The running rings.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Ring<'m>> {
        self.rings.iter_mut()
    }

    /// The guest memory of the connection.
    pub fn memory(&self) -> &'m GuestMemoryMap {
        self.memory
    }

    /// Whether the framework asked this worker to stop.
    pub fn stopping(&self) -> bool {
        self.stop.flag.load(Ordering::Acquire)
    }

    /// After a pass that served something: signals the driver for completions it wants an
    /// interrupt for, and checks for a stop request and a guest-memory fault. Makes no
    /// system call unless an interrupt is due.
    #[inline]
    pub fn busy(&mut self) -> Wake {
        self.idle_since = None;
        self.flush()
    }

    /// Signals the driver for completions it wants an interrupt for; `Stop` if guest
    /// memory faulted or the worker is being stopped.
    #[inline]
    fn flush(&mut self) -> Wake {
        if self.check_memory() {
            return Wake::Stop;
        }
        for r in &mut self.rings {
            r.notify();
        }
        if self.stopping() {
            Wake::Stop
        } else {
            Wake::Work
        }
    }

    /// After a pass that served nothing: flushes interrupts, then (after the busy-polling
    /// window of [`super::ServerOptions::poll`], if any) turns kicks on for the rings in
    /// `idle.kicks` and sleeps until one of them is kicked, one of `idle.fds` is ready, or
    /// the worker is stopped. Returns at once if one of those rings already has a chain
    /// (its kick may never come).
    pub fn idle(&mut self, idle: &Idle<'_>) -> Wake {
        if self.flush() == Wake::Stop {
            return Wake::Stop;
        }
        if !self.poll.is_zero() {
            let now = Instant::now();
            let since = *self.idle_since.get_or_insert(now);
            if now.duration_since(since) < self.poll {
                std::hint::spin_loop();
                return Wake::Work;
            }
        }
        let waits = |r: &Ring<'_>| idle.kicks.contains(&r.index) && !r.is_broken();
        let mut available = false;
        for r in self.rings.iter_mut().filter(|r| waits(r)) {
            available |= r.queue.enable_notifications();
        }
        let wake = if available { Wake::Work } else { self.sleep(idle, waits) };
        for r in self.rings.iter_mut().filter(|r| waits(r)) {
            r.queue.disable_notifications();
        }
        wake
    }

    /// Sleeps on the stop fd, the kick fds of the rings `waits` selects and the device's
    /// fds. A ring without a kick fd (the frontend polls) wakes it every millisecond.
    fn sleep(&mut self, idle: &Idle<'_>, waits: impl Fn(&Ring<'_>) -> bool) -> Wake {
        if self.check_memory() {
            return Wake::Stop;
        }
        self.pollfds.clear();
        self.pollfds.push(pollfd(self.stop.fd.as_raw_fd(), libc::POLLIN));
        let mut timeout_ms = -1;
        for r in self.rings.iter().filter(|r| waits(r)) {
            match &r.kick {
                Some(k) => self.pollfds.push(pollfd(k.as_raw_fd(), libc::POLLIN)),
                None => timeout_ms = 1,
            }
        }
        let kick_fds = self.pollfds.len();
        for &(fd, events) in idle.fds {
            self.pollfds.push(pollfd(fd, events));
        }
        if let Err(e) = poll(&mut self.pollfds, timeout_ms) {
            log_error!("worker: poll: {e}");
            // Not a busy loop: a worker whose poll fails waits a millisecond a pass.
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.stopping() {
            return Wake::Stop;
        }
        // Consume the kicks that woke us, so that the next sleep waits for new ones.
        for p in &self.pollfds[1..kick_fds] {
            if p.revents & libc::POLLIN != 0 {
                self.links.stats.kicks.fetch_add(1, Ordering::Relaxed);
                let mut count = [0u8; 8];
                // SAFETY: read(2) of 8 bytes into a local buffer from a descriptor the
                // ring holds open (its `kick` file) for as long as `self` lives.
                let _ = unsafe { libc::read(p.fd, count.as_mut_ptr().cast(), count.len()) };
            }
        }
        Wake::Work
    }

    /// Whether guest memory faulted; the first time, reports it (each ring's error fd,
    /// the connection loop woken).
    fn check_memory(&mut self) -> bool {
        if self.memory_fault {
            return true;
        }
        let Some(fault) = self.memory.fault() else { return false };
        self.memory_fault = true;
        for r in &self.rings {
            log_error!("queue {}: {fault}; queue stopped", r.index);
            r.err.signal();
        }
        let _ = self.links.fault_event.write(1);
        true
    }

    fn wait_for_stop(&self) {
        while !self.stopping() {
            let _ = poll_in(&[self.stop.fd.as_raw_fd()], -1);
        }
    }
}

/// The host address of a ring's used entries (packed: the descriptor ring; split: the used
/// ring), as the queue translated it when it attached.
fn used_area(mem: &GuestMemoryMap, config: &DeviceConfig) -> Option<NonNull<u8>> {
    let size = config.size as u64;
    if config.features.contains(virtq::Features::RING_PACKED) {
        mem.translate(config.desc_addr, 16 * size)
    } else {
        mem.translate(config.used_addr, 4 + 8 * size)
    }
}

fn pollfd(fd: RawFd, events: i16) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

/// `poll(2)` on `fds`, retrying `EINTR`.
fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    loop {
        // SAFETY: `fds` is a valid, initialised slice of pollfds for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits until one of `fds` is readable (or hung up); returns which ones. Retries `EINTR`.
pub(crate) fn poll_in<const N: usize>(fds: &[RawFd; N], timeout_ms: i32) -> io::Result<[bool; N]> {
    let mut p = fds.map(|fd| pollfd(fd, libc::POLLIN));
    poll(&mut p, timeout_ms)?;
    Ok(p.map(|x| x.revents != 0))
}

/// Asks a worker to stop: a flag checked between passes, and an eventfd that wakes it.
struct StopSignal {
    flag: AtomicBool,
    fd: EventFd,
}

/// One ring a worker starts with: where it is, and its fds.
pub(crate) struct RingStart {
    pub index: u16,
    pub config: DeviceConfig,
    /// `None`: the frontend gave no kick fd (it wants the ring polled).
    pub kick: Option<Arc<File>>,
    pub call: Arc<SharedFd>,
    pub err: Arc<SharedFd>,
}

/// Where a ring stopped.
pub(crate) struct RingExit {
    pub index: u16,
    pub avail_base: u16,
    pub used_base: u16,
    pub fault: Option<DeviceError>,
    pub chains: u64,
}

/// A running worker thread.
pub(crate) struct WorkerThread {
    stop: Arc<StopSignal>,
    thread: JoinHandle<Vec<RingExit>>,
}

/// What a worker shares with its connection.
pub(crate) struct WorkerLinks {
    pub stats: Arc<Stats>,
    pub log: Arc<ConnLog>,
    /// Written when guest memory faults, to wake the connection loop.
    pub fault_event: Arc<EventFd>,
    /// Busy-polling window before a worker sleeps.
    pub poll: Duration,
}

impl WorkerThread {
    /// Starts serving `rings` (guest physical addresses) with `worker` on a new thread.
    pub fn spawn(
        name: String,
        mem: Arc<GuestMemoryMap>,
        rings: Vec<RingStart>,
        mut worker: Box<dyn Worker>,
        links: WorkerLinks,
    ) -> io::Result<Self> {
        let stop = Arc::new(StopSignal { flag: AtomicBool::new(false), fd: EventFd::new(libc::EFD_NONBLOCK)? });
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let _log = log::enter(links.log.clone());
            run(&mem, rings, &mut *worker, stop2, links)
        })?;
        Ok(Self { stop, thread })
    }

    /// Stops the worker (after its current pass) and waits for it.
    pub fn stop(self) -> Result<Vec<RingExit>, ()> {
        self.stop.flag.store(true, Ordering::Release);
        let _ = self.stop.fd.write(1);
        self.thread.join().map_err(|_| ())
    }
}

/// The worker thread's body: attaches the rings, runs the device, and records where each
/// ring stopped.
fn run(
    mem: &GuestMemoryMap,
    starts: Vec<RingStart>,
    worker: &mut dyn Worker,
    stop: Arc<StopSignal>,
    links: WorkerLinks,
) -> Vec<RingExit> {
    let mut exits = Vec::with_capacity(starts.len());
    let mut rings = Vec::with_capacity(starts.len());
    for s in starts {
        match DeviceQueue::new(mem, s.config) {
            Ok(mut queue) => {
                queue.disable_notifications();
                rings.push(Ring {
                    index: s.index,
                    queue,
                    call: s.call,
                    err: s.err,
                    kick: s.kick,
                    stats: links.stats.clone(),
                    chains: 0,
                    resume_at: None,
                    used_area: used_area(mem, &s.config),
                });
            }
            Err(e) => {
                // Checked by the control thread before the spawn; kept for robustness.
                log_error!("queue {}: cannot attach to the ring: {e}", s.index);
                s.err.signal();
                exits.push(RingExit {
                    index: s.index,
                    avail_base: s.config.avail_base,
                    used_base: s.config.used_base,
                    fault: Some(e),
                    chains: 0,
                });
            }
        }
    }
    let poll = links.poll;
    let mut rings = Rings {
        rings,
        memory: mem,
        stop,
        links,
        idle_since: None,
        poll,
        memory_fault: false,
        pollfds: Vec::with_capacity(8),
    };
    if !rings.rings.is_empty() {
        worker.run(&mut rings);
    }
    if !rings.stopping() {
        // A memory fault, a device that returned early, or no ring to serve.
        rings.wait_for_stop();
    }
    let memory_fault = rings.memory_fault || mem.fault().is_some();
    let mut chains = 0;
    for mut r in rings.rings.drain(..) {
        if !memory_fault {
            r.notify();
        }
        chains += r.chains;
        let packed = r.queue.layout().is_packed();
        let avail_base = r.resume_at.unwrap_or_else(|| r.queue.avail_base());
        exits.push(RingExit {
            index: r.index,
            avail_base,
            // A split ring's used index lives in the ring; the frontend reads it there.
            // Held chains were popped after every earlier one completed, so the used
            // position is where they start.
            used_base: if !packed {
                0
            } else if r.resume_at.is_some() {
                avail_base
            } else {
                r.queue.used_base()
            },
            fault: r.queue.fault(),
            chains: r.chains,
        });
    }
    rings.links.stats.requests.fetch_add(chains, Ordering::Relaxed);
    exits
}
