//! Virtio virtqueues for both ends of the ring.
//!
//! - The **driver** side ([`SplitDriver`]) has every operation of Linux's
//!   `drivers/virtio/virtio_ring.c`, with its semantics, each findable by its Linux name
//!   (search the docs for `virtqueue_add_sgs`).
//! - The **device** side ([`SplitDevice`]) plays the role of Linux's vringh: pop chains,
//!   complete them, decide interrupts, with every driver-written field validated.
//!
//! The crate is `no_std`. The driver side needs the `alloc` feature (on by default) for
//! its private bookkeeping, allocated once at creation; no operation allocates afterwards.
//! The device side needs no allocation at all.
//!
//! ```
//! use virtq::{DeviceConfig, Features, QueueConfig, Segments, SplitDevice, SplitDriver};
//! use virtq::testing::TestMemory;
//!
//! // Guest memory shared by both ends: the driver allocates from it, the device
//! // translates guest addresses into it with bounds checks.
//! let mem = TestMemory::new(1 << 16);
//! let features = Features::VERSION_1 | Features::EVENT_IDX;
//! let mut driver = SplitDriver::<u32, _, _>::new(QueueConfig::new(0, 8, features), &mem, ()).unwrap();
//! let mut device = SplitDevice::new(&mem, DeviceConfig::new(
//!     8, features, driver.desc_addr(), driver.avail_addr(), driver.used_addr(),
//! )).unwrap();
//!
//! let (request, reply) = (mem.alloc_sg(4), mem.alloc_sg(8));
//! mem.write(request.addr, b"ping");
//! driver.add_sgs(&[&[request]], &[&[reply]], 7).unwrap();
//! driver.kick();
//!
//! let mut segs = Segments::<4>::new();
//! let chain = device.pop(&mut segs).unwrap().expect("one chain");
//! let mut got = [0u8; 4];
//! segs.iter().next().unwrap().read_at(0, &mut got);
//! assert_eq!(&got, b"ping");
//! let written = segs.iter().nth(1).unwrap().write_at(0, b"pong");
//! device.complete(chain, written as u32);
//! device.publish_used();
//!
//! let used = driver.get_buf().unwrap();
//! assert_eq!((used.token, used.len), (7, 4));
//! let mut answer = [0u8; 4];
//! mem.read(reply.addr, &mut answer);
//! assert_eq!(&answer, b"pong");
//! ```

#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

mod barrier;
#[cfg(feature = "alloc")]
pub mod completion;
pub mod device;
#[cfg(feature = "alloc")]
pub mod driver;
pub mod event;
mod features;
mod layout;
pub mod memory;
// Without `alloc` only the device side exists, which writes no descriptors: the driver's
// helpers in these go unused.
#[cfg_attr(not(feature = "alloc"), allow(dead_code))]
pub mod packed;
#[cfg_attr(not(feature = "alloc"), allow(dead_code))]
mod prefetch;
#[cfg_attr(not(feature = "alloc"), allow(dead_code))]
mod shared;
pub mod split;
#[cfg(feature = "test-utils")]
pub mod testing;

/// The README's example, compiled and run as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

pub use barrier::Barriers;
#[cfg(feature = "alloc")]
pub use completion::{AsyncQueue, NotEmpty, Submit, SubmitError};
pub use device::{
    AnyDeviceLayout, Chain, Device, DeviceConfig, DeviceError, DeviceLayout, DeviceQueue, PackedDevice,
    PackedInOrderDevice, Segment, SegmentSink, Segments, SplitDevice, SplitInOrderDevice,
};
#[cfg(feature = "alloc")]
pub use driver::any::{AnyDriverLayout, Virtqueue};
#[cfg(feature = "alloc")]
pub use driver::{
    AddError, AddErrorKind, CreateError, DriverLayout, DriverQueue, Fault, InterruptAction, Kick, Notify, NotifyData,
    NotifyFn, QueueConfig, QueueHandle, Sg, UsedBuf, UsedSnapshot,
};
pub use event::need_event;
pub use features::Features;
pub use layout::{LayoutKind, UnknownLayout};
#[cfg(feature = "alloc")]
pub use memory::IdentityDma;
pub use memory::{Direction, Dma, DmaRegion, GuestMemory, GuestRegions};
pub use packed::device::PackedDeviceLayout;
#[cfg(feature = "alloc")]
pub use packed::driver::{PackedDriver, PackedDriverLayout, PackedInOrderDriver};
pub use split::device::SplitDeviceLayout;
#[cfg(feature = "alloc")]
pub use split::driver::{SplitDriver, SplitDriverLayout, SplitInOrderDriver};
