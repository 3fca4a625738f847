//! isola-agent: the init (PID 1) of every isola microVM.
//!
//! At boot it mounts the guest's base file systems, reads its options from
//! `agent.*` kernel arguments, sets the hostname, enables the cgroup v2
//! controllers, serves its ttrpc API on vsock port 1024, and prints
//! `isola-agent ready`. It then reaps orphans until it is asked to shut
//! down (SIGTERM, or Ctrl-Alt-Del from the VMM), and then stops its API and
//! every process, syncs and reboots, which ends the VMM.

mod cgroups;
mod cgstats;
mod config;
mod events;
mod executor;
mod gueststats;
mod identity;
mod init;
mod kmsg;
mod logstream;
mod mounts;
mod network;
mod procs;
mod propagation;
mod rpc;
mod sandbox;
mod seccomp;
mod service;
mod spec;
mod streams;
mod switchroot;

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use isola_protocol::AGENT_VSOCK_PORT;
use nix::unistd::{getpid, sethostname};
use tracing_subscriber::filter::LevelFilter;

use crate::config::Config;

/// Locks `m`, taking the data of a poisoned mutex as it is: a panic
/// elsewhere must not take the agent's tables (PID 1's) with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn main() {
    if getpid().as_raw() != 1 {
        eprintln!(
            "isola-agent: must run as PID 1, the init of an isola guest (pid is {}); \
             it is started by the guest kernel from the initrd",
            getpid()
        );
        std::process::exit(2);
    }
    let started = Instant::now();
    ensure_stdio();
    // Before anything is mounted; on success this re-executes /init.
    let root = switchroot::at_boot();
    if let Err(err) = run(started, root) {
        eprintln!("isola-agent: fatal: {err:#}");
        init::power_off();
    }
}

fn run(started: Instant, root: switchroot::Outcome) -> Result<()> {
    // `ps` and /proc/1/comm in the guest name the agent, not "init".
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes from the pointer, which is valid.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"isola-agent".as_ptr(), 0, 0, 0);
    }
    // Nothing can be logged before /proc (for the command line) and /dev
    // exist; the kernel gave us /dev/console as stdio from the initrd.
    mounts::mount_base().context("mounting the base file systems")?;
    let cmdline = fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
    let (config, errors) = Config::from_cmdline(&cmdline);
    init_logging(&config);
    for err in &errors {
        tracing::error!("bad kernel argument: {err}");
    }
    for key in &config.unknown {
        tracing::warn!("unknown option agent.{key} ignored");
    }
    tracing::debug!(?config, "options");
    let kmsg = kmsg::open()
        .map_err(|err| tracing::warn!("the kernel's log (/dev/kmsg) is not followed: {err}"))
        .ok();
    // Whether containers can pivot_root is the kernel's word, whatever the
    // switch reported: the mount on / must not be the initramfs.
    // Read once: the state report below lists the same mounts.
    let mountinfo = fs::read_to_string("/proc/self/mountinfo");
    let pivot = match &mountinfo {
        Ok(text) => !switchroot::root_is_initramfs(text),
        Err(err) => {
            tracing::error!("reading /proc/self/mountinfo: {err}");
            false
        }
    };
    root.log(pivot);

    sethostname(&config.hostname)
        .with_context(|| format!("setting the hostname to {}", config.hostname))?;
    let controllers = cgroups::enable_controllers(Path::new("/sys/fs/cgroup"))
        .context("enabling cgroup v2 controllers")?;
    init::disable_ctrl_alt_del()?;

    let mountinfo = mountinfo.context("reading /proc/self/mountinfo")?;
    tracing::info!("{}", state_report(&mountinfo, &controllers)?);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let shutdown_timeout = config.shutdown_timeout;
    let boot_timer = config.boot_timer;
    let template = config.template;
    runtime.block_on(async move {
        let mut signals = init::InitSignals::install()?;
        if let Some(kmsg) = kmsg {
            tokio::spawn(kmsg::follow(kmsg));
        }
        // The container service: its process table takes the statuses the
        // reaper collects.
        let registry = std::sync::Arc::new(streams::Registry::new(
            streams::MAX_PENDING,
            streams::UNCLAIMED_TIMEOUT,
        ));
        let state = service::State::new(registry.clone(), pivot);
        if template {
            state.prepare_sandbox();
        }
        let hook_state = state.clone();
        init::set_exit_hook(Box::new(move |status| hook_state.on_reaped(status)));
        if let Err(err) = streams::listen(registry) {
            tracing::error!("stdio and log streams unavailable: {err:#}");
        }
        // The API listens before the ready line, so a host that saw it can
        // dial at once. A guest without vsock still boots, without the API.
        let agent = service::AgentService::new(state.clone());
        let api = match rpc::ApiServer::start_vsock(AGENT_VSOCK_PORT, Some(agent)).await {
            Ok(api) => Some(api),
            Err(err) => {
                tracing::error!("agent API unavailable: {err:#}");
                None
            }
        };
        if let Some(addr) = boot_timer {
            if let Err(err) = init::signal_boot_timer(addr) {
                tracing::debug!("boot timer not signalled: {err:#}");
            }
        }
        // The version is part of the literal, so that `isola check` finds
        // `isola-agent ready: version=X ` in the initrd's /init.
        println!(
            concat!(
                "isola-agent ready: version=",
                env!("CARGO_PKG_VERSION"),
                " uptime_ms={} setup_ms={}"
            ),
            uptime_ms().unwrap_or(0),
            started.elapsed().as_millis()
        );
        let signal = signals.serve_until_shutdown(&state.power_off).await;
        tracing::info!(%signal, "shutting down");
        if let Some(api) = api {
            api.shutdown().await;
        }
        init::terminate_all(shutdown_timeout).await;
        anyhow::Ok(())
    })?;
    tracing::info!("powering off");
    init::power_off();
}

/// Without a console (the VMM's `--console off`) the kernel starts init with
/// fds 0-2 closed; point them at /dev/null (shipped in the initrd) so a
/// later socket or file can never land on them and receive log lines.
fn ensure_stdio() {
    use std::os::fd::IntoRawFd;
    for fd in 0..=2 {
        // SAFETY: F_GETFD only queries the descriptor table; any integer
        // is a valid argument (a closed one gives EBADF).
        let closed = unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1
            && nix::errno::Errno::last() == nix::errno::Errno::EBADF;
        if closed {
            match fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                // open() returns the lowest free fd: the one we are filling.
                Ok(file) => {
                    let _ = file.into_raw_fd();
                }
                Err(_) => return,
            }
        }
    }
}

fn init_logging(config: &Config) {
    logstream::capture_console();
    // libcontainer warns about things the agent does itself (seccomp) and
    // logs every step at debug: only its errors, unless the agent's level
    // is debug or trace.
    let level = LevelFilter::from_level(config.log_level);
    let quiet = if level <= LevelFilter::INFO {
        ",libcontainer=error,libcgroups=error"
    } else {
        ""
    };
    let filter = tracing_subscriber::EnvFilter::try_new(format!("{level}{quiet}"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.to_string()));
    // The console and the host's log stream (logstream).
    tracing_subscriber::fmt()
        .with_writer(logstream::TeeWriter::new(
            config.console_level.unwrap_or(config.log_level),
        ))
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .init();
}

/// One line describing what the agent set up, read back from the kernel
/// (`mountinfo` is `/proc/self/mountinfo`).
fn state_report(mountinfo: &str, controllers: &[String]) -> Result<String> {
    let mounts: Vec<String> = mounts::parse_mountinfo(mountinfo)
        .into_iter()
        .map(|m| format!("{}:{}", m.target, m.fstype))
        .collect();
    let hostname = nix::unistd::gethostname()
        .context("reading the hostname")?
        .to_string_lossy()
        .into_owned();
    let cpus = fs::read_to_string("/proc/cpuinfo")
        .map(|t| t.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    let mem_total_kib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    Ok(format!(
        "state: hostname={hostname} cpus={cpus} mem_total_kib={mem_total_kib} mounts={} \
         cgroup_subtree_control={} crng_ready={}",
        mounts.join(","),
        controllers.join(","),
        crng_ready()
    ))
}

/// Whether the kernel's random number generator is seeded: getrandom
/// without blocking succeeds only then. (Tells whether the guest needs a
/// virtio-rng device to avoid blocking early.)
fn crng_ready() -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: getrandom writes at most `len` (1) bytes into the buffer.
    let n = unsafe { libc::getrandom(byte.as_mut_ptr().cast(), 1, libc::GRND_NONBLOCK) };
    n == 1
}

fn uptime_ms() -> Option<u64> {
    let text = fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1000.0) as u64)
}
