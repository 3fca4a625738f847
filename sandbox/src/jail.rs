//! Which unprivileged user each sandbox's jailed isola-vmm runs as.
//!
//! Every sandbox gets a uid (and the gid of the same number) of its own
//! from a configured range, so that one escaped VMM can neither signal nor
//! ptrace another. A uid is taken by holding an exclusive `flock` on
//! `<leases>/<uid>`: the shim holds it for the sandbox's life and isola-vmm's
//! supervisor inherits it, so the uid stays taken while any of them lives,
//! and is free again the moment all are gone (a crash included: the kernel
//! drops the lock, nothing is left to clean up but an empty file).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The default first uid of the range: above the ranges systemd hands to
/// users, its dynamic users and its containers (up to 1879048191), so no
/// account or user namespace of the node shares it.
pub const DEFAULT_FIRST_UID: u32 = 1_879_048_192;
/// The default number of uids: as many sandboxes can run at once.
pub const DEFAULT_UID_COUNT: u32 = 65_536;
/// Where the leases are kept by default: host-wide, whatever the run root.
pub const DEFAULT_LEASE_DIR: &str = "/run/isola/jail-uids";

/// The range jailed VMMs' users are taken from, and where leases live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailUids {
    pub first: u32,
    pub count: u32,
    pub lease_dir: PathBuf,
}

impl Default for JailUids {
    fn default() -> Self {
        JailUids {
            first: DEFAULT_FIRST_UID,
            count: DEFAULT_UID_COUNT,
            lease_dir: PathBuf::from(DEFAULT_LEASE_DIR),
        }
    }
}

impl JailUids {
    /// Checks the range: not empty, no uid 0, nothing at or past
    /// `u32::MAX` (which is -1, "no change", to the kernel). An error names
    /// the config key at fault and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.count == 0 {
            return Err(("jail.uid_count", "jail.uid_count must be at least 1".into()));
        }
        if self.first == 0 {
            return Err((
                "jail.first_uid",
                "jail.first_uid must not be 0 (the jail never runs as root)".into(),
            ));
        }
        match self.first.checked_add(self.count) {
            Some(_) => Ok(()),
            None => Err((
                "jail.first_uid",
                format!(
                    "jail.first_uid {} + jail.uid_count {} runs past uid 4294967294",
                    self.first, self.count
                ),
            )),
        }
    }
}

/// A uid held for one sandbox; released when dropped (and when every
/// process that inherited its descriptor is gone).
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    /// Holds the `flock`. Never unlocked explicitly: the lock belongs to
    /// the open file, which isola-vmm's supervisor shares, and goes with
    /// the last descriptor of it.
    lock: File,
    path: PathBuf,
}

impl UidLease {
    /// Takes a free uid of `uids`, trying from a place that depends on
    /// `key` (the sandbox's directory) so that concurrent starts rarely
    /// contend.
    pub fn acquire(uids: &JailUids, key: &str) -> io::Result<UidLease> {
        uids.validate()
            .map_err(|(_, e)| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        crate::share::prepare_run_root(&uids.lease_dir)?;
        let start = fnv1a(key.as_bytes()) % u64::from(uids.count);
        for step in 0..u64::from(uids.count) {
            let offset = (start + step) % u64::from(uids.count);
            let uid = uids.first + offset as u32;
            if let Some(lease) = try_lease(&uids.lease_dir, uid)? {
                return Ok(lease);
            }
        }
        Err(io::Error::other(format!(
            "every jail uid from {} to {} is taken (leases in {})",
            uids.first,
            uids.first + (uids.count - 1),
            uids.lease_dir.display()
        )))
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The lease's descriptor, for isola-vmm to inherit.
    pub fn fd(&self) -> RawFd {
        self.lock.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes `uid` if nobody holds it; `None` if somebody does.
fn try_lease(dir: &Path, uid: u32) -> io::Result<Option<UidLease>> {
    let path = dir.join(uid.to_string());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    // SAFETY: flock on a descriptor the File owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(UidLease {
            uid,
            lock: file,
            path,
        }));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(io::Error::new(
        err.kind(),
        format!("locking {}: {err}", path.display()),
    ))
}

/// FNV-1a, 64 bits: a stable spread of keys over the range.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uids(dir: &Path, first: u32, count: u32) -> JailUids {
        JailUids {
            first,
            count,
            lease_dir: dir.join("leases"),
        }
    }

    #[test]
    fn each_live_lease_has_its_own_uid_and_a_freed_one_comes_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let range = uids(tmp.path(), 5000, 3);
        let a = UidLease::acquire(&range, "a").expect("a");
        let b = UidLease::acquire(&range, "a").expect("b");
        let c = UidLease::acquire(&range, "a").expect("c");
        let mut got = [a.uid(), b.uid(), c.uid()];
        got.sort_unstable();
        assert_eq!(got, [5000, 5001, 5002]);
        let err = UidLease::acquire(&range, "a").expect_err("full");
        assert!(
            err.to_string().contains("from 5000 to 5002 is taken"),
            "{err}"
        );
        let freed = b.uid();
        drop(b);
        assert_eq!(UidLease::acquire(&range, "a").expect("again").uid(), freed);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(a.path())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_lease_held_through_an_inherited_descriptor_stays_taken() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let range = uids(tmp.path(), 7000, 1);
        let lease = UidLease::acquire(&range, "x").expect("lease");
        // What isola-vmm's supervisor holds: the same open file.
        // SAFETY: dup of a descriptor the lease owns.
        let inherited = unsafe { libc::dup(lease.fd()) };
        assert!(inherited >= 0);
        drop(lease);
        assert!(
            UidLease::acquire(&range, "x").is_err(),
            "taken while inherited"
        );
        // SAFETY: closing the duplicate made above.
        unsafe { libc::close(inherited) };
        assert_eq!(UidLease::acquire(&range, "x").expect("free").uid(), 7000);
    }

    #[test]
    fn bad_ranges_are_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for (first, count, what) in [
            (0, 10, "must not be 0"),
            (5, 0, "at least 1"),
            (u32::MAX - 2, 5, "runs past uid 4294967294"),
        ] {
            let err = UidLease::acquire(&uids(tmp.path(), first, count), "k").expect_err("bad");
            assert!(err.to_string().contains(what), "{err}");
        }
    }

    #[test]
    fn keys_spread() {
        assert_ne!(fnv1a(b"sandbox-a") % 65536, fnv1a(b"sandbox-b") % 65536);
    }
}
