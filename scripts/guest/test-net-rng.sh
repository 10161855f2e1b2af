#!/usr/bin/env bash
# Runs the Linux guest against virtq's own vhost-user-net and vhost-user-rng back ends
# (`virtq serve-net --tap`, `virtq serve-rng`): the guest's virtio_net, virtio-rng and
# virtio_ring.c drive rings that virtq's DeviceQueue serves. For each ring layout (split,
# then packed with packed=on on both devices), one boot:
#
#   1. rng        the guest reads --rng-bytes from /dev/hwrng (current rng virtio_rng)
#   2. ping       the guest pings the namespace's address, the namespace pings the guest
#   3. rx         the guest downloads --mb MiB from the namespace (busybox httpd); the
#                 SHA-256 it prints must match the file's
#   4. tx         the namespace downloads --mb MiB from the guest; the SHA-256 must match
#                 the one the guest printed
#   5. features   both devices negotiated the layout (bit 34 RING_PACKED set or clear)
#   6. backends   both back ends still run after the guest powered off, and logged no error
#
# QEMU's vhost-user-rng-pci offers the guest whatever its back end offers (packed=off has
# no effect on it): the split run's serve-rng is started with --no-packed.
#
# The TAP device lives in a network namespace this script creates (serve-net runs inside
# it and creates the TAP there); the guest has 10.213.0.2/24, the namespace 10.213.0.1/24.
# No traffic leaves the namespace. The namespace, the processes and the temp folder are
# removed on exit.
#
#   scripts/guest/test-net-rng.sh [--layout split|packed|both] [--mb N] [--rng-bytes N]
#                                 [--virtq PATH] [--keep]
#
#   --layout L      which ring layouts to run (default both)
#   --mb N          MiB transferred each way (default 64)
#   --rng-bytes N   bytes read from /dev/hwrng (default 1048576)
#   --virtq PATH    the virtq binary (default: built with cargo, debug profile; also
#                   VIRTQ_BIN)
#   --keep          keep the temp folder with the logs
#
# Needs root (network namespace, TAP), iproute2, busybox (setup.sh installs it) and the
# guest of scripts/guest/setup.sh (run first if the kernel or initramfs is missing, or
# the initramfs holds another init.sh).
# Prints one "test-net-rng: <layout>/<step> PASS|FAIL" line a step and a closing
# "N passed, N failed" line; exit 0 only if every step passed, 2 on a setup error.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2; exit "${1:-2}"; }
die() { echo "test-net-rng: error: $*" >&2; exit 2; }

LAYOUTS=(split packed)
MB=64
RNG_BYTES=1048576
VIRTQ=${VIRTQ_BIN:-}
KEEP=0
while [ $# -gt 0 ]; do
    case $1 in
    --layout) case ${2:?} in split | packed) LAYOUTS=("$2") ;; both) LAYOUTS=(split packed) ;; *) usage ;; esac; shift 2 ;;
    --mb) MB=${2:?}; shift 2 ;;
    --rng-bytes) RNG_BYTES=${2:?}; shift 2 ;;
    --virtq) VIRTQ=${2:?}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage 0 ;;
    *) echo "test-net-rng: unknown argument $1" >&2; usage ;;
    esac
done
[[ $MB =~ ^[1-9][0-9]*$ ]] || die "--mb must be a positive integer"
[[ $RNG_BYTES =~ ^[1-9][0-9]*$ ]] || die "--rng-bytes must be a positive integer"
[ "$(id -u)" -eq 0 ] || die "needs root (a network namespace and a TAP device)"
command -v ip >/dev/null || die "ip (iproute2) is missing"
command -v busybox >/dev/null || die "busybox is missing (scripts/guest/setup.sh installs busybox-static)"
[ -c /dev/net/tun ] || die "/dev/net/tun is missing"

CACHE=${VIRTQ_GUEST_CACHE:-${HOME:-/root}/.cache/virtq-guest}
KERNEL=${VIRTQ_GUEST_KERNEL:-$CACHE/vmlinuz}
INITRD=${VIRTQ_GUEST_INITRD:-$CACHE/initramfs.cpio.gz}
QEMU=${VIRTQ_QEMU:-qemu-system-x86_64}
# The initramfs must hold this checkout's init.sh (an older one has no netrng test).
initrd_current() { gzip -dc "$INITRD" 2>/dev/null | cpio -i --to-stdout --quiet init 2>/dev/null | cmp -s - "$HERE/init.sh"; }
if [ ! -r "$KERNEL" ] || [ ! -r "$INITRD" ] || ! initrd_current; then
    "$HERE/setup.sh" >&2
    initrd_current || die "$INITRD does not hold scripts/guest/init.sh after setup.sh"
fi
command -v "$QEMU" >/dev/null || die "$QEMU not found: run scripts/guest/setup.sh"

if [ -z "$VIRTQ" ]; then
    echo "test-net-rng: building virtq" >&2
    (cd "$ROOT" && cargo build -q -p virtq-cli)
    VIRTQ=$ROOT/target/debug/virtq
fi
[ -x "$VIRTQ" ] || die "$VIRTQ is not an executable"

DIR=$(mktemp -d "${TMPDIR:-/tmp}/virtq-netrng.XXXXXX")
NS=virtq-netrng-$$
TAP=vqnet0
HOST_IP=10.213.0.1
GUEST_IP=10.213.0.2
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    ip netns del "$NS" 2>/dev/null || true
    if [ "$KEEP" = 1 ]; then echo "test-net-rng: logs kept in $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT

pass=0
fail=0
step() { # step LAYOUT NAME OK DETAIL
    if [ "$3" = 1 ]; then
        echo "test-net-rng: $1/$2 PASS $4"
        pass=$((pass + 1))
    else
        echo "test-net-rng: $1/$2 FAIL $4"
        fail=$((fail + 1))
    fi
}

# The peer's side: a namespace with the TAP device (made by serve-net inside it), an
# address, and a web server with the file the guest downloads.
ip netns add "$NS"
mkdir -p "$DIR/www"
head -c $((MB * 1048576)) /dev/urandom >"$DIR/www/rx.bin"
RX_SUM=$(sha256sum <"$DIR/www/rx.bin" | cut -d' ' -f1)

wait_socket() {
    local i=0
    until [ -S "$1" ]; do
        i=$((i + 1))
        [ "$i" -le 100 ] || die "$1 did not appear within 10 s"
        sleep 0.1
    done
}

ip netns exec "$NS" "$VIRTQ" serve-net --socket "$DIR/net.sock" --tap "$TAP" >"$DIR/serve-net.log" 2>&1 &
NET_PID=$!
PIDS+=("$NET_PID")
wait_socket "$DIR/net.sock"
ip -n "$NS" link set lo up
ip -n "$NS" addr add "$HOST_IP/24" dev "$TAP"
ip -n "$NS" link set "$TAP" up
ip netns exec "$NS" busybox httpd -f -p "$HOST_IP:8080" -h "$DIR/www" &
PIDS+=("$!")

# Waits until the console log $1 has a line matching $2; false after $3 seconds or once
# the QEMU process $4 has exited.
wait_line() {
    local i=0
    until tr -d '\r' <"$1" | grep -aqE "$2"; do
        kill -0 "$4" 2>/dev/null || return 1
        i=$((i + 1))
        [ "$i" -le $(($3 * 10)) ] || return 1
        sleep 0.1
    done
}

for layout in "${LAYOUTS[@]}"; do
    log=$DIR/guest-$layout.log
    : >"$log"
    rm -f "$DIR/www/tx-done"
    packed=""
    [ "$layout" = packed ] && packed=",packed=on"
    # vhost-user-rng-pci offers the guest whatever the back end offers, packed=off or
    # not: for the split run the back end does not offer RING_PACKED.
    no_packed=()
    [ "$layout" = split ] && no_packed=(--no-packed)
    "$VIRTQ" serve-rng --socket "$DIR/rng-$layout.sock" "${no_packed[@]}" >"$DIR/serve-rng-$layout.log" 2>&1 &
    RNG_PID=$!
    PIDS+=("$RNG_PID")
    wait_socket "$DIR/rng-$layout.sock"
    start=$(date +%s)
    timeout -k 10 600 "$QEMU" -machine q35 -accel tcg -cpu max -m 512M -smp 1 \
        -object memory-backend-memfd,id=mem0,size=512M,share=on -machine memory-backend=mem0 \
        -chardev "socket,id=n0,path=$DIR/net.sock" -netdev vhost-user,id=net0,chardev=n0 \
        -device "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56$packed" \
        -chardev "socket,id=r0,path=$DIR/rng-$layout.sock" -device "vhost-user-rng-pci,chardev=r0$packed" \
        -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 rdinit=/init quiet virtq.test=netrng virtq.addr=$GUEST_IP/24 virtq.peer=$HOST_IP virtq.mb=$MB virtq.rng=$RNG_BYTES" \
        -display none -nodefaults -no-reboot -serial stdio </dev/null >"$log" 2>&1 &
    qemu=$!
    host_ping=0
    tx_ok=0
    tx_detail="the guest never served tx.bin"
    if wait_line "$log" '^VIRTQ-RESULT net up' 300 "$qemu"; then
        if ip netns exec "$NS" busybox ping -c 3 -W 5 "$GUEST_IP" >"$DIR/ping-$layout.log" 2>&1; then host_ping=1; fi
    fi
    if wait_line "$log" '^VIRTQ-RESULT net tx-ready' 400 "$qemu"; then
        want=$(tr -d '\r' <"$log" | sed -n 's/^VIRTQ-RESULT net tx-ready .*sha256=\([0-9a-f]*\).*/\1/p' | sed -n 1p)
        t0=$(date +%s.%N)
        got=$(ip netns exec "$NS" busybox wget -q -O - "http://$GUEST_IP:8080/tx.bin" | sha256sum | cut -d' ' -f1 || true)
        t1=$(date +%s.%N)
        secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
        if [ -n "$want" ] && [ "$got" = "$want" ]; then
            tx_ok=1
            tx_detail="($MB MiB in ${secs}s)"
        else
            tx_detail="(sha256 $got, the guest's $want)"
        fi
        touch "$DIR/www/tx-done"
    fi
    wait "$qemu" || true
    wall=$(($(date +%s) - start))
    results=$(tr -d '\r' <"$log" | grep -a '^VIRTQ-RESULT ' || true)
    field() { printf '%s\n' "$results" | sed -n "s/^VIRTQ-RESULT $1.*$2=\([^ ]*\).*/\1/p" | sed -n 1p; }

    rng_line=$(printf '%s\n' "$results" | grep '^VIRTQ-RESULT rng ' || true)
    ok=0; [ -n "$rng_line" ] && [ "$(field rng bytes)" = "$RNG_BYTES" ] && ok=1
    step "$layout" rng "$ok" "(${rng_line#VIRTQ-RESULT rng })"

    ok=0; grep -qx 'VIRTQ-RESULT net ping ok' <<<"$results" && [ "$host_ping" = 1 ] && ok=1
    step "$layout" ping "$ok" "(guest to namespace and back)"

    ok=0; [ "$(field 'net rx' sha256)" = "$RX_SUM" ] && ok=1
    step "$layout" rx "$ok" "($MB MiB in $(field 'net rx' time), sha256 $(field 'net rx' sha256))"

    step "$layout" tx "$tx_ok" "$tx_detail"

    want_bit=0; [ "$layout" = packed ] && want_bit=1
    nf=$(field 'device net' features); rf=$(field 'device rng' features)
    ok=0; [ -n "$nf" ] && [ -n "$rf" ] && [ "${nf:34:1}" = "$want_bit" ] && [ "${rf:34:1}" = "$want_bit" ] && ok=1
    step "$layout" features "$ok" "(net ring_packed=${nf:34:1} event_idx=${nf:29:1} mrg_rxbuf=${nf:15:1} csum=${nf:0:1} guest_tso4=${nf:7:1}; rng ring_packed=${rf:34:1})"

    ok=0
    if kill -0 "$NET_PID" 2>/dev/null && kill -0 "$RNG_PID" 2>/dev/null \
        && ! grep -q 'error' "$DIR/serve-net.log" "$DIR/serve-rng-$layout.log"; then ok=1; fi
    step "$layout" backends "$ok" "(guest verdict: $(printf '%s\n' "$results" | grep -E '^VIRTQ-RESULT (ok|fail)' | sed -n 1p), wall ${wall}s)"
    if ! grep -qx 'VIRTQ-RESULT ok' <<<"$results"; then
        echo "---- last console lines ($layout) ----"
        tr -d '\r' <"$log" | tail -n 20
        grep -h error "$DIR/serve-net.log" "$DIR/serve-rng-$layout.log" | tail -n 10 || true
    fi
done

echo "test-net-rng: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
