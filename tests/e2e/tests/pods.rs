//! Kubernetes pods through containerd's CRI, driven by `isola pod` as
//! kubelet drives CRI (RunPodSandbox with the runtime handler,
//! CreateContainer, StartContainer, status polling, ExecSync, StopContainer
//! with the grace period, StopPodSandbox, RemovePodSandbox), against the
//! containerd tests/e2e/run selects (`make test`: a part on 1.7, all on
//! 2.x on an AppArmor host) with a CNI bridge on 198.18.0.0/24. Every test
//! checks that its pods left nothing behind.

#![allow(clippy::unwrap_used)] // a test: a panic is its failure report

use anyhow::{ensure, Context, Result};
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
        "  hostname: web-0\n  shareProcessNamespace: true\n  dnsConfig:\n    nameservers: [198.18.0.53]\n    searches: [svc.isola.test]\n    options: [{name: ndots, value: \"2\"}]\n",
        &format!(
            "  - name: app\n    image: {BUSYBOX}\n    command: [sh, -c]\n    args: [\"echo out-line; echo err-line >&2; exec sleep 3600\"]\n  - name: side\n    image: {BUSYBOX}\n    command: [sleep, \"3601\"]\n"
        ),
    );
    let _guard = p.guard(&["web"]);
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

    // shareProcessNamespace: one PID namespace, the pause's, as with runc;
    // IPC and UTS are the pod's anyway.
    let ns = "for n in ipc uts pid; do readlink /proc/self/ns/$n; done";
    let (app_ns, side_ns) = (p.sh("web", "app", ns)?, p.sh("web", "side", ns)?);
    ensure!(
        app_ns == side_ns && app_ns.lines().count() == 3,
        "app's namespaces {app_ns:?}, side's {side_ns:?}"
    );
    let ps = p.sh("web", "side", "ps -o pid,args")?;
    ensure!(
        ps.contains("sleep 3600") && ps.contains("sleep 3601"),
        "side does not see app's process: {ps}"
    );
    let init = p.sh("web", "side", "cat /proc/1/cmdline | tr '\\0' ' '")?;
    ensure!(init.contains("pause"), "PID 1 of the pod is {init:?}");

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

    // On an AppArmor host (tests/kvm-host/apparmor-host), containerd gave
    // these containers its profile, loading it into the host's kernel
    // first (it does so only when it sees AppArmor): the pod ran with it.
    if std::env::var_os("ISOLA_APPARMOR_HOST").is_some() {
        let loaded = std::fs::read_to_string("/sys/kernel/security/apparmor/profiles")
            .context("reading the host's AppArmor profiles")?;
        ensure!(
            loaded
                .lines()
                .any(|l| l.starts_with("cri-containerd.apparmor.d ")),
            "an AppArmor host, but containerd loaded no profile: {loaded}"
        );
    }

    p.delete("web", &id, None)?;
    ensure!(p.status("web").is_err(), "the pod is still listed");
    Ok(())
}

/// A pod serving `hello-from-NAME` over HTTP on 8080 (busybox httpd),
/// and 1 MiB of random bytes as `/big`, with `hostPort` if given.
fn web_pod(name: &str, class: &str, host_port: Option<u16>) -> String {
    let port = match host_port {
        Some(h) => format!("{{containerPort: 8080, hostPort: {h}}}"),
        None => "{containerPort: 8080}".to_string(),
    };
    manifest(
        name,
        class,
        "",
        &format!(
            "  - name: web\n    image: {BUSYBOX}\n    command: [sh, -c]\n    args: [\"mkdir -p /www && echo hello-from-{name} > /www/index.html && head -c 1048576 /dev/urandom > /www/big && exec httpd -f -p 8080 -h /www\"]\n    ports: [{port}]\n"
        ),
    )
}

/// `GET /` of `ip`:8080 from container `web` of pod `from`.
fn get_from(p: &Pods, from: &str, ip: &str) -> Result<String> {
    p.sh(
        from,
        "web",
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 20 {ip} 8080"),
    )
}

/// Connects to 127.0.0.1:`port` from inside the network namespace `netns`
/// (as containerd's PortForward does), writes `request`, half-closes and
/// returns everything read until EOF.
fn dial_in_netns(netns: &std::path::Path, port: u16, request: &[u8]) -> Result<String> {
    let netns = netns.to_path_buf();
    let request = request.to_vec();
    std::thread::spawn(move || -> Result<String> {
        let ns = std::fs::File::open(&netns)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
        conn.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
        std::io::Write::write_all(&mut conn, &request)?;
        conn.shutdown(std::net::Shutdown::Write)?;
        let mut reply = Vec::new();
        std::io::Read::read_to_end(&mut conn, &mut reply)?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the dialing thread panicked"))?
    .with_context(|| format!("127.0.0.1:{port} in the pod's network namespace"))
}

/// Runs `isola pod port-forward NAME 0:PORT`, connects to the local port
/// it prints, writes `request` and returns the reply (until the pod side
/// ends it); then stops the forwarder.
fn through_port_forward(p: &Pods, name: &str, port: u16, request: &[u8]) -> Result<String> {
    use std::io::{BufRead, Read, Write};
    let mut child = p
        .command(&["port-forward", name, &format!("0:{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("isola pod port-forward")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let result = (|| -> Result<String> {
        let line = rx
            .recv_timeout(POD_DEADLINE)
            .context("isola pod port-forward printed nothing")?;
        let addr = line
            .strip_prefix("Forwarding from ")
            .and_then(|rest| rest.split(" -> ").next())
            .with_context(|| format!("isola pod port-forward printed {line:?}"))?;
        let mut conn = std::net::TcpStream::connect(addr.trim())?;
        conn.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
        conn.write_all(request)?;
        let mut reply = Vec::new();
        conn.read_to_end(&mut reply)?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    })();
    let _ = child.kill();
    let out = child.wait_with_output()?;
    result.with_context(|| format!("port-forward's stderr: {}", text(&out.stderr)))
}

/// The interfaces enslaved to the test bridge (the pods' host-side veths).
fn bridge_ports() -> Result<Vec<String>> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show", "master", "isola-br0"])
        .output()?;
    Ok(text(&out.stdout).lines().map(str::to_string).collect())
}

#[test]
fn pods_reach_each_other_by_pod_ip_and_stay_apart() -> Result<()> {
    require_kvm_host()?;
    let p = Pods::shared();
    let netns_before = Pods::netns_paths().len();
    let _guard = p.guard(&["net-a", "net-b", "net-c"]);
    let a = p.apply(&web_pod("net-a", ISOLA, Some(18080)))?;
    // net-b's virtio-net offers no checksum or TSO offloads: a's large,
    // partly checksummed frames reach it whole and checksummed.
    let b = p.apply(&annotate(&web_pod("net-b", ISOLA, None), NO_OFFLOADS))?;
    // runc: containerd's default handler, on the same bridge.
    let c = p.apply(&web_pod("net-c", "", None))?;
    let ip = |name: &str| -> Result<String> {
        let s = p.status(name)?;
        let ip = s["ip"].as_str().unwrap_or_default().to_string();
        ensure!(
            ip.starts_with("198.18.0."),
            "pod {name} has no pod IP: {s:#}"
        );
        Ok(ip)
    };
    let (ip_a, ip_b, ip_c) = (ip("net-a")?, ip("net-b")?, ip("net-c")?);
    // Every httpd is up (each answers itself) before they talk.
    for (name, own) in [("net-a", &ip_a), ("net-b", &ip_b), ("net-c", &ip_c)] {
        let deadline = std::time::Instant::now() + POD_DEADLINE;
        while !get_from(p, name, own)
            .unwrap_or_default()
            .contains(&format!("hello-from-{name}"))
        {
            ensure!(
                std::time::Instant::now() < deadline,
                "{name}'s httpd never answered"
            );
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
    let (offloads_a, offloads_b) = (
        p.guest_offloads("net-a", "web")?,
        p.guest_offloads("net-b", "web")?,
    );
    ensure!(
        offloads_a == OFFLOAD_FEATURE_BITS && offloads_b.is_empty(),
        "negotiated offload bits: net-a {offloads_a:?}, net-b (offloads off) {offloads_b:?}"
    );
    // isola ↔ isola, both ways; isola ↔ runc, both ways.
    for (from, ip, want) in [
        ("net-a", &ip_b, "hello-from-net-b"),
        ("net-b", &ip_a, "hello-from-net-a"),
        ("net-a", &ip_c, "hello-from-net-c"),
        ("net-c", &ip_a, "hello-from-net-a"),
    ] {
        let got = get_from(p, from, ip)?;
        ensure!(got.contains(want), "{from} → {ip}: {got:?}");
    }
    // 1 MiB each way between the pod with offloads and the one without:
    // large TSO frames one way, the host's segmentation the other.
    for (from, to, ip) in [("net-a", "net-b", &ip_b), ("net-b", "net-a", &ip_a)] {
        let sum = |pod: &str, script: &str| -> Result<String> {
            Ok(p.sh(pod, "web", script)?
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string())
        };
        let want = sum(to, "md5sum /www/big")?;
        let got = sum(
            from,
            &format!("printf 'GET /big HTTP/1.0\\r\\n\\r\\n' | nc -w 60 {ip} 8080 | tail -c 1048576 | md5sum"),
        )?;
        ensure!(
            want.len() == 32 && got == want,
            "{from} ← {to}'s /big: md5 {got} ≠ {want}"
        );
    }
    // kubectl port-forward: containerd's PortForward dials 127.0.0.1:PORT
    // inside the pod's network namespace (pkg/cri/server/
    // sandbox_portforward_linux.go); so does this. isola's redirect takes
    // it to the guest; for runc the server is in that namespace anyway.
    for (name, id) in [("net-a", &a), ("net-b", &b), ("net-c", &c)] {
        let reply = dial_in_netns(&p.netns_of(id)?, 8080, b"GET / HTTP/1.0\r\n\r\n")?;
        ensure!(
            reply.contains(&format!("hello-from-{name}")),
            "port-forward to {name}:8080: {reply:?}"
        );
    }
    // A port nothing listens on in the guest: the connection just ends.
    let reply = dial_in_netns(&p.netns_of(&a)?, 9, b"")?;
    ensure!(reply.is_empty(), "port-forward to net-a:9: {reply:?}");
    // And through CRI's PortForward and containerd's streaming server, as
    // kubectl does it (`isola pod port-forward`).
    for name in ["net-a", "net-c"] {
        let reply = through_port_forward(p, name, 8080, b"GET / HTTP/1.0\r\n\r\n")?;
        ensure!(
            reply.contains(&format!("hello-from-{name}")),
            "isola pod port-forward {name} 8080: {reply:?}"
        );
    }

    // The hostPort, from the KVM host (portmap's DNAT on the gateway).
    let mut conn = std::net::TcpStream::connect(("198.18.0.1", 18080))?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    std::io::Write::write_all(&mut conn, b"GET / HTTP/1.0\r\n\r\n")?;
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut conn, &mut reply)?;
    ensure!(
        reply.contains("hello-from-net-a"),
        "hostPort 18080: {reply:?}"
    );

    // Apart: two kernels, and a process of one pod is seen neither by the
    // other pod nor by the host.
    let boot_a = p.sh("net-a", "web", "cat /proc/sys/kernel/random/boot_id")?;
    let boot_b = p.sh("net-b", "web", "cat /proc/sys/kernel/random/boot_id")?;
    ensure!(
        boot_a != boot_b && boot_a.trim() != host_boot_id()?,
        "{boot_a} {boot_b}"
    );
    p.sh("net-b", "web", "sleep 4242 >/dev/null 2>&1 </dev/null &")?;
    ensure!(p.sh("net-b", "web", "ps -o args")?.contains("sleep 4242"));
    ensure!(!p.sh("net-a", "web", "ps -o args")?.contains("sleep 4242"));
    ensure!(
        isola_e2e::containerd::processes_containing("sleep 4242").is_empty(),
        "the host sees the guest's process"
    );
    p.sh("net-b", "web", "echo secret > /tmp/only-b")?;
    let out = p.exec("net-a", "web", &["cat", "/tmp/only-b"])?;
    ensure!(!out.status.success(), "net-a reads net-b's file");

    for (name, id) in [("net-a", &a), ("net-b", &b), ("net-c", &c)] {
        p.delete(name, id, Some(2))?;
    }
    ensure!(
        bridge_ports()?.is_empty(),
        "veths left: {:?}",
        bridge_ports()?
    );
    ensure!(
        Pods::netns_paths().len() == netns_before,
        "network namespaces left: {:?}",
        Pods::netns_paths()
    );
    let qdiscs = text(
        &std::process::Command::new("tc")
            .args(["qdisc", "show"])
            .output()?
            .stdout,
    );
    ensure!(!qdiscs.contains("_isola"), "qdiscs left: {qdiscs}");
    Ok(())
}

#[test]
fn host_network_pid_and_ipc_pods_are_refused_saying_why() -> Result<()> {
    require_kvm_host()?;
    let p = Pods::shared();
    let yaml = manifest(
        "hostnet",
        ISOLA,
        "  hostNetwork: true\n",
        &format!("  - name: app\n    image: {BUSYBOX}\n    command: [sleep, \"3600\"]\n"),
    );
    let out = p.pod(&["apply", "-"], Some(&yaml))?;
    ensure!(
        !out.status.success(),
        "{}",
        p.report("apply hostNetwork", &out)
    );
    let err = text(&out.stderr);
    ensure!(
        err.contains("hostNetwork") && err.contains("RunPodSandbox"),
        "{err}"
    );
    ensure!(p.status("hostnet").is_err(), "a refused pod is listed");
    // Nothing of it: the pod's directories and any sandbox process.
    p.assert_clean("hostnet", "hostnet")?;

    // The host's PID and IPC namespaces: refused the same way, naming each.
    for (name, field, says) in [
        ("hostpid", "hostPID", "host's PID (hostPID"),
        ("hostipc", "hostIPC", "host's IPC (hostIPC"),
    ] {
        let yaml = manifest(
            name,
            ISOLA,
            &format!("  {field}: true\n"),
            &format!("  - name: app\n    image: {BUSYBOX}\n    command: [sleep, \"3600\"]\n"),
        );
        let out = p.pod(&["apply", "-"], Some(&yaml))?;
        ensure!(!out.status.success(), "{}", p.report(field, &out));
        let err = text(&out.stderr);
        ensure!(
            err.contains(says) && err.contains("RunPodSandbox"),
            "{field}: {err}"
        );
        ensure!(p.status(name).is_err(), "a refused pod is listed");
        p.assert_clean(name, name)?;
    }
    Ok(())
}

#[test]
fn ten_pods_created_and_removed_in_a_loop_leave_nothing() -> Result<()> {
    require_kvm_host()?;
    let p = Pods::shared();
    let netns_before = Pods::netns_paths().len();
    for i in 0..10 {
        let name = format!("loop-{i}");
        let yaml = manifest(
            &name,
            ISOLA,
            "",
            &format!("  - name: app\n    image: {BUSYBOX}\n    command: [sleep, \"3600\"]\n"),
        );
        let _guard = p.guard(&[&name]);
        let id = p.apply(&yaml)?;
        p.delete(&name, &id, Some(1))?;
    }
    // Their shape's template (a virtio-net device on a tap, handed to its
    // jailed isola-vmm as a descriptor) is built, and the next pod is
    // its clone.
    let root = isola_sandbox::template::root_for(&p.containerd.run_root);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let built = loop {
        let found: Vec<std::path::PathBuf> = std::fs::read_dir(&root)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let with_net = found.into_iter().find(|dir| {
            let inputs = std::fs::read_to_string(dir.join("inputs")).unwrap_or_default();
            inputs.contains("\nnets: 1\n") && dir.join("state.json").is_file()
        });
        if let Some(dir) = with_net {
            break dir;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no template with a network device in {}",
            root.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let log = std::fs::read_to_string(built.join("build.log"))?;
    ensure!(
        log.lines().any(|l| l.contains("jailed")),
        "the template's isola-vmm was not jailed:\n{log}"
    );
    let name = "loop-clone";
    let yaml = manifest(
        name,
        ISOLA,
        "",
        &format!("  - name: app\n    image: {BUSYBOX}\n    command: [sleep, \"3600\"]\n"),
    );
    let _guard = p.guard(&[name]);
    let id = p.apply(&yaml)?;
    let isola = isola_e2e::containers::release_binary("isola")?;
    let out = std::process::Command::new(&isola)
        .args(["ps", "--json", "--run-root"])
        .arg(&p.containerd.run_root)
        .output()?;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let entry = list
        .as_array()
        .and_then(|all| all.iter().find(|e| e["id"] == id.as_str()))
        .cloned()
        .unwrap_or_default();
    ensure!(
        entry["template"] == true,
        "{name} did not start from its template: {entry:#}"
    );
    p.delete(name, &id, Some(1))?;
    ensure!(
        Pods::netns_paths().len() == netns_before,
        "{:?}",
        Pods::netns_paths()
    );
    ensure!(
        bridge_ports()?.is_empty(),
        "veths left: {:?}",
        bridge_ports()?
    );
    Ok(())
}

/// Mounts under sandbox `id`'s run directory whose source root ends with
/// `suffix`, in mount namespace of `pid` (the shim keeps the share's
/// mounts in one of its own): (mount point, options).
fn share_mounts(p: &Pods, pid: u32, id: &str, suffix: &str) -> Vec<(String, String)> {
    let run_dir = format!(
        "{}/",
        isola_sandbox::share::sandbox_dir(&p.containerd.run_root, "k8s.io", id).display()
    );
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 5 && f[4].starts_with(&run_dir) && f[3].ends_with(suffix))
                .then(|| (f[4].to_string(), f[5].to_string()))
        })
        .collect()
}

#[test]
fn volumes_host_path_empty_dirs_read_only_and_config_map_updates() -> Result<()> {
    require_kvm_host()?;
    let p = Pods::shared();
    let host = p.containerd.dir.join("pods/host-volumes");
    let _ = std::fs::remove_dir_all(&host);
    std::fs::create_dir_all(host.join("dir"))?;
    std::fs::create_dir_all(host.join("ro-vol"))?;
    std::fs::write(host.join("dir/hello.txt"), "from-host\n")?;
    std::fs::write(host.join("single.txt"), "one file\n")?;
    std::fs::write(host.join("ro-vol/keep.txt"), "keep\n")?;
    // A HostToContainer volume (containerd then writes rootfsPropagation
    // rslave, which failed the container at create: issue 17, item 8).
    // containerd wants its source on a shared or slave mount, as / is on a
    // systemd node: a bind of the directory on itself, made shared.
    let prop = host.join("prop");
    std::fs::create_dir_all(&prop)?;
    std::fs::write(prop.join("seen.txt"), "propagated\n")?;
    let flags = nix::mount::MsFlags::MS_BIND;
    nix::mount::mount(Some(&prop), &prop, None::<&str>, flags, None::<&str>)?;
    nix::mount::mount(
        None::<&str>,
        &prop,
        None::<&str>,
        nix::mount::MsFlags::MS_SHARED,
        None::<&str>,
    )?;
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(prop.clone());
    // A tmpfs inside the read-only hostPath: writable in the container, as
    // with runc (read-only is the volume's own mount: issue 17, item 8).
    let scratch = host.join("ro-vol/scratch");
    std::fs::create_dir_all(&scratch)?;
    nix::mount::mount(
        Some("tmpfs"),
        &scratch,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )?;
    let _unmount_scratch = Unmount(scratch.clone());
    std::fs::write(scratch.join("seed.txt"), "in-tmpfs\n")?;
    let volumes = format!(
        "  volumes:\n\
         \x20 - {{name: shared, emptyDir: {{}}}}\n\
         \x20 - {{name: mem, emptyDir: {{medium: Memory, sizeLimit: 8Mi}}}}\n\
         \x20 - {{name: cfg, configMap: {{data: {{greeting: v1}}}}}}\n\
         \x20 - {{name: hdir, hostPath: {{path: {dir}, type: Directory}}}}\n\
         \x20 - {{name: hfile, hostPath: {{path: {file}, type: File}}}}\n\
         \x20 - {{name: hro, hostPath: {{path: {ro}, type: Directory}}}}\n\
         \x20 - {{name: hprop, hostPath: {{path: {prop}, type: Directory}}}}\n",
        prop = prop.display(),
        dir = host.join("dir").display(),
        file = host.join("single.txt").display(),
        ro = host.join("ro-vol").display(),
    );
    let containers = format!(
        "  - name: writer\n    image: {BUSYBOX}\n    command: [sleep, \"3600\"]\n    volumeMounts:\n\
         \x20   - {{name: shared, mountPath: /shared}}\n\
         \x20   - {{name: mem, mountPath: /mem}}\n\
         \x20   - {{name: cfg, mountPath: /cfg, readOnly: true}}\n\
         \x20   - {{name: hdir, mountPath: /hdir}}\n\
         \x20   - {{name: hfile, mountPath: /hfile.txt}}\n\
         \x20   - {{name: hro, mountPath: /ro, readOnly: true}}\n\
         \x20 - name: reader\n    image: {BUSYBOX}\n    command: [sleep, \"3600\"]\n    volumeMounts:\n\
         \x20   - {{name: shared, mountPath: /shared}}\n\
         \x20   - {{name: mem, mountPath: /mem}}\n\
         \x20   - {{name: hprop, mountPath: /prop, mountPropagation: HostToContainer}}\n"
    );
    let yaml = |greeting: &str| {
        manifest("vol", ISOLA, &volumes, &containers)
            .replace("greeting: v1", &format!("greeting: {greeting}"))
    };
    let _guard = p.guard(&["vol"]);
    let id = p.apply(&yaml("v1"))?;

    // An emptyDir on disk and one in memory, shared by both containers.
    p.sh(
        "vol",
        "writer",
        "echo on-disk > /shared/x && echo in-memory > /mem/y",
    )?;
    ensure!(p.sh("vol", "reader", "cat /shared/x /mem/y")? == "on-disk\nin-memory\n");
    let df = p.sh("vol", "reader", "df -k /mem | tail -n 1")?;
    let total_kib: u64 = df
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    ensure!(total_kib == 8192, "the Memory emptyDir is not 8Mi: {df}");
    // In the guest's own memory (a tmpfs of the VM), not the host's tmpfs
    // through virtio-fs.
    let mounts = p.sh("vol", "reader", "grep ' /mem ' /proc/mounts")?;
    ensure!(mounts.starts_with("tmpfs /mem tmpfs "), "{mounts}");

    // The HostToContainer volume's container runs and reads it.
    ensure!(p.sh("vol", "reader", "cat /prop/seen.txt")? == "propagated\n");

    // hostPath: a directory both ways, and a single file.
    ensure!(p.sh("vol", "writer", "cat /hdir/hello.txt /hfile.txt")? == "from-host\none file\n");
    p.sh("vol", "writer", "echo from-guest > /hdir/new.txt")?;
    ensure!(std::fs::read_to_string(host.join("dir/new.txt"))? == "from-guest\n");

    // Read-only: refused in the guest, and read-only on the host side too
    // (the share's bind of it), so a guest kernel that ignored its own
    // mount flags could not write either.
    let out = p.exec("vol", "writer", &["sh", "-c", "echo x > /ro/new.txt"])?;
    ensure!(!out.status.success(), "wrote through a read-only volume");
    ensure!(!host.join("ro-vol/new.txt").exists());
    ensure!(p.sh("vol", "writer", "cat /ro/keep.txt")? == "keep\n");
    ensure!(p.sh("vol", "writer", "cat /ro/scratch/seed.txt")? == "in-tmpfs\n");
    p.sh("vol", "writer", "echo from-guest > /ro/scratch/new.txt")
        .context("writing to a tmpfs inside a read-only hostPath")?;
    ensure!(std::fs::read_to_string(scratch.join("new.txt"))? == "from-guest\n");
    // The share's mounts are the shim's, in a mount namespace of its own:
    // none of them is in the host's.
    let shim = p
        .containerd
        .shim_pid(&id)
        .context("no shim serving the pod")?;
    ensure!(
        share_mounts(p, std::process::id(), &id, "").is_empty(),
        "the share's mounts are in the host's mount namespace"
    );
    let binds = share_mounts(p, shim, &id, "/ro-vol");
    ensure!(!binds.is_empty(), "no share bind of the read-only volume");
    for (at, options) in &binds {
        ensure!(
            options.split(',').any(|o| o == "ro"),
            "{at} is {options} on the host"
        );
    }

    // What the host mounts under a volume's source after the start:
    // received by the HostToContainer volume (rslave), not by the private
    // one (CRI's rprivate), as with runc (critest's "mount with 'rprivate'
    // should not support propagation" on a node whose / is shared).
    let mut later_mounts = Vec::new();
    for dir in [prop.join("later"), host.join("dir/later")] {
        std::fs::create_dir_all(&dir)?;
        nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )?;
        later_mounts.push(Unmount(dir.clone()));
        std::fs::write(dir.join("file"), "mounted later\n")?;
    }
    ensure!(p.sh("vol", "reader", "cat /prop/later/file")? == "mounted later\n");
    ensure!(
        p.sh("vol", "writer", "ls -A /hdir/later")?.is_empty(),
        "a private volume received the host's later mount"
    );
    drop(later_mounts);

    // The host takes a mount inside a volume's source down and removes its
    // directory while the pod runs (critest's non-recursive read-only
    // spec does, and kubelet with its volumes): the share's copies are in
    // the shim's namespace, so the rmdir detaches them instead of failing
    // with EBUSY.
    drop(_unmount_scratch);
    std::fs::remove_dir(&scratch)
        .with_context(|| format!("removing {} while the pod runs", scratch.display()))?;

    // configMap: kubelet's atomic ..data swap on the host, seen in the
    // guest.
    ensure!(p.sh("vol", "writer", "cat /cfg/greeting")? == "v1");
    p.apply(&yaml("v2"))?;
    let deadline = std::time::Instant::now() + POD_DEADLINE;
    loop {
        let now = p.sh("vol", "writer", "cat /cfg/greeting")?;
        if now == "v2" {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the configMap update never reached the guest: {now:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    p.delete("vol", &id, Some(1))?;
    // A hostPath outlives the pod.
    ensure!(host.join("dir/new.txt").exists() && host.join("single.txt").exists());
    drop(_unmount);
    std::fs::remove_dir_all(&host).with_context(|| format!("removing {}", host.display()))?;
    Ok(())
}

/// `/proc/meminfo`'s MemTotal in KiB.
fn mem_total_kib(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `isola ps --json` lists the pod `name` (sandbox `id`) in k8s.io with its sandbox
/// container and `containers` running (by their CRI ids), its VM's size
/// and the host pids of its shim and isola-vmm.
fn isola_ps_lists_the_pod(
    p: &Pods,
    name: &str,
    id: &str,
    containers: &[&str],
    size: (u64, u64),
) -> Result<()> {
    use anyhow::Context;
    let c = p.containerd;
    let isola = isola_e2e::containers::release_binary("isola")?;
    let out = std::process::Command::new(&isola)
        .args(["ps", "--json", "--run-root"])
        .arg(&c.run_root)
        .output()?;
    ensure!(
        out.status.success(),
        "isola ps: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let e = list
        .as_array()
        .and_then(|all| all.iter().find(|e| e["id"] == id))
        .with_context(|| format!("isola ps does not list pod {id}: {list:#}"))?;
    ensure!(
        e["namespace"] == "k8s.io" && e["state"] == "running",
        "{e:#}"
    );
    ensure!(
        (e["vcpus"].as_u64(), e["memory_mib"].as_u64()) == (Some(size.0), Some(size.1)),
        "size of {id}, not {size:?}: {e:#}"
    );
    let status = p.status(name)?;
    let mut want = vec![id.to_string()];
    for name in containers {
        let cid = Pods::container(&status, name)
            .and_then(|c| c["id"].as_str())
            .with_context(|| format!("no id of container {name}: {status:#}"))?;
        want.push(cid.to_string());
    }
    for cid in &want {
        let listed = e["containers"]
            .as_array()
            .and_then(|all| all.iter().find(|x| x["id"] == cid.as_str()))
            .with_context(|| format!("isola ps does not list container {cid} of {id}: {e:#}"))?;
        ensure!(
            listed["state"] == "running" && listed["guest_pid"].as_u64().unwrap_or(0) > 0,
            "{listed:#}"
        );
    }
    let vmm = c.vmms(id);
    let shim = c.shim_pid(id);
    ensure!(
        vmm.len() == 1
            && e["vmm"]["pid"] == vmm[0]
            && Some(e["runner"]["pid"].as_u64().unwrap_or(0) as u32) == shim,
        "pids of {id}: isola-vmm {vmm:?}, shim {shim:?}: {e:#}"
    );
    Ok(())
}

#[test]
fn container_lifecycle_sizing_stats_restart_and_oom_through_cri() -> Result<()> {
    require_kvm_host()?;
    let p = Pods::shared();
    // A second pod that must not notice the first one's OOM.
    let calm_yaml = manifest(
        "calm",
        ISOLA,
        "",
        &format!("  - name: app\n    image: {BUSYBOX}\n    command: [sleep, \"3600\"]\n  - name: peer\n    image: {BUSYBOX}\n    command: [sleep, \"3601\"]\n"),
    );
    let _guard = p.guard(&["calm", "wide", "life"]);
    let calm = p.apply(&calm_yaml)?;
    // Kubernetes' default: the pod's IPC and UTS namespaces, a PID
    // namespace per container (each sees only its own processes).
    let ns = |c: &str| -> Result<Vec<String>> {
        let out = p.sh(
            "calm",
            c,
            "for n in ipc uts pid; do readlink /proc/self/ns/$n; done",
        )?;
        Ok(out.lines().map(str::to_string).collect())
    };
    let (app_ns, peer_ns) = (ns("app")?, ns("peer")?);
    ensure!(
        app_ns.len() == 3 && app_ns[..2] == peer_ns[..2] && app_ns[2] != peer_ns[2],
        "app's ipc, uts, pid namespaces {app_ns:?}, peer's {peer_ns:?}"
    );
    isola_ps_lists_the_pod(p, "calm", &calm, &["app", "peer"], (1, 256))?;
    let ps = p.sh("calm", "peer", "ps -o pid,args")?;
    ensure!(
        ps.contains("sleep 3601") && !ps.contains("sleep 3600"),
        "peer sees another container's processes: {ps}"
    );
    let c = |name: &str, limits: &str, script: &str| {
        format!(
            "  - name: {name}\n    image: {BUSYBOX}\n    command: [sh, -c]\n    args: [\"{script}\"]\n    resources: {{limits: {{{limits}}}}}\n"
        )
    };
    // The VM's vCPUs from the pod's summed CPU limits: 0.7 CPUs, 1 + 1
    // vCPUs. A pod of its own, gone at once: a guest with more vCPUs than
    // the emulated KVM host's one CPU makes every round trip of the test
    // several times slower, and the emulated host wedges now and then
    // under one that lives long (tests/kvm-host/run's watchdog).
    let wide = p.apply(&manifest(
        "wide",
        ISOLA,
        "",
        &[
            c("a", "cpu: 500m", "sleep 3600"),
            c("b", "cpu: 200m", "sleep 3600"),
        ]
        .concat(),
    ))?;
    let nproc = p.sh("wide", "a", "nproc")?;
    ensure!(nproc.trim() == "2", "vCPUs of a pod of 0.7 CPUs: {nproc}");
    isola_ps_lists_the_pod(p, "wide", &wide, &["a", "b"], (2, 256))?;
    p.delete("wide", &wide, Some(0))?;

    // A Memory emptyDir that main and fail share: it lives as long as the
    // pod, across fail's restart.
    let scratch = "    volumeMounts: [{name: scratch, mountPath: /scratch}]\n";
    // 192 MiB in all: the VM gets 256 + 192 MiB on top of the config's
    // defaults, and its one vCPU.
    let containers = [
        c(
            "main",
            "memory: 128Mi",
            "trap '' TERM; echo main-up; while true; do sleep 1; done",
        ) + scratch,
        c(
            "done",
            "memory: 16Mi",
            "for i in $(seq 1 2000); do echo line-$i; done; echo last >&2; exit 0",
        ),
        c(
            "fail",
            "memory: 16Mi",
            "cat /proc/sys/kernel/random/boot_id; echo ran >> /scratch/runs; exit 3",
        ) + scratch,
        c("oom", "memory: 32Mi", "exec tail /dev/zero"),
    ]
    .concat();
    let id = p.apply(&manifest(
        "life",
        ISOLA,
        "  restartPolicy: OnFailure\n  volumes:\n  - name: scratch\n    emptyDir: {medium: Memory}\n",
        &containers,
    ))?;

    // The VM's memory from the pod's summed limits; main's limit as its
    // cgroup in the guest.
    let total = mem_total_kib(&p.sh("life", "main", "cat /proc/meminfo")?);
    ensure!(
        total > 384 * 1024 && total <= 448 * 1024,
        "MemTotal {total} KiB for a 448 MiB VM"
    );
    ensure!(
        p.sh("life", "main", "cat /sys/fs/cgroup/memory.max")?
            .trim()
            == "134217728"
    );
    isola_ps_lists_the_pod(p, "life", &id, &["main"], (1, 448))?;

    // Exit codes, reasons and times.
    let done = p.wait_state("life", "done", "exited")?;
    ensure!(
        done["exit_code"] == 0 && done["reason"] == "Completed",
        "{done:#}"
    );
    let (f0, s0, c0) = (
        done["finished_at"].as_i64().unwrap_or(0),
        done["started_at"].as_i64().unwrap_or(0),
        done["created_at"].as_i64().unwrap_or(0),
    );
    ensure!(c0 > 0 && c0 <= s0 && s0 <= f0, "{done:#}");
    let fail = p.wait_state("life", "fail", "exited")?;
    ensure!(
        fail["exit_code"] == 3 && fail["reason"] == "Error",
        "{fail:#}"
    );
    let oom = p.wait_state("life", "oom", "exited")?;
    ensure!(
        oom["reason"] == "OOMKilled" && oom["exit_code"] == 137,
        "{oom:#}"
    );
    // The OOM stayed in its VM: the rest of the pod, the other pod and
    // this host go on.
    ensure!(p.sh("life", "main", "echo alive")? == "alive\n");
    ensure!(p.sh("calm", "app", "echo calm")? == "calm\n");
    ensure!(p.status("calm")?["containers"][0]["state"] == "running");

    // done's log, whole, streams apart, after the container exited.
    let (out, err) = p.logs("life", "done")?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(
        lines.len() == 2000 && lines[0] == "line-1" && lines[1999] == "line-2000",
        "{} lines",
        lines.len()
    );
    ensure!(err == "last\n", "{err:?}");

    // A restart runs in the same VM: the same boot id as before.
    let (first, _) = p.logs("life", "fail")?;
    let out = p.pod(&["restart", "life", "-c", "fail"], None)?;
    ensure!(out.status.success(), "{}", p.report("restart", &out));
    let again = p.wait_state("life", "fail", "exited")?;
    ensure!(again["attempt"] == 1, "{again:#}");
    let (second, _) = p.logs("life", "fail")?;
    let main_boot = p.sh("life", "main", "cat /proc/sys/kernel/random/boot_id")?;
    ensure!(
        first == second && first == main_boot,
        "{first:?} {second:?} {main_boot:?}"
    );
    // What the first attempt wrote to the emptyDir is still there.
    let runs = p.sh("life", "main", "cat /scratch/runs")?;
    ensure!(
        runs == "ran\nran\n",
        "/scratch/runs after a restart: {runs:?}"
    );
    let out = p.pod(&["logs", "life", "-c", "fail", "--previous"], None)?;
    ensure!(
        text(&out.stdout) == first,
        "{}",
        p.report("logs --previous", &out)
    );
    // kubelet would not restart a container that completed (OnFailure).
    let out = p.pod(&["restart", "life", "-c", "done"], None)?;
    ensure!(
        !out.status.success() && text(&out.stderr).contains("OnFailure"),
        "{}",
        p.report("restart done", &out)
    );

    // ContainerStats and ListContainerStats.
    let out = p.pod(&["stats", "life"], None)?;
    ensure!(out.status.success(), "{}", p.report("stats", &out));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(all.as_array().is_some_and(|a| a.len() >= 4), "{all:#}");
    let out = p.pod(&["stats", "life", "-c", "main"], None)?;
    let one: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let main = &one[0];
    ensure!(main["name"] == "main", "{one:#}");
    ensure!(
        main["memory_working_set_bytes"].as_u64().unwrap_or(0) > 0,
        "{one:#}"
    );
    ensure!(
        main["cpu_usage_core_nano_seconds"].as_u64().unwrap_or(0) > 0,
        "{one:#}"
    );

    // StopContainer's grace period: main ignores SIGTERM, so it dies of
    // SIGKILL after 3 s, not before.
    let started = std::time::Instant::now();
    let out = p.pod(&["stop", "life", "-c", "main", "--grace", "3"], None)?;
    ensure!(out.status.success(), "{}", p.report("stop", &out));
    let waited = started.elapsed();
    let main = p.wait_state("life", "main", "exited")?;
    ensure!(main["exit_code"] == 137, "{main:#}");
    ensure!(
        waited >= std::time::Duration::from_secs(3),
        "stopped after {waited:?}"
    );

    p.delete("life", &id, Some(1))?;
    p.delete("calm", &calm, Some(1))?;
    Ok(())
}

/// `isola monitor` labels a CRI pod's series with the pod's name and
/// namespace (from the sandbox container's annotations, in its bundle)
/// and each container's with its CRI name beside its id.
#[test]
fn isola_monitor_labels_a_pods_series_with_its_pod_and_container_names() -> Result<()> {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    require_kvm_host()?;
    let p = Pods::shared();
    let yaml = manifest(
        "metrics",
        ISOLA,
        "",
        &format!("  - name: app\n    image: {BUSYBOX}\n    command: [sleep, \"3600\"]\n"),
    );
    let _guard = p.guard(&["metrics"]);
    let id = p.apply(&yaml)?;
    let isola = isola_e2e::containers::release_binary("isola")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut monitor = std::process::Command::new(&isola)
        .args(["monitor", "--listen", &addr, "--run-root"])
        .arg(&p.containerd.run_root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let labelled = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut conn = loop {
            match std::net::TcpStream::connect(&addr) {
                Ok(conn) => break conn,
                Err(err) => ensure!(Instant::now() < deadline, "isola monitor on {addr}: {err}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        conn.read_to_string(&mut body)?;
        let pod = format!(
            "sandbox=\"{id}\",namespace=\"k8s.io\",pod=\"metrics\",pod_namespace=\"default\""
        );
        ensure!(
            body.contains(&format!("isola_agent_up{{{pod}}} 1")),
            "no isola_agent_up 1 for {pod}: {body}"
        );
        let app = body
            .lines()
            .find(|l| {
                l.starts_with(&format!("isola_container_pids{{{pod},container=\""))
                    && l.contains("container_name=\"app\"")
            })
            .with_context(|| format!("no isola_container_pids of container app: {body}"))?;
        ensure!(!app.ends_with(" 0.0"), "{app}");
        Ok(())
    })();
    let _ = monitor.kill();
    let _ = monitor.wait();
    p.delete("metrics", &id, Some(1))?;
    labelled
}
