//! vCPUs: one thread each, running KVM_RUN and routing exits to the buses.
//!
//! The VMM pauses vCPUs by setting the shared run state and kicking each
//! thread out of KVM_RUN with a signal ([`kick_signal`]); a paused thread
//! waits on a condition variable until it is resumed or told to stop.
//!
//! A kick is never lost: the signal handler sets the thread's
//! `kvm_run.immediate_exit`, so a signal that lands between the thread's
//! look at the run state and its next KVM_RUN makes that KVM_RUN return
//! at once (as Firecracker does). The thread clears the flag, then looks
//! at the run state again; the VMM always sets the state before it kicks.
//! So one kick per thread is enough, and the VMM waits for the threads to
//! park or exit on a condition variable instead of re-kicking.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::Bus;
use crate::metrics::{inc, METRICS};

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
    /// A template VM was saved (the API's `snapshot`).
    Snapshotted,
}

/// The run state and how many vCPU threads are parked (paused) or gone.
#[derive(Debug, Clone, Copy)]
struct States {
    want: RunState,
    parked: usize,
    exited: usize,
}

/// State shared by the VMM and its vCPU threads.
#[derive(Debug)]
pub struct VcpuShared {
    state: Mutex<States>,
    /// Signalled when the wanted state changes (for parked threads) and
    /// when a thread parks or exits (for the VMM waiting on them).
    changed: Condvar,
    /// Written when a vCPU ends the VM; the reason is in `exit`.
    pub exit_evt: EventFd,
    pub exit: Mutex<Option<GuestExit>>,
}

impl VcpuShared {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(VcpuShared {
            state: Mutex::new(States {
                want: RunState::Running,
                parked: 0,
                exited: 0,
            }),
            changed: Condvar::new(),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            exit: Mutex::new(None),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, States> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn run_state(&self) -> RunState {
        self.lock().want
    }

    /// Sets the desired state and wakes paused threads.
    pub fn set(&self, state: RunState) {
        self.lock().want = state;
        self.changed.notify_all();
    }

    /// Number of vCPU threads currently parked in the paused state.
    pub fn paused_count(&self) -> usize {
        self.lock().parked
    }

    /// Number of vCPU threads that have returned.
    pub fn exited_count(&self) -> usize {
        self.lock().exited
    }

    /// A vCPU thread is about to return.
    fn thread_exited(&self) {
        self.lock().exited += 1;
        self.changed.notify_all();
    }

    /// Waits until `total` threads are parked or gone (for a pause) or all
    /// gone (for a stop), or `until` passes. True when they are.
    fn wait_settled(&self, total: usize, until: Instant) -> bool {
        let mut guard = self.lock();
        loop {
            let done = match guard.want {
                RunState::Paused => guard.parked + guard.exited >= total,
                RunState::Stopping => guard.exited >= total,
                RunState::Running => true,
            };
            if done {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            guard = self
                .changed
                .wait_timeout(guard, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
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
        if guard.want == RunState::Paused {
            guard.parked += 1;
            self.changed.notify_all();
            while guard.want == RunState::Paused {
                guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
            guard.parked -= 1;
        }
        guard.want != RunState::Stopping
    }
}

/// Holds vCPU threads back until the VMM opens it.
#[derive(Debug, Default)]
pub struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.opened.notify_all();
    }

    pub fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|p| p.into_inner());
        }
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
    /// Install the vCPU seccomp filter before the first KVM_RUN.
    pub seccomp: bool,
    /// Opened once every VMM thread has its filter; the guest runs after.
    pub gate: Option<Arc<Gate>>,
    /// For the log lines the guest can cause on this vCPU.
    pub limiter: crate::guest_log::LogLimiter,
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, while it runs a vCPU.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: a thread-local read and a byte store.
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: `flag` points into this thread's vCPU kvm_run mapping,
        // which the thread keeps alive while the pointer is set (it is
        // cleared before the VcpuFd is dropped); KVM reads the byte at the
        // next KVM_RUN.
        unsafe { std::ptr::write_volatile(flag, 1) };
    }
}

/// Installs the kick handler once for the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl Vcpu {
    /// Starts the vCPU's thread; joined, it gives the vCPU's fd back (for
    /// a snapshot of its state).
    pub fn spawn(self) -> std::io::Result<JoinHandle<VcpuFd>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .stack_size(VCPU_STACK_SIZE)
            .spawn(move || self.run())
    }

    fn run(mut self) -> VcpuFd {
        let kvm_run: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        // SAFETY: `kvm_run` is the live mapping of this vCPU's kvm_run
        // structure; taking a field's address does not access it.
        let flag = unsafe { std::ptr::addr_of_mut!((*kvm_run).immediate_exit) };
        IMMEDIATE_EXIT.with(|f| f.set(flag));
        let shared = self.shared.clone();
        // Without the kick signal this thread could never be paused or
        // stopped, without its filter it would run unconfined: either
        // ends the VM instead.
        let ready = unblock_kick_signal()
            .map_err(|err| format!("unblocking the kick signal: {err}"))
            .and_then(|()| {
                if self.seccomp {
                    crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu)
                        .map_err(|err| format!("installing its seccomp filter: {err}"))
                } else {
                    Ok(())
                }
            });
        if let Some(gate) = self.gate.take() {
            gate.wait();
        }
        match ready {
            Ok(()) => self.run_loop(),
            Err(why) => shared.end(GuestExit::Failed(format!("vCPU {}: {why}", self.index))),
        }
        IMMEDIATE_EXIT.with(|f| f.set(std::ptr::null_mut()));
        let Vcpu { fd, .. } = self;
        shared.thread_exited();
        fd
    }

    fn run_loop(&mut self) {
        loop {
            match self.shared.run_state() {
                RunState::Stopping => {
                    self.complete_pending_io();
                    return;
                }
                RunState::Paused => {
                    if !self.shared.park_while_paused() {
                        self.complete_pending_io();
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

    /// An I/O or MMIO read the VMM answered is finished by KVM only at the
    /// next KVM_RUN, and its state is not in the registers userspace can
    /// save: before the thread leaves (and its vCPU may be saved), one
    /// KVM_RUN with `immediate_exit` set completes it without running a
    /// guest instruction (KVM's API documentation, `kvm_run`).
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// One KVM_RUN; returns why the VM ends, if it does.
    fn run_once(&mut self) -> Option<GuestExit> {
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    inc(&METRICS.vcpu_io_exits);
                    self.pio.read(u64::from(port), data);
                    None
                }
                VcpuExit::IoOut(port, data) => {
                    inc(&METRICS.vcpu_io_exits);
                    self.pio.write(u64::from(port), data);
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    inc(&METRICS.vcpu_mmio_exits);
                    self.mmio.read(addr, data);
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    inc(&METRICS.vcpu_mmio_exits);
                    self.mmio.write(addr, data);
                    None
                }
                VcpuExit::Shutdown => {
                    // Once per VM: the VM ends with it. Where the guest
                    // was, for a post-mortem against its System.map (on
                    // Intel; AMD's KVM resets the vCPU on a shutdown
                    // intercept, so there these are the reset values).
                    let regs = self.fd.get_regs().ok();
                    let sregs = self.fd.get_sregs().ok();
                    tracing::warn!(
                        vcpu = self.index,
                        rip = regs.map(|r| format!("{:#x}", r.rip)),
                        rsp = regs.map(|r| format!("{:#x}", r.rsp)),
                        cr2 = sregs.map(|s| format!("{:#x}", s.cr2)),
                        cr3 = sregs.map(|s| format!("{:#x}", s.cr3)),
                        idt = sregs.map(|s| format!("{:#x}+{:#x}", s.idt.base, s.idt.limit)),
                        tr = sregs.map(|s| format!("{:#x}", s.tr.base)),
                        "the guest triple-faulted (its kernel crashed): the VM ends as on a reset"
                    );
                    Some(GuestExit::Reset)
                }
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
                    inc(&METRICS.vcpu_other_exits);
                    // The guest decides how often this happens: within limits.
                    if self.limiter.allow() {
                        tracing::debug!(vcpu = self.index, exit = ?other, "unhandled vCPU exit");
                    }
                    None
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear the flag, then the loop looks at the run
                // state (set before any kick).
                self.fd.set_kvm_immediate_exit(0);
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                None
            }
            Err(e) => Some(GuestExit::Failed(format!(
                "KVM_RUN on vCPU {}: {e}",
                self.index
            ))),
        }
    }
}

/// The kick signal must reach a vCPU thread even though the VMM blocks
/// its own signals (for the signalfd) in every thread.
fn unblock_kick_signal() -> std::io::Result<()> {
    // SAFETY: a sigset_t initialised by sigemptyset, passed by reference
    // to pthread_sigmask for the calling thread.
    let rc = unsafe {
        let mut raw: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut raw);
        libc::sigaddset(&mut raw, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &raw, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Kicks every live vCPU thread out of KVM_RUN once, then waits until they
/// are all parked (for a pause) or gone (for a stop), or `deadline` passes.
/// True when they are.
pub fn kick_all<T>(handles: &[JoinHandle<T>], shared: &VcpuShared, deadline: Duration) -> bool {
    let until = Instant::now() + deadline;
    for h in handles.iter().filter(|h| !h.is_finished()) {
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: the pthread_t comes from a JoinHandle that has not been
        // joined, so it names a live (or exiting, not yet reaped) thread.
        unsafe {
            libc::pthread_kill(h.as_pthread_t(), kick_signal());
        }
    }
    shared.wait_settled(handles.len(), until)
}

/// The running vCPU threads. Dropping it (on every path out of the VMM's
/// run, errors included) stops and joins them, so guest memory is never
/// unmapped under a vCPU still in KVM_RUN.
#[derive(Debug)]
pub struct VcpuThreads<T = VcpuFd> {
    pub handles: Vec<JoinHandle<T>>,
    pub shared: Arc<VcpuShared>,
}

/// How long stopping the vCPUs may take before the VMM gives up on them.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl<T> VcpuThreads<T> {
    /// Stops every vCPU thread and joins it. If one does not stop within
    /// [`STOP_TIMEOUT`] the process exits at once: freeing guest memory
    /// under a running vCPU is not an option.
    pub fn stop(&mut self) {
        drop(self.stop_and_collect());
    }

    /// [`VcpuThreads::stop`], giving back what the threads returned (the
    /// vCPUs' fds), in order, of those that did not panic.
    pub fn stop_and_collect(&mut self) -> Vec<T> {
        if self.handles.is_empty() {
            return Vec::new();
        }
        self.shared.set(RunState::Stopping);
        if !kick_all(&self.handles, &self.shared, STOP_TIMEOUT) {
            tracing::error!(
                running = self.handles.len() - self.shared.exited_count(),
                "vCPU threads did not stop within {} s; exiting the process",
                STOP_TIMEOUT.as_secs()
            );
            // SAFETY: _exit ends the process without running destructors,
            // so nothing unmaps guest memory while a vCPU may still use it.
            unsafe { libc::_exit(1) };
        }
        self.handles
            .drain(..)
            .filter_map(|h| h.join().ok())
            .collect()
    }
}

impl<T> Drop for VcpuThreads<T> {
    fn drop(&mut self) {
        self.stop();
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

    /// Threads that follow the vCPU loop's protocol without KVM: look at
    /// the run state, park while paused, leave when stopping.
    fn fake_vcpus(shared: &Arc<VcpuShared>, n: usize) -> Vec<JoinHandle<()>> {
        (0..n)
            .map(|_| {
                let s = shared.clone();
                std::thread::spawn(move || {
                    unblock_kick_signal().unwrap();
                    loop {
                        match s.run_state() {
                            RunState::Stopping => break,
                            RunState::Paused => {
                                if !s.park_while_paused() {
                                    break;
                                }
                            }
                            RunState::Running => std::thread::yield_now(),
                        }
                    }
                    s.thread_exited();
                })
            })
            .collect()
    }

    #[test]
    fn pause_resume_and_stop_races_settle() {
        install_kick_handler().unwrap();
        let shared = VcpuShared::new().unwrap();
        let mut threads = VcpuThreads {
            handles: fake_vcpus(&shared, 4),
            shared: shared.clone(),
        };
        for round in 0..200 {
            shared.set(RunState::Paused);
            assert!(
                kick_all(&threads.handles, &shared, Duration::from_secs(5)),
                "round {round}: not every thread parked"
            );
            assert_eq!(shared.paused_count(), 4);
            shared.set(RunState::Running);
        }
        // Stop while paused, and while running: both end every thread.
        shared.set(RunState::Paused);
        assert!(kick_all(&threads.handles, &shared, Duration::from_secs(5)));
        threads.stop();
        assert!(threads.handles.is_empty());
        assert_eq!(shared.exited_count(), 4);

        let shared = VcpuShared::new().unwrap();
        let mut threads = VcpuThreads {
            handles: fake_vcpus(&shared, 2),
            shared: shared.clone(),
        };
        threads.stop();
        assert_eq!(shared.exited_count(), 2);
    }

    #[test]
    fn dropping_the_guard_stops_the_threads() {
        install_kick_handler().unwrap();
        let shared = VcpuShared::new().unwrap();
        let threads = VcpuThreads {
            handles: fake_vcpus(&shared, 3),
            shared: shared.clone(),
        };
        drop(threads);
        assert_eq!(shared.exited_count(), 3);
        assert_eq!(shared.run_state(), RunState::Stopping);
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
