//! When completions reach the driver without `publish_used`: the device publishes by
//! itself each time a cache line of used entries fills (split: 8 used elements; packed: 4
//! used descriptors), or, in a packed in-order ring, each time a run of 16 completions
//! shares one entry. A
//! polling device loop that publishes only when it runs out of work still hands buffers
//! back while it drains, and the line moves to the driver once, full.

mod common;

use common::{Pair, LAYOUTS};
use virtq::testing::TestMemory;
use virtq::{LayoutKind, UsedBuf};

/// Entries in the test rings: two runs of the longest self-publishing interval.
const RING: u16 = 32;

/// Completions after which the device publishes by itself, per layout.
fn publishes_every(layout: LayoutKind) -> u64 {
    match layout {
        LayoutKind::Split | LayoutKind::SplitInOrder => 8,
        LayoutKind::Packed => 4,
        LayoutKind::PackedInOrder => 16,
    }
}

#[test]
fn the_device_publishes_by_itself_a_cache_line_at_a_time() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, RING, true, false);
        let every = publishes_every(layout);
        let mut token = 0u64;
        let mut reaped = Vec::new();
        // Two laps, so that the used positions wrap and the second lap meets the first
        // lap's entries (in order: unchanged ones, which the device does not re-write).
        for _lap in 0..2 {
            for _ in 0..RING {
                p.driver.add_inbuf(&[mem.alloc_sg(8)], token).unwrap();
                token += 1;
            }
            for completed in 1..=u64::from(RING) {
                let (chain, _) = p.pop().expect("a chain");
                p.device.complete(chain, 8);
                p.driver.get_bufs(usize::MAX, |u: UsedBuf<u64>| reaped.push((u.token, u.len)));
                let lap_start = token - u64::from(RING);
                let visible = completed / every * every;
                assert_eq!(
                    reaped.len() as u64,
                    lap_start + visible,
                    "{layout:?}: after {completed} completions of the lap, without publish_used"
                );
            }
        }
        p.device.publish_used();
        assert_eq!(p.driver.get_buf().map(|u| u.token), None, "{layout:?}: nothing was held back");
        let want: Vec<(u64, u32)> = (0..token).map(|t| (t, 8)).collect();
        assert_eq!(reaped, want, "{layout:?}: every buffer once, in order, with its length");
    }
}

#[test]
fn a_partial_line_waits_for_publish_used() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, RING, true, false);
        let held = publishes_every(layout) - 1;
        for token in 0..held {
            p.driver.add_inbuf(&[mem.alloc_sg(8)], token).unwrap();
        }
        for _ in 0..held {
            let (chain, _) = p.pop().expect("a chain");
            p.device.complete(chain, 8);
        }
        assert!(p.driver.get_buf().is_none(), "{layout:?}: published before the line filled");
        p.device.publish_used();
        let mut got = Vec::new();
        p.driver.get_bufs(usize::MAX, |u: UsedBuf<u64>| got.push(u.token));
        assert_eq!(got, (0..held).collect::<Vec<_>>(), "{layout:?}");
    }
}
