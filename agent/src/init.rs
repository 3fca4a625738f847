//! PID 1 duties: reaping orphans and an orderly shutdown.
//!
//! The guest has no other init. Every process whose parent dies is
//! re-parented to the agent, so it reaps on each SIGCHLD; SIGTERM, and
//! SIGINT (what the kernel sends init on Ctrl-Alt-Del once the agent has
//! disabled the immediate reboot) or SIGPWR, start a shutdown: every process
//! gets SIGTERM, then SIGKILL after the grace period, file systems are
//! synced, and the guest reboots. With `reboot=k` the reboot reaches the VMM
//! as a keyboard-controller reset, which ends the VMM.

use std::time::{Duration, Instant};

use std::os::unix::fs::OpenOptionsExt;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::reboot::{reboot, set_cad_enabled, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{sync, Pid};
use tokio::signal::unix::{signal, Signal as SignalStream, SignalKind};

/// Makes Ctrl-Alt-Del send SIGINT to init instead of rebooting at once.
pub fn disable_ctrl_alt_del() -> Result<()> {
    set_cad_enabled(false).context("disabling the Ctrl-Alt-Del reboot")
}

/// Where reaped statuses go besides the log (the container API's process
/// table, `service::State::on_reaped`).
type ExitHook = Box<dyn Fn(WaitStatus) + Send + Sync>;
static EXIT_HOOK: std::sync::OnceLock<ExitHook> = std::sync::OnceLock::new();

/// Sets the hook every reaped status is given to (once).
pub fn set_exit_hook(hook: ExitHook) {
    let _ = EXIT_HOOK.set(hook);
}

/// Reaps every child that has exited; returns how many.
///
/// `waitpid(-1)` takes any child's status: libcontainer's own waits (its
/// intermediate process, hooks) must never run at the same time. They do
/// not: the agent has one thread and libcontainer runs on it, inside RPC
/// handlers, while this runs from the SIGCHLD task (see `service`).
pub fn reap_exited() -> usize {
    let mut reaped = 0;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return reaped,
            Ok(status) => {
                reaped += 1;
                tracing::debug!(?status, "reaped");
                if let Some(hook) = EXIT_HOOK.get() {
                    hook(status);
                }
            }
            Err(Errno::EINTR) => continue,
            Err(err) => {
                tracing::warn!(%err, "waitpid failed");
                return reaped;
            }
        }
    }
}

/// True when the agent has no child left.
fn no_children() -> bool {
    matches!(
        waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)),
        Err(Errno::ECHILD)
    )
}

/// The signals PID 1 acts on. Create them before announcing readiness: a
/// signal that reaches init before its handler is installed is dropped by
/// the kernel.
#[derive(Debug)]
pub struct InitSignals {
    child: SignalStream,
    term: SignalStream,
    int: SignalStream,
    pwr: SignalStream,
}

impl InitSignals {
    /// Installs the handlers; needs a running tokio runtime.
    pub fn install() -> Result<InitSignals> {
        Ok(InitSignals {
            child: signal(SignalKind::child()).context("watching SIGCHLD")?,
            term: signal(SignalKind::terminate()).context("watching SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("watching SIGINT")?,
            pwr: signal(SignalKind::from_raw(libc_sigpwr())).context("watching SIGPWR")?,
        })
    }

    /// Reaps orphans until a shutdown signal arrives, or `power_off` is
    /// notified (DestroySandbox; reported as SIGPWR), and returns that
    /// signal.
    pub async fn serve_until_shutdown(&mut self, power_off: &tokio::sync::Notify) -> Signal {
        loop {
            tokio::select! {
                _ = self.child.recv() => { reap_exited(); }
                _ = power_off.notified() => return Signal::SIGPWR,
                _ = self.term.recv() => return Signal::SIGTERM,
                _ = self.int.recv() => return Signal::SIGINT,
                _ = self.pwr.recv() => return Signal::SIGPWR,
            }
        }
    }
}

fn libc_sigpwr() -> i32 {
    Signal::SIGPWR as i32
}

/// Stops every other process: SIGTERM, up to `grace` for them to exit,
/// then SIGKILL.
pub async fn terminate_all(grace: Duration) {
    // kill(-1) reaches every process but init itself.
    match kill(Pid::from_raw(-1), Signal::SIGTERM) {
        Ok(()) => {}
        Err(Errno::ESRCH) => return,
        Err(err) => tracing::warn!(%err, "sending SIGTERM to all processes"),
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        reap_exited();
        if no_children() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!(
        grace_ms = grace.as_millis() as u64,
        "processes still running; sending SIGKILL"
    );
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !no_children() && Instant::now() < deadline {
        reap_exited();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Lets the console tty send what it holds, syncs file systems and reboots
/// the guest; with `reboot=k` the VMM exits. (A reboot drops what the tty
/// still buffers: the last lines, a fatal error's among them.)
pub fn power_off() -> ! {
    use std::os::fd::AsFd;
    for fd in [std::io::stdout().as_fd(), std::io::stderr().as_fd()] {
        // ENOTTY when the console is off (stdio is /dev/null): nothing to wait for.
        let _ = nix::sys::termios::tcdrain(fd);
    }
    sync();
    let err = match reboot(RebootMode::RB_AUTOBOOT) {
        Ok(never) => match never {},
        Err(err) => err,
    };
    // Only reachable without CAP_SYS_BOOT, which PID 1 always has.
    eprintln!("isola-agent: reboot failed: {err}");
    std::process::abort();
}

/// The boot timer's "init is ready" value (Firecracker's convention).
const BOOT_TIMER_MAGIC: u8 = 123;

/// Writes the boot-timer byte at guest-physical `addr` through /dev/mem,
/// so the VMM can record when the agent became ready.
pub fn signal_boot_timer(addr: u64) -> Result<()> {
    use std::os::fd::AsFd;
    let page = addr & !0xfff;
    let offset = (addr & 0xfff) as usize;
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open("/dev/mem")
        .context("opening /dev/mem")?;
    let len = std::num::NonZeroUsize::new(4096).context("page size")?;
    // SAFETY: a fresh shared mapping of one page of /dev/mem at a
    // page-aligned offset; nothing else refers to it, and it is unmapped
    // below.
    let ptr = unsafe {
        nix::sys::mman::mmap(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_WRITE,
            nix::sys::mman::MapFlags::MAP_SHARED,
            mem.as_fd(),
            i64::try_from(page).context("boot timer address")?,
        )
    }
    .with_context(|| format!("mapping the boot timer at {addr:#x}"))?;
    // SAFETY: offset < 4096, inside the page just mapped; a volatile write
    // is how MMIO must be touched.
    unsafe {
        std::ptr::write_volatile(ptr.as_ptr().cast::<u8>().add(offset), BOOT_TIMER_MAGIC);
        let _ = nix::sys::mman::munmap(ptr, 4096);
    }
    Ok(())
}
