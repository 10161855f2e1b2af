//! Loom models of the lock-free protocol between a driver queue and a device queue.
//!
//! `RUSTFLAGS="--cfg loom" cargo test -p virtq --test loom --release`
//!
//! Every shared-ring field and fence goes through loom in this configuration, so each
//! model explores all interleavings (and all reorderings the fences allow) of a driver
//! thread and a device thread. Each model runs on all four layouts, rings of 2 and 4
//! entries, with and without `EVENT_IDX`; split rings start just below the 16-bit index
//! wrap so the operations cross it. The search is exhaustive (no preemption bound).
//!
//! Checked: no lost kick, no lost interrupt (plain, prepare + poll, and delayed), and no
//! token lost or duplicated. For async completions (`AsyncQueue`, whose lock is loom's
//! mutex in this configuration): no lost wakeup when a future registers its waker while its
//! buffer comes back, and none when a buffer comes back while the interrupt path
//! re-enables interrupts.

#![cfg(loom)]

mod common;

use common::{layout_features, LAYOUTS};
use loom::thread;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use virtq::testing::TestMemory;

use virtq::completion::{AsyncQueue, Submit};
use virtq::{Chain, DeviceConfig, DeviceQueue, LayoutKind, QueueConfig, Segments, Sg, Virtqueue};

type Driver = Virtqueue<u64, &'static TestMemory, ()>;
type Device = DeviceQueue<'static, TestMemory>;

/// Split rings start here: two steps below the wrap.
const SPLIT_START: u16 = 0xfffe;

struct Setup {
    mem: &'static TestMemory,
    driver: Driver,
    device: Device,
}

/// Runs `f` under loom for every layout, size and `EVENT_IDX` setting; prints how many
/// executions loom explored (see them with `--nocapture`).
fn model(f: impl Fn(LayoutKind, u16, bool) + Sync + Send + 'static) {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let f = std::sync::Arc::new(f);
    let executions = std::sync::Arc::new(AtomicUsize::new(0));
    for layout in LAYOUTS {
        for size in [2u16, 4] {
            for event_idx in [false, true] {
                let (f, executions) = (f.clone(), executions.clone());
                // No preemption bound unless LOOM_MAX_PREEMPTIONS sets one: these models are
                // small enough to explore exhaustively (the counts stop growing at 6).
                let builder = loom::model::Builder::new();
                builder.check(move || {
                    executions.fetch_add(1, Relaxed);
                    f(layout, size, event_idx)
                });
            }
        }
    }
    eprintln!("loom explored {} executions", executions.load(Relaxed));
}

fn setup(layout: LayoutKind, size: u16, event_idx: bool) -> Setup {
    // Leaked: loom needs 'static threads; a small block per execution.
    let mem: &'static TestMemory = Box::leak(Box::new(TestMemory::new(8192)));
    let features = layout_features(layout, event_idx, false);
    let mut driver = Driver::new(QueueConfig::new(0, size, features), mem, ()).unwrap();
    let split = matches!(layout, LayoutKind::Split | LayoutKind::SplitInOrder);
    let mut config = DeviceConfig::new(size, features, driver.desc_addr(), driver.avail_addr(), driver.used_addr());
    if split {
        driver.start_at(SPLIT_START);
        config.avail_base = SPLIT_START;
    }
    let device = DeviceQueue::new(mem, config).unwrap();
    Setup { mem, driver, device }
}

fn pop(device: &mut Device) -> Option<Chain> {
    let mut segs = Segments::<4>::new();
    device.pop(&mut segs).expect("a correct driver's ring")
}

/// One buffer through the ring before the model starts, so that event indices are stale
/// and must be moved for notifications to happen.
fn round_trip(s: &mut Setup, token: u64) {
    s.driver.add_inbuf(&[s.mem.alloc_sg(8)], token).unwrap();
    s.driver.kick_prepare();
    let chain = pop(&mut s.device).unwrap();
    s.device.complete(chain, 8);
    s.device.publish_used();
    assert_eq!(s.driver.get_buf().map(|u| u.token), Some(token));
}

#[test]
fn no_lost_kick_when_the_device_goes_to_sleep() {
    model(|layout, size, event_idx| {
        let mut s = setup(layout, size, event_idx);
        round_trip(&mut s, 0);
        s.device.disable_notifications();
        let sg = s.mem.alloc_sg(8);
        let Setup { mut driver, mut device, .. } = s;
        // Device: finish the work it sees, ask for kicks, look again; sleep if empty.
        let device_thread = thread::spawn(move || {
            let popped = pop(&mut device).is_some();
            !popped && !device.enable_notifications()
        });
        driver.add_inbuf(&[sg], 1).unwrap();
        let kicked = driver.kick_prepare().is_some();
        let device_sleeps = device_thread.join().unwrap();
        assert!(!device_sleeps || kicked, "{layout:?} size {size} event_idx {event_idx}: lost kick");
    });
}

#[test]
fn no_lost_interrupt_with_enable_cb() {
    model(|layout, size, event_idx| {
        let mut s = setup(layout, size, event_idx);
        round_trip(&mut s, 0);
        s.driver.disable_cb();
        s.driver.add_inbuf(&[s.mem.alloc_sg(8)], 1).unwrap();
        let chain = pop(&mut s.device).unwrap();
        let Setup { mut driver, mut device, .. } = s;
        let device_thread = thread::spawn(move || {
            device.complete(chain, 8);
            device.needs_notification()
        });
        // Driver: collect what is there, re-enable interrupts; sleep only if none pending.
        let got_early = driver.get_buf().is_some();
        let sleeps = !got_early && driver.enable_cb();
        let interrupted = device_thread.join().unwrap();
        assert!(!sleeps || interrupted, "{layout:?} size {size} event_idx {event_idx}: lost interrupt");
        if sleeps || !got_early {
            assert_eq!(driver.get_buf().map(|u| u.token), Some(1));
        }
    });
}

#[test]
fn no_lost_interrupt_with_enable_cb_prepare_and_poll() {
    model(|layout, size, event_idx| {
        let mut s = setup(layout, size, event_idx);
        round_trip(&mut s, 0);
        s.driver.disable_cb();
        s.driver.add_inbuf(&[s.mem.alloc_sg(8)], 1).unwrap();
        let chain = pop(&mut s.device).unwrap();
        let Setup { mut driver, mut device, .. } = s;
        let device_thread = thread::spawn(move || {
            device.complete(chain, 8);
            device.needs_notification()
        });
        let snapshot = driver.enable_cb_prepare();
        let sleeps = !driver.poll(snapshot);
        let interrupted = device_thread.join().unwrap();
        assert!(!sleeps || interrupted, "{layout:?} size {size} event_idx {event_idx}: lost interrupt");
        assert_eq!(driver.get_buf().map(|u| u.token), Some(1));
    });
}

#[test]
fn no_lost_interrupt_with_enable_cb_delayed() {
    model(|layout, size, event_idx| {
        let mut s = setup(layout, size, event_idx);
        s.driver.disable_cb();
        s.driver.add_inbuf(&[s.mem.alloc_sg(8)], 1).unwrap();
        s.driver.add_inbuf(&[s.mem.alloc_sg(8)], 2).unwrap();
        let first = pop(&mut s.device).unwrap();
        let second = pop(&mut s.device).unwrap();
        let Setup { mut driver, mut device, .. } = s;
        let device_thread = thread::spawn(move || {
            device.complete(first, 8);
            let a = device.needs_notification();
            device.complete(second, 8);
            let b = device.needs_notification();
            a || b
        });
        let sleeps = driver.enable_cb_delayed();
        let interrupted = device_thread.join().unwrap();
        assert!(!sleeps || interrupted, "{layout:?} size {size} event_idx {event_idx}: lost interrupt");
        let mut tokens: Vec<u64> = std::iter::from_fn(|| driver.get_buf().map(|u| u.token)).collect();
        tokens.sort();
        assert_eq!(tokens, vec![1, 2]);
    });
}

#[test]
fn tokens_come_back_exactly_once_under_concurrency() {
    model(|layout, size, event_idx| {
        let s = setup(layout, size, event_idx);
        let sgs = [s.mem.alloc_sg(8), s.mem.alloc_sg(8)];
        let Setup { mut driver, mut device, .. } = s;
        let device_thread = thread::spawn(move || {
            let mut served = 0;
            // Two passes: whatever is available at each, completed in pop order.
            for _ in 0..2 {
                while let Some(chain) = pop(&mut device) {
                    device.complete(chain, 4);
                    served += 1;
                }
                device.publish_used();
            }
            (device, served)
        });
        let mut got = Vec::new();
        driver.add_inbuf(&[sgs[0]], 1).unwrap();
        if let Some(u) = driver.get_buf() {
            got.push((u.token, u.len));
        }
        driver.add_inbuf(&[sgs[1]], 2).unwrap();
        let (mut device, served) = device_thread.join().unwrap();
        // Serve the rest, then collect everything.
        while let Some(chain) = pop(&mut device) {
            device.complete(chain, 4);
        }
        device.publish_used();
        got.extend(std::iter::from_fn(|| driver.get_buf().map(|u| (u.token, u.len))));
        assert!(served <= 2);
        got.sort();
        assert_eq!(got, vec![(1, 4), (2, 4)], "{layout:?} size {size} event_idx {event_idx}");
        assert!(driver.detach_unused_buf().is_none());
    });
}

// ---------------------------------------------------------------------------------------
// Async completions.

type Ring = Virtqueue<u16, &'static TestMemory, ()>;
type Async = AsyncQueue<u32, Ring>;

/// A waker that records its wake in a loom atomic.
#[derive(Default)]
struct Woken(loom::sync::atomic::AtomicBool);

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Woken {
    fn was_woken(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

fn poll_with(fut: &mut Submit<'static, u32, Ring>, woken: &Arc<Woken>) -> Poll<u32> {
    let waker = Waker::from(woken.clone());
    match Pin::new(fut).poll(&mut Context::from_waker(&waker)) {
        Poll::Ready(r) => Poll::Ready(r.expect("a completion").token),
        Poll::Pending => Poll::Pending,
    }
}

struct AsyncSetup {
    mem: &'static TestMemory,
    queue: &'static Async,
    device: Device,
}

/// An async queue and its device, after one buffer went through both (event indices stale).
fn setup_async(layout: LayoutKind, size: u16, event_idx: bool) -> AsyncSetup {
    let mem: &'static TestMemory = Box::leak(Box::new(TestMemory::new(8192)));
    let features = layout_features(layout, event_idx, false);
    let mut ring = Ring::new(QueueConfig::new(0, size, features), mem, ()).unwrap();
    let mut config = DeviceConfig::new(size, features, ring.desc_addr(), ring.avail_addr(), ring.used_addr());
    if matches!(layout, LayoutKind::Split | LayoutKind::SplitInOrder) {
        ring.start_at(SPLIT_START);
        config.avail_base = SPLIT_START;
    }
    let mut device = DeviceQueue::new(mem, config).unwrap();
    let queue: &'static Async = Box::leak(Box::new(AsyncQueue::new(ring).unwrap()));
    let sg: &'static [Sg] = Box::leak(Box::new([mem.alloc_sg(8)]));
    let mut fut = queue.submit_inbuf(sg, 0);
    let chain = pop(&mut device).unwrap();
    device.complete(chain, 8);
    device.publish_used();
    queue.interrupt();
    assert_eq!(poll_with(&mut fut, &Arc::default()), Poll::Ready(0));
    AsyncSetup { mem, queue, device }
}

/// The executor polls a future (registering its waker) while the device returns its buffer
/// and, if the driver asks for an interrupt, runs the interrupt path: the future is either
/// ready at that poll or woken.
#[test]
fn async_no_lost_wakeup_when_a_waker_registers_as_the_buffer_comes_back() {
    model(|layout, size, event_idx| {
        let AsyncSetup { mem, queue, mut device } = setup_async(layout, size, event_idx);
        let sg: &'static [Sg] = Box::leak(Box::new([mem.alloc_sg(8)]));
        let mut fut = queue.submit_inbuf(sg, 1);
        let chain = pop(&mut device).unwrap();
        let device_thread = thread::spawn(move || {
            device.complete(chain, 8);
            if device.needs_notification() {
                queue.interrupt();
            }
        });
        let woken = Arc::new(Woken::default());
        let first = poll_with(&mut fut, &woken);
        device_thread.join().unwrap();
        if first.is_pending() {
            assert!(woken.was_woken(), "{layout:?} size {size} event_idx {event_idx}: lost wakeup");
            assert_eq!(poll_with(&mut fut, &woken), Poll::Ready(1));
        }
    });
}

/// The interrupt path runs while the device returns a second buffer: either it takes that
/// buffer too (its re-check after re-enabling interrupts) or the device interrupts again.
#[test]
fn async_no_lost_wakeup_when_a_buffer_comes_back_while_interrupts_are_re_enabled() {
    model(|layout, size, event_idx| {
        let AsyncSetup { mem, queue, mut device } = setup_async(layout, size, event_idx);
        let sgs: &'static [[Sg; 1]; 2] = Box::leak(Box::new([[mem.alloc_sg(8)], [mem.alloc_sg(8)]]));
        let mut futs = [queue.submit_inbuf(&sgs[0], 1), queue.submit_inbuf(&sgs[1], 2)];
        let wakers = [Arc::new(Woken::default()), Arc::new(Woken::default())];
        for (f, w) in futs.iter_mut().zip(&wakers) {
            assert!(poll_with(f, w).is_pending());
        }
        let (a, b) = (pop(&mut device).unwrap(), pop(&mut device).unwrap());
        device.complete(a, 8);
        device.publish_used();
        let device_thread = thread::spawn(move || {
            device.complete(b, 8);
            device.needs_notification()
        });
        // The interrupt for the first buffer.
        queue.interrupt();
        if device_thread.join().unwrap() {
            queue.interrupt();
        }
        for (i, (f, w)) in futs.iter_mut().zip(&wakers).enumerate() {
            assert!(w.was_woken(), "{layout:?} size {size} event_idx {event_idx}: buffer {i} lost its wakeup");
            assert_eq!(poll_with(f, w), Poll::Ready(i as u32 + 1));
        }
    });
}
