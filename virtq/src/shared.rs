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
/// Word 0 is the buffer address. Word 1 holds, from its low bits up, `len: u32` and then
/// two `u16` fields: split rings use them as `flags, next`, packed rings as `id, flags`.
/// Ring descriptor tables are 16-byte aligned (VIRTIO 1.3, 2.7.5 and 2.8.13); indirect
/// tables need only 8 for both words to be naturally aligned.
#[repr(C, align(8))]
pub struct RawDesc {
    addr: Le64,
    word1: Le64,
}

/// The fields of one descriptor, copied out of shared memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescWords {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length in bytes.
    pub len: u32,
    /// Bits 32..48 of word 1: split `flags`, packed `id`.
    pub lo16: u16,
    /// Bits 48..64 of word 1: split `next`, packed `flags`.
    pub hi16: u16,
}

impl RawDesc {
    /// Reads the whole descriptor: exactly one load per word.
    #[inline(always)]
    #[cfg(not(loom))]
    pub fn read(&self) -> DescWords {
        let addr = self.addr.load();
        let w1 = self.word1.load();
        DescWords { addr, len: w1 as u32, lo16: (w1 >> 32) as u16, hi16: (w1 >> 48) as u16 }
    }

    /// Under loom, field by field: a weaker view than the real two-word read, so every
    /// ordering it allows is still checked.
    #[cfg(loom)]
    pub fn read(&self) -> DescWords {
        DescWords { addr: self.addr.load(), len: self.len().load(), lo16: self.lo16().load(), hi16: self.hi16().load() }
    }

    /// The address word alone.
    #[inline(always)]
    pub fn addr(&self) -> &Le64 {
        &self.addr
    }

    /// The `u32` at bytes 8..12: `len`.
    #[inline(always)]
    pub fn len(&self) -> &Le32 {
        // SAFETY: `word1` is an 8-aligned 8-byte atomic at offset 8; its first four bytes
        // are a 4-aligned, in-bounds `u32` location. The ring protocol has the two ends
        // access these bytes both as fields and as whole words; every access is atomic.
        unsafe { &*(self as *const Self as *const u8).add(8).cast::<Le32>() }
    }

    /// The `u16` at bytes 12..14: split `flags`, packed `id`.
    #[inline(always)]
    pub fn lo16(&self) -> &Le16 {
        // SAFETY: as in `len`, for the 2-aligned bytes 12..14.
        unsafe { &*(self as *const Self as *const u8).add(12).cast::<Le16>() }
    }

    /// The `u16` at bytes 14..16: split `next`, packed `flags`.
    #[inline(always)]
    pub fn hi16(&self) -> &Le16 {
        // SAFETY: as in `len`, for the 2-aligned bytes 14..16.
        unsafe { &*(self as *const Self as *const u8).add(14).cast::<Le16>() }
    }

    /// Writes the whole descriptor.
    #[inline(always)]
    #[cfg(not(loom))]
    pub fn write(&self, d: DescWords) {
        self.addr.store(d.addr);
        self.word1.store(d.len as u64 | (d.lo16 as u64) << 32 | (d.hi16 as u64) << 48);
    }

    /// Writes the descriptor unless it already holds `d`. A driver that posts the same
    /// buffers in the same order (a receive pool, a benchmark) finds its descriptors
    /// unchanged from the previous lap; skipping the store keeps the line shared with the
    /// device instead of taking it back. The load hits: the driver wrote the line itself.
    #[inline(always)]
    #[cfg(not(loom))]
    pub fn write_if_changed(&self, d: DescWords) {
        let word1 = d.len as u64 | (d.lo16 as u64) << 32 | (d.hi16 as u64) << 48;
        if self.addr.load() != d.addr || self.word1.load() != word1 {
            self.addr.store(d.addr);
            self.word1.store(word1);
        }
    }

    /// Under loom, through `read` and `write` (see `read`).
    #[cfg(loom)]
    pub fn write_if_changed(&self, d: DescWords) {
        if self.read() != d {
            self.write(d);
        }
    }

    /// Whether `len` and the low 16-bit field (split `flags`, packed `id`) hold these
    /// values: one load of word 1.
    #[inline(always)]
    #[cfg(not(loom))]
    pub fn holds_len_lo16(&self, len: u32, lo16: u16) -> bool {
        self.word1.load() & 0xffff_ffff_ffff == len as u64 | (lo16 as u64) << 32
    }

    /// Under loom, field by field (see `read`).
    #[cfg(loom)]
    pub fn holds_len_lo16(&self, len: u32, lo16: u16) -> bool {
        self.len().load() == len && self.lo16().load() == lo16
    }

    /// Under loom, field by field (see `read`).
    #[cfg(loom)]
    pub fn write(&self, d: DescWords) {
        self.addr.store(d.addr);
        self.len().store(d.len);
        self.lo16().store(d.lo16);
        self.hi16().store(d.hi16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_words_have_the_spec_byte_layout() {
        let d = RawDesc { addr: Le64(AtomicU64::new(0)), word1: Le64(AtomicU64::new(0)) };
        d.write(DescWords { addr: 0x1122_3344_5566_7788, len: 0xaabb_ccdd, lo16: 0x0102, hi16: 0x0304 });
        // SAFETY: RawDesc is 16 plain bytes and nothing else touches `d` meanwhile.
        let bytes: [u8; 16] = unsafe { core::mem::transmute_copy(&d) };
        assert_eq!(
            bytes,
            [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xdd, 0xcc, 0xbb, 0xaa, 0x02, 0x01, 0x04, 0x03]
        );
        assert_eq!(d.read(), DescWords { addr: 0x1122_3344_5566_7788, len: 0xaabb_ccdd, lo16: 0x0102, hi16: 0x0304 });
    }
}
