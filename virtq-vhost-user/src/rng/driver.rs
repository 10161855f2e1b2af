//! A virtio-rng driver (VIRTIO 1.3, 5.4) on the vhost-user frontend: it keeps device-writable
//! buffers posted on the request queue and hands out the bytes the device puts in them, in
//! the order the device returns the buffers.

use std::time::{Duration, Instant};

use virtq::Features;

use crate::frontend::{self, ConnectOptions, Connection, Queue, WaitMode};
use crate::memory::{DmaBuffer, MemoryConfig};

/// Options of [`RngDriver::connect`].
#[derive(Clone, Debug)]
pub struct RngOptions {
    /// Ring entries (a power of two for split rings).
    pub queue_size: u16,
    /// Bytes asked for in one request.
    pub buffer_size: usize,
    /// Buffers kept posted at once (at most `queue_size`).
    pub depth: u16,
    /// Negotiate `EVENT_IDX` if offered.
    pub event_idx: bool,
    /// Negotiate `RING_PACKED` if offered.
    pub ring_packed: bool,
    /// Negotiate `IN_ORDER` if offered.
    pub in_order: bool,
    /// Feature bits the device must offer, on top of `VERSION_1`.
    pub required_features: u64,
    /// Guest memory shared with the device.
    pub memory: MemoryConfig,
    /// How long one vhost-user control request may take.
    pub control_timeout: Duration,
    /// How long the device may take to return a buffer.
    pub request_timeout: Duration,
    /// How to wait for buffers.
    pub wait: WaitMode,
}

impl Default for RngOptions {
    fn default() -> Self {
        Self {
            queue_size: 64,
            buffer_size: 4096,
            depth: 16,
            event_idx: true,
            ring_packed: true,
            in_order: true,
            required_features: 0,
            memory: MemoryConfig { size: 4 << 20, regions: 1 },
            control_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            wait: WaitMode::Sleep,
        }
    }
}

/// What can go wrong reading from a virtio-rng device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RngError {
    /// The vhost-user connection or the queue failed.
    #[error(transparent)]
    Frontend(#[from] frontend::Error),
    /// The options cannot work.
    #[error("invalid options: {0}")]
    InvalidOptions(&'static str),
    /// Guest memory has no room for the buffers.
    #[error("guest memory has no room for {0} buffers")]
    OutOfMemory(u16),
    /// The device claims to have written more than the buffer holds.
    #[error("the device returned buffer {slot} with {used} bytes written; it holds {capacity}")]
    UsedLengthTooLong {
        /// The buffer.
        slot: u16,
        /// The used length the device reported.
        used: u32,
        /// The buffer's length.
        capacity: usize,
    },
    /// The device returned every posted buffer empty: it has nothing to give.
    #[error("the device returned {0} buffers in a row without a byte")]
    NoEntropy(u16),
    /// The device returned a buffer that was not in flight.
    #[error("the device returned buffer {0}, which was not in flight")]
    UnknownBuffer(u16),
}

/// A virtio-rng device over vhost-user.
pub struct RngDriver {
    conn: Connection,
    queue: Queue<u16>,
    /// The buffer of each slot; all are in flight between calls.
    bufs: Vec<DmaBuffer>,
    in_flight: Vec<bool>,
    wait: WaitMode,
    request_timeout: Duration,
    /// Bytes received and not yet handed out: `bufs[slot][start..end]`.
    pending: Option<(u16, usize, usize)>,
    bytes: u64,
    requests: u64,
}

impl RngDriver {
    /// Connects to the vhost-user-rng back end at `path`, sets up its request queue and
    /// posts `opts.depth` buffers.
    pub fn connect(path: impl AsRef<std::path::Path>, opts: &RngOptions) -> Result<Self, RngError> {
        if opts.buffer_size == 0 || opts.buffer_size > u32::MAX as usize {
            return Err(RngError::InvalidOptions("buffer_size must be 1 to 2^32 - 1"));
        }
        if opts.depth == 0 || opts.depth > opts.queue_size {
            return Err(RngError::InvalidOptions("depth must be 1 to queue_size"));
        }
        let conn = Connection::connect(
            path,
            &ConnectOptions {
                driver_features: 0,
                required_features: opts.required_features,
                event_idx: opts.event_idx,
                indirect_desc: false,
                ring_packed: opts.ring_packed,
                in_order: opts.in_order,
                config_size: 0,
                memory: opts.memory,
                timeout: opts.control_timeout,
            },
        )?;
        let queue = conn.create_queue::<u16>(0, opts.queue_size, 0)?;
        let bufs = (0..opts.depth)
            .map(|_| conn.memory().alloc(opts.buffer_size))
            .collect::<Option<Vec<_>>>()
            .ok_or(RngError::OutOfMemory(opts.depth))?;
        let mut this = Self {
            conn,
            queue,
            in_flight: vec![false; bufs.len()],
            bufs,
            wait: opts.wait,
            request_timeout: opts.request_timeout,
            pending: None,
            bytes: 0,
            requests: 0,
        };
        for slot in 0..opts.depth {
            this.post(slot)?;
        }
        this.queue.kick()?;
        Ok(this)
    }

    /// The vhost-user connection (negotiated features, ...).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The negotiated features.
    pub fn features(&self) -> Features {
        self.conn.features()
    }

    /// Bytes received from the device so far, and the requests that carried them.
    pub fn received(&self) -> (u64, u64) {
        (self.bytes, self.requests)
    }

    fn post(&mut self, slot: u16) -> Result<(), RngError> {
        let sg = self.bufs[slot as usize].sg();
        self.queue
            .vq_mut()
            .add_inbuf_premapped(&[sg], slot)
            .map_err(|e| frontend::Error::QueueBroken(frontend::Broken::Refused(e.kind)))?;
        self.in_flight[slot as usize] = true;
        Ok(())
    }

    /// Fills `out` with bytes from the device.
    pub fn read(&mut self, mut out: &mut [u8]) -> Result<(), RngError> {
        let mut empty_in_a_row = 0u16;
        while !out.is_empty() {
            if let Some((slot, start, end)) = self.pending.take() {
                let n = (end - start).min(out.len());
                out[..n].copy_from_slice(&self.bufs[slot as usize][start..start + n]);
                out = &mut out[n..];
                if start + n < end {
                    self.pending = Some((slot, start + n, end));
                } else {
                    self.post(slot)?;
                    self.queue.kick()?;
                }
                continue;
            }
            let deadline = Instant::now() + self.request_timeout;
            self.queue.wait(self.wait, Some(deadline))?;
            while let Some(used) = self.queue.vq_mut().get_buf() {
                let slot = used.token;
                if !std::mem::replace(&mut self.in_flight[slot as usize], false) {
                    return Err(RngError::UnknownBuffer(slot));
                }
                let capacity = self.bufs[slot as usize].len();
                if used.len as usize > capacity {
                    return Err(RngError::UsedLengthTooLong { slot, used: used.len, capacity });
                }
                self.requests += 1;
                self.bytes += used.len as u64;
                if used.len == 0 {
                    empty_in_a_row += 1;
                    if empty_in_a_row >= self.bufs.len() as u16 {
                        return Err(RngError::NoEntropy(empty_in_a_row));
                    }
                    self.post(slot)?;
                    continue;
                }
                empty_in_a_row = 0;
                self.pending = Some((slot, 0, used.len as usize));
                break;
            }
            self.queue.kick()?;
        }
        Ok(())
    }
}
