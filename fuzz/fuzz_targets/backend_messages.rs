//! The vhost-user back end's message layer against a hostile frontend.
//!
//! The back end (`virtq_vhost_user::backend::serve_stream`, serving virtio-blk over a
//! small image) runs on a thread behind one end of a socket pair; the input is a program
//! for the frontend end: vhost-user messages (each known request with a body built from
//! the input, or an arbitrary code with arbitrary bytes), every file descriptor a small
//! memfd (an eventfd where the input asks, so that rings can start and be kicked), and
//! between messages: writes into a memfd (ring contents), kicks, and shrinking a memfd
//! under the back end's mappings (the `SIGBUS` guard).
//!
//! After each message the harness sends `GET_FEATURES` and reads replies up to its answer,
//! so every message is handled before the next step: the program runs the same way each
//! time (ring workers excepted). The framing is always consistent (the size field is the
//! body's length); what is in the body, the fds and the order are the input's.
//!
//! Checked: no panic, no hang (operations bounded; libFuzzer's timeout catches a back end
//! that stops answering), no memory error (AddressSanitizer), the process survives a
//! shrunk memfd, and the connection ends cleanly (no connection left counted as active).

#![no_main]

mod common;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::Input;
use libfuzzer_sys::fuzz_target;
use virtq_vhost_user::backend::blk::{BlkBackend, BlkBackendOptions};
use virtq_vhost_user::backend::{serve_stream, ServerOptions, Stats};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MAX_OPS: usize = 48;
const MAX_FDS: usize = 8;
/// Frontend virtual addresses of the regions: region `k` at `VA + k * VA_STEP`.
const VA: u64 = 0x7f00_0000_0000;
const VA_STEP: u64 = 0x10_0000;
/// Guest physical addresses: region `k` at `GPA_STEP * k`.
const GPA_STEP: u64 = 0x10_0000;

// vhost-user request codes.
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const RESET_OWNER: u32 = 4;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const GET_INFLIGHT_FD: u32 = 31;
const RESET_DEVICE: u32 = 34;
const GET_MAX_MEM_SLOTS: u32 = 36;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;

const KNOWN: [u32; 24] = [
    SET_OWNER,
    GET_FEATURES,
    SET_FEATURES,
    GET_PROTOCOL_FEATURES,
    SET_PROTOCOL_FEATURES,
    GET_QUEUE_NUM,
    SET_MEM_TABLE,
    SET_VRING_NUM,
    SET_VRING_ADDR,
    SET_VRING_BASE,
    GET_VRING_BASE,
    SET_VRING_KICK,
    SET_VRING_CALL,
    SET_VRING_ERR,
    SET_VRING_ENABLE,
    GET_CONFIG,
    SET_CONFIG,
    RESET_OWNER,
    RESET_DEVICE,
    GET_MAX_MEM_SLOTS,
    ADD_MEM_REG,
    REM_MEM_REG,
    GET_INFLIGHT_FD,
    SET_LOG_BASE,
];

/// The device, made once: a 1 MiB image on tmpfs.
fn device() -> Arc<BlkBackend> {
    static DEVICE: OnceLock<Arc<BlkBackend>> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            // Thousands of connections a second: no log lines (VIRTQ_LOG=debug to trace an
            // input).
            if std::env::var_os("VIRTQ_LOG").is_none() {
                std::env::set_var("VIRTQ_LOG", "off");
            }
            let image = memfd(1 << 20);
            let opts = BlkBackendOptions { queues: 2, ..Default::default() };
            Arc::new(BlkBackend::from_file(image, &opts).expect("image"))
        })
        .clone()
}

fn memfd(len: u64) -> File {
    // SAFETY: a valid NUL-terminated name; no other memory arguments.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a new descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("memfd size");
    f
}

/// The frontend's side: the socket, the memfds it has sent (to poke and shrink), the
/// eventfds it has sent as kicks.
struct Frontend {
    sock: UnixStream,
    memfds: Vec<File>,
    kicks: Vec<EventFd>,
    /// Fds of the message being built (kept open until it is sent).
    fds: Vec<File>,
}

impl Frontend {
    /// A new memfd of 4 KiB to 64 KiB, attached to the message.
    fn attach_memfd(&mut self, input: &mut Input) {
        let len = memfd_len(input);
        self.attach_file(len, input);
    }

    /// A new memfd of `len` bytes holding some of the input (ring contents), attached to
    /// the message.
    fn attach_file(&mut self, len: u64, input: &mut Input) {
        let f = memfd(len);
        let at = 64 * (input.u8() as u64 % 64);
        let n = input.u8() as usize;
        let _ = f.write_at(input.bytes(n), at);
        self.fds.push(f.try_clone().expect("dup"));
        self.memfds.push(f);
    }

    /// The fd of SET_VRING_KICK/CALL/ERR: a memfd, or an eventfd (which rings need).
    fn attach_vring_fd(&mut self, input: &mut Input) {
        if input.bool() {
            let e = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            // SAFETY: dup of our eventfd; the copy is owned by the File.
            self.fds.push(unsafe { File::from_raw_fd(libc::dup(e.as_raw_fd())) });
            self.kicks.push(e);
        } else {
            self.attach_memfd(input);
        }
    }

    /// Sends one message; false if the back end has closed the connection.
    fn send(&mut self, code: u32, flags: u32, body: &[u8]) -> bool {
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        let fds: Vec<RawFd> = self.fds.iter().map(|f| f.as_raw_fd()).collect();
        let r = self.sock.send_with_fds(&[&msg[..]], &fds);
        self.fds.clear();
        matches!(r, Ok(n) if n == msg.len())
    }

    /// Sends GET_FEATURES and reads replies up to its answer: every earlier message has
    /// been handled. `pending` GET_FEATURES replies are due before it. False if the back end
    /// closed the connection.
    fn sync(&mut self, mut pending: u32) -> bool {
        if !self.send(GET_FEATURES, 1, &[]) {
            return false;
        }
        pending += 1;
        while pending > 0 {
            let mut header = [0u8; 12];
            if self.sock.read_exact(&mut header).is_err() {
                return false;
            }
            let code = u32::from_le_bytes(header[0..4].try_into().unwrap());
            let size = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
            let mut body = vec![0u8; size.min(1 << 16)];
            if self.sock.read_exact(&mut body).is_err() {
                return false;
            }
            if code == GET_FEATURES {
                pending -= 1;
            }
        }
        true
    }
}

/// A memfd's length: 4 KiB to 64 KiB.
fn memfd_len(input: &mut Input) -> u64 {
    4096 * (1 + input.u8() as u64 % 16)
}

/// One time in eight: take an arbitrary value instead of the usual one.
fn rare(input: &mut Input) -> bool {
    input.u8().is_multiple_of(8)
}

fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

/// A frontend address: mostly inside region `k`'s range, sometimes anything.
fn va(input: &mut Input) -> u64 {
    match input.u8() % 8 {
        0 => input.u64(),
        _ => VA + VA_STEP * (input.u8() % 3) as u64 + 16 * (input.u16() as u64 % 4096),
    }
}

/// The body (and fds) of a known request.
fn body(fe: &mut Frontend, code: u32, input: &mut Input) -> Vec<u8> {
    let mut b = Vec::new();
    match code {
        SET_FEATURES => {
            // VERSION_1 and the protocol-feature bit usually, the ring bits as the input says.
            // INDIRECT_DESC, EVENT_IDX (28, 29); ACCESS_PLATFORM, RING_PACKED, IN_ORDER (33..36).
            let ring = (input.u8() as u64 & 0x3) << 28 | (input.u8() as u64 & 0x7) << 33;
            // The blk bits serve-blk offers: SEG_MAX, BLK_SIZE, FLUSH, MQ, DISCARD, WRITE_ZEROES.
            let f = if rare(input) { input.u64() } else { 1 << 32 | 1 << 30 | ring | 0x7244 };
            put64(&mut b, f);
        }
        SET_PROTOCOL_FEATURES => put64(&mut b, if input.bool() { 0x201 } else { input.u64() }),
        SET_MEM_TABLE => {
            let n = match input.u8() % 8 {
                0 => input.u8() as u32 % 10,
                _ => 1 + input.u8() as u32 % 3,
            };
            put32(&mut b, n);
            put32(&mut b, 0);
            for k in 0..n as u64 {
                let len = memfd_len(input);
                let size = if rare(input) { input.u64() } else { len };
                put64(&mut b, if rare(input) { input.u64() } else { GPA_STEP * k });
                put64(&mut b, size);
                put64(&mut b, if rare(input) { input.u64() } else { VA + VA_STEP * k });
                put64(&mut b, if rare(input) { input.u64() } else { 0 });
                // The file, `len` bytes (the table may claim more).
                fe.attach_file(len, input);
            }
            // Sometimes one fd too many or too few.
            match input.u8() % 16 {
                0 => fe.attach_memfd(input),
                1 => {
                    fe.fds.pop();
                }
                _ => {}
            }
        }
        SET_VRING_NUM | SET_VRING_BASE | GET_VRING_BASE | SET_VRING_ENABLE => {
            put32(&mut b, input.u8() as u32 % 3);
            let num = match (code, input.u8() % 4) {
                (SET_VRING_NUM, 0) => input.u32(),
                (SET_VRING_NUM, _) => 1 << (input.u8() % 9),
                (SET_VRING_BASE, 0) => 0x8000_8000,
                (SET_VRING_ENABLE, _) => input.u8() as u32 % 2,
                _ => input.u32(),
            };
            put32(&mut b, num);
        }
        SET_VRING_ADDR => {
            put32(&mut b, input.u8() as u32 % 3);
            put32(&mut b, if rare(input) { input.u32() } else { 0 });
            for _ in 0..3 {
                put64(&mut b, va(input));
            }
            put64(&mut b, 0);
        }
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => {
            let index = input.u8() as u64 % 3;
            // Bit 8: no fd (polling).
            if input.u8().is_multiple_of(4) {
                put64(&mut b, index | 0x100);
            } else {
                put64(&mut b, index);
                fe.attach_vring_fd(input);
            }
        }
        GET_CONFIG | SET_CONFIG => {
            let offset = input.u8() as u32 % 80;
            let size = if rare(input) { input.u32() % 300 } else { input.u8() as u32 % 64 };
            put32(&mut b, offset);
            put32(&mut b, size);
            put32(&mut b, 0);
            b.resize(12 + size.min(300) as usize, 0);
        }
        ADD_MEM_REG | REM_MEM_REG => {
            put64(&mut b, 0);
            for _ in 0..4 {
                put64(&mut b, input.u64());
            }
            if code == ADD_MEM_REG {
                fe.attach_memfd(input);
            }
        }
        SET_LOG_BASE => {
            put64(&mut b, input.u64());
            put64(&mut b, input.u64());
            fe.attach_memfd(input);
        }
        _ => {}
    }
    b
}

fuzz_target!(|data: &[u8]| {
    let device = device();
    let mut input = Input::new(data);
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let stats = Arc::new(Stats::default());
    let server = {
        let stats = stats.clone();
        // A short message timeout: a program that stalls the back end costs little.
        let opts = ServerOptions { message_timeout: Duration::from_millis(200), ..Default::default() };
        std::thread::spawn(move || serve_stream(theirs, device, stats, &opts))
    };
    let mut fe = Frontend { sock: ours, memfds: Vec::new(), kicks: Vec::new(), fds: Vec::new() };
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        let alive = match op % 16 {
            // Shrink a memfd under the back end's mapping.
            0 => {
                if let Some(f) = fe.memfds.get(input.u8() as usize % fe.memfds.len().max(1)) {
                    let _ = f.set_len(4096 * (input.u8() as u64 % 4));
                }
                true
            }
            // Write into a memfd (rings, buffers).
            1 => {
                if let Some(f) = fe.memfds.get(input.u8() as usize % fe.memfds.len().max(1)) {
                    let at = 16 * input.u16() as u64 % (64 << 10);
                    let n = 1 + input.u8() as usize % 64;
                    let _ = f.write_at(input.bytes(n), at);
                }
                true
            }
            // Kick, and give a worker a moment to take it (up to 5 ms), so that the ring is
            // usually served before the next message.
            2 => {
                if let Some(k) = fe.kicks.get(input.u8() as usize % fe.kicks.len().max(1)) {
                    let _ = k.write(1);
                    for _ in 0..50 {
                        let mut p = libc::pollfd { fd: k.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                        // SAFETY: one valid pollfd, no wait.
                        if unsafe { libc::poll(&mut p, 1, 0) } == 0 {
                            break;
                        }
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
                true
            }
            // Any request code, any body, a few memfds.
            3 => {
                let code = input.u8() as u32 % 48;
                let flags = if input.bool() { 1 } else { input.u32() };
                let len = input.u8() as usize % 64;
                let body = input.bytes(len).to_vec();
                for _ in 0..input.u8() % 3 {
                    fe.attach_memfd(&mut input);
                }
                fe.send(code, flags, &body) && fe.sync((code == GET_FEATURES) as u32)
            }
            // A known request with a body built for it.
            _ => {
                let code = KNOWN[input.u8() as usize % KNOWN.len()];
                // Version 1; sometimes NEED_REPLY; rarely anything.
                let flags = match input.u8() % 16 {
                    0 => input.u32(),
                    1..=4 => 1 | 8,
                    _ => 1,
                };
                let body = body(&mut fe, code, &mut input);
                fe.fds.truncate(MAX_FDS);
                fe.send(code, flags, &body) && fe.sync((code == GET_FEATURES) as u32)
            }
        };
        if !alive {
            break;
        }
    }
    // The frontend goes away; the back end stops every ring and returns.
    let _ = fe.sock.shutdown(std::net::Shutdown::Both);
    let end = server.join().expect("the back end panicked");
    assert_eq!(stats.connections_active.load(Ordering::Relaxed), 0, "{end}");
    drop(fe);
});
