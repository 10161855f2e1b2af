#!/bin/sh
# /init of the test guest (busybox ash; setup.sh copies it into the initramfs).
#
# Loads the virtio modules, runs the test named on the kernel command line
# (virtq.test=pattern|mq: a vhost-user-blk-pci disk at /dev/vda; virtq.test=netrng: a
# virtio-net and a virtio-rng device) and prints machine-readable lines on the serial
# console, then powers off. The disk tests print:
#
#   VIRTQ-RESULT start test=<t>
#   VIRTQ-RESULT kernel=<uname -r>
#   VIRTQ-RESULT features=<64 chars of 0/1 from sysfs; char i is feature bit i>
#   VIRTQ-RESULT packed=0|1 event_idx=0|1 indirect=0|1 in_order=0|1 version_1=0|1 blk_mq=0|1
#   VIRTQ-RESULT disk sectors=<512-byte sectors> hw_queues=<blk-mq queues> cpus=<n>
#   VIRTQ-RESULT time generate|write|read+verify=<guest seconds>s
#   VIRTQ-RESULT region test=<t> name=<n> off=<bytes> len=<bytes> seed=<s> bs=<dd bs> sha256=<expected> ok|FAIL got=<sha>
#   VIRTQ-RESULT mq queues_used=<request virtqueues that took interrupts> hw_queues=<n> cpus=<n>
#   VIRTQ-RESULT irq <name>=<count>        (per virtqueue interrupt counts, after the test)
#   VIRTQ-RESULT time total=<s>s ...
#   VIRTQ-RESULT ok | VIRTQ-RESULT fail <why>
#   VIRTQ-RESULT end                       (just before poweroff -f)
#
# virtq.test=netrng (see test-net-rng.sh, which plays the peer in a network namespace;
# virtq.addr=<ip/len> virtq.peer=<ip> virtq.mb=<MiB each way> virtq.rng=<bytes>):
#
#   VIRTQ-RESULT device <net|rng> features=<64 chars of 0/1>
#   VIRTQ-RESULT rng current=<hwrng> bytes=<n> sha256=<sum> time=<s>s
#   VIRTQ-RESULT net up <ifname> <addr>    (the host pings the guest then)
#   VIRTQ-RESULT net ping ok               (the guest pinged the peer)
#   VIRTQ-RESULT net rx bytes=<n> sha256=<sum> time=<s>s   (downloaded from the peer)
#   VIRTQ-RESULT net tx-ready bytes=<n> sha256=<sum>       (served to the peer; the guest
#                                                           waits for the peer's tx-done)
#   VIRTQ-RESULT net tx-done time=<s>s
#
# The region table and the pattern generator come from /lib/virtq/pattern.sh, the same
# file check-image.sh sources on the host.
set -eu
# busybox ash has pipefail (POSIX sh before 2024 does not).
# shellcheck disable=SC3040
set -o pipefail
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
dmesg -n 1 || true # keep kernel messages off the console while the test prints

# shellcheck source=scripts/guest/pattern.sh
. /lib/virtq/pattern.sh

R() { echo "VIRTQ-RESULT $*"; }
# Guest seconds since boot (TCG guest time runs close to wall time).
now() { cut -d' ' -f1 /proc/uptime; }
T0=$(now)
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

finish() {
    sync
    if [ -b /dev/vda ]; then blockdev --flushbufs /dev/vda 2>/dev/null || true; fi
    R "end"
    poweroff -f
    sleep 60
}

fail() {
    R "fail $*"
    finish
}

# Any unexpected error (set -e) ends here rather than in a kernel panic.
on_exit() {
    _rc=$?
    if [ "$_rc" -ne 0 ]; then R "fail init exited with status $_rc"; finish; fi
}
trap on_exit EXIT

cmdline_arg() {
    # shellcheck disable=SC2013 # words, not lines
    for a in $(cat /proc/cmdline); do
        case $a in "$1"=*) echo "${a#*=}"; return 0 ;; esac
    done
    return 0
}

TEST=$(cmdline_arg virtq.test)
TEST=${TEST:-pattern}
R "start test=$TEST"
R "kernel=$(uname -r)"

while read -r m; do
    insmod "/lib/virtq/modules/$m.ko" || fail "insmod $m"
done </lib/virtq/modules.order

# The disk tests' device: /dev/vda, its features and size.
blk_setup() {
    i=0
    while [ ! -b /dev/vda ]; do
        i=$((i + 1))
        [ "$i" -le 300 ] || fail "no /dev/vda after 30 s"
        sleep 0.1
    done

    FEATURES=$(cat /sys/block/vda/device/features)
    [ "${#FEATURES}" -ge 36 ] || fail "unexpected features string '$FEATURES'"
    bit() { echo "$FEATURES" | cut -c "$(($1 + 1))"; }
    R "features=$FEATURES"
    R "packed=$(bit 34) event_idx=$(bit 29) indirect=$(bit 28) in_order=$(bit 35) version_1=$(bit 32) blk_mq=$(bit 12)"

    SECTORS=$(cat /sys/block/vda/size)
    HWQ=$(find /sys/block/vda/mq -mindepth 1 -maxdepth 1 | wc -l)
    NCPU=$(nproc)
    R "disk sectors=$SECTORS hw_queues=$HWQ cpus=$NCPU"
    [ $((SECTORS * 512)) -ge "$VIRTQ_MIN_DISK_BYTES" ] || fail "disk is $((SECTORS * 512)) bytes, the regions need $VIRTQ_MIN_DISK_BYTES"
}

irqs() {
    # "virtio0-req.0" and so on: one MSI-X vector a virtqueue. Prints NAME=COUNT (all CPUs).
    awk '/virtio[0-9]+-/ { n = 0; for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) n += $i; else break; print $NF "=" n }' /proc/interrupts
}

# region_prepare NAME OFF LEN SEED: generates /tmp/NAME.bin and its checksum /tmp/NAME.exp.
# region_write NAME OFF LEN: writes /tmp/NAME.bin with O_DIRECT.
# region_read NAME OFF LEN: reads the region back with O_DIRECT, checksum in /tmp/NAME.got.
region_prepare() {
    virtq_gen "$4" "$3" >"/tmp/$1.bin"
    sha256sum <"/tmp/$1.bin" | cut -d' ' -f1 >"/tmp/$1.exp"
}
region_write() {
    _bs=$(virtq_bs "$2" "$3")
    dd if="/tmp/$1.bin" of=/dev/vda bs="$_bs" seek=$(($2 / _bs)) count=$(($3 / _bs)) oflag=direct conv=notrunc 2>"/tmp/$1.wlog" \
        || { cat "/tmp/$1.wlog"; return 1; }
}
region_read() {
    _bs=$(virtq_bs "$2" "$3")
    dd if=/dev/vda bs="$_bs" skip=$(($2 / _bs)) count=$(($3 / _bs)) iflag=direct 2>"/tmp/$1.rlog" | sha256sum | cut -d' ' -f1 >"/tmp/$1.got" \
        || { cat "/tmp/$1.rlog"; return 1; }
}
# region_check TEST NAME OFF LEN SEED BS: prints the region line; returns 1 on mismatch.
region_check() {
    _exp=$(cat "/tmp/$2.exp")
    _got=$(cat "/tmp/$2.got")
    _line="region test=$1 name=$2 off=$3 len=$4 seed=$5 bs=$6 sha256=$_exp"
    if [ "$_exp" = "$_got" ]; then
        R "$_line ok"
    else
        R "$_line FAIL got=$_got"
        return 1
    fi
}

test_pattern() {
    bad=0
    virtq_regions pattern "$SECTORS" >/tmp/regions
    t=$(now)
    while read -r name off len seed; do
        region_prepare "$name" "$off" "$len" "$seed"
    done </tmp/regions
    R "time generate=$(elapsed "$t")s"
    t=$(now)
    while read -r name off len seed; do
        region_write "$name" "$off" "$len" || fail "write $name (O_DIRECT, off=$off len=$len)"
    done </tmp/regions
    R "time write=$(elapsed "$t")s"
    t=$(now)
    while read -r name off len seed; do
        region_read "$name" "$off" "$len" || fail "read $name (O_DIRECT, off=$off len=$len)"
        region_check pattern "$name" "$off" "$len" "$seed" "$(virtq_bs "$off" "$len")" || bad=$((bad + 1))
    done </tmp/regions
    R "time read+verify=$(elapsed "$t")s"
    [ "$bad" -eq 0 ] || fail "$bad pattern region(s) read back wrong"
}

test_mq() {
    bad=0
    virtq_regions mq "$SECTORS" >/tmp/regions
    t=$(now)
    k=0
    pids=""
    while read -r name off len seed; do
        # One generator a CPU (taskset needs a program, hence sh -c).
        # shellcheck disable=SC2016 # expanded by the inner sh
        taskset -c $((k % NCPU)) sh -c '. /lib/virtq/pattern.sh; virtq_gen "$1" "$2" >"/tmp/$3.bin"; sha256sum <"/tmp/$3.bin" | cut -d" " -f1 >"/tmp/$3.exp"' \
            gen "$seed" "$len" "$name" &
        pids="$pids $!"
        k=$((k + 1))
    done </tmp/regions
    for p in $pids; do
        wait "$p" || bad=$((bad + 1))
    done
    [ "$bad" -eq 0 ] || fail "generating the mq patterns failed"
    R "time generate=$(elapsed "$t")s"
    t=$(now)
    # Pin writer k to CPU k mod NCPU: blk-mq maps each CPU to its own hardware queue
    # (virtqueue), so with 2 CPUs and >= 2 queues both virtqueues carry writes at once.
    # bs=64 KiB gives 64 requests a writer.
    before=$(irqs | tr '\n' ' ')
    k=0
    pids=""
    while read -r name off len seed; do
        (
            seek=$((off / 65536))
            taskset -c $((k % NCPU)) dd if="/tmp/$name.bin" of=/dev/vda bs=65536 seek="$seek" count=$((len / 65536)) \
                oflag=direct conv=notrunc 2>"/tmp/$name.wlog"
        ) &
        pids="$pids $!"
        k=$((k + 1))
    done </tmp/regions
    for p in $pids; do
        wait "$p" || bad=$((bad + 1))
    done
    [ "$bad" -eq 0 ] || { cat /tmp/m*.wlog; fail "$bad concurrent writer(s) failed"; }
    R "time write=$(elapsed "$t")s"
    t=$(now)
    # Read back concurrently too, each reader on its own CPU.
    k=0
    pids=""
    while read -r name off len seed; do
        (
            taskset -c $((k % NCPU)) dd if=/dev/vda bs=65536 skip=$((off / 65536)) count=$((len / 65536)) iflag=direct 2>"/tmp/$name.rlog" \
                | sha256sum | cut -d' ' -f1 >"/tmp/$name.got"
        ) &
        pids="$pids $!"
        k=$((k + 1))
    done </tmp/regions
    for p in $pids; do
        wait "$p" || bad=$((bad + 1))
    done
    [ "$bad" -eq 0 ] || { cat /tmp/m*.rlog; fail "$bad concurrent reader(s) failed"; }
    while read -r name off len seed; do
        region_check mq "$name" "$off" "$len" "$seed" 65536 || bad=$((bad + 1))
    done </tmp/regions
    R "time read+verify=$(elapsed "$t")s"
    [ "$bad" -eq 0 ] || fail "$bad mq region(s) read back wrong"
    # How many request virtqueues took interrupts during the test.
    used=0
    for kv in $(irqs); do
        case $kv in
        *-req.*)
            n0=0
            for b in $before; do
                if [ "${b%%=*}" = "${kv%%=*}" ]; then n0=${b#*=}; fi
            done
            if [ "${kv#*=}" -gt "$n0" ]; then used=$((used + 1)); fi
            ;;
        esac
    done
    want=$HWQ
    if [ "$NCPU" -lt "$want" ]; then want=$NCPU; fi
    R "mq queues_used=$used hw_queues=$HWQ cpus=$NCPU"
    [ "$used" -ge "$want" ] || fail "only $used of $want request virtqueues carried I/O"
}

# The virtio device of type $1 (0x0001 net, 0x0004 rng) in sysfs, waiting up to 30 s.
virtio_dev() {
    i=0
    while :; do
        for d in /sys/bus/virtio/devices/*; do
            [ "$(cat "$d/device" 2>/dev/null)" = "$1" ] && { echo "$d"; return 0; }
        done
        i=$((i + 1))
        [ "$i" -le 300 ] || return 1
        sleep 0.1
    done
}

test_netrng() {
    ADDR=$(cmdline_arg virtq.addr)
    PEER=$(cmdline_arg virtq.peer)
    MB=$(cmdline_arg virtq.mb)
    RNG_BYTES=$(cmdline_arg virtq.rng)
    [ -n "$ADDR" ] && [ -n "$PEER" ] && [ -n "$MB" ] && [ -n "$RNG_BYTES" ] || fail "virtq.addr, virtq.peer, virtq.mb and virtq.rng are needed"

    rng=$(virtio_dev 0x0004) || fail "no virtio-rng device after 30 s"
    R "device rng features=$(cat "$rng/features")"
    net=$(virtio_dev 0x0001) || fail "no virtio-net device after 30 s"
    R "device net features=$(cat "$net/features")"

    # Entropy: the bytes must arrive, and they must not be zeroes.
    i=0
    while [ ! -c /dev/hwrng ] || [ "$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)" = none ]; do
        i=$((i + 1))
        [ "$i" -le 100 ] || fail "no /dev/hwrng with a current rng after 10 s"
        sleep 0.1
    done
    current=$(cat /sys/class/misc/hw_random/rng_current)
    t=$(now)
    head -c "$RNG_BYTES" /dev/hwrng >/tmp/rng.bin || fail "reading /dev/hwrng"
    n=$(wc -c </tmp/rng.bin)
    sum=$(sha256sum </tmp/rng.bin | cut -d' ' -f1)
    zero=$(head -c "$RNG_BYTES" /dev/zero | sha256sum | cut -d' ' -f1)
    R "rng current=$current bytes=$n sha256=$sum time=$(elapsed "$t")s"
    case $current in virtio_rng*) ;; *) fail "the current hwrng is $current, not virtio_rng" ;; esac
    [ "$n" -eq "$RNG_BYTES" ] || fail "read $n of $RNG_BYTES bytes from /dev/hwrng"
    [ "$sum" != "$zero" ] || fail "/dev/hwrng gave zeroes"
    rm -f /tmp/rng.bin

    ifname=$(ls "$net/net" | sed -n 1p)
    [ -n "$ifname" ] || fail "the virtio-net device has no interface"
    ip link set lo up
    ip addr add "$ADDR" dev "$ifname"
    ip link set "$ifname" up
    R "net up $ifname $ADDR"
    ping -c 3 -W 5 "$PEER" >/tmp/ping.log 2>&1 || { cat /tmp/ping.log; fail "ping $PEER"; }
    R "net ping ok"

    t=$(now)
    sum=$(wget -q -O - "http://$PEER:8080/rx.bin" | sha256sum | cut -d' ' -f1) || fail "downloading rx.bin from $PEER"
    R "net rx bytes=$((MB * 1048576)) sha256=$sum time=$(elapsed "$t")s"

    mkdir -p /tmp/www
    head -c $((MB * 1048576)) /dev/urandom >/tmp/www/tx.bin
    sum=$(sha256sum </tmp/www/tx.bin | cut -d' ' -f1)
    httpd -p 8080 -h /tmp/www || fail "httpd"
    t=$(now)
    R "net tx-ready bytes=$((MB * 1048576)) sha256=$sum"
    i=0
    until wget -q -O /dev/null "http://$PEER:8080/tx-done" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -le 600 ] || fail "the peer did not fetch tx.bin within 300 s"
        sleep 0.5
    done
    R "net tx-done time=$(elapsed "$t")s"
    rm -f /tmp/www/tx.bin
}

case $TEST in
pattern) blk_setup; test_pattern ;;
mq) blk_setup; test_mq ;;
netrng) test_netrng ;;
*) fail "unknown test '$TEST' (virtq.test=pattern|mq|netrng)" ;;
esac

for kv in $(irqs); do R "irq $kv"; done
R "time total=$(elapsed "$T0")s (since /init started; uptime $(now)s)"
R "ok"
trap - EXIT
finish
