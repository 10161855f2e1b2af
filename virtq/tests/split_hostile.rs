//! A hostile peer on either side of a split ring: the queue reports a clear error, latches
//! broken, loses nothing, and never panics or touches memory it should not.

mod common;

use common::Pair;
use virtq::split::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use virtq::testing::TestMemory;
use virtq::{DeviceConfig, DeviceError, Fault, Features, Segments, SplitDevice};

// ---------------------------------------------------------------------------------------
// Hostile device, driver side.

/// Adds three buffers, returns a pair ready for a forged used entry.
fn three_in_flight(mem: &TestMemory) -> Pair<'_> {
    let mut p = Pair::with(mem, 4, true, false);
    p.driver.add_inbuf(&[mem.alloc_sg(8)], 100).unwrap();
    p.driver.add_sgs(&[&[mem.alloc_sg(8)]], &[&[mem.alloc_sg(8)]], 101).unwrap();
    p.driver.add_outbuf(&[mem.alloc_sg(8)], 102).unwrap();
    p
}

/// Writes used entry `slot` and publishes `used.idx = idx`, as a device would.
fn forge_used(p: &Pair<'_>, slot: u16, id: u32, len: u32, idx: u16) {
    p.mem.write_u32(p.used_elem_addr(slot), id);
    p.mem.write_u32(p.used_elem_addr(slot) + 4, len);
    p.mem.write_u16(p.driver.used_addr() + 2, idx);
}

/// The queue is broken with `fault`, and every token comes back exactly once.
fn assert_broken_and_recoverable(p: &mut Pair<'_>, fault: Fault) {
    assert!(p.driver.get_buf().is_none());
    assert!(p.driver.is_broken());
    assert_eq!(p.driver.fault(), Some(fault));
    assert!(p.driver.get_buf().is_none(), "stays broken");
    let e = p.driver.add_inbuf(&[p.mem.alloc_sg(4)], 7).unwrap_err();
    assert_eq!(e.kind, virtq::AddErrorKind::Broken);
    let mut tokens: Vec<u64> = std::iter::from_fn(|| p.driver.detach_unused_buf()).collect();
    tokens.sort();
    assert_eq!(tokens, vec![100, 101, 102]);
    assert_eq!(p.driver.num_free(), 4);
}

#[test]
fn used_id_out_of_range_breaks_the_queue() {
    let mem = TestMemory::new(1 << 20);
    let mut p = three_in_flight(&mem);
    forge_used(&p, 0, 4, 0, 1);
    assert_broken_and_recoverable(&mut p, Fault::UsedIdOutOfRange { id: 4 });
    let mut p = three_in_flight(&mem);
    forge_used(&p, 0, u32::MAX, 0, 1);
    assert_broken_and_recoverable(&mut p, Fault::UsedIdOutOfRange { id: u32::MAX });
}

#[test]
fn used_id_that_is_not_a_head_in_flight_breaks_the_queue() {
    let mem = TestMemory::new(1 << 20);
    // Descriptor 2 is the second descriptor of buffer 101's chain (heads are 0, 1 and 3).
    let mut p = three_in_flight(&mem);
    forge_used(&p, 0, 2, 0, 1);
    assert_broken_and_recoverable(&mut p, Fault::UsedIdNotInFlight { id: 2 });
}

#[test]
fn a_buffer_used_twice_breaks_the_queue() {
    let mem = TestMemory::new(1 << 20);
    let mut p = three_in_flight(&mem);
    forge_used(&p, 0, 0, 8, 1);
    assert_eq!(p.driver.get_buf().map(|u| (u.token, u.len)), Some((100, 8)));
    forge_used(&p, 1, 0, 8, 2);
    assert!(p.driver.get_buf().is_none());
    assert_eq!(p.driver.fault(), Some(Fault::UsedIdNotInFlight { id: 0 }));
    let mut tokens: Vec<u64> = std::iter::from_fn(|| p.driver.detach_unused_buf()).collect();
    tokens.sort();
    assert_eq!(tokens, vec![101, 102]);
}

#[test]
fn used_length_beyond_the_writable_part_breaks_the_queue() {
    let mem = TestMemory::new(1 << 20);
    let mut p = three_in_flight(&mem);
    forge_used(&p, 0, 1, 9, 1);
    assert_broken_and_recoverable(&mut p, Fault::UsedLenTooLong { id: 1, len: 9, writable: 8 });
    // A read-only buffer has no writable part at all.
    let mut p = three_in_flight(&mem);
    forge_used(&p, 0, 3, 1, 1);
    assert_broken_and_recoverable(&mut p, Fault::UsedLenTooLong { id: 3, len: 1, writable: 0 });
}

#[test]
fn used_index_running_ahead_of_the_buffers_in_flight_breaks_the_queue() {
    let mem = TestMemory::new(1 << 20);
    let mut p = three_in_flight(&mem);
    forge_used(&p, 0, 0, 0, 4);
    assert_broken_and_recoverable(&mut p, Fault::UsedIndexRanAhead { used_idx: 4, last_used_idx: 0 });
    // Backwards is "far ahead" in u16 arithmetic.
    let mut p = three_in_flight(&mem);
    forge_used(&p, 0, 0, 0, 0xffff);
    assert_broken_and_recoverable(&mut p, Fault::UsedIndexRanAhead { used_idx: 0xffff, last_used_idx: 0 });
}

#[test]
fn the_driver_frees_chains_by_its_private_links_not_descriptor_memory() {
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::with(&mem, 4, false, false);
    for round in 0..8u64 {
        p.driver.add_sgs(&[&[mem.alloc_sg(8), mem.alloc_sg(8)]], &[&[mem.alloc_sg(8)]], round).unwrap();
        let (chain, _) = p.pop().unwrap();
        // The device scribbles over every descriptor: flags, next and lengths.
        for i in 0..4 {
            mem.write_u64(p.desc_addr(i) + 8, 0xffff_ffff_ffff_ffff);
        }
        p.device.complete(chain, 8);
        p.device.publish_used();
        assert_eq!(p.driver.get_buf().map(|u| u.token), Some(round));
        assert_eq!(p.driver.num_free(), 4);
        assert!(!p.driver.is_broken());
    }
}

// ---------------------------------------------------------------------------------------
// Hostile driver, device side.

/// A split ring written by hand, as a hostile driver would.
struct HandRing<'m> {
    mem: &'m TestMemory,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    features: Features,
}

impl<'m> HandRing<'m> {
    fn new(mem: &'m TestMemory, size: u16) -> Self {
        let desc = mem.alloc(16 * size as usize, 16).unwrap();
        let avail = mem.alloc(6 + 2 * size as usize, 2).unwrap();
        let used = mem.alloc(6 + 8 * size as usize, 4).unwrap();
        Self { mem, size, desc, avail, used, features: Features::VERSION_1 | Features::INDIRECT_DESC }
    }

    fn config(&self) -> DeviceConfig {
        DeviceConfig::new(self.size, self.features, self.desc, self.avail, self.used)
    }

    fn device(&self) -> SplitDevice<'m, TestMemory> {
        SplitDevice::new(self.mem, self.config()).unwrap()
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(self.mem, self.desc + 16 * i as u64, addr, len, flags, next);
    }

    /// Publishes `heads` as the next available entries starting at index `from`.
    fn publish(&self, from: u16, heads: &[u16]) {
        for (k, &h) in heads.iter().enumerate() {
            let idx = from.wrapping_add(k as u16);
            self.mem.write_u16(self.avail + 4 + 2 * (idx % self.size) as u64, h);
        }
        self.mem.write_u16(self.avail + 2, from.wrapping_add(heads.len() as u16));
    }

    fn buf(&self, len: u32) -> u64 {
        self.mem.alloc(len as usize, 8).unwrap()
    }
}

fn write_desc(mem: &TestMemory, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    mem.write_u64(at, addr);
    mem.write_u32(at + 8, len);
    mem.write_u16(at + 12, flags);
    mem.write_u16(at + 14, next);
}

/// Pops once expecting `expected`, then checks the queue latched broken.
fn assert_pop_fails(ring: &HandRing<'_>, expected: DeviceError) {
    let mut device = ring.device();
    let mut segs = Segments::<16>::new();
    assert_eq!(device.pop(&mut segs).unwrap_err(), expected);
    assert_eq!(device.fault(), Some(expected));
    assert_eq!(device.pop(&mut segs).unwrap_err(), DeviceError::Broken);
    assert!(device.enable_notifications(), "a broken device must not go to sleep waiting");
}

#[test]
fn descriptor_loop_is_caught() {
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 4);
    let b = ring.buf(8);
    ring.desc(0, b, 8, DESC_F_NEXT, 1);
    ring.desc(1, b, 8, DESC_F_NEXT, 0);
    ring.publish(0, &[0]);
    assert_pop_fails(&ring, DeviceError::ChainTooLong);
    // A self-loop too.
    let ring = HandRing::new(&mem, 4);
    ring.desc(2, b, 8, DESC_F_NEXT, 2);
    ring.publish(0, &[2]);
    assert_pop_fails(&ring, DeviceError::ChainTooLong);
}

#[test]
fn a_chain_of_exactly_the_ring_size_is_fine() {
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 4);
    let b = ring.buf(8);
    for i in 0..4 {
        ring.desc(i, b, 8, if i < 3 { DESC_F_NEXT } else { 0 }, i + 1);
    }
    ring.publish(0, &[0]);
    let mut device = ring.device();
    let mut segs = Segments::<4>::new();
    let chain = device.pop(&mut segs).unwrap().unwrap();
    assert_eq!((segs.len(), chain.readable_len()), (4, 32));
}

#[test]
fn head_and_next_indices_out_of_range_are_caught() {
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 4);
    ring.publish(0, &[4]);
    assert_pop_fails(&ring, DeviceError::IndexOutOfRange { index: 4 });
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, ring.buf(8), 8, DESC_F_NEXT, 0xffff);
    ring.publish(0, &[0]);
    assert_pop_fails(&ring, DeviceError::IndexOutOfRange { index: 0xffff });
}

#[test]
fn avail_index_jumping_more_than_the_ring_is_caught() {
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, ring.buf(8), 8, 0, 0);
    ring.mem.write_u16(ring.avail + 2, 5);
    assert_pop_fails(&ring, DeviceError::AvailIndexJump { avail_idx: 5, last_avail_idx: 0 });
    // Exactly a ring's worth is legal.
    let ring = HandRing::new(&mem, 4);
    let b = ring.buf(8);
    for i in 0..4 {
        ring.desc(i, b, 8, 0, 0);
    }
    ring.publish(0, &[0, 1, 2, 3]);
    let mut device = ring.device();
    let mut segs = Segments::<1>::new();
    for _ in 0..4 {
        let chain = device.pop(&mut segs).unwrap().unwrap();
        device.complete(chain, 0);
    }
    assert!(device.pop(&mut segs).unwrap().is_none());
}

#[test]
fn nested_indirect_and_bad_indirect_lengths_are_caught() {
    let mem = TestMemory::new(1 << 20);
    let b = mem.alloc(64, 8).unwrap();
    let table = mem.alloc(48, 16).unwrap();
    write_desc(&mem, table, b, 8, DESC_F_NEXT, 1);
    write_desc(&mem, table + 16, table, 32, DESC_F_INDIRECT, 0);
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, table, 32, DESC_F_INDIRECT, 0);
    ring.publish(0, &[0]);
    assert_pop_fails(&ring, DeviceError::NestedIndirect);

    for len in [0, 15, 17, 40] {
        let ring = HandRing::new(&mem, 4);
        ring.desc(0, table, len, DESC_F_INDIRECT, 0);
        ring.publish(0, &[0]);
        assert_pop_fails(&ring, DeviceError::BadIndirectLength { len });
    }
}

#[test]
fn misplaced_indirect_descriptors_are_caught() {
    let mem = TestMemory::new(1 << 20);
    let b = mem.alloc(64, 8).unwrap();
    let table = mem.alloc(16, 16).unwrap();
    write_desc(&mem, table, b, 8, 0, 0);
    // INDIRECT together with NEXT (VIRTIO 1.3, 2.7.5.3.1: the driver MUST NOT).
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, table, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1);
    ring.desc(1, b, 8, 0, 0);
    ring.publish(0, &[0]);
    assert_pop_fails(&ring, DeviceError::MisplacedIndirect);
    // INDIRECT in the middle of a direct chain.
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, b, 8, DESC_F_NEXT, 1);
    ring.desc(1, table, 16, DESC_F_INDIRECT, 0);
    ring.publish(0, &[0]);
    assert_pop_fails(&ring, DeviceError::MisplacedIndirect);
}

#[test]
fn loops_and_bad_links_inside_an_indirect_table_are_caught() {
    let mem = TestMemory::new(1 << 20);
    let b = mem.alloc(64, 8).unwrap();
    let table = mem.alloc(32, 16).unwrap();
    write_desc(&mem, table, b, 8, DESC_F_NEXT, 1);
    write_desc(&mem, table + 16, b, 8, DESC_F_NEXT, 0);
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, table, 32, DESC_F_INDIRECT, 0);
    ring.publish(0, &[0]);
    assert_pop_fails(&ring, DeviceError::ChainTooLong);

    write_desc(&mem, table + 16, b, 8, DESC_F_NEXT, 2);
    assert_pop_fails(&ring, DeviceError::IndexOutOfRange { index: 2 });
}

#[test]
fn indirect_tables_outside_memory_are_caught() {
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, mem.end() - 16, 32, DESC_F_INDIRECT, 0);
    ring.publish(0, &[0]);
    assert_pop_fails(&ring, DeviceError::AddressOutOfRange { addr: mem.end() - 16, len: 32 });
}

#[test]
fn buffers_outside_guest_memory_are_caught() {
    let mem = TestMemory::new(1 << 20);
    let cases = [
        (0, 8),
        (TestMemory::BASE - 1, 2),
        (mem.end() - 4, 8),
        (mem.end(), 1),
        (u64::MAX - 3, 8),
        (TestMemory::BASE, u32::MAX),
    ];
    for (addr, len) in cases {
        let ring = HandRing::new(&mem, 4);
        ring.desc(0, addr, len, 0, 0);
        ring.publish(0, &[0]);
        assert_pop_fails(&ring, DeviceError::AddressOutOfRange { addr, len: len as u64 });
    }
}

#[test]
fn total_length_overflowing_32_bits_is_caught() {
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 4);
    // The second length overflows the total before its address is looked at.
    ring.desc(0, ring.buf(16), 16, DESC_F_NEXT, 1);
    ring.desc(1, TestMemory::BASE, u32::MAX - 8, 0, 0);
    ring.publish(0, &[0]);
    let mut device = ring.device();
    let mut segs = Segments::<4>::new();
    assert_eq!(device.pop(&mut segs).unwrap_err(), DeviceError::LengthOverflow);
    assert!(device.is_broken());
}

#[test]
fn readable_after_writable_is_caught_direct_and_indirect() {
    let mem = TestMemory::new(1 << 20);
    let b = mem.alloc(64, 8).unwrap();
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, b, 8, DESC_F_WRITE | DESC_F_NEXT, 1);
    ring.desc(1, b, 8, 0, 0);
    ring.publish(0, &[0]);
    assert_pop_fails(&ring, DeviceError::ReadableAfterWritable);

    let table = mem.alloc(32, 16).unwrap();
    write_desc(&mem, table, b, 8, DESC_F_WRITE | DESC_F_NEXT, 1);
    write_desc(&mem, table + 16, b, 8, 0, 0);
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, table, 32, DESC_F_INDIRECT, 0);
    ring.publish(0, &[0]);
    assert_pop_fails(&ring, DeviceError::ReadableAfterWritable);
}

#[test]
fn ring_areas_outside_memory_or_misaligned_are_rejected_at_creation() {
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 8);
    let mut config = ring.config();
    config.desc_addr = mem.end() - 64;
    assert!(matches!(SplitDevice::new(&mem, config).err(), Some(DeviceError::AddressOutOfRange { .. })));
    let mut config = ring.config();
    config.desc_addr += 8;
    assert_eq!(SplitDevice::new(&mem, config).err(), Some(DeviceError::Misaligned));
    let mut config = ring.config();
    config.used_addr += 2;
    assert_eq!(SplitDevice::new(&mem, config).err(), Some(DeviceError::Misaligned));
    let mut config = ring.config();
    config.size = 6;
    assert_eq!(SplitDevice::new(&mem, config).err(), Some(DeviceError::InvalidSize));
}

#[test]
fn a_full_sink_is_not_a_driver_fault_and_the_chain_stays_available() {
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 4);
    let b = ring.buf(8);
    ring.desc(0, b, 8, DESC_F_NEXT, 1);
    ring.desc(1, b, 8, DESC_F_NEXT | DESC_F_WRITE, 2);
    ring.desc(2, b, 8, DESC_F_WRITE, 0);
    ring.publish(0, &[0]);
    let mut device = ring.device();
    let mut small = Segments::<2>::new();
    assert_eq!(device.pop(&mut small).unwrap_err(), DeviceError::SinkFull);
    assert!(!device.is_broken());
    let mut big = Segments::<3>::new();
    let chain = device.pop(&mut big).unwrap().unwrap();
    assert_eq!((chain.readable_segments(), chain.writable_segments(), chain.writable_len()), (1, 2, 16));
}

#[test]
fn completion_length_is_clamped_to_the_writable_part() {
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, ring.buf(8), 8, DESC_F_WRITE, 0);
    ring.publish(0, &[0]);
    let mut device = ring.device();
    let mut segs = Segments::<1>::new();
    let chain = device.pop(&mut segs).unwrap().unwrap();
    device.complete(chain, 1000);
    device.publish_used();
    assert_eq!(mem.read_u16(ring.used + 2), 1);
    assert_eq!(mem.read_u32(ring.used + 4), 0);
    assert_eq!(mem.read_u32(ring.used + 8), 8);
}

#[test]
fn each_avail_entry_is_read_once_so_a_rewritten_head_cannot_be_popped_twice() {
    // After a pop, rewriting the consumed avail slot or descriptors changes nothing that was
    // returned, and the next pop reads only new entries.
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 4);
    let (b1, b2) = (ring.buf(8), ring.buf(8));
    ring.desc(0, b1, 8, 0, 0);
    ring.desc(1, b2, 4, 0, 0);
    ring.publish(0, &[0]);
    let mut device = ring.device();
    let mut segs = Segments::<1>::new();
    let chain = device.pop(&mut segs).unwrap().unwrap();
    ring.desc(0, b2, 4, DESC_F_NEXT, 0);
    mem.write_u16(ring.avail + 4, 3);
    assert_eq!(segs.iter().next().map(|s| (s.addr(), s.len())), Some((b1, 8)));
    assert_eq!(chain.id(), 0);
    assert!(device.pop(&mut segs).unwrap().is_none());
    ring.publish(1, &[1]);
    assert_eq!(device.pop(&mut segs).unwrap().unwrap().id(), 1);
}

/// Segments as `(addr, len, writable)`.
fn segs_of(segs: &Segments<'_, 16>) -> Vec<(u64, u32, bool)> {
    segs.iter().map(|s| (s.addr(), s.len(), s.is_writable())).collect()
}

/// VIRTIO 1.3, 2.7.5.3 sets no alignment for an indirect table: a table at any address is
/// walked, entry by entry, with its `next` links.
#[test]
fn split_2_7_5_3_indirect_tables_at_any_alignment_are_walked() {
    for misalign in [0u64, 1, 2, 4, 7, 8, 12, 15] {
        let mem = TestMemory::new(1 << 20);
        let ring = HandRing::new(&mem, 4);
        let (r, w) = (ring.buf(8), ring.buf(32));
        let table = mem.alloc(64, 16).unwrap() + misalign;
        // Entry 0 -> entry 2 (readable, then writable); entry 1 is never reached.
        write_desc(&mem, table, r, 8, DESC_F_NEXT, 2);
        write_desc(&mem, table + 16, 0xdead_0000, 4, 0, 0);
        write_desc(&mem, table + 32, w, 32, DESC_F_WRITE, 0);
        ring.desc(1, table, 48, DESC_F_INDIRECT, 0);
        ring.publish(0, &[1]);
        let mut device = ring.device();
        let mut segs = Segments::<16>::new();
        let chain = device.pop(&mut segs).unwrap().expect("a chain");
        assert_eq!((chain.id(), chain.readable_len(), chain.writable_len()), (1, 8, 32), "misalign {misalign}");
        assert_eq!(segs_of(&segs), vec![(r, 8, false), (w, 32, true)], "misalign {misalign}");
        device.complete(chain, 32);
        device.publish_used();
        assert!(!device.is_broken());
    }
}

/// An `INDIRECT` descriptor without `VIRTIO_RING_F_INDIRECT_DESC` negotiated breaks the
/// driver's side of the contract (VIRTIO 1.3, 2.7.5.3.1): the device reports it, latches
/// broken, and reads nothing of the table.
#[test]
fn split_2_7_5_3_1_indirect_without_the_feature_is_refused() {
    let mem = TestMemory::new(1 << 20);
    let mut ring = HandRing::new(&mem, 4);
    ring.features = Features::VERSION_1;
    let table = mem.alloc(16, 16).unwrap();
    write_desc(&mem, table, ring.buf(8), 8, 0, 0);
    ring.desc(0, table, 16, DESC_F_INDIRECT, 0);
    ring.publish(0, &[0]);
    assert_pop_fails(&ring, DeviceError::IndirectNotNegotiated);
    // A direct chain is still served without the feature.
    let ring2 = HandRing { features: Features::VERSION_1, ..HandRing::new(&mem, 4) };
    let b = ring2.buf(8);
    ring2.desc(0, b, 8, 0, 0);
    ring2.publish(0, &[0]);
    let mut segs = Segments::<16>::new();
    assert!(ring2.device().pop(&mut segs).unwrap().is_some());
}
