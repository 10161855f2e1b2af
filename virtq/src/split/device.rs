//! The device half of the split ring (the role of Linux's vringh).
//!
//! Everything the driver wrote is untrusted: each shared field is loaded once, into a
//! local, and validated before use. A malformed ring gives a [`DeviceError`] and latches
//! the queue broken; no driver input can make the device read or write outside guest
//! memory, loop, or panic.

use super::{SplitRing, AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY};
use crate::device::{
    one_segment, push_segment, single_segment, translate_area, Chain, DeviceConfig, DeviceError, InOrderRun, Segment,
    SegmentSink, Segments,
};
use crate::event::need_event;
use crate::memory::GuestMemory;
use crate::shared::{DescWords, RawDesc};
use crate::{Barriers, Features};

/// Longest indirect table accepted. The spec sets no bound; this one keeps a hostile table
/// from costing more than a few hundred microseconds to walk.
pub const MAX_INDIRECT_ENTRIES: u32 = 65535;

/// The device's end of a split virtqueue, borrowing guest memory for `'m`.
pub struct SplitDevice<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    ring: SplitRing,
    size: u16,
    event_idx: bool,
    in_order: bool,
    barriers: Barriers,
    last_avail_idx: u16,
    /// The last `avail.idx` read and validated; entries before it need no new fence.
    avail_idx_cache: u16,
    /// Where completions go, and those not yet visible to the driver.
    used: UsedSide,
    /// `used.idx` at the last interrupt decision (vringh's `last_used_idx`).
    signalled_used_idx: u16,
    used_flags_shadow: u16,
    fault: Option<DeviceError>,
}

/// Used elements per 64-byte cache line. `complete` publishes `used.idx` each time the
/// line fills, so that a device draining a long run hands buffers back along the way and
/// the line moves to the driver once, full, rather than once per completion. (Against
/// ringtest publishing after every completion, as Linux's `virtio_ring_0_9.c` does: split
/// 0.91 to 1.25 and split in-order 1.02 to 1.42 times the buffers/s, medians of three
/// sets of 10 to 20 alternating rounds; streaming at batch 32, 1.01 to 1.18.)
const USED_LINE: u16 = 8;

/// The used half of the device's state. Apart from the rest so that `serve` can work on a
/// copy that the compiler keeps in registers (the ring's fences would make it reload
/// fields of `self` for every chain).
#[derive(Clone, Copy)]
struct UsedSide {
    /// Next used index to hand out (entries up to it are written or in `run`).
    idx: u16,
    /// What `used.idx` holds in memory.
    published_idx: u16,
    /// Completions since the last interrupt decision: past 0xffff the event window aliases.
    unsignalled: u32,
    run: Option<InOrderRun>,
}

impl<'m, M: GuestMemory + ?Sized> SplitDevice<'m, M> {
    /// Attaches to a ring the driver set up. The three areas are translated and checked
    /// once here; the queue keeps the host pointers for `'m`.
    ///
    /// `used.idx` is read from memory, so a device that reconnects to a running ring
    /// continues where the previous one stopped.
    pub fn new(mem: &'m M, config: DeviceConfig) -> Result<Self, DeviceError> {
        let size = config.size;
        if !super::valid_size(size) || config.features.contains(Features::RING_PACKED) {
            return Err(DeviceError::InvalidSize);
        }
        let desc = translate_area(mem, config.desc_addr, super::desc_table_bytes(size), super::DESC_ALIGN)?;
        let avail = translate_area(mem, config.avail_addr, super::avail_bytes(size), super::AVAIL_ALIGN)?;
        let used = translate_area(mem, config.used_addr, super::used_bytes(size), super::USED_ALIGN)?;
        // SAFETY: each area was translated for its full length with the spec's alignment,
        // and `GuestMemory` keeps the pointers valid while `mem` is borrowed, i.e. for 'm.
        let ring = unsafe { SplitRing::new(desc, avail, used, size) };
        let used_idx = ring.used_idx().load();
        Ok(Self {
            mem,
            size,
            event_idx: config.features.contains(Features::EVENT_IDX),
            in_order: config.features.contains(Features::IN_ORDER),
            barriers: if config.features.contains(Features::ORDER_PLATFORM) {
                Barriers::Strong
            } else {
                Barriers::Weak
            },
            last_avail_idx: config.avail_base,
            avail_idx_cache: config.avail_base,
            used: UsedSide { idx: used_idx, published_idx: used_idx, unsignalled: 0, run: None },
            signalled_used_idx: used_idx,
            used_flags_shadow: ring.used_flags().load(),
            fault: None,
            ring,
        })
    }

    fn fail(&mut self, e: DeviceError) -> DeviceError {
        if e != DeviceError::SinkFull {
            self.fault.get_or_insert(e);
        }
        e
    }

    /// Pops the next available chain, collecting its segments (readable first) into
    /// `segs`. `Ok(None)` when the ring is empty.
    #[doc(alias = "vringh_getdesc_kern")]
    #[inline(always)]
    pub fn pop<S: SegmentSink<'m>>(&mut self, segs: &mut S) -> Result<Option<Chain>, DeviceError> {
        if self.fault.is_some() {
            return Err(DeviceError::Broken);
        }
        if self.last_avail_idx == self.avail_idx_cache {
            let avail_idx = self.ring.avail_idx().load();
            if avail_idx == self.last_avail_idx {
                return Ok(None);
            }
            if avail_idx.wrapping_sub(self.last_avail_idx) > self.size {
                return Err(self.fail(DeviceError::AvailIndexJump { avail_idx, last_avail_idx: self.last_avail_idx }));
            }
            self.avail_idx_cache = avail_idx;
            // Read the ring entries and descriptors only after the index that published
            // them; pairs with the driver's wmb before its `avail.idx` store
            // (`SplitLayout::add`).
            self.barriers.rmb();
        }
        let head = self.ring.avail_ring(self.last_avail_idx).load();
        if head >= self.size {
            return Err(self.fail(DeviceError::IndexOutOfRange { index: head as u32 }));
        }
        segs.clear();
        let first = self.ring.desc(head).read();
        match Self::walk(self.mem, &self.ring, self.size, head, first, segs) {
            Ok(chain) => {
                self.last_avail_idx = self.last_avail_idx.wrapping_add(1);
                Ok(Some(chain))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Walks the chain at `head`, whose descriptor `first` the caller read.
    #[inline(always)]
    fn walk<S: SegmentSink<'m>>(
        mem: &'m M,
        ring: &SplitRing,
        size: u16,
        head: u16,
        first: DescWords,
        segs: &mut S,
    ) -> Result<Chain, DeviceError> {
        let mut d = first;
        if d.lo16 & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 {
            return single_segment(mem, head, d.addr, d.len, d.lo16 & DESC_F_WRITE != 0, segs);
        }
        let mut chain = Chain::new(head);
        for n in 0..size {
            if n > 0 {
                d = ring.desc(d.hi16).read();
            }
            let flags = d.lo16;
            if flags & DESC_F_INDIRECT != 0 {
                if n != 0 || flags & DESC_F_NEXT != 0 {
                    return Err(DeviceError::MisplacedIndirect);
                }
                Self::walk_indirect(mem, d, &mut chain, segs)?;
                return Ok(chain);
            }
            push_segment(mem, d.addr, d.len, flags & DESC_F_WRITE != 0, &mut chain, segs)?;
            if flags & DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            if d.hi16 >= size {
                return Err(DeviceError::IndexOutOfRange { index: d.hi16 as u32 });
            }
        }
        // A ring of `size` descriptors holds chains of at most `size`.
        Err(DeviceError::ChainTooLong)
    }

    fn walk_indirect<S: SegmentSink<'m>>(
        mem: &'m M,
        table: DescWords,
        chain: &mut Chain,
        segs: &mut S,
    ) -> Result<(), DeviceError> {
        if table.len == 0 || !table.len.is_multiple_of(16) || table.len / 16 > MAX_INDIRECT_ENTRIES {
            return Err(DeviceError::BadIndirectLength { len: table.len });
        }
        let entries = table.len / 16;
        let host = translate_area(mem, table.addr, table.len as usize, 8)?;
        let mut i = 0u32;
        for _ in 0..entries {
            // SAFETY: `i < entries` and the table was translated for `16 * entries` bytes,
            // 8-aligned, valid for 'm (the `GuestMemory` contract).
            let d = unsafe { &*host.as_ptr().cast::<RawDesc>().add(i as usize) }.read();
            if d.lo16 & DESC_F_INDIRECT != 0 {
                return Err(DeviceError::NestedIndirect);
            }
            push_segment(mem, d.addr, d.len, d.lo16 & DESC_F_WRITE != 0, chain, segs)?;
            if d.lo16 & DESC_F_NEXT == 0 {
                return Ok(());
            }
            if d.hi16 as u32 >= entries {
                return Err(DeviceError::IndexOutOfRange { index: d.hi16 as u32 });
            }
            i = d.hi16 as u32;
        }
        Err(DeviceError::ChainTooLong)
    }

    /// Serves up to `max` available chains: hands each, with its segments (readable
    /// first), to `f`, and completes it with the number of bytes `f` says it wrote
    /// (clamped as [`Self::complete`] does). `segs` holds the segments of chains of more
    /// than one descriptor; a chain with more than `N` stays available and ends the call.
    /// With `IN_ORDER`, chains popped before and still held must be completed first.
    ///
    /// Returns how many chains were served. `Err` only when none was: `Broken`, a driver
    /// fault (which latches the queue broken), or `SinkFull`. A fault after the first
    /// chain ends the call early with the chains before it served; the next call returns
    /// `Err(Broken)`, and [`Self::fault`] says what it was.
    ///
    /// The device counterpart of the driver's burst calls, for devices that finish a
    /// request while they hold it (a network device's transmit queue, a null block
    /// device): one broken-flag check and one publish per call, and the ring state kept
    /// in registers across the chains.
    #[inline(always)]
    pub fn serve<const N: usize, F>(
        &mut self,
        max: usize,
        segs: &mut Segments<'m, N>,
        f: F,
    ) -> Result<usize, DeviceError>
    where
        F: FnMut(&Chain, &[Segment<'m>]) -> u32,
    {
        if self.fault.is_some() {
            return Err(DeviceError::Broken);
        }
        // One loop for each, so that the in-order test leaves the loop.
        if self.in_order {
            self.serve_loop::<true, N, F>(max, segs, f)
        } else {
            self.serve_loop::<false, N, F>(max, segs, f)
        }
    }

    #[inline(always)]
    fn serve_loop<const IN_ORDER: bool, const N: usize, F>(
        &mut self,
        max: usize,
        segs: &mut Segments<'m, N>,
        mut f: F,
    ) -> Result<usize, DeviceError>
    where
        F: FnMut(&Chain, &[Segment<'m>]) -> u32,
    {
        // Copies in locals: see `UsedSide`.
        let (mem, ring, size, barriers) = (self.mem, self.ring, self.size, self.barriers);
        let (mut next_avail, mut avail_idx_cache) = (self.last_avail_idx, self.avail_idx_cache);
        let mut used = self.used;
        let mut served = 0;
        let mut error = None;
        while served < max {
            // As in `pop`.
            if next_avail == avail_idx_cache {
                let avail_idx = ring.avail_idx().load();
                if avail_idx == next_avail {
                    break;
                }
                if avail_idx.wrapping_sub(next_avail) > size {
                    error = Some(DeviceError::AvailIndexJump { avail_idx, last_avail_idx: next_avail });
                    break;
                }
                avail_idx_cache = avail_idx;
                barriers.rmb();
            }
            let head = ring.avail_ring(next_avail).load();
            if head >= size {
                error = Some(DeviceError::IndexOutOfRange { index: head as u32 });
                break;
            }
            let d = ring.desc(head).read();
            // A single descriptor's segment stays in a local, out of the sink.
            let walked = if d.lo16 & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 {
                one_segment(mem, head, d.addr, d.len, d.lo16 & DESC_F_WRITE != 0).map(|(chain, seg)| {
                    let written = f(&chain, core::slice::from_ref(&seg));
                    (chain, written)
                })
            } else {
                segs.clear();
                Self::walk(mem, &ring, size, head, d, segs).map(|chain| {
                    let written = f(&chain, segs.as_slice());
                    (chain, written)
                })
            };
            match walked {
                Ok((chain, written)) => {
                    next_avail = next_avail.wrapping_add(1);
                    used.complete(&ring, barriers, IN_ORDER, chain, written);
                    served += 1;
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        used.publish(&ring, barriers);
        (self.last_avail_idx, self.avail_idx_cache) = (next_avail, avail_idx_cache);
        self.used = used;
        match error {
            Some(e) if served == 0 => Err(self.fail(e)),
            Some(e) => {
                self.fail(e);
                Ok(served)
            }
            None => Ok(served),
        }
    }

    /// Returns a chain to the driver with the number of bytes written into its writable
    /// part (clamped to that part's length). The used index is published by
    /// [`Self::publish_used`] or [`Self::needs_notification`] (or `enable_notifications`),
    /// so completions batch, and in any case each time a cache line of used elements (8
    /// completions) is complete.
    ///
    /// With `IN_ORDER`, consecutive completions that filled their whole writable part are
    /// merged into one used entry naming the last of them (VIRTIO 1.3, 2.7.9); chains must
    /// then be completed in the order they were popped.
    #[doc(alias = "vringh_complete_kern")]
    #[inline(always)]
    pub fn complete(&mut self, chain: Chain, written: u32) {
        self.used.complete(&self.ring, self.barriers, self.in_order, chain, written);
    }

    /// Makes every completion so far visible to the driver.
    #[inline(always)]
    pub fn publish_used(&mut self) {
        self.used.publish(&self.ring, self.barriers);
    }

    /// Publishes completions and says whether the driver wants an interrupt for them
    /// (`used_event` with `EVENT_IDX`, else the `NO_INTERRUPT` flag).
    #[doc(alias = "vringh_need_notify_kern")]
    pub fn needs_notification(&mut self) -> bool {
        self.publish_used();
        if self.used.unsignalled == 0 {
            return false;
        }
        // The `used.idx` store before reading the driver's event or flags; pairs with the
        // driver's mb between writing `used_event` and re-reading `used.idx`
        // (`DriverQueue::poll`, `SplitLayout::get_buf`, `enable_cb_delayed`).
        self.barriers.mb();
        let old = self.signalled_used_idx;
        let new = self.used.idx;
        let forced = self.used.unsignalled > 0xffff;
        self.signalled_used_idx = new;
        self.used.unsignalled = 0;
        if self.event_idx {
            forced || need_event(self.ring.used_event().load(), new, old)
        } else {
            self.ring.avail_flags().load() & AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Asks the driver to kick on new buffers. Returns true if buffers are already
    /// available (or the queue is broken), in which case the device must not sleep: their
    /// kick may never come.
    #[doc(alias = "vringh_notify_enable_kern")]
    pub fn enable_notifications(&mut self) -> bool {
        // A device about to sleep must not keep completions back.
        self.publish_used();
        if self.event_idx {
            self.ring.avail_event().store(self.last_avail_idx);
        } else if self.used_flags_shadow != 0 {
            self.used_flags_shadow = 0;
            self.ring.used_flags().store(0);
        }
        // The event (or flag) store before re-reading `avail.idx`; pairs with the driver's
        // mb between publishing `avail.idx` and reading `avail_event` / `used.flags`
        // (`SplitLayout::kick_prepare`).
        self.barriers.mb();
        self.fault.is_some() || self.ring.avail_idx().load() != self.last_avail_idx
    }

    /// Asks the driver not to kick (a hint; with `EVENT_IDX` a stale `avail_event`
    /// already keeps kicks away).
    #[doc(alias = "vringh_notify_disable_kern")]
    pub fn disable_notifications(&mut self) {
        if !self.event_idx && self.used_flags_shadow != USED_F_NO_NOTIFY {
            self.used_flags_shadow = USED_F_NO_NOTIFY;
            self.ring.used_flags().store(USED_F_NO_NOTIFY);
        }
    }

    /// Number of ring entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The next available entry to process (vhost-user `GET_VRING_BASE`).
    pub fn avail_base(&self) -> u16 {
        self.last_avail_idx
    }

    /// The next used entry to be written.
    pub fn used_idx(&self) -> u16 {
        self.used.idx
    }

    /// The driver error that broke the queue, if any.
    pub fn fault(&self) -> Option<DeviceError> {
        self.fault
    }

    /// Whether the queue is broken.
    pub fn is_broken(&self) -> bool {
        self.fault.is_some()
    }

    /// The guest memory this queue uses.
    pub fn memory(&self) -> &'m M {
        self.mem
    }
}

impl UsedSide {
    /// See [`SplitDevice::complete`].
    #[inline(always)]
    fn complete(&mut self, ring: &SplitRing, barriers: Barriers, in_order: bool, chain: Chain, written: u32) {
        let written = written.min(chain.writable_len());
        if in_order {
            if let Some(run) = &mut self.run {
                run.last_id = chain.id as u32;
                run.last_len = written;
                run.count += 1;
            } else {
                self.run =
                    Some(InOrderRun { first: self.idx as u32, last_id: chain.id as u32, last_len: written, count: 1 });
            }
            if written != chain.writable_len() {
                // The driver gives earlier buffers of a batch their full length; a short
                // one must end its batch.
                self.flush_run(ring);
            }
        } else {
            write_used(ring, self.idx, chain.id, written);
        }
        self.idx = self.idx.wrapping_add(1);
        self.unsignalled += 1;
        if self.idx.is_multiple_of(USED_LINE) {
            self.publish(ring, barriers);
        }
    }

    #[inline(always)]
    fn flush_run(&mut self, ring: &SplitRing) {
        // Test before taking: `take` would store `None` on every publish.
        if self.run.is_some() {
            if let Some(run) = self.run.take() {
                write_used(ring, run.first as u16, run.last_id as u16, run.last_len);
            }
        }
    }

    #[inline(always)]
    fn publish(&mut self, ring: &SplitRing, barriers: Barriers) {
        self.flush_run(ring);
        if self.idx != self.published_idx {
            // The used entries before the index that publishes them; pairs with the
            // driver's rmb after it reads `used.idx` (`SplitLayout::get_buf`).
            barriers.wmb();
            ring.used_idx().store(self.idx);
            self.published_idx = self.idx;
        }
    }
}

#[inline(always)]
fn write_used(ring: &SplitRing, idx: u16, id: u16, len: u32) {
    let (id_field, len_field) = ring.used_elem(idx);
    // An entry unchanged from the previous lap (buffers that come back in the order they
    // went out, with the same length) is not stored again: the store would take the line
    // from the driver, which then misses on it. The loads read the device's own writes,
    // and decide nothing but whether to store.
    if id_field.load() != id as u32 || len_field.load() != len {
        id_field.store(id as u32);
        len_field.store(len);
    }
}
