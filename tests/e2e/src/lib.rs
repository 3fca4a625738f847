//! Helpers for isola's end-to-end tests: boot real microVMs on a KVM host
//! and watch their consoles.
//!
//! The tests in `tests/` run only on a host whose `/dev/kvm` boots standard
//! guests; `tests/kvm-host/run` provides one (natively or emulated) and sets
//! `ISOLA_KVM_HOST`. Every wait is for an event (a console line, a process
//! exit) with a generous deadline, because the emulated host is slow.

pub mod agent;
pub mod boot;
pub mod console;
pub mod containerd;
pub mod containers;
pub mod docker;
pub mod isola;
pub mod pods;
pub mod procstat;
pub mod pss;
pub mod qemu;
pub mod report;
pub mod virtiofsd;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};

/// Deadline for a boot to `isola-agent ready`. Natively a boot takes well
/// under a second; the emulated host is 10-20x slower and noisy.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(180);

/// Deadline for a guest to shut down once asked.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(120);

/// The line the agent prints once it is ready.
pub const READY: &str = "isola-agent ready";

/// The first `name` on PATH.
pub fn which(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("{name} not found on PATH"))
}

/// The project's root directory.
pub fn project_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// The guest kernel and initrd that `make` leaves in `build/`.
#[derive(Debug, Clone)]
pub struct GuestImages {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestImages {
    pub fn from_build_dir() -> Result<GuestImages> {
        let build = project_dir().join("build");
        let images = GuestImages {
            kernel: build.join("vmlinux"),
            initrd: build.join("initrd.img"),
        };
        for path in [&images.kernel, &images.initrd] {
            if !path.exists() {
                bail!("{} is missing: run `make` first", path.display());
            }
        }
        Ok(images)
    }

    /// The guest kernel with the test-only hostile initrd
    /// (`build/hostile-initrd.img`, `make hostile-initrd`).
    pub fn hostile() -> Result<GuestImages> {
        let initrd = project_dir().join("build/hostile-initrd.img");
        if !initrd.exists() {
            bail!("{} is missing: run `make hostile-initrd`", initrd.display());
        }
        Ok(GuestImages {
            initrd,
            ..GuestImages::from_build_dir()?
        })
    }
}

/// Fails unless running on a KVM host prepared by `tests/kvm-host/run`.
pub fn require_kvm_host() -> Result<String> {
    match std::env::var("ISOLA_KVM_HOST") {
        Ok(host) if host == "native" || host == "emulated" => Ok(host),
        _ => bail!(
            "end-to-end tests need a KVM host that boots standard guests: \
             run them through tests/kvm-host/run (as `make test` does)"
        ),
    }
}

/// The agent's `state: k=v ...` console line as key/value pairs.
pub fn state_fields(line: &str) -> std::collections::BTreeMap<String, String> {
    line.split_once("state: ")
        .map(|(_, s)| s)
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The value of a `--runs N` argument, from 1 to `max`.
pub fn parse_runs(value: Option<String>, max: usize) -> Result<usize> {
    let v = value.ok_or_else(|| anyhow::anyhow!("--runs needs a number"))?;
    v.parse()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| anyhow::anyhow!("--runs {v:?}: expected a number from 1 to {max}"))
}

/// The command line of a program whose only option is `--runs N`
/// (default 5, at most 50).
pub fn runs_from_args(program: &str) -> Result<usize> {
    let mut runs = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = parse_runs(args.next(), 50)?,
            other => anyhow::bail!("unknown argument {other:?} (usage: {program} [--runs N])"),
        }
    }
    Ok(runs)
}

/// Waits for a VMM process to exit by itself, then collects the rest of
/// its console; `what` names it in the error.
pub fn wait_child_exit(
    child: &mut std::process::Child,
    console: &mut console::Console,
    what: &str,
    deadline: Duration,
) -> Result<std::process::ExitStatus> {
    let until = std::time::Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait()? {
            console.drain(Duration::from_secs(2));
            return Ok(status);
        }
        if std::time::Instant::now() >= until {
            bail!(
                "{what} still running after {deadline:?}; console:\n{}",
                console.tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills a VMM process and reaps it, waiting at most 30 s: a process stuck
/// in the kernel (uninterruptible) must not hang the whole test run.
pub fn kill_and_reap(child: &mut std::process::Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = child.kill();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "process {} did not exit 30 s after SIGKILL (stuck in the kernel); left behind",
        child.id()
    );
}

/// A fresh scratch directory for one test, removed on drop.
#[derive(Debug)]
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Result<Scratch> {
        let path = std::env::temp_dir().join(format!(
            "isola-e2e-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(Scratch { path })
    }
}

impl Scratch {
    /// The same in `/run` (tmpfs, where the run root and the templates
    /// live), or in the temporary directory where `/run` is not a
    /// directory.
    pub fn in_run(name: &str) -> Result<Scratch> {
        let base = std::path::Path::new("/run");
        if !base.is_dir() {
            return Scratch::new(name);
        }
        let path = base.join(format!("isola-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Scratch { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The median of samples (the upper one of an even count; 0 for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}
