//! Helpers for the back-end tests: an in-process `serve-blk` server on a temporary socket,
//! the four ring layouts as frontend options, child processes (the test binary run again
//! in another role, so that a test can kill a frontend or a back end with SIGKILL), and a
//! deterministic data generator.

#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtq_vhost_user::backend::blk::{BlkBackend, BlkBackendOptions};
use virtq_vhost_user::backend::{Server, ServerOptions, ShutdownHandle, Stats};
use virtq_vhost_user::blk::{BlkDevice, BlkOptions};
use virtq_vhost_user::virtq::Features;
use virtq_vhost_user::{MemoryConfig, WaitMode};

/// A ring layout, as the frontend negotiates it: its `features()` are the ring bits the
/// frontend is made to require.
pub use virtq_vhost_user::virtq::LayoutKind as Layout;

pub const LAYOUTS: [Layout; 4] = Layout::ALL;

/// Frontend options for `layout`: small rings so that they wrap often.
pub fn blk_options(layout: Layout, queues: u16, queue_size: u16) -> BlkOptions {
    BlkOptions {
        queues,
        queue_size,
        required_features: layout.features().bits(),
        // Exactly the layout's ring features: serve-blk offers all of them.
        ring_packed: layout.features().contains(Features::RING_PACKED),
        in_order: layout.features().contains(Features::IN_ORDER),
        memory: MemoryConfig { size: 32 << 20, regions: 2 },
        request_timeout: Duration::from_secs(20),
        control_timeout: Duration::from_secs(5),
        wait: WaitMode::Sleep,
        ..Default::default()
    }
}

/// An in-process back end serving an image in a temporary folder.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub stats: Arc<Stats>,
    shutdown: ShutdownHandle,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub fn start(image_bytes: u64, opts: BlkBackendOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.raw");
        std::fs::File::create(&image).and_then(|f| f.set_len(image_bytes)).expect("image");
        Self::start_on(dir, image, opts)
    }

    pub fn start_on(dir: tempfile::TempDir, image: PathBuf, opts: BlkBackendOptions) -> Self {
        Self::start_full(dir, image, opts, ServerOptions::default())
    }

    /// A server with `limits` (connection count, message timeout).
    pub fn start_with_limits(image_bytes: u64, opts: BlkBackendOptions, limits: ServerOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.raw");
        std::fs::File::create(&image).and_then(|f| f.set_len(image_bytes)).expect("image");
        Self::start_full(dir, image, opts, limits)
    }

    fn start_full(dir: tempfile::TempDir, image: PathBuf, opts: BlkBackendOptions, limits: ServerOptions) -> Self {
        let socket = dir.path().join("blk.sock");
        let device = BlkBackend::open(&image, &opts).expect("open image");
        let mut server = Server::bind_with(&socket, Arc::new(device), limits).expect("bind");
        let stats = server.stats();
        let shutdown = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run());
        Self { dir, socket, image, stats, shutdown, thread: Some(thread) }
    }

    pub fn connect(&self, opts: &BlkOptions) -> BlkDevice {
        BlkDevice::connect(&self.socket, opts).expect("connect to the back end")
    }

    /// Reads the image file directly.
    pub fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(&self.image).unwrap();
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    /// Waits (up to 10 s) until `n` connections have ended, i.e. the server is back
    /// waiting for the next frontend.
    pub fn wait_connections(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.stats.connections.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "the server did not accept connection {n}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the server and checks that it stopped cleanly.
    pub fn stop(mut self) {
        self.shutdown.shutdown();
        let t = self.thread.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "the server did not stop within 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        t.join().expect("server thread panicked").expect("server failed");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shutdown.shutdown();
            let _ = t.join();
        }
    }
}

/// The environment variable that selects a child role.
pub const CHILD_ROLE: &str = "VIRTQ_BACKEND_TEST_ROLE";

/// Runs this test binary again as a child in `role`: the child runs the test named
/// `entry`, which must call [`child_role`] first.
pub fn spawn_child(entry: &str, role: &str, args: &[(&str, String)], log: &Path) -> Child {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([entry, "--exact", "--nocapture", "--test-threads=1"]).env(CHILD_ROLE, role);
    for (k, v) in args {
        cmd.env(k, v);
    }
    let out = std::fs::File::create(log).expect("child log");
    let err = out.try_clone().unwrap();
    cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().expect("spawn child")
}

/// The role this process was started in, if it is a child.
pub fn child_role() -> Option<String> {
    std::env::var(CHILD_ROLE).ok()
}

/// Waits for `path` to exist (a progress file) or, for a socket, to accept connections,
/// up to `timeout`.
pub fn wait_for_path(path: &Path, timeout: Duration) {
    use std::os::unix::fs::FileTypeExt;
    let deadline = Instant::now() + timeout;
    let ready = |p: &Path| match std::fs::metadata(p) {
        Ok(m) if m.file_type().is_socket() => is_listening(p),
        Ok(_) => true,
        Err(_) => false,
    };
    while !ready(path) {
        assert!(Instant::now() < deadline, "{} did not appear within {timeout:?}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILL, then reap.
pub fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[path = "../util/listening.rs"]
mod listening;
#[allow(unused_imports)] // not every test crate uses each helper
pub use listening::is_listening;
#[path = "../util/rng.rs"]
mod rng;
#[allow(unused_imports)]
pub use rng::Rng;
