//! The container's OCI spec for `isola run`: a bundle's config.json, or a
//! default one like `runc spec` makes, with the command-line flags applied.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use isola_sandbox::rootfs::{ImageRoot, MAX_IMAGE_FILE};
use oci_spec::runtime::{Root, Spec};

/// What the flags ask of the process.
#[derive(Debug, Clone, Default)]
pub struct ProcessFlags {
    pub args: Vec<String>,
    pub terminal: bool,
    pub user: Option<(u32, Option<u32>)>,
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub hostname: Option<String>,
    pub read_only: bool,
}

/// Parses `UID[:GID]` (numbers).
pub fn parse_user(text: &str) -> Result<(u32, Option<u32>), String> {
    let (uid, gid) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    let uid = uid
        .parse::<u32>()
        .map_err(|_| format!("--user {text:?}: the uid {uid:?} is not a number"))?;
    let gid = gid
        .map(|g| {
            g.parse::<u32>()
                .map_err(|_| format!("--user {text:?}: the gid {g:?} is not a number"))
        })
        .transpose()?;
    Ok((uid, gid))
}

/// Checks `K=V`.
pub fn parse_env(text: &str) -> Result<String, String> {
    match text.split_once('=') {
        Some((key, _)) if !key.is_empty() && !key.contains('\0') => Ok(text.to_string()),
        _ => Err(format!("--env {text:?}: expected KEY=VALUE")),
    }
}

/// A `/etc/passwd` entry's name, gid and home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub gid: u32,
    pub home: String,
}

/// Reads the image file `path` (relative to the rootfs's root, opened
/// safely: [`ImageRoot::read_file`]); `None` when it does not exist.
fn image_file(rootfs: &Path, path: &str) -> Result<Option<String>> {
    let image = ImageRoot::open(rootfs)?;
    image
        .read_file(Path::new(path), MAX_IMAGE_FILE)
        .with_context(|| format!("--user: reading the image's {path}"))
}

/// The passwd entry of `uid` in the rootfs, if any.
pub fn passwd_entry(rootfs: &Path, uid: u32) -> Result<Option<PasswdEntry>> {
    let Some(text) = image_file(rootfs, "/etc/passwd")? else {
        return Ok(None);
    };
    Ok(text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[2].parse::<u32>().ok()? != uid {
            return None;
        }
        Some(PasswdEntry {
            name: f[0].to_string(),
            gid: f[3].parse().ok()?,
            home: f[5].to_string(),
        })
    }))
}

/// The gids of the groups in the rootfs's `/etc/group` that list `name`.
pub fn supplementary_gids(rootfs: &Path, name: &str) -> Result<Vec<u32>> {
    let Some(text) = image_file(rootfs, "/etc/group")? else {
        return Ok(Vec::new());
    };
    let mut gids: Vec<u32> = text
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || !f[3].split(',').any(|m| m.trim() == name) {
                return None;
            }
            f[2].parse().ok()
        })
        .collect();
    gids.sort_unstable();
    gids.dedup();
    Ok(gids)
}

/// A `--bundle DIR`'s spec and the host path of its rootfs.
pub fn load_bundle(bundle: &Path) -> Result<(Spec, PathBuf)> {
    let config = bundle.join("config.json");
    let spec = Spec::load(&config).with_context(|| format!("reading {}", config.display()))?;
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .with_context(|| format!("{}: root.path is missing", config.display()))?;
    let rootfs = if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    };
    Ok((spec, rootfs))
}

/// The default spec (runc's: proc, dev, devpts, shm, mqueue, sysfs
/// mounts; its capabilities, masked and read-only paths, RLIMIT_NOFILE
/// 1024; the pid, network, ipc, uts and mount namespaces).
pub fn default_spec(rootfs: &Path) -> Spec {
    let mut spec = Spec::default();
    let mut root = Root::default();
    root.set_path(rootfs.to_path_buf())
        .set_readonly(Some(false));
    spec.set_root(Some(root));
    spec.set_hostname(Some("isola".to_string()));
    spec
}

/// Applies the flags to `spec` (a bundle's or the default).
pub fn apply(spec: &mut Spec, rootfs: &Path, flags: &ProcessFlags) -> Result<()> {
    let mut process = spec.process().clone().unwrap_or_default();
    if !flags.args.is_empty() {
        process.set_args(Some(flags.args.clone()));
    }
    process.set_terminal(Some(flags.terminal));
    let mut env = process.env().clone().unwrap_or_default();
    if let Some((uid, gid)) = flags.user {
        let entry = passwd_entry(rootfs, uid)?;
        let gid = gid.or(entry.as_ref().map(|e| e.gid)).unwrap_or(0);
        let mut user = process.user().clone();
        user.set_uid(uid).set_gid(gid);
        let extra = entry
            .as_ref()
            .map(|e| supplementary_gids(rootfs, &e.name))
            .transpose()?
            .unwrap_or_default();
        user.set_additional_gids((!extra.is_empty()).then_some(extra));
        process.set_user(user);
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            let home = entry.map(|e| e.home).unwrap_or_else(|| "/".to_string());
            env.push(format!("HOME={home}"));
        }
    } else if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push("HOME=/root".to_string());
    }
    for var in &flags.env {
        let key = var.split('=').next().unwrap_or_default();
        env.retain(|e| e.split('=').next() != Some(key));
        env.push(var.clone());
    }
    process.set_env(Some(env));
    if let Some(cwd) = &flags.cwd {
        if !cwd.starts_with('/') {
            bail!("--cwd {cwd:?}: not an absolute path");
        }
        process.set_cwd(PathBuf::from(cwd));
    }
    spec.set_process(Some(process));
    if let Some(hostname) = &flags.hostname {
        spec.set_hostname(Some(hostname.clone()));
    }
    if flags.read_only {
        if let Some(root) = spec.root_mut() {
            root.set_readonly(Some(true));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(tmp.path().join("etc")).expect("mkdir");
        std::fs::write(
            tmp.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\nbad line\n",
        )
        .expect("passwd");
        std::fs::write(
            tmp.path().join("etc/group"),
            "root:x:0:\nuser:x:1000:\naudio:x:29:user\nvideo:x:44:other,user\nstaff:x:50:other\n",
        )
        .expect("group");
        tmp
    }

    #[test]
    fn users_and_env_parse() {
        assert_eq!(parse_user("1000"), Ok((1000, None)));
        assert_eq!(parse_user("1000:100"), Ok((1000, Some(100))));
        assert!(parse_user("bob").unwrap_err().contains("uid \"bob\""));
        assert!(parse_user("1:x").unwrap_err().contains("gid \"x\""));
        assert_eq!(parse_env("A=b=c"), Ok("A=b=c".to_string()));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("NOVALUE").is_err());
    }

    #[test]
    fn a_fifo_as_the_images_passwd_is_refused_at_once() {
        let tmp = rootfs();
        let passwd = tmp.path().join("etc/passwd");
        std::fs::remove_file(&passwd).expect("rm");
        nix::unistd::mkfifo(&passwd, nix::sys::stat::Mode::from_bits_truncate(0o644))
            .expect("fifo");
        let mut spec = default_spec(tmp.path());
        let flags = ProcessFlags {
            user: Some((1000, None)),
            ..ProcessFlags::default()
        };
        // Opening a FIFO for reading would block until a writer came.
        let err = format!(
            "{:#}",
            apply(&mut spec, tmp.path(), &flags).expect_err("a fifo")
        );
        assert!(err.contains("/etc/passwd in the rootfs"), "{err}");
        assert!(err.contains("a FIFO, not a regular file"), "{err}");
        // A link out of the rootfs to a host file reads nothing of it.
        std::fs::remove_file(&passwd).expect("rm");
        std::os::unix::fs::symlink("../../../../../../etc/hostname", &passwd).expect("link");
        apply(&mut spec, tmp.path(), &flags).expect("no passwd inside");
        assert_eq!(spec.process().as_ref().map(|p| p.user().gid()), Some(0));
    }

    #[test]
    fn the_default_spec_is_runcs_with_the_flags() {
        let tmp = rootfs();
        let mut spec = default_spec(tmp.path());
        let flags = ProcessFlags {
            args: vec!["id".into(), "-G".into()],
            terminal: true,
            user: Some((1000, None)),
            env: vec!["FOO=bar".into(), "PATH=/bin".into()],
            cwd: Some("/tmp".into()),
            hostname: Some("box".into()),
            read_only: true,
        };
        apply(&mut spec, tmp.path(), &flags).expect("apply");
        let process = spec.process().clone().expect("process");
        assert_eq!(process.args().clone().unwrap_or_default(), ["id", "-G"]);
        assert_eq!(process.terminal(), Some(true));
        assert_eq!(process.user().uid(), 1000);
        assert_eq!(process.user().gid(), 1000);
        assert_eq!(process.user().additional_gids(), &Some(vec![29, 44]));
        let env = process.env().clone().unwrap_or_default();
        assert!(env.contains(&"FOO=bar".to_string()));
        assert!(env.contains(&"HOME=/home/user".to_string()));
        assert_eq!(env.iter().filter(|e| e.starts_with("PATH=")).count(), 1);
        assert!(env.contains(&"PATH=/bin".to_string()));
        assert_eq!(process.cwd(), Path::new("/tmp"));
        assert_eq!(spec.hostname().as_deref(), Some("box"));
        assert_eq!(spec.root().as_ref().and_then(|r| r.readonly()), Some(true));
        // runc's defaults are there.
        let dests: Vec<String> = spec
            .mounts()
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|m| m.destination().display().to_string())
            .collect();
        for want in [
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/shm",
            "/dev/mqueue",
            "/sys",
        ] {
            assert!(dests.contains(&want.to_string()), "{want} in {dests:?}");
        }
        let linux = spec.linux().clone().expect("linux");
        assert!(linux.masked_paths().as_ref().is_some_and(|p| !p.is_empty()));
        assert!(linux
            .readonly_paths()
            .as_ref()
            .is_some_and(|p| !p.is_empty()));
        assert!(process.capabilities().is_some());
        assert!(process.rlimits().as_ref().is_some_and(|r| !r.is_empty()));

        let flags = ProcessFlags {
            cwd: Some("rel".into()),
            ..ProcessFlags::default()
        };
        assert!(apply(&mut spec, tmp.path(), &flags).is_err());
    }

    #[test]
    fn an_explicit_gid_wins_and_unknown_users_get_gid_0() {
        let tmp = rootfs();
        let mut spec = default_spec(tmp.path());
        let flags = ProcessFlags {
            user: Some((1000, Some(7))),
            ..ProcessFlags::default()
        };
        apply(&mut spec, tmp.path(), &flags).expect("apply");
        let user = spec.process().clone().expect("process").user().clone();
        assert_eq!((user.uid(), user.gid()), (1000, 7));
        let flags = ProcessFlags {
            user: Some((4242, None)),
            ..ProcessFlags::default()
        };
        apply(&mut spec, tmp.path(), &flags).expect("apply");
        let process = spec.process().clone().expect("process");
        assert_eq!((process.user().uid(), process.user().gid()), (4242, 0));
        assert_eq!(process.user().additional_gids(), &None);
    }

    #[test]
    fn bundles_resolve_their_root_path() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let spec = default_spec(Path::new("rootfs"));
        std::fs::write(
            tmp.path().join("config.json"),
            serde_json::to_vec(&spec).expect("json"),
        )
        .expect("write");
        let (_, rootfs) = load_bundle(tmp.path()).expect("bundle");
        assert_eq!(rootfs, tmp.path().join("rootfs"));
        let err = load_bundle(&tmp.path().join("nope")).expect_err("no bundle");
        assert!(format!("{err:#}").contains("config.json"), "{err:#}");
    }
}
