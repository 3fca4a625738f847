//! Docker 28 → containerd → containerd-shim-isola-v2 → a microVM per
//! container, driven with the `docker` CLI as users drive it (Debian
//! unstable's Docker on the test binary's containerd, `isola_e2e::docker`).
//! Every test checks that its containers left nothing behind.

use anyhow::{ensure, Result};
use isola_e2e::containerd::{code, ensure_not_in_host_netns, text, RUNTIME};
use isola_e2e::docker::{Docker, DAEMON_JSON_RUNTIME};
use isola_e2e::require_kvm_host;

/// The image archive `make busybox-image` builds, as Docker names it.
const BUSYBOX: &str = "busybox:latest";

/// The interface names in a `/proc/<pid>/net/dev`.
fn links(dev: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(dev)
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_string())
        .collect()
}

/// `docker run -d --runtime isola OPTIONS... --name NAME busybox sleep
/// 3600`: the container's id.
fn run_detached(d: &Docker, name: &str, options: &[&str]) -> Result<String> {
    let mut args = vec!["run", "-d", "--runtime", DAEMON_JSON_RUNTIME];
    args.extend_from_slice(options);
    args.extend_from_slice(&["--name", name, BUSYBOX, "sleep", "3600"]);
    let id = d.ok(&args)?.trim().to_string();
    ensure!(id.len() == 64, "docker run -d printed {id:?}");
    Ok(id)
}

/// `docker load` takes the project's image archive (issue 17, item 9: an
/// OCI layout alone made it look for the pre-1.10 format, "open
/// .../blobs/json"), and containers of both runtime spellings run in a VM,
/// exit with their status, exec, stop and leave nothing.
#[test]
fn docker_loads_the_archive_runs_execs_stops_and_leaves_nothing() -> Result<()> {
    require_kvm_host()?;
    let d = Docker::shared();
    let archive = isola_e2e::project_dir().join("build/images/busybox.tar");
    let loaded = d.ok(&["load", "-i", &archive.to_string_lossy()])?;
    ensure!(
        loaded.contains("Loaded image: busybox:latest"),
        "docker load printed {loaded:?}"
    );

    // The runtime type named on the command line: a VM's kernel.
    let host = text(
        &std::process::Command::new("uname")
            .arg("-r")
            .output()?
            .stdout,
    );
    let out = d.ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--network",
        "none",
        BUSYBOX,
        "sh",
        "-c",
        "echo hello from docker; uname -r",
    ])?;
    let mut lines = out.lines();
    ensure!(lines.next() == Some("hello from docker"), "{out:?}");
    let guest = lines.next().unwrap_or("");
    ensure!(
        !guest.is_empty() && guest != host.trim(),
        "the container's kernel ({guest}) must be the VM's, not the host's ({})",
        host.trim()
    );

    // daemon.json's name; the exit status comes back.
    let out = d.docker(&[
        "run",
        "--rm",
        "--runtime",
        DAEMON_JSON_RUNTIME,
        "--network",
        "none",
        BUSYBOX,
        "sh",
        "-c",
        "echo err >&2; exit 7",
    ])?;
    ensure!(code(&out) == 7, "{}", d.report("exit 7", &out));
    ensure!(
        text(&out.stderr).contains("err"),
        "{}",
        d.report("exit 7", &out)
    );

    // Detached, exec, stop (sleep as PID 1 ignores SIGTERM: the SIGKILL
    // after -t 2 ends it), rm.
    let id = run_detached(d, "d1", &["--network", "none"])?;
    let out = d.docker(&["exec", "d1", "sh", "-c", "echo from exec; exit 3"])?;
    ensure!(
        code(&out) == 3 && text(&out.stdout) == "from exec\n",
        "{}",
        d.report("docker exec", &out)
    );
    // The task pid Docker knows is the host's VMM (as `ctr task ls` shows).
    let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", "d1"])?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
    ensure!(
        text(&cmdline).contains("isola-vmm"),
        "State.Pid {} is not the VM's isola-vmm on the host: {:?}",
        pid.trim(),
        text(&cmdline)
    );
    d.ok(&["stop", "-t", "2", "d1"])?;

    // Docker's default network: Docker moves its veth's far end into
    // /proc/<task pid>/ns/net and names it eth0. That is isola-vmm's own
    // namespace, never the host's (where it once took the host's routes).
    let host_links = || links(std::path::Path::new("/proc/self/net/dev"));
    let before = host_links();
    let id2 = run_detached(d, "d2", &[])?;
    let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", "d2"])?;
    let pid = pid.trim();
    ensure_not_in_host_netns(pid)?;
    let vmm_links = links(std::path::Path::new(&format!("/proc/{pid}/net/dev")));
    ensure!(
        vmm_links.iter().any(|l| l == "eth0"),
        "Docker's eth0 is not in isola-vmm's namespace: {vmm_links:?}"
    );
    let after = host_links();
    ensure!(
        !after.iter().any(|l| l == "eth0" && !before.contains(l)),
        "Docker's eth0 landed in the host's namespace: {after:?}"
    );
    d.ok(&["rm", "-f", "d2"])?;
    d.containerd.assert_clean(&id2)?;
    let exit = d.ok(&["inspect", "-f", "{{.State.ExitCode}}", "d1"])?;
    ensure!(
        exit.trim() == "137",
        "a stopped sleep exits 137, not {exit:?}"
    );
    d.ok(&["rm", "d1"])?;
    d.containerd.assert_clean(&id)?;
    let left = d.ok(&["ps", "-aq"])?;
    ensure!(left.trim().is_empty(), "docker ps -a lists {left:?}");
    // The --rm containers' sandboxes too: no run directory, no VMM.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let dirs: Vec<_> = std::fs::read_dir(&d.containerd.run_root)?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        let vmms = isola_e2e::containerd::processes_containing("isola-vmm");
        if dirs.is_empty() && vmms.is_empty() {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "left behind: run directories {dirs:?}, VMMs {vmms:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}
