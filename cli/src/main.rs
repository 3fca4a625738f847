//! `isola`: the command line over isola's sandbox library.
//!
//! `isola run` runs one container in a fresh microVM, relays its stdio and
//! exits with its status; `isola check` says whether this host can run
//! isola and what to fix.

mod agentstats;
mod check;
mod cleanup;
mod debug;
mod host;
mod logs;
mod lookup;
mod monitor;
mod pod;
mod ps;
mod setup;
mod spec;
mod tty;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use isola_sandbox::rootfs::{env_path, find_command};
use isola_sandbox::{ContainerRequest, Sandbox, SandboxConfig, StdioRequest, Volume};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};

/// The status `isola run` exits with when it failed itself (not the
/// container), as `docker run` does.
const FAILED: i32 = 125;

/// The id of the one container of an `isola run` sandbox.
const CONTAINER_ID: &str = "main";

#[derive(Debug, Parser)]
#[command(name = "isola", version, about = "isola: containers in KVM microVMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs one container in a fresh microVM and exits with its status
    /// (128+N when a signal N killed it).
    Run(Box<RunArgs>),
    /// Checks that this host can run isola: one line per check, `ok` or
    /// `FAIL` with the fix.
    ///
    /// KVM (hardware virtualization, not PVM), /dev/kvm, /dev/net/tun,
    /// transparent huge pages, the config, isola-vmm, the guest kernel and
    /// initrd (and that the initrd's agent is isola-vmm's version),
    /// virtiofsd, containerd and the shim. Exits 0 only when every check
    /// passes.
    Check(CheckArgs),
    /// Runs a Pod manifest (a subset of v1.Pod) through containerd's CRI
    /// the way kubelet does: apply, status, exec, logs, stats, restart,
    /// delete. For trying isola on a node without a cluster.
    Pod(Box<pod::PodArgs>),
    /// Lists every sandbox on the node, whoever runs it (the shim,
    /// `isola run`): its state, containers (state, guest pid), VM size,
    /// uptime, host PSS and the host pids of its runner, isola-vmm and
    /// virtiofsd; a sandbox whose runner is gone is reported with what it
    /// left. Reads only.
    Ps(PsArgs),
    /// Removes what a sandbox whose runner is gone left behind (`isola
    /// ps`: dead (leftovers)): its helpers, mounts, run directory and host
    /// cgroup, as containerd's clean-up after a dead shim does. Refuses a
    /// sandbox whose runner still runs.
    Cleanup(CleanupArgs),
    /// A shell (or `-- CMD`) in a sandbox's guest: the guest's own
    /// namespaces, outside every container (their root file systems under
    /// /run/isola/share/containers/<id>/rootfs), with a static busybox the
    /// host serves. Off unless the node's config has `debug.console =
    /// true` when the sandbox starts; each session is logged in the guest
    /// with who asked. Exits with the command's status.
    Debug(DebugArgs),
    /// Prints a sandbox's agent log (or, with --guest-console, its guest's
    /// serial console) from the files its runner keeps in its run
    /// directory, the rotated file first; --follow goes on until the
    /// sandbox is removed.
    Logs(LogsArgs),
    /// Serves the node's sandboxes as Prometheus metrics on `GET /metrics`
    /// (one process per node): per sandbox isola-vmm's counters, the
    /// guest's CPU and memory, each container's cgroup, the host processes'
    /// CPU and memory, start-up phase durations; node totals. Every
    /// sandbox is asked concurrently, each within --timeout-ms: one that
    /// hangs never holds a scrape longer.
    Monitor(MonitorArgs),
    /// Sets a node up for isola: `isola setup containerd` adds isola's
    /// runtime to containerd's config (version 2 or 3), keeping everything
    /// else; `--remove` takes it out.
    Setup(setup::SetupArgs),
}

#[derive(Debug, Args)]
struct PsArgs {
    #[command(flatten)]
    roots: RootArgs,
    /// One JSON array instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct CleanupArgs {
    /// The sandbox's id (as `isola ps` lists it).
    id: String,
    /// Its containerd namespace, when the id is in more than one.
    #[arg(long)]
    namespace: Option<String>,
    #[command(flatten)]
    roots: RootArgs,
}

#[derive(Debug, Args)]
struct DebugArgs {
    /// The sandbox's id (as `isola ps` lists it).
    id: String,
    /// Its containerd namespace, when the id is in more than one.
    #[arg(long)]
    namespace: Option<String>,
    /// Pipes for stdio even when stdin and stdout are a terminal.
    #[arg(short = 'T', long)]
    no_tty: bool,
    #[command(flatten)]
    roots: RootArgs,
    /// The command to run instead of a shell (after `--`).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct LogsArgs {
    /// The sandbox's id (as `isola ps` lists it).
    id: String,
    /// Its containerd namespace, when the id is in more than one.
    #[arg(long)]
    namespace: Option<String>,
    /// The guest's serial console (kernel warnings and errors, panics)
    /// instead of the agent's log.
    #[arg(long)]
    guest_console: bool,
    /// Go on printing lines as they come, until the sandbox is removed.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only the last N lines of what is there.
    #[arg(long, value_name = "N")]
    tail: Option<usize>,
    #[command(flatten)]
    roots: RootArgs,
}

#[derive(Debug, Args)]
struct RootArgs {
    /// The config file whose run root is read (default: $ISOLA_CONFIG,
    /// else /etc/isola/config.toml, else the built-in defaults).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Read this run root instead (repeatable).
    #[arg(long, value_name = "DIR")]
    run_root: Vec<PathBuf>,
}

impl RootArgs {
    /// The run roots and the config.
    fn resolve(&self) -> Result<(Vec<PathBuf>, isola_sandbox::config::Config)> {
        let config = isola_sandbox::config::Config::load(self.config.as_deref())?;
        if !self.run_root.is_empty() {
            return Ok((self.run_root.clone(), config));
        }
        let mut roots = vec![config.runtime.run_root.clone()];
        let direct = PathBuf::from(isola_sandbox::DEFAULT_RUN_ROOT);
        if !roots.contains(&direct) {
            roots.push(direct);
        }
        Ok((roots, config))
    }
}

/// `isola debug`; the exit status: the command's, or 125 when isola
/// failed.
fn debug_command(args: DebugArgs) -> i32 {
    let found = args.roots.resolve().and_then(|(roots, config)| {
        debug::check_enabled(&config)?;
        lookup::find(&roots, &args.id, args.namespace.as_deref())
    });
    let found = match found {
        Ok(found) => found,
        Err(err) => {
            eprintln!("isola: debug: {err:#}");
            return FAILED;
        }
    };
    let options = debug::Options {
        command: args.command,
        no_tty: args.no_tty,
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("isola: debug: starting the runtime: {err}");
            return FAILED;
        }
    };
    let code = match runtime.block_on(debug::run(&found, &options)) {
        Ok(code) => code,
        Err(err) => {
            tty::restore();
            eprintln!("isola: debug: {err:#}");
            FAILED
        }
    };
    // stdin's copy may still wait for a read.
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

/// `isola logs`; the exit status.
fn logs_command(args: LogsArgs) -> i32 {
    let options = logs::Options {
        guest_console: args.guest_console,
        follow: args.follow,
        tail: args.tail,
    };
    let result = args.roots.resolve().and_then(|(roots, _)| {
        let found = lookup::find(&roots, &args.id, args.namespace.as_deref())?;
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        logs::run(&found, &options, &mut out)
    });
    match result {
        Ok(()) => 0,
        // Its reader went away (`isola logs ... | head`): done.
        Err(err)
            if err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            0
        }
        Err(err) => {
            eprintln!("isola: logs: {err:#}");
            1
        }
    }
}

/// `isola cleanup`; the exit status.
fn cleanup_command(args: CleanupArgs) -> i32 {
    let result = args.roots.resolve().and_then(|(roots, config)| {
        let helpers = config.helper_names();
        cleanup::run(&roots, &args.id, args.namespace.as_deref(), &helpers)
    });
    match result {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("isola: cleanup: {err:#}");
            1
        }
    }
}

/// `isola ps`; the exit status.
fn ps_command(args: PsArgs) -> i32 {
    let roots = match args.roots.resolve() {
        Ok((roots, _)) => roots,
        Err(err) => {
            eprintln!("isola: ps: {err:#}");
            return 1;
        }
    };
    let entries = ps::collect(&roots);
    if args.json {
        match serde_json::to_string_pretty(&entries) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("isola: ps: {err}");
                return 1;
            }
        }
    } else {
        print!("{}", ps::table(&entries));
    }
    0
}

#[derive(Debug, Args)]
struct MonitorArgs {
    /// The address to serve on (e.g. 127.0.0.1:8090).
    #[arg(long, value_name = "ADDR")]
    listen: std::net::SocketAddr,
    /// How long each sandbox's isola-vmm and agent have to answer, per
    /// scrape (ms).
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    timeout_ms: u64,
    /// Sandboxes asked at once.
    #[arg(long, value_name = "N", default_value_t = 32)]
    concurrency: usize,
    #[command(flatten)]
    roots: RootArgs,
}

/// `isola monitor`; the exit status.
fn monitor_command(args: MonitorArgs) -> i32 {
    let roots = match args.roots.resolve() {
        Ok((roots, _)) => roots,
        Err(err) => {
            eprintln!("isola: monitor: {err:#}");
            return 1;
        }
    };
    monitor::run(monitor::Options {
        listen: args.listen,
        roots,
        timeout: Duration::from_millis(args.timeout_ms.clamp(10, 60_000)),
        concurrency: args.concurrency.clamp(1, 1024),
    })
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The config file (default: $ISOLA_CONFIG, else
    /// /etc/isola/config.toml, else the built-in defaults).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// containerd's socket.
    #[arg(long, value_name = "PATH", default_value = check::DEFAULT_CONTAINERD_ADDRESS)]
    containerd_address: PathBuf,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Guest images and helpers: --kernel, --initrd, --vmm, --virtiofsd, or \
    ISOLA_KERNEL, ISOLA_INITRD, ISOLA_VMM, ISOLA_VIRTIOFSD; by default the project's build \
    outputs next to this binary (target/release/.. -> build/vmlinux, build/initrd.img), then \
    /usr/local/share/isola. Exit status: the container's, or 125 when isola failed."
)]
struct RunArgs {
    /// The container's root file system: a directory (a default OCI spec,
    /// like `runc spec`'s, is built).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "bundle",
        required_unless_present = "bundle"
    )]
    rootfs: Option<PathBuf>,
    /// An OCI bundle: DIR/config.json and its root.path.
    #[arg(long, value_name = "DIR")]
    bundle: Option<PathBuf>,
    /// A terminal for the process (the host terminal goes raw; window size
    /// changes follow).
    #[arg(short = 't', long)]
    tty: bool,
    /// Keep stdin open and pass it to the process.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// The process's user and group, numeric. Without GID: the user's
    /// group in the rootfs's /etc/passwd; supplementary groups from its
    /// /etc/group.
    #[arg(long, value_name = "UID[:GID]", value_parser = spec::parse_user)]
    user: Option<(u32, Option<u32>)>,
    /// An environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_name = "K=V", value_parser = spec::parse_env)]
    env: Vec<String>,
    /// The process's working directory.
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// The container's hostname.
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// Make the container's root file system read-only.
    #[arg(long)]
    read_only: bool,
    /// Boot the VM even if a template VM of its shape is there (by default
    /// it starts as a clone of it, and the first run of a shape builds one
    /// beside its own boot).
    #[arg(long)]
    no_template: bool,
    /// A host directory in the container (repeatable); `:ro` makes it
    /// read-only.
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]", value_parser = Volume::parse)]
    volumes: Vec<Volume>,
    /// The VM's memory in MiB (the container's limits stay its spec's).
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    memory: u32,
    /// The VM's vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    virtiofsd: Option<PathBuf>,
    /// Where sandbox directories are made (each as DIR/_direct/ID).
    #[arg(long, value_name = "DIR", default_value = isola_sandbox::DEFAULT_RUN_ROOT)]
    run_root: PathBuf,
    /// The guest's serial console into this file (for debugging).
    #[arg(long, value_name = "FILE")]
    console: Option<PathBuf>,
    /// The agent's and virtiofsd's log level.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log_level: String,
    /// Seconds the microVM may take to boot.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    boot_timeout: u64,
    /// The command and its arguments (default: the bundle's, or `sh`).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// The tokio runtime of the commands that need one.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ISOLA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_target(false)
        .init();
}

fn main() {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Run(args) => *args,
        // No runtime, no logging: one line per check on stdout.
        Command::Check(args) => std::process::exit(check::run(&check::Options {
            config: args.config,
            containerd_address: args.containerd_address,
        })),
        Command::Pod(args) => {
            init_logging();
            std::process::exit(pod::run(*args))
        }
        Command::Setup(args) => std::process::exit(setup::run(args)),
        Command::Monitor(args) => {
            init_logging();
            std::process::exit(monitor_command(args))
        }
        Command::Ps(args) => std::process::exit(ps_command(args)),
        Command::Cleanup(args) => std::process::exit(cleanup_command(args)),
        Command::Logs(args) => std::process::exit(logs_command(args)),
        Command::Debug(args) => {
            init_logging();
            std::process::exit(debug_command(args))
        }
    };
    init_logging();
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("isola: error: starting the runtime: {err}");
            std::process::exit(FAILED);
        }
    };
    let code = match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(err) => {
            tty::restore();
            eprintln!("isola: error: {err:#}");
            FAILED
        }
    };
    tty::restore();
    // Not waiting for the runtime: a blocking read of our stdin may still
    // be pending, and nothing else is.
    std::process::exit(code);
}

/// Everything checked on the host before a VM is booted.
struct Plan {
    config: SandboxConfig,
    request: ContainerRequest,
}

fn plan(args: RunArgs) -> Result<Plan> {
    let (mut oci, rootfs) = match (&args.bundle, &args.rootfs) {
        (Some(bundle), _) => spec::load_bundle(bundle)?,
        (None, Some(rootfs)) => (spec::default_spec(rootfs), rootfs.clone()),
        (None, None) => bail!("--rootfs or --bundle is required"),
    };
    if !rootfs.is_dir() {
        bail!("the rootfs {} is not a directory", rootfs.display());
    }
    let flags = spec::ProcessFlags {
        args: args.command.clone(),
        terminal: args.tty,
        user: args.user,
        env: args.env.clone(),
        cwd: args.cwd.clone(),
        hostname: args.hostname.clone(),
        read_only: args.read_only,
    };
    spec::apply(&mut oci, &rootfs, &flags)?;
    let process = oci.process().clone().context("the spec has no process")?;
    let argv = process.args().clone().unwrap_or_default();
    let Some(command) = argv.first() else {
        bail!("no command: give one after `--`");
    };
    let env = process.env().clone().unwrap_or_default();
    find_command(
        &rootfs,
        command,
        &process.cwd().display().to_string(),
        env_path(&env),
    )
    .map_err(anyhow::Error::msg)?;
    let cwd = std::env::current_dir().context("the current directory")?;
    let volumes = args
        .volumes
        .iter()
        .map(|v| {
            let host = cwd.join(&v.host);
            if !host.exists() {
                bail!("volume {}: {} does not exist", v.guest, host.display());
            }
            Ok(Volume { host, ..v.clone() })
        })
        .collect::<Result<Vec<_>>>()?;

    let real = std::env::current_exe().context("finding this binary")?;
    let exe = host::run_as(
        std::env::args_os().next().as_deref(),
        &cwd,
        std::env::var_os("PATH").as_deref(),
        real.clone(),
    );
    let kernel = host::locate("guest kernel", &args.kernel, "ISOLA_KERNEL", || {
        host::image_candidates(&[&exe, &real], "vmlinux")
    })?;
    let initrd = host::locate("guest initrd", &args.initrd, "ISOLA_INITRD", || {
        host::image_candidates(&[&exe, &real], "initrd.img")
    })?;
    let vmm = host::locate("isola-vmm", &args.vmm, "ISOLA_VMM", || {
        host::vmm_candidates(&exe)
    })?;
    let virtiofsd = host::locate(
        "virtiofsd",
        &args.virtiofsd,
        "ISOLA_VIRTIOFSD",
        host::virtiofsd_candidates,
    )?;
    host::check_kvm()?;

    let id = sandbox_id();
    let mut config = SandboxConfig::new(&id, vmm, virtiofsd, kernel, initrd);
    config.vcpus = args.vcpus;
    config.memory_mib = args.memory;
    config.run_root = args.run_root.clone();
    config.log_level = args.log_level.clone();
    config.start_timeout = Duration::from_secs(args.boot_timeout.max(1));
    config.templates = !args.no_template;
    if let Some(hostname) = oci.hostname().clone() {
        config.hostname = hostname;
    }
    if let Some(console) = &args.console {
        config.console = isola_sandbox::Console::File(cwd.join(console));
    }
    let terminal = args.tty.then(tty::window_size);
    let request = ContainerRequest {
        id: CONTAINER_ID.to_string(),
        spec: oci,
        rootfs,
        volumes,
        stdio: StdioRequest {
            stdin: args.interactive,
            stdout: true,
            stderr: !args.tty,
            terminal,
        },
    };
    Ok(Plan { config, request })
}

/// `run-<pid>-<time>`: unique on this host.
fn sandbox_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("run-{}-{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

async fn run(args: RunArgs) -> Result<i32> {
    let tty = args.tty;
    let interactive = args.interactive;
    let plan = plan(args)?;
    let mut signals = Signals::new()?;

    // A signal while the VM boots ends the run; dropping the start undoes
    // what it made.
    let sandbox = tokio::select! {
        started = Sandbox::start(plan.config) => started?,
        sig = signals.next() => bail!("interrupted by signal {sig} while starting"),
    };
    let result = run_container(&sandbox, plan.request, tty, interactive, &mut signals).await;
    if let Err(err) = sandbox.stop().await {
        tracing::warn!(%err, "stopping the sandbox");
    }
    result
}

async fn run_container(
    sandbox: &Sandbox,
    request: ContainerRequest,
    tty: bool,
    interactive: bool,
    signals: &mut Signals,
) -> Result<i32> {
    let started = sandbox.create_container(request).await?;
    let mut io = started.io;
    // Raw mode only once the container exists, restored on every way out.
    let _raw = if tty { tty::RawMode::enter() } else { None };
    sandbox.start_container(CONTAINER_ID).await?;

    if let (true, Some(mut stdin)) = (interactive, io.stdin.take()) {
        tokio::spawn(async move {
            let mut host = tokio::io::stdin();
            if let Err(err) = tokio::io::copy(&mut host, &mut stdin).await {
                tracing::debug!(%err, "stdin copy ended");
            }
            let _ = stdin.shutdown().await;
        });
    }
    let wait = sandbox.wait_with_output(
        CONTAINER_ID,
        "",
        io.stdout.take(),
        io.stderr.take(),
        tokio::io::stdout(),
        tokio::io::stderr(),
    );
    tokio::pin!(wait);
    loop {
        tokio::select! {
            status = &mut wait => return Ok(status?.status),
            sig = signals.next() => {
                if sig == libc::SIGWINCH {
                    if tty {
                        let size = tty::window_size();
                        if let Err(err) = sandbox.resize_tty(CONTAINER_ID, "", size).await {
                            tracing::debug!(%err, "resizing the terminal");
                        }
                    }
                } else if let Err(err) = sandbox.signal(CONTAINER_ID, "", sig as u32, false).await {
                    tracing::warn!(%err, signal = sig, "forwarding a signal");
                }
            }
        }
    }
}

/// The signals `isola run` forwards (SIGINT, SIGTERM, SIGHUP, SIGQUIT) and
/// SIGWINCH.
struct Signals {
    streams: Vec<(i32, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new() -> Result<Signals> {
        let mut streams = Vec::new();
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGWINCH,
        ] {
            streams.push((
                sig,
                signal(SignalKind::from_raw(sig))
                    .with_context(|| format!("handling signal {sig}"))?,
            ));
        }
        Ok(Signals { streams })
    }

    /// The next signal received.
    async fn next(&mut self) -> i32 {
        let waits: Vec<_> = self
            .streams
            .iter_mut()
            .map(|(sig, stream)| {
                let sig = *sig;
                Box::pin(async move {
                    stream.recv().await;
                    sig
                })
            })
            .collect();
        isola_sandbox::child::first_of(waits).await
    }
}
