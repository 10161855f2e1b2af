//! The back end (`backend::Server` + `BlkBackend`) driven by this crate's own vhost-user
//! frontend (`blk::BlkDevice`), in one process, on all four ring layouts: split, split
//! in-order, packed, packed in-order. Needs nothing outside the crate, so it runs in CI.

mod backend_util;

use std::sync::atomic::Ordering;
use std::time::Duration;

use backend_util::{blk_options, Layout, Rng, TestServer, LAYOUTS};
use virtq_vhost_user::backend::blk::{feature, BlkBackendOptions};
use virtq_vhost_user::blk::{BlkError, Request, RequestError};
use virtq_vhost_user::virtq::Features;

const MIB: u64 = 1 << 20;

/// Writes and reads back data of many sizes, with many requests in flight on a small ring
/// (so that it wraps many times), and checks the image file itself.
fn read_write_verify(layout: Layout) {
    let server = TestServer::start(16 * MIB, BlkBackendOptions::default());
    let opts = blk_options(layout, 1, 16);
    let mut dev = server.connect(&opts);
    let negotiated = dev.connection().features();
    assert!(negotiated.contains(layout.features() | Features::VERSION_1 | Features::EVENT_IDX), "{negotiated:?}");
    assert_eq!(negotiated.contains(Features::RING_PACKED), layout.features().contains(Features::RING_PACKED));
    let mut q = dev.take_queues().remove(0);
    let mut rng = Rng::new(layout as u64 + 1);

    // Synchronous requests of several sizes.
    for (offset, len) in
        [(0u64, 512usize), (4096, 4096), (MIB, 64 << 10), (2 * MIB + 512, 1 << 20), (16 * MIB - 512, 512)]
    {
        let data = rng.bytes(len);
        q.write_at(offset, &data).unwrap();
        let mut back = vec![0u8; len];
        q.read_at(offset, &mut back).unwrap();
        assert!(back == data, "{}: read back differs at {offset}+{len}", layout.name());
        assert!(server.image_bytes(offset, len) == data, "{}: the image differs at {offset}+{len}", layout.name());
    }

    // Many 4 KiB writes in flight at once (depth 12 on a 16-entry ring), then reads.
    let blocks = 512u64;
    let base = 4 * MIB / 512;
    let mut expected = vec![Vec::new(); blocks as usize];
    let mut comps = Vec::new();
    let mut next = 0u64;
    let mut done = 0u64;
    while done < blocks {
        while next < blocks && q.in_flight() < 12 {
            let mut buf = q.alloc(4096).unwrap();
            let data = rng.bytes(4096);
            buf.copy_from_slice(&data);
            expected[next as usize] = data;
            q.submit(Request::write(base + next * 8, vec![buf], next)).unwrap();
            next += 1;
        }
        comps.clear();
        q.wait(1, &mut comps, Some(Duration::from_secs(20))).unwrap();
        for c in &comps {
            c.result.clone().unwrap_or_else(|e| panic!("write {} failed: {e}", c.user_data));
            done += 1;
        }
    }
    q.flush().unwrap();
    let mut next = 0u64;
    let mut done = 0u64;
    while done < blocks {
        while next < blocks && q.in_flight() < 12 {
            let buf = q.alloc(4096).unwrap();
            q.submit(Request::read(base + next * 8, vec![buf], next)).unwrap();
            next += 1;
        }
        comps.clear();
        q.wait(1, &mut comps, Some(Duration::from_secs(20))).unwrap();
        for c in &comps {
            c.result.clone().unwrap();
            assert_eq!(c.len, 4096 + 1, "used length: data and status");
            assert!(
                c.bufs[0][..] == expected[c.user_data as usize][..],
                "{}: block {} differs",
                layout.name(),
                c.user_data
            );
            done += 1;
        }
    }
    let image = server.image_bytes(base * 512, (blocks * 4096) as usize);
    for (i, e) in expected.iter().enumerate() {
        assert!(image[i * 4096..(i + 1) * 4096] == e[..], "{}: image block {i} differs", layout.name());
    }

    // Get-id, discard, write-zeroes.
    assert_eq!(q.get_id().unwrap(), "virtq-blk");
    let ones = vec![0xa5u8; 64 << 10];
    for (what, unmap) in [("discard", None), ("write-zeroes", Some(false)), ("write-zeroes unmap", Some(true))] {
        q.write_at(8 * MIB, &ones).unwrap();
        match unmap {
            None => q.discard(8 * MIB, 32 << 10).unwrap(),
            Some(u) => q.write_zeroes(8 * MIB, 32 << 10, u).unwrap(),
        }
        let mut back = vec![0xffu8; 64 << 10];
        q.read_at(8 * MIB, &mut back).unwrap();
        assert!(back[..32 << 10].iter().all(|&b| b == 0), "{}: {what} left data", layout.name());
        assert!(back[32 << 10..].iter().all(|&b| b == 0xa5), "{}: {what} went too far", layout.name());
    }
    q.close(Duration::from_secs(5)).unwrap();
    drop(dev);
    server.wait_connections(1);
    server.stop();
}

#[test]
fn split_read_write_verify() {
    read_write_verify(Layout::Split);
}

#[test]
fn split_in_order_read_write_verify() {
    read_write_verify(Layout::SplitInOrder);
}

#[test]
fn packed_read_write_verify() {
    read_write_verify(Layout::Packed);
}

#[test]
fn packed_in_order_read_write_verify() {
    read_write_verify(Layout::PackedInOrder);
}

/// The config space and the offered features, read-write and read-only.
#[test]
fn config_space_and_features() {
    let server = TestServer::start(8 * MIB + 4096, BlkBackendOptions { queues: 3, ..Default::default() });
    let dev = server.connect(&blk_options(Layout::Split, 1, 16));
    let info = dev.info();
    assert_eq!(info.config.capacity, (8 * MIB + 4096) / 512);
    assert_eq!(info.config.blk_size, 512);
    assert_eq!(info.config.seg_max, 126);
    assert_eq!(info.config.num_queues, 3);
    assert_eq!(info.device_queues, 3);
    assert_eq!(info.config.max_discard_seg, 16);
    assert!(info.config.write_zeroes_may_unmap);
    for bit in
        [feature::SEG_MAX, feature::BLK_SIZE, feature::FLUSH, feature::MQ, feature::DISCARD, feature::WRITE_ZEROES]
    {
        assert!(info.has(bit), "feature bit {bit:#x} not negotiated");
    }
    assert!(!info.read_only());
    drop(dev);
    server.stop();

    let server = TestServer::start(MIB, BlkBackendOptions { readonly: true, ..Default::default() });
    let mut opts = blk_options(Layout::Packed, 1, 16);
    opts.validate = false;
    let mut dev = server.connect(&opts);
    assert!(dev.info().read_only());
    assert!(!dev.info().has(feature::DISCARD));
    let mut q = dev.take_queues().remove(0);
    let mut buf = vec![0u8; 4096];
    q.read_at(0, &mut buf).unwrap();
    let err = q.write_at(0, &buf).unwrap_err();
    assert!(matches!(err, BlkError::Request(RequestError::IoError)), "write to a read-only disk: {err}");
    // Discard was not negotiated: UNSUPP.
    let c = q.run(Request::discard(0, 8, 0)).unwrap();
    assert_eq!(c.result, Err(RequestError::Unsupported));
    q.flush().unwrap();
    drop(q);
    drop(dev);
    server.stop();
}

/// Requests the device must refuse, each with the right status; the queue keeps working.
#[test]
fn bad_requests_get_a_status() {
    let server = TestServer::start(MIB, BlkBackendOptions::default());
    for layout in [Layout::Split, Layout::Packed] {
        let mut opts = blk_options(layout, 1, 16);
        opts.validate = false;
        let mut dev = server.connect(&opts);
        let mut q = dev.take_queues().remove(0);
        let sectors = MIB / 512;
        let cases: Vec<(&str, Request, RequestError)> = vec![
            ("read past the end", Request::read(sectors - 1, vec![q.alloc(1024).unwrap()], 0), RequestError::IoError),
            ("write past the end", Request::write(sectors, vec![q.alloc(512).unwrap()], 0), RequestError::IoError),
            ("read of 100 bytes", Request::read(0, vec![q.alloc(100).unwrap()], 0), RequestError::IoError),
            ("sector overflow", Request::read(u64::MAX / 256, vec![q.alloc(512).unwrap()], 0), RequestError::IoError),
            ("discard past the end", Request::discard(sectors - 4, 8, 0), RequestError::IoError),
            (
                "unknown type",
                Request { op: virtq_vhost_user::blk::Op::Raw(200), ..Request::flush(0) },
                RequestError::Unsupported,
            ),
            (
                "write-zeroes of too many sectors",
                Request::write_zeroes(0, (1 << 22) + 1, false, 0),
                RequestError::IoError,
            ),
        ];
        for (what, req, want) in cases {
            let c = q.run(req).unwrap();
            assert_eq!(c.result, Err(want), "{}: {what}", layout.name());
        }
        let mut buf = vec![7u8; 512];
        q.write_at(0, &buf).unwrap();
        q.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, vec![7u8; 512]);
        drop(q);
        drop(dev);
    }
    server.stop();
}

/// Four queues on four threads, each writing its own region, on each layout; the image is
/// checked afterwards. The server is reused: every layout is a new connection.
#[test]
fn multiqueue_concurrent_writers() {
    let server = TestServer::start(32 * MIB, BlkBackendOptions { queues: 4, ..Default::default() });
    for (n, layout) in LAYOUTS.into_iter().enumerate() {
        let mut dev = server.connect(&blk_options(layout, 4, 32));
        let queues = dev.take_queues();
        assert_eq!(queues.len(), 4);
        let threads: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, mut q)| {
                std::thread::spawn(move || {
                    let mut rng = Rng::new((n * 10 + i) as u64);
                    let region = (i as u64) * 8 * MIB;
                    let mut written = Vec::new();
                    for k in 0..32u64 {
                        let data = rng.bytes(64 << 10);
                        q.write_at(region + k * (64 << 10), &data).unwrap();
                        written.push(data);
                    }
                    q.flush().unwrap();
                    for (k, data) in written.iter().enumerate() {
                        let mut back = vec![0u8; data.len()];
                        q.read_at(region + k as u64 * (64 << 10), &mut back).unwrap();
                        assert!(&back == data, "queue {i}: block {k} differs");
                    }
                    written
                })
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            let written = t.join().unwrap();
            let image = server.image_bytes(i as u64 * 8 * MIB, 32 * (64 << 10));
            for (k, data) in written.iter().enumerate() {
                assert!(
                    image[k * (64 << 10)..(k + 1) * (64 << 10)] == data[..],
                    "{}: queue {i} block {k}",
                    layout.name()
                );
            }
        }
        drop(dev);
        server.wait_connections(n as u64 + 1);
    }
    assert!(server.stats.kicks.load(Ordering::Relaxed) > 0);
    assert!(server.stats.interrupts.load(Ordering::Relaxed) > 0);
    server.stop();
}

/// A frontend reconnects (as QEMU does after a restart) and finds its data; the rings of
/// the first connection were stopped with GET_VRING_BASE and the second starts afresh.
#[test]
fn reconnect_finds_the_data() {
    let server = TestServer::start(4 * MIB, BlkBackendOptions::default());
    let data = Rng::new(9).bytes(128 << 10);
    for (i, layout) in [Layout::Packed, Layout::Split, Layout::PackedInOrder].into_iter().enumerate() {
        let mut dev = server.connect(&blk_options(layout, 1, 8));
        let mut q = dev.take_queues().remove(0);
        if i == 0 {
            q.write_at(MIB, &data).unwrap();
            q.flush().unwrap();
        }
        let mut back = vec![0u8; data.len()];
        q.read_at(MIB, &mut back).unwrap();
        assert!(back == data, "{}: data lost across reconnects", layout.name());
        drop(q);
        drop(dev);
    }
    server.wait_connections(3);
    assert_eq!(server.stats.connection_errors.load(Ordering::Relaxed), 0);
    server.stop();
}

/// The blk driver negotiates the packed ring and in-order when the device offers them
/// (serve-blk does), and the split ring or out-of-order use when told to.
#[test]
fn blk_defaults_negotiate_packed_and_in_order() {
    let server = TestServer::start(4 * MIB, BlkBackendOptions::default());
    for (packed, in_order) in [(true, true), (true, false), (false, true), (false, false)] {
        let opts = virtq_vhost_user::blk::BlkOptions { ring_packed: packed, in_order, ..Default::default() };
        let mut dev = server.connect(&opts);
        let f = dev.info().features;
        assert_eq!(f.contains(Features::RING_PACKED), packed, "{f:?}");
        assert_eq!(f.contains(Features::IN_ORDER), in_order, "{f:?}");
        let mut q = dev.take_queues().remove(0);
        let data = Rng::new(packed as u64 * 2 + in_order as u64).bytes(64 << 10);
        q.write_at(MIB, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        q.read_at(MIB, &mut back).unwrap();
        assert!(back == data);
    }
    let dev = server.connect(&virtq_vhost_user::blk::BlkOptions::default());
    assert!(dev.info().features.contains(Features::RING_PACKED | Features::IN_ORDER), "the defaults");
    drop(dev);
    server.stop();
}
