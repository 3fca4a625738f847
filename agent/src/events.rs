//! The event ring behind `WaitEvent`: process exits and OOM kills, numbered
//! from 1, kept in a bounded ring. A host that asks for events after a
//! sequence number that fell out of the ring gets the oldest kept event and
//! how many it missed.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

/// How many events the ring keeps.
pub const CAPACITY: usize = 1024;

/// One event of the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Exited {
        container_id: String,
        exec_id: String,
        pid: u32,
        exit_status: i32,
        exited_at_ns: u64,
    },
    Oom {
        container_id: String,
    },
}

/// What `WaitEvent` answers: the event, its number, and how many events
/// after `after` were dropped before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numbered {
    pub seq: u64,
    pub missed: u64,
    pub event: Event,
}

#[derive(Debug)]
struct Ring {
    /// Sequence number of `events[0]`.
    first_seq: u64,
    events: VecDeque<Event>,
    capacity: usize,
}

impl Ring {
    fn next_seq(&self) -> u64 {
        self.first_seq + self.events.len() as u64
    }

    fn push(&mut self, event: Event) -> u64 {
        if self.events.len() == self.capacity {
            self.events.pop_front();
            self.first_seq += 1;
        }
        self.events.push_back(event);
        self.next_seq() - 1
    }

    /// The first event numbered above `after`, if one is kept or was
    /// dropped (then the oldest kept one, with the count it skipped).
    fn after(&self, after: u64) -> Option<Numbered> {
        let want = after.saturating_add(1).max(1);
        if want >= self.next_seq() {
            return None;
        }
        let (seq, missed) = if want < self.first_seq {
            (self.first_seq, self.first_seq - want)
        } else {
            (want, 0)
        };
        let event = self.events.get((seq - self.first_seq) as usize)?.clone();
        Some(Numbered { seq, missed, event })
    }
}

/// The shared ring; waiters are woken by every push.
#[derive(Debug)]
pub struct Events {
    ring: Mutex<Ring>,
    notify: Notify,
}

impl Default for Events {
    fn default() -> Self {
        Events::with_capacity(CAPACITY)
    }
}

impl Events {
    pub fn with_capacity(capacity: usize) -> Events {
        Events {
            ring: Mutex::new(Ring {
                first_seq: 1,
                events: VecDeque::with_capacity(capacity.min(64)),
                capacity: capacity.max(1),
            }),
            notify: Notify::new(),
        }
    }

    /// Adds an event and wakes the waiters; returns its number.
    pub fn push(&self, event: Event) -> u64 {
        let seq = crate::lock(&self.ring).push(event);
        self.notify.notify_waiters();
        seq
    }

    /// The first event numbered above `after`, now.
    pub fn get(&self, after: u64) -> Option<Numbered> {
        crate::lock(&self.ring).after(after)
    }

    /// Waits for the first event numbered above `after`.
    pub async fn wait(&self, after: u64) -> Numbered {
        loop {
            // Register for the wake-up before looking, so a push between
            // the look and the wait is not missed.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(event) = self.get(after) {
                return event;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oom(n: usize) -> Event {
        Event::Oom {
            container_id: format!("c{n}"),
        }
    }

    #[test]
    fn events_are_numbered_from_one_and_read_in_order() {
        let events = Events::with_capacity(4);
        assert_eq!(events.get(0), None);
        assert_eq!(events.push(oom(1)), 1);
        assert_eq!(events.push(oom(2)), 2);
        let first = events.get(0).expect("first");
        assert_eq!((first.seq, first.missed, first.event), (1, 0, oom(1)));
        let second = events.get(1).expect("second");
        assert_eq!((second.seq, second.missed), (2, 0));
        assert_eq!(events.get(2), None);
        assert_eq!(events.get(u64::MAX), None);
    }

    #[test]
    fn a_host_that_fell_behind_is_told_how_many_it_missed() {
        let events = Events::with_capacity(3);
        for n in 1..=10 {
            events.push(oom(n));
        }
        // Kept: 8, 9, 10. After 2, events 3..=7 are gone: 5 missed.
        let got = events.get(2).expect("oldest kept");
        assert_eq!((got.seq, got.missed, got.event), (8, 5, oom(8)));
        let got = events.get(0).expect("oldest kept");
        assert_eq!((got.seq, got.missed), (8, 7));
        let got = events.get(8).expect("next");
        assert_eq!((got.seq, got.missed), (9, 0));
    }

    #[tokio::test]
    async fn a_waiter_wakes_on_the_next_push() {
        let events = std::sync::Arc::new(Events::with_capacity(8));
        events.push(oom(1));
        let waiter = {
            let events = events.clone();
            tokio::spawn(async move { events.wait(1).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        events.push(oom(2));
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!((got.seq, got.event), (2, oom(2)));
    }
}
