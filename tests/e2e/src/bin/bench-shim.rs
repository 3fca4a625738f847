//! bench-shim: containerd with the isola shim (`io.containerd.isola.v2`)
//! against containerd with runc (`io.containerd.runc.v2`), side by side in
//! one run on the same KVM host, through `ctr` and the busybox image
//! (build/images/busybox.tar), in the e2e suite's private containerd
//! (`Containerd::shared`). isola runs two ways: from the node's template
//! (the default; the first isola run builds it beside its boot, and the
//! measured runs start once it is there) and booting cold (the same
//! config with `runtime.templates = false`, through ctr's
//! `--runtime-config-path`). Run it as `make bench`. Medians of `--runs`:
//!
//! - `ctr run --rm IMAGE ID echo hi`: the wall time of the whole ctr
//!   command (create, start, output, exit, delete; for isola a VM restore
//!   or boot, and its stop), the three interleaved, after one warm-up of
//!   each that is not counted. Each run starts once the previous one left
//!   nothing behind;
//! - host memory of an idle container: `ctr run -d IMAGE ID sleep 100000`,
//!   then, once `ctr task ls` says RUNNING, the PSS (proportional set size:
//!   memory shared between processes is counted once, split between them)
//!   of every process the container costs the host, from
//!   `/proc/PID/smaps_rollup`, sampled every second until two samples in a
//!   row agree within 2% (the guest is idle; at most 60 s). isola: the
//!   shim, isola-vmm and virtiofsd (both of its processes); runc: the shim
//!   and the container's processes. Every container is killed and deleted
//!   afterwards, and must leave nothing;
//! - density: [`DENSE`] idle isola containers started one after the
//!   other, the total PSS of all of them after each (template and cold):
//!   what the last one added and the mean per container. Clones share the
//!   template's clean pages (the page cache of its memory file), so the
//!   more there are, the less each costs.
//!
//! The samples go to build/bench/shim.json (`scripts/bench-plot` draws
//! build/bench/shim.png from them).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use isola_e2e::containerd::{processes_containing, text, Containerd, BUSYBOX, RUNTIME};
use isola_e2e::pss::{proc, program, settle, Proc, Pss, CONTAINER, SHIM, VIRTIOFSD, VMM};
use isola_e2e::report::{self, Row};
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

/// Idle containers started side by side for the density figures.
const DENSE: usize = 10;

/// The three ways a container runs here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// isola, its VM a clone of the node's template (the default).
    Template,
    /// isola with `runtime.templates = false`: every VM boots.
    Cold,
    Runc,
}

const FLAVORS: [Flavor; 3] = [Flavor::Template, Flavor::Cold, Flavor::Runc];

impl Flavor {
    fn name(self) -> &'static str {
        match self {
            Flavor::Template => "isola",
            Flavor::Cold => "isola-cold",
            Flavor::Runc => "runc",
        }
    }

    fn runtime(self) -> &'static str {
        match self {
            Flavor::Template | Flavor::Cold => RUNTIME,
            Flavor::Runc => RUNC,
        }
    }

    /// `ctr run` options: the cold flavor's isola config (ConfigPath).
    fn options(self, c: &Containerd) -> Result<Vec<String>> {
        Ok(match self {
            Flavor::Cold => vec![
                "--runtime-config-path".into(),
                cold_config(c)?.display().to_string(),
            ],
            _ => Vec::new(),
        })
    }
}

/// The shared containerd's isola config with templates off.
fn cold_config(c: &Containerd) -> Result<std::path::PathBuf> {
    let path = c.dir.join("isola-cold.toml");
    if !path.exists() {
        let text = std::fs::read_to_string(c.dir.join("isola.toml"))?;
        std::fs::write(&path, without_templates(&text)?)?;
    }
    Ok(path)
}

/// An isola config's text with `runtime.templates = false`.
fn without_templates(text: &str) -> Result<String> {
    let mut config: toml::Table = text.parse().context("the shared isola.toml")?;
    let runtime = config
        .entry("runtime")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(runtime) = runtime else {
        anyhow::bail!("[runtime] of the shared isola.toml is not a table");
    };
    runtime.insert("templates".into(), toml::Value::Boolean(false));
    Ok(toml::to_string(&config)?)
}

/// Waits until the node has a whole template (the first isola run built
/// it beside its boot).
fn wait_for_template(c: &Containerd) -> Result<std::path::PathBuf> {
    let root = isola_sandbox::template::root_for(&c.run_root);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let ready = std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("state.json").is_file() && p.join("inputs").is_file());
        if let Some(dir) = ready {
            return Ok(dir);
        }
        ensure!(
            Instant::now() < deadline,
            "no template in {} after the warm-up",
            root.display()
        );
        std::thread::sleep(Duration::from_millis(250));
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

    // (a) ctr run --rm ... echo hi. The first isola run builds the template.
    for flavor in FLAVORS {
        let t = echo_run(c, flavor, &format!("bench-echo-{}-warm", flavor.name()))?;
        println!("warm-up: ctr run {:<10} {:>7.0} ms", flavor.name(), ms(t));
    }
    let template = wait_for_template(c)?;
    println!("template: {}", template.display());
    let mut echo: Vec<Vec<f64>> = vec![Vec::new(); FLAVORS.len()];
    // Sandbox::start's own total (the shim's `sandbox started` line) of
    // each isola run: the template and the cold boot.
    let mut ready: Vec<Vec<f64>> = vec![Vec::new(); 2];
    for i in 1..=runs {
        let mut line = format!("run {i}: ctr run echo hi");
        for (k, flavor) in FLAVORS.iter().enumerate() {
            let id = format!("bench-echo-{}-{i}", flavor.name());
            let t = echo_run(c, *flavor, &id)?;
            line.push_str(&format!("   {} {:>7.0} ms", flavor.name(), ms(t)));
            echo[k].push(ms(t));
            if *flavor != Flavor::Runc {
                let (ms, cloned) = sandbox_started(&c.log(), &id).with_context(|| {
                    format!("no `sandbox started` line of {id} in containerd's log")
                })?;
                ensure!(
                    cloned == (*flavor == Flavor::Template),
                    "{id}: the shim says template={cloned}, for the {} flavour",
                    flavor.name()
                );
                ready[k].push(ms);
            }
        }
        println!("{line}");
    }

    // (b) an idle container's PSS.
    let mut idle_pss: Vec<Vec<Pss>> = vec![Vec::new(); FLAVORS.len()];
    for i in 1..=runs {
        for (k, flavor) in FLAVORS.iter().enumerate() {
            let s = idle(c, *flavor, &format!("bench-idle-{}-{i}", flavor.name()))?;
            println!("run {i}: idle PSS {:<10} {s}", flavor.name());
            idle_pss[k].push(s);
        }
    }

    // (c) density: DENSE idle containers side by side, the total PSS
    // after each; the last one's cost is what the last one added.
    let mut dense = Vec::new();
    for flavor in [Flavor::Template, Flavor::Cold] {
        let totals = density(c, flavor, DENSE)?;
        println!(
            "density {}: total PSS after each of {DENSE} idle containers (MiB): {}",
            flavor.name(),
            totals
                .iter()
                .map(|t| format!("{t:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        dense.push(totals);
    }

    let medians: Vec<f64> = echo.iter().map(|v| median(v.clone())).collect();
    let med = |k: usize, name: &str| median(idle_pss[k].iter().map(|s| s.mib(name)).collect());
    let totals = |k: usize| -> Vec<f64> { idle_pss[k].iter().map(Pss::total_mib).collect() };
    let total = |k: usize| median(totals(k));
    let last = |k: usize| {
        let t = &dense[k];
        (
            t[t.len() - 1] - t[t.len() - 2],
            t[t.len() - 1] / t.len() as f64,
        )
    };
    let (tl, ta) = last(0);
    let (cl, ca) = last(1);
    println!();
    println!(
        "| {:<38} | isola     | isola-cold | runc      |",
        format!("median of {runs}")
    );
    println!("|----------------------------------------|-----------|------------|-----------|");
    println!(
        "| ctr run --rm echo hi (ms)              | {:>9.0} | {:>10.0} | {:>9.0} |",
        medians[0], medians[1], medians[2]
    );
    for (label, name) in [("shim", SHIM), ("isola-vmm", VMM), ("virtiofsd", VIRTIOFSD)] {
        let runc = if name == SHIM {
            format!("{:.1}", med(2, SHIM))
        } else {
            "-".to_string()
        };
        println!(
            "| idle PSS: {:<28} | {:>9.1} | {:>10.1} | {:>9} |",
            format!("{label} (MiB)"),
            med(0, name),
            med(1, name),
            runc
        );
    }
    println!(
        "| idle PSS: total (MiB)                  | {:>9.1} | {:>10.1} | {:>9.1} |",
        total(0),
        total(1),
        total(2)
    );
    println!(
        "| {:<38} | {tl:>9.1} | {cl:>10.1} | {:>9} |",
        format!("{DENSE} idle: the {DENSE}th added (MiB)"),
        "-"
    );
    println!(
        "| {:<38} | {ta:>9.1} | {ca:>10.1} | {:>9} |",
        format!("{DENSE} idle: per container (MiB)"),
        "-"
    );
    println!(
        "ctr run ratio isola/runc = {:.2} (goal <= 1.2); isola-cold/runc = {:.2}; template/cold = {:.2}",
        medians[0] / medians[2],
        medians[1] / medians[2],
        medians[0] / medians[1]
    );
    println!(
        "idle PSS per container with {DENSE} side by side: isola {ta:.1} MiB (goal <= 25), the {DENSE}th added {tl:.1} MiB (goal <= 20)"
    );
    let samples = serde_json::json!({
        "host": host.to_string(),
        "runs": runs,
        "echo_ms": FLAVORS.iter().zip(&echo).map(|(f, v)| (f.name(), v.clone())).collect::<std::collections::BTreeMap<_, _>>(),
        "idle_pss_mib": FLAVORS.iter().zip(&idle_pss).map(|(f, v)| (f.name(), v.iter().map(Pss::total_mib).collect::<Vec<_>>())).collect::<std::collections::BTreeMap<_, _>>(),
        "dense_total_mib": {"isola": dense[0], "isola-cold": dense[1]},
    });
    let rows = [
        Row::new(
            "`ctr run --rm busybox echo hi`",
            "ms",
            "isola template",
            &echo[0],
        )
        .against("runc", &echo[2])
        .goal("ratio <= 1.2"),
        Row::new(
            "`ctr run --rm busybox echo hi`",
            "ms",
            "isola cold",
            &echo[1],
        )
        .against("runc", &echo[2]),
        Row::new(
            "`ctr run --rm busybox echo hi`",
            "ms",
            "isola template",
            &echo[0],
        )
        .against("isola cold", &echo[1]),
        Row::new(
            "sandbox ready (the shim's Sandbox::start)",
            "ms",
            "isola template",
            &ready[0],
        )
        .against("isola cold", &ready[1]),
        Row::new(
            "idle container, host PSS",
            "MiB",
            "isola template",
            &totals(0),
        )
        .against("runc", &totals(2)),
        Row::new("idle container, host PSS", "MiB", "isola cold", &totals(1))
            .against("runc", &totals(2)),
        Row::new(
            &format!("{DENSE} idle side by side, per container"),
            "MiB",
            "isola template",
            &[ta],
        )
        .against("isola cold", &[ca])
        .goal("<= 25 MiB"),
        Row::new(
            &format!("{DENSE} idle side by side, what the {DENSE}th added"),
            "MiB",
            "isola template",
            &[tl],
        )
        .against("isola cold", &[cl])
        .goal("<= 20 MiB"),
    ];
    println!(
        "rows: {}",
        report::save("bench-shim", &host, &rows)?.display()
    );
    let out = project_dir().join("build/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("shim.json"), serde_json::to_vec_pretty(&samples)?)?;
    println!("samples: {}", out.join("shim.json").display());
    Ok(())
}

/// Starts `n` idle containers of `flavor` one after the other; the total
/// PSS of all of them (settled) after each; then removes them all.
fn density(c: &Containerd, flavor: Flavor, n: usize) -> Result<Vec<f64>> {
    let ids: Vec<String> = (1..=n)
        .map(|i| format!("bench-dense-{}-{i}", flavor.name()))
        .collect();
    let mut totals = Vec::new();
    let mut result = Ok(());
    for (k, id) in ids.iter().enumerate() {
        discard(c, id);
        let options = flavor.options(c)?;
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        let measured = c
            .run_detached(flavor.runtime(), &options, id)
            .and_then(|()| {
                settle(|| {
                    let mut all = Vec::new();
                    for id in &ids[..=k] {
                        all.extend(processes(c, flavor.runtime(), id)?);
                    }
                    Ok(all)
                })
            });
        match measured {
            Ok(pss) => totals.push(pss.total_mib()),
            Err(err) => {
                result = Err(err);
                break;
            }
        }
    }
    for id in &ids {
        if c.ctr(&["container", "info", id])
            .is_ok_and(|o| o.status.success())
        {
            remove(c, id)?;
            assert_gone(c, flavor.runtime(), id)?;
        }
    }
    result.map(|()| totals)
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
fn echo_run(c: &Containerd, flavor: Flavor, id: &str) -> Result<Duration> {
    discard(c, id);
    let runtime = flavor.runtime();
    let options = flavor.options(c)?;
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    args.extend(options.iter().map(String::as_str));
    args.extend([BUSYBOX, id, "echo", "hi"]);
    let start = Instant::now();
    let out = c.ctr(&args)?;
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

/// The `ms` and `template` of the shim's `sandbox started` line for
/// sandbox `id` in containerd's log (the last one, if several).
fn sandbox_started(log: &str, id: &str) -> Option<(f64, bool)> {
    let tag = format!(" id={id} ");
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(&tag) && l.contains("sandbox started"))?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_string)
    };
    Some((field("ms=")?.parse().ok()?, field("template=")? == "true"))
}

/// Runs `sleep 100000` detached under `runtime`, measures its processes'
/// PSS once idle, then kills and deletes it and checks it left nothing.
fn idle(c: &Containerd, flavor: Flavor, id: &str) -> Result<Pss> {
    discard(c, id);
    let runtime = flavor.runtime();
    let options = flavor.options(c)?;
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let measured = c
        .run_detached(runtime, &options, id)
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
    fn the_sandbox_started_line_of_one_sandbox() {
        let log = "isola-shim namespace=default id=a-1 2026-12-07T04:43:27Z  INFO sandbox started sandbox=a-1 kernel=6.12 dir=/run/x ms=690 template=true\n\
                   isola-shim namespace=default id=a-10 2026-12-07T04:43:28Z  INFO sandbox started sandbox=a-10 kernel=6.12 dir=/run/y ms=7000 template=false\n\
                   isola-shim namespace=default id=a-1 2026-12-07T04:43:29Z  INFO deleted container=a-1\n";
        assert_eq!(sandbox_started(log, "a-1"), Some((690.0, true)));
        assert_eq!(sandbox_started(log, "a-10"), Some((7000.0, false)));
        assert_eq!(sandbox_started(log, "a-2"), None);
    }

    #[test]
    fn the_cold_config_is_the_shared_one_without_templates() {
        let text = "[hypervisor]\nvmm = \"/x\"\n[runtime]\nrun_root = \"/run/r\"\n";
        let cold = without_templates(text).unwrap();
        let path = std::path::Path::new("isola-cold.toml");
        let config = isola_sandbox::config::Config::parse(&cold, path).unwrap();
        assert!(!config.runtime.templates);
        assert_eq!(config.runtime.run_root, std::path::Path::new("/run/r"));
        let none = without_templates("[hypervisor]\nvmm = \"/x\"\n").unwrap();
        assert!(
            !isola_sandbox::config::Config::parse(&none, path)
                .unwrap()
                .runtime
                .templates
        );
    }

    #[test]
    fn task_ps_pids() {
        let printed = "PID      INFO\n1234     -\n5678     -\n";
        assert_eq!(parse_task_pids(printed).ok(), Some(vec![1234, 5678]));
        assert_eq!(parse_task_pids("PID INFO\n").ok(), Some(vec![]));
        assert!(parse_task_pids("PID INFO\nabc -\n").is_err());
    }
}
