//! Puts devices on the VM: allocates virtio-mmio windows and IRQs,
//! connects irqfds and ioeventfds with KVM, inserts devices on the
//! port-I/O and MMIO buses, collects the event-loop subscribers, and
//! yields the `virtio_mmio.device=` arguments for the kernel command line.
//!
//! Adding a device to isola is its module plus one `add_*` call in
//! [`crate::vm::Vm::build`].

use std::io::Write;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout;
use crate::devices::boot_timer::BootTimer;
use crate::devices::bus::Bus;
use crate::devices::console::{ConsoleSink, ConsoleWriter};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{SerialConsole, COM1_BASE, COM1_LEN};
use crate::devices::virtio::lifecycle::FatalSignal;
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use crate::devices::virtio::VirtioDevice;
use crate::snapshot::SerialState;

/// A virtio device, both as the transport sees it and as an event
/// subscriber of the VMM's loop (usually the same object).
pub type VirtioEntry = (
    Arc<Mutex<dyn VirtioDevice>>,
    Arc<Mutex<dyn MutEventSubscriber + Send>>,
);

/// Where one virtio device sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    pub base: u64,
    pub irq: u32,
}

impl VirtioSlot {
    /// The window and IRQ of the `i`th virtio device.
    pub fn nth(i: usize) -> Result<VirtioSlot> {
        let irq = u32::try_from(i)
            .ok()
            .and_then(|i| layout::VIRTIO_IRQ_BASE.checked_add(i))
            .filter(|irq| *irq <= layout::IRQ_MAX);
        let Some(irq) = irq else {
            bail!(
                "too many virtio devices (IRQs {}..={} are free)",
                layout::VIRTIO_IRQ_BASE,
                layout::IRQ_MAX
            );
        };
        Ok(VirtioSlot {
            base: layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE,
            irq,
        })
    }

    /// Its `virtio_mmio.device=SIZE@BASE:IRQ` kernel argument.
    pub fn cmdline_arg(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            layout::VIRTIO_MMIO_SIZE >> 10,
            self.base,
            self.irq
        )
    }
}

/// The devices of one VM, as they are being put together.
pub struct DeviceManager<'a> {
    vm_fd: &'a VmFd,
    mem: GuestMemoryMmap,
    pub pio: Bus,
    pub mmio: Bus,
    slots: Vec<VirtioSlot>,
    subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    console: Option<ConsoleWriter>,
    fatal: FatalSignal,
    serial: Option<Arc<Mutex<SerialConsole>>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl std::fmt::Debug for DeviceManager<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager")
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

/// What the VM keeps of its devices once built.
pub struct Devices {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    /// The console writer thread, if there is a console; dropped after the
    /// vCPUs stopped, it puts out what is left.
    pub console: Option<ConsoleWriter>,
    /// Raised by a device that cannot go on; the event loop ends the VM.
    pub fatal: FatalSignal,
    /// For snapshots: the UART and the virtio transports, in order.
    pub serial: Option<Arc<Mutex<SerialConsole>>>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("subscribers", &self.subscribers.len())
            .finish_non_exhaustive()
    }
}

impl<'a> DeviceManager<'a> {
    pub fn new(vm_fd: &'a VmFd, mem: GuestMemoryMmap) -> Result<Self> {
        Ok(DeviceManager {
            vm_fd,
            mem,
            pio: Bus::new(),
            mmio: Bus::new(),
            slots: Vec::new(),
            subscribers: Vec::new(),
            console: None,
            fatal: FatalSignal::new().context("eventfd")?,
            serial: None,
            transports: Vec::new(),
        })
    }

    /// An eventfd that raises `irq` in the guest (KVM irqfd).
    fn irqfd(&self, irq: u32) -> Result<EventFd> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
        self.vm_fd
            .register_irqfd(&evt, irq)
            .with_context(|| format!("KVM_IRQFD for IRQ {irq}"))?;
        Ok(evt)
    }

    /// COM1, writing through a console writer thread into `dest` (capped
    /// at `limit` bytes if given; the thread filtered if `seccomp`), with
    /// the registers of a snapshot if `state`.
    pub fn add_serial(
        &mut self,
        dest: Box<dyn Write + Send>,
        limit: Option<u64>,
        seccomp: bool,
        state: Option<&SerialState>,
    ) -> Result<()> {
        let (writer, sink): (ConsoleWriter, ConsoleSink) =
            ConsoleWriter::start(dest, limit, seccomp).context("starting the console writer")?;
        let irq = self.irqfd(layout::SERIAL_IRQ)?;
        let serial = match state {
            Some(state) => SerialConsole::from_state(irq, Box::new(sink), state)?,
            None => SerialConsole::new(irq, Box::new(sink)),
        };
        let serial = Arc::new(Mutex::new(serial));
        self.pio.insert(serial.clone(), COM1_BASE, COM1_LEN)?;
        self.serial = Some(serial);
        self.console = Some(writer);
        Ok(())
    }

    /// The i8042; `reset_evt` is written when the guest resets through it.
    pub fn add_i8042(&mut self, reset_evt: EventFd) -> Result<Arc<Mutex<I8042>>> {
        let i8042 = Arc::new(Mutex::new(I8042::new(
            self.irqfd(layout::I8042_IRQ)?,
            reset_evt,
        )));
        self.pio.insert(i8042.clone(), I8042_BASE, I8042_LEN)?;
        Ok(i8042)
    }

    pub fn add_boot_timer(&mut self, timer: BootTimer) -> Result<()> {
        self.mmio
            .insert(Arc::new(Mutex::new(timer)), layout::BOOT_TIMER_ADDR, 1)?;
        Ok(())
    }

    /// A virtio device in the next MMIO window, with its IRQ, its queue
    /// notifications as KVM ioeventfds, the VMM's fatal-error signal, and
    /// its event subscriber.
    pub fn add_virtio(&mut self, (device, subscriber): VirtioEntry) -> Result<VirtioSlot> {
        let slot = VirtioSlot::nth(self.slots.len())?;
        let notify = IoEventAddress::Mmio(slot.base + NOTIFY_REG_OFFSET);
        {
            let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
            dev.set_fatal_signal(self.fatal.clone());
            for (q, evt) in dev.queue_events().iter().enumerate() {
                self.vm_fd
                    .register_ioevent(evt, &notify, q as u32)
                    .context("KVM_IOEVENTFD for a virtio queue")?;
            }
        }
        let transport = MmioTransport::new(device, self.mem.clone(), self.irqfd(slot.irq)?)
            .context("creating a virtio-mmio transport")?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), slot.base, layout::VIRTIO_MMIO_SIZE)?;
        self.transports.push(transport);
        self.slots.push(slot);
        self.subscribers.push(subscriber);
        Ok(slot)
    }

    /// The virtio devices' transports, in order.
    pub fn transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }

    /// The virtio devices' slots, in order.
    pub fn slots(&self) -> &[VirtioSlot] {
        &self.slots
    }

    pub fn finish(self) -> Devices {
        Devices {
            pio: Arc::new(self.pio),
            mmio: Arc::new(self.mmio),
            subscribers: self.subscribers,
            console: self.console,
            fatal: self.fatal,
            serial: self.serial,
            transports: self.transports,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_slots_run_out_at_irq_23() {
        assert_eq!(VirtioSlot::nth(18).unwrap().irq, 23);
        assert!(VirtioSlot::nth(19).is_err());
        assert!(VirtioSlot::nth(usize::MAX).is_err());
        assert_eq!(
            VirtioSlot::nth(1).unwrap().cmdline_arg(),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
    }
}
