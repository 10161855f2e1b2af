//! Faults around the back end: a frontend killed (SIGKILL) with requests in flight, the
//! back end killed with requests in flight, frontends that send garbage or configure
//! impossible rings, and a guest whose descriptors point outside its memory. In every case
//! the back end logs, closes that connection and serves the next one; nothing hangs (every
//! wait is bounded).
//!
//! Processes that get killed are this test binary run again in another role
//! (`child_entry`), so the tests need nothing outside the crate.

mod backend_util;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend_util::{blk_options, child_role, kill_child, spawn_child, wait_for_path, Layout, Rng, TestServer, LAYOUTS};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtq_vhost_user::backend::blk::{BlkBackend, BlkBackendOptions};
use virtq_vhost_user::backend::{Server, Stats};
use virtq_vhost_user::blk::{BlkDevice, BlkError, Request, RequestError};
use virtq_vhost_user::frontend::{ConnectOptions, Connection};
use virtq_vhost_user::virtq::{Features, Sg};
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;

/// The child roles. Run by the parent tests through `spawn_child`; as a plain test (no role
/// set) it does nothing.
#[test]
fn child_entry() {
    let Some(role) = child_role() else { return };
    let socket = PathBuf::from(std::env::var("SOCKET").unwrap());
    match role.as_str() {
        // A frontend that keeps 8 random 4 KiB writes and reads in flight until killed.
        "frontend-load" => {
            let layout: Layout = std::env::var("LAYOUT").unwrap().parse().expect("a layout name");
            let progress = PathBuf::from(std::env::var("PROGRESS").unwrap());
            let mut dev = BlkDevice::connect(&socket, &blk_options(layout, 1, 16)).unwrap();
            let mut q = dev.take_queues().remove(0);
            let mut rng = Rng::new(1);
            let mut comps = Vec::new();
            let mut done = 0u64;
            loop {
                while q.in_flight() < 8 {
                    let buf = q.alloc(4096).unwrap();
                    let sector = rng.below(1024) * 8;
                    let req = if rng.below(2) == 0 {
                        Request::read(sector, vec![buf], 0)
                    } else {
                        Request::write(sector, vec![buf], 0)
                    };
                    q.submit(req).unwrap();
                }
                comps.clear();
                q.wait(1, &mut comps, Some(Duration::from_secs(20))).unwrap();
                done += comps.len() as u64;
                if done >= 200 && !progress.exists() {
                    std::fs::write(&progress, b"running").unwrap();
                }
            }
        }
        // A back end serving IMAGE on SOCKET until killed.
        "backend" => {
            let image = std::env::var("IMAGE").unwrap();
            let device = BlkBackend::open(image, &BlkBackendOptions::default()).unwrap();
            let mut server = Server::bind(&socket, Arc::new(device)).unwrap();
            server.run().unwrap();
            std::process::exit(0);
        }
        other => panic!("unknown child role {other}"),
    }
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A short write and read through a new connection: the back end serves.
fn check_serves(socket: &Path, layout: Layout, offset: u64) {
    let mut dev = BlkDevice::connect(socket, &blk_options(layout, 1, 16)).expect("a new frontend connects");
    let mut q = dev.take_queues().remove(0);
    let data = Rng::new(offset).bytes(8192);
    q.write_at(offset, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    q.read_at(offset, &mut back).unwrap();
    assert!(back == data);
}

#[test]
fn frontend_killed_mid_io() {
    for layout in [Layout::Split, Layout::Packed] {
        let server = TestServer::start(8 * MIB, BlkBackendOptions::default());
        let progress = server.dir.path().join("progress");
        let log = server.dir.path().join("frontend.log");
        let mut child = spawn_child(
            "child_entry",
            "frontend-load",
            &[
                ("SOCKET", server.socket.display().to_string()),
                ("LAYOUT", layout.name().to_string()),
                ("PROGRESS", progress.display().to_string()),
            ],
            &log,
        );
        let started = Instant::now();
        while !progress.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("the frontend exited ({st}): {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the frontend made no progress");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
        kill_child(&mut child);
        // The back end notices, stops the rings and serves the next frontend.
        check_serves(&server.socket, layout, 2 * MIB);
        assert!(server.stats.requests.load(Ordering::Relaxed) >= 200, "the killed frontend's requests were served");
        server.wait_connections(2);
        server.stop();
    }
}

#[test]
fn backend_killed_mid_io() {
    for layout in [Layout::Split, Layout::Packed] {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("blk.sock");
        let image = dir.path().join("disk.raw");
        std::fs::File::create(&image).and_then(|f| f.set_len(8 * MIB)).unwrap();
        let env = [("SOCKET", socket.display().to_string()), ("IMAGE", image.display().to_string())];
        let mut backend = spawn_child("child_entry", "backend", &env, &dir.path().join("backend1.log"));
        wait_for_path(&socket, Duration::from_secs(30));

        let mut dev = BlkDevice::connect(&socket, &blk_options(layout, 1, 16)).unwrap();
        let mut q = dev.take_queues().remove(0);
        let durable = Rng::new(5).bytes(64 << 10);
        q.write_at(MIB, &durable).unwrap();
        q.flush().unwrap();

        // Random writes in flight; the back end is killed under them.
        let mut rng = Rng::new(6);
        let mut comps = Vec::new();
        let (mut ok, mut failed) = (0u64, 0u64);
        let started = Instant::now();
        loop {
            while q.in_flight() < 8 && q.failure().is_none() {
                let buf = q.alloc(4096).unwrap();
                let req = Request::write(4 * MIB / 512 + rng.below(512) * 8, vec![buf], 0);
                if let Err(e) = q.submit(req) {
                    assert!(matches!(e.error, BlkError::Request(_)), "refused with {e}");
                    break;
                }
            }
            if q.in_flight() == 0 && q.failure().is_some() {
                break;
            }
            comps.clear();
            q.wait(1, &mut comps, Some(Duration::from_secs(20))).expect("a wait returns, whatever the back end does");
            for c in &comps {
                match &c.result {
                    Ok(()) => ok += 1,
                    Err(RequestError::Disconnected) => failed += 1,
                    Err(e) => panic!("unexpected failure {e}"),
                }
            }
            if ok >= 100 && backend.try_wait().unwrap().is_none() {
                kill_child(&mut backend);
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the frontend did not notice the back end's death");
        }
        assert!(ok >= 100, "{ok} writes completed");
        assert_eq!(q.failure(), Some(&RequestError::Disconnected));
        eprintln!("{}: {ok} writes completed, {failed} failed with Disconnected", layout.name());
        drop(q);
        drop(dev);

        // A new back end on the same image has the flushed data.
        let mut backend = spawn_child("child_entry", "backend", &env, &dir.path().join("backend2.log"));
        wait_until("the new back end's socket", Duration::from_secs(30), || UnixStream::connect(&socket).is_ok());
        let mut dev = BlkDevice::connect(&socket, &blk_options(layout, 1, 16)).unwrap();
        let mut q = dev.take_queues().remove(0);
        let mut back = vec![0u8; durable.len()];
        q.read_at(MIB, &mut back).unwrap();
        assert!(back == durable, "{}: flushed data lost", layout.name());
        drop(q);
        drop(dev);
        kill_child(&mut backend);
    }
}

/// Sends `bytes` on a new connection and expects the back end to close it.
fn send_garbage(socket: &Path, bytes: &[u8]) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the back end did not close a connection that sent garbage: {e}"),
        }
    }
}

fn header(code: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&code.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

#[test]
fn garbage_on_the_socket() {
    let server = TestServer::start(4 * MIB, BlkBackendOptions::default());
    let mut rng = Rng::new(3);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", rng.bytes(200)),
        ("unknown request", header(0xffff, 1, 0)),
        ("version 2 header", header(1, 2, 0)),
        ("oversized body", header(5, 1, 0x10_0000)),
        ("SET_VRING_NUM with a short body", [header(8, 1, 8), vec![0, 0, 0, 0]].concat()),
        ("SET_MEM_TABLE without fds", [header(5, 1, 8 + 32), vec![0u8; 40]].concat()),
        ("a reply sent to the back end", header(1, 1 | 4, 0)),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        send_garbage(&server.socket, bytes);
        let want = i as u64 + 1;
        wait_until(what, Duration::from_secs(10), || server.stats.connection_errors.load(Ordering::Relaxed) >= want);
    }
    // A half message, then the frontend goes away: a disconnect.
    drop(UnixStream::connect(&server.socket).and_then(|mut s| s.write_all(&header(1, 1, 0)[..5])));
    check_serves(&server.socket, Layout::Split, 0);
    check_serves(&server.socket, Layout::Packed, MIB);
    server.stop();
}

/// A protocol-level frontend that sets up memory, then lets a test configure ring 0.
struct RawFrontend {
    fe: Frontend,
    _mem: std::fs::File,
    kick: EventFd,
    call: EventFd,
}

const RAW_GPA: u64 = 0x10_0000;
const RAW_VA: u64 = 0x7f00_0000_0000;
const RAW_SIZE: u64 = 2 * MIB;

impl RawFrontend {
    fn connect(socket: &Path, features: u64) -> Self {
        let mut fe = Frontend::connect(socket, 4).unwrap();
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        fe.set_protocol_features(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG).unwrap();
        fe.set_features(features & offered | (1 << 30)).unwrap();
        let mem = tempfile::tempfile().unwrap();
        mem.set_len(RAW_SIZE).unwrap();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: RAW_GPA,
            memory_size: RAW_SIZE,
            userspace_addr: RAW_VA,
            mmap_offset: 0,
            mmap_handle: mem.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).unwrap();
        Self { fe, _mem: mem, kick: EventFd::new(0).unwrap(), call: EventFd::new(0).unwrap() }
    }

    /// Sets up ring 0 (addresses are frontend virtual addresses) and enables it. The
    /// requests are not acknowledged, so errors show up on the back end's side only.
    fn start_ring(&mut self, size: u16, desc: u64, avail: u64, used: u64) {
        let _ = self.fe.set_vring_num(0, size);
        let _ = self.fe.set_vring_base(0, 0);
        let config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: used,
            avail_ring_addr: avail,
            log_addr: None,
        };
        let _ = self.fe.set_vring_addr(0, &config);
        let _ = self.fe.set_vring_kick(0, &self.kick);
        let _ = self.fe.set_vring_call(0, &self.call);
        let _ = self.fe.set_vring_enable(0, true);
    }
}

/// Impossible configurations: each closes the connection (an error on the back end's
/// side), and the next frontend is served.
#[test]
fn impossible_configurations_close_the_connection() {
    let server = TestServer::start(4 * MIB, BlkBackendOptions::default());
    let errors = |s: &Stats| s.connection_errors.load(Ordering::Relaxed);
    let va = |off: u64| RAW_VA + off;
    let features = (Features::VERSION_1 | Features::EVENT_IDX).bits();
    type Case = (&'static str, Box<dyn Fn(&Path)>);
    let cases: Vec<Case> = vec![
        (
            "descriptor table outside memory",
            Box::new(move |s| {
                RawFrontend::connect(s, features).start_ring(16, RAW_VA + RAW_SIZE, va(0x1000), va(0x2000))
            }),
        ),
        (
            "used ring crossing the end of memory",
            Box::new(move |s| {
                RawFrontend::connect(s, features).start_ring(256, va(0), va(0x1000), va(RAW_SIZE - 0x100))
            }),
        ),
        (
            "split ring of 100 entries",
            Box::new(move |s| RawFrontend::connect(s, features).start_ring(100, va(0), va(0x1000), va(0x2000))),
        ),
        (
            "misaligned used ring",
            Box::new(move |s| RawFrontend::connect(s, features).start_ring(16, va(0), va(0x1000), va(0x2002))),
        ),
        (
            "queue index beyond the device",
            Box::new(move |s| {
                let f = RawFrontend::connect(s, features);
                let _ = f.fe.set_vring_num(3, 16);
            }),
        ),
        (
            "features never offered",
            Box::new(|s| {
                let fe = Frontend::connect(s, 1).unwrap();
                let _ = fe.set_features(1 << 63);
                let _ = fe.get_features();
            }),
        ),
        (
            "memory region larger than its file",
            Box::new(|s| {
                let fe = Frontend::connect(s, 1).unwrap();
                let mem = tempfile::tempfile().unwrap();
                mem.set_len(4096).unwrap();
                let region = VhostUserMemoryRegionInfo {
                    guest_phys_addr: 0,
                    memory_size: MIB,
                    userspace_addr: RAW_VA,
                    mmap_offset: 0,
                    mmap_handle: mem.as_raw_fd(),
                };
                let _ = fe.set_mem_table(&[region]);
                let _ = fe.get_features();
            }),
        ),
    ];
    for (i, (what, case)) in cases.iter().enumerate() {
        case(&server.socket);
        wait_until(what, Duration::from_secs(10), || errors(&server.stats) > i as u64);
    }
    check_serves(&server.socket, Layout::Split, 0);
    server.stop();
}

/// Descriptors that point outside guest memory (or cross its end): the ring latches
/// broken, nothing is read or written outside the regions, no completion is made up, and
/// the next connection is served.
#[test]
fn hostile_descriptors_break_the_ring_only() {
    let server = TestServer::start(4 * MIB, BlkBackendOptions::default());
    let mut faults = 0;
    for layout in LAYOUTS {
        let opts = ConnectOptions { required_features: layout.features().bits(), ..Default::default() };
        for case in 0..3 {
            let conn = Connection::connect(&server.socket, &opts).unwrap();
            let packed = conn.features().contains(Features::RING_PACKED);
            assert_eq!(packed, layout.features().contains(Features::RING_PACKED));
            let end = conn.memory().regions().iter().map(|r| r.gpa() + r.size() as u64).max().unwrap();
            let (h, s) = (conn.memory().alloc(16).unwrap(), conn.memory().alloc(1).unwrap());
            let (what, sg) = match case {
                0 => ("past the end of memory", Sg::new(end + 4096, 512)),
                1 => ("crossing the end of memory", Sg::new(end - 256, 512)),
                _ => ("4 GiB long", Sg::new(h.gpa(), u32::MAX)),
            };
            let mut q = conn.create_queue::<u16>(0, 16, 0).unwrap();
            q.vq_mut().add_sgs_premapped(&[&[h.sg()], &[sg]], &[&[s.sg()]], 1).unwrap();
            q.kick().unwrap();
            faults += 1;
            wait_until(what, Duration::from_secs(10), || server.stats.queue_faults.load(Ordering::Relaxed) >= faults);
            assert!(!q.vq().has_used(), "{}: {what}: a completion for a request that was not served", layout.name());
            q.leak_on_drop();
            drop(q);
            drop((h, s));
            drop(conn);
        }
        check_serves(&server.socket, layout, 0);
    }
    server.stop();
}
