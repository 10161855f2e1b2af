#!/usr/bin/env bash
# The project's test command (README "Testing"): installs what the tests need on a fresh
# Debian machine, then runs every suite with a bounded duration.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "cargo is required (rustup: https://rustup.rs)" >&2
    exit 1
fi

echo "== real peers: QEMU (backports), a Debian kernel and initramfs, qemu-storage-daemon"
# The vhost-user tests start qemu-storage-daemon and boot a Linux guest themselves;
# without these they would skip. Needs root (apt) on a fresh machine.
./scripts/guest/setup.sh
if [ ! -x /usr/bin/qemu-storage-daemon ]; then
    apt-get install -y --no-install-recommends -t bookworm-backports qemu-utils
fi

echo "== real peer: DPDK testpmd (dpdk-dev), a vhost-user-net device for the net tests"
if ! command -v dpdk-testpmd >/dev/null; then
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends dpdk-dev ||
        { apt-get -o DPkg::Lock::Timeout=600 update -qq &&
            apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends dpdk-dev; }
fi

echo "== huge pages for the hugetlbfs guest-memory test (backend_hostile.rs)"
# A shrunk hugetlbfs file must not kill the back end; the test needs one free 2 MiB page
# and fails under CI=true without it.
if [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 16 ]; then
    echo 16 > /proc/sys/vm/nr_hugepages || echo "cannot reserve huge pages" >&2
fi

echo "== real peer: DPDK testpmd (dpdk-dev), a vhost-user-net device for the net tests"
if ! command -v dpdk-testpmd >/dev/null; then
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends dpdk-dev ||
        { apt-get -o DPkg::Lock::Timeout=600 update -qq &&
            apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends dpdk-dev; }
fi

echo "== unit, integration, property and doc tests"
cargo test --workspace --all-targets
cargo test --workspace --doc

echo "== virtio-net against DPDK testpmd: 1,000,000 frames per layout and queue count (release)"
cargo test --release -p virtq-vhost-user --test net_dpdk

echo "== loom models of the ring protocol (exhaustive)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p virtq --test loom --release -- --nocapture

echo "== async completions: the stress test under AddressSanitizer (10,000 futures per layout)"
# A buffer released while the device may still write it is a use after free here.
RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zsanitizer=address" CARGO_TARGET_DIR=target/asan \
    cargo test -p virtq --test async_stress --target "$(rustc -vV | sed -n 's/^host: //p')"

echo "== fuzzing, each target ${VIRTQ_FUZZ_SECS:-60} s with AddressSanitizer (longer: scripts/fuzz.sh 3600)"
./scripts/fuzz.sh "${VIRTQ_FUZZ_SECS:-60}"

echo "== the no_std core builds without alloc"
cargo build -p virtq --no-default-features

echo "== lints, formatting and documentation"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

echo "== the crates package and build as crates.io would see them"
# --allow-dirty: the suites above may leave files behind; what is checked is packaging.
cargo publish --dry-run --allow-dirty -p virtq -p virtq-vhost-user -p virtq-vm-memory

echo "== virtq bench --quick (smoke run, no thresholds)"
cargo run --release -p virtq-cli -- bench --quick
