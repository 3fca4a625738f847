//! Building and running a VM: KVM checks, memory, devices (through the
//! device manager), vCPUs; the running VM's event loop is in `runtime`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiListener, ApiServer};
use crate::arch::cpuid;
use crate::arch::layout;
use crate::arch::regs::{self, BootEntry};
use crate::boot;
use crate::config::{Console, VmConfig};
use crate::device_manager::{DeviceManager, Devices, VirtioSlot};
use crate::devices::boot_timer::{BootTimer, BootTimes};
use crate::devices::i8042::I8042;
use crate::runtime::{process_cpu_time, Control, EventLoop, Pending, SnapshotBy};
use crate::seccomp;
use crate::snapshot::{self, DeviceState, RestoreFiles, Snapshot, TemplateFiles, MEMORY_FILE};
use crate::vcpu::{self, GuestExit, Vcpu, VcpuShared, VcpuThreads};

pub use crate::device_manager::VirtioEntry;
pub use crate::runtime::DEFAULT_SHUTDOWN_TIMEOUT;

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

/// What a VM needs of the host's file system, opened (and its API socket
/// bound) before the VMM locks itself in its jail, which has none of it.
pub struct HostFiles {
    kvm: Kvm,
    /// None for a clone (`restore`): it boots no kernel.
    kernel: Option<std::fs::File>,
    initrd: Option<std::fs::File>,
    console: Option<ConsoleDest>,
    api: Option<ApiListener>,
    /// A template VM's directory files (`--template DIR`).
    template: Option<TemplateFiles>,
    /// A clone's template (`--restore DIR`).
    restore: Option<RestoreFiles>,
}

impl std::fmt::Debug for HostFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostFiles")
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

impl HostFiles {
    /// Opens `/dev/kvm` (checked), the kernel, the initrd and the console
    /// file, binds the API socket, creates a template's files, and opens a
    /// clone's template (`config.restore`).
    pub fn open(config: &VmConfig) -> Result<HostFiles> {
        let restore = match &config.restore {
            Some(dir) => Some(RestoreFiles::open(dir)?),
            None => None,
        };
        HostFiles::open_with(config, restore)
    }

    /// [`HostFiles::open`] with a clone's template already opened (the
    /// caller read its state to make `config`).
    pub fn open_with(config: &VmConfig, restore: Option<RestoreFiles>) -> Result<HostFiles> {
        if config.restore.is_some() != restore.is_some() {
            bail!("a clone needs its template's files, and only a clone has them");
        }
        let kvm = check_kvm()?;
        let kernel = match config.restore {
            Some(_) => None,
            None => Some(boot::open_kernel(&config.kernel)?),
        };
        let initrd = match (&config.initrd, &config.restore) {
            (Some(path), None) => Some(boot::open_initrd(path)?),
            _ => None,
        };
        let template = match &config.template {
            Some(dir) => {
                let mut files = TemplateFiles::create(dir, &kvm)
                    .with_context(|| format!("template directory {}", dir.display()))?;
                files.renamed_by_supervisor = config.jailed;
                Some(files)
            }
            None => None,
        };
        let console = console_dest(config)?;
        let api = match &config.api_socket {
            Some(path) => Some(
                ApiListener::bind(path)
                    .with_context(|| format!("API socket {}", path.display()))?,
            ),
            None => None,
        };
        Ok(HostFiles {
            kvm,
            kernel,
            initrd,
            console,
            api,
            template,
            restore,
        })
    }
}

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
    devices: Devices,
    api: Option<ApiListener>,
    template: Option<TemplateFiles>,
    /// Written by the boot timer when the guest is ready (a template that
    /// saves itself then).
    ready_evt: Option<EventFd>,
    /// A clone's guest RAM registered without fault-around (see
    /// [`crate::fault_around`]): open while the guest runs (closing it
    /// unregisters the mappings).
    _no_fault_around: Option<OwnedFd>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .field("cmdline", &self.cmdline)
            .finish_non_exhaustive()
    }
}

/// The guest's command line: the user's part, the console part, the
/// boot-timer address for the agent, `agent.template=1` for a template VM
/// (the agent then makes, before it is ready, what every sandbox needs, so
/// that clones have it), and one `virtio_mmio.device=SIZE@BASE:IRQ` per
/// device.
fn kernel_cmdline(config: &VmConfig, slots: &[VirtioSlot]) -> Result<String> {
    let mut cmdline = format!(
        "{} {} agent.boot_timer={:#x}",
        config.cmdline,
        config.console_cmdline(),
        layout::BOOT_TIMER_ADDR
    );
    if config.template.is_some() {
        cmdline.push_str(" agent.template=1");
    }
    for slot in slots {
        cmdline.push(' ');
        cmdline.push_str(&slot.cmdline_arg());
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

/// Raises the soft `RLIMIT_NOFILE` towards `want` (never above the hard
/// limit); returns the soft limit in force afterwards.
pub fn raise_fd_limit(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    let target = want.min(hard);
    if soft >= target {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => target,
        Err(err) => {
            tracing::warn!(%err, soft, target, "raising the open-file limit");
            soft
        }
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread and returns
/// their set. Call it first thing in `main`, before any thread exists, so
/// that every thread inherits the mask and these signals only ever reach
/// the VMM's signalfd (a helper thread with them unblocked would let the
/// default action kill the process).
pub fn block_exit_signals() -> nix::Result<SigSet> {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(s);
    }
    mask.thread_block()?;
    Ok(mask)
}

/// Elapsed milliseconds since `start`, for the build's phase logs.
fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

/// Creates the VM with its in-kernel irqchip and PIT.
fn create_vm(kvm: &Kvm) -> Result<VmFd> {
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
    Ok(vm_fd)
}

/// Creates guest RAM (in a template's memory file if given) and hands it
/// to KVM.
fn create_memory(
    vm_fd: &VmFd,
    size: u64,
    template: Option<&TemplateFiles>,
) -> Result<GuestMemoryMmap> {
    let mem = match template {
        Some(t) => {
            t.memory
                .set_len(size)
                .with_context(|| format!("sizing {}", t.dir.join(MEMORY_FILE).display()))?;
            snapshot::map_memory(&t.memory, size, false)?
        }
        None => boot::create_memory(size)?,
    };
    register_memory(vm_fd, &mem)?;
    Ok(mem)
}

/// Turns the host's fault-around off for a clone's guest RAM, so that a
/// page the guest reads maps that page of the template alone, not its
/// neighbours (see [`crate::fault_around`]). Where the kernel refuses, the
/// clone runs with fault-around, and says so.
fn no_fault_around(mem: &GuestMemoryMmap) -> Option<OwnedFd> {
    let ranges: Vec<(usize, usize)> = mem
        .iter()
        .filter_map(|r| {
            let host = mem.get_host_address(r.start_addr()).ok()?;
            Some((host as usize, r.len() as usize))
        })
        .collect();
    match crate::fault_around::disable(&ranges) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::info!(error = %e, "guest RAM keeps the host's fault-around");
            None
        }
    }
}

/// Hands every guest RAM region to KVM.
fn register_memory(vm_fd: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
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
        // Vm keeps for as long as the VM (vm_fd) exists, and which `run`
        // drops only after every vCPU thread has stopped.
        unsafe { vm_fd.set_user_memory_region(r) }.context("KVM_SET_USER_MEMORY_REGION")?;
    }
    Ok(())
}

/// A console destination and its size limit.
type ConsoleDest = (Box<dyn Write + Send>, Option<u64>);

/// The console's destination, per the configuration.
fn console_dest(config: &VmConfig) -> Result<Option<ConsoleDest>> {
    Ok(match &config.console {
        Console::Off => None,
        Console::Stdout => Some((Box::new(std::io::stdout()), None)),
        Console::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening console file {}", path.display()))?;
            Some((Box::new(file), Some(config.console_limit)))
        }
    })
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
        let host = HostFiles::open(&config)?;
        Vm::build_with(config, host, start, boot_times, virtio)
    }

    /// [`Vm::build`] from host files opened before (by a jailed VMM).
    pub fn build_with(
        config: VmConfig,
        host: HostFiles,
        start: Instant,
        boot_times: Arc<Mutex<BootTimes>>,
        virtio: Vec<VirtioEntry>,
    ) -> Result<Vm> {
        if host.restore.is_some() {
            return Vm::restore(config, host, start, boot_times, virtio);
        }
        let HostFiles {
            kvm,
            kernel,
            initrd,
            console,
            api,
            template,
            restore: _,
        } = host;
        let mut kernel = kernel.context("no kernel to boot")?;
        let vm_fd = create_vm(&kvm)?;
        tracing::debug!(phase = "vm created", ms = ms(start), "build");
        let mem_size = config.memory_bytes();
        let mem = create_memory(&vm_fd, mem_size, template.as_ref())?;
        tracing::debug!(phase = "memory mapped", ms = ms(start), "build");
        let kernel = boot::load_kernel_file(&mem, &mut kernel, &config.kernel)?;
        let initrd = match (initrd, &config.initrd) {
            (Some(mut file), Some(path)) => Some(boot::load_initrd_file(
                &mem,
                &mut file,
                path,
                mem_size,
                kernel.result.kernel_end,
            )?),
            _ => None,
        };
        tracing::debug!(phase = "kernel and initrd loaded", ms = ms(start), "build");

        let mut dm = DeviceManager::new(&vm_fd, mem.clone())?;
        if let Some((dest, limit)) = console {
            dm.add_serial(dest, limit, config.seccomp, None)?;
        }
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
        let i8042 = dm.add_i8042(reset_evt.try_clone().context("eventfd")?)?;
        let mut timer = BootTimer::new(start, boot_times.clone());
        let ready_evt = match (config.save_when_ready, &template) {
            (Some(_), Some(_)) => {
                let evt = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
                timer = timer.with_ready_event(evt.try_clone().context("eventfd")?);
                Some(evt)
            }
            (Some(_), None) => bail!("saving when ready needs a template directory"),
            _ => None,
        };
        dm.add_boot_timer(timer)?;
        for entry in virtio {
            dm.add_virtio(entry)?;
        }
        let cmdline = kernel_cmdline(&config, dm.slots())?;
        let devices = dm.finish();

        boot::write_cmdline(&mem, &cmdline)?;
        boot::write_mptable(&mem, config.vcpus)?;
        let e820 = layout::e820_map(mem_size);
        let entry = match kernel.pvh_entry {
            Some(entry) => boot::configure_pvh(&mem, entry, &e820, initrd)?,
            None => boot::configure_linux64(&mem, &kernel.result, cmdline.len(), &e820, initrd)?,
        };
        tracing::debug!(
            phase = "devices and boot data written",
            ms = ms(start),
            "build"
        );

        let shared = VcpuShared::new().context("eventfd")?;
        let vcpus = create_vcpus(&kvm, &vm_fd, &mem, &config, entry, &devices, &shared)?;
        tracing::debug!(phase = "vcpus configured", ms = ms(start), "build");
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
            devices,
            api,
            template,
            ready_evt,
            _no_fault_around: None,
        })
    }

    /// Builds a clone of the template in `host.restore` (see
    /// [`crate::snapshot`]): guest RAM mapped private from the template's
    /// file, the VM's and vCPUs' KVM state restored before any device can
    /// raise an interrupt, then the devices (`virtio`: the same kinds in
    /// the same order as the template's) restored and restarted.
    fn restore(
        config: VmConfig,
        host: HostFiles,
        start: Instant,
        boot_times: Arc<Mutex<BootTimes>>,
        virtio: Vec<VirtioEntry>,
    ) -> Result<Vm> {
        let HostFiles {
            kvm,
            console,
            api,
            restore,
            ..
        } = host;
        let RestoreFiles {
            dir,
            memory,
            snapshot,
        } = restore.context("no snapshot to restore")?;
        let what = || format!("restoring from {}", dir.display());
        if virtio.len() != snapshot.devices.len() {
            bail!(
                "{}: the template has {} virtio devices, this VM {}",
                what(),
                snapshot.devices.len(),
                virtio.len()
            );
        }
        for (i, (entry, saved)) in virtio.iter().zip(&snapshot.devices).enumerate() {
            let kind = entry
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .device_type();
            if kind != saved.device_type {
                bail!(
                    "{}: virtio device {i} is of type {kind}, the template's of type {}",
                    what(),
                    saved.device_type
                );
            }
        }
        let vm_fd = create_vm(&kvm)?;
        let mem_size = snapshot.memory_mib << 20;
        let mem = snapshot::map_memory(&memory, mem_size, true).with_context(what)?;
        let no_fault_around = no_fault_around(&mem);
        register_memory(&vm_fd, &mem)?;
        tracing::debug!(phase = "memory mapped", ms = ms(start), "restore");
        snapshot::restore_vm(&vm_fd, &snapshot.vm).with_context(what)?;
        let mut fds = Vec::with_capacity(snapshot.vcpu.len());
        for (index, state) in snapshot.vcpu.iter().enumerate() {
            let fd = vm_fd
                .create_vcpu(index as u64)
                .with_context(|| format!("KVM_CREATE_VCPU {index}"))?;
            snapshot::restore_vcpu(&fd, state, index).with_context(what)?;
            fds.push(fd);
        }
        snapshot::restore_clock(&vm_fd, &fds, &snapshot).with_context(what)?;
        tracing::debug!(phase = "vcpus restored", ms = ms(start), "restore");

        let mut dm = DeviceManager::new(&vm_fd, mem.clone())?;
        match (console, &snapshot.serial) {
            (Some((dest, limit)), Some(state)) => {
                dm.add_serial(dest, limit, config.seccomp, Some(state))?
            }
            // The guest's driver still talks to its UART: to nowhere.
            (None, Some(state)) => {
                dm.add_serial(Box::new(std::io::sink()), None, config.seccomp, Some(state))?
            }
            (Some(_), None) => bail!(
                "{}: the template has no console, so a clone cannot have one (--console off)",
                what()
            ),
            (None, None) => {}
        }
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
        let i8042 = dm.add_i8042(reset_evt.try_clone().context("eventfd")?)?;
        i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(&snapshot.i8042);
        dm.add_boot_timer(BootTimer::new(start, boot_times.clone()))?;
        for (i, (entry, saved)) in virtio.into_iter().zip(&snapshot.devices).enumerate() {
            dm.add_virtio(entry)?;
            let transport = dm.transports().last().cloned().context("no transport")?;
            transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore(&saved.transport)
                .map_err(|e| anyhow::anyhow!("{}: virtio device {i}: {e}", what()))?;
        }
        let devices = dm.finish();
        let shared = VcpuShared::new().context("eventfd")?;
        let vcpus = fds
            .into_iter()
            .enumerate()
            .map(|(index, fd)| new_vcpu(index as u8, fd, &devices, &shared, config.seccomp))
            .collect();
        tracing::info!(
            vcpus = snapshot.vcpus,
            memory_mib = snapshot.memory_mib,
            template = %dir.display(),
            build_ms = start.elapsed().as_millis() as u64,
            "VM restored"
        );
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
            cmdline: snapshot.cmdline,
            devices,
            api,
            template: None,
            ready_evt: None,
            _no_fault_around: no_fault_around,
        })
    }

    /// Saves the stopped VM into its template directory: every vCPU (from
    /// the fds their threads gave back), the VM's KVM state, the devices.
    #[allow(clippy::too_many_arguments)]
    fn save(
        template: &mut TemplateFiles,
        config: &VmConfig,
        cmdline: &str,
        vm_fd: &VmFd,
        fds: &[kvm_ioctls::VcpuFd],
        i8042: &Mutex<I8042>,
        serial: Option<&Arc<Mutex<crate::devices::serial::SerialConsole>>>,
        transports: &[Arc<Mutex<crate::devices::virtio::mmio::MmioTransport>>],
    ) -> Result<()> {
        if fds.len() != usize::from(config.vcpus) {
            bail!(
                "only {} of {} vCPU threads ended cleanly",
                fds.len(),
                config.vcpus
            );
        }
        let mut vcpu = fds
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                snapshot::save_vcpu(fd, &template.msr_index)
                    .with_context(|| format!("saving vCPU {i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut vm = snapshot::save_vm(vm_fd).context("saving the VM")?;
        vm.clock = snapshot::save_clock(vm_fd, fds, &mut vcpu).context("saving the clock")?;
        let mut devices = Vec::with_capacity(transports.len());
        for (i, t) in transports.iter().enumerate() {
            let t = t.lock().unwrap_or_else(|p| p.into_inner());
            let transport = t
                .save()
                .map_err(|e| anyhow::anyhow!("saving virtio device {i}: {e}"))?;
            devices.push(DeviceState {
                device_type: t.device_type(),
                transport,
            });
        }
        let snapshot = Snapshot {
            format: snapshot::FORMAT,
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            vsock_cid: config.vsock_cid,
            cmdline: cmdline.to_string(),
            vm,
            vcpu,
            serial: serial.map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).save()),
            i8042: i8042.lock().unwrap_or_else(|p| p.into_inner()).save(),
            devices,
        };
        template.write_state(&snapshot)
    }

    /// Shared boot milestones (the vsock device records the agent's).
    pub fn boot_times(&self) -> Arc<Mutex<BootTimes>> {
        self.boot_times.clone()
    }

    /// The full kernel command line given to the guest.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Runs the VM until the guest ends or the VMM is told to stop. On
    /// every way out, errors included, the vCPU threads are stopped and
    /// joined before guest memory is unmapped.
    pub fn run(self) -> Result<GuestExit> {
        let Vm {
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
            devices,
            api,
            mut template,
            ready_evt,
            // Bound (not `_`, which would drop it now): it lives to the end
            // of `run`, after the vCPUs stopped; dropping it only
            // unregisters the mappings.
            _no_fault_around: _uffd,
        } = self;
        let Devices {
            subscribers,
            console,
            fatal,
            serial,
            transports,
            ..
        } = devices;

        if config.seccomp {
            seccomp::install_violation_handler().context("installing the SIGSYS handler")?;
        }
        // SIGTERM/SIGINT/SIGHUP arrive on a signalfd; they are blocked in
        // every thread (see `block_exit_signals`).
        let mask = block_exit_signals().context("blocking signals")?;
        let signal_fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .context("signalfd")?;

        let api_evt = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
        let api = match api {
            Some(listener) => {
                let path = listener.path().to_path_buf();
                Some(
                    ApiServer::serve(
                        listener,
                        api_evt.try_clone().context("eventfd")?,
                        config.seccomp,
                        config.jailed,
                    )
                    .with_context(|| format!("API socket {}", path.display()))?,
                )
            }
            None => None,
        };
        let control = Arc::new(Mutex::new(Control {
            exit_evt: shared.exit_evt.try_clone().context("eventfd")?,
            reset_evt,
            api_evt,
            signal_fd,
            fatal,
            ready_evt,
            pending: Pending::default(),
        }));
        let events = EventLoop::new_manager(control.clone(), subscribers)?;

        vcpu::install_kick_handler().context("installing the vCPU kick handler")?;
        // Start-up cost: CPU time the process used from exec to here, just
        // before the first KVM_RUN.
        let startup_cpu = process_cpu_time();
        // The vCPUs wait at the gate until every thread has its filter.
        let gate = Arc::new(vcpu::Gate::default());
        // From here on the guard stops and joins the vCPUs on every path.
        let mut threads = VcpuThreads {
            handles: Vec::with_capacity(vcpus.len()),
            shared: shared.clone(),
        };
        let mut ready: Result<()> = Ok(());
        for mut v in vcpus {
            v.gate = Some(gate.clone());
            match v.spawn() {
                Ok(handle) => threads.handles.push(handle),
                Err(err) => {
                    ready = Err(err).context("starting a vCPU thread");
                    break;
                }
            }
        }
        if ready.is_ok() && config.seccomp {
            let kind = match (config.jailed, template.is_some()) {
                (true, false) => seccomp::ThreadKind::JailedEventLoop,
                (false, false) => seccomp::ThreadKind::EventLoop,
                (true, true) => seccomp::ThreadKind::JailedTemplateEventLoop,
                (false, true) => seccomp::ThreadKind::TemplateEventLoop,
            };
            ready = seccomp::install(kind).context("installing the event loop's seccomp filter");
        }
        if ready.is_err() {
            // The threads leave through the open gate; the guard joins them.
            shared.set(vcpu::RunState::Stopping);
        }
        gate.open();
        ready?;
        tracing::info!(
            ms = start.elapsed().as_millis() as u64,
            cpu_us = startup_cpu.as_micros() as u64,
            "vCPUs running"
        );

        let mut event_loop = EventLoop {
            config: &config,
            events,
            control,
            calls: api.as_ref().map(|(_, calls)| calls),
            vcpus: &threads,
            i8042: &i8042,
            boot_times: &boot_times,
            start,
            startup_cpu,
            shutdown_deadline: None,
            template: template.is_some(),
            save_when_ready: config.save_when_ready.map(|d| start + d),
            snapshot: None,
        };
        let outcome = event_loop.run();
        let snapshot = event_loop.snapshot.take();
        drop(event_loop);
        let outcome = match (outcome, snapshot, template.as_mut()) {
            (Ok(GuestExit::Snapshotted), Some(by), Some(template)) => {
                let fds = threads.stop_and_collect();
                let saved = Vm::save(
                    template,
                    &config,
                    &cmdline,
                    &vm_fd,
                    &fds,
                    &i8042,
                    serial.as_ref(),
                    &transports,
                )
                .with_context(|| format!("saving the VM into {}", template.dir.display()));
                let answer = match &saved {
                    Ok(()) => serde_json::json!({"ok": true, "state": "saved"}),
                    Err(err) => serde_json::json!({"ok": false, "error": format!("{err:#}")}),
                };
                if saved.is_ok() {
                    tracing::info!(dir = %template.dir.display(), "VM saved");
                }
                if let SnapshotBy::Api(reply) = by {
                    let _ = reply.send(answer);
                }
                saved.map(|()| GuestExit::Snapshotted)
            }
            (outcome, _, _) => outcome,
        };
        threads.stop();
        drop(threads);
        drop(transports);
        drop(serial);
        drop(api);
        // The console puts out what the guest wrote last.
        drop(console);
        drop(vm_fd);
        drop(mem);
        outcome
    }
}

/// A vCPU on the VM's buses, ready for its thread.
fn new_vcpu(
    index: u8,
    fd: kvm_ioctls::VcpuFd,
    devices: &Devices,
    shared: &Arc<VcpuShared>,
    seccomp: bool,
) -> Vcpu {
    Vcpu {
        index,
        fd,
        pio: devices.pio.clone(),
        mmio: devices.mmio.clone(),
        shared: shared.clone(),
        seccomp,
        gate: None,
        limiter: crate::guest_log::LogLimiter::new("vCPU exits"),
    }
}

/// Creates and configures the vCPUs; vCPU 0 gets the boot registers.
fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    entry: BootEntry,
    devices: &Devices,
    shared: &Arc<VcpuShared>,
) -> Result<Vec<Vcpu>> {
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
            fd.set_sregs(&regs::boot_sregs(mem, sregs, entry)?)
                .context("KVM_SET_SREGS")?;
            fd.set_regs(&regs::boot_regs(entry))
                .context("KVM_SET_REGS")?;
            fd.set_fpu(&regs::boot_fpu()).context("KVM_SET_FPU")?;
        }
        vcpus.push(new_vcpu(index, fd, devices, shared, config.seccomp));
    }
    Ok(vcpus)
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
        let mut template = config(Console::Off, "panic=1");
        template.template = Some("/run/isola/templates/k".into());
        let line = kernel_cmdline(&template, &[]).unwrap();
        assert_eq!(
            line,
            "panic=1 8250.nr_uarts=0 agent.boot_timer=0xd1000000 agent.template=1"
        );
    }

    #[test]
    fn cmdline_overflow_is_an_error() {
        let long = "x".repeat(layout::CMDLINE_MAX - 10);
        let err = kernel_cmdline(&config(Console::Stdout, &long), &[]).unwrap_err();
        assert!(err.to_string().contains("at most 2047 fit"), "{err}");
    }
}
