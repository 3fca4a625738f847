//! The boot timer: the guest writes [`MAGIC`] to one MMIO byte when its
//! init is ready and the VMM records the time since it started (the
//! Firecracker convention, so guests that already do it work unchanged).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::bus::BusDevice;

pub const MAGIC: u8 = 123;

/// Shared record of boot milestones.
#[derive(Debug, Default)]
pub struct BootTimes {
    /// When the guest wrote the boot-timer magic (init ready).
    pub init_ready: Option<Duration>,
    /// When the agent first answered a host request on its vsock port.
    pub agent_ready: Option<Duration>,
}

#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    times: Arc<Mutex<BootTimes>>,
    /// Written once, at the first magic write (a template VM saves itself
    /// then: the agent signals the timer once its API listens).
    ready: Option<vmm_sys_util::eventfd::EventFd>,
}

impl BootTimer {
    pub fn new(start: Instant, times: Arc<Mutex<BootTimes>>) -> Self {
        BootTimer {
            start,
            times,
            ready: None,
        }
    }

    /// Also writes `ready` when the guest signals init ready.
    pub fn with_ready_event(mut self, ready: vmm_sys_util::eventfd::EventFd) -> Self {
        self.ready = Some(ready);
        self
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&MAGIC) {
            return;
        }
        let elapsed = self.start.elapsed();
        let mut times = self.times.lock().unwrap_or_else(|p| p.into_inner());
        if times.init_ready.is_none() {
            times.init_ready = Some(elapsed);
            if let Some(ready) = &self.ready {
                let _ = ready.write(1);
            }
            tracing::info!(
                ms = elapsed.as_millis() as u64,
                "guest init ready (boot timer)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_magic_write_only() {
        let times = Arc::new(Mutex::new(BootTimes::default()));
        let mut t = BootTimer::new(Instant::now(), times.clone());
        t.write(0, &[1]);
        assert!(times.lock().unwrap().init_ready.is_none());
        t.write(0, &[MAGIC]);
        let first = times.lock().unwrap().init_ready.unwrap();
        t.write(0, &[MAGIC]);
        assert_eq!(times.lock().unwrap().init_ready, Some(first));
    }

    #[test]
    fn the_ready_event_is_written_once() {
        let times = Arc::new(Mutex::new(BootTimes::default()));
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t =
            BootTimer::new(Instant::now(), times).with_ready_event(evt.try_clone().unwrap());
        t.write(0, &[1]);
        assert!(evt.read().is_err(), "not ready yet");
        t.write(0, &[MAGIC]);
        t.write(0, &[MAGIC]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
