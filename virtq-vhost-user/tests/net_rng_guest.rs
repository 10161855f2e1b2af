//! virtio-net and virtio-rng on the back-end framework against the Linux kernel's own
//! drivers: QEMU (TCG) boots a Debian kernel with a `virtio-net-pci` on `virtq serve-net
//! --tap` and a `vhost-user-rng-pci` on `virtq serve-rng`, through
//! `scripts/guest/test-net-rng.sh`. One boot on split rings, one with `packed=on`; in
//! each the guest reads 1 MiB from /dev/hwrng, pings a network namespace the script
//! creates (and is pinged back), and moves 64 MiB each way, checked by SHA-256.
//!
//! Needs root, QEMU and the guest of `scripts/guest/setup.sh`: without them it is marked
//! ignored (build.rs looks). Bounded to 15 minutes (it takes about
//! one).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(15 * 60);
const TEST: &str = "linux_guest_net_and_rng_split_and_packed";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn on_path(name: &str) -> bool {
    if name.contains('/') {
        return Path::new(name).is_file();
    }
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// Checks that the peers are here: the test runs only where build.rs found them (or with
/// `--include-ignored`).
fn require_peers() {
    let qemu = std::env::var("VIRTQ_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let why = if !on_path(&qemu) {
        Some(format!("{qemu} is not installed (run scripts/guest/setup.sh)"))
    } else if !on_path("busybox") {
        Some("busybox is not installed (run scripts/guest/setup.sh)".into())
    } else if !on_path("ip") {
        Some("ip (iproute2) is not installed".into())
    } else if !root {
        Some("a network namespace and a TAP device need root".into())
    } else if !Path::new("/dev/net/tun").exists() {
        Some("/dev/net/tun is missing".into())
    } else {
        None
    };
    if let Some(why) = why {
        panic!("{TEST}: {why} (build.rs marks the test ignored without it; scripts/test.sh installs it)");
    }
}

/// Builds the `virtq` binary with the profile of this test and returns its path.
fn build_virtq() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root()).args([
        "build",
        "-p",
        "virtq-cli",
        "--bin",
        "virtq",
        "--message-format=json-render-diagnostics",
    ]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd.stderr(Stdio::inherit()).output().expect("run cargo build");
    assert!(out.status.success(), "cargo build -p virtq-cli failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in
        stdout.lines().filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"name\":\"virtq\""))
    {
        if let Some(rest) = line.split("\"executable\":\"").nth(1) {
            if let Some(path) = rest.split('"').next() {
                return PathBuf::from(path);
            }
        }
    }
    panic!("cargo did not report the virtq executable");
}

#[test]
#[cfg_attr(
    not(all(peer = "guest", peer = "tap")),
    ignore = "needs QEMU and the Linux guest of scripts/guest/setup.sh; needs root, /dev/net/tun and iproute2 for a TAP device in a namespace"
)]
fn linux_guest_net_and_rng_split_and_packed() {
    require_peers();
    let virtq = build_virtq();
    let script = repo_root().join("scripts/guest/test-net-rng.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .arg("--virtq")
        .arg(&virtq)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("run test-net-rng.sh");
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
            // SIGTERM first, so that the script's trap removes the namespace; then the
            // whole group (bash, the back ends, QEMU).
            // SAFETY: kill(2) on the process group we created; no memory involved.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(5));
            // SAFETY: as above.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!("test-net-rng.sh did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = reader.join().unwrap();
    println!("{out}");
    println!("test-net-rng.sh: {status} after {:.1}s", start.elapsed().as_secs_f64());
    for layout in ["split", "packed"] {
        for step in ["rng", "ping", "rx", "tx", "features", "backends"] {
            assert!(out.contains(&format!("test-net-rng: {layout}/{step} PASS")), "{layout}/{step} did not pass");
        }
    }
    assert!(out.contains("12 passed, 0 failed"));
    assert!(status.success());
}
