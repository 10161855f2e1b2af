//! The virtio-net driver against a real device: DPDK's testpmd with a `net_vhost` port.
//!
//! - A loop through testpmd's forwarding (`io`, or `macswap`) on the split, packed and
//!   packed in-order rings, with 1 and 2 queue pairs: frames of random sizes from 60 to
//!   9000 bytes (most spanning several mergeable receive buffers), each carrying its queue,
//!   a sequence number and a checksum. Nothing may arrive corrupted, duplicated or out of
//!   order; drops are counted and printed.
//! - Without `MRG_RXBUF` (frames up to 1514 bytes in one buffer each).
//! - testpmd killed mid-run: the driver fails cleanly (a disconnect, within seconds) and
//!   gets every buffer back.
//!
//! Frames per loop run, over all pairs of the run: `VIRTQ_NET_LOOP_FRAMES`, by default
//! 1,000,000 in a release build and 20,000 in a debug one (which spends its time
//! generating and checking frames). CI runs both; the full run alone:
//!
//! ```text
//! cargo test --release -p virtq-vhost-user --test net_dpdk
//! ```
//!
//! Needs `dpdk-testpmd` (`apt-get install dpdk-dev`); without it each test is marked
//! ignored (build.rs looks).

mod net_util;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use net_util::{serial, testpmd, Testpmd};
use virtq_vhost_user::net::traffic::{run_loop, LoopOptions, LoopReport};
use virtq_vhost_user::net::wire::feature;
use virtq_vhost_user::net::{NetDevice, NetError, NetOptions, QueueError};
use virtq_vhost_user::virtq::Features;

#[derive(Clone, Copy, Debug)]
enum Layout {
    Split,
    Packed,
    PackedInOrder,
}

impl Layout {
    fn options(self, pairs: u16) -> NetOptions {
        let packed = !matches!(self, Layout::Split);
        NetOptions {
            queue_pairs: pairs,
            packed,
            in_order: matches!(self, Layout::PackedInOrder),
            required_features: if packed { Features::RING_PACKED.bits() } else { 0 },
            // Room for 9000-byte frames (testpmd takes the frontend's MTU).
            mtu: 9000,
            ..Default::default()
        }
    }
}

fn loop_frames() -> u64 {
    let default = if cfg!(debug_assertions) { 20_000 } else { 1_000_000 };
    std::env::var("VIRTQ_NET_LOOP_FRAMES").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Runs the loop on every pair of `dev`, a thread each; returns each pair's report.
fn run_pairs(dev: &mut NetDevice, frames_per_pair: u64, max_size: usize) -> Vec<LoopReport> {
    let mac = dev.info().mac;
    let bufs_per_frame = (max_size + 12).div_ceil(dev.info().rx_buf_len as usize);
    let window = (dev.info().queue_size as usize / bufs_per_frame).clamp(32, 128);
    let opts = LoopOptions {
        frames: frames_per_pair,
        min_size: 60,
        max_size,
        window,
        duration: Some(Duration::from_secs(600)),
        ..Default::default()
    };
    let progress = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let mut pairs = dev.take_queue_pairs();
    let reports = std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .iter_mut()
            .enumerate()
            .map(|(i, pair)| {
                let opts = LoopOptions { seed: 7 + i as u64, ..opts.clone() };
                let (progress, stop) = (&progress, &stop);
                s.spawn(move || run_loop(pair, mac, &opts, progress, stop))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("loop thread")).collect::<Vec<_>>()
    });
    // Stop the rings only once every pair is done: testpmd takes GET_VRING_BASE on any
    // ring as the whole device stopping.
    for p in &mut pairs {
        let rx = p.rx.stop().expect("stop rx");
        let tx = p.tx.stop().expect("stop tx");
        assert_eq!((rx.free, tx.free), (rx.total, tx.total), "every buffer back after stop");
    }
    reports
        .into_iter()
        .map(|(report, result)| {
            if let Err(e) = result {
                panic!("pair {}: the loop failed: {e} ({report:?})", report.pair);
            }
            report
        })
        .collect()
}

fn check_loop(test: &str, layout: Layout, pairs: u16, fwd: &str) {
    let bin = testpmd(test);
    let _serial = serial();
    let mut pmd = Testpmd::start(&bin, pairs);
    pmd.forward(fwd);
    let mut dev = NetDevice::connect(&pmd.socket, &layout.options(pairs)).expect("connect to testpmd");
    let info = dev.info().clone();
    assert_eq!(info.queue_pairs, pairs);
    assert!(info.mergeable(), "testpmd offers MRG_RXBUF");
    let frames = loop_frames();
    let start = Instant::now();
    let reports = run_pairs(&mut dev, frames.div_ceil(pairs as u64), 9000);
    let secs = start.elapsed().as_secs_f64();
    let (mut sent, mut received, mut dropped, mut multi) = (0, 0, 0, 0);
    for r in &reports {
        assert!(r.clean(), "{test}: pair {}: {r:?}", r.pair);
        assert!(r.received > 0, "{test}: pair {} received nothing: {r:?}", r.pair);
        assert!(r.largest > 8000, "{test}: the run had large frames: {r:?}");
        sent += r.sent;
        received += r.received;
        dropped += r.dropped;
        multi += r.multi_buffer;
    }
    assert!(sent >= frames, "{test}: sent {sent} of {frames}");
    assert!(multi > 0, "{test}: frames spanning several receive buffers were seen");
    eprintln!(
        "{test}: {:?}, {pairs} pair(s), testpmd {fwd}: sent {sent}, received {received}, dropped {dropped} \
         ({multi} in several buffers) in {secs:.1} s: none corrupted, duplicated or out of order",
        layout
    );
}

#[test]
#[cfg_attr(not(peer = "dpdk"), ignore = "needs DPDK testpmd (apt-get install dpdk-dev)")]
fn loop_split_1_pair_io() {
    check_loop("loop_split_1_pair_io", Layout::Split, 1, "io");
}

#[test]
#[cfg_attr(not(peer = "dpdk"), ignore = "needs DPDK testpmd (apt-get install dpdk-dev)")]
fn loop_split_2_pairs_macswap() {
    check_loop("loop_split_2_pairs_macswap", Layout::Split, 2, "macswap");
}

#[test]
#[cfg_attr(not(peer = "dpdk"), ignore = "needs DPDK testpmd (apt-get install dpdk-dev)")]
fn loop_packed_1_pair_macswap() {
    check_loop("loop_packed_1_pair_macswap", Layout::Packed, 1, "macswap");
}

#[test]
#[cfg_attr(not(peer = "dpdk"), ignore = "needs DPDK testpmd (apt-get install dpdk-dev)")]
fn loop_packed_2_pairs_io() {
    check_loop("loop_packed_2_pairs_io", Layout::Packed, 2, "io");
}

#[test]
#[cfg_attr(not(peer = "dpdk"), ignore = "needs DPDK testpmd (apt-get install dpdk-dev)")]
fn loop_packed_in_order_1_pair_io() {
    check_loop("loop_packed_in_order_1_pair_io", Layout::PackedInOrder, 1, "io");
}

#[test]
#[cfg_attr(not(peer = "dpdk"), ignore = "needs DPDK testpmd (apt-get install dpdk-dev)")]
fn loop_packed_in_order_2_pairs_macswap() {
    check_loop("loop_packed_in_order_2_pairs_macswap", Layout::PackedInOrder, 2, "macswap");
}

/// Without MRG_RXBUF every frame must fit one receive buffer: the driver sizes them for
/// the MTU, and the frames stay within it.
#[test]
#[cfg_attr(not(peer = "dpdk"), ignore = "needs DPDK testpmd (apt-get install dpdk-dev)")]
fn loop_without_mergeable_buffers() {
    let test = "loop_without_mergeable_buffers";
    let bin = testpmd(test);
    let _serial = serial();
    let mut pmd = Testpmd::start(&bin, 1);
    pmd.forward("io");
    for layout in [Layout::Split, Layout::PackedInOrder] {
        let opts = NetOptions {
            features: virtq_vhost_user::net::DRIVER_FEATURES & !feature::MRG_RXBUF,
            mtu: 1500,
            ..layout.options(1)
        };
        let mut dev = NetDevice::connect(&pmd.socket, &opts).expect("connect");
        assert!(!dev.info().mergeable());
        assert!(dev.info().rx_buf_len as usize >= 12 + 1514);
        let frames = (loop_frames() / 10).max(10_000);
        let reports = run_pairs(&mut dev, frames, 1514);
        let r = &reports[0];
        assert!(r.clean() && r.received > 0 && r.multi_buffer == 0, "{layout:?}: {r:?}");
        eprintln!("{test}: {layout:?}: sent {}, received {}, dropped {}", r.sent, r.received, r.dropped);
        drop(dev);
    }
}

/// What the driver makes of testpmd's vhost port: testpmd has no config space to give
/// (no `CONFIG` protocol feature), so the frontend fills it in.
#[test]
#[cfg_attr(not(peer = "dpdk"), ignore = "needs DPDK testpmd (apt-get install dpdk-dev)")]
fn info_from_testpmd() {
    let test = "info_from_testpmd";
    let bin = testpmd(test);
    let _serial = serial();
    let pmd = Testpmd::start(&bin, 2);
    let mac = [0x02, 0, 0, 0x12, 0x34, 0x56];
    let dev =
        NetDevice::connect(&pmd.socket, &NetOptions { mac: Some(mac), mtu: 4000, ..Layout::PackedInOrder.options(2) })
            .expect("connect");
    let i = dev.info();
    assert!(!i.config_from_device);
    assert_eq!(i.mac, mac);
    assert_eq!(i.mtu, Some(4000), "MTU negotiated, value from the frontend");
    assert!(i.has(feature::MRG_RXBUF) && i.has(feature::CTRL_VQ) && i.has(feature::MQ));
    assert!(i.features.contains(Features::RING_PACKED | Features::IN_ORDER | Features::VERSION_1));
    assert_eq!(i.queue_pairs, 2);
    assert!(i.max_queue_pairs >= 2);
    assert!(i.link_up() && dev.link_up());
    // Leaving out CTRL_VQ leaves out MQ: one pair only.
    drop(dev);
    let opts =
        NetOptions { features: virtq_vhost_user::net::DRIVER_FEATURES & !feature::CTRL_VQ, ..Layout::Split.options(2) };
    match NetDevice::connect(&pmd.socket, &opts) {
        Err(NetError::TooManyQueuePairs { requested: 2, available: 1 }) => {}
        other => panic!("2 pairs without CTRL_VQ: {other:?}"),
    }
}

/// testpmd dies mid-run: the loop fails with a disconnect within seconds, and every buffer
/// of every queue is accounted for afterwards.
#[test]
#[cfg_attr(not(peer = "dpdk"), ignore = "needs DPDK testpmd (apt-get install dpdk-dev)")]
fn testpmd_killed_mid_run() {
    let test = "testpmd_killed_mid_run";
    let bin = testpmd(test);
    let _serial = serial();
    for layout in [Layout::Split, Layout::PackedInOrder] {
        let mut pmd = Testpmd::start(&bin, 2);
        pmd.forward("io");
        let mut dev = NetDevice::connect(&pmd.socket, &layout.options(2)).expect("connect");
        let mac = dev.info().mac;
        let mut pairs = dev.take_queue_pairs();
        let progress = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let opts = LoopOptions { frames: 0, max_size: 9000, window: 48, ..Default::default() };
        let killed_at = std::thread::scope(|s| {
            let handles: Vec<_> =
                pairs.iter_mut().map(|pair| s.spawn(|| run_loop(pair, mac, &opts, &progress, &stop))).collect();
            // Kill once traffic flows.
            let start = Instant::now();
            while progress.load(Ordering::Relaxed) < 2000 {
                assert!(start.elapsed() < Duration::from_secs(60), "no traffic through testpmd");
                std::thread::sleep(Duration::from_millis(5));
            }
            pmd.kill();
            let killed_at = Instant::now();
            for h in handles {
                let (report, result) = h.join().expect("loop thread");
                let failed_after = killed_at.elapsed();
                match result {
                    Err(NetError::Queue(QueueError::Disconnected)) => {}
                    other => panic!("{layout:?}: after the kill the loop ended with {other:?} ({report:?})"),
                }
                assert!(failed_after < Duration::from_secs(5), "the disconnect took {failed_after:?}");
                assert!(report.clean() && report.received > 0, "{layout:?}: {report:?}");
            }
            killed_at
        });
        for p in &mut pairs {
            // Before the stop, each queue's buffers are free, held or posted; after it, all free.
            assert!(p.rx.buffers().balanced() && p.tx.slots().balanced());
            let rx = p.rx.stop().expect("stop rx");
            let tx = p.tx.stop().expect("stop tx");
            assert_eq!(rx.free, rx.total, "{layout:?}: every receive buffer back: {rx:?}");
            assert_eq!(tx.free, tx.total, "{layout:?}: every transmit slot back: {tx:?}");
            assert!(p.rx.recv(1, |_| {}).is_err(), "a stopped queue refuses");
        }
        eprintln!("{test}: {layout:?}: disconnect reported {:?} after the kill", killed_at.elapsed());
    }
}
