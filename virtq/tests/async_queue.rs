//! `AsyncQueue` on every layout: each used buffer wakes its own future, a full ring makes
//! submissions wait their turn, and a dropped future's buffer stays with the queue until
//! the device returns it.

#[path = "common/asynq.rs"]
mod asynq;
mod common;

use std::sync::Arc;
use std::task::Poll;

use asynq::{len_of, poll, setup, Buf, Flag, Fut, Returns};
use common::LAYOUTS;
use virtq::testing::TestMemory;
use virtq::AddErrorKind;

const SIZE: u16 = 8;

#[test]
fn one_interrupt_wakes_every_future_whose_buffer_came_back() {
    for layout in LAYOUTS {
        for event_idx in [false, true] {
            let mem = TestMemory::new(1 << 20);
            let (queue, mut dev) = setup(&mem, layout, SIZE, event_idx);
            let returns = Returns::new(SIZE as usize);
            let bufs: Vec<Buf> = (0..SIZE as usize).map(|id| Buf::new(&mem, id, &returns)).collect();
            let sgs: Vec<[virtq::Sg; 1]> = bufs.iter().map(|b| [b.sg]).collect();
            let mut futs: Vec<Fut> = bufs.into_iter().zip(&sgs).map(|(b, sg)| queue.submit_inbuf(sg, b)).collect();
            let flags: Vec<Arc<Flag>> = futs.iter().map(|_| Arc::default()).collect();
            for (f, w) in futs.iter_mut().zip(&flags) {
                assert!(f.is_submitted());
                assert!(poll(f, w).is_pending());
            }
            // The device returns them all at once, last first where the layout allows.
            let mut popped = dev.pop_all();
            if !dev.in_order() {
                popped.reverse();
            }
            for (chain, segs, id) in popped {
                segs[0].write_at(8, b"done");
                dev.device.complete(chain, len_of(id));
            }
            dev.device.publish_used();
            assert_eq!(queue.interrupt(), SIZE as usize, "{layout:?}: one interrupt drains every used buffer");
            for (id, (f, w)) in futs.iter_mut().zip(&flags).enumerate() {
                assert_eq!(w.wakes(), 1, "{layout:?}: future {id} woken once");
                let Poll::Ready(Ok(used)) = poll(f, w) else { panic!("{layout:?}: future {id} not ready") };
                assert_eq!((used.token.id, used.len), (id, len_of(id)), "{layout:?}: its own buffer");
                let mut done = [0u8; 4];
                mem.read(used.token.sg.addr + 8, &mut done);
                assert_eq!(&done, b"done");
            }
            drop(futs);
            returns.assert_each_once();
            assert_eq!(queue.in_flight(), 0);
        }
    }
}

#[test]
fn interrupts_are_enabled_after_the_interrupt_path() {
    for layout in LAYOUTS {
        for event_idx in [false, true] {
            let mem = TestMemory::new(1 << 20);
            let (queue, mut dev) = setup(&mem, layout, SIZE, event_idx);
            let returns = Returns::new(3);
            let bufs: Vec<Buf> = (0..3).map(|id| Buf::new(&mem, id, &returns)).collect();
            let sgs: Vec<[virtq::Sg; 1]> = bufs.iter().map(|b| [b.sg]).collect();
            let mut futs: Vec<Fut> = bufs.into_iter().zip(&sgs).map(|(b, sg)| queue.submit_inbuf(sg, b)).collect();
            let w = Arc::new(Flag::default());
            for f in &mut futs {
                assert!(poll(f, &w).is_pending());
            }
            // Each completion, one at a time, must interrupt: the interrupt path re-enables.
            for (chain, _, id) in dev.pop_all() {
                dev.device.complete(chain, len_of(id));
                assert!(dev.device.needs_notification(), "{layout:?} event_idx {event_idx}: buffer {id} interrupts");
                assert_eq!(queue.interrupt(), 1);
            }
            assert_eq!(w.wakes(), 3);
            for f in &mut futs {
                assert!(matches!(poll(f, &w), Poll::Ready(Ok(_))));
            }
        }
    }
}

#[test]
fn a_full_ring_makes_submissions_wait_first_in_first_out() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let (queue, mut dev) = setup(&mem, layout, 4, true);
        let n = 12;
        let returns = Returns::new(n);
        let bufs: Vec<Buf> = (0..n).map(|id| Buf::new(&mem, id, &returns)).collect();
        let sgs: Vec<[virtq::Sg; 1]> = bufs.iter().map(|b| [b.sg]).collect();
        let mut futs: Vec<Option<Fut>> =
            bufs.into_iter().zip(&sgs).map(|(b, sg)| Some(queue.submit_inbuf(sg, b))).collect();
        let flags: Vec<Arc<Flag>> = futs.iter().map(|_| Arc::default()).collect();
        let submitted: Vec<bool> = futs.iter().map(|f| f.as_ref().unwrap().is_submitted()).collect();
        assert_eq!(submitted, (0..n).map(|i| i < 4).collect::<Vec<_>>(), "{layout:?}");
        // The device sees the buffers in the order they were submitted, whatever order it
        // completes them in.
        let mut seen = Vec::new();
        let mut held = Vec::new();
        let mut done = 0;
        while done < n {
            for (f, w) in futs.iter_mut().zip(&flags) {
                if let Some(fut) = f {
                    if let Poll::Ready(r) = poll(fut, w) {
                        let used = r.expect("completes");
                        assert_eq!(used.len, len_of(used.token.id));
                        *f = None;
                        done += 1;
                    }
                }
            }
            let popped = dev.pop_all();
            seen.extend(popped.iter().map(|p| p.2));
            held.extend(popped.into_iter().map(|(chain, _, id)| (chain, id)));
            // Two at a time, so that waiters and completions interleave; the newest first
            // where the layout allows.
            for _ in 0..2 {
                let next = if dev.in_order() { (!held.is_empty()).then(|| held.remove(0)) } else { held.pop() };
                if let Some((chain, id)) = next {
                    dev.device.complete(chain, len_of(id));
                }
            }
            dev.device.publish_used();
            queue.interrupt();
            assert!(seen.len() <= n);
        }
        assert_eq!(seen, (0..n).collect::<Vec<_>>(), "{layout:?}: first in, first out");
        drop(futs);
        returns.assert_each_once();
    }
}

#[test]
fn a_dropped_future_leaves_its_buffer_to_the_queue_until_the_device_returns_it() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let (queue, mut dev) = setup(&mem, layout, SIZE, true);
        let returns = Returns::new(3);
        let bufs: Vec<Buf> = (0..3).map(|id| Buf::new(&mem, id, &returns)).collect();
        let sgs: Vec<[virtq::Sg; 1]> = bufs.iter().map(|b| [b.sg]).collect();
        let mut futs: Vec<Option<Fut>> =
            bufs.into_iter().zip(&sgs).map(|(b, sg)| Some(queue.submit_inbuf(sg, b))).collect();
        let w = Arc::new(Flag::default());
        // Buffer 0: polled, then dropped. Buffer 1: dropped without a poll.
        assert!(poll(futs[0].as_mut().unwrap(), &w).is_pending());
        futs[0] = None;
        futs[1] = None;
        assert_eq!((returns.count(0), returns.count(1)), (0, 0), "{layout:?}: the device still holds them");
        assert_eq!(queue.in_flight(), 3);
        for (chain, segs, id) in dev.pop_all() {
            // The device writes into the buffers of the dropped futures too.
            segs[0].write_at(8, b"late");
            dev.device.complete(chain, len_of(id));
        }
        dev.device.publish_used();
        assert_eq!(queue.interrupt(), 3);
        assert_eq!((returns.count(0), returns.count(1), returns.count(2)), (1, 1, 0), "{layout:?}");
        let Poll::Ready(Ok(used)) = poll(futs[2].as_mut().unwrap(), &w) else { panic!("{layout:?}") };
        assert_eq!(used.token.id, 2);
        drop(used);
        returns.assert_each_once();
        // Every slot is free again: the whole ring takes buffers.
        let more = Returns::new(SIZE as usize);
        let bufs: Vec<Buf> = (0..SIZE as usize).map(|id| Buf::new(&mem, id, &more)).collect();
        let sgs: Vec<[virtq::Sg; 1]> = bufs.iter().map(|b| [b.sg]).collect();
        let futs: Vec<Fut> = bufs.into_iter().zip(&sgs).map(|(b, sg)| queue.submit_inbuf(sg, b)).collect();
        assert!(futs.iter().all(|f| f.is_submitted()), "{layout:?}");
    }
}

#[test]
fn a_used_buffer_whose_future_is_dropped_unpolled_comes_back_once() {
    let mem = TestMemory::new(1 << 20);
    let (queue, mut dev) = setup(&mem, common::LAYOUTS[0], 2, true);
    let returns = Returns::new(1);
    let buf = Buf::new(&mem, 0, &returns);
    let sg = [buf.sg];
    let fut = queue.submit_inbuf(&sg, buf);
    for (chain, _, id) in dev.pop_all() {
        dev.device.complete(chain, len_of(id));
    }
    dev.device.publish_used();
    queue.interrupt();
    assert_eq!(returns.count(0), 0);
    drop(fut);
    returns.assert_each_once();
    assert_eq!(queue.in_flight(), 0);
}

#[test]
fn a_waiter_dropped_after_its_wake_passes_its_turn_on() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let (queue, mut dev) = setup(&mem, layout, 2, true);
        let returns = Returns::new(4);
        let bufs: Vec<Buf> = (0..4).map(|id| Buf::new(&mem, id, &returns)).collect();
        let sgs: Vec<[virtq::Sg; 1]> = bufs.iter().map(|b| [b.sg]).collect();
        let mut futs: Vec<Option<Fut>> =
            bufs.into_iter().zip(&sgs).map(|(b, sg)| Some(queue.submit_inbuf(sg, b))).collect();
        let flags: Vec<Arc<Flag>> = futs.iter().map(|_| Arc::default()).collect();
        for (f, w) in futs.iter_mut().zip(&flags) {
            assert!(poll(f.as_mut().unwrap(), w).is_pending());
        }
        // One buffer back: the first waiter (2) gets the turn, and is dropped unpolled.
        let (chain, _, id) = dev.pop_all().remove(0);
        dev.device.complete(chain, len_of(id));
        dev.device.publish_used();
        assert_eq!(queue.interrupt(), 1);
        assert_eq!((flags[2].wakes(), flags[3].wakes()), (1, 0), "{layout:?}");
        futs[2] = None;
        assert_eq!(flags[3].wakes(), 1, "{layout:?}: the next waiter has the turn");
        assert!(poll(futs[3].as_mut().unwrap(), &flags[3]).is_pending());
        assert!(futs[3].as_ref().unwrap().is_submitted(), "{layout:?}: and took the space");
        assert_eq!(returns.count(2), 1, "a buffer that never reached the ring goes back with its future");
    }
}

#[test]
fn a_failed_kick_breaks_the_ring_and_fails_the_submission() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let (queue, mut dev) = setup(&mem, layout, SIZE, false);
        let returns = Returns::new(2);
        let (a, b) = (Buf::new(&mem, 0, &returns), Buf::new(&mem, 1, &returns));
        let (sga, sgb) = ([a.sg], [b.sg]);
        let w = Arc::new(Flag::default());
        let mut first = queue.submit_inbuf(&sga, a);
        assert!(poll(&mut first, &w).is_pending());
        dev.bell.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut second = queue.submit_inbuf(&sgb, b);
        assert!(queue.is_broken(), "{layout:?}");
        assert_eq!(w.wakes(), 1, "{layout:?}: the pending future is woken");
        let Poll::Ready(Err(e)) = poll(&mut first, &w) else { panic!("{layout:?}") };
        assert_eq!((e.kind, e.buf.is_none()), (AddErrorKind::Broken, true));
        let Poll::Ready(Err(e)) = poll(&mut second, &w) else { panic!("{layout:?}") };
        assert_eq!(e.kind, AddErrorKind::Broken);
        // Both reached the ring; the device may hold them until it is stopped.
        assert_eq!((returns.count(0), returns.count(1)), (0, 0));
        drop((first, second));
        let _ = dev.pop_all();
        let reclaimed = queue.reclaim(|_| {}, drop);
        assert_eq!(reclaimed, 2, "{layout:?}");
        returns.assert_each_once();
    }
}

#[test]
fn a_submission_the_ring_refuses_gets_its_buffer_back() {
    let mem = TestMemory::new(1 << 20);
    let (queue, _dev) = setup(&mem, common::LAYOUTS[0], 2, true);
    let returns = Returns::new(1);
    let buf = Buf::new(&mem, 0, &returns);
    let three = [buf.sg, buf.sg, buf.sg];
    let mut fut = queue.submit_inbuf(&three, buf);
    let Poll::Ready(Err(e)) = poll(&mut fut, &Arc::default()) else { panic!() };
    assert_eq!(e.kind, AddErrorKind::TooManySegments);
    assert_eq!(e.buf.map(|b| b.id), Some(0));
}

#[test]
fn a_reactor_that_takes_over_the_kicks_kicks_once_for_a_batch() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let (queue, mut dev) = setup(&mem, layout, SIZE, false);
        let bell = dev.bell.clone();
        let kicks = || bell.kicks.load(std::sync::atomic::Ordering::Relaxed);
        let returns = Returns::new(4);
        let bufs: Vec<Buf> = (0..4).map(|id| Buf::new(&mem, id, &returns)).collect();
        let sgs: Vec<[virtq::Sg; 1]> = bufs.iter().map(|b| [b.sg]).collect();
        let mut bufs = bufs.into_iter();
        let reactor = Arc::new(Flag::default());
        queue.defer_kicks_to(&std::task::Waker::from(reactor.clone()));
        let mut futs: Vec<Fut> = (0..3).map(|i| queue.submit_inbuf(&sgs[i], bufs.next().unwrap())).collect();
        assert_eq!((kicks(), reactor.wakes()), (0, 1), "{layout:?}: no kick yet, the reactor woken once");
        assert!(queue.kick());
        assert_eq!(kicks(), 1, "{layout:?}: one kick for the three");
        assert!(queue.kick());
        assert_eq!(kicks(), 1, "{layout:?}: nothing added since");
        assert_eq!(dev.pop_all().len(), 3, "{layout:?}");
        // Back to a kick per submission.
        queue.kick_immediately();
        futs.push(queue.submit_inbuf(&sgs[3], bufs.next().unwrap()));
        assert_eq!((kicks(), reactor.wakes()), (2, 1), "{layout:?}");
        assert_eq!(dev.pop_all().len(), 1);
        drop(futs);
    }
}
