//! A device queue (split or packed) against a hostile driver.
//!
//! The input picks the layout, the ring size, optional features, where popping resumes and
//! (sometimes) where the rings are, then interleaves arbitrary driver writes into ring
//! memory and a small buffer region of guest memory with device operations: pop into a
//! small `Segments` sink (or a `Vec`), complete with arbitrary lengths, `serve` (pop and
//! complete in one call), publish, decide interrupts, enable and disable notifications.
//!
//! Checked: no panic, no hang (the number of operations is bounded), no access outside
//! guest memory (AddressSanitizer, and every popped segment is checked against the
//! `TestMemory` bounds and its host mapping), chains are well formed (readable segments
//! first, lengths add up), `SinkFull` is not a fault and a larger sink then succeeds or
//! reports a real fault, and every other error latches: `pop` then returns
//! `Err(Broken)` for ever and `fault()` keeps the first error.

#![no_main]

mod common;

use common::Input;
use libfuzzer_sys::fuzz_target;
use virtq::packed::{avail_bits, DESC_F_AVAIL, DESC_F_USED, WRAP_BIT};
use virtq::testing::TestMemory;
use virtq::{Chain, DeviceConfig, DeviceError, DeviceQueue, Features, GuestMemory, Segment, SegmentSink, Segments};

/// Guest memory: rings at fixed offsets (unless the input moves them), then 4 KiB of
/// buffers and indirect tables.
const MEM: usize = 0x4000;
const BASE: u64 = TestMemory::BASE;
const DESC_OFF: u64 = 0x0000;
const AVAIL_OFF: u64 = 0x1000;
const USED_OFF: u64 = 0x2000;
const DATA_OFF: u64 = 0x3000;
const DATA_LEN: u64 = 0x1000;
const MAX_SPLIT_LOG: u8 = 8;
const MAX_PACKED: u16 = 256;
const MAX_OPS: usize = 1024;

/// Writes `data` at `addr`, clipped to guest memory (a hostile driver writes anywhere it
/// can; the harness must not panic on its own account).
fn poke(mem: &TestMemory, addr: u64, data: &[u8]) {
    let end = mem.end();
    if addr < BASE || addr >= end {
        return;
    }
    let n = data.len().min((end - addr) as usize);
    mem.write(addr, &data[..n]);
}

fn poke_desc(mem: &TestMemory, addr: u64, d_addr: u64, len: u32, lo16: u16, hi16: u16) {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&d_addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&lo16.to_le_bytes());
    b[14..].copy_from_slice(&hi16.to_le_bytes());
    poke(mem, addr, &b);
}

/// A descriptor address: mostly inside the buffer region or guest memory, sometimes near
/// its end, sometimes anything.
fn buf_addr(input: &mut Input<'_>) -> u64 {
    match input.u8() % 4 {
        0 => BASE + DATA_OFF + input.u16() as u64 % DATA_LEN,
        1 => BASE + input.u16() as u64,
        2 => input.u64(),
        _ => BASE + MEM as u64 - input.u8() as u64,
    }
}

/// What the checks need of a chain (one served is completed before they run).
struct Shape {
    id: u16,
    readable_segments: u16,
    writable_segments: u16,
    readable_len: u32,
    writable_len: u32,
}

impl Shape {
    fn of(chain: &Chain) -> Self {
        Self {
            id: chain.id(),
            readable_segments: chain.readable_segments(),
            writable_segments: chain.writable_segments(),
            readable_len: chain.readable_len(),
            writable_len: chain.writable_len(),
        }
    }
}

struct Harness<'m> {
    mem: &'m TestMemory,
    host_base: *mut u8,
    q: DeviceQueue<'m, TestMemory>,
    packed: bool,
    in_order: bool,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// The driver's notion of its next available entry: split `avail.idx`, packed
    /// position and wrap counter.
    drv_idx: u16,
    drv_wrap: bool,
    held: Vec<Chain>,
    /// The first latched error, as the harness saw it.
    fault: Option<DeviceError>,
    scratch: Vec<u8>,
}

impl<'m> Harness<'m> {
    fn area(&self, sel: u8) -> (u64, u64) {
        let size = self.size as u64;
        match sel % 6 {
            0 => (self.desc, 16 * size),
            1 if self.packed => (self.avail, 4),
            1 => (self.avail, 6 + 2 * size),
            2 if self.packed => (self.used, 4),
            2 => (self.used, 6 + 8 * size),
            3 | 4 => (BASE + DATA_OFF, DATA_LEN),
            _ => (BASE, MEM as u64),
        }
    }

    fn check_segments(&mut self, chain: &Shape, segs: &[Segment<'m>], touch: bool) {
        let n = chain.readable_segments as usize + chain.writable_segments as usize;
        assert_eq!(segs.len(), n, "segment count");
        let (mut readable, mut writable) = (0u64, 0u64);
        for (i, s) in segs.iter().enumerate() {
            assert_eq!(s.is_writable(), i >= chain.readable_segments as usize, "readable segments come first");
            let (addr, len) = (s.addr(), s.len() as u64);
            assert!(addr >= BASE && addr <= self.mem.end() && len <= self.mem.end() - addr, "{s:?} outside memory");
            assert_eq!(s.host_ptr() as usize, self.host_base as usize + (addr - BASE) as usize, "{s:?} host mapping");
            if s.is_writable() {
                writable += len;
            } else {
                readable += len;
            }
            // Touch every byte, so that AddressSanitizer sees any bad mapping.
            let buf = &mut self.scratch[..s.len() as usize];
            assert_eq!(s.read_at(0, buf), buf.len());
            if touch && s.is_writable() {
                buf.fill(0x5a);
                assert_eq!(s.write_at(0, buf), buf.len());
            }
            assert_eq!(s.read_at(s.len() as usize, &mut [0u8; 4]), 0);
            assert_eq!(s.write_at(s.len() as usize + 1, &[1, 2]), 0);
        }
        assert_eq!(readable, chain.readable_len as u64);
        assert_eq!(writable, chain.writable_len as u64);
        assert!(readable + writable <= u32::MAX as u64);
        if !self.packed {
            assert!(chain.id < self.size, "split chain id is a head index");
        }
    }

    fn after_error(&mut self, e: DeviceError) {
        match (self.fault, e) {
            (Some(_), DeviceError::Broken) => {}
            (Some(f), e) => panic!("pop on a queue broken by {f:?} returned {e:?}, not Broken"),
            (None, DeviceError::Broken) => panic!("Broken from a queue that had no fault"),
            (None, DeviceError::SinkFull) => {
                assert!(!self.q.is_broken(), "SinkFull must not break the queue");
                assert_eq!(self.q.fault(), None);
            }
            (None, e) => {
                self.fault = Some(e);
            }
        }
        if let Some(f) = self.fault {
            assert!(self.q.is_broken());
            assert_eq!(self.q.fault(), Some(f), "the first fault stays recorded");
        }
    }

    /// One pop into `segs`; returns whether the sink was too small.
    fn pop_into<S: SegmentSink<'m>>(
        &mut self,
        segs: &mut S,
        list: impl Fn(&S) -> Vec<Segment<'m>>,
        touch: bool,
    ) -> bool {
        let was_broken = self.fault.is_some();
        let r = self.q.pop(segs);
        if was_broken {
            assert_eq!(r, Err(DeviceError::Broken), "errors latch");
        }
        match r {
            Ok(Some(chain)) => {
                let l = list(segs);
                self.check_segments(&Shape::of(&chain), &l, touch);
                self.held.push(chain);
                false
            }
            Ok(None) => false,
            Err(e) => {
                self.after_error(e);
                e == DeviceError::SinkFull
            }
        }
    }

    fn pop(&mut self, sink: u8, touch: bool) {
        let sink_full = match sink % 4 {
            0 => self.pop_into(&mut Segments::<1>::new(), |s| s.iter().copied().collect(), touch),
            1 => self.pop_into(&mut Segments::<2>::new(), |s| s.iter().copied().collect(), touch),
            2 => self.pop_into(&mut Segments::<4>::new(), |s| s.iter().copied().collect(), touch),
            _ => self.pop_into(&mut Vec::new(), |s| s.clone(), touch),
        };
        if sink_full {
            // Nothing changed in memory since: an unbounded sink must now get the chain or
            // find a real fault.
            let held = self.held.len();
            let mut v = Vec::new();
            let r = self.q.pop(&mut v);
            assert!(!matches!(r, Ok(None) | Err(DeviceError::SinkFull)), "retry after SinkFull gave {r:?}");
            match r {
                Ok(Some(chain)) => {
                    self.check_segments(&Shape::of(&chain), &v, touch);
                    self.held.push(chain);
                }
                Ok(None) => unreachable!(),
                Err(e) => self.after_error(e),
            }
            assert!(self.held.len() <= held + 1);
        }
    }

    /// One `serve` of up to `max % 8` chains, each checked as a popped one is.
    fn serve(&mut self, max: u8, pick: u8, written: u32) {
        // An in-order device completes in the order it popped: not past chains it holds.
        if self.in_order && !self.held.is_empty() {
            return;
        }
        let max = max as usize % 8;
        let was_broken = self.fault.is_some();
        let mut seen = Vec::new();
        let mut segs = Segments::<4>::new();
        let r = self.q.serve(max, &mut segs, |chain, segs| {
            seen.push((Shape::of(chain), segs.to_vec()));
            match pick >> 6 {
                0 => written,
                1 => chain.writable_len(),
                2 => chain.writable_len() / 2,
                _ => 0,
            }
        });
        if was_broken {
            assert_eq!(r, Err(DeviceError::Broken), "errors latch");
        }
        for (shape, segs) in &seen {
            self.check_segments(shape, segs, pick & 1 != 0);
        }
        match r {
            Ok(n) => {
                assert_eq!(n, seen.len());
                assert!(n <= max);
                // A fault after the first chain ends the call early and is latched.
                if let (None, Some(f)) = (self.fault, self.q.fault()) {
                    assert!(n > 0 && !matches!(f, DeviceError::Broken | DeviceError::SinkFull), "{f:?}");
                    self.fault = Some(f);
                }
            }
            Err(e) => {
                assert!(seen.is_empty(), "an error only when nothing was served");
                self.after_error(e);
            }
        }
    }

    fn complete(&mut self, pick: u8, written: u32) {
        if self.held.is_empty() {
            return;
        }
        // An in-order device completes in the order it popped (its API contract).
        let chain =
            if self.in_order { self.held.remove(0) } else { self.held.swap_remove(pick as usize % self.held.len()) };
        let written = match pick >> 6 {
            0 => written,
            1 => chain.writable_len(),
            2 => chain.writable_len() / 2,
            _ => 0,
        };
        self.q.complete(chain, written);
    }

    fn op(&mut self, input: &mut Input<'_>) {
        let size = self.size;
        match input.u8() % 16 {
            // A descriptor in the ring, with arbitrary fields; packed flags may be given
            // the AVAIL/USED bits of either lap.
            0 | 1 => {
                let i = input.u16() % size;
                let addr = buf_addr(input);
                let len = input.len();
                let (lo16, mut hi16) = (input.u16(), input.u16());
                if self.packed {
                    match input.u8() % 3 {
                        0 => {}
                        1 => hi16 = (hi16 & !(DESC_F_AVAIL | DESC_F_USED)) | avail_bits(self.drv_wrap),
                        _ => hi16 = (hi16 & !(DESC_F_AVAIL | DESC_F_USED)) | avail_bits(!self.drv_wrap),
                    }
                } else {
                    // Keep `next` small now and then, so that chains link.
                    if input.bool() {
                        hi16 %= size;
                    }
                }
                poke_desc(self.mem, self.desc + 16 * i as u64, addr, len, lo16, hi16);
            }
            // An entry of an indirect table in the buffer region.
            2 => {
                let at = BASE + DATA_OFF + 16 * (input.u8() as u64);
                let addr = buf_addr(input);
                let len = input.len();
                let (lo16, hi16) = (input.u16(), input.u16());
                poke_desc(self.mem, at, addr, len, lo16, hi16 % 64);
            }
            // Raw bytes into one area.
            3 => {
                let (start, len) = self.area(input.u8());
                let off = input.u16() as u64 % len;
                let n = input.u8() as usize % 32;
                let data = input.bytes(n);
                let n = data.len().min((len - off) as usize);
                poke(self.mem, start + off, &data[..n]);
            }
            // Make a head available: split, a ring entry and the index; packed, the
            // head's flags for the driver's lap.
            4 => {
                if self.packed {
                    let extra = input.u16() & !(DESC_F_AVAIL | DESC_F_USED);
                    let at = self.desc + 16 * self.drv_idx as u64 + 14;
                    poke(self.mem, at, &(extra | avail_bits(self.drv_wrap)).to_le_bytes());
                    self.drv_idx += 1 + input.u8() as u16 % 4;
                    if self.drv_idx >= size {
                        self.drv_idx %= size;
                        self.drv_wrap = !self.drv_wrap;
                    }
                } else {
                    let head = if input.bool() { input.u16() % size } else { input.u16() };
                    let slot = self.avail + 4 + 2 * (self.drv_idx & (size - 1)) as u64;
                    poke(self.mem, slot, &head.to_le_bytes());
                    self.drv_idx = self.drv_idx.wrapping_add(1 + input.u8() as u16 % 2);
                    poke(self.mem, self.avail + 2, &self.drv_idx.to_le_bytes());
                }
            }
            // Event areas: split `used_event` / avail flags, packed driver area.
            5 => {
                if self.packed {
                    let v = input.u32();
                    poke(self.mem, self.avail, &v.to_le_bytes());
                } else if input.bool() {
                    poke(self.mem, self.avail + 4 + 2 * size as u64, &input.u16().to_le_bytes());
                } else {
                    poke(self.mem, self.avail, &input.u16().to_le_bytes());
                }
            }
            6 | 7 => {
                let sink = input.u8();
                self.pop(sink, sink & 0x80 != 0);
            }
            8 => {
                let (max, pick, written) = (input.u8(), input.u8(), input.u32());
                self.serve(max, pick, written);
            }
            9 | 10 => {
                let pick = input.u8();
                let written = input.u32();
                self.complete(pick, written);
            }
            11 => self.q.publish_used(),
            12 => {
                let _ = self.q.needs_notification();
            }
            13 => {
                let pending = self.q.enable_notifications();
                if self.fault.is_some() {
                    assert!(pending, "a broken queue must not let the device sleep");
                }
            }
            14 => self.q.disable_notifications(),
            _ => {
                assert_eq!(self.q.size(), size);
                assert_eq!(self.q.is_broken(), self.fault.is_some());
                let base = self.q.avail_base();
                if self.packed {
                    assert!(base & !WRAP_BIT < size);
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.u8();
    let packed = flags & 1 != 0;
    let size_sel = input.u8();
    let size = if packed { size_sel as u16 % MAX_PACKED + 1 } else { 1u16 << (size_sel % (MAX_SPLIT_LOG + 1)) };
    let mut features = Features::VERSION_1;
    for (bit, f) in [
        (2, Features::EVENT_IDX),
        (4, Features::IN_ORDER),
        (8, Features::INDIRECT_DESC),
        (0x10, Features::ORDER_PLATFORM),
    ] {
        if flags & bit != 0 {
            features |= f;
        }
    }
    if packed {
        features |= Features::RING_PACKED;
    }
    let (mut desc, mut avail, mut used) = (BASE + DESC_OFF, BASE + AVAIL_OFF, BASE + USED_OFF);
    if flags & 0x20 != 0 {
        // Anywhere in (or beyond) guest memory, any alignment.
        desc = BASE + input.u16() as u64;
        avail = BASE + input.u16() as u64;
        used = BASE + input.u16() as u64;
    }
    let mut config = DeviceConfig::new(size, features, desc, avail, used);
    if flags & 0x40 != 0 {
        config.avail_base = input.u16();
        config.used_base = input.u16();
    }
    let mem = TestMemory::new(MEM);
    if flags & 0x80 != 0 {
        // What the device finds in its own area when it attaches.
        let v = input.u32();
        poke(&mem, used, &v.to_le_bytes());
    }
    let q = match DeviceQueue::new(&mem, config) {
        Ok(q) => q,
        Err(e) => {
            assert!(
                matches!(e, DeviceError::Misaligned | DeviceError::AddressOutOfRange { .. } | DeviceError::InvalidSize),
                "{e:?}"
            );
            return;
        }
    };
    let host_base = mem.translate(BASE, 0).expect("base").as_ptr();
    let (drv_idx, drv_wrap) = if packed {
        (config.avail_base & !WRAP_BIT, config.avail_base & WRAP_BIT != 0)
    } else {
        (config.avail_base, false)
    };
    let mut h = Harness {
        mem: &mem,
        host_base,
        q,
        packed,
        in_order: features.contains(Features::IN_ORDER),
        size,
        desc,
        avail,
        used,
        drv_idx,
        drv_wrap,
        held: Vec::new(),
        fault: None,
        scratch: vec![0; MEM],
    };
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        h.op(&mut input);
    }
    // Wind down as a device would: complete everything, publish, decide the interrupt.
    while !h.held.is_empty() {
        h.complete(0, u32::MAX);
    }
    let _ = h.q.needs_notification();
    let _ = h.q.enable_notifications();
    h.pop(3, false);
    while !h.held.is_empty() {
        h.complete(0, 0);
    }
    h.q.publish_used();
});
