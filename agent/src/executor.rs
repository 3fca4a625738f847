//! The agent's libcontainer executor: the last steps in the container
//! process before it execs its program.
//!
//! - `validate` (after pivot_root, before the start signal): finds the
//!   program (absolute, or on the process's `PATH`), so a missing binary
//!   fails `CreateContainer`/`ExecProcess`, and, for a container's init,
//!   closes the agent's descriptors it inherited that carry end-of-file
//!   meaning: pipes and vsock streams of other processes. libcontainer
//!   only marks them close-on-exec, and an init that waits for
//!   `StartContainer` would otherwise keep another process's stdin open
//!   or its stream from closing.
//! - `exec`: installs the container's seccomp filters (`seccomp`), then
//!   execs.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};

use crate::seccomp::{self, Compiled};

/// PATH when the process has none (runc's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, Default)]
pub struct IsolaExecutor {
    pub seccomp: Option<Arc<Compiled>>,
    /// Close inherited pipes and vsock sockets in `validate` (a
    /// container's init only: an exec has libcontainer's own pipe open
    /// there).
    pub close_inherited: bool,
}

fn args(spec: &Spec) -> Option<&Vec<String>> {
    spec.process()
        .as_ref()
        .and_then(|p| p.args().as_ref())
        .filter(|a| !a.is_empty())
}

fn env_path(spec: &Spec) -> String {
    spec.process()
        .as_ref()
        .and_then(|p| p.env().as_ref())
        .and_then(|env| {
            env.iter()
                .rev()
                .find_map(|e| e.strip_prefix("PATH=").map(str::to_string))
        })
        .unwrap_or_else(|| DEFAULT_PATH.to_string())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The program `name` resolves to, as execvp would find it.
pub fn resolve(name: &str, path_var: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    path_var
        .split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(name))
        .find(|p| is_executable(p))
}

/// Whether `fd` is a pipe or a vsock socket.
fn carries_eof(fd: i32) -> bool {
    // SAFETY: fstat writes into the zeroed struct; an fd that is not open
    // gives EBADF and we skip it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: see above; `st` is a valid, writable stat.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFIFO => true,
        libc::S_IFSOCK => {
            let mut domain: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `domain`.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_DOMAIN,
                    (&mut domain as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            rc == 0 && domain == libc::AF_VSOCK
        }
        _ => false,
    }
}

fn close_inherited_streams() {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        // No /proc in the container: every descriptor a default limit
        // allows.
        Err(_) => (3..1024).collect(),
    };
    for fd in fds.into_iter().filter(|&fd| fd > 2) {
        if carries_eof(fd) {
            // SAFETY: closing a descriptor this process inherited from the
            // agent and will never use (libcontainer's own are unix
            // sockets, which are kept).
            unsafe { libc::close(fd) };
        }
    }
}

/// Gives the process the signal state a freshly started program expects:
/// every disposition default and nothing blocked. exec(2) keeps ignored
/// signals and the mask, and the agent (a Rust program) ignores SIGPIPE,
/// so without this `yes | head` would see EPIPE instead of dying quietly.
fn default_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator().filter(|s| !matches!(s, Signal::SIGKILL | Signal::SIGSTOP)) {
        // SAFETY: installs SIG_DFL, no handler function; this process is
        // single-threaded and about to exec.
        let _ = unsafe { sigaction(sig, &dfl) };
    }
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

impl Executor for IsolaExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let args = args(spec).ok_or(ExecutorError::InvalidArg)?;
        let program = resolve(&args[0], &env_path(spec))
            .ok_or_else(|| ExecutorError::Other(format!("executable {:?} not found", args[0])))?;
        let program = CString::new(program.as_os_str().as_encoded_bytes())
            .map_err(|_| ExecutorError::InvalidArg)?;
        let argv: Vec<CString> = args
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| ExecutorError::InvalidArg)?;
        default_signals();
        if let Some(compiled) = &self.seccomp {
            seccomp::install_all(compiled).map_err(|e| {
                ExecutorError::Other(format!("installing the seccomp filters: {e}"))
            })?;
        }
        // The environment was set by libcontainer (setup_envs).
        let err = nix::unistd::execv(&program, &argv).err();
        Err(ExecutorError::Other(format!(
            "exec {:?}: {}",
            args[0],
            err.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        let args = args(spec).ok_or_else(|| {
            ExecutorValidationError::ArgValidationError("process.args is empty".into())
        })?;
        if resolve(&args[0], &env_path(spec)).is_none() {
            return Err(ExecutorValidationError::ArgValidationError(format!(
                "executable {:?} not found in the container (PATH={})",
                args[0],
                env_path(spec)
            )));
        }
        if self.close_inherited {
            close_inherited_streams();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_execvp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("tool");
        std::fs::write(&bin, "#!/bin/sh\n").expect("write");
        let data = dir.path().join("data");
        std::fs::write(&data, "x").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = format!("/nonexistent:{}", dir.path().display());
        assert_eq!(resolve("tool", &path), Some(bin.clone()));
        assert_eq!(resolve("data", &path), None, "not executable");
        assert_eq!(resolve(bin.to_str().expect("utf8"), ""), Some(bin));
        assert_eq!(resolve("missing", &path), None);
    }

    #[test]
    fn pipes_carry_eof_and_files_do_not() {
        use std::os::fd::AsRawFd;
        let (r, w) = crate::streams::pipe().expect("pipe");
        assert!(carries_eof(r.as_raw_fd()) && carries_eof(w.as_raw_fd()));
        let f = std::fs::File::open("/proc/self/status").expect("file");
        assert!(!carries_eof(f.as_raw_fd()));
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert!(
            !carries_eof(a.as_raw_fd()),
            "unix sockets are libcontainer's"
        );
    }
}
