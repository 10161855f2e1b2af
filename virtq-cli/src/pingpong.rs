//! The machine's cache-line round trip: two pinned threads bounce one 64-byte-aligned
//! cache line (an `AtomicU64`) back and forth. It is the floor under the ring's polling
//! latency: a request and its response cannot cost less than one round trip of a line
//! between the two cores, and usually move several lines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bench::pin;
use crate::stats::median;

/// The line the two threads bounce. Aligned to a line of its own, so that nothing else
/// shares it.
#[repr(align(64))]
struct Line(AtomicU64);

/// Round trips between two clock reads: enough that the clock's cost (tens of ns) is
/// spread out to well under 1 ns per round trip, few enough that most samples fall
/// between two preemptions on a busy machine (the median then ignores the others).
const ROUNDS_PER_SAMPLE: u32 = 100;

/// The value that tells the pong thread to exit. Pings are odd, pongs even.
const STOP: u64 = u64::MAX;

/// Samples wanted at least, even past the planned duration (a preempted thread can make
/// one sample last longer than the whole measurement)...
const MIN_SAMPLES: usize = 5;
/// ... but never for longer than this many planned durations.
const MAX_OVERRUN: u32 = 20;

/// One ping-pong measurement.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CachelineRtt {
    /// Median over the samples of the mean round trip within each sample.
    pub median_ns: f64,
    /// The fastest sample's mean round trip.
    pub min_ns: f64,
    /// Round trips timed (warm-up excluded).
    pub round_trips: u64,
}

/// Bounces the line between `cpus.0` (ping, the driver's CPU) and `cpus.1` (pong, the
/// device's CPU) for about `duration` after a warm-up of a fifth of it. Both sides wait
/// with the same spin hint (`pause` on x86) as the ring's polling loops. Fails, saying
/// why, when there is no CPU pair to pin to, a thread cannot be started, or no sample
/// completed.
pub fn measure(cpus: Option<(usize, usize)>, duration: Duration) -> Result<CachelineRtt, &'static str> {
    let (ping_cpu, pong_cpu) = cpus.ok_or("no CPU pair to pin to")?;
    let line = Line(AtomicU64::new(0));
    thread::scope(|s| {
        let line = &line;
        let pong = thread::Builder::new()
            .name("virtq-pong".into())
            .spawn_scoped(s, move || {
                pin(Some(pong_cpu), "pong");
                pong_loop(&line.0)
            })
            .map_err(|_| "cannot start a thread")?;
        let ping = thread::Builder::new().name("virtq-ping".into()).spawn_scoped(s, move || {
            pin(Some(ping_cpu), "ping");
            ping_loop(&line.0, duration, ROUNDS_PER_SAMPLE)
        });
        let samples = match ping {
            Ok(h) => h.join().map_err(|_| "the ping thread panicked"),
            Err(_) => {
                line.0.store(STOP, Ordering::Release);
                Err("cannot start a thread")
            }
        };
        pong.join().map_err(|_| "the pong thread panicked")?;
        let samples = samples?;
        Ok(CachelineRtt {
            median_ns: median(&samples).ok_or("no sample completed in time")?,
            min_ns: samples.iter().copied().fold(f64::INFINITY, f64::min),
            round_trips: samples.len() as u64 * u64::from(ROUNDS_PER_SAMPLE),
        })
    })
}

/// Answers every ping (odd value) with the next even value, until [`STOP`].
fn pong_loop(line: &AtomicU64) {
    loop {
        let v = line.load(Ordering::Acquire);
        if v == STOP {
            return;
        }
        if v & 1 == 1 {
            line.store(v + 1, Ordering::Release);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Sends pings and waits for each pong; returns the mean round trip of each sample of
/// `rounds` round trips, in ns.
fn ping_loop(line: &AtomicU64, duration: Duration, rounds: u32) -> Vec<f64> {
    let start = Instant::now();
    let measure_from = start + duration / 5;
    let measure_until = measure_from + duration;
    let give_up = measure_from + duration * MAX_OVERRUN;
    let mut samples = Vec::with_capacity(4096);
    let mut v = 0u64;
    loop {
        let t0 = Instant::now();
        if (t0 >= measure_until && samples.len() >= MIN_SAMPLES) || t0 >= give_up {
            break;
        }
        for _ in 0..rounds {
            v += 1;
            line.store(v, Ordering::Release);
            v += 1;
            while line.load(Ordering::Acquire) != v {
                std::hint::spin_loop();
            }
        }
        if t0 >= measure_from {
            samples.push(t0.elapsed().as_nanos() as f64 / f64::from(rounds));
        }
    }
    line.store(STOP, Ordering::Release);
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_pong_measures_something_and_ends() {
        // Unpinned, and with tiny samples: both threads may share one busy CPU here, where
        // each round trip can cost a time slice. Only the shape of the result is checked.
        let line = Line(AtomicU64::new(0));
        let samples = thread::scope(|s| {
            s.spawn(|| pong_loop(&line.0));
            ping_loop(&line.0, Duration::from_millis(20), 2)
        });
        assert!(!samples.is_empty());
        assert!(samples.iter().all(|&ns| ns.is_finite() && ns > 0.0));
        assert_eq!(line.0.load(Ordering::Relaxed), STOP);
        assert_eq!(std::mem::align_of::<Line>(), 64);
    }

    #[test]
    fn no_cpu_pair_means_no_measurement() {
        assert!(measure(None, Duration::from_millis(1)).is_err());
    }
}
