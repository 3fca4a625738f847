//! The hybrid-vsock handshake a host process performs on the VMM's Unix
//! socket before its stream is connected to a guest port (the protocol
//! Firecracker defined): it writes `CONNECT <port>\n`; once the guest
//! accepted, the VMM answers `OK <host port>\n` and the socket carries the
//! stream from then on. A refused connection is closed.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use thiserror::Error;

/// The longest `CONNECT` line accepted, newline included.
pub const MAX_LINE: usize = 32;

/// Why a `CONNECT` line was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("no newline within {MAX_LINE} bytes")]
    TooLong,
    #[error("the line does not start with `CONNECT `")]
    NotConnect,
    #[error("the port is not a decimal number")]
    BadPort,
    #[error("the port is out of range")]
    PortOutOfRange,
    #[error("the host closed the socket before the end of the line")]
    Closed,
    #[error("reading the line: {0}")]
    Io(io::ErrorKind),
}

/// Parses one `CONNECT <port>` line (without its `\n`; a trailing `\r` is
/// tolerated) into the guest port. The port is a decimal `u32` other than
/// `u32::MAX` (`VMADDR_PORT_ANY`); nothing else may follow it.
pub fn parse_connect_line(line: &[u8]) -> Result<u32, HandshakeError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line
        .strip_prefix(b"CONNECT")
        .ok_or(HandshakeError::NotConnect)?;
    let digits = rest.trim_ascii_start();
    if digits.len() == rest.len() {
        // No separator between `CONNECT` and the port.
        return Err(HandshakeError::NotConnect);
    }
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HandshakeError::BadPort);
    }
    // At most 10 digits fit a u32; more (even with leading zeros) is refused.
    if digits.len() > 10 {
        return Err(HandshakeError::PortOutOfRange);
    }
    let value = digits
        .iter()
        .try_fold(0u64, |acc, d| {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or(HandshakeError::PortOutOfRange)?;
    match u32::try_from(value) {
        Ok(port) if port != u32::MAX => Ok(port),
        _ => Err(HandshakeError::PortOutOfRange),
    }
}

/// A host connection accepted on the listener that has not finished its
/// `CONNECT` line yet.
#[derive(Debug)]
pub struct Handshake {
    pub id: u64,
    pub stream: UnixStream,
    pub deadline: Instant,
    /// Whether the stream is in the event manager's epoll set.
    pub registered: bool,
    line: Vec<u8>,
}

/// What reading more of the line gave.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeProgress {
    /// More bytes are needed.
    Pending,
    /// The whole line was read: connect to this guest port.
    Connect(u32),
}

impl Handshake {
    pub fn new(id: u64, stream: UnixStream, deadline: Instant) -> Self {
        Handshake {
            id,
            stream,
            deadline,
            registered: false,
            line: Vec::with_capacity(MAX_LINE),
        }
    }

    /// Reads what is available of the line, one byte at a time so that
    /// nothing after the newline (stream data) is consumed.
    pub fn advance(&mut self) -> Result<HandshakeProgress, HandshakeError> {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(_) => {
                    if byte[0] == b'\n' {
                        return parse_connect_line(&self.line).map(HandshakeProgress::Connect);
                    }
                    // The newline itself must fit within MAX_LINE bytes.
                    if self.line.len() + 1 >= MAX_LINE {
                        return Err(HandshakeError::TooLong);
                    }
                    self.line.push(byte[0]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(HandshakeProgress::Pending)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HandshakeError::Io(e.kind())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn parses_good_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect_line(b"CONNECT 0"), Ok(0));
        assert_eq!(parse_connect_line(b"CONNECT  52\r"), Ok(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967294"), Ok(4_294_967_294));
        assert_eq!(parse_connect_line(b"CONNECT 0000000001"), Ok(1));
    }

    #[test]
    fn refuses_bad_lines() {
        use HandshakeError::*;
        let cases: &[(&[u8], HandshakeError)] = &[
            (b"", NotConnect),
            (b"CONNECT", NotConnect),
            (b"CONNECT1024", NotConnect),
            (b"connect 1024", NotConnect),
            (b" CONNECT 1024", NotConnect),
            (b"LISTEN 1024", NotConnect),
            (b"CONNECT ", BadPort),
            (b"CONNECT abc", BadPort),
            (b"CONNECT -1", BadPort),
            (b"CONNECT +1", BadPort),
            (b"CONNECT 0x10", BadPort),
            (b"CONNECT 1024 extra", BadPort),
            (b"CONNECT 1024 ", BadPort),
            (b"CONNECT 10\x0024", BadPort),
            (b"CONNECT \xff", BadPort),
            (b"CONNECT 4294967295", PortOutOfRange),
            (b"CONNECT 4294967296", PortOutOfRange),
            (b"CONNECT 99999999999999999999999", PortOutOfRange),
            (b"CONNECT 00000000001", PortOutOfRange),
        ];
        for (line, want) in cases {
            assert_eq!(
                parse_connect_line(line).as_ref(),
                Err(want),
                "line {:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    fn pair() -> (Handshake, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let hs = Handshake::new(1, a, Instant::now() + Duration::from_secs(5));
        (hs, b)
    }

    #[test]
    fn reads_line_in_pieces_and_leaves_data() {
        let (mut hs, mut host) = pair();
        assert_eq!(hs.advance(), Ok(HandshakeProgress::Pending));
        host.write_all(b"CONN").unwrap();
        assert_eq!(hs.advance(), Ok(HandshakeProgress::Pending));
        host.write_all(b"ECT 77\nhello").unwrap();
        assert_eq!(hs.advance(), Ok(HandshakeProgress::Connect(77)));
        let mut rest = [0u8; 5];
        hs.stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello");
    }

    #[test]
    fn refuses_long_line_and_close() {
        let (mut hs, mut host) = pair();
        host.write_all(&[b'A'; MAX_LINE]).unwrap();
        assert_eq!(hs.advance(), Err(HandshakeError::TooLong));

        // 31 bytes and a newline is the longest accepted line.
        let (mut hs, mut host) = pair();
        let mut line = b"CONNECT ".to_vec();
        line.resize(MAX_LINE - 2, b'0');
        line.extend_from_slice(b"7\n");
        host.write_all(&line).unwrap();
        assert_eq!(hs.advance(), Err(HandshakeError::PortOutOfRange));

        let (mut hs, host) = pair();
        drop(host);
        assert_eq!(hs.advance(), Err(HandshakeError::Closed));
    }
}
