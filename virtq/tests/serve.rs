//! The device's burst call, `serve`: pop, hand to the caller, complete, publish once; on
//! all four layouts. Random interleavings with `pop` / `complete` are in
//! `proptest_exactly_once.rs`.

mod common;

use common::{Pair, LAYOUTS};
use virtq::testing::TestMemory;
use virtq::{DeviceError, LayoutKind, Segments, Sg, UsedBuf};

fn collect(p: &mut Pair<'_>) -> Vec<(u64, u32)> {
    let mut got = Vec::new();
    p.driver.get_bufs(usize::MAX, |u: UsedBuf<u64>| got.push((u.token, u.len)));
    got
}

/// Request `i`: `outs` readable segments holding `i`, then `ins` writable ones.
fn add_request(p: &mut Pair<'_>, mem: &TestMemory, token: u64, outs: u32, ins: u32) {
    let out: Vec<Sg> = (0..outs)
        .map(|_| {
            let sg = mem.alloc_sg(8);
            mem.write(sg.addr, &token.to_le_bytes());
            sg
        })
        .collect();
    let inn: Vec<Sg> = (0..ins).map(|_| mem.alloc_sg(16)).collect();
    p.driver.add_sgs(&[&out], &[&inn], token).unwrap();
}

#[test]
fn serve_hands_over_every_kind_of_chain_and_returns_what_it_wrote() {
    for layout in LAYOUTS {
        for indirect in [false, true] {
            // 8 entries, requests of 1 to 3 descriptors: chains straddle the ring's end.
            let mem = TestMemory::new(1 << 20);
            let mut p = Pair::of(&mem, layout, 8, true, indirect);
            let shapes = [(1, 0), (0, 1), (2, 1), (1, 2), (0, 1), (1, 0)];
            let mut token = 0u64;
            for lap in 0..6 {
                let mut want = Vec::new();
                for &(outs, ins) in &shapes[lap % 3..lap % 3 + 3] {
                    add_request(&mut p, &mem, token, outs, ins);
                    // The device writes the token into each writable segment.
                    want.push((token, 8 * ins));
                    token += 1;
                }
                let mut segs = Segments::<4>::new();
                let mut seen = Vec::new();
                let served = p
                    .device
                    .serve(usize::MAX, &mut segs, |chain, segs| {
                        assert_eq!(segs.len() as u16, chain.readable_segments() + chain.writable_segments());
                        let mut id = [0u8; 8];
                        let request = segs.iter().find(|s| !s.is_writable());
                        let t = match request {
                            Some(s) => {
                                s.read_at(0, &mut id);
                                u64::from_le_bytes(id)
                            }
                            // No request: the test knows the order.
                            None => want[seen.len()].0,
                        };
                        seen.push(t);
                        segs.iter().filter(|s| s.is_writable()).map(|s| s.write_at(0, &t.to_le_bytes()) as u32).sum()
                    })
                    .unwrap();
                assert_eq!(served, 3, "{layout:?} indirect {indirect} lap {lap}");
                let tokens: Vec<u64> = want.iter().map(|w| w.0).collect();
                assert_eq!(seen, tokens, "{layout:?}: served in ring order");
                // Completions are visible without any further call.
                assert_eq!(collect(&mut p), want, "{layout:?} indirect {indirect} lap {lap}");
                assert_eq!(p.device.serve(usize::MAX, &mut segs, |_, _| 0), Ok(0), "nothing left");
                assert_eq!(p.driver.num_free(), 8);
            }
            assert!(!p.driver.is_broken() && !p.device.is_broken());
        }
    }
}

#[test]
fn serve_stops_at_max_and_the_rest_stays_available() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 8, true, false);
        for t in 0..5 {
            add_request(&mut p, &mem, t, 0, 1);
        }
        let mut segs = Segments::<1>::new();
        assert_eq!(p.device.serve(0, &mut segs, |_, _| unreachable!()), Ok(0));
        assert_eq!(p.device.serve(2, &mut segs, |c, _| c.writable_len()), Ok(2));
        assert_eq!(collect(&mut p), [(0, 16), (1, 16)], "{layout:?}");
        // Short lengths end an in-order batch; each still comes back with its own.
        assert_eq!(p.device.serve(9, &mut segs, |c, _| c.writable_len() - 1), Ok(3));
        assert_eq!(collect(&mut p), [(2, 15), (3, 15), (4, 15)], "{layout:?}");
        // A length beyond the writable part is clamped, as `complete` does.
        add_request(&mut p, &mem, 5, 0, 1);
        assert_eq!(p.device.serve(9, &mut segs, |_, _| u32::MAX), Ok(1));
        assert_eq!(collect(&mut p), [(5, 16)], "{layout:?}");
    }
}

#[test]
fn serve_after_pop_completes_chains_the_caller_still_holds_in_any_order() {
    // Out of order only: an in-order device completes in the order it popped.
    for layout in [LayoutKind::Split, LayoutKind::Packed] {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 8, true, false);
        for t in 0..3 {
            add_request(&mut p, &mem, t, 0, 1);
        }
        let (held, _) = p.pop().unwrap();
        let mut segs = Segments::<1>::new();
        assert_eq!(p.device.serve(9, &mut segs, |_, _| 4), Ok(2));
        assert_eq!(collect(&mut p), [(1, 4), (2, 4)], "{layout:?}");
        p.device.complete(held, 7);
        p.device.publish_used();
        assert_eq!(collect(&mut p), [(0, 7)], "{layout:?}");
    }
}

#[test]
fn a_bad_chain_mid_serve_keeps_the_chains_before_it_and_latches_the_fault() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 8, true, false);
        for t in 0..3 {
            add_request(&mut p, &mem, t, 0, 1);
        }
        // The second buffer's descriptor (position 1 of a fresh ring, in every layout)
        // points outside guest memory.
        mem.write_u64(p.desc_addr(1), u64::MAX - 64);
        let mut segs = Segments::<1>::new();
        assert_eq!(p.device.serve(9, &mut segs, |c, _| c.writable_len()), Ok(1), "{layout:?}");
        assert!(matches!(p.device.fault(), Some(DeviceError::AddressOutOfRange { .. })), "{layout:?}");
        assert_eq!(p.device.serve(9, &mut segs, |_, _| unreachable!()), Err(DeviceError::Broken));
        // The chain served before the bad one reached the driver.
        assert_eq!(collect(&mut p), [(0, 16)], "{layout:?}");
    }
}

#[test]
fn a_bad_first_chain_is_the_error_of_the_call() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 8, true, false);
        add_request(&mut p, &mem, 0, 0, 1);
        mem.write_u64(p.desc_addr(0), u64::MAX - 64);
        let mut segs = Segments::<1>::new();
        let err = p.device.serve(9, &mut segs, |_, _| unreachable!()).unwrap_err();
        assert!(matches!(err, DeviceError::AddressOutOfRange { .. }), "{layout:?}: {err:?}");
        assert_eq!(p.device.fault(), Some(err));
    }
}

#[test]
fn a_chain_too_long_for_the_sink_stays_available_and_breaks_nothing() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 8, true, false);
        add_request(&mut p, &mem, 0, 1, 0);
        add_request(&mut p, &mem, 1, 2, 1);
        let mut small = Segments::<2>::new();
        assert_eq!(p.device.serve(9, &mut small, |_, _| 0), Ok(1), "{layout:?}");
        assert_eq!(p.device.serve(9, &mut small, |_, _| unreachable!()), Err(DeviceError::SinkFull));
        assert!(!p.device.is_broken(), "{layout:?}");
        let mut large = Segments::<3>::new();
        assert_eq!(p.device.serve(9, &mut large, |c, _| c.writable_len()), Ok(1), "{layout:?}");
        assert_eq!(collect(&mut p), [(0, 0), (1, 16)], "{layout:?}");
    }
}
