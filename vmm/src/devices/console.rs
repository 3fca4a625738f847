//! Where the serial console's bytes go, without ever making a vCPU wait.
//!
//! The UART (on a vCPU thread, holding the serial device's lock) writes
//! into a [`ConsoleSink`]: a bounded in-memory ring. A writer thread
//! drains the ring into the destination (a file or stdout). If the
//! destination does not keep up (stdout piped to a process that does not
//! read), the ring fills and further bytes are dropped and counted
//! (`console_dropped_bytes`): the guest goes on, and pause or stop never
//! waits for a console write. A console file is capped: past `limit`
//! bytes the rest is dropped and counted too, so a guest cannot fill the
//! host's disk.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::metrics::{add, METRICS};

/// Default cap of a console file: 16 MiB.
pub const DEFAULT_CONSOLE_LIMIT: u64 = 16 << 20;

/// Bytes the ring holds for the writer thread.
pub const RING_BYTES: usize = 64 << 10;

/// How long the VMM waits, at exit, for the writer to put out what is left.
const DRAIN_AT_EXIT: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Ring {
    bytes: VecDeque<u8>,
    closed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    ring: Mutex<Ring>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The UART's output: never blocks, never fails.
#[derive(Debug, Clone)]
pub struct ConsoleSink {
    shared: Arc<Shared>,
}

impl Write for ConsoleSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut ring = self.shared.lock();
        let was_empty = ring.bytes.is_empty();
        let room = RING_BYTES.saturating_sub(ring.bytes.len());
        let take = room.min(data.len());
        ring.bytes.extend(data.iter().take(take));
        drop(ring);
        if take < data.len() {
            add(&METRICS.console_dropped_bytes, (data.len() - take) as u64);
        }
        if was_empty && take > 0 {
            self.shared.ready.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writer thread; dropping it lets the thread put out what is left
/// (within a second) and end.
#[derive(Debug)]
pub struct ConsoleWriter {
    shared: Arc<Shared>,
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl ConsoleWriter {
    /// Starts the writer for `dest`, capped at `limit` bytes if given,
    /// with the console seccomp filter if `seccomp`.
    pub fn start(
        dest: Box<dyn Write + Send>,
        limit: Option<u64>,
        seccomp: bool,
    ) -> io::Result<(ConsoleWriter, ConsoleSink)> {
        let shared = Arc::new(Shared::default());
        let (tx, done) = mpsc::channel();
        let thread_shared = shared.clone();
        let thread = crate::seccomp::spawn_filtered(
            "console",
            128 << 10,
            seccomp.then_some(crate::seccomp::ThreadKind::Console),
            move || {
                drain(&thread_shared, dest, limit);
                let _ = tx.send(());
            },
        )?;
        Ok((
            ConsoleWriter {
                shared: shared.clone(),
                done,
                thread: Some(thread),
            },
            ConsoleSink { shared },
        ))
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
        // A destination that blocks (a pipe nobody reads) must not keep the
        // VMM from exiting: give up on the thread after a while.
        if self.done.recv_timeout(DRAIN_AT_EXIT).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn drain(shared: &Shared, mut dest: Box<dyn Write + Send>, limit: Option<u64>) {
    let mut written: u64 = 0;
    let mut chunk = Vec::with_capacity(RING_BYTES);
    let mut failed = false;
    let mut capped = false;
    loop {
        {
            let mut ring = shared.lock();
            while ring.bytes.is_empty() && !ring.closed {
                ring = shared.ready.wait(ring).unwrap_or_else(|p| p.into_inner());
            }
            if ring.bytes.is_empty() {
                return;
            }
            chunk.clear();
            let (front, back) = ring.bytes.as_slices();
            chunk.extend_from_slice(front);
            chunk.extend_from_slice(back);
            ring.bytes.clear();
        }
        let allowed = match limit {
            Some(limit) => {
                let left = limit.saturating_sub(written);
                (chunk.len() as u64).min(left) as usize
            }
            None => chunk.len(),
        };
        if allowed < chunk.len() {
            add(
                &METRICS.console_dropped_bytes,
                (chunk.len() - allowed) as u64,
            );
            if !capped {
                capped = true;
                tracing::warn!(
                    limit = limit.unwrap_or(0),
                    "the console reached its size limit (--console-limit); dropping further output"
                );
            }
        }
        if failed || allowed == 0 {
            if failed {
                add(&METRICS.console_dropped_bytes, allowed as u64);
            }
            continue;
        }
        let out = chunk.get(..allowed).unwrap_or_default();
        match dest.write_all(out).and_then(|()| dest.flush()) {
            Ok(()) => {
                written += allowed as u64;
                add(&METRICS.console_bytes, allowed as u64);
            }
            Err(err) => {
                failed = true;
                add(&METRICS.console_dropped_bytes, allowed as u64);
                tracing::warn!(%err, "writing the console failed; dropping further output");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<u8>>>);
    impl Write for Collect {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Blocks every write until released: a pipe nobody reads.
    struct Stuck(Arc<(Mutex<bool>, Condvar)>);
    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_arrives_in_order_and_the_file_is_capped() {
        let out = Collect::default();
        let (writer, mut sink) =
            ConsoleWriter::start(Box::new(out.clone()), Some(1000), false).unwrap();
        let before = METRICS.console_dropped_bytes.load(Ordering::Relaxed);
        for i in 0..300u32 {
            sink.write_all(format!("{i:04}\n").as_bytes()).unwrap();
        }
        drop(writer);
        let got = out.0.lock().unwrap().clone();
        assert_eq!(got.len(), 1000);
        assert!(got.starts_with(b"0000\n0001\n"));
        assert!(METRICS.console_dropped_bytes.load(Ordering::Relaxed) >= before + 500);
    }

    #[test]
    fn a_stuck_destination_never_blocks_the_writer_of_bytes() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (writer, mut sink) =
            ConsoleWriter::start(Box::new(Stuck(gate.clone())), None, false).unwrap();
        let start = std::time::Instant::now();
        // Far more than the ring holds: the vCPU side must not wait.
        let line = [b'x'; 1024];
        for _ in 0..(4 * RING_BYTES / line.len()) {
            sink.write_all(&line).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(2));
        // Dropping the writer gives up on the stuck thread after a while.
        let t = std::time::Instant::now();
        drop(writer);
        assert!(t.elapsed() < DRAIN_AT_EXIT + Duration::from_secs(2));
        let (lock, cv) = &*gate;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
}
