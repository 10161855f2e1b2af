//! The device queue: the device's end of a virtqueue, written once over a ring layout.
//!
//! [`Device`] holds what every layout shares (the guest memory, the barriers, the latched
//! fault) and a layout `L`. Each layout ([`crate::SplitDeviceLayout`],
//! [`crate::PackedDeviceLayout`], with or without in-order) is a separate type, so a device
//! whose layout is known at compile time runs code specialised for it;
//! [`crate::AnyDeviceLayout`] chooses at run time from the negotiated features, one
//! `match` per operation. The loops that pop and serve chains are written here once, over
//! the few steps in which the layouts differ ([`DeviceRing`]).

use super::{one_segment, single_segment, Chain, DeviceConfig, DeviceError, Segment, SegmentSink, Segments};
use crate::memory::GuestMemory;
use crate::packed::device::PackedDeviceLayout;
use crate::split::device::SplitDeviceLayout;
use crate::split::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::{Barriers, Features, LayoutKind};

mod sealed {
    pub trait Sealed {}
}
pub(crate) use sealed::Sealed;

/// Whether a device layout batches completions in order (`VIRTIO_F_IN_ORDER`): fixed by
/// the type ([`Fixed`]), or taken from the features when the queue attaches
/// ([`Negotiated`], for [`crate::DeviceQueue`]). Implemented by those two only.
pub trait OrderMode: Copy + Send + Sync + 'static + Sealed {
    /// The mode for a ring whose features do (`true`) or do not negotiate `IN_ORDER`;
    /// `None` if this mode cannot run it.
    #[doc(hidden)]
    fn for_features(in_order: bool) -> Option<Self>;
    /// Whether completions batch in order.
    #[doc(hidden)]
    fn in_order(self) -> bool;
}

/// `IN_ORDER` fixed at compile time: [`crate::SplitInOrderDevice`] is a split layout with
/// `Fixed<true>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fixed<const IN_ORDER: bool>;

/// `IN_ORDER` as the features say, checked once per call (the run-time
/// [`crate::DeviceQueue`]'s layouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    in_order: bool,
}

impl<const IN_ORDER: bool> Sealed for Fixed<IN_ORDER> {}
impl Sealed for Negotiated {}

impl<const IN_ORDER: bool> OrderMode for Fixed<IN_ORDER> {
    #[inline(always)]
    fn for_features(in_order: bool) -> Option<Self> {
        (in_order == IN_ORDER).then_some(Self)
    }

    #[inline(always)]
    fn in_order(self) -> bool {
        IN_ORDER
    }
}

impl OrderMode for Negotiated {
    #[inline(always)]
    fn for_features(in_order: bool) -> Option<Self> {
        Some(Self { in_order })
    }

    #[inline(always)]
    fn in_order(self) -> bool {
        self.in_order
    }
}

/// The ring-format half of a device queue. Implemented by this crate's layouts only:
/// [`crate::SplitDeviceLayout`], [`crate::PackedDeviceLayout`] (each with or without
/// `IN_ORDER`) and [`crate::AnyDeviceLayout`].
#[allow(private_interfaces)]
pub trait DeviceLayout: Sized + Send + Sealed {
    /// Which layout this is.
    fn kind(&self) -> LayoutKind;
    #[doc(hidden)]
    fn attach<M: GuestMemory + ?Sized>(mem: &M, config: &DeviceConfig) -> Result<Self, DeviceError>;
    #[doc(hidden)]
    fn size(&self) -> u16;
    #[doc(hidden)]
    fn pop<'m, M: GuestMemory + ?Sized, S: SegmentSink<'m>>(
        &mut self,
        mem: &'m M,
        barriers: Barriers,
        segs: &mut S,
    ) -> Result<Option<Chain>, DeviceError>;
    /// How many chains were served, and the error that ended the call early, if one did.
    #[doc(hidden)]
    fn serve<'m, M: GuestMemory + ?Sized, const N: usize, F>(
        &mut self,
        mem: &'m M,
        barriers: Barriers,
        max: usize,
        segs: &mut Segments<'m, N>,
        f: F,
    ) -> (usize, Option<DeviceError>)
    where
        F: FnMut(&Chain, &[Segment<'m>]) -> u32;
    #[doc(hidden)]
    fn complete(&mut self, barriers: Barriers, chain: Chain, written: u32);
    #[doc(hidden)]
    fn publish_used(&mut self, barriers: Barriers);
    #[doc(hidden)]
    fn needs_notification(&mut self, barriers: Barriers) -> bool;
    /// Whether a chain is available already.
    #[doc(hidden)]
    fn enable_notifications(&mut self, barriers: Barriers) -> bool;
    #[doc(hidden)]
    fn disable_notifications(&mut self);
    #[doc(hidden)]
    fn avail_base(&self) -> u16;
    #[doc(hidden)]
    fn used_base(&self) -> u16;
}

/// The order mode of a layout of the format `packed` attaching to `config`; an error if the
/// features select the other format, or an order that `O` cannot run.
#[inline(always)]
pub(crate) fn order_for<O: OrderMode>(config: &DeviceConfig, packed: bool) -> Result<O, DeviceError> {
    let kind = LayoutKind::from_features(config.features);
    match O::for_features(kind.is_in_order()) {
        Some(order) if kind.is_packed() == packed => Ok(order),
        _ => Err(DeviceError::WrongLayout),
    }
}

/// The first descriptor of an available chain, read once, with the buffer id it carries
/// (split: the head's index; packed: the descriptor's `id`) and its flags.
#[derive(Clone, Copy)]
pub(crate) struct Head<D> {
    pub id: u16,
    pub flags: u16,
    pub desc: D,
}

/// What a fixed layout implements: the steps of the device loop in which split and packed
/// rings differ. Everything else, including the loops themselves, is [`Device`]'s. `Copy`
/// so that `serve` can work on a local copy the compiler keeps in registers (the ring's
/// fences would make it reload fields behind a reference for every chain).
pub(crate) trait DeviceRing: Copy + Send {
    /// Whether this is the packed ring format.
    const PACKED: bool;
    /// The ring format's descriptor view.
    type Desc: Copy;
    /// Attaches to the ring; [`DeviceError::WrongLayout`] if the features select another
    /// ring format or an ordering that this type cannot run.
    fn attach<M: GuestMemory + ?Sized>(mem: &M, config: &DeviceConfig) -> Result<Self, DeviceError>;
    /// Whether completions batch in order.
    fn in_order(&self) -> bool;
    fn size(&self) -> u16;
    /// Whether a chain is available, checked as far as its head: `Some` with what finds
    /// its head descriptor (split: its index; packed: the flags that published it), `None`
    /// when the ring is empty. Reads no descriptor: [`Self::head`] does, in a step of its
    /// own, so that the compiler keeps the descriptor in registers rather than merge it
    /// with the empty and error outcomes here.
    fn next_head(&mut self, barriers: Barriers) -> Result<Option<u16>, DeviceError>;
    /// Reads the head descriptor that `next_head` found.
    fn head(&self, found: u16) -> Head<Self::Desc>;
    /// The address and length of a head without `NEXT` or `INDIRECT`: the whole chain.
    fn single(desc: &Self::Desc) -> (u64, u32);
    /// Walks a chain of several descriptors, or an indirect one, from its head.
    fn walk<'m, M: GuestMemory + ?Sized, S: SegmentSink<'m>>(
        &self,
        mem: &'m M,
        head: Head<Self::Desc>,
        segs: &mut S,
    ) -> Result<Chain, DeviceError>;
    /// Takes the positions (available and used) of `copy`, a copy of `self` that `serve`
    /// worked on; the rest of it did not change.
    fn take_positions(&mut self, copy: &Self);
    /// Moves past the chain `next_head` found, once it is popped.
    fn consume(&mut self, chain: &Chain);
    /// [`Self::consume`] for a chain of one descriptor.
    fn consume_single(&mut self);
    /// Completes a chain, batching in order if `in_order` (which callers pass as
    /// [`Self::in_order`], or as a constant where they have tested it already).
    fn complete(&mut self, barriers: Barriers, chain: Chain, written: u32, in_order: bool);
    fn publish_used(&mut self, barriers: Barriers);
    /// Whether completions were published since the last interrupt decision.
    fn unsignalled(&self) -> bool;
    /// The interrupt decision from the driver's event or flags, after completions were
    /// published; starts the next decision's count.
    fn wants_interrupt(&mut self) -> bool;
    fn enable_notifications(&mut self, barriers: Barriers) -> bool;
    fn disable_notifications(&mut self);
    fn avail_base(&self) -> u16;
    fn used_base(&self) -> u16;
}

impl<R: DeviceRing> Sealed for R {}

#[allow(private_interfaces)]
impl<R: DeviceRing> DeviceLayout for R {
    #[inline(always)]
    fn kind(&self) -> LayoutKind {
        LayoutKind::new(R::PACKED, self.in_order())
    }

    #[inline(always)]
    fn attach<M: GuestMemory + ?Sized>(mem: &M, config: &DeviceConfig) -> Result<Self, DeviceError> {
        <R as DeviceRing>::attach(mem, config)
    }

    #[inline(always)]
    fn size(&self) -> u16 {
        DeviceRing::size(self)
    }

    #[inline(always)]
    fn pop<'m, M: GuestMemory + ?Sized, S: SegmentSink<'m>>(
        &mut self,
        mem: &'m M,
        barriers: Barriers,
        segs: &mut S,
    ) -> Result<Option<Chain>, DeviceError> {
        let Some(found) = self.next_head(barriers)? else { return Ok(None) };
        let head = self.head(found);
        segs.clear();
        if head.flags & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 {
            let (addr, len) = R::single(&head.desc);
            let chain = single_segment(mem, head.id, addr, len, head.flags & DESC_F_WRITE != 0, segs)?;
            self.consume_single();
            Ok(Some(chain))
        } else {
            let chain = self.walk(mem, head, segs)?;
            self.consume(&chain);
            Ok(Some(chain))
        }
    }

    #[inline(always)]
    fn serve<'m, M: GuestMemory + ?Sized, const N: usize, F>(
        &mut self,
        mem: &'m M,
        barriers: Barriers,
        max: usize,
        segs: &mut Segments<'m, N>,
        f: F,
    ) -> (usize, Option<DeviceError>)
    where
        F: FnMut(&Chain, &[Segment<'m>]) -> u32,
    {
        // One loop for each, so that the in-order test leaves the loop (a type that fixes
        // the order compiles only its own).
        if self.in_order() {
            serve_loop(self, mem, barriers, max, segs, f, true)
        } else {
            serve_loop(self, mem, barriers, max, segs, f, false)
        }
    }

    #[inline(always)]
    fn complete(&mut self, barriers: Barriers, chain: Chain, written: u32) {
        let in_order = self.in_order();
        DeviceRing::complete(self, barriers, chain, written, in_order)
    }

    #[inline(always)]
    fn publish_used(&mut self, barriers: Barriers) {
        DeviceRing::publish_used(self, barriers)
    }

    #[inline(always)]
    fn needs_notification(&mut self, barriers: Barriers) -> bool {
        DeviceRing::publish_used(self, barriers);
        if !self.unsignalled() {
            return false;
        }
        // The completions' publication before reading the driver's event or flags; pairs
        // with the driver's mb between moving its event and looking at the ring again
        // (`DriverQueue::poll`, `get_buf`, `enable_cb_delayed` of each driver layout).
        barriers.mb();
        self.wants_interrupt()
    }

    #[inline(always)]
    fn enable_notifications(&mut self, barriers: Barriers) -> bool {
        DeviceRing::enable_notifications(self, barriers)
    }

    #[inline(always)]
    fn disable_notifications(&mut self) {
        DeviceRing::disable_notifications(self)
    }

    #[inline(always)]
    fn avail_base(&self) -> u16 {
        DeviceRing::avail_base(self)
    }

    #[inline(always)]
    fn used_base(&self) -> u16 {
        DeviceRing::used_base(self)
    }
}

/// The device loop of [`Device::serve`], for a layout whose order is `in_order`.
#[inline(always)]
fn serve_loop<'m, R: DeviceRing, M: GuestMemory + ?Sized, const N: usize, F>(
    layout: &mut R,
    mem: &'m M,
    barriers: Barriers,
    max: usize,
    segs: &mut Segments<'m, N>,
    mut f: F,
    in_order: bool,
) -> (usize, Option<DeviceError>)
where
    F: FnMut(&Chain, &[Segment<'m>]) -> u32,
{
    // A copy in locals: see `DeviceRing`.
    let mut ring = *layout;
    let mut served = 0;
    let mut error = None;
    while served < max {
        let head = match ring.next_head(barriers) {
            Ok(Some(found)) => ring.head(found),
            Ok(None) => break,
            Err(e) => {
                error = Some(e);
                break;
            }
        };
        // A single descriptor's segment stays in a local, out of the sink. Each kind of
        // chain is completed in its own branch: after the two meet, the compiler would
        // no longer know a single chain's length or descriptor count.
        if head.flags & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 {
            let (addr, len) = R::single(&head.desc);
            match one_segment(mem, head.id, addr, len, head.flags & DESC_F_WRITE != 0) {
                Ok((chain, seg)) => {
                    let written = f(&chain, core::slice::from_ref(&seg));
                    ring.consume_single();
                    ring.complete(barriers, chain, written, in_order);
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        } else {
            segs.clear();
            match ring.walk(mem, head, segs) {
                Ok(chain) => {
                    let written = f(&chain, segs.as_slice());
                    ring.consume(&chain);
                    ring.complete(barriers, chain, written, in_order);
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        served += 1;
    }
    ring.publish_used(barriers);
    layout.take_positions(&ring);
    (served, error)
}

/// The device's end of a split virtqueue.
pub type SplitDevice<'m, M> = Device<'m, M, SplitDeviceLayout<Fixed<false>>>;

/// The device's end of a split virtqueue with `VIRTIO_F_IN_ORDER`.
pub type SplitInOrderDevice<'m, M> = Device<'m, M, SplitDeviceLayout<Fixed<true>>>;

/// The device's end of a packed virtqueue.
pub type PackedDevice<'m, M> = Device<'m, M, PackedDeviceLayout<Fixed<false>>>;

/// The device's end of a packed virtqueue with `VIRTIO_F_IN_ORDER`.
pub type PackedInOrderDevice<'m, M> = Device<'m, M, PackedDeviceLayout<Fixed<true>>>;

/// The device's end of a virtqueue (the role of Linux's vringh), borrowing guest memory
/// for `'m`, in layout `L`.
///
/// Name it by its layout: [`crate::SplitDevice`], [`crate::SplitInOrderDevice`],
/// [`crate::PackedDevice`] and [`crate::PackedInOrderDevice`] are fixed at compile time;
/// [`crate::DeviceQueue`] takes whichever the negotiated features select. All have the
/// methods below.
///
/// Everything the driver wrote is untrusted: each shared field is loaded once, into a
/// local, and validated before use. A malformed ring gives a [`DeviceError`] and latches
/// the queue broken; no driver input can make the device read or write outside guest
/// memory, loop, or panic.
pub struct Device<'m, M: GuestMemory + ?Sized, L: DeviceLayout> {
    mem: &'m M,
    layout: L,
    barriers: Barriers,
    fault: Option<DeviceError>,
}

impl<'m, M: GuestMemory + ?Sized, L: DeviceLayout> Device<'m, M, L> {
    /// Attaches to a ring the driver set up. The ring's areas are translated and checked
    /// once here; the queue keeps the host pointers for `'m`.
    ///
    /// A split ring's `used.idx` is read from memory, so a device that reconnects to a
    /// running ring continues where the previous one stopped; a packed ring resumes from
    /// the config's `avail_base` and `used_base`. Fails with [`DeviceError::WrongLayout`]
    /// if the features select another layout than `L` can run.
    pub fn new(mem: &'m M, config: DeviceConfig) -> Result<Self, DeviceError> {
        let barriers =
            if config.features.contains(Features::ORDER_PLATFORM) { Barriers::Strong } else { Barriers::Weak };
        Ok(Self { mem, layout: L::attach(mem, &config)?, barriers, fault: None })
    }

    fn fail(&mut self, e: DeviceError) -> DeviceError {
        if e != DeviceError::SinkFull {
            self.fault.get_or_insert(e);
        }
        e
    }

    /// Pops the next available chain, collecting its segments (readable first) into
    /// `segs`. `Ok(None)` when no chain is available.
    #[doc(alias = "vringh_getdesc_kern")]
    #[inline(always)]
    pub fn pop<S: SegmentSink<'m>>(&mut self, segs: &mut S) -> Result<Option<Chain>, DeviceError> {
        if self.fault.is_some() {
            return Err(DeviceError::Broken);
        }
        match self.layout.pop(self.mem, self.barriers, segs) {
            Ok(chain) => Ok(chain),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Serves up to `max` available chains: hands each, with its segments (readable
    /// first), to `f`, and completes it with the number of bytes `f` says it wrote
    /// (clamped as [`Self::complete`] does). `segs` holds the segments of chains of more
    /// than one descriptor; a chain with more than `N` stays available and ends the call.
    /// With `IN_ORDER`, chains popped before and still held must be completed first.
    ///
    /// Returns how many chains were served. `Err` only when none was: `Broken`, a driver
    /// fault (which latches the queue broken), or `SinkFull`. A fault after the first
    /// chain ends the call early with the chains before it served; the next call returns
    /// `Err(Broken)`, and [`Self::fault`] says what it was.
    ///
    /// The device counterpart of the driver's burst calls, for devices that finish a
    /// request while they hold it (a network device's transmit queue, a null block
    /// device): one broken-flag check and one publish per call, and the ring state kept
    /// in registers across the chains.
    ///
    /// An echo device, answering every request at once:
    ///
    /// ```
    /// use virtq::{DeviceConfig, DeviceQueue, Features, QueueConfig, Segments, Virtqueue};
    /// use virtq::testing::TestMemory;
    ///
    /// let mem = TestMemory::new(1 << 16);
    /// let features = Features::VERSION_1 | Features::RING_PACKED;
    /// let mut driver = Virtqueue::<u32, _, _>::new(QueueConfig::new(0, 8, features), &mem, ()).unwrap();
    /// let config = DeviceConfig::new(8, features, driver.desc_addr(), driver.avail_addr(), driver.used_addr());
    /// let mut device = DeviceQueue::new(&mem, config).unwrap();
    /// for token in 0..3 {
    ///     let (request, reply) = (mem.alloc_sg(4), mem.alloc_sg(4));
    ///     mem.write(request.addr, b"ping");
    ///     driver.add_sgs(&[&[request]], &[&[reply]], token).unwrap();
    /// }
    ///
    /// let mut segs = Segments::<2>::new();
    /// let served = device.serve(usize::MAX, &mut segs, |_chain, segs| {
    ///     let mut data = [0u8; 4];
    ///     segs[0].read_at(0, &mut data);
    ///     segs[1].write_at(0, &data) as u32
    /// });
    /// assert_eq!(served, Ok(3));
    /// assert_eq!(driver.get_bufs(8, |used| assert_eq!(used.len, 4)), 3);
    /// ```
    #[inline(always)]
    pub fn serve<const N: usize, F>(
        &mut self,
        max: usize,
        segs: &mut Segments<'m, N>,
        f: F,
    ) -> Result<usize, DeviceError>
    where
        F: FnMut(&Chain, &[Segment<'m>]) -> u32,
    {
        if self.fault.is_some() {
            return Err(DeviceError::Broken);
        }
        match self.layout.serve(self.mem, self.barriers, max, segs, f) {
            (0, Some(e)) => Err(self.fail(e)),
            (served, Some(e)) => {
                self.fail(e);
                Ok(served)
            }
            (served, None) => Ok(served),
        }
    }

    /// Returns a chain to the driver with the number of bytes written into its writable
    /// part (clamped to that part's length).
    ///
    /// The driver sees completions once [`Self::publish_used`] (or
    /// [`Self::needs_notification`], or [`Self::enable_notifications`]) runs, and in any
    /// case each time a cache line of used entries fills (split: 8 used elements; packed:
    /// 4 used descriptors; packed in-order: a used descriptor covering 16 buffers), so
    /// that a long drain hands buffers back along the way.
    ///
    /// With `IN_ORDER`, chains must be completed in the order they were popped, and
    /// consecutive completions that filled their whole writable part share one used entry
    /// naming the last of them (VIRTIO 1.3, 2.7.9 and 2.8.21); a short completion ends
    /// the batch, so the length each buffer reports is exact.
    #[doc(alias = "vringh_complete_kern")]
    #[inline(always)]
    pub fn complete(&mut self, chain: Chain, written: u32) {
        self.layout.complete(self.barriers, chain, written)
    }

    /// Makes every completion so far visible to the driver.
    #[inline(always)]
    pub fn publish_used(&mut self) {
        self.layout.publish_used(self.barriers)
    }

    /// Publishes completions and says whether the driver wants an interrupt for them
    /// (the used event with `EVENT_IDX`, else the driver's flags).
    #[doc(alias = "vringh_need_notify_kern")]
    pub fn needs_notification(&mut self) -> bool {
        self.layout.needs_notification(self.barriers)
    }

    /// Asks the driver to kick on new buffers. Returns true if a chain is already
    /// available (or the queue is broken), in which case the device must not sleep: its
    /// kick may never come.
    #[doc(alias = "vringh_notify_enable_kern")]
    pub fn enable_notifications(&mut self) -> bool {
        // Evaluated first: the stores and the fence that it makes come before any sleep.
        let waiting = self.layout.enable_notifications(self.barriers);
        waiting || self.fault.is_some()
    }

    /// Asks the driver not to kick (a hint; with `EVENT_IDX` on a split ring a stale
    /// `avail_event` already keeps kicks away).
    #[doc(alias = "vringh_notify_disable_kern")]
    pub fn disable_notifications(&mut self) {
        self.layout.disable_notifications()
    }

    /// Which layout this queue runs.
    pub fn layout(&self) -> LayoutKind {
        self.layout.kind()
    }

    /// Number of ring entries.
    pub fn size(&self) -> u16 {
        self.layout.size()
    }

    /// Where popping resumes (vhost-user `GET_VRING_BASE`). Split: the next available
    /// index. Packed: the next available position, with the wrap counter in bit 15.
    pub fn avail_base(&self) -> u16 {
        self.layout.avail_base()
    }

    /// Where the next completion goes. Split: the next used index (which the ring
    /// itself holds once published). Packed: the next used position, with the wrap
    /// counter in bit 15.
    pub fn used_base(&self) -> u16 {
        self.layout.used_base()
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
