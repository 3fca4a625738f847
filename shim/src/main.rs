//! containerd-shim-isola-v2: containerd's shim v2 for isola. One shim
//! process serves one sandbox (a `ctr run` container, or a Kubernetes pod
//! and its containers) and runs its microVM through `isola_sandbox`.
//!
//! The actions containerd runs the binary with: `start` (start or find the
//! sandbox's shim server, print its address), `delete` (clean up after a
//! dead shim, print a DeleteResponse) and no action (serve the Task API on
//! `-socket`).

mod cleanup;
mod grouping;
mod host_cgroup;
mod logging;
mod metrics;
mod netns;
mod options;
mod server;
mod service;
mod sizing;
mod stdio;

use std::path::{Path, PathBuf};

use containerd_shim::asynchronous::spawn;
use containerd_shim::{Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::{Message, MessageField};
use isola_sandbox::config::Config;

/// containerd's name for this runtime.
pub const RUNTIME_ID: &str = "io.containerd.isola.v2";

/// SIGKILL's exit status, reported for a container cleaned up after its shim.
const KILLED_STATUS: u32 = 128 + 9;

fn bundle_of(flags: &Flags) -> PathBuf {
    if flags.bundle.is_empty() {
        std::env::current_dir().unwrap_or_default()
    } else {
        PathBuf::from(&flags.bundle)
    }
}

/// Starts (or finds) the shim server of the container's sandbox and
/// returns its address. A pod's container goes to the shim of its sandbox:
/// the grouping names the socket, and a second server finding it served
/// exits.
async fn start_server(opts: StartOpts, bundle: &Path) -> Result<String, String> {
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).ok();
    let annotations = spec.as_ref().and_then(|s| s.annotations().clone());
    let grouping = grouping::sandbox_id(&opts.id, annotations.as_ref());
    let address = spawn(opts, &grouping, Vec::new())
        .await
        .map_err(|e| format!("starting the shim server: {e}"))?;
    std::fs::write(bundle.join("address"), &address)
        .map_err(|e| format!("writing the shim's address: {e}"))?;
    Ok(address)
}

/// The `start` action, answered in the plain form every containerd since
/// 1.4 reads (the address alone).
async fn start_action(flags: &Flags) -> i32 {
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    let opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: if flags.address.is_empty() {
            env("GRPC_ADDRESS")
        } else {
            flags.address.clone()
        },
        ttrpc_address: env("TTRPC_ADDRESS"),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        ..Default::default()
    };
    if opts.ttrpc_address.is_empty() {
        eprintln!("{RUNTIME_ID}: start: TTRPC_ADDRESS is not set (not run by containerd?)");
        return 1;
    }
    match start_server(opts, &bundle_of(flags)).await {
        Ok(address) => {
            println!("{address}");
            0
        }
        Err(err) => {
            eprintln!("{RUNTIME_ID}: start: {err}");
            1
        }
    }
}

/// The `delete` action: containerd's clean-up of a container whose shim is
/// gone.
fn delete_action(flags: &Flags) -> i32 {
    let config = match Config::load(None) {
        Ok(config) => config,
        Err(err) => {
            tracing::warn!(%err, "using the default run root");
            Config::defaults()
        }
    };
    let helpers = config.helper_names();
    let report = cleanup::delete(
        &bundle_of(flags),
        &flags.id,
        &flags.namespace,
        &config.runtime.run_root,
        &helpers,
    );
    tracing::info!(container = %flags.id, sandbox = %report.sandbox, killed = ?report.killed, run_dir_removed = report.removed_run_dir, shim_alive = report.shim_alive, "delete action");
    let response = DeleteResponse {
        pid: 0,
        exit_status: KILLED_STATUS,
        exited_at: MessageField::some(service::timestamp(service::now_ns())),
        ..Default::default()
    };
    match response.write_to_bytes() {
        Ok(bytes) => {
            use std::io::Write;
            let mut out = std::io::stdout();
            if out.write_all(&bytes).and_then(|()| out.flush()).is_err() {
                return 1;
            }
            0
        }
        Err(err) => {
            eprintln!("{RUNTIME_ID}: delete: {err}");
            1
        }
    }
}

/// The most tokio worker threads a shim runs.
const MAX_WORKERS: usize = 2;

/// The runtime's worker threads: one per CPU as tokio's default, but at
/// most [`MAX_WORKERS`]. A shim serves one pod, whose work is waiting on
/// containerd, the guest and FIFOs; tokio's default would start a worker,
/// with its stack and malloc arena, per CPU of the node: a per-pod cost
/// that grows with the node (64 threads on a 64-CPU node).
fn worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS))
}

fn main() {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let flags = match containerd_shim::parse(&args) {
        Ok(flags) => flags,
        Err(err) => {
            eprintln!("{RUNTIME_ID}: {err}");
            std::process::exit(2);
        }
    };
    if flags.version {
        println!("{RUNTIME_ID} (isola) {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    logging::init(&flags);
    // The server keeps the sandbox's mounts (the share, the rootfs it
    // mounts) in a mount namespace of its own, entered before the runtime's
    // threads exist (`isola_sandbox::mount_ns`). `start` and `delete` stay
    // in the host's: `delete` cleans up there.
    if flags.action.is_empty() {
        if let Err(err) = isola_sandbox::mount_ns::enter_private() {
            eprintln!("{RUNTIME_ID}: {err}");
            tracing::error!(%err, "cannot enter a private mount namespace");
            std::process::exit(1);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("{RUNTIME_ID}: starting the runtime: {err}");
            std::process::exit(1);
        }
    };
    let code = match flags.action.as_str() {
        "start" => runtime.block_on(start_action(&flags)),
        "delete" => delete_action(&flags),
        "" => runtime.block_on(server::serve(&flags)),
        other => {
            eprintln!("{RUNTIME_ID}: unknown action {other:?} (start, delete)");
            2
        }
    };
    // The runtime's blocked tasks (a copy on a FIFO nobody reads) must not
    // keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}
