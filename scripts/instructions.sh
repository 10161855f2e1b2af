#!/usr/bin/env bash
# Instructions per round trip (add, kick_prepare, pop, complete, publish, get_buf), counted
# by callgrind, which is repeatable on a noisy machine. Each figure is the difference
# between runs of 20,000 and 10,000 cycles divided by 10,000, so set-up cost cancels out.
#
#   scripts/instructions.sh            # every layout, static vs run-time dispatch, 1 segment
#   SEGMENTS="1 4 16" scripts/instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is required (apt-get install valgrind)" >&2; exit 1; }
cargo build --release -q -p virtq --example cycle
bin=target/release/examples/cycle

count() { # layout dispatch cycles segments [indirect]
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$@" 2>&1 |
        sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}

per_cycle() {
    local a b
    a=$(count "$1" "$2" 10000 "$3" ${4:-})
    b=$(count "$1" "$2" 20000 "$3" ${4:-})
    echo $(( (b - a) / 10000 ))
}

printf '%-16s %8s %8s %8s %9s\n' layout segments static dynamic dyn/stat
for segs in ${SEGMENTS:-1}; do
    for layout in split split-in-order packed packed-in-order; do
        s=$(per_cycle "$layout" static "$segs")
        d=$(per_cycle "$layout" dynamic "$segs")
        printf '%-16s %8s %8s %8s %9s\n' "$layout" "$segs" "$s" "$d" "$(awk "BEGIN{printf \"%.3f\", $d/$s}")"
    done
done
