#!/usr/bin/env bash
# virtq's virtio-net driver against DPDK's own virtio-user driver, on the same device.
#
# The device is DPDK's testpmd with a net_vhost port (one queue pair, its forwarding lcore
# alone on --device-cpu). Each driver in turn connects to it over vhost-user, on
# --driver-cpu, and either transmits (the device in rxonly) or receives (the device in
# txonly, sending --sizes bytes per frame). Both drivers run bursts of 32 on rings of 256
# with mergeable receive buffers; the layouts are split (packed_vq=0, in_order=0), packed
# (packed_vq=1, in_order=0) and packed in-order (packed_vq=1, in_order=1).
#
# The yardstick is the device's own count, the same for both drivers: testpmd's Rx-pps
# (transmit cells) or Tx-pps (receive cells, frames actually placed in the driver's ring)
# over --secs after --warmup. Each cell runs the two drivers alternately, --reps times
# each (A B, B A, A B, ...); the table gives the median Mpps of each and the ratio of the
# medians (virtq / DPDK). All samples go to --out as CSV.
#
#   scripts/net-vs-dpdk.sh                     the full table (12 cells, about 12 minutes)
#   scripts/net-vs-dpdk.sh --quick             one repetition of 1 s per cell (smoke run)
#   scripts/net-vs-dpdk.sh --layouts split --sizes 64 --directions tx --reps 9
#
# Needs dpdk-testpmd (apt-get install dpdk-dev), stdbuf, taskset, root or the rights to
# run DPDK without hugepages. Noisy machines give noisy figures: see --reps.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=5
SECS=3
WARMUP=1
SIZES="64,1518"
LAYOUTS="split,packed,packed-in-order"
DIRECTIONS="tx,rx"
DEVICE_CPU=0
DRIVER_CPU=1
OUT=""
TESTPMD="${DPDK_TESTPMD:-dpdk-testpmd}"

usage() {
    sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --reps) REPS="$2"; shift 2 ;;
        --secs) SECS="$2"; shift 2 ;;
        --warmup) WARMUP="$2"; shift 2 ;;
        --sizes) SIZES="$2"; shift 2 ;;
        --layouts) LAYOUTS="$2"; shift 2 ;;
        --directions) DIRECTIONS="$2"; shift 2 ;;
        --device-cpu) DEVICE_CPU="$2"; shift 2 ;;
        --driver-cpu) DRIVER_CPU="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --quick) REPS=1; SECS=1; WARMUP=0.5; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown option $1" >&2; usage 1 ;;
    esac
done

command -v "$TESTPMD" >/dev/null || { echo "$TESTPMD not found (apt-get install dpdk-dev)" >&2; exit 1; }
command -v stdbuf >/dev/null || { echo "stdbuf not found (coreutils)" >&2; exit 1; }

echo "== building virtq (release)" >&2
cargo build --release -q -p virtq-cli
VIRTQ="$PWD/target/release/virtq"

WORK=$(mktemp -d /tmp/virtq-net-vs-dpdk.XXXXXX)
SOCK="$WORK/vhost-net.sock"
DEV_PREFIX="virtq-cmp-dev-$$"
VU_PREFIX="virtq-cmp-vu-$$"
DEV_PID=""
DRV_PID=""
[ -n "$OUT" ] || OUT="$WORK/samples.csv"

cleanup() {
    [ -n "$DRV_PID" ] && kill -KILL "$DRV_PID" 2>/dev/null || true
    [ -n "$DEV_PID" ] && kill -KILL "$DEV_PID" 2>/dev/null || true
    [ -n "$DRV_PID" ] && wait "$DRV_PID" 2>/dev/null || true
    [ -n "$DEV_PID" ] && wait "$DEV_PID" 2>/dev/null || true
    rm -rf "/run/dpdk/$DEV_PREFIX" "/run/dpdk/$VU_PREFIX" "/var/run/dpdk/$DEV_PREFIX" "/var/run/dpdk/$VU_PREFIX"
    case "$OUT" in "$WORK"/*) cp "$OUT" "/tmp/virtq-net-vs-dpdk-samples.csv" 2>/dev/null || true ;; esac
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

count() { grep -c -- "$1" "$2" 2>/dev/null || true; }

# Waits until the file $2 holds more than $3 lines matching $1 (at most $4 seconds).
wait_count() {
    local pattern=$1 file=$2 before=$3 limit=$4 i=0
    while [ "$(count "$pattern" "$file")" -le "$before" ]; do
        i=$((i + 1))
        if [ "$i" -gt $((limit * 20)) ]; then
            echo "timed out waiting for \"$pattern\" in $file" >&2
            tail -20 "$file" >&2
            return 1
        fi
        sleep 0.05
    done
}

start_device() {
    mkfifo "$WORK/dev.cmd"
    exec 3<>"$WORK/dev.cmd"
    stdbuf -oL "$TESTPMD" --lcores "0@$DEVICE_CPU,1@$DEVICE_CPU" --no-huge -m 1024 --no-pci \
        --file-prefix="$DEV_PREFIX" --vdev "net_vhost0,iface=$SOCK,queues=1,client=0" \
        -- -i --nb-cores=1 --total-num-mbufs=32768 --burst=32 <&3 >"$WORK/dev.log" 2>&1 &
    DEV_PID=$!
    wait_count "testpmd>" "$WORK/dev.log" 0 60
}

dev_cmd() { echo "$*" >&3; }

# The device's packet rate since the previous reading: Rx-pps or Tx-pps.
device_pps() {
    local which=$1 before
    before=$(count "$which-pps" "$WORK/dev.log")
    dev_cmd "show port stats 0"
    wait_count "$which-pps" "$WORK/dev.log" "$before" 10
    grep -- "$which-pps" "$WORK/dev.log" | tail -1 | awk '{print $2}'
}

# Starts driver $1 (virtq | dpdk) for layout $2, direction $3, frame size $4, for $5 s.
start_driver() {
    local driver=$1 layout=$2 direction=$3 size=$4 secs=$5
    if [ "$driver" = virtq ]; then
        local flags
        case "$layout" in
            split) flags="--split --no-in-order" ;;
            packed) flags="--packed --no-in-order" ;;
            packed-in-order) flags="--packed" ;;
        esac
        # shellcheck disable=SC2086
        "$VIRTQ" net --socket "$SOCK" $flags --cpus "$DRIVER_CPU" bench --direction "$direction" \
            --size "$size" --burst 32 --warmup 0 --secs "$secs" --json >"$WORK/drv.out" 2>"$WORK/drv.log" &
        DRV_PID=$!
    else
        local packed in_order mode
        case "$layout" in
            split) packed=0; in_order=0 ;;
            packed) packed=1; in_order=0 ;;
            packed-in-order) packed=1; in_order=1 ;;
        esac
        if [ "$direction" = tx ]; then mode=txonly; else mode=rxonly; fi
        # Not interactive: testpmd forwards until its standard input ends, and this one
        # (a FIFO it holds open itself) never does; it is stopped with SIGINT.
        rm -rf "/run/dpdk/$VU_PREFIX"
        [ -p "$WORK/drv.in" ] || mkfifo "$WORK/drv.in"
        stdbuf -oL "$TESTPMD" --lcores "0@$DRIVER_CPU,1@$DRIVER_CPU" --no-huge -m 512 \
            --no-pci --file-prefix="$VU_PREFIX" \
            --vdev "net_virtio_user0,path=$SOCK,queues=1,queue_size=256,packed_vq=$packed,in_order=$in_order,mrg_rxbuf=1" \
            -- --nb-cores=1 --forward-mode="$mode" --txpkts="$size" --burst=32 --txd=256 --rxd=256 \
            --total-num-mbufs=16384 <>"$WORK/drv.in" >"$WORK/drv.log" 2>&1 &
        DRV_PID=$!
    fi
}

stop_driver() {
    local pid=$DRV_PID i=0
    DRV_PID=""
    [ -n "$pid" ] || return 0
    kill -INT "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do
        i=$((i + 1))
        if [ "$i" -gt 100 ]; then kill -KILL "$pid" 2>/dev/null || true; break; fi
        sleep 0.05
    done
    wait "$pid" 2>/dev/null || true
    rm -rf "/run/dpdk/$VU_PREFIX" "/var/run/dpdk/$VU_PREFIX"
}

# One measurement: the device's Mpps while driver $1 runs, in MPPS.
measure() {
    local driver=$1 layout=$2 direction=$3 size=$4 which ready closed pps
    if [ "$direction" = tx ]; then which=Rx; else which=Tx; fi
    ready=$(count "virtio is now ready" "$WORK/dev.log")
    closed=$(count "vhost peer closed" "$WORK/dev.log")
    start_driver "$driver" "$layout" "$direction" "$size" "$(awk "BEGIN{print int($WARMUP + $SECS + 3)}")"
    wait_count "virtio is now ready" "$WORK/dev.log" "$ready" 60
    sleep "$WARMUP"
    device_pps "$which" >/dev/null
    sleep "$SECS"
    pps=$(device_pps "$which")
    stop_driver
    wait_count "vhost peer closed" "$WORK/dev.log" "$closed" 20 || true
    MPPS=$(awk "BEGIN{printf \"%.3f\", $pps / 1e6}")
}

median() { sort -g | awk '{a[NR]=$1} END{if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }

echo "== device: testpmd net_vhost on CPU $DEVICE_CPU; drivers on CPU $DRIVER_CPU" >&2
start_device
echo "direction,size,layout,rep,driver,mpps" >"$OUT"
begin=$(date +%s)
results=()
IFS=, read -r -a dirs <<<"$DIRECTIONS"
IFS=, read -r -a sizes <<<"$SIZES"
IFS=, read -r -a layouts <<<"$LAYOUTS"
for direction in "${dirs[@]}"; do
    for size in "${sizes[@]}"; do
        dev_cmd "stop"
        if [ "$direction" = tx ]; then
            dev_cmd "set fwd rxonly"
        else
            dev_cmd "set fwd txonly"
            dev_cmd "set txpkts $size"
        fi
        dev_cmd "start"
        for layout in "${layouts[@]}"; do
            v=() d=()
            for rep in $(seq "$REPS"); do
                if [ $((rep % 2)) = 1 ]; then order="virtq dpdk"; else order="dpdk virtq"; fi
                for driver in $order; do
                    measure "$driver" "$layout" "$direction" "$size"
                    m=$MPPS
                    echo "$direction,$size,$layout,$rep,$driver,$m" >>"$OUT"
                    echo "   $direction $size $layout rep $rep $driver: $m Mpps" >&2
                    if [ "$driver" = virtq ]; then v+=("$m"); else d+=("$m"); fi
                done
            done
            vm=$(printf '%s\n' "${v[@]}" | median)
            dm=$(printf '%s\n' "${d[@]}" | median)
            ratio=$(awk "BEGIN{ if ($dm > 0) printf \"%.2f\", $vm / $dm; else print \"-\" }")
            results+=("$(printf '%-3s %5s  %-16s %8s %8s %7s' "$direction" "$size" "$layout" "$vm" "$dm" "$ratio")")
        done
    done
done
elapsed=$(($(date +%s) - begin))

echo
echo "virtq vs DPDK virtio-user on testpmd net_vhost: median Mpps of $REPS runs each (device's count, ${SECS} s after ${WARMUP} s), burst 32, ring 256"
printf '%-3s %5s  %-16s %8s %8s %7s\n' dir bytes layout virtq DPDK ratio
printf '%s\n' "${results[@]}"
case "$OUT" in "$WORK"/*) kept=/tmp/virtq-net-vs-dpdk-samples.csv ;; *) kept=$OUT ;; esac
echo "($elapsed s; samples in $kept)"
