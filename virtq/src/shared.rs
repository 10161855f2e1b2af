//! Little-endian fields of memory shared with the peer.
//!
//! The peer may write any of these at any time, so they are atomics (never plain
//! references to plain integers) and every access is a single relaxed load or store:
//! Linux's `READ_ONCE` / `WRITE_ONCE`. Callers copy a value out once, validate the copy,
//! and use only the copy. Ordering between fields comes from [`crate::Barriers`].

use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering::Relaxed};

/// A shared little-endian `u16`.
#[repr(transparent)]
pub struct Le16(AtomicU16);

/// A shared little-endian `u32`.
#[repr(transparent)]
pub struct Le32(AtomicU32);

/// A shared little-endian `u64`.
#[repr(transparent)]
pub struct Le64(AtomicU64);

#[cfg(not(loom))]
macro_rules! le_field {
    ($name:ident, $int:ty, $shadow:ident) => {
        impl $name {
            /// One load of the field.
            #[inline(always)]
            pub fn load(&self) -> $int {
                <$int>::from_le(self.0.load(Relaxed))
            }

            /// One store to the field.
            #[inline(always)]
            pub fn store(&self, value: $int) {
                self.0.store(value.to_le(), Relaxed)
            }
        }
    };
}

/// Under `cfg(loom)` every shared field is shadowed by a loom atomic keyed by its address,
/// created on first use from the bytes in memory, so that loom explores every ordering the
/// fences allow between the two ends. Each address is accessed at one width only in this
/// configuration (descriptors and event areas field by field; see `RawDesc::read`).
#[cfg(loom)]
mod shadow {
    extern crate std;
    use loom::sync::atomic::{AtomicU16, AtomicU32, AtomicU64};
    use std::boxed::Box;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// One shadow atomic, named after the field type it stands for.
    pub enum Cell {
        Le16(AtomicU16),
        Le32(AtomicU32),
        Le64(AtomicU64),
    }

    loom::lazy_static! {
        static ref CELLS: Mutex<HashMap<usize, &'static Cell>> = Mutex::new(HashMap::new());
    }

    /// The loom atomic for the field at `addr`, made from `init` on first use.
    pub fn cell(addr: usize, init: impl FnOnce() -> Cell) -> &'static Cell {
        let mut cells = CELLS.lock().unwrap();
        *cells.entry(addr).or_insert_with(|| Box::leak(Box::new(init())))
    }
}

#[cfg(loom)]
macro_rules! le_field {
    ($name:ident, $int:ty, $shadow:ident) => {
        impl $name {
            fn shadow(&self) -> &'static loom::sync::atomic::$shadow {
                let init = || shadow::Cell::$name(loom::sync::atomic::$shadow::new(self.0.load(Relaxed)));
                match shadow::cell(self as *const Self as usize, init) {
                    shadow::Cell::$name(a) => a,
                    _ => panic!("a shared field accessed at two widths under loom"),
                }
            }

            /// One load of the field.
            pub fn load(&self) -> $int {
                <$int>::from_le(self.shadow().load(Relaxed))
            }

            /// One store to the field.
            pub fn store(&self, value: $int) {
                self.shadow().store(value.to_le(), Relaxed)
            }
        }
    };
}

le_field!(Le16, u16, AtomicU16);
le_field!(Le32, u32, AtomicU32);
le_field!(Le64, u64, AtomicU64);

/// One 16-byte descriptor, viewed as two 8-byte words so that a reader fetches it in two
/// loads and a writer publishes it in two stores.
///
/// Word 0 is the buffer address. Word 1 holds, from its low bits up, `len: u32` and two
/// `u16` fields whose meaning depends on the ring format: split `flags, next`, packed
/// `id, flags`. Only the formats' typed views ([`crate::split::Descriptor`],
/// [`crate::packed::Descriptor`]) give them names. Ring descriptor tables are 16-byte
/// aligned (VIRTIO 1.3, 2.7.5 and 2.8.13); a `RawDesc` needs 8, for both words to be
/// naturally aligned.
#[repr(C, align(8))]
pub struct RawDesc {
    addr: Le64,
    word1: Le64,
}

/// A ring format's typed view of a descriptor: how its fields sit in the two words.
pub(crate) trait DescFormat: Copy + PartialEq {
    /// The view of a descriptor whose words are `addr` and `word1`.
    fn from_words(addr: u64, word1: u64) -> Self;
    /// The two words that hold this view.
    fn to_words(self) -> (u64, u64);
}

/// Word 1 of a descriptor from its fields: `len`, then the `u16`s at bytes 12 and 14.
#[inline(always)]
pub(crate) const fn word1(len: u32, at12: u16, at14: u16) -> u64 {
    len as u64 | (at12 as u64) << 32 | (at14 as u64) << 48
}

/// The fields of word 1: `(len, u16 at byte 12, u16 at byte 14)`.
#[inline(always)]
pub(crate) const fn word1_fields(word1: u64) -> (u32, u16, u16) {
    (word1 as u32, (word1 >> 32) as u16, (word1 >> 48) as u16)
}

impl RawDesc {
    /// Reads the whole descriptor: exactly one load per word.
    #[inline(always)]
    #[cfg(not(loom))]
    pub(crate) fn read<F: DescFormat>(&self) -> F {
        let addr = self.addr.load();
        F::from_words(addr, self.word1.load())
    }

    /// Under loom, field by field: a weaker view than the real two-word read, so every
    /// ordering it allows is still checked.
    #[cfg(loom)]
    pub(crate) fn read<F: DescFormat>(&self) -> F {
        let addr = self.addr.load();
        F::from_words(addr, word1(self.len().load(), self.at12().load(), self.at14().load()))
    }

    /// The address word alone.
    #[inline(always)]
    pub(crate) fn addr(&self) -> &Le64 {
        &self.addr
    }

    /// The `u32` at bytes 8..12: `len`.
    #[inline(always)]
    pub(crate) fn len(&self) -> &Le32 {
        // SAFETY: `word1` is an 8-aligned 8-byte atomic at offset 8; its first four bytes
        // are a 4-aligned, in-bounds `u32` location. The ring protocol has the two ends
        // access these bytes both as fields and as whole words; every access is atomic.
        unsafe { &*(self as *const Self as *const u8).add(8).cast::<Le32>() }
    }

    /// The `u16` at bytes 12..14, for a format's named accessor (split `flags`, packed
    /// `id`).
    #[inline(always)]
    pub(crate) fn at12(&self) -> &Le16 {
        // SAFETY: as in `len`, for the 2-aligned bytes 12..14.
        unsafe { &*(self as *const Self as *const u8).add(12).cast::<Le16>() }
    }

    /// The `u16` at bytes 14..16, for a format's named accessor (split `next`, packed
    /// `flags`).
    #[inline(always)]
    pub(crate) fn at14(&self) -> &Le16 {
        // SAFETY: as in `len`, for the 2-aligned bytes 14..16.
        unsafe { &*(self as *const Self as *const u8).add(14).cast::<Le16>() }
    }

    /// Writes the whole descriptor.
    #[inline(always)]
    pub(crate) fn write<F: DescFormat>(&self, d: F) {
        self.write_words(d.to_words());
    }

    /// Writes the two words of a descriptor of either format (`DescFormat::to_words`).
    #[inline(always)]
    #[cfg(not(loom))]
    pub(crate) fn write_words(&self, (addr, word1): (u64, u64)) {
        self.addr.store(addr);
        self.word1.store(word1);
    }

    /// Under loom, field by field (see `read`).
    #[cfg(loom)]
    pub(crate) fn write_words(&self, (addr, word1): (u64, u64)) {
        let (len, at12, at14) = word1_fields(word1);
        self.addr.store(addr);
        self.len().store(len);
        self.at12().store(at12);
        self.at14().store(at14);
    }

    /// Writes the descriptor unless it already holds `d`. A driver that posts the same
    /// buffers in the same order (a receive pool, a benchmark) finds its descriptors
    /// unchanged from the previous lap; skipping the store keeps the line shared with the
    /// device instead of taking it back. The load hits: the driver wrote the line itself.
    #[inline(always)]
    #[cfg(not(loom))]
    pub(crate) fn write_if_changed<F: DescFormat>(&self, d: F) {
        let (addr, word1) = d.to_words();
        if self.addr.load() != addr || self.word1.load() != word1 {
            self.addr.store(addr);
            self.word1.store(word1);
        }
    }

    /// Under loom, through `read` and `write` (see `read`).
    #[cfg(loom)]
    pub(crate) fn write_if_changed<F: DescFormat>(&self, d: F) {
        if self.read::<F>() != d {
            self.write(d);
        }
    }

    /// Whether `len` and the `u16` at byte 12 hold these values: one load of word 1.
    #[inline(always)]
    #[cfg(not(loom))]
    pub(crate) fn holds_len_at12(&self, len: u32, at12: u16) -> bool {
        self.word1.load() & 0xffff_ffff_ffff == word1(len, at12, 0)
    }

    /// Under loom, field by field (see `read`).
    #[cfg(loom)]
    pub(crate) fn holds_len_at12(&self, len: u32, at12: u16) -> bool {
        self.len().load() == len && self.at12().load() == at12
    }
}

/// Reads the 16 bytes at `entry`, which need not be aligned, as a descriptor: one
/// volatile copy, so each byte is fetched once whatever the peer does meanwhile.
///
/// # Safety
///
/// `entry` is valid for reads of 16 bytes for the duration of the call.
#[inline(always)]
pub(crate) unsafe fn read_unaligned_desc<F: DescFormat>(entry: *const u8) -> F {
    // SAFETY: 16 valid bytes, by the caller's promise; `[u8; 16]` has alignment 1.
    let bytes = unsafe { core::ptr::read_volatile(entry.cast::<[u8; 16]>()) };
    let (lo, hi) = bytes.split_at(8);
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    F::from_words(word(lo), word(hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_words_have_the_spec_byte_layout() {
        let d = RawDesc { addr: Le64(AtomicU64::new(0)), word1: Le64(AtomicU64::new(0)) };
        let split =
            crate::split::Descriptor { addr: 0x1122_3344_5566_7788, len: 0xaabb_ccdd, flags: 0x0102, next: 0x0304 };
        d.write(split);
        // SAFETY: RawDesc is 16 plain bytes and nothing else touches `d` meanwhile.
        let bytes: [u8; 16] = unsafe { core::mem::transmute_copy(&d) };
        assert_eq!(
            bytes,
            [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xdd, 0xcc, 0xbb, 0xaa, 0x02, 0x01, 0x04, 0x03]
        );
        assert_eq!(d.read::<crate::split::Descriptor>(), split);
        // The same bytes in the packed format: the id where split has its flags.
        let packed: crate::packed::Descriptor = d.read();
        assert_eq!((packed.addr, packed.len, packed.id, packed.flags), (split.addr, split.len, 0x0102, 0x0304));
        assert!(d.holds_len_at12(0xaabb_ccdd, 0x0102));
        assert!(!d.holds_len_at12(0xaabb_ccdd, 0x0304));
    }
}
