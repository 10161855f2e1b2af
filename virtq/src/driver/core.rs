//! Driver bookkeeping that is the same for every ring layout: tokens in flight, the
//! private copy of every descriptor written, DMA mapping, and the indirect-table pool.
//!
//! The private copies are what make the driver independent of shared memory: freeing a
//! chain follows `DescExtra::next`, never a `next` or `flags` field the device could have
//! rewritten.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering::Relaxed};

use super::{AddError, AddErrorKind, CreateError, Fault, Notify, QueueConfig, Sg, Shared};
use crate::memory::{Direction, Dma, DmaRegion};
use crate::shared::{word1, RawDesc};
use crate::{Barriers, Features};

/// Private flag in [`DescExtra::flags`]: the segment was premapped, never unmap it.
pub(crate) const PRIV_PREMAPPED: u16 = 0x8000;
/// Private flag in [`DescExtra::flags`]: the descriptor points at a pool table, which is
/// not a mapping of its own.
pub(crate) const PRIV_TABLE: u16 = 0x4000;
/// `DESC_F_WRITE` is bit 1 in both layouts.
const DESC_F_WRITE: u16 = 2;

/// The driver's private copy of one descriptor it wrote (Linux's `vring_desc_extra`).
#[derive(Clone, Copy, Default)]
pub(crate) struct DescExtra {
    /// Device address, kept to unmap (only when `D::MAPS`).
    pub addr: u64,
    /// Length, kept to unmap (only when `D::MAPS`).
    pub len: u32,
    /// `WRITE` as written, plus the private flags.
    pub flags: u16,
    /// Next descriptor of the chain, or of the free list.
    pub next: u16,
}

/// A 16-bit ring index kept in 32 bits. The compiler may read a `u16` field (to increment
/// it, say) with a 32-bit load; right after a 16-bit store to the field, that load cannot
/// be forwarded from the store and stalls, on every operation. Stored and loaded as 32
/// bits, it always forwards. Which `u16` field stalls depends on where the compiler puts
/// it, so the layouts keep every index they update per buffer in one of these.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Index(u32);

impl Index {
    #[inline(always)]
    pub(crate) const fn new(i: u16) -> Self {
        Self(i as u32)
    }

    #[inline(always)]
    pub(crate) const fn get(self) -> u16 {
        self.0 as u16
    }

    #[inline(always)]
    pub(crate) fn set(&mut self, i: u16) {
        self.0 = i as u32;
    }
}

/// The free list through [`DescExtra::next`]: split descriptors, or packed buffer ids (one
/// per descriptor of a chain). `add` takes from the front and a freed chain goes to the
/// back, so an entry freed just now is reused last. Reusing it at once (a stack, as Linux
/// does) runs the same instructions but makes a polling round trip slower: the entry's
/// line is still on its way back from the device when the driver writes it again.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FreeList {
    /// The first free entry (when one is free).
    pub head: Index,
    /// The last entry; meaningless while nothing is free.
    pub tail: Index,
}

impl FreeList {
    /// All of `0..size`, linked in order (as [`DriverCore::resize_state`] links them).
    pub(crate) const fn full(size: u16) -> Self {
        Self { head: Index::new(0), tail: Index::new(size - 1) }
    }
}

/// State of a buffer in flight, indexed by its head (split) or buffer id (packed).
pub(crate) struct HeadState<T> {
    /// `Some` exactly while the buffer is in flight: the check behind every used id.
    pub token: Option<T>,
    pub ctx: Option<usize>,
    /// Bytes the device may write; a used length above this is a device bug.
    pub writable: u32,
    /// Ring descriptors the chain occupies.
    pub descs: u16,
    /// Last `DescExtra` of the chain (to relink the free list without a walk).
    pub tail: u16,
    /// Entries of its indirect table, 0 for a direct chain. Written only with `D::MAPS`,
    /// like `mapped`: nothing else reads them, and an add then stores two fields fewer.
    pub indirect_entries: u16,
    /// Whether the driver mapped its segments (a mapping DMA, not premapped): only then
    /// are there private copies to walk and mappings to undo when it comes back.
    pub mapped: bool,
}

impl<T> Default for HeadState<T> {
    fn default() -> Self {
        Self { token: None, ctx: None, writable: 0, descs: 0, tail: 0, indirect_entries: 0, mapped: false }
    }
}

/// A buffer taken back from an in-order ring ([`DriverCore::take_in_order`]).
pub(crate) struct InOrderTake<T> {
    pub token: T,
    /// Bytes the device wrote.
    pub len: u32,
    pub ctx: Option<usize>,
    /// Ring descriptors the buffer occupied.
    pub descs: u16,
    /// Whether it was the buffer the used entry named, the last of its batch.
    pub ends_batch: bool,
}

/// A buffer about to be added: its segments, by direction.
pub(crate) enum Buffer<'a> {
    /// One list, all readable or all writable (`add_outbuf`, `add_inbuf`): the common case,
    /// with a one-level loop.
    One { sgs: &'a [Sg], writable: bool },
    /// Several lists: first the readable ones, then the writable ones (`add_sgs`).
    Lists { out: &'a [&'a [Sg]], ins: &'a [&'a [Sg]] },
}

impl Buffer<'_> {
    /// Calls `f(n, segment, device_writes_it)` for each segment in order, stopping at the
    /// first error. Plain loops: iterator adapters cost measurably more in `add`. One call
    /// site of `f` for both shapes: with two, the compiler stopped inlining packed `add`'s
    /// closure into the run-time dispatching queue.
    #[inline(always)]
    pub fn try_for_each(&self, mut f: impl FnMut(usize, Sg, bool) -> Result<(), ()>) -> Result<(), ()> {
        // The lists to walk now, whether the device writes them, and the writable lists
        // that follow them.
        let (mut lists, mut writable, mut then_ins): (&[&[Sg]], bool, &[&[Sg]]) = match self {
            Buffer::One { sgs, writable } => (core::slice::from_ref(sgs), *writable, &[]),
            Buffer::Lists { out, ins } => (out, false, ins),
        };
        let mut n = 0;
        loop {
            for list in lists {
                for &sg in *list {
                    f(n, sg, writable)?;
                    n += 1;
                }
            }
            if then_ins.is_empty() {
                return Ok(());
            }
            (lists, writable, then_ins) = (then_ins, true, &[]);
        }
    }

    #[inline(always)]
    pub fn count(&self) -> usize {
        match *self {
            Buffer::One { sgs, .. } => sgs.len(),
            Buffer::Lists { out, ins } => {
                out.iter().map(|l| l.len()).sum::<usize>() + ins.iter().map(|l| l.len()).sum::<usize>()
            }
        }
    }

    pub fn has_readable(&self) -> bool {
        match *self {
            Buffer::One { sgs, writable } => !writable && !sgs.is_empty(),
            Buffer::Lists { out, .. } => out.iter().any(|l| !l.is_empty()),
        }
    }
}

/// What an `add` must do, decided before any layout-specific work.
pub(crate) struct AddPlan {
    /// Segments in the buffer.
    pub total: u16,
    /// Whether it goes into an indirect table.
    pub indirect: bool,
    /// Ring descriptors it takes.
    pub descs: u16,
}

/// Layout-independent driver state.
pub(crate) struct DriverCore<T, D: Dma, N> {
    /// How the queue was created (kept to re-create the ring on resize).
    pub config: QueueConfig,
    pub shared: Arc<Shared<N>>,
    pub dma: D,
    pub barriers: Barriers,
    pub event_idx: bool,
    pub context: bool,
    pub callbacks: bool,
    pub notification_data: bool,
    pub index: u16,
    pub size: u16,
    pub num_free: u16,
    /// Descriptors (packed) or buffers (split) added since the last `kick_prepare`.
    pub num_added: u16,
    /// Set by `interrupt` with event idx: the device will not interrupt again until the
    /// driver moves its event, so `disable_cb` can skip its ring write.
    pub event_triggered: AtomicBool,
    pub fault: Option<Fault>,
    pub extra: Box<[DescExtra]>,
    pub heads: Box<[HeadState<T>]>,
    /// `size * indirect_max` table entries; slot `s` owns entries `s * indirect_max ..`.
    pub indirect_pool: Option<DmaRegion>,
    pub indirect_max: u16,
    /// Private copies of the indirect entries, kept only when `D::MAPS` (to unmap).
    pub indirect_extra: Box<[DescExtra]>,
}

impl<T, D: Dma, N: Notify> DriverCore<T, D, N> {
    /// Private state for a ring of `size` entries; allocates the indirect pool when
    /// negotiated (`INDIRECT_DESC` without `context`). On failure the allocator comes back
    /// so that the caller can free the ring.
    pub fn new(config: &QueueConfig, size: u16, dma: D, notifier: N) -> Result<Self, (CreateError, D)> {
        let features = config.features;
        let indirect = features.contains(Features::INDIRECT_DESC) && !config.context && config.indirect_max > 1;
        let indirect_max = if indirect { config.indirect_max } else { 0 };
        let indirect_pool = if indirect {
            match dma.alloc_zeroed(16 * size as usize * indirect_max as usize, 16) {
                Some(pool) => Some(pool),
                None => return Err((CreateError::NoMemory, dma)),
            }
        } else {
            None
        };
        let mut core = Self {
            config: QueueConfig { size, ..*config },
            shared: Shared::new(notifier),
            dma,
            barriers: if config.weak_barriers && !features.contains(Features::ORDER_PLATFORM) {
                Barriers::Weak
            } else {
                Barriers::Strong
            },
            event_idx: features.contains(Features::EVENT_IDX),
            context: config.context,
            callbacks: config.callbacks,
            notification_data: features.contains(Features::NOTIFICATION_DATA),
            index: config.index,
            size,
            num_free: size,
            num_added: 0,
            event_triggered: AtomicBool::new(false),
            fault: None,
            extra: Box::new([]),
            heads: Box::new([]),
            indirect_pool,
            indirect_max,
            indirect_extra: if D::MAPS {
                (0..size as usize * indirect_max as usize).map(|_| DescExtra::default()).collect()
            } else {
                Vec::new().into_boxed_slice()
            },
        };
        core.resize_state(size);
        Ok(core)
    }

    /// Re-creates the per-descriptor arrays for `size` entries, all free, linked
    /// 0 -> 1 -> ... -> size-1 -> 0. In-order layouts rely on this sequential link.
    pub fn resize_state(&mut self, size: u16) {
        self.size = size;
        self.extra = (0..size)
            .map(|i| DescExtra { next: if i + 1 == size { 0 } else { i + 1 }, ..Default::default() })
            .collect();
        self.heads = (0..size).map(|_| HeadState::default()).collect();
        self.num_free = size;
        self.num_added = 0;
        self.fault = None;
        self.event_triggered.store(false, Relaxed);
    }

    /// Checks an add before any ring work. `Err` hands the token back.
    #[inline(always)]
    pub fn plan(&self, buf: &Buffer<'_>, token: T, ctx: Option<usize>) -> Result<(AddPlan, T), AddError<T>> {
        if self.shared.is_broken() {
            return Err(AddError { kind: AddErrorKind::Broken, token });
        }
        if ctx.is_some() && !self.context {
            return Err(AddError { kind: AddErrorKind::NoContext, token });
        }
        let total = buf.count();
        if total == 0 {
            return Err(AddError { kind: AddErrorKind::NoSegments, token });
        }
        // Whether the buffer can ever take one indirect descriptor; Linux also asks for a
        // free descriptor, but then a full ring would make a long buffer look too long
        // forever (TooManySegments) instead of momentarily (NoSpace).
        let indirect = self.indirect_max > 0 && total > 1 && total <= self.indirect_max as usize;
        if !indirect && total > self.size as usize {
            return Err(AddError { kind: AddErrorKind::TooManySegments, token });
        }
        let total = total as u16;
        Ok((AddPlan { total, indirect, descs: if indirect { 1 } else { total } }, token))
    }

    /// Maps one segment. Returns the device address and the private flags to record.
    #[inline]
    pub fn map(&self, sg: Sg, writable: bool, premapped: bool) -> Option<(u64, u16)> {
        if premapped || !D::MAPS {
            return Some((sg.addr, if premapped { PRIV_PREMAPPED } else { 0 }));
        }
        let dir = if writable { Direction::FromDevice } else { Direction::ToDevice };
        self.dma.map(sg.addr, sg.len, dir).map(|a| (a, 0))
    }

    #[inline]
    pub fn unmap(&self, e: &DescExtra) {
        if D::MAPS && e.flags & (PRIV_PREMAPPED | PRIV_TABLE) == 0 {
            let dir = if e.flags & DESC_F_WRITE != 0 { Direction::FromDevice } else { Direction::ToDevice };
            self.dma.unmap(e.addr, e.len, dir);
        }
    }

    /// Records the private copy of a descriptor about to be written at `extra[i]`: what
    /// `unmap` needs, so nothing at all without a mapping DMA or for a premapped segment.
    #[inline(always)]
    pub fn record(&mut self, i: u16, addr: u64, len: u32, flags: u16) {
        if D::MAPS && flags & PRIV_PREMAPPED == 0 {
            self.extra[i as usize] = DescExtra { addr, len, flags, next: self.extra[i as usize].next };
        }
    }

    /// Unmaps the first `n` descriptors of a chain from `first`, following private links.
    pub fn unmap_chain(&self, first: u16, n: usize) {
        let mut i = first;
        for _ in 0..n {
            let e = &self.extra[i as usize];
            self.unmap(e);
            i = e.next;
        }
    }

    /// Fills pool table `slot` with the buffer's segments. `split_links` writes `NEXT` and
    /// `next` as the split format needs; packed tables are sequential and have neither.
    /// Returns the table's device address and the writable length, or `Err` after undoing
    /// the mappings made. Inlined, so that `buf` never escapes to a call: the compiler
    /// then keeps a caller's segment lists in registers rather than reloading them after
    /// every descriptor store.
    #[inline(always)]
    pub fn write_table(
        &mut self,
        slot: u16,
        buf: &Buffer<'_>,
        total: u16,
        premapped: bool,
        split_links: bool,
    ) -> Result<(u64, u32), ()> {
        let pool = self.indirect_pool.as_ref().expect("indirect queues have a pool");
        let first = slot as usize * self.indirect_max as usize;
        // SAFETY: the pool holds `size * indirect_max` 16-byte descriptors, 16-aligned and
        // valid until the queue frees it; `slot < size` and `total <= indirect_max`, so
        // entries `first .. first + total` exist and belong to this slot alone.
        let table: &[RawDesc] =
            unsafe { core::slice::from_raw_parts(pool.cpu.as_ptr().cast::<RawDesc>().add(first), total as usize) };
        let table_addr = pool.device_addr + 16 * first as u64;
        let mut writable = 0u32;
        buf.try_for_each(|n, sg, is_in| {
            let Some((addr, priv_flags)) = self.map(sg, is_in, premapped) else {
                for e in &self.indirect_extra[first..first + n] {
                    self.unmap(e);
                }
                return Err(());
            };
            let mut flags = if is_in { DESC_F_WRITE } else { 0 };
            if split_links && n + 1 != total as usize {
                flags |= crate::split::DESC_F_NEXT;
            }
            if is_in {
                writable = writable.saturating_add(sg.len);
            }
            if D::MAPS && !premapped {
                self.indirect_extra[first + n] = DescExtra { addr, len: sg.len, flags: flags | priv_flags, next: 0 };
            }
            // The formats differ only in the two `u16`s of word 1: split `flags, next`
            // (`split::Descriptor`), packed `id, flags` (`packed::Descriptor`, id unused in
            // a table). Choosing them before one store keeps the loop branch-free.
            let (at12, at14) = if split_links { (flags, n as u16 + 1) } else { (0, flags) };
            table[n].write_words((addr, word1(sg.len, at12, at14)));
            Ok(())
        })?;
        Ok((table_addr, writable))
    }

    /// Records a new buffer in flight at `head`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &mut self,
        head: u16,
        token: T,
        ctx: Option<usize>,
        plan: &AddPlan,
        writable: u32,
        tail: u16,
        premapped: bool,
    ) {
        let state = &mut self.heads[head as usize];
        state.token = Some(token);
        // A free slot holds no context (see `start_one`): no store for the usual `None`.
        debug_assert!(state.ctx.is_none());
        if ctx.is_some() {
            state.ctx = ctx;
        }
        state.writable = writable;
        state.descs = plan.descs;
        state.tail = tail;
        if D::MAPS {
            state.mapped = !premapped;
            state.indirect_entries = if plan.indirect { plan.total } else { 0 };
        }
        self.num_free -= plan.descs;
    }

    /// [`Self::start`] for a direct buffer of one segment (`add_*bufs`), except that the
    /// caller takes the burst's descriptors off `num_free` once, at its end.
    #[inline(always)]
    pub fn start_one(&mut self, head: u16, token: T, writable: u32, premapped: bool) {
        let state = &mut self.heads[head as usize];
        // Every way out of flight takes the context, so a free slot holds none already.
        debug_assert!(state.ctx.is_none());
        state.token = Some(token);
        state.writable = writable;
        state.descs = 1;
        state.tail = head;
        if D::MAPS {
            state.mapped = !premapped;
            state.indirect_entries = 0;
        }
    }

    /// Frees the buffer at `head`, which the caller found in flight: unmaps its segments,
    /// returns its descriptors, and hands back the token, the context and how many ring
    /// descriptors it had. With `relink` its descriptors go to the back of the free list;
    /// in-order layouts keep their sequential links instead.
    /// `None` (and nothing changed) if no buffer is in flight there.
    #[inline(always)]
    pub fn release(&mut self, head: u16, free: &mut FreeList, relink: bool) -> Option<(T, Option<usize>, u16)> {
        let state = self.heads.get_mut(head as usize)?;
        let token = state.token.take()?;
        let ctx = if self.context { state.ctx.take() } else { None };
        let chain = (state.descs, state.tail, state.indirect_entries, state.mapped);
        Some((token, ctx, self.free_chain(head, chain, free, relink)))
    }

    /// Undoes the mappings of the buffer at `head`, just taken out of flight; `chain` is
    /// its state's `(descs, tail, indirect_entries, mapped)`.
    #[inline(always)]
    pub(crate) fn unmap_taken(&self, head: u16, chain: (u16, u16, u16, bool)) {
        let (descs, _, indirect_entries, mapped) = chain;
        if D::MAPS && mapped {
            if indirect_entries > 0 {
                let first = head as usize * self.indirect_max as usize;
                for e in &self.indirect_extra[first..first + indirect_entries as usize] {
                    self.unmap(e);
                }
            }
            self.unmap_chain(head, descs as usize);
        }
    }

    /// The second half of [`Self::release`], once the token is out of `heads[head]`:
    /// `chain` is that state's `(descs, tail, indirect_entries, mapped)`. Returns `descs`.
    #[inline(always)]
    fn free_chain(&mut self, head: u16, chain: (u16, u16, u16, bool), free: &mut FreeList, relink: bool) -> u16 {
        let (descs, tail, _, _) = chain;
        self.unmap_taken(head, chain);
        if relink {
            if self.num_free == 0 {
                free.head.set(head);
            } else {
                self.extra[free.tail.get() as usize].next = head;
            }
            free.tail.set(tail);
        }
        self.num_free += descs;
        descs
    }

    /// Validates a used entry the device wrote: `id` names a buffer in flight whose
    /// writable part holds `len` bytes. Latches the fault otherwise.
    #[inline(always)]
    pub fn check_used(&mut self, id: u32, len: u32) -> bool {
        let fault = match self.heads.get(id as usize) {
            None => Fault::UsedIdOutOfRange { id },
            Some(h) => match Self::used_fault(h, id, len) {
                Some(fault) => fault,
                None => return true,
            },
        };
        self.fail(fault);
        false
    }

    /// What is wrong with a used entry `(id, len)` for the state at `heads[id]`, if
    /// anything: the buffer is not in flight, or `len` exceeds its writable part.
    #[inline(always)]
    fn used_fault(h: &HeadState<T>, id: u32, len: u32) -> Option<Fault> {
        if h.token.is_none() {
            Some(Fault::UsedIdNotInFlight { id })
        } else if len > h.writable {
            Some(Fault::UsedLenTooLong { id, len, writable: h.writable })
        } else {
            None
        }
    }

    /// [`Self::check_used`] then [`Self::release`] with one look-up: the used entry's
    /// buffer, taken back, or `None` with the fault latched.
    #[inline(always)]
    pub fn take_used(&mut self, id: u32, len: u32, free: &mut FreeList) -> Option<(T, Option<usize>, u16)> {
        let fault = match self.heads.get_mut(id as usize) {
            None => Fault::UsedIdOutOfRange { id },
            Some(h) => match Self::used_fault(h, id, len) {
                Some(fault) => fault,
                // No fault means in flight, so the token is there.
                None => match h.token.take() {
                    Some(token) => {
                        // Without contexts `plan` lets none in: no store to clear one.
                        let ctx = if self.context { h.ctx.take() } else { None };
                        let chain = (h.descs, h.tail, h.indirect_entries, h.mapped);
                        return Some((token, ctx, self.free_chain(id as u16, chain, free, true)));
                    }
                    None => Fault::UsedIdNotInFlight { id },
                },
            },
        };
        self.fail(fault);
        None
    }

    /// Takes back the oldest buffer of an in-order ring, at `head`, for a used entry that
    /// names buffer `batch.0` with length `batch.1`. In order, one entry returns its own
    /// buffer and every one before it, which the device used whole: the entry's buffer
    /// gets the entry's length, the others their writable size. A buffer missing at
    /// `head` (only `detach_unused_buf` on a live queue can do that) latches the queue
    /// broken.
    #[inline(always)]
    pub fn take_in_order(&mut self, head: u16, batch: (u16, u32), free: &mut FreeList) -> Option<InOrderTake<T>> {
        let writable = self.heads.get(head as usize).map_or(0, |h| h.writable);
        match self.release(head, free, false) {
            Some((token, ctx, descs)) => {
                let ends_batch = head == batch.0;
                Some(InOrderTake { token, len: if ends_batch { batch.1 } else { writable }, ctx, descs, ends_batch })
            }
            None => {
                self.fail(Fault::UsedIdNotInFlight { id: head as u32 });
                None
            }
        }
    }

    pub fn fail(&mut self, fault: Fault) {
        self.fault.get_or_insert(fault);
        self.shared.set_broken();
    }

    /// The first buffer still in flight, by slot.
    pub fn first_in_flight(&self) -> Option<u16> {
        self.heads.iter().position(|h| h.token.is_some()).map(|i| i as u16)
    }

    /// Frees the indirect pool (the ring itself belongs to the layout).
    pub fn free_pool(&mut self) {
        if let Some(r) = self.indirect_pool.take() {
            // SAFETY: allocated by `self.dma` in `new`; the queue is going away or being
            // re-created, and no descriptor in flight points into the pool any more.
            unsafe { self.dma.free(r) };
        }
    }
}
