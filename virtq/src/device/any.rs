//! Run-time layout choice on the device side: the negotiated features pick one of the four
//! layouts when the queue attaches, and every operation is one `match` away from the
//! specialised code (the loops of `pop` and `serve` included).

use super::queue::{Device, DeviceLayout, Negotiated, Sealed};
use super::{Chain, DeviceConfig, DeviceError, Segment, SegmentSink, Segments};
use crate::memory::GuestMemory;
use crate::packed::device::PackedDeviceLayout;
use crate::split::device::SplitDeviceLayout;
use crate::{Barriers, LayoutKind};

/// Any of the four device layouts, chosen from the features at attach time: split or
/// packed, each with `IN_ORDER` as negotiated.
pub enum AnyDeviceLayout {
    /// Split ring.
    Split(SplitDeviceLayout<Negotiated>),
    /// Packed ring.
    Packed(PackedDeviceLayout<Negotiated>),
}

/// A device queue whose layout the negotiated features choose (`RING_PACKED`,
/// `IN_ORDER`): the type to use when a transport negotiates.
pub type DeviceQueue<'m, M> = Device<'m, M, AnyDeviceLayout>;

impl Sealed for AnyDeviceLayout {}

macro_rules! dispatch {
    ($self:expr, $l:ident => $e:expr) => {
        match $self {
            AnyDeviceLayout::Split($l) => $e,
            AnyDeviceLayout::Packed($l) => $e,
        }
    };
}

#[allow(private_interfaces)]
impl DeviceLayout for AnyDeviceLayout {
    fn kind(&self) -> LayoutKind {
        dispatch!(self, l => l.kind())
    }

    fn attach<M: GuestMemory + ?Sized>(mem: &M, config: &DeviceConfig) -> Result<Self, DeviceError> {
        Ok(if LayoutKind::from_features(config.features).is_packed() {
            Self::Packed(DeviceLayout::attach(mem, config)?)
        } else {
            Self::Split(DeviceLayout::attach(mem, config)?)
        })
    }

    #[inline]
    fn size(&self) -> u16 {
        dispatch!(self, l => DeviceLayout::size(l))
    }

    // Always inlined: each arm is the specialised loop, and a call would pass the chain
    // back through memory.
    #[inline(always)]
    fn pop<'m, M: GuestMemory + ?Sized, S: SegmentSink<'m>>(
        &mut self,
        mem: &'m M,
        barriers: Barriers,
        segs: &mut S,
    ) -> Result<Option<Chain>, DeviceError> {
        dispatch!(self, l => DeviceLayout::pop(l, mem, barriers, segs))
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
        dispatch!(self, l => DeviceLayout::serve(l, mem, barriers, max, segs, f))
    }

    #[inline(always)]
    fn complete(&mut self, barriers: Barriers, chain: Chain, written: u32) {
        dispatch!(self, l => DeviceLayout::complete(l, barriers, chain, written))
    }

    #[inline(always)]
    fn publish_used(&mut self, barriers: Barriers) {
        dispatch!(self, l => DeviceLayout::publish_used(l, barriers))
    }

    fn needs_notification(&mut self, barriers: Barriers) -> bool {
        dispatch!(self, l => DeviceLayout::needs_notification(l, barriers))
    }

    fn enable_notifications(&mut self, barriers: Barriers) -> bool {
        dispatch!(self, l => DeviceLayout::enable_notifications(l, barriers))
    }

    fn disable_notifications(&mut self) {
        dispatch!(self, l => DeviceLayout::disable_notifications(l))
    }

    fn avail_base(&self) -> u16 {
        dispatch!(self, l => DeviceLayout::avail_base(l))
    }

    fn used_base(&self) -> u16 {
        dispatch!(self, l => DeviceLayout::used_base(l))
    }
}
