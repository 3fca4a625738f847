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
//!   that finds no template boots cold and starts the build beside it: a
//!   lock file (`<key>.lock`, flock) lets one builder per shape run on the
//!   node; the others go on cold. The builder starts virtiofsd on an empty
//!   directory (sandboxed, as a sandbox's) and isola-vmm jailed as every
//!   sandbox's is (a jail user of its own, held by the VMM's supervisor)
//!   in a network namespace of its own, with taps `isola-tpl<N>` (handed
//!   over as descriptors) whose MACs are [`template_mac`], each in a
//!   process group of its own, and hands isola-vmm the lock: the VM saves
//!   itself when its agent is ready (`--save-when-ready`), so a build
//!   finishes even if the process that started it ends first (the shim of
//!   a short pod). The state file appears by a rename once the template
//!   is whole (a jailed VMM's supervisor makes it, after the VMM exited
//!   well); a build that failed leaves `<key>.failed` (why), and the
//!   shape is not tried again for [`RETRY_AFTER`]. isola-vmm writes its
//!   log of the build beside the template, as `build.log`.
//! - **Using** ([`ready`]): a clone's virtio-net devices keep the
//!   template's MACs in the guest; the host finds them by those MACs and
//!   gives them the pod's (`NetworkInterface.new_mac`). Its virtio-fs
//!   share, vsock socket, console and API socket are its own.
//! - **Failing** ([`discard`]): a clone that does not come up (the VMM
//!   refused the state, died, or its agent never answered) is stopped,
//!   the template is removed (logged, counted), and the sandbox boots cold
//!   in its place.
//! - **Pruning** ([`prune`]): after each build, the templates no sandbox
//!   can use any more (their isola-vmm, kernel or initrd was replaced:
//!   an upgrade) and the leftovers of dead or discarded builds are
//!   removed; templates of other shapes whose files are current stay.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use isola_protocol::network::Mac;
use sha2::{Digest, Sha256};

use crate::jail::UidLease;
use crate::sandbox::{vmm_boot_args, vmm_jail_args, vmm_own_args, Console, SandboxConfig};
use crate::share::{self, Layout};

/// The file in a template directory that describes its shape.
pub const INPUTS_FILE: &str = "inputs";
/// isola-vmm's log of a template's build, kept beside it.
pub const BUILD_LOG: &str = "build.log";
/// The most bytes of a failed build's log read for its last lines.
const FAILURE_LOG_TAIL: u64 = 64 << 10;

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

/// The isola-vmm, kernel and initrd a template's `inputs` file records
/// (None if it is not one [`Inputs::describe`] wrote).
fn recorded_files(text: &str) -> Option<Vec<FileStamp>> {
    let mut files = Vec::new();
    for name in ["isola-vmm: ", "kernel: ", "initrd: "] {
        let line = text.lines().find_map(|l| l.strip_prefix(name))?;
        let (path, rest) = line.rsplit_once(" (")?;
        let rest = rest.strip_suffix(')')?;
        let mut numbers = rest.split(", ");
        let len = numbers.next()?.strip_suffix(" bytes")?.parse().ok()?;
        let mtime_ns = numbers
            .next()?
            .strip_prefix("mtime ")?
            .strip_suffix(" ns")?
            .parse()
            .ok()?;
        let ino = numbers.next()?.strip_prefix("inode ")?.parse().ok()?;
        files.push(FileStamp {
            path: PathBuf::from(path),
            len,
            mtime_ns,
            ino,
        });
    }
    Some(files)
}

/// Whether the template in `dir` can still be used by some sandbox: its
/// isola-vmm, kernel and initrd are the files it was built from.
fn still_current(dir: &Path) -> bool {
    let Ok(text) = fs::read_to_string(dir.join(INPUTS_FILE)) else {
        return false;
    };
    recorded_files(&text).is_some_and(|files| {
        files
            .iter()
            .all(|f| FileStamp::of(&f.path).is_ok_and(|now| now == *f))
    })
}

/// Removes the templates under `root` that no sandbox can use any more
/// (their isola-vmm, kernel or initrd was replaced or removed: an
/// upgrade), and the leftovers of failed or discarded builds, but never
/// `keep` nor a template whose build holds its lock. Templates live on
/// tmpfs, so each one removed gives back the memory its guest touched
/// once its clones are gone (they keep their mapping). Returns the names
/// removed.
pub fn prune(root: &Path, keep: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || name == keep {
            continue;
        }
        if name.contains(".discarded-") {
            if fs::remove_dir_all(&path).is_ok() {
                removed.push(name);
            }
            continue;
        }
        let lock_path = root.join(format!("{name}.lock"));
        // A build in progress holds it (its VMM does, until it exits).
        let Ok(Some(lock)) = try_lock(&lock_path) else {
            continue;
        };
        if still_current(&path) {
            continue;
        }
        match fs::remove_dir_all(&path) {
            Ok(()) => {
                let _ = fs::remove_file(root.join(format!("{name}.failed")));
                let _ = fs::remove_file(&lock_path);
                tracing::info!(template = %name, "removed a template its isola-vmm, kernel or initrd no longer matches");
                removed.push(name);
            }
            Err(err) => tracing::warn!(template = %name, %err, "removing a stale template"),
        }
        drop(lock);
    }
    removed
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
                // A new template is often the first after an upgrade: the
                // old ones go.
                prune(&root, &key);
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
///
/// The template VM saves itself when its agent is ready (isola-vmm's
/// `--save-when-ready`) and holds the shape's lock until it exits, so the
/// build finishes (or fails, and the next builder cleans up) even if this
/// process ends first: a shim of a short-lived pod, `isola run`. Its
/// sockets and empty share are in `<key>/build/`, isola-vmm's log is
/// `<key>/build.log`.
async fn build(config: &SandboxConfig, inputs: &Inputs, root: &Path) -> Result<bool, String> {
    let key = inputs.key();
    share::create_private_dir_all(root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    let Some(lock) = try_lock(&root.join(format!("{key}.lock")))
        .map_err(|e| format!("locking the template {key}: {e}"))?
    else {
        return Ok(false);
    };
    if ready(root, inputs).is_some() {
        return Ok(false);
    }
    let dir = root.join(&key);
    if dir.exists() {
        // A build that did not finish: its lock is free, its leftovers go.
        fs::remove_dir_all(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
    }
    share::create_private_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    fs::write(dir.join(INPUTS_FILE), inputs.describe())
        .map_err(|e| format!("writing the template's inputs: {e}"))?;
    let work = dir.join("build");
    let layout = Layout::new(work.join("vm"));
    // The share's read-only view, empty: nothing is served to a template.
    for d in [&work, &layout.dir().to_path_buf(), &layout.ro()] {
        share::create_private_dir(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let log = |path: PathBuf| {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| format!("creating {}: {e}", path.display()))
    };

    // What can fail without leaving a process behind comes first: the
    // VMM's command, its network namespace and taps, its jail's user.
    let console = match &config.console {
        Console::Off => Console::Off,
        // The template's boot console, beside its build's files.
        Console::File(_) | Console::Kept => Console::File(work.join("console")),
    };
    let mut cmd = tokio::process::Command::new(&config.vmm);
    cmd.arg("--template")
        .arg(&dir)
        .arg("--save-when-ready")
        .arg(config.start_timeout.as_secs().max(1).to_string())
        .args(vmm_boot_args(config, inputs.cmdline.clone()))
        .args(vmm_own_args(&layout, &console));
    // isola-vmm's log goes beside the template at once: a build outlives
    // the shim that started it, which may not be there to move it.
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log(dir.join(BUILD_LOG))?)
        .process_group(0);
    let netns = tokio::task::spawn_blocking(crate::network::private_netns)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("a network namespace for the template: {e}"))?;
    // The taps, in that namespace, as descriptors (a jailed VMM has no
    // namespace to find them by name in).
    let names: Vec<String> = (0..inputs.nets).map(|i| format!("isola-tpl{i}")).collect();
    let taps = crate::network::open_taps_in(Path::new("the template's netns"), &netns, names)
        .map_err(|e| e.to_string())?;
    let macs: Vec<(std::os::fd::RawFd, Mac)> = taps
        .iter()
        .enumerate()
        .map(|(i, fd)| (fd.as_raw_fd(), template_mac(i)))
        .collect();
    cmd.args(crate::sandbox::vmm_net_args(&macs, inputs.offloads));
    crate::child::enter_netns(&mut cmd, netns.as_raw_fd());
    // The lock goes with the VMM (its jail's supervisor): held until it
    // exits, as is the jail's user.
    let mut inherited = vec![lock.as_raw_fd()];
    inherited.extend(macs.iter().map(|(fd, _)| *fd));
    let _lease = match &config.jail {
        Some(uids) => {
            let lease = UidLease::acquire(uids, &dir.to_string_lossy())
                .map_err(|e| format!("a user for the template's jail: {e}"))?;
            share::create_private_dir(&layout.jail_root())
                .map_err(|e| format!("creating the template's jail root: {e}"))?;
            cmd.args(vmm_jail_args(lease.uid(), &layout));
            inherited.push(lease.fd());
            Some(lease)
        }
        None => None,
    };
    crate::child::inherit(&mut cmd, inherited);

    // virtiofsd as a sandbox's (its sandbox and capabilities).
    let mut fs_cmd = tokio::process::Command::new(&config.virtiofsd);
    fs_cmd
        .args(crate::sandbox::virtiofsd_args(&layout, "error", "never"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log(work.join("virtiofsd.log"))?)
        .process_group(0);
    let mut virtiofsd = fs_cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", config.virtiofsd.display()))?;
    let deadline = Instant::now() + config.start_timeout;
    while !layout.fs_socket().exists() {
        let gone = virtiofsd.try_wait().ok().flatten();
        if gone.is_some() || Instant::now() >= deadline {
            let _ = virtiofsd.start_kill();
            let _ = virtiofsd.wait().await;
            return Err(format!(
                "virtiofsd did not make its socket ({})",
                gone.map_or_else(|| "in time".to_string(), |s| s.to_string())
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let vmm = cmd.spawn();
    drop(taps);
    drop(netns);
    drop(lock);
    let mut vmm = match vmm {
        Ok(vmm) => vmm,
        Err(e) => {
            let _ = virtiofsd.start_kill();
            let _ = virtiofsd.wait().await;
            return Err(format!("starting {}: {e}", config.vmm.display()));
        }
    };
    let status = vmm
        .wait()
        .await
        .map_err(|e| format!("waiting for the template's isola-vmm: {e}"))?;
    // virtiofsd ends when its client does; make sure.
    let _ = virtiofsd.start_kill();
    let _ = virtiofsd.wait().await;
    if status.success() && ready(root, inputs).is_some() {
        let _ = fs::remove_dir_all(&work);
        return Ok(true);
    }
    // The log's last lines say why (its end only: a long boot logs more).
    let mut end = Vec::new();
    if let Ok(mut f) = fs::File::open(dir.join(BUILD_LOG)) {
        let _ = crate::logfile::read_end(&mut f, FAILURE_LOG_TAIL, &mut end);
    }
    let tail = String::from_utf8_lossy(&end);
    let last: Vec<&str> = tail.lines().rev().take(3).collect();
    Err(format!(
        "the template's isola-vmm exited with {status}: {}",
        last.into_iter().rev().collect::<Vec<_>>().join(" | ")
    ))
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
    fn stale_templates_and_leftovers_are_pruned_but_not_current_or_building_ones() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let root = dir.path().join("templates");
        let make = |inputs: &Inputs| {
            let t = root.join(inputs.key());
            fs::create_dir_all(&t).unwrap();
            fs::write(t.join("memory"), "").unwrap();
            fs::write(t.join("state.json"), "{}").unwrap();
            fs::write(t.join(INPUTS_FILE), inputs.describe()).unwrap();
            t
        };
        let small = make(&Inputs::of(&c, 0).unwrap());
        let mut big = c.clone();
        big.memory_mib = 1024;
        let other_shape = make(&Inputs::of(&big, 0).unwrap());
        // A kernel built again: the two templates above are stale.
        fs::remove_file(&c.kernel).unwrap();
        fs::write(&c.kernel, "a new kernel").unwrap();
        let current = make(&Inputs::of(&c, 0).unwrap());
        let current_big = make(&Inputs::of(&big, 0).unwrap());
        let stale_key = small.file_name().unwrap().to_string_lossy().into_owned();
        fs::write(root.join(format!("{stale_key}.failed")), "why").unwrap();
        // Being built: its lock is held.
        let building = root.join("0123456789abcdef01234567");
        fs::create_dir_all(&building).unwrap();
        let held = try_lock(&root.join("0123456789abcdef01234567.lock"))
            .unwrap()
            .unwrap();
        // Left by a build that died before writing its inputs.
        let dead = root.join("fedcba9876543210fedcba98");
        fs::create_dir_all(&dead).unwrap();
        let discarded = root.join("abc.discarded-42");
        fs::create_dir_all(&discarded).unwrap();

        let keep = current.file_name().unwrap().to_string_lossy().into_owned();
        let mut removed = prune(&root, &keep);
        removed.sort();
        let mut expected = vec![
            stale_key.clone(),
            other_shape
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            "fedcba9876543210fedcba98".to_string(),
            "abc.discarded-42".to_string(),
        ];
        expected.sort();
        assert_eq!(removed, expected);
        for gone in [&small, &other_shape, &dead, &discarded] {
            assert!(!gone.exists(), "{} left", gone.display());
        }
        assert!(!root.join(format!("{stale_key}.failed")).exists());
        assert!(!root.join(format!("{stale_key}.lock")).exists());
        for kept in [&current, &current_big, &building] {
            assert!(kept.exists(), "{} removed", kept.display());
        }
        assert!(ready(&root, &Inputs::of(&c, 0).unwrap()).is_some());
        assert!(ready(&root, &Inputs::of(&big, 0).unwrap()).is_some());
        drop(held);
        // Once its builder is gone, a directory with no inputs is a leftover.
        assert_eq!(
            prune(&root, &keep),
            vec!["0123456789abcdef01234567".to_string()]
        );
    }

    #[test]
    fn the_recorded_files_are_read_back_from_the_description() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let inputs = Inputs::of(&c, 1).unwrap();
        let files = recorded_files(&inputs.describe()).unwrap();
        assert_eq!(files, vec![inputs.vmm, inputs.kernel, inputs.initrd]);
        assert_eq!(recorded_files("kernel: /k (1 bytes)\n"), None);
        assert_eq!(recorded_files(""), None);
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
