//! A virtq device queue serving a ring in vm-memory guest memory, driven by a virtq driver
//! queue whose ring and buffers live in the same memory (as a guest's would).

use std::ptr::NonNull;

use virtq::{
    DeviceConfig, DeviceError, DeviceQueue, DmaRegion, DriverQueue, Features, IdentityDma, LayoutKind, QueueConfig, Sg,
    Virtqueue,
};
use virtq_vm_memory::VmMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const RAM: u64 = 0x10_0000;
const RING: u64 = RAM;
const BUFS: u64 = RAM + 0x8000;

fn features(layout: LayoutKind) -> Features {
    layout.apply(Features::VERSION_1 | Features::EVENT_IDX)
}

/// A driver queue whose ring is at guest address `RING`, as a guest driver would place it.
fn guest_driver(ram: &GuestMemoryMmap<()>, size: u16, features: Features) -> Virtqueue<u32, IdentityDma, ()> {
    let region = DmaRegion {
        cpu: NonNull::new(ram.get_host_address(GuestAddress(RING)).unwrap()).unwrap(),
        device_addr: RING,
        size: (BUFS - RING) as usize,
    };
    // SAFETY: the region is zeroed (fresh anonymous memory), page aligned, large enough for
    // the ring, addressed by the device at `RING`, and `ram` outlives the queue.
    unsafe { DriverQueue::new_in(QueueConfig::new(0, size, features), region, IdentityDma, ()) }.unwrap()
}

#[test]
fn requests_round_trip_through_guest_memory_on_every_layout() {
    for layout in [LayoutKind::Split, LayoutKind::SplitInOrder, LayoutKind::Packed, LayoutKind::PackedInOrder] {
        let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM), 0x10_0000)]).unwrap();
        let features = features(layout);
        let mut driver = guest_driver(&ram, 8, features);
        let mem = VmMemory::new(&ram);
        let config = DeviceConfig::new(8, features, driver.desc_addr(), driver.avail_addr(), driver.used_addr());
        let mut device = DeviceQueue::new(&mem, config).unwrap();
        for round in 0..20u32 {
            // A request the device reads and a reply it writes, by guest address.
            let (request, reply) = (BUFS + u64::from(round % 4) * 0x100, BUFS + 0x1000 + u64::from(round % 4) * 0x100);
            ram.write_obj(round, GuestAddress(request)).unwrap();
            driver.add_sgs_premapped(&[&[Sg::new(request, 4)]], &[&[Sg::new(reply, 8)]], round).unwrap();
            driver.kick();

            let mut segs = Vec::new();
            let chain = device.pop(&mut segs).unwrap().expect("the request");
            let mut got = [0u8; 4];
            assert_eq!(segs[0].read_at(0, &mut got), 4);
            let answer = u64::from(u32::from_le_bytes(got)) * 3;
            assert_eq!(segs[1].write_at(0, &answer.to_le_bytes()), 8);
            device.complete(chain, 8);
            device.publish_used();

            let used = driver.get_buf().expect("the reply");
            assert_eq!((used.token, used.len), (round, 8), "{layout:?}");
            assert_eq!(ram.read_obj::<u64>(GuestAddress(reply)).unwrap(), u64::from(round) * 3, "{layout:?}");
        }
        assert!(!driver.is_broken());
    }
}

#[test]
fn a_buffer_outside_guest_memory_is_refused() {
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM), 0x10_0000)]).unwrap();
    let features = features(LayoutKind::Split);
    let mut driver = guest_driver(&ram, 4, features);
    let mem = VmMemory::new(&ram);
    let config = DeviceConfig::new(4, features, driver.desc_addr(), driver.avail_addr(), driver.used_addr());
    let mut device = DeviceQueue::new(&mem, config).unwrap();
    // Ends one byte past guest RAM.
    driver.add_inbuf_premapped(&[Sg::new(RAM + 0x10_0000 - 16, 17)], 1).unwrap();
    driver.kick();
    let mut segs = Vec::new();
    assert!(matches!(device.pop(&mut segs), Err(DeviceError::AddressOutOfRange { .. })));
}

#[test]
fn a_ring_outside_guest_memory_is_refused() {
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM), 0x10_0000)]).unwrap();
    let mem = VmMemory::new(&ram);
    let config = DeviceConfig::new(256, features(LayoutKind::Split), RAM + 0x10_0000 - 0x100, RAM, RAM + 0x2000);
    assert!(DeviceQueue::new(&mem, config).is_err(), "a descriptor table past the end of RAM");
}
