//! rust-vmm's [`vm-memory`](vm_memory) as the guest memory of a virtq device queue.
//!
//! A virtual-machine monitor built on rust-vmm holds its guest's RAM as a
//! [`GuestMemoryMmap`]. [`VmMemory`] lets a [`virtq::DeviceQueue`] (or `SplitDevice`,
//! `PackedDevice`) serve rings and buffers in that memory directly:
//!
//! ```
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use virtq::GuestMemory;
//! use virtq_vm_memory::VmMemory;
//!
//! let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 0x10_0000)]).unwrap();
//! let mem = VmMemory::new(&ram);
//! assert!(mem.translate(0x10_0000, 4096).is_some());
//! assert!(mem.translate(0x1f_f000, 0x1001).is_none(), "past the end of guest RAM");
//! // `virtq::DeviceQueue::new(&mem, config)` then serves the queue the guest set up.
//! ```
//!
//! A range is translated only when it lies wholly inside one region: descriptors that
//! cross from one region into the next are refused, as by `virtq::GuestRegions`.
//!
//! Dirty-page logging: the device queue reads and writes guest memory through the host
//! addresses it translated, which a vm-memory bitmap does not see. So [`VmMemory`] takes
//! memory without a bitmap (`GuestMemoryMmap<()>`); a monitor that tracks dirty pages for
//! migration must log the used buffers' pages itself.

#![deny(unsafe_op_in_unsafe_fn)]

use std::ptr::NonNull;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// A borrow of a vm-memory [`GuestMemoryMmap`], as a [`virtq::GuestMemory`].
///
/// The borrow keeps the memory map, and with it every region's mapping, alive for as long
/// as a device queue uses it. (A monitor that changes its memory map makes a new
/// `GuestMemoryMmap`, and then new queues over it.)
#[derive(Clone, Copy, Debug)]
pub struct VmMemory<'a> {
    memory: &'a GuestMemoryMmap<()>,
}

impl<'a> VmMemory<'a> {
    /// The guest memory `memory`.
    pub fn new(memory: &'a GuestMemoryMmap<()>) -> Self {
        Self { memory }
    }

    /// The memory map this translates through.
    pub fn memory(&self) -> &'a GuestMemoryMmap<()> {
        self.memory
    }
}

// SAFETY: a pointer is returned only for a range wholly inside one region of the map. A
// `GuestRegionMmap` maps its whole length into this process for its lifetime, and
// `GuestMemoryMmap` is an immutable collection of them (vm-memory's `GuestMemoryBackend`
// contract), kept alive by the borrow in `self`; so the `len` bytes stay valid for reads
// and writes for as long as `self` is borrowed.
unsafe impl virtq::GuestMemory for VmMemory<'_> {
    #[inline]
    fn translate(&self, addr: u64, len: u64) -> Option<NonNull<u8>> {
        let (region, offset) = self.memory.to_region_addr(GuestAddress(addr))?;
        // `to_region_addr` found `addr` inside the region, so `offset < region.len()`.
        if len > region.len() - offset.0 {
            return None;
        }
        NonNull::new(region.get_host_address(offset).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtq::GuestMemory;

    fn two_regions() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x1000), (GuestAddress(0x2000), 0x2000)]).unwrap()
    }

    #[test]
    fn a_range_translates_only_inside_one_region() {
        let ram = two_regions();
        let mem = VmMemory::new(&ram);
        let host = |addr| ram.get_host_address(GuestAddress(addr)).unwrap();
        assert_eq!(mem.translate(0x1000, 0x1000).map(NonNull::as_ptr), Some(host(0x1000)));
        assert_eq!(mem.translate(0x1ff0, 0x10).map(NonNull::as_ptr), Some(host(0x1ff0)));
        assert_eq!(mem.translate(0x2000, 0x2000).map(NonNull::as_ptr), Some(host(0x2000)));
        assert_eq!(mem.translate(0x3fff, 0).map(NonNull::as_ptr), Some(host(0x3fff)));
        // Across the two regions, even though they are adjacent in guest addresses.
        assert!(mem.translate(0x1ff0, 0x11).is_none());
        assert!(mem.translate(0x1000, 0x1001).is_none());
        // Outside guest memory, and lengths that overflow.
        assert!(mem.translate(0x0, 1).is_none());
        assert!(mem.translate(0xfff, 2).is_none());
        assert!(mem.translate(0x4000, 0).is_none());
        assert!(mem.translate(0x3fff, 2).is_none());
        assert!(mem.translate(0x2000, u64::MAX).is_none());
        assert!(mem.translate(u64::MAX, 1).is_none());
    }
}
