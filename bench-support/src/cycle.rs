//! One buffer's round trip through a `virtq` driver queue and device queue, shared by
//! `virtq`'s `examples/cycle.rs` (instruction counts) and `benches/cycle.rs` (criterion).

use std::hint::black_box;

use virtq::testing::TestMemory;
use virtq::{Device, DeviceLayout, DriverLayout, DriverQueue, Segments, Sg};

/// Pops one chain and completes it in full; false if none was available.
#[inline(always)]
pub fn pop_complete<'m, L: DeviceLayout>(device: &mut Device<'m, TestMemory, L>, segs: &mut Segments<'m, 16>) -> bool {
    match device.pop(segs) {
        Ok(Some(chain)) => {
            let written = chain.writable_len();
            device.complete(chain, written);
            true
        }
        _ => false,
    }
}

/// add, kick_prepare, device pop + complete + publish, get_buf; checks the token. The
/// device's half is inlined into the round trip, as a device's loop would be; the baseline
/// pair's device half stays `#[inline]`, which gives it its lower count.
#[inline]
pub fn round_trip<'m, L: DriverLayout, R: DeviceLayout>(
    driver: &mut DriverQueue<u64, &'m TestMemory, (), L>,
    device: &mut Device<'m, TestMemory, R>,
    segs: &mut Segments<'m, 16>,
    sgs: &[Sg],
    token: u64,
) {
    driver.add_inbuf(sgs, token).expect("ring has room");
    // A bool, as the baseline's `should_notify`: the kick itself is not delivered.
    black_box(driver.kick_prepare().is_some());
    assert!(pop_complete(device, segs));
    device.publish_used();
    let used = driver.get_buf().expect("used buffer");
    assert_eq!(used.token, token);
}
