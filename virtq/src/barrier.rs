//! Memory barriers between the two ends of a ring.
//!
//! All shared-ring fields are accessed with relaxed atomics (Linux's `READ_ONCE` /
//! `WRITE_ONCE`); ordering comes only from the three fences here, exactly where Linux puts
//! `virtio_rmb`, `virtio_wmb` and `virtio_mb`. Each call site names the access on the
//! other side that its fence pairs with.
//!
//! *Weak* barriers order memory between CPUs of one coherent system (a peer that is
//! another thread, process or a hypervisor on the same host). *Strong* barriers also order
//! against devices outside the CPUs' inner-shareable domain (real hardware, heterogeneous
//! CPUs); `VIRTIO_F_ORDER_PLATFORM` requires them. On x86 both are the same instructions,
//! as in Linux, where `dma_rmb`/`dma_wmb` are compiler barriers there.

#[cfg(not(loom))]
use core::sync::atomic::{fence, Ordering};
#[cfg(loom)]
use loom::sync::atomic::{fence, Ordering};

/// Which kind of barrier a queue uses. See the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Barriers {
    /// SMP barriers (`virt_rmb`, `virt_wmb`, `virt_mb`): the peer is coherent with us.
    Weak,
    /// Platform barriers (`dma_rmb`, `dma_wmb`, `mb`): required by `VIRTIO_F_ORDER_PLATFORM`.
    Strong,
}

impl Barriers {
    /// Orders earlier loads (the one that saw new work) before later loads (the work).
    #[doc(alias = "virtio_rmb")]
    #[inline(always)]
    pub fn rmb(self) {
        match self {
            Self::Weak => fence(Ordering::Acquire),
            Self::Strong => strong::rmb(),
        }
    }

    /// Orders earlier stores (the work) before later stores (the index that publishes it).
    #[doc(alias = "virtio_wmb")]
    #[inline(always)]
    pub fn wmb(self) {
        match self {
            Self::Weak => fence(Ordering::Release),
            Self::Strong => strong::wmb(),
        }
    }

    /// Orders earlier stores before later loads: "publish, then look at the peer's event".
    #[doc(alias = "virtio_mb")]
    #[inline(always)]
    pub fn mb(self) {
        match self {
            Self::Weak => full_fence(),
            Self::Strong => strong::mb(),
        }
    }
}

/// A full store-load fence. On x86-64 a locked no-op add to the stack is markedly cheaper
/// than `mfence` and is what Linux's `virt_mb` uses; the `asm!` block is also a compiler
/// barrier because it is not marked `nomem`.
#[inline(always)]
fn full_fence() {
    #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
    // SAFETY: the instruction adds zero to a word just below the stack pointer, inside the
    // red zone the System V ABI reserves for leaf code, and changes nothing but flags.
    unsafe {
        core::arch::asm!("lock or dword ptr [rsp - 8], 0", options(nostack));
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
    fence(Ordering::SeqCst);
}

#[cfg(all(target_arch = "aarch64", not(loom), not(miri)))]
mod strong {
    //! Outer-shareable barriers, as Linux's `dma_rmb`, `dma_wmb` and `mb` on arm64.

    #[inline(always)]
    pub fn rmb() {
        // SAFETY: a data memory barrier has no operands and no effect besides ordering.
        unsafe { core::arch::asm!("dmb oshld", options(nostack, preserves_flags)) }
    }

    #[inline(always)]
    pub fn wmb() {
        // SAFETY: as above.
        unsafe { core::arch::asm!("dmb oshst", options(nostack, preserves_flags)) }
    }

    #[inline(always)]
    pub fn mb() {
        // SAFETY: as above.
        unsafe { core::arch::asm!("dmb sy", options(nostack, preserves_flags)) }
    }
}

#[cfg(not(all(target_arch = "aarch64", not(loom), not(miri))))]
mod strong {
    //! Elsewhere the language fences are already as strong as the platform needs (x86 is
    //! TSO), or a sequentially consistent fence is the conservative choice.
    #[cfg(not(loom))]
    use core::sync::atomic::{fence, Ordering};
    #[cfg(loom)]
    use loom::sync::atomic::{fence, Ordering};

    #[inline(always)]
    pub fn rmb() {
        fence(Ordering::Acquire);
    }

    #[inline(always)]
    pub fn wmb() {
        fence(Ordering::Release);
    }

    #[inline(always)]
    pub fn mb() {
        super::full_fence();
    }
}
