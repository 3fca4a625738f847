//! The shim v2 Task service: containerd's calls for the containers and
//! processes of one sandbox, mapped onto `isola_sandbox::Sandbox`, and the
//! task events published back to containerd.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::event::Event as ShimEvent;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};
use containerd_shim_protos::types::task::{ProcessInfo, Status};
use isola_sandbox::config::Config;
use isola_sandbox::{ContainerRequest, ErrorKind, Event, Sandbox, StdioRequest, WindowSize};
use oci_spec::runtime::{LinuxResources, Process, Spec};
use tokio::sync::watch;

use crate::grouping;
use crate::host_cgroup::{self, HostCgroup};
use crate::metrics;
use crate::netns;
use crate::options;
use crate::sizing::{self, VmSize};
use crate::stdio::{Attached, Names};

/// The exit status reported for processes of a sandbox that died.
pub const DEAD_SANDBOX_STATUS: u32 = 255;

type TtrpcResult<T> = ttrpc::Result<T>;

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn from_sandbox(err: isola_sandbox::Error) -> ttrpc::Error {
    let code = match err.kind() {
        ErrorKind::NotFound => Code::NOT_FOUND,
        ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
        ErrorKind::InvalidArgument => Code::INVALID_ARGUMENT,
        ErrorKind::FailedPrecondition => Code::FAILED_PRECONDITION,
        ErrorKind::DeadlineExceeded => Code::DEADLINE_EXCEEDED,
        ErrorKind::Unimplemented => Code::UNIMPLEMENTED,
        ErrorKind::Unavailable | ErrorKind::Dead => Code::UNAVAILABLE,
        ErrorKind::Internal | ErrorKind::Host => Code::INTERNAL,
    };
    status(code, err.to_string())
}

pub fn timestamp(ns: u64) -> Timestamp {
    Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
        ..Default::default()
    }
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exit {
    status: u32,
    at_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Running,
    Exited(Exit),
}

/// A container's init or one of its execs.
#[derive(Debug)]
struct Proc {
    exec_id: String,
    names: Names,
    terminal: bool,
    /// An exec's process, from its Exec request.
    process: Option<Process>,
    state: StdMutex<(State, u32)>,
    exit: watch::Sender<Option<Exit>>,
    io: tokio::sync::Mutex<Option<Attached>>,
    /// Set by Delete: a later exit is not reported.
    deleted: std::sync::atomic::AtomicBool,
}

impl Proc {
    fn new(exec_id: &str, names: Names, terminal: bool, process: Option<Process>) -> Proc {
        Proc {
            exec_id: exec_id.to_string(),
            names,
            terminal,
            process,
            state: StdMutex::new((State::Created, 0)),
            exit: watch::channel(None).0,
            io: tokio::sync::Mutex::new(None),
            deleted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn state(&self) -> (State, u32) {
        *lock(&self.state)
    }

    fn set(&self, state: State, pid: u32) {
        *lock(&self.state) = (state, pid);
    }

    /// Created → Running; false if it is not created (its exit came first).
    fn start_if_created(&self, pid: u32) -> bool {
        let mut state = lock(&self.state);
        if state.0 == State::Created {
            *state = (State::Running, pid);
            true
        } else {
            false
        }
    }

    fn stdio_request(&self) -> StdioRequest {
        StdioRequest {
            stdin: !self.names.stdin.is_empty(),
            stdout: !self.names.stdout.is_empty(),
            stderr: !self.terminal && !self.names.stderr.is_empty(),
            terminal: self.terminal.then_some(WindowSize { rows: 0, cols: 0 }),
        }
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    /// Where we mounted the snapshotter's mounts (unmounted on delete).
    mounted_rootfs: Option<PathBuf>,
    procs: HashMap<String, Arc<Proc>>,
    paused: bool,
}

/// The sandbox this shim runs, once its first container was created.
#[derive(Debug)]
struct Running {
    sandbox: Sandbox,
    size: VmSize,
    cgroup: Option<HostCgroup>,
}

/// The Task service of one shim (one sandbox).
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

struct Shared {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    /// The server's socket, unlinked once Shutdown decided to end the
    /// shim: the next `start` then spawns a new shim.
    socket: Option<Arc<crate::server::SocketFile>>,
    /// Set (under the `sandbox` lock) once Shutdown stops the sandbox.
    closing: std::sync::atomic::AtomicBool,
    /// Creates between the `sandbox` lock and their container's entry.
    creating: std::sync::atomic::AtomicUsize,
    sandbox: tokio::sync::Mutex<Option<Arc<Running>>>,
    containers: StdMutex<HashMap<String, Container>>,
}

impl Service {
    pub fn new(
        namespace: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
        socket: Option<Arc<crate::server::SocketFile>>,
    ) -> Service {
        Service {
            shared: Arc::new(Shared {
                namespace: namespace.to_string(),
                publisher,
                exit,
                socket,
                closing: std::sync::atomic::AtomicBool::new(false),
                creating: std::sync::atomic::AtomicUsize::new(0),
                sandbox: tokio::sync::Mutex::new(None),
                containers: StdMutex::new(HashMap::new()),
            }),
        }
    }

    async fn publish<E: ShimEvent + Send + 'static>(&self, event: E) {
        let topic = event.topic();
        if let Err(err) = self
            .shared
            .publisher
            .publish(
                ttrpc::context::Context::default(),
                &topic,
                &self.shared.namespace,
                Box::new(event),
            )
            .await
        {
            tracing::warn!(%topic, %err, "event not published");
        }
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Container>> {
        lock(&self.shared.containers)
    }

    fn proc(&self, id: &str, exec_id: &str) -> TtrpcResult<Arc<Proc>> {
        let containers = self.containers();
        let container = containers
            .get(id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))?;
        container.procs.get(exec_id).cloned().ok_or_else(|| {
            status(
                Code::NOT_FOUND,
                format!("process {exec_id} of container {id} not found"),
            )
        })
    }

    async fn running(&self) -> TtrpcResult<Arc<Running>> {
        self.shared.sandbox.lock().await.clone().ok_or_else(|| {
            status(
                Code::FAILED_PRECONDITION,
                "the sandbox has not been created",
            )
        })
    }

    /// Starts the sandbox's VM for its first container (`spec`), with the
    /// config the runtime options name (else `$ISOLA_CONFIG`, else
    /// /etc/isola/config.toml).
    async fn start_sandbox(
        &self,
        sandbox_id: &str,
        spec: &Spec,
        options: Option<&Any>,
        bundle: &str,
    ) -> TtrpcResult<Arc<Running>> {
        let explicit = options::config_path(options)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("sandbox {sandbox_id}: {e}")))?;
        let config = Config::load(explicit.as_deref().map(Path::new)).map_err(|e| {
            status(
                Code::FAILED_PRECONDITION,
                format!("sandbox {sandbox_id}: {e}"),
            )
        })?;
        let empty = HashMap::new();
        let annotations = spec.annotations().as_ref().unwrap_or(&empty);
        let config = config
            .with_annotations(annotations)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let network = netns::of(spec).map_err(|e| {
            status(
                Code::FAILED_PRECONDITION,
                format!("sandbox {sandbox_id}: {e}"),
            )
        })?;
        let h = &config.hypervisor;
        let size = sizing::for_sandbox(
            VmSize {
                vcpus: h.default_vcpus,
                memory_mib: h.default_memory_mib,
            },
            VmSize {
                vcpus: h.max_vcpus,
                memory_mib: h.max_memory_mib,
            },
            spec,
            &config.path.display().to_string(),
        )
        .map_err(|e| status(Code::INVALID_ARGUMENT, format!("sandbox {sandbox_id}: {e}")))?;
        let mut sandbox_config = config.sandbox_config(sandbox_id);
        // The delete action of a container with the same id in another
        // namespace (another bundle) then leaves this sandbox alone.
        sandbox_config.owner = bundle.to_string();
        sandbox_config.namespace = self.shared.namespace.clone();
        sandbox_config.vcpus = size.vcpus;
        sandbox_config.memory_mib = size.memory_mib;
        if let Some(hostname) = spec.hostname().as_ref().filter(|h| !h.is_empty()) {
            sandbox_config.hostname = hostname.clone();
        }
        if let netns::Network::Pod(path) = network {
            sandbox_config.netns = Some(path);
        }
        let cgroup = match spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
        {
            Some(path) => {
                let root = Path::new(host_cgroup::CGROUP_ROOT);
                let path = path.to_string_lossy();
                host_cgroup::resolve(root, &path).map_err(|e| {
                    status(Code::INVALID_ARGUMENT, format!("sandbox {sandbox_id}: {e}"))
                })?;
                host_cgroup::for_sandbox(
                    root,
                    &path,
                    config.runtime.host_cgroup_required,
                    sandbox_id,
                )
                .map_err(|e| {
                    status(
                        Code::FAILED_PRECONDITION,
                        format!("sandbox {sandbox_id}: {e}"),
                    )
                })?
            }
            None => None,
        };
        sandbox_config.cgroup = cgroup.as_ref().map(|c| c.dir().to_path_buf());
        tracing::info!(sandbox = %sandbox_id, vcpus = size.vcpus, memory_mib = size.memory_mib, cgroup = ?sandbox_config.cgroup, "starting the sandbox VM");
        let sandbox = match Sandbox::start(sandbox_config).await {
            Ok(sandbox) => sandbox,
            Err(err) => {
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                return Err(from_sandbox(err));
            }
        };
        tracing::info!(sandbox = %sandbox_id, kernel = %sandbox.kernel_release(), "sandbox VM ready");
        let running = Arc::new(Running {
            sandbox,
            size,
            cgroup,
        });
        self.watch_events(&running);
        Ok(running)
    }

    /// Publishes the agent's OOM events and logs the sandbox's death.
    fn watch_events(&self, running: &Arc<Running>) {
        let mut events = running.sandbox.events();
        let this = self.clone();
        let sid = running.sandbox.id().to_string();
        tokio::spawn(async move {
            // The guest decides how many OOM events come: their log lines
            // stay within a budget (the events themselves all go out).
            let mut oom_lines = isola_sandbox::log_gate::LogGate::new(
                tracing::Level::WARN,
                std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
            );
            let mut may_log = move || {
                oom_lines.admit(tracing::Level::WARN) == isola_sandbox::log_gate::Verdict::Pass
            };
            loop {
                match events.recv().await {
                    Ok(Event::Oom { container_id })
                        if !this.containers().contains_key(&container_id) =>
                    {
                        if may_log() {
                            tracing::warn!(sandbox = %sid, container = %container_id, "an OOM event for a container this sandbox does not have: ignored");
                        }
                    }
                    Ok(Event::Oom { container_id }) => {
                        if may_log() {
                            tracing::warn!(sandbox = %sid, container = %container_id, "OOM kill in the container");
                        }
                        this.publish(TaskOOM {
                            container_id,
                            ..Default::default()
                        })
                        .await;
                    }
                    Ok(Event::SandboxDead { reason }) => {
                        tracing::error!(sandbox = %sid, %reason, "the sandbox VM died; its processes are reported exited with status {DEAD_SANDBOX_STATUS}");
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(sandbox = %sid, missed = n, "sandbox events missed");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }

    /// Waits for a started process to exit, delivers its output, and
    /// reports the exit.
    fn watch_exit(&self, running: Arc<Running>, cid: String, proc: Arc<Proc>) {
        let this = self.clone();
        tokio::spawn(async move {
            let exec_id = proc.exec_id.clone();
            let exit = match running.sandbox.wait(&cid, &exec_id).await {
                Ok(s) => Exit {
                    status: s.status as u32,
                    at_ns: if s.exited_at_ns == 0 {
                        now_ns()
                    } else {
                        s.exited_at_ns
                    },
                },
                Err(err) => {
                    tracing::error!(sandbox = %running.sandbox.id(), container = %cid, exec_id = %exec_id, %err, "process lost");
                    Exit {
                        status: DEAD_SANDBOX_STATUS,
                        at_ns: now_ns(),
                    }
                }
            };
            if let Some(mut io) = proc.io.lock().await.take() {
                io.finish().await;
            }
            let (_, pid) = proc.state();
            proc.set(State::Exited(exit), pid);
            tracing::info!(sandbox = %running.sandbox.id(), container = %cid, exec_id = %exec_id, pid, status = exit.status, "process exited");
            if proc.deleted.load(std::sync::atomic::Ordering::SeqCst) {
                proc.exit.send_replace(Some(exit));
                return;
            }
            this.publish(TaskExit {
                container_id: cid.clone(),
                id: if exec_id.is_empty() {
                    cid.clone()
                } else {
                    exec_id.clone()
                },
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at_ns)),
                ..Default::default()
            })
            .await;
            proc.exit.send_replace(Some(exit));
        });
    }

    async fn create_inner(&self, req: &api::CreateTaskRequest) -> TtrpcResult<u32> {
        let id = req.id.clone();
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                "isola cannot restore from a checkpoint",
            ));
        }
        if self.containers().contains_key(&id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {id} exists"),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = Spec::load(bundle.join("config.json")).map_err(|e| {
            status(
                Code::INVALID_ARGUMENT,
                format!(
                    "container {id}: reading {}/config.json: {e}",
                    bundle.display()
                ),
            )
        })?;
        // The host's network first: a hostNetwork pod's spec lacks its UTS
        // namespace too, and the reason to give is the network.
        netns::of(&spec)
            .and_then(|_| netns::host_namespaces(&spec))
            .map_err(|e| status(Code::FAILED_PRECONDITION, format!("container {id}: {e}")))?;
        let sandbox_id = grouping::sandbox_id(&id, spec.annotations().as_ref());

        // The rootfs: the snapshotter's mounts, mounted at <bundle>/rootfs;
        // without mounts, the spec's root.path (relative to the bundle), as
        // `ctr run --rootfs DIR` gives it.
        let rootfs = if req.rootfs.is_empty() {
            let root = spec
                .root()
                .as_ref()
                .map(|r| r.path().clone())
                .ok_or_else(|| {
                    status(
                        Code::INVALID_ARGUMENT,
                        format!("container {id}: no rootfs mounts and no root.path in its spec"),
                    )
                })?;
            bundle.join(root)
        } else {
            bundle.join("rootfs")
        };
        let mut mounted_rootfs = None;
        if !req.rootfs.is_empty() {
            tokio::fs::create_dir_all(&rootfs)
                .await
                .map_err(|e| status(Code::INTERNAL, format!("container {id}: {e}")))?;
            for m in &req.rootfs {
                if let Err(err) =
                    containerd_shim::asynchronous::util::mount_rootfs(m, &rootfs).await
                {
                    unmount_rootfs(&rootfs);
                    return Err(status(
                        Code::INTERNAL,
                        format!(
                            "container {id}: mounting its rootfs ({} {}): {err}",
                            m.type_, m.source
                        ),
                    ));
                }
            }
            mounted_rootfs = Some(rootfs.clone());
        }
        let result = self
            .create_in_sandbox(req, &sandbox_id, spec, &rootfs, mounted_rootfs.clone())
            .await;
        if result.is_err() {
            if let Some(path) = &mounted_rootfs {
                unmount_rootfs(path);
            }
        }
        result
    }

    async fn create_in_sandbox(
        &self,
        req: &api::CreateTaskRequest,
        sandbox_id: &str,
        spec: Spec,
        rootfs: &Path,
        mounted_rootfs: Option<PathBuf>,
    ) -> TtrpcResult<u32> {
        let id = req.id.clone();
        let running = {
            let mut slot = self.shared.sandbox.lock().await;
            if self
                .shared
                .closing
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return Err(status(
                    Code::UNAVAILABLE,
                    format!("container {id}: this shim is shutting down its sandbox"),
                ));
            }
            // Counted until the container is in the table: Shutdown
            // waits for no Create in flight.
            self.shared
                .creating
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match slot.as_ref() {
                Some(running) => {
                    if running.sandbox.id() != sandbox_id {
                        return Err(status(
                            Code::INVALID_ARGUMENT,
                            format!(
                                "container {id} belongs to sandbox {sandbox_id}, not to this shim's {}",
                                running.sandbox.id()
                            ),
                        ));
                    }
                    running.clone()
                }
                None => match self
                    .start_sandbox(sandbox_id, &spec, req.options.as_ref(), &req.bundle)
                    .await
                {
                    Ok(running) => {
                        *slot = Some(running.clone());
                        running
                    }
                    Err(err) => {
                        self.shared
                            .creating
                            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        return Err(err);
                    }
                },
            }
        };
        let result = self
            .create_container_in(req, &running, spec, rootfs, mounted_rootfs)
            .await;
        self.shared
            .creating
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        result
    }

    async fn create_container_in(
        &self,
        req: &api::CreateTaskRequest,
        running: &Arc<Running>,
        spec: Spec,
        rootfs: &Path,
        mounted_rootfs: Option<PathBuf>,
    ) -> TtrpcResult<u32> {
        let id = req.id.clone();
        if running.sandbox.id() != id {
            sizing::check_fits(running.size, &spec)
                .map_err(|e| status(Code::INVALID_ARGUMENT, format!("container {id}: {e}")))?;
        }
        let proc = Arc::new(Proc::new(
            "",
            Names {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
            },
            req.terminal,
            None,
        ));
        let request = ContainerRequest {
            id: id.clone(),
            spec,
            rootfs: rootfs.to_path_buf(),
            volumes: Vec::new(),
            stdio: proc.stdio_request(),
        };
        let started = running
            .sandbox
            .create_container(request)
            .await
            .map_err(from_sandbox)?;
        let attached = match Attached::attach(&proc.names, started.io, &id, &self.shared.namespace)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                if let Err(err) = running.sandbox.remove(&id, true).await {
                    tracing::warn!(container = %id, %err, "removing a container whose stdio failed");
                }
                return Err(status(
                    Code::INVALID_ARGUMENT,
                    format!("container {id}: {e}"),
                ));
            }
        };
        *proc.io.lock().await = Some(attached);
        // The host pid of every process of the sandbox: its VMM's.
        let pid = running.sandbox.vmm_pid();
        tracing::info!(container = %id, pid, guest_pid = started.pid, "created");
        proc.set(State::Created, pid);
        // Watched from now on: a created init is a process in the guest,
        // and a Kill before Start must end its Wait too.
        self.watch_exit(running.clone(), id.clone(), proc.clone());
        let mut procs = HashMap::new();
        procs.insert(String::new(), proc);
        self.containers().insert(
            id.clone(),
            Container {
                bundle: PathBuf::from(&req.bundle),
                mounted_rootfs,
                procs,
                paused: false,
            },
        );
        Ok(pid)
    }
}

/// Unmounts a container's rootfs mount point (and anything stacked on or
/// below it), through the Share's unmount walk.
pub fn unmount_rootfs(path: &Path) {
    for err in isola_sandbox::share::unmount_all(path) {
        tracing::warn!(path = %path.display(), %err, "rootfs not unmounted");
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        tracing::info!(container = %req.id, bundle = %req.bundle, terminal = req.terminal, "create");
        let pid = self.create_inner(&req).await.inspect_err(|err| {
            tracing::error!(container = %req.id, %err, "create failed");
        })?;
        self.publish(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid,
            ..Default::default()
        })
        .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let proc = self.proc(&req.id, &req.exec_id)?;
        let running = self.running().await?;
        let (state, pid) = proc.state();
        if state != State::Created {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!(
                    "process {} of container {} was started already",
                    req.exec_id, req.id
                ),
            ));
        }
        let pid = if req.exec_id.is_empty() {
            running
                .sandbox
                .start_container(&req.id)
                .await
                .map_err(from_sandbox)?;
            pid
        } else {
            let process = proc.process.clone().ok_or_else(|| {
                status(
                    Code::INTERNAL,
                    format!("exec {} has no process", req.exec_id),
                )
            })?;
            let started = running
                .sandbox
                .exec(&req.id, &req.exec_id, &process, proc.stdio_request())
                .await
                .map_err(from_sandbox)?;
            match Attached::attach(&proc.names, started.io, &req.id, &self.shared.namespace).await {
                Ok(attached) => *proc.io.lock().await = Some(attached),
                Err(e) => {
                    // The process runs in the guest already: end it, and
                    // let the watcher report its exit.
                    if let Err(err) = running
                        .sandbox
                        .signal(&req.id, &req.exec_id, libc::SIGKILL as u32, false)
                        .await
                    {
                        tracing::warn!(container = %req.id, exec_id = %req.exec_id, %err, "killing an exec whose stdio failed");
                    }
                    proc.set(State::Running, running.sandbox.vmm_pid());
                    self.watch_exit(running, req.id.clone(), proc);
                    return Err(status(
                        Code::INVALID_ARGUMENT,
                        format!("exec {}: {e}", req.exec_id),
                    ));
                }
            }
            tracing::debug!(container = %req.id, exec_id = %req.exec_id, guest_pid = started.pid, "exec started");
            running.sandbox.vmm_pid()
        };
        if req.exec_id.is_empty() {
            // Its watcher runs since Create; an exit before this start
            // (a kill) stays the state.
            proc.start_if_created(pid);
        } else {
            proc.set(State::Running, pid);
            self.watch_exit(running, req.id.clone(), proc);
        }
        tracing::info!(container = %req.id, exec_id = %req.exec_id, pid, "started");
        if req.exec_id.is_empty() {
            self.publish(TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            })
            .await;
        } else {
            self.publish(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            })
            .await;
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let proc = self.proc(&req.id, &req.exec_id)?;
        let (state, pid) = proc.state();
        let exit = match state {
            State::Running => {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "process {} of container {} is running; kill it first",
                        req.exec_id, req.id
                    ),
                ))
            }
            State::Created => Exit {
                status: 0,
                at_ns: now_ns(),
            },
            State::Exited(exit) => exit,
        };
        use std::sync::atomic::Ordering;
        proc.deleted.store(true, Ordering::SeqCst);
        if req.exec_id.is_empty() {
            if let Ok(running) = self.running().await {
                if let Err(err) = running.sandbox.remove(&req.id, true).await {
                    if running.sandbox.dead().is_none() {
                        // Kept, so containerd can retry: its mounts in the
                        // share and in the guest are still there.
                        proc.deleted.store(false, Ordering::SeqCst);
                        tracing::warn!(container = %req.id, %err, "removing the container in the guest");
                        return Err(from_sandbox(err));
                    }
                }
            }
        }
        if let Some(mut io) = proc.io.lock().await.take() {
            io.abort().await;
        }
        if state == State::Created {
            // Nobody waits forever for a process that never ran.
            proc.exit.send_replace(Some(exit));
        }
        if req.exec_id.is_empty() {
            let container = self.containers().remove(&req.id);
            if let Some(path) = container.as_ref().and_then(|c| c.mounted_rootfs.as_ref()) {
                unmount_rootfs(path);
            }
            tracing::info!(container = %req.id, "deleted");
            self.publish(TaskDelete {
                container_id: req.id.clone(),
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at_ns)),
                id: req.id.clone(),
                ..Default::default()
            })
            .await;
        } else if let Some(c) = self.containers().get_mut(&req.id) {
            c.procs.remove(&req.exec_id);
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at_ns)),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        // Host pids only: callers act on them on the host (Docker's `top`
        // runs `ps` there for them). Every process of the sandbox is its
        // VMM on the host, reported once, as Kata reports its hypervisor.
        self.proc(&req.id, "")?;
        let running = self.running().await?;
        Ok(api::PidsResponse {
            processes: vec![ProcessInfo {
                pid: running.sandbox.vmm_pid(),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        let running = self.running().await?;
        running.sandbox.pause(&req.id).await.map_err(from_sandbox)?;
        if let Some(c) = self.containers().get_mut(&req.id) {
            c.paused = true;
        }
        self.publish(TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        })
        .await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        let running = self.running().await?;
        running
            .sandbox
            .resume(&req.id)
            .await
            .map_err(from_sandbox)?;
        if let Some(c) = self.containers().get_mut(&req.id) {
            c.paused = false;
        }
        self.publish(TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        })
        .await;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            format!("container {}: isola does not checkpoint containers", req.id),
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        let proc = self.proc(&req.id, &req.exec_id)?;
        if let (State::Exited(_), _) = proc.state() {
            return Err(status(
                Code::NOT_FOUND,
                format!(
                    "process {} of container {}: process already finished",
                    req.exec_id, req.id
                ),
            ));
        }
        let running = self.running().await?;
        tracing::info!(container = %req.id, exec_id = %req.exec_id, signal = req.signal, all = req.all, "kill");
        running
            .sandbox
            .signal(&req.id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(from_sandbox)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        let process: Process = serde_json::from_slice(&req.spec.value).map_err(|e| {
            status(
                Code::INVALID_ARGUMENT,
                format!(
                    "exec {} of container {}: its process spec: {e}",
                    req.exec_id, req.id
                ),
            )
        })?;
        {
            let mut containers = self.containers();
            let container = containers.get_mut(&req.id).ok_or_else(|| {
                status(Code::NOT_FOUND, format!("container {} not found", req.id))
            })?;
            if !matches!(
                container.procs.get("").map(|p| p.state().0),
                Some(State::Running)
            ) {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is not running", req.id),
                ));
            }
            if container.procs.contains_key(&req.exec_id) || req.exec_id.is_empty() {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("exec id {:?} of container {} is taken", req.exec_id, req.id),
                ));
            }
            container.procs.insert(
                req.exec_id.clone(),
                Arc::new(Proc::new(
                    &req.exec_id,
                    Names {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                    },
                    req.terminal,
                    Some(process),
                )),
            );
        }
        self.publish(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
        .await;
        Ok(Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<Empty> {
        let running = self.running().await?;
        let size = WindowSize {
            rows: u16::try_from(req.height).unwrap_or(u16::MAX),
            cols: u16::try_from(req.width).unwrap_or(u16::MAX),
        };
        running
            .sandbox
            .resize_tty(&req.id, &req.exec_id, size)
            .await
            .map_err(from_sandbox)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        let proc = self.proc(&req.id, &req.exec_id)?;
        if req.stdin {
            if let Some(io) = proc.io.lock().await.as_ref() {
                io.close_stdin();
            }
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        let resources: LinuxResources =
            serde_json::from_slice(&req.resources.value).map_err(|e| {
                status(
                    Code::INVALID_ARGUMENT,
                    format!("update of container {}: its resources: {e}", req.id),
                )
            })?;
        let running = self.running().await?;
        running
            .sandbox
            .update(&req.id, &resources)
            .await
            .map_err(from_sandbox)?;
        Ok(Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let proc = self.proc(&req.id, &req.exec_id)?;
        let mut rx = proc.exit.subscribe();
        let exit = loop {
            if let Some(exit) = *rx.borrow_and_update() {
                break exit;
            }
            if rx.changed().await.is_err() {
                return Err(status(Code::INTERNAL, "the process's exit was lost"));
            }
        };
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at_ns)),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let running = self.running().await?;
        let stats = running.sandbox.stats(&req.id).await.map_err(from_sandbox)?;
        let any =
            metrics::to_any(&metrics::to_metrics(&stats)).map_err(|e| status(Code::INTERNAL, e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let (bundle, paused) = {
            let containers = self.containers();
            let c = containers.get(&req.id).ok_or_else(|| {
                status(Code::NOT_FOUND, format!("container {} not found", req.id))
            })?;
            (c.bundle.display().to_string(), c.paused)
        };
        let proc = self.proc(&req.id, &req.exec_id)?;
        let (state, pid) = proc.state();
        let (st, exit) = match state {
            State::Created => (Status::CREATED, None),
            State::Running if paused && req.exec_id.is_empty() => (Status::PAUSED, None),
            State::Running => (Status::RUNNING, None),
            State::Exited(exit) => (Status::STOPPED, Some(exit)),
        };
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle,
            pid,
            status: st.into(),
            stdin: proc.names.stdin.clone(),
            stdout: proc.names.stdout.clone(),
            stderr: proc.names.stderr.clone(),
            terminal: proc.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: match exit {
                Some(e) => MessageField::some(timestamp(e.at_ns)),
                None => MessageField::none(),
            },
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.proc(&req.id, "").map(|p| p.state().1).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: format!("isola {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<Empty> {
        use std::sync::atomic::Ordering;
        // Decided under the sandbox lock, which Create holds while it
        // joins: no container, no Create in flight, and only once.
        let running = {
            let mut slot = self.shared.sandbox.lock().await;
            if !self.containers().is_empty()
                || self.shared.creating.load(Ordering::SeqCst) > 0
                || self.shared.closing.swap(true, Ordering::SeqCst)
            {
                return Ok(Empty::new());
            }
            slot.take()
        };
        // The next `start` for this sandbox spawns a new shim.
        if let Some(socket) = &self.shared.socket {
            socket.remove();
        }
        // The VM stops in a task of its own, after the answer: containerd
        // waits for Shutdown only briefly (and drops the call), and nothing
        // of the sandbox is left for it to wait for (its containers are
        // deleted). The shim exits once the VM is stopped and cleaned up.
        let this = self.clone();
        let stopping = tokio::spawn(async move {
            if let Some(running) = running {
                tracing::info!(sandbox = %running.sandbox.id(), "no containers left: stopping the sandbox VM");
                if let Err(err) = running.sandbox.stop().await {
                    tracing::warn!(sandbox = %running.sandbox.id(), %err, "stopping the sandbox");
                }
                if let Some(cg) = &running.cgroup {
                    cg.remove();
                }
            }
            this.shared.exit.signal();
        });
        drop(stopping);
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_errors_map_onto_ttrpc_codes() {
        let cases = [
            (ErrorKind::NotFound, Code::NOT_FOUND),
            (ErrorKind::AlreadyExists, Code::ALREADY_EXISTS),
            (ErrorKind::InvalidArgument, Code::INVALID_ARGUMENT),
            (ErrorKind::FailedPrecondition, Code::FAILED_PRECONDITION),
            (ErrorKind::DeadlineExceeded, Code::DEADLINE_EXCEEDED),
            (ErrorKind::Unimplemented, Code::UNIMPLEMENTED),
            (ErrorKind::Unavailable, Code::UNAVAILABLE),
            (ErrorKind::Dead, Code::UNAVAILABLE),
            (ErrorKind::Internal, Code::INTERNAL),
            (ErrorKind::Host, Code::INTERNAL),
        ];
        for (kind, code) in cases {
            let err = isola_sandbox::Error::new(kind, "sb1", "doing it", "it broke");
            match from_sandbox(err) {
                ttrpc::Error::RpcStatus(s) => {
                    assert_eq!(s.code(), code, "{kind:?}");
                    assert!(
                        s.message.contains("sb1") && s.message.contains("it broke"),
                        "{}",
                        s.message
                    );
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn timestamps_split_nanoseconds() {
        let t = timestamp(1_700_000_000_123_456_789);
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_456_789));
    }

    #[test]
    fn stdio_requests_follow_containerds_names() {
        let names = |i: &str, o: &str, e: &str| Names {
            stdin: i.into(),
            stdout: o.into(),
            stderr: e.into(),
        };
        let p = Proc::new("", names("", "/f/out", "/f/err"), false, None);
        assert_eq!(
            p.stdio_request(),
            StdioRequest {
                stdin: false,
                stdout: true,
                stderr: true,
                terminal: None
            }
        );
        // A terminal has one output stream; stderr's name is ignored.
        let p = Proc::new("e1", names("/f/in", "/f/out", "/f/err"), true, None);
        assert_eq!(
            p.stdio_request(),
            StdioRequest {
                stdin: true,
                stdout: true,
                stderr: false,
                terminal: Some(WindowSize { rows: 0, cols: 0 })
            }
        );
    }

    #[test]
    fn a_process_moves_from_created_to_running_to_exited() {
        let p = Proc::new("", Names::default(), false, None);
        assert_eq!(p.state(), (State::Created, 0));
        p.set(State::Running, 42);
        assert_eq!(p.state(), (State::Running, 42));
        let exit = Exit {
            status: 3,
            at_ns: 5,
        };
        p.set(State::Exited(exit), 42);
        assert_eq!(p.state(), (State::Exited(exit), 42));
        let rx = p.exit.subscribe();
        p.exit.send_replace(Some(exit));
        assert_eq!(*rx.borrow(), Some(exit));
    }
}
