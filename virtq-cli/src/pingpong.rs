//! The machine's cache-line round trip: two pinned threads bounce a cache line back and
//! forth. It is the floor under the ring's polling latency: a request and its response
//! cannot cost less than one round trip of a line between the two cores, and usually move
//! several lines.
//!
//! The round trip differs from line to line: on a mesh (Intel's server parts) each line's
//! coherence goes through a home agent chosen by its address, nearer one core or the
//! other, and the lines of one page can differ by nearly a factor of two in the same run,
//! while a ring's requests move through all the lines of its page. A single line would
//! give a figure drawn at random from that range, so the threads time each line of a 4 KiB
//! block in turn (the descriptors of a 256-entry packed ring fill such a block), and the
//! round trip is the mean over the lines, with the fastest and the slowest line beside it.
//!
//! The same exchange over two lines, where each side writes one and reads the other (a
//! split ring's avail index and used index, which the layout cannot put on one line),
//! takes about twice as long as one line: it is the floor under a split ring's round trip,
//! and is measured beside the other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bench::pin;
use crate::stats::median;

/// One line, aligned so that nothing else shares it.
#[repr(align(64))]
struct Line(AtomicU64);

/// Lines in the block: one 4 KiB page.
const LINES: usize = 64;

/// The lines the two threads bounce.
#[repr(align(4096))]
struct Block([Line; LINES]);

impl Block {
    fn new() -> Box<Self> {
        Box::new(Block(std::array::from_fn(|_| Line(AtomicU64::new(0)))))
    }

    fn line(&self, i: usize) -> &AtomicU64 {
        &self.0[i].0
    }
}

/// Round trips between two clock reads, all on one line: enough that the clock's cost
/// (tens of ns) is spread out to under 1 ns per round trip, few enough that most samples
/// fall between two preemptions on a busy machine (each line's median then ignores the
/// others). A round trip that also moves to the next line costs more than one that stays,
/// so moves are not timed.
const ROUNDS_PER_SAMPLE: u32 = 64;

/// The value that tells the pong thread to exit (odd, like a ping).
const STOP: u64 = u64::MAX;

/// A ping: odd, and carrying the line the pong thread is to answer on and the line it is
/// to watch next. `seq` grows, so that a line never holds the same value twice and a wait
/// cannot end on an old answer.
fn ping_value(seq: u64, answer: usize, next: usize) -> u64 {
    seq << 13 | (answer as u64) << 7 | (next as u64) << 1 | 1
}

/// The line a ping sends the pong thread to next.
fn next_line(ping: u64) -> usize {
    (ping >> 1) as usize & (LINES - 1)
}

/// The line the pong thread answers a ping on.
fn answer_line(ping: u64) -> usize {
    (ping >> 7) as usize & (LINES - 1)
}

/// Samples wanted at least of every line, even past the planned duration (a preempted
/// thread can make one sample last longer than the whole measurement)...
const MIN_SAMPLES: usize = 5;
/// ... but never for longer than this many planned durations.
const MAX_OVERRUN: u32 = 20;

/// One ping-pong measurement.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CachelineRtt {
    /// The round trip: the mean over the block's lines of each line's median sample.
    pub ns: f64,
    /// The fastest sample on a line alone.
    pub min_ns: f64,
    /// The median of the fastest line...
    pub fastest_line_ns: f64,
    /// ... and of the slowest.
    pub slowest_line_ns: f64,
    /// The same exchange over two lines, each written by one side and read by the other,
    /// as a split ring's avail index (driver to device) and used index (device to driver):
    /// the mean over the block's lines, each paired with the line half a block away.
    pub two_lines_ns: f64,
    /// Round trips timed (warm-up excluded).
    pub round_trips: u64,
}

/// Bounces the lines between `cpus.0` (ping, the driver's CPU) and `cpus.1` (pong, the
/// device's CPU), the lines of the block in turn, for about `duration` after a warm-up of
/// a fifth of it. Both sides wait with the same spin hint (`pause` on x86) as the ring's
/// polling loops. Fails, saying why, when there is no CPU pair to pin to, a thread cannot
/// be started, or no sample completed.
pub fn measure(cpus: Option<(usize, usize)>, duration: Duration) -> Result<CachelineRtt, &'static str> {
    let (ping_cpu, pong_cpu) = cpus.ok_or("no CPU pair to pin to")?;
    let block = Block::new();
    thread::scope(|s| {
        let block = &*block;
        let pong = thread::Builder::new()
            .name("virtq-pong".into())
            .spawn_scoped(s, move || {
                pin(Some(pong_cpu), "pong");
                pong_loop(block)
            })
            .map_err(|_| "cannot start a thread")?;
        let ping = thread::Builder::new().name("virtq-ping".into()).spawn_scoped(s, move || {
            pin(Some(ping_cpu), "ping");
            ping_loop(block, duration, ROUNDS_PER_SAMPLE)
        });
        let per_line = match ping {
            Ok(h) => h.join().map_err(|_| "the ping thread panicked"),
            Err(_) => {
                // The pong thread still watches line 0.
                block.line(0).store(STOP, Ordering::Release);
                Err("cannot start a thread")
            }
        };
        pong.join().map_err(|_| "the pong thread panicked")?;
        let (one, two) = per_line?;
        summarize(&one, &two).ok_or("no sample completed in time")
    })
}

/// The measurement from each line's samples (ns per round trip) on that line alone and
/// paired; `None` if a line has none.
fn summarize(per_line: &[Vec<f64>], two_lines: &[Vec<f64>]) -> Option<CachelineRtt> {
    let medians = |lines: &[Vec<f64>]| lines.iter().map(|samples| median(samples)).collect::<Option<Vec<f64>>>();
    let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
    let (alone, paired) = (medians(per_line)?, medians(two_lines)?);
    let samples = per_line.iter().chain(two_lines).map(Vec::len).sum::<usize>();
    Some(CachelineRtt {
        ns: mean(&alone),
        min_ns: per_line.iter().flatten().copied().fold(f64::INFINITY, f64::min),
        fastest_line_ns: alone.iter().copied().fold(f64::INFINITY, f64::min),
        slowest_line_ns: alone.iter().copied().fold(0.0, f64::max),
        two_lines_ns: mean(&paired),
        round_trips: samples as u64 * u64::from(ROUNDS_PER_SAMPLE),
    })
}

/// The fastest and the slowest single line over several measurements.
pub fn line_range(rtts: &[CachelineRtt]) -> Option<[f64; 2]> {
    let fastest = rtts.iter().map(|r| r.fastest_line_ns).fold(f64::INFINITY, f64::min);
    let slowest = rtts.iter().map(|r| r.slowest_line_ns).fold(0.0, f64::max);
    (!rtts.is_empty()).then_some([fastest, slowest])
}

/// Answers every ping (odd value) on the line it watches with the next even value, on the
/// line the ping names, then watches the line the ping names; until [`STOP`].
fn pong_loop(block: &Block) {
    let mut line = 0;
    // A ping answered on another line stays where it is: it must not be answered again.
    let mut answered = 0;
    loop {
        let v = block.line(line).load(Ordering::Acquire);
        if v == STOP {
            return;
        }
        if v & 1 == 1 && v != answered {
            answered = v;
            block.line(answer_line(v)).store(v + 1, Ordering::Release);
            line = next_line(v);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// The ping side: the line the pong thread watches, and the sequence number of the pings.
struct Ping<'a> {
    block: &'a Block,
    watched: usize,
    seq: u64,
}

impl Ping<'_> {
    /// One round trip: a ping on the watched line, answered on `answer`; the pong thread
    /// then watches `next`.
    fn round_trip(&mut self, answer: usize, next: usize) {
        self.seq += 1;
        let ping = ping_value(self.seq, answer, next);
        self.block.line(self.watched).store(ping, Ordering::Release);
        let answer = self.block.line(answer);
        while answer.load(Ordering::Acquire) != ping + 1 {
            std::hint::spin_loop();
        }
        self.watched = next;
    }
}

/// Each line's samples, alone and paired (see [`CachelineRtt::two_lines_ns`]).
type Samples = (Vec<Vec<f64>>, Vec<Vec<f64>>);

/// Sends pings and waits for each pong: for each line of the block in turn, a sample of
/// `rounds` round trips on the line alone and one with the answers on its pair, sweep
/// after sweep, until `duration` has passed. Returns each line's samples, in ns per round
/// trip.
fn ping_loop(block: &Block, duration: Duration, rounds: u32) -> Samples {
    let start = Instant::now();
    let measure_from = start + duration / 5;
    let measure_until = measure_from + duration;
    let give_up = measure_from + duration * MAX_OVERRUN;
    let mut per_line: Vec<Vec<f64>> = (0..LINES).map(|_| Vec::with_capacity(256)).collect();
    let mut two_lines = per_line.clone();
    let mut ping = Ping { block, watched: 0, seq: 0 };
    loop {
        let now = Instant::now();
        if (now >= measure_until && per_line.iter().all(|s| s.len() >= MIN_SAMPLES)) || now >= give_up {
            break;
        }
        for line in 0..LINES {
            // Untimed: the round trip that sends the pong thread to `line`.
            ping.round_trip(ping.watched, line);
            let pair = (line + LINES / 2) % LINES;
            for (answer, samples) in [(line, &mut per_line[line]), (pair, &mut two_lines[line])] {
                let t0 = Instant::now();
                for _ in 0..rounds {
                    ping.round_trip(answer, line);
                }
                if t0 >= measure_from {
                    samples.push(t0.elapsed().as_nanos() as f64 / f64::from(rounds));
                }
            }
        }
    }
    block.line(ping.watched).store(STOP, Ordering::Release);
    (per_line, two_lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_pong_visits_every_line_and_ends() {
        // Unpinned, and with tiny samples: both threads may share one busy CPU here, where
        // each round trip can cost a time slice. Only the shape of the result is checked;
        // the planned 100 ms (2 s at most, for the samples every line needs) is ample on a
        // machine that is busy with other work too.
        let block = Block::new();
        let (per_line, two_lines) = thread::scope(|s| {
            s.spawn(|| pong_loop(&block));
            ping_loop(&block, Duration::from_millis(100), 2)
        });
        for samples in [&per_line, &two_lines] {
            assert_eq!(samples.len(), LINES);
            assert!(samples.iter().all(|s| s.len() >= MIN_SAMPLES));
            assert!(samples.iter().flatten().all(|&ns| ns.is_finite() && ns > 0.0));
        }
        let rtt = summarize(&per_line, &two_lines).unwrap();
        assert!(rtt.two_lines_ns > 0.0);
        assert!(rtt.fastest_line_ns <= rtt.ns && rtt.ns <= rtt.slowest_line_ns);
        assert!(rtt.min_ns <= rtt.fastest_line_ns);
        // Every line got pings (an answered ping leaves an even, non-zero value), and the
        // pong thread was told to stop on the line it watched.
        let stopped: Vec<usize> = (0..LINES).filter(|&i| block.line(i).load(Ordering::Relaxed) == STOP).collect();
        assert_eq!(stopped.len(), 1);
        for i in (0..LINES).filter(|&i| i != stopped[0]) {
            let v = block.line(i).load(Ordering::Relaxed);
            assert!(v != 0 && v.is_multiple_of(2), "line {i} holds {v}");
        }
        assert_eq!(std::mem::align_of::<Block>(), 4096);
        assert_eq!(std::mem::size_of::<Block>(), 4096);
    }

    #[test]
    fn a_ping_names_the_next_line_and_never_repeats() {
        for (answer, next) in [(0, 0), (1, 33), (LINES - 1, 0), (LINES - 1, LINES - 1)] {
            let v = ping_value(12345, answer, next);
            assert_eq!(v & 1, 1);
            assert_eq!((answer_line(v), next_line(v)), (answer, next));
            assert_ne!(v, STOP);
        }
        assert_ne!(ping_value(1, 5, 5), ping_value(2, 5, 5));
    }

    #[test]
    fn the_round_trip_is_the_mean_of_the_lines_medians() {
        let rtt =
            summarize(&[vec![100.0, 900.0, 110.0], vec![300.0, 290.0, 310.0]], &[vec![400.0], vec![600.0]]).unwrap();
        assert_eq!(rtt.ns, 205.0);
        assert_eq!(rtt.two_lines_ns, 500.0);
        assert_eq!((rtt.fastest_line_ns, rtt.slowest_line_ns, rtt.min_ns), (110.0, 300.0, 100.0));
        assert_eq!(rtt.round_trips, 8 * u64::from(ROUNDS_PER_SAMPLE));
        assert!(summarize(&[vec![100.0], vec![]], &[vec![1.0], vec![1.0]]).is_none());
        assert!(summarize(&[vec![100.0]], &[vec![]]).is_none());
    }

    #[test]
    fn no_cpu_pair_means_no_measurement() {
        assert!(measure(None, Duration::from_millis(1)).is_err());
    }
}
