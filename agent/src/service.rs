//! `isola.agent.v1.Agent`: one sandbox, its containers and their
//! processes, built with youki's libcontainer.
//!
//! # One thread
//!
//! The agent runs on a current-thread tokio runtime and never starts a
//! blocking-pool thread; every libcontainer call (create, exec, start,
//! delete, pause, resume) runs synchronously on that thread, inside the
//! RPC handler. Two things follow:
//!
//! - libcontainer forks (clone3) from the agent: with a single thread no
//!   lock (malloc, stderr, the log sink) can be held by another thread at
//!   the fork, so the child cannot deadlock on one;
//! - libcontainer `waitpid()`s its intermediate process (and hooks) by pid
//!   while the reaper `waitpid(-1)`s on SIGCHLD: both run on the one
//!   thread, so the reaper never runs during a libcontainer call and never
//!   steals a status libcontainer waits for. Statuses of container
//!   processes that exited during the call wait as zombies until the
//!   reaper runs, after the pid is registered (`procs::ExitRouter` also
//!   keeps early exits, should that ever change).
//!
//! [`check_single_threaded`] refuses a libcontainer call if another thread
//! exists (the netns thread of `CreateSandbox` is joined before it
//! returns).
//!
//! The cost: while a container is created, the agent does nothing else
//! (its streams wait; nothing is lost).

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use isola_protocol::agent::*;
use isola_protocol::status::{self, check_id, Code};
use isola_protocol::ttrpc;
use isola_protocol::ttrpc::asynchronous::TtrpcContext;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::wait::WaitStatus;
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch, Notify};

use crate::cgstats;
use crate::events::{Event, Events};
use crate::executor::IsolaExecutor;
use crate::identity;
use crate::lock;
use crate::network;
use crate::procs::{now_ns, ExitInfo, ExitRouter};
use crate::sandbox;
use crate::seccomp::Compiled;
use crate::spec::{self, SpecError};
use crate::streams::{self, FdIo, Registry, Stream};

/// How long `WaitProcess` waits, after the exit, for the output streams
/// to close (a grandchild that keeps the pipe open must not hold the
/// answer forever).
pub const OUTPUT_GRACE: Duration = Duration::from_secs(5);
/// How long a forced removal waits for the container's processes to die.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Most containers of a sandbox, and exec processes of a container.
const MAX_CONTAINERS: usize = 1024;
const MAX_EXECS: usize = 1024;
/// Most ephemeral volumes (Memory emptyDirs) of a sandbox.
const MAX_EPHEMERAL: usize = 1024;
/// Most processes `ListProcesses` answers.
const MAX_LIST: usize = 1024;
/// Longest cmdline kept per process.
const MAX_CMDLINE: usize = 4096;

mod debug;

type RpcResult<T> = ttrpc::Result<T>;

fn invalid(message: impl ToString) -> ttrpc::Error {
    status::error(Code::INVALID_ARGUMENT, message)
}
fn not_found(message: impl ToString) -> ttrpc::Error {
    status::error(Code::NOT_FOUND, message)
}
fn precondition(message: impl ToString) -> ttrpc::Error {
    status::error(Code::FAILED_PRECONDITION, message)
}
fn internal(message: impl ToString) -> ttrpc::Error {
    status::error(Code::INTERNAL, message)
}

/// Looks up each of a container's volume submounts (a path under
/// `containers/<id>/volumes/` of the share: `CreateContainerRequest.
/// submounts`), so that the guest's virtio-fs submount there is made now,
/// in the agent's namespace and with the share's flags: the container's
/// bind of the volume then carries it with those flags.
fn look_up_submounts(id: &str, share: Option<&Path>, submounts: &[String]) -> RpcResult<()> {
    if submounts.is_empty() {
        return Ok(());
    }
    if submounts.len() > isola_protocol::MAX_SUBMOUNTS {
        return Err(invalid(format!(
            "submounts: more than {}",
            isola_protocol::MAX_SUBMOUNTS
        )));
    }
    let share = share.ok_or_else(|| precondition("submounts: the sandbox has no share"))?;
    let prefix = format!("containers/{id}/volumes/");
    for (i, rel) in submounts.iter().enumerate() {
        let field = format!("submounts[{i}]");
        if !rel.starts_with(&prefix) {
            return Err(invalid(format!("{field}: {rel:?} is not under {prefix}")));
        }
        let dir = spec::resolve_inside(share, rel, &field).map_err(invalid)?;
        // Opening the directory mounts it (stat, and so resolving, does
        // not automount a path's last component).
        std::fs::read_dir(&dir)
            .map_err(|e| invalid(format!("{field}: opening {}: {e}", dir.display())))?;
    }
    tracing::debug!(
        container = id,
        submounts = submounts.len(),
        "volume submounts looked up"
    );
    Ok(())
}

/// A spec error as an `INVALID_ARGUMENT` under the request field `field`
/// (`oci_spec_json: process.args: ...`); errors of request fields that
/// are not inside the JSON (`rootfs`) are named as they are.
fn spec_error(field: &str, e: SpecError) -> ttrpc::Error {
    if e.field == "rootfs" || e.field.starts_with("stdio") {
        invalid(e)
    } else if e.field.is_empty() {
        invalid(format!("{field}: {}", e.message))
    } else {
        invalid(format!("{field}: {e}"))
    }
}

/// Removes a file when dropped (a console socket, on every way out).
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.0);
    }
}

/// Logs, at info once per agent and at debug after, the security module
/// fields taken out of a spec or an exec (`spec::take_lsm`): the guest
/// kernel has no LSM to apply them.
fn log_lsm_taken(container: &str, taken: &[String]) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if taken.is_empty() {
        return;
    }
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::info!(
            container,
            taken = %taken.join(", "),
            "not applied: the guest kernel has no Linux security module (the VM is the boundary); \
             said once, later containers at debug level"
        );
    } else {
        tracing::debug!(container, taken = %taken.join(", "), "security module fields not applied");
    }
}

/// Refuses a fork while another thread exists (see the module comment).
pub fn check_single_threaded(step: &str) -> RpcResult<()> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(1);
    if threads > 1 {
        return Err(internal(format!(
            "{step}: the agent has {threads} threads; forking a container now could deadlock"
        )));
    }
    Ok(())
}

/// What a process's waiters watch.
#[derive(Debug, Clone, Default)]
pub struct ProcState {
    pub exit: Option<ExitInfo>,
    pub oom_killed: bool,
    /// Output copies (stdout, stderr, the pty) still running.
    pub outputs_open: u32,
}

/// A process the API started: a container's init or an exec.
#[derive(Debug)]
pub struct Proc {
    container_id: String,
    exec_id: String,
    pid: u32,
    cgroup: PathBuf,
    oom_at_start: u64,
    state: watch::Sender<ProcState>,
    stdin_close: Mutex<Option<oneshot::Sender<()>>>,
    /// The pty master, for TtyWinResize.
    tty: Option<OwnedFd>,
}

impl Proc {
    fn exited(&self) -> bool {
        self.state.borrow().exit.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

#[derive(Debug)]
struct ContainerEntry {
    id: String,
    bundle: PathBuf,
    cgroup: PathBuf,
    lc: Mutex<Container>,
    status: Mutex<Status>,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    seccomp: Option<Arc<Compiled>>,
    oom_watch: Option<WatchDescriptor>,
}

#[derive(Debug)]
struct Sandbox {
    id: String,
    share: Option<PathBuf>,
    stop_timeout: Duration,
    /// Debug sessions allowed (the node's `debug.console`).
    debug_console: bool,
}

/// The inotify instance watching the containers' `memory.events`.
#[derive(Debug)]
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// The state behind the service (shared with the reaper's hook).
#[derive(Debug)]
pub struct State {
    sandbox: Mutex<Option<Sandbox>>,
    containers: Mutex<HashMap<String, Arc<ContainerEntry>>>,
    /// Debug sessions by id (`debug`).
    debug: Mutex<HashMap<String, Arc<Proc>>>,
    router: Mutex<ExitRouter<Arc<Proc>>>,
    events: Events,
    streams: Arc<Registry<Stream>>,
    oom: OnceLock<Arc<AsyncFd<InotifyFd>>>,
    oom_watches: Mutex<HashMap<WatchDescriptor, (String, PathBuf, u64)>>,
    /// Fired once DestroySandbox answered: the agent powers off.
    pub power_off: Notify,
    /// Set by a DestroySandbox in progress or done.
    destroying: Mutex<bool>,
    /// Whether containers are built with pivot_root (the agent left the
    /// initramfs at boot) rather than libcontainer's no_pivot.
    pivot_root: bool,
    /// Whether the sandbox netns exists (made by SetupNetwork or
    /// CreateSandbox, whichever came first).
    netns_made: Mutex<bool>,
    /// Whether the sandbox cgroup exists with its controllers enabled
    /// (made in a template's boot or by CreateSandbox).
    cgroup_made: Mutex<bool>,
    /// Set once SetupNetwork has begun.
    network_set: Mutex<bool>,
    /// The ephemeral volumes mounted (key → size), kept until the VM goes.
    ephemeral: Mutex<HashMap<String, Option<u64>>>,
    /// Whether the sandbox container's namespaces are kept in
    /// `sandbox::POD_NAMESPACES` for the containers that share them.
    pinned: Mutex<bool>,
}

impl State {
    pub fn new(streams: Arc<Registry<Stream>>, pivot_root: bool) -> Arc<State> {
        Arc::new(State {
            sandbox: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            debug: Mutex::new(HashMap::new()),
            router: Mutex::new(ExitRouter::default()),
            events: Events::default(),
            streams,
            oom: OnceLock::new(),
            oom_watches: Mutex::new(HashMap::new()),
            power_off: Notify::new(),
            destroying: Mutex::new(false),
            pivot_root,
            netns_made: Mutex::new(false),
            cgroup_made: Mutex::new(false),
            network_set: Mutex::new(false),
            ephemeral: Mutex::new(HashMap::new()),
            pinned: Mutex::new(false),
        })
    }

    /// Creates the sandbox network namespace unless it exists; whether it
    /// made it now.
    fn ensure_netns(&self) -> anyhow::Result<bool> {
        let mut made = lock(&self.netns_made);
        if *made {
            return Ok(false);
        }
        fs::create_dir_all(sandbox::SANDBOX_DIR)?;
        sandbox::create_netns(Path::new(sandbox::NETNS))?;
        *made = true;
        Ok(true)
    }

    /// Creates the sandbox cgroup and enables its controllers unless that
    /// was done already.
    fn ensure_cgroup(&self) -> anyhow::Result<()> {
        let mut made = lock(&self.cgroup_made);
        if !*made {
            sandbox::create_cgroup(Path::new(sandbox::CGROUP_ROOT), sandbox::CGROUP_PARENT)?;
            *made = true;
        }
        Ok(())
    }

    /// Mounts the tmpfs of each ephemeral volume not mounted yet, at
    /// `EPHEMERAL_DIR/<key>`; a key seen before is reused as it is (the
    /// first container's size holds). They are never unmounted: they go
    /// with the VM.
    fn ensure_ephemeral(&self, id: &str, volumes: &[spec::Ephemeral]) -> RpcResult<()> {
        let mut mounted = lock(&self.ephemeral);
        for volume in volumes {
            if let Some(size) = mounted.get(&volume.key) {
                if *size != volume.size {
                    tracing::warn!(key = %volume.key, ?size, asked = ?volume.size,
                        "ephemeral volume mounted already with another size; reused");
                }
                continue;
            }
            if mounted.len() >= MAX_EPHEMERAL {
                return Err(precondition(format!(
                    "container {id}: {MAX_EPHEMERAL} ephemeral volumes already"
                )));
            }
            let dir = Path::new(sandbox::EPHEMERAL_DIR).join(&volume.key);
            sandbox::mount_ephemeral(&dir, volume.size).map_err(|e| {
                internal(format!(
                    "container {id}: ephemeral volume {}: {e:#}",
                    volume.key
                ))
            })?;
            tracing::info!(key = %volume.key, size = ?volume.size, "ephemeral volume mounted");
            mounted.insert(volume.key.clone(), volume.size);
        }
        Ok(())
    }

    /// Makes, in a template VM's boot (`agent.template=1`), what every
    /// sandbox of this guest needs and no request shapes: the network
    /// namespace and the sandbox cgroup. Done before the API listens, so
    /// the template is saved with them and its clones skip that work in
    /// CreateSandbox (measured in the emulated KVM host: 0.2-0.3 s of a
    /// clone's CreateSandbox was the namespace, whose kernel work a clone
    /// pays in copied and faulted pages). A cold boot leaves it to
    /// CreateSandbox, after it is ready. A failure is logged and
    /// CreateSandbox tries again, naming it.
    pub fn prepare_sandbox(&self) {
        let started = std::time::Instant::now();
        if let Err(e) = self.ensure_netns() {
            tracing::warn!("the network namespace, left to CreateSandbox: {e:#}");
        }
        if let Err(e) = self.ensure_cgroup() {
            tracing::warn!("the sandbox cgroup, left to CreateSandbox: {e:#}");
        }
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "sandbox namespace and cgroup prepared"
        );
    }

    fn remove_netns(&self) {
        let mut made = lock(&self.netns_made);
        if *made {
            let _ = sandbox::unmount(Path::new(sandbox::NETNS));
            *made = false;
        }
    }

    /// A status the reaper took: the process it ends, if it is one of ours.
    pub fn on_reaped(&self, status: WaitStatus) {
        let Some(info) = ExitInfo::from_wait(status, now_ns()) else {
            return;
        };
        let target = lock(&self.router).on_exit(info);
        match target {
            Some(proc) => self.finish(&proc, info),
            None => tracing::debug!(pid = info.pid, status = info.status, "reaped an orphan"),
        }
    }

    /// Records a process's exit and tells its waiters and the event ring.
    fn finish(&self, proc: &Proc, info: ExitInfo) {
        let oom = cgstats::oom_kills(&proc.cgroup) > proc.oom_at_start;
        proc.state.send_modify(|s| {
            s.exit = Some(info);
            s.oom_killed = oom;
        });
        tracing::info!(
            container = %proc.container_id,
            exec = %proc.exec_id,
            pid = info.pid,
            exit_status = info.status,
            oom_killed = oom,
            "process exited"
        );
        if proc.container_id.is_empty() {
            // A debug session: no container's, no event.
            debug::ended(proc, &info);
            return;
        }
        self.events.push(Event::Exited {
            container_id: proc.container_id.clone(),
            exec_id: proc.exec_id.clone(),
            pid: info.pid,
            exit_status: info.status,
            exited_at_ns: info.exited_at_ns,
        });
        if proc.exec_id.is_empty() {
            if let Some(c) = lock(&self.containers).get(&proc.container_id) {
                *lock(&c.status) = Status::Stopped;
            }
        }
    }

    /// Registers a started process; finishes it at once if it already
    /// exited.
    fn register(&self, proc: Arc<Proc>, mark: u64) {
        let early = lock(&self.router).register(proc.pid, proc.clone(), mark);
        if let Err((proc, info)) = early {
            self.finish(&proc, info);
        }
    }

    fn container(&self, id: &str) -> RpcResult<Arc<ContainerEntry>> {
        check_id("container_id", id)?;
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(format!("container {id:?} not found")))
    }

    /// A container's process (`exec_id` empty: its init), or with an
    /// empty `container_id` a debug session; and what it belongs to, in
    /// words ("container ID", "the debug sessions").
    fn process(&self, container_id: &str, exec_id: &str) -> RpcResult<(String, Arc<Proc>)> {
        if container_id.is_empty() {
            check_id("exec_id", exec_id)?;
            let proc = lock(&self.debug)
                .get(exec_id)
                .cloned()
                .ok_or_else(|| not_found(format!("debug session {exec_id:?} not found")))?;
            return Ok(("the debug sessions".to_string(), proc));
        }
        let c = self.container(container_id)?;
        let owner = format!("container {}", c.id);
        if exec_id.is_empty() {
            return Ok((owner, c.init.clone()));
        }
        check_id("exec_id", exec_id)?;
        let proc = lock(&c.execs).get(exec_id).cloned().ok_or_else(|| {
            not_found(format!(
                "exec {exec_id:?} not found in container {container_id:?}"
            ))
        })?;
        Ok((owner, proc))
    }

    fn start_oom_watcher(self: &Arc<Self>) -> anyhow::Result<Arc<AsyncFd<InotifyFd>>> {
        if let Some(w) = self.oom.get() {
            return Ok(w.clone());
        }
        let inotify = InotifyFd(Inotify::init(
            InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC,
        )?);
        // SAFETY: the Inotify owns its descriptor until the AsyncFd drops
        // it, and always answers the same one.
        let fd = Arc::new(unsafe { AsyncFd::register(inotify) }?);
        let _ = self.oom.set(fd.clone());
        let state = Arc::downgrade(self);
        let task_fd = fd.clone();
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = task_fd.readable().await else {
                    return;
                };
                let events =
                    match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(Into::into)) {
                        Ok(Ok(events)) => events,
                        Ok(Err(err)) => {
                            tracing::warn!(%err, "reading the OOM watch");
                            continue;
                        }
                        Err(_would_block) => continue,
                    };
                let Some(state) = state.upgrade() else { return };
                for event in events {
                    state.check_oom(event.wd);
                }
            }
        });
        Ok(fd)
    }

    fn check_oom(&self, wd: WatchDescriptor) {
        let mut watches = lock(&self.oom_watches);
        let Some((id, cgroup, last)) = watches.get_mut(&wd) else {
            return;
        };
        let now = cgstats::oom_kills(cgroup);
        if now > *last {
            *last = now;
            tracing::warn!(container = %id, oom_kills = now, "OOM kill in the container");
            let id = id.clone();
            drop(watches);
            self.events.push(Event::Oom { container_id: id });
        }
    }
}

/// The service (cheap to clone: an `Arc`).
#[derive(Debug, Clone)]
pub struct AgentService {
    pub state: Arc<State>,
}

/// The three stdio descriptors a container process gets, and the agent's
/// ends to copy.
struct StdioPlan {
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    copies: Copies,
}

#[derive(Default)]
struct Copies {
    stdin: Option<(Stream, OwnedFd)>,
    stdout: Option<(OwnedFd, Stream)>,
    stderr: Option<(OwnedFd, Stream)>,
    /// Terminal: (stdin stream, stdout stream) to connect to the master.
    tty: Option<(Option<Stream>, Option<Stream>)>,
}

fn dev_null() -> RpcResult<OwnedFd> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| internal(format!("opening /dev/null: {e}")))
}

impl AgentService {
    pub fn new(state: Arc<State>) -> AgentService {
        AgentService { state }
    }

    /// Checks and claims the streams of a `Stdio` (all or none).
    fn claim_stdio(&self, stdio: &Stdio) -> RpcResult<StdioPlan> {
        if stdio.terminal && stdio.stderr != 0 {
            return Err(invalid("stdio.stderr: must be 0 with a terminal"));
        }
        for (field, id) in [
            ("stdio.stdin", stdio.stdin),
            ("stdio.stdout", stdio.stdout),
            ("stdio.stderr", stdio.stderr),
        ] {
            if id != 0 && !self.state.streams.contains(id) {
                return Err(invalid(format!(
                    "{field}: stream {id} is not open (or was claimed already)"
                )));
            }
        }
        if stdio.stdin != 0 && (stdio.stdin == stdio.stdout || stdio.stdin == stdio.stderr)
            || stdio.stdout != 0 && stdio.stdout == stdio.stderr
        {
            return Err(invalid(
                "stdio: a stream serves one direction of one process",
            ));
        }
        let claim = |id: u64| (id != 0).then(|| self.state.streams.claim(id)).flatten();
        let mut copies = Copies::default();
        if stdio.terminal {
            copies.tty = Some((claim(stdio.stdin), claim(stdio.stdout)));
            return Ok(StdioPlan {
                stdin: dev_null()?,
                stdout: dev_null()?,
                stderr: dev_null()?,
                copies,
            });
        }
        let pipe = || streams::pipe().map_err(|e| internal(format!("creating a pipe: {e}")));
        let stdin = match claim(stdio.stdin) {
            Some(stream) => {
                let (r, w) = pipe()?;
                copies.stdin = Some((stream, w));
                r
            }
            None => dev_null()?,
        };
        let out = |id: u64| -> RpcResult<(OwnedFd, Option<(OwnedFd, Stream)>)> {
            match claim(id) {
                Some(stream) => {
                    let (r, w) = pipe()?;
                    Ok((w, Some((r, stream))))
                }
                None => Ok((dev_null()?, None)),
            }
        };
        let (stdout, stdout_copy) = out(stdio.stdout)?;
        let (stderr, stderr_copy) = out(stdio.stderr)?;
        copies.stdout = stdout_copy;
        copies.stderr = stderr_copy;
        Ok(StdioPlan {
            stdin,
            stdout,
            stderr,
            copies,
        })
    }

    /// Starts the copies of a created process and returns its handle.
    #[allow(clippy::too_many_arguments)]
    fn start_process(
        &self,
        container_id: &str,
        exec_id: &str,
        pid: u32,
        cgroup: &Path,
        copies: Copies,
        stdio: &Stdio,
        console: Option<&std::os::unix::net::UnixListener>,
        master: Option<OwnedFd>,
    ) -> RpcResult<Arc<Proc>> {
        let what = if exec_id.is_empty() {
            format!("container {container_id}")
        } else {
            format!("exec {exec_id} of container {container_id}")
        };
        let mut outputs: Vec<(FdIo, Option<Stream>)> = Vec::new();
        let mut stdin_copy: Option<(Stream, FdIo)> = None;
        let mut tty = None;
        // A pty this agent made itself (a debug session's): its stdin
        // stream is the host's terminal, whose end is a hangup.
        let hangup = copies.tty.is_some() && master.is_some();
        if let Some((stdin, stdout)) = copies.tty {
            let master = match master {
                Some(master) => master,
                None => {
                    let console =
                        console.ok_or_else(|| internal(format!("{what}: no console socket")))?;
                    receive_pty_master(console)
                        .map_err(|e| internal(format!("{what}: receiving the pty master: {e}")))?
                }
            };
            set_winsize(&master, stdio.rows, stdio.cols)
                .map_err(|e| internal(format!("{what}: setting the window size: {e}")))?;
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .and_then(FdIo::new)
                    .map_err(|e| internal(format!("{what}: the pty master: {e}")))
            };
            if let Some(s) = stdin {
                stdin_copy = Some((s, dup(&master)?));
            }
            // Always drained, so the process never blocks on a full pty.
            outputs.push((dup(&master)?, stdout));
            tty = Some(master);
        } else {
            if let Some((s, w)) = copies.stdin {
                let w = FdIo::new(w).map_err(|e| internal(format!("{what}: stdin pipe: {e}")))?;
                stdin_copy = Some((s, w));
            }
            for (r, s) in [copies.stdout, copies.stderr].into_iter().flatten() {
                let r = FdIo::new(r).map_err(|e| internal(format!("{what}: output pipe: {e}")))?;
                outputs.push((r, Some(s)));
            }
        }
        let (state, _) = watch::channel(ProcState {
            outputs_open: outputs.len() as u32,
            ..ProcState::default()
        });
        let (close_tx, close_rx) = oneshot::channel();
        let proc = Arc::new(Proc {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            pid,
            cgroup: cgroup.to_path_buf(),
            oom_at_start: cgstats::oom_kills(cgroup),
            state,
            stdin_close: Mutex::new(stdin_copy.is_some().then_some(close_tx)),
            tty,
        });
        if let Some((stream, pipe)) = stdin_copy {
            let what = what.clone();
            let weak = Arc::downgrade(&proc);
            tokio::spawn(async move {
                match streams::copy_in(stream, pipe, close_rx).await {
                    Ok(n) => tracing::debug!(%what, bytes = n, "stdin closed"),
                    Err(err) => tracing::debug!(%what, %err, "stdin copy ended"),
                }
                if hangup {
                    if let Some(proc) = weak.upgrade().filter(|p| !p.exited()) {
                        hang_up(&what, &proc);
                    }
                }
            });
        }
        for (from, to) in outputs {
            let proc = Arc::downgrade(&proc);
            let what = what.clone();
            tokio::spawn(async move {
                let result = match to {
                    Some(stream) => streams::copy_out(from, stream).await,
                    None => streams::copy_out(from, tokio::io::sink()).await,
                };
                match result {
                    Ok(n) => tracing::debug!(%what, bytes = n, "output stream done"),
                    Err(err) => tracing::warn!(%what, %err, "output copy failed"),
                }
                if let Some(proc) = proc.upgrade() {
                    proc.state
                        .send_modify(|s| s.outputs_open = s.outputs_open.saturating_sub(1));
                }
            });
        }
        Ok(proc)
    }

    fn sandbox_id(&self) -> Option<String> {
        lock(&self.state.sandbox).as_ref().map(|s| s.id.clone())
    }

    fn sandbox_share(&self) -> RpcResult<Option<PathBuf>> {
        match &*lock(&self.state.sandbox) {
            Some(s) => Ok(s.share.clone()),
            None => Err(precondition("no sandbox: CreateSandbox first")),
        }
    }

    fn create_container_sync(&self, req: &CreateContainerRequest) -> RpcResult<u32> {
        let began = std::time::Instant::now();
        let id = req.container_id.as_str();
        check_id("container_id", id)?;
        let share = self.sandbox_share()?;
        if *lock(&self.state.destroying) {
            return Err(precondition("the sandbox is being destroyed"));
        }
        {
            let containers = lock(&self.state.containers);
            if containers.contains_key(id) {
                return Err(status::error(
                    Code::ALREADY_EXISTS,
                    format!("container {id:?} already exists"),
                ));
            }
            if containers.len() >= MAX_CONTAINERS {
                return Err(precondition(format!("{MAX_CONTAINERS} containers already")));
            }
        }
        let parsed =
            spec::parse_json(&req.oci_spec_json).map_err(|e| spec_error("oci_spec_json", e))?;
        look_up_submounts(id, share.as_deref(), &req.submounts)?;
        let pins =
            sandbox::shared_namespaces(&req.sandbox_namespaces, Path::new(sandbox::POD_NAMESPACES))
                .map_err(invalid)?;
        if !pins.is_empty() && !*lock(&self.state.pinned) {
            return Err(precondition(format!(
                "container {id}: it shares the sandbox's namespaces, but the sandbox's own \
                 container ({}) does not exist: create it first",
                self.sandbox_id().unwrap_or_default()
            )));
        }
        let joined: Vec<_> = pins.iter().map(|(t, p)| (*t, p.as_path())).collect();
        let owned = [Path::new(sandbox::SANDBOX_DIR)];
        let stdio = req.stdio.clone().unwrap_or_default();
        let ctx = spec::Context {
            container_id: id,
            share: share.as_deref(),
            rootfs: &req.rootfs,
            netns: Path::new(sandbox::NETNS),
            cgroup_parent: sandbox::CGROUP_PARENT,
            owned_dirs: &owned,
            ephemeral_dir: Path::new(sandbox::EPHEMERAL_DIR),
            terminal: stdio.terminal,
            joined: &joined,
        };
        let prepared = spec::prepare(parsed, &ctx).map_err(|e| spec_error("oci_spec_json", e))?;
        log_lsm_taken(id, &prepared.lsm_taken);
        self.state.ensure_ephemeral(id, &prepared.ephemeral)?;
        let bundle = Path::new(sandbox::BUNDLES).join(id);
        let console = sandbox::console_socket(sandbox::CONSOLES);
        let plan = self.claim_stdio(&stdio)?;

        // From here on, failures are the guest's: undo the bundle.
        let _console_file = RemoveOnDrop(&console);
        let prepared_ms = began.elapsed().as_millis() as u64;
        let result = self.build_container(id, &bundle, &console, prepared, plan, &stdio);
        match result {
            Ok((pid, libcontainer)) => {
                // Where the time went: the spec checked and rewritten, then
                // libcontainer's create (its init forked into the
                // namespaces, the rootfs and mounts, the cgroup), then the
                // rest.
                tracing::info!(
                    container = id,
                    pid,
                    prepared_ms,
                    libcontainer_ms = libcontainer.as_millis() as u64,
                    ms = began.elapsed().as_millis() as u64,
                    "container created"
                );
                Ok(pid)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&bundle);
                let _ = fs::remove_dir_all(Path::new(sandbox::STATE).join(id));
                Err(e)
            }
        }
    }

    fn build_container(
        &self,
        id: &str,
        bundle: &Path,
        console: &Path,
        prepared: spec::Prepared,
        plan: StdioPlan,
        stdio: &Stdio,
    ) -> RpcResult<(u32, std::time::Duration)> {
        let step = |what: &str, e: &dyn std::fmt::Display| {
            internal(format!("container {id}: {what}: {e}"))
        };
        fs::create_dir_all(bundle).map_err(|e| step("creating the bundle", &e))?;
        let config = serde_json::to_vec_pretty(&prepared.spec)
            .map_err(|e| step("serialising config.json", &e))?;
        fs::write(bundle.join("config.json"), config)
            .map_err(|e| step("writing config.json", &e))?;
        let listener = if stdio.terminal {
            let l = std::os::unix::net::UnixListener::bind(console)
                .map_err(|e| step("creating the console socket", &e))?;
            l.set_nonblocking(true)
                .map_err(|e| step("creating the console socket", &e))?;
            Some(l)
        } else {
            None
        };
        let propagation = crate::propagation::plan(&prepared.spec);
        let seccomp = prepared.seccomp.map(Arc::new);
        let executor = IsolaExecutor {
            seccomp: seccomp.clone(),
            close_inherited: true,
        };
        check_single_threaded(&format!("container {id}"))?;
        let mark = lock(&self.state.router).mark();
        let building = std::time::Instant::now();
        let mut builder = ContainerBuilder::new(id.to_string(), SyscallType::Linux)
            .with_root_path(sandbox::STATE)
            .map_err(|e| step("state directory", &e))?
            .with_executor(executor);
        if stdio.terminal {
            builder = builder.with_console_socket(Some(console));
        } else {
            builder = builder
                .with_stdin(plan.stdin)
                .with_stdout(plan.stdout)
                .with_stderr(plan.stderr);
        }
        let container = builder
            .as_init(bundle)
            // pivot_root(2), so the guest's tree is unmounted from the
            // container's mount namespace. Only if the agent could not
            // leave the initramfs at boot (pivot_root cannot, EINVAL):
            // libcontainer moves the rootfs onto / and chroots there
            // instead (runc's --no-pivot).
            .with_no_pivot(!self.state.pivot_root)
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(|e| step("creating with libcontainer", &format!("{e:#}")))?;
        let libcontainer = building.elapsed();
        let pid = container
            .pid()
            .ok_or_else(|| step("creating", &"libcontainer gave no pid"))?
            .as_raw() as u32;
        let cgroup = Path::new(sandbox::CGROUP_ROOT)
            .join(sandbox::CGROUP_PARENT.trim_start_matches('/'))
            .join(id);
        let kill = || {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        };
        // The mounts' propagation options, which libcontainer leaves out,
        // before anything runs in the container.
        if let Err(e) = crate::propagation::apply(pid, &propagation) {
            kill();
            return Err(step("setting its mounts' propagation", &format!("{e:#}")));
        }
        // The sandbox's own container (a pod's pause): its IPC, UTS and
        // PID namespaces are the pod's, kept for the containers that
        // share them (CreateContainerRequest.sandbox_namespaces).
        let pins = self.sandbox_id().as_deref() == Some(id);
        if pins {
            if let Err(e) = sandbox::pin_namespaces(pid, Path::new(sandbox::POD_NAMESPACES)) {
                kill();
                return Err(step(
                    "keeping its namespaces for the pod",
                    &format!("{e:#}"),
                ));
            }
            *lock(&self.state.pinned) = true;
        }
        let copies = plan.copies;
        let init = match self.start_process(
            id,
            "",
            pid,
            &cgroup,
            copies,
            stdio,
            listener.as_ref(),
            None,
        ) {
            Ok(p) => p,
            Err(e) => {
                kill();
                if pins {
                    self.unpin();
                }
                return Err(e);
            }
        };
        drop(listener);
        let oom_watch = self.watch_oom(id, &cgroup);
        let entry = Arc::new(ContainerEntry {
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            cgroup,
            lc: Mutex::new(container),
            status: Mutex::new(Status::Created),
            init: init.clone(),
            execs: Mutex::new(HashMap::new()),
            seccomp,
            oom_watch,
        });
        lock(&self.state.containers).insert(id.to_string(), entry);
        self.state.register(init, mark);
        Ok((pid, libcontainer))
    }

    fn watch_oom(&self, id: &str, cgroup: &Path) -> Option<WatchDescriptor> {
        let watcher = match self.state.start_oom_watcher() {
            Ok(w) => w,
            Err(err) => {
                tracing::warn!(%err, "no OOM watch");
                return None;
            }
        };
        let events = cgroup.join("memory.events");
        match watcher
            .get_ref()
            .0
            .add_watch(&events, AddWatchFlags::IN_MODIFY)
        {
            Ok(wd) => {
                lock(&self.state.oom_watches).insert(
                    wd,
                    (
                        id.to_string(),
                        cgroup.to_path_buf(),
                        cgstats::oom_kills(cgroup),
                    ),
                );
                Some(wd)
            }
            Err(err) => {
                tracing::warn!(container = id, %err, "cannot watch {}", events.display());
                None
            }
        }
    }

    fn exec_sync(&self, req: &ExecProcessRequest) -> RpcResult<u32> {
        let c = self.state.container(&req.container_id)?;
        check_id("exec_id", &req.exec_id)?;
        let id = c.id.as_str();
        if *lock(&c.status) != Status::Running || c.init.exited() {
            return Err(precondition(format!("container {id} is not running")));
        }
        {
            let execs = lock(&c.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(status::error(
                    Code::ALREADY_EXISTS,
                    format!("exec {:?} already exists in container {id}", req.exec_id),
                ));
            }
            if execs.len() >= MAX_EXECS {
                return Err(precondition(format!(
                    "container {id} has {MAX_EXECS} exec processes already"
                )));
            }
        }
        let mut process: oci_spec::runtime::Process =
            spec::parse_json(&req.process_json).map_err(|e| spec_error("process_json", e))?;
        spec::check_process(&process, "").map_err(|e| spec_error("process_json", e))?;
        log_lsm_taken(id, &spec::take_process_lsm(&mut process, "exec process."));
        let stdio = req.stdio.clone().unwrap_or_default();
        process.set_terminal(Some(stdio.terminal));
        let what = format!("exec {} of container {id}", req.exec_id);
        let step = |s: &str, e: &dyn std::fmt::Display| internal(format!("{what}: {s}: {e}"));
        let process_file = c.bundle.join(format!("exec-{}.json", req.exec_id));
        let console = sandbox::console_socket(sandbox::CONSOLES);
        let plan = self.claim_stdio(&stdio)?;
        let json = serde_json::to_vec(&process).map_err(|e| step("serialising the process", &e))?;
        fs::write(&process_file, json).map_err(|e| step("writing the process", &e))?;
        // Removed on every way out, once the pty has been handed over.
        let _console_file = RemoveOnDrop(&console);
        let listener = if stdio.terminal {
            let _ = fs::remove_file(&console);
            let l = std::os::unix::net::UnixListener::bind(&console)
                .map_err(|e| step("creating the console socket", &e))?;
            l.set_nonblocking(true)
                .map_err(|e| step("creating the console socket", &e))?;
            Some(l)
        } else {
            None
        };
        check_single_threaded(&what)?;
        let mark = lock(&self.state.router).mark();
        let mut builder = ContainerBuilder::new(id.to_string(), SyscallType::Linux)
            .with_root_path(sandbox::STATE)
            .map_err(|e| step("state directory", &e))?
            .with_executor(IsolaExecutor {
                seccomp: c.seccomp.clone(),
                close_inherited: false,
            });
        if stdio.terminal {
            builder = builder.with_console_socket(Some(&console));
        } else {
            builder = builder
                .with_stdin(plan.stdin)
                .with_stdout(plan.stdout)
                .with_stderr(plan.stderr);
        }
        let built = builder
            .as_tenant()
            .with_detach(true)
            .with_process(Some(&process_file))
            .build();
        let _ = fs::remove_file(&process_file);
        let pid = built
            .map_err(|e| step("starting with libcontainer", &format!("{e:#}")))?
            .as_raw() as u32;
        let proc = self.start_process(
            id,
            &req.exec_id,
            pid,
            &c.cgroup,
            plan.copies,
            &stdio,
            listener.as_ref(),
            None,
        );
        drop(listener);
        let proc = proc?;
        lock(&c.execs).insert(req.exec_id.clone(), proc.clone());
        self.state.register(proc, mark);
        tracing::info!(container = id, exec = %req.exec_id, pid, "exec started");
        Ok(pid)
    }

    /// Pauses (`freeze`) or resumes a container through libcontainer's
    /// cgroup freezer.
    fn freeze(&self, container_id: &str, freeze: bool) -> RpcResult<()> {
        let c = self.state.container(container_id)?;
        let (from, to, verb) = if freeze {
            (Status::Running, Status::Paused, "pausing")
        } else {
            (Status::Paused, Status::Running, "resuming")
        };
        let mut status = lock(&c.status);
        if *status != from {
            return Err(precondition(format!(
                "container {} is {:?}, not {from:?}",
                c.id, *status
            )));
        }
        let mut lc = lock(&c.lc);
        let done = if freeze { lc.pause() } else { lc.resume() };
        done.map_err(|e| internal(format!("container {}: {verb}: {e:#}", c.id)))?;
        *status = to;
        Ok(())
    }

    /// Waits (bounded) for every process of the container to be gone.
    async fn wait_container_dead(&self, c: &ContainerEntry, timeout: Duration) -> bool {
        let mut rx = c.init.state.subscribe();
        let init_done = tokio::time::timeout(timeout, rx.wait_for(|s| s.exit.is_some()))
            .await
            .is_ok_and(|r| r.is_ok());
        let until = tokio::time::Instant::now() + timeout;
        // Exec processes share the cgroup: it empties when all are gone.
        while cgroup_populated(&c.cgroup) && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        init_done && !cgroup_populated(&c.cgroup)
    }

    /// Removes a container whose processes are gone (or never started).
    fn delete_container(&self, c: &ContainerEntry) -> RpcResult<()> {
        let id = &c.id;
        check_single_threaded(&format!("removing container {id}"))?;
        lock(&c.lc)
            .delete(true)
            .map_err(|e| internal(format!("removing container {id}: deleting: {e:#}")))?;
        if c.cgroup.exists() {
            let _ = fs::remove_dir(&c.cgroup);
        }
        let _ = fs::remove_dir_all(&c.bundle);
        if let (Some(wd), Some(w)) = (c.oom_watch, self.state.oom.get()) {
            let _ = w.get_ref().0.rm_watch(wd);
            lock(&self.state.oom_watches).remove(&wd);
        }
        let mut router = lock(&self.state.router);
        router.unregister(c.init.pid);
        for p in lock(&c.execs).values() {
            if !p.exited() {
                router.unregister(p.pid);
            }
            if let Some(tx) = lock(&p.stdin_close).take() {
                let _ = tx.send(());
            }
        }
        drop(router);
        if let Some(tx) = lock(&c.init.stdin_close).take() {
            let _ = tx.send(());
        }
        lock(&self.state.containers).remove(id);
        if self.sandbox_id().as_deref() == Some(id.as_str()) {
            self.unpin();
        }
        tracing::info!(container = %id, "container removed");
        Ok(())
    }

    /// Lets go of the sandbox container's namespaces: containers created
    /// from now on cannot share them.
    fn unpin(&self) {
        let mut pinned = lock(&self.state.pinned);
        if *pinned {
            sandbox::unpin_namespaces(Path::new(sandbox::POD_NAMESPACES));
            *pinned = false;
        }
    }
}

fn cgroup_populated(cgroup: &Path) -> bool {
    fs::read_to_string(cgroup.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

fn cgroup_kill(cgroup: &Path) -> std::io::Result<()> {
    fs::write(cgroup.join("cgroup.kill"), "1")
}

/// Receives the pty master libcontainer's init sent on the console socket
/// (it connected and sent it during the build, so the connection waits in
/// the listener's backlog).
fn receive_pty_master(listener: &std::os::unix::net::UnixListener) -> anyhow::Result<OwnedFd> {
    use anyhow::Context as _;
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let (conn, _) = listener
        .accept()
        .context("accepting the console connection")?;
    conn.set_nonblocking(false).context("console connection")?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .context("console connection")?;
    let mut buf = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .context("recvmsg")?;
    for cmsg in msg.cmsgs().context("control messages")? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            let mut fds = fds.into_iter();
            if let Some(fd) = fds.next() {
                for extra in fds {
                    // SAFETY: a descriptor the kernel just installed for
                    // us; nobody else owns it.
                    drop(unsafe { OwnedFd::from_raw_fd(extra) });
                }
                // SAFETY: as above.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    anyhow::bail!("no descriptor in the console message")
}

fn set_winsize(master: &OwnedFd, rows: u32, cols: u32) -> std::io::Result<()> {
    if rows == 0 && cols == 0 {
        return Ok(());
    }
    let ws = libc::winsize {
        ws_row: rows.min(u16::MAX as u32) as u16,
        ws_col: cols.min(u16::MAX as u32) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn signal_number(signal: u32) -> RpcResult<i32> {
    // SIGRTMAX on Linux is 64.
    if signal == 0 || signal > 64 {
        return Err(invalid(format!(
            "signal: {signal} is not a signal (1 to 64)"
        )));
    }
    Ok(signal as i32)
}

/// The host's terminal of a debug session is gone: its pty hangs up as
/// a terminal's does (`TIOCVHANGUP` on the slave, opened from the master
/// with `TIOCGPTPEER`): SIGHUP and SIGCONT to the session's leader, the
/// foreground job's SIGHUP when that leader exits, and end of file for
/// every reader, a shell that ignores SIGHUP included.
fn hang_up(what: &str, proc: &Proc) {
    let Some(master) = &proc.tty else {
        return;
    };
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new
    // descriptor of the pty's slave, or -1.
    let fd = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        tracing::warn!(%what, %err, "the host's terminal is gone, and its pty could not be opened to hang up");
        return;
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: TIOCVHANGUP takes no argument.
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCVHANGUP) } < 0 {
        let err = std::io::Error::last_os_error();
        tracing::warn!(%what, %err, "the host's terminal is gone, and its pty did not hang up");
        return;
    }
    tracing::warn!(%what, pid = proc.pid, "the host's terminal is gone: hung up");
}

fn kill_raw(pid: u32, signal: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) with integers; pid > 0 names one process.
    if unsafe { libc::kill(pid as i32, signal) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn cgroup_pids(cgroup: &Path) -> Vec<u32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn cmdline(pid: u32) -> String {
    use std::io::Read;
    let mut bytes = Vec::new();
    if let Ok(f) = fs::File::open(format!("/proc/{pid}/cmdline")) {
        let _ = f.take(MAX_CMDLINE as u64).read_to_end(&mut bytes);
    }
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    String::from_utf8_lossy(&bytes).replace('\0', " ")
}

#[async_trait::async_trait]
impl isola_protocol::Agent for AgentService {
    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> RpcResult<CreateSandboxResponse> {
        check_id("sandbox_id", &req.sandbox_id)?;
        if let Some(s) = &*lock(&self.state.sandbox) {
            return Err(precondition(format!(
                "sandbox {:?} exists already (one sandbox per guest)",
                s.id
            )));
        }
        if !req.hostname.is_empty() {
            sandbox::check_hostname(&req.hostname).map_err(invalid)?;
        }
        identity::check_entropy(&req.entropy).map_err(invalid)?;
        let dns = req.dns.clone().unwrap_or_default();
        let resolv =
            sandbox::resolv_conf(&dns.nameservers, &dns.searches, &dns.options).map_err(invalid)?;
        let mount_point = sandbox::share_mount_point(&req.share_mount_point).map_err(invalid)?;
        let sid = req.sandbox_id.as_str();
        let step = |what: &str, e: &dyn std::fmt::Display| {
            internal(format!("sandbox {sid}: {what}: {e:#}"))
        };
        let started = std::time::Instant::now();
        let ms = |since: std::time::Instant| since.elapsed().as_millis() as u64;
        // First of all: this guest's own randomness and clock (a clone of
        // a template has the template's).
        identity::set_realtime(req.realtime_ns).map_err(|e| step("setting the clock", &e))?;
        identity::reseed(&req.entropy).map_err(|e| step("reseeding the RNG", &e))?;
        for dir in [
            sandbox::SANDBOX_DIR,
            sandbox::BUNDLES,
            sandbox::STATE,
            sandbox::CONSOLES,
        ] {
            fs::create_dir_all(dir).map_err(|e| step(&format!("creating {dir}"), &e))?;
        }
        if !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname)
                .map_err(|e| step("setting the hostname", &e))?;
        }
        fs::write(sandbox::RESOLV_CONF, resolv).map_err(|e| step("writing resolv.conf", &e))?;
        let setup_ms = ms(started);
        let at = std::time::Instant::now();
        let share = if req.share_tag.is_empty() {
            None
        } else {
            sandbox::mount_share(&req.share_tag, &mount_point)
                .map_err(|e| step("mounting the share", &e))?;
            Some(
                mount_point
                    .canonicalize()
                    .map_err(|e| step("resolving the share", &e))?,
            )
        };
        let undo_share = |share: &Option<PathBuf>| {
            if let Some(p) = share {
                let _ = sandbox::unmount(p);
            }
        };
        let share_ms = ms(at);
        let at = std::time::Instant::now();
        // SetupNetwork may have made it already.
        let made_netns = match self.state.ensure_netns() {
            Ok(made) => made,
            Err(e) => {
                undo_share(&share);
                return Err(step("creating the network namespace", &e));
            }
        };
        let netns_ms = ms(at);
        let at = std::time::Instant::now();
        if let Err(e) = self.state.ensure_cgroup() {
            undo_share(&share);
            if made_netns {
                self.state.remove_netns();
            }
            return Err(step("creating the sandbox cgroup", &e));
        }
        let cgroup_ms = ms(at);
        let stop_timeout = Duration::from_secs(match req.stop_timeout_secs {
            0 => 5,
            n => u64::from(n.min(3600)),
        });
        *lock(&self.state.sandbox) = Some(Sandbox {
            id: sid.to_string(),
            share,
            stop_timeout,
            debug_console: req.debug_console,
        });
        tracing::info!(sandbox = sid, share = %req.share_tag, debug_console = req.debug_console,
            setup_ms, share_ms, netns_ms, made_netns, cgroup_ms, ms = ms(started), "sandbox created");
        let mut resp = CreateSandboxResponse::new();
        resp.kernel_release = sandbox::kernel_release();
        Ok(resp)
    }

    async fn start_debug_session(
        &self,
        _ctx: &TtrpcContext,
        req: StartDebugSessionRequest,
    ) -> RpcResult<StartDebugSessionResponse> {
        let pid = self.start_debug_session_sync(&req)?;
        let mut resp = StartDebugSessionResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn setup_network(
        &self,
        _ctx: &TtrpcContext,
        req: SetupNetworkRequest,
    ) -> RpcResult<SetupNetworkResponse> {
        let plan = isola_protocol::network::check_request(&req)?;
        if *lock(&self.state.destroying) {
            return Err(precondition("the sandbox is being destroyed"));
        }
        {
            let mut set = lock(&self.state.network_set);
            if *set {
                return Err(precondition(
                    "SetupNetwork was called already (once per guest)",
                ));
            }
            *set = true;
        }
        self.state
            .ensure_netns()
            .map_err(|e| internal(format!("creating the network namespace: {e:#}")))?;
        network::setup(&plan, None, Path::new(sandbox::NETNS))?;
        tracing::info!(
            interfaces = ?plan.interfaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            routes = plan.routes.len(),
            neighbours = plan.neighbours.len(),
            "pod network set up"
        );
        Ok(SetupNetworkResponse::new())
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: DestroySandboxRequest,
    ) -> RpcResult<DestroySandboxResponse> {
        let (share, stop_timeout) = match &*lock(&self.state.sandbox) {
            Some(s) => (s.share.clone(), s.stop_timeout),
            None => return Err(precondition("no sandbox: CreateSandbox first")),
        };
        *lock(&self.state.destroying) = true;
        let containers: Vec<Arc<ContainerEntry>> =
            lock(&self.state.containers).values().cloned().collect();
        for c in &containers {
            for pid in cgroup_pids(&c.cgroup) {
                let _ = kill_raw(pid, libc::SIGTERM);
            }
        }
        for c in &containers {
            if !self.wait_container_dead(c, stop_timeout).await {
                tracing::warn!(container = %c.id, "still running after SIGTERM; SIGKILL");
                let _ = cgroup_kill(&c.cgroup);
                let _ = self.wait_container_dead(c, KILL_WAIT).await;
            }
        }
        let mut failures = Vec::new();
        for c in &containers {
            if let Err(e) = self.delete_container(c) {
                failures.push(status::message(&e));
            }
        }
        let began = std::time::Instant::now();
        nix::unistd::sync();
        let synced = began.elapsed();
        if let Some(p) = &share {
            if let Err(e) = sandbox::unmount(p) {
                failures.push(format!("{e:#}"));
            }
        }
        self.state.remove_netns();
        tracing::info!(
            sync_ms = synced.as_millis() as u64,
            unmount_ms = (began.elapsed() - synced).as_millis() as u64,
            "sandbox destroyed"
        );
        if !failures.is_empty() {
            tracing::error!(?failures, "destroying the sandbox");
        }
        // Power off once this answer is on its way: the notified task
        // yields first, so ttrpc writes the reply before the shutdown
        // closes the connections.
        let state = self.state.clone();
        tokio::spawn(async move {
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
            state.power_off.notify_one();
        });
        if failures.is_empty() {
            Ok(DestroySandboxResponse::new())
        } else {
            Err(internal(format!(
                "destroying the sandbox (powering off anyway): {}",
                failures.join("; ")
            )))
        }
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> RpcResult<CreateContainerResponse> {
        let pid = self.create_container_sync(&req)?;
        let mut resp = CreateContainerResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: StartContainerRequest,
    ) -> RpcResult<StartContainerResponse> {
        let c = self.state.container(&req.container_id)?;
        let mut status = lock(&c.status);
        if *status != Status::Created || c.init.exited() {
            return Err(precondition(format!(
                "container {} is {:?}, not created",
                c.id, *status
            )));
        }
        check_single_threaded(&format!("starting container {}", c.id))?;
        lock(&c.lc)
            .start()
            .map_err(|e| internal(format!("container {}: starting: {e:#}", c.id)))?;
        *status = Status::Running;
        tracing::info!(container = %c.id, "container started");
        Ok(StartContainerResponse::new())
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> RpcResult<ExecProcessResponse> {
        let pid = self.exec_sync(&req)?;
        let mut resp = ExecProcessResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> RpcResult<SignalProcessResponse> {
        let signal = signal_number(req.signal)?;
        if req.all {
            if !req.exec_id.is_empty() {
                return Err(invalid("exec_id: must be empty with all"));
            }
            let c = self.state.container(&req.container_id)?;
            for pid in cgroup_pids(&c.cgroup) {
                match kill_raw(pid, signal) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(e) => {
                        return Err(internal(format!(
                            "container {}: signalling pid {pid}: {e}",
                            c.id
                        )))
                    }
                }
            }
            return Ok(SignalProcessResponse::new());
        }
        let (owner, proc) = self.state.process(&req.container_id, &req.exec_id)?;
        // Not reaped yet, so the pid is still this process's (a zombie at
        // worst, where the signal does nothing).
        if proc.exited() {
            return Err(not_found(format!(
                "process {} of {owner} has exited",
                proc.pid
            )));
        }
        kill_raw(proc.pid, signal)
            .map_err(|e| internal(format!("{owner}: signalling pid {}: {e}", proc.pid)))?;
        Ok(SignalProcessResponse::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> RpcResult<WaitProcessResponse> {
        let (owner, proc) = self.state.process(&req.container_id, &req.exec_id)?;
        let mut rx = proc.state.subscribe();
        // Only its identity is kept: a process removed meanwhile ends the wait.
        let waited = Arc::downgrade(&proc);
        drop(proc);
        rx.wait_for(|s| s.exit.is_some())
            .await
            .map_err(|_| internal(format!("{owner}: the process went away")))?;
        if tokio::time::timeout(OUTPUT_GRACE, rx.wait_for(|s| s.outputs_open == 0))
            .await
            .is_err()
        {
            tracing::warn!(
                container = %req.container_id,
                exec = %req.exec_id,
                grace_ms = OUTPUT_GRACE.as_millis() as u64,
                "output still open after the exit (a child keeps it?); answering the wait"
            );
        }
        let s = rx.borrow().clone();
        let info = s
            .exit
            .ok_or_else(|| internal(format!("{owner}: no exit status")))?;
        if req.container_id.is_empty() {
            // A debug session is waited for once: its entry goes (if it is
            // still the process waited for, not a new one of the same id).
            let mut sessions = lock(&self.state.debug);
            if sessions
                .get(&req.exec_id)
                .is_some_and(|p| std::ptr::eq(Arc::as_ptr(p), waited.as_ptr()))
            {
                sessions.remove(&req.exec_id);
            }
        }
        let mut resp = WaitProcessResponse::new();
        resp.exit_status = info.status;
        resp.signal = info.signal;
        resp.exited_at_ns = info.exited_at_ns;
        resp.oom_killed = s.oom_killed;
        resp.pid = info.pid;
        Ok(resp)
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> RpcResult<RemoveContainerResponse> {
        let c = self.state.container(&req.container_id)?;
        let status = *lock(&c.status);
        let alive = !c.init.exited();
        if alive && status != Status::Created && !req.force {
            return Err(precondition(format!(
                "container {} is {status:?}: stop it first or force",
                c.id
            )));
        }
        if alive || cgroup_populated(&c.cgroup) {
            cgroup_kill(&c.cgroup)
                .map_err(|e| internal(format!("container {}: killing (cgroup.kill): {e}", c.id)))?;
            if !self.wait_container_dead(&c, KILL_WAIT).await {
                return Err(internal(format!(
                    "container {}: processes still alive {} s after SIGKILL",
                    c.id,
                    KILL_WAIT.as_secs()
                )));
            }
        }
        self.delete_container(&c)?;
        // What its processes wrote (a shared mapping's dirty pages above
        // all) goes to the host now: once the last container is removed,
        // the host may kill the VM without DestroySandbox.
        nix::unistd::sync();
        Ok(RemoveContainerResponse::new())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> RpcResult<StatsContainerResponse> {
        let c = self.state.container(&req.container_id)?;
        Ok(cgstats::collect(&c.cgroup))
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> RpcResult<PauseContainerResponse> {
        self.freeze(&req.container_id, true)?;
        Ok(PauseContainerResponse::new())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ResumeContainerRequest,
    ) -> RpcResult<ResumeContainerResponse> {
        self.freeze(&req.container_id, false)?;
        Ok(ResumeContainerResponse::new())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> RpcResult<UpdateContainerResponse> {
        let c = self.state.container(&req.container_id)?;
        let resources: oci_spec::runtime::LinuxResources =
            spec::parse_json(&req.resources_json).map_err(|e| spec_error("resources_json", e))?;
        let manager = libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
            cgroup_path: PathBuf::from(sandbox::CGROUP_PARENT).join(&c.id),
            systemd_cgroup: false,
            container_name: c.id.clone(),
        })
        .map_err(|e| internal(format!("container {}: cgroup manager: {e}", c.id)))?;
        use libcgroups::common::CgroupManager as _;
        manager
            .apply(&libcgroups::common::ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| internal(format!("container {}: writing cgroup limits: {e}", c.id)))?;
        Ok(UpdateContainerResponse::new())
    }

    async fn tty_win_resize(
        &self,
        _ctx: &TtrpcContext,
        req: TtyWinResizeRequest,
    ) -> RpcResult<TtyWinResizeResponse> {
        let (owner, proc) = self.state.process(&req.container_id, &req.exec_id)?;
        let master = proc.tty.as_ref().ok_or_else(|| {
            precondition(format!("process {} of {owner} has no terminal", proc.pid))
        })?;
        set_winsize(master, req.rows, req.cols)
            .map_err(|e| internal(format!("{owner}: TIOCSWINSZ: {e}")))?;
        Ok(TtyWinResizeResponse::new())
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: CloseStdinRequest,
    ) -> RpcResult<CloseStdinResponse> {
        let (_c, proc) = self.state.process(&req.container_id, &req.exec_id)?;
        if let Some(tx) = lock(&proc.stdin_close).take() {
            let _ = tx.send(());
        }
        Ok(CloseStdinResponse::new())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ListProcessesRequest,
    ) -> RpcResult<ListProcessesResponse> {
        let c = self.state.container(&req.container_id)?;
        let mut by_pid: HashMap<u32, String> = HashMap::new();
        for (exec_id, p) in lock(&c.execs).iter() {
            by_pid.insert(p.pid, exec_id.clone());
        }
        let mut resp = ListProcessesResponse::new();
        for pid in cgroup_pids(&c.cgroup).into_iter().take(MAX_LIST) {
            let mut info = ProcessInfo::new();
            info.pid = pid;
            info.exec_id = by_pid.get(&pid).cloned().unwrap_or_default();
            info.cmdline = cmdline(pid);
            resp.processes.push(info);
        }
        Ok(resp)
    }

    async fn wait_event(
        &self,
        _ctx: &TtrpcContext,
        req: WaitEventRequest,
    ) -> RpcResult<WaitEventResponse> {
        let got = self.state.events.wait(req.after).await;
        let mut resp = WaitEventResponse::new();
        resp.seq = got.seq;
        resp.missed = got.missed;
        match got.event {
            Event::Exited {
                container_id,
                exec_id,
                pid,
                exit_status,
                exited_at_ns,
            } => {
                let mut e = ProcessExited::new();
                e.container_id = container_id;
                e.exec_id = exec_id;
                e.pid = pid;
                e.exit_status = exit_status;
                e.exited_at_ns = exited_at_ns;
                resp.set_exited(e);
            }
            Event::Oom { container_id } => {
                let mut e = OomKilled::new();
                e.container_id = container_id;
                resp.set_oom(e);
            }
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use isola_protocol::ttrpc::asynchronous::Client;
    use isola_protocol::AgentClient;
    use nix::unistd::Pid;

    use super::*;
    use crate::rpc::ApiServer;

    fn ctx() -> isola_protocol::ttrpc::context::Context {
        isola_protocol::ttrpc::context::with_timeout(Duration::from_secs(5).as_nanos() as i64)
    }

    fn state() -> Arc<State> {
        State::new(Arc::new(Registry::new(4, streams::UNCLAIMED_TIMEOUT)), true)
    }

    fn expect(result: RpcResult<impl std::fmt::Debug>, code: Code, prefix: &str) {
        let err = result.expect_err(prefix);
        assert_eq!(status::code(&err), Some(code), "{}", status::message(&err));
        assert!(
            status::message(&err).starts_with(prefix),
            "{:?} does not start with {prefix:?}",
            status::message(&err)
        );
    }

    #[test]
    fn submounts_are_looked_up_inside_the_containers_volumes_only() {
        use isola_protocol::status::{code, message};
        let dir = tempfile::tempdir().expect("tempdir");
        let share = dir.path().canonicalize().expect("canonical");
        std::fs::create_dir_all(share.join("containers/c1/volumes/0/tmp")).expect("mkdir");
        let ok = |subs: &[&str]| {
            let subs: Vec<String> = subs.iter().map(|s| s.to_string()).collect();
            look_up_submounts("c1", Some(&share), &subs)
        };
        ok(&[]).expect("nothing to do");
        ok(&["containers/c1/volumes/0/tmp"]).expect("a volume's directory");
        for (bad, want) in [
            ("containers/c2/volumes/0/tmp", "submounts[0]: "),
            ("containers/c1/volumes/0/../../../c2", "submounts[0]: "),
            ("containers/c1/volumes/0/missing", "submounts[0]: "),
            ("/containers/c1/volumes/0/tmp", "submounts[0]: "),
        ] {
            let err = ok(&[bad]).expect_err(bad);
            assert_eq!(code(&err), Some(Code::INVALID_ARGUMENT), "{bad}");
            assert!(message(&err).starts_with(want), "{bad}: {}", message(&err));
        }
        let many = vec!["containers/c1/volumes/0/tmp"; isola_protocol::MAX_SUBMOUNTS + 1];
        let err = ok(&many).expect_err("too many");
        assert!(
            message(&err).starts_with("submounts: more than"),
            "{}",
            message(&err)
        );
        let err = look_up_submounts("c1", None, &["containers/c1/volumes/0/tmp".into()])
            .expect_err("no share");
        assert_eq!(code(&err), Some(Code::FAILED_PRECONDITION));
    }

    #[test]
    fn spec_errors_name_the_request_field() {
        let e = |field: &str| SpecError {
            field: field.into(),
            message: "bad".into(),
        };
        let msg = |err: ttrpc::Error| (status::code(&err), status::message(&err));
        assert_eq!(
            msg(spec_error("oci_spec_json", e("process.args"))),
            (
                Some(Code::INVALID_ARGUMENT),
                "oci_spec_json: process.args: bad".into()
            )
        );
        assert_eq!(
            msg(spec_error("oci_spec_json", e(""))).1,
            "oci_spec_json: bad"
        );
        assert_eq!(
            msg(spec_error("oci_spec_json", e("rootfs"))).1,
            "rootfs: bad"
        );
    }

    #[tokio::test]
    async fn errors_over_the_wire() {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix://{}", dir.path().join("agent.sock").display());
        let server = ApiServer::start(&address, Some(AgentService::new(state())))
            .await
            .unwrap();
        let agent = AgentClient::new(Client::connect(&address).await.unwrap());

        let mut create = CreateContainerRequest::new();
        create.container_id = "web".into();
        expect(
            agent.create_container(ctx(), &create).await,
            Code::FAILED_PRECONDITION,
            "no sandbox",
        );
        create.container_id = "../web".into();
        expect(
            agent.create_container(ctx(), &create).await,
            Code::INVALID_ARGUMENT,
            "container_id: ",
        );
        let mut wait = WaitProcessRequest::new();
        wait.container_id = "web".into();
        expect(
            agent.wait_process(ctx(), &wait).await,
            Code::NOT_FOUND,
            "container \"web\" not found",
        );
        let mut sig = SignalProcessRequest::new();
        sig.container_id = "web".into();
        expect(
            agent.signal_process(ctx(), &sig).await,
            Code::INVALID_ARGUMENT,
            "signal: 0",
        );
        sig.signal = 9;
        sig.all = true;
        sig.exec_id = "e1".into();
        expect(
            agent.signal_process(ctx(), &sig).await,
            Code::INVALID_ARGUMENT,
            "exec_id: must be empty with all",
        );
        let mut sb = CreateSandboxRequest::new();
        sb.sandbox_id = "sb".into();
        sb.hostname = "a b".into();
        expect(
            agent.create_sandbox(ctx(), &sb).await,
            Code::INVALID_ARGUMENT,
            "hostname: ",
        );
        sb.hostname = String::new();
        let mut dns = Dns::new();
        dns.nameservers = vec!["resolver".into()];
        sb.dns = Some(dns).into();
        expect(
            agent.create_sandbox(ctx(), &sb).await,
            Code::INVALID_ARGUMENT,
            "dns.nameservers[0]: ",
        );
        expect(
            agent
                .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
                .await,
            Code::FAILED_PRECONDITION,
            "no sandbox",
        );
        // SetupNetwork checks every field before it changes anything.
        let mut net = SetupNetworkRequest::new();
        net.interfaces.push(NetworkInterface {
            name: "eth0:1".into(),
            mac: "0a:58:0a:f4:01:05".into(),
            ..Default::default()
        });
        expect(
            agent.setup_network(ctx(), &net).await,
            Code::INVALID_ARGUMENT,
            "interfaces[0].name: ",
        );
        drop(agent);
        server.shutdown().await;
    }

    fn proc(pid: u32, exec_id: &str) -> Arc<Proc> {
        let (state, _) = watch::channel(ProcState::default());
        Arc::new(Proc {
            container_id: "web".into(),
            exec_id: exec_id.into(),
            pid,
            cgroup: PathBuf::from("/nonexistent"),
            oom_at_start: 0,
            state,
            stdin_close: Mutex::new(None),
            tty: None,
        })
    }

    #[test]
    fn reaped_statuses_reach_their_process_and_the_event_ring() {
        let state = state();
        let exec = proc(4242, "e1");
        let mark = lock(&state.router).mark();
        state.register(exec.clone(), mark);
        state.on_reaped(WaitStatus::Exited(Pid::from_raw(999), 0));
        assert!(state.events.get(0).is_none(), "an orphan is no event");
        state.on_reaped(WaitStatus::Signaled(
            Pid::from_raw(4242),
            nix::sys::signal::Signal::SIGTERM,
            false,
        ));
        let exit = exec.state.borrow().exit.expect("exited");
        assert_eq!((exit.status, exit.signal), (143, 15));
        let event = state.events.get(0).expect("event");
        assert_eq!(
            event.event,
            Event::Exited {
                container_id: "web".into(),
                exec_id: "e1".into(),
                pid: 4242,
                exit_status: 143,
                exited_at_ns: exit.exited_at_ns,
            }
        );

        // Reaped before it was registered: finished at registration.
        let mark = lock(&state.router).mark();
        state.on_reaped(WaitStatus::Exited(Pid::from_raw(5151), 7));
        let early = proc(5151, "e2");
        state.register(early.clone(), mark);
        assert_eq!(early.state.borrow().exit.map(|e| e.status), Some(7));
        assert_eq!(state.events.get(1).map(|e| e.seq), Some(2));
    }
}
