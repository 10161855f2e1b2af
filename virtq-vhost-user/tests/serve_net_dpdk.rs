//! The virtio-net device (`NetBackend` in loopback, the code of `virtq serve-net
//! --loopback`) driven by DPDK: `dpdk-testpmd` with a `net_virtio_user` port, on the
//! split, split in-order, packed and packed in-order rings.
//!
//! - `txonly` and `rxonly`: testpmd transmits 64-byte frames for a while, then receives
//!   what it sent in a few bursts (`start tx_first`); every frame testpmd counts is
//!   counted by the device, byte for byte, and no transmit chain is malformed.
//! - `io`: testpmd forwards between a `net_pcap` port, which reads frames of random
//!   sizes (60 to 1514 bytes, random bytes) from a file, and the virtio port; the device
//!   loops them back and testpmd writes what returns to a second file. Every frame that
//!   returns must equal the one sent with its index: none corrupted, duplicated or out of
//!   order. The file is read faster than the rings drain, so some frames are dropped on
//!   the way (by testpmd when the transmit ring is full, by the device when the receive
//!   ring is): the test prints how many, and every frame the device delivered must be in
//!   the second file.
//!
//! - While frames loop (`io` on the virtio port alone, after `start tx_first`), this
//!   process allocates nothing: the device's datapath allocates no memory per frame.
//!
//! One testpmd process per layout and mode group, each with its own `--file-prefix`
//! (removed afterwards). Needs `dpdk-testpmd` (`apt-get install dpdk-dev`); without it
//! the test is marked ignored (build.rs looks).

mod device_util;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_util::DeviceServer;
use virtq_vhost_user::net::{NetBackend, NetBackendOptions, NetStats};
use virtq_vhost_user::virtq::LayoutKind;

#[path = "util/rng.rs"]
#[allow(dead_code)]
mod prng;

const TEST: &str = "testpmd_drives_serve_net";

/// Counts the allocations of this process (the device's worker is the only thread that
/// works while testpmd drives it).
struct Counting;

static ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's promise, passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's promise, passed on.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's promise, passed on.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn testpmd() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("dpdk-testpmd")).find(|p| p.is_file()))
        .unwrap_or_else(|| panic!("{TEST}: dpdk-testpmd is not installed (build.rs marks the test ignored without it; scripts/test.sh installs it)"))
}

/// A testpmd process fed commands on its standard input.
struct Testpmd {
    child: Child,
    prefix: String,
    output: Arc<std::sync::Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Testpmd {
    /// testpmd with `vdevs`; `flush_rx: false` keeps it from draining every receive queue
    /// at `start` (which would read a pcap port's whole file and drop it).
    fn start(bin: &Path, prefix: &str, vdevs: &[String], flush_rx: bool) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(["-l", "0-1", "--no-huge", "-m", "1024", "--no-pci", "--log-level=lib.eal:error"])
            .arg(format!("--file-prefix={prefix}"));
        for v in vdevs {
            cmd.arg("--vdev").arg(v);
        }
        cmd.args(["--", "-i", "--nb-cores=1", "--txd=1024", "--rxd=1024", "--total-num-mbufs=16384"]);
        if !flush_rx {
            cmd.arg("--no-flush-rx");
        }
        let mut child =
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start testpmd");
        let output = Arc::new(std::sync::Mutex::new(String::new()));
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        let readers = [out, err]
            .into_iter()
            .map(|mut r| {
                let output = output.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = r.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        output.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                })
            })
            .collect();
        let pmd = Self { child, prefix: prefix.to_string(), output, readers };
        // Commands before the first prompt would run while the ports still come up (EAL
        // takes seconds on a busy machine).
        pmd.wait_output("testpmd> ", Duration::from_secs(120));
        pmd
    }

    /// Waits until testpmd has printed `pattern`.
    fn wait_output(&self, pattern: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.output.lock().unwrap().contains(pattern) {
            assert!(
                Instant::now() < deadline,
                "testpmd printed no '{pattern}' in {timeout:?}:\n{}",
                self.output.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send(&mut self, commands: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(commands.as_bytes()).expect("testpmd takes commands");
        stdin.flush().unwrap();
    }

    /// Sends `quit` and returns everything testpmd printed; killed if it takes over 30 s.
    fn quit(mut self) -> String {
        let _ = self.child.stdin.as_mut().unwrap().write_all(b"quit\n");
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let out = self.output.lock().unwrap().clone();
        out
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(format!("/run/dpdk/{}", self.prefix));
    }
}

/// The numbers after `key` in testpmd's output, in order (`"TX-packets:"` ...).
fn counts(out: &str, key: &str) -> Vec<u64> {
    let mut v = Vec::new();
    let mut rest = out;
    while let Some(i) = rest.find(key) {
        rest = &rest[i + key.len()..];
        if let Some(n) = rest.split_whitespace().next().and_then(|w| w.parse().ok()) {
            v.push(n);
        }
    }
    v
}

fn virtio_user(socket: &Path, layout: LayoutKind) -> String {
    format!(
        "net_virtio_user0,path={},queues=1,queue_size=1024,packed_vq={},in_order={},mrg_rxbuf=1",
        socket.display(),
        u8::from(layout.is_packed()),
        u8::from(layout.is_in_order())
    )
}

fn snapshot(s: &NetStats) -> [u64; 6] {
    [
        s.tx_frames.load(Ordering::Relaxed),
        s.tx_bytes.load(Ordering::Relaxed),
        s.tx_errors.load(Ordering::Relaxed),
        s.rx_frames.load(Ordering::Relaxed),
        s.rx_bytes.load(Ordering::Relaxed),
        s.rx_dropped.load(Ordering::Relaxed),
    ]
}

/// Waits until the device's counters stop moving (it has drained what testpmd sent).
fn settle(s: &NetStats) -> [u64; 6] {
    let mut last = snapshot(s);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = snapshot(s);
        if now == last {
            return now;
        }
        last = now;
    }
}

/// txonly, then rxonly with frames sent first: the device counts what testpmd counts.
fn tx_and_rx_only(bin: &Path, layout: LayoutKind, prefix: &str) {
    let dev = NetBackend::new(NetBackendOptions::default()).unwrap();
    let stats = dev.stats();
    let server = DeviceServer::start(Arc::new(dev));
    let mut pmd = Testpmd::start(bin, prefix, &[virtio_user(&server.socket, layout)], true);
    pmd.send("set fwd txonly\nstart\n");
    std::thread::sleep(Duration::from_secs(2));
    pmd.send("stop\n");
    std::thread::sleep(Duration::from_millis(500));
    let after_tx = settle(&stats);
    // A loop: the frames circulate testpmd -> device -> testpmd; meanwhile this process
    // allocates nothing.
    pmd.send("set fwd io\nstart tx_first 8\n");
    std::thread::sleep(Duration::from_millis(500));
    let (frames0, allocs0) = (stats.rx_frames.load(Ordering::Relaxed), ALLOCATIONS.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs(1));
    let (frames1, allocs1) = (stats.rx_frames.load(Ordering::Relaxed), ALLOCATIONS.load(Ordering::Relaxed));
    pmd.send("stop\n");
    std::thread::sleep(Duration::from_millis(500));
    let looped = frames1 - frames0;
    assert!(looped > 10_000, "{}: only {looped} frames looped in 1 s", layout.name());
    assert_eq!(allocs1 - allocs0, 0, "{}: allocations while {looped} frames looped", layout.name());
    let after_loop = settle(&stats);
    // rxonly: 4 bursts of 32 frames sent first, then only received.
    pmd.send("clear port stats all\nset fwd rxonly\nstart tx_first 4\n");
    std::thread::sleep(Duration::from_secs(2));
    pmd.send("stop\n");
    std::thread::sleep(Duration::from_millis(500));
    let after_rx = settle(&stats);
    let out = pmd.quit();
    let name = layout.name();
    // The "stop" summaries: per stream, then accumulated, for each of the two runs.
    let tx = counts(&out, "TX-packets:");
    let rx = counts(&out, "RX-packets:");
    assert!(tx.len() >= 2 && rx.len() >= 2, "{name}: no testpmd statistics in:\n{out}");
    let txonly_sent = tx[0];
    assert!(txonly_sent > 1000, "{name}: testpmd sent only {txonly_sent} frames in 2 s");
    assert_eq!(after_tx[0], txonly_sent, "{name}: txonly frames testpmd sent vs the device received");
    assert_eq!(after_tx[1], txonly_sent * 64, "{name}: txonly bytes");
    assert_eq!(after_tx[2], 0, "{name}: malformed transmit chains");
    let rx_got = *rx.last().unwrap();
    let rx_delivered = after_rx[3] - after_loop[3];
    assert_eq!(after_rx[0] - after_loop[0], 128, "{name}: rxonly's tx_first frames");
    assert_eq!(rx_got, rx_delivered, "{name}: rxonly frames the device delivered vs testpmd received");
    assert_eq!(rx_delivered, 128, "{name}: rxonly frames lost ({} dropped)", after_rx[5] - after_loop[5]);
    assert_eq!(after_rx[4] - after_loop[4], 128 * 64, "{name}: rxonly bytes");
    eprintln!("{name}: txonly {txonly_sent} frames, rxonly {rx_got} frames");
    server.stop();
}

/// A pcap file of `frames` (microsecond timestamps, Ethernet).
fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    let mut b = Vec::new();
    b.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&4u16.to_le_bytes());
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&65535u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    for (i, f) in frames.iter().enumerate() {
        b.extend_from_slice(&(i as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(f.len() as u32).to_le_bytes());
        b.extend_from_slice(&(f.len() as u32).to_le_bytes());
        b.extend_from_slice(f);
    }
    std::fs::write(path, b).unwrap();
}

/// The frames of a pcap file (either byte order, micro- or nanosecond timestamps).
fn read_pcap(path: &Path) -> Vec<Vec<u8>> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(b.len() >= 24, "{}: not a pcap file", path.display());
    let magic = u32::from_le_bytes(b[0..4].try_into().unwrap());
    let le = matches!(magic, 0xa1b2_c3d4 | 0xa1b2_3c4d);
    assert!(le || matches!(magic.swap_bytes(), 0xa1b2_c3d4 | 0xa1b2_3c4d), "bad pcap magic {magic:#x}");
    let word = |o: usize| {
        let w = u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        if le {
            w
        } else {
            w.swap_bytes()
        }
    };
    let mut frames = Vec::new();
    let mut o = 24;
    while o + 16 <= b.len() {
        let len = word(o + 8) as usize;
        assert!(o + 16 + len <= b.len(), "truncated pcap record");
        frames.push(b[o + 16..o + 16 + len].to_vec());
        o += 16 + len;
    }
    frames
}

/// io forwarding between a pcap port and the virtio port: every frame comes back intact
/// and in order.
fn io_frames_intact(bin: &Path, layout: LayoutKind, prefix: &str) {
    let dev = NetBackend::new(NetBackendOptions::default()).unwrap();
    let stats = dev.stats();
    let server = DeviceServer::start(Arc::new(dev));
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.pcap"), dir.path().join("out.pcap"));
    let mut rng = prng::Rng::new(layout as u64 + 100);
    let frames: Vec<Vec<u8>> = (0..2000)
        .map(|i| {
            let len = 60 + rng.below(1455) as usize;
            let mut f = rng.bytes(len);
            f[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
            f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
            f[12..14].copy_from_slice(&[0x88, 0xb5]);
            f[14..18].copy_from_slice(&(i as u32).to_be_bytes());
            f
        })
        .collect();
    write_pcap(&input, &frames);
    let pcap = format!("net_pcap0,rx_pcap={},tx_pcap={}", input.display(), output.display());
    let mut pmd = Testpmd::start(bin, prefix, &[virtio_user(&server.socket, layout), pcap], false);
    pmd.send("set fwd io\nstart\n");
    std::thread::sleep(Duration::from_secs(1));
    settle(&stats);
    pmd.send("stop\n");
    let out = pmd.quit();
    let name = layout.name();
    let back = read_pcap(&output);
    let mut next = 0;
    for (k, f) in back.iter().enumerate() {
        let i = u32::from_be_bytes(f[14..18].try_into().unwrap()) as usize;
        assert!(i < frames.len() && i >= next, "{name}: returned frame {k} claims index {i}, expected {next} or later");
        assert!(
            f == &frames[i],
            "{name}: frame {i} ({} bytes) came back corrupted ({} bytes)",
            frames[i].len(),
            f.len()
        );
        next = i + 1;
    }
    let s = snapshot(&stats);
    eprintln!(
        "{name}: io {} of {} frames back intact; device tx {} rx {} dropped {}",
        back.len(),
        frames.len(),
        s[0],
        s[3],
        s[5]
    );
    assert_eq!(s[2], 0, "{name}: malformed transmit chains");
    assert_eq!(back.len() as u64, s[3], "{name}: frames the device delivered vs testpmd wrote; testpmd said:\n{out}");
    assert!(back.len() >= frames.len() / 4, "{name}: only {} of {} frames came back:\n{out}", back.len(), frames.len());
    server.stop();
}

#[test]
#[cfg_attr(not(peer = "dpdk"), ignore = "needs DPDK testpmd (apt-get install dpdk-dev)")]
fn testpmd_drives_serve_net() {
    let bin = testpmd();
    for layout in LayoutKind::ALL {
        let prefix = format!("vq22-{}-{}", std::process::id(), layout.name());
        tx_and_rx_only(&bin, layout, &format!("{prefix}-a"));
        io_frames_intact(&bin, layout, &format!("{prefix}-b"));
    }
}
