//! Docker (Debian unstable's dockerd 28, unpacked by `scripts/lib.sh`'s
//! `isola_docker`; `tests/e2e/run` passes its directory as `DOCKER_BIN`)
//! on the test binary's private containerd, with isola registered the two
//! ways users do: the runtime type `io.containerd.isola.v2` named directly
//! on `docker run`, and the name `isola` from `daemon.json`'s `runtimes`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::containerd::{terminate_from_pidfile, text, wait_output, Containerd, CTR_DEADLINE};

/// The runtime name `daemon.json` gives isola.
pub const DAEMON_JSON_RUNTIME: &str = "isola";

#[derive(Debug)]
pub struct Docker {
    pub containerd: &'static Containerd,
    pub dir: PathBuf,
    pub sock: PathBuf,
    bin: PathBuf,
}

static SHARED: OnceLock<Docker> = OnceLock::new();

extern "C" fn stop_at_exit() {
    if let Some(d) = SHARED.get() {
        if let Err(e) = d.stop() {
            eprintln!("stopping dockerd: {e:#}");
        }
    }
}

impl Docker {
    /// The test binary's dockerd, started on first use (after its
    /// containerd) and stopped at exit, before that containerd.
    pub fn shared() -> &'static Docker {
        SHARED.get_or_init(|| {
            let d = Docker::start(Path::new("/run/isola-e2e-docker")).expect("starting dockerd");
            // SAFETY: registers a plain extern "C" function with no
            // arguments, run once at process exit (atexit runs it before
            // the containerd's, registered earlier).
            unsafe {
                libc::atexit(stop_at_exit);
            }
            d
        })
    }

    fn start(dir: &Path) -> Result<Docker> {
        let bin = PathBuf::from(std::env::var_os("DOCKER_BIN").context(
            "DOCKER_BIN is not set: run the Docker tests through tests/e2e/run, \
             which unpacks Docker (scripts/lib.sh, isola_docker)",
        )?);
        let containerd = Containerd::shared();
        std::fs::create_dir_all(dir)?;
        let config = dir.join("daemon.json");
        let daemon = serde_json::json!({
            "runtimes": { DAEMON_JSON_RUNTIME: { "runtimeType": "io.containerd.isola.v2" } },
            // Docker's default bridge, on an address of the tests' range;
            // no iptables: nothing of it is routed anywhere.
            "bip": "198.19.0.1/24",
            "iptables": false,
            "ip6tables": false,
            "userland-proxy-path": bin.join("docker-proxy"),
            "exec-opts": ["native.cgroupdriver=cgroupfs"],
        });
        std::fs::write(&config, serde_json::to_vec_pretty(&daemon)?)?;
        let sock = dir.join("docker.sock");
        let log = std::fs::File::create(dir.join("dockerd.log"))?;
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("setsid");
        cmd.arg(bin.join("dockerd"))
            .arg("--config-file")
            .arg(&config)
            .arg("--containerd")
            .arg(&containerd.sock)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = cmd.spawn().context("spawning dockerd")?;
        let d = Docker {
            containerd,
            dir: dir.to_path_buf(),
            sock,
            bin,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = d.docker(&["version", "--format", "{{.Server.Version}}"])?;
            if out.status.success() {
                eprintln!("dockerd {} answers", text(&out.stdout).trim());
                return Ok(d);
            }
            if let Some(status) = child.try_wait()? {
                bail!("dockerd exited ({status}):\n{}", d.log());
            }
            ensure!(
                Instant::now() < deadline,
                "dockerd does not answer after 120 s:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn stop(&self) -> Result<()> {
        terminate_from_pidfile(&self.dir.join("dockerd.pid"), "dockerd")
    }

    /// `docker -H SOCK ARGS` to its end (deadline [`CTR_DEADLINE`]).
    pub fn docker(&self, args: &[&str]) -> Result<Output> {
        let child = Command::new(self.bin.join("docker"))
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning docker")?;
        wait_output(child, CTR_DEADLINE).with_context(|| format!("docker {}", args.join(" ")))
    }

    /// `docker ARGS`, which must succeed: its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.docker(args)?;
        ensure!(
            out.status.success(),
            "{}",
            self.report(&format!("docker {}", args.join(" ")), &out)
        );
        Ok(text(&out.stdout))
    }

    /// A failed docker command, with the ends of dockerd's and
    /// containerd's logs.
    pub fn report(&self, what: &str, out: &Output) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(20)..];
        format!(
            "{}\ndockerd log (last lines):\n{}",
            self.containerd.report(what, out),
            tail.join("\n")
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }
}
