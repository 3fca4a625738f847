//! Kubernetes pods through containerd's CRI, driven by `isola pod` as
//! kubelet drives CRI (RunPodSandbox with the runtime handler,
//! CreateContainer, StartContainer, status polling, ExecSync, StopContainer
//! with the grace period, StopPodSandbox, RemovePodSandbox), against
//! Debian's containerd 1.6 with a CNI bridge on 198.18.0.0/24. Every test
//! checks that its pods left nothing behind.

#![allow(clippy::unwrap_used)] // a test: a panic is its failure report

use anyhow::{ensure, Result};
use isola_e2e::containerd::{code, text};
use isola_e2e::pods::*;
use isola_e2e::require_kvm_host;

fn host_boot_id() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string())
}

#[test]
fn an_isola_pod_runs_in_its_own_vm_with_containerds_files() -> Result<()> {
    require_kvm_host()?;
    let p = Pods::shared();
    let yaml = manifest(
        "web",
        ISOLA,
        "  hostname: web-0\n  dnsConfig:\n    nameservers: [198.18.0.53]\n    searches: [svc.isola.test]\n    options: [{name: ndots, value: \"2\"}]\n",
        &format!(
            "  - name: app\n    image: {BUSYBOX}\n    command: [sh, -c]\n    args: [\"echo out-line; echo err-line >&2; exec sleep 3600\"]\n"
        ),
    );
    let id = p.apply(&yaml)?;
    let status = p.status("web")?;
    ensure!(status["state"] == "ready", "{status:#}");
    ensure!(status["runtime_handler"] == ISOLA, "{status:#}");
    let app = Pods::container(&status, "app").cloned().unwrap_or_default();
    ensure!(app["state"] == "running", "{status:#}");
    ensure!(
        app["started_at"].as_i64().unwrap_or(0) >= app["created_at"].as_i64().unwrap_or(i64::MAX),
        "{app:#}"
    );

    // Its own kernel: another boot id than the host's.
    let boot = p.sh("web", "app", "cat /proc/sys/kernel/random/boot_id")?;
    ensure!(
        boot.trim() != host_boot_id()?,
        "the pod shares the host's kernel"
    );

    // The files containerd adds, as the guest sees them.
    let hostname = p.sh("web", "app", "cat /etc/hostname; hostname")?;
    ensure!(hostname == "web-0\nweb-0\n", "{hostname:?}");
    let resolv = p.sh("web", "app", "cat /etc/resolv.conf")?;
    for needle in [
        "nameserver 198.18.0.53",
        "search svc.isola.test",
        "options ndots:2",
    ] {
        ensure!(
            resolv.contains(needle),
            "resolv.conf lacks {needle:?}: {resolv}"
        );
    }
    let hosts = p.sh("web", "app", "cat /etc/hosts")?;
    ensure!(hosts.contains("localhost"), "{hosts}");
    let shm = p.sh(
        "web",
        "app",
        "echo shared > /dev/shm/x && cat /dev/shm/x && grep ' /dev/shm ' /proc/mounts",
    )?;
    ensure!(shm.starts_with("shared\n"), "{shm}");
    p.sh("web", "app", "echo goodbye > /dev/termination-log")?;
    let uid = status["uid"].as_str().unwrap_or_default();
    let term = std::fs::read_to_string(p.root.join(uid).join("containers/app/termination-log.0"))?;
    ensure!(term == "goodbye\n", "the host's termination log: {term:?}");

    // ExecSync: exit code and both streams.
    let out = p.exec(
        "web",
        "app",
        &["sh", "-c", "echo to-out; echo to-err >&2; exit 7"],
    )?;
    ensure!(code(&out) == 7, "{}", p.report("exec exit 7", &out));
    ensure!(
        text(&out.stdout) == "to-out\n" && text(&out.stderr) == "to-err\n",
        "{}",
        p.report("exec", &out)
    );

    // The CRI log, streams apart.
    let (stdout, stderr) = p.logs("web", "app")?;
    ensure!(
        stdout == "out-line\n" && stderr == "err-line\n",
        "logs: {stdout:?} {stderr:?}"
    );

    p.delete("web", &id, None)?;
    ensure!(p.status("web").is_err(), "the pod is still listed");
    Ok(())
}
