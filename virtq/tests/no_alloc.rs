//! The hot path allocates nothing: after creation, adds and get_bufs (one at a time and
//! in bursts), kicks, pops, completions, `serve` and interrupt decisions on every layout
//! (direct and indirect) make no heap allocation. A correctness property, checked with a counting
//! global allocator.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use common::{layout_features, LAYOUTS};
use virtq::testing::TestMemory;
use virtq::{DeviceQueue, QueueConfig, Segments, Sg, Virtqueue};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the test's own thread only: the test harness's main thread allocates for its
    /// bookkeeping while the test runs (a loaded machine showed 4 such allocations).
    /// A `const` `Cell<bool>` needs no allocation nor destructor, so the allocator can
    /// read it.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn counting() -> bool {
    COUNTING.with(Cell::get)
}

// SAFETY: forwards to the system allocator unchanged; counting has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counting() {
            ALLOCATIONS.fetch_add(1, Relaxed);
        }
        // SAFETY: the caller's layout contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counting() {
            ALLOCATIONS.fetch_add(1, Relaxed);
        }
        // SAFETY: as in `alloc` and `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn the_hot_path_makes_no_heap_allocation() {
    for layout in LAYOUTS {
        for indirect in [false, true] {
            let mem = TestMemory::new(1 << 20);
            let features = layout_features(layout, true, indirect);
            let mut driver = Virtqueue::<u64, _, ()>::new(QueueConfig::new(0, 16, features), &mem, ()).unwrap();
            let mut device = DeviceQueue::new(&mem, common::device_config(&driver, features)).unwrap();
            let bufs: Vec<Sg> = (0..4).map(|_| mem.alloc_sg(64)).collect();
            let mut segs = Segments::<8>::new();

            COUNTING.with(|c| c.set(true));
            for round in 0..1000u64 {
                driver.add_sgs(&[&bufs[..2]], &[&bufs[2..]], round).unwrap();
                driver.add_inbuf(&bufs[..1], round + 1_000_000).unwrap();
                assert_eq!(driver.add_outbufs(&bufs[..3], |i| round + 2_000_000 + i as u64), Ok(3));
                let _ = driver.kick_prepare();
                // Two chains one at a time, the other three with one `serve`.
                for _ in 0..2 {
                    let chain = device.pop(&mut segs).unwrap().unwrap();
                    let written = chain.writable_len();
                    device.complete(chain, written);
                }
                assert_eq!(device.serve(8, &mut segs, |chain, _| chain.writable_len()), Ok(3));
                let _ = device.needs_notification();
                let _ = device.enable_notifications();
                device.disable_notifications();
                assert!(driver.get_buf().is_some() && driver.get_buf().is_some());
                assert_eq!(driver.get_bufs(8, |u| assert!(u.token >= 2_000_000)), 3);
                let snapshot = driver.enable_cb_prepare();
                let _ = driver.poll(snapshot);
                driver.disable_cb();
                let _ = driver.enable_cb_delayed();
            }
            COUNTING.with(|c| c.set(false));
            assert_eq!(ALLOCATIONS.swap(0, Relaxed), 0, "{layout:?} indirect={indirect}");
        }
    }
}
