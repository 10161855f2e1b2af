//! Guest memory of a vhost-user frontend: memfd regions mapped shared with the back end.
//!
//! A userspace driver has no guest: "guest memory" is whatever the driver shares with the
//! back end. Here it is one or more memfd regions, each mapped `MAP_SHARED` in this process
//! and passed by file descriptor in `SET_MEM_TABLE`, so the back end maps the same pages.
//! Each memfd is sealed against any change of size before it is shared: the back end
//! cannot shrink it under our mappings, which would turn our next access into SIGBUS.
//!
//! Every region gets a guest-physical address (GPA). The regions sit one after another from
//! [`GPA_BASE`] upwards, each starting on a 2 MiB boundary, so that a GPA is never the
//! same number as a host address by accident: a host pointer that slipped into a descriptor
//! does not translate on the device, and the request fails instead of working by luck.
//!
//! ```text
//!   GPA 0x1000_0000 ┌──────────────┐   host 0x7f..a000_0000 ┌──────────────┐
//!                   │  region 0    │  <── same memfd ──>     │  region 0    │
//!   GPA 0x1000_0000 │              │                         │              │
//!     + size0 (2M↑) ├──────────────┤   host (anywhere)       └──────────────┘
//!                   │  region 1    │                         ┌──────────────┐
//!                   └──────────────┘                         │  region 1    │
//! ```
//!
//! Memory inside the regions is handed out by a first-fit free-list allocator (one per
//! region, each behind a mutex): rings and indirect tables through the [`Dma`] trait, and
//! data buffers as [`DmaBuffer`]s, which free themselves when dropped.
//!
//! Address translation is an offset per region: `gpa = region.gpa + (host - region.host)`.
//! [`Dma::map`] does exactly that and refuses addresses outside the regions; there is
//! nothing to unmap.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use virtq::{Direction, Dma, DmaRegion, Sg};

/// Guest-physical address of the first region.
pub const GPA_BASE: u64 = 0x1000_0000;

/// Regions start on this GPA boundary.
const GPA_ALIGN: u64 = 2 << 20;

/// Allocation granularity and minimum alignment: a cache line, so that two buffers never
/// share one (the device writes one while the driver reads the other).
const GRANULE: usize = 64;

/// The most regions `SET_MEM_TABLE` carries (the vhost-user baseline, `VHOST_MEMORY_BASELINE_NREGIONS`).
pub const MAX_REGIONS: usize = 8;

/// One memfd, mapped shared.
pub struct MemfdRegion {
    fd: OwnedFd,
    host: NonNull<u8>,
    size: usize,
    gpa: u64,
}

impl MemfdRegion {
    /// Creates a memfd of `size` bytes (a multiple of the page size) and maps it shared.
    fn new(name: &str, size: usize, gpa: u64) -> io::Result<Self> {
        let cname = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `cname` is a valid NUL-terminated string; memfd_create has no other inputs.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on a descriptor we own; no memory is involved.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // The back end gets this file, writable. Were it to shrink it, our next access to
        // the ring or a buffer past the new end would raise SIGBUS: a hostile device
        // could kill the driver. Sealed, the size can no longer change, nor the seals.
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own, with an integer argument; no memory is involved.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of the whole file at an address the kernel chooses;
        // it overlaps nothing of ours.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let host = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
        Ok(Self { fd, host, size, gpa })
    }

    /// The memfd (what `SET_MEM_TABLE` sends).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Host address of the first byte.
    pub fn host_addr(&self) -> u64 {
        self.host.as_ptr() as u64
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Guest-physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    fn host_to_gpa(&self, addr: u64, len: u64) -> Option<u64> {
        let off = addr.checked_sub(self.host_addr())?;
        (off <= self.size as u64 && len <= self.size as u64 - off).then(|| self.gpa + off)
    }

    fn gpa_to_host(&self, gpa: u64, len: u64) -> Option<u64> {
        let off = gpa.checked_sub(self.gpa)?;
        (off <= self.size as u64 && len <= self.size as u64 - off).then(|| self.host_addr() + off)
    }
}

impl Drop for MemfdRegion {
    fn drop(&mut self) {
        // SAFETY: `host`/`size` is the mapping created in `new`; every user of it holds an
        // `Arc<SharedMemory>`, so none is left when the region is dropped.
        unsafe { libc::munmap(self.host.as_ptr().cast(), self.size) };
    }
}

impl fmt::Debug for MemfdRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemfdRegion")
            .field("fd", &self.fd.as_raw_fd())
            .field("host", &self.host)
            .field("size", &self.size)
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .finish()
    }
}

/// First-fit free list over one region: free blocks by offset, merged on free.
#[derive(Debug)]
struct FreeList {
    free: BTreeMap<usize, usize>,
    in_use: usize,
}

impl FreeList {
    fn new(size: usize) -> Self {
        Self { free: BTreeMap::from([(0, size)]), in_use: 0 }
    }

    /// Offset of `size` bytes aligned to `align` (both multiples of `GRANULE`).
    fn alloc(&mut self, size: usize, align: usize) -> Option<usize> {
        let (start, len, at) = self.free.iter().find_map(|(&start, &len)| {
            let at = start.next_multiple_of(align);
            (at + size <= start + len).then_some((start, len, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        if at + size < start + len {
            self.free.insert(at + size, start + len - at - size);
        }
        self.in_use += size;
        Some(at)
    }

    fn free(&mut self, mut at: usize, mut size: usize) {
        self.in_use -= size;
        if let Some((&prev, &plen)) = self.free.range(..at).next_back() {
            if prev + plen == at {
                self.free.remove(&prev);
                at = prev;
                size += plen;
            }
        }
        if let Some(&nlen) = self.free.get(&(at + size)) {
            self.free.remove(&(at + size));
            size += nlen;
        }
        self.free.insert(at, size);
    }
}

/// How to lay out guest memory.
#[derive(Clone, Copy, Debug)]
pub struct MemoryConfig {
    /// Total bytes, split evenly over the regions (each rounded up to 2 MiB).
    pub size: usize,
    /// Number of memfd regions, 1 to [`MAX_REGIONS`].
    pub regions: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self { size: 64 << 20, regions: 1 }
    }
}

/// The memory shared with a vhost-user back end: memfd regions with an allocator.
///
/// Thread-safe; share it with `Arc`. It implements [`Dma`] for the driver queues, and hands
/// out data buffers with [`SharedMemory::alloc`].
pub struct SharedMemory {
    regions: Vec<MemfdRegion>,
    alloc: Vec<Mutex<FreeList>>,
}

// SAFETY: the regions are plain shared mappings with no thread affinity; the allocator
// state is behind mutexes, and the bytes themselves are handed out in disjoint pieces.
unsafe impl Send for SharedMemory {}
// SAFETY: as above.
unsafe impl Sync for SharedMemory {}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemory").field("regions", &self.regions).finish_non_exhaustive()
    }
}

impl SharedMemory {
    /// Creates the regions: `config.regions` memfds of `config.size / config.regions` bytes
    /// each (rounded up to 2 MiB), at GPAs from [`GPA_BASE`] upwards.
    pub fn new(config: MemoryConfig) -> io::Result<Arc<Self>> {
        if config.regions == 0 || config.regions > MAX_REGIONS || config.size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest memory needs 1 to {MAX_REGIONS} regions and a non-zero size"),
            ));
        }
        let each = config.size.div_ceil(config.regions).next_multiple_of(GPA_ALIGN as usize);
        let mut regions = Vec::with_capacity(config.regions);
        let mut gpa = GPA_BASE;
        for i in 0..config.regions {
            regions.push(MemfdRegion::new(&format!("virtq-guest-{i}"), each, gpa)?);
            gpa += (each as u64).next_multiple_of(GPA_ALIGN);
        }
        let alloc = regions.iter().map(|r| Mutex::new(FreeList::new(r.size))).collect();
        Ok(Arc::new(Self { regions, alloc }))
    }

    /// The regions, for `SET_MEM_TABLE`.
    pub fn regions(&self) -> &[MemfdRegion] {
        &self.regions
    }

    /// Total bytes in all regions.
    pub fn size(&self) -> usize {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Bytes currently allocated.
    pub fn in_use(&self) -> usize {
        self.alloc.iter().map(|a| a.lock().unwrap_or_else(|e| e.into_inner()).in_use).sum()
    }

    /// Allocates `size` bytes at `align` (rounded up to 64) in any region: (region, offset,
    /// rounded size).
    fn alloc_raw(&self, size: usize, align: usize) -> Option<(usize, usize, usize)> {
        let size = size.max(1).checked_next_multiple_of(GRANULE)?;
        let align = align.max(GRANULE).checked_next_power_of_two()?;
        self.alloc
            .iter()
            .enumerate()
            .find_map(|(i, a)| a.lock().unwrap_or_else(|e| e.into_inner()).alloc(size, align).map(|off| (i, off, size)))
    }

    fn free_raw(&self, region: usize, offset: usize, size: usize) {
        self.alloc[region].lock().unwrap_or_else(|e| e.into_inner()).free(offset, size);
    }

    /// A data buffer of `len` bytes inside guest memory, or `None` if the memory is full.
    /// The contents are whatever the memory held before (not zeroed).
    pub fn alloc(self: &Arc<Self>, len: usize) -> Option<DmaBuffer> {
        let (region, offset, cap) = self.alloc_raw(len, GRANULE)?;
        let gpa = self.regions[region].gpa + offset as u64;
        Some(DmaBuffer { mem: self.clone(), region, offset, gpa, len, cap, leaked: false })
    }

    /// Like [`Self::alloc`], filled with zeroes.
    pub fn alloc_zeroed_buffer(self: &Arc<Self>, len: usize) -> Option<DmaBuffer> {
        let mut b = self.alloc(len)?;
        b.fill(0);
        Some(b)
    }

    /// The GPA of `len` bytes at host address `addr`, if they lie inside one region.
    pub fn host_to_gpa(&self, addr: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| r.host_to_gpa(addr, len))
    }

    /// The host address of `len` bytes at `gpa`, if they lie inside one region.
    pub fn gpa_to_host(&self, gpa: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| r.gpa_to_host(gpa, len))
    }

    fn region_of_gpa(&self, gpa: u64) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let off = gpa.checked_sub(r.gpa)?;
            (off < r.size as u64).then_some((i, off as usize))
        })
    }
}

// SAFETY: `alloc_zeroed` returns a piece of one shared mapping that the allocator hands to
// nobody else until `free`, zeroed here, aligned as asked (the allocator aligns offsets and
// regions are page-aligned), and visible to the back end at `device_addr` because the whole
// region is in its memory table at that GPA.
unsafe impl Dma for SharedMemory {
    // `map` must run: it is the host-to-GPA translation (virtq skips `map` entirely when
    // `MAPS` is false and would hand host addresses to the device). `unmap` does nothing.
    const MAPS: bool = true;

    fn alloc_zeroed(&self, size: usize, align: usize) -> Option<DmaRegion> {
        if align > 4096 {
            return None;
        }
        let (region, offset, cap) = self.alloc_raw(size, align)?;
        let r = &self.regions[region];
        // SAFETY: `offset + cap <= r.size`: the allocator only hands out ranges inside it.
        let cpu = unsafe { r.host.add(offset) };
        // SAFETY: the range was just allocated for us alone and lies inside the mapping.
        unsafe { std::ptr::write_bytes(cpu.as_ptr(), 0, cap) };
        Some(DmaRegion { cpu, device_addr: r.gpa + offset as u64, size })
    }

    unsafe fn free(&self, region: DmaRegion) {
        if let Some((i, off)) = self.region_of_gpa(region.device_addr) {
            self.free_raw(i, off, region.size.max(1).next_multiple_of(GRANULE));
        }
    }

    fn map(&self, addr: u64, len: u32, _dir: Direction) -> Option<u64> {
        self.host_to_gpa(addr, len as u64)
    }

    fn unmap(&self, _device_addr: u64, _len: u32, _dir: Direction) {}
}

/// A data buffer inside guest memory. Dereferences to its bytes; frees itself on drop.
///
/// The back end can see (and, for a buffer handed to it as device-writable, write) these
/// bytes; a buffer must not be read or written while it is in flight. The request APIs take
/// buffers by value and give them back on completion, which enforces that.
pub struct DmaBuffer {
    mem: Arc<SharedMemory>,
    region: usize,
    offset: usize,
    /// `regions[region].gpa + offset`, fixed for the buffer's life: worked out once here
    /// rather than on every request that sends the buffer.
    gpa: u64,
    len: usize,
    cap: usize,
    leaked: bool,
}

impl DmaBuffer {
    /// Guest-physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// The segment covering the whole buffer, by GPA (for the `*_premapped` queue calls).
    pub fn sg(&self) -> Sg {
        Sg::new(self.gpa(), self.len as u32)
    }

    /// Host pointer to the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: `offset < region size`: the allocator handed out this range inside it.
        unsafe { self.mem.regions[self.region].host.as_ptr().add(self.offset) }
    }

    /// Length in bytes. The same as the slice's `len()`, without working out the bytes'
    /// address first (the request path asks for it once per buffer).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is zero (see [`Self::len`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Usable bytes (the allocation may be rounded up beyond).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length, at most the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "DmaBuffer::set_len beyond capacity");
        self.len = len;
    }

    /// The memory the buffer lives in.
    pub fn memory(&self) -> &Arc<SharedMemory> {
        &self.mem
    }

    /// Gives the buffer up without returning its bytes to the allocator: for a buffer the
    /// device may still write (a request that never completed). The bytes come back only
    /// when the whole [`SharedMemory`] is dropped.
    pub fn leak(mut self) {
        self.leaked = true;
    }
}

impl Deref for DmaBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len <= cap` bytes inside the mapping, owned by this buffer alone; the
        // device writes it only while the buffer is in flight, when it is not ours to use.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

impl DerefMut for DmaBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        if !self.leaked {
            self.mem.free_raw(self.region, self.offset, self.cap);
        }
    }
}

impl fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuffer").field("gpa", &format_args!("{:#x}", self.gpa())).field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_list_merges_neighbours() {
        let mut f = FreeList::new(1024);
        let a = f.alloc(64, 64).unwrap();
        let b = f.alloc(128, 64).unwrap();
        let c = f.alloc(64, 256).unwrap();
        assert_eq!((a, b, c), (0, 64, 256));
        f.free(b, 128);
        f.free(a, 64);
        assert_eq!(f.free.get(&0), Some(&256));
        f.free(c, 64);
        assert_eq!(f.free.len(), 1);
        assert_eq!(f.in_use, 0);
        assert!(f.alloc(2048, 64).is_none());
    }

    /// What a back end holding the memfd could try, through a file description of its
    /// own (as it gets one from the socket): every change of size fails, and the memory
    /// stays there.
    #[test]
    fn a_back_end_can_neither_shrink_nor_grow_the_memory() {
        let mem = SharedMemory::new(MemoryConfig { size: 2 << 20, regions: 1 }).unwrap();
        let r = &mem.regions()[0];
        let theirs = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", r.fd()))
            .expect("reopen the memfd as a peer would see it");
        for len in [0, r.size() as u64 / 2, r.size() as u64 * 2] {
            let err = theirs.set_len(len).expect_err("a sealed memfd keeps its size");
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "set_len({len})");
        }
        // SAFETY: fcntl on a descriptor the region owns, with an integer argument.
        let added = unsafe { libc::fcntl(r.fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(added, -1, "the seals themselves are sealed");
        assert_eq!(theirs.metadata().unwrap().len(), r.size() as u64);
        // The last byte of the mapping is still there to write and read.
        let last = (r.host_addr() + r.size() as u64 - 1) as *mut u8;
        // SAFETY: inside the region's live shared mapping, which nothing else touches here.
        unsafe {
            last.write_volatile(0xa5);
            assert_eq!(last.read_volatile(), 0xa5);
        }
    }

    #[test]
    fn translation_stays_inside_regions() {
        let mem = SharedMemory::new(MemoryConfig { size: 4 << 20, regions: 2 }).unwrap();
        let r = &mem.regions()[1];
        assert_eq!(mem.regions()[0].gpa(), GPA_BASE);
        assert_eq!(r.gpa(), GPA_BASE + (2 << 20));
        assert_eq!(mem.host_to_gpa(r.host_addr() + 8, 8), Some(r.gpa() + 8));
        assert_eq!(mem.host_to_gpa(r.host_addr() + r.size() as u64 - 4, 8), None);
        assert_eq!(mem.gpa_to_host(r.gpa() + 16, 16), Some(r.host_addr() + 16));
        let outside = Box::new([0u8; 16]);
        assert_eq!(mem.map(outside.as_ptr() as u64, 16, Direction::ToDevice), None);

        let mut b = mem.alloc(1000).unwrap();
        b.fill(0xa5);
        assert_eq!(mem.host_to_gpa(b.as_ptr() as u64, 1000), Some(b.gpa()));
        assert_eq!(mem.in_use(), 1024);
        drop(b);
        assert_eq!(mem.in_use(), 0);

        let region = mem.alloc_zeroed(5000, 4096).unwrap();
        assert_eq!(region.device_addr % 4096, 0);
        // SAFETY: just allocated, 5000 bytes.
        assert!(unsafe { std::slice::from_raw_parts(region.cpu.as_ptr(), 5000) }.iter().all(|&b| b == 0));
        // SAFETY: allocated above, not used afterwards.
        unsafe { mem.free(region) };
        assert_eq!(mem.in_use(), 0);
    }
}
