//! The burst calls, `add_inbufs` / `add_outbufs` (one single-segment buffer per element,
//! published together) and `get_bufs`, on all four layouts. Random interleavings with the
//! one-at-a-time calls are in `proptest_exactly_once.rs`.

mod common;

use common::{layout_features, Pair, LAYOUTS};
use virtq::testing::{CountingDma, TestMemory};
use virtq::{AddErrorKind, DeviceQueue, Fault, LayoutKind, QueueConfig, Sg, UsedBuf, Virtqueue};

fn collect(p: &mut Pair<'_>, max: usize) -> Vec<(u64, u32)> {
    let mut got = Vec::new();
    let n = p.driver.get_bufs(max, |u: UsedBuf<u64>| got.push((u.token, u.len)));
    assert_eq!(n, got.len());
    got
}

#[test]
fn bursts_cross_the_ring_end_lap_after_lap_and_come_back_in_order() {
    for layout in LAYOUTS {
        // 5 entries: packed rings need not be powers of two, and bursts of 3 then straddle
        // the end at a different place on every lap.
        let size = if !layout.is_packed() { 4 } else { 5 };
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, size, true, false);
        let mut next = 0u64;
        for lap in 0..7u32 {
            let sgs: Vec<Sg> = (0..3).map(|i| mem.alloc_sg(10 + i + lap)).collect();
            let first = next;
            assert_eq!(p.driver.add_inbufs(&sgs, |i| first + i as u64), Ok(3), "{layout:?} lap {lap}");
            next += 3;
            assert_eq!(p.driver.num_free(), size - 3);
            let mut popped = Vec::new();
            while let Some((chain, segs)) = p.pop() {
                assert_eq!(segs.len(), 1);
                assert!(segs[0].is_writable());
                popped.push((segs[0].addr(), segs[0].len()));
                let len = chain.writable_len() - 1;
                p.device.complete(chain, len);
            }
            p.device.publish_used();
            let sent: Vec<_> = sgs.iter().map(|s| (s.addr, s.len)).collect();
            assert_eq!(popped, sent, "{layout:?} lap {lap}: the device sees the burst in order");
            let want: Vec<_> = sgs.iter().enumerate().map(|(i, s)| (first + i as u64, s.len - 1)).collect();
            assert_eq!(collect(&mut p, usize::MAX), want, "{layout:?} lap {lap}");
            assert_eq!(p.driver.num_free(), size);
            assert!(!p.driver.is_broken());
        }
    }
}

#[test]
fn a_burst_adds_what_fits_and_makes_tokens_only_for_those() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 4, false, false);
        p.driver.add_outbuf(&[mem.alloc_sg(8)], 100).unwrap();
        let sgs: Vec<Sg> = (0..6).map(|_| mem.alloc_sg(8)).collect();
        let mut asked = Vec::new();
        let added = p.driver.add_outbufs(&sgs, |i| {
            asked.push(i);
            i as u64
        });
        assert_eq!(added, Ok(3), "{layout:?}");
        assert_eq!(asked, [0, 1, 2], "{layout:?}: one token per added buffer");
        assert_eq!(p.driver.num_free(), 0);
        let e = p.driver.add_outbufs(&sgs[3..], |_| unreachable!("no room, no token"));
        assert_eq!(e, Err(AddErrorKind::NoSpace));
        assert_eq!(p.driver.add_inbufs(&[], |_| unreachable!()), Ok(0), "an empty burst is not an error");

        // The rest go in once buffers come back.
        assert_eq!(p.device_echo_all(), 4);
        assert_eq!(collect(&mut p, 2), [(100, 0), (0, 0)], "{layout:?}: at most `max`");
        assert_eq!(p.driver.add_outbufs(&sgs[3..], |i| 3 + i as u64), Ok(2));
        assert_eq!(collect(&mut p, usize::MAX), [(1, 0), (2, 0)]);
        assert_eq!(p.device_echo_all(), 2);
        assert_eq!(collect(&mut p, usize::MAX), [(3, 0), (4, 0)]);

        p.driver.break_queue();
        assert_eq!(p.driver.add_inbufs(&sgs, |_| unreachable!()), Err(AddErrorKind::Broken));
        assert_eq!(p.driver.get_bufs(8, |_| unreachable!()), 0);
    }
}

#[test]
fn only_split_rings_prod_the_device_when_a_readable_burst_finds_no_room() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 2, false, false);
        let sgs = [mem.alloc_sg(4), mem.alloc_sg(4)];
        assert_eq!(p.driver.add_inbufs(&sgs, |i| i as u64), Ok(2));
        assert_eq!(p.driver.add_inbufs(&sgs, |i| i as u64), Err(AddErrorKind::NoSpace));
        assert_eq!(p.bell.kicks(), 0, "{layout:?}: never for writable buffers");
        assert_eq!(p.driver.add_outbufs(&sgs, |i| i as u64), Err(AddErrorKind::NoSpace));
        assert_eq!(p.bell.kicks(), p.is_split() as u64, "{layout:?}");
    }
}

#[test]
fn a_burst_is_one_kick_window() {
    for layout in LAYOUTS {
        for event_idx in [false, true] {
            let mem = TestMemory::new(1 << 20);
            let mut p = Pair::of(&mem, layout, 8, event_idx, false);
            let sgs: Vec<Sg> = (0..3).map(|_| mem.alloc_sg(4)).collect();
            assert!(!p.device.enable_notifications());
            p.driver.add_inbufs(&sgs, |i| i as u64).unwrap();
            assert!(p.driver.kick_prepare().is_some(), "{layout:?} event_idx={event_idx}");
            // The device has not caught up: with event idx its event lies behind this
            // burst, so no kick; without, notifications stay on.
            p.driver.add_inbufs(&sgs, |i| 3 + i as u64).unwrap();
            assert_eq!(p.driver.kick_prepare().is_some(), !event_idx, "{layout:?} event_idx={event_idx}");
            p.device.disable_notifications();
            assert_eq!(p.device_echo_all(), 6);
            assert_eq!(collect(&mut p, usize::MAX).len(), 6);
            assert!(!p.device.enable_notifications());
            p.driver.add_outbufs(&sgs[..1], |_| 9).unwrap();
            assert!(p.driver.kick_prepare().is_some(), "{layout:?} event_idx={event_idx}");
        }
    }
}

#[test]
fn a_mapping_failure_ends_the_burst_and_every_mapping_is_undone() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let dma = CountingDma::new(&mem);
        let features = layout_features(layout, false, false);
        let mut driver = Virtqueue::<u32, _, _>::new(QueueConfig::new(0, 8, features), &dma, ()).unwrap();
        let sgs: Vec<Sg> =
            (0..4).map(|_| mem.alloc_sg(8)).map(|s| Sg::new(CountingDma::cpu_addr(s.addr), s.len)).collect();
        dma.fail_map_at(2);
        assert_eq!(driver.add_inbufs(&sgs, |i| i as u32), Ok(2), "{layout:?}: the two mapped before");
        assert_eq!(driver.num_free(), 6);
        dma.fail_map_at(dma.maps());
        assert_eq!(driver.add_inbufs(&sgs[2..], |_| unreachable!()), Err(AddErrorKind::NoMemory));
        assert_eq!(driver.add_inbufs(&sgs[2..], |i| 2 + i as u32), Ok(2));
        assert_eq!(driver.add_outbufs_premapped(&[mem.alloc_sg(8)], |_| 4), Ok(1));
        assert_eq!(dma.maps(), 4, "premapped buffers are not mapped");

        let mut device = DeviceQueue::new(&mem, common::device_config(&driver, features)).unwrap();
        let mut segs = Vec::new();
        while let Some(chain) = device.pop(&mut segs).unwrap() {
            device.complete(chain, 0);
        }
        device.publish_used();
        let mut tokens = Vec::new();
        assert_eq!(driver.get_bufs(usize::MAX, |u| tokens.push(u.token)), 5);
        assert_eq!(tokens, [0, 1, 2, 3, 4], "{layout:?}");
        assert_eq!((dma.maps(), dma.unmaps()), (4, 4), "{layout:?}");
    }
}

#[test]
fn get_bufs_stops_at_a_bad_used_entry_and_the_tokens_stay_recoverable() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 4, false, false);
        let sgs: Vec<Sg> = (0..3).map(|_| mem.alloc_sg(8)).collect();
        p.driver.add_inbufs(&sgs, |i| i as u64).unwrap();
        let (chain, _) = p.pop().unwrap();
        p.device.complete(chain, 8);
        p.device.publish_used();
        // The device then writes a used entry naming id 9, which is out of range.
        if p.is_split() {
            mem.write_u32(p.used_elem_addr(1), 9);
            mem.write_u16(p.driver.used_addr() + 2, 2);
        } else {
            mem.write_u16(p.desc_addr(1) + 12, 9);
            mem.write_u16(p.desc_addr(1) + 14, virtq::packed::DESC_F_AVAIL | virtq::packed::DESC_F_USED);
        }
        assert_eq!(collect(&mut p, usize::MAX), [(0, 8)], "{layout:?}: the good one, then stop");
        assert!(p.driver.is_broken());
        assert_eq!(p.driver.fault(), Some(Fault::UsedIdOutOfRange { id: 9 }));
        let mut left: Vec<_> = std::iter::from_fn(|| p.driver.detach_unused_buf()).collect();
        left.sort();
        assert_eq!(left, [1, 2], "{layout:?}");
    }
}

#[test]
fn an_in_order_run_is_taken_in_pieces_when_max_is_smaller() {
    for layout in [LayoutKind::SplitInOrder, LayoutKind::PackedInOrder] {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 8, true, false);
        let sgs: Vec<Sg> = (0..5).map(|i| mem.alloc_sg(10 + i)).collect();
        p.driver.add_inbufs(&sgs, |i| i as u64).unwrap();
        // One used entry for all five; the last one short.
        let chains: Vec<_> = (0..5).map(|_| p.pop().unwrap().0).collect();
        for (i, c) in chains.into_iter().enumerate() {
            let len = if i == 4 { 3 } else { c.writable_len() };
            p.device.complete(c, len);
        }
        p.device.publish_used();
        assert_eq!(collect(&mut p, 2), [(0, 10), (1, 11)], "{layout:?}");
        assert!(p.driver.has_used());
        assert_eq!(p.driver.get_buf().map(|u| (u.token, u.len)), Some((2, 12)));
        assert_eq!(collect(&mut p, 8), [(3, 13), (4, 3)], "{layout:?}");
        assert!(!p.driver.has_used());
        assert_eq!(p.driver.num_free(), 8);
        assert!(!p.driver.is_broken());
    }
}

#[test]
fn a_panicking_token_breaks_the_queue_and_every_token_before_it_comes_back() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 8, false, false);
        let sgs: Vec<Sg> = (0..4).map(|_| mem.alloc_sg(8)).collect();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            p.driver.add_inbufs(&sgs, |i| if i == 2 { panic!("token {i}") } else { i as u64 })
        }));
        assert!(result.is_err());
        assert!(p.driver.is_broken(), "{layout:?}: a half-recorded burst latches the queue broken");
        assert_eq!(p.driver.add_inbufs(&sgs, |_| unreachable!()), Err(AddErrorKind::Broken));
        let mut back: Vec<_> = std::iter::from_fn(|| p.driver.detach_unused_buf()).collect();
        back.sort();
        assert_eq!(back, [0, 1], "{layout:?}: the tokens made before the panic");
        p.driver.reset(|_| unreachable!("detached already"));
        assert!(!p.driver.is_broken());
        assert_eq!(p.driver.num_free(), 8);
    }
}

#[test]
fn a_mapping_failure_anywhere_around_the_ring_end_leaves_a_working_ring() {
    for layout in LAYOUTS {
        // 5 entries on packed rings, so that the burst's start, its failure and the ring's
        // end fall at every relative place.
        let size: u16 = if !layout.is_packed() { 4 } else { 5 };
        for start in 0..size {
            for fail_after in 0..size as u64 {
                let mem = TestMemory::new(1 << 20);
                let dma = CountingDma::new(&mem);
                let features = layout_features(layout, false, false);
                let mut driver = Virtqueue::<u64, _, _>::new(QueueConfig::new(0, size, features), &dma, ()).unwrap();
                let mut device = DeviceQueue::new(&mem, common::device_config(&driver, features)).unwrap();
                let sgs: Vec<Sg> = (0..size)
                    .map(|i| mem.alloc_sg(8 + u32::from(i)))
                    .map(|s| Sg::new(CountingDma::cpu_addr(s.addr), s.len))
                    .collect();
                // Move both ends to `start`.
                for t in 0..start {
                    driver.add_inbuf(&sgs[..1], 1000 + u64::from(t)).unwrap();
                }
                serve_all(&mut driver, &mut device);
                let case = format!("{layout:?} start {start} fail after {fail_after}");
                dma.fail_map_at(dma.maps() + fail_after);
                let got = driver.add_inbufs(&sgs, |i| i as u64);
                if fail_after == 0 {
                    assert_eq!(got, Err(AddErrorKind::NoMemory), "{case}");
                } else {
                    assert_eq!(got, Ok(fail_after as usize), "{case}");
                }
                let (lens, tokens) = serve_all(&mut driver, &mut device);
                let want_lens: Vec<u32> = sgs[..fail_after as usize].iter().map(|s| s.len).collect();
                assert_eq!(lens, want_lens, "{case}: the device sees exactly the mapped prefix");
                let want: Vec<(u64, u32)> = (0..fail_after).map(|t| (t, 1)).collect();
                assert_eq!(tokens, want, "{case}");
                assert_eq!(driver.num_free(), size, "{case}");
                // A whole lap afterwards still works.
                dma.fail_map_at(u64::MAX);
                assert_eq!(driver.add_inbufs(&sgs, |i| 100 + i as u64), Ok(size as usize), "{case}");
                let (lens, tokens) = serve_all(&mut driver, &mut device);
                assert_eq!(lens.len(), size as usize, "{case}");
                assert_eq!(tokens, (0..u64::from(size)).map(|t| (100 + t, 1)).collect::<Vec<_>>(), "{case}");
                assert!(!driver.is_broken(), "{case}");
                assert_eq!(dma.maps(), dma.unmaps(), "{case}");
            }
        }
    }
}

/// The device completes every available chain with length 1; the driver takes them all
/// back. Returns the chains' segment lengths, as the device saw them, and what came back.
fn serve_all<'m, D: virtq::Dma>(
    driver: &mut Virtqueue<u64, D, ()>,
    device: &mut DeviceQueue<'m, TestMemory>,
) -> (Vec<u32>, Vec<(u64, u32)>) {
    let mut segs = Vec::new();
    let mut lens = Vec::new();
    while let Some(chain) = device.pop(&mut segs).unwrap() {
        lens.push(segs[0].len());
        device.complete(chain, 1);
    }
    device.publish_used();
    let mut tokens = Vec::new();
    driver.get_bufs(usize::MAX, |u| tokens.push((u.token, u.len)));
    (lens, tokens)
}
