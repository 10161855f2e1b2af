#!/usr/bin/env python3
"""Looks for store-forwarding stalls in the hot loops of virtq/examples/cycle.rs and of
`virtq bench --ringtest`'s single-thread phase (add, pop, complete, publish, get_buf a
ring at a time, through the bench's own generic code).

A load that reads bytes a recent store wrote can take them from the store buffer only if
the load lies entirely inside that one store. The compiler sometimes reads a `u16` field
with a 32-bit load (to avoid a partial-register write) right after a 16-bit store to it:
that load waits until the store reaches the cache, on every operation. Two such stalls
(packed ring positions, the split used index) cost the packed device half its speed.

Method: callgrind counts how often each instruction runs in a streaming run
(`CYCLE_BATCH=32`); instructions run at least once per buffer are "hot". Among them, in the
same function, the script pairs each store with each load through the same address
registers whose byte range overlaps the store's without lying inside it. The pairing is by
register name, so a report is a lead to read in the disassembly, not a proof, and an array
element stored and loaded through different index registers escapes it (the packed
device's held-back used flags were found by reading the disassembly). Stack slots are
reused for unrelated values, so a pair through %rsp counts only when the load follows
the store closely in the code: a value built piecewise on the stack and read back whole,
as a one-descriptor chain once was in every `pop` of the ringtest (3.7 ns a chain).

    scripts/store-forwarding.py              # all four layouts, both programs
    scripts/store-forwarding.py packed       # one layout of the cycle example, and the ringtest

Needs valgrind and objdump (binutils). Prints the suspicious pairs; exits 1 if any.
"""

import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target/release/examples/cycle"
CLI = ROOT / "target/release/virtq"
BUFFERS = 64000
# The ringtest's single-thread phase runs `laps` rings of 256 (see `ringtest::run`).
RINGTEST_CYCLES = 1_000_000
RINGTEST_PER_LAYOUT = (RINGTEST_CYCLES // 256 // 8 + 1) * 256
# A stack store and a load of the same slot this close in the code are one value's.
STACK_PAIR_BYTES = 256
LAYOUTS = ["split", "split-in-order", "packed", "packed-in-order"]
SUFFIX_WIDTH = {"b": 1, "w": 2, "l": 4, "q": 8}


def instruction_counts(command, env=None, collect=None, check=True):
    """Executions of each instruction address when `command` runs (in the functions
    matching `collect` only, if given)."""
    with tempfile.NamedTemporaryFile(suffix=".callgrind") as out:
        toggle = [f"--toggle-collect={collect}"] if collect else []
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--dump-instr=yes", "--dump-line=no",
             f"--callgrind-out-file={out.name}", *toggle, *command],
            env={"PATH": "/usr/bin:/bin", **(env or {})},
            check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        counts, addr, after_call = Counter(), 0, False
        for line in Path(out.name).read_text().splitlines():
            if line.startswith("calls="):
                after_call = True  # the next cost line is the call's inclusive cost
                continue
            m = re.match(r"^(0x[0-9a-f]+|[+-]\d+|\*)\s+(\d+)", line)
            if not m:
                continue
            pos, cost = m.group(1), int(m.group(2))
            if pos.startswith("0x"):
                addr = int(pos, 16)
            elif pos[0] in "+-":
                addr += int(pos)
            if after_call:
                after_call = False
            else:
                counts[addr] += cost
        return counts


def register_width(reg):
    reg = reg.lstrip("%")
    if re.fullmatch(r"r\d+|r[a-ds][xip]|r[sb]p|rdi|rsi", reg):
        return 8
    if re.fullmatch(r"r\d+d|e\w+", reg):
        return 4
    if re.fullmatch(r"r\d+w|[a-d]x|[sd]i|[sb]p", reg):
        return 2
    if re.fullmatch(r"r\d+b|[a-d]l|[sd]il|[sb]pl", reg):
        return 1
    return None


def memory_accesses(binary, hot):
    """(is_store, function, address registers, offset, width, text, address) of hot
    instructions with a memory operand offset(%base) or offset(%base,%index,scale)."""
    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(binary)],
                          check=True, capture_output=True, text=True).stdout
    function, accesses = "", []
    for line in dump.splitlines():
        if line.endswith(">:"):
            function = line
            continue
        m = re.match(r"\s*([0-9a-f]+):\s+(\w+)\s+(.*)$", line)
        if not m or int(m.group(1), 16) not in hot:
            continue
        op, args = m.group(2), m.group(3).split("#")[0].strip()
        mem = re.search(r"(-?0x[0-9a-f]+)?\((%r\w+(?:,%r\w+,\d)?)\)", args)
        if not mem or op.startswith(("lea", "nop", "cmp", "test", "prefetch")):
            continue
        operands = [a.strip() for a in re.split(r",(?![^(]*\))", args)]
        if len(operands) != 2 or mem.group(2).startswith("%rip"):
            continue
        src, dst = operands
        other = dst if "(" in src else src
        if op.startswith(("movz", "movs")) and op[4] in "bw":
            width = {"b": 1, "w": 2}[op[4]]
        elif other.startswith("%"):
            width = register_width(other)
        elif op[-1] in SUFFIX_WIDTH:
            width = SUFFIX_WIDTH[op[-1]]
        else:
            width = None
        if width:
            offset = int(mem.group(1), 16) if mem.group(1) else 0
            address = int(m.group(1), 16)
            accesses.append(("(" in dst, function, mem.group(2), offset, width, line.strip(), address))
    return accesses


def suspicious_pairs(accesses, near_only=False):
    stores = [a for a in accesses if a[0]]
    loads = [a for a in accesses if not a[0]]
    for s in stores:
        for l in loads:
            if (l[1], l[2]) != (s[1], s[2]):
                continue
            if (near_only or s[2].startswith("%rsp")) and not 0 < l[6] - s[6] <= STACK_PAIR_BYTES:
                continue
            s_lo, s_hi, l_lo, l_hi = s[3], s[3] + s[4], l[3], l[3] + l[4]
            if l_lo < s_hi and s_lo < l_hi and not (s_lo <= l_lo and l_hi <= s_hi):
                yield s[5], l[5]


def report(name, binary, hot, near_only=False):
    pairs = list(suspicious_pairs(memory_accesses(binary, hot), near_only))
    print(f"{name}: {len(hot)} hot instructions, {len(pairs)} suspicious store/load pairs")
    for store, load in pairs:
        print(f"  store {store}\n  load  {load}")
    return bool(pairs)


def main():
    layouts = sys.argv[1:] or LAYOUTS
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "virtq", "--example", "cycle", "-p", "virtq-cli"],
                   cwd=ROOT, check=True)
    found = False
    for layout in layouts:
        counts = instruction_counts([str(BIN), layout, "static", str(BUFFERS)], env={"CYCLE_BATCH": "32"})
        # Once per buffer, or once per cache line of four (the packed device's flush).
        found |= report(f"cycle {layout}", BIN, {a for a, n in counts.items() if n >= BUFFERS // 4})
    # All layouts' loops are inlined into one function, where the same registers hold
    # unrelated addresses: only pairs close together in the code count. Each runs once
    # per buffer. The
    # two-thread runs that follow starve under valgrind, which runs one thread at a time,
    # and end the program with status 3 after 5 s; the single-thread phase is done by then.
    counts = instruction_counts(
        [str(CLI), "bench", "--ringtest", "--rounds", "1", "--run-cycles", str(RINGTEST_CYCLES)],
        collect="virtq::ringtest::run",
        check=False,
    )
    found |= report("ringtest single-thread phase", CLI,
                    {a for a, n in counts.items() if n >= RINGTEST_PER_LAYOUT // 4}, near_only=True)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
