//! `virtq bench`: the driver and the device on two threads of this process, sharing one
//! split ring in one block of memory, measured over a matrix of modes and batch sizes.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, ScopedJoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;
use virtq::testing::TestMemory;
use virtq::Features;

use crate::affinity;
use crate::device_side;
use crate::driver_side::{self, DriverOutcome};
use crate::notify::Control;
use crate::report::{self, Latency, Report, Throughput};

/// What the two ends negotiate. No `INDIRECT_DESC`: every buffer is a single segment,
/// which never uses an indirect table anyway.
pub const FEATURES: Features = Features::VERSION_1.union(Features::EVENT_IDX);

/// Names of [`FEATURES`], for the report.
pub const FEATURE_NAMES: [&str; 2] = ["VERSION_1", "EVENT_IDX"];

/// Bytes in each buffer (one device-readable segment; the device does not touch them).
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
    pub batches: Vec<u16>,
    pub modes: Vec<Mode>,
    /// Measured time per cell.
    pub duration: Duration,
    /// Unmeasured time at the start of each cell (caches, branch predictors, CPU clocks).
    pub warmup: Duration,
}

/// The timing parameters one cell's driver needs.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub ring_size: u16,
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
        Timing { ring_size: self.ring_size, warmup: self.warmup, duration: self.duration, max_samples }
    }
}

/// Runs the whole matrix, printing progress on stderr.
pub fn run(settings: &Settings) -> Result<Report, String> {
    let started = Instant::now();
    let cpus = affinity::plan();
    let cells: Vec<(Mode, Workload)> = settings
        .modes
        .iter()
        .flat_map(|&mode| {
            let streams = settings.batches.iter().map(move |&batch| (mode, Workload::Stream { batch }));
            streams.chain([(mode, Workload::Latency)])
        })
        .collect();
    let timing = settings.timing();
    let mut throughput = Vec::new();
    let mut latency = Vec::new();
    let mut pinned = cpus.is_some();
    for (i, &(mode, workload)) in cells.iter().enumerate() {
        // Padded for the progress lines, plain for error messages.
        let (label, name) = match workload {
            Workload::Stream { batch } => {
                (format!("throughput {mode:<5} batch {batch:>4}"), format!("throughput {mode} batch {batch}"))
            }
            Workload::Latency => (format!("latency    {mode:<5}           "), format!("latency {mode}")),
        };
        eprint!("[{:>2}/{}] {label} ... ", i + 1, cells.len());
        let cell = run_cell(mode, workload, timing, cpus, &name).map_err(|e| {
            eprintln!("failed");
            format!("{name}: {e}")
        })?;
        pinned &= cell.pinned;
        let d = &cell.driver;
        match workload {
            Workload::Stream { batch } => {
                let t = Throughput::new(mode, batch, d);
                eprintln!("{:.2} M buffers/s", t.mbufs_per_sec);
                throughput.push(t);
            }
            Workload::Latency => {
                let l = Latency::new(mode, d);
                eprintln!("p50 {} ns, p99 {} ns", l.p50_ns, l.p99_ns);
                latency.push(l);
            }
        }
    }
    Ok(Report {
        ring_size: settings.ring_size,
        features: FEATURE_NAMES.to_vec(),
        buffer_bytes: BUF_LEN,
        duration_ms: settings.duration.as_millis() as u64,
        warmup_ms: settings.warmup.as_millis() as u64,
        cpus: cpus.map(|(driver, device)| report::Cpus { driver, device }),
        pinned,
        throughput,
        latency,
        total_seconds: started.elapsed().as_secs_f64(),
    })
}

struct CellOutcome {
    driver: DriverOutcome,
    pinned: bool,
}

/// Runs one cell on two fresh threads and checks that every buffer came back once.
fn run_cell(
    mode: Mode,
    workload: Workload,
    timing: Timing,
    cpus: Option<(usize, usize)>,
    name: &str,
) -> Result<CellOutcome, String> {
    // Ring, plus one buffer per entry, plus slack for alignment: each cell gets fresh
    // memory because `TestMemory` never reuses what it handed out.
    let size = usize::from(timing.ring_size);
    let mem = TestMemory::new(size * (32 + BUF_LEN as usize) + (64 << 10));
    let ctl = Control::default();
    let (to_device, from_driver) = mpsc::sync_channel(1);
    thread::scope(|s| {
        let (mem, ctl) = (&mem, &ctl);
        let driver = thread::Builder::new()
            .name("virtq-driver".into())
            .spawn_scoped(s, move || {
                let pinned = pin(cpus.map(|c| c.0), "driver");
                ctl.driver_bell.register_waiter();
                let outcome = driver_side::run(mem, ctl, to_device, mode, workload, timing);
                (outcome, pinned)
            })
            .map_err(|e| format!("cannot start the driver thread: {e}"))?;
        let device = match thread::Builder::new().name("virtq-device".into()).spawn_scoped(s, move || {
            let pinned = pin(cpus.map(|c| c.1), "device");
            ctl.device_bell.register_waiter();
            (device_side::run(mem, ctl, from_driver, mode), pinned)
        }) {
            Ok(h) => h,
            Err(e) => {
                // The driver thread is waiting for the device to take the ring: let it go.
                ctl.stop();
                return Err(format!("cannot start the device thread: {e}"));
            }
        };
        watchdog(ctl, &driver, &device, name);
        let (driver, driver_pinned) = driver.join().map_err(|_| "the driver thread panicked".to_string())?;
        let (device, device_pinned) = device.join().map_err(|_| "the device thread panicked".to_string())?;
        // The device's error explains the driver's ("the device side gave up"), so it
        // comes first.
        let popped = device?;
        let driver = driver?;
        driver.returned.verify(driver.added)?;
        if popped != driver.added {
            return Err(format!("the driver added {} buffers but the device popped {popped}", driver.added));
        }
        Ok(CellOutcome { driver, pinned: driver_pinned && device_pinned })
    })
}

/// Pins the calling thread to `cpu`; on failure, says so once per process and goes on
/// unpinned (the numbers are then noisier, not wrong).
fn pin(cpu: Option<usize>, side: &str) -> bool {
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
