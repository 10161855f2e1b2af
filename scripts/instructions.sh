#!/usr/bin/env bash
# Instructions per round trip (add, kick_prepare, pop, complete, publish, get_buf), counted
# by callgrind, which is repeatable on a noisy machine. Each figure is the difference
# between runs of 20,000 and 10,000 cycles divided by 10,000, so set-up cost cancels out.
#
#   scripts/instructions.sh            # every layout, static vs run-time dispatch, 1 segment
#   SEGMENTS="1 4 16" scripts/instructions.sh
#
# Then the same cycle with rcore's virtio-drivers as the driver and rust-vmm's virtio-queue
# as the device (examples/cycle_baseline.rs, split ring), for 1, 4 and 16 segments and for
# 4 and 16 with INDIRECT_DESC (BASELINE_SEGMENTS="1 4 16 4-indirect 16-indirect" to choose),
# next to virtq's split static figure and their ratio. "baseline" includes the device's
# needs_notification, as a virtio-queue device does after add_used; "no-notify" leaves it
# out, which is the work of virtq's cycle (its device publishes without deciding on an
# interrupt).
#
# Last, streaming (CYCLE_BATCH=32: 32 adds, one kick_prepare, 32 pops and completions, one
# publish, 32 get_bufs), per buffer and per side, with one call per buffer and with the
# burst calls (`add_inbufs`, `get_bufs`, and the device's `serve`; CYCLE_BURST=1), which
# `virtq bench` uses: the work each thread of its batch-32 cells does for a buffer,
# without cache-line transfers.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is required (apt-get install valgrind)" >&2; exit 1; }
cargo build --release -q -p virtq --example cycle --example cycle_baseline
bin=target/release/examples/cycle
baseline_bin=target/release/examples/cycle_baseline

count() { # binary args...
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$@" 2>&1 |
        sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}

per_cycle() { # layout dispatch segments [indirect]
    local a b
    a=$(count "$bin" "$1" "$2" 10000 "$3" ${4:-})
    b=$(count "$bin" "$1" "$2" 20000 "$3" ${4:-})
    echo $(( (b - a) / 10000 ))
}

baseline_per_cycle() { # segments [indirect] [no-notify]
    local a b
    a=$(count "$baseline_bin" 10000 "$@")
    b=$(count "$baseline_bin" 20000 "$@")
    echo $(( (b - a) / 10000 ))
}

ratio() { awk "BEGIN{printf \"%.3f\", $1/$2}"; }

printf '%-16s %8s %8s %8s %9s\n' layout segments static dynamic dyn/stat
for segs in ${SEGMENTS:-1}; do
    for layout in split split-in-order packed packed-in-order; do
        s=$(per_cycle "$layout" static "$segs")
        d=$(per_cycle "$layout" dynamic "$segs")
        printf '%-16s %8s %8s %8s %9s\n' "$layout" "$segs" "$s" "$d" "$(awk "BEGIN{printf \"%.3f\", $d/$s}")"
    done
done

echo
echo "baseline: virtio-drivers + virtio-queue"
printf '%-12s %9s %9s %12s %9s %9s\n' segments baseline no-notify "split static" split/base split/nn
for spec in ${BASELINE_SEGMENTS:-1 4 16 4-indirect 16-indirect}; do
    segs=${spec%-indirect}
    indirect=
    if [ "$segs" != "$spec" ]; then indirect=indirect; fi
    base=$(baseline_per_cycle "$segs" $indirect)
    nn=$(baseline_per_cycle "$segs" $indirect no-notify)
    split=$(per_cycle split static "$segs" $indirect)
    printf '%-12s %9s %9s %12s %9s %9s\n' "$spec" "$base" "$nn" "$split" "$(ratio "$split" "$base")" "$(ratio "$split" "$nn")"
done

# Instructions inside the never-inlined `device_batch` and in the whole run.
stream_counts() { # layout cycles -> "total device"
    local out
    out=$(mktemp)
    CYCLE_BATCH=32 valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" "$1" static "$2" >/dev/null 2>&1
    callgrind_annotate --inclusive=yes "$out" 2>/dev/null | awk '
        /PROGRAM TOTALS/ { gsub(",", "", $1); total = $1 }
        /=> .*device_batch/ { gsub(",", "", $1); device = $1 }
        END { print total, device }'
    rm -f "$out"
}

echo
echo "streaming, batch 32, 1 segment: instructions per buffer"
printf '%-16s %-7s %8s %8s %8s\n' layout calls driver device both
for layout in split split-in-order packed packed-in-order; do
    for calls in single burst; do
        if [ "$calls" = burst ]; then export CYCLE_BURST=1; else unset CYCLE_BURST; fi
        read -r ta da < <(stream_counts "$layout" 32000)
        read -r tb db < <(stream_counts "$layout" 64000)
        awk -v l="$layout" -v c="$calls" -v t=$((tb - ta)) -v d=$((db - da)) \
            'BEGIN { printf "%-16s %-7s %8.1f %8.1f %8.1f\n", l, c, (t - d) / 32000, d / 32000, t / 32000 }'
    done
done
unset CYCLE_BURST
