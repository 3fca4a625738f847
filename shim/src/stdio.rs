//! A process's stdio on the host: containerd names each stream by a FIFO
//! path, a `file://` URI or a `binary://` URI (a logging binary that gets
//! the output on fds 3 and 4), and the shim joins them to the agent's
//! streams. Every byte the process wrote is delivered before its exit is
//! reported.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use containerd_shim::asynchronous::io::IoTasks;
use isola_sandbox::{OutputReader, ProcessIo};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

/// How long the output copies may take after the process exited (the agent
/// has by then sent the last byte; this bounds a reader that stopped
/// reading).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a logging binary may take to say it is ready.
pub const BINARY_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where one output stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    None,
    Fifo(PathBuf),
    File(PathBuf),
    Binary { path: PathBuf, args: Vec<String> },
}

/// Parses containerd's name for a stream: empty, a FIFO path, `fifo://`,
/// `file://` or `binary://` URIs.
pub fn parse_target(uri: &str) -> Result<Target, String> {
    if uri.is_empty() {
        return Ok(Target::None);
    }
    let (scheme, rest) = match uri.split_once("://") {
        Some((scheme, rest)) => (scheme, rest),
        None => ("", uri),
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if !matches!(scheme, "" | "fifo" | "file" | "binary") {
        return Err(format!(
            "stdio {uri:?}: unsupported scheme {scheme:?} (fifo, file, binary)"
        ));
    }
    let path = percent_decode(path)?;
    if !path.starts_with('/') {
        return Err(format!("stdio {uri:?}: the path must be absolute"));
    }
    match scheme {
        "" | "fifo" if query.is_none() => Ok(Target::Fifo(PathBuf::from(path))),
        "file" if query.is_none() => Ok(Target::File(PathBuf::from(path))),
        "binary" => {
            let mut args = Vec::new();
            for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                args.push(percent_decode(k)?);
                let v = percent_decode(v)?;
                if !v.is_empty() {
                    args.push(v);
                }
            }
            Ok(Target::Binary {
                path: PathBuf::from(path),
                args,
            })
        }
        _ => Err(format!("stdio {uri:?}: a query is not allowed here")),
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{s:?}: bad percent escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?}: not UTF-8"))
}

/// The copies of one process's stdio.
#[derive(Default)]
pub struct Attached {
    fifos: IoTasks,
    others: Vec<JoinHandle<()>>,
    binary: Option<tokio::process::Child>,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached")
            .field("others", &self.others.len())
            .field("binary", &self.binary.as_ref().and_then(|c| c.id()))
            .finish()
    }
}

/// containerd's names for a process's streams.
#[derive(Debug, Clone, Default)]
pub struct Names {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
}

impl Attached {
    /// Joins `io` (the agent's streams) to the targets `names` give.
    pub async fn attach(
        names: &Names,
        io: ProcessIo,
        container: &str,
        namespace: &str,
    ) -> Result<Attached, String> {
        let mut attached = Attached::default();
        let result = attached.attach_inner(names, io, container, namespace).await;
        if result.is_err() {
            attached.abort().await;
        }
        result.map(|()| attached)
    }

    async fn attach_inner(
        &mut self,
        names: &Names,
        io: ProcessIo,
        container: &str,
        namespace: &str,
    ) -> Result<(), String> {
        let stdout = parse_target(&names.stdout)?;
        let stderr = parse_target(&names.stderr)?;
        if let Some(stdin) = io.stdin {
            match parse_target(&names.stdin)? {
                Target::Fifo(path) => self
                    .fifos
                    .copy_from_fifo(&path.to_string_lossy(), stdin)
                    .map_err(|e| format!("stdin {}: {e}", path.display()))?,
                Target::None => {}
                other => return Err(format!("stdin must be a FIFO, not {other:?}")),
            }
        }
        let mut binary_pipes = None;
        if let (Target::Binary { path, args }, _) | (_, Target::Binary { path, args }) =
            (&stdout, &stderr)
        {
            let (child, out, err) = spawn_binary(path, args, container, namespace).await?;
            self.binary = Some(child);
            binary_pipes = Some((Some(out), Some(err)));
        }
        for (name, target, reader) in [("stdout", stdout, io.stdout), ("stderr", stderr, io.stderr)]
        {
            let Some(reader) = reader else { continue };
            match target {
                Target::None => {}
                Target::Fifo(path) => self
                    .fifos
                    .copy_to_fifo(reader, &path.to_string_lossy())
                    .map_err(|e| format!("{name} {}: {e}", path.display()))?,
                Target::File(path) => {
                    if let Some(parent) = path.parent() {
                        tokio::fs::create_dir_all(parent)
                            .await
                            .map_err(|e| format!("{name} {}: {e}", parent.display()))?;
                    }
                    let file = tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .await
                        .map_err(|e| format!("{name} {}: {e}", path.display()))?;
                    self.others.push(tokio::spawn(copy_out(reader, file)));
                }
                Target::Binary { .. } => {
                    let pipe = binary_pipes.as_mut().and_then(|(out, err)| {
                        if name == "stdout" {
                            out.take()
                        } else {
                            err.take()
                        }
                    });
                    if let Some(pipe) = pipe {
                        self.others.push(tokio::spawn(copy_out(reader, pipe)));
                    }
                }
            }
        }
        Ok(())
    }

    /// Lets go of stdin (CloseIO): the process sees EOF once what was
    /// written has been delivered.
    pub fn close_stdin(&self) {
        self.fifos.close_input();
    }

    /// Waits (up to [`DRAIN_TIMEOUT`]) for the outputs to be delivered, then
    /// stops every copy and lets the logging binary finish.
    pub async fn finish(&mut self) {
        let others = std::mem::take(&mut self.others);
        let drain = async {
            tokio::join!(self.fifos.shutdown(), async {
                for handle in others {
                    let abort = handle.abort_handle();
                    if tokio::time::timeout(DRAIN_TIMEOUT, handle).await.is_err() {
                        tracing::warn!("output copy did not finish within {DRAIN_TIMEOUT:?}");
                        abort.abort();
                    }
                }
            });
        };
        drain.await;
        self.reap_binary().await;
    }

    /// Stops every copy at once (a process that failed to start).
    pub async fn abort(&mut self) {
        for handle in self.others.drain(..) {
            handle.abort();
        }
        self.fifos.abort().await;
        self.reap_binary().await;
    }

    async fn reap_binary(&mut self) {
        if let Some(mut child) = self.binary.take() {
            // Its pipes are closed now: it ends on EOF.
            match tokio::time::timeout(DRAIN_TIMEOUT, child.wait()).await {
                Ok(Ok(status)) if !status.success() => {
                    tracing::warn!(%status, "the logging binary failed");
                }
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!("the logging binary did not exit after EOF; killing it");
                    let _ = child.kill().await;
                }
            }
        }
    }
}

async fn copy_out<W: tokio::io::AsyncWrite + Unpin>(mut reader: OutputReader, mut to: W) {
    match tokio::io::copy(&mut reader, &mut to).await {
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "output copy ended"),
    }
    let _ = to.shutdown().await;
}

/// Starts a logging binary as containerd's runc shim does: environment
/// CONTAINER_ID and CONTAINER_NAMESPACE, stdout on fd 3, stderr on fd 4,
/// and fd 5, which it closes once ready.
async fn spawn_binary(
    path: &std::path::Path,
    args: &[String],
    container: &str,
    namespace: &str,
) -> Result<
    (
        tokio::process::Child,
        tokio::net::unix::pipe::Sender,
        tokio::net::unix::pipe::Sender,
    ),
    String,
> {
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("logging binary {}: pipe: {e}", path.display()))
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let mut cmd = tokio::process::Command::new(path);
    cmd.args(args)
        .env("CONTAINER_ID", container)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    // SAFETY: runs between fork and exec; dup2 and fcntl are
    // async-signal-safe and the fds are owned by this function until exec.
    unsafe {
        cmd.pre_exec(move || {
            for (target, fd) in (3..).zip(fds) {
                if fd == target {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting the logging binary {}: {e}", path.display()))?;
    drop((out_r, err_r, ready_w));
    // Ready when it closes (or writes to) fd 5.
    let ready = tokio::task::spawn_blocking(move || {
        let mut byte = [0u8; 1];
        let file = std::fs::File::from(ready_r);
        std::io::Read::read(&mut &file, &mut byte)
    });
    match tokio::time::timeout(BINARY_READY_TIMEOUT, ready).await {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(e))) => return Err(format!("logging binary {}: {e}", path.display())),
        Ok(Err(e)) => return Err(format!("logging binary {}: {e}", path.display())),
        Err(_) => {
            return Err(format!(
                "the logging binary {} did not get ready within {BINARY_READY_TIMEOUT:?}",
                path.display()
            ))
        }
    }
    let sender = |fd: OwnedFd| {
        tokio::net::unix::pipe::Sender::from_owned_fd(fd)
            .map_err(|e| format!("logging binary {}: {e}", path.display()))
    };
    Ok((child, sender(out_w)?, sender(err_w)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(parse_target(""), Ok(Target::None));
        assert_eq!(
            parse_target("/run/containerd/fifo/1/c-stdout"),
            Ok(Target::Fifo("/run/containerd/fifo/1/c-stdout".into()))
        );
        assert_eq!(parse_target("fifo:///a/b"), Ok(Target::Fifo("/a/b".into())));
        assert_eq!(
            parse_target("file:///var/log/c%201.log"),
            Ok(Target::File("/var/log/c 1.log".into()))
        );
        assert_eq!(
            parse_target("binary:///usr/bin/logger?id=a%2Fb&debug&level=info"),
            Ok(Target::Binary {
                path: "/usr/bin/logger".into(),
                args: vec![
                    "id".into(),
                    "a/b".into(),
                    "debug".into(),
                    "level".into(),
                    "info".into()
                ],
            })
        );
    }

    #[test]
    fn bad_targets_say_why() {
        assert!(parse_target("relative/path")
            .expect_err("rel")
            .contains("absolute"));
        assert!(parse_target("http://x/y")
            .expect_err("scheme")
            .contains("unsupported scheme"));
        assert!(parse_target("file:///a?b=c")
            .expect_err("query")
            .contains("query"));
        assert!(parse_target("file:///a%zz")
            .expect_err("escape")
            .contains("percent"));
    }

    #[tokio::test]
    async fn a_logging_binary_gets_both_streams_on_fds_3_and_4() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let script = dir.path().join("logger");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec 5>&-\necho \"$CONTAINER_NAMESPACE/$CONTAINER_ID $1\" > {o}\ncat <&3 >> {o}\ncat <&4 >> {o}\n",
                o = out.display()
            ),
        )
        .expect("write");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let (mut child, mut o, mut e) = spawn_binary(&script, &["arg".into()], "c1", "ns")
            .await
            .expect("spawn");
        o.write_all(b"to stdout\n").await.expect("write");
        e.write_all(b"to stderr\n").await.expect("write");
        drop((o, e));
        assert!(child.wait().await.expect("wait").success());
        assert_eq!(
            std::fs::read_to_string(&out).expect("read"),
            "ns/c1 arg\nto stdout\nto stderr\n"
        );
    }
}
