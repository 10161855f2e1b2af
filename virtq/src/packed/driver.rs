//! The driver half of the packed ring, with and without `VIRTIO_F_IN_ORDER`.
//!
//! Buffer ids come from a free list of ids (private links in `DescExtra::next`), separate
//! from ring positions: a chain of `n` descriptors takes `n` ids so that every descriptor
//! has a private record to unmap, and every descriptor carries the first id (the spec wants
//! it in the last; Linux writes it in all, which serves devices that read either). In
//! order, the id is the head's ring position and no free list is walked.
//!
//! The device writes one used descriptor per buffer (or, in order, per batch) and the
//! driver then skips as many positions as the buffer had descriptors, counted privately.

use core::sync::atomic::{AtomicU16, Ordering::Relaxed};

use super::{
    avail_bits, is_used, ContiguousAreas, Cursor, Descriptor, PackedRing, DESC_F_AVAIL, DESC_F_INDIRECT, DESC_F_NEXT,
    DESC_F_USED, DESC_F_WRITE, EVENT_FLAGS_DESC, EVENT_FLAGS_DISABLE, EVENT_FLAGS_ENABLE, WRAP_BIT,
};
use crate::driver::core::{Buffer, DriverCore, FreeList, PRIV_PREMAPPED, PRIV_TABLE};
use crate::driver::queue::{get_one_by_one, DriverLayout, Sealed};
use crate::driver::{AddError, AddErrorKind, CreateError, DriverQueue, Fault, Notify, QueueConfig, Sg};
use crate::event::need_event;
use crate::memory::{Dma, DmaRegion};
use crate::Features;
use crate::LayoutKind;

/// The packed ring layout, for [`DriverQueue`]. `IN_ORDER` selects `VIRTIO_F_IN_ORDER`.
pub struct PackedDriverLayout<const IN_ORDER: bool> {
    ring: PackedRing,
    region: Option<DmaRegion>,
    addrs: [u64; 3],
    /// Next position to fill, and the driver's wrap counter there.
    avail: Cursor,
    /// The id free list (not in order).
    free: FreeList,
    /// Next position the device will mark used, and the wrap counter it will use.
    used: Cursor,
    /// In order: a used descriptor covering buffers up to id `.0`, which gets length `.1`.
    batch_last: Option<(u16, u32)>,
    /// What the driver area's `flags` hold. Atomic because `disable_cb` takes `&self`.
    event_flags_shadow: AtomicU16,
}

/// A driver queue on a packed ring.
pub type PackedDriver<T, D, N> = DriverQueue<T, D, N, PackedDriverLayout<false>>;
/// A driver queue on a packed ring with `VIRTIO_F_IN_ORDER`.
pub type PackedInOrderDriver<T, D, N> = DriverQueue<T, D, N, PackedDriverLayout<true>>;

impl<const IN_ORDER: bool> Sealed for PackedDriverLayout<IN_ORDER> {}

/// How far ahead of its used position the driver asks for the line the device writes
/// there: 4 lines of 4 descriptors (measured in `docs/performance.md`).
const USED_READ_AHEAD: u16 = 16;

impl<const IN_ORDER: bool> PackedDriverLayout<IN_ORDER> {
    /// The private half of adding one single-segment buffer at ring position `pos`: maps
    /// it, takes its id and records it in flight with the token `token()` makes, which is
    /// called only once nothing can fail. Returns the id and the device address, or, if the
    /// mapping failed, `token` back untouched (and nothing changed).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn fill_one<T, D: Dma, N: Notify, F: FnOnce() -> T>(
        &mut self,
        core: &mut DriverCore<T, D, N>,
        pos: u16,
        sg: Sg,
        writable: bool,
        premapped: bool,
        extra_flags: u16,
        token: F,
    ) -> Result<(u16, u64), F> {
        let id = if IN_ORDER { pos } else { self.free.head.get() };
        let Some((addr, _)) = core.map(sg, writable, premapped) else { return Err(token) };
        core.record(id, addr, sg.len, extra_flags);
        core.start_one(id, token(), if writable { sg.len } else { 0 }, premapped);
        if !IN_ORDER {
            self.free.head.set(core.extra[id as usize].next);
        }
        Ok((id, addr))
    }

    /// The head descriptor of a batch of single-segment buffers, but for its flags.
    #[inline(always)]
    fn write_head(&self, head: u16, id: u16, addr: u64, len: u32) {
        self.ring.write_but_flags(head, addr, len, id);
    }

    /// Makes the `added` single-descriptor buffers written from `head` on available, with
    /// `end` as the next position to fill: every descriptor before the head's flags, which
    /// publish them all.
    #[inline(always)]
    fn publish_avail<T, D: Dma, N: Notify>(
        &mut self,
        core: &mut DriverCore<T, D, N>,
        head: u16,
        head_flags: u16,
        end: Cursor,
        added: u16,
    ) {
        core.num_free -= added;
        self.avail = end;
        // Pairs with the device's rmb after it sees the head's flags (`PackedDevice::pop`).
        core.barriers.wmb();
        self.ring.flags(head).store(head_flags);
        core.num_added = core.num_added.saturating_add(added);
    }

    fn check(config: &QueueConfig) -> Result<(), CreateError> {
        if !config.features.contains(Features::RING_PACKED) || config.features.contains(Features::IN_ORDER) != IN_ORDER
        {
            return Err(CreateError::WrongLayout);
        }
        if !super::valid_size(config.size) {
            return Err(CreateError::InvalidSize);
        }
        Ok(())
    }

    /// # Safety
    ///
    /// `region` holds `ContiguousAreas::new(size).total` bytes, 16-aligned, valid for as
    /// long as the layout exists.
    unsafe fn build(region: Option<DmaRegion>, view: &DmaRegion, size: u16) -> Self {
        let layout = ContiguousAreas::new(size);
        let base = view.cpu;
        // SAFETY: offsets from the same layout: descriptors at 0 (16-aligned), the two event
        // areas at multiples of 64, all inside the region the caller vouches for.
        let ring =
            unsafe { PackedRing::new(base, base.add(layout.driver_offset), base.add(layout.device_offset), size) };
        let d = view.device_addr;
        Self {
            ring,
            region,
            addrs: [d, d + layout.driver_offset as u64, d + layout.device_offset as u64],
            avail: Cursor::new(0, true),
            free: FreeList::full(size),
            used: Cursor::new(0, true),
            batch_last: None,
            event_flags_shadow: AtomicU16::new(EVENT_FLAGS_ENABLE),
        }
    }

    /// Moves the used position to `used`, and tells the device where the next interrupt
    /// is wanted if the driver asked for one there.
    #[inline(always)]
    fn after_used<T, D: Dma, N: Notify>(&mut self, core: &DriverCore<T, D, N>, used: Cursor) {
        self.used = used;
        if self.event_flags_shadow.load(Relaxed) == EVENT_FLAGS_DESC {
            // Make the new event visible before the next check for used descriptors;
            // pairs with the device's mb before it reads the driver area
            // (`PackedDevice::needs_notification`).
            self.ring.driver_off_wrap().store(self.used.base());
            core.barriers.mb();
        }
    }

    /// Asks for the line of the used descriptor [`USED_READ_AHEAD`] positions after `pos`,
    /// where the driver found one. Where the next used descriptor is depends on the length
    /// of this one's chain (in order, on the run it closes), which the CPU learns only from
    /// the id and the driver's state for it: it cannot fetch the lines ahead on its own,
    /// and would wait for each line the device wrote in turn. Asked for a few lines
    /// ahead, they arrive together.
    #[inline(always)]
    fn prefetch_used_ahead(&self, pos: u16) {
        self.ring.prefetch_for_read(pos + USED_READ_AHEAD);
    }

    /// Reads the used descriptor at the driver's position, if there is one: `(id, len)`,
    /// not yet validated.
    #[inline(always)]
    fn read_used<T, D: Dma, N: Notify>(&self, core: &DriverCore<T, D, N>) -> Option<(u16, u32)> {
        let pos = self.used.pos();
        let flags = self.ring.flags(pos).load();
        if !is_used(flags, self.used.wrap()) {
            return None;
        }
        // The id and length only after the flags that published them; pairs with the
        // device's wmb before it writes the flags (`PackedDevice::complete`).
        core.barriers.rmb();
        let id = self.ring.id(pos).load();
        // "Element Length is reserved for used descriptors without the VIRTQ_DESC_F_WRITE
        // flag, and is ignored by drivers" (VIRTIO 1.3, 2.8.4): nothing was written.
        let len = if flags & DESC_F_WRITE != 0 { self.ring.desc(pos).len().load() } else { 0 };
        Some((id, len))
    }

    fn enable_events<T, D: Dma, N: Notify>(&self, core: &DriverCore<T, D, N>) {
        if self.event_flags_shadow.load(Relaxed) == EVENT_FLAGS_DISABLE {
            let flags = if core.event_idx { EVENT_FLAGS_DESC } else { EVENT_FLAGS_ENABLE };
            self.event_flags_shadow.store(flags, Relaxed);
            self.ring.driver_flags().store(flags);
        }
    }
}

#[allow(private_interfaces)]
impl<const IN_ORDER: bool> DriverLayout for PackedDriverLayout<IN_ORDER> {
    type Device = crate::packed::device::PackedDeviceLayout<crate::device::Fixed<IN_ORDER>>;

    fn kind(&self) -> LayoutKind {
        if IN_ORDER {
            LayoutKind::PackedInOrder
        } else {
            LayoutKind::Packed
        }
    }

    fn create<D: Dma>(config: &QueueConfig, dma: &D) -> Result<Self, CreateError> {
        Self::check(config)?;
        let region = dma.alloc_zeroed(ContiguousAreas::new(config.size).total, 64).ok_or(CreateError::NoMemory)?;
        let view = DmaRegion { cpu: region.cpu, device_addr: region.device_addr, size: region.size };
        // SAFETY: allocated for this layout, 64-aligned, freed only in `free`.
        Ok(unsafe { Self::build(Some(region), &view, config.size) })
    }

    unsafe fn create_in(config: &QueueConfig, memory: DmaRegion) -> Result<Self, CreateError> {
        Self::check(config)?;
        if memory.size < ContiguousAreas::new(config.size).total || !(memory.cpu.as_ptr() as usize).is_multiple_of(16) {
            return Err(CreateError::RegionTooSmall);
        }
        // SAFETY: checked size and alignment; validity is the caller's promise.
        Ok(unsafe { Self::build(None, &memory, config.size) })
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
        let (plan, token) = core.plan(buf, token, ctx)?;
        if core.num_free < plan.descs {
            return Err(AddError { kind: AddErrorKind::NoSpace, token });
        }
        let size = self.ring.size();
        let head = self.avail.pos();
        let id = if IN_ORDER { head } else { self.free.head.get() };
        let lap_flags = avail_bits(self.avail.wrap());
        let mut pos = head;
        let mut flags_now = lap_flags;
        let mut head_flags = 0;
        let mut writable = 0u32;
        let mut tail = id;
        let mut curr = id;
        if plan.indirect {
            let Ok((table, w)) = core.write_table(id, buf, plan.total, premapped, false) else {
                return Err(AddError { kind: AddErrorKind::NoMemory, token });
            };
            let len = 16 * plan.total as u32;
            core.record(id, table, len, DESC_F_INDIRECT | PRIV_TABLE);
            self.ring.write_but_flags(head, table, len, id);
            head_flags = DESC_F_INDIRECT | lap_flags;
            writable = w;
            curr = core.extra[id as usize].next;
            pos += 1;
            if pos == size {
                pos = 0;
                flags_now ^= DESC_F_AVAIL | DESC_F_USED;
            }
        } else {
            // Every descriptor after the head is visible as soon as it is written, so map
            // all segments first: a mapping failure then leaves the ring untouched.
            let maps = D::MAPS && !premapped;
            if maps {
                let mut curr = id;
                let mapped = buf.try_for_each(|n, sg, is_in| {
                    let Some((addr, priv_flags)) = core.map(sg, is_in, false) else {
                        core.unmap_chain(id, n);
                        return Err(());
                    };
                    core.record(curr, addr, sg.len, if is_in { DESC_F_WRITE } else { 0 } | priv_flags);
                    curr = core.extra[curr as usize].next;
                    Ok(())
                });
                if mapped.is_err() {
                    return Err(AddError { kind: AddErrorKind::NoMemory, token });
                }
            }
            buf.try_for_each(|n, sg, is_in| {
                let addr = if maps {
                    core.extra[curr as usize].addr
                } else {
                    let priv_flags = if premapped { PRIV_PREMAPPED } else { 0 };
                    core.record(curr, sg.addr, sg.len, if is_in { DESC_F_WRITE } else { 0 } | priv_flags);
                    sg.addr
                };
                let mut flags = flags_now | if is_in { DESC_F_WRITE } else { 0 };
                if n + 1 != plan.total as usize {
                    flags |= DESC_F_NEXT;
                }
                if is_in {
                    writable = writable.saturating_add(sg.len);
                }
                if n == 0 {
                    // The head's flags make the whole chain available: written last.
                    head_flags = flags;
                    self.ring.write_but_flags(pos, addr, sg.len, id);
                } else {
                    self.ring.desc(pos).write(Descriptor { addr, len: sg.len, id, flags });
                }
                tail = curr;
                curr = core.extra[curr as usize].next;
                pos += 1;
                if pos == size {
                    pos = 0;
                    flags_now ^= DESC_F_AVAIL | DESC_F_USED;
                }
                Ok(())
            })
            .expect("mapping already succeeded");
        }
        core.start(id, token, ctx, &plan, writable, tail, premapped);
        if !IN_ORDER {
            self.free.head.set(curr);
        }
        self.avail = Cursor::new(pos, flags_now & DESC_F_AVAIL != 0);
        // "A driver MUST NOT make the first descriptor in the list available before all
        // subsequent descriptors comprising the list are made available" (2.8.21.1.1):
        // pairs with the device's rmb after it sees the head's flags (`PackedDevice::pop`).
        core.barriers.wmb();
        self.ring.flags(head).store(head_flags);
        core.num_added = core.num_added.saturating_add(plan.descs);
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
        // A copy in locals, so that its pointer and size stay in registers across the
        // descriptor stores.
        let ring = self.ring;
        let size = ring.size();
        let head = self.avail.pos();
        let dir_flags = if writable { DESC_F_WRITE } else { 0 };
        let extra_flags = dir_flags | if premapped { PRIV_PREMAPPED } else { 0 };
        let wanted = sgs.len().min(core.num_free as usize);
        let Some(&first_sg) = sgs.first().filter(|_| wanted > 0) else { return 0 };
        // Every line the burst will write, asked for at once: see `prefetch`.
        ring.prefetch_for_write(head, wanted);
        let Ok((id, addr)) = self.fill_one(core, head, first_sg, writable, premapped, extra_flags, || token(0)) else {
            return 0;
        };
        // The first buffer's flags publish the whole batch: written last. The device polls
        // positions in ring order only (VIRTIO 1.3, "Polling of available and used
        // descriptors"), so it sees none of the later ones before it.
        self.write_head(head, id, addr, first_sg.len);
        let head_flags = avail_bits(self.avail.wrap()) | dir_flags;
        let mut flags_now = avail_bits(self.avail.wrap());
        let mut pos = head + 1;
        let mut added = 1;
        // The rest in runs that end at the ring's end, so that the loop over a run has no
        // wrap to test and walks the descriptors as a slice.
        'runs: while added < wanted {
            if pos == size {
                pos = 0;
                flags_now ^= DESC_F_AVAIL | DESC_F_USED;
            }
            let run = (wanted - added).min(usize::from(size - pos));
            let descs = ring.desc_run(pos, run);
            for (desc, &sg) in descs.iter().zip(&sgs[added..added + run]) {
                let i = added;
                let Ok((id, addr)) = self.fill_one(core, pos, sg, writable, premapped, extra_flags, || token(i)) else {
                    break 'runs;
                };
                desc.write(Descriptor { addr, len: sg.len, id, flags: flags_now | dir_flags });
                pos += 1;
                added += 1;
            }
        }
        if pos == size {
            pos = 0;
            flags_now ^= DESC_F_AVAIL | DESC_F_USED;
        }
        self.publish_avail(core, head, head_flags, Cursor::new(pos, flags_now & DESC_F_AVAIL != 0), added as u16);
        added
    }

    #[inline(always)]
    fn add_one<T, D: Dma, N: Notify>(
        &mut self,
        core: &mut DriverCore<T, D, N>,
        sgs: &[Sg],
        writable: bool,
        premapped: bool,
        token: T,
    ) -> Result<(), AddError<T>> {
        let &[sg] = sgs else {
            return self.add(core, &Buffer::One { sgs, writable }, token, None, premapped);
        };
        if core.shared.is_broken() {
            return Err(AddError { kind: AddErrorKind::Broken, token });
        }
        if core.num_free == 0 {
            return Err(AddError { kind: AddErrorKind::NoSpace, token });
        }
        let head = self.avail.pos();
        let dir_flags = if writable { DESC_F_WRITE } else { 0 };
        let extra_flags = dir_flags | if premapped { PRIV_PREMAPPED } else { 0 };
        let (id, addr) = match self.fill_one(core, head, sg, writable, premapped, extra_flags, || token) {
            Ok(added) => added,
            Err(token) => return Err(AddError { kind: AddErrorKind::NoMemory, token: token() }),
        };
        self.write_head(head, id, addr, sg.len);
        let head_flags = avail_bits(self.avail.wrap()) | dir_flags;
        self.publish_avail(core, head, head_flags, self.avail.advance(1, self.ring.size()), 1);
        Ok(())
    }

    fn kick_prepare<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> bool {
        // The head flags before the load of the device area; pairs with the device's mb
        // between enabling notifications and re-checking the ring
        // (`PackedDevice::enable_notifications`).
        core.barriers.mb();
        let size = self.ring.size();
        let new = self.avail.pos();
        let added = core.num_added;
        let old = new.wrapping_sub(added);
        core.num_added = 0;
        // One load: `off_wrap` and `flags` from the same moment.
        let (off_wrap, flags) = self.ring.load_device_event();
        if flags != EVENT_FLAGS_DESC || !core.event_idx {
            return flags != EVENT_FLAGS_DISABLE;
        }
        let mut event = off_wrap & !WRAP_BIT;
        if event >= size || added >= size {
            // An offset outside the ring, or a window over a whole lap: the event cannot
            // be placed, so notify rather than risk a lost kick.
            return true;
        }
        if (off_wrap & WRAP_BIT != 0) != self.avail.wrap() {
            event = event.wrapping_sub(size);
        }
        need_event(event, new, old)
    }

    fn next_avail(&self) -> u16 {
        self.avail.base()
    }

    #[inline(always)]
    fn get_buf<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> Option<(T, u32, Option<usize>)> {
        if !IN_ORDER {
            let (id, len) = self.read_used(core)?;
            // Once per line of used descriptors.
            if self.used.pos().is_multiple_of(4) {
                self.prefetch_used_ahead(self.used.pos());
            }
            let (token, ctx, descs) = core.take_used(id as u32, len, &mut self.free)?;
            self.after_used(core, self.used.advance(descs, self.ring.size()));
            return Some((token, len, ctx));
        }
        let batch = match self.batch_last {
            Some(batch) => batch,
            None => {
                let (id, len) = self.read_used(core)?;
                if !core.check_used(id as u32, len) {
                    return None;
                }
                *self.batch_last.insert((id, len))
            }
        };
        let taken = core.take_in_order(self.used.pos(), batch, &mut self.free)?;
        if taken.ends_batch {
            self.batch_last = None;
        }
        self.after_used(core, self.used.advance(taken.descs, self.ring.size()));
        Some((taken.token, taken.len, taken.ctx))
    }

    #[inline(always)]
    fn get_each<T, D: Dma, N: Notify>(
        &mut self,
        core: &mut DriverCore<T, D, N>,
        max: usize,
        f: &mut impl FnMut(T, u32, Option<usize>),
    ) -> usize {
        if !IN_ORDER {
            return get_one_by_one(self, core, max, f);
        }
        // In order, a used descriptor covers a run of buffers: read and check it once, then
        // take the run's buffers by position, moving the used cursor (and the driver's
        // event, when it asked for one) once per run rather than once per buffer.
        let size = self.ring.size();
        let mut n = 0;
        let mut broke = false;
        while n < max && !broke {
            let batch = match self.batch_last.take() {
                Some(batch) => batch,
                None => {
                    let Some((id, len)) = self.read_used(core) else { break };
                    // A run may start anywhere in a line.
                    self.prefetch_used_ahead(self.used.pos());
                    if !core.check_used(id as u32, len) {
                        break;
                    }
                    (id, len)
                }
            };
            // The run's buffers by position, with the cursor, the freed count and the
            // context switch in locals: what each buffer costs is its slot's look-up.
            let context = core.context;
            let mut pos = self.used.pos();
            let mut wrap = self.used.wrap();
            let mut freed = 0u16;
            let mut rest = None;
            // Laps up to the ring's end, so that the loop over one tests no wrap.
            'run: loop {
                while pos < size {
                    let slot = core.heads.get_mut(usize::from(pos));
                    let Some((token, state)) = slot.and_then(|state| Some((state.token.take()?, state))) else {
                        // Only `detach_unused_buf` on a live queue empties a slot the
                        // device has not returned yet: latched broken, as `get_buf` would be.
                        core.fail(Fault::UsedIdNotInFlight { id: u32::from(pos) });
                        broke = true;
                        break 'run;
                    };
                    let ctx = if context { state.ctx.take() } else { None };
                    let ends_batch = pos == batch.0;
                    let len = if ends_batch { batch.1 } else { state.writable };
                    let chain = (state.descs, state.tail, state.indirect_entries, state.mapped);
                    core.unmap_taken(pos, chain);
                    freed += chain.0;
                    pos += chain.0;
                    n += 1;
                    f(token, len, ctx);
                    if ends_batch {
                        break 'run;
                    }
                    if n == max {
                        rest = Some(batch);
                        break 'run;
                    }
                }
                pos -= size;
                wrap = !wrap;
            }
            if pos >= size {
                pos -= size;
                wrap = !wrap;
            }
            core.num_free += freed;
            // The next add fills these positions again: ask for their lines now, so that
            // taking them back from the device overlaps the rest of this call.
            self.ring.prefetch_for_write(self.used.pos(), usize::from(freed));
            let used = Cursor::new(pos, wrap);
            self.batch_last = rest;
            self.after_used(core, used);
        }
        n
    }

    fn disable_cb<T, D: Dma, N: Notify>(&self, core: &DriverCore<T, D, N>) {
        if self.event_flags_shadow.load(Relaxed) != EVENT_FLAGS_DISABLE {
            self.event_flags_shadow.store(EVENT_FLAGS_DISABLE, Relaxed);
            // After an interrupt with event idx the device will not send another until the
            // driver moves its event, so skip the ring write.
            if !core.event_triggered.load(Relaxed) {
                self.ring.driver_flags().store(EVENT_FLAGS_DISABLE);
            }
        }
    }

    fn enable_cb_prepare<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> u16 {
        if core.event_idx {
            self.ring.driver_off_wrap().store(self.used.base());
            // "Update event offset and event wrap counter first before updating event
            // flags"; pairs with the device's single-word read of the driver area.
            core.barriers.wmb();
        }
        self.enable_events(core);
        self.used.base()
    }

    fn poll(&self, snapshot: u16) -> bool {
        if snapshot & !WRAP_BIT >= self.ring.size() {
            // A snapshot from before a resize to a smaller ring: say "look again".
            return true;
        }
        // The rest of an in-order batch is used already, though no descriptor at the used
        // position says so: the device wrote one for the whole batch, earlier.
        self.batch_last.is_some() || is_used(self.ring.flags(snapshot & !WRAP_BIT).load(), snapshot & WRAP_BIT != 0)
    }

    fn enable_cb_delayed<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> bool {
        if core.event_idx {
            let size = self.ring.size();
            let bufs = ((size - core.num_free) as u32 * 3 / 4) as u16;
            let mut pos = self.used.pos() + bufs;
            let mut wrap = self.used.wrap();
            if pos >= size {
                pos -= size;
                wrap = !wrap;
            }
            self.ring.driver_off_wrap().store(pos | if wrap { WRAP_BIT } else { 0 });
            // The offset before the flags, as in `enable_cb_prepare`.
            core.barriers.wmb();
        }
        self.enable_events(core);
        // The event before re-checking for used descriptors; pairs with the device's mb
        // before it reads the driver area.
        core.barriers.mb();
        self.batch_last.is_none() && !is_used(self.ring.flags(self.used.pos()).load(), self.used.wrap())
    }

    fn has_used(&self) -> bool {
        self.batch_last.is_some() || is_used(self.ring.flags(self.used.pos()).load(), self.used.wrap())
    }

    fn detach_unused<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> Option<T> {
        let id = core.first_in_flight()?;
        self.batch_last = None;
        core.release(id, &mut self.free, !IN_ORDER).map(|(token, _, _)| token)
    }

    fn reset<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) {
        for i in 0..self.ring.size() {
            self.ring.desc(i).write(Descriptor::default());
        }
        self.avail = Cursor::new(0, true);
        self.free = FreeList::full(self.ring.size());
        self.used = Cursor::new(0, true);
        self.batch_last = None;
        let flags = if core.callbacks { EVENT_FLAGS_ENABLE } else { EVENT_FLAGS_DISABLE };
        self.event_flags_shadow.store(flags, Relaxed);
        self.ring.reset_events(flags);
    }
}
