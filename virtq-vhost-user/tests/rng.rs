//! virtio-rng on the back-end framework (`RngDevice`, the code of `virtq serve-rng`)
//! driven by this crate's rng driver (`RngDriver`, the code of `virtq rng`), in one
//! process, on all four ring layouts.

mod device_util;

use std::io::{Seek, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use device_util::{hostile_descriptors_break_the_ring_only, layout_options, ring_features, DeviceServer};
use virtq_vhost_user::frontend::Connection;
use virtq_vhost_user::rng::{RngDevice, RngDriver, RngError, RngOptions};
use virtq_vhost_user::virtq::{Features, LayoutKind};

#[path = "util/rng.rs"]
#[allow(dead_code)]
mod prng;

fn options(layout: LayoutKind) -> RngOptions {
    RngOptions {
        queue_size: 16,
        depth: 12,
        buffer_size: 1000,
        required_features: layout.features().bits(),
        ring_packed: layout.is_packed(),
        in_order: layout.is_in_order(),
        ..Default::default()
    }
}

/// A source file of known bytes.
fn source(bytes: &[u8]) -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(bytes).unwrap();
    f.rewind().unwrap();
    f
}

/// Every byte of the source arrives, in order, through buffers that the small ring
/// recycles many times over (so that it wraps), on each layout; the used lengths tell
/// the driver exactly how much each buffer holds (the source's end included).
#[test]
fn known_bytes_arrive_in_order_on_every_layout() {
    for layout in LayoutKind::ALL {
        let bytes = prng::Rng::new(layout as u64 + 7).bytes(300_001);
        let server = DeviceServer::start(Arc::new(RngDevice::from_source(source(&bytes))));
        let mut rng = RngDriver::connect(&server.socket, &options(layout)).unwrap();
        assert_eq!(LayoutKind::from_features(rng.features()), layout);
        assert!(rng.features().contains(Features::EVENT_IDX));
        let mut got = vec![0u8; bytes.len()];
        rng.read(&mut got).unwrap();
        assert!(got == bytes, "{}: the bytes differ", layout.name());
        // The source is dry now: every posted buffer comes back empty.
        let mut more = [0u8; 1];
        assert!(matches!(rng.read(&mut more), Err(RngError::NoEntropy(_))), "{}", layout.name());
        drop(rng);
        server.stop();
    }
}

/// `/dev/urandom` through the device: a MiB arrives, and it is not a constant.
#[test]
fn os_random_source() {
    let server = DeviceServer::start(Arc::new(RngDevice::new().unwrap()));
    for layout in LayoutKind::ALL {
        let mut rng = RngDriver::connect(&server.socket, &RngOptions { buffer_size: 4096, ..options(layout) }).unwrap();
        let mut got = vec![0u8; 1 << 20];
        rng.read(&mut got).unwrap();
        let mut counts = [0u32; 256];
        got.iter().for_each(|&b| counts[b as usize] += 1);
        // 4096 expected per value; a source that repeats or zero-fills is far off.
        assert!(counts.iter().all(|&c| (3000..5200).contains(&c)), "{}: skewed bytes", layout.name());
        let (bytes, requests) = rng.received();
        assert!(bytes >= 1 << 20 && requests >= 256, "{bytes} bytes in {requests} requests");
    }
    assert_eq!(server.stats.connections.load(Ordering::Relaxed), 4);
    server.stop();
}

/// The device offers no class features, only the ring features, and no config space;
/// it serves a frontend again after one disconnects mid-stream.
#[test]
fn features_and_reconnects() {
    let server = DeviceServer::start(Arc::new(RngDevice::new().unwrap()));
    let conn = Connection::connect(&server.socket, &layout_options(LayoutKind::PackedInOrder)).unwrap();
    assert_eq!(conn.max_queues(), Some(1));
    assert_eq!(conn.read_config(0, 8).unwrap(), vec![0; 8]);
    assert!(conn.features().contains(ring_features()));
    drop(conn);
    for round in 0..3 {
        let mut rng = RngDriver::connect(&server.socket, &options(LayoutKind::ALL[round % 4])).unwrap();
        let mut got = [0u8; 5000];
        rng.read(&mut got).unwrap();
        // Dropped with buffers in flight.
    }
    assert_eq!(server.stats.connection_errors.load(Ordering::Relaxed), 0);
    server.stop();
}

/// A driver that posts a device-readable buffer (which it must not, 5.4.6.2) gets it back
/// with nothing written; the queue goes on.
#[test]
fn readable_buffers_come_back_empty() {
    let server = DeviceServer::start(Arc::new(RngDevice::new().unwrap()));
    for layout in LayoutKind::ALL {
        let conn = Connection::connect(&server.socket, &layout_options(layout)).unwrap();
        let mut q = conn.create_queue::<u16>(0, 8, 0).unwrap();
        let (r, w) = (conn.memory().alloc(64).unwrap(), conn.memory().alloc(64).unwrap());
        q.vq_mut().add_outbuf_premapped(&[r.sg()], 1).unwrap();
        q.vq_mut().add_inbuf_premapped(&[w.sg()], 2).unwrap();
        q.kick().unwrap();
        let mut used = Vec::new();
        while used.len() < 2 {
            q.wait(virtq_vhost_user::WaitMode::Sleep, Some(std::time::Instant::now() + Duration::from_secs(10)))
                .unwrap();
            while let Some(u) = q.vq_mut().get_buf() {
                used.push((u.token, u.len));
            }
        }
        used.sort();
        assert_eq!(used, vec![(1, 0), (2, 64)], "{}", layout.name());
    }
    assert_eq!(server.stats.queue_faults.load(Ordering::Relaxed), 0);
    server.stop();
}

/// Hostile descriptors break the ring only; the server serves the next frontend.
#[test]
fn hostile_descriptors() {
    let server = DeviceServer::start(Arc::new(RngDevice::new().unwrap()));
    hostile_descriptors_break_the_ring_only(&server, 0, true);
    let mut rng = RngDriver::connect(&server.socket, &options(LayoutKind::Split)).unwrap();
    rng.read(&mut [0u8; 100]).unwrap();
    drop(rng);
    server.stop();
}
