//! Single-thread cost of one buffer's round trip (add, kick_prepare, device pop, device
//! complete and publish, get_buf), as in `examples/cycle.rs`, for every ring layout through
//! its fixed layout type (`SplitDriver`, `SplitInOrderDriver`, `PackedDriver`,
//! `PackedInOrderDriver` with `SplitDevice` or `PackedDevice`): buffers of 1, 4 and 16
//! direct segments, and of 4 and 16 segments with `VIRTIO_F_INDIRECT_DESC`.
//!
//! In the same run, the same cycle with rcore's `virtio-drivers` as the driver and
//! rust-vmm's `virtio-queue` as the device on one vm-memory region (split ring only; see
//! `virtq_bench_support::baseline`), twice: with the device's
//! `needs_notification` after each completion ("baseline"), and without it ("baseline-nn",
//! the same work as `virtq`'s cycle, whose device publishes without deciding on an
//! interrupt). At the end it prints virtq time / baseline time per segment count.
//!
//! `cargo bench -p virtq --bench cycle` (criterion arguments after `--`, e.g. a filter).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use criterion::Criterion;
use virtq::testing::TestMemory;
use virtq::{
    Device, DeviceConfig, DriverLayout, DriverQueue, Features, LayoutKind, PackedDriverLayout, QueueConfig, Segments,
    Sg, SplitDriverLayout,
};

use virtq_bench_support::baseline;

const SIZE: u16 = baseline::SIZE as u16;

/// (segments, indirect)
const BUFFERS: [(usize, bool); 5] = [(1, false), (4, false), (16, false), (4, true), (16, true)];
const BASELINES: [&str; 2] = ["baseline", "baseline-nn"];

fn buffer_name(segments: usize, indirect: bool) -> String {
    if indirect {
        format!("{segments}-indirect")
    } else {
        segments.to_string()
    }
}

thread_local! {
    /// Per benchmark id, the mean time per cycle of every batch criterion timed.
    static SAMPLES: RefCell<BTreeMap<String, Vec<f64>>> = const { RefCell::new(BTreeMap::new()) };
}

/// Runs `iters` cycles and records their mean time under `id`.
fn timed(id: &str, iters: u64, mut cycle: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        cycle();
    }
    let elapsed = start.elapsed();
    let per_cycle = elapsed.as_nanos() as f64 / iters.max(1) as f64;
    SAMPLES.with(|s| s.borrow_mut().entry(id.to_string()).or_default().push(per_cycle));
    elapsed
}

/// The median of the batch means recorded under `id`, in ns per cycle.
fn median(id: &str) -> Option<f64> {
    SAMPLES.with(|s| {
        let mut v = s.borrow().get(id)?.clone();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    })
}

use virtq_bench_support::cycle::round_trip as virtq_cycle;

fn bench_virtq(c: &mut Criterion, layout: LayoutKind, segments: usize, indirect: bool) {
    let mut features = layout.apply(Features::VERSION_1 | Features::EVENT_IDX);
    if indirect {
        features |= Features::INDIRECT_DESC;
    }
    let id = format!("cycle/{layout}/{}", buffer_name(segments, indirect));
    match layout {
        LayoutKind::Split => bench_layout::<SplitDriverLayout<false>>(c, &id, features, segments),
        LayoutKind::SplitInOrder => bench_layout::<SplitDriverLayout<true>>(c, &id, features, segments),
        LayoutKind::Packed => bench_layout::<PackedDriverLayout<false>>(c, &id, features, segments),
        LayoutKind::PackedInOrder => bench_layout::<PackedDriverLayout<true>>(c, &id, features, segments),
    }
}

fn bench_layout<L: DriverLayout>(c: &mut Criterion, id: &str, features: Features, segments: usize) {
    let mem = TestMemory::new(1 << 20);
    let sgs: Vec<Sg> = (0..segments).map(|_| mem.alloc_sg(baseline::SEG_LEN as u32)).collect();
    let mut config = QueueConfig::new(0, SIZE, features);
    config.callbacks = false;
    let mut driver = DriverQueue::<u64, _, (), L>::new(config, &mem, ()).unwrap();
    let device_config = DeviceConfig::new(SIZE, features, driver.desc_addr(), driver.avail_addr(), driver.used_addr());
    let mut device = Device::<_, L::Device>::new(&mem, device_config).unwrap();
    let mut segs = Segments::<16>::new();
    let mut token = 0u64;
    c.bench_function(id, |b| {
        b.iter_custom(|iters| {
            timed(id, iters, || {
                virtq_cycle(&mut driver, &mut device, &mut segs, &sgs, token);
                token = token.wrapping_add(1);
            })
        })
    });
}

fn bench_baseline(c: &mut Criterion, name: &str, segments: usize, indirect: bool) {
    let mut pair = baseline::Pair::new(segments, indirect, name == "baseline");
    let expected = (segments * baseline::SEG_LEN) as u32;
    let id = format!("cycle/{name}/{}", buffer_name(segments, indirect));
    c.bench_function(&id, |b| b.iter_custom(|iters| timed(&id, iters, || assert_eq!(pair.cycle(), expected))));
}

fn print_ratios() {
    let get = |name: &str, buf: &str| median(&format!("cycle/{name}/{buf}"));
    let ns = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.3}", a / b),
        _ => "-".to_string(),
    };
    let [l0, l1, l2, l3] = LayoutKind::ALL.map(LayoutKind::name);
    let header = format!("{:<12} {:>8} {:>15} {:>8} {:>16}", "segments", l0, l1, l2, l3);
    println!();
    println!("ns per cycle (median of the means of criterion's sample batches)");
    println!("{header} {:>9} {:>12}", BASELINES[0], BASELINES[1]);
    for (segments, indirect) in BUFFERS {
        let buf = buffer_name(segments, indirect);
        let names = LayoutKind::ALL.map(LayoutKind::name);
        let t: Vec<String> = names.iter().chain(&BASELINES).map(|name| ns(get(name, &buf))).collect();
        println!("{:<12} {:>8} {:>15} {:>8} {:>16} {:>9} {:>12}", buf, t[0], t[1], t[2], t[3], t[4], t[5]);
    }
    for (base, what) in [
        (BASELINES[0], "virtio-drivers + virtio-queue, with needs_notification"),
        (BASELINES[1], "virtio-drivers + virtio-queue, without needs_notification"),
    ] {
        println!();
        println!("virtq time / {base} time ({what})");
        println!("{header}");
        for (segments, indirect) in BUFFERS {
            let buf = buffer_name(segments, indirect);
            let r: Vec<String> = LayoutKind::ALL.iter().map(|l| ratio(get(l.name(), &buf), get(base, &buf))).collect();
            println!("{:<12} {:>8} {:>15} {:>8} {:>16}", buf, r[0], r[1], r[2], r[3]);
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    for (segments, indirect) in BUFFERS {
        for layout in LayoutKind::ALL {
            bench_virtq(&mut c, layout, segments, indirect);
        }
        for name in BASELINES {
            bench_baseline(&mut c, name, segments, indirect);
        }
    }
    c.final_summary();
    // `cargo bench` passes `--bench`; without it (`cargo test`) each bench ran once.
    if std::env::args().any(|a| a == "--bench") {
        print_ratios();
    }
}
