//! The virtio-net device (VIRTIO 1.3, 5.1) on the back-end framework: the code of
//! `virtq serve-net`.
//!
//! Each queue pair (receive queue `2p`, transmit queue `2p + 1`) is served by one worker
//! thread, which moves frames between the pair's rings and its peer:
//!
//! - [`NetPeer::Tap`]: a TAP device opened with a 12-byte vnet header (see `tap.rs`). A
//!   transmit chain goes to `writev` as it is, header and frame straight from guest
//!   memory; a received frame is `readv`'d straight into the guest's receive buffers, and
//!   only `num_buffers` is written afterwards. Checksum and segmentation offloads pass
//!   through in both directions (the kernel checks what the guest sends).
//! - [`NetPeer::Loopback`]: each transmitted frame is copied once, from the transmit
//!   buffers into receive buffers of the same pair, with a fresh header. A frame that finds
//!   no receive buffer is dropped (counted in [`NetStats::rx_dropped`]), as a NIC drops
//!   what its peer has no room for; the transmit queue never waits for the receive queue.
//!
//! Transmit chains are served in bursts ([`virtq::Device::serve`]: one publish per burst).
//! Receive chains are popped ahead, as many as a frame may need, and held until a frame
//! fills them; with `MRG_RXBUF` a frame spans as many chains as it needs (`num_buffers`).
//! Held chains that a stop finds unused are given back to the frontend
//! ([`crate::backend::Ring::hold_from`]): the next start pops them again. Nothing is
//! allocated per frame.
//!
//! The control queue (with `CTRL_VQ`, after the pairs) accepts `VQ_PAIRS_SET` (with `MQ`)
//! and answers every other command `ERR`: the device offers none of their features.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtq::{Chain, Features, Segment, Segments};

use super::tap::Tap;
use super::wire::{self, ctrl, feature, CtrlCommand, NetConfig, NetHdr, CTRL_DATA_MAX};
use crate::backend::log::{log_debug, log_error};
use crate::backend::prefetch_for_write;
use crate::backend::{read_stream, write_stream, ChainWorker, Device, Idle, QueueHandler, Ring, Rings, Wake, Worker};

/// Where the device's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetPeer {
    /// A TAP device of this name (created if missing; with several queue pairs it must be
    /// a multi-queue TAP).
    Tap(String),
    /// Every frame the driver transmits comes back on the receive queue of its pair.
    Loopback,
}

/// Options of a [`NetBackend`].
#[derive(Clone, Debug)]
pub struct NetBackendOptions {
    /// Queue pairs (1 to [`MAX_PAIRS`]); `MQ` lets the driver use more than one.
    pub pairs: u16,
    /// The MAC address in the config space.
    pub mac: [u8; 6],
    /// The largest MTU the driver should use (config space, `MTU`).
    pub mtu: u16,
    /// Where frames go.
    pub peer: NetPeer,
}

impl Default for NetBackendOptions {
    fn default() -> Self {
        Self { pairs: 1, mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56], mtu: 1500, peer: NetPeer::Loopback }
    }
}

/// Most queue pairs a device serves.
pub const MAX_PAIRS: u16 = 64;

/// The features offered with either peer.
pub const BASE_FEATURES: u64 =
    feature::MRG_RXBUF | feature::MQ | feature::CTRL_VQ | feature::STATUS | feature::MAC | feature::MTU;

/// The offloads offered with a TAP peer, on top of [`BASE_FEATURES`]: the TAP's kernel side
/// takes partial checksums and TSO from the guest, and gives them to a guest that accepts
/// them.
pub const TAP_OFFLOADS: u64 = feature::CSUM
    | feature::GUEST_CSUM
    | feature::HOST_TSO4
    | feature::HOST_TSO6
    | feature::HOST_ECN
    | feature::GUEST_TSO4
    | feature::GUEST_TSO6
    | feature::GUEST_ECN;

/// Counters of a [`NetBackend`], over all its connections and pairs.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames the driver transmitted (valid ones).
    pub tx_frames: AtomicU64,
    /// Their bytes, headers excluded.
    pub tx_bytes: AtomicU64,
    /// Transmitted frames the TAP refused.
    pub tx_dropped: AtomicU64,
    /// Transmit chains too short for the header, or with device-writable parts.
    pub tx_errors: AtomicU64,
    /// Frames delivered to the driver.
    pub rx_frames: AtomicU64,
    /// Their bytes, headers excluded.
    pub rx_bytes: AtomicU64,
    /// Frames lost for want of receive buffers (loopback), or too long for them.
    pub rx_dropped: AtomicU64,
    /// Receive chains too short for a header (returned with nothing written).
    pub rx_errors: AtomicU64,
    /// Control commands answered `OK`.
    pub ctrl_ok: AtomicU64,
    /// Control commands answered `ERR`, or malformed.
    pub ctrl_err: AtomicU64,
}

/// One pass's counts, added to [`NetStats`] once per pass.
#[derive(Default)]
struct Counts {
    tx_frames: u64,
    tx_bytes: u64,
    tx_dropped: u64,
    tx_errors: u64,
    rx_frames: u64,
    rx_bytes: u64,
    rx_dropped: u64,
    rx_errors: u64,
}

impl Counts {
    fn flush(&mut self, stats: &NetStats) {
        let add = |a: &AtomicU64, v: u64| {
            if v != 0 {
                a.fetch_add(v, Ordering::Relaxed);
            }
        };
        add(&stats.tx_frames, self.tx_frames);
        add(&stats.tx_bytes, self.tx_bytes);
        add(&stats.tx_dropped, self.tx_dropped);
        add(&stats.tx_errors, self.tx_errors);
        add(&stats.rx_frames, self.rx_frames);
        add(&stats.rx_bytes, self.rx_bytes);
        add(&stats.rx_dropped, self.rx_dropped);
        add(&stats.rx_errors, self.rx_errors);
        *self = Self::default();
    }
}

/// virtio-net over a TAP device or in loopback.
pub struct NetBackend {
    opts: NetBackendOptions,
    config: [u8; wire::CONFIG_SIZE],
    /// One per pair, with a TAP peer.
    taps: Vec<Arc<Tap>>,
    stats: Arc<NetStats>,
}

impl NetBackend {
    /// A device with `opts`; a TAP peer is opened here (one file per pair).
    pub fn new(opts: NetBackendOptions) -> io::Result<Self> {
        if opts.pairs == 0 || opts.pairs > MAX_PAIRS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("pairs must be 1 to {MAX_PAIRS}")));
        }
        if opts.mtu < 68 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the MTU must be at least 68"));
        }
        let taps = match &opts.peer {
            NetPeer::Tap(name) => Tap::open(name, opts.pairs)?.into_iter().map(Arc::new).collect(),
            NetPeer::Loopback => Vec::new(),
        };
        let config = NetConfig {
            mac: opts.mac,
            status: wire::status::LINK_UP,
            max_virtqueue_pairs: opts.pairs,
            mtu: opts.mtu,
            ..Default::default()
        }
        .to_bytes();
        Ok(Self { opts, config, taps, stats: Arc::default() })
    }

    /// The counters.
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    /// The options the device was made with.
    pub fn options(&self) -> &NetBackendOptions {
        &self.opts
    }

    fn ctrl_queue(&self, features: Features) -> u16 {
        wire::ctrl_queue_index(self.opts.pairs, features.bits() & feature::MQ != 0)
    }
}

impl Device for NetBackend {
    fn device_features(&self) -> u64 {
        match self.opts.peer {
            NetPeer::Tap(_) => BASE_FEATURES | TAP_OFFLOADS,
            NetPeer::Loopback => BASE_FEATURES,
        }
    }

    fn num_queues(&self) -> u16 {
        2 * self.opts.pairs + 1
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    /// The control queue's handler: the only queue answered a chain at a time.
    fn queue_handler(&self, _index: u16, features: Features) -> Box<dyn QueueHandler> {
        Box::new(CtrlQueue { pairs: self.opts.pairs, features: features.bits(), stats: self.stats.clone() })
    }

    /// Each pair on its own worker, and the control queue on its own.
    fn queue_groups(&self) -> Vec<Vec<u16>> {
        let mut groups: Vec<Vec<u16>> =
            (0..self.opts.pairs).map(|p| vec![wire::rx_queue_index(p), wire::tx_queue_index(p)]).collect();
        groups.push(vec![2 * self.opts.pairs]);
        groups
    }

    fn worker(&self, queues: &[u16], features: Features) -> Box<dyn Worker> {
        let ctrl = self.ctrl_queue(features);
        if features.bits() & feature::CTRL_VQ != 0 && queues.contains(&ctrl) {
            // Without MQ the control queue is queue 2, which is pair 1's receive queue
            // with it.
            return Box::new(ChainWorker::new(vec![(ctrl, self.queue_handler(ctrl, features))]));
        }
        let [rx, tx] = queues else {
            // The control queue's place under MQ, which these features do not have.
            return Box::new(ChainWorker::new(Vec::new()));
        };
        let pair = tx / 2;
        let peer = match self.taps.get(pair as usize) {
            Some(tap) => {
                if let Err(e) = tap.set_offloads(features.bits()) {
                    log_error!("net: {e}");
                }
                PairPeer::Tap(tap.clone())
            }
            None => PairPeer::Loopback,
        };
        let f = features.bits();
        // The guest accepts segmented frames: up to 64 KiB with their headers.
        let gso = f & feature::GUEST_CSUM != 0 && f & (feature::GUEST_TSO4 | feature::GUEST_TSO6) != 0;
        let mtu_frame = NetHdr::SIZE + self.opts.mtu as usize + ETH_VLAN_HLEN;
        let max_frame = if gso { NetHdr::SIZE + 65535 + ETH_VLAN_HLEN } else { mtu_frame };
        Box::new(PairWorker {
            rx: *rx,
            tx: *tx,
            peer,
            mrg: f & feature::MRG_RXBUF != 0,
            max_frame,
            mtu_frame,
            stats: self.stats.clone(),
        })
    }
}

/// An Ethernet header with a VLAN tag.
const ETH_VLAN_HLEN: usize = 14 + 4;

/// Transmit chains served per burst.
const TX_BURST: usize = 64;
/// Segments of a transmit chain served in a burst; longer chains are served alone.
const TX_SEGS: usize = 64;
/// Frames looped back per pass.
const LOOP_BURST: usize = 32;
/// Frames read from a TAP per pass.
const RX_BURST: usize = 64;
/// Segments of a receive chain taken in place; longer chains go through a spill list.
const RX_SEGS: usize = 16;

enum PairPeer {
    Tap(Arc<Tap>),
    Loopback,
}

/// The worker of one queue pair.
struct PairWorker {
    rx: u16,
    tx: u16,
    peer: PairPeer,
    mrg: bool,
    /// The longest frame (header included) the peer can deliver.
    max_frame: usize,
    /// The longest frame without segmentation offload.
    mtu_frame: usize,
    stats: Arc<NetStats>,
}

impl Worker for PairWorker {
    fn run(&mut self, rings: &mut Rings<'_>) {
        match &self.peer {
            PairPeer::Loopback => self.run_loopback(rings),
            PairPeer::Tap(tap) => {
                let tap = tap.clone();
                self.run_tap(rings, &tap)
            }
        }
    }
}

impl PairWorker {
    /// The loop, a burst at a time: receive chains for the burst are popped first, their
    /// first lines prefetched for writing, then the transmit chains are served
    /// ([`Ring::serve`]) and each frame copied; the filled receive chains are completed
    /// together at the end. The misses on lines the driver wrote last overlap instead of
    /// coming one after the other.
    fn run_loopback<'m>(&mut self, rings: &mut Rings<'m>) {
        let mut txsegs = Segments::<'m, TX_SEGS>::new();
        let mut long_chain: Vec<Segment<'m>> = Vec::new();
        let mut rxb = RxBufs::new();
        let mut counts = Counts::default();
        let kicks = [self.tx];
        loop {
            let (rx, tx) = rings.pair_mut(self.rx, self.tx);
            let mut rx = rx;
            let mut served = 0;
            if let Some(tx) = tx {
                if let Some(rx) = rx.as_deref_mut() {
                    rxb.top_up(rx, LOOP_BURST);
                    rx.prefetch_used(LOOP_BURST);
                }
                tx.prefetch_used(LOOP_BURST);
                let mrg = self.mrg;
                served = serve_transmit(tx, LOOP_BURST, &mut txsegs, &mut long_chain, |chain, segs| {
                    loop_frame(chain, segs, rx.as_deref_mut(), &mut rxb, mrg, &mut counts)
                });
            }
            if let Some(rx) = rx {
                rxb.complete_filled(rx);
                rx.hold_from(rxb.resume_at());
            }
            counts.flush(&self.stats);
            let wake = if served > 0 { rings.busy() } else { rings.idle(&Idle { kicks: &kicks, fds: &[] }) };
            if wake == Wake::Stop {
                return;
            }
        }
    }

    fn run_tap<'m>(&mut self, rings: &mut Rings<'m>, tap: &Tap) {
        let mut txsegs = Segments::<'m, TX_SEGS>::new();
        let mut long_chain: Vec<Segment<'m>> = Vec::new();
        let mut rxb = RxBufs::new();
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(TX_SEGS);
        let mut counts = Counts::default();
        let mut read_error_logged = false;
        loop {
            let (rx, tx) = rings.pair_mut(self.rx, self.tx);
            let mut did = false;
            let tx_running = tx.is_some();
            if let Some(tx) = tx {
                let n = serve_transmit(tx, TX_BURST, &mut txsegs, &mut long_chain, |chain, segs| {
                    send_to_tap(tap, chain, segs, &mut iov, &mut counts)
                });
                did |= n > 0;
            }
            let mut rx_starved = false;
            let rx_running = rx.is_some();
            if let Some(rx) = rx {
                for _ in 0..RX_BURST {
                    // Room for the longest frame if the ring has it; else for a frame of
                    // the MTU (a segmented frame longer than the room is then lost), so
                    // that a driver with fewer buffers than the longest frame is served.
                    let covered = rxb.fill(rx, self.max_frame, self.mrg, &mut counts);
                    let enough = if self.mrg { self.max_frame.min(self.mtu_frame) } else { NetHdr::SIZE };
                    if covered < enough {
                        rx_starved = true;
                        break;
                    }
                    rxb.iovecs(covered, &mut iov);
                    // SAFETY: the iovecs are the writable segments of receive chains this
                    // worker popped and holds: guest memory, valid while `rings` lives,
                    // and referred to by no Rust reference.
                    match unsafe { tap.readv(&iov) } {
                        Ok(n) if n < NetHdr::SIZE || n > covered => {
                            // Cut short (longer than the buffers): the rest is lost.
                            counts.rx_dropped += 1;
                            did = true;
                        }
                        Ok(n) => {
                            rxb.deliver(n, &mut counts);
                            did = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            if !read_error_logged {
                                log_error!("net: reading TAP {}: {e}", tap.name());
                                read_error_logged = true;
                            }
                            break;
                        }
                    }
                }
                rxb.complete_filled(rx);
                rx.hold_from(rxb.resume_at());
            }
            counts.flush(&self.stats);
            let wake = if did {
                rings.busy()
            } else {
                let kick_rx = [self.tx, self.rx];
                let kicks: &[u16] = match (tx_running, rx_starved) {
                    (true, true) => &kick_rx,
                    (true, false) => &kick_rx[..1],
                    (false, true) => &kick_rx[1..],
                    (false, false) => &[],
                };
                let tap_fd = [(tap.fd(), libc::POLLIN)];
                let fds: &[(i32, i16)] = if rx_running && !rx_starved { &tap_fd } else { &[] };
                rings.idle(&Idle { kicks, fds })
            };
            if wake == Wake::Stop {
                return;
            }
        }
    }
}

/// Serves up to `max` transmit chains with `f` ([`Ring::serve`]: completed with nothing
/// written, published once); a chain of more segments than `segs` holds is served alone,
/// its segments gathered in `long`. Returns how many were served.
fn serve_transmit<'m, const N: usize>(
    tx: &mut Ring<'m>,
    max: usize,
    segs: &mut Segments<'m, N>,
    long: &mut Vec<Segment<'m>>,
    mut f: impl FnMut(&Chain, &[Segment<'m>]),
) -> usize {
    match tx.serve(max, segs, |chain, segs| {
        f(chain, segs);
        0
    }) {
        Ok(n) => n,
        Err(_) => match tx.pop(long) {
            Ok(Some(chain)) => {
                f(&chain, long);
                tx.complete(chain, 0);
                1
            }
            _ => 0,
        },
    }
}

/// Hands one transmit chain to the TAP: its readable segments, header first, as they are.
fn send_to_tap(tap: &Tap, chain: &Chain, segs: &[Segment<'_>], iov: &mut Vec<libc::iovec>, counts: &mut Counts) {
    let len = chain.readable_len() as usize;
    if len < NetHdr::SIZE || chain.writable_segments() != 0 {
        counts.tx_errors += 1;
        return;
    }
    iov.clear();
    iov.extend(
        segs[..chain.readable_segments() as usize]
            .iter()
            .map(|s| libc::iovec { iov_base: s.host_ptr().cast(), iov_len: s.len() as usize }),
    );
    // SAFETY: the iovecs are the readable segments of a chain this worker popped: guest
    // memory, valid for their lengths while the chain is served.
    match unsafe { tap.writev(iov) } {
        Ok(_) => {
            counts.tx_frames += 1;
            counts.tx_bytes += (len - NetHdr::SIZE) as u64;
        }
        // A header the kernel refuses (bad offload fields) or a full queue: the frame is
        // lost, as on a wire.
        Err(e) => {
            log_debug!("net: TAP {} refused a {len}-byte frame: {e}", tap.name());
            counts.tx_dropped += 1;
        }
    }
}

/// Loops one transmit chain back into receive buffers of the same pair.
fn loop_frame<'m>(
    chain: &Chain,
    segs: &[Segment<'m>],
    rx: Option<&mut Ring<'m>>,
    rxb: &mut RxBufs<'m>,
    mrg: bool,
    counts: &mut Counts,
) {
    let total = chain.readable_len() as usize;
    if total < NetHdr::SIZE || chain.writable_segments() != 0 {
        counts.tx_errors += 1;
        return;
    }
    let frame_len = total - NetHdr::SIZE;
    counts.tx_frames += 1;
    counts.tx_bytes += frame_len as u64;
    let Some(rx) = rx else {
        counts.rx_dropped += 1;
        return;
    };
    if rxb.fill(rx, total, mrg, counts) < total {
        counts.rx_dropped += 1;
        return;
    }
    // A fresh header: the loop offers no offloads, so the driver's has nothing to pass.
    let buffers = rxb.buffers_for(total) as u16;
    rxb.write(0, &NetHdr { num_buffers: buffers, ..Default::default() }.to_bytes());
    rxb.copy_in(NetHdr::SIZE, &segs[..chain.readable_segments() as usize], NetHdr::SIZE, frame_len);
    rxb.mark_filled(total, buffers as usize);
    counts.rx_frames += 1;
    counts.rx_bytes += frame_len as u64;
}

/// Prefetches the first two lines of a receive buffer, for writing.
#[inline(always)]
fn prefetch_frame(seg: &Segment<'_>) {
    let p = seg.host_ptr();
    prefetch_for_write(p);
    if seg.len() > 64 {
        prefetch_for_write(p.wrapping_add(64));
    }
}

/// A receive chain popped and not yet completed.
struct Held {
    chain: Chain,
    /// Its writable segments, in `RxBufs::segs` in order.
    segs: usize,
    capacity: usize,
    /// Bytes of a frame written into it (filled chains only).
    used: usize,
    /// The ring's available position before it was popped.
    avail_before: u16,
}

/// Receive chains held by a pair's worker, oldest first, with their writable segments:
/// first those a frame filled, which [`Self::complete_filled`] hands back together (so
/// that the used ring's lines, which the driver refills behind the device, move once per
/// burst), then the free ones, which the next frames fill.
struct RxBufs<'m> {
    held: VecDeque<Held>,
    segs: VecDeque<Segment<'m>>,
    /// Chains at the front that are filled; their segments are the first `filled_segs`.
    filled: usize,
    filled_segs: usize,
    /// Sum of the free chains' capacities.
    capacity: usize,
    sink: Segments<'m, RX_SEGS>,
    spill: Vec<Segment<'m>>,
}

impl<'m> RxBufs<'m> {
    fn new() -> Self {
        Self {
            held: VecDeque::with_capacity(256),
            segs: VecDeque::with_capacity(256),
            filled: 0,
            filled_segs: 0,
            capacity: 0,
            sink: Segments::new(),
            spill: Vec::new(),
        }
    }

    /// Where the frontend resumes if the ring stops now (see `Ring::hold_from`); call
    /// [`Self::complete_filled`] first.
    fn resume_at(&self) -> Option<u16> {
        debug_assert_eq!(self.filled, 0);
        self.held.front().map(|h| h.avail_before)
    }

    fn free(&self) -> usize {
        self.held.len() - self.filled
    }

    /// Pops chains until `n` free ones are held (or the ring runs out).
    fn top_up(&mut self, rx: &mut Ring<'m>, n: usize) {
        while self.free() < n && self.pop(rx) {}
    }

    /// Pops chains until the free ones can take `want` bytes (header included), or the
    /// ring runs out: with `mrg` together, else the first alone. Returns the bytes the
    /// next frame can take. A chain too short for a header (a driver mistake) is given
    /// back empty when it comes first.
    fn fill(&mut self, rx: &mut Ring<'m>, want: usize, mrg: bool, counts: &mut Counts) -> usize {
        loop {
            if let Some(first) = self.held.get(self.filled) {
                if first.capacity < NetHdr::SIZE {
                    self.mark_filled(0, 1);
                    counts.rx_errors += 1;
                    continue;
                }
                if !mrg {
                    return first.capacity;
                }
                if self.capacity >= want {
                    return self.capacity;
                }
            }
            if !self.pop(rx) {
                return if mrg { self.capacity } else { 0 };
            }
        }
    }

    /// Pops one chain and holds it, prefetching its first lines for writing; false if the
    /// ring is empty (or broken).
    fn pop(&mut self, rx: &mut Ring<'m>) -> bool {
        let avail_before = rx.avail_base();
        let (chain, segs): (Chain, &[Segment<'m>]) = match rx.pop(&mut self.sink) {
            Ok(Some(chain)) => (chain, self.sink.as_slice()),
            Ok(None) => return false,
            Err(_) => match rx.pop(&mut self.spill) {
                Ok(Some(chain)) => (chain, &self.spill),
                _ => return false,
            },
        };
        let writable = &segs[chain.readable_segments() as usize..];
        if let Some(first) = writable.first() {
            prefetch_frame(first);
        }
        self.segs.extend(writable.iter().copied());
        let capacity = chain.writable_len() as usize;
        self.capacity += capacity;
        self.held.push_back(Held { chain, segs: writable.len(), capacity, used: 0, avail_before });
        true
    }

    /// How many free chains a frame of `len` bytes fills.
    fn buffers_for(&self, len: usize) -> usize {
        let mut left = len;
        let mut n = 0;
        for h in self.held.range(self.filled..) {
            n += 1;
            if left <= h.capacity {
                break;
            }
            left -= h.capacity;
        }
        n
    }

    /// The free chains' segments, in order.
    fn free_segs(&self) -> impl Iterator<Item = &Segment<'m>> {
        self.segs.range(self.filled_segs..)
    }

    /// The iovecs of the free chains' segments, up to `len` bytes.
    fn iovecs(&self, len: usize, iov: &mut Vec<libc::iovec>) {
        iov.clear();
        let mut left = len;
        for s in self.free_segs() {
            if left == 0 {
                break;
            }
            let n = (s.len() as usize).min(left);
            iov.push(libc::iovec { iov_base: s.host_ptr().cast(), iov_len: n });
            left -= n;
        }
    }

    /// Writes `data` into the free chains' byte stream at `offset`.
    fn write(&self, mut offset: usize, mut data: &[u8]) {
        for s in self.free_segs() {
            if data.is_empty() {
                break;
            }
            let len = s.len() as usize;
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = s.write_at(offset, data);
            data = &data[n..];
            offset = 0;
        }
    }

    /// Copies `len` bytes from `src` (a chain's readable segments, from `src_off`) into
    /// the free chains' byte stream at `dst_off`: guest memory to guest memory, once.
    fn copy_in(&self, dst_off: usize, src: &[Segment<'_>], src_off: usize, len: usize) {
        let mut src_iter = src.iter();
        let mut cur = src_iter.next();
        let mut s_off = src_off;
        // Skip to the source offset.
        while let Some(s) = cur {
            if s_off < s.len() as usize {
                break;
            }
            s_off -= s.len() as usize;
            cur = src_iter.next();
        }
        let mut d_skip = dst_off;
        let mut left = len;
        for d in self.free_segs() {
            if left == 0 {
                break;
            }
            let d_len = d.len() as usize;
            if d_skip >= d_len {
                d_skip -= d_len;
                continue;
            }
            let mut d_off = d_skip;
            d_skip = 0;
            while d_off < d_len && left > 0 {
                let Some(s) = cur else { return };
                let n = (s.len() as usize - s_off).min(d_len - d_off).min(left);
                // SAFETY: `s_off + n <= s.len()` and `d_off + n <= d.len()`, and each
                // segment is valid for its length while the guest memory is borrowed
                // (`Segment::host_ptr`). The guest may have made the two overlap:
                // `ptr::copy` allows that.
                unsafe { std::ptr::copy(s.host_ptr().add(s_off), d.host_ptr().add(d_off), n) };
                s_off += n;
                d_off += n;
                left -= n;
                if s_off == s.len() as usize {
                    cur = src_iter.next();
                    s_off = 0;
                }
            }
        }
    }

    /// A received frame of `len` bytes (header included) is in the free chains, written
    /// by the TAP but for `num_buffers`: fills that in and marks them filled.
    fn deliver(&mut self, len: usize, counts: &mut Counts) {
        let buffers = self.buffers_for(len);
        self.write(10, &(buffers as u16).to_le_bytes());
        self.mark_filled(len, buffers);
        counts.rx_frames += 1;
        counts.rx_bytes += (len - NetHdr::SIZE) as u64;
    }

    /// Marks the first `buffers` free chains filled with the `len` bytes of a frame.
    fn mark_filled(&mut self, len: usize, buffers: usize) {
        let mut left = len;
        for _ in 0..buffers {
            let Some(h) = self.held.get_mut(self.filled) else { return };
            h.used = left.min(h.capacity);
            left -= h.used;
            self.capacity -= h.capacity;
            self.filled_segs += h.segs;
            self.filled += 1;
        }
    }

    /// Hands every filled chain back to the driver, in order.
    fn complete_filled(&mut self, rx: &mut Ring<'m>) {
        for _ in 0..self.filled {
            let Some(h) = self.held.pop_front() else { break };
            rx.complete(h.chain, h.used as u32);
        }
        for _ in 0..self.filled_segs {
            self.segs.pop_front();
        }
        self.filled = 0;
        self.filled_segs = 0;
    }
}

/// The control queue: `struct virtio_net_ctrl` (class, command, data) readable, one ack
/// byte writable.
struct CtrlQueue {
    pairs: u16,
    features: u64,
    stats: Arc<NetStats>,
}

impl QueueHandler for CtrlQueue {
    fn process(&mut self, chain: &Chain, segs: &[Segment<'_>]) -> u32 {
        let (readable, writable) = segs.split_at(chain.readable_segments() as usize);
        if chain.writable_len() == 0 {
            log_error!("net: control command {} has no writable byte for its ack", chain.id());
            self.stats.ctrl_err.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        let mut bytes = [0u8; 2 + CTRL_DATA_MAX];
        let len = chain.readable_len() as usize;
        let ack = if len > bytes.len() {
            log_debug!("net: control command of {len} bytes refused");
            ctrl::ACK_ERR
        } else {
            read_stream(readable, 0, &mut bytes[..len]);
            match CtrlCommand::decode(&bytes[..len]) {
                Ok(CtrlCommand::VqPairsSet(n))
                    if self.features & feature::MQ != 0 && (wire::VQ_PAIRS_MIN..=self.pairs).contains(&n) =>
                {
                    log_debug!("net: the driver uses {n} queue pairs");
                    ctrl::ACK_OK
                }
                Ok(c) => {
                    log_debug!("net: control command {c:?} refused");
                    ctrl::ACK_ERR
                }
                Err(e) => {
                    log_debug!("net: {e}");
                    ctrl::ACK_ERR
                }
            }
        };
        let counter = if ack == ctrl::ACK_OK { &self.stats.ctrl_ok } else { &self.stats.ctrl_err };
        counter.fetch_add(1, Ordering::Relaxed);
        write_stream(writable, 0, &[ack]);
        1
    }
}
