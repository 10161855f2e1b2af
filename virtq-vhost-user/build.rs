//! Finds the real peers the integration tests drive (qemu-storage-daemon, QEMU with a
//! Linux guest, DPDK's testpmd, TAP devices, huge pages) and tells the tests with
//! `cfg(peer = "...")`. A test whose peer is missing is marked ignored, with the reason,
//! so that `cargo test` reports it as skipped and never as passed; `cfg(ci)` (`CI=true`)
//! turns on a test that fails unless every peer is here. Nothing else depends on these
//! flags: the library builds the same everywhere.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

const PEERS: [&str; 5] = ["qsd", "guest", "dpdk", "tap", "hugetlbfs"];

fn main() {
    let values: Vec<String> = PEERS.iter().map(|p| format!("\"{p}\"")).collect();
    println!("cargo::rustc-check-cfg=cfg(peer, values({}))", values.join(", "));
    println!("cargo::rustc-check-cfg=cfg(ci)");
    for var in ["PATH", "CI", "QEMU_STORAGE_DAEMON", "VIRTQ_QEMU", "VIRTQ_GUEST_CACHE", "HOME"] {
        println!("cargo::rerun-if-env-changed={var}");
    }

    let qsd = env::var_os("QEMU_STORAGE_DAEMON")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| on_path("qemu-storage-daemon"));
    let qemu = env::var("VIRTQ_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let qemu = if qemu.contains('/') { Some(PathBuf::from(&qemu)).filter(|p| p.is_file()) } else { on_path(&qemu) };
    let guest_cache = env::var_os("VIRTQ_GUEST_CACHE")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cache/virtq-guest")));
    let initramfs = guest_cache.map(|c| c.join("initramfs.cpio.gz"));
    let busybox = on_path("busybox");
    let testpmd = on_path("dpdk-testpmd");
    let root = is_root();
    let tun = Path::new("/dev/net/tun");
    let ip = on_path("ip");
    let hugepages = Path::new("/proc/sys/vm/nr_hugepages");

    // A peer installed after a build makes the next build look again.
    for path in [qsd.clone(), qemu.clone(), initramfs.clone(), busybox.clone(), testpmd.clone(), ip.clone()]
        .into_iter()
        .flatten()
    {
        println!("cargo::rerun-if-changed={}", path.display());
    }
    for path in ["/usr/bin/qemu-storage-daemon", "/usr/bin/qemu-system-x86_64", "/usr/bin/dpdk-testpmd"] {
        println!("cargo::rerun-if-changed={path}");
    }

    let huge = fs::read_to_string(hugepages).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0) > 0;
    let found = [
        ("qsd", qsd.is_some()),
        ("guest", qemu.is_some() && busybox.is_some() && initramfs.is_some_and(|p| p.is_file())),
        ("dpdk", testpmd.is_some()),
        ("tap", root && tun.exists() && ip.is_some()),
        ("hugetlbfs", huge),
    ];
    for (peer, here) in found {
        if here {
            println!("cargo::rustc-cfg=peer=\"{peer}\"");
        }
    }
    if env::var("CI").is_ok_and(|v| v == "true") {
        println!("cargo::rustc-cfg=ci");
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Whether this process runs as root (effective uid 0), from `/proc/self/status`.
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").ok().is_some_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .is_some_and(|euid| euid == "0")
    })
}
