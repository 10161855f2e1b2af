//! A virtio-blk driver (VIRTIO 1.3, section 5.2) over a vhost-user connection.
//!
//! A request is three parts in one descriptor chain (5.2.6):
//!
//! ```text
//! device-readable   struct virtio_blk_req header { le32 type; le32 reserved; le64 sector; }
//!                   [discard / write-zeroes: struct virtio_blk_discard_write_zeroes]
//!                   [write: the data]
//! device-writable   [read, get-id: the data]
//!                   u8 status   (OK 0, IOERR 1, UNSUPP 2)
//! ```
//!
//! Each [`BlkQueue`] keeps a table of request slots, one per ring entry. The slot index is
//! the ring token, so a completion finds its request directly, whatever order the device
//! completes in: one slow request does not hold up the others. Each slot has a fixed piece
//! of guest memory for its header, discard range and status byte. The status byte is set to
//! `0xff` before the request goes out; a completion that leaves it there never had its
//! status written, and fails with [`RequestError::NoStatus`].
//!
//! Data travels in [`DmaBuffer`]s (guest memory) that requests take by value and
//! completions hand back: zero copy. The `*_at` helpers (`read_at`, `write_at`, ...) copy
//! through a bounce buffer and wait for their own request, for simple synchronous use.
//!
//! If the back end disconnects or stops answering, every request in flight completes with
//! an error ([`RequestError::Disconnected`], [`RequestError::TimedOut`]) and the queue
//! refuses new ones. Buffers of such requests are not handed back: the device may still
//! write them, so they stay out of the allocator until the memory itself is dropped.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtq::{AddErrorKind, Features, Sg};

use crate::frontend::{self, ConnectOptions, Connection, Queue, WaitMode};
use crate::memory::{DmaBuffer, MemoryConfig, SharedMemory};
use crate::reactor::AsyncVhostQueue;

pub use crate::virtio_blk::{ID_BYTES, SECTOR as SECTOR_SIZE};

pub use crate::virtio_blk::feature;

/// The virtio-blk features this driver uses when offered.
pub const DRIVER_FEATURES: u64 = feature::SIZE_MAX
    | feature::SEG_MAX
    | feature::GEOMETRY
    | feature::RO
    | feature::BLK_SIZE
    | feature::FLUSH
    | feature::TOPOLOGY
    | feature::CONFIG_WCE
    | feature::MQ
    | feature::DISCARD
    | feature::WRITE_ZEROES;

use crate::virtio_blk::{req as req_type, status, WRITE_ZEROES_FLAG_UNMAP};
/// What the status byte holds until the device writes it: not a valid status.
const STATUS_UNWRITTEN: u8 = 0xff;

/// Most data segments this driver puts in one request, whatever the device's `seg_max`.
///
/// Each ring entry has an indirect table preallocated for the longest request (16 bytes a
/// segment, plus header, range and status), so the pool grows with `seg_max`: a legal
/// `seg_max` of 65535 would take about 268 MB per 256-entry queue, and connecting would
/// fail. 256 segments is 1 MiB of 4 KiB pages, the most the `*_at` helpers send in one
/// request, and keeps the pool at about 1 MiB per 256 entries. Requests with more
/// segments are refused ([`BlkError::InvalidRequest`]) before they reach the ring.
pub const MAX_SEGMENTS: u32 = 256;

/// Bytes of config space read: `struct virtio_blk_config` up to and including
/// `write_zeroes_may_unmap` and its padding (the fields every virtio-blk device has).
pub const CONFIG_SIZE: u32 = 60;

/// Per-slot control block in guest memory: header at 0, discard/write-zeroes range at 16,
/// status at 32. 64 bytes, so each slot has its own cache line.
const SLOT_CTL: usize = 64;
const CTL_DWZ: usize = 16;
const CTL_STATUS: usize = 32;

/// `struct virtio_blk_config` (VIRTIO 1.3, 5.2.4). Fields whose feature was not negotiated
/// hold whatever the device put there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment, in bytes (`SIZE_MAX`).
    pub size_max: u32,
    /// Most data segments in one request (`SEG_MAX`).
    pub seg_max: u32,
    /// Cylinders, heads, sectors (`GEOMETRY`).
    pub geometry: (u16, u8, u8),
    /// Block size in bytes (`BLK_SIZE`).
    pub blk_size: u32,
    /// log2 of logical blocks per physical block (`TOPOLOGY`).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block (`TOPOLOGY`).
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in blocks (`TOPOLOGY`).
    pub min_io_size: u16,
    /// Optimal sustained I/O size in blocks (`TOPOLOGY`).
    pub opt_io_size: u32,
    /// Writeback cache mode (`CONFIG_WCE`).
    pub writeback: u8,
    /// Number of request queues (`MQ`).
    pub num_queues: u16,
    /// Most sectors in one discard segment (`DISCARD`).
    pub max_discard_sectors: u32,
    /// Most segments in one discard request (`DISCARD`).
    pub max_discard_seg: u32,
    /// Discard alignment in sectors (`DISCARD`).
    pub discard_sector_alignment: u32,
    /// Most sectors in one write-zeroes segment (`WRITE_ZEROES`).
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one write-zeroes request (`WRITE_ZEROES`).
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes with unmap may deallocate (`WRITE_ZEROES`).
    pub write_zeroes_may_unmap: bool,
}

impl BlkConfig {
    /// Parses the little-endian config space; missing bytes read as zero.
    pub fn parse(bytes: &[u8]) -> Self {
        let mut b = [0u8; CONFIG_SIZE as usize];
        let n = bytes.len().min(b.len());
        b[..n].copy_from_slice(&bytes[..n]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        Self {
            capacity: u64::from_le_bytes(b[0..8].try_into().unwrap_or_default()),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            geometry: (u16_at(16), b[18], b[19]),
            blk_size: u32_at(20),
            physical_block_exp: b[24],
            alignment_offset: b[25],
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            writeback: b[32],
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56] != 0,
        }
    }
}

/// What the driver knows about the device after connecting.
#[derive(Clone, Debug)]
pub struct BlkInfo {
    /// The config space.
    pub config: BlkConfig,
    /// The negotiated features (ring and blk bits).
    pub features: Features,
    /// Queues the device has.
    pub device_queues: u16,
    /// Queues this driver set up.
    pub queues: u16,
    /// Entries per ring.
    pub queue_size: u16,
}

impl BlkInfo {
    /// Whether a blk feature bit was negotiated.
    pub fn has(&self, bit: u64) -> bool {
        self.features.bits() & bit != 0
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.config.capacity.saturating_mul(SECTOR_SIZE)
    }

    /// Logical block size (512 unless `BLK_SIZE` says otherwise).
    pub fn block_size(&self) -> u32 {
        if self.has(feature::BLK_SIZE) && self.config.blk_size >= 512 {
            self.config.blk_size
        } else {
            512
        }
    }

    /// Most data segments per request: `seg_max`, or 1 without `SEG_MAX` (as Linux), and
    /// never more than [`MAX_SEGMENTS`]; without indirect descriptors also what fits in the
    /// ring beside header and status.
    pub fn max_segments(&self) -> u32 {
        let seg_max = if self.has(feature::SEG_MAX) { self.config.seg_max.clamp(1, MAX_SEGMENTS) } else { 1 };
        if self.features.contains(Features::INDIRECT_DESC) {
            seg_max
        } else {
            seg_max.min(self.queue_size as u32 - 2)
        }
    }

    /// Largest segment in bytes: `size_max` with `SIZE_MAX`, otherwise unlimited.
    pub fn max_segment_size(&self) -> u32 {
        if self.has(feature::SIZE_MAX) && self.config.size_max > 0 {
            self.config.size_max
        } else {
            u32::MAX
        }
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.has(feature::RO)
    }

    /// The blk feature bits that were negotiated, by name.
    pub fn feature_names(&self) -> Vec<&'static str> {
        feature::NAMES.iter().filter(|(bit, _)| self.has(*bit)).map(|(_, n)| *n).collect()
    }
}

/// How to connect to a virtio-blk device.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    /// Queues to set up; 0 means every queue the device has.
    pub queues: u16,
    /// Ring entries per queue (a power of two).
    pub queue_size: u16,
    /// Negotiate `EVENT_IDX` if offered.
    pub event_idx: bool,
    /// Negotiate `INDIRECT_DESC` if offered.
    pub indirect_desc: bool,
    /// Negotiate `RING_PACKED` if offered (the packed layout).
    pub ring_packed: bool,
    /// Negotiate `IN_ORDER` if offered.
    pub in_order: bool,
    /// Feature bits the device must offer (virtio numbering), on top of `VERSION_1`.
    pub required_features: u64,
    /// Guest memory shared with the device (rings, control blocks, data buffers).
    pub memory: MemoryConfig,
    /// How long one vhost-user control request may take.
    pub control_timeout: Duration,
    /// How long requests may be in flight without any of them completing before the
    /// queue gives up on the device.
    pub request_timeout: Duration,
    /// How to wait for completions.
    pub wait: WaitMode,
    /// Check requests against the config space (alignment, capacity, limits) before
    /// sending them. Off, the device judges them (for tests of the device's answers).
    pub validate: bool,
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            queues: 1,
            queue_size: 256,
            event_idx: true,
            indirect_desc: true,
            ring_packed: true,
            in_order: true,
            required_features: 0,
            memory: MemoryConfig::default(),
            control_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            wait: WaitMode::Sleep,
            validate: true,
        }
    }
}

/// Why one request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// `VIRTIO_BLK_S_IOERR`.
    #[error("the device reported an I/O error (VIRTIO_BLK_S_IOERR)")]
    IoError,
    /// `VIRTIO_BLK_S_UNSUPP`.
    #[error("the device does not support this request (VIRTIO_BLK_S_UNSUPP)")]
    Unsupported,
    /// The device returned the buffer without writing its status byte.
    #[error("the device completed the request without writing its status byte")]
    NoStatus,
    /// The status byte holds a value that is not a status.
    #[error("the device wrote an invalid status byte {0:#04x}")]
    BadStatus(u8),
    /// The back end went away with the request in flight.
    #[error("the vhost-user back end disconnected before completing the request")]
    Disconnected,
    /// No request completed for this long; the queue gave up on the device.
    #[error("no completion within {0:?}; the queue gave up on the device")]
    TimedOut(Duration),
    /// The virtqueue broke (the device broke the ring protocol, or it was stopped).
    #[error("the virtqueue broke: {0}")]
    QueueBroken(#[source] frontend::Broken),
    /// The transport failed otherwise (an eventfd, a timeout of the control socket).
    #[error("the vhost-user transport failed: {0}")]
    Transport(#[source] TransportFailure),
    /// A read the device reported done without writing all its data: the used length
    /// (data and status) is short, so the buffer holds stale bytes.
    #[error("the device completed a read with a used length of {used} bytes; its {expected} bytes of data and status were not all written")]
    ShortRead {
        /// Data bytes asked for, plus the status byte.
        expected: u32,
        /// The used length the device reported.
        used: u32,
    },
}

/// A transport error shared by every request it failed (requests are `Clone`; the error is
/// not). Two are equal when they are the same failure.
#[derive(Clone, Debug, thiserror::Error)]
#[error(transparent)]
pub struct TransportFailure(pub std::sync::Arc<frontend::Error>);

impl PartialEq for TransportFailure {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TransportFailure {}

/// A transport failure, as the requests it fails see it.
impl From<frontend::Error> for RequestError {
    fn from(e: frontend::Error) -> Self {
        match e {
            frontend::Error::Disconnected => Self::Disconnected,
            frontend::Error::QueueBroken(reason) => Self::QueueBroken(reason),
            other => Self::Transport(TransportFailure(std::sync::Arc::new(other))),
        }
    }
}

/// The result a status byte stands for (VIRTIO 1.3, 5.2.6).
pub fn status_result(status: u8) -> Result<(), RequestError> {
    match status {
        status::OK => Ok(()),
        status::IOERR => Err(RequestError::IoError),
        status::UNSUPP => Err(RequestError::Unsupported),
        STATUS_UNWRITTEN => Err(RequestError::NoStatus),
        other => Err(RequestError::BadStatus(other)),
    }
}

/// Errors of the virtio-blk driver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlkError {
    /// The vhost-user transport failed.
    #[error(transparent)]
    Transport(#[from] frontend::Error),
    /// A request failed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The request is malformed or outside the device (only with `validate`).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The device did not offer the feature the request needs.
    #[error("the device does not offer {0}")]
    NotSupported(&'static str),
    /// A write to a read-only device.
    #[error("the device is read-only")]
    ReadOnly,
    /// No free ring entry; reap completions first.
    #[error("the queue is full")]
    QueueFull,
    /// More queues requested than the device has.
    #[error("{requested} queues requested, the device has {available}")]
    TooManyQueues {
        /// Asked for.
        requested: u16,
        /// What the device has.
        available: u16,
    },
    /// Guest memory is exhausted.
    #[error("guest memory is full ({0} bytes requested)")]
    OutOfMemory(usize),
    /// The caller's wait ran out.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `VIRTIO_BLK_T_IN`: read into the buffers.
    Read,
    /// `VIRTIO_BLK_T_OUT`: write the buffers.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_DISCARD` of `num_sectors` at `sector`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES` of `num_sectors` at `sector`.
    WriteZeroes {
        /// Let the device deallocate.
        unmap: bool,
    },
    /// `VIRTIO_BLK_T_GET_ID`: the id string into the buffer.
    GetId,
    /// Any other type, with the buffers device-readable (for tests of `UNSUPP`).
    #[doc(hidden)]
    Raw(u32),
}

/// One request: build with [`Request::read`], [`Request::write`], ...
#[derive(Debug)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// First sector (read, write, discard, write-zeroes).
    pub sector: u64,
    /// Sectors for discard and write-zeroes.
    pub num_sectors: u32,
    /// Data buffers (read, write, get-id). Each may become several segments if it is
    /// longer than `size_max`.
    pub bufs: Vec<DmaBuffer>,
    /// Returned in the completion.
    pub user_data: u64,
}

impl Request {
    /// Read `bufs` (total a multiple of 512 bytes) from `sector`.
    pub fn read(sector: u64, bufs: Vec<DmaBuffer>, user_data: u64) -> Self {
        Self { op: Op::Read, sector, num_sectors: 0, bufs, user_data }
    }

    /// Write `bufs` (total a multiple of 512 bytes) at `sector`.
    pub fn write(sector: u64, bufs: Vec<DmaBuffer>, user_data: u64) -> Self {
        Self { op: Op::Write, sector, num_sectors: 0, bufs, user_data }
    }

    /// Flush the device's write cache.
    pub fn flush(user_data: u64) -> Self {
        Self { op: Op::Flush, sector: 0, num_sectors: 0, bufs: Vec::new(), user_data }
    }

    /// Discard `num_sectors` at `sector`.
    pub fn discard(sector: u64, num_sectors: u32, user_data: u64) -> Self {
        Self { op: Op::Discard, sector, num_sectors, bufs: Vec::new(), user_data }
    }

    /// Write zeroes over `num_sectors` at `sector`.
    pub fn write_zeroes(sector: u64, num_sectors: u32, unmap: bool, user_data: u64) -> Self {
        Self { op: Op::WriteZeroes { unmap }, sector, num_sectors, bufs: Vec::new(), user_data }
    }

    /// Read the device id (up to 20 bytes) into `buf`.
    pub fn get_id(buf: DmaBuffer, user_data: u64) -> Self {
        Self { op: Op::GetId, sector: 0, num_sectors: 0, bufs: vec![buf], user_data }
    }
}

/// A request that could not be submitted, with the request handed back.
#[derive(Debug)]
pub struct SubmitError {
    /// Why.
    pub error: BlkError,
    /// The request, buffers and all.
    pub request: Request,
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for SubmitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl From<SubmitError> for BlkError {
    fn from(e: SubmitError) -> Self {
        e.error
    }
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The request's `user_data`.
    pub user_data: u64,
    /// What the request did.
    pub op: Op,
    /// Success, or why not.
    pub result: Result<(), RequestError>,
    /// The request's buffers, handed back (empty if the request was abandoned: the
    /// device may still write them).
    pub bufs: Vec<DmaBuffer>,
    /// Bytes the device reports having written (data and status).
    pub len: u32,
    seq: u64,
}

/// A caller's time limit on a wait, fixed to an instant at the wait's first clock reading.
#[derive(Clone, Copy, Debug)]
enum Limit {
    None,
    After(Duration),
    At(Instant),
}

impl Limit {
    /// The deadline; an `After` becomes `At(now + duration)`.
    fn resolve(&mut self, now: Instant) -> Option<Instant> {
        if let Limit::After(d) = *self {
            *self = now.checked_add(d).map_or(Limit::None, Limit::At);
        }
        match *self {
            Limit::At(t) => Some(t),
            _ => None,
        }
    }
}

/// A request in flight, by slot (the ring token).
struct Slot {
    /// Whether the slot holds a request in flight (the ring returns each token once, so
    /// this only guards against a slot completed twice by `abort_all` and the ring).
    active: bool,
    op: Op,
    user_data: u64,
    /// Numbers requests for `run`, which waits for its own.
    seq: u64,
    /// The least used length that completes the request: for a read, its data and the
    /// status byte (VIRTIO 1.3, 2.7.8: the used length is what the device wrote); 0 for
    /// others, whose status byte says all.
    min_used: u32,
    /// Empty (and unallocated) while the slot is free.
    bufs: Vec<DmaBuffer>,
}

impl Default for Slot {
    fn default() -> Self {
        Self { active: false, op: Op::Flush, user_data: 0, seq: 0, min_used: 0, bufs: Vec::new() }
    }
}

/// A connected virtio-blk device: its config and its queues.
pub struct BlkDevice {
    conn: Connection,
    info: Arc<BlkInfo>,
    queues: Vec<BlkQueue>,
}

impl fmt::Debug for BlkDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlkDevice").field("info", &self.info).finish_non_exhaustive()
    }
}

impl BlkDevice {
    /// Connects to the vhost-user-blk back end at `path` and sets up `opts.queues` queues.
    pub fn connect(path: impl AsRef<std::path::Path>, opts: &BlkOptions) -> Result<Self, BlkError> {
        let (conn, info, indirect_max) = Self::negotiate(path.as_ref(), opts)?;
        let queues = (0..info.queues)
            .map(|i| {
                let q = conn.create_queue::<u16>(i, info.queue_size, indirect_max)?;
                BlkQueue::new(q, info.clone(), opts)
            })
            .collect::<Result<Vec<_>, BlkError>>()?;
        Ok(Self { conn, info, queues })
    }

    /// Connects like [`Self::connect`], with queues whose requests are awaited
    /// ([`AsyncBlkQueue`]) instead; the device then has no [`BlkQueue`]s to take. Run a
    /// reactor for each queue ([`crate::reactor`]), for instance
    /// `tokio::spawn(reactor::drive(queue.queue().clone()))`.
    pub fn connect_async(
        path: impl AsRef<std::path::Path>,
        opts: &BlkOptions,
    ) -> Result<(Self, Vec<AsyncBlkQueue>), BlkError> {
        let (conn, info, indirect_max) = Self::negotiate(path.as_ref(), opts)?;
        let queues = (0..info.queues)
            .map(|i| AsyncBlkQueue::new(conn.create_queue::<u16>(i, info.queue_size, indirect_max)?, info.clone()))
            .collect::<Result<Vec<_>, BlkError>>()?;
        Ok((Self { conn, info, queues: Vec::new() }, queues))
    }

    /// The handshake, the config space, and how many queues of which size: the
    /// connection, what the device is, and the longest indirect table a request needs.
    fn negotiate(path: &std::path::Path, opts: &BlkOptions) -> Result<(Connection, Arc<BlkInfo>, u16), BlkError> {
        let conn = Connection::connect(
            path,
            &ConnectOptions {
                driver_features: DRIVER_FEATURES,
                required_features: opts.required_features,
                event_idx: opts.event_idx,
                indirect_desc: opts.indirect_desc,
                ring_packed: opts.ring_packed,
                in_order: opts.in_order,
                config_size: CONFIG_SIZE,
                memory: opts.memory,
                timeout: opts.control_timeout,
            },
        )?;
        let config = BlkConfig::parse(conn.config());
        let features = conn.features();
        let mut device_queues = if features.bits() & feature::MQ != 0 { config.num_queues.max(1) } else { 1 };
        if let Some(n) = conn.max_queues() {
            device_queues = device_queues.min(n.max(1));
        }
        let queues = match opts.queues {
            0 => device_queues,
            n if n > device_queues => return Err(BlkError::TooManyQueues { requested: n, available: device_queues }),
            n => n,
        };
        let info = Arc::new(BlkInfo { config, features, device_queues, queues, queue_size: opts.queue_size.max(2) });
        let indirect_max = (info.max_segments() + 3).min(u16::MAX as u32) as u16;
        Ok((conn, info, indirect_max))
    }

    /// What the device is.
    pub fn info(&self) -> &BlkInfo {
        &self.info
    }

    /// The queues not yet taken.
    pub fn take_queues(&mut self) -> Vec<BlkQueue> {
        std::mem::take(&mut self.queues)
    }

    /// The guest memory, to allocate data buffers.
    pub fn memory(&self) -> &Arc<SharedMemory> {
        self.conn.memory()
    }

    /// The vhost-user connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// One virtio-blk request queue. Move it to the thread that uses it.
pub struct BlkQueue {
    q: Queue<u16>,
    info: Arc<BlkInfo>,
    /// The control blocks of all slots (header, range, status); `None` once leaked.
    ctl: Option<DmaBuffer>,
    ctl_host: usize,
    ctl_gpa: u64,
    slots: Vec<Slot>,
    free_slots: Vec<u16>,
    in_flight: usize,
    /// The segments of the request being submitted: device-readable first, then
    /// device-writable (one list, split where the direction changes).
    sgs: Vec<Sg>,
    /// `info.max_segment_size()`, `info.max_segments()` and `info.read_only()`, worked out
    /// once.
    max_seg: usize,
    max_segs: usize,
    read_only: bool,
    /// For `submit`'s usual request: the largest buffer that is one data segment
    /// (`max_seg`, or 0 if a request may have no data segment), and the capacity.
    one_seg_max: usize,
    capacity: u64,
    /// Completions taken off the ring but not yet handed out: those `run` set aside while
    /// waiting for its own, and those `abort_all` failed. `wait` and `poll` reap straight
    /// into the caller's vector otherwise.
    ready: Vec<Completion>,
    unkicked: bool,
    wait: WaitMode,
    request_timeout: Duration,
    validate: bool,
    failed: Option<RequestError>,
    /// The number of the last request submitted (`run` reads it after its `submit`).
    seq: u64,
}

impl fmt::Debug for BlkQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlkQueue")
            .field("index", &self.q.index())
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl BlkQueue {
    fn new(q: Queue<u16>, info: Arc<BlkInfo>, opts: &BlkOptions) -> Result<Self, BlkError> {
        let n = q.vq().vring_size() as usize;
        let bytes = n * SLOT_CTL;
        let ctl = q.memory().alloc_zeroed_buffer(bytes).ok_or(BlkError::OutOfMemory(bytes))?;
        Ok(Self {
            ctl_host: ctl.as_ptr() as usize,
            ctl_gpa: ctl.gpa(),
            ctl: Some(ctl),
            slots: (0..n).map(|_| Slot::default()).collect(),
            free_slots: (0..n as u16).rev().collect(),
            in_flight: 0,
            // Header, range, status and the data segments of a valid request: no growth.
            sgs: Vec::with_capacity(info.max_segments().min(1024) as usize + 3),
            max_seg: info.max_segment_size() as usize,
            max_segs: info.max_segments() as usize,
            read_only: info.read_only(),
            one_seg_max: if info.max_segments() >= 1 { info.max_segment_size() as usize } else { 0 },
            capacity: info.config.capacity,
            ready: Vec::with_capacity(n),
            unkicked: false,
            wait: opts.wait,
            request_timeout: opts.request_timeout,
            validate: opts.validate,
            failed: None,
            seq: 0,
            q,
            info,
        })
    }

    /// The queue's index in the device.
    pub fn index(&self) -> u16 {
        self.q.index()
    }

    /// What the device is.
    pub fn info(&self) -> &BlkInfo {
        &self.info
    }

    /// The guest memory, to allocate data buffers.
    pub fn memory(&self) -> &Arc<SharedMemory> {
        self.q.memory()
    }

    /// Allocates a data buffer of `len` bytes in guest memory.
    pub fn alloc(&self, len: usize) -> Result<DmaBuffer, BlkError> {
        self.q.memory().alloc(len).ok_or(BlkError::OutOfMemory(len))
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Requests that can still be submitted now (free slots).
    pub fn free_slots(&self) -> usize {
        self.free_slots.len()
    }

    /// Changes how completions are waited for.
    pub fn set_wait_mode(&mut self, wait: WaitMode) {
        self.wait = wait;
    }

    /// Whether the queue gave up on the device (disconnect, timeout, broken ring): then
    /// every request fails with this error.
    pub fn failure(&self) -> Option<&RequestError> {
        self.failed.as_ref()
    }

    #[inline(never)]
    fn check_all(&self, req: &Request) -> Result<(), BlkError> {
        let info = &*self.info;
        let sectors_ok = |sector: u64, n: u64| sector.checked_add(n).is_some_and(|end| end <= info.config.capacity);
        // Data length and segment count in one pass over the buffers.
        let max_seg = self.max_seg;
        let (mut data_len, mut segs) = (0u64, 0usize);
        for b in &req.bufs {
            let n = b.len();
            data_len += n as u64;
            // No division for the usual buffer that fits one segment.
            segs += if n <= max_seg { usize::from(n != 0) } else { n.div_ceil(max_seg) };
        }
        match req.op {
            Op::Read | Op::Write => {
                if req.op == Op::Write && info.read_only() {
                    return Err(BlkError::ReadOnly);
                }
                let len = data_len;
                if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
                    return Err(BlkError::InvalidRequest(format!(
                        "data length {len} is not a positive multiple of {SECTOR_SIZE}"
                    )));
                }
                if !sectors_ok(req.sector, len / SECTOR_SIZE) {
                    return Err(BlkError::InvalidRequest(format!(
                        "sectors {}..{} are beyond the capacity of {} sectors",
                        req.sector,
                        req.sector.saturating_add(len / SECTOR_SIZE),
                        info.config.capacity
                    )));
                }
            }
            Op::Flush => {
                if !info.has(feature::FLUSH) {
                    return Err(BlkError::NotSupported("FLUSH"));
                }
            }
            Op::Discard | Op::WriteZeroes { .. } => {
                let (bit, name, max) = if req.op == Op::Discard {
                    (feature::DISCARD, "DISCARD", info.config.max_discard_sectors)
                } else {
                    (feature::WRITE_ZEROES, "WRITE_ZEROES", info.config.max_write_zeroes_sectors)
                };
                if !info.has(bit) {
                    return Err(BlkError::NotSupported(name));
                }
                if info.read_only() {
                    return Err(BlkError::ReadOnly);
                }
                if req.num_sectors == 0 || (max > 0 && req.num_sectors > max) {
                    return Err(BlkError::InvalidRequest(format!(
                        "{name} of {} sectors (the device allows 1 to {max})",
                        req.num_sectors
                    )));
                }
                if !sectors_ok(req.sector, req.num_sectors as u64) {
                    return Err(BlkError::InvalidRequest(format!(
                        "{name} of sectors {}..{} is beyond the capacity of {} sectors",
                        req.sector,
                        req.sector + req.num_sectors as u64,
                        info.config.capacity
                    )));
                }
            }
            Op::GetId => {
                if data_len == 0 {
                    return Err(BlkError::InvalidRequest("GET_ID needs a buffer".into()));
                }
            }
            Op::Raw(_) => {}
        }
        if segs > self.max_segs {
            return Err(BlkError::InvalidRequest(format!(
                "{segs} data segments, at most {} are sent (seg_max, capped at {MAX_SEGMENTS})",
                self.max_segs
            )));
        }
        Ok(())
    }

    /// Puts a request in the ring without notifying the device; call [`Self::kick`] (or a
    /// wait, which kicks first) to send it. Fails with the request handed back.
    ///
    /// Submit a batch, then kick once: the device is notified (if it asks to be) once per
    /// batch, not per request.
    #[inline]
    pub fn submit(&mut self, req: Request) -> Result<(), SubmitError> {
        // The usual request: a read or write of one buffer that fits one segment, whole
        // sectors, within the capacity. It passes every check, so it goes straight to the
        // ring whether or not `validate` is on; anything else, valid or not, takes the
        // general path and its checks.
        if let [b] = &req.bufs[..] {
            let n = b.len();
            let read = req.op == Op::Read;
            if (read || (req.op == Op::Write && !self.read_only))
                && n.wrapping_sub(1) < self.one_seg_max
                && (n as u64).is_multiple_of(SECTOR_SIZE)
                && req.sector.checked_add(n as u64 / SECTOR_SIZE).is_some_and(|end| end <= self.capacity)
                && self.failed.is_none()
            {
                let data = Sg::new(b.gpa(), n as u32);
                return if read { self.submit_one::<true>(req, data) } else { self.submit_one::<false>(req, data) };
            }
        }
        self.submit_general(req)
    }

    /// The usual request (see `submit`): header, one data segment, status. One function
    /// each for reads and writes: each then has one `add` whose segment lists the compiler
    /// knows (two calls in one function were merged into one that reads them from memory).
    #[inline(never)]
    fn submit_one<const READ: bool>(&mut self, req: Request, data: Sg) -> Result<(), SubmitError> {
        let Some(slot) = self.free_slots.pop() else {
            return Err(SubmitError { error: BlkError::QueueFull, request: req });
        };
        let (header, status) = self.write_ctl(slot, if READ { req_type::IN } else { req_type::OUT }, req.sector);
        let (header, data, status) = ([header], [data], [status]);
        let vq = self.q.vq_mut();
        let added = if READ {
            vq.add_sgs_premapped(&[&header], &[&data, &status], slot)
        } else {
            vq.add_sgs_premapped(&[&header, &data], &[&status], slot)
        };
        self.submitted(slot, req, added.map_err(|e| e.kind))
    }

    /// Every other request, checked first with `validate`.
    #[inline(never)]
    fn submit_general(&mut self, req: Request) -> Result<(), SubmitError> {
        if let Some(e) = &self.failed {
            return Err(SubmitError { error: e.clone().into(), request: req });
        }
        if self.validate {
            if let Err(error) = self.check_all(&req) {
                return Err(SubmitError { error, request: req });
            }
        }
        let Some(slot) = self.free_slots.pop() else {
            return Err(SubmitError { error: BlkError::QueueFull, request: req });
        };
        let (ty, sector) = match req.op {
            Op::Read => (req_type::IN, req.sector),
            Op::Write => (req_type::OUT, req.sector),
            Op::Flush => (req_type::FLUSH, 0),
            Op::Discard => (req_type::DISCARD, 0),
            Op::WriteZeroes { .. } => (req_type::WRITE_ZEROES, 0),
            Op::GetId => (req_type::GET_ID, 0),
            Op::Raw(t) => (t, req.sector),
        };
        let (header, status) = self.write_ctl(slot, ty, sector);
        let ctl_off = slot as usize * SLOT_CTL;
        let dwz = matches!(req.op, Op::Discard | Op::WriteZeroes { .. });
        if dwz {
            let flags = if matches!(req.op, Op::WriteZeroes { unmap: true }) { WRITE_ZEROES_FLAG_UNMAP } else { 0 };
            let mut range = [0u8; 16];
            range[0..8].copy_from_slice(&req.sector.to_le_bytes());
            range[8..12].copy_from_slice(&req.num_sectors.to_le_bytes());
            range[12..16].copy_from_slice(&flags.to_le_bytes());
            let host = (self.ctl_host + ctl_off + CTL_DWZ) as *mut u8;
            // SAFETY: bytes 16..32 of the slot's control block, inside `ctl` (see
            // `write_ctl`); the slot is free, so no request in flight points there.
            unsafe { std::ptr::copy_nonoverlapping(range.as_ptr(), host, 16) };
        }

        // The chain as one list: header [range] [data the device reads] | [data the
        // device writes] status, split where the device-writable part begins.
        let device_writes = matches!(req.op, Op::Read | Op::GetId);
        let max_seg = self.max_seg;
        let sgs = &mut self.sgs;
        sgs.clear();
        sgs.push(header);
        if dwz {
            sgs.push(Sg::new(self.ctl_gpa + (ctl_off + CTL_DWZ) as u64, 16));
        }
        let mut split = sgs.len();
        for b in &req.bufs {
            let (addr, len) = (b.gpa(), b.len());
            let mut off = 0;
            while off < len {
                let n = (len - off).min(max_seg);
                sgs.push(Sg::new(addr + off as u64, n as u32));
                off += n;
            }
        }
        if !device_writes {
            split = sgs.len();
        }
        sgs.push(status);
        let (out, ins) = sgs.split_at(split);
        let added = self.q.vq_mut().add_sgs_premapped(&[out], &[ins], slot);
        self.submitted(slot, req, added.map_err(|e| e.kind))
    }

    /// Writes the header and the unwritten status byte of `slot`'s control block; returns
    /// the header's and the status byte's segments.
    #[inline(always)]
    fn write_ctl(&mut self, slot: u16, ty: u32, sector: u64) -> (Sg, Sg) {
        let ctl_off = slot as usize * SLOT_CTL;
        let host = (self.ctl_host + ctl_off) as *mut u8;
        // The header as two little-endian words: type with the zero `reserved` above it,
        // then the sector.
        // SAFETY: the slot's control block lies inside `ctl` (n slots of SLOT_CTL bytes,
        // `slot < n`), which this queue owns; the slot is free, so the device has no request
        // that points into it.
        unsafe {
            host.cast::<u64>().write_unaligned((ty as u64).to_le());
            host.add(8).cast::<u64>().write_unaligned(sector.to_le());
            std::ptr::write_volatile(host.add(CTL_STATUS), STATUS_UNWRITTEN);
        }
        let gpa = self.ctl_gpa + ctl_off as u64;
        (Sg::new(gpa, 16), Sg::new(gpa + CTL_STATUS as u64, 1))
    }

    /// Records the request in `slot` once the ring took it, or frees the slot and hands
    /// the request back.
    #[inline(always)]
    fn submitted(&mut self, slot: u16, req: Request, added: Result<(), AddErrorKind>) -> Result<(), SubmitError> {
        match added {
            Ok(()) => {
                self.in_flight += 1;
                self.unkicked = true;
                self.seq += 1;
                let s = &mut self.slots[slot as usize];
                s.active = true;
                s.user_data = req.user_data;
                s.op = req.op;
                s.seq = self.seq;
                s.min_used = if req.op == Op::Read {
                    req.bufs.iter().fold(1u32, |n, b| n.saturating_add(b.len() as u32))
                } else {
                    0
                };
                // A free slot's vector is empty (completions take it).
                s.bufs = req.bufs;
                Ok(())
            }
            Err(kind) => {
                self.free_slots.push(slot);
                let error = match kind {
                    AddErrorKind::NoSpace => BlkError::QueueFull,
                    AddErrorKind::Broken => match &self.failed {
                        Some(f) => f.clone().into(),
                        None => RequestError::QueueBroken(self.q.broken_reason()).into(),
                    },
                    kind => RequestError::QueueBroken(frontend::Broken::Refused(kind)).into(),
                };
                Err(SubmitError { error, request: req })
            }
        }
    }

    /// Notifies the device of submitted requests (if it wants a notification).
    #[inline]
    pub fn kick(&mut self) -> Result<(), BlkError> {
        if std::mem::take(&mut self.unkicked) {
            self.notify_device();
        }
        Ok(())
    }

    /// The kick proper, out of line so that the check above inlines into `wait`: the ring
    /// decides whether the device wants a notification and sends it. A failed
    /// notification fails every request.
    fn notify_device(&mut self) {
        if let Err(e) = self.q.kick() {
            self.abort_all(e.into());
        }
    }

    /// Takes every used buffer off the ring and appends its completion to `out`; returns
    /// how many. Inlined into the waits: once per batch, its call frame cost as much as
    /// the loop's bookkeeping.
    #[inline(always)]
    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let before = out.len();
        while let Some(used) = self.q.vq_mut().get_buf() {
            let slot = used.token;
            let s = &mut self.slots[slot as usize];
            if !s.active {
                continue;
            }
            s.active = false;
            let host = (self.ctl_host + slot as usize * SLOT_CTL + CTL_STATUS) as *const u8;
            // SAFETY: the status byte of the slot's control block, inside `ctl`; the device
            // is done with the request (the ring returned it), and `get_buf` ordered its
            // writes before this read.
            let status = unsafe { std::ptr::read_volatile(host) };
            // The usual OK first: the full match costs a dozen instructions. An OK read
            // whose used length does not cover its data left stale bytes in the buffer.
            let result = if status != status::OK {
                status_result(status)
            } else if used.len < s.min_used {
                Err(RequestError::ShortRead { expected: s.min_used, used: used.len })
            } else {
                Ok(())
            };
            out.push(Completion {
                user_data: s.user_data,
                op: s.op,
                result,
                bufs: std::mem::take(&mut s.bufs),
                len: used.len,
                seq: s.seq,
            });
            self.free_slots.push(slot);
            self.in_flight -= 1;
        }
        out.len() - before
    }

    /// Moves the ready list to the end of `out`. Usually empty: checked inline, as
    /// `Vec::append` makes a call even then.
    #[inline]
    fn take_ready(&mut self, out: &mut Vec<Completion>) {
        if !self.ready.is_empty() {
            out.append(&mut self.ready);
        }
    }

    /// Reaps into the ready list (for `run` and `abort_all`).
    fn collect(&mut self) {
        let mut ready = std::mem::take(&mut self.ready);
        self.reap(&mut ready);
        self.ready = ready;
    }

    /// Fails every request in flight with `err`, and every later one: the device is gone
    /// or cannot be trusted to complete them. The failed completions go to the ready list.
    fn abort_all(&mut self, err: RequestError) {
        self.collect();
        self.failed.get_or_insert(err.clone());
        self.q.vq().break_queue();
        self.q.leak_on_drop();
        while let Some(slot) = self.q.vq_mut().detach_unused_buf() {
            let s = &mut self.slots[slot as usize];
            if !s.active {
                continue;
            }
            s.active = false;
            // The device may still write these: keep them out of the allocator.
            std::mem::take(&mut s.bufs).into_iter().for_each(DmaBuffer::leak);
            self.ready.push(Completion {
                user_data: s.user_data,
                op: s.op,
                result: Err(err.clone()),
                bufs: Vec::new(),
                len: 0,
                seq: s.seq,
            });
            self.in_flight -= 1;
        }
        if let Some(ctl) = self.ctl.take() {
            ctl.leak();
        }
        // Slots stay unusable: `failed` refuses new requests.
    }

    /// Reaps into `out` until it holds `min` completions beyond its first `start`, or
    /// nothing is in flight. `limit` is the caller's; the request timeout (no completion
    /// for that long) applies as well. Both count from the first clock reading of a wait
    /// (see `Queue::wait_with`), so a busy-polling wait whose completion comes within its
    /// first spins reads no clock. Requests failed by `abort_all` are left in the ready
    /// list, for the caller to take.
    fn wait_into(
        &mut self,
        out: &mut Vec<Completion>,
        start: usize,
        min: usize,
        limit: &mut Limit,
    ) -> Result<(), BlkError> {
        let request_timeout = self.request_timeout;
        let mut waiting_since: Option<Instant> = None;
        loop {
            if self.reap(out) > 0 {
                // The request timeout counts from the last completion.
                waiting_since = None;
            }
            if out.len() - start >= min || self.in_flight == 0 {
                return Ok(());
            }
            let until = |now: Instant| {
                let give_up = waiting_since.get_or_insert(now).checked_add(request_timeout);
                match (limit.resolve(now), give_up) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            match self.q.wait_with(self.wait, until) {
                Ok(()) => {}
                Err(frontend::Error::Timeout(_)) => {
                    let now = Instant::now();
                    let since = *waiting_since.get_or_insert(now);
                    if now.duration_since(since) >= request_timeout {
                        self.abort_all(RequestError::TimedOut(request_timeout));
                        return Ok(());
                    }
                    if limit.resolve(now).is_some_and(|d| now >= d) {
                        return Err(BlkError::Timeout(now - since));
                    }
                }
                Err(frontend::Error::Disconnected) => {
                    self.abort_all(RequestError::Disconnected);
                    return Ok(());
                }
                Err(e) => {
                    self.abort_all(e.into());
                    return Ok(());
                }
            }
        }
    }

    /// Kicks, then waits until at least one more completion is in the ready list or
    /// nothing is in flight (for `run`).
    fn wait_ready(&mut self) -> Result<(), BlkError> {
        self.kick()?;
        let mut ready = std::mem::take(&mut self.ready);
        let start = ready.len();
        let r = self.wait_into(&mut ready, start, 1, &mut Limit::None);
        // Requests that `abort_all` failed meanwhile went to the (emptied) ready list.
        ready.append(&mut self.ready);
        self.ready = ready;
        r
    }

    /// Takes the completions that are ready now, without waiting (kicks first).
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, BlkError> {
        self.kick()?;
        let start = out.len();
        self.take_ready(out);
        self.reap(out);
        Ok(out.len() - start)
    }

    /// Waits until at least `min` completions are ready (fewer if fewer requests are in
    /// flight), then moves all ready ones to `out`. Kicks first. `timeout` bounds the wait
    /// (`BlkError::Timeout`); the request timeout still applies without it. A busy-polling
    /// wait starts counting at its first clock reading, after up to 64 spins.
    ///
    /// Completions go straight from the ring into `out`: one move each.
    pub fn wait(
        &mut self,
        min: usize,
        out: &mut Vec<Completion>,
        timeout: Option<Duration>,
    ) -> Result<usize, BlkError> {
        self.kick()?;
        let start = out.len();
        // Those set aside by `run` or failed by `abort_all` first, as they came.
        self.take_ready(out);
        let mut limit = timeout.map_or(Limit::None, Limit::After);
        if let Err(e) = self.wait_into(out, start, min, &mut limit) {
            // Nothing is handed out with an error: what this call took stays ready for the
            // next `wait` or `poll` (the ready list is empty here: only `abort_all` fills
            // it, and then the wait ends without an error).
            self.ready.extend(out.drain(start..));
            return Err(e);
        }
        self.take_ready(out);
        Ok(out.len() - start)
    }

    /// Submits `req` and waits for it alone; other completions stay ready for `poll`/`wait`.
    pub fn run(&mut self, mut req: Request) -> Result<Completion, BlkError> {
        let seq = loop {
            match self.submit(req) {
                Ok(()) => break self.seq,
                Err(SubmitError { error: BlkError::QueueFull, request }) if self.in_flight > 0 => {
                    req = request;
                    self.wait_ready()?;
                }
                Err(e) => return Err(e.error),
            }
        };
        loop {
            if let Some(i) = self.ready.iter().position(|c| c.seq == seq) {
                return Ok(self.ready.remove(i));
            }
            self.wait_ready()?;
        }
    }

    /// Largest transfer the `*_at` helpers send in one request.
    fn chunk_bytes(&self) -> usize {
        let limit = self.info.max_segments() as u64 * self.info.max_segment_size() as u64;
        (limit.min(1 << 20) as usize / SECTOR_SIZE as usize * SECTOR_SIZE as usize).max(SECTOR_SIZE as usize)
    }

    fn sector_of(offset: u64) -> Result<u64, BlkError> {
        if !offset.is_multiple_of(SECTOR_SIZE) {
            return Err(BlkError::InvalidRequest(format!("offset {offset} is not a multiple of {SECTOR_SIZE}")));
        }
        Ok(offset / SECTOR_SIZE)
    }

    /// Reads `buf.len()` bytes (a multiple of 512) at byte `offset` (a multiple of 512),
    /// through a bounce buffer.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        let sector = Self::sector_of(offset)?;
        let chunk = self.chunk_bytes();
        let mut bounce = self.alloc(chunk.min(buf.len()).max(1))?;
        for (i, part) in buf.chunks_mut(chunk).enumerate() {
            bounce.set_len(part.len());
            let c = self.run(Request::read(sector + (i * chunk) as u64 / SECTOR_SIZE, vec![bounce], 0))?;
            c.result?;
            bounce = c.bufs.into_iter().next().ok_or(RequestError::Disconnected)?;
            part.copy_from_slice(&bounce);
        }
        Ok(())
    }

    /// Writes `buf` (a multiple of 512 bytes) at byte `offset` (a multiple of 512), through
    /// a bounce buffer.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlkError> {
        let sector = Self::sector_of(offset)?;
        let chunk = self.chunk_bytes();
        let mut bounce = self.alloc(chunk.min(buf.len()).max(1))?;
        for (i, part) in buf.chunks(chunk).enumerate() {
            bounce.set_len(part.len());
            bounce.copy_from_slice(part);
            let c = self.run(Request::write(sector + (i * chunk) as u64 / SECTOR_SIZE, vec![bounce], 0))?;
            c.result?;
            bounce = c.bufs.into_iter().next().ok_or(RequestError::Disconnected)?;
        }
        Ok(())
    }

    /// Flushes the write cache. Without `FLUSH` the device has none to flush
    /// (VIRTIO 1.3, 5.2.5) and this does nothing.
    pub fn flush(&mut self) -> Result<(), BlkError> {
        if !self.info.has(feature::FLUSH) {
            return Ok(());
        }
        Ok(self.run(Request::flush(0))?.result?)
    }

    fn ranged(&mut self, offset: u64, len: u64, op: Op) -> Result<(), BlkError> {
        let mut sector = Self::sector_of(offset)?;
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlkError::InvalidRequest(format!("length {len} is not a multiple of {SECTOR_SIZE}")));
        }
        let max = match op {
            Op::Discard => self.info.config.max_discard_sectors,
            _ => self.info.config.max_write_zeroes_sectors,
        };
        let max = if max == 0 { u32::MAX } else { max } as u64;
        let mut left = len / SECTOR_SIZE;
        while left > 0 {
            let n = left.min(max) as u32;
            let req = Request { op, sector, num_sectors: n, bufs: Vec::new(), user_data: 0 };
            self.run(req)?.result?;
            sector += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    /// Discards `len` bytes at `offset` (both multiples of 512), split to the device's
    /// `max_discard_sectors`. Needs `DISCARD`.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlkError> {
        self.ranged(offset, len, Op::Discard)
    }

    /// Writes zeroes over `len` bytes at `offset` (both multiples of 512), split to the
    /// device's `max_write_zeroes_sectors`. Needs `WRITE_ZEROES`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), BlkError> {
        self.ranged(offset, len, Op::WriteZeroes { unmap })
    }

    /// The device id string (`GET_ID`; up to 20 bytes, NUL-padded).
    pub fn get_id(&mut self) -> Result<String, BlkError> {
        let mut buf = self.alloc(ID_BYTES)?;
        buf.fill(0);
        let c = self.run(Request::get_id(buf, 0))?;
        c.result?;
        let buf = c.bufs.into_iter().next().ok_or(RequestError::Disconnected)?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    /// Waits for the requests in flight (up to `timeout`), then stops the ring on the back
    /// end (`GET_VRING_BASE`). Completions still ready are dropped.
    pub fn close(mut self, timeout: Duration) -> Result<(), BlkError> {
        let mut sink = Vec::new();
        let pending = self.in_flight;
        if pending > 0 {
            self.wait(pending, &mut sink, Some(timeout))?;
        }
        if self.failed.is_none() {
            self.q.stop()?;
        }
        Ok(())
    }
}

impl Drop for BlkQueue {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            // The device may still complete these and write their buffers and status
            // bytes: keep all of it out of the allocator.
            self.q.leak_on_drop();
            for s in &mut self.slots {
                std::mem::take(&mut s.bufs).into_iter().for_each(DmaBuffer::leak);
            }
            if let Some(ctl) = self.ctl.take() {
                ctl.leak();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Async requests: each awaited on its own, through `crate::reactor`.

/// What an async request owns while it is in flight: its control block (header at 0,
/// status byte at `CTL_STATUS`) and its data buffer. The queue holds it until the device
/// returns the request, even if the request's future is dropped first.
pub struct BlkIo {
    ctl: DmaBuffer,
    data: DmaBuffer,
}

/// A failed async request: why, and its data buffer when it came back. A request that was
/// in the ring when the device was lost keeps its buffer out of reach (the device may still
/// write it), as a dropped request does.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct AsyncBlkError {
    /// Why.
    #[source]
    pub error: BlkError,
    /// The request's data buffer, if it came back.
    pub buf: Option<DmaBuffer>,
}

/// A virtio-blk queue whose requests are awaited, any number at a time: `read` and `write`
/// are futures that resolve when the device completes them, and a request that finds the
/// ring full waits for space. Clones share the queue (one per task). Some reactor must
/// run the queue's interrupt path: [`crate::reactor::drive`] on tokio, or a
/// [`crate::reactor::Reactor`] thread, on [`Self::queue`].
#[derive(Clone)]
pub struct AsyncBlkQueue {
    queue: Arc<AsyncVhostQueue<BlkIo>>,
    info: Arc<BlkInfo>,
    /// Control blocks of completed requests, for the next ones (no allocation per request).
    ctl_pool: Arc<parking_lot::Mutex<Vec<DmaBuffer>>>,
}

impl fmt::Debug for AsyncBlkQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncBlkQueue").field("in_flight", &self.queue.in_flight()).finish_non_exhaustive()
    }
}

impl AsyncBlkQueue {
    fn new(q: Queue<u16>, info: Arc<BlkInfo>) -> Result<Self, BlkError> {
        let n = 2 * q.vq().vring_size() as usize;
        let ctl = (0..n)
            .map(|_| q.memory().alloc(SLOT_CTL).ok_or(BlkError::OutOfMemory(SLOT_CTL)))
            .collect::<Result<_, _>>()?;
        let queue = AsyncVhostQueue::new(q).map_err(|e| BlkError::InvalidRequest(e.to_string()))?;
        Ok(Self { queue: Arc::new(queue), info, ctl_pool: Arc::new(parking_lot::Mutex::new(ctl)) })
    }

    /// The async queue, for the reactor.
    pub fn queue(&self) -> &Arc<AsyncVhostQueue<BlkIo>> {
        &self.queue
    }

    /// What the device is.
    pub fn info(&self) -> &BlkInfo {
        &self.info
    }

    /// Allocates a data buffer of `len` bytes in guest memory.
    pub fn alloc(&self, len: usize) -> Result<DmaBuffer, BlkError> {
        self.queue.with_queue(|q| q.memory().alloc(len)).ok_or(BlkError::OutOfMemory(len))
    }

    /// Reads `buf.len()` bytes (a multiple of 512, one segment) at `sector` into `buf`, and
    /// hands it back.
    pub async fn read(&self, sector: u64, buf: DmaBuffer) -> Result<DmaBuffer, AsyncBlkError> {
        self.transfer::<true>(sector, buf).await
    }

    /// Writes `buf` (a multiple of 512 bytes, one segment) at `sector`, and hands it back.
    pub async fn write(&self, sector: u64, buf: DmaBuffer) -> Result<DmaBuffer, AsyncBlkError> {
        self.transfer::<false>(sector, buf).await
    }

    async fn transfer<const READ: bool>(&self, sector: u64, buf: DmaBuffer) -> Result<DmaBuffer, AsyncBlkError> {
        let n = buf.len() as u64;
        let refuse = |error, buf| Err(AsyncBlkError { error, buf: Some(buf) });
        if !READ && self.info.read_only() {
            return refuse(BlkError::ReadOnly, buf);
        }
        if n == 0 || !n.is_multiple_of(SECTOR_SIZE) || n > self.info.max_segment_size() as u64 {
            let why = format!("{n} bytes: a positive multiple of {SECTOR_SIZE} in one segment is needed");
            return refuse(BlkError::InvalidRequest(why), buf);
        }
        if sector.checked_add(n / SECTOR_SIZE).is_none_or(|end| end > self.info.config.capacity) {
            let why = format!("sectors from {sector} are beyond the capacity of {}", self.info.config.capacity);
            return refuse(BlkError::InvalidRequest(why), buf);
        }
        let mut ctl = match self.ctl_pool.lock().pop() {
            Some(ctl) => ctl,
            None => match self.alloc(SLOT_CTL) {
                Ok(ctl) => ctl,
                Err(error) => return refuse(error, buf),
            },
        };
        let ty = if READ { req_type::IN } else { req_type::OUT };
        ctl[..4].copy_from_slice(&ty.to_le_bytes());
        ctl[4..8].fill(0);
        ctl[8..16].copy_from_slice(&sector.to_le_bytes());
        ctl[CTL_STATUS] = STATUS_UNWRITTEN;
        let (header, data, status) =
            ([Sg::new(ctl.gpa(), 16)], [buf.sg()], [Sg::new(ctl.gpa() + CTL_STATUS as u64, 1)]);
        let io = BlkIo { ctl, data: buf };
        let done = if READ {
            self.queue.submit_premapped(&[&header], &[&data, &status], io).await
        } else {
            self.queue.submit_premapped(&[&header, &data], &[&status], io).await
        };
        match done {
            Ok(used) => {
                let BlkIo { ctl, data: buf } = used.token;
                let status = ctl[CTL_STATUS];
                self.ctl_pool.lock().push(ctl);
                // As for the synchronous queue: an OK read whose used length does not
                // cover its data and status left stale bytes in the buffer.
                let expected = if READ { n as u32 + 1 } else { 0 };
                let result = if status != status::OK {
                    status_result(status)
                } else if used.len < expected {
                    Err(RequestError::ShortRead { expected, used: used.len })
                } else {
                    Ok(())
                };
                match result {
                    Ok(()) => Ok(buf),
                    Err(e) => Err(AsyncBlkError { error: e.into(), buf: Some(buf) }),
                }
            }
            Err(e) => {
                let connected = self.queue.with_queue(|q| q.is_connected());
                let error = if connected {
                    RequestError::QueueBroken(self.queue.with_queue(|q| q.broken_reason()))
                } else {
                    RequestError::Disconnected
                };
                Err(AsyncBlkError { error: error.into(), buf: e.buf.map(|io| io.data) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// `?` into `Box<dyn Error>` keeps the chain down to the ring's own reason.
    #[test]
    fn errors_keep_their_sources() {
        use std::error::Error;
        let fault = virtq::Fault::UsedIdOutOfRange { id: 9 };
        let request: RequestError = frontend::Error::QueueBroken(frontend::Broken::Fault(fault)).into();
        assert_eq!(request, RequestError::QueueBroken(frontend::Broken::Fault(fault)));
        let boxed: Box<dyn Error> = Box::new(BlkError::from(request));
        let mut chain = Vec::new();
        let mut e: Option<&dyn Error> = Some(&*boxed);
        while let Some(err) = e {
            chain.push(err.to_string());
            e = err.source();
        }
        assert!(chain.last().unwrap().contains("used id 9"), "{chain:?}");
        let eventfd: RequestError = frontend::Error::EventFd(std::io::Error::other("gone")).into();
        assert!(matches!(eventfd, RequestError::Transport(_)));
        assert!(eventfd.source().and_then(|s| s.source()).is_some_and(|s| s.to_string() == "gone"));
    }

    use super::*;

    #[test]
    fn status_bytes_5_2_6() {
        assert_eq!(status_result(0), Ok(()));
        assert_eq!(status_result(1), Err(RequestError::IoError));
        assert_eq!(status_result(2), Err(RequestError::Unsupported));
        assert_eq!(status_result(STATUS_UNWRITTEN), Err(RequestError::NoStatus));
        assert_eq!(status_result(3), Err(RequestError::BadStatus(3)));
    }

    #[test]
    fn config_layout_5_2_4() {
        let mut b = [0u8; 60];
        b[0..8].copy_from_slice(&131072u64.to_le_bytes());
        b[12..16].copy_from_slice(&126u32.to_le_bytes());
        b[20..24].copy_from_slice(&4096u32.to_le_bytes());
        b[34..36].copy_from_slice(&4u16.to_le_bytes());
        b[36..40].copy_from_slice(&32768u32.to_le_bytes());
        b[48..52].copy_from_slice(&65536u32.to_le_bytes());
        b[56] = 1;
        let c = BlkConfig::parse(&b);
        assert_eq!(c.capacity, 131072);
        assert_eq!(c.seg_max, 126);
        assert_eq!(c.blk_size, 4096);
        assert_eq!(c.num_queues, 4);
        assert_eq!(c.max_discard_sectors, 32768);
        assert_eq!(c.max_write_zeroes_sectors, 65536);
        assert!(c.write_zeroes_may_unmap);
        assert_eq!(BlkConfig::parse(&b[..8]).capacity, 131072);
    }
}
