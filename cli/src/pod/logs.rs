//! The CRI container log format containerd writes at a container's log
//! path: one entry per line, `<RFC 3339 time> <stdout|stderr> <P|F> <text>`;
//! `P` entries are pieces of a line longer than containerd's buffer, the
//! `F` entry ends it. The text is the container's bytes, not necessarily
//! UTF-8, and a log grows without bound: it is read as a stream of bytes.

use std::io::{BufRead, Write};

use anyhow::{bail, Context, Result};

/// The most of one unfinished line (`P` entries) held before it is
/// written out as it is: a container that never ends its line must not
/// fill this process's memory.
const MAX_PENDING: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub time: &'a [u8],
    pub stream: Stream,
    pub partial: bool,
    pub text: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

pub fn parse_line(line: &[u8]) -> Result<Entry<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("not a CRI log line: {:?}", String::from_utf8_lossy(line));
    };
    let stream = match stream {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        other => bail!(
            "CRI log line: unknown stream {:?}",
            String::from_utf8_lossy(other)
        ),
    };
    let partial = match tag.split(|b| *b == b':').next() {
        Some(b"P") => true,
        Some(b"F") => false,
        _ => bail!(
            "CRI log line: unknown tag {:?}",
            String::from_utf8_lossy(tag)
        ),
    };
    Ok(Entry {
        time,
        stream,
        partial,
        text: parts.next().unwrap_or(b""),
    })
}

/// Copies the log's lines, partial entries joined, to `out` (stdout's) and
/// `err` (stderr's), each prefixed with the time of its last piece if
/// `timestamps`. A partial line at the end (the container is still
/// writing it) is written too.
pub fn copy(
    log: impl BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
    timestamps: bool,
) -> Result<()> {
    let mut pending: [Vec<u8>; 2] = Default::default();
    let mut write = |stream: Stream, time: &[u8], text: &[u8]| -> Result<()> {
        let w: &mut dyn Write = match stream {
            Stream::Stdout => &mut *out,
            Stream::Stderr => &mut *err,
        };
        if timestamps && !time.is_empty() {
            w.write_all(time)?;
            w.write_all(b" ")?;
        }
        w.write_all(text)?;
        w.write_all(b"\n")?;
        Ok(())
    };
    for line in log.split(b'\n') {
        let line = line.context("reading the log")?;
        let e = parse_line(&line)?;
        let slot = &mut pending[e.stream as usize];
        slot.extend_from_slice(e.text);
        if !e.partial || slot.len() >= MAX_PENDING {
            let text = std::mem::take(slot);
            write(e.stream, e.time, &text)?;
        }
    }
    for (stream, rest) in [Stream::Stdout, Stream::Stderr].into_iter().zip(pending) {
        if !rest.is_empty() {
            write(stream, b"", &rest)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copied(log: &str, timestamps: bool) -> (String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        copy(log.as_bytes(), &mut out, &mut err, timestamps).expect("copy");
        (
            String::from_utf8(out).expect("utf-8"),
            String::from_utf8(err).expect("utf-8"),
        )
    }

    #[test]
    fn entries_and_partial_lines() {
        let log = "2026-11-29T10:00:00.1Z stdout P hel\n\
                   2026-11-29T10:00:00.2Z stderr F oops\n\
                   2026-11-29T10:00:00.3Z stdout F lo world\n\
                   2026-11-29T10:00:00.4Z stdout F \n";
        assert_eq!(
            copied(log, true),
            (
                "2026-11-29T10:00:00.3Z hello world\n2026-11-29T10:00:00.4Z \n".to_string(),
                "2026-11-29T10:00:00.2Z oops\n".to_string()
            )
        );
        assert_eq!(copied(log, false).0, "hello world\n\n");
    }

    #[test]
    fn a_line_never_ended_is_written_in_bounded_pieces() {
        let piece = "x".repeat(MAX_PENDING / 2 + 1);
        let log = format!("t stdout P {piece}\nt stdout P {piece}\nt stdout P {piece}\n");
        let (out, _) = copied(&log, false);
        let lines: Vec<usize> = out.lines().map(str::len).collect();
        assert_eq!(lines, vec![2 * piece.len(), piece.len()]);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_line(b"hello").is_err());
        assert!(parse_line(b"t stdin F x").is_err());
        assert!(parse_line(b"t stdout X x").is_err());
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert!(copy(&b"hello\n"[..], &mut out, &mut err, false).is_err());
    }
}
