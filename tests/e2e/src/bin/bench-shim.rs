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

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use isola_e2e::containerd::{processes_containing, text, Containerd, BUSYBOX, RUNTIME};
use isola_e2e::pss::{proc, program, settle, Proc, Pss, CONTAINER, SHIM, VIRTIOFSD, VMM};
use isola_e2e::{median, project_dir, require_kvm_host, which};

/// containerd's runc runtime.
const RUNC: &str = "io.containerd.runc.v2";
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

/// Runs `sleep 100000` detached under `runtime`, measures its processes'
/// PSS once idle, then kills and deletes it and checks it left nothing.
fn idle(c: &Containerd, runtime: &str, id: &str) -> Result<Pss> {
    discard(c, id);
    let measured = c
        .run_detached(runtime, &[], id)
        .and_then(|()| settle(|| processes(c, runtime, id)));
    let removed = remove(c, id).and_then(|()| assert_gone(c, runtime, id));
    let pss = measured.with_context(|| format!("measuring {id}"))?;
    removed.with_context(|| format!("removing {id}"))?;
    Ok(pss)
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
    fn task_ps_pids() {
        let printed = "PID      INFO\n1234     -\n5678     -\n";
        assert_eq!(parse_task_pids(printed).ok(), Some(vec![1234, 5678]));
        assert_eq!(parse_task_pids("PID INFO\n").ok(), Some(vec![]));
        assert!(parse_task_pids("PID INFO\nabc -\n").is_err());
    }
}
