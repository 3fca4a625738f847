//! Guest memory and what goes in it before the first instruction: the
//! kernel (ELF vmlinux with a PVH entry, or bzImage), the initrd, the
//! command line, the MP table and the boot parameters (PVH start info or
//! the Linux zero page).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, KernelLoaderResult};
use thiserror::Error;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::arch::layout::{self, E820Entry};
use crate::arch::mptable;
use crate::arch::regs::BootEntry;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("creating guest memory ({mib} MiB): {source}")]
    Memory { mib: u64, source: std::io::Error },
    #[error("mapping guest memory: {0}")]
    Mmap(String),
    #[error("opening kernel {path}: {source}")]
    KernelOpen {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage ({elf}; {bzimage})")]
    KernelFormat {
        path: String,
        elf: String,
        bzimage: String,
    },
    #[error(
        "kernel {path} has no PVH entry point (build it with CONFIG_PVH=y) and is not a bzImage"
    )]
    NoPvhEntry { path: String },
    #[error("reading initrd {path}: {source}")]
    Initrd {
        path: String,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel (ends at {kernel_end:#x}); give the VM more memory")]
    InitrdTooBig {
        path: String,
        size: u64,
        kernel_end: u64,
    },
    #[error("writing {0} to guest memory: {1}")]
    Write(&'static str, String),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("MP table: {0}")]
    MpTable(#[from] mptable::MpTableError),
}

/// Guest RAM backed by a memfd and mapped shared, so vhost-user back ends
/// (virtiofsd) can map the same pages later.
pub fn create_memory(size: u64) -> Result<GuestMemoryMmap, BootError> {
    let mib = size >> 20;
    let fd =
        nix::sys::memfd::memfd_create(c"isola-guest-ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(|e| BootError::Memory {
            mib,
            source: e.into(),
        })?;
    let file = File::from(fd);
    file.set_len(size)
        .map_err(|source| BootError::Memory { mib, source })?;
    let mut ranges = Vec::new();
    let mut offset = 0;
    for (addr, len) in layout::ram_regions(size) {
        let f = file
            .try_clone()
            .map_err(|source| BootError::Memory { mib, source })?;
        ranges.push((addr, len as usize, Some(FileOffset::new(f, offset))));
        offset += len;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|e| BootError::Mmap(e.to_string()))?;
    advise_hugepages(&mem);
    Ok(mem)
}

/// Asks for transparent huge pages on guest RAM: the guest's first touches
/// then fault 2 MiB at a time instead of 4 KiB, which is most of the
/// difference in early-boot speed between shared (memfd) and anonymous
/// guest RAM. For memfd (shmem) mappings the host must allow it
/// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` set to `advise`,
/// `within_size` or `always`); otherwise this is a no-op and the VMM says
/// so once.
fn advise_hugepages(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        let Ok(host) = mem.get_host_address(region.start_addr()) else {
            continue;
        };
        // SAFETY: the range is exactly one live mapping owned by `mem`;
        // MADV_HUGEPAGE changes only how it is backed, not its contents.
        let rc = unsafe {
            libc::madvise(
                host.cast::<libc::c_void>(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if rc != 0 {
            tracing::debug!(err = %std::io::Error::last_os_error(), "MADV_HUGEPAGE on guest RAM");
        }
    }
    let setting = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    if setting.contains("[never]") || setting.contains("[deny]") {
        tracing::info!(
            "host shmem_enabled is {}: guest RAM uses 4 KiB pages, so boots are slower; \
             set /sys/kernel/mm/transparent_hugepage/shmem_enabled to advise",
            setting.trim()
        );
    }
}

/// A loaded kernel and how to enter it.
#[derive(Debug)]
pub struct LoadedKernel {
    pub result: KernelLoaderResult,
    pub pvh_entry: Option<u64>,
}

/// Loads an ELF vmlinux (which must have a PVH entry) or a bzImage.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = open_kernel(path)?;
    load_kernel_file(mem, &mut file, path)
}

/// Opens the kernel image (before the jail: see [`load_kernel_file`]).
pub fn open_kernel(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::KernelOpen {
        path: path.display().to_string(),
        source,
    })
}

/// Loads the kernel from an open `file`; `path` names it in errors.
pub fn load_kernel_file(
    mem: &GuestMemoryMmap,
    file: &mut File,
    path: &Path,
) -> Result<LoadedKernel, BootError> {
    let display = path.display().to_string();
    let himem = Some(GuestAddress(layout::HIMEM_START));
    if let Some(span) = elf_load_span(file) {
        populate(mem, span.0, span.1);
    }
    match Elf::load(mem, None, file, himem) {
        Ok(result) => match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
                result,
                pvh_entry: Some(entry.0),
            }),
            _ => Err(BootError::NoPvhEntry { path: display }),
        },
        Err(elf_err) => match BzImage::load(mem, None, file, himem) {
            Ok(result) => Ok(LoadedKernel {
                result,
                pvh_entry: None,
            }),
            Err(bz_err) => Err(BootError::KernelFormat {
                path: display,
                elf: elf_err.to_string(),
                bzimage: bz_err.to_string(),
            }),
        },
    }
}

/// The physical range an ELF kernel's loadable segments cover, read from
/// its program headers (None for anything else: the loader then reports).
fn elf_load_span(file: &mut File) -> Option<(u64, u64)> {
    use std::io::{Seek, SeekFrom};
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_exact(&mut ehdr).ok()?;
    if &ehdr[0..4] != b"\x7fELF" || ehdr[4] != 2 {
        return None;
    }
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().ok()?);
    let phentsize = u64::from(u16::from_le_bytes(ehdr[54..56].try_into().ok()?));
    let phnum = u16::from_le_bytes(ehdr[56..58].try_into().ok()?);
    if phentsize < 56 || phnum > 64 {
        return None;
    }
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        file.seek(SeekFrom::Start(phoff.checked_add(i * phentsize)?))
            .ok()?;
        file.read_exact(&mut ph).ok()?;
        if u32::from_le_bytes(ph[0..4].try_into().ok()?) != 1 {
            continue; // not PT_LOAD
        }
        let paddr = u64::from_le_bytes(ph[24..32].try_into().ok()?);
        let memsz = u64::from_le_bytes(ph[40..48].try_into().ok()?);
        lo = lo.min(paddr);
        hi = hi.max(paddr.checked_add(memsz)?);
    }
    file.seek(SeekFrom::Start(0)).ok()?;
    (lo < hi && hi - lo <= (1 << 30)).then_some((lo, hi - lo))
}

/// Loads the initrd page-aligned at the top of low RAM; returns its
/// address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_size: u64,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let mut file = open_initrd(path)?;
    load_initrd_file(mem, &mut file, path, mem_size, kernel_end)
}

/// Opens the initrd (before the jail: see [`load_initrd_file`]).
pub fn open_initrd(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Initrd {
        path: path.display().to_string(),
        source,
    })
}

/// Loads the initrd from an open `file`; `path` names it in errors.
pub fn load_initrd_file(
    mem: &GuestMemoryMmap,
    file: &mut File,
    path: &Path,
    mem_size: u64,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let display = path.display().to_string();
    let err = |source| BootError::Initrd {
        path: display.clone(),
        source,
    };
    let size = file.metadata().map_err(err)?.len();
    let top = layout::low_ram_end(mem_size);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitrdTooBig {
            path: display.clone(),
            size,
            kernel_end,
        })?;
    populate(mem, addr, size);
    // Straight from the file into guest memory: no copy in between.
    mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
        .map_err(|e| BootError::Write("the initrd", format!("{display}: {e}")))?;
    Ok((addr, size))
}

/// Allocates the guest pages of `[addr, addr + len)` in one call
/// (MADV_POPULATE_WRITE) instead of one page fault per page as they are
/// first written; a hint only, ignored where the kernel lacks it.
pub fn populate(mem: &GuestMemoryMmap, addr: u64, len: u64) {
    // The range must stay inside one region's mapping.
    let Some(region) = mem.find_region(GuestAddress(addr)) else {
        return;
    };
    let region_end = region.start_addr().0 + region.len();
    if addr.checked_add(len).map_or(true, |end| end > region_end) {
        return;
    }
    let Ok(host) = mem.get_host_address(GuestAddress(addr)) else {
        return;
    };
    let start = (host as usize) & !0xfff;
    let end = (host as usize).saturating_add(len as usize);
    // SAFETY: the range lies within a live mapping owned by `mem`;
    // MADV_POPULATE_WRITE only faults pages in, it does not change them.
    let rc = unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            end - start,
            libc::MADV_POPULATE_WRITE,
        )
    };
    if rc != 0 {
        tracing::debug!(err = %std::io::Error::last_os_error(), "MADV_POPULATE_WRITE");
    }
}

/// Writes the NUL-terminated command line.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    let mut line = linux_loader::cmdline::Cmdline::new(layout::CMDLINE_MAX)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    line.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &line)
        .map_err(|e| BootError::Cmdline(e.to_string()))
}

pub fn write_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), BootError> {
    let table = mptable::build(layout::MPTABLE_ADDR, vcpus)?;
    mem.write_slice(&table, GuestAddress(layout::MPTABLE_ADDR))
        .map_err(|e| BootError::Write("the MP table", e.to_string()))
}

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Writes the PVH start info (command line, memory map, initrd as the
/// first module) and returns the entry.
pub fn configure_pvh(
    mem: &GuestMemoryMmap,
    entry: u64,
    e820: &[E820Entry],
    initrd: Option<(u64, u64)>,
) -> Result<BootEntry, BootError> {
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_ADDR,
        memmap_paddr: layout::PVH_MEMMAP_ADDR,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut modules = Vec::new();
    if let Some((addr, size)) = initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = layout::PVH_MODLIST_ADDR;
        modules.push(hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        });
    }
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(layout::PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| BootError::Write("the PVH start info", e.to_string()))?;
    Ok(BootEntry::Pvh {
        entry,
        start_info: layout::PVH_INFO_ADDR,
    })
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const E820_MAX: usize = 128;

/// Writes the Linux zero page for a bzImage and returns the 64-bit entry.
pub fn configure_linux64(
    mem: &GuestMemoryMmap,
    kernel: &KernelLoaderResult,
    cmdline_len: usize,
    e820: &[E820Entry],
    initrd: Option<(u64, u64)>,
) -> Result<BootEntry, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if e820.len() > E820_MAX {
        return Err(BootError::Write(
            "the zero page",
            "too many E820 entries".into(),
        ));
    }
    for (i, e) in e820.iter().enumerate() {
        params.e820_table[i].addr = e.addr;
        params.e820_table[i].size = e.size;
        params.e820_table[i].r#type = e.kind;
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_ADDR))
        .map_err(|e| BootError::Write("the zero page", e.to_string()))?;
    // The 64-bit entry is 0x200 bytes into the protected-mode kernel.
    Ok(BootEntry::Linux64 {
        entry: kernel.kernel_load.0 + 0x200,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn memory_is_shared_and_sized() {
        let mem = create_memory(64 << 20).unwrap();
        mem.write_obj(0xabcdu16, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x1000)).unwrap(), 0xabcd);
        assert!(mem.read_obj::<u8>(GuestAddress(64 << 20)).is_err());
    }

    #[test]
    fn initrd_goes_to_the_top_page_aligned() {
        let mem = create_memory(64 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("isola-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("initrd");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&[7u8; 5000])
            .unwrap();
        let (addr, size) = load_initrd(&mem, &path, 64 << 20, 0x200_0000).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(addr + 4999)).unwrap(), 7);
        let err = load_initrd(&mem, &path, 64 << 20, 64 << 20).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn not_a_kernel_is_a_clear_error() {
        let mem = create_memory(64 << 20).unwrap();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let err = load_kernel(&mem, &path).unwrap_err().to_string();
        assert!(
            err.contains("neither an ELF vmlinux nor a bzImage"),
            "{err}"
        );
        assert!(err.contains("Cargo.toml"), "{err}");
    }

    #[test]
    fn pvh_start_info_lists_memory_and_initrd() {
        let mem = create_memory(64 << 20).unwrap();
        let e820 = layout::e820_map(64 << 20);
        let entry = configure_pvh(&mem, 0x100_0000, &e820, Some((0x300_0000, 4096))).unwrap();
        assert_eq!(
            entry,
            BootEntry::Pvh {
                entry: 0x100_0000,
                start_info: layout::PVH_INFO_ADDR
            }
        );
        let si: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO_ADDR)).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(si.memmap_entries as usize, e820.len());
        assert_eq!(si.nr_modules, 1);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x300_0000, 4096));
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(
                layout::PVH_MEMMAP_ADDR + 24 * (e820.len() as u64 - 1),
            ))
            .unwrap();
        assert_eq!(last.addr, layout::HIMEM_START);
    }

    #[test]
    fn cmdline_is_nul_terminated_and_bounded() {
        let mem = create_memory(64 << 20).unwrap();
        write_cmdline(&mem, "console=ttyS0 panic=1").unwrap();
        let mut buf = [0u8; 22];
        mem.read_slice(&mut buf, GuestAddress(layout::CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0 panic=1\0");
        assert!(write_cmdline(&mem, &"x".repeat(layout::CMDLINE_MAX)).is_err());
    }
}
