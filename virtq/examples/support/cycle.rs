//! One buffer's round trip through a driver queue and a device queue, shared by
//! `examples/cycle.rs` (instruction counts) and `benches/cycle.rs` (criterion).

use std::hint::black_box;

use virtq::testing::TestMemory;
use virtq::{DeviceQueue, DriverQueue, PackedDevice, RingLayout, Segments, Sg, SplitDevice};

/// The device half of a round trip, for the fixed and the run-time device types.
pub trait Device<'m> {
    /// Pops one chain and completes it in full; false if none was available.
    fn pop_complete(&mut self, segs: &mut Segments<'m, 16>) -> bool;
    /// Serves up to `max` chains in one call, completing each in full; how many.
    fn serve_full(&mut self, segs: &mut Segments<'m, 16>, max: usize) -> usize;
    /// Makes the completions visible to the driver.
    fn publish(&mut self);
    /// Pops one chain, completes it in full and publishes; false if none was available.
    fn round(&mut self, segs: &mut Segments<'m, 16>) -> bool;
}

macro_rules! device_round {
    ($t:ty) => {
        impl<'m> Device<'m> for $t {
            #[inline(always)]
            fn pop_complete(&mut self, segs: &mut Segments<'m, 16>) -> bool {
                match self.pop(segs) {
                    Ok(Some(chain)) => {
                        let written = chain.writable_len();
                        self.complete(chain, written);
                        true
                    }
                    _ => false,
                }
            }
            #[inline(always)]
            fn serve_full(&mut self, segs: &mut Segments<'m, 16>, max: usize) -> usize {
                self.serve(max, segs, |chain, _| chain.writable_len()).unwrap_or(0)
            }
            #[inline(always)]
            fn publish(&mut self) {
                self.publish_used();
            }
            // Inlined into the round trip, as a device's loop would be; the baseline pair's
            // device half stays `#[inline]`, which gives it its lower count.
            #[inline(always)]
            fn round(&mut self, segs: &mut Segments<'m, 16>) -> bool {
                match self.pop(segs) {
                    Ok(Some(chain)) => {
                        let written = chain.writable_len();
                        self.complete(chain, written);
                        self.publish_used();
                        true
                    }
                    _ => false,
                }
            }
        }
    };
}
device_round!(SplitDevice<'m, TestMemory>);
device_round!(PackedDevice<'m, TestMemory>);
device_round!(DeviceQueue<'m, TestMemory>);

/// add, kick_prepare, device pop + complete + publish, get_buf; checks the token.
#[inline]
pub fn round_trip<'m, L: RingLayout>(
    driver: &mut DriverQueue<u64, &'m TestMemory, (), L>,
    device: &mut impl Device<'m>,
    segs: &mut Segments<'m, 16>,
    sgs: &[Sg],
    token: u64,
) {
    driver.add_inbuf(sgs, token).expect("ring has room");
    // A bool, as the baseline's `should_notify`: the kick itself is not delivered.
    black_box(driver.kick_prepare().is_some());
    assert!(device.round(segs));
    let used = driver.get_buf().expect("used buffer");
    assert_eq!(used.token, token);
}
