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
    ensure!(out.status.success(), "{}", c.report("ctr run echo", &out));
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
    ensure!(code(&out) == 3, "{}", c.report("exit 3", &out));
    ensure!(stdout(&out) == "out\n", "{}", c.report("exit 3", &out));
    ensure!(
        text(&out.stderr).contains("err"),
        "{}",
        c.report("exit 3", &out)
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
    ensure!(out.status.success(), "{}", c.report("image config", &out));
    ensure!(
        stdout(&out) == "hello-from-image\n/home/user\n1000\n1000\n",
        "{}",
        c.report("image config", &out)
    );
    c.assert_clean("imgcfg")
}

#[test]
fn terminals_with_cri_length_ids_and_a_host_apparmor_profile() -> Result<()> {
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
    c.assert_clean("tty1")?;

    // CRI's ids are 64 characters (kubectl exec -it): the console socket of
    // an exec with a terminal must still fit a Unix socket address. The
    // container has the AppArmor profile containerd's CRI gives every
    // container on an AppArmor host (and ctr copies it into the exec):
    // the guest has no LSM, so it is not applied, and nothing fails.
    let id = "7".repeat(64);
    let exec_id = "e".repeat(64);
    c.run_detached(
        RUNTIME,
        &["--apparmor-profile", "cri-containerd.apparmor.d"],
        &id,
    )?;
    let (status, printed) =
        c.ctr_on_pty(&["task", "exec", "-t", "--exec-id", &exec_id, &id, "tty"])?;
    let ran = status == 0 && printed.contains("/dev/pts/");
    c.kill_and_remove(&id)?;
    ensure!(ran, "exec -t with 64-character ids: {status}: {printed:?}");
    c.assert_clean(&id)
}

#[test]
fn a_running_container_execs_pauses_reports_and_is_killed() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let id = "long1";
    // In the foreground, in the background: its exit status is ctr's.
    let run = c.spawn(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        id,
        "sh",
        "-c",
        "trap 'echo got TERM; exit 42' TERM; while :; do sleep 1; done",
    ])?;
    c.wait_status(id, "RUNNING")?;
    // isola-vmm and virtiofsd run in the host cgroup containerd gave the
    // sandbox (ctr's cgroupsPath: /<namespace>/<id>).
    let helpers = c.helpers(id);
    ensure!(helpers.len() >= 2, "helpers of {id}: {helpers:?}");
    for (pid, cmd) in &helpers {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        ensure!(
            cgroup.trim() == format!("0::/default/{id}"),
            "{cmd} (pid {pid}) is in cgroup {cgroup:?}, not /default/{id}"
        );
    }

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
    ensure!(code(&out) == 5, "{}", c.report("exec", &out));
    ensure!(
        stdout(&out) == "exec says hi\n",
        "{}",
        c.report("exec", &out)
    );

    let (status, printed) = c.ctr_on_pty(&["task", "exec", "-t", "--exec-id", "e2", id, "tty"])?;
    ensure!(
        status == 0 && printed.contains("/dev/pts/"),
        "exec -t: {status}: {printed:?}"
    );

    // Host pids only: the task's pid, and the one pid its processes show,
    // is the VM's (a guest pid would name an unrelated host process).
    let vmm = vmm_supervisors(&helpers)
        .first()
        .map(|pid| pid.to_string())
        .unwrap_or_default();
    // That pid's network namespace is the VM's own, not the host's.
    ensure_not_in_host_netns(&vmm)?;
    let out = c.ctr(&["task", "ps", id])?;
    ensure!(out.status.success(), "{}", c.report("ps", &out));
    let pids: Vec<String> = stdout(&out)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    ensure!(
        pids == [vmm.clone()],
        "ctr task ps shows {pids:?}, not the VMM's pid {vmm}: {}",
        stdout(&out)
    );
    let out = c.ctr(&["task", "ls"])?;
    let task_pid = stdout(&out)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string));
    ensure!(
        task_pid.as_deref() == Some(vmm.as_str()),
        "ctr task ls: {id}'s pid is {task_pid:?}, not the VMM's {vmm}: {}",
        stdout(&out)
    );

    let out = c.ctr(&["task", "metrics", id])?;
    ensure!(out.status.success(), "{}", c.report("metrics", &out));
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
    ensure!(out.status.success(), "{}", c.report("pause", &out));
    c.wait_status(id, "PAUSED")?;
    let out = c.ctr(&["task", "resume", id])?;
    ensure!(out.status.success(), "{}", c.report("resume", &out));
    c.wait_status(id, "RUNNING")?;

    let out = c.ctr(&["task", "kill", "--signal", "SIGTERM", id])?;
    ensure!(out.status.success(), "{}", c.report("kill TERM", &out));
    let out = wait_output(run, CTR_DEADLINE)?;
    ensure!(code(&out) == 42, "{}", c.report("after SIGTERM", &out));
    ensure!(
        stdout(&out).contains("got TERM"),
        "{}",
        c.report("after SIGTERM", &out)
    );
    c.assert_clean(id)?;

    // SIGKILL: the init ignores nothing it cannot.
    let id = "long2";
    let run = c.spawn(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        id,
        "sh",
        "-c",
        "trap '' TERM; while :; do sleep 1; done",
    ])?;
    c.wait_status(id, "RUNNING")?;
    let out = c.ctr(&["task", "kill", "--signal", "SIGKILL", id])?;
    ensure!(out.status.success(), "{}", c.report("kill KILL", &out));
    let out = wait_output(run, CTR_DEADLINE)?;
    ensure!(code(&out) == 137, "{}", c.report("after SIGKILL", &out));
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
    ensure!(out.status.success(), "{}", c.report("pod1", &out));
    let mut args = vec!["run", "-d", "--runtime", RUNTIME];
    args.extend_from_slice(&member);
    args.extend_from_slice(&[BUSYBOX, "pod1-c2", "sleep", "100000"]);
    let out = c.ctr(&args)?;
    ensure!(out.status.success(), "{}", c.report("pod1-c2", &out));
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
        ensure!(out.status.success(), "{}", c.report("boot_id", &out));
        Ok(stdout(&out))
    };
    let (a, b) = (boot_id("pod1")?, boot_id("pod1-c2")?);
    ensure!(a == b, "one VM has one boot id: {a:?} vs {b:?}");
    let vmms = c.vmms("pod1");
    ensure!(
        vmms.len() == 1,
        "one isola-vmm for the pod: {vmms:?} of {:?}",
        c.helpers("pod1")
    );
    ensure!(
        c.helpers("pod1-c2").is_empty(),
        "the member has no VM of its own"
    );
    ensure!(
        c.shim_pid("pod1-c2").is_none(),
        "the member has no shim of its own"
    );

    for id in ["pod1-c2", "pod1"] {
        c.kill_and_remove(id)?;
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
            let child = c.spawn(&[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                BUSYBOX,
                &id,
                "echo",
                &format!("container {i}"),
            ]);
            (i, id, child)
        })
        .collect();
    for (i, id, child) in runs {
        let out = wait_output(child?, CTR_DEADLINE * 2)?;
        ensure!(
            out.status.success() && stdout(&out) == format!("container {i}\n"),
            "{}",
            c.report(&id, &out)
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
    let run = c.spawn(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        BUSYBOX,
        id,
        "sleep",
        "100000",
    ])?;
    c.wait_status(id, "RUNNING")?;
    let Some(vmm) = c.vmms(id).first().copied() else {
        anyhow::bail!("no isola-vmm for {id}: {:?}", c.helpers(id));
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm as i32),
        nix::sys::signal::SIGKILL,
    )?;
    let out = wait_output(run, CTR_DEADLINE)?;
    ensure!(code(&out) != 0, "{}", c.report("after the VMM died", &out));
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
    c.run_detached(RUNTIME, &[], id)?;
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
            c.report("task delete", &out)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = c.ctr(&["container", "delete", id])?;
    ensure!(
        out.status.success(),
        "{}",
        c.report("container delete", &out)
    );
    c.assert_clean(id)
}

#[test]
fn a_restarted_containerd_finds_the_running_task() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let id = "survivor";
    c.run_detached(RUNTIME, &[], id)?;
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
        c.report("exec after restart", &out)
    );
    c.kill_and_remove(id)?;
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
        c.report("missing command", &out)
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

/// nproc and MemTotal (MiB) inside a container run with `extra` options.
fn vm_size(c: &Containerd, id: &str, extra: &[&str]) -> Result<(u32, u64)> {
    let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        BUSYBOX,
        id,
        "sh",
        "-c",
        "nproc; grep MemTotal /proc/meminfo",
    ]);
    let out = c.ctr(&args)?;
    ensure!(out.status.success(), "{}", c.report(id, &out));
    let printed = stdout(&out);
    let mut lines = printed.lines();
    let nproc = lines.next().and_then(|l| l.trim().parse().ok());
    let mem_kib: Option<u64> = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok());
    c.assert_clean(id)?;
    match (nproc, mem_kib) {
        (Some(n), Some(kib)) => Ok((n, kib / 1024)),
        _ => anyhow::bail!("{id}: cannot read the size from {printed:?}"),
    }
}

#[test]
fn the_vm_is_sized_from_the_config_the_oci_resources_and_allowed_annotations() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    // The config's defaults: 1 vCPU, 256 MiB.
    let (n, mib) = vm_size(c, "size0", &[])?;
    ensure!(
        n == 1 && (180..=256).contains(&mib),
        "default VM: {n} vCPUs, {mib} MiB"
    );
    // Kata's way: the sandbox's limits are added to the defaults.
    let (n, mib) = vm_size(c, "size1", &["--cpus", "1", "--memory-limit", "134217728"])?;
    ensure!(
        n == 2 && (300..=384).contains(&mib),
        "1 CPU + 128 MiB more: {n} vCPUs, {mib} MiB"
    );
    // An annotation the config allows.
    let (n, mib) = vm_size(
        c,
        "size2",
        &["--annotation", "io.isola.config.default_memory_mib=320"],
    )?;
    ensure!(
        n == 1 && (250..=320).contains(&mib),
        "320 MiB by annotation: {n} vCPUs, {mib} MiB"
    );
    // Another config, named by the runtime options (ctr's
    // --runtime-config-path; CRI's options.ConfigPath).
    let alt = c.dir.join("isola-alt.toml");
    let base = std::fs::read_to_string(c.dir.join("isola.toml"))?;
    std::fs::write(
        &alt,
        base.replace("[hypervisor]\n", "[hypervisor]\ndefault_memory_mib = 288\n"),
    )?;
    let (n, mib) = vm_size(
        c,
        "size5",
        &["--runtime-config-path", &alt.to_string_lossy()],
    )?;
    ensure!(
        n == 1 && (220..=288).contains(&mib),
        "288 MiB by another config: {n} vCPUs, {mib} MiB"
    );
    // One it does not.
    let out = c.run_rm(BUSYBOX, "size3", &["true"])?;
    ensure!(out.status.success(), "{}", c.report("size3", &out));
    let out = c.run_rm_annotated("io.isola.config.default_vcpus=2", "size4", &["true"])?;
    let err = text(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("io.isola.config.default_vcpus")
            && err.contains("enable_annotations"),
        "{}",
        c.report("a refused annotation", &out)
    );
    let _ = c.ctr(&["container", "delete", "size4"]);
    c.assert_clean("size4")
}

#[test]
fn stdin_is_delivered_and_closed_and_log_uris_receive_the_output() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    // stdin from a pipe: cat ends when ctr's stdin ends (CloseIO).
    let mut run = c
        .command(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            BUSYBOX,
            "stdin1",
            "sh",
            "-c",
            "cat; echo done",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // ctr sends CloseIO on stdin's EOF only once its task exists (an EOF
    // before that leaves the FIFO open, with runc as with isola).
    c.wait_status("stdin1", "RUNNING")?;
    {
        use std::io::Write;
        let mut stdin = run
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        stdin.write_all(b"line one\nline two\n")?;
    }
    let out = wait_output(run, CTR_DEADLINE)?;
    ensure!(
        out.status.success() && stdout(&out) == "line one\nline two\ndone\n",
        "{}",
        c.report("stdin", &out)
    );
    c.assert_clean("stdin1")?;

    // file://: both streams appended to the file.
    let logs = c.dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let file = logs.join("file1.log");
    let uri = format!("file://{}", file.display());
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--log-uri",
        &uri,
        BUSYBOX,
        "file1",
        "sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2",
    ])?;
    ensure!(out.status.success(), "{}", c.report("file log-uri", &out));
    let written = std::fs::read_to_string(&file).unwrap_or_default();
    ensure!(
        written.contains("to-stdout\n") && written.contains("to-stderr\n"),
        "{} has {written:?}",
        file.display()
    );
    c.assert_clean("file1")?;

    // binary://: a logging binary gets stdout on fd 3, stderr on fd 4.
    let script = logs.join("logger.sh");
    let out_file = logs.join("binary1.log");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec 5>&-\n{{ cat <&3 | sed 's/^/out: /'; }} >> {o} &\n{{ cat <&4 | sed 's/^/err: /'; }} >> {o}.err\nwait\n",
            o = out_file.display()
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let uri = format!("binary://{}", script.display());
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--log-uri",
        &uri,
        BUSYBOX,
        "binary1",
        "sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2",
    ])?;
    ensure!(out.status.success(), "{}", c.report("binary log-uri", &out));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = std::fs::read_to_string(&out_file).unwrap_or_default();
        let e = std::fs::read_to_string(format!("{}.err", out_file.display())).unwrap_or_default();
        if o == "out: to-stdout\n" && e == "err: to-stderr\n" {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the logging binary wrote {o:?} and {e:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.assert_clean("binary1")
}

#[test]
fn task_events_reach_containerd_oom_included() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let id = "events1";
    let events = c
        .command(&["events"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    c.run_detached(RUNTIME, &["--memory-limit", "33554432"], id)?;
    for args in [["task", "pause", id], ["task", "resume", id]] {
        let out = c.ctr(&args)?;
        ensure!(out.status.success(), "{}", c.report("pause/resume", &out));
    }
    let out = c.ctr(&["task", "checkpoint", id])?;
    ensure!(
        !out.status.success() && text(&out.stderr).contains("does not checkpoint"),
        "{}",
        c.report("checkpoint", &out)
    );
    // 32 MiB of memory: this exec is OOM-killed in the guest.
    c.exec_memory_hog(id)?;
    c.kill_and_remove(id)?;
    c.assert_clean(id)?;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(events.id() as i32),
        nix::sys::signal::SIGTERM,
    );
    let seen = stdout(&wait_output(events, CTR_DEADLINE)?);
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/oom",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        ensure!(
            seen.lines().any(|l| l.contains(topic) && l.contains(id)),
            "no {topic} event for {id} in:\n{seen}"
        );
    }
    Ok(())
}

#[test]
fn isola_check_passes_on_the_kvm_host_with_this_containerd() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let project = isola_e2e::project_dir();
    let path = format!(
        "{}:{}",
        project.join("target/release").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new(project.join("target/release/isola"))
        .arg("check")
        .arg("--config")
        .arg(c.dir.join("isola.toml"))
        .arg("--containerd-address")
        .arg(&c.sock)
        .env("PATH", path)
        .output()?;
    let printed = stdout(&out);
    eprintln!("{printed}");
    for name in [
        "kvm",
        "/dev/kvm",
        "/dev/net/tun",
        "config",
        "isola-vmm",
        "guest kernel",
        "guest initrd",
        "versions",
        "virtiofsd",
        "containerd",
        "containerd-shim-isola-v2",
    ] {
        ensure!(
            printed
                .lines()
                .any(|l| l.starts_with(&format!("ok   {name}:"))),
            "`isola check` does not pass `{name}` on this KVM host:\n{printed}"
        );
    }
    // Huge pages depend on the host's settings; the verdict must match.
    let failed = printed.lines().any(|l| l.starts_with("FAIL "));
    ensure!(
        out.status.success() != failed,
        "exit status {:?} with FAIL lines: {failed}",
        out.status.code()
    );
    Ok(())
}

#[test]
fn a_rootfs_directory_without_snapshot_mounts_works() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let rootfs = isola_e2e::containers::busybox_rootfs()?;
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--rootfs",
        &rootfs.to_string_lossy(),
        "rootfs1",
        "/bin/sh",
        "-c",
        "echo from a rootfs directory",
    ])?;
    ensure!(
        out.status.success() && stdout(&out) == "from a rootfs directory\n",
        "{}",
        c.report("--rootfs", &out)
    );
    c.assert_clean("rootfs1")
}

/// Update (which `ctr` 1.6 has no command for), called on the shim's own
/// socket as containerd calls it: the new memory limit reaches the
/// container's cgroup in the guest.
#[test]
fn update_changes_a_running_containers_limits() -> Result<()> {
    use containerd_shim_protos::api::UpdateTaskRequest;
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::MessageField;
    use containerd_shim_protos::shim_async::{Client, TaskClient};

    require_kvm_host()?;
    let c = Containerd::shared();
    let id = "update1";
    c.run_detached(RUNTIME, &[], id)?;
    let limit = |c: &Containerd| -> Result<String> {
        let out = c.ctr(&["task", "metrics", id])?;
        ensure!(out.status.success(), "{}", c.report("metrics", &out));
        Ok(stdout(&out)
            .lines()
            .find(|l| l.starts_with("memory.usage_limit"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("")
            .to_string())
    };
    ensure!(
        limit(c)? == u64::MAX.to_string(),
        "no limit at first: {}",
        limit(c)?
    );

    let address = std::fs::read_to_string(
        c.dir
            .join("state/io.containerd.runtime.v2.task/default")
            .join(id)
            .join("address"),
    )?;
    let resources = serde_json::json!({"memory": {"limit": 67108864}});
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = Client::connect(address.trim()).await?;
        let task = TaskClient::new(client);
        let req = UpdateTaskRequest {
            id: id.to_string(),
            resources: MessageField::some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
                    .to_string(),
                value: serde_json::to_vec(&resources)?,
                ..Default::default()
            }),
            ..Default::default()
        };
        let ctx =
            containerd_shim_protos::ttrpc::context::with_timeout(CTR_DEADLINE.as_nanos() as i64);
        task.update(ctx, &req).await?;
        anyhow::Ok(())
    })?;
    ensure!(limit(c)? == "67108864", "after Update: {}", limit(c)?);

    c.kill_and_remove(id)?;
    c.assert_clean(id)
}

/// The guest kernel has what pods' own tools use (issue 17, item 7): a
/// bridge (`brctl`, which said "Package not installed"), veth, dummy and
/// VLAN links, tun, policy routing, and netfilter for iptables in both its
/// nft and legacy forms, with conntrack, owner matches and NAT: a service
/// mesh's REDIRECT of the pod's own traffic really redirects. The image
/// has busybox only: iproute2 and iptables are the KVM host's, run from a
/// read-only bind of its /usr through its dynamic loader.
#[test]
fn the_guest_kernel_has_bridges_veth_tun_and_netfilter_with_nat() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let script = r#"
H=/host/usr
host() { "$H/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$H/lib/x86_64-linux-gnu" "$@"; }
export XTABLES_LIBDIR=$H/lib/x86_64-linux-gnu/xtables
nft() { host "$H/sbin/xtables-nft-multi" "$@"; }
legacy() { host "$H/sbin/xtables-legacy-multi" "$@"; }
brctl addbr br0 && echo bridge-ok
host "$H/bin/ip" link add v0 type veth peer name v1 && brctl addif br0 v0 && echo veth-ok
ip() { host "$H/bin/ip" "$@"; }
ip link add d0 type dummy && ip link add link d0 name d0.7 type vlan id 7 && echo dummy-vlan-ok
[ -e /sys/class/misc/tun ] && echo tun-ok
ip rule add fwmark 7 table 70 && echo rule-ok
nft iptables -t nat -A OUTPUT -p tcp -d 127.0.0.1 --dport 80 -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 8080 && echo nat-ok
nft iptables -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT && echo conntrack-ok
nft ip6tables -t nat -A OUTPUT -p tcp --dport 80 -j REDIRECT --to-ports 8080 && echo nat6-ok
legacy iptables -t mangle -A PREROUTING -j MARK --set-mark 7 && echo legacy-ok
ip link set lo up
i=0
while [ $i -lt 50 ]; do
    echo redirected | nc -l -p 8080 &
    got=$(nc -w 5 127.0.0.1 80 </dev/null)
    if [ "$got" = redirected ]; then echo redirect-ok; break; fi
    kill $! 2>/dev/null; wait $! 2>/dev/null
    i=$((i + 1))
    sleep 0.2
done
"#;
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--cap-add",
        "CAP_NET_ADMIN",
        "--cap-add",
        "CAP_NET_RAW",
        "--mount",
        "type=bind,src=/usr,dst=/host/usr,options=rbind:ro",
        BUSYBOX,
        "kernel-features",
        "sh",
        "-c",
        script,
    ])?;
    let printed = stdout(&out);
    for want in [
        "bridge-ok",
        "veth-ok",
        "dummy-vlan-ok",
        "tun-ok",
        "rule-ok",
        "nat-ok",
        "conntrack-ok",
        "nat6-ok",
        "legacy-ok",
        "redirect-ok",
    ] {
        ensure!(
            printed.lines().any(|l| l == want),
            "no {want}: {}",
            c.report("kernel features", &out)
        );
    }
    c.assert_clean("kernel-features")?;
    Ok(())
}

/// Sandbox `id`'s processes (isola-vmm and virtiofsd, jailed children
/// included: they map the guest RAM) with their host PSS; one gone
/// between the listing and the read counts 0.
fn sandbox_procs(c: &Containerd, id: &str) -> Result<Vec<isola_e2e::pss::Proc>> {
    use isola_e2e::pss::{program, pss_kib, Proc};
    let helpers = c.helpers(id);
    ensure!(!helpers.is_empty(), "no helper processes for {id}");
    Ok(helpers
        .into_iter()
        .map(|(pid, cmd)| Proc {
            name: program(&cmd),
            pid,
            pss_kib: pss_kib(pid).unwrap_or(0),
        })
        .collect())
}

fn sandbox_pss_mib(c: &Containerd, id: &str) -> Result<f64> {
    let kib: u64 = sandbox_procs(c, id)?.iter().map(|p| p.pss_kib).sum();
    Ok(kib as f64 / 1024.0)
}

#[test]
fn guest_memory_a_container_frees_goes_back_to_the_host() -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let id = "balloon1";
    // 256 MiB more than the default for a 256 MiB tmpfs in the guest's RAM.
    c.run_detached(
        RUNTIME,
        &[
            "--memory-limit",
            "268435456",
            "--mount",
            "type=tmpfs,src=tmpfs,dst=/big,options=size=256m",
        ],
        id,
    )?;
    c.wait_status(id, "RUNNING")?;
    let exec = |exec_id: &str, script: &str| -> Result<()> {
        let out = c.ctr(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script])?;
        ensure!(out.status.success(), "{}", c.report(exec_id, &out));
        Ok(())
    };
    let idle = isola_e2e::pss::settle(|| sandbox_procs(c, id))?.total_mib();
    // 200 MiB written into the guest's RAM reach the host...
    exec("fill", "head -c 209715200 /dev/zero > /big/x")?;
    let full = sandbox_pss_mib(c, id)?;
    ensure!(
        full >= idle + 150.0,
        "200 MiB in the guest's tmpfs: host PSS {full:.1} MiB, idle {idle:.1} MiB"
    );
    // ...and go back once the guest frees them (its kernel reports free
    // pages a few seconds later, in rounds).
    exec("free", "rm /big/x")?;
    let freed = Instant::now();
    let deadline = freed + Duration::from_secs(120);
    let mut now_mib;
    loop {
        now_mib = sandbox_pss_mib(c, id)?;
        if now_mib <= idle + 30.0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "2 min after the free: host PSS {now_mib:.1} MiB, idle {idle:.1}, full {full:.1}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "balloon: idle {idle:.1} MiB, with 200 MiB in the guest {full:.1} MiB, \
         {now_mib:.1} MiB {:.1} s after the free",
        freed.elapsed().as_secs_f64()
    );
    c.kill_and_remove(id)?;
    c.assert_clean(id)
}

/// `isola setup containerd` on the harness's stock config (version 2 for
/// containerd 1.x, 3 for 2.x, without isola's runtime): the containerd
/// that reads the edited config runs a CRI pod with the `isola` handler;
/// `--remove` then gives back the stock config byte for byte.
#[test]
fn setup_containerd_puts_isola_into_a_stock_config_and_remove_takes_it_out() -> Result<()> {
    use isola_e2e::pods::{manifest, Pods, BUSYBOX as POD_IMAGE, ISOLA};
    require_kvm_host()?;
    let dir = std::path::Path::new("/run/isola-e2e-setup");
    let config = dir.join("config.toml");
    let stock = dir.join("config.toml.stock");
    // 'static, as Pods wants; one per test process.
    let c: &'static Containerd = Box::leak(Box::new(Containerd::start_set_up_by_isola(dir)?));
    let ran = (|| -> Result<()> {
        let edited = std::fs::read_to_string(&config)?;
        let original = std::fs::read_to_string(&stock)?;
        ensure!(
            !original.contains("io.containerd.isola.v2") && edited.starts_with(&original),
            "the stock config was not kept as it was:\n{edited}"
        );
        ensure!(
            edited.contains("added by `isola setup containerd`")
                && edited.contains("runtime_type = \"io.containerd.isola.v2\""),
            "{edited}"
        );
        let p = Pods::on(c)?;
        let yaml = manifest(
            "set-up",
            ISOLA,
            "",
            &format!("  - name: app\n    image: {POD_IMAGE}\n    command: [sleep, \"3600\"]\n"),
        );
        let _guard = p.guard(&["set-up"]);
        let id = p.apply(&yaml)?;
        let status = p.status("set-up")?;
        ensure!(status["runtime_handler"] == ISOLA, "{status:#}");
        let app = Pods::container(&status, "app").cloned().unwrap_or_default();
        ensure!(app["state"] == "running", "{status:#}");
        ensure!(
            !c.vmms(&id).is_empty(),
            "pod {id} runs without an isola-vmm"
        );
        p.delete("set-up", &id, Some(0))
    })();
    let stopped = c.stop();
    ran?;
    stopped?;

    let containerd = std::env::var_os("CONTAINERD_BIN")
        .map(|b| std::path::PathBuf::from(b).join("containerd"))
        .unwrap_or_else(|| "containerd".into());
    let remove = || -> Result<std::process::Output> {
        Ok(
            std::process::Command::new(isola_e2e::containers::release_binary("isola")?)
                .args(["setup", "containerd", "--remove", "--config"])
                .arg(&config)
                .arg("--containerd")
                .arg(&containerd)
                .output()?,
        )
    };
    let out = remove()?;
    ensure!(
        out.status.success() && text(&out.stdout).contains("containerd must be restarted"),
        "isola setup containerd --remove: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    ensure!(
        std::fs::read(&config)? == std::fs::read(&stock)?,
        "--remove did not give back the stock config:\n{}",
        std::fs::read_to_string(&config)?
    );
    // Once more: nothing to remove, nothing changed.
    let again = remove()?;
    ensure!(
        again.status.success() && text(&again.stdout).contains("nothing changed"),
        "{}",
        text(&again.stdout)
    );
    Ok(())
}

/// `isola ps` lists a `ctr run -d` sandbox: its namespace, state, VM size
/// (as isola-vmm was started), the shim's and isola-vmm's pids, its
/// container running with a guest pid, a host PSS; `--json` parses and
/// the table says the same.
#[test]
fn isola_ps_lists_a_ctr_run_sandbox_with_its_container_size_and_pids() -> Result<()> {
    use anyhow::Context;
    require_kvm_host()?;
    let c = Containerd::shared();
    let id = "ps-listed";
    c.run_detached(RUNTIME, &[], id)?;
    let listed = (|| -> Result<()> {
        let isola = isola_e2e::containers::release_binary("isola")?;
        let ps = |json: bool| -> Result<String> {
            let mut cmd = std::process::Command::new(&isola);
            cmd.arg("ps").arg("--run-root").arg(&c.run_root);
            if json {
                cmd.arg("--json");
            }
            let out = cmd.output()?;
            ensure!(out.status.success(), "isola ps: {}", text(&out.stderr));
            Ok(text(&out.stdout))
        };
        let list: serde_json::Value = serde_json::from_str(&ps(true)?)?;
        let e = list
            .as_array()
            .and_then(|all| all.iter().find(|e| e["id"] == id))
            .with_context(|| format!("isola ps does not list {id}: {list:#}"))?;
        ensure!(
            e["namespace"] == "default" && e["state"] == "running",
            "{e:#}"
        );
        let vmm = c.vmms(id);
        ensure!(vmm.len() == 1, "isola-vmm of {id}: {vmm:?}");
        ensure!(
            e["vmm"]["pid"] == vmm[0] && e["vmm"]["alive"] == true,
            "{e:#}"
        );
        ensure!(
            Some(e["runner"]["pid"].as_u64().unwrap_or(0) as u32) == c.shim_pid(id),
            "{e:#}"
        );
        // The size as isola-vmm itself reports it (its API's info: a clone
        // of a template has no --vcpus/--memory on its command line).
        let info = {
            use std::io::{BufRead, Write};
            let dir = e["dir"].as_str().context("no dir")?;
            let mut api = std::os::unix::net::UnixStream::connect(format!("{dir}/api.sock"))?;
            api.set_read_timeout(Some(Duration::from_secs(30)))?;
            api.write_all(b"{\"action\":\"info\"}\n")?;
            let mut line = String::new();
            std::io::BufReader::new(api).read_line(&mut line)?;
            serde_json::from_str::<serde_json::Value>(&line)?
        };
        ensure!(
            e["vcpus"] == info["vcpus"] && e["memory_mib"] == info["memory_mib"],
            "{e:#} against isola-vmm's {info:#}"
        );
        let container = &e["containers"][0];
        ensure!(
            container["id"] == id
                && container["state"] == "running"
                && container["guest_pid"].as_u64().unwrap_or(0) > 0,
            "{e:#}"
        );
        ensure!(e["pss_mib"].as_f64().unwrap_or(0.0) > 1.0, "{e:#}");
        let table = ps(false)?;
        ensure!(
            table.contains(&format!("container {id} running, guest pid")),
            "{table}"
        );
        Ok(())
    })();
    c.kill_and_remove(id)?;
    c.assert_clean(id)?;
    listed
}

/// One sample of a scrape, as Prometheus's own Python client parsed it.
#[derive(Debug, Clone, serde::Deserialize)]
struct Scraped {
    family: String,
    #[serde(rename = "type")]
    kind: String,
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    value: f64,
}

/// `GET /metrics` from `addr`: the time it took and the samples, parsed
/// by `prometheus_client.parser.text_string_to_metric_families` (Debian's
/// python3-prometheus-client, which tests/kvm-host/setup-e2e installs).
fn scrape(addr: &str) -> Result<(Duration, String, Vec<Scraped>)> {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: monitor\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    let took = started.elapsed();
    let raw = text(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    // Without chunked transfer (the body's length is known).
    ensure!(!head.to_ascii_lowercase().contains("chunked"), "{head}");
    let script = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = []\n\
        for f in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in f.samples:\n\
        \x20       out.append(dict(family=f.name, type=f.type, name=s.name, labels=s.labels, value=s.value))\n\
        print(json.dumps(out))\n";
    let mut py = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    py.stdin.take().unwrap().write_all(body.as_bytes())?;
    let out = wait_output(py, Duration::from_secs(120))?;
    ensure!(
        out.status.success(),
        "the Prometheus parser refused the scrape: {}\n{body}",
        text(&out.stderr)
    );
    Ok((took, body.to_string(), serde_json::from_slice(&out.stdout)?))
}

/// The value of `name` for sandbox `id` (and the other `labels`).
fn value_of(samples: &[Scraped], name: &str, id: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.get("sandbox").map(String::as_str) == Some(id)
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// `isola monitor` serves two ctr-run sandboxes' series (isola-vmm's
/// counters, the guest's memory and CPU, the container's cgroup, the host
/// processes, start-up phases) in text a real Prometheus parser takes;
/// counters do not go down from one scrape to the next; a sandbox whose
/// isola-vmm is stopped (SIGSTOP: neither its API nor its agent answers)
/// reports up 0 and does not hold the scrape past the timeout, and is up
/// again after SIGCONT. `isola ps` shows each guest's memory in use.
#[test]
fn isola_monitor_scrapes_two_sandboxes_and_a_hung_one_does_not_hold_it() -> Result<()> {
    use anyhow::Context;
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    require_kvm_host()?;
    let c = Containerd::shared();
    let ids = ["mon-a", "mon-b"];
    // mon-a privileged: its root floods the kernel's log below.
    c.run_detached(RUNTIME, &["--privileged"], ids[0])?;
    c.run_detached(RUNTIME, &[], ids[1])?;
    let isola = isola_e2e::containers::release_binary("isola")?;
    let timeout = Duration::from_secs(3);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut monitor = std::process::Command::new(&isola)
        .args(["monitor", "--listen", &addr, "--timeout-ms"])
        .arg(timeout.as_millis().to_string())
        .arg("--run-root")
        .arg(&c.run_root)
        .env("ISOLA_LOG", "isola=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(
            isola_e2e::project_dir().join("build/e2e-monitor.log"),
        )?)
        .spawn()?;
    let mut stopped: Option<Vec<Pid>> = None;
    let checked = (|| -> Result<()> {
        // isola ps: each guest's memory in use, below its VM's size.
        let out = std::process::Command::new(&isola)
            .args(["ps", "--json", "--run-root"])
            .arg(&c.run_root)
            .output()?;
        ensure!(out.status.success(), "isola ps: {}", text(&out.stderr));
        let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        for id in ids {
            let e = list
                .as_array()
                .and_then(|all| all.iter().find(|e| e["id"] == id))
                .with_context(|| format!("isola ps does not list {id}: {list:#}"))?;
            let used = e["guest_mem_used_mib"].as_f64().unwrap_or(0.0);
            let size = e["memory_mib"].as_f64().unwrap_or(0.0);
            ensure!(used > 1.0 && used < size, "guest memory of {id}: {e:#}");
        }
        let out = std::process::Command::new(&isola)
            .args(["ps", "--run-root"])
            .arg(&c.run_root)
            .output()?;
        let table = text(&out.stdout);
        ensure!(table.contains("GUEST MEM"), "{table}");
        let _ = std::fs::write(isola_e2e::project_dir().join("build/e2e-ps.txt"), &table);

        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(&addr).is_err() {
            ensure!(
                Instant::now() < deadline,
                "isola monitor is not listening on {addr}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let (took1, body, first) = scrape(&addr)?;
        // For docs/kubernetes.md: a real scrape, kept under build/.
        let _ = std::fs::write(
            isola_e2e::project_dir().join("build/e2e-monitor-scrape.txt"),
            &body,
        );
        for id in ids {
            for (name, labels) in [
                ("isola_sandbox_up", vec![]),
                ("isola_agent_up", vec![]),
                ("isola_vmm_console_bytes_total", vec![]),
                ("isola_vmm_net_rx_bytes_total", vec![]),
                ("isola_guest_memory_used_bytes", vec![]),
                ("isola_guest_memory_total_bytes", vec![]),
                ("isola_guest_cpu_seconds_total", vec![("mode", "idle")]),
                (
                    "isola_container_cpu_usage_seconds_total",
                    vec![("container", id)],
                ),
                (
                    "isola_container_memory_usage_bytes",
                    vec![("container", id)],
                ),
                ("isola_container_pids", vec![("container", id)]),
                (
                    "isola_host_process_cpu_seconds_total",
                    vec![("process", "vmm")],
                ),
                ("isola_host_process_pss_bytes", vec![("process", "runner")]),
                (
                    "isola_sandbox_startup_phase_seconds",
                    vec![("phase", "vm_ready")],
                ),
            ] {
                let v = value_of(&first, name, id, &labels)
                    .with_context(|| format!("no {name}{labels:?} for {id}: {first:#?}"))?;
                ensure!(v >= 0.0, "{name} of {id}: {v}");
            }
            ensure!(
                value_of(&first, "isola_sandbox_up", id, &[]) == Some(1.0),
                "{id} not up"
            );
            // The agent talks over vsock, the container's root is on
            // virtio-fs: both carried bytes.
            for name in [
                "isola_vmm_vsock_rx_bytes_total",
                "isola_vmm_vsock_tx_bytes_total",
                "isola_vmm_fs_requests_total",
                "isola_vmm_fs_reply_bytes_total",
            ] {
                ensure!(
                    value_of(&first, name, id, &[]) > Some(0.0),
                    "{name} of {id}: {:?}",
                    value_of(&first, name, id, &[])
                );
            }
            ensure!(
                value_of(&first, "isola_agent_up", id, &[]) == Some(1.0),
                "{id}'s agent not up"
            );
            ensure!(
                value_of(&first, "isola_container_pids", id, &[("container", id)]) >= Some(1.0),
                "{id}'s pids"
            );
            ensure!(
                value_of(&first, "isola_guest_memory_used_bytes", id, &[]) > Some(1e6),
                "{id}'s guest memory"
            );
            // The jailed isola-vmm (guest RAM) counts with its supervisor.
            ensure!(
                value_of(
                    &first,
                    "isola_host_process_resident_memory_bytes",
                    id,
                    &[("process", "vmm")]
                ) > Some(4e6),
                "{id}'s isola-vmm RSS"
            );
            ensure!(
                value_of(
                    &first,
                    "isola_sandbox_startup_phase_seconds",
                    id,
                    &[("phase", "sandbox_ready")]
                ) > Some(0.0),
                "{id}'s start-up"
            );
        }
        let count: f64 = first
            .iter()
            .filter(|s| {
                s.name == "isola_startup_phase_seconds_count" && s.labels["phase"] == "vm_ready"
            })
            .map(|s| s.value)
            .sum();
        ensure!(
            count >= 2.0,
            "the vm_ready histogram has {count} observations"
        );
        ensure!(
            first
                .iter()
                .any(|s| s.family == "isola_vmm_console_bytes" && s.kind == "counter"),
            "counters are typed"
        );

        // mon-a's root floods the kernel's log (its rate limit off): the
        // agent follows /dev/kmsg into its log stream, mon-a's runner
        // drops what is over the sandbox's rate and counts it; mon-b's
        // count stays 0.
        let records = 1000;
        let flood = format!(
            "echo on > /proc/sys/kernel/printk_devkmsg && i=0 && \
             while [ $i -lt {records} ]; do echo \"<5>isola-mon-flood-$i\" > /dev/kmsg; i=$((i+1)); done"
        );
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "flood",
            "mon-a",
            "sh",
            "-c",
            &flood,
        ])?;
        ensure!(out.status.success(), "{}", c.report("the flood", &out));
        let dropped = "isola_agent_log_lines_dropped_total";
        let deadline = Instant::now() + Duration::from_secs(60);
        let counted = loop {
            let (_, _, now) = scrape(&addr)?;
            let v = value_of(&now, dropped, "mon-a", &[]).unwrap_or(0.0);
            if v > 0.0 || Instant::now() > deadline {
                ensure!(
                    value_of(&now, dropped, "mon-b", &[]) == Some(0.0),
                    "{dropped} of mon-b: {now:#?}"
                );
                break v;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        eprintln!("mon-a: {records} kernel log records, {counted} agent log lines dropped");
        ensure!(
            counted > 0.0 && counted < f64::from(records) * 2.0,
            "{dropped} of mon-a after {records} records: {counted}"
        );

        let (took2, _, second) = scrape(&addr)?;
        let mut compared = 0;
        for before in first
            .iter()
            .filter(|s| s.kind == "counter" || (s.kind == "histogram" && !s.name.ends_with("_sum")))
        {
            if let Some(after) = second
                .iter()
                .find(|s| s.name == before.name && s.labels == before.labels)
            {
                ensure!(
                    after.value >= before.value,
                    "{} {:?} went down: {} then {}",
                    before.name,
                    before.labels,
                    before.value,
                    after.value
                );
                compared += 1;
            }
        }
        ensure!(compared > 20, "only {compared} counters compared");

        // mon-b's isola-vmm stopped, the jailed one that runs the VM as
        // well as its supervisor: neither its API nor its agent answers.
        let vmms: Vec<Pid> = c
            .helpers("mon-b")
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("isola-vmm"))
            .map(|(pid, _)| Pid::from_raw(pid as i32))
            .collect();
        ensure!(!vmms.is_empty(), "no isola-vmm for mon-b");
        for vmm in &vmms {
            kill(*vmm, Signal::SIGSTOP)?;
        }
        stopped = Some(vmms.clone());
        let (took3, _, third) = scrape(&addr)?;
        for vmm in &vmms {
            kill(*vmm, Signal::SIGCONT)?;
        }
        stopped = None;
        eprintln!(
            "mon-b while stopped: {:?}",
            third
                .iter()
                .filter(
                    |s| s.labels.get("sandbox").map(String::as_str) == Some("mon-b")
                        && (s.name.contains("_up") || s.name.contains("errors"))
                )
                .map(|s| (&s.name, &s.labels, s.value))
                .collect::<Vec<_>>()
        );
        eprintln!(
            "isola monitor: scrapes took {took1:?}, {took2:?}, and {took3:?} with mon-b's VMM stopped (timeout {timeout:?})"
        );
        let _ = std::fs::write(
            isola_e2e::project_dir().join("build/e2e-monitor-timings.txt"),
            format!("{took1:?} {took2:?} {took3:?} timeout {timeout:?}\n"),
        );
        ensure!(
            took3 < timeout + Duration::from_secs(3),
            "a scrape with a stopped VMM took {took3:?} (timeout {timeout:?})"
        );
        ensure!(
            value_of(&third, "isola_sandbox_up", "mon-b", &[]) == Some(0.0),
            "{third:#?}"
        );
        ensure!(
            value_of(&third, "isola_agent_up", "mon-b", &[]) == Some(0.0),
            "{third:#?}"
        );
        ensure!(
            value_of(
                &third,
                "isola_sandbox_scrape_errors_total",
                "mon-b",
                &[("source", "agent")]
            ) >= Some(1.0),
            "{third:#?}"
        );
        ensure!(
            value_of(&third, "isola_agent_up", "mon-a", &[]) == Some(1.0),
            "{third:#?}"
        );
        ensure!(
            value_of(
                &third,
                "isola_host_process_up",
                "mon-b",
                &[("process", "vmm")]
            ) == Some(1.0),
            "mon-b's other series are there: {third:#?}"
        );
        // Up again once resumed.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, _, again) = scrape(&addr)?;
            if value_of(&again, "isola_agent_up", "mon-b", &[]) == Some(1.0) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "mon-b's agent did not answer again after SIGCONT"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    })();
    for vmm in stopped.unwrap_or_default() {
        let _ = kill(vmm, Signal::SIGCONT);
    }
    let _ = monitor.kill();
    let _ = monitor.wait();
    for id in ids {
        c.kill_and_remove(id)?;
        c.assert_clean(id)?;
    }
    checked
}

/// After SIGKILL of a shim that containerd cannot clean up after (it is
/// stopped), `isola ps` reports the sandbox dead with leftovers and
/// `isola cleanup` removes them: no process naming the run directory, no
/// directory, no mount under it. A second cleanup names the missing
/// sandbox; a live sandbox is refused.
#[test]
fn isola_cleanup_removes_what_a_killed_shim_left_after_ps_reports_it() -> Result<()> {
    use anyhow::Context;
    require_kvm_host()?;
    let c = Containerd::shared();
    let id = "cleanup-by-hand";
    c.run_detached(RUNTIME, &[], id)?;
    let isola = isola_e2e::containers::release_binary("isola")?;
    let isola_cmd = |args: &[&str]| -> Result<std::process::Output> {
        Ok(std::process::Command::new(&isola)
            .args(args)
            .arg("--run-root")
            .arg(&c.run_root)
            .output()?)
    };
    // Its shim still runs it: refused.
    let refused = isola_cmd(&["cleanup", id])?;
    ensure!(
        !refused.status.success() && text(&refused.stderr).contains("still runs it"),
        "{}",
        text(&refused.stderr)
    );
    let shim = c.shim_pid(id).context("no shim")?;
    let dir = c
        .run_dirs(id)
        .into_iter()
        .find(|d| d.exists())
        .context("no run directory")?;
    terminate_from_pidfile(&c.dir.join("containerd.pid"), "containerd")?;
    let cleaned = (|| -> Result<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shim as i32),
            nix::sys::signal::SIGKILL,
        )?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::path::Path::new(&format!("/proc/{shim}")).exists() {
            ensure!(Instant::now() < deadline, "the shim {shim} did not die");
            std::thread::sleep(Duration::from_millis(100));
        }
        let ps = isola_cmd(&["ps", "--json"])?;
        let list: serde_json::Value = serde_json::from_slice(&ps.stdout)?;
        let e = list
            .as_array()
            .and_then(|all| all.iter().find(|e| e["id"] == id))
            .with_context(|| format!("isola ps does not list {id}: {list:#}"))?;
        ensure!(
            e["state"] == "dead (leftovers)" && e["runner"]["alive"] == false,
            "{e:#}"
        );
        ensure!(
            e["problems"][0]
                .as_str()
                .is_some_and(|p| p.contains("is gone")),
            "{e:#}"
        );
        // ctr run's sandbox has a host cgroup of its own (its spec's
        // cgroupsPath): cleanup removes it.
        let cgroup = e["host_cgroup"]
            .as_str()
            .map(std::path::PathBuf::from)
            .with_context(|| format!("no host cgroup: {e:#}"))?;
        ensure!(cgroup.exists(), "{} is not there", cgroup.display());
        let out = isola_cmd(&["cleanup", id])?;
        ensure!(
            out.status.success() && text(&out.stdout).contains("cleaned up sandbox"),
            "isola cleanup: {}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        ensure!(!dir.exists(), "{} is left", dir.display());
        let naming = processes_containing(&format!("{}/", dir.display()));
        ensure!(naming.is_empty(), "processes left: {naming:?}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        ensure!(
            !mounts.contains(&dir.display().to_string()),
            "mounts left under {}",
            dir.display()
        );
        ensure!(
            !cgroup.exists(),
            "the host cgroup {} is left",
            cgroup.display()
        );
        let again = isola_cmd(&["cleanup", id])?;
        ensure!(
            !again.status.success() && text(&again.stderr).contains("no sandbox"),
            "{}",
            text(&again.stderr)
        );
        Ok(())
    })();
    // containerd back, and the container gone from it.
    c.restart()?;
    let _ = c.ctr(&["task", "delete", "--force", id]);
    let _ = c.ctr(&["container", "delete", id]);
    cleaned?;
    c.assert_clean(id)
}

/// `isola logs`: a sandbox's agent log and guest console, kept by its shim
/// in its run directory. A container hits its memory limit: `--follow`
/// shows the agent's OOM warning as it comes, the guest console has the
/// kernel's OOM report, `--tail` cuts, and the follower ends by itself
/// when the sandbox is removed.
#[test]
fn isola_logs_follows_the_agent_log_and_shows_the_guest_console() -> Result<()> {
    use std::io::BufRead;
    require_kvm_host()?;
    let c = Containerd::shared();
    let id = "logs-kept";
    c.run_detached(RUNTIME, &["--memory-limit", "33554432"], id)?;
    let isola = isola_e2e::containers::release_binary("isola")?;
    let logs = |args: &[&str]| -> Result<std::process::Output> {
        Ok(std::process::Command::new(&isola)
            .arg("logs")
            .args(args)
            .arg(id)
            .arg("--run-root")
            .arg(&c.run_root)
            .output()?)
    };
    let mut follower = std::process::Command::new(&isola)
        .args(["logs", "--follow", id, "--run-root"])
        .arg(&c.run_root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let follower_out = follower.stdout.take();
    let reader = std::thread::spawn(move || {
        if let Some(out) = follower_out {
            for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        }
    });
    let checked = (|| -> Result<()> {
        let out = logs(&[])?;
        ensure!(out.status.success(), "isola logs: {}", text(&out.stderr));
        let agent_log = stdout(&out);
        ensure!(
            agent_log.contains("container started"),
            "the agent log has no container start:\n{agent_log}"
        );
        // Past 32 MiB: OOM-killed in the guest.
        c.exec_memory_hog(id)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut followed = Vec::new();
        while !followed
            .iter()
            .any(|l: &String| l.contains("OOM kill in the container"))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => followed.push(line),
                Err(_) => anyhow::bail!(
                    "isola logs --follow did not show the OOM kill; it printed:\n{}",
                    followed.join("\n")
                ),
            }
        }
        // The console gets the kernel's report through isola-vmm, the
        // shim's pipe and the file: wait for it.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = logs(&["--guest-console"])?;
            ensure!(
                out.status.success(),
                "isola logs --guest-console: {}",
                text(&out.stderr)
            );
            let console = stdout(&out);
            if console.contains("Killed process") && console.contains("OOM kill in the container") {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the guest console has no OOM report:\n{console}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let out = logs(&["--tail", "2"])?;
        ensure!(
            out.status.success() && stdout(&out).lines().count() == 2,
            "isola logs --tail 2: {:?} {}",
            stdout(&out),
            text(&out.stderr)
        );
        let out = logs(&["--namespace", "no-such-namespace"])?;
        ensure!(
            !out.status.success()
                && text(&out.stderr)
                    .contains("no sandbox logs-kept in namespace no-such-namespace"),
            "{}",
            text(&out.stderr)
        );
        Ok(())
    })();
    let removed = c.kill_and_remove(id);
    // Its directory is gone: the follower ends by itself.
    let ended = wait_output(follower, CTR_DEADLINE);
    let _ = reader.join();
    checked?;
    removed?;
    let ended = ended?;
    ensure!(
        ended.status.success(),
        "isola logs --follow: {:?} {}",
        ended.status,
        text(&ended.stderr)
    );
    c.assert_clean(id)
}

/// `isola debug`: off by default (refused naming the switch, and a
/// sandbox started with it off refuses too); a pod annotation cannot turn
/// it on; with `debug.console = true` when the sandbox starts, a command
/// runs in the guest's own namespaces (pid 1 is the agent) with the
/// container's rootfs in view and exits with its status, a shell runs on
/// a terminal of the caller's size, and the guest logs who came.
#[test]
fn isola_debug_is_off_unless_the_node_says_and_runs_in_the_guest_outside_the_containers(
) -> Result<()> {
    require_kvm_host()?;
    let c = Containerd::shared();
    let isola = isola_e2e::containers::release_binary("isola")?;
    // What the CLI reads: the shims' config, and one with the switch on.
    let off_config = c.isola_config();
    let on_config = c.dir.join("isola-debug-on.toml");
    std::fs::write(
        &on_config,
        format!(
            "{}\n[debug]\nconsole = true\n",
            std::fs::read_to_string(&off_config)?
        ),
    )?;
    let debug =
        |config: &std::path::Path, id: &str, cmd: &[&str]| -> Result<std::process::Output> {
            Ok(std::process::Command::new(&isola)
                .arg("debug")
                .arg(id)
                .arg("--config")
                .arg(config)
                .arg("--run-root")
                .arg(&c.run_root)
                .arg("--")
                .args(cmd)
                .stdin(Stdio::null())
                .output()?)
        };

    // A tenant's annotation cannot turn it on: the container fails, naming it.
    let out = c.run_rm_annotated(
        "io.isola.config.debug.console=true",
        "debug-annotated",
        &["true"],
    )?;
    ensure!(
        !out.status.success() && text(&out.stderr).contains("debug.console"),
        "{}",
        c.report("ctr run with the debug annotation", &out)
    );
    let _ = c.ctr(&["container", "delete", "debug-annotated"]);

    let off = "debug-off";
    c.run_detached(RUNTIME, &[], off)?;
    let on = "debug-on";
    let started = (|| -> Result<()> {
        let _on = c.isola_config_with("[debug]\nconsole = true\n")?;
        c.run_detached(RUNTIME, &[], on)
    })();
    let checked = started.and_then(|()| -> Result<()> {
        // The node's switch off: refused, naming it.
        let out = debug(&off_config, on, &["true"])?;
        ensure!(
            code(&out) == 125 && text(&out.stderr).contains("debug.console = true"),
            "isola debug with the switch off: {:?} {}",
            out.status,
            text(&out.stderr)
        );
        // A sandbox started with it off refuses, whatever the CLI reads.
        let out = debug(&on_config, off, &["true"])?;
        ensure!(
            code(&out) == 125 && text(&out.stderr).contains("debug sessions are off in sandbox"),
            "isola debug into a sandbox started without it: {:?} {}",
            out.status,
            text(&out.stderr)
        );
        // On: the guest's pid 1 is the agent, the container's rootfs is in
        // view, the status comes back.
        let script = format!(
            "cat /proc/1/comm; test -x /run/isola/share/containers/{on}/rootfs/bin/busybox && \
             echo rootfs-in-view; for n in mnt pid net uts ipc cgroup; do \
             [ \"$(readlink /proc/self/ns/$n)\" = \"$(readlink /proc/1/ns/$n)\" ] || echo not-in-$n; \
             done; echo namespaces-checked; exit 7"
        );
        let out = debug(&on_config, on, &["sh", "-c", &script])?;
        let printed = stdout(&out);
        ensure!(
            code(&out) == 7,
            "isola debug -- sh: {:?} {printed} {}",
            out.status,
            text(&out.stderr)
        );
        let lines: Vec<&str> = printed.lines().map(str::trim).collect();
        ensure!(
            lines == ["isola-agent", "rootfs-in-view", "namespaces-checked"],
            "pid 1's name, the rootfs, the mount namespace: {printed:?}"
        );
        // A shell on a terminal of 33x101: raw mode, the size, the status.
        let shell = || {
            let mut cmd = std::process::Command::new(&isola);
            cmd.arg("debug")
                .arg(on)
                .arg("--config")
                .arg(&on_config)
                .arg("--run-root")
                .arg(&c.run_root);
            cmd
        };
        let (status, screen) = on_pty(
            shell(),
            b"stty size; echo answer-$((6*7)); exit 3\n",
            Some((33, 101)),
        )?;
        ensure!(
            status == 3 && screen.contains("33 101") && screen.contains("answer-42"),
            "a debug shell on a pty: status {status}, screen:\n{screen}"
        );
        // The guest logged both sessions, with who asked.
        let agent_log = || -> Result<String> {
            let out = std::process::Command::new(&isola)
                .args(["logs", on, "--run-root"])
                .arg(&c.run_root)
                .output()?;
            Ok(stdout(&out))
        };
        let log = agent_log()?;
        ensure!(
            log.matches("debug session started").count() >= 2
                && log.contains("user=root")
                && log.contains("debug session ended"),
            "the agent log of {on}:\n{log}"
        );
        // A shell whose host side dies (isola debug killed) is hung up
        // as a terminal's: the shell and its foreground job end.
        let sleepers = || -> Result<String> {
            let out = debug(
                &on_config,
                on,
                &["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"],
            )?;
            Ok(stdout(&out))
        };
        let screen = killed_on_pty(
            shell(),
            b"echo hang-$((40+2)); sleep 100007\n",
            "hang-42",
            || Ok(sleepers()?.contains("sleep 100007")),
        )?;
        // The hung-up session's own end, by its shell's pid.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let log = agent_log()?;
            let left = sleepers()?;
            let pid = log
                .lines()
                .find(|l| l.contains("the host's terminal is gone: hung up"))
                .and_then(|l| l.split_whitespace().find(|w| w.starts_with("pid=")))
                .map(str::to_string);
            let ended = pid.as_ref().is_some_and(|pid| {
                log.lines().any(|l| {
                    l.contains("debug session ended") && l.split_whitespace().any(|w| w == pid)
                })
            });
            if ended && !left.contains("sleep 100007") {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "a killed debug client's shell was not hung up (screen: {screen:?}, hung up: \
                 {pid:?}, its session ended: {ended}); processes: {left}\nthe agent log:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        Ok(())
    });
    let removed_on = c.kill_and_remove(on);
    let removed_off = c.kill_and_remove(off);
    checked?;
    removed_on?;
    removed_off?;
    c.assert_clean(on)?;
    c.assert_clean(off)
}
