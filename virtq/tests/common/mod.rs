//! Shared test harness: a driver queue and a device queue on the same [`TestMemory`],
//! in any of the four layouts.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use virtq::testing::TestMemory;
use virtq::{Chain, DeviceConfig, DeviceQueue, Features, LayoutKind, NotifyData, QueueConfig, Segment, Virtqueue};

/// Every layout, for tests that must hold on all of them.
pub const LAYOUTS: [LayoutKind; 4] = LayoutKind::ALL;

/// A transport notifier that records kicks; it can be made to fail.
#[derive(Default)]
pub struct Doorbell {
    pub kicks: AtomicU64,
    pub last: AtomicU64,
    pub fail: AtomicBool,
}

impl virtq::Notify for Doorbell {
    fn notify(&self, data: NotifyData) -> bool {
        self.kicks.fetch_add(1, Relaxed);
        self.last.store(data.to_u32() as u64, Relaxed);
        !self.fail.load(Relaxed)
    }
}

impl Doorbell {
    pub fn kicks(&self) -> u64 {
        self.kicks.load(Relaxed)
    }
}

pub type Driver<'m> = Virtqueue<u64, &'m TestMemory, Arc<Doorbell>>;
pub type Device<'m> = DeviceQueue<'m, TestMemory>;

/// The features that select `layout`, plus the optional ring features.
pub fn layout_features(layout: LayoutKind, event_idx: bool, indirect: bool) -> Features {
    let mut f = layout.apply(Features::VERSION_1);
    if event_idx {
        f |= Features::EVENT_IDX;
    }
    if indirect {
        f |= Features::INDIRECT_DESC;
    }
    f
}

/// Split-ring features.
pub fn features(event_idx: bool, indirect: bool) -> Features {
    layout_features(LayoutKind::Split, event_idx, indirect)
}

pub fn device_config<T, D: virtq::Dma, N: virtq::Notify, L: virtq::DriverLayout>(
    driver: &virtq::DriverQueue<T, D, N, L>,
    features: Features,
) -> DeviceConfig {
    DeviceConfig::new(driver.vring_size(), features, driver.desc_addr(), driver.avail_addr(), driver.used_addr())
}

pub struct Pair<'m> {
    pub mem: &'m TestMemory,
    pub driver: Driver<'m>,
    pub device: Device<'m>,
    pub bell: Arc<Doorbell>,
    pub layout: LayoutKind,
}

impl<'m> Pair<'m> {
    pub fn new(mem: &'m TestMemory, config: QueueConfig) -> Self {
        let bell = Arc::new(Doorbell::default());
        let driver = Virtqueue::new(config, mem, bell.clone()).expect("driver queue");
        let device = DeviceQueue::new(mem, device_config(&driver, config.features)).expect("device queue");
        Self { mem, layout: driver.layout(), driver, device, bell }
    }

    /// A split pair.
    pub fn with(mem: &'m TestMemory, size: u16, event_idx: bool, indirect: bool) -> Self {
        Self::of(mem, LayoutKind::Split, size, event_idx, indirect)
    }

    pub fn of(mem: &'m TestMemory, layout: LayoutKind, size: u16, event_idx: bool, indirect: bool) -> Self {
        Self::new(mem, QueueConfig::new(0, size, layout_features(layout, event_idx, indirect)))
    }

    pub fn is_split(&self) -> bool {
        !self.layout.is_packed()
    }

    pub fn in_order(&self) -> bool {
        self.layout.is_in_order()
    }

    /// Pops one chain; returns it with its segments.
    pub fn pop(&mut self) -> Option<(Chain, Vec<Segment<'m>>)> {
        let mut segs = Vec::new();
        self.device.pop(&mut segs).expect("pop").map(|c| (c, segs))
    }

    /// Device completes every available chain, filling each writable segment, and
    /// publishes. Returns how many it completed.
    pub fn device_echo_all(&mut self) -> usize {
        let mut n = 0;
        while let Some((chain, segs)) = self.pop() {
            let mut written = 0u32;
            for s in segs.iter().filter(|s| s.is_writable()) {
                written += s.write_at(0, &vec![0xa5; s.len() as usize]) as u32;
            }
            self.device.complete(chain, written);
            n += 1;
        }
        self.device.publish_used();
        n
    }

    // Split-ring fields, read from memory as the other side would see them.

    pub fn used_idx(&self) -> u16 {
        self.mem.read_u16(self.driver.used_addr() + 2)
    }

    pub fn avail_idx(&self) -> u16 {
        self.mem.read_u16(self.driver.avail_addr() + 2)
    }

    pub fn avail_flags(&self) -> u16 {
        self.mem.read_u16(self.driver.avail_addr())
    }

    pub fn used_event(&self) -> u16 {
        self.mem.read_u16(self.driver.avail_addr() + 4 + 2 * self.driver.vring_size() as u64)
    }

    pub fn avail_event(&self) -> u16 {
        self.mem.read_u16(self.driver.used_addr() + 4 + 8 * self.driver.vring_size() as u64)
    }

    /// Address of split used ring element `slot`.
    pub fn used_elem_addr(&self, slot: u16) -> u64 {
        self.driver.used_addr() + 4 + 8 * (slot & (self.driver.vring_size() - 1)) as u64
    }

    /// Address of descriptor `i` (both layouts).
    pub fn desc_addr(&self, i: u16) -> u64 {
        self.driver.desc_addr() + 16 * i as u64
    }

    // Packed-ring fields.

    /// The driver area: `(off_wrap, flags)`.
    pub fn driver_event(&self) -> (u16, u16) {
        (self.mem.read_u16(self.driver.avail_addr()), self.mem.read_u16(self.driver.avail_addr() + 2))
    }

    /// The device area: `(off_wrap, flags)`.
    pub fn device_event(&self) -> (u16, u16) {
        (self.mem.read_u16(self.driver.used_addr()), self.mem.read_u16(self.driver.used_addr() + 2))
    }

    /// Whether the driver has asked for no interrupts, in either layout.
    pub fn interrupts_suppressed(&self) -> bool {
        if self.is_split() {
            self.avail_flags() & virtq::split::AVAIL_F_NO_INTERRUPT != 0
        } else {
            self.driver_event().1 == virtq::packed::EVENT_FLAGS_DISABLE
        }
    }
}
