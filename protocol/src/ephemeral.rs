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
