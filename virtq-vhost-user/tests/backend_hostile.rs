//! The back end under hostile frontends: guest memory shrunk under its mappings, frontends
//! that connect and stall, kick and call fds that are not eventfds, and a guest that sends
//! malformed requests in a loop. Each ends (or limits) the hostile connection only: the
//! process survives, and other frontends are served meanwhile and afterwards.

mod backend_util;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use backend_util::{blk_options, Layout, Rng, TestServer};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtq_vhost_user::backend::blk::BlkBackendOptions;
use virtq_vhost_user::backend::{ServerOptions, Stats, LOG_BURST};
use virtq_vhost_user::blk::{BlkDevice, BlkQueue};
use virtq_vhost_user::frontend::{ConnectOptions, Connection};
use virtq_vhost_user::virtq::Features;
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A short write and read on `q`: the back end still serves this frontend.
fn check_io(q: &mut BlkQueue, offset: u64) {
    let data = Rng::new(offset + 1).bytes(8192);
    q.write_at(offset, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    q.read_at(offset, &mut back).unwrap();
    assert!(back == data, "read back differs at {offset}");
}

/// A new frontend is served.
fn check_serves(socket: &Path, offset: u64) {
    let mut dev = BlkDevice::connect(socket, &blk_options(Layout::Split, 1, 16)).expect("a new frontend connects");
    check_io(&mut dev.take_queues().remove(0), offset);
}

/// Waits until the back end closes `s` (end of file, or a reset).
fn wait_closed(s: &mut UnixStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: the back end did not close the connection: {e}"),
        }
    }
}

/// Waits (without reading) until the back end has closed or shut down its end of `s`.
fn wait_hangup(s: &UnixStream, what: &str) {
    let mut p = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, 20_000) };
    assert!(n == 1 && p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0, "{what}: the back end did not hang up");
}

fn errors(s: &Stats) -> u64 {
    s.connection_errors.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------
// 1. Guest memory shrunk under the back end's mappings.

/// The file kinds a frontend can back guest memory with.
#[derive(Clone, Copy, Debug)]
enum MemKind {
    /// A memfd without seals.
    Memfd,
    /// A memfd sealed against growing (and further seals), but not against shrinking.
    MemfdSealedGrow,
    /// A memfd sealed against shrinking: the shrink itself fails.
    MemfdSealedShrink,
    /// A regular file on tmpfs (/dev/shm).
    TmpfsFile,
    /// A regular file on disk (QEMU's memory-backend-file).
    DiskFile,
    /// A hugetlbfs file (a memfd with MFD_HUGETLB).
    Hugetlbfs,
}

/// Guest memory of the hostile frontend: one region of this size (one 2 MiB huge page).
const REGION: u64 = 2 * MIB;
const GPA: u64 = 0x4000_0000;
const QSIZE: u16 = 16;
// Offsets in the region: descriptor table, available ring, used ring, request header,
// status byte.
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x3000;
const STATUS: u64 = 0x3100;

fn memfd(name: &str, flags: libc::c_uint) -> std::io::Result<File> {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated name; memfd_create has no other memory arguments.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn add_seals(f: &File, seals: libc::c_int) {
    // SAFETY: fcntl with an integer argument on a descriptor we own.
    assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) }, 0, "F_ADD_SEALS");
}

/// The region's file, `REGION` bytes long; `Err` says why this kind is not available here.
fn make_file(kind: MemKind) -> Result<File, String> {
    let f = match kind {
        MemKind::Memfd => memfd("hostile", 0).unwrap(),
        MemKind::MemfdSealedGrow | MemKind::MemfdSealedShrink => {
            memfd("hostile-sealed", libc::MFD_ALLOW_SEALING).unwrap()
        }
        MemKind::TmpfsFile => tempfile::tempfile_in("/dev/shm").map_err(|e| format!("/dev/shm: {e}"))?,
        MemKind::DiskFile => tempfile::tempfile().unwrap(),
        MemKind::Hugetlbfs => {
            let f = memfd("hostile-huge", libc::MFD_HUGETLB).map_err(|e| format!("memfd_create(MFD_HUGETLB): {e}"))?;
            f.set_len(REGION).map_err(|e| format!("sizing a hugetlbfs file: {e}"))?;
            // Touch it: with no huge page free, this is where it fails.
            let map = Mapping::new(&f).map_err(|e| format!("mapping a hugetlbfs file: {e}"))?;
            let probe = Mapping::probe_huge_page(&map);
            drop(map);
            probe?;
            return Ok(f);
        }
    };
    f.set_len(REGION).unwrap();
    match kind {
        MemKind::MemfdSealedGrow => add_seals(&f, libc::F_SEAL_GROW | libc::F_SEAL_SEAL),
        MemKind::MemfdSealedShrink => add_seals(&f, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL),
        _ => {}
    }
    Ok(f)
}

/// The hostile frontend's own mapping of its memory.
struct Mapping {
    base: *mut u8,
}

impl Mapping {
    fn new(f: &File) -> std::io::Result<Self> {
        // SAFETY: a new shared mapping of the whole file, at an address the kernel chooses.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REGION as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { base: p.cast() })
    }

    /// Faults the huge page in with `madvise(MADV_POPULATE_WRITE)`, which fails cleanly
    /// (instead of SIGBUS) when no huge page is free.
    fn probe_huge_page(&self) -> Result<(), String> {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        // SAFETY: advice on our own mapping; no memory is read or written by us.
        let r = unsafe { libc::madvise(self.base.cast(), REGION as usize, MADV_POPULATE_WRITE) };
        if r != 0 {
            return Err(format!(
                "no free huge page ({}); raise /proc/sys/vm/nr_hugepages",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    fn addr(&self, off: u64) -> u64 {
        self.base as u64 + off
    }

    fn write<T: Copy>(&self, off: u64, v: T) {
        assert!(off as usize + size_of::<T>() <= REGION as usize);
        // SAFETY: inside our mapping (checked above); the back end may access it at the
        // same time, hence volatile.
        unsafe { std::ptr::write_volatile(self.base.add(off as usize).cast::<T>(), v) }
    }

    fn read<T: Copy>(&self, off: u64) -> T {
        assert!(off as usize + size_of::<T>() <= REGION as usize);
        // SAFETY: as in `write`.
        unsafe { std::ptr::read_volatile(self.base.add(off as usize).cast::<T>()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), REGION as usize) };
    }
}

/// A frontend speaking the protocol by hand, with one split ring it fills itself.
struct HostileFrontend {
    fe: Frontend,
    file: File,
    map: Mapping,
    kick: EventFd,
    call: EventFd,
    posted: u16,
}

impl HostileFrontend {
    /// Handshake and memory table (acknowledged: the table was accepted).
    fn connect(socket: &Path, file: File) -> Self {
        let map = Mapping::new(&file).unwrap();
        let mut fe = Frontend::connect(socket, 1).unwrap();
        fe.set_owner().unwrap();
        fe.get_features().unwrap();
        fe.set_protocol_features(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK).unwrap();
        fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        fe.set_features(Features::VERSION_1.bits() | (1 << 30)).unwrap();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: GPA,
            memory_size: REGION,
            userspace_addr: map.addr(0),
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).unwrap();
        Self {
            fe,
            file,
            map,
            kick: EventFd::new(0).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            posted: 0,
        }
    }

    /// Configures and enables ring 0; the result of the last request (SET_VRING_ENABLE).
    fn start_ring(&mut self) -> vhost::Result<()> {
        self.fe.set_vring_num(0, QSIZE)?;
        self.fe.set_vring_base(0, 0)?;
        let config = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: self.map.addr(DESC),
            used_ring_addr: self.map.addr(USED),
            avail_ring_addr: self.map.addr(AVAIL),
            log_addr: None,
        };
        self.fe.set_vring_addr(0, &config)?;
        self.fe.set_vring_kick(0, &self.kick)?;
        self.fe.set_vring_call(0, &self.call)?;
        self.fe.set_vring_enable(0, true)
    }

    /// Posts a FLUSH request (header, status) and kicks.
    fn post_flush(&mut self) {
        self.map.write(HDR, 4u32.to_le()); // VIRTIO_BLK_T_FLUSH
        self.map.write(HDR + 4, 0u32);
        self.map.write(HDR + 8, 0u64);
        self.map.write(STATUS, 0xffu8);
        // Descriptors 0 (header, NEXT) and 1 (status, WRITE).
        self.map.write(DESC, GPA + HDR);
        self.map.write(DESC + 8, 16u32);
        self.map.write(DESC + 12, 1u16); // NEXT
        self.map.write(DESC + 14, 1u16);
        self.map.write(DESC + 16, GPA + STATUS);
        self.map.write(DESC + 24, 1u32);
        self.map.write(DESC + 28, 2u16); // WRITE
        self.map.write(DESC + 30, 0u16);
        self.map.write(AVAIL + 4 + 2 * (self.posted % QSIZE) as u64, 0u16);
        self.posted = self.posted.wrapping_add(1);
        std::sync::atomic::fence(Ordering::Release);
        self.map.write(AVAIL + 2, self.posted);
        self.kick.write(1).unwrap();
    }

    /// Waits for the used index to reach what was posted; the status byte.
    fn wait_used(&self) -> u8 {
        wait_until("the flush's completion", Duration::from_secs(10), || self.map.read::<u16>(USED + 2) == self.posted);
        self.map.read(STATUS)
    }

    fn shrink(&self) -> std::io::Result<()> {
        self.file.set_len(0)
    }

    /// The socket, to see the back end close it.
    fn socket(&self) -> UnixStream {
        // SAFETY: dup of the frontend's socket; the copy is owned by the returned stream.
        let fd = unsafe { libc::dup(self.fe.as_raw_fd()) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor that nothing else owns.
        unsafe { UnixStream::from_raw_fd(fd) }
    }
}

#[derive(Clone, Copy, Debug)]
enum When {
    /// After a request went through the running ring; then a kick.
    RingRunning,
    /// Right after SET_MEM_TABLE; then the ring is configured and enabled.
    BeforeRings,
}

/// A case whose memory could not be made (no free huge page): a failure, since the
/// hugetlbfs cases run only where build.rs found huge pages (or with `--include-ignored`).
fn missing(test: &str, why: &str) -> ! {
    panic!("{test}: {why} (build.rs marks the test ignored without it; scripts/test.sh installs it)");
}

/// A frontend shrinks its guest memory file to nothing, with the ring running or before
/// it is set up. The back end survives: that connection ends with a memory-fault error,
/// another frontend connected all along keeps working, and a new one is served.
fn shrink_memory(kind: MemKind, when: When) {
    let test = format!("shrink_memory({kind:?}, {when:?})");
    let file = match make_file(kind) {
        Ok(f) => f,
        Err(why) => missing(&test, &why),
    };
    let server = TestServer::start(8 * MIB, BlkBackendOptions::default());
    let mut healthy_dev = server.connect(&blk_options(Layout::Split, 1, 16));
    let mut healthy = healthy_dev.take_queues().remove(0);
    check_io(&mut healthy, 0);

    let mut hostile = HostileFrontend::connect(&server.socket, file);
    let mut sock = hostile.socket();
    let sealed = matches!(kind, MemKind::MemfdSealedShrink);
    match when {
        When::RingRunning => {
            hostile.start_ring().unwrap();
            hostile.post_flush();
            assert_eq!(hostile.wait_used(), 0, "{test}: the first flush");
            let shrunk = hostile.shrink();
            assert_eq!(shrunk.is_err(), sealed, "{test}: {shrunk:?}");
            if sealed {
                hostile.post_flush();
            } else {
                // Our own mapping of the file is gone too: kick without touching it.
                hostile.kick.write(1).unwrap();
            }
        }
        When::BeforeRings => {
            let shrunk = hostile.shrink();
            assert_eq!(shrunk.is_err(), sealed, "{test}: {shrunk:?}");
            let _ = hostile.start_ring();
            if sealed {
                hostile.post_flush();
            }
        }
    }
    if sealed {
        // The seal refused the shrink: nothing faults, the ring goes on.
        assert_eq!(hostile.wait_used(), 0, "{test}: a flush after the refused shrink");
        assert_eq!(server.stats.memory_faults.load(Ordering::Relaxed), 0);
    } else {
        wait_until(&format!("{test}: the memory fault"), Duration::from_secs(10), || {
            server.stats.memory_faults.load(Ordering::Relaxed) == 1
        });
        wait_closed(&mut sock, &test);
        assert_eq!(errors(&server.stats), 1, "{test}");
    }
    drop(hostile);
    drop(sock);
    check_io(&mut healthy, MIB);
    check_serves(&server.socket, 2 * MIB);
    drop(healthy);
    drop(healthy_dev);
    server.stop();
}

#[test]
fn shrunk_memfd_with_running_ring() {
    shrink_memory(MemKind::Memfd, When::RingRunning);
}

#[test]
fn shrunk_memfd_before_rings() {
    shrink_memory(MemKind::Memfd, When::BeforeRings);
}

#[test]
fn shrunk_sealed_memfd_with_running_ring() {
    shrink_memory(MemKind::MemfdSealedGrow, When::RingRunning);
}

#[test]
fn shrunk_sealed_memfd_before_rings() {
    shrink_memory(MemKind::MemfdSealedGrow, When::BeforeRings);
}

#[test]
fn memfd_sealed_against_shrinking_cannot_be_shrunk() {
    shrink_memory(MemKind::MemfdSealedShrink, When::RingRunning);
    shrink_memory(MemKind::MemfdSealedShrink, When::BeforeRings);
}

#[test]
fn shrunk_tmpfs_file_with_running_ring() {
    shrink_memory(MemKind::TmpfsFile, When::RingRunning);
}

#[test]
fn shrunk_tmpfs_file_before_rings() {
    shrink_memory(MemKind::TmpfsFile, When::BeforeRings);
}

#[test]
fn shrunk_disk_file_with_running_ring() {
    shrink_memory(MemKind::DiskFile, When::RingRunning);
}

#[test]
fn shrunk_disk_file_before_rings() {
    shrink_memory(MemKind::DiskFile, When::BeforeRings);
}

#[test]
#[cfg_attr(not(peer = "hugetlbfs"), ignore = "needs free huge pages (/proc/sys/vm/nr_hugepages)")]
fn shrunk_hugetlbfs_file_with_running_ring() {
    shrink_memory(MemKind::Hugetlbfs, When::RingRunning);
}

#[test]
#[cfg_attr(not(peer = "hugetlbfs"), ignore = "needs free huge pages (/proc/sys/vm/nr_hugepages)")]
fn shrunk_hugetlbfs_file_before_rings() {
    shrink_memory(MemKind::Hugetlbfs, When::BeforeRings);
}

// ---------------------------------------------------------------------------------------
// 2. Frontends that stall do not hold up the others.

fn header(code: u32, flags: u32, size: u32) -> Vec<u8> {
    [code.to_le_bytes(), flags.to_le_bytes(), size.to_le_bytes()].concat()
}

/// Silent frontends, one that sent half a header, one that sent half a body and one that
/// takes no replies: a well-behaved frontend is served at once, meanwhile; and each
/// stalled one is closed once the message timeout has passed.
#[test]
fn stalled_frontends_do_not_block_others() {
    let timeout = Duration::from_secs(2);
    let limits = ServerOptions { message_timeout: timeout, ..Default::default() };
    let server = TestServer::start_with_limits(8 * MIB, BlkBackendOptions::default(), limits);
    let connect = || UnixStream::connect(&server.socket).unwrap();
    let mut silent = connect();
    let mut half_header = connect();
    half_header.write_all(&header(1, 1, 0)[..5]).unwrap();
    let mut no_body = connect();
    // SET_VRING_NUM's header, without its 8 body bytes.
    no_body.write_all(&header(8, 1, 8)).unwrap();
    // GET_FEATURES again and again, never reading a reply: the back end's replies fill the
    // socket until its send blocks.
    let mut deaf = connect();
    deaf.set_nonblocking(true).unwrap();
    let get_features = header(1, 1, 0);
    let mut sent = 0;
    let mut progress = Instant::now();
    // Until the back end stops taking requests: its replies fill our receive side and its
    // send blocks.
    while progress.elapsed() < Duration::from_millis(300) {
        match deaf.write(&get_features) {
            Ok(n) => {
                sent += n;
                progress = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => panic!("{e}"),
        }
        assert!(sent < 64 << 20, "the back end takes requests without end");
    }
    eprintln!("the deaf frontend sent {} GET_FEATURES", sent / get_features.len());

    // Served meanwhile, well within the stalled ones' timeout.
    let started = Instant::now();
    check_serves(&server.socket, 0);
    eprintln!("a frontend was served in {:?} beside 4 stalled ones", started.elapsed());

    for (s, what) in [(&mut silent, "silent"), (&mut half_header, "half a header"), (&mut no_body, "no body")] {
        wait_closed(s, what);
    }
    // Still not reading: the back end hangs up.
    wait_hangup(&deaf, "deaf");
    wait_until("4 connection errors", Duration::from_secs(10), || errors(&server.stats) >= 4);
    server.stop();
}

/// Past `max_connections`, a frontend is closed at once; the ones being served go on.
#[test]
fn connections_beyond_the_limit_are_refused() {
    let limits = ServerOptions { max_connections: 2, ..Default::default() };
    let server = TestServer::start_with_limits(8 * MIB, BlkBackendOptions::default(), limits);
    let mut dev = server.connect(&blk_options(Layout::Split, 1, 16));
    let mut q = dev.take_queues().remove(0);
    let held = UnixStream::connect(&server.socket).unwrap();
    wait_until("2 active connections", Duration::from_secs(10), || {
        server.stats.connections_active.load(Ordering::Relaxed) == 2
    });
    let mut third = UnixStream::connect(&server.socket).unwrap();
    wait_closed(&mut third, "a third frontend");
    assert_eq!(server.stats.connections_refused.load(Ordering::Relaxed), 1);
    check_io(&mut q, 0);
    drop(held);
    wait_until("1 active connection", Duration::from_secs(20), || {
        server.stats.connections_active.load(Ordering::Relaxed) == 1
    });
    check_serves(&server.socket, MIB);
    drop(q);
    drop(dev);
    server.stop();
}

// ---------------------------------------------------------------------------------------
// 3. Kick and call fds that are not eventfds.

/// `/dev/zero` (always readable), a regular file and a pipe as the kick or call fd: the
/// request is refused and the connection closed, instead of a worker spinning on it.
#[test]
fn kick_and_call_fds_must_be_eventfds() {
    let server = TestServer::start(8 * MIB, BlkBackendOptions::default());
    type MakeFd = Box<dyn Fn() -> File>;
    let fds: Vec<(&str, MakeFd)> = vec![
        ("/dev/zero", Box::new(|| File::open("/dev/zero").unwrap())),
        ("a regular file", Box::new(|| tempfile::tempfile().unwrap())),
        (
            "a pipe",
            Box::new(|| {
                let mut p = [0; 2];
                // SAFETY: pipe fills the two-element array.
                assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
                // SAFETY: the write end is ours; the read end becomes the File.
                unsafe { libc::close(p[1]) };
                // SAFETY: a new descriptor that nothing else owns.
                unsafe { File::from_raw_fd(p[0]) }
            }),
        ),
    ];
    let mut expected = 0;
    for (name, make) in &fds {
        for role in ["kick", "call"] {
            let what = format!("{name} as the {role} fd");
            let fe = Frontend::connect(&server.socket, 1).unwrap();
            fe.set_owner().unwrap();
            fe.get_features().unwrap();
            fe.set_features(Features::VERSION_1.bits()).unwrap();
            let mem = memfd("kick-test", 0).unwrap();
            mem.set_len(REGION).unwrap();
            let map = Mapping::new(&mem).unwrap();
            let region = VhostUserMemoryRegionInfo {
                guest_phys_addr: GPA,
                memory_size: REGION,
                userspace_addr: map.addr(0),
                mmap_offset: 0,
                mmap_handle: mem.as_raw_fd(),
            };
            fe.set_mem_table(&[region]).unwrap();
            let _ = fe.set_vring_num(0, QSIZE);
            let _ = fe.set_vring_base(0, 0);
            let config = VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: map.addr(DESC),
                used_ring_addr: map.addr(USED),
                avail_ring_addr: map.addr(AVAIL),
                log_addr: None,
            };
            let _ = fe.set_vring_addr(0, &config);
            let bad = make();
            // SAFETY: `bad` stays open for the EventFd's life; the EventFd is forgotten
            // below, so the descriptor is closed once, by `bad`.
            let bad_as_eventfd = unsafe { EventFd::from_raw_fd(bad.as_raw_fd()) };
            let good = EventFd::new(0).unwrap();
            let (kick, call) = if role == "kick" { (&bad_as_eventfd, &good) } else { (&good, &bad_as_eventfd) };
            let _ = fe.set_vring_kick(0, kick);
            let _ = fe.set_vring_call(0, call);
            std::mem::forget(bad_as_eventfd);
            expected += 1;
            wait_until(&what, Duration::from_secs(10), || errors(&server.stats) >= expected);
            // SAFETY: dup of the frontend's socket, owned by the stream.
            let mut sock = unsafe { UnixStream::from_raw_fd(libc::dup(fe.as_raw_fd())) };
            wait_closed(&mut sock, &what);
            assert_eq!(server.stats.kicks.load(Ordering::Relaxed), 0, "{what}: a worker read it");
            drop(bad);
        }
    }
    check_serves(&server.socket, 0);
    server.stop();
}

// ---------------------------------------------------------------------------------------
// 5. A guest that sends malformed requests in a loop.

/// Requests without a writable byte (nowhere to put a status), each logged as an error:
/// past the burst, the lines of that connection are counted, not printed.
#[test]
fn malformed_requests_in_a_loop_are_rate_limited() {
    let server = TestServer::start(8 * MIB, BlkBackendOptions::default());
    let conn = Connection::connect(&server.socket, &ConnectOptions::default()).unwrap();
    let mut q = conn.create_queue::<u16>(0, 16, 0).unwrap();
    let header = conn.memory().alloc(16).unwrap();
    let printed_before = server.stats.log_lines.load(Ordering::Relaxed);
    let n = 300u64;
    for i in 0..n {
        q.vq_mut().add_sgs_premapped(&[&[header.sg()]], &[], i as u16).unwrap();
        q.kick().unwrap();
        q.wait(virtq_vhost_user::WaitMode::Sleep, Some(Instant::now() + Duration::from_secs(10))).unwrap();
        let used = q.vq_mut().get_buf().unwrap();
        assert_eq!(used.len, 0, "a request without a status byte is returned unanswered");
    }
    let printed = server.stats.log_lines.load(Ordering::Relaxed) - printed_before;
    let suppressed = server.stats.log_lines_suppressed.load(Ordering::Relaxed);
    eprintln!("{n} malformed requests: {printed} lines printed, {suppressed} suppressed");
    // One window of LOG_INTERVAL is enough here; allow three on a slow machine.
    assert!(printed <= 3 * LOG_BURST as u64, "{printed} lines printed");
    assert!(printed + suppressed >= n, "every malformed request is logged or counted");
    drop(q);
    drop(header);
    drop(conn);
    check_serves(&server.socket, 0);
    server.stop();
}
