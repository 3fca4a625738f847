//! The connection table: streams by key and by host socket, the host
//! sockets still in their `CONNECT` handshake, which of them an event
//! touched (the dirty list [`super::muxer::Muxer::sync_epoll`] drains), and
//! their timeouts in a min-heap.
//!
//! No event needs to walk every connection: what an event touches is
//! marked dirty, and the earliest timeout is the heap's top. Heap entries
//! whose owner is gone or moved its deadline are skipped lazily, and the
//! heap is rebuilt when stale entries pile up.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use super::connection::{ConnKey, Connection};
use super::handshake::Handshake;

/// Something with a timeout: a connection or a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timed {
    Conn(ConnKey),
    Handshake(RawFd),
}

#[derive(Debug, Default)]
pub(crate) struct ConnTable {
    pub(crate) conns: HashMap<ConnKey, Connection>,
    fd_to_key: HashMap<RawFd, ConnKey>,
    pub(crate) handshakes: HashMap<RawFd, Handshake>,
    dirty: Vec<ConnKey>,
    new_handshakes: Vec<RawFd>,
    deadlines: BinaryHeap<Reverse<(Instant, Timed)>>,
}

impl ConnTable {
    /// Connections and handshakes.
    pub(crate) fn open_count(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    /// Adds a connection, marked dirty, its timeout scheduled.
    pub(crate) fn insert(&mut self, key: ConnKey, conn: Connection) {
        let deadline = conn.deadline();
        self.fd_to_key.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.dirty.push(key);
        self.schedule_conn(key, deadline);
    }

    pub(crate) fn remove(&mut self, key: ConnKey) -> Option<Connection> {
        let conn = self.conns.remove(&key)?;
        self.fd_to_key.remove(&conn.stream.as_raw_fd());
        Some(conn)
    }

    pub(crate) fn get_mut(&mut self, key: &ConnKey) -> Option<&mut Connection> {
        self.conns.get_mut(key)
    }

    pub(crate) fn contains(&self, key: &ConnKey) -> bool {
        self.conns.contains_key(key)
    }

    /// The connection whose host socket is `fd`.
    pub(crate) fn key_of(&self, fd: RawFd) -> Option<ConnKey> {
        self.fd_to_key.get(&fd).copied()
    }

    /// Adds a handshake, to be registered with epoll.
    pub(crate) fn insert_handshake(&mut self, fd: RawFd, hs: Handshake) {
        let deadline = hs.deadline;
        self.handshakes.insert(fd, hs);
        self.new_handshakes.push(fd);
        self.schedule(deadline, Timed::Handshake(fd));
    }

    pub(crate) fn remove_handshake(&mut self, fd: RawFd) -> Option<Handshake> {
        self.handshakes.remove(&fd)
    }

    /// Handshakes added since the last call.
    pub(crate) fn take_new_handshakes(&mut self) -> Vec<RawFd> {
        std::mem::take(&mut self.new_handshakes)
    }

    /// Marks a connection whose epoll interest may have changed.
    pub(crate) fn mark_dirty(&mut self, key: ConnKey) {
        self.dirty.push(key);
    }

    /// The dirty connections, each once; `buf` is reused.
    pub(crate) fn take_dirty(&mut self, buf: &mut Vec<ConnKey>) {
        std::mem::swap(buf, &mut self.dirty);
        buf.sort_unstable();
        buf.dedup();
    }

    /// Schedules a connection's (new) deadline.
    pub(crate) fn schedule_conn(&mut self, key: ConnKey, at: Option<Instant>) {
        if let Some(at) = at {
            self.schedule(at, Timed::Conn(key));
        }
    }

    fn schedule(&mut self, at: Instant, what: Timed) {
        self.deadlines.push(Reverse((at, what)));
        // Stale entries are dropped lazily; keep them from piling up.
        if self.deadlines.len() > 4 * self.open_count() + 64 {
            self.rebuild_deadlines();
        }
    }

    /// Rebuilds the heap from every live deadline (after a full sweep).
    pub(crate) fn rebuild_deadlines(&mut self) {
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

    /// Entries in the timeout heap (for tests: it stays bounded).
    #[cfg(test)]
    pub(crate) fn heap_len(&self) -> usize {
        self.deadlines.len()
    }

    /// Forgets everything but the connections and handshakes themselves,
    /// which the caller has already taken out.
    pub(crate) fn clear(&mut self) {
        self.fd_to_key.clear();
        self.dirty.clear();
        self.new_handshakes.clear();
        self.deadlines.clear();
    }
}
