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
//! The muxer ties the device's parts together: the connection table
//! (`table.rs`: streams, handshakes, the dirty list, timeouts), the rx
//! queue (`rxq.rs`: what waits for the guest's rx buffers), and the kill
//! queue (`kill.rs`: host sockets of dead streams, closed once out of the
//! epoll set). It turns guest packets and host socket events into changes
//! of connections, and keeps the event manager's epoll set in line.
//!
//! No event walks every connection: each event updates the connections it
//! touches, which join the table's dirty list that [`Muxer::sync_epoll`]
//! drains, and timeouts sit in a min-heap; only the timer's sweep looks at
//! them all. The rx list holds each connection at most once and loses it
//! when the connection dies, so it never outgrows the table.
mod guest;
mod host;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use tracing::{debug, trace, warn};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::connection::{ConnKey, HostBufBudget, RxOutcome, Verdict};
use super::kill::KillQueue;
use super::metrics::{add, dec, inc, FirstResponse, VsockMetrics};
use super::packet::{op, Header, RxBuffer, VSOCK_TYPE_STREAM};
use super::rxq::RxQueue;
use super::table::ConnTable;
use super::{HOST_BUFFER_LIMIT, HOST_CID, MAX_CONNECTIONS};
use crate::guest_log::LogLimiter;

/// Event data of a host socket still in its `CONNECT` handshake.
pub(crate) const EV_HANDSHAKE: u32 = 100;
/// Event data of a connected host socket.
pub(crate) const EV_CONN: u32 = 101;

/// Host ports for host-initiated streams are allocated from here up.
pub const LOCAL_PORT_BASE: u32 = 1 << 30;

/// How long a host process has to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

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
    pub(crate) table: ConnTable,
    rxq: RxQueue,
    kills: KillQueue,
    /// A reused buffer for the table's dirty list.
    dirty_buf: Vec<ConnKey>,
    budget: Arc<HostBufBudget>,
    max_connections: usize,
    /// Whether the guest's connections to host ports reach `<uds>_P`
    /// (false in a jail: they are refused without a system call).
    guest_connects: bool,
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
            table: ConnTable::default(),
            rxq: RxQueue::default(),
            kills: KillQueue::default(),
            dirty_buf: Vec::new(),
            budget: HostBufBudget::new(HOST_BUFFER_LIMIT),
            max_connections: MAX_CONNECTIONS,
            guest_connects: true,
            next_local_port: LOCAL_PORT_BASE,
            next_id: 1,
            metrics,
            limiter: LogLimiter::new("vsock"),
            response_hook: None,
        }
    }

    fn open_count(&self) -> usize {
        self.table.open_count()
    }

    /// Lowers the connection cap (never above [`MAX_CONNECTIONS`]), e.g.
    /// when the process may not open that many file descriptors.
    pub(crate) fn set_max_connections(&mut self, max: usize) {
        self.max_connections = max.clamp(1, MAX_CONNECTIONS);
    }

    pub(crate) fn set_guest_connects(&mut self, allowed: bool) {
        self.guest_connects = allowed;
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
        self.rxq.conns_len()
    }

    /// Entries in the timeout heap.
    #[cfg(test)]
    pub(crate) fn deadline_heap_len(&self) -> usize {
        self.table.heap_len()
    }

    /// Host sockets waiting to be closed.
    #[cfg(test)]
    pub(crate) fn buried(&self) -> usize {
        self.kills.len()
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    fn bury(&mut self, stream: UnixStream, registered: bool) {
        self.kills.bury(stream, registered);
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
        if !self.rxq.push_rst(hdr) && self.limiter.allow() {
            warn!("vsock: too many RSTs pending for the guest, dropping the oldest");
        }
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
        let Some(conn) = self.table.remove(key) else {
            return;
        };
        if conn.in_rx_list {
            self.rxq.remove_conn(key);
        }
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
        if let Some(conn) = self.table.get_mut(&key) {
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
        self.rxq.backlog_full()
    }

    /// Whether a packet waits for an rx buffer.
    pub(crate) fn has_pending_rx(&self) -> bool {
        self.rxq.has_pending()
    }

    /// The earliest timeout of any connection or handshake.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        self.table.next_deadline()
    }

    // ---- upkeep ----

    /// Applies a connection's latest changes: kills it if it is over,
    /// queues it for the rx queue if it has something for the guest.
    fn maintain_one(&mut self, key: ConnKey, now: Instant) {
        let Some(conn) = self.table.get_mut(&key) else {
            return;
        };
        let before = conn.deadline();
        match conn.maintain(now) {
            Verdict::Keep => {
                if conn.wants_rx() && !conn.in_rx_list {
                    conn.in_rx_list = true;
                    self.rxq.push_conn(key);
                }
                let after = conn.deadline();
                self.table.mark_dirty(key);
                if after != before {
                    self.table.schedule_conn(key, after);
                }
            }
            Verdict::Kill { reason } => self.kill(key, true, reason),
        }
    }

    /// Applies timeouts and the latest changes of every connection.
    pub(crate) fn maintain(&mut self, now: Instant) {
        let mut dead = Vec::new();
        let mut touched = Vec::new();
        for (key, conn) in self.table.conns.iter_mut() {
            match conn.maintain(now) {
                Verdict::Keep => {
                    if conn.wants_rx() && !conn.in_rx_list {
                        conn.in_rx_list = true;
                        self.rxq.push_conn(*key);
                    }
                    touched.push(*key);
                }
                Verdict::Kill { reason } => dead.push((*key, reason)),
            }
        }
        for key in touched {
            self.table.mark_dirty(key);
        }
        for (key, reason) in dead {
            self.kill(key, true, reason);
        }
        // Deadlines may have moved anywhere: start the heap afresh.
        self.table.rebuild_deadlines();
        let expired: Vec<RawFd> = self
            .table
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
        let mut rounds = self.rxq.conns_len();
        loop {
            if let Some(hdr) = self.rxq.pop_rst() {
                return Some(self.write_packet(mem, buf, &hdr, &[]));
            }
            if rounds == 0 {
                return None;
            }
            rounds -= 1;
            let key = self.rxq.pop_conn()?;
            let Some(conn) = self.table.get_mut(&key) else {
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
                // Its state changed all the same (a read that would block
                // means the host socket must be polled again).
                self.maintain_one(key, now);
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
        let keys: Vec<ConnKey> = self.table.conns.keys().copied().collect();
        for key in keys {
            self.kill(key, false, "device reset");
        }
        let fds: Vec<RawFd> = self.table.handshakes.keys().copied().collect();
        for fd in fds {
            if let Some(hs) = self.table.remove_handshake(fd) {
                dec(&self.metrics.conns_open);
                self.bury(hs.stream, hs.registered);
            }
        }
        self.table.clear();
        self.rxq.clear();
    }

    /// Brings the event manager's epoll set in line with what each host
    /// socket needs, and closes the sockets of dead connections.
    pub(crate) fn sync_epoll(&mut self, ops: &mut EventOps<'_>) {
        self.kills.empty(ops);

        let mut failed_handshakes = Vec::new();
        for fd in self.table.take_new_handshakes() {
            let Some(hs) = self.table.handshakes.get_mut(&fd) else {
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

        let mut dirty = std::mem::take(&mut self.dirty_buf);
        self.table.take_dirty(&mut dirty);
        let mut failed = Vec::new();
        for key in dirty.drain(..) {
            let Some(conn) = self.table.get_mut(&key) else {
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
        // Keep the allocations for the next event.
        self.dirty_buf = dirty;
        for (key, e) in failed {
            // Whether it is still registered is unknown: assume it is, so
            // that it is removed (harmlessly failing if it was not).
            if let Some(conn) = self.table.get_mut(&key) {
                conn.registered = conn.registered.or(Some((EV_CONN, EventSet::empty())));
            }
            self.kill_on_error(key, &format!("registering with epoll: {e}"));
        }

        self.kills.empty(ops);
    }
}
