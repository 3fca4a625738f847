//! The kill queue: host sockets of dead connections that may still be in
//! the epoll set. They are removed from it before they are closed, so a
//! file descriptor number is never reused while still registered (epoll
//! would report the new socket's events under the old one's data).

use std::os::unix::net::UnixStream;

use event_manager::{EventOps, Events};

#[derive(Debug, Default)]
pub(crate) struct KillQueue {
    buried: Vec<UnixStream>,
}

impl KillQueue {
    /// Closes `stream` now if it is not registered, else after
    /// [`Self::empty`] removed it from the epoll set.
    pub(crate) fn bury(&mut self, stream: UnixStream, registered: bool) {
        if registered {
            self.buried.push(stream);
        }
        // Unregistered sockets are closed right away (dropped here).
    }

    /// Unregisters and closes every buried socket.
    pub(crate) fn empty(&mut self, ops: &mut EventOps<'_>) {
        for stream in self.buried.drain(..) {
            // Fails only if it was not registered after all.
            let _ = ops.remove(Events::empty(&stream));
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buried.len()
    }
}
