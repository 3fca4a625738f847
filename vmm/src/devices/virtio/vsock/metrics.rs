//! Counters the vsock device keeps, readable without locking the device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// The first time the guest accepted a host-initiated connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirstResponse {
    /// The guest port that answered (e.g. 1024, the agent's).
    pub port: u32,
    /// When the guest's `VSOCK_OP_RESPONSE` was processed.
    pub at: Instant,
}

/// How many distinct guest ports [`VsockMetrics::first_response_on`]
/// remembers.
const FIRST_RESPONSE_PORTS: usize = 16;

/// Live counters of one vsock device. Shared through an `Arc` (see
/// [`super::Vsock::metrics`]); every field is updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    pub(crate) conns_open: AtomicU64,
    pub(crate) conns_host_initiated: AtomicU64,
    pub(crate) conns_guest_initiated: AtomicU64,
    pub(crate) conns_rejected: AtomicU64,
    pub(crate) conns_reset: AtomicU64,
    pub(crate) handshake_errors: AtomicU64,
    pub(crate) rx_packets: AtomicU64,
    pub(crate) rx_bytes: AtomicU64,
    pub(crate) tx_packets: AtomicU64,
    pub(crate) tx_bytes: AtomicU64,
    pub(crate) tx_dropped: AtomicU64,
    pub(crate) rx_bad_buffers: AtomicU64,
    first_response: OnceLock<FirstResponse>,
    first_response_by_port: Mutex<Vec<FirstResponse>>,
}

/// A point-in-time copy of [`VsockMetrics`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// Streams currently connected or being set up (handshakes included).
    pub conns_open: u64,
    /// Host-initiated streams the guest accepted.
    pub conns_host_initiated: u64,
    /// Guest-initiated streams connected to a host socket.
    pub conns_guest_initiated: u64,
    /// Connections refused: over the limit, nobody listening, guest RST
    /// to a request, bad `CONNECT` line.
    pub conns_rejected: u64,
    /// Established streams torn down by an RST, from either side.
    pub conns_reset: u64,
    /// `CONNECT` lines refused or timed out.
    pub handshake_errors: u64,
    /// Packets / payload bytes given to the guest (rx queue).
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Packets / payload bytes taken from the guest (tx queue).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Guest packets dropped: malformed chains, wrong CID or type.
    pub tx_dropped: u64,
    /// Rx descriptor chains refused as malformed.
    pub rx_bad_buffers: u64,
}

pub(crate) fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn dec(counter: &AtomicU64) {
    // Never wraps below zero, even if a bookkeeping bug would make it.
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
}

impl VsockMetrics {
    /// Copies every counter.
    pub fn snapshot(&self) -> VsockStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VsockStats {
            conns_open: get(&self.conns_open),
            conns_host_initiated: get(&self.conns_host_initiated),
            conns_guest_initiated: get(&self.conns_guest_initiated),
            conns_rejected: get(&self.conns_rejected),
            conns_reset: get(&self.conns_reset),
            handshake_errors: get(&self.handshake_errors),
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
            rx_bad_buffers: get(&self.rx_bad_buffers),
        }
    }

    /// The first time any guest port accepted a host-initiated connection.
    pub fn first_response(&self) -> Option<FirstResponse> {
        self.first_response.get().copied()
    }

    /// The first time guest `port` accepted a host-initiated connection
    /// (remembered for the first 16 distinct ports that answered).
    pub fn first_response_on(&self, port: u32) -> Option<Instant> {
        let seen = self.first_response_by_port.lock().ok()?;
        seen.iter().find(|r| r.port == port).map(|r| r.at)
    }

    /// Records a guest RESPONSE on `port`; returns whether it is the first
    /// one remembered for that port.
    pub(crate) fn record_response(&self, port: u32, at: Instant) -> bool {
        let first = FirstResponse { port, at };
        let _ = self.first_response.set(first);
        let Ok(mut seen) = self.first_response_by_port.lock() else {
            return false;
        };
        if seen.len() < FIRST_RESPONSE_PORTS && !seen.iter().any(|r| r.port == port) {
            seen.push(first);
            return true;
        }
        false
    }
}
