//! Results: computed from the driver's counters, printed as a table or as JSON.

use std::io::{self, Write};

use serde::Serialize;

use crate::bench::Mode;
use crate::driver_side::DriverOutcome;

/// Everything one `virtq bench` run measured (the `--json` output).
#[derive(Debug, Serialize)]
pub struct Report {
    /// Ring entries.
    pub ring_size: u16,
    /// Negotiated features.
    pub features: Vec<&'static str>,
    /// Bytes per buffer (one device-readable segment).
    pub buffer_bytes: u32,
    /// Measured time per cell.
    pub duration_ms: u64,
    /// Unmeasured warm-up per cell.
    pub warmup_ms: u64,
    /// The CPUs the two sides were meant to run on; `None` with fewer than two CPUs.
    pub cpus: Option<Cpus>,
    /// Whether every thread of every cell was pinned.
    pub pinned: bool,
    pub throughput: Vec<Throughput>,
    pub latency: Vec<Latency>,
    /// Wall time of the whole matrix.
    pub total_seconds: f64,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Cpus {
    pub driver: usize,
    pub device: usize,
}

/// One streaming cell.
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub mode: Mode,
    /// Buffers added per kick.
    pub batch: u16,
    /// Millions of buffers round-tripped per second in the measured window.
    pub mbufs_per_sec: f64,
    /// Buffers back in the measured window.
    pub buffers: u64,
    pub seconds: f64,
    /// Driver-to-device notifications in the window.
    pub kicks: u64,
    /// Device-to-driver notifications in the window.
    pub interrupts: u64,
    pub kicks_per_buffer: f64,
    pub interrupts_per_buffer: f64,
    /// Buffers checked to have come back exactly once (warm-up and drain included).
    pub checked_buffers: u64,
}

impl Throughput {
    pub fn new(mode: Mode, batch: u16, d: &DriverOutcome) -> Self {
        let (a, b) = d.window;
        let buffers = b.buffers - a.buffers;
        let seconds = (b.at - a.at).as_secs_f64();
        let (kicks, interrupts) = (b.kicks - a.kicks, b.interrupts - a.interrupts);
        Self {
            mode,
            batch,
            mbufs_per_sec: ratio(buffers as f64, seconds) / 1e6,
            buffers,
            seconds,
            kicks,
            interrupts,
            kicks_per_buffer: ratio(kicks as f64, buffers as f64),
            interrupts_per_buffer: ratio(interrupts as f64, buffers as f64),
            checked_buffers: d.returned.count,
        }
    }
}

/// One request/response cell.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub mode: Mode,
    /// Round trips measured.
    pub samples: usize,
    pub p50_ns: u32,
    pub p99_ns: u32,
    pub min_ns: u32,
    pub max_ns: u32,
    pub kicks_per_request: f64,
    pub interrupts_per_request: f64,
    /// Requests checked to have come back exactly once (warm-up included).
    pub checked_buffers: u64,
}

impl Latency {
    pub fn new(mode: Mode, d: &DriverOutcome) -> Self {
        let mut samples = d.samples.clone();
        samples.sort_unstable();
        let (a, b) = d.window;
        let requests = (b.buffers - a.buffers) as f64;
        Self {
            mode,
            samples: samples.len(),
            p50_ns: percentile(&samples, 50),
            p99_ns: percentile(&samples, 99),
            min_ns: samples.first().copied().unwrap_or(0),
            max_ns: samples.last().copied().unwrap_or(0),
            kicks_per_request: ratio((b.kicks - a.kicks) as f64, requests),
            interrupts_per_request: ratio((b.interrupts - a.interrupts) as f64, requests),
            checked_buffers: d.returned.count,
        }
    }
}

/// `a / b`, or 0 for an empty window (a very short cell on a busy machine).
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Nearest-rank percentile of sorted samples (0 for none).
fn percentile(sorted: &[u32], pct: usize) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * pct).div_ceil(100).max(1);
    sorted[rank - 1]
}

impl Report {
    pub fn write_json(&self, out: &mut impl Write) -> io::Result<()> {
        serde_json::to_writer_pretty(&mut *out, self)?;
        writeln!(out)
    }

    pub fn write_table(&self, out: &mut impl Write) -> io::Result<()> {
        writeln!(
            out,
            "virtq bench: split ring of {} entries, {}; one {}-byte readable buffer per request",
            self.ring_size,
            self.features.join(" | "),
            self.buffer_bytes
        )?;
        let placement = match (self.cpus, self.pinned) {
            (Some(c), true) => format!("driver pinned to CPU {}, device to CPU {}", c.driver, c.device),
            (Some(_), false) => "driver and device unpinned (pinning failed)".to_string(),
            (None, _) => "driver and device unpinned (fewer than 2 CPUs)".to_string(),
        };
        writeln!(out, "{placement}; each cell: {} ms measured after {} ms warm-up", self.duration_ms, self.warmup_ms)?;
        if !self.throughput.is_empty() {
            writeln!(out)?;
            writeln!(out, "throughput: ring kept full, one kick per batch")?;
            writeln!(
                out,
                "{:<6} {:>5} {:>10} {:>10} {:>10} {:>12}",
                "mode", "batch", "Mbuf/s", "kicks/buf", "irqs/buf", "buffers"
            )?;
            for t in &self.throughput {
                writeln!(
                    out,
                    "{:<6} {:>5} {:>10.2} {:>10.4} {:>10.4} {:>12}",
                    t.mode, t.batch, t.mbufs_per_sec, t.kicks_per_buffer, t.interrupts_per_buffer, t.buffers
                )?;
            }
        }
        if !self.latency.is_empty() {
            writeln!(out)?;
            writeln!(out, "latency: one request outstanding, add+kick to get_buf")?;
            writeln!(
                out,
                "{:<6} {:>10} {:>10} {:>10} {:>10} {:>10}",
                "mode", "p50 ns", "p99 ns", "kicks/req", "irqs/req", "samples"
            )?;
            for l in &self.latency {
                writeln!(
                    out,
                    "{:<6} {:>10} {:>10} {:>10.4} {:>10.4} {:>10}",
                    l.mode, l.p50_ns, l.p99_ns, l.kicks_per_request, l.interrupts_per_request, l.samples
                )?;
            }
        }
        let checked: u64 = self.throughput.iter().map(|t| t.checked_buffers).sum::<u64>()
            + self.latency.iter().map(|l| l.checked_buffers).sum::<u64>();
        writeln!(out)?;
        writeln!(out, "checked: all {checked} buffers came back exactly once; total {:.1} s", self.total_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[], 50), 0);
        assert_eq!(percentile(&[1, 2, 3], 50), 2);
    }
}
