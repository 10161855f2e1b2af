//! The driver half of the split ring, with and without `VIRTIO_F_IN_ORDER`.
//!
//! Everything the device writes (used index, used entries, `avail_event`, `used.flags`)
//! is read once, validated, and a bad value latches the queue broken with nothing lost:
//! tokens stay recoverable with `detach_unused_buf`.
//!
//! In-order (`IN_ORDER = true`): buffers take descriptors sequentially, so there is no
//! free list to walk, and the device may return a whole batch with one used entry that
//! names the batch's last buffer. Earlier buffers of the batch come back with their full
//! writable length, as in Linux.

use core::sync::atomic::{AtomicU16, Ordering::Relaxed};

use super::{
    ContiguousAreas, Descriptor, SplitRing, AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
    USED_F_NO_NOTIFY,
};
use crate::driver::core::{AddPlan, Buffer, DescExtra, DriverCore, FreeList, Index, PRIV_TABLE};
use crate::driver::queue::{DriverLayout, Sealed};
use crate::driver::{AddError, AddErrorKind, CreateError, DriverQueue, Fault, Notify, NotifyData, QueueConfig, Sg};
use crate::event::need_event;
use crate::memory::{Dma, DmaRegion};
use crate::Features;
use crate::LayoutKind;

/// The split ring layout, for [`DriverQueue`]. `IN_ORDER` selects `VIRTIO_F_IN_ORDER`.
pub struct SplitDriverLayout<const IN_ORDER: bool> {
    ring: SplitRing,
    /// The ring memory, when the queue allocated it (not for `new_in`).
    region: Option<DmaRegion>,
    addrs: [u64; 3],
    /// Free descriptors; unused in order, where the links stay sequential.
    free: FreeList,
    avail_idx_shadow: Index,
    last_used_idx: Index,
    /// The last `used.idx` read; entries before it were validated and fenced already.
    used_idx_cache: Index,
    /// In-order: head of the oldest buffer in flight.
    last_used: Index,
    /// In-order: a used entry covering buffers up to head `.0`, which gets length `.1`.
    batch_last: Option<(u16, u32)>,
    /// Mirrors `NO_INTERRUPT` as the driver wants it, with or without event idx. Atomic
    /// because `disable_cb` takes `&self`.
    avail_flags_shadow: AtomicU16,
}

/// A driver queue on a split ring.
pub type SplitDriver<T, D, N> = DriverQueue<T, D, N, SplitDriverLayout<false>>;
/// A driver queue on a split ring with `VIRTIO_F_IN_ORDER`.
pub type SplitInOrderDriver<T, D, N> = DriverQueue<T, D, N, SplitDriverLayout<true>>;

impl<const IN_ORDER: bool> Sealed for SplitDriverLayout<IN_ORDER> {}

impl<const IN_ORDER: bool> SplitDriverLayout<IN_ORDER> {
    fn check(config: &QueueConfig) -> Result<(), CreateError> {
        if config.features.contains(Features::RING_PACKED) || config.features.contains(Features::IN_ORDER) != IN_ORDER {
            return Err(CreateError::WrongLayout);
        }
        if !super::valid_size(config.size) {
            return Err(CreateError::InvalidSize);
        }
        if !config.vring_align.is_power_of_two() || config.vring_align < 4 {
            return Err(CreateError::InvalidAlign);
        }
        Ok(())
    }

    /// # Safety
    ///
    /// `region` holds `ContiguousAreas::new(size, align).total` bytes, 16-aligned, valid
    /// for as long as the layout exists.
    unsafe fn build(region: &DmaRegion, size: u16, align: usize) -> (SplitRing, [u64; 3]) {
        let layout = ContiguousAreas::new(size, align);
        let base = region.cpu;
        // SAFETY: the offsets come from the same layout, which puts the available ring at
        // `16 * size` (2-aligned) and the used ring at a multiple of `align >= 4`, all
        // inside the region the caller vouches for.
        let ring = unsafe { SplitRing::new(base, base.add(layout.avail_offset), base.add(layout.used_offset), size) };
        let d = region.device_addr;
        (ring, [d, d + layout.avail_offset as u64, d + layout.used_offset as u64])
    }

    fn with_ring(ring: SplitRing, region: Option<DmaRegion>, addrs: [u64; 3]) -> Self {
        Self {
            free: FreeList::full(ring.size()),
            ring,
            region,
            addrs,
            avail_idx_shadow: Index::new(0),
            last_used_idx: Index::new(0),
            used_idx_cache: Index::new(0),
            last_used: Index::new(0),
            batch_last: None,
            avail_flags_shadow: AtomicU16::new(0),
        }
    }

    /// Writes a direct chain from `head` along the private links. Returns the writable
    /// length, the chain's last descriptor and the first descriptor after it, or `Err`
    /// after undoing the mappings made.
    #[inline(always)]
    fn write_chain<T, D: Dma, N: Notify>(
        &self,
        core: &mut DriverCore<T, D, N>,
        head: u16,
        buf: &Buffer<'_>,
        total: u16,
        premapped: bool,
    ) -> Result<(u32, u16, u16), ()> {
        let mut i = head;
        let mut tail = head;
        let mut writable = 0u32;
        buf.try_for_each(|n, sg, is_in| {
            let Some((addr, priv_flags)) = core.map(sg, is_in, premapped) else {
                core.unmap_chain(head, n);
                return Err(());
            };
            let mut flags = if is_in { DESC_F_WRITE } else { 0 };
            if n + 1 != total as usize {
                flags |= DESC_F_NEXT;
            }
            if is_in {
                writable = writable.saturating_add(sg.len);
            }
            core.record(i, addr, sg.len, flags | priv_flags);
            let next = core.extra[i as usize].next;
            self.ring.desc(i).write_if_changed(Descriptor { addr, len: sg.len, flags, next });
            tail = i;
            i = next;
            Ok(())
        })?;
        Ok((writable, tail, i))
    }

    /// [`Self::write_chain`] when there is nothing to map or record (premapped, or a DMA
    /// that does not map): nothing can fail, and the ring's pointer and mask and the
    /// private links are copied to locals first, as the compiler cannot tell that the
    /// descriptor stores leave them alone and would reload them for every segment. Each
    /// descriptor is written when the next segment shows it is not the last, with `NEXT`,
    /// and the last one after the loop without it: no per-segment test of the position,
    /// and every descriptor stored once, so that one unchanged from the previous lap is
    /// not stored at all. The writable length is summed in 64 bits (no overflow from at
    /// most 2^16 segments) and saturated once.
    #[inline(always)]
    fn write_chain_unmapped(&self, extra: &[DescExtra], head: u16, buf: &Buffer<'_>) -> (u32, u16, u16) {
        let ring = self.ring;
        let (mut i, mut writable) = (head, 0u64);
        let mut last = Descriptor::default();
        let mut tail = head;
        let _ = buf.try_for_each(|n, sg, is_in| {
            if n != 0 {
                ring.desc(tail).write_if_changed(Descriptor { flags: last.flags | DESC_F_NEXT, ..last });
            }
            if is_in {
                writable += sg.len as u64;
            }
            let next = extra[i as usize].next;
            last = Descriptor { addr: sg.addr, len: sg.len, flags: if is_in { DESC_F_WRITE } else { 0 }, next };
            tail = i;
            i = next;
            Ok(())
        });
        ring.desc(tail).write_if_changed(last);
        (writable.min(u32::MAX as u64) as u32, tail, i)
    }

    /// Puts `head` in the available ring slot of index `idx`. When buffers come back in
    /// the order they went out (always in order, and usually otherwise, as the free list
    /// is a queue), the slot already holds this head from the previous lap: the store,
    /// which would steal the cache line from the device, is skipped.
    #[inline(always)]
    fn put_avail(&self, idx: u16, head: u16) {
        put_avail(&self.ring, idx, head)
    }

    /// Whether a used entry is waiting at `last_used_idx`: loads `used.idx` when the cached
    /// one is exhausted, validates it and fences.
    #[inline(always)]
    fn used_ready<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> bool {
        if self.last_used_idx.get() != self.used_idx_cache.get() {
            return true;
        }
        let used_idx = self.ring.used_idx().load();
        if used_idx == self.last_used_idx.get() {
            return false;
        }
        let in_flight = self.avail_idx_shadow.get().wrapping_sub(self.last_used_idx.get());
        if used_idx.wrapping_sub(self.last_used_idx.get()) > in_flight {
            core.fail(Fault::UsedIndexRanAhead { used_idx, last_used_idx: self.last_used_idx.get() });
            return false;
        }
        self.used_idx_cache.set(used_idx);
        // Read the used entries only after the index that published them; pairs with the
        // device's wmb before it stores `used.idx` (`SplitDevice::publish_used`).
        core.barriers.rmb();
        true
    }

    /// After buffers came back: ask for an interrupt at the next entry, if callbacks are
    /// on, and make that store visible before the next read of `used.idx`. Pairs with the
    /// device's mb before it reads `used_event` (`SplitDevice::needs_notification`).
    /// `get_bufs` stores it once for the whole burst: the device acts only on the last
    /// value.
    #[inline(always)]
    fn move_used_event<T, D: Dma, N: Notify>(&self, core: &DriverCore<T, D, N>) {
        if core.event_idx && self.avail_flags_shadow.load(Relaxed) & AVAIL_F_NO_INTERRUPT == 0 {
            self.ring.used_event().store(self.last_used_idx.get());
            core.barriers.mb();
        }
    }

    /// `get_buf` but for the event store: takes back the next used buffer, if any.
    #[inline(always)]
    fn take_next<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> Option<(T, u32, Option<usize>)> {
        if !IN_ORDER {
            if !self.used_ready(core) {
                return None;
            }
            let (id_field, len_field) = self.ring.used_elem(self.last_used_idx.get());
            let (id, len) = (id_field.load(), len_field.load());
            let (token, ctx, _) = core.take_used(id, len, &mut self.free)?;
            self.last_used_idx.set(self.last_used_idx.get().wrapping_add(1));
            return Some((token, len, ctx));
        }
        // Each buffer, batched or not, takes one step of the published `used.idx`: a batch
        // entry cannot return buffers the device has not published.
        if !self.used_ready(core) {
            return None;
        }
        let batch = match self.batch_last {
            Some(batch) => batch,
            None => {
                let (id_field, len_field) = self.ring.used_elem(self.last_used_idx.get());
                let (id, len) = (id_field.load(), len_field.load());
                if !core.check_used(id, len) {
                    return None;
                }
                *self.batch_last.insert((id as u16, len))
            }
        };
        let head = self.last_used.get();
        let taken = core.take_in_order(head, batch, &mut self.free)?;
        if taken.ends_batch {
            self.batch_last = None;
        }
        self.last_used.set(head.wrapping_add(taken.descs) & (self.ring.size() - 1));
        self.last_used_idx.set(self.last_used_idx.get().wrapping_add(1));
        Some((taken.token, taken.len, taken.ctx))
    }

    fn enable_interrupts<T, D: Dma, N: Notify>(&self, core: &DriverCore<T, D, N>) {
        let shadow = self.avail_flags_shadow.load(Relaxed);
        if shadow & AVAIL_F_NO_INTERRUPT != 0 {
            self.avail_flags_shadow.store(shadow & !AVAIL_F_NO_INTERRUPT, Relaxed);
            if !core.event_idx {
                self.ring.avail_flags().store(shadow & !AVAIL_F_NO_INTERRUPT);
            }
        }
    }
}

#[allow(private_interfaces)]
impl<const IN_ORDER: bool> DriverLayout for SplitDriverLayout<IN_ORDER> {
    type Device = crate::split::device::SplitDeviceLayout<crate::device::Fixed<IN_ORDER>>;

    fn kind(&self) -> LayoutKind {
        if IN_ORDER {
            LayoutKind::SplitInOrder
        } else {
            LayoutKind::Split
        }
    }

    fn create<D: Dma>(config: &QueueConfig, dma: &D) -> Result<Self, CreateError> {
        Self::check(config)?;
        let mut size = config.size;
        let region = loop {
            let layout = ContiguousAreas::new(size, config.vring_align);
            match dma.alloc_zeroed(layout.total, config.vring_align.max(16)) {
                Some(r) => break r,
                None if config.may_reduce_num && size > 1 => size /= 2,
                None => return Err(CreateError::NoMemory),
            }
        };
        // SAFETY: the region was allocated for this layout, 16-aligned, and is freed only
        // in `free`, when the layout is going away.
        let (ring, addrs) = unsafe { Self::build(&region, size, config.vring_align) };
        Ok(Self::with_ring(ring, Some(region), addrs))
    }

    unsafe fn create_in(config: &QueueConfig, memory: DmaRegion) -> Result<Self, CreateError> {
        Self::check(config)?;
        if memory.size < ContiguousAreas::new(config.size, config.vring_align).total
            || !(memory.cpu.as_ptr() as usize).is_multiple_of(16)
        {
            return Err(CreateError::RegionTooSmall);
        }
        // SAFETY: checked size and alignment; validity for the queue's life is the
        // caller's promise (`DriverQueue::new_in`).
        let (ring, addrs) = unsafe { Self::build(&memory, config.size, config.vring_align) };
        Ok(Self::with_ring(ring, None, addrs))
    }

    fn size(&self) -> u16 {
        self.ring.size()
    }

    fn free<D: Dma>(&mut self, dma: &D) {
        if let Some(r) = self.region.take() {
            // SAFETY: allocated by this allocator in `create`; the queue is going away.
            unsafe { dma.free(r) };
        }
    }

    fn addresses(&self) -> [u64; 3] {
        self.addrs
    }

    // Inlined into each `add_*` so that the shape of its `Buffer` is known at compile time.
    #[inline(always)]
    fn add<T, D: Dma, N: Notify>(
        &mut self,
        core: &mut DriverCore<T, D, N>,
        buf: &Buffer<'_>,
        token: T,
        ctx: Option<usize>,
        premapped: bool,
    ) -> Result<(), AddError<T>> {
        let (plan, token): (AddPlan, T) = core.plan(buf, token, ctx)?;
        if core.num_free < plan.descs {
            // Linux forces a notify here "for historical reasons" when the buffer has
            // readable parts, so that a device slow to look is prodded.
            if buf.has_readable() {
                core.shared.notifier.notify(NotifyData { queue_index: core.index, next: self.avail_idx_shadow.get() });
            }
            return Err(AddError { kind: AddErrorKind::NoSpace, token });
        }
        let head = self.free.head.get();
        // Each branch starts the buffer itself, so that each `start` knows `plan.indirect`.
        let next_free = if plan.indirect {
            let written = core.write_table(head, buf, plan.total, premapped, true).map(|(table, writable)| {
                let len = 16 * plan.total as u32;
                core.record(head, table, len, DESC_F_INDIRECT | PRIV_TABLE);
                let next = core.extra[head as usize].next;
                self.ring.desc(head).write_if_changed(Descriptor { addr: table, len, flags: DESC_F_INDIRECT, next });
                (writable, next)
            });
            let Ok((writable, next_free)) = written else {
                return Err(AddError { kind: AddErrorKind::NoMemory, token });
            };
            core.start(head, token, ctx, &plan, writable, head, premapped);
            next_free
        } else {
            let written = if premapped || !D::MAPS {
                Ok(self.write_chain_unmapped(&core.extra, head, buf))
            } else {
                self.write_chain(core, head, buf, plan.total, premapped)
            };
            let Ok((writable, tail, next_free)) = written else {
                return Err(AddError { kind: AddErrorKind::NoMemory, token });
            };
            core.start(head, token, ctx, &plan, writable, tail, premapped);
            next_free
        };
        // In order, the private links stay sequential, so this is `head + descs`.
        self.free.head.set(next_free);

        let avail_idx = self.avail_idx_shadow.get();
        self.put_avail(avail_idx, head);
        // Descriptors and the ring entry before the index that publishes them; pairs with
        // the device's rmb after it reads `avail.idx` (`SplitDevice::pop`).
        core.barriers.wmb();
        let avail_idx = avail_idx.wrapping_add(1);
        self.avail_idx_shadow.set(avail_idx);
        self.ring.avail_idx().store(avail_idx);
        core.num_added = core.num_added.wrapping_add(1);
        if core.num_added == u16::MAX {
            // The kick window `[shadow - num_added, shadow)` would alias at 2^16 unkicked
            // adds; Linux kicks here "just in case".
            if self.kick_prepare(core) {
                core.shared.notify(NotifyData { queue_index: core.index, next: self.avail_idx_shadow.get() });
            }
        }
        Ok(())
    }

    #[inline(always)]
    fn add_each<T, D: Dma, N: Notify>(
        &mut self,
        core: &mut DriverCore<T, D, N>,
        sgs: &[Sg],
        writable: bool,
        premapped: bool,
        token: &mut impl FnMut(usize) -> T,
    ) -> usize {
        if core.num_free == 0 && !writable {
            // As in `add`: Linux's historical prod of a device slow to look.
            core.shared.notifier.notify(NotifyData { queue_index: core.index, next: self.avail_idx_shadow.get() });
            return 0;
        }
        let flags = if writable { DESC_F_WRITE } else { 0 };
        let first_idx = self.avail_idx_shadow.get();
        // Copies in locals, so that they stay in registers across the stores of the loop.
        let ring = self.ring;
        let mut free_head = self.free.head.get();
        let mut added = 0;
        for (i, &sg) in sgs.iter().take(core.num_free as usize).enumerate() {
            let head = free_head;
            let Some((addr, priv_flags)) = core.map(sg, writable, premapped) else { break };
            core.record(head, addr, sg.len, flags | priv_flags);
            let next = core.extra[head as usize].next;
            ring.desc(head).write_if_changed(Descriptor { addr, len: sg.len, flags, next });
            core.start_one(head, token(i), if writable { sg.len } else { 0 }, premapped);
            free_head = next;
            put_avail(&ring, first_idx.wrapping_add(added), head);
            added += 1;
        }
        self.free.head.set(free_head);
        if added > 0 {
            core.num_free -= added;
            // One index store publishes the batch; pairs with the device's rmb after it
            // reads `avail.idx` (`SplitDevice::pop`).
            core.barriers.wmb();
            let avail_idx = first_idx.wrapping_add(added);
            self.avail_idx_shadow.set(avail_idx);
            self.ring.avail_idx().store(avail_idx);
            core.num_added = core.num_added.wrapping_add(added);
        }
        added as usize
    }

    fn kick_prepare<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> bool {
        // The avail index store before the load of the device's event or flags. Pairs with
        // the device's mb between enabling notifications and re-reading `avail.idx`
        // (`SplitDevice::enable_notifications`): one of the two sides sees the other.
        core.barriers.mb();
        let new = self.avail_idx_shadow.get();
        let old = new.wrapping_sub(core.num_added);
        core.num_added = 0;
        if core.event_idx {
            need_event(self.ring.avail_event().load(), new, old)
        } else {
            self.ring.used_flags().load() & USED_F_NO_NOTIFY == 0
        }
    }

    fn next_avail(&self) -> u16 {
        self.avail_idx_shadow.get()
    }

    #[inline(always)]
    fn get_buf<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> Option<(T, u32, Option<usize>)> {
        let used = self.take_next(core)?;
        self.move_used_event(core);
        Some(used)
    }

    #[inline(always)]
    fn get_each<T, D: Dma, N: Notify>(
        &mut self,
        core: &mut DriverCore<T, D, N>,
        max: usize,
        f: &mut impl FnMut(T, u32, Option<usize>),
    ) -> usize {
        let mut n = 0;
        while n < max {
            let Some((token, len, ctx)) = self.take_next(core) else { break };
            n += 1;
            f(token, len, ctx);
        }
        if n > 0 {
            self.move_used_event(core);
        }
        n
    }

    fn disable_cb<T, D: Dma, N: Notify>(&self, core: &DriverCore<T, D, N>) {
        let shadow = self.avail_flags_shadow.load(Relaxed);
        if shadow & AVAIL_F_NO_INTERRUPT != 0 {
            return;
        }
        self.avail_flags_shadow.store(shadow | AVAIL_F_NO_INTERRUPT, Relaxed);
        // After an interrupt with event idx the device will not send another until
        // `used_event` moves, so the ring write would only cost a cache miss.
        if core.event_triggered.load(Relaxed) {
            return;
        }
        if core.event_idx {
            // As Linux: park `used_event` far behind; `enable_cb*` moves it back.
            self.ring.used_event().store(0);
        } else {
            self.ring.avail_flags().store(shadow | AVAIL_F_NO_INTERRUPT);
        }
    }

    fn enable_cb_prepare<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> u16 {
        self.enable_interrupts(core);
        self.ring.used_event().store(self.last_used_idx.get());
        self.last_used_idx.get()
    }

    fn poll(&self, snapshot: u16) -> bool {
        self.ring.used_idx().load() != snapshot
    }

    fn enable_cb_delayed<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> bool {
        self.enable_interrupts(core);
        let in_flight = self.avail_idx_shadow.get().wrapping_sub(self.last_used_idx.get());
        let bufs = (in_flight as u32 * 3 / 4) as u16;
        self.ring.used_event().store(self.last_used_idx.get().wrapping_add(bufs));
        // The event store before re-reading `used.idx`, as in `poll`.
        core.barriers.mb();
        self.ring.used_idx().load().wrapping_sub(self.last_used_idx.get()) <= bufs
    }

    fn has_used(&self) -> bool {
        self.batch_last.is_some() || self.ring.used_idx().load() != self.last_used_idx.get()
    }

    fn detach_unused<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> Option<T> {
        let head = core.first_in_flight()?;
        let (token, _, _) = core.release(head, &mut self.free, !IN_ORDER)?;
        self.avail_idx_shadow.set(self.avail_idx_shadow.get().wrapping_sub(1));
        self.ring.avail_idx().store(self.avail_idx_shadow.get());
        self.used_idx_cache.set(self.last_used_idx.get());
        self.batch_last = None;
        Some(token)
    }

    fn reset<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) {
        let size = self.ring.size();
        for i in 0..size {
            self.ring.desc(i).write(Descriptor::default());
            self.ring.avail_ring(i).store(0);
            let (id, len) = self.ring.used_elem(i);
            id.store(0);
            len.store(0);
        }
        for field in [self.ring.avail_idx(), self.ring.used_event(), self.ring.used_flags(), self.ring.used_idx()] {
            field.store(0);
        }
        self.ring.avail_event().store(0);
        self.free = FreeList::full(size);
        self.avail_idx_shadow.set(0);
        self.last_used_idx.set(0);
        self.used_idx_cache.set(0);
        self.last_used.set(0);
        self.batch_last = None;
        let flags = if core.callbacks { 0 } else { AVAIL_F_NO_INTERRUPT };
        self.avail_flags_shadow.store(flags, Relaxed);
        self.ring.avail_flags().store(if core.event_idx { 0 } else { flags });
    }

    fn start_at(&mut self, index: u16) {
        self.avail_idx_shadow.set(index);
        self.last_used_idx.set(index);
        self.used_idx_cache.set(index);
        self.ring.avail_idx().store(index);
        self.ring.used_idx().store(index);
        self.ring.used_event().store(index);
        self.ring.avail_event().store(index);
    }
}

/// See [`SplitDriverLayout::put_avail`].
#[inline(always)]
fn put_avail(ring: &SplitRing, idx: u16, head: u16) {
    let slot = ring.avail_ring(idx);
    if slot.load() != head {
        slot.store(head);
    }
}
