//! Turning the host kernel's fault-around off for a clone's guest RAM.
//!
//! When a process first reads a page of a file mapping, Linux maps up to
//! `fault_around_bytes` (64 KiB by default) of the file's cached pages
//! around it in one go (`do_fault_around`). For a clone, whose guest RAM
//! is the template's memory file mapped private, that means every page the
//! guest reads maps its 15 neighbours too: measured in the emulated host,
//! an idle clone mapped 13.5 MiB of the template's pages with fault-around
//! and 5.7 MiB without. Those pages are shared with every other clone, but
//! a lone clone's PSS counts them whole, and they are mapped for nothing.
//!
//! The knob is host-wide (`/sys/kernel/debug/fault_around_bytes`), which is
//! not the runtime's to change. Per mapping, the kernel skips fault-around
//! on a mapping registered with a userfaultfd in write-protect mode
//! (`uffd_disable_fault_around`, Linux 5.19 and later, shmem or anonymous
//! memory: the templates live in the run root's tmpfs). Registering is all
//! this module does: no page is ever write-protected, so the userfaultfd
//! never delivers a fault and nobody reads it. It is created with
//! `UFFD_USER_MODE_ONLY`, so it needs no privilege (a jailed VMM) and could
//! not trap the kernel's own accesses even if a page were protected.
//!
//! The descriptor must stay open for as long as the memory is mapped:
//! closing it unregisters the ranges. Where the kernel refuses (older,
//! without `CONFIG_PTE_MARKER_UFFD_WP`, or a template on a disk
//! filesystem), the clone runs as before, with fault-around.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const UFFDIO: u8 = 0xAA;
/// `UFFD_API`, the only version of the userfaultfd API.
const UFFD_API: u64 = 0xAA;
/// `userfaultfd(2)` flag: handle faults from user mode only.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

#[repr(C)]
#[derive(Debug, Default)]
pub struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
pub struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

nix::ioctl_readwrite!(uffdio_api, UFFDIO, 0x3F, UffdioApi);
nix::ioctl_readwrite!(uffdio_register, UFFDIO, 0x00, UffdioRegister);

/// Registers each `(host address, length)` range with a new userfaultfd in
/// write-protect mode, which turns fault-around off for it, and returns
/// the descriptor, to be kept open as long as the ranges are mapped.
///
/// Each range must be page-aligned memory this process maps (shmem or
/// anonymous); an error names the step and the range the kernel refused.
pub fn disable(ranges: &[(usize, usize)]) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes only flags and returns a new descriptor
    // or -1; nothing else is touched.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("userfaultfd: {e}")));
    }
    // SAFETY: `fd` was just returned by userfaultfd(2) and is owned by
    // nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    // SAFETY: UFFDIO_API reads and writes exactly one `uffdio_api`, which
    // `api` is (same layout, repr(C)), on a userfaultfd we own.
    unsafe { uffdio_api(fd.as_raw_fd(), &mut api) }
        .map_err(|e| io::Error::other(format!("UFFDIO_API: {e}")))?;
    for &(start, len) in ranges {
        let mut reg = UffdioRegister {
            start: start as u64,
            len: len as u64,
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly one
        // `uffdio_register` (a range, a mode, the ioctls it answers), which
        // `reg` is; the kernel checks that the range is mapped. It changes
        // no page: only the mappings' flags.
        unsafe { uffdio_register(fd.as_raw_fd(), &mut reg) }.map_err(|e| {
            io::Error::other(format!(
                "UFFDIO_REGISTER (write-protect) {start:#x}+{len:#x}: {e}"
            ))
        })?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// The resident size in KiB of this process's mapping holding `addr`.
    fn rss_kib(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((start, end)) = first.split_once('-') {
                if let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                ) {
                    inside = (start..end).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(kib) = line.strip_prefix("Rss:") {
                    return kib.trim().trim_end_matches("kB").trim().parse().unwrap();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    /// A private mapping of a 4 MiB tmpfs file whose pages are all cached.
    fn private_mapping(file: &std::fs::File) -> usize {
        // SAFETY: a new private mapping of the file; nothing else uses the
        // address range (the test unmaps it).
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 << 20,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED, "{}", io::Error::last_os_error());
        at as usize
    }

    fn read_page(addr: usize) -> u8 {
        // SAFETY: `addr` lies inside a live readable mapping of the test.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    }

    fn unmap(addr: usize) {
        // SAFETY: unmaps a mapping of the test that nothing uses any more.
        unsafe { libc::munmap(addr as *mut libc::c_void, 4 << 20) };
    }

    #[test]
    fn a_registered_mapping_maps_the_page_read_and_no_neighbour() {
        // SAFETY: memfd_create with a NUL-terminated name; the descriptor
        // it returns is owned by `file` alone.
        let mut file = unsafe {
            let fd = libc::memfd_create(c"template-memory".as_ptr(), 0);
            assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
            std::fs::File::from_raw_fd(fd)
        };
        file.write_all(&vec![7u8; 4 << 20]).unwrap();
        let page = 4096;

        // With fault-around (the host's default): one read maps more.
        let plain = private_mapping(&file);
        assert_eq!(read_page(plain + (1 << 20)), 7);
        let around = rss_kib(plain);
        unmap(plain);
        assert!(
            around > page / 1024,
            "one read mapped {around} KiB: is the host's fault_around_bytes one page?"
        );

        let at = private_mapping(&file);
        let fd = disable(&[(at, 4 << 20)]).unwrap();
        assert_eq!(read_page(at + (1 << 20)), 7);
        assert_eq!(rss_kib(at), page / 1024);
        assert_eq!(read_page(at + (2 << 20) + 5 * page as usize), 7);
        assert_eq!(rss_kib(at), 2 * page / 1024);
        // A write copies the page as before, and sees the file's data.
        // SAFETY: inside the live writable mapping.
        unsafe { std::ptr::write_volatile((at + 3 * page as usize) as *mut u8, 9) };
        assert_eq!(read_page(at + 3 * page as usize), 9);
        drop(fd);
        unmap(at);
    }

    #[test]
    fn an_unmapped_range_is_named() {
        let err = disable(&[(0x1000, 0x1000)]).unwrap_err().to_string();
        assert!(
            err.contains("UFFDIO_REGISTER") && err.contains("0x1000"),
            "{err}"
        );
    }
}
