//! Rate limiting for log messages a guest (or a host client) can trigger.
//!
//! Anything the guest controls (register writes, ring contents, packets)
//! may be repeated millions of times; each such log site goes through a
//! [`LogLimiter`]: at most [`LogLimiter::PER_SECOND`] messages a second per
//! limiter, then one summary line with how many were dropped. Every dropped
//! message is also counted in [`METRICS`](crate::metrics::METRICS)
//! (`guest_logs_suppressed`), so a flood stays visible without filling the
//! disk.

use std::time::{Duration, Instant};

use crate::metrics::{inc, METRICS};

/// A per-site (or per-device) budget of log messages.
#[derive(Debug)]
pub struct LogLimiter {
    what: &'static str,
    window: Option<Instant>,
    count: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// Messages allowed per second.
    pub const PER_SECOND: u32 = 10;

    /// `what` names the source in the summary line ("vsock", "virtio-mmio").
    pub const fn new(what: &'static str) -> Self {
        LogLimiter {
            what,
            window: None,
            count: 0,
            suppressed: 0,
        }
    }

    /// Whether the next message may be logged. Call it only when about to
    /// log: a `false` counts as one suppressed message.
    pub fn allow(&mut self) -> bool {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> bool {
        let fresh = match self.window {
            None => true,
            Some(w) => now.saturating_duration_since(w) >= Duration::from_secs(1),
        };
        if fresh {
            if self.suppressed > 0 {
                tracing::warn!(
                    source = self.what,
                    suppressed = self.suppressed,
                    "similar guest-triggered messages suppressed in the last second"
                );
            }
            self.window = Some(now);
            self.count = 0;
            self.suppressed = 0;
        }
        if self.count < Self::PER_SECOND {
            self.count += 1;
            true
        } else {
            self.suppressed += 1;
            inc(&METRICS.guest_logs_suppressed);
            false
        }
    }

    /// Messages suppressed in the current window.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn allows_a_burst_then_suppresses_until_the_next_second() {
        let mut l = LogLimiter::new("test");
        let t0 = Instant::now();
        let before = METRICS.guest_logs_suppressed.load(Ordering::Relaxed);
        let allowed = (0..1000).filter(|_| l.allow_at(t0)).count();
        assert_eq!(allowed, LogLimiter::PER_SECOND as usize);
        assert_eq!(l.suppressed(), 1000 - u64::from(LogLimiter::PER_SECOND));
        assert!(METRICS.guest_logs_suppressed.load(Ordering::Relaxed) >= before + 990);
        assert!(l.allow_at(t0 + Duration::from_millis(1500)));
        assert_eq!(l.suppressed(), 0);
    }
}
