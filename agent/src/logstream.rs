//! The agent's log, to the console and to the host's log stream.
//!
//! Every record goes to stderr (the console) and into a bounded buffer
//! ([`CAPACITY`] bytes). The host opens a `log` stream (see
//! `isola_protocol::stream`); a task copies the buffer to it. Before the
//! host connects, the buffer holds the early lines; while the host reads
//! slowly, it fills and further lines are dropped and counted (a line
//! `isola-agent: N log lines dropped` tells the host where). Writing a
//! record never waits for the host. One log stream at a time: a new one
//! replaces the old.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Mutex, OnceLock};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Bytes of log lines kept for the host.
pub const CAPACITY: usize = 64 * 1024;

#[derive(Debug)]
struct Buffer {
    chunks: VecDeque<Vec<u8>>,
    bytes: usize,
    capacity: usize,
    dropped: u64,
}

/// The bounded buffer between the log writers and the log stream.
#[derive(Debug)]
pub struct LogSink {
    buffer: Mutex<Buffer>,
    notify: Notify,
    stream_task: Mutex<Option<JoinHandle<()>>>,
}

impl LogSink {
    pub fn new(capacity: usize) -> LogSink {
        LogSink {
            buffer: Mutex::new(Buffer {
                chunks: VecDeque::new(),
                bytes: 0,
                capacity,
                dropped: 0,
            }),
            notify: Notify::new(),
            stream_task: Mutex::new(None),
        }
    }

    /// Adds a record; drops it (and counts it) if the buffer is full.
    pub fn push(&self, record: &[u8]) {
        if record.is_empty() {
            return;
        }
        let Ok(mut buffer) = self.buffer.lock() else {
            return;
        };
        if buffer.bytes + record.len() > buffer.capacity {
            buffer.dropped += 1;
        } else {
            buffer.bytes += record.len();
            buffer.chunks.push_back(record.to_vec());
        }
        drop(buffer);
        self.notify.notify_one();
    }

    /// The next chunk to send: a note on dropped records first, if any.
    fn pop(&self) -> Option<Vec<u8>> {
        let mut buffer = self.buffer.lock().ok()?;
        if buffer.dropped > 0 {
            let note = format!("isola-agent: {} log lines dropped\n", buffer.dropped);
            buffer.dropped = 0;
            return Some(note.into_bytes());
        }
        let chunk = buffer.chunks.pop_front()?;
        buffer.bytes -= chunk.len();
        Some(chunk)
    }

    /// Records dropped since the last note.
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.buffer.lock().map(|b| b.dropped).unwrap_or(0)
    }

    /// Bytes waiting for the host.
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.buffer.lock().map(|b| b.bytes).unwrap_or(0)
    }

    /// Copies the buffer to `conn` until it fails; the records stay in the
    /// buffer while nobody reads them.
    pub async fn serve<W: AsyncWrite + Unpin>(&self, mut conn: W) {
        loop {
            // Register first so a push between `pop` and the wait wakes us.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            while let Some(chunk) = self.pop() {
                if conn.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Serves `conn` as the log stream, replacing the previous one.
    pub fn attach<W>(&'static self, conn: W)
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let task = tokio::spawn(async move { self.serve(conn).await });
        if let Ok(mut slot) = self.stream_task.lock() {
            if let Some(old) = slot.replace(task) {
                old.abort();
            }
        }
    }
}

/// The process's sink (a `static`, so every writer and the stream task
/// share it).
pub fn sink() -> &'static LogSink {
    static SINK: OnceLock<LogSink> = OnceLock::new();
    SINK.get_or_init(|| LogSink::new(CAPACITY))
}

/// The console, as a close-on-exec duplicate of the agent's stderr.
/// libcontainer logs from the processes it forks, after it pointed their
/// fd 2 at the container's stderr: through this descriptor those lines
/// reach the console, never the container's stderr stream.
static CONSOLE: OnceLock<std::fs::File> = OnceLock::new();

/// Takes the duplicate of stderr the log writes to (call once, early).
pub fn capture_console() {
    use std::os::fd::AsFd;
    if let Ok(fd) = io::stderr().as_fd().try_clone_to_owned() {
        let _ = CONSOLE.set(std::fs::File::from(fd));
    }
}

/// A `tracing_subscriber` writer: the sink, and the console for records
/// at most as verbose as its level (`agent.console=`: a console the host
/// keeps quiet costs the guest no serial-port exits for routine lines).
#[derive(Debug, Clone, Copy)]
pub struct TeeWriter {
    console_level: tracing::Level,
}

impl TeeWriter {
    /// A writer that puts records up to `console_level` on the console.
    pub fn new(console_level: tracing::Level) -> TeeWriter {
        TeeWriter { console_level }
    }
}

/// One record's writer: to the sink, and to the console if `console`.
#[derive(Debug, Clone, Copy)]
pub struct RecordWriter {
    console: bool,
}

impl Write for RecordWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sink().push(buf);
        if self.console {
            // The console may be gone (`--console off`): the sink still
            // gets the line.
            let _ = match CONSOLE.get() {
                Some(mut console) => console.write_all(buf),
                None => io::stderr().write_all(buf),
            };
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for TeeWriter {
    type Writer = RecordWriter;

    fn make_writer(&'a self) -> Self::Writer {
        RecordWriter { console: true }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        // Levels compare by verbosity: ERROR < WARN < ... < TRACE.
        RecordWriter {
            console: console_wants(meta.level(), meta.target(), self.console_level),
        }
    }
}

/// Whether a record of `level` from `target` goes to the console too:
/// at most as verbose as `console_level`, and not the kernel's own
/// messages (which the kernel put there itself).
pub fn console_wants(level: &tracing::Level, target: &str, console_level: tracing::Level) -> bool {
    *level <= console_level && target != crate::kmsg::TARGET
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[test]
    fn the_console_gets_records_up_to_its_level_and_never_the_kernels() {
        use tracing::Level;
        let warn = Level::WARN;
        assert!(console_wants(&Level::ERROR, "isola_agent::service", warn));
        assert!(console_wants(&Level::WARN, "isola_agent::service", warn));
        assert!(!console_wants(&Level::INFO, "isola_agent::service", warn));
        assert!(!console_wants(&Level::ERROR, crate::kmsg::TARGET, warn));
        assert!(console_wants(&Level::DEBUG, "libcontainer", Level::TRACE));
        // The kmsg module's own diagnostics are not the kernel's records.
        assert!(console_wants(&Level::ERROR, "isola_agent::kmsg", warn));
    }

    #[test]
    fn the_buffer_is_bounded_and_counts_what_it_drops() {
        let sink = LogSink::new(100);
        for n in 0..50 {
            sink.push(format!("line {n:02}\n").as_bytes());
        }
        // 8-byte lines: 12 fit in 100 bytes.
        assert_eq!(sink.buffered(), 96);
        assert_eq!(sink.dropped(), 38);
        let note = sink.pop().expect("note");
        assert_eq!(note, b"isola-agent: 38 log lines dropped\n");
        assert_eq!(sink.pop().expect("early line"), b"line 00\n");
        assert_eq!(sink.dropped(), 0);
    }

    #[tokio::test]
    async fn early_lines_are_flushed_when_the_host_connects_and_a_slow_host_never_blocks() {
        let sink: &'static LogSink = Box::leak(Box::new(LogSink::new(64)));
        sink.push(b"early 1\n");
        sink.push(b"early 2\n");
        let (host, agent) = tokio::io::duplex(16);
        let server = tokio::spawn(sink.serve(agent));
        let mut host = host;
        let mut got = vec![0u8; 16];
        host.read_exact(&mut got).await.expect("early lines");
        assert_eq!(got, b"early 1\nearly 2\n");
        // The host stops reading: pushing many lines returns at once and
        // drops what does not fit.
        for n in 0..1000 {
            sink.push(format!("late {n:04}\n").as_bytes());
        }
        assert!(sink.buffered() <= 64);
        assert!(sink.dropped() > 900, "{}", sink.dropped());
        server.abort();
    }
}
