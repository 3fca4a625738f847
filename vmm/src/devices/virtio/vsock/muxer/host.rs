//! The host side of the muxer: accepting host connections, their
//! `CONNECT` handshakes, host-initiated streams, host socket events.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::time::Instant;

use tracing::{debug, warn};
use vmm_sys_util::epoll::EventSet;

use super::{
    AcceptOutcome, Muxer, EV_HANDSHAKE, HANDSHAKE_TIMEOUT, LOCAL_PORT_BASE, MAX_ACCEPTS_PER_EVENT,
};
use crate::devices::virtio::vsock::connection::{ConnKey, Connection};
use crate::devices::virtio::vsock::handshake::{Handshake, HandshakeProgress};
use crate::devices::virtio::vsock::metrics::{dec, inc};
use crate::devices::virtio::vsock::MAX_CONNECTIONS;
use crate::metrics::METRICS;

impl Muxer {
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
            self.table
                .insert_handshake(fd, Handshake::new(id, stream, deadline));
            inc(&self.metrics.conns_open);
            // The line may already be there.
            self.handshake_event(fd, now);
        }
        AcceptOutcome::Done
    }

    /// Reads more of a host's `CONNECT` line.
    pub(crate) fn handshake_event(&mut self, fd: RawFd, now: Instant) {
        let Some(hs) = self.table.handshakes.get_mut(&fd) else {
            return;
        };
        match hs.advance() {
            Ok(HandshakeProgress::Pending) => {}
            Ok(HandshakeProgress::Connect(port)) => {
                if let Some(hs) = self.table.remove_handshake(fd) {
                    self.start_local(hs, port, now);
                }
            }
            Err(e) => self.drop_handshake(fd, &e),
        }
    }

    pub(super) fn drop_handshake(&mut self, fd: RawFd, reason: &dyn std::fmt::Display) {
        let Some(hs) = self.table.remove_handshake(fd) else {
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

    pub(super) fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
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
            if !self.table.contains(&key) {
                return Some(port);
            }
        }
        None
    }

    pub(super) fn start_local(&mut self, hs: Handshake, peer_port: u32, now: Instant) {
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
        let registered = hs.registered.then_some((EV_HANDSHAKE, EventSet::IN));
        let mut conn = Connection::new_local(hs.id, key, hs.stream, now, self.budget.clone());
        conn.registered = registered;
        debug!(
            conn_id = conn.id,
            local_port, peer_port, "vsock: host connecting to guest port"
        );
        self.table.insert(key, conn);
        self.maintain_one(key, now);
    }

    /// An epoll event on a connected host socket.
    pub(crate) fn conn_event(&mut self, fd: RawFd, set: EventSet, now: Instant) {
        let Some(key) = self.table.key_of(fd) else {
            return;
        };
        let Some(conn) = self.table.get_mut(&key) else {
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
}
