#!/usr/bin/env bash
# Runs the Linux-guest harness against virtq's own vhost-user-blk back end (`virtq
# serve-blk`): the guest's virtio_blk and virtio_ring.c drive rings that virtq's
# DeviceQueue serves. For each ring
# layout (split, then packed), on a fresh 64 MiB image and one back-end process:
#
#   1. run.sh --test pattern                  (packed: --packed, and bit 34 must be negotiated,
#                                              else run.sh exits 3)
#   2. run.sh --test mq --queues 4            the same back end, a second connection
#   3. the back end is still running after both guests powered off, and logged no error
#   4. check-image.sh IMAGE --test all        the image holds both tests' regions, with the
#                                             checksums the guests printed
#
#   scripts/guest/test-backend.sh [--layout split|packed|both] [--virtq PATH] [--keep]
#
#   --layout L      which ring layouts to run (default both)
#   --virtq PATH    the virtq binary whose `serve-blk` is the back end (default: built
#                   with cargo, debug profile; also VIRTQ_BIN)
#   --keep          keep the temp folder with the logs and images
#
# Runs scripts/guest/setup.sh first if the kernel or initramfs is missing. Prints one
# "test-backend: <layout>/<step> PASS|FAIL (<seconds>s)" line a step and a closing
# "N passed, N failed" line; exit 0 only if every step passed.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2; exit "${1:-2}"; }

LAYOUTS=(split packed)
VIRTQ=${VIRTQ_BIN:-}
KEEP=0
while [ $# -gt 0 ]; do
    case $1 in
    --layout) case ${2:?} in split | packed) LAYOUTS=("$2") ;; both) LAYOUTS=(split packed) ;; *) usage ;; esac; shift 2 ;;
    --virtq) VIRTQ=${2:?}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage 0 ;;
    *) echo "test-backend.sh: unknown argument $1" >&2; usage ;;
    esac
done

CACHE=${VIRTQ_GUEST_CACHE:-${HOME:-/root}/.cache/virtq-guest}
if [ ! -r "${VIRTQ_GUEST_KERNEL:-$CACHE/vmlinuz}" ] || [ ! -r "${VIRTQ_GUEST_INITRD:-$CACHE/initramfs.cpio.gz}" ]; then
    "$HERE/setup.sh"
fi

if [ -z "$VIRTQ" ]; then
    echo "test-backend: building virtq" >&2
    (cd "$ROOT" && cargo build -q -p virtq-cli --bin virtq)
    VIRTQ=$ROOT/target/debug/virtq
fi
[ -x "$VIRTQ" ] || { echo "test-backend: $VIRTQ is not an executable" >&2; exit 2; }

DIR=$(mktemp -d "${TMPDIR:-/tmp}/virtq-backend.XXXXXX")
BACKEND_PID=""
stop_backend() {
    if [ -n "$BACKEND_PID" ]; then
        kill "$BACKEND_PID" 2>/dev/null || true
        wait "$BACKEND_PID" 2>/dev/null || true
        BACKEND_PID=""
    fi
}
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    stop_backend
    if [ "$KEEP" = 1 ]; then echo "test-backend: logs kept in $DIR"; else rm -rf "$DIR"; fi
}
trap cleanup EXIT

passed=0
failed=0
record() { # record NAME OK SECONDS [DETAIL]
    if [ "$2" = 1 ]; then
        echo "test-backend: $1 PASS (${3}s)"
        passed=$((passed + 1))
    else
        echo "test-backend: $1 FAIL (${3}s)${4:+: $4}"
        failed=$((failed + 1))
    fi
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# step NAME EXPECTED_EXIT COMMAND...
step() {
    local name=$1 want=$2 rc t0
    shift 2
    t0=$(now)
    set +e
    "$@" >"$DIR/$name.out" 2>&1
    rc=$?
    set -e
    grep -E '^(run\.sh|check-image\.sh):' "$DIR/$name.out" | sed 's/^/    /' || true
    if [ "$rc" = "$want" ]; then
        record "$name" 1 "$(secs "$t0")"
    else
        record "$name" 0 "$(secs "$t0")" "exit $rc, wanted $want"
        sed 's/^/    | /' "$DIR/$name.out" | tail -n 40
    fi
}

for layout in "${LAYOUTS[@]}"; do
    mkdir -p "$DIR/$layout"
    image=$DIR/$layout/disk.raw
    sock=$DIR/$layout/blk.sock
    log=$DIR/$layout/backend.log
    truncate -s 64M "$image"
    "$VIRTQ" serve-blk --socket "$sock" --image "$image" --queues 4 >"$log" 2>&1 &
    BACKEND_PID=$!
    for _ in $(seq 100); do
        [ -S "$sock" ] && break
        kill -0 "$BACKEND_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [ ! -S "$sock" ]; then
        record "$layout/start" 0 0 "the back end did not listen on $sock"
        sed 's/^/    | /' "$log"
        BACKEND_PID=""
        continue
    fi
    packed=()
    [ "$layout" = packed ] && packed=(--packed)
    step "$layout/pattern" 0 "$HERE/run.sh" "$sock" --test pattern "${packed[@]}" --quiet --log "$DIR/$layout/pattern.log"
    step "$layout/mq" 0 "$HERE/run.sh" "$sock" --test mq --queues 4 "${packed[@]}" --quiet --log "$DIR/$layout/mq.log"
    t0=$(now)
    if ! kill -0 "$BACKEND_PID" 2>/dev/null; then
        record "$layout/backend-alive" 0 "$(secs "$t0")" "the back end exited"
        sed 's/^/    | /' "$log" | tail -n 20
    elif grep -q 'error' "$log"; then
        record "$layout/backend-alive" 0 "$(secs "$t0")" "the back end logged errors"
        grep 'error' "$log" | sed 's/^/    | /' | head -n 20
    else
        record "$layout/backend-alive" 1 "$(secs "$t0")"
    fi
    stop_backend
    step "$layout/check-image" 0 "$HERE/check-image.sh" "$image" --test all --log "$DIR/$layout/pattern.log" --log "$DIR/$layout/mq.log"
done

echo "test-backend: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
