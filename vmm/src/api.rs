//! The control API: one JSON object per line over a Unix socket.
//!
//! Requests: `{"action":"info"}`, `{"action":"pause"}`,
//! `{"action":"resume"}`, `{"action":"shutdown"}` (Ctrl-Alt-Del to the
//! guest, which powers off; after `timeout_ms` (default 10000) the VM is
//! stopped anyway), `{"action":"stop"}` (immediately). Every request gets
//! one line back: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//!
//! An API thread accepts connections; each client is served on a thread
//! of its own (at most [`MAX_CLIENTS`] at once, each with
//! [`READ_TIMEOUT`] to send its line), so a client that connects and says
//! nothing delays nobody. The VMM's event loop executes the parsed
//! requests (it is woken by an eventfd) and sends the reply back. When the
//! process runs out of file descriptors, accepting pauses briefly instead
//! of spinning.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// Longest request line accepted.
pub const MAX_REQUEST: u64 = 4096;

/// Clients served at once; more are answered with an error and closed.
pub const MAX_CLIENTS: usize = 8;

/// How long a client has to send its request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long accepting pauses after the process ran out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Request {
    Info,
    Pause,
    Resume,
    Shutdown {
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    Stop,
    /// A template VMM (`--template DIR`) saves the VM into DIR and exits;
    /// the reply comes once the state is written.
    Snapshot,
}

/// A request and where its reply goes.
#[derive(Debug)]
pub struct Call {
    pub request: Request,
    pub reply: Sender<serde_json::Value>,
}

/// Parses one request line; the error is sent back to the client.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))
}

/// The listening socket; removes its file on drop (unless jailed: the
/// path is not in the jail, and its owner removes it).
#[derive(Debug)]
pub struct ApiServer {
    path: Option<PathBuf>,
}

/// A bound API socket whose thread has not started yet (bound before the
/// jail, served inside it).
#[derive(Debug)]
pub struct ApiListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiListener {
    /// Binds `path`, replacing a stale socket nothing answers on.
    pub fn bind(path: &Path) -> std::io::Result<ApiListener> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            // A live VMM still answers there; a stale socket does not.
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is in use by another VMM", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(ApiListener {
            listener: UnixListener::bind(path)?,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ApiServer {
    /// Binds `path` and starts the API thread (see [`ApiServer::serve`]).
    pub fn start(
        path: &Path,
        notify: EventFd,
        seccomp: bool,
    ) -> std::io::Result<(ApiServer, Receiver<Call>)> {
        ApiServer::serve(ApiListener::bind(path)?, notify, seccomp, false)
    }

    /// Starts the API thread on `listener`. Calls arrive on the returned
    /// receiver, each announced by a write to `notify`. With `seccomp`,
    /// the API threads run under the API filter; `jailed`: the socket's
    /// file is left alone at the end.
    pub fn serve(
        listener: ApiListener,
        notify: EventFd,
        seccomp: bool,
        jailed: bool,
    ) -> std::io::Result<(ApiServer, Receiver<Call>)> {
        let ApiListener { listener, path } = listener;
        let (tx, rx) = mpsc::channel();
        crate::seccomp::spawn_filtered(
            "api",
            256 << 10,
            seccomp.then_some(crate::seccomp::ThreadKind::Api),
            move || serve(listener, tx, notify),
        )?;
        Ok((
            ApiServer {
                path: (!jailed).then_some(path),
            },
            rx,
        ))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn serve(listener: UnixListener, calls: Sender<Call>, notify: EventFd) {
    let Ok(notify) = notify.try_clone().map(Arc::new) else {
        return;
    };
    let active = Arc::new(AtomicUsize::new(0));
    let mut limiter = crate::guest_log::LogLimiter::new("api");
    loop {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    crate::metrics::inc(&crate::metrics::METRICS.fd_exhaustion);
                }
                if limiter.allow() {
                    tracing::warn!("API: accepting a client: {e}");
                }
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= MAX_CLIENTS {
            let _ = writeln!(
                stream,
                "{}",
                serde_json::json!({"ok": false, "error": format!("more than {MAX_CLIENTS} API clients at once")})
            );
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (calls, notify, done) = (calls.clone(), notify.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("api-client".into())
            .stack_size(128 << 10)
            .spawn(move || {
                // The client went away or the VMM is ending: nothing to do.
                let _ = handle(stream, &calls, &notify);
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn handle(stream: UnixStream, calls: &Sender<Call>, notify: &EventFd) -> std::io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream.take(MAX_REQUEST));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let reply = if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST {
        serde_json::json!({"ok": false, "error": format!("request longer than {MAX_REQUEST} bytes")})
    } else {
        match parse_request(&line) {
            Ok(request) => {
                let (tx, rx) = mpsc::channel();
                if calls.send(Call { request, reply: tx }).is_err() {
                    return Ok(());
                }
                notify.write(1)?;
                match rx.recv_timeout(Duration::from_secs(60)) {
                    Ok(v) => v,
                    Err(_) => serde_json::json!({"ok": false, "error": "the VMM did not answer"}),
                }
            }
            Err(error) => serde_json::json!({"ok": false, "error": error}),
        }
    };
    writeln!(writer, "{reply}")?;
    Ok(())
}

/// Sends one request to a VMM's API socket and returns its reply (a
/// client for tests and tools).
pub fn call(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> std::io::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    let line = serde_json::to_string(request).map_err(std::io::Error::other)?;
    writeln!(stream, "{line}")?;
    let mut reply = String::new();
    BufReader::new(stream.take(1 << 20)).read_line(&mut reply)?;
    serde_json::from_str(&reply).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        assert_eq!(parse_request(r#"{"action":"info"}"#), Ok(Request::Info));
        assert_eq!(parse_request(r#" {"action":"pause"} "#), Ok(Request::Pause));
        assert_eq!(
            parse_request(r#"{"action":"shutdown","timeout_ms":500}"#),
            Ok(Request::Shutdown {
                timeout_ms: Some(500)
            })
        );
        assert_eq!(
            parse_request(r#"{"action":"shutdown"}"#),
            Ok(Request::Shutdown { timeout_ms: None })
        );
        for bad in [
            "",
            "{",
            r#"{"action":"explode"}"#,
            r#"{"action":"shutdown","timeout_ms":"soon"}"#,
            "[]",
        ] {
            let err = parse_request(bad).unwrap_err();
            assert!(err.starts_with("bad request"), "{bad}: {err}");
        }
    }

    #[test]
    fn round_trip_over_a_socket() {
        let dir = std::env::temp_dir().join(format!("isola-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (server, calls) = ApiServer::start(&path, notify.try_clone().unwrap(), false).unwrap();
        // A second VMM on the same socket is refused.
        let err = ApiServer::start(&path, notify.try_clone().unwrap(), false).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        let t = std::thread::spawn(move || {
            let c = calls.recv().unwrap();
            assert_eq!(c.request, Request::Info);
            c.reply
                .send(serde_json::json!({"ok": true, "state": "running"}))
                .unwrap();
        });
        let reply = call(&path, &Request::Info, Duration::from_secs(5)).unwrap();
        assert_eq!(reply["state"], "running");
        t.join().unwrap();
        // Garbage gets an error reply, not a hang.
        let mut s = UnixStream::connect(&path).unwrap();
        writeln!(s, "nonsense").unwrap();
        let mut r = String::new();
        BufReader::new(s).read_line(&mut r).unwrap();
        assert!(r.contains("bad request"), "{r}");
        drop(server);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_silent_client_does_not_hold_up_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (_server, calls) = ApiServer::start(&path, notify, false).unwrap();
        let answer = std::thread::spawn(move || {
            while let Ok(c) = calls.recv() {
                let _ = c.reply.send(serde_json::json!({"ok": true}));
            }
        });
        // Connected, silent.
        let _silent: Vec<UnixStream> = (0..3)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let started = std::time::Instant::now();
        let reply = call(&path, &Request::Info, Duration::from_secs(5)).unwrap();
        assert_eq!(reply["ok"], true);
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(answer);
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("precious.txt");
        std::fs::write(&path, "keep me").unwrap();
        let err = ApiServer::start(&path, EventFd::new(0).unwrap(), false).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
    }
}
