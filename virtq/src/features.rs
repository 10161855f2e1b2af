//! Feature bits that change how a virtqueue behaves (VIRTIO 1.3, section 6).
//!
//! Only the transport-level ("reserved") bits matter to the ring; device-class bits pass
//! through untouched.

use core::fmt;
use core::ops::{BitAnd, BitOr, BitOrAssign, Not};

/// A set of negotiated virtio feature bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(u64);

impl Features {
    /// Indirect descriptor tables (`VIRTIO_RING_F_INDIRECT_DESC`, bit 28).
    pub const INDIRECT_DESC: Self = Self(1 << 28);
    /// `used_event` / `avail_event` notification suppression (`VIRTIO_RING_F_EVENT_IDX`, bit 29).
    pub const EVENT_IDX: Self = Self(1 << 29);
    /// The VIRTIO 1.x little-endian layout (`VIRTIO_F_VERSION_1`, bit 32).
    pub const VERSION_1: Self = Self(1 << 32);
    /// The device sits behind an IOMMU or needs platform DMA (`VIRTIO_F_ACCESS_PLATFORM`, bit 33).
    pub const ACCESS_PLATFORM: Self = Self(1 << 33);
    /// The packed ring layout (`VIRTIO_F_RING_PACKED`, bit 34).
    pub const RING_PACKED: Self = Self(1 << 34);
    /// The device uses buffers in the order they were made available (`VIRTIO_F_IN_ORDER`, bit 35).
    pub const IN_ORDER: Self = Self(1 << 35);
    /// Memory accesses need platform (not SMP) barriers (`VIRTIO_F_ORDER_PLATFORM`, bit 36).
    pub const ORDER_PLATFORM: Self = Self(1 << 36);
    /// Kicks carry the next available position (`VIRTIO_F_NOTIFICATION_DATA`, bit 38).
    pub const NOTIFICATION_DATA: Self = Self(1 << 38);
    /// Queues can be reset one by one (`VIRTIO_F_RING_RESET`, bit 40).
    pub const RING_RESET: Self = Self(1 << 40);

    /// The transport bits Linux's `vring_transport_features` lets through; every other bit
    /// in the reserved range 28..=41 is cleared by [`Features::transport_filter`].
    const TRANSPORT_KEPT: Self = Self(
        Self::INDIRECT_DESC.0
            | Self::EVENT_IDX.0
            | Self::VERSION_1.0
            | Self::ACCESS_PLATFORM.0
            | Self::RING_PACKED.0
            | Self::IN_ORDER.0
            | Self::ORDER_PLATFORM.0
            | Self::NOTIFICATION_DATA.0
            | Self::RING_RESET.0,
    );
    const TRANSPORT_RANGE: u64 = ((1 << 42) - 1) & !((1 << 28) - 1);

    /// No features.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// Features from their raw bit representation.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of two sets.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// The bits of `self` that are not in `other`.
    pub const fn difference(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    /// Clears the transport bits this library does not implement, keeping device-class bits.
    #[doc(alias = "vring_transport_features")]
    pub const fn transport_filter(self) -> Self {
        Self(self.0 & (!Self::TRANSPORT_RANGE | Self::TRANSPORT_KEPT.0))
    }
}

impl BitOr for Features {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl BitOrAssign for Features {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for Features {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        Self(self.0 & rhs.0)
    }
}

impl Not for Features {
    type Output = Self;
    fn not(self) -> Self {
        Self(!self.0)
    }
}

/// The ring-level bits with their spec names (without the `VIRTIO_F_` / `VIRTIO_RING_F_`
/// prefix), in bit order.
const NAMES: [(Features, &str); 9] = [
    (Features::INDIRECT_DESC, "INDIRECT_DESC"),
    (Features::EVENT_IDX, "EVENT_IDX"),
    (Features::VERSION_1, "VERSION_1"),
    (Features::ACCESS_PLATFORM, "ACCESS_PLATFORM"),
    (Features::RING_PACKED, "RING_PACKED"),
    (Features::IN_ORDER, "IN_ORDER"),
    (Features::ORDER_PLATFORM, "ORDER_PLATFORM"),
    (Features::NOTIFICATION_DATA, "NOTIFICATION_DATA"),
    (Features::RING_RESET, "RING_RESET"),
];

impl Features {
    /// The names of the ring-level bits that are set, in bit order (`EVENT_IDX`,
    /// `RING_PACKED`, ...); device-class bits have no name here.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        NAMES.into_iter().filter(move |&(bit, _)| self.contains(bit)).map(|(_, name)| name)
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        let mut list = f.debug_set();
        for (bit, name) in NAMES {
            if self.contains(bit) {
                list.entry(&format_args!("{name}"));
                rest &= !bit.0;
            }
        }
        if rest != 0 {
            list.entry(&format_args!("{rest:#x}"));
        }
        list.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_filter_keeps_ring_bits_and_device_bits() {
        let device_bit = Features::from_bits(1 << 5);
        let unknown_transport_bit = Features::from_bits(1 << 37);
        let all = Features::EVENT_IDX | Features::RING_PACKED | device_bit | unknown_transport_bit;
        let kept = all.transport_filter();
        assert!(kept.contains(Features::EVENT_IDX | Features::RING_PACKED | device_bit));
        assert!(!kept.contains(unknown_transport_bit));
    }
}
