//! A virtio-blk back end that answers reads OK without writing their data (a used
//! length short of the data), for the driver's and the CLI's tests (`#[path]`).

#![allow(dead_code)]

use virtq_vhost_user::backend::blk::BlkBackend;
use virtq_vhost_user::backend::{Device, QueueHandler};
use virtq_vhost_user::virtq::{Chain, Features, Segment};

/// How much of a read the lying device claims to have written.
#[derive(Clone, Copy, Debug)]
pub enum Lie {
    /// The status byte only: used length 1.
    StatusOnly,
    /// Half the data and the status (the data itself is not written).
    Half,
}

/// virtio-blk over a file that answers reads OK without writing their data.
pub struct LyingDevice {
    pub inner: BlkBackend,
    pub lie: Lie,
}

impl Device for LyingDevice {
    fn device_features(&self) -> u64 {
        self.inner.device_features()
    }
    fn num_queues(&self) -> u16 {
        self.inner.num_queues()
    }
    fn config_space(&self) -> &[u8] {
        self.inner.config_space()
    }
    fn queue_handler(&self, index: u16, features: Features) -> Box<dyn QueueHandler> {
        Box::new(LyingQueue { inner: self.inner.queue_handler(index, features), lie: self.lie })
    }
}

struct LyingQueue {
    inner: Box<dyn QueueHandler>,
    lie: Lie,
}

impl QueueHandler for LyingQueue {
    fn process(&mut self, chain: &Chain, segs: &[Segment<'_>]) -> u32 {
        let mut kind = [0u8; 4];
        segs[0].read_at(0, &mut kind);
        if u32::from_le_bytes(kind) != 0 {
            return self.inner.process(chain, segs);
        }
        // A read: status OK in the last writable byte, no data.
        let last = segs.last().unwrap();
        last.write_at(last.len() as usize - 1, &[0]);
        match self.lie {
            Lie::StatusOnly => 1,
            Lie::Half => (chain.writable_len() - 1) / 2 + 1,
        }
    }
}
