# shellcheck shell=sh
# Deterministic test pattern and region table shared by the guest (/init, busybox ash,
# copied into the initramfs as /lib/virtq/pattern.sh) and the host (check-image.sh).
# Both sides source this one file, so the offsets, sizes and bytes cannot drift apart.
#
# Plain POSIX sh: no bashisms (busybox ash runs it in the guest).

# The smallest disk the region table fits on: the mq regions end at 32 MiB and the
# pattern test also writes the last sector.
# shellcheck disable=SC2034 # used by the scripts that source this file
VIRTQ_MIN_DISK_BYTES=67108864

# virtq_regions TEST DISK_SECTORS
# Prints one region a line: NAME OFFSET_BYTES LENGTH_BYTES SEED.
# The regions of the two tests are disjoint, so one image can carry both.
virtq_regions() {
    case $1 in
    pattern)
        echo "p0 0 4096 11"                               # 4 KiB at 0
        echo "p1 1048576 65536 12"                        # 64 KiB at 1 MiB
        echo "p2 8388608 1048576 13"                      # 1 MiB at 8 MiB
        echo "p3 $((($2 - 1) * 512)) 512 14"              # 512 B at the last sector
        ;;
    mq)
        # Four concurrent writers, 4 MiB each, at 16, 20, 24 and 28 MiB.
        for i in 0 1 2 3; do
            echo "m$i $((16777216 + i * 4194304)) 4194304 $((21 + i))"
        done
        ;;
    *)
        echo "virtq_regions: unknown test '$1'" >&2
        return 1
        ;;
    esac
}

# virtq_gen SEED LENGTH
# Writes exactly LENGTH bytes of the pattern for SEED to stdout, 512-byte sector by sector:
#
#   "%08x %010d " seed and sector index within the region (20 bytes), then 491 characters
#   of a 4608-character pseudo-random hex pool starting at a pseudo-random offset, then
#   a newline
#
# The pseudo-random numbers come from the Park-Miller generator x' = 16807 x mod (2^31-1).
# Every product is below 2^53, so any awk (busybox, mawk, gawk) computes it exactly with
# doubles and prints the same bytes. The stamp makes every sector of every region distinct,
# so misplaced, stale or zeroed sectors change the checksum, and `head -c 20` of a sector
# in the image tells which region and sector landed there. One awk step per sector keeps
# it fast enough under TCG (16 MiB in a few seconds).
virtq_gen() {
    ${VIRTQ_AWK:-awk} -v s="$1" -v n="$2" 'BEGIN {
        x = s
        for (k = 0; k < 3; k++) x = (x * 16807) % 2147483647
        pool = ""
        for (k = 0; k < 576; k++) {
            x = (x * 16807) % 2147483647
            pool = pool sprintf("%08x", x)
        }
        for (i = 0; i < n; i += 512) {
            x = (x * 16807) % 2147483647
            sec = sprintf("%08x %010d ", s, i / 512) substr(pool, 1 + x % 4096, 491) "\n"
            if (n - i >= 512) printf "%s", sec
            else printf "%s", substr(sec, 1, n - i)
        }
    }'
}

# virtq_bs OFFSET LENGTH
# The largest power of two from 512 B to 1 MiB that divides both, for dd bs=.
virtq_bs() {
    _bs=1048576
    while [ "$_bs" -gt 512 ] && { [ $(($1 % _bs)) -ne 0 ] || [ $(($2 % _bs)) -ne 0 ]; }; do
        _bs=$((_bs / 2))
    done
    echo "$_bs"
}
