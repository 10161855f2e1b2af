//! `virtq bench --ringtest`: the protocol of Linux's `tools/virtio/ringtest` (`main.c`
//! with `virtio_ring_0_9.c`, default parameters), so that its numbers compare with that C
//! benchmark's.
//!
//! - Ring of 256 entries, batch 1, both sides polling, no notifications at all: the driver
//!   queue has no callbacks (interrupts suppressed from the start), never kicks, and the
//!   device never enables kicks.
//! - The driver (`run_guest`): in one loop, adds a single 'in' buffer (one writable
//!   segment) while fewer than a ring's worth are outstanding, and reaps one used buffer
//!   with `get_buf`; when neither happened it spins until a used buffer shows
//!   (`poll_used`). It ends when `run_cycles` buffers came back.
//! - The device (`run_host`): spins until a buffer is available (`poll_avail`), then
//!   pops, completes and publishes them one at a time (`use_buf`), in order, with the
//!   buffer's full length, until `run_cycles`.
//! - A busy wait re-reads the ring with nothing but a compiler barrier, as ringtest's
//!   `busy_wait` does unless `--relax` asks for `cpu_relax` (`pause`).
//! - Driver and device pinned to two CPUs; the time is from the start signal to the last
//!   buffer back.
//!
//! Besides ringtest's figures, each run shows the cache-line round trip measured right
//! before it (where the host had put the two virtual CPUs), and each layout its per-side
//! cost with both ends on one thread (the floor without cache-line transfers).
//!
//! The layouts alternate in rounds (A B C D A B C D ...) and each is reported as its
//! median over rounds: on a machine whose virtual CPUs move between host cores, absolute
//! speed drifts several-fold over seconds, and alternation spreads the drift evenly.

use std::io::{self, Write};
use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::{Duration, Instant};

use serde::Serialize;
use virtq::testing::TestMemory;
use virtq::{DeviceConfig, QueueConfig, Segments, Sg};

use crate::affinity;
use crate::bench::{ring_memory, run_pair, BUF_LEN};
use crate::driver_side::{device_config, Queue};
use crate::layout::{self, with_layout, BenchLayout, BASE_FEATURES};
use crate::notify::{Control, Kicker};
use crate::pingpong::{self, CachelineRtt};
use crate::report::{Cpus, LayoutInfo};
use crate::stats::median;
use virtq::{Device, DeviceLayout, LayoutKind};

/// The progress counters the watchdog reads are updated every this many buffers (a power
/// of two), to keep even that store out of most iterations.
const PROGRESS_EVERY: u64 = 1024;

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct Settings {
    pub ring_size: u16,
    /// Buffers per run (ringtest's `--run-cycles`).
    pub run_cycles: u64,
    pub rounds: u32,
    pub layouts: Vec<LayoutKind>,
    /// Measured time of the cache-line ping-pong before each run.
    pub pingpong: Duration,
    /// Spin with the CPU's spin hint (`pause`), as ringtest's `--relax`; by default a
    /// busy wait only re-reads the ring, as ringtest's does.
    pub relax: bool,
}

/// One run of one layout.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub layout: LayoutKind,
    /// 1-based.
    pub round: u32,
    pub seconds: f64,
    pub mbufs_per_sec: f64,
    pub ns_per_buffer: f64,
    /// Kicks the driver queue sent anyway: a split ring forces one every 65,535 adds
    /// without a kick, as Linux does (the device never waits for them).
    pub kicks: u64,
    /// Times the driver found nothing to add or reap and spun in `poll_used`.
    pub driver_waits: u64,
    /// Times the device found nothing available (each is one spin of `poll_avail`).
    pub device_empty_polls: u64,
    /// Involuntary context switches of the driver and the device thread during the run
    /// (the scheduler gave their CPU to another process: the run measured the load too).
    pub preemptions: Option<u64>,
    /// The cache-line round trip measured right before this run: where the host had put
    /// the two virtual CPUs relative to each other.
    pub cacheline_rtt_ns: Option<f64>,
}

/// One layout over all rounds.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub layout: LayoutKind,
    pub median_mbufs_per_sec: f64,
    /// `1000 / median_mbufs_per_sec`.
    pub median_ns_per_buffer: f64,
    pub min_mbufs_per_sec: f64,
    pub max_mbufs_per_sec: f64,
    pub runs: usize,
    /// Each side's own cost per buffer, measured with both on one thread.
    pub single_thread: Option<SingleThreadCost>,
}

/// What one buffer costs each side when both run on one thread, a ring at a time: the
/// instructions of the ring code with every line already in the core's cache. A
/// two-thread run cannot be faster per buffer than the slower side's cost, and what it
/// takes beyond that is cache lines moving between the cores (and waiting for them).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SingleThreadCost {
    /// `add_inbuf` plus `get_buf` (median over laps of a ring each).
    pub driver_ns: f64,
    /// `pop`, `complete` and `publish_used` (median over laps).
    pub device_ns: f64,
    /// Buffers measured.
    pub buffers: u64,
}

/// Everything one `virtq bench --ringtest` measured (the `--json` output).
#[derive(Debug, Serialize)]
pub struct Report {
    pub benchmark: &'static str,
    pub ring_size: u16,
    pub batch: u32,
    pub run_cycles: u64,
    pub rounds: u32,
    /// Whether busy waits used the spin hint (ringtest's `--relax`).
    pub relax: bool,
    pub buffer_bytes: u32,
    pub features: Vec<&'static str>,
    pub layouts: Vec<LayoutInfo>,
    pub cpus: Option<Cpus>,
    pub pinned: bool,
    /// Median of the ping-pongs (one before each run).
    pub cacheline_rtt_ns: Option<f64>,
    pub cacheline_rtts: Vec<CachelineRtt>,
    /// Every run, in the order they ran.
    pub runs: Vec<Run>,
    /// Per layout, the median over rounds.
    pub summary: Vec<Summary>,
    pub total_seconds: f64,
}

/// Runs every layout `rounds` times, alternating, printing progress on stderr.
pub fn run(settings: &Settings) -> Result<Report, String> {
    let started = Instant::now();
    let cpus = affinity::plan();
    let total = settings.rounds as usize * settings.layouts.len();
    let width = total.to_string().len();
    let mut runs = Vec::with_capacity(total);
    let mut rtts = Vec::new();
    let mut pinned = cpus.is_some();
    let mut costs = Vec::new();
    for &layout in &settings.layouts {
        eprint!("[solo] {layout:<15} both ends on one thread ... ");
        let laps = (settings.run_cycles / u64::from(settings.ring_size) / 8).clamp(64, 4096) as u32;
        let cost = with_layout!(layout, L => single_thread_cost::<L>(settings.ring_size, laps))
            .map_err(|e| format!("ringtest {layout} single-thread cost: {e}"))?;
        eprintln!("driver {:.1} ns, device {:.1} ns per buffer", cost.driver_ns, cost.device_ns);
        costs.push((layout, cost));
    }
    for round in 1..=settings.rounds {
        for &layout in &settings.layouts {
            eprint!("[{:>width$}/{total}] round {round}/{} {layout:<15} ... ", runs.len() + 1, settings.rounds);
            // Where the host has the two virtual CPUs right now, for reading this run.
            let rtt = match pingpong::measure(cpus, settings.pingpong) {
                Ok(r) => {
                    eprint!("cache-line RTT {:.0} ns; ", r.ns);
                    rtts.push(r);
                    Some(r.ns)
                }
                Err(why) => {
                    eprint!("(no cache-line RTT: {why}) ");
                    None
                }
            };
            let name = format!("ringtest {layout} round {round}");
            let (outcome, both_pinned) =
                with_layout!(layout, L => run_once::<L>(settings, cpus, &name)).map_err(|e| {
                    eprintln!("failed");
                    format!("{name}: {e}")
                })?;
            pinned &= both_pinned;
            let seconds = outcome.elapsed.as_secs_f64();
            let cycles = settings.run_cycles as f64;
            let run = Run {
                layout,
                round,
                seconds,
                mbufs_per_sec: cycles / seconds / 1e6,
                ns_per_buffer: seconds * 1e9 / cycles,
                kicks: outcome.kicks,
                driver_waits: outcome.driver_waits,
                device_empty_polls: outcome.device_empty_polls,
                preemptions: outcome.preemptions,
                cacheline_rtt_ns: rtt,
            };
            eprintln!(
                "{:.2} M buffers/s, {:.1} ns/buffer ({:.2} s{})",
                run.mbufs_per_sec,
                run.ns_per_buffer,
                seconds,
                match run.preemptions {
                    Some(0) | None => String::new(),
                    Some(n) => format!(", preempted {n} times"),
                }
            );
            runs.push(run);
        }
    }
    let rtt_medians: Vec<f64> = rtts.iter().map(|r| r.ns).collect();
    Ok(Report {
        benchmark: "ringtest",
        ring_size: settings.ring_size,
        batch: 1,
        run_cycles: settings.run_cycles,
        rounds: settings.rounds,
        relax: settings.relax,
        buffer_bytes: BUF_LEN,
        features: BASE_FEATURES.names().collect(),
        layouts: settings.layouts.iter().map(|&l| LayoutInfo::new(l)).collect(),
        cpus: cpus.map(|(driver, device)| Cpus { driver, device }),
        pinned,
        cacheline_rtt_ns: median(&rtt_medians),
        cacheline_rtts: rtts,
        summary: summarize(&settings.layouts, &runs, &costs),
        runs,
        total_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Per layout, in the given order: the median, min and max over its runs.
pub fn summarize(layouts: &[LayoutKind], runs: &[Run], costs: &[(LayoutKind, SingleThreadCost)]) -> Vec<Summary> {
    layouts
        .iter()
        .filter_map(|&layout| {
            let speeds: Vec<f64> = runs.iter().filter(|r| r.layout == layout).map(|r| r.mbufs_per_sec).collect();
            let m = median(&speeds)?;
            Some(Summary {
                layout,
                median_mbufs_per_sec: m,
                median_ns_per_buffer: if m > 0.0 { 1e3 / m } else { f64::INFINITY },
                min_mbufs_per_sec: speeds.iter().copied().fold(f64::INFINITY, f64::min),
                max_mbufs_per_sec: speeds.iter().copied().fold(0.0, f64::max),
                runs: speeds.len(),
                single_thread: costs.iter().find(|(l, _)| *l == layout).map(|&(_, c)| c),
            })
        })
        .collect()
}

/// What one run measured, besides the checks it passed.
struct Outcome {
    elapsed: Duration,
    kicks: u64,
    driver_waits: u64,
    device_empty_polls: u64,
    preemptions: Option<u64>,
}

struct DriverDone {
    elapsed: Duration,
    waits: u64,
    preemptions: Option<u64>,
}

struct DeviceDone {
    completed: u64,
    empty_polls: u64,
    preemptions: Option<u64>,
}

/// Involuntary context switches of the calling thread since `before`.
fn preempted_since(before: Option<u64>) -> Option<u64> {
    Some(affinity::involuntary_switches()?.saturating_sub(before?))
}

/// One run of layout `L` on two fresh pinned threads; checks that every buffer came back
/// once, in order. Returns the outcome and whether both threads were pinned.
fn run_once<L: BenchLayout>(
    settings: &Settings,
    cpus: Option<(usize, usize)>,
    name: &str,
) -> Result<(Outcome, bool), String> {
    let mem = TestMemory::new(ring_memory(settings.ring_size, settings.ring_size.into()));
    let ctl = Control::default();
    let (to_device, from_driver) = mpsc::sync_channel(1);
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let (mem, ctl_ref, size, cycles, relax) = (&mem, &ctl, settings.ring_size, settings.run_cycles, settings.relax);
    let pair = run_pair(
        &ctl,
        cpus,
        name,
        move || {
            let result = guest::<L>(mem, ctl_ref, to_device, ready_rx, size, cycles, relax);
            // Whatever happened, let a device still polling go.
            ctl_ref.stop();
            result
        },
        move || {
            let result = host::<L>(mem, ctl_ref, from_driver, ready_tx, cycles, relax);
            if result.is_err() {
                ctl_ref.stop();
            }
            result
        },
    )?;
    // The device's error explains the driver's, so it comes first.
    let device = pair.device?;
    let driver = pair.driver?;
    if device.completed != cycles {
        return Err(format!("the device completed {} buffers, not {cycles}", device.completed));
    }
    let outcome = Outcome {
        elapsed: driver.elapsed,
        kicks: ctl.device_bell.rings(),
        driver_waits: driver.waits,
        device_empty_polls: device.empty_polls,
        preemptions: driver.preemptions.zip(device.preemptions).map(|(a, b)| a + b),
    };
    Ok((outcome, pair.pinned))
}

/// ringtest's `busy_wait`: by default nothing but a compiler barrier (the loop re-reads the
/// ring at full speed); with `relax`, the CPU's spin hint (`cpu_relax`: `pause` on x86).
#[inline(always)]
fn busy_wait(relax: bool) {
    if relax {
        std::hint::spin_loop();
    } else {
        compiler_fence(Ordering::SeqCst);
    }
}

/// The driver: ringtest's `run_guest` in polling mode.
fn guest<L: BenchLayout>(
    mem: &TestMemory,
    ctl: &Control,
    to_device: SyncSender<DeviceConfig>,
    device_ready: Receiver<()>,
    size: u16,
    cycles: u64,
    relax: bool,
) -> Result<DriverDone, String> {
    let features = layout::features(L::KIND);
    // No callback: interrupts suppressed from the start, and never enabled.
    let mut queue = Queue::<L>::new(ringtest_config(size, features), mem, Kicker(&ctl.device_bell))
        .map_err(|e| format!("driver: cannot create the queue: {e}"))?;
    to_device.send(device_config(&queue, features)).map_err(|_| "driver: the device thread is gone".to_string())?;
    // One buffer per ring entry: buffer `token % size` carries token `token`, and is free
    // again when that token is back (the device completes in order).
    let bufs: Vec<Sg> = (0..size).map(|_| mem.alloc_sg(BUF_LEN)).collect();
    let mask = u64::from(size) - 1;
    let ring = u64::from(size);
    device_ready.recv().map_err(|_| "driver: the device could not attach".to_string())?;

    let switches = affinity::involuntary_switches();
    let start = Instant::now();
    let (mut started, mut completed, mut waits) = (0u64, 0u64, 0u64);
    loop {
        // Add and reap, interleaved, while either makes progress.
        loop {
            let mut progress = false;
            if started < cycles && started - completed < ring {
                let sg = bufs[(started & mask) as usize];
                queue
                    .add_inbuf(&[sg], started)
                    .map_err(|e| format!("driver: add failed after {started} buffers: {e}"))?;
                started += 1;
                progress = true;
            }
            if let Some(used) = queue.get_buf() {
                // The device completes in order, so tokens come back as 0, 1, 2, ...:
                // each exactly once.
                if used.token != completed {
                    return Err(format!("driver: got token {} back where {completed} was due", used.token));
                }
                if used.len != BUF_LEN {
                    return Err(format!("driver: the device wrote {} bytes, not {BUF_LEN}", used.len));
                }
                completed += 1;
                if completed & (PROGRESS_EVERY - 1) == 0 {
                    ctl.driver_progress.store(completed, Ordering::Relaxed);
                }
                if completed == cycles {
                    let elapsed = start.elapsed();
                    ctl.driver_progress.store(completed, Ordering::Relaxed);
                    return Ok(DriverDone { elapsed, waits, preemptions: preempted_since(switches) });
                }
                progress = true;
            }
            if !progress {
                break;
            }
        }
        // poll_used: spin until the device has used something.
        waits += 1;
        while !queue.has_used() {
            if ctl.stopped() {
                return Err("driver: the device side gave up".into());
            }
            if queue.is_broken() {
                return Err(match queue.fault() {
                    Some(fault) => format!("driver: the queue broke: {fault}"),
                    None => "driver: the queue broke".into(),
                });
            }
            busy_wait(relax);
        }
    }
}

/// The device: ringtest's `run_host` in polling mode. Returns the buffers completed and
/// the number of empty polls.
fn host<L: BenchLayout>(
    mem: &TestMemory,
    ctl: &Control,
    from_driver: Receiver<DeviceConfig>,
    ready: SyncSender<()>,
    cycles: u64,
    relax: bool,
) -> Result<DeviceDone, String> {
    // No config means the driver failed to create the ring; it reports why.
    let Ok(config) = from_driver.recv() else {
        return Ok(DeviceDone { completed: 0, empty_polls: 0, preemptions: None });
    };
    let mut device = layout::attach::<L>(mem, config).map_err(|e| format!("device: cannot attach to the ring: {e}"))?;
    ready.send(()).map_err(|_| "device: the driver thread is gone".to_string())?;
    serve(&mut device, ctl, cycles, relax)
}

fn serve<D: DeviceLayout>(
    device: &mut Device<'_, TestMemory, D>,
    ctl: &Control,
    cycles: u64,
    relax: bool,
) -> Result<DeviceDone, String> {
    let switches = affinity::involuntary_switches();
    let done = |completed, empty_polls| DeviceDone { completed, empty_polls, preemptions: preempted_since(switches) };
    let mut segs = Segments::<1>::new();
    let (mut completed, mut empty) = (0u64, 0u64);
    loop {
        match device.pop(&mut segs) {
            Ok(Some(chain)) => {
                if chain.readable_len() != 0 || chain.writable_len() != BUF_LEN {
                    return Err(format!(
                        "device: chain {} has {} readable and {} writable bytes, expected 0 and {BUF_LEN}",
                        chain.id(),
                        chain.readable_len(),
                        chain.writable_len()
                    ));
                }
                // use_buf: the whole buffer "written". The device publishes used entries a
                // cache line at a time by itself, and the rest when idle (ringtest's C
                // layouts publish after every buffer).
                device.complete(chain, BUF_LEN);
                completed += 1;
                if completed & (PROGRESS_EVERY - 1) == 0 {
                    ctl.device_progress.store(completed, Ordering::Relaxed);
                }
                if completed == cycles {
                    device.publish_used();
                    ctl.device_progress.store(completed, Ordering::Relaxed);
                    return Ok(done(completed, empty));
                }
            }
            Ok(None) => {
                device.publish_used();
                // poll_avail. The driver stops the run early only when it failed.
                if ctl.stopped() {
                    return Ok(done(completed, empty));
                }
                empty += 1;
                busy_wait(relax);
            }
            Err(e) => return Err(format!("device: pop failed after {completed} buffers: {e}")),
        }
    }
}

/// Both ends of layout `L` on the calling thread, a ring at a time: the driver fills the
/// ring, the device serves all of it, the driver reaps all of it; each phase timed.
/// `laps` rings are measured after one unmeasured lap, and each side's cost is the median
/// over laps (a lap during which the thread was preempted is an outlier, not a trend).
fn single_thread_cost<L: BenchLayout>(size: u16, laps: u32) -> Result<SingleThreadCost, String> {
    let mem = TestMemory::new(ring_memory(size, size.into()));
    let ctl = Control::default();
    let features = layout::features(L::KIND);
    let mut queue = Queue::<L>::new(ringtest_config(size, features), &mem, Kicker(&ctl.device_bell))
        .map_err(|e| format!("driver: cannot create the queue: {e}"))?;
    let mut device = layout::attach::<L>(&mem, device_config(&queue, features))
        .map_err(|e| format!("device: cannot attach: {e}"))?;
    let bufs: Vec<Sg> = (0..size).map(|_| mem.alloc_sg(BUF_LEN)).collect();
    let mask = u64::from(size) - 1;
    let mut segs = Segments::<1>::new();
    let (mut driver, mut dev) = (Vec::with_capacity(laps as usize), Vec::with_capacity(laps as usize));
    let per_buffer = |d: Duration| d.as_nanos() as f64 / f64::from(size);
    let (mut token, mut expected) = (0u64, 0u64);
    for lap in 0..=laps {
        let t0 = Instant::now();
        for _ in 0..size {
            queue.add_inbuf(&[bufs[(token & mask) as usize]], token).map_err(|e| format!("driver: add failed: {e}"))?;
            token += 1;
        }
        let t1 = Instant::now();
        for _ in 0..size {
            let chain = device
                .pop(&mut segs)
                .map_err(|e| format!("device: pop failed: {e}"))?
                .ok_or("device: a buffer added is not available")?;
            device.complete(chain, BUF_LEN);
            device.publish_used();
        }
        let t2 = Instant::now();
        for _ in 0..size {
            let used = queue.get_buf().ok_or("driver: a buffer completed is not used")?;
            if used.token != expected || used.len != BUF_LEN {
                return Err(format!("driver: got token {} ({} bytes) where {expected} was due", used.token, used.len));
            }
            expected += 1;
        }
        let t3 = Instant::now();
        if lap > 0 {
            driver.push(per_buffer((t1 - t0) + (t3 - t2)));
            dev.push(per_buffer(t2 - t1));
        }
    }
    Ok(SingleThreadCost {
        driver_ns: median(&driver).unwrap_or(0.0),
        device_ns: median(&dev).unwrap_or(0.0),
        buffers: u64::from(laps) * u64::from(size),
    })
}

/// The driver queue ringtest's guest sets up: no callbacks (interrupts suppressed from
/// the start), and a split ring aligned as `vring_init(.., 0x1000)` lays it out.
fn ringtest_config(size: u16, features: virtq::Features) -> QueueConfig {
    let mut config = QueueConfig::new(0, size, features);
    config.callbacks = false;
    config.vring_align = 4096;
    config
}

impl Report {
    pub fn write_json(&self, out: &mut impl Write) -> io::Result<()> {
        serde_json::to_writer_pretty(&mut *out, self)?;
        writeln!(out)
    }

    pub fn write_table(&self, out: &mut impl Write) -> io::Result<()> {
        writeln!(
            out,
            "virtq bench --ringtest: the protocol of Linux tools/virtio/ringtest (virtio_ring_0_9, defaults)"
        )?;
        writeln!(
            out,
            "ring of {} entries, batch 1, both sides polling, no notifications; {}; one {}-byte 'in' buffer each",
            self.ring_size,
            self.features.join(" | "),
            self.buffer_bytes
        )?;
        let placement = match (self.cpus, self.pinned) {
            (Some(c), true) => format!("driver pinned to CPU {}, device to CPU {}", c.driver, c.device),
            (Some(_), false) => "driver and device unpinned (pinning failed)".to_string(),
            (None, _) => "driver and device unpinned (fewer than 2 CPUs)".to_string(),
        };
        writeln!(
            out,
            "{placement}; {} buffers per run; {} rounds, layouts alternating; busy waits {}",
            self.run_cycles,
            self.rounds,
            if self.relax { "with cpu_relax (pause), as --relax" } else { "without pause, as ringtest's default" }
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "{:>5}  {:<15} {:>8} {:>8} {:>8} {:>10} {:>10} {:>8} {:>7}",
            "round", "layout", "Mbuf/s", "ns/buf", "seconds", "waits/buf", "empty/buf", "preempt", "RTT ns"
        )?;
        for r in &self.runs {
            let preempt = r.preemptions.map_or_else(|| "-".to_string(), |n| n.to_string());
            let cycles = self.run_cycles as f64;
            writeln!(
                out,
                "{:>5}  {:<15} {:>8.2} {:>8.1} {:>8.3} {:>10.3} {:>10.3} {:>8} {:>7}",
                r.round,
                r.layout,
                r.mbufs_per_sec,
                r.ns_per_buffer,
                r.seconds,
                r.driver_waits as f64 / cycles,
                r.device_empty_polls as f64 / cycles,
                preempt,
                r.cacheline_rtt_ns.map_or_else(|| "-".to_string(), |ns| format!("{ns:.0}"))
            )?;
        }
        writeln!(out, "(waits: the driver found nothing to add or reap and spun in poll_used; empty: the device")?;
        writeln!(out, " polled an empty ring; preempt: involuntary context switches of the two pinned threads;")?;
        writeln!(out, " RTT: cache-line round trip between the two CPUs, measured right before the run)")?;
        writeln!(out)?;
        writeln!(out, "median of {} rounds:", self.rounds)?;
        writeln!(
            out,
            "{:<15} {:>8} {:>8} {:>13}   {:>18}",
            "layout", "Mbuf/s", "ns/buf", "range Mbuf/s", "1-thread drv/dev ns"
        )?;
        for s in &self.summary {
            let range = format!("{:.2}-{:.2}", s.min_mbufs_per_sec, s.max_mbufs_per_sec);
            let solo =
                s.single_thread.map_or_else(|| "-".into(), |c| format!("{:.1} / {:.1}", c.driver_ns, c.device_ns));
            writeln!(
                out,
                "{:<15} {:>8.2} {:>8.1} {:>13}   {:>18}",
                s.layout, s.median_mbufs_per_sec, s.median_ns_per_buffer, range, solo
            )?;
        }
        writeln!(
            out,
            "(1-thread: each side's cost per buffer with both ends on one thread, a ring at a time: no cache-line transfers)"
        )?;
        if let Some(rtt) = self.cacheline_rtt_ns {
            writeln!(
                out,
                "cache-line round trip between the two CPUs: {rtt:.0} ns (median of {} ping-pongs over the lines of a page, one \
                 before each run)",
                self.cacheline_rtts.len()
            )?;
            if let Some([fastest, slowest]) = crate::pingpong::line_range(&self.cacheline_rtts) {
                writeln!(out, "single lines of that page: from {fastest:.0} to {slowest:.0} ns")?;
            }
        }
        writeln!(out)?;
        writeln!(
            out,
            "checked: in every run all {} tokens came back exactly once, in order; total {:.1} s",
            self.run_cycles, self.total_seconds
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(layout: LayoutKind, round: u32, mbufs_per_sec: f64) -> Run {
        Run {
            layout,
            round,
            seconds: 1.0,
            mbufs_per_sec,
            ns_per_buffer: 1e3 / mbufs_per_sec,
            kicks: 0,
            driver_waits: 0,
            device_empty_polls: 0,
            preemptions: None,
            cacheline_rtt_ns: None,
        }
    }

    #[test]
    fn summary_is_the_median_per_layout_in_order() {
        let runs = [
            run_of(LayoutKind::Packed, 1, 30.0),
            run_of(LayoutKind::Split, 1, 10.0),
            run_of(LayoutKind::Packed, 2, 5.0),
            run_of(LayoutKind::Split, 2, 20.0),
            run_of(LayoutKind::Packed, 3, 28.0),
            run_of(LayoutKind::Split, 3, 15.0),
        ];
        let cost = SingleThreadCost { driver_ns: 1.0, device_ns: 2.0, buffers: 3 };
        let s = summarize(
            &[LayoutKind::Split, LayoutKind::Packed, LayoutKind::PackedInOrder],
            &runs,
            &[(LayoutKind::Packed, cost)],
        );
        assert!(s[0].single_thread.is_none());
        assert_eq!(s[1].single_thread.map(|c| c.device_ns), Some(2.0));
        assert_eq!(s.len(), 2, "a layout without runs is left out");
        assert_eq!((s[0].layout, s[0].median_mbufs_per_sec, s[0].runs), (LayoutKind::Split, 15.0, 3));
        assert_eq!((s[1].layout, s[1].median_mbufs_per_sec), (LayoutKind::Packed, 28.0));
        assert_eq!((s[1].min_mbufs_per_sec, s[1].max_mbufs_per_sec), (5.0, 30.0));
        assert!((s[0].median_ns_per_buffer - 1e3 / 15.0).abs() < 1e-9);
    }

    #[test]
    fn table_and_json_show_every_run_and_the_medians() {
        let runs = vec![
            run_of(LayoutKind::Split, 1, 12.5),
            run_of(LayoutKind::Split, 2, 14.0),
            run_of(LayoutKind::Split, 3, 13.0),
        ];
        let cost = SingleThreadCost { driver_ns: 10.4, device_ns: 8.5, buffers: 1000 };
        let report = Report {
            benchmark: "ringtest",
            ring_size: 256,
            batch: 1,
            run_cycles: 1000,
            rounds: 3,
            relax: false,
            buffer_bytes: BUF_LEN,
            features: BASE_FEATURES.names().collect(),
            layouts: vec![LayoutInfo::new(LayoutKind::Split)],
            cpus: Some(Cpus { driver: 0, device: 1 }),
            pinned: true,
            cacheline_rtt_ns: Some(61.0),
            cacheline_rtts: vec![],
            summary: summarize(&[LayoutKind::Split], &runs, &[(LayoutKind::Split, cost)]),
            runs,
            total_seconds: 1.5,
        };
        let mut table = Vec::new();
        report.write_table(&mut table).unwrap();
        let table = String::from_utf8(table).unwrap();
        assert_eq!(table.lines().filter(|l| l.split_whitespace().any(|w| w == "split")).count(), 4, "{table}");
        assert!(table.contains("13.00") && table.contains("76.9"), "median and its ns/buf:\n{table}");
        assert!(table.contains("10.4 / 8.5"), "{table}");
        assert!(table.contains("61 ns"), "{table}");
        let mut json = Vec::new();
        report.write_json(&mut json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["summary"][0]["layout"], "split");
        assert_eq!(v["summary"][0]["median_mbufs_per_sec"], 13.0);
        assert_eq!(v["runs"].as_array().unwrap().len(), 3);
    }

    /// Every layout through the real protocol, unpinned, with a ring that wraps many times
    /// and (split) crosses the 16-bit index wrap, where a kick is forced.
    #[test]
    fn every_layout_runs_the_protocol() {
        let settings = Settings {
            ring_size: 64,
            run_cycles: 70_000,
            rounds: 1,
            layouts: LayoutKind::ALL.to_vec(),
            pingpong: Duration::ZERO,
            relax: false,
        };
        for layout in LayoutKind::ALL {
            let (outcome, _) = with_layout!(layout, L => run_once::<L>(&settings, None, "test"))
                .unwrap_or_else(|e| panic!("{layout}: {e}"));
            assert!(outcome.elapsed > Duration::ZERO);
            // Polling, no notifications: none at all for packed, and at most the one a
            // split ring forces at 65,535 adds without a kick.
            assert!(outcome.kicks <= 1, "{layout}: {} kicks", outcome.kicks);
        }
    }
}
