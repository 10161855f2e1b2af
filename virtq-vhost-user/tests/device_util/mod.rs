//! Helpers for the tests of every device on the back-end framework: an in-process server
//! for any `Device` on a temporary socket, the four ring layouts, and a hostile-descriptor
//! check that works whatever the device.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtq_vhost_user::backend::{Device, Server, ServerOptions, ShutdownHandle, Stats};
use virtq_vhost_user::frontend::{ConnectOptions, Connection};
use virtq_vhost_user::virtq::{Features, LayoutKind, Sg};

/// An in-process back end serving one device.
pub struct DeviceServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub stats: Arc<Stats>,
    shutdown: ShutdownHandle,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl DeviceServer {
    pub fn start(device: Arc<dyn Device>) -> Self {
        Self::start_with(device, ServerOptions::default())
    }

    pub fn start_with(device: Arc<dyn Device>, limits: ServerOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("dev.sock");
        let mut server = Server::bind_with(&socket, device, limits).expect("bind");
        let stats = server.stats();
        let shutdown = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run());
        Self { dir, socket, stats, shutdown, thread: Some(thread) }
    }

    /// Stops the server and checks that it stopped cleanly.
    pub fn stop(mut self) {
        self.shutdown.shutdown();
        let t = self.thread.take().unwrap();
        wait_until("the server stops", Duration::from_secs(10), || t.is_finished());
        t.join().expect("server thread panicked").expect("server failed");
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shutdown.shutdown();
            let _ = t.join();
        }
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Frontend options that negotiate exactly `layout`.
pub fn layout_options(layout: LayoutKind) -> ConnectOptions {
    ConnectOptions {
        required_features: layout.features().bits(),
        ring_packed: layout.is_packed(),
        in_order: layout.is_in_order(),
        ..Default::default()
    }
}

/// Buffers that point outside guest memory, crossing its end, or 4 GiB long, on queue
/// `queue` of a device at `server`, on every layout: each latches that ring broken, no
/// completion is made up, and no byte of guest memory around the request changes.
/// `writable` chooses the direction of the hostile buffer.
pub fn hostile_descriptors_break_the_ring_only(server: &DeviceServer, queue: u16, writable: bool) {
    let mut faults = server.stats.queue_faults.load(Ordering::Relaxed);
    for layout in LayoutKind::ALL {
        for case in 0..3 {
            let conn = Connection::connect(&server.socket, &layout_options(layout)).unwrap();
            assert_eq!(LayoutKind::from_features(conn.features()), layout);
            let end = conn.memory().regions().iter().map(|r| r.gpa() + r.size() as u64).max().unwrap();
            let mut good = conn.memory().alloc(256).unwrap();
            good.fill(0xa5);
            let (what, sg) = match case {
                0 => ("past the end of memory", Sg::new(end + 4096, 512)),
                1 => ("crossing the end of memory", Sg::new(end - 256, 512)),
                _ => ("4 GiB long", Sg::new(good.gpa(), u32::MAX)),
            };
            let mut qs = Vec::new();
            for i in 0..=queue {
                qs.push(conn.create_queue::<u16>(i, 16, 0).unwrap());
            }
            let q = qs.last_mut().unwrap();
            if writable {
                q.vq_mut().add_sgs_premapped(&[], &[&[good.sg()], &[sg]], 1).unwrap();
            } else {
                q.vq_mut().add_sgs_premapped(&[&[good.sg()], &[sg]], &[], 1).unwrap();
            }
            q.kick().unwrap();
            faults += 1;
            wait_until(&format!("{}: {what}: the ring is broken", layout.name()), Duration::from_secs(10), || {
                server.stats.queue_faults.load(Ordering::Relaxed) >= faults
            });
            assert!(!q.vq().has_used(), "{}: {what}: a completion for a chain that was not served", layout.name());
            assert!(good.iter().all(|&b| b == 0xa5), "{}: {what}: the good buffer changed", layout.name());
            for q in &qs {
                q.leak_on_drop();
            }
            drop(qs);
            drop(conn);
        }
    }
}

/// The features a device offers with every layout.
pub fn ring_features() -> Features {
    Features::VERSION_1 | Features::EVENT_IDX | Features::INDIRECT_DESC | Features::RING_PACKED | Features::IN_ORDER
}
