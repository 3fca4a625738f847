//! VM snapshots for templates: a VM booted once (the *template*) is saved,
//! and new VMs (*clones*) start from it instead of booting.
//!
//! A template VMM (`--template DIR`) keeps guest RAM in `DIR/memory`, a
//! file it creates, mapped shared: the guest's pages are the file's pages,
//! so saving memory costs nothing (the pages are in the page cache, and
//! never-touched or balloon-freed pages are holes). On the API's
//! `snapshot` call it pauses the vCPUs, stops their threads, writes what
//! KVM and the devices hold into `DIR/state.json` ([`Snapshot`]), and
//! exits.
//!
//! A clone (`--restore DIR`) maps `DIR/memory` **private**
//! (`MAP_PRIVATE | MAP_NORESERVE`): every clone shares the file's clean
//! pages through the host page cache and gets a copy of a page only when
//! it writes it. It creates the VM, its irqchip and PIT, restores their
//! state and the clock, creates the vCPUs with the saved registers, and
//! builds the devices in the template's order, each restored from its
//! transport state (a device the driver had started is started again on
//! the saved queue positions). What the template's host side held is
//! gone: vsock streams are reset (the guest's driver gets a transport
//! reset event), taps and shares are the clone's own.
//!
//! What KVM state is saved follows Firecracker's snapshots: per vCPU the
//! CPUID, MSRs, general, segment, FPU/XSAVE, XCR and debug registers, the
//! LAPIC, the MP state, pending events and the TSC frequency; per VM the
//! two PICs, the IOAPIC, the PIT and the kvm-clock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::layout;
use crate::devices::virtio::mmio::TransportState;

/// The state file's format; a clone refuses any other.
pub const FORMAT: u32 = 1;
/// Guest RAM's file in a template directory.
pub const MEMORY_FILE: &str = "memory";
/// The state's file in a template directory: it appears (a rename) only
/// once the template is whole.
pub const STATE_FILE: &str = "state.json";
/// The state's file while it is written.
pub const STATE_PARTIAL: &str = "state.json.partial";
/// The largest state file a clone reads (the real one is well under).
const STATE_MAX: u64 = 16 << 20;
/// MSRs read or written per KVM_GET/SET_MSRS.
const MSR_CHUNK: usize = 64;
/// IA32_TSC and IA32_TSC_DEADLINE: restored with the clock, the deadline
/// after the TSC (KVM compares it with the TSC it has then).
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// One vCPU's saved state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// (index, value) of every MSR KVM let us read.
    pub msrs: Vec<(u32, u64)>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

/// The VM-wide KVM state: PICs, IOAPIC, PIT, clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The 16550's registers (vm-superio's `SerialState`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The i8042's registers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub status: u8,
    pub control: u8,
    pub outp: u8,
    pub pending: Option<u8>,
    pub buffer: Vec<u8>,
}

/// One virtio device: its type (a clone must have the same devices in the
/// same order) and its transport.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    pub device_type: u32,
    pub transport: TransportState,
}

/// Everything a clone needs besides guest RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    /// The isola-vmm that saved it: a clone refuses another version.
    pub vmm_version: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub vsock_cid: u64,
    /// The full kernel command line the template booted with.
    pub cmdline: String,
    pub vm: VmState,
    pub vcpu: Vec<VcpuState>,
    /// None when the template had no console (then neither may a clone).
    pub serial: Option<SerialState>,
    pub i8042: I8042State,
    pub devices: Vec<DeviceState>,
}

impl Snapshot {
    /// Checks that this isola-vmm can restore it.
    pub fn check(&self) -> Result<()> {
        if self.format != FORMAT {
            bail!(
                "the snapshot's format is {}, this isola-vmm reads {FORMAT}",
                self.format
            );
        }
        if self.vmm_version != env!("CARGO_PKG_VERSION") {
            bail!(
                "the snapshot was saved by isola-vmm {}, this is {}",
                self.vmm_version,
                env!("CARGO_PKG_VERSION")
            );
        }
        if self.vcpu.len() != usize::from(self.vcpus) || self.vcpus == 0 {
            bail!(
                "the snapshot has {} vCPU states for {} vCPUs",
                self.vcpu.len(),
                self.vcpus
            );
        }
        Ok(())
    }
}

/// What a template VMM opens before its filters and jail: the directory's
/// two files (created, never overwritten) and the MSRs to save.
#[derive(Debug)]
pub struct TemplateFiles {
    pub dir: PathBuf,
    pub memory: File,
    pub state: File,
    pub msr_index: Vec<u32>,
    /// The state file stays `state.json.partial`: a jailed VMM cannot
    /// rename in `dir`; its supervisor does ([`crate::jail::Publish`]).
    pub renamed_by_supervisor: bool,
}

/// Creates `name` in `dir`: owner-only, refusing one that exists.
fn create_new(dir: &Path, name: &str) -> Result<File> {
    let path = dir.join(name);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))
}

impl TemplateFiles {
    /// Creates `dir/memory` and `dir/state.json.partial` (`dir` must exist
    /// and hold neither, nor a `state.json`) and reads KVM's MSR list.
    pub fn create(dir: &Path, kvm: &Kvm) -> Result<TemplateFiles> {
        if dir.join(STATE_FILE).exists() {
            bail!("{} holds a saved template already", dir.display());
        }
        let memory = create_new(dir, MEMORY_FILE)?;
        let state = create_new(dir, STATE_PARTIAL)?;
        let msr_index = kvm
            .get_msr_index_list()
            .context("KVM_GET_MSR_INDEX_LIST")?
            .as_slice()
            .to_vec();
        Ok(TemplateFiles {
            dir: dir.to_path_buf(),
            memory,
            state,
            msr_index,
            renamed_by_supervisor: false,
        })
    }

    /// Writes the state file (once), then renames it into place: a
    /// directory with a `state.json` is a whole template. (Jailed, the
    /// supervisor renames it once this process exited well.)
    pub fn write_state(&mut self, snapshot: &Snapshot) -> Result<()> {
        let json = serde_json::to_vec(snapshot).context("encoding the snapshot")?;
        let partial = self.dir.join(STATE_PARTIAL);
        self.state
            .write_all(&json)
            .and_then(|()| self.state.sync_all())
            .with_context(|| format!("writing {}", partial.display()))?;
        if self.renamed_by_supervisor {
            return Ok(());
        }
        std::fs::rename(&partial, self.dir.join(STATE_FILE))
            .with_context(|| format!("renaming {} into place", partial.display()))
    }
}

/// A template directory opened by a clone.
#[derive(Debug)]
pub struct RestoreFiles {
    pub dir: PathBuf,
    pub memory: File,
    pub snapshot: Snapshot,
}

impl RestoreFiles {
    /// Opens `dir/memory` read-only and reads and checks `dir/state.json`,
    /// neither followed through a symlink.
    pub fn open(dir: &Path) -> Result<RestoreFiles> {
        let open = |name: &str| {
            let path = dir.join(name);
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))
        };
        let memory = open(MEMORY_FILE)?;
        let state = open(STATE_FILE)?;
        let mut json = Vec::new();
        state
            .take(STATE_MAX)
            .read_to_end(&mut json)
            .with_context(|| format!("reading {}", dir.join(STATE_FILE).display()))?;
        let snapshot: Snapshot = serde_json::from_slice(&json).with_context(|| {
            format!("{} is not a snapshot state", dir.join(STATE_FILE).display())
        })?;
        snapshot
            .check()
            .with_context(|| format!("snapshot {}", dir.display()))?;
        let want = snapshot.memory_mib << 20;
        let len = memory
            .metadata()
            .with_context(|| format!("{}", dir.join(MEMORY_FILE).display()))?
            .len();
        if len != want {
            bail!(
                "{} is {len} bytes; the snapshot's guest has {} MiB",
                dir.join(MEMORY_FILE).display(),
                snapshot.memory_mib
            );
        }
        Ok(RestoreFiles {
            dir: dir.to_path_buf(),
            memory,
            snapshot,
        })
    }
}

/// Guest RAM of `size` bytes mapped from `file` (RAM regions at
/// consecutive offsets): shared for a template, private (copy on write,
/// nothing reserved) for a clone.
///
/// A clone maps only the file's data; its holes (memory the template
/// never touched or gave back through the balloon) are private anonymous
/// memory instead. Mapped from the file, a hole the clone touches would
/// be filled in the *file* (tmpfs allocates a zero page in its page cache
/// on a fault, before the copy on write): every clone's fresh memory
/// would grow the template's page cache for good.
pub fn map_memory(file: &File, size: u64, private: bool) -> Result<GuestMemoryMmap> {
    let flags = if private {
        libc::MAP_PRIVATE | libc::MAP_NORESERVE
    } else {
        libc::MAP_SHARED | libc::MAP_NORESERVE
    };
    let holes = if private {
        let mut holes = file_holes(file, size).context("finding the memory file's holes")?;
        if holes.len() > MAX_HOLES {
            // Keep the largest: each is a mapping of its own.
            holes.sort_by_key(|&(start, end)| std::cmp::Reverse(end - start));
            holes.truncate(MAX_HOLES);
            holes.sort_unstable();
        }
        holes
    } else {
        Vec::new()
    };
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, len) in layout::ram_regions(size) {
        let f = file.try_clone().context("duplicating the memory file")?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(f, offset)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
        .map_err(|e| anyhow::anyhow!("mapping guest RAM at {:#x} ({len} bytes): {e}", addr.0))?;
        for &(start, end) in &holes {
            let (start, end) = (start.max(offset), end.min(offset + len));
            if start >= end {
                continue;
            }
            let at = mapping.as_ptr() as usize + (start - offset) as usize;
            // SAFETY: [at, at + end - start) lies inside `mapping` (the
            // hole clipped to this region), which nothing uses yet;
            // MAP_FIXED replaces that part of it with anonymous memory,
            // unmapped with the rest when `mapping` is dropped.
            let got = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    (end - start) as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if got == libc::MAP_FAILED {
                bail!(
                    "mapping anonymous memory over the memory file's hole at {start:#x}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        let region = GuestRegionMmap::new(mapping, addr)
            .context("a guest RAM region overflows the address space")?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| anyhow::anyhow!("guest RAM: {e}"))
}

/// The most holes of a memory file a clone maps as anonymous memory (each
/// is a mapping; the largest are kept).
const MAX_HOLES: usize = 4096;

/// The holes of `file`'s first `size` bytes, shrunk to whole pages, as
/// `[start, end)` ranges (`SEEK_DATA`/`SEEK_HOLE`).
fn file_holes(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    const PAGE: u64 = 4096;
    let fd = file.as_raw_fd();
    let seek = |off: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; moves only its offset.
        let got = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
        if got < 0 {
            let err = std::io::Error::last_os_error();
            // ENXIO: no data (SEEK_DATA) at or after `off`.
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(err),
            };
        }
        Ok(Some(got as u64))
    };
    let mut holes = Vec::new();
    let mut off = 0u64;
    while off < size {
        let data = seek(off, libc::SEEK_DATA)?.unwrap_or(size).min(size);
        // [off, data) is a hole, shrunk to whole pages.
        let (start, end) = (off.next_multiple_of(PAGE), data - data % PAGE);
        if end > start {
            holes.push((start, end));
        }
        if data >= size {
            break;
        }
        // Past `data` whatever the file system answers (a file changed
        // under us must not make this loop forever).
        off = seek(data, libc::SEEK_HOLE)?
            .unwrap_or(size)
            .max(data + PAGE);
    }
    Ok(holes)
}

/// Reads every MSR of `index` that KVM lets this vCPU read. KVM stops a
/// KVM_GET_MSRS at the first MSR it cannot read: that one is skipped.
fn read_msrs(fd: &VcpuFd, index: &[u32]) -> Result<Vec<(u32, u64)>> {
    let mut out = Vec::with_capacity(index.len());
    let mut rest = index;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).context("an MSR list")?;
        let read = fd.get_msrs(&mut msrs).context("KVM_GET_MSRS")?;
        out.extend(msrs.as_slice().iter().take(read).map(|e| (e.index, e.data)));
        // Past what was read, and past the one that failed.
        let skip = (read + 1).min(chunk.len());
        rest = &rest[skip..];
    }
    Ok(out)
}

/// Saves one (stopped) vCPU.
pub fn save_vcpu(fd: &VcpuFd, msr_index: &[u32]) -> Result<VcpuState> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_CPUID2")?
        .as_slice()
        .to_vec();
    Ok(VcpuState {
        cpuid,
        msrs: read_msrs(fd, msr_index)?,
        regs: fd.get_regs().context("KVM_GET_REGS")?,
        sregs: fd.get_sregs().context("KVM_GET_SREGS")?,
        xsave: fd.get_xsave().context("KVM_GET_XSAVE")?,
        xcrs: fd.get_xcrs().context("KVM_GET_XCRS")?,
        debugregs: fd.get_debug_regs().context("KVM_GET_DEBUGREGS")?,
        lapic: fd.get_lapic().context("KVM_GET_LAPIC")?,
        mp_state: fd.get_mp_state().context("KVM_GET_MP_STATE")?,
        events: fd.get_vcpu_events().context("KVM_GET_VCPU_EVENTS")?,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// The MSRs [`restore_vcpu`] writes: all but the TSC and its deadline,
/// which [`restore_clock`] writes once every vCPU is restored, together
/// with the clock.
fn msrs_but_the_clock(msrs: &[(u32, u64)]) -> Vec<kvm_msr_entry> {
    msrs.iter()
        .filter(|(index, _)| !matches!(*index, MSR_IA32_TSC | MSR_IA32_TSC_DEADLINE))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect()
}

/// Restores one vCPU, in the order KVM needs (Firecracker's): CPUID
/// (what the rest is checked against) and the TSC frequency, registers,
/// then the LAPIC (after the APIC base in the segment registers), then the
/// MSRs but the TSC and its deadline ([`restore_clock`] writes those, after
/// the LAPIC: KVM takes IA32_TSC_DEADLINE only while the LAPIC timer is in
/// TSC-deadline mode, and drops it otherwise, which leaves the guest
/// without its next timer interrupt), then the MP state and pending
/// events.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState, index: usize) -> Result<()> {
    let step = |what: &str| format!("restoring vCPU {index}: {what}");
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    fd.set_cpuid2(&cpuid)
        .with_context(|| step("KVM_SET_CPUID2"))?;
    if let Some(khz) = state.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz)
                .with_context(|| step(&format!("KVM_SET_TSC_KHZ {khz}")))?;
        }
    }
    fd.set_regs(&state.regs)
        .with_context(|| step("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .with_context(|| step("KVM_SET_SREGS"))?;
    // SAFETY: `xsave` is a whole kvm_xsave as KVM_GET_XSAVE returned it;
    // KVM_SET_XSAVE reads exactly that struct (no XSAVE2 extension).
    unsafe { fd.set_xsave(&state.xsave) }.with_context(|| step("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs)
        .with_context(|| step("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs)
        .with_context(|| step("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .with_context(|| step("KVM_SET_LAPIC"))?;
    for chunk in msrs_but_the_clock(&state.msrs).chunks(MSR_CHUNK) {
        let msrs = Msrs::from_entries(chunk).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let set = fd.set_msrs(&msrs).with_context(|| step("KVM_SET_MSRS"))?;
        if set != chunk.len() {
            let failed = chunk.get(set).map_or(0, |e| e.index);
            bail!("{}: KVM refused MSR {failed:#x}", step("KVM_SET_MSRS"));
        }
    }
    fd.set_mp_state(state.mp_state)
        .with_context(|| step("KVM_SET_MP_STATE"))?;
    fd.set_vcpu_events(&state.events)
        .with_context(|| step("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn get_chip(vm_fd: &VmFd, chip_id: u32, name: &str) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm_fd
        .get_irqchip(&mut chip)
        .with_context(|| format!("KVM_GET_IRQCHIP ({name})"))?;
    Ok(chip)
}

/// Saves the VM's PICs, IOAPIC and PIT (the clock: [`save_clock`]).
pub fn save_vm(vm_fd: &VmFd) -> Result<VmState> {
    Ok(VmState {
        pic_master: get_chip(vm_fd, KVM_IRQCHIP_PIC_MASTER, "PIC master")?,
        pic_slave: get_chip(vm_fd, KVM_IRQCHIP_PIC_SLAVE, "PIC slave")?,
        ioapic: get_chip(vm_fd, KVM_IRQCHIP_IOAPIC, "IOAPIC")?,
        pit: vm_fd.get_pit2().context("KVM_GET_PIT2")?,
        // Read last, with the TSCs: [`save_clock`].
        clock: kvm_clock_data::default(),
    })
}

/// Restores the VM's PIT, PICs and IOAPIC (after the irqchip and PIT
/// were created, before any device can raise an interrupt).
pub fn restore_vm(vm_fd: &VmFd, state: &VmState) -> Result<()> {
    vm_fd
        .set_pit2(&state.pit)
        .context("restoring the VM: KVM_SET_PIT2")?;
    for (chip, name) in [
        (&state.pic_master, "PIC master"),
        (&state.pic_slave, "PIC slave"),
        (&state.ioapic, "IOAPIC"),
    ] {
        vm_fd
            .set_irqchip(chip)
            .with_context(|| format!("restoring the VM: KVM_SET_IRQCHIP ({name})"))?;
    }
    Ok(())
}

/// Reads one MSR of a vCPU.
fn read_msr(fd: &VcpuFd, index: u32) -> Result<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .context("an MSR list")?;
    match fd.get_msrs(&mut msrs).context("KVM_GET_MSRS")? {
        1 => Ok(msrs.as_slice()[0].data),
        _ => bail!("KVM cannot read MSR {index:#x}"),
    }
}

/// Writes one MSR of a vCPU.
fn write_msr(fd: &VcpuFd, index: u32, data: u64) -> Result<()> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .context("an MSR list")?;
    match fd.set_msrs(&msrs).context("KVM_SET_MSRS")? {
        1 => Ok(()),
        _ => bail!("KVM refused MSR {index:#x}"),
    }
}

/// Saves the kvm-clock together with every vCPU's TSC: the TSCs are read
/// again right before the clock (the rest of a vCPU's state takes long
/// enough to read for the two to drift apart: the guest's clocksource
/// watchdog would then find the TSC skewed from kvm-clock after a restore
/// and mark it unstable).
pub fn save_clock(vm_fd: &VmFd, fds: &[VcpuFd], vcpus: &mut [VcpuState]) -> Result<kvm_clock_data> {
    for (i, (fd, state)) in fds.iter().zip(vcpus.iter_mut()).enumerate() {
        let tsc = read_msr(fd, MSR_IA32_TSC).with_context(|| format!("vCPU {i}'s TSC"))?;
        state.msrs.retain(|(index, _)| *index != MSR_IA32_TSC);
        state.msrs.push((MSR_IA32_TSC, tsc));
    }
    vm_fd.get_clock().context("KVM_GET_CLOCK")
}

/// Restores every vCPU's TSC, then its deadline (the timer armed against
/// that TSC), then the kvm-clock right after (see [`save_clock`]): the two
/// go on from where the template stopped, together. The guest's monotonic
/// time does not jump; the wall clock is set by the agent.
pub fn restore_clock(vm_fd: &VmFd, fds: &[VcpuFd], state: &Snapshot) -> Result<()> {
    let saved = |vcpu: &VcpuState, index: u32| {
        vcpu.msrs
            .iter()
            .find(|(i, _)| *i == index)
            .map(|&(_, value)| value)
    };
    for (i, (fd, vcpu)) in fds.iter().zip(&state.vcpu).enumerate() {
        if let Some(tsc) = saved(vcpu, MSR_IA32_TSC) {
            write_msr(fd, MSR_IA32_TSC, tsc)
                .with_context(|| format!("restoring vCPU {i}'s TSC"))?;
        }
        if let Some(deadline) = saved(vcpu, MSR_IA32_TSC_DEADLINE).filter(|d| *d != 0) {
            write_msr(fd, MSR_IA32_TSC_DEADLINE, deadline)
                .with_context(|| format!("restoring vCPU {i}'s TSC deadline"))?;
        }
    }
    let mut clock = state.vm.clock;
    // Only KVM_CLOCK_REALTIME may be given back, and it is not wanted.
    clock.flags = 0;
    vm_fd
        .set_clock(&clock)
        .context("restoring the VM: KVM_SET_CLOCK")
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn the_tsc_and_its_deadline_are_left_to_the_clock() {
        let vcpu = msrs_but_the_clock(&[
            (MSR_IA32_TSC_DEADLINE, 5),
            (0xc000_0080, 1),
            (MSR_IA32_TSC, 9),
        ]);
        let idx: Vec<u32> = vcpu.iter().map(|e| e.index).collect();
        assert_eq!(idx, [0xc000_0080]);
        assert_eq!(vcpu[0].data, 1);
    }

    fn sample() -> Snapshot {
        Snapshot {
            format: FORMAT,
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            vcpus: 1,
            memory_mib: 128,
            vsock_cid: 3,
            cmdline: "panic=1".into(),
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpu: vec![VcpuState {
                cpuid: vec![kvm_cpuid_entry2 {
                    function: 1,
                    eax: 0x1234,
                    ..Default::default()
                }],
                msrs: vec![(MSR_IA32_TSC, 42)],
                regs: kvm_regs {
                    rip: 0xffff_ffff_8100_0000,
                    ..Default::default()
                },
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                debugregs: Default::default(),
                lapic: Default::default(),
                mp_state: Default::default(),
                events: Default::default(),
                tsc_khz: Some(2_000_000),
            }],
            serial: Some(SerialState::default()),
            i8042: I8042State::default(),
            devices: Vec::new(),
        }
    }

    #[test]
    fn a_snapshot_survives_its_file_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let kvm_free = TemplateFiles {
            dir: dir.path().to_path_buf(),
            memory: create_new(dir.path(), MEMORY_FILE).unwrap(),
            state: create_new(dir.path(), STATE_PARTIAL).unwrap(),
            msr_index: Vec::new(),
            renamed_by_supervisor: false,
        };
        kvm_free.memory.set_len(128 << 20).unwrap();
        let mut files = kvm_free;
        assert!(!dir.path().join(STATE_FILE).exists());
        files.write_state(&sample()).unwrap();
        assert!(!dir.path().join(STATE_PARTIAL).exists());
        // Never overwritten: a second template in the same place fails.
        assert!(create_new(dir.path(), STATE_FILE).is_err());

        let back = RestoreFiles::open(dir.path()).unwrap();
        assert_eq!(back.snapshot.vcpu[0].regs.rip, 0xffff_ffff_8100_0000);
        assert_eq!(back.snapshot.vcpu[0].cpuid[0].eax, 0x1234);
        assert_eq!(back.snapshot.vcpu[0].msrs, vec![(MSR_IA32_TSC, 42)]);

        // Another version, a short memory file, garbage: refused, named.
        let mut other = sample();
        other.vmm_version = "0.0.0-other".into();
        let err = other.check().unwrap_err().to_string();
        assert!(err.contains("0.0.0-other"), "{err}");
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(MEMORY_FILE))
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let err = format!("{:#}", RestoreFiles::open(dir.path()).unwrap_err());
        assert!(err.contains("128 MiB"), "{err}");
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let err = format!("{:#}", RestoreFiles::open(dir.path()).unwrap_err());
        assert!(err.contains("is not a snapshot state"), "{err}");
    }

    #[test]
    fn a_clone_writes_its_own_copy_of_guest_ram() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MEMORY_FILE);
        let file = create_new(dir.path(), MEMORY_FILE).unwrap();
        file.set_len(64 << 20).unwrap();
        let template = map_memory(&file, 64 << 20, false).unwrap();
        use vm_memory::Bytes;
        template
            .write_obj(0xabcd_u64, GuestAddress(0x1000))
            .unwrap();
        let ro = File::open(&path).unwrap();
        let clone = map_memory(&ro, 64 << 20, true).unwrap();
        assert_eq!(clone.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0xabcd);
        clone.write_obj(0x1111_u64, GuestAddress(0x1000)).unwrap();
        // The clone's write stays the clone's.
        assert_eq!(
            template.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0xabcd
        );
        assert_eq!(clone.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0x1111);
    }

    fn blocks(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks()
    }

    #[test]
    fn a_clone_touching_the_templates_holes_does_not_fill_its_file() {
        use vm_memory::Bytes;
        let dir = tempfile::tempdir().unwrap();
        // Shared memory, as a template's file in the run root's tmpfs.
        // SAFETY: memfd_create with a NUL-terminated name; the descriptor
        // it returns is owned by `file` alone.
        let file = unsafe {
            let fd = libc::memfd_create(c"template-memory".as_ptr(), 0);
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            <File as std::os::fd::FromRawFd>::from_raw_fd(fd)
        };
        let path = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&file)
        ));
        file.set_len(64 << 20).unwrap();
        let template = map_memory(&file, 64 << 20, false).unwrap();
        template
            .write_obj(0xabcd_u64, GuestAddress(0x1000))
            .unwrap();
        template
            .write_obj(0x5678_u64, GuestAddress(32 << 20))
            .unwrap();
        drop(template);
        let holes = file_holes(&file, 64 << 20).unwrap();
        assert!(holes.len() >= 2, "{holes:?}");
        assert!(holes
            .iter()
            .all(|&(s, e)| s % 4096 == 0 && e % 4096 == 0 && e > s));
        assert!(!holes
            .iter()
            .any(|&(s, e)| (s..e).contains(&0x1000) || (s..e).contains(&(32 << 20))));
        let before = blocks(&path);
        let ro = File::open(&path).unwrap();
        let clone = map_memory(&ro, 64 << 20, true).unwrap();
        assert_eq!(clone.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0xabcd);
        assert_eq!(
            clone.read_obj::<u64>(GuestAddress(32 << 20)).unwrap(),
            0x5678
        );
        // The clone reads and writes 8 MiB of the template's holes: zeroes,
        // its own, and the file stays as it was.
        for page in (8u64 << 20..16 << 20).step_by(4096) {
            assert_eq!(clone.read_obj::<u64>(GuestAddress(page)).unwrap(), 0);
            clone.write_obj(page, GuestAddress(page)).unwrap();
        }
        assert_eq!(
            clone.read_obj::<u64>(GuestAddress(9 << 20)).unwrap(),
            9 << 20
        );
        assert_eq!(
            blocks(&path),
            before,
            "the clone filled the template's file"
        );
        // A file without holes, or all hole, maps too.
        let empty = create_new(dir.path(), "empty").unwrap();
        empty.set_len(8 << 20).unwrap();
        assert_eq!(file_holes(&empty, 8 << 20).unwrap(), vec![(0, 8 << 20)]);
        let mut full = create_new(dir.path(), "full").unwrap();
        full.write_all(&vec![1u8; 1 << 20]).unwrap();
        assert_eq!(file_holes(&full, 1 << 20).unwrap(), vec![]);
    }
}
