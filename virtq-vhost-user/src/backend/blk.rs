//! virtio-blk over a file (VIRTIO 1.3, 5.2): read, write, flush, get-id, discard and
//! write-zeroes, with positional I/O (`pread`/`pwrite` through [`FileExt`]) and `fdatasync`
//! on flush.
//!
//! A request is one chain (5.2.6): a readable header `{ le32 type; le32 reserved; le64
//! sector; }`, then readable data (write) or the discard/write-zeroes ranges, then writable
//! data (read, get-id), and the status byte as the chain's last writable byte. The header
//! and status may share segments with the data; the request is read as a byte stream over
//! the segments, so any split is accepted.
//!
//! Every request gets a status: `OK`, `IOERR` (out of range, bad length, I/O error, or a
//! write to a read-only device) or `UNSUPP` (an unknown type, a feature that was not
//! negotiated, or unknown flags). A chain with no writable byte has nowhere to put a
//! status; it is returned with a used length of 0 and logged.
//!
//! Data goes through a bounce buffer of at most [`BOUNCE_BYTES`] per queue: guest memory
//! is only touched by `Segment::read_at`/`write_at`, never referenced, so the guest
//! changing it during the copy cannot break this process.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use virtq::{Chain, Features, Segment};

use super::{read_stream as stream_read, write_stream as stream_write, Device, QueueHandler};

pub use crate::virtio_blk::{feature, req, status, ID_BYTES, SECTOR};
use crate::virtio_blk::{HEADER_BYTES as HEADER, WRITE_ZEROES_FLAG_UNMAP as FLAG_UNMAP};

/// The most data copied through the bounce buffer at a time.
pub const BOUNCE_BYTES: usize = 256 * 1024;

/// Options of a [`BlkBackend`].
#[derive(Clone, Debug)]
pub struct BlkBackendOptions {
    /// Number of request queues (1 to 256).
    pub queues: u16,
    /// Serve the image read-only: offer `VIRTIO_BLK_F_RO`, open the file read-only, fail
    /// writes with `IOERR`.
    pub readonly: bool,
    /// Device id returned by `GET_ID` (at most 20 bytes are used).
    pub serial: String,
    /// Most data segments in one request (`seg_max`).
    pub seg_max: u32,
    /// Most sectors in one discard or write-zeroes range.
    pub max_discard_sectors: u32,
    /// Most ranges in one discard or write-zeroes request.
    pub max_discard_seg: u32,
}

impl Default for BlkBackendOptions {
    fn default() -> Self {
        Self {
            queues: 1,
            readonly: false,
            serial: "virtq-blk".into(),
            // QEMU's default queue size (128) less the header and the status.
            seg_max: 126,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 16,
        }
    }
}

/// virtio-blk over a file.
pub struct BlkBackend {
    shared: Arc<Shared>,
    config: Vec<u8>,
}

struct Shared {
    file: File,
    /// Capacity in sectors.
    capacity: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
    max_discard_sectors: u32,
    max_discard_seg: u32,
}

impl BlkBackend {
    /// Opens the image (read-write unless `opts.readonly`). Its size, rounded down to
    /// whole sectors, is the capacity.
    pub fn open(path: impl AsRef<Path>, opts: &BlkBackendOptions) -> io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new().read(true).write(!opts.readonly).open(path)?;
        Self::from_file(file, opts)
    }

    /// Serves an open file.
    pub fn from_file(file: File, opts: &BlkBackendOptions) -> io::Result<Self> {
        if opts.queues == 0 || opts.queues > 256 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "queues must be 1 to 256"));
        }
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the image must be a regular file"));
        }
        let capacity = meta.len() / SECTOR;
        let mut id = [0u8; ID_BYTES];
        let n = opts.serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&opts.serial.as_bytes()[..n]);
        let mut config = vec![0u8; 60];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        // size_max (8..12): no limit, SIZE_MAX not offered.
        config[12..16].copy_from_slice(&opts.seg_max.max(1).to_le_bytes());
        // geometry (16..20): GEOMETRY not offered.
        config[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        // topology (24..32): TOPOLOGY not offered. writeback (32): CONFIG_WCE not offered.
        config[34..36].copy_from_slice(&opts.queues.to_le_bytes());
        config[36..40].copy_from_slice(&opts.max_discard_sectors.to_le_bytes());
        config[40..44].copy_from_slice(&opts.max_discard_seg.max(1).to_le_bytes());
        // discard_sector_alignment: 4 KiB.
        config[44..48].copy_from_slice(&8u32.to_le_bytes());
        config[48..52].copy_from_slice(&opts.max_discard_sectors.to_le_bytes());
        config[52..56].copy_from_slice(&opts.max_discard_seg.max(1).to_le_bytes());
        config[56] = 1; // write_zeroes_may_unmap
        Ok(Self {
            shared: Arc::new(Shared {
                file,
                capacity,
                readonly: opts.readonly,
                id,
                max_discard_sectors: opts.max_discard_sectors,
                max_discard_seg: opts.max_discard_seg.max(1),
            }),
            config,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.shared.capacity
    }

    /// The file served.
    pub fn file(&self) -> &File {
        &self.shared.file
    }
}

impl Device for BlkBackend {
    fn device_features(&self) -> u64 {
        let mut f = feature::SEG_MAX | feature::BLK_SIZE | feature::FLUSH | feature::MQ;
        if self.shared.readonly {
            f |= feature::RO;
        } else {
            f |= feature::DISCARD | feature::WRITE_ZEROES;
        }
        f
    }

    fn num_queues(&self) -> u16 {
        u16::from_le_bytes([self.config[34], self.config[35]])
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn queue_handler(&self, _index: u16, features: Features) -> Box<dyn QueueHandler> {
        Box::new(BlkQueue { dev: self.shared.clone(), features: features.bits(), bounce: vec![0; BOUNCE_BYTES] })
    }
}

/// One queue's request processor.
struct BlkQueue {
    dev: Arc<Shared>,
    features: u64,
    bounce: Vec<u8>,
}

/// The outcome of one request: the status and the data bytes written into the guest.
struct Outcome {
    status: u8,
    written: u32,
}

impl Outcome {
    const fn status(status: u8) -> Self {
        Self { status, written: 0 }
    }
}

impl BlkQueue {
    fn has(&self, bit: u64) -> bool {
        self.features & bit != 0
    }

    /// Whether `len` bytes at `sector` lie within the disk.
    fn in_range(&self, sector: u64, len: u64) -> bool {
        let cap = self.dev.capacity * SECTOR;
        sector.checked_mul(SECTOR).and_then(|start| start.checked_add(len)).is_some_and(|end| end <= cap)
    }

    fn execute(
        &mut self,
        readable: &[Segment<'_>],
        readable_len: usize,
        writable: &[Segment<'_>],
        data_in: usize,
    ) -> Outcome {
        let mut hdr = [0u8; HEADER];
        if readable_len < HEADER || stream_read(readable, 0, &mut hdr) != HEADER {
            log_debug!("blk: request with a {readable_len}-byte header");
            return Outcome::status(status::IOERR);
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
        let data_out = readable_len - HEADER;
        match kind {
            req::IN => self.read(sector, writable, data_in),
            req::OUT => self.write(sector, readable, data_out),
            req::FLUSH => self.flush(),
            req::GET_ID => {
                let n = data_in.min(ID_BYTES);
                let written = stream_write(writable, 0, &self.dev.id[..n]);
                Outcome { status: status::OK, written: written as u32 }
            }
            req::DISCARD | req::WRITE_ZEROES => self.discard_or_zero(kind, readable, data_out),
            _ => {
                log_debug!("blk: unsupported request type {kind}");
                Outcome::status(status::UNSUPP)
            }
        }
    }

    fn read(&mut self, sector: u64, writable: &[Segment<'_>], len: usize) -> Outcome {
        if len as u64 & (SECTOR - 1) != 0 || !self.in_range(sector, len as u64) {
            log_debug!("blk: read of {len} bytes at sector {sector} refused");
            return Outcome::status(status::IOERR);
        }
        let mut pos = sector * SECTOR;
        let mut done = 0usize;
        for s in writable {
            let mut off = 0usize;
            while off < s.len() as usize && done < len {
                let n = (s.len() as usize - off).min(len - done).min(self.bounce.len());
                if let Err(e) = self.dev.file.read_exact_at(&mut self.bounce[..n], pos) {
                    log_error!("blk: read of {n} bytes at offset {pos}: {e}");
                    return Outcome { status: status::IOERR, written: done as u32 };
                }
                s.write_at(off, &self.bounce[..n]);
                off += n;
                done += n;
                pos += n as u64;
            }
            if done == len {
                break;
            }
        }
        Outcome { status: status::OK, written: done as u32 }
    }

    fn write(&mut self, sector: u64, readable: &[Segment<'_>], len: usize) -> Outcome {
        if self.dev.readonly {
            return Outcome::status(status::IOERR);
        }
        if len as u64 & (SECTOR - 1) != 0 || !self.in_range(sector, len as u64) {
            log_debug!("blk: write of {len} bytes at sector {sector} refused");
            return Outcome::status(status::IOERR);
        }
        let mut pos = sector * SECTOR;
        let mut skip = HEADER;
        for s in readable {
            let seg_len = s.len() as usize;
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let mut off = skip;
            skip = 0;
            while off < seg_len {
                let n = (seg_len - off).min(self.bounce.len());
                let got = s.read_at(off, &mut self.bounce[..n]);
                if let Err(e) = self.dev.file.write_all_at(&self.bounce[..got], pos) {
                    log_error!("blk: write of {got} bytes at offset {pos}: {e}");
                    return Outcome::status(status::IOERR);
                }
                off += got;
                pos += got as u64;
            }
        }
        Outcome::status(status::OK)
    }

    fn flush(&mut self) -> Outcome {
        if self.dev.readonly {
            return Outcome::status(status::OK);
        }
        match self.dev.file.sync_data() {
            Ok(()) => Outcome::status(status::OK),
            Err(e) => {
                log_error!("blk: fdatasync: {e}");
                Outcome::status(status::IOERR)
            }
        }
    }

    /// Discard and write-zeroes: an array of `{ le64 sector; le32 num_sectors; le32 flags; }`
    /// after the header.
    fn discard_or_zero(&mut self, kind: u32, readable: &[Segment<'_>], len: usize) -> Outcome {
        let discard = kind == req::DISCARD;
        if !self.has(if discard { feature::DISCARD } else { feature::WRITE_ZEROES }) {
            return Outcome::status(status::UNSUPP);
        }
        if self.dev.readonly {
            return Outcome::status(status::IOERR);
        }
        if len == 0 || len & 15 != 0 {
            log_debug!("blk: discard/write-zeroes payload of {len} bytes");
            return Outcome::status(status::IOERR);
        }
        let count = len / 16;
        if count > self.dev.max_discard_seg as usize {
            log_debug!("blk: {count} discard/write-zeroes ranges, at most {}", self.dev.max_discard_seg);
            return Outcome::status(status::IOERR);
        }
        // Validate every range before acting on any.
        let mut ranges = Vec::with_capacity(count);
        for i in 0..count {
            let mut r = [0u8; 16];
            stream_read(readable, HEADER + 16 * i, &mut r);
            let sector = u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]);
            let num = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
            let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
            // Discard takes no flags; write-zeroes only UNMAP (5.2.6.2).
            if (discard && flags != 0) || flags & !FLAG_UNMAP != 0 {
                return Outcome::status(status::UNSUPP);
            }
            if num > self.dev.max_discard_sectors || !self.in_range(sector, num as u64 * SECTOR) {
                log_debug!("blk: discard/write-zeroes of {num} sectors at {sector} refused");
                return Outcome::status(status::IOERR);
            }
            ranges.push((sector * SECTOR, num as u64 * SECTOR, flags & FLAG_UNMAP != 0));
        }
        for (pos, len, unmap) in ranges {
            let r = if discard { self.discard(pos, len) } else { self.write_zeroes(pos, len, unmap) };
            if let Err(e) = r {
                log_error!(
                    "blk: {} of {len} bytes at offset {pos}: {e}",
                    if discard { "discard" } else { "write-zeroes" }
                );
                return Outcome::status(status::IOERR);
            }
        }
        Outcome::status(status::OK)
    }

    /// Deallocates the range if the file system can (a hint: reads may return anything
    /// afterwards, here zeroes).
    fn discard(&self, pos: u64, len: u64) -> io::Result<()> {
        match fallocate(&self.dev.file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, pos, len) {
            Err(e) if unsupported(&e) => Ok(()),
            r => r,
        }
    }

    /// Zeroes the range: with unmap, by punching a hole; else by `FALLOC_FL_ZERO_RANGE`;
    /// by writing zeroes where the file system can do neither.
    fn write_zeroes(&mut self, pos: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match fallocate(&self.dev.file, mode, pos, len) {
            Err(e) if unsupported(&e) => {}
            r => return r,
        }
        self.bounce.fill(0);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(self.bounce.len() as u64) as usize;
            self.dev.file.write_all_at(&self.bounce[..n], pos + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL))
}

fn fallocate(file: &File, mode: libc::c_int, pos: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(pos), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate on a descriptor we own; it touches no memory of ours.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl QueueHandler for BlkQueue {
    fn process(&mut self, chain: &Chain, segs: &[Segment<'_>]) -> u32 {
        let (readable, writable) = segs.split_at((chain.readable_segments() as usize).min(segs.len()));
        let wlen = chain.writable_len() as usize;
        if wlen == 0 {
            log_error!("blk: request {} has no writable byte for its status; returned unanswered", chain.id());
            return 0;
        }
        let out = self.execute(readable, chain.readable_len() as usize, writable, wlen - 1);
        stream_write(writable, wlen - 1, &[out.status]);
        out.written + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_layout() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(64 << 20).unwrap();
        let dev = BlkBackend::from_file(f, &BlkBackendOptions { queues: 4, ..Default::default() }).unwrap();
        let c = dev.config_space();
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), (64 << 20) / 512);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(dev.num_queues(), 4);
        assert_eq!(dev.device_features() & feature::RO, 0);
        assert_ne!(dev.device_features() & feature::DISCARD, 0);
    }
}
