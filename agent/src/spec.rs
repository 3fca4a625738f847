//! The OCI runtime spec of a container, as the host sends it, checked and
//! rewritten for the guest before libcontainer sees it:
//!
//! - the root is `rootfs`, a directory of the share (relative, no `..`,
//!   and still inside the share once symlinks are resolved);
//! - bind mounts take their sources from the share or from guest paths the
//!   agent owns (`/run/isola/sandbox/...`), nothing else of the guest;
//! - an ephemeral mount (a Memory emptyDir, [`EPHEMERAL_TYPE`]) becomes a
//!   bind of the sandbox's tmpfs for its key, which the caller mounts
//!   ([`Prepared::ephemeral`]);
//! - namespaces: new mount, pid, ipc and uts (and cgroup or time if the
//!   spec asks), the sandbox's network namespace by path, never a user
//!   namespace; paths the spec gives are the host's and are ignored: the
//!   pod's IPC, UTS and PID namespaces a container shares come from the
//!   request instead ([`Context::joined`]);
//! - `linux.cgroupsPath` is the container's child of the sandbox cgroup;
//! - `linux.seccomp` is taken out and compiled (`seccomp`), to be installed
//!   by the agent's executor;
//! - `process.terminal` follows the request's `Stdio.terminal`;
//! - the Linux security module fields (`process.apparmorProfile`,
//!   `process.selinuxLabel`, `linux.mountLabel`) are taken out: they name
//!   the host's profiles (containerd's `cri-containerd.apparmor.d`,
//!   Docker's `docker-default`), and the guest kernel has no LSM to apply
//!   them (Kata does the same). The VM is the boundary; the host's LSM
//!   still confines isola's processes on the host. [`take_lsm`] says what
//!   it dropped, for the agent to log.
//!
//! Errors name the field, relative to the request field
//! (`oci_spec_json: process.args: must not be empty`).

use std::fmt;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{
    LinuxBuilder, LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, Mount, Process, Spec,
};

use crate::seccomp::{self, Compiled};

/// A wrong field: `field: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for SpecError {}

fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

/// Longest spec accepted (the ttrpc message limit is 4 MiB anyway).
pub const MAX_SPEC_JSON: usize = 1024 * 1024;

/// Parses JSON into `T`; an error names the JSON path of the bad value.
pub fn parse_json<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, SpecError> {
    if json.len() > MAX_SPEC_JSON {
        return Err(err("", format!("longer than {MAX_SPEC_JSON} bytes")));
    }
    let de = &mut serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_path_to_error says "." for the document itself and "?"
        // where it could not tell.
        let field = if path == "." || path == "?" {
            String::new()
        } else {
            path
        };
        err(field, inner.to_string())
    })
}

/// Where a container's pieces live in the guest.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub container_id: &'a str,
    /// The share's mount point, canonical; `None` without a share.
    pub share: Option<&'a Path>,
    /// The request's `rootfs`, relative to the share.
    pub rootfs: &'a str,
    /// The sandbox's network namespace (a bind-mounted nsfs file).
    pub netns: &'a Path,
    /// The sandbox cgroup, relative to the cgroup root (`/isola`).
    pub cgroup_parent: &'a str,
    /// Guest directories whose files may be bind-mounted
    /// (`/run/isola/sandbox`).
    pub owned_dirs: &'a [&'a Path],
    /// Where each ephemeral volume's tmpfs is mounted, at `<dir>/<key>`
    /// (`/run/isola/sandbox/ephemeral`).
    pub ephemeral_dir: &'a Path,
    pub terminal: bool,
    /// The sandbox's namespaces this container joins (by the agent's pin
    /// of each) instead of a new one: IPC, UTS or PID.
    pub joined: &'a [(LinuxNamespaceType, &'a Path)],
}

/// A spec ready for libcontainer, and the seccomp filters taken from it.
#[derive(Debug)]
pub struct Prepared {
    pub spec: Spec,
    pub seccomp: Option<Compiled>,
    /// The ephemeral volumes the spec binds from `ephemeral_dir`, each key
    /// once: their tmpfs must be mounted before the container is made.
    pub ephemeral: Vec<Ephemeral>,
    /// The security module fields taken out ([`take_lsm`]), for the log.
    pub lsm_taken: Vec<String>,
}

/// The ephemeral volumes' wire form (`isola_protocol::ephemeral`): the
/// guest makes each volume, the share does not carry it.
pub use isola_protocol::ephemeral::{
    Volume as Ephemeral, MAX_KEY_LEN as MAX_EPHEMERAL_KEY, MAX_SIZE as MAX_EPHEMERAL_SIZE,
    MOUNT_TYPE as EPHEMERAL_TYPE,
};

/// `rel` inside `root`: relative, no `..`, and inside `root` once
/// resolved (symlinks included). `root` must be canonical.
pub fn resolve_inside(root: &Path, rel: &str, field: &str) -> Result<PathBuf, SpecError> {
    if rel.is_empty() {
        return Err(err(field, "must not be empty"));
    }
    let path = Path::new(rel);
    for c in path.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(err(field, format!("{rel:?} must not contain ..",)))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(err(field, format!("{rel:?} must be relative to the share")))
            }
        }
    }
    let joined = root.join(path);
    let resolved = joined
        .canonicalize()
        .map_err(|e| err(field, format!("{}: {e}", joined.display())))?;
    if !resolved.starts_with(root) {
        return Err(err(
            field,
            format!(
                "{rel:?} resolves to {}, outside the share",
                resolved.display()
            ),
        ));
    }
    Ok(resolved)
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

/// Mount types a container may ask for besides binds.
const MOUNT_TYPES: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "none",
];

fn is_ephemeral(m: &Mount) -> bool {
    m.typ().as_deref() == Some(EPHEMERAL_TYPE)
}

/// An ephemeral mount's volume and bind options (see [`EPHEMERAL_TYPE`]);
/// errors name `mounts[i].source` or `mounts[i].options[j]`.
fn check_ephemeral(m: &Mount, field: &str) -> Result<(Ephemeral, Vec<String>), SpecError> {
    let key = m
        .source()
        .as_deref()
        .and_then(Path::to_str)
        .unwrap_or_default();
    if !isola_protocol::ephemeral::is_key(key) {
        return Err(err(
            format!("{field}.source"),
            format!(
                "{key:?} is not an ephemeral volume key (1 to {MAX_EPHEMERAL_KEY} of [A-Za-z0-9_.-], not . or ..)"
            ),
        ));
    }
    let mut size = None;
    let mut mode = None;
    let mut noexec = false;
    for (j, o) in m.options().iter().flatten().enumerate() {
        let at = || format!("{field}.options[{j}]");
        if let Some(value) = o.strip_prefix("size=") {
            let bytes = value
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| value.parse::<u64>().ok())
                .flatten()
                .filter(|n| (1..=MAX_EPHEMERAL_SIZE).contains(n));
            match (bytes, size) {
                (Some(n), None) => size = Some(n),
                (None, _) => {
                    return Err(err(
                        at(),
                        format!("{o:?}: the size must be 1 to {MAX_EPHEMERAL_SIZE} bytes"),
                    ))
                }
                (Some(_), Some(_)) => return Err(err(at(), "a second size")),
            }
        } else if o == "ro" || o == "rw" {
            if mode.is_some_and(|m| m != o) {
                return Err(err(at(), "both ro and rw"));
            }
            mode = Some(o.as_str());
        } else if o == "noexec" {
            noexec = true;
        } else if o != "nosuid" && o != "nodev" {
            return Err(err(
                at(),
                format!("{o:?} is not an ephemeral volume option (size=, ro, rw, nosuid, nodev, noexec)"),
            ));
        }
    }
    // The tmpfs is nosuid and nodev whatever the host says; the bind says
    // so too, so no remount of it (ro) can lose them.
    let mut options: Vec<String> = ["rbind", "rprivate", mode.unwrap_or("rw"), "nosuid", "nodev"]
        .map(String::from)
        .into();
    if noexec {
        options.push("noexec".to_string());
    }
    Ok((
        Ephemeral {
            key: key.to_string(),
            size,
        },
        options,
    ))
}

/// Turns every ephemeral mount into a bind of `<ephemeral_dir>/<key>`;
/// the volumes, each key once (the first one's size).
fn rewrite_ephemeral(spec: &mut Spec, ephemeral_dir: &Path) -> Result<Vec<Ephemeral>, SpecError> {
    let mut volumes: Vec<Ephemeral> = Vec::new();
    for (i, m) in spec.mounts_mut().iter_mut().flatten().enumerate() {
        if !is_ephemeral(m) {
            continue;
        }
        let (volume, options) = check_ephemeral(m, &format!("mounts[{i}]"))?;
        m.set_typ(Some("bind".to_string()))
            .set_source(Some(ephemeral_dir.join(&volume.key)))
            .set_options(Some(options));
        if !volumes.iter().any(|v| v.key == volume.key) {
            volumes.push(volume);
        }
    }
    Ok(volumes)
}

fn check_mounts(spec: &Spec, ctx: &Context<'_>) -> Result<(), SpecError> {
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        let field = format!("mounts[{i}]");
        if !m.destination().is_absolute() {
            return Err(err(
                format!("{field}.destination"),
                format!("{} is not absolute", m.destination().display()),
            ));
        }
        if is_ephemeral(m) {
            // Checked and made a bind by `rewrite_ephemeral`.
            continue;
        }
        if is_bind(m) {
            let Some(source) = m.source() else {
                return Err(err(
                    format!("{field}.source"),
                    "a bind mount needs a source",
                ));
            };
            let resolved = source.canonicalize().map_err(|e| {
                err(
                    format!("{field}.source"),
                    format!("{}: {e}", source.display()),
                )
            })?;
            let allowed = ctx.share.is_some_and(|s| resolved.starts_with(s))
                || ctx.owned_dirs.iter().any(|d| resolved.starts_with(d));
            if !allowed {
                return Err(err(
                    format!("{field}.source"),
                    format!(
                        "{} is neither in the share nor a sandbox file of the agent",
                        source.display()
                    ),
                ));
            }
        } else {
            let typ = m.typ().as_deref().unwrap_or("none");
            if !MOUNT_TYPES.contains(&typ) {
                return Err(err(
                    format!("{field}.type"),
                    format!("{typ:?} is not supported (only {MOUNT_TYPES:?} and binds)"),
                ));
            }
        }
    }
    Ok(())
}

/// Takes the Linux security module fields out of a process (the spec's or
/// an exec's): the guest kernel has no LSM, so libcontainer cannot apply
/// them (it fails reading `/sys/module/apparmor`). Returns what it took,
/// as `field=value` for a log line.
pub fn take_process_lsm(process: &mut Process, prefix: &str) -> Vec<String> {
    let mut taken = Vec::new();
    if let Some(p) = process.apparmor_profile().clone() {
        taken.push(format!("{prefix}apparmorProfile={p}"));
        process.set_apparmor_profile(None);
    }
    if let Some(l) = process.selinux_label().clone() {
        taken.push(format!("{prefix}selinuxLabel={l}"));
        process.set_selinux_label(None);
    }
    taken
}

/// [`take_process_lsm`] for a whole spec, and `linux.mountLabel`.
pub fn take_lsm(spec: &mut Spec) -> Vec<String> {
    let mut taken = Vec::new();
    if let Some(mut process) = spec.process().clone() {
        taken = take_process_lsm(&mut process, "process.");
        spec.set_process(Some(process));
    }
    if let Some(mut linux) = spec.linux().clone() {
        if let Some(l) = linux.mount_label().clone() {
            taken.push(format!("linux.mountLabel={l}"));
            linux.set_mount_label(None);
            spec.set_linux(Some(linux));
        }
    }
    taken
}

/// Checks a process (the spec's or an exec's): args, cwd.
pub fn check_process(process: &Process, prefix: &str) -> Result<(), SpecError> {
    let args = process.args().as_deref().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err(err(format!("{prefix}args"), "must not be empty"));
    }
    if !process.cwd().is_absolute() {
        return Err(err(
            format!("{prefix}cwd"),
            format!("{} is not absolute", process.cwd().display()),
        ));
    }
    Ok(())
}

fn namespace(typ: LinuxNamespaceType, path: Option<&Path>) -> Result<LinuxNamespace, SpecError> {
    let mut b = LinuxNamespaceBuilder::default().typ(typ);
    if let Some(p) = path {
        b = b.path(p.to_path_buf());
    }
    b.build()
        .map_err(|e| err("linux.namespaces", e.to_string()))
}

/// `linux.rootfsPropagation` in the form libcontainer takes. containerd
/// writes the recursive names (`rslave` for a Kubernetes HostToContainer
/// volume, `rshared` for Bidirectional), which runc accepts; libcontainer
/// knows only the plain ones (and applies them recursively to `/` anyway),
/// so `rslave` failed the container at create ("failed to prepare
/// rootfs"). Empty means unset, as for runc.
fn rootfs_propagation(p: &str) -> Result<Option<String>, SpecError> {
    if p.is_empty() {
        return Ok(None);
    }
    match isola_protocol::propagation::parse(p) {
        Some((plain, _)) => Ok(Some(plain.name().to_string())),
        None => Err(err(
            "linux.rootfsPropagation",
            format!(
                "{p:?} is not a mount propagation (shared, slave, private, unbindable, \
                 each also with an r in front)"
            ),
        )),
    }
}

/// Checks and rewrites `spec` for the guest (see the module comment).
pub fn prepare(mut spec: Spec, ctx: &Context<'_>) -> Result<Prepared, SpecError> {
    if !spec.version().starts_with("1.") {
        return Err(err(
            "ociVersion",
            format!("{:?} is not a 1.x runtime spec", spec.version()),
        ));
    }
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| err("process", "missing"))?;
    check_process(&process, "process.")?;
    process.set_terminal(Some(ctx.terminal));
    spec.set_process(Some(process));

    let share = ctx
        .share
        .ok_or_else(|| err("rootfs", "the sandbox has no share to take it from"))?;
    let rootfs = resolve_inside(share, ctx.rootfs, "rootfs")?;
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs);
    spec.set_root(Some(root));

    check_mounts(&spec, ctx)?;
    let ephemeral = rewrite_ephemeral(&mut spec, ctx.ephemeral_dir)?;

    let mut linux = match spec.linux().clone() {
        Some(l) => l,
        None => LinuxBuilder::default()
            .build()
            .map_err(|e| err("linux", e.to_string()))?,
    };
    if linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
        || linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty())
    {
        return Err(err(
            "linux.uidMappings",
            "user namespaces are not supported",
        ));
    }
    if let Some(p) = linux.rootfs_propagation().clone() {
        linux.set_rootfs_propagation(rootfs_propagation(&p)?);
    }
    let joined = |typ| {
        ctx.joined
            .iter()
            .find(|(t, _)| *t == typ)
            .map(|(_, path)| *path)
    };
    let mut namespaces = vec![
        namespace(LinuxNamespaceType::Mount, None)?,
        namespace(LinuxNamespaceType::Pid, joined(LinuxNamespaceType::Pid))?,
        namespace(LinuxNamespaceType::Ipc, joined(LinuxNamespaceType::Ipc))?,
        namespace(LinuxNamespaceType::Uts, joined(LinuxNamespaceType::Uts))?,
        namespace(LinuxNamespaceType::Network, Some(ctx.netns))?,
    ];
    for (i, ns) in linux.namespaces().iter().flatten().enumerate() {
        match ns.typ() {
            LinuxNamespaceType::User => {
                return Err(err(
                    format!("linux.namespaces[{i}]"),
                    "user namespaces are not supported",
                ))
            }
            LinuxNamespaceType::Cgroup | LinuxNamespaceType::Time
                if !namespaces.iter().any(|n| n.typ() == ns.typ()) =>
            {
                namespaces.push(namespace(ns.typ(), None)?);
            }
            _ => {}
        }
    }
    linux.set_namespaces(Some(namespaces));
    linux.set_cgroups_path(Some(
        PathBuf::from(ctx.cgroup_parent).join(ctx.container_id),
    ));
    let seccomp = match linux.seccomp().clone() {
        Some(profile) => Some(seccomp::compile(&profile)?),
        None => None,
    };
    linux.set_seccomp(None);
    spec.set_linux(Some(linux));
    let lsm_taken = take_lsm(&mut spec);
    Ok(Prepared {
        spec,
        seccomp,
        ephemeral,
        lsm_taken,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_propagation_takes_runcs_names() {
        for (given, plain) in [
            ("rshared", Some("shared")),
            ("shared", Some("shared")),
            ("rslave", Some("slave")),
            ("slave", Some("slave")),
            ("rprivate", Some("private")),
            ("runbindable", Some("unbindable")),
            ("", None),
        ] {
            assert_eq!(
                rootfs_propagation(given).ok(),
                Some(plain.map(String::from)),
                "{given}"
            );
        }
        // Through prepare: containerd's HostToContainer spec.
        let s = share();
        let json = r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},
            "linux":{"rootfsPropagation":"rslave"}}"#;
        let p = prepare(spec(json), &ctx(&s, &[])).expect("prepared");
        assert_eq!(
            p.spec
                .linux()
                .as_ref()
                .and_then(|l| l.rootfs_propagation().clone())
                .as_deref(),
            Some("slave")
        );
        let json = json.replace("rslave", "sideways");
        let e = prepare(spec(&json), &ctx(&s, &[])).expect_err("unknown");
        assert_eq!(e.field, "linux.rootfsPropagation", "{e}");
        let e = rootfs_propagation("rsharedd").err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("linux.rootfsPropagation") && e.contains("rsharedd")),
            "{e:?}"
        );
    }

    struct Share {
        dir: tempfile::TempDir,
        root: PathBuf,
    }

    fn share() -> Share {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        std::fs::create_dir_all(root.join("containers/web/rootfs/bin")).expect("rootfs");
        std::fs::create_dir_all(root.join("containers/web/volumes/0")).expect("volume");
        Share { dir, root }
    }

    fn ctx<'a>(share: &'a Share, owned: &'a [&'a Path]) -> Context<'a> {
        Context {
            container_id: "web",
            share: Some(&share.root),
            rootfs: "containers/web/rootfs",
            netns: Path::new("/run/isola/sandbox/netns"),
            cgroup_parent: "/isola",
            owned_dirs: owned,
            ephemeral_dir: Path::new("/run/isola/sandbox/ephemeral"),
            terminal: false,
            joined: &[],
        }
    }

    const MINIMAL: &str = r#"{"ociVersion":"1.0.2","process":{"args":["echo","hi"],"cwd":"/","user":{"uid":0,"gid":0}},
        "root":{"path":"ignored"}}"#;

    fn spec(json: &str) -> Spec {
        parse_json(json).expect("spec JSON")
    }

    #[test]
    fn bad_json_names_the_field() {
        let e = parse_json::<Spec>(r#"{"ociVersion":"1.0.2","process":{"args":"echo"}}"#)
            .expect_err("args is not a list");
        assert_eq!(e.field, "process.args", "{e}");
        let e = parse_json::<Spec>(
            r#"{"ociVersion":"1.0.2","process":{"args":["a"],"cwd":"/","user":{"uid":-1}}}"#,
        )
        .expect_err("negative uid");
        assert_eq!(e.field, "process.user.uid", "{e}");
        let e = parse_json::<Spec>("{not json").expect_err("garbage");
        assert!(e.field.is_empty(), "{e}");
    }

    #[test]
    fn namespaces_cgroup_root_and_terminal_are_set() {
        let s = share();
        let mut c = ctx(&s, &[]);
        c.terminal = true;
        let json = r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},
            "linux":{"namespaces":[{"type":"network","path":"/var/run/netns/host-thing"},{"type":"cgroup"},{"type":"pid"}],
                     "cgroupsPath":"/kubepods/whatever"}}"#;
        let p = prepare(spec(json), &c).expect("prepared");
        let linux = p.spec.linux().as_ref().expect("linux");
        let ns = linux.namespaces().as_ref().expect("namespaces");
        let types: Vec<_> = ns.iter().map(|n| n.typ()).collect();
        assert_eq!(
            types,
            vec![
                LinuxNamespaceType::Mount,
                LinuxNamespaceType::Pid,
                LinuxNamespaceType::Ipc,
                LinuxNamespaceType::Uts,
                LinuxNamespaceType::Network,
                LinuxNamespaceType::Cgroup
            ]
        );
        let net = ns
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Network)
            .expect("net");
        assert_eq!(
            net.path().as_deref(),
            Some(Path::new("/run/isola/sandbox/netns"))
        );
        assert!(ns
            .iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .all(|n| n.path().is_none()));
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/isola/web"))
        );
        assert_eq!(
            p.spec.root().as_ref().map(|r| r.path().clone()),
            Some(s.root.join("containers/web/rootfs"))
        );
        assert_eq!(
            p.spec.process().as_ref().and_then(|p| p.terminal()),
            Some(true)
        );
        assert!(p.seccomp.is_none());
    }

    #[test]
    fn joined_namespaces_replace_new_ones_and_host_paths_are_dropped() {
        let s = share();
        let mut c = ctx(&s, &[]);
        let joined = [
            (
                LinuxNamespaceType::Ipc,
                Path::new("/run/isola/sandbox/ns/ipc"),
            ),
            (
                LinuxNamespaceType::Pid,
                Path::new("/run/isola/sandbox/ns/pid"),
            ),
        ];
        c.joined = &joined;
        // As containerd's CRI writes a pod container's spec: the pause's
        // namespaces by its (host) pid.
        let json = r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},
            "linux":{"namespaces":[{"type":"ipc","path":"/proc/77/ns/ipc"},{"type":"uts","path":"/proc/77/ns/uts"},
                                   {"type":"pid","path":"/proc/77/ns/pid"},{"type":"network","path":"/proc/77/ns/net"},{"type":"mount"}]}}"#;
        let p = prepare(spec(json), &c).expect("prepared");
        let ns = p
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .expect("namespaces");
        let path = |typ| {
            ns.iter()
                .find(|n| n.typ() == typ)
                .map(|n| n.path().clone())
                .expect("namespace present")
        };
        assert_eq!(
            path(LinuxNamespaceType::Ipc).as_deref(),
            Some(Path::new("/run/isola/sandbox/ns/ipc"))
        );
        assert_eq!(
            path(LinuxNamespaceType::Pid).as_deref(),
            Some(Path::new("/run/isola/sandbox/ns/pid"))
        );
        // Not joined: new, whatever host path the spec gave.
        assert_eq!(path(LinuxNamespaceType::Uts), None);
        assert_eq!(path(LinuxNamespaceType::Mount), None);
        assert_eq!(
            path(LinuxNamespaceType::Network).as_deref(),
            Some(Path::new("/run/isola/sandbox/netns"))
        );
    }

    #[test]
    fn rootfs_must_stay_inside_the_share() {
        let s = share();
        std::os::unix::fs::symlink("/etc", s.root.join("containers/escape")).expect("symlink");
        std::os::unix::fs::symlink("../../..", s.root.join("containers/web/up")).expect("symlink");
        for (rootfs, why) in [
            ("../outside", "must not contain .."),
            ("containers/web/../../x", "must not contain .."),
            ("/etc", "must be relative"),
            ("containers/escape", "outside the share"),
            ("containers/web/up", "outside the share"),
            ("containers/nope", "No such file"),
            ("", "must not be empty"),
        ] {
            let s2 = &s;
            let mut c = ctx(s2, &[]);
            c.rootfs = rootfs;
            let e = prepare(spec(MINIMAL), &c).expect_err(rootfs);
            assert_eq!(e.field, "rootfs", "{rootfs}: {e}");
            assert!(e.message.contains(why), "{rootfs}: {e}");
        }
        drop(s.dir);
    }

    #[test]
    fn bind_sources_come_from_the_share_or_the_sandbox() {
        let s = share();
        let owned_dir = tempfile::tempdir().expect("owned");
        let owned = owned_dir.path().canonicalize().expect("canonical");
        std::fs::write(owned.join("resolv.conf"), "nameserver 10.0.0.1\n").expect("write");
        let owned_dirs = [owned.as_path()];
        let c = ctx(&s, &owned_dirs);
        let ok = format!(
            r#"{{"ociVersion":"1.0.2","process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
               "mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},
                         {{"destination":"/data","type":"bind","source":"{}","options":["rbind","rw"]}},
                         {{"destination":"/etc/resolv.conf","type":"none","source":"{}","options":["bind","ro"]}}]}}"#,
            s.root.join("containers/web/volumes/0").display(),
            owned.join("resolv.conf").display()
        );
        prepare(spec(&ok), &c).expect("allowed binds");
        for (mounts, field) in [
            (
                r#"[{"destination":"/x","type":"bind","source":"/etc","options":["rbind"]}]"#,
                "mounts[0].source",
            ),
            (
                r#"[{"destination":"/x","type":"bind","options":["rbind"]}]"#,
                "mounts[0].source",
            ),
            (
                r#"[{"destination":"x","type":"tmpfs","source":"tmpfs"}]"#,
                "mounts[0].destination",
            ),
            (
                r#"[{"destination":"/x","type":"ext4","source":"/dev/vda"}]"#,
                "mounts[0].type",
            ),
        ] {
            let json = format!(
                r#"{{"ociVersion":"1.0.2","process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},"mounts":{mounts}}}"#
            );
            let e = prepare(spec(&json), &c).expect_err(mounts);
            assert_eq!(e.field, field, "{mounts}: {e}");
        }
    }

    #[test]
    fn process_and_namespace_errors_name_the_field() {
        let s = share();
        let c = ctx(&s, &[]);
        for (json, field) in [
            (
                r#"{"ociVersion":"1.0.2","process":{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
                "process.args",
            ),
            (
                r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"rel","user":{"uid":0,"gid":0}}}"#,
                "process.cwd",
            ),
            (r#"{"ociVersion":"1.0.2"}"#, "process"),
            (
                r#"{"ociVersion":"0.9","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
                "ociVersion",
            ),
            (
                r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"linux":{"namespaces":[{"type":"user"}]}}"#,
                "linux.namespaces[0]",
            ),
            (
                r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"linux":{"seccomp":{"defaultAction":"SCMP_ACT_NOTIFY"}}}"#,
                "linux.seccomp.defaultAction",
            ),
        ] {
            let e = prepare(spec(json), &c).expect_err(json);
            assert_eq!(e.field, field, "{json}: {e}");
        }
    }

    #[test]
    fn seccomp_is_taken_out_and_compiled() {
        let s = share();
        let c = ctx(&s, &[]);
        let json = r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},
            "linux":{"seccomp":{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW"}]}}}"#;
        let p = prepare(spec(json), &c).expect("prepared");
        assert!(p.spec.linux().as_ref().expect("linux").seccomp().is_none());
        assert_eq!(p.seccomp.expect("compiled").filters.len(), 1);
    }

    #[test]
    fn lsm_fields_are_taken_out_and_named() {
        let s = share();
        let c = ctx(&s, &[]);
        let json = r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0},
            "apparmorProfile":"cri-containerd.apparmor.d","selinuxLabel":"system_u:system_r:container_t:s0"},
            "linux":{"mountLabel":"system_u:object_r:container_file_t:s0"}}"#;
        let p = prepare(spec(json), &c).expect("prepared");
        let process = p.spec.process().as_ref().expect("process");
        assert_eq!(process.apparmor_profile(), &None);
        assert_eq!(process.selinux_label(), &None);
        assert_eq!(p.spec.linux().as_ref().expect("linux").mount_label(), &None);
        assert_eq!(
            p.lsm_taken,
            [
                "process.apparmorProfile=cri-containerd.apparmor.d",
                "process.selinuxLabel=system_u:system_r:container_t:s0",
                "linux.mountLabel=system_u:object_r:container_file_t:s0"
            ]
        );
        // Without them, nothing is taken and nothing said.
        let plain = r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}}"#;
        assert!(prepare(spec(plain), &c)
            .expect("prepared")
            .lsm_taken
            .is_empty());
        // An exec's process (containerd copies the container's profile).
        let mut exec: Process = parse_json(
            r#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0},"apparmorProfile":"docker-default"}"#,
        )
        .expect("process");
        assert_eq!(
            take_process_lsm(&mut exec, ""),
            ["apparmorProfile=docker-default"]
        );
        assert_eq!(exec.apparmor_profile(), &None);
    }

    fn with_mounts(mounts: &str) -> Spec {
        spec(&format!(
            r#"{{"ociVersion":"1.0.2","process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},"mounts":{mounts}}}"#
        ))
    }

    #[test]
    fn ephemeral_mounts_become_binds_of_the_sandbox_tmpfs() {
        let s = share();
        let c = ctx(&s, &[]);
        let p = prepare(
            with_mounts(
                r#"[{"destination":"/proc","type":"proc","source":"proc"},
                    {"destination":"/mem","type":"isola-ephemeral","source":"mem-0123456789abcdef",
                     "options":["size=8388608","rw","nosuid","nodev"]},
                    {"destination":"/mem-ro","type":"isola-ephemeral","source":"mem-0123456789abcdef",
                     "options":["size=8388608","ro","noexec"]},
                    {"destination":"/big","type":"isola-ephemeral","source":"big_1.x-0"}]"#,
            ),
            &c,
        )
        .expect("prepared");
        assert_eq!(
            p.ephemeral,
            vec![
                Ephemeral {
                    key: "mem-0123456789abcdef".into(),
                    size: Some(8 << 20)
                },
                Ephemeral {
                    key: "big_1.x-0".into(),
                    size: None
                },
            ]
        );
        let mounts: Vec<serde_json::Value> = p
            .spec
            .mounts()
            .iter()
            .flatten()
            .map(|m| serde_json::to_value(m).expect("json"))
            .collect();
        assert_eq!(
            mounts[1..],
            [
                serde_json::json!({"destination": "/mem", "type": "bind",
                    "source": "/run/isola/sandbox/ephemeral/mem-0123456789abcdef",
                    "options": ["rbind", "rprivate", "rw", "nosuid", "nodev"]}),
                serde_json::json!({"destination": "/mem-ro", "type": "bind",
                    "source": "/run/isola/sandbox/ephemeral/mem-0123456789abcdef",
                    "options": ["rbind", "rprivate", "ro", "nosuid", "nodev", "noexec"]}),
                serde_json::json!({"destination": "/big", "type": "bind",
                    "source": "/run/isola/sandbox/ephemeral/big_1.x-0",
                    "options": ["rbind", "rprivate", "rw", "nosuid", "nodev"]}),
            ]
        );
    }

    #[test]
    fn bad_ephemeral_mounts_name_the_field() {
        let s = share();
        let c = ctx(&s, &[]);
        let long = "k".repeat(65);
        let cases = [
            (r#"{"destination":"/m","type":"isola-ephemeral"}"#.to_string(), "mounts[0].source"),
            (r#"{"destination":"/m","type":"isola-ephemeral","source":""}"#.to_string(), "mounts[0].source"),
            (r#"{"destination":"/m","type":"isola-ephemeral","source":".."}"#.to_string(), "mounts[0].source"),
            (r#"{"destination":"/m","type":"isola-ephemeral","source":"a/b"}"#.to_string(), "mounts[0].source"),
            (r#"{"destination":"/m","type":"isola-ephemeral","source":"/run/isola/share"}"#.to_string(), "mounts[0].source"),
            (r#"{"destination":"/m","type":"isola-ephemeral","source":"a b"}"#.to_string(), "mounts[0].source"),
            (format!(r#"{{"destination":"/m","type":"isola-ephemeral","source":"{long}"}}"#), "mounts[0].source"),
            (r#"{"destination":"/m","type":"isola-ephemeral","source":"k","options":["rw","size=0"]}"#.to_string(), "mounts[0].options[1]"),
            (r#"{"destination":"/m","type":"isola-ephemeral","source":"k","options":["size=-1"]}"#.to_string(), "mounts[0].options[0]"),
            (r#"{"destination":"/m","type":"isola-ephemeral","source":"k","options":["size=+5"]}"#.to_string(), "mounts[0].options[0]"),
            (r#"{"destination":"/m","type":"isola-ephemeral","source":"k","options":["size=8m"]}"#.to_string(), "mounts[0].options[0]"),
            (r#"{"destination":"/m","type":"isola-ephemeral","source":"k","options":["size=1125899906842625"]}"#.to_string(), "mounts[0].options[0]"),
            (r#"{"destination":"/m","type":"isola-ephemeral","source":"k","options":["size=1","size=1"]}"#.to_string(), "mounts[0].options[1]"),
            (r#"{"destination":"/m","type":"isola-ephemeral","source":"k","options":["ro","rw"]}"#.to_string(), "mounts[0].options[1]"),
            (r#"{"destination":"/m","type":"isola-ephemeral","source":"k","options":["rbind"]}"#.to_string(), "mounts[0].options[0]"),
            (r#"{"destination":"/m","type":"isola-ephemeral","source":"k","options":["suid"]}"#.to_string(), "mounts[0].options[0]"),
            (r#"{"destination":"m","type":"isola-ephemeral","source":"k"}"#.to_string(), "mounts[0].destination"),
        ];
        for (mount, field) in cases {
            let e = prepare(with_mounts(&format!("[{mount}]")), &c).expect_err(&mount);
            assert_eq!(e.field, field, "{mount}: {e}");
        }
        // The largest size passes.
        let p = prepare(
            with_mounts(r#"[{"destination":"/m","type":"isola-ephemeral","source":"k","options":["size=1125899906842624"]}]"#),
            &c,
        )
        .expect("1 PiB");
        assert_eq!(p.ephemeral[0].size, Some(MAX_EPHEMERAL_SIZE));
    }
}
