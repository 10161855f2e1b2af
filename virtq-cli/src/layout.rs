//! The four ring layouts the benchmark runs, each as a pair of concrete types: the driver's
//! fixed layout (`SplitLayout<_>` or `PackedLayout<_>`, for `DriverQueue<.., L>`) and the
//! matching device queue (`SplitDevice` or `PackedDevice`). Every hot loop is generic over
//! [`BenchLayout`] and monomorphised per layout, so no layout is chosen at run time inside
//! a loop; [`with_layout!`] is the one place that turns a [`Layout`] value into a type.

use std::fmt;

use clap::ValueEnum;
use serde::Serialize;
use virtq::testing::TestMemory;
use virtq::{
    Chain, DeviceConfig, DeviceError, Features, PackedDevice, PackedLayout, RingLayout, Segment, SegmentSink, Segments,
    SplitDevice, SplitLayout,
};

/// What both ends negotiate whatever the layout. No `INDIRECT_DESC`: every buffer is a
/// single segment, which never uses an indirect table anyway.
pub const BASE_FEATURES: Features = Features::VERSION_1.union(Features::EVENT_IDX);

/// Names of [`BASE_FEATURES`], for the report.
pub const BASE_FEATURE_NAMES: [&str; 2] = ["VERSION_1", "EVENT_IDX"];

/// A ring layout, as the negotiated features choose it (`RING_PACKED`, `IN_ORDER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    Split,
    SplitInOrder,
    Packed,
    PackedInOrder,
}

impl Layout {
    /// All four, in the order the benchmark runs and prints them.
    pub const ALL: [Layout; 4] = [Layout::Split, Layout::SplitInOrder, Layout::Packed, Layout::PackedInOrder];

    /// The name used on the command line, in tables and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Split => "split",
            Self::SplitInOrder => "split-in-order",
            Self::Packed => "packed",
            Self::PackedInOrder => "packed-in-order",
        }
    }

    /// The features that select this layout, on top of [`BASE_FEATURES`].
    pub fn layout_features(self) -> Features {
        match self {
            Self::Split => Features::empty(),
            Self::SplitInOrder => Features::IN_ORDER,
            Self::Packed => Features::RING_PACKED,
            Self::PackedInOrder => Features::RING_PACKED.union(Features::IN_ORDER),
        }
    }

    /// Names of [`Self::layout_features`], for the report.
    pub fn layout_feature_names(self) -> &'static [&'static str] {
        match self {
            Self::Split => &[],
            Self::SplitInOrder => &["IN_ORDER"],
            Self::Packed => &["RING_PACKED"],
            Self::PackedInOrder => &["RING_PACKED", "IN_ORDER"],
        }
    }

    /// Everything both ends negotiate for this layout.
    pub fn features(self) -> Features {
        BASE_FEATURES | self.layout_features()
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// The device-queue operations the benchmark uses, implemented by both concrete device
/// types so that the device loop is compiled once per layout (no `DeviceQueue` match).
pub trait RingDevice<'m> {
    fn pop<S: SegmentSink<'m>>(&mut self, segs: &mut S) -> Result<Option<Chain>, DeviceError>;
    fn complete(&mut self, chain: Chain, written: u32);
    fn serve<const N: usize, F: FnMut(&Chain, &[Segment<'m>]) -> u32>(
        &mut self,
        max: usize,
        segs: &mut Segments<'m, N>,
        f: F,
    ) -> Result<usize, DeviceError>;
    fn publish_used(&mut self);
    fn needs_notification(&mut self) -> bool;
    fn enable_notifications(&mut self) -> bool;
    fn disable_notifications(&mut self);
    fn size(&self) -> u16;
}

macro_rules! ring_device {
    ($device:ident) => {
        impl<'m> RingDevice<'m> for $device<'m, TestMemory> {
            #[inline(always)]
            fn pop<S: SegmentSink<'m>>(&mut self, segs: &mut S) -> Result<Option<Chain>, DeviceError> {
                $device::pop(self, segs)
            }
            #[inline(always)]
            fn complete(&mut self, chain: Chain, written: u32) {
                $device::complete(self, chain, written)
            }
            #[inline(always)]
            fn serve<const N: usize, F: FnMut(&Chain, &[Segment<'m>]) -> u32>(
                &mut self,
                max: usize,
                segs: &mut Segments<'m, N>,
                f: F,
            ) -> Result<usize, DeviceError> {
                $device::serve(self, max, segs, f)
            }
            #[inline(always)]
            fn publish_used(&mut self) {
                $device::publish_used(self)
            }
            #[inline(always)]
            fn needs_notification(&mut self) -> bool {
                $device::needs_notification(self)
            }
            #[inline(always)]
            fn enable_notifications(&mut self) -> bool {
                $device::enable_notifications(self)
            }
            #[inline(always)]
            fn disable_notifications(&mut self) {
                $device::disable_notifications(self)
            }
            #[inline(always)]
            fn size(&self) -> u16 {
                $device::size(self)
            }
        }
    };
}

ring_device!(SplitDevice);
ring_device!(PackedDevice);

/// A driver ring layout together with the device queue that serves it.
pub trait BenchLayout: RingLayout + 'static {
    /// Which of the four this is.
    const LAYOUT: Layout;
    /// The device end of the same layout.
    type Device<'m>: RingDevice<'m>;
    /// Attaches the device end to a ring the driver created.
    fn attach(mem: &TestMemory, config: DeviceConfig) -> Result<Self::Device<'_>, DeviceError>;
}

impl<const IN_ORDER: bool> BenchLayout for SplitLayout<IN_ORDER> {
    const LAYOUT: Layout = if IN_ORDER { Layout::SplitInOrder } else { Layout::Split };
    type Device<'m> = SplitDevice<'m, TestMemory>;
    fn attach(mem: &TestMemory, config: DeviceConfig) -> Result<Self::Device<'_>, DeviceError> {
        SplitDevice::new(mem, config)
    }
}

impl<const IN_ORDER: bool> BenchLayout for PackedLayout<IN_ORDER> {
    const LAYOUT: Layout = if IN_ORDER { Layout::PackedInOrder } else { Layout::Packed };
    type Device<'m> = PackedDevice<'m, TestMemory>;
    fn attach(mem: &TestMemory, config: DeviceConfig) -> Result<Self::Device<'_>, DeviceError> {
        PackedDevice::new(mem, config)
    }
}

/// Evaluates `$body` with the type alias `$L` naming the [`BenchLayout`] type of the
/// [`Layout`] value `$layout`: `with_layout!(layout, L => run_cell::<L>(..))`.
macro_rules! with_layout {
    ($layout:expr, $L:ident => $body:expr) => {
        match $layout {
            $crate::layout::Layout::Split => {
                type $L = ::virtq::SplitLayout<false>;
                $body
            }
            $crate::layout::Layout::SplitInOrder => {
                type $L = ::virtq::SplitLayout<true>;
                $body
            }
            $crate::layout::Layout::Packed => {
                type $L = ::virtq::PackedLayout<false>;
                $body
            }
            $crate::layout::Layout::PackedInOrder => {
                type $L = ::virtq::PackedLayout<true>;
                $body
            }
        }
    };
}
pub(crate) use with_layout;

#[cfg(test)]
mod tests {
    use super::*;

    fn layout_of<L: BenchLayout>() -> Layout {
        L::LAYOUT
    }

    #[test]
    fn with_layout_picks_the_matching_type() {
        for layout in Layout::ALL {
            assert_eq!(with_layout!(layout, L => layout_of::<L>()), layout);
        }
    }

    #[test]
    fn features_select_the_layout() {
        for layout in Layout::ALL {
            let f = layout.features();
            assert!(f.contains(BASE_FEATURES));
            let packed = matches!(layout, Layout::Packed | Layout::PackedInOrder);
            let in_order = matches!(layout, Layout::SplitInOrder | Layout::PackedInOrder);
            assert_eq!(f.contains(Features::RING_PACKED), packed);
            assert_eq!(f.contains(Features::IN_ORDER), in_order);
            assert_eq!(layout.layout_feature_names().len(), usize::from(packed) + usize::from(in_order));
        }
    }
}
