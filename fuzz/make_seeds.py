#!/usr/bin/env python3
"""Writes the committed seed corpus: a few small hand-built programs per fuzz target.

The byte formats are the ones the targets decode (see the `op` functions in
fuzz_targets/*.rs). Re-run after changing a format: `python3 fuzz/make_seeds.py`.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def u8(*v):
    return bytes(v)


def u16(v):
    return struct.pack("<H", v)


def u32(v):
    return struct.pack("<I", v)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------
# device_hostile_driver: flags, size selector, then ops (op byte % 16).
# flags: 1 packed, 2 EVENT_IDX, 4 IN_ORDER, 8 INDIRECT_DESC, 0x10 ORDER_PLATFORM,
#        0x20 ring addresses from input, 0x40 avail/used base from input, 0x80 initial used word.
SPLIT_NEXT, SPLIT_WRITE, SPLIT_INDIRECT = 1, 2, 4


def d_desc(i, data_off, len8, lo16, hi16, mode):
    """Op 0: descriptor `i` -> buffer at DATA_OFF + data_off, length len8 (< 256)."""
    return u8(0) + u16(i) + u8(0) + u16(data_off) + u8(0, len8) + u16(lo16) + u16(hi16) + u8(mode)


def d_table_desc(i, data_off, entries, lo16):
    """Op 0 with a length of 16 * entries (indirect table)."""
    return u8(0) + u16(i) + u8(0) + u16(data_off) + u8(3, entries) + u16(lo16) + u16(0) + u8(0)


def d_indirect_entry(n, data_off, len8, flags, nxt):
    """Op 2: entry n of the indirect table at the start of the data region."""
    return u8(2, n) + u8(0) + u16(data_off) + u8(0, len8) + u16(flags) + u16(nxt)


def d_publish_split(head):
    return u8(4, 1) + u16(head) + u8(0)


def d_pop(sink, touch=False):
    return u8(6, sink | (0x80 if touch else 0))


def d_complete(mode, written=0):
    """mode 0: `written`; 1: full; 2: half; 3: zero."""
    return u8(9, mode << 6) + u32(written)


PUBLISH, NOTIFY, ENABLE, DISABLE, QUERY = u8(11), u8(12), u8(13), u8(14), u8(15)

# Split, EVENT_IDX, size 4: a readable + writable chain, popped, completed, notified.
write(
    "device_hostile_driver",
    "split_event_idx_chain",
    u8(0x02, 2)
    + d_desc(0, 0x000, 16, SPLIT_NEXT, 1, 1)
    + d_desc(1, 0x100, 32, SPLIT_WRITE, 0, 1)
    + d_publish_split(0)
    + d_pop(3, True)
    + d_complete(1)
    + NOTIFY
    + ENABLE
    + d_pop(3),
)

# Split, INDIRECT_DESC, size 8: a two-entry indirect table.
write(
    "device_hostile_driver",
    "split_indirect",
    u8(0x08, 3)
    + d_indirect_entry(0, 0x200, 24, SPLIT_NEXT, 1)
    + d_indirect_entry(1, 0x300, 40, SPLIT_WRITE, 0)
    + d_table_desc(0, 0x000, 2, SPLIT_INDIRECT)
    + d_publish_split(0)
    + d_pop(2, True)
    + d_complete(2)
    + NOTIFY
    + QUERY,
)

# Split, size 4: a descriptor loop (ChainTooLong), then the error latches.
write(
    "device_hostile_driver",
    "split_loop_latches",
    u8(0x00, 2) + d_desc(0, 0x000, 1, SPLIT_NEXT, 0, 1) + d_publish_split(0) + d_pop(3) + d_pop(3) + ENABLE + QUERY,
)

# Packed, IN_ORDER, size 5: a two-descriptor chain marked available for lap 1; a sink of
# one segment is too small (SinkFull, then the harness retries with a Vec).
write(
    "device_hostile_driver",
    "packed_in_order_chain",
    u8(0x05, 4)
    + d_desc(0, 0x000, 16, 7, SPLIT_NEXT, 1)
    + d_desc(1, 0x040, 8, 7, SPLIT_WRITE, 1)
    + d_pop(0)
    + d_complete(1)
    + PUBLISH
    + ENABLE,
)

# Packed, EVENT_IDX, size 3: three single-descriptor buffers, then one on the next lap.
write(
    "device_hostile_driver",
    "packed_event_idx_wrap",
    u8(0x03, 2)
    + d_desc(0, 0x000, 8, 1, SPLIT_WRITE, 1)
    + d_desc(1, 0x010, 8, 2, 0, 1)
    + d_desc(2, 0x020, 8, 3, SPLIT_WRITE, 1)
    + d_pop(3)
    + d_pop(3)
    + d_pop(3)
    + d_complete(0, 4)
    + d_complete(1)
    + d_complete(3)
    + NOTIFY
    + d_desc(0, 0x030, 8, 4, 0, 2)
    + ENABLE
    + d_pop(3)
    + d_complete(1)
    + NOTIFY,
)

# ---------------------------------------------------------------------------------------
# driver_hostile_device: DMA selector (bit 0: CountingDma), flags, size selector,
# indirect_max selector, then ops (op byte % 32).
# flags: bits 0-1 layout (split, split in-order, packed, packed in-order), 4 EVENT_IDX,
#        8 INDIRECT_DESC, 0x10 context, 0x20 no callbacks, 0x40 (split) a u16 start index
#        follows the indirect_max selector.


def r_add(n_out, lens_out, n_in, lens_in, kind=0, split=0):
    sel = n_out | n_in << 2 | kind << 5
    return u8(0, sel) + bytes(lens_out) + bytes(lens_in) + u8(split)


KICK, GET, DISABLE_CB, ENABLE_CB, PREPARE, POLL, DELAYED, MISC = (u8(x) for x in (4, 6, 9, 10, 11, 12, 13, 14))
DEV_POP, DEV_PUBLISH, DEV_NOTIFY, DEV_SLEEP = u8(18), u8(23), u8(24), u8(25)


def r_complete(mode, written=0):
    return u8(21, mode << 6) + u32(written)


def r_scribble(sel, off, data):
    return u8(26, sel) + u16(off) + u8(len(data)) + bytes(data)


def r_forge(id8, len8, step):
    return u8(29, 1, id8, 1, len8, step)


# Split, EVENT_IDX, size 4, identity DMA: request/response round trips with a sleeping device.
write(
    "driver_hostile_device",
    "split_event_idx_round_trips",
    u8(0, 0x04, 2, 0)
    + r_add(1, [10], 1, [20])
    + KICK
    + DEV_POP
    + r_complete(1)
    + DEV_NOTIFY
    + GET
    + DEV_SLEEP
    + r_add(0, [], 1, [8])
    + KICK
    + DEV_POP
    + r_complete(3, 3)
    + DEV_PUBLISH
    + PREPARE
    + POLL
    + GET,
)

# Packed in-order, indirect (max 4), CountingDma, size 6: a batch, then a forged entry.
write(
    "driver_hostile_device",
    "packed_in_order_indirect_forge",
    u8(1, 0x0B, 5, 4)
    + r_add(2, [8, 8], 1, [16], split=1)
    + r_add(1, [4], 1, [4])
    + KICK
    + DEV_POP
    + DEV_POP
    + r_complete(1)
    + r_complete(0, 5)
    + DEV_PUBLISH
    + GET
    + GET
    + r_add(1, [4], 0, [])
    + r_forge(2, 0, 0x40)
    + u8(2, 1)  # at position 2, wrap counter 1
    + GET
    + MISC,
)

# Split in-order, size 8: a full batch, reset, resize to 4.
write(
    "driver_hostile_device",
    "split_in_order_reset_resize",
    u8(0, 0x01, 3, 0)
    + r_add(0, [], 1, [8]) * 3
    + KICK
    + DEV_POP * 3
    + r_complete(1) * 3
    + DEV_PUBLISH
    + GET * 2
    + u8(16, 0)
    + r_add(1, [8], 0, [])
    + u8(17, 2)
    + r_add(1, [8], 1, [8])
    + KICK
    + DEV_POP
    + r_complete(2)
    + DEV_NOTIFY
    + GET,
)

# Packed, EVENT_IDX, context, size 3: buffers with contexts; the device scribbles over its
# event area and a descriptor.
write(
    "driver_hostile_device",
    "packed_context_scribble",
    u8(0, 0x16, 2, 0)
    + r_add(0, [], 1, [12], kind=6)
    + r_add(0, [], 1, [12], kind=6)
    + KICK
    + DEV_POP
    + r_complete(1)
    + DEV_NOTIFY
    + ENABLE_CB
    + GET
    + r_scribble(4, 0, [0, 0, 2, 0])
    + r_scribble(0, 16, [0xff] * 16)
    + GET
    + DELAYED,
)

# Split, size 4: forged used entries, one valid and one too long.
write(
    "driver_hostile_device",
    "split_forged_used",
    u8(0, 0x00, 2, 0)
    + r_add(1, [8], 1, [8])
    + r_add(0, [], 1, [8])
    + KICK
    + r_forge(0, 8, 0)
    + GET
    + r_forge(2, 99, 0)
    + GET
    + DISABLE_CB
    + MISC,
)

# Split, EVENT_IDX, size 2, indices starting at 0xfffe: round trips across the 16-bit wrap.
write(
    "driver_hostile_device",
    "split_across_u16_wrap",
    u8(0, 0x44, 1, 0)
    + u16(0xFFFE)
    + (r_add(1, [8], 1, [8]) + KICK + DEV_POP + r_complete(1) + DEV_NOTIFY + GET) * 4
    + DEV_SLEEP
    + r_add(0, [], 1, [4])
    + KICK
    + DEV_POP
    + r_complete(0, 2)
    + DEV_PUBLISH
    + GET,
)


# ---------------------------------------------------------------------------------------
# backend_messages: ops (op byte % 16): 0 shrink a memfd, 1 write into one, 2 kick, 3 any
# request with raw bytes, 4..15 a known request (index into KNOWN, then a flags selector:
# 5 means plain version 1), its body built from the bytes that follow (see `body`).
# Selector bytes of 1 pick the usual value (0 would pick a random one). SET_MEM_TABLE ends
# with a byte that may add (0) or drop (1) an fd.
KNOWN = [
    "SET_OWNER", "GET_FEATURES", "SET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM", "SET_MEM_TABLE", "SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_BASE",
    "GET_VRING_BASE", "SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_ENABLE",
    "GET_CONFIG", "SET_CONFIG", "RESET_OWNER", "RESET_DEVICE", "GET_MAX_MEM_SLOTS", "ADD_MEM_REG",
    "REM_MEM_REG", "GET_INFLIGHT_FD", "SET_LOG_BASE",
]


def m(name, *body):
    return u8(4, KNOWN.index(name), 5) + b"".join(body)


def m_poke(offset, data):
    return u8(1, 0) + u16(offset // 16) + u8(len(data) - 1) + data


M_KICK = u8(2, 0)
M_SHRINK = u8(0, 0, 0)

# Handshake, one 64 KiB region (gpa 0), ring 0 of 16 at 0x0 / 0x1000 (avail) / 0x2000
# (used), eventfd kick and call, enabled.
M_SETUP = (
    m("SET_OWNER")
    + m("GET_FEATURES")
    + m("SET_FEATURES", u8(1, 0, 1))
    + m("SET_PROTOCOL_FEATURES", u8(1))
    + m("SET_MEM_TABLE", u8(1, 0), u8(15, 1, 1, 1, 1, 0, 0), u8(2))
    + m("SET_VRING_NUM", u8(0, 1, 4))
    + m("SET_VRING_BASE", u8(0, 1), u32(0))
    + m("SET_VRING_ADDR", u8(0, 1), u8(1, 0) + u16(0), u8(1, 0) + u16(0x200), u8(1, 0) + u16(0x100))
    + m("SET_VRING_KICK", u8(0, 1, 1))
    + m("SET_VRING_CALL", u8(0, 1, 1))
    + m("SET_VRING_ENABLE", u8(0, 1, 1))
)


def split_desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


# A FLUSH request: header at 0x3000 (NEXT), status at 0x3100 (WRITE), published, kicked.
M_FLUSH = (
    m_poke(0, split_desc(0x3000, 16, 1, 1) + split_desc(0x3100, 1, 2, 0))
    + m_poke(0x3000, u32(4) + u32(0) + struct.pack("<Q", 0))
    + m_poke(0x1000, u16(0) + u16(1) + u16(0))
    + M_KICK
)

write("backend_messages", "flush_then_get_vring_base", M_SETUP + M_FLUSH + m("GET_VRING_BASE", u8(0, 1), u32(0)))
write("backend_messages", "shrink_with_ring_running", M_SETUP + M_FLUSH + M_SHRINK + M_KICK + m("GET_FEATURES"))
write("backend_messages", "shrink_before_enable", M_SETUP[: -len(m("SET_VRING_ENABLE", u8(0, 1, 1)))] + M_SHRINK
      + m("SET_VRING_ENABLE", u8(0, 1, 1)))
write("backend_messages", "config_reads", m("SET_OWNER") + m("SET_PROTOCOL_FEATURES", u8(1))
      + m("GET_CONFIG", u8(0, 1, 60)) + m("GET_CONFIG", u8(40, 1, 63)) + m("SET_CONFIG", u8(0, 1, 8)))
# A kick fd that is a memfd; a memory table with one fd too many; a raw unknown request.
write("backend_messages", "bad_fds", m("SET_OWNER") + m("SET_MEM_TABLE", u8(1, 1), u8(1, 1, 1, 1, 1, 0, 0) * 2, u8(0, 0, 0, 0))
      + m("SET_VRING_KICK", u8(0, 1, 0, 1, 0, 0)))
write("backend_messages", "raw_request", m("SET_OWNER") + u8(3, 40, 1, 8) + b"\x01" * 8 + u8(1, 1, 0, 0))
