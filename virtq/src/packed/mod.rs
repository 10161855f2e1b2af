//! The packed virtqueue (VIRTIO 1.3, section 2.8): one definition of its memory layout,
//! shared by the driver half ([`driver`]) and the device half ([`device`]).
//!
//! # Layout, wrap counters and flag bits
//!
//! One ring of `size` 16-byte descriptors `{ addr: u64, len: u32, id: u16, flags: u16 }`
//! that both sides write, plus two 4-byte event-suppression areas `{ off_wrap: u16,
//! flags: u16 }`: the driver area (written by the driver) and the device area (written by
//! the device). `size` need not be a power of two.
//!
//! Both sides walk the ring in order, each with a position in `0..size` and a one-bit
//! *wrap counter* that starts at 1 and flips every time the position passes the end. The
//! driver makes a descriptor available by writing `AVAIL = its wrap counter` and
//! `USED = !its wrap counter`; the device marks one used by writing both bits equal to
//! its own wrap counter. So, for a reader whose wrap counter is `w`:
//!
//! ```text
//!               AVAIL USED   driver reading (w)        device reading (w)
//! available       w    !w    not used                  available
//! used            w     w    used                      not available
//! stale (lap-1)  !w   !w/w   not used                  not available
//! ```
//!
//! Example with `size = 4`: the driver adds buffers at positions 0..3 with AVAIL=1,
//! USED=0, wraps to position 0 with wrap counter 0 and from then on writes AVAIL=0,
//! USED=1. A descriptor the device marked used in the first lap (1, 1) reads as "not
//! used" to a driver on its second lap, whose wrap counter is 0. A zeroed ring (0, 0)
//! reads as neither available nor used to both sides on the first lap.
//!
//! A chain occupies consecutive positions (possibly across the end), the head's flags are
//! written last, and the device writes one used descriptor per buffer, at its used
//! position, then skips as many positions as the chain had descriptors. The `id` names the
//! buffer, not the position.
//!
//! Event suppression: `flags` is ENABLE (0), DISABLE (1) or DESC (2, with `EVENT_IDX`):
//! "notify when the descriptor at `off_wrap & 0x7fff` with wrap counter `off_wrap >> 15`
//! is made available (driver area) / used (device area)".

pub mod device;
#[cfg(feature = "alloc")]
pub mod driver;

use core::ptr::NonNull;

use crate::shared::{word1, word1_fields, DescFormat, Le16, Le32, RawDesc};

pub use crate::split::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

/// Descriptor flag: equals the driver's wrap counter when made available.
pub const DESC_F_AVAIL: u16 = 1 << 7;
/// Descriptor flag: equals the device's wrap counter when used.
pub const DESC_F_USED: u16 = 1 << 15;
/// Event suppression: notify on every event.
pub const EVENT_FLAGS_ENABLE: u16 = 0;
/// Event suppression: do not notify.
pub const EVENT_FLAGS_DISABLE: u16 = 1;
/// Event suppression: notify at the descriptor named by `off_wrap` (needs `EVENT_IDX`).
pub const EVENT_FLAGS_DESC: u16 = 2;
/// The wrap-counter bit of `off_wrap` (and of a packed `NotifyData::next`).
pub const WRAP_BIT: u16 = 1 << 15;

/// A packed descriptor (VIRTIO 1.3, 2.8.13), copied out of the ring or to be written into
/// it. The driver writes the buffer's `id` in an available descriptor; the device writes
/// it back, with the used length, in a used one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length of the buffer (available) or bytes written (used).
    pub len: u32,
    /// Buffer id.
    pub id: u16,
    /// `DESC_F_NEXT`, `DESC_F_WRITE`, `DESC_F_INDIRECT`, `DESC_F_AVAIL`, `DESC_F_USED`.
    pub flags: u16,
}

impl DescFormat for Descriptor {
    #[inline(always)]
    fn from_words(addr: u64, word: u64) -> Self {
        let (len, id, flags) = word1_fields(word);
        Self { addr, len, id, flags }
    }

    #[inline(always)]
    fn to_words(self) -> (u64, u64) {
        (self.addr, word1(self.len, self.id, self.flags))
    }
}

/// Largest packed queue size (VIRTIO 1.3, 2.8: "Queue Size ... up to 2^15").
pub const MAX_SIZE: u16 = 32768;

/// Whether `size` is a valid packed queue size.
pub const fn valid_size(size: u16) -> bool {
    size >= 1 && size <= MAX_SIZE
}

/// Whether descriptor `flags` mark it available to a device whose wrap counter is `wrap`.
#[inline(always)]
pub const fn is_avail(flags: u16, wrap: bool) -> bool {
    // AVAIL equal to the wrap counter and USED its inverse, in one compare.
    flags & (DESC_F_AVAIL | DESC_F_USED) == avail_bits(wrap)
}

/// Whether descriptor `flags` mark it used for a driver whose wrap counter is `wrap`.
#[inline(always)]
pub const fn is_used(flags: u16, wrap: bool) -> bool {
    // Both bits equal to the wrap counter, in one compare.
    flags & (DESC_F_AVAIL | DESC_F_USED) == used_bits(wrap)
}

/// The AVAIL/USED bits that make a descriptor available on lap `wrap`.
#[inline(always)]
pub const fn avail_bits(wrap: bool) -> u16 {
    if wrap {
        DESC_F_AVAIL
    } else {
        DESC_F_USED
    }
}

/// The AVAIL/USED bits that mark a descriptor used on lap `wrap`.
#[inline(always)]
pub const fn used_bits(wrap: bool) -> u16 {
    if wrap {
        DESC_F_AVAIL | DESC_F_USED
    } else {
        0
    }
}

/// A position in the ring with its wrap counter, kept in one 32-bit word. One load and
/// one store move both, so reading it right after an update is forwarded from the store;
/// a 16-bit field stored alone and then read by a widened 32-bit load (as the compiler
/// emits) stalls the pipeline on every operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cursor(u32);

impl Cursor {
    #[inline(always)]
    pub(crate) const fn new(pos: u16, wrap: bool) -> Self {
        Self(pos as u32 | (wrap as u32) << 16)
    }

    /// From a vhost-user style base: the position with the wrap counter in bit 15.
    #[inline(always)]
    pub(crate) const fn from_base(base: u16) -> Self {
        Self::new(base & !WRAP_BIT, base & WRAP_BIT != 0)
    }

    #[inline(always)]
    pub(crate) const fn pos(self) -> u16 {
        self.0 as u16
    }

    #[inline(always)]
    pub(crate) const fn wrap(self) -> bool {
        self.0 >> 16 != 0
    }

    /// The word itself, to keep in another 32-bit field.
    #[inline(always)]
    pub(crate) const fn bits(self) -> u32 {
        self.0
    }

    #[inline(always)]
    pub(crate) const fn from_bits(bits: u32) -> Self {
        Self(bits)
    }

    /// The position with the wrap counter in bit 15.
    #[inline(always)]
    pub(crate) const fn base(self) -> u16 {
        self.pos() | if self.wrap() { WRAP_BIT } else { 0 }
    }

    /// `n` positions on, for `n <= size`, flipping the wrap counter past the end.
    #[inline(always)]
    pub(crate) fn advance(self, n: u16, size: u16) -> Self {
        // pos < size <= 2^15 and n <= size, so the sum stays below bit 16 (the wrap bit).
        let next = self.0 + n as u32;
        if next as u16 >= size {
            Self((next - size as u32) ^ 1 << 16)
        } else {
            Self(next)
        }
    }
}

/// Bytes of one descriptor.
const DESC_SIZE: usize = core::mem::size_of::<RawDesc>();

/// The byte ranges (one, or two when it wraps) that the `n` descriptors from position `i`
/// on (at most `size` of them) fill in a table at address `table`.
#[inline(always)]
fn desc_byte_ranges(table: usize, size: usize, i: usize, n: usize) -> [(usize, usize); 2] {
    let i = i.min(size);
    let n = n.min(size);
    let at = |pos: usize| table + pos * DESC_SIZE;
    if i + n <= size {
        [(at(i), at(i + n)), (0, 0)]
    } else {
        [(at(i), at(size)), (at(0), at(i + n - size))]
    }
}

/// Where the three areas sit in one allocation made by the driver: descriptors, then the
/// driver area and the device area on cache lines of their own (the two sides write them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContiguousAreas {
    /// Byte offset of the driver event-suppression area.
    pub driver_offset: usize,
    /// Byte offset of the device event-suppression area.
    pub device_offset: usize,
    /// Total size in bytes.
    pub total: usize,
}

impl ContiguousAreas {
    /// The layout for `size` descriptors.
    pub const fn new(size: u16) -> Self {
        let driver_offset = (16 * size as usize + 63) & !63;
        Self { driver_offset, device_offset: driver_offset + 64, total: driver_offset + 128 }
    }
}

/// A packed ring in memory: typed pointers to its three areas.
///
/// Descriptor accessors take a position that callers keep below the size; a larger one
/// is clamped, so no value can make an access leave the ring.
#[derive(Clone, Copy)]
pub(crate) struct PackedRing {
    desc: NonNull<RawDesc>,
    driver_event: NonNull<Le32>,
    device_event: NonNull<Le32>,
    size: u16,
}

// SAFETY: shared memory accessed only through atomics; no thread affinity.
unsafe impl Send for PackedRing {}
// SAFETY: as above.
unsafe impl Sync for PackedRing {}

impl PackedRing {
    /// # Safety
    ///
    /// `size` is valid; `desc` points to `16 * size` bytes 16-aligned, and the two event
    /// areas to 4 bytes each, 4-aligned; all valid for atomic access while this is used.
    pub(crate) unsafe fn new(
        desc: NonNull<u8>,
        driver_event: NonNull<u8>,
        device_event: NonNull<u8>,
        size: u16,
    ) -> Self {
        debug_assert!(valid_size(size));
        Self { desc: desc.cast(), driver_event: driver_event.cast(), device_event: device_event.cast(), size }
    }

    #[inline(always)]
    pub(crate) fn size(&self) -> u16 {
        self.size
    }

    /// Descriptor at position `i`.
    #[inline(always)]
    pub(crate) fn desc(&self, i: u16) -> &RawDesc {
        debug_assert!(i < self.size);
        let i = i.min(self.size - 1);
        // SAFETY: `i < size` and the ring holds `size` descriptors (see `new`).
        unsafe { &*self.desc.as_ptr().add(i as usize) }
    }

    /// The `n` descriptors from position `i` on, which callers keep within the ring
    /// (`i + n <= size`); a longer range is cut at the ring's end, so no value can make an
    /// access leave the ring.
    #[inline(always)]
    pub(crate) fn desc_run(&self, i: u16, n: usize) -> &[RawDesc] {
        debug_assert!(i as usize + n <= self.size as usize);
        let i = i.min(self.size);
        let n = n.min(usize::from(self.size - i));
        // SAFETY: `i + n <= size` and the ring holds `size` descriptors, valid for atomic
        // access while `self` is (see `new`); `RawDesc` is made of atomics, so shared
        // references to memory the peer writes are sound.
        unsafe { core::slice::from_raw_parts(self.desc.as_ptr().add(i as usize), n) }
    }

    /// Prefetches for writing the lines that hold the `n` descriptors from position `i` on
    /// (wrapping at the ring's end; at most the whole ring).
    #[inline(always)]
    pub(crate) fn prefetch_for_write(&self, i: u16, n: usize) {
        let table = self.desc.as_ptr() as usize;
        for (start, end) in desc_byte_ranges(table, usize::from(self.size), usize::from(i), n) {
            crate::prefetch::lines_for_write(start, end);
        }
    }

    /// Prefetches for reading the line that holds descriptor `i`; a position past the
    /// ring's end counts on from its start.
    #[inline(always)]
    pub(crate) fn prefetch_for_read(&self, i: u16) {
        let i = usize::from(i);
        let size = usize::from(self.size);
        let i = if i >= size { i - size } else { i };
        // No access is made through this pointer, so it may point anywhere (past the
        // ring, for a ring shorter than the distance asked for): a hint cannot fault.
        crate::prefetch::line_for_read(self.desc.as_ptr().wrapping_add(i) as usize);
    }

    /// The `flags` of descriptor `i`.
    #[inline(always)]
    pub(crate) fn flags(&self, i: u16) -> &Le16 {
        self.desc(i).at14()
    }

    /// Writes descriptor `i` but for its flags, which make it available and so go last.
    #[inline(always)]
    pub(crate) fn write_but_flags(&self, i: u16, addr: u64, len: u32, id: u16) {
        let desc = self.desc(i);
        desc.addr().store(addr);
        desc.len().store(len);
        desc.at12().store(id);
    }

    /// The `id` of descriptor `i`.
    #[inline(always)]
    pub(crate) fn id(&self, i: u16) -> &Le16 {
        self.desc(i).at12()
    }

    /// Whether descriptor `i` holds this length and id already: one load.
    #[inline(always)]
    pub(crate) fn holds_len_id(&self, i: u16, len: u32, id: u16) -> bool {
        self.desc(i).holds_len_at12(len, id)
    }

    /// The driver area in one load: `(off_wrap, flags)` from the same moment.
    #[inline(always)]
    pub(crate) fn load_driver_event(&self) -> (u16, u16) {
        self.load_event(self.driver_event)
    }

    /// The device area in one load, as [`Self::load_driver_event`].
    #[inline(always)]
    pub(crate) fn load_device_event(&self) -> (u16, u16) {
        self.load_event(self.device_event)
    }

    /// Writes both halves of an event area (only while the peer is stopped: reset).
    pub(crate) fn reset_events(&self, driver_flags: u16) {
        self.driver_off_wrap().store(0);
        self.driver_flags().store(driver_flags);
        self.device_off_wrap().store(0);
        self.device_flags().store(0);
    }

    #[cfg(not(loom))]
    #[inline(always)]
    fn load_event(&self, area: NonNull<Le32>) -> (u16, u16) {
        // SAFETY: one of our two event areas: 4 valid, 4-aligned bytes (see `new`).
        let word = unsafe { area.as_ref() }.load();
        (word as u16, (word >> 16) as u16)
    }

    /// Under loom, the halves one after the other: weaker than the real single load, so
    /// every ordering it allows is still checked.
    #[cfg(loom)]
    fn load_event(&self, area: NonNull<Le32>) -> (u16, u16) {
        (self.half(area, false).load(), self.half(area, true).load())
    }

    /// The first (`off_wrap`) or second (`flags`) half of the area at `p`.
    #[inline(always)]
    fn half(&self, p: NonNull<Le32>, second: bool) -> &Le16 {
        // SAFETY: `p` is one of our two event areas: 4 valid, 4-aligned bytes holding two
        // 2-aligned `u16` fields, valid while `self` is (see `new`).
        unsafe { &*p.as_ptr().cast::<Le16>().add(second as usize) }
    }

    #[inline(always)]
    pub(crate) fn driver_off_wrap(&self) -> &Le16 {
        self.half(self.driver_event, false)
    }

    #[inline(always)]
    pub(crate) fn driver_flags(&self) -> &Le16 {
        self.half(self.driver_event, true)
    }

    #[inline(always)]
    pub(crate) fn device_off_wrap(&self) -> &Le16 {
        self.half(self.device_event, false)
    }

    #[inline(always)]
    pub(crate) fn device_flags(&self) -> &Le16 {
        self.half(self.device_event, true)
    }
}

#[cfg(test)]
mod tests {
    use super::{desc_byte_ranges, DESC_SIZE};

    extern crate std;
    use std::collections::BTreeSet;
    use std::vec::Vec;

    /// The ranges cover exactly the bytes of the descriptors asked for, wrapping included,
    /// for any table alignment, ring size, start and length; and the lines they touch are
    /// the lines of those descriptors.
    #[test]
    fn byte_ranges_cover_exactly_the_descriptors_asked_for() {
        for misalign in [0, 16, 32, 48] {
            let table = 0x1000 + misalign;
            for size in 1..=11 {
                for start in 0..size {
                    for n in 0..=size + 2 {
                        let case = (misalign, size, start, n);
                        let want: Vec<usize> = (0..n.min(size)).map(|k| (start + k) % size).collect();
                        let mut bytes = BTreeSet::new();
                        let mut lines = BTreeSet::new();
                        for (from, to) in desc_byte_ranges(table, size, start, n) {
                            assert!(
                                from <= to && (from == to || (from >= table && to <= table + size * DESC_SIZE)),
                                "{case:?}"
                            );
                            bytes.extend(from..to);
                            lines.extend((from..to).map(|b| b / 64));
                        }
                        let want_bytes: BTreeSet<usize> =
                            want.iter().flat_map(|&p| table + p * DESC_SIZE..table + (p + 1) * DESC_SIZE).collect();
                        assert_eq!(bytes, want_bytes, "{case:?}");
                        let want_lines: BTreeSet<usize> = want_bytes.iter().map(|b| b / 64).collect();
                        assert_eq!(lines, want_lines, "{case:?}");
                    }
                }
            }
        }
    }
}
