//! vhost-user transports for `virtq` (Linux, std).
//!
//! - [`memory`]: guest memory as memfd regions shared with the back end, with an
//!   allocator and a [`virtq::Dma`] implementation (host address to GPA).
//! - [`frontend`]: the driver's end of the vhost-user protocol: the handshake, one
//!   [`frontend::Queue`] per virtqueue with its kick and call eventfds, waiting by polling
//!   or sleeping.
//! - [`blk`]: a virtio-blk driver on top (read, write, flush, discard, write-zeroes,
//!   get-id), many requests in flight per queue, completions matched by token.
//! - [`net`]: virtio-net: the vocabulary both sides share (`net::wire`), a driver (queue
//!   pairs, burst transmit and receive with frames in place in guest memory, mergeable
//!   receive buffers) and a device over a TAP or in loopback.
//! - [`backend`]: the device's end: a framework that owns the vhost-user protocol, the
//!   memory table, the rings and their workers, so that a device implements only itself;
//!   virtio-blk over a file on it.
//! - [`virtio_blk`]: the virtio-blk vocabulary both sides share.
//! - [`reactor`]: async completions: a vhost-user queue whose buffers are awaited, and
//!   the reactor on its call eventfd (a thread, or tokio with the `tokio` feature).
//! - [`rng`]: virtio-rng, driver and device.
//!
//! ```no_run
//! use virtq_vhost_user::blk::{BlkDevice, BlkOptions};
//!
//! let mut dev = BlkDevice::connect("/tmp/blk.sock", &BlkOptions::default())?;
//! println!("{} sectors", dev.info().config.capacity);
//! let mut q = dev.take_queues().remove(0);
//! let mut buf = vec![0u8; 4096];
//! q.read_at(0, &mut buf)?;
//! q.write_at(4096, &buf)?;
//! q.flush()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

// Lets the device modules name this crate as its users do (`virtq_vhost_user::...`), so
// that the back end's documentation can show one of them verbatim.
extern crate self as virtq_vhost_user;

pub mod backend;
pub mod blk;
pub mod frontend;
pub mod memory;
pub mod net;
pub mod reactor;
pub mod rng;
pub mod virtio_blk;
mod watchdog;

/// The core crate, re-exported for its types (`Features`, `Sg`, ...).
pub use virtq;

pub use frontend::{ConnectOptions, Connection, Error, Queue, WaitMode};
pub use memory::{DmaBuffer, MemoryConfig, SharedMemory};
