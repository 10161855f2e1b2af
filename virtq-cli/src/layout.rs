//! The four ring layouts the benchmark runs, each a fixed driver layout
//! (`SplitDriverLayout<_>` or `PackedDriverLayout<_>`, for `DriverQueue<.., L>`) served by
//! the device of the same layout (`L::Device`). Every hot loop is generic over
//! [`BenchLayout`] and monomorphised per layout, so no layout is chosen at run time inside
//! a loop; [`with_layout!`] is the one place that turns a [`LayoutKind`] value into a type.

use clap::builder::TypedValueParser;
use virtq::testing::TestMemory;
use virtq::{
    Device, DeviceConfig, DeviceError, DriverLayout, Features, LayoutKind, PackedDriverLayout, SplitDriverLayout,
};

/// What both ends negotiate whatever the layout. No `INDIRECT_DESC`: every buffer is a
/// single segment, which never uses an indirect table anyway.
pub const BASE_FEATURES: Features = Features::VERSION_1.union(Features::EVENT_IDX);

/// A fixed driver layout the benchmark runs, with its [`LayoutKind`]: the queue is
/// `DriverQueue<.., L>` and its device `Device<'m, TestMemory, L::Device>`.
pub trait BenchLayout: DriverLayout + 'static {
    /// Which of the four this is.
    const KIND: LayoutKind;
}

impl<const IN_ORDER: bool> BenchLayout for SplitDriverLayout<IN_ORDER> {
    const KIND: LayoutKind = if IN_ORDER { LayoutKind::SplitInOrder } else { LayoutKind::Split };
}

impl<const IN_ORDER: bool> BenchLayout for PackedDriverLayout<IN_ORDER> {
    const KIND: LayoutKind = if IN_ORDER { LayoutKind::PackedInOrder } else { LayoutKind::Packed };
}

/// Everything both ends negotiate for `layout`.
pub fn features(layout: LayoutKind) -> Features {
    layout.apply(BASE_FEATURES)
}

/// The device end of `L`, attached to a ring its driver created.
pub fn attach<L: BenchLayout>(
    mem: &TestMemory,
    config: DeviceConfig,
) -> Result<Device<'_, TestMemory, L::Device>, DeviceError> {
    Device::new(mem, config)
}

/// Parses a layout name for clap, listing the four in `--help`.
pub fn layout_parser() -> impl clap::builder::TypedValueParser<Value = LayoutKind> {
    clap::builder::PossibleValuesParser::new(LayoutKind::ALL.map(LayoutKind::name))
        .map(|name| name.parse::<LayoutKind>().expect("one of the possible values"))
}

/// Evaluates `$body` with the type alias `$L` naming the [`BenchLayout`] type of the
/// [`LayoutKind`] value `$layout`: `with_layout!(layout, L => run_cell::<L>(..))`.
macro_rules! with_layout {
    ($layout:expr, $L:ident => $body:expr) => {
        match $layout {
            ::virtq::LayoutKind::Split => {
                type $L = ::virtq::SplitDriverLayout<false>;
                $body
            }
            ::virtq::LayoutKind::SplitInOrder => {
                type $L = ::virtq::SplitDriverLayout<true>;
                $body
            }
            ::virtq::LayoutKind::Packed => {
                type $L = ::virtq::PackedDriverLayout<false>;
                $body
            }
            ::virtq::LayoutKind::PackedInOrder => {
                type $L = ::virtq::PackedDriverLayout<true>;
                $body
            }
        }
    };
}
pub(crate) use with_layout;

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_of<L: BenchLayout>() -> LayoutKind {
        L::KIND
    }

    #[test]
    fn with_layout_picks_the_matching_type() {
        for layout in LayoutKind::ALL {
            assert_eq!(with_layout!(layout, L => kind_of::<L>()), layout);
        }
    }

    #[test]
    fn features_select_the_layout() {
        for layout in LayoutKind::ALL {
            assert!(features(layout).contains(BASE_FEATURES));
            assert_eq!(LayoutKind::from_features(features(layout)), layout);
        }
    }
}
