//! Test traffic: frames that carry their queue, a sequence number and a checksum, and a
//! loop that sends them through a forwarding device and verifies what comes back.
//!
//! The CLI's `virtq net loop` and the tests against DPDK's testpmd (`io` or `macswap`
//! forwarding) run [`run_loop`] on each queue pair.
//!
//! A test frame (every field little-endian):
//!
//! ```text
//!  0  destination MAC   6  source MAC      (not checked: macswap swaps them)
//! 12  ethertype 0x88b5 (IEEE local experimental)
//! 14  magic "VQLP"     18  u16 queue pair  20  u16 reserved
//! 22  u64 sequence     30  u32 frame length
//! 34  u64 checksum of bytes 14..34 and of the payload
//! 42  payload: pseudo-random bytes seeded by (queue, sequence)
//! ```
//!
//! Each received frame is checked: ethertype, magic, length, queue and checksum
//! (otherwise it is *corrupted*); then its sequence number against the queue's: below the
//! highest seen, it is a *duplicate* if that number was seen before, else *out of order*.
//! Numbers never seen by the end are *dropped*: counted and reported, not an error.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::driver::{NetError, QueuePair, RxFrame};

/// `IEEE 802` local experimental ethertype 1.
pub const ETHERTYPE: u16 = 0x88b5;
/// The magic after the Ethernet header.
pub const MAGIC: [u8; 4] = *b"VQLP";
/// Bytes before the payload.
pub const HEADER_LEN: usize = 42;
/// The smallest test frame (the Ethernet minimum without FCS).
pub const MIN_FRAME: usize = 60;

const SUMMED: std::ops::Range<usize> = 14..34;
const CSUM_AT: usize = 34;

/// A streaming 64-bit checksum over bytes that may arrive in pieces of any length: words
/// of 8 bytes folded in with a multiply, a partial word carried to the next piece.
#[derive(Clone, Copy, Debug)]
pub struct Checksum {
    h: u64,
    carry: [u8; 8],
    carry_len: usize,
    total: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    /// An empty checksum.
    pub const fn new() -> Self {
        Self { h: 0x243f_6a88_85a3_08d3, carry: [0; 8], carry_len: 0, total: 0 }
    }

    #[inline(always)]
    fn word(&mut self, w: u64) {
        self.h = (self.h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }

    /// Adds `bytes`.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if self.carry_len > 0 {
            let take = (8 - self.carry_len).min(bytes.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&bytes[..take]);
            self.carry_len += take;
            bytes = &bytes[take..];
            if self.carry_len < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.carry));
            self.carry_len = 0;
        }
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes(w.try_into().unwrap_or_default()));
        }
        let rest = words.remainder();
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carry_len = rest.len();
    }

    /// The checksum of everything added.
    pub fn finish(mut self) -> u64 {
        let mut last = [0u8; 8];
        last[..self.carry_len].copy_from_slice(&self.carry[..self.carry_len]);
        self.word(u64::from_le_bytes(last));
        self.word(self.total);
        self.h
    }
}

/// xorshift64*: the frame sizes and payloads, reproducible from a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        let span = (hi - lo) as u64 + 1;
        lo + ((self.next_u64() as u128 * span as u128) >> 64) as usize
    }
}

/// Writes test frame `seq` of queue pair `queue`, `len` bytes (at least [`MIN_FRAME`]),
/// into `buf`; returns `len`.
pub fn write_frame(buf: &mut [u8], src_mac: [u8; 6], queue: u16, seq: u64, len: usize) -> usize {
    let len = len.clamp(MIN_FRAME, buf.len());
    let f = &mut buf[..len];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(&MAGIC);
    f[18..20].copy_from_slice(&queue.to_le_bytes());
    f[20..22].fill(0);
    f[22..30].copy_from_slice(&seq.to_le_bytes());
    f[30..34].copy_from_slice(&(len as u32).to_le_bytes());
    let mut rng = Rng::new(seq ^ (queue as u64) << 48);
    let mut words = f[HEADER_LEN..].chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let rest = words.into_remainder();
    let last = rng.next_u64().to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&last[..n]);
    let mut c = Checksum::new();
    c.update(&f[SUMMED]);
    c.update(&f[HEADER_LEN..]);
    f[CSUM_AT..CSUM_AT + 8].copy_from_slice(&c.finish().to_le_bytes());
    len
}

/// Why a received frame is not a valid test frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than the test header.
    Short,
    /// Not the test ethertype or magic.
    Foreign,
    /// The length field differs from the bytes received.
    Length {
        /// The length field.
        claimed: u32,
        /// Bytes received.
        received: usize,
    },
    /// The checksum differs.
    Checksum,
}

/// The queue pair and sequence number of a valid test frame.
pub fn check_frame(frame: &RxFrame<'_>) -> Result<(u16, u64), FrameError> {
    check_segments(frame.len(), frame.segments())
}

/// [`check_frame`] for a frame of `len` bytes given as consecutive segments.
pub fn check_segments<'a>(len: usize, segments: impl Iterator<Item = &'a [u8]>) -> Result<(u16, u64), FrameError> {
    if len < HEADER_LEN {
        return Err(FrameError::Short);
    }
    let mut head = [0u8; HEADER_LEN];
    // The header may straddle buffers in a mergeable frame: gather it, then checksum the
    // rest of the frame piece by piece, without copying it.
    let mut c = Checksum::new();
    let (mut have, mut total) = (0, 0);
    for seg in segments {
        total += seg.len();
        let take = (HEADER_LEN - have).min(seg.len());
        head[have..have + take].copy_from_slice(&seg[..take]);
        if have < HEADER_LEN && have + take == HEADER_LEN {
            c.update(&head[SUMMED]);
        }
        have += take;
        c.update(&seg[take..]);
    }
    if head[12..14] != ETHERTYPE.to_be_bytes() || head[14..18] != MAGIC {
        return Err(FrameError::Foreign);
    }
    let claimed = u32::from_le_bytes([head[30], head[31], head[32], head[33]]);
    if claimed as usize != len || total != len {
        return Err(FrameError::Length { claimed, received: len });
    }
    let mut sum = [0u8; 8];
    sum.copy_from_slice(&head[CSUM_AT..CSUM_AT + 8]);
    if c.finish() != u64::from_le_bytes(sum) {
        return Err(FrameError::Checksum);
    }
    let queue = u16::from_le_bytes([head[18], head[19]]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&head[22..30]);
    Ok((queue, u64::from_le_bytes(seq)))
}

/// Which sequence numbers of one queue arrived: a window of the last [`SeqTracker::WINDOW`]
/// numbers below the highest seen.
#[derive(Debug)]
pub struct SeqTracker {
    seen: Vec<u64>,
    /// One past the highest number seen (0: none yet).
    next: u64,
}

/// What one arrival was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Beyond every number seen so far: in order (maybe after a gap of drops).
    InOrder,
    /// Seen before.
    Duplicate,
    /// Below the highest seen, and not seen before (or too old to tell).
    OutOfOrder,
}

impl Default for SeqTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl SeqTracker {
    /// Numbers remembered below the highest seen.
    pub const WINDOW: u64 = 1 << 20;

    /// A tracker with nothing seen.
    pub fn new() -> Self {
        Self { seen: vec![0; (Self::WINDOW / 64) as usize], next: 0 }
    }

    fn bit(&mut self, seq: u64) -> (&mut u64, u64) {
        let i = (seq % Self::WINDOW) as usize;
        (&mut self.seen[i / 64], 1 << (i % 64))
    }

    /// Records `seq`.
    pub fn arrive(&mut self, seq: u64) -> Arrival {
        if seq >= self.next {
            // Clear the bits of the numbers skipped over (and of the window they push out).
            let from = self.next.max(seq.saturating_sub(Self::WINDOW - 1));
            for s in from..seq {
                let (w, b) = self.bit(s);
                *w &= !b;
            }
            let (w, b) = self.bit(seq);
            *w |= b;
            self.next = seq + 1;
            return Arrival::InOrder;
        }
        if seq + Self::WINDOW < self.next {
            return Arrival::OutOfOrder;
        }
        let (w, b) = self.bit(seq);
        if *w & b != 0 {
            Arrival::Duplicate
        } else {
            *w |= b;
            Arrival::OutOfOrder
        }
    }

    /// One past the highest number seen.
    pub fn next(&self) -> u64 {
        self.next
    }
}

/// What to send in [`run_loop`].
#[derive(Clone, Debug)]
pub struct LoopOptions {
    /// Frames to send on this pair (0: until `duration` or `stop`).
    pub frames: u64,
    /// Longest run (`None`: until `frames` are sent).
    pub duration: Option<Duration>,
    /// Smallest frame (at least [`MIN_FRAME`]).
    pub min_size: usize,
    /// Largest frame (at most the queue's largest).
    pub max_size: usize,
    /// Frames per transmit burst.
    pub burst: usize,
    /// Frames in flight at most (sent, no later one received yet).
    pub window: usize,
    /// Seed of the frame sizes.
    pub seed: u64,
    /// Give up on frames in flight after this long without any arrival: they count as
    /// dropped (the device lost them), and sending resumes.
    pub idle_timeout: Duration,
    /// Fail the run after this long without any progress (nothing sent, nothing received).
    pub stall_timeout: Duration,
}

impl Default for LoopOptions {
    fn default() -> Self {
        Self {
            frames: 1_000_000,
            duration: None,
            min_size: MIN_FRAME,
            max_size: 1514,
            burst: 32,
            window: 64,
            seed: 1,
            idle_timeout: Duration::from_millis(200),
            stall_timeout: Duration::from_secs(5),
        }
    }
}

/// What [`run_loop`] found on one pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopReport {
    /// The queue pair.
    pub pair: u16,
    /// Frames sent.
    pub sent: u64,
    /// Frames received that are valid test frames of this pair.
    pub received: u64,
    /// Frame bytes received.
    pub bytes: u64,
    /// Frames sent and never received.
    pub dropped: u64,
    /// Frames that failed the checks (including test frames of another pair).
    pub corrupted: u64,
    /// Frames received twice.
    pub duplicated: u64,
    /// Frames received after a later one.
    pub out_of_order: u64,
    /// Frames received that are not test frames at all.
    pub foreign: u64,
    /// Largest frame sent.
    pub largest: usize,
    /// Frames that spanned more than one receive buffer.
    pub multi_buffer: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl LoopReport {
    /// Whether every frame that arrived was an intact test frame of this pair, unique and
    /// in order.
    pub fn clean(&self) -> bool {
        self.corrupted == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.foreign == 0
    }
}

/// Sends test frames on `pair` and verifies those that come back, until `opts.frames` are
/// sent and answered (or given up), `opts.duration` passes or `stop` is set. `progress`
/// counts frames received. Fails if the queues fail (a disconnect, a device fault) or
/// nothing moves for `opts.stall_timeout`; the report covers the run up to there.
pub fn run_loop(
    pair: &mut QueuePair,
    src_mac: [u8; 6],
    opts: &LoopOptions,
    progress: &AtomicU64,
    stop: &AtomicBool,
) -> (LoopReport, Result<(), NetError>) {
    let queue = pair.rx.pair();
    let max_size = opts.max_size.min(pair.tx.max_frame()).max(MIN_FRAME);
    let min_size = opts.min_size.clamp(MIN_FRAME, max_size);
    let mut sizes = Rng::new(opts.seed ^ (queue as u64).wrapping_mul(0x51_7cc1_b727_220a));
    let mut tracker = SeqTracker::new();
    let mut r = LoopReport { pair: queue, ..Default::default() };
    let start = Instant::now();
    let end = opts.duration.map(|d| start + d);
    // Frames sent before this number were given up on: they no longer hold the window.
    let mut given_up_below = 0u64;
    let mut last_arrival = start;
    let mut last_progress = start;
    let mut spins = 0u32;
    let finish = |mut r: LoopReport, received_unique: u64| {
        r.dropped = r.sent.saturating_sub(received_unique);
        r.elapsed = start.elapsed();
        r
    };
    let mut unique = 0u64;
    let mut unreported = 0u64;
    let (mut sent_since_check, mut received_since_check, mut restart_idle) = (false, false, false);
    loop {
        let sending = (opts.frames == 0 || r.sent < opts.frames) && !stop.load(Ordering::Relaxed);
        let in_flight = r.sent - tracker.next().max(given_up_below);
        if sending && (in_flight as usize) < opts.window {
            let n = opts.burst.min(opts.window - in_flight as usize);
            let n = if opts.frames > 0 { n.min((opts.frames - r.sent) as usize) } else { n };
            let base = r.sent;
            let mut largest = r.largest;
            let sent = pair.tx.send_with(n, |i, slot| {
                let len = sizes.range(min_size, max_size);
                largest = largest.max(len);
                write_frame(slot, src_mac, queue, base + i as u64, len)
            });
            match sent {
                Ok(k) => {
                    if k > 0 {
                        sent_since_check = true;
                        // Nothing was in flight: the wait for an arrival starts now.
                        restart_idle |= in_flight == 0;
                    }
                    r.sent += k as u64;
                    r.largest = largest;
                }
                Err(e) => return (finish(r, unique), Err(e)),
            }
        }
        let got = pair.rx.recv(opts.burst * 2, |frame| match check_frame(&frame) {
            Ok((q, seq)) if q == queue => {
                if frame.num_buffers() > 1 {
                    r.multi_buffer += 1;
                }
                match tracker.arrive(seq) {
                    Arrival::InOrder => {
                        r.received += 1;
                        unique += 1;
                        r.bytes += frame.len() as u64;
                    }
                    Arrival::Duplicate => r.duplicated += 1,
                    Arrival::OutOfOrder => {
                        r.out_of_order += 1;
                        unique += 1;
                        r.received += 1;
                    }
                }
            }
            Ok(_) => r.corrupted += 1,
            Err(FrameError::Foreign) => r.foreign += 1,
            Err(_) => r.corrupted += 1,
        });
        match got {
            Ok(0) => {}
            Ok(k) => {
                unreported += k as u64;
                received_since_check = true;
            }
            Err(e) => return (finish(r, unique), Err(e)),
        }
        let done_sending = !((opts.frames == 0 || r.sent < opts.frames) && !stop.load(Ordering::Relaxed));
        let outstanding = r.sent - tracker.next().max(given_up_below);
        if done_sending && outstanding == 0 {
            break;
        }
        spins = spins.wrapping_add(1);
        // The clock and the shared counter now and then, not per burst: a clock read costs
        // as much as a burst of small frames, and `progress` is shared by the pairs.
        if spins.is_multiple_of(256) {
            progress.fetch_add(std::mem::take(&mut unreported), Ordering::Relaxed);
            let now = Instant::now();
            if std::mem::take(&mut received_since_check) {
                (last_arrival, last_progress) = (now, now);
            }
            if std::mem::take(&mut sent_since_check) {
                last_progress = now;
            }
            if std::mem::take(&mut restart_idle) {
                last_arrival = now;
            }
            if end.is_some_and(|e| now >= e) {
                stop.store(true, Ordering::Relaxed);
            }
            if outstanding > 0 && now.duration_since(last_arrival) >= opts.idle_timeout {
                // The device lost the frames in flight (or holds them): stop waiting for
                // them. If they come after all, they count as out of order.
                given_up_below = r.sent;
                last_arrival = now;
                if done_sending {
                    break;
                }
            }
            if now.duration_since(last_progress) >= opts.stall_timeout {
                let err = if pair.rx.is_connected() {
                    NetError::Timeout(now.duration_since(last_progress))
                } else {
                    super::driver::QueueError::Disconnected.into()
                };
                return (finish(r, unique), Err(err));
            }
            if now.duration_since(last_progress) >= Duration::from_millis(2) && !pair.rx.is_connected() {
                return (finish(r, unique), Err(super::driver::QueueError::Disconnected.into()));
            }
        }
    }
    progress.fetch_add(unreported, Ordering::Relaxed);
    (finish(r, unique), Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_does_not_depend_on_how_bytes_are_split() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut whole = Checksum::new();
        whole.update(&data);
        let whole = whole.finish();
        for cut in [0, 1, 7, 8, 9, 500, 999] {
            let mut c = Checksum::new();
            c.update(&data[..cut]);
            c.update(&data[cut..]);
            assert_eq!(c.finish(), whole, "cut at {cut}");
        }
        let mut flipped = data.clone();
        flipped[321] ^= 4;
        let mut c = Checksum::new();
        c.update(&flipped);
        assert_ne!(c.finish(), whole);
        // Trailing zero bytes change the sum (the length is in it).
        let mut c = Checksum::new();
        c.update(&data);
        c.update(&[0]);
        assert_ne!(c.finish(), whole);
    }

    #[test]
    fn test_frames_verify_whole_and_in_pieces() {
        let mac = [2, 0, 0, 0, 0, 1];
        for len in [MIN_FRAME, 61, 1514, 9000] {
            let mut buf = vec![0u8; 9000];
            assert_eq!(write_frame(&mut buf, mac, 3, 77, len), len);
            let f = &buf[..len];
            assert_eq!(check_segments(len, [f].into_iter()), Ok((3, 77)));
            // Split inside the header and inside the payload, as mergeable buffers split it.
            for cut in [5, 20, HEADER_LEN, len - 1] {
                assert_eq!(check_segments(len, [&f[..cut], &f[cut..]].into_iter()), Ok((3, 77)), "{len} cut {cut}");
            }
            let mut bad = f.to_vec();
            bad[len - 1] ^= 1;
            assert_eq!(check_segments(len, [&bad[..]].into_iter()), Err(FrameError::Checksum));
            let mut seq = f.to_vec();
            seq[22] ^= 1;
            assert_eq!(check_segments(len, [&seq[..]].into_iter()), Err(FrameError::Checksum));
            // Swapped MACs (testpmd's macswap) still verify.
            let mut swapped = f.to_vec();
            swapped.copy_within(6..12, 0);
            swapped[6..12].fill(0xff);
            assert_eq!(check_segments(len, [&swapped[..]].into_iter()), Ok((3, 77)));
            assert!(matches!(check_segments(len - 1, [&f[..len - 1]].into_iter()), Err(FrameError::Length { .. })));
        }
        let mut other = [0u8; 60];
        other[12] = 8;
        assert_eq!(check_segments(60, [&other[..]].into_iter()), Err(FrameError::Foreign));
    }

    #[test]
    fn tracker_tells_duplicates_from_reordering() {
        let mut t = SeqTracker::new();
        assert_eq!(t.arrive(0), Arrival::InOrder);
        assert_eq!(t.arrive(1), Arrival::InOrder);
        // 2 and 3 are missing for now.
        assert_eq!(t.arrive(4), Arrival::InOrder);
        assert_eq!(t.arrive(4), Arrival::Duplicate);
        assert_eq!(t.arrive(1), Arrival::Duplicate);
        assert_eq!(t.arrive(3), Arrival::OutOfOrder);
        assert_eq!(t.arrive(3), Arrival::Duplicate);
        assert_eq!(t.next(), 5);
        // Far ahead, then something older than the window.
        assert_eq!(t.arrive(5 + SeqTracker::WINDOW * 2), Arrival::InOrder);
        assert_eq!(t.arrive(2), Arrival::OutOfOrder);
        // Numbers skipped over are not remembered as seen.
        assert_eq!(t.arrive(6 + SeqTracker::WINDOW), Arrival::OutOfOrder);
    }
}
