//! A guest's serial console, read line by line on a thread, with waits for
//! a line that matches.

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Longest console line kept whole, in bytes.
const MAX_LINE: u64 = 64 << 10;

/// Lines of a console, as they arrive.
#[derive(Debug)]
pub struct Console {
    lines: Receiver<String>,
    seen: Vec<String>,
    echo: bool,
}

impl Console {
    /// Reads `source` on a thread. With `echo`, lines are also printed (to
    /// stderr: test output shows them when a test fails).
    pub fn spawn<R: Read + Send + 'static>(source: R, echo: bool) -> Console {
        let (tx, rx) = channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(source);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                // A guest that never ends a line must not grow this
                // without bound: longer lines arrive in pieces.
                match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Console {
            lines: rx,
            seen: Vec::new(),
            echo,
        }
    }

    /// Every line seen so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Waits until a line contains `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, deadline: Duration) -> Result<String> {
        self.wait_until(|line| line.contains(needle), needle, deadline)
    }

    /// Waits until a line satisfies `pred`; `what` names it in errors.
    pub fn wait_until(
        &mut self,
        pred: impl Fn(&str) -> bool,
        what: &str,
        deadline: Duration,
    ) -> Result<String> {
        let until = Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if self.echo {
                        eprintln!("console| {line}");
                    }
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "no console line with {what:?} within {deadline:?}; last lines:\n{}",
                    self.tail(30)
                ),
                Err(RecvTimeoutError::Disconnected) => bail!(
                    "console closed before a line with {what:?}; last lines:\n{}",
                    self.tail(30)
                ),
            }
        }
    }

    /// Reads what is left until the console closes or `deadline` passes.
    pub fn drain(&mut self, deadline: Duration) {
        let until = Instant::now() + deadline;
        while let Ok(line) = self
            .lines
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            if self.echo {
                eprintln!("console| {line}");
            }
            self.seen.push(line);
        }
    }

    /// The last `n` lines, one per line.
    pub fn tail(&self, n: usize) -> String {
        let start = self.seen.len().saturating_sub(n);
        self.seen[start..].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_a_matching_line() {
        let text = b"first\r\nsecond isola-agent ready: x\nthird\n".to_vec();
        let mut c = Console::spawn(std::io::Cursor::new(text), false);
        let line = c
            .wait_for("isola-agent ready", Duration::from_secs(5))
            .unwrap();
        assert_eq!(line, "second isola-agent ready: x");
        assert_eq!(c.seen(), ["first", "second isola-agent ready: x"]);
    }

    #[test]
    fn closed_console_is_an_error_naming_the_wait() {
        let mut c = Console::spawn(std::io::Cursor::new(b"only\n".to_vec()), false);
        let err = c
            .wait_for("never", Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"never\"") && err.contains("only"), "{err}");
    }
}
