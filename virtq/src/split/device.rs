//! The device half of the split ring (the role of Linux's vringh).
//!
//! Everything the driver wrote is untrusted: each shared field is loaded once, into a
//! local, and validated before use. A malformed ring gives a [`DeviceError`] and latches
//! the queue broken; no driver input can make the device read or write outside guest
//! memory, loop, or panic.

use super::{SplitRing, AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY};
use crate::device::{
    push_segment, single_segment, translate_area, Chain, DeviceConfig, DeviceError, InOrderRun, SegmentSink,
};
use crate::event::need_event;
use crate::memory::GuestMemory;
use crate::shared::{DescWords, RawDesc};
use crate::{Barriers, Features};

/// Longest indirect table accepted. The spec sets no bound; this one keeps a hostile table
/// from costing more than a few hundred microseconds to walk.
pub const MAX_INDIRECT_ENTRIES: u32 = 65535;

/// The device's end of a split virtqueue, borrowing guest memory for `'m`.
pub struct SplitDevice<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    ring: SplitRing,
    size: u16,
    event_idx: bool,
    in_order: bool,
    barriers: Barriers,
    last_avail_idx: u16,
    /// The last `avail.idx` read and validated; entries before it need no new fence.
    avail_idx_cache: u16,
    /// Next used index to hand out (entries up to it are written or in `run`).
    used_idx: u16,
    /// What `used.idx` holds in memory.
    published_used_idx: u16,
    /// `used.idx` at the last interrupt decision (vringh's `last_used_idx`).
    signalled_used_idx: u16,
    /// Completions since the last interrupt decision: past 0xffff the event window aliases.
    unsignalled: u32,
    used_flags_shadow: u16,
    run: Option<InOrderRun>,
    fault: Option<DeviceError>,
}

impl<'m, M: GuestMemory + ?Sized> SplitDevice<'m, M> {
    /// Attaches to a ring the driver set up. The three areas are translated and checked
    /// once here; the queue keeps the host pointers for `'m`.
    ///
    /// `used.idx` is read from memory, so a device that reconnects to a running ring
    /// continues where the previous one stopped.
    pub fn new(mem: &'m M, config: DeviceConfig) -> Result<Self, DeviceError> {
        let size = config.size;
        if !super::valid_size(size) || config.features.contains(Features::RING_PACKED) {
            return Err(DeviceError::InvalidSize);
        }
        let desc = translate_area(mem, config.desc_addr, super::desc_table_bytes(size), super::DESC_ALIGN)?;
        let avail = translate_area(mem, config.avail_addr, super::avail_bytes(size), super::AVAIL_ALIGN)?;
        let used = translate_area(mem, config.used_addr, super::used_bytes(size), super::USED_ALIGN)?;
        // SAFETY: each area was translated for its full length with the spec's alignment,
        // and `GuestMemory` keeps the pointers valid while `mem` is borrowed, i.e. for 'm.
        let ring = unsafe { SplitRing::new(desc, avail, used, size) };
        let used_idx = ring.used_idx().load();
        Ok(Self {
            mem,
            size,
            event_idx: config.features.contains(Features::EVENT_IDX),
            in_order: config.features.contains(Features::IN_ORDER),
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
            run: None,
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
    #[inline(always)]
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
            // (`SplitLayout::add`).
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

    #[inline(always)]
    fn walk<S: SegmentSink<'m>>(&self, head: u16, segs: &mut S) -> Result<Chain, DeviceError> {
        let mut d = self.ring.desc(head).read();
        if d.lo16 & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 {
            return single_segment(self.mem, head, d.addr, d.len, d.lo16 & DESC_F_WRITE != 0, segs);
        }
        let mut chain = Chain::new(head);
        for n in 0..self.size {
            if n > 0 {
                d = self.ring.desc(d.hi16).read();
            }
            let flags = d.lo16;
            if flags & DESC_F_INDIRECT != 0 {
                if n != 0 || flags & DESC_F_NEXT != 0 {
                    return Err(DeviceError::MisplacedIndirect);
                }
                self.walk_indirect(d, &mut chain, segs)?;
                return Ok(chain);
            }
            push_segment(self.mem, d.addr, d.len, flags & DESC_F_WRITE != 0, &mut chain, segs)?;
            if flags & DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            if d.hi16 >= self.size {
                return Err(DeviceError::IndexOutOfRange { index: d.hi16 as u32 });
            }
        }
        // A ring of `size` descriptors holds chains of at most `size`.
        Err(DeviceError::ChainTooLong)
    }

    fn walk_indirect<S: SegmentSink<'m>>(
        &self,
        table: DescWords,
        chain: &mut Chain,
        segs: &mut S,
    ) -> Result<(), DeviceError> {
        if table.len == 0 || !table.len.is_multiple_of(16) || table.len / 16 > MAX_INDIRECT_ENTRIES {
            return Err(DeviceError::BadIndirectLength { len: table.len });
        }
        let entries = table.len / 16;
        let host = translate_area(self.mem, table.addr, table.len as usize, 8)?;
        let mut i = 0u32;
        for _ in 0..entries {
            // SAFETY: `i < entries` and the table was translated for `16 * entries` bytes,
            // 8-aligned, valid for 'm (the `GuestMemory` contract).
            let d = unsafe { &*host.as_ptr().cast::<RawDesc>().add(i as usize) }.read();
            if d.lo16 & DESC_F_INDIRECT != 0 {
                return Err(DeviceError::NestedIndirect);
            }
            push_segment(self.mem, d.addr, d.len, d.lo16 & DESC_F_WRITE != 0, chain, segs)?;
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

    /// Returns a chain to the driver with the number of bytes written into its writable
    /// part (clamped to that part's length). The used index is published by
    /// [`Self::publish_used`] or [`Self::needs_notification`], so completions batch.
    ///
    /// With `IN_ORDER`, consecutive completions that filled their whole writable part are
    /// merged into one used entry naming the last of them (VIRTIO 1.3, 2.7.9); chains must
    /// then be completed in the order they were popped.
    #[doc(alias = "vringh_complete_kern")]
    #[inline(always)]
    pub fn complete(&mut self, chain: Chain, written: u32) {
        let written = written.min(chain.writable_len());
        if self.in_order {
            if let Some(run) = &mut self.run {
                run.last_id = chain.id as u32;
                run.last_len = written;
                run.count += 1;
            } else {
                self.run = Some(InOrderRun {
                    first: self.used_idx as u32,
                    last_id: chain.id as u32,
                    last_len: written,
                    count: 1,
                });
            }
            if written != chain.writable_len() {
                // The driver gives earlier buffers of a batch their full length; a short
                // one must end its batch.
                self.flush_run();
            }
        } else {
            self.write_used(self.used_idx, chain.id, written);
        }
        self.used_idx = self.used_idx.wrapping_add(1);
        self.unsignalled += 1;
    }

    #[inline(always)]
    fn write_used(&self, idx: u16, id: u16, len: u32) {
        let (id_field, len_field) = self.ring.used_elem(idx);
        id_field.store(id as u32);
        len_field.store(len);
    }

    #[inline(always)]
    fn flush_run(&mut self) {
        // Test before taking: `take` would store `None` on every publish.
        if self.run.is_some() {
            if let Some(run) = self.run.take() {
                self.write_used(run.first as u16, run.last_id as u16, run.last_len);
            }
        }
    }

    /// Makes every completion so far visible to the driver.
    #[inline(always)]
    pub fn publish_used(&mut self) {
        self.flush_run();
        if self.used_idx != self.published_used_idx {
            // The used entries before the index that publishes them; pairs with the
            // driver's rmb after it reads `used.idx` (`SplitLayout::get_buf`).
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
        // (`DriverQueue::poll`, `SplitLayout::get_buf`, `enable_cb_delayed`).
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
    /// available (or the queue is broken), in which case the device must not sleep: their
    /// kick may never come.
    #[doc(alias = "vringh_notify_enable_kern")]
    pub fn enable_notifications(&mut self) -> bool {
        // A device about to sleep must not keep completions back.
        self.publish_used();
        if self.event_idx {
            self.ring.avail_event().store(self.last_avail_idx);
        } else if self.used_flags_shadow != 0 {
            self.used_flags_shadow = 0;
            self.ring.used_flags().store(0);
        }
        // The event (or flag) store before re-reading `avail.idx`; pairs with the driver's
        // mb between publishing `avail.idx` and reading `avail_event` / `used.flags`
        // (`SplitLayout::kick_prepare`).
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
    pub fn avail_base(&self) -> u16 {
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
