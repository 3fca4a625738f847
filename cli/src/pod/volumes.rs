//! Volumes made on the host the way kubelet makes them, so containerd and
//! the runtime see what they would see under kubelet: emptyDir directories
//! (a tmpfs mounted there for medium Memory), hostPath checks, and
//! configMap files behind kubelet's atomically swapped `..data` symlink.

use std::fs;
use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::cri::{PodPaths, PreparedVolume};
use super::manifest::{HostPathType, Pod, VolumeKind};

pub const EMPTY_DIR: &str = "kubernetes.io~empty-dir";
pub const CONFIG_MAP: &str = "kubernetes.io~configmap";
const DATA: &str = "..data";

/// Makes every volume of `pod`; on error, what was made is undone.
pub fn prepare(pod: &Pod, paths: &PodPaths) -> Result<Vec<PreparedVolume>> {
    let mut done = Vec::new();
    for volume in &pod.spec.volumes {
        let at = format!("volume {:?}", volume.name);
        let result = (|| -> Result<PathBuf> {
            Ok(match volume.kind()? {
                VolumeKind::HostPath { path, typ } => host_path(Path::new(&path), typ)?,
                VolumeKind::EmptyDir { memory, size_limit } => {
                    let dir = paths.volume_dir(EMPTY_DIR, &volume.name);
                    make_dir(&dir, 0o777)?;
                    if memory {
                        let size = size_limit.map(|s| format!(",size={s}")).unwrap_or_default();
                        mount(
                            Some("tmpfs"),
                            &dir,
                            Some("tmpfs"),
                            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                            Some(format!("mode=0777{size}").as_str()),
                        )
                        .with_context(|| format!("mounting a tmpfs on {}", dir.display()))?;
                    }
                    dir
                }
                VolumeKind::ConfigMap { data } => {
                    let dir = paths.volume_dir(CONFIG_MAP, &volume.name);
                    make_dir(&dir, 0o755)?;
                    write_atomic(&dir, &data)?;
                    dir
                }
            })
        })();
        match result {
            Ok(host_path) => done.push(PreparedVolume {
                name: volume.name.clone(),
                host_path,
            }),
            Err(err) => {
                let _ = remove(paths);
                return Err(err.context(at));
            }
        }
    }
    for c in &pod.spec.containers {
        touch_termination_log(paths, &c.name, 0)?;
    }
    Ok(done)
}

/// The empty file kubelet mounts at `/dev/termination-log`.
pub fn touch_termination_log(paths: &PodPaths, container: &str, attempt: u32) -> Result<()> {
    let file = paths.termination_log(container, attempt);
    if let Some(dir) = file.parent() {
        make_dir(dir, 0o755)?;
    }
    fs::File::create(&file).with_context(|| format!("creating {}", file.display()))?;
    fs::set_permissions(&file, fs::Permissions::from_mode(0o666))
        .with_context(|| format!("chmod {}", file.display()))?;
    Ok(())
}

/// Writes the configMap volumes of `pod` again with its (new) data.
pub fn update_config_maps(pod: &Pod, paths: &PodPaths) -> Result<usize> {
    let mut n = 0;
    for volume in &pod.spec.volumes {
        if let VolumeKind::ConfigMap { data } = volume.kind()? {
            let dir = paths.volume_dir(CONFIG_MAP, &volume.name);
            write_atomic(&dir, &data).with_context(|| format!("volume {:?}", volume.name))?;
            n += 1;
        }
    }
    Ok(n)
}

fn make_dir(dir: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    // The umask must not narrow it.
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", dir.display()))
}

fn host_path(path: &Path, typ: HostPathType) -> Result<PathBuf> {
    let meta = fs::metadata(path);
    match typ {
        HostPathType::Any => {}
        HostPathType::Directory => match meta {
            Ok(m) if m.is_dir() => {}
            _ => bail!(
                "hostPath {}: not a directory (type Directory)",
                path.display()
            ),
        },
        HostPathType::File => match meta {
            Ok(m) if m.is_file() => {}
            _ => bail!("hostPath {}: not a file (type File)", path.display()),
        },
        HostPathType::DirectoryOrCreate => {
            if meta.is_err() {
                make_dir(path, 0o755)?;
            } else if !path.is_dir() {
                bail!("hostPath {}: exists and is not a directory", path.display());
            }
        }
        HostPathType::FileOrCreate => {
            if meta.is_err() {
                if let Some(parent) = path.parent() {
                    make_dir(parent, 0o755)?;
                }
                fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
            } else if !path.is_file() {
                bail!("hostPath {}: exists and is not a file", path.display());
            }
        }
    }
    Ok(path.to_path_buf())
}

/// kubelet's atomic writer: the files go into a fresh `..<stamp>`
/// directory, the `..data` symlink is swapped to it with one rename, and
/// each key is a symlink through `..data`. A reader sees the old set or
/// the new one, never a mix.
pub fn write_atomic(dir: &Path, data: &std::collections::BTreeMap<String, String>) -> Result<()> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let version = format!("..{stamp}");
    let version_dir = dir.join(&version);
    make_dir(&version_dir, 0o755)?;
    for (key, value) in data {
        let file = version_dir.join(key);
        fs::write(&file, value).with_context(|| format!("writing {}", file.display()))?;
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644))
            .with_context(|| format!("chmod {}", file.display()))?;
    }
    let old = fs::read_link(dir.join(DATA)).ok();
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    symlink(&version, &tmp).with_context(|| format!("symlink {}", tmp.display()))?;
    fs::rename(&tmp, dir.join(DATA))
        .with_context(|| format!("swapping {}/{DATA}", dir.display()))?;
    for key in data.keys() {
        let link = dir.join(key);
        if fs::symlink_metadata(&link).is_err() {
            symlink(Path::new(DATA).join(key), &link)
                .with_context(|| format!("symlink {}", link.display()))?;
        }
    }
    // Keys that are gone, and the old version.
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !data.contains_key(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }
    if let Some(old) = old {
        if old != Path::new(&version) && old.to_string_lossy().starts_with("..") {
            let _ = fs::remove_dir_all(dir.join(old));
        }
    }
    Ok(())
}

/// Unmounts the pod's memory volumes and removes its directory.
pub fn remove(paths: &PodPaths) -> Result<()> {
    let empty = paths.dir.join("volumes").join(EMPTY_DIR);
    if let Ok(entries) = fs::read_dir(&empty) {
        for entry in entries.flatten() {
            // Unmount until nothing is mounted there (EINVAL: not a mount).
            for _ in 0..8 {
                if umount2(&entry.path(), MntFlags::MNT_DETACH).is_err() {
                    break;
                }
            }
        }
    }
    if mounted_under(&paths.dir)? {
        bail!(
            "{}: something is still mounted under it; not removing it",
            paths.dir.display()
        );
    }
    match fs::remove_dir_all(&paths.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", paths.dir.display())),
    }
}

fn mounted_under(dir: &Path) -> Result<bool> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let prefix = format!("{}/", dir.display());
    Ok(info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| m == dir.to_string_lossy() || m.starts_with(&prefix))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn config_map_swaps_data_atomically_and_drops_old_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut data = BTreeMap::new();
        data.insert("a".to_string(), "1".to_string());
        data.insert("b".to_string(), "2".to_string());
        write_atomic(dir.path(), &data).expect("first");
        assert_eq!(
            fs::read_to_string(dir.path().join("a")).ok().as_deref(),
            Some("1")
        );
        let first = fs::read_link(dir.path().join(DATA)).expect("..data");
        data.insert("a".to_string(), "one".to_string());
        data.remove("b");
        write_atomic(dir.path(), &data).expect("second");
        assert_eq!(
            fs::read_to_string(dir.path().join("a")).ok().as_deref(),
            Some("one")
        );
        assert!(fs::symlink_metadata(dir.path().join("b")).is_err());
        assert!(
            !dir.path().join(first).exists(),
            "the old version is removed"
        );
        assert_eq!(
            fs::read_link(dir.path().join("a")).ok(),
            Some(PathBuf::from("..data/a"))
        );
    }

    #[test]
    fn host_path_types_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        assert!(host_path(&file, HostPathType::File).is_err());
        host_path(&file, HostPathType::FileOrCreate).expect("created");
        assert!(file.is_file());
        let err = format!(
            "{:#}",
            host_path(&file, HostPathType::Directory).expect_err("file")
        );
        assert!(err.contains("not a directory"), "{err}");
        let sub = dir.path().join("d/e");
        host_path(&sub, HostPathType::DirectoryOrCreate).expect("created");
        assert!(sub.is_dir());
        host_path(&sub, HostPathType::Any).expect("any");
    }
}
