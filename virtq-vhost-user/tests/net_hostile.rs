//! The virtio-net driver against an in-process device that lies: used lengths beyond the
//! buffer or shorter than the header, `num_buffers` of 0, beyond what was posted or beyond
//! what it returned, a checksum offset beyond the frame, a used length on a transmit
//! buffer. Each lie must end in a clear error, after the honest frames before it were
//! delivered intact, without a read past a buffer and with every buffer accounted for.
//!
//! Also, with an honest device: the frames the driver sends reach the device intact
//! (copied, written in place, or chained from the caller's buffer), the config space is
//! read from the device when it has one, and sending, reclaiming and receiving allocate
//! nothing (a counting allocator watches the test's thread).
//!
//! The device is the crate's vhost-user back end (`backend::Server`) with a small net
//! device of its own here; runs on all four ring layouts, needs nothing outside the crate.
//! The back end's rings (`virtq`'s device side) never report more than a buffer holds, so
//! for a used length beyond the buffer the device holds the buffer back and the test writes
//! the lying used entry into the ring itself, as a device would.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtq_vhost_user::backend::{Device, QueueHandler, Server, ShutdownHandle};
use virtq_vhost_user::net::traffic::{check_frame, write_frame};
use virtq_vhost_user::net::wire::{feature, hdr_flags, status, NetConfig, NetHdr};
use virtq_vhost_user::net::{DeviceFault, NetDevice, NetError, NetOptions, QueueError, QueuePair};
use virtq_vhost_user::virtq::{Chain, Fault, Features, Segment};
use virtq_vhost_user::{MemoryConfig, Queue, SharedMemory};

/// Counts the allocations of the threads that ask it to (the device's threads allocate as
/// they like).
struct CountingAlloc;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

// SAFETY: every call goes to the system allocator unchanged; counting touches neither
// the memory nor the layout.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's promise about `layout`, passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above: `ptr` came from `alloc` with this `layout`.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Honest frames the device sends before it lies.
const HONEST: usize = 5;
const FRAME: usize = 60;
const MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x00, 0x53, 0x01];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lie {
    /// No lie at all.
    None,
    /// A used length beyond the receive buffer (written by the test, see `forge_used`).
    UsedLenBeyondBuffer,
    /// A used length shorter than the header.
    ShorterThanHeader,
    /// `num_buffers` 0.
    ZeroBuffers,
    /// `num_buffers` beyond the ring.
    BuffersBeyondPosted,
    /// `num_buffers` 3, then nothing more returned.
    MissingBuffers,
    /// `NEEDS_CSUM` with the checksum field past the frame's end.
    ChecksumBeyondFrame,
    /// A used length on a transmit buffer, which has nothing writable (written by the
    /// test, see `forge_used`).
    TxUsedLen,
}

use virtq_vhost_user::virtq::LayoutKind as Layout;

const LAYOUTS: [Layout; 4] = Layout::ALL;

/// Options that make the frontend negotiate `layout`.
fn options(layout: Layout) -> NetOptions {
    NetOptions {
        queue_size: 64,
        packed: layout.is_packed(),
        in_order: layout.is_in_order(),
        required_features: layout.features().bits(),
        memory: Some(MemoryConfig { size: 16 << 20, regions: 1 }),
        ..Default::default()
    }
}

/// What the device saw on its transmit queue.
#[derive(Default)]
struct Seen {
    frames: Vec<Vec<u8>>,
    headers: Vec<[u8; NetHdr::SIZE]>,
}

struct LyingNet {
    lie: Lie,
    config: [u8; virtq_vhost_user::net::wire::CONFIG_SIZE],
    /// Lets a handler that holds the ring back go on (for the stop).
    release: Arc<AtomicBool>,
    /// The buffer id a handler holds back, for `forge_used`.
    held: Arc<Mutex<Option<u16>>>,
    seen: Arc<Mutex<Seen>>,
}

/// Holds the ring back: remembers `chain`'s id and waits until the test is done.
fn hold(chain: &Chain, held: &Mutex<Option<u16>>, release: &AtomicBool) {
    *held.lock().unwrap() = Some(chain.id());
    let start = Instant::now();
    while !release.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Device for LyingNet {
    fn device_features(&self) -> u64 {
        feature::MRG_RXBUF | feature::MAC | feature::STATUS | feature::MTU
    }

    fn num_queues(&self) -> u16 {
        2
    }

    fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn queue_handler(&self, index: u16, _features: Features) -> Box<dyn QueueHandler> {
        let (release, held) = (self.release.clone(), self.held.clone());
        if index == 0 {
            Box::new(RxLiar { lie: self.lie, n: 0, release, held })
        } else {
            Box::new(TxSink { lie: self.lie, seen: self.seen.clone(), release, held })
        }
    }
}

struct RxLiar {
    lie: Lie,
    n: usize,
    release: Arc<AtomicBool>,
    held: Arc<Mutex<Option<u16>>>,
}

impl QueueHandler for RxLiar {
    fn process(&mut self, chain: &Chain, segs: &[Segment<'_>]) -> u32 {
        let i = self.n;
        self.n += 1;
        let Some(seg) = segs.iter().find(|s| s.is_writable()) else { return 0 };
        let mut frame = [0u8; NetHdr::SIZE + FRAME];
        write_frame(&mut frame[NetHdr::SIZE..], MAC, 0, i as u64, FRAME);
        let mut hdr = NetHdr { num_buffers: 1, ..Default::default() };
        let mut len = frame.len() as u32;
        if i >= HONEST {
            match self.lie {
                Lie::None | Lie::TxUsedLen => {}
                Lie::UsedLenBeyondBuffer => {
                    hold(chain, &self.held, &self.release);
                    return 0;
                }
                Lie::ShorterThanHeader => len = 5,
                Lie::ZeroBuffers => hdr.num_buffers = 0,
                Lie::BuffersBeyondPosted => hdr.num_buffers = 1000,
                Lie::MissingBuffers if i == HONEST => hdr.num_buffers = 3,
                Lie::MissingBuffers => {
                    // Hold the rest of the packet back until the test is done.
                    hold(chain, &self.held, &self.release);
                    return 0;
                }
                Lie::ChecksumBeyondFrame => {
                    hdr.flags = hdr_flags::NEEDS_CSUM;
                    hdr.csum_start = 50;
                    hdr.csum_offset = 16;
                }
            }
        }
        frame[..NetHdr::SIZE].copy_from_slice(&hdr.to_bytes());
        seg.write_at(0, &frame);
        len
    }
}

struct TxSink {
    lie: Lie,
    seen: Arc<Mutex<Seen>>,
    release: Arc<AtomicBool>,
    held: Arc<Mutex<Option<u16>>>,
}

impl QueueHandler for TxSink {
    fn process(&mut self, chain: &Chain, segs: &[Segment<'_>]) -> u32 {
        let mut bytes = Vec::new();
        for s in segs.iter().filter(|s| !s.is_writable()) {
            let mut b = vec![0u8; s.len() as usize];
            s.read_at(0, &mut b);
            bytes.extend_from_slice(&b);
        }
        let mut seen = self.seen.lock().unwrap();
        let mut h = [0u8; NetHdr::SIZE];
        h.copy_from_slice(&bytes[..NetHdr::SIZE]);
        seen.headers.push(h);
        seen.frames.push(bytes[NetHdr::SIZE..].to_vec());
        // Frames 0..HONEST complete; the next is held back for `forge_used`.
        if self.lie == Lie::TxUsedLen && seen.frames.len() == HONEST + 1 {
            drop(seen);
            hold(chain, &self.held, &self.release);
        }
        0
    }
}

struct TestDevice {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    release: Arc<AtomicBool>,
    held: Arc<Mutex<Option<u16>>>,
    seen: Arc<Mutex<Seen>>,
    shutdown: ShutdownHandle,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl TestDevice {
    fn start(lie: Lie) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("net.sock");
        let config =
            NetConfig { mac: MAC, status: status::LINK_UP, max_virtqueue_pairs: 1, mtu: 1500, ..Default::default() };
        let release = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let held = Arc::new(Mutex::new(None));
        let device = LyingNet {
            lie,
            config: config.to_bytes(),
            release: release.clone(),
            held: held.clone(),
            seen: seen.clone(),
        };
        let mut server = Server::bind(&socket, Arc::new(device)).unwrap();
        let shutdown = server.shutdown_handle();
        let thread = Some(std::thread::spawn(move || server.run()));
        Self { _dir: dir, socket, release, held, seen, shutdown, thread }
    }

    /// Waits (up to 5 s) until a handler holds a buffer back; returns its id.
    fn held(&self) -> u16 {
        let start = Instant::now();
        loop {
            if let Some(id) = *self.held.lock().unwrap() {
                return id;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "the device held no buffer back");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn connect(&self, layout: Layout) -> (NetDevice, QueuePair) {
        let mut dev = NetDevice::connect(&self.socket, &options(layout)).expect("connect");
        let pair = dev.take_queue_pairs().remove(0);
        (dev, pair)
    }
}

impl Drop for TestDevice {
    fn drop(&mut self) {
        self.release.store(true, Ordering::Relaxed);
        self.shutdown.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Plays the device for one used entry: buffer `id` used with `len` bytes, written where
/// the device's next used entry goes (split: at the published used index, which it
/// advances; packed: at descriptor `packed_pos`, first lap, so both flag bits set, and
/// `VIRTQ_DESC_F_WRITE`, without which the driver ignores the length, 2.8.9).
fn forge_used(q: &Queue<u16>, mem: &SharedMemory, packed: bool, packed_pos: u16, id: u16, len: u32) {
    let vq = q.vq();
    let size = vq.vring_size() as u64;
    if !packed {
        let used = mem.gpa_to_host(vq.used_addr(), 4 + 8 * size).expect("used ring") as *mut u8;
        // SAFETY: the used ring lies in this process's shared memory (translated above, its
        // whole length); the device's worker is blocked in its handler, so nothing else
        // writes it; the index is 2-byte aligned (the ring is), the entry 4-byte aligned.
        unsafe {
            let idx = &*(used.add(2) as *const AtomicU16);
            let p = idx.load(Ordering::Acquire);
            let elem = used.add(4 + 8 * (p as u64 % size) as usize);
            (elem as *mut u32).write_volatile(id as u32);
            (elem.add(4) as *mut u32).write_volatile(len);
            idx.store(p.wrapping_add(1), Ordering::Release);
        }
    } else {
        assert!((packed_pos as u64) < size, "first lap only");
        let desc = mem.gpa_to_host(vq.desc_addr(), 16 * size).expect("descriptor ring") as *mut u8;
        // SAFETY: as above, for descriptor `packed_pos` of the packed ring (16-byte
        // aligned): length and id first, then the flags that publish them.
        unsafe {
            let d = desc.add(16 * packed_pos as usize);
            (d.add(8) as *mut u32).write_volatile(len);
            (d.add(12) as *mut u16).write_volatile(id);
            (*(d.add(14) as *const AtomicU16)).store(0x8082, Ordering::Release);
        }
    }
}

/// Receives until the queue fails (or 5 s pass); returns the honest frames' sequence
/// numbers and the error.
fn receive_until_error(pair: &mut QueuePair) -> (Vec<u64>, Option<NetError>) {
    let mut seqs = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        match pair.rx.recv(16, |f| {
            let (q, seq) = check_frame(&f).expect("an honest frame arrives intact");
            assert_eq!((q, f.len(), f.num_buffers()), (0, FRAME, 1));
            seqs.push(seq);
        }) {
            Ok(_) => {}
            Err(e) => return (seqs, Some(e)),
        }
        assert!(pair.rx.buffers().balanced(), "{:?}", pair.rx.buffers());
        std::thread::sleep(Duration::from_micros(200));
    }
    (seqs, None)
}

/// Runs `lie` on every layout and checks the error with `expect`.
fn lie_on_receive(lie: Lie, expect: impl Fn(&DeviceFault) -> bool) {
    for layout in LAYOUTS {
        let dev = TestDevice::start(lie);
        let (net, mut pair) = dev.connect(layout);
        if lie == Lie::UsedLenBeyondBuffer {
            let id = dev.held();
            let len = pair.rx.buffer_len() + 100;
            forge_used(pair.rx.queue(), net.memory(), layout.is_packed(), HONEST as u16, id, len);
        }
        let (seqs, err) = receive_until_error(&mut pair);
        assert_eq!(seqs, (0..HONEST as u64).collect::<Vec<_>>(), "{layout:?} {lie:?}: the honest frames first");
        match &err {
            Some(NetError::Queue(QueueError::Device(fault))) if expect(fault) => {}
            other => panic!("{layout:?} {lie:?}: expected the device's fault, got {other:?}"),
        }
        // The failure sticks; every buffer is free, held or posted; after the stop, free.
        assert!(matches!(pair.rx.recv(16, |_| panic!("nothing after the fault")), Err(NetError::Queue(_))));
        let before = pair.rx.buffers();
        assert!(before.balanced(), "{layout:?} {lie:?}: {before:?}");
        dev.release.store(true, Ordering::Relaxed);
        let after = pair.rx.stop().expect("stop");
        assert_eq!(after.free, after.total, "{layout:?} {lie:?}: every buffer back: {after:?}");
        eprintln!("{layout:?} {lie:?}: {}", err.unwrap());
    }
}

#[test]
fn used_length_beyond_the_buffer_breaks_the_ring() {
    lie_on_receive(Lie::UsedLenBeyondBuffer, |f| matches!(f, DeviceFault::Ring(Fault::UsedLenTooLong { .. })));
}

#[test]
fn used_length_shorter_than_the_header() {
    lie_on_receive(Lie::ShorterThanHeader, |f| *f == DeviceFault::HeaderTruncated { len: 5 });
}

#[test]
fn num_buffers_zero() {
    lie_on_receive(Lie::ZeroBuffers, |f| *f == DeviceFault::ZeroBuffers);
}

#[test]
fn num_buffers_beyond_what_was_posted() {
    lie_on_receive(
        Lie::BuffersBeyondPosted,
        |f| matches!(f, DeviceFault::BuffersBeyondPosted { num_buffers: 1000, posted } if *posted <= 64),
    );
}

#[test]
fn num_buffers_beyond_what_the_device_returned() {
    lie_on_receive(Lie::MissingBuffers, |f| *f == DeviceFault::MissingBuffers { num_buffers: 3, arrived: 1 });
}

#[test]
fn checksum_offset_beyond_the_frame() {
    lie_on_receive(Lie::ChecksumBeyondFrame, |f| matches!(f, DeviceFault::HeaderBeyondFrame(_)));
}

#[test]
fn used_length_on_a_transmit_buffer_breaks_the_ring() {
    for layout in LAYOUTS {
        let dev = TestDevice::start(Lie::TxUsedLen);
        let (net, mut pair) = dev.connect(layout);
        let mut sent = 0;
        while sent < HONEST + 3 {
            sent += pair.tx.send_with(1, |_, slot| write_frame(slot, MAC, 0, sent as u64, FRAME)).unwrap();
        }
        let id = dev.held();
        forge_used(pair.tx.queue(), net.memory(), layout.is_packed(), HONEST as u16, id, 100);
        let mut err = None;
        let start = Instant::now();
        let mut sent = sent as u64;
        while err.is_none() && start.elapsed() < Duration::from_secs(5) {
            // Small bursts, reclaimed each time, so the lie shows while slots are left.
            match pair.tx.send_with(2, |i, slot| write_frame(slot, MAC, 0, sent + i as u64, FRAME)) {
                Ok(n) => sent += n as u64,
                Err(e) => err = Some(e),
            }
            pair.tx.reclaim();
            std::thread::sleep(Duration::from_micros(200));
        }
        match &err {
            Some(NetError::Queue(QueueError::Device(DeviceFault::Ring(Fault::UsedLenTooLong {
                len: 100, ..
            })))) => {}
            other => panic!("{layout:?}: expected the ring's fault, got {other:?}"),
        }
        assert!(pair.tx.slots().balanced());
        dev.release.store(true, Ordering::Relaxed);
        let after = pair.tx.stop().expect("stop");
        assert_eq!(after.free, after.total, "{layout:?}: every slot back: {after:?}");
    }
}

/// With an honest device: what the driver sends arrives intact, whichever way it was
/// handed over, with the all-zero header; the config space comes from the device.
#[test]
fn frames_reach_an_honest_device_intact() {
    for layout in LAYOUTS {
        let dev = TestDevice::start(Lie::None);
        let (net, mut pair) = dev.connect(layout);
        let info = net.info();
        assert!(info.config_from_device, "the back end has the CONFIG protocol feature");
        assert_eq!((info.mac, info.mtu, info.link_up()), (MAC, Some(1500), true));
        assert_eq!(info.max_frame, 1500 + 18);

        // Written in place, copied, and chained from a buffer of the caller's.
        let mut want: Vec<Vec<u8>> = Vec::new();
        let mut buf = [0u8; 1514];
        let n = pair.tx.send_with(3, |i, slot| write_frame(slot, MAC, 1, i as u64, 60 + 500 * i)).unwrap();
        assert_eq!(n, 3);
        for i in 0..3 {
            let len = write_frame(&mut buf, MAC, 1, i, 60 + 500 * i as usize);
            want.push(buf[..len].to_vec());
        }
        let len = write_frame(&mut buf, MAC, 1, 3, 1514);
        assert_eq!(pair.tx.send(&[&buf[..len]]).unwrap(), 1);
        want.push(buf[..len].to_vec());
        let mut chained = net.memory().alloc(700).unwrap();
        write_frame(&mut chained, MAC, 1, 4, 700);
        want.push(chained.to_vec());
        pair.tx.send_buffer(chained).map_err(|(e, _)| e).unwrap();
        // Longer than a slot: refused, nothing sent.
        let long = vec![0u8; pair.tx.max_frame() + 1];
        assert!(matches!(pair.tx.send(&[&long]), Err(NetError::FrameTooLong { .. })));

        let start = Instant::now();
        let mut back = Vec::new();
        while back.is_empty() || pair.tx.in_flight() > 0 {
            pair.tx.reclaim();
            pair.tx.take_sent_buffers(&mut back);
            assert!(start.elapsed() < Duration::from_secs(5), "{layout:?}: transmissions did not complete");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(back.len(), 1, "the chained buffer comes back once");
        assert_eq!(back[0].len(), 700);
        let seen = dev.seen.lock().unwrap();
        assert_eq!(seen.frames, want, "{layout:?}");
        assert!(seen.headers.iter().all(|h| *h == [0; NetHdr::SIZE]), "{layout:?}: no offloads asked");
        drop(seen);

        // Receive: every frame intact, buffers reposted as they are consumed.
        let got = AtomicUsize::new(0);
        let start = Instant::now();
        while got.load(Ordering::Relaxed) < 200 {
            pair.rx
                .recv(32, |f| {
                    let (_, seq) = check_frame(&f).expect("intact");
                    assert_eq!(seq, got.load(Ordering::Relaxed) as u64, "{layout:?}: in order");
                    got.fetch_add(1, Ordering::Relaxed);
                })
                .unwrap();
            assert!(start.elapsed() < Duration::from_secs(5), "{layout:?}: frames stopped coming");
        }
        let counts = pair.rx.buffers();
        assert!(counts.balanced());
        assert_eq!(pair.rx.stop().unwrap().free, counts.total);
        assert_eq!(pair.tx.stop().unwrap().free, pair.tx.slots().total);
    }
}

/// Sending (in place and copied), reclaiming and receiving allocate nothing, once the
/// queues are set up.
#[test]
fn the_packet_path_does_not_allocate() {
    for layout in LAYOUTS {
        let dev = TestDevice::start(Lie::None);
        let (_net, mut pair) = dev.connect(layout);
        let frame = [0x5au8; 100];
        let (mut sent, mut received) = (0u64, 0u64);
        // Rounds until `goal` frames went each way (the device runs on its own threads).
        let mut run = |pair: &mut QueuePair, goal: u64| {
            let start = Instant::now();
            let (sent_from, received_from) = (sent, received);
            while sent - sent_from < goal || received - received_from < goal {
                assert!(start.elapsed() < Duration::from_secs(10), "{layout:?}: traffic stalled");
                sent +=
                    pair.tx.send_with(4, |i, slot| write_frame(slot, MAC, 0, sent + i as u64, FRAME)).unwrap() as u64;
                sent += pair.tx.send(&[&frame[..]]).unwrap() as u64;
                pair.tx.reclaim();
                received += pair.rx.recv(32, |f| assert!(check_frame(&f).is_ok())).unwrap() as u64;
                assert!(pair.rx.buffers().balanced() && pair.tx.slots().balanced());
                std::thread::yield_now();
            }
        };
        run(&mut pair, 200);
        COUNTING.with(|c| c.set(true));
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        run(&mut pair, 2000);
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        COUNTING.with(|c| c.set(false));
        assert_eq!(allocations, 0, "{layout:?}: allocations on the packet path");
    }
}
