//! Debug sessions, host side (`isola debug`): the static busybox served
//! in a sandbox's share when the node enables `debug.console`, and a
//! client that starts a session in the guest (`StartDebugSession`) and
//! drives it (stdio streams, window size, wait) straight through the
//! sandbox's hybrid vsock socket, beside the sandbox's runner.
//!
//! Stream ids of a session are taken from a range the runner never uses
//! (the runner counts from 1; a session's ids have bit 62 set and the
//! client's pid in them), so the two never claim each other's streams.

use std::io::{self, Read};
use std::path::Path;
use std::time::Duration;

use isola_protocol::agent as pb;
use isola_protocol::{AgentClient, HealthClient, AGENT_VSOCK_PORT, DEBUG_BUSYBOX};
use protobuf::MessageField;

use crate::error::{Error, ErrorKind, Result};
use crate::sandbox::ctx;
use crate::share::{self, BindMode, Layout};
use crate::stdio::{self, ProcessIo, StdioRequest, WindowSize};
use crate::ExitStatus;

/// The agent API version that has debug sessions.
pub const DEBUG_API_VERSION: u32 = 7;

/// How long reaching the agent may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call other than the wait may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `path` is a statically linked x86-64 ELF executable (no program
/// interpreter): the guest has no dynamic loader or libc to run another.
pub fn is_static_elf(path: &Path) -> io::Result<bool> {
    let mut file = std::fs::File::open(path)?;
    let mut head = [0u8; 64];
    file.read_exact(&mut head)?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        // Not a little-endian 64-bit ELF.
        return Ok(false);
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]);
    const EM_X86_64: u16 = 62;
    if u16_at(18) != EM_X86_64 {
        // Another CPU's: the guest cannot run it.
        return Ok(false);
    }
    let phoff = u64::from_le_bytes(head[32..40].try_into().unwrap_or([0; 8]));
    let phentsize = usize::from(u16_at(54));
    let phnum = usize::from(u16_at(56));
    // An ELF64 program header is 56 bytes; the table is read whole.
    if !(56..=256).contains(&phentsize) || phnum == 0 || phnum > 256 {
        return Ok(false);
    }
    use std::io::Seek;
    file.seek(io::SeekFrom::Start(phoff))?;
    let mut table = vec![0u8; phentsize * phnum];
    file.read_exact(&mut table)?;
    const PT_INTERP: u32 = 3;
    Ok(table
        .chunks(phentsize)
        .all(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) != PT_INTERP))
}

/// Serves `busybox` read-only at `debug/busybox` in the share of
/// `layout` (made `nosuid,nodev` like every bind of the share).
pub fn serve_busybox(layout: &Layout, busybox: &Path) -> io::Result<()> {
    let static_elf = is_static_elf(busybox).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("debug.busybox {}: {e}", busybox.display()),
        )
    })?;
    if !static_elf {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "debug.busybox {} is not a static x86-64 executable (Debian's busybox-static \
                 installs one as /bin/busybox)",
                busybox.display()
            ),
        ));
    }
    let target = layout.rw().join(DEBUG_BUSYBOX);
    let staging = layout.staging().join("debug-busybox");
    for op in share::plan_bind(
        busybox,
        &target,
        BindMode {
            readonly: true,
            private: true,
        },
        &staging,
    ) {
        share::apply(&op)?;
    }
    Ok(())
}

/// A debug session in a sandbox's guest.
pub struct Session {
    sandbox: String,
    id: String,
    agent: AgentClient,
    /// The session process's pid in the guest.
    pub pid: u32,
    /// Its stdio (with a terminal: stdin and stdout).
    pub io: ProcessIo,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("sandbox", &self.sandbox)
            .field("id", &self.id)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

/// What a session runs.
#[derive(Debug, Clone, Default)]
pub struct SessionRequest {
    /// The command; empty: the shell.
    pub args: Vec<String>,
    /// KEY=VALUE pairs for its environment.
    pub env: Vec<String>,
    /// A terminal of this size, or pipes.
    pub terminal: Option<WindowSize>,
    /// Who asks, for the guest's log.
    pub who: String,
}

impl Session {
    /// Starts a session in the sandbox `sandbox` whose run directory is
    /// `dir`.
    pub async fn start(sandbox: &str, dir: &Path, req: &SessionRequest) -> Result<Session> {
        let layout = Layout::new(dir);
        let vsock = layout.vsock_socket();
        let client = isola_protocol::hybrid::dial_agent(&vsock, AGENT_VSOCK_PORT, DIAL_TIMEOUT)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unavailable,
                    sandbox,
                    "reaching the agent",
                    e.to_string(),
                )
            })?;
        let version = HealthClient::new(client.clone())
            .version(ctx(CALL_TIMEOUT), &pb::VersionRequest::new())
            .await
            .map_err(|e| Error::agent(sandbox, "Health.Version", e))?;
        if version.api_version < DEBUG_API_VERSION {
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                sandbox,
                "starting a debug session",
                format!(
                    "its agent ({}) speaks api_version {}; debug sessions need {DEBUG_API_VERSION}",
                    version.agent_version, version.api_version
                ),
            ));
        }
        let wanted = StdioRequest {
            stdin: true,
            stdout: true,
            stderr: req.terminal.is_none(),
            terminal: req.terminal,
        };
        let base = (1u64 << 62) | (u64::from(std::process::id()) << 8);
        let mut n = 0u64;
        let (ids, io) = stdio::open(&vsock, &wanted, || {
            n += 1;
            base | n
        })
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                sandbox,
                "opening the session's stdio",
                e.to_string(),
            )
        })?;
        let id = session_id(std::process::id(), now_ms());
        let request = pb::StartDebugSessionRequest {
            session_id: id.clone(),
            args: req.args.clone(),
            env: req.env.clone(),
            stdio: MessageField::some(ids.to_pb(req.terminal)),
            who: req.who.clone(),
            ..Default::default()
        };
        let agent = AgentClient::new(client);
        let started = agent
            .start_debug_session(ctx(CALL_TIMEOUT), &request)
            .await
            .map_err(|e| Error::agent(sandbox, "StartDebugSession", e))?;
        Ok(Session {
            sandbox: sandbox.to_string(),
            id,
            agent,
            pid: started.pid,
            io,
        })
    }

    /// The session's id (the exec id the agent knows it by).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Sets its terminal's size.
    pub async fn resize(&self, size: WindowSize) -> Result<()> {
        let req = pb::TtyWinResizeRequest {
            container_id: String::new(),
            exec_id: self.id.clone(),
            rows: u32::from(size.rows),
            cols: u32::from(size.cols),
            ..Default::default()
        };
        self.agent
            .tty_win_resize(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| Error::agent(&self.sandbox, "TtyWinResize", e))?;
        Ok(())
    }

    /// Waits for the session to end (its output carried to its end).
    pub async fn wait(&self) -> Result<ExitStatus> {
        let req = pb::WaitProcessRequest {
            container_id: String::new(),
            exec_id: self.id.clone(),
            ..Default::default()
        };
        let resp = self
            .agent
            .wait_process(ctx(Duration::ZERO), &req)
            .await
            .map_err(|e| Error::agent(&self.sandbox, "WaitProcess", e))?;
        Ok(ExitStatus::from(&resp))
    }

    /// Sends `signal` to the session's process.
    pub async fn signal(&self, signal: u32) -> Result<()> {
        let req = pb::SignalProcessRequest {
            container_id: String::new(),
            exec_id: self.id.clone(),
            signal,
            ..Default::default()
        };
        self.agent
            .signal_process(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| Error::agent(&self.sandbox, "SignalProcess", e))?;
        Ok(())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A session's id: the exec id rule (alphanumeric first, at most 64).
pub fn session_id(pid: u32, ms: u64) -> String {
    format!("debug-{pid}-{ms}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_follow_the_id_rule() {
        let id = session_id(u32::MAX, u64::MAX);
        assert!(id.len() <= 64, "{id}");
        assert!(isola_protocol::status::check_id("exec_id", &id).is_ok());
    }

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        // The test binary itself is dynamically linked.
        let me = std::env::current_exe().expect("exe");
        assert!(!is_static_elf(&me).expect("read"));
        let dir = tempfile::tempdir().expect("tempdir");
        let text = dir.path().join("script");
        std::fs::write(&text, "#!/bin/sh\necho hi\n".repeat(10)).expect("write");
        assert!(!is_static_elf(&text).expect("read"));
        let busybox = Path::new("/bin/busybox");
        if busybox.exists() {
            // Debian's busybox-static.
            assert!(is_static_elf(busybox).expect("read"));
            // The same for another CPU (e_machine 183, aarch64): refused.
            let mut other = std::fs::read(busybox).expect("read");
            other[18..20].copy_from_slice(&183u16.to_le_bytes());
            let arm = dir.path().join("busybox-arm64");
            std::fs::write(&arm, other).expect("write");
            assert!(!is_static_elf(&arm).expect("read"));
        }
    }
}
