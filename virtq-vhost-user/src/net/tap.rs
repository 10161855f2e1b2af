//! A TAP device opened for a virtio-net back end: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`,
//! with the vnet header set to the 12 bytes of `virtio_net_hdr_v1`, so that every frame
//! read or written carries exactly the header a virtio-net driver sends and receives, and
//! a buffer chain of the guest can be handed to `readv`/`writev` as it is.
//!
//! The kernel reads the header the guest wrote (checksum and segmentation offload pass
//! through, and the kernel validates them) and writes the header of each received frame
//! except `num_buffers`, which the device fills in. [`Tap::set_offloads`] tells it what
//! the guest accepts (`TUNSETOFFLOAD`); what it does not accept, the kernel resolves
//! (checksums, segmentation) before handing the frame over.
//!
//! Written against `linux/if_tun.h` with `libc`'s constants: the few ioctls needed are
//! simpler than a TAP crate, none of which sets the vnet header size.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::wire::{feature, NetHdr};

/// One queue of a TAP device (with several queue pairs, one per pair:
/// `IFF_MULTI_QUEUE`).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ioctl_int(fd: RawFd, request: libc::Ioctl, value: libc::c_int) -> io::Result<()> {
    let mut v = value;
    // SAFETY: the TUNSET* ioctls below read one int through the pointer, which is valid
    // for the call.
    if unsafe { libc::ioctl(fd, request, &mut v as *mut libc::c_int) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Opens (or creates, with `CAP_NET_ADMIN`) the TAP device `name`, `queues` times:
    /// one file per queue pair. With more than one, the device must be a multi-queue TAP
    /// (`ip tuntap add ... multi_queue`) or not exist yet.
    pub fn open(name: &str, queues: u16) -> io::Result<Vec<Tap>> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TAP name '{name}' must be 1 to {} bytes", libc::IFNAMSIZ - 1),
            ));
        }
        (0..queues.max(1)).map(|_| Self::open_one(name, queues > 1)).collect()
    }

    fn open_one(name: &str, multi_queue: bool) -> io::Result<Tap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
        // SAFETY: `ifreq` is plain old data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads (and updates) the `ifreq`, valid for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) } < 0 {
            let e = io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::EPERM) => " (creating or attaching a TAP device needs CAP_NET_ADMIN)",
                Some(libc::EINVAL) if multi_queue => " (is it a multi_queue TAP device?)",
                Some(libc::EINVAL) => " (is it a multi_queue TAP device? then ask for several queue pairs)",
                Some(libc::EBUSY) => " (another process has it open)",
                _ => "",
            };
            return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}{hint}")));
        }
        ioctl_int(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, NetHdr::SIZE as libc::c_int)
            .map_err(|e| io::Error::new(e.kind(), format!("TUNSETVNETHDRSZ {name}: {e}")))?;
        // virtio 1.x headers are little-endian; a big-endian host's TAP needs telling.
        let _ = ioctl_int(file.as_raw_fd(), libc::TUNSETVNETLE, 1);
        let tap = Tap { file, name: name.to_string() };
        tap.set_offloads(0)?;
        Ok(tap)
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file descriptor, non-blocking.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Tells the kernel which offloads the guest accepts in received frames, from the
    /// negotiated virtio-net features (`GUEST_CSUM`, `GUEST_TSO4`, `GUEST_TSO6`,
    /// `GUEST_ECN`).
    pub fn set_offloads(&self, features: u64) -> io::Result<()> {
        let mut flags = 0;
        if features & feature::GUEST_CSUM != 0 {
            flags |= libc::TUN_F_CSUM;
            if features & feature::GUEST_TSO4 != 0 {
                flags |= libc::TUN_F_TSO4;
            }
            if features & feature::GUEST_TSO6 != 0 {
                flags |= libc::TUN_F_TSO6;
            }
            if features & feature::GUEST_ECN != 0 && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
                flags |= libc::TUN_F_TSO_ECN;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long).
        if unsafe { libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TUNSETOFFLOAD {}: {e}", self.name)));
        }
        Ok(())
    }

    /// `readv(2)` of one frame into `iov`: its length (header included), which is larger
    /// than the buffers when the frame did not fit (the rest is dropped).
    /// `WouldBlock` when no frame is waiting.
    ///
    /// # Safety
    ///
    /// Each entry of `iov` is valid for writes of its length, and nothing else refers to
    /// those bytes as a Rust reference meanwhile (guest memory of popped receive chains).
    pub unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller's promise: the kernel writes only where `iov` points.
        let n = unsafe { libc::readv(self.fd(), iov.as_ptr(), iov.len().min(libc::UIO_MAXIOV as usize) as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// `writev(2)` of one frame (header first) from `iov`.
    ///
    /// # Safety
    ///
    /// Each entry of `iov` is valid for reads of its length (guest memory of a transmit
    /// chain).
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller's promise: the kernel reads only where `iov` points.
        let n = unsafe { libc::writev(self.fd(), iov.as_ptr(), iov.len().min(libc::UIO_MAXIOV as usize) as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}
