//! Stress test of `AsyncQueue`: 10,000 futures in flight at once over a device on another
//! thread, for each of the four layouts.
//!
//! - The ring has 64 entries, so most futures wait for space; the device completes what it
//!   holds in random order (in order on in-order layouts), a random number at a time, and
//!   runs the interrupt path itself whenever `needs_notification` says the driver wants
//!   one, as an interrupt handler would.
//! - The executor (this thread) polls each future when its waker fires, sometimes with a
//!   new waker, and drops futures at random: some while they wait for space, some while
//!   their buffers are in the ring.
//! - Checked: every completed future gets its own buffer, with the bytes and length the
//!   device wrote; no future hangs (a watchdog fails the test if nothing moves for 10 s);
//!   at the end every buffer has come back to its owner exactly once (counted in its
//!   `Drop`), and none was released while the device still held it.
//!
//! The device reaches the buffers through their real addresses (each buffer is a heap
//! allocation it writes into), so a buffer released too early is a use after free, which
//! the AddressSanitizer run of this test reports (`scripts/test.sh`):
//!
//! ```sh
//! RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zsanitizer=address" CARGO_TARGET_DIR=target/asan \
//!     cargo test -p virtq --test async_stress --target x86_64-unknown-linux-gnu
//! ```
//!
//! `VIRTQ_ASYNC_STRESS_FUTURES` changes the number of futures, `VIRTQ_STRESS_SEED` the seed.

mod common;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use common::{layout_features, LAYOUTS};
use virtq::completion::{AsyncQueue, Submit};
use virtq::{DeviceConfig, DeviceQueue, GuestMemory, IdentityDma, LayoutKind, QueueConfig, Sg, Virtqueue};

const RING: u16 = 64;
const BUF_BYTES: usize = 64;
const STUCK_AFTER: Duration = Duration::from_secs(10);

/// This process's memory as the device's guest memory: the driver hands it real addresses
/// (`IdentityDma` rings, heap buffers).
struct Process;

// SAFETY: test only. The device is this test's own code and follows only addresses the
// driver put in its ring (ring memory that lives as long as the queue, and buffers that
// the queue must keep alive while the device holds them). Whether the queue does is what
// this test checks; under AddressSanitizer a buffer freed too early is reported.
unsafe impl GuestMemory for Process {
    fn translate(&self, addr: u64, _len: u64) -> Option<NonNull<u8>> {
        NonNull::new(addr as *mut u8)
    }
}

static PROCESS: Process = Process;

type Ring = Virtqueue<u16, IdentityDma, ()>;
type Queue = AsyncQueue<Buf, Ring>;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Per buffer: how often it came back, whether the device holds it now.
struct Ledger {
    returns: Vec<AtomicU32>,
    device_holds: Vec<AtomicBool>,
    released_while_held: AtomicUsize,
}

/// A buffer: a heap allocation the device writes, and its id in its first 8 bytes.
struct Buf {
    id: usize,
    data: Box<[u8; BUF_BYTES]>,
    ledger: Arc<Ledger>,
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.ledger.device_holds[self.id].load(Relaxed) {
            self.ledger.released_while_held.fetch_add(1, Relaxed);
        }
        self.ledger.returns[self.id].fetch_add(1, Relaxed);
    }
}

/// Byte `i` of what the device writes into buffer `id` after its header.
fn device_byte(id: usize, i: usize) -> u8 {
    (id as u8).wrapping_mul(31).wrapping_add(i as u8)
}

fn len_of(id: usize) -> u32 {
    (8 + id % (BUF_BYTES - 8)) as u32
}

/// A future's waker: queues its index for the executor and unparks it.
struct TaskWaker {
    index: usize,
    ready: Arc<Mutex<VecDeque<usize>>>,
    executor: Thread,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.ready.lock().unwrap().push_back(self.index);
        self.executor.unpark();
    }
}

fn futures_count() -> usize {
    std::env::var("VIRTQ_ASYNC_STRESS_FUTURES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}

fn seed() -> u64 {
    std::env::var("VIRTQ_STRESS_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_a5a5_1234_9876)
}

#[test]
fn ten_thousand_futures_with_random_drops_return_every_buffer_exactly_once() {
    for (i, layout) in LAYOUTS.into_iter().enumerate() {
        run(layout, futures_count(), seed() ^ i as u64);
    }
}

fn run(layout: LayoutKind, n: usize, seed: u64) {
    let in_order = matches!(layout, LayoutKind::SplitInOrder | LayoutKind::PackedInOrder);
    let features = layout_features(layout, true, false);
    let ring = Ring::new(QueueConfig::new(0, RING, features), IdentityDma, ()).expect("ring");
    let config = DeviceConfig::new(RING, features, ring.desc_addr(), ring.avail_addr(), ring.used_addr());
    let mut device = DeviceQueue::new(&PROCESS, config).expect("device");
    let queue: Queue = AsyncQueue::new(ring).expect("empty ring");

    let ledger = Arc::new(Ledger {
        returns: (0..n).map(|_| AtomicU32::new(0)).collect(),
        device_holds: (0..n).map(|_| AtomicBool::new(false)).collect(),
        released_while_held: AtomicUsize::new(0),
    });
    let bufs: Vec<Buf> = (0..n)
        .map(|id| {
            let mut data = Box::new([0u8; BUF_BYTES]);
            data[..8].copy_from_slice(&(id as u64).to_le_bytes());
            Buf { id, data, ledger: ledger.clone() }
        })
        .collect();
    // The heap block of each buffer stays where it is while the `Buf` moves.
    let sgs: Vec<[Sg; 1]> = bufs.iter().map(|b| [Sg::new(b.data.as_ptr() as u64, BUF_BYTES as u32)]).collect();

    let stop = AtomicBool::new(false);
    let progress = AtomicUsize::new(0);
    thread::scope(|scope| {
        let (queue, stop, progress, ledger) = (&queue, &stop, &progress, &ledger);
        let device_thread = scope.spawn(move || {
            let mut rng = Rng(seed ^ 0xdead_beef);
            let mut held = VecDeque::new();
            while !stop.load(Relaxed) {
                loop {
                    let mut segs = Vec::new();
                    let Some(chain) = device.pop(&mut segs).expect("a correct driver") else { break };
                    let mut header = [0u8; 8];
                    segs[0].read_at(0, &mut header);
                    let id = u64::from_le_bytes(header) as usize;
                    assert!(!ledger.device_holds[id].swap(true, Relaxed), "buffer {id} popped twice");
                    held.push_back((chain, segs, id));
                }
                if held.is_empty() {
                    thread::yield_now();
                    continue;
                }
                for _ in 0..1 + rng.below(held.len()) {
                    let at = if in_order { 0 } else { rng.below(held.len()) };
                    let (chain, segs, id) = held.remove(at).expect("held");
                    let bytes: Vec<u8> = (8..len_of(id) as usize).map(|i| device_byte(id, i)).collect();
                    segs[0].write_at(8, &bytes);
                    ledger.device_holds[id].store(false, Relaxed);
                    device.complete(chain, len_of(id));
                }
                if device.needs_notification() {
                    progress.fetch_add(queue.interrupt(), Relaxed);
                }
            }
        });

        let ready = Arc::new(Mutex::new(VecDeque::new()));
        let waker_of = |index: usize| {
            Waker::from(Arc::new(TaskWaker { index, ready: ready.clone(), executor: thread::current() }))
        };
        let mut futs: Vec<Option<Submit<'_, Buf, Ring>>> =
            bufs.into_iter().zip(&sgs).map(|(b, sg)| Some(queue.submit_inbuf(sg, b))).collect();
        let mut wakers: Vec<Waker> = (0..n).map(waker_of).collect();
        let mut rng = Rng(seed);
        let (mut completed, mut dropped_in_ring, mut dropped_waiting) = (0usize, 0usize, 0usize);
        let mut pending = n;
        // Futures seen pending with their buffers in the ring.
        let mut in_ring = Vec::new();
        // Every future is polled once; then only when woken.
        ready.lock().unwrap().extend(0..n);
        let mut last_progress = (Instant::now(), 0usize);
        while pending > 0 {
            let next = ready.lock().unwrap().pop_front();
            let Some(index) = next else {
                assert!(!device_thread.is_finished(), "{layout:?}: the device thread died");
                let moved = completed + dropped_in_ring + dropped_waiting + progress.load(Relaxed);
                if moved != last_progress.1 {
                    last_progress = (Instant::now(), moved);
                }
                assert!(
                    last_progress.0.elapsed() < STUCK_AFTER,
                    "{layout:?}: no progress for {STUCK_AFTER:?}: {pending} futures pending, {} buffers in the ring",
                    queue.in_flight()
                );
                thread::park_timeout(Duration::from_millis(1));
                continue;
            };
            let Some(fut) = futs[index].as_mut() else { continue };
            // Now and then a drop instead of a poll, wherever the future is.
            if rng.chance(15) {
                if fut.is_submitted() {
                    dropped_in_ring += 1;
                } else {
                    dropped_waiting += 1;
                }
                futs[index] = None;
                pending -= 1;
                continue;
            }
            if rng.chance(5) {
                wakers[index] = waker_of(index);
            }
            match Pin::new(fut).poll(&mut Context::from_waker(&wakers[index])) {
                Poll::Pending => {
                    if futs[index].as_ref().is_some_and(|f| f.is_submitted()) {
                        in_ring.push(index);
                    }
                }
                Poll::Ready(Ok(used)) => {
                    let buf = used.token;
                    assert_eq!((buf.id, used.len), (index, len_of(index)), "{layout:?}: another buffer");
                    for i in 8..used.len as usize {
                        assert_eq!(buf.data[i], device_byte(index, i), "{layout:?}: buffer {index} byte {i}");
                    }
                    completed += 1;
                    pending -= 1;
                    futs[index] = None;
                }
                Poll::Ready(Err(e)) => panic!("{layout:?}: future {index} failed: {e}"),
            }
            // Sometimes drop a future whose buffer went into the ring lately (the device
            // may not have seen it yet), or any other, woken or not.
            if rng.chance(6) {
                let other = if !in_ring.is_empty() && rng.chance(50) {
                    in_ring.swap_remove(rng.below(in_ring.len()))
                } else {
                    rng.below(n)
                };
                if let Some(f) = futs[other].take() {
                    if f.is_submitted() {
                        dropped_in_ring += 1;
                    } else {
                        dropped_waiting += 1;
                    }
                    pending -= 1;
                }
            }
        }
        // The device still holds the buffers of futures dropped in the ring: it returns
        // them, and the queue drops them then.
        let t = Instant::now();
        while queue.in_flight() > 0 {
            assert!(t.elapsed() < STUCK_AFTER, "{layout:?}: {} buffers never came back", queue.in_flight());
            thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Relaxed);
        device_thread.join().expect("device thread");
        assert!(dropped_in_ring > 0 && dropped_waiting > 0, "{layout:?}: drops of both kinds");
        assert_eq!(completed + dropped_in_ring + dropped_waiting, n);
        eprintln!(
            "{layout:?}: {n} futures, {completed} completed, {dropped_in_ring} dropped in the ring, \
             {dropped_waiting} dropped while waiting"
        );
    });
    drop(queue);
    assert_eq!(ledger.released_while_held.load(Relaxed), 0, "{layout:?}: a buffer released while the device held it");
    for (id, r) in ledger.returns.iter().enumerate() {
        assert_eq!(r.load(Relaxed), 1, "{layout:?}: buffer {id} came back {} times", r.load(Relaxed));
    }
}
