//! Memory on both ends: DMA for the driver, guest-memory translation for the device.

use core::ptr::NonNull;

/// Direction of a buffer mapping, as the device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The device reads the buffer (an "out" segment).
    ToDevice,
    /// The device writes the buffer (an "in" segment).
    FromDevice,
}

/// A block of ring memory: where the CPU sees it and where the device sees it.
#[derive(Debug)]
pub struct DmaRegion {
    /// CPU address of the first byte.
    pub cpu: NonNull<u8>,
    /// The address the device uses for the same byte.
    pub device_addr: u64,
    /// Size in bytes.
    pub size: usize,
}

// SAFETY: a region is an address range owned by whoever allocated it; the value carries
// no thread affinity, and the ring inside is accessed only through atomics.
unsafe impl Send for DmaRegion {}
// SAFETY: as above.
unsafe impl Sync for DmaRegion {}

/// How a driver queue gets device-visible memory: Linux's DMA API as the ring uses it.
///
/// The queue allocates its ring (and its pool of indirect tables) once, at creation, and
/// maps each buffer on `add` and unmaps it when the buffer comes back. Buffers added with
/// the `*_premapped` calls already carry device addresses and are never mapped or
/// unmapped.
///
/// # Safety
///
/// `alloc_zeroed` must return memory that is zeroed, aligned to `align`, valid for reads
/// and writes of `size` bytes through `cpu` until it is passed to `free`, and visible to
/// the device at `device_addr`. The queue writes ring structures through `cpu` relying on
/// exactly this.
pub unsafe trait Dma {
    /// Whether `map` and `unmap` do anything. When false the queue does not keep the
    /// per-descriptor records it would need to unmap, which saves work on every buffer.
    const MAPS: bool;

    /// Allocates zeroed memory for rings or indirect tables.
    #[doc(alias = "virtqueue_map_alloc_coherent")]
    fn alloc_zeroed(&self, size: usize, align: usize) -> Option<DmaRegion>;

    /// Frees what `alloc_zeroed` returned.
    ///
    /// # Safety
    ///
    /// `region` came from this allocator's `alloc_zeroed` and nobody uses it afterwards.
    #[doc(alias = "virtqueue_map_free_coherent")]
    unsafe fn free(&self, region: DmaRegion);

    /// Makes `len` bytes at CPU address `addr` available to the device; returns the device
    /// address, or `None` if the range cannot be mapped.
    #[doc(alias = "virtqueue_map_single_attrs")]
    fn map(&self, addr: u64, len: u32, dir: Direction) -> Option<u64>;

    /// Undoes one `map`.
    #[doc(alias = "virtqueue_unmap_single_attrs")]
    fn unmap(&self, device_addr: u64, len: u32, dir: Direction);
}

// SAFETY: forwards every call to `D`, whose contract is the same.
unsafe impl<D: Dma + ?Sized> Dma for &D {
    const MAPS: bool = D::MAPS;
    fn alloc_zeroed(&self, size: usize, align: usize) -> Option<DmaRegion> {
        (**self).alloc_zeroed(size, align)
    }
    unsafe fn free(&self, region: DmaRegion) {
        // SAFETY: the caller's promise is passed on unchanged.
        unsafe { (**self).free(region) }
    }
    fn map(&self, addr: u64, len: u32, dir: Direction) -> Option<u64> {
        (**self).map(addr, len, dir)
    }
    fn unmap(&self, device_addr: u64, len: u32, dir: Direction) {
        (**self).unmap(device_addr, len, dir)
    }
}

#[cfg(feature = "alloc")]
// SAFETY: forwards every call to `D`, whose contract is the same.
unsafe impl<D: Dma + ?Sized> Dma for alloc::sync::Arc<D> {
    const MAPS: bool = D::MAPS;
    fn alloc_zeroed(&self, size: usize, align: usize) -> Option<DmaRegion> {
        (**self).alloc_zeroed(size, align)
    }
    unsafe fn free(&self, region: DmaRegion) {
        // SAFETY: the caller's promise is passed on unchanged.
        unsafe { (**self).free(region) }
    }
    fn map(&self, addr: u64, len: u32, dir: Direction) -> Option<u64> {
        (**self).map(addr, len, dir)
    }
    fn unmap(&self, device_addr: u64, len: u32, dir: Direction) {
        (**self).unmap(device_addr, len, dir)
    }
}

/// In-process DMA: the device sees CPU addresses unchanged (no IOMMU, one address space),
/// as Linux does without `VIRTIO_F_ACCESS_PLATFORM`.
#[cfg(feature = "alloc")]
#[derive(Clone, Copy, Debug, Default)]
pub struct IdentityDma;

#[cfg(feature = "alloc")]
// SAFETY: memory comes from the global allocator with the requested size and alignment,
// zeroed, and the device address is the CPU address.
unsafe impl Dma for IdentityDma {
    const MAPS: bool = false;

    fn alloc_zeroed(&self, size: usize, align: usize) -> Option<DmaRegion> {
        // Every allocation uses one alignment so that `free` can rebuild the layout.
        if align > IDENTITY_ALIGN {
            return None;
        }
        let layout = core::alloc::Layout::from_size_align(size.max(1), IDENTITY_ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let cpu = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })?;
        Some(DmaRegion { cpu, device_addr: cpu.as_ptr() as u64, size })
    }

    unsafe fn free(&self, region: DmaRegion) {
        let layout = core::alloc::Layout::from_size_align(region.size.max(1), IDENTITY_ALIGN)
            .expect("layout was valid at allocation");
        // SAFETY: the caller promises `region` came from `alloc_zeroed`, which used this
        // same layout, and is no longer used.
        unsafe { alloc::alloc::dealloc(region.cpu.as_ptr(), layout) }
    }

    fn map(&self, addr: u64, _len: u32, _dir: Direction) -> Option<u64> {
        Some(addr)
    }

    fn unmap(&self, _device_addr: u64, _len: u32, _dir: Direction) {}
}

/// The one alignment [`IdentityDma`] allocates at: a page, enough for any ring.
#[cfg(feature = "alloc")]
const IDENTITY_ALIGN: usize = 4096;

/// Guest memory as the device sees it: translation of a guest address range to host memory.
///
/// # Safety
///
/// When `translate(addr, len)` returns `Some(p)`, `p` must be valid for atomic and
/// non-atomic reads and writes of `len` bytes for as long as `self` stays borrowed. The
/// device queue caches such pointers for the lifetime of its borrow of the memory and
/// relies on this; the memory itself may change underneath at any time (the peer writes
/// it), which the queue tolerates.
pub unsafe trait GuestMemory {
    /// The host address of `len` contiguous bytes of guest memory at `addr`, or `None`
    /// if any of them is outside guest memory (or the range is not contiguous on the host).
    fn translate(&self, addr: u64, len: u64) -> Option<NonNull<u8>>;
}

// SAFETY: forwards to `M`; a borrow of `&M` keeps `M` borrowed.
unsafe impl<M: GuestMemory + ?Sized> GuestMemory for &M {
    fn translate(&self, addr: u64, len: u64) -> Option<NonNull<u8>> {
        (**self).translate(addr, len)
    }
}

/// One mapped region of guest memory.
#[derive(Clone, Copy, Debug)]
struct Region {
    guest_base: u64,
    size: u64,
    host: NonNull<u8>,
}

/// A table of up to `N` guest-memory regions, each mapped contiguously in the host, with
/// bounds-checked translation. It needs no allocation.
#[derive(Debug)]
pub struct GuestRegions<const N: usize = 8> {
    regions: [Option<Region>; N],
}

// SAFETY: the table holds addresses only; the promise made in `add_region` (memory valid
// for the table's lifetime) does not depend on the thread that uses it.
unsafe impl<const N: usize> Send for GuestRegions<N> {}
// SAFETY: as above; translation only reads the table.
unsafe impl<const N: usize> Sync for GuestRegions<N> {}

impl<const N: usize> Default for GuestRegions<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Errors from [`GuestRegions::add_region`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegionError {
    /// The table already holds `N` regions.
    TableFull,
    /// The region wraps the 64-bit guest address space or is empty.
    InvalidRange,
    /// The region overlaps one already in the table.
    Overlap,
}

impl core::fmt::Display for RegionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::TableFull => "the guest memory table is full",
            Self::InvalidRange => "the guest memory region is empty or wraps the address space",
            Self::Overlap => "the guest memory region overlaps another",
        })
    }
}

impl core::error::Error for RegionError {}

impl<const N: usize> GuestRegions<N> {
    /// An empty table.
    pub const fn new() -> Self {
        Self { regions: [None; N] }
    }

    /// Adds a region of `size` bytes seen by the guest at `guest_base` and by us at `host`.
    ///
    /// # Safety
    ///
    /// `host` must be valid for reads and writes of `size` bytes for as long as this table
    /// exists (until it is dropped or the region removed by [`GuestRegions::clear`]).
    pub unsafe fn add_region(&mut self, guest_base: u64, size: u64, host: NonNull<u8>) -> Result<(), RegionError> {
        let end = guest_base.checked_add(size).filter(|_| size > 0).ok_or(RegionError::InvalidRange)?;
        if self.regions.iter().flatten().any(|r| guest_base < r.guest_base + r.size && r.guest_base < end) {
            return Err(RegionError::Overlap);
        }
        let slot = self.regions.iter_mut().find(|r| r.is_none()).ok_or(RegionError::TableFull)?;
        *slot = Some(Region { guest_base, size, host });
        Ok(())
    }

    /// Removes every region.
    pub fn clear(&mut self) {
        self.regions = [None; N];
    }
}

// SAFETY: a pointer is returned only for a range wholly inside one region, whose host
// memory the caller of `add_region` promised valid for the table's lifetime.
unsafe impl<const N: usize> GuestMemory for GuestRegions<N> {
    #[inline]
    fn translate(&self, addr: u64, len: u64) -> Option<NonNull<u8>> {
        for r in self.regions.iter().flatten() {
            let off = addr.wrapping_sub(r.guest_base);
            if addr >= r.guest_base && off <= r.size && len <= r.size - off {
                // SAFETY: `off <= size` and the region is `size` bytes long on the host.
                return Some(unsafe { r.host.add(off as usize) });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translation_is_bounds_checked() {
        let mut backing = [0u8; 64];
        let host = NonNull::new(backing.as_mut_ptr()).unwrap();
        let mut regions = GuestRegions::<2>::new();
        // SAFETY: `backing` outlives `regions`.
        unsafe { regions.add_region(0x1000, 64, host).unwrap() };
        assert_eq!(regions.translate(0x1000, 64), Some(host));
        assert!(regions.translate(0x1000, 65).is_none());
        assert!(regions.translate(0x1040, 1).is_none());
        assert!(regions.translate(0x1040, 0).is_some());
        assert!(regions.translate(0xfff, 2).is_none());
        assert!(regions.translate(u64::MAX, 2).is_none());
        assert!(regions.translate(0x1001, u64::MAX).is_none());
        // SAFETY: as above.
        let overlapping = unsafe { regions.add_region(0x1020, 8, host) };
        assert_eq!(overlapping, Err(RegionError::Overlap));
        // SAFETY: as above.
        let wrapping = unsafe { regions.add_region(u64::MAX, 8, host) };
        assert_eq!(wrapping, Err(RegionError::InvalidRange));
    }
}
