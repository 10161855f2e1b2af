#!/usr/bin/env bash
# Fuzzes every target in fuzz/ with libFuzzer and AddressSanitizer.
#
#   scripts/fuzz.sh [SECONDS]        # each target for SECONDS (default 60)
#
# Installs cargo-fuzz if missing. cargo-fuzz needs nightly compiler flags; on a stable
# toolchain RUSTC_BOOTSTRAP=1 enables them. The committed seeds in fuzz/corpus/<target>
# are read; what libFuzzer finds goes to fuzz/work/<target> (ignored by git), and crash
# inputs to fuzz/artifacts/<target>/. Exits non-zero if any target crashed, leaked,
# timed out or ran out of memory.
#
# Environment: FUZZ_SANITIZER (default "address"; "none" to run without one),
# FUZZ_JOBS (parallel libFuzzer workers per target, default 1), FUZZ_TARGETS (a
# space-separated subset).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
sanitizer="${FUZZ_SANITIZER:-address}"
jobs="${FUZZ_JOBS:-1}"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo >/dev/null; then
    echo "cargo is required (rustup: https://rustup.rs)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
extra=()
if [ "$jobs" -gt 1 ]; then
    # Parallel workers log to fuzz-N.log in the working directory.
    extra=(-jobs="$jobs" -workers="$jobs")
fi
echo "== building (sanitizer: $sanitizer)"
cargo fuzz build -s "$sanitizer"

failed=()
for t in $targets; do
    mkdir -p "fuzz/work/$t" "fuzz/corpus/$t"
    log="fuzz/work/$t.log"
    echo "== $t for ${seconds}s (log: $log)"
    # New inputs go to the first directory; the committed seeds stay as they are.
    set +e
    cargo fuzz run -s "$sanitizer" "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        "${extra[@]}" >"$log" 2>&1
    rc=$?
    set -e
    # libFuzzer's closing lines: executions, coverage (cov: edges, ft: features), corpus.
    grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' "$log" | tail -n 1 || true
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
    if [ "$rc" -ne 0 ]; then
        echo "!! $t failed (exit $rc); see $log and fuzz/artifacts/$t/" >&2
        grep -E -A 30 'panicked at|ERROR: (AddressSanitizer|libFuzzer)|SUMMARY' "$log" | head -n 60 >&2 || true
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "== all targets ran ${seconds}s without a crash"
