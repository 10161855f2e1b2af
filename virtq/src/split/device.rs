//! The device half of the split ring (the role of Linux's vringh).
//!
//! Everything the driver wrote is untrusted: each shared field is loaded once, into a
//! local, and validated before use. A malformed ring gives a [`DeviceError`] and latches
//! the queue broken; no driver input can make the device read or write outside guest
//! memory, loop, or panic.

use core::ptr::NonNull;

use super::{SplitRing, AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY};
use crate::device::{Chain, DeviceError, Segment, SegmentSink};
use crate::event::need_event;
use crate::memory::GuestMemory;
use crate::shared::{DescWords, RawDesc};
use crate::{Barriers, Features};

/// Longest indirect table accepted. The spec sets no bound; this one keeps a hostile table
/// from costing more than a few hundred microseconds to walk.
pub const MAX_INDIRECT_ENTRIES: u32 = 65535;

/// Where a split ring lives in guest memory and what was negotiated for it.
#[derive(Clone, Copy, Debug)]
pub struct DeviceConfig {
    /// Number of ring entries (a power of two).
    pub size: u16,
    /// Negotiated features (`EVENT_IDX` and `ORDER_PLATFORM` matter here).
    pub features: Features,
    /// Guest address of the descriptor table.
    pub desc_addr: u64,
    /// Guest address of the available ring.
    pub avail_addr: u64,
    /// Guest address of the used ring.
    pub used_addr: u64,
    /// First available entry to process (vhost-user `SET_VRING_BASE`); 0 for a new ring.
    pub avail_base: u16,
}

/// The device's end of a split virtqueue, borrowing guest memory for `'m`.
pub struct SplitDevice<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    ring: SplitRing,
    size: u16,
    event_idx: bool,
    barriers: Barriers,
    last_avail_idx: u16,
    /// The last `avail.idx` read and validated; entries before it need no new fence.
    avail_idx_cache: u16,
    /// Next used entry to write.
    used_idx: u16,
    /// What `used.idx` holds in memory.
    published_used_idx: u16,
    /// `used.idx` at the last interrupt decision (vringh's `last_used_idx`).
    signalled_used_idx: u16,
    /// Completions since the last interrupt decision: past 0xffff the event window aliases.
    unsignalled: u32,
    used_flags_shadow: u16,
    fault: Option<DeviceError>,
}

fn translate<M: GuestMemory + ?Sized>(mem: &M, addr: u64, len: usize, align: u64) -> Result<NonNull<u8>, DeviceError> {
    if addr % align != 0 {
        return Err(DeviceError::Misaligned);
    }
    let host = mem.translate(addr, len as u64).ok_or(DeviceError::AddressOutOfRange { addr, len: len as u64 })?;
    if host.as_ptr() as u64 % align != 0 {
        return Err(DeviceError::Misaligned);
    }
    Ok(host)
}

impl<'m, M: GuestMemory + ?Sized> SplitDevice<'m, M> {
    /// Attaches to a ring the driver set up. The three areas are translated and checked
    /// once here; the queue keeps the host pointers for `'m`.
    ///
    /// `used.idx` is read from memory, so a device that reconnects to a running ring
    /// continues where the previous one stopped.
    pub fn new(mem: &'m M, config: DeviceConfig) -> Result<Self, DeviceError> {
        let size = config.size;
        if !super::valid_size(size) {
            return Err(DeviceError::InvalidSize);
        }
        let desc = translate(mem, config.desc_addr, super::desc_table_bytes(size), super::DESC_ALIGN)?;
        let avail = translate(mem, config.avail_addr, super::avail_bytes(size), super::AVAIL_ALIGN)?;
        let used = translate(mem, config.used_addr, super::used_bytes(size), super::USED_ALIGN)?;
        // SAFETY: each area was translated for its full length with the spec's alignment,
        // and `GuestMemory` keeps the pointers valid while `mem` is borrowed, i.e. for 'm.
        let ring = unsafe { SplitRing::new(desc, avail, used, size) };
        let used_idx = ring.used_idx().load();
        Ok(Self {
            mem,
            size,
            event_idx: config.features.contains(Features::EVENT_IDX),
            barriers: if config.features.contains(Features::ORDER_PLATFORM) {
                Barriers::Strong
            } else {
                Barriers::Weak
            },
            last_avail_idx: config.avail_base,
            avail_idx_cache: config.avail_base,
            used_idx,
            published_used_idx: used_idx,
            signalled_used_idx: used_idx,
            unsignalled: 0,
            used_flags_shadow: ring.used_flags().load(),
            fault: None,
            ring,
        })
    }

    fn fail(&mut self, e: DeviceError) -> DeviceError {
        if e != DeviceError::SinkFull {
            self.fault.get_or_insert(e);
        }
        e
    }

    /// Pops the next available chain, collecting its segments (readable first) into
    /// `segs`. `Ok(None)` when the ring is empty.
    #[doc(alias = "vringh_getdesc_kern")]
    pub fn pop<S: SegmentSink<'m>>(&mut self, segs: &mut S) -> Result<Option<Chain>, DeviceError> {
        if self.fault.is_some() {
            return Err(DeviceError::Broken);
        }
        if self.last_avail_idx == self.avail_idx_cache {
            let avail_idx = self.ring.avail_idx().load();
            if avail_idx == self.last_avail_idx {
                return Ok(None);
            }
            if avail_idx.wrapping_sub(self.last_avail_idx) > self.size {
                return Err(self.fail(DeviceError::AvailIndexJump { avail_idx, last_avail_idx: self.last_avail_idx }));
            }
            self.avail_idx_cache = avail_idx;
            // Read the ring entries and descriptors only after the index that published
            // them; pairs with the driver's wmb before its `avail.idx` store
            // (`SplitDriver::add`).
            self.barriers.rmb();
        }
        let head = self.ring.avail_ring(self.last_avail_idx).load();
        if head >= self.size {
            return Err(self.fail(DeviceError::IndexOutOfRange { index: head as u32 }));
        }
        segs.clear();
        match self.walk(head, segs) {
            Ok(chain) => {
                self.last_avail_idx = self.last_avail_idx.wrapping_add(1);
                Ok(Some(chain))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn walk<S: SegmentSink<'m>>(&self, head: u16, segs: &mut S) -> Result<Chain, DeviceError> {
        let mut chain = Chain::new(head, 1);
        let mut seen_writable = false;
        let mut i = head;
        for n in 0..self.size {
            let d = self.ring.desc(i).read();
            let flags = d.lo16;
            if flags & DESC_F_INDIRECT != 0 {
                if n != 0 || flags & DESC_F_NEXT != 0 {
                    return Err(DeviceError::MisplacedIndirect);
                }
                self.walk_indirect(d, &mut chain, segs)?;
                return Ok(chain);
            }
            self.push(d, &mut seen_writable, &mut chain, segs)?;
            if flags & DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            if d.hi16 >= self.size {
                return Err(DeviceError::IndexOutOfRange { index: d.hi16 as u32 });
            }
            i = d.hi16;
        }
        Err(DeviceError::ChainTooLong)
    }

    fn walk_indirect<S: SegmentSink<'m>>(
        &self,
        table: DescWords,
        chain: &mut Chain,
        segs: &mut S,
    ) -> Result<(), DeviceError> {
        if table.len == 0 || table.len % 16 != 0 || table.len / 16 > MAX_INDIRECT_ENTRIES {
            return Err(DeviceError::BadIndirectLength { len: table.len });
        }
        let entries = table.len / 16;
        let host = translate(self.mem, table.addr, table.len as usize, 8)?;
        let mut seen_writable = false;
        let mut i = 0u32;
        for _ in 0..entries {
            // SAFETY: `i < entries` and the table was translated for `16 * entries` bytes,
            // 8-aligned, valid for 'm (the `GuestMemory` contract).
            let d = unsafe { &*host.as_ptr().cast::<RawDesc>().add(i as usize) }.read();
            if d.lo16 & DESC_F_INDIRECT != 0 {
                return Err(DeviceError::NestedIndirect);
            }
            self.push(d, &mut seen_writable, chain, segs)?;
            if d.lo16 & DESC_F_NEXT == 0 {
                return Ok(());
            }
            if d.hi16 as u32 >= entries {
                return Err(DeviceError::IndexOutOfRange { index: d.hi16 as u32 });
            }
            i = d.hi16 as u32;
        }
        Err(DeviceError::ChainTooLong)
    }

    #[inline]
    fn push<S: SegmentSink<'m>>(
        &self,
        d: DescWords,
        seen_writable: &mut bool,
        chain: &mut Chain,
        segs: &mut S,
    ) -> Result<(), DeviceError> {
        let writable = d.lo16 & DESC_F_WRITE != 0;
        if writable {
            *seen_writable = true;
        } else if *seen_writable {
            return Err(DeviceError::ReadableAfterWritable);
        }
        // Lengths first: an overflowing chain is reported as such, whatever its addresses.
        chain.add(d.len, writable)?;
        let host = self
            .mem
            .translate(d.addr, d.len as u64)
            .ok_or(DeviceError::AddressOutOfRange { addr: d.addr, len: d.len as u64 })?;
        // SAFETY: translated for `d.len` bytes; `GuestMemory` keeps it valid for 'm.
        let seg = unsafe { Segment::new(host, d.addr, d.len, writable) };
        if segs.push(seg) {
            Ok(())
        } else {
            Err(DeviceError::SinkFull)
        }
    }

    /// Returns a chain to the driver with the number of bytes written into its writable
    /// part (clamped to that part's length). The used index is published by
    /// [`Self::publish_used`] or [`Self::needs_notification`], so completions batch.
    #[doc(alias = "vringh_complete_kern")]
    pub fn complete(&mut self, chain: Chain, written: u32) {
        let (id, len) = self.ring.used_elem(self.used_idx);
        id.store(chain.id as u32);
        len.store(written.min(chain.writable_len()));
        self.used_idx = self.used_idx.wrapping_add(1);
        self.unsignalled += 1;
    }

    /// Makes every completion so far visible to the driver.
    pub fn publish_used(&mut self) {
        if self.used_idx != self.published_used_idx {
            // The used entries before the index that publishes them; pairs with the
            // driver's rmb after it reads `used.idx` (`SplitDriver::get_buf_ctx`).
            self.barriers.wmb();
            self.ring.used_idx().store(self.used_idx);
            self.published_used_idx = self.used_idx;
        }
    }

    /// Publishes completions and says whether the driver wants an interrupt for them
    /// (`used_event` with `EVENT_IDX`, else the `NO_INTERRUPT` flag).
    #[doc(alias = "vringh_need_notify_kern")]
    pub fn needs_notification(&mut self) -> bool {
        self.publish_used();
        if self.unsignalled == 0 {
            return false;
        }
        // The `used.idx` store before reading the driver's event or flags; pairs with the
        // driver's mb between writing `used_event` and re-reading `used.idx`
        // (`SplitDriver::poll`, `get_buf_ctx`, `enable_cb_delayed`).
        self.barriers.mb();
        let old = self.signalled_used_idx;
        let new = self.used_idx;
        let forced = self.unsignalled > 0xffff;
        self.signalled_used_idx = new;
        self.unsignalled = 0;
        if self.event_idx {
            forced || need_event(self.ring.used_event().load(), new, old)
        } else {
            self.ring.avail_flags().load() & AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Asks the driver to kick on new buffers. Returns true if buffers are already
    /// available, in which case the device must not sleep: their kick may never come.
    #[doc(alias = "vringh_notify_enable_kern")]
    pub fn enable_notifications(&mut self) -> bool {
        if self.event_idx {
            self.ring.avail_event().store(self.last_avail_idx);
        } else if self.used_flags_shadow != 0 {
            self.used_flags_shadow = 0;
            self.ring.used_flags().store(0);
        }
        // The event (or flag) store before re-reading `avail.idx`; pairs with the driver's
        // mb between publishing `avail.idx` and reading `avail_event` / `used.flags`
        // (`SplitDriver::kick_prepare`).
        self.barriers.mb();
        self.fault.is_some() || self.ring.avail_idx().load() != self.last_avail_idx
    }

    /// Asks the driver not to kick (a hint; with `EVENT_IDX` a stale `avail_event`
    /// already keeps kicks away).
    #[doc(alias = "vringh_notify_disable_kern")]
    pub fn disable_notifications(&mut self) {
        if !self.event_idx && self.used_flags_shadow != USED_F_NO_NOTIFY {
            self.used_flags_shadow = USED_F_NO_NOTIFY;
            self.ring.used_flags().store(USED_F_NO_NOTIFY);
        }
    }

    /// Number of ring entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The next available entry to process (vhost-user `GET_VRING_BASE`).
    pub fn last_avail_idx(&self) -> u16 {
        self.last_avail_idx
    }

    /// The next used entry to be written.
    pub fn used_idx(&self) -> u16 {
        self.used_idx
    }

    /// The driver error that broke the queue, if any.
    pub fn fault(&self) -> Option<DeviceError> {
        self.fault
    }

    /// Whether the queue is broken.
    pub fn is_broken(&self) -> bool {
        self.fault.is_some()
    }

    /// The guest memory this queue uses.
    pub fn memory(&self) -> &'m M {
        self.mem
    }
}
