//! The virtio-mmio transport (virtio 1.2, section 4.2.2, version 2).
//!
//! Lives on the MMIO bus at a 4 KiB window per device. Queue notifications
//! do not come through here: each queue's QueueNotify write is matched by a
//! KVM ioeventfd (the device's [`VirtioDevice::queue_events`]) and goes
//! straight to the device's event loop. Interrupts go out through an irqfd.
//!
//! Every register write is guest input: bad queue sizes and ring addresses
//! are refused without touching the queue (virtio-queue's checked
//! `try_set_*` setters, which do not log), refusals are counted in the
//! VMM's metrics and logged through a rate limiter, and a failed
//! activation marks the device FAILED or NEEDS_RESET instead of stopping
//! anything else.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{copy_configured, validate, InvalidQueue};
use super::{
    InterruptSignal, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
};
use crate::devices::bus::BusDevice;
use crate::guest_log::LogLimiter;
use crate::metrics::{inc, METRICS};

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4c4f_5349; // "ISOL"

/// Offset of QueueNotify, where the ioeventfds are registered.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// Raises a device's interrupt: sets the InterruptStatus bit and writes the
/// irqfd.
#[derive(Debug)]
pub struct MmioInterrupt {
    status: Arc<AtomicU32>,
    irqfd: EventFd,
}

impl MmioInterrupt {
    fn raise(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1)
    }
}

impl InterruptSignal for MmioInterrupt {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_VRING)
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_CONFIG)
    }
}

/// A queue's configuration and ring positions (virtio-queue's
/// `QueueState`), as saved in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A transport's registers and queues, as saved in a snapshot. For an
/// activated device the queue positions are the device's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    pub queues: Vec<QueueSnapshot>,
}

/// One device's virtio-mmio register window.
#[derive(Debug)]
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    /// The queues as the driver configured them; the device gets copies at
    /// activation, these keep answering register reads (QueueReady).
    queues: Vec<Queue>,
    interrupt: Arc<MmioInterrupt>,
    interrupt_status: Arc<AtomicU32>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    limiter: LogLimiter,
}

impl MmioTransport {
    /// `irqfd` is registered with KVM for the device's IRQ.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
    ) -> std::io::Result<Self> {
        let sizes: Vec<u16> = lock(&device).queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(sizes.len());
        for size in sizes {
            queues.push(Queue::new(size).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("queue size {size}: {e:?}"),
                )
            })?);
        }
        let interrupt_status = Arc::new(AtomicU32::new(0));
        Ok(MmioTransport {
            device,
            mem,
            queues,
            interrupt: Arc::new(MmioInterrupt {
                status: interrupt_status.clone(),
                irqfd,
            }),
            interrupt_status,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            limiter: LogLimiter::new("virtio-mmio"),
        })
    }

    /// The device's virtio type.
    pub fn device_type(&self) -> u32 {
        lock(&self.device).device_type()
    }

    /// The registers and queues for a snapshot; an error names a device
    /// whose started rings the VMM cannot save.
    pub fn save(&self) -> Result<TransportState, String> {
        let queues: Vec<QueueSnapshot> = if self.activated {
            let device = lock(&self.device);
            device
                .queue_states()
                .ok_or_else(|| {
                    format!(
                        "virtio device type {} cannot be saved while it runs",
                        device.device_type()
                    )
                })?
                .into_iter()
                .map(QueueSnapshot::from)
                .collect()
        } else {
            self.queues.iter().map(|q| q.state().into()).collect()
        };
        Ok(TransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt_status.load(Ordering::SeqCst),
            activated: self.activated,
            queues,
        })
    }

    /// Puts the transport back as saved. A device that was running is
    /// given its acked features and activated on the saved queues (ring
    /// positions included), then told it was restored.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        if state.queues.len() != self.queues.len() {
            return Err(format!(
                "the snapshot has {} queues for a device with {}",
                state.queues.len(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (saved, ours)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != ours.max_size() {
                return Err(format!(
                    "queue {i}: saved with {} entries at most, the device has {}",
                    saved.max_size,
                    ours.max_size()
                ));
            }
            let q = Queue::try_from(QueueState::from(*saved))
                .map_err(|e| format!("queue {i}: {e:?}"))?;
            queues.push(q);
        }
        // A started device gets only rings inside guest memory, as at a
        // driver's activation.
        if let Some((i, why)) = state
            .activated
            .then(|| first_invalid(&queues, &self.mem))
            .flatten()
        {
            return Err(format!("queue {i}: {why}"));
        }
        let offered = lock(&self.device).avail_features() | VIRTIO_F_VERSION_1;
        if state.acked_features & !offered != 0 {
            return Err(format!(
                "the snapshot's driver accepted features {:#x}, the device offers {offered:#x}",
                state.acked_features
            ));
        }
        self.queues = queues;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.interrupt_status
            .store(state.interrupt_status, Ordering::SeqCst);
        if self.status & STATUS_FEATURES_OK != 0 {
            lock(&self.device).set_acked_features(self.acked_features);
        }
        if state.activated {
            // The device's copies go on from the saved ring positions.
            let copies = self
                .queues
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect::<Result<Vec<Queue>, _>>()
                .map_err(|e| format!("copying the queues: {e:?}"))?;
            let mut device = lock(&self.device);
            device
                .activate(self.mem.clone(), copies, self.interrupt.clone())
                .map_err(|e| format!("activating: {e}"))?;
            self.activated = true;
            device.restored();
        }
        Ok(())
    }

    /// A write the transport refused: counted, and logged within limits.
    fn refuse(&mut self, offset: u64, value: u32, why: &str) {
        inc(&METRICS.mmio_refused_writes);
        if self.limiter.allow() {
            tracing::debug!(offset, value, why, "virtio-mmio: refused a register write");
        }
    }

    /// Sets half of a queue ring address (`offset` 0x80..=0xa4), refusing
    /// a misaligned one.
    fn set_ring_half(&mut self, offset: u64, value: u32) {
        let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
            return self.refuse(offset, value, "no such queue");
        };
        let current = match offset & !0x7 {
            0x80 => q.desc_table(),
            0x90 => q.avail_ring(),
            _ => q.used_ring(),
        };
        let addr = if offset & 0x4 == 0 {
            (current & !0xffff_ffff) | u64::from(value)
        } else {
            (current & 0xffff_ffff) | (u64::from(value) << 32)
        };
        let result = match offset & !0x7 {
            0x80 => q.try_set_desc_table_address(GuestAddress(addr)),
            0x90 => q.try_set_avail_ring_address(GuestAddress(addr)),
            _ => q.try_set_used_ring_address(GuestAddress(addr)),
        };
        if result.is_err() {
            self.refuse(offset, value, "misaligned ring address");
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MMIO_MAGIC,
            0x04 => MMIO_VERSION,
            0x08 => lock(&self.device).device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let features = lock(&self.device).avail_features() | VIRTIO_F_VERSION_1;
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt_status.load(Ordering::SeqCst),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => {
                if self.limiter.allow() {
                    tracing::debug!(offset, "virtio-mmio: read of unknown register");
                }
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        // Queue and feature setup is only allowed before DRIVER_OK.
        let configuring = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            0x14 => self.device_features_sel = value,
            0x20 if configuring && self.status & STATUS_FEATURES_OK == 0 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let offered = lock(&self.device).avail_features() | VIRTIO_F_VERSION_1;
                let mask = 0xffff_ffffu64 << shift;
                self.acked_features =
                    (self.acked_features & !mask) | ((u64::from(value) << shift) & offered & mask);
            }
            0x24 => self.driver_features_sel = value,
            0x30 => self.queue_sel = value,
            0x38 if configuring => {
                // An invalid size (0, > max, not a power of two) is refused
                // and the queue keeps its previous (maximum) size.
                let ok = match (self.selected_queue(), u16::try_from(value)) {
                    (Some(q), Ok(size)) => q.try_set_size(size).is_ok(),
                    _ => false,
                };
                if !ok {
                    self.refuse(offset, value, "invalid queue size");
                }
            }
            0x44 if configuring => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            0x64 => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            0x70 => self.write_status(value),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if configuring => {
                self.set_ring_half(offset, value);
            }
            _ => self.refuse(offset, value, "read-only, unknown, or after DRIVER_OK"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The driver may only add bits (virtio 1.2, 3.1.1).
        if value & old != old {
            self.refuse(0x70, value, "status bits cleared without a reset");
            return;
        }
        self.status = value;
        if value & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
                // A legacy driver: refuse FEATURES_OK.
                self.status &= !STATUS_FEATURES_OK;
                return;
            }
            lock(&self.device).set_acked_features(self.acked_features);
        }
        let ready = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        if value & ready == ready && old & STATUS_DRIVER_OK == 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mem = self.mem.clone();
        if let Some((queue, why)) = first_invalid(&self.queues, &mem) {
            inc(&METRICS.activation_failures);
            if self.limiter.allow() {
                tracing::warn!(queue, %why, "virtio-mmio: the driver set up an invalid queue");
            }
            self.status |= STATUS_FAILED;
            return;
        }
        // The device works on copies; ours keep answering register reads.
        let copies: Result<Vec<Queue>, _> = self.queues.iter().map(copy_configured).collect();
        let result = match copies {
            Ok(queues) => lock(&self.device).activate(mem, queues, self.interrupt.clone()),
            Err(e) => Err(super::ActivateError::Io(std::io::Error::other(format!(
                "{e:?}"
            )))),
        };
        match result {
            Ok(()) => self.activated = true,
            Err(err) => {
                if self.limiter.allow() {
                    tracing::warn!(%err, "virtio-mmio: device activation failed");
                }
                self.status |= STATUS_NEEDS_RESET;
                self.config_generation = self.config_generation.wrapping_add(1);
                let _ = self.interrupt.signal_config_change();
            }
        }
    }

    fn reset(&mut self) {
        if self.activated && !lock(&self.device).reset() {
            if self.limiter.allow() {
                tracing::warn!("virtio-mmio: device cannot be reset");
            }
            self.status |= STATUS_FAILED;
            return;
        }
        self.activated = false;
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
        for q in &mut self.queues {
            q.reset();
        }
    }
}

/// The first ready queue whose rings are not valid in `mem`, and why.
fn first_invalid(queues: &[Queue], mem: &GuestMemoryMmap) -> Option<(usize, InvalidQueue)> {
    queues
        .iter()
        .enumerate()
        .find_map(|(i, q)| q.ready().then(|| validate(q, mem).err().map(|e| (i, e)))?)
}

fn lock(
    device: &Arc<Mutex<dyn VirtioDevice>>,
) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;
    use vm_memory::GuestAddress;

    #[derive(Debug, Default)]
    struct Dummy {
        acked: u64,
        activated: usize,
        resets: usize,
        config: [u8; 8],
        evts: Vec<EventFd>,
        /// The active queues, when the device can be saved.
        saveable: bool,
        queues: Vec<Queue>,
        restored: usize,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0x4
        }
        fn set_acked_features(&mut self, f: u64) {
            self.acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            queues: Vec<Queue>,
            _: Arc<dyn InterruptSignal>,
        ) -> Result<(), ActivateError> {
            assert_eq!(queues.len(), 2);
            self.activated += 1;
            self.queues = queues;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            true
        }
        fn queue_states(&self) -> Option<Vec<QueueState>> {
            self.saveable
                .then(|| self.queues.iter().map(|q| q.state()).collect())
        }
        fn restored(&mut self) {
            self.restored += 1;
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy {
            config: [3, 0, 0, 0, 0, 0, 0, 0],
            evts: vec![
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ],
            ..Default::default()
        }));
        let t = MmioTransport::new(dev.clone(), mem, EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .unwrap();
        (t, dev)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn configure_queue(t: &mut MmioTransport, i: u32, base: u64) {
        w(t, 0x30, i);
        assert_eq!(r(t, 0x34), 16);
        w(t, 0x38, 16);
        w(t, 0x80, base as u32);
        w(t, 0x90, (base + 0x100) as u32);
        w(t, 0xa0, (base + 0x200) as u32);
        w(t, 0x44, 1);
    }

    #[test]
    fn identifies_the_device() {
        let (mut t, _) = setup();
        assert_eq!(r(&mut t, 0x0), MMIO_MAGIC);
        assert_eq!(r(&mut t, 0x4), 2);
        assert_eq!(r(&mut t, 0x8), 19);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1, "VERSION_1 in the high word");
        let mut cfg = [0u8; 8];
        t.read(0x100, &mut cfg);
        assert_eq!(cfg[0], 3);
    }

    #[test]
    fn full_init_activates_once_and_reset_resets() {
        let (mut t, dev) = setup();
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE);
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 0xffff_ffff); // only bit 2 is offered
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, 0x70) & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
        assert_eq!(dev.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 0x4);
        configure_queue(&mut t, 0, 0x1000);
        configure_queue(&mut t, 1, 0x2000);
        let all = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        w(&mut t, 0x70, all);
        assert_eq!(dev.lock().unwrap().activated, 1);
        w(&mut t, 0x70, all);
        assert_eq!(dev.lock().unwrap().activated, 1);
        // QueueReady still reads back what the driver set.
        w(&mut t, 0x30, 1);
        assert_eq!(r(&mut t, 0x44), 1);
        w(&mut t, 0x70, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, 0x70), 0);
        assert_eq!(r(&mut t, 0x44), 0);
    }

    fn activate_fully(t: &mut MmioTransport) {
        w(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, 0x24, 1);
        w(t, 0x20, 1);
        w(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        configure_queue(t, 0, 0x1000);
        configure_queue(t, 1, 0x2000);
        let all = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        w(t, 0x70, all);
    }

    #[test]
    fn a_saved_transport_restores_its_running_device_where_it_was() {
        let (mut t, dev) = setup();
        activate_fully(&mut t);
        // The device moved on in its rings; the saved state has that.
        dev.lock().unwrap().queues[1].set_next_avail(7);
        dev.lock().unwrap().queues[1].set_next_used(5);
        // A device whose rings the VMM does not hold cannot be saved.
        let err = t.save().unwrap_err();
        assert!(err.contains("type 19 cannot be saved"), "{err}");
        dev.lock().unwrap().saveable = true;
        let state = t.save().unwrap();
        assert!(state.activated);
        assert_eq!(state.queues[1].next_avail, 7);
        assert_eq!(state.queues[1].desc_table, 0x2000);

        let (mut clone, cdev) = setup();
        clone.restore(&state).unwrap();
        let c = cdev.lock().unwrap();
        assert_eq!((c.activated, c.restored), (1, 1));
        assert_eq!(c.acked, VIRTIO_F_VERSION_1);
        assert_eq!(c.queues[1].next_avail(), 7);
        assert_eq!(c.queues[1].next_used(), 5);
        drop(c);
        assert_eq!(r(&mut clone, 0x70), state.status);
        w(&mut clone, 0x30, 1);
        assert_eq!(r(&mut clone, 0x44), 1);
        // What the driver may not have accepted, or a queue the device
        // does not have, is refused.
        let mut bad = state.clone();
        bad.acked_features |= 1 << 40;
        assert!(setup().0.restore(&bad).unwrap_err().contains("features"));
        let mut bad = state.clone();
        bad.queues.pop();
        assert!(setup().0.restore(&bad).unwrap_err().contains("1 queues"));
        let mut bad = state.clone();
        bad.queues[0].desc_table = 0xffff_0000; // outside the 64 KiB
        let (mut t, d) = setup();
        let err = t.restore(&bad).unwrap_err();
        assert!(err.contains("queue 0"), "{err}");
        assert_eq!(d.lock().unwrap().activated, 0);
        let mut bad = state;
        bad.queues[0].max_size = 32;
        assert!(setup().0.restore(&bad).is_err());
    }

    #[test]
    fn bad_sizes_and_addresses_are_refused_and_counted() {
        let (mut t, _) = setup();
        let before = METRICS.mmio_refused_writes.load(Ordering::Relaxed);
        w(&mut t, 0x30, 0);
        for size in [0, 3, 17, 65535, 1 << 20] {
            w(&mut t, 0x38, size);
        }
        // The queue keeps its maximum size.
        assert_eq!(t.queues[0].size(), 16);
        w(&mut t, 0x80, 0x1001); // descriptor table: 16-byte aligned
        w(&mut t, 0x90, 0x1001); // avail ring: 2-byte aligned
        w(&mut t, 0xa0, 0x1002); // used ring: 4-byte aligned
        assert_eq!(t.queues[0].desc_table(), 0);
        w(&mut t, 0x84, 0x1); // high halves combine with the low ones
        assert_eq!(t.queues[0].desc_table(), 1 << 32);
        let refused = METRICS.mmio_refused_writes.load(Ordering::Relaxed) - before;
        assert!(refused >= 8, "{refused} writes refused");
    }

    #[test]
    fn legacy_driver_is_refused() {
        let (mut t, _) = setup();
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x20, 0x4);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn invalid_queue_fails_activation_without_panic() {
        let (mut t, dev) = setup();
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, 0xffff_0000); // outside the 64 KiB of memory
        w(&mut t, 0x44, 1);
        let all = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        w(&mut t, 0x70, all);
        assert_eq!(dev.lock().unwrap().activated, 0);
        assert_ne!(r(&mut t, 0x70) & STATUS_FAILED, 0);
        // Out-of-range selectors and odd sizes are harmless.
        w(&mut t, 0x30, 99);
        assert_eq!(r(&mut t, 0x34), 0);
        t.write(0x70, &[1]);
        let mut two = [0u8; 2];
        t.read(0x70, &mut two);
    }

    #[test]
    fn interrupt_ack_clears_bits() {
        let (mut t, _) = setup();
        t.interrupt.signal_used_queue().unwrap();
        assert_eq!(r(&mut t, 0x60), VIRTIO_MMIO_INT_VRING);
        w(&mut t, 0x64, VIRTIO_MMIO_INT_VRING);
        assert_eq!(r(&mut t, 0x60), 0);
    }
}
