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
    push_segment, single_segment, translate_area, Chain, DeviceConfig, DeviceError, InOrderRun, SegmentSink,
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
    /// Where the next used descriptor goes, and the device's wrap counter there.
    used: Cursor,
    /// Positions the used cursor moved since the last interrupt decision.
    unsignalled: u32,
    event_flags_shadow: u16,
    run: Option<InOrderRun>,
    /// Used descriptors whose id and length are written but whose flags are not yet: they
    /// are published together, a cache line (4 descriptors) at a time, so that the line
    /// moves to the driver once per 4 completions rather than once per completion. Each
    /// entry is `position | flags << 16`, stored and loaded as one 32-bit word (see
    /// `InOrderRun` on why not two 16-bit fields).
    pending: [u32; USED_LINE],
    pending_len: usize,
    fault: Option<DeviceError>,
}

/// Descriptors per 64-byte cache line.
const USED_LINE: usize = 4;

/// Most buffers an in-order used descriptor covers before `complete` publishes it. Against
/// holding a whole drain back, 8 gave streaming at batch 32 about 10% more (`virtq bench`,
/// alternating runs).
const IN_ORDER_RUN_MAX: u32 = 8;

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
            used,
            unsignalled: 0,
            event_flags_shadow: ring.device_flags().load(),
            run: None,
            pending: [0; USED_LINE],
            pending_len: 0,
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
        match self.walk(head_flags, segs) {
            Ok((chain, next)) => {
                self.avail = next;
                Ok(Some(chain))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Walks the chain at the available position; returns it and the position after it.
    #[inline(always)]
    fn walk<S: SegmentSink<'m>>(&self, head_flags: u16, segs: &mut S) -> Result<(Chain, Cursor), DeviceError> {
        let size = self.ring.size();
        if head_flags & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 {
            let d = self.ring.desc(self.avail.pos()).read();
            let chain = single_segment(self.mem, d.lo16, d.addr, d.len, head_flags & DESC_F_WRITE != 0, segs)?;
            return Ok((chain, self.avail.advance(1, size)));
        }
        let (mut pos, mut wrap) = (self.avail.pos(), self.avail.wrap());
        let mut chain = Chain::new(0);
        loop {
            let d = self.ring.desc(pos).read();
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
                self.walk_indirect(d, &mut chain, segs)?;
                return Ok((chain, Cursor::new(pos, wrap)));
            }
            push_segment(self.mem, d.addr, d.len, flags & DESC_F_WRITE != 0, &mut chain, segs)?;
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
        &self,
        table: DescWords,
        chain: &mut Chain,
        segs: &mut S,
    ) -> Result<(), DeviceError> {
        if table.len == 0 || !table.len.is_multiple_of(16) || table.len / 16 > MAX_INDIRECT_ENTRIES {
            return Err(DeviceError::BadIndirectLength { len: table.len });
        }
        let host = translate_area(self.mem, table.addr, table.len as usize, 8)?;
        for i in 0..(table.len / 16) as usize {
            // SAFETY: `i < len / 16` and the table was translated for `len` bytes,
            // 8-aligned, valid for 'm.
            let d = unsafe { &*host.as_ptr().cast::<RawDesc>().add(i) }.read();
            if d.hi16 & DESC_F_INDIRECT != 0 {
                return Err(DeviceError::NestedIndirect);
            }
            push_segment(self.mem, d.addr, d.len, d.hi16 & DESC_F_WRITE != 0, chain, segs)?;
        }
        Ok(())
    }

    /// Returns a chain to the driver with the number of bytes written (clamped to its
    /// writable part): one used descriptor at the used position, which then skips the
    /// chain's descriptors. With `IN_ORDER`, up to 8 consecutive full completions share one
    /// used descriptor (VIRTIO 1.3, 2.8.21).
    ///
    /// The driver sees completions once [`Self::publish_used`] (or `needs_notification`,
    /// or `enable_notifications`) runs, and in any case each time a cache line of used
    /// descriptors (or, in order, a run of 8) is complete.
    #[inline(always)]
    pub fn complete(&mut self, chain: Chain, written: u32) {
        let written = written.min(chain.writable_len());
        if self.in_order {
            let count = if let Some(run) = &mut self.run {
                run.last_id = chain.id as u32;
                run.last_len = written;
                run.count += 1;
                run.count
            } else {
                self.run =
                    Some(InOrderRun { first: self.used.bits(), last_id: chain.id as u32, last_len: written, count: 1 });
                1
            };
            self.advance_used(chain.descs);
            // The driver gives earlier buffers of a batch their full length, so a short one
            // ends its batch. A long run is published along the way, so that the driver can
            // reuse those descriptors while the device is still draining.
            if written != chain.writable_len() || count == IN_ORDER_RUN_MAX {
                self.flush_run();
            }
        } else {
            let pos = self.used.pos();
            let desc = self.ring.desc(pos);
            desc.lo16().store(chain.id);
            desc.len().store(written);
            let flags = used_bits(self.used.wrap()) | if written > 0 { DESC_F_WRITE } else { 0 };
            self.pending[self.pending_len] = pos as u32 | (flags as u32) << 16;
            self.pending_len += 1;
            self.advance_used(chain.descs);
            if self.pending_len == USED_LINE || (self.used.pos() as usize).is_multiple_of(USED_LINE) {
                self.flush_pending();
            }
        }
    }

    /// Publishes the held-back used descriptors, last first, so that the driver finds the
    /// whole group at once.
    #[inline(always)]
    fn flush_pending(&mut self) {
        if self.pending_len > 0 {
            // The ids and lengths before the flags that publish them; pairs with the
            // driver's rmb after it sees the flags (`PackedLayout::get_buf`).
            self.barriers.wmb();
            for &entry in self.pending[..self.pending_len].iter().rev() {
                self.ring.flags(entry as u16).store((entry >> 16) as u16);
            }
            self.pending_len = 0;
        }
    }

    fn advance_used(&mut self, descs: u16) {
        self.used = self.used.advance(descs, self.ring.size());
        self.unsignalled += descs as u32;
    }

    fn write_used(&self, pos: u16, wrap: bool, id: u16, len: u32) {
        let desc = self.ring.desc(pos);
        desc.lo16().store(id);
        desc.len().store(len);
        // The id and length before the flags that publish them; pairs with the driver's
        // rmb after it sees the flags (`PackedLayout::get_buf`).
        self.barriers.wmb();
        let written = if len > 0 { DESC_F_WRITE } else { 0 };
        self.ring.flags(pos).store(used_bits(wrap) | written);
    }

    #[inline(always)]
    fn flush_run(&mut self) {
        // Test before taking: `take` would store `None` on every publish.
        if self.run.is_some() {
            if let Some(run) = self.run.take() {
                let first = Cursor::from_bits(run.first);
                self.write_used(first.pos(), first.wrap(), run.last_id as u16, run.last_len);
            }
        }
    }

    /// Makes every completion so far visible to the driver.
    #[inline(always)]
    pub fn publish_used(&mut self) {
        self.flush_run();
        self.flush_pending();
    }

    /// Publishes completions and says whether the driver wants an interrupt for them,
    /// from one read of the driver area.
    pub fn needs_notification(&mut self) -> bool {
        self.publish_used();
        if self.unsignalled == 0 {
            return false;
        }
        // The used flags before reading the driver area; pairs with the driver's mb after
        // it moves its event (`DriverQueue::poll`, `PackedLayout::enable_cb_delayed`).
        self.barriers.mb();
        let moved = core::mem::take(&mut self.unsignalled);
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
        if (off_wrap & WRAP_BIT != 0) != self.used.wrap() {
            event = event.wrapping_sub(size);
        }
        let new = self.used.pos();
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
        self.used.base()
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
