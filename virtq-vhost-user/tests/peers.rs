//! The real peers the integration tests drive, as build.rs found them. Tests that need a
//! missing peer are marked ignored (reported as such, never as passed); under `CI=true`,
//! where scripts/test.sh installs every peer, this test fails unless all of them are here.

#[test]
#[cfg_attr(not(ci), ignore = "checks the peers only under CI=true")]
fn ci_has_every_peer() {
    let peers = [
        ("qemu-storage-daemon", cfg!(peer = "qsd")),
        ("QEMU and the Linux guest (scripts/guest/setup.sh)", cfg!(peer = "guest")),
        ("DPDK testpmd", cfg!(peer = "dpdk")),
        ("root, /dev/net/tun and iproute2", cfg!(peer = "tap")),
        ("huge pages", cfg!(peer = "hugetlbfs")),
    ];
    let missing: Vec<&str> = peers.iter().filter(|(_, here)| !here).map(|(name, _)| *name).collect();
    assert!(missing.is_empty(), "CI=true but these peers are missing, so their tests would be skipped: {missing:?}");
}
