//! From the caller's OCI spec to the one the agent gets: host paths of bind
//! mounts replaced by their place in the share, volumes added as bind
//! mounts, and Kubernetes Memory emptyDir volumes turned into ephemeral
//! mounts the agent backs with a tmpfs of the guest ([`ephemeral`]).

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{Mount, Spec};

use crate::share::guest_volume;

/// A host directory (or file) shown to a container: `HOST:GUEST[:ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub host: PathBuf,
    pub guest: String,
    pub readonly: bool,
}

impl Volume {
    /// Parses `HOST:GUEST[:ro|:rw]`. `HOST` is taken as written (the
    /// caller makes it absolute); `GUEST` must be absolute. Errors name the
    /// bad part.
    pub fn parse(text: &str) -> Result<Volume, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let (host, guest, mode) = match parts.as_slice() {
            [host, guest] => (*host, *guest, None),
            [host, guest, mode] => (*host, *guest, Some(*mode)),
            _ => {
                return Err(format!(
                    "volume {text:?}: expected HOST:GUEST or HOST:GUEST:ro, not {} parts",
                    parts.len()
                ))
            }
        };
        if host.is_empty() {
            return Err(format!("volume {text:?}: the host path is empty"));
        }
        if !guest.starts_with('/') {
            return Err(format!(
                "volume {text:?}: the container path {guest:?} is not absolute"
            ));
        }
        if Path::new(guest)
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(format!(
                "volume {text:?}: the container path {guest:?} contains \"..\""
            ));
        }
        let readonly = match mode {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(other) => {
                return Err(format!(
                    "volume {text:?}: the mode {other:?} is not \"ro\" or \"rw\""
                ))
            }
        };
        Ok(Volume {
            host: PathBuf::from(host),
            guest: guest.to_string(),
            readonly,
        })
    }

    /// The bind mount this volume adds to a spec.
    pub fn mount(&self) -> Mount {
        let mut mount = Mount::default();
        mount
            .set_destination(PathBuf::from(&self.guest))
            .set_typ(Some("bind".to_string()))
            .set_source(Some(self.host.clone()))
            .set_options(Some(vec![
                "rbind".to_string(),
                if self.readonly { "ro" } else { "rw" }.to_string(),
            ]));
        mount
    }
}

/// A host path the share must carry for a container: bound at the
/// container's volume `index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    pub index: usize,
    pub source: PathBuf,
    pub readonly: bool,
    /// The mount's options ask for private propagation
    /// ([`crate::share::BindMode::private`]).
    pub private: bool,
}

/// Why a spec cannot be sent to the guest; names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SpecError {
    pub field: String,
    pub problem: String,
}

pub(crate) fn is_bind(mount: &Mount) -> bool {
    mount.typ().as_deref() == Some("bind")
        || mount
            .options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

/// Whether the mount's options make it private or unbindable (the last
/// propagation option holds, as runc applies them in order).
fn is_private(mount: &Mount) -> bool {
    use isola_protocol::propagation::{last, Propagation};
    mount
        .options()
        .as_deref()
        .and_then(last)
        .is_some_and(|p| matches!(p, Propagation::Private | Propagation::Unbindable))
}

fn is_readonly(mount: &Mount) -> bool {
    mount
        .options()
        .as_ref()
        .is_some_and(|o| o.iter().any(|o| o == "ro"))
}

use isola_protocol::ephemeral::{is_key_byte, MAX_KEY_LEN};
/// The ephemeral volumes' wire form (`isola_protocol::ephemeral`). The
/// host sends `source` = the key ([`ephemeral_key`]) and `options` =
/// `size=<bytes>` (only for a host tmpfs of explicit size, at most
/// [`MAX_EPHEMERAL_SIZE`]: a larger one is sent without a size), `ro` or
/// `rw`, then whichever of `nosuid`, `nodev`, `noexec` the original bind
/// had. A Memory emptyDir volume ([`Ephemeral`]) is made in the guest, not
/// carried by the share.
pub use isola_protocol::ephemeral::{
    Volume as Ephemeral, MAX_SIZE as MAX_EPHEMERAL_SIZE, MOUNT_TYPE as EPHEMERAL_TYPE,
};

/// The directory kubelet (and `isola pod`) keeps a pod's emptyDir volumes
/// in: `<pods root>/<pod uid>/volumes/kubernetes.io~empty-dir/<name>`.
pub const EMPTY_DIR: &str = "kubernetes.io~empty-dir";

/// The volume name of an emptyDir path: the component after
/// `kubernetes.io~empty-dir`, which must be the last one.
fn empty_dir_name(path: &Path) -> Option<&OsStr> {
    let parts: Vec<Component<'_>> = path.components().collect();
    match parts.as_slice() {
        [.., Component::Normal(dir), Component::Normal(name)] if *dir == OsStr::new(EMPTY_DIR) => {
            Some(name)
        }
        _ => None,
    }
}

/// 64-bit FNV-1a: a hash that stays the same across builds and releases
/// (std's `DefaultHasher` does not promise to).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The key of the emptyDir volume `name` at host path `path`: the name
/// (anything outside `[A-Za-z0-9_.-]` as `_`, cut to 47 bytes), `-`, and
/// 16 hex digits of the path's FNV-1a hash: at most 64 bytes of
/// `[A-Za-z0-9_.-]`, never `.` or `..`, the same for every container of
/// the pod, different for two volumes.
pub fn ephemeral_key(name: &OsStr, path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut key: String = name
        .as_bytes()
        .iter()
        .take(MAX_KEY_LEN - 17)
        .map(|&b| if is_key_byte(b) { char::from(b) } else { '_' })
        .collect();
    key.push_str(&format!("-{:016x}", fnv1a64(path.as_os_str().as_bytes())));
    key
}

/// The guest size for a host tmpfs of `blocks` blocks of `block_size`
/// bytes, where the tmpfs default (no `size=`: half the host's memory) is
/// `default_blocks`. No size for a tmpfs without an explicit size (the
/// guest's own default, half the VM's memory, is its equivalent), for an
/// unlimited one (`size=0`) and for one beyond [`MAX_EPHEMERAL_SIZE`].
pub fn ephemeral_size(blocks: u64, block_size: u64, default_blocks: Option<u64>) -> Option<u64> {
    if blocks == 0 || Some(blocks) == default_blocks {
        return None;
    }
    blocks
        .checked_mul(block_size)
        .filter(|&size| size <= MAX_EPHEMERAL_SIZE)
}

/// The blocks (of `block_size` bytes) of a host tmpfs mounted without
/// `size=`: the kernel's default, half its RAM pages.
fn host_tmpfs_default_blocks(block_size: u64) -> Option<u64> {
    // SAFETY: sysinfo is plain old data; all-zero is a valid value.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: sysinfo(2) only writes the struct it is given.
    if unsafe { libc::sysinfo(&mut info) } != 0 || block_size == 0 {
        return None;
    }
    let ram = info.totalram.checked_mul(u64::from(info.mem_unit))?;
    Some(ram / block_size / 2)
}

/// Whether the bind source `source` is a Memory emptyDir: a directory
/// named `.../kubernetes.io~empty-dir/<name>` (once symlinks are resolved)
/// that is the mount point of a tmpfs (its file system is tmpfs and its
/// device differs from its parent's). A plain directory there, or one that
/// cannot be looked at, is not: it goes through the share as any bind.
pub fn ephemeral(source: &Path) -> Option<Ephemeral> {
    let path = source.canonicalize().ok()?;
    let name = empty_dir_name(&path)?;
    let meta = std::fs::metadata(&path).ok()?;
    let parent = std::fs::metadata(path.parent()?).ok()?;
    if !meta.is_dir() || meta.dev() == parent.dev() {
        return None;
    }
    let fs = nix::sys::statfs::statfs(&path).ok()?;
    if fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return None;
    }
    let blocks = fs.blocks();
    let block_size = u64::try_from(fs.block_size()).ok()?;
    Some(Ephemeral {
        key: ephemeral_key(name, &path),
        size: ephemeral_size(blocks, block_size, host_tmpfs_default_blocks(block_size)),
    })
}

/// Turns the bind `mount` into the ephemeral mount of `volume` (see
/// [`EPHEMERAL_TYPE`]); the destination stays.
fn make_ephemeral(mount: &mut Mount, volume: &Ephemeral) {
    let original = mount.options().clone().unwrap_or_default();
    let mut options: Vec<String> = volume
        .size
        .map(|size| format!("size={size}"))
        .into_iter()
        .collect();
    options.push(if is_readonly(mount) { "ro" } else { "rw" }.to_string());
    for flag in ["nosuid", "nodev", "noexec"] {
        if original.iter().any(|o| o == flag) {
            options.push(flag.to_string());
        }
    }
    mount
        .set_typ(Some(EPHEMERAL_TYPE.to_string()))
        .set_source(Some(PathBuf::from(&volume.key)))
        .set_options(Some(options));
}

/// Rewrites `spec` for container `cid`: a bind of a Memory emptyDir
/// ([`ephemeral`]) becomes an ephemeral mount of the guest; every other
/// bind mount's host source becomes the guest path of a volume of the
/// share, in order; `root.path` becomes `rootfs` (the agent ignores it).
/// Returns the host paths to bind into the share.
pub fn rewrite(spec: &mut Spec, cid: &str) -> Result<Vec<HostBind>, SpecError> {
    let mut binds = Vec::new();
    if let Some(mounts) = spec.mounts_mut() {
        for (i, mount) in mounts.iter_mut().enumerate() {
            if !is_bind(mount) {
                continue;
            }
            let field = format!("mounts[{i}].source");
            let source = mount.source().clone().ok_or_else(|| SpecError {
                field: field.clone(),
                problem: format!(
                    "a bind mount (to {}) needs a source",
                    mount.destination().display()
                ),
            })?;
            if !source.is_absolute() {
                return Err(SpecError {
                    field,
                    problem: format!("{} is not an absolute host path", source.display()),
                });
            }
            if let Some(volume) = ephemeral(&source) {
                make_ephemeral(mount, &volume);
                continue;
            }
            let index = binds.len();
            binds.push(HostBind {
                index,
                source,
                readonly: is_readonly(mount),
                private: is_private(mount),
            });
            mount.set_source(Some(PathBuf::from(guest_volume(cid, index))));
        }
    }
    if let Some(root) = spec.root_mut() {
        root.set_path(PathBuf::from("rootfs"));
    }
    Ok(binds)
}

/// Whether the spec wants a read-only root file system.
pub fn root_readonly(spec: &Spec) -> bool {
    spec.root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_parse() {
        assert_eq!(
            Volume::parse("/srv/data:/data"),
            Ok(Volume {
                host: "/srv/data".into(),
                guest: "/data".into(),
                readonly: false
            })
        );
        assert_eq!(Volume::parse("rel:/data:ro").map(|v| v.readonly), Ok(true));
        assert_eq!(Volume::parse("/a:/b:rw").map(|v| v.readonly), Ok(false));
    }

    #[test]
    fn bad_volumes_name_the_bad_part() {
        let cases = [
            ("/a", "not 1 parts"),
            ("/a:/b:ro:x", "not 4 parts"),
            (":/b", "host path is empty"),
            ("/a:b", "container path \"b\" is not absolute"),
            ("/a:", "container path \"\" is not absolute"),
            ("/a:/b/../../etc", "contains \"..\""),
            ("/a:/b:rx", "mode \"rx\" is not"),
        ];
        for (text, want) in cases {
            let err = Volume::parse(text).err().unwrap_or_default();
            assert!(err.contains(want), "{text}: {err}");
            assert!(err.starts_with(&format!("volume {text:?}")), "{err}");
        }
    }

    fn spec_with(mounts: serde_json::Value) -> Spec {
        let json = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "/host/bundle/rootfs", "readonly": true},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "mounts": mounts,
        });
        serde_json::from_value(json).expect("spec")
    }

    #[test]
    fn bind_sources_become_share_paths_and_others_stay() {
        let mut spec = spec_with(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/etc/hosts", "source": "/var/lib/x/hosts", "options": ["bind", "ro"]},
            {"destination": "/prop", "source": "/srv/prop", "options": ["rbind", "rprivate", "rslave"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"},
        ]));
        let volume = Volume::parse("/home/u/cfg:/cfg:ro").expect("volume");
        spec.mounts_mut()
            .get_or_insert_with(Vec::new)
            .push(volume.mount());
        let binds = rewrite(&mut spec, "web").expect("rewrite");
        assert_eq!(
            binds,
            vec![
                HostBind {
                    index: 0,
                    source: "/srv/data".into(),
                    readonly: false,
                    private: true,
                },
                HostBind {
                    index: 1,
                    source: "/var/lib/x/hosts".into(),
                    readonly: true,
                    private: false,
                },
                // The last propagation option wins, as runc applies them.
                HostBind {
                    index: 2,
                    source: "/srv/prop".into(),
                    readonly: false,
                    private: false,
                },
                HostBind {
                    index: 3,
                    source: "/home/u/cfg".into(),
                    readonly: true,
                    private: false,
                },
            ]
        );
        let mounts = spec.mounts().clone().unwrap_or_default();
        let sources: Vec<String> = mounts
            .iter()
            .map(|m| {
                m.source()
                    .as_ref()
                    .map(|s| s.display().to_string())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            sources,
            [
                "proc",
                "/run/isola/share/containers/web/volumes/0",
                "/run/isola/share/containers/web/volumes/1",
                "/run/isola/share/containers/web/volumes/2",
                "shm",
                "/run/isola/share/containers/web/volumes/3",
            ]
        );
        // Options (ro) travel unchanged: the guest mounts read-only too.
        assert_eq!(
            mounts[5].options().clone().unwrap_or_default(),
            ["rbind", "ro"]
        );
        assert_eq!(
            spec.root().as_ref().map(|r| r.path().clone()),
            Some(PathBuf::from("rootfs"))
        );
        assert!(root_readonly(&spec));
    }

    #[test]
    fn bad_binds_name_the_field() {
        let mut spec = spec_with(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "options": ["rbind"]},
        ]));
        let err = rewrite(&mut spec, "c").expect_err("refused");
        assert_eq!(err.field, "mounts[1].source");
        assert!(err.to_string().contains("needs a source"), "{err}");

        let mut spec = spec_with(serde_json::json!([
            {"destination": "/data", "type": "bind", "source": "relative/dir"},
        ]));
        let err = rewrite(&mut spec, "c").expect_err("refused");
        assert_eq!(
            err.to_string(),
            "mounts[0].source: relative/dir is not an absolute host path"
        );
    }

    #[test]
    fn empty_dir_names_are_the_last_component_after_the_plugin_dir() {
        let name = |p: &str| empty_dir_name(Path::new(p)).map(|n| n.to_string_lossy().into_owned());
        assert_eq!(
            name("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/mem").as_deref(),
            Some("mem")
        );
        assert_eq!(
            name("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir"),
            None
        );
        assert_eq!(name("/p/kubernetes.io~empty-dir/mem/sub"), None);
        assert_eq!(name("/p/kubernetes.io~configmap/mem"), None);
        assert_eq!(name("/p/x-kubernetes.io~empty-dir/mem"), None);
    }

    #[test]
    fn keys_are_stable_safe_and_bounded() {
        let path = Path::new("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/mem");
        let key = ephemeral_key(OsStr::new("mem"), path);
        assert_eq!(key, ephemeral_key(OsStr::new("mem"), path), "stable");
        assert!(key.starts_with("mem-") && key.len() == 20, "{key}");
        // Pinned (FNV-1a's test vectors): the hash must not change between
        // builds, or a container of a running pod created by a newer shim
        // would not find its volume's tmpfs.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let other = ephemeral_key(
            OsStr::new("mem"),
            Path::new("/var/lib/kubelet/pods/u2/volumes/kubernetes.io~empty-dir/mem"),
        );
        assert_ne!(key, other, "another pod's path, another key");

        let long = "x".repeat(200);
        for name in [
            "mem",
            "a b/c\\n..",
            "..",
            ".",
            long.as_str(),
            "\u{e9}t\u{e9}",
        ] {
            let key = ephemeral_key(OsStr::new(name), path);
            assert!(key.len() <= 64, "{key}");
            assert!(
                key.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-'),
                "{key}"
            );
            assert!(key != "." && key != "..");
        }
        assert!(ephemeral_key(OsStr::new("a b"), path).starts_with("a_b-"));
    }

    #[test]
    fn sizes_are_the_host_tmpfs_size_unless_it_is_the_default() {
        assert_eq!(ephemeral_size(2048, 4096, Some(1_000_000)), Some(8 << 20));
        assert_eq!(ephemeral_size(1_000_000, 4096, Some(1_000_000)), None);
        assert_eq!(ephemeral_size(0, 4096, Some(1_000_000)), None, "size=0");
        assert_eq!(ephemeral_size(2048, 4096, None), Some(8 << 20));
        assert_eq!(ephemeral_size(u64::MAX, 4096, None), None, "overflow");
        assert_eq!(
            ephemeral_size(MAX_EPHEMERAL_SIZE / 4096 + 1, 4096, None),
            None,
            "beyond the bound"
        );
    }

    /// A tmpfs mounted for a test, unmounted when dropped (a panic too).
    struct Tmpfs(PathBuf);

    impl Tmpfs {
        /// `None` where mounting is not allowed (not root).
        fn mount(at: &Path, data: &str) -> Option<Tmpfs> {
            std::fs::create_dir_all(at).expect("mount point");
            match nix::mount::mount(
                Some("tmpfs"),
                at,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some(data),
            ) {
                Ok(()) => Some(Tmpfs(at.to_path_buf())),
                Err(e) => {
                    eprintln!("skipped: cannot mount a tmpfs on {}: {e}", at.display());
                    None
                }
            }
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            if let Err(e) = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("unmounting {}: {e}", self.0.display());
            }
        }
    }

    #[test]
    fn only_tmpfs_mount_points_under_empty_dir_become_ephemeral() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        let volumes = root.join("pods/u1/volumes");
        let empty = volumes.join(EMPTY_DIR);
        let Some(_mem) = Tmpfs::mount(&empty.join("mem"), "mode=0777,size=8m") else {
            return;
        };
        let Some(_big) = Tmpfs::mount(&empty.join("big"), "mode=0777") else {
            return;
        };
        // A tmpfs elsewhere, a tmpfs one level too deep, a plain directory.
        let Some(_other) = Tmpfs::mount(&volumes.join("kubernetes.io~other/mem"), "size=1m") else {
            return;
        };
        let Some(_deep) = Tmpfs::mount(&empty.join("d/deep"), "size=1m") else {
            return;
        };
        std::fs::create_dir_all(empty.join("plain")).expect("plain");
        // A directory inside the tmpfs is on tmpfs but no mount point.
        std::fs::create_dir_all(empty.join("mem/sub")).expect("sub");
        let sub = root.join("sub");
        std::fs::create_dir_all(sub.join(EMPTY_DIR)).expect("sub dir");
        std::os::unix::fs::symlink(empty.join("mem"), sub.join(EMPTY_DIR).join("link"))
            .expect("symlink");

        let mem = ephemeral(&empty.join("mem")).expect("the Memory emptyDir");
        assert_eq!(mem.size, Some(8 << 20));
        assert!(mem.key.starts_with("mem-"), "{}", mem.key);
        assert_eq!(ephemeral(&empty.join("big")).expect("no size").size, None);
        for not in [
            volumes.join("kubernetes.io~other/mem"),
            empty.join("d/deep"),
            empty.join("plain"),
            empty.join("mem/sub"),
            empty.join("missing"),
        ] {
            assert_eq!(ephemeral(&not), None, "{}", not.display());
        }
        // Through a symlink: the volume it resolves to, the same key.
        assert_eq!(
            ephemeral(&sub.join(EMPTY_DIR).join("link")),
            Some(mem.clone())
        );

        let mut spec = spec_with(serde_json::json!([
            {"destination": "/mem", "type": "bind", "source": empty.join("mem"),
             "options": ["rbind", "rprivate", "rw", "nosuid", "nodev"]},
            {"destination": "/plain", "type": "bind", "source": empty.join("plain"), "options": ["rbind"]},
            {"destination": "/mem-ro", "source": empty.join("mem"), "options": ["bind", "ro", "noexec"]},
            {"destination": "/big", "type": "bind", "source": empty.join("big")},
        ]));
        let binds = rewrite(&mut spec, "web").expect("rewrite");
        assert_eq!(
            binds,
            vec![HostBind {
                index: 0,
                source: empty.join("plain"),
                readonly: false,
                private: false,
            }]
        );
        let mounts: Vec<serde_json::Value> = spec
            .mounts()
            .iter()
            .flatten()
            .map(|m| serde_json::to_value(m).expect("json"))
            .collect();
        assert_eq!(
            mounts,
            vec![
                serde_json::json!({"destination": "/mem", "type": EPHEMERAL_TYPE, "source": mem.key,
                    "options": ["size=8388608", "rw", "nosuid", "nodev"]}),
                serde_json::json!({"destination": "/plain", "type": "bind",
                    "source": "/run/isola/share/containers/web/volumes/0", "options": ["rbind"]}),
                serde_json::json!({"destination": "/mem-ro", "type": EPHEMERAL_TYPE, "source": mem.key,
                    "options": ["size=8388608", "ro", "noexec"]}),
                serde_json::json!({"destination": "/big", "type": EPHEMERAL_TYPE,
                    "source": ephemeral(&empty.join("big")).expect("big").key, "options": ["rw"]}),
            ]
        );
    }
}
