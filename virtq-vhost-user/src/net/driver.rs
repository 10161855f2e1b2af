//! A virtio-net driver (VIRTIO 1.3, section 5.1) over a vhost-user connection.
//!
//! [`NetDevice::connect`] negotiates the features, works out the config space and sets up
//! the queue pairs; each [`QueuePair`] is a receive queue ([`RxQueue`]) and a transmit
//! queue ([`TxQueue`]), each a `virtq` ring of its own that can move to its own thread.
//!
//! **Transmit.** Every ring entry has a slot of guest memory: the 12-byte
//! `virtio_net_hdr_v1` (written once: this driver asks for no offloads, so it is all
//! zeroes) followed by room for one frame. [`TxQueue::send_with`] lets the caller write
//! each frame straight into its slot and posts the burst with one `add_outbufs` (one
//! descriptor per frame, one publish per burst); [`TxQueue::send`] copies frames in.
//! [`TxQueue::send_buffer`] sends a frame that already lies in guest memory without
//! copying it: the header slot and the frame go out as a two-segment chain (indirect when
//! negotiated), and the buffer comes back through [`TxQueue::take_sent_buffers`].
//! Completions are reclaimed in bursts (`get_bufs`) when slots run short.
//!
//! **Receive.** A pool of equal buffers (2 KiB each with `MRG_RXBUF`, else header plus the
//! largest frame) keeps the ring full: refills are burst adds (`add_inbufs`).
//! [`RxQueue::recv`] takes used buffers in bursts (`get_bufs`), hands each frame to the
//! caller in place ([`RxFrame`]: the header and the frame's segments, no copy), and
//! reposts the buffers when the caller is done. With `MRG_RXBUF` a frame spans
//! `num_buffers` buffers and is handed over as their segments, in order.
//!
//! **Lengths the device reports are checked** before anything is read by them:
//!
//! | the device says                                    | outcome                                 |
//! |----------------------------------------------------|-----------------------------------------|
//! | a used length beyond the buffer                    | the ring latches broken (`virtq` core)  |
//! | a used length shorter than the 12-byte header      | [`DeviceFault::HeaderTruncated`]        |
//! | `num_buffers` 0                                    | [`DeviceFault::ZeroBuffers`]            |
//! | `num_buffers` more than were posted                | [`DeviceFault::BuffersBeyondPosted`]    |
//! | `num_buffers` more than it has returned            | [`DeviceFault::MissingBuffers`]         |
//! | a checksum or GSO header beyond the frame          | [`DeviceFault::HeaderBeyondFrame`]      |
//!
//! Each stops the queue with an error ([`NetError::Queue`]); the device cannot be trusted
//! with the rest of the ring any more, and the buffers it still holds come back with
//! [`RxQueue::stop`]. Every buffer is accounted for at any time ([`RxQueue::buffers`],
//! [`TxQueue::slots`]): free, taken back but not yet handed out, or posted. Without
//! `MRG_RXBUF`, `num_buffers` is ignored, as Linux does: the spec requires 1 there, but
//! devices long wrote 0 (Linux's vhost-net until 2025).
//!
//! **The control queue.** A vhost-user net back end never sees the control queue: the
//! frontend owns it (QEMU's virtio-net and DPDK's virtio-user both answer it themselves
//! and turn `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` into `SET_VRING_ENABLE` on the data rings).
//! This driver is its own frontend, so it does the same directly: it creates and enables
//! the rings of exactly the queue pairs asked for. `CTRL_VQ` is negotiated because `MQ`
//! depends on it (5.1.3.1); without `CTRL_VQ` only one pair is used.
//!
//! **The config space.** Read with `GET_CONFIG` when the back end offers the `CONFIG`
//! protocol feature. Many net back ends (DPDK's vhost library among them) do not: their
//! config space lives in the frontend, so this driver fills it in itself, as QEMU and
//! virtio-user do: the MAC from [`NetOptions::mac`] or a random locally administered one,
//! the link up while the socket is connected, the MTU from [`NetOptions::mtu`], and the
//! queue pairs from `GET_QUEUE_NUM` (which net back ends answer in pairs).
//!
//! **Stopping.** [`RxQueue::stop`] and [`TxQueue::stop`] stop one ring with
//! `GET_VRING_BASE`. Some back ends take that as the whole device stopping (DPDK's vhost
//! library does): stop the queues of a device only once all of its pairs are done.
//!
//! Nothing on the packet path allocates: the slot tables, segment lists and staging
//! arrays are sized for the ring when the queue is created.

use std::fmt;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtq::{AddErrorKind, Features, Sg};

use super::wire::{self, feature, HeaderError, NetConfig, NetHdr};
use crate::frontend::{self, ConnectOptions, Connection, Queue, WaitMode};
use crate::memory::{DmaBuffer, MemoryConfig, SharedMemory};

/// The virtio-net features this driver can use, negotiated when offered (unless
/// [`NetOptions::features`] leaves them out).
pub const DRIVER_FEATURES: u64 =
    feature::MAC | feature::STATUS | feature::MTU | feature::MRG_RXBUF | feature::CTRL_VQ | feature::MQ;

/// Ethernet header plus one VLAN tag: what a frame may have beyond the MTU (Linux's
/// `ETH_HLEN + VLAN_HLEN`).
pub const L2_OVERHEAD: usize = 18;

/// Receive buffer size with `MRG_RXBUF` (header included), as DPDK's default mbuf.
pub const DEFAULT_MERGEABLE_BUF: u32 = 2048;

/// Buffers are laid out on this boundary, so that no two share a cache line.
const BUF_ALIGN: usize = 64;

/// Where a receive buffer starts within its line: its header fills the line's end.
const RX_HEADER_OFFSET: usize = BUF_ALIGN - NetHdr::SIZE;
const _: () = assert!(RX_HEADER_OFFSET.is_multiple_of(4), "the header is read as three aligned u32");

/// How to connect to a virtio-net device.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// Queue pairs to set up; 0 means every pair the device has.
    pub queue_pairs: u16,
    /// Ring entries per queue (a power of two).
    pub queue_size: u16,
    /// The virtio-net features to negotiate if offered; bits outside [`DRIVER_FEATURES`]
    /// are ignored.
    pub features: u64,
    /// Negotiate `VIRTIO_F_RING_PACKED` if offered.
    pub packed: bool,
    /// Negotiate `VIRTIO_F_IN_ORDER` if offered.
    pub in_order: bool,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` if offered.
    pub event_idx: bool,
    /// Negotiate `VIRTIO_RING_F_INDIRECT_DESC` if offered.
    pub indirect_desc: bool,
    /// Feature bits the device must offer (any, virtio numbering), on top of `VERSION_1`.
    pub required_features: u64,
    /// The MAC address when the device has none to offer.
    pub mac: Option<[u8; 6]>,
    /// The MTU when the frontend owns the config space (the device gives none); also the
    /// driver's own limit when `MTU` is not negotiated.
    pub mtu: u16,
    /// Bytes per receive buffer with `MRG_RXBUF`, header included (at least 64).
    pub mergeable_buf_len: u32,
    /// Largest frame [`TxQueue::send_with`] and [`TxQueue::send`] take, at most the MTU
    /// plus [`L2_OVERHEAD`] (the default). Smaller slots keep a small-frame workload in
    /// fewer cache lines and pages.
    pub max_tx_frame: Option<usize>,
    /// Guest memory shared with the device; by default sized for the queue pairs asked
    /// for (for 4 with `queue_pairs` 0: give more for a device with more).
    pub memory: Option<MemoryConfig>,
    /// How long one vhost-user control request may take.
    pub control_timeout: Duration,
}

impl Default for NetOptions {
    fn default() -> Self {
        Self {
            queue_pairs: 1,
            queue_size: 256,
            features: DRIVER_FEATURES,
            packed: true,
            in_order: true,
            event_idx: true,
            indirect_desc: true,
            required_features: 0,
            mac: None,
            mtu: 1500,
            mergeable_buf_len: DEFAULT_MERGEABLE_BUF,
            max_tx_frame: None,
            memory: None,
            control_timeout: Duration::from_secs(5),
        }
    }
}

/// What the driver knows about the device after connecting.
#[derive(Clone, Debug)]
pub struct NetInfo {
    /// The negotiated features (ring and net bits).
    pub features: Features,
    /// The config space as the driver uses it (see `config_from_device`).
    pub config: NetConfig,
    /// Whether the config space came from the device (`GET_CONFIG`); otherwise the driver
    /// filled it in as the frontend.
    pub config_from_device: bool,
    /// The MAC address in use.
    pub mac: [u8; 6],
    /// The MTU, if `MTU` was negotiated.
    pub mtu: Option<u16>,
    /// Queue pairs the device has.
    pub max_queue_pairs: u16,
    /// Queue pairs this driver set up.
    pub queue_pairs: u16,
    /// Entries per ring.
    pub queue_size: u16,
    /// Bytes per receive buffer, header included.
    pub rx_buf_len: u32,
    /// Largest frame the driver sends or expects (MTU plus [`L2_OVERHEAD`]).
    pub max_frame: usize,
    /// Largest frame one transmit slot holds.
    pub max_tx_frame: usize,
}

impl NetInfo {
    /// Whether a net feature bit was negotiated.
    pub fn has(&self, bit: u64) -> bool {
        self.features.bits() & bit != 0
    }

    /// Whether received frames may span several buffers (`MRG_RXBUF`).
    pub fn mergeable(&self) -> bool {
        self.has(feature::MRG_RXBUF)
    }

    /// The net feature bits that were negotiated, by name.
    pub fn feature_names(&self) -> Vec<&'static str> {
        feature::NAMES.iter().filter(|(bit, _)| self.has(*bit)).map(|(_, n)| *n).collect()
    }

    /// Whether the link is up: the config's `status` with `STATUS`, else up (5.1.4.2).
    pub fn link_up(&self) -> bool {
        !self.has(feature::STATUS) || self.config.status & wire::status::LINK_UP != 0
    }
}

/// How the device broke the virtio-net protocol on a receive queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceFault {
    /// The ring itself: a used id or length the ring cannot have (a used length beyond
    /// the buffer is one).
    #[error("{0}")]
    Ring(virtq::Fault),
    /// A used buffer shorter than the header.
    #[error("the device returned a {len}-byte buffer, shorter than the {}-byte header", NetHdr::SIZE)]
    HeaderTruncated {
        /// The used length.
        len: u32,
    },
    /// `num_buffers` of 0.
    #[error("the header says the packet spans 0 buffers")]
    ZeroBuffers,
    /// `num_buffers` beyond the buffers the device holds.
    #[error("the header says the packet spans {num_buffers} buffers, only {posted} were posted")]
    BuffersBeyondPosted {
        /// The header's `num_buffers`.
        num_buffers: u16,
        /// Buffers the device held, this one included.
        posted: usize,
    },
    /// `num_buffers` beyond the buffers the device has returned (it must return all of a
    /// packet's buffers together, 5.1.6.4.2).
    #[error("the header says the packet spans {num_buffers} buffers, the device returned {arrived}")]
    MissingBuffers {
        /// The header's `num_buffers`.
        num_buffers: u16,
        /// Buffers returned, this one included.
        arrived: usize,
    },
    /// A header whose checksum or GSO fields point beyond the frame.
    #[error(transparent)]
    HeaderBeyondFrame(#[from] HeaderError),
}

/// Why a queue stopped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The device broke the protocol.
    #[error("the device broke the virtio-net protocol: {0}")]
    Device(#[from] DeviceFault),
    /// The back end went away.
    #[error("the vhost-user back end disconnected")]
    Disconnected,
    /// The ring latched broken for a reason other than the device (a failed kick, a stop).
    #[error("the virtqueue is broken: {0}")]
    Broken(#[source] frontend::Broken),
    /// The queue was stopped with [`RxQueue::stop`] or [`TxQueue::stop`].
    #[error("the queue was stopped")]
    Stopped,
}

/// Errors of the virtio-net driver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The vhost-user transport failed.
    #[error(transparent)]
    Transport(#[from] frontend::Error),
    /// The queue stopped; every later call fails the same way.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// More queue pairs asked for than the device has.
    #[error("{requested} queue pairs requested, the device has {available}")]
    TooManyQueuePairs {
        /// Asked for.
        requested: u16,
        /// What the device has (1 without `MQ` and `CTRL_VQ`).
        available: u16,
    },
    /// Options that cannot work.
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// Guest memory is exhausted.
    #[error("guest memory is full ({0} bytes requested)")]
    OutOfMemory(usize),
    /// A frame longer than the queue takes.
    #[error("a {len}-byte frame is longer than the {max} bytes this queue sends")]
    FrameTooLong {
        /// The frame's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No free descriptor or slot now; reclaim completions first.
    #[error("the transmit queue is full")]
    QueueFull,
    /// The wait ran out.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// Where a queue's buffers are: every one is in exactly one place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferCount {
    /// Buffers (receive) or slots (transmit) the queue owns.
    pub total: usize,
    /// Ready for use.
    pub free: usize,
    /// Taken back from the device but not yet handed to the caller (receive only).
    pub held: usize,
    /// With the device (posted, not yet used).
    pub posted: usize,
}

impl BufferCount {
    /// Whether the parts add up to the total.
    pub fn balanced(&self) -> bool {
        self.free + self.held + self.posted == self.total
    }
}

/// Counters of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Frames sent or received.
    pub frames: u64,
    /// Frame bytes (headers not counted).
    pub bytes: u64,
    /// Buffers used (receive: more than frames with `MRG_RXBUF`).
    pub buffers: u64,
}

/// A connected virtio-net device: its features, config and queue pairs.
pub struct NetDevice {
    conn: Connection,
    info: NetInfo,
    pairs: Vec<QueuePair>,
}

impl fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetDevice").field("info", &self.info).finish_non_exhaustive()
    }
}

/// One receive and one transmit queue.
#[derive(Debug)]
pub struct QueuePair {
    /// receiveqN.
    pub rx: RxQueue,
    /// transmitqN.
    pub tx: TxQueue,
}

/// A random MAC address, locally administered and unicast.
fn random_mac() -> [u8; 6] {
    use std::hash::{BuildHasher, Hasher};
    // RandomState's keys come from the system's random source.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let r = h.finish().to_le_bytes();
    [0x02, r[0], r[1], r[2], r[3], r[4]]
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl NetDevice {
    /// Connects to the vhost-user-net back end at `path` and sets up the queue pairs.
    pub fn connect(path: impl AsRef<std::path::Path>, opts: &NetOptions) -> Result<Self, NetError> {
        let size = opts.queue_size;
        if size < 2 || !size.is_power_of_two() {
            return Err(NetError::InvalidOptions(format!("queue size {size} is not a power of two of at least 2")));
        }
        if opts.mergeable_buf_len < 64 {
            return Err(NetError::InvalidOptions(format!(
                "mergeable receive buffers of {} bytes are too small (at least 64)",
                opts.mergeable_buf_len
            )));
        }
        if opts.mtu < 68 {
            return Err(NetError::InvalidOptions(format!("an MTU of {} is below the minimum of 68", opts.mtu)));
        }
        let mut net = opts.features & DRIVER_FEATURES;
        if net & feature::CTRL_VQ == 0 {
            // MQ depends on CTRL_VQ (5.1.3.1).
            net &= !feature::MQ;
        }

        // Memory for the worst case of the options: every pair, receive buffers without
        // MRG_RXBUF (each a line more, for its offset), transmit slots for the largest
        // frame, rings and slack.
        let frame_guess = opts.mtu as usize + L2_OVERHEAD;
        let buf_guess = round_up(NetHdr::SIZE + frame_guess, BUF_ALIGN).max(opts.mergeable_buf_len as usize);
        let pairs_guess = if opts.queue_pairs == 0 { 4 } else { opts.queue_pairs as usize };
        let per_pair = size as usize * (2 * buf_guess + BUF_ALIGN + 64 * 16);
        let memory = opts
            .memory
            .unwrap_or(MemoryConfig { size: (pairs_guess * per_pair + (8 << 20)).max(16 << 20), regions: 1 });

        let conn = Connection::connect(
            path,
            &ConnectOptions {
                driver_features: net,
                required_features: opts.required_features,
                event_idx: opts.event_idx,
                indirect_desc: opts.indirect_desc,
                ring_packed: opts.packed,
                in_order: opts.in_order,
                config_size: 0,
                memory,
                timeout: opts.control_timeout,
            },
        )?;
        let features = conn.features();
        let has = |bit: u64| features.bits() & bit != 0;

        let device_config = if conn.protocol_features().contains(VhostUserProtocolFeatures::CONFIG) {
            conn.read_config(0, wire::CONFIG_SIZE as u32).ok().map(|b| NetConfig::parse(&b))
        } else {
            None
        };
        let config_from_device = device_config.is_some();
        let mut config = device_config.unwrap_or_default();
        if !config_from_device || !has(feature::MAC) {
            config.mac = opts.mac.unwrap_or_else(random_mac);
        }
        if !config_from_device {
            config.status = wire::status::LINK_UP;
            config.mtu = opts.mtu;
            // Net back ends answer GET_QUEUE_NUM in queue pairs (QEMU and DPDK read it so).
            config.max_virtqueue_pairs = conn.max_queues().unwrap_or(1).max(1);
        }
        let max_queue_pairs = if has(feature::MQ) { config.max_virtqueue_pairs.max(1) } else { 1 };
        let queue_pairs = match opts.queue_pairs {
            0 => max_queue_pairs,
            n if n > max_queue_pairs => {
                return Err(NetError::TooManyQueuePairs { requested: n, available: max_queue_pairs })
            }
            n => n,
        };
        let mtu = has(feature::MTU).then_some(config.mtu);
        let max_frame = mtu.unwrap_or(opts.mtu).max(68) as usize + L2_OVERHEAD;
        let rx_buf_len = if has(feature::MRG_RXBUF) {
            opts.mergeable_buf_len
        } else {
            round_up(NetHdr::SIZE + max_frame, BUF_ALIGN) as u32
        };
        let max_tx_frame = opts.max_tx_frame.unwrap_or(max_frame).clamp(1, max_frame);
        let info = NetInfo {
            features,
            mac: config.mac,
            config,
            config_from_device,
            mtu,
            max_queue_pairs,
            queue_pairs,
            queue_size: size,
            rx_buf_len,
            max_frame,
            max_tx_frame,
        };

        let mut pairs = Vec::with_capacity(queue_pairs as usize);
        for p in 0..queue_pairs {
            // One segment per receive buffer: no indirect tables. Transmit chains are the
            // header slot and a caller's frame.
            let rxq = conn.create_queue::<u16>(wire::rx_queue_index(p), size, 1)?;
            let rx = RxQueue::new(rxq, p, &info)?;
            let txq = conn.create_queue::<u16>(wire::tx_queue_index(p), size, 2)?;
            let tx = TxQueue::new(txq, p, &info)?;
            pairs.push(QueuePair { rx, tx });
        }
        Ok(Self { conn, info, pairs })
    }

    /// What the device is.
    pub fn info(&self) -> &NetInfo {
        &self.info
    }

    /// Whether the link is up now: the device's `status` when it has one, otherwise
    /// whether the back end is still connected.
    pub fn link_up(&self) -> bool {
        if self.info.config_from_device && self.info.has(feature::STATUS) {
            match self.conn.read_config(6, 2) {
                Ok(b) if b.len() == 2 => u16::from_le_bytes([b[0], b[1]]) & wire::status::LINK_UP != 0,
                _ => false,
            }
        } else {
            self.conn.is_connected()
        }
    }

    /// The queue pairs not yet taken.
    pub fn take_queue_pairs(&mut self) -> Vec<QueuePair> {
        std::mem::take(&mut self.pairs)
    }

    /// The guest memory.
    pub fn memory(&self) -> &std::sync::Arc<SharedMemory> {
        self.conn.memory()
    }

    /// The vhost-user connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// A queue's own piece of guest memory: `count` buffers of `stride` bytes, each starting
/// `offset` bytes into its stride.
struct BufferPool {
    /// `None` once leaked (the device may still write it).
    region: Option<DmaBuffer>,
    /// Host address and guest address of buffer 0 (the region's start plus `offset`).
    host: usize,
    gpa: u64,
    stride: usize,
}

impl BufferPool {
    fn new(
        memory: &std::sync::Arc<SharedMemory>,
        count: usize,
        stride: usize,
        offset: usize,
    ) -> Result<Self, NetError> {
        let bytes = count * stride;
        let region = memory.alloc_zeroed_buffer(bytes).ok_or(NetError::OutOfMemory(bytes))?;
        let (host, gpa) = (region.as_ptr() as usize + offset, region.gpa() + offset as u64);
        Ok(Self { host, gpa, stride, region: Some(region) })
    }

    #[inline(always)]
    fn gpa(&self, id: u16) -> u64 {
        self.gpa + id as u64 * self.stride as u64
    }

    #[inline(always)]
    fn host(&self, id: u16) -> *mut u8 {
        (self.host + id as usize * self.stride) as *mut u8
    }

    fn leak(&mut self) {
        if let Some(r) = self.region.take() {
            r.leak();
        }
    }
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("stride", &self.stride)
            .finish()
    }
}

/// The error a queue reports once its ring latched broken: the device's fault if it
/// made one, else a disconnect or a plain break.
fn broken_reason<T>(q: &Queue<T>) -> QueueError {
    match q.vq().fault() {
        Some(f) => QueueError::Device(DeviceFault::Ring(f)),
        None if !q.is_connected() => QueueError::Disconnected,
        None => QueueError::Broken(q.broken_reason()),
    }
}

fn wait_error(e: frontend::Error) -> Result<(), NetError> {
    match e {
        frontend::Error::Timeout(d) => Err(NetError::Timeout(d)),
        frontend::Error::Disconnected => Err(QueueError::Disconnected.into()),
        other => Err(other.into()),
    }
}

/// Asks the CPU to fetch the line at `p` for reading, where it has an instruction for
/// that (x86-64); elsewhere, nothing.
#[inline(always)]
fn prefetch_read(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it returns nothing, writes no memory and does not fault
    // whatever the address; SSE, which provides it, is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A used receive buffer: its pool index and the bytes the device wrote.
#[derive(Clone, Copy, Debug)]
struct Used {
    id: u16,
    len: u32,
}

/// One received frame, in place in the receive buffers: valid during the
/// [`RxQueue::recv`] callback only, after which its buffers go back to the device.
pub struct RxFrame<'a> {
    hdr: NetHdr,
    len: usize,
    bufs: &'a [Used],
    pool: &'a BufferPool,
}

impl<'a> RxFrame<'a> {
    /// The frame's `virtio_net_hdr_v1`.
    pub fn header(&self) -> &NetHdr {
        &self.hdr
    }

    /// Frame bytes (header excluded).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the frame is empty (a header with nothing after it).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Buffers the frame spans.
    pub fn num_buffers(&self) -> usize {
        self.bufs.len()
    }

    /// The frame's bytes, segment by segment: the first buffer after the header, then
    /// each further buffer (`MRG_RXBUF`).
    pub fn segments(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let pool = self.pool;
        self.bufs.iter().enumerate().map(move |(i, u)| {
            let skip = if i == 0 { NetHdr::SIZE } else { 0 };
            // SAFETY: buffer `u.id` belongs to the driver until the callback returns (the
            // device returned it and it is not reposted before); `skip <= u.len <= stride`
            // (`RxQueue::stage` checked the first against the header size and every length
            // against the posted length, at most the stride), so the bytes lie inside the
            // pool, which lives as long as the queue that lends this frame.
            unsafe { std::slice::from_raw_parts(pool.host(u.id).add(skip), u.len as usize - skip) }
        })
    }

    /// The first segment: the whole frame unless it spans several buffers.
    pub fn first_segment(&self) -> &'a [u8] {
        self.segments().next().unwrap_or(&[])
    }

    /// Copies the frame into `out`; returns the bytes copied (at most `out.len()`).
    pub fn copy_to(&self, out: &mut [u8]) -> usize {
        let mut n = 0;
        for s in self.segments() {
            let k = s.len().min(out.len() - n);
            out[n..n + k].copy_from_slice(&s[..k]);
            n += k;
            if n == out.len() {
                break;
            }
        }
        n
    }
}

impl fmt::Debug for RxFrame<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RxFrame").field("len", &self.len).field("buffers", &self.bufs.len()).finish()
    }
}

/// A receive queue (receiveqN): keeps the ring full of buffers and hands out frames.
pub struct RxQueue {
    q: Queue<u16>,
    pair: u16,
    pool: BufferPool,
    count: usize,
    /// Writable bytes posted per buffer.
    buf_len: u32,
    mergeable: bool,
    /// Free buffer indices (a stack).
    free: Vec<u16>,
    /// The refill's segment list, sized for the ring.
    sgs: Vec<Sg>,
    /// Used buffers taken off the ring, from `staged_pos` on not yet handed out; sized
    /// for the ring, as only posted buffers come back.
    staged: Vec<Used>,
    staged_pos: usize,
    posted: usize,
    /// Refill once this many buffers are free.
    refill_batch: usize,
    failed: Option<QueueError>,
    stats: QueueStats,
}

impl fmt::Debug for RxQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RxQueue")
            .field("pair", &self.pair)
            .field("buffers", &self.buffers())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl RxQueue {
    fn new(q: Queue<u16>, pair: u16, info: &NetInfo) -> Result<Self, NetError> {
        let count = q.vq().vring_size() as usize;
        // Each buffer starts RX_HEADER_OFFSET into a line, so that its header ends where a
        // line ends and the frame starts on the next. The line the driver reads the header
        // from then holds no frame bytes: a device that leaves an unchanged header
        // unwritten (DPDK's vhost does) never has to take that line back, which the frame
        // sharing it cost on every buffer.
        let stride = round_up(RX_HEADER_OFFSET + info.rx_buf_len as usize, BUF_ALIGN);
        let pool = BufferPool::new(q.memory(), count, stride, RX_HEADER_OFFSET)?;
        let mut rx = Self {
            q,
            pair,
            pool,
            count,
            buf_len: info.rx_buf_len,
            mergeable: info.mergeable(),
            free: (0..count as u16).rev().collect(),
            sgs: Vec::with_capacity(count),
            staged: Vec::with_capacity(count),
            staged_pos: 0,
            posted: 0,
            refill_batch: (count / 8).clamp(1, 64),
            failed: None,
            stats: QueueStats::default(),
        };
        rx.refill()?;
        Ok(rx)
    }

    /// The queue pair's index.
    pub fn pair(&self) -> u16 {
        self.pair
    }

    /// The vhost-user queue underneath (its ring addresses, its features).
    pub fn queue(&self) -> &Queue<u16> {
        &self.q
    }

    /// Bytes per receive buffer, header included.
    pub fn buffer_len(&self) -> u32 {
        self.buf_len
    }

    /// Where the buffers are.
    pub fn buffers(&self) -> BufferCount {
        BufferCount {
            total: self.count,
            free: self.free.len(),
            held: self.staged.len() - self.staged_pos,
            posted: self.posted,
        }
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Why the queue stopped, if it did.
    pub fn failure(&self) -> Option<&QueueError> {
        self.failed.as_ref()
    }

    /// Whether the back end is still connected (asks the socket: a system call).
    pub fn is_connected(&self) -> bool {
        self.q.is_connected()
    }

    /// Latches the queue failed with `err`: the buffers taken off the ring go back to the
    /// free list, the ring stops being read, and every later call returns `err`.
    #[cold]
    fn fail<R>(&mut self, err: QueueError) -> Result<R, NetError> {
        for u in self.staged.drain(..).skip(self.staged_pos) {
            self.free.push(u.id);
        }
        self.staged_pos = 0;
        self.q.vq().break_queue();
        self.failed.get_or_insert(err.clone());
        Err(err.into())
    }

    /// Takes used buffers off the ring into the staging list, after what is staged.
    #[inline]
    fn stage(&mut self) {
        if self.staged_pos > 0 {
            // What is left of a partly handed-out burst moves to the front (no allocation).
            self.staged.drain(..self.staged_pos);
            self.staged_pos = 0;
        }
        let room = self.staged.capacity() - self.staged.len();
        let (staged, buf_len) = (&mut self.staged, self.buf_len);
        // The core refuses a used length beyond the posted length (the ring breaks); the
        // `min` keeps `RxFrame::segments`' bound visible here, and costs nothing.
        let n = self.q.vq_mut().get_bufs(room, |u| staged.push(Used { id: u.token, len: u.len.min(buf_len) }));
        self.posted -= n;
    }

    /// Reads the 12-byte header of buffer `id` once, from guest memory.
    #[inline(always)]
    fn read_header(&self, id: u16) -> NetHdr {
        let p = self.pool.host(id);
        // SAFETY: buffer `id` was returned by the device and not reposted, so it is the
        // driver's; it holds at least the header (the caller checked its used length), and
        // it starts RX_HEADER_OFFSET (a multiple of 4) past a 64-byte boundary, so the
        // three loads are aligned. Volatile: the device shares the memory, and each byte is
        // to be read exactly once.
        let words = unsafe { [0, 4, 8].map(|at| p.add(at).cast::<u32>().read_volatile()) };
        let mut b = [0u8; NetHdr::SIZE];
        for (chunk, word) in b.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        NetHdr::parse(&b)
    }

    /// Hands up to `max` received frames to `f`, in the order the device returned them,
    /// then reposts their buffers. Does not wait: returns 0 when nothing arrived. Fails
    /// once the device breaks the protocol or the back end is gone (see the module
    /// documentation); frames handed out before that stay handed out.
    pub fn recv(&mut self, max: usize, mut f: impl FnMut(RxFrame<'_>)) -> Result<usize, NetError> {
        if let Some(e) = &self.failed {
            return Err(e.clone().into());
        }
        if self.staged.len() - self.staged_pos < max {
            self.stage();
        }
        // The headers are in lines the device just wrote: ask for all of this call's at
        // once, so that their transfers overlap instead of one per frame.
        let upto = self.staged.len().min(self.staged_pos + max);
        for u in &self.staged[self.staged_pos..upto] {
            prefetch_read(self.pool.host(u.id));
        }
        let mut frames = 0;
        while frames < max {
            let mut avail = self.staged.len() - self.staged_pos;
            if avail == 0 {
                break;
            }
            let head = self.staged[self.staged_pos];
            if (head.len as usize) < NetHdr::SIZE {
                return self.fail(DeviceFault::HeaderTruncated { len: head.len }.into());
            }
            let hdr = self.read_header(head.id);
            let nb = if self.mergeable { hdr.num_buffers as usize } else { 1 };
            if nb != 1 {
                if nb == 0 {
                    return self.fail(DeviceFault::ZeroBuffers.into());
                }
                if nb > avail + self.posted {
                    let posted = avail + self.posted;
                    return self.fail(DeviceFault::BuffersBeyondPosted { num_buffers: hdr.num_buffers, posted }.into());
                }
                if nb > avail {
                    self.stage();
                    avail = self.staged.len();
                    if nb > avail {
                        if self.q.vq().is_broken() {
                            return self.fail(broken_reason(&self.q));
                        }
                        let arrived = avail;
                        return self.fail(DeviceFault::MissingBuffers { num_buffers: hdr.num_buffers, arrived }.into());
                    }
                }
            }
            let pos = self.staged_pos;
            let bufs = &self.staged[pos..pos + nb];
            let len = bufs.iter().map(|u| u.len as usize).sum::<usize>() - NetHdr::SIZE;
            if let Err(e) = hdr.check_frame(len) {
                return self.fail(DeviceFault::HeaderBeyondFrame(e).into());
            }
            f(RxFrame { hdr, len, bufs, pool: &self.pool });
            self.free.extend(bufs.iter().map(|u| u.id));
            self.staged_pos += nb;
            self.stats.frames += 1;
            self.stats.bytes += len as u64;
            self.stats.buffers += nb as u64;
            frames += 1;
        }
        if self.staged_pos == self.staged.len() {
            self.staged.clear();
            self.staged_pos = 0;
        }
        if self.free.len() >= self.refill_batch || self.posted == 0 {
            self.refill()?;
        }
        if frames == 0 && self.q.vq().is_broken() && self.staged.is_empty() {
            return self.fail(broken_reason(&self.q));
        }
        Ok(frames)
    }

    /// Posts every free buffer (one burst), and notifies the device if it asks.
    fn refill(&mut self) -> Result<(), NetError> {
        let n = self.free.len();
        if n == 0 {
            return Ok(());
        }
        // The top of the free stack first, so that the `added` posted ones are its top.
        self.sgs.clear();
        for &id in self.free.iter().rev() {
            self.sgs.push(Sg::new(self.pool.gpa(id), self.buf_len));
        }
        let free = &self.free;
        match self.q.vq_mut().add_inbufs_premapped(&self.sgs, |i| free[n - 1 - i]) {
            Ok(added) => {
                self.free.truncate(n - added);
                self.posted += added;
            }
            // The ring has a descriptor for every buffer: only a broken ring refuses.
            Err(AddErrorKind::NoSpace) => {}
            Err(_) => return self.fail(broken_reason(&self.q)),
        }
        if self.q.kick().is_err() {
            return self.fail(broken_reason(&self.q));
        }
        Ok(())
    }

    /// Waits until the device has returned a buffer, `deadline` passes
    /// ([`NetError::Timeout`]) or the back end disconnects.
    pub fn wait(&mut self, mode: WaitMode, deadline: Option<Instant>) -> Result<(), NetError> {
        if let Some(e) = &self.failed {
            return Err(e.clone().into());
        }
        if self.staged.len() > self.staged_pos {
            return Ok(());
        }
        match self.q.wait(mode, deadline) {
            Ok(()) => Ok(()),
            Err(frontend::Error::Disconnected) => self.fail(QueueError::Disconnected),
            Err(frontend::Error::QueueBroken(_)) => self.fail(broken_reason(&self.q)),
            Err(e) => wait_error(e),
        }
    }

    /// Stops the ring on the back end (`GET_VRING_BASE`, if it is still connected) and
    /// takes back every buffer it held: afterwards all buffers are free. The queue stays
    /// stopped.
    pub fn stop(&mut self) -> Result<BufferCount, NetError> {
        let stopped = if self.q.is_connected() { self.q.stop().map(|_| ()) } else { Ok(()) };
        if stopped.is_err() || !self.q.is_connected() {
            // The device may still write what it held: keep the pool out of the allocator.
            self.q.leak_on_drop();
            self.pool.leak();
        }
        self.q.vq().break_queue();
        while let Some(id) = self.q.vq_mut().detach_unused_buf() {
            self.free.push(id);
            self.posted -= 1;
        }
        for u in self.staged.drain(..).skip(self.staged_pos) {
            self.free.push(u.id);
        }
        self.staged_pos = 0;
        self.failed.get_or_insert(QueueError::Stopped);
        stopped?;
        Ok(self.buffers())
    }
}

impl Drop for RxQueue {
    fn drop(&mut self) {
        if self.posted > 0 {
            // The ring is stopped by `Queue`'s drop; a device that ignores that could still
            // write the buffers it held.
            self.q.leak_on_drop();
            self.pool.leak();
        }
    }
}

/// A transmit queue (transmitqN).
pub struct TxQueue {
    q: Queue<u16>,
    pair: u16,
    /// Slot `i`: the header, then room for `max_frame` bytes.
    pool: BufferPool,
    count: usize,
    max_frame: usize,
    free: Vec<u16>,
    sgs: Vec<Sg>,
    /// The caller's frame buffer of each slot sent by `send_buffer`.
    chained: Vec<Option<DmaBuffer>>,
    /// Chained frames whose transmission completed, for `take_sent_buffers`.
    sent_buffers: Vec<DmaBuffer>,
    in_flight: usize,
    failed: Option<QueueError>,
    stats: QueueStats,
}

impl fmt::Debug for TxQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxQueue")
            .field("pair", &self.pair)
            .field("slots", &self.slots())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl TxQueue {
    fn new(q: Queue<u16>, pair: u16, info: &NetInfo) -> Result<Self, NetError> {
        let count = q.vq().vring_size() as usize;
        let stride = round_up(NetHdr::SIZE + info.max_tx_frame, BUF_ALIGN);
        // Zeroed: every slot's header is already the all-zero header this driver sends
        // (no offloads requested, `num_buffers` 0 on transmit).
        let pool = BufferPool::new(q.memory(), count, stride, 0)?;
        Ok(Self {
            q,
            pair,
            pool,
            count,
            max_frame: info.max_tx_frame,
            free: (0..count as u16).rev().collect(),
            sgs: Vec::with_capacity(count),
            chained: (0..count).map(|_| None).collect(),
            sent_buffers: Vec::with_capacity(count),
            in_flight: 0,
            failed: None,
            stats: QueueStats::default(),
        })
    }

    /// The queue pair's index.
    pub fn pair(&self) -> u16 {
        self.pair
    }

    /// The vhost-user queue underneath (its ring addresses, its features).
    pub fn queue(&self) -> &Queue<u16> {
        &self.q
    }

    /// Largest frame a slot holds.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Where the slots are (`posted`: in flight).
    pub fn slots(&self) -> BufferCount {
        BufferCount { total: self.count, free: self.free.len(), held: 0, posted: self.in_flight }
    }

    /// Frames in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Why the queue stopped, if it did.
    pub fn failure(&self) -> Option<&QueueError> {
        self.failed.as_ref()
    }

    /// Whether the back end is still connected (asks the socket: a system call).
    pub fn is_connected(&self) -> bool {
        self.q.is_connected()
    }

    #[cold]
    fn fail<R>(&mut self, err: QueueError) -> Result<R, NetError> {
        self.q.vq().break_queue();
        self.failed.get_or_insert(err.clone());
        Err(err.into())
    }

    fn check(&self) -> Result<(), NetError> {
        match &self.failed {
            Some(e) => Err(e.clone().into()),
            None => Ok(()),
        }
    }

    /// Takes back the slots of transmitted frames; returns how many. (A device that breaks
    /// the ring shows in the next send or wait.)
    #[inline]
    pub fn reclaim(&mut self) -> usize {
        let (free, chained, sent) = (&mut self.free, &mut self.chained, &mut self.sent_buffers);
        let n = self.q.vq_mut().get_bufs(usize::MAX, |u| {
            free.push(u.token);
            if let Some(b) = chained[u.token as usize].take() {
                sent.push(b);
            }
        });
        self.in_flight -= n;
        n
    }

    /// Sends up to `count` frames, each written by `fill(i, slot)` straight into its slot
    /// in guest memory (`slot.len()` is [`Self::max_frame`]); `fill` returns the frame's
    /// length, and 0 ends the burst there. Posts them with one burst add and notifies the
    /// device if it asks. Returns how many went out: fewer than `count` when slots ran
    /// short (completions are reclaimed first).
    #[inline]
    pub fn send_with(
        &mut self,
        count: usize,
        mut fill: impl FnMut(usize, &mut [u8]) -> usize,
    ) -> Result<usize, NetError> {
        self.check()?;
        if self.free.len() < count && self.reclaim() == 0 && self.q.vq().is_broken() {
            return self.fail(broken_reason(&self.q));
        }
        let n = count.min(self.free.len());
        let top = self.free.len();
        self.sgs.clear();
        for i in 0..n {
            let id = self.free[top - 1 - i];
            // SAFETY: slot `id` is free (not in flight), so the device has no descriptor
            // for it and this queue alone writes it; the frame area is `max_frame` bytes
            // after the header, inside the slot's stride.
            let frame = unsafe { std::slice::from_raw_parts_mut(self.pool.host(id).add(NetHdr::SIZE), self.max_frame) };
            let len = fill(i, frame).min(self.max_frame);
            if len == 0 {
                break;
            }
            self.sgs.push(Sg::new(self.pool.gpa(id), (NetHdr::SIZE + len) as u32));
            self.stats.bytes += len as u64;
        }
        self.post(top)
    }

    /// Posts `self.sgs`, built from the top of the free stack (`top` its length before).
    #[inline(always)]
    fn post(&mut self, top: usize) -> Result<usize, NetError> {
        if self.sgs.is_empty() {
            return Ok(0);
        }
        let free = &self.free;
        let sent = match self.q.vq_mut().add_outbufs_premapped(&self.sgs, |i| free[top - 1 - i]) {
            Ok(n) => n,
            Err(AddErrorKind::NoSpace) => 0,
            Err(_) => return self.fail(broken_reason(&self.q)),
        };
        if sent < self.sgs.len() {
            let unsent: u64 = self.sgs[sent..].iter().map(|s| (s.len as usize - NetHdr::SIZE) as u64).sum();
            self.stats.bytes -= unsent;
        }
        self.free.truncate(top - sent);
        self.in_flight += sent;
        self.stats.frames += sent as u64;
        self.stats.buffers += sent as u64;
        if sent > 0 {
            // The frames are in the ring: a failed kick fails the queue for the next call.
            self.kick_or_fail();
        }
        Ok(sent)
    }

    /// Sends `frames`, copied into their slots. Returns how many went out (fewer when
    /// slots ran short).
    pub fn send(&mut self, frames: &[&[u8]]) -> Result<usize, NetError> {
        if let Some(f) = frames.iter().find(|f| f.len() > self.max_frame || f.is_empty()) {
            return Err(NetError::FrameTooLong { len: f.len(), max: self.max_frame });
        }
        self.send_with(frames.len(), |i, slot| {
            slot[..frames[i].len()].copy_from_slice(frames[i]);
            frames[i].len()
        })
    }

    /// Sends a frame that lies in guest memory, without copying it: the header slot and
    /// `frame` go out as one two-segment chain. The buffer comes back through
    /// [`Self::take_sent_buffers`] once the device is done with it; on error it is handed
    /// back with the error.
    pub fn send_buffer(&mut self, frame: DmaBuffer) -> Result<(), (NetError, DmaBuffer)> {
        if let Err(e) = self.check() {
            return Err((e, frame));
        }
        if frame.is_empty() || frame.len() > u32::MAX as usize {
            return Err((NetError::FrameTooLong { len: frame.len(), max: u32::MAX as usize }, frame));
        }
        if self.free.is_empty() {
            self.reclaim();
        }
        let Some(&id) = self.free.last() else {
            return Err((NetError::QueueFull, frame));
        };
        let header = [Sg::new(self.pool.gpa(id), NetHdr::SIZE as u32), frame.sg()];
        match self.q.vq_mut().add_sgs_premapped(&[&header], &[], id) {
            Ok(()) => {}
            Err(e) if e.kind == AddErrorKind::NoSpace => return Err((NetError::QueueFull, frame)),
            Err(_) => {
                let err = broken_reason(&self.q);
                self.failed.get_or_insert(err.clone());
                return Err((err.into(), frame));
            }
        }
        self.free.pop();
        self.in_flight += 1;
        self.stats.frames += 1;
        self.stats.buffers += 1;
        self.stats.bytes += frame.len() as u64;
        self.chained[id as usize] = Some(frame);
        // The frame is in the ring now: a failed kick fails the queue for the next call,
        // and the frame comes back through `stop`.
        self.kick_or_fail();
        Ok(())
    }

    /// Notifies the device if it asks; a failed notification latches the queue failed.
    #[inline(always)]
    fn kick_or_fail(&mut self) {
        if self.q.kick().is_err() {
            let err = broken_reason(&self.q);
            let _ = self.fail::<()>(err);
        }
    }

    /// Moves the frames sent by [`Self::send_buffer`] whose transmission completed to
    /// `out`.
    pub fn take_sent_buffers(&mut self, out: &mut Vec<DmaBuffer>) {
        out.append(&mut self.sent_buffers);
    }

    /// Waits until the device has completed a frame, `deadline` passes
    /// ([`NetError::Timeout`]) or the back end disconnects.
    pub fn wait(&mut self, mode: WaitMode, deadline: Option<Instant>) -> Result<(), NetError> {
        self.check()?;
        match self.q.wait(mode, deadline) {
            Ok(()) => Ok(()),
            Err(frontend::Error::Disconnected) => self.fail(QueueError::Disconnected),
            Err(frontend::Error::QueueBroken(_)) => self.fail(broken_reason(&self.q)),
            Err(e) => wait_error(e),
        }
    }

    /// Reclaims what completed, stops the ring on the back end (`GET_VRING_BASE`, if it
    /// is still connected) and takes back every slot still in flight (their chained
    /// buffers are leaked: the device may have been reading them).
    pub fn stop(&mut self) -> Result<BufferCount, NetError> {
        if self.failed.is_none() {
            self.reclaim();
        }
        let stopped = if self.q.is_connected() { self.q.stop().map(|_| ()) } else { Ok(()) };
        let device_may_read = stopped.is_err() || !self.q.is_connected();
        if device_may_read {
            self.q.leak_on_drop();
            self.pool.leak();
        }
        self.q.vq().break_queue();
        while let Some(id) = self.q.vq_mut().detach_unused_buf() {
            self.free.push(id);
            self.in_flight -= 1;
            if let Some(b) = self.chained[id as usize].take() {
                if device_may_read {
                    b.leak();
                } else {
                    self.sent_buffers.push(b);
                }
            }
        }
        self.failed.get_or_insert(QueueError::Stopped);
        stopped?;
        Ok(self.slots())
    }
}

impl Drop for TxQueue {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            self.q.leak_on_drop();
            self.pool.leak();
            for b in self.chained.iter_mut().filter_map(Option::take) {
                b.leak();
            }
        }
    }
}
