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

echo "== unit, integration, property and doc tests"
cargo test --workspace --all-targets
cargo test --workspace --doc

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

echo "== lints"
cargo clippy --workspace --all-targets -- -D warnings

echo "== virtq bench --quick (smoke run, no thresholds)"
cargo run --release -p virtq-cli -- bench --quick
