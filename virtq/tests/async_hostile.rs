//! A hostile device breaks the ring in the middle of a stream of async completions: every
//! future resolves (none hangs), those completed before the fault with their data and the
//! rest with an error, and every buffer comes back to its owner exactly once.

#[path = "common/asynq.rs"]
mod asynq;
mod common;

use std::sync::Arc;
use std::task::Poll;

use asynq::{len_of, poll, setup, Buf, Flag, Fut, Returns};
use common::LAYOUTS;
use virtq::testing::TestMemory;
use virtq::{AddErrorKind, Fault, Sg};

const SIZE: u16 = 8;
/// Buffers submitted: a full ring, and twice as many waiting for space.
const N: usize = 3 * SIZE as usize;

#[test]
fn a_device_that_breaks_the_ring_mid_stream_fails_every_future_and_loses_no_buffer() {
    for layout in LAYOUTS {
        let mem = TestMemory::new(1 << 20);
        let (queue, mut dev) = setup(&mem, layout, SIZE, true);
        let returns = Returns::new(N + 1);
        let bufs: Vec<Buf> = (0..N).map(|id| Buf::new(&mem, id, &returns)).collect();
        let sgs: Vec<[Sg; 1]> = bufs.iter().map(|b| [b.sg]).collect();
        let mut futs: Vec<Option<Fut>> =
            bufs.into_iter().zip(&sgs).map(|(b, sg)| Some(queue.submit_inbuf(sg, b))).collect();
        let flags: Vec<Arc<Flag>> = futs.iter().map(|_| Arc::default()).collect();
        for (f, w) in futs.iter_mut().zip(&flags) {
            assert!(poll(f.as_mut().unwrap(), w).is_pending());
        }
        // Futures dropped before the fault: two with buffers in the ring, one waiting.
        for id in [1, 5, 12] {
            futs[id] = None;
        }

        // Two good completions, then one that claims more bytes than the buffer holds,
        // then another good one that must not be trusted.
        let mut popped: Vec<_> = dev.pop_all().into_iter().map(Some).collect();
        assert_eq!(popped.len(), SIZE as usize);
        let order: Vec<usize> = if dev.in_order() { vec![0, 1, 2, 3] } else { vec![3, 0, 2, 4] };
        let mut good = Vec::new();
        for (step, &i) in order.iter().enumerate() {
            let (chain, _, id) = popped[i].take().expect("each chain once");
            // Published one at a time, so that each has a used entry of its own (in-order
            // devices write one per batch).
            dev.device.complete(chain, len_of(id));
            dev.device.publish_used();
            if step == 2 {
                forge_last_used_len(&queue, &dev, 4096);
            } else if step < 2 {
                good.push(id);
            }
        }
        queue.interrupt();

        assert!(queue.is_broken(), "{layout:?}");
        let fault = queue.with_queue(|q| q.fault());
        assert!(matches!(fault, Some(Fault::UsedLenTooLong { len: 4096, .. })), "{layout:?}: {fault:?}");
        for (id, (f, w)) in futs.iter_mut().zip(&flags).enumerate() {
            let Some(fut) = f else { continue };
            let in_ring = fut.is_submitted();
            if !good.contains(&id) {
                assert!(w.wakes() >= 1, "{layout:?}: future {id} was never woken");
            }
            match poll(fut, w) {
                Poll::Pending => panic!("{layout:?}: future {id} hangs on a broken ring"),
                Poll::Ready(Ok(used)) => {
                    assert!(good.contains(&id), "{layout:?}: future {id} completed after the fault");
                    assert_eq!((used.token.id, used.len), (id, len_of(id)));
                }
                Poll::Ready(Err(e)) => {
                    assert!(!good.contains(&id), "{layout:?}: future {id} lost its completion");
                    assert_eq!(e.kind, AddErrorKind::Broken);
                    // A buffer the device saw stays with the queue; one it never saw comes back.
                    assert_eq!(e.buf.is_some(), !in_ring, "{layout:?}: future {id}");
                }
            }
            *f = None;
        }
        assert_eq!(good.len(), 2);

        // A later submission fails at once, its buffer handed back.
        let late = Buf::new(&mem, N, &returns);
        let late_sg = [late.sg];
        let mut fut = queue.submit_inbuf(&late_sg, late);
        let Poll::Ready(Err(e)) = poll(&mut fut, &Arc::default()) else { panic!("{layout:?}") };
        assert_eq!((e.kind, e.buf.map(|b| b.id)), (AddErrorKind::Broken, Some(N)));

        // The transport stops the device; the ring's buffers come back.
        drop(dev);
        let mut reclaimed = Vec::new();
        queue.reclaim(|_| {}, |b| reclaimed.push(b.id));
        reclaimed.sort();
        let expected: Vec<usize> = (0..SIZE as usize).filter(|id| !good.contains(id)).collect();
        assert_eq!(reclaimed, expected, "{layout:?}: the ring's buffers, except those completed");
        assert_eq!(queue.in_flight(), 0);
        returns.assert_each_once();
    }
}

/// Rewrites the length of the used entry the device wrote last (each chain here is one
/// descriptor): more than the buffer's 16 writable bytes.
fn forge_last_used_len(queue: &asynq::Queue<'_>, dev: &asynq::Dev<'_>, len: u32) {
    let (desc, used) = queue.with_queue(|q| (q.desc_addr(), q.used_addr()));
    let last = dev.device.used_base().wrapping_sub(1) & (SIZE - 1);
    let addr = if matches!(dev.layout, virtq::LayoutKind::Split | virtq::LayoutKind::SplitInOrder) {
        // struct vring_used_elem { le32 id; le32 len; } after flags and idx.
        used + 4 + 8 * last as u64 + 4
    } else {
        // struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }
        desc + 16 * last as u64 + 8
    };
    dev.mem.write_u32(addr, len);
}
