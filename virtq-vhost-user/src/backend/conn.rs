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
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtq::{DeviceConfig, DeviceQueue, Features};
use vmm_sys_util::eventfd::EventFd;

use super::log::ConnLog;
use super::memory::{GuestMemoryMap, MemoryFault};
use super::vring::{decode_base, set_nonblocking, RingAddrs, Vring, Worker, WorkerLinks};
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
}

/// The state of one connection.
pub(crate) struct ConnState {
    device: Arc<dyn Device>,
    stats: Arc<Stats>,
    links: ConnLinks,
    offered: u64,
    acked: Option<u64>,
    memory: Option<Arc<GuestMemoryMap>>,
    /// A fault on a memory table that has since been replaced.
    memory_fault: Option<MemoryFault>,
    vrings: Vec<Vring>,
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

impl ConnState {
    pub fn new(device: Arc<dyn Device>, stats: Arc<Stats>, links: ConnLinks) -> Self {
        let offered = device.device_features() | RING_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES;
        let vrings = (0..device.num_queues()).map(Vring::new).collect();
        Self { device, stats, links, offered, acked: None, memory: None, memory_fault: None, vrings }
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

    /// Stops every worker (the connection ends, or something they all use changes).
    pub fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop(i);
        }
    }

    /// Stops ring `index`'s worker, if it runs. Stopping waits for the request it is
    /// processing: the frontend's deadline does not run meanwhile.
    fn stop(&mut self, index: usize) {
        let packed = self.packed();
        let v = &mut self.vrings[index];
        if v.is_running() {
            let _paused = self.links.watchdog.pause();
            v.stop(packed);
        }
    }

    /// Starts or stops ring `index` to match its configuration.
    fn reconcile(&mut self, index: usize) -> VuResult<()> {
        let protocol_ext = self.acked.is_some_and(|f| f & VHOST_USER_F_PROTOCOL_FEATURES != 0);
        let v = &self.vrings[index];
        let ready = self.memory.is_some()
            && self.acked.is_some()
            && v.size != 0
            && v.addrs.is_some()
            && v.kick.is_some()
            && (v.enabled || !protocol_ext);
        if !ready {
            self.stop(index);
            return Ok(());
        }
        if v.is_running() {
            return Ok(());
        }
        self.start(index)
    }

    fn start(&mut self, index: usize) -> VuResult<()> {
        let (Some(mem), Some(acked)) = (self.memory.clone(), self.acked) else { return Ok(()) };
        let features = Features::from_bits(acked);
        let packed = features.contains(Features::RING_PACKED);
        let v = &self.vrings[index];
        let (Some(addrs), Some(kick)) = (v.addrs, v.kick.clone()) else { return Ok(()) };
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
        let attached = DeviceQueue::new(&*mem, config).map(drop);
        // Attaching reads the ring: guest memory that faulted fails the request.
        if let Some(f) = mem.fault() {
            log_error!("queue {index}: {f}");
            return Err(VuError::InvalidParam);
        }
        if let Err(e) = attached {
            log_error!("queue {index}: cannot serve the ring ({config:?}): {e}");
            return Err(VuError::InvalidParam);
        }
        let handler = self.device.queue_handler(index as u16, features);
        let links = WorkerLinks {
            call: v.call.clone(),
            err: v.err.clone(),
            stats: self.stats.clone(),
            log: self.links.log.clone(),
            fault_event: self.links.fault_event.clone(),
        };
        let worker = Worker::spawn(index as u16, mem, config, kick, handler, links).map_err(|e| {
            log_error!("queue {index}: cannot start a worker thread: {e}");
            VuError::ReqHandlerError(e)
        })?;
        log_debug!(
            "queue {index}: started, {} ring of {} entries, base {:#x}",
            if packed { "packed" } else { "split" },
            config.size,
            self.vrings[index].base
        );
        self.vrings[index].worker = Some(worker);
        Ok(())
    }

    fn reconcile_all(&mut self) -> VuResult<()> {
        for i in 0..self.vrings.len() {
            self.reconcile(i)?;
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
        let n = self.vrings.len() as u16;
        self.vrings = (0..n).map(Vring::new).collect();
        self.acked = None;
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
        let v = self.vring(index)?;
        if num == 0 || num > MAX_QUEUE_SIZE as u32 {
            log_error!("queue {index}: size {num} is out of range (1 to {MAX_QUEUE_SIZE})");
            return Err(VuError::InvalidParam);
        }
        if v.is_running() {
            return Err(invalid("SET_VRING_NUM on a running ring"));
        }
        v.size = num as u16;
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
        self.stop(index as usize);
        self.vrings[index as usize].addrs = Some(RingAddrs { desc: descriptor, avail: available, used });
        self.reconcile(index as usize)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let v = self.vring(index)?;
        if v.is_running() {
            return Err(invalid("SET_VRING_BASE on a running ring"));
        }
        v.base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        // GET_VRING_BASE stops the ring; the next SET_VRING_KICK starts it again.
        self.stop(index as usize);
        let v = &mut self.vrings[index as usize];
        v.kick = None;
        Ok(VhostUserVringState::new(index, v.base))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(index as u32)?;
        if let Some(f) = &fd {
            check_eventfd(f, "kick", index as u32)?;
            set_nonblocking(f).map_err(VuError::ReqHandlerError)?;
        }
        self.stop(index as usize);
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
        let mut space = vec![0u8; CONFIG_SPACE_MAX];
        let config = self.device.config_space();
        let n = config.len().min(CONFIG_SPACE_MAX);
        space[..n].copy_from_slice(&config[..n]);
        Ok(space[offset as usize..end as usize].to_vec())
    }

    fn set_config(&mut self, offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        log_error!("SET_CONFIG at offset {offset}: the config space is read-only");
        Err(invalid("the config space is read-only"))
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
