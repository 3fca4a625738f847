//! The CRI container log format containerd writes at a container's log
//! path: one entry per line, `<RFC 3339 time> <stdout|stderr> <P|F> <text>`;
//! `P` entries are pieces of a line longer than containerd's buffer, the
//! `F` entry ends it.

use anyhow::{bail, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub time: &'a str,
    pub stream: Stream,
    pub partial: bool,
    pub text: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

pub fn parse_line(line: &str) -> Result<Entry<'_>> {
    let mut parts = line.splitn(4, ' ');
    let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("not a CRI log line: {line:?}");
    };
    let stream = match stream {
        "stdout" => Stream::Stdout,
        "stderr" => Stream::Stderr,
        other => bail!("CRI log line: unknown stream {other:?}"),
    };
    let partial = match tag.split(':').next() {
        Some("P") => true,
        Some("F") => false,
        _ => bail!("CRI log line: unknown tag {tag:?}"),
    };
    Ok(Entry {
        time,
        stream,
        partial,
        text: parts.next().unwrap_or(""),
    })
}

/// The log's lines, partial entries joined, each with its stream and the
/// time of its last piece.
pub fn lines(log: &str) -> Result<Vec<(Stream, String, String)>> {
    let mut out = Vec::new();
    let mut pending: [String; 2] = Default::default();
    for line in log.lines() {
        let e = parse_line(line)?;
        let slot = &mut pending[e.stream as usize];
        slot.push_str(e.text);
        if !e.partial {
            out.push((e.stream, e.time.to_string(), std::mem::take(slot)));
        }
    }
    // A partial line at the end (the container is still writing it).
    for (i, rest) in pending.into_iter().enumerate() {
        if !rest.is_empty() {
            let stream = if i == 0 {
                Stream::Stdout
            } else {
                Stream::Stderr
            };
            out.push((stream, String::new(), rest));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_partial_lines() {
        let log = "2026-11-29T10:00:00.1Z stdout P hel\n\
                   2026-11-29T10:00:00.2Z stderr F oops\n\
                   2026-11-29T10:00:00.3Z stdout F lo world\n\
                   2026-11-29T10:00:00.4Z stdout F \n";
        let l = lines(log).expect("lines");
        assert_eq!(
            l,
            vec![
                (
                    Stream::Stderr,
                    "2026-11-29T10:00:00.2Z".into(),
                    "oops".into()
                ),
                (
                    Stream::Stdout,
                    "2026-11-29T10:00:00.3Z".into(),
                    "hello world".into()
                ),
                (
                    Stream::Stdout,
                    "2026-11-29T10:00:00.4Z".into(),
                    String::new()
                ),
            ]
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_line("hello").is_err());
        assert!(parse_line("t stdin F x").is_err());
        assert!(parse_line("t stdout X x").is_err());
    }
}
