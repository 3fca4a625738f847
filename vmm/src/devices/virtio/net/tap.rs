//! The device's back end: a Linux tap, behind the small [`Backend`] trait
//! (tests and the fuzz target put a seqpacket socket there instead).
//!
//! The tap carries one Ethernet frame per read or write, each behind a
//! [`VNET_HDR_LEN`]-byte `virtio_net_hdr_v1`: the same layout the guest
//! uses, so frames go between the rings and the tap without being
//! rewritten. Contract for a tap handed over as a file descriptor
//! (`--net fd=N`): opened with `IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`
//! (checked with `TUNGETIFF`). The VMM then sets the vnet header size
//! (`TUNSETVNETHDRSZ`), no offloads until the guest acks them
//! (`TUNSETOFFLOAD`), and `O_NONBLOCK`. All of that happens at start,
//! before the seccomp filters; at run time the event loop only reads,
//! writes and calls `TUNSETOFFLOAD` (after a feature negotiation).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

use super::config::{NetBackendSpec, MAX_IFNAME_LEN};
use super::frame::VNET_HDR_LEN;

/// Where a net device's frames come from and go to. Every frame read or
/// written starts with a [`VNET_HDR_LEN`]-byte vnet header; reads and
/// writes never block (`WouldBlock` instead).
pub trait Backend: AsRawFd + Send + std::fmt::Debug {
    /// Reads one frame into `buf`; returns its length.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one whole frame.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;
    /// Sets which offloads (`TUN_F_*`) frames read may use.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// Why a tap could not be used.
#[derive(Debug, Error)]
pub enum TapError {
    #[error("--net fd={fd}: the file descriptor is not open in isola-vmm (was it inherited?)")]
    FdNotOpen { fd: RawFd },
    #[error("--net fd={fd}: not a tap (TUNGETIFF: {source}); pass a tap opened from /dev/net/tun with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR")]
    NotATun { fd: RawFd, source: io::Error },
    #[error("--net fd={fd}: the tap {name:?} was opened without {missing}; open it with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR")]
    WrongFlags {
        fd: RawFd,
        name: String,
        missing: &'static str,
    },
    #[error("--net tap={name}: opening /dev/net/tun: {source}")]
    OpenTun { name: String, source: io::Error },
    #[error("--net tap={name}: attaching to the tap (TUNSETIFF): {source}")]
    Attach { name: String, source: io::Error },
    #[error("--net {what}: {step}: {source}")]
    Setup {
        what: String,
        step: &'static str,
        source: io::Error,
    },
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// Also the event loop's seccomp filter's (the one tap ioctl made at run
/// time).
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// The flags a tap must have.
const TAP_FLAGS: libc::c_short = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as _;

/// `struct ifreq` as the tun ioctls use it: the name, then the flags
/// (the rest of the union is padding here).
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new() -> Self {
        IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(self.name.get(..end).unwrap_or_default()).into_owned()
    }
}

/// An ioctl whose argument is a pointer to `arg`.
fn ioctl_ptr<T>(fd: RawFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request used here reads or writes at most
    // size_of::<T>() bytes at `arg` (an ifreq or an int), which is valid
    // and exclusively borrowed for the call.
    let ret = unsafe { libc::ioctl(fd, request, arg as *mut T) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A tap device (the file behind `/dev/net/tun`, attached to one
/// interface).
#[derive(Debug)]
pub struct Tap {
    file: File,
    /// The interface's name, for logs.
    name: String,
}

impl Tap {
    /// Opens the tap of a `--net` value: takes over the inherited fd, or
    /// opens `/dev/net/tun` and attaches to (or creates) the named tap.
    /// Checks it and sets it up (vnet header size, no offloads,
    /// non-blocking).
    pub fn open(spec: &NetBackendSpec) -> Result<Tap, TapError> {
        let tap = match spec {
            NetBackendSpec::Fd(fd) => Self::from_fd(*fd)?,
            NetBackendSpec::Tap(name) => Self::by_name(name)?,
        };
        let setup = |step| {
            move |source| TapError::Setup {
                what: spec.to_string(),
                step,
                source,
            }
        };
        let mut hdr_len = VNET_HDR_LEN as libc::c_int;
        ioctl_ptr(tap.file.as_raw_fd(), TUNSETVNETHDRSZ, &mut hdr_len)
            .map_err(setup("setting the vnet header size (TUNSETVNETHDRSZ)"))?;
        set_offload(tap.file.as_raw_fd(), 0)
            .map_err(setup("clearing the offloads (TUNSETOFFLOAD)"))?;
        set_nonblocking(tap.file.as_raw_fd()).map_err(setup("making it non-blocking"))?;
        Ok(tap)
    }

    /// Takes over `fd`, which must be an open tap with [`TAP_FLAGS`].
    fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        // SAFETY: F_GETFD only looks the number up in the fd table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::FdNotOpen { fd });
        }
        let mut req = IfReq::new();
        ioctl_ptr(fd, TUNGETIFF, &mut req).map_err(|source| TapError::NotATun { fd, source })?;
        let name = req.name();
        // Best effort for IFF_NO_PI: Linux also reports its bit as
        // IFF_NOFILTER, so a tap opened without it may pass.
        for (flag, missing) in [
            (libc::IFF_TAP, "IFF_TAP (it is a tun, not a tap)"),
            (libc::IFF_NO_PI, "IFF_NO_PI"),
            (libc::IFF_VNET_HDR, "IFF_VNET_HDR"),
        ] {
            if req.flags & flag as libc::c_short == 0 {
                return Err(TapError::WrongFlags { fd, name, missing });
            }
        }
        // SAFETY: fd is open (checked above), was inherited for this device,
        // and nothing else in this process owns it: the command line gives
        // each number once and refuses 0-2, and the taps are opened before
        // the VMM opens files of its own.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Tap { file, name })
    }

    /// Opens `/dev/net/tun` and attaches to the tap `name` (creating it
    /// if it does not exist, which needs CAP_NET_ADMIN).
    fn by_name(name: &str) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq::new();
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_IFNAME_LEN || bytes.contains(&0) {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
        for (dst, src) in req.name.iter_mut().zip(bytes) {
            *dst = *src;
        }
        req.flags = TAP_FLAGS;
        ioctl_ptr(file.as_raw_fd(), TUNSETIFF, &mut req).map_err(|source| TapError::Attach {
            name: name.to_string(),
            source,
        })?;
        Ok(Tap {
            file,
            name: req.name(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn set_offload(fd: RawFd, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned int).
    let ret = unsafe { libc::ioctl(fd, TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd this process owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A connected, non-blocking `SOCK_SEQPACKET` pair: one message a frame,
/// like a tap. Tests and the fuzz target put one end where the tap goes.
pub fn seqpacket_pair() -> io::Result<(File, File)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((File::from(a), File::from(b)))
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Backend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        set_offload(self.file.as_raw_fd(), flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_numbers_are_the_kernels() {
        assert_eq!(TUNSETIFF, libc::TUNSETIFF as libc::c_ulong);
        assert_eq!(TUNGETIFF, libc::TUNGETIFF as libc::c_ulong);
        assert_eq!(TUNSETOFFLOAD, libc::TUNSETOFFLOAD as libc::c_ulong);
        assert_eq!(TUNSETVNETHDRSZ, libc::TUNSETVNETHDRSZ as libc::c_ulong);
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn a_fd_that_is_not_a_tap_is_refused_by_name() {
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        let err = Tap::open(&NetBackendSpec::Fd(fd)).unwrap_err();
        assert!(matches!(err, TapError::NotATun { .. }), "{err}");
        assert!(err.to_string().contains(&format!("--net fd={fd}")), "{err}");
        drop(file);
        // A number that is not open: named, and nothing is taken over.
        let err = Tap::open(&NetBackendSpec::Fd(1 << 30)).unwrap_err();
        assert!(matches!(err, TapError::FdNotOpen { .. }), "{err}");
    }

    /// Opens `/dev/net/tun` as a tap or tun named `name` with `flags`, the
    /// way a caller of `--net fd=N` does; None (with a note) where this
    /// host or user cannot.
    fn raw_tap(name: &str, flags: libc::c_int) -> Option<File> {
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("/dev/net/tun is missing on this host: the real-tap test checks nothing");
            return None;
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
        {
            Ok(file) => file,
            Err(err) => {
                eprintln!("opening /dev/net/tun: {err}: the real-tap test checks nothing");
                return None;
            }
        };
        let mut req = IfReq::new();
        for (dst, src) in req.name.iter_mut().zip(name.as_bytes()) {
            *dst = *src;
        }
        req.flags = flags as libc::c_short;
        if let Err(err) = ioctl_ptr(file.as_raw_fd(), TUNSETIFF, &mut req) {
            eprintln!(
                "TUNSETIFF {name}: {err} (no CAP_NET_ADMIN?): the real-tap test checks nothing"
            );
            return None;
        }
        Some(file)
    }

    #[test]
    fn real_taps_are_checked_and_set_up() {
        use std::os::fd::IntoRawFd;
        let base = format!("isola{}", std::process::id() % 100_000);
        let tap_flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let Some(good) = raw_tap(&format!("{base}a"), tap_flags) else {
            return;
        };
        // A tap passed by fd: taken over, set up, its name known.
        let fd = good.into_raw_fd();
        let mut tap = Tap::open(&NetBackendSpec::Fd(fd)).unwrap();
        assert_eq!(tap.name(), format!("{base}a"));
        assert_eq!(tap.as_raw_fd(), fd);
        // SAFETY: F_GETFL on the tap's open descriptor.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        assert_ne!(fl & libc::O_NONBLOCK, 0, "made non-blocking");
        tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
            .unwrap();
        tap.set_offload(0).unwrap();
        // Nothing to read yet: the read does not block.
        let mut buf = [0u8; 64];
        let err = tap.read_frame(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

        // Opened without the vnet header, or as a tun: refused, by name.
        let cases = [
            ("b", libc::IFF_TAP | libc::IFF_NO_PI, "IFF_VNET_HDR"),
            // (Without IFF_NO_PI cannot be told: TUNGETIFF answers with
            // the same bit set, as IFF_NOFILTER, on Linux 6.18.)
            (
                "d",
                libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
                "IFF_TAP",
            ),
        ];
        for (suffix, flags, missing) in cases {
            let file = raw_tap(&format!("{base}{suffix}"), flags).unwrap();
            // A copy, so that a wrong acceptance cannot close `file`'s fd.
            let fd = file.try_clone().unwrap().into_raw_fd();
            let err = match Tap::open(&NetBackendSpec::Fd(fd)) {
                Ok(tap) => panic!("{tap:?} accepted"),
                Err(err) => err,
            };
            // SAFETY: the copy was not taken over (refused); closing it here.
            drop(unsafe { File::from_raw_fd(fd) });
            let text = err.to_string();
            assert!(text.contains(&format!("--net fd={fd}")), "{text}");
            assert!(text.contains(missing), "{text}");
            assert!(text.contains(&format!("{base}{suffix}")), "{text}");
        }

        // By name: the VMM creates the tap itself.
        let name = format!("{base}e");
        let tap = Tap::open(&NetBackendSpec::Tap(name.clone())).unwrap();
        assert_eq!(tap.name(), name);
        // A second open of the same single-queue tap is refused, named.
        let err = Tap::open(&NetBackendSpec::Tap(name.clone())).unwrap_err();
        assert!(
            err.to_string().contains(&format!("--net tap={name}")),
            "{err}"
        );
    }
}
