//! Two-thread stress test: a driver and a device on two threads share one ring, for each
//! of the four layouts, with and without `EVENT_IDX` (and with `INDIRECT_DESC` on half of
//! the configurations).
//!
//! Both sides sleep when idle and wake only when the other notifies them, each through a
//! doorbell (a flag and `park`/`unpark`): the driver's `Notify` rings the device's
//! doorbell, and the device rings the driver's when `needs_notification()` says so. The
//! sleep protocols are the ones the API documents:
//!
//! - device: `pop` finds nothing, so `enable_notifications()`; if that returns false
//!   (nothing slipped in), sleep; on waking, `disable_notifications()`;
//! - driver: `enable_cb()`, `enable_cb_prepare()` + `poll()`, or `enable_cb_delayed()`
//!   (chosen at random); sleep only if no buffers are already used; `disable_cb()` on
//!   waking.
//!
//! A timed-out `park` never counts as a notification: a sleeper goes back to sleep unless
//! its doorbell was rung (it only re-checks the stop flag), so a lost kick or interrupt
//! shows up as a hang. A watchdog fails the test, naming the side that is stuck, if
//! neither side makes progress for 5 s; the test process never hangs.
//!
//! Checked for every buffer: its token (a sequence number) is popped by the device in
//! order, exactly once, with the bytes the driver wrote; it comes back from `get_buf`
//! exactly once, with the length the device reported and the bytes the device wrote; on
//! in-order layouts the device completes in pop order and tokens come back in order.
//!
//! Split rings start their free-running indices just below the 16-bit wrap, so every run
//! crosses it; packed rings wrap every `size` descriptors anyway.
//!
//! Time: 0.25 s per configuration (2 s in all) by default; `VIRTQ_STRESS_SECS=30` runs each
//! configuration for 30 s. `VIRTQ_STRESS_SEED` changes the random seed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use virtq::testing::TestMemory;
use virtq::{
    AddErrorKind, Chain, DeviceConfig, DeviceQueue, Features, LayoutKind, Notify, NotifyData, QueueConfig, Segment, Sg,
    Virtqueue,
};

/// Segments per buffer at most, and bytes per segment at most.
const MAX_SEGS: usize = 4;
const SEG_BYTES: u64 = 64;
const SLOT_BYTES: u64 = MAX_SEGS as u64 * SEG_BYTES;
/// The first segment of every buffer starts with its token.
const HEADER: usize = 8;
/// Fail if neither side makes progress for this long.
const STUCK_AFTER: Duration = Duration::from_secs(5);
const DEFAULT_SECS_PER_CONFIG: f64 = 0.25;

/// A small deterministic PRNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Byte `i` of the data the driver gives buffer `token` to read.
fn out_byte(token: u64, i: usize) -> u8 {
    (token.wrapping_mul(131) as u8) ^ (i as u8).wrapping_mul(7)
}

/// Byte `i` of the data the device writes into buffer `token`.
fn in_byte(token: u64, i: usize) -> u8 {
    out_byte(token, i) ^ 0xa5
}

/// What the driver fills writable segments with before adding them.
const STALE: u8 = 0xee;

/// One thread's way to be woken: a flag and `park`/`unpark`.
struct Doorbell {
    rung: AtomicU32,
    rings: AtomicU64,
    /// Times the owner went to sleep on it.
    sleeps: AtomicU64,
    /// Rings from this one on are lost (to test the watchdog); `u64::MAX`: none.
    lose_after: u64,
    sleeper: OnceLock<Thread>,
}

impl Doorbell {
    fn new(lose_after: u64) -> Self {
        Self {
            rung: AtomicU32::new(0),
            rings: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
            lose_after,
            sleeper: OnceLock::new(),
        }
    }

    fn ring(&self) {
        if self.rings.fetch_add(1, Ordering::Relaxed) >= self.lose_after {
            return;
        }
        self.rung.store(1, Ordering::Release);
        if let Some(t) = self.sleeper.get() {
            t.unpark();
        }
    }

    /// Sleeps until the doorbell is rung (true) or `stop` is set (false). A timeout only
    /// re-checks `stop`: it is not a notification.
    fn wait(&self, stop: &AtomicBool) -> bool {
        self.sleeps.fetch_add(1, Ordering::Relaxed);
        loop {
            if self.rung.swap(0, Ordering::Acquire) == 1 {
                return true;
            }
            if stop.load(Ordering::Acquire) {
                return false;
            }
            thread::park_timeout(Duration::from_millis(20));
        }
    }

    /// Forgets rings from before: called by the sleeper before it re-checks for work, so
    /// that a ring for work it will find anyway does not wake it later. A swap, not a
    /// store: it must synchronize with the ring it consumes, like `wait`.
    fn clear(&self) {
        self.rung.swap(0, Ordering::Acquire);
    }
}

/// The driver's notifier rings the device's doorbell.
impl Notify for Doorbell {
    fn notify(&self, _data: NotifyData) -> bool {
        self.ring();
        true
    }
}

const RUNNING: u8 = 0;
const ASLEEP: u8 = 1;
const DONE: u8 = 2;

/// State both threads and the watchdog see.
struct Shared {
    stop: AtomicBool,
    device_bell: Doorbell,
    driver_bell: Doorbell,
    driver_state: AtomicU8,
    device_state: AtomicU8,
    added: AtomicU64,
    popped: AtomicU64,
    completed: AtomicU64,
    returned: AtomicU64,
    /// Written length the device reported for the buffer in each slot.
    reported: Vec<AtomicU32>,
}

impl Shared {
    fn progress(&self) -> u64 {
        self.popped.load(Ordering::Relaxed) + self.returned.load(Ordering::Relaxed)
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        for bell in [&self.device_bell, &self.driver_bell] {
            if let Some(t) = bell.sleeper.get() {
                t.unpark();
            }
        }
    }

    /// Which side is stuck, and why.
    fn diagnose(&self, stuck_after: Duration) -> String {
        let state = |s: &AtomicU8| match s.load(Ordering::Relaxed) {
            RUNNING => "running",
            ASLEEP => "asleep",
            _ => "done",
        };
        let (added, popped) = (self.added.load(Ordering::Relaxed), self.popped.load(Ordering::Relaxed));
        let (completed, returned) = (self.completed.load(Ordering::Relaxed), self.returned.load(Ordering::Relaxed));
        let (drv, dev) = (state(&self.driver_state), state(&self.device_state));
        let who = if dev == "asleep" && popped < added {
            format!(
                "the device is stuck asleep waiting for a kick with {} buffers available (lost kick)",
                added - popped
            )
        } else if drv == "asleep" && returned < completed {
            format!(
                "the driver is stuck asleep waiting for an interrupt with {} used buffers (lost interrupt)",
                completed - returned
            )
        } else if drv == "asleep" && dev == "asleep" {
            "both sides are asleep with no work visible".to_string()
        } else {
            format!("a side is stuck running (driver {drv}, device {dev})")
        };
        format!(
            "no progress for {stuck_after:?}: {who}; driver {drv}, device {dev}; added {added}, popped {popped}, \
             completed {completed}, returned {returned}; kicks {}, interrupts {}",
            self.device_bell.rings.load(Ordering::Relaxed),
            self.driver_bell.rings.load(Ordering::Relaxed)
        )
    }
}

/// Stops the other side if this one leaves, by panic or otherwise.
struct StopOnDrop<'a>(&'a Shared, &'a AtomicU8);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.1.store(DONE, Ordering::Relaxed);
        self.0.stop();
    }
}

#[derive(Clone, Copy, Debug)]
struct Config {
    layout: LayoutKind,
    event_idx: bool,
    indirect: bool,
    size: u16,
    /// Split rings: where the free-running 16-bit indices start (just below the wrap, so
    /// that every run crosses it).
    start: u16,
    seed: u64,
    duration: Duration,
    stuck_after: Duration,
    /// Notifications lost from this one on (watchdog self-tests); `u64::MAX`: none.
    lose_kicks_after: u64,
    lose_interrupts_after: u64,
}

impl Config {
    fn in_order(&self) -> bool {
        self.layout.is_in_order()
    }

    fn features(&self) -> Features {
        let mut f = self.layout.apply(Features::VERSION_1);
        if self.event_idx {
            f |= Features::EVENT_IDX;
        }
        if self.indirect {
            f |= Features::INDIRECT_DESC;
        }
        f
    }
}

/// A buffer the driver has in flight.
struct InFlight {
    slot: usize,
    /// Writable segments as (guest address, length), in order.
    writable: Vec<(u64, u32)>,
}

type Driver<'m> = Virtqueue<u64, &'m TestMemory, &'m Doorbell>;

struct DriverSide<'m> {
    cfg: Config,
    sh: &'m Shared,
    mem: &'m TestMemory,
    q: Driver<'m>,
    pool: u64,
    rng: Rng,
    next_token: u64,
    in_flight: BTreeMap<u64, InFlight>,
    free_slots: Vec<usize>,
}

impl DriverSide<'_> {
    /// Adds one buffer of random shape; false if the ring is full.
    fn add_one(&mut self) -> bool {
        let Some(&slot) = self.free_slots.last() else { return false };
        // Without indirect descriptors a buffer must fit in the ring.
        let max = MAX_SEGS.min(self.cfg.size as usize) as u64;
        let n = self.rng.range(1, max) as usize;
        let n_out = self.rng.range(0, n as u64) as usize;
        let token = self.next_token;
        let base = self.pool + slot as u64 * SLOT_BYTES;
        let mut segs = Vec::with_capacity(n);
        let mut writable = Vec::new();
        let mut out_pos = 0;
        for j in 0..n {
            let min = if j == 0 { HEADER as u64 } else { 1 };
            let len = self.rng.range(min, SEG_BYTES) as u32;
            let addr = base + j as u64 * SEG_BYTES;
            if j < n_out {
                let data: Vec<u8> = (0..len as usize).map(|i| out_byte(token, out_pos + i)).collect();
                self.mem.write(addr, &data);
                out_pos += len as usize;
            } else {
                self.mem.write(addr, &vec![STALE; len as usize]);
                writable.push((addr, len));
            }
            segs.push(Sg::new(addr, len));
        }
        // Every buffer starts with its token, readable or not.
        self.mem.write(base, &token.to_le_bytes());
        let (out, ins) = segs.split_at(n_out);
        match self.q.add_sgs(&[out], &[ins], token) {
            Ok(()) => {
                self.free_slots.pop();
                self.in_flight.insert(token, InFlight { slot, writable });
                self.next_token += 1;
                self.sh.added.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) if e.kind == AddErrorKind::NoSpace => false,
            Err(e) => panic!("driver: add failed: {e} (queue fault {:?})", self.q.fault()),
        }
    }

    fn collect_one(&mut self) -> bool {
        let Some(used) = self.q.get_buf() else {
            assert!(!self.q.is_broken(), "driver: queue broken: {:?}", self.q.fault());
            return false;
        };
        let token = used.token;
        if self.cfg.in_order() {
            let first = self.in_flight.keys().next().copied();
            assert_eq!(Some(token), first, "driver: in-order queue returned token {token} out of order");
        }
        let buf = self
            .in_flight
            .remove(&token)
            .unwrap_or_else(|| panic!("driver: token {token} returned twice or never added"));
        let reported = self.sh.reported[buf.slot].load(Ordering::Relaxed);
        assert_eq!(used.len, reported, "driver: token {token} came back with a length the device did not report");
        let mut left = used.len as usize;
        let mut pos = 0;
        for &(addr, len) in &buf.writable {
            let n = left.min(len as usize);
            let mut got = vec![0; n];
            self.mem.read(addr, &mut got);
            for (i, &b) in got.iter().enumerate() {
                assert_eq!(
                    b,
                    in_byte(token, pos + i),
                    "driver: token {token}: byte {} not what the device wrote",
                    pos + i
                );
            }
            left -= n;
            pos += n;
        }
        assert_eq!(left, 0, "driver: token {token}: length beyond its writable part");
        self.free_slots.push(buf.slot);
        self.sh.returned.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn run(mut self) -> u64 {
        let sh = self.sh;
        let _guard = StopOnDrop(sh, &sh.driver_state);
        let deadline = Instant::now() + self.cfg.duration;
        self.q.disable_cb();
        loop {
            if sh.stop.load(Ordering::Acquire) {
                break;
            }
            let sending = Instant::now() < deadline;
            let mut progress = false;
            if sending {
                let mut added = 0;
                for _ in 0..self.rng.range(1, 8) {
                    if !self.add_one() {
                        break;
                    }
                    added += 1;
                }
                if added > 0 {
                    progress = true;
                    if let Some(kick) = self.q.kick_prepare() {
                        assert!(self.q.handle().notify(kick), "driver: notify failed");
                    }
                }
            }
            for _ in 0..self.rng.range(1, 16) {
                if !self.collect_one() {
                    break;
                }
                progress = true;
            }
            if !sending && self.in_flight.is_empty() {
                break;
            }
            if progress {
                continue;
            }
            // Idle: the ring is full or sending is over, and nothing is used. Re-enable
            // interrupts and sleep unless buffers were used meanwhile.
            sh.driver_bell.clear();
            let sleep = match self.rng.range(0, 2) {
                0 => self.q.enable_cb(),
                1 => {
                    let snapshot = self.q.enable_cb_prepare();
                    !self.q.poll(snapshot)
                }
                _ => self.q.enable_cb_delayed(),
            };
            if sleep {
                sh.driver_state.store(ASLEEP, Ordering::Relaxed);
                if !sh.driver_bell.wait(&sh.stop) {
                    break;
                }
                sh.driver_state.store(RUNNING, Ordering::Relaxed);
            }
            self.q.disable_cb();
        }
        self.next_token
    }
}

struct DeviceSide<'m> {
    cfg: Config,
    sh: &'m Shared,
    q: DeviceQueue<'m, TestMemory>,
    pool: u64,
    rng: Rng,
    next_pop: u64,
    /// Popped, not yet completed: chain, segments, token, slot.
    held: VecDeque<(Chain, Vec<Segment<'m>>, u64, usize)>,
}

impl<'m> DeviceSide<'m> {
    fn pop_one(&mut self) -> bool {
        let mut segs = Vec::new();
        let chain = match self.q.pop(&mut segs) {
            Ok(Some(chain)) => chain,
            Ok(None) => return false,
            Err(e) => panic!("device: pop failed: {e}"),
        };
        let mut header = [0u8; HEADER];
        assert_eq!(segs[0].read_at(0, &mut header), HEADER, "device: first segment shorter than its header");
        let token = u64::from_le_bytes(header);
        assert_eq!(
            token, self.next_pop,
            "device: popped token {token}, expected {} (lost or duplicated)",
            self.next_pop
        );
        self.next_pop += 1;
        let slot = ((segs[0].addr() - self.pool) / SLOT_BYTES) as usize;
        // The readable bytes are the driver's, except the header.
        let mut pos = 0;
        for (j, s) in segs.iter().enumerate().filter(|(_, s)| !s.is_writable()) {
            let mut got = vec![0; s.len() as usize];
            s.read_at(0, &mut got);
            for (i, &b) in got.iter().enumerate() {
                if !(j == 0 && i < HEADER) {
                    assert_eq!(b, out_byte(token, pos + i), "device: token {token}: readable byte {} wrong", pos + i);
                }
            }
            pos += got.len();
        }
        self.sh.popped.fetch_add(1, Ordering::Relaxed);
        self.held.push_back((chain, segs, token, slot));
        true
    }

    fn complete_one(&mut self) {
        let i = if self.cfg.in_order() { 0 } else { self.rng.range(0, self.held.len() as u64 - 1) as usize };
        let (chain, segs, token, slot) = self.held.remove(i).expect("a held chain");
        let full = chain.writable_len();
        let written = if self.rng.chance(50) { full } else { self.rng.range(0, full as u64) as u32 };
        let mut left = written as usize;
        let mut pos = 0;
        for s in segs.iter().filter(|s| s.is_writable()) {
            let n = left.min(s.len() as usize);
            let data: Vec<u8> = (0..n).map(|i| in_byte(token, pos + i)).collect();
            assert_eq!(s.write_at(0, &data), n);
            left -= n;
            pos += n;
        }
        self.sh.reported[slot].store(written, Ordering::Relaxed);
        self.q.complete(chain, written);
        self.sh.completed.fetch_add(1, Ordering::Relaxed);
    }

    fn run(mut self) {
        let sh = self.sh;
        let _guard = StopOnDrop(sh, &sh.device_state);
        loop {
            if sh.stop.load(Ordering::Acquire) {
                break;
            }
            let mut popped = 0;
            for _ in 0..self.rng.range(1, 8) {
                if !self.pop_one() {
                    break;
                }
                popped += 1;
            }
            // Complete some of what is held; everything once the ring is empty, so that
            // the device never sleeps on work the driver waits for.
            let n = if popped > 0 { self.rng.range(0, self.held.len() as u64) as usize } else { self.held.len() };
            for _ in 0..n {
                self.complete_one();
            }
            if n > 0 && self.q.needs_notification() {
                sh.driver_bell.ring();
            }
            if popped > 0 || !self.held.is_empty() {
                continue;
            }
            // Idle: ask for kicks, and sleep unless a buffer slipped in meanwhile.
            sh.device_bell.clear();
            if !self.q.enable_notifications() {
                sh.device_state.store(ASLEEP, Ordering::Relaxed);
                if !sh.device_bell.wait(&sh.stop) {
                    break;
                }
                sh.device_state.store(RUNNING, Ordering::Relaxed);
            }
            self.q.disable_notifications();
        }
    }
}

/// Runs one configuration; returns the number of buffers that made the round trip.
fn run(cfg: Config) -> u64 {
    let mem = TestMemory::new(1 << 20);
    let sh = Shared {
        stop: AtomicBool::new(false),
        device_bell: Doorbell::new(cfg.lose_kicks_after),
        driver_bell: Doorbell::new(cfg.lose_interrupts_after),
        driver_state: AtomicU8::new(RUNNING),
        device_state: AtomicU8::new(RUNNING),
        added: AtomicU64::new(0),
        popped: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        returned: AtomicU64::new(0),
        reported: (0..cfg.size).map(|_| AtomicU32::new(0)).collect(),
    };
    let mut qc = QueueConfig::new(0, cfg.size, cfg.features());
    qc.indirect_max = MAX_SEGS as u16;
    let mut q: Driver<'_> = Virtqueue::new(qc, &mem, &sh.device_bell).expect("driver queue");
    let mut dc = DeviceConfig::new(cfg.size, cfg.features(), q.desc_addr(), q.avail_addr(), q.used_addr());
    if !cfg.layout.is_packed() {
        q.start_at(cfg.start);
        dc.avail_base = cfg.start;
    }
    let dq = DeviceQueue::new(&mem, dc).expect("device queue");
    let pool = mem.alloc(cfg.size as usize * SLOT_BYTES as usize, 64).expect("buffer pool");
    let driver = DriverSide {
        cfg,
        sh: &sh,
        mem: &mem,
        q,
        pool,
        rng: Rng::new(cfg.seed),
        next_token: 0,
        in_flight: BTreeMap::new(),
        free_slots: (0..cfg.size as usize).rev().collect(),
    };
    let device = DeviceSide {
        cfg,
        sh: &sh,
        q: dq,
        pool,
        rng: Rng::new(cfg.seed ^ 0xdead_beef),
        next_pop: 0,
        held: VecDeque::new(),
    };
    let started = Instant::now();
    let mut stuck = None;
    let sent = thread::scope(|s| {
        let sh = &sh;
        let drv = s.spawn(move || {
            sh.driver_bell.sleeper.set(thread::current()).expect("one driver thread");
            driver.run()
        });
        let dev = s.spawn(move || {
            sh.device_bell.sleeper.set(thread::current()).expect("one device thread");
            device.run()
        });
        // The watchdog.
        let (mut last, mut since) = (sh.progress(), Instant::now());
        while !(drv.is_finished() && dev.is_finished()) {
            thread::sleep(Duration::from_millis(10));
            let now = sh.progress();
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() > cfg.stuck_after && stuck.is_none() {
                stuck = Some(sh.diagnose(cfg.stuck_after));
                sh.stop();
            }
        }
        let sent = drv.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        dev.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        sent
    });
    if let Some(msg) = stuck {
        panic!("{cfg:?}: {msg}");
    }
    let returned = sh.returned.load(Ordering::Relaxed);
    assert_eq!(returned, sent, "{cfg:?}: every token added came back");
    assert_eq!(sh.popped.load(Ordering::Relaxed), sent);
    eprintln!(
        "{:?} event_idx={} indirect={} size={} start={:#x}: {} buffers in {:.2?}; {} kicks, {} interrupts; \
         the device slept {} times, the driver {}",
        cfg.layout,
        cfg.event_idx,
        cfg.indirect,
        cfg.size,
        cfg.start,
        sent,
        started.elapsed(),
        sh.device_bell.rings.load(Ordering::Relaxed),
        sh.driver_bell.rings.load(Ordering::Relaxed),
        sh.device_bell.sleeps.load(Ordering::Relaxed),
        sh.driver_bell.sleeps.load(Ordering::Relaxed),
    );
    sent
}

fn secs_per_config() -> Duration {
    let secs = match std::env::var("VIRTQ_STRESS_SECS") {
        Ok(s) => s.parse::<f64>().unwrap_or_else(|_| panic!("VIRTQ_STRESS_SECS={s:?} is not a number of seconds")),
        Err(_) => DEFAULT_SECS_PER_CONFIG,
    };
    Duration::from_secs_f64(secs)
}

fn seed() -> u64 {
    std::env::var("VIRTQ_STRESS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed)
}

/// Both `EVENT_IDX` settings of `layout`, with indirect descriptors on one of them, at
/// ring sizes drawn from the seed (packed sizes need not be powers of two).
fn stress(layout: LayoutKind) {
    let split = !layout.is_packed();
    let mut rng = Rng::new(seed() ^ layout as u64);
    for event_idx in [false, true] {
        let size = if split { 1 << rng.range(1, 6) } else { rng.range(1, 48) as u16 };
        let cfg = Config {
            layout,
            event_idx,
            indirect: event_idx ^ rng.chance(50),
            size,
            start: rng.range(0xf000, 0xffff) as u16,
            seed: rng.next(),
            duration: secs_per_config(),
            stuck_after: STUCK_AFTER,
            lose_kicks_after: u64::MAX,
            lose_interrupts_after: u64::MAX,
        };
        assert!(run(cfg) > 0, "{cfg:?}: no buffer made the round trip");
    }
}

#[test]
fn stress_split() {
    stress(LayoutKind::Split);
}

#[test]
fn stress_split_in_order() {
    stress(LayoutKind::SplitInOrder);
}

#[test]
fn stress_packed() {
    stress(LayoutKind::Packed);
}

#[test]
fn stress_packed_in_order() {
    stress(LayoutKind::PackedInOrder);
}

/// The harness itself: a transport that loses notifications must be caught by the
/// watchdog, which must name the side that is stuck (and not hang the test).
fn lost_notification_is_caught(layout: LayoutKind, event_idx: bool, kicks: bool) -> String {
    let cfg = Config {
        layout,
        event_idx,
        indirect: false,
        size: 4,
        start: 0xfff0,
        seed: seed(),
        duration: Duration::from_millis(100),
        stuck_after: Duration::from_millis(250),
        lose_kicks_after: if kicks { 20 } else { u64::MAX },
        lose_interrupts_after: if kicks { u64::MAX } else { 20 },
    };
    let err = std::panic::catch_unwind(|| run(cfg)).expect_err("a lossy doorbell must be caught");
    err.downcast_ref::<String>().cloned().unwrap_or_default()
}

#[test]
fn watchdog_catches_a_lost_kick() {
    for (layout, event_idx) in [(LayoutKind::Split, false), (LayoutKind::Packed, true)] {
        let msg = lost_notification_is_caught(layout, event_idx, true);
        assert!(msg.contains("the device is stuck asleep") && msg.contains("lost kick"), "{msg}");
    }
}

#[test]
fn watchdog_catches_a_lost_interrupt() {
    for (layout, event_idx) in [(LayoutKind::SplitInOrder, true), (LayoutKind::PackedInOrder, false)] {
        let msg = lost_notification_is_caught(layout, event_idx, false);
        assert!(msg.contains("the driver is stuck asleep") && msg.contains("lost interrupt"), "{msg}");
    }
}
