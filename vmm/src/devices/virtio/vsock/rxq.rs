//! What waits for the guest's rx buffers: RSTs that belong to no
//! connection (answered first) and the connections with a packet to give,
//! served round robin.
//!
//! Both are bounded: RSTs at [`MAX_RST_QUEUE`] (the oldest dropped
//! beyond), connections by the table (each is listed at most once — the
//! connection's `in_rx_list` flag — and leaves the list when it dies).

use std::collections::VecDeque;

use super::connection::ConnKey;
use super::packet::Header;

/// RSTs for the guest that belong to no connection are queued up to this
/// many (the oldest are dropped beyond).
pub(crate) const MAX_RST_QUEUE: usize = 2048;
/// With this many RSTs queued the device stops taking guest packets
/// until the guest provides rx buffers.
pub(crate) const RST_QUEUE_HIGH: usize = MAX_RST_QUEUE / 2;

#[derive(Debug, Default)]
pub(crate) struct RxQueue {
    conns: VecDeque<ConnKey>,
    rsts: VecDeque<Header>,
}

impl RxQueue {
    /// Queues an RST; returns false if the oldest had to be dropped.
    pub(crate) fn push_rst(&mut self, hdr: Header) -> bool {
        let room = self.rsts.len() < MAX_RST_QUEUE;
        if !room {
            self.rsts.pop_front();
        }
        self.rsts.push_back(hdr);
        room
    }

    pub(crate) fn pop_rst(&mut self) -> Option<Header> {
        self.rsts.pop_front()
    }

    /// Lists a connection (the caller keeps it from being listed twice).
    pub(crate) fn push_conn(&mut self, key: ConnKey) {
        self.conns.push_back(key);
    }

    pub(crate) fn pop_conn(&mut self) -> Option<ConnKey> {
        self.conns.pop_front()
    }

    /// Unlists a connection that died.
    pub(crate) fn remove_conn(&mut self, key: ConnKey) {
        self.conns.retain(|k| *k != key);
    }

    /// Connections listed.
    pub(crate) fn conns_len(&self) -> usize {
        self.conns.len()
    }

    /// Whether so many RSTs wait that guest packets should wait too.
    pub(crate) fn backlog_full(&self) -> bool {
        self.rsts.len() >= RST_QUEUE_HIGH
    }

    /// Whether anything waits for an rx buffer.
    pub(crate) fn has_pending(&self) -> bool {
        !self.rsts.is_empty() || !self.conns.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.conns.clear();
        self.rsts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsts_are_capped_and_conns_unlisted() {
        let mut q = RxQueue::default();
        for _ in 0..MAX_RST_QUEUE {
            assert!(q.push_rst(Header::default()));
        }
        assert!(!q.push_rst(Header::default()));
        assert!(q.backlog_full());
        let key = ConnKey {
            local_port: 1,
            peer_port: 2,
        };
        q.push_conn(key);
        q.remove_conn(key);
        assert_eq!(q.conns_len(), 0);
        q.clear();
        assert!(!q.has_pending());
    }
}
