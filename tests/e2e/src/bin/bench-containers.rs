//! bench-containers: `isola run` against `runc run`, side by side in one run
//! on the same KVM host, same busybox rootfs (build/busybox-rootfs), medians
//! of `--runs` alternating runs. Run it as `make bench` (after `bench`).
//!
//! - start: wall time of running `true` in a fresh container (isola: a
//!   fresh microVM; runc: a fresh container on the host);
//! - stdout throughput: 256 MiB written by `dd` in the container and read
//!   by this process through the runtime's stdout, timed from the first
//!   byte to EOF (so the start is not counted) and checked for length;
//! - virtio-fs read: `dd` of a 256 MiB file in a volume with
//!   `iflag=direct` in the guest (the guest page cache is not filled, so
//!   guest RAM first-touch, very slow in an emulated host, is not what is
//!   measured; virtiofsd reads it from the host page cache), against the
//!   same `dd` without O_DIRECT on the host, reading the same file hot in
//!   the host page cache. Times are busybox `time`'s, inside each side.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use isola_e2e::report::{self, Row};
use isola_e2e::{median, project_dir, require_kvm_host, which, Scratch};

const STREAM_BYTES: u64 = 256 << 20;
const FILE_BYTES: usize = 256 << 20;
/// The VM size for every isola run of the benchmark.
const MEMORY_MIB: u32 = 256;

fn main() {
    if let Err(err) = run() {
        eprintln!("bench-containers: error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let runs = isola_e2e::runs_from_args("bench-containers")?;
    let host = require_kvm_host()?;
    let isola = project_dir().join("target/release/isola");
    ensure!(isola.exists(), "{} is missing: run `make`", isola.display());
    let rootfs = isola_e2e::containers::busybox_rootfs()?;
    which("runc").context("runc is not installed (tests/kvm-host/setup-e2e installs it)")?;
    let scratch = Scratch::new("bench-containers")?;
    let runc = Runc::new(&scratch.path, &rootfs)?;
    let data = scratch.path.join("data");
    std::fs::create_dir_all(&data)?;
    let blob = data.join("blob");
    write_pattern(&blob, FILE_BYTES)?;
    let isola = Isola {
        binary: isola,
        rootfs,
    };
    println!(
        "bench-containers: {runs} runs each, alternating; isola VMs {MEMORY_MIB} MiB, 1 vCPU; {host} KVM host"
    );

    let (mut start_i, mut start_r) = (Vec::new(), Vec::new());
    let (mut tput_i, mut tput_r) = (Vec::new(), Vec::new());
    let (mut fs_guest, mut fs_host) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        let t = timed(|| isola.run(&["true"], &[]).map(drop))?;
        let r = timed(|| runc.run(&["true"]).map(drop))?;
        println!(
            "run {i}: start `true`   isola {:>7.0} ms   runc {:>7.0} ms",
            ms(t),
            ms(r)
        );
        start_i.push(ms(t));
        start_r.push(ms(r));

        let dd = ["dd", "if=/dev/zero", "bs=65536", "count=4096"];
        let ti = stdout_throughput(isola.command(&dd, &[]))?;
        let tr = stdout_throughput(runc.command(&dd)?)?;
        println!("run {i}: stdout 256 MiB  isola {ti:>7.1} MiB/s runc {tr:>7.1} MiB/s");
        tput_i.push(ti);
        tput_r.push(tr);

        let volume = format!("{}:/data:ro", data.display());
        let out = isola.run(
            &[
                "time",
                "dd",
                "if=/data/blob",
                "of=/dev/null",
                "bs=1M",
                "iflag=direct",
            ],
            &["--volume", &volume],
        )?;
        let guest = busybox_real_time(&out).context("the guest's `time dd` output")?;
        let out = run_output(Command::new("busybox").args([
            "time",
            "dd",
            &format!("if={}", blob.display()),
            "of=/dev/null",
            "bs=1M",
        ]))?;
        let host_t = busybox_real_time(&out).context("the host's `time dd` output")?;
        let mib = FILE_BYTES as f64 / (1 << 20) as f64;
        println!(
            "run {i}: read 256 MiB    virtio-fs {:>7.1} MiB/s host {:>7.1} MiB/s",
            mib / guest.max(0.01),
            mib / host_t.max(0.01)
        );
        fs_guest.push(mib / guest.max(0.01));
        fs_host.push(mib / host_t.max(0.01));
    }
    let rows = [
        Row::new(
            "`isola run` / `runc run` of `true`",
            "ms",
            "isola",
            &start_i,
        )
        .against("runc", &start_r),
        Row::new("stdout throughput", "MiB/s", "isola", &tput_i)
            .against("runc", &tput_r)
            .goal("ratio >= 0.5"),
        Row::new(
            "read a 256 MiB file (O_DIRECT in the guest)",
            "MiB/s",
            "virtio-fs",
            &fs_guest,
        )
        .against("host", &fs_host),
    ];
    let saved = report::save("bench-containers", &host, &rows)?;
    let (si, sr) = (median(start_i), median(start_r));
    let (ti, tr) = (median(tput_i), median(tput_r));
    let (fg, fh) = (median(fs_guest), median(fs_host));
    println!();
    println!("| median of {runs}                  | isola     | runc / host |");
    println!("|--------------------------------|-----------|-------------|");
    println!("| run `true` (ms)                | {si:>9.0} | {sr:>11.0} |");
    println!("| stdout throughput (MiB/s)      | {ti:>9.1} | {tr:>11.1} |");
    println!("| read 256 MiB file (MiB/s)      | {fg:>9.1} | {fh:>11.1} |");
    println!("goals: start ratio <= 2.0 (once the VM boot is small), stdout ratio >= 0.5");
    println!("start ratio isola/runc = {:.2}", si / sr);
    println!("stdout throughput ratio isola/runc = {:.2}", ti / tr);
    println!("virtio-fs read ratio guest/host = {:.2}", fg / fh);
    println!("rows: {}", saved.display());
    Ok(())
}

struct Isola {
    binary: PathBuf,
    rootfs: PathBuf,
}

impl Isola {
    fn command(&self, args: &[&str], options: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("run")
            .arg("--rootfs")
            .arg(&self.rootfs)
            .args(["--memory", &MEMORY_MIB.to_string()])
            .args(options)
            .arg("--")
            .args(args);
        cmd
    }

    /// Runs to the end; its stdout and stderr, or an error with them.
    fn run(&self, args: &[&str], options: &[&str]) -> Result<String> {
        run_output(&mut self.command(args, options))
    }
}

/// runc with a bundle over the same rootfs (read-only, so runs share it).
struct Runc {
    bundle: PathBuf,
    next: std::cell::Cell<u32>,
}

impl Runc {
    fn new(scratch: &Path, rootfs: &Path) -> Result<Runc> {
        let bundle = scratch.join("runc-bundle");
        std::fs::create_dir_all(&bundle)?;
        run_output(
            Command::new("runc")
                .arg("spec")
                .arg("--bundle")
                .arg(&bundle),
        )?;
        let path = bundle.join("config.json");
        let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        spec["root"]["path"] = rootfs.display().to_string().into();
        spec["root"]["readonly"] = true.into();
        spec["process"]["terminal"] = false.into();
        std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
        Ok(Runc {
            bundle,
            next: std::cell::Cell::new(0),
        })
    }

    /// `runc run` of `args`: the bundle's spec with these args.
    fn command(&self, args: &[&str]) -> Result<Command> {
        let path = self.bundle.join("config.json");
        let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        spec["process"]["args"] = args.iter().map(|a| a.to_string()).collect();
        std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
        let id = self.next.get() + 1;
        self.next.set(id);
        let mut cmd = Command::new("runc");
        cmd.arg("run")
            .arg("--bundle")
            .arg(&self.bundle)
            .arg(format!("isola-bench-{}-{id}", std::process::id()));
        Ok(cmd)
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        run_output(&mut self.command(args)?)
    }
}

fn run_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    Ok(text)
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Reads the command's stdout to EOF, checks it carried [`STREAM_BYTES`],
/// and returns MiB/s from its first byte to EOF.
fn stdout_throughput(mut cmd: Command) -> Result<f64> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut stdout = child.stdout.take().context("no stdout pipe")?;
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    let mut first = None;
    loop {
        let n = stdout.read(&mut buf).context("reading stdout")?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        total += n as u64;
    }
    let end = Instant::now();
    let status = child.wait()?;
    ensure!(status.success(), "{cmd:?}: {status}");
    ensure!(
        total == STREAM_BYTES,
        "{cmd:?}: {total} bytes on stdout, expected {STREAM_BYTES}"
    );
    let secs = first.map_or(0.0, |f| (end - f).as_secs_f64()).max(1e-3);
    Ok(STREAM_BYTES as f64 / (1 << 20) as f64 / secs)
}

/// busybox `time`'s `real\t0m 1.23s` (or `real\t1h 2m 3.45s`) in seconds.
fn busybox_real_time(output: &str) -> Result<f64> {
    let line = output
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("real"))
        .with_context(|| format!("no `real` line in {output:?}"))?;
    let mut secs = 0.0;
    for part in line.split_whitespace() {
        let (num, unit) = part.split_at(part.len().saturating_sub(1));
        let v: f64 = num
            .parse()
            .with_context(|| format!("{part:?} in {line:?} is not a time"))?;
        secs += match unit {
            "h" => v * 3600.0,
            "m" => v * 60.0,
            "s" => v,
            _ => bail!("{part:?} in {line:?} has no unit"),
        };
    }
    Ok(secs)
}

/// A file of `len` bytes of a non-zero pattern (not sparse).
fn write_pattern(path: &Path, len: usize) -> Result<()> {
    use std::io::Write;
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8 + 1).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        f.write_all(&block[..n])?;
        left -= n;
    }
    f.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_time_lines() {
        let out = "256+0 records in\nreal\t0m 1.25s\nuser\t0m 0.00s\n";
        assert_eq!(busybox_real_time(out).ok(), Some(1.25));
        assert_eq!(busybox_real_time("real\t1h 2m 3.50s").ok(), Some(3723.5));
        assert!(busybox_real_time("user\t0m 0.00s").is_err());
        assert!(busybox_real_time("real\tabc").is_err());
    }
}
