#!/usr/bin/env bash
# Verifies, on the host, the disk image a vhost-user-blk back end served to the guest
# after the guest powered off: recomputes the pattern of each region with the same
# generator and region table as the guest (scripts/guest/pattern.sh) and compares the
# checksums of the image's bytes.
#
#   scripts/guest/check-image.sh IMAGE [--test pattern|mq|all]... [--log CONSOLE_LOG]...
#
#   --test T   which test's regions to check (repeatable; default pattern; all = both)
#   --log F    also require that the checksums the guest printed (run.sh --log F) equal
#              the ones computed here (repeatable: one console log a test)
#
# Exit status: 0 every region matches, 1 a mismatch, 2 usage error.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/guest/pattern.sh
. "$HERE/pattern.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2; exit "${1:-2}"; }

IMAGE=""
TESTS=()
GUESTLOGS=()
while [ $# -gt 0 ]; do
    case $1 in
    --test) TESTS+=("${2:?}"); shift 2 ;;
    --test=*) TESTS+=("${1#*=}"); shift ;;
    --log) GUESTLOGS+=("${2:?}"); shift 2 ;;
    --log=*) GUESTLOGS+=("${1#*=}"); shift ;;
    -h | --help) usage 0 ;;
    -*) echo "check-image.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$IMAGE" ] || usage; IMAGE=$1; shift ;;
    esac
done
[ -n "$IMAGE" ] || usage
[ -f "$IMAGE" ] || { echo "check-image.sh: $IMAGE is not a file" >&2; exit 2; }
[ "${#TESTS[@]}" -gt 0 ] || TESTS=(pattern)
expanded=()
for t in "${TESTS[@]}"; do
    case $t in
    all) expanded+=(pattern mq) ;;
    pattern | mq) expanded+=("$t") ;;
    *) echo "check-image.sh: unknown test '$t'" >&2; exit 2 ;;
    esac
done
for f in ${GUESTLOGS[@]+"${GUESTLOGS[@]}"}; do
    [ -r "$f" ] || { echo "check-image.sh: cannot read $f" >&2; exit 2; }
done

# The guest generates with busybox awk; use the same implementation when it is here
# (the generator is exact in any awk, so plain awk gives the same bytes).
VIRTQ_AWK="awk"
if [ -x /bin/busybox ]; then VIRTQ_AWK="/bin/busybox awk"; fi
export VIRTQ_AWK

size=$(stat -c %s "$IMAGE")
[ $((size % 512)) -eq 0 ] || { echo "check-image.sh: $IMAGE size $size is not a multiple of 512" >&2; exit 2; }
[ "$size" -ge "$VIRTQ_MIN_DISK_BYTES" ] || { echo "check-image.sh: $IMAGE is smaller than $VIRTQ_MIN_DISK_BYTES bytes" >&2; exit 2; }
sectors=$((size / 512))

bad=0
n=0
for t in "${expanded[@]}"; do
    while read -r name off len seed; do
        exp=$(virtq_gen "$seed" "$len" | sha256sum | cut -d' ' -f1)
        bs=$(virtq_bs "$off" "$len")
        got=$(dd if="$IMAGE" bs="$bs" skip=$((off / bs)) count=$((len / bs)) status=none | sha256sum | cut -d' ' -f1)
        line="region test=$t name=$name off=$off len=$len seed=$seed sha256=$exp"
        n=$((n + 1))
        if [ "$exp" != "$got" ]; then
            echo "CHECK $line FAIL image=$got"
            bad=$((bad + 1))
            continue
        fi
        if [ "${#GUESTLOGS[@]}" -gt 0 ]; then
            guest=$(cat "${GUESTLOGS[@]}" | tr -d '\r' | sed -n "s/^VIRTQ-RESULT region test=$t name=$name off=$off len=$len .*sha256=\([0-9a-f]*\).*/\1/p" | sed -n 1p)
            if [ "$guest" != "$exp" ]; then
                echo "CHECK $line FAIL guest-printed=${guest:-none}"
                bad=$((bad + 1))
                continue
            fi
        fi
        echo "CHECK $line ok"
    done < <(virtq_regions "$t" "$sectors")
done

if [ "$bad" -ne 0 ]; then
    echo "check-image.sh: FAIL: $bad of $n region(s) differ in $IMAGE"
    exit 1
fi
echo "check-image.sh: PASS: $n region(s) match in $IMAGE"
