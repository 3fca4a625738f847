//! bench-shim: containerd with the isola shim (`io.containerd.isola.v2`)
//! against containerd with runc (`io.containerd.runc.v2`), side by side in
//! one run on the same KVM host, through `ctr` and the busybox image
//! (build/images/busybox.tar), in the e2e suite's private containerd
//! (`Containerd::shared`). Run it as `make bench` (after `bench` and
//! `bench-containers`). Medians of `--runs`:
//!
//! - `ctr run --rm IMAGE ID echo hi`: the wall time of the whole ctr
//!   command (create, start, output, exit, delete; for isola a VM boot and
//!   stop), isola and runc interleaved, after one warm-up of each that is
//!   not counted. Each run starts once the previous one left nothing
//!   behind;
//! - host memory of an idle container: `ctr run -d IMAGE ID sleep 100000`,
//!   then, once `ctr task ls` says RUNNING, the PSS (proportional set size:
//!   memory shared between processes, such as the guest RAM isola-vmm and
//!   virtiofsd both map, is counted once) of every process the container
//!   costs the host, from `/proc/PID/smaps_rollup`, sampled every second
//!   until two samples in a row agree within 2% (the guest is idle; at
//!   most 60 s). isola: the shim, isola-vmm and virtiofsd (both of its
//!   processes); runc: the shim and the container's processes. Every
//!   container is killed and deleted afterwards, and must leave nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use isola_e2e::containerd::{processes_containing, text, Containerd, BUSYBOX, RUNTIME};
use isola_e2e::{median, project_dir, require_kvm_host, which};

/// containerd's runc runtime.
const RUNC: &str = "io.containerd.runc.v2";
/// The idle sampling: interval, agreement, bound.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
const SETTLED_WITHIN: f64 = 0.02;
const SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// How long a killed container's processes may take to go.
const GONE_DEADLINE: Duration = Duration::from_secs(90);

fn main() {
    if let Err(err) = run() {
        eprintln!("bench-shim: error: {err:#}");
        // exit runs the atexit hook that stops the shared containerd.
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let runs = isola_e2e::runs_from_args("bench-shim")?;
    let host = require_kvm_host()?;
    preflight()?;
    // Starts containerd and imports the images (a failure here panics).
    let c = Containerd::shared();
    let vm = vm_size(c);
    println!(
        "bench-shim: {runs} runs each, interleaved (ctr run: after one warm-up of each); \
         containerd {}, isola VMs {vm}; {host} KVM host",
        containerd_version(c)
    );

    // (a) ctr run --rm ... echo hi.
    for runtime in [RUNTIME, RUNC] {
        let t = echo_run(c, runtime, &format!("bench-echo-{}-warm", short(runtime)))?;
        println!("warm-up: ctr run {:<5} {:>7.0} ms", short(runtime), ms(t));
    }
    let (mut run_i, mut run_r) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        let ti = echo_run(c, RUNTIME, &format!("bench-echo-isola-{i}"))?;
        let tr = echo_run(c, RUNC, &format!("bench-echo-runc-{i}"))?;
        println!(
            "run {i}: ctr run echo hi   isola {:>7.0} ms   runc {:>7.0} ms",
            ms(ti),
            ms(tr)
        );
        run_i.push(ms(ti));
        run_r.push(ms(tr));
    }

    // (b) an idle container's PSS.
    let (mut idle_i, mut idle_r) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        let s = idle(c, RUNTIME, &format!("bench-idle-isola-{i}"))?;
        println!("run {i}: idle PSS isola {s}");
        idle_i.push(s);
        let s = idle(c, RUNC, &format!("bench-idle-runc-{i}"))?;
        println!("run {i}: idle PSS runc  {s}");
        idle_r.push(s);
    }

    let (ri, rr) = (median(run_i), median(run_r));
    let med = |samples: &[Pss], name: &str| median(samples.iter().map(|s| s.mib(name)).collect());
    let total = |samples: &[Pss]| median(samples.iter().map(Pss::total_mib).collect());
    let (ti, tr) = (total(&idle_i), total(&idle_r));
    println!();
    println!(
        "| {:<35} | isola     | runc      |",
        format!("median of {runs}")
    );
    println!("|-------------------------------------|-----------|-----------|");
    println!("| ctr run --rm echo hi (ms)           | {ri:>9.0} | {rr:>9.0} |");
    println!(
        "| idle PSS: shim (MiB)                | {:>9.1} | {:>9.1} |",
        med(&idle_i, SHIM),
        med(&idle_r, SHIM)
    );
    println!(
        "| idle PSS: isola-vmm (MiB)           | {:>9.1} | {:>9} |",
        med(&idle_i, VMM),
        "-"
    );
    println!(
        "| idle PSS: virtiofsd (MiB)           | {:>9.1} | {:>9} |",
        med(&idle_i, VIRTIOFSD),
        "-"
    );
    println!(
        "| idle PSS: container processes (MiB) | {:>9} | {:>9.1} |",
        "in the VM",
        med(&idle_r, CONTAINER)
    );
    println!("| idle PSS: total (MiB)               | {ti:>9.1} | {tr:>9.1} |");
    println!("ctr run ratio isola/runc = {:.2} (goal <= 2.0)", ri / rr);
    println!(
        "idle container PSS (shim + isola-vmm + virtiofsd) = {ti:.1} MiB (goal <= 40; Kata ~125 MB)"
    );
    println!("idle runc container PSS (shim + container) = {tr:.1} MiB");
    Ok(())
}

/// What must be there before containerd starts: a panic in
/// `Containerd::shared` would say less.
fn preflight() -> Result<()> {
    let project = project_dir();
    for file in ["build/images/busybox.tar", "build/images/busybox-user.tar"] {
        let path = project.join(file);
        ensure!(
            path.exists(),
            "{} is missing: run `make busybox-image`",
            path.display()
        );
    }
    for file in [
        "target/release/containerd-shim-isola-v2",
        "target/release/isola-vmm",
        "build/vmlinux",
        "build/initrd.img",
    ] {
        let path = project.join(file);
        ensure!(path.exists(), "{} is missing: run `make`", path.display());
    }
    for tool in ["containerd", "ctr", "containerd-shim-runc-v2", "runc"] {
        which(tool).with_context(|| {
            format!("{tool} is not installed (tests/kvm-host/setup-e2e installs it)")
        })?;
    }
    Ok(())
}

/// `isola` or `runc`, for ids and lines.
fn short(runtime: &str) -> &'static str {
    if runtime == RUNTIME {
        "isola"
    } else {
        "runc"
    }
}

/// The VM size the shim gives a container (the shared containerd's config).
fn vm_size(c: &Containerd) -> String {
    let path = c.dir.join("isola.toml");
    match isola_sandbox::config::Config::load(Some(&path)) {
        Ok(config) => format!(
            "{} vCPU, {} MiB",
            config.hypervisor.default_vcpus, config.hypervisor.default_memory_mib
        ),
        Err(err) => format!("of unknown size ({err})"),
    }
}

/// The server's version, as `ctr version` prints it.
fn containerd_version(c: &Containerd) -> String {
    c.ctr(&["version"])
        .ok()
        .and_then(|out| {
            let printed = text(&out.stdout);
            let server = printed.split_once("Server:")?.1.to_string();
            server.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("Version:")
                    .map(|v| v.trim().to_string())
            })
        })
        .unwrap_or_else(|| "(version unknown)".to_string())
}

/// `ctr run --rm --runtime RUNTIME busybox ID echo hi`: its wall time, once
/// it printed `hi` and exited 0; then waits until it left nothing.
fn echo_run(c: &Containerd, runtime: &str, id: &str) -> Result<Duration> {
    discard(c, id);
    let start = Instant::now();
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        runtime,
        BUSYBOX,
        id,
        "echo",
        "hi",
    ])?;
    let took = start.elapsed();
    ensure!(
        out.status.success() && text(&out.stdout) == "hi\n",
        "{}",
        c.report(
            &format!("ctr run --rm --runtime {runtime} {id} echo hi"),
            &out
        )
    );
    assert_gone(c, runtime, id)?;
    Ok(took)
}

/// Names of the processes an idle container costs.
const SHIM: &str = "shim";
const VMM: &str = "isola-vmm";
const VIRTIOFSD: &str = "virtiofsd";
const CONTAINER: &str = "container";

/// One process's PSS.
#[derive(Debug, Clone)]
struct Proc {
    /// [`SHIM`], [`VMM`], [`VIRTIOFSD`] or [`CONTAINER`] (another
    /// helper: its program's name).
    name: String,
    pid: u32,
    pss_kib: u64,
}

/// An idle container's processes, once their PSS settled.
#[derive(Debug, Clone)]
struct Pss {
    procs: Vec<Proc>,
    /// When two samples in a row agreed (None: not within the bound).
    settled_after: Option<Duration>,
}

impl Pss {
    fn total_kib(&self) -> u64 {
        self.procs.iter().map(|p| p.pss_kib).sum()
    }

    fn total_mib(&self) -> f64 {
        self.total_kib() as f64 / 1024.0
    }

    /// The PSS of the processes called `name`, in MiB.
    fn mib(&self, name: &str) -> f64 {
        self.procs
            .iter()
            .filter(|p| p.name == name)
            .map(|p| p.pss_kib)
            .sum::<u64>() as f64
            / 1024.0
    }
}

impl std::fmt::Display for Pss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut by_name: BTreeMap<&str, Vec<&Proc>> = BTreeMap::new();
        for p in &self.procs {
            by_name.entry(p.name.as_str()).or_default().push(p);
        }
        // The shim first, then the others by name.
        let mut names: Vec<&str> = by_name.keys().copied().collect();
        names.sort_by_key(|n| (*n != SHIM, *n));
        let parts: Vec<String> = names
            .iter()
            .map(|name| {
                let procs = &by_name[name];
                let each: Vec<String> = procs
                    .iter()
                    .map(|p| format!("{} {:.1}", p.pid, p.pss_kib as f64 / 1024.0))
                    .collect();
                format!("{name} {:.1} (pid {})", self.mib(name), each.join(" + "))
            })
            .collect();
        write!(f, "{} = {:.1} MiB", parts.join(", "), self.total_mib())?;
        match self.settled_after {
            Some(t) => write!(f, " (settled after {:.0} s)", t.as_secs_f64()),
            None => write!(
                f,
                " (NOT settled within {} s: last sample)",
                SETTLE_LIMIT.as_secs()
            ),
        }
    }
}

/// Runs `sleep 100000` detached under `runtime`, measures its processes'
/// PSS once idle, then kills and deletes it and checks it left nothing.
fn idle(c: &Containerd, runtime: &str, id: &str) -> Result<Pss> {
    discard(c, id);
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        BUSYBOX,
        id,
        "sleep",
        "100000",
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        c.report(&format!("ctr run -d --runtime {runtime} {id}"), &out)
    );
    let measured = c
        .wait_status(id, "RUNNING")
        .and_then(|()| settle(|| processes(c, runtime, id)));
    let removed = remove(c, id).and_then(|()| assert_gone(c, runtime, id));
    let pss = measured.with_context(|| format!("measuring {id}"))?;
    removed.with_context(|| format!("removing {id}"))?;
    Ok(pss)
}

/// Samples every [`SAMPLE_EVERY`] until two totals in a row agree within
/// [`SETTLED_WITHIN`], at most [`SETTLE_LIMIT`] (then the last sample).
fn settle(sample: impl Fn() -> Result<Vec<Proc>>) -> Result<Pss> {
    let start = Instant::now();
    let mut previous: Option<u64> = None;
    loop {
        let procs = sample()?;
        let total: u64 = procs.iter().map(|p| p.pss_kib).sum();
        let settled = previous.is_some_and(|p| agree(p, total));
        if settled || start.elapsed() >= SETTLE_LIMIT {
            return Ok(Pss {
                procs,
                settled_after: settled.then(|| start.elapsed()),
            });
        }
        previous = Some(total);
        std::thread::sleep(SAMPLE_EVERY);
    }
}

/// Whether two totals differ by at most [`SETTLED_WITHIN`] of the larger.
fn agree(a: u64, b: u64) -> bool {
    let (a, b) = (a as f64, b as f64);
    (a - b).abs() <= SETTLED_WITHIN * a.max(b)
}

/// The host processes of container `id` under `runtime`, with their PSS.
fn processes(c: &Containerd, runtime: &str, id: &str) -> Result<Vec<Proc>> {
    let mut procs = Vec::new();
    if runtime == RUNTIME {
        let shim = c
            .shim_pid(id)
            .with_context(|| format!("no containerd-shim-isola-v2 serves {id}"))?;
        procs.push(proc(SHIM.to_string(), shim)?);
        for (pid, cmd) in c.helpers(id) {
            procs.push(proc(program(&cmd), pid)?);
        }
        for name in [VMM, VIRTIOFSD] {
            ensure!(
                procs.iter().any(|p| p.name == name),
                "no {name} process for {id}: {procs:?}"
            );
        }
    } else {
        let shim =
            runc_shim(id).with_context(|| format!("no containerd-shim-runc-v2 serves {id}"))?;
        procs.push(proc(SHIM.to_string(), shim)?);
        for pid in task_pids(c, id)? {
            procs.push(proc(CONTAINER.to_string(), pid)?);
        }
        ensure!(
            procs.len() > 1,
            "ctr task ps {id} lists no process: {procs:?}"
        );
    }
    Ok(procs)
}

fn proc(name: String, pid: u32) -> Result<Proc> {
    Ok(Proc {
        name,
        pid,
        pss_kib: pss_kib(pid)?,
    })
}

/// The file name of a command line's program (`isola-vmm`, `virtiofsd`).
fn program(cmdline: &str) -> String {
    let argv0 = cmdline.split_whitespace().next().unwrap_or("?");
    argv0.rsplit('/').next().unwrap_or(argv0).to_string()
}

/// The `Pss:` line of /proc/PID/smaps_rollup, in kB.
fn pss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let rollup = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_pss(&rollup).with_context(|| format!("no `Pss:` line in {path}"))
}

fn parse_pss(rollup: &str) -> Option<u64> {
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

/// The containerd-shim-runc-v2 serving `id`.
fn runc_shim(id: &str) -> Option<u32> {
    let flag = format!(" -id {id} ");
    processes_containing("containerd-shim-runc-v2")
        .into_iter()
        .find(|(_, cmd)| format!("{cmd} ").contains(&flag))
        .map(|(pid, _)| pid)
}

/// The PID column of `ctr task ps ID` (host pids, for runc).
fn task_pids(c: &Containerd, id: &str) -> Result<Vec<u32>> {
    let out = c.ctr(&["task", "ps", id])?;
    ensure!(
        out.status.success(),
        "{}",
        c.report(&format!("ctr task ps {id}"), &out)
    );
    parse_task_pids(&text(&out.stdout))
}

fn parse_task_pids(printed: &str) -> Result<Vec<u32>> {
    printed
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(|pid| {
            pid.parse()
                .with_context(|| format!("ctr task ps: {pid:?} is not a pid in {printed:?}"))
        })
        .collect()
}

/// SIGKILL to the task, then its task and container deleted.
fn remove(c: &Containerd, id: &str) -> Result<()> {
    let out = c.ctr(&["task", "kill", "--signal", "SIGKILL", id])?;
    ensure!(
        out.status.success(),
        "{}",
        c.report(&format!("ctr task kill {id}"), &out)
    );
    c.wait_status(id, "STOPPED")?;
    for args in [["task", "delete", id], ["container", "delete", id]] {
        let out = c.ctr(&args)?;
        ensure!(
            out.status.success(),
            "{}",
            c.report(&format!("ctr {}", args.join(" ")), &out)
        );
    }
    Ok(())
}

/// Waits (bounded) until container `id` left nothing: the harness's
/// checks (no isola shim, helper, run directory, mount, dead shim socket),
/// no runc shim serving it, and no container of that name.
fn assert_gone(c: &Containerd, runtime: &str, id: &str) -> Result<()> {
    c.assert_clean(id)?;
    if runtime == RUNC {
        let deadline = Instant::now() + GONE_DEADLINE;
        while let Some(pid) = runc_shim(id) {
            ensure!(
                Instant::now() < deadline,
                "the runc shim of {id} (pid {pid}) still runs after {GONE_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let out = c.ctr(&["container", "ls", "-q"])?;
    ensure!(
        !text(&out.stdout).lines().any(|l| l.trim() == id),
        "container {id} is still listed: {}",
        text(&out.stdout)
    );
    Ok(())
}

/// Removes a container of that id left by an interrupted run.
fn discard(c: &Containerd, id: &str) {
    let listed = c
        .ctr(&["container", "info", id])
        .is_ok_and(|out| out.status.success());
    if listed {
        eprintln!("bench-shim: removing {id}, left by an earlier run");
        let _ = c.ctr(&["task", "delete", "--force", id]);
        let _ = c.ctr(&["container", "delete", id]);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_line() {
        let rollup = "00400000-7ffd [rollup]\nRss:  1234 kB\nPss:   567 kB\nPss_Anon:  12 kB\n";
        assert_eq!(parse_pss(rollup), Some(567));
        assert_eq!(parse_pss("Pss_Anon: 12 kB\n"), None);
        assert_eq!(parse_pss("Pss: x kB\n"), None);
    }

    #[test]
    fn task_ps_pids() {
        let printed = "PID      INFO\n1234     -\n5678     -\n";
        assert_eq!(parse_task_pids(printed).ok(), Some(vec![1234, 5678]));
        assert_eq!(parse_task_pids("PID INFO\n").ok(), Some(vec![]));
        assert!(parse_task_pids("PID INFO\nabc -\n").is_err());
    }

    #[test]
    fn settling() {
        assert!(agree(1000, 1020));
        assert!(!agree(1000, 1030));
        assert!(agree(0, 0));
    }

    #[test]
    fn program_names() {
        assert_eq!(program("/a/b/isola-vmm --kernel x"), "isola-vmm");
        assert_eq!(program("virtiofsd --socket-path /x"), "virtiofsd");
        assert_eq!(program(""), "?");
    }
}
