//! The driver half of the split ring: Linux's `virtqueue_*` operations.
//!
//! The driver keeps a private record of every descriptor it wrote (address, length,
//! flags, chain link) and of every buffer in flight (token, descriptor count, writable
//! length). Freeing a chain walks the private links only: descriptor memory is shared and
//! the device may have scribbled on it. Everything the device writes (used index, used
//! entries, `avail_event`, `used.flags`) is read once, validated, and a bad value latches
//! the queue broken with nothing lost: tokens stay recoverable with `detach_unused_buf`.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU16, Ordering::Relaxed};

use super::{
    ContiguousLayout, SplitRing, AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY,
};
use crate::driver::{
    AddError, AddErrorKind, CreateError, Fault, InterruptAction, Kick, Notify, NotifyData, QueueConfig, QueueHandle,
    Sg, Shared, UsedBuf, UsedSnapshot,
};
use crate::event::need_event;
use crate::memory::{Direction, Dma, DmaRegion};
use crate::shared::{DescWords, RawDesc};
use crate::{Barriers, Features};

/// Private flag in [`DescExtra::flags`]: the segment was premapped, never unmap it.
const PRIV_PREMAPPED: u16 = 0x8000;

/// The driver's private copy of one descriptor it wrote (Linux's `vring_desc_extra`).
#[derive(Clone, Copy, Default)]
struct DescExtra {
    /// Device address, kept to unmap.
    addr: u64,
    /// Length, kept to unmap.
    len: u32,
    /// `DESC_F_*` as written, plus [`PRIV_PREMAPPED`].
    flags: u16,
    /// Next descriptor of the chain, or of the free list.
    next: u16,
}

/// Per-head state of a buffer in flight (Linux's `vring_desc_state_split`).
struct HeadState<T> {
    /// `Some` exactly while the buffer is in flight: the head check of `get_buf`.
    token: Option<T>,
    ctx: Option<usize>,
    /// Bytes the device may write; a used length above this is a device bug.
    writable: u32,
    /// Ring descriptors the chain occupies.
    descs: u16,
    /// Entries of its indirect table, 0 for a direct chain.
    indirect_entries: u16,
}

impl<T> Default for HeadState<T> {
    fn default() -> Self {
        Self { token: None, ctx: None, writable: 0, descs: 0, indirect_entries: 0 }
    }
}

/// A buffer about to be added: its segment lists, by direction.
struct Buffer<'a> {
    out: &'a [&'a [Sg]],
    ins: &'a [&'a [Sg]],
}

impl Buffer<'_> {
    /// Segments in order, each with its direction.
    fn segments(&self) -> impl Iterator<Item = (Sg, bool)> + '_ {
        let out = self.out.iter().flat_map(|l| l.iter().map(|s| (*s, false)));
        out.chain(self.ins.iter().flat_map(|l| l.iter().map(|s| (*s, true))))
    }

    fn count(&self) -> usize {
        self.out.iter().map(|l| l.len()).sum::<usize>() + self.ins.iter().map(|l| l.len()).sum::<usize>()
    }
}

/// The driver's end of a split virtqueue.
///
/// `T` is the token type handed back with each used buffer, `D` the DMA mapper, `N` the
/// transport's notifier. Operations that Linux requires to be serialized take `&mut self`;
/// those it documents as "need not be serialized" take `&self` (`disable_cb`, `poll`,
/// `vring_size`, `is_broken`, `interrupt`), and `notify` is also on the [`QueueHandle`].
pub struct SplitDriver<T, D: Dma, N: Notify> {
    ring: SplitRing,
    shared: Arc<Shared<N>>,
    barriers: Barriers,
    event_idx: bool,
    indirect: bool,
    context: bool,
    notification_data: bool,
    index: u16,
    size: u16,

    // Producer state.
    free_head: u16,
    num_free: u16,
    avail_idx_shadow: u16,
    num_added: u16,

    // Consumer state.
    last_used_idx: u16,
    /// The last `used.idx` read; entries up to it were validated and fenced already.
    used_idx_cache: u16,

    /// Mirrors what the driver asked in `avail.flags` (`NO_INTERRUPT`); also tracks it with
    /// event idx. Atomic because `disable_cb` takes `&self`.
    avail_flags_shadow: AtomicU16,
    /// Set by `interrupt` with event idx: the device will not interrupt again until the
    /// driver moves `used_event`, so `disable_cb` can skip its ring write.
    event_triggered: AtomicBool,
    fault: Option<Fault>,

    extra: Box<[DescExtra]>,
    heads: Box<[HeadState<T>]>,
    /// `size * indirect_max` table entries; head `h` owns entries `h * indirect_max ..`.
    indirect_pool: Option<DmaRegion>,
    indirect_max: u16,
    /// Private copies of the indirect entries, kept only when `D::MAPS` (to unmap).
    indirect_extra: Box<[DescExtra]>,

    ring_region: Option<DmaRegion>,
    desc_addr: u64,
    avail_addr: u64,
    used_addr: u64,
    dma: D,
}

impl<T, D: Dma, N: Notify> SplitDriver<T, D, N> {
    /// Allocates and initialises a split ring (Linux's `vring_create_virtqueue` for a split
    /// layout).
    #[doc(alias = "vring_create_virtqueue")]
    pub fn new(config: QueueConfig, dma: D, notifier: N) -> Result<Self, CreateError> {
        Self::check_config(&config)?;
        let mut size = config.size;
        let ring_region = loop {
            let layout = ContiguousLayout::new(size, config.vring_align);
            match dma.alloc_zeroed(layout.total, config.vring_align.max(16)) {
                Some(r) => break r,
                None if config.may_reduce_num && size > 1 => size /= 2,
                None => return Err(CreateError::NoMemory),
            }
        };
        Self::build(config, size, ring_region, true, dma, notifier)
    }

    /// Builds a queue in memory the caller provides and keeps ownership of (Linux's
    /// `vring_new_virtqueue`). The ring uses the contiguous layout of
    /// [`ContiguousLayout::new`]`(config.size, config.vring_align)` from `memory.cpu`.
    ///
    /// # Safety
    ///
    /// `memory` must be zeroed, 16-byte aligned, at least that layout's size, visible to
    /// the device at `memory.device_addr`, and valid for reads and writes for as long as
    /// the queue exists. The queue never frees it.
    #[doc(alias = "vring_new_virtqueue")]
    pub unsafe fn new_in(config: QueueConfig, memory: DmaRegion, dma: D, notifier: N) -> Result<Self, CreateError> {
        Self::check_config(&config)?;
        if memory.size < ContiguousLayout::new(config.size, config.vring_align).total
            || memory.cpu.as_ptr() as usize % 16 != 0
        {
            return Err(CreateError::NoMemory);
        }
        Self::build(config, config.size, memory, false, dma, notifier)
    }

    fn check_config(config: &QueueConfig) -> Result<(), CreateError> {
        if config.features.contains(Features::RING_PACKED) {
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

    /// `ring_region` holds a zeroed contiguous ring of `size` entries; `owned` says whether
    /// the queue frees it.
    fn build(
        config: QueueConfig,
        size: u16,
        ring_region: DmaRegion,
        owned: bool,
        dma: D,
        notifier: N,
    ) -> Result<Self, CreateError> {
        let layout = ContiguousLayout::new(size, config.vring_align);
        let indirect = config.features.contains(Features::INDIRECT_DESC) && !config.context && config.indirect_max > 1;
        let indirect_max = if indirect { config.indirect_max } else { 0 };
        let indirect_pool = if indirect {
            match dma.alloc_zeroed(16 * size as usize * indirect_max as usize, 16) {
                Some(r) => Some(r),
                None => {
                    if owned {
                        // SAFETY: allocated by this allocator in `new`, unused since.
                        unsafe { dma.free(ring_region) };
                    }
                    return Err(CreateError::NoMemory);
                }
            }
        } else {
            None
        };
        let base = ring_region.cpu;
        // SAFETY: the region is `layout.total` bytes, aligned to at least 16, zeroed and
        // valid while the queue exists (allocated in `new` and freed in `Drop`, or promised
        // by the caller of `new_in`); the offsets come from the same layout, which aligns
        // the used ring to `vring_align >= 4` and puts the available ring at `16 * size`.
        let ring = unsafe { SplitRing::new(base, base.add(layout.avail_offset), base.add(layout.used_offset), size) };
        let desc_addr = ring_region.device_addr;
        let mut q = Self {
            ring,
            shared: Shared::new(notifier),
            barriers: if config.weak_barriers && !config.features.contains(Features::ORDER_PLATFORM) {
                Barriers::Weak
            } else {
                Barriers::Strong
            },
            event_idx: config.features.contains(Features::EVENT_IDX),
            indirect,
            context: config.context,
            notification_data: config.features.contains(Features::NOTIFICATION_DATA),
            index: config.index,
            size,
            free_head: 0,
            num_free: size,
            avail_idx_shadow: 0,
            num_added: 0,
            last_used_idx: 0,
            used_idx_cache: 0,
            avail_flags_shadow: AtomicU16::new(0),
            event_triggered: AtomicBool::new(false),
            fault: None,
            extra: (0..size).map(|_| DescExtra::default()).collect(),
            heads: (0..size).map(|_| HeadState::default()).collect(),
            indirect_pool,
            indirect_max,
            indirect_extra: if D::MAPS {
                (0..size as usize * indirect_max as usize).map(|_| DescExtra::default()).collect()
            } else {
                Vec::new().into_boxed_slice()
            },
            desc_addr,
            avail_addr: desc_addr + layout.avail_offset as u64,
            used_addr: desc_addr + layout.used_offset as u64,
            ring_region: owned.then_some(ring_region),
            dma,
        };
        q.init_state(config.callbacks);
        Ok(q)
    }

    /// Resets the private state to an empty ring whose shared memory is zeroed.
    fn init_state(&mut self, callbacks: bool) {
        for (i, e) in self.extra.iter_mut().enumerate() {
            // The free list starts as 0 -> 1 -> ... -> size-1 (-> 0; `num_free` guards the end).
            *e = DescExtra { next: (i as u16 + 1) & (self.size - 1), ..DescExtra::default() };
        }
        self.free_head = 0;
        self.num_free = self.size;
        self.avail_idx_shadow = 0;
        self.num_added = 0;
        self.last_used_idx = 0;
        self.used_idx_cache = 0;
        self.fault = None;
        self.event_triggered.store(false, Relaxed);
        let flags = if callbacks { 0 } else { AVAIL_F_NO_INTERRUPT };
        self.avail_flags_shadow.store(flags, Relaxed);
        if !self.event_idx {
            self.ring.avail_flags().store(flags);
        }
    }

    /// A handle for `notify`, `is_broken` and `break_queue` that needs no borrow of the queue.
    pub fn handle(&self) -> QueueHandle<N> {
        QueueHandle { shared: self.shared.clone() }
    }

    /// Exposes one buffer made of several segment lists: first `out` (device-readable),
    /// then `ins` (device-writable).
    ///
    /// On error the token comes back in the [`AddError`]; nothing was published.
    #[doc(alias = "virtqueue_add_sgs")]
    pub fn add_sgs(&mut self, out: &[&[Sg]], ins: &[&[Sg]], token: T) -> Result<(), AddError<T>> {
        self.add(Buffer { out, ins }, token, None, false)
    }

    /// Exposes a device-readable buffer.
    #[doc(alias = "virtqueue_add_outbuf")]
    pub fn add_outbuf(&mut self, sg: &[Sg], token: T) -> Result<(), AddError<T>> {
        self.add(Buffer { out: &[sg], ins: &[] }, token, None, false)
    }

    /// Exposes a device-writable buffer.
    #[doc(alias = "virtqueue_add_inbuf")]
    pub fn add_inbuf(&mut self, sg: &[Sg], token: T) -> Result<(), AddError<T>> {
        self.add(Buffer { out: &[], ins: &[sg] }, token, None, false)
    }

    /// Exposes a device-writable buffer with a context value that `get_buf_ctx` returns.
    /// The queue must have been created with `context`.
    #[doc(alias = "virtqueue_add_inbuf_ctx")]
    pub fn add_inbuf_ctx(&mut self, sg: &[Sg], token: T, ctx: usize) -> Result<(), AddError<T>> {
        if !self.context {
            return Err(AddError { kind: AddErrorKind::NoContext, token });
        }
        self.add(Buffer { out: &[], ins: &[sg] }, token, Some(ctx), false)
    }

    /// Like [`Self::add_outbuf`], but `sg` holds device addresses, never mapped or unmapped.
    #[doc(alias = "virtqueue_add_outbuf_premapped")]
    pub fn add_outbuf_premapped(&mut self, sg: &[Sg], token: T) -> Result<(), AddError<T>> {
        self.add(Buffer { out: &[sg], ins: &[] }, token, None, true)
    }

    /// Like [`Self::add_inbuf`], but `sg` holds device addresses, never mapped or unmapped.
    #[doc(alias = "virtqueue_add_inbuf_premapped")]
    pub fn add_inbuf_premapped(&mut self, sg: &[Sg], token: T) -> Result<(), AddError<T>> {
        self.add(Buffer { out: &[], ins: &[sg] }, token, None, true)
    }

    /// Like [`Self::add_sgs`], with device addresses, never mapped or unmapped.
    pub fn add_sgs_premapped(&mut self, out: &[&[Sg]], ins: &[&[Sg]], token: T) -> Result<(), AddError<T>> {
        self.add(Buffer { out, ins }, token, None, true)
    }

    #[inline]
    fn map(&self, sg: Sg, writable: bool, premapped: bool) -> Option<(u64, u16)> {
        if premapped || !D::MAPS {
            return Some((sg.addr, if premapped { PRIV_PREMAPPED } else { 0 }));
        }
        let dir = if writable { Direction::FromDevice } else { Direction::ToDevice };
        self.dma.map(sg.addr, sg.len, dir).map(|a| (a, 0))
    }

    #[inline]
    fn unmap(&self, e: &DescExtra) {
        if D::MAPS && e.flags & (PRIV_PREMAPPED | DESC_F_INDIRECT) == 0 {
            let dir = if e.flags & DESC_F_WRITE != 0 { Direction::FromDevice } else { Direction::ToDevice };
            self.dma.unmap(e.addr, e.len, dir);
        }
    }

    /// Linux's `virtqueue_add_split`.
    #[inline]
    fn add(&mut self, buf: Buffer<'_>, token: T, ctx: Option<usize>, premapped: bool) -> Result<(), AddError<T>> {
        if self.shared.is_broken() {
            return Err(AddError { kind: AddErrorKind::Broken, token });
        }
        let total = buf.count();
        if total == 0 {
            return Err(AddError { kind: AddErrorKind::NoSegments, token });
        }
        let use_indirect = self.indirect && total > 1 && total <= self.indirect_max as usize && self.num_free > 0;
        if !use_indirect && total > self.size as usize {
            return Err(AddError { kind: AddErrorKind::TooManySegments, token });
        }
        let descs = if use_indirect { 1 } else { total as u16 };
        if self.num_free < descs {
            // Linux forces a notify here "for historical reasons" when the buffer has
            // readable parts, so a device that is slow to look gets prodded.
            if !buf.out.iter().all(|l| l.is_empty()) {
                self.shared.notifier.notify(self.notify_data());
            }
            return Err(AddError { kind: AddErrorKind::NoSpace, token });
        }
        let head = self.free_head;
        let written = if use_indirect {
            self.write_indirect(head, &buf, total as u16, premapped)
        } else {
            self.write_chain(head, &buf, premapped)
        };
        let (writable, next_free) = match written {
            Ok(w) => w,
            Err(()) => return Err(AddError { kind: AddErrorKind::NoMemory, token }),
        };
        self.num_free -= descs;
        self.free_head = next_free;
        let state = &mut self.heads[head as usize];
        state.token = Some(token);
        state.ctx = ctx;
        state.writable = writable;
        state.descs = descs;
        state.indirect_entries = if use_indirect { total as u16 } else { 0 };

        self.ring.avail_ring(self.avail_idx_shadow).store(head);
        // Descriptors and the ring entry before the index that publishes them; pairs with
        // the device's rmb after it reads `avail.idx` (`SplitDevice::pop`).
        self.barriers.wmb();
        self.avail_idx_shadow = self.avail_idx_shadow.wrapping_add(1);
        self.ring.avail_idx().store(self.avail_idx_shadow);
        self.num_added = self.num_added.wrapping_add(1);
        if self.num_added == u16::MAX {
            // The kick window `[shadow - num_added, shadow)` would alias at 2^16 unkicked
            // adds; Linux kicks here "just in case".
            self.kick();
        }
        Ok(())
    }

    /// Writes a direct chain from `head` along the free list. Returns the writable length
    /// and the first descriptor after the chain, or `Err` after undoing mappings.
    #[inline]
    fn write_chain(&mut self, head: u16, buf: &Buffer<'_>, premapped: bool) -> Result<(u32, u16), ()> {
        let total = buf.count();
        let mut i = head;
        let mut writable = 0u32;
        for (n, (sg, is_in)) in buf.segments().enumerate() {
            let Some((addr, priv_flags)) = self.map(sg, is_in, premapped) else {
                self.unmap_chain(head, n);
                return Err(());
            };
            let mut flags = if is_in { DESC_F_WRITE } else { 0 };
            if n + 1 != total {
                flags |= DESC_F_NEXT;
            }
            if is_in {
                writable = writable.saturating_add(sg.len);
            }
            let e = &mut self.extra[i as usize];
            e.flags = flags | priv_flags;
            if D::MAPS {
                e.addr = addr;
                e.len = sg.len;
            }
            let next = e.next;
            self.ring.desc(i).write(DescWords { addr, len: sg.len, lo16: flags, hi16: next });
            i = next;
        }
        Ok((writable, i))
    }

    /// Writes `total` segments into `head`'s indirect table and `head` pointing at it.
    fn write_indirect(&mut self, head: u16, buf: &Buffer<'_>, total: u16, premapped: bool) -> Result<(u32, u16), ()> {
        let pool = self.indirect_pool.as_ref().expect("indirect queues have a pool");
        let first = head as usize * self.indirect_max as usize;
        // SAFETY: the pool holds `size * indirect_max` 16-byte descriptors, 16-aligned, and
        // `head < size`, `total <= indirect_max`, so entries `first .. first + total` exist.
        let table: &[RawDesc] =
            unsafe { core::slice::from_raw_parts(pool.cpu.as_ptr().cast::<RawDesc>().add(first), total as usize) };
        let table_addr = pool.device_addr + 16 * first as u64;
        let mut writable = 0u32;
        for (n, (sg, is_in)) in buf.segments().enumerate() {
            let Some((addr, priv_flags)) = self.map(sg, is_in, premapped) else {
                for e in &self.indirect_extra[first..first + n] {
                    self.unmap(e);
                }
                return Err(());
            };
            let mut flags = if is_in { DESC_F_WRITE } else { 0 };
            if n + 1 != total as usize {
                flags |= DESC_F_NEXT;
            }
            if is_in {
                writable = writable.saturating_add(sg.len);
            }
            if D::MAPS {
                self.indirect_extra[first + n] = DescExtra { addr, len: sg.len, flags: flags | priv_flags, next: 0 };
            }
            table[n].write(DescWords { addr, len: sg.len, lo16: flags, hi16: n as u16 + 1 });
        }
        let e = &mut self.extra[head as usize];
        e.flags = DESC_F_INDIRECT;
        let next = e.next;
        self.ring.desc(head).write(DescWords {
            addr: table_addr,
            len: 16 * total as u32,
            lo16: DESC_F_INDIRECT,
            hi16: next,
        });
        Ok((writable, next))
    }

    /// Unmaps the first `n` descriptors of a chain starting at `head` (private links only).
    fn unmap_chain(&self, head: u16, n: usize) {
        let mut i = head;
        for _ in 0..n {
            let e = &self.extra[i as usize];
            self.unmap(e);
            i = e.next;
        }
    }

    fn notify_data(&self) -> NotifyData {
        NotifyData { queue_index: self.index, next: self.avail_idx_shadow }
    }

    /// Decides whether the device needs a notification for the buffers added since the
    /// last call; deliver it with [`Self::notify`] or [`QueueHandle::notify`] (Linux:
    /// `if (virtqueue_kick_prepare(vq)) virtqueue_notify(vq);`).
    #[doc(alias = "virtqueue_kick_prepare")]
    pub fn kick_prepare(&mut self) -> Option<Kick> {
        // The avail index store before the load of the device's event or flags. Pairs with
        // the device's mb between enabling notifications and re-reading `avail.idx`
        // (`SplitDevice::enable_notifications`): one of the two sides sees the other.
        self.barriers.mb();
        let new = self.avail_idx_shadow;
        let old = new.wrapping_sub(self.num_added);
        self.num_added = 0;
        let needed = if self.event_idx {
            need_event(self.ring.avail_event().load(), new, old)
        } else {
            self.ring.used_flags().load() & USED_F_NO_NOTIFY == 0
        };
        needed.then(|| Kick { data: self.notify_data() })
    }

    /// Notifies the device now (the second half of a kick; needs no exclusive borrow).
    /// Returns false if the queue is broken or the transport failed, which breaks it.
    #[doc(alias = "virtqueue_notify")]
    pub fn notify(&self) -> bool {
        self.shared.notify(self.notify_data())
    }

    /// `kick_prepare` then `notify` if needed. Returns false only if a needed notification
    /// failed.
    #[doc(alias = "virtqueue_kick")]
    pub fn kick(&mut self) -> bool {
        match self.kick_prepare() {
            Some(k) => self.shared.notify(k.data),
            None => true,
        }
    }

    /// The next used buffer: its token and the number of bytes the device wrote.
    #[doc(alias = "virtqueue_get_buf")]
    pub fn get_buf(&mut self) -> Option<UsedBuf<T>> {
        self.get_buf_ctx().map(|(u, _)| u)
    }

    /// Like [`Self::get_buf`], also returning the context given to `add_inbuf_ctx`.
    #[doc(alias = "virtqueue_get_buf_ctx")]
    pub fn get_buf_ctx(&mut self) -> Option<(UsedBuf<T>, Option<usize>)> {
        if self.shared.is_broken() {
            return None;
        }
        if self.last_used_idx == self.used_idx_cache {
            let used_idx = self.ring.used_idx().load();
            if used_idx == self.last_used_idx {
                return None;
            }
            let in_flight = self.avail_idx_shadow.wrapping_sub(self.last_used_idx);
            if used_idx.wrapping_sub(self.last_used_idx) > in_flight {
                self.fail(Fault::UsedIndexRanAhead { used_idx, last_used_idx: self.last_used_idx });
                return None;
            }
            self.used_idx_cache = used_idx;
            // Read the used entries only after the index that published them; pairs with
            // the device's wmb before it stores `used.idx` (`SplitDevice::publish_used`).
            self.barriers.rmb();
        }
        let (id_field, len_field) = self.ring.used_elem(self.last_used_idx);
        let id = id_field.load();
        let len = len_field.load();
        if id >= self.size as u32 {
            self.fail(Fault::UsedIdOutOfRange { id });
            return None;
        }
        let state = &mut self.heads[id as usize];
        if state.token.is_none() {
            self.fail(Fault::UsedIdNotInFlight { id });
            return None;
        }
        if len > state.writable {
            let writable = state.writable;
            self.fail(Fault::UsedLenTooLong { id, len, writable });
            return None;
        }
        let (token, ctx) = self.detach(id as u16);
        self.last_used_idx = self.last_used_idx.wrapping_add(1);
        if self.event_idx && self.avail_flags_shadow.load(Relaxed) & AVAIL_F_NO_INTERRUPT == 0 {
            // Ask for an interrupt at the next entry, and make that store visible before the
            // next read of `used.idx`; pairs with the device's mb before it reads
            // `used_event` (`SplitDevice::needs_notification`).
            self.ring.used_event().store(self.last_used_idx);
            self.barriers.mb();
        }
        Some((UsedBuf { token, len }, ctx))
    }

    /// Frees the chain at `head` by its private links and returns its token and context.
    fn detach(&mut self, head: u16) -> (T, Option<usize>) {
        let state = &mut self.heads[head as usize];
        let token = state.token.take().expect("caller checked the head is in flight");
        let ctx = state.ctx.take();
        let descs = state.descs;
        let indirect_entries = state.indirect_entries;
        if D::MAPS && indirect_entries > 0 {
            let first = head as usize * self.indirect_max as usize;
            for e in &self.indirect_extra[first..first + indirect_entries as usize] {
                self.unmap(e);
            }
        }
        let mut tail = head;
        for n in 0..descs {
            let e = &self.extra[tail as usize];
            self.unmap(e);
            if n + 1 < descs {
                tail = e.next;
            }
        }
        self.extra[tail as usize].next = self.free_head;
        self.free_head = head;
        self.num_free += descs;
        (token, ctx)
    }

    fn fail(&mut self, fault: Fault) {
        self.fault.get_or_insert(fault);
        self.shared.set_broken();
    }

    /// Asks the device not to interrupt (a hint: interrupts may still arrive).
    #[doc(alias = "virtqueue_disable_cb")]
    pub fn disable_cb(&self) {
        let shadow = self.avail_flags_shadow.load(Relaxed);
        if shadow & AVAIL_F_NO_INTERRUPT != 0 {
            return;
        }
        self.avail_flags_shadow.store(shadow | AVAIL_F_NO_INTERRUPT, Relaxed);
        // After an interrupt with event idx the device will not send another until
        // `used_event` moves, so the ring write would only cost a cache miss.
        if self.event_triggered.load(Relaxed) {
            return;
        }
        if self.event_idx {
            // As Linux: park `used_event` far behind; `enable_cb*` moves it back.
            self.ring.used_event().store(0);
        } else {
            self.ring.avail_flags().store(shadow | AVAIL_F_NO_INTERRUPT);
        }
    }

    fn enable_interrupts(&mut self) {
        self.event_triggered.store(false, Relaxed);
        let shadow = self.avail_flags_shadow.load(Relaxed);
        if shadow & AVAIL_F_NO_INTERRUPT != 0 {
            self.avail_flags_shadow.store(shadow & !AVAIL_F_NO_INTERRUPT, Relaxed);
            if !self.event_idx {
                self.ring.avail_flags().store(shadow & !AVAIL_F_NO_INTERRUPT);
            }
        }
    }

    /// Re-enables interrupts and returns the state to check with [`Self::poll`] for
    /// buffers that were used before the device could see the change.
    #[doc(alias = "virtqueue_enable_cb_prepare")]
    pub fn enable_cb_prepare(&mut self) -> UsedSnapshot {
        self.enable_interrupts();
        self.ring.used_event().store(self.last_used_idx);
        UsedSnapshot(self.last_used_idx)
    }

    /// Whether buffers were used after `snapshot` was taken. False on a broken queue.
    #[doc(alias = "virtqueue_poll")]
    pub fn poll(&self, snapshot: UsedSnapshot) -> bool {
        if self.shared.is_broken() {
            return false;
        }
        // The `used_event` / flags store of `enable_cb_prepare` before this load of
        // `used.idx`; pairs with the device's mb between publishing `used.idx` and reading
        // `used_event` (`SplitDevice::needs_notification`).
        self.barriers.mb();
        self.ring.used_idx().load() != snapshot.0
    }

    /// Re-enables interrupts; returns false if buffers are already pending, in which case
    /// the caller must process them (no interrupt may come for them).
    #[doc(alias = "virtqueue_enable_cb")]
    pub fn enable_cb(&mut self) -> bool {
        let snapshot = self.enable_cb_prepare();
        !self.poll(snapshot)
    }

    /// Re-enables interrupts, hinting the device to wait until about 3/4 of the buffers in
    /// flight are used. Returns false if that many are used already.
    #[doc(alias = "virtqueue_enable_cb_delayed")]
    pub fn enable_cb_delayed(&mut self) -> bool {
        self.enable_interrupts();
        let in_flight = self.avail_idx_shadow.wrapping_sub(self.last_used_idx);
        let bufs = (in_flight as u32 * 3 / 4) as u16;
        self.ring.used_event().store(self.last_used_idx.wrapping_add(bufs));
        // The event store before re-reading `used.idx`, as in `poll`.
        self.barriers.mb();
        self.ring.used_idx().load().wrapping_sub(self.last_used_idx) <= bufs
    }

    /// Whether used buffers are waiting (Linux's `more_used`).
    pub fn has_used(&self) -> bool {
        !self.shared.is_broken() && self.ring.used_idx().load() != self.last_used_idx
    }

    /// The interrupt handler's first step (Linux's `vring_interrupt`): says whether the
    /// queue has work and whether to run its callback.
    #[doc(alias = "vring_interrupt")]
    pub fn interrupt(&self) -> InterruptAction {
        if self.ring.used_idx().load() == self.last_used_idx {
            return InterruptAction::NoWork;
        }
        if self.shared.is_broken() {
            return InterruptAction::Broken;
        }
        if self.event_idx {
            self.event_triggered.store(true, Relaxed);
        }
        InterruptAction::Callback
    }

    /// Takes back one buffer the device has not returned, for shutdown: the device must be
    /// stopped. Rolls the available index back, as Linux does. Works on a broken queue.
    #[doc(alias = "virtqueue_detach_unused_buf")]
    pub fn detach_unused_buf(&mut self) -> Option<T> {
        let head = self.heads.iter().position(|h| h.token.is_some())? as u16;
        let (token, _) = self.detach(head);
        self.avail_idx_shadow = self.avail_idx_shadow.wrapping_sub(1);
        self.ring.avail_idx().store(self.avail_idx_shadow);
        self.used_idx_cache = self.last_used_idx;
        Some(token)
    }

    /// Number of ring entries.
    #[doc(alias = "virtqueue_get_vring_size")]
    pub fn vring_size(&self) -> u16 {
        self.size
    }

    /// Free descriptors (an indirect buffer costs one; a direct one, one per segment).
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Whether the queue is broken.
    #[doc(alias = "virtqueue_is_broken")]
    pub fn is_broken(&self) -> bool {
        self.shared.is_broken()
    }

    /// Marks the queue broken (see [`QueueHandle::break_queue`]).
    #[doc(alias = "__virtqueue_break")]
    pub fn break_queue(&self) {
        self.shared.set_broken();
    }

    /// Clears the broken flag (Linux's `__virtqueue_unbreak`, for the transport core on
    /// probe or restore). A fault found in the ring stays recorded.
    #[doc(alias = "__virtqueue_unbreak")]
    pub fn unbreak(&self) {
        self.shared.clear_broken();
    }

    /// The device misbehaviour that broke the queue, if that is what broke it.
    pub fn fault(&self) -> Option<Fault> {
        self.fault
    }

    /// Device address of the descriptor table.
    #[doc(alias = "virtqueue_get_desc_addr")]
    pub fn desc_addr(&self) -> u64 {
        self.desc_addr
    }

    /// Device address of the available ring (the driver area).
    #[doc(alias = "virtqueue_get_avail_addr")]
    pub fn avail_addr(&self) -> u64 {
        self.avail_addr
    }

    /// Device address of the used ring (the device area).
    #[doc(alias = "virtqueue_get_used_addr")]
    pub fn used_addr(&self) -> u64 {
        self.used_addr
    }

    /// Whether kicks must carry [`NotifyData`] (`VIRTIO_F_NOTIFICATION_DATA`).
    pub fn uses_notification_data(&self) -> bool {
        self.notification_data
    }

    /// The value a `VIRTIO_F_NOTIFICATION_DATA` transport writes for a kick now.
    #[doc(alias = "vring_notification_data")]
    pub fn notification_data(&self) -> u32 {
        self.notify_data().to_u32()
    }
}

impl<T, D: Dma, N: Notify> Drop for SplitDriver<T, D, N> {
    fn drop(&mut self) {
        if D::MAPS {
            while self.detach_unused_buf().is_some() {}
        }
        if let Some(r) = self.indirect_pool.take() {
            // SAFETY: allocated by `self.dma` in `new`; the ring is going away and nothing
            // of ours points into the pool any more.
            unsafe { self.dma.free(r) };
        }
        if let Some(r) = self.ring_region.take() {
            // SAFETY: as above, for the ring itself; `self.ring` dies with `self`.
            unsafe { self.dma.free(r) };
        }
    }
}
