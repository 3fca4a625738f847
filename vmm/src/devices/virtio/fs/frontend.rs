//! The vhost-user conversation with a virtio-fs back end (virtiofsd),
//! through the `vhost` crate's front end.
//!
//! - [`Backend::connect`], at VMM start (main thread): connects to the
//!   back end's socket (nobody listening is an error there and then),
//!   SET_OWNER, GET_FEATURES, and, if the back end speaks vhost-user
//!   protocol features, GET/SET_PROTOCOL_FEATURES (we take REPLY_ACK, so
//!   every request is acknowledged and a refusal is an error we see; MQ,
//!   to check the back end serves enough queues; RESET_DEVICE, for a
//!   driver reset) and GET_QUEUE_NUM.
//! - [`Backend::start`], when the guest driver activated the device (event
//!   loop): SET_FEATURES (what the driver accepted), SET_MEM_TABLE (every
//!   guest RAM region with the memfd behind it, so the back end maps the
//!   same pages), then per queue SET_VRING_NUM, SET_VRING_BASE,
//!   SET_VRING_ADDR (ring addresses as this process's virtual addresses,
//!   which the back end translates through the memory table),
//!   SET_VRING_KICK (the queue's ioeventfd), SET_VRING_CALL (our call
//!   eventfd), and SET_VRING_ENABLE.
//! - [`Backend::stop`], after a driver reset: GET_VRING_BASE per queue
//!   (the back end stops the ring) and RESET_DEVICE when negotiated.
//! - [`Backend::check_alive`]: the socket is in the event loop; outside a
//!   request the back end has nothing to say, so a readable socket means
//!   it closed the connection (it died) or broke the protocol.
//!
//! Every request is synchronous: the front end waits for the reply (or,
//! with REPLY_ACK, the acknowledgement). A back end that dies mid-request
//! closes the socket, which ends the wait with an error; one that stays
//! alive but does not answer within [`REPLY_DEADLINE`] has its socket shut
//! down by the connection's [`Watchdog`], which ends the wait too.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::MsgFlags;
use thiserror::Error;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::super::VIRTIO_F_VERSION_1;
use super::watchdog::Watchdog;

/// How long the back end may take to answer one vhost-user request before
/// the VMM gives up on it (and the VM). Every request the front end sends
/// is control-plane work that virtiofsd answers at once (it takes no file
/// system I/O: the memory table is an mmap, a ring stop takes the ring's
/// lock); the longest wait is GET_VRING_BASE behind a FUSE request in
/// flight. A back end silent this long is stopped or wedged, and while a
/// request waits the event loop waits too: SIGTERM and the API are served
/// at most this late.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(5);

/// VIRTIO_RING_F_INDIRECT_DESC and VIRTIO_RING_F_EVENT_IDX: the back end
/// reads the rings, so these are between the driver and the back end.
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// The virtio features the guest may get, when the back end offers them.
/// Nothing that changes the transport (packed rings, access platform,
/// notification data): the virtio-mmio transport sets up split rings.
pub const GUEST_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// The vhost-user protocol features isola uses, when offered.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// What went wrong with the back end.
#[derive(Debug, Error)]
pub enum FrontendError {
    #[error("connecting to the vhost-user socket: {0} (is virtiofsd listening there?)")]
    Connect(std::io::Error),
    #[error("vhost-user {request} failed: {source}")]
    Request {
        request: &'static str,
        source: vhost::Error,
    },
    #[error("the back end does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    #[error(
        "the back end serves {have} queues; the share needs {need} (1 high-priority + queues=)"
    )]
    TooFewQueues { have: u64, need: usize },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("the back end closed the connection (did virtiofsd exit?)")]
    Closed,
    #[error("the back end sent {0} bytes nobody asked for (a broken back end)")]
    Unsolicited(usize),
    #[error("the vhost-user socket failed: {0}")]
    Socket(std::io::Error),
    #[error(
        "the back end did not answer vhost-user {request} within {} s (is virtiofsd stopped or hung?)",
        .deadline.as_secs_f64()
    )]
    NoAnswer {
        request: &'static str,
        deadline: Duration,
    },
}

/// A connected vhost-user back end for one virtio-fs device.
pub struct Backend {
    frontend: Frontend,
    /// Shuts the socket down when a request is not answered in time.
    watchdog: Watchdog,
    /// The same socket, to look at it without taking a message.
    probe: UnixStream,
    socket: PathBuf,
    /// The back end's virtio features.
    features: u64,
    /// The protocol features both sides use.
    protocol: VhostUserProtocolFeatures,
    num_queues: usize,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("socket", &self.socket)
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol", &self.protocol)
            .field("num_queues", &self.num_queues)
            .finish()
    }
}

impl Backend {
    /// Connects to the back end listening on `socket` and negotiates what
    /// can be before the guest drives the device. Each request may take
    /// [`REPLY_DEADLINE`]; the watchdog thread is filtered if `seccomp`.
    pub fn connect(
        socket: &Path,
        num_queues: usize,
        seccomp: bool,
    ) -> Result<Backend, FrontendError> {
        let stream = UnixStream::connect(socket).map_err(FrontendError::Connect)?;
        Backend::handshake(stream, socket, num_queues, REPLY_DEADLINE, seccomp)
    }

    /// The handshake on a connected stream (tests use a socket pair and a
    /// short `deadline`).
    pub fn handshake(
        stream: UnixStream,
        socket: &Path,
        num_queues: usize,
        deadline: Duration,
        seccomp: bool,
    ) -> Result<Backend, FrontendError> {
        let probe = stream.try_clone().map_err(FrontendError::Socket)?;
        let watched = stream.try_clone().map_err(FrontendError::Socket)?;
        let watchdog =
            Watchdog::start(watched, deadline, seccomp).map_err(FrontendError::Socket)?;
        let mut backend = Backend {
            frontend: Frontend::from_stream(stream, num_queues as u64),
            watchdog,
            probe,
            socket: socket.to_path_buf(),
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            num_queues,
        };
        backend.request("SET_OWNER", |f| f.set_owner())?;
        let features = backend.request("GET_FEATURES", |f| f.get_features())?;
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FrontendError::NoVersion1(features));
        }
        backend.features = features;
        if backend.uses_protocol_features() {
            let offered =
                backend.request("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
            let protocol = offered & wanted_protocol_features();
            backend.request("SET_PROTOCOL_FEATURES", |f| {
                f.set_protocol_features(protocol)
            })?;
            backend.protocol = protocol;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request from here on is acknowledged: a back end
                // refusing one is an error here, not a silent stall.
                backend
                    .frontend
                    .set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                let have = backend.request("GET_QUEUE_NUM", |f| f.get_queue_num())?;
                if have < num_queues as u64 {
                    return Err(FrontendError::TooFewQueues {
                        have,
                        need: num_queues,
                    });
                }
            }
        }
        Ok(backend)
    }

    /// Sends one request (and waits for its reply or acknowledgement)
    /// under the deadline; names it if it fails.
    fn request<T>(
        &mut self,
        request: &'static str,
        send: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, FrontendError> {
        self.watchdog.arm();
        let result = send(&mut self.frontend);
        if self.watchdog.disarm() {
            // The socket was shut down under the request: whatever it
            // returned, the back end did not answer in time.
            return Err(FrontendError::NoAnswer {
                request,
                deadline: self.watchdog.deadline(),
            });
        }
        result.map_err(|source| FrontendError::Request { request, source })
    }

    /// The virtio features the guest is offered.
    pub fn guest_features(&self) -> u64 {
        self.features & GUEST_FEATURES
    }

    /// The socket, for the event loop to watch.
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        self.probe.as_raw_fd()
    }

    fn uses_protocol_features(&self) -> bool {
        self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Hands the activated device to the back end: features, guest
    /// memory, and each queue with its kick and call eventfds.
    pub fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
        acked_features: u64,
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), FrontendError> {
        if queues.len() != self.num_queues
            || kicks.len() != self.num_queues
            || calls.len() != self.num_queues
        {
            return Err(FrontendError::Memory(format!(
                "{} queues, {} kick and {} call eventfds for a device of {}",
                queues.len(),
                kicks.len(),
                calls.len(),
                self.num_queues
            )));
        }
        let mut features = acked_features & self.guest_features();
        if self.uses_protocol_features() {
            // Keeps SET_VRING_ENABLE (rings start disabled) and REPLY_ACK.
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.request("SET_FEATURES", |f| f.set_features(features))?;
        let regions = memory_regions(mem)?;
        self.request("SET_MEM_TABLE", |f| f.set_mem_table(&regions))?;
        for (i, queue) in queues.iter().enumerate() {
            let config = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host_address(mem, queue.desc_table(), i)?,
                used_ring_addr: host_address(mem, queue.used_ring(), i)?,
                avail_ring_addr: host_address(mem, queue.avail_ring(), i)?,
                log_addr: None,
            };
            self.request("SET_VRING_NUM", |f| f.set_vring_num(i, queue.size()))?;
            self.request("SET_VRING_BASE", |f| {
                f.set_vring_base(i, queue.next_avail())
            })?;
            self.request("SET_VRING_ADDR", |f| f.set_vring_addr(i, &config))?;
            if let (Some(kick), Some(call)) = (kicks.get(i), calls.get(i)) {
                self.request("SET_VRING_KICK", |f| f.set_vring_kick(i, kick))?;
                self.request("SET_VRING_CALL", |f| f.set_vring_call(i, call))?;
            }
            if self.uses_protocol_features() {
                self.request("SET_VRING_ENABLE", |f| f.set_vring_enable(i, true))?;
            }
        }
        Ok(())
    }

    /// Stops every ring (the driver reset the device) and, if the back end
    /// supports it, resets its state, so a new activation starts afresh.
    pub fn stop(&mut self) -> Result<(), FrontendError> {
        for i in 0..self.num_queues {
            self.request("GET_VRING_BASE", |f| f.get_vring_base(i))?;
        }
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            self.request("RESET_DEVICE", |f| f.reset_device())?;
        }
        Ok(())
    }

    /// Looks at the socket without reading: between requests the back end
    /// sends nothing, so end of file (or any byte) means it is gone (or
    /// broken). `Ok` when nothing is there.
    pub fn check_alive(&self) -> Result<(), FrontendError> {
        let mut byte = [0u8; 1];
        match nix::sys::socket::recv(
            self.probe.as_fd().as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => Err(FrontendError::Closed),
            Ok(n) => Err(FrontendError::Unsolicited(n)),
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(nix::errno::Errno::ECONNRESET) => Err(FrontendError::Closed),
            Err(err) => Err(FrontendError::Socket(err.into())),
        }
    }
}

/// This process's address of guest physical address `gpa` (a ring of
/// queue `queue`, already checked to be inside guest memory).
fn host_address(mem: &GuestMemoryMmap, gpa: u64, queue: usize) -> Result<u64, FrontendError> {
    mem.get_host_address(GuestAddress(gpa))
        .map(|p| p as u64)
        .map_err(|e| FrontendError::Memory(format!("queue {queue} ring at {gpa:#x}: {e}")))
}

/// Every guest RAM region with its file (the memfd) and offset in it.
fn memory_regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, FrontendError> {
    let mut regions = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr();
        let Some(file) = region.file_offset() else {
            return Err(FrontendError::Memory(format!(
                "the region at {:#x} is not backed by a file the back end could map",
                start.0
            )));
        };
        let host = mem
            .get_host_address(start)
            .map_err(|e| FrontendError::Memory(format!("region at {:#x}: {e}", start.0)))?;
        regions.push(VhostUserMemoryRegionInfo {
            guest_phys_addr: start.0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            mmap_offset: file.start(),
            mmap_handle: file.file().as_raw_fd(),
        });
    }
    Ok(regions)
}
