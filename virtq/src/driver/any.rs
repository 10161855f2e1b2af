//! Run-time layout choice: the negotiated features pick one of the four layouts when the
//! queue is created, and every operation is one `match` away from the specialised code.

use super::core::{Buffer, DriverCore};
use super::queue::{LayoutKind, RingLayout, Sealed};
use super::{AddError, CreateError, DriverQueue, Notify, QueueConfig, Sg};
use crate::memory::{Dma, DmaRegion};
use crate::packed::driver::PackedLayout;
use crate::split::driver::SplitLayout;
use crate::Features;

/// Any of the four layouts, chosen from the features at creation.
pub enum AnyLayout {
    /// Split ring.
    Split(SplitLayout<false>),
    /// Split ring, in order.
    SplitInOrder(SplitLayout<true>),
    /// Packed ring.
    Packed(PackedLayout<false>),
    /// Packed ring, in order.
    PackedInOrder(PackedLayout<true>),
}

/// A driver queue whose layout the negotiated features choose at run time: the type to
/// use when the transport negotiates (`RING_PACKED`, `IN_ORDER`).
pub type Virtqueue<T, D, N> = DriverQueue<T, D, N, AnyLayout>;

impl Sealed for AnyLayout {}

macro_rules! dispatch {
    ($self:expr, $l:ident => $e:expr) => {
        match $self {
            AnyLayout::Split($l) => $e,
            AnyLayout::SplitInOrder($l) => $e,
            AnyLayout::Packed($l) => $e,
            AnyLayout::PackedInOrder($l) => $e,
        }
    };
}

#[allow(private_interfaces)]
impl RingLayout for AnyLayout {
    fn kind(&self) -> LayoutKind {
        dispatch!(self, l => l.kind())
    }

    fn create<D: Dma>(config: &QueueConfig, dma: &D) -> Result<Self, CreateError> {
        let f = config.features;
        Ok(match (f.contains(Features::RING_PACKED), f.contains(Features::IN_ORDER)) {
            (false, false) => Self::Split(SplitLayout::create(config, dma)?),
            (false, true) => Self::SplitInOrder(SplitLayout::create(config, dma)?),
            (true, false) => Self::Packed(PackedLayout::create(config, dma)?),
            (true, true) => Self::PackedInOrder(PackedLayout::create(config, dma)?),
        })
    }

    unsafe fn create_in(config: &QueueConfig, memory: DmaRegion) -> Result<Self, CreateError> {
        let f = config.features;
        let (packed, in_order) = (f.contains(Features::RING_PACKED), f.contains(Features::IN_ORDER));
        // SAFETY: the caller's promise about `memory`, passed on unchanged to one layout.
        unsafe {
            Ok(match (packed, in_order) {
                (false, false) => Self::Split(SplitLayout::create_in(config, memory)?),
                (false, true) => Self::SplitInOrder(SplitLayout::create_in(config, memory)?),
                (true, false) => Self::Packed(PackedLayout::create_in(config, memory)?),
                (true, true) => Self::PackedInOrder(PackedLayout::create_in(config, memory)?),
            })
        }
    }

    fn size(&self) -> u16 {
        dispatch!(self, l => l.size())
    }

    fn free<D: Dma>(&mut self, dma: &D) {
        dispatch!(self, l => l.free(dma))
    }

    fn addresses(&self) -> [u64; 3] {
        dispatch!(self, l => l.addresses())
    }

    #[inline(always)]
    fn add<T, D: Dma, N: Notify>(
        &mut self,
        core: &mut DriverCore<T, D, N>,
        buf: &Buffer<'_>,
        token: T,
        ctx: Option<usize>,
        premapped: bool,
    ) -> Result<(), AddError<T>> {
        dispatch!(self, l => l.add(core, buf, token, ctx, premapped))
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
        dispatch!(self, l => l.add_each(core, sgs, writable, premapped, token))
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
        dispatch!(self, l => l.add_one(core, sgs, writable, premapped, token))
    }

    #[inline]
    fn kick_prepare<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> bool {
        dispatch!(self, l => l.kick_prepare(core))
    }

    fn next_avail(&self) -> u16 {
        dispatch!(self, l => l.next_avail())
    }

    #[inline(always)]
    fn get_buf<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> Option<(T, u32, Option<usize>)> {
        dispatch!(self, l => l.get_buf(core))
    }

    #[inline(always)]
    fn get_each<T, D: Dma, N: Notify>(
        &mut self,
        core: &mut DriverCore<T, D, N>,
        max: usize,
        f: &mut impl FnMut(T, u32, Option<usize>),
    ) -> usize {
        dispatch!(self, l => l.get_each(core, max, f))
    }

    fn disable_cb<T, D: Dma, N: Notify>(&self, core: &DriverCore<T, D, N>) {
        dispatch!(self, l => l.disable_cb(core))
    }

    fn enable_cb_prepare<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> u16 {
        dispatch!(self, l => l.enable_cb_prepare(core))
    }

    fn poll(&self, snapshot: u16) -> bool {
        dispatch!(self, l => l.poll(snapshot))
    }

    fn enable_cb_delayed<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> bool {
        dispatch!(self, l => l.enable_cb_delayed(core))
    }

    fn has_used(&self) -> bool {
        dispatch!(self, l => l.has_used())
    }

    fn detach_unused<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) -> Option<T> {
        dispatch!(self, l => l.detach_unused(core))
    }

    fn reset<T, D: Dma, N: Notify>(&mut self, core: &mut DriverCore<T, D, N>) {
        dispatch!(self, l => l.reset(core))
    }

    fn start_at(&mut self, index: u16) {
        dispatch!(self, l => l.start_at(index))
    }
}
