//! One virtqueue of a connection: what the frontend configured, and the worker thread that
//! serves the ring while it runs.
//!
//! The worker owns a [`virtq::DeviceQueue`] over the mapped guest memory and loops:
//!
//! ```text
//! disable_notifications          kicks are not needed while we drain
//! pop / process / complete       each completion: needs_notification() -> write the call fd
//! enable_notifications()         true: more arrived meanwhile, drain again
//! sleep on { kick fd, stop fd }  (the re-check above closes the lost-kick window)
//! ```
//!
//! Requests are processed synchronously, so when the worker stops (between two chains)
//! nothing is in flight, and the avail and used positions it hands back are equal.
//!
//! Guest memory can fault under the worker (the frontend shrank a region's file; see
//! `sigbus.rs`): the access reads zeroes, and the worker asks [`GuestMemoryMap::fault`]
//! after each chain, each empty pop and before it sleeps. On a fault it completes nothing
//! more (a request whose data may have read as zeroes is not reported done), signals the
//! error fd, wakes the connection loop, which ends the connection, and waits to be stopped.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use virtq::{DeviceConfig, DeviceError, DeviceQueue, Segment};
use vmm_sys_util::eventfd::EventFd;

use super::log::{self, ConnLog};
use super::memory::GuestMemoryMap;
use super::{QueueHandler, Stats};

/// Ring addresses from `SET_VRING_ADDR`, in the frontend's virtual address space.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

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

/// Sets `O_NONBLOCK` on a descriptor the frontend gave us, so that a descriptor that is not
/// an eventfd can never block a worker.
pub(crate) fn set_nonblocking(f: &File) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL touch no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where a ring resumes, as the frontend encodes it in `SET_VRING_BASE` / `GET_VRING_BASE`.
///
/// Split: the next available index. Packed: the next available position with its wrap
/// counter in bit 15, and (QEMU, `virtio_queue_packed_get_last_avail_idx`) the used
/// position and wrap counter in bits 16..32.
pub(crate) fn decode_base(base: u32, packed: bool) -> (u16, u16) {
    let avail = base as u16;
    if !packed {
        return (avail, 0);
    }
    let used = (base >> 16) as u16;
    // A frontend that sends only the low half (nothing in flight): used = avail.
    (avail, if used == 0 { avail } else { used })
}

/// The inverse of [`decode_base`].
pub(crate) fn encode_base(avail: u16, used: u16, packed: bool) -> u32 {
    if packed {
        avail as u32 | (used as u32) << 16
    } else {
        avail as u32
    }
}

/// Per-vring state of a connection.
pub(crate) struct Vring {
    pub index: u16,
    /// `SET_VRING_NUM` (0: not set).
    pub size: u16,
    pub addrs: Option<RingAddrs>,
    /// `SET_VRING_BASE` as received, updated when a worker stops.
    pub base: u32,
    /// `SET_VRING_KICK` received: the ring is started (`None` inside: no fd, polling).
    pub kick: Option<Option<Arc<File>>>,
    pub call: Arc<SharedFd>,
    pub err: Arc<SharedFd>,
    pub enabled: bool,
    pub worker: Option<Worker>,
}

impl Vring {
    pub fn new(index: u16) -> Self {
        Self {
            index,
            size: 0,
            addrs: None,
            base: 0,
            kick: None,
            call: Arc::default(),
            err: Arc::default(),
            enabled: false,
            worker: None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.worker.is_some()
    }

    /// Stops the worker if one runs and records where the ring stopped.
    pub fn stop(&mut self, packed: bool) {
        if let Some(w) = self.worker.take() {
            match w.stop() {
                Ok(exit) => {
                    self.base = encode_base(exit.avail_base, exit.used_base, packed);
                    log_debug!(
                        "queue {}: stopped after {} requests (base {:#x}{})",
                        self.index,
                        exit.chains,
                        self.base,
                        exit.fault.map(|f| format!(", broken: {f}")).unwrap_or_default()
                    );
                }
                Err(()) => log_error!("queue {}: the worker thread panicked", self.index),
            }
        }
    }
}

/// Asks a worker to stop: a flag checked between chains, and an eventfd that wakes it.
struct StopSignal {
    flag: AtomicBool,
    fd: EventFd,
}

/// What a worker leaves behind.
pub(crate) struct WorkerExit {
    pub avail_base: u16,
    pub used_base: u16,
    pub fault: Option<DeviceError>,
    pub chains: u64,
}

/// A running worker thread.
pub(crate) struct Worker {
    stop: Arc<StopSignal>,
    thread: JoinHandle<WorkerExit>,
}

/// What a worker shares with its connection.
pub(crate) struct WorkerLinks {
    pub call: Arc<SharedFd>,
    pub err: Arc<SharedFd>,
    pub stats: Arc<Stats>,
    pub log: Arc<ConnLog>,
    /// Written when guest memory faults, to wake the connection loop.
    pub fault_event: Arc<EventFd>,
}

impl Worker {
    /// Starts serving the ring `config` (guest physical addresses) on a new thread.
    pub fn spawn(
        index: u16,
        mem: Arc<GuestMemoryMap>,
        config: DeviceConfig,
        kick: Option<Arc<File>>,
        handler: Box<dyn QueueHandler>,
        links: WorkerLinks,
    ) -> io::Result<Self> {
        let stop = Arc::new(StopSignal { flag: AtomicBool::new(false), fd: EventFd::new(libc::EFD_NONBLOCK)? });
        let ctx = WorkerCtx { index, kick, stop: stop.clone(), handler, links, memory_fault: false };
        let thread = std::thread::Builder::new().name(format!("vq{index}")).spawn(move || {
            let _log = log::enter(ctx.links.log.clone());
            ctx.run(&mem, config)
        })?;
        Ok(Self { stop, thread })
    }

    /// Stops the worker (after the chain it is processing) and waits for it.
    pub fn stop(self) -> Result<WorkerExit, ()> {
        self.stop.flag.store(true, Ordering::Release);
        let _ = self.stop.fd.write(1);
        self.thread.join().map_err(|_| ())
    }
}

struct WorkerCtx {
    index: u16,
    kick: Option<Arc<File>>,
    stop: Arc<StopSignal>,
    handler: Box<dyn QueueHandler>,
    links: WorkerLinks,
    /// Guest memory faulted: the ring is touched no more.
    memory_fault: bool,
}

enum Wake {
    Kick,
    Stop,
}

impl WorkerCtx {
    fn stopping(&self) -> bool {
        self.stop.flag.load(Ordering::Acquire)
    }

    fn run(mut self, mem: &GuestMemoryMap, config: DeviceConfig) -> WorkerExit {
        let mut exit =
            WorkerExit { avail_base: config.avail_base, used_base: config.used_base, fault: None, chains: 0 };
        let mut q = match DeviceQueue::new(mem, config) {
            Ok(q) => q,
            Err(e) => {
                // Checked by the control thread before the spawn; kept for robustness.
                log_error!("queue {}: cannot attach to the ring: {e}", self.index);
                self.links.err.signal();
                exit.fault = Some(e);
                self.wait_for_stop();
                return exit;
            }
        };
        let mut segs: Vec<Segment<'_>> = Vec::with_capacity(64);
        'serve: loop {
            q.disable_notifications();
            loop {
                if self.stopping() {
                    break 'serve;
                }
                if self.memory_faulted(mem) {
                    break 'serve;
                }
                match q.pop(&mut segs) {
                    Ok(Some(chain)) => {
                        let written = self.handler.process(&chain, &segs);
                        // The chain's data may have read as zeroes: do not report it done.
                        if self.memory_faulted(mem) {
                            break 'serve;
                        }
                        q.complete(chain, written);
                        exit.chains += 1;
                        if q.needs_notification() && self.links.call.signal() {
                            self.links.stats.interrupts.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(None) => break,
                    // A ring that read as zeroes is not the driver's doing.
                    Err(_) if self.memory_faulted(mem) => break 'serve,
                    Err(e) => {
                        // The core latched the queue broken; nothing more is read from the
                        // ring. Tell the frontend (SET_VRING_ERR) and wait to be stopped.
                        log_error!("queue {}: the driver broke the ring: {e}; queue stopped", self.index);
                        self.links.stats.queue_faults.fetch_add(1, Ordering::Relaxed);
                        if q.needs_notification() {
                            self.links.call.signal();
                        }
                        self.links.err.signal();
                        self.wait_for_stop();
                        break 'serve;
                    }
                }
            }
            if q.enable_notifications() {
                continue;
            }
            if self.memory_faulted(mem) {
                break;
            }
            match self.sleep() {
                Wake::Kick => {}
                Wake::Stop => break,
            }
        }
        self.links.stats.requests.fetch_add(exit.chains, Ordering::Relaxed);
        if !self.memory_fault && q.needs_notification() {
            self.links.call.signal();
        }
        exit.avail_base = q.avail_base();
        // A split ring's used index lives in the ring; the frontend reads it there.
        exit.used_base = if q.layout().is_packed() { q.used_base() } else { 0 };
        exit.fault = q.fault();
        exit
    }

    /// Whether guest memory faulted; if it did, reports it (once: the worker then waits to
    /// be stopped, touching the ring no more).
    fn memory_faulted(&mut self, mem: &GuestMemoryMap) -> bool {
        let Some(fault) = mem.fault() else { return false };
        self.memory_fault = true;
        log_error!("queue {}: {fault}; queue stopped", self.index);
        self.links.err.signal();
        let _ = self.links.fault_event.write(1);
        self.wait_for_stop();
        true
    }

    fn wait_for_stop(&self) {
        while !self.stopping() {
            let _ = poll_in(&[self.stop.fd.as_raw_fd()], -1);
        }
    }

    /// Sleeps until a kick or a stop request. Without a kick fd (the frontend asked for
    /// polling), wakes every millisecond.
    fn sleep(&mut self) -> Wake {
        let stop_fd = self.stop.fd.as_raw_fd();
        loop {
            if self.stopping() {
                return Wake::Stop;
            }
            let Some(kick) = self.kick.clone() else {
                let _ = poll_in(&[stop_fd], 1);
                return if self.stopping() { Wake::Stop } else { Wake::Kick };
            };
            match poll_in(&[kick.as_raw_fd(), stop_fd], -1) {
                Ok(ready) if ready[1] => return Wake::Stop,
                Ok(ready) if ready[0] => {
                    self.links.stats.kicks.fetch_add(1, Ordering::Relaxed);
                    let mut count = [0u8; 8];
                    match (&*kick).read(&mut count) {
                        Ok(8) => return Wake::Kick,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Wake::Kick,
                        Ok(n) => {
                            log_error!(
                                "queue {}: the kick fd is not an eventfd (read {n} bytes); polling instead",
                                self.index
                            );
                            self.kick = None;
                        }
                        Err(e) => {
                            log_error!("queue {}: reading the kick fd: {e}; polling instead", self.index);
                            self.kick = None;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    log_error!("queue {}: poll: {e}; polling instead", self.index);
                    self.kick = None;
                }
            }
        }
    }
}

/// Waits until one of `fds` is readable (or hung up); returns which ones. Retries `EINTR`.
pub(crate) fn poll_in<const N: usize>(fds: &[RawFd; N], timeout_ms: i32) -> io::Result<[bool; N]> {
    let mut p = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    loop {
        // SAFETY: `p` is a local array of N initialised pollfds.
        let n = unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(p.map(|x| x.revents != 0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases_round_trip() {
        assert_eq!(decode_base(7, false), (7, 0));
        assert_eq!(encode_base(7, 0, false), 7);
        // QEMU's fresh packed ring: both wrap counters set.
        assert_eq!(decode_base(0x8000_8000, true), (0x8000, 0x8000));
        // A frontend that sends the avail half only.
        assert_eq!(decode_base(0x8000, true), (0x8000, 0x8000));
        assert_eq!(decode_base(0x0005_8003, true), (0x8003, 0x0005));
        assert_eq!(encode_base(0x8003, 0x0005, true), 0x0005_8003);
    }
}
