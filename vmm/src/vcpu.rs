//! vCPUs: one thread each, running KVM_RUN and routing exits to the buses.
//!
//! The VMM pauses vCPUs by setting the shared run state and kicking each
//! thread out of KVM_RUN with a signal ([`KICK_SIGNAL`]); a paused thread
//! waits on a condition variable until it is resumed or told to stop.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::Bus;

/// vCPU threads run shallow code (exit handling on the buses). A small
/// stack also keeps it from being backed by a 2 MiB transparent huge page
/// when it lands on an aligned address, which the default 2 MiB would.
pub const VCPU_STACK_SIZE: usize = 512 << 10;

/// Real-time signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// What the VMM wants the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

/// Why the guest stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// Reset (i8042, triple fault) or KVM system event: a clean end.
    Reset,
    /// The guest powered off.
    PowerOff,
    /// KVM could not run the guest.
    Failed(String),
}

/// State shared by the VMM and its vCPU threads.
#[derive(Debug)]
pub struct VcpuShared {
    state: Mutex<(RunState, usize)>,
    changed: Condvar,
    /// Written when a vCPU ends the VM; the reason is in `exit`.
    pub exit_evt: EventFd,
    pub exit: Mutex<Option<GuestExit>>,
}

impl VcpuShared {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(VcpuShared {
            state: Mutex::new((RunState::Running, 0)),
            changed: Condvar::new(),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            exit: Mutex::new(None),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (RunState, usize)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn run_state(&self) -> RunState {
        self.lock().0
    }

    /// Sets the desired state and wakes paused threads.
    pub fn set(&self, state: RunState) {
        self.lock().0 = state;
        self.changed.notify_all();
    }

    /// Number of vCPU threads currently parked in the paused state.
    pub fn paused_count(&self) -> usize {
        self.lock().1
    }

    fn end(&self, why: GuestExit) {
        let mut exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if exit.is_none() {
            *exit = Some(why);
        }
        let _ = self.exit_evt.write(1);
    }

    /// Parks the calling vCPU thread while paused; false when stopping.
    fn park_while_paused(&self) -> bool {
        let mut guard = self.lock();
        if guard.0 == RunState::Paused {
            guard.1 += 1;
            while guard.0 == RunState::Paused {
                guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
            guard.1 -= 1;
        }
        guard.0 != RunState::Stopping
    }
}

/// A vCPU ready to run on its own thread.
#[derive(Debug)]
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub shared: Arc<VcpuShared>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once for the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl Vcpu {
    /// Starts the vCPU's thread.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .stack_size(VCPU_STACK_SIZE)
            .spawn(move || self.run())
    }

    fn run(mut self) {
        // The kick signal must reach this thread even though the VMM blocks
        // its own signals for the signalfd.
        // SAFETY: unblocking one signal of this thread's mask with a valid
        // sigset_t built by libc.
        unsafe {
            let mut raw: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut raw);
            libc::sigaddset(&mut raw, kick_signal());
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &raw, std::ptr::null_mut());
        }
        loop {
            match self.shared.run_state() {
                RunState::Stopping => return,
                RunState::Paused => {
                    if !self.shared.park_while_paused() {
                        return;
                    }
                    continue;
                }
                RunState::Running => {}
            }
            if let Some(exit) = self.run_once() {
                tracing::debug!(vcpu = self.index, ?exit, "guest exit");
                self.shared.end(exit);
                return;
            }
        }
    }

    /// One KVM_RUN; returns why the VM ends, if it does.
    fn run_once(&mut self) -> Option<GuestExit> {
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    self.pio.read(u64::from(port), data);
                    None
                }
                VcpuExit::IoOut(port, data) => {
                    self.pio.write(u64::from(port), data);
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.mmio.read(addr, data);
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio.write(addr, data);
                    None
                }
                VcpuExit::Hlt => {
                    // With the in-kernel LAPIC, HLT only exits when the
                    // guest halts with interrupts off: it is done.
                    Some(GuestExit::PowerOff)
                }
                VcpuExit::Shutdown => Some(GuestExit::Reset),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(GuestExit::PowerOff),
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(GuestExit::Reset),
                    other => Some(GuestExit::Failed(format!("KVM system event {other}"))),
                },
                VcpuExit::FailEntry(reason, cpu) => Some(GuestExit::Failed(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x} on CPU {cpu})"
                ))),
                VcpuExit::InternalError => Some(GuestExit::Failed(
                    "KVM internal error: this /dev/kvm cannot run the guest (on PVM hosts, \
                     standard guest kernels cannot boot)"
                        .into(),
                )),
                other => {
                    tracing::debug!(vcpu = self.index, exit = ?other, "unhandled vCPU exit");
                    None
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: the loop looks at the run state.
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(GuestExit::Failed(format!(
                "KVM_RUN on vCPU {}: {e}",
                self.index
            ))),
        }
    }
}

/// Kicks every vCPU thread out of KVM_RUN until they are all parked (for a
/// pause) or gone (for a stop), or the deadline passes.
pub fn kick_all(handles: &[JoinHandle<()>], shared: &VcpuShared, deadline: Duration) -> bool {
    let until = std::time::Instant::now() + deadline;
    loop {
        let live: Vec<&JoinHandle<()>> = handles.iter().filter(|h| !h.is_finished()).collect();
        let done = match shared.run_state() {
            RunState::Paused => shared.paused_count() >= live.len(),
            RunState::Stopping => live.is_empty(),
            RunState::Running => true,
        };
        if done {
            return true;
        }
        if std::time::Instant::now() >= until {
            return false;
        }
        for h in live {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the pthread_t comes from a JoinHandle that has not
            // been joined, so it names a live (or exiting) thread.
            unsafe {
                libc::pthread_kill(h.as_pthread_t(), kick_signal());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_reason_wins() {
        let s = VcpuShared::new().unwrap();
        s.end(GuestExit::Reset);
        s.end(GuestExit::Failed("x".into()));
        assert_eq!(*s.exit.lock().unwrap(), Some(GuestExit::Reset));
        assert_eq!(s.exit_evt.read().unwrap(), 2);
    }

    #[test]
    fn paused_threads_park_and_resume() {
        let s = VcpuShared::new().unwrap();
        s.set(RunState::Paused);
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.park_while_paused());
        while s.paused_count() == 0 {
            std::thread::yield_now();
        }
        s.set(RunState::Running);
        assert!(t.join().unwrap());
        s.set(RunState::Stopping);
        assert!(!s.park_while_paused());
    }
}
