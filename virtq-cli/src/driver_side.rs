//! The driver thread of the matrix: creates the ring, adds buffers, kicks, and takes them
//! back. Generic over the layout: each of the four gets its own compiled loops, on a
//! `DriverQueue` whose layout is fixed at compile time.

use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::time::Instant;

use virtq::testing::TestMemory;
use virtq::{DeviceConfig, DriverQueue, QueueConfig, Sg};

use crate::bench::{Mode, Timing, Workload, BUF_LEN};
use crate::layout::BenchLayout;
use crate::notify::{Control, Kicker};

/// Checks, cheaply, that every token added came back exactly once.
///
/// Tokens are sequence numbers `0, 1, 2, ...`. The count, the sum and the sum of squares of
/// the returned tokens must match those of `0..added`: a token lost and another one
/// duplicated would have to conspire on two independent sums to slip through. Both sums
/// wrap, as do the closed forms they are compared with (everything is modulo 2^64).
#[derive(Clone, Copy, Debug, Default)]
pub struct TokenCheck {
    /// Tokens returned.
    pub count: u64,
    sum: u64,
    sum_sq: u64,
}

impl TokenCheck {
    #[inline(always)]
    pub fn record(&mut self, token: u64) {
        self.count += 1;
        self.sum = self.sum.wrapping_add(token);
        self.sum_sq = self.sum_sq.wrapping_add(token.wrapping_mul(token));
    }

    /// Whether the tokens returned are exactly `0..added`, each once.
    pub fn verify(&self, added: u64) -> Result<(), String> {
        let n = u128::from(added);
        // Sums of 0..n, in u128 so they cannot overflow (n < 2^42 in any run that ends),
        // then truncated like the wrapping sums.
        let sum = (n * n.saturating_sub(1) / 2) as u64;
        let sum_sq = (n.saturating_sub(1) * n * (2 * n).saturating_sub(1) / 6) as u64;
        if self.count != added {
            return Err(format!("{added} buffers were added but {} came back", self.count));
        }
        if self.sum != sum || self.sum_sq != sum_sq {
            return Err(format!("{added} buffers came back, but not tokens 0..{added} each exactly once"));
        }
        Ok(())
    }
}

/// What the counters said at one instant; two of them delimit the measured window.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    pub at: Instant,
    /// Buffers back from the device.
    pub buffers: u64,
    /// Kicks delivered to the device.
    pub kicks: u64,
    /// Interrupts delivered to the driver.
    pub interrupts: u64,
}

/// The driver's account of one run.
#[derive(Debug)]
pub struct DriverOutcome {
    /// Buffers added (tokens `0..added`).
    pub added: u64,
    /// What came back.
    pub returned: TokenCheck,
    /// The counters at the start and the end of the measured window.
    pub window: (Snapshot, Snapshot),
    /// Round-trip times in ns, for the latency workload (empty for streaming).
    pub samples: Vec<u32>,
    /// Latency workload: the mean round trip of each block of [`LATENCY_BLOCK`] requests
    /// timed together, in ns.
    pub block_means: Vec<f32>,
}

/// Requests per latency block (see `Driver::latency`).
pub const LATENCY_BLOCK: usize = 64;

/// The driver queue of layout `L`, with the layout fixed at compile time.
pub type Queue<'a, L> = DriverQueue<u64, &'a TestMemory, Kicker<'a>, L>;

struct Driver<'a, L: BenchLayout> {
    queue: Queue<'a, L>,
    ctl: &'a Control,
    mode: Mode,
    /// `--buffers` of them, at least one per ring entry. Buffer `token % len` carries token
    /// `token`: at most a ring's worth are in flight, so a buffer never is twice (and the
    /// device never touches the bytes anyway: the benchmark measures the ring, not copies).
    bufs: Vec<Sg>,
    added: u64,
    returned: TokenCheck,
}

/// Runs the driver side of one cell. Whatever happens, it ends by stopping the run, so
/// that the device thread exits too.
pub fn run<L: BenchLayout>(
    mem: &TestMemory,
    ctl: &Control,
    to_device: SyncSender<DeviceConfig>,
    mode: Mode,
    workload: Workload,
    timing: Timing,
) -> Result<DriverOutcome, String> {
    let result = setup::<L>(mem, ctl, to_device, mode, timing.ring_size, timing.buffers).and_then(|d| match workload {
        Workload::Stream { batch } => d.stream(batch, timing),
        Workload::Latency => d.latency(timing),
    });
    ctl.stop();
    result
}

fn setup<'a, L: BenchLayout>(
    mem: &'a TestMemory,
    ctl: &'a Control,
    to_device: SyncSender<DeviceConfig>,
    mode: Mode,
    size: u16,
    buffers: u32,
) -> Result<Driver<'a, L>, String> {
    let features = crate::layout::features(L::KIND);
    let mut config = QueueConfig::new(0, size, features);
    // Poll mode never wants an interrupt: start with them suppressed, as Linux does for a
    // queue without a callback.
    config.callbacks = mode == Mode::Sleep;
    let queue = Queue::<L>::new(config, mem, Kicker(&ctl.device_bell))
        .map_err(|e| format!("driver: cannot create the queue: {e}"))?;
    // The device attaches to the ring where a transport would tell it to.
    to_device.send(device_config(&queue, features)).map_err(|_| "driver: the device thread is gone".to_string())?;
    let bufs = (0..buffers).map(|_| mem.alloc_sg(BUF_LEN)).collect();
    // Both workloads start busy; interrupts are enabled only right before sleeping.
    queue.disable_cb();
    Ok(Driver { queue, ctl, mode, bufs, added: 0, returned: TokenCheck::default() })
}

/// Where the device finds the ring `queue` created, as a transport would tell it.
pub fn device_config<L: BenchLayout>(queue: &Queue<'_, L>, features: virtq::Features) -> DeviceConfig {
    DeviceConfig::new(queue.vring_size(), features, queue.desc_addr(), queue.avail_addr(), queue.used_addr())
}

/// A used buffer is one that was added (`token < added`), and the device wrote nothing
/// into it: every buffer is read-only.
#[inline(always)]
fn check_used(token: u64, len: u32, added: u64) -> Result<(), String> {
    if token >= added {
        return Err(format!("driver: got back token {token} that was never added"));
    }
    if len != 0 {
        return Err(format!("driver: device claims {len} bytes written into a read-only buffer"));
    }
    Ok(())
}

impl<L: BenchLayout> Driver<'_, L> {
    /// Adds `n` single-segment buffers, then kicks once (if the device asked for it).
    fn add_batch(&mut self, n: u16) -> Result<(), String> {
        let mut left = n as usize;
        while left > 0 {
            // Buffer `token % size` carries `token`; a batch may wrap around `bufs`.
            let start = self.added as usize & (self.bufs.len() - 1);
            let sgs = &self.bufs[start..self.bufs.len().min(start + left)];
            let first = self.added;
            let added = self
                .queue
                .add_outbufs(sgs, |i| first + i as u64)
                .map_err(|e| format!("driver: add failed after {} buffers: {e}", self.added))?;
            self.added += added as u64;
            left -= added;
        }
        if !self.queue.kick() {
            return Err("driver: the kick failed".into());
        }
        Ok(())
    }

    /// Takes back every buffer the device has published; returns how many.
    fn reap(&mut self) -> Result<u64, String> {
        let before = self.returned.count;
        let (added, returned) = (self.added, &mut self.returned);
        let mut bad = None;
        self.queue.get_bufs(usize::MAX, |used| match check_used(used.token, used.len, added) {
            Ok(()) => returned.record(used.token),
            Err(e) => {
                bad.get_or_insert(e);
            }
        });
        if let Some(e) = bad {
            return Err(e);
        }
        let reaped = self.returned.count - before;
        if reaped > 0 {
            self.ctl.driver_progress.store(self.returned.count, Ordering::Relaxed);
        }
        Ok(reaped)
    }

    /// Takes back one used buffer, if there is one, and checks it.
    #[inline(always)]
    fn reap_one(&mut self) -> Result<bool, String> {
        let Some(used) = self.queue.get_buf() else { return Ok(false) };
        check_used(used.token, used.len, self.added)?;
        self.returned.record(used.token);
        Ok(true)
    }

    /// Called when there is nothing to do but wait for the device: in poll mode, one spin;
    /// in sleep mode, sleep until an interrupt unless buffers came back meanwhile.
    fn wait_for_used(&mut self) -> Result<(), String> {
        if self.ctl.stopped() {
            // Only the driver stops a healthy run, and it does not wait after that.
            return Err("driver: the device side gave up".into());
        }
        if self.queue.is_broken() {
            return Err(match self.queue.fault() {
                Some(fault) => format!("driver: the queue broke: {fault}"),
                None => "driver: the queue broke".into(),
            });
        }
        match self.mode {
            Mode::Poll => std::hint::spin_loop(),
            Mode::Sleep => {
                // Linux's pattern: enable the callback, then re-check, because the device
                // may have used buffers before it could see `used_event` move; those
                // bring no interrupt, so sleeping now would lose them.
                let snapshot = self.queue.enable_cb_prepare();
                if !self.queue.poll(snapshot) {
                    self.ctl.driver_bell.wait();
                    // The interrupt handler's first step: with EVENT_IDX it records that
                    // the device will not interrupt again, so `disable_cb` needs no write.
                    let _ = self.queue.interrupt();
                }
                // Busy again (NAPI style): no interrupts while we process.
                self.queue.disable_cb();
            }
        }
        Ok(())
    }

    fn snapshot(&self, at: Instant) -> Snapshot {
        Snapshot {
            at,
            buffers: self.returned.count,
            kicks: self.ctl.device_bell.rings(),
            interrupts: self.ctl.driver_bell.rings(),
        }
    }

    /// Streaming: keep the ring full, `batch` buffers per kick; after the measured window,
    /// stop adding and drain. The window opens after the warm-up and a first lap of the
    /// buffer pool.
    fn stream(mut self, batch: u16, timing: Timing) -> Result<DriverOutcome, String> {
        let start = Instant::now();
        let measure_from = start + timing.warmup;
        let mut first: Option<Snapshot> = None;
        let mut window = None;
        let mut iterations = 0u32;
        loop {
            let reaped = self.reap()?;
            let mut added = false;
            if window.is_none() {
                while self.queue.num_free() >= batch {
                    self.add_batch(batch)?;
                    added = true;
                }
            } else if self.returned.count == self.added {
                break;
            }
            // Reading the clock costs about as much as moving one buffer, so only look at
            // it every few rounds; that overshoots the window by well under a microsecond.
            iterations = iterations.wrapping_add(1);
            if window.is_none() && iterations.is_multiple_of(16) {
                let now = Instant::now();
                // Warm means every buffer of the pool has been through the ring once,
                // however long that takes on a busy machine.
                match first {
                    None if now >= measure_from && self.added >= u64::from(timing.buffers) => {
                        first = Some(self.snapshot(now));
                    }
                    Some(f) if now >= f.at + timing.duration => window = Some((f, self.snapshot(now))),
                    _ => {}
                }
            }
            if reaped == 0 && !added {
                self.wait_for_used()?;
            }
        }
        let window = window.expect("the loop ends only after the window closed");
        Ok(DriverOutcome {
            added: self.added,
            returned: self.returned,
            window,
            samples: Vec::new(),
            block_means: Vec::new(),
        })
    }

    /// Request/response: one buffer outstanding. Blocks of [`LATENCY_BLOCK`] requests take
    /// turns: in one, each request is timed on its own (one clock read per request, chained:
    /// a request's end is the next one's start), for the distribution; in the next, the
    /// block is timed as a whole and gives one mean, the way the cache-line round trip is
    /// measured, so that the two compare without the clock's cost.
    fn latency(mut self, timing: Timing) -> Result<DriverOutcome, String> {
        // Preallocate, and write every element now: an untouched page would cost a page
        // fault inside the timed loop. (Not zeroes: a zeroed allocation gets lazily mapped
        // zero pages from the OS, which is exactly the fault we want out of the loop.)
        let mut samples = vec![u32::MAX; timing.max_samples];
        let mut block_means = vec![f32::MAX; timing.max_samples / LATENCY_BLOCK + 1];
        let (mut n, mut blocks) = (0, 0);
        let start = Instant::now();
        let measure_from = start + timing.warmup;
        let measure_until = measure_from + timing.duration;
        let mut first: Option<Snapshot> = None;
        let last = loop {
            let t0 = Instant::now();
            if t0 >= measure_until || n + LATENCY_BLOCK > samples.len() {
                break self.snapshot(t0);
            }
            let measuring = t0 >= measure_from;
            if measuring && first.is_none() {
                first = Some(self.snapshot(t0));
            }
            // Timed one by one.
            let mut previous = t0;
            for _ in 0..LATENCY_BLOCK {
                self.request()?;
                let now = Instant::now();
                if measuring {
                    samples[n] = u32::try_from((now - previous).as_nanos()).unwrap_or(u32::MAX);
                    n += 1;
                }
                previous = now;
            }
            // Timed together.
            let t1 = Instant::now();
            for _ in 0..LATENCY_BLOCK {
                self.request()?;
            }
            if measuring {
                block_means[blocks] = t1.elapsed().as_nanos() as f32 / LATENCY_BLOCK as f32;
                blocks += 1;
            }
        };
        samples.truncate(n);
        block_means.truncate(blocks);
        // With a tiny sample budget the window may close before it opened: then it is empty.
        let first = first.unwrap_or(last);
        Ok(DriverOutcome { added: self.added, returned: self.returned, window: (first, last), samples, block_means })
    }

    /// One request: add a buffer, kick, wait for it to come back. Its response is the only
    /// buffer in flight, so it takes that one and does not look for more.
    #[inline(always)]
    fn request(&mut self) -> Result<(), String> {
        // One buffer: `add_outbuf`, as a request/response user would call it.
        let sg = self.bufs[self.added as usize & (self.bufs.len() - 1)];
        self.queue
            .add_outbuf(&[sg], self.added)
            .map_err(|e| format!("driver: add failed after {} buffers: {e}", self.added))?;
        self.added += 1;
        if !self.queue.kick() {
            return Err("driver: the kick failed".into());
        }
        while !self.reap_one()? {
            self.wait_for_used()?;
        }
        // The watchdog's view, on a line of its own.
        self.ctl.driver_progress.store(self.returned.count, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::TokenCheck;

    fn returned(tokens: impl IntoIterator<Item = u64>) -> TokenCheck {
        let mut check = TokenCheck::default();
        tokens.into_iter().for_each(|t| check.record(t));
        check
    }

    #[test]
    fn every_token_once_in_any_order_passes() {
        assert!(returned([]).verify(0).is_ok());
        assert!(returned([0]).verify(1).is_ok());
        assert!(returned([3, 1, 0, 2, 4]).verify(5).is_ok());
        assert!(returned(0..100_000).verify(100_000).is_ok());
    }

    #[test]
    fn lost_duplicated_or_swapped_tokens_fail() {
        assert!(returned([0, 1, 2]).verify(4).is_err(), "one lost");
        assert!(returned([0, 1, 1, 2]).verify(3).is_err(), "one twice");
        // Same count and same sum: 1 and 3 replaced by 0 and 4 (0 then twice).
        assert!(returned([0, 0, 2, 4, 4]).verify(5).is_err(), "same sum");
    }
}
