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
//!   loop): SET_FEATURES (VERSION_1: the rings are the VMM's, see
//!   [`super::relay`]), SET_MEM_TABLE (the device's bounce memory only,
//!   as addresses `0..size`: never guest RAM), then per queue
//!   SET_VRING_NUM, SET_VRING_BASE (0), SET_VRING_ADDR (the shadow ring's
//!   addresses as this process's virtual addresses, which the back end
//!   translates through the memory table), SET_VRING_KICK (an eventfd the
//!   VMM writes after posting requests), SET_VRING_CALL (our call
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
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::super::VIRTIO_F_VERSION_1;
use super::bounce::RingAddrs;
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

/// The virtio features the guest may get, when the back end offers them:
/// VERSION_1 only. The VMM reads the guest's rings itself
/// ([`super::relay`]), with direct descriptors and no event index; the
/// same holds for the shadow rings the back end reads, so neither
/// INDIRECT_DESC nor EVENT_IDX is passed on either way.
pub const GUEST_FEATURES: u64 = VIRTIO_F_VERSION_1;

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
    #[error("bounce memory: {0}")]
    Memory(String),
    #[error("{0}")]
    Bounce(#[from] super::bounce::BounceError),
    #[error("{0}")]
    Ring(#[from] super::relay::RingError),
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

    /// Hands the activated device to the back end: features, the bounce
    /// memory, and each shadow ring with its kick and call eventfds.
    pub fn start(
        &mut self,
        bounce: &GuestMemoryMmap,
        rings: &[RingAddrs],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), FrontendError> {
        if rings.len() != self.num_queues
            || kicks.len() != self.num_queues
            || calls.len() != self.num_queues
        {
            return Err(FrontendError::Memory(format!(
                "{} rings, {} kick and {} call eventfds for a device of {}",
                rings.len(),
                kicks.len(),
                calls.len(),
                self.num_queues
            )));
        }
        let mut features = self.features & VIRTIO_F_VERSION_1;
        if self.uses_protocol_features() {
            // Keeps SET_VRING_ENABLE (rings start disabled) and REPLY_ACK.
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.request("SET_FEATURES", |f| f.set_features(features))?;
        let regions = memory_regions(bounce)?;
        self.request("SET_MEM_TABLE", |f| f.set_mem_table(&regions))?;
        for (i, ring) in rings.iter().enumerate() {
            let config = VringConfigData {
                queue_max_size: ring.size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: host_address(bounce, ring.desc, i)?,
                used_ring_addr: host_address(bounce, ring.used, i)?,
                avail_ring_addr: host_address(bounce, ring.avail, i)?,
                log_addr: None,
            };
            self.request("SET_VRING_NUM", |f| f.set_vring_num(i, ring.size))?;
            self.request("SET_VRING_BASE", |f| f.set_vring_base(i, 0))?;
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

/// This process's address of bounce address `gpa` (a ring of queue
/// `queue`, inside the bounce memory by construction).
fn host_address(mem: &GuestMemoryMmap, gpa: u64, queue: usize) -> Result<u64, FrontendError> {
    mem.get_host_address(GuestAddress(gpa))
        .map(|p| p as u64)
        .map_err(|e| FrontendError::Memory(format!("queue {queue} ring at {gpa:#x}: {e}")))
}

/// Every region of `mem` (the bounce memory: one) with its file (the
/// memfd) and offset in it.
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
