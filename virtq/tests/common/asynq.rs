//! Test support for `AsyncQueue`: buffers that count their returns, wakers that count
//! their wakes, and an async queue with a device on the same `TestMemory`.

#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use crate::common::layout_features;
use virtq::completion::{AsyncQueue, Submit, SubmitError};
use virtq::testing::TestMemory;
use virtq::{
    Chain, DeviceConfig, DeviceQueue, LayoutKind, Notify, NotifyData, QueueConfig, Segment, Sg, UsedBuf, Virtqueue,
};

/// Counts how often each buffer came back to its owner (was dropped).
pub struct Returns(Vec<AtomicU32>);

impl Returns {
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Self((0..n).map(|_| AtomicU32::new(0)).collect()))
    }

    pub fn count(&self, id: usize) -> u32 {
        self.0[id].load(Relaxed)
    }

    /// Panics unless every buffer came back exactly once.
    pub fn assert_each_once(&self) {
        for (id, n) in self.0.iter().enumerate() {
            assert_eq!(n.load(Relaxed), 1, "buffer {id} came back {} times", n.load(Relaxed));
        }
    }
}

/// A buffer: its id, the guest memory the device writes, and where it reports its return.
pub struct Buf {
    pub id: usize,
    pub sg: Sg,
    returns: Arc<Returns>,
}

impl Buf {
    pub fn new(mem: &TestMemory, id: usize, returns: &Arc<Returns>) -> Self {
        let sg = mem.alloc_sg(16);
        mem.write(sg.addr, &(id as u64).to_le_bytes());
        Self { id, sg, returns: returns.clone() }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        self.returns.0[self.id].fetch_add(1, Relaxed);
    }
}

/// A waker that counts its wakes.
#[derive(Default)]
pub struct Flag(AtomicUsize);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Relaxed);
    }
}

impl Flag {
    pub fn wakes(&self) -> usize {
        self.0.load(Relaxed)
    }
}

/// A notifier that counts kicks and can be made to fail.
#[derive(Default)]
pub struct Bell {
    pub fail: AtomicBool,
    pub kicks: AtomicUsize,
}

impl Notify for Bell {
    fn notify(&self, _data: NotifyData) -> bool {
        self.kicks.fetch_add(1, Relaxed);
        !self.fail.load(Relaxed)
    }
}

pub type Ring<'m> = Virtqueue<u16, &'m TestMemory, Arc<Bell>>;
pub type Queue<'m> = AsyncQueue<Buf, Ring<'m>>;
pub type Fut<'a, 'm> = Submit<'a, Buf, Ring<'m>>;
pub type Output = Result<UsedBuf<Buf>, SubmitError<Buf>>;

/// The device's end of the ring, and what the test needs to play it.
pub struct Dev<'m> {
    pub mem: &'m TestMemory,
    pub device: DeviceQueue<'m, TestMemory>,
    pub bell: Arc<Bell>,
    pub layout: LayoutKind,
}

/// An async queue of `size` entries in `layout` and the device attached to it.
pub fn setup(mem: &TestMemory, layout: LayoutKind, size: u16, event_idx: bool) -> (Queue<'_>, Dev<'_>) {
    let features = layout_features(layout, event_idx, false);
    let bell = Arc::new(Bell::default());
    let ring = Ring::new(QueueConfig::new(0, size, features), mem, bell.clone()).expect("ring");
    let config = DeviceConfig::new(size, features, ring.desc_addr(), ring.avail_addr(), ring.used_addr());
    let device = DeviceQueue::new(mem, config).expect("device");
    let queue = AsyncQueue::new(ring).expect("an empty ring");
    (queue, Dev { mem, device, bell, layout })
}

impl<'m> Dev<'m> {
    pub fn in_order(&self) -> bool {
        matches!(self.layout, LayoutKind::SplitInOrder | LayoutKind::PackedInOrder)
    }

    /// Every chain the driver has made available, in order, with its buffer id (the first
    /// eight bytes of its segment).
    pub fn pop_all(&mut self) -> Vec<(Chain, Vec<Segment<'m>>, usize)> {
        let mut out = Vec::new();
        loop {
            let mut segs = Vec::new();
            let Some(chain) = self.device.pop(&mut segs).expect("a correct driver") else { return out };
            let mut id = [0u8; 8];
            segs[0].read_at(0, &mut id);
            out.push((chain, segs, u64::from_le_bytes(id) as usize));
        }
    }
}

/// Polls `fut` once with `waker`.
pub fn poll(fut: &mut Fut<'_, '_>, waker: &Arc<Flag>) -> Poll<Output> {
    let waker = Waker::from(waker.clone());
    Pin::new(fut).poll(&mut Context::from_waker(&waker))
}

/// The length the device reports for buffer `id`.
pub fn len_of(id: usize) -> u32 {
    (id % 8 + 1) as u32
}
