//! A driver queue (`Virtqueue`, any of the four layouts) against a device that is honest
//! at times and hostile at others.
//!
//! The input picks the layout, size and features, then interleaves driver operations
//! (`add_*` with random segment counts and lengths, `kick_prepare`, `get_buf`, the
//! callback controls, `reset`, `resize`, `break_queue`) with device operations: an honest
//! `DeviceQueue` attached to the same ring pops, completes and publishes, and a hostile
//! device writes arbitrary bytes into the parts of ring memory it can write (split: the
//! used ring and `avail_event`; packed: the descriptor ring and its event area), forges
//! used entries, and scribbles over descriptors. Buffers are mapped either through
//! `&TestMemory` (identity) or through `CountingDma`, which really maps and can fail.
//!
//! Checked: no panic; every token added comes back exactly once, from `get_buf` or, at the
//! end, `detach_unused_buf` (or a `reset` / `resize` recycle); `get_buf` never returns a
//! token that is not in flight, a length beyond its writable part, or another buffer's
//! context; add errors are the ones the state explains; every mapping is unmapped. While
//! the device has been honest (since the last reset): the queue never breaks, lengths
//! are exactly those the device reported, in-order queues return tokens in order, and a
//! device asleep after `enable_notifications` is kicked after new buffers.

#![no_main]

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::Input;
use libfuzzer_sys::fuzz_target;
use virtq::testing::{CountingDma, TestMemory};
use virtq::{
    AddErrorKind, Chain, CreateError, DeviceConfig, DeviceQueue, Dma, Features, InterruptAction, LayoutKind,
    QueueConfig, Sg, UsedSnapshot, Virtqueue,
};

const MEM: usize = 96 << 10;
const MAX_SPLIT_LOG: u8 = 6;
const MAX_PACKED: u16 = 64;
/// Buffer slots: one per buffer in flight (at most the largest ring size).
const SLOTS: usize = 64;
const SEG_MAX: u32 = 64;
const SEGS_MAX: usize = 6;
const SLOT_BYTES: u64 = SEG_MAX as u64 * SEGS_MAX as u64;
const MAX_OPS: usize = 1024;
const MAX_RESIZES: u32 = 3;

/// Whether to check for bugs that are known and not fixed yet (each with an ignored
/// regression test in `virtq/tests/fuzz_regressions.rs`): `VIRTQ_FUZZ_KNOWN_BUGS=1`.
/// By default a known bug is tolerated where the harness checks for it (`if
/// !check_known_bugs() { ... }`), so that a long run looks for new ones. None is known
/// at present: the two this target found (TooManySegments on a full indirect ring, and a
/// failed packed add leaving descriptors available) are fixed and their tests enabled.
#[allow(dead_code)]
fn check_known_bugs() -> bool {
    static CHECK: OnceLock<bool> = OnceLock::new();
    *CHECK.get_or_init(|| std::env::var_os("VIRTQ_FUZZ_KNOWN_BUGS").is_some_and(|v| v == "1"))
}

/// `VIRTQ_FUZZ_TRACE=1` prints every operation (to replay a crash input and read it).
fn tracing() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("VIRTQ_FUZZ_TRACE").is_some_and(|v| v == "1"))
}

macro_rules! trace {
    ($($arg:tt)*) => {
        if tracing() {
            eprintln!($($arg)*);
        }
    };
}

struct InFlight {
    writable: u32,
    ctx: Option<usize>,
    slot: usize,
    /// What the honest device reported, once it completed the buffer.
    completed: Option<u32>,
}

struct Harness<'m, D: Dma> {
    mem: &'m TestMemory,
    counting: Option<&'m CountingDma<'m>>,
    q: Virtqueue<u64, D, ()>,
    /// Guest address to the address `add_*` takes (identity, or before `CountingDma`).
    to_cpu: fn(u64) -> u64,
    features: Features,
    layout: LayoutKind,
    context: bool,
    /// Longest buffer that goes into one indirect descriptor (0: no indirect).
    indirect_max: usize,
    device: DeviceQueue<'m, TestMemory>,
    held: Vec<(Chain, Option<u64>)>,
    device_asleep: bool,
    adds_since_sleep: usize,
    /// The device wrote ring memory behind its `DeviceQueue`'s back since the last reset.
    hostile: bool,
    broken_on_request: bool,
    map_may_fail: bool,
    in_flight: HashMap<u64, InFlight>,
    slot_token: Vec<Option<u64>>,
    slots_base: u64,
    next_token: u64,
    last_returned: Option<u64>,
    snapshot: Option<UsedSnapshot>,
    resizes: u32,
    /// Where the hostile device forges packed used descriptors.
    forge: (u16, bool),
}

impl<'m, D: Dma> Harness<'m, D> {
    fn size(&self) -> u16 {
        self.q.vring_size()
    }

    fn is_split(&self) -> bool {
        matches!(self.layout, LayoutKind::Split | LayoutKind::SplitInOrder)
    }

    fn in_order(&self) -> bool {
        matches!(self.layout, LayoutKind::SplitInOrder | LayoutKind::PackedInOrder)
    }

    fn attach_device(&mut self) {
        let q = &self.q;
        let config = DeviceConfig::new(q.vring_size(), self.features, q.desc_addr(), q.avail_addr(), q.used_addr());
        self.device = DeviceQueue::new(self.mem, config).expect("the driver's ring is valid for the device");
        self.held.clear();
        self.device_asleep = false;
        self.adds_since_sleep = 0;
        self.hostile = false;
        self.broken_on_request = false;
        self.snapshot = None;
        self.forge = (0, true);
    }

    fn returned(&mut self, token: u64, len: Option<u32>, ctx: Option<Option<usize>>) {
        let f = self.in_flight.remove(&token).unwrap_or_else(|| panic!("token {token} returned twice or never added"));
        assert_eq!(self.slot_token[f.slot], Some(token));
        self.slot_token[f.slot] = None;
        if let Some(len) = len {
            assert!(len <= f.writable, "token {token}: length {len} beyond its {} writable bytes", f.writable);
            if !self.hostile {
                assert_eq!(Some(len), f.completed, "token {token}: length differs from the device's report");
                if self.in_order() {
                    assert!(self.last_returned.is_none_or(|l| token > l), "in-order token {token} out of order");
                }
            }
        }
        if let Some(ctx) = ctx {
            assert_eq!(ctx, f.ctx, "token {token}: wrong context");
        }
        if len.is_some() {
            self.last_returned = Some(token);
        }
    }

    fn get_buf(&mut self) -> bool {
        match self.q.get_buf_ctx() {
            Some((u, ctx)) => {
                trace!("  get_buf -> token {} len {} ctx {ctx:?}", u.token, u.len);
                self.returned(u.token, Some(u.len), Some(ctx));
                true
            }
            None => false,
        }
    }

    fn add(&mut self, input: &mut Input<'_>) {
        let sel = input.u8();
        let (mut n_out, mut n_in) = ((sel % 4) as usize, ((sel >> 2) % 4) as usize);
        let kind = sel >> 5;
        match kind {
            4 => n_in = 0,
            5 | 6 => n_out = 0,
            _ => {}
        }
        let Some(slot) = self.slot_token.iter().position(|t| t.is_none()) else { return };
        let premapped = kind == 7;
        let base = self.slots_base + slot as u64 * SLOT_BYTES;
        let mut segs = Vec::with_capacity(SEGS_MAX);
        let mut writable = 0u32;
        for j in 0..n_out + n_in {
            let len = input.u8() as u32 % (SEG_MAX + 1);
            let guest = base + j as u64 * SEG_MAX as u64;
            segs.push(Sg::new(if premapped { guest } else { (self.to_cpu)(guest) }, len));
            if j >= n_out {
                writable += len;
            }
        }
        let (out, ins) = segs.split_at(n_out);
        let split = input.u8() as usize % (n_out + 1);
        let (out_a, out_b) = out.split_at(split);
        let token = self.next_token;
        self.next_token += 1;
        let ctx = (kind == 6).then_some(token as usize ^ 0x5555);
        let (broken, free, size) = (self.q.is_broken(), self.q.num_free(), self.size());
        let r = match kind {
            0..=3 => self.q.add_sgs(&[out_a, out_b], &[ins], token),
            4 => self.q.add_outbuf(out, token),
            5 => self.q.add_inbuf(ins, token),
            6 => self.q.add_inbuf_ctx(ins, token, ctx.unwrap()),
            _ => self.q.add_sgs_premapped(&[out_a, out_b], &[ins], token),
        };
        let total = n_out + n_in;
        trace!(
            "  add token {token} out {out_a:?} {out_b:?} in {ins:?} ctx {ctx:?} -> {:?}",
            r.as_ref().map_err(|e| e.kind)
        );
        // A buffer that fits in an indirect table always fits in the ring, later if not now.
        let fits_indirect = total > 1 && total <= self.indirect_max;
        match r {
            Ok(()) => {
                assert!(!broken, "add on a broken queue succeeded");
                assert!(total > 0 && total <= SEGS_MAX);
                let descs = if fits_indirect { 1 } else { total as u16 };
                assert_eq!(self.q.num_free(), free - descs, "an add takes one descriptor per segment, or one table");
                self.in_flight.insert(token, InFlight { writable, ctx, slot, completed: None });
                self.slot_token[slot] = Some(token);
                self.adds_since_sleep += 1;
            }
            Err(e) => {
                assert_eq!(e.token, token, "the failed add's token comes back");
                assert_eq!(self.q.num_free(), free, "a failed add takes nothing");
                let ok = match e.kind {
                    AddErrorKind::Broken => broken,
                    AddErrorKind::NoContext => !broken && ctx.is_some() && !self.context,
                    AddErrorKind::NoSegments => !broken && total == 0,
                    AddErrorKind::TooManySegments => !broken && total > size as usize && !fits_indirect,
                    AddErrorKind::NoSpace => !broken && if fits_indirect { free == 0 } else { (free as usize) < total },
                    AddErrorKind::NoMemory => !broken && !premapped && self.map_may_fail,
                    // A kind this target does not know yet is a failure to look at.
                    _ => false,
                };
                assert!(ok, "add failed with {:?}: broken {broken}, {total} segments, {free} free of {size}", e.kind);
            }
        }
    }

    fn device_pop(&mut self) {
        let mut segs = Vec::new();
        let r = self.device.pop(&mut segs);
        trace!("  device pop -> {r:?} {segs:?}");
        match r {
            Ok(Some(chain)) => {
                let token = segs.first().and_then(|s| {
                    let off = s.addr().checked_sub(self.slots_base)?;
                    let slot = (off / SLOT_BYTES) as usize;
                    if off % SLOT_BYTES == 0 && slot < SLOTS {
                        self.slot_token[slot]
                    } else {
                        None
                    }
                });
                if !self.hostile {
                    let t = token.expect("an honest ring's chain names a buffer in flight");
                    assert_eq!(chain.writable_len(), self.in_flight[&t].writable);
                }
                self.held.push((chain, token));
            }
            Ok(None) => {}
            Err(e) => assert!(self.hostile, "the device rejected an honest driver's ring: {e:?}"),
        }
    }

    fn device_complete(&mut self, pick: u8, written: u32) {
        if self.held.is_empty() {
            return;
        }
        let (chain, token) =
            if self.in_order() { self.held.remove(0) } else { self.held.swap_remove(pick as usize % self.held.len()) };
        let written = match pick >> 6 {
            0 => written,
            1 | 2 => chain.writable_len(),
            _ => written % (chain.writable_len() + 1),
        };
        trace!("  device complete token {token:?} {chain:?} written {written}");
        if let Some(f) = token.and_then(|t| self.in_flight.get_mut(&t)) {
            f.completed = Some(written.min(chain.writable_len()));
        }
        self.device.complete(chain, written);
    }

    /// The hostile device writes `data` at offset `off` of area `sel`.
    fn scribble(&mut self, sel: u8, off: u16, data: &[u8]) {
        let size = self.size() as u64;
        let (desc, avail, used) = (self.q.desc_addr(), self.q.avail_addr(), self.q.used_addr());
        let (start, len) = if self.is_split() {
            match sel % 8 {
                0..=3 => (used, 6 + 8 * size),
                4 => (used + 4 + 8 * size, 2),
                5 => (desc, 16 * size),
                6 => (avail, 6 + 2 * size),
                _ => (desc, used + 6 + 8 * size - desc),
            }
        } else {
            match sel % 8 {
                0..=3 => (desc, 16 * size),
                4 | 5 => (used, 4),
                6 => (avail, 4),
                _ => (desc, used + 4 - desc),
            }
        };
        let off = off as u64 % len;
        let n = data.len().min((len - off) as usize);
        self.mem.write(start + off, &data[..n]);
        trace!("  scribble {:#x}+{off:#x}: {:02x?}", start, &data[..n]);
        self.hostile = true;
    }

    /// The hostile device forges a used entry (split) or used descriptor (packed).
    fn forge_used(&mut self, input: &mut Input<'_>) {
        let size = self.size();
        let id = if input.bool() { input.u8() as u32 % (size as u32 + 2) } else { input.u32() };
        let len = if input.bool() { input.u8() as u32 } else { input.u32() };
        let step = input.u8();
        if self.is_split() {
            let used = self.q.used_addr();
            let idx = self.mem.read_u16(used + 2);
            let elem = used + 4 + 8 * (idx & (size - 1)) as u64;
            self.mem.write_u32(elem, id);
            self.mem.write_u32(elem + 4, len);
            let new = if step & 0x80 != 0 { input.u16() } else { idx.wrapping_add(1 + (step & 1) as u16) };
            self.mem.write_u16(used + 2, new);
        } else {
            let (mut pos, mut wrap) = match step >> 6 {
                // This branch is packed: the device's used base has the wrap counter in bit 15.
                0 => {
                    let b = self.device.used_base();
                    (b & 0x7fff, b & 0x8000 != 0)
                }
                1 => (input.u8() as u16 % size, input.bool()),
                _ => self.forge,
            };
            let at = self.q.desc_addr() + 16 * pos as u64;
            self.mem.write_u32(at + 8, len);
            self.mem.write_u16(at + 12, id as u16);
            let write = if step & 1 != 0 { virtq::packed::DESC_F_WRITE } else { 0 };
            self.mem.write_u16(at + 14, virtq::packed::used_bits(wrap) | write);
            pos += 1 + (step >> 1) as u16 % 3;
            if pos >= size {
                pos %= size;
                wrap = !wrap;
            }
            self.forge = (pos, wrap);
        }
        trace!("  forged used id {id} len {len}");
        self.hostile = true;
    }

    fn recycle_all(&mut self, op: impl FnOnce(&mut Virtqueue<u64, D, ()>, &mut dyn FnMut(u64))) {
        let mut tokens = Vec::new();
        op(&mut self.q, &mut |t| tokens.push(t));
        for t in tokens {
            self.returned(t, None, None);
        }
        assert!(self.in_flight.is_empty(), "reset left tokens behind: {:?}", self.in_flight.keys());
        assert_eq!(self.q.num_free(), self.q.vring_size());
        assert!(!self.q.is_broken());
        self.attach_device();
    }

    fn op(&mut self, input: &mut Input<'_>) {
        let op = input.u8();
        let device_awake = !self.device_asleep;
        trace!(
            "op {} (free {}, in flight {}, held {}, device asleep {}, hostile {}, broken {} {:?})",
            op % 32,
            self.q.num_free(),
            self.in_flight.len(),
            self.held.len(),
            self.device_asleep,
            self.hostile,
            self.q.is_broken(),
            self.q.fault()
        );
        match op % 32 {
            0..=3 => self.add(input),
            4 | 5 => {
                let kick = self.q.kick_prepare();
                if !self.hostile && self.device_asleep && self.adds_since_sleep > 0 {
                    assert!(kick.is_some(), "lost kick: the device sleeps and new buffers are available");
                }
                if kick.is_some() {
                    self.device_asleep = false;
                    assert_eq!(self.q.notify(), !self.q.is_broken());
                }
            }
            6..=8 => {
                self.get_buf();
            }
            9 => self.q.disable_cb(),
            10 => {
                let _ = self.q.enable_cb();
            }
            11 => self.snapshot = Some(self.q.enable_cb_prepare()),
            12 => {
                if let Some(s) = self.snapshot {
                    let _ = self.q.poll(s);
                }
            }
            13 => {
                let _ = self.q.enable_cb_delayed();
            }
            14 => {
                let has_used = self.q.has_used();
                let action = self.q.interrupt();
                if has_used && self.q.is_broken() {
                    assert_eq!(action, InterruptAction::Broken);
                }
                assert!(self.q.num_free() <= self.size());
                assert_eq!(self.q.layout(), self.layout);
                let _ = self.q.notification_data();
                if self.q.fault().is_some() && !self.broken_on_request {
                    assert!(self.q.is_broken(), "a fault breaks the queue");
                }
            }
            15 => match input.u8() % 4 {
                0 => {
                    self.q.break_queue();
                    self.broken_on_request = true;
                }
                1 if self.q.fault().is_none() => {
                    self.q.unbreak();
                    self.broken_on_request = false;
                }
                2 => {
                    if let Some(c) = self.counting {
                        c.fail_map_at(c.maps() + input.u8() as u64 % 4);
                        self.map_may_fail = true;
                    }
                }
                _ => {}
            },
            16 => {
                // Rarely: a reset throws away most of the state built so far.
                let sel = input.u8();
                if sel.is_multiple_of(4) {
                    self.recycle_all(|q, f| q.reset(f));
                }
            }
            17 => {
                let sel = input.u8();
                let new =
                    if self.is_split() { 1 << (sel % (MAX_SPLIT_LOG + 2)) } else { sel as u16 % (MAX_PACKED + 8) };
                if self.resizes < MAX_RESIZES && new as usize <= SLOTS {
                    self.resizes += 1;
                    let mut r = Ok(());
                    self.recycle_all(|q, f| r = q.resize(new, f));
                    match r {
                        Ok(()) => assert_eq!(self.size(), new),
                        Err(e) => assert!(matches!(e, CreateError::InvalidSize | CreateError::NoMemory), "{e:?}"),
                    }
                }
            }
            // The honest device.
            18..=20 if device_awake => self.device_pop(),
            21 | 22 if device_awake => {
                let pick = input.u8();
                let written = input.u32();
                self.device_complete(pick, written);
            }
            23 if device_awake => self.device.publish_used(),
            24 if device_awake => {
                let _ = self.device.needs_notification();
            }
            25 if device_awake => {
                if !self.device.enable_notifications() && self.held.is_empty() {
                    self.device_asleep = true;
                    self.adds_since_sleep = 0;
                } else {
                    self.device.disable_notifications();
                }
            }
            // The hostile device.
            26..=28 => {
                let sel = input.u8();
                let off = input.u16();
                let n = input.u8() as usize % 24;
                let data = input.bytes(n);
                self.scribble(sel, off, data);
            }
            29 | 30 => self.forge_used(input),
            _ => {}
        }
    }

    fn finish(mut self) {
        // The device completes what it holds and publishes; the driver collects.
        while !self.held.is_empty() {
            self.device_complete(0, 0);
        }
        self.device.publish_used();
        for _ in 0..2 * self.size() as usize + 8 {
            if !self.get_buf() {
                break;
            }
        }
        let honest = !self.hostile && !self.q.is_broken();
        if !self.hostile && !self.broken_on_request {
            assert!(!self.q.is_broken(), "an honest device broke the queue: {:?}", self.q.fault());
        }
        for _ in 0..=self.size() as usize {
            let Some(t) = self.q.detach_unused_buf() else { break };
            if honest {
                let f = &self.in_flight[&t];
                assert_eq!(f.completed, None, "token {t} was completed and published but not returned");
            }
            self.returned(t, None, None);
        }
        assert!(self.q.detach_unused_buf().is_none());
        assert!(self.in_flight.is_empty(), "tokens lost: {:?}", self.in_flight.keys());
        assert_eq!(self.q.num_free(), self.size());
        if let Some(c) = self.counting {
            assert_eq!(c.maps(), c.unmaps(), "every mapping is undone");
        }
    }
}

fn run<'m, D: Dma>(
    mem: &'m TestMemory,
    dma: D,
    counting: Option<&'m CountingDma<'m>>,
    to_cpu: fn(u64) -> u64,
    input: &mut Input<'_>,
) {
    let flags = input.u8();
    let layout = [LayoutKind::Split, LayoutKind::SplitInOrder, LayoutKind::Packed, LayoutKind::PackedInOrder]
        [(flags & 3) as usize];
    let split = matches!(layout, LayoutKind::Split | LayoutKind::SplitInOrder);
    let size_sel = input.u8();
    let size = if split { 1u16 << (size_sel % (MAX_SPLIT_LOG + 1)) } else { size_sel as u16 % MAX_PACKED + 1 };
    let mut features = Features::VERSION_1;
    match layout {
        LayoutKind::Split => {}
        LayoutKind::SplitInOrder => features |= Features::IN_ORDER,
        LayoutKind::Packed => features |= Features::RING_PACKED,
        LayoutKind::PackedInOrder => features |= Features::RING_PACKED | Features::IN_ORDER,
    }
    if flags & 4 != 0 {
        features |= Features::EVENT_IDX;
    }
    if flags & 8 != 0 {
        features |= Features::INDIRECT_DESC;
    }
    let mut config = QueueConfig::new(0, size, features);
    config.context = flags & 0x10 != 0;
    config.callbacks = flags & 0x20 == 0;
    config.indirect_max = input.u8() as u16 % 9;
    let mut q = Virtqueue::new(config, dma, ()).expect("driver queue");
    let slots_base = mem.alloc(SLOTS * SLOT_BYTES as usize, 64).expect("buffer slots");
    let mut dev_config = DeviceConfig::new(size, features, q.desc_addr(), q.avail_addr(), q.used_addr());
    if split && flags & 0x40 != 0 {
        // Free-running split indices from anywhere, e.g. just below the 16-bit wrap.
        let index = input.u16();
        q.start_at(index);
        dev_config.avail_base = index;
    }
    let device = DeviceQueue::new(mem, dev_config).expect("device queue");
    let mut h = Harness {
        mem,
        counting,
        q,
        to_cpu,
        features,
        layout,
        context: config.context,
        indirect_max: if features.contains(Features::INDIRECT_DESC) && !config.context && config.indirect_max > 1 {
            config.indirect_max as usize
        } else {
            0
        },
        device,
        held: Vec::new(),
        device_asleep: false,
        adds_since_sleep: 0,
        hostile: false,
        broken_on_request: false,
        map_may_fail: false,
        in_flight: HashMap::new(),
        slot_token: vec![None; SLOTS],
        slots_base,
        next_token: 1,
        last_returned: None,
        snapshot: None,
        resizes: 0,
        forge: (0, true),
    };
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        h.op(input);
    }
    h.finish();
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mem = TestMemory::new(MEM);
    if input.u8() & 1 == 0 {
        run(&mem, &mem, None, |a| a, &mut input);
    } else {
        let dma = CountingDma::new(&mem);
        run(&mem, &dma, Some(&dma), CountingDma::cpu_addr, &mut input);
    }
});
