//! The running VM: the VMM's event loop and what it answers.
//!
//! One epoll loop (event-manager) on the main thread serves every device
//! subscriber and the VMM's own events ([`Control`]): vCPU exits, the
//! i8042 reset, API calls, SIGTERM/SIGINT/SIGHUP (through a signalfd) and
//! a device's fatal error (a vhost-user back end that died), which ends
//! the VM with that error.
//! After every round of ready events the loop looks at what is pending, so
//! a device that keeps its queues busy (it re-arms them after a budget)
//! cannot keep a stop request waiting.

use std::os::fd::AsRawFd;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use nix::sys::signalfd::SignalFd;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{Call, Request};
use crate::config::VmConfig;
use crate::devices::boot_timer::BootTimes;
use crate::devices::i8042::I8042;
use crate::devices::virtio::lifecycle::FatalSignal;
use crate::metrics::METRICS;
use crate::vcpu::{self, GuestExit, RunState, VcpuThreads};

/// How long a `shutdown` request waits for the guest before stopping it.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a pause may take to park every vCPU.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the event loop found pending after a round of events.
#[derive(Debug, Default)]
pub struct Pending {
    pub vcpu_exit: bool,
    pub reset: bool,
    pub signal: Option<u32>,
    /// A device could not go on: why.
    pub fatal: Option<String>,
    /// The guest signalled init ready (the boot timer), for a template VM
    /// that saves itself then.
    pub ready: bool,
}

/// The VMM's own events: vCPU exits, i8042 reset, API calls, signals,
/// devices' fatal errors.
#[derive(Debug)]
pub struct Control {
    pub exit_evt: EventFd,
    pub reset_evt: EventFd,
    pub api_evt: EventFd,
    pub signal_fd: SignalFd,
    pub fatal: FatalSignal,
    /// Written by the boot timer at init ready (a self-saving template).
    pub ready_evt: Option<EventFd>,
    pub pending: Pending,
}

const EV_EXIT: u32 = 1;
const EV_RESET: u32 = 2;
const EV_API: u32 = 3;
const EV_SIGNAL: u32 = 4;
const EV_FATAL: u32 = 5;
const EV_READY: u32 = 6;

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        for (fd, data) in [
            (self.exit_evt.as_raw_fd(), EV_EXIT),
            (self.reset_evt.as_raw_fd(), EV_RESET),
            (self.api_evt.as_raw_fd(), EV_API),
            (self.signal_fd.as_raw_fd(), EV_SIGNAL),
            (self.fatal.event_fd().as_raw_fd(), EV_FATAL),
        ] {
            if let Err(err) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                tracing::error!(?err, "registering a VMM event");
            }
        }
        if let Some(ready) = &self.ready_evt {
            if let Err(err) = ops.add(Events::with_data_raw(
                ready.as_raw_fd(),
                EV_READY,
                EventSet::IN,
            )) {
                tracing::error!(?err, "registering a VMM event");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps<'_>) {
        match events.data() {
            EV_EXIT => {
                let _ = self.exit_evt.read();
                self.pending.vcpu_exit = true;
            }
            EV_RESET => {
                let _ = self.reset_evt.read();
                self.pending.reset = true;
            }
            EV_API => {
                let _ = self.api_evt.read();
            }
            EV_SIGNAL => {
                while let Ok(Some(info)) = self.signal_fd.read_signal() {
                    self.pending.signal = Some(info.ssi_signo);
                }
            }
            EV_FATAL => {
                if let Some(why) = self.fatal.take() {
                    self.pending.fatal.get_or_insert(why);
                }
            }
            EV_READY => {
                if let Some(ready) = &self.ready_evt {
                    let _ = ready.read();
                }
                self.pending.ready = true;
            }
            _ => {}
        }
    }
}

/// The event loop of a running VM.
pub struct EventLoop<'a> {
    pub config: &'a VmConfig,
    pub events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    pub control: Arc<Mutex<Control>>,
    pub calls: Option<&'a Receiver<Call>>,
    pub vcpus: &'a VcpuThreads,
    pub i8042: &'a Mutex<I8042>,
    pub boot_times: &'a Mutex<BootTimes>,
    pub start: Instant,
    pub startup_cpu: Duration,
    /// Set by a `shutdown` request: when to stop the guest regardless.
    pub shutdown_deadline: Option<Instant>,
    /// A template VM (it can be saved).
    pub template: bool,
    /// A template VM that saves itself when the guest is ready, unless
    /// this passes first (an error: no template).
    pub save_when_ready: Option<Instant>,
    /// Set when the VM is to be saved (after the loop).
    pub snapshot: Option<SnapshotBy>,
}

/// Who asked for a snapshot.
#[derive(Debug)]
pub enum SnapshotBy {
    /// The API's `snapshot`: its reply goes here once the VM is saved.
    Api(std::sync::mpsc::Sender<serde_json::Value>),
    /// The guest became ready (`--save-when-ready`).
    Ready,
}

impl std::fmt::Debug for EventLoop<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("shutdown_deadline", &self.shutdown_deadline)
            .finish_non_exhaustive()
    }
}

impl EventLoop<'_> {
    /// Creates the epoll loop with the VMM's own events registered.
    pub fn new_manager(
        control: Arc<Mutex<Control>>,
        subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    ) -> Result<EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>> {
        let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().context("creating the event loop")?;
        events.add_subscriber(control);
        for s in subscribers {
            events.add_subscriber(s);
        }
        Ok(events)
    }

    /// Runs until the guest ends or the VMM is told to stop.
    pub fn run(&mut self) -> Result<GuestExit> {
        loop {
            // Sleep until an event; wake on a clock only while a shutdown
            // request waits for the guest (an idle VM costs no wake-ups).
            let deadline = match (self.shutdown_deadline, self.save_when_ready) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let timeout_ms = deadline.map_or(-1, |d| {
                d.saturating_duration_since(Instant::now())
                    .as_millis()
                    .clamp(1, i32::MAX as u128) as i32
            });
            self.events
                .run_with_timeout(timeout_ms)
                .context("the VMM event loop failed")?;
            let pending = std::mem::take(
                &mut self
                    .control
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pending,
            );
            if let Some(why) = pending.fatal {
                anyhow::bail!("{why}");
            }
            if pending.reset {
                return Ok(GuestExit::Reset);
            }
            if pending.vcpu_exit {
                let why = self
                    .vcpus
                    .shared
                    .exit
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                return Ok(why.unwrap_or(GuestExit::Reset));
            }
            if let Some(sig) = pending.signal {
                tracing::info!(signal = sig, "stopping the VM on signal");
                return Ok(GuestExit::PowerOff);
            }
            if pending.ready && self.save_when_ready.is_some() {
                if !self.pause_vcpus() {
                    anyhow::bail!(
                        "the vCPUs did not pause within {} s to save the template",
                        PAUSE_TIMEOUT.as_secs()
                    );
                }
                tracing::info!("the guest is ready: saving the template");
                self.snapshot = Some(SnapshotBy::Ready);
                return Ok(GuestExit::Snapshotted);
            }
            if self.save_when_ready.is_some_and(|d| Instant::now() >= d) {
                anyhow::bail!("the guest was not ready in time: no template saved");
            }
            if let Some(calls) = self.calls {
                let mut stop = false;
                while let Ok(call) = calls.try_recv() {
                    stop |= self.handle_call(call);
                }
                if self.snapshot.is_some() {
                    return Ok(GuestExit::Snapshotted);
                }
                if stop {
                    return Ok(GuestExit::PowerOff);
                }
            }
            if self.shutdown_deadline.is_some_and(|d| Instant::now() >= d) {
                tracing::warn!("the guest did not power off in time; stopping it");
                return Ok(GuestExit::PowerOff);
            }
        }
    }

    /// Parks every vCPU; false, with them running again, if they did not
    /// park within [`PAUSE_TIMEOUT`].
    fn pause_vcpus(&self) -> bool {
        let shared = &self.vcpus.shared;
        shared.set(RunState::Paused);
        if vcpu::kick_all(&self.vcpus.handles, shared, PAUSE_TIMEOUT) {
            return true;
        }
        shared.set(RunState::Running);
        false
    }

    /// Executes one API call; true when the VM must stop now.
    fn handle_call(&mut self, call: Call) -> bool {
        use serde_json::json;
        let shared = &self.vcpus.shared;
        let mut stop = false;
        let reply = match call.request {
            Request::Info => {
                let times = self.boot_times.lock().unwrap_or_else(|p| p.into_inner());
                let state = match shared.run_state() {
                    RunState::Running => "running",
                    RunState::Paused => "paused",
                    RunState::Stopping => "stopping",
                };
                json!({
                    "ok": true,
                    "state": state,
                    "pid": std::process::id(),
                    "vcpus": self.config.vcpus,
                    "memory_mib": self.config.memory_mib,
                    "uptime_ms": self.start.elapsed().as_millis() as u64,
                    "startup_cpu_us": self.startup_cpu.as_micros() as u64,
                    "boot_time_ms": {
                        "init_ready": times.init_ready.map(|d| d.as_millis() as u64),
                        "agent_ready": times.agent_ready.map(|d| d.as_millis() as u64),
                    },
                    "metrics": METRICS.snapshot(),
                })
            }
            Request::Pause => {
                if self.pause_vcpus() {
                    tracing::info!("vCPUs paused");
                    json!({"ok": true, "state": "paused"})
                } else {
                    json!({"ok": false, "error": format!("vCPUs did not pause within {} s", PAUSE_TIMEOUT.as_secs())})
                }
            }
            Request::Resume => {
                shared.set(RunState::Running);
                tracing::info!("vCPUs resumed");
                json!({"ok": true, "state": "running"})
            }
            Request::Shutdown { timeout_ms } => {
                if shared.run_state() == RunState::Paused {
                    shared.set(RunState::Running);
                }
                self.i8042
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .trigger_ctrl_alt_del();
                let timeout = timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);
                // At most a day: any longer is "no timeout" in practice,
                // and it cannot overflow the clock.
                let timeout = timeout.min(Duration::from_secs(24 * 3600));
                self.shutdown_deadline = Some(Instant::now() + timeout);
                tracing::info!(
                    timeout_ms = timeout.as_millis() as u64,
                    "asked the guest to power off"
                );
                json!({"ok": true, "state": "shutting_down"})
            }
            Request::Stop => {
                stop = true;
                json!({"ok": true, "state": "stopping"})
            }
            Request::Snapshot if !self.template => {
                json!({"ok": false, "error": "only a template VM (isola-vmm --template DIR) can be saved"})
            }
            Request::Snapshot => {
                // The vCPUs stop after the loop; the reply waits for the
                // state to be written.
                if self.pause_vcpus() {
                    tracing::info!("vCPUs paused for the snapshot");
                    self.snapshot = Some(SnapshotBy::Api(call.reply));
                    return false;
                }
                json!({"ok": false, "error": format!("vCPUs did not pause within {} s", PAUSE_TIMEOUT.as_secs())})
            }
        };
        let _ = call.reply.send(reply);
        stop
    }
}

/// User plus system CPU time of the whole process so far.
pub fn process_cpu_time() -> Duration {
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::new(
                    tv.tv_sec().max(0) as u64,
                    (tv.tv_usec().clamp(0, 999_999) as u32) * 1000,
                )
            };
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}
