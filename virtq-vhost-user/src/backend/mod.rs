//! The device's end of vhost-user: a framework that serves virtio devices to frontends
//! such as QEMU, so that a guest's own virtio drivers (Linux's `virtio_ring.c` and
//! `virtio_blk`, `virtio_net`, `virtio-rng`) drive rings that this process serves with
//! [`virtq::DeviceQueue`].
//!
//! A device author writes the device: a [`Device`] (features, config space, queues) and
//! what it does with the chains of its queues, either one chain at a time
//! ([`QueueHandler`]) or as a loop over a group of rings ([`Worker`], for queues that work
//! together). The framework owns the rest: the protocol and its life cycle, the memory
//! table, one [`virtq::DeviceQueue`] per ring in whichever layout the frontend negotiates
//! (split, packed, each with or without `IN_ORDER`, with `EVENT_IDX` and indirect
//! descriptors), the kick and call eventfds, the worker threads, notification
//! suppression while a worker is busy, reconnects, and the errors of hostile peers.
//!
//! ```text
//! Server::bind(path, device)          a unix socket (vhost's Listener)
//!   run(): accept ...                 each frontend on its own thread, up to
//!                                     ServerOptions::max_connections; a disconnect, garbage,
//!                                     a stall or a memory fault closes that connection only
//!     connection thread               vhost's BackendReqHandler decodes each request and
//!                                     calls conn::ConnState (features, memory table, vrings,
//!                                     config, GET_VRING_BASE, ...); a watchdog bounds each
//!                                     message once begun (ServerOptions::message_timeout)
//!     one worker thread per group     Device::queue_groups (by default one group a queue):
//!                                     the device's Worker loop over its Rings, sleeping on
//!                                     their kick eventfds (and the device's own fds),
//!                                     signalling their call eventfds; restarted whenever
//!                                     the group's set of running rings changes
//! ```
//!
//! A complete device, virtio-rng ([`crate::rng::device`], the code behind
//! `virtq serve-rng`), and a server for it:
//!
//! ```no_run
#![doc = include_str!("../rng/device.rs")]
//!
//! fn main() -> std::io::Result<()> {
//!     use virtq_vhost_user::backend::Server;
//!     let mut server = Server::bind("/tmp/rng.sock", Arc::new(RngDevice::new()?))?;
//!     server.run() // each frontend on its own thread, until shut down
//! }
//! ```
//!
//! - **Hostile frontends**: frontends are served concurrently, so one that connects and
//!   sends nothing, or half a message, holds up no other; and every wait on a message that
//!   has begun, or on the frontend taking its reply, is bounded, so it does not hold its
//!   slot for ever. Kick, call and error fds must be eventfds. Guest memory that the
//!   frontend shrinks under the back end's mappings cannot kill the process (`SIGBUS` is
//!   caught for guest mappings, see [`MemoryFault`]): that connection ends with an error.
//!   Each connection's log lines are rate-limited ([`LOG_BURST`] per [`LOG_INTERVAL`]),
//!   the rest counted in [`Stats::log_lines_suppressed`].
//!
//! - **Layouts**: the back end offers `RING_PACKED`, `IN_ORDER`, `EVENT_IDX`,
//!   `INDIRECT_DESC` and `VERSION_1` ([`RING_FEATURES`]) with every device and runs
//!   whatever the frontend acks. For packed rings the ring base in
//!   `SET_VRING_BASE`/`GET_VRING_BASE` is QEMU's encoding: the next available position
//!   with its wrap counter in bit 15, and the used position and wrap counter in bits
//!   16..32.
//! - **Addresses**: ring addresses in `SET_VRING_ADDR` are the frontend's virtual
//!   addresses; they are translated to guest physical addresses through the memory table's
//!   `userspace_addr`, and the queue translates those (and every buffer address) to the
//!   mapped regions with bounds checks ([`memory::GuestMemoryMap`], over
//!   [`virtq::GuestRegions`]).
//! - **Hostile guests**: every buffer is a [`virtq::Segment`], translated and bounds-checked
//!   by the core. A malformed ring latches the queue broken: the worker logs it, signals
//!   the vring's error fd and serves it no more (see [`Ring`]).
//! - **Devices** here: [`blk::BlkBackend`] (virtio-blk over a file),
//!   [`crate::rng::RngDevice`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use virtq_vhost_user::backend::{blk::{BlkBackend, BlkBackendOptions}, Server};
//!
//! let device = BlkBackend::open("/tmp/disk.raw", &BlkBackendOptions { queues: 4, ..Default::default() })?;
//! let mut server = Server::bind("/tmp/blk.sock", Arc::new(device))?;
//! server.run()?; // serves frontends, each on its own thread, until shut down
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Logging goes to standard error; `VIRTQ_LOG=debug` adds the protocol and ring events.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::{BackendReqHandler, Error as VuError, Listener};
use virtq::{Chain, Features, Segment};
use vmm_sys_util::eventfd::EventFd;

use crate::watchdog::WatchdogThread;

#[macro_use]
pub(crate) mod log;
pub mod blk;
mod conn;
pub mod memory;
mod sigbus;
mod vring;
mod worker;

pub use conn::RING_FEATURES;
pub use log::{BURST as LOG_BURST, INTERVAL as LOG_INTERVAL};
pub use memory::MemoryFault;
pub(crate) use worker::prefetch_for_write;
pub use worker::{read_stream, write_stream, ChainWorker, Idle, Ring, Rings, SinkFull, Wake, Worker, CHAIN_BATCH};

/// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30 of the virtio feature word in vhost-user).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Largest ring accepted in `SET_VRING_NUM` (the packed ring's limit, VIRTIO 1.3, 2.8).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes of config space served by `GET_CONFIG` (the vhost-user limit is 256); bytes past
/// the device's own config read as zero.
pub const CONFIG_SPACE_MAX: usize = 256;

/// A virtio device served over vhost-user: what a device author writes. The framework
/// does the rest (see the module documentation).
///
/// Most devices answer each chain on its own: they implement [`Self::queue_handler`] and
/// get one worker thread per queue, which pops, processes, completes and signals. A device
/// whose queues work together (a network device's receive and transmit queues) names
/// them in [`Self::queue_groups`] and implements [`Self::worker`], a loop over its rings.
pub trait Device: Send + Sync + 'static {
    /// The device-class feature bits offered (0..=23, and any others the device knows).
    /// The back end adds the ring bits ([`RING_FEATURES`]) and
    /// `VHOST_USER_F_PROTOCOL_FEATURES`.
    fn device_features(&self) -> u64;

    /// Number of virtqueues (answered to `GET_QUEUE_NUM`).
    fn num_queues(&self) -> u16;

    /// The device-specific config space, little-endian (VIRTIO 1.3, 4.1.4.3); none by
    /// default. `GET_CONFIG` reads it through [`Self::read_config`].
    fn config_space(&self) -> &[u8] {
        &[]
    }

    /// Fills `buf` with the config space from `offset` (at most [`CONFIG_SPACE_MAX`]
    /// bytes in all); bytes past its end read as zero.
    fn read_config(&self, offset: u32, buf: &mut [u8]) {
        buf.fill(0);
        let config = self.config_space();
        if let Some(src) = config.get(offset as usize..) {
            let n = src.len().min(buf.len());
            buf[..n].copy_from_slice(&src[..n]);
        }
    }

    /// A write of the driver into the config space (`SET_CONFIG`). Refused by default:
    /// most config fields are read-only.
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), ConfigWriteError> {
        let _ = (offset, data);
        Err(ConfigWriteError::ReadOnly)
    }

    /// A handler for queue `index`, run on each chain by that queue's worker thread.
    /// Called each time the ring starts, with the features the frontend acked.
    fn queue_handler(&self, index: u16, features: Features) -> Box<dyn QueueHandler>;

    /// The queues that one worker thread serves together; every queue in exactly one
    /// group. By default each queue alone.
    fn queue_groups(&self) -> Vec<Vec<u16>> {
        (0..self.num_queues()).map(|q| vec![q]).collect()
    }

    /// The worker of a group (`queues` as [`Self::queue_groups`] named it), started each
    /// time the set of its running rings changes, with the features the frontend acked.
    /// By default the group's [`Self::queue_handler`]s, each run on every chain of its
    /// queue.
    fn worker(&self, queues: &[u16], features: Features) -> Box<dyn Worker> {
        Box::new(ChainWorker::new(queues.iter().map(|&q| (q, self.queue_handler(q, features))).collect()))
    }
}

/// Why a config-space write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigWriteError {
    /// The device's config space (or this part of it) is read-only.
    #[error("the config space is read-only")]
    ReadOnly,
    /// The value is not valid for the field.
    #[error("invalid value: {0}")]
    Invalid(String),
}

/// Processes the chains of one queue, on that queue's worker thread.
pub trait QueueHandler: Send {
    /// Handles one chain: `segs` holds its readable segments (the first
    /// `chain.readable_segments()`), then its writable ones. Returns the number of bytes
    /// written into the writable part (the used length the driver sees).
    fn process(&mut self, chain: &Chain, segs: &[Segment<'_>]) -> u32;
}

/// Counters over the server's life, for tests and monitoring.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections being served now.
    pub connections_active: AtomicU64,
    /// Connections closed at once because [`ServerOptions::max_connections`] were served.
    pub connections_refused: AtomicU64,
    /// Connections that ended with an error (not a plain disconnect).
    pub connection_errors: AtomicU64,
    /// Connections ended because their guest memory faulted (see [`MemoryFault`]).
    pub memory_faults: AtomicU64,
    /// Chains processed (added when a worker stops).
    pub requests: AtomicU64,
    /// Interrupts sent (call eventfd writes).
    pub interrupts: AtomicU64,
    /// Kicks received.
    pub kicks: AtomicU64,
    /// Rings the driver broke (each latched broken, with its error fd signalled).
    pub queue_faults: AtomicU64,
    /// Error and info lines the connections logged.
    pub log_lines: AtomicU64,
    /// Lines the per-connection rate limit dropped ([`LOG_BURST`] per [`LOG_INTERVAL`]).
    pub log_lines_suppressed: AtomicU64,
}

/// How a connection ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConnectionEnd {
    /// The frontend closed the socket.
    Disconnected,
    /// A request failed or was malformed; the connection was closed.
    Error(VuError),
    /// [`ShutdownHandle::shutdown`] was called.
    Shutdown,
    /// The frontend sent nothing for this long after connecting.
    Silent(Duration),
    /// A message stayed incomplete, or its reply was not taken, for this long.
    Stalled(Duration),
    /// Guest memory faulted under the back end: the frontend shrank a region's file (or
    /// its pages went away). The rings were stopped.
    MemoryFault(MemoryFault),
}

impl fmt::Display for ConnectionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disconnected => f.write_str("the frontend disconnected"),
            Self::Error(e) => write!(f, "error: {e}"),
            Self::Shutdown => f.write_str("shut down"),
            Self::Silent(t) => write!(f, "error: the frontend sent no message within {t:?} of connecting"),
            Self::Stalled(t) => {
                write!(f, "error: the frontend left a message unfinished (or its reply untaken) for {t:?}")
            }
            Self::MemoryFault(m) => write!(f, "error: {m}; the connection's rings are stopped"),
        }
    }
}

impl ConnectionEnd {
    /// Whether the connection ended by a fault (not a disconnect or a shutdown).
    pub fn is_error(&self) -> bool {
        !matches!(self, Self::Disconnected | Self::Shutdown)
    }
}

/// Limits of a [`Server`].
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Frontends served at once, each on its own thread (plus a thread per running ring).
    /// One more is accepted and closed at once, and counted in
    /// [`Stats::connections_refused`].
    pub max_connections: usize,
    /// How long a frontend may take to send its first message after connecting, to finish
    /// a message it has begun, and to take the reply. Waiting for the next message is not
    /// limited, and neither is the back end's own work (stopping a ring waits for the
    /// request it is processing).
    pub message_timeout: Duration,
    /// How long a worker keeps polling its rings (and its device's fds) after its last
    /// request before it turns kicks on and sleeps. Zero (the default) sleeps at once;
    /// a few tens of microseconds save the driver a kick and the back end a wake-up per
    /// burst, at the price of a busy CPU while the traffic lasts.
    pub poll: Duration,
    /// The ring features offered with the device's own (a subset of [`RING_FEATURES`];
    /// `VERSION_1` is always offered). Leaving out `RING_PACKED` keeps frontends that
    /// take whatever the back end offers, such as QEMU's `vhost-user-rng-pci`, on split
    /// rings.
    pub ring_features: Features,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_connections: 64,
            message_timeout: Duration::from_secs(10),
            poll: Duration::ZERO,
            ring_features: Features::from_bits(RING_FEATURES),
        }
    }
}

/// Stops a running [`Server`] from another thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    inner: Arc<ShutdownInner>,
}

struct ShutdownInner {
    flag: AtomicBool,
    wake: EventFd,
    /// The connections being served, by number (clones of their sockets, to shut down).
    live: Mutex<Vec<(u64, UnixStream)>>,
}

impl ShutdownHandle {
    /// Makes [`Server::run`] return: closes every connection (their rings are stopped) and
    /// stops accepting.
    pub fn shutdown(&self) {
        self.inner.flag.store(true, Ordering::Release);
        let _ = self.inner.wake.write(1);
        for (_, s) in self.live().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn requested(&self) -> bool {
        self.inner.flag.load(Ordering::Acquire)
    }

    fn live(&self) -> MutexGuard<'_, Vec<(u64, UnixStream)>> {
        self.inner.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records connection `n`; a shutdown from now on closes it. A shutdown that came
    /// first closes it at once.
    fn track(&self, n: u64, stream: &UnixStream) {
        if let Ok(clone) = stream.try_clone() {
            self.live().push((n, clone));
        }
        if self.requested() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn untrack(&self, n: u64) {
        self.live().retain(|(i, _)| *i != n);
    }
}

/// A vhost-user back end listening on a unix socket.
///
/// [`Self::run`] serves frontends concurrently, one thread each, up to
/// [`ServerOptions::max_connections`]: a frontend that stalls, sends garbage or faults
/// its memory ends its own connection only. Every wait on a frontend that has begun a
/// message is bounded too ([`ServerOptions::message_timeout`]), so a stalled frontend does
/// not hold a connection slot for ever.
pub struct Server {
    listener: Listener,
    path: PathBuf,
    device: Arc<dyn Device>,
    stats: Arc<Stats>,
    shutdown: ShutdownHandle,
    options: ServerOptions,
    log: Arc<log::ConnLog>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server").field("path", &self.path).field("options", &self.options).finish_non_exhaustive()
    }
}

impl Server {
    /// Listens on `path` with the default [`ServerOptions`]. A socket file already there is
    /// replaced; any other file is left alone (an error).
    pub fn bind(path: impl AsRef<Path>, device: Arc<dyn Device>) -> io::Result<Self> {
        Self::bind_with(path, device, ServerOptions::default())
    }

    /// Listens on `path` with `options`.
    pub fn bind_with(path: impl AsRef<Path>, device: Arc<dyn Device>, options: ServerOptions) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
        }
        if options.max_connections == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "max_connections must be at least 1"));
        }
        let listener = Listener::new(&path, true).map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
        let shutdown = ShutdownHandle {
            inner: Arc::new(ShutdownInner {
                flag: AtomicBool::new(false),
                wake: EventFd::new(libc::EFD_NONBLOCK)?,
                live: Mutex::new(Vec::new()),
            }),
        };
        let stats = Arc::<Stats>::default();
        let log = log::ConnLog::new("server".into(), stats.clone());
        Ok(Self { listener, path, device, stats, shutdown, options, log })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// A handle that stops [`Self::run`] from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Serves frontends, each on its own thread, until [`ShutdownHandle::shutdown`]; then
    /// closes every connection and waits for their threads. A connection that fails is
    /// logged and closed; the others go on.
    pub fn run(&mut self) -> io::Result<()> {
        let _log = log::enter(self.log.clone());
        log_info!("listening on {} (at most {} frontends at once)", self.path.display(), self.options.max_connections);
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let result = loop {
            let stream = match self.accept() {
                Ok(Some(s)) => s,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            threads.retain(|t| !t.is_finished());
            let n = self.stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
            if threads.len() >= self.options.max_connections {
                self.stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                log_error!(
                    "connection {n} refused: {} frontends are being served, the most allowed",
                    self.options.max_connections
                );
                continue;
            }
            let ctx = self.conn_ctx();
            match std::thread::Builder::new().name(format!("vhost-conn{n}")).spawn(move || {
                ctx.serve(stream, n);
            }) {
                Ok(t) => threads.push(t),
                Err(e) => log_error!("connection {n}: cannot start its thread: {e}"),
            }
        };
        self.shutdown.shutdown();
        for t in threads {
            let _ = t.join();
        }
        log_info!("stopped");
        result
    }

    /// Waits for one frontend and serves it on this thread until it disconnects or fails.
    /// `None` if the server was shut down while waiting.
    pub fn serve_one(&mut self) -> io::Result<Option<ConnectionEnd>> {
        let Some(stream) = self.accept()? else { return Ok(None) };
        let n = self.stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Some(self.conn_ctx().serve(stream, n)))
    }

    fn conn_ctx(&self) -> ConnCtx {
        ConnCtx {
            device: self.device.clone(),
            stats: self.stats.clone(),
            shutdown: Some(self.shutdown.clone()),
            options: self.options.clone(),
        }
    }

    fn accept(&mut self) -> io::Result<Option<UnixStream>> {
        let lfd = self.listener.as_raw_fd();
        loop {
            if self.shutdown.requested() {
                return Ok(None);
            }
            let ready = worker::poll_in(&[lfd, self.shutdown.inner.wake.as_raw_fd()], -1)?;
            if ready[1] || self.shutdown.requested() {
                return Ok(None);
            }
            if !ready[0] {
                continue;
            }
            self.listener.set_nonblocking(true).map_err(io::Error::other)?;
            let r = self.listener.accept();
            self.listener.set_nonblocking(false).map_err(io::Error::other)?;
            match r {
                Ok(Some(s)) => {
                    s.set_nonblocking(false)?;
                    return Ok(Some(s));
                }
                Ok(None) => continue,
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }
}

/// Serves one frontend that is already connected (a socket pair, an inherited socket) on
/// this thread, with the limits of `options`, until it disconnects or fails. Every ring is
/// stopped and the memory unmapped before this returns.
pub fn serve_stream(
    stream: UnixStream,
    device: Arc<dyn Device>,
    stats: Arc<Stats>,
    options: &ServerOptions,
) -> ConnectionEnd {
    let n = stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
    ConnCtx { device, stats, shutdown: None, options: options.clone() }.serve(stream, n)
}

/// What serving a connection needs from its server.
struct ConnCtx {
    device: Arc<dyn Device>,
    stats: Arc<Stats>,
    shutdown: Option<ShutdownHandle>,
    options: ServerOptions,
}

impl ConnCtx {
    /// Serves connection `n`, logs how it ended, and counts it.
    fn serve(self, stream: UnixStream, n: u64) -> ConnectionEnd {
        let log = log::ConnLog::new(format!("connection {n}"), self.stats.clone());
        let _log = log::enter(log.clone());
        log_info!("frontend connected");
        self.stats.connections_active.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = &self.shutdown {
            s.track(n, &stream);
        }
        let end = self.serve_messages(stream, &log);
        if let Some(s) = &self.shutdown {
            s.untrack(n);
        }
        self.stats.connections_active.fetch_sub(1, Ordering::Relaxed);
        if end.is_error() {
            self.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
            if matches!(end, ConnectionEnd::MemoryFault(_)) {
                self.stats.memory_faults.fetch_add(1, Ordering::Relaxed);
            }
            log_error!("{end}; connection closed");
        } else {
            log_info!("{end}");
        }
        log.flush();
        end
    }

    /// The message loop. Each message is awaited without a limit once the frontend has sent
    /// its first (a guest may leave a device idle for days); once its first byte is there,
    /// receiving the rest and sending the reply run under the watchdog.
    fn serve_messages(&self, stream: UnixStream, log: &Arc<log::ConnLog>) -> ConnectionEnd {
        let sock = stream.as_raw_fd();
        // Workers write it when guest memory faults under them.
        let fault_event = match EventFd::new(libc::EFD_NONBLOCK) {
            Ok(e) => Arc::new(e),
            Err(e) => return ConnectionEnd::Error(VuError::ReqHandlerError(e)),
        };
        let mut watchdog = match WatchdogThread::spawn("vhost-conn-watchdog", sock) {
            Ok(w) => w,
            Err(e) => return ConnectionEnd::Error(VuError::ReqHandlerError(e)),
        };
        let state = Arc::new(Mutex::new(conn::ConnState::new(
            self.device.clone(),
            self.stats.clone(),
            conn::ConnLinks {
                log: log.clone(),
                fault_event: fault_event.clone(),
                watchdog: watchdog.get().clone(),
                poll: self.options.poll,
                ring_features: self.options.ring_features,
            },
        )));
        let mut handler = BackendReqHandler::from_stream(stream, state.clone());
        let timeout = self.options.message_timeout;
        let mut spoken = false;
        let shutting_down = || self.shutdown.as_ref().is_some_and(ShutdownHandle::requested);
        let end = loop {
            let wait_ms = if spoken { -1 } else { timeout.as_millis().clamp(1, i32::MAX as u128) as i32 };
            let ready = match wait_readable(sock, fault_event.as_raw_fd(), wait_ms) {
                Ok(r) => r,
                Err(e) => break ConnectionEnd::Error(VuError::SocketError(e)),
            };
            if let Some(f) = lock(&state).memory_fault() {
                break ConnectionEnd::MemoryFault(f);
            }
            if !ready {
                break ConnectionEnd::Silent(timeout);
            }
            watchdog.get().arm(Instant::now() + timeout);
            let r = match conn::take_early_vring_enable(sock, &state) {
                Ok(true) => Ok(()),
                Ok(false) => handler.handle_request(),
                Err(e) => Err(e),
            };
            let stalled = watchdog.get().disarm();
            if let Some(f) = lock(&state).memory_fault() {
                break ConnectionEnd::MemoryFault(f);
            }
            match r {
                Ok(()) => spoken = true,
                Err(_) if shutting_down() => break ConnectionEnd::Shutdown,
                Err(_) if stalled => break ConnectionEnd::Stalled(timeout),
                Err(VuError::Disconnected) => break ConnectionEnd::Disconnected,
                // End of file in the middle of a header, or a reset: the peer went away.
                Err(VuError::PartialMessage) => break ConnectionEnd::Disconnected,
                Err(VuError::SocketBroken(e)) if matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE)) => {
                    break ConnectionEnd::Disconnected
                }
                Err(e) => break ConnectionEnd::Error(e),
            }
        };
        // The watchdog may shut the socket down until it stops; the socket closes with the
        // handler.
        watchdog.stop();
        drop(handler);
        // The handler held the other reference; a poisoned lock still holds the state.
        lock(&state).stop_all();
        end
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until the socket is readable (a message, end of file) or `fault` is signalled;
/// false on timeout.
fn wait_readable(sock: RawFd, fault: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let ready = worker::poll_in(&[sock, fault], timeout_ms)?;
    Ok(ready[0] || ready[1])
}
