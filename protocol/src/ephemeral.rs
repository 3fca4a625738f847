//! Ephemeral volumes on the wire: a Kubernetes emptyDir of medium Memory
//! becomes a tmpfs of the guest, not a bind of the host's tmpfs through
//! the share. The host (`isola_sandbox::spec`) rewrites such a bind in the
//! container's OCI spec to
//!
//! ```json
//! {"destination": "/mem", "type": "isola-ephemeral", "source": "mem-0123456789abcdef",
//!  "options": ["size=8388608", "rw", "nosuid", "nodev"]}
//! ```
//!
//! and the agent (`isola-agent`'s `spec`) accepts exactly that form:
//! `source` is the volume's key (1 to [`MAX_KEY_LEN`] of
//! `[A-Za-z0-9_.-]`, not `.` or `..`), the same for every container of the
//! pod that mounts the volume; `options` may hold `size=<bytes>` once (1
//! to [`MAX_SIZE`]; without it the tmpfs has the kernel's default size,
//! half the VM's memory), `ro` or `rw`, `nosuid`, `nodev`, `noexec`, and
//! nothing else. See docs/architecture.md, "Ephemeral volumes".

/// The mount type of an ephemeral volume.
pub const MOUNT_TYPE: &str = "isola-ephemeral";

/// Largest `size=`: 1 PiB, far beyond any VM (the host sends no size for
/// a larger host tmpfs; the agent refuses one).
pub const MAX_SIZE: u64 = 1 << 50;

/// Longest key.
pub const MAX_KEY_LEN: usize = 64;

/// An ephemeral volume: a tmpfs of the guest, shared by the containers of
/// the pod that mount its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The same for every container of the pod that mounts the volume.
    pub key: String,
    /// The tmpfs's `size=`, in bytes; `None`: the guest kernel's default
    /// (half the VM's memory).
    pub size: Option<u64>,
}

/// Whether `b` may be in a key: `[A-Za-z0-9_.-]`.
pub fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-'
}

/// Whether `key` is a key: 1 to [`MAX_KEY_LEN`] of `[A-Za-z0-9_.-]`, not
/// `.` or `..`.
pub fn is_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key != "."
        && key != ".."
        && key.bytes().all(is_key_byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for good in ["k", "mem-0123456789abcdef", "big_1.x-0", &"k".repeat(64)] {
            assert!(is_key(good), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "/run", &"k".repeat(65)] {
            assert!(!is_key(bad), "{bad:?}");
        }
    }
}
