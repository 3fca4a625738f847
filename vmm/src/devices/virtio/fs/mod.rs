//! virtio-fs (device id 26) as a vhost-user front end: the guest mounts a
//! host directory that an external back end (virtiofsd) serves.
//!
//! The VMM does not read these queues: the back end does, from the same
//! guest RAM (a shared memfd it maps through SET_MEM_TABLE). The VMM owns
//! the transport (virtio-mmio registers, the configuration space: tag and
//! number of request queues), hands the back end the queues when the
//! driver activates the device ([`frontend`]), and watches the back end.
//!
//! Notifications:
//! - guest → back end: each queue's eventfd is KVM's ioeventfd on
//!   QueueNotify (registered by the device manager like any device's) and
//!   the back end's kick eventfd (SET_VRING_KICK). The lifecycle keeps
//!   these out of the VMM's event loop
//!   ([`DeviceLifecycle::with_external_queues`]), so only the back end
//!   reads them: a notification costs the VMM nothing.
//! - back end → guest: the back end signals a call eventfd per queue. They
//!   are *relayed* by the event loop, not given to KVM as irqfds: on
//!   virtio-mmio the guest's interrupt handler first reads InterruptStatus
//!   and looks at the used rings only if bit 0 (used buffer) is set, and
//!   only the VMM can set that bit. An irqfd handed straight to the back
//!   end would raise the IRQ with the bit clear, and Linux would drop the
//!   interrupt. So a call eventfd wakes the loop, which sets the bit and
//!   writes the device's irqfd (`InterruptSignal::signal_used_queue`): one
//!   event-loop wake-up per interrupt the back end raises.
//!
//! States: connected (not started) → started (after the driver's
//! activation, in the event loop) → connected (after a driver reset: the
//! rings are stopped and the back end reset) → ..., or failed for good.
//! The back end dying (its socket closes or turns readable outside a
//! request), refusing a request or leaving one unanswered past the
//! deadline ([`frontend::REPLY_DEADLINE`], kept by a watchdog thread)
//! fails the device: it logs one error naming the tag and the socket and
//! raises the VMM's fatal signal, so the VMM ends with that error rather
//! than leave the guest waiting on a share that will never answer.
//!
//! A reset is handled in the event loop after the vCPU's register write
//! returns, so the back end may finish requests in flight in the short
//! window before GET_VRING_BASE reaches it; the guest driver resets the
//! device only when it is removed (or the guest shuts down).

pub mod config;
pub mod frontend;
#[cfg(test)]
mod tests;
mod watchdog;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::config::{FsConfig, CONFIG_SPACE_LEN};
use self::frontend::{Backend, FrontendError};
use super::lifecycle::{DeviceEvent, DeviceLifecycle, FatalSignal};
use super::{device_type, read_config_space, ActivateError, InterruptSignal, VirtioDevice};
use crate::guest_log::LogLimiter;

/// Event data of the back end's socket; call eventfd `i` is
/// `EV_CALL_BASE + i`.
const EV_SOCKET: u32 = 1;
const EV_CALL_BASE: u32 = 0x100;

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
    calls: Vec<EventFd>,
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

    /// The device on an already connected back end.
    pub fn with_backend(config: FsConfig, backend: Backend) -> Result<Fs, FsError> {
        let n = config.num_queues();
        let eventfds = || -> std::io::Result<_> {
            let life = DeviceLifecycle::with_external_queues("virtio-fs", n)?;
            let calls = (0..n)
                .map(|_| EventFd::new(EFD_NONBLOCK))
                .collect::<std::io::Result<Vec<_>>>()?;
            Ok((life, calls))
        };
        let (life, calls) =
            eventfds().map_err(|e| FsError::new(&config, FrontendError::Socket(e)))?;
        Ok(Fs {
            config_space: config.config_space(),
            queue_sizes: vec![config.queue_size; n],
            config,
            life,
            backend,
            calls,
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
            }
            State::Connected => {}
        }
        let Some(active) = self.life.active() else {
            return Ok(());
        };
        self.backend.start(
            &active.mem,
            &active.queues,
            self.acked_features,
            self.life.queue_events(),
            &self.calls,
        )?;
        self.state = State::Started { activation };
        if self.limiter.allow() {
            tracing::info!(
                tag = %self.config.tag,
                queues = active.queues.len(),
                "virtio-fs: the back end runs the queues"
            );
        }
        Ok(())
    }

    /// The back end signalled call eventfd `i`: relay it to the guest.
    fn relay_call(&mut self, i: usize) {
        if let Some(evt) = self.calls.get(i) {
            let _ = evt.read();
        }
        if !matches!(self.state, State::Started { .. }) {
            return;
        }
        if let Some(active) = self.life.active() {
            active.signal_used(&mut self.limiter, "virtio-fs");
        }
    }

    /// Handles an event from the event loop (also used by tests without
    /// an event manager).
    fn handle(&mut self, events: &Events, ops: Option<&mut EventOps<'_>>) {
        match self.life.event(events) {
            DeviceEvent::StateChanged => self.sync_state(ops),
            // Never registered: the back end reads the queue eventfds.
            DeviceEvent::Queue(_) => {}
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
                self.relay_call((data - EV_CALL_BASE) as usize);
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
        // messages go out from the event loop (StateChanged).
        self.life.activate(mem, queues, interrupt)
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
