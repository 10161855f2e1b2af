//! A vhost-user-blk back end that speaks just enough of the protocol for a frontend to
//! connect and set up its rings, with scripted misbehaviour: a malformed `GET_CONFIG`
//! reply, a `GET_VRING_BASE` answered late or never. It serves no ring, so no request ever
//! completes. Shared by the driver tests and the CLI tests (`#[path]`).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How to answer `GET_CONFIG`.
#[derive(Clone, Debug)]
pub enum ConfigReply {
    /// The config space asked for.
    Proper,
    /// These bytes, whatever they are (a whole reply or a piece of one), then silence.
    Raw(Vec<u8>),
}

/// How to answer `GET_VRING_BASE`.
#[derive(Clone, Copy, Debug)]
pub enum VringBaseReply {
    At,
    After(Duration),
    Never,
}

/// What the fake back end does.
#[derive(Clone, Debug)]
pub struct Script {
    /// virtio-blk feature bits offered (VERSION_1 and the protocol-feature bit are added).
    pub device_features: u64,
    pub num_queues: u16,
    /// Capacity in sectors, in the config space.
    pub capacity: u64,
    pub config: ConfigReply,
    pub vring_base: VringBaseReply,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            device_features: 1 << 12, // MQ
            num_queues: 1,
            capacity: 2048,
            config: ConfigReply::Proper,
            vring_base: VringBaseReply::At,
        }
    }
}

const GET_FEATURES: u32 = 1;
const GET_VRING_BASE: u32 = 11;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_QUEUE_NUM: u32 = 17;
const GET_CONFIG: u32 = 24;

/// A reply header: version 1 with the reply bit.
pub fn reply_header(code: u32, size: u32) -> Vec<u8> {
    [code.to_le_bytes(), 5u32.to_le_bytes(), size.to_le_bytes()].concat()
}

fn u64_reply(code: u32, v: u64) -> Vec<u8> {
    [reply_header(code, 8), v.to_le_bytes().to_vec()].concat()
}

/// The virtio-blk config space of `script`.
fn config_space(script: &Script) -> Vec<u8> {
    let mut c = vec![0u8; 256];
    c[0..8].copy_from_slice(&script.capacity.to_le_bytes());
    c[34..36].copy_from_slice(&script.num_queues.to_le_bytes());
    c
}

/// A running fake back end; stops accepting when dropped.
pub struct FakeBackend {
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeBackend {
    pub fn start(dir: &Path, script: Script) -> Self {
        let socket = dir.join("fake-blk.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let script = script.clone();
                        s.set_nonblocking(false).unwrap();
                        std::thread::spawn(move || serve(s, &script));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { socket, stop, thread: Some(thread) }
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one frontend until it goes away. Requests without a reply of their own are
/// not acknowledged (REPLY_ACK is not offered).
fn serve(mut s: UnixStream, script: &Script) {
    loop {
        let mut header = [0u8; 12];
        if s.read_exact(&mut header).is_err() {
            return;
        }
        let code = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let size = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
        let mut body = vec![0u8; size];
        if s.read_exact(&mut body).is_err() {
            return;
        }
        let reply = match code {
            GET_FEATURES => u64_reply(code, (1 << 32) | (1 << 30) | script.device_features),
            // MQ and CONFIG.
            GET_PROTOCOL_FEATURES => u64_reply(code, (1 << 0) | (1 << 9)),
            GET_QUEUE_NUM => u64_reply(code, script.num_queues as u64),
            GET_CONFIG => match &script.config {
                ConfigReply::Raw(bytes) => bytes.clone(),
                ConfigReply::Proper => {
                    let offset = u32::from_le_bytes(body[0..4].try_into().unwrap()) as usize;
                    let len = u32::from_le_bytes(body[4..8].try_into().unwrap()) as usize;
                    let space = config_space(script);
                    let mut r = reply_header(code, (12 + len) as u32);
                    r.extend_from_slice(&body[0..12]);
                    r.extend_from_slice(&space[offset..offset + len]);
                    r
                }
            },
            GET_VRING_BASE => {
                match script.vring_base {
                    VringBaseReply::At => {}
                    VringBaseReply::After(d) => std::thread::sleep(d),
                    VringBaseReply::Never => continue,
                }
                // { index, num }: the index asked about, base 0.
                [reply_header(code, 8), body[0..4].to_vec(), 0u32.to_le_bytes().to_vec()].concat()
            }
            _ => continue,
        };
        if s.write_all(&reply).is_err() {
            return;
        }
    }
}
