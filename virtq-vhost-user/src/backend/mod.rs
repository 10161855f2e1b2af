//! The device's end of vhost-user: a back end that a frontend such as QEMU connects to, so
//! that a guest's own virtio drivers (Linux's `virtio_ring.c` and `virtio_blk`) drive rings
//! that this process serves with [`virtq::DeviceQueue`].
//!
//! ```text
//! Server::bind(path, device)          a unix socket (vhost's Listener)
//!   run(): accept, serve, accept ...  one frontend at a time; a disconnect, or a frontend
//!                                     that sends garbage, closes that connection only
//!     control thread                  vhost's BackendReqHandler decodes each request and
//!                                     calls conn::ConnState (features, memory table, vrings,
//!                                     config, GET_VRING_BASE, ...)
//!     one worker thread per ring      pop / process / complete on our DeviceQueue, sleeping
//!                                     on the kick eventfd, signalling the call eventfd
//! ```
//!
//! - **Layouts**: the back end offers `RING_PACKED`, `IN_ORDER`, `EVENT_IDX`,
//!   `INDIRECT_DESC` and `VERSION_1` and runs whatever the frontend acks. For packed rings
//!   the ring base in `SET_VRING_BASE`/`GET_VRING_BASE` is QEMU's encoding: the next
//!   available position with its wrap counter in bit 15, and the used position and wrap
//!   counter in bits 16..32.
//! - **Addresses**: ring addresses in `SET_VRING_ADDR` are the frontend's virtual
//!   addresses; they are translated to guest physical addresses through the memory table's
//!   `userspace_addr`, and the queue translates those (and every buffer address) to the
//!   mapped regions with bounds checks ([`memory::GuestMemoryMap`], over
//!   [`virtq::GuestRegions`]).
//! - **Hostile guests**: every buffer is a [`virtq::Segment`], translated and bounds-checked
//!   by the core, and accessed only with `read_at`/`write_at`. A malformed ring latches the
//!   queue broken: the worker logs it, signals the vring's error fd and waits to be stopped.
//! - **Devices** implement [`Device`] (features, config space, queues) and one
//!   [`QueueHandler`] per queue (one chain in, the bytes written out). [`blk::BlkBackend`]
//!   is virtio-blk over a file.
//!
//! ```no_run
//! use std::sync::Arc;
//! use virtq_vhost_user::backend::{blk::{BlkBackend, BlkBackendOptions}, Server};
//!
//! let device = BlkBackend::open("/tmp/disk.raw", &BlkBackendOptions { queues: 4, ..Default::default() })?;
//! let mut server = Server::bind("/tmp/blk.sock", Arc::new(device))?;
//! server.run()?; // serves frontends one after the other, forever
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Logging goes to standard error; `VIRTQ_LOG=debug` adds the protocol and ring events.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{BackendReqHandler, Error as VuError, Listener};
use virtq::{Chain, Features, Segment};
use vmm_sys_util::eventfd::EventFd;

#[macro_use]
mod log;
pub mod blk;
mod conn;
pub mod memory;
mod vring;

pub use conn::RING_FEATURES;

/// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30 of the virtio feature word in vhost-user).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Largest ring accepted in `SET_VRING_NUM` (the packed ring's limit, VIRTIO 1.3, 2.8).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes of config space served by `GET_CONFIG` (the vhost-user limit is 256); bytes past
/// the device's own config read as zero.
pub const CONFIG_SPACE_MAX: usize = 256;

/// A virtio device served over vhost-user.
pub trait Device: Send + Sync + 'static {
    /// The device-class feature bits offered (0..=23, and any others the device knows).
    /// The back end adds the ring bits ([`RING_FEATURES`]) and
    /// `VHOST_USER_F_PROTOCOL_FEATURES`.
    fn device_features(&self) -> u64;

    /// Number of virtqueues (answered to `GET_QUEUE_NUM`).
    fn num_queues(&self) -> u16;

    /// The device-specific config space, little-endian (VIRTIO 1.3, 4.1.4.3).
    fn config_space(&self) -> &[u8];

    /// A handler for queue `index`, run by that queue's worker thread. Called each time the
    /// ring starts, with the features the frontend acked.
    fn queue_handler(&self, index: u16, features: Features) -> Box<dyn QueueHandler>;
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
    /// Connections that ended with an error (not a plain disconnect).
    pub connection_errors: AtomicU64,
    /// Chains processed (added when a worker stops).
    pub requests: AtomicU64,
    /// Interrupts sent (call eventfd writes).
    pub interrupts: AtomicU64,
    /// Kicks received.
    pub kicks: AtomicU64,
    /// Rings the driver broke (each latched broken, with its error fd signalled).
    pub queue_faults: AtomicU64,
}

/// How a connection ended.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The frontend closed the socket.
    Disconnected,
    /// A request failed or was malformed; the connection was closed.
    Error(VuError),
    /// [`ShutdownHandle::shutdown`] was called.
    Shutdown,
}

impl fmt::Display for ConnectionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disconnected => f.write_str("the frontend disconnected"),
            Self::Error(e) => write!(f, "error: {e}"),
            Self::Shutdown => f.write_str("shut down"),
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
    current: Mutex<Option<UnixStream>>,
}

impl ShutdownHandle {
    /// Makes [`Server::run`] return: closes the current connection (its rings are stopped)
    /// and stops accepting.
    pub fn shutdown(&self) {
        self.inner.flag.store(true, Ordering::Release);
        let _ = self.inner.wake.write(1);
        if let Some(s) = &*self.inner.current.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn requested(&self) -> bool {
        self.inner.flag.load(Ordering::Acquire)
    }
}

/// A vhost-user back end listening on a unix socket.
pub struct Server {
    listener: Listener,
    path: PathBuf,
    device: Arc<dyn Device>,
    stats: Arc<Stats>,
    shutdown: ShutdownHandle,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Server {
    /// Listens on `path`. A socket file already there is replaced; any other file is left
    /// alone (an error).
    pub fn bind(path: impl AsRef<Path>, device: Arc<dyn Device>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
        }
        let listener = Listener::new(&path, true).map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
        let shutdown = ShutdownHandle {
            inner: Arc::new(ShutdownInner {
                flag: AtomicBool::new(false),
                wake: EventFd::new(libc::EFD_NONBLOCK)?,
                current: Mutex::new(None),
            }),
        };
        Ok(Self { listener, path, device, stats: Arc::default(), shutdown })
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

    /// Serves frontends one after the other until [`ShutdownHandle::shutdown`]. A
    /// connection that fails is logged and closed; the server goes on with the next one.
    pub fn run(&mut self) -> io::Result<()> {
        log_info!("listening on {}", self.path.display());
        while let Some(end) = self.serve_one()? {
            if matches!(end, ConnectionEnd::Shutdown) {
                break;
            }
        }
        log_info!("stopped");
        Ok(())
    }

    /// Waits for one frontend and serves it until it disconnects or fails. `None` if the
    /// server was shut down while waiting.
    pub fn serve_one(&mut self) -> io::Result<Option<ConnectionEnd>> {
        let Some(stream) = self.accept()? else { return Ok(None) };
        let n = self.stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
        log_info!("connection {n}: frontend connected");
        if let Ok(clone) = stream.try_clone() {
            *self.shutdown.inner.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(clone);
        }
        let end = serve_connection(stream, self.device.clone(), self.stats.clone(), &self.shutdown);
        *self.shutdown.inner.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        match &end {
            ConnectionEnd::Error(e) => {
                self.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                log_error!("connection {n}: {e}; connection closed, waiting for the next frontend");
            }
            other => log_info!("connection {n}: {other}"),
        }
        Ok(Some(end))
    }

    fn accept(&mut self) -> io::Result<Option<UnixStream>> {
        let lfd = self.listener_fd();
        loop {
            if self.shutdown.requested() {
                return Ok(None);
            }
            let ready = vring::poll_in(&[lfd, self.shutdown.inner.wake.as_raw_fd()], -1)?;
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

    fn listener_fd(&self) -> std::os::fd::RawFd {
        self.listener.as_raw_fd()
    }
}

/// Serves one connection until it ends; every ring is stopped and the memory unmapped
/// before this returns.
fn serve_connection(
    stream: UnixStream,
    device: Arc<dyn Device>,
    stats: Arc<Stats>,
    shutdown: &ShutdownHandle,
) -> ConnectionEnd {
    let state = Arc::new(Mutex::new(conn::ConnState::new(device, stats)));
    let mut handler = BackendReqHandler::from_stream(stream, state.clone());
    let end = loop {
        match handler.handle_request() {
            Ok(()) => {}
            Err(_) if shutdown.requested() => break ConnectionEnd::Shutdown,
            Err(VuError::Disconnected) => break ConnectionEnd::Disconnected,
            // End of file in the middle of a header, or a reset: the peer went away.
            Err(VuError::PartialMessage) => break ConnectionEnd::Disconnected,
            Err(VuError::SocketBroken(e)) if matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE)) => {
                break ConnectionEnd::Disconnected
            }
            Err(e) => break ConnectionEnd::Error(e),
        }
    };
    drop(handler);
    // The handler held the other reference; a poisoned lock still holds the state.
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    s.stop_all();
    end
}
