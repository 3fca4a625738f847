//! Helpers for the container tests: the binaries and images `make` builds,
//! the busybox rootfs, sandbox configs, OCI specs, and output checks.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use isola_sandbox::{ExitStatus, Sandbox, SandboxConfig, StdioRequest};
use oci_spec::runtime::{Process, Root, Spec};

use crate::{project_dir, GuestImages, BOOT_DEADLINE};

/// The busybox rootfs `make e2e` builds (tests/rootfs/busybox), as the
/// container tests use it: in an emulated KVM host, a copy on a local file
/// system (its /var/tmp tmpfs), made once per test process. The project
/// directory there is itself a virtio-fs mount of the outer machine, and a
/// virtiofsd serving a tree that lives on virtio-fs fails some requests
/// with ESTALE (libcontainer's mknod of /dev/null, for one): nested shares
/// are a property of the test rig, not what a host runs containers from.
pub fn busybox_rootfs() -> Result<PathBuf> {
    static LOCAL: std::sync::OnceLock<std::result::Result<PathBuf, String>> =
        std::sync::OnceLock::new();
    let built = project_dir().join("build/busybox-rootfs");
    if !built.join("bin/busybox").exists() {
        bail!(
            "{} is missing: run `make e2e` (it builds the busybox rootfs)",
            built.display()
        );
    }
    if std::env::var("ISOLA_KVM_HOST").as_deref() != Ok("emulated") {
        return Ok(built);
    }
    LOCAL
        .get_or_init(|| {
            let dir = PathBuf::from(format!("/var/tmp/isola-e2e-rootfs-{}", std::process::id()));
            let copy = dir.join("busybox-rootfs");
            let copied = std::fs::create_dir_all(&dir)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    std::process::Command::new("cp")
                        .arg("-a")
                        .arg(&built)
                        .arg(&dir)
                        .status()
                        .map_err(|e| e.to_string())
                })
                .and_then(|status| {
                    if status.success() {
                        Ok(copy)
                    } else {
                        Err(format!("cp exited with {status}"))
                    }
                });
            copied.map_err(|e| format!("copying {} to {}: {e}", built.display(), dir.display()))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// `target/release/<name>`, built by `make`.
pub fn release_binary(name: &str) -> Result<PathBuf> {
    let path = project_dir().join("target/release").join(name);
    if !path.exists() {
        bail!("{} is missing: run `make` first", path.display());
    }
    Ok(path)
}

/// The Rust virtiofsd `make` installs (or $ISOLA_VIRTIOFSD).
pub fn virtiofsd() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ISOLA_VIRTIOFSD") {
        return Ok(PathBuf::from(path));
    }
    let cache = std::env::var_os("ISOLA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/isola")))
        .context("neither ISOLA_CACHE nor HOME is set")?;
    let path = cache.join("tools/bin/virtiofsd");
    if !path.exists() {
        bail!("{} is missing: run `make` first", path.display());
    }
    Ok(path)
}

/// A run root of this test process's own under /run/isola (a tmpfs in the
/// emulated host), so leftovers are easy to see.
pub fn run_root(test: &str) -> PathBuf {
    PathBuf::from(format!("/run/isola/e2e-{test}-{}", std::process::id()))
}

/// The sandbox directories under `run_root` (`<run_root>/<namespace>/<id>`).
pub fn sandbox_dirs(run_root: &Path) -> Vec<PathBuf> {
    let entries = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    entries(run_root)
        .iter()
        .flat_map(|ns| entries(ns))
        .collect()
}

/// Removes a test's run root once its sandboxes are gone (the namespace
/// directories the sandboxes leave, then the root; anything else stays).
pub fn remove_run_root(run_root: &Path) {
    if let Ok(d) = std::fs::read_dir(run_root) {
        for e in d.flatten() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
    let _ = std::fs::remove_dir(run_root);
}

/// Where the consoles of the tests' guests go (the project's build dir is
/// writable from the emulated host and survives it).
pub fn console_file(name: &str) -> PathBuf {
    let dir = project_dir().join("build/e2e-containers");
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{name}.console"))
}

/// Sends the sandbox library's logs (the helpers' output among them:
/// isola-vmm's and virtiofsd's lines, the agent's log stream) to the
/// test's captured output, shown when it fails. `ISOLA_E2E_LOG` sets the
/// filter (default `info`). Once per process; later calls do nothing.
pub fn log_to_test_output() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ISOLA_E2E_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A sandbox config for a test: the build's images, 1 vCPU, `memory_mib`,
/// a console file, generous deadlines for the emulated host.
pub fn sandbox_config(id: &str, run_root: &Path, memory_mib: u32) -> Result<SandboxConfig> {
    let images = GuestImages::from_build_dir()?;
    let mut config = SandboxConfig::new(
        id,
        crate::isola::vmm_binary()?,
        virtiofsd()?,
        images.kernel,
        images.initrd,
    );
    config.memory_mib = memory_mib;
    config.run_root = run_root.to_path_buf();
    config.kernel_cmdline_extra = "quiet".to_string();
    config.console = isola_sandbox::Console::File(console_file(id));
    config.start_timeout = BOOT_DEADLINE;
    config.stop_timeout = Duration::from_secs(30);
    config.hostname = "isola-e2e".to_string();
    Ok(config)
}

/// The last lines of a sandbox's console file, for failure messages.
pub fn console_tail(id: &str, lines: usize) -> String {
    let text = std::fs::read_to_string(console_file(id)).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A process running `args` with runc's defaults.
pub fn process(args: &[&str]) -> Process {
    let mut process = Process::default();
    process.set_args(Some(args.iter().map(|a| a.to_string()).collect()));
    process
}

/// runc's default spec over `rootfs`, read-only unless `writable`, running
/// `args`.
pub fn spec(rootfs: &Path, args: &[&str]) -> Spec {
    let mut spec = Spec::default();
    let mut root = Root::default();
    root.set_path(rootfs.to_path_buf()).set_readonly(Some(true));
    spec.set_root(Some(root));
    spec.set_hostname(Some("isola-e2e".to_string()));
    spec.set_process(Some(process(args)));
    spec
}

/// Stdout and stderr streams, no stdin.
pub const OUT_ERR: StdioRequest = StdioRequest {
    stdin: false,
    stdout: true,
    stderr: true,
    terminal: None,
};

/// What a finished process printed, and how it ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Execs `process` in `cid`, collects its (small) output, waits for it.
pub async fn exec_collect(
    sandbox: &Sandbox,
    cid: &str,
    exec_id: &str,
    process: &Process,
) -> Result<Finished> {
    let started = sandbox
        .exec(cid, exec_id, process, OUT_ERR)
        .await
        .with_context(|| format!("exec {exec_id} in {cid}"))?;
    collect(sandbox, cid, exec_id, started.io).await
}

/// Waits for a process, collecting its output (bounded: 1 MiB each).
pub async fn collect(
    sandbox: &Sandbox,
    cid: &str,
    exec_id: &str,
    mut io: isola_sandbox::ProcessIo,
) -> Result<Finished> {
    let mut out = Bounded::new(1 << 20);
    let mut err = Bounded::new(1 << 20);
    let status = sandbox
        .wait_with_output(
            cid,
            exec_id,
            io.stdout.take(),
            io.stderr.take(),
            &mut out,
            &mut err,
        )
        .await
        .with_context(|| format!("waiting for {cid}/{exec_id}"))?;
    Ok(Finished {
        status,
        stdout: String::from_utf8_lossy(&out.data).into_owned(),
        stderr: String::from_utf8_lossy(&err.data).into_owned(),
    })
}

/// A writer that keeps at most `limit` bytes (a test's output buffer must
/// be bounded too) and counts the rest.
#[derive(Debug)]
pub struct Bounded {
    pub data: Vec<u8>,
    pub dropped: u64,
    limit: usize,
}

impl Bounded {
    pub fn new(limit: usize) -> Bounded {
        Bounded {
            data: Vec::new(),
            dropped: 0,
            limit,
        }
    }
}

impl tokio::io::AsyncWrite for Bounded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let room = self.limit.saturating_sub(self.data.len()).min(buf.len());
        self.data.extend_from_slice(&buf[..room]);
        self.dropped += (buf.len() - room) as u64;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Checks a stream against a repeating pattern as it passes (nothing is
/// kept): `len` bytes seen, the first wrong offset if any. Compared a slice
/// at a time against the pattern laid end to end (a memcmp, fast in the
/// test's unoptimised build too: byte by byte, the check itself held the
/// 100 MiB stream test back in the emulated host).
#[derive(Debug)]
pub struct PatternCheck {
    /// The pattern repeated to at least [`PatternCheck::TILE`] bytes, plus
    /// one more copy, so that any offset into the pattern starts a long run.
    tiled: Vec<u8>,
    period: usize,
    pub len: u64,
    pub first_bad: Option<u64>,
}

impl PatternCheck {
    const TILE: usize = 64 << 10;

    pub fn new(pattern: &[u8]) -> PatternCheck {
        let copies = if pattern.is_empty() {
            0
        } else {
            Self::TILE.div_ceil(pattern.len()) + 1
        };
        PatternCheck {
            tiled: pattern.repeat(copies),
            period: pattern.len(),
            len: 0,
            first_bad: None,
        }
    }
}

impl tokio::io::AsyncWrite for PatternCheck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut done = 0;
        while self.first_bad.is_none() && self.period > 0 && done < buf.len() {
            let at = self.len + done as u64;
            let off = (at % self.period as u64) as usize;
            // off < period, so the tile has more than TILE bytes from off.
            let take = (buf.len() - done).min(self.tiled.len() - off);
            let (got, want) = (&buf[done..done + take], &self.tiled[off..off + take]);
            if got != want {
                let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                self.first_bad = Some(at + i as u64);
            }
            done += take;
        }
        self.len += buf.len() as u64;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Mount points at or below `dir` in this mount namespace.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    isola_sandbox::share::mounts_under(dir).unwrap_or_default()
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    isola_sandbox::child::alive(pid)
}

/// Fails unless the sandbox left nothing: no directory, no mount below
/// the run root, no VMM or virtiofsd process.
pub fn assert_nothing_left(run_root: &Path, dir: &Path, pids: &[(String, u32)]) -> Result<()> {
    if dir.exists() {
        bail!("{} is still there", dir.display());
    }
    let mounts = mounts_below(run_root);
    if !mounts.is_empty() {
        bail!("mounts left below {}: {mounts:?}", run_root.display());
    }
    for (name, pid) in pids {
        if process_alive(*pid) {
            bail!("{name} (pid {pid}) still runs");
        }
        // Nor anything it forked (each helper leads a process group).
        let members = group_members(*pid);
        if !members.is_empty() {
            bail!("{name}'s process group {pid} still has {members:?}");
        }
    }
    Ok(())
}

/// Live processes whose process group is `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // "pid (comm) S ppid pgrp ..."
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            fields.first().is_some_and(|s| *s != "Z" && *s != "X")
                && fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
        })
        .collect()
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after
/// `deadline` naming `what`.
pub async fn poll_until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= until {
            bail!("{what}: not within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::PatternCheck;
    use tokio::io::AsyncWriteExt;

    fn stream(pattern: &[u8], len: usize) -> Vec<u8> {
        pattern.iter().copied().cycle().take(len).collect()
    }

    async fn check(data: &[u8], chunks: &[usize]) -> PatternCheck {
        let mut c = PatternCheck::new(b"abcdefg\n");
        let mut rest = data;
        for &n in chunks.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let n = n.min(rest.len());
            c.write_all(&rest[..n]).await.expect("writing to the check");
            rest = &rest[n..];
        }
        c
    }

    #[tokio::test]
    async fn a_stream_in_any_chunks_matches_and_a_wrong_byte_is_found_where_it_is() {
        let good = stream(b"abcdefg\n", 300_000);
        for chunks in [&[1usize, 7, 13][..], &[65536], &[200_000], &[4095, 3]] {
            let c = check(&good, chunks).await;
            assert_eq!((c.len, c.first_bad), (300_000, None), "{chunks:?}");
            for at in [0usize, 7, 8, 65_543, 299_999] {
                let mut bad = good.clone();
                bad[at] ^= 0x20;
                let c = check(&bad, chunks).await;
                assert_eq!(
                    (c.len, c.first_bad),
                    (300_000, Some(at as u64)),
                    "{chunks:?}"
                );
            }
        }
    }
}
