//! Async completions: many buffers in flight, each awaited on its own.
//!
//! [`AsyncQueue`] puts a [`DriverQueue`] of any layout behind a lock and hands out one
//! future per buffer ([`Submit`]). The future resolves to what the device returned: the
//! caller's buffer, handed back, and the number of bytes the device wrote
//! ([`UsedBuf`]). The interrupt path, [`AsyncQueue::interrupt`], takes *every* used buffer
//! off the ring and wakes each one's future, then re-enables interrupts with Linux's
//! `enable_cb_prepare` / `poll` re-check, so that a buffer used meanwhile is never left
//! without an interrupt. Whoever runs it (an interrupt handler, a thread sleeping on an
//! eventfd, a task of an async runtime) is the reactor; this module depends on no
//! executor. Each buffer has a slot, allocated with the queue (twice as many as ring
//! entries), that holds the buffer and its future's waker; the slot's id is the ring token.
//!
//! ## Ownership and cancellation (the model of tokio-uring)
//!
//! A buffer is moved into [`AsyncQueue::submit`] and belongs to the queue until the device
//! returns it. A slot goes through these states:
//!
//! ```text
//!            add                     device returns it            future polled
//!   Free ──────────▶ Pending ───────────────────────────▶ Used ─────────────────▶ Free
//!                      │  future dropped                            (buffer to the future)
//!                      ▼
//!                   Orphaned ─── device returns it ──▶ Free (buffer dropped: back to its pool)
//!
//!   ring broken:  Pending ─▶ Failed (future woken with an error)   Orphaned ─▶ Abandoned
//!                 reclaim (device stopped): the buffers of Failed and Abandoned slots
//! ```
//!
//! Dropping a future never frees memory the device may still write: a buffer in the ring
//! stays in its slot until the device returns it, and is then dropped (its `Drop` gives it
//! back to its owner or pool). A future waiting for ring space holds its buffer itself, as
//! the device never saw it. When the ring breaks (a hostile device, a failed notification,
//! [`AsyncQueue::break_queue`]) every pending future resolves with
//! [`AddErrorKind::Broken`]; the buffers in the ring come back through
//! [`AsyncQueue::reclaim`] once the transport has stopped the device, as Linux reclaims
//! them with `virtqueue_detach_unused_buf` after a reset.
//!
//! ## Waiting for space
//!
//! A submission that finds the ring full waits, first in first out, behind earlier ones:
//! each buffer the device returns gives the next waiter its turn (so does a slot given
//! back when none was free). The wait list is allocated with the queue for as many waiters as the ring has
//! entries, and grows (allocates) only if more futures than that wait at once.
//!
//! ## Locks and wakers
//!
//! Every operation holds the queue's lock for a few ring operations. Wakers are woken, and
//! buffers of dropped futures dropped, only after the lock is released, so a waker or a
//! buffer's `Drop` may use the queue again. `R` is the lock ([`lock_api::RawMutex`]): the
//! default [`SpinLock`] suits a kernel whose interrupt handler does not run on a CPU that
//! holds the lock, and threads that are rarely preempted; a kernel whose handler calls
//! [`AsyncQueue::interrupt`] directly needs a lock that masks interrupts, and a userspace
//! program on a busy machine may prefer one that sleeps (`parking_lot::RawMutex`).
//!
//! ```
//! use std::future::Future;
//! use std::pin::pin;
//! use std::task::{Context, Poll, Waker};
//! use virtq::completion::AsyncQueue;
//! use virtq::testing::{MockDevice, TestMemory};
//! use virtq::{Features, QueueConfig, Virtqueue};
//!
//! let mem = TestMemory::new(1 << 16);
//! let features = Features::VERSION_1 | Features::EVENT_IDX | Features::RING_PACKED;
//! let ring = Virtqueue::<u16, _, _>::new(QueueConfig::new(0, 8, features), &mem, ()).unwrap();
//! let mut device = MockDevice::for_driver(&mem, &ring, features).unwrap();
//! let queue: AsyncQueue<Vec<u8>, _> = AsyncQueue::new(ring).unwrap();
//!
//! // Two requests in flight; each owns its buffer (here a label) until it completes.
//! let (a, b) = ([mem.alloc_sg(16)], [mem.alloc_sg(16)]);
//! let mut first = pin!(queue.submit_inbuf(&a, b"first".to_vec()));
//! let mut second = pin!(queue.submit_inbuf(&b, b"second".to_vec()));
//! let mut cx = Context::from_waker(Waker::noop());
//! assert!(first.as_mut().poll(&mut cx).is_pending());
//!
//! // The device answers both; the interrupt path completes both futures.
//! device.serve(|_| b"done".to_vec()).unwrap();
//! assert_eq!(queue.interrupt(), 2);
//! let Poll::Ready(Ok(used)) = second.as_mut().poll(&mut cx) else { panic!() };
//! assert_eq!((used.token.as_slice(), used.len), (&b"second"[..], 4));
//! let Poll::Ready(Ok(used)) = first.as_mut().poll(&mut cx) else { panic!() };
//! assert_eq!(used.token, b"first");
//! ```

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::{AtomicBool, Ordering};
use core::task::{Context, Poll, Waker};

use arrayvec::ArrayVec;

use crate::driver::{AddErrorKind, DriverLayout, DriverQueue, Kick, Notify, QueueHandle, Sg, UsedBuf};
use crate::memory::Dma;

pub use lock_api::RawMutex;

/// Used buffers taken off the ring per hold of the lock: each may wake its own future and
/// one waiter for space, which the wakeups gathered for after the lock must hold.
const ROUND: usize = 16;

/// What an [`AsyncQueue`] drives: a driver queue whose tokens are slot ids, or a
/// transport's queue that owns one (a vhost-user queue with its eventfds).
pub trait AsDriverQueue: Send {
    /// The queue's DMA mapper.
    type Dma: Dma;
    /// The queue's notifier.
    type Notify: Notify;
    /// The queue's ring layout.
    type Layout: DriverLayout;
    /// The driver queue.
    fn driver_queue(&self) -> &DriverQueue<u16, Self::Dma, Self::Notify, Self::Layout>;
    /// The driver queue, to add and take buffers.
    fn driver_queue_mut(&mut self) -> &mut DriverQueue<u16, Self::Dma, Self::Notify, Self::Layout>;
}

impl<D: Dma + Send, N: Notify, L: DriverLayout> AsDriverQueue for DriverQueue<u16, D, N, L> {
    type Dma = D;
    type Notify = N;
    type Layout = L;

    fn driver_queue(&self) -> &DriverQueue<u16, D, N, L> {
        self
    }

    fn driver_queue_mut(&mut self) -> &mut DriverQueue<u16, D, N, L> {
        self
    }
}

/// A test-and-test-and-set spin lock, the default lock of an [`AsyncQueue`]: no operating
/// system needed. See the module documentation for when to choose another.
pub struct SpinLock(AtomicBool);

// SAFETY: `lock` returns only after swapping the flag from false to true with Acquire, so
// one holder at a time; `unlock` releases with a Release store that the next Acquire sees.
unsafe impl RawMutex for SpinLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = SpinLock(AtomicBool::new(false));
    type GuardMarker = lock_api::GuardSend;

    fn lock(&self) {
        while !self.try_lock() {
            while self.0.load(Ordering::Relaxed) {
                core::hint::spin_loop();
            }
        }
    }

    fn try_lock(&self) -> bool {
        self.0.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    unsafe fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }

    fn is_locked(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The queue's lock. Under loom, loom's mutex (whose interleavings loom explores) stands in
/// for `R`, whose `const INIT` loom's atomics cannot provide.
#[cfg(not(loom))]
struct Lock<R: RawMutex, T>(lock_api::Mutex<R, T>);

#[cfg(not(loom))]
impl<R: RawMutex, T> Lock<R, T> {
    fn new(value: T) -> Self {
        Self(lock_api::Mutex::new(value))
    }

    #[inline]
    fn lock(&self) -> lock_api::MutexGuard<'_, R, T> {
        self.0.lock()
    }

    fn get_mut(&mut self) -> &mut T {
        self.0.get_mut()
    }
}

#[cfg(loom)]
struct Lock<R, T>(loom::sync::Mutex<T>, core::marker::PhantomData<R>);

#[cfg(loom)]
impl<R, T> Lock<R, T> {
    fn new(value: T) -> Self {
        Self(loom::sync::Mutex::new(value), core::marker::PhantomData)
    }

    fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get_mut(&mut self) -> &mut T {
        self.0.get_mut().unwrap_or_else(|e| e.into_inner())
    }
}

/// One descriptor id's state (see the module documentation).
enum Slot<B> {
    Free,
    /// In the ring; its future is alive.
    Pending {
        buf: B,
        waker: Option<Waker>,
    },
    /// In the ring; its future was dropped.
    Orphaned(B),
    /// Returned by the device; its future has yet to take it.
    Used {
        buf: B,
        len: u32,
    },
    /// In the ring when it broke; its future has yet to see the error. `None` once
    /// [`AsyncQueue::reclaim`] took the buffer.
    Failed(Option<B>),
    /// In the ring when it broke, and its future is gone: for `reclaim`.
    Abandoned(B),
}

/// Futures waiting for ring space, first in first out. Each waiter has a ticket, its
/// position counted from the first waiter ever; a dropped waiter leaves a hole. A waiter
/// taken off the list has the turn until it polls (or, dropped, passes it on): meanwhile a
/// new submission queues behind it rather than take the space it was woken for.
struct WaitList {
    wakers: VecDeque<Option<Waker>>,
    /// Ticket of `wakers[0]`.
    head: u64,
    /// Entries that are not holes.
    live: usize,
    /// Waiters woken for their turn that have not polled yet.
    turns: usize,
}

impl WaitList {
    fn with_capacity(n: usize) -> Self {
        Self { wakers: VecDeque::with_capacity(n), head: 0, live: 0, turns: 0 }
    }

    /// Whether a new submission must queue.
    fn is_busy(&self) -> bool {
        self.live > 0 || self.turns > 0
    }

    fn push(&mut self, waker: Waker) -> u64 {
        self.wakers.push_back(Some(waker));
        self.live += 1;
        self.head + self.wakers.len() as u64 - 1
    }

    /// Whether `ticket` was taken off the list: woken for its turn (or by a broken ring).
    fn had_turn(&self, ticket: u64) -> bool {
        ticket < self.head
    }

    /// The waker of `ticket`, if it is still waiting.
    fn waiting(&mut self, ticket: u64) -> Option<&mut Option<Waker>> {
        let i = usize::try_from(ticket.checked_sub(self.head)?).ok()?;
        self.wakers.get_mut(i).filter(|w| w.is_some())
    }

    /// A waiter that was still waiting leaves; returns its waker.
    fn cancel(&mut self, ticket: u64) -> Option<Waker> {
        let waker = self.waiting(ticket)?.take();
        self.live -= 1;
        waker
    }

    /// A waiter that had the turn polled, or left.
    fn end_turn(&mut self) {
        self.turns = self.turns.saturating_sub(1);
    }

    /// Gives the turn to the first waiter: takes it off the list and returns its waker.
    fn pop(&mut self) -> Option<Waker> {
        while let Some(entry) = self.wakers.pop_front() {
            self.head += 1;
            if let Some(w) = entry {
                self.live -= 1;
                self.turns += 1;
                return Some(w);
            }
        }
        None
    }
}

/// Work for after the lock: wakers to wake and to drop, buffers to drop, a kick. Inline
/// vectors: making one costs nothing, and every operation makes one.
struct Deferred<B> {
    wake: ArrayVec<Waker, { 2 * ROUND }>,
    orphans: ArrayVec<B, ROUND>,
    /// A waker replaced by a newer one (dropping it may drop a task).
    stale: Option<Waker>,
    /// The next waiter for space, given its turn by a slot given back.
    turn: Option<Waker>,
    /// The reactor, to kick for a submission.
    turn_reactor: Option<Waker>,
    kick: Option<Kick>,
}

impl<B> Deferred<B> {
    fn new() -> Self {
        Self {
            wake: ArrayVec::new(),
            orphans: ArrayVec::new(),
            stale: None,
            turn: None,
            turn_reactor: None,
            kick: None,
        }
    }

    fn has_room(&self) -> bool {
        !self.wake.is_full()
    }

    /// Callers check `has_room` (or stay within `ROUND` completions per round).
    fn wake(&mut self, waker: Waker) {
        self.wake.push(waker);
    }

    fn drop_buf(&mut self, buf: B) {
        self.orphans.push(buf);
    }
}

/// What a submission adds: one list of segments, or readable then writable lists.
#[derive(Clone, Copy)]
enum Segments<'a> {
    One { sgs: &'a [Sg], writable: bool, premapped: bool },
    Lists { out: &'a [&'a [Sg]], ins: &'a [&'a [Sg]], premapped: bool },
}

struct Inner<B, Q> {
    queue: Q,
    slots: Box<[Slot<B>]>,
    /// Free slot ids (a stack: the slot freed last is reused first, warm in cache).
    free: Vec<u16>,
    waiters: WaitList,
    /// Buffers in the ring: added, neither returned by the device nor reclaimed.
    in_ring: usize,
    /// Every future has seen the ring broken (set once a sweep completes).
    swept: bool,
    /// The reactor that kicks for the submissions ([`AsyncQueue::defer_kicks_to`]).
    reactor: Option<Waker>,
    /// Buffers were added since the last kick.
    unkicked: bool,
    /// The reactor was woken to kick and has not yet.
    reactor_woken: bool,
}

impl<B, Q: AsDriverQueue> Inner<B, Q> {
    /// Adds `buf` under a free slot id, and decides the kick. On error the buffer comes
    /// back (`NoSpace` also when every slot is taken).
    fn try_add(&mut self, segs: Segments<'_>, buf: B, d: &mut Deferred<B>) -> Result<u16, (AddErrorKind, B)> {
        let Some(&slot) = self.free.last() else {
            return Err((AddErrorKind::NoSpace, buf));
        };
        let q = self.queue.driver_queue_mut();
        let added = match segs {
            Segments::One { sgs, writable: true, premapped: false } => q.add_inbuf(sgs, slot),
            Segments::One { sgs, writable: false, premapped: false } => q.add_outbuf(sgs, slot),
            Segments::One { sgs, writable: true, premapped: true } => q.add_inbuf_premapped(sgs, slot),
            Segments::One { sgs, writable: false, premapped: true } => q.add_outbuf_premapped(sgs, slot),
            Segments::Lists { out, ins, premapped: false } => q.add_sgs(out, ins, slot),
            Segments::Lists { out, ins, premapped: true } => q.add_sgs_premapped(out, ins, slot),
        };
        if let Err(e) = added {
            return Err((e.kind, buf));
        }
        match &self.reactor {
            // The reactor kicks once for all the submissions before it runs.
            Some(reactor) => {
                self.unkicked = true;
                if !self.reactor_woken {
                    self.reactor_woken = true;
                    d.turn_reactor = Some(reactor.clone());
                }
            }
            None => d.kick = q.kick_prepare(),
        }
        self.free.pop();
        self.slots[slot as usize] = Slot::Pending { buf, waker: None };
        self.in_ring += 1;
        Ok(slot)
    }

    /// Gives a slot back. If none was free, a waiter for space may have waited for it:
    /// the next one gets the turn.
    fn free_slot(&mut self, slot: u16, d: &mut Deferred<B>) {
        self.slots[slot as usize] = Slot::Free;
        if self.free.is_empty() && d.turn.is_none() {
            d.turn = self.waiters.pop();
        }
        self.free.push(slot);
    }

    /// Takes up to `ROUND` used buffers off the ring into their slots. Returns how many.
    fn take_used(&mut self, d: &mut Deferred<B>) -> usize {
        let Inner { queue, slots, free, waiters, in_ring, .. } = self;
        let n = queue.driver_queue_mut().get_bufs(ROUND, |used| {
            let id = used.token;
            let Some(slot) = slots.get_mut(id as usize) else { return };
            match core::mem::replace(slot, Slot::Free) {
                Slot::Pending { buf, waker } => {
                    *slot = Slot::Used { buf, len: used.len };
                    if let Some(w) = waker {
                        d.wake(w);
                    }
                }
                Slot::Orphaned(buf) => {
                    free.push(id);
                    d.drop_buf(buf);
                }
                // The ring hands back only tokens in flight, which are Pending or Orphaned.
                other => *slot = other,
            }
        });
        *in_ring -= n;
        for _ in 0..n {
            match waiters.pop() {
                Some(w) => d.wake(w),
                None => break,
            }
        }
        n
    }

    fn needs_sweep(&self) -> bool {
        !self.swept && self.queue.driver_queue().is_broken()
    }

    /// On a broken ring: fails every pending future and wakes every waiter for space, as
    /// far as `d` has room. Returns whether there is more to do.
    fn sweep(&mut self, d: &mut Deferred<B>) -> bool {
        for slot in self.slots.iter_mut() {
            match slot {
                Slot::Pending { .. } => {
                    if !d.has_room() {
                        return true;
                    }
                    let Slot::Pending { buf, waker } = core::mem::replace(slot, Slot::Free) else { unreachable!() };
                    *slot = Slot::Failed(Some(buf));
                    if let Some(w) = waker {
                        d.wake(w);
                    }
                }
                Slot::Orphaned(_) => {
                    let Slot::Orphaned(buf) = core::mem::replace(slot, Slot::Free) else { unreachable!() };
                    *slot = Slot::Abandoned(buf);
                }
                _ => {}
            }
        }
        while d.has_room() {
            match self.waiters.pop() {
                Some(w) => d.wake(w),
                None => {
                    self.swept = true;
                    return false;
                }
            }
        }
        true
    }
}

/// A driver queue whose buffers are awaited: see the module documentation.
///
/// `B` is the caller's buffer (or any value that owns what the device accesses), handed
/// back with each completion; `Q` the driver queue or the transport queue that owns it;
/// `R` the lock. Share it (`Arc`, or a reference) between the tasks that submit and the
/// reactor that calls [`Self::interrupt`].
pub struct AsyncQueue<B, Q: AsDriverQueue, R: RawMutex = SpinLock> {
    inner: Lock<R, Inner<B, Q>>,
    handle: QueueHandle<Q::Notify>,
}

impl<B, Q: AsDriverQueue, R: RawMutex> AsyncQueue<B, Q, R> {
    /// Wraps an empty queue ([`NotEmpty`] gives it back if buffers are in flight) and
    /// enables its interrupts. Allocates two slots per ring entry (a buffer the device returned keeps
    /// its slot until its future takes it, while the ring fills again), and room for as
    /// many waiters for space as the ring has entries.
    pub fn new(mut queue: Q) -> Result<Self, NotEmpty<Q>> {
        let q = queue.driver_queue_mut();
        let size = q.vring_size();
        if q.num_free() != size {
            return Err(NotEmpty(queue));
        }
        // Empty: nothing can be pending, whatever this returns.
        q.enable_cb();
        // Ids 0 .. 2 * size fit the u16 token (sizes go up to 32768).
        let slots = 2 * size as usize;
        let handle = q.handle();
        let inner = Inner {
            slots: (0..slots).map(|_| Slot::Free).collect(),
            free: (0..slots).rev().map(|id| id as u16).collect(),
            waiters: WaitList::with_capacity(size as usize),
            in_ring: 0,
            swept: false,
            reactor: None,
            unkicked: false,
            reactor_woken: false,
            queue,
        };
        Ok(Self { inner: Lock::new(inner), handle })
    }

    /// Exposes a buffer made of readable lists `out` then writable lists `ins`, owned by
    /// `buf`, and returns the future of its completion. The buffer is added now if the
    /// ring has room and nobody waits for it; otherwise the future waits for space.
    ///
    /// The device is notified when it asks to be (`kick_prepare`), after the lock.
    #[doc(alias = "virtqueue_add_sgs")]
    pub fn submit<'a>(&'a self, out: &'a [&'a [Sg]], ins: &'a [&'a [Sg]], buf: B) -> Submit<'a, B, Q, R> {
        self.start(Segments::Lists { out, ins, premapped: false }, buf)
    }

    /// Like [`Self::submit`], with device addresses that are never mapped or unmapped.
    pub fn submit_premapped<'a>(&'a self, out: &'a [&'a [Sg]], ins: &'a [&'a [Sg]], buf: B) -> Submit<'a, B, Q, R> {
        self.start(Segments::Lists { out, ins, premapped: true }, buf)
    }

    /// A device-writable buffer (`add_inbuf`).
    #[doc(alias = "virtqueue_add_inbuf")]
    pub fn submit_inbuf<'a>(&'a self, sgs: &'a [Sg], buf: B) -> Submit<'a, B, Q, R> {
        self.start(Segments::One { sgs, writable: true, premapped: false }, buf)
    }

    /// A device-readable buffer (`add_outbuf`).
    #[doc(alias = "virtqueue_add_outbuf")]
    pub fn submit_outbuf<'a>(&'a self, sgs: &'a [Sg], buf: B) -> Submit<'a, B, Q, R> {
        self.start(Segments::One { sgs, writable: false, premapped: false }, buf)
    }

    fn start<'a>(&'a self, segs: Segments<'a>, buf: B) -> Submit<'a, B, Q, R> {
        let mut d = Deferred::new();
        let state = {
            let mut inner = self.inner.lock();
            if inner.waiters.is_busy() && inner.in_ring > 0 {
                // Behind those already waiting (who wait for buffers in the ring).
                State::NeedsSpace { segs, buf, ticket: None }
            } else {
                match inner.try_add(segs, buf, &mut d) {
                    Ok(slot) => State::InRing { slot },
                    Err((AddErrorKind::NoSpace, buf)) => State::NeedsSpace { segs, buf, ticket: None },
                    Err((kind, buf)) => State::Refused(SubmitError { kind, buf: Some(buf) }),
                }
            }
        };
        self.finish(&mut d);
        Submit { queue: self, state }
    }

    /// After the lock: delivers the kick, wakes, drops; sweeps if the kick broke the ring.
    /// `d` stays where it is: it is large, and moving it costs a copy.
    fn finish(&self, d: &mut Deferred<B>) {
        let kick_failed = d.kick.take().is_some_and(|k| !self.handle.notify(k));
        drop(d.stale.take());
        if let Some(w) = d.turn.take() {
            w.wake();
        }
        if let Some(w) = d.turn_reactor.take() {
            w.wake();
        }
        for w in d.wake.drain(..) {
            w.wake();
        }
        d.orphans.clear();
        if kick_failed {
            self.sweep();
        }
    }

    /// Runs `f` under the lock, then the sweep if the ring is broken, then the deferred work.
    fn locked<T>(&self, f: impl FnOnce(&mut Inner<B, Q>, &mut Deferred<B>) -> T) -> T {
        let mut d = Deferred::new();
        let (out, more) = {
            let mut inner = self.inner.lock();
            let out = f(&mut inner, &mut d);
            let more = inner.needs_sweep() && inner.sweep(&mut d);
            (out, more)
        };
        self.finish(&mut d);
        if more {
            self.sweep();
        }
        out
    }

    /// Fails every pending future of a broken ring, in rounds.
    fn sweep(&self) {
        loop {
            let mut d = Deferred::new();
            let more = {
                let mut inner = self.inner.lock();
                inner.needs_sweep() && inner.sweep(&mut d)
            };
            self.finish(&mut d);
            if !more {
                return;
            }
        }
    }

    /// The interrupt path (Linux's `vring_interrupt` with a driver's callback, as
    /// virtio-blk's `virtblk_done`): takes every used buffer off the ring, wakes each one's
    /// future, then re-enables interrupts and checks the ring again (`enable_cb_prepare`
    /// then `poll`), draining until nothing slipped in. Returns how many buffers came
    /// back. On a broken ring it fails every pending future instead.
    #[doc(alias = "vring_interrupt")]
    pub fn interrupt(&self) -> usize {
        self.drain(true)
    }

    /// Takes every used buffer off the ring and wakes each one's future, leaving
    /// interrupts as they are: for a reactor that busy-polls. Returns how many.
    pub fn process_used(&self) -> usize {
        self.drain(false)
    }

    fn drain(&self, reenable: bool) -> usize {
        if !reenable {
            // A busy-polling reactor asks this in a loop: nothing used, nothing else to do.
            let inner = self.inner.lock();
            if !inner.queue.driver_queue().has_used() && !inner.needs_sweep() {
                return 0;
            }
        }
        let mut total = 0;
        let mut first = true;
        loop {
            let (n, more) = self.locked(|inner, d| {
                if core::mem::take(&mut first) && reenable {
                    // Quiet while draining; with event index after an interrupt this
                    // writes nothing (see `disable_cb`).
                    let q = inner.queue.driver_queue();
                    q.interrupt();
                    q.disable_cb();
                }
                let n = inner.take_used(d);
                if n == ROUND {
                    return (n, true);
                }
                if reenable && !inner.queue.driver_queue().is_broken() {
                    let q = inner.queue.driver_queue_mut();
                    let snapshot = q.enable_cb_prepare();
                    if q.poll(snapshot) {
                        q.disable_cb();
                        return (n, true);
                    }
                }
                (n, false)
            });
            total += n;
            if !more {
                return total;
            }
        }
    }

    /// Makes `reactor` responsible for kicks: a submission then only adds its buffer and
    /// wakes `reactor` (once until it kicks), which is to call [`Self::kick`] when it runs,
    /// so that the submissions made in between share one notification. An async runtime's
    /// reactor task that runs after the tasks it woke kicks once per batch this way, as
    /// tokio-uring submits once per turn of its runtime. Call it again whenever the
    /// reactor's waker changes; [`Self::kick_immediately`] undoes it.
    pub fn defer_kicks_to(&self, reactor: &Waker) {
        let stale = {
            let mut inner = self.inner.lock();
            match &inner.reactor {
                Some(r) if r.will_wake(reactor) => None,
                _ => inner.reactor.replace(reactor.clone()),
            }
        };
        drop(stale);
    }

    /// Each submission kicks for itself again (the default), and a kick the reactor owed
    /// is delivered now.
    pub fn kick_immediately(&self) {
        let stale = self.inner.lock().reactor.take();
        drop(stale);
        self.kick();
    }

    /// Delivers the kick owed for the buffers added since the last one, if the device
    /// wants it (`kick_prepare`, then the notification after the lock). For a reactor
    /// that [`Self::defer_kicks_to`] made responsible. Returns false if the notification
    /// failed (which breaks the ring).
    #[doc(alias = "virtqueue_kick")]
    pub fn kick(&self) -> bool {
        self.locked(|inner, d| {
            inner.reactor_woken = false;
            if core::mem::take(&mut inner.unkicked) {
                d.kick = inner.queue.driver_queue_mut().kick_prepare();
            }
        });
        !self.is_broken()
    }

    /// Asks the device not to interrupt (a hint), for a reactor about to busy-poll.
    /// [`Self::interrupt`] enables them again.
    #[doc(alias = "virtqueue_disable_cb")]
    pub fn disable_interrupts(&self) {
        self.inner.lock().queue.driver_queue().disable_cb();
    }

    /// Whether used buffers wait for [`Self::interrupt`] or [`Self::process_used`].
    pub fn has_used(&self) -> bool {
        self.inner.lock().queue.driver_queue().has_used()
    }

    /// Buffers the ring holds now (added, not yet returned or reclaimed).
    pub fn in_flight(&self) -> usize {
        self.inner.lock().in_ring
    }

    /// Whether the ring is broken (no lock taken).
    #[doc(alias = "virtqueue_is_broken")]
    pub fn is_broken(&self) -> bool {
        self.handle.is_broken()
    }

    /// Breaks the ring and wakes every pending future with [`AddErrorKind::Broken`]: for a
    /// transport that lost its device. The buffers stay in the ring for [`Self::reclaim`].
    #[doc(alias = "virtio_break_device")]
    pub fn break_queue(&self) {
        self.handle.break_queue();
        self.sweep();
    }

    /// Shuts the queue down: `stop` stops the device (a transport's queue reset), then the
    /// ring is broken, every pending future fails, and every buffer the ring still holds
    /// goes to `recycle` (Linux's `virtqueue_detach_unused_buf` after a reset). Returns
    /// how many buffers were reclaimed. `stop` runs under the lock.
    #[doc(alias = "virtqueue_detach_unused_buf")]
    pub fn reclaim(&self, stop: impl FnOnce(&mut Q), mut recycle: impl FnMut(B)) -> usize {
        self.locked(|inner, _| {
            stop(&mut inner.queue);
            inner.queue.driver_queue().break_queue();
        });
        self.sweep();
        let mut total = 0;
        loop {
            let mut bufs: [Option<B>; ROUND] = [const { None }; ROUND];
            let n = {
                let mut inner = self.inner.lock();
                let mut n = 0;
                while n < ROUND {
                    let Some(id) = inner.queue.driver_queue_mut().detach_unused_buf() else { break };
                    inner.in_ring -= 1;
                    let Some(slot) = inner.slots.get_mut(id as usize) else { continue };
                    match core::mem::replace(slot, Slot::Free) {
                        Slot::Failed(buf) => {
                            *slot = Slot::Failed(None);
                            bufs[n] = buf;
                        }
                        Slot::Abandoned(buf) => {
                            inner.free.push(id);
                            bufs[n] = Some(buf);
                        }
                        // After the sweep the ring holds only Failed and Abandoned slots.
                        other => *slot = other,
                    }
                    n += 1;
                }
                n
            };
            for buf in bufs.into_iter().flatten() {
                recycle(buf);
                total += 1;
            }
            if n < ROUND {
                return total;
            }
        }
    }

    /// Reads the queue under the lock (`fault`, `vring_size`, a transport's state).
    pub fn with_queue<T>(&self, f: impl FnOnce(&Q) -> T) -> T {
        f(&self.inner.lock().queue)
    }

    /// A handle for `notify`, `is_broken` and `break_queue` that needs no lock. Breaking
    /// the ring through it wakes no future: use [`Self::break_queue`] for that.
    pub fn handle(&self) -> QueueHandle<Q::Notify> {
        self.handle.clone()
    }
}

impl<B, Q: AsDriverQueue, R: RawMutex> Drop for AsyncQueue<B, Q, R> {
    fn drop(&mut self) {
        // The device may still write what the ring holds: never free it (stop the device
        // and `reclaim` to have it back).
        for slot in self.inner.get_mut().slots.iter_mut() {
            match core::mem::replace(slot, Slot::Free) {
                Slot::Pending { buf, .. } | Slot::Orphaned(buf) | Slot::Abandoned(buf) | Slot::Failed(Some(buf)) => {
                    core::mem::forget(buf)
                }
                _ => {}
            }
        }
    }
}

impl<B, Q: AsDriverQueue, R: RawMutex> fmt::Debug for AsyncQueue<B, Q, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncQueue").field("broken", &self.is_broken()).finish_non_exhaustive()
    }
}

/// [`AsyncQueue::new`] refused a queue with buffers in flight, whose tokens are not its
/// slots; the queue comes back.
pub struct NotEmpty<Q>(pub Q);

impl<Q> fmt::Debug for NotEmpty<Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NotEmpty")
    }
}

impl<Q> fmt::Display for NotEmpty<Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an async queue needs a driver queue without buffers in flight")
    }
}

impl<Q> core::error::Error for NotEmpty<Q> {}

/// A submission that did not complete: why, and the buffer if the device never saw it.
pub struct SubmitError<B> {
    /// Why: [`AddErrorKind::Broken`] for a broken ring, or what `add` refused (never
    /// `NoSpace`: a submission waits for space).
    pub kind: AddErrorKind,
    /// The buffer, if it never reached the ring. A buffer the ring held when it broke
    /// comes back through [`AsyncQueue::reclaim`] instead, as the device may still write it.
    pub buf: Option<B>,
}

impl<B> fmt::Debug for SubmitError<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubmitError").field("kind", &self.kind).field("buf_returned", &self.buf.is_some()).finish()
    }
}

impl<B> fmt::Display for SubmitError<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.kind.fmt(f)
    }
}

impl<B> core::error::Error for SubmitError<B> {}

enum State<'a, B> {
    /// Not in the ring yet: waiting for space, with a place in the wait list once polled.
    NeedsSpace {
        segs: Segments<'a>,
        buf: B,
        ticket: Option<u64>,
    },
    InRing {
        slot: u16,
    },
    Refused(SubmitError<B>),
    Done,
}

/// The completion of one buffer, from [`AsyncQueue::submit`]: resolves to the buffer and
/// the bytes the device wrote, or an error.
///
/// Dropping it is always safe: a buffer in the ring stays with the queue until the device
/// returns it, and is dropped then.
#[must_use = "a dropped submission leaves its buffer to the queue until the device returns it"]
pub struct Submit<'a, B, Q: AsDriverQueue, R: RawMutex = SpinLock> {
    queue: &'a AsyncQueue<B, Q, R>,
    state: State<'a, B>,
}

// The buffer is never pinned: it moves in and out of the slot by value.
impl<B, Q: AsDriverQueue, R: RawMutex> Unpin for Submit<'_, B, Q, R> {}

impl<B, Q: AsDriverQueue, R: RawMutex> Submit<'_, B, Q, R> {
    /// Whether the buffer is in the ring (false while it waits for space).
    pub fn is_submitted(&self) -> bool {
        matches!(self.state, State::InRing { .. })
    }
}

impl<B, Q: AsDriverQueue, R: RawMutex> Future for Submit<'_, B, Q, R> {
    type Output = Result<UsedBuf<B>, SubmitError<B>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let queue = this.queue;
        match core::mem::replace(&mut this.state, State::Done) {
            State::InRing { slot } => {
                let r = queue.locked(|inner, d| poll_slot(inner, d, slot, cx.waker()));
                if r.is_pending() {
                    this.state = State::InRing { slot };
                }
                r
            }
            State::NeedsSpace { segs, buf, ticket } => {
                let (state, r) = queue.locked(|inner, d| poll_space(inner, d, segs, buf, ticket, cx.waker()));
                this.state = state;
                r
            }
            State::Refused(e) => Poll::Ready(Err(e)),
            State::Done => panic!("Submit polled after it completed"),
        }
    }
}

fn poll_slot<B, Q: AsDriverQueue>(
    inner: &mut Inner<B, Q>,
    d: &mut Deferred<B>,
    id: u16,
    waker: &Waker,
) -> Poll<Result<UsedBuf<B>, SubmitError<B>>> {
    if inner.needs_sweep() {
        // Fails this slot too if it is pending (or leaves it to the rounds after the lock).
        inner.sweep(d);
    }
    let slot = &mut inner.slots[id as usize];
    if let Slot::Pending { waker: registered, .. } = slot {
        if !registered.as_ref().is_some_and(|w| w.will_wake(waker)) {
            d.stale = registered.replace(waker.clone());
        }
        return Poll::Pending;
    }
    match core::mem::replace(slot, Slot::Free) {
        Slot::Used { buf, len } => {
            inner.free_slot(id, d);
            Poll::Ready(Ok(UsedBuf { token: buf, len }))
        }
        failed @ Slot::Failed(_) => {
            match failed {
                Slot::Failed(Some(buf)) => *slot = Slot::Abandoned(buf),
                _ => inner.free_slot(id, d),
            }
            Poll::Ready(Err(SubmitError { kind: AddErrorKind::Broken, buf: None }))
        }
        // Only this future moves its slot out of these states, and it is done then.
        Slot::Free | Slot::Pending { .. } | Slot::Orphaned(_) | Slot::Abandoned(_) => {
            unreachable!("a live submission's slot is its own")
        }
    }
}

#[allow(clippy::type_complexity)]
fn poll_space<'a, B, Q: AsDriverQueue>(
    inner: &mut Inner<B, Q>,
    d: &mut Deferred<B>,
    segs: Segments<'a>,
    buf: B,
    ticket: Option<u64>,
    waker: &Waker,
) -> (State<'a, B>, Poll<Result<UsedBuf<B>, SubmitError<B>>>) {
    let had_turn = ticket.is_some_and(|t| inner.waiters.had_turn(t));
    if inner.queue.driver_queue().is_broken() {
        match ticket {
            Some(_) if had_turn => inner.waiters.end_turn(),
            Some(t) => d.stale = inner.waiters.cancel(t),
            None => {}
        }
        return (State::Done, Poll::Ready(Err(SubmitError { kind: AddErrorKind::Broken, buf: Some(buf) })));
    }
    if let Some(t) = ticket.filter(|_| !had_turn) {
        if let Some(entry) = inner.waiters.waiting(t) {
            // Still waiting its turn.
            if !entry.as_ref().is_some_and(|w| w.will_wake(waker)) {
                d.stale = entry.replace(waker.clone());
            }
            return (State::NeedsSpace { segs, buf, ticket }, Poll::Pending);
        }
    }
    if had_turn {
        inner.waiters.end_turn();
    } else if inner.waiters.is_busy() && inner.in_ring > 0 {
        // First polled, with others ahead of it.
        let ticket = Some(inner.waiters.push(waker.clone()));
        return (State::NeedsSpace { segs, buf, ticket }, Poll::Pending);
    }
    match inner.try_add(segs, buf, d) {
        Ok(slot) => {
            // Submitted; register now so that a completion before the next poll wakes it.
            if let Slot::Pending { waker: w, .. } = &mut inner.slots[slot as usize] {
                *w = Some(waker.clone());
            }
            (State::InRing { slot }, Poll::Pending)
        }
        Err((AddErrorKind::NoSpace, buf)) => {
            let ticket = Some(inner.waiters.push(waker.clone()));
            (State::NeedsSpace { segs, buf, ticket }, Poll::Pending)
        }
        Err((kind, buf)) => (State::Done, Poll::Ready(Err(SubmitError { kind, buf: Some(buf) }))),
    }
}

impl<B, Q: AsDriverQueue, R: RawMutex> Drop for Submit<'_, B, Q, R> {
    fn drop(&mut self) {
        match core::mem::replace(&mut self.state, State::Done) {
            State::InRing { slot: id } => self.queue.locked(|inner, d| {
                let slot = &mut inner.slots[id as usize];
                match core::mem::replace(slot, Slot::Free) {
                    Slot::Pending { buf, waker } => {
                        *slot = Slot::Orphaned(buf);
                        d.stale = waker;
                    }
                    Slot::Used { buf, .. } => {
                        d.drop_buf(buf);
                        inner.free_slot(id, d);
                    }
                    Slot::Failed(Some(buf)) => *slot = Slot::Abandoned(buf),
                    Slot::Failed(None) => inner.free_slot(id, d),
                    other => *slot = other,
                }
            }),
            State::NeedsSpace { ticket: Some(t), buf, .. } => {
                self.queue.locked(|inner, d| {
                    if inner.waiters.had_turn(t) {
                        // Woken for its turn but gone without using it: pass the turn on.
                        inner.waiters.end_turn();
                        d.turn = inner.waiters.pop();
                    } else {
                        d.stale = inner.waiters.cancel(t);
                    }
                });
                drop(buf);
            }
            _ => {}
        }
    }
}
