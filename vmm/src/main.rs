//! isola-vmm: boots one microVM on KVM.
//!
//! ```text
//! isola-vmm --kernel PATH [--initrd PATH] [--cmdline STR] [--vcpus N]
//!           [--memory MIB] [--vsock SOCKET] [--console off|stdout|FILE]
//!           [--fs tag=TAG,socket=PATH[,queues=N,queue_size=N]]...
//!           [--net fd=N,mac=MAC | --net tap=NAME,mac=MAC]...
//!           [--api-socket PATH] [--jail uid=U,gid=G,root=DIR]
//! isola-vmm --check-jail --jail uid=U,gid=G,root=DIR
//! ```
//! Exits 0 when the guest powers off or reboots, or on SIGTERM/SIGINT
//! (the VM is stopped); non-zero with a message naming the problem
//! otherwise.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use isola_vmm::config::{Console, VmConfig, DEFAULT_CMDLINE};
use isola_vmm::devices::boot_timer::BootTimes;
use isola_vmm::devices::virtio::balloon::Balloon;
use isola_vmm::devices::virtio::fs::config::{check_unique_tags, FsConfig};
use isola_vmm::devices::virtio::fs::Fs;
use isola_vmm::devices::virtio::net::config::NetBackendSpec;
use isola_vmm::devices::virtio::net::config::{check_net_configs, NetConfig};
use isola_vmm::devices::virtio::net::Net;
use isola_vmm::devices::virtio::rng::Rng;
use isola_vmm::devices::virtio::vsock::{Vsock, FD_RESERVE, MAX_CONNECTIONS};
use isola_vmm::jail::{self, JailConfig};
use isola_vmm::vcpu::GuestExit;
use isola_vmm::vm::{raise_fd_limit, HostFiles, VirtioEntry, Vm};

/// The guest agent's vsock port (isola_protocol::AGENT_VSOCK_PORT): the
/// first answer the agent gives on it is the "agent ready" boot milestone.
const AGENT_VSOCK_PORT: u32 = 1024;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "isola-vmm",
    version,
    about = "isola's KVM microVM monitor: boots a Linux guest with a serial console, i8042 reset and virtio-mmio devices",
    after_help = "Exit status: 0 when the guest powers off or reboots, or when stopped by SIGTERM/SIGINT \
                  or the API; 1 on any error (the message names it)."
)]
struct Args {
    /// Guest kernel: an ELF vmlinux with a PVH entry (CONFIG_PVH) or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["check_jail", "restore"])]
    kernel: Option<PathBuf>,
    /// initrd (cpio, optionally compressed) handed to the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line. The VMM appends the console and virtio-mmio device parts.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs (1-32), one thread each.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    memory: u64,
    /// Hybrid vsock: Unix socket the host connects to (then writes
    /// `CONNECT <port>\n`); guest connections to CID 2 port P reach `<SOCKET>_P`.
    #[arg(long, value_name = "SOCKET")]
    vsock: Option<PathBuf>,
    /// Guest CID of the vsock device.
    #[arg(long, value_name = "CID", default_value_t = 3)]
    vsock_cid: u64,
    /// Where the serial console goes: off (no device at all), stdout, or a file.
    /// The guest never waits for the console: output that cannot be written
    /// in time is dropped (and counted in the API's `info` metrics).
    #[arg(long, value_name = "off|stdout|FILE", default_value = "stdout")]
    console: String,
    /// Most bytes written to a console FILE; the rest is dropped and counted.
    #[arg(long, value_name = "BYTES", default_value_t = isola_vmm::devices::console::DEFAULT_CONSOLE_LIMIT)]
    console_limit: u64,
    /// No virtio-rng device (by default the guest gets one, fed from the
    /// host's getrandom, so its CRNG is seeded early).
    #[arg(long)]
    no_rng: bool,
    /// No virtio-balloon device (by default the guest gets one that only
    /// reports its free pages, whose memory the host then frees).
    #[arg(long)]
    no_balloon: bool,
    /// A virtio-fs share served by a vhost-user back end (virtiofsd) listening
    /// on PATH; the guest mounts it with `mount -t virtiofs TAG DIR`. TAG is 1
    /// to 36 bytes and unique; queues (request queues, default 1) from 1 to 16;
    /// queue_size (default 1024) a power of two up to 1024. Repeatable. The
    /// back end is connected to at start; if it dies, the VMM exits with an
    /// error naming the tag.
    #[arg(long, value_name = "tag=TAG,socket=PATH[,queues=N,queue_size=N]")]
    fs: Vec<FsConfig>,
    /// A virtio-net device on a tap (at most 8; repeatable). `fd=N`: a tap
    /// the caller opened from /dev/net/tun with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR
    /// (in the pod's network namespace) and left open in isola-vmm as fd N
    /// (3 or more). `tap=NAME`: isola-vmm attaches to (or creates) the tap
    /// NAME in its own namespace. MAC is the guest's unicast address, e.g.
    /// 52:54:00:12:34:56. isola-vmm sets the vnet header size, the offloads
    /// the guest accepts and O_NONBLOCK; the interface's addresses and link
    /// state are the caller's. `offload=off` offers the guest no checksum
    /// or TSO offloads (default on).
    #[arg(
        long,
        value_name = "fd=N,mac=MAC[,offload=off]|tap=NAME,mac=MAC[,offload=off]"
    )]
    net: Vec<NetConfig>,
    /// Control API socket (JSON lines: info, pause, resume, shutdown, stop).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// No seccomp filters on the VMM's threads (for debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Confine the VMM (as root) before the guest runs: a pid namespace of
    /// its own under a supervisor that keeps this pid, its own mount, IPC,
    /// UTS and network namespaces, an empty read-only root (a tmpfs over
    /// DIR, an existing directory), user U and group G (not 0), no
    /// capabilities, no_new_privs. Everything the VM needs is opened
    /// before; taps must be `--net fd=N`.
    #[arg(long, value_name = "uid=U,gid=G,root=DIR")]
    jail: Option<JailConfig>,
    /// Enter the --jail, report what it is, and exit (no VM).
    #[arg(long, requires = "jail")]
    check_jail: bool,
    /// Boot a template VM: guest RAM lives in DIR/memory (DIR must exist
    /// and hold no memory or state.json), and the API's `snapshot` saves
    /// the VM into DIR/state.json and ends the VMM. Clones start from DIR
    /// with --restore.
    #[arg(long, value_name = "DIR", conflicts_with = "restore")]
    template: Option<PathBuf>,
    /// With --template: save the VM as soon as the guest is ready (its init
    /// writes the boot timer; isola's agent does once its API listens),
    /// with no API call; exit with an error if it is not within SECS.
    #[arg(long, value_name = "SECS", requires = "template")]
    save_when_ready: Option<u64>,
    /// Start as a clone of the template saved in DIR instead of booting:
    /// guest RAM is mapped copy-on-write from DIR/memory; vCPUs, memory,
    /// command line and the kinds and order of virtio devices are the
    /// template's (give the same --vsock/--fs/--net kinds, and no --rng or
    /// --balloon change). vsock streams of the template are reset.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "memory", "vsock_cid"]
    )]
    restore: Option<PathBuf>,
}

fn main() {
    let started = Instant::now();
    // Before any thread exists: every thread inherits the mask.
    if let Err(err) = isola_vmm::vm::block_exit_signals() {
        eprintln!("isola-vmm: error: blocking SIGTERM/SIGINT/SIGHUP: {err}");
        std::process::exit(1);
    }
    let args = Args::parse();
    if let Err(err) = check_unique_tags(&args.fs) {
        Args::command()
            .error(clap::error::ErrorKind::ValueValidation, err)
            .exit();
    }
    if let Err(err) = check_net_configs(&args.net) {
        Args::command()
            .error(clap::error::ErrorKind::ValueValidation, err)
            .exit();
    }
    if args.jail.is_some()
        && args
            .net
            .iter()
            .any(|n| !matches!(n.backend, NetBackendSpec::Fd(_)))
    {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--jail takes taps as --net fd=N only: a jailed VMM has no network namespace to find a tap NAME in",
            )
            .exit();
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_env("ISOLA_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if args.check_jail {
        let result = args
            .jail
            .as_ref()
            .context("--check-jail needs --jail")
            .and_then(|config| {
                jail::enter_pid_namespace(&[], None)?;
                jail::check(config)
            });
        match result {
            Ok(report) => {
                println!("{report}");
                std::process::exit(0);
            }
            Err(err) => {
                eprintln!("isola-vmm: error: the jail does not work here: {err:#}");
                std::process::exit(1);
            }
        }
    }
    match run(args, started) {
        Ok(exit) => {
            tracing::info!(?exit, ms = started.elapsed().as_millis() as u64, "VM ended");
            std::process::exit(0);
        }
        Err(err) => {
            eprintln!("isola-vmm: error: {err:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: Args, started: Instant) -> anyhow::Result<GuestExit> {
    // The jail's first phases: a pid namespace (this process stays outside
    // as the supervisor), then its other namespaces and its empty root.
    if let Some(config) = &args.jail {
        let taps: Vec<i32> = args
            .net
            .iter()
            .filter_map(|n| match n.backend {
                NetBackendSpec::Fd(fd) => Some(fd),
                _ => None,
            })
            .collect();
        // A template's state is renamed into place by the supervisor.
        let publish = match &args.template {
            Some(dir) => Some(
                jail::Publish::open(
                    dir,
                    isola_vmm::snapshot::STATE_PARTIAL,
                    isola_vmm::snapshot::STATE_FILE,
                )
                .context("--template")?,
            ),
            None => None,
        };
        jail::enter_pid_namespace(&taps, publish).context("jail: the pid namespace")?;
        jail::isolate(config).with_context(|| format!("jail: isolating ({config})"))?;
    }
    // The taps first: an inherited fd must be taken over before the VMM
    // opens anything of its own that could be mistaken for it.
    let mut nets = Vec::with_capacity(args.net.len());
    for net in &args.net {
        nets.push(Net::open(net)?);
    }
    let console: Console = args.console.parse()?;
    // A clone's template is opened (and its state read) once, here.
    let restored = match &args.restore {
        Some(dir) => Some(isola_vmm::snapshot::RestoreFiles::open(dir)?),
        None => None,
    };
    let mut config = match &restored {
        Some(files) => {
            let saved = &files.snapshot;
            VmConfig::for_restore(
                files.dir.clone(),
                saved.cmdline.clone(),
                saved.vcpus,
                saved.memory_mib,
                args.vsock,
                saved.vsock_cid,
                console,
                args.api_socket,
            )?
        }
        None => {
            let kernel = args.kernel.context("--kernel is required")?;
            VmConfig::new(
                kernel,
                args.initrd,
                Some(args.cmdline),
                args.vcpus,
                args.memory,
                args.vsock,
                args.vsock_cid,
                console,
                args.api_socket,
            )?
        }
    };
    config.template = args.template;
    config.save_when_ready = args.save_when_ready.map(std::time::Duration::from_secs);
    config.console_limit = args.console_limit;
    config.seccomp = !args.no_seccomp;
    config.jailed = args.jail.is_some();
    let boot_times = Arc::new(Mutex::new(BootTimes::default()));
    let mut virtio: Vec<VirtioEntry> = Vec::new();
    if let Some(path) = &config.vsock {
        let mut vsock = Vsock::new(config.vsock_cid, path.clone())
            .with_context(|| format!("vsock socket {}", path.display()))?;
        isola_vmm::metrics::set_vsock(vsock.metrics());
        // Every vsock stream is a host socket: make room for all of them.
        let want = (MAX_CONNECTIONS + FD_RESERVE) as u64;
        let soft = raise_fd_limit(want);
        if soft < want {
            let max = (soft as usize).saturating_sub(FD_RESERVE).max(16);
            tracing::warn!(
                open_file_limit = soft,
                max_connections = max,
                "the open-file limit is below what {MAX_CONNECTIONS} vsock streams need; capping them"
            );
            vsock.set_max_connections(max);
        }
        let times = boot_times.clone();
        vsock.set_first_response_hook(move |first| {
            if first.port == AGENT_VSOCK_PORT {
                let ms = first.at.saturating_duration_since(started);
                if let Ok(mut t) = times.lock() {
                    t.agent_ready.get_or_insert(ms);
                }
                tracing::info!(
                    ms = ms.as_millis() as u64,
                    "agent answered on vsock (boot to agent ready)"
                );
            }
        });
        if config.jailed {
            vsock.refuse_guest_connections();
        }
        let vsock = Arc::new(Mutex::new(vsock));
        virtio.push((vsock.clone(), vsock));
    }
    if !args.no_rng {
        let rng = Arc::new(Mutex::new(Rng::new().context("creating virtio-rng")?));
        virtio.push((rng.clone(), rng));
    }
    // Each share's back end is connected to now: one nobody serves is an
    // error before the VM is built. (The handshake starts a thread: after
    // the jail.)
    let mut shares = Vec::with_capacity(args.fs.len());
    for share in args.fs {
        let stream = Fs::dial(&share)?;
        shares.push((share, stream));
    }
    let host = HostFiles::open_with(&config, restored)?;
    if let Some(jail_config) = &args.jail {
        jail::lock_down(jail_config)
            .with_context(|| format!("jail: locking down ({jail_config})"))?;
        tracing::info!(uid = jail_config.uid, gid = jail_config.gid, "jailed");
    }
    for (share, stream) in shares {
        let fs = Arc::new(Mutex::new(Fs::on_stream(share, stream, config.seccomp)?));
        virtio.push((fs.clone(), fs));
    }
    for net in nets {
        let net = Arc::new(Mutex::new(net));
        virtio.push((net.clone(), net));
    }
    if !args.no_balloon {
        let balloon = Arc::new(Mutex::new(
            Balloon::new().context("creating virtio-balloon")?,
        ));
        virtio.push((balloon.clone(), balloon));
    }
    let vm = Vm::build_with(config, host, started, boot_times, virtio)?;
    match vm.run()? {
        GuestExit::Failed(why) => anyhow::bail!("the guest could not run: {why}"),
        other => Ok(other),
    }
}
