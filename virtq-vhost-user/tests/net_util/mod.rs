//! Starts and stops DPDK's testpmd as a vhost-user-net device for the net tests.
//!
//! testpmd runs without hugepages (`--no-huge`), with a file prefix of its own (its
//! runtime folder `/run/dpdk/<prefix>` is removed on drop), interactive, its commands fed
//! through a FIFO that this process holds open, its output line-buffered (`stdbuf -oL`)
//! into a log file. Its device lcore runs on CPU 0.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const TESTPMD: &str = "dpdk-testpmd";

/// One testpmd at a time: they share the CPUs, and each takes a gigabyte.
static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the other peer tests off while one runs.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The testpmd binary. A test that needs it runs only where build.rs found it (or with
/// `--include-ignored`), so a missing testpmd fails the test.
pub fn testpmd(test: &str) -> PathBuf {
    if let Ok(p) = std::env::var("DPDK_TESTPMD") {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(TESTPMD)).find(|p| p.is_file()))
        .unwrap_or_else(|| panic!("{test}: {TESTPMD} is not installed (build.rs marks the test ignored without it; scripts/test.sh installs it)"))
}

/// A running testpmd with one `net_vhost` port listening on `socket`; killed on drop.
pub struct Testpmd {
    child: Option<Child>,
    commands: File,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    log: PathBuf,
    prefix: String,
}

impl Testpmd {
    /// Starts testpmd with `queues` queue pairs and waits (up to 60 s) for its prompt.
    pub fn start(bin: &Path, queues: u16) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vhost-net.sock");
        let fifo = dir.path().join("commands");
        let log = dir.path().join("testpmd.log");
        let prefix = format!("virtq-net-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("path");
        // SAFETY: a NUL-terminated path; mkfifo touches no memory of ours.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        // Read-write, so that opening does not wait for a reader, and testpmd never sees
        // end-of-file while we hold it.
        let commands = OpenOptions::new().read(true).write(true).open(&fifo).expect("open fifo");
        let stdin = OpenOptions::new().read(true).write(true).open(&fifo).expect("open fifo");
        let out = File::create(&log).expect("log");
        let child = Command::new("stdbuf")
            .arg("-oL")
            .arg(bin)
            .args(["--lcores", "0@0,1@0", "--no-huge", "-m", "1024", "--no-pci", "--log-level", "user1,8"])
            .arg(format!("--file-prefix={prefix}"))
            .arg("--vdev")
            .arg(format!("net_vhost0,iface={},queues={queues},client=0", socket.display()))
            .args(["--", "-i", "--nb-cores=1", "--total-num-mbufs=32768"])
            .arg(format!("--rxq={queues}"))
            .arg(format!("--txq={queues}"))
            .stdin(Stdio::from(stdin))
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start testpmd");
        let mut t = Self { child: Some(child), commands, dir, socket, log, prefix };
        t.wait_for("testpmd>", Duration::from_secs(60));
        t
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `text`.
    pub fn wait_for(&mut self, text: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.log().contains(text) {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("testpmd exited with {status}:\n{}", self.log());
            }
            assert!(start.elapsed() < timeout, "testpmd printed no {text:?} within {timeout:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one command line.
    pub fn cmd(&mut self, line: &str) {
        writeln!(self.commands, "{line}").expect("testpmd command");
    }

    /// Sets the forwarding mode (`io`, `macswap`, `rxonly`, `txonly`) and starts forwarding.
    pub fn forward(&mut self, mode: &str) {
        self.cmd(&format!("set fwd {mode}"));
        self.cmd("start");
        self.wait_for("packet forwarding - ports=", Duration::from_secs(10));
    }

    /// Kills testpmd (SIGKILL, by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(Path::new("/run/dpdk").join(&self.prefix));
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.prefix));
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.kill();
    }
}
