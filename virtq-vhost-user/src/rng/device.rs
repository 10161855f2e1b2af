use std::fs::File;
use std::io::{self, Read};
use std::sync::Arc;

use virtq_vhost_user::backend::{Device, QueueHandler};
use virtq_vhost_user::virtq::{Chain, Features, Segment};

/// virtio-rng (VIRTIO 1.3, 5.4): one request queue, whose buffers the device fills with
/// random bytes. It has no feature bits and no config space.
pub struct RngDevice {
    /// Where the bytes come from: the kernel's random source, or any file.
    source: Arc<File>,
}

/// The most bytes put into one buffer (the device may fill less than the whole buffer,
/// 5.4.6.1): a guest posting a huge buffer costs one bounded read.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

impl RngDevice {
    /// A device filled from `/dev/urandom` (the kernel's CSPRNG, never blocking once the
    /// system has booted).
    pub fn new() -> io::Result<Self> {
        Ok(Self::from_source(File::open("/dev/urandom")?))
    }

    /// A device filled from `source`, read in order (a file of known bytes in a test).
    /// At the end of the file requests are answered with no bytes.
    pub fn from_source(source: File) -> Self {
        Self { source: Arc::new(source) }
    }
}

impl Device for RngDevice {
    fn device_features(&self) -> u64 {
        0
    }

    fn num_queues(&self) -> u16 {
        1
    }

    fn queue_handler(&self, _index: u16, _features: Features) -> Box<dyn QueueHandler> {
        Box::new(RngQueue { source: self.source.clone(), buf: vec![0; 4096] })
    }
}

/// The request queue's handler: one read from the source per 4 KiB of buffer.
struct RngQueue {
    source: Arc<File>,
    /// Bytes pass through here: guest memory is written only by `Segment::write_at`.
    buf: Vec<u8>,
}

impl QueueHandler for RngQueue {
    fn process(&mut self, chain: &Chain, segs: &[Segment<'_>]) -> u32 {
        // A driver-readable part (which the driver must not send, 5.4.6.2) is ignored.
        let writable = &segs[chain.readable_segments() as usize..];
        let mut written = 0;
        for seg in writable {
            let mut offset = 0;
            while offset < seg.len() as usize && written < MAX_REQUEST_BYTES {
                let n = (seg.len() as usize - offset).min(self.buf.len()).min(MAX_REQUEST_BYTES - written);
                let got = match (&*self.source).read(&mut self.buf[..n]) {
                    Ok(got) => got,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => 0,
                };
                if got == 0 {
                    // The source ran dry: give back what there is.
                    return written as u32;
                }
                seg.write_at(offset, &self.buf[..got]);
                offset += got;
                written += got;
            }
        }
        written as u32
    }
}
