//! The shim's log: containerd reads a FIFO named `log` in the bundle (the
//! shim's working directory) and copies it into its own log. Every line
//! carries the namespace and the shim's id; the agent's lines arrive
//! through `isola_sandbox`, which tags them with the sandbox id. The
//! `start` and `delete` actions, whose stdout is containerd's, log to
//! stderr.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

use containerd_shim::Flags;
use tracing_subscriber::EnvFilter;

/// Writes to the log FIFO without ever blocking: when containerd is not
/// reading (restarting) and the pipe is full, lines are dropped.
struct FifoWriter {
    file: std::fs::File,
    prefix: String,
}

impl Write for FifoWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut line = Vec::with_capacity(self.prefix.len() + buf.len());
        line.extend_from_slice(self.prefix.as_bytes());
        line.extend_from_slice(buf);
        // A line is written whole (below PIPE_BUF it is atomic) or dropped.
        let _ = self.file.write(&line);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn filter(flags: &Flags) -> EnvFilter {
    let default = if flags.debug { "debug" } else { "info" };
    EnvFilter::try_from_env("ISOLA_SHIM_LOG").unwrap_or_else(|_| EnvFilter::new(default))
}

/// Sets up logging for this invocation of the binary.
pub fn init(flags: &Flags) {
    let serving = flags.action.is_empty() && !flags.socket.is_empty();
    let prefix = format!("isola-shim namespace={} id={} ", flags.namespace, flags.id);
    if serving {
        // Read-write: the FIFO always has a reader (us), so a write never
        // fails for want of one while containerd restarts.
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("log")
        {
            Ok(file) => {
                let writer = Mutex::new(FifoWriter { file, prefix });
                tracing_subscriber::fmt()
                    .with_env_filter(filter(flags))
                    .with_ansi(false)
                    .with_target(false)
                    .with_writer(writer)
                    .init();
                return;
            }
            Err(err) => eprintln!("isola-shim: opening the log FIFO: {err}; logging to stderr"),
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter(flags))
        .with_ansi(false)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
}
