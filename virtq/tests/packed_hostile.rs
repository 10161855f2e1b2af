//! A hostile peer on either side of a packed ring (VIRTIO 1.3, section 2.8): the queue
//! reports a clear error, latches broken, loses nothing, and never panics or touches memory
//! it should not. Section numbers in test names are those of VIRTIO 1.3.
//!
//! Packed descriptor layout: `addr` at 0, `len` at 8, `id` at 12, `flags` at 14. A
//! descriptor is available on lap `w` with `AVAIL = w, USED = !w`, and used with both
//! bits equal to `w`; both sides start with wrap counter 1.

mod common;

use common::Pair;
use virtq::packed::{
    used_bits, DESC_F_AVAIL, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_USED, DESC_F_WRITE, EVENT_FLAGS_DESC,
    EVENT_FLAGS_DISABLE, EVENT_FLAGS_ENABLE, WRAP_BIT,
};
use virtq::testing::TestMemory;
use virtq::{
    AddErrorKind, DeviceConfig, DeviceError, DeviceQueue, Fault, Features, LayoutKind, PackedDevice, Segments,
};

/// Both packed layouts: every driver-side case must hold on each.
const PACKED_LAYOUTS: [LayoutKind; 2] = [LayoutKind::Packed, LayoutKind::PackedInOrder];

/// Flags of a descriptor made available on the first lap (driver wrap counter 1).
const LAP1: u16 = DESC_F_AVAIL;
/// Flags of a descriptor made available on the second lap (driver wrap counter 0).
const LAP2: u16 = DESC_F_USED;
/// Flags of a descriptor the device used on the first lap.
const USED1: u16 = DESC_F_AVAIL | DESC_F_USED;
/// The reserved event-suppression flags value (VIRTIO 1.3, 2.8.10).
const EVENT_FLAGS_RESERVED: u16 = 3;

// ---------------------------------------------------------------------------------------
// Hostile device, driver side.

/// Adds three buffers to a packed ring of 4, filling it. Buffer ids and positions:
/// 100 has id 0 at position 0 (one writable descriptor of 8 bytes); 101 has id 1 at
/// positions 1 and 2 (8 readable, then 8 writable; id 2 is the private record of its
/// second descriptor, never a buffer id); 102 has id 3 at position 3 (8 readable bytes).
/// Both layouts give these ids: the free list starts sequential, and in order the id is
/// the head's position.
fn three_in_flight(mem: &TestMemory, layout: LayoutKind) -> Pair<'_> {
    let mut p = Pair::of(mem, layout, 4, true, false);
    p.driver.add_inbuf(&[mem.alloc_sg(8)], 100).unwrap();
    p.driver.add_sgs(&[&[mem.alloc_sg(8)]], &[&[mem.alloc_sg(8)]], 101).unwrap();
    p.driver.add_outbuf(&[mem.alloc_sg(8)], 102).unwrap();
    assert_eq!(p.driver.num_free(), 0);
    p
}

/// Writes a used descriptor at ring position `pos` as a device would: id and length, then
/// the flags.
fn forge_used(p: &Pair<'_>, pos: u16, id: u16, len: u32, flags: u16) {
    let at = p.desc_addr(pos);
    p.mem.write_u32(at + 8, len);
    p.mem.write_u16(at + 12, id);
    p.mem.write_u16(at + 14, flags);
}

/// Every token still in flight, detached, sorted; detaching then finds nothing more.
fn detach_all(p: &mut Pair<'_>) -> Vec<u64> {
    let mut tokens: Vec<u64> = std::iter::from_fn(|| p.driver.detach_unused_buf()).collect();
    tokens.sort();
    assert!(p.driver.detach_unused_buf().is_none(), "each token comes back exactly once");
    tokens
}

/// The next `get_buf` finds nothing and latches `fault`; the queue stays broken, refuses
/// adds, and gives back exactly `left` (each once) through `detach_unused_buf`.
fn assert_broken_and_recoverable(p: &mut Pair<'_>, fault: Fault, left: &[u64]) {
    assert!(p.driver.get_buf().is_none());
    assert!(p.driver.is_broken());
    assert_eq!(p.driver.fault(), Some(fault));
    assert!(p.driver.get_buf().is_none(), "stays broken");
    assert!(!p.driver.has_used(), "a broken queue reports no work");
    let e = p.driver.add_inbuf(&[p.mem.alloc_sg(4)], 7).unwrap_err();
    assert_eq!((e.kind, e.token), (AddErrorKind::Broken, 7));
    assert_eq!(detach_all(p), left);
    assert_eq!(p.driver.num_free(), p.driver.vring_size());
}

#[test]
fn packed_2_8_1_inconsistent_or_wrong_lap_used_bits_are_not_used_and_nothing_is_lost() {
    // AVAIL without USED (what the driver wrote), USED without AVAIL (available on the
    // next lap), and both clear (used, but on the wrong lap for a driver on its first).
    for layout in PACKED_LAYOUTS {
        for bad in [DESC_F_AVAIL, DESC_F_USED, 0] {
            let mem = TestMemory::new(1 << 20);
            let mut p = three_in_flight(&mem, layout);
            let chains: Vec<_> = std::iter::from_fn(|| p.pop()).collect();
            assert_eq!(chains.len(), 3);
            // A plausible id and length: only the bits are wrong.
            forge_used(&p, 0, 0, 8, bad | DESC_F_WRITE);
            assert!(!p.driver.has_used(), "{layout:?} {bad:#x}");
            assert!(p.driver.get_buf().is_none(), "{layout:?} {bad:#x}");
            assert!(!p.driver.is_broken(), "{layout:?} {bad:#x}");
            assert_eq!(p.driver.fault(), None);
            // The device completes for real: everything comes back, once.
            for (chain, _) in chains {
                let written = chain.writable_len();
                p.device.complete(chain, written);
            }
            p.device.publish_used();
            let used: Vec<(u64, u32)> = std::iter::from_fn(|| p.driver.get_buf().map(|u| (u.token, u.len))).collect();
            assert_eq!(used, vec![(100, 8), (101, 8), (102, 0)], "{layout:?} {bad:#x}");
            assert_eq!(p.driver.num_free(), 4);
            assert!(!p.driver.is_broken());
            assert!(p.driver.detach_unused_buf().is_none());
        }
    }
}

#[test]
fn packed_2_8_1_after_wrapping_a_used_descriptor_from_the_previous_lap_is_not_used() {
    for layout in PACKED_LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 2, false, false);
        let sg = mem.alloc_sg(8);
        // Five laps of two positions, one buffer at a time.
        for n in 0..10u64 {
            let pos = (n % 2) as u16;
            let wrap = (n / 2) % 2 == 0;
            // Nothing in flight: what earlier laps left in the ring (used descriptors from
            // the previous lap, zeroes on the first) is not a used buffer.
            assert!(!p.driver.has_used(), "{layout:?} n={n}");
            assert!(p.driver.get_buf().is_none(), "{layout:?} n={n}");
            p.driver.add_inbuf(&[sg], n).unwrap();
            let id = mem.read_u16(p.desc_addr(pos) + 12);
            let (chain, _) = p.pop().expect("available");
            // The device writes a used descriptor for the buffer in flight, but with the
            // previous lap's wrap counter: stale, not used.
            forge_used(&p, pos, id, 8, used_bits(!wrap) | DESC_F_WRITE);
            assert!(!p.driver.has_used(), "{layout:?} n={n}");
            assert!(p.driver.get_buf().is_none(), "{layout:?} n={n}");
            assert!(!p.driver.is_broken(), "{layout:?} n={n}");
            p.device.complete(chain, 8);
            p.device.publish_used();
            assert_eq!(p.driver.get_buf().map(|u| (u.token, u.len)), Some((n, 8)), "{layout:?} n={n}");
            assert_eq!(p.driver.num_free(), 2);
        }
        assert!(!p.driver.is_broken());
        assert_eq!(p.device.avail_base(), 0, "five laps: back at 0 with wrap counter 0");
    }
}

#[test]
fn packed_used_id_out_of_range_breaks_the_queue() {
    for layout in PACKED_LAYOUTS {
        for id in [4, 5, 0x7fff, 0xffff] {
            let mem = TestMemory::new(1 << 20);
            let mut p = three_in_flight(&mem, layout);
            forge_used(&p, 0, id, 0, USED1);
            assert_broken_and_recoverable(&mut p, Fault::UsedIdOutOfRange { id: id as u32 }, &[100, 101, 102]);
        }
    }
}

#[test]
fn packed_used_id_that_is_not_a_buffer_in_flight_breaks_the_queue() {
    for layout in PACKED_LAYOUTS {
        // Id 2 is the second descriptor of buffer 101's chain, not a buffer id.
        let mem = TestMemory::new(1 << 20);
        let mut p = three_in_flight(&mem, layout);
        forge_used(&p, 0, 2, 0, USED1);
        assert_broken_and_recoverable(&mut p, Fault::UsedIdNotInFlight { id: 2 }, &[100, 101, 102]);

        // An id in range that was never handed out.
        let mut p = Pair::of(&mem, layout, 8, false, false);
        p.driver.add_inbuf(&[mem.alloc_sg(8)], 100).unwrap();
        p.driver.add_outbuf(&[mem.alloc_sg(8)], 101).unwrap();
        forge_used(&p, 0, 5, 0, USED1);
        assert_broken_and_recoverable(&mut p, Fault::UsedIdNotInFlight { id: 5 }, &[100, 101]);
    }
}

#[test]
fn packed_a_buffer_used_twice_breaks_the_queue() {
    for layout in PACKED_LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = three_in_flight(&mem, layout);
        forge_used(&p, 0, 0, 8, USED1 | DESC_F_WRITE);
        assert_eq!(p.driver.get_buf().map(|u| (u.token, u.len)), Some((100, 8)));
        // The next used descriptor goes at position 1; it names buffer 0 again.
        forge_used(&p, 1, 0, 8, USED1 | DESC_F_WRITE);
        assert_broken_and_recoverable(&mut p, Fault::UsedIdNotInFlight { id: 0 }, &[101, 102]);
    }
}

#[test]
fn packed_used_length_beyond_the_writable_part_breaks_the_queue() {
    for layout in PACKED_LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = three_in_flight(&mem, layout);
        forge_used(&p, 0, 1, 9, USED1 | DESC_F_WRITE);
        assert_broken_and_recoverable(&mut p, Fault::UsedLenTooLong { id: 1, len: 9, writable: 8 }, &[100, 101, 102]);

        let mut p = three_in_flight(&mem, layout);
        forge_used(&p, 0, 0, u32::MAX, USED1 | DESC_F_WRITE);
        let fault = Fault::UsedLenTooLong { id: 0, len: u32::MAX, writable: 8 };
        assert_broken_and_recoverable(&mut p, fault, &[100, 101, 102]);

        // A read-only buffer has no writable part at all.
        let mut p = three_in_flight(&mem, layout);
        forge_used(&p, 0, 3, 1, USED1 | DESC_F_WRITE);
        assert_broken_and_recoverable(&mut p, Fault::UsedLenTooLong { id: 3, len: 1, writable: 0 }, &[100, 101, 102]);
    }
}

#[test]
fn packed_2_8_4_used_length_without_the_write_flag_is_ignored() {
    // "Element Length is reserved for used descriptors without the VIRTQ_DESC_F_WRITE
    // flag, and is ignored by drivers." Without WRITE the device wrote nothing (2.8.3).
    for layout in PACKED_LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = three_in_flight(&mem, layout);
        forge_used(&p, 0, 0, 5, USED1);
        assert_eq!(p.driver.get_buf().map(|u| (u.token, u.len)), Some((100, 0)), "{layout:?}");

        let mut p = three_in_flight(&mem, layout);
        forge_used(&p, 0, 0, 9, USED1);
        assert_eq!(p.driver.get_buf().map(|u| (u.token, u.len)), Some((100, 0)), "{layout:?}");
        assert!(!p.driver.is_broken(), "{layout:?}: {:?}", p.driver.fault());
    }
}

#[test]
fn packed_2_8_8_in_order_batch_naming_a_buffer_not_in_flight_breaks_the_queue() {
    let mem = TestMemory::new(1 << 20);

    // Two buffers in flight (positions 0 and 1..=2); the batch claims position 3 as well.
    let mut p = Pair::of(&mem, LayoutKind::PackedInOrder, 4, false, false);
    p.driver.add_inbuf(&[mem.alloc_sg(8)], 100).unwrap();
    p.driver.add_sgs(&[&[mem.alloc_sg(8)]], &[&[mem.alloc_sg(8)]], 101).unwrap();
    forge_used(&p, 0, 3, 0, USED1);
    assert_broken_and_recoverable(&mut p, Fault::UsedIdNotInFlight { id: 3 }, &[100, 101]);

    // A batch ending inside a chain (id 2 is the second descriptor of buffer 101).
    let mut p = three_in_flight(&mem, LayoutKind::PackedInOrder);
    forge_used(&p, 0, 2, 0, USED1);
    assert_broken_and_recoverable(&mut p, Fault::UsedIdNotInFlight { id: 2 }, &[100, 101, 102]);

    // A valid batch of two, then one naming a buffer it already returned.
    let mut p = three_in_flight(&mem, LayoutKind::PackedInOrder);
    forge_used(&p, 0, 1, 8, USED1 | DESC_F_WRITE);
    assert_eq!(p.driver.get_buf().map(|u| (u.token, u.len)), Some((100, 8)));
    assert_eq!(p.driver.get_buf().map(|u| (u.token, u.len)), Some((101, 8)));
    forge_used(&p, 3, 1, 0, USED1);
    assert_broken_and_recoverable(&mut p, Fault::UsedIdNotInFlight { id: 1 }, &[102]);

    // A valid batch of everything, then another batch on the next lap with nothing
    // outstanding.
    let mut p = three_in_flight(&mem, LayoutKind::PackedInOrder);
    forge_used(&p, 0, 3, 0, USED1);
    let used: Vec<(u64, u32)> = std::iter::from_fn(|| p.driver.get_buf().map(|u| (u.token, u.len))).collect();
    assert_eq!(used, vec![(100, 8), (101, 8), (102, 0)]);
    assert_eq!(p.driver.num_free(), 4);
    forge_used(&p, 0, 3, 0, used_bits(false));
    assert_broken_and_recoverable(&mut p, Fault::UsedIdNotInFlight { id: 3 }, &[]);
}

#[test]
fn packed_the_driver_frees_chains_by_its_private_records_not_ring_memory() {
    for layout in PACKED_LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 4, false, false);
        let (a, b, c) = (mem.alloc_sg(8), mem.alloc_sg(8), mem.alloc_sg(8));
        for round in 0..8u64 {
            // Three descriptors in a ring of four: chains start at 0, 3, 2, 1, ... and
            // most straddle the end.
            p.driver.add_sgs(&[&[a, b]], &[&[c]], round).unwrap();
            let (chain, _) = p.pop().unwrap();
            // The device scribbles over every address, length and id in the ring (the
            // flags it leaves: they are the used/available protocol itself).
            for i in 0..4 {
                mem.write_u64(p.desc_addr(i), u64::MAX);
                mem.write_u32(p.desc_addr(i) + 8, u32::MAX);
                mem.write_u16(p.desc_addr(i) + 12, 0xffff);
            }
            p.device.complete(chain, 8);
            p.device.publish_used();
            assert_eq!(p.driver.get_buf().map(|u| (u.token, u.len)), Some((round, 8)), "{layout:?}");
            assert_eq!(p.driver.num_free(), 4);
            assert!(!p.driver.is_broken());
        }
    }
}

/// Adds one single-descriptor buffer to a fresh packed ring of 4, with the device area
/// forged to `(off_wrap, flags)`, and says whether `kick_prepare` asks for a kick.
fn kick_after_one_add(layout: LayoutKind, event_idx: bool, off_wrap: u16, flags: u16) -> bool {
    let mem = TestMemory::new(1 << 16);
    let mut p = Pair::of(&mem, layout, 4, event_idx, false);
    mem.write_u16(p.driver.used_addr(), off_wrap);
    mem.write_u16(p.driver.used_addr() + 2, flags);
    p.driver.add_outbuf(&[mem.alloc_sg(8)], 1).unwrap();
    let kick = p.driver.kick_prepare().is_some();
    assert!(!p.driver.is_broken());
    kick
}

#[test]
fn packed_2_8_10_kick_when_the_device_event_is_outside_the_ring_or_the_flags_are_reserved() {
    for layout in PACKED_LAYOUTS {
        // With EVENT_IDX: an offset that cannot be placed notifies, conservatively.
        for off_wrap in [4, 4 | WRAP_BIT, 0x7fff, 0xffff] {
            assert!(kick_after_one_add(layout, true, off_wrap, EVENT_FLAGS_DESC), "{layout:?} {off_wrap:#x}");
        }
        // Reserved flags value 3: kick.
        assert!(kick_after_one_add(layout, true, 0, EVENT_FLAGS_RESERVED));
        assert!(kick_after_one_add(layout, false, 0, EVENT_FLAGS_RESERVED));
        // DESC without EVENT_IDX negotiated is not a valid request: kick.
        assert!(kick_after_one_add(layout, false, 1 | WRAP_BIT, EVENT_FLAGS_DESC));
        // The contrast, so that the cases above mean something: a placeable event that
        // the add did not cross, and DISABLE, suppress the kick; one it crossed does not.
        assert!(!kick_after_one_add(layout, true, 1 | WRAP_BIT, EVENT_FLAGS_DESC));
        assert!(!kick_after_one_add(layout, true, WRAP_BIT, EVENT_FLAGS_DISABLE));
        assert!(kick_after_one_add(layout, true, WRAP_BIT, EVENT_FLAGS_DESC));
        assert!(kick_after_one_add(layout, true, 0, EVENT_FLAGS_ENABLE));
    }
}

// ---------------------------------------------------------------------------------------
// Hostile driver, device side.

/// A packed ring written by hand, as a hostile driver would.
struct HandRing<'m> {
    mem: &'m TestMemory,
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
    features: Features,
}

impl<'m> HandRing<'m> {
    /// A ring whose driver negotiated `INDIRECT_DESC`.
    fn new(mem: &'m TestMemory, size: u16) -> Self {
        Self::with_features(mem, size, Features::INDIRECT_DESC)
    }

    fn with_features(mem: &'m TestMemory, size: u16, extra: Features) -> Self {
        let desc = mem.alloc(16 * size as usize, 16).unwrap();
        let driver = mem.alloc(4, 4).unwrap();
        let device = mem.alloc(4, 4).unwrap();
        Self { mem, size, desc, driver, device, features: Features::VERSION_1 | Features::RING_PACKED | extra }
    }

    fn config(&self) -> DeviceConfig {
        DeviceConfig::new(self.size, self.features, self.desc, self.driver, self.device)
    }

    /// A device that starts at position `pos` of the lap with wrap counter `wrap`, for
    /// both its available and used positions.
    fn config_at(&self, pos: u16, wrap: bool) -> DeviceConfig {
        let base = pos | if wrap { WRAP_BIT } else { 0 };
        DeviceConfig { avail_base: base, used_base: base, ..self.config() }
    }

    fn device(&self) -> DeviceQueue<'m, TestMemory> {
        DeviceQueue::new(self.mem, self.config()).unwrap()
    }

    fn device_at(&self, pos: u16, wrap: bool) -> DeviceQueue<'m, TestMemory> {
        DeviceQueue::new(self.mem, self.config_at(pos, wrap)).unwrap()
    }

    /// Writes ring descriptor `pos`, flags last.
    fn desc(&self, pos: u16, addr: u64, len: u32, id: u16, flags: u16) {
        assert!(pos < self.size);
        write_desc(self.mem, self.desc + 16 * pos as u64, addr, len, id, flags);
    }

    fn flags(&self, pos: u16) -> u16 {
        self.mem.read_u16(self.desc + 16 * pos as u64 + 14)
    }

    fn id(&self, pos: u16) -> u16 {
        self.mem.read_u16(self.desc + 16 * pos as u64 + 12)
    }

    fn len(&self, pos: u16) -> u32 {
        self.mem.read_u32(self.desc + 16 * pos as u64 + 8)
    }

    /// Writes the driver event-suppression area.
    fn driver_event(&self, off_wrap: u16, flags: u16) {
        self.mem.write_u16(self.driver, off_wrap);
        self.mem.write_u16(self.driver + 2, flags);
    }

    fn buf(&self, len: u32) -> u64 {
        self.mem.alloc(len as usize, 8).unwrap()
    }
}

/// Writes a packed descriptor (in the ring or in an indirect table), flags last.
fn write_desc(mem: &TestMemory, at: u64, addr: u64, len: u32, id: u16, flags: u16) {
    mem.write_u64(at, addr);
    mem.write_u32(at + 8, len);
    mem.write_u16(at + 12, id);
    mem.write_u16(at + 14, flags);
}

/// Pops once expecting `expected`, then checks the queue latched broken.
fn assert_device_fails(mut device: DeviceQueue<'_, TestMemory>, expected: DeviceError) {
    let mut segs = Segments::<16>::new();
    assert_eq!(device.pop(&mut segs).unwrap_err(), expected);
    assert!(device.is_broken());
    assert_eq!(device.fault(), Some(expected));
    assert_eq!(device.pop(&mut segs).unwrap_err(), DeviceError::Broken);
    assert!(device.enable_notifications(), "a broken device must not go to sleep waiting");
}

fn assert_pop_fails(ring: &HandRing<'_>, expected: DeviceError) {
    assert_device_fails(ring.device(), expected);
}

/// `(addr, len, writable)` of every segment collected.
fn segments(segs: &Segments<'_, 16>) -> Vec<(u64, u32, bool)> {
    segs.iter().map(|s| (s.addr(), s.len(), s.is_writable())).collect()
}

#[test]
fn packed_2_8_1_a_head_not_marked_available_is_not_popped_and_not_a_fault() {
    let mem = TestMemory::new(1 << 20);
    let b = mem.alloc(8, 8).unwrap();
    // Zeroed, used-looking, available on the next lap, flags without either bit.
    for flags in [0, USED1, LAP2, DESC_F_WRITE | DESC_F_NEXT, USED1 | DESC_F_WRITE] {
        let ring = HandRing::new(&mem, 4);
        ring.desc(0, b, 8, 0, flags);
        let mut device = ring.device();
        let mut segs = Segments::<16>::new();
        assert!(device.pop(&mut segs).unwrap().is_none(), "{flags:#x}");
        assert!(!device.is_broken());
        assert!(!device.enable_notifications(), "nothing available: the device may sleep");
    }
}

#[test]
fn packed_2_8_1_a_descriptor_replayed_from_the_previous_lap_is_not_popped_twice() {
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 2);
    let b = ring.buf(8);
    ring.desc(0, b, 8, 0, LAP1);
    ring.desc(1, b, 8, 1, LAP1);
    let mut device = ring.device();
    let mut segs = Segments::<16>::new();
    for id in 0..2 {
        let chain = device.pop(&mut segs).unwrap().unwrap();
        assert_eq!(chain.id(), id);
        device.complete(chain, 0);
        device.publish_used();
    }
    assert_eq!(device.avail_base(), 0, "wrapped: position 0, wrap counter 0");
    // The driver rewrites position 0 exactly as on the first lap.
    ring.desc(0, b, 8, 0, LAP1);
    assert!(device.pop(&mut segs).unwrap().is_none());
    assert!(!device.is_broken());
    // With the second lap's bits it is a new buffer.
    ring.desc(0, b, 8, 5, LAP2);
    assert_eq!(device.pop(&mut segs).unwrap().unwrap().id(), 5);
}

#[test]
fn packed_2_8_6_a_later_descriptor_not_marked_available_is_caught() {
    let mem = TestMemory::new(1 << 20);
    let b = mem.alloc(8, 8).unwrap();
    // Never written (zero), used-looking, available on the wrong lap.
    for bad in [0, USED1, LAP2, DESC_F_WRITE] {
        let ring = HandRing::new(&mem, 4);
        ring.desc(1, b, 8, 0, bad);
        ring.desc(0, b, 8, 0, LAP1 | DESC_F_NEXT);
        assert_pop_fails(&ring, DeviceError::BadDescriptorFlags);
    }
    // Across the ring end the second descriptor is on the next lap: the first lap's bits
    // are wrong there.
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, b, 8, 0, LAP1);
    ring.desc(3, b, 8, 0, LAP1 | DESC_F_NEXT);
    assert_device_fails(ring.device_at(3, true), DeviceError::BadDescriptorFlags);
    // A third descriptor after a good second one.
    let ring = HandRing::new(&mem, 4);
    ring.desc(1, b, 8, 0, LAP1 | DESC_F_NEXT);
    ring.desc(2, b, 8, 0, USED1);
    ring.desc(0, b, 8, 0, LAP1 | DESC_F_NEXT);
    assert_pop_fails(&ring, DeviceError::BadDescriptorFlags);
}

#[test]
fn packed_2_8_17_a_chain_longer_than_the_ring_is_caught() {
    let mem = TestMemory::new(1 << 20);
    let b = mem.alloc(8, 8).unwrap();
    let ring = HandRing::new(&mem, 4);
    for i in 0..4 {
        ring.desc(i, b, 8, 0, LAP1 | DESC_F_NEXT);
    }
    assert_pop_fails(&ring, DeviceError::ChainTooLong);
    // Starting mid-ring, with every descriptor correctly marked for its lap.
    let ring = HandRing::new(&mem, 4);
    for i in 0..4 {
        ring.desc(i, b, 8, 0, (if i >= 2 { LAP1 } else { LAP2 }) | DESC_F_NEXT);
    }
    assert_device_fails(ring.device_at(2, true), DeviceError::ChainTooLong);
    // A ring of one.
    let ring = HandRing::new(&mem, 1);
    ring.desc(0, b, 8, 0, LAP1 | DESC_F_NEXT);
    assert_pop_fails(&ring, DeviceError::ChainTooLong);
}

#[test]
fn packed_a_chain_of_exactly_the_ring_size_is_fine() {
    let mem = TestMemory::new(1 << 20);
    let b = mem.alloc(8, 8).unwrap();
    let ring = HandRing::new(&mem, 4);
    for i in 0..4 {
        let next = if i == 1 { 0 } else { DESC_F_NEXT };
        ring.desc(i, b, 8, 0, (if i >= 2 { LAP1 } else { LAP2 }) | next);
    }
    let mut device = ring.device_at(2, true);
    let mut segs = Segments::<16>::new();
    let chain = device.pop(&mut segs).unwrap().unwrap();
    assert_eq!((segs.len(), chain.readable_len()), (4, 32));
    assert_eq!(device.avail_base(), 2, "one lap later: position 2, wrap counter 0");
    device.complete(chain, 0);
    device.publish_used();
    assert_eq!(ring.flags(2), USED1);
    assert!(device.pop(&mut segs).unwrap().is_none());
}

#[test]
fn packed_2_8_19_nested_and_misplaced_indirect_descriptors_are_caught() {
    let mem = TestMemory::new(1 << 20);
    let b = mem.alloc(64, 8).unwrap();
    let table = mem.alloc(32, 16).unwrap();
    write_desc(&mem, table, b, 8, 0, 0);
    write_desc(&mem, table + 16, table, 32, 0, DESC_F_INDIRECT);
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, table, 32, 0, LAP1 | DESC_F_INDIRECT);
    assert_pop_fails(&ring, DeviceError::NestedIndirect);

    let single = mem.alloc(16, 16).unwrap();
    write_desc(&mem, single, b, 8, 0, 0);
    // INDIRECT together with NEXT.
    let ring = HandRing::new(&mem, 4);
    ring.desc(1, b, 8, 0, LAP1);
    ring.desc(0, single, 16, 0, LAP1 | DESC_F_INDIRECT | DESC_F_NEXT);
    assert_pop_fails(&ring, DeviceError::MisplacedIndirect);
    // INDIRECT after a direct descriptor of the same chain.
    let ring = HandRing::new(&mem, 4);
    ring.desc(1, single, 16, 0, LAP1 | DESC_F_INDIRECT);
    ring.desc(0, b, 8, 0, LAP1 | DESC_F_NEXT);
    assert_pop_fails(&ring, DeviceError::MisplacedIndirect);
}

#[test]
fn packed_2_8_7_bad_indirect_lengths_and_tables_outside_memory_are_caught() {
    let mem = TestMemory::new(1 << 20);
    let b = mem.alloc(64, 8).unwrap();
    let table = mem.alloc(64, 16).unwrap();
    for i in 0..4 {
        write_desc(&mem, table + 16 * i, b, 8, 0, 0);
    }
    for len in [0, 1, 15, 17, 40, 63] {
        let ring = HandRing::new(&mem, 4);
        ring.desc(0, table, len, 0, LAP1 | DESC_F_INDIRECT);
        assert_pop_fails(&ring, DeviceError::BadIndirectLength { len });
    }
    for (addr, len) in
        [(mem.end() - 16, 32), (mem.end(), 16), (0, 16), (TestMemory::BASE - 16, 32), (u64::MAX - 15, 32)]
    {
        let ring = HandRing::new(&mem, 4);
        ring.desc(0, addr, len, 0, LAP1 | DESC_F_INDIRECT);
        assert_pop_fails(&ring, DeviceError::AddressOutOfRange { addr, len: len as u64 });
    }
    // A table entry pointing outside memory.
    let bad = mem.alloc(32, 16).unwrap();
    write_desc(&mem, bad, b, 8, 0, 0);
    write_desc(&mem, bad + 16, mem.end() - 4, 8, 0, DESC_F_WRITE);
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, bad, 32, 0, LAP1 | DESC_F_INDIRECT);
    assert_pop_fails(&ring, DeviceError::AddressOutOfRange { addr: mem.end() - 4, len: 8 });
}

#[test]
fn packed_2_8_7_reserved_flags_and_ids_in_indirect_tables_are_ignored() {
    // "The VIRTQ_DESC_F_WRITE flags bit is the only valid flag for descriptors in the
    // indirect table. Others are reserved and are ignored by the device. Buffer ID is also
    // reserved ... In descriptors with VIRTQ_DESC_F_INDIRECT set VIRTQ_DESC_F_WRITE is
    // reserved and is ignored by the device."
    let mem = TestMemory::new(1 << 20);
    let (b1, b2) = (mem.alloc(8, 8).unwrap(), mem.alloc(16, 8).unwrap());
    let table = mem.alloc(32, 16).unwrap();
    write_desc(&mem, table, b1, 8, 0xbeef, DESC_F_NEXT | DESC_F_AVAIL | DESC_F_USED);
    write_desc(&mem, table + 16, b2, 16, 0x1234, DESC_F_WRITE | DESC_F_NEXT | DESC_F_USED);
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, table, 32, 5, LAP1 | DESC_F_INDIRECT | DESC_F_WRITE);
    let mut device = ring.device();
    let mut segs = Segments::<16>::new();
    let chain = device.pop(&mut segs).unwrap().unwrap();
    assert_eq!(chain.id(), 5);
    assert_eq!(segments(&segs), vec![(b1, 8, false), (b2, 16, true)]);
    assert_eq!((chain.readable_len(), chain.writable_len()), (8, 16));
    assert_eq!(device.avail_base(), 1 | WRAP_BIT, "an indirect buffer takes one ring descriptor");
    device.complete(chain, 16);
    device.publish_used();
    assert_eq!((ring.id(0), ring.len(0), ring.flags(0)), (5, 16, USED1 | DESC_F_WRITE));
}

#[test]
fn packed_buffers_outside_guest_memory_are_caught() {
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
        ring.desc(0, addr, len, 0, LAP1);
        assert_pop_fails(&ring, DeviceError::AddressOutOfRange { addr, len: len as u64 });
        // The same as the second descriptor of a chain, across the ring end.
        let ring = HandRing::new(&mem, 4);
        ring.desc(0, addr, len, 0, LAP2 | DESC_F_WRITE);
        ring.desc(3, ring.buf(8), 8, 0, LAP1 | DESC_F_NEXT);
        // Lengths are checked first: 8 + u32::MAX overflows before the address is looked at.
        let expected = if len > u32::MAX - 8 {
            DeviceError::LengthOverflow
        } else {
            DeviceError::AddressOutOfRange { addr, len: len as u64 }
        };
        assert_device_fails(ring.device_at(3, true), expected);
    }
}

#[test]
fn packed_total_length_overflowing_32_bits_is_caught() {
    let mem = TestMemory::new(1 << 20);
    for (first, second) in [(0, 0), (0, DESC_F_WRITE), (DESC_F_WRITE, DESC_F_WRITE)] {
        let ring = HandRing::new(&mem, 4);
        // The second length overflows the total before its address is looked at.
        ring.desc(1, TestMemory::BASE, u32::MAX - 8, 0, LAP1 | second);
        ring.desc(0, ring.buf(16), 16, 0, LAP1 | DESC_F_NEXT | first);
        assert_pop_fails(&ring, DeviceError::LengthOverflow);
    }
}

#[test]
fn packed_2_8_17_readable_after_writable_is_caught_direct_and_indirect() {
    let mem = TestMemory::new(1 << 20);
    let b = mem.alloc(64, 8).unwrap();
    let ring = HandRing::new(&mem, 4);
    ring.desc(1, b, 8, 0, LAP1);
    ring.desc(0, b, 8, 0, LAP1 | DESC_F_WRITE | DESC_F_NEXT);
    assert_pop_fails(&ring, DeviceError::ReadableAfterWritable);

    let table = mem.alloc(32, 16).unwrap();
    write_desc(&mem, table, b, 8, 0, DESC_F_WRITE);
    write_desc(&mem, table + 16, b, 8, 0, 0);
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, table, 32, 0, LAP1 | DESC_F_INDIRECT);
    assert_pop_fails(&ring, DeviceError::ReadableAfterWritable);
}

#[test]
fn packed_2_8_6_a_chain_straddling_the_ring_end_is_accepted_and_named_by_its_last_descriptor() {
    for in_order in [false, true] {
        let extra = if in_order { Features::IN_ORDER } else { Features::empty() };
        let mem = TestMemory::new(1 << 20);
        let ring = HandRing::with_features(&mem, 4, extra);
        let (r, w) = (ring.buf(8), ring.buf(16));
        // Reach position 3 the ordinary way: three single buffers, used and published.
        let mut device = ring.device();
        let mut segs = Segments::<16>::new();
        for i in 0..3 {
            ring.desc(i, r, 8, i, LAP1);
            let chain = device.pop(&mut segs).unwrap().unwrap();
            device.complete(chain, 0);
            device.publish_used();
        }
        device.publish_used();
        // Positions 3 (first lap) and 0 (second lap, flipped bits); the buffer id is in
        // the last descriptor (VIRTIO 1.3, 2.8.6), the head's is something else.
        ring.desc(0, w, 16, 9, LAP2 | DESC_F_WRITE);
        ring.desc(3, r, 8, 7, LAP1 | DESC_F_NEXT);
        let chain = device.pop(&mut segs).unwrap().unwrap();
        assert_eq!(chain.id(), 9, "in_order={in_order}");
        assert_eq!(segments(&segs), vec![(r, 8, false), (w, 16, true)]);
        assert_eq!(device.avail_base(), 1, "position 1, wrap counter 0");
        assert!(device.pop(&mut segs).unwrap().is_none());
        device.complete(chain, 5);
        device.publish_used();
        // One used descriptor, at the chain's first position, with the first lap's bits.
        assert_eq!((ring.id(3), ring.len(3), ring.flags(3)), (9, 5, USED1 | DESC_F_WRITE));
        assert_eq!(ring.flags(0), LAP2 | DESC_F_WRITE, "the skipped descriptor is left alone");
        assert!(!device.is_broken());
    }

    // The same straddle from a device resumed at position 3 (vhost-user SET_VRING_BASE).
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 3);
    let (r, w) = (ring.buf(8), ring.buf(16));
    ring.desc(0, w, 16, 1, LAP2 | DESC_F_WRITE);
    ring.desc(2, r, 8, 0, LAP1 | DESC_F_NEXT);
    let mut device = ring.device_at(2, true);
    let mut segs = Segments::<16>::new();
    let chain = device.pop(&mut segs).unwrap().unwrap();
    assert_eq!(chain.id(), 1);
    assert_eq!(segments(&segs), vec![(r, 8, false), (w, 16, true)]);
    device.complete(chain, 0);
    device.publish_used();
    assert_eq!((ring.id(2), ring.flags(2)), (1, USED1), "nothing written: no WRITE flag");
}

#[test]
fn packed_2_8_10_device_interrupts_when_the_driver_event_is_outside_the_ring_or_flags_are_reserved() {
    let mem = TestMemory::new(1 << 20);
    let cases = [
        // Offsets that cannot be placed in a ring of 4: interrupt, conservatively.
        (4, EVENT_FLAGS_DESC, true),
        (4 | WRAP_BIT, EVENT_FLAGS_DESC, true),
        (0x7fff, EVENT_FLAGS_DESC, true),
        (0xffff, EVENT_FLAGS_DESC, true),
        // The reserved flags value.
        (0, EVENT_FLAGS_RESERVED, true),
        // The contrast: an event in the ring that was not reached, DISABLE, one that
        // was reached, ENABLE.
        (3 | WRAP_BIT, EVENT_FLAGS_DESC, false),
        (WRAP_BIT, EVENT_FLAGS_DISABLE, false),
        (WRAP_BIT, EVENT_FLAGS_DESC, true),
        (0, EVENT_FLAGS_ENABLE, true),
    ];
    for (off_wrap, flags, expected) in cases {
        let ring = HandRing::with_features(&mem, 4, Features::EVENT_IDX);
        ring.desc(0, ring.buf(8), 8, 0, LAP1 | DESC_F_WRITE);
        let mut device = ring.device();
        let mut segs = Segments::<16>::new();
        assert!(!device.needs_notification(), "nothing used yet");
        let chain = device.pop(&mut segs).unwrap().unwrap();
        device.complete(chain, 8);
        device.publish_used();
        ring.driver_event(off_wrap, flags);
        assert_eq!(device.needs_notification(), expected, "{off_wrap:#x} {flags}");
        assert!(!device.needs_notification(), "decided once per completion");
        assert!(!device.is_broken());
    }
}

#[test]
fn packed_invalid_device_configs_are_rejected() {
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 4);
    let good = ring.config();
    assert!(PackedDevice::new(&mem, good).is_ok());
    let err = |config: DeviceConfig| PackedDevice::new(&mem, config).err();

    assert_eq!(err(DeviceConfig { size: 0, ..good }), Some(DeviceError::InvalidSize));
    assert_eq!(err(DeviceConfig { size: 32769, ..good }), Some(DeviceError::InvalidSize));
    for base in [4, 4 | WRAP_BIT, 0x7fff, 0xffff] {
        assert_eq!(err(DeviceConfig { avail_base: base, ..good }), Some(DeviceError::InvalidSize), "{base:#x}");
        assert_eq!(err(DeviceConfig { used_base: base, ..good }), Some(DeviceError::InvalidSize), "{base:#x}");
    }
    // Split or in-order features on a packed (not in-order) device.
    for layout in [LayoutKind::Split, LayoutKind::SplitInOrder, LayoutKind::PackedInOrder] {
        let features = layout.apply(good.features);
        assert_eq!(err(DeviceConfig { features, ..good }), Some(DeviceError::WrongLayout), "{layout}");
    }
    // Descriptor ring 16-aligned, event areas 4-aligned (VIRTIO 1.3, 2.8.10.1).
    assert_eq!(err(DeviceConfig { desc_addr: good.desc_addr + 8, ..good }), Some(DeviceError::Misaligned));
    assert_eq!(err(DeviceConfig { desc_addr: good.desc_addr + 4, ..good }), Some(DeviceError::Misaligned));
    assert_eq!(err(DeviceConfig { avail_addr: good.avail_addr + 2, ..good }), Some(DeviceError::Misaligned));
    assert_eq!(err(DeviceConfig { used_addr: good.used_addr + 1, ..good }), Some(DeviceError::Misaligned));
    // Areas outside guest memory.
    let desc_addr = mem.end() - 32;
    assert_eq!(
        err(DeviceConfig { desc_addr, ..good }),
        Some(DeviceError::AddressOutOfRange { addr: desc_addr, len: 64 })
    );
    let used_addr = mem.end();
    assert_eq!(
        err(DeviceConfig { used_addr, ..good }),
        Some(DeviceError::AddressOutOfRange { addr: used_addr, len: 4 })
    );
    // The valid extremes: any size up to 2^15 (not only powers of two), any position
    // below the size with either wrap counter.
    let ring3 = HandRing::new(&mem, 3);
    assert!(PackedDevice::new(&mem, ring3.config_at(2, false)).is_ok());
    let big = HandRing::new(&mem, 32768);
    assert!(PackedDevice::new(&mem, big.config_at(32767, true)).is_ok());
}

#[test]
fn packed_a_full_sink_is_not_a_driver_fault_and_the_chain_stays_available() {
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 4);
    let b = ring.buf(8);
    ring.desc(1, b, 8, 0, LAP1 | DESC_F_NEXT | DESC_F_WRITE);
    ring.desc(2, b, 8, 3, LAP1 | DESC_F_WRITE);
    ring.desc(0, b, 8, 0, LAP1 | DESC_F_NEXT);
    let mut device = ring.device();
    let mut small = Segments::<2>::new();
    assert_eq!(device.pop(&mut small).unwrap_err(), DeviceError::SinkFull);
    assert!(!device.is_broken());
    assert_eq!(device.avail_base(), WRAP_BIT, "nothing consumed");
    let mut big = Segments::<3>::new();
    let chain = device.pop(&mut big).unwrap().unwrap();
    assert_eq!((chain.id(), chain.readable_segments(), chain.writable_segments(), chain.writable_len()), (3, 1, 2, 16));
}

#[test]
fn packed_2_8_3_completion_length_is_clamped_and_write_flag_means_data_was_written() {
    let mem = TestMemory::new(1 << 20);
    let ring = HandRing::new(&mem, 4);
    ring.desc(0, ring.buf(8), 8, 6, LAP1 | DESC_F_WRITE);
    ring.desc(1, ring.buf(8), 8, 7, LAP1 | DESC_F_WRITE);
    let mut device = ring.device();
    let mut segs = Segments::<16>::new();
    let chain = device.pop(&mut segs).unwrap().unwrap();
    device.complete(chain, 1000);
    device.publish_used();
    assert_eq!((ring.id(0), ring.len(0), ring.flags(0)), (6, 8, USED1 | DESC_F_WRITE));
    let chain = device.pop(&mut segs).unwrap().unwrap();
    device.complete(chain, 0);
    device.publish_used();
    assert_eq!((ring.id(1), ring.len(1), ring.flags(1)), (7, 0, USED1));
}

// ---------------------------------------------------------------------------------------
// Both ends together, on a ring whose size is not a power of two.

#[test]
fn packed_size_3_pair_runs_1000_laps_of_two_descriptor_chains_straddling_the_ring_end() {
    for layout in PACKED_LAYOUTS {
        for event_idx in [false, true] {
            let mem = TestMemory::new(1 << 20);
            let mut p = Pair::of(&mem, layout, 3, event_idx, false);
            let (out, inb, spare) = (mem.alloc_sg(8), mem.alloc_sg(16), mem.alloc_sg(4));
            let what = format!("{layout:?} event_idx={event_idx}");
            // 1500 chains of two descriptors: 3000 positions, 1000 laps of 3. Heads go
            // 0, 2, 1, 0, ...: one chain in three straddles the end.
            for n in 0..1500u64 {
                assert!(!p.device.enable_notifications(), "{what} n={n}: nothing available yet");
                p.driver.add_sgs(&[&[out]], &[&[inb]], n).unwrap();
                assert_eq!(p.driver.num_free(), 1, "{what} n={n}");
                let e = p.driver.add_sgs(&[&[spare]], &[&[spare]], u64::MAX).unwrap_err();
                assert_eq!((e.kind, e.token), (AddErrorKind::NoSpace, u64::MAX));
                assert!(p.driver.kick_prepare().is_some(), "{what} n={n}: the device asked for this head");

                let (chain, segs) = p.pop().expect("a chain");
                let got: Vec<_> = segs.iter().map(|s| (s.addr(), s.len(), s.is_writable())).collect();
                assert_eq!(got, vec![(out.addr, 8, false), (inb.addr, 16, true)], "{what} n={n}");
                assert_eq!((chain.readable_len(), chain.writable_len()), (8, 16));
                let written = (n % 17) as u32;
                assert_eq!(segs[1].write_at(0, &vec![n as u8; written as usize]), written as usize);
                assert!(p.pop().is_none(), "{what} n={n}");
                p.device.complete(chain, written);
                assert!(p.device.needs_notification(), "{what} n={n}: the driver asked for this one");

                // As an interrupt handler would.
                p.driver.disable_cb();
                let used = p.driver.get_buf().expect("used");
                assert_eq!((used.token, used.len), (n, written), "{what}");
                let mut data = vec![0; written as usize];
                mem.read(inb.addr, &mut data);
                assert!(data.iter().all(|&x| x == n as u8), "{what} n={n}");
                assert!(p.driver.get_buf().is_none(), "{what} n={n}");
                assert_eq!(p.driver.num_free(), 3, "{what} n={n}");
                assert!(p.driver.enable_cb(), "{what} n={n}");
                assert!(!p.driver.is_broken() && !p.device.is_broken(), "{what} n={n}");
            }
            assert_eq!(p.device.avail_base(), WRAP_BIT, "{what}: 1000 laps, back to the start");
            assert!(p.driver.detach_unused_buf().is_none());
        }
    }
}

#[test]
fn packed_size_3_pair_fills_the_ring_with_a_chain_and_a_single_across_the_end() {
    // A two-descriptor chain and a one-descriptor buffer fill a ring of 3; in order the
    // device returns both with one used descriptor (VIRTIO 1.3, 2.8.8).
    for layout in PACKED_LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 3, true, false);
        let (out, inb, single) = (mem.alloc_sg(8), mem.alloc_sg(16), mem.alloc_sg(4));
        // One chain first, so that every later chain sits at positions 2 and 0.
        p.driver.add_sgs(&[&[out]], &[&[inb]], u64::MAX).unwrap();
        assert_eq!(p.device_echo_all(), 1);
        assert_eq!(p.driver.get_buf().map(|u| (u.token, u.len)), Some((u64::MAX, 16)));
        for n in 0..300u64 {
            p.driver.add_sgs(&[&[out]], &[&[inb]], 2 * n).unwrap();
            p.driver.add_inbuf(&[single], 2 * n + 1).unwrap();
            assert_eq!(p.driver.num_free(), 0);
            assert_eq!(p.device_echo_all(), 2);
            let used: Vec<(u64, u32)> = std::iter::from_fn(|| p.driver.get_buf().map(|u| (u.token, u.len))).collect();
            assert_eq!(used, vec![(2 * n, 16), (2 * n + 1, 4)], "{layout:?} n={n}");
            assert_eq!(p.driver.num_free(), 3);
            assert!(!p.driver.is_broken() && !p.device.is_broken());
        }
    }
}

/// VIRTIO 1.3, 2.8.19 sets no alignment for an indirect table: a table at any address is
/// read as a plain array of descriptors.
#[test]
fn packed_2_8_19_indirect_tables_at_any_alignment_are_walked() {
    for misalign in [0u64, 1, 2, 4, 7, 8, 12, 15] {
        let mem = TestMemory::new(1 << 20);
        let ring = HandRing::new(&mem, 4);
        let (r, w) = (ring.buf(8), ring.buf(32));
        let table = mem.alloc(48, 16).unwrap() + misalign;
        write_desc(&mem, table, r, 8, 0, 0);
        write_desc(&mem, table + 16, w, 32, 0, DESC_F_WRITE);
        ring.desc(0, table, 32, 6, LAP1 | DESC_F_INDIRECT);
        let mut device = ring.device();
        let mut segs = Segments::<16>::new();
        let chain = device.pop(&mut segs).unwrap().expect("a chain");
        assert_eq!((chain.id(), chain.readable_len(), chain.writable_len()), (6, 8, 32), "misalign {misalign}");
        assert_eq!(segments(&segs), vec![(r, 8, false), (w, 32, true)], "misalign {misalign}");
        device.complete(chain, 32);
        device.publish_used();
        assert_eq!((ring.id(0), ring.len(0), ring.flags(0)), (6, 32, USED1 | DESC_F_WRITE));
        assert!(!device.is_broken());
    }
}

/// An `INDIRECT` descriptor without `VIRTIO_RING_F_INDIRECT_DESC` negotiated breaks the
/// driver's side of the contract (VIRTIO 1.3, 2.8.19): the device reports it, latches
/// broken, and reads nothing of the table.
#[test]
fn packed_2_8_19_indirect_without_the_feature_is_refused() {
    for in_order in [false, true] {
        let mem = TestMemory::new(1 << 20);
        let extra = if in_order { Features::IN_ORDER } else { Features::empty() };
        let ring = HandRing::with_features(&mem, 4, extra);
        let table = mem.alloc(16, 16).unwrap();
        write_desc(&mem, table, ring.buf(8), 8, 0, 0);
        ring.desc(0, table, 16, 0, LAP1 | DESC_F_INDIRECT);
        assert_device_fails(ring.device(), DeviceError::IndirectNotNegotiated);
        // A direct chain is still served without the feature.
        let ring = HandRing::with_features(&mem, 4, extra);
        ring.desc(0, ring.buf(8), 8, 0, LAP1);
        let mut segs = Segments::<16>::new();
        assert!(ring.device().pop(&mut segs).unwrap().is_some());
    }
}
