//! Notifications between the two threads: a doorbell each side can sleep on, and the
//! small control block the driver, the device and the watchdog share.
//!
//! A doorbell stands in for a real transport's notification (an MMIO doorbell write, an
//! eventfd, an interrupt line). Ringing a bell is cheap while nobody sleeps on it (one
//! atomic swap); only a ring that finds the waiter asleep pays for `unpark`, the way a
//! futex only enters the kernel when there is a waiter.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread::{self, Thread};

use virtq::{Notify, NotifyData};

/// Aligns `T` to its own pair of cache lines, so that a value written by one thread does
/// not share a line with values written by the other (128 bytes: x86 prefetches lines in
/// adjacent pairs, and some arm64 parts have 128-byte lines).
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct CachePadded<T>(pub T);

impl<T> Deref for CachePadded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// Nobody is asleep and no ring is pending.
const IDLE: u32 = 0;
/// Rung since the waiter last looked.
const RUNG: u32 = 1;
/// The waiter is asleep (or about to be) and must be unparked by the next ring.
const SLEEPING: u32 = 2;

/// A wakeup for one waiting thread, with a count of the notifications it carried.
///
/// A ring is never lost: one that arrives while the waiter is awake stays pending and makes
/// the next [`Doorbell::wait`] return at once. That can be a stale wakeup (the work it
/// announced was already handled), which is harmless because callers re-check the ring
/// after every wait.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct Doorbell {
    state: AtomicU32,
    /// Notifications the protocol asked for (kicks, or interrupts), for the statistics.
    rings: AtomicU64,
    waiter: OnceLock<Thread>,
}

impl Doorbell {
    /// Makes the calling thread the one that [`Doorbell::wait`]s on this bell. Call it
    /// before the first wait; only one thread may ever wait on a bell.
    pub fn register_waiter(&self) {
        let registered = self.waiter.set(thread::current());
        debug_assert!(registered.is_ok(), "a doorbell has one waiter");
    }

    /// Delivers one notification and counts it.
    pub fn ring(&self) {
        // Only the ringing thread writes the count, so a relaxed add is exact for it.
        self.rings.fetch_add(1, Ordering::Relaxed);
        self.wake();
    }

    /// Wakes the waiter without counting a notification: for control messages (stop,
    /// abort) that are not part of the protocol being measured.
    pub fn wake(&self) {
        // AcqRel: release publishes whatever the ringer wrote before (the waiter acquires
        // it in `wait`); acquire pairs with the waiter's registration before it went to
        // sleep, so `waiter` is visible when we see SLEEPING.
        if self.state.swap(RUNG, Ordering::AcqRel) == SLEEPING {
            if let Some(t) = self.waiter.get() {
                t.unpark();
            }
        }
    }

    /// Sleeps until the bell rings, or returns at once if it rang since the last wait.
    pub fn wait(&self) {
        if self.state.compare_exchange(IDLE, SLEEPING, Ordering::AcqRel, Ordering::Acquire).is_err() {
            // A ring is pending. Swap (not store) so that we also acquire any ring that
            // lands between the failed exchange and now.
            self.state.swap(IDLE, Ordering::Acquire);
            return;
        }
        loop {
            // Once SLEEPING is visible, the next ring unparks us; park keeps that token
            // even if the unpark comes before we get here, so no wakeup is lost.
            thread::park();
            if self.state.compare_exchange(RUNG, IDLE, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                return;
            }
            // A spurious wakeup, or a stale unpark token: still SLEEPING, park again.
        }
    }

    /// Notifications delivered so far.
    pub fn rings(&self) -> u64 {
        self.rings.load(Ordering::Relaxed)
    }
}

/// The driver queue's transport notifier: a kick rings the device's doorbell.
pub struct Kicker<'a>(pub &'a Doorbell);

impl Notify for Kicker<'_> {
    fn notify(&self, _data: NotifyData) -> bool {
        self.0.ring();
        true
    }
}

/// What the driver thread, the device thread and the watchdog of one run share.
#[derive(Debug, Default)]
pub struct Control {
    /// Driver kicks ring it; the device sleeps on it.
    pub device_bell: Doorbell,
    /// Device interrupts ring it; the driver sleeps on it.
    pub driver_bell: Doorbell,
    /// Set when the run is over: by the driver once every buffer is back (the device
    /// then exits when idle), or by either side when it fails (the other gives up).
    pub stop: CachePadded<AtomicBool>,
    /// Buffers the driver got back so far, for the watchdog.
    pub driver_progress: CachePadded<AtomicU64>,
    /// Chains the device popped so far, for the watchdog.
    pub device_progress: CachePadded<AtomicU64>,
}

impl Control {
    /// Ends the run: sets `stop` and wakes both sides so that neither sleeps through it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.device_bell.wake();
        self.driver_bell.wake();
    }

    /// Whether the run is over.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    /// Ping-pong through two doorbells, with the same "publish, then ring; wait, then
    /// re-check" discipline as the ring: a lost wakeup would hang (the test times out).
    #[test]
    fn ping_pong_loses_no_wakeup() {
        const ROUNDS: u64 = 20_000;
        let (ping, pong) = (Doorbell::default(), Doorbell::default());
        let (sent, echoed) = (AtomicU64::new(0), AtomicU64::new(0));
        thread::scope(|s| {
            s.spawn(|| {
                pong.register_waiter();
                for i in 1..=ROUNDS {
                    sent.store(i, Ordering::Release);
                    ping.ring();
                    while echoed.load(Ordering::Acquire) != i {
                        pong.wait();
                    }
                }
            });
            s.spawn(|| {
                ping.register_waiter();
                for i in 1..=ROUNDS {
                    while sent.load(Ordering::Acquire) != i {
                        ping.wait();
                    }
                    echoed.store(i, Ordering::Release);
                    pong.ring();
                }
            });
        });
        assert_eq!(ping.rings(), ROUNDS);
        assert_eq!(pong.rings(), ROUNDS);
    }

    #[test]
    fn a_ring_before_the_wait_is_kept() {
        let bell = Doorbell::default();
        bell.register_waiter();
        bell.ring();
        bell.wait(); // returns at once: the ring is pending
                     // A wake that comes while the waiter sleeps unparks it.
        thread::scope(|s| {
            s.spawn(|| {
                thread::sleep(Duration::from_millis(20));
                bell.wake();
            });
            bell.wait();
        });
        assert_eq!(bell.rings(), 1, "wake() is not counted");
    }
}
