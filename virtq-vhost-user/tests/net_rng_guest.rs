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

#[path = "util/guest.rs"]
mod guest;

use std::path::Path;
use std::time::Duration;

use guest::on_path;

const LIMIT: Duration = Duration::from_secs(15 * 60);
const TEST: &str = "linux_guest_net_and_rng_split_and_packed";

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

#[test]
#[cfg_attr(
    not(all(peer = "guest", peer = "tap")),
    ignore = "needs QEMU and the Linux guest of scripts/guest/setup.sh; needs root, /dev/net/tun and iproute2 for a TAP device in a namespace"
)]
fn linux_guest_net_and_rng_split_and_packed() {
    require_peers();
    let (status, out) = guest::run_harness("test-net-rng.sh", &guest::build_virtq(), LIMIT);
    for layout in ["split", "packed"] {
        for step in ["rng", "ping", "rx", "tx", "features", "backends"] {
            assert!(out.contains(&format!("test-net-rng: {layout}/{step} PASS")), "{layout}/{step} did not pass");
        }
    }
    assert!(out.contains("12 passed, 0 failed"));
    assert!(status.success());
}
