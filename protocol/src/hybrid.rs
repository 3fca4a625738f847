//! Host side of *hybrid vsock*: reaching a guest vsock port through the
//! VMM's Unix socket, as Firecracker (and Cloud Hypervisor, Dragonball)
//! expose it.
//!
//! The host connects to the VMM's socket and writes `CONNECT <port>\n`. The
//! VMM opens a vsock connection to that port of the guest and, once the
//! guest accepted it, answers `OK <hostport>\n` (`hostport` is the host-side
//! vsock port the VMM picked); from then on the Unix stream carries the
//! guest connection's bytes. When nothing listens on the guest port, the VMM
//! closes the socket instead of answering.
//!
//! [`connect`] performs one handshake; [`dial_agent`] retries it while the
//! guest boots and returns a ttrpc client.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// Most bytes the VMM's answer may have, its newline included; reading
/// stops there. `OK 4294967295\n` has 14.
pub const MAX_ANSWER_LEN: usize = 32;

/// First pause between two handshakes in [`dial_agent`]; it doubles up to
/// [`MAX_RETRY_DELAY`].
pub const FIRST_RETRY_DELAY: Duration = Duration::from_millis(10);

/// Longest pause between two handshakes in [`dial_agent`].
pub const MAX_RETRY_DELAY: Duration = Duration::from_millis(200);

/// The pause in [`dial_agent`] while the VMM's socket is not there (or
/// not listening) yet: it comes a few milliseconds after the VMM starts,
/// before the VM is built, and a handshake on it then waits for the
/// guest; a failed `connect` costs the host one system call.
pub const SOCKET_POLL: Duration = Duration::from_millis(5);

/// How long [`dial_agent`] pauses after `error`: [`SOCKET_POLL`] while
/// the VMM's socket is missing, else `delay`, which doubles (up to
/// [`MAX_RETRY_DELAY`]) for the next guest-side failure.
fn pause_after(error: &Error, delay: &mut Duration) -> Duration {
    if matches!(error, Error::Connect { .. }) {
        return SOCKET_POLL;
    }
    let pause = *delay;
    *delay = (*delay * 2).min(MAX_RETRY_DELAY);
    pause
}

/// The result of this module's functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What is wrong with the VMM's answer to `CONNECT`. The received bytes are
/// shown escaped and at most [`MAX_ANSWER_LEN`] of them.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AnswerError {
    /// The VMM closed the connection without a byte: no process listens on
    /// that guest port (yet), or the guest refused the connection.
    #[error(
        "the VMM closed the connection without answering (nothing listening on the guest port?)"
    )]
    Closed,
    /// The answer has no newline: the VMM closed the connection mid-line.
    #[error("the answer {0} ends without a newline")]
    Unterminated(Received),
    /// [`MAX_ANSWER_LEN`] bytes came without a newline.
    #[error("the answer {0} has no newline within {MAX_ANSWER_LEN} bytes")]
    TooLong(Received),
    /// A complete line that is not `OK <u32>`.
    #[error("the answer {0} is not \"OK <port>\\n\"")]
    Malformed(Received),
    /// Bytes after the answer's newline (only possible with [`parse_answer`]
    /// called on more than one line).
    #[error("the answer {0} has bytes after its newline")]
    TrailingBytes(Received),
}

impl AnswerError {
    /// True when the VMM answered as it does while the guest port has no
    /// listener, so that a later handshake can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, AnswerError::Closed | AnswerError::Unterminated(_))
    }
}

/// Bytes received from the VMM, kept for an error message: displayed in
/// double quotes, escaped (`\n`, `\x00`, ...), cut at [`MAX_ANSWER_LEN`]
/// bytes with the full length noted.
#[derive(Clone, PartialEq, Eq)]
pub struct Received {
    bytes: Vec<u8>,
    len: usize,
}

impl Received {
    fn new(bytes: &[u8]) -> Received {
        Received {
            bytes: bytes[..bytes.len().min(MAX_ANSWER_LEN)].to_vec(),
            len: bytes.len(),
        }
    }

    /// The bytes received (their first [`MAX_ANSWER_LEN`]).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Display for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.bytes.escape_ascii())?;
        if self.len > self.bytes.len() {
            write!(f, "... ({} bytes)", self.len)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Parses the VMM's answer to `CONNECT`: `received` is everything read, up
/// to and including the first newline. Returns the host-side port of an
/// `OK <port>\n` answer.
///
/// Strict: exactly `OK`, one space, the decimal digits of a `u32`, `\n`,
/// nothing else (no `\r`, sign, extra field or trailing byte), and at most
/// [`MAX_ANSWER_LEN`] bytes.
pub fn parse_answer(received: &[u8]) -> Result<u32, AnswerError> {
    if received.is_empty() {
        return Err(AnswerError::Closed);
    }
    let Some(newline) = received.iter().position(|&b| b == b'\n') else {
        return Err(if received.len() >= MAX_ANSWER_LEN {
            AnswerError::TooLong(Received::new(received))
        } else {
            AnswerError::Unterminated(Received::new(received))
        });
    };
    if newline >= MAX_ANSWER_LEN {
        return Err(AnswerError::TooLong(Received::new(received)));
    }
    if newline + 1 != received.len() {
        return Err(AnswerError::TrailingBytes(Received::new(received)));
    }
    let malformed = || AnswerError::Malformed(Received::new(received));
    let digits = received[..newline]
        .strip_prefix(b"OK ")
        .ok_or_else(malformed)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(malformed());
    }
    // All ASCII digits, so UTF-8; parse fails only on overflow.
    std::str::from_utf8(digits)
        .ok()
        .and_then(|digits| digits.parse::<u32>().ok())
        .ok_or_else(malformed)
}

/// A failure to reach a guest port through a VMM's hybrid-vsock socket.
/// Every message names the socket and the guest port.
#[derive(Debug, Error)]
pub enum Error {
    /// The VMM's socket could not be connected to (it does not exist yet,
    /// nobody listens on it, permissions...).
    #[error("hybrid vsock {}, guest port {port}: connecting to the VMM's socket: {error}", socket.display())]
    Connect {
        /// The VMM's Unix socket.
        socket: PathBuf,
        /// The guest vsock port.
        port: u32,
        /// Why the connection failed.
        error: io::Error,
    },
    /// Writing `CONNECT` or reading the answer failed.
    #[error("hybrid vsock {}, guest port {port}: {stage}: {error}", socket.display())]
    Io {
        /// The VMM's Unix socket.
        socket: PathBuf,
        /// The guest vsock port.
        port: u32,
        /// What was being done.
        stage: &'static str,
        /// The I/O error.
        error: io::Error,
    },
    /// The VMM's answer was not `OK <port>\n`.
    #[error("hybrid vsock {}, guest port {port}: {answer}", socket.display())]
    Answer {
        /// The VMM's Unix socket.
        socket: PathBuf,
        /// The guest vsock port.
        port: u32,
        /// What was wrong with the answer.
        answer: AnswerError,
    },
    /// The handshake did not finish in time.
    #[error("hybrid vsock {}, guest port {port}: no answer to CONNECT within {timeout:?}", socket.display())]
    Timeout {
        /// The VMM's Unix socket.
        socket: PathBuf,
        /// The guest vsock port.
        port: u32,
        /// The time the handshake had.
        timeout: Duration,
    },
    /// [`dial_agent`] ran out of time; `last` is the last handshake's
    /// failure.
    #[error(
        "agent not reachable through hybrid vsock {}, guest port {port}, within {deadline:?} \
         ({attempts} attempts); last failure: {last}",
        socket.display()
    )]
    Deadline {
        /// The VMM's Unix socket.
        socket: PathBuf,
        /// The guest vsock port.
        port: u32,
        /// The time [`dial_agent`] had.
        deadline: Duration,
        /// How many handshakes were tried.
        attempts: u32,
        /// The last handshake's failure.
        last: Box<Error>,
    },
}

impl Error {
    /// True for the failures seen while a VMM or its guest is still starting
    /// (socket missing or refusing, port without listener, no answer yet),
    /// which [`dial_agent`] retries; false for an answer that no hybrid-vsock
    /// VMM gives, which retrying would not change.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Io { .. } | Error::Timeout { .. } => true,
            Error::Answer { answer, .. } => answer.is_transient(),
            Error::Deadline { .. } => false,
        }
    }
}

/// Connects to guest vsock `port` through the VMM's hybrid-vsock `socket`,
/// doing one handshake within `timeout`. The returned stream carries the
/// guest connection, from its first byte.
pub async fn connect(socket: &Path, port: u32, timeout: Duration) -> Result<UnixStream> {
    match tokio::time::timeout(timeout, handshake(socket, port)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(Error::Timeout {
            socket: socket.to_path_buf(),
            port,
            timeout,
        }),
    }
}

async fn handshake(socket: &Path, port: u32) -> Result<UnixStream> {
    let io_error = |stage: &'static str| {
        move |error: io::Error| Error::Io {
            socket: socket.to_path_buf(),
            port,
            stage,
            error,
        }
    };
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|error| Error::Connect {
            socket: socket.to_path_buf(),
            port,
            error,
        })?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io_error("writing CONNECT"))?;
    let received = read_answer(&mut stream)
        .await
        .map_err(io_error("reading the answer to CONNECT"))?;
    let host_port = parse_answer(&received).map_err(|answer| Error::Answer {
        socket: socket.to_path_buf(),
        port,
        answer,
    })?;
    tracing::debug!(socket = %socket.display(), port, host_port, "hybrid vsock connected");
    Ok(stream)
}

/// Reads the answer line one byte at a time, so that no byte of the guest
/// connection that may follow it is consumed: up to and including the first
/// newline, at most [`MAX_ANSWER_LEN`] bytes, or until end of file.
async fn read_answer(stream: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut received = Vec::with_capacity(MAX_ANSWER_LEN);
    let mut byte = [0u8; 1];
    while received.len() < MAX_ANSWER_LEN {
        match stream.read(&mut byte).await {
            Ok(0) => break,
            Ok(_) => {
                received.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                // A reset is how some VMMs refuse: the same as a close.
                if err.kind() == io::ErrorKind::ConnectionReset && received.is_empty() {
                    break;
                }
                return Err(err);
            }
        }
    }
    Ok(received)
}

/// Dials the agent's ttrpc API at guest vsock `port` through the VMM's
/// hybrid-vsock `socket`, retrying while the VMM or the agent is still
/// starting (every 5 ms while the socket is missing; after the guest's
/// side failed, after 10 ms, doubling up to 200 ms), until `deadline`
/// has passed. Each handshake has the time left.
///
/// Fails at once, without retrying, on an answer that is not the hybrid
/// vsock protocol. Needs a tokio runtime (the client runs a task on it).
pub async fn dial_agent(
    socket: &Path,
    port: u32,
    deadline: Duration,
) -> Result<ttrpc::asynchronous::Client> {
    let start = Instant::now();
    // A deadline too far to represent is as good as none: ~100 years.
    let end = start
        .checked_add(deadline)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 3600));
    let mut delay = FIRST_RETRY_DELAY;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let left = end.saturating_duration_since(Instant::now());
        let error = match connect(socket, port, left).await {
            Ok(stream) => {
                tracing::debug!(
                    socket = %socket.display(),
                    port,
                    attempts,
                    elapsed_ms = start.elapsed().as_millis() as u64,
                    "agent dialed"
                );
                return Ok(ttrpc::asynchronous::Client::new(stream.into()));
            }
            Err(error) => error,
        };
        if !error.is_transient() {
            return Err(error);
        }
        let left = end.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            tracing::trace!(%error, attempts, "agent not reachable yet; retrying");
            tokio::time::sleep(pause_after(&error, &mut delay).min(left)).await;
        }
        if Instant::now() >= end {
            return Err(Error::Deadline {
                socket: socket.to_path_buf(),
                port,
                deadline,
                attempts,
                last: Box::new(error),
            });
        }
    }
}

#[doc(hidden)]
pub mod fuzzing;

#[cfg(test)]
mod tests;
