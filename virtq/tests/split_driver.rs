//! The driver API against the device API in one process: every operation of Linux's
//! virtqueue API, with Linux's semantics.

mod common;

use common::{features, Pair};
use virtq::testing::{CountingDma, TestMemory};
use virtq::{AddErrorKind, Features, InterruptAction, QueueConfig, Sg, SplitDevice, SplitDriver};

#[test]
fn outbuf_inbuf_and_sgs_round_trip_data_and_written_length() {
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::with(&mem, 8, true, false);
    let out = mem.alloc_sg(5);
    mem.write(out.addr, b"hello");
    p.driver.add_outbuf(&[out], 1).unwrap();
    let inb = mem.alloc_sg(16);
    p.driver.add_inbuf(&[inb], 2).unwrap();
    let (hdr, data, status) = (mem.alloc_sg(4), mem.alloc_sg(8), mem.alloc_sg(1));
    p.driver.add_sgs(&[&[hdr], &[]], &[&[data, status]], 3).unwrap();
    assert!(p.driver.kick());

    let (c1, s1) = p.pop().unwrap();
    assert_eq!((s1.len(), c1.readable_len(), c1.writable_len()), (1, 5, 0));
    let mut got = [0u8; 5];
    s1[0].read_at(0, &mut got);
    assert_eq!(&got, b"hello");
    let (c2, s2) = p.pop().unwrap();
    assert_eq!((c2.readable_segments(), c2.writable_segments(), c2.writable_len()), (0, 1, 16));
    s2[0].write_at(0, b"0123456789");
    let (c3, s3) = p.pop().unwrap();
    assert_eq!((c3.readable_segments(), c3.writable_segments()), (1, 2));
    assert!(!s3[0].is_writable() && s3[1].is_writable() && s3[2].is_writable());
    assert!(p.pop().is_none());

    // Complete out of order; tokens come back in completion order with their lengths.
    p.device.complete(c3, 9);
    p.device.complete(c1, 0);
    p.device.complete(c2, 10);
    p.device.publish_used();
    let got: Vec<_> = std::iter::from_fn(|| p.driver.get_buf()).map(|u| (u.token, u.len)).collect();
    assert_eq!(got, vec![(3, 9), (1, 0), (2, 10)]);
    let mut back = [0u8; 10];
    mem.read(inb.addr, &mut back);
    assert_eq!(&back, b"0123456789");
    assert_eq!(p.driver.num_free(), 8);
}

#[test]
fn inbuf_ctx_returns_context_and_needs_a_context_queue() {
    let mem = TestMemory::new(1 << 20);
    let mut plain = Pair::with(&mem, 4, false, true);
    let err = plain.driver.add_inbuf_ctx(&[mem.alloc_sg(8)], 5, 99).unwrap_err();
    assert_eq!((err.kind, err.token), (AddErrorKind::NoContext, 5));

    let mut config = QueueConfig::new(0, 4, features(false, true));
    config.context = true;
    let mut p = Pair::new(&mem, config);
    p.driver.add_inbuf_ctx(&[mem.alloc_sg(8), mem.alloc_sg(8)], 7, 0xdead).unwrap();
    p.driver.add_inbuf(&[mem.alloc_sg(8)], 8).unwrap();
    // A context queue never uses indirect descriptors (Linux: `indirect && !context`).
    assert_eq!(p.driver.num_free(), 1);
    p.device_echo_all();
    let (u, ctx) = p.driver.get_buf_ctx().unwrap();
    assert_eq!((u.token, u.len, ctx), (7, 16, Some(0xdead)));
    let (u, ctx) = p.driver.get_buf_ctx().unwrap();
    assert_eq!((u.token, ctx), (8, None));
}

#[test]
fn no_space_is_retryable_after_buffers_are_used() {
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::with(&mem, 4, false, false);
    for t in 0..4 {
        p.driver.add_inbuf(&[mem.alloc_sg(4)], t).unwrap();
    }
    let err = p.driver.add_inbuf(&[mem.alloc_sg(4)], 9).unwrap_err();
    assert_eq!((err.kind, err.token), (AddErrorKind::NoSpace, 9));
    assert!(err.is_retryable());
    // Two segments do not fit in one free descriptor either.
    let (chain, _) = p.pop().unwrap();
    p.device.complete(chain, 0);
    p.device.publish_used();
    assert_eq!(p.driver.get_buf().unwrap().token, 0);
    let err = p.driver.add_inbuf(&[mem.alloc_sg(4), mem.alloc_sg(4)], 10).unwrap_err();
    assert_eq!(err.kind, AddErrorKind::NoSpace);
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 9).unwrap();
}

#[test]
fn no_space_with_readable_segments_forces_a_notify_as_linux_does() {
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::with(&mem, 2, false, false);
    p.driver.add_outbuf(&[mem.alloc_sg(4), mem.alloc_sg(4)], 1).unwrap();
    let before = p.bell.kicks();
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 2).unwrap_err();
    assert_eq!(p.bell.kicks(), before, "only buffers with readable parts force it");
    p.driver.add_outbuf(&[mem.alloc_sg(4)], 3).unwrap_err();
    assert_eq!(p.bell.kicks(), before + 1);
}

#[test]
fn zero_segments_too_many_segments_and_broken_hand_the_token_back() {
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::with(&mem, 4, false, false);
    let e = p.driver.add_sgs(&[&[]], &[], 1).unwrap_err();
    assert_eq!((e.kind, e.token, e.is_retryable()), (AddErrorKind::NoSegments, 1, false));
    let five: Vec<Sg> = (0..5).map(|_| mem.alloc_sg(4)).collect();
    let e = p.driver.add_outbuf(&five, 2).unwrap_err();
    assert_eq!((e.kind, e.token, e.is_retryable()), (AddErrorKind::TooManySegments, 2, false));
    p.driver.break_queue();
    let e = p.driver.add_outbuf(&five[..1], 3).unwrap_err();
    assert_eq!((e.kind, e.token, e.is_retryable()), (AddErrorKind::Broken, 3, false));
    assert!(p.pop().is_none(), "nothing was published");
}

#[test]
fn mapping_failure_returns_no_memory_and_undoes_every_mapping() {
    for indirect in [false, true] {
        let mem = TestMemory::new(1 << 20);
        let dma = CountingDma::new(&mem);
        let config = QueueConfig::new(0, 8, features(false, indirect));
        let mut driver = SplitDriver::<u32, _, _>::new(config, &dma, ()).unwrap();
        let segs: Vec<Sg> =
            (0..3).map(|_| mem.alloc_sg(8)).map(|s| Sg::new(CountingDma::cpu_addr(s.addr), s.len)).collect();
        dma.fail_map_at(2);
        let e = driver.add_sgs(&[&segs[..1]], &[&segs[1..]], 1).unwrap_err();
        assert_eq!((e.kind, e.token), (AddErrorKind::NoMemory, 1));
        assert_eq!(dma.maps(), dma.unmaps(), "indirect={indirect}");
        assert_eq!(driver.num_free(), 8);

        // The device sees the retried buffer, mapped, and the driver unmaps it on return.
        driver.add_sgs(&[&segs[..1]], &[&segs[1..]], 1).unwrap();
        let mut device = SplitDevice::new(&mem, common::device_config(&driver, config.features)).unwrap();
        let mut v = Vec::new();
        let chain = device.pop(&mut v).unwrap().unwrap();
        assert_eq!(
            v.iter().map(|s| s.addr()).collect::<Vec<_>>(),
            vec![
                segs[0].addr + CountingDma::OFFSET,
                segs[1].addr + CountingDma::OFFSET,
                segs[2].addr + CountingDma::OFFSET
            ]
        );
        device.complete(chain, 3);
        device.publish_used();
        assert_eq!(driver.get_buf().unwrap().token, 1);
        assert_eq!(dma.maps(), dma.unmaps());
    }
}

#[test]
fn premapped_buffers_are_never_mapped_or_unmapped() {
    let mem = TestMemory::new(1 << 20);
    let dma = CountingDma::new(&mem);
    let config = QueueConfig::new(0, 4, features(false, false));
    let mut driver = SplitDriver::<u32, _, _>::new(config, &dma, ()).unwrap();
    let buf = mem.alloc_sg(8);
    driver.add_outbuf_premapped(&[buf], 1).unwrap();
    driver.add_inbuf_premapped(&[buf], 2).unwrap();
    let mut device = SplitDevice::new(&mem, common::device_config(&driver, config.features)).unwrap();
    let mut v = Vec::new();
    for _ in 0..2 {
        let chain = device.pop(&mut v).unwrap().unwrap();
        assert_eq!(v[0].addr(), buf.addr, "the device address is used as given");
        device.complete(chain, 0);
    }
    device.publish_used();
    assert!(driver.get_buf().is_some() && driver.get_buf().is_some());
    assert_eq!((dma.maps(), dma.unmaps()), (0, 0));
}

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
fn kick_without_event_idx_follows_the_device_no_notify_flag() {
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::with(&mem, 4, false, false);
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
    let kick = p.driver.kick_prepare().expect("device wants kicks by default");
    assert_eq!(kick.data.next, 1);
    assert!(p.driver.handle().notify(kick));
    assert_eq!(p.bell.kicks(), 1);
    p.device.disable_notifications();
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 2).unwrap();
    assert!(p.driver.kick_prepare().is_none());
    assert!(p.device.enable_notifications(), "two buffers are waiting: do not sleep");
    while let Some((c, _)) = p.pop() {
        p.device.complete(c, 0);
    }
    assert!(!p.device.enable_notifications(), "ring empty: safe to sleep");
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 3).unwrap();
    assert!(p.driver.kick());
    assert_eq!(p.bell.kicks(), 2);
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
fn notification_data_carries_queue_index_and_avail_index() {
    let mem = TestMemory::new(1 << 20);
    let mut config = QueueConfig::new(3, 4, features(false, false) | Features::NOTIFICATION_DATA);
    config.callbacks = true;
    let mut p = Pair::new(&mem, config);
    assert!(p.driver.uses_notification_data());
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 2).unwrap();
    assert!(p.driver.kick());
    assert_eq!(p.bell.last.load(std::sync::atomic::Ordering::Relaxed), 2 << 16 | 3);
    assert_eq!(p.driver.notification_data(), 2 << 16 | 3);
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
fn notify_failure_breaks_the_queue() {
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::with(&mem, 4, false, false);
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
    p.bell.fail.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(!p.driver.kick());
    assert!(p.driver.is_broken() && p.driver.handle().is_broken());
    assert_eq!(p.driver.fault(), None, "a transport failure is not a ring fault");
    assert!(!p.driver.notify(), "a broken queue does not notify");
    assert_eq!(p.driver.detach_unused_buf(), Some(1));
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
fn enable_cb_delayed_waits_for_three_quarters_of_the_buffers_in_flight() {
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::with(&mem, 8, true, false);
    p.driver.disable_cb();
    for t in 0..8 {
        p.driver.add_inbuf(&[mem.alloc_sg(4)], t).unwrap();
    }
    assert!(p.driver.enable_cb_delayed());
    assert_eq!(p.used_event(), 6);
    let mut signalled_at = None;
    for n in 1..=8 {
        let (c, _) = p.pop().unwrap();
        p.device.complete(c, 0);
        if p.device.needs_notification() {
            signalled_at.get_or_insert(n);
        }
    }
    assert_eq!(signalled_at, Some(7), "the interrupt comes once entry 6 is used");
    // With more than 3/4 already used, it reports the race.
    for t in 0..8 {
        assert_eq!(p.driver.get_buf().unwrap().token, t);
    }
    p.driver.disable_cb();
    for t in 0..8 {
        p.driver.add_inbuf(&[mem.alloc_sg(4)], t).unwrap();
    }
    for _ in 0..7 {
        let (c, _) = p.pop().unwrap();
        p.device.complete(c, 0);
    }
    p.device.publish_used();
    assert!(!p.driver.enable_cb_delayed());
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
    let layout = virtq::split::ContiguousLayout::new(16, 4096);
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
fn queue_without_callbacks_starts_with_interrupts_suppressed() {
    let mem = TestMemory::new(1 << 20);
    let mut config = QueueConfig::new(0, 4, features(false, false));
    config.callbacks = false;
    let mut p = Pair::new(&mem, config);
    assert_eq!(p.avail_flags(), virtq::split::AVAIL_F_NO_INTERRUPT);
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
    p.device_echo_all();
    assert!(!p.device.needs_notification());
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

#[test]
fn handle_notifies_from_another_thread_after_the_queue_is_unlocked() {
    let mem = TestMemory::new(1 << 20);
    let p = Pair::with(&mem, 4, false, false);
    let queue = std::sync::Mutex::new(p.driver);
    let handle = queue.lock().unwrap().handle();
    let kick = {
        let mut q = queue.lock().unwrap();
        q.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
        q.kick_prepare()
    };
    std::thread::scope(|s| {
        s.spawn(|| assert!(handle.notify(kick.unwrap())));
    });
    assert_eq!(p.bell.kicks(), 1);
    // disable_cb and poll need only a shared borrow, from several threads at once.
    let snapshot = queue.lock().unwrap().enable_cb_prepare();
    let q = queue.lock().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| q.disable_cb());
        s.spawn(|| assert!(!q.poll(snapshot)));
    });
}

#[test]
fn a_queue_in_caller_memory_works_and_leaves_the_memory_alone() {
    let mem = TestMemory::new(1 << 20);
    let layout = virtq::split::ContiguousLayout::new(8, 64);
    let addr = mem.alloc(layout.total, 4096).unwrap();
    let region = virtq::DmaRegion {
        cpu: virtq::GuestMemory::translate(&mem, addr, layout.total as u64).unwrap(),
        device_addr: addr,
        size: layout.total,
    };
    let config = QueueConfig::new(0, 8, features(true, false));
    // SAFETY: the region is fresh zeroed test memory, 4096-aligned, that outlives the queue.
    let mut driver = unsafe { SplitDriver::<u32, _, _>::new_in(config, region, &mem, ()) }.unwrap();
    assert_eq!(driver.desc_addr(), addr);
    assert_eq!(driver.used_addr(), addr + layout.used_offset as u64);
    let mut device = SplitDevice::new(&mem, common::device_config(&driver, config.features)).unwrap();
    driver.add_inbuf(&[mem.alloc_sg(4)], 5).unwrap();
    let mut segs = Vec::new();
    let chain = device.pop(&mut segs).unwrap().unwrap();
    device.complete(chain, 4);
    device.publish_used();
    assert_eq!(driver.get_buf().map(|u| (u.token, u.len)), Some((5, 4)));
    drop(driver);
    assert_eq!(mem.read_u16(addr + layout.used_offset as u64 + 2), 1, "the memory is still there");
}
