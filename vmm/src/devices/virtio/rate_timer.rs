//! The one-shot timer a rate-limited device waits on: armed when the
//! device has used up its allowance, registered in the device's event
//! loop registration under [`EV_TIMER`], drained when it fires.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use event_manager::{EventOps, Events};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use vmm_sys_util::epoll::EventSet;

/// The event data of the timer (the lifecycle's queue events are
/// numbered apart from it: `DeviceEvent::Other`).
pub const EV_TIMER: u32 = 1;

#[derive(Debug)]
pub struct RateTimer {
    fd: TimerFd,
    device: &'static str,
}

impl RateTimer {
    pub fn new(device: &'static str) -> std::io::Result<RateTimer> {
        Ok(RateTimer {
            fd: TimerFd::new(
                ClockId::CLOCK_MONOTONIC,
                TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
            )
            .map_err(std::io::Error::from)?,
            device,
        })
    }

    /// Adds the timer to the device's registration.
    pub fn register(&self, ops: &mut EventOps<'_>) {
        let fd = self.fd.as_fd().as_raw_fd();
        if let Err(err) = ops.add(Events::with_data_raw(fd, EV_TIMER, EventSet::IN)) {
            tracing::error!(
                ?err,
                device = self.device,
                "registering the rate-limit timer"
            );
        }
    }

    /// Fires once after `wait`; false (logged) if it cannot be armed.
    pub fn arm(&self, wait: Duration) -> bool {
        match self.fd.set(
            Expiration::OneShot(TimeSpec::from_duration(wait)),
            TimerSetTimeFlags::empty(),
        ) {
            Ok(()) => true,
            Err(err) => {
                tracing::error!(%err, device = self.device, "arming the rate-limit timer");
                false
            }
        }
    }

    /// Reads the expiry, so the event loop does not wake for it again.
    pub fn drain(&self) {
        let mut buf = [0u8; 8];
        let _ = nix::unistd::read(self.fd.as_fd(), &mut buf);
    }
}
