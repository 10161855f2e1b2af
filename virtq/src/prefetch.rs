//! Prefetch. For writing: a driver filling a batch writes descriptors into lines the device
//! last read, so each store needs the line back in exclusive state. Asking for all of a
//! batch's lines before the first store lets those ownership transfers overlap; left to
//! the stores, they wait one behind the other in the store buffer. For reading: see
//! [`line_for_read`]. Hints: they change no value that either side reads.

#[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
mod x86 {
    use core::sync::atomic::{AtomicU8, Ordering::Relaxed};

    const UNKNOWN: u8 = 0;
    const ABSENT: u8 = 1;
    const PRESENT: u8 = 2;

    /// Whether the CPU has PREFETCHW, from CPUID once (then cached).
    #[inline(always)]
    pub fn has_prefetchw() -> bool {
        if cfg!(target_feature = "prfchw") {
            return true;
        }
        static CACHED: AtomicU8 = AtomicU8::new(UNKNOWN);
        match CACHED.load(Relaxed) {
            UNKNOWN => {
                let present = detect();
                CACHED.store(if present { PRESENT } else { ABSENT }, Relaxed);
                present
            }
            state => state == PRESENT,
        }
    }

    #[cold]
    fn detect() -> bool {
        use core::arch::x86_64::__cpuid;
        // CPUID exists on every x86-64 CPU; leaf 0x8000_0001 only where the highest
        // extended leaf reaches it. PRFCHW is ECX bit 8 there.
        let max_extended = __cpuid(0x8000_0000).eax;
        max_extended >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0
    }
}

/// Asks the CPU to fetch, in a state that allows writing, every 64-byte line holding a byte
/// of `start..end` (addresses), where it has an instruction for that (x86-64 with
/// PREFETCHW); elsewhere, nothing.
#[inline(always)]
pub(crate) fn lines_for_write(start: usize, end: usize) {
    #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
    if x86::has_prefetchw() {
        let mut line = start & !63;
        while line < end {
            // SAFETY: PREFETCHW is a hint: it returns nothing, writes no memory, and does
            // not fault whatever the address; the CPU was checked to implement it.
            unsafe { core::arch::asm!("prefetchw [{}]", in(reg) line, options(nostack, preserves_flags, readonly)) };
            line += 64;
        }
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
    let _ = (start, end);
}

/// Asks the CPU to fetch the 64-byte line holding address `addr` for reading, where it has
/// an instruction for that (x86-64); elsewhere, nothing. For loads whose address the CPU
/// learns too late to fetch ahead, such as the packed driver's next used descriptor.
#[inline(always)]
pub(crate) fn line_for_read(addr: usize) {
    // The intrinsic rather than `asm!`: the compiler schedules it like any other load.
    #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
    // SAFETY: PREFETCHT0 is part of SSE, which every x86-64 CPU has; it is a hint that
    // returns nothing, writes no memory, and does not fault whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(addr as *const i8)
    };
    #[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
    let _ = addr;
}
