//! The driver API against the device API on all four layouts (split, split in-order,
//! packed, packed in-order), through the run-time dispatch types `Virtqueue` and
//! `DeviceQueue`. Split-specific memory details are in `split_driver.rs`.

mod common;

use common::{layout_features, Pair, LAYOUTS};
use virtq::testing::{CountingDma, TestMemory};
use virtq::{AddErrorKind, DeviceQueue, Features, InterruptAction, LayoutKind, QueueConfig, Sg, Virtqueue};

fn each_layout(mut test: impl FnMut(LayoutKind)) {
    for layout in LAYOUTS {
        test(layout);
    }
}

#[test]
fn buffers_round_trip_with_data_tokens_and_written_lengths() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 8, true, false);
        let out = mem.alloc_sg(5);
        mem.write(out.addr, b"hello");
        p.driver.add_outbuf(&[out], 1).unwrap();
        let inb = mem.alloc_sg(16);
        p.driver.add_inbuf(&[inb], 2).unwrap();
        let (hdr, data, status) = (mem.alloc_sg(4), mem.alloc_sg(8), mem.alloc_sg(1));
        p.driver.add_sgs(&[&[hdr], &[]], &[&[data, status]], 3).unwrap();
        assert!(p.driver.kick());

        let (c1, s1) = p.pop().unwrap();
        let mut got = [0u8; 5];
        s1[0].read_at(0, &mut got);
        assert_eq!(&got, b"hello", "{layout:?}");
        let (c2, s2) = p.pop().unwrap();
        s2[0].write_at(0, b"0123456789");
        let (c3, s3) = p.pop().unwrap();
        assert_eq!((c3.readable_segments(), c3.writable_segments(), s3.len()), (1, 2, 3));
        assert!(p.pop().is_none());
        // An in-order device completes in order; others may not.
        let expected = if p.in_order() {
            p.device.complete(c1, 0);
            p.device.complete(c2, 10);
            p.device.complete(c3, 9);
            vec![(1, 0), (2, 10), (3, 9)]
        } else {
            p.device.complete(c3, 9);
            p.device.complete(c1, 0);
            p.device.complete(c2, 10);
            vec![(3, 9), (1, 0), (2, 10)]
        };
        p.device.publish_used();
        let got: Vec<_> = std::iter::from_fn(|| p.driver.get_buf()).map(|u| (u.token, u.len)).collect();
        assert_eq!(got, expected, "{layout:?}");
        let mut back = [0u8; 10];
        mem.read(inb.addr, &mut back);
        assert_eq!(&back, b"0123456789");
        assert_eq!(p.driver.num_free(), 8);
    });
}

#[test]
fn in_order_devices_return_a_batch_with_one_used_entry() {
    for layout in [LayoutKind::SplitInOrder, LayoutKind::PackedInOrder] {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 8, false, false);
        for t in 0..4 {
            p.driver.add_inbuf(&[mem.alloc_sg(100 + t)], t as u64).unwrap();
        }
        let chains: Vec<_> = (0..4).map(|_| p.pop().unwrap().0).collect();
        let mut lens = Vec::new();
        for (n, c) in chains.into_iter().enumerate() {
            // Three full buffers and a short last one: one used entry for all four.
            let len = if n < 3 { c.writable_len() } else { 7 };
            lens.push(len);
            p.device.complete(c, len);
        }
        p.device.publish_used();
        if p.is_split() {
            assert_eq!(p.used_idx(), 4, "the used index moves by the batch size");
            assert_eq!(mem.read_u32(p.used_elem_addr(0)), 3, "one entry naming the last buffer");
        } else {
            assert_eq!(mem.read_u16(p.desc_addr(0) + 12), 3, "one used descriptor naming the last buffer");
            assert_eq!(mem.read_u16(p.desc_addr(1) + 14) & virtq::packed::DESC_F_USED, 0);
        }
        let got: Vec<_> = std::iter::from_fn(|| p.driver.get_buf()).map(|u| (u.token, u.len)).collect();
        assert_eq!(got, vec![(0, 100), (1, 101), (2, 102), (3, 7)], "{layout:?}");
        assert!(!p.driver.is_broken());
    }
}

#[test]
fn a_partial_completion_ends_an_in_order_batch() {
    for layout in [LayoutKind::SplitInOrder, LayoutKind::PackedInOrder] {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 4, false, false);
        for t in 0..3 {
            p.driver.add_inbuf(&[mem.alloc_sg(10)], t).unwrap();
        }
        let chains: Vec<_> = (0..3).map(|_| p.pop().unwrap().0).collect();
        for (c, len) in chains.into_iter().zip([10, 4, 10]) {
            p.device.complete(c, len);
        }
        p.device.publish_used();
        let got: Vec<_> = std::iter::from_fn(|| p.driver.get_buf()).map(|u| (u.token, u.len)).collect();
        assert_eq!(got, vec![(0, 10), (1, 4), (2, 10)], "{layout:?}");
    }
}

#[test]
fn inbuf_ctx_returns_the_context() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let mut config = QueueConfig::new(0, 4, layout_features(layout, false, true));
        config.context = true;
        let mut p = Pair::new(&mem, config);
        p.driver.add_inbuf_ctx(&[mem.alloc_sg(8), mem.alloc_sg(8)], 7, 0xdead).unwrap();
        p.driver.add_inbuf(&[mem.alloc_sg(8)], 8).unwrap();
        assert_eq!(p.driver.num_free(), 1, "a context queue never uses indirect descriptors");
        p.device_echo_all();
        let (u, ctx) = p.driver.get_buf_ctx().unwrap();
        assert_eq!((u.token, u.len, ctx), (7, 16, Some(0xdead)));
        let (u, ctx) = p.driver.get_buf_ctx().unwrap();
        assert_eq!((u.token, ctx), (8, None));
        let mut plain = Pair::of(&mem, layout, 4, false, true);
        assert_eq!(plain.driver.add_inbuf_ctx(&[mem.alloc_sg(8)], 5, 1).unwrap_err().kind, AddErrorKind::NoContext);
    });
}

#[test]
fn no_space_is_the_only_retryable_error() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 4, false, false);
        for t in 0..4 {
            p.driver.add_inbuf(&[mem.alloc_sg(4)], t).unwrap();
        }
        let e = p.driver.add_inbuf(&[mem.alloc_sg(4)], 9).unwrap_err();
        assert_eq!((e.kind, e.token, e.is_retryable()), (AddErrorKind::NoSpace, 9, true));
        let (c, _) = p.pop().unwrap();
        p.device.complete(c, 0);
        p.device.publish_used();
        assert_eq!(p.driver.get_buf().unwrap().token, 0);
        p.driver.add_inbuf(&[mem.alloc_sg(4)], 9).unwrap();

        let e = p.driver.add_sgs(&[&[]], &[], 1).unwrap_err();
        assert_eq!((e.kind, e.is_retryable()), (AddErrorKind::NoSegments, false));
        let five: Vec<Sg> = (0..5).map(|_| mem.alloc_sg(4)).collect();
        let e = p.driver.add_outbuf(&five, 2).unwrap_err();
        assert_eq!((e.kind, e.is_retryable()), (AddErrorKind::TooManySegments, false));
        p.driver.break_queue();
        let e = p.driver.add_outbuf(&five[..1], 3).unwrap_err();
        assert_eq!((e.kind, e.token, e.is_retryable()), (AddErrorKind::Broken, 3, false));
    });
}

#[test]
fn only_split_rings_force_a_notify_on_no_space() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 2, false, false);
        p.driver.add_outbuf(&[mem.alloc_sg(4), mem.alloc_sg(4)], 1).unwrap();
        p.driver.add_outbuf(&[mem.alloc_sg(4)], 3).unwrap_err();
        assert_eq!(p.bell.kicks(), p.is_split() as u64, "{layout:?}");
    });
}

#[test]
fn mapping_failure_returns_no_memory_and_undoes_every_mapping() {
    each_layout(|layout| {
        for indirect in [false, true] {
            let mem = TestMemory::new(1 << 20);
            let dma = CountingDma::new(&mem);
            let features = layout_features(layout, false, indirect);
            let mut driver = Virtqueue::<u32, _, _>::new(QueueConfig::new(0, 8, features), &dma, ()).unwrap();
            let segs: Vec<Sg> =
                (0..3).map(|_| mem.alloc_sg(8)).map(|s| Sg::new(CountingDma::cpu_addr(s.addr), s.len)).collect();
            dma.fail_map_at(2);
            let e = driver.add_sgs(&[&segs[..1]], &[&segs[1..]], 1).unwrap_err();
            assert_eq!((e.kind, e.token), (AddErrorKind::NoMemory, 1));
            assert_eq!(dma.maps(), dma.unmaps(), "{layout:?} indirect={indirect}");
            assert_eq!(driver.num_free(), 8);
            driver.add_sgs(&[&segs[..1]], &[&segs[1..]], 1).unwrap();
            let mut device = DeviceQueue::new(&mem, common::device_config(&driver, features)).unwrap();
            let mut v = Vec::new();
            let chain = device.pop(&mut v).unwrap().unwrap();
            assert_eq!(v[0].addr(), segs[0].addr + CountingDma::OFFSET, "the device sees mapped addresses");
            device.complete(chain, 3);
            device.publish_used();
            assert_eq!(driver.get_buf().map(|u| (u.token, u.len)), Some((1, 3)));
            assert_eq!(dma.maps(), dma.unmaps());
        }
    });
}

#[test]
fn a_one_segment_add_that_fails_hands_the_token_back_and_leaves_the_ring_as_it_was() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let dma = CountingDma::new(&mem);
        let features = layout_features(layout, false, false);
        let mut driver = Virtqueue::<u32, _, _>::new(QueueConfig::new(0, 2, features), &dma, ()).unwrap();
        let segs: Vec<Sg> =
            (0..3).map(|_| mem.alloc_sg(8)).map(|s| Sg::new(CountingDma::cpu_addr(s.addr), s.len)).collect();
        dma.fail_map_at(0);
        let e = driver.add_inbuf(&segs[..1], 1).unwrap_err();
        assert_eq!((e.kind, e.token), (AddErrorKind::NoMemory, 1), "{layout:?}");
        dma.fail_map_at(0);
        let e = driver.add_outbuf(&segs[..1], 2).unwrap_err();
        assert_eq!((e.kind, e.token), (AddErrorKind::NoMemory, 2), "{layout:?}");
        assert_eq!((dma.maps(), dma.unmaps(), driver.num_free()), (0, 0, 2), "{layout:?}");
        driver.add_inbuf(&segs[..1], 3).unwrap();
        driver.add_outbuf_premapped(&[mem.alloc_sg(8)], 4).unwrap();
        let e = driver.add_outbuf(&segs[1..2], 5).unwrap_err();
        assert_eq!((e.kind, e.token), (AddErrorKind::NoSpace, 5), "{layout:?}");
        assert_eq!(dma.maps(), 1, "{layout:?}: the premapped buffer is not mapped");

        let mut device = DeviceQueue::new(&mem, common::device_config(&driver, features)).unwrap();
        let mut v = Vec::new();
        let first = device.pop(&mut v).unwrap().expect("the mapped buffer");
        assert_eq!((v.len(), v[0].addr(), v[0].is_writable()), (1, segs[0].addr + CountingDma::OFFSET, true));
        device.complete(first, 5);
        let second = device.pop(&mut v).unwrap().expect("the premapped buffer");
        assert_eq!((v.len(), v[0].is_writable()), (1, false));
        device.complete(second, 0);
        assert!(device.pop(&mut v).unwrap().is_none(), "{layout:?}: nothing else was made available");
        device.publish_used();
        assert_eq!(driver.get_buf().map(|u| (u.token, u.len)), Some((3, 5)), "{layout:?}");
        assert_eq!(driver.get_buf().map(|u| (u.token, u.len)), Some((4, 0)), "{layout:?}");
        assert_eq!((dma.maps(), dma.unmaps()), (1, 1), "{layout:?}");

        driver.break_queue();
        let e = driver.add_inbuf(&segs[..1], 6).unwrap_err();
        assert_eq!((e.kind, e.token), (AddErrorKind::Broken, 6), "{layout:?}");
        assert_eq!(dma.maps(), 1, "{layout:?}: a broken queue maps nothing");
    });
}

#[test]
fn premapped_buffers_are_never_mapped_or_unmapped() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let dma = CountingDma::new(&mem);
        let features = layout_features(layout, false, true);
        let mut driver = Virtqueue::<u32, _, _>::new(QueueConfig::new(0, 4, features), &dma, ()).unwrap();
        let buf = mem.alloc_sg(8);
        driver.add_outbuf_premapped(&[buf], 1).unwrap();
        driver.add_inbuf_premapped(&[buf], 2).unwrap();
        driver.add_sgs_premapped(&[&[buf]], &[&[buf]], 3).unwrap();
        let mut device = DeviceQueue::new(&mem, common::device_config(&driver, features)).unwrap();
        let mut v = Vec::new();
        for _ in 0..3 {
            let chain = device.pop(&mut v).unwrap().unwrap();
            assert_eq!(v[0].addr(), buf.addr);
            device.complete(chain, 0);
        }
        device.publish_used();
        assert_eq!(std::iter::from_fn(|| driver.get_buf()).count(), 3);
        assert_eq!((dma.maps(), dma.unmaps()), (0, 0), "{layout:?}");
    });
}

#[test]
fn indirect_buffers_take_one_descriptor_and_fall_back_when_too_long() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let mut config = QueueConfig::new(0, 8, layout_features(layout, true, true));
        config.indirect_max = 4;
        let mut p = Pair::new(&mem, config);
        let segs: Vec<Sg> = (0..4).map(|i| mem.alloc_sg(8 + i)).collect();
        p.driver.add_sgs(&[&segs[..2]], &[&segs[2..]], 1).unwrap();
        assert_eq!(p.driver.num_free(), 7);
        let five: Vec<Sg> = (0..5).map(|_| mem.alloc_sg(4)).collect();
        p.driver.add_outbuf(&five, 2).unwrap();
        assert_eq!(p.driver.num_free(), 2);
        let (c, s) = p.pop().unwrap();
        let seen: Vec<_> = s.iter().map(|s| (s.addr(), s.len(), s.is_writable())).collect();
        let sent: Vec<_> = segs.iter().enumerate().map(|(i, s)| (s.addr, s.len, i >= 2)).collect();
        assert_eq!(seen, sent, "{layout:?}");
        p.device.complete(c, 21);
        let (c, s) = p.pop().unwrap();
        assert_eq!(s.len(), 5);
        p.device.complete(c, 0);
        p.device.publish_used();
        assert_eq!(p.driver.get_buf().map(|u| (u.token, u.len)), Some((1, 21)));
        assert_eq!(p.driver.get_buf().map(|u| u.token), Some(2));
        assert_eq!(p.driver.num_free(), 8);
    });
}

#[test]
fn kicks_follow_the_device_notification_switch() {
    each_layout(|layout| {
        for event_idx in [false, true] {
            let mem = TestMemory::new(1 << 20);
            let mut p = Pair::of(&mem, layout, 8, event_idx, false);
            assert!(!p.device.enable_notifications());
            p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
            assert!(p.driver.kick_prepare().is_some(), "{layout:?} event_idx={event_idx}");
            p.device.disable_notifications();
            p.driver.add_inbuf(&[mem.alloc_sg(4)], 2).unwrap();
            assert!(p.driver.kick_prepare().is_none(), "{layout:?} event_idx={event_idx}");
            assert!(p.device.enable_notifications(), "work is waiting: the device must not sleep");
            while let Some((c, _)) = p.pop() {
                p.device.complete(c, 0);
            }
            assert!(!p.device.enable_notifications());
            p.driver.add_inbuf(&[mem.alloc_sg(4)], 3).unwrap();
            assert!(p.driver.kick_prepare().is_some(), "{layout:?} event_idx={event_idx}");
        }
    });
}

#[test]
fn notification_data_names_the_next_available_position() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::new(
            &mem,
            QueueConfig::new(3, 4, layout_features(layout, false, false) | Features::NOTIFICATION_DATA),
        );
        assert!(p.driver.uses_notification_data());
        p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
        p.driver.add_inbuf(&[mem.alloc_sg(4)], 2).unwrap();
        assert!(p.driver.kick());
        // Split: the avail index. Packed: the offset with the wrap counter (1) in bit 15.
        let next = if p.is_split() { 2 } else { 0x8002 };
        assert_eq!(p.bell.last.load(std::sync::atomic::Ordering::Relaxed), next << 16 | 3, "{layout:?}");
        assert_eq!(p.driver.notification_data(), (next << 16 | 3) as u32);
    });
}

#[test]
fn notify_failure_breaks_the_queue_and_tokens_stay_recoverable() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 4, false, false);
        p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
        p.bell.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(!p.driver.kick());
        assert!(p.driver.is_broken() && p.driver.handle().is_broken());
        assert!(!p.driver.notify());
        assert_eq!(p.driver.detach_unused_buf(), Some(1));
    });
}

#[test]
fn interrupt_switch_and_poll_race_detection() {
    each_layout(|layout| {
        for event_idx in [false, true] {
            let mem = TestMemory::new(1 << 20);
            let mut p = Pair::of(&mem, layout, 8, event_idx, false);
            p.driver.disable_cb();
            if !event_idx {
                assert!(p.interrupts_suppressed(), "{layout:?}");
            }
            p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
            p.device_echo_all();
            // disable_cb is a hint: with event idx, split parks `used_event` at 0 (as Linux),
            // which still lets entry 0 interrupt; packed flags and split flags are exact.
            let interrupted = p.device.needs_notification();
            assert!(!interrupted || (p.is_split() && event_idx), "{layout:?} event_idx={event_idx}");
            assert!(!p.driver.enable_cb(), "a buffer is pending: the caller must process it");
            assert!(p.driver.get_buf().is_some());
            let snapshot = p.driver.enable_cb_prepare();
            assert!(!p.driver.poll(snapshot));
            p.driver.add_inbuf(&[mem.alloc_sg(4)], 2).unwrap();
            p.device_echo_all();
            assert!(p.driver.poll(snapshot));
            assert!(p.device.needs_notification(), "{layout:?} event_idx={event_idx}");
        }
    });
}

#[test]
fn enable_cb_delayed_waits_for_three_quarters_of_the_buffers() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 8, true, false);
        p.driver.disable_cb();
        for t in 0..8 {
            p.driver.add_inbuf(&[mem.alloc_sg(4)], t).unwrap();
        }
        assert!(p.driver.enable_cb_delayed());
        let mut signalled_at = None;
        for n in 1..=8 {
            let (c, _) = p.pop().unwrap();
            p.device.complete(c, 4);
            if p.device.needs_notification() {
                signalled_at.get_or_insert(n);
            }
        }
        assert_eq!(signalled_at, Some(7), "{layout:?}: the interrupt comes once 6 of 8 are past");
        for t in 0..8 {
            assert_eq!(p.driver.get_buf().unwrap().token, t);
        }
        p.driver.disable_cb();
        for t in 0..8 {
            p.driver.add_inbuf(&[mem.alloc_sg(4)], t).unwrap();
        }
        for _ in 0..7 {
            let (c, _) = p.pop().unwrap();
            p.device.complete(c, 4);
        }
        p.device.publish_used();
        assert!(!p.driver.enable_cb_delayed(), "{layout:?}: most are used already");
    });
}

#[test]
fn interrupt_reports_no_work_callback_or_broken() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 4, true, false);
        assert_eq!(p.driver.interrupt(), InterruptAction::NoWork);
        p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
        p.device_echo_all();
        assert_eq!(p.driver.interrupt(), InterruptAction::Callback);
        p.driver.break_queue();
        assert_eq!(p.driver.interrupt(), InterruptAction::Broken);
        assert!(p.driver.get_buf().is_none() && !p.driver.has_used());
        p.driver.unbreak();
        assert_eq!(p.driver.get_buf().unwrap().token, 1);
    });
}

#[test]
fn detach_unused_buf_returns_every_outstanding_token() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 8, false, true);
        p.driver.add_inbuf(&[mem.alloc_sg(4)], 10).unwrap();
        p.driver.add_sgs(&[&[mem.alloc_sg(4)]], &[&[mem.alloc_sg(4)]], 11).unwrap();
        p.driver.add_outbuf(&[mem.alloc_sg(4), mem.alloc_sg(4), mem.alloc_sg(4)], 12).unwrap();
        let mut got: Vec<u64> = std::iter::from_fn(|| p.driver.detach_unused_buf()).collect();
        got.sort();
        assert_eq!(got, vec![10, 11, 12], "{layout:?}");
        assert_eq!(p.driver.num_free(), 8);
    });
}

#[test]
fn queue_without_callbacks_starts_with_interrupts_suppressed() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let mut config = QueueConfig::new(0, 4, layout_features(layout, false, false));
        config.callbacks = false;
        let mut p = Pair::new(&mem, config);
        assert!(p.interrupts_suppressed(), "{layout:?}");
        p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
        p.device_echo_all();
        assert!(!p.device.needs_notification());
    });
}

#[test]
fn reset_recycles_every_token_and_the_queue_works_again() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 4, true, true);
        p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
        p.driver.add_sgs(&[&[mem.alloc_sg(4)]], &[&[mem.alloc_sg(4)]], 2).unwrap();
        let (c, _) = p.pop().unwrap();
        p.device.complete(c, 4);
        p.device.publish_used();
        let mut recycled = Vec::new();
        p.driver.reset(|t| recycled.push(t));
        recycled.sort();
        assert_eq!(recycled, vec![1, 2], "{layout:?}");
        assert_eq!(p.driver.num_free(), 4);
        // The device is reset too (the transport's part), and both start over.
        p.device =
            DeviceQueue::new(&mem, common::device_config(&p.driver, layout_features(layout, true, true))).unwrap();
        for round in 0..10 {
            p.driver.add_inbuf(&[mem.alloc_sg(4)], round).unwrap();
            p.device_echo_all();
            assert_eq!(p.driver.get_buf().map(|u| (u.token, u.len)), Some((round, 4)), "{layout:?}");
        }
    });
}

#[test]
fn resize_recycles_tokens_and_keeps_the_old_ring_when_allocation_fails() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 4, false, true);
        p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
        let mut recycled = Vec::new();
        p.driver.resize(16, |t| recycled.push(t)).unwrap();
        assert_eq!((recycled, p.driver.vring_size(), p.driver.num_free()), (vec![1], 16, 16), "{layout:?}");
        let features = layout_features(layout, false, true);
        p.device = DeviceQueue::new(&mem, common::device_config(&p.driver, features)).unwrap();
        for t in 0..16 {
            p.driver.add_inbuf(&[mem.alloc_sg(4)], t).unwrap();
        }
        assert_eq!(p.device_echo_all(), 16);
        assert_eq!(std::iter::from_fn(|| p.driver.get_buf()).count(), 16);

        // Exhaust the memory: the resize fails and the old ring still works.
        while mem.alloc(4096, 8).is_some() {}
        p.driver.add_inbuf(&[Sg::new(TestMemory::BASE, 4)], 99).unwrap();
        let mut recycled = Vec::new();
        assert_eq!(p.driver.resize(4096, |t| recycled.push(t)), Err(virtq::CreateError::NoMemory));
        assert_eq!((recycled, p.driver.vring_size()), (vec![99], 16));
        p.device = DeviceQueue::new(&mem, common::device_config(&p.driver, features)).unwrap();
        p.driver.add_inbuf(&[Sg::new(TestMemory::BASE, 4)], 100).unwrap();
        assert_eq!(p.device_echo_all(), 1);
        assert_eq!(p.driver.get_buf().map(|u| u.token), Some(100), "{layout:?}");
    });
}

#[test]
fn caller_memory_queues_work_in_every_layout() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let features = layout_features(layout, true, false);
        let total = if !layout.is_packed() {
            virtq::split::ContiguousAreas::new(8, 64).total
        } else {
            virtq::packed::ContiguousAreas::new(8).total
        };
        let addr = mem.alloc(total, 4096).unwrap();
        let region = virtq::DmaRegion {
            cpu: virtq::GuestMemory::translate(&mem, addr, total as u64).unwrap(),
            device_addr: addr,
            size: total,
        };
        // A region a byte short, or not 16-aligned, is refused as such (not as a failed
        // allocation).
        let short = virtq::DmaRegion { size: total - 1, ..region };
        let unaligned = virtq::DmaRegion {
            cpu: virtq::GuestMemory::translate(&mem, addr + 8, total as u64).unwrap(),
            device_addr: addr + 8,
            size: total,
        };
        for bad in [short, unaligned] {
            // SAFETY: test memory that outlives the call; the queue is refused anyway.
            let r = unsafe { Virtqueue::<u32, _, _>::new_in(QueueConfig::new(0, 8, features), bad, &mem, ()) };
            assert_eq!(r.err(), Some(virtq::CreateError::RegionTooSmall), "{layout:?}");
        }
        // SAFETY: fresh zeroed test memory, 4096-aligned, that outlives the queue.
        let mut driver =
            unsafe { Virtqueue::<u32, _, _>::new_in(QueueConfig::new(0, 8, features), region, &mem, ()) }.unwrap();
        assert_eq!(driver.desc_addr(), addr);
        let mut device = DeviceQueue::new(&mem, common::device_config(&driver, features)).unwrap();
        driver.add_inbuf(&[mem.alloc_sg(4)], 5).unwrap();
        let mut segs = Vec::new();
        let chain = device.pop(&mut segs).unwrap().unwrap();
        device.complete(chain, 4);
        device.publish_used();
        assert_eq!(driver.get_buf().map(|u| (u.token, u.len)), Some((5, 4)), "{layout:?}");
    });
}

#[test]
fn creation_checks_the_layout_and_size() {
    let mem = TestMemory::new(1 << 16);
    let split = virtq::SplitDriver::<u8, _, _>::new(QueueConfig::new(0, 8, Features::RING_PACKED), &mem, ());
    assert_eq!(split.err(), Some(virtq::CreateError::WrongLayout));
    let packed = virtq::PackedDriver::<u8, _, _>::new(QueueConfig::new(0, 8, Features::empty()), &mem, ());
    assert_eq!(packed.err(), Some(virtq::CreateError::WrongLayout));
    let in_order = virtq::SplitInOrderDriver::<u8, _, _>::new(QueueConfig::new(0, 8, Features::empty()), &mem, ());
    assert_eq!(in_order.err(), Some(virtq::CreateError::WrongLayout));
    // Packed rings need not be a power of two; zero is never a size.
    let packed = Virtqueue::<u8, _, _>::new(QueueConfig::new(0, 5, Features::RING_PACKED), &mem, ()).unwrap();
    assert_eq!((packed.layout(), packed.vring_size()), (LayoutKind::Packed, 5));
    let zero = Virtqueue::<u8, _, _>::new(QueueConfig::new(0, 0, Features::RING_PACKED), &mem, ());
    assert_eq!(zero.err(), Some(virtq::CreateError::InvalidSize));
}

#[test]
fn packed_in_order_poll_sees_the_rest_of_a_pending_batch() {
    // Regression (found by the property test): after get_buf returned the first buffer of
    // a batch, enable_cb() said nothing was pending, and a driver that slept then waited
    // forever for the rest.
    let mem = TestMemory::new(1 << 20);
    let mut p = Pair::of(&mem, LayoutKind::PackedInOrder, 6, true, false);
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 1).unwrap();
    p.driver.add_inbuf(&[mem.alloc_sg(4)], 2).unwrap();
    assert_eq!(p.device_echo_all(), 2);
    assert_eq!(p.driver.get_buf().map(|u| u.token), Some(1));
    assert!(!p.driver.enable_cb(), "buffer 2 is used: the caller must collect it first");
    assert_eq!(p.driver.get_buf().map(|u| u.token), Some(2));
    assert!(p.driver.enable_cb());
}

#[test]
fn the_handle_notifies_from_another_thread_without_the_queue() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let p = Pair::of(&mem, layout, 4, false, false);
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
        let snapshot = queue.lock().unwrap().enable_cb_prepare();
        let q = queue.lock().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| q.disable_cb());
            s.spawn(|| assert!(!q.poll(snapshot)));
        });
    });
}

#[test]
fn the_mock_driver_and_mock_device_talk_on_every_layout() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let features = layout_features(layout, true, true);
        let mut driver = virtq::testing::MockDriver::new(&mem, 8, features).unwrap();
        let mut device = DeviceQueue::new(&mem, driver.device_config()).unwrap();
        driver.send(b"ping", 8).unwrap();
        driver.send(b"", 2).unwrap();
        let mut segs = Vec::new();
        while let Some(chain) = device.pop(&mut segs).unwrap() {
            let w = segs.iter().find(|s| s.is_writable()).unwrap();
            let n = w.write_at(0, b"pong") as u32;
            device.complete(chain, n);
        }
        device.publish_used();
        assert_eq!(driver.recv().as_deref(), Some(&b"pong"[..]), "{layout:?}");
        assert_eq!(driver.recv().as_deref(), Some(&b"po"[..]));
        assert!(driver.recv().is_none());
    });
}

/// One buffer of a lap: its readable and writable segments.
type Posted = (Vec<Sg>, Vec<Sg>);

/// Posts `bufs` (tokens from 0), has the device check each chain's segments against them
/// and complete it with `written`, and checks what the driver gets back.
fn lap(p: &mut Pair<'_>, bufs: &[Posted], written: u32, what: &str) {
    for (t, (out, inb)) in bufs.iter().enumerate() {
        p.driver.add_sgs(&[out.as_slice()], &[inb.as_slice()], t as u64).unwrap();
    }
    let mut expected = Vec::new();
    for (t, (out, inb)) in bufs.iter().enumerate() {
        let (chain, segs) = p.pop().unwrap_or_else(|| panic!("{what}: buffer {t} is missing"));
        let seen: Vec<_> = segs.iter().map(|s| (s.addr(), s.len(), s.is_writable())).collect();
        let posted: Vec<_> =
            out.iter().map(|s| (s.addr, s.len, false)).chain(inb.iter().map(|s| (s.addr, s.len, true))).collect();
        assert_eq!(seen, posted, "{what}: buffer {t}");
        let len = written.min(chain.writable_len());
        expected.push((t as u64, len));
        p.device.complete(chain, len);
    }
    assert!(p.pop().is_none(), "{what}");
    p.device.publish_used();
    let got: Vec<_> = std::iter::from_fn(|| p.driver.get_buf()).map(|u| (u.token, u.len)).collect();
    assert_eq!(got, expected, "{what}");
}

/// Split drivers skip descriptor stores, and devices the stores of used ids and lengths,
/// that would write what the ring already holds. Laps over the same slots change one
/// thing at a time (nothing, address, length, written length, direction, chaining) and
/// each change must reach the other side; and entries a peer overwrote in between are
/// written again even though the queue's own last value for them was the same.
#[test]
fn reposting_into_the_same_slots_delivers_every_change_and_repairs_overwritten_entries() {
    each_layout(|layout| {
        let mem = TestMemory::new(1 << 20);
        let mut p = Pair::of(&mem, layout, 4, false, false);
        let a: Vec<Sg> = (0..4).map(|_| mem.alloc_sg(64)).collect();
        let b: Vec<Sg> = (0..4).map(|_| mem.alloc_sg(64)).collect();
        let inbufs = |sgs: &[Sg]| sgs.iter().map(|&s| (vec![], vec![s])).collect::<Vec<Posted>>();
        let outbufs = |sgs: &[Sg]| sgs.iter().map(|&s| (vec![s], vec![])).collect::<Vec<Posted>>();
        let shorter: Vec<Sg> = a.iter().map(|s| Sg { len: 32, ..*s }).collect();
        let chains: Vec<Posted> = vec![(vec![a[0]], vec![a[1]]), (vec![a[2]], vec![a[3]])];

        // Written lengths of 64 leave a packed used descriptor's id and length as the
        // driver wrote them; 10 and 20 change the length.
        for written in [64, 64, 10, 10, 64] {
            lap(&mut p, &inbufs(&a), written, &format!("{layout:?}: same buffers, {written} written"));
        }
        for i in 0..4 {
            // The device scribbles on descriptors (all free now), a split driver on used
            // entries.
            mem.write_u64(p.desc_addr(i), 0xdead_beef);
            mem.write_u64(p.desc_addr(i) + 8, u64::MAX);
            if p.is_split() {
                mem.write_u64(p.used_elem_addr(i), u64::MAX);
            }
        }
        lap(&mut p, &inbufs(&a), 10, &format!("{layout:?}: the same lap over overwritten entries"));
        lap(&mut p, &inbufs(&b), 10, &format!("{layout:?}: other addresses"));
        lap(&mut p, &inbufs(&shorter), 10, &format!("{layout:?}: other lengths"));
        lap(&mut p, &inbufs(&shorter), 20, &format!("{layout:?}: another written length"));
        lap(&mut p, &inbufs(&shorter), 32, &format!("{layout:?}: all of the buffer written"));
        lap(&mut p, &outbufs(&shorter), 20, &format!("{layout:?}: readable instead of writable"));
        lap(&mut p, &chains, 64, &format!("{layout:?}: two-descriptor chains"));
        lap(&mut p, &inbufs(&a), 10, &format!("{layout:?}: single descriptors again"));
    });
}

/// Each fixed device type attaches only to rings whose features select its layout; the
/// run-time `DeviceQueue` attaches to all four and reports which it runs.
#[test]
fn device_types_attach_only_to_their_layout() {
    use virtq::{DeviceConfig, DeviceError, PackedDevice, PackedInOrderDevice, SplitDevice, SplitInOrderDevice};
    let mem = TestMemory::new(1 << 20);
    for layout in LayoutKind::ALL {
        let features = layout.apply(Features::VERSION_1 | Features::EVENT_IDX);
        let driver = Virtqueue::<u32, _, _>::new(QueueConfig::new(0, 8, features), &mem, ()).unwrap();
        let config = DeviceConfig::new(8, features, driver.desc_addr(), driver.avail_addr(), driver.used_addr());
        let expect = |kind: LayoutKind| if kind == layout { Ok(kind) } else { Err(DeviceError::WrongLayout) };
        assert_eq!(SplitDevice::new(&mem, config).map(|d| d.layout()), expect(LayoutKind::Split));
        assert_eq!(SplitInOrderDevice::new(&mem, config).map(|d| d.layout()), expect(LayoutKind::SplitInOrder));
        assert_eq!(PackedDevice::new(&mem, config).map(|d| d.layout()), expect(LayoutKind::Packed));
        assert_eq!(PackedInOrderDevice::new(&mem, config).map(|d| d.layout()), expect(LayoutKind::PackedInOrder));
        assert_eq!(DeviceQueue::new(&mem, config).map(|d| d.layout()), Ok(layout));
    }
}
