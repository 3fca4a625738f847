//! A private containerd (Debian's 1.6, `tests/containerd/start`) with the
//! isola shim of this build, for the shim's end-to-end tests: `ctr` runs
//! with deadlines, a pty for `-t`, and checks that a sandbox left nothing
//! behind (processes, mounts, run directory, shim sockets).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::containers::{release_binary, virtiofsd};
use crate::project_dir;

/// Deadline of one `ctr` command (a VM boot in the emulated host included).
pub const CTR_DEADLINE: Duration = Duration::from_secs(240);

/// The busybox image (`make busybox-image`).
pub const BUSYBOX: &str = "docker.io/library/busybox:latest";
/// The same with User 1000:1000, WorkingDir /home/user, Env GREETING.
pub const BUSYBOX_USER: &str = "docker.io/library/busybox-user:latest";
/// The runtime name containerd knows the shim by.
pub const RUNTIME: &str = "io.containerd.isola.v2";

/// Puts an isola config back as it was when dropped.
#[derive(Debug)]
pub struct ConfigGuard {
    path: PathBuf,
    original: String,
}

impl Drop for ConfigGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.original);
    }
}

/// Runs `cmd` with its stdio on a pty of `size` (rows, cols), `input`
/// typed into it at once: its status and all it printed (the echo of the
/// input included).
pub fn on_pty(cmd: Command, input: &[u8], size: Option<(u16, u16)>) -> Result<(i32, String)> {
    use std::io::Write;
    let (mut child, mut master) = spawn_on_pty(cmd, size)?;
    master.write_all(input)?;
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the last slave fd closes (the command exited).
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        all
    });
    let status = wait_status(&mut child, CTR_DEADLINE)?;
    let out = reader
        .join()
        .map_err(|_| anyhow::anyhow!("pty reader panicked"))?;
    Ok((status, String::from_utf8_lossy(&out).into_owned()))
}

/// Starts `cmd` with a new pty (of `size`) as its stdin, stdout and
/// stderr: the child and the pty's master.
fn spawn_on_pty(
    mut cmd: Command,
    size: Option<(u16, u16)>,
) -> Result<(std::process::Child, std::fs::File)> {
    let winsize = size.map(|(rows, cols)| nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    });
    let pty = nix::pty::openpty(winsize.as_ref(), None)?;
    let slave = std::fs::File::from(pty.slave);
    let child = cmd
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave))
        .spawn()?;
    // The command's copies of the slave: the reader's EOF comes when the
    // child's are closed too.
    drop(cmd);
    Ok((child, std::fs::File::from(pty.master)))
}

/// Runs `cmd` on a new pty, types `input`, and once `marker` is on the
/// screen and `ready` says so (asked every half second) kills it
/// (SIGKILL) as a terminal's owner dies; the screen.
pub fn killed_on_pty(
    cmd: Command,
    input: &[u8],
    marker: &str,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<String> {
    use std::io::Write;
    let (mut child, mut master) = spawn_on_pty(cmd, None)?;
    master.write_all(input)?;
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut reader = master.try_clone()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + CTR_DEADLINE;
    let mut screen = Vec::new();
    let seen = loop {
        if String::from_utf8_lossy(&screen).contains(marker) {
            break true;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => screen.extend_from_slice(&chunk),
            Err(_) => break false,
        }
    };
    let mut is_ready = false;
    while seen && !is_ready && std::time::Instant::now() < deadline {
        is_ready = ready()?;
        if !is_ready {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    // The reader ends with the master.
    drop(master);
    let screen = String::from_utf8_lossy(&screen).into_owned();
    anyhow::ensure!(seen, "{marker:?} never on the screen: {screen:?}");
    anyhow::ensure!(is_ready, "not ready in time; the screen: {screen:?}");
    Ok(screen)
}

/// One private containerd for the whole test binary.
#[derive(Debug)]
pub struct Containerd {
    pub dir: PathBuf,
    pub sock: PathBuf,
    /// The sandboxes' run root (the isola config's `runtime.run_root`).
    pub run_root: PathBuf,
}

static SHARED: OnceLock<Containerd> = OnceLock::new();

extern "C" fn stop_at_exit() {
    if let Some(c) = SHARED.get() {
        let _ = c.stop();
    }
}

impl Containerd {
    /// The test binary's containerd, started (with the images imported) on
    /// first use and stopped when the binary exits.
    pub fn shared() -> &'static Containerd {
        SHARED.get_or_init(|| {
            let c = Containerd::start(Path::new("/run/isola-e2e-containerd"))
                .expect("starting containerd");
            // SAFETY: registers a plain extern "C" function with no
            // arguments, run once at process exit.
            unsafe {
                libc::atexit(stop_at_exit);
            }
            c
        })
    }

    fn start(dir: &Path) -> Result<Containerd> {
        Containerd::start_with(dir, false)
    }

    /// A containerd of its own in `dir` whose config `isola setup
    /// containerd` edited (the config before it is `config.toml.stock`
    /// there), with the busybox images imported; stop it with
    /// [`Containerd::stop`].
    pub fn start_set_up_by_isola(dir: &Path) -> Result<Containerd> {
        Containerd::start_with(dir, true)
    }

    fn start_with(dir: &Path, setup: bool) -> Result<Containerd> {
        let project = project_dir();
        // Short: `<run_root>/k8s.io/<64-character CRI id>/vsock.sock` fits
        // a Unix socket address (a longer root goes to `_hashed/`).
        let run_root = PathBuf::from("/run/isola-e2e");
        std::fs::create_dir_all(dir)?;
        let config = dir.join("isola.toml");
        std::fs::write(
            &config,
            format!(
                "[hypervisor]\nvmm = \"{}\"\nkernel = \"{}\"\ninitrd = \"{}\"\n\
                 enable_annotations = [\"default_memory_mib\", \"net_offloads\"]\n\
                 [virtiofs]\nvirtiofsd = \"{}\"\n[runtime]\nrun_root = \"{}\"\nlog_level = \"info\"\n\
                 start_timeout_secs = 180\n",
                release_binary("isola-vmm")?.display(),
                project.join("build/vmlinux").display(),
                project.join("build/initrd.img").display(),
                virtiofsd()?.display(),
                run_root.display(),
            ),
        )?;
        release_binary("containerd-shim-isola-v2")?;
        let mut start = Command::new(project.join("tests/containerd/start"));
        start
            .arg(dir)
            .env("ISOLA_CONFIG", &config)
            .env("ISOLA_SHIM_DIR", project.join("target/release"));
        if setup {
            start.env("CONTAINERD_ISOLA_SETUP", release_binary("isola")?);
        }
        let status = start.status().context("running tests/containerd/start")?;
        ensure!(status.success(), "tests/containerd/start failed: {status}");
        let c = Containerd {
            dir: dir.to_path_buf(),
            sock: dir.join("containerd.sock"),
            run_root,
        };
        for image in ["busybox.tar", "busybox-user.tar"] {
            let tar = project.join("build/images").join(image);
            ensure!(
                tar.exists(),
                "{} is missing: run `make busybox-image`",
                tar.display()
            );
            let out = c.ctr(&["image", "import", &tar.to_string_lossy()])?;
            ensure!(
                out.status.success(),
                "importing {image}: {}",
                text(&out.stderr)
            );
        }
        Ok(c)
    }

    /// Restarts containerd alone (its shims keep running), as an admin's
    /// `systemctl restart containerd` does.
    pub fn restart(&self) -> Result<()> {
        terminate_from_pidfile(&self.dir.join("containerd.pid"), "containerd")?;
        let project = project_dir();
        let status = Command::new(project.join("tests/containerd/start"))
            .arg(&self.dir)
            .env("ISOLA_CONFIG", self.dir.join("isola.toml"))
            .env("ISOLA_SHIM_DIR", project.join("target/release"))
            .status()?;
        ensure!(status.success(), "restarting containerd failed: {status}");
        Ok(())
    }

    /// Stops this containerd (its shims keep running).
    pub fn stop(&self) -> Result<()> {
        let status = Command::new(project_dir().join("tests/containerd/stop"))
            .arg(&self.dir)
            .status()?;
        ensure!(status.success(), "tests/containerd/stop: {status}");
        Ok(())
    }

    /// `ctr --address SOCK ARGS`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.sock).args(args);
        cmd
    }

    /// Runs `ctr ARGS` to its end (deadline [`CTR_DEADLINE`]).
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning ctr")?;
        wait_output(child, CTR_DEADLINE).with_context(|| format!("ctr {}", args.join(" ")))
    }

    /// `ctr run --rm --runtime isola IMAGE ID ARGS...`: status, stdout, stderr.
    pub fn run_rm(&self, image: &str, id: &str, args: &[&str]) -> Result<Output> {
        let mut all = vec!["run", "--rm", "--runtime", RUNTIME, image, id];
        all.extend_from_slice(args);
        self.ctr(&all)
    }

    /// `ctr run --rm --runtime isola --annotation ANNOTATION busybox ID
    /// ARGS...`.
    pub fn run_rm_annotated(&self, annotation: &str, id: &str, args: &[&str]) -> Result<Output> {
        let mut all = vec![
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--annotation",
            annotation,
            BUSYBOX,
            id,
        ];
        all.extend_from_slice(args);
        self.ctr(&all)
    }

    /// `ctr run -d --runtime RUNTIME OPTIONS... busybox ID sleep 100000`,
    /// which must succeed; returns once `ctr task ls` says RUNNING.
    pub fn run_detached(&self, runtime: &str, options: &[&str], id: &str) -> Result<()> {
        let mut all = vec!["run", "-d", "--runtime", runtime];
        all.extend_from_slice(options);
        all.extend_from_slice(&[BUSYBOX, id, "sleep", "100000"]);
        let out = self.ctr(&all)?;
        ensure!(
            out.status.success(),
            "{}",
            self.report(&format!("ctr {}", all.join(" ")), &out)
        );
        self.wait_status(id, "RUNNING")
    }

    /// `ctr ARGS` with its stdio on a pty (for `-t`): its status and all it
    /// printed.
    pub fn ctr_on_pty(&self, args: &[&str]) -> Result<(i32, String)> {
        on_pty(self.command(args), b"", None)
    }

    /// Appends `extra` to the isola config the shims read (this
    /// containerd's `isola.toml`) until the guard goes: sandboxes started
    /// meanwhile take it.
    pub fn isola_config_with(&self, extra: &str) -> Result<ConfigGuard> {
        let path = self.dir.join("isola.toml");
        let original = std::fs::read_to_string(&path)?;
        std::fs::write(&path, format!("{original}\n{extra}\n"))?;
        Ok(ConfigGuard { path, original })
    }

    /// The isola config the shims read.
    pub fn isola_config(&self) -> PathBuf {
        self.dir.join("isola.toml")
    }

    /// The STATUS column of `ctr task ls` for `id` (None: no task).
    pub fn task_status(&self, id: &str) -> Result<Option<String>> {
        let out = self.ctr(&["task", "ls"])?;
        ensure!(out.status.success(), "ctr task ls: {}", text(&out.stderr));
        Ok(text(&out.stdout).lines().find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.last().unwrap_or(&"").to_string())
        }))
    }

    /// Waits until `id`'s task has `status`.
    pub fn wait_status(&self, id: &str, status: &str) -> Result<()> {
        let deadline = Instant::now() + CTR_DEADLINE;
        loop {
            let now = self.task_status(id)?;
            if now.as_deref() == Some(status) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "task {id} is {now:?}, not {status}, after {CTR_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sandbox `id`'s run directories, one per containerd namespace seen
    /// under the run root (`<run_root>/<namespace>/<id>`), whether they
    /// exist or not.
    pub fn run_dirs(&self, id: &str) -> Vec<PathBuf> {
        std::fs::read_dir(&self.run_root)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let ns = e.file_name().into_string().ok()?;
                        Some(isola_sandbox::share::sandbox_dir(&self.run_root, &ns, id))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The processes whose command line names sandbox `id`'s run
    /// directory (its isola-vmm, virtiofsd).
    pub fn helpers(&self, id: &str) -> Vec<(u32, String)> {
        self.run_dirs(id)
            .iter()
            .flat_map(|dir| processes_containing(&format!("{}/", dir.display())))
            .collect()
    }

    /// Sandbox `id`'s isola-vmm: the process the shim started (the jail's
    /// supervisor; its jailed child, same command line, is left out).
    pub fn vmms(&self, id: &str) -> Vec<u32> {
        vmm_supervisors(&self.helpers(id))
    }

    /// The shim serving container `id`.
    pub fn shim_pid(&self, id: &str) -> Option<u32> {
        processes_containing("containerd-shim-isola-v2")
            .into_iter()
            .find(|(_, cmd)| cmd.contains(&format!(" -id {id} ")))
            .map(|(pid, _)| pid)
    }

    /// Waits (bounded) until sandbox `id` left nothing: no helper process,
    /// no shim, no run directory, no mount naming it, no dead shim socket.
    pub fn assert_clean(&self, id: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let problems = self.leftovers(id);
            if problems.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = self.log();
                let tag = format!(" id={id} ");
                let lines: Vec<&str> = log.lines().filter(|l| l.contains(&tag)).collect();
                let tail = &lines[lines.len().saturating_sub(30)..];
                bail!(
                    "sandbox {id} left: {problems:#?}\nits shim's log (last lines):\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn leftovers(&self, id: &str) -> Vec<String> {
        let mut problems = Vec::new();
        for (pid, cmd) in self.helpers(id) {
            problems.push(format!("process {pid}: {cmd}"));
        }
        if let Some(pid) = self.shim_pid(id) {
            problems.push(format!("shim {pid}"));
        }
        let run_dirs = self.run_dirs(id);
        for run_dir in run_dirs.iter().filter(|d| d.exists()) {
            problems.push(format!("{} exists", run_dir.display()));
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        // The bundle, in any namespace (ctr's default, Docker's moby).
        let bundle = format!("/{id}/");
        for line in mountinfo.lines() {
            if run_dirs
                .iter()
                .any(|d| line.contains(&format!("{}/", d.display())))
                || (line.contains("/io.containerd.runtime.v2.task/") && line.contains(&bundle))
            {
                problems.push(format!("mount: {line}"));
            }
        }
        if let Ok(entries) = std::fs::read_dir("/run/containerd/s") {
            for entry in entries.flatten() {
                if std::os::unix::net::UnixStream::connect(entry.path()).is_err() {
                    problems.push(format!("dead shim socket {}", entry.path().display()));
                }
            }
        }
        problems
    }

    /// A failed ctr command, with the end of containerd's log (the shims
    /// log there).
    pub fn report(&self, what: &str, out: &Output) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        format!(
            "{what}: status {:?}\nstdout: {}\nstderr: {}\ncontainerd log (last lines):\n{}",
            out.status.code(),
            text(&out.stdout),
            text(&out.stderr),
            tail.join("\n")
        )
    }

    /// `ctr ARGS` started in the background (stdin from /dev/null, output
    /// collected): for a run that a test stops, or waits for later.
    pub fn spawn(&self, args: &[&str]) -> Result<Child> {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning ctr {}", args.join(" ")))
    }

    /// An exec `hog` in task `id` that allocates until it is killed: with
    /// a memory limit on the task, the guest's OOM killer ends it (137).
    pub fn exec_memory_hog(&self, id: &str) -> Result<()> {
        let out = self.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "hog",
            id,
            "sh",
            "-c",
            "tail /dev/zero",
        ])?;
        ensure!(code(&out) == 137, "{}", self.report("the memory hog", &out));
        Ok(())
    }

    /// SIGKILL to task `id`, then its task and container deleted.
    pub fn kill_and_remove(&self, id: &str) -> Result<()> {
        let out = self.ctr(&["task", "kill", "--signal", "SIGKILL", id])?;
        ensure!(out.status.success(), "{}", self.report("kill", &out));
        self.wait_status(id, "STOPPED")?;
        for args in [["task", "delete", id], ["container", "delete", id]] {
            let out = self.ctr(&args)?;
            ensure!(out.status.success(), "{}", self.report("delete", &out));
        }
        Ok(())
    }

    /// containerd's log (the shims' logs are in it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }
}

/// SIGTERM to the daemon whose pid `pidfile` holds, then waits (60 s at
/// most) until it is gone.
pub fn terminate_from_pidfile(pidfile: &Path, what: &str) -> Result<()> {
    let pid: i32 = std::fs::read_to_string(pidfile)
        .with_context(|| format!("{what}'s pid file {}", pidfile.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{what}'s pid file {}", pidfile.display()))?;
    let pid = nix::unistd::Pid::from_raw(pid);
    match nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM) {
        // Stopped already.
        Err(nix::errno::Errno::ESRCH) => return Ok(()),
        other => other?,
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while running(pid) {
        ensure!(Instant::now() < deadline, "{what} (pid {pid}) did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Whether `pid` is a live process: not gone, not a zombie (one that this
/// process started, as the Docker fixture starts dockerd, is reaped
/// here; any other's is its parent's to reap, but it runs no more).
fn running(pid: nix::unistd::Pid) -> bool {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    if let Ok(status) = waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        if status != WaitStatus::StillAlive {
            return false;
        }
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "PID (COMM) STATE ...": COMM may hold spaces and parentheses.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(_) => false,
    }
}

/// Fails unless process `pid` (a VMM: the task pid containerd reports,
/// into whose `/proc/<pid>/ns/net` Docker puts a container's network) is
/// in a network namespace other than this process's, the host's.
pub fn ensure_not_in_host_netns(pid: &str) -> Result<()> {
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .with_context(|| format!("/proc/{pid}/ns/net"))?;
    ensure!(
        theirs != std::fs::read_link("/proc/self/ns/net")?,
        "isola-vmm (pid {pid}) runs in the host's network namespace"
    );
    Ok(())
}

/// The isola-vmm processes of `helpers` whose parent is not an isola-vmm
/// of them: the ones started by a shim (a jailed VMM runs as the child
/// of its supervisor, with the same command line).
pub fn vmm_supervisors(helpers: &[(u32, String)]) -> Vec<u32> {
    let vmms: Vec<u32> = helpers
        .iter()
        .filter(|(_, cmd)| cmd.contains("isola-vmm"))
        .map(|(pid, _)| *pid)
        .collect();
    let parent = |pid: u32| -> Option<u32> {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse()
            .ok()
    };
    vmms.iter()
        .copied()
        .filter(|pid| !parent(*pid).is_some_and(|p| vmms.contains(&p)))
        .collect()
}

/// Every process (not this one) whose command line contains `needle`.
pub fn processes_containing(needle: &str) -> Vec<(u32, String)> {
    isola_sandbox::child::processes_naming(needle)
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits for `child` (killed at the deadline), collecting its output.
pub fn wait_output(child: Child, deadline: Duration) -> Result<Output> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline) {
        Ok(out) => Ok(out?),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::SIGKILL,
            );
            bail!("still running after {deadline:?}: killed")
        }
    }
}

fn wait_status(child: &mut Child, deadline: Duration) -> Result<i32> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.code().unwrap_or(-1));
        }
        if Instant::now() > until {
            let _ = child.kill();
            bail!("still running after {deadline:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The exit status of an Output (-1 if killed by a signal).
pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}
