//! Run-time layout choice: the negotiated features pick one of the four layouts when the
//! queue is created, and every operation is one `match` away from the specialised code.

use super::core::{Buffer, DriverCore};
use super::queue::{DriverLayout, Sealed};
use super::{AddError, CreateError, DriverQueue, Notify, QueueConfig, Sg};
use crate::memory::{Dma, DmaRegion};
use crate::packed::driver::PackedDriverLayout;
use crate::split::driver::SplitDriverLayout;
use crate::LayoutKind;

/// Any of the four layouts, chosen from the features at creation.
pub enum AnyDriverLayout {
    /// Split ring.
    Split(SplitDriverLayout<false>),
    /// Split ring, in order.
    SplitInOrder(SplitDriverLayout<true>),
    /// Packed ring.
    Packed(PackedDriverLayout<false>),
    /// Packed ring, in order.
    PackedInOrder(PackedDriverLayout<true>),
}

/// A driver queue whose layout the negotiated features choose at run time: the type to
/// use when the transport negotiates (`RING_PACKED`, `IN_ORDER`).
pub type Virtqueue<T, D, N> = DriverQueue<T, D, N, AnyDriverLayout>;

impl Sealed for AnyDriverLayout {}

macro_rules! dispatch {
    ($self:expr, $l:ident => $e:expr) => {
        match $self {
            AnyDriverLayout::Split($l) => $e,
            AnyDriverLayout::SplitInOrder($l) => $e,
            AnyDriverLayout::Packed($l) => $e,
            AnyDriverLayout::PackedInOrder($l) => $e,
        }
    };
}

#[allow(private_interfaces)]
impl DriverLayout for AnyDriverLayout {
    type Device = crate::AnyDeviceLayout;

    fn kind(&self) -> LayoutKind {
        dispatch!(self, l => l.kind())
    }

    fn create<D: Dma>(config: &QueueConfig, dma: &D) -> Result<Self, CreateError> {
        Ok(match LayoutKind::from_features(config.features) {
            LayoutKind::Split => Self::Split(SplitDriverLayout::create(config, dma)?),
            LayoutKind::SplitInOrder => Self::SplitInOrder(SplitDriverLayout::create(config, dma)?),
            LayoutKind::Packed => Self::Packed(PackedDriverLayout::create(config, dma)?),
            LayoutKind::PackedInOrder => Self::PackedInOrder(PackedDriverLayout::create(config, dma)?),
        })
    }

    unsafe fn create_in(config: &QueueConfig, memory: DmaRegion) -> Result<Self, CreateError> {
        // SAFETY: the caller's promise about `memory`, passed on unchanged to one layout.
        unsafe {
            Ok(match LayoutKind::from_features(config.features) {
                LayoutKind::Split => Self::Split(SplitDriverLayout::create_in(config, memory)?),
                LayoutKind::SplitInOrder => Self::SplitInOrder(SplitDriverLayout::create_in(config, memory)?),
                LayoutKind::Packed => Self::Packed(PackedDriverLayout::create_in(config, memory)?),
                LayoutKind::PackedInOrder => Self::PackedInOrder(PackedDriverLayout::create_in(config, memory)?),
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
