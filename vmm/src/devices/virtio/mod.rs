//! virtio devices and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]: the transport (`mmio.rs`) handles
//! the virtio-mmio register protocol and builds the queues the driver
//! configured; the device manager registers the device's queue eventfds
//! with KVM as ioeventfds on QueueNotify; the transport calls
//! [`VirtioDevice::activate`] when the driver sets DRIVER_OK. From then on
//! the device does its work on the VMM's event loop (it is also an
//! `event_manager::MutEventSubscriber`) and tells the guest about used
//! buffers through [`InterruptSignal`] (an irqfd).
//!
//! Every device is built on [`lifecycle::DeviceLifecycle`] (activation,
//! reset, queue eventfds registered once and always drained) and reads its
//! rings through [`queue`] (direct chains only, every index and buffer
//! checked, a budget per event).
//!
//! Everything a device reads from guest memory is untrusted: descriptor
//! addresses, lengths and chains are validated, and a malformed request
//! must not panic the VMM (at worst the device stops serving the guest).

pub mod balloon;
pub mod fs;
pub mod lifecycle;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rate_timer;
pub mod rng;
#[cfg(test)]
pub mod test_utils;
pub mod vsock;

use std::io;
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// virtio device ids (virtio 1.2, section 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
    pub const FS: u32 = 26;
}

/// VIRTIO_F_VERSION_1: every device isola offers is a modern device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bits of the virtio-mmio InterruptStatus register.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// How a device interrupts the guest.
pub trait InterruptSignal: Send + Sync + std::fmt::Debug {
    /// The device put buffers in a used ring.
    fn signal_used_queue(&self) -> io::Result<()>;
    /// The device's configuration space changed.
    fn signal_config_change(&self) -> io::Result<()>;
}

/// Copies the bytes of a device configuration space `space` at the
/// guest-given `offset` into `data`; whatever lies outside `space` (any
/// part of the read, or all of it) reads as zero.
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let src = usize::try_from(offset)
        .ok()
        .and_then(|o| space.get(o..))
        .unwrap_or_default();
    for (dst, src) in data.iter_mut().zip(src) {
        *dst = *src;
    }
}

/// Why a device could not be activated.
#[derive(Debug, Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} is not valid: {1}")]
    InvalidQueue(usize, queue::InvalidQueue),
    #[error("the device is already active")]
    AlreadyActive,
    #[error("activating the device: {0}")]
    Io(#[from] io::Error),
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// Its virtio device id ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each of its queues; the length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Feature bits the driver accepted (a subset of the offered ones; the
    /// transport masks anything else out).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device configuration space at `offset` (out of range reads
    /// leave `data` zeroed).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (ignored where read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// One eventfd per queue, for the device's whole life: the device
    /// manager registers each with KVM as the ioeventfd of QueueNotify
    /// (data-matched on the queue index); the device keeps them in its
    /// event loop registration and always drains them.
    fn queue_events(&self) -> &[EventFd];
    /// Starts the device with the queues the driver configured and the
    /// interrupt to raise.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn InterruptSignal>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device (wrote 0 to Status): drop every queue
    /// and connection. Returns false if the device cannot be reset, in
    /// which case the transport marks it as needing a reset.
    fn reset(&mut self) -> bool;
    /// Where to report an error the VM cannot go on with (a vhost-user
    /// back end that died); the device manager hands every device the
    /// VMM's one signal. Devices that cannot fail that way ignore it.
    fn set_fatal_signal(&mut self, _fatal: lifecycle::FatalSignal) {}
    /// The state of its queues while it is active (ring positions
    /// included), for a snapshot; None when the VMM cannot save them (a
    /// device whose rings another process serves).
    fn queue_states(&self) -> Option<Vec<QueueState>> {
        None
    }
    /// The device was restored from a snapshot and activated on the saved
    /// queues: what the template's host side held is gone, and the device
    /// tells the guest where it has to (vsock: a transport reset).
    fn restored(&mut self) {}
}
