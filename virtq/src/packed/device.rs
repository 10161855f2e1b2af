//! The device half of the packed ring: the steps in which it differs from the split ring,
//! for [`crate::Device`].
//!
//! Every descriptor of a chain is read once after its head's flags showed it available,
//! and must itself be marked available for its lap; the chain may not be longer than the
//! ring.

use super::{
    is_avail, used_bits, Cursor, Descriptor, PackedRing, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, EVENT_FLAGS_DESC,
    EVENT_FLAGS_DISABLE, EVENT_FLAGS_ENABLE, WRAP_BIT,
};
use crate::device::queue::{order_for, DeviceRing, Head, OrderMode};
use crate::device::{
    push_segment, translate_area, Chain, DeviceConfig, DeviceError, InOrderRun, IndirectTable, SegmentSink,
};
use crate::event::need_event;
use crate::memory::GuestMemory;
use crate::{Barriers, Features};

/// The packed ring's half of a device queue. [`crate::PackedDevice`] and
/// [`crate::PackedInOrderDevice`] fix the order in the type, [`crate::DeviceQueue`] takes it
/// from the features ([`OrderMode`]).
#[derive(Clone, Copy)]
pub struct PackedDeviceLayout<O: OrderMode> {
    order: O,
    ring: PackedRing,
    event_idx: bool,
    indirect: bool,
    /// Where the next available descriptor is expected, and the driver's wrap counter there.
    avail: Cursor,
    /// Where completions go, and those not yet visible to the driver.
    used: UsedSide,
    event_flags_shadow: u16,
}

/// The used half of the device's state: where completions go, and those not yet visible
/// to the driver.
#[derive(Clone, Copy)]
struct UsedSide {
    /// Where the next used descriptor goes, and the device's wrap counter there.
    cursor: Cursor,
    /// Positions the cursor moved since the last interrupt decision.
    unsignalled: u32,
    run: InOrderRun,
    pending: PendingUsed,
}

/// Used descriptors whose id and length are written but whose flags are not yet: they are
/// published together, a cache line (4 descriptors) at a time, so that the line moves to
/// the driver once per 4 completions rather than once per completion. Not an array:
/// indexing one by the count would keep the compiler from holding `serve`'s copy of the
/// device state in registers. Not a `u128` either: shifting one in memory compiles to a
/// load that straddles the two halves stored by the last push, which cannot be forwarded
/// from the store buffer and so waits for every store before it, the used descriptors'
/// included, to reach the cache.
#[derive(Clone, Copy)]
struct PendingUsed {
    /// Each entry's position, with [`PENDING_WRITTEN`] if the device wrote to its buffer,
    /// 16 bits each, the newest in the low bits.
    entries: u64,
    /// Each entry's wrap counter, a bit each, the newest in bit 0.
    wraps: u32,
    len: usize,
}

/// In a [`PendingUsed`] entry: the device wrote to the buffer (positions are below 2^15).
const PENDING_WRITTEN: u16 = 1 << 15;

/// Descriptors per 64-byte cache line.
const USED_LINE: usize = 4;

/// Most buffers an in-order used descriptor covers before `complete` publishes it: a long
/// drain hands descriptors back along the way, which the driver, prefetching the lines it
/// refills, reuses while the device is still draining. Longer runs stream better up to
/// about this length (`docs/performance.md`).
const IN_ORDER_RUN_MAX: u32 = 16;

impl<O: OrderMode> PackedDeviceLayout<O> {
    /// A packed indirect table is a plain array of `len / 16` descriptors; their `NEXT`
    /// flags are not used (VIRTIO 1.3, 2.8.19).
    fn walk_indirect<'m, M: GuestMemory + ?Sized, S: SegmentSink<'m>>(
        mem: &'m M,
        table: Descriptor,
        chain: Chain,
        segs: &mut S,
    ) -> Result<Chain, DeviceError> {
        let table = IndirectTable::new(mem, table.addr, table.len)?;
        if table.aligned() {
            Self::walk_table::<M, S, true>(mem, table, chain, segs)
        } else {
            Self::walk_table::<M, S, false>(mem, table, chain, segs)
        }
    }

    #[inline(always)]
    fn walk_table<'m, M: GuestMemory + ?Sized, S: SegmentSink<'m>, const ALIGNED: bool>(
        mem: &'m M,
        table: IndirectTable,
        mut chain: Chain,
        segs: &mut S,
    ) -> Result<Chain, DeviceError> {
        for i in 0..table.entries() {
            // SAFETY: `i < entries`; `mem` is borrowed for 'm.
            let d: Descriptor = unsafe { table.read::<_, ALIGNED>(i) };
            if d.flags & DESC_F_INDIRECT != 0 {
                return Err(DeviceError::NestedIndirect);
            }
            push_segment(mem, d.addr, d.len, d.flags & DESC_F_WRITE != 0, &mut chain, segs)?;
        }
        Ok(chain)
    }
}

impl<O: OrderMode> DeviceRing for PackedDeviceLayout<O> {
    const PACKED: bool = true;
    type Desc = Descriptor;

    #[inline(always)]
    fn in_order(&self) -> bool {
        self.order.in_order()
    }

    fn attach<M: GuestMemory + ?Sized>(mem: &M, config: &DeviceConfig) -> Result<Self, DeviceError> {
        let order = order_for(config, Self::PACKED)?;
        let size = config.size;
        let (avail, used) = (Cursor::from_base(config.avail_base), Cursor::from_base(config.used_base));
        if !super::valid_size(size) || avail.pos() >= size || used.pos() >= size {
            return Err(DeviceError::InvalidSize);
        }
        let desc = translate_area(mem, config.desc_addr, 16 * size as usize, 16)?;
        let driver = translate_area(mem, config.avail_addr, 4, 4)?;
        let device = translate_area(mem, config.used_addr, 4, 4)?;
        // SAFETY: each area was translated for its full length with the spec's alignment,
        // and `GuestMemory` keeps the pointers valid while `mem` is borrowed, which
        // `Device` does for as long as it holds this ring.
        let ring = unsafe { PackedRing::new(desc, driver, device, size) };
        Ok(Self {
            order,
            event_idx: config.features.contains(Features::EVENT_IDX),
            indirect: config.features.contains(Features::INDIRECT_DESC),
            avail,
            used: UsedSide {
                cursor: used,
                unsignalled: 0,
                run: InOrderRun::EMPTY,
                pending: PendingUsed { entries: 0, wraps: 0, len: 0 },
            },
            event_flags_shadow: ring.device_flags().load(),
            ring,
        })
    }

    #[inline(always)]
    fn size(&self) -> u16 {
        self.ring.size()
    }

    #[inline(always)]
    fn next_head(&mut self, barriers: Barriers) -> Result<Option<u16>, DeviceError> {
        let flags = self.ring.flags(self.avail.pos()).load();
        if !is_avail(flags, self.avail.wrap()) {
            return Ok(None);
        }
        // The rest of the chain only after the head's flags that published it; pairs with
        // the driver's wmb before it writes them (`PackedDriverLayout::add`).
        barriers.rmb();
        Ok(Some(flags))
    }

    #[inline(always)]
    fn head(&self, flags: u16) -> Head<Descriptor> {
        // The flags come from the load that published the head; the copy of them in the
        // descriptor's second word is not used.
        let desc: Descriptor = self.ring.desc(self.avail.pos()).read();
        Head { id: desc.id, flags, desc }
    }

    #[inline(always)]
    fn single(desc: &Descriptor) -> (u64, u32) {
        (desc.addr, desc.len)
    }

    #[inline(always)]
    fn walk<'m, M: GuestMemory + ?Sized, S: SegmentSink<'m>>(
        &self,
        mem: &'m M,
        head: Head<Descriptor>,
        segs: &mut S,
    ) -> Result<Chain, DeviceError> {
        let size = self.ring.size();
        let (mut d, mut flags) = (head.desc, head.flags);
        let mut chain = Chain::new(d.id);
        chain.descs = 1;
        if flags & DESC_F_INDIRECT != 0 {
            if !self.indirect {
                return Err(DeviceError::IndirectNotNegotiated);
            }
            if flags & DESC_F_NEXT != 0 {
                return Err(DeviceError::MisplacedIndirect);
            }
            return Self::walk_indirect(mem, d, chain, segs);
        }
        let (mut pos, mut wrap) = (self.avail.pos(), self.avail.wrap());
        loop {
            push_segment(mem, d.addr, d.len, flags & DESC_F_WRITE != 0, &mut chain, segs)?;
            if flags & DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            if chain.descs == size {
                return Err(DeviceError::ChainTooLong);
            }
            pos += 1;
            if pos == size {
                pos = 0;
                wrap = !wrap;
            }
            // Each descriptor after the head, flags included, in one read; it must be
            // available on its own lap.
            d = self.ring.desc(pos).read();
            flags = d.flags;
            if !is_avail(flags, wrap) {
                return Err(DeviceError::BadDescriptorFlags);
            }
            if flags & DESC_F_INDIRECT != 0 {
                return Err(DeviceError::MisplacedIndirect);
            }
            chain.descs += 1;
            // The buffer id is in the last descriptor (VIRTIO 1.3, 2.8.6).
            chain.id = d.id;
        }
    }

    #[inline(always)]
    fn take_positions(&mut self, copy: &Self) {
        (self.avail, self.used) = (copy.avail, copy.used);
    }

    #[inline(always)]
    fn consume(&mut self, chain: &Chain) {
        self.avail = self.avail.advance(chain.descs, self.ring.size());
    }

    #[inline(always)]
    fn consume_single(&mut self) {
        self.avail = self.avail.advance(1, self.ring.size());
    }

    #[inline(always)]
    fn complete(&mut self, barriers: Barriers, chain: Chain, written: u32, in_order: bool) {
        let (ring, used) = (&self.ring, &mut self.used);
        let written = written.min(chain.writable_len());
        if in_order {
            let count = used.run.add(used.cursor.bits(), chain.id, written);
            used.advance(chain.descs, ring.size());
            // The driver gives earlier buffers of a batch their full length, so a short one
            // ends its batch. A long run is published along the way, so that the driver can
            // reuse those descriptors while the device is still draining.
            if written != chain.writable_len() || count == IN_ORDER_RUN_MAX {
                used.flush_run(ring, barriers);
            }
        } else {
            let pos = used.cursor.pos();
            // A descriptor that holds this id and length already (the driver put the id
            // there and the device wrote the whole buffer) is left alone: the store would
            // take the line back from a driver that may still be filling the rest of it,
            // long before the flags go out. The load decides only whether to store: a
            // driver that rewrote the descriptor meanwhile gets its own values back. It
            // is made only where the values can match, a writable part written whole:
            // elsewhere (a buffer only read, a frame shorter than its buffer) it would
            // fetch a line the driver took back for reading, just before the store
            // fetches it again for writing.
            let may_hold = written != 0 && written == chain.writable_len();
            if !may_hold || !ring.holds_len_id(pos, written, chain.id) {
                ring.id(pos).store(chain.id);
                ring.desc(pos).len().store(written);
            }
            used.pending.push(pos, used.cursor.wrap(), written > 0);
            used.advance(chain.descs, ring.size());
            if used.pending.len == USED_LINE || (used.cursor.pos() as usize).is_multiple_of(USED_LINE) {
                used.pending.flush(ring, barriers);
            }
        }
    }

    #[inline(always)]
    fn publish_used(&mut self, barriers: Barriers) {
        self.used.flush_run(&self.ring, barriers);
        self.used.pending.flush(&self.ring, barriers);
    }

    #[inline(always)]
    fn unsignalled(&self) -> bool {
        self.used.unsignalled != 0
    }

    fn wants_interrupt(&mut self) -> bool {
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

    fn enable_notifications(&mut self, barriers: Barriers) -> bool {
        // A device about to sleep must not keep completions back.
        self.publish_used(barriers);
        let flags = if self.event_idx {
            self.ring.device_off_wrap().store(self.avail.base());
            // The offset before the flags: the driver reads both in one load.
            barriers.wmb();
            EVENT_FLAGS_DESC
        } else {
            EVENT_FLAGS_ENABLE
        };
        if self.event_flags_shadow != flags {
            self.event_flags_shadow = flags;
            self.ring.device_flags().store(flags);
        }
        // The event before re-checking the ring; pairs with the driver's mb between
        // publishing a head and reading the device area (`PackedDriverLayout::kick_prepare`).
        barriers.mb();
        is_avail(self.ring.flags(self.avail.pos()).load(), self.avail.wrap())
    }

    fn disable_notifications(&mut self) {
        if self.event_flags_shadow != EVENT_FLAGS_DISABLE {
            self.event_flags_shadow = EVENT_FLAGS_DISABLE;
            self.ring.device_flags().store(EVENT_FLAGS_DISABLE);
        }
    }

    fn avail_base(&self) -> u16 {
        self.avail.base()
    }

    fn used_base(&self) -> u16 {
        self.used.cursor.base()
    }
}

impl UsedSide {
    #[inline(always)]
    fn advance(&mut self, descs: u16, size: u16) {
        self.cursor = self.cursor.advance(descs, size);
        self.unsignalled += descs as u32;
    }

    /// Publishes the used descriptor of the in-order run, if there is one.
    #[inline(always)]
    fn flush_run(&mut self, ring: &PackedRing, barriers: Barriers) {
        if let Some(run) = self.run.take() {
            let first = Cursor::from_bits(run.first);
            ring.id(first.pos()).store(run.last_id as u16);
            ring.desc(first.pos()).len().store(run.last_len);
            // The id and length before the flags that publish them; pairs with the
            // driver's rmb after it sees the flags (`PackedDriverLayout::get_buf`).
            barriers.wmb();
            let written = if run.last_len > 0 { DESC_F_WRITE } else { 0 };
            ring.flags(first.pos()).store(used_bits(first.wrap()) | written);
        }
    }
}

impl PendingUsed {
    /// Holds back one more entry (at most [`USED_LINE`]).
    #[inline(always)]
    fn push(&mut self, pos: u16, wrap: bool, written: bool) {
        debug_assert!(self.len < USED_LINE && pos < PENDING_WRITTEN);
        self.entries = self.entries << 16 | u64::from(pos | if written { PENDING_WRITTEN } else { 0 });
        self.wraps = self.wraps << 1 | u32::from(wrap);
        self.len += 1;
    }

    /// Publishes the held-back used descriptors, last first, so that the driver finds the
    /// whole group at once.
    #[inline(always)]
    fn flush(&mut self, ring: &PackedRing, barriers: Barriers) {
        if self.len > 0 {
            // The ids and lengths before the flags that publish them; pairs with the
            // driver's rmb after it sees the flags (`PackedDriverLayout::get_buf`).
            barriers.wmb();
            let (mut entries, mut wraps) = (self.entries, self.wraps);
            for _ in 0..self.len {
                let entry = entries as u16;
                let written = if entry & PENDING_WRITTEN != 0 { DESC_F_WRITE } else { 0 };
                ring.flags(entry & !PENDING_WRITTEN).store(used_bits(wraps & 1 != 0) | written);
                entries >>= 16;
                wraps >>= 1;
            }
            self.len = 0;
        }
    }
}
