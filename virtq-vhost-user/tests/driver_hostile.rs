//! The virtio-blk driver and its vhost-user frontend under hostile back ends: reads
//! reported done without their data, `GET_CONFIG` replies that are short or empty, a
//! legal but huge `seg_max`, and `GET_VRING_BASE` answered late or never while queues are
//! dropped. Each ends in a clear error (or a bounded wait), never in stale data reported as
//! good.

mod backend_util;
#[path = "util/fake_backend.rs"]
mod fake_backend;
#[path = "util/lying_blk.rs"]
mod lying_blk;

use std::sync::Arc;
use std::time::{Duration, Instant};

use backend_util::{blk_options, Layout, Rng, TestServer};
use fake_backend::{reply_header, ConfigReply, FakeBackend, Script, VringBaseReply};
use lying_blk::{Lie, LyingDevice};
use virtq_vhost_user::backend::blk::{BlkBackend, BlkBackendOptions};
use virtq_vhost_user::backend::Server;
use virtq_vhost_user::blk::{BlkDevice, BlkError, BlkOptions, Request, RequestError, MAX_SEGMENTS};
use virtq_vhost_user::Error;

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// 7. Short reads.

#[test]
fn reads_without_their_data_are_errors() {
    for lie in [Lie::StatusOnly, Lie::Half] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::File::create(&image).and_then(|f| f.set_len(8 * MIB)).unwrap();
        let device = LyingDevice { inner: BlkBackend::open(&image, &BlkBackendOptions::default()).unwrap(), lie };
        let socket = dir.path().join("blk.sock");
        let mut server = Server::bind(&socket, Arc::new(device)).unwrap();
        let shutdown = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run());

        let mut dev = BlkDevice::connect(&socket, &blk_options(Layout::Split, 1, 16)).unwrap();
        let mut q = dev.take_queues().remove(0);
        let data = Rng::new(9).bytes(4096);
        q.write_at(0, &data).unwrap();
        // The bounce buffer's old contents would come back as the data.
        let mut back = vec![0xeeu8; 4096];
        match q.read_at(0, &mut back) {
            Err(BlkError::Request(RequestError::ShortRead { expected, used })) => {
                assert_eq!(expected, 4097, "{lie:?}");
                assert!(used < expected, "{lie:?}");
            }
            other => panic!("{lie:?}: a read without its data returned {other:?}"),
        }
        // Through submit and wait: the completion carries the error.
        let buf = q.alloc(8192).unwrap();
        q.submit(Request::read(8, vec![buf], 7)).unwrap();
        let mut comps = Vec::new();
        q.wait(1, &mut comps, Some(Duration::from_secs(10))).unwrap();
        assert!(matches!(comps[0].result, Err(RequestError::ShortRead { expected: 8193, .. })), "{:?}", comps[0]);
        // Other requests are unaffected.
        q.flush().unwrap();
        drop(q);
        drop(dev);
        shutdown.shutdown();
        thread.join().unwrap().unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// 8. GET_CONFIG replies that are short or empty.

fn connect_fake(script: Script) -> (tempfile::TempDir, FakeBackend, Result<BlkDevice, BlkError>, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeBackend::start(dir.path(), script);
    let opts = BlkOptions { control_timeout: Duration::from_millis(500), ..Default::default() };
    let start = Instant::now();
    let r = BlkDevice::connect(&fake.socket, &opts);
    (dir, fake, r, start.elapsed())
}

/// A config reply: header, `{ offset, size, flags }`, then `space` bytes.
fn config_reply(announced: u32, offset: u32, size: u32, space: usize) -> Vec<u8> {
    let mut r = reply_header(24, announced);
    for w in [offset, size, 0] {
        r.extend_from_slice(&w.to_le_bytes());
    }
    r.resize(r.len() + space, 0);
    r
}

#[test]
fn short_or_empty_config_replies_say_what_arrived() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("an empty config", config_reply(12, 0, 0, 0), "empty config space"),
        ("no config header", reply_header(24, 0), "payload is 0 bytes, shorter than the 12-byte config header"),
        (
            "10 of 60 bytes",
            config_reply(22, 0, 10, 10),
            "holds 10 bytes of config space (announced 10 at offset 0); 60",
        ),
        ("a reply cut short", config_reply(72, 0, 60, 10)[..34].to_vec(), "announced 72 payload bytes and 22 arrived"),
        ("half a header", reply_header(24, 72)[..5].to_vec(), "sent 5 of the 12 bytes of a reply header"),
        ("another request's reply", reply_header(1, 0), "the reply is for request 1"),
    ];
    for (what, reply, expect) in cases {
        let (_dir, _fake, r, took) = connect_fake(Script { config: ConfigReply::Raw(reply), ..Default::default() });
        let e = r.expect_err(what);
        let msg = e.to_string();
        eprintln!("{what}: {msg}");
        assert!(matches!(e, BlkError::Transport(Error::BadReply { request: "GET_CONFIG", .. })), "{what}: {e:?}");
        assert!(msg.contains(expect), "{what}: {msg}");
        assert!(!msg.contains("no answer"), "{what}: {msg}");
        assert!(took < Duration::from_secs(5), "{what}: took {took:?}");
    }
    // The fake back end answers GET_CONFIG properly: the connection is made.
    let (_dir, _fake, r, _) = connect_fake(Script::default());
    assert_eq!(r.unwrap().info().config.capacity, 2048);
}

// ---------------------------------------------------------------------------------------
// 9. A legal seg_max of 65535.

#[test]
fn huge_seg_max_is_capped() {
    let opts = BlkBackendOptions { seg_max: 65535, ..Default::default() };
    let server = TestServer::start(16 * MIB, opts);
    let mut dev = BlkDevice::connect(&server.socket, &BlkOptions::default()).expect("connect with seg_max 65535");
    assert_eq!(dev.info().config.seg_max, 65535);
    assert_eq!(dev.info().max_segments(), MAX_SEGMENTS);
    let mut q = dev.take_queues().remove(0);
    let data = Rng::new(3).bytes(4 << 20);
    q.write_at(MIB, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    q.read_at(MIB, &mut back).unwrap();
    assert!(back == data);
    // One request may carry MAX_SEGMENTS buffers, not one more.
    let mem = q.memory().clone();
    let bufs = |n: u32| (0..n).map(|_| mem.alloc(512).unwrap()).collect::<Vec<_>>();
    q.run(Request::read(0, bufs(MAX_SEGMENTS), 0)).unwrap().result.unwrap();
    let too_many = bufs(MAX_SEGMENTS + 1);
    let e = q.submit(Request::read(0, too_many, 0)).unwrap_err();
    assert!(matches!(e.error, BlkError::InvalidRequest(_)), "{e}");
    drop(q);
    drop(dev);
    server.stop();
}

// ---------------------------------------------------------------------------------------
// 10. Dropping queues of a back end that answers GET_VRING_BASE late, or never.

#[test]
fn teardown_is_bounded() {
    let timeout = Duration::from_secs(2);
    for (what, reply) in
        [("late", VringBaseReply::After(Duration::from_millis(1500))), ("never", VringBaseReply::Never)]
    {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeBackend::start(dir.path(), Script { num_queues: 4, vring_base: reply, ..Default::default() });
        let opts = BlkOptions { queues: 4, control_timeout: timeout, ..Default::default() };
        let mut dev = BlkDevice::connect(&fake.socket, &opts).unwrap();
        let queues = dev.take_queues();
        let start = Instant::now();
        drop(queues);
        drop(dev);
        let took = start.elapsed();
        eprintln!("GET_VRING_BASE answered {what}: 4 queues dropped in {took:?}");
        // One budget of `timeout` for the whole teardown, not one per queue.
        assert!(took < timeout * 2, "{what}: the teardown took {took:?}");
        drop(fake);
    }
}
