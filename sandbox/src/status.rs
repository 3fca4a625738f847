//! A sandbox's status file, `status.json` in its run directory: what the
//! process running the sandbox (the shim, `isola run`) knows of it, kept
//! current as containers come and go, for readers that are not that
//! process (`isola ps`). It is replaced whole (written beside, renamed),
//! root-only like the directory, and goes with the directory.
//!
//! A reader must not trust it further than the run directory it is in:
//! it is bounded in size, and the pids it names are checked against
//! /proc (the process may be gone, and its pid reused) by whoever uses
//! them.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The file's name in the run directory.
pub const STATUS_FILE: &str = "status.json";

/// Largest status file read (a sandbox has at most a few hundred
/// containers).
pub const MAX_STATUS_BYTES: u64 = 1 << 20;

/// What a sandbox's runner knows of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub id: String,
    /// containerd's namespace (empty for `isola run`).
    pub namespace: String,
    /// The process that runs the sandbox: the shim, or `isola run`.
    pub runner_pid: u32,
    pub vmm_pid: u32,
    pub virtiofsd_pid: u32,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// When the sandbox was up (Unix time, ms).
    pub started_unix_ms: u64,
    /// Whether its VM is a clone of a template.
    pub template: bool,
    /// The host cgroup its helpers run in, if it has one of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cgroup: Option<std::path::PathBuf>,
    pub containers: BTreeMap<String, ContainerStatus>,
    /// How long its start took, phase by phase (`isola monitor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<Startup>,
}

/// When each phase of a sandbox's start ended, in ms since the start
/// began (the runner's clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Startup {
    /// virtiofsd's socket is up.
    pub virtiofsd_up_ms: u64,
    /// The VM is ready: its agent answered (booted, or cloned from a
    /// template).
    pub vm_ready_ms: u64,
    /// The sandbox is created in the guest: the start is over.
    pub sandbox_ready_ms: u64,
}

/// One container of the sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStatus {
    /// created, running, paused or exited.
    pub state: String,
    /// Its init process's pid in the guest.
    pub guest_pid: u32,
    /// Its exit status, once exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// How long creating it took, in ms: its mounts, stdio and the
    /// agent's CreateContainer (`isola monitor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_ms: Option<u64>,
}

/// Writes `status` into `dir` (a temporary file beside it, renamed over
/// the old one).
pub fn write(dir: &Path, status: &Status) -> io::Result<()> {
    write_json(dir, STATUS_FILE, status)
}

/// Reads the status file of the run directory `dir` (without following a
/// link, at most [`MAX_STATUS_BYTES`]).
pub fn read(dir: &Path) -> io::Result<Status> {
    read_json(dir, STATUS_FILE, MAX_STATUS_BYTES)
}

/// The counters file in the run directory: what the runner counts as the
/// sandbox runs and no other file says (`isola monitor`).
pub const COUNTERS_FILE: &str = "counters.json";

/// Largest counters file read.
pub const MAX_COUNTERS_BYTES: u64 = 4096;

/// What a sandbox's runner counts, since the sandbox started. Rewritten
/// (at most once a second) when a count changes; absent: all zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// The agent's log lines the sandbox's log gate dropped (over its
    /// rate, or above the configured level).
    #[serde(default)]
    pub agent_log_lines_dropped: u64,
}

/// Writes `counters` into `dir` (replaced whole, like the status file).
pub fn write_counters(dir: &Path, counters: &Counters) -> io::Result<()> {
    write_json(dir, COUNTERS_FILE, counters)
}

/// Reads the counters of the run directory `dir`: all zero when the file
/// does not exist (nothing counted yet).
pub fn read_counters(dir: &Path) -> io::Result<Counters> {
    match read_json(dir, COUNTERS_FILE, MAX_COUNTERS_BYTES) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Counters::default()),
        other => other,
    }
}

/// `value` as JSON into `dir/name`: a temporary file beside it, root-only
/// and never through a link, renamed over the old one.
fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> io::Result<()> {
    let text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    file.write_all(&text)?;
    drop(file);
    std::fs::rename(&tmp, dir.join(name)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The JSON of `dir/name`, read without following a link, at most `max`
/// bytes.
fn read_json<T: serde::de::DeserializeOwned>(dir: &Path, name: &str, max: u64) -> io::Result<T> {
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    let mut text = Vec::new();
    file.take(max + 1).read_to_end(&mut text)?;
    if text.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {max} bytes", path.display()),
        ));
    }
    serde_json::from_slice(&text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Status {
            id: "s1".into(),
            namespace: "k8s.io".into(),
            runner_pid: 10,
            vmm_pid: 11,
            virtiofsd_pid: 12,
            vcpus: 2,
            memory_mib: 512,
            started_unix_ms: 1_700_000_000_000,
            template: true,
            host_cgroup: Some("/sys/fs/cgroup/k8s.io/s1".into()),
            containers: BTreeMap::new(),
            startup: Some(Startup {
                virtiofsd_up_ms: 40,
                vm_ready_ms: 300,
                sandbox_ready_ms: 320,
            }),
        };
        write(dir.path(), &s).unwrap();
        assert_eq!(read(dir.path()).unwrap(), s);
        s.containers.insert(
            "c1".into(),
            ContainerStatus {
                state: "exited".into(),
                guest_pid: 35,
                exit_status: Some(0),
                create_ms: Some(25),
            },
        );
        write(dir.path(), &s).unwrap();
        assert_eq!(read(dir.path()).unwrap(), s);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(STATUS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nothing left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_file_without_the_newer_fields_reads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(STATUS_FILE),
            r#"{"id":"old","namespace":"","runner_pid":1,"vmm_pid":2,"virtiofsd_pid":3,
               "vcpus":1,"memory_mib":256,"started_unix_ms":5,"template":false,
               "containers":{"c":{"state":"running","guest_pid":9}}}"#,
        )
        .unwrap();
        let s = read(dir.path()).unwrap();
        assert_eq!(s.startup, None);
        assert_eq!(s.containers["c"].create_ms, None);
    }

    #[test]
    fn a_bad_or_huge_or_linked_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATUS_FILE), "{").unwrap();
        assert!(read(dir.path()).is_err());
        std::fs::write(
            dir.path().join(STATUS_FILE),
            vec![b' '; MAX_STATUS_BYTES as usize + 1],
        )
        .unwrap();
        let err = read(dir.path()).unwrap_err();
        assert!(err.to_string().contains("larger"), "{err}");
        std::fs::remove_file(dir.path().join(STATUS_FILE)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join(STATUS_FILE)).unwrap();
        assert!(read(dir.path()).is_err());
    }

    #[test]
    fn counters_are_zero_until_written_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_counters(dir.path()).unwrap(), Counters::default());
        let c = Counters {
            agent_log_lines_dropped: 9800,
        };
        write_counters(dir.path(), &c).unwrap();
        assert_eq!(read_counters(dir.path()).unwrap(), c);
        // A file from a newer runner with more counters reads.
        std::fs::write(
            dir.path().join(COUNTERS_FILE),
            r#"{"agent_log_lines_dropped":3,"later":1}"#,
        )
        .unwrap();
        assert_eq!(
            read_counters(dir.path()).unwrap().agent_log_lines_dropped,
            3
        );
        std::fs::write(
            dir.path().join(COUNTERS_FILE),
            vec![b' '; MAX_COUNTERS_BYTES as usize + 1],
        )
        .unwrap();
        assert!(read_counters(dir.path()).is_err());
        std::fs::remove_file(dir.path().join(COUNTERS_FILE)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join(COUNTERS_FILE)).unwrap();
        assert!(read_counters(dir.path()).is_err());
    }
}
