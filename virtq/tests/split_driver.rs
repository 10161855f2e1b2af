//! Split-ring specifics of the driver, checked in ring memory: what `avail.flags`,
//! `used_event`, `avail_event` and the avail index hold after each operation, the 0xffff
//! auto-kick, the contiguous layout, and `may_reduce_num`. The operations themselves are
//! tested on all four layouts in `driver_layouts.rs`.

mod common;

use common::{features, Pair};
use virtq::testing::TestMemory;
use virtq::{Features, InterruptAction, QueueConfig, Sg, SplitDriver};

#[test]
fn indirect_buffers_take_one_descriptor_and_fall_back_when_too_long() {
    let mem = TestMemory::new(1 << 20);
    let mut config = QueueConfig::new(0, 8, features(true, true));
    config.indirect_max = 4;
    let mut p = Pair::new(&mem, config);
    let segs: Vec<Sg> = (0..4).map(|i| mem.alloc_sg(8 + i)).collect();
    p.driver.add_sgs(&[&segs[..2]], &[&segs[2..]], 1).unwrap();
    assert_eq!(p.driver.num_free(), 7);
    // One segment never uses a table; five exceed `indirect_max` and go direct.
    p.driver.add_outbuf(&segs[..1], 2).unwrap();
    assert_eq!(p.driver.num_free(), 6);
    let five: Vec<Sg> = (0..5).map(|_| mem.alloc_sg(4)).collect();
    p.driver.add_outbuf(&five, 3).unwrap();
    assert_eq!(p.driver.num_free(), 1);
    let indirect_flag = mem.read_u16(p.desc_addr(0) + 12);
    assert_eq!(indirect_flag, virtq::split::DESC_F_INDIRECT);

    let (c, s) = p.pop().unwrap();
    assert_eq!(
        s.iter().map(|s| (s.addr(), s.len(), s.is_writable())).collect::<Vec<_>>(),
        segs.iter().enumerate().map(|(i, s)| (s.addr, s.len, i >= 2)).collect::<Vec<_>>()
    );
    assert_eq!(c.writable_len(), 10 + 11);
    p.device.complete(c, 21);
    let (c, s) = p.pop().unwrap();
    assert_eq!(s.len(), 1);
    p.device.complete(c, 0);
    let (c, s) = p.pop().unwrap();
    assert_eq!(s.len(), 5);
    p.device.complete(c, 0);
    p.device.publish_used();
    assert_eq!(p.driver.get_buf().map(|u| (u.token, u.len)), Some((1, 21)));
    assert!(p.driver.get_buf().is_some() && p.driver.get_buf().is_some());
    assert_eq!(p.driver.num_free(), 8);
}

#[test]
fn split_2_7_10_kick_with_event_idx_only_when_avail_event_is_crossed() {
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::with(&mem, 8, true, false);
    assert!(!p.device.enable_notifications());
    assert_eq!(p.avail_event(), 0);
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 2).unwrap();
    assert!(p.driver.kick_prepare().is_some(), "entry 0 was published: avail_event 0 crossed");
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 3).unwrap();
    assert!(p.driver.kick_prepare().is_none(), "the device has not asked again");
    // The device consumes two, sleeps at 2: the entry at 2 is already there, so it must not.
    let _ = p.pop().unwrap();
    let _ = p.pop().unwrap();
    assert!(p.device.enable_notifications());
    let _ = p.pop().unwrap();
    assert!(!p.device.enable_notifications());
    assert_eq!(p.avail_event(), 3);
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 4).unwrap();
    assert!(p.driver.kick_prepare().is_some());
}

#[test]
fn after_0xffff_unkicked_adds_the_driver_kicks_anyway() {
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::with(&mem, 4, false, false);
    let buf = mem.alloc_sg(4);
    for t in 0..0xfffe_u64 {
        p.driver.add_inbuf(&[buf], t).unwrap();
        let (c, _) = p.pop().unwrap();
        p.device.complete(c, 0);
        p.device.publish_used();
        p.driver.get_buf().unwrap();
    }
    assert_eq!(p.bell.kicks(), 0);
    p.driver.add_inbuf(&[buf], 0xfffe).unwrap();
    assert_eq!(p.bell.kicks(), 1, "the 65,535th unkicked add kicks");
    assert!(p.driver.kick_prepare().is_none() || p.bell.kicks() == 1);
}

#[test]
fn disable_and_enable_cb_without_event_idx_use_the_no_interrupt_flag() {
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::with(&mem, 4, false, false);
    assert_eq!(p.avail_flags(), 0);
    p.driver.disable_cb();
    assert_eq!(p.avail_flags(), virtq::split::AVAIL_F_NO_INTERRUPT);
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
    p.device_echo_all();
    assert!(!p.device.needs_notification());
    assert!(!p.driver.enable_cb(), "a buffer is pending: the caller must process it");
    assert_eq!(p.avail_flags(), 0);
    assert!(p.driver.get_buf().is_some());
    assert!(p.driver.enable_cb());
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 2).unwrap();
    p.device_echo_all();
    assert!(p.device.needs_notification());
}

#[test]
fn split_2_7_10_used_event_suppresses_interrupts_until_crossed() {
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::with(&mem, 8, true, false);
    for t in 0..4 {
        p.driver.add_inbuf(&[mem.alloc_sg(4)], t).unwrap();
    }
    let snapshot = p.driver.enable_cb_prepare();
    assert_eq!(p.used_event(), 0);
    assert!(!p.driver.poll(snapshot));
    let (c, _) = p.pop().unwrap();
    p.device.complete(c, 0);
    assert!(p.device.needs_notification(), "used entry 0 crosses used_event 0");
    assert!(p.driver.poll(snapshot));
    let (c, _) = p.pop().unwrap();
    p.device.complete(c, 0);
    assert!(!p.device.needs_notification(), "the driver has not asked again");
    // get_buf with callbacks enabled moves used_event along.
    assert!(p.driver.get_buf().is_some());
    assert_eq!(p.used_event(), 1);
    assert!(p.driver.get_buf().is_some());
    assert_eq!(p.used_event(), 2);
    let (c, _) = p.pop().unwrap();
    p.device.complete(c, 0);
    assert!(p.device.needs_notification());
    // disable_cb parks used_event at 0, like Linux.
    p.driver.disable_cb();
    assert_eq!(p.used_event(), 0);
    let (c, _) = p.pop().unwrap();
    p.device.complete(c, 0);
    assert!(!p.device.needs_notification());
}

#[test]
fn get_bufs_moves_used_event_past_the_whole_burst_and_the_next_completion_interrupts() {
    for in_order in [false, true] {
        let mem = TestMemory::new(1 << 20);
        let f = if in_order { features(true, false) | Features::IN_ORDER } else { features(true, false) };
        let mut p = Pair::new(&mem, QueueConfig::new(0, 8, f));
        for t in 0..6 {
            p.driver.add_inbuf(&[mem.alloc_sg(4)], t).unwrap();
        }
        assert!(p.driver.enable_cb());
        for _ in 0..5 {
            let (c, _) = p.pop().unwrap();
            p.device.complete(c, 4);
        }
        assert!(p.device.needs_notification(), "used_event 0 crossed");
        let mut got = Vec::new();
        assert_eq!(p.driver.get_bufs(usize::MAX, |u| got.push(u.token)), 5);
        assert_eq!(got, [0, 1, 2, 3, 4]);
        assert_eq!(p.used_event(), 5, "in_order {in_order}: the next entry after the burst");
        let (c, _) = p.pop().unwrap();
        p.device.complete(c, 4);
        assert!(p.device.needs_notification(), "in_order {in_order}: entry 5 crosses used_event 5");
    }
}

#[test]
fn interrupt_reports_no_work_callback_or_broken_and_hints_disable_cb() {
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::with(&mem, 4, true, false);
    assert_eq!(p.driver.interrupt(), InterruptAction::NoWork);
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 2).unwrap();
    p.driver.enable_cb();
    let (c, _) = p.pop().unwrap();
    p.device.complete(c, 0);
    p.device.publish_used();
    assert_eq!(p.driver.interrupt(), InterruptAction::Callback);
    // After an event-idx interrupt the device will not send another until used_event moves,
    // so disable_cb leaves the ring alone.
    let before = p.used_event();
    p.driver.disable_cb();
    assert_eq!(p.used_event(), before);
    p.driver.break_queue();
    assert_eq!(p.driver.interrupt(), InterruptAction::Broken);
    let snapshot = p.driver.enable_cb_prepare();
    assert!(!p.driver.poll(snapshot), "poll is false on a broken queue");
    assert!(p.driver.get_buf().is_none());
    p.driver.unbreak();
    assert_eq!(p.driver.get_buf().unwrap().token, 1);
}

#[test]
fn detach_unused_buf_returns_every_outstanding_token_and_rolls_back_avail() {
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::with(&mem, 8, false, true);
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 10).unwrap();
    p.driver.add_sgs(&[&[mem.alloc_sg(4)]], &[&[mem.alloc_sg(4)]], 11).unwrap();
    p.driver.add_outbuf(&[mem.alloc_sg(4), mem.alloc_sg(4), mem.alloc_sg(4)], 12).unwrap();
    assert_eq!(p.avail_idx(), 3);
    let mut got = Vec::new();
    while let Some(t) = p.driver.detach_unused_buf() {
        got.push(t);
    }
    got.sort();
    assert_eq!(got, vec![10, 11, 12]);
    assert_eq!(p.avail_idx(), 0);
    assert_eq!(p.driver.num_free(), 8);
}

#[test]
fn introspection_matches_the_ring_layout() {
    let mem = TestMemory::new(1 << 20);
    let mut config = QueueConfig::new(0, 16, features(false, false));
    config.vring_align = 4096;
    let p = Pair::new(&mem, config);
    let layout = virtq::split::ContiguousAreas::new(16, 4096);
    assert_eq!(p.driver.vring_size(), 16);
    assert_eq!(p.driver.avail_addr() - p.driver.desc_addr(), layout.avail_offset as u64);
    assert_eq!(p.driver.used_addr() - p.driver.desc_addr(), 4096);
    assert_eq!(layout.total, 4096 + 6 + 8 * 16);
}

#[test]
fn creation_rejects_bad_sizes_and_reduces_when_allowed() {
    let mem = TestMemory::new(1 << 16);
    for size in [0, 3, 100] {
        let r = SplitDriver::<u8, _, _>::new(QueueConfig::new(0, size, features(false, false)), &mem, ());
        assert_eq!(r.err(), Some(virtq::CreateError::InvalidSize));
    }
    let r = SplitDriver::<u8, _, _>::new(QueueConfig::new(0, 8, Features::RING_PACKED), &mem, ());
    assert_eq!(r.err(), Some(virtq::CreateError::WrongLayout));
    // 64 KiB of memory cannot hold a 4096-entry ring (about 100 KiB) but can hold 1024.
    let r = SplitDriver::<u8, _, _>::new(QueueConfig::new(0, 4096, features(false, false)), &mem, ());
    assert_eq!(r.err(), Some(virtq::CreateError::NoMemory));
    let mut config = QueueConfig::new(0, 4096, features(false, false));
    config.may_reduce_num = true;
    let q = SplitDriver::<u8, _, _>::new(config, &mem, ()).unwrap();
    assert!(q.vring_size() < 4096 && q.vring_size() >= 256);
}

#[test]
fn strong_barriers_queue_works_end_to_end() {
    let mem = TestMemory::new(1 << 20);
    let mut config = QueueConfig::new(0, 4, features(true, true) | Features::ORDER_PLATFORM);
    config.weak_barriers = true;
    let mut p = Pair::new(&mem, config);
    for round in 0..10u64 {
        p.driver.add_sgs(&[&[mem.alloc_sg(2)]], &[&[mem.alloc_sg(2), mem.alloc_sg(2)]], round).unwrap();
        p.driver.kick();
        assert_eq!(p.device_echo_all(), 1);
        assert_eq!(p.driver.get_buf().map(|u| (u.token, u.len)), Some((round, 4)));
    }
}
