//! The back-end framework itself, whatever the device: how it meets frontends that do
//! things in QEMU's order, and the options that shape what it offers.

mod device_util;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use device_util::{wait_until, DeviceServer};
use virtq_vhost_user::backend::ServerOptions;
use virtq_vhost_user::frontend::{ConnectOptions, Connection};
use virtq_vhost_user::net::{NetBackend, NetBackendOptions};
use virtq_vhost_user::rng::RngDevice;
use virtq_vhost_user::virtq::Features;

const GET_FEATURES: u32 = 1;
const SET_OWNER: u32 = 3;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const NEED_REPLY: u32 = 0x8;
const REPLY_ACK: u64 = 1 << 3;
const MQ: u64 = 1 << 0;

fn send(s: &mut UnixStream, request: u32, flags: u32, body: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&(1 | flags).to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    s.write_all(&m).unwrap();
}

/// Reads a reply to `request` with a u64 body.
fn reply_u64(s: &mut UnixStream, request: u32) -> u64 {
    let mut m = [0u8; 20];
    s.read_exact(&mut m).unwrap();
    assert_eq!(u32::from_le_bytes(m[0..4].try_into().unwrap()), request);
    assert_eq!(u32::from_le_bytes(m[4..8].try_into().unwrap()) & 0x4, 0x4, "not a reply");
    u64::from_le_bytes(m[12..20].try_into().unwrap())
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index.to_le_bytes(), num.to_le_bytes()].concat()
}

/// The handshake QEMU's vhost-user-net starts with: protocol features (REPLY_ACK), then
/// SET_VRING_ENABLE for its first queue pair, acknowledged, before any SET_FEATURES.
fn qemu_net_handshake(s: &mut UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send(s, SET_OWNER, 0, &[]);
    send(s, GET_FEATURES, 0, &[]);
    let offered = reply_u64(s, GET_FEATURES);
    assert_ne!(offered & (1 << 30), 0, "VHOST_USER_F_PROTOCOL_FEATURES is offered");
    send(s, GET_PROTOCOL_FEATURES, 0, &[]);
    let protocol = reply_u64(s, GET_PROTOCOL_FEATURES);
    assert_ne!(protocol & REPLY_ACK, 0);
    send(s, SET_PROTOCOL_FEATURES, NEED_REPLY, &(REPLY_ACK | MQ).to_le_bytes());
    assert_eq!(reply_u64(s, SET_PROTOCOL_FEATURES), 0);
}

/// QEMU's vhost-user-net enables rings before its first SET_FEATURES; the back end
/// acknowledges that and keeps the connection (rust-vmm's vhost crate alone refuses it).
#[test]
fn vring_enable_before_set_features_is_acknowledged() {
    let dev = NetBackend::new(NetBackendOptions::default()).unwrap();
    let server = DeviceServer::start(Arc::new(dev));
    let mut s = UnixStream::connect(&server.socket).unwrap();
    qemu_net_handshake(&mut s);
    send(&mut s, SET_VRING_ENABLE, NEED_REPLY, &vring_state(0, 1));
    assert_eq!(reply_u64(&mut s, SET_VRING_ENABLE), 0, "enabling ring 0 failed");
    send(&mut s, SET_VRING_ENABLE, 0, &vring_state(1, 1));
    // The connection still serves requests.
    send(&mut s, GET_QUEUE_NUM, 0, &[]);
    assert_eq!(reply_u64(&mut s, GET_QUEUE_NUM), 3);
    assert_eq!(server.stats.connection_errors.load(Ordering::Relaxed), 0);
    drop(s);
    server.stop();
}

/// An early SET_VRING_ENABLE that is malformed (a ring the device does not have, a value
/// other than 0 or 1) is answered with an error and ends that connection only.
#[test]
fn malformed_early_vring_enable_ends_the_connection() {
    let dev = NetBackend::new(NetBackendOptions::default()).unwrap();
    let server = DeviceServer::start(Arc::new(dev));
    for (i, (index, num)) in [(7u32, 1u32), (0, 2)].into_iter().enumerate() {
        let mut s = UnixStream::connect(&server.socket).unwrap();
        qemu_net_handshake(&mut s);
        send(&mut s, SET_VRING_ENABLE, NEED_REPLY, &vring_state(index, num));
        assert_ne!(reply_u64(&mut s, SET_VRING_ENABLE), 0, "ring {index} num {num} was accepted");
        wait_until("the connection ends with an error", Duration::from_secs(10), || {
            server.stats.connection_errors.load(Ordering::Relaxed) > i as u64
        });
    }
    // Another frontend is served.
    let conn = Connection::connect(&server.socket, &ConnectOptions::default()).unwrap();
    drop(conn);
    server.stop();
}

/// `ServerOptions::ring_features` takes ring features off the offer: without
/// RING_PACKED a frontend that would take packed rings gets split ones.
#[test]
fn ring_features_restrict_the_offer() {
    let limits = ServerOptions {
        ring_features: Features::from_bits(virtq_vhost_user::backend::RING_FEATURES)
            .difference(Features::RING_PACKED.union(Features::IN_ORDER)),
        ..Default::default()
    };
    let server = DeviceServer::start_with(Arc::new(RngDevice::new().unwrap()), limits);
    let opts = ConnectOptions { ring_packed: true, in_order: true, ..Default::default() };
    let conn = Connection::connect(&server.socket, &opts).unwrap();
    let f = conn.features();
    assert!(!f.contains(Features::RING_PACKED) && !f.contains(Features::IN_ORDER), "{f:?}");
    assert!(f.contains(Features::VERSION_1 | Features::EVENT_IDX));
    drop(conn);
    server.stop();
}
