//! CRI PortForward (`kubectl port-forward`) into a pod's VM.
//!
//! containerd's CRI plugin (1.6 and 1.7,
//! `pkg/cri/server/sandbox_portforward_linux.go`) serves PortForward by
//! dialing `localhost:<port>` (tcp4 first, then tcp6) from inside the pod's
//! network namespace. With isola that namespace holds only the veth and
//! the tap; the pod's processes listen in the guest, so the dial would be
//! refused (Kata Containers has this gap). When the pod network is
//! plumbed, isola adds to that namespace:
//!
//! - a listener on `127.0.0.1` (an ephemeral port), which the sandbox
//!   serves ([`spawn`]);
//! - one nat rule, first in `OUTPUT`: `-p tcp -d 127.0.0.1/32 -j REDIRECT
//!   --to-ports <it>`, so that a connection to any port of 127.0.0.1 lands
//!   on it (first, so that a stale rule of an earlier, killed shim never
//!   wins).
//!
//! Each accepted connection's original destination (`SO_ORIGINAL_DST`)
//! names the port; it becomes a `port <n>` stream to the agent
//! (`isola_protocol::stream`), which connects to `127.0.0.1:<n>` in the
//! guest's sandbox namespace, and the bytes flow both ways with each side's
//! EOF passed on. A port nothing listens on in the guest closes the
//! connection at once (containerd sees it end, not a refusal). `[::1]` is
//! not redirected: containerd tries IPv4 first, and the agent tries the
//! guest's `[::1]` when its `127.0.0.1` refuses.
//!
//! The rule goes with the pod network's tc redirects
//! (`PodNetwork::teardown`), or with the namespace. Without a working
//! `iptables` the pod runs without port forwarding (a warning), not
//! without its VM. At most [`MAX_CONNECTIONS`] forwards at once, each with
//! two fixed buffers.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use isola_protocol::stream::StreamKind;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

/// Forwarded connections open at once, at most; more are closed.
pub const MAX_CONNECTIONS: usize = 64;
/// The copy buffer of each direction of a forward.
const COPY_BUFFER: usize = 32 * 1024;
/// Where `iptables` is looked for after `PATH` (containerd may run the
/// shim with a `PATH` without the sbin directories).
const IPTABLES_DIRS: [&str; 3] = ["/usr/sbin", "/sbin", "/usr/local/sbin"];

/// The `iptables` binary: in an absolute directory of `PATH` (an empty or
/// relative entry would name the working directory), else in
/// [`IPTABLES_DIRS`].
fn iptables() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .chain(IPTABLES_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join("iptables"))
        .find(|candidate| candidate.is_file())
}

/// iptables' arguments that insert (first in the chain) or delete the
/// redirect of TCP to 127.0.0.1 onto `port`.
pub(crate) fn rule_args(insert: bool, port: u16) -> Vec<String> {
    let op: &[&str] = if insert {
        &["-I", "OUTPUT", "1"]
    } else {
        &["-D", "OUTPUT"]
    };
    let rule = [
        "-p",
        "tcp",
        "-d",
        "127.0.0.1/32",
        "-j",
        "REDIRECT",
        "--to-ports",
    ];
    ["-w", "10", "-t", "nat"]
        .iter()
        .chain(op)
        .chain(&rule)
        .map(|s| s.to_string())
        .chain([port.to_string()])
        .collect()
}

fn run_iptables(args: &[String]) -> Result<(), String> {
    let binary = iptables().ok_or_else(|| {
        format!(
            "iptables is not installed (looked on PATH and in {})",
            IPTABLES_DIRS.join(", ")
        )
    })?;
    let out = std::process::Command::new(&binary)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", binary.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(format!(
        "{} {}: {} {}",
        binary.display(),
        args.join(" "),
        out.status,
        stderr.trim().chars().take(300).collect::<String>()
    ))
}

/// In the calling thread's network namespace (a pod netns thread): a
/// listener on 127.0.0.1 and the nat rule that redirects TCP to 127.0.0.1
/// onto it: the listener (non-blocking) and its port, the rule's.
pub(crate) fn listen_and_redirect() -> Result<(TcpListener, u16), String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("listening on 127.0.0.1: {e}"))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("the listener's address: {e}"))?
        .port();
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("the listener: {e}"))?;
    run_iptables(&rule_args(true, port))?;
    Ok((listener, port))
}

/// In the calling thread's network namespace: removes the rule of
/// [`listen_and_redirect`] for `port`.
pub(crate) fn remove_redirect(port: u16) -> Result<(), String> {
    run_iptables(&rule_args(false, port))
}

/// The port a redirected connection was made to (`SO_ORIGINAL_DST`).
fn original_port(conn: &TcpStream) -> io::Result<u16> {
    let addr = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::OriginalDst)?;
    Ok(u16::from_be(addr.sin_port))
}

/// Serves `listener` (from [`listen_and_redirect`]) on the current tokio
/// runtime until aborted: each connection goes to the guest's port it was
/// made to, through the agent's stream port on the hybrid vsock socket
/// `vsock`.
pub fn spawn(listener: TcpListener, vsock: PathBuf, sandbox: String) -> io::Result<AbortHandle> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let (conn, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(%sandbox, %err, "port-forward: accepting");
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%sandbox, "port-forward: {MAX_CONNECTIONS} connections open; one more closed");
                continue;
            };
            let port = match original_port(&conn) {
                Ok(port) => port,
                Err(err) => {
                    tracing::warn!(%sandbox, %err, "port-forward: a connection without its original destination");
                    continue;
                }
            };
            let (vsock, sandbox) = (vsock.clone(), sandbox.clone());
            tokio::spawn(async move {
                match forward(conn, port, &vsock).await {
                    Ok((to_guest, to_host)) => {
                        tracing::debug!(%sandbox, port, to_guest, to_host, "port-forward ended")
                    }
                    Err(err) => tracing::info!(%sandbox, port, %err, "port-forward"),
                }
                drop(slot);
            });
        }
    })
    .abort_handle())
}

/// Joins `conn` to guest port `port`: (bytes to the guest, bytes back).
async fn forward(mut conn: TcpStream, port: u16, vsock: &Path) -> io::Result<(u64, u64)> {
    let mut stream = crate::stdio::open_stream(vsock, StreamKind::Port(port)).await?;
    tokio::io::copy_bidirectional_with_sizes(&mut conn, &mut stream, COPY_BUFFER, COPY_BUFFER).await
}

#[cfg(test)]
mod tests {
    use isola_protocol::stream::read_line;
    use isola_protocol::STREAM_VSOCK_PORT;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    use super::*;

    #[test]
    fn the_rule_redirects_tcp_to_localhost_onto_the_listener() {
        assert_eq!(
            rule_args(true, 40123).join(" "),
            "-w 10 -t nat -I OUTPUT 1 -p tcp -d 127.0.0.1/32 -j REDIRECT --to-ports 40123"
        );
        assert_eq!(
            rule_args(false, 1).join(" "),
            "-w 10 -t nat -D OUTPUT -p tcp -d 127.0.0.1/32 -j REDIRECT --to-ports 1"
        );
    }

    /// A stand-in for isola-vmm's hybrid socket and the agent: answers
    /// CONNECT, expects the port header, answers `ok` and echoes in upper
    /// case until EOF.
    async fn fake_agent(listener: UnixListener, want_port: u16) {
        let (mut s, _) = listener.accept().await.expect("accept");
        let line = read_line(&mut s).await.expect("read").expect("line");
        assert_eq!(line, format!("CONNECT {STREAM_VSOCK_PORT}\n").into_bytes());
        s.write_all(b"OK 1073741824\n").await.expect("ok");
        let header = read_line(&mut s).await.expect("read").expect("header");
        assert_eq!(header, StreamKind::Port(want_port).header().into_bytes());
        s.write_all(b"ok\n").await.expect("ok");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read");
        s.write_all(&got.to_ascii_uppercase()).await.expect("echo");
    }

    #[tokio::test]
    async fn a_connection_becomes_a_port_stream_both_ways() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vsock = dir.path().join("vsock.sock");
        let agent = tokio::spawn(fake_agent(UnixListener::bind(&vsock).expect("bind"), 8080));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(b"hello").await.expect("write");
            c.shutdown().await.expect("shutdown");
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.expect("read");
            got
        });
        let (conn, _) = listener.accept().await.expect("accept");
        let (to_guest, to_host) = forward(conn, 8080, &vsock).await.expect("forward");
        assert_eq!((to_guest, to_host), (5, 5));
        assert_eq!(client.await.expect("client"), b"HELLO");
        agent.await.expect("agent");
    }

    #[tokio::test]
    async fn a_refused_port_ends_the_connection_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vsock = dir.path().join("vsock.sock");
        let unix = UnixListener::bind(&vsock).expect("bind");
        tokio::spawn(async move {
            let (mut s, _) = unix.accept().await.expect("accept");
            read_line(&mut s).await.expect("read");
            s.write_all(b"OK 1\n").await.expect("ok");
            read_line(&mut s).await.expect("read");
            s.write_all(b"error connecting to 127.0.0.1:81: refused\n")
                .await
                .expect("error");
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (conn, _) = listener.accept().await.expect("accept");
        let err = forward(conn, 81, &vsock).await.expect_err("refused");
        assert!(
            err.to_string().contains("port stream to 81")
                && err.to_string().contains("connecting to 127.0.0.1:81"),
            "{err}"
        );
    }
}
