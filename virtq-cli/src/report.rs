//! Results of the matrix: computed from the driver's counters, printed as a table or as JSON.

use std::io::{self, Write};

use serde::Serialize;

use crate::bench::Mode;
use crate::driver_side::{DriverOutcome, LATENCY_BLOCK};
use crate::pingpong::CachelineRtt;
use crate::stats::{median, percentile, ratio};
use virtq::LayoutKind;

/// Everything one `virtq bench` run measured (the `--json` output).
#[derive(Debug, Serialize)]
pub struct Report {
    /// Ring entries.
    pub ring_size: u16,
    /// Buffers the driver took turns with (`--buffers`).
    pub buffers: u32,
    /// Features negotiated for every layout.
    pub features: Vec<&'static str>,
    /// The layouts measured, with the features that select each.
    pub layouts: Vec<LayoutInfo>,
    /// Bytes per buffer (one segment).
    pub buffer_bytes: u32,
    /// Measured time per cell.
    pub duration_ms: u64,
    /// Unmeasured warm-up per cell.
    pub warmup_ms: u64,
    /// The CPUs the two sides were meant to run on; `None` with fewer than two CPUs.
    pub cpus: Option<Cpus>,
    /// Whether every thread of every cell was pinned.
    pub pinned: bool,
    /// Median of the cache-line round trips measured during the run.
    pub cacheline_rtt_ns: Option<f64>,
    /// The fastest and the slowest line of the ping-pong's block, over the run.
    pub cacheline_rtt_line_range_ns: Option<[f64; 2]>,
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

/// A layout and the features that select it (on top of [`Report::features`]).
#[derive(Debug, Serialize)]
pub struct LayoutInfo {
    pub layout: LayoutKind,
    pub features: Vec<&'static str>,
}

impl LayoutInfo {
    pub fn new(layout: LayoutKind) -> Self {
        Self { layout, features: layout.features().names().collect() }
    }
}

/// One streaming cell.
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub layout: LayoutKind,
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
    /// The cache-line round trip measured right before the cell (polling cells only).
    pub cacheline_rtt: Option<CachelineRtt>,
    /// Involuntary context switches of the two threads in the cell: a busy machine.
    pub preemptions: Option<u64>,
}

impl Throughput {
    pub fn new(
        layout: LayoutKind,
        mode: Mode,
        batch: u16,
        d: &DriverOutcome,
        cacheline_rtt: Option<CachelineRtt>,
        preemptions: Option<u64>,
    ) -> Self {
        let (a, b) = d.window;
        let buffers = b.buffers - a.buffers;
        let seconds = (b.at - a.at).as_secs_f64();
        let (kicks, interrupts) = (b.kicks - a.kicks, b.interrupts - a.interrupts);
        Self {
            layout,
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
            cacheline_rtt,
            preemptions,
        }
    }
}

/// One request/response cell.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub layout: LayoutKind,
    pub mode: Mode,
    /// Requests timed one by one (each time includes one clock read).
    pub samples: usize,
    /// Median over blocks of requests timed together of the block's mean round trip: the
    /// figure that compares with the cache-line round trip, measured the same way.
    pub round_trip_ns: Option<f64>,
    /// Blocks timed together.
    pub blocks: usize,
    pub p50_ns: u32,
    pub p99_ns: u32,
    pub min_ns: u32,
    pub max_ns: u32,
    pub kicks_per_request: f64,
    pub interrupts_per_request: f64,
    /// The cache-line round trips measured right before and right after this cell
    /// (polling cells only).
    pub cacheline_rtt_before: Option<CachelineRtt>,
    pub cacheline_rtt_after: Option<CachelineRtt>,
    /// The mean of the two medians (or the one measured).
    pub cacheline_rtt_ns: Option<f64>,
    /// Whether the two round trips agree within [`STABLE_PLACEMENT`]: if not, the host
    /// moved a virtual CPU around the cell and the ratio below is unreliable.
    pub placement_stable: Option<bool>,
    /// `p50_ns` in cache-line round trips.
    pub p50_over_cacheline: Option<f64>,
    /// `round_trip_ns` in cache-line round trips.
    pub round_trip_over_cacheline: Option<f64>,
    /// `round_trip_ns` against the two-line exchange (mean of before and after), the floor
    /// of a split ring, whose request and response move two lines one after the other.
    pub round_trip_over_two_lines: Option<f64>,
    /// Requests checked to have come back exactly once (warm-up included).
    pub checked_buffers: u64,
    /// Involuntary context switches of the two threads in the cell: a busy machine.
    pub preemptions: Option<u64>,
}

/// The largest ratio between the round trips before and after a cell that still counts as
/// the same placement of the two virtual CPUs.
pub const STABLE_PLACEMENT: f64 = 1.5;

impl Latency {
    pub fn new(layout: LayoutKind, mode: Mode, d: &DriverOutcome, preemptions: Option<u64>) -> Self {
        let mut samples = d.samples.clone();
        samples.sort_unstable();
        let (a, b) = d.window;
        let requests = (b.buffers - a.buffers) as f64;
        Self {
            layout,
            mode,
            samples: samples.len(),
            round_trip_ns: median(&d.block_means.iter().map(|&ns| f64::from(ns)).collect::<Vec<_>>()),
            blocks: d.block_means.len(),
            p50_ns: percentile(&samples, 50),
            p99_ns: percentile(&samples, 99),
            min_ns: samples.first().copied().unwrap_or(0),
            max_ns: samples.last().copied().unwrap_or(0),
            kicks_per_request: ratio((b.kicks - a.kicks) as f64, requests),
            interrupts_per_request: ratio((b.interrupts - a.interrupts) as f64, requests),
            cacheline_rtt_before: None,
            cacheline_rtt_after: None,
            cacheline_rtt_ns: None,
            placement_stable: None,
            p50_over_cacheline: None,
            round_trip_over_cacheline: None,
            round_trip_over_two_lines: None,
            checked_buffers: d.returned.count,
            preemptions,
        }
    }

    /// Records the cache-line round trips measured around the cell and relates p50 to them.
    pub fn compare_with_cacheline(&mut self, before: Option<CachelineRtt>, after: Option<CachelineRtt>) {
        self.cacheline_rtt_before = before;
        self.cacheline_rtt_after = after;
        (self.cacheline_rtt_ns, self.placement_stable) = (None, None);
        (self.p50_over_cacheline, self.round_trip_over_cacheline, self.round_trip_over_two_lines) = (None, None, None);
        // The positive values of one figure of the two measurements.
        let measured = |figure: fn(&CachelineRtt) -> f64| -> Vec<f64> {
            [before, after].iter().flatten().map(figure).filter(|&ns| ns > 0.0).collect()
        };
        let mean = |values: &[f64]| (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64);
        let rtts = measured(|r| r.ns);
        let Some(rtt) = mean(&rtts) else { return };
        self.cacheline_rtt_ns = Some(rtt);
        if let [x, y] = rtts[..] {
            self.placement_stable = Some(x.max(y) / x.min(y) <= STABLE_PLACEMENT);
        }
        self.p50_over_cacheline = Some(f64::from(self.p50_ns) / rtt);
        self.round_trip_over_cacheline = self.round_trip_ns.map(|rt| rt / rtt);
        if let Some(two) = mean(&measured(|r| r.two_lines_ns)) {
            self.round_trip_over_two_lines = self.round_trip_ns.map(|rt| rt / two);
        }
    }
}

/// A count for a table cell, `-` when unknown.
fn count(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_string(), |n| n.to_string())
}

impl Report {
    pub fn write_json(&self, out: &mut impl Write) -> io::Result<()> {
        serde_json::to_writer_pretty(&mut *out, self)?;
        writeln!(out)
    }

    pub fn write_table(&self, out: &mut impl Write) -> io::Result<()> {
        let layouts: Vec<String> = self
            .layouts
            .iter()
            .map(|l| match l.features.as_slice() {
                [] => l.layout.to_string(),
                f => format!("{} ({})", l.layout, f.join(" | ")),
            })
            .collect();
        writeln!(
            out,
            "virtq bench: ring of {} entries, {}; one {}-byte buffer per request, {} buffers in turn",
            self.ring_size,
            self.features.join(" | "),
            self.buffer_bytes,
            self.buffers
        )?;
        writeln!(out, "layouts: {}", layouts.join(", "))?;
        let placement = match (self.cpus, self.pinned) {
            (Some(c), true) => format!("driver pinned to CPU {}, device to CPU {}", c.driver, c.device),
            (Some(_), false) => "driver and device unpinned (pinning failed)".to_string(),
            (None, _) => "driver and device unpinned (fewer than 2 CPUs)".to_string(),
        };
        writeln!(out, "{placement}; each cell: {} ms measured after {} ms warm-up", self.duration_ms, self.warmup_ms)?;
        if !self.throughput.is_empty() {
            writeln!(out)?;
            writeln!(
                out,
                "throughput: ring kept full, one kick per batch; notifications per buffer; RTT: cache-line round \
                 trip just before the cell"
            )?;
            writeln!(
                out,
                "{:<5} {:>5}  {:<15} {:>8} {:>10} {:>10} {:>11} {:>8} {:>7}",
                "mode", "batch", "layout", "Mbuf/s", "kicks/buf", "irqs/buf", "buffers", "preempt", "RTT ns"
            )?;
            let mut previous = None;
            for t in &self.throughput {
                if previous.is_some_and(|p| p != (t.mode, t.batch)) {
                    writeln!(out)?;
                }
                previous = Some((t.mode, t.batch));
                writeln!(
                    out,
                    "{:<5} {:>5}  {:<15} {:>8.2} {:>10.4} {:>10.4} {:>11} {:>8} {:>7}",
                    t.mode,
                    t.batch,
                    t.layout,
                    t.mbufs_per_sec,
                    t.kicks_per_buffer,
                    t.interrupts_per_buffer,
                    t.buffers,
                    count(t.preemptions),
                    t.cacheline_rtt.map_or_else(|| "-".to_string(), |r| format!("{:.0}", r.ns))
                )?;
            }
        }
        if !self.latency.is_empty() {
            writeln!(out)?;
            writeln!(
                out,
                "latency: one request outstanding, add+kick to get_buf; p50/p99: each request timed on its own"
            )?;
            writeln!(
                out,
                "(one clock read included); RT: median over blocks of {LATENCY_BLOCK} requests timed together of their mean;"
            )?;
            writeln!(
                out,
                "RTT: the 64 lines of a page ping-ponged in turn between the same two CPUs just before/after the \
                 cell, timed the same way as RT (RT/RTT: against their mean); RT/2L: against the same exchange \
                 over two lines, one written by each side (a split ring's two indexes)"
            )?;
            writeln!(
                out,
                "{:<5}  {:<15} {:>7} {:>7} {:>7} {:>9} {:>7} {:>6} {:>10} {:>9} {:>9} {:>8}",
                "mode",
                "layout",
                "p50 ns",
                "p99 ns",
                "RT ns",
                "RTT ns",
                "RT/RTT",
                "RT/2L",
                "kicks/req",
                "irqs/req",
                "samples",
                "preempt"
            )?;
            for l in &self.latency {
                let rtt = match (l.cacheline_rtt_before, l.cacheline_rtt_after) {
                    (Some(a), Some(b)) => format!("{:.0}/{:.0}", a.ns, b.ns),
                    (Some(r), None) | (None, Some(r)) => format!("{:.0}", r.ns),
                    (None, None) => "-".to_string(),
                };
                let x = match (l.round_trip_over_cacheline, l.placement_stable) {
                    (Some(x), Some(false)) => format!("{x:.2}x?"),
                    (Some(x), _) => format!("{x:.2}x"),
                    (None, _) => "-".to_string(),
                };
                writeln!(
                    out,
                    "{:<5}  {:<15} {:>7} {:>7} {:>7} {:>9} {:>7} {:>6} {:>10.4} {:>9.4} {:>9} {:>8}",
                    l.mode,
                    l.layout,
                    l.p50_ns,
                    l.p99_ns,
                    l.round_trip_ns.map_or_else(|| "-".to_string(), |ns| format!("{ns:.0}")),
                    rtt,
                    x,
                    l.round_trip_over_two_lines.map_or_else(|| "-".to_string(), |x| format!("{x:.2}x")),
                    l.kicks_per_request,
                    l.interrupts_per_request,
                    l.samples,
                    count(l.preemptions)
                )?;
            }
            if self.latency.iter().any(|l| l.placement_stable == Some(false)) {
                writeln!(
                    out,
                    "?: the round trip changed more than {STABLE_PLACEMENT}x across the cell (the host moved a virtual CPU)"
                )?;
            }
            if let Some(rtt) = self.cacheline_rtt_ns {
                write!(out, "cache-line round trip, median over the run: {rtt:.0} ns")?;
                if let Some([fastest, slowest]) = self.cacheline_rtt_line_range_ns {
                    write!(out, " (single lines from {fastest:.0} to {slowest:.0} ns)")?;
                }
                writeln!(out)?;
            }
        }
        let checked: u64 = self.throughput.iter().map(|t| t.checked_buffers).sum::<u64>()
            + self.latency.iter().map(|l| l.checked_buffers).sum::<u64>();
        writeln!(out, "(preempt: involuntary context switches of the two pinned threads in the cell)")?;
        writeln!(out)?;
        writeln!(out, "checked: all {checked} buffers came back exactly once; total {:.1} s", self.total_seconds)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::driver_side::{Snapshot, TokenCheck};

    fn latency_cell(samples: Vec<u32>, block_means: Vec<f32>) -> Latency {
        let at = Instant::now();
        let snap = Snapshot { at, buffers: 0, kicks: 0, interrupts: 0 };
        let d = DriverOutcome { added: 0, returned: TokenCheck::default(), window: (snap, snap), samples, block_means };
        Latency::new(LayoutKind::Packed, Mode::Poll, &d, Some(3))
    }

    fn rtt(ns: f64) -> Option<CachelineRtt> {
        Some(CachelineRtt {
            ns,
            min_ns: ns,
            fastest_line_ns: ns,
            slowest_line_ns: ns,
            two_lines_ns: 2.0 * ns,
            round_trips: 100,
        })
    }

    #[test]
    fn p50_against_the_mean_round_trip_and_placement_check() {
        let mut l = latency_cell(vec![300, 100, 200], vec![140.0, 105.0, 120.0]);
        assert_eq!((l.p50_ns, l.p99_ns, l.min_ns, l.max_ns), (200, 300, 100, 300));
        assert_eq!((l.round_trip_ns, l.blocks), (Some(120.0), 3));
        assert_eq!((l.p50_over_cacheline, l.round_trip_over_cacheline), (None, None));

        l.compare_with_cacheline(rtt(60.0), rtt(80.0));
        assert_eq!(l.cacheline_rtt_ns, Some(70.0));
        assert_eq!(l.placement_stable, Some(true));
        assert!((l.p50_over_cacheline.unwrap() - 200.0 / 70.0).abs() < 1e-9);
        assert!((l.round_trip_over_cacheline.unwrap() - 120.0 / 70.0).abs() < 1e-9);
        // The test round trips put the two-line exchange at twice each line (140 ns).
        assert!((l.round_trip_over_two_lines.unwrap() - 120.0 / 140.0).abs() < 1e-9);

        // The host moved a virtual CPU: 65 ns before, 300 ns after.
        l.compare_with_cacheline(rtt(65.0), rtt(300.0));
        assert_eq!(l.placement_stable, Some(false));

        // Only one measurement: no verdict on placement, ratio against that one.
        l.compare_with_cacheline(None, rtt(100.0));
        assert_eq!((l.placement_stable, l.p50_over_cacheline), (None, Some(2.0)));
    }

    #[test]
    fn no_block_timed_together_means_no_round_trip() {
        let mut l = latency_cell(vec![100], Vec::new());
        l.compare_with_cacheline(rtt(50.0), rtt(50.0));
        assert_eq!((l.round_trip_ns, l.round_trip_over_cacheline), (None, None));
        assert_eq!(l.p50_over_cacheline, Some(2.0));
    }
}
