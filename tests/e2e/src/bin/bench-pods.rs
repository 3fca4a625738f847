//! bench-pods: Kubernetes pods through containerd's CRI (`isola pod`, the
//! way kubelet drives CRI), isola's runtime handler against runc's, side by
//! side in one run on the same KVM host, in the e2e suite's private
//! containerd with its CNI bridge. Run it as `make bench` (its last step).
//! Medians of `--runs`:
//!
//! - pod start: `isola pod apply` of a pod with one busybox container
//!   (`sleep`), from RunPodSandbox until the container runs (apply waits
//!   for StartContainer and polls until the container is running), isola
//!   and runc interleaved after one warm-up of each. Each pod is deleted
//!   (not timed) and must leave nothing before the next starts;
//! - 10 isola pods started at once against one: the wall time until all
//!   ten run, divided by the median single-pod start above (1.0 would be
//!   perfect parallelism; 10.0, none). Fewer runs (at most 3): each is ten
//!   VM boots;
//! - host memory of an idle pod: the PSS of everything the pod costs the
//!   host, once settled (`isola_e2e::pss`): isola, the shim, isola-vmm and
//!   virtiofsd; runc, the shim and the pod's processes (pause and the
//!   container, from the pod's cgroup). Then the CPU those processes use
//!   over 10 s of idling, in millicores. The isola figures are what the
//!   RuntimeClass's `overhead.podFixed` is set from
//!   (configs/k8s/runtimeclass.yaml);
//! - pod network throughput, both ways between the KVM host (on the CNI
//!   bridge's address) and a pod (busybox `nc`): [`NET_BYTES`] sent and
//!   timed from connect until the pod's byte count comes back (host →
//!   pod) or from the first byte to EOF (pod → host), counted on arrival; for an isola pod with its
//!   virtio-net checksum/TSO offloads (the default), one without them
//!   (`io.isola.config.net_offloads: "false"`, checked in the guest's
//!   negotiated features) and a runc pod, interleaved.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use isola_e2e::pods::{
    annotate, manifest, Pods, BUSYBOX, ISOLA, NO_OFFLOADS, OFFLOAD_FEATURE_BITS, POD_DEADLINE,
};
use isola_e2e::procstat::cpu_time;
use isola_e2e::pss::{proc, program, settle, Proc, Pss, CONTAINER, SHIM, VIRTIOFSD, VMM};
use isola_e2e::report::{self, Row};
use isola_e2e::{median, require_kvm_host};

/// Pods started at once.
const PARALLEL: usize = 10;
/// How long an idle pod's CPU use is measured.
const CPU_WINDOW: Duration = Duration::from_secs(10);
/// Bytes sent each way in a throughput run.
const NET_BYTES: u64 = 32 << 20;
/// The KVM host's address on the test CNI bridge (the pods' gateway).
const BRIDGE_IP: &str = "198.18.0.1";
/// The port a pod listens on for the host → pod run.
const POD_PORT: u16 = 5001;

fn main() {
    if let Err(err) = run() {
        eprintln!("bench-pods: error: {err:#}");
        // exit runs the atexit hook that stops the shared containerd.
        std::process::exit(1);
    }
}

fn pod(name: &str, class: &str) -> String {
    manifest(
        name,
        class,
        "",
        &format!("  - name: app\n    image: {BUSYBOX}\n    command: [sleep, \"100000\"]\n"),
    )
}

fn short(class: &str) -> &'static str {
    if class == ISOLA {
        "isola"
    } else {
        "runc"
    }
}

fn run() -> Result<()> {
    let runs = isola_e2e::runs_from_args("bench-pods")?;
    let host = require_kvm_host()?;
    let p = Pods::shared();
    println!(
        "bench-pods: {runs} runs each, interleaved (after one warm-up of each); {host} KVM host"
    );

    // Network throughput, first (it needs no warm-up).
    let kinds = [Net::Offloads, Net::NoOffloads, Net::Runc];
    let mut tput: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); kinds.len()];
    for i in 1..=runs {
        for (k, kind) in kinds.iter().enumerate() {
            let (to_pod, from_pod) =
                throughput(p, &format!("bench-net-{}-{i}", kind.slug()), *kind)?;
            println!(
                "run {i}: network {:<22} host → pod {to_pod:>7.1} MiB/s   pod → host {from_pod:>7.1} MiB/s",
                kind.label()
            );
            tput[k].0.push(to_pod);
            tput[k].1.push(from_pod);
        }
    }
    let tput_samples = tput.clone();
    let tput: Vec<(f64, f64)> = tput
        .into_iter()
        .map(|(a, b)| (median(a), median(b)))
        .collect();

    // (a) pod start.
    for class in [ISOLA, ""] {
        let t = start_and_delete(p, &format!("bench-warm-{}", short(class)), class)?;
        println!("warm-up: pod start {:<5} {:>7.0} ms", short(class), ms(t));
    }
    let (mut start_i, mut start_r) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        let ti = start_and_delete(p, &format!("bench-isola-{i}"), ISOLA)?;
        let tr = start_and_delete(p, &format!("bench-runc-{i}"), "")?;
        println!(
            "run {i}: pod start   isola {:>7.0} ms   runc {:>7.0} ms",
            ms(ti),
            ms(tr)
        );
        start_i.push(ms(ti));
        start_r.push(ms(tr));
    }
    let (si, sr) = (median(start_i.clone()), median(start_r.clone()));

    // (b) ten at once.
    let mut parallel = Vec::new();
    for i in 1..=runs.min(3) {
        let t = ten_at_once(p, i)?;
        println!("run {i}: {PARALLEL} isola pods at once {:>7.0} ms", ms(t));
        parallel.push(ms(t));
    }
    let tp = median(parallel.clone());

    // (c) an idle pod's PSS.
    let (mut idle_i, mut idle_r) = (Vec::new(), Vec::new());
    let (mut cpu_i, mut cpu_r) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        let (s, m) = idle(p, &format!("bench-idle-isola-{i}"), ISOLA)?;
        println!("run {i}: idle pod PSS isola {s}; CPU {m:.1} millicores");
        idle_i.push(s);
        cpu_i.push(m);
        let (s, m) = idle(p, &format!("bench-idle-runc-{i}"), "")?;
        println!("run {i}: idle pod PSS runc  {s}; CPU {m:.1} millicores");
        idle_r.push(s);
        cpu_r.push(m);
    }
    let (mi, mr) = (median(cpu_i.clone()), median(cpu_r.clone()));
    let med = |samples: &[Pss], name: &str| median(samples.iter().map(|s| s.mib(name)).collect());
    let total = |samples: &[Pss]| median(samples.iter().map(Pss::total_mib).collect());
    let (pi, pr) = (total(&idle_i), total(&idle_r));

    println!();
    println!(
        "| {:<38} | isola     | runc      |",
        format!("median of {runs}")
    );
    println!("|----------------------------------------|-----------|-----------|");
    println!("| pod start to running (ms)              | {si:>9.0} | {sr:>9.0} |");
    println!(
        "| {:<38} | {tp:>9.0} | {:>9} |",
        format!("{PARALLEL} pods at once, all running (ms)"),
        "-"
    );
    println!(
        "| idle pod PSS: shim (MiB)               | {:>9.1} | {:>9.1} |",
        med(&idle_i, SHIM),
        med(&idle_r, SHIM)
    );
    println!(
        "| idle pod PSS: isola-vmm (MiB)          | {:>9.1} | {:>9} |",
        med(&idle_i, VMM),
        "-"
    );
    println!(
        "| idle pod PSS: virtiofsd (MiB)          | {:>9.1} | {:>9} |",
        med(&idle_i, VIRTIOFSD),
        "-"
    );
    println!(
        "| idle pod PSS: pod processes (MiB)      | {:>9} | {:>9.1} |",
        "in the VM",
        med(&idle_r, CONTAINER)
    );
    println!("| idle pod PSS: total (MiB)              | {pi:>9.1} | {pr:>9.1} |");
    println!("| idle pod CPU (millicores)              | {mi:>9.1} | {mr:>9.1} |");
    println!();
    println!(
        "| {:<38} | host → pod | pod → host |",
        format!("network, MiB/s, median of {runs}")
    );
    println!("|----------------------------------------|------------|------------|");
    for (kind, (to_pod, from_pod)) in kinds.iter().zip(&tput) {
        println!(
            "| {:<38} | {to_pod:>10.1} | {from_pod:>10.1} |",
            kind.label()
        );
    }
    println!("pod start ratio isola/runc = {:.2}", si / sr);
    println!(
        "{PARALLEL} pods at once / 1 pod = {:.2} (1.0: perfectly parallel; {PARALLEL}.0: serial)",
        tp / si
    );
    println!(
        "idle pod isola = {pi:.1} MiB PSS, {mi:.1} millicores (the RuntimeClass overhead); runc = {pr:.1} MiB, {mr:.1} millicores"
    );
    let ((on_in, on_out), (off_in, off_out), (runc_in, runc_out)) = (tput[0], tput[1], tput[2]);
    println!(
        "virtio-net offloads on/off throughput = {:.2} host → pod, {:.2} pod → host",
        on_in / off_in,
        on_out / off_out
    );
    println!(
        "network isola (offloads)/runc = {:.2} host → pod, {:.2} pod → host",
        on_in / runc_in,
        on_out / runc_out
    );
    let totals = |samples: &[Pss]| -> Vec<f64> { samples.iter().map(Pss::total_mib).collect() };
    let mut rows = vec![
        Row::new("CRI pod start to running", "ms", "isola", &start_i)
            .against("runc", &start_r)
            .goal("ratio <= 1.3"),
        Row::new(
            &format!("{PARALLEL} pods at once, all running"),
            "ms",
            "isola",
            &parallel,
        ),
        Row::new("idle pod, host PSS", "MiB", "isola", &totals(&idle_i))
            .against("runc", &totals(&idle_r))
            .goal("<= 25 MiB"),
        Row::new("idle pod CPU", "millicores", "isola", &cpu_i).against("runc", &cpu_r),
    ];
    for (kind, (to_pod, from_pod)) in kinds[..2].iter().zip(&tput_samples) {
        let runc = &tput_samples[2];
        rows.push(
            Row::new("network host → pod", "MiB/s", kind.label(), to_pod).against("runc", &runc.0),
        );
        rows.push(
            Row::new("network pod → host", "MiB/s", kind.label(), from_pod)
                .against("runc", &runc.1),
        );
    }
    println!(
        "rows: {}",
        report::save("bench-pods", &host, &rows)?.display()
    );
    Ok(())
}

/// The pods of the throughput runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    /// isola, virtio-net with checksum and TSO offloads (the default).
    Offloads,
    /// isola with `io.isola.config.net_offloads: "false"`.
    NoOffloads,
    Runc,
}

impl Net {
    fn label(self) -> &'static str {
        match self {
            Net::Offloads => "isola, offloads on",
            Net::NoOffloads => "isola, offloads off",
            Net::Runc => "runc",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Net::Offloads => "on",
            Net::NoOffloads => "off",
            Net::Runc => "runc",
        }
    }
}

/// What an `isola pod exec` thread of a throughput run returned.
fn exec_result(joined: std::thread::Result<Result<String>>) -> Result<String> {
    joined.map_err(|_| anyhow::anyhow!("the exec thread panicked"))?
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
}

/// A pod of `kind` measured both ways (see the module's comment): MiB/s
/// host → pod, pod → host. The pod is deleted afterwards.
fn throughput(p: &Pods, name: &str, kind: Net) -> Result<(f64, f64)> {
    let yaml = pod(name, if kind == Net::Runc { "" } else { ISOLA });
    let yaml = if kind == Net::NoOffloads {
        annotate(&yaml, NO_OFFLOADS)
    } else {
        yaml
    };
    let id = p.apply(&yaml)?;
    let measured = (|| -> Result<(f64, f64)> {
        if kind != Net::Runc {
            let got = p.guest_offloads(name, "app")?;
            let want: &[usize] = if kind == Net::Offloads {
                &OFFLOAD_FEATURE_BITS
            } else {
                &[]
            };
            ensure!(
                got == want,
                "pod {name}: negotiated offload bits {got:?}, not {want:?}"
            );
        }
        let ip = p.status(name)?["ip"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        ensure!(!ip.is_empty(), "pod {name} has no IP");
        Ok((host_to_pod(p, name, &ip)?, pod_to_host(p, name)?))
    })()
    .with_context(|| format!("network throughput of pod {name} ({})", kind.label()));
    let removed = p.delete(name, &id, Some(1));
    let measured = measured?;
    removed.with_context(|| format!("removing pod {name}"))?;
    Ok(measured)
}

/// [`NET_BYTES`] from the host to `nc -l … -e wc -c` in the pod, timed
/// from connect until the pod's count comes back (wc answers at EOF).
fn host_to_pod(p: &Pods, name: &str, ip: &str) -> Result<f64> {
    std::thread::scope(|s| {
        let server = s.spawn(|| p.sh(name, "app", &format!("nc -l -p {POD_PORT} -e wc -c")));
        let deadline = Instant::now() + POD_DEADLINE;
        let (mut conn, start) = loop {
            let start = Instant::now();
            match TcpStream::connect((ip, POD_PORT)) {
                Ok(conn) => break (conn, start),
                // Refused until nc listens.
                Err(_) if Instant::now() < deadline && !server.is_finished() => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(err) => bail!("connecting to {ip}:{POD_PORT} in pod {name}: {err}"),
            }
        };
        conn.set_read_timeout(Some(POD_DEADLINE))?;
        let chunk = vec![0x5au8; 1 << 16];
        let mut left = NET_BYTES;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            conn.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        conn.shutdown(Shutdown::Write)?;
        let mut counted = String::new();
        conn.take(64).read_to_string(&mut counted)?;
        let took = start.elapsed();
        exec_result(server.join())?;
        ensure!(
            counted.trim() == NET_BYTES.to_string(),
            "pod {name} received {counted:?} bytes, not {NET_BYTES}"
        );
        Ok(mib_per_s(NET_BYTES, took))
    })
}

/// [`NET_BYTES`] from `dd` in the pod (`nc -e dd …`) to a listener of the host on the
/// bridge, timed from the first byte to EOF.
fn pod_to_host(p: &Pods, name: &str) -> Result<f64> {
    let listener = TcpListener::bind((BRIDGE_IP, 0))
        .with_context(|| format!("listening on {BRIDGE_IP} (the test CNI bridge)"))?;
    let port = listener.local_addr()?.port();
    std::thread::scope(|s| {
        let blocks = NET_BYTES >> 16;
        let client = s.spawn(move || {
            p.sh(
                name,
                "app",
                // dd writes to the socket itself: busybox nc would copy
                // a pipe in 1 KiB writes.
                &format!("nc {BRIDGE_IP} {port} -e dd if=/dev/zero bs=65536 count={blocks}"),
            )
        });
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + POD_DEADLINE;
        let mut conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    if client.is_finished() || Instant::now() >= deadline {
                        let out = exec_result(client.join());
                        bail!("pod {name} never connected to {BRIDGE_IP}:{port}: {out:?}");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(err) => return Err(err.into()),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(POD_DEADLINE))?;
        let mut buf = vec![0u8; 1 << 16];
        // Timed from the first byte: the bytes of the first read are not
        // counted in the rate.
        let first = conn.read(&mut buf)? as u64;
        let start = Instant::now();
        let mut got = first;
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        let took = start.elapsed();
        drop(conn);
        exec_result(client.join())?;
        ensure!(
            got == NET_BYTES,
            "the host received {got} bytes from pod {name}, not {NET_BYTES}"
        );
        Ok(mib_per_s(NET_BYTES - first, took))
    })
}

/// Applies pod `name` and deletes it; the apply's wall time.
fn start_and_delete(p: &Pods, name: &str, class: &str) -> Result<Duration> {
    let start = Instant::now();
    let id = p.apply(&pod(name, class))?;
    let took = start.elapsed();
    p.delete(name, &id, Some(1))?;
    Ok(took)
}

/// Ten isola pods applied at once: the wall time until all run.
fn ten_at_once(p: &'static Pods, run: usize) -> Result<Duration> {
    let start = Instant::now();
    let threads: Vec<_> = (0..PARALLEL)
        .map(|k| {
            let name = format!("bench-par-{run}-{k}");
            std::thread::spawn(move || p.apply(&pod(&name, ISOLA)).map(|id| (name, id)))
        })
        .collect();
    let mut pods = Vec::new();
    let mut first_error = None;
    for t in threads {
        match t.join() {
            Ok(Ok(pod)) => pods.push(pod),
            Ok(Err(err)) => {
                first_error.get_or_insert(err);
            }
            Err(_) => {
                first_error.get_or_insert(anyhow::anyhow!("an apply thread panicked"));
            }
        }
    }
    let took = start.elapsed();
    for (name, id) in &pods {
        p.delete(name, id, Some(1))?;
    }
    if let Some(err) = first_error {
        return Err(err.context(format!("{PARALLEL} pods at once")));
    }
    Ok(took)
}

/// Pod `name` idle: its processes' PSS once settled, and their CPU use
/// over [`CPU_WINDOW`] after that (millicores); then deleted.
fn idle(p: &Pods, name: &str, class: &str) -> Result<(Pss, f64)> {
    let id = p.apply(&pod(name, class))?;
    let uid = p.status(name)?["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let measured = settle(|| processes(p, &id, &uid, class)).and_then(|pss| {
        let pids: Vec<u32> = pss.procs.iter().map(|p| p.pid).collect();
        Ok((pss, cpu_millicores(&pids)?))
    });
    let removed = p.delete(name, &id, Some(1));
    let measured = measured.with_context(|| format!("measuring pod {name}"))?;
    removed.with_context(|| format!("removing pod {name}"))?;
    Ok(measured)
}

/// The CPU `pids` use together over [`CPU_WINDOW`], in millicores.
fn cpu_millicores(pids: &[u32]) -> Result<f64> {
    let total = || -> Result<Duration> { pids.iter().map(|&pid| cpu_time(pid)).sum() };
    let (t0, c0) = (Instant::now(), total()?);
    std::thread::sleep(CPU_WINDOW);
    let (t1, c1) = (Instant::now(), total()?);
    Ok(c1.saturating_sub(c0).as_secs_f64() / (t1 - t0).as_secs_f64() * 1000.0)
}

/// The host processes pod sandbox `id` costs, with their PSS.
fn processes(p: &Pods, id: &str, uid: &str, class: &str) -> Result<Vec<Proc>> {
    let mut procs = Vec::new();
    if class == ISOLA {
        let shim = p
            .containerd
            .shim_pid(id)
            .with_context(|| format!("no containerd-shim-isola-v2 serves {id}"))?;
        procs.push(proc(SHIM.to_string(), shim)?);
        for (pid, cmd) in p.containerd.helpers(id) {
            procs.push(proc(program(&cmd), pid)?);
        }
        for name in [VMM, VIRTIOFSD] {
            ensure!(
                procs.iter().any(|p| p.name == name),
                "no {name} for pod {id}: {procs:?}"
            );
        }
    } else {
        let flag = format!(" -id {id} ");
        let shim = isola_e2e::containerd::processes_containing("containerd-shim-runc-v2")
            .into_iter()
            .find(|(_, cmd)| format!("{cmd} ").contains(&flag))
            .map(|(pid, _)| pid)
            .with_context(|| format!("no containerd-shim-runc-v2 serves {id}"))?;
        procs.push(proc(SHIM.to_string(), shim)?);
        let cgroup = Path::new("/sys/fs/cgroup/kubepods").join(format!("pod{uid}"));
        for pid in cgroup_pids(&cgroup)? {
            procs.push(proc(CONTAINER.to_string(), pid)?);
        }
        ensure!(
            procs.len() >= 3,
            "pause and sleep not found in {}: {procs:?}",
            cgroup.display()
        );
    }
    Ok(procs)
}

/// Every pid in the cgroup tree at `dir`.
fn cgroup_pids(dir: &Path) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            pids.extend(cgroup_pids(&entry.path())?);
        }
    }
    Ok(pids)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
