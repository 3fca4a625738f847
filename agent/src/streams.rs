//! Stdio and log streams on vsock port [`STREAM_VSOCK_PORT`] (the guest
//! side of `isola_protocol::stream`).
//!
//! A connection sends one header line. A `stdio <id>` stream is registered
//! under its id and answered `ok`; `CreateContainer`/`ExecProcess` claim it
//! by id. One that no RPC claims within [`UNCLAIMED_TIMEOUT`] is closed.
//! At most [`MAX_PENDING`] streams wait to be claimed; a duplicate id or
//! one past the limit is answered `error ...` and closed. A `log` stream
//! gets the agent's log (`logstream`). A `port <n>` stream is a TCP
//! connection the agent makes to `127.0.0.1:<n>` in the sandbox's network
//! namespace (from a short-lived thread that enters it) before it answers;
//! the two are then joined both ways (at most [`MAX_FORWARDS`] at once,
//! each with two fixed buffers), and each side's EOF is passed on.
//!
//! The copies between a process and its streams use one fixed buffer each
//! ([`COPY_BUFFER`]): a host that reads slowly fills the pipe and blocks
//! the process; nothing in the agent grows.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use isola_protocol::stream::{self, Answer, StreamKind, STREAM_VSOCK_PORT};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// How long a stream waits to be claimed.
pub const UNCLAIMED_TIMEOUT: Duration = Duration::from_secs(30);
/// Streams waiting to be claimed, at most.
pub const MAX_PENDING: usize = 256;
/// Connections still sending their header, at most.
const MAX_HANDSHAKES: usize = 64;
/// Time a connection has to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The copy buffer of each direction of each stream.
pub const COPY_BUFFER: usize = 32 * 1024;
/// Port streams joined at once, at most; more are refused.
pub const MAX_FORWARDS: usize = 256;
/// Time a port stream's TCP connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A permit per port stream being connected or joined (released on drop).
static FORWARDS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_FORWARDS);

/// Why a stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("stream {0} is already open")]
    Duplicate(u64),
    #[error("too many unclaimed streams ({MAX_PENDING})")]
    TooMany,
}

#[derive(Debug)]
struct Pending<S> {
    /// `None` while the `ok` is being written (the id is reserved).
    stream: Option<S>,
    deadline: Instant,
}

/// Streams waiting for the RPC that claims them.
#[derive(Debug)]
pub struct Registry<S> {
    pending: Mutex<HashMap<u64, Pending<S>>>,
    max_pending: usize,
    timeout: Duration,
}

impl<S> Registry<S> {
    pub fn new(max_pending: usize, timeout: Duration) -> Registry<S> {
        Registry {
            pending: Mutex::new(HashMap::new()),
            max_pending,
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending<S>>> {
        crate::lock(&self.pending)
    }

    /// Reserves `id` (before answering `ok`).
    pub fn reserve(&self, id: u64, now: Instant) -> Result<(), RegisterError> {
        let mut pending = self.lock();
        if pending.contains_key(&id) {
            return Err(RegisterError::Duplicate(id));
        }
        if pending.len() >= self.max_pending {
            return Err(RegisterError::TooMany);
        }
        pending.insert(
            id,
            Pending {
                stream: None,
                deadline: now + self.timeout,
            },
        );
        Ok(())
    }

    /// Puts the stream under its reserved id (after `ok` was written).
    pub fn fill(&self, id: u64, stream: S) {
        if let Some(p) = self.lock().get_mut(&id) {
            p.stream = Some(stream);
        }
    }

    /// Gives up a reservation (the `ok` could not be written).
    pub fn cancel(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Takes the stream `id`; `None` if no such stream waits.
    pub fn claim(&self, id: u64) -> Option<S> {
        let mut pending = self.lock();
        if pending.get(&id).is_some_and(|p| p.stream.is_some()) {
            return pending.remove(&id).and_then(|p| p.stream);
        }
        None
    }

    /// Whether `id` waits to be claimed.
    pub fn contains(&self, id: u64) -> bool {
        self.lock().get(&id).is_some_and(|p| p.stream.is_some())
    }

    /// Removes (and so closes) the streams whose time ran out; their ids.
    pub fn expire(&self, now: Instant) -> Vec<u64> {
        let mut pending = self.lock();
        let expired: Vec<u64> = pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            pending.remove(id);
        }
        expired
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The vsock stream type of the listener.
pub type Stream = tokio_vsock::VsockStream;

/// Listens on [`STREAM_VSOCK_PORT`] and serves connections on the current
/// runtime: stdio streams into `registry`, log streams to the log sink.
pub fn listen(registry: Arc<Registry<Stream>>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let addr = tokio_vsock::VsockAddr::new(libc::VMADDR_CID_ANY, STREAM_VSOCK_PORT);
    let listener = tokio_vsock::VsockListener::bind(addr)
        .with_context(|| format!("listening on vsock port {STREAM_VSOCK_PORT}"))?;
    tracing::info!(port = STREAM_VSOCK_PORT, "stream listener ready");
    let handshakes = Arc::new(AtomicUsize::new(0));
    spawn_sweeper(registry.clone());
    tokio::spawn(async move {
        loop {
            let (conn, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(err) => {
                    tracing::warn!(%err, "accepting a stream connection");
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if handshakes.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
                handshakes.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(?peer, "too many stream handshakes; connection closed");
                continue;
            }
            let registry = registry.clone();
            let handshakes = handshakes.clone();
            tokio::spawn(async move {
                handshake(conn, &registry, Path::new(crate::sandbox::NETNS)).await;
                handshakes.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Ok(())
}

/// Closes the streams nobody claimed in time, once a second.
fn spawn_sweeper(registry_sweep: Arc<Registry<Stream>>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for id in registry_sweep.expire(Instant::now()) {
                tracing::warn!(
                    stream = id,
                    timeout_s = UNCLAIMED_TIMEOUT.as_secs(),
                    "unclaimed stdio stream closed"
                );
            }
        }
    });
}

/// Reads a connection's header and registers, connects or refuses it;
/// `netns` is the sandbox's network namespace (for port streams).
pub async fn handshake<S>(mut conn: S, registry: &Registry<S>, netns: &Path)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header = match tokio::time::timeout(HEADER_TIMEOUT, stream::read_line(&mut conn)).await {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None)) => return,
        Ok(Err(err)) => {
            let _ = refuse(&mut conn, &err.to_string()).await;
            return;
        }
        Err(_) => {
            tracing::debug!("stream connection sent no header in time");
            return;
        }
    };
    match stream::parse_header(&header) {
        Ok(StreamKind::Stdio(id)) => match registry.reserve(id, Instant::now()) {
            Ok(()) => {
                if conn.write_all(Answer::Ok.line().as_bytes()).await.is_ok() {
                    registry.fill(id, conn);
                    tracing::debug!(stream = id, "stdio stream registered");
                } else {
                    registry.cancel(id);
                }
            }
            Err(err) => {
                tracing::warn!(stream = id, %err, "stdio stream refused");
                let _ = refuse(&mut conn, &err.to_string()).await;
            }
        },
        Ok(StreamKind::Log) => {
            if conn.write_all(Answer::Ok.line().as_bytes()).await.is_ok() {
                tracing::info!("log stream connected");
                crate::logstream::sink().attach(conn);
            }
        }
        Ok(StreamKind::Port(port)) => {
            let Ok(permit) = FORWARDS.try_acquire() else {
                let reason = format!("too many port streams ({MAX_FORWARDS})");
                let _ = refuse(&mut conn, &reason).await;
                return;
            };
            match connect_in(netns, port).await {
                Ok(tcp) => {
                    if conn.write_all(Answer::Ok.line().as_bytes()).await.is_ok() {
                        tracing::debug!(port, "port stream connected");
                        tokio::spawn(async move {
                            join(conn, tcp, port).await;
                            drop(permit);
                        });
                    }
                }
                Err(err) => {
                    tracing::debug!(port, error = %err, "port stream refused");
                    let _ = refuse(&mut conn, &err).await;
                }
            }
        }
        Err(err) => {
            let _ = refuse(&mut conn, &err.to_string()).await;
        }
    }
}

/// A TCP connection to `127.0.0.1:port` in the network namespace at
/// `netns`, made from a thread of its own that enters it (the namespace
/// of a socket is the one it was made in).
async fn connect_in(netns: &Path, port: u16) -> Result<tokio::net::TcpStream, String> {
    let netns = netns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("port-connect".into())
        .spawn(move || {
            let connected = (|| -> Result<std::net::TcpStream, String> {
                let ns = std::fs::File::open(&netns)
                    .map_err(|e| format!("the sandbox has no network namespace: {e}"))?;
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("entering the sandbox's network namespace: {e}"))?;
                let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
                // As containerd does on a host: IPv4, then IPv6 if refused.
                let tcp = match std::net::TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        std::net::TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT)
                            .map_err(|_| format!("connecting to 127.0.0.1:{port}: {e}"))?
                    }
                    other => other.map_err(|e| format!("connecting to 127.0.0.1:{port}: {e}"))?,
                };
                tcp.set_nonblocking(true)
                    .map_err(|e| format!("localhost:{port}: {e}"))?;
                Ok(tcp)
            })();
            let _ = tx.send(connected);
        })
        .map_err(|e| format!("starting a connect thread: {e}"))?;
    let tcp = rx
        .await
        .map_err(|_| "the connect thread ended".to_string())??;
    tokio::net::TcpStream::from_std(tcp).map_err(|e| format!("127.0.0.1:{port}: {e}"))
}

/// Copies between a port stream and its TCP connection both ways until
/// both directions ended (each EOF is passed on as a write shutdown).
async fn join<S>(mut stream: S, mut tcp: tokio::net::TcpStream, port: u16)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut tcp, COPY_BUFFER, COPY_BUFFER)
        .await
    {
        Ok((to_guest, to_host)) => {
            tracing::debug!(port, to_guest, to_host, "port stream ended");
        }
        Err(err) => tracing::debug!(port, %err, "port stream ended"),
    }
}

async fn refuse<S: AsyncWrite + Unpin>(conn: &mut S, reason: &str) -> io::Result<()> {
    conn.write_all(Answer::Error(reason.to_string()).line().as_bytes())
        .await?;
    conn.shutdown().await
}

/// Copies `from` to `to` until EOF of `from`, then shuts `to` down for
/// writing. One buffer of [`COPY_BUFFER`] bytes. Returns the bytes copied.
pub async fn copy_out<R, W>(mut from: R, mut to: W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            // A pty master reads EIO once every slave is closed.
            Err(err) if err.raw_os_error() == Some(libc::EIO) => break,
            Err(err) => return Err(err),
        };
        to.write_all(&buf[..n]).await?;
        total += n as u64;
    }
    to.shutdown().await?;
    Ok(total)
}

/// Copies `from` (a stdin stream) to `to` until EOF of `from` or until
/// `close` fires, then drops `to` (the process reads EOF).
pub async fn copy_in<R, W>(
    mut from: R,
    mut to: W,
    close: tokio::sync::oneshot::Receiver<()>,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    tokio::pin!(close);
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => read?,
            _ = &mut close => break,
        };
        if n == 0 {
            break;
        }
        tokio::select! {
            written = to.write_all(&buf[..n]) => written?,
            _ = &mut close => break,
        }
        total += n as u64;
    }
    let _ = to.flush().await;
    drop(to);
    Ok(total)
}

/// A non-blocking descriptor (a pipe end, a pty master) as async I/O.
#[derive(Debug)]
pub struct FdIo {
    fd: AsyncFd<OwnedFd>,
}

impl FdIo {
    /// Makes `fd` non-blocking and registers it with the runtime.
    pub fn new(fd: OwnedFd) -> io::Result<FdIo> {
        let flags = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: an OwnedFd is open until dropped, which only the AsyncFd
        // does, and always answers the same descriptor.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(FdIo { fd })
    }
}

impl AsyncRead for FdIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

#[cfg(test)]
mod tests {
    use tokio::net::UnixStream;

    use super::*;

    fn registry() -> Registry<u32> {
        Registry::new(2, Duration::from_secs(30))
    }

    #[test]
    fn a_stream_is_claimed_once() {
        let r = registry();
        let now = Instant::now();
        r.reserve(7, now).expect("reserve");
        assert_eq!(r.claim(7), None, "reserved, not filled yet");
        r.fill(7, 70);
        assert!(r.contains(7));
        assert_eq!(r.claim(7), Some(70));
        assert_eq!(r.claim(7), None, "claimed once");
        assert_eq!(r.claim(8), None, "unknown id");
    }

    #[test]
    fn duplicates_and_too_many_are_refused() {
        let r = registry();
        let now = Instant::now();
        r.reserve(1, now).expect("1");
        assert_eq!(r.reserve(1, now), Err(RegisterError::Duplicate(1)));
        r.reserve(2, now).expect("2");
        assert_eq!(r.reserve(3, now), Err(RegisterError::TooMany));
        r.cancel(2);
        r.reserve(3, now).expect("room again");
    }

    #[test]
    fn unclaimed_streams_expire() {
        let r = registry();
        let now = Instant::now();
        r.reserve(1, now).expect("1");
        r.fill(1, 10);
        r.reserve(2, now + Duration::from_secs(20)).expect("2");
        r.fill(2, 20);
        assert!(r.expire(now + Duration::from_secs(29)).is_empty());
        assert_eq!(r.expire(now + Duration::from_secs(30)), vec![1]);
        assert_eq!(r.claim(1), None);
        assert_eq!(r.claim(2), Some(20));
        assert_eq!(r.len(), 0);
    }

    async fn answer_of_half(host: &mut UnixStream) -> String {
        let line = stream::read_line(host)
            .await
            .expect("answer")
            .expect("a line");
        String::from_utf8(line).expect("text")
    }

    async fn answer_of(mut host: UnixStream) -> String {
        answer_of_half(&mut host).await
    }

    #[tokio::test]
    async fn handshakes_register_refuse_and_answer() {
        let registry: Registry<UnixStream> = Registry::new(8, UNCLAIMED_TIMEOUT);
        let (mut host, agent) = UnixStream::pair().expect("pair");
        host.write_all(StreamKind::Stdio(5).header().as_bytes())
            .await
            .expect("header");
        handshake(agent, &registry, Path::new("/nonexistent")).await;
        assert_eq!(answer_of(host).await, "ok\n");
        assert!(registry.contains(5));

        let (mut host, agent) = UnixStream::pair().expect("pair");
        host.write_all(StreamKind::Stdio(5).header().as_bytes())
            .await
            .expect("header");
        handshake(agent, &registry, Path::new("/nonexistent")).await;
        assert_eq!(answer_of(host).await, "error stream 5 is already open\n");

        let (mut host, agent) = UnixStream::pair().expect("pair");
        host.write_all(b"GET / HTTP/1.0\n").await.expect("header");
        handshake(agent, &registry, Path::new("/nonexistent")).await;
        assert!(answer_of(host)
            .await
            .starts_with("error not an isola stream header"));
    }

    #[tokio::test]
    async fn a_port_stream_joins_a_tcp_connection_in_the_namespace() {
        let registry: Registry<UnixStream> = Registry::new(8, UNCLAIMED_TIMEOUT);
        // No namespace: refused, saying so.
        let (mut host, agent) = UnixStream::pair().expect("pair");
        host.write_all(StreamKind::Port(80).header().as_bytes())
            .await
            .expect("header");
        handshake(agent, &registry, Path::new("/nonexistent")).await;
        let answer = answer_of(host).await;
        assert!(
            answer.starts_with("error the sandbox has no network namespace"),
            "{answer}"
        );
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped the rest: entering a network namespace needs root");
            return;
        }
        let own = Path::new("/proc/self/ns/net");
        let server = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = server.local_addr().expect("addr").port();
        // Nothing listens on the port after ours: refused with the reason.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let (mut host, agent) = UnixStream::pair().expect("pair");
        host.write_all(StreamKind::Port(closed).header().as_bytes())
            .await
            .expect("header");
        handshake(agent, &registry, own).await;
        let answer = answer_of(host).await;
        assert!(
            answer.starts_with(&format!("error connecting to 127.0.0.1:{closed}")),
            "{answer}"
        );

        let (mut host, agent) = UnixStream::pair().expect("pair");
        host.write_all(StreamKind::Port(port).header().as_bytes())
            .await
            .expect("header");
        handshake(agent, &registry, own).await;
        // The answer first: a refused connect fails here, not in accept.
        assert_eq!(answer_of_half(&mut host).await, "ok\n");
        let (mut peer, _) = server.accept().await.expect("accept");
        // Bytes both ways, and EOF passed on each way.
        host.write_all(b"ping").await.expect("write");
        host.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"ping");
        peer.write_all(b"pong").await.expect("write");
        drop(peer);
        let mut got = Vec::new();
        host.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"pong");
    }

    #[tokio::test]
    async fn copy_out_moves_every_byte_and_closes() {
        let (r, w) = pipe().expect("pipe");
        let (host, agent) = UnixStream::pair().expect("pair");
        let copier = tokio::spawn(copy_out(FdIo::new(r).expect("fdio"), agent));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut writer = FdIo::new(w).expect("fdio");
        let to_write = data.clone();
        let write = tokio::spawn(async move {
            writer.write_all(&to_write).await.expect("write");
            drop(writer);
        });
        let mut host = host;
        let mut got = Vec::new();
        host.read_to_end(&mut got).await.expect("read to EOF");
        write.await.expect("writer");
        assert_eq!(
            copier.await.expect("task").expect("copy"),
            data.len() as u64
        );
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn copy_in_stops_on_close() {
        let (r, w) = pipe().expect("pipe");
        let (mut host, agent) = UnixStream::pair().expect("pair");
        let (close_tx, close_rx) = tokio::sync::oneshot::channel();
        let copier = tokio::spawn(copy_in(agent, FdIo::new(w).expect("fdio"), close_rx));
        host.write_all(b"hello").await.expect("write");
        let mut reader = FdIo::new(r).expect("fdio");
        let mut got = [0u8; 5];
        reader.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"hello");
        close_tx.send(()).expect("close");
        copier.await.expect("task").expect("copy");
        // The write end is closed: the reader sees EOF though the host
        // stream is still open.
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.expect("eof");
        assert!(rest.is_empty());
        drop(host);
    }
}
