#!/usr/bin/env bash
# Benchmarks `virtq serve-net --loopback` against DPDK's own vhost-user net device
# (`net_vhost` in testpmd, forwarding io back to the same port), with DPDK's virtio-user
# PMD (`net_virtio_user` in a second testpmd) as the common driver. The driver forwards
# io on its one port after `start tx_first`, so frames circulate driver -> device ->
# driver; its receive rate (Rx-pps over a measured interval) is the figure of a run.
#
#   scripts/serve-net-vs-dpdk.sh [--reps N] [--sizes 64,1518] [--burst 32]
#                                [--layouts split,packed,packed-in-order]
#                                [--warmup S] [--measure S] [--poll-us US] [--virtq PATH]
#
#   --reps N        runs of each device per cell, alternating virtq, DPDK, virtq, ...
#                   (default 5)
#   --sizes LIST    frame sizes in bytes (default 64,1518)
#   --burst N       testpmd burst size on both sides (default 32)
#   --layouts LIST  split, split-in-order, packed, packed-in-order (default
#                   split,packed,packed-in-order)
#   --warmup S      seconds between start and the first reading (default 2)
#   --measure S     seconds between the two readings (default 3)
#   --poll-us US    serve-net's busy-polling window (default 1000000: it polls, like
#                   testpmd's lcore)
#   --virtq PATH    the virtq binary (default: cargo build --release -p virtq-cli)
#
# Each device gets CPU 0 (serve-net's threads; net_vhost's testpmd main and forwarding
# lcores), the driver CPU 1 (main and forwarding lcores). Rings of 1024 entries,
# mergeable receive buffers on, frames in flight: tx_first 32 bursts. Every testpmd has
# its own --file-prefix (removed afterwards) and runs without huge pages.
#
# Prints a line per run, then per cell the median Mpps of each device and the ratio of
# the medians (virtq / DPDK). On a machine shared with other work the figures move from
# run to run: that is why the runs alternate; compare ratios, not absolute numbers.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2; exit "${1:-2}"; }
die() { echo "serve-net-vs-dpdk: error: $*" >&2; exit 2; }

REPS=5
SIZES=64,1518
BURST=32
LAYOUTS=split,packed,packed-in-order
WARMUP=2
MEASURE=3
POLL_US=1000000
VIRTQ=${VIRTQ_BIN:-}
while [ $# -gt 0 ]; do
    case $1 in
    --reps) REPS=${2:?}; shift 2 ;;
    --sizes) SIZES=${2:?}; shift 2 ;;
    --burst) BURST=${2:?}; shift 2 ;;
    --layouts) LAYOUTS=${2:?}; shift 2 ;;
    --warmup) WARMUP=${2:?}; shift 2 ;;
    --measure) MEASURE=${2:?}; shift 2 ;;
    --poll-us) POLL_US=${2:?}; shift 2 ;;
    --virtq) VIRTQ=${2:?}; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "serve-net-vs-dpdk: unknown argument $1" >&2; usage ;;
    esac
done
command -v dpdk-testpmd >/dev/null || die "dpdk-testpmd is missing (apt-get install dpdk-dev)"
command -v taskset >/dev/null || die "taskset is missing (util-linux)"
[ "$(nproc)" -ge 2 ] || die "needs two CPUs (one for the device, one for the driver)"
if [ -z "$VIRTQ" ]; then
    (cd "$ROOT" && cargo build -q --release -p virtq-cli)
    VIRTQ=$ROOT/target/release/virtq
fi
[ -x "$VIRTQ" ] || die "$VIRTQ is not an executable"

DIR=$(mktemp -d "${TMPDIR:-/tmp}/virtq-netbench.XXXXXX")
PREFIX=vqbench$$
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$DIR" /run/dpdk/"$PREFIX"-*
}
trap cleanup EXIT

EAL=(--no-huge -m 1024 --no-pci --log-level=lib.eal:error)

wait_socket() {
    local i=0
    until [ -S "$1" ]; do
        i=$((i + 1))
        [ "$i" -le 200 ] || return 1
        sleep 0.05
    done
}

# wait_prompt LOG PID: waits until testpmd's prompt is in LOG (false if PID exits or 120 s
# pass).
wait_prompt() {
    local i=0
    until grep -aq 'testpmd> ' "$1"; do
        kill -0 "$2" 2>/dev/null || return 1
        i=$((i + 1))
        [ "$i" -le 1200 ] || return 1
        sleep 0.1
    done
}

# run_once DEVICE LAYOUT SIZE N: one measurement; prints the driver's Mpps.
run_once() {
    local device=$1 layout=$2 size=$3 n=$4 sock=$DIR/net-$n.sock packed=0 in_order=0 dev_pid fifo
    case $layout in
    split) ;;
    split-in-order) in_order=1 ;;
    packed) packed=1 ;;
    packed-in-order) packed=1; in_order=1 ;;
    *) die "unknown layout $layout" ;;
    esac
    if [ "$device" = virtq ]; then
        taskset -c 0 "$VIRTQ" serve-net --socket "$sock" --loopback --once --poll-us "$POLL_US" \
            >"$DIR/dev-$n.log" 2>&1 &
        dev_pid=$!
    else
        fifo=$DIR/dev-$n.in
        mkfifo "$fifo"
        stdbuf -oL dpdk-testpmd --lcores '0@0,1@0' "${EAL[@]}" --file-prefix="$PREFIX-d$n" \
            --vdev "net_vhost0,iface=$sock,queues=1,client=0" -- -i --nb-cores=1 \
            --txd=1024 --rxd=1024 --burst="$BURST" <"$fifo" >"$DIR/dev-$n.log" 2>&1 &
        dev_pid=$!
        exec 7<>"$fifo"
        wait_prompt "$DIR/dev-$n.log" "$dev_pid" || { tail -n 20 "$DIR/dev-$n.log" >&2; die "net_vhost's testpmd did not start"; }
        printf 'set fwd io\nstart\n' >&7
    fi
    PIDS+=("$dev_pid")
    wait_socket "$sock" || { cat "$DIR/dev-$n.log" >&2; die "$device did not listen on $sock"; }
    local drv_fifo=$DIR/drv-$n.in drv_pid
    mkfifo "$drv_fifo"
    dpdk-testpmd --lcores '0@1,1@1' "${EAL[@]}" --file-prefix="$PREFIX-v$n" \
        --vdev "net_virtio_user0,path=$sock,queues=1,queue_size=1024,packed_vq=$packed,in_order=$in_order,mrg_rxbuf=1" \
        -- -i --nb-cores=1 --txd=1024 --rxd=1024 <"$drv_fifo" >"$DIR/drv-$n.log" 2>&1 &
    drv_pid=$!
    exec 8<>"$drv_fifo"
    # Commands only once the prompt is up: EAL can take seconds on a busy machine.
    wait_prompt "$DIR/drv-$n.log" "$drv_pid" || { tail -n 20 "$DIR/drv-$n.log" >&2; die "the driver did not start"; }
    printf 'set fwd io\nset burst %s\nset txpkts %s\nstart tx_first 32\n' "$BURST" "$size" >&8
    sleep "$WARMUP"
    printf 'show port stats 0\n' >&8
    sleep "$MEASURE"
    printf 'show port stats 0\nstop\nquit\n' >&8
    local i=0
    while kill -0 "$drv_pid" 2>/dev/null && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    kill "$drv_pid" 2>/dev/null || true
    wait "$drv_pid" 2>/dev/null || true
    exec 8>&-
    if [ "$device" = dpdk ]; then
        printf 'stop\nquit\n' >&7 || true
        exec 7>&-
    fi
    i=0
    while kill -0 "$dev_pid" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    kill "$dev_pid" 2>/dev/null || true
    wait "$dev_pid" 2>/dev/null || true
    rm -rf /run/dpdk/"$PREFIX-d$n" /run/dpdk/"$PREFIX-v$n" "$sock"
    # The second reading's Rx-pps covers the measured interval.
    local pps
    pps=$(grep -a 'Rx-pps:' "$DIR/drv-$n.log" | sed -n 2p | awk '{ print $2 }')
    [ -n "$pps" ] || { tail -n 20 "$DIR/drv-$n.log" >&2; die "no Rx-pps from the driver ($device $layout $size)"; }
    awk -v p="$pps" 'BEGIN { printf "%.3f", p / 1e6 }'
}

median() { sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

echo "# serve-net --loopback vs DPDK net_vhost, driver DPDK net_virtio_user; burst $BURST, $REPS runs each, alternating"
echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(uname -r) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
n=0
declare -A RES=()
IFS=, read -r -a layouts <<<"$LAYOUTS"
IFS=, read -r -a sizes <<<"$SIZES"
for layout in "${layouts[@]}"; do
    for size in "${sizes[@]}"; do
        for rep in $(seq 1 "$REPS"); do
            for device in virtq dpdk; do
                n=$((n + 1))
                mpps=$(run_once "$device" "$layout" "$size" "$n")
                echo "run $layout size=$size rep=$rep $device ${mpps} Mpps"
                RES[$layout/$size/$device]+="$mpps "
            done
        done
    done
done

echo
printf '%-16s %6s %14s %14s %8s\n' layout bytes "serve-net Mpps" "net_vhost Mpps" ratio
for layout in "${layouts[@]}"; do
    for size in "${sizes[@]}"; do
        a=$(printf '%s\n' ${RES[$layout/$size/virtq]} | median)
        b=$(printf '%s\n' ${RES[$layout/$size/dpdk]} | median)
        r=$(awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
        printf '%-16s %6s %14s %14s %8s\n' "$layout" "$size" "$a" "$b" "$r"
    done
done
