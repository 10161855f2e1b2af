//! One buffer's round trip, repeated: add, kick_prepare, device pop, device complete and
//! publish, get_buf. Used by `scripts/instructions.sh` to count instructions per cycle
//! under callgrind, comparing a statically chosen layout with run-time dispatch.
//!
//! `cargo run --release -p virtq --example cycle -- <layout> <static|dynamic> <cycles> [segments] [indirect]`
//! with layout one of split, split-in-order, packed, packed-in-order.
//!
//! With `CYCLE_BATCH=N` in the environment it streams instead: N adds, one kick_prepare,
//! the device pops and completes N chains and publishes once, then N get_bufs. The
//! device's half is a function of its own (`device_batch`), so callgrind tells the two
//! sides' costs apart. With `CYCLE_BURST=1` as well, the driver uses the burst calls
//! (`add_inbufs`, `get_bufs`) instead of one call per buffer, and the device serves the
//! batch with one `serve` call.

use std::hint::black_box;

use virtq::testing::TestMemory;
use virtq::{
    DeviceConfig, DeviceQueue, DriverQueue, Features, PackedDevice, PackedLayout, QueueConfig, RingLayout, Segments,
    Sg, SplitDevice, SplitLayout, Virtqueue,
};

const SIZE: u16 = 256;

#[path = "support/cycle.rs"]
mod support;
use support::{round_trip, Device};

fn cycles<'m, L: RingLayout>(
    driver: &mut DriverQueue<u64, &'m TestMemory, (), L>,
    device: &mut impl Device<'m>,
    sgs: &[Sg],
    n: u64,
) {
    let mut segs = Segments::<16>::new();
    for i in 0..n {
        round_trip(driver, device, &mut segs, sgs, i);
    }
}

/// Streaming: `batch` adds, one kick_prepare, the device's half (`device_batch`), then
/// `batch` get_bufs; `n` buffers in all.
fn streams<'m, L: RingLayout>(
    driver: &mut DriverQueue<u64, &'m TestMemory, (), L>,
    device: &mut impl Device<'m>,
    sgs: &[Sg],
    n: u64,
    batch: u64,
) {
    let mut segs = Segments::<16>::new();
    let burst = std::env::var_os("CYCLE_BURST").is_some();
    let burst_sgs = vec![sgs[0]; batch as usize];
    for first in (0..n).step_by(batch as usize) {
        if burst {
            let added = driver.add_inbufs(&burst_sgs, |i| first + i as u64).expect("ring has room");
            assert_eq!(added as u64, batch);
        } else {
            for token in first..first + batch {
                driver.add_inbuf(sgs, token).expect("ring has room");
            }
        }
        black_box(driver.kick_prepare().is_some());
        device_batch(device, &mut segs, batch, burst);
        if burst {
            let mut expect = first;
            let got = driver.get_bufs(batch as usize, |used| {
                assert_eq!(used.token, expect);
                expect += 1;
            });
            assert_eq!(got as u64, batch);
        } else {
            for token in first..first + batch {
                assert_eq!(driver.get_buf().expect("used buffer").token, token);
            }
        }
    }
}

/// The device's half of a streamed batch: pop and complete `batch` chains, then publish.
/// Never inlined, so that callgrind counts it apart from the driver's half.
#[inline(never)]
fn device_batch<'m>(device: &mut impl Device<'m>, segs: &mut Segments<'m, 16>, batch: u64, burst: bool) {
    if burst {
        assert_eq!(device.serve_full(segs, batch as usize) as u64, batch);
        return;
    }
    for _ in 0..batch {
        assert!(device.pop_complete(segs));
    }
    device.publish();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: cycle <split|split-in-order|packed|packed-in-order> <static|dynamic> <cycles> [segments]";
    let (layout, dispatch) = (args.get(1).expect(usage).as_str(), args.get(2).expect(usage).as_str());
    let n: u64 = args.get(3).expect(usage).parse().expect(usage);
    let nsegs: usize = args.get(4).map_or(1, |s| s.parse().expect(usage));
    let mut features = Features::VERSION_1 | Features::EVENT_IDX;
    match layout {
        "split" => {}
        "split-in-order" => features |= Features::IN_ORDER,
        "packed" => features |= Features::RING_PACKED,
        "packed-in-order" => features |= Features::RING_PACKED | Features::IN_ORDER,
        _ => panic!("{usage}"),
    }
    if args.get(5).is_some_and(|s| s == "indirect") {
        features |= Features::INDIRECT_DESC;
    }
    let mem = TestMemory::new(16 << 20);
    let sgs: Vec<Sg> = (0..nsegs).map(|_| mem.alloc_sg(64)).collect();
    let mut config = QueueConfig::new(0, SIZE, features);
    config.callbacks = false;
    let device_config = |d: [u64; 3]| DeviceConfig::new(SIZE, features, d[0], d[1], d[2]);
    let batch: u64 = std::env::var("CYCLE_BATCH").map_or(0, |b| b.parse().expect("CYCLE_BATCH: a number"));
    assert!(
        batch <= u64::from(SIZE) && n.is_multiple_of(batch.max(1)),
        "CYCLE_BATCH: at most {SIZE}, dividing <cycles>"
    );
    macro_rules! run {
        ($driver:expr, $device:expr) => {
            if batch > 0 {
                streams($driver, $device, &sgs, n, batch)
            } else {
                cycles($driver, $device, &sgs, n)
            }
        };
    }

    macro_rules! run_static {
        ($layout:ty, $device:ident) => {{
            let mut driver = DriverQueue::<u64, _, (), $layout>::new(config, &mem, ()).unwrap();
            let addrs = [driver.desc_addr(), driver.avail_addr(), driver.used_addr()];
            let mut device = $device::new(&mem, device_config(addrs)).unwrap();
            run!(&mut driver, &mut device);
        }};
    }
    match (layout, dispatch) {
        ("split", "static") => run_static!(SplitLayout<false>, SplitDevice),
        ("split-in-order", "static") => run_static!(SplitLayout<true>, SplitDevice),
        ("packed", "static") => run_static!(PackedLayout<false>, PackedDevice),
        ("packed-in-order", "static") => run_static!(PackedLayout<true>, PackedDevice),
        (_, "dynamic") => {
            let mut driver = Virtqueue::<u64, _, ()>::new(config, &mem, ()).unwrap();
            let addrs = [driver.desc_addr(), driver.avail_addr(), driver.used_addr()];
            let mut device = DeviceQueue::new(&mem, device_config(addrs)).unwrap();
            run!(&mut driver, &mut device);
        }
        _ => panic!("{usage}"),
    }
}
