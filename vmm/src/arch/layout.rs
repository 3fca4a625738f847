//! The guest physical memory map.
//!
//! ```text
//! 0x0000_0500  GDT (PVH entry: flat 32-bit segments)
//! 0x0000_6000  PVH hvm_start_info, then the module list (the initrd)
//! 0x0000_7000  PVH memory map (E820-style entries) / bzImage zero page
//! 0x0000_9000  bzImage identity page tables (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line (up to 4 KiB)
//! 0x0009_fc00  EBDA: the MP table (reserved in the memory map)
//! 0x0010_0000  kernel (at the addresses of its ELF segments) ...
//!   ...        initrd, at the top of low RAM
//! 0xd000_0000  MMIO gap to 4 GiB: virtio-mmio windows, boot timer at
//!              0xd100_0000,
//!              IOAPIC (0xfec0_0000), LAPIC (0xfee0_0000)
//! 0x1_0000_0000 RAM above the gap when memory > 3.25 GiB
//! ```

use vm_memory::GuestAddress;

pub const GDT_ADDR: u64 = 0x500;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6800;
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Linux's x86 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX: usize = 2048;
pub const EBDA_START: u64 = 0x9_fc00;
pub const EBDA_END: u64 = 0xa_0000;
pub const MPTABLE_ADDR: u64 = EBDA_START;
pub const HIMEM_START: u64 = 0x10_0000;

pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, 4 KiB apart, from here.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The boot timer's one-byte register (Firecracker's convention: the
/// guest writes 123 when init is ready).
pub const BOOT_TIMER_ADDR: u64 = 0xd100_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// Legacy IRQs: COM1 and the i8042 keyboard.
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_IRQ: u32 = 1;
/// virtio-mmio devices get IRQs from here (the IOAPIC has 24 pins).
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const IRQ_MAX: u32 = 23;

/// E820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The guest RAM regions for `size` bytes of memory: below the MMIO gap,
/// then above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// One entry of the memory map handed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest's memory map: low RAM below the EBDA, the EBDA reserved (it
/// holds the MP table), RAM from 1 MiB, and RAM above the gap.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: EBDA_END - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in ram_regions(size) {
        let (start, len) = if start.0 == 0 {
            (HIMEM_START, len.saturating_sub(HIMEM_START))
        } else {
            (start.0, len)
        };
        if len > 0 {
            map.push(E820Entry {
                addr: start,
                size: len,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// End (exclusive) of the RAM below the MMIO gap.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(256 * MIB), vec![(GuestAddress(0), 256 * MIB)]);
        assert_eq!(low_ram_end(256 * MIB), 256 * MIB);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_regions(4096 * MIB);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4096 * MIB);
        assert_eq!(low_ram_end(4096 * MIB), MMIO_GAP_START);
    }

    #[test]
    fn e820_reserves_the_ebda_and_covers_ram() {
        let map = e820_map(128 * MIB);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: EBDA_START,
                    size: EBDA_END - EBDA_START,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: 128 * MIB - HIMEM_START,
                    kind: E820_RAM
                },
            ]
        );
        let big = e820_map(5120 * MIB);
        assert_eq!(big.len(), 4);
        assert_eq!(big[3].addr, MMIO_GAP_END);
        let ram: u64 = big
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 5120 * MIB - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (GDT_ADDR, 0x40),
            (PVH_INFO_ADDR, 0x800),
            (PVH_MEMMAP_ADDR, 0x1000),
            (PML4_ADDR, 0x3000),
            (CMDLINE_ADDR, CMDLINE_MAX as u64),
            (MPTABLE_ADDR, EBDA_END - EBDA_START),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
        let last_virtio =
            VIRTIO_MMIO_BASE + u64::from(IRQ_MAX - VIRTIO_IRQ_BASE + 1) * VIRTIO_MMIO_SIZE;
        assert!(BOOT_TIMER_ADDR >= last_virtio && BOOT_TIMER_ADDR < IOAPIC_ADDR);
    }
}
