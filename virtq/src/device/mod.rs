//! The device side: a device queue generic over its ring layout, and the vocabulary every
//! layout shares: the segments of a popped chain, where they are collected, and what a
//! hostile driver can be caught doing.

pub(crate) mod any;
pub(crate) mod queue;

pub use any::{AnyDeviceLayout, DeviceQueue};
pub use queue::{
    Device, DeviceLayout, Fixed, Negotiated, OrderMode, PackedDevice, PackedInOrderDevice, SplitDevice,
    SplitInOrderDevice,
};

use core::fmt;
use core::marker::PhantomData;
use core::ptr::NonNull;

use crate::memory::GuestMemory;
use crate::shared::{read_unaligned_desc, DescFormat, RawDesc};
use crate::Features;

/// Where a ring lives in guest memory and what was negotiated for it.
#[derive(Clone, Copy, Debug)]
pub struct DeviceConfig {
    /// Number of ring entries.
    pub size: u16,
    /// Negotiated features (`RING_PACKED`, `EVENT_IDX`, `IN_ORDER`, `ORDER_PLATFORM` matter).
    pub features: Features,
    /// Guest address of the descriptor table (packed: the descriptor ring).
    pub desc_addr: u64,
    /// Guest address of the driver area (split: available ring; packed: driver event
    /// suppression).
    pub avail_addr: u64,
    /// Guest address of the device area (split: used ring; packed: device event
    /// suppression).
    pub used_addr: u64,
    /// Where to resume popping (vhost-user `SET_VRING_BASE`). Split: the next available
    /// index. Packed: the next position, with the wrap counter in bit 15.
    pub avail_base: u16,
    /// Packed only: where the next used descriptor goes, with the wrap counter in bit 15.
    /// (A split ring's used index is read from the ring itself.)
    pub used_base: u16,
}

impl DeviceConfig {
    /// A ring that starts fresh: nothing popped, nothing used.
    pub const fn new(size: u16, features: Features, desc_addr: u64, avail_addr: u64, used_addr: u64) -> Self {
        let base = if features.contains(Features::RING_PACKED) { 1 << 15 } else { 0 };
        Self { size, features, desc_addr, avail_addr, used_addr, avail_base: base, used_base: base }
    }
}

/// Translates one ring area, checking the spec's alignment on both the guest address and
/// the host pointer (the queue accesses it with atomics).
pub(crate) fn translate_area<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: u64,
    len: usize,
    align: u64,
) -> Result<NonNull<u8>, DeviceError> {
    if !addr.is_multiple_of(align) {
        return Err(DeviceError::Misaligned);
    }
    let host = mem.translate(addr, len as u64).ok_or(DeviceError::AddressOutOfRange { addr, len: len as u64 })?;
    if !(host.as_ptr() as u64).is_multiple_of(align) {
        return Err(DeviceError::Misaligned);
    }
    Ok(host)
}

/// An indirect descriptor's table, checked and translated. VIRTIO 1.3 sets no alignment
/// for one (2.7.5.3, 2.8.19): an 8-aligned table is read as atomic words, any other with
/// one volatile 16-byte copy per entry. Walkers test [`Self::aligned`] once and run a loop
/// specialised for it.
#[derive(Clone, Copy)]
pub(crate) struct IndirectTable {
    host: NonNull<u8>,
    entries: u32,
}

impl IndirectTable {
    /// The table of `len` bytes at `addr`: a positive multiple of 16, at most
    /// [`MAX_INDIRECT_ENTRIES`] entries, inside guest memory.
    pub(crate) fn new<M: GuestMemory + ?Sized>(mem: &M, addr: u64, len: u32) -> Result<Self, DeviceError> {
        if len == 0 || !len.is_multiple_of(16) || len / 16 > MAX_INDIRECT_ENTRIES {
            return Err(DeviceError::BadIndirectLength { len });
        }
        Ok(Self { host: translate_area(mem, addr, len as usize, 1)?, entries: len / 16 })
    }

    /// Number of entries (at least 1).
    pub(crate) fn entries(&self) -> u32 {
        self.entries
    }

    /// Whether the table is 8-aligned in host memory.
    pub(crate) fn aligned(&self) -> bool {
        (self.host.as_ptr() as usize).is_multiple_of(core::mem::align_of::<RawDesc>())
    }

    /// Entry `i`, read once. `ALIGNED` must be [`Self::aligned`].
    ///
    /// # Safety
    ///
    /// `i < self.entries()`, and the guest memory the table was translated from is still
    /// borrowed. (The walkers establish the first from their own bounds checks; a clamp
    /// here cost three instructions an entry.)
    #[inline(always)]
    pub(crate) unsafe fn read<F: DescFormat, const ALIGNED: bool>(&self, i: u32) -> F {
        debug_assert!(i < self.entries && ALIGNED == self.aligned());
        // SAFETY: `i < entries` (the caller's promise), and the table was translated for
        // `16 * entries` bytes, valid while the memory is borrowed (the `GuestMemory`
        // contract).
        let entry = unsafe { self.host.as_ptr().add(16 * i as usize) };
        if ALIGNED {
            // SAFETY: 16 valid bytes, 8-aligned because the table is: a `RawDesc`, whose
            // fields are atomics, so a shared reference to memory the peer may write is
            // sound.
            unsafe { &*entry.cast::<RawDesc>() }.read()
        } else {
            // SAFETY: 16 valid bytes (see above).
            unsafe { read_unaligned_desc(entry) }
        }
    }
}

/// Adds one descriptor's buffer to a chain being popped: direction order, total length,
/// bounds, then the sink.
#[inline(always)]
pub(crate) fn push_segment<'m, M: GuestMemory + ?Sized, S: SegmentSink<'m>>(
    mem: &'m M,
    addr: u64,
    len: u32,
    writable: bool,
    chain: &mut Chain,
    segs: &mut S,
) -> Result<(), DeviceError> {
    if !writable && chain.writable_segments > 0 {
        return Err(DeviceError::ReadableAfterWritable);
    }
    // Lengths first: an overflowing chain is reported as such, whatever its addresses.
    chain.add(len, writable)?;
    let host = mem.translate(addr, len as u64).ok_or(DeviceError::AddressOutOfRange { addr, len: len as u64 })?;
    // SAFETY: translated for `len` bytes; `GuestMemory` keeps it valid while `mem` is
    // borrowed, i.e. for 'm.
    let seg = unsafe { Segment::new(host, addr, len, writable) };
    if segs.push(seg) {
        Ok(())
    } else {
        Err(DeviceError::SinkFull)
    }
}

/// A chain of one direct descriptor, the common case, without the walk's per-segment
/// bookkeeping: a single length cannot overflow, nor be readable after a writable one.
#[inline(always)]
pub(crate) fn single_segment<'m, M: GuestMemory + ?Sized, S: SegmentSink<'m>>(
    mem: &'m M,
    id: u16,
    addr: u64,
    len: u32,
    writable: bool,
    segs: &mut S,
) -> Result<Chain, DeviceError> {
    if !segs.push(translate_one(mem, addr, len, writable)?) {
        return Err(DeviceError::SinkFull);
    }
    Ok(Chain::single(id, len, writable))
}

/// [`single_segment`] without a sink: the chain and its one segment. Each is built
/// where it is returned, not from a tuple made inside: the compiler assembled such a
/// tuple on the stack with 4- and 8-byte stores and read the chain back with a load
/// spanning two of them, which cannot be forwarded and stalled every `pop`.
#[inline(always)]
pub(crate) fn one_segment<'m, M: GuestMemory + ?Sized>(
    mem: &'m M,
    id: u16,
    addr: u64,
    len: u32,
    writable: bool,
) -> Result<(Chain, Segment<'m>), DeviceError> {
    let seg = translate_one(mem, addr, len, writable)?;
    Ok((Chain::single(id, len, writable), seg))
}

/// One descriptor's buffer, translated and bounds-checked.
#[inline(always)]
fn translate_one<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: u64,
    len: u32,
    writable: bool,
) -> Result<Segment<'_>, DeviceError> {
    let host = mem.translate(addr, len as u64).ok_or(DeviceError::AddressOutOfRange { addr, len: len as u64 })?;
    // SAFETY: translated for `len` bytes; `GuestMemory` keeps it valid while `mem` is
    // borrowed.
    Ok(unsafe { Segment::new(host, addr, len, writable) })
}

/// In-order completions not yet written: consecutive buffers the device finished, to be
/// returned with one used entry that names the last (VIRTIO 1.3, 2.7.9 and 2.8.21).
///
/// Every field is 32 bits wide. `complete` updates them one at a time and `publish` reads
/// them right after; the compiler may read a 16-bit field with a 32-bit load, which cannot
/// be forwarded from the 16-bit store before it and stalls.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InOrderRun {
    /// Split: used index of the run's first buffer. Packed: its position and wrap counter
    /// (a packed `Cursor`'s bits).
    pub first: u32,
    /// The last buffer's id (16 bits).
    pub last_id: u32,
    pub last_len: u32,
    /// Buffers in the run; 0 when there is none (not an `Option`: the compiler kept the
    /// fields of one in registers only by merging every one of them at each update).
    pub count: u32,
}

impl InOrderRun {
    pub const EMPTY: Self = Self { first: 0, last_id: 0, last_len: 0, count: 0 };

    /// Adds a completion of `len` bytes to buffer `id`; `first` is where the run starts if
    /// this is its first buffer. Returns the buffers in the run.
    #[inline(always)]
    pub fn add(&mut self, first: u32, id: u16, len: u32) -> u32 {
        if self.count == 0 {
            self.first = first;
        }
        self.last_id = id as u32;
        self.last_len = len;
        self.count += 1;
        self.count
    }

    /// The run, if it holds any buffer, leaving it empty.
    #[inline(always)]
    pub fn take(&mut self) -> Option<Self> {
        if self.count == 0 {
            return None;
        }
        let run = *self;
        self.count = 0;
        Some(run)
    }
}

/// One segment of a popped chain, translated to host memory and bounds-checked once.
///
/// It borrows the guest memory for `'m`, so it cannot outlive the mapping it points into.
/// The driver may change the bytes at any time (they are its memory); the accessors copy
/// in and out and never hand out references into guest memory.
#[derive(Clone, Copy)]
pub struct Segment<'m> {
    host: NonNull<u8>,
    addr: u64,
    len: u32,
    writable: bool,
    _memory: PhantomData<&'m [u8]>,
}

// SAFETY: a segment is an address range in guest memory that the `GuestMemory` contract
// keeps valid for `'m`, whichever thread uses it; all accesses are copies.
unsafe impl Send for Segment<'_> {}
// SAFETY: as above.
unsafe impl Sync for Segment<'_> {}

impl<'m> Segment<'m> {
    /// # Safety
    ///
    /// `host` is valid for reads and writes of `len` bytes for `'m`.
    pub(crate) unsafe fn new(host: NonNull<u8>, addr: u64, len: u32, writable: bool) -> Self {
        Self { host, addr, len, writable, _memory: PhantomData }
    }

    /// Guest address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the segment is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the driver marked it device-writable.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Host address of the first byte, for zero-copy I/O (e.g. `preadv` into the guest).
    /// Valid for `len` bytes for `'m`.
    pub fn host_ptr(&self) -> *mut u8 {
        self.host.as_ptr()
    }

    /// Copies bytes from the segment, starting `offset` bytes in, into `buf`. Returns the
    /// count copied (short at the segment's end).
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> usize {
        let n = buf.len().min((self.len as usize).saturating_sub(offset));
        if n > 0 {
            // SAFETY: `offset + n <= len`, and the segment is valid for `len` bytes (see
            // `new`); `buf` is ours and cannot overlap guest memory we do not own.
            unsafe { core::ptr::copy_nonoverlapping(self.host.as_ptr().add(offset), buf.as_mut_ptr(), n) };
        }
        n
    }

    /// Copies `data` into the segment at `offset`. Returns the count copied (short at the
    /// segment's end). Writing a device-readable segment is allowed here; the device
    /// decides what its protocol permits.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> usize {
        let n = data.len().min((self.len as usize).saturating_sub(offset));
        if n > 0 {
            // SAFETY: as in `read_at`.
            unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), self.host.as_ptr().add(offset), n) };
        }
        n
    }
}

impl fmt::Debug for Segment<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("writable", &self.writable)
            .finish()
    }
}

/// Where `pop` collects a chain's segments: readable ones first, then writable ones.
pub trait SegmentSink<'m> {
    /// Empties the sink.
    fn clear(&mut self);
    /// Appends a segment; false if the sink is full.
    fn push(&mut self, seg: Segment<'m>) -> bool;
}

/// A fixed-capacity segment list that needs no allocation.
pub struct Segments<'m, const N: usize> {
    /// Entries at `len..` are unused placeholders.
    segs: [Segment<'m>; N],
    len: usize,
}

impl<'m, const N: usize> Default for Segments<'m, N> {
    fn default() -> Self {
        // An empty segment: never read, and its pointer is never dereferenced (len 0).
        let empty = Segment { host: NonNull::dangling(), addr: 0, len: 0, writable: false, _memory: PhantomData };
        Self { segs: [empty; N], len: 0 }
    }
}

impl<'m, const N: usize> Segments<'m, N> {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// The collected segments.
    pub fn iter(&self) -> impl Iterator<Item = &Segment<'m>> {
        self.segs[..self.len].iter()
    }

    /// The collected segments, as a slice.
    pub fn as_slice(&self) -> &[Segment<'m>] {
        &self.segs[..self.len]
    }

    /// Number collected.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<'m, const N: usize> SegmentSink<'m> for Segments<'m, N> {
    #[inline(always)]
    fn clear(&mut self) {
        self.len = 0;
    }

    // Inlined: called out of line, the segment goes through the stack, stored a field at
    // a time and loaded in wider pieces, which the store buffer cannot forward; the load
    // then waits for the ring stores before it to reach the cache.
    #[inline(always)]
    fn push(&mut self, seg: Segment<'m>) -> bool {
        if self.len == N {
            return false;
        }
        self.segs[self.len] = seg;
        self.len += 1;
        true
    }
}

#[cfg(feature = "alloc")]
impl<'m> SegmentSink<'m> for alloc::vec::Vec<Segment<'m>> {
    fn clear(&mut self) {
        alloc::vec::Vec::clear(self);
    }

    fn push(&mut self, seg: Segment<'m>) -> bool {
        alloc::vec::Vec::push(self, seg);
        true
    }
}

/// A chain popped from the available ring, to be completed exactly once.
///
/// It is not `Clone`: completing it consumes it, so a chain cannot be completed twice.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a popped chain must be completed, or the driver never gets its buffer back"]
pub struct Chain {
    pub(crate) id: u16,
    /// Ring descriptors the chain occupies (packed rings skip that many on completion).
    pub(crate) descs: u16,
    readable: u32,
    writable: u32,
    readable_segments: u16,
    writable_segments: u16,
}

impl Chain {
    pub(crate) fn new(id: u16) -> Self {
        Self { id, descs: 0, readable: 0, writable: 0, readable_segments: 0, writable_segments: 0 }
    }

    /// A chain of one descriptor of `len` bytes.
    #[inline(always)]
    pub(crate) fn single(id: u16, len: u32, writable: bool) -> Self {
        let (readable, writable_len) = if writable { (0, len) } else { (len, 0) };
        Self {
            id,
            descs: 1,
            readable,
            writable: writable_len,
            readable_segments: u16::from(!writable),
            writable_segments: u16::from(writable),
        }
    }

    #[inline(always)]
    pub(crate) fn add(&mut self, len: u32, writable: bool) -> Result<(), DeviceError> {
        // The two totals never sum past u32::MAX, so one check of the new sum covers both.
        if self.readable as u64 + self.writable as u64 + len as u64 > u32::MAX as u64 {
            return Err(DeviceError::LengthOverflow);
        }
        if writable {
            self.writable += len;
            self.writable_segments += 1;
        } else {
            self.readable += len;
            self.readable_segments += 1;
        }
        Ok(())
    }

    /// The buffer id (split: the head descriptor index) the driver will see in the used
    /// entry.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Total bytes in readable segments.
    pub fn readable_len(&self) -> u32 {
        self.readable
    }

    /// Total bytes in writable segments: the most a completion may claim to have written.
    pub fn writable_len(&self) -> u32 {
        self.writable
    }

    /// Number of readable segments (they come first in the sink).
    pub fn readable_segments(&self) -> u16 {
        self.readable_segments
    }

    /// Number of writable segments (after the readable ones in the sink).
    pub fn writable_segments(&self) -> u16 {
        self.writable_segments
    }
}

/// A driver mistake (or attack) found while popping, or a local limit.
///
/// All but [`DeviceError::SinkFull`] latch the queue broken (the spec's
/// `DEVICE_NEEDS_RESET` situation): the ring can no longer be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceError {
    /// The queue is broken by an earlier error.
    Broken,
    /// The driver moved `avail.idx` by more than the ring size.
    AvailIndexJump {
        /// The index the driver published.
        avail_idx: u16,
        /// Where the device had got to.
        last_avail_idx: u16,
    },
    /// A head (or `next`) index is not below the ring size.
    IndexOutOfRange {
        /// The index.
        index: u32,
    },
    /// A chain is longer than the ring (or its indirect table): a loop, or a bad chain.
    ChainTooLong,
    /// An indirect descriptor inside an indirect table.
    NestedIndirect,
    /// An indirect descriptor that also has `NEXT`, or that is not the chain's head.
    MisplacedIndirect,
    /// An indirect table whose length is zero, not a multiple of 16, or above
    /// [`MAX_INDIRECT_ENTRIES`] entries.
    BadIndirectLength {
        /// The length.
        len: u32,
    },
    /// A buffer (or table, or ring) lies outside guest memory.
    AddressOutOfRange {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The chain's total length does not fit in 32 bits.
    LengthOverflow,
    /// A readable descriptor follows a writable one.
    ReadableAfterWritable,
    /// A ring area is not aligned as the spec requires.
    Misaligned,
    /// The ring size is not valid for the layout.
    InvalidSize,
    /// The packed descriptor's flags are not a valid available descriptor.
    BadDescriptorFlags,
    /// The caller's segment sink is full; the chain stays available (not a driver fault,
    /// does not break the queue). Pop again with a larger sink.
    SinkFull,
    /// A descriptor has `INDIRECT` but `VIRTIO_RING_F_INDIRECT_DESC` was not negotiated,
    /// which the driver must not do (VIRTIO 1.3, 2.7.5.3.1). The device treats it as a
    /// malformed ring rather than guess what the driver meant.
    IndirectNotNegotiated,
    /// The features select another layout than the queue type's (attach only; the queue
    /// is not created).
    WrongLayout,
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Broken => f.write_str("the queue is broken"),
            Self::AvailIndexJump { avail_idx, last_avail_idx } => {
                write!(f, "driver moved the available index to {avail_idx}, more than a ring ahead of {last_avail_idx}")
            }
            Self::IndexOutOfRange { index } => write!(f, "descriptor index {index} is out of range"),
            Self::ChainTooLong => f.write_str("descriptor chain is longer than the ring (a loop?)"),
            Self::NestedIndirect => f.write_str("indirect descriptor inside an indirect table"),
            Self::MisplacedIndirect => f.write_str("indirect descriptor with NEXT, or not at the head of a chain"),
            Self::BadIndirectLength { len } => {
                write!(f, "indirect table length {len} is not a positive multiple of 16")
            }
            Self::AddressOutOfRange { addr, len } => {
                write!(f, "guest range {addr:#x}+{len:#x} is outside guest memory")
            }
            Self::LengthOverflow => f.write_str("descriptor chain length overflows 32 bits"),
            Self::ReadableAfterWritable => f.write_str("readable descriptor after a writable one"),
            Self::Misaligned => f.write_str("ring area is misaligned"),
            Self::InvalidSize => f.write_str("invalid queue size"),
            Self::BadDescriptorFlags => f.write_str("descriptor flags are not a valid available descriptor"),
            Self::SinkFull => f.write_str("segment sink is full"),
            Self::IndirectNotNegotiated => f.write_str("indirect descriptor without INDIRECT_DESC negotiated"),
            Self::WrongLayout => f.write_str("the negotiated features select another ring layout"),
        }
    }
}

impl core::error::Error for DeviceError {}

/// Longest indirect table accepted. The spec sets no bound; this one keeps a hostile table
/// from costing more than a few hundred microseconds to walk.
pub const MAX_INDIRECT_ENTRIES: u32 = 65535;
