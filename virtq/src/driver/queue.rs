//! The driver queue: Linux's virtqueue API, written once over a ring layout.
//!
//! [`DriverQueue`] holds the layout-independent bookkeeping and a layout `L`. Each layout
//! ([`crate::SplitDriverLayout`], [`crate::PackedDriverLayout`], with or without in-order) is a
//! separate type, so a queue whose layout is known at compile time runs code specialised
//! for it. [`crate::AnyDriverLayout`] chooses at run time from the negotiated features: one
//! `match` per operation, each arm calling the specialised code.

use super::core::{Buffer, DriverCore};
use super::Shared;
use super::{
    AddError, AddErrorKind, CreateError, Fault, InterruptAction, Kick, Notify, NotifyData, QueueConfig, QueueHandle,
    Sg, UsedBuf, UsedSnapshot,
};
use crate::memory::{Dma, DmaRegion};
use crate::LayoutKind;
use alloc::sync::Arc;

mod sealed {
    pub trait Sealed {}
}
pub(crate) use sealed::Sealed;

/// The ring-format half of a driver queue. Implemented by this crate's layouts only:
/// [`crate::SplitDriverLayout`], [`crate::PackedDriverLayout`] (each with or without
/// `IN_ORDER`) and [`crate::AnyDriverLayout`].
#[allow(private_interfaces)]
pub trait DriverLayout: Sized + Send + Sync + Sealed {
    /// The device side of the same layout, for code that runs both ends of one ring
    /// (tests, benchmarks): `Device<'m, M, L::Device>` serves a `DriverQueue<.., L>`.
    type Device: crate::DeviceLayout;
    /// Which layout this is.
    fn kind(&self) -> LayoutKind;
    #[doc(hidden)]
    fn create<D: Dma>(config: &QueueConfig, dma: &D) -> Result<Self, CreateError>;
    /// # Safety
    /// As [`DriverQueue::new_in`].
    #[doc(hidden)]
    unsafe fn create_in(config: &QueueConfig, memory: DmaRegion) -> Result<Self, CreateError>;
    #[doc(hidden)]
    fn size(&self) -> u16;
    #[doc(hidden)]
    fn free<D: Dma>(&mut self, dma: &D);
    /// Device addresses of the descriptor table, driver area and device area.
    #[doc(hidden)]
    fn addresses(&self) -> [u64; 3];
    #[doc(hidden)]
    fn add<T, D: Dma, N: Notify>(
        &mut self,
        core: &mut DriverCore<T, D, N>,
        buf: &Buffer<'_>,
        token: T,
        ctx: Option<usize>,
        premapped: bool,
    ) -> Result<(), AddError<T>>;
    /// Adds one single-segment buffer per element of `sgs`, in order, while descriptors
    /// last and mapping succeeds, and publishes them together. Returns how many.
    #[doc(hidden)]
    fn add_each<T, D: Dma, N: Notify>(
        &mut self,
        core: &mut DriverCore<T, D, N>,
        sgs: &[Sg],
        writable: bool,
        premapped: bool,
        token: &mut impl FnMut(usize) -> T,
    ) -> usize;
    /// [`Self::add`] for a buffer of one list of segments without a context: the usual
    /// `add_outbuf` / `add_inbuf`, which a layout may serve by a shorter path when the list
    /// holds one segment. The list stays the caller's slice: a copy of one `Sg` on the
    /// stack, read back by the wider loads of the general path, stalls store forwarding.
    #[doc(hidden)]
    #[inline(always)]
    fn add_one<T, D: Dma, N: Notify>(
        &mut self,
        core: &mut DriverCore<T, D, N>,
        sgs: &[Sg],
        writable: bool,
        premapped: bool,
        token: T,
    ) -> Result<(), AddError<T>> {
        self.add(core, &Buffer::One { sgs, writable }, token, None, premapped)
    }
    #[doc(hidden)]
    fn kick_prepare<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> bool;
    /// `NotifyData::next`: split avail index; packed offset with the wrap counter in bit 15.
    #[doc(hidden)]
    fn next_avail(&self) -> u16;
    #[doc(hidden)]
    fn get_buf<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> Option<(T, u32, Option<usize>)>;
    /// Up to `max` used buffers through `f`, in `get_buf` order; returns how many.
    #[doc(hidden)]
    #[inline(always)]
    fn get_each<T, D: Dma, N: Notify>(
        &mut self,
        core: &mut DriverCore<T, D, N>,
        max: usize,
        f: &mut impl FnMut(T, u32, Option<usize>),
    ) -> usize {
        get_one_by_one(self, core, max, f)
    }
    #[doc(hidden)]
    fn disable_cb<T, D: Dma, N: Notify>(&self, core: &DriverCore<T, D, N>);
    #[doc(hidden)]
    fn enable_cb_prepare<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> u16;
    /// Whether the ring has used entries beyond `snapshot` (the caller fences first).
    #[doc(hidden)]
    fn poll(&self, snapshot: u16) -> bool;
    #[doc(hidden)]
    fn enable_cb_delayed<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> bool;
    #[doc(hidden)]
    fn has_used(&self) -> bool;
    #[doc(hidden)]
    fn detach_unused<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> Option<T>;
    /// Zeroes the shared ring and re-initialises the layout state for an empty queue
    /// (the core's state was re-created just before).
    #[doc(hidden)]
    fn reset<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>);
    /// Test support: moves an empty split ring's indices to `index`. Packed rings wrap
    /// after `size` descriptors anyway and ignore it.
    #[doc(hidden)]
    fn start_at(&mut self, index: u16) {
        let _ = index;
    }
}

/// Latches the queue broken if dropped while armed: during unwinding from a panic.
struct BreakOnUnwind<'a, N: Notify>(Option<&'a Shared<N>>);

impl<N: Notify> BreakOnUnwind<'_, N> {
    #[inline(always)]
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl<N: Notify> Drop for BreakOnUnwind<'_, N> {
    fn drop(&mut self) {
        if let Some(shared) = self.0 {
            shared.set_broken();
        }
    }
}

/// [`DriverLayout::get_each`] as repeated `get_buf`s.
#[inline(always)]
pub(crate) fn get_one_by_one<L: DriverLayout, T, D: Dma, N: Notify>(
    layout: &mut L,
    core: &mut DriverCore<T, D, N>,
    max: usize,
    f: &mut impl FnMut(T, u32, Option<usize>),
) -> usize {
    let mut n = 0;
    while n < max {
        let Some((token, len, ctx)) = layout.get_buf(core) else { break };
        f(token, len, ctx);
        n += 1;
    }
    n
}

/// The driver's end of a virtqueue: Linux's `struct virtqueue` and its operations.
///
/// `T` is the token handed back with each used buffer, `D` the DMA mapper, `N` the
/// transport's notifier and `L` the ring layout. Operations Linux requires to be
/// serialized take `&mut self`; those it documents as "need not be serialized" take
/// `&self` (`disable_cb`, `poll`, `vring_size`, `is_broken`, `interrupt`), and `notify` is
/// also on the [`QueueHandle`], which needs no borrow of the queue at all.
pub struct DriverQueue<T, D: Dma, N: Notify, L: DriverLayout> {
    core: DriverCore<T, D, N>,
    layout: L,
    /// The core's shared state once more, for a burst's [`BreakOnUnwind`]: the burst holds
    /// `core` mutably, and a clone per burst would cost two atomic read-modify-writes,
    /// each a full barrier on x86 that waits for the burst's descriptor stores.
    unwind: Arc<Shared<N>>,
}

impl<T, D: Dma, N: Notify, L: DriverLayout> DriverQueue<T, D, N, L> {
    /// Allocates and initialises a ring (Linux's `vring_create_virtqueue`).
    #[doc(alias = "vring_create_virtqueue")]
    pub fn new(config: QueueConfig, dma: D, notifier: N) -> Result<Self, CreateError> {
        let mut layout = L::create(&config, &dma)?;
        match DriverCore::new(&config, layout.size(), dma, notifier) {
            Ok(core) => Ok(Self::init(core, layout)),
            Err((e, dma)) => {
                layout.free(&dma);
                Err(e)
            }
        }
    }

    /// Builds a queue of any layout in memory the caller provides and keeps (Linux's
    /// `vring_new_virtqueue`). The areas lie one after the other: for a split ring as
    /// [`crate::split::ContiguousAreas::new`]`(config.size, config.vring_align)` places
    /// them, for a packed ring as [`crate::packed::ContiguousAreas::new`]`(config.size)`.
    ///
    /// # Safety
    ///
    /// `memory` must be zeroed, 16-byte aligned, at least that layout's size, visible to
    /// the device at `memory.device_addr`, and valid for reads and writes for as long as
    /// the queue exists. The queue never frees it.
    #[doc(alias = "vring_new_virtqueue")]
    pub unsafe fn new_in(config: QueueConfig, memory: DmaRegion, dma: D, notifier: N) -> Result<Self, CreateError> {
        // SAFETY: the caller's promise, passed on.
        let layout = unsafe { L::create_in(&config, memory)? };
        let core = DriverCore::new(&config, layout.size(), dma, notifier).map_err(|(e, _)| e)?;
        Ok(Self::init(core, layout))
    }

    fn init(core: DriverCore<T, D, N>, layout: L) -> Self {
        let unwind = core.shared.clone();
        let mut q = Self { core, layout, unwind };
        q.layout.reset(&mut q.core);
        q
    }

    /// Which ring layout the queue runs.
    pub fn layout(&self) -> LayoutKind {
        self.layout.kind()
    }

    /// A handle for `notify`, `is_broken` and `break_queue` that needs no borrow of the queue.
    pub fn handle(&self) -> QueueHandle<N> {
        QueueHandle { shared: self.core.shared.clone() }
    }

    #[inline(always)]
    fn add(&mut self, buf: Buffer<'_>, token: T, ctx: Option<usize>, premapped: bool) -> Result<(), AddError<T>> {
        self.layout.add(&mut self.core, &buf, token, ctx, premapped)
    }

    /// One list of segments, all readable or all writable, without a context.
    #[inline(always)]
    fn add_list(&mut self, sgs: &[Sg], writable: bool, premapped: bool, token: T) -> Result<(), AddError<T>> {
        self.layout.add_one(&mut self.core, sgs, writable, premapped, token)
    }

    /// Exposes one buffer made of several segment lists: first `out` (device-readable),
    /// then `ins` (device-writable). On error the token comes back in the [`AddError`] and
    /// nothing was published.
    #[doc(alias = "virtqueue_add_sgs")]
    pub fn add_sgs(&mut self, out: &[&[Sg]], ins: &[&[Sg]], token: T) -> Result<(), AddError<T>> {
        self.add(Buffer::Lists { out, ins }, token, None, false)
    }

    /// Exposes a device-readable buffer.
    #[doc(alias = "virtqueue_add_outbuf")]
    pub fn add_outbuf(&mut self, sg: &[Sg], token: T) -> Result<(), AddError<T>> {
        self.add_list(sg, false, false, token)
    }

    /// Exposes a device-writable buffer.
    #[doc(alias = "virtqueue_add_inbuf")]
    pub fn add_inbuf(&mut self, sg: &[Sg], token: T) -> Result<(), AddError<T>> {
        self.add_list(sg, true, false, token)
    }

    /// Exposes a device-writable buffer with a context value that `get_buf_ctx` returns.
    /// The queue must have been created with `context`.
    #[doc(alias = "virtqueue_add_inbuf_ctx")]
    pub fn add_inbuf_ctx(&mut self, sg: &[Sg], token: T, ctx: usize) -> Result<(), AddError<T>> {
        self.add(Buffer::One { sgs: sg, writable: true }, token, Some(ctx), false)
    }

    /// Like [`Self::add_outbuf`], but `sg` holds device addresses, never mapped or unmapped.
    #[doc(alias = "virtqueue_add_outbuf_premapped")]
    pub fn add_outbuf_premapped(&mut self, sg: &[Sg], token: T) -> Result<(), AddError<T>> {
        self.add_list(sg, false, true, token)
    }

    /// Like [`Self::add_inbuf`], but `sg` holds device addresses, never mapped or unmapped.
    #[doc(alias = "virtqueue_add_inbuf_premapped")]
    pub fn add_inbuf_premapped(&mut self, sg: &[Sg], token: T) -> Result<(), AddError<T>> {
        self.add_list(sg, true, true, token)
    }

    /// Like [`Self::add_sgs`], with device addresses, never mapped or unmapped.
    pub fn add_sgs_premapped(&mut self, out: &[&[Sg]], ins: &[&[Sg]], token: T) -> Result<(), AddError<T>> {
        self.add(Buffer::Lists { out, ins }, token, None, true)
    }

    /// Exposes one device-readable buffer per element of `sgs`: buffer `i` is `sgs[i]`,
    /// with the token `token(i)`. See [`Self::add_inbufs`].
    #[doc(alias = "virtqueue_add_outbuf")]
    #[inline]
    pub fn add_outbufs(&mut self, sgs: &[Sg], token: impl FnMut(usize) -> T) -> Result<usize, AddErrorKind> {
        self.add_each(sgs, false, false, token)
    }

    /// Exposes one device-writable buffer per element of `sgs` (a receive queue's refill):
    /// buffer `i` is `sgs[i]`, with the token `token(i)`, called only once that buffer is
    /// sure to be added. As many as there are free descriptors for are added, in order,
    /// and published together, at the cost of one barrier and one index or flags store.
    /// Returns how many; the rest were not touched. `Err` when none could be added:
    /// `NoSpace`, `NoMemory` (the first mapping failed), or `Broken`.
    ///
    /// Kick as after `add_inbuf`. If `token` panics, the queue latches broken, and
    /// [`Self::detach_unused_buf`] (the device stopped) or [`Self::reset`] hands back the
    /// token of every buffer added before; the segment being added when it panicked stays
    /// mapped (with a mapping [`Dma`]).
    ///
    /// ```
    /// use virtq::testing::TestMemory;
    /// use virtq::{DeviceConfig, Features, PackedDevice, PackedDriver, QueueConfig, Segments};
    ///
    /// let mem = TestMemory::new(1 << 16);
    /// let features = Features::VERSION_1 | Features::RING_PACKED;
    /// let mut rx = PackedDriver::<usize, _, _>::new(QueueConfig::new(0, 8, features), &mem, ()).unwrap();
    /// // A receive refill: twelve buffers, of which the ring takes eight. The token says
    /// // which buffer came back.
    /// let bufs: Vec<_> = (0..12).map(|_| mem.alloc_sg(1514)).collect();
    /// assert_eq!(rx.add_inbufs(&bufs, |i| i), Ok(8));
    /// rx.kick();
    ///
    /// let config = DeviceConfig::new(8, features, rx.desc_addr(), rx.avail_addr(), rx.used_addr());
    /// let mut device = PackedDevice::new(&mem, config).unwrap();
    /// let mut segs = Segments::<1>::new();
    /// for len in [60, 1514, 300] {
    ///     let chain = device.pop(&mut segs).unwrap().expect("a buffer");
    ///     device.complete(chain, len);
    /// }
    /// device.publish_used();
    ///
    /// let mut received = Vec::new();
    /// assert_eq!(rx.get_bufs(64, |used| received.push((used.token, used.len))), 3);
    /// assert_eq!(received, [(0, 60), (1, 1514), (2, 300)]);
    /// // Refill from where it stopped.
    /// assert_eq!(rx.add_inbufs(&bufs[8..], |i| 8 + i), Ok(3));
    /// ```
    #[doc(alias = "virtqueue_add_inbuf")]
    #[inline]
    pub fn add_inbufs(&mut self, sgs: &[Sg], token: impl FnMut(usize) -> T) -> Result<usize, AddErrorKind> {
        self.add_each(sgs, true, false, token)
    }

    /// Like [`Self::add_outbufs`], but `sgs` holds device addresses, never mapped or unmapped.
    #[doc(alias = "virtqueue_add_outbuf_premapped")]
    #[inline]
    pub fn add_outbufs_premapped(&mut self, sgs: &[Sg], token: impl FnMut(usize) -> T) -> Result<usize, AddErrorKind> {
        self.add_each(sgs, false, true, token)
    }

    /// Like [`Self::add_inbufs`], but `sgs` holds device addresses, never mapped or unmapped.
    #[doc(alias = "virtqueue_add_inbuf_premapped")]
    #[inline]
    pub fn add_inbufs_premapped(&mut self, sgs: &[Sg], token: impl FnMut(usize) -> T) -> Result<usize, AddErrorKind> {
        self.add_each(sgs, true, true, token)
    }

    #[inline(always)]
    fn add_each(
        &mut self,
        sgs: &[Sg],
        writable: bool,
        premapped: bool,
        mut token: impl FnMut(usize) -> T,
    ) -> Result<usize, AddErrorKind> {
        if sgs.is_empty() {
            return Ok(0);
        }
        if self.core.shared.is_broken() {
            return Err(AddErrorKind::Broken);
        }
        let most = sgs.len().min(self.core.num_free as usize);
        if self.core.num_added as usize + most >= u16::MAX as usize {
            // The kick window would alias past 2^16 unkicked buffers: kick now, as `add`
            // does when it reaches that count. A failed kick broke the queue.
            if !self.kick() {
                return Err(AddErrorKind::Broken);
            }
        }
        // Should `token` panic, the burst is left half-recorded (its buffers written but
        // not published): the queue latches broken on the way out, so that it fails
        // cleanly, and `detach_unused_buf` or `reset` hands back every token.
        let guard = BreakOnUnwind(Some(&*self.unwind));
        let added = self.layout.add_each(&mut self.core, sgs, writable, premapped, &mut token);
        guard.disarm();
        match added {
            0 if most == 0 => Err(AddErrorKind::NoSpace),
            0 => Err(AddErrorKind::NoMemory),
            n => Ok(n),
        }
    }

    fn notify_data(&self) -> NotifyData {
        NotifyData { queue_index: self.core.index, next: self.layout.next_avail() }
    }

    /// Decides whether the device needs a notification for the buffers added since the
    /// last call; deliver it with [`Self::notify`] or [`QueueHandle::notify`] (Linux:
    /// `if (virtqueue_kick_prepare(vq)) virtqueue_notify(vq);`).
    #[doc(alias = "virtqueue_kick_prepare")]
    #[inline]
    pub fn kick_prepare(&mut self) -> Option<Kick> {
        self.layout.kick_prepare(&mut self.core).then(|| Kick { data: self.notify_data() })
    }

    /// Notifies the device now (the second half of a kick; needs no exclusive borrow).
    /// Returns false if the queue is broken or the transport failed, which breaks it.
    #[doc(alias = "virtqueue_notify")]
    pub fn notify(&self) -> bool {
        self.core.shared.notify(self.notify_data())
    }

    /// `kick_prepare` then `notify` if needed. Returns false only if a needed notification
    /// failed.
    #[doc(alias = "virtqueue_kick")]
    pub fn kick(&mut self) -> bool {
        match self.kick_prepare() {
            Some(k) => self.core.shared.notify(k.data),
            None => true,
        }
    }

    /// The next used buffer: its token and the number of bytes the device wrote.
    #[doc(alias = "virtqueue_get_buf")]
    #[inline(always)]
    pub fn get_buf(&mut self) -> Option<UsedBuf<T>> {
        self.get_buf_ctx().map(|(u, _)| u)
    }

    /// Like [`Self::get_buf`], also returning the context given to `add_inbuf_ctx`.
    #[doc(alias = "virtqueue_get_buf_ctx")]
    #[inline(always)]
    pub fn get_buf_ctx(&mut self) -> Option<(UsedBuf<T>, Option<usize>)> {
        if self.core.shared.is_broken() {
            return None;
        }
        self.layout.get_buf(&mut self.core).map(|(token, len, ctx)| (UsedBuf { token, len }, ctx))
    }

    /// Takes back up to `max` used buffers, in the order [`Self::get_buf`] would, handing
    /// each to `f`; returns how many. One check of the broken flag for all of them. A
    /// context given to `add_inbuf_ctx` is not passed on (use `get_buf_ctx` for those).
    #[doc(alias = "virtqueue_get_buf")]
    #[inline]
    pub fn get_bufs(&mut self, max: usize, mut f: impl FnMut(UsedBuf<T>)) -> usize {
        if self.core.shared.is_broken() {
            return 0;
        }
        self.layout.get_each(&mut self.core, max, &mut |token, len, _| f(UsedBuf { token, len }))
    }

    /// Asks the device not to interrupt (a hint: interrupts may still arrive).
    #[doc(alias = "virtqueue_disable_cb")]
    pub fn disable_cb(&self) {
        self.layout.disable_cb(&self.core)
    }

    /// Re-enables interrupts and returns the state to check with [`Self::poll`] for
    /// buffers that were used before the device could see the change.
    #[doc(alias = "virtqueue_enable_cb_prepare")]
    pub fn enable_cb_prepare(&mut self) -> UsedSnapshot {
        self.core.event_triggered.store(false, core::sync::atomic::Ordering::Relaxed);
        UsedSnapshot(self.layout.enable_cb_prepare(&mut self.core))
    }

    /// Whether buffers were used after `snapshot` was taken. False on a broken queue.
    #[doc(alias = "virtqueue_poll")]
    pub fn poll(&self, snapshot: UsedSnapshot) -> bool {
        if self.core.shared.is_broken() {
            return false;
        }
        // The event store of `enable_cb_prepare` before the load that checks for used
        // buffers; pairs with the device's mb between publishing a used entry and reading
        // the driver's event (`needs_notification` on the device side).
        self.core.barriers.mb();
        self.layout.poll(snapshot.0)
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
        self.core.event_triggered.store(false, core::sync::atomic::Ordering::Relaxed);
        self.layout.enable_cb_delayed(&mut self.core)
    }

    /// Whether used buffers are waiting (Linux's `more_used`). False on a broken queue.
    pub fn has_used(&self) -> bool {
        !self.core.shared.is_broken() && self.layout.has_used()
    }

    /// The interrupt handler's first step (Linux's `vring_interrupt`): says whether the
    /// queue has work and whether to run its callback.
    #[doc(alias = "vring_interrupt")]
    pub fn interrupt(&self) -> InterruptAction {
        if !self.layout.has_used() {
            return InterruptAction::NoWork;
        }
        if self.core.shared.is_broken() {
            return InterruptAction::Broken;
        }
        if self.core.event_idx {
            self.core.event_triggered.store(true, core::sync::atomic::Ordering::Relaxed);
        }
        InterruptAction::Callback
    }

    /// Takes back one buffer the device has not returned, for shutdown: the device must be
    /// stopped. Split rings roll the available index back, as Linux does. Works on a
    /// broken queue.
    #[doc(alias = "virtqueue_detach_unused_buf")]
    pub fn detach_unused_buf(&mut self) -> Option<T> {
        self.layout.detach_unused(&mut self.core)
    }

    /// Takes every buffer back through `recycle`, then re-initialises the ring at the same
    /// size (Linux's `virtqueue_reset`, for `VIRTIO_F_RING_RESET`). The transport must
    /// have reset the queue on the device first, and re-enables it afterwards.
    #[doc(alias = "virtqueue_reset")]
    pub fn reset(&mut self, mut recycle: impl FnMut(T)) {
        while let Some(t) = self.detach_unused_buf() {
            recycle(t);
        }
        let size = self.layout.size();
        self.core.resize_state(size);
        self.core.shared.clear_broken();
        self.layout.reset(&mut self.core);
    }

    /// Takes every buffer back through `recycle`, then re-creates the ring with `size`
    /// entries (Linux's `virtqueue_resize`). If the new ring cannot be allocated the old
    /// one is reset in place, stays usable, and `Err(NoMemory)` is returned. The
    /// transport must have reset the queue on the device first and programs the new
    /// addresses afterwards.
    #[doc(alias = "virtqueue_resize")]
    pub fn resize(&mut self, size: u16, recycle: impl FnMut(T)) -> Result<(), CreateError> {
        self.reset(recycle);
        if size == self.layout.size() {
            return Ok(());
        }
        let config = QueueConfig { size, may_reduce_num: false, ..self.core.config };
        let mut layout = L::create(&config, &self.core.dma)?;
        if self.core.indirect_max > 0 {
            let pool_bytes = 16 * size as usize * self.core.indirect_max as usize;
            let Some(pool) = self.core.dma.alloc_zeroed(pool_bytes, 16) else {
                layout.free(&self.core.dma);
                return Err(CreateError::NoMemory);
            };
            self.core.free_pool();
            self.core.indirect_pool = Some(pool);
            if D::MAPS {
                self.core.indirect_extra = (0..size as usize * self.core.indirect_max as usize)
                    .map(|_| super::core::DescExtra::default())
                    .collect();
            }
        }
        self.layout.free(&self.core.dma);
        self.layout = layout;
        self.core.resize_state(size);
        self.layout.reset(&mut self.core);
        Ok(())
    }

    /// Test support: on a new, empty split queue, moves the free-running indices to
    /// `index` (in memory too, before any device attaches), so that tests and models can
    /// cross the 16-bit wrap without 65,536 round trips first. A device attaching afterwards
    /// needs `avail_base = index`. Packed rings are unaffected.
    #[cfg(feature = "test-utils")]
    #[doc(hidden)]
    pub fn start_at(&mut self, index: u16) {
        assert_eq!(self.core.num_free, self.layout.size(), "start_at needs an empty queue");
        self.layout.start_at(index);
    }

    /// Number of ring entries.
    #[doc(alias = "virtqueue_get_vring_size")]
    pub fn vring_size(&self) -> u16 {
        self.layout.size()
    }

    /// Free descriptors (an indirect buffer costs one; a direct one, one per segment).
    pub fn num_free(&self) -> u16 {
        self.core.num_free
    }

    /// Whether the queue is broken.
    #[doc(alias = "virtqueue_is_broken")]
    pub fn is_broken(&self) -> bool {
        self.core.shared.is_broken()
    }

    /// Marks the queue broken (see [`QueueHandle::break_queue`]).
    #[doc(alias = "__virtqueue_break")]
    pub fn break_queue(&self) {
        self.core.shared.set_broken();
    }

    /// Clears the broken flag (Linux's `__virtqueue_unbreak`, for the transport core on
    /// probe or restore). A fault found in the ring stays recorded.
    #[doc(alias = "__virtqueue_unbreak")]
    pub fn unbreak(&self) {
        self.core.shared.clear_broken();
    }

    /// The device misbehaviour that broke the queue, if that is what broke it.
    pub fn fault(&self) -> Option<Fault> {
        self.core.fault
    }

    /// Device address of the descriptor table (packed: the descriptor ring).
    #[doc(alias = "virtqueue_get_desc_addr")]
    pub fn desc_addr(&self) -> u64 {
        self.layout.addresses()[0]
    }

    /// Device address of the driver area (split: the available ring; packed: the driver
    /// event suppression structure).
    #[doc(alias = "virtqueue_get_avail_addr")]
    pub fn avail_addr(&self) -> u64 {
        self.layout.addresses()[1]
    }

    /// Device address of the device area (split: the used ring; packed: the device event
    /// suppression structure).
    #[doc(alias = "virtqueue_get_used_addr")]
    pub fn used_addr(&self) -> u64 {
        self.layout.addresses()[2]
    }

    /// Whether kicks must carry [`NotifyData`] (`VIRTIO_F_NOTIFICATION_DATA`).
    pub fn uses_notification_data(&self) -> bool {
        self.core.notification_data
    }

    /// The value a `VIRTIO_F_NOTIFICATION_DATA` transport writes for a kick now.
    #[doc(alias = "vring_notification_data")]
    pub fn notification_data(&self) -> u32 {
        self.notify_data().to_u32()
    }
}

impl<T, D: Dma, N: Notify, L: DriverLayout> Drop for DriverQueue<T, D, N, L> {
    fn drop(&mut self) {
        if D::MAPS {
            while self.detach_unused_buf().is_some() {}
        }
        self.core.free_pool();
        self.layout.free(&self.core.dma);
    }
}
