//! Pinning the driver and the device to CPUs of their own, so that the numbers measure
//! the ring (cache-line transfers between two cores) rather than the scheduler, and
//! counting how often the scheduler took a CPU away anyway.

use std::io;

/// The CPUs the driver and the device run on: the first two this process may use, or
/// `None` when it may use fewer than two (then nothing is pinned).
pub fn plan() -> Option<(usize, usize)> {
    let cpus = allowed_cpus();
    match cpus[..] {
        [driver, device, ..] => Some((driver, device)),
        _ => None,
    }
}

#[cfg(target_os = "linux")]
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `cpu_set_t` is a plain bit array, for which all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the kernel writes at most `size_of` bytes into
    // `set`, which we own.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu < CPU_SETSIZE`, the number of bits in `set`.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Vec<usize> {
    Vec::new()
}

/// Pins the calling thread to `cpu`.
#[cfg(target_os = "linux")]
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: as in `allowed_cpus`: all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu < CPU_SETSIZE`, checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the kernel reads `size_of` bytes from `set`.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub fn pin_current_thread(_cpu: usize) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Involuntary context switches of the calling thread so far: how often the scheduler
/// took its CPU away (another process wanted it). A pinned polling thread that was
/// preempted stalls its peer for a whole time slice, so a run with many of them measured
/// the machine's load, not the ring. `None` where the count is unavailable.
#[cfg(target_os = "linux")]
pub fn involuntary_switches() -> Option<u64> {
    // SAFETY: `rusage` is plain integers, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD asks about the calling thread; the kernel writes one `rusage`
    // into `usage`, which we own.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    (rc == 0).then_some(usage.ru_nivcsw as u64)
}

#[cfg(not(target_os = "linux"))]
pub fn involuntary_switches() -> Option<u64> {
    None
}
