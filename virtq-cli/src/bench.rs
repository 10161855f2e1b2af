//! `virtq bench`: the driver and the device on two threads of this process, sharing one
//! ring in one block of memory, measured over a matrix of layouts, modes and batch sizes.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, ScopedJoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;
use virtq::testing::TestMemory;

use crate::affinity;
use crate::device_side;
use crate::driver_side::{self, DriverOutcome};
use crate::layout::{with_layout, BenchLayout, BASE_FEATURES};
use crate::notify::Control;
use crate::pingpong::{self, CachelineRtt};
use crate::report::{self, Latency, LayoutInfo, Report, Throughput};
use crate::stats::median;
use virtq::LayoutKind;

/// Bytes in each buffer (one segment; the device does not touch them).
pub const BUF_LEN: u32 = 64;

/// A side that has made no progress for this long is taken to be hung.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the watchdog looks at the progress counters.
const WATCHDOG_TICK: Duration = Duration::from_millis(50);

/// Exit status when the watchdog finds a hung side.
pub const EXIT_STALLED: i32 = 3;

/// How the two sides wait when they have nothing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Busy-poll, with kicks and interrupts suppressed.
    Poll,
    /// Sleep, and wake only on a kick (device) or an interrupt (driver).
    Sleep,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Poll => "poll",
            Self::Sleep => "sleep",
        })
    }
}

/// What the driver does in one cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Keep the ring full, `batch` buffers per kick.
    Stream { batch: u16 },
    /// One buffer outstanding at a time.
    Latency,
}

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct Settings {
    pub ring_size: u16,
    /// Buffers the driver takes turns with: the ring size, or a multiple of it.
    pub buffers: u32,
    pub layouts: Vec<LayoutKind>,
    pub batches: Vec<u16>,
    pub modes: Vec<Mode>,
    /// Measured time per cell.
    pub duration: Duration,
    /// Unmeasured time at the start of each cell (caches, branch predictors, CPU clocks).
    pub warmup: Duration,
    /// Measured time of each cache-line ping-pong (one before each polling latency cell).
    pub pingpong: Duration,
}

/// The timing parameters one cell's driver needs.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub ring_size: u16,
    pub buffers: u32,
    pub warmup: Duration,
    pub duration: Duration,
    /// Room for latency samples, allocated before the timed loop.
    pub max_samples: usize,
}

impl Settings {
    fn timing(&self) -> Timing {
        // One sample per 100 ns of measured time covers the fastest round trip two cores
        // can do; past 8 M samples (32 MiB) a cell just ends early.
        let max_samples = (self.duration.as_micros() * 10).clamp(1_000, 8_000_000) as usize;
        Timing {
            ring_size: self.ring_size,
            buffers: self.buffers,
            warmup: self.warmup,
            duration: self.duration,
            max_samples,
        }
    }

    /// The cells in the order they run: per mode, each batch size on every layout in turn,
    /// then latency on every layout. Neighbouring cells are close in time, so layouts are
    /// compared under the same conditions even when the machine's speed drifts.
    fn cells(&self) -> Vec<(LayoutKind, Mode, Workload)> {
        let mut cells = Vec::new();
        for &mode in &self.modes {
            for &batch in &self.batches {
                cells.extend(self.layouts.iter().map(|&l| (l, mode, Workload::Stream { batch })));
            }
            cells.extend(self.layouts.iter().map(|&l| (l, mode, Workload::Latency)));
        }
        cells
    }
}

/// Runs the whole matrix, printing progress on stderr.
pub fn run(settings: &Settings) -> Result<Report, String> {
    let started = Instant::now();
    let cpus = affinity::plan();
    let cells = settings.cells();
    let timing = settings.timing();
    let mut throughput = Vec::new();
    let mut latency = Vec::new();
    let mut rtts = Vec::new();
    let mut pinned = cpus.is_some();
    let width = cells.len().to_string().len();
    for (i, &(layout, mode, workload)) in cells.iter().enumerate() {
        let what = match workload {
            Workload::Stream { batch } => format!("throughput batch {batch:>4}"),
            Workload::Latency => "latency".to_string(),
        };
        let name = format!("{layout} {mode} {}", what.split_whitespace().collect::<Vec<_>>().join(" "));
        eprint!("[{:>width$}/{}] {layout:<15} {mode:<5} {what:<21} ... ", i + 1, cells.len());
        // Right before each polling cell (and after each polling latency cell), where the
        // host has the two virtual CPUs: the floor a polling cell is compared with, and
        // the key to its variation between runs.
        let rtt_before =
            if mode == Mode::Poll { measure_rtt(cpus, settings.pingpong, &mut rtts, ("", "; ")) } else { None };
        let cell = with_layout!(layout, L => run_cell::<L>(mode, workload, timing, cpus, &name)).map_err(|e| {
            eprintln!("failed");
            format!("{name}: {e}")
        })?;
        pinned &= cell.pinned;
        let d = &cell.driver;
        match workload {
            Workload::Stream { batch } => {
                let t = Throughput::new(layout, mode, batch, d, rtt_before, cell.preemptions);
                eprintln!(
                    "{:.2} M buffers/s, {:.4} kicks/buf, {:.4} irqs/buf",
                    t.mbufs_per_sec, t.kicks_per_buffer, t.interrupts_per_buffer
                );
                throughput.push(t);
            }
            Workload::Latency => {
                let mut l = Latency::new(layout, mode, d, cell.preemptions);
                eprint!("p50 {} ns, p99 {} ns", l.p50_ns, l.p99_ns);
                if let Some(rt) = l.round_trip_ns {
                    eprint!(", RT {rt:.0} ns");
                }
                if mode == Mode::Poll {
                    let rtt_after = measure_rtt(cpus, settings.pingpong, &mut rtts, ("; after: ", ""));
                    l.compare_with_cacheline(rtt_before, rtt_after);
                }
                eprintln!();
                latency.push(l);
            }
        }
    }
    let rtt_medians: Vec<f64> = rtts.iter().map(|r| r.ns).collect();
    Ok(Report {
        ring_size: settings.ring_size,
        buffers: settings.buffers,
        features: BASE_FEATURES.names().collect(),
        layouts: settings.layouts.iter().map(|&l| LayoutInfo::new(l)).collect(),
        buffer_bytes: BUF_LEN,
        duration_ms: settings.duration.as_millis() as u64,
        warmup_ms: settings.warmup.as_millis() as u64,
        cpus: cpus.map(|(driver, device)| report::Cpus { driver, device }),
        pinned,
        cacheline_rtt_ns: median(&rtt_medians),
        cacheline_rtt_line_range_ns: pingpong::line_range(&rtts),
        throughput,
        latency,
        total_seconds: started.elapsed().as_secs_f64(),
    })
}

/// One cache-line ping-pong, reported on the progress line (between `around.0` and
/// `around.1`) and kept in `all`.
fn measure_rtt(
    cpus: Option<(usize, usize)>,
    duration: Duration,
    all: &mut Vec<CachelineRtt>,
    (prefix, suffix): (&str, &str),
) -> Option<CachelineRtt> {
    match pingpong::measure(cpus, duration) {
        Ok(r) => {
            eprint!("{prefix}RTT {:.0} ns{suffix}", r.ns);
            all.push(r);
            Some(r)
        }
        Err(why) => {
            eprint!("{prefix}no RTT ({why}){suffix}");
            None
        }
    }
}

struct CellOutcome {
    driver: DriverOutcome,
    pinned: bool,
    preemptions: Option<u64>,
}

/// Runs one cell on two fresh threads and checks that every buffer came back once.
fn run_cell<L: BenchLayout>(
    mode: Mode,
    workload: Workload,
    timing: Timing,
    cpus: Option<(usize, usize)>,
    name: &str,
) -> Result<CellOutcome, String> {
    // Ring, plus one buffer per entry, plus slack for alignment: each cell gets fresh
    // memory because `TestMemory` never reuses what it handed out.
    let mem = TestMemory::new(ring_memory(timing.ring_size, timing.buffers));
    let ctl = Control::default();
    let (to_device, from_driver) = mpsc::sync_channel(1);
    let (mem, ctl_ref) = (&mem, &ctl);
    let pair = run_pair(
        &ctl,
        cpus,
        name,
        move || driver_side::run::<L>(mem, ctl_ref, to_device, mode, workload, timing),
        move || device_side::run::<L>(mem, ctl_ref, from_driver, mode),
    )?;
    // The device's error explains the driver's ("the device side gave up"), so it
    // comes first.
    let popped = pair.device?;
    let driver = pair.driver?;
    driver.returned.verify(driver.added)?;
    if popped != driver.added {
        return Err(format!("the driver added {} buffers but the device popped {popped}", driver.added));
    }
    Ok(CellOutcome { driver, pinned: pair.pinned, preemptions: pair.preemptions })
}

/// Guest memory for one ring of `size` entries (any layout) and one buffer per entry.
pub fn ring_memory(size: u16, buffers: u32) -> usize {
    usize::from(size) * 32 + buffers as usize * BUF_LEN as usize + (64 << 10)
}

/// What the two threads of [`run_pair`] returned.
pub struct Pair<A, B> {
    pub driver: A,
    pub device: B,
    /// Whether both threads were pinned.
    pub pinned: bool,
    /// Involuntary context switches of the two threads over their lives (see
    /// [`affinity::involuntary_switches`]).
    pub preemptions: Option<u64>,
}

/// Runs `driver` and `device` on two fresh threads, pinned to `cpus.0` and `cpus.1`
/// (each registered as the waiter of its doorbell in `ctl`), under the watchdog.
pub fn run_pair<A: Send, B: Send>(
    ctl: &Control,
    cpus: Option<(usize, usize)>,
    name: &str,
    driver: impl FnOnce() -> A + Send,
    device: impl FnOnce() -> B + Send,
) -> Result<Pair<A, B>, String> {
    thread::scope(|s| {
        let driver = thread::Builder::new()
            .name("virtq-driver".into())
            .spawn_scoped(s, move || {
                let pinned = pin(cpus.map(|c| c.0), "driver");
                ctl.driver_bell.register_waiter();
                let result = driver();
                (result, pinned, affinity::involuntary_switches())
            })
            .map_err(|e| format!("cannot start the driver thread: {e}"))?;
        let device = match thread::Builder::new().name("virtq-device".into()).spawn_scoped(s, move || {
            let pinned = pin(cpus.map(|c| c.1), "device");
            ctl.device_bell.register_waiter();
            let result = device();
            (result, pinned, affinity::involuntary_switches())
        }) {
            Ok(h) => h,
            Err(e) => {
                // The driver thread may be waiting for the device: let it go. (The
                // device's ends of the channels were dropped with its closure.)
                ctl.stop();
                return Err(format!("cannot start the device thread: {e}"));
            }
        };
        watchdog(ctl, &driver, &device, name);
        let (driver, driver_pinned, a) = driver.join().map_err(|_| "the driver thread panicked".to_string())?;
        let (device, device_pinned, b) = device.join().map_err(|_| "the device thread panicked".to_string())?;
        Ok(Pair { driver, device, pinned: driver_pinned && device_pinned, preemptions: a.zip(b).map(|(a, b)| a + b) })
    })
}

/// Pins the calling thread to `cpu`; on failure, says so once per process and goes on
/// unpinned (the numbers are then noisier, not wrong).
pub fn pin(cpu: Option<usize>, side: &str) -> bool {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let Some(cpu) = cpu else { return false };
    match affinity::pin_current_thread(cpu) {
        Ok(()) => true,
        Err(e) => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                eprintln!("warning: cannot pin the {side} thread to CPU {cpu}: {e}; running unpinned");
            }
            false
        }
    }
}

/// Waits for both threads to finish. If a side still running makes no progress for
/// [`STALL_TIMEOUT`], the process exits: a hung thread cannot be joined, and the scope
/// would otherwise wait for it forever.
fn watchdog<A, B>(ctl: &Control, driver: &ScopedJoinHandle<'_, A>, device: &ScopedJoinHandle<'_, B>, name: &str) {
    let start = Instant::now();
    // (side, last progress seen, when it last changed)
    let mut sides = [("driver", u64::MAX, start), ("device", u64::MAX, start)];
    loop {
        let finished = [driver.is_finished(), device.is_finished()];
        if finished.iter().all(|&f| f) {
            return;
        }
        thread::sleep(WATCHDOG_TICK);
        let now = Instant::now();
        let progress = [ctl.driver_progress.load(Ordering::Relaxed), ctl.device_progress.load(Ordering::Relaxed)];
        let mut stalled = Vec::new();
        for ((side, last, since), (&done, &p)) in sides.iter_mut().zip(finished.iter().zip(&progress)) {
            if done || p != *last {
                (*last, *since) = (p, now);
            } else if now - *since >= STALL_TIMEOUT {
                stalled.push(*side);
            }
        }
        if !stalled.is_empty() {
            eprintln!();
            eprintln!(
                "error: {name}: the {} made no progress for {} s \
                 (driver got {} buffers back, device popped {}); aborting",
                stalled.join(" and the "),
                STALL_TIMEOUT.as_secs(),
                progress[0],
                progress[1],
            );
            std::process::exit(EXIT_STALLED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(layouts: Vec<LayoutKind>, batches: Vec<u16>, modes: Vec<Mode>) -> Settings {
        Settings {
            ring_size: 64,
            buffers: 64,
            layouts,
            batches,
            modes,
            duration: Duration::from_millis(20),
            warmup: Duration::from_millis(4),
            pingpong: Duration::from_millis(5),
        }
    }

    #[test]
    fn cells_interleave_layouts_within_each_batch() {
        let s = settings(vec![LayoutKind::Split, LayoutKind::Packed], vec![1, 8], vec![Mode::Poll, Mode::Sleep]);
        let cells = s.cells();
        assert_eq!(cells.len(), 2 * (2 + 1) * 2);
        assert_eq!(cells[0], (LayoutKind::Split, Mode::Poll, Workload::Stream { batch: 1 }));
        assert_eq!(cells[1], (LayoutKind::Packed, Mode::Poll, Workload::Stream { batch: 1 }));
        assert_eq!(cells[2], (LayoutKind::Split, Mode::Poll, Workload::Stream { batch: 8 }));
        assert_eq!(cells[4], (LayoutKind::Split, Mode::Poll, Workload::Latency));
        assert_eq!(cells[11], (LayoutKind::Packed, Mode::Sleep, Workload::Latency));
    }

    /// Every layout, both modes, a batch that is not a divisor of the ring and one that
    /// fills it: every buffer must come back exactly once (checked inside `run_cell`).
    #[test]
    fn every_layout_streams_and_round_trips_correctly() {
        let s = settings(LayoutKind::ALL.to_vec(), vec![3, 64], vec![Mode::Poll, Mode::Sleep]);
        let timing = s.timing();
        for (layout, mode, workload) in s.cells() {
            let name = format!("{layout} {mode} {workload:?}");
            let cell = with_layout!(layout, L => run_cell::<L>(mode, workload, timing, None, &name))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(cell.driver.added > 0, "{name}: nothing moved");
        }
    }

    /// With more buffers than ring entries each lap puts new addresses into the
    /// descriptors: every buffer still comes back exactly once (checked inside
    /// `run_cell`). The measured window waits for a first lap of the pool, however slow
    /// the machine.
    #[test]
    fn a_pool_larger_than_the_ring_streams_correctly() {
        let mut s = settings(LayoutKind::ALL.to_vec(), vec![32], vec![Mode::Poll]);
        s.buffers = 4 * u32::from(s.ring_size);
        let timing = s.timing();
        for layout in LayoutKind::ALL {
            let name = format!("{layout} with {} buffers", s.buffers);
            let cell = with_layout!(layout, L => run_cell::<L>(Mode::Poll, Workload::Stream { batch: 32 }, timing, None, &name))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(cell.driver.added >= u64::from(s.buffers), "{name}: not one lap of the pool");
        }
    }
}
