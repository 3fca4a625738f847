//! One sandbox: its run directory and Share, virtiofsd, isola-vmm, the
//! agent's API, and teardown on every path.

use std::collections::HashSet;
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use isola_protocol::agent::{self as pb};
use isola_protocol::network::Mac;
use isola_protocol::stream::StreamKind;
use isola_protocol::ttrpc;
use isola_protocol::{AgentClient, HealthClient, AGENT_VSOCK_PORT};
use oci_spec::runtime::{LinuxResources, Process, Spec};
use protobuf::MessageField;
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;

use crate::child::{self, first_death, BoundedLines, Death, Supervised};
use crate::error::{Error, ErrorKind, Result};
use crate::jail::{JailUids, UidLease};
use crate::log_gate::{self, LogGate, Verdict};
use crate::logfile::{self, RotatingLog};
use crate::network::{self, PodNetwork};
use crate::portfwd;
use crate::share::{self, Layout, MountOp, GUEST_SHARE_DIR, SHARE_TAG};
use crate::spec::{self, Volume};
use crate::status;
use crate::stdio::{self, OutputReader, ProcessIo, StdioRequest, WindowSize};
use crate::template;

/// The kernel command line every sandbox boots with (the VMM adds the
/// console and its devices).
pub const BASE_CMDLINE: &str =
    "reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Default run directory root.
pub const DEFAULT_RUN_ROOT: &str = "/run/isola/sandboxes";
/// The longest path a Unix socket address holds (`sun_path` is 108
/// bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// How long an ordinary agent call may take.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest agent log line forwarded.
pub const MAX_AGENT_LOG_LINE: usize = 4096;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// No serial device at all.
    Off,
    /// Into this file (capped by the VMM), with every agent log line.
    File(PathBuf),
    /// Kept in the sandbox's `console.log` (rotated, [`crate::logfile`]),
    /// through isola-vmm's stdout, for `isola logs --guest-console`: the
    /// kernel's warnings and errors (`loglevel=5`) and the agent's
    /// (`agent.console=warn`); the agent's whole log is in `agent.log`.
    /// The serial port costs the guest an exit per byte: a quiet console
    /// keeps that off the start path.
    Kept,
}

/// What the kernel command line says for a kept console
/// ([`Console::Kept`]).
pub const KEPT_CONSOLE_CMDLINE: &str = "loglevel=5 agent.console=warn";

/// What a sandbox is made of.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The sandbox id (the agent's id rule: 1-64 of `[A-Za-z0-9_.-]`).
    pub id: String,
    pub vmm: PathBuf,
    pub virtiofsd: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to [`BASE_CMDLINE`] (and the agent options).
    pub kernel_cmdline_extra: String,
    /// The sandbox's directory is `<run_root>/<namespace>/<id>`
    /// ([`share::sandbox_dir`]).
    pub run_root: PathBuf,
    /// The containerd namespace the sandbox belongs to
    /// ([`share::DIRECT_NAMESPACE`] for `isola run`'s).
    pub namespace: String,
    /// The agent's and virtiofsd's log level (error, warn, info, debug, trace).
    pub log_level: String,
    /// The guest's hostname; empty: the agent's default.
    pub hostname: String,
    pub console: Console,
    /// How long the guest may take to boot and answer.
    pub start_timeout: Duration,
    /// How long `stop` waits for DestroySandbox and for the VMM to exit.
    pub stop_timeout: Duration,
    /// virtiofsd's `--cache` mode: never, metadata, auto or always.
    pub virtiofs_cache: String,
    /// A host cgroup (v2 directory) that isola-vmm and virtiofsd are
    /// started in, so the host charges the VM's memory and CPU to it.
    /// It must exist.
    pub cgroup: Option<PathBuf>,
    /// The pod's network namespace (the sandbox container's OCI spec's
    /// `linux.namespaces` network path, e.g. `/var/run/netns/cni-…`),
    /// whose interfaces CNI has set up: each gets a tap and a virtio-net
    /// device with its MAC, and the guest its addresses and routes
    /// ([`crate::network`]). `None`: the guest has no network but `lo`.
    pub netns: Option<PathBuf>,
    /// Checksum and TSO offloads on the pod's virtio-net devices (isola-vmm's
    /// `--net …,offload=off` when false).
    pub net_offloads: bool,
    /// Without `netns`: the VM boots with one virtio-net device on a tap
    /// in isola-vmm's own namespace, and the interface found there when
    /// the first container starts (Docker's, made after Create) is joined
    /// to it ([`network::LateTap`]).
    pub late_network: bool,
    /// Who made the sandbox (the shim: its first container's bundle, whose
    /// path names the containerd namespace), written to `<dir>/owner`
    /// before anything runs; empty: no file. The shim's delete action
    /// touches a sandbox directory only when its owner is the bundle it
    /// was called for.
    pub owner: String,
    /// isola-vmm runs jailed (`--jail`: its own namespaces, an empty root,
    /// no capabilities) as a user of this range of its own
    /// ([`crate::jail`]); `None`: unjailed, as root.
    pub jail: Option<JailUids>,
    /// Start from a template VM of this VM's shape when there is one, and
    /// build one when there is not ([`crate::template`]); false: always
    /// boot (the node's `runtime.templates = false`).
    pub templates: bool,
    /// Debug sessions (`isola debug`, the node's `debug.console`): this
    /// static busybox is served read-only in the share and the agent
    /// allows sessions. `None`: off.
    pub debug_busybox: Option<PathBuf>,
}

impl SandboxConfig {
    /// A config with defaults: 1 vCPU, 256 MiB, /run/isola/sandboxes, log
    /// level info, console off, 60 s to start, 10 s to stop.
    pub fn new(
        id: impl Into<String>,
        vmm: impl Into<PathBuf>,
        virtiofsd: impl Into<PathBuf>,
        kernel: impl Into<PathBuf>,
        initrd: impl Into<PathBuf>,
    ) -> SandboxConfig {
        SandboxConfig {
            id: id.into(),
            vmm: vmm.into(),
            virtiofsd: virtiofsd.into(),
            kernel: kernel.into(),
            initrd: initrd.into(),
            vcpus: 1,
            memory_mib: 256,
            kernel_cmdline_extra: String::new(),
            run_root: PathBuf::from(DEFAULT_RUN_ROOT),
            namespace: share::DIRECT_NAMESPACE.to_string(),
            log_level: "info".to_string(),
            hostname: String::new(),
            console: Console::Off,
            start_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(10),
            virtiofs_cache: "auto".to_string(),
            cgroup: None,
            netns: None,
            net_offloads: true,
            late_network: false,
            owner: String::new(),
            jail: Some(JailUids::default()),
            templates: true,
            debug_busybox: None,
        }
    }

    /// The kernel command line: base, agent options, extras.
    pub fn cmdline(&self) -> String {
        let mut cmdline = self.template_cmdline_base();
        if !self.hostname.is_empty() {
            cmdline.push_str(&format!(" agent.hostname={}", self.hostname));
        }
        self.push_extra(&mut cmdline);
        cmdline
    }

    /// The kernel command line of a template of this VM's shape: no
    /// hostname (a clone gets its own in CreateSandbox).
    pub fn template_cmdline(&self) -> String {
        let mut cmdline = self.template_cmdline_base();
        self.push_extra(&mut cmdline);
        cmdline
    }

    fn template_cmdline_base(&self) -> String {
        let mut cmdline = format!("{BASE_CMDLINE} agent.log={}", self.log_level);
        if self.console == Console::Kept {
            cmdline.push(' ');
            cmdline.push_str(KEPT_CONSOLE_CMDLINE);
        }
        cmdline
    }

    fn push_extra(&self, cmdline: &mut String) {
        if !self.kernel_cmdline_extra.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(self.kernel_cmdline_extra.trim());
        }
    }
}

/// The virtiofsd command line serving `layout`'s read-only view with cache
/// mode `cache`.
pub fn virtiofsd_args(layout: &Layout, log_level: &str, cache: &str) -> Vec<String> {
    vec![
        "--socket-path".into(),
        layout.fs_socket().display().to_string(),
        "--shared-dir".into(),
        layout.ro().display().to_string(),
        "--sandbox".into(),
        "namespace".into(),
        "--cache".into(),
        cache.into(),
        // Container rootfs and volumes are mounts inside the share: the
        // guest must see them as mounts of their own (own st_dev, own
        // inode space), or inodes of two file systems collide.
        "--announce-submounts".into(),
        // Least privilege: file serving keeps chown, dac_override, fowner,
        // fsetid, setgid and setuid; without mknod a guest cannot plant a
        // device node in a writable share, without setfcap no file
        // capabilities.
        "--modcaps=-mknod:-setfcap".into(),
        "--log-level".into(),
        virtiofsd_level(log_level).into(),
    ]
}

fn virtiofsd_level(level: &str) -> &'static str {
    match level {
        "error" => "error",
        "warn" => "warn",
        "debug" => "debug",
        "trace" => "trace",
        "off" => "off",
        _ => "info",
    }
}

/// The isola-vmm command line for `config` and `layout`.
pub fn vmm_args(config: &SandboxConfig, layout: &Layout) -> Vec<String> {
    let mut args = vmm_boot_args(config, config.cmdline());
    args.extend(vmm_own_args(layout, &config.console));
    args
}

/// What isola-vmm boots: the kernel, the initrd, `cmdline`, vCPUs and
/// memory (a template's shape, or a sandbox that boots).
pub fn vmm_boot_args(config: &SandboxConfig, cmdline: String) -> Vec<String> {
    vec![
        "--kernel".into(),
        config.kernel.display().to_string(),
        "--initrd".into(),
        config.initrd.display().to_string(),
        "--cmdline".into(),
        cmdline,
        "--vcpus".into(),
        config.vcpus.to_string(),
        "--memory".into(),
        config.memory_mib.to_string(),
    ]
}

/// What is a VM's own however it starts: its vsock, share and API
/// sockets in `layout`, and its console.
pub fn vmm_own_args(layout: &Layout, console: &Console) -> Vec<String> {
    let console = match console {
        Console::Off => "off".to_string(),
        Console::File(path) => path.display().to_string(),
        Console::Kept => "stdout".to_string(),
    };
    vec![
        "--vsock".into(),
        layout.vsock_socket().display().to_string(),
        "--fs".into(),
        format!("tag={SHARE_TAG},socket={}", layout.fs_socket().display()),
        "--api-socket".into(),
        layout.api_socket().display().to_string(),
        "--console".into(),
        console,
    ]
}

/// The isola-vmm command line of a clone of the template in `dir`: the
/// template's kernel, command line, vCPUs and memory; the sandbox's own
/// sockets and console.
pub fn vmm_restore_args(config: &SandboxConfig, layout: &Layout, dir: &Path) -> Vec<String> {
    let mut args = vec!["--restore".to_string(), dir.display().to_string()];
    args.extend(vmm_own_args(layout, &config.console));
    args
}

/// isola-vmm's `--jail` as user and group `uid`, its root in the
/// sandbox's `jail/` directory.
pub fn vmm_jail_args(uid: u32, layout: &Layout) -> Vec<String> {
    vec![
        "--jail".into(),
        format!("uid={uid},gid={uid},root={}", layout.jail_root().display()),
    ]
}

/// isola-vmm's options for the pod's taps: `--net fd=N,mac=MAC` for each
/// (descriptor in isola-vmm, MAC of the pod interface), in the order the
/// guest numbers its devices (eth0, eth1, ...); `,offload=off` on each
/// without `offloads`.
pub fn vmm_net_args(taps: &[(RawFd, Mac)], offloads: bool) -> Vec<String> {
    let off = if offloads { "" } else { ",offload=off" };
    taps.iter()
        .flat_map(|(fd, mac)| ["--net".to_string(), format!("fd={fd},mac={mac}{off}")])
        .collect()
}

/// What the agent reports as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A process (a container's init when `exec_id` is empty) exited.
    Exited {
        container_id: String,
        exec_id: String,
        pid: u32,
        exit_status: i32,
        exited_at_ns: u64,
    },
    /// A container's cgroup saw an OOM kill.
    Oom { container_id: String },
    /// The agent dropped this many events before we asked.
    Missed(u64),
    /// The sandbox died (its VMM or virtiofsd ended).
    SandboxDead { reason: String },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// The shell's convention: the exit code, or 128 + the signal number.
    pub status: i32,
    /// The signal that killed it, 0 if it exited.
    pub signal: u32,
    pub oom_killed: bool,
    pub exited_at_ns: u64,
    pub pid: u32,
}

impl From<&pb::WaitProcessResponse> for ExitStatus {
    fn from(resp: &pb::WaitProcessResponse) -> ExitStatus {
        ExitStatus {
            status: resp.exit_status,
            signal: resp.signal,
            oom_killed: resp.oom_killed,
            exited_at_ns: resp.exited_at_ns,
            pid: resp.pid,
        }
    }
}

/// A new container's or exec's process: its guest pid and stdio.
#[derive(Debug)]
pub struct Started {
    pub pid: u32,
    pub io: ProcessIo,
}

/// What a container is made of.
#[derive(Debug, Clone)]
pub struct ContainerRequest {
    pub id: String,
    /// The OCI spec; bind mount sources are host paths.
    pub spec: Spec,
    /// The host directory of the root file system.
    pub rootfs: PathBuf,
    /// Host paths shown to the container (bind mounts added to the spec).
    pub volumes: Vec<Volume>,
    pub stdio: StdioRequest,
}

/// Why a sandbox is gone.
#[derive(Debug, Clone)]
enum Gone {
    Died(Death),
    Stopped,
}

/// The sandbox's host resources: run dir, mounts, processes. Torn down once
/// (async on the ordinary paths; synchronously on drop if that never ran).
#[derive(Debug)]
struct Resources {
    sandbox: String,
    layout: Layout,
    virtiofsd: Option<Supervised>,
    vmm: Option<Supervised>,
    /// The pod network's taps and tc redirects, removed after the VMM
    /// (a late network's too, once attached).
    network: Mutex<Option<PodNetwork>>,
    /// The tap of a network to come ([`network::LateTap`]), until the
    /// first container's start attaches it.
    late: tokio::sync::Mutex<Option<network::LateTap>>,
    /// Set when the directory was created by us (and so is ours to remove).
    owns_dir: bool,
    finished: AtomicBool,
    teardown_lock: tokio::sync::Mutex<()>,
    /// True once `teardown` has finished.
    cleaned: watch::Sender<bool>,
    /// Agent log lines the [`LogGate`] dropped (a flood, or lines above
    /// the configured level).
    dropped_log_lines: Arc<AtomicU64>,
    /// The jailed isola-vmm's user, held until the sandbox is gone (its
    /// supervisor holds it too).
    jail_uid: Option<UidLease>,
    /// The template the VM was cloned from (None: it booted).
    from_template: Option<PathBuf>,
}

impl Resources {
    fn children(&self) -> Vec<&Supervised> {
        self.vmm.iter().chain(self.virtiofsd.iter()).collect()
    }

    /// Kill, unmount, remove: no waiting. Idempotent. Returns the failures.
    fn teardown_now(&self) -> Vec<String> {
        for child in self.children() {
            child.kill();
        }
        let mut errors = self.release_network_now();
        errors.extend(self.release_dir());
        errors
    }

    fn take_network(&self) -> Option<PodNetwork> {
        match self.network.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }

    /// Removes the pod network's tc redirects (a thread in the pod netns,
    /// joined).
    fn release_network_now(&self) -> Vec<String> {
        match self.take_network().map(PodNetwork::teardown) {
            Some(Err(err)) => vec![format!("pod network: {err}")],
            _ => Vec::new(),
        }
    }

    /// The same without blocking the runtime.
    async fn release_network(&self) -> Vec<String> {
        let Some(net) = self.take_network() else {
            return Vec::new();
        };
        match tokio::task::spawn_blocking(move || net.teardown()).await {
            Ok(Ok(())) => Vec::new(),
            Ok(Err(err)) => vec![format!("pod network: {err}")],
            Err(err) => vec![format!("pod network: the teardown task: {err}")],
        }
    }

    fn release_dir(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if !self.owns_dir {
            return errors;
        }
        let dir = self.layout.dir();
        for err in share::unmount_all(dir) {
            errors.push(format!("unmounting: {err}"));
        }
        if let Err(err) = share::remove_dir_safely(dir) {
            errors.push(format!("removing {}: {err}", dir.display()));
        }
        errors
    }

    /// The VMM gets `grace` to end by itself (after DestroySandbox it
    /// powers off), virtiofsd 5 s more (it ends with its VMM); then they are
    /// killed, the mounts undone and the directory removed.
    async fn teardown(&self, grace: Duration) -> Vec<String> {
        let _serial = self.teardown_lock.lock().await;
        if self.finished.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let mut errors = Vec::new();
        let mut steps = Steps::stopping(&self.sandbox);
        let kill_wait = Duration::from_secs(10);
        if let Some(vmm) = &self.vmm {
            if vmm.stop(grace, kill_wait).await.is_none() {
                errors.push(format!("isola-vmm (pid {}) did not die", vmm.pid()));
            }
            steps.done("isola-vmm ended");
        }
        if let Some(fs) = &self.virtiofsd {
            // Its writes are synchronous: once the VM is killed at once,
            // virtiofsd has nothing left to finish either.
            let fs_grace = if grace.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_secs(5)
            };
            if fs.stop(fs_grace, kill_wait).await.is_none() {
                errors.push(format!("virtiofsd (pid {}) did not die", fs.pid()));
            }
        }
        steps.done("virtiofsd ended");
        errors.extend(self.release_network().await);
        steps.done("network released");
        errors.extend(self.release_dir());
        steps.done("run directory removed");
        self.finished.store(true, Ordering::SeqCst);
        self.cleaned.send_replace(true);
        if errors.is_empty() {
            tracing::info!(sandbox = %self.sandbox, "sandbox cleaned up");
        } else {
            tracing::error!(sandbox = %self.sandbox, errors = ?errors, "sandbox clean-up incomplete");
        }
        errors
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        if !self.finished.load(Ordering::SeqCst) {
            let errors = self.teardown_now();
            if !errors.is_empty() {
                tracing::error!(sandbox = %self.sandbox, errors = ?errors, "sandbox clean-up on drop incomplete");
            }
        }
    }
}

struct Inner {
    id: String,
    config: SandboxConfig,
    resources: Resources,
    agent: AgentClient,
    gone: watch::Sender<Option<Gone>>,
    events: broadcast::Sender<Event>,
    next_stream: AtomicU64,
    containers: Mutex<HashSet<String>>,
    /// What `status.json` in the run directory says ([`Sandbox::note`]).
    status: Mutex<status::Status>,
    tasks: Mutex<Vec<AbortHandle>>,
    kernel_release: String,
    /// The agent's `api_version`.
    agent_api: u32,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("id", &self.id)
            .field("resources", &self.resources)
            .field("gone", &self.gone.borrow().as_ref().map(gone_text))
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for task in tasks.iter() {
                task.abort();
            }
        }
        // Resources' own drop kills, unmounts and removes what is left.
    }
}

/// A running sandbox. Cheap to clone; the last clone dropped tears it down
/// (kill, unmount, remove) if `stop` did not.
#[derive(Debug, Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

pub(crate) fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_duration(timeout)
}

impl Sandbox {
    /// Creates the run directory and Share, starts virtiofsd and isola-vmm,
    /// dials the agent, opens its log stream and creates the sandbox in
    /// the guest. On failure everything made so far is undone.
    pub async fn start(config: SandboxConfig) -> Result<Sandbox> {
        let id = config.id.clone();
        let mut steps = Steps::new(&id);
        isola_protocol::status::check_id("sandbox id", &id)
            .map_err(|e| Error::agent(&id, "checking the config", e))?;
        for (what, path) in [
            ("isola-vmm", &config.vmm),
            ("virtiofsd", &config.virtiofsd),
            ("kernel", &config.kernel),
            ("initrd", &config.initrd),
        ] {
            if !path.is_file() {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    &id,
                    "checking the config",
                    format!("the {what} {} does not exist", path.display()),
                ));
            }
        }
        let layout = Layout::new(share::sandbox_dir(&config.run_root, &config.namespace, &id));
        for socket in layout.sockets() {
            let len = socket.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    &id,
                    "checking the config",
                    format!(
                        "the socket {} is {len} bytes, longer than a Unix socket address \
                         takes ({MAX_SOCKET_PATH}): shorten the run root {}",
                        socket.display(),
                        config.run_root.display()
                    ),
                ));
            }
        }
        share::prepare_run_root(&config.run_root)
            .map_err(|e| Error::host(&id, "preparing the run root", e))?;
        if let Some(parent) = layout.dir().parent() {
            share::prepare_run_root(parent)
                .map_err(|e| Error::host(&id, "preparing the namespace's run directory", e))?;
        }
        match share::create_private_dir(layout.dir()) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    &id,
                    "creating the run directory",
                    format!(
                        "{} exists (a sandbox with this id, or one not cleaned up)",
                        layout.dir().display()
                    ),
                ))
            }
            Err(err) => {
                return Err(Error::host(
                    &id,
                    format!("creating {}", layout.dir().display()),
                    err,
                ))
            }
        }
        let mut resources = Resources {
            sandbox: id.clone(),
            layout: layout.clone(),
            virtiofsd: None,
            vmm: None,
            network: Mutex::new(None),
            late: tokio::sync::Mutex::new(None),
            owns_dir: true,
            finished: AtomicBool::new(false),
            teardown_lock: tokio::sync::Mutex::new(()),
            cleaned: watch::channel(false).0,
            dropped_log_lines: Arc::new(AtomicU64::new(0)),
            jail_uid: None,
            from_template: None,
        };
        // From here on, dropping `resources` undoes everything.
        if !config.owner.is_empty() {
            share::write_owner(&layout, &config.owner)
                .map_err(|e| Error::host(&id, "recording the sandbox's owner", e))?;
        }
        share::create_dirs(&layout)
            .map_err(|e| Error::host(&id, "creating the share's directories", e))?;
        for op in share::plan_share(&layout) {
            share::apply(&op).map_err(|e| Error::host(&id, "setting up the share", e))?;
        }
        if let Some(busybox) = &config.debug_busybox {
            crate::debug::serve_busybox(&layout, busybox)
                .map_err(|e| Error::host(&id, "serving the debug shell (debug.console)", e))?;
        }
        let mut cmd = tokio::process::Command::new(&config.virtiofsd);
        cmd.args(virtiofsd_args(
            &layout,
            &config.log_level,
            &config.virtiofs_cache,
        ))
        .stdout(std::process::Stdio::null());
        child::confine(&mut cmd, config.cgroup.as_deref())
            .map_err(|e| Error::host(&id, "preparing virtiofsd's cgroup", e))?;
        let virtiofsd = Supervised::spawn("virtiofsd", &id, cmd)
            .map_err(|e| Error::host(&id, format!("starting {}", config.virtiofsd.display()), e))?;
        resources.virtiofsd = Some(virtiofsd);
        steps.done("virtiofsd started");
        // virtiofsd comes up while the pod network is plumbed.
        if let Some(netns) = &config.netns {
            let path = netns.clone();
            // A thread in the pod netns, joined off the runtime; if this
            // future is dropped, the PodNetwork's drop undoes it.
            let net = tokio::task::spawn_blocking(move || network::discover_and_plumb(&path))
                .await
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Host,
                        &id,
                        "plumbing the pod network",
                        e.to_string(),
                    )
                })?
                .map_err(|e| Error::host(&id, "plumbing the pod network", e))?;
            tracing::info!(sandbox = %id, netns = %netns.display(), interfaces = ?net.interfaces().iter().map(|i| (&i.name, &i.tap)).collect::<Vec<_>>(), "pod network plumbed");
            resources.network = Mutex::new(Some(net));
            steps.done("pod network plumbed");
        }

        let fs = resources
            .virtiofsd
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Host, &id, "starting virtiofsd", "not started"))?;
        wait_for_socket(&layout.fs_socket(), fs, config.start_timeout)
            .await
            .map_err(|m| Error::new(ErrorKind::Host, &id, "starting virtiofsd", m))?;

        steps.done("virtiofsd up");
        let virtiofsd_up_ms = steps.total_ms();

        let mut taps = resources
            .network
            .get_mut()
            .ok()
            .and_then(|net| net.as_ref().map(PodNetwork::taps))
            .unwrap_or_default();
        // isola-vmm runs in the pod's network namespace, or in one of its
        // own: never in the host's. Its pid is the task pid containerd
        // reports, and Docker and others put a container's network into
        // `/proc/<task pid>/ns/net`, which must not be the host's.
        let pod_netns = resources
            .network
            .get_mut()
            .ok()
            .and_then(|n| n.as_ref())
            .and_then(PodNetwork::netns_fd)
            .map(|fd| fd.try_clone_to_owned());
        let netns = match pod_netns {
            Some(fd) => {
                fd.map_err(|e| Error::host(&id, "keeping the pod netns for isola-vmm", e))?
            }
            None => tokio::task::spawn_blocking(network::private_netns)
                .await
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Host,
                        &id,
                        "making isola-vmm's netns",
                        e.to_string(),
                    )
                })?
                .map_err(|e| Error::host(&id, "making isola-vmm's netns", e))?,
        };
        if config.netns.is_none() && config.late_network {
            let fd = netns
                .try_clone()
                .map_err(|e| Error::host(&id, "keeping isola-vmm's netns", e))?;
            let late = tokio::task::spawn_blocking(move || network::LateTap::open(&fd))
                .await
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Host,
                        &id,
                        "opening the tap for a late network",
                        e.to_string(),
                    )
                })?
                .map_err(|e| Error::host(&id, "opening the tap for a late network", e))?;
            taps.extend(late.tap());
            *resources.late.get_mut() = Some(late);
        }
        // A template of this VM's shape: a clone of it starts instead of a
        // boot; without one, this sandbox boots cold and the template is
        // built beside it.
        let mut restore = None;
        if config.templates {
            match template::Inputs::of(&config, taps.len()) {
                Ok(inputs) => {
                    match template::ready(&template::root_for(&config.run_root), &inputs) {
                        Some(dir) => restore = Some(dir),
                        None => template::build_in_background(&config, inputs),
                    }
                }
                Err(err) => {
                    tracing::warn!(sandbox = %id, %err, "no template: reading the VM's files")
                }
            }
        }
        let late_boot_mac = resources
            .late
            .get_mut()
            .as_ref()
            .and_then(|late| late.tap())
            .map(|(_, mac)| mac);
        if restore.is_some() {
            // The guest's virtio-net devices have the template's MACs.
            if let Ok(Some(net)) = resources.network.get_mut().map(Option::as_mut) {
                net.set_guest_macs(template::template_mac);
            }
            if let Some(late) = resources.late.get_mut() {
                late.set_guest_mac(template::template_mac(taps.len().saturating_sub(1)));
            }
        }
        spawn_vmm(
            &config,
            &layout,
            &mut resources,
            &taps,
            &netns,
            restore.as_deref(),
        )?;

        let vsock = layout.vsock_socket();
        let client = loop {
            let deadline = match restore {
                // A clone answers at once; one that does not is given up
                // on well before a cold boot's deadline.
                Some(_) => config.start_timeout / 3,
                None => config.start_timeout,
            };
            let dialed = dial_agent(&id, &resources, &vsock, deadline).await;
            match (dialed, restore.take()) {
                (Ok(client), from) => {
                    resources.from_template = from;
                    break client;
                }
                (Err(err), Some(dir)) => {
                    template::discard(&dir, &err.to_string());
                    tracing::warn!(sandbox = %id, template = %dir.display(), %err, "the VM did not start from its template; booting it cold");
                    if let Some(vmm) = resources.vmm.take() {
                        vmm.kill();
                        let _ = vmm.stop(Duration::ZERO, config.stop_timeout).await;
                    }
                    if let Ok(Some(net)) = resources.network.get_mut().map(Option::as_mut) {
                        net.set_guest_macs_own();
                    }
                    if let (Some(late), Some(mac)) = (resources.late.get_mut(), late_boot_mac) {
                        late.set_guest_mac(mac);
                    }
                    spawn_vmm(&config, &layout, &mut resources, &taps, &netns, None)?;
                }
                (Err(err), None) => return Err(err),
            }
        };
        // isola-vmm holds the taps now: the host's copies go, so each tap
        // lives exactly as long as isola-vmm.
        if let Ok(Some(net)) = resources.network.get_mut().map(Option::as_mut) {
            net.close_taps();
        }
        if let Some(late) = resources.late.get_mut() {
            late.close_tap();
        }
        drop(netns);
        let children = resources.children();
        let health = HealthClient::new(client.clone());
        // The agent's log stream is opened while Version is asked: each is
        // a round trip to the guest, and neither needs the other.
        let version_req = pb::VersionRequest::new();
        let (version, log_stream) = tokio::join!(
            race_death(&children, health.version(ctx(RPC_TIMEOUT), &version_req)),
            stdio::open_stream(&vsock, StreamKind::Log)
        );
        let version = version
            .map_err(|d| Error::new(ErrorKind::Dead, &id, "Health.Version", d.to_string()))?
            .map_err(|e| Error::agent(&id, "Health.Version", e))?;
        steps.done("agent answered");
        let vm_ready_ms = steps.total_ms();
        tracing::info!(sandbox = %id, agent_version = %version.agent_version, api_version = version.api_version, "agent answered");

        let mut tasks = Vec::new();
        match log_stream {
            Ok(stream) => {
                let gate = LogGate::new(
                    log_gate::level_cap(&config.log_level),
                    resources.dropped_log_lines.clone(),
                );
                let file = RotatingLog::new(layout.agent_log_file(), logfile::MAX_LOG_FILE);
                tasks.push(
                    tokio::spawn(forward_agent_log(
                        stream,
                        id.clone(),
                        gate,
                        file,
                        layout.dir().to_path_buf(),
                    ))
                    .abort_handle(),
                )
            }
            Err(err) => tracing::warn!(sandbox = %id, %err, "no agent log stream"),
        }

        let agent = AgentClient::new(client);
        let setup = resources
            .network
            .lock()
            .ok()
            .and_then(|net| net.as_ref().map(PodNetwork::setup_request));
        if let Some(req) = setup {
            if version.api_version < 3 {
                return Err(Error::new(
                    ErrorKind::Unimplemented,
                    &id,
                    "SetupNetwork",
                    format!(
                        "the agent speaks api_version {}; pod networking needs 3",
                        version.api_version
                    ),
                ));
            }
            race_death(&children, agent.setup_network(ctx(RPC_TIMEOUT), &req))
                .await
                .map_err(|d| Error::new(ErrorKind::Dead, &id, "SetupNetwork", d.to_string()))?
                .map_err(|e| Error::agent(&id, "SetupNetwork", e))?;
            tracing::info!(sandbox = %id, interfaces = req.interfaces.len(), routes = req.routes.len(), "guest network set up");
            steps.done("guest network set up");
        }
        let req = pb::CreateSandboxRequest {
            sandbox_id: id.clone(),
            hostname: config.hostname.clone(),
            share_tag: SHARE_TAG.to_string(),
            share_mount_point: GUEST_SHARE_DIR.to_string(),
            stop_timeout_secs: config.stop_timeout.as_secs().clamp(1, 3600) as u32,
            entropy: host_entropy().map_err(|e| {
                Error::new(ErrorKind::Host, &id, "reading host entropy", e.to_string())
            })?,
            realtime_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            debug_console: config.debug_busybox.is_some(),
            ..Default::default()
        };
        let created = race_death(&children, agent.create_sandbox(ctx(RPC_TIMEOUT), &req))
            .await
            .map_err(|d| Error::new(ErrorKind::Dead, &id, "CreateSandbox", d.to_string()))?
            .map_err(|e| Error::agent(&id, "CreateSandbox", e))?;
        steps.done("sandbox created in the guest");
        tracing::info!(sandbox = %id, kernel = %created.kernel_release, dir = %layout.dir().display(), ms = steps.total_ms(), template = resources.from_template.is_some(), "sandbox started");
        drop(children);
        // kubectl port-forward: served while the sandbox lives.
        let forward = resources
            .network
            .get_mut()
            .ok()
            .and_then(|net| net.as_mut().and_then(PodNetwork::take_forward_listener));
        if let Some(listener) = forward {
            match portfwd::spawn(listener, vsock.clone(), id.clone()) {
                Ok(task) => tasks.push(task),
                Err(err) => tracing::warn!(sandbox = %id, %err, "no port forwarding into this pod"),
            }
        }

        let startup = status::Startup {
            virtiofsd_up_ms,
            vm_ready_ms,
            sandbox_ready_ms: steps.total_ms(),
        };
        Ok(Sandbox::assemble(
            config,
            resources,
            agent,
            (created.kernel_release, version.api_version),
            tasks,
            Some(startup),
        ))
    }

    /// The running sandbox from its parts; starts the supervisor and the
    /// event loop.
    fn assemble(
        config: SandboxConfig,
        resources: Resources,
        agent: AgentClient,
        (kernel_release, agent_api): (String, u32),
        mut tasks: Vec<AbortHandle>,
        startup: Option<status::Startup>,
    ) -> Sandbox {
        let id = config.id.clone();
        let (gone, _) = watch::channel(None);
        let (events, _) = broadcast::channel(1024);
        let first_status = status::Status {
            id: id.clone(),
            namespace: config.namespace.clone(),
            runner_pid: std::process::id(),
            vmm_pid: resources.vmm.as_ref().map_or(0, Supervised::pid),
            virtiofsd_pid: resources.virtiofsd.as_ref().map_or(0, Supervised::pid),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            started_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            template: resources.from_template.is_some(),
            host_cgroup: config.cgroup.clone(),
            containers: Default::default(),
            startup,
        };
        let inner = Arc::new(Inner {
            id: id.clone(),
            config,
            resources,
            agent,
            gone,
            events,
            next_stream: AtomicU64::new(1),
            containers: Mutex::new(HashSet::new()),
            status: Mutex::new(first_status),
            tasks: Mutex::new(Vec::new()),
            kernel_release,
            agent_api,
        });
        tasks.push(tokio::spawn(supervise(Arc::downgrade(&inner))).abort_handle());
        tasks.push(
            tokio::spawn(note_exits(Arc::downgrade(&inner), inner.events.subscribe()))
                .abort_handle(),
        );
        tasks.push(
            tokio::spawn(event_loop(
                inner.agent.clone(),
                inner.events.clone(),
                inner.gone.subscribe(),
                id,
            ))
            .abort_handle(),
        );
        if let Ok(mut slot) = inner.tasks.lock() {
            slot.extend(tasks);
        }
        let sandbox = Sandbox { inner };
        sandbox.note(|_| {});
        sandbox
    }

    /// Changes what the status file says (`f`) and writes it; a failure to
    /// write is logged, never the caller's.
    fn note(&self, f: impl FnOnce(&mut status::Status)) {
        self.inner.note(f);
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The template the VM was cloned from; None when it booted.
    pub fn template(&self) -> Option<&Path> {
        self.inner.resources.from_template.as_deref()
    }

    /// The sandbox's run directory.
    pub fn dir(&self) -> &Path {
        self.inner.resources.layout.dir()
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.inner.config
    }

    /// The agent log lines not forwarded to the host's log so far (a
    /// flood past the sandbox's budget, or lines above the configured
    /// level).
    pub fn dropped_log_lines(&self) -> u64 {
        self.inner
            .resources
            .dropped_log_lines
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The guest kernel's release, as the agent reported it.
    pub fn kernel_release(&self) -> &str {
        &self.inner.kernel_release
    }

    /// The VMM's pid: the host pid that stands for every process of the
    /// sandbox (a guest pid means nothing on the host), as Kata reports its
    /// hypervisor's (0 for a sandbox assembled without one, in tests).
    pub fn vmm_pid(&self) -> u32 {
        self.inner.resources.vmm.as_ref().map_or(0, |v| v.pid())
    }

    /// Pids of the VMM and virtiofsd.
    pub fn helper_pids(&self) -> Vec<(String, u32)> {
        self.inner
            .resources
            .children()
            .iter()
            .map(|c| (c.name().to_string(), c.pid()))
            .collect()
    }

    /// Events from now on (exits, OOM kills, the sandbox's death).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Why the sandbox is dead, if it is (stopped or a helper died).
    pub fn dead(&self) -> Option<String> {
        self.inner.gone.borrow().as_ref().map(gone_text)
    }

    /// Waits until the sandbox is dead or stopped; returns why.
    pub async fn wait_dead(&self) -> String {
        let mut rx = self.inner.gone.subscribe();
        loop {
            if let Some(gone) = rx.borrow_and_update().as_ref() {
                return gone_text(gone);
            }
            if rx.changed().await.is_err() {
                return "sandbox dropped".to_string();
            }
        }
    }

    /// Waits until the clean-up after a death (or `stop`) has finished.
    pub async fn wait_cleaned_up(&self) {
        let mut rx = self.inner.resources.cleaned.subscribe();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn gone_error(&self, step: &str, gone: &Gone) -> Error {
        Error::new(ErrorKind::Dead, &self.inner.id, step, gone_text(gone))
    }

    /// Runs an agent call, failing with the sandbox's death if it dies
    /// first (or the call failed because it died).
    async fn call<T>(
        &self,
        step: &str,
        container: Option<&str>,
        fut: impl Future<Output = ttrpc::Result<T>>,
    ) -> Result<T> {
        let name = |err: Error| match container {
            Some(c) => err.in_container(c),
            None => err,
        };
        let mut gone = self.inner.gone.subscribe();
        if let Some(g) = gone.borrow_and_update().clone() {
            return Err(name(self.gone_error(step, &g)));
        }
        let result = tokio::select! {
            result = fut => result,
            _ = gone.changed() => {
                let g = gone.borrow().clone().unwrap_or(Gone::Stopped);
                return Err(name(self.gone_error(step, &g)));
            }
        };
        match result {
            Ok(value) => Ok(value),
            Err(err) => {
                if isola_protocol::status::code(&err).is_none() {
                    // The connection failed: most likely the sandbox is
                    // dying; the supervisor says so within moments.
                    let died = tokio::time::timeout(Duration::from_secs(3), async {
                        loop {
                            if let Some(g) = gone.borrow_and_update().clone() {
                                return Some(g);
                            }
                            if gone.changed().await.is_err() {
                                return None;
                            }
                        }
                    })
                    .await;
                    if let Ok(Some(g)) = died {
                        return Err(name(self.gone_error(step, &g)));
                    }
                }
                Err(name(Error::agent(&self.inner.id, step, err)))
            }
        }
    }

    fn next_stream_id(&self) -> u64 {
        self.inner.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    async fn open_stdio(&self, cid: &str, req: &StdioRequest) -> Result<(pb::Stdio, ProcessIo)> {
        stdio::check_request(req).map_err(|m| {
            Error::new(
                ErrorKind::InvalidArgument,
                &self.inner.id,
                "opening stdio",
                m,
            )
            .in_container(cid)
        })?;
        let vsock = self.inner.resources.layout.vsock_socket();
        let (ids, io) = stdio::open(&vsock, req, || self.next_stream_id())
            .await
            .map_err(|e| {
                if let Some(g) = self.inner.gone.borrow().clone() {
                    return self.gone_error("opening stdio", &g).in_container(cid);
                }
                Error::new(
                    ErrorKind::Unavailable,
                    &self.inner.id,
                    "opening stdio",
                    e.to_string(),
                )
                .in_container(cid)
            })?;
        Ok((ids.to_pb(req.terminal), io))
    }

    /// Mounts the container's rootfs and volumes into the Share, opens its
    /// stdio streams and creates it in the guest (its init exists, not yet
    /// started). On failure its mounts are undone.
    pub async fn create_container(&self, req: ContainerRequest) -> Result<Started> {
        let sid = self.inner.id.clone();
        let cid = req.id.clone();
        let invalid = |m: String| {
            Error::new(
                ErrorKind::InvalidArgument,
                &sid,
                "creating the container",
                m,
            )
            .in_container(&cid)
        };
        isola_protocol::status::check_id("container id", &cid)
            .map_err(|e| Error::agent(&sid, "checking the container id", e))?;
        if let Some(g) = self.inner.gone.borrow().clone() {
            return Err(self
                .gone_error("creating the container", &g)
                .in_container(&cid));
        }
        {
            let mut containers = self.lock_containers();
            if !containers.insert(cid.clone()) {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    &sid,
                    "creating the container",
                    format!("container {cid} exists"),
                )
                .in_container(&cid));
            }
        }
        let result = self.create_container_inner(req, &invalid).await;
        if result.is_err() {
            self.release_container(&cid);
        }
        result
    }

    async fn create_container_inner(
        &self,
        req: ContainerRequest,
        invalid: &(dyn Fn(String) -> Error + Sync),
    ) -> Result<Started> {
        let began = std::time::Instant::now();
        let sid = &self.inner.id;
        let cid = &req.id;
        let layout = &self.inner.resources.layout;
        let mut spec = req.spec;
        if !req.rootfs.is_dir() {
            return Err(invalid(format!(
                "the rootfs {} is not a directory",
                req.rootfs.display()
            )));
        }
        if !req.volumes.is_empty() {
            let mounts = spec.mounts_mut().get_or_insert_with(Vec::new);
            mounts.extend(req.volumes.iter().map(Volume::mount));
        }
        if let Some(process) = spec.process_mut() {
            process.set_terminal(Some(req.stdio.terminal.is_some()));
        }
        if spec::root_readonly(&spec) {
            // The rootfs reaches the guest read-only, so the mount points
            // its mounts need are made now, on the host, as runc makes them
            // before it remounts a root read-only.
            create_mount_points(&req.rootfs, &spec).map_err(|e| {
                Error::host(sid, "creating mount points in the read-only rootfs", e)
                    .in_container(cid)
            })?;
        }
        let sandbox_namespaces = crate::namespaces::shared(&spec, self.vmm_pid())
            .map_err(|e| invalid(format!("oci spec: {e}")))?;
        if !sandbox_namespaces.is_empty() && self.inner.agent_api < 4 {
            return Err(Error::new(
                ErrorKind::Unimplemented,
                sid,
                "creating the container",
                format!(
                    "the agent speaks api_version {}; sharing the pod's namespaces needs 4",
                    self.inner.agent_api
                ),
            )
            .in_container(cid));
        }
        let binds = spec::rewrite(&mut spec, cid).map_err(|e| invalid(format!("oci spec: {e}")))?;
        for bind in &binds {
            if !bind.source.exists() {
                return Err(invalid(format!(
                    "bind mount source {} does not exist",
                    bind.source.display()
                )));
            }
        }

        // The rootfs and volumes into the share.
        // The rootfs is private: nothing the host mounts in it later is
        // the container's.
        let mut ops = share::plan_bind(
            &req.rootfs,
            &layout.rootfs(cid),
            share::BindMode {
                readonly: spec::root_readonly(&spec),
                private: true,
            },
            &layout.staging_for(cid, "rootfs"),
        );
        for bind in &binds {
            ops.extend(share::plan_bind(
                &bind.source,
                &layout.volume(cid, bind.index),
                share::BindMode {
                    readonly: bind.readonly,
                    private: bind.private,
                },
                &layout.staging_for(cid, &bind.index.to_string()),
            ));
        }
        for op in &ops {
            share::apply(op)
                .map_err(|e| Error::host(sid, "mounting into the share", e).in_container(cid))?;
        }
        tracing::debug!(sandbox = %sid, container = %cid, mounts = ops.iter().filter(|o| matches!(o, MountOp::Bind { .. })).count(), "container mounted into the share");
        // A read-only volume's submounts: the guest mounts them before the
        // container binds the volume, so they keep their own flags.
        let readonly: Vec<PathBuf> = binds
            .iter()
            .filter(|b| b.readonly)
            .map(|b| layout.volume(cid, b.index))
            .collect();
        let mut submounts = share::submounts(layout, &readonly).unwrap_or_else(|err| {
            tracing::warn!(sandbox = %sid, container = %cid, %err, "cannot list the read-only volumes' submounts; they are read-only in the guest");
            Vec::new()
        });
        if submounts.len() > isola_protocol::MAX_SUBMOUNTS {
            tracing::warn!(sandbox = %sid, container = %cid, found = submounts.len(), "more read-only volume submounts than the agent takes; the rest are read-only in the guest");
            submounts.truncate(isola_protocol::MAX_SUBMOUNTS);
        }

        let spec_json = serde_json::to_string(&spec)
            .map_err(|e| invalid(format!("oci spec does not serialize: {e}")))?;
        let (stdio, io) = self.open_stdio(cid, &req.stdio).await?;
        let request = pb::CreateContainerRequest {
            container_id: cid.clone(),
            oci_spec_json: spec_json,
            rootfs: share::guest_rootfs_rel(cid),
            stdio: MessageField::some(stdio),
            sandbox_namespaces,
            submounts,
            ..Default::default()
        };
        let agent = &self.inner.agent;
        let resp = self
            .call(
                "CreateContainer",
                Some(cid),
                agent.create_container(ctx(RPC_TIMEOUT), &request),
            )
            .await?;
        tracing::info!(sandbox = %sid, container = %cid, pid = resp.pid, "container created");
        self.note(|s| {
            s.containers.insert(
                cid.clone(),
                status::ContainerStatus {
                    state: "created".into(),
                    guest_pid: resp.pid,
                    exit_status: None,
                    create_ms: Some(began.elapsed().as_millis() as u64),
                },
            );
        });
        Ok(Started { pid: resp.pid, io })
    }

    fn lock_containers(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        match self.inner.containers.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Undoes a container's mounts and removes its directory of the share.
    fn release_container(&self, cid: &str) {
        let layout = &self.inner.resources.layout;
        let mut errors = Vec::new();
        for dir in [
            layout.container(cid),
            layout.ro().join("containers").join(cid),
        ] {
            errors.extend(share::unmount_all(&dir).into_iter().map(|e| e.to_string()));
        }
        // A staging mount left by a failure half way through a read-only
        // bind (staging/<cid>+rootfs, staging/<cid>+<n>).
        if let Ok(entries) = std::fs::read_dir(layout.staging()) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if Layout::is_staging_of(&name, cid) {
                    errors.extend(
                        share::unmount_all(&entry.path())
                            .into_iter()
                            .map(|e| e.to_string()),
                    );
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
        if let Err(err) = share::remove_dir_safely(&layout.container(cid)) {
            errors.push(err.to_string());
        }
        if !errors.is_empty() {
            tracing::error!(sandbox = %self.inner.id, container = %cid, ?errors, "container clean-up incomplete");
        }
        self.lock_containers().remove(cid);
        self.note(|s| {
            s.containers.remove(cid);
        });
    }

    /// Starts the container's init process; the first start attaches a
    /// late network first.
    pub async fn start_container(&self, cid: &str) -> Result<()> {
        self.attach_late_network(cid).await?;
        let req = pb::StartContainerRequest {
            container_id: cid.to_string(),
            ..Default::default()
        };
        self.call(
            "StartContainer",
            Some(cid),
            self.inner.agent.start_container(ctx(RPC_TIMEOUT), &req),
        )
        .await?;
        self.note_state(cid, "running");
        Ok(())
    }

    /// Container `cid`'s state in the status file, unless it exited.
    fn note_state(&self, cid: &str, state: &str) {
        self.note(|s| {
            if let Some(c) = s.containers.get_mut(cid) {
                if c.state != "exited" {
                    c.state = state.to_string();
                }
            }
        });
    }

    /// Joins what arrived in isola-vmm's namespace since the boot (Docker's
    /// network) to the VM's late tap and gives the guest its addresses and
    /// routes: once, on the first container's start. Nothing arrived:
    /// nothing to do.
    async fn attach_late_network(&self, cid: &str) -> Result<()> {
        let mut slot = self.inner.resources.late.lock().await;
        let Some(late) = slot.take() else {
            return Ok(());
        };
        let id = self.inner.id.clone();
        let step = "attaching the network made after create";
        let net = tokio::task::spawn_blocking(move || late.attach())
            .await
            .map_err(|e| Error::new(ErrorKind::Host, &id, step, e.to_string()))?
            .map_err(|e| Error::host(&id, step, e).in_container(cid))?;
        let Some(net) = net else {
            tracing::debug!(sandbox = %id, "no network arrived in isola-vmm's netns");
            return Ok(());
        };
        let req = net.setup_request();
        tracing::info!(sandbox = %id, interfaces = ?net.interfaces().iter().map(|i| (&i.name, &i.tap)).collect::<Vec<_>>(), "late network plumbed");
        // Kept for the teardown whatever the guest answers.
        if let Ok(mut kept) = self.inner.resources.network.lock() {
            *kept = Some(net);
        }
        if self.inner.agent_api < 5 {
            return Err(Error::new(
                ErrorKind::Unimplemented,
                &id,
                "SetupNetwork",
                format!(
                    "the agent speaks api_version {}; a network made after create needs 5",
                    self.inner.agent_api
                ),
            ));
        }
        self.call(
            "SetupNetwork",
            Some(cid),
            self.inner.agent.setup_network(ctx(RPC_TIMEOUT), &req),
        )
        .await?;
        tracing::info!(sandbox = %id, routes = req.routes.len(), "guest network set up");
        Ok(())
    }

    /// Runs another process in a running container.
    pub async fn exec(
        &self,
        cid: &str,
        exec_id: &str,
        process: &Process,
        stdio: StdioRequest,
    ) -> Result<Started> {
        let sid = &self.inner.id;
        let mut process = process.clone();
        process.set_terminal(Some(stdio.terminal.is_some()));
        let process_json = serde_json::to_string(&process).map_err(|e| {
            Error::new(
                ErrorKind::InvalidArgument,
                sid,
                "ExecProcess",
                format!("process: {e}"),
            )
            .in_container(cid)
        })?;
        let (stdio, io) = self.open_stdio(cid, &stdio).await?;
        let req = pb::ExecProcessRequest {
            container_id: cid.to_string(),
            exec_id: exec_id.to_string(),
            process_json,
            stdio: MessageField::some(stdio),
            ..Default::default()
        };
        let resp = self
            .call(
                "ExecProcess",
                Some(cid),
                self.inner.agent.exec_process(ctx(RPC_TIMEOUT), &req),
            )
            .await?;
        Ok(Started { pid: resp.pid, io })
    }

    /// Waits for a process (`exec_id` empty: the container's init) to exit.
    /// The agent answers once its stdout and stderr have carried their
    /// last byte; read them to EOF (or use [`Sandbox::wait_with_output`]).
    pub async fn wait(&self, cid: &str, exec_id: &str) -> Result<ExitStatus> {
        let req = pb::WaitProcessRequest {
            container_id: cid.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        let resp = self
            .call(
                "WaitProcess",
                Some(cid),
                self.inner.agent.wait_process(ctx(Duration::ZERO), &req),
            )
            .await?;
        Ok(ExitStatus::from(&resp))
    }

    /// Copies the process's stdout and stderr to `out` and `err` to their
    /// EOF while waiting for its exit: nothing it printed is lost, and it
    /// never blocks on a full stream.
    pub async fn wait_with_output<O, E>(
        &self,
        cid: &str,
        exec_id: &str,
        stdout: Option<OutputReader>,
        stderr: Option<OutputReader>,
        out: O,
        err: E,
    ) -> Result<ExitStatus>
    where
        O: tokio::io::AsyncWrite + Unpin,
        E: tokio::io::AsyncWrite + Unpin,
    {
        let copy_out = async {
            match stdout {
                Some(r) => stdio::copy_output(r, out).await.1,
                None => Ok(()),
            }
        };
        let copy_err = async {
            match stderr {
                Some(r) => stdio::copy_output(r, err).await.1,
                None => Ok(()),
            }
        };
        let (status, out_res, err_res) = tokio::join!(self.wait(cid, exec_id), copy_out, copy_err);
        for (name, res) in [("stdout", out_res), ("stderr", err_res)] {
            if let Err(e) = res {
                tracing::debug!(sandbox = %self.inner.id, container = %cid, exec_id, stream = name, error = %e, "output not fully delivered");
            }
        }
        status
    }

    /// Sends `signal` to a process, or with `all` to every process of the
    /// container.
    pub async fn signal(&self, cid: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let req = pb::SignalProcessRequest {
            container_id: cid.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            all,
            ..Default::default()
        };
        self.call(
            "SignalProcess",
            Some(cid),
            self.inner.agent.signal_process(ctx(RPC_TIMEOUT), &req),
        )
        .await
        .map(drop)
    }

    pub async fn stats(&self, cid: &str) -> Result<pb::StatsContainerResponse> {
        let req = pb::StatsContainerRequest {
            container_id: cid.to_string(),
            ..Default::default()
        };
        self.call(
            "StatsContainer",
            Some(cid),
            self.inner.agent.stats_container(ctx(RPC_TIMEOUT), &req),
        )
        .await
    }

    pub async fn pause(&self, cid: &str) -> Result<()> {
        let req = pb::PauseContainerRequest {
            container_id: cid.to_string(),
            ..Default::default()
        };
        self.call(
            "PauseContainer",
            Some(cid),
            self.inner.agent.pause_container(ctx(RPC_TIMEOUT), &req),
        )
        .await?;
        self.note_state(cid, "paused");
        Ok(())
    }

    pub async fn resume(&self, cid: &str) -> Result<()> {
        let req = pb::ResumeContainerRequest {
            container_id: cid.to_string(),
            ..Default::default()
        };
        self.call(
            "ResumeContainer",
            Some(cid),
            self.inner.agent.resume_container(ctx(RPC_TIMEOUT), &req),
        )
        .await?;
        self.note_state(cid, "running");
        Ok(())
    }

    /// Changes the container's cgroup limits (fields left out keep theirs).
    pub async fn update(&self, cid: &str, resources: &LinuxResources) -> Result<()> {
        let resources_json = serde_json::to_string(resources).map_err(|e| {
            Error::new(
                ErrorKind::InvalidArgument,
                &self.inner.id,
                "UpdateContainer",
                format!("resources: {e}"),
            )
            .in_container(cid)
        })?;
        let req = pb::UpdateContainerRequest {
            container_id: cid.to_string(),
            resources_json,
            ..Default::default()
        };
        self.call(
            "UpdateContainer",
            Some(cid),
            self.inner.agent.update_container(ctx(RPC_TIMEOUT), &req),
        )
        .await
        .map(drop)
    }

    pub async fn resize_tty(&self, cid: &str, exec_id: &str, size: WindowSize) -> Result<()> {
        let req = pb::TtyWinResizeRequest {
            container_id: cid.to_string(),
            exec_id: exec_id.to_string(),
            rows: u32::from(size.rows),
            cols: u32::from(size.cols),
            ..Default::default()
        };
        self.call(
            "TtyWinResize",
            Some(cid),
            self.inner.agent.tty_win_resize(ctx(RPC_TIMEOUT), &req),
        )
        .await
        .map(drop)
    }

    pub async fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<()> {
        let req = pb::CloseStdinRequest {
            container_id: cid.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        self.call(
            "CloseStdin",
            Some(cid),
            self.inner.agent.close_stdin(ctx(RPC_TIMEOUT), &req),
        )
        .await
        .map(drop)
    }

    pub async fn list_processes(&self, cid: &str) -> Result<Vec<pb::ProcessInfo>> {
        let req = pb::ListProcessesRequest {
            container_id: cid.to_string(),
            ..Default::default()
        };
        self.call(
            "ListProcesses",
            Some(cid),
            self.inner.agent.list_processes(ctx(RPC_TIMEOUT), &req),
        )
        .await
        .map(|r| r.processes)
    }

    /// Removes a container (`force`: kill it first) and undoes its mounts.
    pub async fn remove(&self, cid: &str, force: bool) -> Result<()> {
        let req = pb::RemoveContainerRequest {
            container_id: cid.to_string(),
            force,
            ..Default::default()
        };
        self.call(
            "RemoveContainer",
            Some(cid),
            self.inner.agent.remove_container(ctx(RPC_TIMEOUT), &req),
        )
        .await?;
        self.release_container(cid);
        Ok(())
    }

    /// Stops the sandbox: DestroySandbox (bounded) while it has
    /// containers, the VMM's exit (killed after the timeout), virtiofsd's,
    /// every mount undone, the run directory removed. Safe to call more
    /// than once and after death.
    ///
    /// Once the guest holds nothing worth its own power off (hundreds of
    /// ms of kernel shutdown on the node's CPU), the VM is killed at once,
    /// as Kata quits QEMU: after DestroySandbox answered (the guest synced
    /// and unmounted the share), or without it when every container was
    /// removed (each RemoveContainer syncs, and nothing else in the guest
    /// writes to the host). Otherwise the guest gets the stop timeout to
    /// power off.
    pub async fn stop(&self) -> Result<()> {
        let inner = &self.inner;
        let was_alive = inner.gone.borrow().is_none();
        let mut vmm_grace = inner.config.stop_timeout;
        if was_alive {
            inner.gone.send_replace(Some(Gone::Stopped));
        }
        if was_alive && self.lock_containers().is_empty() {
            tracing::debug!(sandbox = %inner.id, "no containers: the VM is killed");
            vmm_grace = Duration::ZERO;
        } else if was_alive {
            let req = pb::DestroySandboxRequest::new();
            let destroy = inner
                .agent
                .destroy_sandbox(ctx(inner.config.stop_timeout), &req);
            let children = inner.resources.children();
            match tokio::time::timeout(inner.config.stop_timeout, race_death(&children, destroy))
                .await
            {
                Ok(Ok(Ok(_))) => vmm_grace = Duration::ZERO,
                Ok(Ok(Err(err))) => {
                    tracing::warn!(sandbox = %inner.id, error = %crate::error::agent_message(&err), "DestroySandbox failed")
                }
                Ok(Err(death)) => {
                    tracing::info!(sandbox = %inner.id, %death, "ended during DestroySandbox")
                }
                Err(_) => {
                    tracing::warn!(sandbox = %inner.id, timeout = ?inner.config.stop_timeout, "DestroySandbox did not answer")
                }
            }
        }
        let errors = inner.resources.teardown(vmm_grace).await;
        if let Ok(tasks) = inner.tasks.lock() {
            for task in tasks.iter() {
                task.abort();
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Host,
                &inner.id,
                "cleaning up",
                errors.join("; "),
            ))
        }
    }
}

impl Inner {
    fn note(&self, f: impl FnOnce(&mut status::Status)) {
        let mut guard = match self.status.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard);
        // Never while the clean-up runs (it removes the directory) or
        // after it: its lock is held for the write.
        let Ok(_teardown) = self.resources.teardown_lock.try_lock() else {
            return;
        };
        if self.resources.finished.load(Ordering::SeqCst) {
            return;
        }
        if let Err(err) = status::write(self.resources.layout.dir(), &guard) {
            tracing::debug!(sandbox = %self.id, %err, "status file not written");
        }
    }
}

/// Marks containers exited in the status file as their exits arrive.
async fn note_exits(inner: Weak<Inner>, mut events: broadcast::Receiver<Event>) {
    loop {
        match events.recv().await {
            Ok(Event::Exited {
                container_id,
                exec_id,
                exit_status,
                ..
            }) if exec_id.is_empty() => {
                let Some(inner) = inner.upgrade() else { return };
                inner.note(|s| {
                    if let Some(c) = s.containers.get_mut(&container_id) {
                        c.state = "exited".into();
                        c.exit_status = Some(exit_status);
                    }
                });
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn gone_text(gone: &Gone) -> String {
    match gone {
        Gone::Died(death) => format!("the sandbox is dead: {death}"),
        Gone::Stopped => "the sandbox was stopped".to_string(),
    }
}

/// Races `fut` against the first death of `children`.
/// Starts isola-vmm for the sandbox: booting `config`'s kernel, or as a
/// clone of the template in `restore`; on the pod's taps, in `netns`,
/// jailed if configured (one jail user for the sandbox, whichever VMM).
fn spawn_vmm(
    config: &SandboxConfig,
    layout: &Layout,
    resources: &mut Resources,
    taps: &[(RawFd, Mac)],
    netns: &std::os::fd::OwnedFd,
    restore: Option<&Path>,
) -> Result<()> {
    let id = &config.id;
    let mut cmd = tokio::process::Command::new(&config.vmm);
    match restore {
        Some(dir) => cmd.args(vmm_restore_args(config, layout, dir)),
        None => cmd.args(vmm_args(config, layout)),
    };
    cmd.args(vmm_net_args(taps, config.net_offloads))
        .stdout(std::process::Stdio::piped());
    let console = (config.console == Console::Kept)
        .then(|| RotatingLog::new(layout.console_file(), logfile::MAX_LOG_FILE));
    child::confine(&mut cmd, config.cgroup.as_deref())
        .map_err(|e| Error::host(id, "preparing isola-vmm's cgroup", e))?;
    let mut inherited: Vec<RawFd> = taps.iter().map(|(fd, _)| *fd).collect();
    if let Some(uids) = &config.jail {
        if resources.jail_uid.is_none() {
            let lease = UidLease::acquire(uids, &layout.dir().to_string_lossy())
                .map_err(|e| Error::host(id, "taking a user for isola-vmm's jail", e))?;
            share::create_private_dir(&layout.jail_root())
                .map_err(|e| Error::host(id, "creating isola-vmm's jail root", e))?;
            tracing::debug!(sandbox = %id, uid = lease.uid(), "isola-vmm jailed");
            resources.jail_uid = Some(lease);
        }
        if let Some(lease) = &resources.jail_uid {
            cmd.args(vmm_jail_args(lease.uid(), layout));
            inherited.push(lease.fd());
        }
    }
    child::inherit(&mut cmd, inherited);
    child::enter_netns(&mut cmd, netns.as_raw_fd());
    let vmm = match console {
        Some(log) => Supervised::spawn_with_log("isola-vmm", id, cmd, log),
        None => Supervised::spawn("isola-vmm", id, cmd),
    }
    .map_err(|e| Error::host(id, format!("starting {}", config.vmm.display()), e))?;
    if let Some(dir) = restore {
        tracing::info!(sandbox = %id, template = %dir.display(), "isola-vmm started from the template");
    }
    resources.vmm = Some(vmm);
    Ok(())
}

/// Dials the agent through the sandbox's hybrid vsock socket within
/// `deadline`, unless isola-vmm or virtiofsd dies first.
async fn dial_agent(
    id: &str,
    resources: &Resources,
    vsock: &Path,
    deadline: Duration,
) -> Result<ttrpc::r#async::Client> {
    let children = resources.children();
    let dial = isola_protocol::hybrid::dial_agent(vsock, AGENT_VSOCK_PORT, deadline);
    tokio::select! {
        dialed = dial => dialed.map_err(|e| Error::new(ErrorKind::Unavailable, id, "dialing the agent", e.to_string())),
        death = first_death(&children) => {
            Err(Error::new(ErrorKind::Dead, id, "dialing the agent", death.to_string()))
        }
    }
}

/// The steps of a start or a stop, each logged at debug level (`start
/// step`, `stop step`) with its own duration and the time since the first.
struct Steps<'a> {
    sandbox: &'a str,
    stop: bool,
    start: std::time::Instant,
    last: std::time::Instant,
}

impl<'a> Steps<'a> {
    fn new(sandbox: &'a str) -> Self {
        let now = std::time::Instant::now();
        Steps {
            sandbox,
            stop: false,
            start: now,
            last: now,
        }
    }

    fn stopping(sandbox: &'a str) -> Self {
        Steps {
            stop: true,
            ..Steps::new(sandbox)
        }
    }

    fn done(&mut self, step: &str) {
        let now = std::time::Instant::now();
        let step_ms = now.duration_since(self.last).as_millis() as u64;
        let ms = now.duration_since(self.start).as_millis() as u64;
        if self.stop {
            tracing::debug!(sandbox = %self.sandbox, step, step_ms, ms, "stop step");
        } else {
            tracing::debug!(sandbox = %self.sandbox, step, step_ms, ms, "start step");
        }
        self.last = now;
    }

    fn total_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

async fn race_death<T>(children: &[&Supervised], fut: impl Future<Output = T>) -> Result<T, Death> {
    tokio::select! {
        out = fut => Ok(out),
        death = first_death(children) => Err(death),
    }
}

/// Waits for virtiofsd's socket; fails early if it dies.
async fn wait_for_socket(
    socket: &Path,
    owner: &Supervised,
    timeout: Duration,
) -> Result<(), String> {
    let until = tokio::time::Instant::now() + timeout;
    loop {
        if socket.exists() {
            return Ok(());
        }
        if let Some(death) = owner.death() {
            return Err(format!("{death} before creating {}", socket.display()));
        }
        if tokio::time::Instant::now() >= until {
            return Err(format!(
                "{} not created within {timeout:?}",
                socket.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for the VMM or virtiofsd to end; unless the sandbox is being
/// stopped, marks it dead (failing pending calls) and cleans up.
async fn supervise(inner: Weak<Inner>) {
    let ended = {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        first_death(&strong.resources.children())
    };
    let death = ended.await;
    let Some(inner) = inner.upgrade() else { return };
    let stopping = inner.gone.borrow().is_some();
    if stopping {
        return;
    }
    tracing::error!(sandbox = %inner.id, %death, "sandbox died");
    inner.gone.send_replace(Some(Gone::Died(death.clone())));
    let _ = inner.events.send(Event::SandboxDead {
        reason: death.to_string(),
    });
    inner.resources.teardown(Duration::from_secs(2)).await;
}

/// Long-polls WaitEvent and publishes each event.
async fn event_loop(
    agent: AgentClient,
    events: broadcast::Sender<Event>,
    mut gone: watch::Receiver<Option<Gone>>,
    sandbox: String,
) {
    let mut after = 0u64;
    let mut failures = 0u32;
    let mut bad_events = LogGate::new(tracing::Level::WARN, Arc::new(AtomicU64::new(0)));
    loop {
        let req = pb::WaitEventRequest {
            after,
            ..Default::default()
        };
        let resp = tokio::select! {
            resp = agent.wait_event(ctx(Duration::ZERO), &req) => resp,
            _ = gone.changed() => return,
        };
        match resp {
            Ok(resp) => {
                failures = 0;
                if resp.seq <= after {
                    tracing::warn!(sandbox = %sandbox, seq = resp.seq, after, "WaitEvent went backwards; ignoring");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                after = resp.seq;
                if resp.missed > 0 {
                    let _ = events.send(Event::Missed(resp.missed));
                }
                let event = match resp.event {
                    Some(pb::wait_event_response::Event::Exited(e)) => Event::Exited {
                        container_id: e.container_id,
                        exec_id: e.exec_id,
                        pid: e.pid,
                        exit_status: e.exit_status,
                        exited_at_ns: e.exited_at_ns,
                    },
                    Some(pb::wait_event_response::Event::Oom(o)) => Event::Oom {
                        container_id: o.container_id,
                    },
                    _ => continue,
                };
                if !event_ids_ok(&event) {
                    // Guest-chosen ids: never logged whole, warned about
                    // within the gate's budget.
                    if bad_events.admit(tracing::Level::WARN) == Verdict::Pass {
                        tracing::warn!(sandbox = %sandbox, seq = after, "an agent event with an id that is not an id: ignored");
                    }
                    continue;
                }
                tracing::debug!(sandbox = %sandbox, seq = after, ?event, "event");
                let _ = events.send(event);
            }
            Err(err) => {
                if gone.borrow().is_some() {
                    return;
                }
                failures += 1;
                let transport = isola_protocol::status::code(&err).is_none();
                tracing::warn!(sandbox = %sandbox, error = %crate::error::agent_message(&err), failures, "WaitEvent failed");
                if failures >= 10 || (transport && failures >= 3) {
                    tracing::error!(sandbox = %sandbox, "no more events from the agent");
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = gone.changed() => return,
                }
            }
        }
    }
}

/// Whether an agent event's ids are ids (the agent's rule): the shim
/// looks them up and logs them.
fn event_ids_ok(event: &Event) -> bool {
    let id_ok = |id: &str| isola_protocol::status::check_id("id", id).is_ok();
    match event {
        Event::Exited {
            container_id,
            exec_id,
            ..
        } => id_ok(container_id) && (exec_id.is_empty() || id_ok(exec_id)),
        Event::Oom { container_id } => id_ok(container_id),
        _ => true,
    }
}

/// The agent's log lines into `tracing`, with the sandbox id and the level
/// the line names, and into the sandbox's `agent.log` (`file`), through
/// the sandbox's [`LogGate`] (bounded in rate, level and length). Drops
/// are summed up at most once a second, in both logs and in the run
/// directory's counters file (`counters_dir`, for `isola monitor`), also
/// when the guest has gone quiet after a flood.
async fn forward_agent_log(
    stream: tokio::net::UnixStream,
    sandbox: String,
    mut gate: LogGate,
    mut file: RotatingLog,
    counters_dir: PathBuf,
) {
    let mut lines = BoundedLines::new(stream, MAX_AGENT_LOG_LINE);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let read = tokio::select! {
            read = lines.next_line() => read,
            _ = tick.tick(), if gate.has_unreported() => {
                if let Some(dropped) = gate.report() {
                    report_dropped(&sandbox, &gate, dropped, &mut file, &counters_dir);
                }
                continue;
            }
        };
        let Ok(Some((line, cut))) = read else {
            break;
        };
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let level = agent_line_level(line);
        let verdict = gate.admit(level);
        if let Some(dropped) = gate.report() {
            report_dropped(&sandbox, &gate, dropped, &mut file, &counters_dir);
        }
        if verdict == Verdict::Drop {
            continue;
        }
        let (line, shortened) = log_gate::truncate(line, log_gate::MAX_FORWARDED);
        let cut = cut || shortened;
        if cut {
            file.write_line(&format!("{line} [cut]"));
        } else {
            file.write_line(line);
        }
        match level {
            tracing::Level::ERROR => {
                tracing::error!(target: "isola_agent", sandbox = %sandbox, cut, "{line}")
            }
            tracing::Level::WARN => {
                tracing::warn!(target: "isola_agent", sandbox = %sandbox, cut, "{line}")
            }
            tracing::Level::DEBUG => {
                tracing::debug!(target: "isola_agent", sandbox = %sandbox, cut, "{line}")
            }
            tracing::Level::TRACE => {
                tracing::trace!(target: "isola_agent", sandbox = %sandbox, cut, "{line}")
            }
            _ => tracing::info!(target: "isola_agent", sandbox = %sandbox, cut, "{line}"),
        }
    }
    if let Some(dropped) = gate.final_report() {
        report_dropped(&sandbox, &gate, dropped, &mut file, &counters_dir);
    }
    tracing::debug!(sandbox = %sandbox, "agent log stream ended");
}

/// `dropped` agent log lines (since the last report) into the host's log,
/// `agent.log`, and the sandbox's counters file (the total).
fn report_dropped(
    sandbox: &str,
    gate: &LogGate,
    dropped: u64,
    file: &mut RotatingLog,
    counters_dir: &Path,
) {
    tracing::warn!(sandbox = %sandbox, dropped, "agent log lines dropped (over the sandbox's rate, or above the configured level)");
    file.write_line(&format!("isola: {dropped} agent log lines dropped (over the sandbox's rate, or above the configured level)"));
    let counters = status::Counters {
        agent_log_lines_dropped: gate.total_dropped(),
    };
    if let Err(err) = status::write_counters(counters_dir, &counters) {
        tracing::debug!(sandbox = %sandbox, %err, "writing the counters file");
    }
}

/// The level a log line names among its first words (INFO if none).
pub fn agent_line_level(line: &str) -> tracing::Level {
    for word in line.split_whitespace().take(3) {
        match word.trim_matches(|c: char| !c.is_ascii_alphabetic()) {
            "ERROR" => return tracing::Level::ERROR,
            "WARN" => return tracing::Level::WARN,
            "INFO" => return tracing::Level::INFO,
            "DEBUG" => return tracing::Level::DEBUG,
            "TRACE" => return tracing::Level::TRACE,
            _ => {}
        }
    }
    tracing::Level::INFO
}

/// Creates in `rootfs` (resolved as the container sees it, relative to a
/// handle on its root: [`crate::rootfs::ImageRoot`]) every mount
/// destination of `spec` that does not exist: a directory, or an empty
/// file for a bind mount of a host file.
fn create_mount_points(rootfs: &Path, spec: &oci_spec::runtime::Spec) -> std::io::Result<()> {
    let image = crate::rootfs::ImageRoot::open(rootfs)?;
    for mount in spec.mounts().iter().flatten() {
        // Only a bind mount's source is a host path (a tmpfs's "tmpfs" is
        // not, and must not be looked up relative to our working directory).
        let file_source = spec::is_bind(mount)
            && mount
                .source()
                .as_ref()
                .is_some_and(|s| s.is_absolute() && s.is_file());
        image.make_mount_point(mount.destination(), file_source)?;
    }
    Ok(())
}

/// Bytes of host randomness every sandbox's agent mixes into its guest's
/// pool (a guest restored from a template starts with the template's).
pub const ENTROPY_BYTES: usize = 64;

/// [`ENTROPY_BYTES`] from the host's CRNG.
fn host_entropy() -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; ENTROPY_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SandboxConfig {
        let mut c = SandboxConfig::new("pod1", "/bin/vmm", "/bin/vfsd", "/k", "/i");
        c.vcpus = 2;
        c.memory_mib = 512;
        c.hostname = "web".into();
        c.kernel_cmdline_extra = " quiet ".into();
        c
    }

    #[test]
    fn command_lines() {
        let c = config();
        let layout = Layout::new("/run/isola/sandboxes/pod1");
        assert_eq!(
            c.cmdline(),
            format!("{BASE_CMDLINE} agent.log=info agent.hostname=web quiet")
        );
        let args = vmm_args(&c, &layout);
        let pairs: Vec<(String, String)> = args
            .chunks(2)
            .map(|p| (p[0].clone(), p.get(1).cloned().unwrap_or_default()))
            .collect();
        let get = |k: &str| pairs.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
        assert_eq!(get("--vcpus"), Some("2"));
        assert_eq!(get("--memory"), Some("512"));
        assert_eq!(get("--vsock"), Some("/run/isola/sandboxes/pod1/vsock.sock"));
        assert_eq!(
            get("--fs"),
            Some("tag=isola-share,socket=/run/isola/sandboxes/pod1/fs.sock")
        );
        assert_eq!(get("--console"), Some("off"));
        assert!(!args.iter().any(|a| a == "--net"));
        // A clone: the template's instead of what boots, its own sockets.
        let restore = vmm_restore_args(&c, &layout, Path::new("/run/isola/templates/k"));
        assert_eq!(restore[..2], ["--restore", "/run/isola/templates/k"]);
        assert_eq!(restore[2..], vmm_own_args(&layout, &c.console)[..]);
        assert!(!restore.iter().any(|a| a == "--kernel" || a == "--vcpus"));
        // The template's command line has no hostname (a clone's is its own).
        assert_eq!(
            c.template_cmdline(),
            format!("{BASE_CMDLINE} agent.log=info quiet")
        );
        let taps = [(7, Mac([0x0a, 0x58, 0, 0, 0, 1])), (8, Mac([2; 6]))];
        assert_eq!(
            vmm_net_args(&taps, true),
            vec![
                "--net",
                "fd=7,mac=0a:58:00:00:00:01",
                "--net",
                "fd=8,mac=02:02:02:02:02:02"
            ]
        );
        assert_eq!(
            vmm_net_args(&taps, false),
            vec![
                "--net",
                "fd=7,mac=0a:58:00:00:00:01,offload=off",
                "--net",
                "fd=8,mac=02:02:02:02:02:02,offload=off"
            ]
        );
        assert!(c.net_offloads, "offloads are on by default");
        assert_eq!(c.netns, None);
        let fs = virtiofsd_args(&layout, "debug", "auto");
        assert_eq!(
            fs.join(" "),
            "--socket-path /run/isola/sandboxes/pod1/fs.sock --shared-dir /run/isola/sandboxes/pod1/ro \
             --sandbox namespace --cache auto --announce-submounts --modcaps=-mknod:-setfcap --log-level debug"
        );
        assert_eq!(virtiofsd_level("bogus"), "info");
    }

    #[test]
    fn events_with_ids_that_are_not_ids_are_refused() {
        let oom = |id: &str| Event::Oom {
            container_id: id.into(),
        };
        assert!(event_ids_ok(&oom("c1")));
        assert!(!event_ids_ok(&oom(&"x".repeat(4 << 20))));
        assert!(!event_ids_ok(&oom("../c1")));
        assert!(!event_ids_ok(&oom("")));
        let exited = |exec: &str| Event::Exited {
            container_id: "c1".into(),
            exec_id: exec.into(),
            pid: 1,
            exit_status: 0,
            exited_at_ns: 0,
        };
        assert!(event_ids_ok(&exited("")));
        assert!(event_ids_ok(&exited("e1")));
        assert!(!event_ids_ok(&exited("e\n1")));
    }

    #[test]
    fn agent_log_levels() {
        assert_eq!(
            agent_line_level("2026-11-29T01:02:03Z ERROR isola_agent: boom"),
            tracing::Level::ERROR
        );
        assert_eq!(agent_line_level("  WARN x"), tracing::Level::WARN);
        assert_eq!(agent_line_level("[DEBUG] y"), tracing::Level::DEBUG);
        assert_eq!(agent_line_level("a b c ERROR late"), tracing::Level::INFO);
        assert_eq!(agent_line_level(""), tracing::Level::INFO);
    }

    #[tokio::test]
    async fn a_failed_start_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut c = SandboxConfig::new("bad", "/bin/true", "/bin/true", "/bin/true", "/bin/true");
        c.run_root = tmp.path().join("root");
        c.start_timeout = Duration::from_secs(20);
        // Neither "virtiofsd" creates a socket: start fails, naming it.
        let err = Sandbox::start(c.clone()).await.expect_err("failed");
        if nix::unistd::geteuid().is_root() {
            assert_eq!(err.step(), "starting virtiofsd");
            assert!(err.message().contains("virtiofsd (pid"), "{err}");
            assert!(err.message().contains("exit status 0"), "{err}");
        } else {
            // Without CAP_SYS_ADMIN the share's first mount fails.
            assert_eq!(err.step(), "setting up the share", "{err}");
        }
        assert!(
            !c.run_root.join("_direct/bad").exists(),
            "run dir left behind"
        );

        // A missing binary is named before anything is made.
        c.vmm = tmp.path().join("no-vmm");
        let err = Sandbox::start(c.clone()).await.expect_err("failed");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.message().contains("no-vmm"), "{err}");

        // An existing directory is someone else's: refused and kept.
        c.vmm = "/bin/true".into();
        std::fs::create_dir_all(c.run_root.join("_direct/bad")).expect("mkdir");
        let err = Sandbox::start(c.clone()).await.expect_err("failed");
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert!(c.run_root.join("_direct/bad").exists());

        // A CRI id (64 characters) under a long run root: its sockets
        // would not fit a Unix socket address. Refused, naming the root,
        // before anything is made.
        let mut long = c.clone();
        long.id = "a".repeat(64);
        long.run_root = tmp
            .path()
            .join("a-run-root-too-long-for-sockets-even-under-_hashed-sandbox-dirs");
        let err = Sandbox::start(long.clone()).await.expect_err("failed");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.message().contains("shorten the run root"), "{err}");
        assert!(!long.run_root.exists(), "the run root was made");

        c.id = "../x".into();
        let err = Sandbox::start(c).await.expect_err("failed");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    /// An agent whose WaitProcess never answers and whose WaitEvent
    /// reports one OOM once `release` is notified (so a test can subscribe
    /// first), then never answers.
    struct FakeAgent {
        release: Arc<tokio::sync::Notify>,
    }

    #[async_trait::async_trait]
    impl isola_protocol::Agent for FakeAgent {
        async fn wait_process(
            &self,
            _: &ttrpc::r#async::TtrpcContext,
            _: pb::WaitProcessRequest,
        ) -> ttrpc::Result<pb::WaitProcessResponse> {
            std::future::pending().await
        }
        async fn wait_event(
            &self,
            _: &ttrpc::r#async::TtrpcContext,
            req: pb::WaitEventRequest,
        ) -> ttrpc::Result<pb::WaitEventResponse> {
            if req.after == 0 {
                self.release.notified().await;
                let mut resp = pb::WaitEventResponse::new();
                resp.seq = 1;
                resp.set_oom(pb::OomKilled {
                    container_id: "web".into(),
                    ..Default::default()
                });
                return Ok(resp);
            }
            std::future::pending().await
        }
    }

    fn sh(script: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    /// A sandbox whose "VMM" and "virtiofsd" are shell sleeps and whose
    /// agent is [`FakeAgent`] on a Unix socket.
    async fn fake_sandbox(
        tmp: &Path,
    ) -> (
        Sandbox,
        ttrpc::asynchronous::Server,
        Arc<tokio::sync::Notify>,
    ) {
        let release = Arc::new(tokio::sync::Notify::new());
        let layout = Layout::new(tmp.join("sb"));
        std::fs::create_dir_all(layout.rw().join("containers")).expect("mkdir");
        std::fs::write(layout.dir().join("fs.sock"), b"").expect("file");
        let address = format!("unix://{}", tmp.join("agent.sock").display());
        let mut server = ttrpc::asynchronous::Server::new()
            .bind(&address)
            .expect("bind")
            .register_service(isola_protocol::create_agent(Arc::new(FakeAgent {
                release: release.clone(),
            })));
        server.start().await.expect("serve");
        let client = ttrpc::asynchronous::Client::connect(&address)
            .await
            .expect("connect");
        let resources = Resources {
            sandbox: "fake".into(),
            layout,
            virtiofsd: Some(
                Supervised::spawn("virtiofsd", "fake", sh("sleep 100")).expect("spawn"),
            ),
            vmm: Some(Supervised::spawn("isola-vmm", "fake", sh("sleep 100")).expect("spawn")),
            network: Mutex::new(None),
            late: tokio::sync::Mutex::new(None),
            owns_dir: true,
            finished: AtomicBool::new(false),
            teardown_lock: tokio::sync::Mutex::new(()),
            cleaned: watch::channel(false).0,
            dropped_log_lines: Arc::new(AtomicU64::new(0)),
            jail_uid: None,
            from_template: None,
        };
        let mut config = SandboxConfig::new("fake", "/vmm", "/vfsd", "/k", "/i");
        config.stop_timeout = Duration::from_secs(5);
        let sandbox = Sandbox::assemble(
            config,
            resources,
            AgentClient::new(client),
            ("fake".into(), isola_protocol::API_VERSION),
            Vec::new(),
            None,
        );
        (sandbox, server, release)
    }

    fn kill9(pids: &[(String, u32)], name: &str) -> u32 {
        let pid = pids
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .expect("pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill");
        pid
    }

    async fn dead_reason(sandbox: &Sandbox) -> String {
        let mut events = sandbox.events();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), events.recv())
                .await
                .expect("an event")
                .expect("received")
            {
                Event::SandboxDead { reason } => return reason,
                _ => continue,
            }
        }
    }

    /// virtiofsd ends when the VMM does and may be reaped first: the VMM
    /// is still the death reported.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_virtiofsd_that_ends_with_the_vmm_does_not_hide_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (sandbox, _server, _release) = fake_sandbox(tmp.path()).await;
        let pids = sandbox.helper_pids();
        let reason = {
            let dead = dead_reason(&sandbox);
            kill9(&pids, "virtiofsd");
            let vmm = kill9(&pids, "isola-vmm");
            let reason = dead.await;
            assert!(
                reason.starts_with(&format!("isola-vmm (pid {vmm})")),
                "{reason}"
            );
            reason
        };
        let err = sandbox.stats("web").await.expect_err("dead");
        assert!(err.message().contains(&reason), "{err}");
    }

    /// virtiofsd dying alone is the death reported.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_virtiofsd_death_alone_is_reported_as_such() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (sandbox, _server, _release) = fake_sandbox(tmp.path()).await;
        let pids = sandbox.helper_pids();
        let dead = dead_reason(&sandbox);
        let vfsd = kill9(&pids, "virtiofsd");
        let reason = dead.await;
        assert!(
            reason.starts_with(&format!("virtiofsd (pid {vfsd})")),
            "{reason}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_vmm_fails_pending_calls_and_cleans_up() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (sandbox, _server, release) = fake_sandbox(tmp.path()).await;
        let mut events = sandbox.events();
        release.notify_one();
        let dir = sandbox.dir().to_path_buf();
        let pids = sandbox.helper_pids();
        let pending = {
            let sandbox = sandbox.clone();
            tokio::spawn(async move { sandbox.wait("web", "").await })
        };
        // The event loop publishes the agent's events.
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .expect("an event")
            .expect("received");
        assert_eq!(
            event,
            Event::Oom {
                container_id: "web".into()
            }
        );

        let vmm = kill9(&pids, "isola-vmm");
        let err = tokio::time::timeout(Duration::from_secs(20), pending)
            .await
            .expect("the pending call ended")
            .expect("joined")
            .expect_err("failed");
        assert_eq!(err.kind(), ErrorKind::Dead);
        assert_eq!(err.sandbox(), "fake");
        assert_eq!(err.container(), Some("web"));
        assert_eq!(
            err.message(),
            format!(
                "the sandbox is dead: isola-vmm (pid {vmm}) ended: killed by signal 9 (SIGKILL)"
            )
        );
        // Later calls fail the same way, at once.
        let err = sandbox.stats("web").await.expect_err("dead");
        assert_eq!(err.kind(), ErrorKind::Dead);
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .expect("an event")
            .expect("received");
        assert!(matches!(event, Event::SandboxDead { reason } if reason.contains("isola-vmm")));

        tokio::time::timeout(Duration::from_secs(30), sandbox.wait_cleaned_up())
            .await
            .expect("cleaned up");
        assert!(!dir.exists(), "the run dir is left");
        for (name, pid) in &pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            assert!(
                stat.is_empty() || stat.contains(") Z"),
                "{name} {pid} still runs: {stat}"
            );
        }
        // stop after a death: nothing more to do.
        sandbox.stop().await.expect("stop");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_last_handle_kills_and_removes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (sandbox, _server, _release) = fake_sandbox(tmp.path()).await;
        let dir = sandbox.dir().to_path_buf();
        let pids = sandbox.helper_pids();
        let clone = sandbox.clone();
        drop(sandbox);
        assert!(dir.exists(), "a clone still holds it");
        drop(clone);
        assert!(!dir.exists(), "dropped, yet the run dir is left");
        let until = std::time::Instant::now() + Duration::from_secs(20);
        for (name, pid) in &pids {
            while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                assert!(
                    std::time::Instant::now() < until,
                    "{name} {pid} still there"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    #[test]
    fn mount_points_are_made_inside_a_read_only_rootfs() {
        let root = tempfile::tempdir().expect("tempdir");
        let host = tempfile::tempdir().expect("tempdir");
        std::fs::write(host.path().join("file"), b"x").expect("file");
        std::fs::create_dir_all(root.path().join("etc")).expect("etc");
        // A link that would leave the rootfs stays inside it.
        std::os::unix::fs::symlink("/../../etc", root.path().join("escape")).expect("link");
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [
                {"destination": "/data/deep", "type": "bind", "source": host.path(), "options": ["rbind"]},
                {"destination": "/etc/one", "type": "bind", "source": host.path().join("file"), "options": ["rbind"]},
                {"destination": "/escape/x", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/etc", "type": "tmpfs", "source": "tmpfs"}
            ]
        }))
        .expect("spec");
        super::create_mount_points(root.path(), &spec).expect("mount points");
        assert!(root.path().join("data/deep").is_dir());
        assert!(root.path().join("etc/one").is_file());
        assert!(root.path().join("etc/x").is_dir());
    }
}
