//! The sandbox's helper processes (isola-vmm, virtiofsd), supervised: each
//! is reaped by a task that publishes its exit status, signalled through a
//! pidfd (never a pid that may have been reused), and its stderr forwarded
//! to `tracing` line by line with a bound on the line length.

use std::fmt;
use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::logfile::RotatingLog;
use rustix::process::{pidfd_open, pidfd_send_signal, PidfdFlags, Signal};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

/// Longest log line forwarded; the rest of a longer line is dropped.
pub const MAX_LOG_LINE: usize = 4096;

/// How a supervised process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    /// Which process ("isola-vmm", "virtiofsd").
    pub process: String,
    pub pid: u32,
    /// Its exit status as text ("exit status: 1", "signal: 9 (SIGKILL)"),
    /// or why waiting for it failed.
    pub status: String,
}

impl fmt::Display for Death {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (pid {}) ended: {}",
            self.process, self.pid, self.status
        )
    }
}

/// A running child process.
#[derive(Debug)]
pub struct Supervised {
    name: String,
    pid: u32,
    pidfd: OwnedFd,
    exit: watch::Receiver<Option<Death>>,
}

impl Supervised {
    /// Spawns `cmd` (stdin from /dev/null; stderr forwarded to `tracing`
    /// with `sandbox` and `name`; stdout too unless the command set it),
    /// in a process group of its own: a helper that forks (virtiofsd's
    /// namespace sandbox runs in a child that outlives a killed parent) is
    /// killed as a group.
    pub fn spawn(
        name: &str,
        sandbox: &str,
        cmd: tokio::process::Command,
    ) -> std::io::Result<Supervised> {
        Supervised::spawn_into(name, sandbox, cmd, None)
    }

    /// As [`Supervised::spawn`], with the process's stdout (which `cmd`
    /// must pipe) copied into `log` line by line instead of `tracing`:
    /// isola-vmm's `--console stdout`, the guest's console.
    pub fn spawn_with_log(
        name: &str,
        sandbox: &str,
        mut cmd: tokio::process::Command,
        log: RotatingLog,
    ) -> std::io::Result<Supervised> {
        cmd.stdout(std::process::Stdio::piped());
        Supervised::spawn_into(name, sandbox, cmd, Some(log))
    }

    fn spawn_into(
        name: &str,
        sandbox: &str,
        mut cmd: tokio::process::Command,
        log: Option<RotatingLog>,
    ) -> std::io::Result<Supervised> {
        cmd.process_group(0)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let Some(pid) = child.id() else {
            return Err(std::io::Error::other(format!("{name} exited at once")));
        };
        let pidfd = match rustix::process::Pid::from_raw(pid as i32)
            .ok_or_else(|| std::io::Error::other("pid 0"))
            .and_then(|p| pidfd_open(p, PidfdFlags::empty()).map_err(std::io::Error::from))
        {
            Ok(fd) => fd,
            Err(err) => {
                // Not supervised: do not leave it running.
                let _ = child.start_kill();
                return Err(err);
            }
        };
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(forward_lines(stderr, sandbox.to_string(), name.to_string()));
        }
        if let Some(stdout) = child.stdout.take() {
            match log {
                Some(log) => {
                    tokio::spawn(crate::logfile::copy_lines(stdout, log));
                }
                None => {
                    tokio::spawn(forward_lines(stdout, sandbox.to_string(), name.to_string()));
                }
            }
        }
        let (tx, rx) = watch::channel(None);
        let process = name.to_string();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => describe(status),
                Err(err) => format!("waiting for it failed: {err}"),
            };
            let _ = tx.send(Some(Death {
                process,
                pid,
                status,
            }));
        });
        Ok(Supervised {
            name: name.to_string(),
            pid,
            pidfd,
            exit: rx,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How it ended, if it has.
    pub fn death(&self) -> Option<Death> {
        self.exit.borrow().clone()
    }

    /// Waits until it has ended.
    pub async fn ended(&self) -> Death {
        self.ended_future().await
    }

    /// A future of its end that borrows nothing (for tasks that must not
    /// keep the sandbox alive).
    pub fn ended_future(&self) -> impl std::future::Future<Output = Death> + Send + 'static {
        let mut rx = self.exit.clone();
        let (process, pid) = (self.name.clone(), self.pid);
        async move {
            loop {
                if let Some(death) = rx.borrow_and_update().clone() {
                    return death;
                }
                if rx.changed().await.is_err() {
                    // The reaper is gone (the runtime is shutting down).
                    return Death {
                        process,
                        pid,
                        status: "not supervised any more".to_string(),
                    };
                }
            }
        }
    }

    /// Sends `signal`; a process that has ended already is not an error.
    pub fn signal(&self, signal: Signal) {
        match pidfd_send_signal(&self.pidfd, signal) {
            Ok(()) => {}
            Err(rustix::io::Errno::SRCH) => {}
            Err(err) => {
                tracing::warn!(process = %self.name, pid = self.pid, %err, "signalling failed")
            }
        }
    }

    /// SIGKILL to the process and every process left in its group
    /// (synchronous, for drop paths too). The group's id is the leader's
    /// pid, which the kernel does not hand out again while the group has a
    /// member.
    pub fn kill(&self) {
        self.signal(Signal::KILL);
        let group = nix::unistd::Pid::from_raw(self.pid as i32);
        match nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(err) => {
                tracing::warn!(process = %self.name, pgid = self.pid, %err, "killing the group failed")
            }
        }
    }

    /// Waits up to `grace` for it to end by itself, then kills it and
    /// waits up to `kill_wait` more. Returns how it ended, or `None` if it
    /// still did not (stuck in the kernel). A zero `grace` kills it at
    /// once, as planned (nothing is logged).
    pub async fn stop(&self, grace: Duration, kill_wait: Duration) -> Option<Death> {
        if let Ok(death) = tokio::time::timeout(grace, self.ended()).await {
            // Whatever it forked and left behind goes too.
            self.kill();
            return Some(death);
        }
        if !grace.is_zero() {
            tracing::warn!(process = %self.name, pid = self.pid, ?grace, "still running; killing it");
        }
        self.kill();
        tokio::time::timeout(kill_wait, self.ended()).await.ok()
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => {
            let name = nix::sys::signal::Signal::try_from(sig)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| "?".to_string());
            format!("killed by signal {sig} ({name})")
        }
        _ => status.to_string(),
    }
}

/// How long another child's death waits for the leader's, which it may
/// only echo.
pub const LEADER_GRACE: Duration = Duration::from_secs(1);

/// Every live process but this one whose command line (NULs as spaces)
/// contains `needle`, with that command line: how a helper left by a dead
/// supervisor is found by the run directory it names.
pub fn processes_naming(needle: &str) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Some(cmdline) = cmdline(pid) else {
            continue;
        };
        if cmdline.contains(needle) && alive(pid) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// `pid`'s command line, NULs as spaces.
fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// Whether `pid`'s command line (NULs as spaces) contains `needle`: a
/// helper that names its sandbox's run directory.
pub fn cmdline_contains(pid: u32, needle: &str) -> bool {
    cmdline(pid).is_some_and(|c| c.contains(needle))
}

/// The processes whose command line names the sandbox's run directory
/// `run_dir` and whose executable is one of `helpers` (isola-vmm,
/// virtiofsd and its sandboxed child), left by a dead runner: SIGKILL,
/// then wait until they are gone (bounded). The shim's `delete` action and
/// `isola cleanup` both clean up with it.
pub fn kill_helpers(run_dir: &Path, helpers: &[String]) -> Vec<u32> {
    let needle = format!("{}/", run_dir.display());
    let pids: Vec<u32> = processes_naming(&needle)
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|&pid| runs_one_of(pid, helpers))
        .collect();
    for &pid in &pids {
        tracing::info!(pid, dir = %run_dir.display(), "killing a helper left by a dead runner");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && pids.iter().any(|&p| alive(p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    pids
}

/// Whether `pid`'s executable's file name is one of `names`.
pub fn runs_one_of(pid: u32, names: &[String]) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    let name = exe
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string()
        })
        .unwrap_or_default();
    names.contains(&name)
}

/// Whether `pid` exists and is neither a zombie nor dead.
pub fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

/// Prepares a helper's command: it is killed when the thread that spawned
/// it dies (a shim killed with SIGKILL takes its VM with it), and with
/// `cgroup` it joins that host cgroup (v2) before it runs, so everything it
/// allocates is charged there from its first page.
pub fn confine(
    cmd: &mut tokio::process::Command,
    cgroup: Option<&std::path::Path>,
) -> std::io::Result<()> {
    let procs = match cgroup {
        Some(dir) => {
            let path = dir.join("cgroup.procs");
            if !path.is_file() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} is not a cgroup v2 directory", dir.display()),
                ));
            }
            Some(
                std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
                    .map_err(|_| std::io::Error::other("a cgroup path with a NUL byte"))?,
            )
        }
        None => None,
    };
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only async-signal-safe functions (prctl, getppid, open, write, close)
    // on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl: do not outlive it.
            if libc::getppid() != parent {
                // No allocation after fork: std reports only the errno.
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(err);
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// Starts the command's process in the network namespace `netns` (a
/// descriptor of this process, which must stay open until the spawn).
pub fn enter_netns(cmd: &mut tokio::process::Command, netns: RawFd) {
    // SAFETY: the closure runs in the child between fork and exec and
    // calls only setns (async-signal-safe) on a descriptor number copied
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Lets the command's process inherit `fds` (descriptors of this process,
/// close-on-exec here) under the same numbers: the child clears their
/// FD_CLOEXEC between fork and exec, so no other child spawned meanwhile
/// gets them. The numbers are >= 3 (stdio is never one of them), so the
/// child's stdio set-up does not overwrite them.
pub fn inherit(cmd: &mut tokio::process::Command, fds: Vec<RawFd>) {
    if fds.is_empty() {
        return;
    }
    // SAFETY: the closure runs in the child between fork and exec and
    // calls only fcntl (async-signal-safe) on a Vec allocated before the
    // fork, which it only reads.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// What ended `children`, the first of which (the VMM) the others serve:
/// the first to end, unless that is another child and the leader ends
/// within [`LEADER_GRACE`] after it (virtiofsd ends, status 0, when its
/// client the VMM goes, and may be reaped first). Borrows nothing.
pub fn first_death(
    children: &[&Supervised],
) -> impl std::future::Future<Output = Death> + Send + 'static {
    let ended: Vec<_> = children.iter().map(|c| c.ended_future()).collect();
    let leader = children
        .first()
        .map(|c| (c.name().to_string(), c.ended_future()));
    async move {
        let first = first_of(ended).await;
        match leader {
            Some((name, leader)) if first.process != name => {
                tokio::time::timeout(LEADER_GRACE, leader)
                    .await
                    .unwrap_or(first)
            }
            _ => first,
        }
    }
}

/// The output of the first of `futures` to finish (pending forever if
/// there are none).
pub async fn first_of<F: std::future::Future>(futures: Vec<F>) -> F::Output {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(move |cx| {
        for fut in futures.iter_mut() {
            if let std::task::Poll::Ready(out) = fut.as_mut().poll(cx) {
                return std::task::Poll::Ready(out);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Reads lines of at most `max` bytes (a longer line is cut there and the
/// rest of it dropped), so a peer that never sends a newline costs at most
/// `max` bytes. `None` at EOF.
#[derive(Debug)]
pub struct BoundedLines<R> {
    reader: BufReader<R>,
    max: usize,
    /// The line read so far (kept here, not in `next_line`'s frame, so
    /// that a cancelled `next_line` loses nothing).
    line: Vec<u8>,
    cut: bool,
}

impl<R: AsyncRead + Unpin> BoundedLines<R> {
    pub fn new(reader: R, max: usize) -> Self {
        BoundedLines {
            reader: BufReader::new(reader),
            max,
            line: Vec::new(),
            cut: false,
        }
    }

    /// The next line without its newline (lossy UTF-8), and whether it was
    /// cut. Cancel-safe: a line begun before a cancelled call is finished
    /// by the next one.
    pub async fn next_line(&mut self) -> std::io::Result<Option<(String, bool)>> {
        loop {
            let buf = self.reader.fill_buf().await?;
            if buf.is_empty() {
                if self.line.is_empty() && !self.cut {
                    return Ok(None);
                }
                break;
            }
            let (chunk, newline) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], Some(i + 1)),
                None => (buf, None),
            };
            let room = self.max.saturating_sub(self.line.len());
            if chunk.len() > room {
                self.cut = true;
            }
            self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            let used = newline.unwrap_or(buf.len());
            self.reader.consume(used);
            if newline.is_some() {
                break;
            }
        }
        let line = std::mem::take(&mut self.line);
        let cut = std::mem::take(&mut self.cut);
        let line = String::from_utf8(line)
            .unwrap_or_else(|err| String::from_utf8_lossy(err.as_bytes()).into_owned());
        Ok(Some((line, cut)))
    }
}

/// Forwards a helper's output to `tracing`, a line per event.
async fn forward_lines<R: AsyncRead + Unpin>(reader: R, sandbox: String, process: String) {
    let mut lines = BoundedLines::new(reader, MAX_LOG_LINE);
    while let Ok(Some((line, cut))) = lines.next_line().await {
        let line = line.trim_end();
        if !line.is_empty() {
            tracing::info!(target: "isola_sandbox::helper", sandbox = %sandbox, process = %process, cut, "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    #[tokio::test]
    async fn the_first_death_names_the_process_and_its_status() {
        let long = Supervised::spawn("long", "sb", sh("sleep 100")).expect("spawn");
        let short = Supervised::spawn("short", "sb", sh("exit 3")).expect("spawn");
        let death = tokio::time::timeout(Duration::from_secs(20), first_death(&[&long, &short]))
            .await
            .expect("a child ended");
        assert_eq!(death.process, "short");
        assert_eq!(death.status, "exit status 3");
        assert_eq!(death.pid, short.pid());
        assert!(long.death().is_none());

        long.kill();
        let death = tokio::time::timeout(Duration::from_secs(20), long.ended())
            .await
            .expect("killed");
        assert_eq!(death.status, "killed by signal 9 (SIGKILL)");
        assert_eq!(
            death.to_string(),
            format!(
                "long (pid {}) ended: killed by signal 9 (SIGKILL)",
                long.pid()
            )
        );
        // Signalling a reaped process is harmless (the pidfd is exact).
        long.kill();
    }

    #[tokio::test]
    async fn kill_takes_the_whole_group() {
        // A parent that leaves a child behind when it is killed, as
        // virtiofsd's namespace sandbox does.
        let child_pid_file = tempfile::NamedTempFile::new().expect("tempfile");
        let script = format!(
            "sleep 100 & echo $! > {}; wait",
            child_pid_file.path().display()
        );
        let parent = Supervised::spawn("forker", "sb", sh(&script)).expect("spawn");
        let until = std::time::Instant::now() + Duration::from_secs(20);
        let child: i32 = loop {
            if let Ok(pid) = std::fs::read_to_string(child_pid_file.path())
                .unwrap_or_default()
                .trim()
                .parse()
            {
                break pid;
            }
            assert!(std::time::Instant::now() < until, "no child pid");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        parent.kill();
        tokio::time::timeout(Duration::from_secs(20), parent.ended())
            .await
            .expect("parent ended");
        while std::path::Path::new(&format!("/proc/{child}")).exists() {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            if stat.contains(") Z") {
                break; // killed, waiting for init to reap it
            }
            assert!(
                std::time::Instant::now() < until,
                "the group's child {child} survived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn inherited_descriptors_reach_the_child_and_only_it() {
        use std::os::fd::AsRawFd;
        let file = tempfile::tempfile().expect("tempfile");
        let fd = file.as_raw_fd();
        let probe = format!("test -e /proc/self/fd/{fd}");
        let status = |inherit_it: bool| {
            let mut cmd = sh(&probe);
            if inherit_it {
                inherit(&mut cmd, vec![fd]);
            }
            let child = Supervised::spawn("probe", "sb", cmd).expect("spawn");
            async move {
                tokio::time::timeout(Duration::from_secs(20), child.ended())
                    .await
                    .expect("ended")
                    .status
            }
        };
        assert_eq!(status(true).await, "exit status 0");
        // Close-on-exec as before, in this process and for other children.
        assert_eq!(status(false).await, "exit status 1");
        let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFD).expect("flags");
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[tokio::test]
    async fn a_child_started_in_a_private_netns_is_not_in_ours() {
        use std::os::fd::AsRawFd;
        let ns = |path: &str| std::fs::read_link(path).expect("ns link");
        let ours = ns("/proc/self/ns/net");
        let private = match crate::network::private_netns() {
            Ok(fd) => fd,
            // unshare needs CAP_SYS_ADMIN: as root (make test), it runs.
            Err(e) if !nix::unistd::geteuid().is_root() => {
                eprintln!("skipped, not root: {e}");
                return;
            }
            Err(e) => panic!("private_netns: {e}"),
        };
        let theirs = ns(&format!("/proc/self/fd/{}", private.as_raw_fd()));
        assert_ne!(theirs, ours);
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("ns");
        let mut cmd = sh(&format!("readlink /proc/self/ns/net > {}", out.display()));
        enter_netns(&mut cmd, private.as_raw_fd());
        let child = Supervised::spawn("in-netns", "sb", cmd).expect("spawn");
        let death = tokio::time::timeout(Duration::from_secs(20), child.ended())
            .await
            .expect("ended");
        assert_eq!(death.status, "exit status 0");
        let seen = std::fs::read_to_string(&out).expect("output");
        assert_eq!(seen.trim(), theirs.to_string_lossy());
    }

    #[tokio::test]
    async fn stop_waits_then_kills() {
        let polite = Supervised::spawn("polite", "sb", sh("exit 0")).expect("spawn");
        let death = polite
            .stop(Duration::from_secs(20), Duration::from_secs(20))
            .await
            .expect("ended");
        assert_eq!(death.status, "exit status 0");

        let stubborn =
            Supervised::spawn("stubborn", "sb", sh("trap '' TERM; sleep 100")).expect("spawn");
        let started = std::time::Instant::now();
        let death = stubborn
            .stop(Duration::from_millis(200), Duration::from_secs(20))
            .await
            .expect("killed");
        assert!(death.status.contains("SIGKILL"), "{death}");
        assert!(started.elapsed() < Duration::from_secs(15));
    }

    #[tokio::test]
    async fn dropping_a_supervised_child_does_not_leak_it() {
        let child = Supervised::spawn("leak", "sb", sh("sleep 100")).expect("spawn");
        let pid = child.pid();
        child.kill();
        drop(child);
        // The reaper task still reaps it: /proc/PID goes away.
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(std::time::Instant::now() < until, "pid {pid} still there");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn bounded_lines_cut_long_lines() {
        let input: &[u8] = b"short\nthis line is too long\n\nlast without newline";
        let mut lines = BoundedLines::new(input, 8);
        let mut got = Vec::new();
        while let Some(line) = lines.next_line().await.expect("read") {
            got.push(line);
        }
        assert_eq!(
            got,
            vec![
                ("short".to_string(), false),
                ("this lin".to_string(), true),
                (String::new(), false),
                ("last wit".to_string(), true),
            ]
        );
        // Endless input without newline: memory stays bounded by `max`.
        let endless = tokio::io::repeat(b'x');
        let mut lines = BoundedLines::new(tokio::io::AsyncReadExt::take(endless, 1 << 20), 16);
        let (line, cut) = lines.next_line().await.expect("read").expect("line");
        assert_eq!((line.len(), cut), (16, true));
    }

    #[tokio::test]
    async fn bounded_lines_survive_a_cancelled_read() {
        use tokio::io::AsyncWriteExt;
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut lines = BoundedLines::new(rx, 64);
        tx.write_all(b"half a ").await.expect("write");
        // The read is cancelled with half a line taken from the stream.
        let waited = tokio::time::timeout(Duration::from_millis(50), lines.next_line()).await;
        assert!(waited.is_err(), "no line yet: {waited:?}");
        tx.write_all(b"line\nnext\n").await.expect("write");
        drop(tx);
        let mut got = Vec::new();
        while let Some((line, _)) = lines.next_line().await.expect("read") {
            got.push(line);
        }
        assert_eq!(got, vec!["half a line".to_string(), "next".to_string()]);
    }
}
