//! virtio-net over vhost-user: the vocabulary both sides share ([`wire`]), the driver
//! ([`driver`]), the device ([`device`], served by the back-end framework:
//! `virtq serve-net`), and test traffic that checks itself ([`traffic`]).
//!
//! ```no_run
//! use virtq_vhost_user::net::{NetDevice, NetOptions};
//!
//! let mut dev = NetDevice::connect("/tmp/vhost-net.sock", &NetOptions::default())?;
//! println!("MAC {:02x?}, features {:?}", dev.info().mac, dev.info().feature_names());
//! let mut pair = dev.take_queue_pairs().remove(0);
//! // One broadcast frame, written straight into its transmit slot.
//! pair.tx.send_with(1, |_, slot| {
//!     slot[..60].fill(0);
//!     slot[..6].fill(0xff);
//!     60
//! })?;
//! pair.rx.recv(32, |frame| println!("received {} bytes", frame.len()))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod device;
pub mod driver;
mod tap;
pub mod traffic;
pub mod wire;

pub use device::{NetBackend, NetBackendOptions, NetPeer, NetStats};
pub use driver::{
    BufferCount, DeviceFault, NetDevice, NetError, NetInfo, NetOptions, QueueError, QueuePair, QueueStats, RxFrame,
    RxQueue, TxQueue, DRIVER_FEATURES,
};
pub use wire::{NetConfig, NetHdr};
