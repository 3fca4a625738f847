//! The host side of a running sandbox, as an attacker would try it
//! (issue 18): another host user, a hostile image, a guest's root. One
//! sandbox for the checks that need a VM; the image checks need none.

#![allow(clippy::unwrap_used)] // a test: a panic is its failure report

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use isola_e2e::containers::*;
use isola_e2e::{require_kvm_host, Scratch};
use isola_sandbox::{ContainerRequest, Sandbox, StdioRequest, Volume};
use oci_spec::runtime::{Capability, LinuxCapabilities, LinuxDeviceCgroup, Process, Spec};

fn runtime() -> tokio::runtime::Runtime {
    log_to_test_output();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// What the jail promises, seen from the host: the supervisor `pid`'s
/// only child is pid 1 of its own pid namespace, in mount, IPC, UTS and
/// network namespaces of its own (the network one not the supervisor's
/// either), a user and group of the jail's range, no capabilities in any
/// set, no_new_privs, seccomp on, an empty root, the supervisor's cgroup.
fn check_jailed(pid: u32) -> Result<()> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?;
    let kids: Vec<u32> = children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect();
    ensure!(kids.len() == 1, "isola-vmm {pid} has children {kids:?}");
    let vm = kids[0];
    let status = std::fs::read_to_string(format!("/proc/{vm}/status"))?;
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or("")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let uid = field("Uid:");
    let first: u32 = uid.split(' ').next().unwrap_or("").parse()?;
    ensure!(
        first >= isola_sandbox::jail::DEFAULT_FIRST_UID
            && uid == vec![first.to_string(); 4].join(" ")
            && field("Gid:") == uid,
        "the jailed VMM runs as Uid {uid} Gid {}",
        field("Gid:")
    );
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        ensure!(
            u64::from_str_radix(&field(set), 16) == Ok(0),
            "the jailed VMM holds {set} {}",
            field(set)
        );
    }
    ensure!(
        field("NoNewPrivs:") == "1",
        "no_new_privs is {}",
        field("NoNewPrivs:")
    );
    ensure!(
        field("Seccomp:") == "2",
        "seccomp mode {}",
        field("Seccomp:")
    );
    ensure!(
        field("NSpid:") == format!("{vm} 1"),
        "NSpid {}",
        field("NSpid:")
    );
    let ns = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok();
    for kind in ["mnt", "pid", "ipc", "uts", "net"] {
        let jailed = ns(&vm.to_string(), kind);
        ensure!(jailed.is_some(), "no {kind} namespace for {vm}");
        ensure!(
            jailed != ns("self", kind) && jailed != ns(&pid.to_string(), kind),
            "the jailed VMM shares the {kind} namespace {jailed:?}"
        );
    }
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{vm}/root"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    ensure!(root.is_empty(), "the jail's root holds {root:?}");
    let cgroup = |p: u32| std::fs::read_to_string(format!("/proc/{p}/cgroup")).ok();
    ensure!(
        cgroup(vm) == cgroup(pid),
        "the jailed VMM left its supervisor's cgroup"
    );
    Ok(())
}

/// Whether uid and gid 65534, with no supplementary groups, can run
/// `cmd` on `path` successfully.
fn nobody_can(cmd: &str, path: &Path) -> bool {
    Command::new(cmd)
        .arg(path)
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The per-mount options of every mount at or below `dir` in the host's
/// mount namespace.
fn mount_options_below(dir: &Path) -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let point = PathBuf::from(fields.get(4)?.replace("\\040", " "));
            point
                .starts_with(dir)
                .then(|| (point, fields.get(5).unwrap_or(&"").to_string()))
        })
        .collect()
}

/// The effective capabilities of `pid`'s first child (the process a
/// sandboxed virtiofsd serves from), or of `pid` if it has none.
fn serving_caps(pid: u32) -> Option<u64> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    let serving = children
        .split_whitespace()
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or(pid);
    let status = std::fs::read_to_string(format!("/proc/{serving}/status")).ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// `process` holding, beyond runc's default capabilities, those a root
/// container uses on files it owns or makes.
fn with_file_caps(mut process: Process) -> Process {
    let caps: std::collections::HashSet<Capability> = [
        Capability::AuditWrite,
        Capability::Kill,
        Capability::NetBindService,
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fowner,
        Capability::Fsetid,
        Capability::Mknod,
    ]
    .into_iter()
    .collect();
    let mut set = LinuxCapabilities::default();
    set.set_bounding(Some(caps.clone()))
        .set_effective(Some(caps.clone()))
        .set_permitted(Some(caps));
    process.set_capabilities(Some(set));
    process
}

/// runc's default spec over `rootfs` running `args` with
/// [`with_file_caps`], every device allowed by its cgroup (creating a
/// node then depends on the share alone).
fn root_spec(rootfs: &Path, args: &[&str]) -> Spec {
    let mut spec = spec(rootfs, args);
    if let Some(process) = spec.process().clone() {
        spec.set_process(Some(with_file_caps(process)));
    }
    let mut allow_all = LinuxDeviceCgroup::default();
    allow_all.set_allow(true).set_access(Some("rwm".into()));
    if let Some(resources) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.resources_mut().as_mut())
    {
        resources.set_devices(Some(vec![allow_all]));
    }
    spec
}

const CAP_CHOWN: u64 = 1 << 0;
const CAP_MKNOD: u64 = 1 << 27;
const CAP_SETFCAP: u64 = 1 << 31;

#[test]
fn a_running_sandbox_is_closed_to_other_host_users_and_its_share_is_inert() {
    require_kvm_host().unwrap();
    let rt = runtime();
    let run_root = run_root("security");
    let id = format!("e2e-security-{}", std::process::id());
    if let Err(err) = rt.block_on(closed_sandbox(&id, &run_root)) {
        eprintln!("console of {id}:\n{}", console_tail(&id, 60));
        panic!("{err:#}");
    }
}

async fn closed_sandbox(id: &str, run_root: &Path) -> Result<()> {
    let rootfs = busybox_rootfs()?;
    let scratch = Scratch::new("security")?;
    // An emptyDir-like volume the container writes, in an open directory.
    let vol = scratch.path.join("vol");
    std::fs::create_dir_all(&vol)?;
    std::fs::set_permissions(&scratch.path, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(vol.join("secret"), b"tenant data\n")?;
    std::fs::set_permissions(vol.join("secret"), std::fs::Permissions::from_mode(0o644))?;
    let sandbox = Sandbox::start(sandbox_config(id, run_root, 256)?).await?;
    let dir = sandbox.dir().to_path_buf();
    let pids = sandbox.helper_pids();
    sandbox
        .create_container(ContainerRequest {
            id: "main".into(),
            spec: root_spec(&rootfs, &["sleep", "100000"]),
            rootfs: rootfs.clone(),
            volumes: vec![Volume {
                host: vol.clone(),
                guest: "/vol".into(),
                readonly: false,
            }],
            stdio: StdioRequest {
                stdin: false,
                stdout: false,
                stderr: false,
                terminal: None,
            },
        })
        .await?;
    sandbox.start_container("main").await?;

    // Another host user: the volume's source is open to it, the same
    // files through the run root are not.
    ensure!(
        nobody_can("/bin/cat", &vol.join("secret")),
        "the test's source should be readable"
    );
    for path in [
        run_root.to_path_buf(),
        dir.clone(),
        dir.join("rw/containers/main/rootfs"),
    ] {
        ensure!(
            !nobody_can("/bin/ls", &path),
            "uid 65534 listed {}",
            path.display()
        );
    }
    for path in [
        dir.join("rw/containers/main/volumes/0/secret"),
        dir.join("ro/containers/main/volumes/0/secret"),
    ] {
        ensure!(
            !nobody_can("/bin/cat", &path),
            "uid 65534 read {}",
            path.display()
        );
    }

    // Every mount of the share on the host is nosuid,nodev.
    let mounts = mount_options_below(&dir);
    ensure!(mounts.len() >= 7, "too few share mounts: {mounts:?}");
    for (point, options) in &mounts {
        let options: Vec<&str> = options.split(',').collect();
        ensure!(
            options.contains(&"nosuid") && options.contains(&"nodev"),
            "{} is mounted {options:?}",
            point.display()
        );
    }

    // virtiofsd serves without CAP_MKNOD and CAP_SETFCAP, with CAP_CHOWN.
    let (_, fs_pid) = pids
        .iter()
        .find(|(name, _)| name == "virtiofsd")
        .context("no virtiofsd among the helpers")?;
    let caps = serving_caps(*fs_pid).context("virtiofsd's capabilities")?;
    ensure!(
        caps & (CAP_MKNOD | CAP_SETFCAP) == 0,
        "virtiofsd CapEff {caps:x}"
    );
    ensure!(caps & CAP_CHOWN != 0, "virtiofsd lost CAP_CHOWN: {caps:x}");

    // isola-vmm is jailed: the pid the sandbox knows is its supervisor
    // (root, in the host's mount namespace), whose one child runs the VM.
    let (_, vmm_pid) = pids
        .iter()
        .find(|(name, _)| name == "isola-vmm")
        .context("no isola-vmm among the helpers")?;
    check_jailed(*vmm_pid)?;

    // The guest's root, with the file capabilities a root container may
    // hold and every device allowed by its cgroup: chown and chmod (setuid
    // too) reach the host through virtiofsd, a device node does not
    // (virtiofsd serves without CAP_MKNOD: finding 9).
    let done = exec_collect(
        &sandbox,
        "main",
        "owner",
        &with_file_caps(process(&[
            "sh",
            "-c",
            "touch /vol/owned && chown 1000:1000 /vol/owned && chmod 4755 /vol/owned \
             && stat -c owned=%u:%g:%a /vol/owned; \
             mknod /vol/mem c 1 1 && echo made || echo refused",
        ])),
    )
    .await?;
    ensure!(done.stdout == "owned=1000:1000:4755\nrefused\n", "{done:?}");
    let owned = std::fs::metadata(vol.join("owned"))?;
    ensure!(
        (owned.uid(), owned.gid(), owned.mode() & 0o7777) == (1000, 1000, 0o4755),
        "the host sees {}:{} {:o}",
        owned.uid(),
        owned.gid(),
        owned.mode()
    );
    ensure!(!vol.join("mem").exists(), "a device node reached the host");

    sandbox.stop().await?;
    assert_nothing_left(run_root, &dir, &pids)?;
    remove_run_root(run_root);
    Ok(())
}

/// An image whose `/etc/passwd` is a FIFO (it would block a reader for
/// ever): `isola run --user` refuses it at once, naming the file, and
/// starts nothing.
#[test]
fn an_image_with_a_fifo_passwd_is_refused_at_once() {
    require_kvm_host().unwrap();
    let scratch = Scratch::new("fifo-passwd").unwrap();
    let rootfs = scratch.path.join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    let status = Command::new("mkfifo")
        .arg(rootfs.join("etc/passwd"))
        .status()
        .unwrap();
    assert!(status.success());
    let run_root = run_root("fifo-passwd");
    let mut child = Command::new(release_binary("isola").unwrap())
        .args(["run", "--run-root"])
        .arg(&run_root)
        .arg("--rootfs")
        .arg(&rootfs)
        .args(["--user", "1000", "--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A reader of the FIFO would block for ever: a hang guard, not a
    // speed goal.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("isola run hung on a FIFO /etc/passwd");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("/etc/passwd") && stderr.contains("FIFO"),
        "{stderr}"
    );
    let left: Vec<_> = sandbox_dirs(&run_root);
    assert!(left.is_empty(), "left in the run root: {left:?}");
    remove_run_root(&run_root);
}

/// A guest's root flooding the kernel's log (it switches the kernel's
/// `/dev/kmsg` rate limit off, as a compromised guest may, and writes
/// 10000 notice records; the agent follows `/dev/kmsg` into its log at
/// info, which the sandbox's gate admits like errors; notices, because
/// the kernel would also print errors on the kept console, an exit per
/// byte, which slows the guest alone and this test by minutes) leaves
/// containerd's log under a fixed bound: the sandbox's burst plus its rate
/// for as long as it ran, with the drop reported, while far more than
/// that reached the host.
#[test]
fn a_guest_flooding_its_log_leaves_containerds_log_bounded() -> Result<()> {
    use isola_e2e::containerd::{Containerd, BUSYBOX, RUNTIME};
    use isola_sandbox::log_gate::LogGate;
    require_kvm_host()?;
    let c = Containerd::shared();
    let id = "flood1";
    let marker = "isola-flood-";
    let records = 10000;
    let script = format!(
        "echo on > /proc/sys/kernel/printk_devkmsg && i=0 && \
         while [ $i -lt {records} ]; do echo \"<5>{marker}$i\" > /dev/kmsg; i=$((i+1)); done"
    );
    let started = Instant::now();
    let out = c.ctr(&[
        "run",
        "--rm",
        "--privileged",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        id,
        "sh",
        "-c",
        &script,
    ])?;
    ensure!(out.status.success(), "{}", c.report("the flood", &out));
    // The shim is gone: everything it logged is in containerd's log
    // (containerd copies the shim's stderr: wait for the last summary).
    c.assert_clean(id)?;
    let tag = format!("sandbox={id} ");
    let summary = |log: &str| -> u64 {
        log.lines()
            .filter(|l| l.contains(&tag) && l.contains("agent log lines dropped"))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("dropped="))
                    .and_then(|n| {
                        let digits: String = n.chars().take_while(char::is_ascii_digit).collect();
                        digits.parse::<u64>().ok()
                    })
            })
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = c.log();
    while summary(&log) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        log = c.log();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let forwarded = log.lines().filter(|l| l.contains(marker)).count() as f64;
    let dropped = summary(&log) as f64;
    let bound = LogGate::BURST + LogGate::PER_SECOND * elapsed.ceil();
    eprintln!(
        "flood: {records} records in the guest; containerd's log got {forwarded}, \
         {dropped} dropped, bound {bound} for {elapsed:.0} s"
    );
    ensure!(forwarded >= 1.0, "no flood line reached containerd's log");
    ensure!(
        forwarded <= bound,
        "containerd's log got {forwarded} flood lines in {elapsed:.0} s, over the bound {bound}"
    );
    ensure!(
        forwarded + dropped > bound,
        "the flood that reached the host ({forwarded} logged + {dropped} dropped) was not \
         above the bound {bound}: the test proved nothing"
    );
    Ok(())
}
