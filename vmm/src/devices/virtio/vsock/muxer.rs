//! The hybrid-vsock backend: maps guest streams onto host Unix sockets.
//!
//! - Host-initiated: a process connects to the VMM's socket (`uds_path`)
//!   and writes `CONNECT <guest port>\n`; the muxer allocates a host port
//!   (from [`LOCAL_PORT_BASE`] up), sends the guest a REQUEST, and on the
//!   guest's RESPONSE answers `OK <host port>\n`.
//! - Guest-initiated: a REQUEST to (CID 2, port P) connects to the Unix
//!   socket `<uds_path>_P`; the guest gets a RESPONSE, or an RST if nobody
//!   listens there.
//!
//! The muxer owns the connections, the order in which they get rx
//! buffers (round robin), the RSTs for the guest that belong to no
//! connection, and the bookkeeping of which host sockets are registered
//! with the event manager.
//!
//! No event walks every connection: each event updates the connections it
//! touches, which join a dirty list that [`Muxer::sync_epoll`] drains, and
//! timeouts sit in a min-heap; only the timer's sweep looks at them all.
//! The rx list holds each connection at most once and loses it when the
//! connection dies, so it never outgrows the connection table.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use tracing::{debug, trace, warn};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::connection::{ConnKey, Connection, HostBufBudget, RxOutcome, Verdict};
use super::handshake::{Handshake, HandshakeProgress};
use super::metrics::{add, dec, inc, FirstResponse, VsockMetrics};
use super::packet::{op, op_name, Header, RxBuffer, VSOCK_TYPE_STREAM};
use super::{HOST_BUFFER_LIMIT, HOST_CID, MAX_CONNECTIONS};
use crate::guest_log::LogLimiter;
use crate::metrics::METRICS;

/// Event data of a host socket still in its `CONNECT` handshake.
pub(crate) const EV_HANDSHAKE: u32 = 100;
/// Event data of a connected host socket.
pub(crate) const EV_CONN: u32 = 101;

/// Host ports for host-initiated streams are allocated from here up.
pub const LOCAL_PORT_BASE: u32 = 1 << 30;

/// How long a host process has to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// RSTs for the guest that belong to no connection are queued up to this
/// many (the oldest are dropped beyond).
const MAX_RST_QUEUE: usize = 2048;
/// With this many RSTs queued the device stops taking guest packets
/// until the guest provides rx buffers.
const RST_QUEUE_HIGH: usize = MAX_RST_QUEUE / 2;

/// Connections accepted per listener event (the rest on the next one).
const MAX_ACCEPTS_PER_EVENT: usize = 64;

/// What accepting host connections came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AcceptOutcome {
    /// Accepted what was there (or a per-event share of it).
    Done,
    /// The process (or the system) is out of file descriptors or memory:
    /// stop accepting for a while instead of spinning on the listener.
    OutOfResources,
}

/// Something with a timeout: a connection or a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timed {
    Conn(ConnKey),
    Handshake(RawFd),
}

/// A host socket whose connection is gone but which may still be in the
/// epoll set: it is removed from there before it is closed, so that its
/// file descriptor number is never reused while still registered.
#[derive(Debug)]
struct Buried {
    stream: UnixStream,
    registered: bool,
}

/// Called with the first RESPONSE of each guest port (see
/// [`super::Vsock::set_first_response_hook`]).
pub(crate) struct ResponseHook(pub(crate) Box<dyn FnMut(FirstResponse) + Send>);

impl std::fmt::Debug for ResponseHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseHook")
    }
}

#[derive(Debug)]
pub(crate) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    pub(crate) conns: HashMap<ConnKey, Connection>,
    fd_to_key: HashMap<RawFd, ConnKey>,
    pub(crate) handshakes: HashMap<RawFd, Handshake>,
    rx_ready: VecDeque<ConnKey>,
    rst_queue: VecDeque<Header>,
    graveyard: Vec<Buried>,
    /// Connections whose epoll interest may have changed since the last
    /// [`Self::sync_epoll`], and handshakes not registered yet.
    dirty: Vec<ConnKey>,
    new_handshakes: Vec<RawFd>,
    /// Timeouts, earliest first; entries whose owner is gone or moved its
    /// deadline are skipped (and pruned) lazily.
    deadlines: BinaryHeap<Reverse<(Instant, Timed)>>,
    budget: Arc<HostBufBudget>,
    max_connections: usize,
    next_local_port: u32,
    next_id: u64,
    metrics: Arc<VsockMetrics>,
    limiter: LogLimiter,
    pub(crate) response_hook: Option<ResponseHook>,
}

/// Connects to a host Unix socket without blocking: a listener whose
/// backlog is full refuses instead of stalling the event loop.
pub(crate) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

impl Muxer {
    pub(crate) fn new(guest_cid: u64, uds_path: PathBuf, metrics: Arc<VsockMetrics>) -> Self {
        Muxer {
            guest_cid,
            uds_path,
            conns: HashMap::new(),
            fd_to_key: HashMap::new(),
            handshakes: HashMap::new(),
            rx_ready: VecDeque::new(),
            rst_queue: VecDeque::new(),
            graveyard: Vec::new(),
            dirty: Vec::new(),
            new_handshakes: Vec::new(),
            deadlines: BinaryHeap::new(),
            budget: HostBufBudget::new(HOST_BUFFER_LIMIT),
            max_connections: MAX_CONNECTIONS,
            next_local_port: LOCAL_PORT_BASE,
            next_id: 1,
            metrics,
            limiter: LogLimiter::new("vsock"),
            response_hook: None,
        }
    }

    fn open_count(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    /// Lowers the connection cap (never above [`MAX_CONNECTIONS`]), e.g.
    /// when the process may not open that many file descriptors.
    pub(crate) fn set_max_connections(&mut self, max: usize) {
        self.max_connections = max.clamp(1, MAX_CONNECTIONS);
    }

    pub(crate) fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Replaces the device-wide limit of buffered host bytes (tests).
    #[cfg(test)]
    pub(crate) fn set_host_buffer_limit(&mut self, limit: usize) {
        self.budget = HostBufBudget::new(limit);
    }

    /// Bytes buffered for host sockets across every connection.
    pub(crate) fn host_buffered(&self) -> usize {
        self.budget.used()
    }

    /// Entries in the rx list (at most one per connection).
    pub(crate) fn rx_list_len(&self) -> usize {
        self.rx_ready.len()
    }

    fn schedule(&mut self, at: Option<Instant>, what: Timed) {
        if let Some(at) = at {
            self.deadlines.push(Reverse((at, what)));
            // Stale entries are dropped lazily; keep them from piling up.
            if self.deadlines.len() > 4 * self.open_count() + 64 {
                self.rebuild_deadlines();
            }
        }
    }

    fn rebuild_deadlines(&mut self) {
        let conns = self
            .conns
            .iter()
            .filter_map(|(k, c)| c.deadline().map(|d| Reverse((d, Timed::Conn(*k)))));
        let handshakes = self
            .handshakes
            .iter()
            .map(|(fd, h)| Reverse((h.deadline, Timed::Handshake(*fd))));
        self.deadlines = conns.chain(handshakes).collect();
    }

    /// Whether a heap entry still stands for its owner's deadline.
    fn current(&self, at: Instant, what: Timed) -> bool {
        match what {
            Timed::Conn(key) => self.conns.get(&key).and_then(Connection::deadline) == Some(at),
            Timed::Handshake(fd) => self.handshakes.get(&fd).map(|h| h.deadline) == Some(at),
        }
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    fn bury(&mut self, stream: UnixStream, registered: bool) {
        if registered {
            self.graveyard.push(Buried { stream, registered });
        }
        // Unregistered sockets are closed right away (dropped here).
    }

    fn rst_for(&self, key: ConnKey) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: VSOCK_TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        }
    }

    fn push_rst(&mut self, hdr: Header) {
        if self.rst_queue.len() >= MAX_RST_QUEUE {
            self.rst_queue.pop_front();
            if self.limiter.allow() {
                warn!("vsock: too many RSTs pending for the guest, dropping the oldest");
            }
        }
        self.rst_queue.push_back(hdr);
    }

    /// Answers a guest packet that has no connection with an RST.
    fn reply_rst(&mut self, to: &Header) {
        let hdr = Header {
            src_cid: to.dst_cid,
            dst_cid: to.src_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: VSOCK_TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        };
        self.push_rst(hdr);
    }

    /// Tears a connection down: closes the host socket and, if `rst` and
    /// the guest knows the connection, sends the guest an RST.
    fn kill(&mut self, key: ConnKey, rst: bool, reason: &str) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        if conn.in_rx_list {
            self.rx_ready.retain(|k| *k != key);
        }
        self.fd_to_key.remove(&conn.stream.as_raw_fd());
        if rst && conn.announced {
            let hdr = self.rst_for(key);
            self.push_rst(hdr);
        }
        dec(&self.metrics.conns_open);
        debug!(
            conn_id = conn.id,
            local_port = key.local_port,
            peer_port = key.peer_port,
            host_initiated = conn.host_initiated,
            reason,
            "vsock: connection closed"
        );
        self.bury(conn.stream, conn.registered.is_some());
    }

    /// Like [`Self::kill`] with an RST, for failures worth a warning.
    fn kill_on_error(&mut self, key: ConnKey, error: &dyn std::fmt::Display) {
        if let Some(conn) = self.conns.get(&key) {
            inc(&self.metrics.conns_reset);
            if self.limiter.allow() {
                warn!(
                    conn_id = conn.id,
                    local_port = key.local_port,
                    peer_port = key.peer_port,
                    "vsock: resetting connection: {error}"
                );
            }
        }
        self.kill(key, true, "error");
    }

    /// Whether so many RSTs are waiting that guest packets should wait.
    pub(crate) fn rx_backlog_full(&self) -> bool {
        self.rst_queue.len() >= RST_QUEUE_HIGH
    }

    /// Whether a packet waits for an rx buffer.
    pub(crate) fn has_pending_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_ready.is_empty()
    }

    /// The earliest timeout of any connection or handshake.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, what))) = self.deadlines.peek() {
            if self.current(at, what) {
                return Some(at);
            }
            self.deadlines.pop();
        }
        None
    }

    // ---- host side ----

    /// Accepts pending host connections on the listener.
    pub(crate) fn accept(&mut self, listener: &UnixListener, now: Instant) -> AcceptOutcome {
        for _ in 0..MAX_ACCEPTS_PER_EVENT {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return AcceptOutcome::Done,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let exhausted = matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    );
                    if self.limiter.allow() {
                        warn!("vsock: accepting a host connection: {e}");
                    }
                    if exhausted {
                        crate::metrics::inc(&METRICS.fd_exhaustion);
                        return AcceptOutcome::OutOfResources;
                    }
                    return AcceptOutcome::Done;
                }
            };
            if self.open_count() >= self.max_connections {
                inc(&self.metrics.conns_rejected);
                if self.limiter.allow() {
                    warn!(
                        "vsock: refusing a host connection: {} connections open",
                        self.max_connections
                    );
                }
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                warn!("vsock: making a host connection non-blocking: {e}");
                continue;
            }
            let id = self.next_id();
            let fd = stream.as_raw_fd();
            let deadline = now.checked_add(HANDSHAKE_TIMEOUT).unwrap_or(now);
            debug!(conn_id = id, "vsock: host connection accepted");
            self.handshakes
                .insert(fd, Handshake::new(id, stream, deadline));
            self.new_handshakes.push(fd);
            self.schedule(Some(deadline), Timed::Handshake(fd));
            inc(&self.metrics.conns_open);
            // The line may already be there.
            self.handshake_event(fd, now);
        }
        AcceptOutcome::Done
    }

    /// Reads more of a host's `CONNECT` line.
    pub(crate) fn handshake_event(&mut self, fd: RawFd, now: Instant) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        match hs.advance() {
            Ok(HandshakeProgress::Pending) => {}
            Ok(HandshakeProgress::Connect(port)) => {
                if let Some(hs) = self.handshakes.remove(&fd) {
                    self.start_local(hs, port, now);
                }
            }
            Err(e) => self.drop_handshake(fd, &e),
        }
    }

    fn drop_handshake(&mut self, fd: RawFd, reason: &dyn std::fmt::Display) {
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        inc(&self.metrics.handshake_errors);
        inc(&self.metrics.conns_rejected);
        dec(&self.metrics.conns_open);
        if self.limiter.allow() {
            warn!(conn_id = hs.id, "vsock: refusing host connection: {reason}");
        }
        self.bury(hs.stream, hs.registered);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = match port.checked_add(1) {
                Some(next) if next < u32::MAX => next,
                _ => LOCAL_PORT_BASE,
            };
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    fn start_local(&mut self, hs: Handshake, peer_port: u32, now: Instant) {
        let Some(local_port) = self.alloc_local_port(peer_port) else {
            inc(&self.metrics.conns_rejected);
            dec(&self.metrics.conns_open);
            warn!(conn_id = hs.id, "vsock: no free host port");
            self.bury(hs.stream, hs.registered);
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let fd = hs.stream.as_raw_fd();
        let registered = hs.registered.then_some((EV_HANDSHAKE, EventSet::IN));
        let mut conn = Connection::new_local(hs.id, key, hs.stream, now, self.budget.clone());
        conn.registered = registered;
        debug!(
            conn_id = conn.id,
            local_port, peer_port, "vsock: host connecting to guest port"
        );
        let deadline = conn.deadline();
        self.fd_to_key.insert(fd, key);
        self.conns.insert(key, conn);
        self.schedule(deadline, Timed::Conn(key));
        self.maintain_one(key, now);
    }

    /// An epoll event on a connected host socket.
    pub(crate) fn conn_event(&mut self, fd: RawFd, set: EventSet, now: Instant) {
        let Some(&key) = self.fd_to_key.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set.contains(EventSet::IN) {
            conn.notify_readable();
        }
        let hangup = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if hangup {
            conn.notify_hangup();
        }
        if set.contains(EventSet::OUT) || (hangup && conn.host_pending() > 0) {
            if let Err(e) = conn.flush_to_host(now) {
                self.kill_on_error(key, &e);
                return;
            }
        }
        self.maintain_one(key, now);
    }

    // ---- guest side ----

    /// A packet from the guest (tx queue).
    pub(crate) fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8], now: Instant) {
        inc(&self.metrics.tx_packets);
        add(&self.metrics.tx_bytes, payload.len() as u64);
        trace!(?hdr, "vsock: guest packet");

        if hdr.src_cid != self.guest_cid || hdr.type_ != VSOCK_TYPE_STREAM {
            inc(&self.metrics.tx_dropped);
            if self.limiter.allow() {
                warn!(
                    ?hdr,
                    "vsock: dropping guest packet with a bad source CID or type"
                );
            }
            return;
        }
        if hdr.dst_cid != HOST_CID {
            inc(&self.metrics.tx_dropped);
            if self.limiter.allow() {
                debug!(?hdr, "vsock: guest packet for a CID other than the host's");
            }
            if hdr.op != op::RST {
                self.reply_rst(hdr);
            }
            return;
        }

        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                op::REQUEST => self.connect_to_host(hdr),
                op::RST => {}
                _ => {
                    debug!(?hdr, "vsock: guest packet for no connection");
                    self.reply_rst(hdr);
                }
            }
            return;
        };

        conn.update_peer_credit(hdr);
        match hdr.op {
            op::RST => {
                if conn.state == super::connection::ConnState::LocalInit {
                    // Nothing listens on that guest port.
                    inc(&self.metrics.conns_rejected);
                    self.kill(key, false, "the guest refused the connection");
                } else {
                    inc(&self.metrics.conns_reset);
                    self.kill(key, false, "the guest reset the connection");
                }
                return;
            }
            op::RESPONSE => {
                if conn.accept_response() {
                    inc(&self.metrics.conns_host_initiated);
                    if self.metrics.record_response(key.peer_port, now) {
                        if let Some(hook) = self.response_hook.as_mut() {
                            (hook.0)(FirstResponse {
                                port: key.peer_port,
                                at: now,
                            });
                        }
                    }
                    debug!(
                        conn_id = conn.id,
                        local_port = key.local_port,
                        peer_port = key.peer_port,
                        "vsock: guest accepted host connection"
                    );
                    if let Err(e) = conn.flush_to_host(now) {
                        self.kill_on_error(key, &e);
                        return;
                    }
                } else {
                    self.kill_on_error(key, &"unexpected RESPONSE");
                    return;
                }
            }
            op::RW => {
                if let Err(e) = conn.recv_data(payload) {
                    self.kill_on_error(key, &e);
                    return;
                }
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => conn.request_credit_update(),
            op::SHUTDOWN => conn.guest_shutdown(hdr.flags),
            other => {
                let msg = format!("unexpected {} (op {other})", op_name(other));
                self.kill_on_error(key, &msg);
                return;
            }
        }
        self.maintain_one(key, now);
    }

    /// A guest REQUEST to host port P: connect to `<uds_path>_P`.
    fn connect_to_host(&mut self, hdr: &Header) {
        if self.open_count() >= self.max_connections {
            inc(&self.metrics.conns_rejected);
            if self.limiter.allow() {
                warn!(
                    port = hdr.dst_port,
                    "vsock: refusing guest connection: {} connections open", self.max_connections
                );
            }
            self.reply_rst(hdr);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", hdr.dst_port));
        let path = PathBuf::from(path);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let key = ConnKey {
                    local_port: hdr.dst_port,
                    peer_port: hdr.src_port,
                };
                let id = self.next_id();
                debug!(
                    conn_id = id,
                    local_port = key.local_port,
                    peer_port = key.peer_port,
                    path = %path.display(),
                    "vsock: guest connected to host socket"
                );
                let conn = Connection::new_peer(id, key, stream, hdr, self.budget.clone());
                self.fd_to_key.insert(conn.stream.as_raw_fd(), key);
                self.conns.insert(key, conn);
                inc(&self.metrics.conns_open);
                inc(&self.metrics.conns_guest_initiated);
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.in_rx_list = true;
                    self.rx_ready.push_back(key);
                }
                self.dirty.push(key);
            }
            Err(e) => {
                inc(&self.metrics.conns_rejected);
                debug!(
                    path = %path.display(),
                    "vsock: guest connection refused: {e}"
                );
                self.reply_rst(hdr);
            }
        }
    }

    // ---- upkeep ----

    /// Applies a connection's latest changes: kills it if it is over,
    /// queues it for the rx queue if it has something for the guest.
    fn maintain_one(&mut self, key: ConnKey, now: Instant) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let before = conn.deadline();
        match conn.maintain(now) {
            Verdict::Keep => {
                if conn.wants_rx() && !conn.in_rx_list {
                    conn.in_rx_list = true;
                    self.rx_ready.push_back(key);
                }
                let after = conn.deadline();
                self.dirty.push(key);
                if after != before {
                    self.schedule(after, Timed::Conn(key));
                }
            }
            Verdict::Kill { reason } => self.kill(key, true, reason),
        }
    }

    /// Applies timeouts and the latest changes of every connection.
    pub(crate) fn maintain(&mut self, now: Instant) {
        let mut dead = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            match conn.maintain(now) {
                Verdict::Keep => {
                    if conn.wants_rx() && !conn.in_rx_list {
                        conn.in_rx_list = true;
                        self.rx_ready.push_back(*key);
                    }
                    self.dirty.push(*key);
                }
                Verdict::Kill { reason } => dead.push((*key, reason)),
            }
        }
        for (key, reason) in dead {
            self.kill(key, true, reason);
        }
        // Deadlines may have moved anywhere: start the heap afresh.
        self.rebuild_deadlines();
        let expired: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, hs)| now >= hs.deadline)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in expired {
            self.drop_handshake(fd, &"no CONNECT line in time");
        }
    }

    /// Fills one guest rx buffer with the next packet: RSTs first, then
    /// connections in turn. Returns the length written (0 if the buffer
    /// could not be written), or `None` if nothing is waiting.
    pub(crate) fn fill_rx(
        &mut self,
        mem: &GuestMemoryMmap,
        buf: &RxBuffer,
        scratch: &mut [u8],
        now: Instant,
    ) -> Option<u32> {
        // Each waiting connection is asked at most once per call.
        let mut rounds = self.rx_ready.len();
        loop {
            if let Some(hdr) = self.rst_queue.pop_front() {
                return Some(self.write_packet(mem, buf, &hdr, &[]));
            }
            if rounds == 0 {
                return None;
            }
            rounds -= 1;
            let key = self.rx_ready.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_list = false;
            let outcome = match conn.next_packet(buf.payload_capacity(), scratch) {
                Ok(outcome) => outcome,
                Err(e) => {
                    self.kill_on_error(key, &e);
                    continue;
                }
            };
            let RxOutcome::Packet {
                op,
                flags,
                payload_len,
            } = outcome
            else {
                continue;
            };
            let mut hdr = Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.local_port,
                dst_port: key.peer_port,
                type_: VSOCK_TYPE_STREAM,
                op,
                flags,
                ..Header::default()
            };
            conn.stamp_credit(&mut hdr);
            let payload = scratch.get(..payload_len).unwrap_or_default();
            let written = match buf.write(mem, &hdr, payload) {
                Ok(n) => {
                    inc(&self.metrics.rx_packets);
                    add(&self.metrics.rx_bytes, payload.len() as u64);
                    trace!(?hdr, "vsock: packet for the guest");
                    n
                }
                Err(e) => {
                    // The bytes read from the host are lost: the stream is broken.
                    self.kill_on_error(key, &e);
                    return Some(0);
                }
            };
            self.maintain_one(key, now);
            return Some(written);
        }
    }

    fn write_packet(
        &mut self,
        mem: &GuestMemoryMmap,
        buf: &RxBuffer,
        hdr: &Header,
        payload: &[u8],
    ) -> u32 {
        match buf.write(mem, hdr, payload) {
            Ok(n) => {
                inc(&self.metrics.rx_packets);
                trace!(?hdr, "vsock: packet for the guest");
                n
            }
            Err(e) => {
                if self.limiter.allow() {
                    warn!(?hdr, "vsock: writing a packet for the guest: {e}");
                }
                0
            }
        }
    }

    /// Drops every connection (device reset). Host sockets are closed
    /// once removed from the epoll set ([`Self::sync_epoll`]).
    pub(crate) fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.kill(key, false, "device reset");
        }
        let fds: Vec<RawFd> = self.handshakes.keys().copied().collect();
        for fd in fds {
            if let Some(hs) = self.handshakes.remove(&fd) {
                dec(&self.metrics.conns_open);
                self.bury(hs.stream, hs.registered);
            }
        }
        self.fd_to_key.clear();
        self.rx_ready.clear();
        self.rst_queue.clear();
        self.dirty.clear();
        self.new_handshakes.clear();
        self.deadlines.clear();
    }

    /// Brings the event manager's epoll set in line with what each host
    /// socket needs, and closes the sockets of dead connections.
    pub(crate) fn sync_epoll(&mut self, ops: &mut EventOps<'_>) {
        self.empty_graveyard(ops);

        let mut failed_handshakes = Vec::new();
        for fd in self.new_handshakes.drain(..) {
            let Some(hs) = self.handshakes.get_mut(&fd) else {
                continue;
            };
            if !hs.registered {
                match ops.add(Events::with_data(&hs.stream, EV_HANDSHAKE, EventSet::IN)) {
                    Ok(()) => hs.registered = true,
                    Err(e) => failed_handshakes.push((fd, e)),
                }
            }
        }
        for (fd, e) in failed_handshakes {
            self.drop_handshake(fd, &format!("registering with epoll: {e}"));
        }

        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        let mut failed = Vec::new();
        for key in dirty.drain(..) {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let want = conn.interest().map(|set| (EV_CONN, set));
            if want == conn.registered {
                continue;
            }
            let result = match (conn.registered, want) {
                (None, Some((data, set))) => ops.add(Events::with_data(&conn.stream, data, set)),
                (Some(_), Some((data, set))) => {
                    ops.modify(Events::with_data(&conn.stream, data, set))
                }
                (Some(_), None) => ops.remove(Events::empty(&conn.stream)),
                (None, None) => Ok(()),
            };
            match result {
                Ok(()) => conn.registered = want,
                Err(e) => failed.push((key, e)),
            }
        }
        // Keep the allocation for the next event.
        self.dirty = dirty;
        for (key, e) in failed {
            // Whether it is still registered is unknown: assume it is, so
            // that it is removed (harmlessly failing if it was not).
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.registered = conn.registered.or(Some((EV_CONN, EventSet::empty())));
            }
            self.kill_on_error(key, &format!("registering with epoll: {e}"));
        }

        self.empty_graveyard(ops);
    }

    fn empty_graveyard(&mut self, ops: &mut EventOps<'_>) {
        for buried in self.graveyard.drain(..) {
            if buried.registered {
                // Fails only if it was not registered after all.
                let _ = ops.remove(Events::empty(&buried.stream));
            }
            drop(buried.stream);
        }
    }
}
