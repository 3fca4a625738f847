//! Debug sessions (`StartDebugSession`, `isola debug` on the host): a
//! process in the guest's own namespaces, outside every container, for a
//! node's operator.
//!
//! Allowed only when `CreateSandbox` said so (`debug_console`, the node's
//! `debug.console`, which no pod annotation reaches). The guest image
//! needs no shell: the session runs the static busybox the host serves
//! read-only in the share (`debug/busybox`, only when enabled), which
//! installs its applets as links in [`APPLETS`] (a tmpfs) on first use and
//! `exec`s the command there, so `ls`, `cat`, `ps` work by name. The
//! session starts in the share's `containers/` directory, where each
//! container's root file system is (`<id>/rootfs`).
//!
//! A session is a process of the agent's own: its own session (setsid),
//! with a pty as its controlling terminal or pipes, in the root cgroup;
//! its exit is routed like a container process's but is no event, and
//! `WaitProcess` (container id empty, exec id = session id) removes it.
//! Each start and end is logged at WARN (so also on a kept console) with
//! who asked.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use isola_protocol::agent::StartDebugSessionRequest;
use isola_protocol::status::{self, check_id, Code};
use isola_protocol::{DEBUG_BUSYBOX, MAX_DEBUG_SESSIONS};

use super::{internal, invalid, lock, precondition, set_winsize, AgentService, Proc, RpcResult};
use crate::procs::ExitInfo;
use crate::sandbox;

/// Where the busybox applets are linked (a tmpfs of the guest's).
pub const APPLETS: &str = "/run/isola/debug/bin";

/// The session's PATH: the applets, then the guest's own directories.
pub const PATH: &str =
    "/run/isola/debug/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What `busybox sh -c` runs before the command: the applets linked once
/// (quietly: a session started at the same time may have made them).
const SETUP: &str = r#"[ -e "$ISOLA_APPLETS/sh" ] || { "$ISOLA_BUSYBOX" mkdir -p "$ISOLA_APPLETS" && "$ISOLA_BUSYBOX" --install -s "$ISOLA_APPLETS"; } 2>/dev/null; exec "$@""#;

/// Most arguments and environment entries of a session, and bytes of each.
const MAX_ARGS: usize = 256;
const MAX_ENV: usize = 64;
const MAX_ARG_LEN: usize = 4096;
/// Longest `who`.
const MAX_WHO: usize = 256;

/// busybox's arguments for a session running `args` (the shell when
/// empty).
pub fn busybox_args(args: &[String]) -> Vec<String> {
    let mut argv = vec![
        "sh".to_string(),
        "-c".to_string(),
        SETUP.to_string(),
        "isola-debug".to_string(),
    ];
    if args.is_empty() {
        argv.push("sh".to_string());
    } else {
        argv.extend(args.iter().cloned());
    }
    argv
}

/// Checks a request's command, environment and who.
pub fn check_request(req: &StartDebugSessionRequest) -> Result<(), String> {
    if req.args.len() > MAX_ARGS {
        return Err(format!("args: more than {MAX_ARGS}"));
    }
    for (i, arg) in req.args.iter().enumerate() {
        if arg.len() > MAX_ARG_LEN || arg.contains('\0') {
            return Err(format!(
                "args[{i}]: longer than {MAX_ARG_LEN} bytes or has a NUL"
            ));
        }
    }
    if req.args.first().is_some_and(|a| a.is_empty()) {
        return Err("args[0]: empty".to_string());
    }
    if req.env.len() > MAX_ENV {
        return Err(format!("env: more than {MAX_ENV}"));
    }
    for (i, kv) in req.env.iter().enumerate() {
        let Some((key, value)) = kv.split_once('=') else {
            return Err(format!("env[{i}]: not KEY=VALUE"));
        };
        let key_ok = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok || value.len() > MAX_ARG_LEN || value.contains('\0') {
            return Err(format!("env[{i}]: bad key or value"));
        }
    }
    if req.who.len() > MAX_WHO {
        return Err(format!("who: longer than {MAX_WHO} bytes"));
    }
    Ok(())
}

/// Logs a session's end.
pub fn ended(proc: &Proc, info: &ExitInfo) {
    tracing::warn!(
        session = %proc.exec_id,
        pid = info.pid,
        exit_status = info.status,
        "debug session ended"
    );
}

impl AgentService {
    /// Starts a debug session; its pid.
    pub(super) fn start_debug_session_sync(
        &self,
        req: &StartDebugSessionRequest,
    ) -> RpcResult<u32> {
        check_id("session_id", &req.session_id)?;
        check_request(req).map_err(invalid)?;
        let share = match &*lock(&self.state.sandbox) {
            None => return Err(precondition("no sandbox: CreateSandbox first")),
            Some(s) if !s.debug_console => {
                return Err(precondition(format!(
                    "debug sessions are off in sandbox {}: its node's isola config did not \
                     say debug.console = true when it started",
                    s.id
                )))
            }
            Some(s) => s.share.clone(),
        };
        if *lock(&self.state.destroying) {
            return Err(precondition("the sandbox is being destroyed"));
        }
        let share =
            share.ok_or_else(|| precondition("the sandbox has no share: no debug shell"))?;
        let busybox = share.join(DEBUG_BUSYBOX);
        if !busybox.is_file() {
            return Err(precondition(format!(
                "no debug shell: {} is not in the share (the host serves it when \
                 debug.console = true)",
                busybox.display()
            )));
        }
        {
            let mut sessions = lock(&self.state.debug);
            if sessions.len() >= MAX_DEBUG_SESSIONS {
                // Ended and never waited for: dropped to make room (only
                // when full, so that a short session's wait finds it).
                sessions.retain(|_, p| !p.exited());
            }
            if sessions.contains_key(&req.session_id) {
                return Err(status::error(
                    Code::ALREADY_EXISTS,
                    format!("debug session {:?} exists already", req.session_id),
                ));
            }
            if sessions.len() >= MAX_DEBUG_SESSIONS {
                return Err(precondition(format!(
                    "{MAX_DEBUG_SESSIONS} debug sessions run already"
                )));
            }
        }
        let stdio = req.stdio.clone().unwrap_or_default();
        let what = format!("debug session {}", req.session_id);
        let step = |s: &str, e: &dyn std::fmt::Display| internal(format!("{what}: {s}: {e}"));
        let plan = self.claim_stdio(&stdio)?;
        let (stdin, stdout, stderr, master) = if stdio.terminal {
            let pty = nix::pty::openpty(None, None).map_err(|e| step("opening a pty", &e))?;
            // openpty leaves both ends inheritable: the slave would stay
            // open beside 0-2 in the shell (and keep the pty alive after
            // it), the master in every later session.
            for fd in [&pty.master, &pty.slave] {
                nix::fcntl::fcntl(
                    fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                )
                .map_err(|e| step("making the pty close-on-exec", &e))?;
            }
            set_winsize(&pty.master, stdio.rows, stdio.cols)
                .map_err(|e| step("setting the window size", &e))?;
            let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| step("the pty", &e));
            (
                dup(&pty.slave)?,
                dup(&pty.slave)?,
                pty.slave,
                Some(pty.master),
            )
        } else {
            (plan.stdin, plan.stdout, plan.stderr, None)
        };
        let containers = share.join("containers");
        let cwd: PathBuf = if containers.is_dir() {
            containers
        } else {
            PathBuf::from("/")
        };
        let mut cmd = std::process::Command::new(&busybox);
        cmd.args(busybox_args(&req.args))
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/")
            .env("PS1", r"isola-debug:\w# ")
            .env("ISOLA_BUSYBOX", &busybox)
            .env("ISOLA_APPLETS", APPLETS)
            .current_dir(&cwd)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr);
        for kv in &req.env {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
        let terminal = stdio.terminal;
        // SAFETY: between fork and exec the closure calls only
        // async-signal-safe functions (setsid, ioctl, signal) on this
        // process's own descriptors.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if terminal && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for sig in [
                    libc::SIGINT,
                    libc::SIGQUIT,
                    libc::SIGTERM,
                    libc::SIGHUP,
                    libc::SIGTSTP,
                    libc::SIGTTIN,
                    libc::SIGTTOU,
                ] {
                    libc::signal(sig, libc::SIG_DFL);
                }
                Ok(())
            });
        }
        let mark = lock(&self.state.router).mark();
        let child = cmd.spawn().map_err(|e| step("starting busybox", &e))?;
        // The reaper collects it (never `wait` here).
        let pid = child.id();
        drop(child);
        drop(cmd);
        let proc = self.start_process(
            "",
            &req.session_id,
            pid,
            Path::new(sandbox::CGROUP_ROOT),
            plan.copies,
            &stdio,
            None,
            master,
        );
        let proc: Arc<Proc> = match proc {
            Ok(p) => p,
            Err(e) => {
                let _ = super::kill_raw(pid, libc::SIGKILL);
                return Err(e);
            }
        };
        lock(&self.state.debug).insert(req.session_id.clone(), proc.clone());
        self.state.register(proc, mark);
        tracing::warn!(
            session = %req.session_id,
            who = ?req.who,
            command = ?req.args,
            terminal,
            pid,
            "debug session started"
        );
        Ok(pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(args: &[&str], env: &[&str]) -> StartDebugSessionRequest {
        StartDebugSessionRequest {
            session_id: "s1".into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            who: "uid=0 user=root".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_shell_or_the_command_follows_the_setup() {
        let argv = busybox_args(&[]);
        assert_eq!(argv[..2], ["sh".to_string(), "-c".to_string()]);
        assert!(argv[2].contains("--install -s") && argv[2].ends_with(r#"exec "$@""#));
        assert_eq!(argv[3..], ["isola-debug".to_string(), "sh".to_string()]);
        let argv = busybox_args(&["cat".into(), "/proc/1/comm".into()]);
        assert_eq!(argv[4..], ["cat".to_string(), "/proc/1/comm".to_string()]);
    }

    #[test]
    fn requests_are_bounded_and_checked() {
        assert_eq!(check_request(&req(&["ls", "-l"], &["TERM=xterm"])), Ok(()));
        assert!(check_request(&req(&[""], &[])).is_err());
        assert!(check_request(&req(&["a\0b"], &[])).is_err());
        assert!(check_request(&req(&[], &["NOEQUALS"])).is_err());
        assert!(check_request(&req(&[], &["1X=y"])).is_err());
        assert!(check_request(&req(&[], &["A-B=y"])).is_err());
        let many: Vec<String> = (0..MAX_ARGS + 1).map(|n| n.to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(check_request(&req(&many, &[])).is_err());
        let mut long = req(&[], &[]);
        long.who = "x".repeat(MAX_WHO + 1);
        assert!(check_request(&long).is_err());
    }
}
