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
    let exit = d.ok(&["inspect", "-f", "{{.State.ExitCode}}", "d1"])?;
    ensure!(
        exit.trim() == "137",
        "a stopped sleep exits 137, not {exit:?}"
    );
    d.ok(&["rm", "d1"])?;
    d.containerd.assert_clean(&id)?;
    nothing_left(d)
}

/// No container in `docker ps -a`; the `--rm` containers' sandboxes gone
/// too: no run directory, no VMM (but a template's).
fn nothing_left(d: &Docker) -> Result<()> {
    let left = d.ok(&["ps", "-aq"])?;
    ensure!(left.trim().is_empty(), "docker ps -a lists {left:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let dirs = isola_e2e::containers::sandbox_dirs(&d.containerd.run_root);
        // A template VM being built (by the first sandbox of its shape) is
        // the node's, not a container's.
        let vmms: Vec<_> = isola_e2e::containerd::processes_containing("isola-vmm")
            .into_iter()
            .filter(|(_, cmd)| !cmd.contains("--template"))
            .collect();
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

/// `GET /` on `addr` (a fresh connection per try, until `deadline`: the
/// server may still be starting) and the whole reply.
fn http_get(addr: &str, deadline: std::time::Instant) -> Result<String> {
    use std::io::{Read, Write};
    loop {
        let tried = (|| -> std::io::Result<String> {
            let sock: std::net::SocketAddr = addr
                .parse()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let mut conn =
                std::net::TcpStream::connect_timeout(&sock, std::time::Duration::from_secs(20))?;
            conn.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
            conn.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut reply = Vec::new();
            conn.read_to_end(&mut reply)?;
            Ok(String::from_utf8_lossy(&reply).into_owned())
        })();
        match tried {
            Ok(reply) if !reply.is_empty() => return Ok(reply),
            other if std::time::Instant::now() >= deadline => {
                anyhow::bail!("GET http://{addr}/: {other:?}")
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(500)),
        }
    }
}

/// Docker's default bridge network reaches the VM (issue 17, item 2): Docker
/// makes the container's network after Create in `/proc/<task pid>/ns/net`,
/// isola-vmm's own namespace (never the host's, where it once took the
/// host's routes); at Start isola joins that veth to the VM's late tap and
/// the guest's eth0 gets Docker's address and default route. The KVM host
/// reaches the server in the VM by the container's address on Docker's
/// bridge and through the published port (`-p`, Docker's userland proxy:
/// the tests' dockerd runs without iptables); the teardown leaves nothing.
#[test]
fn docker_bridge_network_and_published_port_reach_the_vm() -> Result<()> {
    require_kvm_host()?;
    let d = Docker::shared();
    let archive = isola_e2e::project_dir().join("build/images/busybox.tar");
    d.ok(&["load", "-i", &archive.to_string_lossy()])?;
    let host_links = || links(std::path::Path::new("/proc/self/net/dev"));
    let before = host_links();
    let id = d
        .ok(&[
            "run",
            "-d",
            "--runtime",
            DAEMON_JSON_RUNTIME,
            "-p",
            "127.0.0.1:18080:80",
            "--name",
            "web",
            BUSYBOX,
            "sh",
            "-c",
            "mkdir -p /srv && echo hello-from-the-vm > /srv/index.html && exec httpd -f -p 80 -h /srv",
        ])?
        .trim()
        .to_string();
    let result = (|| -> Result<()> {
        let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", "web"])?;
        let pid = pid.trim();
        ensure_not_in_host_netns(pid)?;
        let vmm_links = links(std::path::Path::new(&format!("/proc/{pid}/net/dev")));
        ensure!(
            vmm_links.iter().any(|l| l == "eth0") && vmm_links.iter().any(|l| l == "tap0_isola"),
            "Docker's eth0 and the VM's tap are not in isola-vmm's namespace: {vmm_links:?}"
        );
        let after = host_links();
        ensure!(
            !after.iter().any(|l| l == "eth0" && !before.contains(l)),
            "Docker's eth0 landed in the host's namespace: {after:?}"
        );
        let ip = d.ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "web"])?;
        let ip = ip.trim();
        ensure!(
            ip.starts_with("198.19.0."),
            "the container's address is {ip:?}"
        );
        // The guest's eth0 has Docker's address and route.
        let addr = d.ok(&["exec", "web", "ip", "-4", "-o", "addr", "show", "eth0"])?;
        ensure!(
            addr.contains(&format!("inet {ip}/24")),
            "in the guest: {addr}"
        );
        let route = d.ok(&["exec", "web", "ip", "route"])?;
        ensure!(
            route.contains("default via 198.19.0.1 dev eth0"),
            "in the guest: {route}"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let direct = http_get(&format!("{ip}:80"), deadline)?;
        ensure!(
            direct.contains("hello-from-the-vm"),
            "GET {ip}:80 answered {direct:?}"
        );
        let published = http_get("127.0.0.1:18080", deadline)?;
        ensure!(
            published.contains("hello-from-the-vm"),
            "GET 127.0.0.1:18080 (-p) answered {published:?}"
        );
        Ok(())
    })();
    let removed = d.ok(&["rm", "-f", "web"]);
    result?;
    removed?;
    d.containerd.assert_clean(&id)?;
    nothing_left(d)
}
