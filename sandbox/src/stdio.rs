//! Stdio streams, host side: each direction of a process's stdio is its own
//! vsock connection to the agent's stream port, opened (header, `ok`)
//! before the RPC that names it. The caller gets tokio reader and writer
//! types and copies with back-pressure; nothing here buffers.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use isola_protocol::stream::{parse_answer, read_line, StreamKind};
use isola_protocol::STREAM_VSOCK_PORT;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;

/// How long opening one stream may take (hybrid handshake, header, answer).
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// Which stdio streams a new process gets. With `terminal`, the process
/// gets a pty: stdin feeds it, stdout carries all its output, and there is
/// no stderr stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StdioRequest {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub terminal: Option<WindowSize>,
}

/// A process's stdin: write to it; `shutdown()` (or drop) is EOF for the
/// process.
#[derive(Debug)]
pub struct StdinWriter(UnixStream);

/// A process's stdout or stderr: EOF once the process's last byte came.
#[derive(Debug)]
pub struct OutputReader(UnixStream);

/// The host ends of a process's stdio.
#[derive(Debug, Default)]
pub struct ProcessIo {
    pub stdin: Option<StdinWriter>,
    pub stdout: Option<OutputReader>,
    pub stderr: Option<OutputReader>,
}

impl AsyncWrite for StdinWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl AsyncRead for OutputReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

/// Stream ids chosen for a request: 0 where no stream was asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StreamIds {
    pub stdin: u64,
    pub stdout: u64,
    pub stderr: u64,
}

impl StreamIds {
    /// The agent's `Stdio` for these streams, with a terminal of
    /// `terminal`'s size if any.
    pub(crate) fn to_pb(self, terminal: Option<WindowSize>) -> isola_protocol::agent::Stdio {
        let window = terminal.unwrap_or(WindowSize { rows: 0, cols: 0 });
        isola_protocol::agent::Stdio {
            stdin: self.stdin,
            stdout: self.stdout,
            stderr: self.stderr,
            terminal: terminal.is_some(),
            rows: u32::from(window.rows),
            cols: u32::from(window.cols),
            ..Default::default()
        }
    }
}

/// Checks a request before anything is opened.
pub(crate) fn check_request(req: &StdioRequest) -> Result<(), String> {
    if req.terminal.is_some() && req.stderr {
        return Err("stdio: a terminal has no separate stderr stream".to_string());
    }
    Ok(())
}

/// Opens the streams `req` asks for, taking ids from `next_id`.
pub(crate) async fn open(
    vsock: &Path,
    req: &StdioRequest,
    mut next_id: impl FnMut() -> u64,
) -> io::Result<(StreamIds, ProcessIo)> {
    let mut ids = StreamIds::default();
    let mut io = ProcessIo::default();
    if req.stdin {
        ids.stdin = next_id();
        io.stdin = Some(StdinWriter(
            open_stream(vsock, StreamKind::Stdio(ids.stdin)).await?,
        ));
    }
    if req.stdout {
        ids.stdout = next_id();
        io.stdout = Some(OutputReader(
            open_stream(vsock, StreamKind::Stdio(ids.stdout)).await?,
        ));
    }
    if req.stderr {
        ids.stderr = next_id();
        io.stderr = Some(OutputReader(
            open_stream(vsock, StreamKind::Stdio(ids.stderr)).await?,
        ));
    }
    Ok((ids, io))
}

/// Opens one stream: hybrid handshake to the stream port, header, `ok`.
pub(crate) async fn open_stream(vsock: &Path, kind: StreamKind) -> io::Result<UnixStream> {
    let attempt = async {
        let mut stream =
            isola_protocol::hybrid::connect(vsock, STREAM_VSOCK_PORT, STREAM_OPEN_TIMEOUT)
                .await
                .map_err(io::Error::other)?;
        stream.write_all(kind.header().as_bytes()).await?;
        let answer = read_line(&mut stream).await?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the stream without answering",
            )
        })?;
        parse_answer(&answer).map_err(io::Error::other)?;
        Ok(stream)
    };
    match tokio::time::timeout(STREAM_OPEN_TIMEOUT, attempt).await {
        Ok(result) => result
            .map_err(|err: io::Error| io::Error::new(err.kind(), format!("opening {kind}: {err}"))),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("opening {kind}: no answer within {STREAM_OPEN_TIMEOUT:?}"),
        )),
    }
}

/// Copies `reader` to `writer` until EOF. If the writer fails (a closed
/// pipe), the rest is read and dropped: the process must never block on
/// an output nobody takes, or it would never exit. Returns the bytes read
/// and the writer's error, if any.
pub async fn copy_output<R, W>(mut reader: R, mut writer: W) -> (u64, io::Result<()>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let mut result = Ok(());
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) => {
                if result.is_ok() {
                    result = Err(err);
                }
                break;
            }
        };
        total += n as u64;
        if result.is_ok() {
            if let Err(err) = writer.write_all(&buf[..n]).await {
                result = Err(err);
            }
        }
    }
    if result.is_ok() {
        result = writer.flush().await;
    }
    (total, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_has_no_stderr() {
        let mut req = StdioRequest {
            stdin: true,
            stdout: true,
            stderr: true,
            terminal: Some(WindowSize { rows: 24, cols: 80 }),
        };
        assert!(check_request(&req).is_err());
        req.stderr = false;
        assert!(check_request(&req).is_ok());
    }

    /// A fake VMM + agent: answers the hybrid handshake, checks the header,
    /// answers `reply`.
    async fn fake_agent(
        socket: &Path,
        reply: &'static [u8],
    ) -> tokio::task::JoinHandle<Vec<String>> {
        let listener = tokio::net::UnixListener::bind(socket).expect("bind");
        tokio::spawn(async move {
            let mut headers = Vec::new();
            while let Ok((mut conn, _)) = listener.accept().await {
                let connect = read_line(&mut conn)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                assert_eq!(connect, b"CONNECT 1025\n");
                conn.write_all(b"OK 5000\n").await.ok();
                let header = read_line(&mut conn)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                headers.push(String::from_utf8_lossy(&header).into_owned());
                conn.write_all(reply).await.ok();
                if reply == b"ok\n" {
                    // Echo back, so the test sees the raw bytes flow.
                    tokio::spawn(async move {
                        let (mut r, mut w) = conn.into_split();
                        tokio::io::copy(&mut r, &mut w).await.ok();
                    });
                }
                if headers.len() == 3 {
                    break;
                }
            }
            headers
        })
    }

    #[tokio::test]
    async fn streams_are_opened_with_their_header_and_carry_raw_bytes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let socket = tmp.path().join("vsock.sock");
        let agent = fake_agent(&socket, b"ok\n").await;
        let mut next = 6u64;
        let req = StdioRequest {
            stdin: true,
            stdout: true,
            stderr: true,
            terminal: None,
        };
        let (ids, io) = open(&socket, &req, || {
            next += 1;
            next
        })
        .await
        .expect("opened");
        assert_eq!(
            ids,
            StreamIds {
                stdin: 7,
                stdout: 8,
                stderr: 9
            }
        );
        let headers = agent.await.expect("agent");
        assert_eq!(
            headers,
            [
                "isola-stream 1 stdio 7\n",
                "isola-stream 1 stdio 8\n",
                "isola-stream 1 stdio 9\n"
            ]
        );
        let mut stdin = io.stdin.expect("stdin");
        stdin.write_all(b"hello").await.expect("write");
        stdin.shutdown().await.expect("eof");
        let mut back = Vec::new();
        stdin.0.read_to_end(&mut back).await.expect("echo");
        assert_eq!(back, b"hello");
    }

    #[tokio::test]
    async fn a_refused_stream_says_why() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let socket = tmp.path().join("vsock.sock");
        let _agent = fake_agent(&socket, b"error stream 7 is already open\n").await;
        let err = open_stream(&socket, StreamKind::Stdio(7))
            .await
            .expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("opening stdio stream 7"), "{text}");
        assert!(text.contains("stream 7 is already open"), "{text}");
    }

    #[tokio::test]
    async fn copy_output_drains_past_a_failed_writer() {
        let data = vec![7u8; 300_000];
        let (n, res) = copy_output(&data[..], Vec::new()).await;
        assert_eq!(n, 300_000);
        assert!(res.is_ok());

        struct Broken;
        impl AsyncWrite for Broken {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &[u8],
            ) -> Poll<io::Result<usize>> {
                Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let (n, res) = copy_output(&data[..], Broken).await;
        assert_eq!(n, 300_000, "read to the end anyway");
        assert_eq!(res.err().map(|e| e.kind()), Some(io::ErrorKind::BrokenPipe));
    }
}
