//! containerd → containerd-shim-isola-v2 → a microVM per sandbox, driven
//! with Debian's containerd 1.6 and `ctr` as users drive it. One private
//! containerd serves every test of this binary (tests/containerd/start).
//! Every test checks that its sandboxes left nothing behind.

#![allow(clippy::unwrap_used)] // a test: a panic is its failure report

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use isola_e2e::containerd::*;
use isola_e2e::require_kvm_host;

fn stdout(out: &std::process::Output) -> String {
    text(&out.stdout)
}

fn report(c: &Containerd, what: &str, out: &std::process::Output) -> String {
    let log = c.log();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    format!(
        "{what}: status {:?}\nstdout: {}\nstderr: {}\ncontainerd log (last lines, newest first):\n{}",
        out.status.code(),
        stdout(out),
        text(&out.stderr),
        tail.join("\n")
    )
}

#[test]
fn ctr_run_prints_exits_with_the_status_and_rm_leaves_nothing() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let host = text(
        &std::process::Command::new("uname")
            .arg("-r")
            .output()?
            .stdout,
    );
    let out = c.run_rm(
        BUSYBOX,
        "echo1",
        &["sh", "-c", "echo hello from isola; uname -r"],
    )?;
    ensure!(out.status.success(), "{}", report(c, "ctr run echo", &out));
    let printed = stdout(&out);
    let mut lines = printed.lines();
    ensure!(lines.next() == Some("hello from isola"), "{printed:?}");
    let guest = lines.next().unwrap_or("");
    ensure!(
        !guest.is_empty() && guest != host.trim(),
        "the container's kernel ({guest}) must be the VM's, not the host's ({})",
        host.trim()
    );
    c.assert_clean("echo1")?;

    let out = c.run_rm(
        BUSYBOX,
        "exit3",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    )?;
    ensure!(code(&out) == 3, "{}", report(c, "exit 3", &out));
    ensure!(stdout(&out) == "out\n", "{}", report(c, "exit 3", &out));
    ensure!(
        text(&out.stderr).contains("err"),
        "{}",
        report(c, "exit 3", &out)
    );
    c.assert_clean("exit3")?;
    let out = c.ctr(&["container", "ls", "-q"])?;
    ensure!(
        !stdout(&out).lines().any(|l| l == "echo1" || l == "exit3"),
        "--rm left containers: {}",
        stdout(&out)
    );
    Ok(())
}

#[test]
fn env_cwd_and_user_come_from_the_image_config() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let out = c.run_rm(
        BUSYBOX_USER,
        "imgcfg",
        &["sh", "-c", "echo $GREETING; pwd; id -u; id -g"],
    )?;
    ensure!(out.status.success(), "{}", report(c, "image config", &out));
    ensure!(
        stdout(&out) == "hello-from-image\n/home/user\n1000\n1000\n",
        "{}",
        report(c, "image config", &out)
    );
    c.assert_clean("imgcfg")
}

#[test]
fn ctr_run_t_gives_the_container_a_terminal() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let (status, printed) = c.ctr_on_pty(&[
        "run",
        "-t",
        "--rm",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        "tty1",
        "sh",
        "-c",
        "tty; exit 4",
    ])?;
    ensure!(status == 4, "status {status}: {printed}");
    ensure!(printed.contains("/dev/pts/"), "no terminal: {printed:?}");
    c.assert_clean("tty1")
}

#[test]
fn a_running_container_execs_pauses_reports_and_is_killed() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let id = "long1";
    // In the foreground, in the background: its exit status is ctr's.
    let run = c
        .command(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            BUSYBOX,
            id,
            "sh",
            "-c",
            "trap 'echo got TERM; exit 42' TERM; while :; do sleep 1; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    c.wait_status(id, "RUNNING")?;

    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        id,
        "sh",
        "-c",
        "echo exec says hi; exit 5",
    ])?;
    ensure!(code(&out) == 5, "{}", report(c, "exec", &out));
    ensure!(
        stdout(&out) == "exec says hi\n",
        "{}",
        report(c, "exec", &out)
    );

    let (status, printed) = c.ctr_on_pty(&["task", "exec", "-t", "--exec-id", "e2", id, "tty"])?;
    ensure!(
        status == 0 && printed.contains("/dev/pts/"),
        "exec -t: {status}: {printed:?}"
    );

    let out = c.ctr(&["task", "ps", id])?;
    ensure!(out.status.success(), "{}", report(c, "ps", &out));
    let pids = stdout(&out)
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count();
    ensure!(
        pids >= 2,
        "ctr task ps shows {pids} processes: {}",
        stdout(&out)
    );

    let out = c.ctr(&["task", "metrics", id])?;
    ensure!(out.status.success(), "{}", report(c, "metrics", &out));
    let metrics = stdout(&out);
    let value = |name: &str| -> Option<u64> {
        metrics
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    ensure!(
        value("memory.usage").unwrap_or(0) > 0,
        "no memory usage: {metrics}"
    );
    ensure!(value("cpu.usage_usec").is_some(), "no cpu usage: {metrics}");

    let out = c.ctr(&["task", "pause", id])?;
    ensure!(out.status.success(), "{}", report(c, "pause", &out));
    c.wait_status(id, "PAUSED")?;
    let out = c.ctr(&["task", "resume", id])?;
    ensure!(out.status.success(), "{}", report(c, "resume", &out));
    c.wait_status(id, "RUNNING")?;

    let out = c.ctr(&["task", "kill", "--signal", "SIGTERM", id])?;
    ensure!(out.status.success(), "{}", report(c, "kill TERM", &out));
    let out = wait_output(run, CTR_DEADLINE)?;
    ensure!(code(&out) == 42, "{}", report(c, "after SIGTERM", &out));
    ensure!(
        stdout(&out).contains("got TERM"),
        "{}",
        report(c, "after SIGTERM", &out)
    );
    c.assert_clean(id)?;

    // SIGKILL: the init ignores nothing it cannot.
    let id = "long2";
    let run = c
        .command(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            BUSYBOX,
            id,
            "sh",
            "-c",
            "trap '' TERM; while :; do sleep 1; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    c.wait_status(id, "RUNNING")?;
    let out = c.ctr(&["task", "kill", "--signal", "SIGKILL", id])?;
    ensure!(out.status.success(), "{}", report(c, "kill KILL", &out));
    let out = wait_output(run, CTR_DEADLINE)?;
    ensure!(code(&out) == 137, "{}", report(c, "after SIGKILL", &out));
    c.assert_clean(id)
}

#[test]
fn containers_annotated_into_one_cri_sandbox_share_its_vm() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let sandbox = [
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
    ];
    let member = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
    ];
    let mut args = vec!["run", "-d", "--runtime", RUNTIME];
    args.extend_from_slice(&sandbox);
    args.extend_from_slice(&[BUSYBOX, "pod1", "sleep", "100000"]);
    let out = c.ctr(&args)?;
    ensure!(out.status.success(), "{}", report(c, "pod1", &out));
    let mut args = vec!["run", "-d", "--runtime", RUNTIME];
    args.extend_from_slice(&member);
    args.extend_from_slice(&[BUSYBOX, "pod1-c2", "sleep", "100000"]);
    let out = c.ctr(&args)?;
    ensure!(out.status.success(), "{}", report(c, "pod1-c2", &out));
    c.wait_status("pod1-c2", "RUNNING")?;

    let boot_id = |id: &str| -> Result<String> {
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "b",
            id,
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ])?;
        ensure!(out.status.success(), "{}", report(c, "boot_id", &out));
        Ok(stdout(&out))
    };
    let (a, b) = (boot_id("pod1")?, boot_id("pod1-c2")?);
    ensure!(a == b, "one VM has one boot id: {a:?} vs {b:?}");
    let vmms: Vec<_> = c
        .helpers("pod1")
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("isola-vmm"))
        .collect();
    ensure!(vmms.len() == 1, "one isola-vmm for the pod: {vmms:?}");
    ensure!(
        c.helpers("pod1-c2").is_empty(),
        "the member has no VM of its own"
    );
    ensure!(
        c.shim_pid("pod1-c2").is_none(),
        "the member has no shim of its own"
    );

    for id in ["pod1-c2", "pod1"] {
        let out = c.ctr(&["task", "kill", "--signal", "SIGKILL", id])?;
        ensure!(out.status.success(), "{}", report(c, "kill", &out));
        c.wait_status(id, "STOPPED")?;
        let out = c.ctr(&["task", "delete", id])?;
        ensure!(out.status.success(), "{}", report(c, "task delete", &out));
        let out = c.ctr(&["container", "delete", id])?;
        ensure!(
            out.status.success(),
            "{}",
            report(c, "container delete", &out)
        );
    }
    c.assert_clean("pod1")
}

#[test]
fn five_containers_started_in_parallel_all_run() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let started = Instant::now();
    let runs: Vec<_> = (1..=5)
        .map(|i| {
            let id = format!("par{i}");
            let child = c
                .command(&[
                    "run",
                    "--rm",
                    "--runtime",
                    RUNTIME,
                    BUSYBOX,
                    &id,
                    "echo",
                    &format!("container {i}"),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn();
            (i, id, child)
        })
        .collect();
    for (i, id, child) in runs {
        let out = wait_output(child?, CTR_DEADLINE * 2)?;
        ensure!(
            out.status.success() && stdout(&out) == format!("container {i}\n"),
            "{}",
            report(c, &id, &out)
        );
    }
    eprintln!("five in parallel: {:.1} s", started.elapsed().as_secs_f64());
    for i in 1..=5 {
        c.assert_clean(&format!("par{i}"))?;
    }
    Ok(())
}

#[test]
fn a_killed_vmm_ends_the_task_and_leaves_nothing() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let id = "vmmkill";
    let run = c
        .command(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            BUSYBOX,
            id,
            "sleep",
            "100000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    c.wait_status(id, "RUNNING")?;
    let vmm = c
        .helpers(id)
        .into_iter()
        .find(|(_, cmd)| cmd.contains("isola-vmm"))
        .map(|(pid, _)| pid);
    let Some(vmm) = vmm else {
        anyhow::bail!("no isola-vmm for {id}: {:?}", c.helpers(id));
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm as i32),
        nix::sys::signal::SIGKILL,
    )?;
    let out = wait_output(run, CTR_DEADLINE)?;
    ensure!(code(&out) != 0, "{}", report(c, "after the VMM died", &out));
    let log = c.log();
    ensure!(
        log.lines().any(|l| l.contains("isola-vmm")
            && l.contains("killed by signal 9")
            && l.contains(&format!("sandbox={id}"))),
        "the shim's log does not say the VMM was killed"
    );
    c.assert_clean(id)
}

#[test]
fn a_killed_shim_is_cleaned_up_by_the_delete_action() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let id = "shimkill";
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        id,
        "sleep",
        "100000",
    ])?;
    ensure!(out.status.success(), "{}", report(c, "run -d", &out));
    c.wait_status(id, "RUNNING")?;
    let shim = c
        .shim_pid(id)
        .ok_or_else(|| anyhow::anyhow!("no shim for {id}"))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim as i32),
        nix::sys::signal::SIGKILL,
    )?;
    // containerd notices the shim is gone; delete goes through the
    // binary's delete action.
    let deadline = Instant::now() + CTR_DEADLINE;
    loop {
        let out = c.ctr(&["task", "delete", "--force", id])?;
        if out.status.success() || c.task_status(id)?.is_none() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{}",
            report(c, "task delete", &out)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = c.ctr(&["container", "delete", id])?;
    ensure!(
        out.status.success(),
        "{}",
        report(c, "container delete", &out)
    );
    c.assert_clean(id)
}

#[test]
fn a_restarted_containerd_finds_the_running_task() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let id = "survivor";
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        id,
        "sleep",
        "100000",
    ])?;
    ensure!(out.status.success(), "{}", report(c, "run -d", &out));
    c.wait_status(id, "RUNNING")?;
    c.restart()?;
    c.wait_status(id, "RUNNING")?;
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "after",
        id,
        "echo",
        "still here",
    ])?;
    ensure!(
        stdout(&out) == "still here\n",
        "{}",
        report(c, "exec after restart", &out)
    );
    let out = c.ctr(&["task", "kill", "--signal", "SIGKILL", id])?;
    ensure!(out.status.success(), "{}", report(c, "kill", &out));
    c.wait_status(id, "STOPPED")?;
    for args in [["task", "delete", id], ["container", "delete", id]] {
        let out = c.ctr(&args)?;
        ensure!(out.status.success(), "{}", report(c, "delete", &out));
    }
    c.assert_clean(id)
}

#[test]
fn a_command_missing_from_the_image_fails_clearly() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let out = c.run_rm(BUSYBOX, "nocmd", &["no-such-command", "arg"])?;
    ensure!(
        !out.status.success(),
        "{}",
        report(c, "missing command", &out)
    );
    let err = text(&out.stderr);
    ensure!(
        err.contains("no-such-command"),
        "ctr's error does not name the command: {err}"
    );
    // ctr run --rm does not delete a container whose task never started.
    let _ = c.ctr(&["container", "delete", "nocmd"]);
    c.assert_clean("nocmd")
}
