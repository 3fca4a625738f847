//! virtio-fs (device id 26): the guest mounts a host directory that an
//! external vhost-user back end (virtiofsd) serves, without the back end
//! ever seeing guest memory.
//!
//! The VMM serves the device's queues (the high-priority queue and the
//! request queues) itself, like its other devices, and forwards each
//! request to virtiofsd through *shadow* virtqueues in a small memory of
//! its own, the bounce memory ([`bounce`]): one shared memfd per device,
//! the only memory the back end gets in SET_MEM_TABLE (as addresses
//! `0..size`). Guest RAM is never shared with virtiofsd, so it may be a
//! private (copy-on-write) mapping, and a compromised virtiofsd reads
//! nothing of the guest but the requests it is sent.
//!
//! Data path ([`relay`]), per queue:
//! - guest → VMM: the queue's eventfd is KVM's ioeventfd on QueueNotify,
//!   in the VMM's event loop like any device's. The relay takes chains
//!   off the guest's ring ([`super::queue::pop`]: direct descriptors
//!   only, every index and length checked, [`super::queue::QUEUE_BUDGET`]
//!   per event), copies each one's device-readable part (the FUSE
//!   in-header and arguments) into a free slot of the bounce memory,
//!   reserves the device-writable size after it, and posts a two
//!   descriptor chain on the shadow ring. No free slot: the chain stays on
//!   the guest's ring until a completion frees one. Too large for any
//!   slot: a FUSE error reply (`-EIO`), or 0 bytes if it has no room for
//!   one.
//! - VMM → back end: one write of the queue's kick eventfd (SET_VRING_KICK)
//!   per batch posted.
//! - back end → VMM: virtiofsd signals the queue's call eventfd
//!   (SET_VRING_CALL). The loop reads the shadow used ring (index and ids
//!   checked, lengths bounded by what was reserved), copies the answers
//!   into the guest's writable buffers, and returns the guest's chains.
//! - VMM → guest: `signal_used`, which sets InterruptStatus bit 0 before
//!   writing the device's irqfd: on virtio-mmio the guest's interrupt
//!   handler reads InterruptStatus first and looks at the used rings only
//!   if that bit is set, which only the VMM can set.
//!
//! So a request costs two event-loop wake-ups (the guest's notify and the
//! back end's call; both batch under load) and two copies of its bytes.
//! The features offered are VERSION_1 only: no INDIRECT_DESC (the queue
//! code reads direct chains) and no EVENT_IDX, on either ring.
//!
//! States: connected (not started) → started (after the driver's
//! activation, in the event loop) → connected (after a driver reset: the
//! shadow rings are stopped, the back end reset, every request in flight
//! forgotten) → ..., or failed for good. The back end dying (its socket
//! closes or turns readable outside a request), refusing a request,
//! leaving one unanswered past the deadline ([`frontend::REPLY_DEADLINE`],
//! kept by a watchdog thread) or breaking its used ring fails the device:
//! it logs one error naming the tag and the socket and raises the VMM's
//! fatal signal, so the VMM ends with that error rather than leave the
//! guest waiting on a share that will never answer.
//!
//! A reset is handled in the event loop after the vCPU's register write
//! returns. The back end may still finish a request it had taken after
//! GET_VRING_BASE; whatever it writes into the shadow rings after that is
//! checked like anything else it writes (a used id not in flight is
//! ignored). The guest driver resets the device only when it is removed
//! (or the guest shuts down).
//!
//! Idle memory: the bounce memory is sparse; what the large slots held is
//! given back ([`relay::Relay::trim`]) [`TRIM_AFTER`] after the last large
//! request finished.

pub mod bounce;
pub mod config;
pub mod frontend;
pub mod relay;
#[cfg(test)]
mod tests;
mod watchdog;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::bounce::{QueueSizing, HIPRIO, REQUEST};
use self::config::{FsConfig, CONFIG_SPACE_LEN};
use self::frontend::{Backend, FrontendError};
use self::relay::Relay;
use super::lifecycle::{DeviceEvent, DeviceLifecycle, FatalSignal};
use super::rate_timer::{RateTimer, EV_TIMER};
use super::{device_type, read_config_space, ActivateError, InterruptSignal, VirtioDevice};
use crate::guest_log::LogLimiter;

/// Event data of the back end's socket (the trim timer is
/// [`EV_TIMER`]); call eventfd `i` is `EV_CALL_BASE + i`.
const EV_SOCKET: u32 = 2;
const EV_CALL_BASE: u32 = 0x100;

/// How long after the last large request the memory of the large slots
/// is given back: long enough that a reader's next megabyte finds them
/// still warm, short enough that an idle container does not keep them.
/// (The timer is re-armed, one timerfd_settime, each time the large
/// slots go idle.)
pub const TRIM_AFTER: Duration = Duration::from_secs(2);

/// Where the device is with its back end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connected and negotiated; the rings are not running.
    Connected,
    /// The rings run, for the driver's activation number `activation`.
    Started { activation: u64 },
    /// The back end is gone or broke the protocol: nothing more is done.
    Failed,
}

/// One virtio-fs share.
#[derive(Debug)]
pub struct Fs {
    config: FsConfig,
    config_space: [u8; CONFIG_SPACE_LEN],
    queue_sizes: Vec<u16>,
    life: DeviceLifecycle,
    backend: Backend,
    relay: Relay,
    /// Written after posting requests: the back end's kick eventfds.
    kicks: Vec<EventFd>,
    /// Signalled by the back end after it used buffers.
    calls: Vec<EventFd>,
    trim_timer: RateTimer,
    trim_armed: bool,
    acked_features: u64,
    state: State,
    fatal: Option<FatalSignal>,
    /// Why the device failed, once it did.
    failure: Option<String>,
    limiter: LogLimiter,
}

impl Fs {
    /// Connects to the share's back end (an error if nobody listens) and
    /// negotiates with it; the request watchdog's thread runs under its
    /// seccomp filter if `seccomp`.
    pub fn connect(config: FsConfig, seccomp: bool) -> Result<Fs, FsError> {
        let backend = Backend::connect(&config.socket, config.num_queues(), seccomp)
            .map_err(|source| FsError::new(&config, source))?;
        Fs::with_backend(config, backend)
    }

    /// Connects to the back end's socket only (before the jail, which has
    /// no path to it); [`Fs::on_stream`] goes on from there.
    pub fn dial(config: &FsConfig) -> Result<std::os::unix::net::UnixStream, FsError> {
        std::os::unix::net::UnixStream::connect(&config.socket)
            .map_err(|e| FsError::new(config, FrontendError::Connect(e)))
    }

    /// [`Fs::connect`] on a stream [`Fs::dial`] connected.
    pub fn on_stream(
        config: FsConfig,
        stream: std::os::unix::net::UnixStream,
        seccomp: bool,
    ) -> Result<Fs, FsError> {
        let backend = Backend::handshake(
            stream,
            &config.socket,
            config.num_queues(),
            frontend::REPLY_DEADLINE,
            seccomp,
        )
        .map_err(|source| FsError::new(&config, source))?;
        Fs::with_backend(config, backend)
    }

    /// The device on an already connected back end, with the default
    /// slots ([`bounce::HIPRIO`], [`bounce::REQUEST`]).
    pub fn with_backend(config: FsConfig, backend: Backend) -> Result<Fs, FsError> {
        let mut sizings = vec![HIPRIO];
        sizings.resize(config.num_queues(), REQUEST);
        Fs::with_sizing(config, backend, &sizings)
    }

    /// The device with `sizings[i]` slots for queue `i`. The bounce memfd
    /// is made here: before the seccomp filters.
    pub fn with_sizing(
        config: FsConfig,
        backend: Backend,
        sizings: &[QueueSizing],
    ) -> Result<Fs, FsError> {
        let n = config.num_queues();
        if sizings.len() != n {
            return Err(FsError::new(
                &config,
                FrontendError::Memory(format!("{} slot sizes for {n} queues", sizings.len())),
            ));
        }
        let relay = Relay::new(sizings).map_err(|e| FsError::new(&config, e.into()))?;
        let eventfds = || -> std::io::Result<_> {
            let life = DeviceLifecycle::new("virtio-fs", n)?;
            let fds = || {
                (0..n)
                    .map(|_| EventFd::new(EFD_NONBLOCK))
                    .collect::<std::io::Result<Vec<_>>>()
            };
            Ok((life, fds()?, fds()?, RateTimer::new("virtio-fs")?))
        };
        let (life, kicks, calls, trim_timer) =
            eventfds().map_err(|e| FsError::new(&config, FrontendError::Socket(e)))?;
        Ok(Fs {
            config_space: config.config_space(),
            queue_sizes: vec![config.queue_size; n],
            config,
            life,
            backend,
            relay,
            kicks,
            calls,
            trim_timer,
            trim_armed: false,
            acked_features: 0,
            state: State::Connected,
            fatal: None,
            failure: None,
            limiter: LogLimiter::new("virtio-fs"),
        })
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Why the device failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// The device can go on no more: one error line, the fatal signal.
    fn fail(&mut self, why: FrontendError, ops: Option<&mut EventOps<'_>>) {
        if self.state == State::Failed {
            return;
        }
        self.state = State::Failed;
        let err = FsError::new(&self.config, why);
        tracing::error!(
            tag = %err.tag,
            socket = %err.socket,
            error = %err.error,
            "virtio-fs back end failed; stopping the VM"
        );
        let message = err.to_string();
        if let Some(ops) = ops {
            // A closed socket stays readable: out of the loop, or it spins.
            let fd = self.backend.socket_fd();
            let _ = ops.remove(Events::with_data_raw(fd, EV_SOCKET, EventSet::IN));
        }
        if let Some(fatal) = &self.fatal {
            fatal.raise(message.clone());
        }
        self.failure = Some(message);
    }

    /// Brings the back end in line with the lifecycle: starts the rings
    /// after an activation, stops them after a reset (both, if the driver
    /// reset and re-activated before the loop looked).
    fn sync_state(&mut self, ops: Option<&mut EventOps<'_>>) {
        if let Err(why) = self.try_sync_state() {
            self.fail(why, ops);
        }
    }

    fn try_sync_state(&mut self) -> Result<(), FrontendError> {
        let activation = self.life.activations();
        match self.state {
            State::Failed => return Ok(()),
            State::Started { activation: a } if self.life.is_active() && a == activation => {
                return Ok(())
            }
            State::Started { .. } => {
                // The guest decides how often: rate-limited like every
                // guest-triggered line.
                if self.limiter.allow() {
                    tracing::debug!(tag = %self.config.tag, "virtio-fs: stopping the rings");
                }
                self.state = State::Connected;
                self.backend.stop()?;
                // Whatever was in flight is the old activation's.
                self.relay.reset();
            }
            State::Connected => {}
        }
        let Some(active) = self.life.active() else {
            return Ok(());
        };
        let queues = active.queues.len();
        self.relay.reset();
        let bounce = self.relay.bounce();
        self.backend
            .start(bounce.memory(), &bounce.rings(), &self.kicks, &self.calls)?;
        self.state = State::Started { activation };
        if self.limiter.allow() {
            tracing::info!(
                tag = %self.config.tag,
                queues,
                "virtio-fs: the queues run, relayed to the back end"
            );
        }
        // The driver may have made requests available already.
        for q in 0..queues {
            self.pump(q)?;
        }
        Ok(())
    }

    /// Moves queue `q` on: what the back end answered goes back to the
    /// guest, then what the guest made available goes to the back end.
    /// An error is the back end breaking its ring.
    fn pump(&mut self, q: usize) -> Result<(), FrontendError> {
        if !matches!(self.state, State::Started { .. }) {
            return Ok(());
        }
        let Some(active) = self.life.active_mut() else {
            return Ok(());
        };
        let Some(queue) = active.queues.get_mut(q) else {
            return Ok(());
        };
        let done = self.relay.complete(q, queue, &active.mem)?;
        let taken = self.relay.serve_guest(q, queue, &active.mem);
        if taken.posted > 0 {
            if let Some(kick) = self.kicks.get(q) {
                if let Err(err) = kick.write(1) {
                    if self.limiter.allow() {
                        tracing::warn!(%err, queue = q, "virtio-fs: kicking the back end");
                    }
                }
            }
        }
        if done.used || taken.used {
            active.signal_used(&mut self.limiter, "virtio-fs");
        }
        if taken.more {
            self.life.rearm(q);
        }
        if done.large_idle {
            // TRIM_AFTER from the last large request: a reader's next
            // megabyte finds its slot still warm.
            self.trim_armed = self.trim_timer.arm(TRIM_AFTER);
        }
        Ok(())
    }

    /// Queue `q`'s eventfd (the guest) or call eventfd (the back end).
    fn on_queue(&mut self, q: usize, ops: Option<&mut EventOps<'_>>) {
        if let Err(why) = self.pump(q) {
            self.fail(why, ops);
        }
    }

    /// Handles an event from the event loop (also used by tests without
    /// an event manager).
    fn handle(&mut self, events: &Events, ops: Option<&mut EventOps<'_>>) {
        match self.life.event(events) {
            DeviceEvent::StateChanged => self.sync_state(ops),
            DeviceEvent::Queue(q) => self.on_queue(q, ops),
            DeviceEvent::Other(EV_TIMER) => {
                self.trim_timer.drain();
                self.trim_armed = false;
                if matches!(self.state, State::Started { .. }) {
                    self.relay.trim();
                }
            }
            DeviceEvent::Other(EV_SOCKET) => {
                if let Err(why) = self.backend.check_alive() {
                    self.fail(why, ops);
                } else if events
                    .event_set()
                    .intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
                {
                    self.fail(FrontendError::Closed, ops);
                }
            }
            DeviceEvent::Other(data)
                if data >= EV_CALL_BASE && ((data - EV_CALL_BASE) as usize) < self.calls.len() =>
            {
                let q = (data - EV_CALL_BASE) as usize;
                if let Some(evt) = self.calls.get(q) {
                    let _ = evt.read();
                }
                self.on_queue(q, ops);
            }
            DeviceEvent::Other(other) => {
                tracing::debug!(data = other, "virtio-fs: unknown event");
            }
        }
    }
}

/// A share that could not be set up: names it.
#[derive(Debug, thiserror::Error)]
#[error("virtio-fs tag={tag} socket={socket}: {error}")]
pub struct FsError {
    tag: String,
    socket: String,
    /// In the message (not a `source`, so it is not printed twice).
    error: FrontendError,
}

impl FsError {
    fn new(config: &FsConfig, error: FrontendError) -> Self {
        FsError {
            tag: config.tag.clone(),
            socket: config.socket.display().to_string(),
            error,
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn avail_features(&self) -> u64 {
        self.backend.guest_features()
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.backend.guest_features();
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space, offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Read-only (virtio 1.2, 5.11.4).
    }
    fn queue_events(&self) -> &[EventFd] {
        self.life.queue_events()
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn InterruptSignal>,
    ) -> Result<(), ActivateError> {
        // The vCPU thread only hands the queues over; the vhost-user
        // messages go out from the event loop (StateChanged), which then
        // serves the queues.
        self.life.activate(mem, queues, interrupt)
    }
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        // Requests on their way to or from the back end are the back end
        // process's: a device with any cannot be saved.
        let busy = (0..self.queue_sizes.len()).any(|q| self.relay.in_flight(q) > 0);
        if busy {
            return None;
        }
        self.life.queue_states()
    }

    fn reset(&mut self) -> bool {
        self.life.reset();
        true
    }
    fn set_fatal_signal(&mut self, fatal: FatalSignal) {
        self.fatal = Some(fatal);
    }
}

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        self.life.register(ops);
        self.trim_timer.register(ops);
        let socket = self.backend.socket_fd();
        let calls = self
            .calls
            .iter()
            .enumerate()
            .map(|(i, e)| (e.as_raw_fd(), EV_CALL_BASE + i as u32, EventSet::IN));
        let all = std::iter::once((socket, EV_SOCKET, EventSet::IN | EventSet::READ_HANG_UP))
            .chain(calls);
        for (fd, data, set) in all {
            if let Err(err) = ops.add(Events::with_data_raw(fd, data, set)) {
                tracing::error!(?err, tag = %self.config.tag, "virtio-fs: registering an fd");
            }
        }
        // The back end may have died between the connection and now.
        if let Err(why) = self.backend.check_alive() {
            self.fail(why, Some(ops));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps<'_>) {
        self.handle(&events, Some(ops));
    }
}
