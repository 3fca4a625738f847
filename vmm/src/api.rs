//! The control API: one JSON object per line over a Unix socket.
//!
//! Requests: `{"action":"info"}`, `{"action":"pause"}`,
//! `{"action":"resume"}`, `{"action":"shutdown"}` (Ctrl-Alt-Del to the
//! guest, which powers off; after `timeout_ms` (default 10000) the VM is
//! stopped anyway), `{"action":"stop"}` (immediately). Every request gets
//! one line back: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//!
//! An API thread accepts connections and parses requests; the VMM's event
//! loop executes them (it is woken by an eventfd) and sends the reply back.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// Longest request line accepted.
pub const MAX_REQUEST: u64 = 4096;

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

/// The listening socket; removes its file on drop.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
}

impl ApiServer {
    /// Binds `path` and starts the API thread. Calls arrive on the returned
    /// receiver, each announced by a write to `notify`.
    pub fn start(path: &Path, notify: EventFd) -> std::io::Result<(ApiServer, Receiver<Call>)> {
        if path.exists() {
            // A live VMM still answers there; a stale file does not.
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is in use by another VMM", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("api".into())
            .stack_size(256 << 10)
            .spawn(move || serve(listener, tx, notify))?;
        Ok((
            ApiServer {
                path: path.to_path_buf(),
            },
            rx,
        ))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: UnixListener, calls: Sender<Call>, notify: EventFd) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if handle(stream, &calls, &notify).is_err() {
            // The client went away or the VMM is ending.
        }
    }
}

fn handle(stream: UnixStream, calls: &Sender<Call>, notify: &EventFd) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
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
        let (server, calls) = ApiServer::start(&path, notify.try_clone().unwrap()).unwrap();
        // A second VMM on the same socket is refused.
        let err = ApiServer::start(&path, notify.try_clone().unwrap()).unwrap_err();
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
}
