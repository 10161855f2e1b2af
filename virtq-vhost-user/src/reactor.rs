//! Async completions for vhost-user queues: the reactor that turns a back end's call
//! eventfd into [`AsyncQueue::interrupt`].
//!
//! An [`AsyncVhostQueue`] is a [`Queue`] inside a [`virtq::completion::AsyncQueue`]: tasks
//! submit buffers and await each one. Something must wait on the queue's call eventfd and
//! run the interrupt path when the back end signals; that is the reactor. Two are here:
//!
//! - [`Reactor`]: a thread that `poll`s the call eventfds of any number of queues, for any
//!   executor (or none: the futures can be polled by hand);
//! - [`drive`] (cargo feature `tokio`): a task for the tokio runtime that waits on the call
//!   eventfd through tokio's `AsyncFd`, on the runtime's own epoll; [`drive_with`] can
//!   busy-poll the ring instead, or poll then sleep.
//!
//! Both also watch the connection: when the back end hangs up they break the queue, so
//! every pending future fails instead of waiting forever.
//!
//! The wait follows libblkio's rule for its completion fd, which is Linux's for
//! interrupts: read the eventfd, then run the interrupt path, which takes every used
//! buffer and re-enables interrupts with a final check of the ring (`enable_cb_prepare`,
//! then `poll`). A buffer used after that check makes the back end signal the eventfd
//! again, so no completion is missed between the check and the next wait.
//!
//! ```no_run
//! # #[cfg(feature = "tokio")]
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use virtq_vhost_user::reactor::{drive, AsyncVhostQueue};
//! use virtq_vhost_user::{ConnectOptions, Connection};
//!
//! let conn = Connection::connect("/tmp/vhost.sock", &ConnectOptions::default())?;
//! let queue: Arc<AsyncVhostQueue<Vec<u8>>> = Arc::new(AsyncVhostQueue::new(conn.create_queue(0, 256, 0)?)?);
//! tokio::spawn(drive(queue.clone()));
//! let buf = conn.memory().alloc(4096).unwrap();
//! let sg = [buf.sg()];
//! let used = queue.submit_premapped(&[], &[&sg], vec![0u8]).await?;
//! println!("the device wrote {} bytes", used.len);
//! # Ok(())
//! # }
//! ```

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtq::completion::{AsDriverQueue, AsyncQueue};
use virtq::AnyDriverLayout;
use vmm_sys_util::eventfd::EventFd;

#[cfg(feature = "tokio")]
use crate::frontend::WaitMode;
use crate::frontend::{Kicker, Queue, QueueDma, VhostVirtqueue};

/// A vhost-user queue whose buffers are awaited. `B` is what each submission owns (its
/// buffers in guest memory, typically) and gets back on completion.
///
/// Its lock sleeps when contended (`parking_lot`): a userspace thread holding it may be
/// preempted, and a spinning waiter would then burn its time slice.
pub type AsyncVhostQueue<B> = AsyncQueue<B, Queue<u16>, parking_lot::RawMutex>;

impl AsDriverQueue for Queue<u16> {
    type Dma = QueueDma;
    type Notify = Kicker;
    type Layout = AnyDriverLayout;

    fn driver_queue(&self) -> &VhostVirtqueue<u16> {
        self.vq()
    }

    fn driver_queue_mut(&mut self) -> &mut VhostVirtqueue<u16> {
        self.vq_mut()
    }
}

/// What the reactor thread needs of a queue, whatever its buffer type.
trait Completions: Send + Sync {
    fn interrupt(&self) -> usize;
    fn break_queue(&self);
}

impl<B: Send> Completions for AsyncVhostQueue<B> {
    fn interrupt(&self) -> usize {
        AsyncQueue::interrupt(self)
    }

    fn break_queue(&self) {
        AsyncQueue::break_queue(self)
    }
}

/// A thread that runs the interrupt path of its queues whenever their back ends signal,
/// and breaks a queue whose back end hangs up. Stopped (and joined) on drop.
pub struct Reactor {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Reactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor").field("running", &self.thread.is_some()).finish()
    }
}

impl Reactor {
    /// Starts the reactor thread for `queues`.
    pub fn spawn<B: Send + 'static>(queues: impl IntoIterator<Item = Arc<AsyncVhostQueue<B>>>) -> io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let mut watched = Vec::new();
        for q in queues {
            // The raw descriptors stay open while the queue lives, which the thread's `Arc`
            // guarantees.
            let (call, sock) = q.with_queue(|q| (q.call_event().as_raw_fd(), q.socket().as_raw_fd()));
            watched.push((q as Arc<dyn Completions>, call, sock));
        }
        let stop_fd = stop.as_raw_fd();
        let thread =
            std::thread::Builder::new().name("virtq-reactor".into()).spawn(move || run_reactor(stop_fd, watched))?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_reactor(stop: RawFd, queues: Vec<(Arc<dyn Completions>, RawFd, RawFd)>) {
    // pollfd 0 is the stop eventfd; then each queue's call eventfd and socket.
    let mut fds = vec![libc::pollfd { fd: stop, events: libc::POLLIN, revents: 0 }];
    for &(_, call, sock) in &queues {
        fds.push(libc::pollfd { fd: call, events: libc::POLLIN, revents: 0 });
        fds.push(libc::pollfd { fd: sock, events: libc::POLLRDHUP, revents: 0 });
    }
    // Whatever was used before the thread started.
    for (q, _, _) in &queues {
        q.interrupt();
    }
    loop {
        // SAFETY: `fds` is a live array of `fds.len()` pollfds; every descriptor in it is
        // open (the stop eventfd until this thread is joined, the queues' through their
        // `Arc`s), and poll ignores the negative ones.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Nothing sensible left to wait on: fail the futures rather than strand them.
            queues.iter().for_each(|(q, _, _)| q.break_queue());
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        for (i, (q, _, _)) in queues.iter().enumerate() {
            let (call, sock) = (1 + 2 * i, 2 + 2 * i);
            if fds[call].revents & libc::POLLIN != 0 {
                drain_eventfd(fds[call].fd);
                q.interrupt();
            }
            if fds[sock].revents != 0 {
                // Used buffers that arrived before the hang-up still count.
                q.interrupt();
                q.break_queue();
                // Hang-ups stay readable: stop watching.
                fds[sock].fd = -1;
                fds[call].fd = -1;
            }
        }
    }
}

/// Resets a non-blocking eventfd's counter (`EAGAIN` means it was zero).
fn drain_eventfd(fd: RawFd) {
    let mut count = 0u64;
    // SAFETY: reads 8 bytes into a local u64 from an open eventfd (see `run_reactor`).
    unsafe { libc::read(fd, (&raw mut count).cast(), 8) };
}

/// Drives an [`AsyncVhostQueue`] on the tokio runtime: waits on its call eventfd with
/// `AsyncFd` and runs the interrupt path on each signal, until the back end hangs up (then
/// the queue is broken, its futures fail, and this returns `Ok`). Spawn it next to the
/// tasks that use the queue: `tokio::spawn(drive(queue.clone()))`.
#[cfg(feature = "tokio")]
pub async fn drive<B: Send>(queue: Arc<AsyncVhostQueue<B>>) -> io::Result<()> {
    drive_with(queue, WaitMode::Sleep).await
}

/// [`drive`], waiting for completions as `wait` says:
///
/// - [`WaitMode::Sleep`]: on the call eventfd, interrupts enabled;
/// - [`WaitMode::Poll`]: busy-polls the ring with interrupts suppressed, and after each batch
///   of completions yields to the tasks it woke: a CPU of its own, and no eventfd signal
///   from the back end (which costs the back end a system call per batch);
/// - [`WaitMode::Hybrid`]: polls until nothing has completed for that long, then sleeps
///   until the next signal.
///
/// While it polls, the runtime's thread runs nothing else but the tasks it wakes (and, now
/// and then, whatever else is ready): give it a runtime, or a thread, of its own.
#[cfg(feature = "tokio")]
pub async fn drive_with<B: Send>(queue: Arc<AsyncVhostQueue<B>>, wait: WaitMode) -> io::Result<()> {
    let fds = tokio_fds::Fds::register(&queue)?;
    // Submissions leave their kick to this task, which runs after them: one kick per batch.
    // However this task ends (a hang-up, an error, aborted), they kick for themselves again.
    let _kicks = tokio_fds::DeferredKicks::start(&queue).await;
    loop {
        if wait != WaitMode::Sleep && tokio_fds::spin(&queue, wait).await {
            return Ok(());
        }
        if fds.sleep(&queue, wait == WaitMode::Sleep).await? {
            return Ok(());
        }
    }
}

#[cfg(feature = "tokio")]
mod tokio_fds {
    use std::io;
    use std::os::fd::OwnedFd;
    use std::task::Poll;
    use std::time::{Duration, Instant};

    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;
    use vmm_sys_util::eventfd::EventFd;

    use super::AsyncVhostQueue;
    use crate::frontend::WaitMode;

    /// Kicks deferred to the reactor task while it lives.
    pub(super) struct DeferredKicks<'a, B: Send>(&'a AsyncVhostQueue<B>);

    impl<'a, B: Send> DeferredKicks<'a, B> {
        pub(super) async fn start(queue: &'a AsyncVhostQueue<B>) -> Self {
            std::future::poll_fn(|cx| {
                queue.defer_kicks_to(cx.waker());
                Poll::Ready(())
            })
            .await;
            Self(queue)
        }
    }

    impl<B: Send> Drop for DeferredKicks<'_, B> {
        fn drop(&mut self) {
            self.0.kick_immediately();
        }
    }

    /// How long a poll finds nothing before it asks the socket whether the back end is
    /// still there (a system call).
    const SOCKET_CHECK: Duration = Duration::from_millis(2);

    /// The call eventfd and the socket, duplicated and registered with the runtime.
    pub(super) struct Fds {
        call: AsyncFd<EventFd>,
        sock: AsyncFd<OwnedFd>,
    }

    impl Fds {
        pub(super) fn register<B>(queue: &AsyncVhostQueue<B>) -> io::Result<Self> {
            let (call, sock) = queue
                .with_queue(|q| Ok::<_, io::Error>((q.call_event().try_clone()?, q.socket().try_clone_to_owned()?)))?;
            // SAFETY: an `EventFd` and an `OwnedFd` own their descriptor: it stays open, the
            // same file description, and their `as_raw_fd` the same number until they are
            // dropped, which happens only with the `AsyncFd`.
            let call =
                unsafe { AsyncFd::register_with_interest(call, Interest::READABLE) }.map_err(|e| e.into_parts().1)?;
            // SAFETY: as above.
            let sock =
                unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }.map_err(|e| e.into_parts().1)?;
            Ok(Self { call, sock })
        }

        /// Enables interrupts (the interrupt path re-checks the ring) and sleeps until the
        /// back end signals, then runs the interrupt path; `forever`: again and again.
        /// Returns whether the back end hung up (the queue is then broken).
        pub(super) async fn sleep<B: Send>(&self, queue: &AsyncVhostQueue<B>, forever: bool) -> io::Result<bool> {
            queue.interrupt();
            std::future::poll_fn(|cx| loop {
                // Woken by submissions, or after the tasks it woke ran: their kick.
                queue.defer_kicks_to(cx.waker());
                queue.kick();
                // A hang-up first: the ring's last used buffers still complete.
                if let Poll::Ready(guard) = self.sock.poll_read_ready(cx) {
                    let mut guard = guard?;
                    if guard.ready().is_read_closed() {
                        queue.interrupt();
                        queue.break_queue();
                        return Poll::Ready(Ok(true));
                    }
                    // The frontend's control replies arrive on this socket too: not ours.
                    guard.clear_ready();
                    continue;
                }
                match self.call.poll_read_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(guard) => {
                        // Clears the readiness only when the counter reads empty, so a
                        // signal after the read is seen at the next poll.
                        if let Ok(read) = guard?.try_io(|fd| fd.get_ref().read()) {
                            read?;
                            queue.interrupt();
                            if !forever {
                                return Poll::Ready(Ok(false));
                            }
                        }
                    }
                }
            })
            .await
        }
    }

    /// Busy-polls with interrupts suppressed, yielding to the woken tasks after each batch,
    /// until a `Hybrid` wait finds nothing for its time. Returns whether the back end hung
    /// up (the queue is then broken).
    pub(super) async fn spin<B: Send>(queue: &AsyncVhostQueue<B>, wait: WaitMode) -> bool {
        queue.disable_interrupts();
        let mut idle_since: Option<Instant> = None;
        let mut socket_checked = Instant::now();
        let mut spins = 0u32;
        loop {
            if queue.process_used() > 0 {
                idle_since = None;
                yield_to_woken().await;
                // The woken tasks have submitted again: one kick for all of them.
                queue.kick();
                continue;
            }
            if queue.is_broken() {
                // Every future failed already (the queue breaks and sweeps together).
                return false;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            let since = *idle_since.get_or_insert(now);
            if let WaitMode::Hybrid(d) = wait {
                if now.duration_since(since) >= d {
                    return false;
                }
            }
            if now.duration_since(since) >= SOCKET_CHECK && now.duration_since(socket_checked) >= SOCKET_CHECK {
                socket_checked = now;
                if !queue.with_queue(|q| q.is_connected()) {
                    queue.interrupt();
                    queue.break_queue();
                    return true;
                }
            }
            // Whatever else the runtime has to run, now and then, and its submissions' kick.
            yield_to_woken().await;
            queue.kick();
        }
    }

    /// Lets the tasks woken so far run, then resumes: the task wakes itself and goes to
    /// the back of the run queue. Unlike `tokio::task::yield_now`, which defers the task
    /// until the runtime has polled its I/O driver, this makes no system call.
    async fn yield_to_woken() {
        let mut yielded = false;
        std::future::poll_fn(|cx| {
            if std::mem::replace(&mut yielded, true) {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }
}
