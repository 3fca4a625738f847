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
//!   (configs/k8s/runtimeclass.yaml).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use isola_e2e::pods::{manifest, Pods, BUSYBOX, ISOLA};
use isola_e2e::procstat::cpu_time;
use isola_e2e::pss::{proc, program, settle, Proc, Pss, CONTAINER, SHIM, VIRTIOFSD, VMM};
use isola_e2e::{median, require_kvm_host};

/// Pods started at once.
const PARALLEL: usize = 10;
/// How long an idle pod's CPU use is measured.
const CPU_WINDOW: Duration = Duration::from_secs(10);

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
    let (si, sr) = (median(start_i), median(start_r));

    // (b) ten at once.
    let mut parallel = Vec::new();
    for i in 1..=runs.min(3) {
        let t = ten_at_once(p, i)?;
        println!("run {i}: {PARALLEL} isola pods at once {:>7.0} ms", ms(t));
        parallel.push(ms(t));
    }
    let tp = median(parallel);

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
    let (mi, mr) = (median(cpu_i), median(cpu_r));
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
        "| {PARALLEL} pods at once, all running (ms)    | {tp:>9.0} | {:>9} |",
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
    println!("pod start ratio isola/runc = {:.2}", si / sr);
    println!(
        "{PARALLEL} pods at once / 1 pod = {:.2} (1.0: perfectly parallel; {PARALLEL}.0: serial)",
        tp / si
    );
    println!(
        "idle pod isola = {pi:.1} MiB PSS, {mi:.1} millicores (the RuntimeClass overhead); runc = {pr:.1} MiB, {mr:.1} millicores"
    );
    Ok(())
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
