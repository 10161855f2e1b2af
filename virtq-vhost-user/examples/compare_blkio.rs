//! virtq-vhost-user's virtio-blk driver against libblkio's Rust driver (`virtio-driver`,
//! its vhost-user virtio-blk path) on one qemu-storage-daemon null-co export.
//!
//! Workload: 4 KiB random reads, one queue, busy-polling completions in both; QD1 (latency)
//! and QD32 (IOPS). The two drivers take turns on the same export (A B A B ...; one
//! vhost-user front end at a time; within a round the two cells of a depth run back to
//! back, first one then the other driver leading), and the report gives the median of
//! each, the ratio of medians, and the median of the per-round ratios, as the machine is
//! noisy.
//!
//! ```sh
//! cargo run --release -p virtq-vhost-user --example compare_blkio -- [--socket PATH] [--reps 5] [--secs 2] [--async poll]
//! ```
//!
//! `--async poll|sleep|hybrid` adds a third driver to each round: virtq's async completions
//! (`BlkDevice::connect_async`), one tokio task per request in flight on a single-threaded
//! runtime, whose reactor task busy-polls the ring, sleeps on the call eventfd, or polls for
//! 50 us and then sleeps; the report then also gives its ratios to the polling virtq driver
//! and to virtio-driver.
//!
//! `--ops N [--driver virtq|virtio-driver] [--qd D] [--settle US]` runs one driver for
//! exactly N requests instead, untimed (no clock read, no latency recorded): for counting
//! syscalls (`strace -f -c`) or instructions (callgrind) per request, from the difference
//! between two values of N. Give it `--socket` so that the daemon is not traced along. It
//! prints the write syscalls (kicks) per request from /proc/self/io, which strace would
//! change by slowing every kick. `--settle US` sleeps after each batch is kicked, so that
//! the device has completed it when the driver polls: no empty polls (their number depends
//! on timing, and under valgrind on its slowdown) and batches of exactly D. For instance:
//!
//! ```sh
//! valgrind --tool=callgrind --dump-instr=yes compare_blkio --socket S --ops 2000 --qd 32 --settle 200
//! valgrind --tool=callgrind --dump-instr=yes compare_blkio --socket S --ops 12000 --qd 32 --settle 200
//! ```
//!
//! Without `--socket` it starts qemu-storage-daemon itself (1 GiB null-co, read-zeroes).
//! Both negotiate `EVENT_IDX` (`EVENT_IDX=0` in the environment turns it off). Both use
//! direct descriptors: virtio-driver has no indirect ones, and a 3-descriptor request fits
//! the ring at either depth, where an indirect table costs virtq about 240 more instructions
//! per request and the daemon about 160 more (callgrind, `--ops`). `INDIRECT=1` makes virtq
//! negotiate `INDIRECT_DESC`, as the driver does by default.
//!
//! On the project machine (2 shared vCPUs, qemu-storage-daemon 10.0.2, quiet), two runs of
//! 12 and 14 rounds with direct descriptors gave these medians of per-round ratios virtq /
//! virtio-driver: QD1 p50 latency 0.997 and 1.003 (both about 3 us), QD1 IOPS 0.996 and
//! 1.013, QD32 IOPS 1.051 and 1.015. The daemon's own speed flips between two levels (QD32
//! about 0.85 M and 1.15 M IOPS) with the host's placement of the vCPUs, so the ratio of
//! the two medians swings with the rounds each driver happened to get (0.85 to 1.15 over
//! the same runs); the per-round ratio mostly pairs cells run at the same level.
//!
//! Per request, counted with `--ops` (deterministic, unlike the timings): both make one
//! eventfd write (kick) at QD1 and almost none at QD32 (0 to 5 in 1,000 requests, run to
//! run: only when the daemon has run dry), no other syscall, and no heap allocation; the
//! daemon does the same work for either driver's requests (one ppoll and one eventfd read
//! per request at QD1, almost none at QD32).
//!
//! Instructions per request in the driver (callgrind, `--settle 200`, N = 2000 and 12000,
//! this loop's own bookkeeping left out): virtq about 600 at QD1 and 400 at QD32, virtio-driver
//! 347 and 293. Of virtq's, the core crate's ring operations are 259 and 207 (adding the
//! 3-descriptor chain alone is about 147), the virtio-blk layer about 290 and 191. At QD1
//! about 50 of ours are glibc's `write()` for the kick, mostly its thread-cancellation
//! handling.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_driver::{VhostUser, VirtioBlkQueue, VirtioBlkTransport, VirtioFeatureFlags};
use virtq_vhost_user::blk::{BlkDevice, BlkOptions, Request, SECTOR_SIZE};
use virtq_vhost_user::{reactor, WaitMode};

const BS: usize = 4096;
const QUEUE_SIZE: u16 = 256;
/// How the async driver's reactor waits (`--async MODE`).
static ASYNC_WAIT: std::sync::OnceLock<WaitMode> = std::sync::OnceLock::new();

/// One measurement.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

fn summarize(lat_ns: &mut [u32], ops: u64, secs: f64) -> Sample {
    lat_ns.sort_unstable();
    let at = |q: f64| {
        if lat_ns.is_empty() {
            0.0
        } else {
            lat_ns[((lat_ns.len() as f64 * q) as usize).min(lat_ns.len() - 1)] as f64 / 1000.0
        }
    };
    Sample { iops: ops as f64 / secs, p50_us: at(0.5), p99_us: at(0.99) }
}

/// xorshift64*: random 4 KiB-aligned blocks.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        ((x.wrapping_mul(0x2545_f491_4f6c_dd1d) as u128 * n as u128) >> 64) as u64
    }
}

/// How long one cell runs: timed, or a fixed number of requests (`--ops`, for counting
/// syscalls and instructions per request; then nothing is timed).
#[derive(Clone, Copy)]
struct Span {
    warmup: Duration,
    secs: Duration,
    max_ops: u64,
    /// Count mode: no clock reads and no latency records, so that what is counted per
    /// request is the driver and a few instructions of loop.
    count: bool,
    /// Count mode: sleep this long after a batch is submitted and kicked, before reaping,
    /// so that the device has completed it and the first poll finds it (no empty polls,
    /// whose number depends on timing; `--settle US`).
    settle: Duration,
}

impl Span {
    /// Whether to submit more: below `max_ops`, and (timed) before `end`.
    fn more(&self, submitted: u64, end: Instant) -> bool {
        submitted < self.max_ops && (self.count || Instant::now() < end)
    }

    /// The clock, or a fixed instant in count mode.
    fn now(&self, t0: Instant) -> Instant {
        if self.count {
            t0
        } else {
            Instant::now()
        }
    }

    /// Count mode: lets the device complete the batch just kicked (see `settle`).
    fn settle(&self) {
        if !self.settle.is_zero() {
            std::thread::sleep(self.settle);
        }
    }
}

/// virtq-vhost-user: `depth` 4 KiB random reads in flight, busy-polling.
fn run_virtq(socket: &Path, depth: usize, span: Span) -> Sample {
    let opts = BlkOptions {
        queue_size: QUEUE_SIZE,
        wait: WaitMode::Poll,
        indirect_desc: env_flag("INDIRECT", false),
        event_idx: env_flag("EVENT_IDX", true),
        ..Default::default()
    };
    let mut dev = BlkDevice::connect(socket, &opts).expect("virtq: connect");
    let blocks = dev.info().capacity_bytes() / BS as u64;
    let mut q = dev.take_queues().remove(0);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    // Each buffer stays in its own one-element Vec, which travels with it through the
    // request and back in the completion: no heap allocation per request.
    let mut spare: Vec<Vec<_>> = (0..depth).map(|_| vec![q.alloc(BS).expect("buffer")]).collect();
    let mut started = vec![Instant::now(); depth];
    let mut free: Vec<u64> = (0..depth as u64).collect();
    let mut comps = Vec::with_capacity(depth);
    let mut lat = Vec::with_capacity(1 << 20);
    let (t0, mut ops, mut submitted) = (Instant::now(), 0u64, 0u64);
    let (measure_from, end) = (t0 + span.warmup, t0 + span.warmup + span.secs);
    loop {
        if span.more(submitted, end) {
            // Submit the whole batch, then one kick for it (if the device wants one), as
            // for virtio-driver below.
            while let (Some(buf), Some(id)) = (spare.pop(), free.pop()) {
                if submitted == span.max_ops {
                    spare.push(buf);
                    break;
                }
                submitted += 1;
                let sector = rng.below(blocks) * (BS as u64 / SECTOR_SIZE);
                started[id as usize] = span.now(t0);
                q.submit(Request::read(sector, buf, id)).expect("virtq: submit");
            }
            q.kick().expect("virtq: kick");
            span.settle();
        } else if q.in_flight() == 0 {
            break;
        }
        q.wait(1, &mut comps, Some(Duration::from_secs(10))).expect("virtq: wait");
        let done = span.now(t0);
        for c in comps.drain(..) {
            c.result.expect("virtq: read failed");
            let s = started[c.user_data as usize];
            if !span.count && s >= measure_from && done <= end {
                ops += 1;
                lat.push(done.duration_since(s).as_nanos() as u32);
            }
            spare.push(c.bufs);
            free.push(c.user_data);
        }
    }
    summarize(&mut lat, ops, span.secs.as_secs_f64())
}

/// virtq's async completions: `depth` tokio tasks, each with one 4 KiB random read in
/// flight, on a single-threaded runtime whose reactor task waits as `--async` says.
fn run_virtq_async(socket: &Path, depth: usize, span: Span) -> Sample {
    let wait = *ASYNC_WAIT.get().unwrap_or(&WaitMode::Poll);
    let opts = BlkOptions {
        queue_size: QUEUE_SIZE,
        indirect_desc: env_flag("INDIRECT", false),
        event_idx: env_flag("EVENT_IDX", true),
        ..Default::default()
    };
    let (dev, mut queues) = BlkDevice::connect_async(socket, &opts).expect("virtq async: connect");
    let blocks = dev.info().capacity_bytes() / BS as u64;
    let q = queues.remove(0);
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("tokio runtime");
    let submitted = Arc::new(AtomicU64::new(0));
    let mut lat = rt.block_on(async {
        tokio::spawn(reactor::drive_with(q.queue().clone(), wait));
        let t0 = Instant::now();
        let (measure_from, end) = (t0 + span.warmup, t0 + span.warmup + span.secs);
        let tasks: Vec<_> = (0..depth as u64)
            .map(|t| {
                let (q, submitted) = (q.clone(), submitted.clone());
                tokio::spawn(async move {
                    let mut rng = Rng(0x1234_5678_9abc_def1 ^ (t << 20));
                    let mut buf = q.alloc(BS).expect("buffer");
                    let mut lat = Vec::with_capacity(1 << 16);
                    while span.more(submitted.fetch_add(1, Ordering::Relaxed), end) {
                        let sector = rng.below(blocks) * (BS as u64 / SECTOR_SIZE);
                        let s = span.now(t0);
                        buf = q.read(sector, buf).await.expect("virtq async: read failed");
                        let done = span.now(t0);
                        if !span.count && s >= measure_from && done <= end {
                            lat.push(done.duration_since(s).as_nanos() as u32);
                        }
                    }
                    lat
                })
            })
            .collect();
        let mut lat = Vec::with_capacity(1 << 20);
        for t in tasks {
            lat.extend(t.await.expect("task"));
        }
        lat
    });
    let ops = lat.len() as u64;
    summarize(&mut lat, ops, span.secs.as_secs_f64())
}

/// libblkio's `virtio-driver`: the same workload with its vhost-user virtio-blk queue.
fn run_blkio(socket: &Path, depth: usize, span: Span) -> Sample {
    let mut features = VirtioFeatureFlags::VERSION_1.bits();
    if env_flag("EVENT_IDX", true) {
        features |= VirtioFeatureFlags::RING_EVENT_IDX.bits();
    }
    let vhost = VhostUser::new(socket.to_str().expect("utf-8 path"), features).expect("virtio-driver: connect");
    let mut transport: Box<VirtioBlkTransport> = Box::new(vhost);
    let config = transport.get_config().expect("virtio-driver: config");
    let blocks = u64::from(config.capacity) * SECTOR_SIZE / BS as u64;

    // Data buffers: one memfd mapped shared and registered with the back end.
    let len = depth * BS;
    // SAFETY: a NUL-terminated name; memfd_create has no other inputs.
    let raw = unsafe { libc::memfd_create(c"blkio-data".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0, "memfd_create");
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on a descriptor we own.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }, 0);
    // SAFETY: a new shared mapping of the whole file at an address the kernel chooses.
    let base = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
    };
    assert_ne!(base, libc::MAP_FAILED);
    transport.map_mem_region(base as usize, len, fd.as_raw_fd(), 0).expect("virtio-driver: map data");
    let mut queues =
        VirtioBlkQueue::<usize>::setup_queues(&mut *transport, 1, QUEUE_SIZE).expect("virtio-driver: queues");
    let notifier = transport.get_submission_notifier(0);
    let q = &mut queues[0];
    q.set_used_notif_enabled(false);

    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut started = vec![Instant::now(); depth];
    let mut free: Vec<usize> = (0..depth).collect();
    let mut in_flight = 0usize;
    let mut batch = Vec::with_capacity(depth);
    let mut lat = Vec::with_capacity(1 << 20);
    let (t0, mut ops, mut submitted) = (Instant::now(), 0u64, 0u64);
    let (measure_from, end) = (t0 + span.warmup, t0 + span.warmup + span.secs);
    loop {
        if span.more(submitted, end) {
            let mut added = false;
            while let Some(slot) = free.pop() {
                if submitted == span.max_ops {
                    free.push(slot);
                    break;
                }
                submitted += 1;
                // SAFETY: slot `slot`'s 4 KiB of the mapping; each slot is in one request at a
                // time, and the mapping lives until the end of this function.
                let buf = unsafe { std::slice::from_raw_parts_mut(base.cast::<u8>().add(slot * BS), BS) };
                started[slot] = span.now(t0);
                q.read(rng.below(blocks) * BS as u64, buf, slot).expect("virtio-driver: submit");
                in_flight += 1;
                added = true;
            }
            if added && q.avail_notif_needed() {
                notifier.notify().expect("virtio-driver: notify");
            }
            span.settle();
        } else if in_flight == 0 {
            break;
        }
        // Spin on the used ring until something completes, like virtq's `wait(1, ..)`; the
        // clock is read once per batch in both, not once per empty poll.
        while batch.is_empty() {
            batch.extend(q.completions());
        }
        // Like virtq's `wait`, which returns the processed batch: timestamp after processing.
        let done = span.now(t0);
        for c in batch.drain(..) {
            assert_eq!(c.ret, 0, "virtio-driver: read failed");
            let s = started[c.context];
            if !span.count && s >= measure_from && done <= end {
                ops += 1;
                lat.push(done.duration_since(s).as_nanos() as u32);
            }
            free.push(c.context);
            in_flight -= 1;
        }
    }
    drop(queues);
    drop(transport);
    // SAFETY: the mapping created above; the queues and the transport that used it are gone.
    unsafe { libc::munmap(base, len) };
    summarize(&mut lat, ops, span.secs.as_secs_f64())
}

/// Write system calls the process made so far (`syscw` in /proc/self/io): in steady state
/// these are the kicks, eventfd writes, of either driver.
fn write_syscalls() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines().find_map(|l| l.strip_prefix("syscw: ")).and_then(|v| v.trim().parse().ok())
}

/// `NAME=0` / `NAME=1` in the environment turn a feature off or on (`INDIRECT`: virtq only;
/// `EVENT_IDX`: both).
fn env_flag(name: &str, default: bool) -> bool {
    std::env::var(name).map_or(default, |v| v != "0")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_daemon(dir: &Path) -> (Daemon, PathBuf) {
    let sock = dir.join("null.sock");
    let child = Command::new("qemu-storage-daemon")
        .args(["--blockdev", "driver=null-co,node-name=null0,size=1073741824,read-zeroes=on", "--export"])
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=null0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            sock.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .expect("start qemu-storage-daemon (apt-get install qemu-utils)");
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "qemu-storage-daemon socket did not appear");
        std::thread::sleep(Duration::from_millis(10));
    }
    (Daemon(child), sock)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let reps: usize = arg("--reps").map_or(5, |s| s.parse().expect("--reps N"));
    let secs = Duration::from_secs_f64(arg("--secs").map_or(2.0, |s| s.parse().expect("--secs S")));
    let warmup = Duration::from_millis(300);
    let dir = std::env::temp_dir().join(format!("compare_blkio.{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (_daemon, socket) = match arg("--socket") {
        Some(s) => (None, PathBuf::from(s)),
        None => {
            let (d, s) = start_daemon(&dir);
            (Some(d), s)
        }
    };
    if let Some(n) = arg("--ops") {
        // Count mode: one driver, one depth, exactly N requests, nothing timed. Run it under
        // `strace -c` or valgrind with two values of N; the difference divided by the
        // difference in N is the cost per request, without the connection's setup.
        let max_ops = n.parse().expect("--ops N");
        let depth = arg("--qd").map_or(1, |s| s.parse().expect("--qd N"));
        let driver = arg("--driver").unwrap_or_else(|| "virtq".into());
        let run = run_driver(&driver);
        let settle = Duration::from_micros(arg("--settle").map_or(0, |s| s.parse().expect("--settle US")));
        let span = Span { warmup: Duration::ZERO, secs: Duration::from_secs(3600), max_ops, count: true, settle };
        let t = Instant::now();
        let writes = write_syscalls();
        run(&socket, depth, span);
        let writes = write_syscalls().zip(writes).map(|(after, before)| after - before);
        println!("{driver}: {max_ops} requests at QD{depth} in {:?}", t.elapsed());
        if let Some(w) = writes {
            // Without strace, which slows each kick and so changes how often the device
            // has gone idle and needs one.
            println!("write syscalls (kicks, and a few of set-up): {w}, {:.4} per request", w as f64 / max_ops as f64);
        }
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let span = Span { warmup, secs, max_ops: u64::MAX, count: false, settle: Duration::ZERO };
    let with_async = arg("--async").is_some_and(|mode| {
        let wait = match mode.as_str() {
            "poll" => WaitMode::Poll,
            "sleep" => WaitMode::Sleep,
            "hybrid" => WaitMode::Hybrid(Duration::from_micros(50)),
            other => panic!("--async {other}: poll, sleep or hybrid"),
        };
        ASYNC_WAIT.set(wait).is_ok()
    });
    println!(
        "4 KiB random reads, 1 queue, busy-polling{}, {reps} rounds of {secs:?} per cell (A B A B ...)",
        match ASYNC_WAIT.get() {
            Some(w) => format!(" (virtq-async: reactor {w:?})"),
            None => String::new(),
        }
    );
    println!("socket {}", socket.display());
    println!(
        "{:>5} {:>14} {:>10} {:>10} {:>10} {:>12}",
        "round", "driver", "QD1 IOPS", "QD1 p50", "QD1 p99", "QD32 IOPS"
    );
    let mut drivers: Vec<&str> = vec!["virtq", "virtio-driver"];
    if with_async {
        drivers.push("virtq-async");
    }
    // Per driver: its QD1 samples and QD32 IOPS, one per round.
    let mut results: Vec<(Vec<Sample>, Vec<f64>)> = drivers.iter().map(|_| (Vec::new(), Vec::new())).collect();
    for round in 0..reps {
        // The drivers' cells of one depth run back to back, and the order rotates from
        // round to round (A B, B A, ...), so that each round gives figures measured in the
        // same moments of the host's drift.
        let mut order: Vec<usize> = (0..drivers.len()).collect();
        order.rotate_left(round % drivers.len());
        if round % 2 == 1 {
            order.reverse();
        }
        let mut cells: Vec<Option<(Sample, Sample)>> = vec![None; drivers.len()];
        for qd in [1, 32] {
            for &d in &order {
                let sample = run_driver(drivers[d])(&socket, qd, span);
                let cell = cells[d].get_or_insert((sample, sample));
                if qd == 32 {
                    cell.1 = sample;
                }
            }
        }
        for (d, cell) in cells.into_iter().enumerate() {
            let (qd1, qd32) = cell.expect("every driver ran");
            println!(
                "{round:>5} {:>14} {:>10.0} {:>8.2}us {:>8.2}us {:>12.0}",
                drivers[d], qd1.iops, qd1.p50_us, qd1.p99_us, qd32.iops
            );
            results[d].0.push(qd1);
            results[d].1.push(qd32.iops);
        }
    }
    // Per round, one driver's figure over the other's: the median of those cancels drift
    // slower than a round, which the ratio of the two medians does not.
    let paired = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y).collect());
    let field = |v: &[Sample], f: fn(&Sample) -> f64| v.iter().map(f).collect::<Vec<f64>>();
    let compare = |a: usize, b: usize| {
        println!();
        println!("medians {:>22} {:>15}   ratio of medians   median of ratios", drivers[a], drivers[b]);
        let row = |label: &str, x: &[f64], y: &[f64]| {
            let (mx, my) = (median(x.to_vec()), median(y.to_vec()));
            println!("{label:<22} {mx:>12.2} {my:>15.2} {:>18.3} {:>18.3}", mx / my, paired(x, y))
        };
        let ((a1, a32), (b1, b32)) = (&results[a], &results[b]);
        row("QD1 p50 latency (us)", &field(a1, |s| s.p50_us), &field(b1, |s| s.p50_us));
        row("QD1 p99 latency (us)", &field(a1, |s| s.p99_us), &field(b1, |s| s.p99_us));
        row("QD1 IOPS", &field(a1, |s| s.iops), &field(b1, |s| s.iops));
        row("QD32 IOPS", a32, b32);
    };
    compare(0, 1);
    if with_async {
        compare(2, 0);
        compare(2, 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The run function of a driver, by name.
fn run_driver(name: &str) -> fn(&Path, usize, Span) -> Sample {
    match name {
        "virtq" => run_virtq,
        "virtio-driver" => run_blkio,
        "virtq-async" => run_virtq_async,
        other => panic!("--driver {other}: virtq, virtq-async or virtio-driver"),
    }
}
