//! The virtio-net device on the back-end framework (`NetBackend`, the code of
//! `virtq serve-net`) driven in one process by a small driver written here on the
//! frontend's queues, on all four ring layouts: loopback frames byte for byte, mergeable
//! receive buffers, receive buffers held across a stop, the control queue, multiqueue,
//! hostile rings, and a TAP peer inside a network namespace this test creates.

mod device_util;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_util::{hostile_descriptors_break_the_ring_only, wait_until, DeviceServer};
use virtq_vhost_user::frontend::{ConnectOptions, Connection, Queue};
use virtq_vhost_user::net::device::{BASE_FEATURES, TAP_OFFLOADS};
use virtq_vhost_user::net::wire::{ctrl, feature, CtrlCommand, NetConfig, CTRL_DATA_MAX};
use virtq_vhost_user::net::{NetBackend, NetBackendOptions, NetHdr, NetPeer, NetStats};
use virtq_vhost_user::virtq::LayoutKind;
use virtq_vhost_user::{DmaBuffer, WaitMode};

#[path = "util/rng.rs"]
#[allow(dead_code)]
mod prng;

const HDR: usize = NetHdr::SIZE;

/// A virtio-net driver just big enough for the tests: one pair, buffers of one size.
struct TestNet {
    conn: Connection,
    rx: Queue<u16>,
    tx: Queue<u16>,
    rx_bufs: Vec<DmaBuffer>,
    tx_bufs: Vec<DmaBuffer>,
    tx_free: Vec<u16>,
    mrg: bool,
}

struct Setup {
    layout: LayoutKind,
    mrg: bool,
    rx_buf: usize,
    rx_count: u16,
    queue_size: u16,
    pair: u16,
    extra_features: u64,
}

impl Setup {
    fn new(layout: LayoutKind) -> Self {
        Self { layout, mrg: true, rx_buf: 2048, rx_count: 64, queue_size: 128, pair: 0, extra_features: 0 }
    }
}

fn net_options(layout: LayoutKind, driver_features: u64) -> ConnectOptions {
    ConnectOptions {
        driver_features,
        required_features: layout.features().bits(),
        ring_packed: layout.is_packed(),
        in_order: layout.is_in_order(),
        config_size: 12,
        ..Default::default()
    }
}

impl TestNet {
    fn connect(socket: &std::path::Path, s: &Setup) -> Self {
        let mut driver = feature::MQ | feature::CTRL_VQ | feature::MAC | feature::STATUS | s.extra_features;
        if s.mrg {
            driver |= feature::MRG_RXBUF;
        }
        let conn = Connection::connect(socket, &net_options(s.layout, driver)).unwrap();
        assert_eq!(LayoutKind::from_features(conn.features()), s.layout);
        assert_eq!(conn.features().bits() & feature::MRG_RXBUF != 0, s.mrg);
        let mut rx = conn.create_queue::<u16>(2 * s.pair, s.queue_size, 0).unwrap();
        let tx = conn.create_queue::<u16>(2 * s.pair + 1, s.queue_size, 0).unwrap();
        let rx_bufs: Vec<DmaBuffer> = (0..s.rx_count).map(|_| conn.memory().alloc(s.rx_buf).unwrap()).collect();
        for (i, b) in rx_bufs.iter().enumerate() {
            rx.vq_mut().add_inbuf_premapped(&[b.sg()], i as u16).unwrap();
        }
        rx.kick().unwrap();
        let tx_bufs: Vec<DmaBuffer> = (0..32).map(|_| conn.memory().alloc(HDR + 1514).unwrap()).collect();
        Self { conn, rx, tx, rx_bufs, tx_bufs, tx_free: (0..32).rev().collect(), mrg: s.mrg }
    }

    /// Transmits `frame` with a zero header; waits for a transmit buffer if all are out.
    fn send(&mut self, frame: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.tx_free.is_empty() {
            self.reclaim_tx();
            if self.tx_free.is_empty() {
                self.tx.wait(WaitMode::Sleep, Some(deadline)).expect("a transmit buffer comes back");
            }
        }
        let i = self.tx_free.pop().unwrap();
        let b = &mut self.tx_bufs[i as usize];
        b.set_len(HDR + frame.len());
        b[..HDR].fill(0);
        b[HDR..].copy_from_slice(frame);
        self.tx.vq_mut().add_outbuf_premapped(&[b.sg()], i).unwrap();
        self.tx.kick().unwrap();
    }

    fn reclaim_tx(&mut self) {
        while let Some(u) = self.tx.vq_mut().get_buf() {
            assert_eq!(u.len, 0, "a transmit buffer with bytes written");
            self.tx_free.push(u.token);
        }
    }

    /// The next received frame: its header and bytes, and the buffers it spanned.
    fn recv(&mut self, timeout: Duration) -> Option<(NetHdr, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        let first = self.next_used(deadline)?;
        let (slot, len) = first;
        assert!(len as usize >= HDR, "a received buffer of {len} bytes");
        let buf = &self.rx_bufs[slot as usize];
        let hdr = NetHdr::parse(buf[..HDR].try_into().unwrap());
        let mut frame = buf[HDR..len as usize].to_vec();
        self.repost(slot);
        let n = if self.mrg { hdr.num_buffers } else { 1 };
        assert!(n >= 1, "num_buffers 0");
        for _ in 1..n {
            let (slot, len) = self.next_used(deadline).expect("the frame's next buffer");
            frame.extend_from_slice(&self.rx_bufs[slot as usize][..len as usize]);
            self.repost(slot);
        }
        Some((hdr, frame))
    }

    fn next_used(&mut self, deadline: Instant) -> Option<(u16, u32)> {
        loop {
            if let Some(u) = self.rx.vq_mut().get_buf() {
                return Some((u.token, u.len));
            }
            if self.rx.wait(WaitMode::Sleep, Some(deadline)).is_err() {
                return None;
            }
        }
    }

    fn repost(&mut self, slot: u16) {
        let sg = self.rx_bufs[slot as usize].sg();
        self.rx.vq_mut().add_inbuf_premapped(&[sg], slot).unwrap();
        self.rx.kick().unwrap();
    }
}

/// An Ethernet frame of `len` bytes (at least 14) with a recognisable payload.
fn frame(rng: &mut prng::Rng, len: usize) -> Vec<u8> {
    let mut f = rng.bytes(len);
    f[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f
}

fn loopback(pairs: u16) -> (DeviceServer, Arc<NetStats>) {
    let dev = NetBackend::new(NetBackendOptions { pairs, ..Default::default() }).unwrap();
    let stats = dev.stats();
    (DeviceServer::start(Arc::new(dev)), stats)
}

/// Frames of every size from 14 to 1514 bytes come back byte for byte, in order, with a
/// header of zeroes but for num_buffers; the small ring wraps many times.
fn loopback_frames(layout: LayoutKind, mrg: bool, rx_buf: usize) {
    let (server, stats) = loopback(1);
    let mut s = Setup::new(layout);
    s.mrg = mrg;
    s.rx_buf = rx_buf;
    s.rx_count = 16;
    s.queue_size = 16;
    let mut net = TestNet::connect(&server.socket, &s);
    let mut rng = prng::Rng::new(layout as u64 * 2 + mrg as u64);
    let mut buffers_seen = 0u32;
    for i in 0..600usize {
        let len = if i < 16 { 14 + i } else { 14 + rng.below(1501) as usize };
        let f = frame(&mut rng, len);
        net.send(&f);
        let (hdr, got) = net.recv(Duration::from_secs(10)).unwrap_or_else(|| panic!("frame {i} did not come back"));
        assert!(got == f, "{}: frame {i} ({len} bytes) differs", layout.name());
        assert_eq!(NetHdr { num_buffers: 0, ..hdr }, NetHdr::default(), "header of frame {i}");
        let want = if mrg { (HDR + len).div_ceil(rx_buf) as u16 } else { 1 };
        assert_eq!(hdr.num_buffers, want, "num_buffers of a {len}-byte frame in {rx_buf}-byte buffers");
        buffers_seen += hdr.num_buffers as u32;
        net.reclaim_tx();
    }
    assert_eq!(stats.tx_frames.load(Ordering::Relaxed), 600);
    assert_eq!(stats.rx_frames.load(Ordering::Relaxed), 600);
    assert_eq!(stats.rx_dropped.load(Ordering::Relaxed), 0);
    if mrg && rx_buf < 1024 {
        assert!(buffers_seen > 1200, "frames spanned {buffers_seen} buffers");
    }
    drop(net);
    server.stop();
}

#[test]
fn loopback_frames_come_back_on_every_layout() {
    for layout in LayoutKind::ALL {
        loopback_frames(layout, true, 2048);
    }
}

#[test]
fn mergeable_frames_span_small_buffers_on_every_layout() {
    for layout in LayoutKind::ALL {
        loopback_frames(layout, true, 256);
    }
}

#[test]
fn without_mergeable_buffers_on_every_layout() {
    for layout in LayoutKind::ALL {
        loopback_frames(layout, false, 1600);
    }
}

/// Chains of many segments: a transmit chain of 80 (more than a burst's sink holds,
/// served alone) and receive chains of 24 (past the in-place segment list), on every
/// layout; the frame comes back byte for byte.
#[test]
fn chains_of_many_segments() {
    let (server, _stats) = loopback(1);
    for layout in LayoutKind::ALL {
        let mut s = Setup::new(layout);
        s.rx_count = 0;
        s.queue_size = 256;
        let mut net = TestNet::connect(&server.socket, &s);
        let mem = net.conn.memory().clone();
        // One receive chain of 24 segments of 64 bytes.
        let rx_pieces: Vec<DmaBuffer> = (0..24).map(|_| mem.alloc(64).unwrap()).collect();
        let rx_sgs: Vec<_> = rx_pieces.iter().map(|b| b.sg()).collect();
        let rx_lists: Vec<&[_]> = rx_sgs.iter().map(std::slice::from_ref).collect();
        net.rx.vq_mut().add_sgs_premapped(&[], &rx_lists, 0).unwrap();
        net.rx.kick().unwrap();
        // One transmit chain: the header, then the frame in 80 pieces.
        let f = frame(&mut prng::Rng::new(21), 14 + 79 * 13);
        let mut tx_pieces = vec![mem.alloc(HDR).unwrap()];
        tx_pieces[0].fill(0);
        for chunk in f.chunks(f.len().div_ceil(79)) {
            let mut b = mem.alloc(chunk.len()).unwrap();
            b.copy_from_slice(chunk);
            tx_pieces.push(b);
        }
        assert!(tx_pieces.len() > 64, "{} segments", tx_pieces.len());
        let tx_sgs: Vec<_> = tx_pieces.iter().map(|b| b.sg()).collect();
        let tx_lists: Vec<&[_]> = tx_sgs.iter().map(std::slice::from_ref).collect();
        net.tx.vq_mut().add_sgs_premapped(&tx_lists, &[], 0).unwrap();
        net.tx.kick().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let used = net.next_used(deadline).expect("the frame comes back");
        assert_eq!(used, (0, (HDR + f.len()) as u32), "{}", layout.name());
        let got: Vec<u8> = rx_pieces.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(got[10..12], [1, 0], "num_buffers");
        assert!(got[HDR..HDR + f.len()] == f[..], "{}: the frame differs", layout.name());
        wait_until("the transmit chain back", Duration::from_secs(10), || net.tx.vq_mut().get_buf().is_some());
        drop(net);
    }
    server.stop();
}

/// Without MRG_RXBUF a frame longer than a receive buffer cannot be delivered: it is
/// dropped and counted, and the buffer takes the next frame that fits.
#[test]
fn frames_longer_than_the_buffer_are_dropped() {
    let (server, stats) = loopback(1);
    let mut s = Setup::new(LayoutKind::Split);
    s.mrg = false;
    s.rx_buf = 512;
    let mut net = TestNet::connect(&server.socket, &s);
    let mut rng = prng::Rng::new(3);
    let big = frame(&mut rng, 1000);
    let small = frame(&mut rng, 400);
    net.send(&big);
    net.send(&small);
    let (_, got) = net.recv(Duration::from_secs(10)).unwrap();
    assert!(got == small);
    assert_eq!(stats.rx_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(stats.tx_frames.load(Ordering::Relaxed), 2);
    drop(net);
    server.stop();
}

/// Frames sent while the driver has no receive buffer are dropped, not queued, and the
/// transmit queue goes on; once buffers are posted, frames arrive again.
#[test]
fn no_receive_buffers_drops_frames() {
    let (server, stats) = loopback(1);
    for layout in LayoutKind::ALL {
        let mut s = Setup::new(layout);
        s.rx_count = 0;
        let mut net = TestNet::connect(&server.socket, &s);
        let mut rng = prng::Rng::new(9);
        let before = stats.rx_dropped.load(Ordering::Relaxed);
        for _ in 0..100 {
            net.send(&frame(&mut rng, 200));
        }
        wait_until("100 frames dropped", Duration::from_secs(10), || {
            stats.rx_dropped.load(Ordering::Relaxed) >= before + 100
        });
        net.reclaim_tx();
        assert_eq!(net.tx_free.len(), 32, "every transmit buffer came back");
        let b = net.conn.memory().alloc(2048).unwrap();
        net.rx.vq_mut().add_inbuf_premapped(&[b.sg()], 0).unwrap();
        net.rx_bufs.push(b);
        net.rx.kick().unwrap();
        let f = frame(&mut rng, 300);
        net.send(&f);
        assert!(net.recv(Duration::from_secs(10)).unwrap().1 == f, "{}", layout.name());
    }
    server.stop();
}

/// Receive buffers that a frame could not fill (it needed more than the ring had) are
/// held by the device; stopping the ring gives them back: GET_VRING_BASE names the
/// position before them, not after.
#[test]
fn held_receive_buffers_are_given_back_at_stop() {
    let (server, stats) = loopback(1);
    for layout in LayoutKind::ALL {
        let mut s = Setup::new(layout);
        s.rx_buf = 128;
        s.rx_count = 3;
        let mut net = TestNet::connect(&server.socket, &s);
        let mut rng = prng::Rng::new(11);
        let before = stats.rx_dropped.load(Ordering::Relaxed);
        // 1000 bytes need 8 buffers of 128: the device pops the 3 and holds them.
        net.send(&frame(&mut rng, 1000));
        wait_until("the frame dropped", Duration::from_secs(10), || stats.rx_dropped.load(Ordering::Relaxed) > before);
        let base = net.rx.stop().unwrap();
        let expected = if layout.is_packed() { 0x8000_8000 } else { 0 };
        assert_eq!(base, expected, "{}: the held buffers are not given back", layout.name());
        assert!(!net.rx.vq().has_used(), "{}: a held buffer was completed", layout.name());
        net.rx.leak_on_drop();
    }
    server.stop();
}

/// The control queue: VQ_PAIRS_SET within 1..=pairs is OK, anything else ERR; the
/// device never writes past the ack byte.
#[test]
fn control_queue_commands() {
    let (server, stats) = loopback(2);
    for layout in LayoutKind::ALL {
        let conn = Connection::connect(&server.socket, &net_options(layout, feature::MQ | feature::CTRL_VQ)).unwrap();
        assert_eq!(conn.max_queues(), Some(5));
        let config = NetConfig::parse(conn.config());
        assert_eq!(config.max_virtqueue_pairs, 2);
        let mut q = conn.create_queue::<u16>(4, 8, 0).unwrap();
        let cmd_buf = conn.memory().alloc(64).unwrap();
        let mut ack = conn.memory().alloc(4).unwrap();
        let mut run = |bytes: &[u8]| -> u8 {
            let mut c = cmd_buf.memory().alloc(bytes.len().max(1)).unwrap();
            c.set_len(bytes.len());
            c.copy_from_slice(bytes);
            ack.fill(0xee);
            let a = virtq_vhost_user::virtq::Sg::new(ack.gpa(), 1);
            q.vq_mut().add_sgs_premapped(&[&[c.sg()]], &[&[a]], 1).unwrap();
            q.kick().unwrap();
            q.wait(WaitMode::Sleep, Some(Instant::now() + Duration::from_secs(10))).unwrap();
            let u = q.vq_mut().get_buf().unwrap();
            assert_eq!(u.len, 1);
            assert_eq!(&ack[1..], &[0xee; 3], "bytes past the ack changed");
            ack[0]
        };
        let enc = |c: CtrlCommand| {
            let mut b = [0u8; 2 + CTRL_DATA_MAX];
            let n = c.encode(&mut b);
            b[..n].to_vec()
        };
        assert_eq!(run(&enc(CtrlCommand::VqPairsSet(2))), ctrl::ACK_OK);
        assert_eq!(run(&enc(CtrlCommand::VqPairsSet(1))), ctrl::ACK_OK);
        assert_eq!(run(&enc(CtrlCommand::VqPairsSet(0))), ctrl::ACK_ERR);
        assert_eq!(run(&enc(CtrlCommand::VqPairsSet(3))), ctrl::ACK_ERR);
        assert_eq!(run(&enc(CtrlCommand::Promisc(true))), ctrl::ACK_ERR);
        assert_eq!(run(&enc(CtrlCommand::MacAddrSet([2, 0, 0, 0, 0, 1]))), ctrl::ACK_ERR);
        assert_eq!(run(&[4]), ctrl::ACK_ERR);
        assert_eq!(run(&[4, 0, 1, 0, 0]), ctrl::ACK_ERR);
        assert_eq!(run(&[0u8; 40]), ctrl::ACK_ERR);
        drop(cmd_buf);
    }
    assert_eq!(stats.ctrl_ok.load(Ordering::Relaxed), 8);
    assert_eq!(stats.ctrl_err.load(Ordering::Relaxed), 7 * 4);
    server.stop();
}

/// Two queue pairs: frames sent on a pair come back on that pair.
#[test]
fn multiqueue_pairs_are_independent() {
    let (server, _stats) = loopback(2);
    for layout in LayoutKind::ALL {
        let conn = Connection::connect(&server.socket, &net_options(layout, feature::MQ | feature::MRG_RXBUF)).unwrap();
        drop(conn);
        let mut nets: Vec<TestNet> = (0..2)
            .map(|pair| {
                let mut s = Setup::new(layout);
                s.pair = pair;
                s.extra_features = feature::MQ;
                TestNet::connect(&server.socket, &s)
            })
            .collect();
        let mut rng = prng::Rng::new(5);
        for round in 0..50 {
            for (pair, net) in nets.iter_mut().enumerate() {
                let mut f = frame(&mut rng, 100 + round);
                f[14] = pair as u8;
                net.send(&f);
                let (_, got) = net.recv(Duration::from_secs(10)).unwrap();
                assert!(got == f, "{}: pair {pair}", layout.name());
            }
        }
    }
    server.stop();
}

/// The features offered: the base set with the loop, the offloads too with a TAP; and
/// the config space.
#[test]
fn features_and_config() {
    let dev = NetBackend::new(NetBackendOptions { pairs: 3, mtu: 9000, ..Default::default() }).unwrap();
    let server = DeviceServer::start(Arc::new(dev));
    let conn = Connection::connect(&server.socket, &net_options(LayoutKind::Split, u64::MAX >> 40)).unwrap();
    let f = conn.features().bits();
    assert_eq!(f & BASE_FEATURES, BASE_FEATURES);
    assert_eq!(f & TAP_OFFLOADS, 0, "the loop offers no offload");
    let c = NetConfig::parse(conn.config());
    assert_eq!((c.mac, c.status, c.max_virtqueue_pairs, c.mtu), ([0x52, 0x54, 0, 0x12, 0x34, 0x56], 1, 3, 9000));
    assert_eq!(conn.max_queues(), Some(7));
    drop(conn);
    server.stop();
}

/// Hostile transmit chains break the transmit ring only: the server serves the next
/// frontend.
#[test]
fn hostile_transmit_descriptors() {
    let (server, _) = loopback(1);
    hostile_descriptors_break_the_ring_only(&server, 1, false);
    let mut net = TestNet::connect(&server.socket, &Setup::new(LayoutKind::Packed));
    let f = frame(&mut prng::Rng::new(1), 64);
    net.send(&f);
    assert!(net.recv(Duration::from_secs(10)).unwrap().1 == f);
    drop(net);
    server.stop();
}

/// A receive buffer outside guest memory breaks the receive ring when a frame needs it:
/// the frame is dropped, the transmit side goes on, nothing is written anywhere.
#[test]
fn hostile_receive_descriptors() {
    let (server, stats) = loopback(1);
    for layout in LayoutKind::ALL {
        let mut s = Setup::new(layout);
        s.rx_count = 0;
        let mut net = TestNet::connect(&server.socket, &s);
        let end = net.conn.memory().regions().iter().map(|r| r.gpa() + r.size() as u64).max().unwrap();
        let bad = virtq_vhost_user::virtq::Sg::new(end - 100, 2048);
        net.rx.vq_mut().add_inbuf_premapped(&[bad], 0).unwrap();
        net.rx.kick().unwrap();
        let faults = server.stats.queue_faults.load(Ordering::Relaxed);
        net.send(&frame(&mut prng::Rng::new(2), 500));
        wait_until("the receive ring is broken", Duration::from_secs(10), || {
            server.stats.queue_faults.load(Ordering::Relaxed) > faults
        });
        // Transmit still served.
        net.send(&frame(&mut prng::Rng::new(2), 500));
        wait_until("transmit buffers back", Duration::from_secs(10), || {
            net.reclaim_tx();
            net.tx_free.len() == 32
        });
        assert!(!net.rx.vq().has_used(), "{}", layout.name());
        net.rx.leak_on_drop();
    }
    assert!(stats.rx_dropped.load(Ordering::Relaxed) >= 8);
    server.stop();
}

// ---------------------------------------------------------------------------------------
// A TAP peer, in a network namespace of this test's own.

/// A network namespace and a TAP device made for one test, removed on drop.
struct NetNs {
    name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl NetNs {
    fn create(name: &str) -> Result<Self, String> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        Ok(Self { name: name.to_string() })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the TAP device in it.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Checks that this machine lets the test make TAP devices and namespaces.
fn require_tap(test: &str) {
    let why = if !std::path::Path::new("/dev/net/tun").exists() {
        Some("/dev/net/tun is missing")
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("the ip command (iproute2) is missing")
    } else if unsafe_geteuid() != 0 {
        Some("TAP devices and network namespaces need root")
    } else {
        None
    };
    if let Some(why) = why {
        panic!("{test}: {why} (build.rs marks the test ignored without it; scripts/test.sh installs it)");
    }
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// An IPv4 ICMP echo request from 10.213.7.2 (MAC 02:..:02) to 10.213.7.1 with `payload`
/// bytes of data, as an Ethernet frame to `dst`.
fn icmp_echo(dst: [u8; 6], src: [u8; 6], id: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = 20 + 8 + payload.len();
    let mut ipv4 = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 1, 0x40, 0, 64, 1, 0, 0];
    ipv4.extend_from_slice(&[10, 213, 7, 2, 10, 213, 7, 1]);
    let c = checksum(&ipv4);
    ipv4[10..12].copy_from_slice(&c.to_be_bytes());
    let mut icmp = vec![8, 0, 0, 0, (id >> 8) as u8, id as u8, 0, 1];
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ipv4);
    f.extend_from_slice(&icmp);
    f
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        sum += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Through a TAP device in a namespace of its own: ARP for the namespace's address, then
/// ICMP echoes of several sizes (up to a frame spanning many 256-byte receive buffers),
/// each answered by the namespace's kernel, on every layout.
#[test]
#[cfg_attr(not(peer = "tap"), ignore = "needs root, /dev/net/tun and iproute2 for a TAP device in a namespace")]
fn tap_peer_answers_arp_and_ping_on_every_layout() {
    require_tap("tap_peer_answers_arp_and_ping_on_every_layout");
    let tag = std::process::id() % 100_000;
    let ns = NetNs::create(&format!("vq22-{tag}")).unwrap();
    let tap = format!("vq22t{tag}");
    let dev = NetBackend::new(NetBackendOptions { peer: NetPeer::Tap(tap.clone()), ..Default::default() })
        .expect("open the TAP device");
    let stats = dev.stats();
    // The device holds the TAP open; moved into the namespace, it keeps working, and
    // nothing this test sends leaves the namespace.
    ip(&["link", "set", &tap, "netns", &ns.name]).unwrap();
    ip(&["-n", &ns.name, "addr", "add", "10.213.7.1/24", "dev", &tap]).unwrap();
    ip(&["-n", &ns.name, "link", "set", &tap, "up"]).unwrap();
    let server = DeviceServer::start(Arc::new(dev));
    let me = [0x02, 0, 0, 0, 0, 0x02];
    for layout in LayoutKind::ALL {
        let mut s = Setup::new(layout);
        s.rx_buf = 256;
        s.extra_features = TAP_OFFLOADS & !(feature::GUEST_TSO4 | feature::GUEST_TSO6 | feature::GUEST_ECN);
        let mut net = TestNet::connect(&server.socket, &s);
        // ARP: who has 10.213.7.1? tell 10.213.7.2.
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&me);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&me);
        arp.extend_from_slice(&[10, 213, 7, 2, 0, 0, 0, 0, 0, 0, 10, 213, 7, 1]);
        net.send(&arp);
        let deadline = Instant::now() + Duration::from_secs(10);
        let peer_mac = loop {
            let (_, f) = net.recv(deadline.saturating_duration_since(Instant::now())).expect("an ARP reply");
            if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                assert_eq!(&f[28..32], &[10, 213, 7, 1]);
                break <[u8; 6]>::try_from(&f[22..28]).unwrap();
            }
        };
        for (i, size) in [0usize, 56, 1000, 1400, 1472].into_iter().enumerate() {
            let payload = prng::Rng::new(i as u64).bytes(size);
            net.send(&icmp_echo(peer_mac, me, i as u16, &payload));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (hdr, f) = net.recv(deadline.saturating_duration_since(Instant::now())).expect("an echo reply");
                // IPv4 ICMP echo reply for us.
                if f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 1 && f[34] == 0 {
                    assert_eq!(&f[..6], &me);
                    assert_eq!(&f[42..], &payload[..], "{}: echo payload of {size} bytes", layout.name());
                    assert_eq!(hdr.num_buffers as usize, (HDR + f.len()).div_ceil(256));
                    break;
                }
            }
        }
        drop(net);
    }
    assert_eq!(stats.tx_dropped.load(Ordering::Relaxed), 0);
    assert_eq!(stats.rx_dropped.load(Ordering::Relaxed), 0);
    server.stop();
    drop(ns);
}
