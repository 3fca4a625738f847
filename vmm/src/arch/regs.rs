//! Initial vCPU state: segments and registers for the PVH entry (32-bit
//! protected mode, paging off) or the 64-bit bzImage entry, the FPU, the
//! boot MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{BOOT_STACK_ADDR, GDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};

#[derive(Debug, Error)]
pub enum RegsError {
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("writing {0} to guest memory: {1}")]
    Memory(&'static str, vm_memory::GuestMemoryError),
    #[error("KVM set {set} of {total} boot MSRs")]
    Msrs { set: usize, total: usize },
}

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, EBX = start info address.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode, identity-mapped first GiB,
    /// RSI = zero page.
    Linux64 { entry: u64 },
}

/// A GDT entry from flags, base and limit (Intel SDM 3.4.5).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The segment KVM wants for a GDT entry.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let field = |shift: u32, bits: u32| ((entry >> shift) & ((1 << bits) - 1)) as u8;
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = field(55, 1);
    kvm_segment {
        base,
        limit: if g == 1 {
            ((limit as u32) << 12) | 0xfff
        } else {
            limit as u32
        },
        selector: index * 8,
        type_: field(40, 4),
        present: field(47, 1),
        dpl: field(45, 2),
        db: field(54, 1),
        s: field(44, 1),
        l: field(53, 1),
        g,
        avl: field(52, 1),
        unusable: u8::from(field(47, 1) == 0),
        padding: 0,
    }
}

/// The boot GDT: null, code, data, TSS.
fn gdt(long_mode: bool) -> [u64; 4] {
    let code = if long_mode { 0xa09b } else { 0xc09b };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Writes the GDT (and, for 64-bit entry, identity page tables for the
/// first GiB) and returns the special registers for `entry`.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    mut sregs: kvm_sregs,
    entry: BootEntry,
) -> Result<kvm_sregs, RegsError> {
    let long_mode = matches!(entry, BootEntry::Linux64 { .. });
    let table = gdt(long_mode);
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + (i as u64) * 8))
            .map_err(|e| RegsError::Memory("the GDT", e))?;
    }
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let code = segment(table[1], 1);
    let data = segment(table[2], 2);
    let tss = segment(table[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    if long_mode {
        // PML4[0] -> PDPT[0] -> PD with 512 2 MiB pages: the first GiB.
        mem.write_obj(PDPT_ADDR | 0x03, GuestAddress(PML4_ADDR))
            .map_err(|e| RegsError::Memory("the PML4", e))?;
        mem.write_obj(PD_ADDR | 0x03, GuestAddress(PDPT_ADDR))
            .map_err(|e| RegsError::Memory("the PDPT", e))?;
        for i in 0..512u64 {
            mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8))
                .map_err(|e| RegsError::Memory("the page directory", e))?;
        }
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
        sregs.efer |= EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    Ok(sregs)
}

/// General registers at the entry point.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    match entry {
        BootEntry::Pvh { entry, start_info } => kvm_regs {
            rip: entry,
            rbx: start_info,
            rflags: 0x2,
            ..Default::default()
        },
        BootEntry::Linux64 { entry } => kvm_regs {
            rip: entry,
            rsi: ZERO_PAGE_ADDR,
            rsp: BOOT_STACK_ADDR,
            rbp: BOOT_STACK_ADDR,
            rflags: 0x2,
            ..Default::default()
        },
    }
}

/// FPU state after reset: x87 control word and MXCSR defaults.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSRs every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

pub fn set_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        total: entries.len(),
    })?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Kvm("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            total: entries.len(),
        });
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 = ExtINT (the PIC's output), LINT1 = NMI, as firmware leaves them.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("KVM_GET_LAPIC", e))?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let value = set_delivery_mode(u32::from_le_bytes(raw), mode);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_32bit_segments_for_pvh() {
        let g = gdt(false);
        assert_eq!(g[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(g[2], 0x00cf_9300_0000_ffff);
        let cs = segment(g[1], 1);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 8));
        assert_eq!(
            (cs.type_, cs.db, cs.l, cs.s, cs.present, cs.g),
            (0xb, 1, 0, 1, 1, 1)
        );
        let ds = segment(g[2], 2);
        assert_eq!((ds.type_, ds.selector, ds.unusable), (3, 16, 0));
        let tr = segment(g[3], 3);
        assert_eq!((tr.type_, tr.s), (0xb, 0));
    }

    #[test]
    fn long_mode_code_segment() {
        let cs = segment(gdt(true)[1], 1);
        assert_eq!((cs.l, cs.db), (1, 0));
    }

    #[test]
    fn lint_delivery_modes() {
        assert_eq!(
            set_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(set_delivery_mode(0x0000_0700, APIC_MODE_NMI), 0x0000_0400);
    }

    #[test]
    fn pvh_regs_carry_start_info() {
        let r = boot_regs(BootEntry::Pvh {
            entry: 0x100_0000,
            start_info: 0x6000,
        });
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0000, 0x6000, 2));
    }
}
