//! The host terminal for `isola run -t`: raw mode (restored on every way
//! out: the guard's drop, the error path and exit) and its window size.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;

use isola_sandbox::WindowSize;
use nix::sys::termios::{self, SetArg, Termios};

/// The terminal's settings before raw mode, for [`restore`].
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

/// The window size used when no terminal tells one.
pub const DEFAULT_SIZE: WindowSize = WindowSize { rows: 24, cols: 80 };

/// Raw mode on stdin while alive.
#[derive(Debug)]
pub struct RawMode(());

impl RawMode {
    /// Puts stdin's terminal in raw mode; `None` if stdin is not a
    /// terminal.
    pub fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let fd = stdin.as_fd();
        let saved = termios::tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if let Ok(mut slot) = SAVED.lock() {
            *slot = Some(saved);
        }
        if let Err(err) = termios::tcsetattr(fd, SetArg::TCSANOW, &raw) {
            tracing::warn!(%err, "raw mode");
            restore();
            return None;
        }
        Some(RawMode(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts the terminal back as it was, if raw mode changed it.
pub fn restore() {
    let saved = SAVED.lock().ok().and_then(|mut s| s.take());
    if let Some(saved) = saved {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &saved);
    }
}

fn size_of(fd: BorrowedFd<'_>) -> Option<WindowSize> {
    use std::os::fd::AsRawFd;
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into `ws`, which lives for the
    // call; the fd is borrowed, so open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// The window size of the terminal on stdout or stdin, else 24x80.
pub fn window_size() -> WindowSize {
    size_of(std::io::stdout().as_fd())
        .or_else(|| size_of(std::io::stdin().as_fd()))
        .unwrap_or(DEFAULT_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_terminal_means_the_default_size_and_no_raw_mode() {
        let file = tempfile::tempfile().expect("file");
        assert_eq!(size_of(file.as_fd()), None);
        // Restoring without raw mode is a no-op.
        restore();
    }

    #[test]
    fn a_pty_reports_its_size() {
        let pty = nix::pty::openpty(
            Some(&nix::pty::Winsize {
                ws_row: 33,
                ws_col: 101,
                ws_xpixel: 0,
                ws_ypixel: 0,
            }),
            None,
        )
        .expect("openpty");
        assert_eq!(
            size_of(pty.slave.as_fd()),
            Some(WindowSize {
                rows: 33,
                cols: 101
            })
        );
    }
}
