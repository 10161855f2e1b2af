//! Surviving `SIGBUS` on guest memory.
//!
//! The frontend owns the files behind guest memory. If it shrinks one (`ftruncate`) under
//! a region this process has mapped, or a hugetlbfs file cannot get a huge page for a
//! hole, the back end's next access to the lost part raises `SIGBUS`, whose default action
//! kills the process and with it every other guest it serves. Seals (`F_SEAL_SHRINK`)
//! prevent the shrink where the frontend set them, but the back end cannot require them:
//! QEMU's `memory-backend-file` and hugetlbfs files have none.
//!
//! So the fault is made survivable, the way a VMM survives a vanished page:
//!
//! 1. Every guest-memory mapping is registered here (address, length, page size) before
//!    its first use, and unregistered before it is unmapped. The registry is a fixed array
//!    of slots, each a sequence lock over atomics, so that the signal handler can read it
//!    without locks or allocation.
//! 2. A process-wide handler (`sigaction`, `SA_SIGINFO`) looks the faulting address up. If
//!    it lies in a registered mapping, the handler maps anonymous memory over the faulting
//!    page with `MAP_FIXED` (a whole huge page for a hugetlbfs mapping), records the fault
//!    in the slot, and returns: the interrupted access runs again and completes, reading
//!    zeroes or writing into memory nobody sees.
//! 3. The connection's threads check [`Guard::fault`] after each request and at each
//!    ring event; a fault fails the rings and ends that connection with a clear error.
//!    Other connections, and their mappings, are untouched.
//!
//! Any other `SIGBUS` (another mapping, one sent by `kill`) goes to the handler installed
//! before ours (Rust's stack-overflow report, a sanitizer's) or, if there was none, to the
//! default action, so a real bug still stops the process.

use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Mappings registered at once, across every connection of the process (each connection
/// maps at most [`super::memory::MAX_REGIONS`] regions, twice while a table is replaced).
pub(crate) const SLOTS: usize = 1024;

struct Slot {
    /// Claimed by a mapping (only its owner writes the fields below).
    taken: AtomicBool,
    /// Even: the fields are stable; odd: being written.
    seq: AtomicU64,
    start: AtomicUsize,
    /// 0: not registered.
    len: AtomicUsize,
    page: AtomicUsize,
    /// The first faulting address, 0 if none.
    fault_addr: AtomicUsize,
}

impl Slot {
    const fn new() -> Self {
        Self {
            taken: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            page: AtomicUsize::new(0),
            fault_addr: AtomicUsize::new(0),
        }
    }

    /// Writes the fields under the sequence lock (one writer: the slot's owner).
    fn publish(&self, start: usize, len: usize, page: usize) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.start.store(start, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.page.store(page, Ordering::Relaxed);
        self.fault_addr.store(0, Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// A consistent `(start, len, page)`, or `None` while it is being written or free.
    fn read(&self) -> Option<(usize, usize, usize)> {
        let s1 = self.seq.load(Ordering::Acquire);
        if s1 & 1 != 0 {
            return None;
        }
        let (start, len, page) =
            (self.start.load(Ordering::Relaxed), self.len.load(Ordering::Relaxed), self.page.load(Ordering::Relaxed));
        fence(Ordering::Acquire);
        if self.seq.load(Ordering::Relaxed) != s1 || len == 0 || !page.is_power_of_two() {
            return None;
        }
        Some((start, len, page))
    }
}

static REGISTRY: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];

/// The `SIGBUS` action found before ours, for faults that are not ours.
static PREVIOUS: OnceLock<Action> = OnceLock::new();

/// `libc::sigaction`, which holds only plain data (a handler address, flags, a mask).
struct Action(libc::sigaction);

// SAFETY: `sigaction` is plain old data: integers and a handler address, no pointer that
// is dereferenced by this code; it is written once (before the handler can run) and only
// read afterwards.
unsafe impl Sync for Action {}
// SAFETY: as above.
unsafe impl Send for Action {}

/// A registered mapping; unregisters it when dropped (drop it before unmapping).
#[derive(Debug)]
pub(crate) struct Guard {
    index: usize,
}

impl Guard {
    /// Registers `[start, start + len)`, a mapping whose pages are `page` bytes (`start` and
    /// `len` multiples of it). Installs the handler first if need be. `None` if all
    /// [`SLOTS`] are taken.
    pub fn register(start: usize, len: usize, page: usize) -> io::Result<Option<Self>> {
        install()?;
        debug_assert!(page.is_power_of_two() && start.is_multiple_of(page) && len.is_multiple_of(page));
        for (index, slot) in REGISTRY.iter().enumerate() {
            if slot.taken.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                slot.publish(start, len, page);
                return Ok(Some(Self { index }));
            }
        }
        Ok(None)
    }

    /// The first address in the mapping that faulted, if one did.
    pub fn fault(&self) -> Option<usize> {
        match REGISTRY[self.index].fault_addr.load(Ordering::Acquire) {
            0 => None,
            a => Some(a),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let slot = &REGISTRY[self.index];
        slot.publish(0, 0, 0);
        slot.taken.store(false, Ordering::Release);
    }
}

/// Installs the handler once per process.
fn install() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let r: &Result<(), i32> = INSTALLED.get_or_init(|| {
        // SAFETY: `sigaction` is plain old data; all zeroes is a valid (empty) value.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: queries the current action into `old`, a valid out-pointer; no action
        // changes.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } != 0 {
            return Err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL));
        }
        // Set before the handler can run, so that it always finds it.
        let _ = PREVIOUS.set(Action(old));
        // SAFETY: as above.
        let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
        new.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
        // SA_ONSTACK: run on the thread's alternate stack where it has one (Rust gives each
        // thread one for its stack-overflow report).
        new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: `new.sa_mask` is a valid sigset_t to initialise.
        unsafe { libc::sigemptyset(&mut new.sa_mask) };
        // SAFETY: installs a handler that is async-signal-safe (see `on_sigbus`); `new` is
        // a valid action and no old action is asked for.
        if unsafe { libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL));
        }
        Ok(())
    });
    (*r).map_err(io::Error::from_raw_os_error)
}

/// The registered mapping holding `addr`, with the page to replace.
fn find(addr: usize) -> Option<(&'static Slot, usize, usize)> {
    REGISTRY.iter().find_map(|slot| {
        let (start, len, page) = slot.read()?;
        if addr.wrapping_sub(start) >= len {
            return None;
        }
        let page_start = addr & !(page - 1);
        // Inside the mapping: `start` and `len` are multiples of `page`.
        Some((slot, page_start.max(start), page))
    })
}

/// The `SIGBUS` handler.
///
/// Async-signal-safe: it reads the registry (atomics), calls `mmap` and `sigaction` (system
/// calls; glibc's and musl's wrappers take no lock and allocate nothing) and saves and
/// restores `errno`. It neither allocates nor locks nor panics.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: `errno` is thread-local; its location is valid for the thread's life.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: with SA_SIGINFO the kernel passes a valid `siginfo_t` for this signal.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // Only a fault the kernel raised on an access (si_code > 0) has a faulting address.
    if code > 0 {
        if let Some((slot, page_start, page)) = find(addr) {
            // SAFETY: replaces one page of a registered guest mapping (inside it: `find`
            // checked) with fresh anonymous memory. The mapping's owner holds it mapped
            // while any thread can touch it, and nothing else refers to that memory as a
            // Rust object: guest memory is only accessed through raw, volatile or atomic
            // accesses that tolerate the guest changing it at any time, so new contents
            // (zeroes) break no invariant.
            let p = unsafe {
                libc::mmap(
                    page_start as *mut libc::c_void,
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                let _ = slot.fault_addr.compare_exchange(0, addr, Ordering::AcqRel, Ordering::Relaxed);
                // SAFETY: as above.
                unsafe { *libc::__errno_location() = errno };
                return;
            }
            // Without memory to put there the access would fault again: let the previous
            // action (or the default one) have it.
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
    forward(sig, info, ctx, code);
}

/// Hands a `SIGBUS` that is not ours to the action installed before ours.
fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void, code: libc::c_int) {
    let previous = PREVIOUS.get().map(|a| (a.0.sa_sigaction, a.0.sa_flags));
    match previous {
        Some((handler, flags)) if handler != libc::SIG_DFL && handler != libc::SIG_IGN => {
            if flags & libc::SA_SIGINFO != 0 {
                // SAFETY: a handler installed with SA_SIGINFO has this signature; we pass
                // on the arguments the kernel gave us.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(handler) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a handler installed without SA_SIGINFO takes the signal number.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
                f(sig);
            }
        }
        Some((handler, _)) if handler == libc::SIG_IGN && code <= 0 => {}
        _ => {
            // The default action: a fault raised by an access happens again when we return
            // and kills the process with the usual report; one sent by `kill` is sent again.
            // SAFETY: as in `install`.
            let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
            dfl.sa_sigaction = libc::SIG_DFL;
            // SAFETY: restores the default action, a valid one.
            unsafe { libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut()) };
            if code <= 0 {
                // SAFETY: raising a signal touches no memory.
                unsafe { libc::raise(libc::SIGBUS) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A shared mapping of a file that is then truncated to nothing: the access is served
    /// with zeroes and recorded instead of killing the test process.
    #[test]
    fn truncated_file_mapping_faults_once_and_reads_zeroes() {
        let page = 4096;
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 * page as u64).unwrap();
        // SAFETY: a new shared mapping of the file, at an address the kernel chooses.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as usize;
        let guard = Guard::register(base, 4 * page, page).unwrap().unwrap();
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_volatile((base + page) as *mut u8, 7) };
        assert_eq!(guard.fault(), None);
        f.set_len(page as u64).unwrap();
        // Page 0 is still in the file; page 2 is gone.
        // SAFETY: inside the mapping (the registry turns the fault into a zero page).
        let (a, b) = unsafe {
            (std::ptr::read_volatile(base as *const u8), std::ptr::read_volatile((base + 2 * page + 5) as *const u8))
        };
        assert_eq!((a, b), (0, 0));
        assert_eq!(guard.fault(), Some(base + 2 * page + 5));
        drop(guard);
        // SAFETY: the mapping made above, unmapped once.
        unsafe { libc::munmap(p, 4 * page) };
    }
}
