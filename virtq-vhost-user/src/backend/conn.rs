//! One frontend connection: the vhost-user requests, as rust-vmm's `vhost` crate decodes
//! them (`BackendReqHandler` calls [`VhostUserBackendReqHandlerMut`] through a mutex).
//!
//! A ring runs (has a worker thread) while it has a size, addresses, a kick, memory and
//! negotiated features, and is enabled (`SET_VRING_ENABLE`, or always when
//! `VHOST_USER_F_PROTOCOL_FEATURES` was not negotiated). Every request that changes one of
//! these re-evaluates the rings it touches ([`ConnState::reconcile`]); a request that
//! replaces something a running ring uses (the memory table, the kick fd, the addresses)
//! stops the worker first and starts a new one where the old one stopped.
//!
//! Any request this back end cannot honour fails; the connection loop then logs the error
//! and closes the connection.
//!
//! Kick, call and error fds must be eventfds: anything else (`/dev/zero`, a regular file,
//! a pipe) is refused at `SET_VRING_KICK` / `SET_VRING_CALL` / `SET_VRING_ERR`, since a
//! worker sleeping on a kick fd that is always readable would spin.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtq::{DeviceConfig, DeviceQueue, Features, LayoutKind};
use vmm_sys_util::eventfd::EventFd;

use super::log::ConnLog;
use super::memory::{GuestMemoryMap, MemoryFault};
use super::vring::{decode_base, encode_base, set_nonblocking, RingAddrs, Vring};
use super::worker::{RingStart, WorkerLinks, WorkerThread};
use super::{Device, Stats, CONFIG_SPACE_MAX, MAX_QUEUE_SIZE, VHOST_USER_F_PROTOCOL_FEATURES};
use crate::watchdog::Watchdog;

/// The ring features this back end offers on top of the device's own.
pub const RING_FEATURES: u64 = Features::VERSION_1.bits()
    | Features::RING_PACKED.bits()
    | Features::IN_ORDER.bits()
    | Features::EVENT_IDX.bits()
    | Features::INDIRECT_DESC.bits();

/// The protocol features offered (`REPLY_ACK` is added by the `vhost` crate).
pub(crate) fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
}

fn invalid(what: &'static str) -> VuError {
    VuError::InvalidOperation(what)
}

/// What a connection's state shares with the connection loop and the workers.
pub(crate) struct ConnLinks {
    /// The connection's log (and its rate limit), entered by each worker.
    pub log: Arc<ConnLog>,
    /// Written by a worker whose guest memory faulted, to wake the connection loop.
    pub fault_event: Arc<EventFd>,
    /// The deadline on the frontend's message, paused while workers stop.
    pub watchdog: Arc<Watchdog>,
    /// Busy-polling window of the workers (`ServerOptions::poll`).
    pub poll: Duration,
    /// The ring features offered (`ServerOptions::ring_features`).
    pub ring_features: Features,
}

/// Rings served by one worker thread (see [`Device::queue_groups`]).
struct Group {
    queues: Vec<u16>,
    /// The rings the worker serves, while it runs.
    running: Vec<u16>,
    worker: Option<WorkerThread>,
}

/// The state of one connection.
pub(crate) struct ConnState {
    device: Arc<dyn Device>,
    stats: Arc<Stats>,
    links: ConnLinks,
    offered: u64,
    acked: Option<u64>,
    /// `SET_PROTOCOL_FEATURES`.
    protocol_acked: u64,
    memory: Option<Arc<GuestMemoryMap>>,
    /// A fault on a memory table that has since been replaced.
    memory_fault: Option<MemoryFault>,
    vrings: Vec<Vring>,
    groups: Vec<Group>,
    /// The group of each ring.
    group_of: Vec<usize>,
}

/// Refuses a kick, call or error descriptor that is not an eventfd. The kernel names each
/// open file in `/proc/self/fd`; an eventfd is the anonymous inode `[eventfd]` (fstat cannot
/// tell it from a timerfd or signalfd, which share that inode).
fn check_eventfd(f: &File, what: &str, index: u32) -> VuResult<()> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()));
    match link {
        Ok(l) if l.as_os_str() == "anon_inode:[eventfd]" => Ok(()),
        Ok(l) => {
            log_error!("queue {index}: the {what} fd is not an eventfd but {}; refused", l.display());
            Err(VuError::InvalidParam)
        }
        Err(e) => {
            log_error!("queue {index}: cannot tell whether the {what} fd is an eventfd (/proc/self/fd: {e}); refused");
            Err(VuError::InvalidParam)
        }
    }
}

/// The device's queue groups, checked: every queue in exactly one group. A queue the device
/// left out, or named twice, is served alone (and the mistake logged).
fn plan_groups(device: &dyn Device) -> (Vec<Group>, Vec<usize>) {
    let n = device.num_queues() as usize;
    let mut group_of = vec![usize::MAX; n];
    let mut groups = Vec::new();
    for queues in device.queue_groups() {
        let mut mine = Vec::new();
        for q in queues {
            match group_of.get(q as usize) {
                Some(&usize::MAX) => {
                    group_of[q as usize] = groups.len();
                    mine.push(q);
                }
                _ => log_error!("device: queue group names queue {q} twice or out of range (the device has {n})"),
            }
        }
        if !mine.is_empty() {
            groups.push(Group { queues: mine, running: Vec::new(), worker: None });
        }
    }
    for (q, g) in group_of.iter_mut().enumerate() {
        if *g == usize::MAX {
            *g = groups.len();
            groups.push(Group { queues: vec![q as u16], running: Vec::new(), worker: None });
        }
    }
    (groups, group_of)
}

impl ConnState {
    pub fn new(device: Arc<dyn Device>, stats: Arc<Stats>, links: ConnLinks) -> Self {
        let ring = (links.ring_features.bits() & RING_FEATURES) | Features::VERSION_1.bits();
        let offered = device.device_features() | ring | VHOST_USER_F_PROTOCOL_FEATURES;
        let vrings = (0..device.num_queues()).map(|_| Vring::new()).collect();
        let (groups, group_of) = plan_groups(&*device);
        Self {
            device,
            stats,
            links,
            offered,
            acked: None,
            protocol_acked: 0,
            memory: None,
            memory_fault: None,
            vrings,
            groups,
            group_of,
        }
    }

    /// Guest memory that faulted under this connection, now or in a table since replaced.
    pub fn memory_fault(&self) -> Option<MemoryFault> {
        self.memory_fault.clone().or_else(|| self.memory.as_ref().and_then(|m| m.fault()))
    }

    fn packed(&self) -> bool {
        self.acked.is_some_and(|f| f & Features::RING_PACKED.bits() != 0)
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        let n = self.vrings.len();
        self.vrings.get_mut(index as usize).ok_or_else(|| {
            log_error!("the frontend named queue {index}; the device has {n}");
            VuError::InvalidParam
        })
    }

    /// Whether ring `index` is being served.
    fn is_running(&self, index: usize) -> bool {
        self.groups[self.group_of[index]].running.contains(&(index as u16))
    }

    /// Stops every worker (the connection ends, or something they all use changes).
    pub fn stop_all(&mut self) {
        for g in 0..self.groups.len() {
            self.stop_group(g);
        }
    }

    /// Stops the worker of group `g`, if it runs, and records where each of its rings
    /// stopped. Stopping waits for the pass it is in: the frontend's deadline does not run
    /// meanwhile.
    fn stop_group(&mut self, g: usize) {
        let packed = self.packed();
        let group = &mut self.groups[g];
        let Some(worker) = group.worker.take() else { return };
        group.running.clear();
        let _paused = self.links.watchdog.pause();
        match worker.stop() {
            Ok(exits) => {
                for exit in exits {
                    let v = &mut self.vrings[exit.index as usize];
                    v.base = encode_base(exit.avail_base, exit.used_base, packed);
                    log_debug!(
                        "queue {}: stopped after {} requests (base {:#x}{})",
                        exit.index,
                        exit.chains,
                        v.base,
                        exit.fault.map(|f| format!(", broken: {f}")).unwrap_or_default()
                    );
                }
            }
            Err(()) => log_error!("queues {:?}: the worker thread panicked", group.queues),
        }
    }

    /// Whether ring `index` has everything it needs to run.
    fn ready(&self, index: usize) -> bool {
        let protocol_ext = self.acked.is_some_and(|f| f & VHOST_USER_F_PROTOCOL_FEATURES != 0);
        let v = &self.vrings[index];
        self.memory.is_some()
            && self.acked.is_some()
            && v.size != 0
            && v.addrs.is_some()
            && v.kick.is_some()
            && (v.enabled || !protocol_ext)
    }

    /// Starts, restarts or stops the worker of ring `index`'s group so that it serves
    /// exactly the group's rings that are ready.
    fn reconcile(&mut self, index: usize) -> VuResult<()> {
        self.reconcile_group(self.group_of[index])
    }

    fn reconcile_group(&mut self, g: usize) -> VuResult<()> {
        let ready: Vec<u16> = self.groups[g].queues.iter().copied().filter(|&q| self.ready(q as usize)).collect();
        let group = &self.groups[g];
        if group.worker.is_some() && group.running == ready {
            return Ok(());
        }
        self.stop_group(g);
        if ready.is_empty() {
            return Ok(());
        }
        self.start_group(g, ready)
    }

    /// Where ring `index` lives, checked: its addresses translated, the ring attached once
    /// (so that an error fails the request that made the ring ready).
    fn ring_start(&self, index: usize, mem: &GuestMemoryMap, features: Features) -> VuResult<RingStart> {
        let packed = features.contains(Features::RING_PACKED);
        let v = &self.vrings[index];
        let (Some(addrs), Some(kick)) = (v.addrs, v.kick.clone()) else { return Err(VuError::InvalidParam) };
        let gpa = |va: u64, what: &str| {
            mem.va_to_gpa(va).ok_or_else(|| {
                log_error!("queue {index}: the {what} address {va:#x} is not in any memory region");
                VuError::InvalidParam
            })
        };
        let (avail_base, used_base) = decode_base(v.base, packed);
        let config = DeviceConfig {
            size: v.size,
            features,
            desc_addr: gpa(addrs.desc, "descriptor")?,
            avail_addr: gpa(addrs.avail, "driver area")?,
            used_addr: gpa(addrs.used, "device area")?,
            avail_base,
            used_base,
        };
        // Validate here, where an error can fail the request; the worker attaches again.
        let attached = DeviceQueue::new(mem, config).map(drop);
        // Attaching reads the ring: guest memory that faulted fails the request.
        if let Some(f) = mem.fault() {
            log_error!("queue {index}: {f}");
            return Err(VuError::InvalidParam);
        }
        if let Err(e) = attached {
            log_error!("queue {index}: cannot serve the ring ({config:?}): {e}");
            return Err(VuError::InvalidParam);
        }
        Ok(RingStart { index: index as u16, config, kick, call: v.call.clone(), err: v.err.clone() })
    }

    fn start_group(&mut self, g: usize, ready: Vec<u16>) -> VuResult<()> {
        let (Some(mem), Some(acked)) = (self.memory.clone(), self.acked) else { return Ok(()) };
        let features = Features::from_bits(acked);
        let starts =
            ready.iter().map(|&q| self.ring_start(q as usize, &mem, features)).collect::<VuResult<Vec<_>>>()?;
        let worker = self.device.worker(&self.groups[g].queues, features);
        let links = WorkerLinks {
            stats: self.stats.clone(),
            log: self.links.log.clone(),
            fault_event: self.links.fault_event.clone(),
            poll: self.links.poll,
        };
        let name = format!("vq{}", ready[0]);
        let thread = WorkerThread::spawn(name, mem, starts, worker, links).map_err(|e| {
            log_error!("queues {ready:?}: cannot start a worker thread: {e}");
            VuError::ReqHandlerError(e)
        })?;
        for &q in &ready {
            let v = &self.vrings[q as usize];
            log_debug!(
                "queue {q}: started, {} ring of {} entries, base {:#x}",
                LayoutKind::from_features(features).name(),
                v.size,
                v.base
            );
        }
        let group = &mut self.groups[g];
        group.worker = Some(thread);
        group.running = ready;
        Ok(())
    }

    fn reconcile_all(&mut self) -> VuResult<()> {
        for g in 0..self.groups.len() {
            self.reconcile_group(g)?;
        }
        Ok(())
    }

    /// Replaces the memory table (the workers are stopped), keeping a fault of the old one.
    fn replace_memory(&mut self, memory: Option<Arc<GuestMemoryMap>>) {
        if self.memory_fault.is_none() {
            self.memory_fault = self.memory.as_ref().and_then(|m| m.fault());
        }
        self.memory = memory;
    }

    fn reset(&mut self) {
        self.stop_all();
        let n = self.vrings.len();
        self.vrings = (0..n).map(|_| Vring::new()).collect();
        self.acked = None;
    }
}

/// `VHOST_USER_SET_VRING_ENABLE`.
const SET_VRING_ENABLE: u32 = 18;
/// Header flags: the version (1), a reply, a reply wanted.
const HDR_VERSION: u32 = 0x1;
const HDR_REPLY: u32 = 0x4;
const HDR_NEED_REPLY: u32 = 0x8;

/// Takes a `SET_VRING_ENABLE` that comes before the first `SET_FEATURES` off the socket
/// and handles it here; `Ok(false)` if the next message is anything else.
///
/// QEMU's vhost-user-net enables its first queue pair as soon as it connects, before it
/// sends any `SET_FEATURES` (it counts `VHOST_USER_F_PROTOCOL_FEATURES` as negotiated
/// once offered and the protocol features are set). rust-vmm's `vhost` crate refuses
/// that message until `SET_FEATURES` has acked the bit, which would end the connection;
/// so until then the next message is peeked, and this one alone is read and answered
/// here, as the crate would (an acknowledgement if `NEED_REPLY` was asked for with
/// `REPLY_ACK` negotiated).
pub(crate) fn take_early_vring_enable(sock: RawFd, state: &Mutex<ConnState>) -> VuResult<bool> {
    let (protocol_ext, reply_ack) = {
        let s = state.lock().unwrap_or_else(|e| e.into_inner());
        let acked = s.acked.is_some_and(|f| f & VHOST_USER_F_PROTOCOL_FEATURES != 0);
        (acked, s.protocol_acked & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0)
    };
    if protocol_ext {
        return Ok(false);
    }
    let mut msg = [0u8; 20];
    let peeked = recv(sock, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT).map_err(VuError::SocketError)?;
    let word = |m: &[u8; 20], i: usize| u32::from_le_bytes([m[i], m[i + 1], m[i + 2], m[i + 3]]);
    let (request, flags, size) = (word(&msg, 0), word(&msg, 4), word(&msg, 8));
    if peeked < msg.len() || request != SET_VRING_ENABLE || flags & 0x3 != HDR_VERSION || size != 8 {
        return Ok(false);
    }
    // The 20 bytes are there (peeked); nothing else reads this socket.
    let got = recv(sock, &mut msg, libc::MSG_DONTWAIT).map_err(VuError::SocketError)?;
    if got != msg.len() {
        return Err(VuError::PartialMessage);
    }
    let (index, num) = (word(&msg, 12), word(&msg, 16));
    let r = match num {
        0 | 1 => state.lock().unwrap_or_else(|e| e.into_inner()).set_vring_enable(index, num == 1),
        _ => Err(VuError::InvalidParam),
    };
    if flags & HDR_NEED_REPLY != 0 && reply_ack {
        let mut reply = [0u8; 20];
        reply[0..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
        reply[4..8].copy_from_slice(&(HDR_VERSION | HDR_REPLY).to_le_bytes());
        reply[8..12].copy_from_slice(&8u32.to_le_bytes());
        reply[12..20].copy_from_slice(&u64::from(r.is_err()).to_le_bytes());
        // SAFETY: send(2) of a local buffer on a socket we hold open.
        let n = unsafe { libc::send(sock, reply.as_ptr().cast(), reply.len(), libc::MSG_NOSIGNAL) };
        if n != reply.len() as isize {
            return Err(VuError::SocketError(std::io::Error::last_os_error()));
        }
    }
    r.map(|()| true)
}

fn recv(sock: RawFd, buf: &mut [u8], flags: libc::c_int) -> std::io::Result<usize> {
    loop {
        // SAFETY: recv(2) into a local buffer of `buf.len()` bytes.
        let n = unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        self.stop_all();
    }
}

impl VhostUserBackendReqHandlerMut for ConnState {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let extra = features & !self.offered;
        if extra != 0 {
            log_error!("the frontend acked features {extra:#x} that were not offered");
            return Err(VuError::InvalidParam);
        }
        if features & Features::VERSION_1.bits() == 0 {
            log_error!("the frontend did not accept VERSION_1 (legacy devices are not supported)");
            return Err(VuError::InvalidParam);
        }
        if self.acked != Some(features) {
            // A running ring keeps the layout it started with: restart them all.
            self.stop_all();
            self.acked = Some(features);
            log_debug!("features {:?} (device bits {:#x})", Features::from_bits(features), features & 0xff_ffff);
        }
        self.reconcile_all()
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let mem = GuestMemoryMap::map(ctx, files).map_err(|e| {
            log_error!("SET_MEM_TABLE: {e}");
            VuError::InvalidParam
        })?;
        log_debug!("memory table: {mem:?}");
        // Workers borrow the old table: stop them before it goes.
        self.stop_all();
        self.replace_memory(Some(Arc::new(mem)));
        self.reconcile_all()?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        self.vring(index)?;
        if num == 0 || num > MAX_QUEUE_SIZE as u32 {
            log_error!("queue {index}: size {num} is out of range (1 to {MAX_QUEUE_SIZE})");
            return Err(VuError::InvalidParam);
        }
        if self.is_running(index as usize) {
            return Err(invalid("SET_VRING_NUM on a running ring"));
        }
        self.vrings[index as usize].size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        if flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG) {
            return Err(invalid("dirty logging is not supported"));
        }
        self.vring(index)?;
        // Addresses may change on a running ring: restart it on the new ones.
        self.stop_group(self.group_of[index as usize]);
        self.vrings[index as usize].addrs = Some(RingAddrs { desc: descriptor, avail: available, used });
        self.reconcile(index as usize)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.vring(index)?;
        if self.is_running(index as usize) {
            return Err(invalid("SET_VRING_BASE on a running ring"));
        }
        self.vrings[index as usize].base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        // GET_VRING_BASE stops the ring; the next SET_VRING_KICK starts it again. The
        // other rings of its group go on.
        let g = self.group_of[index as usize];
        self.stop_group(g);
        self.vrings[index as usize].kick = None;
        let base = self.vrings[index as usize].base;
        self.reconcile_group(g)?;
        Ok(VhostUserVringState::new(index, base))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(index as u32)?;
        if let Some(f) = &fd {
            check_eventfd(f, "kick", index as u32)?;
            set_nonblocking(f).map_err(VuError::ReqHandlerError)?;
        }
        self.stop_group(self.group_of[index as usize]);
        self.vrings[index as usize].kick = Some(fd.map(Arc::new));
        self.reconcile(index as usize)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(index as u32)?;
        if let Some(f) = &fd {
            check_eventfd(f, "call", index as u32)?;
            set_nonblocking(f).map_err(VuError::ReqHandlerError)?;
        }
        self.vrings[index as usize].call.set(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(index as u32)?;
        if let Some(f) = &fd {
            check_eventfd(f, "error", index as u32)?;
            set_nonblocking(f).map_err(VuError::ReqHandlerError)?;
        }
        self.vrings[index as usize].err.set(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let known = (protocol_features() | VhostUserProtocolFeatures::REPLY_ACK).bits();
        if features & !known != 0 {
            log_error!("the frontend acked protocol features {:#x} that were not offered", features & !known);
            return Err(VuError::InvalidParam);
        }
        self.protocol_acked = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.vring(index)?.enabled = enable;
        self.reconcile(index as usize)
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        let end = offset.checked_add(size).filter(|&e| e as usize <= CONFIG_SPACE_MAX).ok_or(VuError::InvalidParam)?;
        let mut space = vec![0u8; (end - offset) as usize];
        self.device.read_config(offset, &mut space);
        Ok(space)
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        let fits = offset.checked_add(buf.len() as u32).is_some_and(|e| e as usize <= CONFIG_SPACE_MAX);
        if !fits {
            log_error!("SET_CONFIG of {} bytes at offset {offset}: beyond the config space", buf.len());
            return Err(VuError::InvalidParam);
        }
        self.device.write_config(offset, buf).map_err(|e| {
            log_error!("SET_CONFIG of {} bytes at offset {offset}: {e}", buf.len());
            invalid("config space write refused")
        })
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(invalid("GPU_SET_SOCKET is not supported"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(invalid("GET_SHARED_OBJECT is not supported"))
    }

    fn get_inflight_fd(&mut self, _inflight: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        Err(invalid("GET_INFLIGHT_FD is not supported"))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        Err(invalid("SET_INFLIGHT_FD is not supported"))
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Err(invalid("GET_MAX_MEM_SLOTS is not supported"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        Err(invalid("ADD_MEM_REG is not supported"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(invalid("REM_MEM_REG is not supported"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(invalid("SET_DEVICE_STATE_FD is not supported"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(invalid("CHECK_DEVICE_STATE is not supported"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(invalid("GET_SHMEM_CONFIG is not supported"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(invalid("SET_LOG_BASE is not supported"))
    }
}
