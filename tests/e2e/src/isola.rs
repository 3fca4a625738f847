//! isola-vmm, as the shim will run it: a child process with its console on
//! a pipe, a control API socket and a hybrid vsock socket in a scratch dir.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use isola_vmm::api::{self, Request};

use crate::console::Console;
use crate::GuestImages;

/// The command line tests boot with (the VMM adds console and devices).
pub use crate::qemu::BASE_CMDLINE as TEST_CMDLINE;

/// How many isola-vmm processes of this test process ended because their
/// guest reset itself (a reboot or triple fault), as their log says.
pub static GUEST_RESETS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The release binary `make` builds.
pub fn vmm_binary() -> Result<PathBuf> {
    crate::containers::release_binary("isola-vmm")
}

#[derive(Debug, Clone)]
pub struct IsolaConfig {
    pub images: GuestImages,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub extra_cmdline: String,
    /// Console on a pipe (read by the test) or off.
    pub console: bool,
    /// Console into this file, capped at this many bytes (`--console-limit`)
    /// instead of the pipe.
    pub console_file: Option<(PathBuf, u64)>,
    /// Console on a pipe that nobody reads (the VMM must not block on it).
    pub unread_console: bool,
    pub vsock: bool,
    pub echo: bool,
    /// More isola-vmm arguments (e.g. `--fs ...`).
    pub extra_args: Vec<String>,
    /// Start as a clone of the template saved in this directory
    /// (`--restore`): no kernel, initrd, command line, vCPUs or memory.
    pub restore: Option<PathBuf>,
}

impl IsolaConfig {
    pub fn new(images: GuestImages) -> Self {
        IsolaConfig {
            images,
            vcpus: 1,
            memory_mib: 256,
            extra_cmdline: String::new(),
            console: true,
            console_file: None,
            unread_console: false,
            vsock: true,
            echo: true,
            extra_args: Vec::new(),
            restore: None,
        }
    }
}

/// A running isola-vmm; killed on drop if still running.
#[derive(Debug)]
pub struct IsolaVm {
    child: Child,
    pub console: Console,
    pub api_socket: PathBuf,
    pub vsock_socket: Option<PathBuf>,
    pub started: Instant,
    stderr: Arc<Mutex<Vec<String>>>,
    _unread_console: Option<std::process::ChildStdout>,
}

impl IsolaVm {
    pub fn start(config: &IsolaConfig, scratch: &Path) -> Result<IsolaVm> {
        let api_socket = scratch.join("api.sock");
        let vsock_socket = config.vsock.then(|| scratch.join("vsock.sock"));
        let mut cmd = Command::new(vmm_binary()?);
        match &config.restore {
            Some(dir) => {
                cmd.arg("--restore").arg(dir);
            }
            None => {
                cmd.arg("--kernel")
                    .arg(&config.images.kernel)
                    .arg("--initrd")
                    .arg(&config.images.initrd)
                    .arg("--cmdline")
                    .arg(format!("{TEST_CMDLINE} {}", config.extra_cmdline).trim_end())
                    .arg("--vcpus")
                    .arg(config.vcpus.to_string())
                    .arg("--memory")
                    .arg(config.memory_mib.to_string());
            }
        }
        cmd.arg("--api-socket").arg(&api_socket).arg("--console");
        match &config.console_file {
            Some((path, limit)) => {
                cmd.arg(path).arg("--console-limit").arg(limit.to_string());
            }
            None => {
                cmd.arg(if config.console { "stdout" } else { "off" });
            }
        }
        if let Some(v) = &vsock_socket {
            cmd.arg("--vsock").arg(v);
        }
        cmd.args(&config.extra_args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().context("starting isola-vmm")?;
        let stdout = child.stdout.take().context("isola-vmm stdout")?;
        // An unread console keeps the pipe open and never reads it; the
        // pipe is made small (4 KiB) so a guest fills it quickly.
        let (console_source, unread): (Box<dyn std::io::Read + Send>, _) = if config.unread_console
        {
            use std::os::fd::AsRawFd;
            // SAFETY: F_SETPIPE_SZ on a pipe we own; failure is harmless.
            unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
            (Box::new(std::io::empty()), Some(stdout))
        } else {
            (Box::new(stdout), None)
        };
        let stderr = child.stderr.take().context("isola-vmm stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("vmm| {line}");
                if line.contains("VM ended exit=Reset") {
                    GUEST_RESETS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                if let Ok(mut l) = log2.lock() {
                    l.push(line);
                }
            }
        });
        Ok(IsolaVm {
            child,
            console: Console::spawn(console_source, config.echo),
            _unread_console: unread,
            api_socket,
            vsock_socket,
            started,
            stderr: log,
        })
    }

    /// Calls the control API, waiting for its socket to appear.
    pub fn api(&self, request: Request) -> Result<serde_json::Value> {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            match api::call(&self.api_socket, &request, Duration::from_secs(60)) {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() >= until => {
                    return Err(e).with_context(|| format!("API {request:?}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `isola-agent ready`; on failure the error also says what
    /// each of the VMM's threads was doing (kernel wait channel and stack),
    /// which tells a hung guest (vCPU in KVM_RUN) from a blocked VMM.
    pub fn wait_ready(&mut self) -> Result<String> {
        match self.console.wait_for(crate::READY, crate::BOOT_DEADLINE) {
            Ok(line) => Ok(line),
            Err(err) => Err(err.context(format!(
                "isola-vmm threads:\n{}\nVMM log:\n{}",
                thread_report(self.pid()),
                self.log().join("\n")
            ))),
        }
    }

    /// The VMM's log lines so far.
    pub fn log(&self) -> Vec<String> {
        self.stderr.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits for the VMM to exit by itself.
    pub fn wait_exit(&mut self, deadline: Duration) -> Result<ExitStatus> {
        crate::wait_child_exit(&mut self.child, &mut self.console, "isola-vmm", deadline)
    }

    /// Waits for the VMM to exit by itself; also says how long that took
    /// from the call (to within 20 ms), before reading the console's rest.
    pub fn wait_exit_timed(&mut self, deadline: Duration) -> Result<(ExitStatus, Duration)> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                let took = started.elapsed();
                self.console.drain(Duration::from_secs(2));
                return Ok((status, took));
            }
            if started.elapsed() >= deadline {
                bail!(
                    "isola-vmm still running after {deadline:?}; console:\n{}",
                    self.console.tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for IsolaVm {
    fn drop(&mut self) {
        crate::kill_and_reap(&mut self.child);
    }
}

/// One line per thread of `pid`: name, state, wait channel, top of the
/// kernel stack.
pub fn thread_report(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(process {pid} is gone)");
    };
    for task in tasks.flatten() {
        let p = task.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit(") ")
            .next()
            .and_then(|r| r.split(' ').next())
            .unwrap_or("?");
        let stack: Vec<String> = read("stack").lines().take(4).map(str::to_string).collect();
        out.push_str(&format!(
            "{} state={} wchan={} stack={:?}\n",
            read("comm").trim(),
            state,
            read("wchan").trim(),
            stack
        ));
    }
    out
}
