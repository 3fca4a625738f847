//! Sandboxes from a template VM: a node boots one VM per VM shape to the
//! point where its agent answers, with no sandbox identity, saves it
//! (isola-vmm's `--template` and API `snapshot`), and starts every later
//! sandbox of that shape as a clone of it (`--restore`) instead of
//! booting. See isola-vmm's `snapshot` module for what is saved and how a
//! clone shares the template's memory.
//!
//! - **Shape** ([`Inputs`]): the isola-vmm, kernel and initrd files (path,
//!   size, mtime, inode: a rebuilt kernel is another template), vCPUs,
//!   memory, the kernel command line, the number of virtio-net devices
//!   and their offloads, and whether there is a console. Its SHA-256 names
//!   the template's directory, `<templates>/<key>`, which also holds the
//!   shape in words (`inputs`).
//! - **Where** ([`root_for`]): `templates/` beside the run root's
//!   directory (`/run/isola/templates` for `/run/isola/sandboxes`),
//!   root-only (0700), on tmpfs by default: templates are rebuilt after a
//!   reboot, and their memory is in the page cache every clone maps.
//! - **Building** ([`build_in_background`]): the first sandbox of a shape
//!   that finds no template boots cold and starts the build beside it, in
//!   a task of its own: a lock file (`<key>.lock`, flock) lets one
//!   builder per shape run on the node; the others go on cold. The build
//!   runs virtiofsd on an empty directory and isola-vmm unjailed (no
//!   tenant code runs in a template: our kernel and agent only) in a
//!   network namespace of its own with taps `isola-tpl<N>` whose MACs are
//!   [`template_mac`]; it waits for the agent, asks for the snapshot, and
//!   renames the finished directory into place: a template is there
//!   whole or not at all.
//! - **Using** ([`ready`]): a clone's virtio-net devices keep the
//!   template's MACs in the guest; the host finds them by those MACs and
//!   gives them the pod's (`NetworkInterface.new_mac`). Its virtio-fs
//!   share, vsock socket, console and API socket are its own.
//! - **Failing** ([`discard`]): a clone that does not come up (the VMM
//!   refused the state, died, or its agent never answered) is stopped,
//!   the template is removed (logged, counted), and the sandbox boots cold
//!   in its place.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use isola_protocol::network::Mac;
use isola_protocol::{HealthClient, AGENT_VSOCK_PORT};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::sandbox::{Console, SandboxConfig};
use crate::share::{self, Layout, SHARE_TAG};

/// The file in a template directory that describes its shape.
pub const INPUTS_FILE: &str = "inputs";

/// Clones that could not start from their template and booted cold.
pub static FALLBACKS: AtomicU64 = AtomicU64::new(0);
/// Templates built by this process.
pub static BUILT: AtomicU64 = AtomicU64::new(0);

/// The MAC of a template's virtio-net device `i` (locally administered,
/// "isol" then the index).
pub fn template_mac(i: usize) -> Mac {
    Mac([0x02, 0x69, 0x73, 0x6f, 0x6c, i as u8])
}

/// A file's identity: a rebuilt or replaced file is another one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    pub path: PathBuf,
    pub len: u64,
    pub mtime_ns: i128,
    pub ino: u64,
}

impl FileStamp {
    pub fn of(path: &Path) -> io::Result<FileStamp> {
        let m = fs::metadata(path)?;
        Ok(FileStamp {
            path: path.to_path_buf(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ino: m.ino(),
        })
    }
}

/// Everything that, changed, needs another template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    pub vmm: FileStamp,
    pub kernel: FileStamp,
    pub initrd: FileStamp,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub cmdline: String,
    pub nets: usize,
    pub offloads: bool,
    pub console: bool,
}

impl Inputs {
    /// The shape of `config`'s VM with `nets` virtio-net devices.
    pub fn of(config: &SandboxConfig, nets: usize) -> io::Result<Inputs> {
        Ok(Inputs {
            vmm: FileStamp::of(&config.vmm)?,
            kernel: FileStamp::of(&config.kernel)?,
            initrd: FileStamp::of(&config.initrd)?,
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            cmdline: config.template_cmdline(),
            nets,
            offloads: config.net_offloads,
            console: config.console != Console::Off,
        })
    }

    /// The shape in words, one `name: value` a line.
    pub fn describe(&self) -> String {
        let file = |f: &FileStamp| {
            format!(
                "{} ({} bytes, mtime {} ns, inode {})",
                f.path.display(),
                f.len,
                f.mtime_ns,
                f.ino
            )
        };
        format!(
            "isola-vmm: {}\nkernel: {}\ninitrd: {}\nvcpus: {}\nmemory_mib: {}\ncmdline: {}\nnets: {}\noffloads: {}\nconsole: {}\n",
            file(&self.vmm),
            file(&self.kernel),
            file(&self.initrd),
            self.vcpus,
            self.memory_mib,
            self.cmdline,
            self.nets,
            self.offloads,
            self.console
        )
    }

    /// The template's name: 24 hex digits of the description's SHA-256.
    pub fn key(&self) -> String {
        let digest = Sha256::digest(self.describe().as_bytes());
        digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
    }
}

/// The templates' directory for sandboxes under `run_root`.
pub fn root_for(run_root: &Path) -> PathBuf {
    run_root.parent().unwrap_or(run_root).join("templates")
}

/// The directory of a finished template of this shape, if there is one.
pub fn ready(root: &Path, inputs: &Inputs) -> Option<PathBuf> {
    let dir = root.join(inputs.key());
    let complete = ["memory", "state.json", INPUTS_FILE]
        .iter()
        .all(|f| dir.join(f).is_file());
    complete.then_some(dir)
}

/// Removes a template a clone could not start from (the next sandbox of
/// its shape builds it again).
pub fn discard(dir: &Path, why: &str) {
    FALLBACKS.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(template = %dir.display(), why, "the template does not work; removing it (sandboxes of its shape boot cold until it is built again)");
    // Out of the way first (a concurrent `ready` sees it gone), then gone.
    let aside = dir.with_extension(format!("discarded-{}", std::process::id()));
    let target = match fs::rename(dir, &aside) {
        Ok(()) => aside,
        Err(_) => dir.to_path_buf(),
    };
    if let Err(err) = fs::remove_dir_all(&target) {
        if err.kind() != io::ErrorKind::NotFound {
            tracing::warn!(template = %target.display(), %err, "removing a template");
        }
    }
}

/// How long a failed build keeps others of its shape from trying again.
pub const RETRY_AFTER: Duration = Duration::from_secs(600);

/// Whether a build of `key` failed less than [`RETRY_AFTER`] ago (its
/// `<key>.failed` file says why).
fn failed_recently(root: &Path, key: &str) -> bool {
    fs::metadata(root.join(format!("{key}.failed")))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < RETRY_AFTER)
}

/// Starts building the template for `inputs` in a task of its own,
/// unless one is there, another process builds it, or a build of it
/// failed in the last [`RETRY_AFTER`]; returns at once.
pub fn build_in_background(config: &SandboxConfig, inputs: Inputs) {
    let root = root_for(&config.run_root);
    if failed_recently(&root, &inputs.key()) {
        return;
    }
    let config = config.clone();
    tokio::spawn(async move {
        let key = inputs.key();
        let started = Instant::now();
        match build(&config, &inputs, &root).await {
            Ok(true) => {
                BUILT.fetch_add(1, Ordering::Relaxed);
                tracing::info!(template = %key, ms = started.elapsed().as_millis() as u64, vcpus = inputs.vcpus, memory_mib = inputs.memory_mib, "template built");
            }
            Ok(false) => {
                tracing::debug!(template = %key, "the template is there or being built elsewhere")
            }
            Err(err) => {
                let _ = fs::write(root.join(format!("{key}.failed")), &err);
                tracing::warn!(template = %key, %err, "building the template failed; sandboxes of its shape boot cold (retried in {} s)", RETRY_AFTER.as_secs())
            }
        }
    });
}

/// An exclusive lock on `path`'s file, or None if another process holds it.
fn try_lock(path: &Path) -> io::Result<Option<fs::File>> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(file));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// Builds the template; Ok(false) when there was nothing to do.
async fn build(config: &SandboxConfig, inputs: &Inputs, root: &Path) -> Result<bool, String> {
    let key = inputs.key();
    share::create_private_dir_all(root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    let Some(_lock) = try_lock(&root.join(format!("{key}.lock")))
        .map_err(|e| format!("locking the template {key}: {e}"))?
    else {
        return Ok(false);
    };
    if ready(root, inputs).is_some() {
        return Ok(false);
    }
    let work = root.join(format!("{key}.build"));
    if work.exists() {
        // A builder that died: its lock is free, its leftovers go.
        fs::remove_dir_all(&work).map_err(|e| format!("removing {}: {e}", work.display()))?;
    }
    share::create_private_dir_all(&work)
        .map_err(|e| format!("creating {}: {e}", work.display()))?;
    let result = boot_and_save(config, inputs, &work).await;
    let outcome = result.and_then(|saved| {
        fs::write(saved.join(INPUTS_FILE), inputs.describe())
            .map_err(|e| format!("writing the template's inputs: {e}"))?;
        fs::rename(&saved, root.join(&key))
            .map_err(|e| format!("putting the template in place: {e}"))
    });
    let _ = fs::remove_dir_all(&work);
    outcome.map(|()| true)
}

/// Boots the template VM in `work`, waits for its agent, saves it into
/// `work/template` and returns that directory.
async fn boot_and_save(
    config: &SandboxConfig,
    inputs: &Inputs,
    work: &Path,
) -> Result<PathBuf, String> {
    let layout = Layout::new(work.join("vm"));
    share::create_private_dir(layout.dir()).map_err(|e| format!("creating the VM dir: {e}"))?;
    let empty = work.join("share");
    share::create_private_dir(&empty).map_err(|e| format!("creating the empty share: {e}"))?;
    let saved = work.join("template");
    share::create_private_dir(&saved).map_err(|e| format!("creating the template dir: {e}"))?;

    let mut fs_cmd = tokio::process::Command::new(&config.virtiofsd);
    fs_cmd
        .arg("--socket-path")
        .arg(layout.fs_socket())
        .arg("--shared-dir")
        .arg(&empty)
        .arg("--sandbox")
        .arg("none")
        .arg("--cache")
        .arg("never")
        .arg("--log-level")
        .arg("error")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut virtiofsd = fs_cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", config.virtiofsd.display()))?;
    let deadline = Instant::now() + config.start_timeout;
    while !layout.fs_socket().exists() {
        if Instant::now() >= deadline {
            return Err("virtiofsd did not make its socket in time".into());
        }
        if let Ok(Some(status)) = virtiofsd.try_wait() {
            return Err(format!("virtiofsd exited with {status}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let console = match &config.console {
        Console::Off => "off".to_string(),
        Console::File(_) => work.join("console").display().to_string(),
    };
    let mut cmd = tokio::process::Command::new(&config.vmm);
    cmd.arg("--template").arg(&saved).args([
        "--kernel".to_string(),
        config.kernel.display().to_string(),
        "--initrd".to_string(),
        config.initrd.display().to_string(),
        "--cmdline".to_string(),
        inputs.cmdline.clone(),
        "--vcpus".to_string(),
        inputs.vcpus.to_string(),
        "--memory".to_string(),
        inputs.memory_mib.to_string(),
        "--vsock".to_string(),
        layout.vsock_socket().display().to_string(),
        "--fs".to_string(),
        format!("tag={SHARE_TAG},socket={}", layout.fs_socket().display()),
        "--api-socket".to_string(),
        layout.api_socket().display().to_string(),
        "--console".to_string(),
        console,
    ]);
    let off = if inputs.offloads { "" } else { ",offload=off" };
    for i in 0..inputs.nets {
        cmd.arg("--net")
            .arg(format!("tap=isola-tpl{i},mac={}{off}", template_mac(i)));
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    let netns = tokio::task::spawn_blocking(crate::network::private_netns)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("a network namespace for the template: {e}"))?;
    crate::child::enter_netns(&mut cmd, netns.as_raw_fd());
    let mut vmm = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", config.vmm.display()))?;
    drop(netns);

    let ready = async {
        let client = isola_protocol::hybrid::dial_agent(
            &layout.vsock_socket(),
            AGENT_VSOCK_PORT,
            config.start_timeout,
        )
        .await
        .map_err(|e| format!("dialing the template's agent: {e}"))?;
        let health = HealthClient::new(client);
        let ctx = isola_protocol::ttrpc::context::with_timeout(
            config.start_timeout.as_nanos().min(i64::MAX as u128) as i64,
        );
        health
            .check(ctx, &isola_protocol::agent::CheckRequest::new())
            .await
            .map_err(|e| format!("the template's agent: {e}"))?;
        Ok::<_, String>(health)
    };
    let health = tokio::select! {
        r = ready => r?,
        status = vmm.wait() => return Err(format!("the template's isola-vmm exited ({}) before its agent answered", status.map_or_else(|e| e.to_string(), |s| s.to_string()))),
    };
    let reply = api_call(
        &layout.api_socket(),
        r#"{"action":"snapshot"}"#,
        config.start_timeout,
    )
    .await?;
    drop(health);
    if !reply.contains("\"ok\":true") {
        return Err(format!("the template's isola-vmm did not save it: {reply}"));
    }
    match tokio::time::timeout(config.stop_timeout, vmm.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => return Err(format!("the template's isola-vmm exited with {status}")),
        Ok(Err(e)) => return Err(format!("waiting for the template's isola-vmm: {e}")),
        Err(_) => return Err("the template's isola-vmm did not exit after the snapshot".into()),
    }
    let _ = virtiofsd.start_kill();
    let _ = virtiofsd.wait().await;
    Ok(saved)
}

/// One request on isola-vmm's control API; its reply line.
async fn api_call(socket: &Path, request: &str, timeout: Duration) -> Result<String, String> {
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await?;
        stream.write_all(request.as_bytes()).await?;
        stream.write_all(b"\n").await?;
        let mut line = String::new();
        BufReader::new(stream.take(64 << 10))
            .read_line(&mut line)
            .await?;
        Ok::<_, io::Error>(line)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("the API of isola-vmm ({}) did not answer", socket.display()))?
        .map_err(|e| format!("the API of isola-vmm ({}): {e}", socket.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> SandboxConfig {
        let file = |name: &str| {
            let p = dir.join(name);
            fs::write(&p, name).unwrap();
            p
        };
        SandboxConfig::new(
            "t",
            file("vmm"),
            file("virtiofsd"),
            file("kernel"),
            file("initrd"),
        )
    }

    #[test]
    fn the_key_follows_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let a = Inputs::of(&c, 1).unwrap();
        assert_eq!(a.key(), Inputs::of(&c, 1).unwrap().key());
        assert_eq!(a.key().len(), 24);
        let mut other = c.clone();
        other.memory_mib = 512;
        assert_ne!(Inputs::of(&other, 1).unwrap().key(), a.key());
        assert_ne!(Inputs::of(&c, 2).unwrap().key(), a.key());
        // A rebuilt kernel (another file in its place) is another template.
        fs::remove_file(&c.kernel).unwrap();
        fs::write(&c.kernel, "a new kernel").unwrap();
        let rebuilt = Inputs::of(&c, 1).unwrap();
        assert_ne!(rebuilt.key(), a.key());
        assert!(
            rebuilt.describe().contains("12 bytes"),
            "{}",
            rebuilt.describe()
        );
    }

    #[test]
    fn only_a_whole_template_is_ready_and_a_discarded_one_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let inputs = Inputs::of(&c, 0).unwrap();
        let root = dir.path().join("templates");
        let t = root.join(inputs.key());
        fs::create_dir_all(&t).unwrap();
        fs::write(t.join("memory"), "").unwrap();
        fs::write(t.join("state.json"), "{}").unwrap();
        assert_eq!(ready(&root, &inputs), None);
        fs::write(t.join(INPUTS_FILE), inputs.describe()).unwrap();
        assert_eq!(ready(&root, &inputs), Some(t.clone()));
        let before = FALLBACKS.load(Ordering::Relaxed);
        discard(&t, "test");
        assert!(!t.exists());
        assert_eq!(ready(&root, &inputs), None);
        assert_eq!(FALLBACKS.load(Ordering::Relaxed), before + 1);
    }

    #[test]
    fn one_builder_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lock");
        let first = try_lock(&path).unwrap();
        assert!(first.is_some());
        assert!(try_lock(&path).unwrap().is_none());
        drop(first);
        assert!(try_lock(&path).unwrap().is_some());
    }

    #[test]
    fn templates_live_beside_the_run_root() {
        assert_eq!(
            root_for(Path::new("/run/isola/sandboxes")),
            Path::new("/run/isola/templates")
        );
        assert_eq!(template_mac(1).to_string(), "02:69:73:6f:6c:01");
    }
}
