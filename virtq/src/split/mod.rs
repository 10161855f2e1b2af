//! The split virtqueue (VIRTIO 1.3, section 2.7): one definition of its memory layout,
//! shared by the driver half ([`driver`]) and the device half ([`device`]).
//!
//! # Layout and index arithmetic
//!
//! Three areas, each written by one side only:
//!
//! ```text
//! descriptor table  (driver writes)  size x { addr: u64, len: u32, flags: u16, next: u16 }
//! available ring    (driver writes)  flags: u16, idx: u16, ring: [u16; size], used_event: u16
//! used ring         (device writes)  flags: u16, idx: u16, ring: [{id: u32, len: u32}; size], avail_event: u16
//! ```
//!
//! `avail.idx` and `used.idx` are free-running `u16` counters of entries ever published;
//! they wrap at 65,536, not at the ring size. Because the size is a power of two (at most
//! 32,768) and divides 65,536, entry `i` lives in slot `i & (size - 1)` across the wrap, and
//! the number of published-but-unconsumed entries is `idx.wrapping_sub(last_seen)`, which a
//! correct peer keeps at or below `size`. Example with size 4: the driver has published
//! 65,534 entries (`avail.idx = 0xfffe`) and the device consumed 65,532 (`last = 0xfffc`):
//! two are pending, in slots `0xfffc & 3 = 0` and `1`. Two more adds make `idx = 0x0000`,
//! `0x0000 - 0xfffc = 4` pending, slots 0 to 3.

pub mod device;
#[cfg(feature = "alloc")]
pub mod driver;

use core::ptr::NonNull;

use crate::shared::{word1, word1_fields, DescFormat, Le16, Le32, RawDesc};

/// The buffer continues in the descriptor named by `next`.
pub const DESC_F_NEXT: u16 = 1;
/// The device writes this buffer (otherwise it reads it).
pub const DESC_F_WRITE: u16 = 2;
/// The buffer holds a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;
/// In `avail.flags`: the driver asks for no interrupts (without `EVENT_IDX`).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// In `used.flags`: the device asks for no kicks (without `EVENT_IDX`).
pub const USED_F_NO_NOTIFY: u16 = 1;

/// A split descriptor (VIRTIO 1.3, 2.7.5), copied out of a table or to be written into one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// `DESC_F_NEXT`, `DESC_F_WRITE`, `DESC_F_INDIRECT`.
    pub flags: u16,
    /// The next descriptor of the chain, when `flags` has `DESC_F_NEXT`.
    pub next: u16,
}

impl DescFormat for Descriptor {
    #[inline(always)]
    fn from_words(addr: u64, word: u64) -> Self {
        let (len, flags, next) = word1_fields(word);
        Self { addr, len, flags, next }
    }

    #[inline(always)]
    fn to_words(self) -> (u64, u64) {
        (self.addr, word1(self.len, self.flags, self.next))
    }
}

/// Largest split queue size (VIRTIO 1.3, 2.7: "Queue Size ... maximum 32768").
pub const MAX_SIZE: u16 = 32768;

/// Alignment the spec requires of each area (VIRTIO 1.3, 2.7, table "Virtqueue Part Alignment").
pub const DESC_ALIGN: u64 = 16;
/// See [`DESC_ALIGN`].
pub const AVAIL_ALIGN: u64 = 2;
/// See [`DESC_ALIGN`].
pub const USED_ALIGN: u64 = 4;

/// Size in bytes of the descriptor table of a ring of `size` entries.
pub const fn desc_table_bytes(size: u16) -> usize {
    16 * size as usize
}

/// Size in bytes of the available ring, including `used_event`.
pub const fn avail_bytes(size: u16) -> usize {
    6 + 2 * size as usize
}

/// Size in bytes of the used ring, including `avail_event`.
pub const fn used_bytes(size: u16) -> usize {
    6 + 8 * size as usize
}

/// Whether `size` is a valid split queue size.
pub const fn valid_size(size: u16) -> bool {
    size.is_power_of_two() && size <= MAX_SIZE
}

/// Where the three areas sit in one contiguous allocation (Linux's `vring_init` layout):
/// descriptors, then the available ring, then the used ring at the next multiple of `align`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContiguousAreas {
    /// Byte offset of the available ring.
    pub avail_offset: usize,
    /// Byte offset of the used ring.
    pub used_offset: usize,
    /// Total size in bytes.
    pub total: usize,
}

impl ContiguousAreas {
    /// The layout for `size` entries with the used ring aligned to `align` (a power of two,
    /// at least 4).
    #[doc(alias = "vring_size")]
    pub const fn new(size: u16, align: usize) -> Self {
        let avail_offset = desc_table_bytes(size);
        let used_offset = (avail_offset + avail_bytes(size) + align - 1) & !(align - 1);
        Self { avail_offset, used_offset, total: used_offset + used_bytes(size) }
    }
}

/// A split ring in memory: typed pointers to its three areas.
///
/// Every accessor takes an index that it reduces modulo the size, so no access can leave
/// the areas whatever value a caller passes.
#[derive(Clone, Copy)]
pub(crate) struct SplitRing {
    desc: NonNull<RawDesc>,
    avail: NonNull<Le16>,
    used: NonNull<Le16>,
    mask: u16,
}

// SAFETY: the ring is shared memory accessed only through atomics; the pointers do not
// tie it to a thread.
unsafe impl Send for SplitRing {}
// SAFETY: as above; `&SplitRing` only allows atomic accesses.
unsafe impl Sync for SplitRing {}

impl SplitRing {
    /// # Safety
    ///
    /// `size` is a valid split size, and `desc`, `avail` and `used` point to
    /// [`desc_table_bytes`], [`avail_bytes`] and [`used_bytes`] bytes respectively, aligned
    /// as the spec requires ([`DESC_ALIGN`] ...), valid for atomic reads and writes for as
    /// long as this value is used.
    pub(crate) unsafe fn new(desc: NonNull<u8>, avail: NonNull<u8>, used: NonNull<u8>, size: u16) -> Self {
        debug_assert!(valid_size(size));
        debug_assert!((desc.as_ptr() as usize).is_multiple_of(DESC_ALIGN as usize));
        debug_assert!((avail.as_ptr() as usize).is_multiple_of(AVAIL_ALIGN as usize));
        debug_assert!((used.as_ptr() as usize).is_multiple_of(USED_ALIGN as usize));
        Self { desc: desc.cast(), avail: avail.cast(), used: used.cast(), mask: size - 1 }
    }

    #[inline(always)]
    pub(crate) fn size(&self) -> u16 {
        self.mask.wrapping_add(1)
    }

    #[inline(always)]
    fn avail_u16(&self, index: usize) -> &Le16 {
        // SAFETY: callers pass index <= size + 2 (the last u16 of the area), inside the
        // `avail_bytes(size)` bytes promised in `new`; 2-byte alignment holds.
        unsafe { &*self.avail.as_ptr().add(index) }
    }

    #[inline(always)]
    fn used_u16(&self, index: usize) -> &Le16 {
        // SAFETY: callers pass index 0, 1 or 2 + 4 * size (the last u16), inside the
        // `used_bytes(size)` bytes promised in `new`.
        unsafe { &*self.used.as_ptr().add(index) }
    }

    /// Descriptor `i` (modulo the size).
    #[inline(always)]
    pub(crate) fn desc(&self, i: u16) -> &RawDesc {
        // SAFETY: `i & mask < size`, and the table holds `size` descriptors (see `new`).
        unsafe { &*self.desc.as_ptr().add((i & self.mask) as usize) }
    }

    #[inline(always)]
    pub(crate) fn avail_flags(&self) -> &Le16 {
        self.avail_u16(0)
    }

    #[inline(always)]
    pub(crate) fn avail_idx(&self) -> &Le16 {
        self.avail_u16(1)
    }

    /// Slot `idx & (size - 1)` of the available ring.
    #[inline(always)]
    pub(crate) fn avail_ring(&self, idx: u16) -> &Le16 {
        self.avail_u16(2 + (idx & self.mask) as usize)
    }

    /// `used_event`, just after the available ring (VIRTIO 1.3, 2.7.6).
    #[inline(always)]
    pub(crate) fn used_event(&self) -> &Le16 {
        self.avail_u16(2 + self.size() as usize)
    }

    #[inline(always)]
    pub(crate) fn used_flags(&self) -> &Le16 {
        self.used_u16(0)
    }

    #[inline(always)]
    pub(crate) fn used_idx(&self) -> &Le16 {
        self.used_u16(1)
    }

    /// `(id, len)` of slot `idx & (size - 1)` of the used ring. The element is 4-aligned
    /// only (it starts 4 bytes into a 4-aligned area), so it is two 32-bit fields.
    #[inline(always)]
    pub(crate) fn used_elem(&self, idx: u16) -> (&Le32, &Le32) {
        let slot = (idx & self.mask) as usize;
        // SAFETY: the used ring's element `slot < size` occupies bytes 4 + 8 * slot ..
        // 12 + 8 * slot of the `used_bytes(size)` promised in `new`, 4-aligned because the
        // area is.
        unsafe {
            let base = self.used.as_ptr().cast::<u8>().add(4 + 8 * slot).cast::<Le32>();
            (&*base, &*base.add(1))
        }
    }

    /// `avail_event`, just after the used ring (VIRTIO 1.3, 2.7.8).
    #[inline(always)]
    pub(crate) fn avail_event(&self) -> &Le16 {
        self.used_u16(2 + 4 * self.size() as usize)
    }
}
