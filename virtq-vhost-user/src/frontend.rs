//! The vhost-user frontend: the driver's end of a vhost-user connection.
//!
//! [`Connection::connect`] runs the handshake on the unix socket (the order QEMU uses):
//!
//! ```text
//! SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (REPLY_ACK, CONFIG, MQ),
//! GET_QUEUE_NUM, GET_CONFIG, SET_FEATURES, SET_MEM_TABLE (the memfds of SharedMemory)
//! ```
//!
//! and [`Connection::create_queue`] sets up one virtqueue:
//!
//! ```text
//! SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ENABLE
//! ```
//!
//! Each [`Queue`] is a [`virtq::Virtqueue`] with its own kick eventfd (the queue's
//! [`Notify`]) and call eventfd, usable from its own thread. Dropping it stops the ring
//! with `GET_VRING_BASE`.
//!
//! The messages themselves are rust-vmm's `vhost` crate (`Frontend`, `VhostBackend`,
//! `VhostUserFrontend`). One thing it cannot do is give up on a silent peer: its receive
//! loop retries `EAGAIN` forever, so a socket read timeout turns into a busy loop. Each
//! control request therefore runs under a watchdog thread that shuts the socket down when
//! the request's deadline passes; the blocked receive then sees end-of-file and the request
//! fails, and the connection is marked dead.
//!
//! `GET_CONFIG` is exchanged here by hand rather than by `vhost`, whose reader waits for
//! as many bytes as it asked for: a back end that answers with fewer would look silent,
//! where the error can say what it sent.
//!
//! Dropping queues stops their rings with `GET_VRING_BASE`. All such stops of one
//! connection share one budget of [`ConnectOptions::timeout`]: a back end that answers
//! each just in time, or not at all, holds the whole teardown up for that long at most.
//! A ring whose stop was not acknowledged keeps its memory out of the allocator (the back
//! end may still write it).
//!
//! Ring addresses in `SET_VRING_ADDR` are in the frontend's address space (host
//! addresses), as the vhost-user protocol requires; descriptors carry GPAs.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtq::{CreateError, Direction, Dma, DmaRegion, Features, Notify, NotifyData, QueueConfig, Virtqueue};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{MemoryConfig, SharedMemory};
use crate::watchdog::WatchdogThread;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: the back end speaks the protocol-feature extension.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// What can go wrong on a vhost-user connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket path does not exist.
    #[error("vhost-user socket {0}: no such file (is the back end running?)")]
    SocketNotFound(PathBuf),
    /// The path exists but is not a unix socket.
    #[error("{0} is not a unix socket")]
    NotASocket(PathBuf),
    /// `connect` failed.
    #[error("cannot connect to vhost-user socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The system's reason.
        source: io::Error,
    },
    /// The peer does not answer the first request like a vhost-user back end.
    #[error("{path} is not a vhost-user back end: {detail}")]
    NotVhostUser {
        /// The socket path.
        path: PathBuf,
        /// What the peer did instead.
        detail: String,
    },
    /// A request failed in the protocol.
    #[error("vhost-user request {request} failed: {source}")]
    Protocol {
        /// The request, by its protocol name.
        request: &'static str,
        /// What vhost reported.
        source: vhost::Error,
    },
    /// A request got no answer in time; the connection was closed.
    #[error("vhost-user request {request} got no answer within {timeout:?}; connection closed")]
    ControlTimeout {
        /// The request, by its protocol name.
        request: &'static str,
        /// The time allowed.
        timeout: Duration,
    },
    /// The back end's reply is malformed; `detail` says what arrived.
    #[error("vhost-user request {request}: {detail}")]
    BadReply {
        /// The request, by its protocol name.
        request: &'static str,
        /// What the back end sent instead of a well-formed reply.
        detail: String,
    },
    /// The device does not offer features the driver requires.
    #[error("the device does not offer required virtio features {missing:?} (offered {offered:?})")]
    MissingFeatures {
        /// Required but not offered.
        missing: Features,
        /// What the device offers.
        offered: Features,
    },
    /// The back end lacks a vhost-user protocol feature that the request needs.
    #[error("the back end does not offer vhost-user protocol feature {0}")]
    MissingProtocolFeature(&'static str),
    /// A queue index beyond what the device has.
    #[error("queue {index} requested, the device has {available}")]
    NoSuchQueue {
        /// The index asked for.
        index: u16,
        /// How many queues there are.
        available: u16,
    },
    /// The guest memory could not be created.
    #[error("cannot create guest memory: {0}")]
    Memory(#[source] io::Error),
    /// A virtqueue could not be created.
    #[error("cannot create virtqueue {index}: {reason}")]
    CreateQueue {
        /// The queue index.
        index: u16,
        /// virtq's reason.
        reason: CreateError,
    },
    /// An eventfd could not be created or read.
    #[error("eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// The back end closed the connection (or died).
    #[error("the vhost-user back end disconnected")]
    Disconnected,
    /// Waiting for the device took longer than allowed.
    #[error("timed out after {0:?} waiting for the device")]
    Timeout(Duration),
    /// The virtqueue latched broken.
    #[error("the virtqueue is broken: {0}")]
    QueueBroken(#[source] Broken),
    /// The ring memory the queue got does not lie in the memory shared with the back end.
    #[error("virtqueue {index}: its ring is not in the memory shared with the back end")]
    RingNotShared {
        /// The queue index.
        index: u16,
    },
}

/// Why a virtqueue no longer takes work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Broken {
    /// The driver caught the device breaking the ring protocol, or a kick could not be
    /// delivered.
    #[error(transparent)]
    Fault(#[from] virtq::Fault),
    /// The queue was stopped (`GET_VRING_BASE`), or broken on request.
    #[error("the queue was stopped")]
    Stopped,
    /// The ring refused a buffer.
    #[error("the ring refused a buffer: {0}")]
    Refused(virtq::AddErrorKind),
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Device-class feature bits the driver can use: accepted if the device offers them.
    pub driver_features: u64,
    /// Bits the device must offer (any class; `VERSION_1` is always required).
    pub required_features: u64,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` if offered.
    pub event_idx: bool,
    /// Negotiate `VIRTIO_RING_F_INDIRECT_DESC` if offered.
    pub indirect_desc: bool,
    /// Negotiate `VIRTIO_F_RING_PACKED` if offered (off by default here; class drivers
    /// such as [`crate::blk`] turn it on).
    pub ring_packed: bool,
    /// Negotiate `VIRTIO_F_IN_ORDER` if offered (off by default here, as `ring_packed`).
    pub in_order: bool,
    /// Bytes of device config space to read with `GET_CONFIG` (0: none).
    pub config_size: u32,
    /// Guest memory to share.
    pub memory: MemoryConfig,
    /// How long one control request may take.
    pub timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            driver_features: 0,
            required_features: 0,
            event_idx: true,
            indirect_desc: true,
            ring_packed: false,
            in_order: false,
            config_size: 0,
            memory: MemoryConfig::default(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// The state shared by a connection and its queues.
struct ConnInner {
    path: PathBuf,
    frontend: Mutex<Frontend>,
    sock: RawFd,
    watchdog: WatchdogThread,
    timeout: Duration,
    /// Time left for the `GET_VRING_BASE` of dropped queues, all together.
    teardown_budget: Mutex<Duration>,
    dead: AtomicBool,
    memory: Arc<SharedMemory>,
    features: Features,
    protocol_features: VhostUserProtocolFeatures,
    /// `VHOST_USER_F_PROTOCOL_FEATURES` was offered and acked.
    protocol_extension: bool,
    max_queues: Option<u16>,
    config: Vec<u8>,
}

impl ConnInner {
    /// Runs one control request under the watchdog.
    fn control<R>(&self, request: &'static str, f: impl FnOnce(&mut Frontend) -> vhost::Result<R>) -> Result<R, Error> {
        self.control_within(request, |_| self.timeout, f)
    }

    /// Runs one control request under the watchdog, allowed the time `limit` gives once
    /// the socket is ours.
    fn control_within<R>(
        &self,
        request: &'static str,
        limit: impl FnOnce(Instant) -> Duration,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<R>,
    ) -> Result<R, Error> {
        if self.dead.load(Ordering::Relaxed) {
            return Err(Error::Disconnected);
        }
        let mut fe = self.frontend.lock().unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        let timeout = limit(start);
        self.watchdog.get().arm(start + timeout);
        let r = f(&mut fe);
        let fired = self.watchdog.get().disarm();
        r.map_err(|e| {
            if fired {
                self.dead.store(true, Ordering::Relaxed);
                Error::ControlTimeout { request, timeout }
            } else if is_disconnect(&e) {
                self.dead.store(true, Ordering::Relaxed);
                Error::Disconnected
            } else {
                Error::Protocol { request, source: e }
            }
        })
    }

    /// `GET_CONFIG` of `size` bytes at `offset`, by hand (see the module documentation):
    /// the request, then a reply read header first and payload by its announced length,
    /// under the watchdog. A reply that is short, empty, or for something else is an
    /// [`Error::BadReply`] saying what arrived.
    fn get_config(&self, offset: u32, size: u32) -> Result<Vec<u8>, Error> {
        const REQUEST: &str = "GET_CONFIG";
        const GET_CONFIG: u32 = 24;
        /// `VhostUserConfig`: offset, size, flags.
        const CONFIG_HEADER: usize = 12;
        if offset as usize + size as usize > CONFIG_SPACE_MAX {
            let source = vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::InvalidParam);
            return Err(Error::Protocol { request: REQUEST, source });
        }
        if self.dead.load(Ordering::Relaxed) {
            return Err(Error::Disconnected);
        }
        let bad = |detail: String| {
            self.dead.store(true, Ordering::Relaxed);
            Error::BadReply { request: REQUEST, detail }
        };
        // Held so that no other request shares the socket meanwhile.
        let _fe = self.frontend.lock().unwrap_or_else(|e| e.into_inner());
        let mut msg = Vec::with_capacity(24 + size as usize);
        for word in [GET_CONFIG, 1, (CONFIG_HEADER as u32) + size, offset, size, 0] {
            msg.extend_from_slice(&word.to_le_bytes());
        }
        msg.resize(24 + size as usize, 0);
        self.watchdog.get().arm(Instant::now() + self.timeout);
        // What arrived when the reply stopped short: the header's bytes, or the payload's
        // (with its announced length).
        enum Short {
            Request,
            Header(usize),
            Payload { announced: usize, got: usize },
        }
        let reply = (|| {
            send_all(self.sock, &msg).map_err(|_| (Short::Request, "the connection broke"))?;
            let mut header = [0u8; 12];
            recv_exact(self.sock, &mut header).map_err(|(got, end)| (Short::Header(got), end))?;
            let (code, flags, len) = (le32(&header[0..4]), le32(&header[4..8]), le32(&header[8..12]) as usize);
            // Version 1, with the reply bit.
            if code != GET_CONFIG || flags & 0x7 != 0x5 {
                return Ok(Err(format!("the reply is for request {code} with flags {flags:#x}, not GET_CONFIG")));
            }
            if len > CONFIG_HEADER + CONFIG_SPACE_MAX {
                return Ok(Err(format!("the reply announces {len} payload bytes; GET_CONFIG's carry at most 268")));
            }
            let mut payload = vec![0u8; len];
            recv_exact(self.sock, &mut payload).map_err(|(got, end)| (Short::Payload { announced: len, got }, end))?;
            Ok(Ok(payload))
        })();
        let fired = self.watchdog.get().disarm();
        let payload = match reply {
            Ok(Ok(p)) => p,
            Ok(Err(detail)) => return Err(bad(detail)),
            Err((short, end)) => {
                let how = if fired { format!("then nothing for {:?}", self.timeout) } else { end.to_string() };
                let what = match short {
                    Short::Request => "the request could not be sent".to_string(),
                    Short::Header(got) => format!("the back end sent {got} of the 12 bytes of a reply header"),
                    Short::Payload { announced, got } => {
                        format!("the reply announced {announced} payload bytes and {got} arrived")
                    }
                };
                return Err(bad(format!("{what}, {how}; connection closed")));
            }
        };
        if payload.len() < CONFIG_HEADER {
            return Err(bad(format!(
                "the reply's payload is {} bytes, shorter than the {CONFIG_HEADER}-byte config header",
                payload.len()
            )));
        }
        let (r_offset, r_size) = (le32(&payload[0..4]), le32(&payload[4..8]));
        let space = &payload[CONFIG_HEADER..];
        if r_size == 0 && space.is_empty() {
            return Err(Error::BadReply {
                request: REQUEST,
                detail: "the back end answered with an empty config space (it failed the request)".into(),
            });
        }
        if r_offset != offset || r_size != size || space.len() != size as usize {
            return Err(Error::BadReply {
                request: REQUEST,
                detail: format!(
                    "the reply holds {} bytes of config space (announced {r_size} at offset {r_offset}); {size} at \
                     offset {offset} were asked for",
                    space.len()
                ),
            });
        }
        Ok(space.to_vec())
    }

    /// Stops ring `index` as its queue is dropped, within what is left of the teardown
    /// budget (see the module documentation). Whether the back end acknowledged the stop.
    fn stop_in_teardown(&self, index: u16) -> bool {
        if self.peer_gone() {
            return false;
        }
        let mut spent = Duration::ZERO;
        let r = self.control_within(
            "GET_VRING_BASE",
            |_| {
                let left = *self.teardown_budget.lock().unwrap_or_else(|e| e.into_inner());
                left.min(self.timeout)
            },
            |fe| {
                let start = Instant::now();
                let r = fe.get_vring_base(index as usize);
                spent = start.elapsed();
                r
            },
        );
        let mut left = self.teardown_budget.lock().unwrap_or_else(|e| e.into_inner());
        *left = left.saturating_sub(spent);
        if left.is_zero() {
            // The budget is gone: the back end is not answering in time. Later stops are
            // skipped (their rings leaked), and so is every other request.
            self.dead.store(true, Ordering::Relaxed);
        }
        r.is_ok()
    }

    /// Whether the peer has closed its end (checks the socket without blocking).
    fn peer_gone(&self) -> bool {
        if self.dead.load(Ordering::Relaxed) {
            return true;
        }
        let mut p = libc::pollfd { fd: self.sock, events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            self.dead.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        // Before the socket (in `frontend`) is closed.
        self.watchdog.stop();
    }
}

/// Most bytes of device config space (the vhost-user limit).
const CONFIG_SPACE_MAX: usize = 256;

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Sends all of `buf` on the blocking socket `fd`.
fn send_all(fd: RawFd, mut buf: &[u8]) -> Result<(), ()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for its length; MSG_NOSIGNAL: a closed peer is an error,
        // not SIGPIPE.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(());
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Fills `buf` from the blocking socket `fd`, or says how many bytes arrived and how the
/// receive ended.
fn recv_exact(fd: RawFd, buf: &mut [u8]) -> Result<(), (usize, &'static str)> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the unfilled tail of `buf`, valid for writes of its length.
        let n = unsafe { libc::recv(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        match n {
            0 => return Err((got, "then closed the connection")),
            n if n < 0 => {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err((got, "then the connection broke"));
            }
            n => got += n as usize,
        }
    }
    Ok(())
}

fn is_disconnect(e: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as U;
    matches!(
        e,
        vhost::Error::VhostUserProtocol(U::Disconnected | U::PartialMessage | U::SocketBroken(_) | U::SocketError(_))
    )
}

/// A connection to a vhost-user back end, after the handshake. Cheap to clone; the socket
/// closes when the connection and all its queues are gone.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<ConnInner>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("path", &self.inner.path)
            .field("features", &self.inner.features)
            .field("max_queues", &self.inner.max_queues)
            .finish_non_exhaustive()
    }
}

fn describe_first_reply_error(e: &vhost::Error, timeout: Duration) -> String {
    use vhost::vhost_user::Error as U;
    match e {
        vhost::Error::VhostUserProtocol(U::PartialMessage | U::Disconnected) => {
            "it closed the connection without a complete reply".into()
        }
        vhost::Error::VhostUserProtocol(U::SocketBroken(err) | U::SocketError(err)) => {
            format!("the connection broke ({err})")
        }
        vhost::Error::VhostUserProtocol(U::InvalidMessage) => "its reply is not a vhost-user message".into(),
        other => format!("{other} (within {timeout:?})"),
    }
}

impl Connection {
    /// Connects to the back end at `path` and runs the handshake up to `SET_MEM_TABLE`.
    pub fn connect(path: impl AsRef<Path>, opts: &ConnectOptions) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Error::SocketNotFound(path)),
            Err(source) => return Err(Error::Connect { path, source }),
            Ok(m) if !m.file_type().is_socket() => return Err(Error::NotASocket(path)),
            Ok(_) => {}
        }
        let stream = UnixStream::connect(&path).map_err(|source| Error::Connect { path: path.clone(), source })?;
        let sock = stream.as_raw_fd();
        let memory = SharedMemory::new(opts.memory).map_err(Error::Memory)?;
        let watchdog = WatchdogThread::spawn("vhost-user-watchdog", sock)
            .map_err(|e| Error::Connect { path: path.clone(), source: e })?;
        let mut inner = ConnInner {
            path: path.clone(),
            // A generous queue limit until GET_QUEUE_NUM says otherwise (devices without MQ,
            // such as net with its rx/tx pair, still have several queues).
            frontend: Mutex::new(Frontend::from_stream(stream, 256)),
            sock,
            watchdog,
            timeout: opts.timeout,
            teardown_budget: Mutex::new(opts.timeout),
            dead: AtomicBool::new(false),
            memory,
            features: Features::empty(),
            protocol_features: VhostUserProtocolFeatures::empty(),
            protocol_extension: false,
            max_queues: None,
            config: Vec::new(),
        };

        inner.control("SET_OWNER", |fe| fe.set_owner()).map_err(|e| not_vhost_user(&path, e, opts.timeout))?;
        let offered = inner
            .control("GET_FEATURES", |fe| fe.get_features())
            .map_err(|e| not_vhost_user(&path, e, opts.timeout))?;

        if offered & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            inner.protocol_extension = true;
            let pf = inner.control("GET_PROTOCOL_FEATURES", |fe| fe.get_protocol_features())?;
            let acked = pf
                & (VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::MQ);
            inner.control("SET_PROTOCOL_FEATURES", |fe| fe.set_protocol_features(acked))?;
            if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every later request asks for an acknowledgement, so a failure on the back
                // end's side shows up at the request that caused it.
                inner.frontend.lock().unwrap_or_else(|e| e.into_inner()).set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            inner.protocol_features = acked;
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                let n = inner.control("GET_QUEUE_NUM", |fe| fe.get_queue_num())?;
                inner.max_queues = Some(n.min(u16::MAX as u64) as u16);
            }
        }

        if opts.config_size > 0 {
            if !inner.protocol_features.contains(VhostUserProtocolFeatures::CONFIG) {
                return Err(Error::MissingProtocolFeature("CONFIG (needed for GET_CONFIG)"));
            }
            inner.config = inner.get_config(0, opts.config_size)?;
        }

        let ring_wanted = Features::VERSION_1
            | if opts.event_idx { Features::EVENT_IDX } else { Features::empty() }
            | if opts.indirect_desc { Features::INDIRECT_DESC } else { Features::empty() }
            | if opts.ring_packed { Features::RING_PACKED } else { Features::empty() }
            | if opts.in_order { Features::IN_ORDER } else { Features::empty() };
        let required = Features::from_bits(opts.required_features) | Features::VERSION_1;
        let offered_f = Features::from_bits(offered & !VHOST_USER_F_PROTOCOL_FEATURES);
        let missing = required & !offered_f;
        if missing != Features::empty() {
            return Err(Error::MissingFeatures { missing, offered: offered_f });
        }
        let wanted = (ring_wanted | Features::from_bits(opts.driver_features) | required).transport_filter();
        let negotiated = offered_f & wanted;
        let proto_bit = offered & VHOST_USER_F_PROTOCOL_FEATURES;
        inner.control("SET_FEATURES", |fe| fe.set_features(negotiated.bits() | proto_bit))?;
        inner.features = negotiated;

        let regions: Vec<VhostUserMemoryRegionInfo> = inner
            .memory
            .regions()
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa(),
                memory_size: r.size() as u64,
                userspace_addr: r.host_addr(),
                mmap_offset: 0,
                mmap_handle: r.fd(),
            })
            .collect();
        inner.control("SET_MEM_TABLE", |fe| fe.set_mem_table(&regions))?;

        Ok(Self { inner: Arc::new(inner) })
    }

    /// The negotiated virtio features (device class and ring bits).
    pub fn features(&self) -> Features {
        self.inner.features
    }

    /// The acked vhost-user protocol features.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.inner.protocol_features
    }

    /// The back end's queue count from `GET_QUEUE_NUM`, if it has the MQ protocol feature.
    pub fn max_queues(&self) -> Option<u16> {
        self.inner.max_queues
    }

    /// The device config space read at connection time (`ConnectOptions::config_size` bytes).
    pub fn config(&self) -> &[u8] {
        &self.inner.config
    }

    /// Reads `size` bytes of device config space at `offset` now.
    pub fn read_config(&self, offset: u32, size: u32) -> Result<Vec<u8>, Error> {
        if !self.inner.protocol_features.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(Error::MissingProtocolFeature("CONFIG (needed for GET_CONFIG)"));
        }
        self.inner.get_config(offset, size)
    }

    /// The guest memory shared with the back end.
    pub fn memory(&self) -> &Arc<SharedMemory> {
        &self.inner.memory
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether the back end is still connected (checks the socket).
    pub fn is_connected(&self) -> bool {
        !self.inner.peer_gone()
    }

    /// Creates virtqueue `index` with `size` entries and starts it on the back end.
    ///
    /// `T` is the token type of the ring (see [`virtq::DriverQueue`]). `indirect_max` is the
    /// longest indirect table (see [`QueueConfig::indirect_max`]).
    pub fn create_queue<T>(&self, index: u16, size: u16, indirect_max: u16) -> Result<Queue<T>, Error> {
        let inner = &self.inner;
        if let Some(available) = inner.max_queues {
            if index >= available {
                return Err(Error::NoSuchQueue { index, available });
            }
        }
        let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        let call = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        let leak = Arc::new(AtomicBool::new(false));
        let dma = QueueDma { memory: inner.memory.clone(), leak: leak.clone() };
        let mut config = QueueConfig::new(index, size, inner.features);
        config.indirect_max = indirect_max;
        let vq = Virtqueue::new(config, dma, Kicker(kick)).map_err(|reason| Error::CreateQueue { index, reason })?;
        let mut queue =
            Queue { vq, call, conn: inner.clone(), index, leak, started: false, sock_check: Instant::now() };
        // Interrupts stay off until a sleeping wait turns them on.
        queue.vq.disable_cb();

        let translate = |gpa: u64| inner.memory.gpa_to_host(gpa, 1).ok_or(Error::RingNotShared { index });
        let ring = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: translate(queue.vq.desc_addr())?,
            used_ring_addr: translate(queue.vq.used_addr())?,
            avail_ring_addr: translate(queue.vq.avail_addr())?,
            log_addr: None,
        };
        // Packed rings start with both wrap counters at 1 (bit 15 of the base).
        let base = if inner.features.contains(Features::RING_PACKED) { 0x8000 } else { 0 };
        let i = index as usize;
        inner.control("SET_VRING_NUM", |fe| fe.set_vring_num(i, size))?;
        inner.control("SET_VRING_BASE", |fe| fe.set_vring_base(i, base))?;
        inner.control("SET_VRING_ADDR", |fe| fe.set_vring_addr(i, &ring))?;
        let handle = queue.vq.handle();
        inner.control("SET_VRING_KICK", |fe| fe.set_vring_kick(i, &handle.notifier().0))?;
        inner.control("SET_VRING_CALL", |fe| fe.set_vring_call(i, &queue.call))?;
        queue.started = true;
        // With VHOST_USER_F_PROTOCOL_FEATURES acked, rings start disabled.
        if inner.protocol_extension {
            inner.control("SET_VRING_ENABLE", |fe| fe.set_vring_enable(i, true))?;
        }
        Ok(queue)
    }
}

fn not_vhost_user(path: &Path, e: Error, timeout: Duration) -> Error {
    let detail = match &e {
        Error::Protocol { source, .. } => describe_first_reply_error(source, timeout),
        Error::Disconnected => "it closed the connection without a complete reply".into(),
        Error::ControlTimeout { .. } => format!("no reply within {timeout:?}"),
        _ => return e,
    };
    Error::NotVhostUser { path: path.to_path_buf(), detail }
}

/// The kick side of a queue: an eventfd the back end waits on.
pub struct Kicker(pub EventFd);

impl Notify for Kicker {
    fn notify(&self, _data: NotifyData) -> bool {
        self.0.write(1).is_ok()
    }
}

/// A queue's view of the shared memory: frees ring memory back to the allocator unless
/// the device may still write it (the queue was dropped with buffers in flight).
pub struct QueueDma {
    memory: Arc<SharedMemory>,
    leak: Arc<AtomicBool>,
}

// SAFETY: every call forwards to `SharedMemory`, whose `Dma` contract is the same; `free`
// may skip returning memory to the allocator, which only withholds it.
unsafe impl Dma for QueueDma {
    const MAPS: bool = <SharedMemory as Dma>::MAPS;

    fn alloc_zeroed(&self, size: usize, align: usize) -> Option<DmaRegion> {
        self.memory.alloc_zeroed(size, align)
    }

    unsafe fn free(&self, region: DmaRegion) {
        if !self.leak.load(Ordering::Relaxed) {
            // SAFETY: the caller's promise, passed on.
            unsafe { self.memory.free(region) }
        }
    }

    fn map(&self, addr: u64, len: u32, dir: Direction) -> Option<u64> {
        self.memory.map(addr, len, dir)
    }

    fn unmap(&self, device_addr: u64, len: u32, dir: Direction) {
        self.memory.unmap(device_addr, len, dir)
    }
}

/// How to wait for used buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitMode {
    /// Busy-poll the used ring (interrupts stay suppressed).
    Poll,
    /// Sleep on the call eventfd (interrupts enabled with `enable_cb_prepare` + `poll`).
    Sleep,
    /// Poll for a while, then sleep.
    Hybrid(Duration),
}

/// The driver queue type of a vhost-user queue.
pub type VhostVirtqueue<T> = Virtqueue<T, QueueDma, Kicker>;

/// One virtqueue of a connection: the ring, its kick and call eventfds.
///
/// `Send`: move it to the thread that drives it.
pub struct Queue<T> {
    vq: VhostVirtqueue<T>,
    call: EventFd,
    conn: Arc<ConnInner>,
    index: u16,
    leak: Arc<AtomicBool>,
    started: bool,
    sock_check: Instant,
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue").field("index", &self.index).field("size", &self.vq.vring_size()).finish_non_exhaustive()
    }
}

/// How often a busy-polling wait checks whether the back end is still there.
const SOCKET_CHECK_INTERVAL: Duration = Duration::from_millis(2);

impl<T> Queue<T> {
    /// The queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The ring.
    pub fn vq(&self) -> &VhostVirtqueue<T> {
        &self.vq
    }

    /// The ring, to add and take buffers.
    pub fn vq_mut(&mut self) -> &mut VhostVirtqueue<T> {
        &mut self.vq
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<SharedMemory> {
        &self.conn.memory
    }

    /// The negotiated features.
    pub fn features(&self) -> Features {
        self.conn.features
    }

    /// Notifies the device of new buffers if it wants a notification.
    pub fn kick(&mut self) -> Result<(), Error> {
        if self.vq.kick() {
            Ok(())
        } else {
            Err(self.broken_error())
        }
    }

    fn broken_error(&self) -> Error {
        if self.conn.dead.load(Ordering::Relaxed) {
            return Error::Disconnected;
        }
        Error::QueueBroken(self.broken_reason())
    }

    /// Why the queue is broken: the device's fault if the driver caught one, else stopped.
    pub fn broken_reason(&self) -> Broken {
        self.vq.fault().map_or(Broken::Stopped, Broken::Fault)
    }

    /// Whether the back end is still connected.
    pub fn is_connected(&self) -> bool {
        !self.conn.peer_gone()
    }

    /// The call eventfd, which the back end signals when it has used buffers (for a
    /// reactor, [`crate::reactor`]).
    pub fn call_event(&self) -> &EventFd {
        &self.call
    }

    /// The connection's socket, which hangs up when the back end goes away.
    pub(crate) fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the connection owns the socket (inside its `Frontend`) and keeps it open
        // for as long as it lives, which `self.conn` guarantees for the borrow.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.conn.sock) }
    }

    /// Waits until the ring has used buffers (`has_used`), the back end disconnects, the
    /// queue breaks, or `deadline` passes.
    pub fn wait(&mut self, mode: WaitMode, deadline: Option<Instant>) -> Result<(), Error> {
        self.wait_with(mode, |_| deadline)
    }

    /// Like [`Self::wait`], with the deadline worked out by `deadline` from the wait's first
    /// clock reading. A busy-polling wait reads the clock only every 64 spins, so a caller
    /// with a relative timeout reads no clock at all when the buffer comes within them.
    pub(crate) fn wait_with(
        &mut self,
        mode: WaitMode,
        deadline: impl FnOnce(Instant) -> Option<Instant>,
    ) -> Result<(), Error> {
        if self.vq.has_used() {
            return Ok(());
        }
        if mode == WaitMode::Sleep {
            let now = Instant::now();
            return self.sleep(deadline(now), now);
        }
        let mut deadline = Some(deadline);
        // (first clock reading, deadline), set at the first clock reading.
        let mut clock: Option<(Instant, Option<Instant>)> = None;
        let mut spins = 0u32;
        loop {
            if self.vq.has_used() {
                return Ok(());
            }
            if self.vq.is_broken() {
                return Err(self.broken_error());
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            let (start, deadline) = *clock.get_or_insert_with(|| (now, deadline.take().and_then(|f| f(now))));
            let spin_until = match mode {
                WaitMode::Hybrid(d) => Some(start + d),
                _ => None,
            };
            if let Some(d) = deadline {
                if now >= d {
                    return Err(Error::Timeout(now - start));
                }
            }
            match spin_until {
                Some(t) if now >= t => return self.sleep(deadline, start),
                _ => {
                    // Only a wait that has spun a while asks the socket: a live back end
                    // answers in microseconds, so a busy queue makes no syscall here, and a
                    // dead one leaves the wait spinning until it checks.
                    if now.duration_since(start) >= SOCKET_CHECK_INTERVAL
                        && now.duration_since(self.sock_check) >= SOCKET_CHECK_INTERVAL
                    {
                        self.sock_check = now;
                        if self.conn.peer_gone() {
                            return Err(Error::Disconnected);
                        }
                    }
                    std::hint::spin_loop();
                }
            }
        }
    }

    /// Sleeps on the call eventfd, interrupts enabled (Linux's `enable_cb_prepare` then
    /// `poll` before sleeping, so no used buffer slips between the check and the sleep).
    fn sleep(&mut self, deadline: Option<Instant>, start: Instant) -> Result<(), Error> {
        loop {
            let snapshot = self.vq.enable_cb_prepare();
            if self.vq.poll(snapshot) || self.vq.has_used() {
                self.vq.disable_cb();
                return Ok(());
            }
            if self.vq.is_broken() {
                return Err(self.broken_error());
            }
            let timeout_ms = match deadline {
                None => -1,
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        self.vq.disable_cb();
                        return Err(Error::Timeout(now - start));
                    }
                    (d - now).as_millis().clamp(1, i32::MAX as u128) as i32
                }
            };
            let mut fds = [
                libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.conn.sock, events: libc::POLLRDHUP, revents: 0 },
            ];
            // SAFETY: two valid pollfds in a local array.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    self.vq.disable_cb();
                    return Err(Error::EventFd(e));
                }
            }
            if fds[1].revents != 0 {
                self.conn.dead.store(true, Ordering::Relaxed);
                self.vq.disable_cb();
                // Used buffers that arrived before the hang-up still count.
                return if self.vq.has_used() { Ok(()) } else { Err(Error::Disconnected) };
            }
            if fds[0].revents & libc::POLLIN != 0 {
                // Non-blocking: consumes the count; EAGAIN means someone else did.
                let _ = self.call.read();
            }
        }
    }

    /// Stops the ring on the back end (`GET_VRING_BASE`) and returns its next available
    /// index. Buffers still in flight stay in the ring; take them back with
    /// `vq_mut().detach_unused_buf()`.
    pub fn stop(&mut self) -> Result<u32, Error> {
        if !self.started {
            return Err(Error::QueueBroken(Broken::Stopped));
        }
        self.started = false;
        let i = self.index as usize;
        let r = self.conn.control("GET_VRING_BASE", |fe| fe.get_vring_base(i));
        self.vq.break_queue();
        r
    }

    /// Marks the ring and everything in flight as possibly still written by the device:
    /// the ring memory is not given back to the allocator when the queue is dropped.
    pub fn leak_on_drop(&self) {
        self.leak.store(true, Ordering::Relaxed);
    }
}

impl<T> Drop for Queue<T> {
    fn drop(&mut self) {
        let in_flight = self.vq.num_free() < self.vq.vring_size();
        if self.started {
            self.started = false;
            if !self.conn.stop_in_teardown(self.index) {
                // Not acknowledged: the back end may still be using the ring.
                self.leak_on_drop();
            }
        }
        if in_flight {
            // The back end may still complete them (QEMU finishes requests in flight after
            // GET_VRING_BASE): keep the ring out of the allocator.
            self.leak_on_drop();
        }
    }
}
