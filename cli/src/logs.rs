//! `isola logs SANDBOX [--guest-console] [--follow] [--tail N]`: the log
//! files the runner of a sandbox (the shim, `isola run`) keeps in its run
//! directory: the agent's log (`agent.log`) or the guest's serial console
//! (`console.log`), each with its rotated predecessor (`<name>.1`) first
//! (`isola_sandbox::logfile`).
//!
//! `--follow` goes on printing lines as they are written, across
//! rotations (a renamed file is read to its end before the new one is
//! opened), and ends when the sandbox's directory goes (the sandbox was
//! removed). Only whole lines are printed.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use isola_sandbox::logfile::{read_end, rotated_name, AGENT_LOG, CONSOLE_LOG, MAX_LOG_FILE};

use crate::lookup::Found;

/// The most bytes read of one log file at once.
const READ_LIMIT: u64 = 2 * MAX_LOG_FILE;

/// How often a followed file is looked at for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// What to print.
#[derive(Debug, Clone)]
pub struct Options {
    /// The guest console instead of the agent's log.
    pub guest_console: bool,
    pub follow: bool,
    /// Only the last this many lines (of what is there now).
    pub tail: Option<usize>,
}

/// Prints sandbox `found`'s log to `out`.
pub fn run(found: &Found, options: &Options, out: &mut dyn Write) -> Result<()> {
    let name = if options.guest_console {
        CONSOLE_LOG
    } else {
        AGENT_LOG
    };
    let path = found.dir.join(name);
    let previous = found.dir.join(rotated_name(name));
    let current = open(&path)?;
    let older = open(&previous)?;
    if current.is_none() && older.is_none() && !options.follow {
        if options.guest_console {
            bail!(
                "sandbox {} keeps no guest console ({} is not there): its node has \
                 runtime.guest_console = false, or an older isola made it",
                found.id,
                path.display()
            );
        }
        bail!(
            "sandbox {} has no agent log yet ({} is not there): it is starting, or an \
             older isola made it",
            found.id,
            path.display()
        );
    }
    // What is there now: the rotated file, then the current one.
    let mut text = Vec::new();
    // The runner keeps each file under MAX_LOG_FILE (and a line); of a
    // larger one (not the runner's) only the last whole lines within
    // READ_LIMIT are read: a log's end is what is wanted.
    if let Some(mut f) = older {
        read_end(&mut f, READ_LIMIT, &mut text)
            .with_context(|| format!("reading {}", previous.display()))?;
    }
    let mut position = 0;
    let mut following = None;
    if let Some(mut f) = current {
        let start = text.len();
        let offset = read_end(&mut f, READ_LIMIT, &mut text)
            .with_context(|| format!("reading {}", path.display()))?;
        // A last line still being written is left for --follow.
        let whole = match text[start..].iter().rposition(|&b| b == b'\n') {
            Some(i) => start + i + 1,
            None => start,
        };
        position = offset + (whole - start) as u64;
        text.truncate(whole);
        following = Some(f);
    }
    write_tail(&text, options.tail, out)?;
    out.flush()?;
    if !options.follow {
        return Ok(());
    }
    follow(&found.dir, &path, following, position, out)
}

/// The last `tail` lines of `text` (all of it without `tail`).
fn write_tail(text: &[u8], tail: Option<usize>, out: &mut dyn Write) -> io::Result<()> {
    let Some(n) = tail else {
        return out.write_all(text);
    };
    let lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
    for line in &lines[lines.len().saturating_sub(n)..] {
        out.write_all(line)?;
    }
    Ok(())
}

/// Follows `path` from `position` of `file` (its current file, if there
/// was one) until `dir` goes.
fn follow(
    dir: &Path,
    path: &Path,
    mut file: Option<File>,
    mut position: u64,
    out: &mut dyn Write,
) -> Result<()> {
    loop {
        if let Some(f) = file.as_mut() {
            position += copy_whole_lines(f, position, out)?;
            out.flush()?;
        }
        // Rotated (or first made): the name is another file now. What the
        // old one got since was read above; what it gets is not any more.
        let now = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let have = match file.as_ref() {
            Some(f) => f.metadata().ok().map(|m| (m.dev(), m.ino())),
            None => None,
        };
        if now.is_some() && now != have {
            if let Some(f) = file.as_mut() {
                // The last lines of the old file, written before the rename.
                copy_whole_lines(f, position, out)?;
            }
            file = open(path)?;
            position = 0;
            continue;
        }
        if !dir.exists() {
            // Gone: what its last file got before is still to be read.
            if let Some(f) = file.as_mut() {
                copy_whole_lines(f, position, out)?;
                out.flush()?;
            }
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

/// Copies the whole lines of `file` after `position` to `out`; how many
/// bytes it copied.
fn copy_whole_lines(file: &mut File, position: u64, out: &mut dyn Write) -> Result<u64> {
    file.seek(SeekFrom::Start(position))?;
    // At most READ_LIMIT a round: the rest comes at the next poll.
    let mut reader = BufReader::new(file.take(READ_LIMIT));
    let mut copied = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok(copied);
        }
        out.write_all(&line)?;
        copied += n as u64;
    }
}

/// Opens a log file of the run directory without following a link;
/// `None` if it is not there.
fn open(path: &Path) -> Result<Option<File>> {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("opening {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test reads while another thread writes.
    #[derive(Debug, Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Shared {
        fn text(&self) -> String {
            let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Ok(mut b) = self.0.lock() {
                b.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn tail(text: &str, n: Option<usize>) -> String {
        let mut out = Vec::new();
        write_tail(text.as_bytes(), n, &mut out).expect("write");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn the_tail_is_the_last_whole_lines() {
        let text = "a\nb\nc\n";
        assert_eq!(tail(text, None), text);
        assert_eq!(tail(text, Some(1)), "c\n");
        assert_eq!(tail(text, Some(2)), "b\nc\n");
        assert_eq!(tail(text, Some(3)), text);
        assert_eq!(tail(text, Some(10)), text);
        assert_eq!(tail(text, Some(0)), "");
        assert_eq!(tail("", Some(2)), "");
    }

    fn found(dir: &Path) -> Found {
        Found {
            id: "sb".into(),
            namespace: "default".into(),
            dir: dir.to_path_buf(),
        }
    }

    #[test]
    fn the_rotated_file_comes_first_and_a_half_line_is_left_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("agent.log.1"), "one\ntwo\n").expect("write");
        std::fs::write(dir.path().join("agent.log"), "three\nfour\nhal").expect("write");
        let options = Options {
            guest_console: false,
            follow: false,
            tail: None,
        };
        let mut out = Vec::new();
        run(&found(dir.path()), &options, &mut out).expect("logs");
        assert_eq!(String::from_utf8_lossy(&out), "one\ntwo\nthree\nfour\n");
        let err = run(
            &found(dir.path()),
            &Options {
                guest_console: true,
                ..options
            },
            &mut Vec::new(),
        )
        .expect_err("no console");
        assert!(
            err.to_string().contains("runtime.guest_console = false"),
            "{err}"
        );
    }

    #[test]
    fn of_a_file_larger_than_the_limit_its_last_whole_lines_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let lines: String = (0..1000).map(|i| format!("line {i:04}\n")).collect();
        std::fs::write(&path, &lines).expect("write");
        let mut text = b"before\n".to_vec();
        let mut f = File::open(&path).expect("open");
        // 10 bytes a line: the last 95 bytes cut line 990 in the middle.
        let offset = read_end(&mut f, 95, &mut text).expect("read");
        assert_eq!(offset, 9910);
        let want: String = (991..1000).map(|i| format!("line {i:04}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&text), format!("before\n{want}"));
        // The last 100 bytes begin with a whole line: it is kept.
        let mut text = Vec::new();
        let mut f = File::open(&path).expect("open");
        assert_eq!(read_end(&mut f, 100, &mut text).expect("read"), 9900);
        let want: String = (990..1000).map(|i| format!("line {i:04}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&text), want);
        // Within the limit: all of it, from its start.
        let mut text = Vec::new();
        let mut f = File::open(&path).expect("open");
        assert_eq!(read_end(&mut f, 1 << 20, &mut text).expect("read"), 0);
        assert_eq!(text, lines.as_bytes());
        // Run on a current file past the limit: its end, then follows on
        // from there.
        let big = dir.path().join("agent.log");
        let line = format!("{}\n", "x".repeat(99));
        let mut body = "first line\n".to_string();
        while body.len() as u64 <= READ_LIMIT + 1000 {
            body.push_str(&line);
        }
        body.push_str("last line\n");
        std::fs::write(&big, &body).expect("write");
        let options = Options {
            guest_console: false,
            follow: false,
            tail: Some(2),
        };
        let mut out = Vec::new();
        run(&found(dir.path()), &options, &mut out).expect("logs");
        assert_eq!(String::from_utf8_lossy(&out), format!("{line}last line\n"));
        let mut out = Vec::new();
        run(
            &found(dir.path()),
            &Options {
                tail: None,
                ..options
            },
            &mut out,
        )
        .expect("logs");
        let out = String::from_utf8_lossy(&out);
        assert!(out.ends_with("last line\n") && !out.contains("first line"));
        assert!(out.starts_with(&line) && out.len() as u64 <= READ_LIMIT);
    }

    #[test]
    fn following_reads_across_a_rotation_and_ends_with_the_directory() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("sb");
        std::fs::create_dir(&dir).expect("mkdir");
        let path = dir.join("agent.log");
        std::fs::write(&path, "first\n").expect("write");
        let options = Options {
            guest_console: false,
            follow: true,
            tail: None,
        };
        let f = found(&dir);
        let shared = Shared::default();
        let mut writer = shared.clone();
        let reader = std::thread::spawn(move || run(&f, &options, &mut writer));
        let mut log = isola_sandbox::logfile::RotatingLog::new(&path, 20);
        // "first\n" is there: 6 + 7 = 13, then 13 + 7 > 20 rotates.
        log.write_line("second");
        log.write_line("third.");
        log.write_line("fourth");
        let want = "first\nsecond\nthird.\nfourth\n";
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while shared.text() != want {
            assert!(
                std::time::Instant::now() < deadline,
                "followed: {:?}",
                shared.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::remove_dir_all(&dir).expect("rm");
        reader.join().expect("reader").expect("follow");
        let text = shared.text();
        assert_eq!(text, "first\nsecond\nthird.\nfourth\n");
    }
}
