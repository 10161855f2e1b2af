//! Test support for code built on `virtq` (feature `test-utils`): guest memory that a
//! driver queue and a device queue in one process share, with bounds checks, plus a DMA
//! wrapper that counts and can fail mappings.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use crate::memory::{Direction, Dma, DmaRegion, GuestMemory};
use crate::Sg;

/// A block of "guest memory" at guest addresses `base .. base + size`.
///
/// It is both the driver's [`Dma`] (a bump allocator; CPU addresses are guest addresses,
/// as for a guest without an IOMMU) and the device's [`GuestMemory`] (bounds-checked
/// translation), so the two ends of a ring can run in one process. Memory is never
/// reused: allocate what a test needs.
pub struct TestMemory {
    host: NonNull<u8>,
    size: usize,
    base: u64,
    next: AtomicUsize,
}

// SAFETY: the block is plain memory owned by this value; all access goes through copies
// or the ring's atomics.
unsafe impl Send for TestMemory {}
// SAFETY: as above; the bump pointer is atomic.
unsafe impl Sync for TestMemory {}

const ALIGN: usize = 4096;

impl TestMemory {
    /// Guest address of the first byte of every `TestMemory`: not zero, so that a zero
    /// address is always out of range.
    pub const BASE: u64 = 0x4000_0000;

    /// `size` bytes of zeroed guest memory.
    pub fn new(size: usize) -> Self {
        let layout = Layout::from_size_align(size.max(1), ALIGN).expect("test memory size");
        // SAFETY: non-zero size.
        let host = NonNull::new(unsafe { alloc_zeroed(layout) }).expect("test memory allocation");
        Self { host, size, base: Self::BASE, next: AtomicUsize::new(0) }
    }

    /// Bump-allocates `len` bytes aligned to `align` (a power of two); returns the guest
    /// address, or `None` when the block is exhausted.
    pub fn alloc(&self, len: usize, align: usize) -> Option<u64> {
        let mut cur = self.next.load(Relaxed);
        loop {
            let start = (cur + align - 1) & !(align - 1);
            let end = start.checked_add(len)?;
            if end > self.size {
                return None;
            }
            match self.next.compare_exchange_weak(cur, end, Relaxed, Relaxed) {
                Ok(_) => return Some(self.base + start as u64),
                Err(now) => cur = now,
            }
        }
    }

    /// A fresh zeroed buffer of `len` bytes, as a segment.
    pub fn alloc_sg(&self, len: u32) -> Sg {
        Sg::new(self.alloc(len as usize, 8).expect("test memory exhausted"), len)
    }

    /// One past the last guest address.
    pub fn end(&self) -> u64 {
        self.base + self.size as u64
    }

    fn host_range(&self, addr: u64, len: usize) -> Option<*mut u8> {
        let off = addr.checked_sub(self.base)?;
        if off > self.size as u64 || len as u64 > self.size as u64 - off {
            return None;
        }
        // SAFETY: `off <= size`.
        Some(unsafe { self.host.as_ptr().add(off as usize) })
    }

    /// Copies `data` into guest memory at `addr`. Panics outside the block (a test bug).
    pub fn write(&self, addr: u64, data: &[u8]) {
        let p = self.host_range(addr, data.len()).expect("write outside test memory");
        // SAFETY: the range is inside the block.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) }
    }

    /// Copies guest memory at `addr` into `buf`. Panics outside the block (a test bug).
    pub fn read(&self, addr: u64, buf: &mut [u8]) {
        let p = self.host_range(addr, buf.len()).expect("read outside test memory");
        // SAFETY: the range is inside the block.
        unsafe { core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) }
    }

    /// Writes a little-endian `u16` (to forge ring fields in hostile-peer tests).
    pub fn write_u16(&self, addr: u64, v: u16) {
        self.write(addr, &v.to_le_bytes());
    }

    /// Writes a little-endian `u32`.
    pub fn write_u32(&self, addr: u64, v: u32) {
        self.write(addr, &v.to_le_bytes());
    }

    /// Writes a little-endian `u64`.
    pub fn write_u64(&self, addr: u64, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }

    /// Reads a little-endian `u16`.
    pub fn read_u16(&self, addr: u64) -> u16 {
        let mut b = [0; 2];
        self.read(addr, &mut b);
        u16::from_le_bytes(b)
    }

    /// Reads a little-endian `u32`.
    pub fn read_u32(&self, addr: u64) -> u32 {
        let mut b = [0; 4];
        self.read(addr, &mut b);
        u32::from_le_bytes(b)
    }
}

impl Drop for TestMemory {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.size.max(1), ALIGN).expect("valid at creation");
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.host.as_ptr(), layout) }
    }
}

// SAFETY: returned regions lie inside the zeroed block (fresh bump allocations are never
// handed out twice), which lives as long as `self`; the caller of `new` keeps `self` alive
// while a queue uses it because queues borrow it.
unsafe impl Dma for TestMemory {
    const MAPS: bool = false;

    fn alloc_zeroed(&self, size: usize, align: usize) -> Option<DmaRegion> {
        let addr = self.alloc(size, align.max(1))?;
        let cpu = NonNull::new(self.host_range(addr, size)?)?;
        Some(DmaRegion { cpu, device_addr: addr, size })
    }

    unsafe fn free(&self, _region: DmaRegion) {}

    fn map(&self, addr: u64, _len: u32, _dir: Direction) -> Option<u64> {
        Some(addr)
    }

    fn unmap(&self, _device_addr: u64, _len: u32, _dir: Direction) {}
}

// SAFETY: translation succeeds only for ranges inside the block, which lives as long as
// `self`.
unsafe impl GuestMemory for TestMemory {
    fn translate(&self, addr: u64, len: u64) -> Option<NonNull<u8>> {
        let len = usize::try_from(len).ok()?;
        NonNull::new(self.host_range(addr, len)?)
    }
}

/// A [`Dma`] wrapper that really "maps": it offsets every address by a constant, counts
/// maps and unmaps, and fails the map whose number is set with [`CountingDma::fail_map_at`].
/// Tests use it to check that every mapping is undone and that `NoMemory` loses nothing.
pub struct CountingDma<'a> {
    inner: &'a TestMemory,
    maps: AtomicU64,
    unmaps: AtomicU64,
    fail_at: AtomicU64,
}

impl<'a> CountingDma<'a> {
    /// The offset between "CPU" addresses given to `map` and the device addresses it
    /// returns. Callers pass `addr - OFFSET` so that device addresses land in `inner`.
    pub const OFFSET: u64 = 0x1000_0000;

    /// Wraps `inner`.
    pub fn new(inner: &'a TestMemory) -> Self {
        Self { inner, maps: AtomicU64::new(0), unmaps: AtomicU64::new(0), fail_at: AtomicU64::new(u64::MAX) }
    }

    /// The CPU address that maps to guest address `addr`.
    pub fn cpu_addr(addr: u64) -> u64 {
        addr - Self::OFFSET
    }

    /// Makes map call number `n` (counting from 0 over the wrapper's life) fail.
    pub fn fail_map_at(&self, n: u64) {
        self.fail_at.store(n, Relaxed);
    }

    /// Maps so far.
    pub fn maps(&self) -> u64 {
        self.maps.load(Relaxed)
    }

    /// Unmaps so far.
    pub fn unmaps(&self) -> u64 {
        self.unmaps.load(Relaxed)
    }
}

// SAFETY: ring memory comes from `TestMemory`, whose contract this forwards.
unsafe impl Dma for CountingDma<'_> {
    const MAPS: bool = true;

    fn alloc_zeroed(&self, size: usize, align: usize) -> Option<DmaRegion> {
        self.inner.alloc_zeroed(size, align)
    }

    unsafe fn free(&self, region: DmaRegion) {
        // SAFETY: forwarded unchanged.
        unsafe { self.inner.free(region) }
    }

    fn map(&self, addr: u64, _len: u32, _dir: Direction) -> Option<u64> {
        let n = self.maps.load(Relaxed);
        if n == self.fail_at.load(Relaxed) {
            self.fail_at.store(u64::MAX, Relaxed);
            return None;
        }
        self.maps.store(n + 1, Relaxed);
        Some(addr + Self::OFFSET)
    }

    fn unmap(&self, _device_addr: u64, _len: u32, _dir: Direction) {
        self.unmaps.fetch_add(1, Relaxed);
    }
}
