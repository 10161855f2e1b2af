//! Starts and stops qemu-storage-daemon for the integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const QSD: &str = "qemu-storage-daemon";

/// The daemon binary. A test that needs it runs only where build.rs found it (or with
/// `--include-ignored`), so a missing daemon fails the test.
pub fn qsd(test: &str) -> PathBuf {
    if let Ok(p) = std::env::var("QEMU_STORAGE_DAEMON") {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(QSD)).find(|p| p.is_file()))
        .unwrap_or_else(|| panic!("{test}: {QSD} is not installed (build.rs marks the test ignored without it; scripts/test.sh installs it)"))
}

/// What the daemon exports.
#[derive(Clone, Debug)]
pub enum Backing {
    /// null-co: reads return zeroes, writes are dropped.
    Null { size: u64 },
    /// A raw image file (created with this size if missing).
    File { path: PathBuf, size: u64 },
}

/// A running qemu-storage-daemon with a vhost-user-blk export; killed on drop.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub backing: Backing,
    pub num_queues: u16,
    bin: PathBuf,
    log: PathBuf,
    extra: Vec<String>,
    pub writable: bool,
}

impl Daemon {
    /// Starts the daemon and waits (up to 10 s) for its socket.
    pub fn start(bin: &Path, dir: &Path, backing: Backing, num_queues: u16) -> Self {
        Self::start_with(bin, dir, backing, num_queues, &[])
    }

    /// Like `start`, with extra `--export` options (`"logical-block-size=4096"`, ...).
    pub fn start_with(bin: &Path, dir: &Path, backing: Backing, num_queues: u16, extra: &[&str]) -> Self {
        let mut d = Self {
            child: None,
            socket: dir.join("blk.sock"),
            backing,
            num_queues,
            bin: bin.to_path_buf(),
            log: dir.join("qsd.log"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            writable: !extra.contains(&"writable=off"),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let node = match &self.backing {
            Backing::Null { size } => {
                vec!["--blockdev".to_string(), format!("driver=null-co,node-name=disk,size={size},read-zeroes=on")]
            }
            Backing::File { path, size } => {
                if !path.exists() {
                    let f = std::fs::File::create(path).expect("create image");
                    f.set_len(*size).expect("size image");
                }
                vec![
                    "--blockdev".to_string(),
                    format!("driver=file,node-name=file0,filename={},cache.direct=off,aio=threads", path.display()),
                    "--blockdev".to_string(),
                    "driver=raw,node-name=disk,file=file0".to_string(),
                ]
            }
        };
        let mut export = format!(
            "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={},num-queues={}",
            self.socket.display(),
            self.num_queues
        );
        if self.writable {
            export.push_str(",writable=on");
        }
        for e in &self.extra {
            export.push(',');
            export.push_str(e);
        }
        let log = std::fs::File::create(&self.log).expect("daemon log");
        let child = Command::new(&self.bin)
            .args(&node)
            .arg("--export")
            .arg(&export)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start qemu-storage-daemon");
        self.child = Some(child);
        let start = Instant::now();
        while !is_listening(&self.socket) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("{QSD} exited with {status}: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{QSD} socket was not listening within 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the daemon (SIGKILL, by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills and starts it again with the same export.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

#[path = "../util/listening.rs"]
mod listening;
#[allow(unused_imports)] // not every test crate uses each helper
pub use listening::is_listening;
#[path = "../util/rng.rs"]
mod rng;
#[allow(unused_imports)]
pub use rng::Rng;
