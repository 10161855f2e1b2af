//! Virtio virtqueues for both ends of the ring: split and packed, each with or without
//! `IN_ORDER` (VIRTIO 1.3, 2.7 and 2.8), with Linux's `virtio_ring.c` semantics on the
//! driver side and a hardened device side.
//!
//! The crate is `no_std`. The driver side needs the `alloc` feature (on by default) for
//! its private bookkeeping, allocated once at creation; no operation allocates afterwards.
//! The device side needs no allocation at all. Every counterpart of a Linux function
//! carries its name as a doc alias: search these docs for `virtqueue_kick_prepare`.
//!
//! # Which type to use
//!
//! | you write | layout chosen at run time, by the negotiated features | layout fixed at compile time |
//! |---|---|---|
//! | a driver | [`Virtqueue`] | [`SplitDriver`], [`SplitInOrderDriver`], [`PackedDriver`], [`PackedInOrderDriver`] |
//! | a device | [`DeviceQueue`] | [`SplitDevice`], [`SplitInOrderDevice`], [`PackedDevice`], [`PackedInOrderDevice`] |
//! | a driver that awaits completions | [`AsyncQueue`] over any of the drivers | |
//!
//! All drivers are one type, [`DriverQueue`], with a layout parameter ([`DriverLayout`]);
//! all devices are [`Device`] with a [`DeviceLayout`]. The methods are the same whatever
//! the layout: a program that knows its layout saves the one `match` per call that run-time
//! choice costs. [`LayoutKind`] names the four layouts and maps them to and from features.
//!
//! Memory is behind two traits, one per side:
//! - [`Dma`]: the driver allocates its rings and maps buffers through it (Linux's DMA API).
//!   [`IdentityDma`] is for a driver whose device sees its addresses unchanged; `*_premapped`
//!   calls take addresses that are already the device's.
//! - [`GuestMemory`]: the device translates guest addresses through it, with bounds checks.
//!   [`GuestRegions`] is an allocation-free table of mapped regions.
//!
//! # A driver and a device in one process
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
//!
//! # A driver's interrupt handler
//!
//! The handler takes used buffers with interrupts off, then turns them back on and looks
//! once more: a buffer used between the last `get_buf` and `enable_cb` raises no interrupt.
//!
//! ```
//! use virtq::{Dma, Notify, Virtqueue};
//!
//! fn on_interrupt<D: Dma, N: Notify>(queue: &mut Virtqueue<u32, D, N>, done: &mut Vec<(u32, u32)>) {
//!     loop {
//!         queue.disable_cb();
//!         while let Some(used) = queue.get_buf() {
//!             done.push((used.token, used.len));
//!         }
//!         if queue.enable_cb() {
//!             break; // nothing pending: the next used buffer interrupts
//!         }
//!     }
//! }
//! # use virtq::{DeviceConfig, DeviceQueue, Features, QueueConfig, Segments};
//! # use virtq::testing::TestMemory;
//! # let mem = TestMemory::new(1 << 16);
//! # let features = Features::VERSION_1 | Features::RING_PACKED | Features::EVENT_IDX;
//! # let mut queue = Virtqueue::<u32, _, _>::new(QueueConfig::new(0, 8, features), &mem, ()).unwrap();
//! # let config = DeviceConfig::new(8, features, queue.desc_addr(), queue.avail_addr(), queue.used_addr());
//! # let mut device = DeviceQueue::new(&mem, config).unwrap();
//! # for token in 0..3 { queue.add_inbuf(&[mem.alloc_sg(8)], token).unwrap(); }
//! # let mut segs = Segments::<1>::new();
//! # device.serve(usize::MAX, &mut segs, |_, _| 8).unwrap();
//! let mut done = Vec::new();
//! on_interrupt(&mut queue, &mut done);
//! assert_eq!(done, [(0, 8), (1, 8), (2, 8)]);
//! ```
//!
//! # A device's service loop
//!
//! Every device runs the same loop on each queue: with kicks off, pop and complete until
//! the ring is empty, interrupt the driver if it asked, then turn kicks back on and look
//! once more before sleeping, because a chain made available before the driver saw kicks
//! enabled sends no kick. A driver fault latches the queue broken and ends the loop; the
//! transport then tells the driver the device needs a reset.
//!
//! ```
//! use virtq::{DeviceError, DeviceQueue, GuestMemory, Segments};
//!
//! /// Serves `queue` until `wait_for_kick` returns false; each chain's readable bytes are
//! /// summed into its first writable segment.
//! fn serve_queue<M: GuestMemory>(
//!     queue: &mut DeviceQueue<'_, M>,
//!     mut wait_for_kick: impl FnMut() -> bool,
//!     mut interrupt: impl FnMut(),
//! ) -> Result<(), DeviceError> {
//!     let mut segs = Segments::<8>::new();
//!     loop {
//!         queue.disable_notifications();
//!         while let Some(chain) = queue.pop(&mut segs)? {
//!             let sum = segs.iter().filter(|s| !s.is_writable()).fold(0u8, |acc, s| {
//!                 let mut buf = [0u8; 64];
//!                 let n = s.read_at(0, &mut buf);
//!                 buf[..n].iter().fold(acc, |a, b| a.wrapping_add(*b))
//!             });
//!             let written = segs.iter().find(|s| s.is_writable()).map_or(0, |s| s.write_at(0, &[sum]));
//!             queue.complete(chain, written as u32);
//!         }
//!         if queue.needs_notification() {
//!             interrupt();
//!         }
//!         if queue.enable_notifications() {
//!             continue; // a chain came in while kicks were off
//!         }
//!         if !wait_for_kick() {
//!             return Ok(());
//!         }
//!     }
//! }
//! # use virtq::{DeviceConfig, Features, QueueConfig, SplitDriver};
//! # use virtq::testing::TestMemory;
//! # let mem = TestMemory::new(1 << 16);
//! # let features = Features::VERSION_1 | Features::EVENT_IDX;
//! # let mut driver = SplitDriver::<u32, _, _>::new(QueueConfig::new(0, 8, features), &mem, ()).unwrap();
//! # let config = DeviceConfig::new(8, features, driver.desc_addr(), driver.avail_addr(), driver.used_addr());
//! # let mut device = DeviceQueue::new(&mem, config).unwrap();
//! # let (request, reply) = (mem.alloc_sg(3), mem.alloc_sg(1));
//! # mem.write(request.addr, &[1, 2, 3]);
//! # driver.add_sgs(&[&[request]], &[&[reply]], 9).unwrap();
//! let mut interrupts = 0;
//! serve_queue(&mut device, || false, || interrupts += 1).unwrap();
//! assert_eq!(interrupts, 1);
//! let used = driver.get_buf().unwrap();
//! assert_eq!((used.token, used.len), (9, 1));
//! ```
//!
//! # Guest memory for a device
//!
//! ```
//! use core::ptr::NonNull;
//! use virtq::{GuestMemory, GuestRegions};
//!
//! let mut backing = vec![0u8; 4096];
//! let mut regions = GuestRegions::<4>::new();
//! // SAFETY: `backing` outlives `regions` and is not moved.
//! unsafe { regions.add_region(0x1_0000, 4096, NonNull::new(backing.as_mut_ptr()).unwrap()) }.unwrap();
//! assert!(regions.translate(0x1_0ff0, 16).is_some());
//! assert!(regions.translate(0x1_0ff0, 17).is_none(), "a range that leaves the region");
//! ```
//!
//! Awaiting completions instead of polling for them: see [`completion`].

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
