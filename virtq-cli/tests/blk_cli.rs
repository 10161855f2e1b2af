//! `virtq blk` against `virtq serve-blk` on the four ring layouts (packed and in-order
//! by default, `--split` and `--no-in-order` to force the others), and against hostile
//! back ends: one that never completes GET_ID, one whose GET_CONFIG reply is empty, one
//! that reports reads done without their data. Each hostile case exits non-zero with a
//! message that says what happened.

#[path = "../../virtq-vhost-user/tests/util/fake_backend.rs"]
mod fake_backend;
#[path = "../../virtq-vhost-user/tests/util/listening.rs"]
mod listening;
#[path = "../../virtq-vhost-user/tests/util/lying_blk.rs"]
mod lying_blk;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_backend::{reply_header, ConfigReply, FakeBackend, Script};
use lying_blk::{Lie, LyingDevice};
use virtq_vhost_user::backend::blk::{BlkBackend, BlkBackendOptions};
use virtq_vhost_user::backend::Server;

/// A folder removed at drop (the crate has no tempfile dependency).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let p = std::env::temp_dir().join(format!("virtq-cli-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn virtq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_virtq"))
}

/// Runs `virtq blk --socket SOCKET ARGS...`, bounded to 60 s.
fn blk(socket: &Path, args: &[&str]) -> Output {
    let mut child = virtq()
        .arg("blk")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("virtq blk {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `virtq serve-blk` on an image in `dir`; killed (by PID) at drop.
struct ServeBlk(Child);

impl ServeBlk {
    fn start(dir: &Path) -> (Self, PathBuf) {
        let image = dir.join("disk.raw");
        std::fs::File::create(&image).and_then(|f| f.set_len(16 << 20)).unwrap();
        let socket = dir.join("blk.sock");
        let child = virtq()
            .args(["serve-blk", "--socket"])
            .arg(&socket)
            .arg("--image")
            .arg(&image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("serve-blk.log")).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !listening::is_listening(&socket) {
            assert!(start.elapsed() < Duration::from_secs(20), "serve-blk did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        (Self(child), socket)
    }
}

impl Drop for ServeBlk {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn four_layouts_against_serve_blk() {
    let dir = TempDir::new("layouts");
    let (_server, socket) = ServeBlk::start(&dir.0);
    let layouts: [(&[&str], bool, bool); 4] = [
        (&[], true, true),
        (&["--no-in-order"], true, false),
        (&["--split"], false, true),
        (&["--split", "--no-in-order"], false, false),
    ];
    for (i, (flags, packed, in_order)) in layouts.into_iter().enumerate() {
        let run = |args: &[&str]| {
            let all: Vec<&str> = flags.iter().chain(args).copied().collect();
            let out = blk(&socket, &all);
            assert!(out.status.success(), "virtq blk {all:?}: {}", text(&out.stderr));
            text(&out.stdout)
        };
        let info = run(&["info", "--json"]);
        let rings = info.lines().find(|l| l.contains("\"ring_features\"")).unwrap_or_default().to_string();
        assert_eq!(rings.contains("RING_PACKED"), packed, "{flags:?}: {rings}");
        assert_eq!(rings.contains("IN_ORDER"), in_order, "{flags:?}: {rings}");
        let offset = format!("{}", (i as u64 + 1) << 20);
        run(&["verify", "--offset", &offset, "--length", "1M", "--bs", "16k", "--iodepth", "8"]);
        let pattern = format!("{:#04x}", 0xa0 + i);
        run(&["write", "--offset", &offset, "--pattern", &pattern, "--length", "8k"]);
        let out = dir.0.join(format!("read-{i}"));
        run(&["read", "--offset", &offset, "--length", "8k", "--output", out.to_str().unwrap()]);
        assert!(std::fs::read(&out).unwrap().iter().all(|&b| b == 0xa0 + i as u8), "{flags:?}: read back");
        let bench = run(&["bench", "--duration", "300ms", "--warmup", "0s", "--json", "--iodepth", "4"]);
        assert!(bench.contains(&format!("\"ring_packed\": {packed}")), "{flags:?}: {bench}");
        assert!(bench.contains(&format!("\"in_order\": {in_order}")), "{flags:?}: {bench}");
        // The same through async completions, reads and writes, both reactor waits.
        for wait in ["sleep", "poll"] {
            let args =
                ["bench", "--duration", "300ms", "--warmup", "0s", "--json", "--iodepth", "8", "--read-pct", "50"];
            let bench = run(&[&args[..], &["--async", "--wait", wait]].concat());
            assert!(bench.contains("\"async\": true") && bench.contains("\"errors\": 0"), "{flags:?}: {bench}");
            assert!(!bench.contains("\"ops\": 0,"), "{flags:?} async {wait}: no request completed: {bench}");
        }
    }
}

#[test]
fn info_fails_when_get_id_never_completes() {
    let dir = TempDir::new("get-id");
    // A back end that sets rings up but never serves them.
    let fake = FakeBackend::start(&dir.0, Script::default());
    let start = Instant::now();
    let out = blk(&fake.socket, &["--timeout", "500ms", "info"]);
    let err = text(&out.stderr);
    eprintln!("{err}");
    assert!(!out.status.success(), "info exited 0: {}", text(&out.stdout));
    assert!(err.contains("GET_ID") && err.contains("no completion within 500ms"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
}

#[test]
fn info_says_what_an_empty_config_reply_was() {
    let dir = TempDir::new("config");
    let mut empty = reply_header(24, 12);
    empty.extend_from_slice(&[0; 12]);
    let fake = FakeBackend::start(&dir.0, Script { config: ConfigReply::Raw(empty), ..Default::default() });
    let out = blk(&fake.socket, &["--timeout", "1s", "info"]);
    let err = text(&out.stderr);
    eprintln!("{err}");
    assert!(!out.status.success());
    assert!(err.contains("GET_CONFIG") && err.contains("empty config space"), "{err}");
    assert!(!err.contains("no answer"), "{err}");
}

#[test]
fn read_fails_when_the_device_skips_the_data() {
    let dir = TempDir::new("short-read");
    let image = dir.0.join("disk.raw");
    std::fs::File::create(&image).and_then(|f| f.set_len(8 << 20)).unwrap();
    let inner = BlkBackend::open(&image, &BlkBackendOptions::default()).unwrap();
    let socket = dir.0.join("blk.sock");
    let mut server = Server::bind(&socket, Arc::new(LyingDevice { inner, lie: Lie::StatusOnly })).unwrap();
    let shutdown = server.shutdown_handle();
    let thread = std::thread::spawn(move || server.run());
    let out = blk(&socket, &["read", "--length", "4k"]);
    let err = text(&out.stderr);
    eprintln!("{err}");
    assert!(!out.status.success(), "read exited 0 with stale data: {}", text(&out.stdout));
    assert!(err.contains("used length of 1 bytes"), "{err}");
    shutdown.shutdown();
    thread.join().unwrap().unwrap();
}
