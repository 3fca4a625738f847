//! The lifecycle every virtio device shares: inactive → activated → reset
//! → activated ..., and the event-loop plumbing that goes with it.
//!
//! A device embeds a [`DeviceLifecycle`] and delegates to it:
//!
//! - its queue eventfds are created with the device and live as long as
//!   it does. The transport registers them as KVM ioeventfds on
//!   QueueNotify; [`DeviceLifecycle::register`] (from the device's
//!   `MutEventSubscriber::init`) adds them to the event loop once. They
//!   are never removed or replaced, and [`DeviceLifecycle::event`] always
//!   reads (drains) a readable one, active device or not, so a guest
//!   notifying a reset device cannot leave a level-triggered fd spinning
//!   the loop, and no fd number is ever registered twice;
//! - [`DeviceLifecycle::activate`] (on a vCPU thread, from the transport)
//!   checks the queues and keeps them with the memory and the interrupt;
//!   [`DeviceLifecycle::reset`] drops them. Both write a state eventfd so
//!   the device's event handler runs and can pick the change up;
//! - a device that stops draining a queue because its budget
//!   ([`super::queue::QUEUE_BUDGET`]) ran out calls
//!   [`DeviceLifecycle::rearm`]: the queue's eventfd becomes readable
//!   again and the event loop returns to it after the other ready events.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::validate;
use super::{ActivateError, InterruptSignal};
use crate::metrics::{inc, METRICS};

/// Event data of the state eventfd; queue `i` uses `EV_QUEUE_BASE + i`.
/// Devices keep their own event data below [`EV_LIFECYCLE_BASE`].
pub const EV_LIFECYCLE_BASE: u32 = 0x4000_0000;
const EV_STATE: u32 = EV_LIFECYCLE_BASE;
const EV_QUEUE_BASE: u32 = EV_LIFECYCLE_BASE + 1;

/// What an activation handed the device.
#[derive(Debug)]
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<dyn InterruptSignal>,
}

impl Activation {
    /// Tells the guest a used ring changed; a failure is rate-limited by
    /// the caller's limiter.
    pub fn signal_used(&self, limiter: &mut crate::guest_log::LogLimiter, device: &str) {
        if let Err(err) = self.interrupt.signal_used_queue() {
            if limiter.allow() {
                tracing::warn!(device, %err, "raising the queue interrupt");
            }
        }
    }
}

/// What an event on one of the lifecycle's fds means for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The device was activated or reset: look at [`DeviceLifecycle::active`].
    StateChanged,
    /// The driver notified queue `i` (or the device re-armed it).
    Queue(usize),
    /// Not a lifecycle fd: the device's own (the event data).
    Other(u32),
}

/// How a device tells the VMM it cannot go on (its back end died): the
/// first reason raised is kept and the event loop, woken through the
/// eventfd, ends the VM with it. Cloned into every device by the device
/// manager.
#[derive(Debug, Clone)]
pub struct FatalSignal {
    evt: Arc<EventFd>,
    why: Arc<Mutex<Option<String>>>,
}

impl FatalSignal {
    pub fn new() -> io::Result<Self> {
        Ok(FatalSignal {
            evt: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            why: Arc::new(Mutex::new(None)),
        })
    }

    /// Reports a fatal device error (the first one wins).
    pub fn raise(&self, why: String) {
        self.why
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(why);
        if let Err(err) = self.evt.write(1) {
            tracing::error!(%err, "signalling a fatal device error to the event loop");
        }
    }

    /// The reason raised, if any (drains the eventfd).
    pub fn take(&self) -> Option<String> {
        let _ = self.evt.read();
        self.why.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Whether a reason was raised (and not yet taken).
    pub fn is_raised(&self) -> bool {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// The eventfd the event loop waits on.
    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }
}

/// The shared state machine and fds; see the module documentation.
#[derive(Debug)]
pub struct DeviceLifecycle {
    name: &'static str,
    queue_evts: Vec<EventFd>,
    /// The queues are served by another process (vhost-user): their
    /// eventfds are never added to the event loop.
    external_queues: bool,
    state_evt: EventFd,
    active: Option<Activation>,
    activations: u64,
}

impl DeviceLifecycle {
    /// A device called `name` (for logs) with `num_queues` queues.
    pub fn new(name: &'static str, num_queues: usize) -> io::Result<Self> {
        let queue_evts = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(DeviceLifecycle {
            name,
            queue_evts,
            external_queues: false,
            state_evt: EventFd::new(EFD_NONBLOCK)?,
            active: None,
            activations: 0,
        })
    }

    /// A device whose queues a vhost-user back end serves: the queue
    /// eventfds are still KVM's ioeventfds on QueueNotify, but they go to
    /// the back end (its kick eventfds), so [`Self::register`] leaves them
    /// out of the event loop: only the back end reads them.
    pub fn with_external_queues(name: &'static str, num_queues: usize) -> io::Result<Self> {
        let mut life = Self::new(name, num_queues)?;
        life.external_queues = true;
        Ok(life)
    }

    /// One eventfd per queue, for the device's whole life.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Takes the driver's queues: there must be one per queue eventfd and
    /// each must be valid for `mem`.
    pub fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn InterruptSignal>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != self.queue_evts.len() {
            inc(&METRICS.activation_failures);
            return Err(ActivateError::QueueCount {
                expected: self.queue_evts.len(),
                got: queues.len(),
            });
        }
        if let Some((i, why)) = queues
            .iter()
            .enumerate()
            .find_map(|(i, q)| validate(q, &mem).err().map(|e| (i, e)))
        {
            inc(&METRICS.activation_failures);
            return Err(ActivateError::InvalidQueue(i, why));
        }
        self.active = Some(Activation {
            mem,
            queues,
            interrupt,
        });
        self.activations += 1;
        self.state_evt.write(1)?;
        tracing::debug!(device = self.name, "activated");
        Ok(())
    }

    /// Drops the activation (the driver reset the device).
    pub fn reset(&mut self) {
        if self.active.take().is_some() {
            tracing::debug!(device = self.name, "reset");
        }
        if let Err(err) = self.state_evt.write(1) {
            tracing::error!(device = self.name, %err, "signalling a reset to the event loop");
        }
    }

    pub fn active(&self) -> Option<&Activation> {
        self.active.as_ref()
    }

    pub fn active_mut(&mut self) -> Option<&mut Activation> {
        self.active.as_mut()
    }

    /// The active queues' states (ring positions included), for a
    /// snapshot; an inactive device has none to give.
    pub fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// How many times the device was activated.
    pub fn activations(&self) -> u64 {
        self.activations
    }

    /// Registers the state and queue eventfds with the event loop (once,
    /// from the device's `init`); external queues' eventfds stay out.
    pub fn register(&self, ops: &mut EventOps<'_>) {
        let queues: &[EventFd] = if self.external_queues {
            &[]
        } else {
            &self.queue_evts
        };
        let fds = std::iter::once((self.state_evt.as_raw_fd(), EV_STATE)).chain(
            queues
                .iter()
                .enumerate()
                .map(|(i, e)| (e.as_raw_fd(), EV_QUEUE_BASE + i as u32)),
        );
        for (fd, data) in fds {
            if let Err(err) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                tracing::error!(device = self.name, ?err, "registering an eventfd");
            }
        }
    }

    /// Classifies an event and drains the eventfd behind it (always, so a
    /// readable eventfd never stays readable).
    pub fn event(&self, events: &Events) -> DeviceEvent {
        match events.data() {
            EV_STATE => {
                let _ = self.state_evt.read();
                DeviceEvent::StateChanged
            }
            data if data >= EV_QUEUE_BASE
                && ((data - EV_QUEUE_BASE) as usize) < self.queue_evts.len() =>
            {
                let i = (data - EV_QUEUE_BASE) as usize;
                if let Some(evt) = self.queue_evts.get(i) {
                    let _ = evt.read();
                }
                DeviceEvent::Queue(i)
            }
            other => DeviceEvent::Other(other),
        }
    }

    /// Makes queue `i`'s eventfd readable again, so the event loop comes
    /// back to the queue after serving the other ready events.
    pub fn rearm(&self, i: usize) {
        super::queue::note_budget_exhausted();
        if let Some(evt) = self.queue_evts.get(i) {
            if let Err(err) = evt.write(1) {
                tracing::error!(device = self.name, queue = i, %err, "re-arming a queue");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

    #[derive(Debug)]
    struct Dev(DeviceLifecycle, Vec<DeviceEvent>);

    impl MutEventSubscriber for Dev {
        fn init(&mut self, ops: &mut EventOps<'_>) {
            self.0.register(ops);
        }
        fn process(&mut self, events: Events, _: &mut EventOps<'_>) {
            let e = self.0.event(&events);
            self.1.push(e);
        }
    }

    fn notify_queue(life: DeviceLifecycle) -> Vec<DeviceEvent> {
        let dev = Arc::new(Mutex::new(Dev(life, Vec::new())));
        let mut events: EventManager<Arc<Mutex<Dev>>> = EventManager::new().unwrap();
        events.add_subscriber(dev.clone());
        dev.lock().unwrap().0.queue_events()[1].write(1).unwrap();
        while events.run_with_timeout(0).unwrap() > 0 {}
        let seen = dev.lock().unwrap().1.clone();
        seen
    }

    #[test]
    fn own_queues_are_served_external_ones_are_left_alone() {
        let own = DeviceLifecycle::new("own", 2).unwrap();
        assert_eq!(notify_queue(own), vec![DeviceEvent::Queue(1)]);
        let external = DeviceLifecycle::with_external_queues("vhost-user", 2).unwrap();
        assert_eq!(external.queue_events().len(), 2);
        let evt = external.queue_events()[1].try_clone().unwrap();
        assert_eq!(notify_queue(external), vec![]);
        // The notification is still there for the back end.
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn the_first_fatal_reason_wins() {
        let fatal = FatalSignal::new().unwrap();
        assert!(!fatal.is_raised());
        assert_eq!(fatal.take(), None);
        fatal.clone().raise("first".into());
        fatal.raise("second".into());
        assert!(fatal.is_raised());
        assert_eq!(fatal.event_fd().read().unwrap(), 2);
        assert_eq!(fatal.take().as_deref(), Some("first"));
        assert_eq!(fatal.take(), None);
    }
}
