//! Tests of the hybrid-vsock handshake against a fake VMM: a tokio
//! `UnixListener` that answers `CONNECT` the way a test asks, and can
//! forward to a real ttrpc server standing in for the agent.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::*;
use crate::agent::{CheckRequest, CheckResponse, VersionRequest, VersionResponse};
use crate::{create_health, Health, HealthClient, ServingStatus, AGENT_VSOCK_PORT};

// ---------------------------------------------------------------- parser

#[test]
fn parses_ok_answers() {
    assert_eq!(parse_answer(b"OK 0\n"), Ok(0));
    assert_eq!(parse_answer(b"OK 1073741824\n"), Ok(1_073_741_824));
    assert_eq!(parse_answer(b"OK 4294967295\n"), Ok(u32::MAX));
}

#[test]
fn empty_answer_is_a_close() {
    assert_eq!(parse_answer(b""), Err(AnswerError::Closed));
    assert!(AnswerError::Closed.is_transient());
}

#[test]
fn answer_without_newline() {
    let err = parse_answer(b"OK 12").unwrap_err();
    assert!(matches!(err, AnswerError::Unterminated(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        r#"the answer "OK 12" ends without a newline"#
    );
}

#[test]
fn answer_too_long() {
    let long = [b'A'; MAX_ANSWER_LEN];
    let err = parse_answer(&long).unwrap_err();
    assert!(matches!(err, AnswerError::TooLong(_)), "{err:?}");
    assert!(!err.is_transient());

    // A newline past the limit does not make it acceptable.
    let mut late = b"OK ".to_vec();
    late.extend([b'1'; 40]);
    late.push(b'\n');
    let err = parse_answer(&late).unwrap_err();
    assert!(matches!(err, AnswerError::TooLong(_)), "{err:?}");
    // The message shows the first MAX_ANSWER_LEN bytes and the length.
    let message = err.to_string();
    assert!(message.contains("... (44 bytes)"), "{message}");
    assert!(!message.contains(r"\n"), "{message}");
}

#[test]
fn malformed_answers() {
    for answer in [
        &b"OK\n"[..],
        b"OK \n",
        b"OK abc\n",
        b"OK 12a\n",
        b"OK 12 34\n",
        b"OK  12\n",
        b"OK 12\r\n",
        b"OK -1\n",
        b"OK +1\n",
        b"OK 4294967296\n",
        b"ok 12\n",
        b"ERR 12\n",
        b"ERR no listener\n",
        b"\n",
        b"\x00\xff\x1b[31mOK 1\n",
    ] {
        match parse_answer(answer) {
            Err(AnswerError::Malformed(received)) => {
                assert_eq!(received.bytes(), answer);
            }
            other => panic!("{:?}: {other:?}", answer.escape_ascii().to_string()),
        }
    }
}

#[test]
fn bytes_after_the_newline() {
    let err = parse_answer(b"OK 12\nhello").unwrap_err();
    assert!(matches!(err, AnswerError::TrailingBytes(_)), "{err:?}");
}

#[test]
fn binary_garbage_is_escaped() {
    let err = parse_answer(b"\x00\xff\x1b[31m\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"the answer "\x00\xff\x1b[31m\n" is not "OK <port>\n""#
    );
}

// ------------------------------------------------------------- fake VMM

/// What the fake VMM does with one connection, once it read `CONNECT`.
#[derive(Debug, Clone)]
enum Action {
    /// Writes these bytes and keeps the connection open.
    Answer(&'static [u8]),
    /// Closes the connection (nothing listens on the guest port).
    Close,
    /// Never answers.
    Silent,
    /// Answers OK and forwards the connection to this Unix socket.
    Forward(PathBuf),
}

struct FakeVmm {
    connections: Arc<AtomicUsize>,
    requests: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    task: JoinHandle<()>,
}

impl FakeVmm {
    /// Listens on `socket`; connection `n` (from 0) gets `plan(n)`.
    fn start(socket: PathBuf, plan: impl Fn(usize) -> Action + Send + Sync + 'static) -> FakeVmm {
        let listener = UnixListener::bind(&socket).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let connections = connections.clone();
            let requests = requests.clone();
            async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let n = connections.fetch_add(1, Ordering::SeqCst);
                    let action = plan(n);
                    let requests = requests.clone();
                    tokio::spawn(async move {
                        serve(stream, action, requests).await;
                    });
                }
            }
        });
        FakeVmm {
            connections,
            requests,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: UnixStream,
    action: Action,
    requests: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
) {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).await.unwrap() == 1 {
        request.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    requests.lock().unwrap().push(request);
    match action {
        Action::Answer(bytes) => {
            stream.write_all(bytes).await.unwrap();
            // Hold the connection open until the client goes away.
            let _ = stream.read(&mut byte).await;
        }
        Action::Close => drop(stream),
        Action::Silent => {
            let _ = stream.read(&mut byte).await;
        }
        Action::Forward(target) => {
            let mut guest = UnixStream::connect(&target).await.unwrap();
            stream.write_all(b"OK 1073741824\n").await.unwrap();
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut guest).await;
        }
    }
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmm.sock");
    (dir, socket)
}

const TIMEOUT: Duration = Duration::from_secs(5);

// -------------------------------------------------------------- connect

#[tokio::test]
async fn connect_ok_keeps_the_guest_bytes() {
    let (_dir, socket) = scratch();
    // The guest's first bytes arrive right behind the answer.
    let vmm = FakeVmm::start(socket.clone(), |_| Action::Answer(b"OK 52\nhello"));
    let mut stream = connect(&socket, 1024, TIMEOUT).await.unwrap();
    let mut hello = [0u8; 5];
    stream.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b"hello");
    assert_eq!(vmm.requests.lock().unwrap().as_slice(), [b"CONNECT 1024\n"]);
}

#[tokio::test]
async fn connect_garbage_answer() {
    let (_dir, socket) = scratch();
    let _vmm = FakeVmm::start(socket.clone(), |_| Action::Answer(b"ERR \x00oops\n"));
    let err = connect(&socket, 1024, TIMEOUT).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Answer {
                answer: AnswerError::Malformed(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_transient());
    let message = err.to_string();
    assert!(message.contains(&socket.display().to_string()), "{message}");
    assert!(message.contains("guest port 1024"), "{message}");
    assert!(message.contains(r#""ERR \x00oops\n""#), "{message}");
}

#[tokio::test]
async fn connect_long_answer_without_newline() {
    let (_dir, socket) = scratch();
    let _vmm = FakeVmm::start(socket.clone(), |_| Action::Answer(&[b'x'; 100]));
    let err = connect(&socket, 7, TIMEOUT).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Answer {
                answer: AnswerError::TooLong(_),
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn connect_closed_by_vmm() {
    let (_dir, socket) = scratch();
    let _vmm = FakeVmm::start(socket.clone(), |_| Action::Close);
    let err = connect(&socket, 1024, TIMEOUT).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Answer {
                answer: AnswerError::Closed,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(err.to_string().contains("closed the connection"), "{err}");
}

#[tokio::test]
async fn connect_times_out_when_the_vmm_never_answers() {
    let (_dir, socket) = scratch();
    let _vmm = FakeVmm::start(socket.clone(), |_| Action::Silent);
    let started = Instant::now();
    let err = connect(&socket, 1024, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert!(started.elapsed() < TIMEOUT);
    let message = err.to_string();
    assert!(
        message.contains("no answer to CONNECT within 100ms"),
        "{message}"
    );
}

#[tokio::test]
async fn connect_without_vmm_socket() {
    let (_dir, socket) = scratch();
    let err = connect(&socket, 1024, TIMEOUT).await.unwrap_err();
    match &err {
        Error::Connect { error, .. } => assert_eq!(error.kind(), io::ErrorKind::NotFound),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains(&socket.display().to_string()));
}

// ----------------------------------------------------------------- dial

/// The error of a dial that must fail (`ttrpc`'s client is not `Debug`).
fn dial_error(result: Result<ttrpc::asynchronous::Client>) -> Error {
    match result {
        Ok(_) => panic!("dialed an agent that is not there"),
        Err(err) => err,
    }
}

#[tokio::test]
async fn dial_gives_up_at_the_deadline() {
    let (_dir, socket) = scratch();
    let started = Instant::now();
    let err = dial_error(dial_agent(&socket, 1024, Duration::from_secs(1)).await);
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    let Error::Deadline { attempts, last, .. } = &err else {
        panic!("{err:?}");
    };
    // No socket: polled every 5 ms, about 200 attempts (fewer on a busy
    // host, never more than one per pause); backing off would make 9.
    assert!((20..=201).contains(attempts), "{attempts}");
    assert!(matches!(**last, Error::Connect { .. }), "{last:?}");
    let message = err.to_string();
    assert!(message.contains(&socket.display().to_string()), "{message}");
    assert!(message.contains("guest port 1024"), "{message}");
    assert!(message.contains("last failure: "), "{message}");
}

#[tokio::test]
async fn dial_reports_the_vmm_closing() {
    let (_dir, socket) = scratch();
    let vmm = FakeVmm::start(socket.clone(), |_| Action::Close);
    let err = dial_error(dial_agent(&socket, 1024, Duration::from_millis(200)).await);
    let Error::Deadline { last, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(
        matches!(
            **last,
            Error::Answer {
                answer: AnswerError::Closed,
                ..
            }
        ),
        "{last:?}"
    );
    assert!(vmm.connections() >= 2);
}

#[tokio::test]
async fn dial_reports_a_silent_vmm() {
    let (_dir, socket) = scratch();
    let _vmm = FakeVmm::start(socket.clone(), |_| Action::Silent);
    let err = dial_error(dial_agent(&socket, 1024, Duration::from_millis(200)).await);
    let Error::Deadline { last, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(matches!(**last, Error::Timeout { .. }), "{last:?}");
}

#[tokio::test]
async fn dial_fails_fast_on_garbage() {
    let (_dir, socket) = scratch();
    let vmm = FakeVmm::start(socket.clone(), |_| Action::Answer(b"HTTP/1.1 400 Bad\r\n"));
    let started = Instant::now();
    let err = dial_error(dial_agent(&socket, 1024, Duration::from_secs(10)).await);
    assert!(matches!(err, Error::Answer { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(vmm.connections(), 1);
}

#[tokio::test]
async fn dial_takes_a_deadline_too_large_to_add() {
    let (_dir, socket) = scratch();
    let _vmm = FakeVmm::start(socket.clone(), |_| Action::Answer(b"nope\n"));
    // `Instant::now() + Duration::MAX` would panic; it must mean "no deadline".
    let err = dial_error(dial_agent(&socket, 1024, Duration::MAX).await);
    assert!(matches!(err, Error::Answer { .. }), "{err:?}");
}

// ------------------------------------------------- end to end over ttrpc

/// The health service as the test's agent serves it.
struct TestHealth;

#[async_trait::async_trait]
impl Health for TestHealth {
    async fn check(
        &self,
        _ctx: &ttrpc::asynchronous::TtrpcContext,
        req: CheckRequest,
    ) -> ttrpc::Result<CheckResponse> {
        let mut resp = CheckResponse::new();
        resp.status = if req.service.is_empty() || req.service == crate::HEALTH_SERVICE {
            ServingStatus::SERVING
        } else {
            ServingStatus::NOT_SERVING
        }
        .into();
        Ok(resp)
    }

    async fn version(
        &self,
        _ctx: &ttrpc::asynchronous::TtrpcContext,
        _req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        let mut resp = VersionResponse::new();
        resp.agent_version = "test".to_string();
        resp.api_version = crate::API_VERSION;
        Ok(resp)
    }
}

#[tokio::test]
async fn dial_agent_then_health_check() {
    let dir = tempfile::tempdir().unwrap();
    let agent_socket = dir.path().join("agent.sock");
    let vmm_socket = dir.path().join("vmm.sock");

    let mut server = ttrpc::asynchronous::Server::new()
        .bind(&format!("unix://{}", agent_socket.display()))
        .unwrap()
        .register_service(create_health(Arc::new(TestHealth)));
    server.start().await.unwrap();

    // The VMM's socket appears late, and then the agent's port refuses the
    // first three connections, as while the guest boots.
    let vmm = tokio::spawn({
        let vmm_socket = vmm_socket.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            FakeVmm::start(vmm_socket, move |n| {
                if n < 3 {
                    Action::Close
                } else {
                    Action::Forward(agent_socket.clone())
                }
            })
        }
    });

    let client = dial_agent(&vmm_socket, AGENT_VSOCK_PORT, Duration::from_secs(10))
        .await
        .unwrap();
    let vmm = vmm.await.unwrap();
    assert_eq!(vmm.connections(), 4);
    assert!(vmm
        .requests
        .lock()
        .unwrap()
        .iter()
        .all(|request| request == b"CONNECT 1024\n"));

    let health = HealthClient::new(client);
    let ctx = || ttrpc::context::with_duration(TIMEOUT);
    let resp = health.check(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(resp.status.enum_value(), Ok(ServingStatus::SERVING));

    let mut other = CheckRequest::new();
    other.service = "isola.agent.v1.Nothing".to_string();
    let resp = health.check(ctx(), &other).await.unwrap();
    assert_eq!(resp.status.enum_value(), Ok(ServingStatus::NOT_SERVING));

    let resp = health.version(ctx(), &VersionRequest::new()).await.unwrap();
    assert_eq!(resp.agent_version, "test");
    assert_eq!(resp.api_version, crate::API_VERSION);

    drop(health);
    server.shutdown().await.unwrap();
}

/// The fuzz target's corpus (fuzz/corpus/hybrid_answer) replayed.
#[test]
fn fuzz_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/hybrid_answer");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        super::fuzzing::answer(&bytes);
        n += 1;
    }
    assert!(n > 0, "{} is empty", dir.display());
}

/// A missing socket is polled for at a short, fixed pace; failures on the
/// guest's side back off, doubling up to the cap, whatever came between.
#[test]
fn a_missing_socket_is_polled_and_the_guest_backed_off() {
    let missing = Error::Connect {
        socket: PathBuf::from("/nowhere"),
        port: 1024,
        error: std::io::Error::from(std::io::ErrorKind::NotFound),
    };
    let guest = Error::Timeout {
        socket: PathBuf::from("/vsock"),
        port: 1024,
        timeout: Duration::from_secs(1),
    };
    let mut delay = FIRST_RETRY_DELAY;
    for _ in 0..50 {
        assert_eq!(pause_after(&missing, &mut delay), SOCKET_POLL);
    }
    assert_eq!(delay, FIRST_RETRY_DELAY);
    let mut pauses = Vec::new();
    for i in 0..8 {
        pauses.push(pause_after(&guest, &mut delay));
        if i == 2 {
            assert_eq!(pause_after(&missing, &mut delay), SOCKET_POLL);
        }
    }
    let ms: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
    assert_eq!(ms, [10, 20, 40, 80, 160, 200, 200, 200]);
}
