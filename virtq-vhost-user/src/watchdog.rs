//! A deadline on blocking socket I/O that rust-vmm's `vhost` crate does for us.
//!
//! `vhost` reads and writes its unix socket in loops that retry `EAGAIN`, so a socket
//! timeout (`SO_RCVTIMEO`, `SO_SNDTIMEO`) would turn a silent peer into a busy loop rather
//! than an error. Instead a watchdog thread shuts the socket down (`shutdown(2)`) when an
//! armed deadline passes: the blocked `recvmsg` then sees end-of-file and the blocked
//! `sendmsg` `EPIPE`, the request fails, and the caller learns from [`Watchdog::disarm`]
//! that the deadline was the reason. Both ends use it: the frontend for each control
//! request, the back end for each message it receives and answers.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Shuts a socket down when an armed deadline passes.
pub(crate) struct Watchdog {
    state: Mutex<WatchState>,
    cv: Condvar,
}

#[derive(Default)]
struct WatchState {
    deadline: Option<Instant>,
    /// Time left on a paused deadline.
    paused: Option<Duration>,
    fired: bool,
    stop: bool,
}

impl Watchdog {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self, fd: RawFd) {
        let mut s = self.lock();
        while !s.stop {
            match s.deadline {
                None => s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        // SAFETY: `fd` stays open until this thread has been joined (the
                        // owner of `WatchdogThread` calls `stop` before closing it);
                        // shutdown touches no memory.
                        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                        s.fired = true;
                        s.deadline = None;
                    } else {
                        s = self.cv.wait_timeout(s, d - now).unwrap_or_else(|e| e.into_inner()).0;
                    }
                }
            }
        }
    }

    /// Shuts the socket down at `deadline` unless disarmed first.
    pub fn arm(&self, deadline: Instant) {
        let mut s = self.lock();
        s.deadline = Some(deadline);
        s.paused = None;
        drop(s);
        self.cv.notify_one();
    }

    /// Disarms; returns whether the deadline passed (and the socket was shut down).
    pub fn disarm(&self) -> bool {
        let mut s = self.lock();
        s.deadline = None;
        s.paused = None;
        std::mem::take(&mut s.fired)
    }

    /// Stops the clock until the guard is dropped, for work of our own that the peer does
    /// not control the length of (the deadline is about the peer, not about us).
    pub fn pause(&self) -> PauseGuard<'_> {
        let mut s = self.lock();
        if let Some(d) = s.deadline.take() {
            s.paused = Some(d.saturating_duration_since(Instant::now()));
        }
        PauseGuard(self)
    }
}

/// Restarts a paused deadline with the time it had left.
pub(crate) struct PauseGuard<'a>(&'a Watchdog);

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        if let Some(left) = s.paused.take() {
            s.deadline = Some(Instant::now() + left);
            drop(s);
            self.0.cv.notify_one();
        }
    }
}

/// A watchdog and its thread. Call [`Self::stop`] before the socket is closed.
pub(crate) struct WatchdogThread {
    watchdog: Arc<Watchdog>,
    thread: Option<JoinHandle<()>>,
}

impl WatchdogThread {
    /// Starts watching socket `fd`, which must stay open until [`Self::stop`] returns.
    pub fn spawn(name: &str, fd: RawFd) -> io::Result<Self> {
        let watchdog = Arc::new(Watchdog { state: Mutex::new(WatchState::default()), cv: Condvar::new() });
        let w = watchdog.clone();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || w.run(fd))?;
        Ok(Self { watchdog, thread: Some(thread) })
    }

    /// The watchdog.
    pub fn get(&self) -> &Arc<Watchdog> {
        &self.watchdog
    }

    /// Ends the thread and waits for it; after this the socket may be closed.
    pub fn stop(&mut self) {
        self.watchdog.lock().stop = true;
        self.watchdog.cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WatchdogThread {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fires_once_and_pause_holds_the_clock() {
        let (mut a, _b) = UnixStream::pair().unwrap();
        let mut w = WatchdogThread::spawn("test-watchdog", a.as_raw_fd()).unwrap();
        // Paused, the deadline does not pass.
        w.get().arm(Instant::now() + Duration::from_millis(50));
        {
            let _p = w.get().pause();
            std::thread::sleep(Duration::from_millis(150));
        }
        assert!(!w.get().disarm(), "fired while paused");
        w.get().arm(Instant::now() + Duration::from_millis(20));
        // The blocked read ends at the deadline, with end-of-file.
        let mut buf = [0u8; 1];
        assert_eq!(a.read(&mut buf).unwrap(), 0);
        assert!(w.get().disarm());
        w.stop();
    }
}
