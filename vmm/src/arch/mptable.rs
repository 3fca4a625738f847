//! The Intel MultiProcessor Specification 1.4 table: how a guest without
//! ACPI finds its vCPUs, its IOAPIC and how ISA IRQs are wired.

use thiserror::Error;

use super::layout::{IOAPIC_ADDR, IRQ_MAX, LAPIC_ADDR};

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 signature and the FPU + APIC feature bits, as firmware writes.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINTR: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Most vCPUs the table describes (APIC ids are 8 bits, one is the IOAPIC).
pub const MAX_VCPUS: u8 = 254;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit an MP table (1 to {MAX_VCPUS})")]
    VcpuCount(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer followed by the configuration table, to
/// be written at guest address `base` (in the EBDA).
pub fn build(base: u64, vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        entries.extend_from_slice(&[
            ENTRY_PROCESSOR,
            id,
            APIC_VERSION,
            CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 },
        ]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        // type, irq type, flags (conforming polarity/trigger), source bus,
        // source irq, destination IOAPIC, destination pin.
        entries.extend_from_slice(&[ENTRY_IOINTR, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 is ExtINT (the PIC), LINT1 NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    let length = (44 + entries.len()) as u16;
    header.extend_from_slice(&length.to_le_bytes());
    header.push(MPC_SPEC_REV);
    header.push(0); // checksum, below
    header.extend_from_slice(b"ISOLA   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0); // reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(MPC_SPEC_REV);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0u8; 5]); // feature bytes: table present, no default config
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        let base = 0x9fc00;
        let t = build(base, 2).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let table_addr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(table_addr, base + 16);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        // 2 CPUs, bus, IOAPIC, 24 IRQs, 2 local interrupts.
        assert_eq!(count, 2 + 1 + 1 + 24 + 2);
        // Fits in the 1 KiB EBDA.
        assert!(t.len() <= 1024);
    }

    #[test]
    fn bsp_flag_only_on_cpu_zero() {
        let t = build(0x9fc00, 3).unwrap();
        let entries = &t[16 + 44..];
        for i in 0..3 {
            let e = &entries[i * 20..i * 20 + 20];
            assert_eq!(e[0], ENTRY_PROCESSOR);
            assert_eq!(e[1], i as u8);
            assert_eq!(e[3] & CPU_BSP != 0, i == 0);
        }
    }

    #[test]
    fn vcpu_count_is_bounded() {
        assert_eq!(build(0, 0), Err(MpTableError::VcpuCount(0)));
        assert_eq!(build(0, 255), Err(MpTableError::VcpuCount(255)));
        // The VMM's vCPU limit (config::MAX_VCPUS) keeps it in the 1 KiB EBDA.
        assert!(build(0, 32).unwrap().len() <= 1024);
    }
}
