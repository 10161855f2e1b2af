//! The back end against the Linux kernel's own virtio driver: QEMU (TCG) boots a Debian
//! kernel with a `vhost-user-blk-pci` disk served by `virtq serve-blk`, through `scripts/guest/test-backend.sh`:
//!
//! - split ring, then packed ring (`packed=on`; bit 34 must be negotiated);
//! - for each: the pattern test, the multiqueue test (num-queues 4, 2 guest CPUs), the back
//!   end still up after both guests powered off, and the image checked on the host with
//!   `scripts/guest/check-image.sh`.
//!
//! Marked ignored where build.rs finds no QEMU guest (`scripts/guest/setup.sh` makes one).
//! Bounded to 15 minutes (it takes about one).

#[path = "util/guest.rs"]
mod guest;

use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(15 * 60);

#[test]
#[cfg_attr(not(peer = "guest"), ignore = "needs QEMU and the Linux guest of scripts/guest/setup.sh")]
fn linux_guest_split_and_packed() {
    let qemu = std::env::var("VIRTQ_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    assert!(guest::on_path(&qemu), "{qemu} is not installed (build.rs marks this test ignored without it)");
    let (status, out) = guest::run_harness("test-backend.sh", &guest::build_virtq(), LIMIT);
    for step in ["split/pattern", "split/mq", "split/backend-alive", "split/check-image"] {
        assert!(out.contains(&format!("test-backend: {step} PASS")), "{step} did not pass");
        let packed = step.replace("split", "packed");
        assert!(out.contains(&format!("test-backend: {packed} PASS")), "{packed} did not pass");
    }
    assert!(out.contains("ring=packed"), "the packed runs did not negotiate RING_PACKED");
    assert!(out.contains("8 passed, 0 failed"));
    assert!(status.success());
}
