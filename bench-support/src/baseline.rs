//! The baseline that `virtq`'s round trip (`examples/cycle.rs`) is compared with: rcore's
//! `virtio-drivers` as the driver (its split `VirtQueue`: `add`, `should_notify`,
//! `pop_used`) and rust-vmm's `virtio-queue` as the device (`Queue`: `pop_descriptor_chain`,
//! `add_used`, `needs_notification`), sharing one vm-memory `GuestMemoryMmap` region.
//!
//! Everything the device sees (rings and buffers) lives in that region. The driver's `Hal`
//! allocates the rings from it and translates the region's host addresses to guest-physical
//! addresses and back. `virtio-drivers` allocates indirect descriptor tables on the heap, so
//! `Hal::share` bounces a buffer from outside the region into a slot inside it (as a
//! swiotlb-style HAL does), which is only ever those tables.
//!
//! One cycle is what `cycle.rs` does for `virtq`: the driver adds one buffer of `segments`
//! device-writable 64-byte segments and asks whether to notify; the device pops the chain,
//! translates every descriptor into host memory (bounds-checked `get_slice`, as `virtq`'s
//! `pop` translates into `Segment`s), completes it with the writable length and decides
//! whether to interrupt; the driver takes the used buffer back.
//!
//! Used by `virtq`'s `examples/cycle_baseline.rs` (instructions per cycle under callgrind,
//! `scripts/instructions.sh`) and `benches/cycle.rs` (criterion).

use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Error, Hal, PhysAddr, PAGE_SIZE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// Ring size, as in `cycle.rs`.
pub const SIZE: usize = 256;
/// Bytes per segment, as in `cycle.rs`.
pub const SEG_LEN: usize = 64;
/// Most segments a buffer may have (the capacity of the device's segment list).
pub const MAX_SEGS: usize = 16;

/// Guest-physical address of the region's first byte (not zero, so that zero is invalid).
const GUEST_BASE: u64 = 0x4000_0000;
const REGION_SIZE: usize = 16 << 20;
/// Bounce slots for buffers `Hal::share` finds outside the region (indirect tables).
const BOUNCE_SLOTS: usize = 64;
const BOUNCE_SLOT_SIZE: usize = 4096;

/// The one guest memory region of the process, with a bump allocator over it (memory is
/// never reused, so every allocation is zeroed) and the bounce slots.
pub struct Region {
    mem: GuestMemoryMmap,
    /// Host address of `GUEST_BASE`.
    host: usize,
    next: AtomicUsize,
    /// Guest address of the first bounce slot.
    bounce: u64,
    /// Bit `i` set: bounce slot `i` is free.
    bounce_free: AtomicU64,
}

static REGION: OnceLock<Region> = OnceLock::new();

/// The process's region, created on first use.
pub fn region() -> &'static Region {
    REGION.get_or_init(Region::new)
}

impl Region {
    fn new() -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(GUEST_BASE), REGION_SIZE)])
            .expect("guest memory region");
        let host = mem.get_host_address(GuestAddress(GUEST_BASE)).expect("region start") as usize;
        let mut region = Self { mem, host, next: AtomicUsize::new(0), bounce: 0, bounce_free: AtomicU64::new(!0) };
        region.bounce = region.alloc(BOUNCE_SLOTS * BOUNCE_SLOT_SIZE, PAGE_SIZE);
        region
    }

    /// The region as the device's guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Bump-allocates `len` zeroed bytes aligned to `align` (a power of two); returns the
    /// guest address. Panics when the region is exhausted.
    pub fn alloc(&self, len: usize, align: usize) -> u64 {
        let mut cur = self.next.load(Relaxed);
        loop {
            let start = (cur + align - 1) & !(align - 1);
            let end = start + len;
            assert!(end <= REGION_SIZE, "guest memory region exhausted");
            match self.next.compare_exchange_weak(cur, end, Relaxed, Relaxed) {
                Ok(_) => return GUEST_BASE + start as u64,
                Err(now) => cur = now,
            }
        }
    }

    /// Host address of guest range `gpa .. gpa + len`. Panics outside the region.
    pub fn host(&self, gpa: u64, len: usize) -> NonNull<u8> {
        let off = gpa.checked_sub(GUEST_BASE).expect("address below the region") as usize;
        assert!(off <= REGION_SIZE && len <= REGION_SIZE - off, "range outside the region");
        NonNull::new((self.host + off) as *mut u8).expect("mapped region")
    }

    /// Guest address of host range `host .. host + len`, if it lies inside the region.
    fn guest(&self, host: usize, len: usize) -> Option<u64> {
        let off = host.checked_sub(self.host)?;
        (off <= REGION_SIZE && len <= REGION_SIZE - off).then(|| GUEST_BASE + off as u64)
    }

    fn take_bounce_slot(&self) -> usize {
        let mut free = self.bounce_free.load(Relaxed);
        loop {
            assert!(free != 0, "bounce slots exhausted");
            let slot = free.trailing_zeros() as usize;
            match self.bounce_free.compare_exchange_weak(free, free & !(1 << slot), Relaxed, Relaxed) {
                Ok(_) => return slot,
                Err(now) => free = now,
            }
        }
    }

    /// The bounce slot that `gpa` starts, if any.
    fn bounce_slot(&self, gpa: u64) -> Option<usize> {
        let off = gpa.checked_sub(self.bounce)? as usize;
        (off < BOUNCE_SLOTS * BOUNCE_SLOT_SIZE).then_some(off / BOUNCE_SLOT_SIZE)
    }
}

/// `virtio-drivers`' HAL over the region: DMA memory comes from it, and sharing a buffer
/// translates its host address to the guest address the device uses.
pub struct RegionHal;

// SAFETY: `dma_alloc` returns fresh (never reused, hence zeroed and unaliased) page-aligned
// memory of the region, which lives for the rest of the process; `share` returns the guest
// address of the very bytes given, or of a bounce slot holding their copy, which nothing
// else uses until `unshare` frees it.
unsafe impl Hal for RegionHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let r = region();
        let len = pages * PAGE_SIZE;
        let gpa = r.alloc(len, PAGE_SIZE);
        (gpa, r.host(gpa, len))
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        unreachable!("the fake transport has no MMIO")
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let r = region();
        let (host, len) = (buffer.cast::<u8>().as_ptr(), buffer.len());
        if let Some(gpa) = r.guest(host as usize, len) {
            return gpa;
        }
        assert!(len <= BOUNCE_SLOT_SIZE, "buffer too large to bounce");
        let gpa = r.bounce + (r.take_bounce_slot() * BOUNCE_SLOT_SIZE) as u64;
        if direction != BufferDirection::DeviceToDriver {
            // SAFETY: the caller guarantees `buffer` is valid for `len` bytes; the slot is
            // `len` bytes or more of the region, taken by us alone, so they do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(host, r.host(gpa, len).as_ptr(), len) };
        }
        gpa
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let r = region();
        if let Some(slot) = r.bounce_slot(paddr) {
            let (host, len) = (buffer.cast::<u8>().as_ptr(), buffer.len());
            if direction != BufferDirection::DriverToDevice {
                // SAFETY: as in `share`: the slot holds the bounced copy of `buffer`, which
                // the caller guarantees valid and unaccessed during this call.
                unsafe { std::ptr::copy_nonoverlapping(r.host(paddr, len).as_ptr(), host, len) };
            }
            r.bounce_free.fetch_or(1 << slot, Relaxed);
        }
    }
}

/// Where the driver put the queue (`Transport::queue_set`).
#[derive(Clone, Copy, Debug)]
struct QueueAddrs {
    size: u32,
    desc: u64,
    driver: u64,
    device: u64,
}

/// A transport with no device behind it: it records where the driver put queue 0 so
/// that the `virtio-queue` device can be set up with those addresses.
#[derive(Default)]
struct FakeTransport {
    queue: Option<QueueAddrs>,
    notifications: u64,
}

impl Transport for FakeTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }

    fn read_device_features(&mut self) -> u64 {
        0
    }

    fn write_driver_features(&mut self, _driver_features: u64) {}

    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        SIZE as u32
    }

    fn notify(&mut self, _queue: u16) {
        self.notifications += 1;
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::empty()
    }

    fn set_status(&mut self, _status: DeviceStatus) {}

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        assert_eq!(queue, 0);
        self.queue = Some(QueueAddrs { size, desc: descriptors, driver: driver_area, device: device_area });
    }

    fn queue_unset(&mut self, _queue: u16) {
        self.queue = None;
    }

    fn queue_used(&mut self, _queue: u16) -> bool {
        self.queue.is_some()
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }

    fn read_config_generation(&self) -> u32 {
        0
    }

    fn read_config_space<T>(&self, _offset: usize) -> virtio_drivers::Result<T> {
        Err(Error::ConfigSpaceMissing)
    }

    fn write_config_space<T>(&mut self, _offset: usize, _value: T) -> virtio_drivers::Result<()> {
        Err(Error::ConfigSpaceMissing)
    }
}

/// A `virtio-drivers` driver queue and a `virtio-queue` device queue on the same rings,
/// with one buffer of device-writable segments to pass around.
pub struct Pair {
    driver: Box<VirtQueue<RegionHal, SIZE>>,
    device: Queue,
    mem: &'static GuestMemoryMmap,
    /// The buffer's segments, in the region.
    outs: Vec<&'static mut [u8]>,
    /// The device's translated segments, reused (like `virtq`'s `Segments`).
    segs: Vec<VolatileSlice<'static, ()>>,
    notify_check: bool,
    _transport: FakeTransport,
}

impl Pair {
    /// A pair whose buffer has `segments` segments (1 to [`MAX_SEGS`]); `indirect`
    /// negotiates `VIRTIO_F_INDIRECT_DESC`; `notify_check` makes the device call
    /// `needs_notification` after every completion. `EVENT_IDX` is on, as in `cycle.rs`.
    pub fn new(segments: usize, indirect: bool, notify_check: bool) -> Self {
        assert!((1..=MAX_SEGS).contains(&segments));
        let r = region();
        let mut transport = FakeTransport::default();
        let driver = Box::new(VirtQueue::new(&mut transport, 0, indirect, true).expect("driver queue"));
        let q = transport.queue.expect("queue_set called");
        let mut device = Queue::new(SIZE as u16).expect("device queue");
        device.set_size(q.size as u16);
        device.try_set_desc_table_address(GuestAddress(q.desc)).expect("descriptor table address");
        device.try_set_avail_ring_address(GuestAddress(q.driver)).expect("available ring address");
        device.try_set_used_ring_address(GuestAddress(q.device)).expect("used ring address");
        device.set_event_idx(true);
        device.set_ready(true);
        assert!(device.is_valid(r.memory()), "device queue outside guest memory");
        let outs = (0..segments)
            .map(|_| {
                let gpa = r.alloc(SEG_LEN, 8);
                // SAFETY: fresh region memory, never handed out again, valid for the rest of
                // the process; only the driver (through this slice) and the device (which
                // only translates it) use it.
                unsafe { std::slice::from_raw_parts_mut(r.host(gpa, SEG_LEN).as_ptr(), SEG_LEN) }
            })
            .collect();
        Self {
            driver,
            device,
            mem: r.memory(),
            outs,
            segs: Vec::with_capacity(MAX_SEGS),
            notify_check,
            _transport: transport,
        }
    }

    /// One round trip; returns the length the device reported.
    #[inline]
    pub fn cycle(&mut self) -> u32 {
        // SAFETY: a fresh view of `self.outs` with a shorter element lifetime, which
        // `pop_used` requires; the library stores nothing into it, so the elements stay the
        // `'static` slices they are.
        let outs =
            unsafe { std::slice::from_raw_parts_mut(self.outs.as_mut_ptr().cast::<&mut [u8]>(), self.outs.len()) };
        // SAFETY: the buffers stay valid (region memory, for the process's life) and are not
        // accessed until `pop_used` below returns them.
        let token = unsafe { self.driver.add(&[], outs) }.expect("ring has room");
        black_box(self.driver.should_notify());
        assert!(self.device_round());
        // SAFETY: the same buffers as given to `add` for `token`.
        unsafe { self.driver.pop_used(token, &[], outs) }.expect("used buffer")
    }

    /// The device's half: pop a chain, translate its descriptors, complete it.
    #[inline]
    fn device_round(&mut self) -> bool {
        let mem = self.mem;
        let Some(chain) = self.device.pop_descriptor_chain(mem) else { return false };
        let head = chain.head_index();
        self.segs.clear();
        let mut written = 0u32;
        for desc in chain {
            let Ok(slice) = mem.get_slice(desc.addr(), desc.len() as usize) else { return false };
            if self.segs.len() == MAX_SEGS {
                return false;
            }
            self.segs.push(slice);
            if desc.is_write_only() {
                written += desc.len();
            }
        }
        self.device.add_used(mem, head, written).expect("add_used");
        if self.notify_check {
            black_box(self.device.needs_notification(mem).expect("needs_notification"));
        }
        true
    }
}
