//! Which of the four ring layouts a queue runs, and the feature bits that choose it.

use core::fmt;
use core::str::FromStr;

use crate::Features;

/// One of Linux's four ring layouts. The negotiated features choose it
/// ([`LayoutKind::from_features`]); both ends of a ring must run the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(rename_all = "kebab-case"))]
pub enum LayoutKind {
    /// Split ring (VIRTIO 1.3, 2.7).
    Split,
    /// Split ring with `VIRTIO_F_IN_ORDER`.
    SplitInOrder,
    /// Packed ring (VIRTIO 1.3, 2.8).
    Packed,
    /// Packed ring with `VIRTIO_F_IN_ORDER`.
    PackedInOrder,
}

impl LayoutKind {
    /// All four, split before packed, each without in-order first.
    pub const ALL: [LayoutKind; 4] = [Self::Split, Self::SplitInOrder, Self::Packed, Self::PackedInOrder];

    /// The layout of a packed (or split) ring, with or without `IN_ORDER`.
    pub const fn new(packed: bool, in_order: bool) -> Self {
        match (packed, in_order) {
            (false, false) => Self::Split,
            (false, true) => Self::SplitInOrder,
            (true, false) => Self::Packed,
            (true, true) => Self::PackedInOrder,
        }
    }

    /// The layout that `features` select: `RING_PACKED` and `IN_ORDER` decide, every other
    /// bit is ignored.
    pub const fn from_features(features: Features) -> Self {
        Self::new(features.contains(Features::RING_PACKED), features.contains(Features::IN_ORDER))
    }

    /// The feature bits that select this layout (`RING_PACKED`, `IN_ORDER`, both or none),
    /// to be combined with the rest of what is negotiated.
    pub const fn features(self) -> Features {
        match self {
            Self::Split => Features::empty(),
            Self::SplitInOrder => Features::IN_ORDER,
            Self::Packed => Features::RING_PACKED,
            Self::PackedInOrder => Features::RING_PACKED.union(Features::IN_ORDER),
        }
    }

    /// `features` with this layout's bits set and the other layout bits cleared.
    pub const fn apply(self, features: Features) -> Features {
        features.difference(Features::RING_PACKED.union(Features::IN_ORDER)).union(self.features())
    }

    /// Whether this is a packed ring.
    pub const fn is_packed(self) -> bool {
        matches!(self, Self::Packed | Self::PackedInOrder)
    }

    /// Whether `IN_ORDER` is part of it.
    pub const fn is_in_order(self) -> bool {
        matches!(self, Self::SplitInOrder | Self::PackedInOrder)
    }

    /// The name in kebab case (`split`, `split-in-order`, `packed`, `packed-in-order`), as
    /// command lines and reports spell it; [`FromStr`] parses it back.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Split => "split",
            Self::SplitInOrder => "split-in-order",
            Self::Packed => "packed",
            Self::PackedInOrder => "packed-in-order",
        }
    }
}

impl fmt::Display for LayoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// A layout name that [`LayoutKind`]'s `FromStr` does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownLayout;

impl fmt::Display for UnknownLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown ring layout (expected split, split-in-order, packed or packed-in-order)")
    }
}

impl core::error::Error for UnknownLayout {}

impl FromStr for LayoutKind {
    type Err = UnknownLayout;

    fn from_str(s: &str) -> Result<Self, UnknownLayout> {
        Self::ALL.into_iter().find(|kind| kind.name() == s).ok_or(UnknownLayout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_round_trip_through_every_layout() {
        let others = Features::VERSION_1 | Features::EVENT_IDX | Features::INDIRECT_DESC;
        for kind in LayoutKind::ALL {
            assert_eq!(LayoutKind::from_features(kind.features()), kind);
            assert_eq!(LayoutKind::from_features(others | kind.features()), kind);
            for other in LayoutKind::ALL {
                assert_eq!(LayoutKind::from_features(kind.apply(other.features() | others)), kind);
                assert!(kind.apply(others).contains(others));
            }
            assert_eq!(kind.is_packed(), kind.features().contains(Features::RING_PACKED));
            assert_eq!(kind.is_in_order(), kind.features().contains(Features::IN_ORDER));
            assert_eq!(kind.name().parse(), Ok(kind));
        }
        assert_eq!("ring".parse::<LayoutKind>(), Err(UnknownLayout));
    }
}
