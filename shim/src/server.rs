//! The shim server: the Task service on containerd's socket for this
//! sandbox, under both names containerd uses for it (`containerd.task.v2.Task`,
//! containerd 1.6 to 2.x; `containerd.task.v3.Task`, 2.x's new API, whose
//! messages are the same), until Shutdown.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::Flags;
use containerd_shim_protos::shim_async::create_task;
use containerd_shim_protos::ttrpc::r#async::transport::Listener;
use containerd_shim_protos::ttrpc::r#async::Server;

use crate::service::Service;

/// Serves until the service asks to exit; the process's exit status.
pub async fn serve(flags: &Flags) -> i32 {
    match serve_inner(flags).await {
        Ok(()) => 0,
        Err(err) => {
            tracing::error!(%err, "shim server failed");
            eprintln!("{}: {err}", crate::RUNTIME_ID);
            1
        }
    }
}

async fn serve_inner(flags: &Flags) -> Result<(), String> {
    if flags.socket.is_empty() {
        return Err("no -socket to serve on".to_string());
    }
    let socket = flags
        .socket
        .strip_prefix("unix://")
        .unwrap_or(&flags.socket)
        .to_string();
    let Some(listener) = bind(Path::new(&socket))? else {
        // The sandbox's shim serves already: this container goes to it.
        tracing::info!(socket = %socket, "the sandbox's shim is already serving");
        signal_started();
        return Ok(());
    };
    let ttrpc_address = std::env::var("TTRPC_ADDRESS")
        .map_err(|_| "TTRPC_ADDRESS is not set (not run by containerd?)".to_string())?;
    let publisher = RemotePublisher::new(&ttrpc_address)
        .await
        .map_err(|e| format!("connecting to containerd's events at {ttrpc_address}: {e}"))?;
    let exit = Arc::new(ExitSignal::default());
    let socket_file = Arc::new(SocketFile::new(Path::new(&socket)));
    let service = Arc::new(Service::new(
        &flags.namespace,
        publisher,
        exit.clone(),
        Some(socket_file.clone()),
    ));
    let mut services = create_task(service.clone());
    for (name, svc) in create_task(service) {
        services.insert(name.replace(".task.v3.", ".task.v2."), svc);
    }
    let listener =
        Listener::try_from(listener).map_err(|e| format!("listening on {socket}: {e}"))?;
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(services);
    server
        .start()
        .await
        .map_err(|e| format!("starting the ttrpc server: {e}"))?;
    signal_started();
    tracing::info!(socket = %socket, pid = std::process::id(), "shim serving");
    tokio::spawn(log_signals());
    exit.wait().await;
    tracing::info!("shutting down");
    // Bounded: a client holding its connection must not keep us alive.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server.shutdown()).await;
    socket_file.remove();
    Ok(())
}

/// The server's socket file, removed only while it is still the one we
/// bound (a new shim of the same sandbox may have bound the path since).
#[derive(Debug)]
pub struct SocketFile {
    path: std::path::PathBuf,
    id: Option<(u64, u64)>,
}

impl SocketFile {
    pub fn new(path: &Path) -> SocketFile {
        use std::os::unix::fs::MetadataExt;
        SocketFile {
            path: path.to_path_buf(),
            id: std::fs::symlink_metadata(path)
                .ok()
                .map(|m| (m.dev(), m.ino())),
        }
    }

    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `path`, or returns None if a live server owns it. A stale socket
/// (its server gone) is replaced.
fn bind(path: &Path) -> Result<Option<UnixListener>, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    match UnixListener::bind(path) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Ok(None);
            }
            std::fs::remove_file(path)
                .map_err(|e| format!("removing the stale socket {}: {e}", path.display()))?;
            UnixListener::bind(path)
                .map(Some)
                .map_err(|e| format!("binding {}: {e}", path.display()))
        }
        Err(e) => Err(format!("binding {}: {e}", path.display())),
    }
}

/// Tells the `start` action that spawned us that we serve: it copies our
/// stdout until EOF, so stdout becomes stderr.
fn signal_started() {
    // SAFETY: dup2 on the process's own standard descriptors; no Rust
    // object owns fd 1.
    let rc = unsafe { libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) };
    if rc < 0 {
        tracing::warn!(err = %std::io::Error::last_os_error(), "could not detach stdout");
    }
}

/// containerd stops a shim with Shutdown; signals are only logged (SIGPIPE
/// from a FIFO whose reader left must not kill the sandbox).
async fn log_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut pipe)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::pipe()),
    ) else {
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM ignored: containerd stops a shim with Shutdown"),
            _ = int.recv() => tracing::info!("SIGINT ignored"),
            _ = pipe.recv() => {}
        }
    }
}
