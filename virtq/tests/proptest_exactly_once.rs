//! Random operation sequences on a driver queue and a device queue sharing a small ring,
//! in each of the four layouts. Split rings start just below the 16-bit index wrap so
//! every case crosses it; packed rings of 1 to 8 entries (not only powers of two) wrap
//! many times, with chains that straddle the end.
//!
//! Buffers are added one at a time (`add_sgs`) and in bursts (`add_inbufs`,
//! `add_outbufs`), and taken back one at a time and in bursts (`get_bufs`).
//!
//! Checked on every case:
//! - every token comes back exactly once (from `get_buf` or, at the end, from
//!   `detach_unused_buf`), with the length the device reported;
//! - no needed notification is skipped: a device that went to sleep after
//!   `enable_notifications` is kicked by the first `kick_prepare` after new buffers, and a
//!   driver that went to sleep after `enable_cb` (or `enable_cb_delayed`) is interrupted
//!   for the first completion (or once the 3/4 threshold, at the latest all its buffers,
//!   are used).
//!
//! `PROPTEST_CASES=10000 cargo test --release --test proptest_exactly_once` for a longer run.

// The sleep ops call side-effecting enable_cb* and must not hide them in match guards.
#![allow(clippy::collapsible_match)]

mod common;

use std::collections::HashMap;

use common::{Pair, LAYOUTS};
use proptest::prelude::*;
use virtq::testing::TestMemory;
use virtq::{AddErrorKind, Chain, LayoutKind, QueueConfig, Segments, Sg};

#[derive(Clone, Debug)]
enum Op {
    Add {
        out: Vec<u32>,
        ins: Vec<u32>,
    },
    /// `add_inbufs` / `add_outbufs`: one single-segment buffer per length.
    AddBurst {
        lens: Vec<u32>,
        writable: bool,
    },
    Kick,
    DevicePop,
    DeviceComplete {
        pick: usize,
        percent: u32,
    },
    /// `serve`: pop and complete up to `max` chains, `percent` of each written.
    DeviceServe {
        max: usize,
        percent: u32,
    },
    DeviceNotify,
    DeviceSleep,
    DeviceDisableNotifications,
    GetBuf,
    GetBufs {
        max: usize,
    },
    DisableCb,
    SleepEnableCb,
    SleepEnableCbPrepare,
    SleepEnableCbDelayed,
}

fn op() -> impl Strategy<Value = Op> {
    let lens = || prop::collection::vec(1u32..64, 0..3);
    prop_oneof![
        4 => (lens(), lens()).prop_map(|(out, ins)| Op::Add { out, ins }),
        2 => (prop::collection::vec(1u32..64, 0..6), any::<bool>())
            .prop_map(|(lens, writable)| Op::AddBurst { lens, writable }),
        2 => Just(Op::Kick),
        4 => Just(Op::DevicePop),
        4 => (any::<usize>(), 0u32..=100).prop_map(|(pick, percent)| Op::DeviceComplete { pick, percent }),
        2 => (0usize..6, 0u32..=100).prop_map(|(max, percent)| Op::DeviceServe { max, percent }),
        2 => Just(Op::DeviceNotify),
        1 => Just(Op::DeviceSleep),
        1 => Just(Op::DeviceDisableNotifications),
        4 => Just(Op::GetBuf),
        2 => (0usize..5).prop_map(|max| Op::GetBufs { max }),
        1 => Just(Op::DisableCb),
        1 => Just(Op::SleepEnableCb),
        1 => Just(Op::SleepEnableCbPrepare),
        1 => Just(Op::SleepEnableCbDelayed),
    ]
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DriverSleep {
    Awake,
    /// Asleep after `enable_cb`: the first completion published after this must interrupt.
    UntilFirst {
        completed: usize,
    },
    /// Asleep after `enable_cb_delayed` with this many buffers in flight: an interrupt
    /// must come by the time all of them are used.
    Delayed {
        in_flight: usize,
        completed: usize,
    },
}

struct Model<'m> {
    p: Pair<'m>,
    /// First segment address -> token, to identify what the device pops.
    token_of: HashMap<u64, u64>,
    outstanding: HashMap<u64, Option<u32>>,
    returned: Vec<u64>,
    next_token: u64,
    accepted: u64,
    device_pool: Vec<(Chain, u64)>,
    device_asleep: bool,
    adds_since_device_slept: usize,
    /// Completions visible to the driver, and buffers it collected with `get_buf`.
    visible: usize,
    collected: usize,
    driver: DriverSleep,
    invisible: usize,
    /// Completions so far, and how many of them a publishing call (`serve`,
    /// `needs_notification`) has surely made visible: the driver must be able to collect
    /// those.
    completed: usize,
    published: usize,
}

impl<'m> Model<'m> {
    fn add(&mut self, out: &[u32], ins: &[u32]) {
        let mem = self.p.mem;
        let out_sg: Vec<Sg> = out.iter().map(|&l| mem.alloc_sg(l)).collect();
        let in_sg: Vec<Sg> = ins.iter().map(|&l| mem.alloc_sg(l)).collect();
        let token = self.next_token;
        self.next_token += 1;
        let kicks = self.p.bell.kicks();
        match self.p.driver.add_sgs(&[&out_sg], &[&in_sg], token) {
            Ok(()) => {
                let first = out_sg.first().or(in_sg.first()).unwrap().addr;
                self.token_of.insert(first, token);
                self.outstanding.insert(token, None);
                self.accepted += 1;
                self.adds_since_device_slept += 1;
                // The 65,535th unkicked add kicks by itself.
                if self.p.bell.kicks() > kicks {
                    self.device_asleep = false;
                }
            }
            Err(e) => {
                assert_eq!(e.token, token);
                match e.kind {
                    AddErrorKind::NoSegments => assert!(out.is_empty() && ins.is_empty()),
                    AddErrorKind::TooManySegments => {
                        assert!(out.len() + ins.len() > self.p.driver.vring_size() as usize)
                    }
                    AddErrorKind::NoSpace => {
                        assert!(self.p.driver.num_free() < (out.len() + ins.len()) as u16);
                        if self.p.bell.kicks() > kicks {
                            self.device_asleep = false;
                        }
                    }
                    other => panic!("unexpected add error {other:?}"),
                }
            }
        }
    }

    fn add_burst(&mut self, lens: &[u32], writable: bool) {
        let mem = self.p.mem;
        let sgs: Vec<Sg> = lens.iter().map(|&l| mem.alloc_sg(l)).collect();
        let (free, kicks) = (self.p.driver.num_free() as usize, self.p.bell.kicks());
        let first_token = self.next_token;
        let mut tokens = Vec::new();
        let result = if writable {
            self.p.driver.add_inbufs(&sgs, |i| {
                tokens.push(i);
                first_token + i as u64
            })
        } else {
            self.p.driver.add_outbufs(&sgs, |i| {
                tokens.push(i);
                first_token + i as u64
            })
        };
        let added = match result {
            Ok(n) => n,
            Err(AddErrorKind::NoSpace) => {
                assert!(free == 0 && !sgs.is_empty());
                0
            }
            Err(other) => panic!("unexpected burst error {other:?}"),
        };
        assert_eq!(added, sgs.len().min(free), "a burst adds all that fits");
        assert_eq!(tokens, (0..added).collect::<Vec<_>>(), "one token per added buffer, in order");
        for (i, sg) in sgs[..added].iter().enumerate() {
            let token = first_token + i as u64;
            self.token_of.insert(sg.addr, token);
            self.outstanding.insert(token, None);
        }
        self.next_token += added as u64;
        self.accepted += added as u64;
        self.adds_since_device_slept += added;
        // A kick from the burst itself: the 2^16 guard, or split's prod of a full ring.
        if self.p.bell.kicks() > kicks {
            self.device_asleep = false;
        }
    }

    fn get_bufs(&mut self, max: usize) {
        let mut got = Vec::new();
        let n = self.p.driver.get_bufs(max, |u| got.push(u));
        assert_eq!(n, got.len());
        assert!(n <= max);
        for u in got {
            let expected = self.outstanding.remove(&u.token).expect("token returned twice or never added");
            assert_eq!(Some(u.len), expected, "token {} came back before the device completed it", u.token);
            self.returned.push(u.token);
            self.collected += 1;
        }
        if n < max {
            assert!(!self.p.driver.has_used(), "get_bufs stopped short with used buffers waiting");
            assert!(self.collected >= self.published, "a published completion cannot be collected");
        }
    }

    fn get_buf(&mut self) {
        if let Some(u) = self.p.driver.get_buf() {
            let expected = self.outstanding.remove(&u.token).expect("token returned twice or never added");
            assert_eq!(Some(u.len), expected, "token {} came back before the device completed it", u.token);
            self.returned.push(u.token);
            self.collected += 1;
        } else {
            assert!(self.collected >= self.published, "a published completion cannot be collected");
        }
    }

    fn device_serve(&mut self, max: usize, percent: u32) {
        let mut segs = Segments::<4>::new();
        let (token_of, outstanding) = (&self.token_of, &mut self.outstanding);
        let mut served_here = 0;
        let served = self
            .p
            .device
            .serve(max, &mut segs, |chain, segs| {
                assert_eq!(segs.len() as u16, chain.readable_segments() + chain.writable_segments());
                let written = (chain.writable_len() as u64 * percent as u64 / 100) as u32;
                let token = token_of[&segs[0].addr()];
                let slot = outstanding.get_mut(&token).expect("served a buffer that is not outstanding");
                assert_eq!(*slot, None, "token {token} served twice");
                *slot = Some(written);
                served_here += 1;
                written
            })
            .expect("serve");
        assert_eq!(served, served_here);
        assert!(served <= max);
        // `serve` publishes everything completed so far, its own and earlier ones.
        self.completed += served;
        self.published = self.completed;
        self.invisible += served;
        self.visible += std::mem::take(&mut self.invisible);
        if let DriverSleep::UntilFirst { completed } | DriverSleep::Delayed { completed, .. } = &mut self.driver {
            *completed += served;
        }
    }

    fn device_notify(&mut self) {
        let interrupt = self.p.device.needs_notification();
        self.published = self.completed;
        self.visible += std::mem::take(&mut self.invisible);
        match self.driver {
            DriverSleep::Awake => {}
            DriverSleep::UntilFirst { completed } => {
                assert!(completed == 0 || interrupt, "lost interrupt: driver asleep after enable_cb");
            }
            DriverSleep::Delayed { in_flight, completed } => {
                assert!(interrupt || completed < in_flight, "lost interrupt: all delayed buffers used");
            }
        }
        if interrupt {
            self.driver = DriverSleep::Awake;
        }
    }

    fn run(&mut self, op: &Op) {
        let driver_awake = self.driver == DriverSleep::Awake;
        match op {
            Op::Add { out, ins } if driver_awake => self.add(out, ins),
            Op::AddBurst { lens, writable } if driver_awake => self.add_burst(lens, *writable),
            Op::Kick if driver_awake => {
                let kick = self.p.driver.kick_prepare();
                if self.device_asleep && self.adds_since_device_slept > 0 {
                    assert!(kick.is_some(), "lost kick: device asleep, new buffers published");
                }
                if kick.is_some() {
                    self.device_asleep = false;
                }
            }
            Op::DevicePop if !self.device_asleep => {
                if let Some((chain, segs)) = self.p.pop() {
                    self.device_pool.push((chain, segs[0].addr()));
                }
            }
            Op::DeviceComplete { pick, percent } if !self.device_asleep && !self.device_pool.is_empty() => {
                // An in-order device completes in the order it popped.
                let (chain, first) = if self.p.in_order() {
                    self.device_pool.remove(0)
                } else {
                    self.device_pool.swap_remove(pick % self.device_pool.len())
                };
                let chain_writable = chain.writable_len();
                let written = (chain_writable as u64 * *percent as u64 / 100) as u32;
                let token = self.token_of[&first];
                *self.outstanding.get_mut(&token).unwrap() = Some(written);
                self.p.device.complete(chain, written);
                self.completed += 1;
                // When the driver can see a completion: a packed ring publishes it at once;
                // a packed in-order device holds a run of full completions back until a
                // partial one ends it or the run reaches 16 (or `publish_used`); a split
                // ring, until `used.idx`, which the device stores by itself each time the
                // index reaches a multiple of 8 (a line of used elements).
                self.invisible += 1;
                let partial = written != chain_writable;
                let published_by_itself = match self.p.layout {
                    LayoutKind::Packed => true,
                    LayoutKind::PackedInOrder => partial || self.invisible == 16,
                    LayoutKind::Split | LayoutKind::SplitInOrder => self.p.device.used_base().is_multiple_of(8),
                };
                if published_by_itself {
                    self.visible += std::mem::take(&mut self.invisible);
                }
                if let DriverSleep::UntilFirst { completed } | DriverSleep::Delayed { completed, .. } = &mut self.driver
                {
                    *completed += 1;
                }
            }
            // An in-order device completes in the order it popped: not past chains it holds.
            Op::DeviceServe { max, percent }
                if !self.device_asleep && (!self.p.in_order() || self.device_pool.is_empty()) =>
            {
                self.device_serve(*max, *percent)
            }
            Op::DeviceNotify if !self.device_asleep => self.device_notify(),
            Op::DeviceSleep if !self.device_asleep => {
                self.device_notify();
                if !self.p.device.enable_notifications() {
                    self.device_asleep = true;
                    self.adds_since_device_slept = 0;
                }
            }
            Op::DeviceDisableNotifications if !self.device_asleep => self.p.device.disable_notifications(),
            Op::GetBuf if driver_awake => self.get_buf(),
            Op::GetBufs { max } if driver_awake => self.get_bufs(*max),
            Op::DisableCb if driver_awake => self.p.driver.disable_cb(),
            Op::SleepEnableCb if driver_awake => {
                if self.p.driver.enable_cb() {
                    self.driver = DriverSleep::UntilFirst { completed: 0 };
                }
            }
            Op::SleepEnableCbPrepare if driver_awake => {
                let snapshot = self.p.driver.enable_cb_prepare();
                if !self.p.driver.poll(snapshot) {
                    self.driver = DriverSleep::UntilFirst { completed: 0 };
                }
            }
            Op::SleepEnableCbDelayed if driver_awake => {
                if self.p.driver.enable_cb_delayed() {
                    // The driver waits for every buffer it has not collected and the device
                    // has not yet published.
                    let in_flight = self.outstanding.len() - (self.visible - self.collected);
                    if in_flight > 0 {
                        self.driver = DriverSleep::Delayed { in_flight, completed: 0 };
                    }
                }
            }
            _ => {} // The side that would run this is asleep.
        }
    }

    /// Completes whatever the device holds, collects all used buffers, detaches the rest,
    /// and checks every token came back exactly once.
    fn finish(mut self) {
        self.device_asleep = false;
        for (chain, first) in std::mem::take(&mut self.device_pool) {
            let token = self.token_of[&first];
            *self.outstanding.get_mut(&token).unwrap() = Some(0);
            self.p.device.complete(chain, 0);
        }
        self.p.device.publish_used();
        self.driver = DriverSleep::Awake;
        while self.p.driver.has_used() {
            self.get_buf();
        }
        assert!(!self.p.driver.is_broken(), "{:?}", self.p.driver.fault());
        while let Some(t) = self.p.driver.detach_unused_buf() {
            assert_eq!(self.outstanding.remove(&t), Some(None), "detached token {t} was used or unknown");
            self.returned.push(t);
        }
        assert!(self.outstanding.is_empty(), "tokens lost: {:?}", self.outstanding);
        let mut all = self.returned.clone();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), self.returned.len(), "a token came back twice");
        assert_eq!(all.len() as u64, self.accepted);
        assert_eq!(self.p.driver.num_free(), self.p.driver.vring_size());
    }
}

/// Moves both ends' indices to `n` with single-buffer round trips.
fn warm_up(p: &mut Pair<'_>, n: u32) {
    let buf = p.mem.alloc_sg(8);
    for t in 0..n {
        p.driver.add_inbuf(&[buf], t as u64).unwrap();
        let (chain, _) = p.pop().unwrap();
        p.device.complete(chain, 0);
        p.device.publish_used();
        assert_eq!(p.driver.get_buf().unwrap().token, t as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: Some(Box::new(prop::test_runner::FileFailurePersistence::Direct(
            "tests/proptest-regressions/proptest_exactly_once.txt"
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_token_returns_exactly_once_and_no_notification_is_lost(
        layout in prop::sample::select(LAYOUTS.to_vec()),
        size_log in 1u32..4,
        packed_size in 1u16..9,
        event_idx in any::<bool>(),
        indirect in any::<bool>(),
        warm in 65_500u32..65_536,
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let mem = TestMemory::new(4 << 20);
        let split = !layout.is_packed();
        let size = if split { 1 << size_log } else { packed_size };
        let mut config = QueueConfig::new(0, size, common::layout_features(layout, event_idx, indirect));
        config.indirect_max = 4;
        let mut p = Pair::new(&mem, config);
        // Split indices are free-running u16s: start near their wrap. Packed positions
        // wrap at the ring size, which the operations cross many times anyway.
        if split {
            warm_up(&mut p, warm);
        } else {
            warm_up(&mut p, warm % 7);
        }
        let mut m = Model {
            p,
            token_of: HashMap::new(),
            outstanding: HashMap::new(),
            returned: Vec::new(),
            next_token: 1 << 20,
            accepted: 0,
            device_pool: Vec::new(),
            device_asleep: false,
            adds_since_device_slept: 0,
            visible: 0,
            collected: 0,
            driver: DriverSleep::Awake,
            invisible: 0,
            completed: 0,
            published: 0,
        };
        for op in &ops {
            m.run(op);
        }
        m.finish();
    }
}
