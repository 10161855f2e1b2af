//! virtio-net over vhost-user: the vocabulary both sides share ([`wire`]) and the device
//! ([`device`], served by the back-end framework: `virtq serve-net`).

pub mod device;
mod tap;
pub mod wire;

pub use device::{NetBackend, NetBackendOptions, NetPeer, NetStats};
pub use wire::{NetConfig, NetHdr};
