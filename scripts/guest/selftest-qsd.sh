#!/usr/bin/env bash
# Validates the guest harness against a real vhost-user-blk back end, qemu-storage-daemon
# (QEMU's libvhost-user; split ring only), on a fresh 64 MiB raw image:
#
#   1. run.sh --test pattern                  must pass
#   2. run.sh --test mq --queues 4            must pass
#   3. check-image.sh IMAGE --test all        the image holds both tests' regions, with the
#                                             checksums the guest printed
#   4. run.sh --test pattern --packed         must exit 3: qsd offers no RING_PACKED, so
#                                             the guest negotiates a split ring
#
#   scripts/guest/selftest-qsd.sh [--keep]    (--keep leaves the temp folder and logs)
#
# Runs scripts/guest/setup.sh first if the kernel or initramfs is missing.
# Prints one "selftest: <step> PASS|FAIL (<seconds>s)" line a step and a closing
# "N passed, N failed" line; exit 0 only if every step passed.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
KEEP=0
[ "${1:-}" = --keep ] && KEEP=1

CACHE=${VIRTQ_GUEST_CACHE:-${HOME:-/root}/.cache/virtq-guest}
if [ ! -r "${VIRTQ_GUEST_KERNEL:-$CACHE/vmlinuz}" ] || [ ! -r "${VIRTQ_GUEST_INITRD:-$CACHE/initramfs.cpio.gz}" ]; then
    "$HERE/setup.sh"
fi
QSD=${VIRTQ_QSD:-qemu-storage-daemon}
command -v "$QSD" >/dev/null || { echo "selftest: $QSD not found" >&2; exit 2; }

DIR=$(mktemp -d "${TMPDIR:-/tmp}/virtq-qsd.XXXXXX")
QSD_PID=""
stop_qsd() {
    if [ -n "$QSD_PID" ]; then
        kill "$QSD_PID" 2>/dev/null || true
        wait "$QSD_PID" 2>/dev/null || true
        QSD_PID=""
    fi
}
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    stop_qsd
    if [ "$KEEP" = 1 ]; then echo "selftest: logs kept in $DIR"; else rm -rf "$DIR"; fi
}
trap cleanup EXIT

IMAGE=$DIR/disk.raw
SOCK=$DIR/blk.sock
truncate -s 64M "$IMAGE"
"$QSD" \
    --blockdev "driver=file,node-name=file0,filename=$IMAGE,cache.direct=off,aio=threads" \
    --blockdev driver=raw,node-name=raw0,file=file0 \
    --export "type=vhost-user-blk,id=exp0,node-name=raw0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=4" \
    >"$DIR/qsd.log" 2>&1 &
QSD_PID=$!
for _ in $(seq 100); do
    [ -S "$SOCK" ] && break
    kill -0 "$QSD_PID" 2>/dev/null || { cat "$DIR/qsd.log"; echo "selftest: qemu-storage-daemon exited" >&2; exit 1; }
    sleep 0.1
done
[ -S "$SOCK" ] || { echo "selftest: no socket from qemu-storage-daemon" >&2; exit 1; }

passed=0
failed=0
# step NAME EXPECTED_EXIT COMMAND...
step() {
    local name=$1 want=$2 rc t0 t1
    shift 2
    t0=$(date +%s.%N)
    set +e
    "$@" >"$DIR/$name.out" 2>&1
    rc=$?
    set -e
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    grep -E '^(run\.sh|check-image\.sh):' "$DIR/$name.out" | sed 's/^/    /' || true
    if [ "$rc" = "$want" ]; then
        echo "selftest: $name PASS (exit $rc, ${secs}s)"
        passed=$((passed + 1))
    else
        echo "selftest: $name FAIL (exit $rc, wanted $want, ${secs}s); output:"
        sed 's/^/    | /' "$DIR/$name.out" | tail -n 40
        failed=$((failed + 1))
    fi
}

step pattern 0 "$HERE/run.sh" "$SOCK" --test pattern --quiet --log "$DIR/pattern.log"
step mq 0 "$HERE/run.sh" "$SOCK" --test mq --queues 4 --quiet --log "$DIR/mq.log"
step check-image 0 "$HERE/check-image.sh" "$IMAGE" --test all --log "$DIR/pattern.log" --log "$DIR/mq.log"
step packed-not-offered 3 "$HERE/run.sh" "$SOCK" --test pattern --packed --quiet --log "$DIR/packed.log"
stop_qsd

echo "selftest: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
