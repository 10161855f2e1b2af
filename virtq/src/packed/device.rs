//! The device half of the packed ring.
//!
//! Every descriptor of a chain is read once after its head's flags showed it available,
//! and must itself be marked available for its lap; the chain may not be longer than the
//! ring. A malformed ring gives a [`DeviceError`] and latches the queue broken.

use super::{
    is_avail, used_bits, Cursor, PackedRing, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, EVENT_FLAGS_DESC,
    EVENT_FLAGS_DISABLE, EVENT_FLAGS_ENABLE, WRAP_BIT,
};
use crate::device::{
    one_segment, push_segment, single_segment, translate_area, Chain, DeviceConfig, DeviceError, InOrderRun, Segment,
    SegmentSink, Segments,
};
use crate::event::need_event;
use crate::memory::GuestMemory;
use crate::shared::{DescWords, RawDesc};
use crate::split::device::MAX_INDIRECT_ENTRIES;
use crate::{Barriers, Features};

/// The device's end of a packed virtqueue, borrowing guest memory for `'m`.
pub struct PackedDevice<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    ring: PackedRing,
    event_idx: bool,
    in_order: bool,
    barriers: Barriers,
    /// Where the next available descriptor is expected, and the driver's wrap counter there.
    avail: Cursor,
    /// Where completions go, and those not yet visible to the driver.
    used: UsedSide,
    event_flags_shadow: u16,
    fault: Option<DeviceError>,
}

/// The used half of the device's state: where completions go, and those not yet visible
/// to the driver. Apart from the rest so that `serve` can work on a copy that the
/// compiler keeps in registers (the ring's fences would make it reload fields of `self`
/// for every chain).
#[derive(Clone, Copy)]
struct UsedSide {
    /// Where the next used descriptor goes, and the device's wrap counter there.
    cursor: Cursor,
    /// Positions the cursor moved since the last interrupt decision.
    unsignalled: u32,
    run: Option<InOrderRun>,
    pending: PendingUsed,
}

/// Used descriptors whose id and length are written but whose flags are not yet: they are
/// published together, a cache line (4 descriptors) at a time, so that the line moves to
/// the driver once per 4 completions rather than once per completion. Each entry is
/// `position | flags << 16`, stored and loaded as one 32-bit word (see `InOrderRun` on
/// why not two 16-bit fields).
#[derive(Clone, Copy)]
struct PendingUsed {
    entries: [u32; USED_LINE],
    len: usize,
}

/// Descriptors per 64-byte cache line.
const USED_LINE: usize = 4;

/// Most buffers an in-order used descriptor covers before `complete` publishes it: a long
/// drain hands descriptors back along the way. Since the driver prefetches the lines it
/// refills, 16 streams more than 8 (1.19 times, 8 of 8 alternating runs at batch 32; 32
/// gave 1.24, 6 of 8), with ringtest unchanged (1.02).
const IN_ORDER_RUN_MAX: u32 = 16;

impl<'m, M: GuestMemory + ?Sized> PackedDevice<'m, M> {
    /// Attaches to a packed ring the driver set up; the three areas are translated and
    /// checked once.
    pub fn new(mem: &'m M, config: DeviceConfig) -> Result<Self, DeviceError> {
        let size = config.size;
        let (avail, used) = (Cursor::from_base(config.avail_base), Cursor::from_base(config.used_base));
        if !super::valid_size(size)
            || !config.features.contains(Features::RING_PACKED)
            || avail.pos() >= size
            || used.pos() >= size
        {
            return Err(DeviceError::InvalidSize);
        }
        let desc = translate_area(mem, config.desc_addr, 16 * size as usize, 16)?;
        let driver = translate_area(mem, config.avail_addr, 4, 4)?;
        let device = translate_area(mem, config.used_addr, 4, 4)?;
        // SAFETY: each area was translated for its full length with the spec's alignment,
        // and `GuestMemory` keeps the pointers valid while `mem` is borrowed, i.e. for 'm.
        let ring = unsafe { PackedRing::new(desc, driver, device, size) };
        Ok(Self {
            mem,
            event_idx: config.features.contains(Features::EVENT_IDX),
            in_order: config.features.contains(Features::IN_ORDER),
            barriers: if config.features.contains(Features::ORDER_PLATFORM) {
                Barriers::Strong
            } else {
                Barriers::Weak
            },
            avail,
            used: UsedSide {
                cursor: used,
                unsignalled: 0,
                run: None,
                pending: PendingUsed { entries: [0; USED_LINE], len: 0 },
            },
            event_flags_shadow: ring.device_flags().load(),
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
    /// `segs`. `Ok(None)` when no descriptor is available.
    #[inline(always)]
    pub fn pop<S: SegmentSink<'m>>(&mut self, segs: &mut S) -> Result<Option<Chain>, DeviceError> {
        if self.fault.is_some() {
            return Err(DeviceError::Broken);
        }
        let head_flags = self.ring.flags(self.avail.pos()).load();
        if !is_avail(head_flags, self.avail.wrap()) {
            return Ok(None);
        }
        // The rest of the chain only after the head's flags that published it; pairs with
        // the driver's wmb before it writes them (`PackedLayout::add`).
        self.barriers.rmb();
        segs.clear();
        match Self::walk(self.mem, &self.ring, self.avail, head_flags, segs) {
            Ok((chain, next)) => {
                self.avail = next;
                Ok(Some(chain))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Walks the chain whose head is at `at`; returns it and the position after it.
    #[inline(always)]
    fn walk<S: SegmentSink<'m>>(
        mem: &'m M,
        ring: &PackedRing,
        at: Cursor,
        head_flags: u16,
        segs: &mut S,
    ) -> Result<(Chain, Cursor), DeviceError> {
        let size = ring.size();
        if head_flags & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 {
            let d = ring.desc(at.pos()).read();
            let chain = single_segment(mem, d.lo16, d.addr, d.len, head_flags & DESC_F_WRITE != 0, segs)?;
            return Ok((chain, at.advance(1, size)));
        }
        let (mut pos, mut wrap) = (at.pos(), at.wrap());
        let mut chain = Chain::new(0);
        loop {
            let d = ring.desc(pos).read();
            // The head's flags were read already (that read published the chain); later
            // descriptors' flags come with their single read here.
            let flags = if chain.descs == 0 { head_flags } else { d.hi16 };
            if chain.descs > 0 && !is_avail(flags, wrap) {
                return Err(DeviceError::BadDescriptorFlags);
            }
            chain.descs += 1;
            // The buffer id is in the last descriptor (VIRTIO 1.3, 2.8.6).
            chain.id = d.lo16;
            pos += 1;
            if pos == size {
                pos = 0;
                wrap = !wrap;
            }
            if flags & DESC_F_INDIRECT != 0 {
                if chain.descs != 1 || flags & DESC_F_NEXT != 0 {
                    return Err(DeviceError::MisplacedIndirect);
                }
                Self::walk_indirect(mem, d, &mut chain, segs)?;
                return Ok((chain, Cursor::new(pos, wrap)));
            }
            push_segment(mem, d.addr, d.len, flags & DESC_F_WRITE != 0, &mut chain, segs)?;
            if flags & DESC_F_NEXT == 0 {
                return Ok((chain, Cursor::new(pos, wrap)));
            }
            if chain.descs == size {
                return Err(DeviceError::ChainTooLong);
            }
        }
    }

    /// A packed indirect table is a plain array of `len / 16` descriptors; their `NEXT`
    /// flags are not used (VIRTIO 1.3, 2.8.19).
    fn walk_indirect<S: SegmentSink<'m>>(
        mem: &'m M,
        table: DescWords,
        chain: &mut Chain,
        segs: &mut S,
    ) -> Result<(), DeviceError> {
        if table.len == 0 || !table.len.is_multiple_of(16) || table.len / 16 > MAX_INDIRECT_ENTRIES {
            return Err(DeviceError::BadIndirectLength { len: table.len });
        }
        let host = translate_area(mem, table.addr, table.len as usize, 8)?;
        for i in 0..(table.len / 16) as usize {
            // SAFETY: `i < len / 16` and the table was translated for `len` bytes,
            // 8-aligned, valid for 'm.
            let d = unsafe { &*host.as_ptr().cast::<RawDesc>().add(i) }.read();
            if d.hi16 & DESC_F_INDIRECT != 0 {
                return Err(DeviceError::NestedIndirect);
            }
            push_segment(mem, d.addr, d.len, d.hi16 & DESC_F_WRITE != 0, chain, segs)?;
        }
        Ok(())
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
        let (mem, ring, barriers) = (self.mem, self.ring, self.barriers);
        let mut avail = self.avail;
        let mut used = self.used;
        let mut served = 0;
        let mut error = None;
        while served < max {
            let head_flags = ring.flags(avail.pos()).load();
            if !is_avail(head_flags, avail.wrap()) {
                break;
            }
            // As in `pop`.
            barriers.rmb();
            // A single descriptor's segment stays in a local, out of the sink.
            let walked = if head_flags & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 {
                let d = ring.desc(avail.pos()).read();
                one_segment(mem, d.lo16, d.addr, d.len, head_flags & DESC_F_WRITE != 0).map(|(chain, seg)| {
                    let written = f(&chain, core::slice::from_ref(&seg));
                    (chain, written, avail.advance(1, ring.size()))
                })
            } else {
                segs.clear();
                Self::walk(mem, &ring, avail, head_flags, segs).map(|(chain, next)| {
                    let written = f(&chain, segs.as_slice());
                    (chain, written, next)
                })
            };
            match walked {
                Ok((chain, written, next)) => {
                    avail = next;
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
        self.avail = avail;
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

    /// Returns a chain to the driver with the number of bytes written (clamped to its
    /// writable part): one used descriptor at the used position, which then skips the
    /// chain's descriptors. With `IN_ORDER`, up to 16 consecutive full completions share one
    /// used descriptor (VIRTIO 1.3, 2.8.21).
    ///
    /// The driver sees completions once [`Self::publish_used`] (or `needs_notification`,
    /// or `enable_notifications`) runs, and in any case each time a cache line of used
    /// descriptors (or, in order, a run of 16) is complete.
    #[inline(always)]
    pub fn complete(&mut self, chain: Chain, written: u32) {
        self.used.complete(&self.ring, self.barriers, self.in_order, chain, written);
    }

    /// Makes every completion so far visible to the driver.
    #[inline(always)]
    pub fn publish_used(&mut self) {
        self.used.publish(&self.ring, self.barriers);
    }

    /// Publishes completions and says whether the driver wants an interrupt for them,
    /// from one read of the driver area.
    pub fn needs_notification(&mut self) -> bool {
        self.publish_used();
        if self.used.unsignalled == 0 {
            return false;
        }
        // The used flags before reading the driver area; pairs with the driver's mb after
        // it moves its event (`DriverQueue::poll`, `PackedLayout::enable_cb_delayed`).
        self.barriers.mb();
        let moved = core::mem::take(&mut self.used.unsignalled);
        let (off_wrap, flags) = self.ring.load_driver_event();
        if flags != EVENT_FLAGS_DESC || !self.event_idx {
            return flags != EVENT_FLAGS_DISABLE;
        }
        let size = self.ring.size();
        let mut event = off_wrap & !WRAP_BIT;
        if event >= size || moved >= size as u32 {
            // An offset outside the ring, or more than a lap since the last decision: the
            // event cannot be placed, so interrupt rather than risk losing one.
            return true;
        }
        if (off_wrap & WRAP_BIT != 0) != self.used.cursor.wrap() {
            event = event.wrapping_sub(size);
        }
        let new = self.used.cursor.pos();
        need_event(event, new, new.wrapping_sub(moved as u16))
    }

    /// Asks the driver to kick on new buffers. Returns true if a buffer is already
    /// available (or the queue is broken): then the device must not sleep.
    pub fn enable_notifications(&mut self) -> bool {
        // A device about to sleep must not keep completions back.
        self.publish_used();
        let flags = if self.event_idx {
            self.ring.device_off_wrap().store(self.avail.base());
            // The offset before the flags: the driver reads both in one load.
            self.barriers.wmb();
            EVENT_FLAGS_DESC
        } else {
            EVENT_FLAGS_ENABLE
        };
        if self.event_flags_shadow != flags {
            self.event_flags_shadow = flags;
            self.ring.device_flags().store(flags);
        }
        // The event before re-checking the ring; pairs with the driver's mb between
        // publishing a head and reading the device area (`PackedLayout::kick_prepare`).
        self.barriers.mb();
        self.fault.is_some() || is_avail(self.ring.flags(self.avail.pos()).load(), self.avail.wrap())
    }

    /// Asks the driver not to kick (a hint).
    pub fn disable_notifications(&mut self) {
        if self.event_flags_shadow != EVENT_FLAGS_DISABLE {
            self.event_flags_shadow = EVENT_FLAGS_DISABLE;
            self.ring.device_flags().store(EVENT_FLAGS_DISABLE);
        }
    }

    /// Number of ring entries.
    pub fn size(&self) -> u16 {
        self.ring.size()
    }

    /// Where popping resumes: position with the wrap counter in bit 15 (vhost-user
    /// `GET_VRING_BASE`).
    pub fn avail_base(&self) -> u16 {
        self.avail.base()
    }

    /// Where the next used descriptor goes, with the wrap counter in bit 15.
    pub fn used_base(&self) -> u16 {
        self.used.cursor.base()
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
    /// See [`PackedDevice::complete`].
    #[inline(always)]
    fn complete(&mut self, ring: &PackedRing, barriers: Barriers, in_order: bool, chain: Chain, written: u32) {
        let written = written.min(chain.writable_len());
        if in_order {
            let count = if let Some(run) = &mut self.run {
                run.last_id = chain.id as u32;
                run.last_len = written;
                run.count += 1;
                run.count
            } else {
                self.run = Some(InOrderRun {
                    first: self.cursor.bits(),
                    last_id: chain.id as u32,
                    last_len: written,
                    count: 1,
                });
                1
            };
            self.advance(chain.descs, ring.size());
            // The driver gives earlier buffers of a batch their full length, so a short one
            // ends its batch. A long run is published along the way, so that the driver can
            // reuse those descriptors while the device is still draining.
            if written != chain.writable_len() || count == IN_ORDER_RUN_MAX {
                self.flush_run(ring, barriers);
            }
        } else {
            let pos = self.cursor.pos();
            // A descriptor that holds this id and length already (the driver put the id
            // there and the device wrote the whole buffer) is left alone: the store would
            // take the line back from a driver that may still be filling the rest of it,
            // long before the flags go out (ringtest's packed rate rose 15 to 35%). The
            // load hits, the line is here from the pop, and decides only whether to store:
            // a driver that rewrote the descriptor meanwhile gets its own values back.
            let desc = ring.desc(pos);
            if !desc.holds_len_lo16(written, chain.id) {
                desc.lo16().store(chain.id);
                desc.len().store(written);
            }
            let flags = used_bits(self.cursor.wrap()) | if written > 0 { DESC_F_WRITE } else { 0 };
            self.pending.entries[self.pending.len] = pos as u32 | (flags as u32) << 16;
            self.pending.len += 1;
            self.advance(chain.descs, ring.size());
            if self.pending.len == USED_LINE || (self.cursor.pos() as usize).is_multiple_of(USED_LINE) {
                self.pending.flush(ring, barriers);
            }
        }
    }

    #[inline(always)]
    fn advance(&mut self, descs: u16, size: u16) {
        self.cursor = self.cursor.advance(descs, size);
        self.unsignalled += descs as u32;
    }

    #[inline(always)]
    fn flush_run(&mut self, ring: &PackedRing, barriers: Barriers) {
        // Test before taking: `take` would store `None` on every publish.
        if self.run.is_some() {
            if let Some(run) = self.run.take() {
                let first = Cursor::from_bits(run.first);
                let desc = ring.desc(first.pos());
                desc.lo16().store(run.last_id as u16);
                desc.len().store(run.last_len);
                // The id and length before the flags that publish them; pairs with the
                // driver's rmb after it sees the flags (`PackedLayout::get_buf`).
                barriers.wmb();
                let written = if run.last_len > 0 { DESC_F_WRITE } else { 0 };
                ring.flags(first.pos()).store(used_bits(first.wrap()) | written);
            }
        }
    }

    #[inline(always)]
    fn publish(&mut self, ring: &PackedRing, barriers: Barriers) {
        self.flush_run(ring, barriers);
        self.pending.flush(ring, barriers);
    }
}

impl PendingUsed {
    /// Publishes the held-back used descriptors, last first, so that the driver finds the
    /// whole group at once.
    #[inline(always)]
    fn flush(&mut self, ring: &PackedRing, barriers: Barriers) {
        if self.len > 0 {
            // The ids and lengths before the flags that publish them; pairs with the
            // driver's rmb after it sees the flags (`PackedLayout::get_buf`).
            barriers.wmb();
            for &entry in self.entries[..self.len].iter().rev() {
                ring.flags(entry as u16).store((entry >> 16) as u16);
            }
            self.len = 0;
        }
    }
}
