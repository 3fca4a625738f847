//! The container API of the agent (`isola.agent.v1.Agent`) in a real
//! guest: the product initrd under isola-vmm, a busybox rootfs in a
//! virtio-fs share served by virtiofsd, the API and the stdio streams over
//! the VMM's hybrid vsock socket.
//!
//! `agent_runs_a_container_and_an_exec_in_a_real_guest`: CreateSandbox;
//! a container whose init prints its hostname, is refused `mkdir` by its
//! seccomp profile, writes to stderr and then sleeps; its stdout and
//! stderr streams; an exec that copies its stdin stream to stdout and
//! exits 0 (WaitProcess answers after the stream's EOF); execs that find
//! none of the guest's tree (pivot_root), climb out of a chroot into the
//! chroot, and with CAP_SYS_ADMIN detach their root to find the empty
//! rootfs beneath (no /init); SIGKILL of the
//! init (exit 137); stats; a bad spec and an unknown stream
//! (INVALID_ARGUMENT naming the field); WaitEvent; RemoveContainer;
//! DestroySandbox, after which the VMM exits 0. The agent's log stream
//! carries its log lines.

#![allow(clippy::unwrap_used)] // a test: a panic is its failure report

use std::path::Path;
use std::time::Instant;

use isola_e2e::agent::RPC_TIMEOUT;
use isola_e2e::isola::{IsolaConfig, IsolaVm};
use isola_e2e::virtiofsd::Virtiofsd;
use isola_e2e::{require_kvm_host, GuestImages, Scratch, BOOT_DEADLINE, SHUTDOWN_DEADLINE};
use isola_protocol::agent::*;
use isola_protocol::status::{self, Code};
use isola_protocol::stream::{self, StreamKind};
use isola_protocol::{AgentClient, AGENT_VSOCK_PORT, STREAM_VSOCK_PORT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const TAG: &str = "sandboxshare";
const CONTAINER: &str = "c1";

fn ctx() -> isola_protocol::ttrpc::context::Context {
    isola_protocol::ttrpc::context::with_timeout(RPC_TIMEOUT.as_nanos() as i64)
}

/// A busybox rootfs at `share/containers/<id>/rootfs`: Debian's static
/// busybox and a link per applet.
fn busybox_rootfs(share: &Path, id: &str) {
    let rootfs = share.join("containers").join(id).join("rootfs");
    for dir in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
        }
    }
}

/// Opens a stream to the agent and sends its header; the agent's answer.
async fn open_stream(vsock: &Path, kind: StreamKind) -> UnixStream {
    let mut conn = isola_protocol::hybrid::connect(vsock, STREAM_VSOCK_PORT, RPC_TIMEOUT)
        .await
        .unwrap();
    conn.write_all(kind.header().as_bytes()).await.unwrap();
    let answer = stream::read_line(&mut conn).await.unwrap().unwrap();
    stream::parse_answer(&answer).unwrap_or_else(|e| panic!("{kind}: {e}"));
    conn
}

/// Reads until `needle` was seen (or EOF / the deadline); everything read.
async fn read_until(conn: &mut UnixStream, needle: &str) -> String {
    let mut got = Vec::new();
    let until = Instant::now() + BOOT_DEADLINE;
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let left = until.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, conn.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in {:?}", String::from_utf8_lossy(&got)))
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

async fn read_to_eof(mut conn: UnixStream) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(BOOT_DEADLINE, conn.read_to_end(&mut got))
        .await
        .expect("the agent closes an output stream after the last byte")
        .unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

fn spec_json() -> String {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "args": ["sh", "-c",
                "echo hello from $(hostname); mkdir /tmp/x 2>/dev/null || echo mkdir-denied; echo oops >&2; exec sleep 1000"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "hostname": "web",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}
        ],
        "linux": {
            "resources": {"memory": {"limit": 134217728}, "pids": {"limit": 64}},
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
            }
        }
    })
    .to_string()
}

/// Docker's default capability set.
const DOCKER_DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Runs `sh -c script` as exec `exec_id` of the container with these
/// capabilities, its stdout and stderr on stream `stream_id`; its exit
/// status and output.
async fn run_exec(
    agent: &AgentClient,
    vsock: &Path,
    exec_id: &str,
    stream_id: u64,
    script: &str,
    caps: &[&str],
) -> (i32, String) {
    let out = open_stream(vsock, StreamKind::Stdio(stream_id)).await;
    let mut exec = ExecProcessRequest::new();
    exec.container_id = CONTAINER.into();
    exec.exec_id = exec_id.into();
    exec.process_json = serde_json::json!({
        "args": ["sh", "-c", format!("exec 2>&1; {script}")],
        "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0},
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps}
    })
    .to_string();
    let mut stdio = Stdio::new();
    stdio.stdout = stream_id;
    exec.stdio = Some(stdio).into();
    agent.exec_process(ctx(), &exec).await.unwrap();
    let mut wait = WaitProcessRequest::new();
    wait.container_id = CONTAINER.into();
    wait.exec_id = exec_id.into();
    let (waited, text) = tokio::join!(agent.wait_process(ctx(), &wait), read_to_eof(out));
    (waited.unwrap().exit_status, text)
}

fn expect_code<T: std::fmt::Debug>(
    result: Result<T, isola_protocol::ttrpc::Error>,
    code: Code,
    prefix: &str,
) {
    let err = result.expect_err(prefix);
    assert_eq!(status::code(&err), Some(code), "{}", status::message(&err));
    assert!(
        status::message(&err).starts_with(prefix),
        "{:?} does not start with {prefix:?}",
        status::message(&err)
    );
}

#[test]
fn agent_runs_a_container_and_an_exec_in_a_real_guest() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("agent-api").unwrap();
    let share = scratch.path.join("share");
    busybox_rootfs(&share, CONTAINER);
    busybox_rootfs(&share, "rshared");
    std::fs::create_dir_all(share.join("containers/rshared/volumes/0")).unwrap();
    let fs_socket = scratch.path.join("virtiofsd.sock");
    let _fsd = Virtiofsd::start(&fs_socket, &share);
    let mut config = IsolaConfig::new(GuestImages::from_build_dir().unwrap());
    config.memory_mib = 512;
    config.extra_args = vec![
        "--fs".into(),
        format!("tag={TAG},socket={},queue_size=256", fs_socket.display()),
    ];
    let mut vm = IsolaVm::start(&config, &scratch.path).unwrap();
    let ready = vm.wait_ready().unwrap();
    eprintln!("boot: {ready}");
    let vsock = vm.vsock_socket.clone().unwrap();

    let rt = isola_e2e::agent::runtime().unwrap();
    rt.block_on(async {
        let client = isola_protocol::hybrid::dial_agent(&vsock, AGENT_VSOCK_PORT, BOOT_DEADLINE)
            .await
            .unwrap();
        let agent = AgentClient::new(client);
        let mut log = open_stream(&vsock, StreamKind::Log).await;

        // Before a sandbox: FAILED_PRECONDITION.
        let mut req = CreateContainerRequest::new();
        req.container_id = CONTAINER.into();
        expect_code(
            agent.create_container(ctx(), &req).await,
            Code::FAILED_PRECONDITION,
            "no sandbox",
        );

        let mut sb = CreateSandboxRequest::new();
        sb.sandbox_id = "sb1".into();
        sb.hostname = "pod1".into();
        sb.share_tag = TAG.into();
        let mut dns = Dns::new();
        dns.nameservers = vec!["10.0.0.53".into()];
        sb.dns = Some(dns).into();
        let resp = agent.create_sandbox(ctx(), &sb).await.unwrap();
        assert!(!resp.kernel_release.is_empty());
        expect_code(
            agent.create_sandbox(ctx(), &sb).await,
            Code::FAILED_PRECONDITION,
            "sandbox \"sb1\" exists already",
        );

        // A bad spec and an unknown stream are INVALID_ARGUMENT naming
        // the field.
        let mut bad = CreateContainerRequest::new();
        bad.container_id = "bad".into();
        bad.rootfs = format!("containers/{CONTAINER}/rootfs");
        bad.oci_spec_json = r#"{"ociVersion":"1.0.2","process":{"args":"sh"}}"#.into();
        expect_code(
            agent.create_container(ctx(), &bad).await,
            Code::INVALID_ARGUMENT,
            "oci_spec_json: process.args",
        );
        bad.oci_spec_json = spec_json();
        let mut stdio = Stdio::new();
        stdio.stdout = 999;
        bad.stdio = Some(stdio).into();
        expect_code(
            agent.create_container(ctx(), &bad).await,
            Code::INVALID_ARGUMENT,
            "stdio.stdout",
        );
        bad.stdio = None.into();
        bad.rootfs = "../outside".into();
        expect_code(
            agent.create_container(ctx(), &bad).await,
            Code::INVALID_ARGUMENT,
            "rootfs",
        );

        // The container: stdout and stderr streams.
        let mut stdout = open_stream(&vsock, StreamKind::Stdio(1)).await;
        let stderr = open_stream(&vsock, StreamKind::Stdio(2)).await;
        req.oci_spec_json = spec_json();
        req.rootfs = format!("containers/{CONTAINER}/rootfs");
        let mut stdio = Stdio::new();
        stdio.stdout = 1;
        stdio.stderr = 2;
        req.stdio = Some(stdio).into();
        let started = Instant::now();
        let created = match agent.create_container(ctx(), &req).await {
            Ok(created) => created,
            // libcontainer's child logs to the container's stderr.
            Err(err) => panic!(
                "{}\ncontainer stderr:\n{}",
                status::message(&err),
                read_to_eof(stderr).await
            ),
        };
        assert!(created.pid > 1);
        expect_code(
            agent.create_container(ctx(), &req).await,
            Code::ALREADY_EXISTS,
            "container \"c1\" already exists",
        );
        let mut start = StartContainerRequest::new();
        start.container_id = CONTAINER.into();
        agent.start_container(ctx(), &start).await.unwrap();
        expect_code(
            agent.start_container(ctx(), &start).await,
            Code::FAILED_PRECONDITION,
            "container c1 is Running",
        );
        let out = read_until(&mut stdout, "mkdir-denied").await;
        eprintln!("create+start to output: {:?}", started.elapsed());
        assert!(out.contains("hello from web"), "{out:?}");
        assert!(
            out.contains("mkdir-denied"),
            "seccomp refused mkdir: {out:?}"
        );

        // An exec: stdin stream to stdout stream.
        let mut exec_in = open_stream(&vsock, StreamKind::Stdio(3)).await;
        let exec_out = open_stream(&vsock, StreamKind::Stdio(4)).await;
        let mut exec = ExecProcessRequest::new();
        exec.container_id = CONTAINER.into();
        exec.exec_id = "e1".into();
        exec.process_json = serde_json::json!({
            "args": ["sh", "-c", "echo exec-out; cat; echo done"],
            "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}
        })
        .to_string();
        let mut estdio = Stdio::new();
        estdio.stdin = 3;
        estdio.stdout = 4;
        exec.stdio = Some(estdio).into();
        let epid = agent.exec_process(ctx(), &exec).await.unwrap().pid;
        assert!(epid > 1);
        exec_in.write_all(b"ping\n").await.unwrap();
        exec_in.shutdown().await.unwrap();
        let mut wait = WaitProcessRequest::new();
        wait.container_id = CONTAINER.into();
        wait.exec_id = "e1".into();
        let (waited, exec_text) =
            tokio::join!(agent.wait_process(ctx(), &wait), read_to_eof(exec_out));
        let waited = waited.unwrap();
        assert_eq!(
            (waited.exit_status, waited.signal, waited.pid),
            (0, 0, epid)
        );
        assert_eq!(exec_text, "exec-out\nping\ndone\n");

        // The guest's tree is not in the container's mount namespace: the
        // agent left the initramfs at boot, so libcontainer pivot_root'ed
        // and unmounted the guest's root. Docker's default capabilities
        // (CAP_SYS_CHROOT among them): no /run/isola, / is the one root
        // in mountinfo, and a chroot climbed out of ends in the chroot.
        let (status, text) = run_exec(
            &agent,
            &vsock,
            "isolation",
            5,
            &[
                "ls /run/isola 2>&1 || echo no-run-isola",
                "awk '$5 == \"/\"' /proc/self/mountinfo | wc -l",
                "grep -c ' - rootfs ' /proc/self/mountinfo",
                "cd / && chroot /bin /busybox sh -c 'cd ../../..; pwd; /busybox ls -d proc busybox'",
                // Default signal state (the agent ignores SIGPIPE): yes
                // dies of SIGPIPE quietly, and sh passes nothing ignored
                // or blocked on (it keeps what it was started with
                // ignored; it ignores SIGQUIT itself, hence /proc/self).
                "yes | head -c 2",
                "grep -E '^Sig(Blk|Ign)' /proc/self/status",
                "echo end",
            ]
            .join("; "),
            DOCKER_DEFAULT_CAPS,
        )
        .await;
        assert_eq!(status, 0, "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "ls: /run/isola: No such file or directory",
                "no-run-isola",
                "1",
                "0",
                "/",
                "ls: proc: No such file or directory",
                "busybox",
                "y",
                "SigBlk:\t0000000000000000",
                "SigIgn:\t0000000000000000",
                "end",
            ],
            "{text}"
        );
        // With CAP_SYS_ADMIN a process can detach its root (as under
        // runc), uncovering the bottom of its mount namespace, which the
        // next exec enters. After pivot_root that is the kernel's empty
        // rootfs: the agent's binary (/init) is not there. (With no_pivot
        // it was the guest's whole tree, /init and /run/isola included.)
        let mut all_caps = DOCKER_DEFAULT_CAPS.to_vec();
        all_caps.push("CAP_SYS_ADMIN");
        let (status, text) = run_exec(
            &agent,
            &vsock,
            "umount",
            6,
            "umount -l / && echo unmounted",
            &all_caps,
        )
        .await;
        assert_eq!((status, text.as_str()), (0, "unmounted\n"));
        let mut beneath = ExecProcessRequest::new();
        beneath.container_id = CONTAINER.into();
        beneath.exec_id = "beneath".into();
        beneath.process_json = serde_json::json!({
            "args": ["/init"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": all_caps, "effective": all_caps, "permitted": all_caps}
        })
        .to_string();
        let err = agent
            .exec_process(ctx(), &beneath)
            .await
            .expect_err("/init (the agent) found beneath the container's root");
        eprintln!("exec of /init beneath the root: {}", status::message(&err));

        let mut list = ListProcessesRequest::new();
        list.container_id = CONTAINER.into();
        let procs = agent.list_processes(ctx(), &list).await.unwrap();
        assert!(
            procs
                .processes
                .iter()
                .any(|p| p.cmdline.starts_with("sleep 1000")),
            "{:?}",
            procs.processes
        );

        let mut stats = StatsContainerRequest::new();
        stats.container_id = CONTAINER.into();
        let stats = agent.stats_container(ctx(), &stats).await.unwrap();
        assert!(stats.memory.usage_bytes > 0);
        assert_eq!(stats.memory.limit_bytes, 134217728);
        assert_eq!(stats.pids.limit, 64);

        // Removing a running container without force is refused.
        let mut rm = RemoveContainerRequest::new();
        rm.container_id = CONTAINER.into();
        expect_code(
            agent.remove_container(ctx(), &rm).await,
            Code::FAILED_PRECONDITION,
            "container c1 is Running",
        );

        // SIGKILL of the init: 137, and its streams close.
        let mut sig = SignalProcessRequest::new();
        sig.container_id = CONTAINER.into();
        sig.signal = 9;
        agent.signal_process(ctx(), &sig).await.unwrap();
        wait.exec_id = String::new();
        let (waited, rest, err_text) = tokio::join!(
            agent.wait_process(ctx(), &wait),
            read_to_eof(stdout),
            read_to_eof(stderr)
        );
        let waited = waited.unwrap();
        assert_eq!((waited.exit_status, waited.signal), (137, 9));
        assert!(waited.exited_at_ns > 0);
        assert!(rest.is_empty(), "{rest:?}");
        assert_eq!(err_text, "oops\n");
        // A waiter after the exit gets the same answer.
        assert_eq!(
            agent.wait_process(ctx(), &wait).await.unwrap().exit_status,
            137
        );

        // The exits in the event ring, in order.
        let mut ev = WaitEventRequest::new();
        let first = agent.wait_event(ctx(), &ev).await.unwrap();
        assert_eq!((first.seq, first.missed), (1, 0));
        assert_eq!(first.exited().exec_id, "e1");
        ev.after = first.seq;
        for exec_id in ["isolation", "umount"] {
            let next = agent.wait_event(ctx(), &ev).await.unwrap();
            assert_eq!(next.exited().exec_id, exec_id);
            ev.after = next.seq;
        }
        let last = agent.wait_event(ctx(), &ev).await.unwrap();
        assert_eq!(last.exited().exit_status, 137);

        agent.remove_container(ctx(), &rm).await.unwrap();
        expect_code(
            agent.remove_container(ctx(), &rm).await,
            Code::NOT_FOUND,
            "container \"c1\" not found",
        );

        let logged = read_until(&mut log, "container removed").await;
        assert!(logged.contains("sandbox created"), "{logged}");

        // containerd's spec for a Bidirectional volume (Docker's for
        // `:rshared`): the root and the bind rshared, in runc's names
        // (issue 17, item 8: "failed to prepare rootfs" at create). The bind
        // is a shared mount in the container, so mounts under it propagate
        // in the guest as in runc's container on a host.
        let shared_out = open_stream(&vsock, StreamKind::Stdio(20)).await;
        let mut shared = CreateContainerRequest::new();
        shared.container_id = "rshared".into();
        shared.rootfs = "containers/rshared/rootfs".into();
        let caps = [DOCKER_DEFAULT_CAPS, &["CAP_SYS_ADMIN"]].concat();
        shared.oci_spec_json = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "args": ["sh", "-c", "exec 2>&1; grep ' /vol ' /proc/self/mountinfo; \
                    mkdir -p /vol/inner && mount -t tmpfs none /vol/inner && echo mounted"],
                "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps}
            },
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                {"destination": "/vol", "type": "bind",
                 "source": "/run/isola/share/containers/rshared/volumes/0",
                 "options": ["rbind", "rshared", "rw"]}
            ],
            "linux": {"rootfsPropagation": "rshared"}
        })
        .to_string();
        let mut stdio = Stdio::new();
        stdio.stdout = 20;
        shared.stdio = Some(stdio).into();
        if let Err(err) = agent.create_container(ctx(), &shared).await {
            panic!("an rshared container: {}", status::message(&err));
        }
        let mut start = StartContainerRequest::new();
        start.container_id = "rshared".into();
        agent.start_container(ctx(), &start).await.unwrap();
        let mut wait = WaitProcessRequest::new();
        wait.container_id = "rshared".into();
        let (waited, text) =
            tokio::join!(agent.wait_process(ctx(), &wait), read_to_eof(shared_out));
        assert_eq!(waited.unwrap().exit_status, 0, "{text}");
        let vol_line = text.lines().next().unwrap_or_default();
        assert!(vol_line.contains(" shared:"), "/vol is not shared: {text}");
        assert!(text.contains("mounted"), "{text}");
        rm.container_id = "rshared".into();
        agent.remove_container(ctx(), &rm).await.unwrap();

        agent
            .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
            .await
            .unwrap();
    });
    let status = vm.wait_exit(SHUTDOWN_DEADLINE).unwrap();
    assert!(status.success(), "{status}: {}", vm.log().join("\n"));
}
