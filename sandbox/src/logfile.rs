//! A sandbox's log files: the agent's log stream (`agent.log`) and the
//! guest's serial console (`console.log`), kept in its run directory for
//! `isola logs`.
//!
//! Each is bounded: when a file would pass [`MAX_LOG_FILE`] bytes it is
//! renamed to `<name>.1` (replacing the previous one) and a new file is
//! started, so a sandbox keeps at most twice that per log, whatever its
//! guest writes. The files are created root-only, without following a
//! link, and written one whole line at a time, so that a reader that
//! follows them never sees half a line. Writing never fails the sandbox:
//! the first error is logged and the log stops.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tokio::io::AsyncRead;

use crate::child::BoundedLines;

/// Most bytes of one log file before it is rotated.
pub const MAX_LOG_FILE: u64 = 1 << 20;

/// Longest line kept (longer ones are cut and marked).
pub const MAX_LINE: usize = 4096;

/// The agent's log file's name in the run directory.
pub const AGENT_LOG: &str = "agent.log";

/// The guest console's file's name in the run directory.
pub const CONSOLE_LOG: &str = "console.log";

/// The name of the previous (rotated) file of `name`.
pub fn rotated_name(name: &str) -> String {
    format!("{name}.1")
}

/// One rotated log file.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    max: u64,
    file: Option<File>,
    written: u64,
    failed: bool,
}

impl RotatingLog {
    /// A log at `path` (created on the first line; an existing file is
    /// appended to), rotated at `max` bytes.
    pub fn new(path: impl Into<PathBuf>, max: u64) -> RotatingLog {
        RotatingLog {
            path: path.into(),
            max: max.max(1),
            file: None,
            written: 0,
            failed: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the file now if it is not there (a quiet console's file
    /// exists, empty, from the start).
    pub fn create(&mut self) {
        if self.file.is_some() || self.failed {
            return;
        }
        match open(&self.path).and_then(|f| Ok((f.metadata()?.len(), f))) {
            Ok((len, file)) => {
                self.written = len;
                self.file = Some(file);
            }
            Err(err) => {
                self.failed = true;
                tracing::warn!(log = %self.path.display(), %err, "creating a sandbox log file failed; it gets no lines");
            }
        }
    }

    /// Appends `line` and a newline, rotating first if the file would
    /// pass its bound.
    pub fn write_line(&mut self, line: &str) {
        if self.failed {
            return;
        }
        if let Err(err) = self.try_write(line) {
            self.failed = true;
            self.file = None;
            tracing::warn!(log = %self.path.display(), %err, "writing a sandbox log file failed; it gets no more lines");
        }
    }

    fn try_write(&mut self, line: &str) -> io::Result<()> {
        let mut record = Vec::with_capacity(line.len() + 1);
        record.extend_from_slice(line.as_bytes());
        record.push(b'\n');
        let len = record.len() as u64;
        if self.file.is_some() && self.written > 0 && self.written + len > self.max {
            self.rotate()?;
        }
        if self.file.is_none() {
            let file = open(&self.path)?;
            self.written = file.metadata()?.len();
            self.file = Some(file);
            if self.written > 0 && self.written + len > self.max {
                self.rotate()?;
                let file = open(&self.path)?;
                self.written = 0;
                self.file = Some(file);
            }
        }
        if let Some(file) = self.file.as_mut() {
            file.write_all(&record)?;
            self.written += len;
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        let name = self
            .path
            .file_name()
            .map(|n| rotated_name(&n.to_string_lossy()))
            .ok_or_else(|| io::Error::other("a log path without a file name"))?;
        std::fs::rename(&self.path, self.path.with_file_name(name))?;
        self.file = Some(open(&self.path)?);
        self.written = 0;
        Ok(())
    }
}

/// Appends the end of `file` to `text`: all of it, or of one larger than
/// `limit` the lines that begin in its last `limit` bytes. Where in the
/// file what was appended begins.
pub fn read_end(file: &mut File, limit: u64, text: &mut Vec<u8>) -> io::Result<u64> {
    let len = file.metadata()?.len();
    if len <= limit {
        file.seek(SeekFrom::Start(0))?;
        file.take(limit).read_to_end(text)?;
        return Ok(0);
    }
    // From the byte before the last `limit`: up to its first newline is
    // the line cut by the seek (only that newline if the cut falls on a
    // line's start), left out.
    let before = len - limit - 1;
    file.seek(SeekFrom::Start(before))?;
    let start = text.len();
    file.take(limit + 1).read_to_end(text)?;
    let cut = text[start..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(text.len() - start, |i| i + 1);
    text.drain(start..start + cut);
    Ok(before + cut as u64)
}

fn open(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Copies the lines of `reader` (a guest's console, through isola-vmm's
/// stdout) into `log` until it ends. Lines are bounded ([`MAX_LINE`]);
/// carriage returns and empty lines are dropped.
pub async fn copy_lines<R: AsyncRead + Unpin>(reader: R, mut log: RotatingLog) {
    log.create();
    let mut lines = BoundedLines::new(reader, MAX_LINE);
    while let Ok(Some((line, cut))) = lines.next_line().await {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if cut {
            log.write_line(&format!("{line} [cut]"));
        } else {
            log.write_line(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn lines_are_appended_and_the_file_is_rotated_at_its_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(AGENT_LOG);
        let mut log = RotatingLog::new(&path, 40);
        for n in 0..10 {
            log.write_line(&format!("line {n}"));
        }
        // 7 bytes a line: 5 fit in 40.
        let current = read(&path);
        let previous = read(&dir.path().join("agent.log.1"));
        assert_eq!(current, "line 5\nline 6\nline 7\nline 8\nline 9\n");
        assert_eq!(previous, "line 0\nline 1\nline 2\nline 3\nline 4\n");
        for n in 10..13 {
            log.write_line(&format!("line {n}"));
        }
        assert_eq!(read(&path), "line 10\nline 11\nline 12\n");
        assert!(read(&dir.path().join("agent.log.1")).starts_with("line 5\n"));
        let mode = std::fs::metadata(&path).expect("meta").permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }

    #[test]
    fn an_existing_file_is_continued_and_rotated_when_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(CONSOLE_LOG);
        std::fs::write(&path, "old 1\nold 2\n").expect("write");
        let mut log = RotatingLog::new(&path, 20);
        log.write_line("new 1");
        assert_eq!(read(&path), "old 1\nold 2\nnew 1\n");
        log.write_line("new 2");
        assert_eq!(read(&path), "new 2\n");
        assert_eq!(
            read(&dir.path().join("console.log.1")),
            "old 1\nold 2\nnew 1\n"
        );
    }

    #[test]
    fn a_link_in_place_of_the_file_is_not_followed_and_stops_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "").expect("write");
        let path = dir.path().join(AGENT_LOG);
        std::os::unix::fs::symlink(&target, &path).expect("symlink");
        let mut log = RotatingLog::new(&path, 100);
        log.write_line("never");
        log.write_line("never again");
        assert_eq!(read(&target), "");
    }

    #[tokio::test]
    async fn a_console_stream_becomes_bounded_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(CONSOLE_LOG);
        let long = "x".repeat(MAX_LINE + 10);
        let input = format!("boot\r\n\r\n{long}\nend");
        copy_lines(input.as_bytes(), RotatingLog::new(&path, MAX_LOG_FILE)).await;
        let text = read(&path);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "boot");
        assert!(lines[1].ends_with(" [cut]") && lines[1].len() <= MAX_LINE + 6);
        assert_eq!(lines.last().copied(), Some("end"));
    }
}
