//! Driver-side vocabulary shared by every ring layout: segments, errors, notification,
//! and the handle that may be used without the queue's exclusive borrow.

pub(crate) mod any;
pub(crate) mod core;
pub(crate) mod queue;

pub use queue::{DriverLayout, DriverQueue};

use ::core::fmt;
use ::core::sync::atomic::{AtomicBool, Ordering};
use alloc::sync::Arc;

use crate::Features;

/// One segment of a buffer: `len` bytes at `addr`.
///
/// For the ordinary `add_*` calls `addr` is a CPU address that the queue's [`crate::Dma`]
/// maps for the device; for the `*_premapped` calls it is already a device address. The
/// queue never dereferences it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sg {
    /// Address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

impl Sg {
    /// A segment of `len` bytes at `addr`.
    pub const fn new(addr: u64, len: u32) -> Self {
        Self { addr, len }
    }

    /// The segment covering `buf`, by CPU address (for identity or IOMMU mapping).
    ///
    /// The queue does not borrow `buf`: keeping the memory alive and untouched until the
    /// buffer comes back is the caller's business, typically by moving its owner into the
    /// token.
    pub fn from_slice(buf: &[u8]) -> Self {
        Self { addr: buf.as_ptr() as u64, len: buf.len() as u32 }
    }
}

/// What went wrong in an `add_*` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddErrorKind {
    /// Not enough free descriptors now (`-ENOSPC`). The only retryable error, and only
    /// after some buffers have come back through `get_buf`.
    NoSpace,
    /// Mapping a segment failed (`-ENOMEM`).
    NoMemory,
    /// The queue is broken (`-EIO`).
    Broken,
    /// The buffer had no segments (Linux: `BUG_ON(total_sg == 0)`).
    NoSegments,
    /// The buffer has more segments than the ring can ever hold without indirect
    /// descriptors (Linux warns and fails with `-ENOSPC` forever).
    TooManySegments,
    /// `add_inbuf_ctx` on a queue created without `context` (Linux: `BUG_ON`).
    NoContext,
}

/// An `add_*` call failed; the token comes back untouched.
pub struct AddError<T> {
    /// Why.
    pub kind: AddErrorKind,
    /// The token that was passed in.
    pub token: T,
}

impl<T> AddError<T> {
    /// Whether trying again can succeed (only [`AddErrorKind::NoSpace`], once buffers are used).
    pub fn is_retryable(&self) -> bool {
        self.kind == AddErrorKind::NoSpace
    }
}

impl<T> fmt::Debug for AddError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddError").field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl<T> fmt::Display for AddError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.kind.fmt(f)
    }
}

impl<T> ::core::error::Error for AddError<T> {}

impl ::core::error::Error for AddErrorKind {}

impl fmt::Display for AddErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddErrorKind::NoSpace => "no free descriptors in the virtqueue",
            AddErrorKind::NoMemory => "mapping a buffer for the device failed",
            AddErrorKind::Broken => "the virtqueue is broken",
            AddErrorKind::NoSegments => "a buffer needs at least one segment",
            AddErrorKind::TooManySegments => "the buffer has more segments than the virtqueue can hold",
            AddErrorKind::NoContext => "add_inbuf_ctx needs a queue created with context",
        })
    }
}

/// Why a queue latched broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The device returned a buffer id that is not a ring index.
    UsedIdOutOfRange {
        /// The id the device wrote.
        id: u32,
    },
    /// The device returned an id that is not the head of a buffer in flight.
    UsedIdNotInFlight {
        /// The id the device wrote.
        id: u32,
    },
    /// The device claims to have written more bytes than the buffer's writable part holds.
    UsedLenTooLong {
        /// The buffer's id.
        id: u32,
        /// The length the device wrote.
        len: u32,
        /// The buffer's writable length.
        writable: u32,
    },
    /// The device's used index ran ahead of the buffers in flight.
    UsedIndexRanAhead {
        /// The index the device published.
        used_idx: u16,
        /// The driver's next expected used entry.
        last_used_idx: u16,
    },
    /// The device marked a descriptor used that the packed ring cannot have handed out.
    UsedDescriptorInvalid,
    /// The transport failed to deliver a notification.
    NotifyFailed,
    /// Someone called `break_queue`.
    BrokenByRequest,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::UsedIdOutOfRange { id } => write!(f, "device used id {id}, out of range"),
            Self::UsedIdNotInFlight { id } => {
                write!(f, "device used id {id}, which is not a buffer in flight")
            }
            Self::UsedLenTooLong { id, len, writable } => {
                write!(f, "device wrote {len} bytes to buffer {id}, which has {writable} writable")
            }
            Self::UsedIndexRanAhead { used_idx, last_used_idx } => {
                write!(f, "device used index {used_idx} is ahead of the buffers in flight (last used {last_used_idx})")
            }
            Self::UsedDescriptorInvalid => f.write_str("device wrote an invalid used descriptor"),
            Self::NotifyFailed => f.write_str("the transport failed to notify the device"),
            Self::BrokenByRequest => f.write_str("the queue was broken on request"),
        }
    }
}

impl ::core::error::Error for Fault {}

/// What a transport writes when it notifies the device of new buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifyData {
    /// The queue's index in its device.
    pub queue_index: u16,
    /// Split: the available index. Packed: the next available offset, with the available
    /// wrap counter in bit 15.
    pub next: u16,
}

impl NotifyData {
    /// The 32-bit value of `VIRTIO_F_NOTIFICATION_DATA` (VIRTIO 1.3, 2.9).
    #[doc(alias = "vring_notification_data")]
    pub const fn to_u32(self) -> u32 {
        (self.next as u32) << 16 | self.queue_index as u32
    }
}

/// The transport's way to notify the device (a doorbell write, an eventfd, a function call).
pub trait Notify: Send + Sync {
    /// Delivers one notification. Returns false if it could not be delivered; the queue
    /// then latches broken, as Linux's `virtqueue_notify` does.
    fn notify(&self, data: NotifyData) -> bool;
}

/// No notifications: for devices that poll.
impl Notify for () {
    fn notify(&self, _data: NotifyData) -> bool {
        true
    }
}

impl<N: Notify + ?Sized> Notify for &N {
    fn notify(&self, data: NotifyData) -> bool {
        (**self).notify(data)
    }
}

impl<N: Notify + ?Sized> Notify for Arc<N> {
    fn notify(&self, data: NotifyData) -> bool {
        (**self).notify(data)
    }
}

/// A closure as a notifier: `NotifyFn(|data| doorbell.write(data.to_u32()))`.
pub struct NotifyFn<F>(pub F);

impl<F: Fn(NotifyData) -> bool + Send + Sync> Notify for NotifyFn<F> {
    fn notify(&self, data: NotifyData) -> bool {
        (self.0)(data)
    }
}

/// A notification decided by `kick_prepare`, to be delivered with [`QueueHandle::notify`]
/// or [`crate::SplitDriver::notify`], after the exclusive borrow (the lock) is released.
#[must_use = "a prepared kick that is never delivered loses a notification"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kick {
    /// What to write.
    pub data: NotifyData,
}

pub(crate) struct Shared<N> {
    broken: AtomicBool,
    pub(crate) notifier: N,
}

impl<N: Notify> Shared<N> {
    pub(crate) fn new(notifier: N) -> Arc<Self> {
        Arc::new(Self { broken: AtomicBool::new(false), notifier })
    }

    #[inline]
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    pub(crate) fn set_broken(&self) {
        self.broken.store(true, Ordering::Relaxed);
    }

    pub(crate) fn clear_broken(&self) {
        self.broken.store(false, Ordering::Relaxed);
    }

    /// Linux's `virtqueue_notify`.
    #[inline]
    pub(crate) fn notify(&self, data: NotifyData) -> bool {
        if self.is_broken() {
            return false;
        }
        if !self.notifier.notify(data) {
            self.set_broken();
            return false;
        }
        true
    }
}

/// The part of a driver queue that needs no exclusive borrow: notify, and the broken flag.
///
/// Linux: `virtqueue_notify` "does not need to be serialized". Clone it out of the queue
/// with `handle()` and use it from any thread, for example after dropping the lock that
/// protects the queue.
pub struct QueueHandle<N> {
    pub(crate) shared: Arc<Shared<N>>,
}

impl<N> Clone for QueueHandle<N> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

impl<N: Notify> QueueHandle<N> {
    /// Delivers a kick prepared by `kick_prepare`. Returns false if the queue is broken or
    /// the transport failed (which breaks the queue).
    #[doc(alias = "virtqueue_notify")]
    pub fn notify(&self, kick: Kick) -> bool {
        self.shared.notify(kick.data)
    }

    /// Whether the queue is broken.
    #[doc(alias = "virtqueue_is_broken")]
    pub fn is_broken(&self) -> bool {
        self.shared.is_broken()
    }

    /// Marks the queue broken: later adds fail, `get_buf` returns nothing, and tokens stay
    /// recoverable with `detach_unused_buf`.
    #[doc(alias = "__virtqueue_break")]
    #[doc(alias = "virtio_break_device")]
    pub fn break_queue(&self) {
        self.shared.set_broken();
    }

    /// The transport notifier.
    pub fn notifier(&self) -> &N {
        &self.shared.notifier
    }
}

/// A used buffer returned by `get_buf`.
#[derive(Debug, PartialEq, Eq)]
pub struct UsedBuf<T> {
    /// The token given to `add_*`.
    pub token: T,
    /// How many bytes the device wrote into the buffer's writable part.
    pub len: u32,
}

/// Queue state captured by `enable_cb_prepare`, to be checked by `poll` (opaque, like
/// Linux's `unsigned`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedSnapshot(pub(crate) u16);

/// What an interrupt handler should do, from [`crate::SplitDriver::interrupt`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptAction {
    /// Nothing used: not this queue's interrupt (`IRQ_NONE`).
    NoWork,
    /// The queue is broken: acknowledge and do nothing else (`IRQ_HANDLED`, no callback).
    Broken,
    /// Run the queue's callback (`IRQ_HANDLED`).
    Callback,
}

/// How to create a driver queue; see [`QueueConfig::new`] for the defaults.
#[derive(Clone, Copy, Debug)]
pub struct QueueConfig {
    /// Index of the queue in its device (used in notifications).
    pub index: u16,
    /// Number of ring entries; a power of two for split rings.
    pub size: u16,
    /// The features negotiated with the device. The ring uses `INDIRECT_DESC`,
    /// `EVENT_IDX`, `ORDER_PLATFORM`, `IN_ORDER`, `RING_PACKED` and `NOTIFICATION_DATA`.
    pub features: Features,
    /// Whether the transport allows SMP barriers (Linux's `weak_barriers`). Forced to
    /// false by `ORDER_PLATFORM`.
    pub weak_barriers: bool,
    /// Whether buffers carry a context value (`add_inbuf_ctx`); disables indirect
    /// descriptors, as in Linux.
    pub context: bool,
    /// Whether the driver wants interrupts at all (Linux: the queue has a callback). A queue
    /// without starts with interrupts suppressed.
    pub callbacks: bool,
    /// Alignment of the used ring in the contiguous split allocation.
    pub vring_align: usize,
    /// If the ring cannot be allocated at `size`, try halving it (Linux's `may_reduce_num`).
    pub may_reduce_num: bool,
    /// Longest indirect table; buffers with more segments use a direct chain. The queue
    /// preallocates `size * indirect_max` table entries, so `add` never allocates.
    pub indirect_max: u16,
}

impl QueueConfig {
    /// Defaults: weak barriers, callbacks wanted, no context, 64-byte used-ring alignment,
    /// exact size, indirect tables of up to 32 entries.
    pub const fn new(index: u16, size: u16, features: Features) -> Self {
        Self {
            index,
            size,
            features,
            weak_barriers: true,
            context: false,
            callbacks: true,
            vring_align: 64,
            may_reduce_num: false,
            indirect_max: 32,
        }
    }
}

/// Why a driver queue could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CreateError {
    /// The size is zero, not a power of two (split), or too large.
    InvalidSize,
    /// The alignment is not a power of two of at least 4.
    InvalidAlign,
    /// The ring memory could not be allocated.
    NoMemory,
    /// The memory given to `new_in` is smaller than the ring needs, or not 16-aligned.
    RegionTooSmall,
    /// The negotiated features select a layout this queue type does not implement.
    WrongLayout,
}

impl fmt::Display for CreateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InvalidSize => "invalid queue size",
            Self::InvalidAlign => "invalid ring alignment",
            Self::NoMemory => "cannot allocate ring memory",
            Self::RegionTooSmall => "the memory given for the ring is too small or not 16-aligned",
            Self::WrongLayout => "the negotiated features select another ring layout",
        })
    }
}

impl ::core::error::Error for CreateError {}
