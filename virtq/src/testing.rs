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

/// A device for testing drivers: it serves a driver's ring in the same process, handing
/// each request's readable bytes to a closure and writing back what the closure returns.
///
/// ```
/// use virtq::testing::{MockDevice, TestMemory};
/// use virtq::{Features, QueueConfig, Virtqueue};
///
/// let mem = TestMemory::new(1 << 16);
/// let features = Features::VERSION_1 | Features::RING_PACKED;
/// let mut driver = Virtqueue::<u32, _, _>::new(QueueConfig::new(0, 8, features), &mem, ()).unwrap();
/// let mut device = MockDevice::for_driver(&mem, &driver, features).unwrap();
///
/// let (req, resp) = (mem.alloc_sg(3), mem.alloc_sg(16));
/// mem.write(req.addr, b"abc");
/// driver.add_sgs(&[&[req]], &[&[resp]], 1).unwrap();
/// assert_eq!(device.serve(|request| request.to_ascii_uppercase()).unwrap(), 1);
/// let used = driver.get_buf().unwrap();
/// let mut out = [0u8; 3];
/// mem.read(resp.addr, &mut out);
/// assert_eq!((used.len, &out), (3, b"ABC"));
/// ```
pub struct MockDevice<'m> {
    queue: crate::DeviceQueue<'m, TestMemory>,
}

impl<'m> MockDevice<'m> {
    /// Attaches to the ring of `driver`, which lives in `mem`.
    pub fn for_driver<T, D: Dma, N: crate::Notify, L: crate::DriverLayout>(
        mem: &'m TestMemory,
        driver: &crate::DriverQueue<T, D, N, L>,
        features: crate::Features,
    ) -> Result<Self, crate::DeviceError> {
        let config = crate::DeviceConfig::new(
            driver.vring_size(),
            features,
            driver.desc_addr(),
            driver.avail_addr(),
            driver.used_addr(),
        );
        Ok(Self { queue: crate::DeviceQueue::new(mem, config)? })
    }

    /// Serves every available request: `handler` gets the readable bytes, and what it
    /// returns is written into the writable part (truncated to fit). Returns how many
    /// requests were served; an error if the driver's ring is malformed.
    pub fn serve(
        &mut self,
        mut handler: impl FnMut(&[u8]) -> alloc::vec::Vec<u8>,
    ) -> Result<usize, crate::DeviceError> {
        let mut served = 0;
        let mut segs = alloc::vec::Vec::new();
        while let Some(chain) = self.queue.pop(&mut segs)? {
            let mut request = alloc::vec::Vec::new();
            for s in segs.iter().filter(|s| !s.is_writable()) {
                let start = request.len();
                request.resize(start + s.len() as usize, 0);
                s.read_at(0, &mut request[start..]);
            }
            let response = handler(&request);
            let mut written = 0;
            for s in segs.iter().filter(|s| s.is_writable()) {
                if written >= response.len() {
                    break;
                }
                written += s.write_at(0, &response[written..]);
            }
            self.queue.complete(chain, written as u32);
            served += 1;
        }
        self.queue.publish_used();
        Ok(served)
    }

    /// The device queue, for finer control (notifications, faults).
    pub fn queue(&mut self) -> &mut crate::DeviceQueue<'m, TestMemory> {
        &mut self.queue
    }
}

/// A driver for testing devices: it builds requests from byte slices in a [`TestMemory`]
/// and returns responses as bytes. The device under test attaches to
/// [`MockDriver::device_config`].
pub struct MockDriver<'m> {
    mem: &'m TestMemory,
    queue: crate::Virtqueue<(Sg, u32), &'m TestMemory, ()>,
    features: crate::Features,
}

impl<'m> MockDriver<'m> {
    /// A driver queue of `size` entries with `features` (which choose the layout).
    pub fn new(mem: &'m TestMemory, size: u16, features: crate::Features) -> Result<Self, crate::CreateError> {
        let queue = crate::Virtqueue::new(crate::QueueConfig::new(0, size, features), mem, ())?;
        Ok(Self { mem, queue, features })
    }

    /// Where the device finds the ring.
    pub fn device_config(&self) -> crate::DeviceConfig {
        crate::DeviceConfig::new(
            self.queue.vring_size(),
            self.features,
            self.queue.desc_addr(),
            self.queue.avail_addr(),
            self.queue.used_addr(),
        )
    }

    /// Sends `request` (one readable segment, if not empty) with room for `response_len`
    /// bytes (one writable segment, if not zero).
    pub fn send(&mut self, request: &[u8], response_len: u32) -> Result<(), crate::AddErrorKind> {
        let out = (!request.is_empty()).then(|| {
            let sg = self.mem.alloc_sg(request.len() as u32);
            self.mem.write(sg.addr, request);
            sg
        });
        let resp = self.mem.alloc_sg(response_len);
        let outs: &[Sg] = out.as_slice();
        let ins: &[Sg] = if response_len > 0 { core::slice::from_ref(&resp) } else { &[] };
        self.queue.add_sgs(&[outs], &[ins], (resp, response_len)).map_err(|e| e.kind)?;
        self.queue.kick();
        Ok(())
    }

    /// The next response: the bytes the device wrote, in completion order.
    pub fn recv(&mut self) -> Option<alloc::vec::Vec<u8>> {
        let used = self.queue.get_buf()?;
        let (resp, _) = used.token;
        let mut bytes = alloc::vec![0; used.len as usize];
        self.mem.read(resp.addr, &mut bytes);
        Some(bytes)
    }

    /// The driver queue, for finer control.
    pub fn queue(&mut self) -> &mut crate::Virtqueue<(Sg, u32), &'m TestMemory, ()> {
        &mut self.queue
    }
}
