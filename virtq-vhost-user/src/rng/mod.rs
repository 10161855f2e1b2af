//! virtio-rng (VIRTIO 1.3, 5.4) over vhost-user: the device ([`device`], served by the
//! back-end framework, `virtq serve-rng`) and the driver ([`driver`], `virtq rng`).
//!
//! ```no_run
//! use virtq_vhost_user::rng::{RngDriver, RngOptions};
//!
//! let mut rng = RngDriver::connect("/tmp/rng.sock", &RngOptions::default())?;
//! let mut key = [0u8; 32];
//! rng.read(&mut key)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

/// The device: one request queue whose buffers it fills from the operating system's
/// random source. This module is the complete example of the back-end framework's
/// documentation ([`crate::backend`]).
pub mod device;
pub mod driver;

pub use device::RngDevice;
pub use driver::{RngDriver, RngError, RngOptions};

/// The virtio device ID of an entropy source (VIRTIO 1.3, 5).
pub const DEVICE_ID: u32 = 4;
