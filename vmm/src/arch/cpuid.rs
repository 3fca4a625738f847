//! Per-vCPU CPUID, from KVM's supported set.
//!
//! KVM_GET_SUPPORTED_CPUID describes the host CPU as KVM can virtualise it;
//! each vCPU needs it adjusted: its own APIC id, a topology of one socket
//! with one thread per core and `vcpus` cores, the hypervisor bit, and the
//! vendor-specific topology leaves (Intel 0x4/0xB/0x1F, AMD 0x8000_0008/
//! 0x8000_001E). KVM's own leaves (0x4000_0000...) come from KVM as they are.

use kvm_bindings::kvm_cpuid_entry2;

/// CPU vendor, from leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(leaf0) = entries.iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    id[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
const EXT1_ECX_TOPOEXT: u32 = 1 << 22;

/// Bits needed to number `n` ids (0 for 1).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts `entries` (KVM's supported CPUID) for vCPU `index` of `count`.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8, tsc_deadline: bool) {
    let vendor = vendor(entries);
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    let core_bits = id_bits(count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors
                // per package, [15:8] CLFLUSH line size in 8-byte units.
                e.ebx = (apic_id << 24) | ((1u32 << core_bits).max(1) << 16) | (8 << 8);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 if vendor == Vendor::Intel => {
                // Deterministic cache parameters: [31:26] cores per
                // package - 1; [25:14] threads sharing the cache - 1 (the
                // LLC is shared by all cores, the others are per core).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | ((sharing & 0xfff) << 14);
            }
            0xb | 0x1f if vendor == Vendor::Intel => {
                // Extended topology: level 0 = SMT (1 thread per core),
                // level 1 = core (count cores); EDX = x2APIC id.
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
                e.edx = apic_id;
            }
            0x8000_0001 if vendor == Vendor::Amd => {
                if count > 1 {
                    e.ecx |= EXT1_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT1_ECX_CMP_LEGACY;
                }
                e.ecx &= !EXT1_ECX_TOPOEXT;
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                // ECX: [15:12] APIC id size, [7:0] cores - 1.
                e.ecx = (core_bits << 12) | (count - 1);
            }
            0x8000_001e if vendor == Vendor::Amd => {
                // Extended APIC id; one thread per compute unit.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn leaf0(vendor: &[u8; 12]) -> kvm_cpuid_entry2 {
        let w = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        entry(0, 0, [0xd, w(0), w(8), w(4)])
    }

    #[test]
    fn detects_vendors() {
        assert_eq!(vendor(&[leaf0(b"GenuineIntel")]), Vendor::Intel);
        assert_eq!(vendor(&[leaf0(b"AuthenticAMD")]), Vendor::Amd);
        assert_eq!(vendor(&[leaf0(b"SomethingNew")]), Vendor::Other);
        assert_eq!(vendor(&[]), Vendor::Other);
    }

    #[test]
    fn intel_topology_per_vcpu() {
        let mut e = vec![
            leaf0(b"GenuineIntel"),
            entry(1, 0, [0, 0xff00_0000, 0, 0]),
            entry(4, 0, [(1 << 5) | 0x21, 0, 0, 0]),
            entry(4, 3, [(3 << 5) | 0x63, 0, 0, 0]),
            entry(0xb, 0, [9, 9, 9, 9]),
            entry(0xb, 1, [9, 9, 9, 9]),
            entry(0xb, 2, [9, 9, 9, 9]),
        ];
        normalize(&mut e, 2, 4, true);
        assert_eq!(e[1].ebx >> 24, 2, "APIC id");
        assert_eq!((e[1].ebx >> 16) & 0xff, 4, "logical processors");
        assert_ne!(e[1].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e[1].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(e[1].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(e[2].eax >> 26, 3, "cores per package - 1");
        assert_eq!((e[2].eax >> 14) & 0xfff, 0, "L1 not shared");
        assert_eq!((e[3].eax >> 14) & 0xfff, 3, "L3 shared by all");
        assert_eq!((e[4].eax, e[4].ebx, e[4].ecx, e[4].edx), (0, 1, 0x100, 2));
        assert_eq!((e[5].eax, e[5].ebx, e[5].ecx, e[5].edx), (2, 4, 0x201, 2));
        assert_eq!((e[6].eax, e[6].ebx, e[6].ecx, e[6].edx), (0, 0, 2, 2));
    }

    #[test]
    fn amd_topology_per_vcpu() {
        let mut e = vec![
            leaf0(b"AuthenticAMD"),
            entry(1, 0, [0, 0, 0, LEAF1_EDX_HTT]),
            entry(0x8000_0001, 0, [0, 0, EXT1_ECX_TOPOEXT, 0]),
            entry(0x8000_0008, 0, [0, 0, 0xffff, 0]),
            entry(0x8000_001e, 0, [9, 9, 9, 9]),
        ];
        normalize(&mut e, 1, 2, false);
        assert_eq!(e[1].ebx >> 24, 1);
        assert_ne!(e[1].edx & LEAF1_EDX_HTT, 0);
        assert_ne!(e[2].ecx & EXT1_ECX_CMP_LEGACY, 0);
        assert_eq!(e[2].ecx & EXT1_ECX_TOPOEXT, 0);
        assert_eq!(e[3].ecx, (1 << 12) | 1);
        assert_eq!((e[4].eax, e[4].ebx), (1, 1));

        let mut single = vec![
            leaf0(b"AuthenticAMD"),
            entry(1, 0, [0, 0, 0, LEAF1_EDX_HTT]),
        ];
        normalize(&mut single, 0, 1, false);
        assert_eq!(single[1].edx & LEAF1_EDX_HTT, 0);
        assert_eq!((single[1].ebx >> 16) & 0xff, 1);
    }

    #[test]
    fn id_bits_counts() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
