//! The guest's base file systems, mounted by the agent as PID 1.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use anyhow::{Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;
use nix::unistd::mkdir;

/// One mount the agent makes at boot.
#[derive(Debug, Clone, Copy)]
pub struct BaseMount {
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In mount order: a target's parent is mounted before it.
pub const BASE_MOUNTS: &[BaseMount] = &[
    BaseMount {
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    BaseMount {
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    BaseMount {
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    BaseMount {
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    BaseMount {
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    BaseMount {
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    BaseMount {
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    BaseMount {
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
];

/// Mounts [`BASE_MOUNTS`] and adds the usual /dev links.
pub fn mount_base() -> Result<()> {
    for m in BASE_MOUNTS {
        if let Err(err) = mkdir(m.target, Mode::from_bits_truncate(0o755)) {
            if err != nix::errno::Errno::EEXIST {
                return Err(err).with_context(|| format!("creating mount point {}", m.target));
            }
        }
        mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data)
            .with_context(|| format!("mounting {} on {}", m.fstype, m.target))?;
        tracing::debug!(target = m.target, fstype = m.fstype, "mounted");
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/ptmx", "pts/ptmx"),
    ] {
        // devtmpfs may already provide /dev/ptmx as a node; the pts instance
        // we mounted needs the link, so replace it.
        if Path::new(link).symlink_metadata().is_ok() {
            fs::remove_file(link).with_context(|| format!("replacing {link}"))?;
        }
        symlink(to, link).with_context(|| format!("linking {link} -> {to}"))?;
    }
    Ok(())
}

/// A line of `/proc/self/mountinfo`: where and what is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub target: String,
    pub fstype: String,
}

/// Parses `/proc/self/mountinfo` (see proc(5)); malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let target = fields.get(4)?;
            // Optional fields end at a lone "-"; the fs type follows it.
            let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
            let fstype = fields.get(sep + 1)?;
            Some(MountInfo {
                target: unescape_octal(target),
                fstype: (*fstype).to_string(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "\
1 1 0:2 / / rw - rootfs rootfs rw
20 1 0:19 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
25 21 0:23 / /sys/fs/cgroup rw,nosuid shared:9 master:2 - cgroup2 cgroup2 rw,nsdelegate
26 1 0:24 / /with\\040space rw - tmpfs tmpfs rw
garbage
";
        let mounts = parse_mountinfo(text);
        assert_eq!(
            mounts,
            vec![
                MountInfo {
                    target: "/".into(),
                    fstype: "rootfs".into()
                },
                MountInfo {
                    target: "/proc".into(),
                    fstype: "proc".into()
                },
                MountInfo {
                    target: "/sys/fs/cgroup".into(),
                    fstype: "cgroup2".into()
                },
                MountInfo {
                    target: "/with space".into(),
                    fstype: "tmpfs".into()
                },
            ]
        );
    }

    #[test]
    fn base_mounts_come_after_their_parents() {
        for (i, m) in BASE_MOUNTS.iter().enumerate() {
            let parent = Path::new(m.target).parent().map(|p| p.to_path_buf());
            if let Some(parent) = parent.filter(|p| p != Path::new("/")) {
                let covering = BASE_MOUNTS
                    .iter()
                    .position(|o| parent.starts_with(o.target));
                if let Some(j) = covering {
                    assert!(j < i, "{} is mounted before its parent", m.target);
                }
            }
        }
    }
}
