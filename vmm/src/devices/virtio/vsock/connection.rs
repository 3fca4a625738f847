//! One vsock stream between a guest port and a host Unix socket: its
//! state, its credit accounting and the bytes waiting for the host.
//!
//! Data towards the guest is never buffered here: it is read from the
//! host socket only when the guest has both credit and an rx buffer for
//! it. Data towards the host is written straight to the socket, and only
//! what the socket does not take is kept, in a buffer that the credit we
//! advertise ([`CONN_BUF_ALLOC`]) bounds: a guest sending beyond its
//! credit has its connection reset.
//!
//! Naming: "peer" is the guest side, "local" the host side.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

use super::packet::{op, Header, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The receive buffer each connection advertises to the guest
/// (`buf_alloc`), and so the most guest data it ever holds for a host
/// socket that does not read.
pub const CONN_BUF_ALLOC: u32 = 128 * 1024;

/// The most guest data all of a VM's connections together hold for host
/// sockets that do not read. Each connection's credit bounds its own share
/// ([`CONN_BUF_ALLOC`]); without this, 1024 connections could pin 128 MiB.
pub const HOST_BUFFER_LIMIT: usize = 16 << 20;

/// Bytes buffered for the host across one device's connections.
#[derive(Debug)]
pub struct HostBufBudget {
    used: AtomicUsize,
    limit: usize,
}

impl HostBufBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(HostBufBudget {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes currently buffered.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn fits(&self, more: usize) -> bool {
        self.used().saturating_add(more) <= self.limit
    }

    /// Moves the account from `old` to `new` bytes.
    fn update(&self, old: usize, new: usize) {
        if new >= old {
            self.used.fetch_add(new - old, Ordering::Relaxed);
        } else {
            self.used.fetch_sub(old - new, Ordering::Relaxed);
        }
    }
}

/// A credit update is sent once this many bytes were forwarded to the
/// host since the guest last heard our `fwd_cnt`.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// How long the guest has to answer a host-initiated REQUEST.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a closing connection may go without the host taking any of
/// the guest's last bytes before it is reset.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// A buffer for the host this large is released once empty, so that idle
/// connections do not pin memory.
const SHRINK_ABOVE: usize = 16 * 1024;

/// Identifies a stream: (host port, guest port).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: a REQUEST is (to be) sent, waiting for RESPONSE.
    LocalInit,
    /// Data flows.
    Established,
}

const PENDING_REQUEST: u8 = 1;
const PENDING_RESPONSE: u8 = 2;
const PENDING_CREDIT_UPDATE: u8 = 4;
const PENDING_CREDIT_REQUEST: u8 = 8;

/// Why a connection must be reset.
#[derive(Debug, Error)]
pub enum ConnError {
    #[error("guest sent {len} bytes with only {free} bytes of credit")]
    CreditViolation { len: usize, free: u32 },
    #[error("guest sent data on a connection that is not established")]
    NotEstablished,
    #[error("guest sent data after shutting down its sending side")]
    DataAfterShutdown,
    #[error("the VM's host-side buffers are full ({limit} bytes); this stream's host socket does not read")]
    VmBufferFull { limit: usize },
    #[error("writing to the host socket: {0}")]
    HostWrite(io::Error),
    #[error("reading from the host socket: {0}")]
    HostRead(io::Error),
}

/// A packet a connection wants to give the guest. The payload of an RW
/// packet is in the scratch buffer passed to [`Connection::next_packet`].
#[derive(Debug, PartialEq, Eq)]
pub enum RxOutcome {
    Packet {
        op: u16,
        flags: u32,
        payload_len: usize,
    },
    Nothing,
}

/// What should happen to a connection after a change.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Close the host socket; send the guest an RST if it knows the
    /// connection.
    Kill {
        reason: &'static str,
    },
}

#[derive(Debug)]
pub struct Connection {
    /// For logs.
    pub id: u64,
    pub key: ConnKey,
    pub stream: UnixStream,
    pub state: ConnState,
    pub host_initiated: bool,
    /// The (event data, interest) the stream is registered with in the
    /// event manager, if it is.
    pub registered: Option<(u32, EventSet)>,
    /// Whether the guest heard of this connection (so must get an RST).
    pub announced: bool,
    /// Whether the connection is in the muxer's list of connections with
    /// something for the guest.
    pub in_rx_list: bool,
    deadline: Option<Instant>,
    pending: u8,
    /// Bytes for the host that the socket has not taken yet.
    host_buf: VecDeque<u8>,
    /// Our share of the device-wide account of `host_buf` bytes.
    share: BudgetShare,
    /// How many bytes at the front of `host_buf` are not guest data (the
    /// `OK <port>\n` line).
    preamble: usize,
    /// Guest data bytes received / forwarded to the host.
    recv_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    sent_cnt: Wrapping<u32>,
    /// The guest's receive buffer and how much of it it consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The host socket may have data (we stopped polling it for EPOLLIN).
    host_readable: bool,
    /// The host will send no more (read returned 0).
    host_eof: bool,
    /// The host socket hung up or failed: it takes nothing more.
    host_hup: bool,
    /// We shut down our writing half (the guest will send no more).
    host_write_shut: bool,
    /// SHUTDOWN flags the guest sent / we sent.
    guest_shut: u32,
    shutdown_sent: u32,
}

impl Connection {
    fn new(
        id: u64,
        key: ConnKey,
        stream: UnixStream,
        state: ConnState,
        budget: Arc<HostBufBudget>,
    ) -> Self {
        Connection {
            id,
            key,
            stream,
            state,
            host_initiated: state == ConnState::LocalInit,
            registered: None,
            announced: false,
            in_rx_list: false,
            deadline: None,
            pending: 0,
            host_buf: VecDeque::new(),
            share: BudgetShare {
                budget,
                accounted: 0,
            },
            preamble: 0,
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            sent_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            host_readable: false,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            guest_shut: 0,
            shutdown_sent: 0,
        }
    }

    /// A host-initiated connection: a REQUEST for the guest is pending.
    pub fn new_local(
        id: u64,
        key: ConnKey,
        stream: UnixStream,
        now: Instant,
        budget: Arc<HostBufBudget>,
    ) -> Self {
        let mut conn = Connection::new(id, key, stream, ConnState::LocalInit, budget);
        conn.pending = PENDING_REQUEST;
        conn.deadline = now.checked_add(REQUEST_TIMEOUT);
        conn
    }

    /// A guest-initiated connection whose host socket is connected: a
    /// RESPONSE for the guest is pending.
    pub fn new_peer(
        id: u64,
        key: ConnKey,
        stream: UnixStream,
        request: &Header,
        budget: Arc<HostBufBudget>,
    ) -> Self {
        let mut conn = Connection::new(id, key, stream, ConnState::Established, budget);
        conn.pending = PENDING_RESPONSE;
        conn.announced = true;
        conn.update_peer_credit(request);
        conn
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The credit information every guest packet carries.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// How many bytes the guest can take now. A guest reporting more
    /// consumed than it was sent simply gets nothing more.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.sent_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Fills the credit fields of a packet for the guest, which tells it
    /// our current `fwd_cnt`.
    pub fn stamp_credit(&mut self, hdr: &mut Header) {
        hdr.buf_alloc = CONN_BUF_ALLOC;
        hdr.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !PENDING_CREDIT_UPDATE;
    }

    fn can_send_data(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && self.guest_shut & SHUTDOWN_RCV == 0
    }

    fn desired_shutdown(&self) -> u32 {
        let mut flags = 0;
        if self.host_eof {
            flags |= SHUTDOWN_SEND;
        }
        if self.host_hup {
            flags |= SHUTDOWN_RCV;
        }
        flags
    }

    /// Whether the connection has a packet for the guest.
    pub fn wants_rx(&self) -> bool {
        self.pending != 0
            || (self.can_send_data() && self.host_readable && self.peer_credit() > 0)
            || (self.state == ConnState::Established
                && self.desired_shutdown() & !self.shutdown_sent != 0)
    }

    /// The epoll interest the host socket needs, `None` once it hung up
    /// (epoll would report the hang-up forever).
    pub fn interest(&self) -> Option<EventSet> {
        if self.host_hup {
            return None;
        }
        let mut set = EventSet::empty();
        if self.can_send_data() && !self.host_readable && self.peer_credit() > 0 {
            set |= EventSet::IN;
        }
        if !self.host_buf.is_empty() {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    /// The host socket is readable.
    pub fn notify_readable(&mut self) {
        self.host_readable = true;
    }

    /// The host socket hung up or has an error: it will not take more
    /// data, and whatever it still has is read until EOF (or the error).
    pub fn notify_hangup(&mut self) {
        self.host_hup = true;
        self.host_readable = true;
    }

    /// The guest answered our REQUEST: the stream is established and the
    /// host learns its port. Returns false if the connection was not
    /// waiting for a RESPONSE.
    pub fn accept_response(&mut self) -> bool {
        if self.state != ConnState::LocalInit || self.pending & PENDING_REQUEST != 0 {
            return false;
        }
        self.state = ConnState::Established;
        self.deadline = None;
        let line = format!("OK {}\n", self.key.local_port);
        self.preamble = line.len();
        self.host_buf.extend(line.as_bytes());
        self.sync_budget();
        true
    }

    /// The guest asked for our credit.
    pub fn request_credit_update(&mut self) {
        self.pending |= PENDING_CREDIT_UPDATE;
    }

    /// The guest sent SHUTDOWN with `flags`; they only ever accumulate.
    pub fn guest_shutdown(&mut self, flags: u32) {
        self.guest_shut |= flags & SHUTDOWN_BOTH;
    }

    /// Guest data for the host. Fails if the guest broke flow control or
    /// the protocol, or the host socket failed.
    pub fn recv_data(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.state != ConnState::Established {
            return Err(ConnError::NotEstablished);
        }
        if self.guest_shut & SHUTDOWN_SEND != 0 {
            return Err(ConnError::DataAfterShutdown);
        }
        let buffered = (self.recv_cnt - self.fwd_cnt).0;
        let free = CONN_BUF_ALLOC.saturating_sub(buffered);
        let len = match u32::try_from(data.len()) {
            Ok(len) if len <= free => len,
            _ => {
                return Err(ConnError::CreditViolation {
                    len: data.len(),
                    free,
                })
            }
        };
        self.recv_cnt += Wrapping(len);
        let mut rest = data;
        if self.host_buf.is_empty() {
            loop {
                match self.stream.write(data) {
                    Ok(n) => {
                        self.account_flushed(n);
                        rest = data.get(n..).unwrap_or_default();
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(ConnError::HostWrite(e)),
                }
            }
        }
        if !rest.is_empty() {
            if !self.share.budget.fits(rest.len()) {
                return Err(ConnError::VmBufferFull {
                    limit: self.share.budget.limit,
                });
            }
            self.host_buf.extend(rest);
            self.sync_budget();
        }
        Ok(())
    }

    /// Brings the device-wide account in line with `host_buf`.
    fn sync_budget(&mut self) {
        self.share.set(self.host_buf.len());
    }

    /// Writes what the host socket takes of the pending bytes.
    pub fn flush_to_host(&mut self, now: Instant) -> Result<(), ConnError> {
        while !self.host_buf.is_empty() {
            let (front, back) = self.host_buf.as_slices();
            let chunk = if front.is_empty() { back } else { front };
            match self.stream.write(chunk) {
                Ok(0) => return Err(ConnError::HostWrite(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    let n = n.min(self.host_buf.len());
                    self.host_buf.drain(..n);
                    self.account_flushed(n);
                    if self.deadline.is_some() && self.state == ConnState::Established {
                        // Closing, and the host makes progress: give it more time.
                        self.deadline = now.checked_add(SHUTDOWN_TIMEOUT);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(ConnError::HostWrite(e)),
            }
        }
        if self.host_buf.is_empty() && self.host_buf.capacity() > SHRINK_ABOVE {
            self.host_buf = VecDeque::new();
        }
        self.sync_budget();
        Ok(())
    }

    fn account_flushed(&mut self, n: usize) {
        let preamble = n.min(self.preamble);
        self.preamble -= preamble;
        let data = u32::try_from(n - preamble).unwrap_or(u32::MAX);
        self.fwd_cnt += Wrapping(data);
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= PENDING_CREDIT_UPDATE;
        }
    }

    /// Produces the next packet for the guest, reading host data into
    /// `scratch` (at most `capacity` bytes, and never beyond the guest's
    /// credit). Returns an error if the host socket failed.
    pub fn next_packet(
        &mut self,
        capacity: usize,
        scratch: &mut [u8],
    ) -> Result<RxOutcome, ConnError> {
        let packet = |op, flags, payload_len| {
            Ok(RxOutcome::Packet {
                op,
                flags,
                payload_len,
            })
        };
        if self.pending & PENDING_REQUEST != 0 {
            self.pending &= !PENDING_REQUEST;
            self.announced = true;
            return packet(op::REQUEST, 0, 0);
        }
        if self.pending & PENDING_RESPONSE != 0 {
            self.pending &= !PENDING_RESPONSE;
            return packet(op::RESPONSE, 0, 0);
        }
        if self.can_send_data() && self.host_readable {
            let credit = usize::try_from(self.peer_credit()).unwrap_or(usize::MAX);
            let max = credit.min(capacity).min(scratch.len());
            if let Some(buf) = scratch.get_mut(..max).filter(|b| !b.is_empty()) {
                match self.stream.read(buf) {
                    Ok(0) => {
                        self.host_eof = true;
                        self.host_readable = false;
                    }
                    Ok(n) => {
                        let n = n.min(max);
                        self.sent_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                        if self.peer_credit() == 0 {
                            // Ask the guest to tell us when it has room.
                            self.pending |= PENDING_CREDIT_REQUEST;
                        }
                        return packet(op::RW, 0, n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if self.host_hup {
                            // A hung-up socket is never polled again: a read
                            // that would block can only mean it is drained.
                            self.host_eof = true;
                        }
                        self.host_readable = false;
                    }
                    Err(e) => return Err(ConnError::HostRead(e)),
                }
            }
        }
        let shutdown = self.desired_shutdown();
        if self.state == ConnState::Established && shutdown & !self.shutdown_sent != 0 {
            self.shutdown_sent |= shutdown;
            return packet(op::SHUTDOWN, self.shutdown_sent, 0);
        }
        if self.pending & PENDING_CREDIT_UPDATE != 0 {
            self.pending &= !PENDING_CREDIT_UPDATE;
            return packet(op::CREDIT_UPDATE, 0, 0);
        }
        if self.pending & PENDING_CREDIT_REQUEST != 0 {
            self.pending &= !PENDING_CREDIT_REQUEST;
            // Worth asking only while still out of credit.
            if self.peer_credit() == 0 {
                return packet(op::CREDIT_REQUEST, 0, 0);
            }
        }
        Ok(RxOutcome::Nothing)
    }

    /// Applies the consequences of the latest changes: closes the host
    /// writing half once the guest is done sending, and decides whether
    /// the connection is over.
    pub fn maintain(&mut self, now: Instant) -> Verdict {
        if self.guest_shut & SHUTDOWN_SEND != 0
            && self.host_buf.is_empty()
            && !self.host_write_shut
            && !self.host_hup
        {
            // The host reads EOF; errors (it already closed) do not matter.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return Verdict::Kill {
                reason: match self.state {
                    ConnState::LocalInit => "the guest did not answer the request in time",
                    ConnState::Established => "the host did not drain the stream in time",
                },
            };
        }
        match self.state {
            ConnState::LocalInit => {
                if self.host_hup {
                    return Verdict::Kill {
                        reason: "the host closed the socket before the guest answered",
                    };
                }
            }
            ConnState::Established => {
                // Nothing more will reach the guest: the host finished (and
                // the guest was told) or the guest stopped receiving.
                let to_guest_done = (self.host_eof && self.shutdown_sent & SHUTDOWN_SEND != 0)
                    || self.guest_shut & SHUTDOWN_RCV != 0;
                // Nothing more will reach the host: the guest finished and
                // all was written, or the host hung up.
                let to_host_done = (self.guest_shut & SHUTDOWN_SEND != 0
                    && self.host_buf.is_empty())
                    || self.host_hup;
                if to_guest_done && to_host_done {
                    return Verdict::Kill {
                        reason: "both directions shut down",
                    };
                }
                if self.guest_shut == SHUTDOWN_BOTH
                    && !self.host_buf.is_empty()
                    && self.deadline.is_none()
                {
                    self.deadline = now.checked_add(SHUTDOWN_TIMEOUT);
                }
            }
        }
        Verdict::Keep
    }

    /// Host-bound bytes not written yet (for tests and stats).
    pub fn host_pending(&self) -> usize {
        self.host_buf.len()
    }
}

/// One connection's share of a [`HostBufBudget`], returned when dropped.
#[derive(Debug)]
struct BudgetShare {
    budget: Arc<HostBufBudget>,
    accounted: usize,
}

impl BudgetShare {
    fn set(&mut self, bytes: usize) {
        self.budget.update(self.accounted, bytes);
        self.accounted = bytes;
    }
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        self.budget.update(self.accounted, 0);
    }
}
