//! One virtqueue of a connection: what the frontend configured for it (size, addresses,
//! base, kick, call and error fds, enabled). The worker that serves it is its group's (see
//! `worker.rs`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::worker::SharedFd;

/// Ring addresses from `SET_VRING_ADDR`, in the frontend's virtual address space.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Sets `O_NONBLOCK` on a descriptor the frontend gave us, so that a descriptor that is not
/// an eventfd can never block a worker.
pub(crate) fn set_nonblocking(f: &File) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL touch no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where a ring resumes, as the frontend encodes it in `SET_VRING_BASE` / `GET_VRING_BASE`.
///
/// Split: the next available index. Packed: the next available position with its wrap
/// counter in bit 15, and (QEMU, `virtio_queue_packed_get_last_avail_idx`) the used
/// position and wrap counter in bits 16..32.
pub(crate) fn decode_base(base: u32, packed: bool) -> (u16, u16) {
    let avail = base as u16;
    if !packed {
        return (avail, 0);
    }
    let used = (base >> 16) as u16;
    // A frontend that sends only the low half (nothing in flight): used = avail.
    (avail, if used == 0 { avail } else { used })
}

/// The inverse of [`decode_base`].
pub(crate) fn encode_base(avail: u16, used: u16, packed: bool) -> u32 {
    if packed {
        avail as u32 | (used as u32) << 16
    } else {
        avail as u32
    }
}

/// Per-vring state of a connection.
pub(crate) struct Vring {
    /// `SET_VRING_NUM` (0: not set).
    pub size: u16,
    pub addrs: Option<RingAddrs>,
    /// `SET_VRING_BASE` as received, updated when the ring stops.
    pub base: u32,
    /// `SET_VRING_KICK` received: the ring is started (`None` inside: no fd, polling).
    pub kick: Option<Option<Arc<File>>>,
    pub call: Arc<SharedFd>,
    pub err: Arc<SharedFd>,
    pub enabled: bool,
}

impl Vring {
    pub fn new() -> Self {
        Self { size: 0, addrs: None, base: 0, kick: None, call: Arc::default(), err: Arc::default(), enabled: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases_round_trip() {
        assert_eq!(decode_base(7, false), (7, 0));
        assert_eq!(encode_base(7, 0, false), 7);
        // QEMU's fresh packed ring: both wrap counters set.
        assert_eq!(decode_base(0x8000_8000, true), (0x8000, 0x8000));
        // A frontend that sends the avail half only.
        assert_eq!(decode_base(0x8000, true), (0x8000, 0x8000));
        assert_eq!(decode_base(0x0005_8003, true), (0x8003, 0x0005));
        assert_eq!(encode_base(0x8003, 0x0005, true), 0x0005_8003);
    }
}
