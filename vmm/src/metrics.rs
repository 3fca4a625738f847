//! Process-wide counters of what the guest made the VMM do (or refuse),
//! readable without locks and reported by the control API's `info`.
//!
//! They exist so that a bounded resource is also a visible one: a log line
//! dropped by the rate limiter, console bytes dropped at the cap, a queue
//! whose budget ran out, a chain refused as malformed, all leave a count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde::Serialize;

use crate::devices::virtio::vsock::metrics::VsockMetrics;

/// The VMM's counters (one VM per process).
#[derive(Debug, Default)]
pub struct VmmMetrics {
    /// Guest-triggered log messages the rate limiter dropped.
    pub guest_logs_suppressed: AtomicU64,
    /// Console bytes dropped: the console file reached its limit, or the
    /// console writer could not keep up (the guest never waits for it).
    pub console_dropped_bytes: AtomicU64,
    /// Console bytes written out.
    pub console_bytes: AtomicU64,
    /// Times a queue's per-event budget ran out with work left (the queue
    /// is re-armed and served after the other pending events).
    pub queue_budget_exhausted: AtomicU64,
    /// Descriptor chains refused as malformed (bad head, loop, indirect,
    /// outside guest memory, wrong direction).
    pub invalid_chains: AtomicU64,
    /// Bad avail indexes read from a driver's ring.
    pub invalid_avail_index: AtomicU64,
    /// virtio-mmio writes refused (bad queue size or address, writes after
    /// DRIVER_OK, unknown registers).
    pub mmio_refused_writes: AtomicU64,
    /// Device activations that failed (invalid queues).
    pub activation_failures: AtomicU64,
    /// Host connections to the API or vsock sockets refused or delayed
    /// because the process ran out of file descriptors.
    pub fd_exhaustion: AtomicU64,
    /// virtio-net, all devices: frames (and their bytes, without the vnet
    /// header) given to the guest.
    pub net_rx_frames: AtomicU64,
    pub net_rx_bytes: AtomicU64,
    /// Frames from the back end not given to the guest: too short or too
    /// long, or larger than every rx buffer the guest posts.
    pub net_rx_dropped: AtomicU64,
    /// virtio-net: frames (and bytes) the guest sent to the back end.
    pub net_tx_frames: AtomicU64,
    pub net_tx_bytes: AtomicU64,
    /// Guest frames dropped: malformed or oversized chains, frames the
    /// back end refused, a back end gone.
    pub net_tx_dropped: AtomicU64,
    /// vCPU exits to the VMM (KVM_RUN returning to user space), all vCPUs:
    /// port I/O, MMIO, anything else.
    pub vcpu_io_exits: AtomicU64,
    pub vcpu_mmio_exits: AtomicU64,
    pub vcpu_other_exits: AtomicU64,
    /// virtio-balloon: ranges (and their bytes) the guest reported free
    /// and the host gave back.
    pub balloon_reported_ranges: AtomicU64,
    pub balloon_reported_bytes: AtomicU64,
    /// virtio-fs, all shares: guest requests relayed to the back end (and
    /// their bytes), reply bytes given back to the guest, guest requests
    /// refused (malformed, or larger than the device carries).
    pub fs_requests: AtomicU64,
    pub fs_request_bytes: AtomicU64,
    pub fs_reply_bytes: AtomicU64,
    pub fs_refused: AtomicU64,
}

/// The VMM's counters.
pub static METRICS: VmmMetrics = VmmMetrics {
    guest_logs_suppressed: AtomicU64::new(0),
    console_dropped_bytes: AtomicU64::new(0),
    console_bytes: AtomicU64::new(0),
    queue_budget_exhausted: AtomicU64::new(0),
    invalid_chains: AtomicU64::new(0),
    invalid_avail_index: AtomicU64::new(0),
    mmio_refused_writes: AtomicU64::new(0),
    activation_failures: AtomicU64::new(0),
    fd_exhaustion: AtomicU64::new(0),
    net_rx_frames: AtomicU64::new(0),
    net_rx_bytes: AtomicU64::new(0),
    net_rx_dropped: AtomicU64::new(0),
    net_tx_frames: AtomicU64::new(0),
    net_tx_bytes: AtomicU64::new(0),
    net_tx_dropped: AtomicU64::new(0),
    vcpu_io_exits: AtomicU64::new(0),
    vcpu_mmio_exits: AtomicU64::new(0),
    vcpu_other_exits: AtomicU64::new(0),
    balloon_reported_ranges: AtomicU64::new(0),
    balloon_reported_bytes: AtomicU64::new(0),
    fs_requests: AtomicU64::new(0),
    fs_request_bytes: AtomicU64::new(0),
    fs_reply_bytes: AtomicU64::new(0),
    fs_refused: AtomicU64::new(0),
};

/// The vsock device's own counters, once it is made (one per VM).
static VSOCK: OnceLock<Arc<VsockMetrics>> = OnceLock::new();

/// Makes the vsock device's counters part of [`VmmMetrics::snapshot`].
pub fn set_vsock(metrics: Arc<VsockMetrics>) {
    let _ = VSOCK.set(metrics);
}

/// Adds one to a counter.
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// A point-in-time copy of [`VmmMetrics`], as the API reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    pub guest_logs_suppressed: u64,
    pub console_dropped_bytes: u64,
    pub console_bytes: u64,
    pub queue_budget_exhausted: u64,
    pub invalid_chains: u64,
    pub invalid_avail_index: u64,
    pub mmio_refused_writes: u64,
    pub activation_failures: u64,
    pub fd_exhaustion: u64,
    pub net_rx_frames: u64,
    pub net_rx_bytes: u64,
    pub net_rx_dropped: u64,
    pub net_tx_frames: u64,
    pub net_tx_bytes: u64,
    pub net_tx_dropped: u64,
    pub vcpu_io_exits: u64,
    pub vcpu_mmio_exits: u64,
    pub vcpu_other_exits: u64,
    pub balloon_reported_ranges: u64,
    pub balloon_reported_bytes: u64,
    pub fs_requests: u64,
    pub fs_request_bytes: u64,
    pub fs_reply_bytes: u64,
    pub fs_refused: u64,
    /// The vsock device's: packets and payload bytes given to the guest
    /// (rx) and taken from it (tx), guest packets dropped, rx buffers
    /// refused, connections refused and reset.
    pub vsock_rx_packets: u64,
    pub vsock_rx_bytes: u64,
    pub vsock_tx_packets: u64,
    pub vsock_tx_bytes: u64,
    pub vsock_tx_dropped: u64,
    pub vsock_rx_bad_buffers: u64,
    pub vsock_conns_rejected: u64,
    pub vsock_conns_reset: u64,
}

impl VmmMetrics {
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let vsock = VSOCK.get().map(|v| v.snapshot()).unwrap_or_default();
        MetricsSnapshot {
            guest_logs_suppressed: get(&self.guest_logs_suppressed),
            console_dropped_bytes: get(&self.console_dropped_bytes),
            console_bytes: get(&self.console_bytes),
            queue_budget_exhausted: get(&self.queue_budget_exhausted),
            invalid_chains: get(&self.invalid_chains),
            invalid_avail_index: get(&self.invalid_avail_index),
            mmio_refused_writes: get(&self.mmio_refused_writes),
            activation_failures: get(&self.activation_failures),
            fd_exhaustion: get(&self.fd_exhaustion),
            net_rx_frames: get(&self.net_rx_frames),
            net_rx_bytes: get(&self.net_rx_bytes),
            net_rx_dropped: get(&self.net_rx_dropped),
            net_tx_frames: get(&self.net_tx_frames),
            net_tx_bytes: get(&self.net_tx_bytes),
            net_tx_dropped: get(&self.net_tx_dropped),
            vcpu_io_exits: get(&self.vcpu_io_exits),
            vcpu_mmio_exits: get(&self.vcpu_mmio_exits),
            vcpu_other_exits: get(&self.vcpu_other_exits),
            balloon_reported_ranges: get(&self.balloon_reported_ranges),
            balloon_reported_bytes: get(&self.balloon_reported_bytes),
            fs_requests: get(&self.fs_requests),
            fs_request_bytes: get(&self.fs_request_bytes),
            fs_reply_bytes: get(&self.fs_reply_bytes),
            fs_refused: get(&self.fs_refused),
            vsock_rx_packets: vsock.rx_packets,
            vsock_rx_bytes: vsock.rx_bytes,
            vsock_tx_packets: vsock.tx_packets,
            vsock_tx_bytes: vsock.tx_bytes,
            vsock_tx_dropped: vsock.tx_dropped,
            vsock_rx_bad_buffers: vsock.rx_bad_buffers,
            vsock_conns_rejected: vsock.conns_rejected,
            vsock_conns_reset: vsock.conns_reset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::metrics;

    #[test]
    fn the_vsock_devices_counters_are_in_the_snapshot() {
        let before = METRICS.snapshot();
        assert_eq!((before.vsock_rx_bytes, before.vsock_tx_dropped), (0, 0));
        let vsock = Arc::new(VsockMetrics::default());
        set_vsock(vsock.clone());
        metrics::add(&vsock.rx_bytes, 1234);
        metrics::inc(&vsock.tx_dropped);
        add(&METRICS.fs_request_bytes, 10);
        let after = METRICS.snapshot();
        assert_eq!((after.vsock_rx_bytes, after.vsock_tx_dropped), (1234, 1));
        assert!(after.fs_request_bytes >= before.fs_request_bytes + 10);
        // The API's JSON names them.
        let json = serde_json::to_value(after).unwrap();
        assert_eq!(json["vsock_rx_bytes"], 1234);
        assert!(json["fs_requests"].is_u64());
    }
}
