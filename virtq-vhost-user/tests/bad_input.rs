//! Connection errors say what failed: a missing socket, a peer that is not vhost-user, a
//! device without a required feature.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::{qsd, Backing, Daemon};
use virtq_vhost_user::blk::{BlkDevice, BlkError, BlkOptions};
use virtq_vhost_user::Error;

fn opts() -> BlkOptions {
    BlkOptions { control_timeout: Duration::from_millis(500), ..Default::default() }
}

#[test]
fn socket_path_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nobody-here.sock");
    let e = BlkDevice::connect(&path, &opts()).unwrap_err();
    assert!(matches!(e, BlkError::Transport(Error::SocketNotFound(_))), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("nobody-here.sock") && msg.contains("no such file"), "{msg}");
}

#[test]
fn path_that_is_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain-file");
    std::fs::write(&path, b"hello").unwrap();
    let e = BlkDevice::connect(&path, &opts()).unwrap_err();
    assert!(matches!(e, BlkError::Transport(Error::NotASocket(_))), "{e:?}");
}

#[test]
fn socket_nobody_listens_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    drop(UnixListener::bind(&path).unwrap());
    let e = BlkDevice::connect(&path, &opts()).unwrap_err();
    assert!(matches!(e, BlkError::Transport(Error::Connect { .. })), "{e:?}");
    assert!(e.to_string().contains("cannot connect"), "{e}");
}

/// A unix-socket server that does `behave` with each connection, on a thread.
fn fake_peer(behave: fn(std::os::unix::net::UnixStream)) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            behave(s);
        }
    });
    (dir, path)
}

fn assert_not_vhost_user(path: &std::path::Path, what: &str) {
    let start = Instant::now();
    let e = BlkDevice::connect(path, &opts()).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "{what}: took {:?}", start.elapsed());
    let msg = e.to_string();
    assert!(matches!(e, BlkError::Transport(Error::NotVhostUser { .. })), "{what}: {e:?}");
    assert!(msg.contains("is not a vhost-user back end"), "{what}: {msg}");
    eprintln!("{what}: {msg}");
}

#[test]
fn peer_that_answers_garbage() {
    let (_dir, path) = fake_peer(|mut s| {
        let mut req = [0u8; 64];
        let _ = s.read(&mut req);
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        std::thread::sleep(Duration::from_secs(2));
    });
    assert_not_vhost_user(&path, "garbage");
}

#[test]
fn peer_that_closes_at_once() {
    let (_dir, path) = fake_peer(drop);
    assert_not_vhost_user(&path, "closes");
}

#[test]
fn peer_that_never_answers() {
    let (_dir, path) = fake_peer(|s| {
        std::thread::sleep(Duration::from_secs(3));
        drop(s);
    });
    assert_not_vhost_user(&path, "silent");
}

#[test]
fn peer_that_answers_a_short_message_and_waits() {
    let (_dir, path) = fake_peer(|mut s| {
        let mut req = [0u8; 64];
        let _ = s.read(&mut req);
        let _ = s.write_all(&[1, 0, 0, 0]);
        std::thread::sleep(Duration::from_secs(3));
    });
    assert_not_vhost_user(&path, "short");
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn required_feature_the_device_lacks() {
    let bin = qsd("required_feature_the_device_lacks");
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&bin, dir.path(), Backing::Null { size: 1 << 20 }, 1);
    let packed = virtq::Features::RING_PACKED.bits();
    let e = BlkDevice::connect(&daemon.socket, &BlkOptions { required_features: packed, ..opts() }).unwrap_err();
    match &e {
        BlkError::Transport(Error::MissingFeatures { missing, .. }) => assert_eq!(missing.bits(), packed),
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("does not offer required virtio features") && msg.contains("RING_PACKED"), "{msg}");
    // The daemon takes the next connection as if nothing happened.
    let mut dev = BlkDevice::connect(&daemon.socket, &opts()).unwrap();
    dev.take_queues().remove(0).read_at(0, &mut [0u8; 512]).unwrap();
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn more_queues_than_the_device_has() {
    let bin = qsd("more_queues_than_the_device_has");
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&bin, dir.path(), Backing::Null { size: 1 << 20 }, 2);
    let e = BlkDevice::connect(&daemon.socket, &BlkOptions { queues: 3, ..opts() }).unwrap_err();
    assert!(matches!(e, BlkError::TooManyQueues { requested: 3, available: 2 }), "{e:?}");
}
