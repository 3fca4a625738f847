//! What of a guest's log reaches the host's log.
//!
//! The agent's log lines (and events that name guest-chosen ids) end up in
//! containerd's log, the node's journal, shared by every pod: a guest that
//! floods it would push other pods' lines out (the journal's per-unit rate
//! limit drops them), fill the disk, or raise its own lines' importance.
//! [`LogGate`] bounds one sandbox's share: lines above the configured
//! level are dropped whatever level they claim to be, the rest pass
//! through a token bucket ([`LogGate::BURST`] lines, then
//! [`LogGate::PER_SECOND`] a second), and what is forwarded is cut to
//! [`MAX_FORWARDED`] bytes. Dropped lines are counted (the sandbox's
//! `dropped_log_lines`) and summed up in one line a second at most.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most bytes of one guest line put into the host's log.
pub const MAX_FORWARDED: usize = 1024;

/// The outcome of [`LogGate::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it.
    Pass,
    /// Drop it (counted).
    Drop,
}

/// One sandbox's budget of guest log lines.
#[derive(Debug)]
pub struct LogGate {
    /// The most verbose level forwarded (the config's `log_level`).
    max_level: tracing::Level,
    tokens: f64,
    last: Option<Instant>,
    /// Dropped since the last summary line.
    unreported: u64,
    last_report: Option<Instant>,
    dropped: Arc<AtomicU64>,
}

impl LogGate {
    /// Lines a sandbox may log at once (a boot and its first containers
    /// log a few dozen).
    pub const BURST: f64 = 200.0;
    /// Lines a second after the burst.
    pub const PER_SECOND: f64 = 10.0;

    /// A gate forwarding lines up to `max_level`, counting drops into
    /// `dropped`.
    pub fn new(max_level: tracing::Level, dropped: Arc<AtomicU64>) -> LogGate {
        LogGate {
            max_level,
            tokens: Self::BURST,
            last: None,
            unreported: 0,
            last_report: None,
            dropped,
        }
    }

    /// Whether a line of `level` may be logged now.
    pub fn admit(&mut self, level: tracing::Level) -> Verdict {
        self.admit_at(level, Instant::now())
    }

    fn admit_at(&mut self, level: tracing::Level, now: Instant) -> Verdict {
        if let Some(last) = self.last {
            let secs = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + secs * Self::PER_SECOND).min(Self::BURST);
        }
        self.last = Some(now);
        // tracing's order: ERROR < WARN < INFO < DEBUG < TRACE in
        // verbosity, so a level "greater" than the cap is more verbose.
        if level > self.max_level || self.tokens < 1.0 {
            self.unreported += 1;
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Verdict::Drop;
        }
        self.tokens -= 1.0;
        Verdict::Pass
    }

    /// Whether lines were dropped since the last report.
    pub fn has_unreported(&self) -> bool {
        self.unreported > 0
    }

    /// Every line this gate's counter holds as dropped (with the lines of
    /// any gate sharing it).
    pub fn total_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The number of lines dropped since the last report, once a second at
    /// most (`None`: nothing to report now). The caller logs it.
    pub fn report(&mut self) -> Option<u64> {
        self.report_at(Instant::now())
    }

    /// The number of lines dropped since the last report, now whatever
    /// the time (for the last summary, when the stream ends).
    pub fn final_report(&mut self) -> Option<u64> {
        Some(std::mem::take(&mut self.unreported)).filter(|n| *n > 0)
    }

    fn report_at(&mut self, now: Instant) -> Option<u64> {
        if self.unreported == 0 {
            return None;
        }
        if self
            .last_report
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return None;
        }
        self.last_report = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

/// `text` cut to at most `max` bytes on a character boundary, and whether
/// it was cut.
pub fn truncate(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

/// The config's log level as the most verbose level forwarded (`info` for
/// anything unknown; `off` forwards errors only).
pub fn level_cap(log_level: &str) -> tracing::Level {
    match log_level {
        "error" | "off" => tracing::Level::ERROR,
        "warn" => tracing::Level::WARN,
        "debug" => tracing::Level::DEBUG,
        "trace" => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn a_flood_gets_the_burst_then_the_rate() {
        let dropped = Arc::new(AtomicU64::new(0));
        let mut gate = LogGate::new(Level::INFO, dropped.clone());
        let t0 = Instant::now();
        let passed = (0..10_000)
            .filter(|_| gate.admit_at(Level::ERROR, t0) == Verdict::Pass)
            .count();
        assert_eq!(passed, LogGate::BURST as usize);
        assert_eq!(dropped.load(Ordering::Relaxed), 10_000 - passed as u64);
        // A second later, ten more; the summary comes once a second.
        let t1 = t0 + Duration::from_secs(1);
        let passed = (0..1000)
            .filter(|_| gate.admit_at(Level::INFO, t1) == Verdict::Pass)
            .count();
        assert_eq!(passed, LogGate::PER_SECOND as usize);
        assert_eq!(gate.report_at(t1), Some(10_000 - 200 + 990));
        assert_eq!(gate.report_at(t1), None);
        gate.admit_at(Level::INFO, t1);
        assert_eq!(gate.report_at(t1 + Duration::from_millis(500)), None);
        assert_eq!(gate.report_at(t1 + Duration::from_secs(1)), Some(1));
        // Quiet for long, the bucket is full again, not fuller.
        let t2 = t1 + Duration::from_secs(3600);
        let passed = (0..1000)
            .filter(|_| gate.admit_at(Level::WARN, t2) == Verdict::Pass)
            .count();
        assert_eq!(passed, LogGate::BURST as usize);
        // The stream's end reports what is left, at once, and only once.
        assert_eq!(gate.report_at(t2), Some(800));
        for _ in 0..5 {
            assert_eq!(gate.admit_at(Level::WARN, t2), Verdict::Drop);
        }
        assert_eq!(gate.report_at(t2), None, "within the second");
        assert_eq!(gate.final_report(), Some(5));
        assert_eq!(gate.final_report(), None);
    }

    #[test]
    fn lines_above_the_configured_level_are_dropped_whatever_they_claim() {
        let dropped = Arc::new(AtomicU64::new(0));
        let mut gate = LogGate::new(level_cap("info"), dropped.clone());
        let now = Instant::now();
        assert_eq!(gate.admit_at(Level::DEBUG, now), Verdict::Drop);
        assert_eq!(gate.admit_at(Level::TRACE, now), Verdict::Drop);
        assert_eq!(gate.admit_at(Level::INFO, now), Verdict::Pass);
        assert_eq!(gate.admit_at(Level::ERROR, now), Verdict::Pass);
        assert_eq!(dropped.load(Ordering::Relaxed), 2);
        let mut quiet = LogGate::new(level_cap("error"), dropped);
        assert_eq!(quiet.admit_at(Level::WARN, now), Verdict::Drop);
        assert_eq!(quiet.admit_at(Level::ERROR, now), Verdict::Pass);
        assert_eq!(level_cap("bogus"), Level::INFO);
        assert_eq!(level_cap("trace"), Level::TRACE);
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("short", 10), ("short", false));
        assert_eq!(truncate("abcdef", 3), ("abc", true));
        // "é" is two bytes: a cut in its middle moves before it.
        assert_eq!(truncate("aé", 2), ("a", true));
        assert_eq!(truncate("", 0), ("", false));
    }
}
