//! The virtio-mmio transport (virtio 1.2, section 4.2.2, version 2).
//!
//! Lives on the MMIO bus at a 4 KiB window per device. Queue notifications
//! do not come through here: each queue's QueueNotify write is matched by a
//! KVM ioeventfd (see [`MmioTransport::queue_evts`]) and goes straight to
//! the device's event loop. Interrupts go out through an irqfd.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    InterruptSignal, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
};
use crate::devices::bus::BusDevice;

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

/// One device's virtio-mmio register window.
#[derive(Debug)]
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<MmioInterrupt>,
    interrupt_status: Arc<AtomicU32>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
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
        let mut queue_evts = Vec::with_capacity(sizes.len());
        for size in sizes {
            queues.push(Queue::new(size).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("queue size {size}: {e:?}"),
                )
            })?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        let interrupt_status = Arc::new(AtomicU32::new(0));
        Ok(MmioTransport {
            device,
            mem,
            queues,
            queue_evts,
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
        })
    }

    /// The eventfds to register as KVM ioeventfds on QueueNotify, one per
    /// queue, with the queue index as datamatch.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
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
                tracing::debug!(offset, "virtio-mmio: read of unknown register");
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
                if let Some(q) = self.selected_queue() {
                    // An invalid size (0, > max, not a power of two) leaves
                    // the queue invalid; activation then fails cleanly.
                    q.set_size(value.min(u32::from(u16::MAX)) as u16);
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
                let (low, high) = if offset & 0x4 == 0 {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !0x4 {
                        0x80 => q.set_desc_table_address(low, high),
                        0x90 => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            _ => tracing::debug!(offset, value, "virtio-mmio: ignored register write"),
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
            tracing::debug!(old, value, "virtio-mmio: status bits cleared without reset");
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
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&mem) {
                tracing::warn!(queue = i, "virtio-mmio: driver set up an invalid queue");
                self.status |= STATUS_FAILED;
                return;
            }
        }
        // The device takes the configured queues; fresh ones (same maximum
        // sizes) stand in for them until a reset.
        let fresh: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::new(q.max_size()))
            .collect();
        let Ok(fresh) = fresh else {
            self.status |= STATUS_FAILED;
            return;
        };
        let queues = std::mem::replace(&mut self.queues, fresh);
        let evts: Result<Vec<EventFd>, _> =
            self.queue_evts.iter().map(EventFd::try_clone).collect();
        let result = match evts {
            Ok(evts) => lock(&self.device)
                .activate(mem, queues, evts, self.interrupt.clone())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => self.activated = true,
            Err(err) => {
                tracing::warn!(%err, "virtio-mmio: device activation failed");
                self.status |= STATUS_NEEDS_RESET;
                self.config_generation = self.config_generation.wrapping_add(1);
                let _ = self.interrupt.signal_config_change();
            }
        }
    }

    fn reset(&mut self) {
        if self.activated && !lock(&self.device).reset() {
            tracing::warn!("virtio-mmio: device cannot be reset");
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
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            queues: Vec<Queue>,
            evts: Vec<EventFd>,
            _: Arc<dyn InterruptSignal>,
        ) -> Result<(), ActivateError> {
            assert_eq!(queues.len(), evts.len());
            self.activated += 1;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            true
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy {
            config: [3, 0, 0, 0, 0, 0, 0, 0],
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
        w(&mut t, 0x70, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, 0x70), 0);
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
