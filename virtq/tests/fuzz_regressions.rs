//! Regression tests for what the fuzz targets (`fuzz/`, run by `scripts/fuzz.sh`) and
//! the review around them found, each reproduced through the public API.
//!
//! Tests of bugs that are not fixed yet are `#[ignore = "BUG: ..."]`; run them with
//! `cargo test -p virtq --test fuzz_regressions -- --ignored`. When one is fixed, drop
//! its `ignore` (and, for the first, the tolerance in
//! `fuzz/fuzz_targets/driver_hostile_device.rs`, see `check_known_bugs`).

use virtq::testing::{CountingDma, TestMemory};
use virtq::{AddErrorKind, DeviceConfig, DeviceQueue, Features, LayoutKind, QueueConfig, Segments, Sg, Virtqueue};

mod common;

use common::LAYOUTS;

fn features(layout: LayoutKind) -> Features {
    common::layout_features(layout, false, false)
}

/// Found by `driver_hostile_device` in about 4,000 executions (input
/// `AAgABAIBYwAAAAYEAQoAAAAABAEKBQEJHQAFDgQEAAQSEg==` with `VIRTQ_FUZZ_KNOWN_BUGS=1`: a
/// split ring of one entry with `INDIRECT_DESC`, one buffer in flight, then a buffer of
/// four segments).
///
/// With indirect descriptors a buffer of up to `indirect_max` segments takes one ring
/// descriptor, so a ring of any size can hold it. When the ring is momentarily full, `add`
/// must say `NoSpace` (retryable: it succeeds once a buffer comes back), as Linux does
/// (`-ENOSPC`). It says `TooManySegments`, which is documented as permanent ("more
/// segments than the ring can ever hold"): a caller that retries only retryable errors
/// drops a buffer that would have fitted.
///
/// Cause: `DriverCore::plan` (`virtq/src/driver/core.rs`) decides `indirect` with
/// `&& self.num_free > 0`, then reports `TooManySegments` whenever `!indirect && total >
/// size`; the permanent check should use whether the buffer can ever go indirect,
/// regardless of `num_free`.
#[test]
fn full_indirect_ring_reports_no_space_for_a_buffer_longer_than_the_ring() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 16);
        let f = features(layout) | Features::INDIRECT_DESC;
        let mut q = Virtqueue::<u64, _, _>::new(QueueConfig::new(0, 2, f), &mem, ()).unwrap();
        let mut device =
            DeviceQueue::new(&mem, DeviceConfig::new(q.vring_size(), f, q.desc_addr(), q.avail_addr(), q.used_addr()))
                .unwrap();
        let three = [mem.alloc_sg(8), mem.alloc_sg(8), mem.alloc_sg(8)];
        // With room, three segments go into one indirect descriptor of a two-entry ring.
        q.add_outbuf(&three, 1).unwrap();
        q.add_outbuf(&[mem.alloc_sg(8)], 2).unwrap();
        assert_eq!(q.num_free(), 0);
        let e = q.add_outbuf(&three, 3).unwrap_err();
        assert_eq!(e.kind, AddErrorKind::NoSpace, "{layout:?}: a full ring is a retryable condition");
        assert!(e.is_retryable());
        // And indeed: once a buffer comes back, the same buffer fits.
        let mut segs = Segments::<4>::new();
        let chain = device.pop(&mut segs).unwrap().unwrap();
        device.complete(chain, 0);
        device.publish_used();
        assert_eq!(q.get_buf().unwrap().token, 1);
        q.add_outbuf(&three, 3).unwrap();
    }
}

/// Found by `driver_hostile_device` in about 250,000 executions (artifact
/// `crash-d9e983ea2b73fd6c4b37059da3a50d0dbcb5f445`: a packed in-order ring of 35 entries,
/// `CountingDma` failing a mapping in the middle of a three-segment buffer; the honest
/// device then reported `BadDescriptorFlags` for the honest driver's ring).
///
/// A packed `add` writes each descriptor after the head as soon as its segment is mapped,
/// with the AVAIL/USED bits of the current lap, and writes the head's flags last. When a
/// later segment fails to map (`NoMemory`), the mappings are undone but the descriptors
/// already written stay marked available. The next buffer reuses the head position; if it
/// is shorter, the device, having consumed it, finds the stale descriptor at its next
/// position marked available for its lap and takes it for the head of a new chain: it
/// pops a buffer the driver never made available, or (here: the stale descriptor has
/// `NEXT` and the one after it is not available) latches broken with
/// `BadDescriptorFlags`. The API promises "on error ... nothing was published".
///
/// Cause: `PackedDriverLayout::add` (`virtq/src/packed/driver.rs`), the direct-chain loop:
/// `desc.write(DescWords { .., hi16: flags })` for `n > 0` publishes before the whole
/// chain is mapped, and the `NoMemory` path (`core.unmap_chain(id, n)`) does not take
/// those flags back. Linux's `virtqueue_add_packed` has the same shape. Fix: on that path,
/// rewrite the flags of the descriptors written so far to a value that is not available
/// on their lap (or map every segment before writing any descriptor). Split rings are not
/// affected: nothing is visible before `avail.idx` moves.
#[test]
fn failed_packed_add_leaves_no_descriptor_available() {
    for layout in [LayoutKind::Packed, LayoutKind::PackedInOrder] {
        let mem = TestMemory::new(1 << 16);
        let dma = CountingDma::new(&mem);
        let f = features(layout);
        let mut q = Virtqueue::<u64, _, _>::new(QueueConfig::new(0, 8, f), &dma, ()).unwrap();
        let config = DeviceConfig::new(q.vring_size(), f, q.desc_addr(), q.avail_addr(), q.used_addr());
        let mut device = DeviceQueue::new(&mem, config).unwrap();
        let sg = |len| Sg::new(CountingDma::cpu_addr(mem.alloc_sg(len).addr), len);
        // The third mapping fails: two descriptors were written, the head's flags were not.
        dma.fail_map_at(2);
        let e = q.add_outbuf(&[sg(8), sg(8), sg(8)], 1).unwrap_err();
        assert_eq!(e.kind, AddErrorKind::NoMemory);
        assert_eq!(dma.maps(), dma.unmaps(), "the mappings were undone");
        // A one-segment buffer at the same position, popped and completed.
        q.add_outbuf(&[sg(8)], 2).unwrap();
        let mut segs = Segments::<4>::new();
        let chain = device.pop(&mut segs).unwrap().expect("buffer 2");
        assert_eq!(segs.len(), 1);
        device.complete(chain, 0);
        device.publish_used();
        // Nothing else was made available.
        let next = device.pop(&mut segs);
        assert!(matches!(next, Ok(None)), "{layout:?}: the device found {next:?} after the only buffer");
        assert_eq!(q.get_buf().map(|u| u.token), Some(2));
    }
}

/// A `UsedSnapshot` taken before `resize` to a smaller packed ring names a position beyond
/// the new ring. `poll` then trips `debug_assert!(i < self.size)` in `PackedRing::desc`
/// (`virtq/src/packed/mod.rs`): a panic in debug builds; release builds clamp the position
/// and answer from an unrelated descriptor. Memory-safe either way, and a stale snapshot
/// is arguably the caller's mistake, but `poll` is a safe function whose argument is an
/// opaque `Copy` value that a caller can easily keep across a resize (or pass to another
/// queue): it should answer (e.g. `true`, "look again") rather than panic. Split rings
/// compare indices and are not affected.
#[test]
fn stale_snapshot_after_resize_does_not_panic() {
    for layout in [LayoutKind::Packed, LayoutKind::PackedInOrder] {
        let mem = TestMemory::new(1 << 16);
        let f = features(layout);
        let mut q = Virtqueue::<u64, _, _>::new(QueueConfig::new(0, 8, f), &mem, ()).unwrap();
        let mut device =
            DeviceQueue::new(&mem, DeviceConfig::new(q.vring_size(), f, q.desc_addr(), q.avail_addr(), q.used_addr()))
                .unwrap();
        // Seven round trips: the driver's used position is 7.
        for t in 0..7 {
            q.add_inbuf(&[mem.alloc_sg(8)], t).unwrap();
            let mut segs = Segments::<1>::new();
            let chain = device.pop(&mut segs).unwrap().unwrap();
            device.complete(chain, 8);
            device.publish_used();
            assert_eq!(q.get_buf().unwrap().token, t);
        }
        let snapshot = q.enable_cb_prepare();
        q.resize(4, |_| {}).unwrap();
        let _ = q.poll(snapshot);
    }
}

/// An in-order device merges consecutive full completions into one used entry and counts
/// them in `InOrderRun::count: u16` (`virtq/src/split/device.rs` `complete`,
/// `run.count += 1`; `virtq/src/packed/device.rs`, `run.count += chain.descs`). The count
/// is never read, but its increment is checked arithmetic: a device that completes 65,536
/// chains in full without publishing panics with "attempt to add with overflow" in debug
/// builds. A hostile driver can supply that many chains (here: one descriptor, made
/// available again and again), and a device loop of the shape "pop and complete until the
/// ring is empty, then publish" (`MockDevice::serve`) completes them as long as the driver
/// keeps up. Low severity: such a device never returns control while the driver keeps
/// feeding it, but the crate promises that no driver input makes the device panic.
#[test]
fn in_order_device_survives_many_unpublished_full_completions() {
    let mem = TestMemory::new(1 << 16);
    let f = Features::VERSION_1 | Features::IN_ORDER;
    // A split ring of one entry laid out by hand, as a hostile driver would.
    let (desc, avail, used) = (TestMemory::BASE, TestMemory::BASE + 0x100, TestMemory::BASE + 0x200);
    let buf = TestMemory::BASE + 0x1000;
    mem.write_u64(desc, buf);
    mem.write_u32(desc + 8, 8);
    mem.write_u16(desc + 12, virtq::split::DESC_F_WRITE);
    let mut device = DeviceQueue::new(&mem, DeviceConfig::new(1, f, desc, avail, used)).unwrap();
    let mut segs = Segments::<1>::new();
    for idx in 1..=70_000u32 {
        // The same head, made available once more.
        mem.write_u16(avail + 2, idx as u16);
        let chain = device.pop(&mut segs).unwrap().expect("a chain");
        device.complete(chain, 8);
    }
    device.publish_used();
}
