//! Stdio and log streams: raw byte connections beside the ttrpc API.
//!
//! Every stream is its own vsock connection from the host to the agent's
//! [`STREAM_VSOCK_PORT`]. The host opens it (through the VMM's hybrid vsock
//! socket), writes one header line saying what the connection is, and the
//! agent answers one line: `ok\n`, or `error <reason>\n` and closes. After
//! `ok` the connection carries raw bytes only, with vsock's flow control as
//! the back-pressure: a host that reads slowly slows the writer in the
//! guest, and neither side buffers more than a bounded amount.
//!
//! Headers (ASCII, at most [`MAX_LINE`] bytes with the newline):
//! - `isola-stream 1 stdio <id>\n`: one direction of a process's stdio.
//!   `<id>` is a non-zero `u64` in decimal that the host chose and then
//!   names in the RPC that creates the process (`Stdio.stdin`, ...). Which
//!   direction it is follows from that RPC: the agent reads stdin from it,
//!   or writes stdout/stderr to it and closes it after the last byte (so
//!   EOF on the host means "nothing more", and it comes before the exit
//!   status is reported). The host closing (or half-closing) a stdin
//!   stream is EOF for the process.
//! - `isola-stream 1 log\n`: the agent's own log, one line per record,
//!   from the agent to the host. One log stream at a time: a new one
//!   replaces the old. Lines the host is too slow to take are dropped and
//!   counted, never allowed to block the agent.
//! - `isola-stream 1 port <port>\n`: a TCP connection to `127.0.0.1:<port>`
//!   (1 to 65535, decimal) in the sandbox's network namespace, made by the
//!   agent before it answers; after `ok` the stream carries that
//!   connection's bytes both ways, and each side's EOF is passed on. This
//!   is the guest's end of CRI PortForward (`kubectl port-forward`).

use std::fmt;

/// The guest vsock port of the stream listener (the API is on
/// [`crate::AGENT_VSOCK_PORT`]).
pub const STREAM_VSOCK_PORT: u32 = 1025;

/// The longest header or answer line, newline included.
pub const MAX_LINE: usize = 64;

const MAGIC: &str = "isola-stream";
const VERSION: &str = "1";

/// What a stream connection is, as its header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// One direction of a process's stdio, by the host's id (non-zero).
    Stdio(u64),
    /// The agent's log.
    Log,
    /// A connection to this TCP port on the sandbox's localhost (non-zero).
    Port(u16),
}

impl StreamKind {
    /// The header line the host writes first, newline included.
    pub fn header(&self) -> String {
        match self {
            StreamKind::Stdio(id) => format!("{MAGIC} {VERSION} stdio {id}\n"),
            StreamKind::Log => format!("{MAGIC} {VERSION} log\n"),
            StreamKind::Port(port) => format!("{MAGIC} {VERSION} port {port}\n"),
        }
    }
}

/// Why a header or an answer line is not the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("line is not ASCII text")]
    NotText,
    #[error("line does not end with a newline")]
    Unterminated,
    #[error("not an isola stream header: {0:?}")]
    NotHeader(String),
    #[error("stream protocol version {0:?} is not {VERSION}")]
    Version(String),
    #[error("stream id {0:?} is not a non-zero 64-bit number")]
    BadId(String),
    #[error("port {0:?} is not a TCP port from 1 to 65535")]
    BadPort(String),
    #[error("unknown stream kind {0:?}")]
    Kind(String),
    #[error("the agent refused the stream: {0}")]
    Refused(String),
    #[error("not an answer of the stream protocol: {0:?}")]
    NotAnswer(String),
}

/// The text of a complete line (`line` must end with `\n` and hold nothing
/// after it), without the newline.
fn line_text(line: &[u8]) -> Result<&str, LineError> {
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong);
    }
    let Some((&b'\n', body)) = line.split_last() else {
        return Err(LineError::Unterminated);
    };
    if body.iter().any(|&b| !(0x20..0x7f).contains(&b)) {
        return Err(LineError::NotText);
    }
    std::str::from_utf8(body).map_err(|_| LineError::NotText)
}

/// Parses a header line (newline included), as the agent does.
pub fn parse_header(line: &[u8]) -> Result<StreamKind, LineError> {
    let text = line_text(line)?;
    let mut words = text.split(' ');
    if words.next() != Some(MAGIC) {
        return Err(LineError::NotHeader(text.to_string()));
    }
    match words.next() {
        Some(VERSION) => {}
        Some(other) => return Err(LineError::Version(other.to_string())),
        None => return Err(LineError::NotHeader(text.to_string())),
    }
    // Decimal digits only, one spelling per number: no sign, no leading
    // zero; zero itself is refused.
    fn number<T: std::str::FromStr + PartialEq + Default>(word: &str) -> Option<T> {
        if word.bytes().all(|b| b.is_ascii_digit()) && !word.starts_with('0') {
            word.parse::<T>().ok().filter(|n| *n != T::default())
        } else {
            None
        }
    }
    let kind = match (words.next(), words.next()) {
        (Some("stdio"), Some(id)) => {
            StreamKind::Stdio(number(id).ok_or_else(|| LineError::BadId(id.to_string()))?)
        }
        (Some("port"), Some(port)) => {
            StreamKind::Port(number(port).ok_or_else(|| LineError::BadPort(port.to_string()))?)
        }
        (Some("log"), None) => StreamKind::Log,
        (Some(kind), _) => return Err(LineError::Kind(kind.to_string())),
        (None, _) => return Err(LineError::NotHeader(text.to_string())),
    };
    if words.next().is_some() {
        return Err(LineError::NotHeader(text.to_string()));
    }
    Ok(kind)
}

/// The agent's answer to a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ok,
    Error(String),
}

impl Answer {
    /// The line the agent writes, newline included; a long or non-ASCII
    /// reason is cut and cleaned so the line stays within [`MAX_LINE`].
    pub fn line(&self) -> String {
        match self {
            Answer::Ok => "ok\n".to_string(),
            Answer::Error(reason) => {
                let prefix = "error ";
                let room = MAX_LINE - prefix.len() - 1;
                let clean: String = reason
                    .chars()
                    .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
                    .take(room)
                    .collect();
                format!("{prefix}{clean}\n")
            }
        }
    }
}

/// Parses the agent's answer line (newline included), as the host does:
/// `Ok(())` for `ok`, the agent's reason for `error ...`.
pub fn parse_answer(line: &[u8]) -> Result<(), LineError> {
    let text = line_text(line)?;
    if text == "ok" {
        return Ok(());
    }
    match text.strip_prefix("error ") {
        Some(reason) => Err(LineError::Refused(reason.to_string())),
        None => Err(LineError::NotAnswer(text.to_string())),
    }
}

/// Reads one line (up to and including `\n`) byte by byte, so nothing after
/// it is consumed, refusing more than [`MAX_LINE`] bytes. `Ok(None)` on EOF
/// before any byte.
pub async fn read_line<R>(reader: &mut R) -> std::io::Result<Option<Vec<u8>>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut line = Vec::with_capacity(MAX_LINE);
    loop {
        let mut byte = [0u8; 1];
        if reader.read(&mut byte).await? == 0 {
            if line.is_empty() {
                return Ok(None);
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "stream line cut short",
            ));
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return Ok(Some(line));
        }
        if line.len() >= MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                LineError::TooLong,
            ));
        }
    }
}

impl fmt::Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamKind::Stdio(id) => write!(f, "stdio stream {id}"),
            StreamKind::Log => f.write_str("log stream"),
            StreamKind::Port(port) => write!(f, "port stream to {port}"),
        }
    }
}

/// The fuzz target `stream_line` (fuzz/) and the replay of its corpus:
/// neither parser panics on any bytes, and what they accept is exactly
/// the protocol.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Parses `data` as a header and as an answer and checks the results.
    pub fn line(data: &[u8]) {
        if let Ok(kind) = parse_header(data) {
            assert!(data.len() <= MAX_LINE);
            assert_eq!(kind.header().as_bytes(), data, "a header has one spelling");
        }
        match parse_answer(data) {
            Ok(()) => assert_eq!(data, b"ok\n"),
            Err(LineError::Refused(reason)) => {
                assert!(data.len() <= MAX_LINE);
                assert_eq!(Answer::Error(reason).line().as_bytes(), data);
            }
            Err(err) => {
                let _ = err.to_string();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz target's corpus (fuzz/corpus/stream_line) replayed.
    #[test]
    fn fuzz_corpus_replays() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/stream_line");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("corpus directory") {
            let bytes = std::fs::read(entry.expect("corpus entry").path()).expect("corpus file");
            fuzzing::line(&bytes);
            n += 1;
        }
        assert!(n > 0, "{} is empty", dir.display());
    }

    #[test]
    fn headers_round_trip() {
        for kind in [
            StreamKind::Stdio(1),
            StreamKind::Stdio(u64::MAX),
            StreamKind::Log,
            StreamKind::Port(1),
            StreamKind::Port(8080),
            StreamKind::Port(u16::MAX),
        ] {
            let header = kind.header();
            assert!(header.len() <= MAX_LINE, "{header:?}");
            assert_eq!(parse_header(header.as_bytes()), Ok(kind));
        }
    }

    #[test]
    fn bad_headers_name_what_is_wrong() {
        let cases: &[(&[u8], LineError)] = &[
            (b"isola-stream 1 stdio 0\n", LineError::BadId("0".into())),
            (b"isola-stream 1 stdio -1\n", LineError::BadId("-1".into())),
            (b"isola-stream 1 stdio +7\n", LineError::BadId("+7".into())),
            (b"isola-stream 1 stdio 07\n", LineError::BadId("07".into())),
            (
                b"isola-stream 1 stdio 18446744073709551616\n",
                LineError::BadId("18446744073709551616".into()),
            ),
            (b"isola-stream 2 log\n", LineError::Version("2".into())),
            (b"isola-stream 1 port 0\n", LineError::BadPort("0".into())),
            (
                b"isola-stream 1 port 65536\n",
                LineError::BadPort("65536".into()),
            ),
            (
                b"isola-stream 1 port 080\n",
                LineError::BadPort("080".into()),
            ),
            (
                b"isola-stream 1 port http\n",
                LineError::BadPort("http".into()),
            ),
            (
                b"isola-stream 1 port 80 81\n",
                LineError::NotHeader("isola-stream 1 port 80 81".into()),
            ),
            (b"isola-stream 1 tty 3\n", LineError::Kind("tty".into())),
            (b"isola-stream 1 log extra\n", LineError::Kind("log".into())),
            (
                b"isola-stream 1 stdio 5 6\n",
                LineError::NotHeader("isola-stream 1 stdio 5 6".into()),
            ),
            (
                b"CONNECT 1025\n",
                LineError::NotHeader("CONNECT 1025".into()),
            ),
            (b"isola-stream 1 log", LineError::Unterminated),
            (b"isola-stream 1 log\n\n", LineError::NotText),
            (b"isola-stream 1 l\xffg\n", LineError::NotText),
            (b"", LineError::Unterminated),
        ];
        for (line, want) in cases {
            assert_eq!(parse_header(line).as_ref(), Err(want), "{line:?}");
        }
        let long = format!("isola-stream 1 stdio {}\n", "1".repeat(MAX_LINE));
        assert_eq!(parse_header(long.as_bytes()), Err(LineError::TooLong));
    }

    #[test]
    fn answers() {
        assert_eq!(parse_answer(Answer::Ok.line().as_bytes()), Ok(()));
        let refused = Answer::Error("stream 7 is already open".into()).line();
        assert_eq!(
            parse_answer(refused.as_bytes()),
            Err(LineError::Refused("stream 7 is already open".into()))
        );
        // A long, non-ASCII reason still makes a valid line.
        let long = Answer::Error(format!("é{}", "x".repeat(200))).line();
        assert!(long.len() <= MAX_LINE);
        assert!(matches!(
            parse_answer(long.as_bytes()),
            Err(LineError::Refused(r)) if r.starts_with("?x")
        ));
        assert_eq!(
            parse_answer(b"OK 1025\n"),
            Err(LineError::NotAnswer("OK 1025".into()))
        );
    }

    #[tokio::test]
    async fn read_line_stops_at_the_newline_and_bounds_the_length() {
        use tokio::io::AsyncReadExt;
        let mut input: &[u8] = b"ok\nraw bytes";
        assert_eq!(
            read_line(&mut input).await.ok().flatten(),
            Some(b"ok\n".to_vec())
        );
        let mut rest = Vec::new();
        input.read_to_end(&mut rest).await.ok();
        assert_eq!(rest, b"raw bytes");

        let mut empty: &[u8] = b"";
        assert!(matches!(read_line(&mut empty).await, Ok(None)));
        let mut cut: &[u8] = b"isola-str";
        assert!(read_line(&mut cut).await.is_err());
        let endless = vec![b'a'; 10 * MAX_LINE];
        let mut endless: &[u8] = &endless;
        assert!(read_line(&mut endless).await.is_err());
        // It never read past the bound.
        assert_eq!(endless.len(), 9 * MAX_LINE);
    }
}
