//! The config space and the device's answers match what qemu-storage-daemon was started
//! with (VIRTIO 1.3, 5.2.4 and 5.2.6).

mod common;

use common::{qsd, Backing, Daemon};
use virtq_vhost_user::blk::{feature, BlkDevice, BlkError, BlkOptions, Op, Request, RequestError, SECTOR_SIZE};

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn config_matches_the_export() {
    let bin = qsd("config_matches_the_export");
    let dir = tempfile::tempdir().unwrap();
    let size = 48u64 << 20;
    let daemon = Daemon::start_with(&bin, dir.path(), Backing::Null { size }, 3, &["logical-block-size=4096"]);
    let mut dev = BlkDevice::connect(&daemon.socket, &BlkOptions { queues: 0, ..Default::default() }).unwrap();
    let info = dev.info().clone();
    assert_eq!(info.config.capacity, size / SECTOR_SIZE, "capacity is in 512-byte sectors");
    assert_eq!(info.capacity_bytes(), size);
    assert!(info.has(feature::MQ));
    assert_eq!(info.config.num_queues, 3);
    assert_eq!(info.device_queues, 3);
    assert_eq!(info.queues, 3, "queues: 0 sets up every queue");
    assert!(info.has(feature::BLK_SIZE));
    assert_eq!(info.block_size(), 4096);
    assert!(info.has(feature::SEG_MAX));
    assert!(info.config.seg_max >= 1);
    assert!(info.has(feature::FLUSH));
    assert!(!info.read_only());
    assert!(info.features.contains(virtq::Features::VERSION_1));
    let mut queues = dev.take_queues();
    assert_eq!(queues.len(), 3);
    for q in &mut queues {
        assert_eq!(q.get_id().unwrap(), "vhost_user_blk");
        let mut buf = vec![0xffu8; 8192];
        q.read_at(size - 8192, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "null-co with read-zeroes reads zeroes");
    }
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn read_only_export_sets_ro() {
    let bin = qsd("read_only_export_sets_ro");
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with(&bin, dir.path(), Backing::Null { size: 1 << 20 }, 1, &["writable=off"]);
    let mut dev = BlkDevice::connect(&daemon.socket, &BlkOptions::default()).unwrap();
    assert!(dev.info().read_only());
    let mut q = dev.take_queues().remove(0);
    assert!(matches!(q.write_at(0, &[0u8; 512]), Err(BlkError::ReadOnly)));
    let mut buf = [1u8; 512];
    q.read_at(0, &mut buf).unwrap();
}

#[test]
#[cfg_attr(not(peer = "qsd"), ignore = "needs qemu-storage-daemon (scripts/test.sh installs it)")]
fn device_status_errors_and_driver_checks() {
    let bin = qsd("device_status_errors_and_driver_checks");
    let dir = tempfile::tempdir().unwrap();
    let size = 1u64 << 20;
    let daemon = Daemon::start(&bin, dir.path(), Backing::Null { size }, 1);

    // The driver's own checks.
    let mut dev = BlkDevice::connect(&daemon.socket, &BlkOptions::default()).unwrap();
    let mut q = dev.take_queues().remove(0);
    let mut buf = vec![0u8; 4096];
    assert!(matches!(q.read_at(size, &mut buf), Err(BlkError::InvalidRequest(_))), "beyond capacity");
    assert!(matches!(q.read_at(100, &mut buf), Err(BlkError::InvalidRequest(_))), "unaligned offset");
    assert!(matches!(q.read_at(0, &mut buf[..100]), Err(BlkError::InvalidRequest(_))), "unaligned length");
    let too_many: Vec<_> = (0..q.info().max_segments() + 1).map(|_| q.alloc(512).unwrap()).collect();
    let e = q.submit(Request::read(0, too_many, 1)).unwrap_err();
    assert!(e.to_string().contains("seg_max"), "{e}");
    q.read_at(0, &mut buf).expect("the queue still works after refused requests");
    drop(q);
    drop(dev);

    // The device's own answers, with the driver's checks off.
    let opts = BlkOptions { validate: false, ..Default::default() };
    let mut dev = BlkDevice::connect(&daemon.socket, &opts).unwrap();
    let mut q = dev.take_queues().remove(0);
    let beyond = q.alloc(4096).unwrap();
    let c = q.run(Request::read(size / SECTOR_SIZE, vec![beyond], 7)).unwrap();
    assert_eq!(c.user_data, 7);
    assert_eq!(c.result, Err(RequestError::IoError), "a read beyond the end is VIRTIO_BLK_S_IOERR");
    let c = q.run(Request { op: Op::Raw(0x7777), sector: 0, num_sectors: 0, bufs: vec![], user_data: 8 }).unwrap();
    assert_eq!(c.result, Err(RequestError::Unsupported), "an unknown type is VIRTIO_BLK_S_UNSUPP");
    q.read_at(0, &mut buf).expect("the queue still works after failed requests");
}
