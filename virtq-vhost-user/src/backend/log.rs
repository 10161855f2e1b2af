//! Logging to standard error: `virtq-backend: LEVEL: connection N: message`. Debug lines
//! appear with `VIRTQ_LOG=debug`; `VIRTQ_LOG=off` silences every line (for the fuzz target,
//! which makes thousands of connections a second).
//!
//! A guest that sends malformed requests in a loop would otherwise get one error line each,
//! so every connection has a rate limit, shared by its control thread and its ring workers
//! (a thread takes part by [`enter`]ing the connection's [`ConnLog`]): at most
//! [`BURST`] lines per [`INTERVAL`], the rest dropped and counted. The count is printed
//! with the first line of the next interval and when the connection ends, and kept in
//! [`Stats::log_lines_suppressed`]. Debug lines, which the operator asked for, are not
//! limited.

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::Stats;

/// Length of one rate-limit window (Linux's `DEFAULT_RATELIMIT_INTERVAL`).
pub const INTERVAL: Duration = Duration::from_secs(5);

/// Lines one connection may log per window (Linux's `DEFAULT_RATELIMIT_BURST`).
pub const BURST: u32 = 10;

/// `VIRTQ_LOG`: debug lines on, or every line off.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Normal,
    Debug,
    Off,
}

fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| match std::env::var("VIRTQ_LOG") {
        Ok(v) if v.eq_ignore_ascii_case("debug") => Level::Debug,
        Ok(v) if v.eq_ignore_ascii_case("off") => Level::Off,
        _ => Level::Normal,
    })
}

pub(crate) fn debug_enabled() -> bool {
    level() == Level::Debug
}

/// Writes one line to standard error unless `VIRTQ_LOG=off`.
fn print(args: fmt::Arguments<'_>) {
    if level() != Level::Off {
        eprintln!("{args}");
    }
}

/// The log of one connection (or of the server's own accept loop): its name and its rate
/// limit.
pub(crate) struct ConnLog {
    /// "connection 3", or "server".
    name: String,
    window: Mutex<Window>,
    stats: Arc<Stats>,
}

struct Window {
    start: Option<Instant>,
    printed: u32,
    suppressed: u64,
}

impl ConnLog {
    pub fn new(name: String, stats: Arc<Stats>) -> Arc<Self> {
        Arc::new(Self { name, window: Mutex::new(Window { start: None, printed: 0, suppressed: 0 }), stats })
    }

    /// Prints a line unless the window's burst is used up.
    #[doc(alias = "___ratelimit")]
    fn emit(&self, level: &str, args: fmt::Arguments<'_>) {
        let now = Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.start.is_none_or(|s| now.duration_since(s) >= INTERVAL) {
            w.start = Some(now);
            w.printed = 0;
            let n = std::mem::take(&mut w.suppressed);
            if n > 0 {
                print(format_args!("virtq-backend: warning: {}: {n} log lines suppressed", self.name));
            }
        }
        if w.printed >= BURST {
            w.suppressed += 1;
            self.stats.log_lines_suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        w.printed += 1;
        drop(w);
        self.stats.log_lines.fetch_add(1, Ordering::Relaxed);
        print(format_args!("virtq-backend: {level}: {}: {args}", self.name));
    }

    /// Reports lines still suppressed (the connection is ending).
    pub fn flush(&self) {
        let n = std::mem::take(&mut self.window.lock().unwrap_or_else(|e| e.into_inner()).suppressed);
        if n > 0 {
            print(format_args!("virtq-backend: warning: {}: {n} log lines suppressed", self.name));
        }
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<ConnLog>>> = const { RefCell::new(None) };
}

/// Makes this thread log as part of `log` until the guard is dropped.
pub(crate) fn enter(log: Arc<ConnLog>) -> EnterGuard {
    let previous = CURRENT.with(|c| c.replace(Some(log)));
    EnterGuard { previous }
}

/// Restores the thread's previous log.
pub(crate) struct EnterGuard {
    previous: Option<Arc<ConnLog>>,
}

impl Drop for EnterGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

/// Writes one line, through the current connection's rate limit if the thread has one.
pub(crate) fn emit(level: &str, limited: bool, args: fmt::Arguments<'_>) {
    CURRENT.with(|c| match &*c.borrow() {
        Some(log) if limited => log.emit(level, args),
        Some(log) => print(format_args!("virtq-backend: {level}: {}: {args}", log.name)),
        None => print(format_args!("virtq-backend: {level}: {args}")),
    })
}

macro_rules! log_error {
    ($($arg:tt)*) => { $crate::backend::log::emit("error", true, format_args!($($arg)*)) };
}

macro_rules! log_info {
    ($($arg:tt)*) => { $crate::backend::log::emit("info", true, format_args!($($arg)*)) };
}

macro_rules! log_debug {
    ($($arg:tt)*) => {
        if $crate::backend::log::debug_enabled() {
            $crate::backend::log::emit("debug", false, format_args!($($arg)*))
        }
    };
}

pub(crate) use {log_debug, log_error};
