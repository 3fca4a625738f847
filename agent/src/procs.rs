//! Exit statuses, from the PID 1 reaper to the processes the API started.
//!
//! The agent reaps every child on SIGCHLD (`init::reap_exited`). Container
//! init and exec processes are its children (libcontainer clones them with
//! `CLONE_PARENT` from its intermediate process), so their statuses come
//! through the same `waitpid(-1)`; [`ExitRouter`] hands each to the process
//! it belongs to. A status can arrive before the process is registered
//! (its pid is known only once libcontainer returns): such a status is kept
//! in a bounded map of early exits, stamped with the reaper's sequence
//! number, and a registration takes it if it was reaped after the
//! registration's mark (so an old orphan that had the same pid is never
//! taken for the new process).

use std::collections::{HashMap, VecDeque};

use nix::sys::wait::WaitStatus;

/// Early exits kept at most (orphans that are nobody's also land here and
/// age out).
pub const MAX_EARLY: usize = 256;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub pid: u32,
    /// The shell's convention: the exit code, or 128 + the signal.
    pub status: i32,
    /// The signal that killed it, 0 if it exited.
    pub signal: u32,
    pub exited_at_ns: u64,
}

impl ExitInfo {
    /// The exit of a wait status, `None` for stops and continues.
    pub fn from_wait(status: WaitStatus, exited_at_ns: u64) -> Option<ExitInfo> {
        match status {
            WaitStatus::Exited(pid, code) => Some(ExitInfo {
                pid: pid.as_raw() as u32,
                status: code,
                signal: 0,
                exited_at_ns,
            }),
            WaitStatus::Signaled(pid, signal, _) => Some(ExitInfo {
                pid: pid.as_raw() as u32,
                status: 128 + signal as i32,
                signal: signal as u32,
                exited_at_ns,
            }),
            _ => None,
        }
    }
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Routes reaped statuses to registered processes of type `T`.
#[derive(Debug)]
pub struct ExitRouter<T> {
    by_pid: HashMap<u32, T>,
    early: HashMap<u32, (u64, ExitInfo)>,
    early_order: VecDeque<(u32, u64)>,
    /// Bumped by every reaped status.
    seq: u64,
}

impl<T> Default for ExitRouter<T> {
    fn default() -> Self {
        ExitRouter {
            by_pid: HashMap::new(),
            early: HashMap::new(),
            early_order: VecDeque::new(),
            seq: 0,
        }
    }
}

impl<T> ExitRouter<T> {
    /// The mark to take before starting a process whose pid is not known
    /// yet; pass it to [`ExitRouter::register`].
    pub fn mark(&self) -> u64 {
        self.seq
    }

    /// A reaped status: the registered process it belongs to (now
    /// unregistered), or `None` if nobody registered the pid (kept as an
    /// early exit).
    pub fn on_exit(&mut self, info: ExitInfo) -> Option<T> {
        self.seq += 1;
        if let Some(target) = self.by_pid.remove(&info.pid) {
            return Some(target);
        }
        self.early.insert(info.pid, (self.seq, info));
        self.early_order.push_back((info.pid, self.seq));
        while self.early_order.len() > MAX_EARLY {
            if let Some((pid, seq)) = self.early_order.pop_front() {
                // Only if the entry is still the one this order slot made.
                if self.early.get(&pid).is_some_and(|(s, _)| *s == seq) {
                    self.early.remove(&pid);
                }
            }
        }
        None
    }

    /// Registers `pid` for `target`. If the process already exited (reaped
    /// after `mark`), nothing is registered and its exit is returned, with
    /// the target back, for the caller to finish it at once.
    pub fn register(&mut self, pid: u32, target: T, mark: u64) -> Result<(), (T, ExitInfo)> {
        if let Some((seq, info)) = self.early.remove(&pid) {
            if seq > mark {
                return Err((target, info));
            }
            // An older process with the same pid: not ours.
        }
        self.by_pid.insert(pid, target);
        Ok(())
    }

    /// Forgets a registration (the process was removed with its container).
    pub fn unregister(&mut self, pid: u32) -> Option<T> {
        self.by_pid.remove(&pid)
    }

    #[cfg(test)]
    pub fn registered(&self) -> usize {
        self.by_pid.len()
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    use super::*;

    fn exit(pid: u32, status: i32) -> ExitInfo {
        ExitInfo {
            pid,
            status,
            signal: 0,
            exited_at_ns: 1,
        }
    }

    #[test]
    fn wait_statuses_follow_the_shell_convention() {
        let e = ExitInfo::from_wait(WaitStatus::Exited(Pid::from_raw(7), 3), 5).expect("exit");
        assert_eq!((e.pid, e.status, e.signal, e.exited_at_ns), (7, 3, 0, 5));
        let k = ExitInfo::from_wait(
            WaitStatus::Signaled(Pid::from_raw(8), Signal::SIGKILL, false),
            6,
        )
        .expect("signal");
        assert_eq!((k.status, k.signal), (137, 9));
        assert!(ExitInfo::from_wait(WaitStatus::StillAlive, 0).is_none());
    }

    #[test]
    fn a_registered_process_gets_its_status() {
        let mut router = ExitRouter::default();
        let mark = router.mark();
        assert!(router.register(10, "web", mark).is_ok());
        assert_eq!(router.on_exit(exit(11, 0)), None, "an orphan");
        assert_eq!(router.on_exit(exit(10, 2)), Some("web"));
        assert_eq!(router.registered(), 0);
        // Reaped once: a second status for the pid is somebody else's.
        assert_eq!(router.on_exit(exit(10, 0)), None);
    }

    #[test]
    fn an_exit_before_registration_is_handed_back() {
        let mut router = ExitRouter::default();
        let mark = router.mark();
        // The process ran and was reaped before its pid was registered.
        assert_eq!(router.on_exit(exit(42, 7)), None);
        match router.register(42, "exec", mark) {
            Err((target, info)) => assert_eq!((target, info.status), ("exec", 7)),
            Ok(()) => panic!("the early exit was not handed back"),
        }
        assert_eq!(router.registered(), 0);
    }

    #[test]
    fn an_old_exit_of_a_reused_pid_is_not_taken() {
        let mut router = ExitRouter::default();
        assert_eq!(router.on_exit(exit(42, 1)), None, "an orphan with pid 42");
        let mark = router.mark();
        // A new process gets pid 42 later: the orphan's status predates
        // the mark and must not end it.
        assert!(router.register(42, "new", mark).is_ok());
        assert_eq!(router.on_exit(exit(42, 0)), Some("new"));
    }

    #[test]
    fn early_exits_are_bounded() {
        let mut router: ExitRouter<&str> = ExitRouter::default();
        for pid in 0..(MAX_EARLY as u32 * 4) {
            router.on_exit(exit(1000 + pid, 0));
        }
        assert!(router.early.len() <= MAX_EARLY);
        assert!(router.early_order.len() <= MAX_EARLY);
        // The newest are kept.
        let newest = 1000 + MAX_EARLY as u32 * 4 - 1;
        assert!(router.register(newest, "x", 0).is_err());
    }
}
