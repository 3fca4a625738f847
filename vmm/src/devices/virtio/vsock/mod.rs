//! virtio-vsock (device id 19) with a Firecracker-compatible hybrid
//! backend on Unix sockets.
//!
//! The guest sees a vsock device with CID `guest_cid` (its configuration
//! space: the CID as a little-endian `u64`) and three queues: rx, tx and
//! event. On the host:
//!
//! - the VMM listens on the Unix socket `uds_path`; a process connects
//!   and writes `CONNECT <guest port>\n`, and once the guest accepted it
//!   reads `OK <host port>\n`, after which the socket carries the stream;
//!   if nothing listens on the guest port the socket is closed;
//! - a guest connection to CID 2 port P is connected to the Unix socket
//!   `<uds_path>_P`, or reset if nobody listens there.
//!
//! # Using it from the VMM
//!
//! ```text
//! let vsock = Arc::new(Mutex::new(Vsock::new(cid, uds_path)?));
//! event_manager.add_subscriber(vsock.clone()); // runs `init()`
//! // ... and hand `vsock` to the virtio-mmio transport as its device.
//! ```
//!
//! The device is built on the shared [`DeviceLifecycle`]: `init()`
//! registers its state and queue eventfds (once, for good) and a timer.
//! [`VirtioDevice::activate`] (on a vCPU thread) keeps the queues; the
//! event loop then registers the listener. [`VirtioDevice::reset`] drops
//! every connection and the loop unregisters the listener. Host sockets
//! are registered and unregistered as connections come and go.
//!
//! # Bounds
//!
//! The guest is untrusted: every descriptor chain is validated
//! (`packet.rs`), at most [`MAX_CONNECTIONS`] connections (handshakes
//! included) exist at once, each buffers at most [`CONN_BUF_ALLOC`]
//! bytes of guest data for a host socket
//! that does not read (the credit it advertises; a guest exceeding its
//! credit is reset) and all of them together at most
//! [`HOST_BUFFER_LIMIT`] (beyond it the connection that would overflow it
//! is reset), and data from the host is only read when the guest has
//! credit and an rx buffer for it. Each queue event serves at most
//! [`QUEUE_BUDGET`] chains per queue, then re-arms the queue, so a guest
//! refilling its rings as fast as they drain still leaves the event loop
//! free for signals, the API and other devices. When the process runs out
//! of file descriptors, the listener pauses for [`ACCEPT_BACKOFF`] instead
//! of spinning. A hostile guest can stall its own vsock, nothing more.

mod connection;
mod handshake;
mod kill;
pub mod metrics;
mod muxer;
pub(crate) mod packet;
mod rxq;
mod table;

#[cfg(test)]
mod tests;

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use thiserror::Error;
use tracing::{debug, error, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::lifecycle::{DeviceEvent, DeviceLifecycle};
use super::queue::{add_used, pop, QUEUE_BUDGET};
use super::{
    device_type, read_config_space, ActivateError, InterruptSignal, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::guest_log::LogLimiter;
use metrics::inc;
use muxer::{connect_nonblocking, AcceptOutcome, Muxer, EV_CONN, EV_HANDSHAKE};
use packet::{read_tx_packet, RxBuffer};
use virtio_queue::desc::split::Descriptor;

pub use connection::{HostBufBudget, CONN_BUF_ALLOC, HOST_BUFFER_LIMIT};
pub use handshake::parse_connect_line;
pub use metrics::{FirstResponse, VsockMetrics, VsockStats};
pub use packet::MAX_PKT_PAYLOAD;

/// The host's CID.
pub const HOST_CID: u64 = 2;

/// Maximum size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;

/// Most connections (and pending `CONNECT` handshakes) at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// File descriptors the device may need beyond its connections' (the
/// listener, eventfds, the timer), and what the rest of the VMM needs: the
/// soft `RLIMIT_NOFILE` should be at least `MAX_CONNECTIONS + FD_RESERVE`.
pub const FD_RESERVE: usize = 128;

/// How long the listener stops accepting after the process ran out of file
/// descriptors (or memory) for a new connection.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const NUM_QUEUES: usize = 3;
const RXQ: usize = 0;
const TXQ: usize = 1;
/// The event queue: the device tells the driver of a transport reset.
const EVQ: usize = 2;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio 1.2, 5.10.6.4): the driver
/// resets every connection and re-reads the guest CID.
const EVENT_TRANSPORT_RESET: u32 = 0;

// Event data of the device's own file descriptors (the lifecycle's are
// above `lifecycle::EV_LIFECYCLE_BASE`).
const EV_TIMER: u32 = 2;
const EV_LISTENER: u32 = 3;

/// Why the device could not be created.
#[derive(Debug, Error)]
pub enum VsockError {
    #[error("invalid guest CID {0}: it must be at least 3 and below 2^32 - 1")]
    InvalidCid(u64),
    #[error("vsock socket {0} is in use by another process")]
    SocketInUse(PathBuf),
    #[error("vsock socket path {0} exists and is not a Unix socket")]
    NotASocket(PathBuf),
    #[error("binding vsock socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("vsock: {what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

/// The virtio-vsock device. See the [module documentation](self).
pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// (device, inode) of the socket file we bound, so that `Drop` removes
    /// only our own.
    socket_identity: Option<(u64, u64)>,
    life: DeviceLifecycle,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    listener_registered: bool,
    /// A transport reset was sent and the driver has not handled it yet
    /// (it re-posts the event buffer once it has reset its streams): host
    /// connections wait, or the reset could cut one made meanwhile.
    reset_unacked: bool,
    /// Set when accepting failed for lack of file descriptors: the
    /// listener is out of the epoll set until then.
    accept_paused_until: Option<Instant>,
    muxer: Muxer,
    metrics: Arc<VsockMetrics>,
    /// Guest packets wait until rx buffers drain the RST backlog.
    tx_stalled: bool,
    tx_payload: Vec<u8>,
    rx_scratch: Vec<u8>,
    descs: Vec<Descriptor>,
    limiter: LogLimiter,
}

impl fmt::Debug for Vsock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path)
            .field("active", &self.life.is_active())
            .field("connections", &self.muxer.table.conns.len())
            .field("handshakes", &self.muxer.table.handshakes.len())
            .finish_non_exhaustive()
    }
}

/// Binds `path`, replacing a stale socket file that nothing listens on.
fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    let bind_err = |source| VsockError::Bind {
        path: path.to_owned(),
        source,
    };
    match UnixListener::bind(path) {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let meta = fs::symlink_metadata(path).map_err(bind_err)?;
            if !meta.file_type().is_socket() {
                return Err(VsockError::NotASocket(path.to_owned()));
            }
            match connect_nonblocking(path) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    debug!(path = %path.display(), "vsock: removing stale socket");
                    fs::remove_file(path).map_err(bind_err)?;
                    UnixListener::bind(path).map_err(bind_err)
                }
                // Connected, or a listener with a full backlog: in use.
                Ok(_) => Err(VsockError::SocketInUse(path.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    Err(VsockError::SocketInUse(path.to_owned()))
                }
                Err(e) => Err(bind_err(e)),
            }
        }
        Err(e) => Err(bind_err(e)),
    }
}

impl Vsock {
    /// Creates the device for a guest with CID `guest_cid`, listening for
    /// host connections on the Unix socket `uds_path` right away (they
    /// are accepted once the driver activated the device).
    ///
    /// Fails if the CID is reserved (0, 1, 2, or `u32::MAX` and above), if
    /// `uds_path` is a live socket of another process or not a socket at
    /// all; a stale socket file is replaced.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Vsock, VsockError> {
        if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let io_err = |what| move |source| VsockError::Io { what, source };
        let listener = bind_listener(&uds_path)?;
        let socket_identity = fs::symlink_metadata(&uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        listener
            .set_nonblocking(true)
            .map_err(io_err("making the listener non-blocking"))?;
        let life =
            DeviceLifecycle::new("vsock", NUM_QUEUES).map_err(io_err("creating eventfds"))?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(|e| VsockError::Io {
            what: "creating a timerfd",
            source: e.into(),
        })?;
        let metrics = Arc::new(VsockMetrics::default());
        debug!(guest_cid, path = %uds_path.display(), "vsock: listening");
        Ok(Vsock {
            guest_cid,
            acked_features: 0,
            muxer: Muxer::new(guest_cid, uds_path.clone(), metrics.clone()),
            uds_path,
            listener,
            socket_identity,
            life,
            timer,
            timer_deadline: None,
            listener_registered: false,
            reset_unacked: false,
            accept_paused_until: None,
            metrics,
            tx_stalled: false,
            tx_payload: Vec::new(),
            rx_scratch: vec![0; MAX_PKT_PAYLOAD],
            descs: Vec::new(),
            limiter: LogLimiter::new("vsock"),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The Unix socket host processes connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The device's live counters, readable without locking the device.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// A copy of the counters.
    pub fn stats(&self) -> VsockStats {
        self.metrics.snapshot()
    }

    /// When the guest first accepted a host-initiated connection (on any
    /// port; see [`Self::first_response`] for which).
    pub fn first_response_at(&self) -> Option<Instant> {
        self.metrics.first_response().map(|r| r.at)
    }

    /// The guest port and time of the first accepted host-initiated
    /// connection.
    pub fn first_response(&self) -> Option<FirstResponse> {
        self.metrics.first_response()
    }

    /// When guest `port` (e.g. 1024, the agent's) first accepted a
    /// host-initiated connection.
    pub fn first_response_on(&self, port: u32) -> Option<Instant> {
        self.metrics.first_response_on(port)
    }

    /// Calls `hook` the first time each guest port (up to 16 distinct
    /// ports) accepts a host-initiated connection, e.g. to record when the
    /// agent (port 1024) became ready. It runs on the event loop with the
    /// device locked: it must not lock the device, nor block.
    pub fn set_first_response_hook(&mut self, hook: impl FnMut(FirstResponse) + Send + 'static) {
        self.muxer.response_hook = Some(muxer::ResponseHook(Box::new(hook)));
    }

    /// Lowers the connection cap below [`MAX_CONNECTIONS`] (for a process
    /// that may not open that many file descriptors).
    pub fn set_max_connections(&mut self, max: usize) {
        self.muxer.set_max_connections(max);
    }

    /// Refuses every guest connection to a host port (a jailed VMM: there
    /// is no `<uds>_P` it could reach, nor `connect` in its filter).
    pub fn refuse_guest_connections(&mut self) {
        self.muxer.set_guest_connects(false);
    }

    /// The connection cap in force.
    pub fn max_connections(&self) -> usize {
        self.muxer.max_connections()
    }

    /// Guest bytes buffered for host sockets that have not read them yet,
    /// across all connections (at most [`HOST_BUFFER_LIMIT`]).
    pub fn host_buffered(&self) -> usize {
        self.muxer.host_buffered()
    }

    /// Connections waiting for an rx buffer (at most one entry each).
    pub fn rx_waiting(&self) -> usize {
        self.muxer.rx_list_len()
    }

    /// Takes up to [`QUEUE_BUDGET`] of the guest's packets off the tx
    /// queue (re-arming it if more wait). Returns whether used buffers
    /// were added.
    fn process_tx(&mut self, now: Instant) -> bool {
        let Some(active) = self.life.active_mut() else {
            return false;
        };
        let Some(queue) = active.queues.get_mut(TXQ) else {
            return false;
        };
        let mem = &active.mem;
        let mut used = false;
        let mut served = 0;
        self.tx_stalled = false;
        while served < QUEUE_BUDGET {
            if self.muxer.rx_backlog_full() {
                self.tx_stalled = true;
                break;
            }
            let Some((head, walked)) = pop(
                queue,
                mem,
                &mut self.descs,
                &mut self.limiter,
                "the vsock tx queue",
            ) else {
                break;
            };
            let result = match walked {
                Ok(()) => read_tx_packet(mem, &self.descs, &mut self.tx_payload)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = add_used(queue, mem, head, 0) {
                if self.limiter.allow() {
                    warn!("vsock: returning a tx buffer: {e}");
                }
            } else {
                used = true;
            }
            match result {
                Ok(hdr) => self.muxer.handle_guest_packet(&hdr, &self.tx_payload, now),
                Err(e) => {
                    inc(&self.metrics.tx_dropped);
                    if self.limiter.allow() {
                        warn!("vsock: dropping a malformed tx buffer: {e}");
                    }
                }
            }
            served += 1;
        }
        if served == QUEUE_BUDGET {
            // More may wait: come back after the other ready events.
            self.life.rearm(TXQ);
        }
        used
    }

    /// Gives the guest waiting packets, as rx buffers allow, up to
    /// [`QUEUE_BUDGET`] of them (re-arming the rx queue if more wait).
    /// Returns whether used buffers were added.
    fn process_rx(&mut self, now: Instant) -> bool {
        let Some(active) = self.life.active_mut() else {
            return false;
        };
        let Some(queue) = active.queues.get_mut(RXQ) else {
            return false;
        };
        let mem = &active.mem;
        let mut used = false;
        let mut served = 0;
        while self.muxer.has_pending_rx() {
            if served == QUEUE_BUDGET {
                self.life.rearm(RXQ);
                break;
            }
            let Some((head, walked)) = pop(
                queue,
                mem,
                &mut self.descs,
                &mut self.limiter,
                "the vsock rx queue",
            ) else {
                break;
            };
            served += 1;
            let buf = walked
                .map_err(|e| e.to_string())
                .and_then(|()| RxBuffer::new(mem, &self.descs).map_err(|e| e.to_string()));
            let len = match buf {
                Ok(buf) => {
                    match self.muxer.fill_rx(mem, &buf, &mut self.rx_scratch, now) {
                        Some(len) => len,
                        None => {
                            // Nothing to say after all: keep the buffer.
                            queue.go_to_previous_position();
                            break;
                        }
                    }
                }
                Err(e) => {
                    inc(&self.metrics.rx_bad_buffers);
                    if self.limiter.allow() {
                        warn!("vsock: skipping a malformed rx buffer: {e}");
                    }
                    0
                }
            };
            match add_used(queue, mem, head, len) {
                Ok(()) => used = true,
                Err(e) => {
                    if self.limiter.allow() {
                        warn!("vsock: returning an rx buffer: {e}");
                    }
                }
            }
        }
        used
    }

    /// Moves packets both ways within the queues' budgets, then interrupts
    /// the guest if a used ring changed. `sweep` passes over every
    /// connection (timeouts, activation); otherwise only the connections
    /// an event touched were updated, by the muxer itself.
    fn run(&mut self, now: Instant, tx_notified: bool, sweep: bool) {
        if !self.life.is_active() {
            return;
        }
        if sweep {
            self.muxer.maintain(now);
        }
        let mut used = false;
        if tx_notified || self.tx_stalled {
            used |= self.process_tx(now);
        }
        used |= self.process_rx(now);
        // The rx buffers may have relieved a full RST backlog.
        if self.tx_stalled && !self.muxer.rx_backlog_full() {
            used |= self.process_tx(now);
            used |= self.process_rx(now);
        }
        if used {
            if let Some(active) = self.life.active() {
                active.signal_used(&mut self.limiter, "vsock");
            }
        }
    }

    /// Keeps the listener in the epoll set exactly while the device is
    /// active and accepting is not paused.
    fn sync_listener(&mut self, ops: &mut EventOps<'_>, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
        }
        let want =
            self.life.is_active() && self.accept_paused_until.is_none() && !self.reset_unacked;
        if want == self.listener_registered {
            return;
        }
        if want {
            match ops.add(Events::with_data(&self.listener, EV_LISTENER, EventSet::IN)) {
                Ok(()) => self.listener_registered = true,
                Err(e) => error!(
                    path = %self.uds_path.display(),
                    "vsock: registering the listener: {e:?}"
                ),
            }
        } else {
            let _ = ops.remove(Events::empty(&self.listener));
            self.listener_registered = false;
        }
    }

    /// Arms the timer for the earliest connection timeout.
    fn arm_timer(&mut self, now: Instant) {
        let next = match (self.muxer.next_deadline(), self.accept_paused_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if next == self.timer_deadline {
            return;
        }
        let result = match next {
            Some(deadline) => {
                let wait = deadline
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1));
                self.timer.set(
                    Expiration::OneShot(TimeSpec::from_duration(wait)),
                    TimerSetTimeFlags::empty(),
                )
            }
            None => self.timer.unset(),
        };
        match result {
            Ok(()) => self.timer_deadline = next,
            Err(e) => error!("vsock: arming the timer: {e}"),
        }
    }
}

impl Vsock {
    /// The driver notified the event queue: once it has posted a buffer
    /// past the one the reset used, it has handled the reset, and host
    /// connections are taken again.
    fn check_reset_handled(&mut self) {
        if !self.reset_unacked {
            return;
        }
        let Some(active) = self.life.active() else {
            return;
        };
        let Some(queue) = active.queues.get(EVQ) else {
            return;
        };
        let posted = queue
            .avail_idx(&active.mem, std::sync::atomic::Ordering::Acquire)
            .map(|idx| idx.0 != queue.next_avail());
        if posted.unwrap_or(false) {
            self.reset_unacked = false;
            debug!("vsock: the driver handled the transport reset");
        }
    }

    /// Tells the driver that every connection it had is gone (after a
    /// restore from a snapshot: the template's host streams do not exist
    /// in this process): one event on the event queue, whose buffers the
    /// driver keeps posted. Listening sockets in the guest stay.
    fn send_transport_reset(&mut self) {
        let Some(active) = self.life.active_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(EVQ) else {
            return;
        };
        let mem = &active.mem;
        let mut descs = Vec::new();
        let Some((head, walked)) = pop(
            queue,
            mem,
            &mut descs,
            &mut self.limiter,
            "the vsock event queue",
        ) else {
            warn!("vsock: no event buffer for the transport reset after the restore");
            return;
        };
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = match (walked, descs.first()) {
            (Ok(()), Some(d)) if d.is_write_only() && d.len() as usize >= event.len() => mem
                .write_slice(&event, d.addr())
                .map(|()| event.len() as u32)
                .unwrap_or(0),
            _ => 0,
        };
        if written == 0 && self.limiter.allow() {
            warn!("vsock: the driver's event buffer cannot take the transport reset");
        }
        if add_used(queue, mem, head, written).is_ok() {
            self.reset_unacked = true;
            active.signal_used(&mut self.limiter, "vsock");
            debug!("vsock: transport reset sent to the guest");
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            offset,
            len = data.len(),
            "vsock: ignoring a config space write"
        );
    }

    fn queue_events(&self) -> &[EventFd] {
        self.life.queue_events()
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn InterruptSignal>,
    ) -> Result<(), ActivateError> {
        self.life.activate(mem, queues, interrupt)?;
        debug!(guest_cid = self.guest_cid, "vsock: activated");
        Ok(())
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.life.queue_states()
    }

    fn restored(&mut self) {
        self.send_transport_reset();
    }

    fn reset(&mut self) -> bool {
        debug!(guest_cid = self.guest_cid, "vsock: reset");
        self.life.reset();
        self.acked_features = 0;
        self.muxer.reset();
        self.tx_stalled = false;
        true
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        self.life.register(ops);
        let timer_fd = self.timer.as_fd().as_raw_fd();
        if let Err(e) = ops.add(Events::with_data_raw(timer_fd, EV_TIMER, EventSet::IN)) {
            error!("vsock: registering the timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps<'_>) {
        let now = Instant::now();
        let mut tx_notified = false;
        let mut sweep = false;
        match self.life.event(&events) {
            DeviceEvent::StateChanged => {
                // Work may have been queued before activation finished.
                tx_notified = true;
                sweep = true;
            }
            DeviceEvent::Queue(EVQ) => self.check_reset_handled(),
            DeviceEvent::Queue(index) => tx_notified = index == TXQ,
            DeviceEvent::Other(EV_TIMER) => {
                let mut buf = [0u8; 8];
                let _ = nix::unistd::read(self.timer.as_fd(), &mut buf);
                self.timer_deadline = None;
                sweep = true;
            }
            DeviceEvent::Other(EV_LISTENER) => {
                if self.life.is_active() && !self.reset_unacked {
                    if let AcceptOutcome::OutOfResources = self.muxer.accept(&self.listener, now) {
                        self.accept_paused_until = now.checked_add(ACCEPT_BACKOFF);
                    }
                }
            }
            DeviceEvent::Other(EV_HANDSHAKE) => self.muxer.handshake_event(events.fd(), now),
            DeviceEvent::Other(EV_CONN) => {
                self.muxer.conn_event(events.fd(), events.event_set(), now)
            }
            DeviceEvent::Other(other) => {
                if self.limiter.allow() {
                    warn!("vsock: event with unknown data {other}");
                }
            }
        }
        self.sync_listener(ops, now);
        self.run(now, tx_notified, sweep);
        self.muxer.sync_epoll(ops);
        self.arm_timer(now);
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.socket_identity {
            if let Err(e) = fs::remove_file(&self.uds_path) {
                warn!(path = %self.uds_path.display(), "vsock: removing the socket: {e}");
            }
        }
    }
}
