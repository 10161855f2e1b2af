//! The frontend's memory table, mapped into the back end (`SET_MEM_TABLE`).
//!
//! Each region arrives as a file descriptor (a memfd, or a file on hugetlbfs) with three
//! addresses for its first byte: the guest physical address (what descriptors carry), the
//! frontend's own virtual address (what `SET_VRING_ADDR` carries), and the offset in the
//! file. The region is mapped shared, with its length checked against the file first: a
//! mapping past the end of a file would turn a guest access into `SIGBUS`.
//!
//! Translation for the rings and buffers is [`virtq::GuestRegions`]: a guest range is
//! handed out only when it lies wholly inside one region.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use virtq::memory::RegionError;
use virtq::{GuestMemory, GuestRegions};

use super::sigbus;

/// Most regions in one memory table: the vhost-user baseline (QEMU sends at most this many
/// in `SET_MEM_TABLE` when `CONFIGURE_MEM_SLOTS` is not negotiated, which this back end
/// does not offer).
pub const MAX_REGIONS: usize = 8;

/// Why a memory table was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// More regions than [`MAX_REGIONS`].
    #[error("{0} memory regions, at most {MAX_REGIONS} are supported")]
    TooManyRegions(usize),
    /// The number of file descriptors differs from the number of regions.
    #[error("{regions} memory regions came with {fds} file descriptors")]
    FdCount {
        /// Regions in the message.
        regions: usize,
        /// Descriptors attached.
        fds: usize,
    },
    /// A region is empty, or its addresses overflow.
    #[error("memory region {index} has an invalid range (gpa {gpa:#x}, size {size:#x}, offset {offset:#x})")]
    InvalidRange {
        /// Position in the table.
        index: usize,
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// Offset in the file.
        offset: u64,
    },
    /// A region's descriptor is not a regular file (memfd, tmpfs or hugetlbfs file).
    #[error("memory region {0}: the file descriptor is not a regular file")]
    NotAFile(usize),
    /// A region extends past the end of its file.
    #[error(
        "memory region {index}: offset {offset:#x} + size {size:#x} is past the end of the file ({file_size:#x} bytes)"
    )]
    FileTooSmall {
        /// Position in the table.
        index: usize,
        /// Offset in the file.
        offset: u64,
        /// Size.
        size: u64,
        /// The file's length.
        file_size: u64,
    },
    /// Two regions overlap in guest physical addresses.
    #[error("memory region {0} overlaps another in guest physical addresses")]
    Overlap(usize),
    /// Every slot of the process's `SIGBUS` guard is taken (too many connections at once).
    #[error("memory region {0}: the process already guards {n} guest memory mappings, the most it can", n = sigbus::SLOTS)]
    TooManyMappings(usize),
    /// `fstat` or `mmap` failed.
    #[error("memory region {index}: {source}")]
    Io {
        /// Position in the table.
        index: usize,
        /// The system's reason.
        source: io::Error,
    },
}

/// Guest memory that faulted under the back end: the frontend shrank the region's file
/// below the mapping (or a hugetlbfs file had no huge page to give).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryFault {
    /// Position of the region in the memory table.
    pub region: usize,
    /// The region's first guest physical address.
    pub region_gpa: u64,
    /// The region's size.
    pub region_size: u64,
    /// The guest physical address that faulted (`None`: in the part of the file before the
    /// region, which this mapping also covers).
    pub gpa: Option<u64>,
    /// The file's kind, as `fstatfs` tells it ("hugetlbfs", "tmpfs", ...).
    pub file_kind: &'static str,
}

impl std::fmt::Display for MemoryFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "guest memory region {} (gpa {:#x}, {:#x} bytes, a {} file) faulted (SIGBUS)",
            self.region, self.region_gpa, self.region_size, self.file_kind
        )?;
        if let Some(gpa) = self.gpa {
            write!(f, " at gpa {gpa:#x}")?;
        }
        f.write_str(": the frontend shrank the file under the mapping, or its pages are gone")
    }
}

/// One mapped region.
struct Mapping {
    gpa: u64,
    size: u64,
    user_addr: u64,
    /// The region's first byte is this far into the mapping.
    offset: u64,
    /// What `mmap` returned and its length (the mapping starts at file offset 0 and covers
    /// `offset + size` bytes rounded up to whole pages, so that no offset alignment is
    /// needed).
    map_addr: usize,
    map_len: usize,
    file_kind: &'static str,
    /// Registered while mapped.
    guard: Option<sigbus::Guard>,
}

/// The frontend's memory, mapped: guest-physical translation for the queues
/// ([`GuestMemory`]) and frontend-virtual translation for ring addresses.
pub struct GuestMemoryMap {
    maps: Vec<Mapping>,
    table: GuestRegions<MAX_REGIONS>,
}

impl fmt::Debug for GuestMemoryMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut l = f.debug_list();
        for m in &self.maps {
            l.entry(&format_args!("gpa {:#x}+{:#x} (frontend va {:#x})", m.gpa, m.size, m.user_addr));
        }
        l.finish()
    }
}

impl GuestMemoryMap {
    /// Maps the regions of a `SET_MEM_TABLE` message, one file a region, in order.
    pub fn map(regions: &[VhostUserMemoryRegion], files: Vec<File>) -> Result<Self, MemoryError> {
        if regions.len() > MAX_REGIONS {
            return Err(MemoryError::TooManyRegions(regions.len()));
        }
        if files.len() != regions.len() {
            return Err(MemoryError::FdCount { regions: regions.len(), fds: files.len() });
        }
        let mut this = Self { maps: Vec::with_capacity(regions.len()), table: GuestRegions::new() };
        for (index, (r, file)) in regions.iter().zip(&files).enumerate() {
            // Copies: the message struct is packed.
            let (gpa, size, user_addr, offset) = (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset);
            let invalid = MemoryError::InvalidRange { index, gpa, size, offset };
            let map_len = offset.checked_add(size).filter(|_| size > 0).ok_or(invalid)?;
            if gpa.checked_add(size).is_none()
                || user_addr.checked_add(size).is_none()
                || map_len > isize::MAX as u64
                || size > isize::MAX as u64
            {
                return Err(MemoryError::InvalidRange { index, gpa, size, offset });
            }
            let meta = file.metadata().map_err(|source| MemoryError::Io { index, source })?;
            if !meta.file_type().is_file() {
                return Err(MemoryError::NotAFile(index));
            }
            if meta.len() < map_len {
                return Err(MemoryError::FileTooSmall { index, offset, size, file_size: meta.len() });
            }
            let (file_kind, page) = file_kind(file).map_err(|source| MemoryError::Io { index, source })?;
            // Whole pages, as munmap and the SIGBUS guard want them (a hugetlbfs file's size
            // is a multiple of its page size, so this stays inside the file there).
            let map_len = map_len.next_multiple_of(page as u64);
            // SAFETY: a new shared mapping at an address the kernel chooses; it aliases no
            // Rust object. The file is at least `offset + size` bytes long (checked above).
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    map_len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(MemoryError::Io { index, source: io::Error::last_os_error() });
            }
            // Recorded at once, so that `Drop` unmaps it whatever happens next.
            this.maps.push(Mapping {
                gpa,
                size,
                user_addr,
                offset,
                map_addr: p as usize,
                map_len: map_len as usize,
                file_kind,
                guard: None,
            });
            // Guarded before any use: from here on, a shrink of the file cannot kill us.
            match sigbus::Guard::register(p as usize, map_len as usize, page) {
                Ok(Some(g)) => this.maps[index].guard = Some(g),
                Ok(None) => return Err(MemoryError::TooManyMappings(index)),
                Err(source) => return Err(MemoryError::Io { index, source }),
            }
            let host = NonNull::new((p as usize + offset as usize) as *mut u8).ok_or(MemoryError::InvalidRange {
                index,
                gpa,
                size,
                offset,
            })?;
            // SAFETY: `host` is `offset` bytes into a mapping of `offset + size` bytes, so it
            // is valid for `size` bytes until `Drop` unmaps it, after the table is last used
            // (the table is a field of `self` and cannot outlive it).
            match unsafe { this.table.add_region(gpa, size, host) } {
                Ok(()) => {}
                Err(RegionError::Overlap) => return Err(MemoryError::Overlap(index)),
                Err(RegionError::TableFull) => return Err(MemoryError::TooManyRegions(regions.len())),
                // `InvalidRange`, and whatever the table may refuse in the future.
                Err(_) => return Err(MemoryError::InvalidRange { index, gpa, size, offset }),
            }
        }
        // The files may be closed: a mapping keeps its file alive.
        drop(files);
        Ok(this)
    }

    /// The guest physical address of frontend virtual address `va` (ring addresses in
    /// `SET_VRING_ADDR` are the frontend's virtual addresses).
    pub fn va_to_gpa(&self, va: u64) -> Option<u64> {
        self.maps.iter().find(|m| va >= m.user_addr && va - m.user_addr < m.size).map(|m| m.gpa + (va - m.user_addr))
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Total bytes mapped for the guest.
    pub fn total_size(&self) -> u64 {
        self.maps.iter().map(|m| m.size).sum()
    }

    /// The first region that faulted under an access (see the module documentation), if
    /// any. A few atomic loads: cheap enough to ask after every request.
    pub fn fault(&self) -> Option<MemoryFault> {
        self.maps.iter().enumerate().find_map(|(region, m)| {
            let addr = m.guard.as_ref()?.fault()?;
            let into_region = (addr - m.map_addr) as u64;
            let gpa = into_region.checked_sub(m.offset).filter(|&o| o < m.size).map(|o| m.gpa + o);
            Some(MemoryFault { region, region_gpa: m.gpa, region_size: m.size, gpa, file_kind: m.file_kind })
        })
    }
}

/// The file system a region's file lives on, and its page size there (a huge page on
/// hugetlbfs, whose pages are mapped and replaced whole).
fn file_kind(file: &File) -> io::Result<(&'static str, usize)> {
    // SAFETY: `statfs` is plain old data; all zeroes is a valid value to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs on a descriptor we own, into a valid out-pointer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sysconf has no memory arguments.
    let base = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    Ok(match st.f_type {
        libc::HUGETLBFS_MAGIC => {
            let huge = st.f_bsize as usize;
            ("hugetlbfs", if huge.is_power_of_two() && huge >= base { huge } else { base })
        }
        libc::TMPFS_MAGIC => ("tmpfs", base),
        _ => ("regular", base),
    })
}

// SAFETY: forwards to `GuestRegions`, whose pointers stay valid while `self` lives (the
// mappings are removed only in `Drop`).
unsafe impl GuestMemory for GuestMemoryMap {
    #[inline]
    fn translate(&self, addr: u64, len: u64) -> Option<NonNull<u8>> {
        self.table.translate(addr, len)
    }
}

impl Drop for GuestMemoryMap {
    fn drop(&mut self) {
        self.table.clear();
        for mut m in self.maps.drain(..) {
            // Unguarded first: once unmapped, the addresses may be reused by any mapping.
            drop(m.guard.take());
            // SAFETY: the mapping was created by `map` with this address and length and is
            // unmapped once; nothing refers to it any more (queues borrow `self`).
            unsafe { libc::munmap(m.map_addr as *mut libc::c_void, m.map_len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn region(gpa: u64, size: u64, user_addr: u64, offset: u64) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(gpa, size, user_addr, offset)
    }

    fn file(len: u64) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        f.write_all(b"hello").unwrap();
        f
    }

    #[test]
    fn maps_and_translates_with_bounds() {
        let mem = GuestMemoryMap::map(&[region(0x10000, 0x2000, 0x7f00_0000, 0x1000)], vec![file(0x3000)]).unwrap();
        assert_eq!(mem.va_to_gpa(0x7f00_0000), Some(0x10000));
        assert_eq!(mem.va_to_gpa(0x7f00_1fff), Some(0x11fff));
        assert_eq!(mem.va_to_gpa(0x7f00_2000), None);
        assert!(mem.translate(0x10000, 0x2000).is_some());
        assert!(mem.translate(0x10000, 0x2001).is_none());
        assert!(mem.translate(0xffff, 1).is_none());
        // The offset is honoured: the file's first bytes ("hello") are before the region.
        let p = mem.translate(0x10000, 1).unwrap();
        // SAFETY: translated for one byte.
        assert_eq!(unsafe { p.as_ptr().read() }, 0);
    }

    #[test]
    fn refuses_bad_tables() {
        let e = GuestMemoryMap::map(&[region(0, 0x2000, 0, 0x1000)], vec![file(0x2000)]).unwrap_err();
        assert!(matches!(e, MemoryError::FileTooSmall { .. }), "{e}");
        let e = GuestMemoryMap::map(&[region(0, 0x1000, 0, 0)], vec![]).unwrap_err();
        assert!(matches!(e, MemoryError::FdCount { .. }), "{e}");
        let e = GuestMemoryMap::map(&[region(u64::MAX - 10, 0x1000, 0, 0)], vec![file(0x1000)]).unwrap_err();
        assert!(matches!(e, MemoryError::InvalidRange { .. }), "{e}");
        let e = GuestMemoryMap::map(
            &[region(0, 0x1000, 0, 0), region(0x800, 0x1000, 0x10000, 0)],
            vec![file(0x1000), file(0x1000)],
        )
        .unwrap_err();
        assert!(matches!(e, MemoryError::Overlap(1)), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = GuestMemoryMap::map(&[region(0, 0x1000, 0, 0)], vec![File::open(dir.path()).unwrap()]).unwrap_err();
        assert!(matches!(e, MemoryError::NotAFile(0)), "{e}");
    }
}
