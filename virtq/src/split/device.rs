//! The device half of the split ring: the steps in which it differs from the packed ring,
//! for [`crate::Device`].

use super::{
    Descriptor, SplitRing, AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY,
};
use crate::device::queue::{order_for, DeviceRing, Head, OrderMode};
use crate::device::{
    push_segment, translate_area, Chain, DeviceConfig, DeviceError, InOrderRun, IndirectTable, SegmentSink,
};
use crate::event::need_event;
use crate::memory::GuestMemory;
use crate::{Barriers, Features};

/// The split ring's half of a device queue. [`crate::SplitDevice`] and
/// [`crate::SplitInOrderDevice`] fix the order in the type, [`crate::DeviceQueue`] takes it
/// from the features ([`OrderMode`]).
#[derive(Clone, Copy)]
pub struct SplitDeviceLayout<O: OrderMode> {
    order: O,
    ring: SplitRing,
    size: u16,
    event_idx: bool,
    indirect: bool,
    last_avail_idx: u16,
    /// The last `avail.idx` read and validated; entries before it need no new fence.
    avail_idx_cache: u16,
    /// Where completions go, and those not yet visible to the driver.
    used: UsedSide,
    /// `used.idx` at the last interrupt decision (vringh's `last_used_idx`).
    signalled_used_idx: u16,
    used_flags_shadow: u16,
}

/// Used elements per 64-byte cache line. `complete` publishes `used.idx` each time the
/// line fills, so that a device draining a long run hands buffers back along the way and
/// the line moves to the driver once, full, rather than once per completion.
const USED_LINE: u16 = 8;

/// The used half of the device's state.
#[derive(Clone, Copy)]
struct UsedSide {
    /// Next used index to hand out (entries up to it are written or in `run`).
    idx: u16,
    /// What `used.idx` holds in memory.
    published_idx: u16,
    /// Completions since the last interrupt decision: past 0xffff the event window aliases.
    unsignalled: u32,
    run: InOrderRun,
}

impl<O: OrderMode> SplitDeviceLayout<O> {
    /// Walks the indirect table of the chain's head `table` (VIRTIO 1.3, 2.7.5.3): a chain
    /// of its own, linked by `next` within the table.
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
        let entries = table.entries();
        let mut i = 0;
        for _ in 0..entries {
            // SAFETY: `i` is 0 or a `next` checked against `entries` below; `mem` is
            // borrowed for 'm.
            let d: Descriptor = unsafe { table.read::<_, ALIGNED>(i) };
            if d.flags & DESC_F_INDIRECT != 0 {
                return Err(DeviceError::NestedIndirect);
            }
            push_segment(mem, d.addr, d.len, d.flags & DESC_F_WRITE != 0, &mut chain, segs)?;
            if d.flags & DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            if d.next as u32 >= entries {
                return Err(DeviceError::IndexOutOfRange { index: d.next as u32 });
            }
            i = d.next as u32;
        }
        Err(DeviceError::ChainTooLong)
    }
}

impl<O: OrderMode> DeviceRing for SplitDeviceLayout<O> {
    const PACKED: bool = false;
    type Desc = Descriptor;

    #[inline(always)]
    fn in_order(&self) -> bool {
        self.order.in_order()
    }

    fn attach<M: GuestMemory + ?Sized>(mem: &M, config: &DeviceConfig) -> Result<Self, DeviceError> {
        let order = order_for(config, Self::PACKED)?;
        let size = config.size;
        if !super::valid_size(size) {
            return Err(DeviceError::InvalidSize);
        }
        let desc = translate_area(mem, config.desc_addr, super::desc_table_bytes(size), super::DESC_ALIGN)?;
        let avail = translate_area(mem, config.avail_addr, super::avail_bytes(size), super::AVAIL_ALIGN)?;
        let used = translate_area(mem, config.used_addr, super::used_bytes(size), super::USED_ALIGN)?;
        // SAFETY: each area was translated for its full length with the spec's alignment,
        // and `GuestMemory` keeps the pointers valid while `mem` is borrowed, which
        // `Device` does for as long as it holds this ring.
        let ring = unsafe { SplitRing::new(desc, avail, used, size) };
        let used_idx = ring.used_idx().load();
        Ok(Self {
            order,
            size,
            event_idx: config.features.contains(Features::EVENT_IDX),
            indirect: config.features.contains(Features::INDIRECT_DESC),
            last_avail_idx: config.avail_base,
            avail_idx_cache: config.avail_base,
            used: UsedSide { idx: used_idx, published_idx: used_idx, unsignalled: 0, run: InOrderRun::EMPTY },
            signalled_used_idx: used_idx,
            used_flags_shadow: ring.used_flags().load(),
            ring,
        })
    }

    #[inline(always)]
    fn size(&self) -> u16 {
        self.size
    }

    #[inline(always)]
    fn next_head(&mut self, barriers: Barriers) -> Result<Option<u16>, DeviceError> {
        if self.last_avail_idx == self.avail_idx_cache {
            let avail_idx = self.ring.avail_idx().load();
            if avail_idx == self.last_avail_idx {
                return Ok(None);
            }
            if avail_idx.wrapping_sub(self.last_avail_idx) > self.size {
                return Err(DeviceError::AvailIndexJump { avail_idx, last_avail_idx: self.last_avail_idx });
            }
            self.avail_idx_cache = avail_idx;
            // Read the ring entries and descriptors only after the index that published
            // them; pairs with the driver's wmb before its `avail.idx` store
            // (`SplitDriverLayout::add`).
            barriers.rmb();
        }
        let head = self.ring.avail_ring(self.last_avail_idx).load();
        if head >= self.size {
            return Err(DeviceError::IndexOutOfRange { index: head as u32 });
        }
        Ok(Some(head))
    }

    #[inline(always)]
    fn head(&self, index: u16) -> Head<Descriptor> {
        let desc: Descriptor = self.ring.desc(index).read();
        Head { id: index, flags: desc.flags, desc }
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
        let mut d = head.desc;
        let mut chain = Chain::new(head.id);
        for n in 0..self.size {
            if n > 0 {
                d = self.ring.desc(d.next).read();
            }
            if d.flags & DESC_F_INDIRECT != 0 {
                if !self.indirect {
                    return Err(DeviceError::IndirectNotNegotiated);
                }
                if n != 0 || d.flags & DESC_F_NEXT != 0 {
                    return Err(DeviceError::MisplacedIndirect);
                }
                return Self::walk_indirect(mem, d, chain, segs);
            }
            push_segment(mem, d.addr, d.len, d.flags & DESC_F_WRITE != 0, &mut chain, segs)?;
            if d.flags & DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            if d.next >= self.size {
                return Err(DeviceError::IndexOutOfRange { index: d.next as u32 });
            }
        }
        // A ring of `size` descriptors holds chains of at most `size`.
        Err(DeviceError::ChainTooLong)
    }

    #[inline(always)]
    fn take_positions(&mut self, copy: &Self) {
        (self.last_avail_idx, self.avail_idx_cache, self.used) = (copy.last_avail_idx, copy.avail_idx_cache, copy.used);
    }

    #[inline(always)]
    fn consume(&mut self, _chain: &Chain) {
        self.consume_single();
    }

    #[inline(always)]
    fn consume_single(&mut self) {
        self.last_avail_idx = self.last_avail_idx.wrapping_add(1);
    }

    #[inline(always)]
    fn complete(&mut self, barriers: Barriers, chain: Chain, written: u32, in_order: bool) {
        self.used.complete(&self.ring, barriers, in_order, chain, written);
    }

    #[inline(always)]
    fn publish_used(&mut self, barriers: Barriers) {
        self.used.publish(&self.ring, barriers);
    }

    #[inline(always)]
    fn unsignalled(&self) -> bool {
        self.used.unsignalled != 0
    }

    fn wants_interrupt(&mut self) -> bool {
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

    fn enable_notifications(&mut self, barriers: Barriers) -> bool {
        // A device about to sleep must not keep completions back.
        self.publish_used(barriers);
        if self.event_idx {
            self.ring.avail_event().store(self.last_avail_idx);
        } else if self.used_flags_shadow != 0 {
            self.used_flags_shadow = 0;
            self.ring.used_flags().store(0);
        }
        // The event (or flag) store before re-reading `avail.idx`; pairs with the driver's
        // mb between publishing `avail.idx` and reading `avail_event` / `used.flags`
        // (`SplitDriverLayout::kick_prepare`).
        barriers.mb();
        self.ring.avail_idx().load() != self.last_avail_idx
    }

    fn disable_notifications(&mut self) {
        if !self.event_idx && self.used_flags_shadow != USED_F_NO_NOTIFY {
            self.used_flags_shadow = USED_F_NO_NOTIFY;
            self.ring.used_flags().store(USED_F_NO_NOTIFY);
        }
    }

    fn avail_base(&self) -> u16 {
        self.last_avail_idx
    }

    fn used_base(&self) -> u16 {
        self.used.idx
    }
}

impl UsedSide {
    /// See [`DeviceRing::complete`].
    #[inline(always)]
    fn complete(&mut self, ring: &SplitRing, barriers: Barriers, in_order: bool, chain: Chain, written: u32) {
        let written = written.min(chain.writable_len());
        if in_order {
            self.run.add(self.idx as u32, chain.id, written);
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

    /// Writes the used entry of the in-order run, if there is one.
    #[inline(always)]
    fn flush_run(&mut self, ring: &SplitRing) {
        if let Some(run) = self.run.take() {
            write_used(ring, run.first as u16, run.last_id as u16, run.last_len);
        }
    }

    #[inline(always)]
    fn publish(&mut self, ring: &SplitRing, barriers: Barriers) {
        self.flush_run(ring);
        if self.idx != self.published_idx {
            // The used entries before the index that publishes them; pairs with the
            // driver's rmb after it reads `used.idx` (`SplitDriverLayout::get_buf`).
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
