//! A deadline on every vhost-user request.
//!
//! The `vhost` crate's front end waits for a reply without end: a receive
//! that times out (SO_RCVTIMEO) comes back as `SocketRetry`, which its
//! receive loop retries. A back end that stays alive but stops answering
//! (a SIGSTOPped virtiofsd) would keep the caller, the VMM's event loop,
//! blocked for good, and with it SIGTERM and the API.
//!
//! So a thread of its own watches the requests: the front end arms a
//! deadline before each one and disarms it after. A deadline that passes
//! while armed shuts the socket down (`shutdown(2)`, both ways, on a
//! duplicate of the front end's descriptor): the blocked `recvmsg`
//! returns end of file and a blocked `sendmsg` EPIPE, the request fails,
//! and the front end reports that the back end did not answer in time.
//! The connection is over then, as after the back end's death.
//!
//! The thread sleeps on a condition variable: no wake-up while no request
//! is out, at most one per deadline while requests go out.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::seccomp::{spawn_filtered, ThreadKind};

/// The watchdog thread's stack: it only waits and calls shutdown(2).
const STACK_SIZE: usize = 64 << 10;

#[derive(Debug, Default)]
struct Armed {
    /// When the request under way must have been answered.
    until: Option<Instant>,
    /// The deadline passed: the socket is shut down.
    fired: bool,
    /// The thread waits with no deadline: arming must wake it.
    idle: bool,
    /// The front end is going away: the thread ends.
    closing: bool,
}

#[derive(Debug)]
struct Shared {
    armed: Mutex<Armed>,
    wake: Condvar,
    /// Here, not moved into the thread: the thread never closes it (the
    /// last reference goes with the [`Watchdog`], after the join), so its
    /// filter needs neither close(2) nor what debug builds check first.
    socket: UnixStream,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Armed> {
        self.armed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The deadline keeper of one vhost-user connection.
#[derive(Debug)]
pub struct Watchdog {
    shared: Arc<Shared>,
    deadline: Duration,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the thread watching `socket` (a duplicate of the front end's
    /// descriptor), with its seccomp filter if `seccomp`.
    pub fn start(socket: UnixStream, deadline: Duration, seccomp: bool) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            armed: Mutex::default(),
            wake: Condvar::new(),
            socket,
        });
        let theirs = shared.clone();
        let thread = spawn_filtered(
            "vhost-user watchdog",
            STACK_SIZE,
            seccomp.then_some(ThreadKind::Watchdog),
            move || watch(&theirs),
        )?;
        Ok(Watchdog {
            shared,
            deadline,
            thread: Some(thread),
        })
    }

    /// How long a request may take.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// A request is about to go out: its deadline starts now.
    pub fn arm(&self) {
        let mut armed = self.shared.lock();
        armed.until = Some(Instant::now() + self.deadline);
        if armed.idle {
            self.shared.wake.notify_one();
        }
    }

    /// The request is over; true if its deadline passed (or an earlier
    /// one did): the socket is shut down and the connection unusable.
    pub fn disarm(&self) -> bool {
        let mut armed = self.shared.lock();
        armed.until = None;
        armed.fired
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread: waits for a deadline to be armed, then for it to pass or
/// be disarmed; shuts the socket down (once) if it passes.
fn watch(shared: &Shared) {
    let mut armed = shared.lock();
    loop {
        if armed.closing {
            return;
        }
        match armed.until {
            None => {
                armed.idle = true;
                armed = shared.wake.wait(armed).unwrap_or_else(|p| p.into_inner());
                armed.idle = false;
            }
            Some(until) => {
                let now = Instant::now();
                if now >= until {
                    // Ends the blocked receive (EOF) or send (EPIPE).
                    let _ = shared.socket.shutdown(Shutdown::Both);
                    armed.fired = true;
                    armed.until = None;
                    // Nothing more to watch: the connection is over. The
                    // thread waits for the front end to go (the loop's
                    // `None` arm), so `Drop` joins it either way.
                    continue;
                }
                armed = shared
                    .wake
                    .wait_timeout(armed, until - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }
}
