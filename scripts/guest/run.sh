#!/usr/bin/env bash
# Boots a Linux guest (TCG) whose virtio_blk driver drives a vhost-user-blk back end
# listening on SOCKET, runs one test in it and checks the result.
#
#   scripts/guest/run.sh SOCKET [--test pattern|mq] [--queues N] [--packed]
#                               [--smp N] [--timeout SECONDS] [--log FILE] [--quiet]
#
#   --test pattern   O_DIRECT writes and read-backs of a deterministic pattern at several
#                    sizes and offsets (default)
#   --test mq        four concurrent writers (then readers) on disjoint regions, pinned to
#                    different CPUs; use with --queues >= 2
#   --queues N       num-queues of vhost-user-blk-pci (default 1; at most the back end's)
#   --packed         packed=on: the guest must negotiate VIRTIO_F_RING_PACKED (bit 34)
#   --smp N          guest CPUs (default 2 if --queues > 1 or --test mq, else 1). The
#                    guest's blk-mq uses min(queues, CPUs) virtqueues: --queues 4 --smp 4
#                    drives all four (slower under TCG on a 2-core host)
#   --timeout S      hard limit for the whole boot, test and poweroff (default 180)
#   --log FILE       keep the serial console output there (default: a temp file, removed)
#   --quiet          do not stream the console, print only the VIRTQ-RESULT lines
#
# Needs scripts/guest/setup.sh first (kernel and initramfs in $VIRTQ_GUEST_CACHE, default
# $HOME/.cache/virtq-guest; or set VIRTQ_GUEST_KERNEL and VIRTQ_GUEST_INITRD; VIRTQ_QEMU
# names another qemu-system-x86_64). The back end must accept memfd-backed memory (the
# guest RAM is a shared memfd) and at least N queues.
#
# Exit status: 0 the guest printed "VIRTQ-RESULT ok" (and, with --packed, negotiated bit 34);
# 1 the test failed or the guest printed no verdict; 2 usage or setup error;
# 3 --packed was asked but the guest did not negotiate RING_PACKED (the back end does not
# offer it); 124 the hard timeout fired.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2; exit "${1:-2}"; }
die() { echo "run.sh: error: $*" >&2; exit 2; }

SOCKET=""
TEST=pattern
QUEUES=1
PACKED=0
SMP=""
TIMEOUT=180
LOG=""
QUIET=0
while [ $# -gt 0 ]; do
    case $1 in
    --test) TEST=${2:?}; shift 2 ;;
    --test=*) TEST=${1#*=}; shift ;;
    --queues) QUEUES=${2:?}; shift 2 ;;
    --queues=*) QUEUES=${1#*=}; shift ;;
    --packed) PACKED=1; shift ;;
    --smp) SMP=${2:?}; shift 2 ;;
    --smp=*) SMP=${1#*=}; shift ;;
    --timeout) TIMEOUT=${2:?}; shift 2 ;;
    --timeout=*) TIMEOUT=${1#*=}; shift ;;
    --log) LOG=${2:?}; shift 2 ;;
    --log=*) LOG=${1#*=}; shift ;;
    --quiet) QUIET=1; shift ;;
    -h | --help) usage 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$SOCKET" ] || usage; SOCKET=$1; shift ;;
    esac
done
[ -n "$SOCKET" ] || usage
case $TEST in pattern | mq) ;; *) die "--test must be pattern or mq" ;; esac
[[ $QUEUES =~ ^[1-9][0-9]*$ ]] || die "--queues must be a positive integer"
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive integer"
if [ -z "$SMP" ]; then
    if [ "$QUEUES" -gt 1 ] || [ "$TEST" = mq ]; then SMP=2; else SMP=1; fi
fi
[[ $SMP =~ ^[1-9][0-9]*$ ]] || die "--smp must be a positive integer"
[ -S "$SOCKET" ] || die "$SOCKET is not a listening unix socket (start the back end first)"

CACHE=${VIRTQ_GUEST_CACHE:-${HOME:-/root}/.cache/virtq-guest}
KERNEL=${VIRTQ_GUEST_KERNEL:-$CACHE/vmlinuz}
INITRD=${VIRTQ_GUEST_INITRD:-$CACHE/initramfs.cpio.gz}
QEMU=${VIRTQ_QEMU:-qemu-system-x86_64}
[ -r "$KERNEL" ] || die "no kernel at $KERNEL: run scripts/guest/setup.sh"
[ -r "$INITRD" ] || die "no initramfs at $INITRD: run scripts/guest/setup.sh"
command -v "$QEMU" >/dev/null || die "$QEMU not found: run scripts/guest/setup.sh"

KEEP_LOG=1
if [ -z "$LOG" ]; then
    LOG=$(mktemp "${TMPDIR:-/tmp}/virtq-guest.XXXXXX.log")
    KEEP_LOG=0
fi
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() { if [ "$KEEP_LOG" = 0 ]; then rm -f "$LOG"; fi; }
trap cleanup EXIT

MEM=512M
dev="vhost-user-blk-pci,chardev=blk0,num-queues=$QUEUES"
[ "$PACKED" = 1 ] && dev="$dev,packed=on"
cmd=(timeout -k 10 "$TIMEOUT"
    "$QEMU" -machine q35 -accel tcg -cpu max -m "$MEM" -smp "$SMP"
    -object "memory-backend-memfd,id=mem0,size=$MEM,share=on" -machine memory-backend=mem0
    -chardev "socket,id=blk0,path=$SOCKET"
    -device "$dev"
    -kernel "$KERNEL" -initrd "$INITRD"
    -append "console=ttyS0 panic=-1 rdinit=/init quiet virtq.test=$TEST"
    -display none -nodefaults -no-reboot -serial stdio)

echo "run.sh: test=$TEST queues=$QUEUES packed=$PACKED smp=$SMP timeout=${TIMEOUT}s socket=$SOCKET" >&2
start=$(date +%s.%N)
set +e
if [ "$QUIET" = 1 ]; then
    "${cmd[@]}" </dev/null >"$LOG" 2>&1
    rc=$?
else
    "${cmd[@]}" </dev/null 2>&1 | tee "$LOG"
    rc=${PIPESTATUS[0]}
fi
set -e
end=$(date +%s.%N)
wall=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')

results=$(tr -d '\r' <"$LOG" | grep -a '^VIRTQ-RESULT ' || true)
echo "---- VIRTQ-RESULT lines (wall ${wall}s, qemu exit $rc) ----"
if [ -n "$results" ]; then printf '%s\n' "$results"; fi
echo "----"

verdict() { echo "run.sh: $*"; }

if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    verdict "FAIL: timeout after ${TIMEOUT}s (wall ${wall}s)"
    [ "$KEEP_LOG" = 1 ] || { echo "---- last console lines ----"; tr -d '\r' <"$LOG" | tail -n 30; }
    exit 124
fi

features=$(printf '%s\n' "$results" | sed -n 's/^VIRTQ-RESULT features=\([01]*\).*/\1/p' | sed -n 1p)
if [ -n "$features" ]; then
    names=""
    for kv in 1:BLK_SIZE_MAX 2:BLK_SEG_MAX 6:BLK_BLK_SIZE 9:BLK_FLUSH 10:BLK_TOPOLOGY 11:BLK_CONFIG_WCE \
        12:BLK_MQ 13:BLK_DISCARD 14:BLK_WRITE_ZEROES 28:INDIRECT_DESC 29:EVENT_IDX 32:VERSION_1 \
        33:ACCESS_PLATFORM 34:RING_PACKED 35:IN_ORDER 37:NOTIFICATION_DATA; do
        [ "${features:${kv%%:*}:1}" = 1 ] && names="$names ${kv#*:}"
    done
    echo "run.sh: negotiated features:$names"
fi

if grep -q '^VIRTQ-RESULT fail' <<<"$results"; then
    verdict "FAIL: $(printf '%s\n' "$results" | sed -n 's/^VIRTQ-RESULT fail //p' | sed -n 1p) (wall ${wall}s)"
    exit 1
fi
if ! grep -qx 'VIRTQ-RESULT ok' <<<"$results"; then
    verdict "FAIL: the guest printed no 'VIRTQ-RESULT ok' (qemu exit $rc, wall ${wall}s)"
    [ "$KEEP_LOG" = 1 ] || { echo "---- last console lines ----"; tr -d '\r' <"$LOG" | tail -n 30; }
    exit 1
fi
if [ -z "$features" ]; then
    verdict "FAIL: the guest printed no features line"
    exit 1
fi
bit34=${features:34:1}
if [ "$PACKED" = 1 ] && [ "$bit34" != 1 ]; then
    verdict "FAIL: --packed (packed=on) was asked but the guest did not negotiate VIRTIO_F_RING_PACKED (bit 34 = $bit34): the back end does not offer it, so the guest used a split ring. The I/O test itself passed. (wall ${wall}s)"
    exit 3
fi
if [ "$PACKED" = 0 ] && [ "$bit34" = 1 ]; then
    verdict "FAIL: RING_PACKED (bit 34) negotiated without --packed"
    exit 1
fi
verdict "PASS: test=$TEST queues=$QUEUES ring=$([ "$bit34" = 1 ] && echo packed || echo split) (wall ${wall}s)"
exit 0
