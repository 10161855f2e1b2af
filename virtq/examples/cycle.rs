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
    AnyDriverLayout, Device, DeviceConfig, DeviceLayout, DriverLayout, DriverQueue, Features, LayoutKind,
    PackedDriverLayout, QueueConfig, Segments, Sg, SplitDriverLayout,
};

const SIZE: u16 = 256;

use virtq_bench_support::cycle::{pop_complete, round_trip};

// Out of line, so that each layout compiles on its own rather than inside one `main`
// whose register allocation any change elsewhere would reshuffle.
#[inline(never)]
fn cycles<'m, L: DriverLayout>(
    driver: &mut DriverQueue<u64, &'m TestMemory, (), L>,
    device: &mut Device<'m, TestMemory, L::Device>,
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
// Out of line, as `cycles`.
#[inline(never)]
fn streams<'m, L: DriverLayout>(
    driver: &mut DriverQueue<u64, &'m TestMemory, (), L>,
    device: &mut Device<'m, TestMemory, L::Device>,
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

/// The device's half of a streamed batch: pop and complete `batch` chains, then publish
/// (or one `serve` call with `burst`). Never inlined, so that callgrind counts it apart
/// from the driver's half.
#[inline(never)]
fn device_batch<'m, L: DeviceLayout>(
    device: &mut Device<'m, TestMemory, L>,
    segs: &mut Segments<'m, 16>,
    batch: u64,
    burst: bool,
) {
    if burst {
        let served = device.serve(batch as usize, segs, |chain, _| chain.writable_len());
        assert_eq!(served, Ok(batch as usize));
        return;
    }
    for _ in 0..batch {
        assert!(pop_complete(device, segs));
    }
    device.publish_used();
}

/// Creates both ends of layout `L` and runs `n` round trips, or streams them in batches.
fn run<L: DriverLayout>(mem: &TestMemory, features: Features, sgs: &[Sg], n: u64, batch: u64) {
    let mut config = QueueConfig::new(0, SIZE, features);
    config.callbacks = false;
    let mut driver = DriverQueue::<u64, _, (), L>::new(config, mem, ()).unwrap();
    let device_config = DeviceConfig::new(SIZE, features, driver.desc_addr(), driver.avail_addr(), driver.used_addr());
    let mut device = Device::<_, L::Device>::new(mem, device_config).unwrap();
    if batch > 0 {
        streams(&mut driver, &mut device, sgs, n, batch)
    } else {
        cycles(&mut driver, &mut device, sgs, n)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: cycle <split|split-in-order|packed|packed-in-order> <static|dynamic> <cycles> [segments]";
    let (layout, dispatch) = (args.get(1).expect(usage).as_str(), args.get(2).expect(usage).as_str());
    let layout: LayoutKind = layout.parse().expect(usage);
    let n: u64 = args.get(3).expect(usage).parse().expect(usage);
    let nsegs: usize = args.get(4).map_or(1, |s| s.parse().expect(usage));
    let mut features = layout.apply(Features::VERSION_1 | Features::EVENT_IDX);
    if args.get(5).is_some_and(|s| s == "indirect") {
        features |= Features::INDIRECT_DESC;
    }
    let mem = TestMemory::new(16 << 20);
    let sgs: Vec<Sg> = (0..nsegs).map(|_| mem.alloc_sg(64)).collect();
    let batch: u64 = std::env::var("CYCLE_BATCH").map_or(0, |b| b.parse().expect("CYCLE_BATCH: a number"));
    assert!(
        batch <= u64::from(SIZE) && n.is_multiple_of(batch.max(1)),
        "CYCLE_BATCH: at most {SIZE}, dividing <cycles>"
    );
    match (layout, dispatch) {
        (LayoutKind::Split, "static") => run::<SplitDriverLayout<false>>(&mem, features, &sgs, n, batch),
        (LayoutKind::SplitInOrder, "static") => run::<SplitDriverLayout<true>>(&mem, features, &sgs, n, batch),
        (LayoutKind::Packed, "static") => run::<PackedDriverLayout<false>>(&mem, features, &sgs, n, batch),
        (LayoutKind::PackedInOrder, "static") => run::<PackedDriverLayout<true>>(&mem, features, &sgs, n, batch),
        (_, "dynamic") => run::<AnyDriverLayout>(&mem, features, &sgs, n, batch),
        _ => panic!("{usage}"),
    }
}
