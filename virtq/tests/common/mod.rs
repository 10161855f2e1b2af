//! Shared test harness: a driver queue and a device queue on the same [`TestMemory`].

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use virtq::testing::TestMemory;
use virtq::{Chain, DeviceConfig, Features, NotifyData, QueueConfig, Segment, SplitDevice, SplitDriver};

/// A transport notifier that records kicks; it can be made to fail.
#[derive(Default)]
pub struct Doorbell {
    pub kicks: AtomicU64,
    pub last: AtomicU64,
    pub fail: std::sync::atomic::AtomicBool,
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

pub type Driver<'m> = SplitDriver<u64, &'m TestMemory, Arc<Doorbell>>;
pub type Device<'m> = SplitDevice<'m, TestMemory>;

pub fn features(event_idx: bool, indirect: bool) -> Features {
    let mut f = Features::VERSION_1;
    if event_idx {
        f |= Features::EVENT_IDX;
    }
    if indirect {
        f |= Features::INDIRECT_DESC;
    }
    f
}

pub fn device_config<T, D: virtq::Dma, N: virtq::Notify>(
    driver: &SplitDriver<T, D, N>,
    features: Features,
) -> DeviceConfig {
    DeviceConfig {
        size: driver.vring_size(),
        features,
        desc_addr: driver.desc_addr(),
        avail_addr: driver.avail_addr(),
        used_addr: driver.used_addr(),
        avail_base: 0,
    }
}

pub struct Pair<'m> {
    pub mem: &'m TestMemory,
    pub driver: Driver<'m>,
    pub device: Device<'m>,
    pub bell: Arc<Doorbell>,
}

impl<'m> Pair<'m> {
    pub fn new(mem: &'m TestMemory, config: QueueConfig) -> Self {
        let bell = Arc::new(Doorbell::default());
        let driver = SplitDriver::new(config, mem, bell.clone()).expect("driver queue");
        let device = SplitDevice::new(mem, device_config(&driver, config.features)).expect("device queue");
        Self { mem, driver, device, bell }
    }

    pub fn with(mem: &'m TestMemory, size: u16, event_idx: bool, indirect: bool) -> Self {
        Self::new(mem, QueueConfig::new(0, size, features(event_idx, indirect)))
    }

    /// Pops one chain; returns it with its segments.
    pub fn pop(&mut self) -> Option<(Chain, Vec<Segment<'m>>)> {
        let mut segs = Vec::new();
        self.device.pop(&mut segs).expect("pop").map(|c| (c, segs))
    }

    /// Device completes every available chain, writing `fill` into each writable segment,
    /// and publishes. Returns how many it completed.
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

    /// Reads the used ring's index from memory (what the driver sees).
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

    /// Address of used ring element `slot`.
    pub fn used_elem_addr(&self, slot: u16) -> u64 {
        self.driver.used_addr() + 4 + 8 * (slot & (self.driver.vring_size() - 1)) as u64
    }

    pub fn desc_addr(&self, i: u16) -> u64 {
        self.driver.desc_addr() + 16 * i as u64
    }
}
