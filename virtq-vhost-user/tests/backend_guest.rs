//! The back end against the Linux kernel's own virtio driver: QEMU (TCG) boots a Debian
//! kernel with a `vhost-user-blk-pci` disk served by the `serve_blk` example (the same code
//! as `virtq serve-blk`), through `scripts/guest/test-backend.sh`:
//!
//! - split ring, then packed ring (`packed=on`; bit 34 must be negotiated);
//! - for each: the pattern test, the multiqueue test (num-queues 4, 2 guest CPUs), the back
//!   end still up after both guests powered off, and the image checked on the host with
//!   `scripts/guest/check-image.sh`.
//!
//! Skipped (with a message) when `qemu-system-x86_64` is not installed: run
//! `scripts/guest/setup.sh` first. Bounded to 15 minutes (it takes about one).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(15 * 60);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Checks that QEMU is here: the test runs only where build.rs found it (or with
/// `--include-ignored`).
fn require_qemu() {
    let qemu = std::env::var("VIRTQ_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let found = if qemu.contains('/') {
        Path::new(&qemu).is_file()
    } else {
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(&qemu).is_file()))
    };
    assert!(found, "linux_guest_split_and_packed: {qemu} is not installed (build.rs marks the test ignored without it; scripts/test.sh installs it)");
}

/// Builds the `serve_blk` example with the profile of this test and returns its path.
fn build_serve_blk() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root()).args([
        "build",
        "-p",
        "virtq-vhost-user",
        "--example",
        "serve_blk",
        "--message-format=json-render-diagnostics",
    ]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd.stderr(Stdio::inherit()).output().expect("run cargo build");
    assert!(out.status.success(), "cargo build --example serve_blk failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"name\":\"serve_blk\""))
    {
        if let Some(rest) = line.split("\"executable\":\"").nth(1) {
            if let Some(path) = rest.split('"').next() {
                return PathBuf::from(path);
            }
        }
    }
    panic!("cargo did not report the serve_blk executable");
}

#[test]
#[cfg_attr(not(peer = "guest"), ignore = "needs QEMU and the Linux guest of scripts/guest/setup.sh")]
fn linux_guest_split_and_packed() {
    require_qemu();
    let backend = build_serve_blk();
    let script = repo_root().join("scripts/guest/test-backend.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .arg("--backend")
        .arg(&backend)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("run test-backend.sh");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > LIMIT {
            // The whole group: bash, the back end, QEMU.
            // SAFETY: kill(2) on the process group we created; no memory involved.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!("test-backend.sh did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = reader.join().unwrap();
    println!("{out}");
    println!("test-backend.sh: {status} after {:.1}s", start.elapsed().as_secs_f64());
    for step in ["split/pattern", "split/mq", "split/backend-alive", "split/check-image"] {
        assert!(out.contains(&format!("test-backend: {step} PASS")), "{step} did not pass");
        let packed = step.replace("split", "packed");
        assert!(out.contains(&format!("test-backend: {packed} PASS")), "{packed} did not pass");
    }
    assert!(out.contains("ring=packed"), "the packed runs did not negotiate RING_PACKED");
    assert!(out.contains("8 passed, 0 failed"));
    assert!(status.success());
}
