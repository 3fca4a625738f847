//! virtio-net (device id 1) on a tap back end.
//!
//! Two queues of [`QUEUE_SIZE`]: rx (0) and tx (1); the configuration
//! space is the MAC address (`VIRTIO_NET_F_MAC`). Offered features: see
//! [`OFFERED_FEATURES`], or [`NO_OFFLOAD_FEATURES`] for a device made
//! with offloads off (`--net …,offload=off`: every frame is whole and
//! checksummed on both sides). The checksum and TSO offloads go through to the
//! tap: what the guest may *send* (`CSUM`, `HOST_TSO4/6`) the tap takes
//! as the vnet header says; what it may *receive* (`GUEST_CSUM`,
//! `GUEST_TSO4/6`) is what the tap is told it may hand over
//! (`TUNSETOFFLOAD`, set in the event loop once the driver's features are
//! known, cleared on a reset). With `MRG_RXBUF` a received frame spans as
//! many rx buffers as it needs (`num_buffers`), so a Linux guest posts
//! page-sized buffers even with TSO; without it, each frame must fit one
//! rx chain and larger ones are dropped.
//!
//! Data path, all on the event loop:
//! - tx: each chain (direct, at most the queue size of descriptors,
//!   [`frame::MIN_TX_LEN`] to [`frame::MAX_BUFFER_LEN`] bytes) is copied
//!   into one buffer and written to the tap, and the chain is returned.
//!   If the tap says `EAGAIN` the frame is kept, the tx queue is left
//!   alone and the tap is polled for writing; the frame goes out (and the
//!   queue is served again) when it is writable. One frame is held at most.
//! - rx: while the device is active and not waiting for buffers, the tap
//!   is polled for reading; a frame read goes into the guest's rx chains
//!   when they can hold all of it. When they cannot, the frame is kept,
//!   the tap is taken out of the poll set and the device waits for the
//!   driver's rx notification: a guest that posts no buffers costs nothing.
//!
//! Each event serves at most [`QUEUE_BUDGET`] tx chains (then re-arms the
//! queue) and reads at most as many frames (the tap, level-triggered,
//! wakes the loop again). Malformed chains are returned empty and counted;
//! nothing the guest writes can panic the VMM or make it buffer more than
//! one frame each way. A back end that fails (the tap was detached, the
//! peer closed) is logged once and taken out of the loop; the device then
//! drops the guest's frames (counted) so its tx ring keeps moving.

pub mod config;
pub mod frame;
pub mod tap;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use self::config::{MacAddr, NetConfig};
use self::frame::{
    deliver_rx, gather_tx, RxOutcome, RxScratch, TxError, MAX_BUFFER_LEN, MIN_TX_LEN, VNET_HDR_LEN,
};
use self::tap::{Backend, Tap, TapError};
use super::lifecycle::{DeviceEvent, DeviceLifecycle};
use super::queue::{add_used, pop, QUEUE_BUDGET};
use super::{
    device_type, read_config_space, ActivateError, InterruptSignal, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::guest_log::LogLimiter;
use crate::metrics::{add, METRICS};

/// Maximum size of both queues.
pub const QUEUE_SIZE: u16 = 256;
const NUM_QUEUES: usize = 2;
const RXQ: usize = 0;
const TXQ: usize = 1;

/// Event data of the back end's fd (the lifecycle's are above
/// `lifecycle::EV_LIFECYCLE_BASE`).
const EV_BACKEND: u32 = 1;

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// What the device offers: a modern device with a MAC, checksum and TSO
/// offloads both ways, and mergeable rx buffers.
pub const OFFERED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_MRG_RXBUF);

/// What a device with offloads off offers: no checksum or TSO feature, so
/// the guest sends and takes only whole, checksummed frames of at most the
/// MTU, and the tap is never told it may hand over others.
pub const NO_OFFLOAD_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_MRG_RXBUF);

/// The tap offloads (`TUN_F_*`) that match the guest's receive features:
/// partial checksums if it takes them, TSO frames only with those (the
/// kernel refuses TSO without checksum offload).
pub fn offload_flags(acked: u64) -> u32 {
    if acked & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if acked & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
        flags |= libc::TUN_F_TSO4;
    }
    if acked & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

/// One device's counters (the VMM-wide sums are in
/// [`METRICS`](crate::metrics::METRICS)).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    /// Rx chains returned empty because they were malformed.
    pub rx_bad_chains: u64,
}

fn count(local: &mut u64, global: &AtomicU64, n: u64) {
    *local = local.saturating_add(n);
    add(global, n);
}

/// The frames in flight and the back end: everything but the lifecycle,
/// so the queues (borrowed from the lifecycle) and this can be used at
/// once.
#[derive(Debug)]
struct DataPath {
    label: String,
    backend: Box<dyn Backend>,
    /// The back end failed for good: nothing is read from or written to it.
    broken: bool,
    descs: Vec<Descriptor>,
    /// Room for the frame being sent (vnet header included): its first
    /// `tx_len` bytes.
    tx_frame: Vec<u8>,
    tx_len: usize,
    /// `tx_frame` waits for the back end to take it (it said EAGAIN).
    tx_pending: bool,
    /// Room for one received frame, and one byte more to see a frame that
    /// is too long.
    rx_frame: Vec<u8>,
    /// Length of the received frame waiting for rx buffers (0: none).
    rx_len: usize,
    /// The guest's rx buffers ran out: the back end is not read until the
    /// driver notifies the rx queue.
    rx_waiting: bool,
    rx_scratch: RxScratch,
    limiter: LogLimiter,
    stats: NetStats,
}

impl DataPath {
    /// Drops the frames in flight (a driver reset).
    fn reset(&mut self) {
        self.tx_pending = false;
        self.rx_len = 0;
        self.rx_waiting = false;
    }

    fn fail(&mut self, what: &str, err: &io::Error) {
        if !self.broken {
            tracing::error!(
                net = %self.label,
                %err,
                "virtio-net: the back end failed {what}; the device drops its frames from now on"
            );
        }
        self.broken = true;
        self.tx_pending = false;
        self.rx_len = 0;
    }

    /// Writes `tx_frame` to the back end.
    fn send(&mut self) {
        if self.broken {
            count(&mut self.stats.tx_dropped, &METRICS.net_tx_dropped, 1);
            return;
        }
        let len = self.tx_len;
        let frame = self.tx_frame.get(..len).unwrap_or_default();
        // EINTR is retried a few times, then counted as a drop.
        for _ in 0..4 {
            match self.backend.write_frame(frame) {
                Ok(_) => {
                    self.tx_pending = false;
                    count(&mut self.stats.tx_frames, &METRICS.net_tx_frames, 1);
                    let bytes = len.saturating_sub(VNET_HDR_LEN) as u64;
                    count(&mut self.stats.tx_bytes, &METRICS.net_tx_bytes, bytes);
                    return;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    self.tx_pending = true;
                    return;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if matches!(err.raw_os_error(), Some(libc::EBADF | libc::EBADFD)) => {
                    self.fail("writing", &err);
                    count(&mut self.stats.tx_dropped, &METRICS.net_tx_dropped, 1);
                    return;
                }
                Err(err) => {
                    // A frame the tap refused (a bad vnet header: EINVAL),
                    // or an interface that is down (EIO).
                    if self.limiter.allow() {
                        tracing::warn!(net = %self.label, %err, "virtio-net: the back end refused a frame");
                    }
                    break;
                }
            }
        }
        self.tx_pending = false;
        count(&mut self.stats.tx_dropped, &METRICS.net_tx_dropped, 1);
    }

    /// Sends up to [`QUEUE_BUDGET`] of the guest's frames. Returns (whether
    /// chains were returned, whether the budget ran out with work left).
    fn tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> (bool, bool) {
        let mut used = false;
        let mut served = 0;
        while served < QUEUE_BUDGET && !self.tx_pending {
            let Some((head, walked)) = pop(
                queue,
                mem,
                &mut self.descs,
                &mut self.limiter,
                "the virtio-net tx queue",
            ) else {
                return (used, false);
            };
            served += 1;
            let frame = walked
                .map_err(TxError::from)
                .and_then(|()| gather_tx(mem, &self.descs, &mut self.tx_frame));
            match add_used(queue, mem, head, 0) {
                Ok(()) => used = true,
                Err(err) => {
                    if self.limiter.allow() {
                        tracing::warn!(net = %self.label, %err, "virtio-net: returning a tx buffer");
                    }
                }
            }
            match frame {
                Ok(len) => {
                    self.tx_len = len;
                    self.send();
                }
                Err(err) => {
                    count(&mut self.stats.tx_dropped, &METRICS.net_tx_dropped, 1);
                    if self.limiter.allow() {
                        tracing::warn!(net = %self.label, %err, "virtio-net: dropping a tx frame");
                    }
                }
            }
        }
        (used, served == QUEUE_BUDGET && !self.tx_pending)
    }

    /// Reads one frame from the back end into `rx_frame`; false when there
    /// is none (or the back end failed).
    fn read_frame(&mut self) -> bool {
        let Some(buf) = self.rx_frame.get_mut(..MAX_BUFFER_LEN + 1) else {
            return false;
        };
        match self.backend.read_frame(buf) {
            Ok(0) => {
                let err = io::Error::from(io::ErrorKind::UnexpectedEof);
                self.fail("reading (end of file)", &err);
                false
            }
            Ok(n) if !(MIN_TX_LEN..=MAX_BUFFER_LEN).contains(&n) => {
                count(&mut self.stats.rx_dropped, &METRICS.net_rx_dropped, 1);
                true
            }
            Ok(n) => {
                self.rx_len = n;
                true
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => false,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => true,
            Err(err) => {
                self.fail("reading", &err);
                false
            }
        }
    }

    /// Moves frames from the back end into the guest's rx buffers, up to
    /// [`QUEUE_BUDGET`] reads. Returns whether the used ring changed.
    fn rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap, mergeable: bool) -> bool {
        let mut used = false;
        let mut reads = 0;
        while !self.rx_waiting {
            if self.rx_len == 0 {
                if self.broken || reads == QUEUE_BUDGET {
                    break;
                }
                reads += 1;
                if !self.read_frame() {
                    break;
                }
                if self.rx_len == 0 {
                    continue;
                }
            }
            let Some(frame) = self.rx_frame.get_mut(..self.rx_len) else {
                self.rx_len = 0;
                continue;
            };
            let report = match deliver_rx(queue, mem, frame, mergeable, &mut self.rx_scratch) {
                Ok(report) => report,
                Err(err) => {
                    if self.limiter.allow() {
                        tracing::warn!(net = %self.label, %err, "virtio-net: the rx queue is unusable");
                    }
                    self.rx_waiting = true;
                    break;
                }
            };
            used |= report.used();
            if report.bad_chains > 0 {
                self.stats.rx_bad_chains += u64::from(report.bad_chains);
                if self.limiter.allow() {
                    tracing::warn!(
                        net = %self.label,
                        chains = report.bad_chains,
                        "virtio-net: returned malformed rx chains empty"
                    );
                }
            }
            match report.outcome {
                RxOutcome::Delivered { .. } => {
                    count(&mut self.stats.rx_frames, &METRICS.net_rx_frames, 1);
                    let bytes = self.rx_len.saturating_sub(VNET_HDR_LEN) as u64;
                    count(&mut self.stats.rx_bytes, &METRICS.net_rx_bytes, bytes);
                    self.rx_len = 0;
                }
                RxOutcome::NoBuffers => self.rx_waiting = true,
                RxOutcome::Dropped => {
                    count(&mut self.stats.rx_dropped, &METRICS.net_rx_dropped, 1);
                    self.rx_len = 0;
                }
            }
        }
        used
    }
}

/// The virtio-net device. See the [module documentation](self).
#[derive(Debug)]
pub struct Net {
    mac: MacAddr,
    life: DeviceLifecycle,
    /// [`OFFERED_FEATURES`] or [`NO_OFFLOAD_FEATURES`].
    offered: u64,
    acked_features: u64,
    /// The offloads last set on the back end.
    offload: Option<u32>,
    /// What the back end's fd is registered for in the event loop.
    interest: Option<EventSet>,
    path: DataPath,
}

impl Net {
    /// Opens the tap of `config` (see [`tap::Tap::open`]) and builds the
    /// device on it.
    pub fn open(config: &NetConfig) -> Result<Net, TapError> {
        let tap = Tap::open(&config.backend)?;
        let label = format!("{} (tap {})", config, tap.name());
        let net = Net::with_backend(label, config.mac, Box::new(tap)).map_err(|source| {
            TapError::Setup {
                what: config.to_string(),
                step: "creating the device's eventfds",
                source,
            }
        })?;
        Ok(if config.offload {
            net
        } else {
            net.without_offloads()
        })
    }

    /// The same device offering no checksum or TSO offloads
    /// ([`NO_OFFLOAD_FEATURES`]); before the driver has seen it.
    pub fn without_offloads(mut self) -> Net {
        self.offered = NO_OFFLOAD_FEATURES;
        self.acked_features &= NO_OFFLOAD_FEATURES;
        self
    }

    /// A device on any back end (a tap, or a socket in tests); `label`
    /// names it in logs.
    pub fn with_backend(label: String, mac: MacAddr, backend: Box<dyn Backend>) -> io::Result<Net> {
        Ok(Net {
            mac,
            life: DeviceLifecycle::new("virtio-net", NUM_QUEUES)?,
            offered: OFFERED_FEATURES,
            acked_features: 0,
            offload: None,
            interest: None,
            path: DataPath {
                label,
                backend,
                broken: false,
                descs: Vec::new(),
                tx_frame: vec![0; MAX_BUFFER_LEN],
                tx_len: 0,
                tx_pending: false,
                rx_frame: vec![0; MAX_BUFFER_LEN + 1],
                rx_len: 0,
                rx_waiting: false,
                rx_scratch: RxScratch::default(),
                limiter: LogLimiter::new("virtio-net"),
                stats: NetStats::default(),
            },
        })
    }

    /// The device's counters.
    pub fn stats(&self) -> NetStats {
        self.path.stats
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Sets the back end's offloads to what the driver accepted (none
    /// while the device is not active).
    fn sync_offload(&mut self) {
        if self.path.broken {
            return;
        }
        let want = if self.life.is_active() {
            offload_flags(self.acked_features)
        } else {
            0
        };
        if self.offload == Some(want) {
            return;
        }
        match self.path.backend.set_offload(want) {
            Ok(()) => self.offload = Some(want),
            // The tap could hand the guest frames it cannot take.
            Err(err) => self.path.fail("setting the offloads (TUNSETOFFLOAD)", &err),
        }
    }

    /// Serves both queues within their budgets and interrupts the guest if
    /// a used ring changed.
    fn run(&mut self) {
        let mergeable = self.acked_features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let Some(active) = self.life.active_mut() else {
            return;
        };
        let mem = &active.mem;
        let mut used = false;
        let mut rearm_tx = false;
        if self.path.tx_pending {
            self.path.send();
        }
        if let Some(queue) = active.queues.get_mut(TXQ) {
            let (tx_used, budget_out) = self.path.tx(queue, mem);
            used |= tx_used;
            rearm_tx = budget_out;
        }
        if let Some(queue) = active.queues.get_mut(RXQ) {
            used |= self.path.rx(queue, mem, mergeable);
        }
        if used {
            active.signal_used(&mut self.path.limiter, "virtio-net");
        }
        if rearm_tx {
            self.life.rearm(TXQ);
        }
    }

    /// What the back end's fd should be polled for now.
    fn wanted_interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.path.broken || !self.life.is_active() {
            return set;
        }
        if !self.path.rx_waiting {
            set |= EventSet::IN;
        }
        if self.path.tx_pending {
            set |= EventSet::OUT;
        }
        set
    }

    /// Keeps the back end's registration in step with [`Self::wanted_interest`].
    fn sync_interest(&mut self, ops: &mut EventOps<'_>) {
        let want = self.wanted_interest();
        let fd = self.path.backend.as_raw_fd();
        let result = match (self.interest, want.is_empty()) {
            (None, true) => return,
            (Some(have), false) if have == want => return,
            (Some(_), true) => ops.remove(Events::empty_raw(fd)).map(|()| None),
            (None, false) => ops
                .add(Events::with_data_raw(fd, EV_BACKEND, want))
                .map(|()| Some(want)),
            (Some(_), false) => ops
                .modify(Events::with_data_raw(fd, EV_BACKEND, want))
                .map(|()| Some(want)),
        };
        match result {
            Ok(interest) => self.interest = interest,
            Err(err) => {
                tracing::error!(net = %self.path.label, ?err, "virtio-net: polling the back end")
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        self.offered
    }

    fn set_acked_features(&mut self, features: u64) {
        // Applied to the back end in the event loop (the vCPU thread that
        // calls this may not make tap ioctls).
        self.acked_features = features & self.offered;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.mac.0, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn queue_events(&self) -> &[EventFd] {
        self.life.queue_events()
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn InterruptSignal>,
    ) -> Result<(), ActivateError> {
        self.life.activate(mem, queues, interrupt)
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.life.queue_states()
    }

    fn reset(&mut self) -> bool {
        self.life.reset();
        self.acked_features = 0;
        self.path.reset();
        true
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        self.life.register(ops);
        self.sync_offload();
    }

    fn process(&mut self, events: Events, ops: &mut EventOps<'_>) {
        match self.life.event(&events) {
            DeviceEvent::StateChanged => {
                self.path.rx_waiting = false;
                self.sync_offload();
            }
            DeviceEvent::Queue(RXQ) => self.path.rx_waiting = false,
            DeviceEvent::Queue(_) => {}
            DeviceEvent::Other(EV_BACKEND) => {
                let set = events.event_set();
                if set.intersects(EventSet::ERROR | EventSet::HANG_UP)
                    && !set.contains(EventSet::IN)
                {
                    let err = io::Error::from(io::ErrorKind::BrokenPipe);
                    self.path.fail("(error or hang-up on its fd)", &err);
                }
            }
            DeviceEvent::Other(other) => {
                if self.path.limiter.allow() {
                    tracing::debug!(data = other, "virtio-net: unknown event");
                }
            }
        }
        self.run();
        self.sync_interest(ops);
    }
}
