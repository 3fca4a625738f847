//! Building and running a VM: KVM checks, memory, devices, vCPUs, and the
//! VMM's event loop (device events, vCPU exits, signals, API calls).

use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiServer, Call, Request};
use crate::arch::cpuid;
use crate::arch::layout;
use crate::arch::regs::{self, BootEntry};
use crate::boot;
use crate::config::{Console, VmConfig};
use crate::devices::boot_timer::{BootTimer, BootTimes};
use crate::devices::bus::Bus;
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{SerialConsole, COM1_BASE, COM1_LEN};
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use crate::devices::virtio::VirtioDevice;
use crate::vcpu::{self, GuestExit, RunState, Vcpu, VcpuShared};

/// How long a `shutdown` request waits for the guest before stopping it.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks that `/dev/kvm` can boot a standard guest; the error says why not.
pub fn check_kvm() -> Result<Kvm> {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        bail!(
            "this host's /dev/kvm is PVM (module kvm_pvm), which cannot boot standard guest \
             kernels; run isola-vmm on a host with Intel VT-x or AMD-V KVM \
             (tests use tests/kvm-host/run)"
        );
    }
    let kvm = Kvm::new().context("opening /dev/kvm (is KVM enabled, and may this user use it?)")?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        bail!(
            "/dev/kvm has API version {version}, isola-vmm needs {}",
            kvm_bindings::KVM_API_VERSION
        );
    }
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::Irqfd, "irqfd"),
        (Cap::UserMemory, "user memory"),
        (Cap::ImmediateExit, "immediate exit"),
    ] {
        if !kvm.check_extension(cap) {
            bail!("/dev/kvm lacks {name} support, which isola-vmm needs");
        }
    }
    Ok(kvm)
}

/// A virtio device, both as the transport sees it and as an event
/// subscriber of the VMM's loop (usually the same object).
pub type VirtioEntry = (
    Arc<Mutex<dyn VirtioDevice>>,
    Arc<Mutex<dyn MutEventSubscriber + Send>>,
);

/// A built VM, not yet running.
pub struct Vm {
    config: VmConfig,
    vm_fd: VmFd,
    mem: GuestMemoryMmap,
    i8042: Arc<Mutex<I8042>>,
    shared: Arc<VcpuShared>,
    vcpus: Vec<Vcpu>,
    reset_evt: EventFd,
    boot_times: Arc<Mutex<BootTimes>>,
    start: Instant,
    cmdline: String,
    subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .field("cmdline", &self.cmdline)
            .finish_non_exhaustive()
    }
}

/// Where one virtio device sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VirtioSlot {
    base: u64,
    irq: u32,
}

impl VirtioSlot {
    /// The window and IRQ of the `i`th virtio device.
    fn nth(i: usize) -> Result<VirtioSlot> {
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
}

/// The guest's command line: the user's part, the console part, the
/// boot-timer address for the agent, and one
/// `virtio_mmio.device=SIZE@BASE:IRQ` per device.
fn kernel_cmdline(config: &VmConfig, slots: &[VirtioSlot]) -> Result<String> {
    let mut cmdline = format!(
        "{} {} agent.boot_timer={:#x}",
        config.cmdline,
        config.console_cmdline(),
        layout::BOOT_TIMER_ADDR
    );
    for slot in slots {
        cmdline.push_str(&format!(
            " virtio_mmio.device={}K@{:#x}:{}",
            layout::VIRTIO_MMIO_SIZE >> 10,
            slot.base,
            slot.irq
        ));
    }
    if cmdline.len() >= layout::CMDLINE_MAX {
        bail!(
            "the kernel command line with the VMM's additions is {} bytes; at most {} fit",
            cmdline.len(),
            layout::CMDLINE_MAX - 1
        );
    }
    Ok(cmdline)
}

impl Vm {
    /// Builds the VM: memory, kernel, devices, vCPUs. `virtio` devices are
    /// given MMIO windows and IRQs in order; each is also an event
    /// subscriber of the VMM's loop.
    pub fn build(
        config: VmConfig,
        start: Instant,
        boot_times: Arc<Mutex<BootTimes>>,
        virtio: Vec<VirtioEntry>,
    ) -> Result<Vm> {
        let kvm = check_kvm()?;
        let vm_fd = kvm.create_vm().context("KVM_CREATE_VM")?;
        vm_fd
            .set_tss_address(0xfffb_d000)
            .context("KVM_SET_TSS_ADDR")?;
        vm_fd.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
        // The in-kernel PIT costs nothing until programmed; the guest
        // clocksource is kvm-clock and its timer the LAPIC (TSC-deadline).
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).context("KVM_CREATE_PIT2")?;

        let mem_size = config.memory_bytes();
        tracing::debug!(
            phase = "vm created",
            ms = start.elapsed().as_secs_f64() * 1000.0,
            "build"
        );
        let mem = boot::create_memory(mem_size)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .context("guest memory region without a host mapping")?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // Vm keeps for as long as the VM (vm_fd) exists.
            unsafe { vm_fd.set_user_memory_region(r) }.context("KVM_SET_USER_MEMORY_REGION")?;
        }

        tracing::debug!(
            phase = "memory mapped",
            ms = start.elapsed().as_secs_f64() * 1000.0,
            "build"
        );
        let kernel = boot::load_kernel(&mem, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(path) => Some(boot::load_initrd(
                &mem,
                path,
                mem_size,
                kernel.result.kernel_end,
            )?),
            None => None,
        };

        tracing::debug!(
            phase = "kernel and initrd loaded",
            ms = start.elapsed().as_secs_f64() * 1000.0,
            "build"
        );
        // Devices.
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let irq_evt = |irq: u32| -> Result<EventFd> {
            let evt = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
            vm_fd
                .register_irqfd(&evt, irq)
                .with_context(|| format!("KVM_IRQFD for IRQ {irq}"))?;
            Ok(evt)
        };
        match &config.console {
            Console::Off => {}
            console => {
                let out: Box<dyn Write + Send> = match console {
                    Console::File(path) => Box::new(LineWriter::new(
                        OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(path)
                            .with_context(|| format!("opening console file {}", path.display()))?,
                    )),
                    _ => Box::new(std::io::stdout()),
                };
                let serial = SerialConsole::new(irq_evt(layout::SERIAL_IRQ)?, out);
                pio.insert(Arc::new(Mutex::new(serial)), COM1_BASE, COM1_LEN)?;
            }
        }
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            irq_evt(layout::I8042_IRQ)?,
            reset_evt.try_clone().context("eventfd")?,
        )));
        pio.insert(i8042.clone(), I8042_BASE, I8042_LEN)?;
        mmio.insert(
            Arc::new(Mutex::new(BootTimer::new(start, boot_times.clone()))),
            layout::BOOT_TIMER_ADDR,
            1,
        )?;

        let mut slots = Vec::new();
        let mut subscribers = Vec::new();
        for (i, (device, subscriber)) in virtio.into_iter().enumerate() {
            let slot = VirtioSlot::nth(i)?;
            let transport = MmioTransport::new(device, mem.clone(), irq_evt(slot.irq)?)
                .context("creating a virtio-mmio transport")?;
            for (q, evt) in transport.queue_evts().iter().enumerate() {
                vm_fd
                    .register_ioevent(
                        evt,
                        &IoEventAddress::Mmio(slot.base + NOTIFY_REG_OFFSET),
                        q as u32,
                    )
                    .context("KVM_IOEVENTFD for a virtio queue")?;
            }
            mmio.insert(
                Arc::new(Mutex::new(transport)),
                slot.base,
                layout::VIRTIO_MMIO_SIZE,
            )?;
            slots.push(slot);
            subscribers.push(subscriber);
        }
        let cmdline = kernel_cmdline(&config, &slots)?;
        boot::write_cmdline(&mem, &cmdline)?;
        boot::write_mptable(&mem, config.vcpus)?;
        let e820 = layout::e820_map(mem_size);
        let entry = match kernel.pvh_entry {
            Some(entry) => boot::configure_pvh(&mem, entry, &e820, initrd)?,
            None => boot::configure_linux64(&mem, &kernel.result, cmdline.len(), &e820, initrd)?,
        };

        tracing::debug!(
            phase = "devices and boot data written",
            ms = start.elapsed().as_secs_f64() * 1000.0,
            "build"
        );
        // vCPUs.
        let shared = VcpuShared::new().context("eventfd")?;
        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .with_context(|| format!("KVM_CREATE_VCPU {index}"))?;
            let mut cpuid = supported.clone();
            cpuid::normalize(cpuid.as_mut_slice(), index, config.vcpus, tsc_deadline);
            fd.set_cpuid2(&cpuid)
                .with_context(|| format!("KVM_SET_CPUID2 on vCPU {index}"))?;
            regs::set_msrs(&fd).with_context(|| format!("MSRs of vCPU {index}"))?;
            regs::set_lint(&fd).with_context(|| format!("LAPIC of vCPU {index}"))?;
            if index == 0 {
                let sregs = fd.get_sregs().context("KVM_GET_SREGS")?;
                fd.set_sregs(&regs::boot_sregs(&mem, sregs, entry)?)
                    .context("KVM_SET_SREGS")?;
                fd.set_regs(&regs::boot_regs(entry))
                    .context("KVM_SET_REGS")?;
                fd.set_fpu(&regs::boot_fpu()).context("KVM_SET_FPU")?;
            }
            vcpus.push(Vcpu {
                index,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                shared: shared.clone(),
            });
        }
        tracing::debug!(
            phase = "vcpus configured",
            ms = start.elapsed().as_secs_f64() * 1000.0,
            "build"
        );
        let boot_kind = match entry {
            BootEntry::Pvh { .. } => "PVH",
            BootEntry::Linux64 { .. } => "bzImage 64-bit",
        };
        tracing::info!(
            vcpus = config.vcpus,
            memory_mib = config.memory_mib,
            boot = boot_kind,
            build_ms = start.elapsed().as_millis() as u64,
            "VM built"
        );
        tracing::debug!(%cmdline, "kernel command line");
        Ok(Vm {
            config,
            vm_fd,
            mem,
            i8042,
            shared,
            vcpus,
            reset_evt,
            boot_times,
            start,
            cmdline,
            subscribers,
        })
    }

    /// Shared boot milestones (the vsock device records the agent's).
    pub fn boot_times(&self) -> Arc<Mutex<BootTimes>> {
        self.boot_times.clone()
    }

    /// The full kernel command line given to the guest.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Runs the VM until the guest ends or the VMM is told to stop.
    pub fn run(self) -> Result<GuestExit> {
        let Vm {
            config,
            vm_fd: _vm_fd,
            mem: _mem,
            i8042,
            shared,
            vcpus,
            reset_evt,
            boot_times,
            start,
            cmdline: _,
            subscribers,
        } = self;

        // SIGTERM/SIGINT/SIGHUP arrive on a signalfd; block them first so
        // every thread spawned from here inherits the mask.
        let mut mask = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            mask.add(s);
        }
        mask.thread_block().context("blocking signals")?;
        let signal_fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .context("signalfd")?;

        let api_evt = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
        let api = match &config.api_socket {
            Some(path) => {
                let (server, calls) =
                    ApiServer::start(path, api_evt.try_clone().context("eventfd")?)
                        .with_context(|| format!("API socket {}", path.display()))?;
                Some((server, calls))
            }
            None => None,
        };

        let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().context("creating the event loop")?;
        let control = Arc::new(Mutex::new(Control {
            exit_evt: shared.exit_evt.try_clone().context("eventfd")?,
            reset_evt,
            api_evt,
            signal_fd,
            pending: Pending::default(),
        }));
        events.add_subscriber(control.clone());
        for s in subscribers {
            events.add_subscriber(s);
        }

        vcpu::install_kick_handler().context("installing the vCPU kick handler")?;
        // Start-up cost: CPU time the process used from exec to here, just
        // before the first KVM_RUN.
        let startup_cpu = process_cpu_time();
        let mut handles: Vec<JoinHandle<()>> = Vec::with_capacity(vcpus.len());
        for v in vcpus {
            handles.push(v.spawn().context("starting a vCPU thread")?);
        }
        tracing::info!(
            ms = start.elapsed().as_millis() as u64,
            cpu_us = startup_cpu.as_micros() as u64,
            "vCPUs running"
        );

        let mut running = Running {
            config: &config,
            shared: &shared,
            handles: &handles,
            i8042: &i8042,
            boot_times: &boot_times,
            start,
            startup_cpu,
            shutdown_deadline: None,
        };
        let outcome = loop {
            // Sleep until an event; wake on a clock only while a shutdown
            // request waits for the guest (an idle VM costs no wake-ups).
            let timeout_ms = running.shutdown_deadline.map_or(-1, |d| {
                d.saturating_duration_since(Instant::now())
                    .as_millis()
                    .clamp(1, i32::MAX as u128) as i32
            });
            events
                .run_with_timeout(timeout_ms)
                .context("the VMM event loop failed")?;
            let pending =
                std::mem::take(&mut control.lock().unwrap_or_else(|p| p.into_inner()).pending);
            if pending.reset {
                break GuestExit::Reset;
            }
            if pending.vcpu_exit {
                let why = shared
                    .exit
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                break why.unwrap_or(GuestExit::Reset);
            }
            if let Some(sig) = pending.signal {
                tracing::info!(signal = sig, "stopping the VM on signal");
                break GuestExit::PowerOff;
            }
            if let Some((_, calls)) = &api {
                let mut stop = false;
                while let Ok(call) = calls.try_recv() {
                    stop |= running.handle_call(call);
                }
                if stop {
                    break GuestExit::PowerOff;
                }
            }
            if running
                .shutdown_deadline
                .is_some_and(|d| Instant::now() >= d)
            {
                tracing::warn!("the guest did not power off in time; stopping it");
                break GuestExit::PowerOff;
            }
        };

        shared.set(RunState::Stopping);
        if !vcpu::kick_all(&handles, &shared, Duration::from_secs(5)) {
            tracing::warn!("some vCPU threads did not stop");
        }
        for h in handles {
            if h.is_finished() {
                let _ = h.join();
            }
        }
        drop(api);
        Ok(outcome)
    }
}

/// What the event loop needs to answer API calls about a running VM.
struct Running<'a> {
    config: &'a VmConfig,
    shared: &'a VcpuShared,
    handles: &'a [JoinHandle<()>],
    i8042: &'a Mutex<I8042>,
    boot_times: &'a Mutex<BootTimes>,
    start: Instant,
    startup_cpu: Duration,
    /// Set by a `shutdown` request: when to stop the guest regardless.
    shutdown_deadline: Option<Instant>,
}

impl Running<'_> {
    /// Executes one API call; true when the VM must stop now.
    fn handle_call(&mut self, call: Call) -> bool {
        let Running {
            config,
            shared,
            handles,
            i8042,
            boot_times,
            start,
            startup_cpu,
            ..
        } = *self;
        use serde_json::json;
        let mut stop = false;
        let reply = match call.request {
            Request::Info => {
                let times = boot_times.lock().unwrap_or_else(|p| p.into_inner());
                let state = match shared.run_state() {
                    RunState::Running => "running",
                    RunState::Paused => "paused",
                    RunState::Stopping => "stopping",
                };
                json!({
                    "ok": true,
                    "state": state,
                    "pid": std::process::id(),
                    "vcpus": config.vcpus,
                    "memory_mib": config.memory_mib,
                    "uptime_ms": start.elapsed().as_millis() as u64,
                    "startup_cpu_us": startup_cpu.as_micros() as u64,
                    "boot_time_ms": {
                        "init_ready": times.init_ready.map(|d| d.as_millis() as u64),
                        "agent_ready": times.agent_ready.map(|d| d.as_millis() as u64),
                    },
                })
            }
            Request::Pause => {
                shared.set(RunState::Paused);
                if vcpu::kick_all(handles, shared, Duration::from_secs(5)) {
                    tracing::info!("vCPUs paused");
                    json!({"ok": true, "state": "paused"})
                } else {
                    shared.set(RunState::Running);
                    json!({"ok": false, "error": "vCPUs did not pause within 5 s"})
                }
            }
            Request::Resume => {
                shared.set(RunState::Running);
                tracing::info!("vCPUs resumed");
                json!({"ok": true, "state": "running"})
            }
            Request::Shutdown { timeout_ms } => {
                if shared.run_state() == RunState::Paused {
                    shared.set(RunState::Running);
                }
                i8042
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .trigger_ctrl_alt_del();
                let timeout = timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);
                self.shutdown_deadline = Some(Instant::now() + timeout);
                tracing::info!(
                    timeout_ms = timeout.as_millis() as u64,
                    "asked the guest to power off"
                );
                json!({"ok": true, "state": "shutting_down"})
            }
            Request::Stop => {
                stop = true;
                json!({"ok": true, "state": "stopping"})
            }
        };
        let _ = call.reply.send(reply);
        stop
    }
}

/// User plus system CPU time of the whole process so far.
fn process_cpu_time() -> Duration {
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::new(
                    tv.tv_sec().max(0) as u64,
                    (tv.tv_usec().max(0) as u32) * 1000,
                )
            };
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

#[derive(Debug, Default)]
struct Pending {
    vcpu_exit: bool,
    reset: bool,
    signal: Option<u32>,
}

/// The VMM's own events: vCPU exits, i8042 reset, API calls, signals.
#[derive(Debug)]
struct Control {
    exit_evt: EventFd,
    reset_evt: EventFd,
    api_evt: EventFd,
    signal_fd: SignalFd,
    pending: Pending,
}

const EV_EXIT: u32 = 1;
const EV_RESET: u32 = 2;
const EV_API: u32 = 3;
const EV_SIGNAL: u32 = 4;

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        for (fd, data) in [
            (self.exit_evt.as_raw_fd(), EV_EXIT),
            (self.reset_evt.as_raw_fd(), EV_RESET),
            (self.api_evt.as_raw_fd(), EV_API),
            (self.signal_fd.as_raw_fd(), EV_SIGNAL),
        ] {
            if let Err(err) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                tracing::error!(?err, "registering a VMM event");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps<'_>) {
        match events.data() {
            EV_EXIT => {
                let _ = self.exit_evt.read();
                self.pending.vcpu_exit = true;
            }
            EV_RESET => {
                let _ = self.reset_evt.read();
                self.pending.reset = true;
            }
            EV_API => {
                let _ = self.api_evt.read();
            }
            EV_SIGNAL => {
                while let Ok(Some(info)) = self.signal_fd.read_signal() {
                    self.pending.signal = Some(info.ssi_signo);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Console;

    fn config(console: Console, cmdline: &str) -> VmConfig {
        let kernel = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        VmConfig::new(
            kernel,
            None,
            Some(cmdline.into()),
            1,
            128,
            None,
            3,
            console,
            None,
        )
        .unwrap()
    }

    #[test]
    fn cmdline_gets_console_and_virtio_devices() {
        let slots = [VirtioSlot::nth(0).unwrap(), VirtioSlot::nth(1).unwrap()];
        let line = kernel_cmdline(&config(Console::Stdout, "panic=1"), &slots).unwrap();
        assert_eq!(
            line,
            "panic=1 console=ttyS0 8250.nr_uarts=1 agent.boot_timer=0xd1000000 \
             virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        let off = kernel_cmdline(&config(Console::Off, "panic=1"), &[]).unwrap();
        assert_eq!(off, "panic=1 8250.nr_uarts=0 agent.boot_timer=0xd1000000");
    }

    #[test]
    fn cmdline_overflow_is_an_error() {
        let long = "x".repeat(layout::CMDLINE_MAX - 10);
        let err = kernel_cmdline(&config(Console::Stdout, &long), &[]).unwrap_err();
        assert!(err.to_string().contains("at most 2047 fit"), "{err}");
    }

    #[test]
    fn virtio_slots_run_out_at_irq_23() {
        assert_eq!(VirtioSlot::nth(18).unwrap().irq, 23);
        assert!(VirtioSlot::nth(19).is_err());
        assert!(VirtioSlot::nth(usize::MAX).is_err());
    }
}
